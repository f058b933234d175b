//! `migrate`, `set-directive`, `clear-directive`, `history`, `activate` and
//! `flush` through the real binary, against real PostgreSQL and Redis.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ibex_companion::db::{self, PoolSettings};
use ibex_companion::store::{self, StoreOptions, StoreState};
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

/// Runs the companion and returns its stdout, failing the test on a non-zero
/// exit.
fn run_ok(args: &[&str]) -> String {
    let out = companion(args);
    assert_ok(&out);
    stdout(&out)
}

/// `set-directive --no-publish` through the binary; the new version id.
fn set_quietly(url: &str, agent: Uuid, content: &str) -> Uuid {
    let out = run_ok(&[
        "set-directive",
        "--agent-id",
        &agent.to_string(),
        "--content",
        content,
        "--no-publish",
        "--database-url",
        url,
    ]);
    Uuid::parse_str(out.trim()).unwrap()
}

/// `history` rows, split into columns, after checking the header.
fn history(url: &str, agent: Uuid, show_content: bool) -> Vec<Vec<String>> {
    let agent = agent.to_string();
    let mut args = vec!["history", "--agent-id", &agent, "--database-url", url];
    if show_content {
        args.push("--show-content");
    }
    let out = run_ok(&args);
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let expected = if show_content {
        "version_id\tcreated_at\tactive\tbytes\tcontent"
    } else {
        "version_id\tcreated_at\tactive\tbytes"
    };
    assert_eq!(header, expected);
    let width = expected.split('\t').count();
    lines
        .map(|line| {
            let cols: Vec<String> = line.split('\t').map(str::to_owned).collect();
            assert_eq!(cols.len(), width, "{line:?}");
            cols
        })
        .collect()
}

