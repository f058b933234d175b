//! The life of one data-role request, as a state machine that is moved through its
//! callbacks: each host callback becomes an [`Event`], [`Flow::on_event`] consumes the
//! flow and returns the next one with the [`Action`] for Envoy.
//!
//! ```text
//! Start ──headers──► Forward                          (no agent/pass, other path, L1 "none")
//!   │                Replied                          (400/401/413/415)
//!   │                Injecting ──body end──► Forward  (L1 hit: splice at end of body)
//!   └──L1 miss────► Waiting ──fill delivered──► Injecting | Forward | Replied
//! ```
//!
//! Where each part lives:
//! - `admit`: which requests are looked at at all (pure: headers and config in, a
//!   decision out);
//! - `l1`: the L1 lookup and write, against shared data with CAS;
//! - `fill`: **the resolution flow**: start or join a fill, ask L2 then L3, read
//!   their answers, fall back on stale or `failure_mode`;
//! - `deliver`: a known answer applied to every request that waited for it, and the
//!   splice into the buffered body;
//! - `root`: the root context's tick (L2 write-backs, orphaned fills).
//!
//! **Fills are per agent and per worker, not per request.** The first request that
//! misses L1 for an agent starts a fill; every other request for that agent arriving
//! meanwhile joins it (`coalesced`) instead of asking again. When the fill has its
//! answer, it is applied to every participant: the host layer switches to each
//! participant's context to set its headers and resume it, and the worker keeps what
//! was done ([`Delivered`]) for the participant's next callback.
//!
//! **A body is released only after it was spliced.** A request whose body ends in
//! trailers (HTTP/2 HEADERS after DATA, or chunked HTTP/1.1 trailers) never gets an
//! end-of-stream body callback, and the body cannot be rewritten from the trailers
//! callback, so such a request is refused while a directive is (or may be) due; a
//! request that is only forwarded (no agent in pass mode, a pass path, an agent
//! without a directive) keeps its trailers.
//!
//! Headers are held (paused) only while a fill runs. Envoy's default for proxy-wasm
//! 0.2 turns a paused header callback into "stop all", so the body reaches the filter
//! only after `resume`; when the host does deliver the body while headers are held,
//! it is buffered and spliced as soon as the directive is known. Either way the body
//! is buffered to its end before the directive is spliced in, and a body that cannot
//! take it is refused, never forwarded without it.
//!
//! No directive text is ever logged here or anywhere else.

mod admit;
mod deliver;
mod fill;
mod l1;
mod root;

use std::cell::RefCell;

use crate::config::{AgentSource, Config};
use crate::host::Host;
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::tiers::Response;
use crate::worker::{BodySeen, Delivered, FillId, Injection, Subject, Then, Worker};

pub use admit::HeadFields;
pub use deliver::Source;
pub use root::{on_root_callout, on_root_tick};

/// Request header carrying the tier that answered, when `debug_headers` is on.
pub const DEBUG_HEADER: &str = ibex_wire::DEBUG_HEADER;

/// Something that happened to the request.
#[derive(Debug)]
pub enum Event<'a> {
    /// Request headers arrived.
    Headers {
        /// The headers the flow looks at.
        head: &'a HeadFields,
        /// The request has no body.
        end_of_stream: bool,
    },
    /// Request body data arrived; `size` is everything buffered so far.
    Body {
        /// Bytes buffered so far.
        size: usize,
        /// This is the last of the body.
        end_of_stream: bool,
    },
    /// Request trailers arrived (HTTP/2, or HTTP/1.1 chunked when the codec passes
    /// them on): the body ended without an end-of-stream body callback.
    Trailers,
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

/// How the request a callback runs for goes on once its answer is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Its headers callback is running: it goes on by returning `Continue`.
    ByReturning,
    /// Its headers are held: it goes on by `resume_request`.
    ByCall,
}

/// Everything a callback works with: host calls, configuration, the worker's shared
/// state, and the id of the context the callback runs in.
pub struct Ctx<'a, H: Host> {
    host: &'a H,
    config: &'a Config,
    worker: &'a RefCell<Worker>,
    id: u32,
    resume: Resume,
}

impl<'a, H: Host> Ctx<'a, H> {
    /// The context of a callback that runs in context `id` (a request, or the root).
    pub fn new(host: &'a H, config: &'a Config, worker: &'a RefCell<Worker>, id: u32) -> Self {
        Ctx {
            host,
            config,
            worker,
            id,
            resume: Resume::ByCall,
        }
    }

    /// The same context, inside the request's headers callback.
    fn in_headers(&self) -> Self {
        Ctx {
            resume: Resume::ByReturning,
            ..*self
        }
    }
}

impl<H: Host> Clone for Ctx<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H: Host> Copy for Ctx<'_, H> {}

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
    /// The directive is known; waiting for the end of the body to splice it in.
    Injecting(Injection),
}

