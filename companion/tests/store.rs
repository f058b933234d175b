//! The store over a real PostgreSQL 15: answers (text and version id),
//! errors, outage and recovery, read-only pool, single flight.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ibex_companion::db::{self, PoolSettings};
use ibex_companion::store::{self, StoreOptions, StoreState};
use ibex_companion::{admin, DirectiveText};
use tokio::sync::oneshot;
use uuid::Uuid;

/// A store served in-process on a free port; stopped (gracefully) on drop of
/// the sender or via `stop`.
struct Store {
    base: String,
    state: StoreState,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Store {
    async fn start(url: &str, settings: PoolSettings, options: StoreOptions) -> Store {
        let pool = db::read_only_pool(url, &settings).unwrap();
        Self::serve(StoreState::new(pool, options)).await
    }

    async fn serve(state: StoreState) -> Store {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(store::run(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Store {
            base,
            state,
            stop: Some(tx),
            task,
        }
    }

    async fn default(url: &str) -> Store {
        Self::start(url, PoolSettings::default(), StoreOptions::default()).await
    }

    fn directive_url(&self, agent: impl std::fmt::Display) -> String {
        format!("{}/v1/agents/{agent}/directive", self.base)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("store did not stop")
            .unwrap()
            .unwrap();
    }
}

/// Writes `text` as the agent's active directive; returns the new version id.
async fn set(url: &str, agent: Uuid, text: &str) -> Uuid {
    admin::write_directive(url, agent, admin::DEMO_ORG_ID, &DirectiveText::new(text))
        .await
        .unwrap()
        .version_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_content_null_and_json_errors() {
    let pg = Pg::start();
    migrate(&pg.url()).await;
    let agent = Uuid::new_v4();
    let text = "Be brief.\n\"Quoted\" and ünïcödé \u{1F980} \\ back\tslash";
    let version = set(&pg.url(), agent, text).await;
    let store = Store::default(&pg.url()).await;

    let (status, raw) = http_get(&store.directive_url(agent)).await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "agent_id": agent.to_string(),
            "content": text,
            "version_id": version.to_string(),
        })
    );
    // Members in this order: agent_id, content, version_id.
    assert!(
        raw.starts_with(&format!(r#"{{"agent_id":"{agent}","content":""#)),
        "{raw}"
    );
    assert!(
        raw.ends_with(&format!(r#"","version_id":"{version}"}}"#)),
        "{raw}"
    );

    let unknown = Uuid::new_v4();
    let (status, raw) = http_get(&store.directive_url(unknown)).await;
    assert_eq!(status, 200);
    assert_eq!(
        raw,
        format!(r#"{{"agent_id":"{unknown}","content":null,"version_id":null}}"#)
    );

    let (status, body) = http_json(&store.directive_url("not-a-uuid")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_agent_id");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].is_string());

    // Upper-case input is accepted and answered in canonical form.
    let (status, body) = http_json(&store.directive_url(agent.to_string().to_uppercase())).await;
    assert_eq!(status, 200);
    assert_eq!(body["agent_id"], agent.to_string());

    let (status, body) = http_json(&format!("{}/nope", store.base)).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    assert_eq!(http_get(&format!("{}/healthz", store.base)).await.0, 200);
    assert_eq!(http_get(&format!("{}/readyz", store.base)).await.0, 200);

    let found = r#"ibex_store_lookups_total{result="found"}"#;
    let none = r#"ibex_store_lookups_total{result="none"}"#;
    let error = r#"ibex_store_lookups_total{result="error"}"#;
    assert_eq!(read_metric(&store.base, found).await, 2);
    assert_eq!(read_metric(&store.base, none).await, 1);
    assert_eq!(read_metric(&store.base, error).await, 0);
    assert_eq!(
        read_metric(&store.base, "ibex_store_bad_requests_total").await,
        1
    );
    assert_eq!(
        read_metric(&store.base, "ibex_store_lookup_seconds_count").await,
        3
    );

    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_id_follows_every_change() {
    let pg = Pg::start();
    let url = pg.url();
    migrate(&url).await;
    let agent = Uuid::new_v4();
    let store = Store::default(&url).await;
    let answer = |store_url: String| async move {
        let (status, body) = http_json(&store_url).await;
        assert_eq!(status, 200, "{body}");
        (body["content"].clone(), body["version_id"].clone())
    };
    let none = (serde_json::Value::Null, serde_json::Value::Null);
    assert_eq!(answer(store.directive_url(agent)).await, none);

    let v1 = set(&url, agent, "first").await;
    assert_eq!(
        answer(store.directive_url(agent)).await,
        ("first".into(), v1.to_string().into())
    );
    let v2 = set(&url, agent, "second").await;
    assert_ne!(v1, v2);
    assert_eq!(
        answer(store.directive_url(agent)).await,
        ("second".into(), v2.to_string().into())
    );
    // The very id the database holds as the active version.
    let client = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    let active: Uuid = client
        .query_one(
            "SELECT active_version_id FROM ibex_core.directives WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, v2);

    // Cleared: no text and no version, not the last one's id.
    admin::deactivate_directive(&url, agent).await.unwrap();
    assert_eq!(answer(store.directive_url(agent)).await, none);
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_503_while_postgres_is_down_and_recovers_without_restart() {
    let pg = Pg::start();
    migrate(&pg.url()).await;
    let agent = Uuid::new_v4();
    set(&pg.url(), agent, "stay the course").await;
    let store = Store::default(&pg.url()).await;
    assert_eq!(http_json(&store.directive_url(agent)).await.0, 200);

    pg.stop();
    // Both the pooled connection that just died and fresh connects must fail
    // fast; try a few times to go through each path.
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = http_get(&store.directive_url(agent)).await;
        assert_eq!(status, 503, "{body}");
        // Bounded, not hanging: far below the 10 s client timeout.
        assert!(started.elapsed() < Duration::from_secs(5));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "store_unavailable");
        assert_eq!(json["error"]["type"], "service_unavailable");
        for leak in [
            "refused",
            "sqlstate",
            "postgres://",
            "127.0.0.1",
            "connection",
        ] {
            assert!(!body.contains(leak), "leaked {leak:?}: {body}");
        }
    }
    let (status, body) = http_json(&format!("{}/readyz", store.base)).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(http_get(&format!("{}/healthz", store.base)).await.0, 200);
    assert!(read_metric(&store.base, r#"ibex_store_lookups_total{result="error"}"#).await >= 3);

    pg.resume();
    let url = store.directive_url(agent);
    let body = eventually("store recovers", Duration::from_secs(20), || async {
        let (status, body) = http_json(&url).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body["content"], "stay the course");
    assert_eq!(http_get(&format!("{}/readyz", store.base)).await.0, 200);
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_503_when_postgres_is_slow() {
    let pg = Pg::start();
    migrate(&pg.url()).await;
    let agent = Uuid::new_v4();
    set(&pg.url(), agent, "patience").await;
    let store = Store::default(&pg.url()).await;

    // An exclusive lock makes the resolution query wait: statement_timeout
    // (or the lookup deadline) must turn that into a prompt 503.
    let mut admin = db::connect(&pg.url(), Duration::from_secs(5))
        .await
        .unwrap();
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ibex_core.directives IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    let (status, body) = http_json(&store.directive_url(agent)).await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    tx.rollback().await.unwrap();

    let (status, body) = http_json(&store.directive_url(agent)).await;
    assert_eq!(status, 200);
    assert_eq!(body["content"], "patience");
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_is_read_only_even_for_a_superuser() {
    let pg = Pg::start();
    migrate(&pg.url()).await;
    let pool = db::read_only_pool(pg.url(), &PoolSettings::default()).unwrap();
    let client = pool.get().await.unwrap();
    let ro: String = client
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ro, "on");
    for sql in [
        "CREATE TABLE ibex_core.evil (x int)",
        "INSERT INTO ibex_core.agents (id, org_id) VALUES (gen_random_uuid(), gen_random_uuid())",
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
            "{sql}"
        );
    }
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "400ms");
}

/// A store whose pool has a single connection and generous deadlines, so a
/// test can hold the connection (or a table lock) to line lookups up.
async fn single_connection_store(url: &str) -> Store {
    Store::start(
        url,
        PoolSettings {
            max_size: 1,
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(30),
        },
        StoreOptions {
            lookup_timeout: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_waiting_for_a_connection_share_one_query() {
    let pg = Pg::start();
    migrate(&pg.url()).await;
    let agent = Uuid::new_v4();
    let version = set(&pg.url(), agent, "together").await;
    let store = single_connection_store(&pg.url()).await;

    let held = store.state.pool().get().await.unwrap();
    let n = 20;
    let requests: Vec<_> = (0..n)
        .map(|_| tokio::spawn(http_json_owned(store.directive_url(agent))))
        .collect();
    let metrics = store.state.metrics();
    eventually(
        "all lookups joined the flight",
        Duration::from_secs(20),
        || async { (metrics.coalesced.get() == n - 1).then_some(()) },
    )
    .await;
    assert_eq!(metrics.db_queries.get(), 0);
    drop(held);
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["content"], "together");
        // Joiners get the version with the text they share.
        assert_eq!(body["version_id"], version.to_string());
    }
    assert_eq!(metrics.found.get(), n);
    assert_eq!(metrics.db_queries.get(), 1);
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_never_join_a_query_already_sent() {
    // A lookup arriving after a query was sent may follow a directive update;
    // sharing that query's older snapshot would serve stale text.
    let pg = Pg::start();
    migrate(&pg.url()).await;
    let agent = Uuid::new_v4();
    set(&pg.url(), agent, "fresh").await;
    let store = single_connection_store(&pg.url()).await;
    let metrics = store.state.metrics();
    // Warm the statement cache so the next query is sent without a prepare.
    assert_eq!(http_json(&store.directive_url(agent)).await.0, 200);
    assert_eq!(metrics.db_queries.get(), 1);

    let mut admin = db::connect(&pg.url(), Duration::from_secs(5))
        .await
        .unwrap();
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ibex_core.directives IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // A: sent, then blocked on the lock while holding the only connection.
    let a = tokio::spawn(http_json_owned(store.directive_url(agent)));
    eventually("A's query sent", Duration::from_secs(20), || async {
        (metrics.db_queries.get() == 2).then_some(())
    })
    .await;
    // B must start a flight of its own (waiting for the connection); C joins B.
    let b = tokio::spawn(http_json_owned(store.directive_url(agent)));
    let c = tokio::spawn(http_json_owned(store.directive_url(agent)));
    eventually("C joined a flight", Duration::from_secs(20), || async {
        (metrics.coalesced.get() >= 1).then_some(())
    })
    .await;
    tx.rollback().await.unwrap();
    for r in [a, b, c] {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["content"], "fresh");
    }
    assert_eq!(metrics.coalesced.get(), 1, "only C shared (B's) query");
    assert_eq!(metrics.db_queries.get(), 3, "warm-up, A and B");
    store.stop().await;
}

async fn http_json_owned(url: String) -> (u16, serde_json::Value) {
    http_json(&url).await
}

// -- sharing a sent query, guarded by Redis (a fleet's cold start) ----------------

/// A one-connection store (as `single_connection_store`) whose guard reads `redis_url`,
/// sharing answered queries for `window`.
async fn guarded_store(url: &str, redis_url: &str, window: Duration) -> Store {
    let pool = db::read_only_pool(
        url,
        &PoolSettings {
            max_size: 1,
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(30),
        },
    )
    .unwrap();
    let options = StoreOptions {
        lookup_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let client = redis::Client::open(redis_url).unwrap();
    let guard = store::InvalidationGuard::new(client, "directive:", Duration::from_secs(2));
    Store::serve(StoreState::with_guard(pool, options, guard, window)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_guard_lookups_share_a_sent_query_while_redis_shows_no_invalidation() {
    // The Envoys of a fleet reach the store for a cold agent at slightly different
    // moments: B and C come after A's query was sent, and share it.
    let pg = Pg::start();
    let redis = Redis::start();
    migrate(&pg.url()).await;
    let (agent, other) = (Uuid::new_v4(), Uuid::new_v4());
    let version = set(&pg.url(), agent, "shared").await;
    set(&pg.url(), other, "warm-up").await;
    let store = guarded_store(&pg.url(), &redis.url(), Duration::ZERO).await;
    let metrics = store.state.metrics();
    // Warm the statement cache (another agent, so no flight of `agent` is open).
    assert_eq!(http_json(&store.directive_url(other)).await.0, 200);

    let mut admin = db::connect(&pg.url(), Duration::from_secs(5))
        .await
        .unwrap();
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE ibex_core.directives IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let a = tokio::spawn(http_json_owned(store.directive_url(agent)));
    eventually("A's query sent", Duration::from_secs(20), || async {
        (metrics.db_queries.get() == 2).then_some(())
    })
    .await;
    let b = tokio::spawn(http_json_owned(store.directive_url(agent)));
    let c = tokio::spawn(http_json_owned(store.directive_url(agent)));
    eventually(
        "B and C checked Redis and joined",
        Duration::from_secs(20),
        || async { (metrics.shared_late.get() == 2).then_some(()) },
    )
    .await;
    tx.rollback().await.unwrap();
    for r in [a, b, c] {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["content"], "shared");
        assert_eq!(body["version_id"], version.to_string());
    }
    assert_eq!(metrics.db_queries.get(), 2, "warm-up and A only");
    assert_eq!(metrics.share_refused.get(), 0);
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_guard_a_tombstone_or_the_flush_marker_means_a_query_of_its_own() {
    // Within the window an answered query is shared, unless Redis shows that the
    // agent was invalidated (its tombstone) or everything was (the flush marker):
    // then the lookup may answer a request made after an update, and gets a fresh
    // snapshot. A Redis it cannot read counts as an invalidation.
    let pg = Pg::start();
    let redis = Redis::start();
    migrate(&pg.url()).await;
    let agent = Uuid::new_v4();
    set(&pg.url(), agent, "first").await;
    let store = guarded_store(&pg.url(), &redis.url(), Duration::from_secs(60)).await;
    let metrics = store.state.metrics();
    let content = |body: serde_json::Value| body["content"].as_str().unwrap_or("-").to_owned();

    assert_eq!(
        content(http_json(&store.directive_url(agent)).await.1),
        "first"
    );
    assert_eq!(metrics.db_queries.get(), 1);
    // Postgres changed, nothing published yet: the answer is shared (any cache would
    // still serve it until the update is published).
    set(&pg.url(), agent, "second").await;
    assert_eq!(
        content(http_json(&store.directive_url(agent)).await.1),
        "first"
    );
    assert_eq!(
        (metrics.db_queries.get(), metrics.shared_late.get()),
        (1, 1)
    );

    // The subscriber's tombstone: a query of its own, which later lookups share.
    let mut conn = redis.conn();
    let key = format!("directive:{agent}");
    redis::cmd("SET")
        .arg(&key)
        .arg("\0")
        .arg("EX")
        .arg(10)
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(
        content(http_json(&store.directive_url(agent)).await.1),
        "second"
    );
    assert_eq!(
        (metrics.db_queries.get(), metrics.share_refused.get()),
        (2, 1)
    );

    // A value written back (not a tombstone) is no invalidation.
    let value = ibex_wire::versioned_directive_value(&Uuid::new_v4().to_string(), "second");
    redis::cmd("SET")
        .arg(&key)
        .arg(value)
        .arg("EX")
        .arg(10)
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(
        content(http_json(&store.directive_url(agent)).await.1),
        "second"
    );
    assert_eq!(
        (metrics.db_queries.get(), metrics.shared_late.get()),
        (2, 2)
    );

    // The flush marker of the agent's slot (a flush sets one in every slot).
    let marker =
        ibex_wire::flush_marker_for("directive:", &ibex_wire::redis_key("directive:", agent));
    set(&pg.url(), agent, "third").await;
    redis::cmd("SET")
        .arg(&marker)
        .arg("\0")
        .arg("EX")
        .arg(10)
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(
        content(http_json(&store.directive_url(agent)).await.1),
        "third"
    );
    assert_eq!(
        (metrics.db_queries.get(), metrics.share_refused.get()),
        (3, 2)
    );

    // Redis gone: no sharing.
    redis::cmd("DEL")
        .arg(&marker)
        .query::<()>(&mut conn)
        .unwrap();
    set(&pg.url(), agent, "fourth").await;
    redis.kill();
    assert_eq!(
        content(http_json(&store.directive_url(agent)).await.1),
        "fourth"
    );
    assert_eq!(
        (metrics.db_queries.get(), metrics.share_refused.get()),
        (4, 3)
    );
    store.stop().await;
}
