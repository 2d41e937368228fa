//! Time limits and retry bounds of the Kubernetes engine.

use std::time::Duration;

use crate::store::retry::Backoff;

/// Overrides the per-request timeout, in seconds (decimals allowed). Every other limit follows
/// from it, so one knob serves both slow clusters and fast tests.
pub const TIMEOUT_ENV: &str = "WHEREABOUTS_KUBERNETES_TIMEOUT";

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Settings {
    /// The longest one API request may take (connect, write and read each, and in total).
    pub request_timeout: Duration,
    /// The longest a whole operation (one ADD, DEL, ...) may take, retries included. Kept well
    /// under the two minutes a runtime usually grants an ADD.
    pub deadline: Duration,
    /// How long undoing a failed ADD may take once the deadline has passed.
    pub undo_budget: Duration,
    /// Retries of compare-and-swap conflicts on one object.
    pub conflicts: Backoff,
    /// Retries of transient failures (unreachable, 5xx) of one request.
    pub transient: Backoff,
    /// How long one request may wait in all for a server that sheds it (429), as the server
    /// asks: half the deadline, as the server's waits grow to many seconds while it keeps
    /// shedding (up to 32 s under API Priority and Fairness).
    pub throttled_wait: Duration,
}

impl Default for Settings {
    /// The default request timeout's settings, whatever the environment says.
    fn default() -> Settings {
        Settings::with_request_timeout(DEFAULT_REQUEST_TIMEOUT)
    }
}

impl Settings {
    pub fn from_env() -> Settings {
        let request_timeout = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs < 3600.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        Settings::with_request_timeout(request_timeout)
    }

    /// How long one operation may take, its undo included.
    pub fn operation_bound(&self) -> Duration {
        self.deadline + self.undo_budget
    }

    pub fn with_request_timeout(request_timeout: Duration) -> Settings {
        Settings {
            request_timeout,
            deadline: request_timeout * 6,
            throttled_wait: request_timeout * 3,
            undo_budget: request_timeout,
            // Contention on one pool object is resolved by spreading the contenders in time: the
            // ceiling grows quickly enough for hundreds of writers to one pool to get through.
            // The operation's deadline bounds the retries: on a real API server a round of read
            // and write under a burst takes long enough that a count would give up first.
            conflicts: Backoff {
                attempts: 100_000,
                base: Duration::from_millis(6),
                max: Duration::from_millis(400),
            },
            transient: Backoff {
                attempts: 3,
                base: Duration::from_millis(50),
                max: Duration::from_millis(400),
            },
        }
    }
}
