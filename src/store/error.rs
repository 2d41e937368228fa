//! Errors of the storage engines, each knowing its CNI code.

use crate::cni::error::code;

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
    #[error("{0}")]
    TryAgain(String),
    /// The configuration cannot be served by this engine.
    #[error("{0}")]
    Config(String),
    /// A local I/O failure or an unreadable store.
    #[error("{0}")]
    Io(String),
    /// The store cannot serve again without an admin (a corrupt database): DEL succeeds
    /// against it, logging loudly, so that pod teardown completes; STATUS fails.
    #[error("{0}")]
    Broken(String),
}

impl StoreError {
    /// The CNI error code for this failure.
    pub fn code(&self) -> u32 {
        match self {
            StoreError::Exhausted { .. } => code::POOL_EXHAUSTED,
            StoreError::InUse { .. } => code::ADDRESS_IN_USE,
            StoreError::TryAgain(_) => code::TRY_AGAIN,
            StoreError::Config(_) => code::INVALID_CONFIG,
            StoreError::Io(_) | StoreError::Broken(_) => code::IO_FAILURE,
        }
    }
}
