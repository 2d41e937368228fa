//! The `ipam` configuration: parsed case-insensitively as upstream does, merged with the flat
//! file, validated up front, and resolved into typed values.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::cni::types::{Dns, Route};
use crate::files::shown_url;
use crate::ipam::{Cidr, RangeSpec};

/// Where the embedded store keeps its database unless `local_path` says otherwise.
pub const DEFAULT_LOCAL_PATH: &str = "/var/lib/cni/whereabouts/whereabouts.db";

/// The kubeconfig the installer writes on a node (default directories): what the operator's
/// commands use with the Kubernetes engine when nothing names one.
pub const DEFAULT_KUBECONFIG: &str = "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig";

/// The flat files looked up, in order, after `configuration_path`.
pub const FLAT_FILE_PATHS: [&str; 3] = [
    "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.conf",
    "/etc/cni/net.d/whereabouts.d/whereabouts.conf",
    "/host/etc/cni/net.d/whereabouts.d/whereabouts.conf",
];

/// Caps on what one configuration may ask for: generous for real networks (which use a
/// handful), small enough that the work of a call stays bounded whoever wrote it.
pub const MAX_RANGES: usize = 64;
/// Exclusions of one range.
pub const MAX_EXCLUDES: usize = 1024;
pub const MAX_ROUTES: usize = 1024;
/// Static addresses of one call (`addresses`, CNI_ARGS `IP=` and `runtimeConfig.ips` together).
pub const MAX_STATIC_ADDRESSES: usize = 64;
/// The configuration's `name` and `ipam.network_name`, in bytes: a Kubernetes object name's
/// limit. Both are stored with every allocation (and the second names pools), so without a cap
/// one configuration's pods could fill a shared store with a megabyte each.
pub const MAX_NETWORK_NAME_BYTES: usize = 253;

/// A static address from `addresses`, CNI_ARGS `IP=` or `runtimeConfig.ips`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticAddress {
    /// The address with its prefix length (host bits kept).
    pub address: Cidr,
    pub gateway: Option<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Verbose,
    Error,
    Panic,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesConfig {
    pub kubeconfig: PathBuf,
    /// Where the objects are, over the kubeconfig context's namespace: an operator's
    /// `--namespace` (no configuration key sets it; the plugin's is the installer's context).
    pub namespace: Option<String>,
}

/// Whether Go Whereabouts binaries may still write the Kubernetes pools (the flat file's
/// `go_whereabouts`; a network configuration cannot set it). While they may, the Kubernetes
/// engine takes part in their Lease around every ADD and hands out no offset a Go binary would
/// drop; see the README's migration section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GoPeers {
    /// `"auto"`: present while a Go binary has renewed the `whereabouts` Lease within
    /// [`GO_ACTIVE_WINDOW_SECS`] (one read of the Lease per ADD).
    #[default]
    Auto,
    /// `"present"`: during a migration or a rollback, whatever the Lease says.
    Present,
    /// `"absent"`: no Go binary is left (the Lease is not even read).
    Absent,
}

impl GoPeers {
    /// The value a flat file's `go_whereabouts` or the controller's flag names (spaces around
    /// it ignored); None for another word.
    pub fn parse(text: &str) -> Option<GoPeers> {
        match text.trim() {
            "auto" => Some(GoPeers::Auto),
            "present" => Some(GoPeers::Present),
            "absent" => Some(GoPeers::Absent),
            _ => None,
        }
    }
}

/// How long after a Go binary last renewed the `whereabouts` Lease `auto` still counts it as
/// present: a day, so a node that runs the Go binary and starts no pod for hours is still
/// counted when it does.
pub const GO_ACTIVE_WINDOW_SECS: u64 = 24 * 3600;

#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Endpoints as given (comma separated in `etcd_host`), with or without scheme.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_cert_file: Option<PathBuf>,
}

/// Shows no credentials (user name, password, user information in an endpoint): a
/// configuration logged whole (`{:?}`) leaks none.
impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: &Option<String>| set.as_ref().map(|_| "(hidden)");
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| shown_url(e)).collect();
        f.debug_struct("EtcdConfig")
            .field("endpoints", &endpoints)
            .field("username", &hidden(&self.username))
            .field("password", &hidden(&self.password))
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("ca_cert_file", &self.ca_cert_file)
            .finish()
    }
}

/// The engine that keeps allocations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datastore {
    Local { path: PathBuf },
    Kubernetes(KubernetesConfig),
    Etcd(EtcdConfig),
}

