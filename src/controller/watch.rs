//! Following a resource: list once for a resourceVersion, then watch from it, resuming from
//! the last version seen when a watch ends, and listing again (a resync: events may have been
//! missed) when the server says that version is too old or the connection fails.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

pub enum Change<K> {
    Applied(K),
    Deleted(K),
    /// Listed again after a gap: whatever happened in between is unknown.
    Resynced,
}

/// Runs forever, handing every change to `on_change`.
pub async fn follow<K>(
    api: Api<K>,
    what: &str,
    timeout: Duration,
    mut on_change: impl FnMut(Change<K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let params = WatchParams::default().timeout(timeout.as_secs().clamp(1, 3600) as u32);
    let mut pause = Duration::from_millis(200);
    loop {
        let mut version = match api.list(&ListParams::default().limit(1)).await {
            Ok(list) => list.metadata.resource_version.unwrap_or_default(),
            Err(err) => {
                tracing::warn!(%err, what, "cannot list; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        on_change(Change::Resynced);
        // Watch from `version` until the server says it is too old or the watch fails.
        loop {
            let stream = match api.watch(&params, &version).await {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(%err, what, "cannot watch; listing again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                    break;
                }
            };
            let mut stream = std::pin::pin!(stream);
            let mut relist = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(WatchEvent::Added(obj)) | Ok(WatchEvent::Modified(obj)) => {
                        version = obj.resource_version().unwrap_or(version);
                        on_change(Change::Applied(obj));
                    }
                    Ok(WatchEvent::Deleted(obj)) => {
                        version = obj.resource_version().unwrap_or(version);
                        on_change(Change::Deleted(obj));
                    }
                    Ok(WatchEvent::Bookmark(mark)) => version = mark.metadata.resource_version,
                    Ok(WatchEvent::Error(status)) => {
                        tracing::info!(what, code = status.code, message = %status.message, "watch ended");
                        relist = true;
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(%err, what, "watch failed");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(10));
                        break;
                    }
                }
                pause = Duration::from_millis(200);
            }
            if relist {
                break;
            }
        }
    }
}
