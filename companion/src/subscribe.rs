//! The invalidation subscriber: keeps Redis (L2) and every Envoy's shared data
//! (L1) coherent with Postgres.
//!
//! For `ibex:directive:updates:{agent}` it deletes `{prefix}{agent}` from Redis
//! (or, in tombstone mode, overwrites it with a short-lived `"\0"` tombstone
//! that the filter's conditional write-back will not overwrite) first, so a
//! refill cannot read the old L2 entry, then POSTs
//! `/ibex/v1/invalidate/{agent}` to every control URL. For
//! `ibex:directive:flush`, and after every (re)connect to Redis — messages sent
//! while disconnected are lost — it deletes every `{prefix}*` key and POSTs
//! `/ibex/v1/invalidate` everywhere. Every target is retried with exponential
//! backoff until a deadline, then counted as a failure.
//!
//! It never reads directive content and must never log the control token.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use redis::aio::MultiplexedConnection;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use ibex_wire::{Channel, TOMBSTONE};

use crate::metrics::{Counter, Exposition, Gauge, CONTENT_TYPE};
use crate::{Error, Result};

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

/// Everything the subscriber needs; validated by [`SubscribeConfig::new`].
#[derive(Clone)]
pub struct SubscribeConfig {
    redis_url: String,
    control_urls: Vec<String>,
    control_token: Option<String>,
    key_prefix: String,
    /// `None`: invalidate Redis by `DEL`. `Some(ttl)`: write a tombstone
    /// (`"\0"`, expiring after `ttl`) instead, and set the flush marker
    /// `{prefix}__flush__` for `ttl` on a full flush, so that a filter
    /// write-back already in flight cannot put old text back into Redis (the
    /// filter writes only when neither the key nor the marker exists).
    pub tombstone_ttl: Option<Duration>,
    /// Retry policy for every Redis command and control POST.
    pub retry: RetryPolicy,
    /// Timeout of one control POST attempt.
    pub request_timeout: Duration,
    /// How often the Redis subscription is pinged to detect a dead link.
    pub ping_interval: Duration,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max: Duration,
}

impl fmt::Debug for SubscribeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeConfig")
            .field("control_urls", &self.control_urls)
            .field(
                "control_token",
                &self.control_token.as_ref().map(|_| "<redacted>"),
            )
            .field("key_prefix", &self.key_prefix)
            .field("tombstone_ttl", &self.tombstone_ttl)
            .field("retry", &self.retry)
            .field("request_timeout", &self.request_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("reconnect_max", &self.reconnect_max)
            .finish_non_exhaustive()
    }
}

impl SubscribeConfig {
    /// Validates URLs up front so that a typo fails at start, not on the first
    /// message. Control URLs must be plain `http://` (loopback, no TLS).
    pub fn new(
        redis_url: impl Into<String>,
        control_urls: impl IntoIterator<Item = String>,
        control_token: Option<String>,
        key_prefix: impl Into<String>,
    ) -> Result<Self> {
        let redis_url = redis_url.into();
        redis::Client::open(redis_url.as_str())
            .map_err(|_| Error::Config("REDIS_URL is not a valid Redis URL".into()))?;
        let mut urls = Vec::new();
        for raw in control_urls {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            urls.push(normalize_control_url(raw)?);
        }
        Ok(Self {
            redis_url,
            control_urls: urls,
            control_token: control_token.filter(|t| !t.is_empty()),
            key_prefix: key_prefix.into(),
            tombstone_ttl: Some(DEFAULT_TOMBSTONE_TTL),
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(2),
        })
    }

    /// The validated control base URLs, without trailing slash.
    pub fn control_urls(&self) -> &[String] {
        &self.control_urls
    }
}

fn normalize_control_url(raw: &str) -> Result<String> {
    let trimmed = raw.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|_| Error::Config(format!("control URL {raw:?} is not a valid URL")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(Error::Config(format!(
            "control URL {raw:?} must look like http://host:port"
        )));
    }
    if uri.query().is_some() {
        return Err(Error::Config(format!(
            "control URL {raw:?} must not have a query string"
        )));
    }
    Ok(trimmed.to_owned())
}

