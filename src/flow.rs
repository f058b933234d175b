//! The life of one data-role request, as a state machine that is moved through its
//! callbacks: each host callback becomes an [`Event`], [`Flow::on_event`] consumes the
//! flow and returns the next one with the [`Action`] for Envoy.
//!
//! ```text
//! Start ──headers──► Forward                      (no agent/pass, other path, L1 "none")
//!   │                Replied                      (400/401/413/415)
//!   │                Injecting ─body end─► Forward (L1 hit: splice at end of body)
//!   └──L1 miss────► Resolving(L2) ─miss/error─► Resolving(L3)
//!                        │ hit                       │ answer / error
//!                        ▼                           ▼
//!                  Injecting or Forward     Injecting, Forward, stale, 503 or fail-open
//! ```
//!
//! Headers are held (paused) only while a callout is in flight. Envoy's default for
//! proxy-wasm 0.2 turns a paused header callback into "stop all", so the body reaches
//! the filter only after `resume`; when the host does deliver the body while headers
//! are held, it is buffered and spliced as soon as the directive is known. Either
//! way the body is buffered to its end before the directive is spliced in, and a
//! body that cannot take it is refused, never forwarded without it.
//!
//! No directive text is ever logged here or anywhere else.

use crate::agent::AgentId;
use crate::config::{Config, FailureMode, MissingAgent};
use crate::entry::{self, Entry, Kind};
use crate::escape::escape_json_str;
use crate::host::{Host, HostError};
use crate::inject::{splice, Format};
use crate::metrics::Counter;
use crate::reply::Refusal;
use crate::tiers::{self, Answer, Response};

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

/// A request's state. Created per request, moved through every callback.
#[derive(Debug)]
pub struct Flow {
    state: State,
    /// The L2 write-back of this request, to count its outcome if it answers while
    /// the request is still alive (the write itself is owned by the root context and
    /// completes regardless).
    write_token: Option<u32>,
}

#[derive(Debug)]
enum State {
    Start,
    /// Nothing left to do; everything continues.
    Forward,
    /// A local reply was sent.
    Replied,
    Resolving(Resolving),
    Injecting(Injecting),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Redis,
    Store,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodySeen {
    NotYet,
    Partial,
    Complete(usize),
}

/// An expired entry kept in case L2 and L3 both fail.
struct Stale {
    escaped: Option<String>,
    usable_until_ms: u64,
}

impl std::fmt::Debug for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stale")
            .field("present", &self.escaped.is_some())
            .field("usable_until_ms", &self.usable_until_ms)
            .finish()
    }
}

#[derive(Debug)]
struct Resolving {
    agent: AgentId,
    format: Format,
    key: String,
    token: u32,
    tier: Tier,
    /// CAS version of the L1 key when the fill started: the fill may only write L1
    /// (and then L2) if nothing, an invalidation in particular, wrote it since.
    cas: Option<u32>,
    /// Global generation when the fill started.
    generation: u64,
    stale: Option<Stale>,
    body: BodySeen,
}

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

