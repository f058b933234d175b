//! Gateway API keys (SPEC §3.1) over real PostgreSQL and Redis: the migration,
//! `issue-key` / `revoke-key` / `list-keys` through the real binary, the store's
//! `GET /v1/keys/{sha256hex}`, and the subscriber's key invalidations against
//! recording stand-ins for Envoy's control listener.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use ibex_companion::db::{self, PoolSettings};
use ibex_companion::keys::KeySha256;
use ibex_companion::migrate::MIGRATIONS;
use ibex_companion::store::{self, StoreOptions, StoreState};
use ibex_companion::subscribe::{self, SubscribeConfig, Subscriber};
use redis::Commands;
use tokio::sync::oneshot;
use uuid::Uuid;

const FLUSH: &str = "/ibex/v1/invalidate";

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Runs the binary with `stdin` piped in.
fn companion_stdin(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = companion_cmd(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `issue-key`; returns the key (stdout, alone) after checking that stderr
/// names its hash.
fn issue(url: &str, agent: Uuid, label: Option<&str>) -> String {
    let agent_s = agent.to_string();
    let mut args = vec!["issue-key", "--agent-id", &agent_s, "--database-url", url];
    if let Some(label) = label {
        args.extend(["--label", label]);
    }
    let out = companion(&args);
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with('\n') && stdout.lines().count() == 1,
        "{stdout:?}"
    );
    let key = stdout.trim_end().to_string();
    assert!(key.starts_with("ibex_") && key.len() == 48, "{key}");
    let hash = KeySha256::of(key.as_bytes());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("agent_id={agent} key_sha256={hash}")),
        "{stderr}"
    );
    key
}

async fn revoked_at(client: &tokio_postgres::Client, hash: KeySha256) -> String {
    let digest: &[u8] = &hash.0;
    client
        .query_one(
            "SELECT revoked_at::text FROM ibex_core.agent_api_keys WHERE key_sha256 = $1",
            &[&digest],
        )
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
        .unwrap()
}

struct Store {
    base: String,
    _stop: oneshot::Sender<()>,
}

