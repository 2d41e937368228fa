//! `whereabouts release ADDRESS [--pool NAME] [--force]`: frees one address, refusing while
//! the pod holding it may still use it.

use std::net::IpAddr;

use serde::Serialize;

use super::gc::ClusterArgs;
use super::output::print;
use super::store_args::StoreArgs;
use crate::cleanup::judge::{judge, Verdict};
use crate::cleanup::pods::{cluster_source, PodReader};
use crate::config::IpamConfig;
use crate::ipam::addr::parse_ip;
use crate::store::{Allocation, Store};

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// The address to free.
    pub address: String,
    /// The pool holding it, when several do (overlapping ranges of different network names).
    #[arg(long)]
    pub pool: Option<String>,
    /// Free it even if its pod is alive, or its pod's state cannot be read.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct ReleaseRow {
    pub address: String,
    pub pool: String,
    pub pod: String,
    pub container: String,
    pub interface: String,
    /// What the pod's state says ("release: pod no longer exists", "forced: pod is alive", ...).
    pub reason: String,
}

pub fn release(args: &ReleaseArgs) -> anyhow::Result<ReleaseRow> {
    let ip: IpAddr = parse_ip(&args.address)
        .ok_or_else(|| anyhow::anyhow!("{:?} is not an IP address", args.address))?;
    let (cfg, store) = args.store.open()?;
    let allocation = held(store.as_ref(), args.pool.as_deref(), ip)?;
    let reason = reason(args, &cfg, &allocation)?;
    let released = store
        .release(&allocation.pool, ip)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot release {ip} in {}: {}",
                allocation.pool,
                e.describe()
            )
        })?
        .ok_or_else(|| anyhow::anyhow!("{ip} was freed meanwhile in pool {}", allocation.pool))?;
    Ok(ReleaseRow {
        address: released.ip.to_string(),
        pool: released.pool,
        pod: released.attachment.pod_ref.unwrap_or_default(),
        container: released.attachment.container_id,
        interface: released.attachment.ifname,
        reason,
    })
}

/// The one allocation of `ip` (in `pool`, when given).
fn held(store: &dyn Store, pool: Option<&str>, ip: IpAddr) -> anyhow::Result<Allocation> {
    let held: Vec<_> = store
        .allocations(pool)
        .map_err(anyhow::Error::new)?
        .into_iter()
        .filter(|l| l.ip == ip)
        .collect();
    match held.as_slice() {
        [] => match pool {
            Some(pool) => anyhow::bail!("{ip} is not allocated in pool {pool}"),
            None => anyhow::bail!("{ip} is not allocated"),
        },
        [one] => Ok(one.clone()),
        many => anyhow::bail!(
            "{ip} is allocated in several pools ({}); choose one with --pool",
            many.iter()
                .map(|l| l.pool.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Why `allocation` may be released: its pod's state says so, or `--force`; an error naming
/// the pod when neither does.
fn reason(args: &ReleaseArgs, cfg: &IpamConfig, allocation: &Allocation) -> anyhow::Result<String> {
    let ip = allocation.ip;
    let pod = allocation.attachment.pod_ref.clone().unwrap_or_default();
    let verdict = match cluster_source(args.cluster.pod_kubeconfig.as_deref(), cfg) {
        None => None,
        Some(source) => {
            let reader = PodReader::open(source, cfg.trust.insecure_tls)?;
            let alive = match allocation.attachment.pod_ref.as_deref() {
                Some(r) => reader.get(r).map_err(|e| anyhow::anyhow!(e))?,
                None => None,
            };
            Some(judge(allocation, alive.as_ref()))
        }
    };
    Ok(match (&verdict, args.force) {
        (Some(v @ Verdict::Release(_)), _) => v.to_string(),
        (Some(Verdict::Keep(why)), true) => format!("forced: {}", why.as_str()),
        (None, true) => "forced: pod state unknown".to_string(),
        (Some(Verdict::Keep(why)), false) => anyhow::bail!(
            "refusing to release {ip} (pool {}) held by pod {}: {}; use --force to release it anyway",
            allocation.pool,
            if pod.is_empty() { "(none recorded)" } else { &pod },
            why.as_str()
        ),
        (None, false) => anyhow::bail!(
            "refusing to release {ip} (pool {}, pod {}): cannot tell whether its pod is alive without a kubeconfig to read pods (--pod-kubeconfig or $KUBECONFIG); use --force to release it anyway",
            allocation.pool,
            if pod.is_empty() { "(none recorded)" } else { &pod }
        ),
    })
}

pub fn run(args: ReleaseArgs) -> anyhow::Result<()> {
    let row = release(&args)?;
    print(
        args.store.output,
        std::slice::from_ref(&row),
        &["ADDRESS", "POOL", "POD", "RELEASED", "REASON"],
        |r| {
            vec![
                r.address.clone(),
                r.pool.clone(),
                r.pod.clone(),
                "yes".into(),
                r.reason.clone(),
            ]
        },
    )
}
