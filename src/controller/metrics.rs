//! The controller's counters and the Prometheus text exposition of them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::ipam::Cidr;
use crate::store::{Lease, PoolRef};

/// Size and use of one pool, at the time of the last look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStat {
    pub pool: String,
    pub range: String,
    pub size: u128,
    pub used: u128,
}

/// Pools from the configuration (their real capacity) and from the leases (any other pool: the
/// range less its network and broadcast addresses).
pub fn pool_stats(configured: &[PoolRef], leases: &[Lease]) -> Vec<PoolStat> {
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
    for lease in leases {
        let stat = pools.entry(lease.pool.clone()).or_insert_with(|| PoolStat {
            pool: lease.pool.clone(),
            range: lease.range.to_string(),
            size: default_capacity(&lease.range),
            used: 0,
        });
        stat.used += 1;
    }
    pools.into_values().collect()
}

fn default_capacity(cidr: &Cidr) -> u128 {
    cidr.last_offset().saturating_sub(1)
}

#[derive(Default)]
pub struct Metrics {
    releases: Mutex<BTreeMap<&'static str, u64>>,
    /// Why the allocations still held are kept, as of the last reconcile.
    held: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    resyncs: Mutex<BTreeMap<&'static str, u64>>,
    /// When the store's worker started its current batch (seconds since the epoch; 0: idle).
    pub busy_since: AtomicU64,
    pub conflicts: AtomicU64,
    pub retries: AtomicU64,
    pub pod_deletions: AtomicU64,
    pub events_posted: AtomicU64,
    reconciles: AtomicU64,
    reconcile_micros_sum: AtomicU64,
    last_reconcile_micros: AtomicU64,
    last_reconcile_end: AtomicU64,
    pools: Mutex<Vec<PoolStat>>,
    slices: Mutex<BTreeMap<String, (u64, u64)>>,
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str, by: u64) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += by;
    }
}

