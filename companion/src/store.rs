//! The directive store: a small HTTP API that resolves an agent's active
//! directive from Postgres (SPEC §4).
//!
//! It is what the filter calls on an L1 and L2 miss, so it must answer quickly
//! or fail quickly: connection acquisition and queries are bounded, and any
//! database trouble becomes a 503 rather than a hang. It must never write
//! (its pool is read-only, see [`crate::db`]), never log or echo content other
//! than in the 200 body, and never return database error text to a client.
//!
//! It also resolves gateway API keys (SPEC §3.1): `GET /v1/keys/{sha256hex}`
//! answers the agent an active key belongs to, with the same deadlines, single
//! flight and metrics style as the directive lookup. Only the key's SHA-256 ever
//! reaches the store; it is logged at debug level at most.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::{Object, Pool};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::json_error;
use crate::keys::KeySha256;
use crate::metrics::{Counter, Exposition, Histogram, CONTENT_TYPE, LATENCY_BUCKETS};
use crate::{DbFailure, DirectiveText, Error};

/// SPEC §4's resolution query, verbatim. No row means "no directive".
pub const RESOLVE_SQL: &str = "SELECT dv.content
FROM ibex_core.directives d
JOIN ibex_core.directive_versions dv ON dv.id = d.active_version_id
WHERE d.agent_id = $1 AND d.is_active = true AND dv.id IS NOT NULL
LIMIT 1";

/// The agent of an active gateway API key. No row means "unknown or revoked".
pub const KEY_RESOLVE_SQL: &str = "SELECT k.agent_id
FROM ibex_core.agent_api_keys k
WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL";

/// Behaviour knobs of the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Deadline for one lookup: acquiring a connection plus running the query.
    pub lookup_timeout: Duration,
    /// Deadline for the `/readyz` probe query.
    pub ready_timeout: Duration,
    /// Whether concurrent lookups of one agent share a query that has not been
    /// sent to Postgres yet (see `SingleFlight` for why never a sent one).
    pub single_flight: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lookup_timeout: Duration::from_millis(450),
            ready_timeout: Duration::from_millis(500),
            single_flight: true,
        }
    }
}

/// Counters of the store, exported on `/metrics`.
#[derive(Debug)]
pub struct StoreMetrics {
    /// Lookups answered with content.
    pub found: Counter,
    /// Lookups answered with `content: null`.
    pub none: Counter,
    /// Lookups answered with 503.
    pub error: Counter,
    /// Requests rejected before lookup (bad agent id).
    pub bad_requests: Counter,
    /// Lookups that joined a query for the same agent not yet sent.
    pub coalesced: Counter,
    /// Queries actually sent to Postgres.
    pub db_queries: Counter,
    /// End-to-end lookup latency, by request.
    pub latency: Histogram,
    /// Key lookups of an active key.
    pub key_found: Counter,
    /// Key lookups answered with `agent_id: null` (unknown or revoked).
    pub key_none: Counter,
    /// Key lookups answered with 503.
    pub key_error: Counter,
    /// Key lookups rejected before lookup (malformed hash).
    pub key_bad_requests: Counter,
    /// Key lookups that joined a query for the same key not yet sent.
    pub key_coalesced: Counter,
    /// Key queries actually sent to Postgres.
    pub key_db_queries: Counter,
    /// End-to-end key lookup latency, by request.
    pub key_latency: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            found: Counter::default(),
            none: Counter::default(),
            error: Counter::default(),
            bad_requests: Counter::default(),
            coalesced: Counter::default(),
            db_queries: Counter::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            key_found: Counter::default(),
            key_none: Counter::default(),
            key_error: Counter::default(),
            key_bad_requests: Counter::default(),
            key_coalesced: Counter::default(),
            key_db_queries: Counter::default(),
            key_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl StoreMetrics {
    /// Prometheus text of all store metrics.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "ibex_store_lookups_total",
            "counter",
            "Directive lookups that reached the store with a valid agent id, by result.",
        )
        .sample(
            "ibex_store_lookups_total",
            &[("result", "found")],
            self.found.get(),
        )
        .sample(
            "ibex_store_lookups_total",
            &[("result", "none")],
            self.none.get(),
        )
        .sample(
            "ibex_store_lookups_total",
            &[("result", "error")],
            self.error.get(),
        )
        .counter(
            "ibex_store_bad_requests_total",
            "Lookups rejected because the agent id is not a UUID.",
            &self.bad_requests,
        )
        .counter(
            "ibex_store_coalesced_total",
            "Lookups that shared a query for the same agent that was waiting for a connection.",
            &self.coalesced,
        )
        .counter(
            "ibex_store_db_queries_total",
            "Resolution queries sent to Postgres.",
            &self.db_queries,
        )
        .histogram(
            "ibex_store_lookup_seconds",
            "Lookup latency as seen by the handler.",
            &self.latency,
        );
        e.family(
            "ibex_store_key_lookups_total",
            "counter",
            "Gateway API key lookups that reached the store with a valid hash, by result.",
        )
        .sample(
            "ibex_store_key_lookups_total",
            &[("result", "found")],
            self.key_found.get(),
        )
        .sample(
            "ibex_store_key_lookups_total",
            &[("result", "none")],
            self.key_none.get(),
        )
        .sample(
            "ibex_store_key_lookups_total",
            &[("result", "error")],
            self.key_error.get(),
        )
        .counter(
            "ibex_store_key_bad_requests_total",
            "Key lookups rejected because the hash is not 64 lower-case hex characters.",
            &self.key_bad_requests,
        )
        .counter(
            "ibex_store_key_coalesced_total",
            "Key lookups that shared a query for the same key that was waiting for a connection.",
            &self.key_coalesced,
        )
        .counter(
            "ibex_store_key_db_queries_total",
            "Key resolution queries sent to Postgres.",
            &self.key_db_queries,
        )
        .histogram(
            "ibex_store_key_lookup_seconds",
            "Key lookup latency as seen by the handler.",
            &self.key_latency,
        );
        e.finish()
    }
}

