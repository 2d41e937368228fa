//! The plugin's side of the socket: one request to the node's agent, or the reason no agent
//! served it (then the plugin does the work itself).
//!
//! A plugin process makes exactly one request, so it makes it on a blocking socket, without an
//! async runtime: starting tokio's runtime (its I/O driver, timer and signal pipe) and hyper's
//! connection task cost every ADD about 0.15 ms of CPU and 30 page faults, a quarter of the
//! plugin's whole share of an ADD through the agent (docs/benchmarks.md). The answer's head is
//! parsed by httparse, the parser hyper itself runs on; the request is one fixed form. ureq,
//! the blocking HTTP client, reaches a unix socket only through its transport API that it
//! keeps out of its semantic versioning, so it is not used here.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use socket2::{Domain, SockAddr, Socket, Type};

use super::wire::ErrorBody;
use crate::store::StoreError;

/// Why the agent did not serve a request. Whatever the agent may have done before it went
/// away is safe to do again: an ADD by the same owner is idempotent (and adopts what a broken
/// attempt reserved), a DEL of nothing succeeds.
#[derive(Debug)]
pub struct NotServed(pub String);

/// Posts `body` to `path` on the agent's socket and reads the answer: the result, the engine's
/// error (with its CNI code), or [`NotServed`]. Waiting longer than `timeout` is a "try again"
/// (the agent may still be working; the runtime's retry is idempotent).
pub fn ask<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    path: &str,
    body: &B,
    timeout: Duration,
) -> Result<Result<T, StoreError>, NotServed> {
    let bytes = serde_json::to_vec(body).map_err(|e| NotServed(e.to_string()))?;
    let (status, bytes) = match post(socket, path, &bytes, Instant::now() + timeout) {
        Ok(answer) => answer,
        Err(Failed::Late) => {
            return Ok(Err(StoreError::try_again(format!(
                "the whereabouts agent at {} did not answer within {timeout:?}",
                socket.display()
            ))))
        }
        Err(Failed::Lost(why)) => return Err(NotServed(why)),
    };
    if status == 404 {
        // Each version of the protocol has paths of its own: an agent of a release that
        // predates this one's (a rolling update under way) has no such path.
        return Err(NotServed(format!(
            "the agent at {} does not serve {path}: it runs a release without it",
            socket.display()
        )));
    }
    if (200..300).contains(&status) {
        return serde_json::from_slice(&bytes)
            .map(Ok)
            .map_err(|e| NotServed(format!("unreadable answer: {e}")));
    }
    let error = serde_json::from_slice::<ErrorBody>(&bytes)
        .map_err(|e| NotServed(format!("unreadable error answer: {e}")))?
        .error;
    if error.falls_back() {
        return Err(NotServed(StoreError::from(error).to_string()));
    }
    Ok(Err(error.into()))
}

/// How an exchange with the agent failed.
enum Failed {
    /// The deadline passed (the agent may still be working).
    Late,
    /// No agent, or it went away, or its answer was unreadable.
    Lost(String),
}

impl Failed {
    fn of(what: &str, err: io::Error) -> Failed {
        match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failed::Late,
            _ => Failed::Lost(format!("{what}: {err}")),
        }
    }
}

/// The longest an answer may be; the agent's answers are a few hundred bytes (a GC's list of
/// released addresses at most some megabytes).
const MAX_ANSWER: usize = 64 << 20;

/// One HTTP/1.1 request on a fresh connection, answered by `deadline`: the answer's status and
/// body.
fn post(
    socket: &Path,
    path: &str,
    body: &[u8],
    deadline: Instant,
) -> Result<(u16, Vec<u8>), Failed> {
    let mut stream = connect(socket, deadline)?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: whereabouts-agent\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .and_then(|()| stream.write_all(&request))
        .map_err(|e| Failed::of("the agent went away", e))?;
    read_answer(&mut stream, deadline)
}

