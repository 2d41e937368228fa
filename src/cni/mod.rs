//! The CNI protocol: requests from env and stdin, versioned results, error codes.

pub mod error;
pub mod types;