/// The store, served in-process: its answer for `agent` as (content, version_id).
struct StoreHttp {
    base: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl StoreHttp {
    async fn start(url: &str) -> StoreHttp {
        let pool = db::read_only_pool(url, &PoolSettings::default()).unwrap();
        let state = StoreState::new(pool, StoreOptions::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(store::run(listener, state, async move {
            let _ = rx.await;
        }));
        StoreHttp { base, _stop: tx }
    }

    async fn answer(&self, agent: Uuid) -> (Option<String>, Option<Uuid>) {
        let (status, body) = http_json(&format!("{}/v1/agents/{agent}/directive", self.base)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["agent_id"], agent.to_string());
        (
            body["content"].as_str().map(str::to_owned),
            body["version_id"]
                .as_str()
                .map(|v| Uuid::parse_str(v).unwrap()),
        )
    }
}

/// The agent's directive rows as (id, is_active, active_version_id, updated_at
/// as text), to prove that something did not change.
async fn directive_rows(url: &str, agent: Uuid) -> Vec<(Uuid, bool, Option<Uuid>, String)> {
    let client = db::connect(url, Duration::from_secs(5)).await.unwrap();
    client
        .query(
            "SELECT id, is_active, active_version_id, updated_at::text \
             FROM ibex_core.directives WHERE agent_id = $1 ORDER BY id",
            &[&agent],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_versions_newest_first_without_content_unless_asked() {
    let pg = Pg::start();
    let url = pg.url();
    migrate(&url).await;
    let agent = Uuid::new_v4();

    // No directive yet: the header alone, exit 0.
    assert!(history(&url, agent, false).is_empty());
    assert!(history(&url, agent, true).is_empty());

    let texts = [
        "First.\tTabbed\nand a second line\r\n",
        "Second: \u{1b}[2J\u{1b}[31mred\u{7} \u{202e}desrever\u{202c} \"q\" \\ ünï",
        "Third \u{1F980}",
    ];
    let versions: Vec<Uuid> = texts.iter().map(|t| set_quietly(&url, agent, t)).collect();
    // Another agent's versions are not this one's history.
    set_quietly(&url, Uuid::new_v4(), "someone else");

    let rows = history(&url, agent, false);
    let ids: Vec<Uuid> = rows
        .iter()
        .map(|r| Uuid::parse_str(&r[0]).unwrap())
        .collect();
    let newest_first: Vec<Uuid> = versions.iter().rev().copied().collect();
    assert_eq!(ids, newest_first);
    let active: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(active, ["yes", "-", "-"]);
    let bytes: Vec<usize> = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    let expected: Vec<usize> = texts.iter().rev().map(|t| t.len()).collect();
    assert_eq!(bytes, expected, "octet_length, not characters");
    for row in &rows {
        // RFC 3339 UTC with microseconds.
        let at = &row[1];
        assert_eq!(at.len(), "2025-01-01T00:00:00.000000Z".len(), "{at}");
        assert!(at.ends_with('Z') && at.as_bytes()[10] == b'T', "{at}");
    }
    assert!(rows[0][1] >= rows[1][1] && rows[1][1] >= rows[2][1]);
    let plain = run_ok(&[
        "history",
        "--agent-id",
        &agent.to_string(),
        "--database-url",
        &url,
    ]);
    for needle in ["First", "Second", "Third", "red"] {
        assert!(
            !plain.contains(needle),
            "content without --show-content: {plain}"
        );
    }

    // --show-content: one more column, one line per version whatever the text
    // holds, decoding to the exact text.
    let rows = history(&url, agent, true);
    assert_eq!(rows.len(), 3);
    for (row, text) in rows.iter().zip(texts.iter().rev()) {
        let content = &row[4];
        assert!(
            content.chars().all(|c| !c.is_control() && c != '\u{202e}'),
            "{content:?}"
        );
        let decoded: String = serde_json::from_str(content).unwrap();
        assert_eq!(decoded, *text);
    }

    // Cleared: the versions stay, none is active.
    run_ok(&[
        "clear-directive",
        "--agent-id",
        &agent.to_string(),
        "--no-publish",
        "--database-url",
        &url,
    ]);
    let rows = history(&url, agent, false);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r[2] == "-"), "{rows:?}");

    // A malformed id is clap's usage error.
    let out = companion(&[
        "history",
        "--agent-id",
        "not-a-uuid",
        "--database-url",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_rolls_back_and_forward_and_publishes() {
    let pg = Pg::start();
    let redis = Redis::start();
    let url = pg.url();
    let redis_url = redis.url();
    migrate(&url).await;
    let store = StoreHttp::start(&url).await;

    let agent = Uuid::new_v4();
    let update_channel = format!("ibex:directive:updates:{agent}");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("ibex:directive:*").await.unwrap();
    let mut messages = pubsub.into_on_message();

    let v1 = set_quietly(&url, agent, "Old text.");
    let v2 = set_quietly(&url, agent, "New text.");
    assert_eq!(
        store.answer(agent).await,
        (Some("New text.".into()), Some(v2))
    );

    let activate = |version: Uuid| {
        companion(&[
            "activate",
            "--version-id",
            &version.to_string(),
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ])
    };

    // Roll back to v1: the store answers the old text with the old id, the
    // update was published, history marks v1 active.
    let out = activate(v1);
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{agent}\t{v1}\n"));
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(
        store.answer(agent).await,
        (Some("Old text.".into()), Some(v1))
    );
    let rows = history(&url, agent, false);
    let marks: Vec<(String, &str)> = rows.iter().map(|r| (r[0].clone(), r[2].as_str())).collect();
    assert_eq!(
        marks,
        [(v2.to_string(), "-"), (v1.to_string(), "yes")],
        "history keeps versions by date and marks the active one"
    );

    // Roll forward to v2.
    let out = activate(v2);
    assert_ok(&out);
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(
        store.answer(agent).await,
        (Some("New text.".into()), Some(v2))
    );

    // Already active: success, nothing written, published again (the repair
    // path after a failed publish).
    let before = directive_rows(&url, agent).await;
    let out = activate(v2);
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{agent}\t{v2}\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already active"));
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(directive_rows(&url, agent).await, before);

    // A cleared directive is reactivated by activating one of its versions.
    run_ok(&[
        "clear-directive",
        "--agent-id",
        &agent.to_string(),
        "--no-publish",
        "--database-url",
        &url,
    ]);
    assert_eq!(store.answer(agent).await, (None, None));
    let out = activate(v1);
    assert_ok(&out);
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(
        store.answer(agent).await,
        (Some("Old text.".into()), Some(v1))
    );

    // --no-publish: nothing on the channel (the flush below is the next message).
    let out = companion(&[
        "activate",
        "--version-id",
        &v2.to_string(),
        "--no-publish",
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_ok(&out);
    assert_eq!(
        store.answer(agent).await,
        (Some("New text.".into()), Some(v2))
    );
    assert_ok(&companion(&["flush", "--redis-url", &redis_url]));
    assert_eq!(next_channel(&mut messages).await, "ibex:directive:flush");

    // A version of another directive row of the agent (written by other means:
    // set-directive keeps one row): that row becomes the active one, the other
    // gives way, within the one-active-per-agent index.
    let db = db::connect(&url, Duration::from_secs(5)).await.unwrap();
    let other_directive: Uuid = db
        .query_one(
            "INSERT INTO ibex_core.directives (agent_id, is_active) VALUES ($1, false) RETURNING id",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    let v3: Uuid = db
        .query_one(
            "INSERT INTO ibex_core.directive_versions (directive_id, content) \
             VALUES ($1, 'Elsewhere.') RETURNING id",
            &[&other_directive],
        )
        .await
        .unwrap()
        .get(0);
    let out = activate(v3);
    assert_ok(&out);
    assert_eq!(next_channel(&mut messages).await, update_channel);
    assert_eq!(
        store.answer(agent).await,
        (Some("Elsewhere.".into()), Some(v3))
    );
    let active: Vec<Uuid> = directive_rows(&url, agent)
        .await
        .into_iter()
        .filter(|r| r.1)
        .map(|r| r.0)
        .collect();
    assert_eq!(active, [other_directive]);
    let rows = history(&url, agent, false);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().filter(|r| r[2] == "yes").count(), 1);
    assert_eq!(rows[0][0], v3.to_string());
    assert_eq!(rows[0][2], "yes");

    // Redis unreachable: committed, exit 3 with set-directive's warning.
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let out = companion(&[
        "activate",
        "--version-id",
        &v1.to_string(),
        "--database-url",
        &url,
        "--redis-url",
        &dead_redis,
    ]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("committed"),
        "{stderr}"
    );
    assert_eq!(
        store.answer(agent).await,
        (Some("Old text.".into()), Some(v1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_an_unknown_version_changes_nothing() {
    let pg = Pg::start();
    let redis = Redis::start();
    let url = pg.url();
    let redis_url = redis.url();
    migrate(&url).await;
    let agent = Uuid::new_v4();
    let v1 = set_quietly(&url, agent, "Keep me.");
    let before = directive_rows(&url, agent).await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("ibex:directive:*").await.unwrap();
    let mut messages = pubsub.into_on_message();

    let unknown = Uuid::new_v4();
    let out = companion(&[
        "activate",
        "--version-id",
        &unknown.to_string(),
        "--database-url",
        &url,
        "--redis-url",
        &redis_url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no directive version has this id"),
        "{stderr}"
    );
    assert_eq!(directive_rows(&url, agent).await, before);
    assert_eq!(lookup(&url, agent).await.as_deref(), Some("Keep me."));
    // Nothing published: the flush is the first message.
    assert_ok(&companion(&["flush", "--redis-url", &redis_url]));
    assert_eq!(next_channel(&mut messages).await, "ibex:directive:flush");

    // A malformed id is clap's usage error; a missing one too.
    let out = companion(&["activate", "--version-id", "nope", "--database-url", &url]);
    assert_eq!(out.status.code(), Some(2));
    let out = companion(&["activate", "--database-url", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(directive_rows(&url, agent).await, before);
    assert_eq!(history(&url, agent, false).len(), 1);
    assert_eq!(history(&url, agent, false)[0][0], v1.to_string());
}
