//! The life of one data-role request, as a state machine that is moved through its
//! callbacks: each host callback becomes an [`Event`], [`Flow::on_event`] consumes the
//! flow and returns the next one with the [`Action`] for Envoy.
//!
//! ```text
//! Start ──headers──► Forward                       (no agent/pass, other path, L1 "none")
//!   │                Replied                       (400/401/413/415)
//!   │                Injecting ──body end──► Forward  (L1 hit: splice at end of body)
//!   └──L1 miss────► Waiting ──fill answered──► Injecting | Forward | Replied
//! ```
//!
//! **Fills are per agent and per worker, not per request.** The first request that
//! misses L1 for an agent starts a fill (L2, then L3); every other request for that
//! agent arriving meanwhile joins it (`coalesced`) instead of asking again. When the
//! fill has its answer, it is applied to every participant: the host layer switches
//! to each participant's context to set its headers and resume it, and leaves the
//! participant's next state in [`Worker::ready`] for its next callback. A fill whose
//! owner (the context its callout answers are routed to) went away is asked again by
//! the root context, so no participant is stranded.
//!
//! Headers are held (paused) only while a fill runs. Envoy's default for proxy-wasm
//! 0.2 turns a paused header callback into "stop all", so the body reaches the filter
//! only after `resume`; when the host does deliver the body while headers are held,
//! it is buffered and spliced as soon as the directive is known. Either way the body
//! is buffered to its end before the directive is spliced in, and a body that cannot
//! take it is refused, never forwarded without it.
//!
//! No directive text is ever logged here or anywhere else.

use std::cell::RefCell;

use crate::agent::AgentId;
use crate::config::{Config, FailureMode, MissingAgent};
use crate::entry::{self, Entry, Kind};
use crate::escape::escape_json_str;
use crate::host::{Host, HostError};
use crate::inject::{splice, Format};
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::tiers::{self, Answer, Response, WriteOutcome};
use crate::worker::{BodySeen, Fill, FillId, Participant, Stale, Tier, Transition, Worker};

/// Request header carrying the tier that answered, when `debug_headers` is on.
pub const DEBUG_HEADER: &str = "x-ibex-directive";

/// The request headers the flow looks at, read by the host layer.
#[derive(Debug, Clone, Default)]
pub struct RequestHead<'a> {
    /// `:path`, query string included.
    pub path: Option<&'a str>,
    /// Value of the configured agent header.
    pub agent: Option<&'a str>,
    /// `content-length`.
    pub content_length: Option<&'a str>,
    /// `content-encoding`.
    pub content_encoding: Option<&'a str>,
    /// The request has no body.
    pub end_of_stream: bool,
}

/// The request headers the flow looks at, picked out of all of them (one host call
/// for all headers is much cheaper than one per header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadFields {
    /// `:path`.
    pub path: Option<String>,
    /// The agent header; several different values are kept joined by `,`, which is
    /// no UUID, so an ambiguous agent is refused rather than guessed.
    pub agent: Option<String>,
    /// `content-length`.
    pub content_length: Option<String>,
    /// `content-encoding`, several headers joined by `, ` as HTTP reads them.
    pub content_encoding: Option<String>,
}

impl HeadFields {
    /// Picks the fields out of all request headers (names are lower case in Envoy).
    pub fn pick(headers: Vec<(String, String)>, agent_header: &str) -> HeadFields {
        let mut out = HeadFields::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                ":path" => &mut out.path,
                "content-length" => &mut out.content_length,
                "content-encoding" => &mut out.content_encoding,
                n if n == agent_header => &mut out.agent,
                _ => continue,
            };
            match slot {
                None => *slot = Some(value),
                Some(existing) if *existing != value => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                Some(_) => {}
            }
        }
        out
    }

    /// The fields as the flow reads them.
    pub fn head(&self, end_of_stream: bool) -> RequestHead<'_> {
        RequestHead {
            path: self.path.as_deref(),
            agent: self.agent.as_deref(),
            content_length: self.content_length.as_deref(),
            content_encoding: self.content_encoding.as_deref(),
            end_of_stream,
        }
    }
}

/// Something that happened to the request.
#[derive(Debug)]
pub enum Event<'a> {
    /// Request headers arrived.
    Headers(RequestHead<'a>),
    /// Request body data arrived; `size` is everything buffered so far.
    Body {
        /// Bytes buffered so far.
        size: usize,
        /// This is the last of the body.
        end_of_stream: bool,
    },
    /// A callout answered (or failed: `response.status` is `None`).
    Callout {
        /// Token returned by [`Host::dispatch`].
        token: u32,
        /// The answer.
        response: Response,
    },
}

/// What Envoy should do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let it go on.
    Continue,
    /// Hold it (headers: until resumed; body: buffer it).
    Pause,
}

/// The tier that produced the answer a request was served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// L1 shared data.
    Local,
    /// L2 Redis.
    Redis,
    /// L3 store.
    Store,
    /// An expired L1 entry, while L2 and L3 failed.
    Stale,
    /// Nothing: forwarded without resolution (failure_mode open).
    None,
}

impl Source {
    /// Value of the debug header.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Redis => "redis",
            Source::Store => "store",
            Source::Stale => "stale",
            Source::None => "none",
        }
    }
}

/// Everything a callback works with: host calls, configuration, the worker's shared
/// state, and the id of the context the callback runs in.
pub struct Ctx<'a, H: Host> {
    /// Host calls.
    pub host: &'a H,
    /// The plugin configuration.
    pub config: &'a Config,
    /// State shared by the requests of this worker.
    pub worker: &'a RefCell<Worker>,
    /// Context id of the callback (a request, or the root context).
    pub id: u32,
}

/// A request's state. Created per request, moved through every callback.
#[derive(Debug)]
pub struct Flow {
    state: State,
}

#[derive(Debug)]
enum State {
    Start,
    /// Nothing left to do; everything continues.
    Forward,
    /// A local reply was sent.
    Replied,
    /// Taking part in this fill.
    Waiting(FillId),
    Injecting(Injecting),
}

/// A participant's next state, left by the fill that answered it.
#[derive(Debug)]
pub struct Ready(State);

struct Injecting {
    format: Format,
    escaped: String,
}

impl std::fmt::Debug for Injecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injecting")
            .field("format", &self.format)
            .field("escaped_len", &self.escaped.len())
            .finish()
    }
}

/// What a finished resolution means for the requests that waited for it.
#[derive(Clone)]
enum Outcome {
    Present(String),
    Absent,
    FailOpen,
    Refuse(Refusal),
}

impl Default for Flow {
    fn default() -> Self {
        Flow::new()
    }
}

impl Flow {
    /// A request that has seen nothing yet.
    pub fn new() -> Flow {
        Flow {
            state: State::Start,
        }
    }

