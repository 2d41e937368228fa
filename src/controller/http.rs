//! `/metrics` (Prometheus text) and `/healthz`, over plain HTTP/1.1: one request per
//! connection, nothing else served.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A batch of store work taking longer than this marks the controller unhealthy.
const STUCK_AFTER: Duration = Duration::from_secs(600);

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

use super::metrics::Metrics;
use super::worker::Job;

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, jobs: Arc<Mutex<Sender<Job>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(30), answer(stream, metrics, jobs)).await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    metrics: Arc<Metrics>,
    jobs: Arc<Mutex<Sender<Job>>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET", "/healthz") => {
            // Healthy while the store's worker exists and no batch has kept it busy for long
            // (a store that never answers): then a restart is the cure.
            let alive = jobs
                .lock()
                .map(|j| j.send(Job::Ping).is_ok())
                .unwrap_or(false);
            let busy = metrics.busy_since.load(Ordering::SeqCst);
            let stuck = busy != 0 && now_secs().saturating_sub(busy) > STUCK_AFTER.as_secs();
            if alive && !stuck {
                (200, "text/plain", "ok\n".to_string())
            } else {
                (
                    503,
                    "text/plain",
                    "the store worker is not taking work\n".to_string(),
                )
            }
        }
        ("GET", "/metrics") => {
            let (tx, rx) = oneshot::channel();
            let sent = jobs
                .lock()
                .map(|j| j.send(Job::Stats(tx)).is_ok())
                .unwrap_or(false);
            if sent {
                // Fresh pool figures when the store answers soon, else the last ones known.
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
            (200, "text/plain; version=0.0.4", metrics.render())
        }
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
