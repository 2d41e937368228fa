//! The TCP port of `/metrics`, `/healthz` and `/readyz`, for the agent and the controller.
//!
//! Whoever reaches the port (any process on the host: the agent runs on the host's network)
//! can connect, so a connection gets a few seconds for its request head and for its answer,
//! one request each, and only so many connections are served at once. `axum::serve` keeps an
//! idle connection for as long as its peer likes, so this serves with hyper's own builder.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once; more are closed as they come. A probe or a scrape takes one.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a connection has to send its request head.
pub const HEAD_WITHIN: Duration = Duration::from_secs(5);

/// How long a connection is served at most, its answer included.
const SERVED_WITHIN: Duration = Duration::from_secs(30);

/// After a failed accept (out of file descriptors, most likely), how long to wait before the
/// next: the failure would otherwise repeat at once, in a loop that takes a core.
const AFTER_FAILED_ACCEPT: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "the probe port cannot accept a connection");
                tokio::time::sleep(AFTER_FAILED_ACCEPT).await;
                continue;
            }
        };
        // Dropped at once: the peer sees its connection closed.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_WITHIN)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // A connection cut short, by its peer or the limits, is the peer's business.
            let _ = tokio::time::timeout(SERVED_WITHIN, connection).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn port() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(serve(listener, app));
        addr
    }

    /// Reads until the server closes the connection; fails if it does not within a minute
    /// (longer than any of the limits).
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut read = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut read));
        closed
            .await
            .expect("the server keeps the connection")
            .unwrap();
        String::from_utf8_lossy(&read).into_owned()
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed() {
        let addr = port().await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_to_close(&mut idle).await, "");
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_limit_are_closed_and_probes_still_answered() {
        let addr = port().await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut beyond = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_to_close(&mut beyond).await, "");
        // Once the idle ones are closed, a probe gets its answer again, and the connection ends.
        for stream in &mut idle {
            read_to_close(stream).await;
        }
        let mut probe = TcpStream::connect(addr).await.unwrap();
        let request = "GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
        probe.write_all(request.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut probe).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
    }
}