/// Escapes Redis glob metacharacters so the prefix matches literally in SCAN.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What a pub/sub message asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Invalidate one agent.
    Agent(Uuid),
    /// Invalidate everything.
    Flush,
    /// Not for us or malformed: count and ignore.
    Ignore,
}

/// Classifies a message by its channel name (payloads are ignored).
pub fn classify(channel: &str) -> Action {
    match ibex_wire::parse_channel(channel) {
        Some(Channel::Flush) => Action::Flush,
        Some(Channel::Update(id)) => Uuid::try_parse(id).map_or(Action::Ignore, Action::Agent),
        None => Action::Ignore,
    }
}

/// Counters of the subscriber, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct SubscribeMetrics {
    /// Update messages for a valid agent id.
    pub messages_update: Counter,
    /// Flush messages.
    pub messages_flush: Counter,
    /// Messages ignored (agent id not a UUID).
    pub messages_invalid: Counter,
    /// Control POSTs answered with 2xx.
    pub invalidations_sent: Counter,
    /// Targets (Redis delete or control POST) given up on.
    pub invalidation_failures: Counter,
    /// Successful Redis invalidations (per agent) and flush sweeps.
    pub redis_deletes: Counter,
    /// Connections to Redis after the first one.
    pub reconnects: Counter,
    /// Full flushes started (after connects and for flush messages).
    pub full_flushes: Counter,
    /// Liveness PINGs answered on the subscription.
    pub pings: Counter,
    /// 1 while subscribed to Redis.
    pub connected: Gauge,
}

impl SubscribeMetrics {
    /// Prometheus text of all subscriber metrics.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "ibex_subscribe_messages_total",
            "counter",
            "Pub/sub messages received, by kind.",
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "update")],
            self.messages_update.get(),
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "flush")],
            self.messages_flush.get(),
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "invalid")],
            self.messages_invalid.get(),
        )
        .counter(
            "ibex_subscribe_invalidations_sent_total",
            "Invalidation POSTs acknowledged by a control endpoint.",
            &self.invalidations_sent,
        )
        .counter(
            "ibex_subscribe_invalidation_failures_total",
            "Invalidation targets (Redis or control endpoint) given up on after retries.",
            &self.invalidation_failures,
        )
        .counter(
            "ibex_subscribe_redis_deletes_total",
            "Redis invalidations done (a DEL or tombstone per agent update, one per flush sweep).",
            &self.redis_deletes,
        )
        .counter(
            "ibex_subscribe_reconnects_total",
            "Connections to Redis after the first one.",
            &self.reconnects,
        )
        .counter(
            "ibex_subscribe_full_flushes_total",
            "Full flushes started, after each connect and for each flush message.",
            &self.full_flushes,
        )
        .counter(
            "ibex_subscribe_pings_total",
            "Liveness PINGs answered on the Redis subscription.",
            &self.pings,
        )
        .gauge(
            "ibex_subscribe_connected",
            "1 while subscribed to Redis, else 0.",
            &self.connected,
        );
        e.finish()
    }
}

/// Outcome of one attempt at a target.
enum Attempt {
    /// Worth retrying (timeout, refused, 5xx, 429).
    Transient(String),
    /// Retrying cannot help (401, 403, 404): give up now.
    Permanent(String),
}

/// Most invalidations that may be pending at once; beyond that they are
/// replaced by one full flush, which supersedes them all.
const MAX_PENDING: usize = 256;

/// How long in-flight invalidations may run after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The subscriber. Cheap to clone.
#[derive(Clone)]
pub struct Subscriber {
    config: Arc<SubscribeConfig>,
    metrics: Arc<SubscribeMetrics>,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    redis: redis::Client,
}

