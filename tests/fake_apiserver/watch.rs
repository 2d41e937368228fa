//! Watches of the built-in and the custom resources: `?watch=true` answers a chunked stream of JSON events,
//! one per line, as the real API server does. A watch starts after the `resourceVersion` it
//! names (or, without one, with an ADDED event per existing object), ends after
//! `timeoutSeconds`, and gets an ERROR event with a 410 Expired status when the history it would
//! need has been compacted away.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::core::{target, Target};
use super::{FakeApiServer, Shared, State};

pub struct Entry {
    revision: u64,
    plural: String,
    namespace: String,
    /// The event as every watcher receives it, encoded once: a pool of a thousand entries
    /// written a thousand times is otherwise copied and encoded again for each watcher, and
    /// the harness, not the system under test, would use up the machine.
    line: Arc<Vec<u8>>,
}

/// The change history watches replay.
#[derive(Default)]
pub struct Log {
    entries: Vec<Entry>,
    /// Revisions up to this one are gone from the history.
    compacted: u64,
    /// Bumped to end every open watch (as an API server restart would).
    generation: u64,
    /// Open watches deliver nothing while set, as a watch that lags behind the server would;
    /// what happened meanwhile follows once it is cleared.
    held: bool,
}

pub(super) fn record(state: &mut State, kind: &'static str, plural: &str, ns: &str, obj: &Value) {
    let revision = state.revision;
    state.log.entries.push(Entry {
        revision,
        plural: plural.to_string(),
        namespace: ns.to_string(),
        line: Arc::new(event_line(kind, obj)),
    });
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

pub(super) fn is_watch(req: &super::http::Request) -> bool {
    req.method == "GET" && matches!(param(&req.query, "watch"), Some("true") | Some("1"))
}

/// What a watch follows: a resource, in one namespace or all.
struct Watched {
    plural: String,
    namespace: Option<String>,
}

impl Watched {
    /// A built-in resource's path, or a custom resource's (always namespaced here); never one
    /// object's path.
    fn of(path: &str) -> Option<Watched> {
        if let Some(Target {
            resource,
            namespace,
            name: None,
        }) = target(path)
        {
            return Some(Watched {
                plural: resource.plural.to_string(),
                namespace,
            });
        }
        match super::path_parts(path)? {
            (namespace, plural, None) => Some(Watched {
                plural,
                namespace: Some(namespace),
            }),
            _ => None,
        }
    }

    fn matches(&self, plural: &str, ns: &str) -> bool {
        plural == self.plural && self.namespace.as_deref().is_none_or(|want| want == ns)
    }
}

/// The ERROR event of a watch whose history is compacted away.
fn expired(rv: u64) -> Vec<u8> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410,
    });
    event_line("ERROR", &status)
}

/// An event about `object` as one line of the stream, its type first as the real API server
/// writes it (a client may rely on the order: serde's adjacently tagged enums decode the object
/// in place only when the tag comes first).
fn event_line(kind: &str, object: &Value) -> Vec<u8> {
    let mut line = format!(r#"{{"type":"{kind}","object":"#).into_bytes();
    serde_json::to_writer(&mut line, object).unwrap_or_default();
    line.extend_from_slice(b"}\n");
    line
}

fn chunk(writer: &mut TcpStream, line: &[u8]) -> std::io::Result<()> {
    write!(writer, "{:x}\r\n", line.len())?;
    writer.write_all(line)?;
    writer.write_all(b"\r\n")?;
    writer.flush()
}

/// Whether the start of a watch is the 410 of a history compacted away (nothing follows it).
fn asked_expired(initial: &[Vec<u8>]) -> bool {
    initial
        .first()
        .is_some_and(|line| line.starts_with(br#"{"type":"ERROR""#))
}

/// Serves one watch on the connection; false when the connection is unusable afterwards.
pub(super) fn stream(shared: &Shared, req: &super::http::Request, writer: &mut TcpStream) -> bool {
    let Some(watched) = Watched::of(&req.path) else {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"the server could not find the requested resource"}"#;
        return super::http::write_response(writer, 404, body).is_ok();
    };
    let timeout = param(&req.query, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if writer.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let (mut cursor, initial, generation) = {
        let state = shared.state.lock().unwrap();
        let asked = param(&req.query, "resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0");
        match asked.map(|rv| rv.parse::<u64>()) {
            Some(Ok(rv)) if rv < state.log.compacted => {
                (rv, vec![expired(rv)], state.log.generation)
            }
            Some(Ok(rv)) => (rv, vec![], state.log.generation),
            Some(Err(_)) => (0, vec![expired(0)], state.log.generation),
            None => {
                let existing = state
                    .objects
                    .iter()
                    .filter(|((p, ns, _), _)| watched.matches(p, ns))
                    .map(|(_, obj)| event_line("ADDED", obj))
                    .collect();
                (state.revision, existing, state.log.generation)
            }
        }
    };
    let failed = asked_expired(&initial);
    for line in &initial {
        if chunk(writer, line).is_err() {
            return false;
        }
    }
    while !failed && Instant::now() < deadline && !shared.stop.load(Ordering::SeqCst) {
        let (events, end) = {
            let state = shared.state.lock().unwrap();
            if state.log.generation != generation {
                (vec![], true)
            } else if cursor < state.log.compacted {
                (vec![Arc::new(expired(cursor))], true)
            } else if state.log.held {
                (vec![], false)
            } else {
                // The log is in revision order: start past the cursor instead of scanning it all
                // (every watcher looks every 10 ms, under the server's lock).
                let entries = &state.log.entries;
                let first = entries.partition_point(|e| e.revision <= cursor);
                let events: Vec<Arc<Vec<u8>>> = entries[first..]
                    .iter()
                    .filter(|e| watched.matches(&e.plural, &e.namespace))
                    .map(|e| e.line.clone())
                    .collect();
                cursor = cursor.max(state.revision);
                (events, false)
            }
        };
        for line in &events {
            if chunk(writer, line).is_err() {
                return false;
            }
        }
        if end {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    writer
        .write_all(b"0\r\n\r\n")
        .and_then(|_| writer.flush())
        .is_ok()
}

impl FakeApiServer {
    /// Holds back every watch's events (true) or lets them flow again (false): watchers' copies
    /// go stale on demand.
    pub fn hold_watches(&self, held: bool) {
        self.shared.state.lock().unwrap().log.held = held;
    }

    /// Forgets the change history: watches resuming from before now get 410 Expired.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.log.compacted = state.revision;
        state.log.entries.clear();
    }

    /// Ends every open watch cleanly, as an API server restart or a load balancer would.
    pub fn end_watches(&self) {
        self.shared.state.lock().unwrap().log.generation += 1;
    }
}
