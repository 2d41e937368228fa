//! The agent's metrics: requests by operation and result, batch sizes, conflicts, and how
//! current its watched copies are.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::kubernetes::Observer;

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
    freed_marked: Counter,
    freed_folded: Counter,
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
            "1 while the watched copy (ippools, reservations, lease) follows the server since its last list, 0 after a watch failure until the next list",
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
            "Copies the agent follows (etcd: one per pool a batch used lately)",
            cache_copies.clone(),
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
        Metrics {
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
            freed_marked,
            freed_folded,
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

    fn cache(&self, cache: &'static str, synced: bool) {
        let labels = CacheLabels { cache };
        self.cache_synced
            .get_or_create(&labels)
            .set(i64::from(synced));
        if synced {
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

    fn following(&self, cache: &'static str, copies: usize) {
        let copies = i64::try_from(copies).unwrap_or(i64::MAX);
        self.cache_copies
            .get_or_create(&CacheLabels { cache })
            .set(copies);
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
}