type LookupResult = Result<Option<DirectiveText>, DbFailure>;

/// Result of a key lookup: the agent of an active key, `None` when unknown or
/// revoked.
pub type KeyLookupResult = Result<Option<Uuid>, DbFailure>;

/// A query that lookups of one agent (or one key) may still join.
struct Flight<V> {
    id: u64,
    result: watch::Receiver<Option<Result<V, DbFailure>>>,
}

/// Single flight for one kind of lookup: joinable queries, by what is looked
/// up (an agent id, a key hash).
///
/// An entry is removed the moment its query is sent to Postgres: a lookup that
/// arrives later may be answering a request made after a directive (or key)
/// update, so it must get a snapshot taken after its own arrival, i.e. a query
/// of its own. Sharing is therefore limited to lookups that arrived while the
/// first one was still waiting for a connection, which is exactly the pile-up
/// to absorb when Postgres is slow.
struct SingleFlight<K, V> {
    /// Off: every lookup runs its own query.
    enabled: bool,
    flights: Mutex<HashMap<K, Flight<V>>>,
    next_flight: AtomicU64,
}

/// Handed to a lookup's query: closes the flight it runs for, if any, just
/// before the statement is sent.
struct OnDispatch<K, V>(Option<FlightRef<K, V>>);

/// Which flight an [`OnDispatch`] closes.
struct FlightRef<K, V> {
    flights: Arc<SingleFlight<K, V>>,
    key: K,
    id: u64,
}

impl<K: Copy + Eq + Hash, V> OnDispatch<K, V> {
    fn fire(self) {
        if let Some(f) = self.0 {
            f.flights.close(f.key, f.id);
        }
    }
}