/// Connects within the deadline: an agent too busy to accept (its backlog full) is late, not
/// absent. A unix socket's blocking connect waits for room in the backlog for as long as the
/// send timeout lets it, then fails with EAGAIN (late); a non-blocking one fails at once, and
/// socket2's `connect_timeout` then reads the socket's hang-up as another error (absent).
fn connect(socket: &Path, deadline: Instant) -> Result<UnixStream, Failed> {
    let cannot = |e| Failed::of(&format!("cannot connect to {}", socket.display()), e);
    let address = SockAddr::unix(socket).map_err(cannot)?;
    let client = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(cannot)?;
    client
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(cannot)?;
    client.connect(&address).map_err(cannot)?;
    match server_uid(&client) {
        Ok(uid) if uid == 0 || uid == own_uid() => Ok(client.into()),
        Ok(uid) => Err(Failed::Lost(format!(
            "the server at {} runs as uid {uid}, not as root: not asked",
            socket.display()
        ))),
        Err(err) => Err(Failed::Lost(format!(
            "cannot tell who serves {}: {err}",
            socket.display()
        ))),
    }
}

/// The user of the process that listens at the other end of `client` (as it was when it
/// started listening). The agent runs as root; anyone else at its path (an admin's folder that
/// others can write in) could answer with any address, so it is not asked.
fn server_uid(client: &Socket) -> io::Result<u32> {
    let mut peer = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut size = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred, at most `size` bytes, into `peer`.
    let read = unsafe {
        libc::getsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(peer).cast(),
            &mut size,
        )
    };
    match read {
        0 => Ok(peer.uid),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The plugin's own effective user: root on a node; the tests' user where they run the agent
/// as themselves.
fn own_uid() -> u32 {
    // SAFETY: geteuid only reads the process's credentials.
    unsafe { libc::geteuid() }
}

/// Time left until the deadline, or [`Failed::Late`].
fn remaining(deadline: Instant) -> Result<Duration, Failed> {
    Some(deadline.saturating_duration_since(Instant::now()))
        .filter(|left| !left.is_zero())
        .ok_or(Failed::Late)
}

/// Reads the answer: its head (parsed by httparse), then as many body bytes as its
/// `content-length` says. The agent always sends whole bodies with their length.
fn read_answer(stream: &mut UnixStream, deadline: Instant) -> Result<(u16, Vec<u8>), Failed> {
    let mut buf = Vec::with_capacity(4096);
    let (status, head, length) = loop {
        read_more(stream, &mut buf, deadline)?;
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut answer = httparse::Response::new(&mut headers);
        let parsed = answer
            .parse(&buf)
            .map_err(|e| Failed::Lost(format!("unreadable answer: {e}")))?;
        if let httparse::Status::Complete(head) = parsed {
            // A complete head always has its code.
            let status = answer.code.unwrap_or_default();
            break (status, head, content_length(answer.headers)?);
        }
    };
    while buf.len() < head + length {
        read_more(stream, &mut buf, deadline)?;
    }
    buf.truncate(head + length);
    Ok((status, buf.split_off(head)))
}

fn content_length(headers: &[httparse::Header]) -> Result<usize, Failed> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .filter(|&length| length <= MAX_ANSWER)
        .ok_or_else(|| Failed::Lost("unreadable answer: no usable content-length".into()))
}

