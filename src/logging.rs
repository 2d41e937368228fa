//! Logs go to `log_file` or stderr, never to stdout (which carries only protocol output).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing::Level;

use crate::config::LogLevel;

fn level(level: Option<LogLevel>) -> Level {
    match level {
        Some(LogLevel::Debug) => Level::DEBUG,
        Some(LogLevel::Verbose) => Level::INFO,
        Some(LogLevel::Error) | Some(LogLevel::Panic) => Level::ERROR,
        // Upstream logs everything by default; so do we, on stderr which runtimes keep quiet.
        None => Level::DEBUG,
    }
}

/// Installs the subscriber once; later calls are ignored. A log file that cannot be opened
/// falls back to stderr: logging never fails a CNI call.
pub fn init(log_file: Option<&Path>, log_level: Option<LogLevel>) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level(log_level))
        .with_ansi(false)
        .with_target(false);
    let file = log_file.and_then(|path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|err| {
                eprintln!(
                    "whereabouts: cannot open log_file {}: {err}; logging to stderr",
                    path.display()
                )
            })
            .ok()
    });
    let _ = match file {
        Some(file) => builder.with_writer(Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