async fn start_store(url: &str) -> Store {
    let pool = db::read_only_pool(url, &PoolSettings::default()).unwrap();
    let state = StoreState::new(pool, StoreOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(store::run(listener, state, async move {
        let _ = rx.await;
    }));
    Store { base, _stop: tx }
}

struct Sub {
    base: String,
    _stop: oneshot::Sender<()>,
}

async fn start_subscriber(redis: &Redis, controls: &[&FakeControl], tombstones: bool) -> Sub {
    let mut config = SubscribeConfig::new(
        redis.url(),
        controls.iter().map(|c| c.url()),
        None,
        "directive:",
    )
    .unwrap();
    config.ping_interval = Duration::from_millis(100);
    if !tombstones {
        config.tombstone_ttl = None;
    }
    let subscriber = Subscriber::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(subscribe::run(subscriber, Some(listener), async move {
        let _ = rx.await;
    }));
    // The connect-time flush proves the subscription is live.
    for c in controls {
        c.wait_for(FLUSH, 1).await;
    }
    Sub { base, _stop: tx }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_adds_the_table_and_grants_existing_readers() {
    let pg = Pg::start();
    let url = pg.url();
    // A database at 0001 whose read-only role was granted the tables of then.
    let client = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    client.batch_execute(MIGRATIONS[0].sql).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE ibex_core.schema_migrations (name text PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO ibex_core.schema_migrations (name) VALUES ('0001_core_schema.sql');
             CREATE ROLE ibex_reader LOGIN;
             GRANT USAGE ON SCHEMA ibex_core TO ibex_reader;
             GRANT SELECT ON ALL TABLES IN SCHEMA ibex_core TO ibex_reader;",
        )
        .await
        .unwrap();
    let mut admin = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    let applied = ibex_companion::migrate::run(&mut admin).await.unwrap();
    assert_eq!(applied, ["0002_agent_api_keys.sql"]);

    // Only 32-byte hashes, only for existing agents.
    let agent = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO ibex_core.agents (id, org_id) VALUES ($1, $1)",
            &[&agent],
        )
        .await
        .unwrap();
    let short: &[u8] = &[1u8; 31];
    let err = client
        .execute(
            "INSERT INTO ibex_core.agent_api_keys (key_sha256, agent_id) VALUES ($1, $2)",
            &[&short, &agent],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "CHECK length");
    let hash = KeySha256::of(b"ibex_migration_test");
    let digest: &[u8] = &hash.0;
    let err = client
        .execute(
            "INSERT INTO ibex_core.agent_api_keys (key_sha256, agent_id) VALUES ($1, $2)",
            &[&digest, &Uuid::new_v4()],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23503", "FK to agents");
    client
        .execute(
            "INSERT INTO ibex_core.agent_api_keys (key_sha256, agent_id) VALUES ($1, $2)",
            &[&digest, &agent],
        )
        .await
        .unwrap();
    let indexed: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'ibex_core' \
             AND indexname = 'agent_api_keys_agent_id_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexed, 1);

    // The reader can SELECT the new table, and nothing more: the store over it
    // answers the key.
    let reader_url = format!("postgres://ibex_reader@127.0.0.1:{}/postgres", pg.port);
    let reader = db::connect(&reader_url, Duration::from_secs(5))
        .await
        .unwrap();
    let err = reader
        .execute("DELETE FROM ibex_core.agent_api_keys", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42501");
    let store = start_store(&reader_url).await;
    let (status, body) = http_json(&format!("{}/v1/keys/{hash}", store.base)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agent_id"], agent.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_resolve_revoke_invalidate_list() {
    let pg = Pg::start();
    let redis = Redis::start();
    let url = pg.url();
    let redis_url = redis.url();
    migrate(&url).await;
    let control = FakeControl::start_with(&[], KeyRoute::Serve).await;
    let sub = start_subscriber(&redis, &[&control], true).await;
    let store = start_store(&url).await;
    let key_url = |h: &dyn std::fmt::Display| format!("{}/v1/keys/{h}", store.base);

    // issue-key creates the agent and stores only the hash.
    let agent = Uuid::new_v4();
    let key = issue(&url, agent, Some("ci runner"));
    let hash = KeySha256::of(key.as_bytes());
    let client = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    let agents: i64 = client
        .query_one(
            "SELECT count(*) FROM ibex_core.agents WHERE id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(agents, 1);
    let stored: Vec<u8> = client
        .query_one(
            "SELECT key_sha256 FROM ibex_core.agent_api_keys WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, hash.0);

    // The store answers the agent...
    let (status, body) = http_json(&key_url(&hash)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"key_sha256": hash.hex(), "agent_id": agent.to_string()})
    );
    // ...null for an unknown key, 400 for anything that is not a lower-case hash.
    let unknown = KeySha256::of(b"ibex_never_issued");
    let (status, body) = http_json(&key_url(&unknown)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"key_sha256": unknown.hex(), "agent_id": null})
    );
    for bad in [hash.hex().to_ascii_uppercase(), key.clone(), "abc".into()] {
        let (status, body) = http_json(&key_url(&bad)).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["code"], "invalid_key_sha256");
    }

    // What the filter would have cached in Redis for the key.
    let mut conn = redis.conn();
    let redis_key = format!("agent_key:{hash}");
    let _: () = conn.set_ex(&redis_key, agent.to_string(), 60).unwrap();

    // revoke-key with the key on stdin: revoked, published, invalidated.
    let out = companion_stdin(
        &[
            "revoke-key",
            "--key-stdin",
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ],
        &format!("{key}\n"),
    );
    assert_ok(&out);
    assert_eq!(text(&out.stdout), format!("{hash}\n"));
    let key_path = format!("/ibex/v1/invalidate/key/{hash}");
    control.wait_for(&key_path, 1).await;
    // Tombstoned exactly like a directive key, before the POST.
    let value: Vec<u8> = conn.get(&redis_key).unwrap();
    assert_eq!(value, b"\0");
    let ttl: i64 = conn.ttl(&redis_key).unwrap();
    assert!((1..=10).contains(&ttl), "ttl {ttl}");
    let (status, body) = http_json(&key_url(&hash)).await;
    assert_eq!(status, 200);
    assert_eq!(body["agent_id"], serde_json::Value::Null);

    // Idempotent by hash: still exit 0, the update is published again.
    let first = revoked_at(&client, hash).await;
    let out = companion(&[
        "revoke-key",
        "--key-sha256",
        &hash.hex(),
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_ok(&out);
    assert!(text(&out.stderr).contains("already revoked"));
    control.wait_for(&key_path, 2).await;
    assert_eq!(revoked_at(&client, hash).await, first, "revoked_at is kept");

    // Unknown hash: a clear error, non-zero exit, nothing published.
    let out = companion(&[
        "revoke-key",
        "--key-sha256",
        &unknown.hex(),
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no API key has this SHA-256"));
    // A malformed hash, or the key where the hash belongs, is refused unechoed.
    let out = companion(&["revoke-key", "--key-sha256", &key, "--database-url", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).contains(&key));

    // list-keys: hashes, dates and labels, never a key.
    let second = issue(&url, agent, None);
    let second_hash = KeySha256::of(second.as_bytes());
    let _other = issue(&url, Uuid::new_v4(), Some("someone else"));
    let out = companion(&[
        "list-keys",
        "--agent-id",
        &agent.to_string(),
        "--database-url",
        &url,
    ]);
    assert_ok(&out);
    let listing = text(&out.stdout);
    assert!(
        !listing.contains(&key) && !listing.contains(&second),
        "{listing}"
    );
    let lines: Vec<Vec<&str>> = listing.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{listing}");
    assert_eq!(
        lines[0],
        ["key_sha256", "created_at", "revoked_at", "label"]
    );
    assert_eq!(lines[1][0], hash.hex());
    assert_eq!(lines[1][3], "ci runner");
    assert_eq!(lines[2][0], second_hash.hex());
    assert_eq!(lines[2][2], "-");
    assert_eq!(lines[2][3], "");
    for stamp in [lines[1][1], lines[1][2], lines[2][1]] {
        assert!(
            stamp.len() == 20 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
    }

    // Metrics of both sides.
    assert_eq!(
        read_metric(
            &store.base,
            r#"ibex_store_key_lookups_total{result="found"}"#
        )
        .await,
        1
    );
    assert_eq!(
        read_metric(
            &store.base,
            r#"ibex_store_key_lookups_total{result="none"}"#
        )
        .await,
        2
    );
    assert_eq!(
        read_metric(&store.base, "ibex_store_key_bad_requests_total").await,
        3
    );
    assert_eq!(
        read_metric(&store.base, r#"ibex_store_lookups_total{result="found"}"#).await,
        0,
        "key lookups are not directive lookups"
    );
    assert_eq!(
        read_metric(&sub.base, r#"ibex_subscribe_messages_total{kind="key"}"#).await,
        2
    );
    assert_eq!(
        read_metric(
            &sub.base,
            r#"ibex_subscribe_control_fallbacks_total{kind="key"}"#
        )
        .await,
        0
    );

    // Postgres gone: 503, counted as an error.
    pg.stop();
    let (status, body) = http_json(&key_url(&second_hash)).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(
        read_metric(
            &store.base,
            r#"ibex_store_key_lookups_total{result="error"}"#
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_without_key_invalidation_get_one_full_invalidation_instead() {
    let redis = Redis::start();
    // One answers the key path 404; the other (like the filter today, which
    // reads `key/…` as an agent id) 400 — after 204 for the connect flush.
    let not_found = FakeControl::start_with(&[], KeyRoute::NotFound).await;
    let bad_request = FakeControl::start_with(&[204, 400], KeyRoute::Serve).await;
    let knows = FakeControl::start_with(&[], KeyRoute::Serve).await;
    let sub = start_subscriber(&redis, &[&not_found, &bad_request, &knows], false).await;

    let hash = KeySha256::of(b"ibex_old_filter");
    let mut conn = redis.conn();
    let _: () = conn.set_ex(format!("agent_key:{hash}"), "x", 60).unwrap();
    let _: i64 = conn
        .publish(format!("ibex:agent_key:updates:{hash}"), "")
        .unwrap();
    let key_path = format!("/ibex/v1/invalidate/key/{hash}");
    knows.wait_for(&key_path, 1).await;
    not_found.wait_for(FLUSH, 2).await;
    bad_request.wait_for(FLUSH, 2).await;
    // DEL mode: the key is gone.
    let exists: bool = conn.exists(format!("agent_key:{hash}")).unwrap();
    assert!(!exists);
    // Give a retry loop the time to show itself: there is none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(not_found.count(&key_path), 1);
    assert_eq!(bad_request.count(&key_path), 1);
    assert_eq!(not_found.count(FLUSH), 2);
    assert_eq!(bad_request.count(FLUSH), 2);
    assert_eq!(
        knows.count(FLUSH),
        1,
        "a listener that knows keys is not flushed"
    );
    assert_eq!(
        read_metric(
            &sub.base,
            r#"ibex_subscribe_control_fallbacks_total{kind="key"}"#
        )
        .await,
        2
    );
    assert_eq!(
        read_metric(&sub.base, "ibex_subscribe_invalidation_failures_total").await,
        0
    );
    // A malformed hash on the key channel is counted and ignored.
    let _: i64 = conn
        .publish("ibex:agent_key:updates:NOT-A-HASH", "")
        .unwrap();
    let base = sub.base.clone();
    eventually(
        "invalid key message counted",
        Duration::from_secs(10),
        || async {
            let n = read_metric(&base, r#"ibex_subscribe_messages_total{kind="invalid"}"#).await;
            (n == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        read_metric(&sub.base, r#"ibex_subscribe_messages_total{kind="key"}"#).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_sweeps_key_entries_and_sets_their_marker() {
    let redis = Redis::start();
    let control = FakeControl::start_with(&[], KeyRoute::Serve).await;
    let mut conn = redis.conn();
    let a = KeySha256::of(b"ibex_a");
    let b = KeySha256::of(b"ibex_b");
    for k in [format!("agent_key:{a}"), format!("agent_key:{b}")] {
        let _: () = conn.set_ex(k, Uuid::new_v4().to_string(), 60).unwrap();
    }
    let _: () = conn.set("directive:x", "text").unwrap();
    let _: () = conn.set("unrelated", "keep").unwrap();
    // The connect-time flush sweeps them.
    let _sub = start_subscriber(&redis, &[&control], true).await;
    eventually("key entries swept", Duration::from_secs(10), || async {
        let mut conn = redis.conn();
        let left: Vec<String> = conn.keys("agent_key:*").unwrap();
        let markers = left
            .iter()
            .filter(|k| ibex_wire::is_flush_marker("agent_key:", k.as_bytes()))
            .count();
        // Every slot's, and the single one of filters from before them.
        (markers == usize::from(ibex_wire::SLOTS) + 1 && left.len() == markers).then_some(())
    })
    .await;
    let entry = format!("agent_key:{a}");
    let ttl: i64 = conn
        .ttl(ibex_wire::flush_marker_for("agent_key:", &entry))
        .unwrap();
    assert!((1..=10).contains(&ttl), "ttl {ttl}");
    let exists: bool = conn.exists("directive:x").unwrap();
    assert!(!exists);
    let kept: String = conn.get("unrelated").unwrap();
    assert_eq!(kept, "keep");

    // And so does a flush message.
    let _: () = conn.set_ex(format!("agent_key:{a}"), "y", 60).unwrap();
    let _: i64 = conn.publish("ibex:directive:flush", "").unwrap();
    control.wait_for(FLUSH, 2).await;
    eventually("key entry swept again", Duration::from_secs(10), || async {
        let mut conn = redis.conn();
        let exists: bool = conn.exists(format!("agent_key:{a}")).unwrap();
        (!exists).then_some(())
    })
    .await;
}