    /// Whether the request waits for a fill.
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting(_))
    }

    /// Feeds one event; returns the next flow and what Envoy should do.
    pub fn on_event<H: Host>(self, event: Event<'_>, ctx: &Ctx<'_, H>) -> (Flow, Action) {
        let state = pick_up(self.state, ctx);
        let (state, action) = match (state, event) {
            (State::Start, Event::Headers(head)) => on_headers(head, ctx),
            (state, Event::Callout { token, response }) => {
                // The answer may finish a fill this request takes part in; the fill
                // leaves this request's next state in `ready` like for everyone else.
                on_callout(token, response, ctx);
                (pick_up(state, ctx), Action::Pause)
            }
            (
                State::Waiting(fill),
                Event::Body {
                    size,
                    end_of_stream,
                },
            ) => on_body_while_waiting(fill, size, end_of_stream, ctx),
            (
                State::Injecting(i),
                Event::Body {
                    size,
                    end_of_stream,
                },
            ) => on_body_to_inject(i, size, end_of_stream, ctx),
            (State::Replied, _) => (State::Replied, Action::Pause),
            (state @ State::Forward, _) => (state, Action::Continue),
            // Headers twice, or body before headers: the host broke its contract.
            // Forwarding untouched could bypass the directive, so refuse.
            (_, _) => refuse(Refusal::DirectiveUnavailable, ctx),
        };
        (Flow { state }, action)
    }
}

/// A waiting request takes the state its fill left for it, if it has finished.
fn pick_up<H: Host>(state: State, ctx: &Ctx<'_, H>) -> State {
    if !matches!(state, State::Waiting(_)) {
        return state;
    }
    match ctx.worker.borrow_mut().ready.remove(&ctx.id) {
        Some(Ready(next)) => next,
        None => state,
    }
}

fn refuse<H: Host>(refusal: Refusal, ctx: &Ctx<'_, H>) -> (State, Action) {
    ctx.host.count(refusal.counter());
    let body = refusal.body(&ctx.config.agent_header);
    if ctx.host.send_json_reply(refusal.status(), &body).is_err() {
        log::warn!(
            "ibex_directive: could not send local reply {}",
            refusal.code()
        );
    }
    (State::Replied, Action::Pause)
}

fn forward_untouched<H: Host>(ctx: &Ctx<'_, H>, counter: Counter) -> (State, Action) {
    ctx.host.count(counter);
    (State::Forward, Action::Continue)
}

fn on_headers<H: Host>(head: RequestHead<'_>, ctx: &Ctx<'_, H>) -> (State, Action) {
    let (host, config) = (ctx.host, ctx.config);
    host.count(Counter::Requests);
    let agent = match head.agent {
        None => {
            return match config.missing_agent {
                MissingAgent::Pass => forward_untouched(ctx, Counter::PassedThrough),
                MissingAgent::Reject => refuse(Refusal::MissingAgentId, ctx),
            }
        }
        Some(value) => match AgentId::parse(value) {
            Some(agent) => agent,
            None => return refuse(Refusal::InvalidAgentId, ctx),
        },
    };
    let Some(format) = head.path.and_then(|p| config.format_for(p)) else {
        return forward_untouched(ctx, Counter::PassedThrough);
    };
    if head.end_of_stream {
        // No body: nothing a model could read, and nothing to put a directive into.
        return forward_untouched(ctx, Counter::PassedThrough);
    }
    if let Some(enc) = head.content_encoding {
        let enc = enc.trim();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            return refuse(Refusal::UnsupportedEncoding, ctx);
        }
    }
    if let Some(len) = head
        .content_length
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if len > config.max_body_bytes {
            return refuse(Refusal::BodyTooLarge, ctx);
        }
    }

    let generation = entry::current_generation(host);
    let key = entry::key_for(&agent);
    let (raw, mut cas) = host.shared_get(&key).unwrap_or((None, None));
    let now = host.now_ms();
    let mut stale = None;
    if let Some(raw) = raw {
        if let Some(e) = Entry::decode(&raw) {
            if e.is_fresh(now, generation) {
                host.count(Counter::L1Hit);
                let outcome = match e.kind {
                    Kind::Present => Outcome::Present(e.escaped.to_string()),
                    _ => Outcome::Absent,
                };
                return apply(outcome, Source::Local, format, BodySeen::NotYet, ctx, false);
            }
            let stale_ms = config.stale_if_error_seconds.saturating_mul(1000);
            if e.is_servable_stale(now, generation, stale_ms) {
                stale = Some(Stale {
                    escaped: (e.kind == Kind::Present).then(|| e.escaped.to_string()),
                    usable_until_ms: e.fresh_until_ms.saturating_add(stale_ms),
                });
            }
        }
    }
    host.count(Counter::L1Miss);
    let me = Participant {
        id: ctx.id,
        format,
        body: BodySeen::NotYet,
    };
    {
        let mut worker = ctx.worker.borrow_mut();
        let worker = &mut *worker;
        // Join the fill in flight only if nothing invalidated the agent since it
        // started (same CAS version, same generation): a request that arrives after
        // an invalidation must not be answered with what was read before it.
        if let Some(&id) = worker.joinable.get(&key) {
            if let Some(fill) = worker.fills.get_mut(&id) {
                if fill.cas.is_some() && fill.cas == cas && fill.generation == generation {
                    fill.participants.push(me);
                    host.count(Counter::Coalesced);
                    return (State::Waiting(id), Action::Pause);
                }
            }
        }
    }
    if cas.is_none() {
        // proxy-wasm checks CAS only for keys that exist, so anchor a version first:
        // an invalidation that lands while this fill runs then changes it.
        let placeholder = Entry {
            kind: Kind::Tombstone,
            fresh_until_ms: 0,
            generation,
            escaped: "",
        };
        if host.shared_set(&key, &placeholder.encode(), None).is_ok() {
            cas = host.shared_get(&key).ok().and_then(|(_, c)| c);
        }
    }
    let fill = Fill {
        agent,
        key,
        tier: Tier::Redis,
        token: 0,
        cas,
        generation,
        stale,
        participants: vec![me],
        owner: Some(ctx.id),
    };
    match ask(fill, None, Tier::Redis, ctx, false) {
        Asked::InFlight(id) => (State::Waiting(id), Action::Pause),
        Asked::Done(own) => own.unwrap_or_else(|| refuse(Refusal::DirectiveUnavailable, ctx)),
    }
}

fn count_transition<H: Host>(host: &H, tier: Tier, t: Option<Transition>) {
    let counter = match (tier, t) {
        (_, None) => return,
        (Tier::Redis, Some(Transition::Opened)) => Counter::L2BreakerOpen,
        (Tier::Redis, Some(Transition::Closed)) => Counter::L2BreakerClose,
        (Tier::Store, Some(Transition::Opened)) => Counter::L3BreakerOpen,
        (Tier::Store, Some(Transition::Closed)) => Counter::L3BreakerClose,
    };
    host.count(counter);
}

/// Where a fill stands after asking a tier.
enum Asked {
    /// A callout is in flight; the fill is registered under this id.
    InFlight(FillId),
    /// The fill finished at once (nothing could be asked); the current context's own
    /// next state if it takes part.
    Done(Option<(State, Action)>),
}

fn asked_own(asked: Asked) -> Option<(State, Action)> {
    match asked {
        Asked::InFlight(_) => None,
        Asked::Done(own) => own,
    }
}