impl From<Delivered> for State {
    fn from(d: Delivered) -> State {
        match d {
            Delivered::Forwarded => State::Forward,
            Delivered::Refused => State::Replied,
            Delivered::Inject(i) => State::Injecting(i),
            Delivered::Waiting(fill) => State::Waiting(fill),
        }
    }
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
            (
                State::Start,
                Event::Headers {
                    head,
                    end_of_stream,
                },
            ) => on_headers(head, end_of_stream, &ctx.in_headers()),
            (state, Event::Callout { token, response }) => {
                // The answer may finish a fill this request takes part in; the fill
                // leaves this request's next state with the worker like for everyone
                // else.
                fill::on_callout(token, &response, ctx);
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
            (State::Waiting(fill), Event::Trailers) => {
                ctx.worker.borrow_mut().leave(fill, ctx.id);
                settled(deliver::refuse(Refusal::RequestTrailers, ctx))
            }
            // The body is buffered, not spliced: `set_buffer` is refused in the
            // trailers callback, and continuing would release it unspliced.
            (State::Injecting(_), Event::Trailers) => {
                settled(deliver::refuse(Refusal::RequestTrailers, ctx))
            }
            (State::Replied, _) => (State::Replied, Action::Pause),
            (state @ State::Forward, _) => (state, Action::Continue),
            // Headers twice, or body before headers: the host broke its contract.
            // Forwarding untouched could bypass the directive, so refuse.
            (_, _) => settled(deliver::refuse(Refusal::DirectiveUnavailable, ctx)),
        };
        (Flow { state }, action)
    }
}

/// A waiting request takes the state its fill left for it, if it has finished.
fn pick_up<H: Host>(state: State, ctx: &Ctx<'_, H>) -> State {
    if !matches!(state, State::Waiting(_)) {
        return state;
    }
    match ctx.worker.borrow_mut().take_delivered(ctx.id) {
        Some(delivered) => delivered.into(),
        None => state,
    }
}

fn on_headers<H: Host>(
    head: &HeadFields,
    end_of_stream: bool,
    ctx: &Ctx<'_, H>,
) -> (State, Action) {
    ctx.host.count(Counter::Requests);
    if let Some(trace) = head.traceparent.as_deref() {
        if crate::audit::valid_traceparent(trace) {
            ctx.worker.borrow_mut().audit(ctx.id).traceparent = Some(trace.to_string());
        }
    }
    let verified = match &ctx.config.agent_source {
        AgentSource::Header => None,
        AgentSource::Jwt(jwt) => {
            // The client's agent header is never consulted and never forwarded,
            // whatever happens to the request next. Neither token nor claim is logged.
            let _ = ctx.host.set_request_header(&ctx.config.agent_header, None);
            ctx.host.property(&jwt.property_path()).ok().flatten()
        }
        AgentSource::ApiKey(key) => {
            // Neither the gateway key nor a client's agent header reaches the
            // upstream, whatever happens next; the key was read into `head` already.
            let _ = ctx.host.set_request_header(&ctx.config.agent_header, None);
            let _ = ctx.host.set_request_header(&key.header, None);
            None
        }
    };
    let route = head
        .path
        .as_deref()
        .map(|p| ctx.worker.borrow_mut().route(p, ctx.config));
    match admit::admit_routed(head, route, verified.as_deref(), end_of_stream, ctx.config) {
        admit::Admission::Pass => {
            ctx.host.count(Counter::PassedThrough);
            deliver::record(crate::audit::Outcome::Passed, ctx);
            (State::Forward, Action::Continue)
        }
        admit::Admission::Refuse(refusal) => settled(deliver::refuse(refusal, ctx)),
        admit::Admission::Resolve { agent, format } => {
            fill::resolve(Subject::Directive(agent), Then::Inject(format), ctx)
        }
        admit::Admission::Identify { key, then } => fill::resolve(Subject::Key(key), then, ctx),
    }
}

fn on_body_while_waiting<H: Host>(
    fill: FillId,
    size: usize,
    end_of_stream: bool,
    ctx: &Ctx<'_, H>,
) -> (State, Action) {
    // The limit is for bodies the directive goes into. A request that will only be
    // forwarded (its key's lookup is what it waits for) is held to Envoy's own
    // buffer limit, as it would be forwarded at once with its key cached.
    if size as u64 > ctx.config.max_body_bytes && ctx.worker.borrow().splices(fill, ctx.id) {
        // Leave the fill (it goes on for the others), then refuse.
        ctx.worker.borrow_mut().leave(fill, ctx.id);
        return settled(deliver::refuse(Refusal::BodyTooLarge, ctx));
    }
    let seen = if end_of_stream {
        BodySeen::Complete(size)
    } else {
        BodySeen::Partial
    };
    if !ctx.worker.borrow_mut().note_body(fill, ctx.id, seen) {
        // Neither waiting nor answered: the fill lost track of this request.
        return settled(deliver::refuse(Refusal::DirectiveUnavailable, ctx));
    }
    (State::Waiting(fill), Action::Pause)
}

fn on_body_to_inject<H: Host>(
    i: Injection,
    size: usize,
    end_of_stream: bool,
    ctx: &Ctx<'_, H>,
) -> (State, Action) {
    if size as u64 > ctx.config.max_body_bytes {
        return settled(deliver::refuse(Refusal::BodyTooLarge, ctx));
    }
    if !end_of_stream {
        return (State::Injecting(i), Action::Pause);
    }
    settled(deliver::inject(&i, size, ctx))
}

/// The request's state after delivery did this for it.
fn settled((done, action): (Delivered, Action)) -> (State, Action) {
    (done.into(), action)
}

#[cfg(test)]
mod tests;
