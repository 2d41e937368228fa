//! Connection settings: endpoints, credentials, TLS and timeouts.

use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::config::EtcdConfig;
use crate::store::StoreError;

/// Environment variable overriding the overall deadline of one operation, in milliseconds.
pub const DEADLINE_ENV: &str = "WHEREABOUTS_ETCD_TIMEOUT_MS";

/// How long the engine waits. Every network call is bounded by `request` and by what is left of
/// `deadline`, so an operation never outlives its deadline whatever the cluster does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a connection to one member.
    pub connect: Duration,
    /// One request (read or transaction).
    pub request: Duration,
    /// A whole ADD, DEL, CHECK, GC or STATUS, retries included.
    pub deadline: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(3),
            deadline: Duration::from_secs(15),
        }
    }
}

impl Timeouts {
    /// The defaults, with the deadline taken from [`DEADLINE_ENV`] when it is set and valid.
    pub fn from_env() -> Timeouts {
        let mut t = Timeouts::default();
        if let Some(ms) = std::env::var(DEADLINE_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ms| *ms > 0)
        {
            t.deadline = Duration::from_millis(ms);
            t.request = t.request.min(t.deadline);
            t.connect = t.connect.min(t.deadline);
        }
        t
    }
}

/// Whether the configuration asks for TLS.
pub fn uses_tls(cfg: &EtcdConfig) -> bool {
    cfg.ca_cert_file.is_some() || cfg.cert_file.is_some()
}

/// Endpoints with an explicit scheme: `https://` when TLS is configured, `http://` otherwise,
/// unless the endpoint names its own.
pub fn endpoints(cfg: &EtcdConfig) -> Result<Vec<String>, StoreError> {
    let tls = uses_tls(cfg);
    let mut out = Vec::new();
    for raw in &cfg.endpoints {
        let e = raw.trim().trim_end_matches('/');
        if e.is_empty() {
            continue;
        }
        let with_scheme = if e.starts_with("http://") || e.starts_with("https://") {
            if tls && e.starts_with("http://") {
                return Err(StoreError::config(format!(
                    "etcd endpoint {:?} uses http:// but TLS files are configured; use https://",
                    crate::files::shown_url(e)
                )));
            }
            e.to_string()
        } else if e.contains("://") {
            return Err(StoreError::config(format!(
                "etcd endpoint {:?} has an unsupported scheme (expected http:// or https://)",
                crate::files::shown_url(e)
            )));
        } else if tls {
            format!("https://{e}")
        } else {
            format!("http://{e}")
        };
        out.push(with_scheme);
    }
    if out.is_empty() {
        return Err(StoreError::config("ipam.etcd_host names no endpoint"));
    }
    Ok(out)
}

/// Credentials (a password or a client key) only travel over TLS, unless the admin's flat file
/// sets `allow_insecure_tls`.
pub fn require_tls_for_credentials(
    cfg: &EtcdConfig,
    endpoints: &[String],
    insecure_tls: bool,
) -> Result<(), StoreError> {
    let has_credentials =
        cfg.username.is_some() || cfg.password.is_some() || cfg.key_file.is_some();
    match endpoints.iter().find(|e| e.starts_with("http://")) {
        Some(plain) if has_credentials && !insecure_tls => Err(StoreError::config(format!(
            "etcd credentials are only sent over TLS, and endpoint {:?} is plain http:// \
             (use https:// with ipam.etcd_ca_cert_file, or allow_insecure_tls in the flat file)",
            crate::files::shown_url(plain)
        ))),
        _ => Ok(()),
    }
}

/// The contents of the TLS files a client is built with (CA, certificate, key, those set),
/// to tell when they change on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles(Vec<Vec<u8>>);

/// Connection options: credentials, TLS files and the timeouts; with the TLS files' contents
/// they were built from.
pub fn options(
    cfg: &EtcdConfig,
    timeouts: &Timeouts,
) -> Result<(ConnectOptions, TlsFiles), StoreError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(timeouts.connect)
        .with_timeout(timeouts.request)
        // Without a leader a write cannot commit; failing fast lets the retry loop wait instead
        // of a request hanging on a partitioned member.
        .with_require_leader(true);
    match (&cfg.username, &cfg.password) {
        (Some(user), password) => {
            // etcd forgets a token unused for its `--auth-token-ttl` (five minutes by default),
            // and an agent on a quiet node is idle that long: a call refused for its token
            // authenticates again and is sent once more. etcd-client leaves this off by default.
            opts = opts
                .with_user(user.clone(), password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        (None, Some(_)) => {
            return Err(StoreError::config(
                "ipam.etcd_password is set but ipam.etcd_username is not",
            ))
        }
        (None, None) => {}
    }
    let mut files = TlsFiles::default();
    if uses_tls(cfg) {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca_cert_file {
            let ca = read(ca, "etcd_ca_cert_file")?;
            tls = tls.ca_certificate(Certificate::from_pem(&ca));
            files.0.push(ca);
        }
        match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (read(cert, "etcd_cert_file")?, read(key, "etcd_key_file")?);
                tls = tls.identity(Identity::from_pem(&cert, &key));
                files.0.extend([cert, key]);
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::config(
                    "ipam.etcd_cert_file and ipam.etcd_key_file must be set together",
                ))
            }
        }
        opts = opts.with_tls(tls);
    }
    Ok((opts, files))
}

fn read(path: &std::path::Path, field: &str) -> Result<Vec<u8>, StoreError> {
    crate::files::read_config_file(path)
        .map_err(|e| StoreError::config(format!("cannot read ipam.{field}: {}", e.describe())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoints: &[&str], tls: bool) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            username: None,
            password: None,
            cert_file: None,
            key_file: None,
            ca_cert_file: tls.then(|| "/ca.pem".into()),
        }
    }

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(
            endpoints(&cfg(&["127.0.0.1:2379", " https://h:1/ "], false)).unwrap(),
            vec!["http://127.0.0.1:2379", "https://h:1"]
        );
        assert_eq!(
            endpoints(&cfg(&["127.0.0.1:2379"], true)).unwrap(),
            vec!["https://127.0.0.1:2379"]
        );
        assert!(endpoints(&cfg(&["http://h:1"], true)).is_err());
        assert!(endpoints(&cfg(&["unix://x"], false)).is_err());
        assert!(endpoints(&cfg(&[" "], false)).is_err());
    }

    #[test]
    fn credentials_need_tls_unless_allowed() {
        let mut with_user = cfg(&["h:1"], false);
        with_user.username = Some("root".into());
        let plain = endpoints(&with_user).unwrap();
        assert!(require_tls_for_credentials(&with_user, &plain, false).is_err());
        assert!(require_tls_for_credentials(&with_user, &plain, true).is_ok());
        let anonymous = cfg(&["h:1"], false);
        assert!(require_tls_for_credentials(&anonymous, &plain, false).is_ok());
        let tls = cfg(&["h:1"], true);
        let secure = endpoints(&tls).unwrap();
        assert!(require_tls_for_credentials(&with_user, &secure, false).is_ok());
    }

    #[test]
    fn missing_tls_file_is_a_config_error() {
        let err = options(&cfg(&["h:1"], true), &Timeouts::default()).unwrap_err();
        assert!(err.to_string().contains("etcd_ca_cert_file"), "{err}");
    }
}
