//! The Go test tools of hack/tools (helm, and the control plane's binaries), found the way a
//! developer would: `hack/tools/build NAME` builds them once per version of their modules and
//! prints the folder holding them. The first build takes minutes; later ones find the binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::missing_prerequisite;

/// The folder holding the named tools, built if needed. `None` when the build failed outside CI
/// (after a loud notice); in CI a tool that cannot be built fails the test.
pub fn go_tools(names: &[&str]) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/tools/build");
    // stderr is the build's progress and errors: shown as they come, since a first build is slow.
    let out = Command::new(&script)
        .args(names)
        .stderr(Stdio::inherit())
        .output();
    let failure = match out {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if names.iter().all(|name| dir.join(name).is_file()) {
                return Some(dir);
            }
            format!(
                "{} printed {}, which lacks them",
                script.display(),
                dir.display()
            )
        }
        Ok(out) => format!("{} exited with {}", script.display(), out.status),
        Err(e) => format!("cannot run {}: {e}", script.display()),
    };
    missing_prerequisite(&format!("Go test tools {names:?}: {failure}"));
    None
}

/// The helm binary, built once per test process. `None` (with a notice) when it cannot be built
/// outside CI; tests that need it skip then.
pub fn helm() -> Option<PathBuf> {
    static HELM: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = HELM.get_or_init(|| go_tools(&["helm"]).map(|dir| dir.join("helm")));
    if found.is_none() {
        // Every skipping test says so, not only the first one that tried the build.
        eprintln!("\n*** SKIPPED: no helm (hack/tools/build helm failed) ***\n");
    }
    found.clone()
}
