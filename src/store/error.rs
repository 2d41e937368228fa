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

    /// The same error, with `text` (a place the admin configured: a path, an endpoint, a
    /// server) in front of its cause: the log shows it, the runtime's reply does not
    /// ([`StoreError::public`]).
    pub fn logging(self, text: impl Into<String>) -> StoreError {
        let source = match &self {
            StoreError::TryAgain { cause, .. }
            | StoreError::Config { cause, .. }
            | StoreError::Io { cause, .. }
            | StoreError::Broken { cause, .. } => cause.clone(),
            StoreError::Exhausted { .. } | StoreError::InUse { .. } => return self,
        };
        self.because(Detail {
            text: text.into(),
            source,
        })
    }

    /// The message followed by its causes: what a log line or the operator's commands show.
    pub fn describe(&self) -> String {
        chain(self)
    }

    /// What the CNI runtime is told, and through it the author of the network configuration:
    /// the message and, of its causes, only the kind of system failure underneath ("connection
    /// refused", "permission denied"). The causes' own text quotes what the admin configured
    /// (endpoints, paths, certificate names) and goes to the node's log ([`describe`]), as does
    /// the holder of an address asked for.
    ///
    /// [`describe`]: StoreError::describe
    pub fn public(&self) -> String {
        // The holder may be another tenant's pod: the asker learns that the address is taken.
        if let StoreError::InUse { ip, range, .. } = self {
            return format!(
                "requested IP address {ip} in range {range} is already held by another \
                 attachment (the node's whereabouts log names it)"
            );
        }
        let Some(cause) = std::error::Error::source(self) else {
            return self.to_string();
        };
        let kind = std::iter::successors(Some(cause), |e| e.source())
            .find_map(io_error)
            .map(|e| e.kind().to_string())
            .filter(|kind| !matches!(kind.as_str(), "other error" | "uncategorized error"))
            .filter(|kind| !self.to_string().contains(kind.as_str()));
        let mut text = self.to_string();
        if let Some(kind) = kind {
            text = format!("{text}: {kind}");
        }
        if !text.contains(IN_THE_LOG) {
            text = format!("{text} {IN_THE_LOG}");
        }
        text
    }
}

/// Where a public text ([`StoreError::public`]) sends the reader for the causes it leaves out.
const IN_THE_LOG: &str = "(the cause is in the node's whereabouts log)";

/// `err` as an I/O error, also when it is one kept in a [`Cause`] (an `Arc`, another type).
fn io_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    err.downcast_ref::<std::io::Error>().or_else(|| {
        err.downcast_ref::<Cause>()
            .and_then(|cause| cause.downcast_ref::<std::io::Error>())
    })
}

/// Text for the log, in front of the failure underneath ([`StoreError::logging`]).
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
struct Detail {
    text: String,
    #[source]
    source: Option<Cause>,
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

    #[test]
    fn the_public_text_keeps_the_kind_of_failure_and_leaves_the_causes_to_the_log() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "tcp connect to 10.9.8.7:2379 failed",
        );
        let err = StoreError::try_again("cannot connect to etcd")
            .because(refused)
            .logging("at https://10.9.8.7:2379");
        assert_eq!(
            err.describe(),
            "cannot connect to etcd: at https://10.9.8.7:2379: tcp connect to 10.9.8.7:2379 failed"
        );
        assert_eq!(
            err.public(),
            "cannot connect to etcd: connection refused (the cause is in the node's whereabouts log)"
        );
        let library = StoreError::config("cannot use the kubeconfig").because(std::fmt::Error);
        assert!(
            !library.public().contains("formatter"),
            "{}",
            library.public()
        );
        assert_eq!(StoreError::io("disk").public(), "disk");
        let in_use = StoreError::InUse {
            ip: "10.0.0.5".parse().unwrap(),
            range: "10.0.0.0/24".into(),
            holder: "ns/pod".into(),
        };
        assert_eq!(in_use.clone().logging("x").describe(), in_use.to_string());
        assert!(in_use.to_string().contains("ns/pod"));
        assert!(!in_use.public().contains("ns/pod"), "{}", in_use.public());
        assert!(in_use.public().contains("10.0.0.5"), "{}", in_use.public());
    }
}
