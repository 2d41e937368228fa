//! The upstream CustomResourceDefinitions as Rust types (group `whereabouts.cni.cncf.io`,
//! version `v1alpha1`), field for field, so objects written by either implementation are read by
//! the other. `deploy/` holds the CRD YAML generated from these types.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One allocated address of an IPPool, keyed in `allocations` by its decimal offset from the IP
/// part of `spec.range`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct IPAllocation {
    /// The container ID of the attachment.
    pub id: String,
    /// `namespace/name` of the pod.
    pub podref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
}

/// Every field read as empty when missing, as Go reads them, while the schema (derived from
/// the type above) still requires `id` and `podref`, as upstream's does: entries written
/// before a field existed stay in pools still in use, and one unreadable entry would make its
/// whole pool (and every list of pools) unreadable.
impl<'de> Deserialize<'de> for IPAllocation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Stored {
            #[serde(default)]
            id: String,
            #[serde(default)]
            podref: String,
            #[serde(default)]
            ifname: String,
        }
        let Stored { id, podref, ifname } = Stored::deserialize(deserializer)?;
        Ok(IPAllocation { id, podref, ifname })
    }
}

/// An address range and the addresses handed out from it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "whereabouts.cni.cncf.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    singular = "ippool",
    namespaced,
    doc = "One range of addresses and the allocations made from it."
)]
pub struct IPPoolSpec {
    /// The range in CIDR notation (`10.0.0.0/24`, `fd00::/120`).
    pub range: String,
    /// The addresses in use, keyed by the decimal offset of each from the range's address.
    pub allocations: BTreeMap<String, IPAllocation>,
}

/// Who holds one address cluster-wide (within a network name); the object is named after the
/// address.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "whereabouts.cni.cncf.io",
    version = "v1alpha1",
    kind = "OverlappingRangeIPReservation",
    plural = "overlappingrangeipreservations",
    singular = "overlappingrangeipreservation",
    namespaced,
    doc = "One address held cluster-wide, so that overlapping ranges never hand it out twice."
)]
pub struct OverlappingRangeIPReservationSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub containerid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
    pub podref: String,
}

/// A range to be divided into equal slices, one per node.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "whereabouts.cni.cncf.io",
    version = "v1alpha1",
    kind = "NodeSlicePool",
    plural = "nodeslicepools",
    singular = "nodeslicepool",
    namespaced,
    status = "NodeSlicePoolStatus",
    doc = "A range divided into per-node slices, and which node holds which slice."
)]
pub struct NodeSlicePoolSpec {
    /// The whole range in CIDR notation, from which each node gets a slice.
    pub range: String,
    /// The prefix length of each slice (`/22` or `22`).
    #[serde(rename = "sliceSize")]
    pub slice_size: String,
}

/// Which node holds which slice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeSlicePoolStatus {
    /// One entry per slice.
    pub allocations: Vec<NodeSliceAllocation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeSliceAllocation {
    /// The node holding the slice; empty while the slice is free.
    #[serde(rename = "nodeName")]
    pub node_name: String,
    /// The slice in CIDR notation.
    #[serde(rename = "sliceRange")]
    pub slice_range: String,
}

/// Multus's NetworkAttachmentDefinition, read as a dynamic object: its CRD is Multus's, and
/// only `spec.config` (a JSON text) is read from it.
pub fn nad_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: "k8s.cni.cncf.io/v1".into(),
        kind: "NetworkAttachmentDefinition".into(),
        plural: "network-attachment-definitions".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of a release before `podref` (or without `id`) reads as empty there, and its
    /// pool reads whole; the schema still requires both, as upstream's does.
    #[test]
    fn an_entry_without_podref_is_read() {
        let spec: IPPoolSpec = serde_json::from_value(serde_json::json!({
            "range": "10.0.0.0/24", "allocations": {"5": {"id": "c5"}, "6": {"podref": "ns/p"}}
        }))
        .unwrap();
        assert_eq!(spec.allocations["5"].podref, "");
        assert_eq!(spec.allocations["6"].id, "");
        let schema = serde_json::to_value(schemars::schema_for!(IPAllocation)).unwrap();
        assert_eq!(schema["required"], serde_json::json!(["id", "podref"]));
    }
}
