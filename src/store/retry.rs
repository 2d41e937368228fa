//! Bounded retries with jittered exponential backoff, for optimistic concurrency.

use std::time::Duration;

use backon::ExponentialBuilder;
use rand::Rng;

/// The pauses of a loop that keeps trying for as long as it runs (a watch followed again, a
/// periodic pass after a failure): from `min`, doubling up to `max`, without end. The caller
/// builds it afresh after a success.
pub fn growing_pauses(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .without_max_times()
}

/// How often and how patiently to retry a conflicting write.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 30,
            base: Duration::from_millis(5),
            max: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// These retries as backon's pacing of a call retried as it is: at most `attempts` more,
    /// from `base` doubling up to `max`, each pause jittered.
    pub fn pacing(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_max_delay(self.max)
            .with_max_times(self.attempts as usize)
            .with_jitter()
    }

    /// The pause before attempt `attempt` (1-based for the first retry): a random duration
    /// between zero and the exponential ceiling ("full jitter"), so contenders spread out.
    /// The loops of conflicting writes pace themselves with it: each of their rounds reads and
    /// decides again, and counts its own attempts, which a retry of one call does not fit.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}
