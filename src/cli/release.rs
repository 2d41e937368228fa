//! `whereabouts release ADDRESS [--pool NAME] [--force]`: frees one address, refusing while
//! the pod holding it may still use it.

use std::net::IpAddr;

use serde::Serialize;

use super::gc::{pods_from_this_cluster, ClusterArgs};
use super::output::{print, OutputArgs};
use super::store_args::StoreArgs;
use crate::cleanup::judge::{judge, SliceHolders, Verdict};
use crate::cleanup::plan::release_if_held;
use crate::cleanup::pods::{cluster_source, PodReader};
use crate::config::IpamConfig;
use crate::ipam::addr::parse_ip;
use crate::store::{Allocation, Store, StoreError};

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
    pub format: OutputArgs,
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
    let allocations = store
        .allocations(args.pool.as_deref())
        .map_err(anyhow::Error::new)?;
    let allocation = held(&allocations, args.pool.as_deref(), ip)?;
    let reason = reason(args, &cfg, &allocation, &allocations)?;
    let released = release_judged(store.as_ref(), &allocation)?;
    Ok(ReleaseRow {
        address: released.ip.to_string(),
        pool: released.pool,
        pod: released.attachment.pod_ref.unwrap_or_default(),
        container: released.attachment.container_id,
        interface: released.attachment.ifname,
        reason,
    })
}

/// Frees `allocation` only while the attachment judged still holds it: between the look-up and
/// this write (a pod read with retries: seconds) the runtime's DEL may have freed the address
/// and another pod taken it, whose address a release by address alone would take away.
fn release_judged(store: &dyn Store, allocation: &Allocation) -> anyhow::Result<Allocation> {
    let (ip, pool) = (allocation.ip, &allocation.pool);
    let cannot = |e: StoreError| anyhow::anyhow!("cannot release {ip} in {pool}: {}", e.describe());
    let released = release_if_held(store, allocation).map_err(cannot)?;
    released.ok_or_else(|| {
        anyhow::anyhow!("{ip} in pool {pool} was freed meanwhile, or is held by another pod now")
    })
}

/// The one allocation of `ip` among `allocations` (of `pool`, when given).
fn held(allocations: &[Allocation], pool: Option<&str>, ip: IpAddr) -> anyhow::Result<Allocation> {
    let held: Vec<_> = allocations.iter().filter(|l| l.ip == ip).cloned().collect();
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
fn reason(
    args: &ReleaseArgs,
    cfg: &IpamConfig,
    allocation: &Allocation,
    allocations: &[Allocation],
) -> anyhow::Result<String> {
    let ip = allocation.ip;
    let pod = allocation.attachment.pod_ref.clone().unwrap_or_default();
    let verdict = match cluster_source(args.cluster.pod_kubeconfig.as_deref(), cfg) {
        None => None,
        Some(source) => match pod_verdict(source, cfg, allocation, allocations, args.force) {
            Ok(verdict) => Some(verdict),
            Err(err) if args.force => return Ok(format!("forced: pod state unreadable: {err:#}")),
            Err(err) => return Err(err),
        },
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

/// What the pod of `allocation` says, read from `source`. A pod not found is taken for gone
/// only where some pod the store names exists (unless `force`): otherwise the pods were most
/// likely read from another cluster, where every pod is "gone".
fn pod_verdict(
    source: crate::k8s::cluster::Access,
    cfg: &IpamConfig,
    allocation: &Allocation,
    allocations: &[Allocation],
    force: bool,
) -> anyhow::Result<Verdict> {
    let reader = PodReader::open(source, cfg.trust.insecure_tls)?;
    let alive = match allocation.attachment.pod_ref.as_deref() {
        Some(r) => reader.get(r).map_err(|e| anyhow::anyhow!(e))?,
        None => None,
    };
    if alive.is_none() && !force {
        let pods = reader.list().map_err(|e| anyhow::anyhow!(e))?;
        pods_from_this_cluster(allocations.iter().map(|a| &a.attachment), &pods)?;
    }
    Ok(judge(
        allocation,
        alive.as_ref(),
        &SliceHolders::of(allocations),
    ))
}

pub fn run(args: ReleaseArgs) -> anyhow::Result<()> {
    let row = release(&args)?;
    print(
        args.format.output,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::names::pool_name;
    use crate::ipam::{Cidr, Range, RangeSpec};
    use crate::store::{AddRequest, Attachment, PoolRef, RangeRequest};

    fn add(store: &dyn Store, container: &str, pod: &str) -> IpAddr {
        add_in(store, &["10.9.0.0/29"], container, pod)[0]
    }

    fn pool(range: &str) -> PoolRef {
        let spec = RangeSpec {
            cidr: Cidr::parse(range, false).unwrap(),
            start: None,
            end: None,
            exclude: Vec::new(),
        };
        PoolRef {
            name: pool_name(&spec.cidr, "", None),
            range: Range::resolve(&spec, None).unwrap(),
            spec,
            gateway: None,
        }
    }

    /// An ADD of one address in each of `ranges`.
    fn add_in(store: &dyn Store, ranges: &[&str], container: &str, pod: &str) -> Vec<IpAddr> {
        let req = AddRequest {
            cni_network: "net".into(),
            network_name: String::new(),
            overlap: true,
            attachment: Attachment {
                container_id: container.into(),
                ifname: "net1".into(),
                pod_ref: Some(pod.into()),
                pod_uid: None,
            },
            ranges: ranges
                .iter()
                .map(|range| RangeRequest {
                    pool: pool(range),
                    requested: None,
                })
                .collect(),
            node_slice_size: None,
            sleep_for_race: 0,
            node: None,
        };
        store.add(&req).unwrap()
    }

    #[test]
    fn a_release_takes_nothing_from_the_pod_that_took_the_address_since() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::open(&dir.path().join("db")).unwrap();
        let ip = add(store.as_ref(), "old", "ns/old");
        let judged = held(&store.allocations(None).unwrap(), None, ip).unwrap();
        // Meanwhile the old pod's DEL frees the address and a new pod takes it.
        store.release(&judged.pool, ip, None).unwrap();
        assert_eq!(add(store.as_ref(), "new", "ns/new"), ip);
        let msg = release_judged(store.as_ref(), &judged)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("another pod"), "{msg}");
        let now = held(&store.allocations(None).unwrap(), None, ip).unwrap();
        assert_eq!(now.attachment.container_id, "new");
        // Still held by the one judged, it goes.
        assert_eq!(release_judged(store.as_ref(), &now).unwrap().ip, ip);
        assert!(held(&store.allocations(None).unwrap(), None, ip).is_err());
    }

    /// A dual-stack pod's IPv4 address released by hand: its IPv6 address stays (the pod still
    /// uses it, and it would be handed out again).
    #[test]
    fn a_release_frees_only_the_address_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::open(&dir.path().join("db")).unwrap();
        let got = add_in(store.as_ref(), &["10.9.0.0/29", "fd09::/125"], "c", "ns/p");
        let judged = held(&store.allocations(None).unwrap(), None, got[0]).unwrap();
        assert_eq!(release_judged(store.as_ref(), &judged).unwrap().ip, got[0]);
        let left = held(&store.allocations(None).unwrap(), None, got[1]).unwrap();
        assert_eq!(left.attachment.container_id, "c");
    }
}
