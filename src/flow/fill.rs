//! The resolution flow: how one agent's directive is found when L1 has nothing fresh.
//!
//! A request that misses L1 joins the agent's fill in flight on this worker if
//! nothing invalidated the agent since that fill started, or starts one. A fill is
//! driven through [`Step`]s:
//!
//! ```text
//!            ┌─ breaker open / dispatch failed ─┐  ┌─ breaker open / dispatch failed ─┐
//!            │                                  ▼  │                                  ▼
//! Ask(Redis) ─ callout ─► answer: hit/none ─► Done │                              Unknowable
//!                         answer: no key/error ─► Ask(Store) ─ callout ─► answer ─► Done
//!                                                                          error ─► Unknowable
//! Unknowable ─► Done(stale, if still inside its window | 503 closed | forward open)
//! ```
//!
//! **Gateway keys** (`agent.source = "api_key"`) are fills of another [`Subject`],
//! through the same steps, with three differences, all because anyone can present
//! any key:
//! - a key L1 has no entry for is first looked up *provisionally*: unanchored, so
//!   a made-up key leaves nothing in shared data (which cannot be deleted). When
//!   that look names an agent, the fill is anchored and asks the same tier again
//!   (`Confirm`), and only the second answer is cached and served; a key L1 has an
//!   entry for (expired, or a tombstone) is anchored on it and looked up once;
//! - "no such key" is never written to L1: the worker remembers it (bounded) and
//!   Redis keeps it for the negative TTL;
//! - no stale answer and no fail-open: an unknowable key is 503.
//!
//! A key's answer moves its requests on to their agent's directive (`finish`),
//! from the context the callback runs in.
//!
//! While a callout is in flight the fill is registered with the worker under its
//! token; its answer takes it out again and moves it on. An answer from L2 or L3 is
//! written to L1 under the fill's anchor; an L3 answer that L1 accepted is queued as
//! an L2 write-back (an overtaken fill must not put its old answer back into Redis).
//! `Done` hands the outcome to every participant (`deliver`).
//!
//! Logs name agents and tiers only, never directive text.

use super::deliver::{self, Outcome, Source};
use super::l1::{self, Lookup};
use super::{settled, Action, Ctx, State};
use crate::breaker::Transition;
use crate::config::FailureMode;
use crate::entry::{self, Known};
use crate::escape::escape_json_str;
use crate::host::Host;
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::tiers::{self, Answer, KeyAnswer, Response, WriteOutcome};
use crate::worker::{BodySeen, Delivered, Fill, FillId, Participant, Subject, Then, Ticket, Tier};
use ibex_wire::Redacted;
use std::rc::Rc;

/// Where a fill's resolution stands.
enum Step {
    /// Ask this tier (if its breaker lets the call through).
    Ask(Tier),
    /// L2 and L3 both failed.
    Unknowable,
    /// A provisional key fill's answer named an agent: anchor it and ask this tier
    /// (the one that answered) again.
    Confirm(Tier),
    /// The outcome is decided; `Source` is who decided it.
    Done(Outcome, Source),
}

/// Where a fill is after it was driven as far as it goes now.
enum Progress {
    /// A callout is in flight; the fill is registered under this id.
    InFlight(FillId),
    /// The fill finished; what it did for the current context, if that took part.
    Finished(Option<(Delivered, Action)>),
}

/// A request admitted for `subject` (its agent's directive, or its key's agent):
/// served from L1, or it waits for a fill.
pub(super) fn resolve<H: Host>(subject: Subject, then: Then, ctx: &Ctx<'_, H>) -> (State, Action) {
    let me = Participant {
        id: ctx.id,
        then,
        body: BodySeen::NotYet,
    };
    settled(
        resolve_for(subject, vec![me], ctx)
            .unwrap_or_else(|| deliver::refuse(Refusal::DirectiveUnavailable, ctx)),
    )
}

