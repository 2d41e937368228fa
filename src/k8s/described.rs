//! The pools the NetworkAttachmentDefinitions describe, for the controller's pool gauges: a
//! pool's real capacity (less its gateway, outside `range_start`/`range_end`, less `exclude`)
//! is in the `ipam` object that draws from it, not in the IPPool, which holds only the CIDR. A
//! pool no NetworkAttachmentDefinition describes keeps its CIDR's size
//! (`controller::metrics::pool_stats`). For the node-slice controller, the keys that decide
//! slicing; for the store's doctor, the pools whose networks keep no reservations and those
//! outside node slices.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::api::DynamicObject;
use serde_json::Value;

use crate::config::{self, ipam_of, names_whereabouts, IpamConfig};
use crate::ipam::names::object_name;
use crate::store::kubernetes::slice_pool_name;
use crate::store::PoolRef;

/// The keys that decide a pool's name and range. The rest (engine, paths, logging) is the
/// node's business: its flat file decides what a network may set there, which the controller
/// cannot see, and the controller must not act on paths a namespace user wrote.
const POOL_KEYS: [&str; 7] = [
    "type",
    "range",
    "range_start",
    "range_end",
    "exclude",
    "ipranges",
    "network_name",
];

/// The part of `ipam` the controller reads: [`POOL_KEYS`] and `also` (keys in any case, as the
/// `config` module reads them).
pub fn pool_part(ipam: &Value, also: &str) -> Value {
    let Some(map) = ipam.as_object() else {
        return ipam.clone();
    };
    let wanted = |k: &str| {
        POOL_KEYS
            .iter()
            .chain([&also])
            .any(|w| config::same_key(k, w))
    };
    Value::Object(
        map.iter()
            .filter(|(k, _)| wanted(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// The pools of every whereabouts `ipam` object the NetworkAttachmentDefinitions hold, by
/// name, read as the plugin reads them (`config::load_untrusted`). Sliced networks are left
/// out (their pools are per node); so is what cannot be read, which a log line names. When two
/// describe one pool differently, the first (by namespace and name) wins.
pub fn described_pools(nads: &[Arc<DynamicObject>]) -> Vec<PoolRef> {
    let mut sorted: Vec<&Arc<DynamicObject>> = nads.iter().collect();
    sorted.sort_by_key(|nad| (nad.metadata.namespace.clone(), nad.metadata.name.clone()));
    let mut pools = BTreeMap::new();
    for nad in sorted {
        let config = nad.data.get("spec").and_then(|s| s.get("config"));
        let Some(config) = config.and_then(Value::as_str) else {
            continue;
        };
        match pools_of(config) {
            Ok(found) => {
                for pool in found {
                    pools.entry(pool.name.clone()).or_insert(pool);
                }
            }
            Err(err) => tracing::debug!(
                nad = %format!(
                    "{}/{}",
                    nad.metadata.namespace.as_deref().unwrap_or_default(),
                    nad.metadata.name.as_deref().unwrap_or_default()
                ),
                %err,
                "its pools' capacity is not known"
            ),
        }
    }
    pools.into_values().collect()
}

/// The pools one `spec.config` describes; none for another IPAM or a sliced network.
fn pools_of(config_text: &str) -> Result<Vec<PoolRef>, String> {
    match pool_config(config_text, "gateway")? {
        Some(cfg) => crate::plugin::pools(&cfg).map_err(|e| e.msg),
        None => Ok(Vec::new()),
    }
}

/// The pool part of one `spec.config` (and `also`), read as the plugin reads it; none for
/// another IPAM or a sliced network (whose pools are per node).
fn pool_config(config_text: &str, also: &str) -> Result<Option<IpamConfig>, String> {
    let Some(ours) = whereabouts_config(config_text)? else {
        return Ok(None);
    };
    if ours.sliced {
        return Ok(None);
    }
    ours.pool_part(also).map(Some)
}

/// A `spec.config` whose `ipam` names this plugin.
struct Ours {
    conf: Value,
    ipam: Value,
    /// Whether it sets `node_slice_size`: its pools are per node.
    sliced: bool,
}

impl Ours {
    /// The pool part of the `ipam` object (and `also`), read as the plugin reads it.
    fn pool_part(&self, also: &str) -> Result<IpamConfig, String> {
        config::load_untrusted(Some(&pool_part(&self.ipam, also)), &[]).map_err(|e| e.describe())
    }
}

/// `config_text` read, when its `ipam` names this plugin.
fn whereabouts_config(config_text: &str) -> Result<Option<Ours>, String> {
    let conf: Value =
        serde_json::from_str(config_text).map_err(|e| format!("spec.config is not JSON: {e}"))?;
    let Some(ipam) = ipam_of(&conf).filter(names_whereabouts) else {
        return Ok(None);
    };
    let Some(map) = ipam.as_object() else {
        return Ok(None);
    };
    let sliced = map.keys().any(|k| config::same_key(k, "node_slice_size"));
    Ok(Some(Ours { conf, ipam, sliced }))
}

/// The object names of the pools the NetworkAttachmentDefinitions describe outside node slices.
pub fn plain_pools(nads: &[Arc<DynamicObject>]) -> BTreeSet<String> {
    let pools = described_pools(nads).into_iter();
    pools.map(|pool| object_name(&pool.name)).collect()
}

/// The IPPools (by object name) that only networks keeping no reservations draw from
/// (`enable_overlapping_ranges: false` in every NetworkAttachmentDefinition describing them):
/// their entries need none. A pool none describes (a network configured in the nodes' files),
/// or one a network with reservations draws from too, is not among them.
pub fn pools_without_reservations(nads: &[Arc<DynamicObject>]) -> BTreeSet<String> {
    let mut reserved: BTreeMap<String, bool> = BTreeMap::new();
    for nad in nads {
        let config = nad.data.get("spec").and_then(|s| s.get("config"));
        let Some(config) = config.and_then(Value::as_str) else {
            continue;
        };
        let Ok(Some(cfg)) = pool_config(config, "enable_overlapping_ranges") else {
            continue;
        };
        for pool in crate::plugin::pools(&cfg).unwrap_or_default() {
            *reserved.entry(object_name(&pool.name)).or_default() |= cfg.enable_overlapping_ranges;
        }
    }
    let unreserved = reserved.into_iter().filter(|(_, reserved)| !reserved);
    unreserved.map(|(name, _)| name).collect()
}

/// The NodeSlicePools (by name, as the node-slice controller names them) that only sliced
/// networks keeping no reservations ask for (`enable_overlapping_ranges: false` in every
/// NetworkAttachmentDefinition asking for them): the entries of their nodes' slice pools need
/// none.
pub fn slice_pools_without_reservations(nads: &[Arc<DynamicObject>]) -> BTreeSet<String> {
    let mut reserved: BTreeMap<String, bool> = BTreeMap::new();
    for (name, keeps) in nads.iter().filter_map(|nad| sliced_reservations(nad)) {
        *reserved.entry(name).or_default() |= keeps;
    }
    let unreserved = reserved.into_iter().filter(|(_, reserved)| !reserved);
    unreserved.map(|(name, _)| name).collect()
}

/// The NodeSlicePool a sliced network's NetworkAttachmentDefinition asks for, and whether the
/// network keeps reservations; none for another IPAM, an unsliced network or what cannot be
/// read.
fn sliced_reservations(nad: &DynamicObject) -> Option<(String, bool)> {
    let config = nad.data.get("spec")?.get("config")?.as_str()?;
    let ours = whereabouts_config(config).ok()??;
    if !ours.sliced {
        return None;
    }
    let cfg = ours.pool_part("enable_overlapping_ranges").ok()?;
    let cni_network = config::network_name_of(&ours.conf, nad.metadata.name.as_deref()?).ok()?;
    let pool = slice_pool_name(&cfg.network_name, cni_network);
    Some((pool, cfg.enable_overlapping_ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ApiResource;
    use serde_json::json;

    fn nad(namespace: &str, name: &str, ipam: Value) -> Arc<DynamicObject> {
        let config = json!({"cniVersion": "0.3.1", "name": name, "type": "macvlan", "ipam": ipam});
        let resource = ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&());
        let mut object = DynamicObject::new(name, &resource).within(namespace);
        object.data = json!({"spec": {"config": config.to_string()}});
        Arc::new(object)
    }

    #[test]
    fn a_pools_capacity_is_what_its_network_hands_out() {
        let pools = described_pools(&[
            nad(
                "a",
                "narrow",
                json!({"type": "whereabouts", "range": "10.0.0.0/24",
                       "range_start": "10.0.0.100", "range_end": "10.0.0.109",
                       "exclude": ["10.0.0.104/30"], "kubernetes": {"kubeconfig": "/x"}}),
            ),
            // The `type` key in any case, as the runtime's plugins read it.
            nad(
                "a",
                "gateway",
                json!({"TYPE": "whereabouts", "range": "10.1.0.0/29", "gateway": "10.1.0.1",
                       "network_name": "blue"}),
            ),
            nad(
                "b",
                "sliced",
                json!({"type": "whereabouts", "range": "10.2.0.0/16", "node_slice_size": "/24"}),
            ),
            nad(
                "b",
                "other",
                json!({"type": "host-local", "subnet": "10.3.0.0/24"}),
            ),
            nad(
                "b",
                "broken",
                json!({"type": "whereabouts", "range": "not a range"}),
            ),
        ]);
        let found: Vec<(String, u128)> = pools
            .iter()
            .map(|p| (p.name.clone(), p.range.capacity()))
            .collect();
        // 100 to 109 less 104 to 107; a /29's six hosts less the gateway.
        assert_eq!(
            found,
            vec![
                ("10.0.0.0-24".to_string(), 6),
                ("blue-10.1.0.0-29".to_string(), 5)
            ]
        );
    }

    /// The object names of the pools outside node slices: a sliced network's are per node.
    #[test]
    fn plain_pools_are_named_as_their_objects() {
        let nads = [
            nad(
                "a",
                "plain",
                json!({"type": "whereabouts", "range": "fd00::/64", "network_name": "Blue"}),
            ),
            nad(
                "a",
                "sliced",
                json!({"type": "whereabouts", "range": "10.2.0.0/16", "node_slice_size": "/24"}),
            ),
        ];
        let names: Vec<String> = plain_pools(&nads).into_iter().collect();
        assert_eq!(names, ["blue-fd00---64"]);
    }

    #[test]
    fn the_first_description_of_a_pool_wins() {
        let narrow = json!({"type": "whereabouts", "range": "10.0.0.0/24",
                            "range_end": "10.0.0.10"});
        let whole = json!({"type": "whereabouts", "range": "10.0.0.0/24"});
        let pools = described_pools(&[nad("b", "whole", whole), nad("a", "narrow", narrow)]);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].range.capacity(), 10);
    }
}