/// Sends the fill's callout to `tier` (or the next one whose breaker lets it
/// through) and registers the fill with the worker: as a new, joinable fill when `id`
/// is `None`, else under its id again (joinable only if it was). `held`: whether the
/// current context's headers are paused (false only in its headers callback).
fn ask<H: Host>(
    mut fill: Fill,
    id: Option<(FillId, bool)>,
    mut tier: Tier,
    ctx: &Ctx<'_, H>,
    held: bool,
) -> Asked {
    let host = ctx.host;
    loop {
        let allowed = ctx.worker.borrow_mut().breaker(tier).allow(host.now_ms());
        let call = match tier {
            Tier::Redis => tiers::redis_get(ctx.config, &fill.agent),
            Tier::Store => tiers::store_get(ctx.config, &fill.agent),
        };
        let dispatched = if allowed {
            host.dispatch(&call).map_err(|_| {
                let t = ctx.worker.borrow_mut().breaker(tier).failure(host.now_ms());
                count_transition(host, tier, t);
            })
        } else {
            Err(())
        };
        match (dispatched, tier, allowed) {
            (Ok(token), _, _) => {
                fill.tier = tier;
                fill.token = token;
                fill.owner = Some(ctx.id);
                let mut worker = ctx.worker.borrow_mut();
                let id = match id {
                    None => {
                        let new = worker.add_fill(fill);
                        worker.tokens.insert(token, new);
                        new
                    }
                    Some((id, joinable)) => {
                        worker.put_fill(id, fill, joinable);
                        id
                    }
                };
                return Asked::InFlight(id);
            }
            (Err(()), Tier::Redis, allowed) => {
                host.count(if allowed {
                    Counter::L2Error
                } else {
                    Counter::L2Skipped
                });
                tier = Tier::Store;
            }
            (Err(()), Tier::Store, allowed) => {
                host.count(if allowed {
                    Counter::L3Error
                } else {
                    Counter::L3Skipped
                });
                return Asked::Done(unknowable(fill, ctx, held));
            }
        }
    }
}

/// A callout answered in context `ctx.id`: if it belongs to a fill, move the fill on.
fn on_callout<H: Host>(token: u32, response: Response, ctx: &Ctx<'_, H>) {
    let host = ctx.host;
    let (fill, id) = {
        let mut worker = ctx.worker.borrow_mut();
        if worker.writes.remove(&token) {
            drop(worker);
            match tiers::redis_set_outcome(&response) {
                WriteOutcome::Written => {}
                WriteOutcome::Skipped => host.count(Counter::L2WriteSkipped),
                WriteOutcome::Failed => host.count(Counter::L2WriteError),
            }
            return;
        }
        let Some(id) = worker.tokens.get(&token).copied() else {
            return;
        };
        match take_fill(&mut worker, id) {
            Some(taken) => taken,
            None => return,
        }
    };
    // The callout answers in this context: it is the owner if it is still around.
    let own = match fill.tier {
        Tier::Redis => on_redis_answer(fill, id, &response, ctx),
        Tier::Store => on_store_answer(fill, &response, ctx),
    };
    if let Some((state, _)) = own {
        ctx.worker.borrow_mut().ready.insert(ctx.id, Ready(state));
    }
}

/// Takes a fill out of the worker to move it on; remembers whether new requests
/// could still join it, so that it can be put back the same way.
fn take_fill(worker: &mut Worker, id: FillId) -> Option<(Fill, (FillId, bool))> {
    let key = worker.fills.get(&id)?.key.clone();
    let joinable = worker.joinable.get(&key) == Some(&id);
    let fill = worker.take_fill(id)?;
    Some((fill, (id, joinable)))
}

fn on_redis_answer<H: Host>(
    fill: Fill,
    id: (FillId, bool),
    response: &Response,
    ctx: &Ctx<'_, H>,
) -> Option<(State, Action)> {
    let host = ctx.host;
    let parsed = tiers::parse_redis_get(response);
    let t = {
        let mut worker = ctx.worker.borrow_mut();
        match parsed {
            Ok(_) => worker.redis.success(),
            Err(_) => worker.redis.failure(host.now_ms()),
        }
    };
    count_transition(host, Tier::Redis, t);
    match parsed {
        Ok(Answer::Directive(text)) => {
            host.count(Counter::L2Hit);
            let escaped = escape_json_str(&text);
            cache_locally(&fill, Some(&escaped), ctx.config.ttl_seconds, host);
            complete(fill, Outcome::Present(escaped), Source::Redis, ctx, true)
        }
        Ok(Answer::NoDirective) => {
            host.count(Counter::L2Hit);
            cache_locally(&fill, None, ctx.config.negative_ttl_seconds, host);
            complete(fill, Outcome::Absent, Source::Redis, ctx, true)
        }
        Ok(Answer::Unknown) => {
            host.count(Counter::L2Miss);
            asked_own(ask(fill, Some(id), Tier::Store, ctx, true))
        }
        Err(e) => {
            host.count(Counter::L2Error);
            log::debug!("ibex_directive: agent {} redis: {}", fill.agent, e.0);
            asked_own(ask(fill, Some(id), Tier::Store, ctx, true))
        }
    }
}

fn on_store_answer<H: Host>(
    fill: Fill,
    response: &Response,
    ctx: &Ctx<'_, H>,
) -> Option<(State, Action)> {
    let (host, config) = (ctx.host, ctx.config);
    let parsed = tiers::parse_store(response, &fill.agent);
    let t = {
        let mut worker = ctx.worker.borrow_mut();
        match parsed {
            Ok(_) => worker.store.success(),
            Err(_) => worker.store.failure(host.now_ms()),
        }
    };
    count_transition(host, Tier::Store, t);
    let answer = match parsed {
        Ok(answer) => answer,
        Err(e) => {
            host.count(Counter::L3Error);
            log::debug!("ibex_directive: agent {} store: {}", fill.agent, e.0);
            return unknowable(fill, ctx, true);
        }
    };
    let (text, ttl) = match &answer {
        Answer::Directive(text) => {
            host.count(Counter::L3Hit);
            (Some(text.as_str()), config.ttl_seconds)
        }
        _ => {
            host.count(Counter::L3None);
            (None, config.negative_ttl_seconds)
        }
    };
    let escaped = text.map(escape_json_str);
    // Redis is written only when L1 accepted the fill: a fill that an invalidation
    // overtook must not put its old answer back into L2. The root context sends it.
    if cache_locally(&fill, escaped.as_deref(), ttl, host) {
        let write = tiers::redis_set(config, &fill.agent, text, ttl);
        ctx.worker.borrow_mut().pending_writes.push(write);
    }
    let outcome = match escaped {
        Some(e) => Outcome::Present(e),
        None => Outcome::Absent,
    };
    complete(fill, outcome, Source::Store, ctx, true)
}

