//! The agent's metrics: requests by operation and result, batch sizes, conflicts, and how
//! current its watched copies are.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::wire::WireError;
use crate::store::kubernetes::Observer;
use crate::store::queues::lock;

/// The requests the agent serves, as its metrics name them.
pub const OPERATIONS: [&str; 5] = ["add", "del", "check", "gc", "status"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<OperationLabels, Histogram>,
    batch_sizes: Family<OperationLabels, Histogram>,
    conflicts: Family<OperationLabels, Counter>,
    queued: Family<OperationLabels, Counter>,
    cache_synced: Family<CacheLabels, Gauge>,
    cache_updated: Family<CacheLabels, Gauge>,
    cache_events: Family<CacheLabels, Counter>,
    cache_failures: Family<CacheLabels, Counter>,
    cache_copies: Family<CacheLabels, Gauge>,
    cache_copies_in_step: Family<CacheLabels, Gauge>,
    freed_marked: Counter,
    freed_folded: Counter,
    /// Each kind's copies in step and followed, as last told: what readiness reads.
    steps: Mutex<BTreeMap<&'static str, (usize, usize)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("whereabouts_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests served, by operation and result",
            requests.clone(),
        );
        let durations = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time to serve a request, by operation",
            durations.clone(),
        );
        let batch_sizes = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 10))
        });
        registry.register(
            "batch_size",
            "Requests combined into one conditional write of a pool",
            batch_sizes.clone(),
        );
        let conflicts = Family::<OperationLabels, Counter>::default();
        registry.register(
            "conflicts",
            "Conditional writes refused because the pool had changed (each is retried)",
            conflicts.clone(),
        );
        let queued = Family::<OperationLabels, Counter>::default();
        registry.register(
            "requests_queued",
            "Requests that waited in their pool's queue while a batch of that pool was served",
            queued.clone(),
        );
        let cache_synced = Family::<CacheLabels, Gauge>::default();
        registry.register(
            "cache_synced",
            "1 while every copy of the kind (ippools, reservations, lease; etcd: the pools') follows its server since its last list, 0 while one is out of step (from a watch failure, or its first use, to its next list)",
            cache_synced.clone(),
        );
        let cache_updated = Family::<CacheLabels, Gauge>::default();
        registry.register(
            "cache_updated_timestamp_seconds",
            "When the watch behind the copy last delivered an event (its age: time() minus this)",
            cache_updated.clone(),
        );
        let cache_events = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_events",
            "Watch events the copy took in (additions, changes, deletions of the watched objects)",
            cache_events.clone(),
        );
        let cache_failures = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_failures",
            "Times the copy's watch broke (a connection lost, a server gone away), the copy untrusted until its next list",
            cache_failures.clone(),
        );
        let cache_copies = Family::<CacheLabels, Gauge>::default();
        registry.register(
            "cache_copies",
            "Copies the agent follows (one of each Kubernetes kind; etcd: one per pool a batch used lately)",
            cache_copies.clone(),
        );
        let cache_copies_in_step = Family::<CacheLabels, Gauge>::default();
        registry.register(
            "cache_copies_in_step",
            "Copies that follow their server since their last list, out of cache_copies",
            cache_copies_in_step.clone(),
        );
        let freed_marked = Counter::default();
        registry.register(
            "freed_marked",
            "Addresses released while another release was cutting their run, marked freed: out of use until a fold (etcd)",
            freed_marked.clone(),
        );
        let freed_folded = Counter::default();
        registry.register(
            "freed_folded",
            "Freed marks this agent's folds cut out of their runs, their addresses free again (etcd)",
            freed_folded.clone(),
        );
        let metrics = Metrics {
            registry: Mutex::new(registry),
            requests,
            durations,
            batch_sizes,
            conflicts,
            queued,
            cache_synced,
            cache_updated,
            cache_events,
            cache_failures,
            cache_copies,
            cache_copies_in_step,
            freed_marked,
            freed_folded,
            steps: Mutex::new(BTreeMap::new()),
        };
        metrics.count_from_zero();
        metrics
    }

    /// Whether the agent's copies follow their servers: it follows some, and every copy of
    /// every kind is in step since its last list. A watch that delivers shows the server
    /// answering, with the resources and the rights the agent needs, so readiness need not ask
    /// it again (every node's probe, every few seconds, would be a steady load on it).
    pub fn copies_in_step(&self) -> bool {
        let steps = lock(&self.steps);
        let followed: usize = steps.values().map(|(_, copies)| copies).sum();
        followed > 0 && steps.values().all(|(in_step, copies)| in_step == copies)
    }

    /// Shows every operation's count of every result from the start, at 0: a counter that
    /// appears only at its first request hides that request from `increase()` and `rate()`,
    /// so an alert on the first "no free address" would not fire.
    fn count_from_zero(&self) {
        for operation in OPERATIONS {
            for result in std::iter::once("ok").chain(WireError::KINDS) {
                // Created at 0; the guard it returns is not needed.
                let _ = self
                    .requests
                    .get_or_create(&RequestLabels { operation, result });
            }
        }
    }

    pub fn request(&self, operation: &'static str, result: &'static str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { operation, result })
            .inc();
        self.durations
            .get_or_create(&OperationLabels { operation })
            .observe(seconds);
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Observer for Metrics {
    fn batch(&self, operation: &'static str, size: usize) {
        self.batch_sizes
            .get_or_create(&OperationLabels { operation })
            .observe(size as f64);
    }

    fn conflict(&self, operation: &'static str) {
        self.conflicts
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    fn queued(&self, operation: &'static str) {
        self.queued
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    fn cache(&self, cache: &'static str, delivered: bool) {
        let labels = CacheLabels { cache };
        if delivered {
            let now = jiff::Timestamp::now().as_second();
            self.cache_updated.get_or_create(&labels).set(now);
            self.cache_events.get_or_create(&labels).inc();
        } else {
            self.cache_failures.get_or_create(&labels).inc();
        }
    }

    fn freed(&self, marked: u64, folded: u64) {
        self.freed_marked.inc_by(marked);
        self.freed_folded.inc_by(folded);
    }

    fn in_step(&self, cache: &'static str, in_step: usize, copies: usize) {
        lock(&self.steps).insert(cache, (in_step, copies));
        let labels = CacheLabels { cache };
        let all = in_step == copies;
        self.cache_synced.get_or_create(&labels).set(i64::from(all));
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.cache_copies.get_or_create(&labels).set(count(copies));
        self.cache_copies_in_step
            .get_or_create(&labels)
            .set(count(in_step));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_marks_and_folds_are_counted() {
        let metrics = Metrics::new();
        metrics.freed(3, 1);
        metrics.freed(2, 4);
        let text = metrics.render();
        assert!(
            text.contains("whereabouts_agent_freed_marked_total 5"),
            "{text}"
        );
        assert!(
            text.contains("whereabouts_agent_freed_folded_total 5"),
            "{text}"
        );
    }

    /// Every result of every operation is there before the first request, at 0.
    #[test]
    fn request_counts_start_at_zero() {
        let metrics = Metrics::new();
        let exhausted = r#"whereabouts_agent_requests_total{operation="add",result="exhausted"}"#;
        let text = metrics.render();
        assert!(text.contains(&format!("{exhausted} 0\n")), "{text}");
        metrics.request("add", "exhausted", 0.01);
        assert!(metrics.render().contains(&format!("{exhausted} 1\n")));
        let series = text
            .lines()
            .filter(|l| l.starts_with("whereabouts_agent_requests_total"));
        assert_eq!(
            series.count(),
            OPERATIONS.len() * (1 + WireError::KINDS.len())
        );
    }

    /// An operator alerts on `cache_synced`: it must say 0 while any copy of the kind is out of
    /// step, not only when the copy that changed last is.
    #[test]
    fn a_kind_is_in_step_only_when_all_its_copies_are() {
        let metrics = Metrics::new();
        let line = |name: &str, value: u32| {
            format!("whereabouts_agent_{name}{{cache=\"etcd\"}} {value}\n")
        };
        metrics.in_step("etcd", 2, 3);
        let text = metrics.render();
        assert!(text.contains(&line("cache_synced", 0)), "{text}");
        assert!(text.contains(&line("cache_copies", 3)), "{text}");
        assert!(text.contains(&line("cache_copies_in_step", 2)), "{text}");
        // An event of a copy in step says nothing of the others.
        metrics.cache("etcd", true);
        assert!(metrics.render().contains(&line("cache_synced", 0)));
        metrics.in_step("etcd", 3, 3);
        assert!(metrics.render().contains(&line("cache_synced", 1)));
        // With no copy followed, none is out of step.
        metrics.in_step("etcd", 0, 0);
        assert!(metrics.render().contains(&line("cache_synced", 1)));
    }
}
