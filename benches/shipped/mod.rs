//! The static builds the image ships, as `hack/images/build` leaves them beside cargo's own
//! target folder: the full binary (`whereabouts`) and the plugin-only build
//! (`whereabouts-plugin`), which the installer puts on hosts whose agent serves the plugin.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The static build `file` (`whereabouts` or `whereabouts-plugin`), when it has been made since
/// the sources last changed: one made before may be of older sources, and measured beside
/// cargo's build of this run it would be taken for it, so it is left out (`hack/images/build`
/// makes it again).
pub fn static_build(file: &str) -> Option<PathBuf> {
    let cargo_build = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let path = cargo_build
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("x86_64-unknown-linux-gnu/release").join(file))
        .filter(|path| path.is_file())?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        repo.join("src"),
        repo.join("Cargo.toml"),
        repo.join("Cargo.lock"),
    ];
    let changed = sources.iter().filter_map(|p| last_change(p)).max();
    if modified(&path) < changed {
        println!(
            "{} is older than the sources: left out (hack/images/build OUT makes it again)",
            path.display()
        );
        return None;
    }
    Some(path)
}

fn modified(path: &Path) -> Option<SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

/// The latest change of `path`, or of any file under it.
fn last_change(path: &Path) -> Option<SystemTime> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return modified(path);
    };
    let under = entries.flatten().filter_map(|e| last_change(&e.path()));
    under.chain(modified(path)).max()
}
