//! Which node this is: node slices allocate from the node's own pool, and a CNI GC may only
//! release what this node allocated.

use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// The environment variable that names this node (set by the installer's DaemonSet).
pub const NODENAME_ENV: &str = "NODENAME";

/// A node name is at most 253 characters; the file may add whitespace.
const MAX_NODE_FILE_BYTES: u64 = 1024;

/// This node's name: `$NODENAME`, else the `nodename` file beside the flat file
/// (`configuration_path` may name the folder or the file), else `/etc/hostname`.
pub fn node_name(configuration_path: Option<&Path>) -> Result<String, StoreError> {
    node_name_from(
        std::env::var(NODENAME_ENV).ok(),
        configuration_path,
        Path::new("/etc/hostname"),
    )
}

pub fn node_name_from(
    env: Option<String>,
    configuration_path: Option<&Path>,
    hostname_file: &Path,
) -> Result<String, StoreError> {
    if let Some(name) = env.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()) {
        return Ok(name);
    }
    let mut tried: Vec<PathBuf> = Vec::new();
    if let Some(path) = configuration_path {
        let dir = if path.is_dir() {
            Some(path)
        } else {
            path.parent()
        };
        if let Some(dir) = dir {
            tried.push(dir.join("nodename"));
        }
    }
    tried.push(hostname_file.to_path_buf());
    for file in &tried {
        // The nodename file's folder may come from configuration: capped, no symbolic links,
        // regular files only. The host's own name file is a fixed path (a link on some hosts).
        let read = if file == hostname_file {
            std::fs::read(file).ok()
        } else {
            crate::files::read_capped(file, MAX_NODE_FILE_BYTES).ok()
        };
        if let Some(bytes) = read {
            let text = String::from_utf8_lossy(&bytes);
            let name = text.trim();
            if !name.is_empty() {
                return Ok(name.to_string());
            }
        }
    }
    Err(StoreError::config(format!(
        "this node's name is unknown: set ${NODENAME_ENV} or write it to {}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_name_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let hostname = dir.path().join("hostname");
        std::fs::write(&hostname, "host-a\n").unwrap();
        let flat = dir.path().join("whereabouts.conf");
        assert_eq!(
            node_name_from(Some("env-node".into()), Some(&flat), &hostname).unwrap(),
            "env-node"
        );
        assert_eq!(
            node_name_from(None, Some(&flat), &hostname).unwrap(),
            "host-a"
        );
        std::fs::write(dir.path().join("nodename"), "file-node\n").unwrap();
        assert_eq!(
            node_name_from(None, Some(&flat), &hostname).unwrap(),
            "file-node"
        );
        assert_eq!(
            node_name_from(None, Some(dir.path()), &hostname).unwrap(),
            "file-node"
        );
        let missing = dir.path().join("none");
        assert!(node_name_from(None, None, &missing).is_err());
    }
}
