//! `whereabouts gc [--dry-run]`: every allocation no live pod holds, and every overlapping-range
//! reservation no allocation backs whose pod is gone, with the reason, freed unless
//! `--dry-run`. The same decisions the controller makes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use super::output::{print, OutputArgs};
use super::store_args::StoreArgs;
use crate::cleanup::judge::{judge_holder, PodState, Verdict};
use crate::cleanup::plan::{plan, release_if_held};
use crate::cleanup::pods::{cluster_source, PodReader};
use crate::config::IpamConfig;
use crate::store::{Allocation, Attachment, Reservation, Store};

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
    /// Empty on a reservation's row, whose name says the address.
    pub address: String,
    pub pool: String,
    /// The overlapping-range reservation the row frees; empty on an allocation's row.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reservation: String,
    pub pod: String,
    pub container: String,
    pub interface: String,
    /// "would release", "released", "already gone", "kept" (a reservation changed since
    /// listed) or "failed" (the reason then says why).
    pub action: String,
    pub reason: String,
}

fn row(allocation: &Allocation, action: &str, verdict: &Verdict) -> GcRow {
    GcRow {
        address: allocation.ip.to_string(),
        pool: allocation.pool.clone(),
        reservation: String::new(),
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
    let reservations = store
        .unbacked_reservations()
        .map_err(anyhow::Error::new)
        .context("cannot list the overlapping-range reservations")?;
    let pods = reader.list().map_err(|e| anyhow::anyhow!(e))?;
    if !args.dry_run && !args.force {
        let holders = reservations.iter().map(|r| &r.attachment);
        pods_from_this_cluster(
            allocations.iter().map(|a| &a.attachment).chain(holders),
            &pods,
        )?;
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
    for orphan in reservations {
        out.extend(orphan_row(args.dry_run, store, &reader, &orphan, &pods));
    }
    Ok(out)
}

/// A reservation no allocation backs whose pod is gone (an ADD or DEL stopped half-way), freed
/// unless `dry_run`, as the controller frees it. One whose pod exists may be an ADD in flight
/// (its reservation lands before its pool entry) and stays; the pod is read again just before
/// the release, since a pod of that name created after the list may have taken it over. The
/// store deletes it only while it is what was listed.
fn orphan_row(
    dry_run: bool,
    store: &dyn Store,
    reader: &PodReader,
    orphan: &Reservation,
    pods: &HashMap<String, PodState>,
) -> Option<GcRow> {
    let pod_ref = orphan.attachment.pod_ref.as_deref();
    let verdict = judge_holder(pod_ref, None, pods.get(pod_ref.unwrap_or_default()));
    if !matches!(verdict, Verdict::Release(_)) {
        return None;
    }
    let mut row = GcRow {
        address: String::new(),
        pool: String::new(),
        reservation: orphan.name.clone(),
        pod: pod_ref.unwrap_or_default().to_string(),
        container: orphan.attachment.container_id.clone(),
        interface: orphan.attachment.ifname.clone(),
        action: "would release".to_string(),
        reason: format!("{verdict}; no allocation backs the reservation"),
    };
    if dry_run {
        return Some(row);
    }
    let now = match reader.get(pod_ref.unwrap_or_default()) {
        Ok(now) => judge_holder(pod_ref, None, now.as_ref()),
        Err(err) => {
            row.action = "failed".to_string();
            row.reason = format!("{}; cannot read the pod again: {err}", row.reason);
            return Some(row);
        }
    };
    if !matches!(now, Verdict::Release(_)) {
        return None;
    }
    match store.release_reservation(orphan) {
        Ok(true) => row.action = "released".to_string(),
        Ok(false) => {
            row.action = "kept".to_string();
            row.reason = "changed or backed since listed".to_string();
        }
        Err(err) => {
            row.action = "failed".to_string();
            row.reason = format!("{}; cannot release: {}", row.reason, err.describe());
        }
    }
    Some(row)
}

/// Refuses a sweep (or a release) in which not one pod the holders name exists: the pods
/// were most likely read from another cluster (a kubeconfig's other context), and every
/// address would go. Where a holder recorded its pod's UID, only a pod of that UID counts: a
/// cluster built from the same charts has pods of the same names (StatefulSets), never of the
/// same UIDs.
pub(super) fn pods_from_this_cluster<'a>(
    holders: impl IntoIterator<Item = &'a Attachment>,
    pods: &HashMap<String, PodState>,
) -> anyhow::Result<()> {
    let mut named = HashSet::new();
    let mut found = false;
    for holder in holders {
        let Some(pod_ref) = holder.pod_ref.as_deref() else {
            continue;
        };
        named.insert(pod_ref);
        let uid = holder.pod_uid.as_deref().filter(|u| !u.is_empty());
        found |= pods
            .get(pod_ref)
            .is_some_and(|pod| uid.is_none_or(|uid| uid == pod.uid));
    }
    if named.is_empty() || found {
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
            // A reservation's row: its name says the address.
            let (address, pool) = match r.reservation.as_str() {
                "" => (r.address.clone(), r.pool.clone()),
                name => (name.to_string(), "(reservation)".to_string()),
            };
            vec![
                address,
                pool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::judge::PodPhase;

    fn holder(pod: &str, uid: Option<&str>) -> Attachment {
        Attachment {
            container_id: format!("c-{pod}"),
            ifname: "net1".into(),
            pod_ref: Some(pod.into()),
            pod_uid: uid.map(String::from),
        }
    }

    fn running(uid: &str) -> PodState {
        PodState {
            uid: uid.into(),
            phase: PodPhase::Running,
            terminating: false,
            node: None,
        }
    }

    /// Pods read from another cluster built from the same charts have the same names: where
    /// the holders recorded UIDs, only a pod of a recorded UID says these are this cluster's.
    #[test]
    fn pods_of_another_cluster_are_told_by_their_uids() {
        let other_cluster = HashMap::from([("db/db-0".to_string(), running("uid-elsewhere"))]);
        let holders = [holder("db/db-0", Some("uid-here")), holder("web/w-1", None)];
        assert!(pods_from_this_cluster(&holders, &other_cluster).is_err());
        let this_cluster = HashMap::from([("db/db-0".to_string(), running("uid-here"))]);
        assert!(pods_from_this_cluster(&holders, &this_cluster).is_ok());
        // Without a recorded UID, the name alone is all there is to go by.
        let unrecorded = [holder("db/db-0", None)];
        assert!(pods_from_this_cluster(&unrecorded, &other_cluster).is_ok());
        assert!(pods_from_this_cluster(&[], &HashMap::new()).is_ok());
    }
}