/// Writes the fill's answer to L1 under the CAS version read when it started.
/// Returns whether it was written.
fn cache_locally<H: Host>(fill: &Fill, escaped: Option<&str>, ttl_seconds: u64, host: &H) -> bool {
    let entry = Entry {
        kind: if escaped.is_some() {
            Kind::Present
        } else {
            Kind::Absent
        },
        fresh_until_ms: host
            .now_ms()
            .saturating_add(ttl_seconds.saturating_mul(1000)),
        generation: fill.generation,
        escaped: escaped.unwrap_or(""),
    };
    let raw = entry.encode();
    match host.shared_set(&fill.key, &raw, fill.cas) {
        Ok(()) => true,
        Err(HostError::CasMismatch) => {
            // Someone wrote the key since this fill started. If it is an answer from
            // a fill that started before the last flush (older generation, not a
            // tombstone), it is stale anyway and this newer answer may replace it.
            // Anything else (a tombstone, or an answer as new as ours) wins.
            if let Ok((Some(current), Some(cas))) = host.shared_get(&fill.key) {
                let older = Entry::decode(&current)
                    .is_some_and(|e| e.kind != Kind::Tombstone && e.generation < fill.generation);
                if older && host.shared_set(&fill.key, &raw, Some(cas)).is_ok() {
                    return true;
                }
            }
            host.count(Counter::FillDiscarded);
            false
        }
        Err(e) => {
            log::warn!(
                "ibex_directive: agent {} shared data write failed: {:?}",
                fill.agent,
                e
            );
            false
        }
    }
}

/// L2 and L3 both failed: serve stale if allowed, else follow `failure_mode`.
fn unknowable<H: Host>(fill: Fill, ctx: &Ctx<'_, H>, held: bool) -> Option<(State, Action)> {
    if let Some(stale) = &fill.stale {
        if ctx.host.now_ms() < stale.usable_until_ms {
            let outcome = match &stale.escaped {
                Some(e) => Outcome::Present(e.clone()),
                None => Outcome::Absent,
            };
            return complete(fill, outcome, Source::Stale, ctx, held);
        }
    }
    let outcome = match ctx.config.failure_mode {
        FailureMode::Closed => Outcome::Refuse(Refusal::DirectiveUnavailable),
        FailureMode::Open => Outcome::FailOpen,
    };
    complete(fill, outcome, Source::None, ctx, held)
}

/// Applies a finished fill's outcome to every participant. Returns the current
/// context's own next state if it took part; the others find theirs in `ready`.
fn complete<H: Host>(
    fill: Fill,
    outcome: Outcome,
    source: Source,
    ctx: &Ctx<'_, H>,
    held: bool,
) -> Option<(State, Action)> {
    let mut own = None;
    let mut switched = false;
    for p in fill.participants {
        let current = p.id == ctx.id;
        if !current {
            if ctx.host.switch_to(p.id).is_err() {
                // Gone without telling us: nothing to resume.
                continue;
            }
            switched = true;
        }
        let (state, action) = apply(
            outcome.clone(),
            source,
            p.format,
            p.body,
            ctx,
            held || !current,
        );
        if current {
            own = Some((state, action));
        } else {
            ctx.worker.borrow_mut().ready.insert(p.id, Ready(state));
        }
    }
    if switched && ctx.host.switch_to(ctx.id).is_err() {
        log::warn!(
            "ibex_directive: could not switch back to context {}",
            ctx.id
        );
    }
    own
}

fn set_debug_header<H: Host>(source: Source, ctx: &Ctx<'_, H>) {
    if ctx.config.debug_headers {
        let _ = ctx
            .host
            .set_request_header(DEBUG_HEADER, Some(source.as_str()));
    }
}

/// Lets the request go on: from its headers callback by returning Continue, from
/// anywhere else by resuming it.
fn continue_request<H: Host>(state: State, ctx: &Ctx<'_, H>, held: bool) -> (State, Action) {
    if !held {
        return (state, Action::Continue);
    }
    if ctx.host.resume_request().is_err() {
        log::warn!("ibex_directive: could not resume request");
    }
    (state, Action::Pause)
}

/// The answer is known for one request (the effective context). Its headers are
/// still modifiable here.
fn apply<H: Host>(
    outcome: Outcome,
    source: Source,
    format: Format,
    body: BodySeen,
    ctx: &Ctx<'_, H>,
    held: bool,
) -> (State, Action) {
    let escaped = match outcome {
        Outcome::Refuse(refusal) => return refuse(refusal, ctx),
        Outcome::FailOpen => {
            ctx.host.count(Counter::FailedOpen);
            set_debug_header(Source::None, ctx);
            return continue_request(State::Forward, ctx, held);
        }
        Outcome::Absent => {
            if source == Source::Stale {
                ctx.host.count(Counter::StaleServed);
            }
            ctx.host.count(Counter::NoDirective);
            set_debug_header(source, ctx);
            return continue_request(State::Forward, ctx, held);
        }
        Outcome::Present(escaped) => escaped,
    };
    if source == Source::Stale {
        ctx.host.count(Counter::StaleServed);
    }
    set_debug_header(source, ctx);
    // The body grows: its old length would be a lie. Envoy frames it anew.
    let _ = ctx.host.set_request_header("content-length", None);
    let injecting = Injecting { format, escaped };
    match body {
        BodySeen::Complete(size) => match inject(injecting, size, ctx) {
            (State::Forward, _) => continue_request(State::Forward, ctx, held),
            other => other,
        },
        _ => continue_request(State::Injecting(injecting), ctx, held),
    }
}

fn on_body_while_waiting<H: Host>(
    fill: FillId,
    size: usize,
    end_of_stream: bool,
    ctx: &Ctx<'_, H>,
) -> (State, Action) {
    if size as u64 > ctx.config.max_body_bytes {
        // Leave the fill (it goes on for the others), then refuse.
        if let Some(f) = ctx.worker.borrow_mut().fills.get_mut(&fill) {
            f.participants.retain(|p| p.id != ctx.id);
        }
        return refuse(Refusal::BodyTooLarge, ctx);
    }
    let seen = if end_of_stream {
        BodySeen::Complete(size)
    } else {
        BodySeen::Partial
    };
    let found = ctx
        .worker
        .borrow_mut()
        .fills
        .get_mut(&fill)
        .and_then(|f| f.participants.iter_mut().find(|p| p.id == ctx.id))
        .map(|me| me.body = seen)
        .is_some();
    if !found {
        // Neither waiting nor answered: the fill lost track of this request.
        return refuse(Refusal::DirectiveUnavailable, ctx);
    }
    (State::Waiting(fill), Action::Pause)
}

fn on_body_to_inject<H: Host>(
    i: Injecting,
    size: usize,
    end_of_stream: bool,
    ctx: &Ctx<'_, H>,
) -> (State, Action) {
    if size as u64 > ctx.config.max_body_bytes {
        return refuse(Refusal::BodyTooLarge, ctx);
    }
    if !end_of_stream {
        return (State::Injecting(i), Action::Pause);
    }
    inject(i, size, ctx)
}

/// Splices the directive into the complete buffered body.
fn inject<H: Host>(i: Injecting, size: usize, ctx: &Ctx<'_, H>) -> (State, Action) {
    let body = match ctx.host.request_body(size) {
        Ok(b) => b,
        Err(_) => return refuse(Refusal::DirectiveUnavailable, ctx),
    };
    match splice(i.format, &body, &ctx.config.chat_message_prefix, &i.escaped) {
        Ok(out) => {
            if ctx.host.replace_request_body(body.len(), &out).is_err() {
                return refuse(Refusal::DirectiveUnavailable, ctx);
            }
            ctx.host.count(Counter::Injected);
            (State::Forward, Action::Continue)
        }
        Err(e) => refuse(Refusal::InvalidBody(e), ctx),
    }
}

