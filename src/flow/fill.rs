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
use crate::agent::AgentId;
use crate::breaker::Transition;
use crate::config::FailureMode;
use crate::entry::{self, Known};
use crate::escape::escape_json_str;
use crate::host::Host;
use crate::inject::Format;
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::tiers::{self, Answer, Response, WriteOutcome};
use crate::worker::{BodySeen, Delivered, Fill, FillId, Participant, Ticket, Tier};
use ibex_wire::Redacted;

/// Where a fill's resolution stands.
enum Step {
    /// Ask this tier (if its breaker lets the call through).
    Ask(Tier),
    /// L2 and L3 both failed.
    Unknowable,
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

/// A request admitted for `agent`: served from L1, or it waits for a fill.
pub(super) fn resolve<H: Host>(
    agent: AgentId,
    format: Format,
    ctx: &Ctx<'_, H>,
) -> (State, Action) {
    let host = ctx.host;
    let key = entry::key_for(&agent);
    let stale_window_ms = ctx.config.stale_if_error_seconds.saturating_mul(1000);
    let (found, stale) = match l1::lookup(host, &key, stale_window_ms) {
        Lookup::Fresh(known) => {
            host.count(Counter::L1Hit);
            let outcome = Outcome::Known(known);
            return settled(deliver::apply(
                outcome,
                Source::Local,
                format,
                BodySeen::NotYet,
                ctx,
            ));
        }
        Lookup::Miss { anchor, stale } => (anchor, stale),
    };
    host.count(Counter::L1Miss);
    let me = Participant {
        id: ctx.id,
        format,
        body: BodySeen::NotYet,
    };
    // A request that arrives after an invalidation must not be answered with what
    // was read before it: `join` checks the fill's anchor against what we found.
    let me = match ctx.worker.borrow_mut().join(&key, &found, me) {
        Ok(id) => {
            host.count(Counter::Coalesced);
            return (State::Waiting(id), Action::Pause);
        }
        Err(me) => me,
    };
    let fill = Fill {
        agent,
        anchor: l1::anchor(host, &key, found),
        key,
        stale,
        participants: vec![me],
    };
    match drive(fill, None, Step::Ask(Tier::Redis), ctx) {
        Progress::InFlight(id) => (State::Waiting(id), Action::Pause),
        Progress::Finished(own) => {
            settled(own.unwrap_or_else(|| deliver::refuse(Refusal::DirectiveUnavailable, ctx)))
        }
    }
}

/// A callout answered in context `ctx.id`: a write-back's outcome is counted, a
/// fill's answer moves the fill on (its participants, the current context included,
/// find what it did with the worker).
pub(super) fn on_callout<H: Host>(token: u32, response: &Response, ctx: &Ctx<'_, H>) {
    if ctx.worker.borrow_mut().finish_write(token) {
        match tiers::redis_set_outcome(response) {
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
        "ibex_directive: agent {} fill re-asked for waiting requests",
        fill.agent
    );
    // The root context takes part in no fill, so nothing comes back for it.
    let _ = drive(fill, Some(ticket), Step::Ask(tier), ctx);
}

/// Moves a fill through its steps until a callout is in flight or it is done.
fn drive<H: Host>(
    fill: Fill,
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
            Step::Done(outcome, source) => {
                return Progress::Finished(deliver::complete(fill, outcome, source, ctx));
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
    let call = match tier {
        Tier::Redis => tiers::redis_get(ctx.config, &fill.agent),
        Tier::Store => tiers::store_get(ctx.config, &fill.agent),
    };
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
    let host = ctx.host;
    let parsed = tiers::parse_redis_get(response);
    report(Tier::Redis, parsed.is_ok(), ctx);
    let (known, ttl) = match parsed {
        Ok(Answer::Directive(text)) => (
            Known::Directive(Redacted::new(escape_json_str(text.expose()))),
            ctx.config.ttl_seconds,
        ),
        Ok(Answer::NoDirective) => (Known::NoDirective, ctx.config.negative_ttl_seconds),
        Ok(Answer::Unknown) => {
            host.count(Counter::L2Miss);
            return Step::Ask(Tier::Store);
        }
        Err(e) => {
            host.count(Counter::L2Error);
            log::debug!("ibex_directive: agent {} redis: {}", fill.agent, e.0);
            return Step::Ask(Tier::Store);
        }
    };
    host.count(Counter::L2Hit);
    l1::write(host, fill, &known, ttl);
    Step::Done(Outcome::Known(known), Source::Redis)
}

fn on_store_answer<H: Host>(fill: &Fill, response: &Response, ctx: &Ctx<'_, H>) -> Step {
    let (host, config) = (ctx.host, ctx.config);
    let parsed = tiers::parse_store(response, &fill.agent);
    report(Tier::Store, parsed.is_ok(), ctx);
    let (text, ttl) = match &parsed {
        Ok(Answer::Directive(text)) => {
            host.count(Counter::L3Hit);
            (Some(text.expose().as_str()), config.ttl_seconds)
        }
        Ok(_) => {
            host.count(Counter::L3None);
            (None, config.negative_ttl_seconds)
        }
        Err(e) => {
            host.count(Counter::L3Error);
            log::debug!("ibex_directive: agent {} store: {}", fill.agent, e.0);
            return Step::Unknowable;
        }
    };
    let known = match text {
        Some(text) => Known::Directive(Redacted::new(escape_json_str(text))),
        None => Known::NoDirective,
    };
    // Redis is written only when L1 accepted the fill: a fill that an invalidation
    // overtook must not put its old answer back into L2. The root context sends it.
    if l1::write(host, fill, &known, ttl) {
        let write = tiers::redis_set(config, &fill.agent, text, ttl);
        ctx.worker.borrow_mut().queue_write(write);
    }
    Step::Done(Outcome::Known(known), Source::Store)
}

/// L2 and L3 both failed: serve stale if its window is still open now (a fill can
/// take a while), else follow `failure_mode`.
fn unknowable<H: Host>(fill: &Fill, ctx: &Ctx<'_, H>) -> Step {
    if let Some(stale) = &fill.stale {
        if ctx.host.now_ms() < stale.usable_until_ms {
            return Step::Done(Outcome::Known(stale.known.clone()), Source::Stale);
        }
    }
    let outcome = match ctx.config.failure_mode {
        FailureMode::Closed => Outcome::Refuse(Refusal::DirectiveUnavailable),
        FailureMode::Open => Outcome::FailOpen,
    };
    Step::Done(outcome, Source::None)
}