/// The resolved `ipam` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamConfig {
    /// The top-level `range` first, then `ipRanges` in order.
    pub ranges: Vec<RangeSpec>,
    pub gateway: Option<IpAddr>,
    pub routes: Vec<Route>,
    pub dns: Option<Dns>,
    pub addresses: Vec<StaticAddress>,
    pub enable_overlapping_ranges: bool,
    pub network_name: String,
    pub configuration_path: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<LogLevel>,
    pub node_slice_size: Option<u8>,
    pub reconciler_cron_expression: Option<String>,
    pub sleep_for_race: u64,
    pub datastore: Datastore,
    /// The node agent's socket (`agent_socket`, the flat file's only: see
    /// [`crate::agent::socket_path`]).
    pub agent_socket: Option<PathBuf>,
    /// Whether Go binaries may still write the Kubernetes pools (from the flat file only).
    pub go_peers: GoPeers,
    /// What the admin's flat file allows (the operator's commands: everything).
    pub trust: Trust,
    /// What was ignored from the network configuration, to log once logging is set up.
    pub warnings: Vec<String>,
    /// The network configuration names a store of its own, another than the one the flat file
    /// names (a kubeconfig outside the installer's folders, another etcd endpoint): the node's
    /// agent serves the flat file's store, so the plugin serves this one itself, always, or an
    /// outage of the agent would move the network's addresses to another store.
    pub own_store: bool,
}

/// The forms a message may show an etcd endpoint in: as written, as messages show it (without
/// user information), without the trailing `/` the client drops, with the scheme the client
/// gives one written without, and its host. Only forms holding `.`, `:` or `/`: a bare name
/// (`etcd`) would hide every word like it.
fn endpoint_forms(endpoint: &str) -> Vec<String> {
    let endpoint = endpoint.trim();
    let shown = shown_url(endpoint);
    let trimmed = shown.trim_end_matches('/');
    let host = trimmed.split_once("://").map_or(trimmed, |(_, h)| h);
    let host = host.split('/').next().unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or_default();
    let mut forms: Vec<String> = [endpoint, &shown, trimmed, host].map(str::to_string).into();
    if !trimmed.contains("://") {
        forms.extend(["http://", "https://"].map(|scheme| format!("{scheme}{trimmed}")));
    }
    forms.retain(|form| form.contains(['.', ':', '/']));
    forms
}

impl IpamConfig {
    /// The admin's settings a store error may quote, each with the field that sets it: the
    /// engine's paths and endpoints (as written, as messages show them, and their host), the
    /// agent's socket and the log file: the flat file's, or ones it lets a network
    /// configuration set (which are then shown by their field too).
    pub fn admin_values(&self) -> Vec<(String, &'static str)> {
        let mut values = Vec::new();
        // A path as written, and as messages show it (cut, escaped).
        let mut path = |p: &Path, field: &'static str| {
            values.push((p.display().to_string(), field));
            values.push((crate::files::shown_path(p), field));
        };
        match &self.datastore {
            Datastore::Local { path: db } => {
                path(db, "ipam.local_path");
                let folders = db.ancestors().skip(1);
                for folder in folders.filter(|f| f.components().count() > 2) {
                    path(folder, "ipam.local_path's folder");
                }
            }
            Datastore::Kubernetes(k8s) => path(&k8s.kubeconfig, "ipam.kubernetes.kubeconfig"),
            Datastore::Etcd(etcd) => {
                for (file, field) in [
                    (&etcd.ca_cert_file, "ipam.etcd_ca_cert_file"),
                    (&etcd.cert_file, "ipam.etcd_cert_file"),
                    (&etcd.key_file, "ipam.etcd_key_file"),
                ] {
                    if let Some(file) = file {
                        path(file, field);
                    }
                }
                for form in etcd.endpoints.iter().flat_map(|e| endpoint_forms(e)) {
                    values.push((form, "ipam.etcd_host"));
                }
            }
        }
        let socket = crate::agent::socket_path(self);
        values.push((socket.display().to_string(), "agent_socket"));
        if let Some(log) = &self.log_file {
            values.push((log.display().to_string(), "log_file"));
        }
        values
    }
}

pub mod error;
mod load;
mod network;
mod raw;
pub mod trust;

pub use error::ConfigError;
pub use load::{
    find_flat_file, flat_file_engine, load, load_for_operator, load_for_operator_with_flat_files,
    load_to_release, load_untrusted, load_with_flat_files,
};
pub use network::{ipam_of, names_whereabouts, network_name_of};
pub use raw::{get_any_case, same_key, SameField};
pub use trust::Trust;

#[cfg(test)]
mod tests;
