//! Combining a node's concurrent requests in the agent, for every engine: the queues requests
//! wait in (one per pool) and what the agent counts about them. Each engine decides what one
//! batch reads and writes (`kubernetes::batch`, `etcd::combine`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::StoreError;

/// What the agent counts about combining (its metrics).
pub trait Observer: Send + Sync {
    /// A batch of `size` requests of `operation` ("add", "del") is being written.
    fn batch(&self, operation: &'static str, size: usize);
    /// A conditional write of `operation` found the pool changed and is retried.
    fn conflict(&self, operation: &'static str);
    /// A request of `operation` waits in its pool's queue while a batch of that pool is served.
    fn queued(&self, operation: &'static str);
    /// The watch behind a cached copy of kind `what` ("ippools", "reservations", "lease";
    /// "etcd": one of the pools' copies) delivered an event (`delivered`), or failed.
    fn cache(&self, what: &'static str, delivered: bool);
    /// Of the `copies` copies of kind `what` the agent follows (one of each Kubernetes kind;
    /// etcd: one per pool it serves), `in_step` follow their server since their last list.
    fn in_step(&self, what: &'static str, in_step: usize, copies: usize) {
        let _ = (what, in_step, copies);
    }
    /// Since the last call, the agent marked `marked` released addresses freed and its folds
    /// cut `folded` marks out of their runs (etcd).
    fn freed(&self, marked: u64, folded: u64) {
        let _ = (marked, folded);
    }
}

/// The map stays consistent whatever panicked while holding it: every change is one insert,
/// one removal or one take.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Queue<J, R> {
    waiting: Vec<(J, oneshot::Sender<R>)>,
}

/// Queues by key. A key has an entry exactly while a task serves it.
pub struct Queues<J, R> {
    queues: Mutex<HashMap<String, Queue<J, R>>>,
    /// What the queued requests do ("add", "del"), for the observer.
    operation: &'static str,
    observer: Arc<dyn Observer>,
}

impl<J, R> Queues<J, R> {
    pub fn new(operation: &'static str, observer: Arc<dyn Observer>) -> Queues<J, R> {
        Queues {
            queues: Mutex::new(HashMap::new()),
            operation,
            observer,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Queue<J, R>>> {
        lock(&self.queues)
    }

    /// What the queued requests do ("add", "del").
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// Queues a job; the answer comes on the receiver. True when no task serves the queue yet:
    /// the caller must start one.
    pub fn submit(&self, key: &str, job: J) -> (oneshot::Receiver<R>, bool) {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queues = self.lock();
            let start = !queues.contains_key(key);
            queues
                .entry(key.to_string())
                .or_insert_with(|| Queue {
                    waiting: Vec::new(),
                })
                .waiting
                .push((job, reply));
            start
        };
        if !start {
            self.observer.queued(self.operation);
        }
        (answer, start)
    }

    /// The jobs waiting, for the serving task. When none wait, the queue is closed in the same
    /// step, so that the next job starts a new task.
    pub fn take_or_close(&self, key: &str) -> Vec<(J, oneshot::Sender<R>)> {
        let mut queues = self.lock();
        let mut waiting = queues
            .get_mut(key)
            .map(|q| std::mem::take(&mut q.waiting))
            .unwrap_or_default();
        drop_abandoned(&mut waiting);
        if waiting.is_empty() {
            queues.remove(key);
        }
        waiting
    }

    /// The jobs that arrived while a batch waited, to join it.
    pub fn take(&self, key: &str) -> Vec<(J, oneshot::Sender<R>)> {
        let mut waiting = self
            .lock()
            .get_mut(key)
            .map(|q| std::mem::take(&mut q.waiting))
            .unwrap_or_default();
        drop_abandoned(&mut waiting);
        waiting
    }
}

/// Leaves out the jobs whose callers no longer wait (their deadline passed while they queued,
/// their plugin process was killed). Served, an ADD would hold an address for an answer
/// nobody reads, which only a later DEL, GC or the controller gives back; the runtime retries
/// what it did not hear answered.
pub fn drop_abandoned<J, R>(waiting: &mut Vec<(J, oneshot::Sender<R>)>) {
    waiting.retain(|(_, reply)| !reply.is_closed());
}

/// Held by the task serving a queue: if that task panics, the queue is closed and its waiting
/// requests are answered [`dropped`] (their senders go), so that the next request starts a new
/// task instead of waiting for one that is gone.
pub struct Serving<'a, J, R> {
    pub queues: &'a Queues<J, R>,
    pub key: &'a str,
}

impl<J, R> Drop for Serving<'_, J, R> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.queues.lock().remove(self.key);
        }
    }
}

/// The answer a waiting request gets when its batch was dropped without one.
pub fn dropped() -> StoreError {
    StoreError::try_again("the agent stopped serving this request's batch")
}

/// An observer that counts nothing, for tests of what is observed.
#[cfg(test)]
pub struct Quiet;

#[cfg(test)]
impl Observer for Quiet {
    fn batch(&self, _: &'static str, _: usize) {}
    fn conflict(&self, _: &'static str) {}
    fn queued(&self, _: &'static str) {}
    fn cache(&self, _: &'static str, _: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_whose_caller_is_gone_is_not_served() {
        let queues: Queues<u32, u32> = Queues::new("add", Arc::new(Quiet));
        let (_first, start) = queues.submit("pool", 1);
        assert!(start);
        let (gone, _) = queues.submit("pool", 2);
        let (_third, _) = queues.submit("pool", 3);
        drop(gone);
        let jobs: Vec<u32> = queues
            .take_or_close("pool")
            .into_iter()
            .map(|(j, _)| j)
            .collect();
        assert_eq!(jobs, [1, 3]);
        // Joining a batch under way, likewise.
        let (gone, _) = queues.submit("pool", 4);
        drop(gone);
        assert!(queues.take("pool").is_empty());
        // A queue whose every caller is gone closes: the next job starts a new server.
        let (gone, start) = queues.submit("pool", 5);
        assert!(!start);
        drop(gone);
        assert!(queues.take_or_close("pool").is_empty());
        assert!(queues.submit("pool", 6).1);
    }
}
