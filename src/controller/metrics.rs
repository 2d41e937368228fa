//! The controller's metrics as prometheus-client families. Pool and slice gauges are set by
//! the work that reads the store or the NodeSlicePools, never by a scrape: a scrape only
//! encodes what is there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ipam::Cidr;
use crate::store::{Allocation, PoolRef};

/// Size and use of one pool, at the time of the last look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStat {
    pub pool: String,
    pub range: String,
    pub size: u128,
    pub used: u128,
}

/// Pools from the configuration and the networks that describe them (their real capacity; of
/// two of one name, the later counts) and from the allocations (any other pool: the range less
/// its network and broadcast addresses).
pub fn pool_stats(configured: &[PoolRef], allocations: &[Allocation]) -> Vec<PoolStat> {
    let mut pools: BTreeMap<String, PoolStat> = BTreeMap::new();
    for pool in configured {
        pools.insert(
            pool.name.clone(),
            PoolStat {
                pool: pool.name.clone(),
                range: pool.cidr().to_string(),
                size: pool.range.capacity(),
                used: 0,
            },
        );
    }
    for allocation in allocations {
        let stat = pools
            .entry(allocation.pool.clone())
            .or_insert_with(|| PoolStat {
                pool: allocation.pool.clone(),
                range: allocation.range.to_string(),
                size: default_capacity(&allocation.range),
                used: 0,
            });
        stat.used += 1;
    }
    pools.into_values().collect()
}

fn default_capacity(cidr: &Cidr) -> u128 {
    cidr.last_offset().saturating_sub(1)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub range: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SliceLabel {
    pub nodeslicepool: String,
}

/// A gauge of possibly huge values (an IPv6 pool's size), as a float.
type Amount = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    releases: Family<ReasonLabel, Counter>,
    held: Family<ReasonLabel, Gauge>,
    errors: Family<OperationLabel, Counter>,
    resyncs: Family<ResourceLabel, Counter>,
    pub conflicts: Counter,
    pub retries: Counter,
    pub pod_deletions: Counter,
    pub events_posted: Counter,
    pub freed_folded: Counter,
    pub leader: Gauge,
    reconcile_duration: Histogram,
    last_reconcile_duration: Amount,
    last_reconcile_end: Gauge,
    pool_size: Family<PoolLabels, Amount>,
    pool_used: Family<PoolLabels, Amount>,
    pool_free: Family<PoolLabels, Amount>,
    slices: Family<SliceLabel, Gauge>,
    slices_assigned: Family<SliceLabel, Gauge>,
    /// When the store's worker started its current batch, or last finished a release in it
    /// (freed, found gone, or failed: seconds since the epoch; 0: idle): a long batch that
    /// makes progress is not stuck. Not exported: /healthz reads it.
    pub busy_since: AtomicI64,
}

/// The operations `whereabouts_errors_total` counts failures of.
pub const OPERATIONS: [&str; 11] = [
    "list_allocations",
    "list_pods",
    "list_reservations",
    "get_pod",
    "release",
    "release_reservation",
    "free_released",
    "post_event",
    "watch_pods",
    "watch_nodes",
    "watch_nads",
];

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("whereabouts"),
            releases: Family::default(),
            held: Family::default(),
            errors: Family::default(),
            resyncs: Family::default(),
            conflicts: Counter::default(),
            retries: Counter::default(),
            pod_deletions: Counter::default(),
            events_posted: Counter::default(),
            freed_folded: Counter::default(),
            leader: Gauge::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            last_reconcile_duration: Amount::default(),
            last_reconcile_end: Gauge::default(),
            pool_size: Family::default(),
            pool_used: Family::default(),
            pool_free: Family::default(),
            slices: Family::default(),
            slices_assigned: Family::default(),
            busy_since: AtomicI64::new(0),
        };
        m.register();
        // Every operation's count shows from the start, at 0: a counter that appears only at
        // its first failure hides that failure from `increase()`, which the alerts use.
        for operation in OPERATIONS {
            let _ = m.errors.get_or_create(&OperationLabel { operation });
        }
        m
    }
}

