//! Test fixtures: a throwaway PostgreSQL 15 and redis-server per test, each in
//! its own temp dir on a free loopback port, stopped by a Drop guard; plus a
//! recording stand-in for Envoy's control listener and small HTTP helpers.
//!
//! Everything polls with deadlines instead of sleeping for fixed times.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;
use tokio::sync::oneshot;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The companion binary built by cargo for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_ibex-companion");

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL tool, as the postgres user when we are root (the server
/// refuses to run as root).
fn pg_tool(tool: &str, dir: &Path) -> Command {
    let path = format!("{PG_BIN}/{tool}");
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    };
    cmd.current_dir(dir);
    cmd
}

fn run_ok(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private PostgreSQL 15 server.
pub struct Pg {
    dir: TempDir,
    pub port: u16,
}

impl Pg {
    /// initdb + start, ready to accept connections.
    pub fn start() -> Pg {
        // As root the server runs as `postgres`, which must be able to reach
        // the data dir: a TMPDIR under /root would not do, /tmp always does
        // (another TMPDIR, such as /dev/shm, is kept).
        let tmp = std::env::temp_dir();
        let parent = if is_root() && tmp.starts_with("/root") {
            PathBuf::from("/tmp")
        } else {
            tmp
        };
        let dir = tempfile::Builder::new()
            .prefix("ibex-pg-")
            .tempdir_in(parent)
            .unwrap();
        if is_root() {
            run_ok(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let mut initdb = pg_tool("initdb", dir.path());
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_ok(initdb, "initdb");
        let pg = Pg {
            dir,
            port: free_port(),
        };
        pg.resume();
        pg
    }

    /// The data directory (postgresql.conf, pg_hba.conf).
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (again) on the same port and data; waits until ready.
    pub fn resume(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let mut c = pg_tool("pg_ctl", self.dir.path());
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-o", &opts, "-w", "-t", "30", "start"]);
        run_ok(c, "pg_ctl start");
    }

    /// Stops the server (fast mode: disconnects clients).
    pub fn stop(&self) {
        let mut c = pg_tool("pg_ctl", self.dir.path());
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        run_ok(c, "pg_ctl stop");
    }

    /// URL of the `postgres` superuser on the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let mut c = pg_tool("pg_ctl", self.dir.path());
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}

/// A private redis-server.
pub struct Redis {
    dir: TempDir,
    pub port: u16,
    child: Mutex<Option<Child>>,
}

impl Redis {
    pub fn start() -> Redis {
        let r = Redis {
            dir: tempfile::Builder::new()
                .prefix("ibex-redis-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            child: Mutex::new(None),
        };
        r.resume();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts on the same port and dir (loads dump.rdb if a SAVE wrote one).
    pub fn resume(&self) {
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = self.conn_once() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running server, if it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| i32::try_from(c.id()).unwrap())
    }

    /// Kills the server (SIGKILL: clients see the link drop).
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn conn_once(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    /// A synchronous connection for test assertions.
    pub fn conn(&self) -> redis::Connection {
        self.conn_once().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `url`; returns status and body.
pub async fn http_get(url: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: Uri = url.parse().unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .expect("GET timed out")
        .expect("GET failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// GET and parse JSON.
pub async fn http_json(url: &str) -> (u16, serde_json::Value) {
    let (status, body) = http_get(url).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// Value of one sample line (`name{labels}` exactly as rendered) in a
/// Prometheus text body.
pub fn metric(text: &str, sample: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == sample).then(|| v.parse().ok())?
    })
}

/// Fetches `/metrics` from `base` and reads one sample.
pub async fn read_metric(base: &str, sample: &str) -> u64 {
    let (status, body) = http_get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    metric(&body, sample).unwrap_or_else(|| panic!("no {sample} in\n{body}"))
}

/// One request seen by the fake control listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
}

#[derive(Clone, Default)]
struct ControlState {
    seen: Arc<Mutex<Vec<Seen>>>,
    // Statuses to answer before falling back to 204.
    script: Arc<Mutex<VecDeque<u16>>>,
}

/// A stand-in for Envoy's control listener: records every POST and answers
/// 204 (or scripted statuses first).
pub struct FakeControl {
    pub addr: SocketAddr,
    state: ControlState,
    _stop: oneshot::Sender<()>,
}

async fn record(State(s): State<ControlState>, uri: Uri, headers: HeaderMap) -> StatusCode {
    s.seen.lock().unwrap().push(Seen {
        path: uri.path().to_string(),
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()),
    });
    let code = s.script.lock().unwrap().pop_front().unwrap_or(204);
    StatusCode::from_u16(code).unwrap()
}

/// What a [`FakeControl`] does with the key invalidation path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRoute {
    /// Not routed (axum's 404, not recorded): the existing tests' listener.
    Absent,
    /// Recorded and answered like the other paths (a filter that knows keys).
    Serve,
    /// Recorded and answered 404 (a filter from before keys).
    NotFound,
}

async fn record_not_found(
    State(s): State<ControlState>,
    uri: Uri,
    headers: HeaderMap,
) -> StatusCode {
    s.seen.lock().unwrap().push(Seen {
        path: uri.path().to_string(),
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()),
    });
    StatusCode::NOT_FOUND
}

impl FakeControl {
    pub async fn start() -> FakeControl {
        Self::start_scripted(&[]).await
    }

    /// Answers `statuses` in order to the first requests, then 204.
    pub async fn start_scripted(statuses: &[u16]) -> FakeControl {
        Self::start_with(statuses, KeyRoute::Absent).await
    }

    /// Like [`FakeControl::start_scripted`], with `keys` deciding what the key
    /// invalidation path `/ibex/v1/invalidate/key/{hash}` does.
    pub async fn start_with(statuses: &[u16], keys: KeyRoute) -> FakeControl {
        let state = ControlState::default();
        state
            .script
            .lock()
            .unwrap()
            .extend(statuses.iter().copied());
        let mut app = Router::new()
            .route("/ibex/v1/invalidate", post(record))
            .route("/ibex/v1/invalidate/{agent}", post(record));
        match keys {
            KeyRoute::Absent => {}
            KeyRoute::Serve => app = app.route("/ibex/v1/invalidate/key/{hash}", post(record)),
            KeyRoute::NotFound => {
                app = app.route("/ibex/v1/invalidate/key/{hash}", post(record_not_found))
            }
        }
        let app = app.with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        FakeControl {
            addr,
            state,
            _stop: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many requests hit `path`.
    pub fn count(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path == path).count()
    }

    /// Waits until `path` was hit at least `n` times.
    pub async fn wait_for(&self, path: &str, n: usize) {
        eventually(
            &format!("{n} POST(s) to {path} on {}", self.addr),
            Duration::from_secs(20),
            || async { (self.count(path) >= n).then_some(()) },
        )
        .await
    }
}

/// Environment variables the companion reads; cleared so tests are hermetic.
pub const COMPANION_ENV: &[&str] = &[
    "DATABASE_URL",
    "REDIS_URL",
    "IBEX_STORE_LISTEN",
    "IBEX_SUBSCRIBE_LISTEN",
    "IBEX_CONTROL_URLS",
    "IBEX_CONTROL_TOKEN",
    "IBEX_KEY_PREFIX",
    "IBEX_AGENT_ID",
    "IBEX_ORG_ID",
    "IBEX_REST_LISTEN",
    "IBEX_REDIS_REST_TOKEN",
    "IBEX_REDIS_REST_TOKEN_FILE",
    "IBEX_REDIS_REST_ADMIN_TOKEN",
    "IBEX_REDIS_REST_ADMIN_TOKEN_FILE",
    "IBEX_REST_MAX_BODY_BYTES",
    "IBEX_REST_MAX_PIPELINE_COMMANDS",
    "IBEX_REST_MAX_COMMAND_ARGS",
    "IBEX_REST_MAX_REQUEST_ARGS",
    "IBEX_REST_ALLOW_ANY_SCRIPT",
    "IBEX_REST_REDIS_TIMEOUT_MS",
    "IBEX_REST_HEADER_TIMEOUT_MS",
    "IBEX_REST_IDLE_TIMEOUT_MS",
    "IBEX_REST_BODY_TIMEOUT_MS",
    "IBEX_REST_MAX_CONNECTIONS",
    "IBEX_REST_SHUTDOWN_GRACE_MS",
    "IBEX_REDIS_CA_FILE",
    "IBEX_VERSION_ID",
];

/// A command for the companion binary with a clean environment and debug logs.
pub fn companion_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "debug");
    for var in COMPANION_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A spawned companion that is killed if the test fails before stopping it
/// (a panicking test must not leave a server behind).
pub struct Spawned(pub Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the companion binary to completion.
pub fn companion(args: &[&str]) -> std::process::Output {
    companion_cmd(args).output().unwrap()
}

/// Applies the migrations through the library.
pub async fn migrate(url: &str) {
    let mut client = ibex_companion::db::connect(url, Duration::from_secs(5))
        .await
        .unwrap();
    ibex_companion::migrate::run(&mut client).await.unwrap();
}

// ---------------------------------------------------------------- raw HTTP/1.1

/// Reads one response on `s`: status, lower-cased head, body (none for an
/// answer to HEAD, whatever its Content-Length says).
pub fn read_response(s: &mut std::net::TcpStream, head_only: bool) -> (u16, String, Vec<u8>) {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec())
        .unwrap()
        .to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    if head_only {
        return (status, head, Vec::new());
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (status, head, buf[head_end..head_end + len].to_vec())
}

/// Writes a raw HTTP/1.1 request on `s` and reads its one response.
pub fn exchange(s: &mut std::net::TcpStream, raw: &[u8]) -> (u16, String, Vec<u8>) {
    use std::io::Write;
    s.write_all(raw).unwrap();
    read_response(s, raw.starts_with(b"HEAD "))
}

/// Runs the `openssl` CLI in `dir` (test certificates); fails the test on error.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA (`{name}.crt`, `{name}.key`) in `dir`; returns the certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=ibex test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.crt"))
}

/// A server certificate (`server.crt`, `server.key`) in `dir` for common name `cn`
/// and `subjectAltName` `san` (`IP:…` or `DNS:…`), signed by `ca.crt` there.
pub fn server_cert(dir: &Path, cn: &str, san: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}
