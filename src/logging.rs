//! Logs go to `log_file` or stderr, never to stdout (which carries only protocol output).
//!
//! Logged values may come from a NetworkAttachmentDefinition: every control character inside an
//! event (a newline in a field, an escape sequence) is written escaped, so one event is always
//! exactly one line and cannot forge another.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogLevel;
use crate::files;

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
/// (missing folder, a symbolic link, a FIFO, not a regular file) falls back to stderr: logging
/// never fails a CNI call.
pub fn init(log_file: Option<&Path>, log_level: Option<LogLevel>) {
    let level = level(log_level);
    let file = log_file.and_then(|path| {
        files::open_append(path)
            .map_err(|err| {
                eprintln!(
                    "whereabouts: log_file not used, logging to stderr: {}",
                    err.describe()
                )
            })
            .ok()
    });
    match file {
        Some(file) => {
            let writer = Escaping(Mutex::new(file));
            let logger = events(level).with_writer(writer).finish();
            let _ = logger.with(ours_at(level)).try_init();
        }
        None => init_command(level),
    }
}

/// A log on stderr from `level` on: an operator command's (its stdout carries its report), or
/// any without a log file. Once; later calls are ignored.
pub fn init_command(level: Level) {
    let logger = events(level).with_writer(Escaping(io::stderr)).finish();
    let _ = logger.with(ours_at(level)).try_init();
}

/// How events are written: one line each, without colours or the module's path.
fn events(level: Level) -> tracing_subscriber::fmt::SubscriberBuilder {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
}

/// The level asked for is ours; the libraries (HTTP, TLS, the Kubernetes client) speak only of
/// what went wrong: their debug events (a span per request, each handshake's steps) would bury
/// ours and cost every call their formatting.
fn ours_at(level: Level) -> Targets {
    Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), level)
        .with_default(Level::WARN)
}

/// Makes writers that escape control characters (see the module's documentation).
pub struct Escaping<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }
}

/// Writes each buffer (one formatted event) with its control characters escaped, except the
/// final newline that ends the event.
pub struct EscapingWriter<W>(W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(escape_event(buf).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The event's text with control characters escaped, ending in exactly one newline when the
/// event did.
pub fn escape_event(buf: &[u8]) -> String {
    let text = String::from_utf8_lossy(buf);
    let (body, end) = match text.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (&*text, ""),
    };
    let mut out = escape_controls(body, |c| c == '\t');
    out.push_str(end);
    out
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`), except those `keep` allows:
/// stored or configured text, written where a control character could forge a line or drive a
/// terminal.
pub fn escape_controls(text: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && !keep(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_one_line() {
        assert_eq!(
            escape_event(b"ERROR bad local_path \"/x\nroot:x:0:0\"\n"),
            "ERROR bad local_path \"/x\\nroot:x:0:0\"\n"
        );
        assert_eq!(
            escape_event("a\u{1b}[2J\u{85}b".as_bytes()),
            "a\\u{1b}[2J\\u{85}b"
        );
    }
}