/// Appends what the socket has (waiting at most until the deadline; a signal's interruption is
/// not an answer); the end of the stream before the whole answer means the agent went away.
fn read_more(stream: &mut UnixStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), Failed> {
    let went_away = |e| Failed::of("the agent went away", e);
    stream
        .set_read_timeout(Some(remaining(deadline)?))
        .map_err(went_away)?;
    let mut chunk = [0u8; 8192];
    let read = match stream.read(&mut chunk) {
        // The caller asks again, with the time left then.
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
        read => read.map_err(went_away)?,
    };
    if read == 0 {
        return Err(Failed::Lost(
            "the agent went away: the connection closed before the whole answer".into(),
        ));
    }
    buf.extend_from_slice(&chunk[..read]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::thread;

    use serde_json::{json, Value};

    use super::*;

    /// An agent that serves one connection with `serve`, given the request it read: its path
    /// and its body.
    fn agent(
        dir: &Path,
        serve: impl FnOnce(UnixStream, String, Value) + Send + 'static,
    ) -> std::path::PathBuf {
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let (path, body) = read_request(&mut stream);
            serve(stream, path, body);
        });
        socket
    }

    /// Reads one request as a server would: httparse for the head, then `content-length` bytes.
    fn read_request(stream: &mut UnixStream) -> (String, Value) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let read = stream.read(&mut chunk).unwrap();
            assert!(read > 0, "the client closed before its whole request");
            buf.extend_from_slice(&chunk[..read]);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(head) = request.parse(&buf).unwrap() {
                assert_eq!(request.method, Some("POST"));
                let length = content_length(request.headers).ok().unwrap();
                if buf.len() >= head + length {
                    let path = request.path.unwrap().to_string();
                    return (path, serde_json::from_slice(&buf[head..]).unwrap());
                }
            }
        }
    }

    fn ask_agent(socket: &Path, timeout: Duration) -> Result<Result<Value, StoreError>, NotServed> {
        ask(socket, "/v1/add", &json!({"asked": "address"}), timeout)
    }

    const PATIENT: Duration = Duration::from_secs(30);

    /// An agent whose backlog is full (it accepts nothing for a while) is late, not absent: the
    /// plugin answers "try again" rather than serve the call itself beside a live agent.
    #[test]
    fn a_full_backlog_is_late_not_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        // A backlog of one connection, taken by the first client; never accepted.
        listener.listen(0).unwrap();
        let _waiting = UnixStream::connect(&path).unwrap();
        let answer = ask_agent(&path, Duration::from_millis(300));
        match answer {
            Ok(Err(StoreError::TryAgain { .. })) => {}
            Ok(other) => panic!("not \"try again\": {other:?}"),
            Err(NotServed(why)) => panic!("taken for no agent: {why}"),
        }
    }

    #[test]
    fn an_answer_in_pieces_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let socket = agent(dir.path(), |mut stream, path, body| {
            assert_eq!(path, "/v1/add");
            assert_eq!(body, json!({"asked": "address"}));
            let answer = br#"{"ips":["192.0.2.193"]}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            );
            let (first, rest) = head.as_bytes().split_at(20);
            for piece in [first, rest, &answer[..5], &answer[5..]] {
                stream.write_all(piece).unwrap();
                stream.flush().unwrap();
            }
        });
        let answer = ask_agent(&socket, PATIENT).unwrap().unwrap();
        assert_eq!(answer, json!({"ips": ["192.0.2.193"]}));
    }

    #[test]
    fn an_error_answer_keeps_the_engines_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = agent(dir.path(), |mut stream, _, _| {
            let error = json!({"error": {"kind": "exhausted", "range": "192.0.2.192/30"}});
            let body = error.to_string();
            let head = format!(
                "HTTP/1.1 409 Conflict\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body.as_bytes()).unwrap();
        });
        let error = ask_agent(&socket, PATIENT).unwrap().unwrap_err();
        assert!(
            matches!(&error, StoreError::Exhausted { range } if range == "192.0.2.192/30"),
            "{error:?}"
        );
    }

    #[test]
    fn an_agent_that_does_not_answer_in_time_is_try_again() {
        let dir = tempfile::tempdir().unwrap();
        let (done, hold) = mpsc::channel::<()>();
        // The agent holds the connection open, silent, until the client has given up.
        let socket = agent(dir.path(), move |_stream, _, _| {
            let _ = hold.recv();
        });
        let error = ask_agent(&socket, Duration::from_millis(300))
            .unwrap()
            .unwrap_err();
        done.send(()).unwrap();
        assert!(matches!(error, StoreError::TryAgain { .. }), "{error:?}");
    }

    #[test]
    fn an_agent_gone_mid_answer_or_without_a_length_is_not_served() {
        let broken: [&[u8]; 2] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n{\"ips\":",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        ];
        for answer in broken {
            let dir = tempfile::tempdir().unwrap();
            let socket = agent(dir.path(), move |mut stream, _, _| {
                stream.write_all(answer).unwrap();
            });
            let NotServed(why) = ask_agent(&socket, PATIENT).unwrap_err();
            assert!(
                why.contains("went away") || why.contains("unreadable"),
                "{why}"
            );
        }
    }

    /// An agent without the request's path (axum's 404 has an empty body) is named as another
    /// release, not as an unreadable answer.
    #[test]
    fn an_agent_without_the_path_is_not_served_as_another_release() {
        let dir = tempfile::tempdir().unwrap();
        let socket = agent(dir.path(), |mut stream, _, _| {
            stream
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        });
        let NotServed(why) = ask_agent(&socket, PATIENT).unwrap_err();
        assert!(why.contains("does not serve /v1/add"), "{why}");
    }

    #[test]
    fn no_agent_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let NotServed(why) = ask_agent(&dir.path().join("agent.sock"), PATIENT).unwrap_err();
        assert!(why.contains("cannot connect"), "{why}");
    }
}
