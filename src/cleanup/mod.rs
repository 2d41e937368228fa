//! Cleanup: deciding which allocations no pod holds any more, and freeing them.

pub mod judge;
