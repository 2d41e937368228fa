//! CNI errors: a code, a message a person can act on, and details.

use serde::Serialize;

use crate::config::ConfigError;
use crate::store::StoreError;

/// CNI error codes (spec section "Error"), and this plugin's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// No free address left in a range.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// A requested static address is held by another attachment.
    pub const ADDRESS_IN_USE: u32 = 101;
    /// CHECK: the attachment's addresses are not recorded.
    pub const NOT_RECORDED: u32 = 102;
    /// A defect of the plugin (it panicked); the code libcni gives internal errors.
    pub const INTERNAL: u32 = 999;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
    /// What the node's log shows instead of `msg`: the message with its causes, which may
    /// quote what the admin configured and so is not the runtime's to see.
    #[serde(skip)]
    pub logged: Option<String>,
}

/// The shortest admin value [`CniError::hiding`] looks for: a shorter one would mostly match
/// other words.
const MIN_HIDDEN_CHARS: usize = 4;

/// The longest message an error carries: whatever its parts, one short line.
pub const MAX_MESSAGE_CHARS: usize = 600;

impl CniError {
    /// The message is kept to one line of at most [`MAX_MESSAGE_CHARS`] characters, control
    /// characters escaped: parts of it may come from a network configuration.
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: crate::files::shown_within(&msg.into(), MAX_MESSAGE_CHARS),
            details: String::new(),
            logged: None,
        }
    }

    /// What the node's log shows of this error.
    pub fn for_the_log(&self) -> &str {
        self.logged.as_deref().unwrap_or(&self.msg)
    }

    /// The error with each of the admin's `values` (paths, endpoints: what the flat file set)
    /// in its message and details replaced by the field that names it: the network
    /// configuration's author reads the reply (the pod's events), the log keeps them.
    pub fn hiding(mut self, values: &[(String, &str)]) -> CniError {
        let msg = hide_cut_value(&hide_values(&self.msg, values), values);
        if msg != self.msg && self.logged.is_none() {
            self.logged = Some(std::mem::replace(&mut self.msg, msg));
        } else {
            self.msg = msg;
        }
        self.details = hide_values(&self.details, values);
        self
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = crate::files::shown_within(&details.into(), MAX_MESSAGE_CHARS);
        self
    }

    /// The error JSON printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        value["cniVersion"] = cni_version.into();
        value
    }
}

impl From<ConfigError> for CniError {
    fn from(err: ConfigError) -> Self {
        let code = match err {
            ConfigError::Invalid(_) => code::INVALID_CONFIG,
            ConfigError::Unreadable { .. } => code::IO_FAILURE,
        };
        CniError::new(code, err.describe())
    }
}

/// `text` with each of `values` replaced by `<field>`, its field: in one pass, the longest
/// value at each place first, so that a value inside another (a folder of a path) or inside a
/// field's name (a host `etcd`) does not break what was already replaced.
pub fn hide_values(text: &str, values: &[(String, &str)]) -> String {
    let (patterns, fields): (Vec<&str>, Vec<String>) = values
        .iter()
        .filter(|(value, _)| value.chars().count() >= MIN_HIDDEN_CHARS)
        .map(|(value, field)| (value.as_str(), format!("<{field}>")))
        .unzip();
    let matcher = aho_corasick::AhoCorasick::builder()
        .match_kind(aho_corasick::MatchKind::LeftmostLongest)
        .build(&patterns);
    match matcher {
        Ok(matcher) => matcher.replace_all(text, &fields),
        // Only a pattern set beyond the library's limits: every value is hidden with the rest.
        Err(_) => crate::files::without_values(text),
    }
}

/// `text` without the start of one of `values` it ends with when [`CniError::new`] cut it
/// there (its `…`): the whole value would have been hidden.
fn hide_cut_value(text: &str, values: &[(String, &str)]) -> String {
    let Some(kept) = text.strip_suffix('…') else {
        return text.to_string();
    };
    // The longest start of any value the text ends with.
    let cut = values
        .iter()
        .flat_map(|(value, field)| {
            let starts = value
                .char_indices()
                .map(|(at, _)| at)
                .skip(MIN_HIDDEN_CHARS);
            starts
                .filter(|&at| kept.ends_with(&value[..at]))
                .map(move |at| (at, *field))
        })
        .max_by_key(|(at, _)| *at)
        .map(|(at, field)| (kept.len() - at, field));
    match cut {
        Some((at, field)) => format!("{}<{field}>…", &kept[..at]),
        None => text.to_string(),
    }
}