impl<K: Copy + Eq + Hash, V> SingleFlight<K, V> {
    fn new(enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            enabled,
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
        })
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<K, Flight<V>>> {
        // The map stays consistent even if a holder panicked: every critical
        // section is a single insert, lookup or remove.
        self.flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops `key`'s flight `id` from accepting joiners, unless a newer flight
    /// already replaced it.
    fn close(&self, key: K, id: u64) {
        let mut flights = self.flights();
        if flights.get(&key).is_some_and(|f| f.id == id) {
            flights.remove(&key);
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Copy + Eq + Hash + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Answers a lookup of `key` with `query`, or, while a query for the same
    /// key is still waiting for a connection, with that query's result
    /// (counted in `coalesced`). `query` must fire its [`OnDispatch`] just
    /// before it sends the statement.
    async fn lookup<Q, Fut>(
        self: &Arc<Self>,
        key: K,
        coalesced: &Counter,
        query: Q,
    ) -> Result<V, DbFailure>
    where
        Q: FnOnce(OnDispatch<K, V>) -> Fut,
        Fut: Future<Output = Result<V, DbFailure>> + Send + 'static,
    {
        if !self.enabled {
            return query(OnDispatch(None)).await;
        }
        let mut rx = {
            let mut flights = self.flights();
            match flights.get(&key) {
                Some(flight) => {
                    coalesced.inc();
                    flight.result.clone()
                }
                None => {
                    let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    flights.insert(
                        key,
                        Flight {
                            id,
                            result: rx.clone(),
                        },
                    );
                    // The query runs in its own task so that a leader whose
                    // client disconnects does not cancel it for the others.
                    let run = query(OnDispatch(Some(FlightRef {
                        flights: Arc::clone(self),
                        key,
                        id,
                    })));
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        let result = run.await;
                        // Also closes flights that failed before dispatch.
                        this.close(key, id);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let shared = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        shared.unwrap_or_else(|| Err(DbFailure::Connection("lookup task ended early".into())))
    }
}

struct Inner {
    pool: Pool,
    options: StoreOptions,
    metrics: StoreMetrics,
    /// Directive lookups, by agent.
    flights: Arc<SingleFlight<Uuid, Option<DirectiveText>>>,
    /// Key lookups, by key hash (same rule: never a sent query).
    key_flights: Arc<SingleFlight<KeySha256, Option<Uuid>>>,
}

/// Shared state of the store; cheap to clone.
#[derive(Clone)]
pub struct StoreState {
    inner: Arc<Inner>,
}

impl StoreState {
    /// State over a pool built by [`crate::db::read_only_pool`].
    pub fn new(pool: Pool, options: StoreOptions) -> Self {
        let single_flight = options.single_flight;
        Self {
            inner: Arc::new(Inner {
                pool,
                options,
                metrics: StoreMetrics::default(),
                flights: SingleFlight::new(single_flight),
                key_flights: SingleFlight::new(single_flight),
            }),
        }
    }

    /// The store's metrics.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// The underlying pool (tests use it to prove it is read-only).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Resolves the active directive of `agent_id`. With single flight on,
    /// lookups that arrive while a query for the same agent is still waiting
    /// for a connection share its result.
    pub async fn lookup(&self, agent_id: Uuid) -> LookupResult {
        let state = self.clone();
        let m = &self.inner.metrics;
        self.inner
            .flights
            .lookup(agent_id, &m.coalesced, move |on_dispatch| async move {
                let sent = &state.inner.metrics.db_queries;
                state
                    .query(RESOLVE_SQL, &agent_id, sent, on_dispatch, |row| {
                        row.try_get::<_, String>(0).map(DirectiveText::new)
                    })
                    .await
            })
            .await
    }

    /// Resolves the agent of an active gateway API key by its SHA-256; `None`
    /// for an unknown or revoked key. Single flight works as for
    /// [`StoreState::lookup`]: only lookups that arrive while a query for the
    /// same key is still waiting for a connection share it.
    pub async fn lookup_key(&self, key: KeySha256) -> KeyLookupResult {
        let state = self.clone();
        let m = &self.inner.metrics;
        self.inner
            .key_flights
            .lookup(key, &m.key_coalesced, move |on_dispatch| async move {
                let sent = &state.inner.metrics.key_db_queries;
                let digest: &[u8] = &key.0;
                state
                    .query(KEY_RESOLVE_SQL, &digest, sent, on_dispatch, |row| {
                        row.try_get::<_, Uuid>(0)
                    })
                    .await
            })
            .await
    }

    /// One resolution query (`sql` with the single parameter `param`, at most
    /// one row, decoded by `decode`), bounded by the lookup deadline.
    /// `on_dispatch` fires and `sent` counts just before the statement is sent.
    async fn query<K, V, T>(
        &self,
        sql: &str,
        param: &(dyn ToSql + Sync),
        sent: &Counter,
        on_dispatch: OnDispatch<K, V>,
        decode: impl FnOnce(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Option<T>, DbFailure>
    where
        K: Copy + Eq + Hash,
    {
        let deadline = tokio::time::Instant::now() + self.inner.options.lookup_timeout;
        let client = match tokio::time::timeout_at(deadline, self.inner.pool.get()).await {
            Err(_) => return Err(DbFailure::PoolTimeout),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(c)) => c,
        };
        let run = async {
            let stmt = client.prepare_cached(sql).await?;
            on_dispatch.fire();
            sent.inc();
            client.query_opt(&stmt, &[param]).await
        };
        match tokio::time::timeout_at(deadline, run).await {
            Err(_) => {
                // The connection may still be busy with the abandoned query;
                // keep it out of the pool.
                drop(Object::take(client));
                Err(DbFailure::QueryTimeout)
            }
            Ok(Err(e)) => {
                if e.as_db_error().is_none() {
                    drop(Object::take(client));
                }
                Err(e.into())
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Ok(Some(row))) => decode(&row).map(Some).map_err(DbFailure::from),
        }
    }

    /// True when a trivial query succeeds within the readiness deadline.
    pub async fn ready(&self) -> Result<(), DbFailure> {
        let probe = async {
            let client = self.inner.pool.get().await.map_err(DbFailure::from)?;
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(DbFailure::from)
        };
        tokio::time::timeout(self.inner.options.ready_timeout, probe)
            .await
            .unwrap_or(Err(DbFailure::QueryTimeout))
    }
}

/// The 200 body of a lookup.
#[derive(Serialize)]
struct DirectiveBody {
    agent_id: Uuid,
    content: Option<DirectiveText>,
}

async fn get_directive(
    State(state): State<StoreState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let agent_id = match path.ok().and_then(|Path(raw)| Uuid::try_parse(&raw).ok()) {
        Some(id) => id,
        None => {
            state.metrics().bad_requests.inc();
            tracing::debug!("lookup rejected: agent id is not a UUID");
            return Error::InvalidAgentId.into_response();
        }
    };
    let started = Instant::now();
    let result = state.lookup(agent_id).await;
    let elapsed = started.elapsed();
    let m = state.metrics();
    m.latency.observe(elapsed);
    match result {
        Ok(content) => {
            let outcome = if content.is_some() {
                m.found.inc();
                "found"
            } else {
                m.none.inc();
                "none"
            };
            tracing::debug!(agent_id = %agent_id, outcome, elapsed_us = elapsed.as_micros() as u64, "lookup");
            Json(DirectiveBody { agent_id, content }).into_response()
        }
        Err(failure) => {
            m.error.inc();
            tracing::warn!(agent_id = %agent_id, error = %failure, elapsed_us = elapsed.as_micros() as u64, "lookup failed");
            Error::Db(failure).into_response()
        }
    }
}

/// The 200 body of a key lookup: `agent_id` is null for an unknown or revoked
/// key.
#[derive(Serialize)]
struct KeyBody {
    key_sha256: KeySha256,
    agent_id: Option<Uuid>,
}

async fn get_key(
    State(state): State<StoreState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let key = match path.ok().and_then(|Path(raw)| KeySha256::parse(&raw)) {
        Some(key) => key,
        None => {
            state.metrics().key_bad_requests.inc();
            // Never echo the input: a client may have sent the key itself.
            tracing::debug!("key lookup rejected: not a sha256 hex");
            return Error::InvalidKeySha256.into_response();
        }
    };
    let started = Instant::now();
    let result = state.lookup_key(key).await;
    let elapsed = started.elapsed();
    let m = state.metrics();
    m.key_latency.observe(elapsed);
    match result {
        Ok(agent_id) => {
            let outcome = if agent_id.is_some() {
                m.key_found.inc();
                "found"
            } else {
                m.key_none.inc();
                "none"
            };
            tracing::debug!(key_sha256 = %key, outcome, elapsed_us = elapsed.as_micros() as u64, "key lookup");
            Json(KeyBody {
                key_sha256: key,
                agent_id,
            })
            .into_response()
        }
        Err(failure) => {
            m.key_error.inc();
            tracing::warn!(error = %failure, elapsed_us = elapsed.as_micros() as u64, "key lookup failed");
            Error::Db(failure).into_response()
        }
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
}

async fn readyz(State(state): State<StoreState>) -> Response {
    match state.ready().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response(),
        Err(failure) => {
            tracing::debug!(error = %failure, "readiness probe failed");
            Error::Db(failure).into_response()
        }
    }
}

async fn metrics(State(state): State<StoreState>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics().render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such endpoint",
    )
}

/// The store's router.
pub fn app(state: StoreState) -> Router {
    Router::new()
        .route("/v1/agents/{agent_id}/directive", get(get_directive))
        .route(
            &format!("{}/{{key_sha256}}", ibex_wire::STORE_KEYS_PATH),
            get(get_key),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the store on `listener` until `shutdown` resolves, then stops
/// accepting and waits for in-flight requests to finish.
pub async fn run(
    listener: TcpListener,
    state: StoreState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "store listening");
    }
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("store stopped");
    Ok(())
}