/// Resolves `subject` for requests that wait for nothing else (one request from its
/// headers, or every request whose key's agent just became known): answered from
/// L1, joined to the fill in flight, or a new fill started from the current
/// context. Returns what it did for the current context, if that is one of them;
/// the others find theirs with the worker.
fn resolve_for<H: Host>(
    subject: Subject,
    participants: Vec<Participant>,
    ctx: &Ctx<'_, H>,
) -> Option<(Delivered, Action)> {
    let host = ctx.host;
    let counters = Counters::of(&subject);
    if let Subject::Directive(agent) = &subject {
        let mut worker = ctx.worker.borrow_mut();
        for p in &participants {
            worker.audit(p.id).record.agent = Some(*agent);
        }
    }
    let key = match &subject {
        Subject::Directive(agent) => entry::key_for(agent),
        Subject::Key(hash) => entry::key_for_api_key(hash),
    };
    let stale_window_ms = ctx.config.stale_if_error_seconds.saturating_mul(1000);
    let copy_bytes = ctx.config.worker_copy_bytes;
    let (found, stale) = match l1::lookup(host, ctx.worker, &key, stale_window_ms, copy_bytes) {
        Lookup::Fresh(known) => {
            for _ in &participants {
                host.count(counters.l1_hit);
            }
            return finish(
                &subject,
                participants,
                Outcome::Known(known),
                Source::Local,
                ctx,
            );
        }
        Lookup::Miss { anchor, stale } => (anchor, stale),
    };
    // A key is an identity: no stale answer for it (a key revoked while the
    // subscriber was away must not be served for the stale window), and keys
    // nobody issued are remembered by this worker, not in shared data. A key L1
    // has never seen is looked up without an anchor (which would be a new
    // shared-data entry, for ever); a key it has an entry for (expired, or a
    // tombstone) is anchored on that entry, which costs nothing.
    let (stale, provisional) = match &subject {
        Subject::Directive(_) => (stale, false),
        Subject::Key(hash) => {
            let unknown = ctx
                .worker
                .borrow()
                .is_unknown_key(hash, host.now_ms(), found.generation);
            if unknown {
                for _ in &participants {
                    host.count(counters.l1_hit);
                }
                let outcome = Outcome::Known(Known::NoAgent);
                return finish(&subject, participants, outcome, Source::Local, ctx);
            }
            (None, found.cas.is_none())
        }
    };
    let mut own = None;
    let mut starting = Vec::new();
    for p in participants {
        host.count(counters.l1_miss);
        let id = p.id;
        // A request that arrives after an invalidation must not be answered with
        // what was read before it: `join` checks the fill's anchor against what we
        // found.
        // Bound first: a borrow in the scrutinee would live through the arms, and
        // `waits` borrows the worker again for a participant that is not the
        // current context (a panic, and the worker's VM with it).
        let joined = ctx.worker.borrow_mut().join(&key, &found, p);
        match joined {
            Ok(fill) => {
                host.count(Counter::Coalesced);
                waits(id, fill, &mut own, ctx);
            }
            Err(p) => starting.push(p),
        }
    }
    if starting.is_empty() {
        return own;
    }
    let ids: Vec<u32> = starting.iter().map(|p| p.id).collect();
    // A provisional fill writes nothing to L1, not even the placeholder that
    // anchors a fill: it is anchored once its answer names an agent (`Confirm`).
    let anchor = if provisional {
        found
    } else {
        l1::anchor(host, &key, found)
    };
    let fill = Fill {
        subject,
        anchor,
        key,
        stale,
        provisional,
        confirming: false,
        participants: starting,
    };
    match drive(fill, None, Step::Ask(Tier::Redis), ctx) {
        Progress::InFlight(fill) => {
            for id in ids {
                waits(id, fill, &mut own, ctx);
            }
            own
        }
        Progress::Finished(mine) => own.or(mine),
    }
}

/// Request `id` now waits for `fill`: the current context by its state, any other
/// by what the worker keeps for its next callback.
fn waits<H: Host>(id: u32, fill: FillId, own: &mut Option<(Delivered, Action)>, ctx: &Ctx<'_, H>) {
    if id == ctx.id {
        *own = Some((Delivered::Waiting(fill), Action::Pause));
    } else {
        ctx.worker
            .borrow_mut()
            .deliver(id, Delivered::Waiting(fill));
    }
}

