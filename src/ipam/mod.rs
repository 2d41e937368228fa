//! The pure core: address math, ranges, object names and the allocation decision
//! ([`decide()`]).
//! No I/O, no clock, no async: plain functions over plain values.

pub mod addr;
pub mod decide;
pub mod intervals;
pub mod names;
pub mod range;
pub mod slices;
#[cfg(test)]
mod vectors;

pub use addr::Cidr;
pub use decide::{decide, Ask, Contention, Decision, Snapshot};
pub use intervals::{Intervals, OffsetRuns};
pub use range::{parse_exclude, parse_range_text, Range, RangeError, RangeSpec};