/// The answer for a request once resolution is over.
enum Outcome {
    Present(String),
    Absent,
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
            write_token: None,
        }
    }

    /// Whether the flow has a callout in flight (used by the host layer to decide
    /// whether a callout answer belongs to it).
    pub fn is_resolving(&self) -> bool {
        matches!(self.state, State::Resolving(_))
    }

    /// Feeds one event; returns the next flow and what Envoy should do.
    pub fn on_event<H: Host>(self, event: Event<'_>, host: &H, config: &Config) -> (Flow, Action) {
        let Flow {
            state,
            mut write_token,
        } = self;
        let (state, action) = match (state, event) {
            (State::Start, Event::Headers(head)) => on_headers(head, host, config),
            (State::Resolving(r), Event::Callout { token, response }) if token == r.token => {
                on_tier_answer(r, response, host, config, &mut write_token)
            }
            (state, Event::Callout { token, response }) => {
                if write_token == Some(token) {
                    write_token = None;
                    match tiers::redis_set_outcome(&response) {
                        tiers::WriteOutcome::Written => {}
                        tiers::WriteOutcome::Skipped => host.count(Counter::L2WriteSkipped),
                        tiers::WriteOutcome::Failed => host.count(Counter::L2WriteError),
                    }
                }
                // Answers for nothing we wait on change nothing; a callout answer
                // never resumes or pauses the request by itself.
                (state, Action::Pause)
            }
            (
                State::Resolving(r),
                Event::Body {
                    size,
                    end_of_stream,
                },
            ) => on_body_while_resolving(r, size, end_of_stream, host, config),
            (
                State::Injecting(i),
                Event::Body {
                    size,
                    end_of_stream,
                },
            ) => on_body_to_inject(i, size, end_of_stream, host, config),
            (State::Replied, _) => (State::Replied, Action::Pause),
            (state @ State::Forward, _) => (state, Action::Continue),
            // Headers twice, or body before headers: the host broke its contract.
            // Forwarding untouched could bypass the directive, so refuse.
            (_, _) => refuse(Refusal::DirectiveUnavailable, host, config),
        };
        (Flow { state, write_token }, action)
    }
}

fn refuse<H: Host>(refusal: Refusal, host: &H, config: &Config) -> (State, Action) {
    host.count(refusal.counter());
    let body = refusal.body(&config.agent_header);
    if host.send_json_reply(refusal.status(), &body).is_err() {
        log::warn!(
            "ibex_directive: could not send local reply {}",
            refusal.code()
        );
    }
    (State::Replied, Action::Pause)
}

fn forward_untouched<H: Host>(host: &H, counter: Counter) -> (State, Action) {
    host.count(counter);
    (State::Forward, Action::Continue)
}

fn on_headers<H: Host>(head: RequestHead<'_>, host: &H, config: &Config) -> (State, Action) {
    host.count(Counter::Requests);
    let agent = match head.agent {
        None => {
            return match config.missing_agent {
                MissingAgent::Pass => forward_untouched(host, Counter::PassedThrough),
                MissingAgent::Reject => refuse(Refusal::MissingAgentId, host, config),
            }
        }
        Some(value) => match AgentId::parse(value) {
            Some(agent) => agent,
            None => return refuse(Refusal::InvalidAgentId, host, config),
        },
    };
    let Some(format) = head.path.and_then(|p| config.format_for(p)) else {
        return forward_untouched(host, Counter::PassedThrough);
    };
    if head.end_of_stream {
        // No body: nothing a model could read, and nothing to put a directive into.
        return forward_untouched(host, Counter::PassedThrough);
    }
    if let Some(enc) = head.content_encoding {
        let enc = enc.trim();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            return refuse(Refusal::UnsupportedEncoding, host, config);
        }
    }
    if let Some(len) = head
        .content_length
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if len > config.max_body_bytes {
            return refuse(Refusal::BodyTooLarge, host, config);
        }
    }

    let generation = entry::decode_generation(
        host.shared_get(entry::GENERATION_KEY)
            .ok()
            .and_then(|(v, _)| v)
            .as_deref(),
    );
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
                return resolved(
                    outcome,
                    Source::Local,
                    format,
                    BodySeen::NotYet,
                    host,
                    config,
                    false,
                );
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
    let resolving = Resolving {
        agent,
        format,
        key,
        token: 0,
        tier: Tier::Redis,
        cas,
        generation,
        stale,
        body: BodySeen::NotYet,
    };
    match host.dispatch(&tiers::redis_get(config, &agent)) {
        Ok(token) => (
            State::Resolving(Resolving { token, ..resolving }),
            Action::Pause,
        ),
        Err(_) => {
            host.count(Counter::L2Error);
            ask_store(resolving, host, config, false)
        }
    }
}

