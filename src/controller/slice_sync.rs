//! The node-slice controller: for every NetworkAttachmentDefinition whose whereabouts `ipam`
//! sets `node_slice_size`, a NodeSlicePool (named as the Kubernetes engine looks it up) that
//! gives every node a slice and frees the slices of removed nodes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ApiResource, DynamicObject, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::Value;

use super::metrics::Metrics;
use super::slices::assign;
use crate::cli::store_args::ipam_of;
use crate::ipam::slices::parse_slice_size;
use crate::ipam::{parse_range_text, Cidr};
use crate::k8s::crd::{IPPool, NodeSlicePool, NodeSlicePoolSpec, NodeSlicePoolStatus};
use crate::store::kubernetes::slice_pool_name;

pub fn nad_resource() -> ApiResource {
    ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: "k8s.cni.cncf.io/v1".into(),
        kind: "NetworkAttachmentDefinition".into(),
        plural: "network-attachment-definitions".into(),
    }
}

/// What one NodeSlicePool must divide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub range: Cidr,
    pub size: u8,
    /// The NetworkAttachmentDefinition it came from, for messages.
    pub source: String,
}

/// The NodeSlicePool a NetworkAttachmentDefinition's `spec.config` asks for, if any.
pub fn wanted(source: &str, config_text: &str) -> Result<Option<Wanted>, String> {
    let conf: Value = serde_json::from_str(config_text)
        .map_err(|e| format!("{source}: spec.config is not JSON: {e}"))?;
    let Some(ipam) = ipam_of(&conf) else {
        return Ok(None);
    };
    let Some(size_text) = ipam.get("node_slice_size").and_then(Value::as_str) else {
        return Ok(None);
    };
    let size = parse_slice_size(size_text).map_err(|e| format!("{source}: {e}"))?;
    let range_text = ipam
        .get("range")
        .and_then(Value::as_str)
        .or_else(|| {
            ipam.get("ipRanges")?
                .as_array()?
                .first()?
                .get("range")?
                .as_str()
        })
        .ok_or_else(|| format!("{source}: node_slice_size is set but no range is"))?;
    let (range, _, _) =
        parse_range_text(range_text).map_err(|e| format!("{source}: range {range_text:?}: {e}"))?;
    let network_name = ipam
        .get("network_name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let cni_network = conf.get("name").and_then(Value::as_str).unwrap_or("");
    Ok(Some(Wanted {
        name: slice_pool_name(network_name, cni_network),
        range: range.network(),
        size,
        source: source.to_string(),
    }))
}

/// One pass: every wanted pool brought up to date with the nodes that exist now.
pub async fn sync(client: &Client, namespace: &str, metrics: &Arc<Metrics>) -> Result<(), String> {
    let nads: Api<DynamicObject> = Api::all_with(client.clone(), &nad_resource());
    let nads = match nads.list(&ListParams::default()).await {
        Ok(list) => list,
        // Multus is not installed: no network attachments, so nothing to slice.
        Err(kube::Error::Api(s)) if s.code == 404 => {
            tracing::debug!("the NetworkAttachmentDefinition resource is not installed");
            return Ok(());
        }
        Err(e) => return Err(format!("cannot list NetworkAttachmentDefinitions: {e}")),
    };
    let mut pools: BTreeMap<String, Wanted> = BTreeMap::new();
    for nad in &nads.items {
        let source = format!(
            "NetworkAttachmentDefinition {}/{}",
            nad.metadata.namespace.as_deref().unwrap_or_default(),
            nad.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(config) = nad
            .data
            .get("spec")
            .and_then(|s| s.get("config"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        match wanted(&source, config) {
            Ok(Some(w)) => match pools.get(&w.name) {
                Some(first) if first.range != w.range || first.size != w.size => tracing::warn!(
                    pool = %w.name, first = %first.source, ignored = %w.source,
                    "two NetworkAttachmentDefinitions want the same NodeSlicePool with different ranges; the first wins"
                ),
                Some(_) => {}
                None => {
                    pools.insert(w.name.clone(), w);
                }
            },
            Ok(None) => {}
            Err(err) => tracing::warn!(%err, "ignored"),
        }
    }
    if pools.is_empty() {
        return Ok(());
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes: BTreeSet<String> = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot list nodes: {e}"))?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let busy = busy_ranges(client, namespace).await?;
    let api: Api<NodeSlicePool> = Api::namespaced(client.clone(), namespace);
    let mut failed = Vec::new();
    for want in pools.values() {
        if let Err(err) = sync_pool(&api, want, &nodes, &busy, metrics).await {
            failed.push(err);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// The ranges of the IPPools that hold addresses: a slice among them is not free for a new
/// node, whoever it belonged to. Without the IPPool resource (another engine), none.
async fn busy_ranges(client: &Client, namespace: &str) -> Result<HashSet<Cidr>, String> {
    let api: Api<IPPool> = Api::namespaced(client.clone(), namespace);
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list
            .items
            .iter()
            .filter(|p| !p.spec.allocations.is_empty())
            .filter_map(|p| Cidr::parse(&p.spec.range, false))
            .map(|c| c.network())
            .collect()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(HashSet::new()),
        Err(e) => Err(format!("cannot list IPPools: {e}")),
    }
}

async fn sync_pool(
    api: &Api<NodeSlicePool>,
    want: &Wanted,
    nodes: &BTreeSet<String>,
    busy: &HashSet<Cidr>,
    metrics: &Arc<Metrics>,
) -> Result<(), String> {
    let spec = NodeSlicePoolSpec {
        range: want.range.to_string(),
        slice_size: format!("/{}", want.size),
    };
    let existing = api
        .get_opt(&want.name)
        .await
        .map_err(|e| format!("cannot read NodeSlicePool {}: {e}", want.name))?;
    // A changed range or slice size starts over: the old slices mean nothing in the new range.
    let current = existing
        .as_ref()
        .filter(|p| p.spec == spec)
        .and_then(|p| p.status.as_ref())
        .map(|s| s.allocations.clone())
        .unwrap_or_default();
    let plan = assign(&want.range, want.size, nodes, &current, busy)
        .map_err(|e| format!("NodeSlicePool {} ({}): {e}", want.name, want.source))?;
    if !plan.unassigned.is_empty() {
        tracing::warn!(pool = %want.name, nodes = ?plan.unassigned, "no free slice left for these nodes");
    }
    let assigned = plan
        .allocations
        .iter()
        .filter(|a| !a.node_name.is_empty())
        .count() as u64;
    metrics.set_slices(
        &want.name,
        assigned,
        u64::try_from(plan.total).unwrap_or(u64::MAX),
    );
    let status = Some(NodeSlicePoolStatus {
        allocations: plan.allocations,
    });
    let result = match existing {
        None => {
            let mut pool = NodeSlicePool::new(&want.name, spec);
            pool.status = status;
            api.create(&PostParams::default(), &pool).await.map(|_| ())
        }
        Some(mut pool) => {
            if pool.spec == spec && pool.status == status {
                return Ok(());
            }
            pool.spec = spec;
            pool.status = status;
            pool.metadata = ObjectMeta {
                managed_fields: None,
                ..pool.metadata
            };
            api.replace(&want.name, &PostParams::default(), &pool)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => {
            tracing::info!(pool = %want.name, assigned, "NodeSlicePool updated");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            metrics
                .conflicts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(format!("NodeSlicePool {} changed meanwhile", want.name))
        }
        Err(err) => Err(format!("cannot write NodeSlicePool {}: {err}", want.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_attachment_config() {
        let conf = r#"{"cniVersion":"0.3.1","name":"net-a","type":"macvlan","ipam":{"type":"whereabouts","range":"10.0.0.0/16","node_slice_size":"/24","network_name":"blue"}}"#;
        let w = wanted("nad", conf).unwrap().unwrap();
        assert_eq!(w.name, "blue");
        assert_eq!(w.size, 24);
        let plain = r#"{"name":"net-b","ipam":{"type":"whereabouts","range":"fd00::/64","node_slice_size":"80"}}"#;
        let w = wanted("nad", plain).unwrap().unwrap();
        assert_eq!(w.name, "net-b");
        assert!(wanted(
            "nad",
            r#"{"name":"x","ipam":{"type":"whereabouts","range":"10.0.0.0/24"}}"#
        )
        .unwrap()
        .is_none());
        assert!(wanted("nad", "not json").is_err());
    }
}
