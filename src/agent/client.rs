//! The plugin's side of the socket: one request to the node's agent, or the reason no agent
//! served it (then the plugin does the work itself).

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NotServed(format!("cannot start the I/O runtime: {e}")))?;
    let answer =
        runtime.block_on(async { tokio::time::timeout(timeout, post(socket, path, bytes)).await });
    let (ok, bytes) = match answer {
        Ok(answer) => answer?,
        Err(_) => {
            return Ok(Err(StoreError::try_again(format!(
                "the whereabouts agent at {} did not answer within {timeout:?}",
                socket.display()
            ))))
        }
    };
    if ok {
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

/// One HTTP/1.1 request on a fresh connection (the plugin makes one per process).
async fn post(socket: &Path, path: &str, body: Vec<u8>) -> Result<(bool, Bytes), NotServed> {
    let lost = |what: &str, err: &dyn std::fmt::Display| NotServed(format!("{what}: {err}"));
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| lost(&format!("cannot connect to {}", socket.display()), &e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| lost("handshake", &e))?;
    tokio::spawn(connection);
    let request = hyper::Request::post(path)
        .header(header::HOST, "whereabouts-agent")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| lost("request", &e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| lost("the agent went away", &e))?;
    let ok = response.status().is_success();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| lost("the agent went away", &e))?
        .to_bytes();
    Ok((ok, bytes))
}
