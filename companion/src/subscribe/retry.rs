//! Retrying one invalidation target (a Redis command or a control POST): the
//! backoff policy and the loop that applies it, with a deadline after which the
//! target is given up on.
//!
//! It logs only the target's name (a URL or a kind of Redis command) and the
//! reason of a failure, which never quote directive text or the control token.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Backoff for one invalidation target.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// First delay after a failed attempt.
    pub initial: Duration,
    /// Upper bound of the doubling delay.
    pub max: Duration,
    /// Give up (and count a failure) once this much time has passed.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Delay after `attempt` failures (1-based), doubling from `initial`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Outcome of one failed attempt at a target.
pub(super) enum Attempt {
    /// Worth retrying (timeout, refused, 5xx, 429).
    Transient(String),
    /// Retrying cannot help (401, 403, 404): give up now.
    Permanent(String),
}

/// Retries `op` per `policy`; true on success. `what` names the target in logs
/// (a URL or key kind, never content or token).
pub(super) async fn with_retry<F, Fut>(policy: RetryPolicy, what: &str, mut op: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Attempt>>,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let reason = match op().await {
            Ok(()) => return true,
            Err(Attempt::Permanent(reason)) => {
                tracing::warn!(
                    target_name = what,
                    attempts = attempt,
                    reason,
                    "invalidation refused, not retrying"
                );
                return false;
            }
            Err(Attempt::Transient(reason)) => reason,
        };
        let delay = policy.delay(attempt);
        if started.elapsed() + delay > policy.deadline {
            tracing::warn!(
                target_name = what,
                attempts = attempt,
                reason,
                "invalidation failed, giving up"
            );
            return false;
        }
        tracing::debug!(
            target_name = what,
            attempt,
            reason,
            delay_ms = delay.as_millis() as u64,
            "retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(10));
        assert_eq!(p.delay(2), Duration::from_millis(20));
        assert_eq!(p.delay(7), Duration::from_millis(640));
        assert_eq!(p.delay(8), Duration::from_secs(1));
        assert_eq!(p.delay(200), Duration::from_secs(1));
    }
}