/// The counters of one subject's lookups: directive lookups and key lookups are
/// counted apart, so each keeps its meaning. Errors, skips and breakers are the
/// tier's and shared.
struct Counters {
    l1_hit: Counter,
    l1_miss: Counter,
    l2_hit: Counter,
    l2_miss: Counter,
    l3_hit: Counter,
    l3_none: Counter,
}

impl Counters {
    fn of(subject: &Subject) -> Counters {
        match subject {
            Subject::Directive(_) => Counters {
                l1_hit: Counter::L1Hit,
                l1_miss: Counter::L1Miss,
                l2_hit: Counter::L2Hit,
                l2_miss: Counter::L2Miss,
                l3_hit: Counter::L3Hit,
                l3_none: Counter::L3None,
            },
            Subject::Key(_) => Counters {
                l1_hit: Counter::KeyL1Hit,
                l1_miss: Counter::KeyL1Miss,
                l2_hit: Counter::KeyL2Hit,
                l2_miss: Counter::KeyL2Miss,
                l3_hit: Counter::KeyL3Hit,
                l3_none: Counter::KeyL3None,
            },
        }
    }
}

/// A decided outcome for `subject`, handed to the requests that waited for it. A
/// directive is delivered to each; a key's agent moves the requests that want a
/// directive on to that agent's directive, and settles the others.
fn finish<H: Host>(
    subject: &Subject,
    participants: Vec<Participant>,
    outcome: Outcome,
    source: Source,
    ctx: &Ctx<'_, H>,
) -> Option<(Delivered, Action)> {
    if let Subject::Directive(_) = subject {
        return deliver::complete(participants, outcome, source, ctx);
    }
    let agent = match outcome {
        Outcome::Known(Known::Agent(agent)) => agent,
        // No such key, or (never produced for keys) an answer of the wrong kind.
        Outcome::Known(_) => {
            let refused = Outcome::Refuse(Refusal::InvalidApiKey);
            return deliver::complete(participants, refused, source, ctx);
        }
        // Identity never fails open: the request would reach the provider's key.
        Outcome::FailOpen => {
            let refused = Outcome::Refuse(Refusal::DirectiveUnavailable);
            return deliver::complete(participants, refused, source, ctx);
        }
        Outcome::Refuse(_) => return deliver::complete(participants, outcome, source, ctx),
    };
    let (onward, settled): (Vec<_>, Vec<_>) = participants
        .into_iter()
        .partition(|p| matches!(p.then, Then::Inject(_)));
    {
        let mut worker = ctx.worker.borrow_mut();
        for p in &settled {
            worker.audit(p.id).record.agent = Some(agent);
        }
    }
    // Settled first: `complete` switches contexts and back, and the directive's fill
    // below must be dispatched from the context this callback runs in.
    let own = deliver::complete(settled, Outcome::Known(Known::Agent(agent)), source, ctx);
    if onward.is_empty() {
        return own;
    }
    own.or(resolve_for(Subject::Directive(agent), onward, ctx))
}

/// A callout answered in context `ctx.id`: a write-back's outcome is counted, a
/// fill's answer moves the fill on (its participants, the current context included,
/// find what it did with the worker).
pub(super) fn on_callout<H: Host>(token: u32, response: &Response, ctx: &Ctx<'_, H>) {
    if ctx.worker.borrow_mut().finish_write(token) {
        match tiers::redis_set_outcome(ctx.config.redis.dialect, response) {
            WriteOutcome::Written => {}
            WriteOutcome::Skipped => ctx.host.count(Counter::L2WriteSkipped),
            WriteOutcome::Failed => ctx.host.count(Counter::L2WriteError),
        }
        return;
    }
    let Some((fill, ticket, tier)) = ctx.worker.borrow_mut().take_answered(token) else {
        return;
    };
    let step = match tier {
        Tier::Redis => on_redis_answer(&fill, response, ctx),
        Tier::Store => on_store_answer(&fill, response, ctx),
    };
    if let Progress::Finished(Some((done, _))) = drive(fill, Some(ticket), step, ctx) {
        ctx.worker.borrow_mut().deliver(ctx.id, done);
    }
}

