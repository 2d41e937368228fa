//! Building store requests for library-level tests of the Kubernetes engine.

use std::net::IpAddr;
use std::path::Path;

use serde_json::{json, Value};
use whereabouts::config::{load_with_flat_files, IpamConfig};
use whereabouts::ipam::names::pool_name;
use whereabouts::ipam::Range;
use whereabouts::store::{
    AddRequest, Attachment, AttachmentRequest, GcRequest, Hints, PoolRef, RangeRequest, Store,
    StoreError,
};

/// The `ipam` object for `range` with a kubeconfig, plus `extra` keys.
pub fn ipam_json(range: &str, kubeconfig: &Path, extra: Value) -> Value {
    let mut ipam = json!({
        "type": "whereabouts",
        "range": range,
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
    });
    if let (Some(map), Value::Object(more)) = (ipam.as_object_mut(), extra) {
        map.extend(more);
    }
    ipam
}

pub fn config(ipam: &Value) -> IpamConfig {
    load_with_flat_files(Some(ipam), &[]).expect("valid ipam config")
}

pub fn open(cfg: &IpamConfig) -> Result<Box<dyn Store>, StoreError> {
    match &cfg.datastore {
        whereabouts::config::Datastore::Kubernetes(k) => {
            whereabouts::store::kubernetes::open(cfg, k)
        }
        other => panic!("not the kubernetes datastore: {other:?}"),
    }
}

pub fn pools(cfg: &IpamConfig) -> Vec<PoolRef> {
    cfg.ranges
        .iter()
        .map(|spec| PoolRef {
            name: pool_name(&spec.cidr, &cfg.network_name, None),
            spec: spec.clone(),
            gateway: cfg.gateway,
            range: Range::resolve(spec, cfg.gateway).expect("usable range"),
        })
        .collect()
}

pub fn attachment(container: &str, pod: &str, ifname: &str) -> Attachment {
    Attachment {
        container_id: container.into(),
        ifname: ifname.into(),
        pod_ref: Some(pod.into()),
        pod_uid: None,
    }
}

pub fn add_request(cfg: &IpamConfig, who: Attachment) -> AddRequest {
    AddRequest {
        cni_network: "testnet".into(),
        network_name: cfg.network_name.clone(),
        overlap: cfg.enable_overlapping_ranges,
        attachment: who,
        ranges: pools(cfg)
            .into_iter()
            .map(|pool| RangeRequest {
                pool,
                requested: None,
            })
            .collect(),
        node_slice_size: cfg.node_slice_size,
        sleep_for_race: 0,
        node: Some("node-a".into()),
    }
}

pub fn del_request(cfg: &IpamConfig, container: &str, ifname: &str) -> AttachmentRequest {
    AttachmentRequest {
        cni_network: "testnet".into(),
        network_name: cfg.network_name.clone(),
        container_id: container.into(),
        ifname: ifname.into(),
        pools: pools(cfg),
        node_slice_size: cfg.node_slice_size,
        hints: Hints::default(),
    }
}

pub fn gc_request(cfg: &IpamConfig, valid: &[(&str, &str)]) -> GcRequest {
    GcRequest {
        cni_network: "testnet".into(),
        network_name: cfg.network_name.clone(),
        pools: pools(cfg),
        valid: valid
            .iter()
            .map(|(c, i)| (c.to_string(), i.to_string()))
            .collect(),
        node: Some("node-a".into()),
        node_slice_size: cfg.node_slice_size,
    }
}

/// The container ids of an IPPool object's entries, in key order.
pub fn pool_holders(pool: &Value) -> Vec<String> {
    let entries = pool["spec"]["allocations"]
        .as_object()
        .into_iter()
        .flatten();
    entries
        .map(|(_, e)| e["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The addresses recorded in an IPPool object (key offsets from the IP part of spec.range).
pub fn pool_ips(pool: &Value) -> Vec<IpAddr> {
    let range = pool["spec"]["range"].as_str().unwrap_or_default();
    let (ip, _) = range.split_once('/').unwrap_or_default();
    let base: IpAddr = ip.parse().unwrap();
    let base = match base {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    };
    let mut out = Vec::new();
    if let Some(map) = pool["spec"]["allocations"].as_object() {
        for key in map.keys() {
            let value = base + key.parse::<u128>().unwrap();
            out.push(if ip.contains(':') {
                IpAddr::V6(value.into())
            } else {
                IpAddr::V4((value as u32).into())
            });
        }
    }
    out.sort();
    out
}
