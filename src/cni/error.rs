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
        let hide = |text: &mut String| {
            for (value, field) in values {
                if value.chars().count() >= MIN_HIDDEN_CHARS && text.contains(value.as_str()) {
                    *text = text.replace(value.as_str(), &format!("<{field}>"));
                }
            }
        };
        let before = self.msg.clone();
        hide(&mut self.msg);
        hide(&mut self.details);
        if self.msg != before && self.logged.is_none() {
            self.logged = Some(before);
        }
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