/// Asks `tier` again for a fill whose callout answer was lost (the root context).
pub(super) fn ask_again<H: Host>(fill: Fill, ticket: Ticket, tier: Tier, ctx: &Ctx<'_, H>) {
    log::debug!(
        "ibex_directive: {} fill re-asked for waiting requests",
        fill.subject
    );
    // The root context takes part in no fill, so nothing comes back for it.
    let _ = drive(fill, Some(ticket), Step::Ask(tier), ctx);
}

/// Moves a fill through its steps until a callout is in flight or it is done.
fn drive<H: Host>(
    mut fill: Fill,
    ticket: Option<Ticket>,
    mut step: Step,
    ctx: &Ctx<'_, H>,
) -> Progress {
    loop {
        step = match step {
            Step::Ask(tier) => match dispatch(&fill, tier, ctx) {
                Some(token) => {
                    let mut worker = ctx.worker.borrow_mut();
                    return Progress::InFlight(worker.register(fill, ticket, tier, token, ctx.id));
                }
                None => match tier {
                    Tier::Redis => Step::Ask(Tier::Store),
                    Tier::Store => Step::Unknowable,
                },
            },
            Step::Unknowable => unknowable(&fill, ctx),
            Step::Confirm(tier) => {
                // Anchored now, then asked again: a revocation that landed after the
                // first answer was read either lands after the anchor too (its
                // tombstone changes the CAS version, so the answer is not cached) or
                // before it, and then the tier already says so (the subscriber
                // tombstones Redis before it tells Envoy; Postgres changed before the
                // publish). A Redis answer asked again that is a tombstone or a miss
                // goes on to the store as usual.
                fill.anchor = l1::anchor(ctx.host, &fill.key, l1::found(ctx.host, &fill.key));
                fill.provisional = false;
                fill.confirming = true;
                Step::Ask(tier)
            }
            Step::Done(outcome, source) => {
                let Fill {
                    subject,
                    participants,
                    ..
                } = fill;
                return Progress::Finished(finish(&subject, participants, outcome, source, ctx));
            }
        }
    }
}

/// Sends the fill's callout to `tier` if its breaker lets it through; counts why not.
fn dispatch<H: Host>(fill: &Fill, tier: Tier, ctx: &Ctx<'_, H>) -> Option<u32> {
    let host = ctx.host;
    let (error, skipped) = match tier {
        Tier::Redis => (Counter::L2Error, Counter::L2Skipped),
        Tier::Store => (Counter::L3Error, Counter::L3Skipped),
    };
    if !ctx.worker.borrow_mut().breaker(tier).allow(host.now_ms()) {
        host.count(skipped);
        return None;
    }
    let mut call = match (tier, &fill.subject) {
        (Tier::Redis, Subject::Directive(agent)) => tiers::redis_get(ctx.config, agent),
        (Tier::Store, Subject::Directive(agent)) => tiers::store_get(ctx.config, agent),
        (Tier::Redis, Subject::Key(key)) => tiers::redis_get_key(ctx.config, key),
        (Tier::Store, Subject::Key(key)) => tiers::store_get_key(ctx.config, key),
    };
    call.traceparent = ctx.worker.borrow().traceparent(ctx.id);
    match host.dispatch(&call) {
        Ok(token) => Some(token),
        Err(_) => {
            report(tier, false, ctx);
            host.count(error);
            None
        }
    }
}

/// Tells `tier`'s breaker how a call went, and counts what the breaker did.
fn report<H: Host>(tier: Tier, ok: bool, ctx: &Ctx<'_, H>) {
    let now = ctx.host.now_ms();
    let transition = {
        let mut worker = ctx.worker.borrow_mut();
        let breaker = worker.breaker(tier);
        if ok {
            breaker.success()
        } else {
            breaker.failure(now)
        }
    };
    let counter = match (tier, transition) {
        (_, None) => return,
        (Tier::Redis, Some(Transition::Opened)) => Counter::L2BreakerOpen,
        (Tier::Redis, Some(Transition::Closed)) => Counter::L2BreakerClose,
        (Tier::Store, Some(Transition::Opened)) => Counter::L3BreakerOpen,
        (Tier::Store, Some(Transition::Closed)) => Counter::L3BreakerClose,
    };
    ctx.host.count(counter);
}

