//! `rediss://` (what managed Upstash hands a subscriber) end to end: a
//! redis-server that speaks TLS only, with a certificate from a test CA made by
//! the `openssl` CLI; `subscribe`, `flush` and `rest` connect with
//! `--redis-ca-file` and work, and refuse to connect without it, with another
//! CA, or under a name the certificate does not carry.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use ibex_companion::redis_conn::RedisEndpoint;
use tempfile::TempDir;
use uuid::Uuid;

/// A redis-server with TLS only (no plain port), its certificate for
/// 127.0.0.1 signed by a test CA.
struct TlsRedis {
    dir: TempDir,
    port: u16,
    child: Mutex<Option<Child>>,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::Builder::new()
            .prefix("ibex-redis-tls-")
            .tempdir()
            .unwrap();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        make_ca(d, "ca");
        server_cert(d, "127.0.0.1", "IP:127.0.0.1");
        let r = TlsRedis {
            dir,
            port: free_port(),
            child: Mutex::new(None),
        };
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", "0", "--tls-port", &r.port.to_string()])
            .args(["--bind", "127.0.0.1", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(d.join("server.crt"))
            .arg("--tls-key-file")
            .arg(d.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(d.join("ca.crt"))
            .arg("--dir")
            .arg(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        *r.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = r.try_conn() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server (TLS) did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn endpoint(&self) -> RedisEndpoint {
        RedisEndpoint::new(self.url())
            .with_ca_file(&self.ca())
            .unwrap()
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        self.endpoint()
            .client()
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
    }

    /// A TLS connection for assertions (through the companion's own endpoint
    /// code, with the test CA).
    fn conn(&self) -> redis::Connection {
        self.try_conn().unwrap()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn processed(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Spawns a companion server with its log in `log`.
fn spawn(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Spawned {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = companion_cmd(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Spawned(
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap(),
    )
}

/// Status of GET `url`, `None` while nothing answers.
async fn status(url: &str) -> Option<u16> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.ok()?;
    Some(resp.status().as_u16())
}

async fn wait_status(url: &str, want: u16) {
    eventually(
        &format!("{url} answers {want}"),
        Duration::from_secs(20),
        || async { (status(url).await == Some(want)).then_some(()) },
    )
    .await;
}

/// POST a JSON command to the REST front; status and body.
async fn rest_call(base: &str, token: &str, body: serde_json::Value) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<hyper::body::Bytes>>();
    let req = hyper::Request::post(format!("{base}/"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::from(body.to_string()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_flush_over_rediss_with_the_private_ca() {
    let redis = TlsRedis::start();
    let control = FakeControl::start().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let ca = redis.ca();
    let ca = ca.to_str().unwrap();
    let url = redis.url();
    let _sub = spawn(
        &[
            "subscribe",
            "--redis-url",
            &url,
            "--control-urls",
            &control.url(),
            "--listen",
            &listen,
        ],
        &dir.path().join("subscribe.log"),
        &[("IBEX_REDIS_CA_FILE", ca)],
    );
    // Subscribed over TLS: the connect-time flush reached the control listener.
    control.wait_for("/ibex/v1/invalidate", 1).await;
    wait_status(&format!("http://{listen}/readyz"), 200).await;

    // An update published on the TLS server: the tombstone, then the POST.
    let mut r = redis.conn();
    let agent = Uuid::new_v4();
    let key = ibex_wire::redis_key(ibex_wire::DEFAULT_KEY_PREFIX, agent);
    redis::cmd("SET")
        .arg(&key)
        .arg("old text")
        .query::<()>(&mut r)
        .unwrap();
    redis::cmd("PUBLISH")
        .arg(ibex_wire::updates_channel(agent))
        .arg("")
        .query::<i64>(&mut r)
        .unwrap();
    control
        .wait_for(&ibex_wire::invalidate_agent_path(agent), 1)
        .await;
    let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut r).unwrap();
    assert_eq!(value, ibex_wire::TOMBSTONE.as_bytes());
    let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut r).unwrap();
    assert!((1..=10).contains(&ttl), "{ttl}");

    // `flush` publishes over TLS too (flag form this time).
    let out = companion(&["flush", "--redis-url", &url, "--redis-ca-file", ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    control.wait_for("/ibex/v1/invalidate", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_over_rediss_with_the_private_ca() {
    const TOKEN: &str = "tls-token-31c7";
    const ADMIN: &str = "tls-admin-8e2a";
    let redis = TlsRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let ca = redis.ca();
    let _rest = spawn(
        &[
            "rest",
            "--listen",
            &listen,
            "--redis-url",
            &redis.url(),
            "--redis-ca-file",
            ca.to_str().unwrap(),
        ],
        &dir.path().join("rest.log"),
        &[
            ("IBEX_REDIS_REST_TOKEN", TOKEN),
            ("IBEX_REDIS_REST_ADMIN_TOKEN", ADMIN),
        ],
    );
    wait_status(&format!("{base}/readyz"), 200).await;
    let text = "über TLS \u{fffd}\r🦌";
    assert_eq!(
        rest_call(
            &base,
            ADMIN,
            serde_json::json!(["SET", "directive:tls", text, "EX", 60])
        )
        .await,
        (200, r#"{"result":"OK"}"#.to_string())
    );
    let mut r = redis.conn();
    let stored: String = redis::cmd("GET")
        .arg("directive:tls")
        .query(&mut r)
        .unwrap();
    assert_eq!(stored, text);
    // The filter's token reads it back, as the filter would.
    let (status, body) = rest_call(&base, TOKEN, serde_json::json!(["GET", "directive:tls"])).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["result"],
        text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_ca_or_name_nothing_connects() {
    const TOKEN: &str = "tls-token-31c7";
    let redis = TlsRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let other_ca = make_ca(dir.path(), "other");
    let mut r = redis.conn();

    // The REST front: with the webpki roots only, with another CA, and under a
    // name the certificate does not carry, it starts, answers 503 and Redis
    // never runs a command for it (the handshake fails before any).
    let other = other_ca.to_str().unwrap().to_string();
    let by_name = format!("rediss://localhost:{}", redis.port);
    let right_ca = redis.ca().to_str().unwrap().to_string();
    let url = redis.url();
    let variants: Vec<(&str, Vec<&str>)> = vec![
        ("webpki roots only", vec!["--redis-url", &url]),
        (
            "another CA",
            vec!["--redis-url", &url, "--redis-ca-file", &other],
        ),
        (
            "a name not in the certificate",
            vec!["--redis-url", &by_name, "--redis-ca-file", &right_ca],
        ),
    ];
    for (what, redis_args) in variants {
        let listen = format!("127.0.0.1:{}", free_port());
        let base = format!("http://{listen}");
        let log = dir.path().join("rest.log");
        let mut args = vec!["rest", "--listen", &listen];
        args.extend(redis_args);
        let before = processed(&mut r);
        let rest = spawn(&args, &log, &[("IBEX_REDIS_REST_TOKEN", TOKEN)]);
        wait_status(&format!("{base}/healthz"), 200).await;
        assert_eq!(status(&format!("{base}/readyz")).await, Some(503), "{what}");
        let (status, body) = rest_call(&base, TOKEN, serde_json::json!(["PING"])).await;
        assert_eq!(
            (status, body.as_str()),
            (503, r#"{"error":"ERR Redis is unavailable"}"#),
            "{what}"
        );
        assert_eq!(processed(&mut r), before + 1, "{what}: Redis ran a command");
        drop(rest);
        let logs = std::fs::read_to_string(&log).unwrap();
        if std::env::var_os("IBEX_TEST_DUMP_LOGS").is_some() {
            eprintln!("{what}:\n{logs}");
        }
        assert!(
            logs.contains("certificate") || logs.contains("Certificate"),
            "{what}: the log names the cause:\n{logs}"
        );
    }

    // The subscriber: never subscribed, so never a control POST, while it keeps
    // trying.
    let control = FakeControl::start().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let _sub = spawn(
        &[
            "subscribe",
            "--redis-url",
            &redis.url(),
            "--control-urls",
            &control.url(),
            "--listen",
            &listen,
            "--redis-ca-file",
            &other,
        ],
        &dir.path().join("subscribe.log"),
        &[],
    );
    wait_status(&format!("http://{listen}/healthz"), 200).await;
    let metrics = format!("http://{listen}");
    let sub_log = dir.path().join("subscribe.log");
    eventually(
        "the subscriber tried the TLS connection twice",
        Duration::from_secs(20),
        || async {
            let logs = std::fs::read_to_string(&sub_log).ok()?;
            let tries = logs
                .lines()
                .filter(|l| l.contains("cannot subscribe to redis") && l.contains("certificate"))
                .count();
            (tries >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(read_metric(&metrics, "ibex_subscribe_connected").await, 0);
    assert_eq!(status(&format!("{metrics}/readyz")).await, Some(503));
    assert!(control.seen().is_empty(), "{:?}", control.seen());

    // One-shot publishes fail instead of publishing in the clear or unchecked.
    let out = companion(&["flush", "--redis-url", &redis.url()]);
    assert_eq!(out.status.code(), Some(1));
    let out = companion(&[
        "flush",
        "--redis-url",
        &redis.url(),
        "--redis-ca-file",
        &other,
    ]);
    assert_eq!(out.status.code(), Some(1));
    // A CA file is for rediss:// only, and must hold a certificate.
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    let out = companion(&["flush", "--redis-url", &plain, "--redis-ca-file", &right_ca]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rediss://"));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let out = companion(&[
        "flush",
        "--redis-url",
        &redis.url(),
        "--redis-ca-file",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PEM certificate"));
}
