//! `companion rest`: an Upstash-compatible REST front of Redis (SPEC §4), the
//! filter's default L2 front (its `redis.dialect: "upstash"`), which operators
//! may also point Upstash's SDKs at.
//!
//! It serves the subset of Upstash's REST API the filter and operators need:
//! `POST /` with a JSON command, `POST /pipeline`, and the path form
//! `/{command}/{arg}/…` (on GET, POST or PUT; anything else is a 405), for `GET`,
//! `SET` (`EX` required, `NX`), `DEL`, `EVAL` (the filter's scripts only, unless
//! `--allow-any-script`) and `PING`; answers `{"result": …}` / `{"error": "…"}`
//! with Upstash's statuses, honours `Upstash-Encoding: base64`, keeps HTTP/1.1
//! connections alive ([`serve`]: with deadlines on heads, bodies and idle
//! connections, and a connection cap), and runs every command on one shared,
//! self-reconnecting Redis connection ([`link`]).
//!
//! Two tokens: the filter's (`--token`) runs only what the filter sends (`PING`,
//! `GET` and the filter's scripts on the filter's keys, see [`command::Role`]),
//! the operators' (`--admin-token`, optional) the whole allowlist. Requests are
//! authenticated (`Authorization: Bearer`, or `_token` in the query, compared in
//! constant time) before their body is read, and checked against the token's
//! allowlist ([`command`]) before Redis is touched, so a leaked filter token
//! cannot `FLUSHALL`, `DEL` a tombstone, write a key without TTL or run its own
//! Lua.
//!
//! What it must never do: log a command's arguments or results at any level
//! (they are directive text, keys and gateway key hashes: only the command's
//! verb, the token's role, outcome and duration are logged, at debug), log or
//! keep a token (only their SHA-256 digests are held here), or tell a client
//! more than a fixed message when Redis fails (no URL, no host, no connection
//! error text).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use ibex_wire::Redacted;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub mod command;
pub mod encode;
mod error;
pub mod link;
mod metrics;
pub mod serve;

use command::{Command, Limits, Policy, Refusal, Role};
use encode::{Encoding, Reply};
use error::json_response;
pub use error::RestError;
use link::RedisLink;
pub use metrics::{Closed, CommandLabel, Outcome, RestMetrics};
pub use serve::ServeOptions;

/// Default of `--max-body-bytes`: 4 MiB. The filter's largest body is a
/// write-back, its directive escaped as a JSON string plus about 200 bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Default of `--body-timeout-ms`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Request header that asks for base64 strings in the answer.
pub const ENCODING_HEADER: &str = "upstash-encoding";

/// Request header that picks the answer format; only `json` is served here.
pub const RESPONSE_FORMAT_HEADER: &str = "upstash-response-format";

/// Behaviour knobs of the front.
#[derive(Clone, Debug)]
pub struct RestOptions {
    /// Larger bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Commands per pipeline and arguments per command and request (400 past
    /// them).
    pub limits: Limits,
    /// Let the admin token run any `EVAL` script, not only the filter's.
    pub allow_any_script: bool,
    /// The filter's `redis.key_prefix`: the filter token reaches keys under it
    /// and under `agent_key:`.
    pub key_prefix: String,
    /// Deadline of one Redis round trip (connecting included, and a whole
    /// pipeline); past it the request answers 503.
    pub redis_timeout: Duration,
    /// Deadline of reading a request's body; past it the request answers 408.
    pub body_timeout: Duration,
    /// The server's deadlines and connection cap.
    pub serve: ServeOptions,
}

impl Default for RestOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            limits: Limits::default(),
            allow_any_script: false,
            key_prefix: ibex_wire::DEFAULT_KEY_PREFIX.to_string(),
            redis_timeout: Duration::from_millis(1000),
            body_timeout: DEFAULT_BODY_TIMEOUT,
            serve: ServeOptions::default(),
        }
    }
}

/// A token as the front holds it, its SHA-256 only: comparing digests takes the
/// same time whatever the candidate's length or content, and the front's state
/// keeps no copy of the secret to leak through a `Debug`.
struct TokenDigest([u8; 32]);

