//! Node slices ("fast IPAM"): a NodeSlicePool assigns each node a slice of the range, and the
//! node allocates from its own pool `[network_name-]<node>-<slice>`, so nodes never contend.

use crate::ipam::names::{object_name, pool_name};
use crate::ipam::{Cidr, Range, RangeSpec};
use crate::k8s::crd::NodeSlicePool;
use crate::store::{PoolRef, StoreError};

pub use crate::store::node::{node_name, NODENAME_ENV};

/// The NodeSlicePool's name: the network name, else the CNI network's `name` (as upstream).
pub fn slice_pool_name(network_name: &str, cni_network: &str) -> String {
    if network_name.is_empty() {
        object_name(cni_network)
    } else {
        object_name(network_name)
    }
}

/// The slice assigned to `node` in the NodeSlicePool.
pub fn slice_of(pool: &NodeSlicePool, node: &str) -> Result<Option<Cidr>, StoreError> {
    let Some(status) = &pool.status else {
        return Ok(None);
    };
    let Some(found) = status.allocations.iter().find(|a| a.node_name == node) else {
        return Ok(None);
    };
    Cidr::parse(&found.slice_range, false)
        .map(|c| Some(c.network()))
        .ok_or_else(|| {
            StoreError::io(format!(
                "NodeSlicePool {} gives node {node} the slice {:?}, which is not a CIDR",
                pool.metadata.name.as_deref().unwrap_or_default(),
                found.slice_range
            ))
        })
}

/// The node's pool to allocate from: the configured range narrowed to the slice, keeping its
/// bounds, exclusions and gateway.
pub fn node_pool(
    configured: &PoolRef,
    slice: Cidr,
    network_name: &str,
    node: &str,
) -> Result<PoolRef, StoreError> {
    let whole = configured.range.cidr;
    if !is_slice_of(slice, whole) {
        return Err(StoreError::config(format!(
            "this node's slice {slice} is not inside the configured range {whole} (the \
             NodeSlicePool divides the configuration's first range only, and follows its \
             NetworkAttachmentDefinition)"
        )));
    }
    let mut pool = slice_pool(configured, slice, network_name, node)?;
    let range = &mut pool.range;
    // The configured bounds, as absolute values, intersected with the slice's own.
    let lo = whole.base() + configured.range.first;
    let hi = whole.base() + configured.range.last;
    let slice_lo = slice.base() + range.first;
    let slice_hi = slice.base() + range.last;
    let (first, last) = (lo.max(slice_lo), hi.min(slice_hi));
    if first > last {
        return Err(StoreError::Exhausted {
            range: format!("{slice} (this node's slice, outside the configured bounds)"),
        });
    }
    range.first = first - slice.base();
    range.last = last - slice.base();
    Ok(pool)
}

/// The node's pool as a DEL, CHECK or GC looks in it: the slice's pool whatever the configured
/// bounds, which decide only where an ADD takes an address. None when the slice is not of the
/// configured range (the network renumbered since the ADD, or a range after the configuration's
/// first): the node's pool holds nothing of this range, and such a DEL must not fail, or the
/// pod's sandbox would never be torn down (an address of the slice before a renumbering is the
/// controller's cleanup's to free).
pub fn pool_to_release(
    configured: &PoolRef,
    slice: Cidr,
    network_name: &str,
    node: &str,
) -> Option<PoolRef> {
    if !is_slice_of(slice, configured.range.cidr) {
        return None;
    }
    slice_pool(configured, slice, network_name, node).ok()
}

fn is_slice_of(slice: Cidr, whole: Cidr) -> bool {
    whole.overlaps(&slice) && slice.prefix >= whole.prefix
}

/// The slice's pool with the configured exclusions and gateway, before the bounds narrow it.
fn slice_pool(
    configured: &PoolRef,
    slice: Cidr,
    network_name: &str,
    node: &str,
) -> Result<PoolRef, StoreError> {
    let spec = RangeSpec {
        cidr: slice,
        start: None,
        end: None,
        exclude: configured.spec.exclude.clone(),
    };
    let range = Range::resolve(&spec, configured.gateway)
        .map_err(|err| StoreError::config(format!("node slice {slice}: {err}")).because(err))?;
    Ok(PoolRef {
        name: pool_name(&slice, network_name, Some(node)),
        spec,
        gateway: configured.gateway,
        range,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::parse_exclude;

    fn configured(range: &str, start: Option<&str>, exclude: &[&str], gw: Option<&str>) -> PoolRef {
        let cidr = Cidr::parse(range, false).unwrap().network();
        let spec = RangeSpec {
            cidr,
            start: start.map(|s| s.parse().unwrap()),
            end: None,
            exclude: exclude.iter().map(|e| parse_exclude(e).unwrap()).collect(),
        };
        let gateway = gw.map(|g| g.parse().unwrap());
        PoolRef {
            name: pool_name(&cidr, "", None),
            range: Range::resolve(&spec, gateway).unwrap(),
            spec,
            gateway,
        }
    }

    #[test]
    fn slice_keeps_bounds_excludes_and_gateway() {
        let pool = configured(
            "10.0.0.0/16",
            Some("10.0.0.10"),
            &["10.0.0.12/31"],
            Some("10.0.0.11"),
        );
        let slice = Cidr::parse("10.0.0.0/24", false).unwrap();
        let node = node_pool(&pool, slice, "net", "node1").unwrap();
        assert_eq!(node.name, "net-node1-10.0.0.0-24");
        assert_eq!(node.range.first, 10);
        assert_eq!(node.range.last, 254);
        assert!(!node.range.is_usable(11));
        assert!(!node.range.is_usable(12));
        assert!(node.range.is_usable(14));
        let far = Cidr::parse("10.0.5.0/24", false).unwrap();
        let other = node_pool(&pool, far, "", "n2").unwrap();
        assert_eq!(other.name, "n2-10.0.5.0-24");
        assert_eq!(other.range.first, 1);
        let outside = Cidr::parse("10.1.0.0/24", false).unwrap();
        assert!(node_pool(&pool, outside, "", "n").is_err());
        assert!(pool_to_release(&pool, outside, "", "n").is_none());
    }

    #[test]
    fn a_slice_outside_the_bounds_is_no_pool_to_allocate_from_but_one_to_release_from() {
        let pool = configured("10.0.0.0/16", Some("10.0.1.0"), &[], None);
        let below = Cidr::parse("10.0.0.0/24", false).unwrap();
        assert!(matches!(
            node_pool(&pool, below, "net", "n"),
            Err(StoreError::Exhausted { .. })
        ));
        let held = pool_to_release(&pool, below, "net", "n").unwrap();
        assert_eq!(held.name, "net-n-10.0.0.0-24");
        assert_eq!((held.range.first, held.range.last), (1, 254));
    }
}
