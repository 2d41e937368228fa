//! The embedded default engine: a SQLite database on the local machine.

use std::path::Path;

use crate::store::{Store, StoreError};

/// Opens (creating if needed) the database at `path`.
pub fn open(_path: &Path) -> Result<Box<dyn Store>, StoreError> {
    Err(StoreError::Config(
        "the local store is not built yet".into(),
    ))
}