/// Moves a fill on to L3. `held`: headers are paused (we are in a callout answer).
fn ask_store<H: Host>(r: Resolving, host: &H, config: &Config, held: bool) -> (State, Action) {
    match host.dispatch(&tiers::store_get(config, &r.agent)) {
        Ok(token) => (
            State::Resolving(Resolving {
                token,
                tier: Tier::Store,
                ..r
            }),
            Action::Pause,
        ),
        Err(_) => {
            host.count(Counter::L3Error);
            unknowable(r, host, config, held)
        }
    }
}

fn on_tier_answer<H: Host>(
    r: Resolving,
    response: Response,
    host: &H,
    config: &Config,
    write_token: &mut Option<u32>,
) -> (State, Action) {
    match r.tier {
        Tier::Redis => match tiers::parse_redis_get(&response) {
            Ok(Answer::Directive(text)) => {
                host.count(Counter::L2Hit);
                let escaped = escape_json_str(&text);
                cache_locally(&r, Some(&escaped), config.ttl_seconds, host);
                resolved(
                    Outcome::Present(escaped),
                    Source::Redis,
                    r.format,
                    r.body,
                    host,
                    config,
                    true,
                )
            }
            Ok(Answer::NoDirective) => {
                host.count(Counter::L2Hit);
                cache_locally(&r, None, config.negative_ttl_seconds, host);
                resolved(
                    Outcome::Absent,
                    Source::Redis,
                    r.format,
                    r.body,
                    host,
                    config,
                    true,
                )
            }
            Ok(Answer::Unknown) => {
                host.count(Counter::L2Miss);
                ask_store(r, host, config, true)
            }
            Err(e) => {
                host.count(Counter::L2Error);
                log::debug!("ibex_directive: agent {} redis: {}", r.agent, e.0);
                ask_store(r, host, config, true)
            }
        },
        Tier::Store => match tiers::parse_store(&response, &r.agent) {
            Ok(answer) => {
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
                // Redis is written only when L1 accepted the fill: a fill that an
                // invalidation overtook must not put its old answer back into L2.
                if cache_locally(&r, escaped.as_deref(), ttl, host) {
                    match host.dispatch(&tiers::redis_set(config, &r.agent, text, ttl)) {
                        Ok(token) => {
                            host.count(Counter::L2Write);
                            *write_token = Some(token);
                        }
                        Err(_) => host.count(Counter::L2WriteError),
                    }
                }
                let outcome = match escaped {
                    Some(e) => Outcome::Present(e),
                    None => Outcome::Absent,
                };
                resolved(outcome, Source::Store, r.format, r.body, host, config, true)
            }
            Err(e) => {
                host.count(Counter::L3Error);
                log::debug!("ibex_directive: agent {} store: {}", r.agent, e.0);
                unknowable(r, host, config, true)
            }
        },
    }
}

/// Writes the fill's answer to L1 under the CAS version read when it started.
/// Returns whether it was written.
fn cache_locally<H: Host>(
    r: &Resolving,
    escaped: Option<&str>,
    ttl_seconds: u64,
    host: &H,
) -> bool {
    let entry = Entry {
        kind: if escaped.is_some() {
            Kind::Present
        } else {
            Kind::Absent
        },
        fresh_until_ms: host
            .now_ms()
            .saturating_add(ttl_seconds.saturating_mul(1000)),
        generation: r.generation,
        escaped: escaped.unwrap_or(""),
    };
    match host.shared_set(&r.key, &entry.encode(), r.cas) {
        Ok(()) => true,
        Err(HostError::CasMismatch) => {
            host.count(Counter::FillDiscarded);
            false
        }
        Err(e) => {
            log::warn!(
                "ibex_directive: agent {} shared data write failed: {:?}",
                r.agent,
                e
            );
            false
        }
    }
}

