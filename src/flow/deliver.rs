//! Delivery: a decided outcome applied to the requests it answers, each in its own
//! context (headers set, resumed or refused), and the splice of the directive into a
//! complete buffered body.
//!
//! Every request leaves here with its directive spliced in, or refused, or forwarded
//! because it has none (or `failure_mode` is open): never forwarded with a body that
//! was supposed to carry a directive and does not. No reply carries directive text.

use super::{Ctx, Resume};
use crate::audit;
use crate::entry::Known;
use crate::host::Host;
use crate::inject::{splice, Options};
use crate::json::BodyError;
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::worker::{BodySeen, Delivered, Injection, Participant, Then};

use super::Action;

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

/// What a finished resolution means for the requests that waited for it.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    /// The directive, or that there is none.
    Known(Known),
    /// Unknowable, forwarded anyway (`failure_mode: open`).
    FailOpen,
    /// Refused.
    Refuse(Refusal),
}

/// Applies a finished fill's outcome to every participant. Returns what it did for
/// the current context if that took part; the others find theirs with the worker.
/// The current context's own answer is applied first, before any switch, so the
/// host acts on it wherever it stands in the list. Makes no callout: a callout's
/// answer belongs to the context whose callback runs, not the one switched to.
pub(super) fn complete<H: Host>(
    mut participants: Vec<Participant>,
    outcome: Outcome,
    source: Source,
    ctx: &Ctx<'_, H>,
) -> Option<(Delivered, Action)> {
    let own = participants
        .iter()
        .position(|p| p.id == ctx.id)
        .map(|at| participants.remove(at))
        .map(|p| apply(outcome.clone(), source, p.then, p.body, ctx));
    let mut switched = false;
    for p in participants {
        if ctx.host.switch_to(p.id).is_err() {
            // Gone without telling us: nothing to resume.
            continue;
        }
        switched = true;
        // Another participant's headers are held: it goes on when resumed.
        let theirs = Ctx {
            id: p.id,
            resume: Resume::ByCall,
            ..*ctx
        };
        let (done, _) = apply(outcome.clone(), source, p.then, p.body, &theirs);
        ctx.worker.borrow_mut().deliver(p.id, done);
    }
    if switched && ctx.host.switch_to(ctx.id).is_err() {
        log::warn!(
            "ibex_directive: could not switch back to context {}",
            ctx.id
        );
    }
    own
}

/// The answer is known for one request (the effective context). Its headers are
/// still modifiable here.
///
/// With a key's agent (`Known::Agent`) only what the headers decided is left to do
/// (`Then::Pass`, `Then::Refuse`); a request that wants a directive was moved on to
/// its agent's directive before this, so an agent's answer under `Then::Inject` is
/// a broken flow, refused rather than forwarded without its directive.
pub(super) fn apply<H: Host>(
    outcome: Outcome,
    source: Source,
    then: Then,
    body: BodySeen,
    ctx: &Ctx<'_, H>,
) -> (Delivered, Action) {
    {
        let mut worker = ctx.worker.borrow_mut();
        let record = &mut worker.audit(ctx.id).record;
        record.tier = Some(source);
        if let Outcome::Known(Known::Directive(_, version)) = &outcome {
            record.version = Some(*version);
        }
    }
    let (outcome, format) = match (outcome, then) {
        (Outcome::Refuse(refusal), _) => return refuse(refusal, ctx),
        (_, Then::Refuse(refusal)) => return refuse(refusal, ctx),
        (Outcome::Known(Known::Agent(_)), Then::Pass) => {
            ctx.host.count(Counter::PassedThrough);
            record(audit::Outcome::Passed, ctx);
            return go_on(Delivered::Forwarded, ctx);
        }
        (Outcome::Known(Known::Agent(_) | Known::NoAgent), _) | (_, Then::Pass) => {
            return refuse(Refusal::DirectiveUnavailable, ctx)
        }
        (outcome, Then::Inject(format)) => (outcome, format),
    };
    let escaped = match outcome {
        Outcome::Refuse(refusal) => return refuse(refusal, ctx),
        Outcome::FailOpen => {
            ctx.host.count(Counter::FailedOpen);
            set_debug_header(Source::None, ctx);
            ctx.worker.borrow_mut().audit(ctx.id).record.tier = Some(Source::None);
            record(audit::Outcome::FailedOpen, ctx);
            return go_on(Delivered::Forwarded, ctx);
        }
        Outcome::Known(Known::NoDirective) => {
            if source == Source::Stale {
                ctx.host.count(Counter::StaleServed);
            }
            ctx.host.count(Counter::NoDirective);
            set_debug_header(source, ctx);
            record(audit::Outcome::NoDirective, ctx);
            return go_on(Delivered::Forwarded, ctx);
        }
        Outcome::Known(Known::Directive(escaped, _)) => escaped,
        Outcome::Known(Known::Agent(_) | Known::NoAgent) => {
            return refuse(Refusal::DirectiveUnavailable, ctx)
        }
    };
    if source == Source::Stale {
        ctx.host.count(Counter::StaleServed);
    }
    set_debug_header(source, ctx);
    // The body grows: its old length would be a lie. Envoy frames it anew.
    let _ = ctx.host.set_request_header("content-length", None);
    let injection = Injection { format, escaped };
    match body {
        BodySeen::Complete(size) => match inject(&injection, size, ctx) {
            (Delivered::Forwarded, _) => go_on(Delivered::Forwarded, ctx),
            refused => refused,
        },
        BodySeen::NotYet => go_on(Delivered::Inject(injection), ctx),
        // Part of the body is buffered already (a host that delivers body data while
        // headers are held, e.g. with allow_on_headers_stop_iteration): resuming now
        // would release that part unspliced. The request stays held; the end of its
        // body splices and continues headers and body together.
        BodySeen::Partial => (Delivered::Inject(injection), Action::Pause),
    }
}

