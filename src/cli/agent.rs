//! `whereabouts agent`: the node agent (one per node, in the DaemonSet; see `crate::agent`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use super::store_args::StoreArgs;
use crate::agent::{self, Options};
use crate::config::{self, LogLevel};

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The unix socket to serve (default: `$WHEREABOUTS_AGENT_SOCKET` when set and not empty,
    /// else the flat file's `agent_socket`, else /run/whereabouts/agent.sock: where the plugin
    /// looks for it).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also serve /metrics, /healthz and /readyz on this TCP address (the DaemonSet's probes).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Log level, over the configuration's `log_level`.
    #[arg(long, value_parser = ["debug", "verbose", "error", "panic"])]
    pub log_level: Option<String>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    // The agent and a plugin working without it must use one namespace, or they would hand
    // out the same addresses from two sets of pools.
    if args.store.namespace.is_some() {
        anyhow::bail!(
            "--namespace is not the agent's: it serves the plugin, whose pools are in the \
             namespace the node's configuration gives (WHEREABOUTS_NAMESPACE of the DaemonSet)"
        );
    }
    // Nor may another store: the plugin sends a network configuration to the agent when the
    // store it names is the flat file's (or none), and does the work itself with the flat
    // file's store when no agent answers. An agent serving another would split a network's
    // addresses between two stores, each handing out the other's.
    let store = &args.store;
    let named = [
        ("--config (WHEREABOUTS_CONFIG)", store.config.is_some()),
        ("--local-path", store.local_path.is_some()),
        ("--kubeconfig", store.kubeconfig.is_some()),
        ("--etcd-host", store.etcd_host.is_some()),
    ];
    if let Some((flag, _)) = named.iter().find(|(_, set)| *set) {
        anyhow::bail!(
            "{flag} is not the agent's: it serves the store of the node's flat file, which the \
             plugin uses when no agent answers"
        );
    }
    let object = args.store.ipam_object()?;
    let ipam =
        config::load_for_operator(Some(&object)).map_err(|e| anyhow::anyhow!(e.describe()))?;
    let flag = args.log_level.as_deref().map(|l| match l {
        "debug" => LogLevel::Debug,
        "error" => LogLevel::Error,
        "panic" => LogLevel::Panic,
        _ => LogLevel::Verbose,
    });
    crate::logging::init(
        ipam.log_file.as_deref(),
        flag.or(ipam.log_level).or(Some(LogLevel::Verbose)),
    );
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| agent::socket_path(&ipam));
    let store = args.store.clone();
    let reread: agent::Reread = std::sync::Arc::new(move || {
        let object = store.ipam_object().map_err(|e| format!("{e:#}"))?;
        config::load_for_operator(Some(&object)).map_err(|e| e.describe())
    });
    agent::run(Options {
        ipam,
        reread,
        socket,
        listen: args.listen,
    })
    .map_err(|e| anyhow::anyhow!(e))
    .context("whereabouts agent")
}
