//! Directive content and gateway API keys never reach a log line, at any
//! level, in any subcommand, on success or failure paths; neither do the REST
//! front's arguments, results and token; the long-running subcommands exit 0
//! on SIGTERM.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use uuid::Uuid;

const MARKER: &str = "PRIVATE-DIRECTIVE-d41d8cd9";
const TOKEN: &str = "control-token-5e0f7a";

fn spawn_logged(args: &[&str], log: &Path) -> Child {
    let out = File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = companion_cmd(args);
    cmd.env("RUST_LOG", "trace")
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap()
}

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a one-shot subcommand at trace level and keeps everything it wrote.
fn run_logged(args: &[&str], stdin: Option<&str>, logs: &mut String) -> std::process::Output {
    let mut cmd = companion_cmd(args);
    cmd.env("RUST_LOG", "trace")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    logs.push_str(&String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_and_token_never_appear_in_logs() {
    let pg = Pg::start();
    let redis = Redis::start();
    let control = FakeControl::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let redis_url = redis.url();
    let mut logs = String::new();

    let out = run_logged(&["migrate", "--database-url", &url], None, &mut logs);
    assert!(out.status.success());

    let store_port = free_port().to_string();
    let store_listen = format!("127.0.0.1:{store_port}");
    let store_log = dir.path().join("store.log");
    let mut store = spawn_logged(
        &["store", "--listen", &store_listen, "--database-url", &url],
        &store_log,
    );
    let store_base = format!("http://{store_listen}");
    eventually("store up", Duration::from_secs(20), || async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
        let uri = format!("{store_base}/healthz").parse().unwrap();
        client.get(uri).await.ok().map(|_| ())
    })
    .await;

    let sub_listen = format!("127.0.0.1:{}", free_port());
    let sub_log = dir.path().join("subscribe.log");
    let mut sub = spawn_logged(
        &[
            "subscribe",
            "--redis-url",
            &redis_url,
            "--control-urls",
            &control.url(),
            "--control-token",
            TOKEN,
            "--listen",
            &sub_listen,
        ],
        &sub_log,
    );
    control.wait_for("/ibex/v1/invalidate", 1).await;

    let agent = Uuid::new_v4();
    let agent_s = agent.to_string();
    let content = format!("{MARKER} one");
    let out = run_logged(
        &[
            "set-directive",
            "--agent-id",
            &agent_s,
            "--content",
            &content,
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    let v1 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    control
        .wait_for(&format!("/ibex/v1/invalidate/{agent}"), 1)
        .await;

    let content = format!("{MARKER} two");
    let out = run_logged(
        &[
            "set-directive",
            "--agent-id",
            &agent_s,
            "--content-stdin",
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ],
        Some(&content),
        &mut logs,
    );
    assert!(out.status.success());
    let (status, body) = http_json(&format!("{store_base}/v1/agents/{agent}/directive")).await;
    assert_eq!(status, 200);
    assert_eq!(body["content"], content, "the store does serve the content");
    let (status, _) = http_get(&format!("{store_base}/v1/agents/{MARKER}/directive")).await;
    assert_eq!(status, 400);

    // history: without --show-content not even stdout has the text; with it,
    // stdout does (the operator asked) and the logs still do not.
    let out = run_logged(
        &["history", "--agent-id", &agent_s, "--database-url", &url],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    logs.push_str(&String::from_utf8_lossy(&out.stdout));
    let out = run_logged(
        &[
            "history",
            "--agent-id",
            &agent_s,
            "--show-content",
            "--database-url",
            &url,
        ],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(MARKER),
        "--show-content prints the text"
    );
    // activate: roll back to the first version (published, seen by the
    // subscriber), then an unknown version.
    let out = run_logged(
        &[
            "activate",
            "--version-id",
            &v1,
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    logs.push_str(&String::from_utf8_lossy(&out.stdout));
    control
        .wait_for(&format!("/ibex/v1/invalidate/{agent}"), 2)
        .await;
    let (status, body) = http_json(&format!("{store_base}/v1/agents/{agent}/directive")).await;
    assert_eq!(status, 200);
    assert_eq!(body["content"], format!("{MARKER} one"));
    assert_eq!(body["version_id"], v1);
    let out = run_logged(
        &[
            "activate",
            "--version-id",
            &Uuid::new_v4().to_string(),
            "--database-url",
            &url,
            "--no-publish",
        ],
        None,
        &mut logs,
    );
    assert_eq!(out.status.code(), Some(1));

    let out = run_logged(
        &[
            "clear-directive",
            "--agent-id",
            &agent_s,
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    let out = run_logged(&["flush", "--redis-url", &redis_url], None, &mut logs);
    assert!(out.status.success());
    control.wait_for("/ibex/v1/invalidate", 2).await;

    // Gateway API keys: issued (stdout only), resolved by hash, revoked through
    // stdin, listed; the key itself also thrown at the store's key path.
    let out = run_logged(
        &[
            "issue-key",
            "--agent-id",
            &agent_s,
            "--label",
            "privacy",
            "--database-url",
            &url,
        ],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string();
    assert!(key.starts_with("ibex_"), "{key}");
    let hash = ibex_companion::keys::KeySha256::of(key.as_bytes()).hex();
    let (status, body) = http_json(&format!("{store_base}/v1/keys/{hash}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["agent_id"], agent_s);
    let (status, _) = http_get(&format!("{store_base}/v1/keys/{key}")).await;
    assert_eq!(status, 400);
    let out = run_logged(
        &[
            "revoke-key",
            "--key-stdin",
            "--database-url",
            &url,
            "--redis-url",
            &redis_url,
        ],
        Some(&key),
        &mut logs,
    );
    assert!(out.status.success());
    // This stand-in does not know the key path: the subscriber falls back.
    control.wait_for("/ibex/v1/invalidate", 3).await;
    let out = run_logged(
        &["revoke-key", "--key-sha256", &key, "--database-url", &url],
        None,
        &mut logs,
    );
    assert_eq!(out.status.code(), Some(1), "a key is not a hash");
    let out = run_logged(
        &["list-keys", "--agent-id", &agent_s, "--database-url", &url],
        None,
        &mut logs,
    );
    assert!(out.status.success());
    logs.push_str(&String::from_utf8_lossy(&out.stdout));

    // Failure paths: Redis unreachable after commit, then Postgres down.
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let content = format!("{MARKER} three");
    let out = run_logged(
        &[
            "set-directive",
            "--agent-id",
            &agent_s,
            "--content",
            &content,
            "--database-url",
            &url,
            "--redis-url",
            &dead_redis,
        ],
        None,
        &mut logs,
    );
    assert_eq!(out.status.code(), Some(3));
    pg.stop();
    let (status, _) = http_get(&format!("{store_base}/v1/agents/{agent}/directive")).await;
    assert_eq!(status, 503);
    let content = format!("{MARKER} four");
    let out = run_logged(
        &[
            "set-directive",
            "--agent-id",
            &agent_s,
            "--content",
            &content,
            "--database-url",
            &url,
            "--no-publish",
        ],
        None,
        &mut logs,
    );
    assert_eq!(out.status.code(), Some(1));
    for args in [
        vec!["history", "--agent-id", &agent_s, "--show-content"],
        vec!["activate", "--version-id", &v1, "--no-publish"],
    ] {
        let mut args = args;
        args.extend(["--database-url", &url]);
        let out = run_logged(&args, None, &mut logs);
        assert_eq!(out.status.code(), Some(1), "{args:?} with Postgres down");
    }

    assert!(
        sigterm_and_wait(&mut store).success(),
        "store exits 0 on SIGTERM"
    );
    assert!(
        sigterm_and_wait(&mut sub).success(),
        "subscribe exits 0 on SIGTERM"
    );
    logs.push_str(&std::fs::read_to_string(&store_log).unwrap());
    logs.push_str(&std::fs::read_to_string(&sub_log).unwrap());

    if std::env::var_os("IBEX_TEST_DUMP_LOGS").is_some() {
        eprintln!("{logs}");
    }
    // Logging was really on at debug/trace level and mentions the agent...
    assert!(logs.contains(&agent_s), "{logs}");
    assert!(logs.contains("DEBUG"), "{logs}");
    assert!(logs.contains("lookup"), "{logs}");
    assert!(logs.contains("key lookup"), "{logs}");
    assert!(logs.contains("history listed"), "{logs}");
    assert!(logs.contains("directive version activated"), "{logs}");
    // ...but never the content, nor the control token.
    assert!(!logs.contains(MARKER), "content leaked into logs:\n{logs}");
    assert!(!logs.contains(TOKEN), "token leaked into logs:\n{logs}");
    let key_body = key.strip_prefix("ibex_").unwrap();
    assert!(
        !logs.contains(key_body),
        "API key leaked into logs:\n{logs}"
    );
}

/// POST (or GET when `body` is `None`) with headers; status and body text.
async fn rest_call(url: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<hyper::body::Bytes>>();
    let method = if body.is_some() { "POST" } else { "GET" };
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::from(body.unwrap_or_default())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_front_never_logs_arguments_results_or_token() {
    const REST_TOKEN: &str = "rest-token-9b2e41";
    const ADMIN_TOKEN: &str = "rest-admin-4f7c03";
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rest.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let out = File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let mut rest = Spawned(
        companion_cmd(&["rest", "--listen", &listen, "--redis-url", &redis.url()])
            .env("RUST_LOG", "trace")
            .env("IBEX_REDIS_REST_TOKEN", REST_TOKEN)
            .env("IBEX_REDIS_REST_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap(),
    );
    eventually("rest front ready", Duration::from_secs(20), || async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
        let uri = format!("{base}/readyz").parse().unwrap();
        let resp = client.get(uri).await.ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    // The filter's token for what the filter sends, the admin token for the
    // writes only operators make.
    let bearer = format!("Bearer {REST_TOKEN}");
    let filter = [("authorization", bearer.as_str())];
    let b64 = [
        ("authorization", bearer.as_str()),
        ("upstash-encoding", "base64"),
    ];
    let admin_bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", admin_bearer.as_str())];
    let key = format!("directive:{MARKER}");
    let text = format!("{MARKER} directive text");
    let json = |v: serde_json::Value| Some(v.to_string().into_bytes());
    let root = format!("{base}/");

    // url, headers, body (None: a GET), expected status
    type Call<'a> = (String, Vec<(&'a str, &'a str)>, Option<Vec<u8>>, u16);
    let calls: Vec<Call> = vec![
        (
            root.clone(),
            auth.to_vec(),
            json(serde_json::json!(["SET", key, text, "EX", 60])),
            200,
        ),
        (
            root.clone(),
            filter.to_vec(),
            json(serde_json::json!(["GET", key])),
            200,
        ),
        (
            root.clone(),
            b64.to_vec(),
            json(serde_json::json!(["GET", key])),
            200,
        ),
        (
            format!("{base}/pipeline"),
            auth.to_vec(),
            json(serde_json::json!([
                ["SET", key, text, "EX", 60],
                ["GET", key],
                ["DEL", key]
            ])),
            200,
        ),
        (
            root.clone(),
            b64.to_vec(),
            json(serde_json::json!([
                "EVAL",
                ibex_wire::SET_IF_ABSENT_SCRIPT,
                2,
                key,
                ibex_wire::flush_marker_for("directive:", &key),
                60,
                text
            ])),
            200,
        ),
        (
            root.clone(),
            b64.to_vec(),
            json(serde_json::json!([
                "EVAL",
                ibex_wire::GET_WITH_PTTL_SCRIPT,
                1,
                key
            ])),
            200,
        ),
        (
            format!("{base}/set/{MARKER}?EX=60"),
            auth.to_vec(),
            Some(text.clone().into_bytes()),
            200,
        ),
        (format!("{base}/get/{MARKER}"), auth.to_vec(), None, 200),
        (
            format!("{base}/get/{MARKER}?_token={ADMIN_TOKEN}"),
            vec![],
            None,
            200,
        ),
        (
            format!("{base}/get/directive:{MARKER}?_token={REST_TOKEN}"),
            vec![],
            None,
            200,
        ),
        // A Redis error reply (the script's KEYS[1] is nil), still never
        // logged.
        (
            root.clone(),
            filter.to_vec(),
            json(serde_json::json!([
                "EVAL",
                ibex_wire::GET_WITH_PTTL_SCRIPT,
                0,
                MARKER
            ])),
            400,
        ),
        // The filter's token refused, with the marker as key, value and TTL.
        (
            root.clone(),
            filter.to_vec(),
            json(serde_json::json!(["SET", key, text, "EX", 60])),
            403,
        ),
        (
            root.clone(),
            filter.to_vec(),
            json(serde_json::json!(["GET", MARKER])),
            403,
        ),
        (
            root.clone(),
            filter.to_vec(),
            json(serde_json::json!([
                "EVAL",
                ibex_wire::SET_IF_ABSENT_SCRIPT,
                2,
                key,
                ibex_wire::flush_marker_for("directive:", &key),
                MARKER,
                text
            ])),
            400,
        ),
        // Refusals: wrong tokens carrying the marker, forbidden and malformed
        // commands carrying it.
        (
            root.clone(),
            vec![("authorization", "Bearer PRIVATE-DIRECTIVE-d41d8cd9")],
            json(serde_json::json!(["GET", key])),
            401,
        ),
        (
            format!("{base}/get/{MARKER}?_token={MARKER}"),
            vec![],
            None,
            401,
        ),
        (
            root.clone(),
            auth.to_vec(),
            json(serde_json::json!(["CONFIG", "SET", "dir", MARKER])),
            403,
        ),
        (
            root.clone(),
            auth.to_vec(),
            json(serde_json::json!(["EVAL", format!("return '{MARKER}'"), 0])),
            403,
        ),
        (
            root.clone(),
            auth.to_vec(),
            Some(format!(r#"["SET", "{MARKER}", {{"{MARKER}": 1}}]"#).into_bytes()),
            400,
        ),
        (
            root.clone(),
            auth.to_vec(),
            Some(format!(r#"["SET", "{MARKER}""#).into_bytes()),
            400,
        ),
        (
            root.clone(),
            auth.to_vec(),
            json(serde_json::json!(["SET", key, text, "PX", MARKER])),
            400,
        ),
        (format!("{base}/{MARKER}/x"), auth.to_vec(), None, 403),
    ];
    for (url, headers, body, status) in &calls {
        let (got, answer) = rest_call(url, headers, body.clone()).await;
        assert_eq!(got, *status, "{url}: {answer}");
    }
    // The answers do carry the values: logging is what must not.
    let (_, answer) = rest_call(&root, &auth, json(serde_json::json!(["GET", MARKER]))).await;
    assert!(answer.contains(MARKER), "{answer}");

    // Redis away: 503s, then back.
    redis.kill();
    let set = json(serde_json::json!(["SET", key, text, "EX", 60]));
    let (got, answer) = rest_call(&root, &auth, set.clone()).await;
    assert_eq!(got, 503, "{answer}");
    redis.resume();
    let (got, _) = rest_call(&root, &auth, set).await;
    assert_eq!(got, 200);

    assert!(
        sigterm_and_wait(&mut rest.0).success(),
        "rest exits 0 on SIGTERM"
    );
    let logs = std::fs::read_to_string(&log).unwrap();
    if std::env::var_os("IBEX_TEST_DUMP_LOGS").is_some() {
        eprintln!("{logs}");
    }
    // Logging was on, per request...
    assert!(logs.contains("DEBUG"), "{logs}");
    assert!(logs.contains("rest request"), "{logs}");
    assert!(logs.contains("command=\"eval\""), "{logs}");
    assert!(logs.contains("token=\"filter\""), "{logs}");
    assert!(logs.contains("token=\"admin\""), "{logs}");
    assert!(logs.contains("redis unavailable"), "{logs}");
    // ...and never showed a key, a value, a script argument or the token.
    assert!(
        !logs.contains(MARKER),
        "an argument or result leaked into logs:\n{logs}"
    );
    for token in [REST_TOKEN, ADMIN_TOKEN] {
        assert!(!logs.contains(token), "a token leaked into logs:\n{logs}");
    }
}
