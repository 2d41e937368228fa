//! One operation at a time per attachment, within one process (the node agent).
//!
//! A runtime that sends an attachment's ADD again while the first is still under way, or its
//! DEL while the ADD is (the plugin gave up waiting and the runtime cleans up), would otherwise
//! have both in flight in the agent: the second ADD may be answered with what the first is
//! still writing, which the first then takes back if it fails, and a DEL may find nothing yet
//! of what the ADD then writes. Each now waits for the other; different attachments never
//! wait for each other. A map of weak slots keyed by attachment is all it takes, so no crate
//! is pulled in for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

use super::queues::lock;

type Slot = tokio::sync::Mutex<()>;

/// The attachments (container ID, interface name) with an operation under way or waiting.
#[derive(Default)]
pub struct OneAtATime {
    slots: Mutex<HashMap<(String, String), Weak<Slot>>>,
}

impl OneAtATime {
    /// Waits until no other operation of the attachment is under way; it holds the attachment
    /// until the guard is dropped.
    pub async fn enter(&self, container_id: &str, ifname: &str) -> OwnedMutexGuard<()> {
        let slot = self.slot(container_id, ifname);
        match slot.clone().try_lock_owned() {
            Ok(alone) => alone,
            Err(_) => {
                waiting(container_id, ifname);
                slot.lock_owned().await
            }
        }
    }

    /// [`OneAtATime::enter`] for a caller outside the runtime, which it blocks.
    pub fn enter_blocking(&self, container_id: &str, ifname: &str) -> OwnedMutexGuard<()> {
        let slot = self.slot(container_id, ifname);
        match slot.clone().try_lock_owned() {
            Ok(alone) => alone,
            Err(_) => {
                waiting(container_id, ifname);
                slot.blocking_lock_owned()
            }
        }
    }

    /// The attachment's slot, shared by its operations under way or waiting.
    fn slot(&self, container_id: &str, ifname: &str) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        // Slots of finished operations go: the map holds only what is under way.
        slots.retain(|_, slot| slot.strong_count() > 0);
        let key = (container_id.to_string(), ifname.to_string());
        match slots.get(&key).and_then(Weak::upgrade) {
            Some(slot) => slot,
            None => {
                let slot = Arc::new(Slot::default());
                slots.insert(key, Arc::downgrade(&slot));
                slot
            }
        }
    }

    /// How many attachments have an operation under way or waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        let mut slots = lock(&self.slots);
        slots.retain(|_, slot| slot.strong_count() > 0);
        slots.len()
    }
}

fn waiting(container_id: &str, ifname: &str) {
    tracing::info!(
        container = container_id,
        ifname,
        "waiting for this attachment's operation under way"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The second operation of an attachment waits for the first; another attachment's does
    /// not; nothing is kept once they are done.
    #[tokio::test]
    async fn an_attachment_waits_for_its_own_operation_only() {
        let gate = Arc::new(OneAtATime::default());
        let first = gate.enter("c1", "net1").await;
        let other = tokio::time::timeout(Duration::from_secs(5), gate.enter("c2", "net1")).await;
        assert!(other.is_ok(), "another attachment waited");
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter("c1", "net1").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the same attachment went ahead");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        let second = second.expect("the second went ahead once the first was done");
        drop((second, other));
        assert_eq!(gate.len(), 0);
    }
}