impl Metrics {
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "pool_size",
            "Addresses a pool can hand out",
            self.pool_size.clone(),
        );
        r.register(
            "pool_used",
            "Addresses allocated in a pool",
            self.pool_used.clone(),
        );
        r.register(
            "pool_free",
            "Addresses still free in a pool",
            self.pool_free.clone(),
        );
        r.register(
            "allocations",
            "Allocations kept at the last reconcile, by why they are kept",
            self.held.clone(),
        );
        r.register(
            "releases",
            "Allocations freed by the controller, by reason",
            self.releases.clone(),
        );
        r.register(
            "errors",
            "Failed operations of the controller, by operation",
            self.errors.clone(),
        );
        r.register(
            "watch_resyncs",
            "Lists of a watched resource (at start and after a gap)",
            self.resyncs.clone(),
        );
        r.register(
            "conflicts",
            "Writes refused because the object changed since it was read",
            self.conflicts.clone(),
        );
        r.register(
            "retries",
            "Reads the controller tried again, and full reconciles scheduled after a failure",
            self.retries.clone(),
        );
        r.register(
            "pod_deletions",
            "Pod deletions seen by the watch",
            self.pod_deletions.clone(),
        );
        r.register(
            "events",
            "Kubernetes Events posted",
            self.events_posted.clone(),
        );
        r.register(
            "freed_folded",
            "Released addresses held back by freed marks (etcd) that reconciles made free again",
            self.freed_folded.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the controller's Lease",
            self.leader.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time taken by full reconciles",
            self.reconcile_duration.clone(),
        );
        r.register(
            "last_reconcile_duration_seconds",
            "Time taken by the last full reconcile",
            self.last_reconcile_duration.clone(),
        );
        r.register(
            "last_reconcile_timestamp_seconds",
            "When the last full reconcile ended",
            self.last_reconcile_end.clone(),
        );
        r.register(
            "node_slices",
            "Slices of a NodeSlicePool",
            self.slices.clone(),
        );
        r.register(
            "node_slices_assigned",
            "Slices of a NodeSlicePool assigned to nodes",
            self.slices_assigned.clone(),
        );
    }

    /// The worker made progress in its batch: the clock of a stuck batch starts again.
    pub fn progressed(&self) {
        let now = jiff::Timestamp::now().as_second();
        let busy = |since: i64| (since != 0).then_some(now);
        let _ = self
            .busy_since
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, busy);
    }

    pub fn released(&self, reason: &'static str, count: u64) {
        self.releases
            .get_or_create(&ReasonLabel { reason })
            .inc_by(count);
    }

    /// A failure of `operation`, one of [`OPERATIONS`].
    pub fn error(&self, operation: &'static str) {
        debug_assert!(OPERATIONS.contains(&operation), "{operation}");
        self.errors
            .get_or_create(&OperationLabel { operation })
            .inc();
    }

    /// A watch of `resource` listed (again): it follows every change from here on.
    pub fn resynced(&self, resource: &'static str) {
        self.resyncs
            .get_or_create(&ResourceLabel { resource })
            .inc();
    }

    /// The gauges first, the count last: a scrape that sees the count grow sees this
    /// reconcile's gauges.
    pub fn reconciled(&self, seconds: f64, held: BTreeMap<&'static str, u64>, ended: i64) {
        self.held.clear();
        for (reason, count) in held {
            self.held
                .get_or_create(&ReasonLabel { reason })
                .set(count as i64);
        }
        self.last_reconcile_duration.set(seconds);
        self.last_reconcile_end.set(ended);
        self.reconcile_duration.observe(seconds);
    }

    pub fn set_pools(&self, pools: &[PoolStat]) {
        for family in [&self.pool_size, &self.pool_used, &self.pool_free] {
            family.clear();
        }
        for p in pools {
            let labels = PoolLabels {
                pool: p.pool.clone(),
                range: p.range.clone(),
            };
            self.pool_size.get_or_create(&labels).set(p.size as f64);
            self.pool_used.get_or_create(&labels).set(p.used as f64);
            self.pool_free
                .get_or_create(&labels)
                .set(p.size.saturating_sub(p.used) as f64);
        }
    }

    /// The gauges only the leader keeps up to date, dropped when it stops leading: both
    /// replicas are scraped, and a former leader's frozen pools and slices would be summed with
    /// the live ones (or keep an alert on a pool's free addresses firing).
    pub fn stepped_down(&self) {
        self.held.clear();
        for family in [&self.pool_size, &self.pool_used, &self.pool_free] {
            family.clear();
        }
        self.slices.clear();
        self.slices_assigned.clear();
    }

    /// Slices assigned and in total, per NodeSlicePool.
    pub fn set_slices(&self, pool: &str, assigned: u64, total: u64) {
        let label = SliceLabel {
            nodeslicepool: pool.to_string(),
        };
        self.slices_assigned
            .get_or_create(&label)
            .set(i64::try_from(assigned).unwrap_or(i64::MAX));
        self.slices
            .get_or_create(&label)
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// A NodeSlicePool that is gone.
    pub fn forget_slices(&self, pool: &str) {
        let label = SliceLabel {
            nodeslicepool: pool.to_string(),
        };
        self.slices.remove(&label);
        self.slices_assigned.remove(&label);
    }

    /// The OpenMetrics text of every family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%err, "cannot encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Attachment;

    /// A batch that frees addresses for longer than /healthz allows is not stuck while it
    /// makes progress; an idle worker stays idle.
    #[test]
    fn progress_restarts_the_clock_of_a_busy_batch_only() {
        let m = Metrics::default();
        m.progressed();
        assert_eq!(m.busy_since.load(Ordering::SeqCst), 0);
        m.busy_since.store(1, Ordering::SeqCst);
        m.progressed();
        let since = m.busy_since.load(Ordering::SeqCst);
        assert!(since > jiff::Timestamp::now().as_second() - 60, "{since}");
    }

    #[test]
    fn pools_counted_and_rendered() {
        let allocation = |ip: &str| Allocation {
            pool: "10.0.0.0-29".into(),
            range: Cidr::parse("10.0.0.0/29", false).unwrap(),
            ip: ip.parse().unwrap(),
            network_name: String::new(),
            cni_network: None,
            slice_node: None,
            attachment: Attachment::default(),
        };
        let stats = pool_stats(&[], &[allocation("10.0.0.1"), allocation("10.0.0.2")]);
        assert_eq!(stats[0].size, 6);
        assert_eq!(stats[0].used, 2);
        let m = Metrics::default();
        let no_failure = "whereabouts_errors_total{operation=\"release\"} 0\n";
        assert!(
            m.render().contains(no_failure),
            "counted from 0 from the start"
        );
        m.set_pools(&stats);
        m.released("pod_deleted", 3);
        m.error("list_pods");
        m.freed_folded.inc_by(2);
        let text = m.render();
        assert!(
            text.contains("whereabouts_pool_free{pool=\"10.0.0.0-29\",range=\"10.0.0.0/29\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("whereabouts_releases_total{reason=\"pod_deleted\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("whereabouts_errors_total{operation=\"list_pods\"} 1"),
            "{text}"
        );
        assert!(text.contains("whereabouts_freed_folded_total 2"), "{text}");
        // A pool that went away leaves no stale series.
        m.set_pools(&[]);
        assert!(!m.render().contains("whereabouts_pool_free{"));
    }

    #[test]
    fn a_replica_that_stops_leading_drops_what_only_the_leader_keeps() {
        let m = Metrics::default();
        let stat = PoolStat {
            pool: "10.0.0.0-29".into(),
            range: "10.0.0.0/29".into(),
            size: 6,
            used: 2,
        };
        m.set_pools(&[stat]);
        m.set_slices("slicenet", 2, 4);
        m.reconciled(0.1, BTreeMap::from([("pod_alive", 2)]), 1);
        m.released("pod_deleted", 1);
        m.stepped_down();
        let text = m.render();
        for gone in [
            "whereabouts_pool_",
            "whereabouts_node_slices",
            "whereabouts_allocations{",
        ] {
            assert!(
                !text.lines().any(|l| l.starts_with(gone)),
                "{gone} left: {text}"
            );
        }
        // Counters are the process's own history.
        assert!(text.contains("whereabouts_releases_total{reason=\"pod_deleted\"} 1"));
    }
}