/// The CNI code of a store failure.
pub fn store_code(err: &StoreError) -> u32 {
    match err {
        StoreError::Exhausted { .. } => code::POOL_EXHAUSTED,
        StoreError::InUse { .. } => code::ADDRESS_IN_USE,
        StoreError::TryAgain { .. } => code::TRY_AGAIN,
        StoreError::Config { .. } => code::INVALID_CONFIG,
        StoreError::Io { .. } | StoreError::Broken { .. } => code::IO_FAILURE,
    }
}

/// The code and the public message ([`StoreError::public`]: the kind of failure underneath,
/// "connection refused", "permission denied"); the log has the causes.
impl From<StoreError> for CniError {
    fn from(err: StoreError) -> Self {
        let mut cni = CniError::new(store_code(&err), err.public());
        cni.logged = Some(err.describe());
        cni
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Datastore, EtcdConfig, IpamConfig};

    fn with_datastore(datastore: Datastore) -> IpamConfig {
        let ipam = serde_json::json!({"type": "whereabouts", "range": "10.0.0.0/24"});
        let mut cfg = crate::config::load_with_flat_files(Some(&ipam), &[]).unwrap();
        cfg.datastore = datastore;
        cfg
    }

    fn etcd_config(endpoints: &[&str]) -> IpamConfig {
        with_datastore(Datastore::Etcd(EtcdConfig {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            username: None,
            password: None,
            cert_file: None,
            key_file: Some("/etc/whereabouts/tls/client.key".into()),
            ca_cert_file: None,
        }))
    }

    #[test]
    fn the_admins_settings_show_as_their_fields_and_stay_in_the_log() {
        let cfg = etcd_config(&["https://root:pw@etcd-0.infra.example:2379", "etcd/"]);
        let err = StoreError::try_again(
            "cannot connect to etcd at https://…@etcd-0.infra.example:2379,http://etcd \
             (etcd-0.infra.example:2379 refused); key /etc/whereabouts/tls/client.key",
        );
        let reply = CniError::from(err).hiding(&cfg.admin_values());
        assert_eq!(
            reply.msg,
            "cannot connect to etcd at <ipam.etcd_host>,<ipam.etcd_host> (<ipam.etcd_host> \
             refused); key <ipam.etcd_key_file>"
        );
        assert!(
            reply.for_the_log().contains("etcd-0.infra.example:2379"),
            "{reply:?}"
        );
        // A bare host name hides no other word: "etcd" stays what it says.
        assert!(reply.msg.starts_with("cannot connect to etcd at"));
        // Nothing to hide: nothing changes.
        let plain = CniError::new(code::IO_FAILURE, "disk full").hiding(&cfg.admin_values());
        assert_eq!((plain.msg.as_str(), plain.logged), ("disk full", None));
    }

    #[test]
    fn a_value_the_length_cut_splits_is_hidden_too() {
        let cfg = etcd_config(&["https://etcd-0.infra.example:2379"]);
        let long = format!("{} https://etcd-0.infra.example:2379", "x".repeat(580));
        let reply = CniError::new(code::TRY_AGAIN, long).hiding(&cfg.admin_values());
        assert!(reply.msg.ends_with(" <ipam.etcd_host>…"), "{}", reply.msg);
        assert!(!reply.msg.contains("https"), "{}", reply.msg);
    }

    #[test]
    fn a_local_database_and_its_folders_are_hidden_longest_first() {
        let cfg = with_datastore(Datastore::Local {
            path: "/var/lib/whereabouts/pods.db".into(),
        });
        let text = "cannot open /var/lib/whereabouts/pods.db-wal in /var/lib/whereabouts";
        assert_eq!(
            hide_values(text, &cfg.admin_values()),
            "cannot open <ipam.local_path>-wal in <ipam.local_path's folder>"
        );
    }
}
