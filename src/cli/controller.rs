//! `whereabouts controller`: the cluster's cleanup and node-slice controller (one Deployment).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use super::gc::ClusterArgs;
use super::store_args::StoreArgs;
use crate::cleanup::pods::cluster_source;
use crate::config::{GoPeers, LogLevel};
use crate::controller::{self, Options};

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Where to serve /metrics, /healthz and /readyz (`[::]` takes IPv4 connections too).
    #[arg(long, default_value = "[::]:9090")]
    pub listen: SocketAddr,
    /// Do not manage NodeSlicePools.
    #[arg(long)]
    pub no_node_slices: bool,
    /// Do not post Kubernetes Events for released addresses.
    #[arg(long)]
    pub no_events: bool,
    /// Seconds one watch request lasts before it is renewed.
    #[arg(long, default_value_t = 290)]
    pub watch_timeout: u64,
    /// Seconds after a failed reconcile (API or store unavailable) before the next one.
    #[arg(long, default_value_t = 30)]
    pub retry_after: u64,
    /// Seconds a leader's Lease lasts without renewal: how long a standby replica waits
    /// before taking over from a leader that stopped without giving the Lease up.
    #[arg(long, default_value_t = 15)]
    pub lease_duration: u64,
    /// Act without taking the Lease (a single replica that must not wait for one).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Log level, over the configuration's `log_level` (a Deployment has no flat file to set it).
    #[arg(long, value_parser = ["debug", "verbose", "error", "panic"])]
    pub log_level: Option<String>,
    /// Whether Go Whereabouts binaries may still write the pools (`auto`, `present` during a
    /// migration from or back to them, `absent`), over the flat file's `go_whereabouts`: the
    /// controller's releases take part in their Lease while they may. It reads no flat file in
    /// its pod: the manifest and the chart set this as they set the nodes'.
    #[arg(long, env = "WHEREABOUTS_GO_PEERS", value_parser = go_peers)]
    pub go_whereabouts: Option<GoPeers>,
}

fn go_peers(text: &str) -> Result<GoPeers, String> {
    GoPeers::parse(text).ok_or_else(|| "expected auto, present or absent".to_string())
}

pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let mut ipam = args.store.ipam()?;
    if let Some(peers) = args.go_whereabouts {
        ipam.go_peers = peers;
    }
    // A long-running process: informational logs unless the flag or the configuration asks
    // for another level.
    let flag = args.log_level.as_deref().map(|l| match l {
        "debug" => LogLevel::Debug,
        "error" => LogLevel::Error,
        "panic" => LogLevel::Panic,
        _ => LogLevel::Verbose,
    });
    let level = flag.or(ipam.log_level).or(Some(LogLevel::Verbose));
    crate::logging::init(ipam.log_file.as_deref(), level);
    let cluster = cluster_source(args.cluster.pod_kubeconfig.as_deref(), &ipam).context(
        "the controller reads pods from the Kubernetes API: give --pod-kubeconfig, use the kubernetes datastore, set $KUBECONFIG or run in a cluster",
    )?;
    // The store's `--namespace`, for the controller's own objects too.
    let namespace = args
        .store
        .namespace
        .clone()
        .unwrap_or_else(|| controller::default_namespace(&ipam));
    controller::run(Options {
        ipam,
        cluster,
        listen: args.listen,
        namespace,
        node_slices: !args.no_node_slices,
        events: !args.no_events,
        watch_timeout: Duration::from_secs(args.watch_timeout.max(1)),
        retry_after: Duration::from_secs(args.retry_after.max(1)),
        lease_duration: (!args.no_leader_election)
            .then(|| Duration::from_secs(args.lease_duration.max(2))),
    })
    .map_err(|e| anyhow::anyhow!(e))
}