impl TokenDigest {
    fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    #[cfg(test)]
    fn matches(&self, candidate: &[u8]) -> bool {
        self.matches_digest(&Sha256::digest(candidate).into())
    }

    fn matches_digest(&self, theirs: &[u8; 32]) -> bool {
        // Fold every byte before deciding: no early exit on the first mismatch.
        let diff = theirs
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

struct Inner {
    filter_token: TokenDigest,
    admin_token: Option<TokenDigest>,
    filter_policy: Policy,
    admin_policy: Policy,
    link: RedisLink,
    options: RestOptions,
    metrics: RestMetrics,
}

/// Shared state of the front; cheap to clone. Its `Debug` shows the options,
/// never the token or the Redis URL.
#[derive(Clone)]
pub struct RestState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestState")
            .field("options", &self.inner.options)
            .field("tokens", &"<sha256 only>")
            .finish_non_exhaustive()
    }
}

/// Checks an operator's token: not empty, and printable ASCII without spaces so
/// it survives an `Authorization` header and a query string unchanged. `what`
/// names it in the error ("REST token", "REST admin token").
pub fn check_token_named(token: &str, what: &str) -> crate::Result<()> {
    if token.is_empty() {
        return Err(crate::Error::Config(format!("the {what} is empty")));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(crate::Error::Config(format!(
            "the {what} must be printable ASCII without spaces or control characters"
        )));
    }
    Ok(())
}

/// [`check_token_named`] for the filter's token.
pub fn check_token(token: &str) -> crate::Result<()> {
    check_token_named(token, "REST token")
}

impl RestState {
    /// State over `client` (a [`redis::Client`], or a cluster's
    /// [`redis::cluster::ClusterClient`]; not connected yet: the first request or the
    /// warm-up in [`run`] connects), with the filter's `token` and optionally
    /// the operators' `admin_token`, both checked with [`check_token_named`]
    /// and kept as digests only. Refused: the same text for both (the filter's
    /// config would then hold the admin token), `allow_any_script` without an
    /// admin token (it has no one to apply to), an empty key prefix (it would
    /// put every key in the filter token's scope).
    pub fn new(
        client: impl Into<link::Backend>,
        token: &Redacted<String>,
        admin_token: Option<&Redacted<String>>,
        options: RestOptions,
    ) -> crate::Result<Self> {
        check_token(token.expose())?;
        if let Some(admin) = admin_token {
            check_token_named(admin.expose(), "REST admin token")?;
            if admin.expose() == token.expose() {
                return Err(crate::Error::Config(
                    "the REST admin token must differ from the filter's token".into(),
                ));
            }
        } else if options.allow_any_script {
            return Err(crate::Error::Config(
                "--allow-any-script applies to the admin token only: give --admin-token too".into(),
            ));
        }
        if options.key_prefix.is_empty() {
            return Err(crate::Error::Config(
                "the key prefix is empty: every key would be in the filter token's scope".into(),
            ));
        }
        if !ibex_wire::is_cluster_safe_prefix(&options.key_prefix) {
            return Err(crate::Error::Config(
                "the key prefix has a { that opens no hash tag closed within it: entries \
                 and their flush markers would lie in different Redis Cluster slots"
                    .into(),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                filter_token: TokenDigest::of(token.expose().as_bytes()),
                admin_token: admin_token.map(|t| TokenDigest::of(t.expose().as_bytes())),
                filter_policy: Policy::filter(options.key_prefix.clone()),
                admin_policy: Policy::admin(options.key_prefix.clone(), options.allow_any_script),
                link: RedisLink::new(client, options.redis_timeout),
                options,
                metrics: RestMetrics::default(),
            }),
        })
    }

    /// The front's metrics.
    pub fn metrics(&self) -> &RestMetrics {
        &self.inner.metrics
    }

    fn policy(&self, role: Role) -> &Policy {
        match role {
            Role::Filter => &self.inner.filter_policy,
            Role::Admin => &self.inner.admin_policy,
        }
    }

    /// Whose token the request carries: `Authorization: Bearer <token>`
    /// (scheme in any case) or, with no `Authorization` header, `?_token=`.
    /// `None` for no token or a wrong one.
    fn role_of(&self, headers: &HeaderMap, uri: &Uri) -> Option<Role> {
        let candidate = match headers.get(header::AUTHORIZATION) {
            Some(v) => bearer(v.as_bytes()),
            None => uri.query().and_then(token_param),
        }?;
        let digest: [u8; 32] = Sha256::digest(&candidate).into();
        // Both compared every time: the time taken does not tell which one
        // matched, nor how much of either.
        let filter = self.inner.filter_token.matches_digest(&digest);
        let admin = self
            .inner
            .admin_token
            .as_ref()
            .is_some_and(|t| t.matches_digest(&digest));
        if admin {
            Some(Role::Admin)
        } else if filter {
            Some(Role::Filter)
        } else {
            None
        }
    }

    async fn run_one(&self, cmd: &Command, enc: Encoding) -> Result<Reply, RestError> {
        let value = self
            .inner
            .link
            .query(&redis_cmd(cmd), &self.inner.metrics.redis_resets)
            .await
            .map_err(RestError::Unavailable)?;
        Ok(encode::reply(&value, enc))
    }

    async fn run_pipeline(&self, cmds: &[Command], enc: Encoding) -> Result<Vec<Reply>, RestError> {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(redis_cmd(c));
        }
        self.inner
            .metrics
            .pipeline_commands
            .inc_by(cmds.len() as u64);
        let values = self
            .inner
            .link
            .query_pipeline(&pipe, cmds.len(), &self.inner.metrics.redis_resets)
            .await
            .map_err(RestError::Unavailable)?;
        Ok(values.iter().map(|v| encode::reply(v, enc)).collect())
    }

    /// `Ok` when Redis answers `PING` with `PONG` in time.
    pub async fn ready(&self) -> Result<(), link::LinkFailure> {
        let ping = redis::cmd("PING");
        match self
            .inner
            .link
            .query(&ping, &self.inner.metrics.redis_resets)
            .await?
        {
            redis::Value::SimpleString(s) if s == "PONG" => Ok(()),
            // LOADING, NOAUTH…: reachable but not serving.
            _ => Err(link::LinkFailure::Connection(
                "PING was not answered PONG".into(),
            )),
        }
    }
}