/// L2 and L3 both failed: serve stale if allowed, else follow `failure_mode`.
fn unknowable<H: Host>(r: Resolving, host: &H, config: &Config, held: bool) -> (State, Action) {
    if let Some(stale) = r.stale {
        if host.now_ms() < stale.usable_until_ms {
            host.count(Counter::StaleServed);
            let outcome = match stale.escaped {
                Some(e) => Outcome::Present(e),
                None => Outcome::Absent,
            };
            return resolved(outcome, Source::Stale, r.format, r.body, host, config, held);
        }
    }
    match config.failure_mode {
        FailureMode::Closed => refuse(Refusal::DirectiveUnavailable, host, config),
        FailureMode::Open => {
            host.count(Counter::FailedOpen);
            set_debug_header(Source::None, host, config);
            continue_request(State::Forward, host, held)
        }
    }
}

fn set_debug_header<H: Host>(source: Source, host: &H, config: &Config) {
    if config.debug_headers {
        let _ = host.set_request_header(DEBUG_HEADER, Some(source.as_str()));
    }
}

/// Lets the request go on: from the headers callback by returning Continue, from a
/// callout answer by resuming it.
fn continue_request<H: Host>(state: State, host: &H, held: bool) -> (State, Action) {
    if !held {
        return (state, Action::Continue);
    }
    if host.resume_request().is_err() {
        log::warn!("ibex_directive: could not resume request");
    }
    (state, Action::Pause)
}

/// The answer is known. Headers are still modifiable here.
fn resolved<H: Host>(
    outcome: Outcome,
    source: Source,
    format: Format,
    body: BodySeen,
    host: &H,
    config: &Config,
    held: bool,
) -> (State, Action) {
    set_debug_header(source, host, config);
    let escaped = match outcome {
        Outcome::Absent => {
            host.count(Counter::NoDirective);
            return continue_request(State::Forward, host, held);
        }
        Outcome::Present(escaped) => escaped,
    };
    // The body grows: its old length would be a lie. Envoy frames it anew.
    let _ = host.set_request_header("content-length", None);
    let injecting = Injecting { format, escaped };
    match body {
        BodySeen::Complete(size) => match inject(injecting, size, host, config) {
            (State::Forward, _) => continue_request(State::Forward, host, held),
            other => other,
        },
        _ => continue_request(State::Injecting(injecting), host, held),
    }
}

fn on_body_while_resolving<H: Host>(
    mut r: Resolving,
    size: usize,
    end_of_stream: bool,
    host: &H,
    config: &Config,
) -> (State, Action) {
    if size as u64 > config.max_body_bytes {
        return refuse(Refusal::BodyTooLarge, host, config);
    }
    r.body = if end_of_stream {
        BodySeen::Complete(size)
    } else {
        BodySeen::Partial
    };
    (State::Resolving(r), Action::Pause)
}

fn on_body_to_inject<H: Host>(
    i: Injecting,
    size: usize,
    end_of_stream: bool,
    host: &H,
    config: &Config,
) -> (State, Action) {
    if size as u64 > config.max_body_bytes {
        return refuse(Refusal::BodyTooLarge, host, config);
    }
    if !end_of_stream {
        return (State::Injecting(i), Action::Pause);
    }
    inject(i, size, host, config)
}