fn on_redis_answer<H: Host>(fill: &Fill, response: &Response, ctx: &Ctx<'_, H>) -> Step {
    let (host, config) = (ctx.host, ctx.config);
    let counters = Counters::of(&fill.subject);
    let ttl_ms = |seconds: u64| seconds.saturating_mul(1000);
    // (what Redis said, how long it may be cached here in ms)
    let parsed = match fill.subject {
        Subject::Directive(_) => {
            tiers::parse_redis_get(config.redis.dialect, response).map(|answer| match answer {
                Answer::Directive(text, version) => Some((
                    Known::Directive(
                        Redacted::new(Rc::from(escape_json_str(text.expose()))),
                        version,
                    ),
                    ttl_ms(config.ttl_seconds),
                )),
                Answer::NoDirective => {
                    Some((Known::NoDirective, ttl_ms(config.negative_ttl_seconds)))
                }
                Answer::Unknown => None,
            })
        }
        // A key is cached no longer than Redis keeps it: an entry Redis is about to
        // drop must not start a fresh TTL here (a revocation the subscriber missed
        // would then take up to twice the TTL to arrive).
        Subject::Key(_) => {
            tiers::parse_redis_key_get(config.redis.dialect, response).map(|(answer, left)| {
                let capped =
                    |seconds| left.map_or(ttl_ms(seconds), |left| left.min(ttl_ms(seconds)));
                match answer {
                    KeyAnswer::Agent(agent) => {
                        Some((Known::Agent(agent), capped(config.ttl_seconds)))
                    }
                    KeyAnswer::NoAgent => {
                        Some((Known::NoAgent, capped(config.negative_ttl_seconds)))
                    }
                    KeyAnswer::Unknown => None,
                }
            })
        }
    };
    report(Tier::Redis, parsed.is_ok(), ctx);
    let (known, ttl) = match parsed {
        Ok(Some(found)) => found,
        Ok(None) => {
            count(fill, counters.l2_miss, ctx);
            return Step::Ask(Tier::Store);
        }
        Err(e) => {
            host.count(Counter::L2Error);
            log::debug!("ibex_directive: {} redis: {}", fill.subject, e.0);
            return Step::Ask(Tier::Store);
        }
    };
    count(fill, counters.l2_hit, ctx);
    if let Some(step) = key_answer(fill, &known, &mut None, Source::Redis, ttl, ctx) {
        return step;
    }
    l1::write(host, fill, &known, ttl);
    Step::Done(Outcome::Known(known), Source::Redis)
}