/// The credential of an `Authorization: Bearer …` value; `None` for another
/// scheme or an empty credential.
fn bearer(value: &[u8]) -> Option<Vec<u8>> {
    let sp = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(sp);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let cred = rest.trim_ascii();
    (!cred.is_empty()).then(|| cred.to_vec())
}

/// The (percent-decoded) `_token` query parameter, the first if repeated.
fn token_param(query: &str) -> Option<Vec<u8>> {
    command::query_pairs(query)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == command::TOKEN_PARAM.as_bytes())
        .and_then(|(_, value)| value)
}

fn redis_cmd(c: &Command) -> redis::Cmd {
    let mut cmd = redis::cmd(c.verb().redis_name());
    for a in c.args() {
        cmd.arg(a.as_slice());
    }
    cmd
}

/// `Upstash-Encoding` and `Upstash-Response-Format`: base64 or text strings;
/// any response format but `json` is refused (Upstash's RESP2 format is not
/// served here; Upstash itself answers 400 to an unknown one).
fn encoding(headers: &HeaderMap) -> Result<Encoding, RestError> {
    if let Some(f) = headers.get(RESPONSE_FORMAT_HEADER) {
        if !f.as_bytes().trim_ascii().eq_ignore_ascii_case(b"json") {
            return Err(RestError::BadRequest(
                "ERR only the json response format is supported".into(),
            ));
        }
    }
    Ok(match headers.get(ENCODING_HEADER) {
        Some(v) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"base64") => Encoding::Base64,
        _ => Encoding::Text,
    })
}

/// Reads the body, refusing more than `max` bytes (413) from the
/// `Content-Length` alone when there is one, and a body still incomplete after
/// `deadline` (408): a client that declares a body and sends it a byte at a time
/// would otherwise hold the request for as long as it likes.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, RestError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(RestError::TooLarge(max));
    }
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, max))
        .await
        .map_err(|_| RestError::BodyTimeout(deadline))?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            RestError::TooLarge(max)
        } else {
            RestError::BadRequest("ERR cannot read the request body".into())
        }
    })
}

