//! Whereabouts: a cluster-wide IP address management (IPAM) plugin for CNI.

pub mod agent;
pub mod cleanup;
pub mod cli;
pub mod cni;
pub mod config;
pub mod controller;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod ipam;
pub mod k8s;
pub mod logging;
pub mod plugin;
pub mod probe_port;
pub mod store;
