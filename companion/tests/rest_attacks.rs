//! The REST front as deployed (the binary, configured through its environment)
//! against what an attacker can send it: connections that never finish a head
//! (slowloris), a body sent a byte at a time, more connections than the cap,
//! SIGTERM while such connections are open, pipelines and commands of a million
//! elements, HEAD, and the filter's token used for what the filter never does.
//! Every refusal is checked to leave Redis untouched (its command count).
//!
//! Raw sockets throughout: the point is what the server does with bytes a
//! well-behaved client would not send. Waits are bounded reads and polls, never
//! sleeps standing in for an event (the one sleep pauses a keep-alive
//! connection on purpose).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The filter's token (what its redis.token holds).
const FILTER: &str = "filter-token-3b9d1e";
/// The operators' token.
const ADMIN: &str = "admin-token-7c4a2f";

/// A partial request head: a request line and one header, never finished.
const PARTIAL_HEAD: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\n";

struct Front {
    child: Spawned,
    addr: SocketAddr,
}

impl Front {
    /// The binary on a free port in front of `redis`, with both tokens and
    /// `env` on top.
    fn start(redis: &Redis, env: &[(&str, &str)]) -> Front {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = companion_cmd(&["rest"]);
        cmd.env("IBEX_REST_LISTEN", &listen)
            .env("REDIS_URL", redis.url())
            .env("IBEX_REDIS_REST_TOKEN", FILTER)
            .env("IBEX_REDIS_REST_ADMIN_TOKEN", ADMIN)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let front = Front {
            child: Spawned(cmd.spawn().unwrap()),
            addr: listen.parse().unwrap(),
        };
        poll_until("the front is ready", Duration::from_secs(20), || {
            let mut s = TcpStream::connect(front.addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /readyz HTTP/1.1\r\nhost: rest\r\n\r\n")
                .ok()?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).ok()?;
            (&buf == b"HTTP/1.1 200").then_some(())
        });
        front
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.0.id()).unwrap()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// One request on a new connection: status and body.
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
        let mut s = self.connect();
        let (status, _, body) = exchange(&mut s, &request(method, path, token, body));
        (status, String::from_utf8(body).unwrap())
    }

    /// `POST /` of `command` with `token`, as the filter sends it (base64
    /// answers).
    fn command(&self, token: &str, command: &Value) -> (u16, String) {
        let mut s = self.connect();
        let body = command.to_string();
        let raw = format!(
            "POST / HTTP/1.1\r\nhost: rest\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\nupstash-encoding: base64\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, _, body) = exchange(&mut s, raw.as_bytes());
        (status, String::from_utf8(body).unwrap())
    }

    fn metrics(&self) -> String {
        self.call("GET", "/metrics", None, b"").1
    }

    /// Sends SIGTERM and waits (bounded) for the exit; how long it took.
    fn sigterm(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        // SAFETY: signalling the child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGTERM) }, 0);
        let deadline = started + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Polls `check` until it gives a value (at most `timeout`).
fn poll_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn request(method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Vec<u8> {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: rest\r\n{auth}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// Waits for the server to close `s` (end of stream or reset), at most `limit`;
/// how long it took and whatever it sent before.
fn closed_within(s: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (started.elapsed(), got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return (started.elapsed(), got)
            }
            Err(e) => panic!(
                "still open after {:?} ({e}); it sent {:?}",
                started.elapsed(),
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Redis's count of commands it ran (`INFO stats`); the INFO itself is counted
/// after it answers, so a read right after another read is exactly one more.
fn processed(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Asserts that `action` made Redis run no command at all.
fn untouched(conn: &mut redis::Connection, what: &str, action: impl FnOnce()) {
    let before = processed(conn);
    action();
    assert_eq!(
        processed(conn),
        before + 1,
        "Redis ran a command for: {what}"
    );
}

/// A Lua script that keeps Redis busy for `ms` milliseconds and returns 1.
fn busy_script(ms: u64) -> String {
    format!(
        "local s=redis.call('TIME') while true do local n=redis.call('TIME') \
         if (n[1]-s[1])*1000000+(n[2]-s[2]) > {} then break end end return 1",
        ms * 1000
    )
}

// ------------------------------------------------------------ slow clients

#[test]
fn partial_heads_are_closed_within_the_header_timeout() {
    let redis = Redis::start();
    let front = Front::start(&redis, &[("IBEX_REST_HEADER_TIMEOUT_MS", "300")]);
    let started = Instant::now();
    let mut partial: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = front.connect();
            s.write_all(PARTIAL_HEAD).unwrap();
            s
        })
        .collect();
    // One that sends nothing at all, and one that keeps sending a byte of its
    // head every 50 ms: the deadline is for the whole head, not between bytes.
    partial.push(front.connect());
    let mut trickle = front.connect();
    let mut writer = trickle.try_clone().unwrap();
    let dripping = std::thread::spawn(move || {
        for b in b"GET /ping HTTP/1.1\r\nx-slow: "
            .iter()
            .chain([b'a'; 100].iter())
        {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    for s in partial.iter_mut().chain(std::iter::once(&mut trickle)) {
        let (_, sent) = closed_within(s, Duration::from_secs(5));
        assert!(
            !String::from_utf8_lossy(&sent).contains(" 200 "),
            "a partial head was answered"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "closed too late: {took:?}");
    dripping.join().unwrap();
    // The front still serves, and says what it did.
    assert_eq!(
        front.call("GET", "/ping", Some(FILTER), b""),
        (200, r#"{"result":"PONG"}"#.into())
    );
    let text = front.metrics();
    assert!(
        metric(
            &text,
            "ibex_rest_connections_closed_total{reason=\"header_timeout\"}"
        ) >= Some(22),
        "{text}"
    );
}

#[test]
fn keep_alive_outlives_the_header_timeout_and_ends_at_the_idle_timeout() {
    let redis = Redis::start();
    let front = Front::start(
        &redis,
        &[
            ("IBEX_REST_HEADER_TIMEOUT_MS", "200"),
            ("IBEX_REST_IDLE_TIMEOUT_MS", "1500"),
        ],
    );
    let mut s = front.connect();
    let local = s.local_addr().unwrap();
    let ping = request("GET", "/ping", Some(FILTER), b"");
    for pause in [0, 600, 600, 0] {
        // A pause longer than the header timeout between requests: an idle
        // keep-alive connection is not a slow head (Envoy keeps its
        // connections open between L2 reads).
        std::thread::sleep(Duration::from_millis(pause));
        let (status, head, body) = exchange(&mut s, &ping);
        assert_eq!(
            (status, body.as_slice()),
            (200, &br#"{"result":"PONG"}"#[..])
        );
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(s.local_addr().unwrap(), local, "same socket");
    }
    let (idle, sent) = closed_within(&mut s, Duration::from_secs(6));
    assert!(sent.is_empty(), "{sent:?}");
    assert!(
        idle >= Duration::from_millis(1200) && idle < Duration::from_millis(4500),
        "an idle connection closed after {idle:?}, expected about 1.5 s"
    );
    let text = front.metrics();
    assert_eq!(
        metric(
            &text,
            "ibex_rest_connections_closed_total{reason=\"header_timeout\"}"
        ),
        Some(0),
        "{text}"
    );
}

#[test]
fn a_body_sent_too_slowly_answers_408_and_closes() {
    let redis = Redis::start();
    let front = Front::start(&redis, &[("IBEX_REST_BODY_TIMEOUT_MS", "300")]);
    let mut r = redis.conn();
    untouched(&mut r, "a body that never ends", || {
        let mut s = front.connect();
        let started = Instant::now();
        s.write_all(
            format!(
                "POST / HTTP/1.1\r\nhost: rest\r\nauthorization: Bearer {ADMIN}\r\n\
                 content-length: 100\r\n\r\n[\"PING\""
            )
            .as_bytes(),
        )
        .unwrap();
        // More of it keeps coming, a byte every 50 ms: the deadline is for the
        // whole body.
        let mut writer = s.try_clone().unwrap();
        let dripping = std::thread::spawn(move || {
            for _ in 0..60 {
                if writer.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (status, head, body) = read_response(&mut s, false);
        let took = started.elapsed();
        assert_eq!(
            (status, body.as_slice()),
            (
                408,
                &br#"{"error":"ERR request body not received within 300 ms"}"#[..]
            )
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        closed_within(&mut s, Duration::from_secs(5));
        dripping.join().unwrap();
    });
}

#[test]
fn connections_past_the_cap_are_closed_at_once() {
    let redis = Redis::start();
    let front = Front::start(&redis, &[("IBEX_REST_MAX_CONNECTIONS", "3")]);
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: rest\r\n\r\n";
    // A served connection, once a slot is free (the readiness probe's
    // connection holds one until the front sees it closed).
    let served = || {
        poll_until("a slot is free", Duration::from_secs(10), || {
            let mut s = front.connect();
            s.write_all(healthz).ok()?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).ok()?;
            (&buf == b"HTTP/1.1 200").then_some(())?;
            // The rest of that answer.
            let mut rest = [0u8; 4096];
            let _ = s.read(&mut rest);
            Some(s)
        })
    };
    // Three keep-alive connections hold the three slots.
    let mut held: Vec<TcpStream> = (0..3).map(|_| served()).collect();
    // A fourth is accepted and closed at once, unanswered.
    let mut extra = front.connect();
    let _ = extra.write_all(healthz);
    let (took, sent) = closed_within(&mut extra, Duration::from_secs(5));
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The held ones still work.
    assert_eq!(exchange(&mut held[0], healthz).0, 200);
    // Once one leaves, a new connection is served again.
    drop(held.pop());
    let mut s = served();
    let (_, _, text) = exchange(&mut s, b"GET /metrics HTTP/1.1\r\nhost: rest\r\n\r\n");
    let text = String::from_utf8(text).unwrap();
    assert!(
        metric(
            &text,
            "ibex_rest_connections_closed_total{reason=\"over_limit\"}"
        ) >= Some(1),
        "{text}"
    );
    assert_eq!(metric(&text, "ibex_rest_connections"), Some(3), "{text}");
}

// ------------------------------------------------------------ shutdown

/// Opens the kinds of connection a drain must not wait for: partial heads, one
/// that sent nothing, an idle keep-alive one.
fn stragglers(front: &Front) -> Vec<TcpStream> {
    let mut open: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = front.connect();
            s.write_all(PARTIAL_HEAD).unwrap();
            s
        })
        .collect();
    open.push(front.connect());
    let mut idle = front.connect();
    assert_eq!(
        exchange(&mut idle, b"GET /healthz HTTP/1.1\r\nhost: rest\r\n\r\n").0,
        200
    );
    open.push(idle);
    open
}

/// Starts `EVAL busy_script(ms)` with the admin token on its own thread and
/// waits until the front counts it in flight.
fn slow_request(front: &Front, ms: u64) -> std::thread::JoinHandle<Option<(u16, Vec<u8>)>> {
    let mut s = front.connect();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = json!(["EVAL", busy_script(ms), 0]).to_string();
    let raw = request("POST", "/", Some(ADMIN), body.as_bytes());
    let slow = std::thread::spawn(move || {
        s.write_all(&raw).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
            if got.ends_with(b"}") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let status = text.get(9..12)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1)?.as_bytes().to_vec();
        Some((status, body))
    });
    poll_until(
        "the slow request is in flight",
        Duration::from_secs(20),
        || (metric(&front.metrics(), "ibex_rest_in_flight") == Some(1)).then_some(()),
    );
    slow
}

#[test]
fn sigterm_answers_in_flight_requests_without_waiting_for_idle_or_partial_connections() {
    let redis = Redis::start();
    let mut front = Front::start(
        &redis,
        &[
            ("IBEX_REST_ALLOW_ANY_SCRIPT", "true"),
            ("IBEX_REST_REDIS_TIMEOUT_MS", "10000"),
            ("IBEX_REST_HEADER_TIMEOUT_MS", "60000"),
        ],
    );
    let mut open = stragglers(&front);
    let slow = slow_request(&front, 600);
    let (exit, took) = front.sigterm();
    assert!(exit.success(), "{exit:?}");
    // It waited for the request (about 600 ms), not for the connections that
    // had none, nor for the 5 s grace.
    assert!(took < Duration::from_secs(4), "exit took {took:?}");
    assert_eq!(
        slow.join().unwrap(),
        Some((200, br#"{"result":1}"#.to_vec())),
        "the in-flight request was answered"
    );
    for s in &mut open {
        closed_within(s, Duration::from_secs(1));
    }
}

#[test]
fn sigterm_exits_at_the_grace_even_with_a_request_still_running() {
    let redis = Redis::start();
    let mut front = Front::start(
        &redis,
        &[
            ("IBEX_REST_ALLOW_ANY_SCRIPT", "true"),
            ("IBEX_REST_REDIS_TIMEOUT_MS", "10000"),
            ("IBEX_REST_HEADER_TIMEOUT_MS", "60000"),
            ("IBEX_REST_SHUTDOWN_GRACE_MS", "1000"),
        ],
    );
    let _open = stragglers(&front);
    let slow = slow_request(&front, 4000);
    let (exit, took) = front.sigterm();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "exit took {took:?}, the grace is 1 s"
    );
    assert_eq!(slow.join().unwrap(), None, "cut, not answered");
}

// ------------------------------------------------------------ sizes

fn repeated(item: &str, n: usize) -> String {
    let mut body = String::with_capacity(n * (item.len() + 1) + 2);
    body.push('[');
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push(']');
    body
}

#[test]
fn pipelines_and_commands_past_their_caps_are_refused_before_redis() {
    let redis = Redis::start();
    let front = Front::start(&redis, &[]);
    let mut r = redis.conn();
    let refused = |path: &str, body: String, message: &str| {
        let (status, answer) = front.call("POST", path, Some(ADMIN), body.as_bytes());
        assert_eq!(
            (status, answer.as_str()),
            (400, format!(r#"{{"error":"{message}"}}"#).as_str())
        );
    };
    untouched(&mut r, "1001 commands", || {
        refused(
            "/pipeline",
            repeated(r#"["PING"]"#, 1001),
            "ERR pipeline has more than 1000 commands",
        )
    });
    untouched(&mut r, "a million empty commands", || {
        refused(
            "/pipeline",
            repeated("[]", 1_000_000),
            "ERR pipeline has more than 1000 commands",
        )
    });
    let keys = |n: usize| {
        let mut c = vec![json!("DEL")];
        c.extend((0..n).map(|i| json!(format!("k{i}"))));
        Value::Array(c)
    };
    untouched(&mut r, "a command of 1025 elements", || {
        refused(
            "/",
            keys(1024).to_string(),
            "ERR command has more than 1024 arguments",
        )
    });
    untouched(&mut r, "17 commands of 1000 elements", || {
        let cmds = Value::Array((0..17).map(|_| keys(999)).collect());
        refused(
            "/pipeline",
            cmds.to_string(),
            "ERR request has more than 16384 arguments in all",
        )
    });
    untouched(&mut r, "a path of 1025 segments", || {
        let path = format!("/del{}", "/k".repeat(1024));
        let (status, answer) = front.call("GET", &path, Some(ADMIN), b"");
        assert_eq!(
            (status, answer.as_str()),
            (
                400,
                r#"{"error":"ERR command has more than 1024 arguments"}"#
            )
        );
    });
    // At the caps: served.
    let (status, answer) = front.call(
        "POST",
        "/pipeline",
        Some(ADMIN),
        repeated(r#"["PING"]"#, 1000).as_bytes(),
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&answer).unwrap().len(),
        1000
    );
    assert_eq!(
        front.call("POST", "/", Some(ADMIN), keys(1023).to_string().as_bytes()),
        (200, r#"{"result":0}"#.into())
    );
    // The default body cap is 4 MiB (refused from the Content-Length alone).
    untouched(&mut r, "a 5 MiB body", || {
        let mut s = front.connect();
        let head = format!(
            "POST / HTTP/1.1\r\nhost: rest\r\nauthorization: Bearer {ADMIN}\r\n\
             content-length: {}\r\n\r\n",
            5 << 20
        );
        let (status, _, body) = exchange(&mut s, head.as_bytes());
        assert_eq!(
            (status, body.as_slice()),
            (
                413,
                &br#"{"error":"ERR request body is larger than 4194304 bytes"}"#[..]
            )
        );
    });
}

/// Peak resident memory of `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[test]
fn sixteen_mib_of_empty_commands_stay_small() {
    let redis = Redis::start();
    // The body cap raised to what the front used to take, so only the command
    // cap stands between this body and the memory.
    let front = Front::start(&redis, &[("IBEX_REST_MAX_BODY_BYTES", "16777216")]);
    let before = peak_rss(front.pid());
    let body = repeated("[]", (16 << 20) / 3 - 1);
    assert!(body.len() <= 16 << 20);
    let (status, answer) = front.call("POST", "/pipeline", Some(ADMIN), body.as_bytes());
    let grown = peak_rss(front.pid()).saturating_sub(before);
    // The body itself, buffered (and perhaps copied once), and nothing per
    // command beyond the first thousand; it used to be 767 MB.
    assert!(grown < 64 << 20, "peak RSS grew by {} MiB", grown >> 20);
    assert_eq!(
        (status, answer.as_str()),
        (
            400,
            r#"{"error":"ERR pipeline has more than 1000 commands"}"#
        )
    );
}

// ------------------------------------------------------------ methods

#[test]
fn head_and_other_methods_run_nothing() {
    let redis = Redis::start();
    let front = Front::start(&redis, &[]);
    let mut r = redis.conn();
    for method in ["HEAD", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/set/hk/v/EX/60", "/", "/pipeline"] {
            untouched(&mut r, &format!("{method} {path}"), || {
                let body: &[u8] = match path {
                    "/" => br#"["SET","hk","v","EX",60]"#,
                    "/pipeline" => br#"[["SET","hk","v","EX",60]]"#,
                    _ => b"",
                };
                let mut s = front.connect();
                let (status, head, answer) =
                    exchange(&mut s, &request(method, path, Some(ADMIN), body));
                assert_eq!(status, 405, "{method} {path}");
                assert!(head.contains("allow: get, post, put"), "{head}");
                if method != "HEAD" {
                    assert_eq!(
                        answer,
                        br#"{"error":"ERR method not allowed: commands run only on GET, POST and PUT"}"#
                    );
                }
            });
        }
    }
    assert!(!redis::cmd("EXISTS")
        .arg("hk")
        .query::<bool>(&mut r)
        .unwrap());
    // With the token in the query too.
    untouched(&mut r, "HEAD with _token", || {
        let mut s = front.connect();
        let raw = format!("HEAD /set/hk/v/EX/60?_token={ADMIN} HTTP/1.1\r\nhost: rest\r\n\r\n");
        assert_eq!(exchange(&mut s, raw.as_bytes()).0, 405);
    });
    // GET, POST and PUT run it.
    for method in ["GET", "POST", "PUT"] {
        assert_eq!(
            front.call(method, "/set/hk/v/EX/60", Some(ADMIN), b""),
            (200, r#"{"result":"OK"}"#.into()),
            "{method}"
        );
    }
}

// ------------------------------------------------------------ token scope

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn the_filter_token_runs_exactly_what_the_filter_sends() {
    let redis = Redis::start();
    // Even with scripts opened up for the admin token.
    let front = Front::start(&redis, &[("IBEX_REST_ALLOW_ANY_SCRIPT", "true")]);
    let mut r = redis.conn();
    let prefix = ibex_wire::DEFAULT_KEY_PREFIX;
    let agent = uuid::Uuid::new_v4();
    let entry = ibex_wire::redis_key(prefix, agent);
    let marker = ibex_wire::flush_marker_for(prefix, &entry);
    let hash = ibex_wire::key_sha256_hex(&[9u8; 32]);
    let key_entry = ibex_wire::agent_key_redis_key(&hash);
    let key_marker = ibex_wire::flush_marker_for(ibex_wire::AGENT_KEY_PREFIX, &key_entry);
    let write = ibex_wire::SET_IF_ABSENT_SCRIPT;

    // What the filter sends, spelled as it spells it (numbers as strings).
    let text = "Be brief. \u{fffd}\r🦌";
    assert_eq!(
        front.command(
            FILTER,
            &json!(["EVAL", write, "2", entry, marker, "60", text])
        ),
        (200, r#"{"result":1}"#.into())
    );
    let stored: Vec<u8> = redis::cmd("GET").arg(&entry).query(&mut r).unwrap();
    assert_eq!(stored, text.as_bytes());
    let ttl: i64 = redis::cmd("TTL").arg(&entry).query(&mut r).unwrap();
    assert!((1..=60).contains(&ttl), "{ttl}");
    assert_eq!(
        front.command(
            FILTER,
            &json!([
                "EVAL",
                write,
                "2",
                key_entry,
                key_marker,
                "30",
                agent.to_string()
            ])
        ),
        (200, r#"{"result":1}"#.into())
    );
    // Every read script of the filter's list, on both kinds of entry.
    for script in ibex_wire::FILTER_SCRIPTS {
        if script == write {
            continue;
        }
        for (key, value) in [(&entry, text.to_string()), (&key_entry, agent.to_string())] {
            let (status, body) = front.command(FILTER, &json!(["EVAL", script, "1", key]));
            assert_eq!(status, 200, "{body}");
            assert!(body.contains(&b64(value.as_bytes())), "{body}");
        }
    }
    assert_eq!(
        front.command(FILTER, &json!(["GET", entry])),
        (200, format!(r#"{{"result":"{}"}}"#, b64(text.as_bytes())))
    );
    assert_eq!(front.command(FILTER, &json!(["PING"])).0, 200);
    assert_eq!(
        front.call("GET", "/ping", Some(FILTER), b""),
        (200, r#"{"result":"PONG"}"#.into())
    );

    // And nothing else: each refused before Redis, naming no key.
    let other = "other:secret-key-5d2e";
    let entry2 = ibex_wire::redis_key(prefix, uuid::Uuid::new_v4());
    let marker2 = ibex_wire::flush_marker_for(prefix, &entry2);
    let cases: Vec<(Value, u16)> = vec![
        (json!(["SET", entry, "x", "EX", "60"]), 403),
        (json!(["SET", other, "x", "EX", "60"]), 403),
        (json!(["DEL", entry]), 403),
        (json!(["DEL", marker]), 403),
        (json!(["GET", other]), 403),
        (
            json!(["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", other]),
            403,
        ),
        (json!(["EVAL", write, "2", other, marker, "60", "v"]), 403),
        (json!(["EVAL", write, "2", entry2, other, "60", "v"]), 403),
        // The filter never writes a marker (one set for a year would keep
        // every write-back out of Redis).
        (
            json!(["EVAL", write, "2", marker, entry2, "31536000", "1"]),
            403,
        ),
        // Only the marker of the entry's own slot.
        (json!(["EVAL", write, "2", entry2, marker, "60", "v"]), 403),
        (
            json!(["EVAL", write, "2", entry2, "directive:__flush__", "60", "v"]),
            403,
        ),
        (json!(["EVAL", write, "2", entry2, marker2, "0", "v"]), 400),
        (
            json!(["EVAL", write, "2", entry2, marker2, "99999999999", "v"]),
            400,
        ),
        (
            json!(["EVAL", write, "2", entry2, marker2, "31536001", "v"]),
            400,
        ),
        (json!(["EVAL", "return redis.call('FLUSHALL')", "0"]), 403),
        (json!(["EVAL", "return 1", "0"]), 403),
        (json!(["FLUSHALL"]), 403),
    ];
    for (command, status) in &cases {
        untouched(&mut r, &format!("filter token: {command}"), || {
            let (got, body) = front.command(FILTER, command);
            assert_eq!(got, *status, "{command}: {body}");
            let error = serde_json::from_str::<Value>(&body).unwrap()["error"]
                .as_str()
                .unwrap()
                .to_string();
            if *status == 403 && !command[0].as_str().unwrap().eq("FLUSHALL") {
                assert!(
                    error.starts_with("ERR command not allowed for this token")
                        || error.starts_with("ERR key not allowed for this token")
                        || error.starts_with("ERR script not allowed"),
                    "{error}"
                );
            }
            assert!(!error.contains("secret"), "{error}");
            assert!(!error.contains(&agent.to_string()), "{error}");
        });
    }
    let paths = [
        format!("/set/{entry}/x/EX/60"),
        format!("/del/{entry}"),
        format!("/get/{other}"),
        "/flushall".to_string(),
    ];
    for path in &paths {
        untouched(&mut r, &format!("filter token: {path}"), || {
            assert_eq!(front.call("GET", path, Some(FILTER), b"").0, 403, "{path}");
            let with_query = format!("{path}?_token={FILTER}");
            assert_eq!(front.call("GET", &with_query, None, b"").0, 403, "{path}");
        });
    }
    untouched(&mut r, "filter token: a pipeline with a DEL", || {
        let body = json!([["GET", entry], ["DEL", entry]]).to_string();
        assert_eq!(
            front
                .call("POST", "/pipeline", Some(FILTER), body.as_bytes())
                .0,
            403
        );
    });
    let stored: Vec<u8> = redis::cmd("GET").arg(&entry).query(&mut r).unwrap();
    assert_eq!(stored, text.as_bytes(), "the entry survived");
    // The admin token may run its own script here; the filter's never could.
    assert_eq!(
        front.command(ADMIN, &json!(["EVAL", "return 1", "0"])),
        (200, r#"{"result":1}"#.into())
    );
}

#[test]
fn the_admin_token_sets_with_ex_deletes_and_never_sets_without_ttl() {
    let redis = Redis::start();
    let front = Front::start(&redis, &[]);
    let mut r = redis.conn();
    assert_eq!(
        front.command(ADMIN, &json!(["SET", "op:key", "v", "EX", 60])),
        (200, r#"{"result":"OK"}"#.into())
    );
    let ttl: i64 = redis::cmd("TTL").arg("op:key").query(&mut r).unwrap();
    assert!((1..=60).contains(&ttl), "{ttl}");
    assert_eq!(
        front.call("GET", "/set/op:path/v/EX/30", Some(ADMIN), b""),
        (200, r#"{"result":"OK"}"#.into())
    );
    for command in [
        json!(["SET", "op:nottl", "v"]),
        json!(["SET", "op:nottl", "v", "NX"]),
        json!(["SET", "op:nottl", "v", "EX", 31_536_001]),
    ] {
        untouched(&mut r, &format!("admin: {command}"), || {
            let (status, body) = front.command(ADMIN, &command);
            assert_eq!(status, 400, "{command}: {body}");
        });
    }
    untouched(&mut r, "admin: /set/op:nottl/v", || {
        assert_eq!(
            front.call("GET", "/set/op:nottl/v", Some(ADMIN), b""),
            (
                400,
                r#"{"error":"ERR SET needs EX seconds here (1 to 31536000): every key is written with a TTL"}"#
                    .into()
            )
        );
    });
    // DEL of what the filter's token cannot touch: a tombstone and the marker.
    let entry = ibex_wire::redis_key(ibex_wire::DEFAULT_KEY_PREFIX, uuid::Uuid::new_v4());
    let marker = ibex_wire::flush_marker_for(ibex_wire::DEFAULT_KEY_PREFIX, &entry);
    let _: () = redis::cmd("SET")
        .arg(&entry)
        .arg(ibex_wire::TOMBSTONE)
        .arg("EX")
        .arg(10)
        .query(&mut r)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&marker)
        .arg("1")
        .arg("EX")
        .arg(10)
        .query(&mut r)
        .unwrap();
    assert_eq!(
        front.command(ADMIN, &json!(["DEL", entry, marker, "op:key"])),
        (200, r#"{"result":3}"#.into())
    );
}
