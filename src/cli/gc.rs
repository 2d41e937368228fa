//! `whereabouts gc [--dry-run]`: every allocation no live pod holds, with the reason, freed
//! unless `--dry-run`. The same decision the controller makes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use super::output::{print, OutputArgs};
use super::store_args::StoreArgs;
use crate::cleanup::judge::{PodState, Verdict};
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
    /// Free even when not one of the pods the allocations name exists where pods are read
    /// (else refused: pods read from another cluster would free every address).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub format: OutputArgs,
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
    /// "would release", "released", "already gone" or "failed" (the reason then says why).
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
    if !args.dry_run && !args.force {
        pods_from_this_cluster(&allocations, &pods)?;
    }
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
        // One release failing leaves the others to do, and what was freed is still shown.
        let done = match release_if_held(store, &decision.allocation) {
            Ok(Some(_)) => row(&decision.allocation, "released", &decision.verdict),
            Ok(None) => row(&decision.allocation, "already gone", &decision.verdict),
            Err(err) => {
                let mut failed = row(&decision.allocation, "failed", &decision.verdict);
                failed.reason = format!("{}; cannot release: {}", failed.reason, err.describe());
                failed
            }
        };
        out.push(done);
    }
    // In address order, as `allocations` lists them (10.0.0.9 before 10.0.0.10).
    let numeric =
        |r: &GcRow| crate::ipam::addr::parse_ip(&r.address).map(crate::ipam::addr::to_u128);
    out.sort_by_key(|r| (r.pool.clone(), numeric(r)));
    Ok(out)
}

/// Refuses a sweep (or a release) in which not one pod the allocations name exists: the pods
/// were most likely read from another cluster (a kubeconfig's other context), and every
/// address would go.
pub(super) fn pods_from_this_cluster(
    allocations: &[Allocation],
    pods: &HashMap<String, PodState>,
) -> anyhow::Result<()> {
    let named: HashSet<&str> = allocations
        .iter()
        .filter_map(|a| a.attachment.pod_ref.as_deref())
        .collect();
    if named.is_empty() || named.iter().any(|pod| pods.contains_key(*pod)) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to free addresses of pods not found: not one of the {} pods the allocations \
         name exists where pods were read (a kubeconfig of another cluster?); check \
         --pod-kubeconfig and $KUBECONFIG, or give --force if they are all gone",
        named.len()
    )
}

/// Prints the rows, then (unless `--dry-run`) makes free again the addresses released but
/// held back from searches (etcd's freed marks), as the controller's reconcile does: where no
/// controller runs, or before going back to a build without marks, this is what frees them.
pub fn run(args: GcArgs) -> anyhow::Result<()> {
    let (cfg, store) = args.store.open()?;
    let rows = rows(&args, store.as_ref(), &cfg)?;
    print(
        args.format.output,
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
    let failed = rows.iter().filter(|r| r.action == "failed").count();
    if failed > 0 {
        anyhow::bail!("{failed} of the releases failed (the rows marked failed say why)");
    }
    Ok(())
}
