//! CNI spec versions: which we speak and which one a configuration gets.

use super::error::{code, CniError};

/// Every version this plugin answers in, oldest first.
pub const SUPPORTED: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest version, used when a request names none.
pub const LATEST: &str = "1.1.0";

fn parse(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
    let v = (
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
        parts.next().unwrap_or(Some(0))?,
    );
    parts.next().is_none().then_some(v)
}

pub fn is_supported(version: &str) -> bool {
    SUPPORTED.contains(&version)
}

/// Whether `version` is at least `min` (both dotted triples).
pub fn at_least(version: &str, min: &str) -> bool {
    matches!((parse(version), parse(min)), (Some(a), Some(b)) if a >= b)
}

/// The version to answer in: the highest of `cniVersions` that we support when the list is
/// given, otherwise `cniVersion` (an empty one means the oldest, as the spec says).
pub fn negotiate(cni_version: Option<&str>, cni_versions: &[String]) -> Result<String, CniError> {
    if !cni_versions.is_empty() {
        return cni_versions
            .iter()
            .filter(|v| is_supported(v))
            .max_by_key(|v| parse(v))
            .cloned()
            .ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "none of cniVersions {cni_versions:?} is supported (supported: {})",
                        SUPPORTED.join(", ")
                    ),
                )
            });
    }
    let version = cni_version.unwrap_or("").trim();
    let version = if version.is_empty() { "0.1.0" } else { version };
    if is_supported(version) {
        Ok(version.to_string())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(Some("0.3.1"), &[]).unwrap(), "0.3.1");
        assert_eq!(negotiate(None, &[]).unwrap(), "0.1.0");
        let list = vec!["1.0.0".to_string(), "1.1.0".into(), "2.0.0".into()];
        assert_eq!(negotiate(Some("1.0.0"), &list).unwrap(), "1.1.0");
        assert_eq!(negotiate(Some("9.9.9"), &[]).unwrap_err().code, 1);
        assert_eq!(negotiate(None, &["3.0.0".to_string()]).unwrap_err().code, 1);
        assert!(at_least("1.1.0", "1.1.0") && !at_least("1.0.0", "1.1.0"));
        assert!(at_least("0.4.0", "0.3.1"));
    }
}
