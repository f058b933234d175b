//! `migrate`, `set-directive`, `clear-directive` and `flush` through the real
//! binary, against real PostgreSQL and Redis.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ibex_companion::db::{self, PoolSettings};
use ibex_companion::store::{StoreOptions, StoreState};
use uuid::Uuid;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn lookup(url: &str, agent: Uuid) -> Option<String> {
    let pool = db::read_only_pool(url, &PoolSettings::default()).unwrap();
    let state = StoreState::new(pool, StoreOptions::default());
    state
        .lookup(agent)
        .await
        .unwrap()
        .map(|d| d.content.expose().to_owned())
}

async fn count(url: &str, sql: &str) -> i64 {
    let client = db::connect(url, Duration::from_secs(5)).await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent() {
    let pg = Pg::start();
    let url = pg.url();
    let first = companion(&["migrate", "--database-url", &url]);
    assert_ok(&first);
    assert_eq!(
        stdout(&first).trim(),
        format!(
            "applied {} migration(s)",
            ibex_companion::migrate::MIGRATIONS.len()
        )
    );
    let second = companion(&["migrate", "--database-url", &url]);
    assert_ok(&second);
    assert_eq!(stdout(&second).trim(), "applied 0 migration(s)");
    assert_eq!(
        count(&url, "SELECT count(*) FROM ibex_core.schema_migrations").await,
        i64::try_from(ibex_companion::migrate::MIGRATIONS.len()).unwrap()
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'ibex_core' \
             AND table_name IN ('agents', 'directives', 'directive_versions')"
        )
        .await,
        3
    );

    // One active directive per agent is enforced by the schema.
    let client = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    let agent = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO ibex_core.agents (id, org_id) VALUES ($1, gen_random_uuid())",
            &[&agent],
        )
        .await
        .unwrap();
    let insert = "INSERT INTO ibex_core.directives (agent_id) VALUES ($1)";
    client.execute(insert, &[&agent]).await.unwrap();
    let err = client.execute(insert, &[&agent]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

async fn next_channel(messages: &mut redis::aio::PubSubStream) -> String {
    tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("no message published")
        .unwrap()
        .get_channel_name()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_clear_write_postgres_then_publish() {
    let pg = Pg::start();
    let redis = Redis::start();
    let url = pg.url();
    let redis_url = redis.url();
    migrate(&url).await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("ibex:directive:*").await.unwrap();
    let mut messages = pubsub.into_on_message();

    let agent = Uuid::new_v4();
    let agent_s = agent.to_string();
    let update_channel = format!("ibex:directive:updates:{agent}");

    // --content-file
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("directive.txt");
    std::fs::write(&file, "First version.\nSecond line.\n").unwrap();
    let out = companion(&[
        "set-directive",
        "--agent-id",
        &agent_s,
        "--content-file",
        file.to_str().unwrap(),
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_ok(&out);
    let v1 = Uuid::parse_str(stdout(&out).trim()).expect("prints the version id");
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(
        lookup(&url, agent).await.as_deref(),
        Some("First version.\nSecond line.\n")
    );

    // --content-stdin replaces it; the directive row is reused.
    let mut child = companion_cmd(&[
        "set-directive",
        "--agent-id",
        &agent_s,
        "--content-stdin",
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Second version.".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    let v2 = Uuid::parse_str(stdout(&out).trim()).unwrap();
    assert_ne!(v1, v2);
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(
        lookup(&url, agent).await.as_deref(),
        Some("Second version.")
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM ibex_core.directives").await,
        1
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM ibex_core.directive_versions").await,
        2
    );
    let client_db = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    let org: Uuid = client_db
        .query_one(
            "SELECT org_id FROM ibex_core.agents WHERE id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(org, ibex_companion::admin::DEMO_ORG_ID);

    // clear-directive
    let out = companion(&[
        "clear-directive",
        "--agent-id",
        &agent_s,
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "1");
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(lookup(&url, agent).await, None);

    // Setting again reactivates, with --content and an explicit org for a new agent.
    let other = Uuid::new_v4();
    let org = Uuid::new_v4();
    let out = companion(&[
        "set-directive",
        "--agent-id",
        &agent_s,
        "--content",
        "Third.",
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_ok(&out);
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(lookup(&url, agent).await.as_deref(), Some("Third."));

    // --no-publish: nothing on the channel; the flush published next is the
    // first message we see.
    let out = companion(&[
        "set-directive",
        "--agent-id",
        &other.to_string(),
        "--org-id",
        &org.to_string(),
        "--content",
        "quiet",
        "--no-publish",
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_ok(&out);
    assert_eq!(lookup(&url, other).await.as_deref(), Some("quiet"));
    let out = companion(&["flush", "--redis-url", &redis_url]);
    assert_ok(&out);
    assert_eq!(next_channel(&mut messages).await, "ibex:directive:flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_keeps_the_commit_and_exits_non_zero() {
    let pg = Pg::start();
    let url = pg.url();
    migrate(&url).await;
    let agent = Uuid::new_v4();
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let out = companion(&[
        "set-directive",
        "--agent-id",
        &agent.to_string(),
        "--content",
        "committed anyway",
        "--database-url",
        &url,
        "--redis-url",
        &dead_redis,
    ]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning"), "{stderr}");
    assert!(stderr.contains("committed"), "{stderr}");
    assert_eq!(
        lookup(&url, agent).await.as_deref(),
        Some("committed anyway")
    );

    let out = companion(&["flush", "--redis-url", &dead_redis]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_input_changes_nothing() {
    let pg = Pg::start();
    let url = pg.url();
    migrate(&url).await;
    let agent = Uuid::new_v4().to_string();
    let out = companion(&[
        "set-directive",
        "--agent-id",
        &agent,
        "--content",
        "",
        "--no-publish",
        "--database-url",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = companion(&[
        "set-directive",
        "--agent-id",
        "not-a-uuid",
        "--content",
        "x",
        "--database-url",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert_eq!(
        count(&url, "SELECT count(*) FROM ibex_core.agents").await,
        0
    );
}