/// Which request form carried the command.
#[derive(Clone, Copy, Debug)]
enum Form {
    /// `POST /`: the JSON array body.
    Json,
    /// `POST /pipeline`.
    Pipeline,
    /// `/{command}/…`: path, body, query.
    Path,
}

/// What one request came to, for the answer, the metrics and the log line.
struct Served {
    command: CommandLabel,
    result: Result<Response, RestError>,
}

/// Decrements the in-flight gauge however the request ends (a client that
/// hangs up cancels the handler).
struct InFlight<'a>(&'a RestMetrics);

impl<'a> InFlight<'a> {
    fn start(m: &'a RestMetrics) -> Self {
        m.in_flight.inc();
        Self(m)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Methods that run a command. Upstash also takes HEAD, but a HEAD answer has no
/// body, so its client cannot see what its command did, and HEAD is what
/// crawlers, prefetchers and health checkers send believing it harmless: here it
/// runs nothing (405). PUT is kept, read like POST: Upstash takes it, so a
/// client written for Upstash may send it, and it can do nothing POST cannot.
fn runs_commands(method: &Method) -> bool {
    method == Method::GET || method == Method::POST || method == Method::PUT
}

impl RestState {
    /// One command request, from the method and authentication to the answer.
    async fn serve(
        &self,
        form: Form,
        method: Method,
        headers: HeaderMap,
        uri: Uri,
        body: Body,
    ) -> Response {
        let m = &self.inner.metrics;
        let _in_flight = InFlight::start(m);
        if !runs_commands(&method) {
            m.record(CommandLabel::None, Outcome::BadRequest);
            tracing::debug!(outcome = "method_not_allowed", "rest request");
            return RestError::MethodNotAllowed.into_response();
        }
        let Some(role) = self.role_of(&headers, &uri) else {
            m.record(CommandLabel::None, Outcome::Unauthorized);
            tracing::debug!(outcome = "unauthorized", "rest request");
            return RestError::Unauthorized.into_response();
        };
        let trace_id = crate::trace::trace_id(&headers).unwrap_or("-").to_owned();
        let started = Instant::now();
        let served = self
            .serve_authorized(form, role, &headers, &uri, body)
            .await;
        let elapsed = started.elapsed();
        m.latency.observe(elapsed);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let command = served.command.label();
        let (resp, outcome) = match served.result {
            Ok(resp) if resp.status() == StatusCode::OK => (resp, Outcome::Ok),
            Ok(resp) => (resp, Outcome::RedisError),
            Err(e) => {
                if let RestError::Unavailable(cause) = &e {
                    tracing::warn!(command, error = %cause, elapsed_us, "redis unavailable");
                }
                let outcome = e.outcome();
                (e.into_response(), outcome)
            }
        };
        m.record(served.command, outcome);
        tracing::debug!(
            command,
            token = role.label(),
            outcome = outcome.label(),
            trace_id,
            elapsed_us,
            "rest request"
        );
        resp
    }

    async fn serve_authorized(
        &self,
        form: Form,
        role: Role,
        headers: &HeaderMap,
        uri: &Uri,
        body: Body,
    ) -> Served {
        let early = |command, e: RestError| Served {
            command,
            result: Err(e),
        };
        let label_of_form = match form {
            Form::Pipeline => CommandLabel::Pipeline,
            Form::Json | Form::Path => CommandLabel::None,
        };
        let enc = match encoding(headers) {
            Ok(enc) => enc,
            Err(e) => return early(label_of_form, e),
        };
        let o = &self.inner.options;
        let body = match read_body(body, headers, o.max_body_bytes, o.body_timeout).await {
            Ok(b) => b,
            Err(e) => return early(label_of_form, e),
        };
        let policy = self.policy(role);
        let limits = o.limits;
        let label_of = |r: &Refusal| match (form, r) {
            (Form::Pipeline, _) => CommandLabel::Pipeline,
            (_, Refusal::Forbidden(_)) => CommandLabel::Other,
            (_, Refusal::BadRequest(_)) => CommandLabel::None,
        };
        match form {
            Form::Pipeline => {
                let parsed = command::json_pipeline(&body, limits)
                    .and_then(|cmds| command::parse_pipeline(cmds, policy));
                let cmds = match parsed {
                    Ok(c) => c,
                    Err(r) => return early(label_of(&r), r.into()),
                };
                let result = self.run_pipeline(&cmds, enc).await.map(|replies| {
                    let arr =
                        serde_json::Value::Array(replies.iter().map(Reply::to_json).collect());
                    json_response(StatusCode::OK, serde_json::to_vec(&arr).unwrap_or_default())
                });
                Served {
                    command: CommandLabel::Pipeline,
                    result,
                }
            }
            Form::Json | Form::Path => {
                let parts = match form {
                    Form::Json => command::json_command(&body, limits),
                    _ => command::path_args(uri.path(), &body, uri.query(), limits),
                };
                let cmd = match parts.and_then(|p| command::parse(p, policy)) {
                    Ok(c) => c,
                    Err(r) => return early(label_of(&r), r.into()),
                };
                let result = self.run_one(&cmd, enc).await.map(|reply| {
                    // Upstash: a Redis error reply is a 400 carrying its text.
                    let status = match reply {
                        Reply::Result(_) => StatusCode::OK,
                        Reply::Error(_) => StatusCode::BAD_REQUEST,
                    };
                    json_response(status, reply.to_body())
                });
                Served {
                    command: CommandLabel::Verb(cmd.verb()),
                    result,
                }
            }
        }
    }
}

async fn post_json(
    State(state): State<RestState>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    state.serve(Form::Json, method, headers, uri, body).await
}

async fn post_pipeline(
    State(state): State<RestState>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    state
        .serve(Form::Pipeline, method, headers, uri, body)
        .await
}

async fn path_form(
    State(state): State<RestState>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    state.serve(Form::Path, method, headers, uri, body).await
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
}

/// 200 when Redis answers `PING`, else 503; says nothing about why (the log
/// does), so it needs no token.
async fn readyz(State(state): State<RestState>) -> Response {
    match state.ready().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response(),
        Err(cause) => {
            tracing::debug!(error = %cause, "readiness probe failed");
            RestError::Unavailable(cause).into_response()
        }
    }
}

async fn metrics_text(State(state): State<RestState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics().render(),
    )
        .into_response()
}

