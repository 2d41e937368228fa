//! The static builds the image ships, as `hack/images/build` leaves them beside cargo's own
//! target folder: the full binary (`whereabouts`) and the plugin-only build
//! (`whereabouts-plugin`), which the installer puts on hosts whose agent serves the plugin.

use std::path::{Path, PathBuf};

/// The static build `file` (`whereabouts` or `whereabouts-plugin`), when it has been made from
/// the sources cargo built this run's binary from. Cargo relinks its own binary when the
/// sources change: a static build older than it may be of older sources, and measured beside
/// it would be taken for this one, so it is left out (`hack/images/build` makes it again).
pub fn static_build(file: &str) -> Option<PathBuf> {
    let cargo_build = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let path = cargo_build
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("x86_64-unknown-linux-gnu/release").join(file))
        .filter(|path| path.is_file())?;
    let built = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    if built(&path) < built(cargo_build) {
        println!(
            "{} is older than cargo's build of this run: left out (hack/images/build OUT makes it again)",
            path.display()
        );
        return None;
    }
    Some(path)
}
