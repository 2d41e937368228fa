//! Why a configuration cannot be used. The CNI edge turns it into a code (7 for a wrong
//! configuration, 5 for a file that cannot be read) and a one-line message.

/// A configuration error. Every message names the field (`ipam.range`) or the file, never a
/// file's content.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field, or a combination of fields, that this plugin cannot serve.
    #[error("{0}")]
    Invalid(String),
    /// A file the configuration relies on (the flat file) cannot be looked up or read.
    #[error("{what}")]
    Unreadable {
        what: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl ConfigError {
    pub fn invalid(msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid(msg.into())
    }

    /// The message followed by its causes.
    pub fn describe(&self) -> String {
        crate::store::error::chain(self)
    }
}
