//! Whether the tests run in CI: shared by the test crates' helper modules.

/// Whether the tests run in CI (`CI` set, but not to `false` or `0`), where a missing
/// prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
