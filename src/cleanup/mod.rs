//! Cleanup: deciding which allocations no pod holds any more, and freeing them.

pub mod cron;
pub mod judge;
pub mod plan;
pub mod pods;