impl Subscriber {
    /// A subscriber for `config`.
    pub fn new(config: SubscribeConfig) -> Result<Self> {
        let redis = redis::Client::open(config.redis_url.as_str())
            .map_err(|_| Error::Config("REDIS_URL is not a valid Redis URL".into()))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.request_timeout));
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            config: Arc::new(config),
            metrics: Arc::new(SubscribeMetrics::default()),
            http,
            redis,
        })
    }

    /// The subscriber's metrics.
    pub fn metrics(&self) -> &SubscribeMetrics {
        &self.metrics
    }

    /// Retries `op` per the policy; true on success. `what` names the target
    /// in logs (a URL or key kind, never content or token).
    async fn with_retry<F, Fut>(&self, what: &str, mut op: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), Attempt>>,
    {
        let policy = self.config.retry;
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

    async fn post_once(&self, url: &str) -> Result<(), Attempt> {
        let mut req = hyper::Request::post(url).header(header::CONTENT_LENGTH, "0");
        if let Some(token) = &self.config.control_token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| Attempt::Permanent("cannot build request".into()))?;
        let resp = tokio::time::timeout(self.config.request_timeout, self.http.request(req))
            .await
            .map_err(|_| Attempt::Transient("timeout".into()))?
            .map_err(|e| Attempt::Transient(format!("request failed: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_client_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS
        {
            Err(Attempt::Permanent(format!("status {status}")))
        } else {
            Err(Attempt::Transient(format!("status {status}")))
        }
    }

    /// POSTs `path` to every control URL concurrently, each with retries.
    async fn post_all(&self, path: &str) {
        let posts = self.config.control_urls.iter().map(|base| async move {
            let url = format!("{base}{path}");
            if self.with_retry(&url, || self.post_once(&url)).await {
                self.metrics.invalidations_sent.inc();
            } else {
                self.metrics.invalidation_failures.inc();
            }
        });
        futures_util::future::join_all(posts).await;
    }

    async fn redis_step<F, Fut>(&self, what: &str, op: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), Attempt>>,
    {
        let ok = self.with_retry(what, op).await;
        if ok {
            self.metrics.redis_deletes.inc();
        } else {
            self.metrics.invalidation_failures.inc();
        }
        ok
    }

    /// Invalidates one agent: Redis key first (DEL or tombstone), then every
    /// Envoy.
    pub async fn invalidate_agent(&self, conn: MultiplexedConnection, agent_id: Uuid) {
        let started = Instant::now();
        let key = ibex_wire::redis_key(&self.config.key_prefix, agent_id);
        let tombstone_ttl = self.config.tombstone_ttl;
        let what = if tombstone_ttl.is_some() {
            "redis tombstone"
        } else {
            "redis DEL"
        };
        self.redis_step(what, || {
            let mut conn = conn.clone();
            let cmd = match tombstone_ttl {
                Some(ttl) => set_with_ttl(&key, TOMBSTONE, ttl),
                None => {
                    let mut c = redis::cmd("DEL");
                    c.arg(&key);
                    c
                }
            };
            async move {
                cmd.query_async::<redis::Value>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| Attempt::Transient(e.to_string()))
            }
        })
        .await;
        self.post_all(&ibex_wire::invalidate_agent_path(agent_id))
            .await;
        tracing::debug!(agent_id = %agent_id, elapsed_us = started.elapsed().as_micros() as u64, "agent invalidated");
    }

    /// Invalidates everything: every `{prefix}*` key, then every Envoy. In
    /// tombstone mode the flush marker is set first (and spared), so no
    /// write-back lands between the sweep and the marker.
    pub async fn flush_all(&self, conn: MultiplexedConnection) {
        let started = Instant::now();
        self.metrics.full_flushes.inc();
        let pattern = format!("{}*", glob_escape(&self.config.key_prefix));
        let marker = ibex_wire::flush_marker_key(&self.config.key_prefix);
        let tombstone_ttl = self.config.tombstone_ttl;
        self.redis_step("redis SCAN+DEL", || {
            let mut conn = conn.clone();
            let pattern = pattern.clone();
            let marker = marker.clone();
            async move {
                let keep = match tombstone_ttl {
                    Some(ttl) => {
                        set_with_ttl(&marker, TOMBSTONE, ttl)
                            .query_async::<redis::Value>(&mut conn)
                            .await
                            .map_err(|e| Attempt::Transient(e.to_string()))?;
                        Some(marker.as_str())
                    }
                    None => None,
                };
                delete_matching(&mut conn, &pattern, keep)
                    .await
                    .map(|n| tracing::debug!(deleted = n, "redis keys flushed"))
                    .map_err(|e| Attempt::Transient(e.to_string()))
            }
        })
        .await;
        self.post_all(ibex_wire::INVALIDATE_PATH).await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "full flush done"
        );
    }

    async fn connect(&self) -> redis::RedisResult<(redis::aio::PubSub, MultiplexedConnection)> {
        let timeout = self.config.request_timeout.max(Duration::from_secs(1));
        let mut pubsub = tokio::time::timeout(timeout, self.redis.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out"))
            })??;
        pubsub
            .psubscribe(ibex_wire::UPDATES_CHANNEL_PATTERN)
            .await?;
        pubsub.subscribe(ibex_wire::FLUSH_CHANNEL).await?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let conn = self
            .redis
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok((pubsub, conn))
    }

    /// The subscriber loop: connect, subscribe, flush all, handle messages;
    /// reconnect with backoff when the link drops; return when `shutdown`
    /// turns true (or its sender is dropped).
    pub async fn run_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let mut first = true;
        let mut failures = 0u32;
        loop {
            let connected = tokio::select! {
                r = self.connect() => r,
                _ = wait_shutdown(&mut shutdown) => return,
            };
            let (pubsub, conn) = match connected {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    let delay = RetryPolicy {
                        initial: Duration::from_millis(50),
                        max: self.config.reconnect_max,
                        deadline: Duration::MAX,
                    }
                    .delay(failures);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot subscribe to redis");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = wait_shutdown(&mut shutdown) => return,
                    }
                }
            };
            failures = 0;
            if first {
                tracing::info!("subscribed to redis");
            } else {
                self.metrics.reconnects.inc();
                tracing::info!("re-subscribed to redis");
            }
            first = false;
            self.metrics.connected.set(1);
            let stop = self.session(pubsub, conn, &mut shutdown).await;
            self.metrics.connected.set(0);
            if stop {
                return;
            }
            tracing::warn!("redis subscription lost, reconnecting");
        }
    }

    /// One connected session. Returns true when shutdown was requested, false
    /// when the connection was lost.
    async fn session(
        &self,
        pubsub: redis::aio::PubSub,
        conn: MultiplexedConnection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut tasks = JoinSet::new();
        // Anything published while we were away is lost: start from scratch.
        self.spawn_flush(&mut tasks, &conn);
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.config.ping_interval,
            self.config.ping_interval,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ping_timeout = self.config.request_timeout.max(Duration::from_secs(1));
        let lost = loop {
            tokio::select! {
                _ = wait_shutdown(shutdown) => break false,
                msg = stream.next() => match msg {
                    Some(msg) => self.dispatch(msg.get_channel_name(), &mut tasks, &conn),
                    None => break true,
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(ping_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => self.metrics.pings.inc(),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "redis ping failed");
                            break true;
                        }
                        Err(_) => {
                            tracing::warn!("redis ping timed out");
                            break true;
                        }
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        };
        if lost {
            // The flush that follows the reconnect supersedes these.
            tasks.abort_all();
            return false;
        }
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!(
                pending = tasks.len(),
                "shutdown: abandoning pending invalidations"
            );
            tasks.abort_all();
        }
        true
    }

    fn spawn_flush(&self, tasks: &mut JoinSet<()>, conn: &MultiplexedConnection) {
        let this = self.clone();
        let conn = conn.clone();
        tasks.spawn(async move { this.flush_all(conn).await });
    }

    fn dispatch(&self, channel: &str, tasks: &mut JoinSet<()>, conn: &MultiplexedConnection) {
        let action = classify(channel);
        match action {
            Action::Agent(_) => self.metrics.messages_update.inc(),
            Action::Flush => self.metrics.messages_flush.inc(),
            Action::Ignore => {
                self.metrics.messages_invalid.inc();
                tracing::debug!("ignoring message on a channel without a valid agent id");
                return;
            }
        }
        if tasks.len() >= MAX_PENDING {
            tracing::warn!(
                pending = tasks.len(),
                "too many pending invalidations, replacing them with a full flush"
            );
            tasks.abort_all();
            self.spawn_flush(tasks, conn);
            return;
        }
        match action {
            Action::Agent(agent_id) => {
                tracing::debug!(agent_id = %agent_id, "update message");
                let this = self.clone();
                let conn = conn.clone();
                tasks.spawn(async move { this.invalidate_agent(conn, agent_id).await });
            }
            Action::Flush => {
                tracing::info!("flush message");
                self.spawn_flush(tasks, conn);
            }
            Action::Ignore => {}
        }
    }
}