/// The front's router. `/healthz`, `/readyz` and `/metrics` need no token and
/// take precedence over the path form (no Redis command has those names).
pub fn app(state: RestState) -> Router {
    // Every method reaches the handler, which refuses all but GET, POST and PUT
    // (see `runs_commands`): axum would otherwise run a GET route for HEAD.
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/", any(post_json))
        .route("/pipeline", any(post_pipeline))
        .route("/{*command}", any(path_form))
        .with_state(state)
}

/// Serves the front on `listener` until `shutdown` resolves, then stops
/// accepting, answers in-flight requests and closes the rest, within
/// `--shutdown-grace-ms` ([`serve`]). Connects to Redis in the background
/// first; a Redis that is down delays nothing (requests answer 503 until it is
/// back).
pub async fn run(
    listener: TcpListener,
    state: RestState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "rest front listening");
    }
    let warm = state.clone();
    tokio::spawn(async move {
        warm.inner
            .link
            .warm_up(&warm.inner.metrics.redis_resets)
            .await;
    });
    let inner = state.inner.clone();
    serve::run(listener, app(state), inner, shutdown).await?;
    tracing::info!("rest front stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(b"abc".to_vec()));
        assert_eq!(bearer(b"bearer abc"), Some(b"abc".to_vec()));
        assert_eq!(bearer(b"BEARER   abc "), Some(b"abc".to_vec()));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"abc"), None);
    }

    #[test]
    fn token_digest_compares_exactly() {
        let t = TokenDigest::of(b"s3cret");
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret "));
        assert!(!t.matches(b""));
        assert!(!t.matches(b"S3cret"));
    }

    #[test]
    fn token_param_is_decoded_and_first_wins() {
        assert_eq!(token_param("_token=a%2Bb"), Some(b"a+b".to_vec()));
        assert_eq!(token_param("x=1&_token=t&_token=u"), Some(b"t".to_vec()));
        assert_eq!(token_param("_token"), None);
        assert_eq!(token_param("token=t"), None);
    }

    #[test]
    fn tokens_must_fit_a_header() {
        assert!(check_token("AYNgAS2553feg6a2d9842h2a0gcdb5f8efe9934DQ=").is_ok());
        assert!(check_token("").is_err());
        assert!(check_token("a b").is_err());
        assert!(check_token("a\n").is_err());
        assert!(check_token("é").is_err());
    }

    #[test]
    fn tokens_are_told_apart_and_checked_at_start() {
        let client = || redis::Client::open("redis://127.0.0.1:1").unwrap();
        let filter = Redacted::new("filter-token".to_string());
        let admin = Redacted::new("admin-token".to_string());
        let state =
            RestState::new(client(), &filter, Some(&admin), RestOptions::default()).unwrap();
        let role = |auth: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, auth.parse().unwrap());
            state.role_of(&h, &Uri::from_static("/"))
        };
        assert_eq!(role("Bearer filter-token"), Some(Role::Filter));
        assert_eq!(role("Bearer admin-token"), Some(Role::Admin));
        assert_eq!(role("Bearer admin-tokenx"), None);
        assert_eq!(
            state.role_of(
                &HeaderMap::new(),
                &Uri::from_static("/get/k?_token=admin-token")
            ),
            Some(Role::Admin)
        );
        let refused = |admin: Option<&Redacted<String>>, options: RestOptions| {
            RestState::new(client(), &filter, admin, options)
                .unwrap_err()
                .to_string()
        };
        let same = refused(Some(&filter), RestOptions::default());
        assert!(same.contains("differ"), "{same}");
        assert!(!same.contains("filter-token"), "{same}");
        let any = RestOptions {
            allow_any_script: true,
            ..Default::default()
        };
        assert!(refused(None, any).contains("--admin-token"));
        let empty = RestOptions {
            key_prefix: String::new(),
            ..Default::default()
        };
        assert!(refused(Some(&admin), empty).contains("key prefix"));
        let bad = Redacted::new("a b".to_string());
        assert!(refused(Some(&bad), RestOptions::default()).contains("admin token"));
    }

    #[test]
    fn only_get_post_and_put_run_commands() {
        for m in [Method::GET, Method::POST, Method::PUT] {
            assert!(runs_commands(&m), "{m}");
        }
        for m in [
            Method::HEAD,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
            Method::TRACE,
            Method::CONNECT,
        ] {
            assert!(!runs_commands(&m), "{m}");
        }
    }

    #[test]
    fn encoding_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(encoding(&h).unwrap(), Encoding::Text);
        h.insert(ENCODING_HEADER, "base64".parse().unwrap());
        assert_eq!(encoding(&h).unwrap(), Encoding::Base64);
        h.insert(ENCODING_HEADER, "BASE64".parse().unwrap());
        assert_eq!(encoding(&h).unwrap(), Encoding::Base64);
        h.insert(ENCODING_HEADER, "hex".parse().unwrap());
        assert_eq!(encoding(&h).unwrap(), Encoding::Text);
        h.insert(RESPONSE_FORMAT_HEADER, "json".parse().unwrap());
        assert!(encoding(&h).is_ok());
        h.insert(RESPONSE_FORMAT_HEADER, "resp2".parse().unwrap());
        assert!(encoding(&h).is_err());
    }

    #[test]
    fn state_debug_hides_the_tokens() {
        let client = redis::Client::open("redis://:hunter2@127.0.0.1:1").unwrap();
        let token = Redacted::new("tok-5e0f7a".to_string());
        let admin = Redacted::new("adm-9c1d2b".to_string());
        let state = RestState::new(client, &token, Some(&admin), RestOptions::default()).unwrap();
        let d = format!("{state:?}");
        assert!(!d.contains("tok-5e0f7a"), "{d}");
        assert!(!d.contains("adm-9c1d2b"), "{d}");
        assert!(!d.contains("hunter2"), "{d}");
        let d = format!("{:?}", state.inner.link);
        assert!(!d.contains("hunter2"), "{d}");
    }
}
