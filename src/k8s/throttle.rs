//! The API server's "retry after" of a throttled request, kept for the caller.
//!
//! An API server sheds a request over its flow's share (API Priority and Fairness) or over its
//! in-flight limits before handling it: 429 with a `Retry-After` header (1 to 32 seconds, growing
//! while it keeps shedding) and a plain-text body. The client library makes an error of that
//! answer without the header. [`keep_retry_after`], outermost in every client's stack (a
//! `tower` "and then" layer), makes the error itself: the server's status with the header's
//! seconds in its details (`StatusDetails.retryAfterSeconds`), where a JSON answer of the same
//! kind carries them.

use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use kube::core::response::StatusDetails;
use kube::core::Status;
use tower::BoxError;

/// Any answer but a 429 with a `Retry-After` passes unchanged; that one becomes the client's
/// API error, with the seconds the server asked for.
pub async fn keep_retry_after<B>(response: Response<B>) -> Result<Response<B>, BoxError>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    if response.status() != StatusCode::TOO_MANY_REQUESTS {
        return Ok(response);
    }
    let Some(seconds) = retry_after_seconds(response.headers()) else {
        return Ok(response);
    };
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes();
    Err(Box::new(kube::Error::Api(
        shed_status(&body, seconds).boxed(),
    )))
}

/// The server's status for a 429 answer: its own when the body is one (JSON), else one made of
/// the body's text; its details carry `seconds` unless they name a wait already.
fn shed_status(body: &[u8], seconds: u32) -> Status {
    let mut status = serde_json::from_slice::<Status>(body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(body);
        Status::failure(text.trim(), "TooManyRequests").with_code(429)
    });
    let details = status.details.get_or_insert_with(|| StatusDetails {
        name: String::new(),
        group: String::new(),
        kind: String::new(),
        uid: String::new(),
        causes: Vec::new(),
        retry_after_seconds: 0,
    });
    if details.retry_after_seconds == 0 {
        details.retry_after_seconds = seconds;
    }
    status
}

/// The `Retry-After` header as whole seconds (the form the API server sends; an HTTP date is
/// not one it uses).
fn retry_after_seconds(headers: &HeaderMap) -> Option<u32> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse().ok()
}

/// The wait a throttled request's error asks for, if the server named one.
pub fn asked_wait(status: &Status) -> Option<Duration> {
    let seconds = status.details.as_ref()?.retry_after_seconds;
    (seconds > 0).then(|| Duration::from_secs(seconds.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_text_answer_becomes_a_status_with_the_servers_wait() {
        let status = shed_status(b"Too many requests, please try again later.\n", 3);
        assert_eq!(status.code, 429);
        assert_eq!(status.message, "Too many requests, please try again later.");
        assert_eq!(asked_wait(&status), Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_json_status_keeps_its_message_and_its_own_wait() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":429,
            "reason":"TooManyRequests","message":"slow down","details":{"retryAfterSeconds":7}}"#;
        let status = shed_status(body, 1);
        assert_eq!(status.message, "slow down");
        assert_eq!(asked_wait(&status), Some(Duration::from_secs(7)));
    }

    #[test]
    fn only_whole_seconds_are_read_from_the_header() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, " 2 ".parse().unwrap());
        assert_eq!(retry_after_seconds(&headers), Some(2));
        headers.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after_seconds(&headers), None);
    }
}
