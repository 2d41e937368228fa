//! An earlier build of the binary, measured side by side with this one in the same run for
//! before/after figures: `WHEREABOUTS_EARLIER_BINARY=/path/to/whereabouts cargo bench --bench ..`
//! (build it from a worktree of the earlier commit with `cargo build --release`).

use std::path::PathBuf;

/// The earlier build named by `WHEREABOUTS_EARLIER_BINARY`, if any.
pub fn binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("WHEREABOUTS_EARLIER_BINARY")?);
    assert!(
        path.is_file(),
        "WHEREABOUTS_EARLIER_BINARY={} is not a file",
        path.display()
    );
    Some(path)
}
