//! The admin's flat file of the tests' plugin calls (`$WHEREABOUTS_FLAT_FILE`): network
//! configurations may name files in the temporary folder, their own etcd endpoints, and the
//! tests' plain-http servers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const FLAT_FILE_ENV: &str = "WHEREABOUTS_FLAT_FILE";

/// Written once per test process (atomically: processes share it).
pub fn test_flat_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("whereabouts-test-flat-file.conf");
        let temp = std::env::temp_dir();
        let temp = temp.canonicalize().unwrap_or(temp);
        let text = serde_json::json!({
            "allow_inline_paths": [temp],
            "allow_inline_endpoints": true,
            "allow_insecure_tls": true,
        })
        .to_string();
        let staging = dir.join(format!("whereabouts-test-flat-file.{}", std::process::id()));
        std::fs::write(&staging, text).expect("write the tests' flat file");
        std::fs::rename(&staging, &path).expect("install the tests' flat file");
        path
    })
}
