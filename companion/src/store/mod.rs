//! The directive store: a small HTTP API that resolves an agent's active
//! directive, and the id of the version it is, from Postgres (SPEC §4). The
//! version id is what the filter records per request for the audit trail
//! (SPEC §7).
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

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::{Object, Pool};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::json_error;
use crate::keys::KeySha256;
use crate::metrics::{Counter, CONTENT_TYPE};
use crate::{DbFailure, DirectiveText, Error};

mod flight;
mod guard;
mod metrics;

use flight::{OnDispatch, Sharing, SingleFlight};
pub use guard::{InvalidationGuard, DEFAULT_GUARD_TIMEOUT, DEFAULT_SHARE_WINDOW};
pub use metrics::StoreMetrics;

/// An agent's active directive as the store resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveDirective {
    /// The text (redacted in `Debug`).
    pub content: DirectiveText,
    /// The `directive_versions` row it is, i.e. `directives.active_version_id`:
    /// the version an operator finds in the access log and in `history`.
    pub version_id: Uuid,
}

/// Result of a directive lookup: the active directive, `None` when there is
/// none.
pub type LookupResult = Result<Option<ActiveDirective>, DbFailure>;

/// SPEC §4's resolution query, verbatim but for `dv.id` also selected: content
/// and version id come from the same row of the same snapshot. No row means
/// "no directive".
pub const RESOLVE_SQL: &str = "SELECT dv.content, dv.id
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

/// Result of a key lookup: the agent of an active key, `None` when unknown or
/// revoked.
pub type KeyLookupResult = Result<Option<Uuid>, DbFailure>;

struct Inner {
    pool: Pool,
    options: StoreOptions,
    metrics: StoreMetrics,
    /// Directive lookups, by agent.
    /// The version travels with the text, so a joiner gets the id of the text
    /// it is given, never one read apart from it.
    flights: Arc<SingleFlight<Uuid, Option<ActiveDirective>>>,
    /// With it, a directive query already sent is shared with lookups for which
    /// Redis shows no invalidation since (see [`InvalidationGuard`]).
    guard: Option<InvalidationGuard>,
    /// Key lookups, by key hash (same rule: never a sent query).
    key_flights: Arc<SingleFlight<KeySha256, Option<Uuid>>>,
}

/// Shared state of the store; cheap to clone.
#[derive(Clone)]
pub struct StoreState {
    inner: Arc<Inner>,
}

impl StoreState {
    /// State over a pool built by [`crate::db::read_only_pool`]: no sent query
    /// is ever shared.
    pub fn new(pool: Pool, options: StoreOptions) -> Self {
        Self::build(pool, options, None)
    }

    /// As [`StoreState::new`], and a directive query already sent, or answered
    /// less than `window` ago, is shared with a later lookup of the same agent
    /// when `guard` finds no invalidation of it in Redis after that lookup arrived:
    /// a fleet's cold start costs Postgres one query per agent. `window` plus the
    /// lookup deadline must stay below the subscriber's tombstone life.
    pub fn with_guard(
        pool: Pool,
        options: StoreOptions,
        guard: InvalidationGuard,
        window: Duration,
    ) -> Self {
        Self::build(pool, options, Some((guard, window)))
    }

    fn build(
        pool: Pool,
        options: StoreOptions,
        guard: Option<(InvalidationGuard, Duration)>,
    ) -> Self {
        let single_flight = options.single_flight;
        let window = guard.as_ref().map(|(_, window)| *window);
        Self {
            inner: Arc::new(Inner {
                pool,
                options,
                metrics: StoreMetrics::default(),
                flights: SingleFlight::new(single_flight, window),
                guard: guard.map(|(guard, _)| guard),
                key_flights: SingleFlight::new(single_flight, None),
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
    /// for a connection share its result; with a guard, also those that arrive
    /// while it runs or shortly after, once Redis shows no invalidation since.
    pub async fn lookup(&self, agent_id: Uuid) -> LookupResult {
        let state = self.clone();
        let m = &self.inner.metrics;
        let sharing = Sharing {
            coalesced: &m.coalesced,
            shared_late: &m.shared_late,
            refused: &m.share_refused,
        };
        let guard = self.inner.guard.as_ref();
        let check = move || async move {
            match guard {
                Some(guard) => guard.clean(agent_id).await,
                None => false,
            }
        };
        self.inner
            .flights
            .lookup_checked(agent_id, &sharing, check, move |on_dispatch| async move {
                let sent = &state.inner.metrics.db_queries;
                state
                    .query(RESOLVE_SQL, &agent_id, sent, on_dispatch, |row| {
                        Ok(ActiveDirective {
                            content: DirectiveText::new(row.try_get::<_, String>(0)?),
                            version_id: row.try_get(1)?,
                        })
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

/// The 200 body of a lookup: `{"agent_id","content","version_id"}` in that
/// order, `content` and `version_id` both null when the agent has no active
/// directive.
///
/// `version_id` came after the first two (SPEC §4, for the audit trail). The
/// filter reads the members it names and ignores any other (its
/// `parse_store`), so filters from before the audit trail keep working against
/// this store unchanged; members must only ever be added, never renamed.
#[derive(Serialize)]
struct DirectiveBody {
    agent_id: Uuid,
    content: Option<DirectiveText>,
    version_id: Option<Uuid>,
}

impl DirectiveBody {
    fn new(agent_id: Uuid, found: Option<ActiveDirective>) -> Self {
        let (content, version_id) = match found {
            Some(d) => (Some(d.content), Some(d.version_id)),
            None => (None, None),
        };
        Self {
            agent_id,
            content,
            version_id,
        }
    }
}

async fn get_directive(
    State(state): State<StoreState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let trace_id = crate::trace::trace_id(&headers).unwrap_or("-");
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
        Ok(found) => {
            let outcome = if found.is_some() {
                m.found.inc();
                "found"
            } else {
                m.none.inc();
                "none"
            };
            // The version id is safe to log (it is what the audit trail shows);
            // the text never is.
            tracing::debug!(
                agent_id = %agent_id,
                outcome,
                trace_id,
                version_id = %found.as_ref().map_or_else(|| "none".to_owned(), |d| d.version_id.to_string()),
                elapsed_us = elapsed.as_micros() as u64,
                "lookup"
            );
            Json(DirectiveBody::new(agent_id, found)).into_response()
        }
        Err(failure) => {
            m.error.inc();
            tracing::warn!(agent_id = %agent_id, trace_id, error = %failure, elapsed_us = elapsed.as_micros() as u64, "lookup failed");
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
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let trace_id = crate::trace::trace_id(&headers).unwrap_or("-");
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
            tracing::debug!(key_sha256 = %key, outcome, trace_id, elapsed_us = elapsed.as_micros() as u64, "key lookup");
            Json(KeyBody {
                key_sha256: key,
                agent_id,
            })
            .into_response()
        }
        Err(failure) => {
            m.key_error.inc();
            tracing::warn!(trace_id, error = %failure, elapsed_us = elapsed.as_micros() as u64, "key lookup failed");
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
