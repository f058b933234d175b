//! State one worker VM shares between its requests: fills in flight (so concurrent
//! misses for one agent make one fill), answers waiting to be picked up by the
//! requests that took part in a fill, and the circuit breakers of the two remote tiers.
//!
//! A worker VM runs on one Envoy thread, so this state needs no locking; it is owned
//! by the root context and lent to each callback. It is never shared across workers
//! (that is what L1 shared data is for).

use std::collections::{HashMap, HashSet};

use crate::agent::AgentId;
use crate::inject::Format;

/// Consecutive failures after which a tier's breaker opens.
pub const BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker skips its tier before letting one probe through. Short
/// enough that a tier that came back is used again within seconds even if the first
/// probe still failed; a probe every 3 s per worker costs nothing.
pub const BREAKER_COOL_OFF_MS: u64 = 3_000;

/// The remote tier a callout goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// L2: Redis behind its HTTP front.
    Redis,
    /// L3: the companion store.
    Store,
}

/// How much of its body a request had delivered when it last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySeen {
    /// Nothing yet.
    NotYet,
    /// Some, not the end.
    Partial,
    /// All of it, this many bytes (buffered, headers still held).
    Complete(usize),
}

/// A request waiting for a fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// Its context id.
    pub id: u32,
    /// Where its directive goes.
    pub format: Format,
    /// How much of its body it has.
    pub body: BodySeen,
}

/// An expired entry kept in case L2 and L3 both fail.
#[derive(Clone)]
pub struct Stale {
    /// The escaped directive, or `None` for "no directive".
    pub escaped: Option<String>,
    /// Usable until this instant (ms).
    pub usable_until_ms: u64,
}

impl std::fmt::Debug for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stale")
            .field("present", &self.escaped.is_some())
            .field("usable_until_ms", &self.usable_until_ms)
            .finish()
    }
}

/// Identifies a fill on its worker.
pub type FillId = u64;

/// One resolution of one agent in flight on this worker.
#[derive(Debug)]
pub struct Fill {
    /// The agent.
    pub agent: AgentId,
    /// Its L1 key.
    pub key: String,
    /// The tier asked now.
    pub tier: Tier,
    /// Token of the callout in flight.
    pub token: u32,
    /// CAS version of the L1 key when the fill started (see `flow`).
    pub cas: Option<u32>,
    /// Global generation when the fill started.
    pub generation: u64,
    /// Expired entry to fall back on.
    pub stale: Option<Stale>,
    /// Requests waiting for the answer, the one that started the fill included.
    pub participants: Vec<Participant>,
    /// The context whose callout answers arrive (Envoy routes an answer to the
    /// context that dispatched it). `None` once that context is gone: the answer
    /// will be dropped, and the root context asks again on its next tick.
    pub owner: Option<u32>,
}

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

    /// Whether the breaker is open (skipping its tier) at `now_ms`.
    pub fn is_open(&self) -> bool {
        self.open_until_ms != 0
    }
}

/// Per-worker shared state.
#[derive(Debug, Default)]
pub struct Worker {
    /// Fills in flight.
    pub fills: HashMap<FillId, Fill>,
    /// The fill of each L1 key that new requests may still join. A fill stops being
    /// joinable when an invalidation overtakes it: requests that arrive after an
    /// invalidation start a fill of their own instead of sharing an old answer.
    pub joinable: HashMap<String, FillId>,
    /// Which fill a callout token belongs to.
    pub tokens: HashMap<u32, FillId>,
    next_fill: FillId,
    /// L2 write-backs waiting for the root context to send them. The root sends
    /// them (on its tick) so that their answers come back to a context that lives
    /// as long as the VM and are always counted.
    pub pending_writes: Vec<crate::tiers::Callout>,
    /// Tokens of L2 write-backs in flight, to count how they end.
    pub writes: HashSet<u32>,
    /// Outcomes of finished fills, waiting for their participants' next callback.
    pub ready: HashMap<u32, crate::flow::Ready>,
    /// L2 breaker.
    pub redis: Breaker,
    /// L3 breaker.
    pub store: Breaker,
}

impl Worker {
    /// The breaker of `tier`.
    pub fn breaker(&mut self, tier: Tier) -> &mut Breaker {
        match tier {
            Tier::Redis => &mut self.redis,
            Tier::Store => &mut self.store,
        }
    }

    /// Registers a new fill, joinable for its key, and returns its id.
    pub fn add_fill(&mut self, fill: Fill) -> FillId {
        self.next_fill = self.next_fill.wrapping_add(1);
        let id = self.next_fill;
        self.joinable.insert(fill.key.clone(), id);
        self.fills.insert(id, fill);
        id
    }

    /// Takes a fill out (it finished, or it is being asked again).
    pub fn take_fill(&mut self, id: FillId) -> Option<Fill> {
        let fill = self.fills.remove(&id)?;
        self.tokens.remove(&fill.token);
        if self.joinable.get(&fill.key) == Some(&id) {
            self.joinable.remove(&fill.key);
        }
        Some(fill)
    }

    /// Puts a fill back under the same id with its new callout token.
    pub fn put_fill(&mut self, id: FillId, fill: Fill, joinable: bool) {
        self.tokens.insert(fill.token, id);
        if joinable {
            self.joinable.insert(fill.key.clone(), id);
        }
        self.fills.insert(id, fill);
    }

    /// A request is gone (finished or the client went away): forget it everywhere so
    /// that no fill waits on it or tries to resume it.
    pub fn forget(&mut self, id: u32) {
        self.ready.remove(&id);
        let mut emptied = Vec::new();
        for (fill_id, fill) in self.fills.iter_mut() {
            fill.participants.retain(|p| p.id != id);
            if fill.owner == Some(id) {
                fill.owner = None;
            }
            if fill.participants.is_empty() && fill.owner.is_none() {
                emptied.push(*fill_id);
            }
        }
        for fill_id in emptied {
            self.take_fill(fill_id);
        }
    }

    /// Fills whose callout answer will never arrive (their owner is gone) but that
    /// still have participants: the root context asks again for them.
    pub fn orphans(&self) -> Vec<FillId> {
        self.fills
            .iter()
            .filter(|(_, f)| f.owner.is_none() && !f.participants.is_empty())
            .map(|(id, _)| *id)
            .collect()
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
        for _ in 0..10 {
            for _ in 0..BREAKER_THRESHOLD - 1 {
                b.failure(0);
            }
            b.success();
        }
        assert!(!b.is_open());
    }
}