/// Default life of Redis tombstones and the flush marker: well above the
/// longest fill the filter can run (its callout timeouts, 50 + 500 ms by default).
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(10);

/// `SET key value EX ttl` (at least one second: Redis has no shorter `EX`).
fn set_with_ttl(key: &str, value: &str, ttl: Duration) -> redis::Cmd {
    let mut c = redis::cmd("SET");
    c.arg(key).arg(value).arg("EX").arg(ttl.as_secs().max(1));
    c
}

/// SCAN for `pattern` and DEL every match except `keep`; returns how many
/// were deleted.
async fn delete_matching(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    keep: Option<&str>,
) -> redis::RedisResult<u64> {
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|k| Some(k.as_str()) != keep)
            .collect();
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Resolves once `rx` holds true or its sender is gone.
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
}

/// The subscriber's own HTTP endpoints: `/healthz`, `/readyz` (200 while
/// subscribed to Redis) and `/metrics`.
pub fn app(subscriber: Subscriber) -> Router {
    let ready = subscriber.clone();
    let metrics = subscriber;
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || async move {
                if ready.metrics().connected.get() == 1 {
                    (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response()
                } else {
                    crate::error::json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service_unavailable",
                        "redis_unavailable",
                        "not subscribed to redis",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                let body = metrics.metrics().render();
                Response::builder()
                    .header(header::CONTENT_TYPE, CONTENT_TYPE)
                    .body(axum::body::Body::from(body))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }),
        )
}

