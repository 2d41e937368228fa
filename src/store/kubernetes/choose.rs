//! How widely an ADD spreads after losing a race.
//!
//! The first try is the lowest free address, as everywhere else ([`crate::ipam::decide()`]).
//! Every contender of a burst on other machines reads the same pool, though, so after losing a
//! reservation race an ADD does not chase the next-lowest address (the losers would all meet
//! again, and the requests of a burst would grow with the square of its size): it takes one of
//! the lowest [`SPREAD`] free addresses, picked by a stable hash of its container ID and
//! interface ([`crate::ipam::decide::stable_hash`]), so contenders rarely meet twice.
//!
//! The agent remembers a lost race per pool for [`super::batch::CONTENDED_FOR`]: while other
//! nodes are taking addresses of that pool, its next ADDs spread from their first try instead
//! of meeting the others at the lowest free address. A pool that loses no race (one node, or
//! ADDs one after another) keeps lowest free first.

/// How many of the lowest free addresses an ADD chooses among after losing a race.
pub const SPREAD: usize = 128;
