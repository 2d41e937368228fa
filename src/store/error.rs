//! Errors of the storage engines: what failed, in words a person can act on, with the failure
//! underneath kept as the error's source. The CNI edge ([`crate::cni::error`]) turns them into
//! codes and one-line messages.

use std::sync::Arc;

/// The failure underneath a store error. Shared, so that an error can be cloned: one combined
/// write answers every request that joined it with the same error.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The range has no address left for this attachment.
    #[error("no free IP address left in range {range}")]
    Exhausted { range: String },
    /// A static address asked for is held by another attachment.
    #[error("requested IP address {ip} in range {range} is already held by {holder}")]
    InUse {
        ip: std::net::IpAddr,
        range: String,
        holder: String,
    },
    /// A transient failure: the engine is unreachable, too slow or too contended. Nothing was
    /// written; the runtime may try again.
    #[error("{what}")]
    TryAgain {
        what: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The configuration cannot be served by this engine.
    #[error("{what}")]
    Config {
        what: String,
        #[source]
        cause: Option<Cause>,
    },
    /// A local I/O failure, an unreadable store, or a request the engine's server refused.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The store cannot serve again without an admin (a corrupt database): DEL succeeds
    /// against it, logging loudly, so that pod teardown completes; STATUS fails.
    #[error("{what}")]
    Broken {
        what: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl StoreError {
    /// The error of a decision that hands out no address: its static address is held, beyond
    /// `limit` (what stops the pool short of its range, said after "beyond"), or nothing is
    /// left. Every engine answers the core's refusals with these.
    pub fn refusing(
        range: &crate::ipam::Range,
        decision: crate::ipam::Decision<String>,
        limit: &str,
    ) -> StoreError {
        use crate::ipam::Decision;
        match decision {
            Decision::InUse { offset, holder } => StoreError::InUse {
                ip: range.ip(offset),
                range: range.to_string(),
                holder,
            },
            Decision::BeyondLimit { offset } => StoreError::config(format!(
                "requested address {} is beyond {limit}",
                range.ip(offset)
            )),
            // Exhausted: the decisions that hand out an address are not refusals.
            _ => StoreError::Exhausted {
                range: range.to_string(),
            },
        }
    }

    pub fn try_again(what: impl Into<String>) -> StoreError {
        StoreError::TryAgain {
            what: what.into(),
            cause: None,
        }
    }

    pub fn config(what: impl Into<String>) -> StoreError {
        StoreError::Config {
            what: what.into(),
            cause: None,
        }
    }

    pub fn io(what: impl Into<String>) -> StoreError {
        StoreError::Io {
            what: what.into(),
            cause: None,
        }
    }

    pub fn broken(what: impl Into<String>) -> StoreError {
        StoreError::Broken {
            what: what.into(),
            cause: None,
        }
    }

    /// The same error, with `err` kept as its source.
    pub fn because(mut self, err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        match &mut self {
            StoreError::TryAgain { cause, .. }
            | StoreError::Config { cause, .. }
            | StoreError::Io { cause, .. }
            | StoreError::Broken { cause, .. } => *cause = Some(Arc::new(err)),
            StoreError::Exhausted { .. } | StoreError::InUse { .. } => {}
        }
        self
    }

    /// The message followed by its causes: what a log line or a CNI error shows.
    pub fn describe(&self) -> String {
        chain(self)
    }
}

/// `err` and its sources, joined by ": ", each cause shown once (a cause whose text the message
/// already holds is not repeated).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn the_cause_is_kept_as_the_source_and_shown_once() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let err = StoreError::io("cannot open /var/lib/whereabouts/db").because(io);
        assert_eq!(err.to_string(), "cannot open /var/lib/whereabouts/db");
        assert_eq!(err.source().unwrap().to_string(), "permission denied");
        assert_eq!(
            err.describe(),
            "cannot open /var/lib/whereabouts/db: permission denied"
        );
        let exhausted = StoreError::Exhausted {
            range: "10.0.0.0/30".into(),
        };
        assert!(exhausted
            .clone()
            .because(std::fmt::Error)
            .source()
            .is_none());
    }
}