/// Runs the subscriber loop and, when `listener` is given, its HTTP server,
/// until `shutdown` resolves.
pub async fn run(
    subscriber: Subscriber,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    tracing::info!(control_urls = ?subscriber.config.control_urls, "subscriber starting");
    if subscriber.config.control_urls.is_empty() {
        tracing::warn!("no control URLs: only Redis keys will be invalidated");
    }
    let server = match listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "subscriber metrics listening");
            }
            let mut rx = rx.clone();
            let app = app(subscriber.clone());
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { wait_shutdown(&mut rx).await })
                    .await
            }))
        }
        None => None,
    };
    subscriber.run_loop(rx).await;
    if let Some(server) = server {
        match server.await {
            Ok(r) => r?,
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    tracing::info!("subscriber stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_channels() {
        let id = Uuid::new_v4();
        assert_eq!(
            classify(&format!("ibex:directive:updates:{id}")),
            Action::Agent(id)
        );
        assert_eq!(classify("ibex:directive:flush"), Action::Flush);
        assert_eq!(classify("ibex:directive:updates:nope"), Action::Ignore);
        assert_eq!(classify("ibex:directive:updates:"), Action::Ignore);
        assert_eq!(classify("other"), Action::Ignore);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(10));
        assert_eq!(p.delay(2), Duration::from_millis(20));
        assert_eq!(p.delay(7), Duration::from_millis(640));
        assert_eq!(p.delay(8), Duration::from_secs(1));
        assert_eq!(p.delay(200), Duration::from_secs(1));
    }

    #[test]
    fn glob_escape_makes_prefix_literal() {
        assert_eq!(glob_escape("directive:"), "directive:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn control_urls_are_validated_and_normalised() {
        let c = SubscribeConfig::new(
            "redis://127.0.0.1:6379",
            vec!["http://127.0.0.1:19000/".to_string(), " ".to_string()],
            Some("secret-token".into()),
            "directive:",
        )
        .unwrap();
        assert_eq!(c.control_urls(), ["http://127.0.0.1:19000"]);
        assert!(!format!("{c:?}").contains("secret-token"));
        for bad in ["https://x:1", "127.0.0.1:1", "http://x:1/?a=b", "nope"] {
            assert!(
                SubscribeConfig::new("redis://127.0.0.1", vec![bad.to_string()], None, "d:")
                    .is_err(),
                "{bad}"
            );
        }
    }
}
