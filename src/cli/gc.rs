//! `whereabouts gc [--dry-run]`: every allocation no live pod holds, with the reason, freed
//! unless `--dry-run`. The same decision the controller makes.

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use super::output::print;
use super::store_args::StoreArgs;
use crate::cleanup::judge::Verdict;
use crate::cleanup::plan::{plan, release_if_held};
use crate::cleanup::pods::{cluster_source, PodReader};
use crate::config::IpamConfig;
use crate::store::{Allocation, Store};

/// Where the operator's commands read pods from.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// The kubeconfig to read pods with (default: the Kubernetes engine's, else $KUBECONFIG,
    /// else the in-cluster service account).
    #[arg(long, env = "WHEREABOUTS_POD_KUBECONFIG")]
    pub pod_kubeconfig: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Only list what would be freed, and why.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct GcRow {
    pub address: String,
    pub pool: String,
    pub pod: String,
    pub container: String,
    pub interface: String,
    /// "would release", "released" or "already gone".
    pub action: String,
    pub reason: String,
}

fn row(allocation: &Allocation, action: &str, verdict: &Verdict) -> GcRow {
    GcRow {
        address: allocation.ip.to_string(),
        pool: allocation.pool.clone(),
        pod: allocation.attachment.pod_ref.clone().unwrap_or_default(),
        container: allocation.attachment.container_id.clone(),
        interface: allocation.attachment.ifname.clone(),
        action: action.to_string(),
        reason: verdict.to_string(),
    }
}

/// Decides, and releases unless `--dry-run`: the rows to print.
pub fn rows(args: &GcArgs, store: &dyn Store, cfg: &IpamConfig) -> anyhow::Result<Vec<GcRow>> {
    let source = cluster_source(args.cluster.pod_kubeconfig.as_deref(), cfg).context(
        "cannot tell which pods are alive: no kubeconfig to read pods with (give --pod-kubeconfig or set $KUBECONFIG)",
    )?;
    let reader = PodReader::open(source, cfg.trust.insecure_tls)?;
    // Leases first, pods second (see cleanup::plan).
    let allocations = store.allocations(None).map_err(anyhow::Error::new)?;
    let pods = reader.list().map_err(|e| anyhow::anyhow!(e))?;
    let mut out = Vec::new();
    for decision in plan(allocations, &pods) {
        if !matches!(decision.verdict, Verdict::Release(_)) {
            continue;
        }
        if args.dry_run {
            out.push(row(
                &decision.allocation,
                "would release",
                &decision.verdict,
            ));
            continue;
        }
        let released = release_if_held(store, &decision.allocation).map_err(|e| {
            anyhow::anyhow!(
                "cannot release {} in {}: {}",
                decision.allocation.ip,
                decision.allocation.pool,
                e.describe()
            )
        })?;
        let action = if released.is_none() {
            "already gone"
        } else {
            "released"
        };
        out.push(row(&decision.allocation, action, &decision.verdict));
    }
    out.sort_by_key(|r| (r.pool.clone(), r.address.clone()));
    Ok(out)
}

/// Prints the rows, then (unless `--dry-run`) makes free again the addresses released but
/// held back from searches (etcd's freed marks), as the controller's reconcile does: where no
/// controller runs, or before going back to a build without marks, this is what frees them.
pub fn run(args: GcArgs) -> anyhow::Result<()> {
    let (cfg, store) = args.store.open()?;
    let rows = rows(&args, store.as_ref(), &cfg)?;
    print(
        args.store.output,
        &rows,
        &["ADDRESS", "POOL", "POD", "ACTION", "REASON"],
        |r| {
            vec![
                r.address.clone(),
                r.pool.clone(),
                r.pod.clone(),
                r.action.clone(),
                r.reason.clone(),
            ]
        },
    )?;
    if args.dry_run {
        return Ok(());
    }
    let refreed = store.free_released().map_err(|e| {
        anyhow::anyhow!(
            "cannot free the addresses released and held back: {}",
            e.describe()
        )
    })?;
    if refreed > 0 {
        eprintln!("{refreed} released addresses held back by freed marks are free again");
    }
    Ok(())
}
