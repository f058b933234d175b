//! A circuit breaker for one remote tier of one worker: after repeated failures the
//! tier is skipped for a cool-off, then one probe is let through; its answer closes
//! or re-opens the breaker.
//!
//! Plain state and arithmetic on a clock the caller passes in: no host calls, no
//! counters (the caller counts the [`Transition`]s it is given).

/// Consecutive failures after which a tier's breaker opens.
pub const BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker skips its tier before letting one probe through. Short
/// enough that a tier that came back is used again within seconds even if the first
/// probe still failed; a probe every 3 s per worker costs nothing.
pub const BREAKER_COOL_OFF_MS: u64 = 3_000;

/// A circuit breaker for one remote tier.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Breaker {
    failures: u32,
    /// 0 = closed; otherwise the tier is skipped until then.
    open_until_ms: u64,
    /// One probe is in flight after the cool-off.
    probing: bool,
    /// A probe whose answer never came (its request went away and the SDK dropped
    /// the answer) stops counting as in flight at this instant.
    probe_deadline_ms: u64,
}

/// What a breaker did, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It opened (or re-opened after a failed probe).
    Opened,
    /// It closed after a successful call.
    Closed,
}

impl Breaker {
    /// Whether a call may go to the tier now. After the cool-off exactly one call (the
    /// probe) is let through until it reports back.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        if self.open_until_ms == 0 {
            return true;
        }
        if self.probing && now_ms >= self.probe_deadline_ms {
            self.probing = false;
        }
        if now_ms < self.open_until_ms || self.probing {
            return false;
        }
        self.probing = true;
        self.probe_deadline_ms = now_ms.saturating_add(BREAKER_COOL_OFF_MS);
        true
    }

    /// The tier answered.
    pub fn success(&mut self) -> Option<Transition> {
        self.failures = 0;
        self.probing = false;
        if self.open_until_ms != 0 {
            self.open_until_ms = 0;
            return Some(Transition::Closed);
        }
        None
    }

    /// The tier failed or timed out.
    pub fn failure(&mut self, now_ms: u64) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        let reopen = self.probing;
        self.probing = false;
        if reopen || (self.open_until_ms == 0 && self.failures >= BREAKER_THRESHOLD) {
            self.open_until_ms = now_ms.saturating_add(BREAKER_COOL_OFF_MS);
            return Some(Transition::Opened);
        }
        None
    }

    /// Whether the breaker is open (skipping its tier).
    pub fn is_open(&self) -> bool {
        self.open_until_ms != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_repeated_failures_and_probes_after_the_cool_off() {
        let mut b = Breaker::default();
        for _ in 0..BREAKER_THRESHOLD - 1 {
            assert!(b.allow(0));
            assert_eq!(b.failure(0), None);
        }
        assert_eq!(b.failure(100), Some(Transition::Opened));
        assert!(b.is_open());
        assert!(
            !b.allow(100 + BREAKER_COOL_OFF_MS - 1),
            "skipped while cooling off"
        );
        assert!(b.allow(100 + BREAKER_COOL_OFF_MS), "one probe");
        assert!(
            !b.allow(100 + BREAKER_COOL_OFF_MS),
            "only one probe at a time"
        );
        assert_eq!(
            b.failure(6000),
            Some(Transition::Opened),
            "failed probe re-opens"
        );
        assert!(!b.allow(6001));
        assert!(b.allow(6000 + BREAKER_COOL_OFF_MS));
        assert_eq!(b.success(), Some(Transition::Closed));
        assert!(!b.is_open());
        assert!(b.allow(0));
        assert_eq!(b.success(), None);
    }

    #[test]
    fn a_probe_that_never_reports_back_does_not_wedge_the_breaker() {
        let mut b = Breaker::default();
        for _ in 0..BREAKER_THRESHOLD {
            b.failure(0);
        }
        assert!(b.allow(BREAKER_COOL_OFF_MS), "the probe");
        // Its request went away; neither success() nor failure() ever runs.
        assert!(!b.allow(BREAKER_COOL_OFF_MS + 1));
        assert!(
            b.allow(2 * BREAKER_COOL_OFF_MS),
            "a new probe once the lost one expired"
        );
        assert_eq!(b.success(), Some(Transition::Closed));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut b = Breaker::default();
        for _ in 0..BREAKER_THRESHOLD - 1 {
            assert_eq!(b.failure(0), None);
        }
        assert_eq!(b.success(), None, "it never opened");
        // Without the reset, the first of these would be failure number THRESHOLD.
        for _ in 0..BREAKER_THRESHOLD - 1 {
            assert_eq!(b.failure(0), None);
            assert!(!b.is_open(), "failures before a success do not count");
        }
        assert_eq!(b.failure(0), Some(Transition::Opened));
    }
}