/// Label values may hold any text: escape what the exposition format requires.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn released(&self, reason: &'static str, count: u64) {
        bump(&self.releases, reason, count);
    }

    pub fn error(&self, operation: &'static str) {
        bump(&self.errors, operation, 1);
    }

    /// A watch of `resource` listed (again): it follows every change from here on.
    pub fn resynced(&self, resource: &'static str) {
        bump(&self.resyncs, resource, 1);
    }

    pub fn reconciled(&self, micros: u64, held: BTreeMap<&'static str, u64>, now_secs: u64) {
        self.reconciles.fetch_add(1, Ordering::SeqCst);
        self.reconcile_micros_sum
            .fetch_add(micros, Ordering::SeqCst);
        self.last_reconcile_micros.store(micros, Ordering::SeqCst);
        self.last_reconcile_end.store(now_secs, Ordering::SeqCst);
        if let Ok(mut h) = self.held.lock() {
            *h = held;
        }
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::SeqCst)
    }

    pub fn set_pools(&self, pools: Vec<PoolStat>) {
        if let Ok(mut p) = self.pools.lock() {
            *p = pools;
        }
    }

    /// Slices assigned and in total, per NodeSlicePool.
    pub fn set_slices(&self, pool: &str, assigned: u64, total: u64) {
        if let Ok(mut s) = self.slices.lock() {
            s.insert(pool.to_string(), (assigned, total));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let pools = self.pools.lock().map(|p| p.clone()).unwrap_or_default();
        let gauge =
            |out: &mut String, name: &str, help: &str, value: &dyn Fn(&PoolStat) -> u128| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for p in &pools {
                    let _ = writeln!(
                        out,
                        "{name}{{pool=\"{}\",range=\"{}\"}} {}",
                        escape(&p.pool),
                        escape(&p.range),
                        value(p)
                    );
                }
            };
        gauge(
            &mut out,
            "whereabouts_pool_size",
            "Addresses a pool can hand out.",
            &|p| p.size,
        );
        gauge(
            &mut out,
            "whereabouts_pool_used",
            "Addresses allocated in a pool.",
            &|p| p.used,
        );
        gauge(
            &mut out,
            "whereabouts_pool_free",
            "Addresses still free in a pool.",
            &|p| p.size.saturating_sub(p.used),
        );
        let counters = |out: &mut String,
                        name: &str,
                        help: &str,
                        label: &str,
                        map: &Mutex<BTreeMap<&'static str, u64>>,
                        kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (k, v) in map.lock().map(|m| m.clone()).unwrap_or_default() {
                let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
            }
        };
        counters(
            &mut out,
            "whereabouts_releases_total",
            "Allocations freed by the controller, by reason.",
            "reason",
            &self.releases,
            "counter",
        );
        counters(
            &mut out,
            "whereabouts_allocations",
            "Allocations kept at the last reconcile, by why they are kept.",
            "reason",
            &self.held,
            "gauge",
        );
        counters(
            &mut out,
            "whereabouts_errors_total",
            "Failed operations of the controller, by operation.",
            "operation",
            &self.errors,
            "counter",
        );
        counters(
            &mut out,
            "whereabouts_watch_resyncs_total",
            "Lists of a watched resource (at start and after a gap).",
            "resource",
            &self.resyncs,
            "counter",
        );
        let single = |out: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        single(
            &mut out,
            "whereabouts_conflicts_total",
            "Writes refused because the object changed since it was read.",
            "counter",
            load(&self.conflicts).to_string(),
        );
        single(
            &mut out,
            "whereabouts_retries_total",
            "Operations the controller tried again.",
            "counter",
            load(&self.retries).to_string(),
        );
        single(
            &mut out,
            "whereabouts_pod_deletions_total",
            "Pod deletions seen by the watch.",
            "counter",
            load(&self.pod_deletions).to_string(),
        );
        single(
            &mut out,
            "whereabouts_events_total",
            "Kubernetes Events posted.",
            "counter",
            load(&self.events_posted).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP whereabouts_reconcile_duration_seconds Time taken by full reconciles.\n# TYPE whereabouts_reconcile_duration_seconds summary\nwhereabouts_reconcile_duration_seconds_sum {}\nwhereabouts_reconcile_duration_seconds_count {}",
            load(&self.reconcile_micros_sum) as f64 / 1e6,
            load(&self.reconciles)
        );
        single(
            &mut out,
            "whereabouts_last_reconcile_duration_seconds",
            "Time taken by the last full reconcile.",
            "gauge",
            (load(&self.last_reconcile_micros) as f64 / 1e6).to_string(),
        );
        single(
            &mut out,
            "whereabouts_last_reconcile_timestamp_seconds",
            "When the last full reconcile ended.",
            "gauge",
            load(&self.last_reconcile_end).to_string(),
        );
        let _ = writeln!(out, "# HELP whereabouts_node_slices_assigned Slices of a NodeSlicePool assigned to nodes.\n# TYPE whereabouts_node_slices_assigned gauge");
        let slices = self.slices.lock().map(|s| s.clone()).unwrap_or_default();
        for (pool, (assigned, _)) in &slices {
            let _ = writeln!(
                out,
                "whereabouts_node_slices_assigned{{nodeslicepool=\"{}\"}} {assigned}",
                escape(pool)
            );
        }
        let _ = writeln!(out, "# HELP whereabouts_node_slices Slices of a NodeSlicePool.\n# TYPE whereabouts_node_slices gauge");
        for (pool, (_, total)) in &slices {
            let _ = writeln!(
                out,
                "whereabouts_node_slices{{nodeslicepool=\"{}\"}} {total}",
                escape(pool)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Attachment;

    #[test]
    fn pools_counted_and_rendered() {
        let lease = |ip: &str| Lease {
            pool: "10.0.0.0-29".into(),
            range: Cidr::parse("10.0.0.0/29", false).unwrap(),
            ip: ip.parse().unwrap(),
            network_name: String::new(),
            cni_network: None,
            attachment: Attachment::default(),
        };
        let stats = pool_stats(&[], &[lease("10.0.0.1"), lease("10.0.0.2")]);
        assert_eq!(stats[0].size, 6);
        assert_eq!(stats[0].used, 2);
        let m = Metrics::default();
        m.set_pools(stats);
        m.released("pod_deleted", 3);
        let text = m.render();
        assert!(
            text.contains("whereabouts_pool_free{pool=\"10.0.0.0-29\",range=\"10.0.0.0/29\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("whereabouts_releases_total{reason=\"pod_deleted\"} 3"),
            "{text}"
        );
    }
}
