//! The TCP port of `/metrics`, `/healthz` and `/readyz`, for the agent and the controller.
//!
//! Whoever reaches the port (any process on the host: the agent runs on the host's network)
//! can connect, so a connection gets a few seconds for its request head and for its answer,
//! one request each, and only so many connections are served at once, an idle one giving way to
//! a new one. `axum::serve` keeps an idle connection for as long as its peer likes, so this
//! serves with hyper's own builder.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tower::ServiceExt;

/// Connections served at once, a bound on the file descriptors the port can take, and never
/// more than a quarter of the process's own limit (often 1024): the rest serve the engine and
/// the plugins. When all are open, a new one takes the place of the oldest that has not sent
/// its request head yet: a probe, which sends its head at once, is served while idle
/// connections hold the port.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long a connection has to send its request head.
pub const HEAD_WITHIN: Duration = Duration::from_secs(5);

/// How long a connection is served at most, its answer included.
pub const SERVED_WITHIN: Duration = Duration::from_secs(30);

/// After a failed accept (out of file descriptors, most likely), how long to wait before the
/// next: the failure would otherwise repeat at once, in a loop that takes a core.
const AFTER_FAILED_ACCEPT: Duration = Duration::from_millis(100);

/// A connection being served.
struct Open {
    id: u64,
    /// Set once its request head has been read.
    asked: Arc<AtomicBool>,
    task: AbortHandle,
}

/// The connections being served, oldest first.
#[derive(Clone, Default)]
struct Served(Arc<Mutex<VecDeque<Open>>>);

impl Served {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Open>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether another connection may be served, once the oldest that has not asked anything
    /// yet is closed if all `max` are open.
    fn make_room(&self, max: usize) -> bool {
        let mut open = self.lock();
        if open.len() < max {
            return true;
        }
        match open.iter().position(|o| !o.asked.load(Ordering::SeqCst)) {
            Some(idle) => {
                if let Some(idle) = open.remove(idle) {
                    idle.task.abort();
                }
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, app: Router) {
    serve_at_most(listener, app, connections_allowed()).await
}

/// [`MAX_CONNECTIONS`], or a quarter of the open files the process may have if less.
fn connections_allowed() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given, nothing else.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let quarter = usize::try_from(limit.rlim_cur / 4).unwrap_or(usize::MAX);
    if known {
        MAX_CONNECTIONS.min(quarter).max(8)
    } else {
        MAX_CONNECTIONS
    }
}

async fn serve_at_most(listener: TcpListener, app: Router, max: usize) {
    let served = Served::default();
    for id in 0u64.. {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "the probe port cannot accept a connection");
                tokio::time::sleep(AFTER_FAILED_ACCEPT).await;
                continue;
            }
        };
        // Dropped at once when every connection is being answered: the peer sees it closed.
        if !served.make_room(max) {
            continue;
        }
        let asked = Arc::new(AtomicBool::new(false));
        let noted = asked.clone();
        let app = app.clone().map_request(move |request| {
            noted.store(true, Ordering::SeqCst);
            request
        });
        let service = TowerToHyperService::new(app);
        // Held while the task is spawned and listed: its removal at its end waits for both.
        let mut open = served.lock();
        let done = served.clone();
        let task = tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_WITHIN)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // A connection cut short, by its peer or the limits, is the peer's business.
            let _ = tokio::time::timeout(SERVED_WITHIN, connection).await;
            done.lock().retain(|o| o.id != id);
        });
        let task = task.abort_handle();
        open.push_back(Open { id, asked, task });
    }
}

/// Binds the port at `addr`. The IPv6 wildcard (`[::]`, the controller's default) takes IPv4
/// connections too, whatever the host's `bindv6only` says: a pod's probes and scrapes come to
/// its address, which is IPv6 on an IPv6-only cluster and IPv4 on most others. Where the
/// kernel has no IPv6 at all, it falls back to the IPv4 wildcard.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bound = bind_exactly(addr);
    match (&bound, addr.ip()) {
        (Err(err), IpAddr::V6(ip)) if ip.is_unspecified() && no_ipv6(err) => {
            tracing::info!(%addr, "no IPv6 on this host: listening on IPv4 only");
            bind_exactly(SocketAddr::from(([0, 0, 0, 0], addr.port())))
        }
        _ => bound,
    }
}

/// The errors of a host without IPv6: none in the kernel, or none on any interface.
fn no_ipv6(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

fn bind_exactly(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // As std's and tokio's bind: a restarted process is not kept off its port by the last
    // one's connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn port(max: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(serve_at_most(listener, app, max));
        addr
    }

    /// Reads until the server closes the connection; fails if it keeps it for `within`.
    async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
        let mut read = Vec::new();
        let closed = tokio::time::timeout(within, stream.read_to_end(&mut read));
        closed
            .await
            .expect("the server keeps the connection")
            .unwrap();
        String::from_utf8_lossy(&read).into_owned()
    }

    async fn probe(addr: std::net::SocketAddr) -> String {
        let mut probe = TcpStream::connect(addr).await.unwrap();
        let request = "GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
        probe.write_all(request.as_bytes()).await.unwrap();
        read_to_close(&mut probe, SERVED_WITHIN).await
    }

    /// The IPv6 wildcard serves IPv4 and IPv6 clients alike (IPv4 alone on a host without
    /// IPv6, where it falls back).
    #[tokio::test]
    async fn the_ipv6_wildcard_serves_both_families() {
        let listener = bind("[::]:0".parse().unwrap()).unwrap();
        let bound = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(serve_at_most(listener, app, MAX_CONNECTIONS));
        let clients: &[&str] = match bound.is_ipv6() {
            true => &["127.0.0.1", "::1"],
            false => &["127.0.0.1"],
        };
        for client in clients {
            let addr = SocketAddr::new(client.parse().unwrap(), bound.port());
            assert!(probe(addr).await.ends_with("ok\n"), "through {client}");
        }
    }

    /// Closed for want of a request head, well before the limit on a whole connection.
    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed() {
        let addr = port(MAX_CONNECTIONS).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let within = HEAD_WITHIN + (SERVED_WITHIN - HEAD_WITHIN) / 2;
        assert_eq!(read_to_close(&mut idle, within).await, "");
    }

    #[tokio::test]
    async fn a_probe_is_answered_while_idle_connections_fill_the_port() {
        let max = 4;
        let addr = port(max).await;
        let mut idle = Vec::new();
        for _ in 0..max {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answer = probe(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        // The oldest idle connection made room for it.
        let oldest = read_to_close(&mut idle[0], HEAD_WITHIN / 2).await;
        assert_eq!(oldest, "");
    }
}
