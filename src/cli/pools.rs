//! `whereabouts pools`: every pool with its range, how many addresses are used and free.

use std::collections::BTreeMap;

use serde::Serialize;

use super::output::{print, OutputArgs};
use super::store_args::StoreArgs;
use crate::config::{Datastore, IpamConfig};
use crate::ipam::names::object_name;
use crate::ipam::Cidr;
use crate::plugin;

#[derive(clap::Args, Debug)]
pub struct PoolsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub format: OutputArgs,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct PoolRow {
    pub pool: String,
    pub range: String,
    pub used: u128,
    /// Free addresses; for a pool the configuration does not describe, the range's size less
    /// the network and broadcast addresses.
    pub free: u128,
    pub utilisation: f64,
}

fn default_capacity(cidr: &Cidr) -> u128 {
    cidr.last_offset().saturating_sub(1)
}

/// Range, capacity and addresses used, by pool name.
type Pools = BTreeMap<String, (Cidr, u128, u128)>;

/// The configured ranges' pools, each under the name its store keeps it by, so that a pool
/// nothing is allocated from yet still has its row and a used one has a single row. A
/// node-sliced network on the Kubernetes engine (the one that slices) has no pool of its whole
/// range: its pools are the nodes' slices, which the allocations name.
fn configured(cfg: &IpamConfig) -> anyhow::Result<Pools> {
    let mut pools = Pools::new();
    let sliced = matches!(cfg.datastore, Datastore::Kubernetes(_)) && cfg.node_slice_size.is_some();
    if sliced {
        return Ok(pools);
    }
    for pool in plugin::pools(cfg).map_err(|e| anyhow::anyhow!(e.msg))? {
        let name = match cfg.datastore {
            // The Kubernetes engine stores a pool as an object, lower-cased as upstream does.
            Datastore::Kubernetes(_) => object_name(&pool.name),
            Datastore::Local { .. } | Datastore::Etcd(_) => pool.name.clone(),
        };
        pools.insert(name, (pool.cidr(), pool.range.capacity(), 0));
    }
    Ok(pools)
}

pub fn rows(args: &StoreArgs) -> anyhow::Result<Vec<PoolRow>> {
    let (cfg, store) = args.open()?;
    let mut pools = configured(&cfg)?;
    for allocation in store.allocations(None).map_err(anyhow::Error::new)? {
        let entry = pools
            .entry(allocation.pool.clone())
            .or_insert_with(|| (allocation.range, default_capacity(&allocation.range), 0));
        entry.2 += 1;
    }
    Ok(pools
        .into_iter()
        .map(|(pool, (range, capacity, used))| PoolRow {
            pool,
            range: range.to_string(),
            used,
            free: capacity.saturating_sub(used),
            utilisation: if capacity == 0 {
                0.0
            } else {
                used as f64 / capacity as f64
            },
        })
        .collect())
}

pub fn run(args: PoolsArgs) -> anyhow::Result<()> {
    let rows = rows(&args.store)?;
    print(
        args.format.output,
        &rows,
        &["POOL", "RANGE", "USED", "FREE", "UTILISATION"],
        |r| {
            vec![
                r.pool.clone(),
                r.range.clone(),
                r.used.to_string(),
                r.free.to_string(),
                format!("{:.1}%", r.utilisation * 100.0),
            ]
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ipam(settings: serde_json::Value) -> IpamConfig {
        let mut ipam = json!({"type": "whereabouts", "range": "10.70.0.0/16",
                              "network_name": "Tenant"});
        ipam.as_object_mut()
            .unwrap()
            .extend(settings.as_object().unwrap().clone());
        crate::config::load_with_flat_files(Some(&ipam), &[]).unwrap()
    }

    fn names(pools: &Pools) -> Vec<&str> {
        pools.keys().map(String::as_str).collect()
    }

    /// A configured range's row carries the name its store keeps the pool by, so its
    /// allocations count on it rather than on a second row; a node-sliced range has no row of
    /// its own beside its slices.
    #[test]
    fn configured_pools_are_named_as_stored() {
        let kubernetes = json!({"datastore": "kubernetes",
                                "kubernetes": {"kubeconfig": "/nonexistent"}});
        let local = json!({"local_path": "/nonexistent.db"});
        assert_eq!(
            names(&configured(&ipam(kubernetes.clone())).unwrap()),
            ["tenant-10.70.0.0-16"]
        );
        assert_eq!(
            names(&configured(&ipam(local.clone())).unwrap()),
            ["Tenant-10.70.0.0-16"]
        );
        // The local engine does not slice: its range keeps its row.
        let mut local_sliced = local;
        local_sliced["node_slice_size"] = "/24".into();
        assert_eq!(configured(&ipam(local_sliced)).unwrap().len(), 1);
        let mut sliced = kubernetes;
        sliced["node_slice_size"] = "/24".into();
        assert!(configured(&ipam(sliced)).unwrap().is_empty());
    }
}