/// Root context, on its tick: sends the pending L2 write-backs (from here their
/// answers come back to a context that lives as long as the VM, so every outcome is
/// counted), and asks again for fills whose owner went away (their callout answers
/// are dropped by the SDK), so their participants are not stranded.
pub fn on_root_tick<H: Host>(ctx: &Ctx<'_, H>) {
    let writes = std::mem::take(&mut ctx.worker.borrow_mut().pending_writes);
    if ctx.worker.borrow().redis.is_open() {
        // Redis is down as far as this worker knows: a write would only wait for its
        // timeout. The answers are in L1; Redis is refilled once it is back.
        for _ in writes {
            ctx.host.count(Counter::L2WriteDropped);
        }
        return rescue_orphans(ctx);
    }
    for write in writes {
        match ctx.host.dispatch(&write) {
            Ok(token) => {
                ctx.host.count(Counter::L2Write);
                ctx.worker.borrow_mut().writes.insert(token);
            }
            Err(_) => ctx.host.count(Counter::L2WriteError),
        }
    }
    rescue_orphans(ctx);
}

/// Asks again for fills whose owner went away (their callout answers are dropped by
/// the SDK), so that their participants are not stranded.
fn rescue_orphans<H: Host>(ctx: &Ctx<'_, H>) {
    let orphans = ctx.worker.borrow().orphans();
    for id in orphans {
        let Some((fill, id)) = take_fill(&mut ctx.worker.borrow_mut(), id) else {
            continue;
        };
        log::debug!(
            "ibex_directive: agent {} fill re-asked for waiting requests",
            fill.agent
        );
        let tier = fill.tier;
        // The root context takes part in no fill, so nothing comes back for it.
        let _ = ask(fill, Some(id), tier, ctx, true);
    }
}

