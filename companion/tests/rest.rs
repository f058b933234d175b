//! The REST front (`companion rest`) against a real redis-server: Upstash's
//! documented examples byte for byte, byte-exact round trips of what the filter
//! stores (directives, tombstones) through every request form and both filter
//! scripts, refusals that never reach Redis, Redis going away and coming back,
//! keep-alive, and the binary's CLI and SIGTERM drain.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ibex_companion::rest::{self, CommandLabel, Outcome, RestOptions, RestState};
use ibex_wire::Redacted;
use redis::Commands;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

/// The token of Upstash's documentation examples, as the admin token: the
/// examples are an operator's.
const ADMIN_TOKEN: &str = "2553feg6a2d9842h2a0gcdb5f8efe9934";
const ADMIN_BEARER: (&str, &str) = ("authorization", "Bearer 2553feg6a2d9842h2a0gcdb5f8efe9934");
/// The filter's token.
const FILTER_TOKEN: &str = "filter-6c1e08d2a94b";
const FILTER_BEARER: (&str, &str) = ("authorization", "Bearer filter-6c1e08d2a94b");
const B64: (&str, &str) = ("upstash-encoding", "base64");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

struct Front {
    base: String,
    addr: SocketAddr,
    state: RestState,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Front {
    async fn start(redis_url: &str, options: RestOptions) -> Front {
        let client = redis::Client::open(redis_url).unwrap();
        let state = RestState::new(
            client,
            &Redacted::new(FILTER_TOKEN.to_string()),
            Some(&Redacted::new(ADMIN_TOKEN.to_string())),
            options,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(rest::run(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Front {
            base: format!("http://{addr}"),
            addr,
            state,
            stop: Some(tx),
            task,
        }
    }

    /// Started and connected to a live Redis (so it sends nothing of its own
    /// afterwards: Redis's command count moves only with requests).
    async fn ready(redis: &Redis, options: RestOptions) -> Front {
        let front = Front::start(&redis.url(), options).await;
        front.wait_ready().await;
        front
    }

    async fn wait_ready(&self) {
        eventually("the front is ready", Duration::from_secs(20), || async {
            (send("GET", &format!("{}/readyz", self.base), &[], "")
                .await
                .0
                == 200)
                .then_some(())
        })
        .await;
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /` with `command` as the JSON body and the admin token.
    async fn call(&self, command: Value, base64: bool) -> (u16, String) {
        self.call_as(ADMIN_BEARER, command, base64).await
    }

    /// `POST /` with `command` as the JSON body and `bearer`.
    async fn call_as(&self, bearer: (&str, &str), command: Value, base64: bool) -> (u16, String) {
        let mut headers = vec![bearer];
        if base64 {
            headers.push(B64);
        }
        let (status, body) = send("POST", &self.url("/"), &headers, command.to_string()).await;
        (status, String::from_utf8(body).unwrap())
    }

    async fn pipeline(&self, commands: Value) -> (u16, String) {
        let (status, body) = send(
            "POST",
            &self.url("/pipeline"),
            &[ADMIN_BEARER],
            commands.to_string(),
        )
        .await;
        (status, String::from_utf8(body).unwrap())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("front did not stop")
            .unwrap()
            .unwrap();
    }
}

/// One request on a fresh connection; status and body.
async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, Vec<u8>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let (status, body) = send("GET", url, headers, "").await;
    (status, String::from_utf8(body).unwrap())
}

/// Redis's count of commands it ran (`INFO stats`), read on `conn`; the INFO
/// itself is counted after it answers, so a read right after another read is
/// exactly one more.
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
async fn untouched<F, Fut>(conn: &mut redis::Connection, what: &str, action: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = processed(conn);
    action().await;
    let after = processed(conn);
    assert_eq!(after, before + 1, "Redis ran a command for: {what}");
}

// ---------------------------------------------------------------- the docs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstash_documented_examples_byte_for_byte() {
    let redis = Redis::start();
    let front = Front::ready(&redis, RestOptions::default()).await;
    let mut r = redis.conn();

    // "curl REST_URL/set/foo/bar -H 'Authorization: Bearer …'": a SET without
    // a TTL, which this front refuses (SPEC §4: every key has one), before Redis.
    assert_eq!(
        get(&front.url("/set/foo/bar"), &[ADMIN_BEARER]).await,
        (
            400,
            r#"{"error":"ERR SET needs EX seconds here (1 to 31536000): every key is written with a TTL"}"#.into()
        )
    );
    assert!(!r.exists::<_, bool>("foo").unwrap());
    // "…/set/foo/bar?_token=…", with its TTL.
    assert_eq!(
        get(
            &front.url(&format!("/set/foo/bar/EX/100?_token={ADMIN_TOKEN}")),
            &[]
        )
        .await,
        (200, r#"{"result":"OK"}"#.into())
    );
    assert_eq!(r.get::<_, String>("foo").unwrap(), "bar");
    // GET foo → REST_URL/get/foo
    assert_eq!(
        get(&front.url("/get/foo"), &[ADMIN_BEARER]).await,
        (200, r#"{"result":"bar"}"#.into())
    );
    // SET foo bar EX 100 → REST_URL/set/foo/bar/EX/100
    assert_eq!(
        get(&front.url("/set/foo/bar/EX/100"), &[ADMIN_BEARER]).await,
        (200, r#"{"result":"OK"}"#.into())
    );
    let ttl: i64 = r.ttl("foo").unwrap();
    assert!((1..=100).contains(&ttl), "{ttl}");
    // "curl -X POST -d '$VALUE' REST_URL/set/foo?EX=100" ≡ /set/foo/$VALUE/EX/100
    let value = r#"{"a": [1, "$VALUE"]}"#;
    let (status, body) = send(
        "POST",
        &front.url("/set/foo?EX=100"),
        &[ADMIN_BEARER],
        value,
    )
    .await;
    assert_eq!((status, body.as_slice()), (200, &br#"{"result":"OK"}"#[..]));
    assert_eq!(r.get::<_, String>("foo").unwrap(), value);
    let ttl: i64 = r.ttl("foo").unwrap();
    assert!((1..=100).contains(&ttl), "{ttl}");
    // POST Command in Body: ["SET", "foo", "bar", "EX", 100]
    let (status, body) = send(
        "POST",
        &front.url(""),
        &[ADMIN_BEARER],
        r#"["SET", "foo", "bar", "EX", 100]"#,
    )
    .await;
    assert_eq!((status, body.as_slice()), (200, &br#"{"result":"OK"}"#[..]));
    assert_eq!(r.get::<_, String>("foo").unwrap(), "bar");

    // Response: null, an integer, a string.
    assert_eq!(
        front.call(json!(["GET", "nosuchkey"]), false).await,
        (200, r#"{"result":null}"#.into())
    );
    assert_eq!(
        front.call(json!(["DEL", "foo", "nosuchkey"]), false).await,
        (200, r#"{"result":1}"#.into())
    );
    // "{"error":"ERR wrong number of arguments for 'get' command"}" (400)
    assert_eq!(
        front.call(json!(["GET"]), false).await,
        (
            400,
            r#"{"error":"ERR wrong number of arguments for 'get' command"}"#.into()
        )
    );

    // Base64 Encoded Responses: SET → {"result":"OK"}, GET → {"result":"YmFy"}
    assert_eq!(
        get(&front.url("/SET/foo/bar/EX/100"), &[ADMIN_BEARER, B64]).await,
        (200, r#"{"result":"OK"}"#.into())
    );
    assert_eq!(
        get(&front.url("/GET/foo"), &[ADMIN_BEARER, B64]).await,
        (200, r#"{"result":"YmFy"}"#.into())
    );

    // Pipelining, in the allowed subset, in the documented shape: one answer per
    // command, in order, an error reply among them.
    let (status, body) = front
        .pipeline(json!([
            ["SET", "key1", "valuex", "EX", 13],
            ["SET", "key2", "valuez", "EX", 13],
            // The filter's key read with no key: Redis's Lua refuses GET(nil).
            ["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, 0],
            ["DEL", "key1", "key2"]
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    let answers: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(answers.len(), 4, "{body}");
    assert_eq!(answers[0], json!({"result": "OK"}));
    assert_eq!(answers[1], json!({"result": "OK"}));
    let err = answers[2]["error"].as_str().unwrap();
    assert!(err.starts_with("ERR "), "{err}");
    assert!(
        err.contains("arguments must be strings or integers"),
        "{err}"
    );
    assert_eq!(answers[3], json!({"result": 2}));
    assert!(
        body.starts_with(r#"[{"result":"OK"},{"result":"OK"},{"error":"ERR "#),
        "{body}"
    );
    assert!(body.ends_with(r#"},{"result":2}]"#), "{body}");

    // Upstash's own pipeline example uses SETEX, INCR and ZADD: outside the
    // allowlist, so the whole pipeline is refused and Redis runs none of it.
    untouched(&mut r, "the documented pipeline", || async {
        let (status, body) = front
            .pipeline(json!([
                ["SET", "key1", "valuex", "EX", 13],
                ["SETEX", "key2", 13, "valuez"],
                ["INCR", "key1"],
                ["ZADD", "myset", 11, "item1", 22, "item2"]
            ]))
            .await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.starts_with(r#"{"error":"ERR command not allowed"#),
            "{body}"
        );
    })
    .await;
    assert!(!r.exists::<_, bool>("key1").unwrap());
    front.stop().await;
}

// ---------------------------------------------------------------- byte-exactness

/// What a directive or a tombstone may be, and the JSON and HTTP layers could
/// get wrong.
fn awkward_values() -> Vec<(&'static str, Vec<u8>)> {
    let piece = "replacement \u{fffd}; lone CR\rhere; emoji 🦌👩‍💻; tab\t, quote \", backslash \\, \u{2028}. ";
    let mut big = String::new();
    while big.len() < 64 * 1024 {
        big.push_str(piece);
    }
    vec![
        ("U+FFFD", "\u{fffd}".as_bytes().to_vec()),
        ("lone CR", b"a\rb".to_vec()),
        ("emoji", "🦌".as_bytes().to_vec()),
        ("64 KB", big.into_bytes()),
        ("tombstone", ibex_wire::TOMBSTONE.as_bytes().to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_values_round_trip_byte_for_byte() {
    let redis = Redis::start();
    let front = Front::ready(&redis, RestOptions::default()).await;
    let mut r = redis.conn();

    for (what, value) in awkward_values() {
        let text = String::from_utf8(value.clone()).unwrap();
        let key = format!("rt:{what}");

        // POST / with a JSON string; Redis holds the exact bytes.
        assert_eq!(
            front.call(json!(["SET", key, text, "EX", 60]), false).await,
            (200, r#"{"result":"OK"}"#.into()),
            "{what}"
        );
        assert_eq!(r.get::<_, Vec<u8>>(&key).unwrap(), value, "{what}");
        // GET, base64: the exact bytes; plain: the same text.
        let (status, body) = front.call(json!(["GET", key]), true).await;
        assert_eq!(status, 200, "{what}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(unb64(answer["result"].as_str().unwrap()), value, "{what}");
        assert_eq!(body, format!(r#"{{"result":"{}"}}"#, b64(&value)), "{what}");
        let (status, body) = front.call(json!(["GET", key]), false).await;
        assert_eq!(status, 200, "{what}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["result"].as_str().unwrap(), text, "{what}");

        // The path form with the value as the POST body, byte for byte.
        r.del::<_, ()>(&key).unwrap();
        let (status, _) = send(
            "POST",
            &front.url(&format!(
                "/set/{}?EX=60",
                key.replace(' ', "%20").replace('+', "%2B")
            )),
            &[ADMIN_BEARER],
            value.clone(),
        )
        .await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(r.get::<_, Vec<u8>>(&key).unwrap(), value, "{what}");

        // The filter's write-back, with the filter's token: SET_IF_ABSENT on the
        // agent's key and the flush marker, then its read of a key entry:
        // GET_WITH_PTTL, base64.
        let agent = Uuid::new_v4();
        let entry = ibex_wire::redis_key(ibex_wire::DEFAULT_KEY_PREFIX, agent);
        let marker = ibex_wire::flush_marker_for(ibex_wire::DEFAULT_KEY_PREFIX, &entry);
        let write = json!([
            "EVAL",
            ibex_wire::SET_IF_ABSENT_SCRIPT,
            2,
            entry,
            marker,
            60,
            text
        ]);
        assert_eq!(
            front.call_as(FILTER_BEARER, write.clone(), true).await,
            (200, r#"{"result":1}"#.into()),
            "{what}"
        );
        assert_eq!(r.get::<_, Vec<u8>>(&entry).unwrap(), value, "{what}");
        let ttl: i64 = r.ttl(&entry).unwrap();
        assert!((1..=60).contains(&ttl), "{what}: {ttl}");
        // Written once: the key now exists, so the script writes nothing.
        assert_eq!(
            front.call_as(FILTER_BEARER, write, true).await,
            (200, r#"{"result":0}"#.into()),
            "{what}"
        );
        let read = json!(["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, 1, entry]);
        let (status, body) = front.call_as(FILTER_BEARER, read, true).await;
        assert_eq!(status, 200, "{what}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        let pair = answer["result"].as_array().unwrap();
        assert_eq!(pair.len(), 2, "{body}");
        assert_eq!(unb64(pair[0].as_str().unwrap()), value, "{what}");
        let pttl = pair[1].as_i64().unwrap();
        assert!((1..=60_000).contains(&pttl), "{what}: {pttl}");
        assert!(body.starts_with(&format!(r#"{{"result":["{}","#, b64(&value))));
    }

    // A key entry as the filter reads it (agent_key:{sha256}), and its absence.
    let hash = ibex_wire::key_sha256_hex(&[7u8; 32]);
    let entry = ibex_wire::agent_key_redis_key(&hash);
    let read = json!(["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, 1, entry]);
    assert_eq!(
        front.call_as(FILTER_BEARER, read.clone(), true).await,
        (200, r#"{"result":null}"#.into())
    );
    let agent = Uuid::new_v4().to_string();
    r.set_ex::<_, _, ()>(&entry, &agent, 30).unwrap();
    let (status, body) = front.call_as(FILTER_BEARER, read, true).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        unb64(answer["result"][0].as_str().unwrap()),
        agent.as_bytes()
    );
    assert!(answer["result"][1].as_i64().unwrap() > 0);

    // The subscriber's tombstone blocks the write-back, and reads back as one NUL.
    let agent = Uuid::new_v4();
    let entry = ibex_wire::redis_key(ibex_wire::DEFAULT_KEY_PREFIX, agent);
    let marker = ibex_wire::flush_marker_for(ibex_wire::DEFAULT_KEY_PREFIX, &entry);
    r.set_ex::<_, _, ()>(&entry, ibex_wire::TOMBSTONE, 10)
        .unwrap();
    assert_eq!(
        front
            .call_as(
                FILTER_BEARER,
                json!([
                    "EVAL",
                    ibex_wire::SET_IF_ABSENT_SCRIPT,
                    2,
                    entry,
                    marker,
                    60,
                    "old text"
                ]),
                true
            )
            .await,
        (200, r#"{"result":0}"#.into())
    );
    assert_eq!(
        front
            .call_as(FILTER_BEARER, json!(["GET", entry]), true)
            .await,
        (200, r#"{"result":"AA=="}"#.into())
    );
    assert_eq!(
        front
            .call_as(FILTER_BEARER, json!(["GET", entry]), false)
            .await,
        (200, r#"{"result":"\u0000"}"#.into())
    );
    // So does the flush marker (of the entry's slot).
    let agent = Uuid::new_v4();
    let entry = ibex_wire::redis_key(ibex_wire::DEFAULT_KEY_PREFIX, agent);
    let marker = ibex_wire::flush_marker_for(ibex_wire::DEFAULT_KEY_PREFIX, &entry);
    r.set_ex::<_, _, ()>(&marker, "1", 10).unwrap();
    assert_eq!(
        front
            .call_as(
                FILTER_BEARER,
                json!([
                    "EVAL",
                    ibex_wire::SET_IF_ABSENT_SCRIPT,
                    2,
                    entry,
                    marker,
                    60,
                    "text"
                ]),
                true
            )
            .await,
        (200, r#"{"result":0}"#.into())
    );
    assert!(!r.exists::<_, bool>(&entry).unwrap());

    // Bytes that are not UTF-8: replaced by U+FFFD as text (Upstash documents
    // it), exact in base64; and a non-UTF-8 key through the path form.
    r.set::<_, _, ()>(b"bin\xff".as_slice(), b"a\xffb\x00".as_slice())
        .unwrap();
    assert_eq!(
        get(&front.url("/get/bin%FF"), &[ADMIN_BEARER]).await,
        (200, "{\"result\":\"a\u{fffd}b\\u0000\"}".into())
    );
    assert_eq!(
        get(&front.url("/get/bin%ff"), &[ADMIN_BEARER, B64]).await,
        (200, format!(r#"{{"result":"{}"}}"#, b64(b"a\xffb\x00")))
    );
    front.stop().await;
}

// ---------------------------------------------------------------- refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_never_touch_redis() {
    let redis = Redis::start();
    let options = RestOptions {
        max_body_bytes: 4096,
        ..Default::default()
    };
    let front = Front::ready(&redis, options).await;
    let mut r = redis.conn();
    r.set::<_, _, ()>("keep-7f3a", "kept-9c1d").unwrap();
    let root = front.url("/");
    let pipeline = front.url("/pipeline");
    const UNAUTHORIZED: &str = r#"{"error":"Unauthorized"}"#;

    // 401: no token, a wrong one, a prefix of it, another scheme, a wrong
    // _token; before the body is even read (a malformed or oversized body with
    // no token is still a 401).
    let wrong_bearer = "Bearer 2553feg6a2d9842h2a0gcdb5f8efe993X".to_string();
    let prefix_bearer = "Bearer 2553feg6a2d9842h2a0gcdb5f8efe993".to_string();
    // method, url, headers, body
    type Case = (&'static str, String, Vec<(&'static str, String)>, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "POST",
            root.clone(),
            vec![],
            br#"["GET","keep-7f3a"]"#.to_vec(),
        ),
        (
            "POST",
            root.clone(),
            vec![("authorization", wrong_bearer.clone())],
            br#"["GET","keep-7f3a"]"#.to_vec(),
        ),
        (
            "POST",
            root.clone(),
            vec![("authorization", prefix_bearer)],
            br#"["GET","keep-7f3a"]"#.to_vec(),
        ),
        (
            "POST",
            root.clone(),
            vec![("authorization", format!("Basic {ADMIN_TOKEN}"))],
            br#"["GET","keep-7f3a"]"#.to_vec(),
        ),
        (
            "POST",
            root.clone(),
            vec![("authorization", ADMIN_TOKEN.to_string())],
            br#"["GET","keep-7f3a"]"#.to_vec(),
        ),
        (
            "GET",
            front.url("/get/keep-7f3a?_token=nope"),
            vec![],
            vec![],
        ),
        (
            "GET",
            front.url(&format!("/get/keep-7f3a?token={ADMIN_TOKEN}")),
            vec![],
            vec![],
        ),
        (
            // A wrong header is not rescued by a right _token.
            "GET",
            front.url(&format!("/get/keep-7f3a?_token={ADMIN_TOKEN}")),
            vec![("authorization", wrong_bearer.clone())],
            vec![],
        ),
        ("POST", root.clone(), vec![], b"[not json".to_vec()),
        ("POST", root.clone(), vec![], vec![b'x'; 10_000]),
        (
            "POST",
            pipeline.clone(),
            vec![],
            br#"[["FLUSHALL"]]"#.to_vec(),
        ),
        ("GET", front.url("/flushall"), vec![], vec![]),
    ];
    for (method, url, headers, body) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        untouched(
            &mut r,
            &format!("401 {method} {url} {headers:?}"),
            || async {
                let (status, answer) = send(method, &url, &headers, body).await;
                assert_eq!(
                    (status, answer.as_slice()),
                    (401, UNAUTHORIZED.as_bytes()),
                    "{method} {url} {headers:?}"
                );
            },
        )
        .await;
    }
    // The scheme's case does not matter (a right token passes).
    assert_eq!(
        get(
            &front.url("/get/keep-7f3a"),
            &[("authorization", &format!("bEaReR {ADMIN_TOKEN}"))]
        )
        .await,
        (200, r#"{"result":"kept-9c1d"}"#.into())
    );

    // 403: commands outside the allowlist, in every form, and scripts that are
    // not the filter's.
    let forbidden_json = [
        json!(["FLUSHALL"]),
        json!(["flushdb"]),
        json!(["CONFIG", "SET", "dir", "/tmp"]),
        json!(["KEYS", "*"]),
        json!(["EVALSHA", "abc", 0]),
        json!(["SCRIPT", "FLUSH"]),
        json!(["EVAL", "return redis.call('FLUSHALL')", 0]),
        json!(["EVAL", "redis.call('CONFIG','SET','dir','/tmp')", 0]),
        json!(["EVAL", format!("{} ", ibex_wire::SET_IF_ABSENT_SCRIPT), 0]),
    ];
    for command in forbidden_json {
        untouched(&mut r, &format!("403 {command}"), || async {
            let (status, body) = front.call(command.clone(), false).await;
            assert_eq!(status, 403, "{command}: {body}");
            let answer: Value = serde_json::from_str(&body).unwrap();
            assert!(
                answer["error"].as_str().unwrap().starts_with("ERR "),
                "{body}"
            );
        })
        .await;
    }
    for path in ["/flushall", "/config/set/dir/tmp", "/multi-exec", "/info"] {
        untouched(&mut r, &format!("403 {path}"), || async {
            let (status, body) = get(&front.url(path), &[ADMIN_BEARER]).await;
            assert_eq!(status, 403, "{path}: {body}");
        })
        .await;
    }
    untouched(
        &mut r,
        "403 pipeline with one forbidden command",
        || async {
            let (status, body) = front
                .pipeline(json!([["SET", "a", "1"], ["GET", "a"], ["FLUSHALL"]]))
                .await;
            assert_eq!(status, 403, "{body}");
        },
    )
    .await;

    // 400: malformed bodies and commands, checked before Redis.
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("/", b"".to_vec()),
        ("/", b"[".to_vec()),
        ("/", b"{\"a\":1}".to_vec()),
        ("/", b"[]".to_vec()),
        ("/", b"[\"GET\", 1.5]".to_vec()),
        ("/", b"[\"SET\", \"k\", true]".to_vec()),
        ("/", b"[\"SET\", \"k\", null]".to_vec()),
        ("/", b"[\"GET\", \"\xff\"]".to_vec()),
        ("/", b"[\"GET\", \"\\ud800\"]".to_vec()),
        ("/", br#"["GET"]"#.to_vec()),
        ("/", br#"["GET", "a", "b"]"#.to_vec()),
        ("/", br#"["SET", "k", "v"]"#.to_vec()),
        ("/", br#"["SET", "k", "v", "NX"]"#.to_vec()),
        ("/", br#"["SET", "k", "v", "EX", 0]"#.to_vec()),
        ("/", br#"["SET", "k", "v", "EX", 31536001]"#.to_vec()),
        ("/", br#"["SET", "k", "v", "EX", "1.5"]"#.to_vec()),
        ("/", br#"["SET", "k", "v", "PX", 100]"#.to_vec()),
        ("/", br#"["SET", "k", "v", "NX", "NX"]"#.to_vec()),
        ("/", br#"["DEL"]"#.to_vec()),
        (
            "/",
            serde_json::to_vec(&json!(["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, 2, "k"])).unwrap(),
        ),
        (
            "/",
            serde_json::to_vec(&json!(["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, -1])).unwrap(),
        ),
        ("/pipeline", b"[]".to_vec()),
        ("/pipeline", br#"["GET","k"]"#.to_vec()),
        ("/pipeline", br#"[["GET","keep-7f3a"], "x"]"#.to_vec()),
        ("/pipeline", br#"[["GET","keep-7f3a"], []]"#.to_vec()),
        ("/pipeline", br#"[["GET","keep-7f3a"], ["GET"]]"#.to_vec()),
        ("/get/%zz", b"".to_vec()),
        ("/%ffget/k", b"".to_vec()),
    ];
    for (path, body) in malformed {
        let shown = String::from_utf8_lossy(&body).into_owned();
        untouched(&mut r, &format!("400 {path} {shown}"), || async {
            let (status, answer) = send("POST", &front.url(path), &[ADMIN_BEARER], body).await;
            assert_eq!(
                status,
                400,
                "{path} {shown}: {}",
                String::from_utf8_lossy(&answer)
            );
            let answer: Value = serde_json::from_slice(&answer).unwrap();
            assert!(
                answer["error"].as_str().unwrap().starts_with("ERR "),
                "{answer}"
            );
        })
        .await;
    }
    // 413 above --max-body-bytes, from Content-Length alone or from the body.
    untouched(&mut r, "413", || async {
        let big = serde_json::to_vec(&json!(["SET", "k", "x".repeat(5000)])).unwrap();
        let (status, answer) = send("POST", &root, &[ADMIN_BEARER], big).await;
        assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
        assert_eq!(
            answer,
            br#"{"error":"ERR request body is larger than 4096 bytes"}"#
        );
    })
    .await;
    assert_eq!(
        front
            .call(json!(["SET", "k", "x".repeat(4000), "EX", 60]), false)
            .await
            .0,
        200,
        "just under the limit"
    );

    assert_eq!(r.get::<_, String>("keep-7f3a").unwrap(), "kept-9c1d");
    let m = front.state.metrics();
    assert!(m.requests(CommandLabel::None, Outcome::Unauthorized) >= 12);
    assert!(m.requests(CommandLabel::Other, Outcome::Forbidden) >= 13);
    assert_eq!(m.requests(CommandLabel::Pipeline, Outcome::Forbidden), 1);
    assert!(m.requests(CommandLabel::None, Outcome::BadRequest) >= 20);

    // /metrics: no token, no key names or values.
    let (status, text) = get(&front.url("/metrics"), &[]).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("ibex_rest_requests_total{command=\"get\",outcome=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("ibex_rest_requests_total{command=\"none\",outcome=\"unauthorized\"}"));
    assert!(text.contains("ibex_rest_request_seconds_count"));
    for secret in [
        "keep-7f3a",
        "kept-9c1d",
        ADMIN_TOKEN,
        "FLUSHALL",
        "flushall",
    ] {
        assert!(!text.contains(secret), "{secret} in /metrics");
    }
    front.stop().await;
}

// ---------------------------------------------------------------- Redis away

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_and_recovers() {
    let redis = Redis::start();
    let front = Front::ready(&redis, RestOptions::default()).await;
    assert_eq!(
        front.call(json!(["SET", "k", "v", "EX", 60]), false).await,
        (200, r#"{"result":"OK"}"#.into())
    );

    redis.kill();
    let port = redis.port.to_string();
    for command in [
        json!(["GET", "k"]),
        json!(["SET", "k", "v2", "EX", 60]),
        json!(["PING"]),
    ] {
        let started = Instant::now();
        let (status, body) = front.call(command, false).await;
        assert_eq!(
            (status, body.as_str()),
            (503, r#"{"error":"ERR Redis is unavailable"}"#)
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!body.contains(&port) && !body.contains("127.0.0.1"));
    }
    let (status, body) = front.pipeline(json!([["GET", "k"], ["PING"]])).await;
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"error":"ERR Redis is unavailable"}"#)
    );
    assert_eq!(get(&front.url("/readyz"), &[]).await.0, 503);
    assert_eq!(get(&front.url("/healthz"), &[]).await.0, 200);

    redis.resume();
    // The first request after Redis is back already succeeds (a refused
    // reconnect never carried the command, so it is tried once more).
    assert_eq!(
        front.call(json!(["SET", "k", "v3", "EX", 60]), false).await,
        (200, r#"{"result":"OK"}"#.into())
    );
    assert_eq!(
        front.call(json!(["GET", "k"]), false).await,
        (200, r#"{"result":"v3"}"#.into())
    );
    assert_eq!(get(&front.url("/readyz"), &[]).await.0, 200);
    let m = front.state.metrics();
    assert_eq!(m.requests(CommandLabel::Pipeline, Outcome::Unavailable), 1);
    assert!(
        m.requests(
            CommandLabel::Verb(rest::command::Verb::Get),
            Outcome::Unavailable
        ) >= 1
    );
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down_and_serves_once_it_is_up() {
    let redis = Redis::start();
    redis.kill();
    let front = Front::start(&redis.url(), RestOptions::default()).await;
    assert_eq!(get(&front.url("/healthz"), &[]).await.0, 200);
    assert_eq!(get(&front.url("/readyz"), &[]).await.0, 503);
    assert_eq!(front.call(json!(["GET", "k"]), false).await.0, 503);

    redis.resume();
    front.wait_ready().await;
    assert_eq!(
        front.call(json!(["GET", "k"]), false).await,
        (200, r#"{"result":null}"#.into())
    );
    front.stop().await;
}

/// A Lua script that keeps Redis busy for `ms` milliseconds and returns 1.
fn busy_script(ms: u64) -> String {
    format!(
        "local s=redis.call('TIME') while true do local n=redis.call('TIME') \
         if (n[1]-s[1])*1000000+(n[2]-s[2]) > {} then break end end return 1",
        ms * 1000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_answers_503_within_the_timeout() {
    let redis = Redis::start();
    let options = RestOptions {
        redis_timeout: Duration::from_millis(200),
        allow_any_script: true,
        ..Default::default()
    };
    let front = Front::ready(&redis, options).await;
    let started = Instant::now();
    let (status, body) = front
        .call(json!(["EVAL", busy_script(1500), 0]), false)
        .await;
    let took = started.elapsed();
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"error":"ERR Redis is unavailable"}"#)
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1200),
        "{took:?}"
    );
    // Once the script is over, the same connection serves again.
    eventually("Redis answers again", Duration::from_secs(20), || async {
        (front.call(json!(["PING"]), false).await.0 == 200).then_some(())
    })
    .await;

    // A connection that stops answering is replaced after a few timeouts in a
    // row (here: Redis paused, so no reset arrives).
    let resets = front.state.metrics().redis_resets.get();
    let pid = redis.pid().unwrap();
    // SAFETY: signalling the redis-server child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    for _ in 0..rest::link::STALE_AFTER_TIMEOUTS {
        assert_eq!(front.call(json!(["PING"]), false).await.0, 503);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_eq!(front.state.metrics().redis_resets.get(), resets + 1);
    eventually(
        "Redis answers on a new connection",
        Duration::from_secs(20),
        || async { (front.call(json!(["PING"]), false).await.0 == 200).then_some(()) },
    )
    .await;
    front.stop().await;
}

// ---------------------------------------------------------------- connections

fn post(path: &str, body: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nhost: rest\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_serves_many_requests() {
    let redis = Redis::start();
    // A short header deadline: the pauses between requests below outlast it,
    // and the connection must stay (idle is not a slow head).
    let options = RestOptions {
        serve: rest::ServeOptions {
            header_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    let front = Front::ready(&redis, options).await;
    let addr = front.addr;
    let filter_read =
        json!(["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", "directive:ka"]).to_string();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let local = s.local_addr().unwrap();
        let steps: Vec<(Vec<u8>, u16, &str)> = vec![
            (post("/", r#"["SET","ka","va","EX",60]"#, Some(ADMIN_TOKEN)), 200, r#"{"result":"OK"}"#),
            (post("/", r#"["GET","ka"]"#, Some(ADMIN_TOKEN)), 200, r#"{"result":"va"}"#),
            (
                post("/pipeline", r#"[["GET","ka"],["DEL","ka"]]"#, Some(ADMIN_TOKEN)),
                200,
                r#"[{"result":"va"},{"result":1}]"#,
            ),
            // Errors keep the connection too: the filter reuses it whatever it got.
            (post("/", r#"["GET","ka"]"#, None), 401, r#"{"error":"Unauthorized"}"#),
            (post("/", r#"["GET""#, Some(ADMIN_TOKEN)), 400, r#"{"error":"ERR request body is not valid JSON"}"#),
            (
                post("/", r#"["FLUSHALL"]"#, Some(ADMIN_TOKEN)),
                403,
                r#"{"error":"ERR command not allowed: this REST front runs only GET, SET, DEL, EVAL and PING"}"#,
            ),
            (
                format!("GET /get/ka HTTP/1.1\r\nhost: rest\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n").into_bytes(),
                200,
                r#"{"result":null}"#,
            ),
            // The filter's token on the same connection, and its refusals.
            (post("/", &filter_read, Some(FILTER_TOKEN)), 200, r#"{"result":null}"#),
            (
                post("/", r#"["DEL","directive:ka"]"#, Some(FILTER_TOKEN)),
                403,
                r#"{"error":"ERR command not allowed for this token: the filter's token runs only PING, GET and EVAL of the filter's scripts"}"#,
            ),
            (post("/", r#"["PING"]"#, Some(FILTER_TOKEN)), 200, r#"{"result":"PONG"}"#),
        ];
        for (i, (request, status, body)) in steps.into_iter().enumerate() {
            if i % 3 == 2 {
                // Longer than the header deadline.
                std::thread::sleep(Duration::from_millis(400));
            }
            let (got, head, answer) = exchange(&mut s, &request);
            assert_eq!((got, String::from_utf8(answer).unwrap().as_str()), (status, body));
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(s.local_addr().unwrap(), local, "same socket");
        }
    })
    .await
    .unwrap();
    front.stop().await;
}

// ---------------------------------------------------------------- the binary

#[test]
fn cli_refuses_missing_and_empty_tokens() {
    let out = companion(&["rest"]);
    assert_eq!(out.status.code(), Some(2), "a token is required");
    let out = companion(&["rest", "--token", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "\n").unwrap();
    let out = companion(&["rest", "--token-file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    let out = companion(&["rest", "--token-file", "/nonexistent/token"]);
    assert_eq!(out.status.code(), Some(1));
    let out = companion_cmd(&["rest"])
        .env("IBEX_REDIS_REST_TOKEN", "a token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "spaces are refused");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("a token"));
    // The admin token: the same rules, never the filter's, and
    // --allow-any-script only with it.
    let out = companion(&["rest", "--token", "t", "--admin-token", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token is empty"));
    let out = companion(&["rest", "--token", "same-7d1f", "--admin-token", "same-7d1f"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("differ") && !err.contains("same-7d1f"),
        "{err}"
    );
    let out = companion(&["rest", "--token", "t", "--allow-any-script"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token"));
    let out = companion(&["rest", "--token", "t", "--key-prefix", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key prefix"));
    let out = companion(&["rest", "--token", "t", "--max-connections", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_its_token_files_and_drains_on_sigterm() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{FILTER_TOKEN}\n")).unwrap();
    let admin_file = dir.path().join("admin-token");
    std::fs::write(&admin_file, format!("{ADMIN_TOKEN}\r\n")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let mut child = Spawned(
        companion_cmd(&[
            "rest",
            "--listen",
            &listen,
            "--redis-url",
            &redis.url(),
            "--allow-any-script",
            "--redis-timeout-ms",
            "10000",
        ])
        .env("IBEX_REDIS_REST_TOKEN_FILE", &file)
        .env("IBEX_REDIS_REST_ADMIN_TOKEN_FILE", &admin_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    eventually("the binary is ready", Duration::from_secs(20), || async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let resp = client
            .get(format!("{base}/readyz").parse().unwrap())
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        get(&format!("{base}/ping"), &[ADMIN_BEARER]).await,
        (200, r#"{"result":"PONG"}"#.into())
    );
    assert_eq!(
        get(&format!("{base}/ping"), &[FILTER_BEARER]).await,
        (200, r#"{"result":"PONG"}"#.into())
    );
    // Each token is what its file says: the filter's cannot SET.
    assert_eq!(
        get(&format!("{base}/set/k/v/EX/60"), &[FILTER_BEARER])
            .await
            .0,
        403
    );

    // A request Redis takes a while to answer is in flight when SIGTERM comes:
    // it still gets its answer, then the process exits 0.
    let url = format!("{base}/");
    let slow = tokio::spawn(async move {
        let body = json!(["EVAL", busy_script(800), 0]).to_string();
        send("POST", &url, &[ADMIN_BEARER], body).await
    });
    eventually(
        "the slow request is in flight",
        Duration::from_secs(20),
        || async {
            let (_, text) = get(&format!("{base}/metrics"), &[]).await;
            (metric(&text, "ibex_rest_in_flight") == Some(1)).then_some(())
        },
    )
    .await;
    let pid = i32::try_from(child.0.id()).unwrap();
    // SAFETY: signalling the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (status, body) = slow.await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &br#"{"result":1}"#[..]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
}