fn on_store_answer<H: Host>(fill: &Fill, response: &Response, ctx: &Ctx<'_, H>) -> Step {
    let (host, config) = (ctx.host, ctx.config);
    let counters = Counters::of(&fill.subject);
    // What the store said, and the L2 write-back that caches it.
    let parsed = match fill.subject {
        Subject::Directive(agent) => tiers::parse_store(response, &agent).map(|answer| {
            let (text, ttl) = match &answer {
                Answer::Directive(text, version) => {
                    (Some((text.expose().as_str(), *version)), config.ttl_seconds)
                }
                _ => (None, config.negative_ttl_seconds),
            };
            let known = match text {
                Some((text, version)) => {
                    Known::Directive(Redacted::new(Rc::from(escape_json_str(text))), version)
                }
                None => Known::NoDirective,
            };
            let write = tiers::redis_set(config, &agent, text, ttl);
            (known, ttl, write)
        }),
        Subject::Key(key) => tiers::parse_store_key(response, &key).map(|answer| match answer {
            KeyAnswer::Agent(agent) => {
                let write = tiers::redis_set_key(config, &key, Some(&agent), config.ttl_seconds);
                (Known::Agent(agent), config.ttl_seconds, write)
            }
            KeyAnswer::NoAgent | KeyAnswer::Unknown => {
                let ttl = config.negative_ttl_seconds;
                (
                    Known::NoAgent,
                    ttl,
                    tiers::redis_set_key(config, &key, None, ttl),
                )
            }
        }),
    };
    report(Tier::Store, parsed.is_ok(), ctx);
    let (known, ttl, write) = match parsed {
        Ok(found) => found,
        Err(e) => {
            host.count(Counter::L3Error);
            log::debug!("ibex_directive: {} store: {}", fill.subject, e.0);
            return Step::Unknowable;
        }
    };
    let counter = match known {
        Known::Directive(..) | Known::Agent(_) => counters.l3_hit,
        Known::NoDirective | Known::NoAgent => counters.l3_none,
    };
    count(fill, counter, ctx);
    let mut write = Some(write);
    let ttl_ms = ttl.saturating_mul(1000);
    if let Some(step) = key_answer(fill, &known, &mut write, Source::Store, ttl_ms, ctx) {
        return step;
    }
    // Redis is written only when L1 accepted the fill: a fill that an invalidation
    // overtook must not put its old answer back into L2. The root context sends it.
    if l1::write(host, fill, &known, ttl_ms) {
        if let Some(write) = write {
            let mut worker = ctx.worker.borrow_mut();
            // The answer arrived in the context that asked: the write-back belongs
            // to the same request's trace.
            let write = tiers::Callout {
                traceparent: worker.traceparent(ctx.id),
                ..write
            };
            worker.queue_write(write);
        }
    }
    Step::Done(Outcome::Known(known), Source::Store)
}

/// Counts a tier's answer, once per fill: the confirming second look of a key
/// fill (after `Confirm`) is not counted again.
fn count<H: Host>(fill: &Fill, counter: Counter, ctx: &Ctx<'_, H>) {
    if !fill.confirming {
        ctx.host.count(counter);
    }
}

/// What a gateway key's answer leads to before anything is written to L1:
/// - "no such key" ends the fill, remembered by this worker (not in shared data)
///   and, from the store, written back to Redis for the negative TTL (a wrong "no"
///   only refuses a request, so it needs no anchor);
/// - an agent read by a provisional fill is asked again under an anchor;
/// - `None`: an anchored fill's agent, cached like a directive.
fn key_answer<H: Host>(
    fill: &Fill,
    known: &Known,
    write: &mut Option<tiers::Callout>,
    source: Source,
    ttl_ms: u64,
    ctx: &Ctx<'_, H>,
) -> Option<Step> {
    let Subject::Key(key) = fill.subject else {
        return None;
    };
    match known {
        Known::Agent(_) if fill.provisional => Some(Step::Confirm(match source {
            Source::Redis => Tier::Redis,
            _ => Tier::Store,
        })),
        Known::Agent(_) => None,
        _ => {
            let now = ctx.host.now_ms();
            let until = now.saturating_add(ttl_ms);
            let mut worker = ctx.worker.borrow_mut();
            worker.remember_unknown_key(key, until, fill.anchor.generation, now);
            if let Some(write) = write.take() {
                let traceparent = worker.traceparent(ctx.id);
                worker.queue_write(tiers::Callout {
                    traceparent,
                    ..write
                });
            }
            Some(Step::Done(Outcome::Known(Known::NoAgent), source))
        }
    }
}

/// L2 and L3 both failed: serve stale if its window is still open now (a fill can
/// take a while), else follow `failure_mode`.
fn unknowable<H: Host>(fill: &Fill, ctx: &Ctx<'_, H>) -> Step {
    if let Some(stale) = &fill.stale {
        if ctx.host.now_ms() < stale.usable_until_ms {
            return Step::Done(Outcome::Known(stale.known.clone()), Source::Stale);
        }
    }
    // A key's agent is identity, not a directive: it never fails open.
    let outcome = match (ctx.config.failure_mode, &fill.subject) {
        (FailureMode::Open, Subject::Directive(_)) => Outcome::FailOpen,
        _ => Outcome::Refuse(Refusal::DirectiveUnavailable),
    };
    Step::Done(outcome, Source::None)
}