/// Splices the directive into the complete buffered body.
fn inject<H: Host>(i: Injecting, size: usize, host: &H, config: &Config) -> (State, Action) {
    let body = match host.request_body(size) {
        Ok(b) => b,
        Err(_) => return refuse(Refusal::DirectiveUnavailable, host, config),
    };
    match splice(i.format, &body, &config.chat_message_prefix, &i.escaped) {
        Ok(out) => {
            if host.replace_request_body(body.len(), &out).is_err() {
                return refuse(Refusal::DirectiveUnavailable, host, config);
            }
            host.count(Counter::Injected);
            (State::Forward, Action::Continue)
        }
        Err(e) => refuse(Refusal::InvalidBody(e), host, config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeHost, SharedData};

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
    const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    const INJECTED: &str = r#"{"model":"m","messages":[{"role":"system","content":"Be \"terse\"."},{"role":"user","content":"hi"}]}"#;

    fn config(extra: &str) -> Config {
        Config::parse(
            format!(r#"{{"debug_headers":true{extra}}}"#).as_bytes(),
            None,
        )
        .unwrap()
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

    fn host(shared: &SharedData) -> FakeHost {
        let h = FakeHost::with_shared(shared.clone());
        *h.body.borrow_mut() = BODY.as_bytes().to_vec();
        h
    }

    fn step(flow: Flow, ev: Event<'_>, h: &FakeHost, c: &Config) -> (Flow, Action) {
        flow.on_event(ev, h, c)
    }

    fn ok(body: &str) -> Response {
        Response {
            status: Some(200),
            body: body.as_bytes().to_vec(),
        }
    }

    fn store_answer(content: Option<&str>) -> Response {
        let v = serde_json::json!({"agent_id": AGENT, "content": content});
        ok(&v.to_string())
    }

    /// Runs headers then the whole body, answering callouts in order with `answers`.
    fn run(h: &FakeHost, c: &Config, answers: Vec<Response>) -> Flow {
        let (mut flow, mut action) = step(Flow::new(), Event::Headers(head(Some(AGENT))), h, c);
        for answer in answers {
            assert_eq!(
                action,
                Action::Pause,
                "headers must be held while a callout runs"
            );
            let (token, _) = h.last_callout();
            let resumed = h.resumed.get();
            let (f, _) = step(
                flow,
                Event::Callout {
                    token,
                    response: answer,
                },
                h,
                c,
            );
            flow = f;
            action = if h.resumed.get() > resumed || !flow.is_resolving() {
                Action::Continue
            } else {
                Action::Pause
            };
        }
        if matches!(flow.state, State::Replied) {
            return flow;
        }
        let size = h.body.borrow().len();
        let (flow, action) = step(
            flow,
            Event::Body {
                size,
                end_of_stream: true,
            },
            h,
            c,
        );
        if !matches!(flow.state, State::Replied) {
            assert_eq!(action, Action::Continue);
        }
        flow
    }

    #[test]
    fn cold_agent_goes_through_every_tier_and_is_cached_in_l1_and_l2() {
        let shared = SharedData::default();
        let c = config("");
        let h = host(&shared);
        let flow = run(
            &h,
            &c,
            vec![ok("$-1\r\n"), store_answer(Some("Be \"terse\"."))],
        );
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(
            String::from_utf8(h.body.borrow().clone()).unwrap(),
            INJECTED
        );
        assert_eq!(
            h.headers.borrow().get(DEBUG_HEADER).map(String::as_str),
            Some("store")
        );
        let calls = h.callouts.borrow();
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
            assert_eq!(h.counter(c), 1, "{c:?}");
        }
        drop(calls);

        // Next request, same VM or another worker: served from L1, no callout.
        let h2 = host(&shared);
        let flow = run(&h2, &c, vec![]);
        assert!(matches!(flow.state, State::Forward));
        assert!(h2.callouts.borrow().is_empty());
        assert_eq!(h2.counter(Counter::L1Hit), 1);
        assert_eq!(
            String::from_utf8(h2.body.borrow().clone()).unwrap(),
            INJECTED
        );
        assert_eq!(
            h2.headers.borrow().get(DEBUG_HEADER).map(String::as_str),
            Some("local")
        );
    }

    #[test]
    fn redis_hit_fills_l1_without_asking_the_store() {
        let shared = SharedData::default();
        let c = config("");
        let h = host(&shared);
        run(&h, &c, vec![ok("$11\r\nBe \"terse\".\r\n")]);
        assert_eq!(h.callouts.borrow().len(), 1);
        assert_eq!(
            String::from_utf8(h.body.borrow().clone()).unwrap(),
            INJECTED
        );
        assert_eq!(
            h.headers.borrow().get(DEBUG_HEADER).map(String::as_str),
            Some("redis")
        );
        assert_eq!(h.counter(Counter::L2Hit), 1);
        let e = shared.get(&format!("ibex:d:{AGENT}")).unwrap();
        assert_eq!(Entry::decode(&e).unwrap().kind, Kind::Present);
    }

    #[test]
    fn agent_without_directive_is_untouched_and_cached_negatively() {
        let shared = SharedData::default();
        let c = config("");
        let h = host(&shared);
        let (flow, _) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h, &c);
        let (l2, _) = h.last_callout();
        let (flow, _) = step(
            flow,
            Event::Callout {
                token: l2,
                response: ok("$-1\r\n"),
            },
            &h,
            &c,
        );
        let (l3, _) = h.last_callout();
        let (flow, _) = step(
            flow,
            Event::Callout {
                token: l3,
                response: store_answer(None),
            },
            &h,
            &c,
        );
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(h.resumed.get(), 1);
        assert!(h.headers.borrow().get("content-length").is_none());
        assert_eq!(h.body.borrow().as_slice(), BODY.as_bytes());
        let (_, write) = h.last_callout();
        assert_eq!(write.method, "GET");
        assert!(write
            .path
            .ends_with(&format!("/2/directive:{AGENT}/directive:__flush__/10/")));
        assert_eq!(h.counter(Counter::NoDirective), 1);

        let h2 = host(&shared);
        let (flow, action) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h2, &c);
        assert_eq!(action, Action::Continue);
        assert!(matches!(flow.state, State::Forward));
        assert!(h2.callouts.borrow().is_empty());
        assert_eq!(h2.counter(Counter::L1Hit), 1);
    }

    #[test]
    fn l1_expiry_sends_the_next_request_to_redis() {
        let shared = SharedData::default();
        let c = config(r#","cache":{"ttl_seconds":1}"#);
        let h = host(&shared);
        run(&h, &c, vec![ok("$1\r\nD\r\n")]);
        let h2 = host(&shared);
        h2.now.set(h.now.get() + 1_000);
        let (_, action) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h2, &c);
        assert_eq!(action, Action::Pause);
        assert_eq!(h2.counter(Counter::L1Miss), 1);
        assert_eq!(h2.last_callout().1.cluster, "ibex_redis");
    }

    #[test]
    fn header_problems_are_refused_or_passed() {
        let shared = SharedData::default();
        let c = config("");
        let h = host(&shared);
        let (flow, _) = step(Flow::new(), Event::Headers(head(Some("agent-7"))), &h, &c);
        assert!(matches!(flow.state, State::Replied));
        let (status, body) = h.reply.borrow().clone().unwrap();
        assert_eq!(status, 400);
        assert!(body.contains("invalid_agent_id"));

        let h = host(&shared);
        let (flow, action) = step(Flow::new(), Event::Headers(head(None)), &h, &c);
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(action, Action::Continue);
        assert!(h.reply.borrow().is_none());

        let c = config(r#","agent":{"missing":"reject"}"#);
        let h = host(&shared);
        step(Flow::new(), Event::Headers(head(None)), &h, &c);
        assert_eq!(h.reply.borrow().as_ref().unwrap().0, 401);
    }

    #[test]
    fn oversized_and_encoded_bodies_are_refused_before_any_lookup() {
        let shared = SharedData::default();
        let c = config(r#","inject":{"max_body_bytes":100}"#);
        let h = host(&shared);
        let mut hd = head(Some(AGENT));
        hd.content_length = Some("101");
        step(Flow::new(), Event::Headers(hd), &h, &c);
        assert_eq!(h.reply.borrow().as_ref().unwrap().0, 413);
        assert!(h.callouts.borrow().is_empty());

        let h = host(&shared);
        let mut hd = head(Some(AGENT));
        hd.content_encoding = Some("gzip");
        step(Flow::new(), Event::Headers(hd), &h, &c);
        assert_eq!(h.reply.borrow().as_ref().unwrap().0, 415);
    }

    #[test]
    fn chunked_body_over_the_limit_is_refused_while_buffering() {
        let shared = SharedData::default();
        let c = config(r#","inject":{"max_body_bytes":100}"#);
        let h = host(&shared);
        let flow = run(&h, &c, vec![ok("$1\r\nD\r\n")]);
        drop(flow);
        let h2 = host(&shared);
        let (flow, action) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h2, &c);
        assert_eq!(action, Action::Continue);
        let (flow, action) = step(
            flow,
            Event::Body {
                size: 60,
                end_of_stream: false,
            },
            &h2,
            &c,
        );
        assert_eq!(action, Action::Pause);
        let (flow, _) = step(
            flow,
            Event::Body {
                size: 120,
                end_of_stream: false,
            },
            &h2,
            &c,
        );
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(h2.reply.borrow().as_ref().unwrap().0, 413);
    }

    #[test]
    fn failures_follow_failure_mode() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        let flow = run(
            &h,
            &c,
            vec![
                Response::default(),
                Response {
                    status: Some(503),
                    body: vec![],
                },
            ],
        );
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(h.reply.borrow().as_ref().unwrap().0, 503);
        assert_eq!(h.counter(Counter::RejectedDirectiveUnavailable), 1);
        assert_eq!(h.body.borrow().as_slice(), BODY.as_bytes());

        let c = config(r#","failure_mode":"open""#);
        let h = host(&shared);
        let flow = run(&h, &c, vec![Response::default(), Response::default()]);
        assert!(matches!(flow.state, State::Forward));
        assert!(h.reply.borrow().is_none());
        assert_eq!(h.body.borrow().as_slice(), BODY.as_bytes());
        assert_eq!(
            h.headers.borrow().get(DEBUG_HEADER).map(String::as_str),
            Some("none")
        );
        assert_eq!(h.counter(Counter::FailedOpen), 1);
    }

    #[test]
    fn undispatchable_clusters_count_as_tier_errors() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        h.fail_dispatch_to.borrow_mut().push("ibex_redis".into());
        let (_, action) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h, &c);
        assert_eq!(action, Action::Pause);
        assert_eq!(h.counter(Counter::L2Error), 1);
        assert_eq!(h.last_callout().1.cluster, "ibex_store");

        let h = host(&shared);
        h.fail_dispatch_to
            .borrow_mut()
            .extend(["ibex_redis".into(), "ibex_store".into()]);
        let (flow, _) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h, &c);
        assert!(matches!(flow.state, State::Replied));
        assert_eq!(h.reply.borrow().as_ref().unwrap().0, 503);
    }

    #[test]
    fn expired_entry_is_served_stale_only_while_tiers_fail_and_within_the_window() {
        let c = config(r#","cache":{"ttl_seconds":1,"stale_if_error_seconds":5}"#);
        let shared = SharedData::default();
        let h = host(&shared);
        run(&h, &c, vec![ok("$11\r\nBe \"terse\".\r\n")]);
        let t0 = h.now.get();

        let h2 = host(&shared);
        h2.now.set(t0 + 3_000);
        run(&h2, &c, vec![Response::default(), Response::default()]);
        assert_eq!(
            String::from_utf8(h2.body.borrow().clone()).unwrap(),
            INJECTED
        );
        assert_eq!(
            h2.headers.borrow().get(DEBUG_HEADER).map(String::as_str),
            Some("stale")
        );
        assert_eq!(h2.counter(Counter::StaleServed), 1);

        let h3 = host(&shared);
        h3.now.set(t0 + 7_000);
        run(&h3, &c, vec![Response::default(), Response::default()]);
        assert_eq!(h3.reply.borrow().as_ref().unwrap().0, 503);
    }

    #[test]
    fn a_fill_overtaken_by_an_invalidation_writes_neither_l1_nor_l2() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        let (flow, _) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h, &c);
        let (l2, _) = h.last_callout();
        let (flow, _) = step(
            flow,
            Event::Callout {
                token: l2,
                response: ok("$-1\r\n"),
            },
            &h,
            &c,
        );
        // An invalidation lands while the store answer is in flight.
        let tomb = Entry {
            kind: Kind::Tombstone,
            fresh_until_ms: 0,
            generation: 0,
            escaped: "",
        };
        h.shared_set(&format!("ibex:d:{AGENT}"), &tomb.encode(), None)
            .unwrap();
        let (l3, _) = h.last_callout();
        step(
            flow,
            Event::Callout {
                token: l3,
                response: store_answer(Some("old")),
            },
            &h,
            &c,
        );
        assert_eq!(h.counter(Counter::FillDiscarded), 1);
        assert_eq!(h.counter(Counter::L2Write), 0, "no write-back to Redis");
        assert_eq!(h.callouts.borrow().len(), 2);
        let raw = shared.get(&format!("ibex:d:{AGENT}")).unwrap();
        assert_eq!(Entry::decode(&raw).unwrap().kind, Kind::Tombstone);
    }

    #[test]
    fn body_delivered_while_headers_are_held_is_spliced_when_the_answer_arrives() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        let (flow, _) = step(Flow::new(), Event::Headers(head(Some(AGENT))), &h, &c);
        let size = BODY.len();
        let (flow, action) = step(
            flow,
            Event::Body {
                size,
                end_of_stream: true,
            },
            &h,
            &c,
        );
        assert_eq!(action, Action::Pause);
        let (l2, _) = h.last_callout();
        let (flow, _) = step(
            flow,
            Event::Callout {
                token: l2,
                response: ok("$11\r\nBe \"terse\".\r\n"),
            },
            &h,
            &c,
        );
        assert!(matches!(flow.state, State::Forward));
        assert_eq!(h.resumed.get(), 1);
        assert_eq!(
            String::from_utf8(h.body.borrow().clone()).unwrap(),
            INJECTED
        );
    }

    #[test]
    fn unparseable_body_for_an_agent_with_a_directive_is_refused() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        *h.body.borrow_mut() = br#"{"messages":[],"messages":[]}"#.to_vec();
        let flow = run(&h, &c, vec![ok("$1\r\nD\r\n")]);
        assert!(matches!(flow.state, State::Replied));
        let (status, body) = h.reply.borrow().clone().unwrap();
        assert_eq!(status, 400);
        assert!(body.contains("invalid_body"));
        assert_eq!(h.counter(Counter::RejectedInvalidBody), 1);
    }

    #[test]
    fn other_paths_and_bodiless_requests_pass() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        let mut hd = head(Some(AGENT));
        hd.path = Some("/v1/models");
        let (_, action) = step(Flow::new(), Event::Headers(hd), &h, &c);
        assert_eq!(action, Action::Continue);
        let mut hd = head(Some(AGENT));
        hd.end_of_stream = true;
        let (_, action) = step(Flow::new(), Event::Headers(hd), &h, &c);
        assert_eq!(action, Action::Continue);
        assert!(h.callouts.borrow().is_empty());
        assert_eq!(h.counter(Counter::PassedThrough), 2);
    }

    #[test]
    fn write_back_failures_are_counted() {
        let c = config("");
        let shared = SharedData::default();
        let h = host(&shared);
        let flow = run(&h, &c, vec![ok("$-1\r\n"), store_answer(Some("D"))]);
        let (write, _) = h.last_callout();
        step(
            flow,
            Event::Callout {
                token: write,
                response: Response::default(),
            },
            &h,
            &c,
        );
        assert_eq!(h.counter(Counter::L2WriteError), 1);
    }
}