/// Root context: a callout answered (a rescued fill, or a write-back).
pub fn on_root_callout<H: Host>(token: u32, response: Response, ctx: &Ctx<'_, H>) {
    on_callout(token, response, ctx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeHost, SharedData};
    use crate::worker::{BREAKER_COOL_OFF_MS, BREAKER_THRESHOLD};

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
    const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    const INJECTED: &str = r#"{"model":"m","messages":[{"role":"system","content":"Be \"terse\"."},{"role":"user","content":"hi"}]}"#;
    const ROOT: u32 = 99;

    fn config(extra: &str) -> Config {
        Config::parse(
            format!(r#"{{"debug_headers":true{extra}}}"#).as_bytes(),
            None,
        )
        .unwrap()
    }

    fn ok(body: &str) -> Response {
        Response {
            status: Some(200),
            body: body.as_bytes().to_vec(),
        }
    }

    fn redis_hit(text: &str) -> Response {
        ok(&format!("${}\r\n{}\r\n", text.len(), text))
    }

    fn redis_miss() -> Response {
        ok("$-1\r\n")
    }

    fn store_answer(content: Option<&str>) -> Response {
        ok(&serde_json::json!({"agent_id": AGENT, "content": content}).to_string())
    }

    fn failed() -> Response {
        Response::default()
    }

    /// One fake worker: its host (request contexts), its shared state, the config.
    struct W {
        host: FakeHost,
        worker: RefCell<Worker>,
        config: Config,
    }

    impl W {
        fn new(shared: &SharedData, config: Config) -> W {
            let host = FakeHost::with_shared(shared.clone());
            host.add_request(ROOT, b"");
            W {
                host,
                worker: RefCell::new(Worker::default()),
                config,
            }
        }

        fn ctx(&self, id: u32) -> Ctx<'_, FakeHost> {
            self.host.current.set(id);
            Ctx {
                host: &self.host,
                config: &self.config,
                worker: &self.worker,
                id,
            }
        }

        fn ev(&self, id: u32, flow: Flow, event: Event<'_>) -> (Flow, Action) {
            flow.on_event(event, &self.ctx(id))
        }

        fn headers_with(&self, id: u32, head: RequestHead<'_>) -> (Flow, Action) {
            if !self.host.requests.borrow().contains_key(&id) || id == 1 {
                self.host.add_request(id, BODY.as_bytes());
            }
            self.ev(id, Flow::new(), Event::Headers(head))
        }

        fn headers(&self, id: u32) -> (Flow, Action) {
            self.headers_with(id, head(Some(AGENT)))
        }

        /// The last callout answers, in context `id` (the one that dispatched it).
        fn answer(&self, id: u32, flow: Flow, response: Response) -> (Flow, Action) {
            let (token, _) = self.host.last_callout();
            self.ev(id, flow, Event::Callout { token, response })
        }

        fn body_end(&self, id: u32, flow: Flow) -> (Flow, Action) {
            let size = self.host.req(id).body.len();
            self.ev(
                id,
                flow,
                Event::Body {
                    size,
                    end_of_stream: true,
                },
            )
        }

        fn body(&self, id: u32) -> String {
            String::from_utf8(self.host.req(id).body.clone()).unwrap()
        }

        fn tier(&self, id: u32) -> Option<String> {
            self.host.req(id).headers.get(DEBUG_HEADER).cloned()
        }

        fn reply_status(&self, id: u32) -> Option<u16> {
            self.host.req(id).reply.as_ref().map(|r| r.0)
        }

        /// Headers, every callout answered in order by `answers`, then the body.
        fn run(&self, id: u32, answers: Vec<Response>) -> Flow {
            let (mut flow, mut action) = self.headers(id);
            for answer in answers {
                assert_eq!(action, Action::Pause, "headers are held while a fill runs");
                let (f, _) = self.answer(id, flow, answer);
                flow = f;
                action = if flow.is_waiting() {
                    Action::Pause
                } else {
                    Action::Continue
                };
            }
            if matches!(flow.state, State::Replied) {
                return flow;
            }
            let (flow, action) = self.body_end(id, flow);
            if !matches!(flow.state, State::Replied) {
                assert_eq!(action, Action::Continue);
            }
            flow
        }
    }

    fn head(agent: Option<&'static str>) -> RequestHead<'static> {
        RequestHead {
            path: Some("/v1/chat/completions"),
            agent,
            content_length: None,
            content_encoding: None,
            end_of_stream: false,
        }
    }

    #[test]
    fn cold_agent_goes_through_every_tier_and_is_cached_in_l1_and_l2() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let flow = w.run(1, vec![redis_miss(), store_answer(Some("Be \"terse\"."))]);
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(
            w.host.callouts.borrow().len(),
            2,
            "the write-back waits for the root"
        );
        on_root_tick(&w.ctx(ROOT));
        assert_eq!(w.body(1), INJECTED);
        assert_eq!(w.tier(1).as_deref(), Some("store"));
        assert_eq!(w.host.req(1).resumed, 1);
        let calls = w.host.callouts.borrow().clone();
        assert_eq!(calls.len(), 3, "L2 get, L3 get, L2 write");
        assert_eq!(calls[0].1.cluster, "ibex_redis");
        assert_eq!(calls[1].1.cluster, "ibex_store");
        assert!(calls[2]
            .1
            .path
            .ends_with(&format!("/2/directive:{AGENT}/directive:__flush__/60")));
        assert_eq!(calls[2].1.body.as_deref(), Some(&b"Be \"terse\"."[..]));
        for c in [
            Counter::L1Miss,
            Counter::L2Miss,
            Counter::L3Hit,
            Counter::L2Write,
            Counter::Injected,
        ] {
            assert_eq!(w.host.counter(c), 1, "{c:?}");
        }
        assert!(w.worker.borrow().fills.is_empty());

        // Next request, on another worker: served from L1, no callout.
        let w2 = W::new(&shared, config(""));
        let flow = w2.run(1, vec![]);
        assert!(matches!(flow.state, State::Forward));
        assert!(w2.host.callouts.borrow().is_empty());
        assert_eq!(w2.host.counter(Counter::L1Hit), 1);
        assert_eq!(w2.body(1), INJECTED);
        assert_eq!(w2.tier(1).as_deref(), Some("local"));
    }

    #[test]
    fn redis_hit_fills_l1_without_asking_the_store() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.run(1, vec![redis_hit("Be \"terse\".")]);
        assert_eq!(w.host.callouts.borrow().len(), 1);
        assert_eq!(w.body(1), INJECTED);
        assert_eq!(w.tier(1).as_deref(), Some("redis"));
        assert_eq!(w.host.counter(Counter::L2Hit), 1);
        let e = shared.get(&format!("ibex:d:{AGENT}")).unwrap();
        assert_eq!(Entry::decode(&e).unwrap().kind, Kind::Present);
    }

    #[test]
    fn agent_without_directive_is_untouched_and_cached_negatively() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (flow, _) = w.headers(1);
        let (flow, _) = w.answer(1, flow, redis_miss());
        let (flow, _) = w.answer(1, flow, store_answer(None));
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(w.host.req(1).resumed, 1);
        assert_eq!(w.body(1), BODY);
        on_root_tick(&w.ctx(ROOT));
        let (_, write) = w.host.last_callout();
        assert_eq!(write.method, "GET");
        assert!(write
            .path
            .ends_with(&format!("/2/directive:{AGENT}/directive:__flush__/10/")));
        assert_eq!(w.host.counter(Counter::NoDirective), 1);

        let w2 = W::new(&shared, config(""));
        let (flow, action) = w2.headers(1);
        assert_eq!(action, Action::Continue);
        assert!(matches!(flow.state, State::Forward));
        assert!(w2.host.callouts.borrow().is_empty());
        assert!(!w2.host.req(1).headers.contains_key("content-length"));
    }

    #[test]
    fn l1_expiry_sends_the_next_request_to_redis() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(r#","cache":{"ttl_seconds":1}"#));
        w.run(1, vec![redis_hit("D")]);
        w.host.now.set(w.host.now.get() + 1_000);
        let (_, action) = w.headers(2);
        assert_eq!(action, Action::Pause);
        assert_eq!(w.host.counter(Counter::L1Miss), 2);
        assert_eq!(w.host.last_callout().1.cluster, "ibex_redis");
    }

    #[test]
    fn head_fields_are_picked_from_all_headers() {
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let h = HeadFields::pick(
            pairs(&[
                (":path", "/v1/chat/completions"),
                ("x-agent-id", AGENT),
                ("content-length", "12"),
                ("accept", "*/*"),
            ]),
            "x-agent-id",
        );
        assert_eq!(h.path.as_deref(), Some("/v1/chat/completions"));
        assert_eq!(h.agent.as_deref(), Some(AGENT));
        assert_eq!(h.content_length.as_deref(), Some("12"));
        assert_eq!(h.content_encoding, None);
        let h = HeadFields::pick(
            pairs(&[
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
                ("x-agent-id", AGENT),
                ("x-agent-id", AGENT),
            ]),
            "x-agent-id",
        );
        assert_eq!(h.content_encoding.as_deref(), Some("identity, gzip"));
        assert_eq!(
            h.agent.as_deref(),
            Some(AGENT),
            "a repeated identical agent header is one agent"
        );
        let other = "00000000-0000-4000-8000-000000000001";
        let h = HeadFields::pick(
            pairs(&[("x-agent-id", AGENT), ("x-agent-id", other)]),
            "x-agent-id",
        );
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.host.add_request(1, BODY.as_bytes());
        w.ev(1, Flow::new(), Event::Headers(h.head(false)));
        assert_eq!(
            w.reply_status(1),
            Some(400),
            "two different agents are refused"
        );
    }

    #[test]
    fn header_problems_are_refused_or_passed() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (flow, _) = w.headers_with(1, head(Some("agent-7")));
        assert!(matches!(flow.state, State::Replied));
        let (status, body) = w.host.req(1).reply.clone().unwrap();
        assert_eq!(status, 400);
        assert!(body.contains("invalid_agent_id"));

        let (flow, action) = w.headers_with(2, head(None));
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(action, Action::Continue);
        assert!(w.host.req(2).reply.is_none());

        let w = W::new(&shared, config(r#","agent":{"missing":"reject"}"#));
        w.headers_with(1, head(None));
        assert_eq!(w.reply_status(1), Some(401));
    }

    #[test]
    fn oversized_and_encoded_bodies_are_refused_before_any_lookup() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(r#","inject":{"max_body_bytes":100}"#));
        let mut hd = head(Some(AGENT));
        hd.content_length = Some("101");
        w.headers_with(1, hd);
        assert_eq!(w.reply_status(1), Some(413));
        let mut hd = head(Some(AGENT));
        hd.content_encoding = Some("gzip");
        w.headers_with(2, hd);
        assert_eq!(w.reply_status(2), Some(415));
        assert!(w.host.callouts.borrow().is_empty());
    }

    #[test]
    fn chunked_body_over_the_limit_is_refused_while_buffering() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(r#","inject":{"max_body_bytes":100}"#));
        w.run(1, vec![redis_hit("D")]);
        let (flow, action) = w.headers(2);
        assert_eq!(action, Action::Continue);
        let (flow, action) = w.ev(
            2,
            flow,
            Event::Body {
                size: 60,
                end_of_stream: false,
            },
        );
        assert_eq!(action, Action::Pause);
        let (flow, _) = w.ev(
            2,
            flow,
            Event::Body {
                size: 120,
                end_of_stream: false,
            },
        );
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(w.reply_status(2), Some(413));
    }

    #[test]
    fn failures_follow_failure_mode() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let flow = w.run(
            1,
            vec![
                failed(),
                Response {
                    status: Some(503),
                    body: vec![],
                },
            ],
        );
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(w.reply_status(1), Some(503));
        assert_eq!(w.host.counter(Counter::RejectedDirectiveUnavailable), 1);
        assert_eq!(w.body(1), BODY);

        let w = W::new(&shared, config(r#","failure_mode":"open""#));
        let flow = w.run(1, vec![failed(), failed()]);
        assert!(matches!(flow.state, State::Forward));
        assert!(w.host.req(1).reply.is_none());
        assert_eq!(w.body(1), BODY);
        assert_eq!(w.tier(1).as_deref(), Some("none"));
        assert_eq!(w.host.counter(Counter::FailedOpen), 1);
    }

    #[test]
    fn undispatchable_clusters_count_as_tier_errors() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.host
            .fail_dispatch_to
            .borrow_mut()
            .push("ibex_redis".into());
        let (_, action) = w.headers(1);
        assert_eq!(action, Action::Pause);
        assert_eq!(w.host.counter(Counter::L2Error), 1);
        assert_eq!(w.host.last_callout().1.cluster, "ibex_store");

        let w = W::new(&shared, config(""));
        w.host
            .fail_dispatch_to
            .borrow_mut()
            .extend(["ibex_redis".into(), "ibex_store".into()]);
        let (flow, action) = w.headers(1);
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(action, Action::Pause);
        assert_eq!(w.reply_status(1), Some(503));
        assert_eq!(
            w.host.req(1).resumed,
            0,
            "answered from its own headers callback"
        );
    }

    #[test]
    fn expired_entry_is_served_stale_only_while_tiers_fail_and_within_the_window() {
        let shared = SharedData::default();
        let c = r#","cache":{"ttl_seconds":1,"stale_if_error_seconds":5}"#;
        let w = W::new(&shared, config(c));
        w.run(1, vec![redis_hit("Be \"terse\".")]);
        let t0 = w.host.now.get();

        w.host.now.set(t0 + 3_000);
        w.run(2, vec![failed(), failed()]);
        assert_eq!(w.body(2), INJECTED);
        assert_eq!(w.tier(2).as_deref(), Some("stale"));
        assert_eq!(w.host.counter(Counter::StaleServed), 1);

        w.host.now.set(t0 + 7_000);
        w.run(3, vec![failed(), failed()]);
        assert_eq!(w.reply_status(3), Some(503));
    }

    #[test]
    fn a_fill_overtaken_by_an_invalidation_writes_neither_l1_nor_l2() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (flow, _) = w.headers(1);
        let (flow, _) = w.answer(1, flow, redis_miss());
        // An invalidation lands while the store answer is in flight.
        let r = crate::control::handle(
            Some("POST"),
            Some(&format!("/ibex/v1/invalidate/{AGENT}")),
            None,
            &w.host,
            &w.config,
        );
        assert_eq!(r.status, 204);
        w.answer(1, flow, store_answer(Some("old")));
        assert_eq!(w.host.counter(Counter::FillDiscarded), 1);
        assert_eq!(
            w.host.counter(Counter::L2Write),
            0,
            "no write-back to Redis"
        );
        assert_eq!(w.host.callouts.borrow().len(), 2);
        let raw = shared.get(&format!("ibex:d:{AGENT}")).unwrap();
        assert_eq!(Entry::decode(&raw).unwrap().kind, Kind::Tombstone);
    }

    #[test]
    fn a_fill_overtaken_by_a_flush_is_stale_at_once() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (flow, _) = w.headers(1);
        crate::control::invalidate_all(&w.host).unwrap();
        w.answer(1, flow, redis_hit("old"));
        let (_, action) = w.headers(2);
        assert_eq!(
            action,
            Action::Pause,
            "the entry written under the old generation is not fresh"
        );
    }

    #[test]
    fn body_delivered_while_headers_are_held_is_spliced_when_the_answer_arrives() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (flow, _) = w.headers(1);
        let (flow, action) = w.body_end(1, flow);
        assert_eq!(action, Action::Pause);
        let (flow, _) = w.answer(1, flow, redis_hit("Be \"terse\"."));
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(w.host.req(1).resumed, 1);
        assert_eq!(w.body(1), INJECTED);
    }

    #[test]
    fn unparseable_body_for_an_agent_with_a_directive_is_refused() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (flow, _) = w.headers(1);
        w.host.requests.borrow_mut().get_mut(&1).unwrap().body =
            br#"{"messages":[],"messages":[]}"#.to_vec();
        let (flow, _) = w.answer(1, flow, redis_hit("D"));
        let (flow, _) = w.body_end(1, flow);
        assert!(matches!(flow.state, State::Replied));
        let (status, body) = w.host.req(1).reply.clone().unwrap();
        assert_eq!(status, 400);
        assert!(body.contains("invalid_body"));
        assert_eq!(w.host.counter(Counter::RejectedInvalidBody), 1);
    }

    #[test]
    fn other_paths_and_bodiless_requests_pass() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let mut hd = head(Some(AGENT));
        hd.path = Some("/v1/models");
        assert_eq!(w.headers_with(1, hd).1, Action::Continue);
        let mut hd = head(Some(AGENT));
        hd.end_of_stream = true;
        assert_eq!(w.headers_with(2, hd).1, Action::Continue);
        assert!(w.host.callouts.borrow().is_empty());
        assert_eq!(w.host.counter(Counter::PassedThrough), 2);
    }

    #[test]
    fn write_back_outcomes_are_counted_by_the_root_after_the_request_ended() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.run(1, vec![redis_miss(), store_answer(Some("D"))]);
        w.worker.borrow_mut().forget(1);
        on_root_tick(&w.ctx(ROOT));
        assert_eq!(w.host.counter(Counter::L2Write), 1);
        let (token, _) = w.host.last_callout();
        on_root_callout(token, failed(), &w.ctx(ROOT));
        assert_eq!(w.host.counter(Counter::L2WriteError), 1);
        assert!(w.worker.borrow().writes.is_empty(), "no token left behind");

        let w = W::new(&SharedData::default(), config(""));
        w.run(1, vec![redis_miss(), store_answer(Some("D"))]);
        on_root_tick(&w.ctx(ROOT));
        let (token, _) = w.host.last_callout();
        on_root_callout(token, ok(r#"{"EVAL":0}"#), &w.ctx(ROOT));
        assert_eq!(w.host.counter(Counter::L2WriteSkipped), 1);
        assert_eq!(w.host.counter(Counter::L2WriteError), 0);
    }

    #[test]
    fn a_request_after_an_invalidation_does_not_join_a_fill_from_before_it() {
        for flush in [false, true] {
            let shared = SharedData::default();
            let w = W::new(&shared, config(""));
            let (f1, _) = w.headers(1);
            if flush {
                crate::control::invalidate_all(&w.host).unwrap();
            } else {
                let path = format!("/ibex/v1/invalidate/{AGENT}");
                crate::control::handle(Some("POST"), Some(&path), None, &w.host, &w.config);
            }
            let (f2, _) = w.headers(2);
            assert_eq!(w.host.counter(Counter::Coalesced), 0, "flush={flush}");
            assert_eq!(w.host.callouts.borrow().len(), 2, "a fill of its own");
            let (second, _) = w.host.last_callout();
            // The old fill answers with the old text; the new one with the new text.
            let (first, _) = w.host.callouts.borrow()[0].clone();
            let (f1, _) = w.ev(
                1,
                f1,
                Event::Callout {
                    token: first,
                    response: redis_hit("old"),
                },
            );
            let (f2, _) = w.ev(
                2,
                f2,
                Event::Callout {
                    token: second,
                    response: redis_hit("new"),
                },
            );
            let (_, _) = w.body_end(1, f1);
            let (_, _) = w.body_end(2, f2);
            assert!(w.body(1).contains(r#""content":"old""#));
            assert!(w.body(2).contains(r#""content":"new""#));
            // Only the fill that started after the invalidation was cached.
            let raw = shared.get(&format!("ibex:d:{AGENT}")).unwrap();
            assert_eq!(Entry::decode(&raw).unwrap().escaped, "new");
            let (_, action) = w.headers(3);
            assert_eq!(action, Action::Continue, "served from L1");
        }
    }

    #[test]
    fn requests_without_an_invalidation_in_between_still_join() {
        let shared = SharedData::default();
        // An expired entry exists: the fill keeps its CAS version, joiners see it too.
        let w = W::new(&shared, config(r#","cache":{"ttl_seconds":1}"#));
        w.run(1, vec![redis_hit("D")]);
        w.host.now.set(w.host.now.get() + 2_000);
        w.headers(2);
        w.headers(3);
        assert_eq!(w.host.counter(Counter::Coalesced), 1);
    }

    #[test]
    fn concurrent_misses_for_one_agent_make_one_fill_and_all_get_its_answer() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (f1, _) = w.headers(1);
        let (f2, a2) = w.headers(2);
        let (f3, a3) = w.headers(3);
        assert_eq!((a2, a3), (Action::Pause, Action::Pause));
        assert_eq!(
            w.host.callouts.borrow().len(),
            1,
            "one L2 read for three requests"
        );
        assert_eq!(w.host.counter(Counter::Coalesced), 2);
        let (f1, _) = w.answer(1, f1, redis_miss());
        assert_eq!(w.host.callouts.borrow().len(), 2, "one L3 read");
        let (f1, _) = w.answer(1, f1, store_answer(Some("Be \"terse\".")));
        for id in [1, 2, 3] {
            assert_eq!(w.host.req(id).resumed, 1, "request {id} resumed");
            assert_eq!(w.tier(id).as_deref(), Some("store"));
        }
        for (id, flow) in [(1, f1), (2, f2), (3, f3)] {
            let (flow, action) = w.body_end(id, flow);
            assert_eq!(action, Action::Continue);
            assert!(matches!(flow.state, State::Forward));
            assert_eq!(w.body(id), INJECTED);
        }
        assert_eq!(w.host.counter(Counter::Injected), 3);
        assert_eq!(w.host.current.get(), 3);
        assert!(w.worker.borrow().ready.is_empty());
    }

    #[test]
    fn coalesced_requests_share_a_failure() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (f1, _) = w.headers(1);
        let (_f2, _) = w.headers(2);
        let (f1, _) = w.answer(1, f1, failed());
        w.answer(1, f1, failed());
        assert_eq!(w.reply_status(1), Some(503));
        assert_eq!(w.reply_status(2), Some(503));
        assert_eq!(w.host.counter(Counter::RejectedDirectiveUnavailable), 2);
    }

    #[test]
    fn a_waiter_is_not_stranded_when_the_fill_owner_goes_away() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        let (_f1, _) = w.headers(1);
        let (f2, _) = w.headers(2);
        // Client 1 disconnects: its context is gone, and with it the routing of the
        // callout answer (the SDK drops answers for unknown contexts).
        w.worker.borrow_mut().forget(1);
        w.host.requests.borrow_mut().remove(&1);
        assert_eq!(w.worker.borrow().orphans().len(), 1);
        on_root_tick(&w.ctx(ROOT));
        assert_eq!(w.host.callouts.borrow().len(), 2, "the root asked again");
        let (token, _) = w.host.last_callout();
        on_root_callout(token, redis_hit("Be \"terse\"."), &w.ctx(ROOT));
        assert_eq!(w.host.req(2).resumed, 1);
        let (f2, _) = w.body_end(2, f2);
        assert!(matches!(f2.state, State::Forward));
        assert_eq!(w.body(2), INJECTED);
        assert!(w.worker.borrow().orphans().is_empty());
    }

    #[test]
    fn a_fill_nobody_waits_for_is_dropped() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.headers(1);
        w.worker.borrow_mut().forget(1);
        assert!(w.worker.borrow().fills.is_empty());
        assert!(w.worker.borrow().tokens.is_empty());
    }

    #[test]
    fn a_waiter_with_a_too_large_body_leaves_the_fill_for_the_others() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(r#","inject":{"max_body_bytes":100}"#));
        let (f1, _) = w.headers(1);
        let (f2, _) = w.headers(2);
        let (_f2, _) = w.ev(
            2,
            f2,
            Event::Body {
                size: 500,
                end_of_stream: false,
            },
        );
        assert_eq!(w.reply_status(2), Some(413));
        let (f1, _) = w.answer(1, f1, redis_hit("Be \"terse\"."));
        assert_eq!(w.host.req(2).resumed, 0, "a refused request is not resumed");
        let (f1, _) = w.body_end(1, f1);
        assert!(matches!(f1.state, State::Forward));
    }

    #[test]
    fn redis_breaker_opens_skips_l2_then_probes() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        for i in 0..BREAKER_THRESHOLD {
            let agent = format!("00000000-0000-4000-8000-{:012}", i);
            let agent: &'static str = Box::leak(agent.into_boxed_str());
            let (f, _) = w.headers_with(10 + i, head(Some(agent)));
            let (f, _) = w.answer(10 + i, f, failed());
            let store = ok(&serde_json::json!({"agent_id": agent, "content": null}).to_string());
            w.answer(10 + i, f, store);
        }
        assert_eq!(w.host.counter(Counter::L2BreakerOpen), 1);
        let before = w.host.callouts.borrow().len();
        let (f, _) = w.headers(1);
        assert_eq!(w.host.counter(Counter::L2Skipped), 1);
        assert_eq!(
            w.host.last_callout().1.cluster,
            "ibex_store",
            "straight to L3"
        );
        assert_eq!(w.host.callouts.borrow().len(), before + 1);
        w.answer(1, f, store_answer(Some("D")));

        w.host.now.set(w.host.now.get() + BREAKER_COOL_OFF_MS);
        let (f, _) = w.headers_with(2, head(Some("00000000-0000-4000-8000-0000000000ff")));
        assert_eq!(
            w.host.last_callout().1.cluster,
            "ibex_redis",
            "one probe after the cool-off"
        );
        w.answer(2, f, redis_hit("D"));
        assert_eq!(w.host.counter(Counter::L2BreakerClose), 1);
    }

    #[test]
    fn write_backs_are_not_sent_while_the_redis_breaker_is_open() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        w.run(1, vec![redis_miss(), store_answer(Some("D"))]);
        for _ in 0..BREAKER_THRESHOLD {
            w.worker.borrow_mut().redis.failure(w.host.now.get());
        }
        let before = w.host.callouts.borrow().len();
        on_root_tick(&w.ctx(ROOT));
        assert_eq!(w.host.callouts.borrow().len(), before);
        assert_eq!(w.host.counter(Counter::L2WriteDropped), 1);
        assert!(w.worker.borrow().pending_writes.is_empty());
    }

    #[test]
    fn store_breaker_open_fails_fast_without_a_callout() {
        let shared = SharedData::default();
        let w = W::new(&shared, config(""));
        for _ in 0..BREAKER_THRESHOLD {
            w.worker.borrow_mut().store.failure(w.host.now.get());
        }
        w.host
            .fail_dispatch_to
            .borrow_mut()
            .push("ibex_redis".into());
        let (flow, _) = w.headers(1);
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(w.reply_status(1), Some(503));
        assert!(w.host.callouts.borrow().is_empty());
        assert_eq!(w.host.counter(Counter::L3Skipped), 1);
    }
}