/// Splices the directive into the complete buffered body.
pub(super) fn inject<H: Host>(i: &Injection, size: usize, ctx: &Ctx<'_, H>) -> (Delivered, Action) {
    let body = match ctx.host.request_body(size) {
        Ok(b) => b,
        Err(_) => return refuse(Refusal::DirectiveUnavailable, ctx),
    };
    let options = Options {
        message_prefix: &ctx.config.chat_message_prefix,
        cache_control: ctx.config.cache_control,
        max_output: ctx.config.max_spliced_bytes,
    };
    match splice(i.format, &body, &options, i.escaped.expose()) {
        Ok(out) => {
            if ctx.host.replace_request_body(body.len(), &out).is_err() {
                return refuse(Refusal::DirectiveUnavailable, ctx);
            }
            ctx.host.count(Counter::Injected);
            record(audit::Outcome::Injected, ctx);
            (Delivered::Forwarded, Action::Continue)
        }
        Err(BodyError::Oversized) => refuse(Refusal::BodyTooLarge, ctx),
        Err(e) => refuse(Refusal::InvalidBody(e), ctx),
    }
}

/// Answers the request with a local reply.
pub(super) fn refuse<H: Host>(refusal: Refusal, ctx: &Ctx<'_, H>) -> (Delivered, Action) {
    ctx.host.count(refusal.counter());
    record(audit::Outcome::refused(&refusal), ctx);
    // A request without an agent lacks the key header with the api_key source.
    let header = ctx
        .config
        .agent_source
        .key_header()
        .unwrap_or(&ctx.config.agent_header);
    let body = refusal.body(header);
    if ctx.host.send_json_reply(refusal.status(), &body).is_err() {
        log::warn!(
            "ibex_directive: could not send local reply {}",
            refusal.code()
        );
    }
    (Delivered::Refused, Action::Pause)
}

/// Lets the request go on: from its headers callback by returning Continue, from
/// anywhere else by resuming it.
fn go_on<H: Host>(done: Delivered, ctx: &Ctx<'_, H>) -> (Delivered, Action) {
    match ctx.resume {
        Resume::ByReturning => (done, Action::Continue),
        Resume::ByCall => {
            if ctx.host.resume_request().is_err() {
                log::warn!("ibex_directive: could not resume request");
            }
            (done, Action::Pause)
        }
    }
}

/// Writes the request's audit record with its outcome: once per request, at the
/// point its fate is decided, in its own context (the host acts on the current one).
pub(super) fn record<H: Host>(outcome: audit::Outcome, ctx: &Ctx<'_, H>) {
    let layout = ctx.config.audit_filter_state;
    if layout == audit::Layout::Off && !ctx.config.audit_response_header {
        return;
    }
    let fields = {
        let mut worker = ctx.worker.borrow_mut();
        let trail = worker.audit(ctx.id);
        let fields = trail.record.fields(outcome);
        // Kept only for the response header, when it is on.
        if ctx.config.audit_response_header {
            trail.sent = Some(fields.directive_version.clone());
        }
        fields
    };
    if layout != audit::Layout::Off && ctx.host.record_audit(&fields, layout).is_err() {
        log::debug!("ibex_directive: could not record the audit fields");
    }
}

fn set_debug_header<H: Host>(source: Source, ctx: &Ctx<'_, H>) {
    if ctx.config.debug_headers {
        let _ = ctx
            .host
            .set_request_header(super::DEBUG_HEADER, Some(source.as_str()));
    }
}
