//! The static builds the image ships, as `hack/images/build` leaves them beside cargo's own
//! target folder: the full binary (`whereabouts`) and the plugin-only build
//! (`whereabouts-plugin`), which the installer puts on hosts whose agent serves the plugin.

use std::path::{Path, PathBuf};

/// The static build `file` (`whereabouts` or `whereabouts-plugin`), when it has been made.
pub fn static_build(file: &str) -> Option<PathBuf> {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("x86_64-unknown-linux-gnu/release").join(file))
        .filter(|path| path.is_file())
}
