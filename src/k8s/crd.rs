//! The upstream CustomResourceDefinitions as Rust types (group `whereabouts.cni.cncf.io`,
//! version `v1alpha1`), field for field, so objects written by either implementation are read by
//! the other. `deploy/` holds the CRD YAML generated from these types.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One allocated address of an IPPool, keyed in `allocations` by its decimal offset from the IP
/// part of `spec.range`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IPAllocation {
    /// The container ID of the attachment.
    pub id: String,
    /// `namespace/name` of the pod.
    pub podref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
}

/// IPPoolSpec defines the desired state of IPPool
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
    /// Range is a RFC 4632/4291-style string that represents an IP address and prefix length in
    /// CIDR notation
    pub range: String,
    /// Allocations is the set of allocated IPs for the given range, keyed by the decimal offset
    /// of the IP from the range's address.
    pub allocations: BTreeMap<String, IPAllocation>,
}

/// OverlappingRangeIPReservationSpec defines the desired state of OverlappingRangeIPReservation:
/// one address held cluster-wide within a network name.
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

/// NodeSlicePoolSpec defines the desired state of NodeSlicePool
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
    /// Range is a RFC 4632/4291-style string that represents an IP address and prefix length in
    /// CIDR notation; this refers to the entire range where the node is allocated a subset
    pub range: String,
    /// SliceSize is the size of subnets or slices of the range that each node will be assigned
    #[serde(rename = "sliceSize")]
    pub slice_size: String,
}

/// NodeSlicePoolStatus defines the observed state of NodeSlicePool
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeSlicePoolStatus {
    /// Allocations holds the allocations of nodes to slices
    pub allocations: Vec<NodeSliceAllocation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeSliceAllocation {
    /// NodeName is the name of the node assigned to this slice; empty is a free slice
    #[serde(rename = "nodeName")]
    pub node_name: String,
    /// SliceRange is the subnet of this slice
    #[serde(rename = "sliceRange")]
    pub slice_range: String,
}
