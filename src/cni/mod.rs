//! The CNI protocol: requests from env and stdin, versioned results, error codes.

pub mod error;
pub mod request;
pub mod result;
pub mod types;
pub mod version;
