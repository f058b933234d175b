//! The REST front's one Redis connection: a multiplexed
//! [`ConnectionManager`] shared by every request, made lazily so the front
//! starts (and answers 503) while Redis is down, and bounded in time so a slow
//! or absent Redis becomes a 503, never a hang.
//!
//! The manager reconnects by itself after the link drops (Redis killed,
//! restarted): the request that finds it broken fails and starts the reconnect,
//! later ones use the new connection. A request that finds the last reconnect
//! refused (Redis was still down) tries once more on the reconnect it starts:
//! a refused connection never carried the command, so nothing runs twice, and
//! the first request after Redis is back already succeeds. Two cases it does not cover are handled
//! here: a connection that never answers again (a partition, not a reset: only
//! timeouts, which the manager does not treat as a lost link) is replaced after
//! [`STALE_AFTER_TIMEOUTS`] timeouts in a row, and a manager whose reconnect
//! failed for a reason other than I/O (it would not retry) is replaced at once.
//!
//! On a Redis Cluster (`--redis-cluster`) the connection is redis-rs's cluster
//! connection instead, which sends each command to the master of its key's slot
//! (multi-key `DEL` split by slot), follows `MOVED`/`ASK` and reconnects by
//! itself. A pipeline is then sent command by command, concurrently, its
//! replies kept in order: a cluster pipeline must stay in one slot, an Upstash
//! pipeline need not (it is no transaction either way). Error replies stay
//! answers as on one server; cluster states (`CLUSTERDOWN`, a `MOVED` still
//! unresolved after the client's retries) are a failed link.
//!
//! What it must never do: log or return a command's arguments or replies (it
//! moves them only), or put Redis's connection error text into a client answer
//! (the caller logs it; the client gets a fixed message).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, Value};

use crate::metrics::Counter;

/// Timeouts in a row (no answer in between) after which the connection is
/// presumed dead and replaced.
pub const STALE_AFTER_TIMEOUTS: u32 = 3;

/// Why Redis gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFailure {
    /// No answer within the deadline (connecting included).
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or talking failed; the text is redis-rs's, which names the
    /// cause (refused, reset, TLS) and never an argument. For logs only.
    #[error("redis connection failed: {0}")]
    Connection(String),
}

/// Where the front's Redis is: one server, or a Redis Cluster.
#[derive(Clone)]
pub enum Backend {
    /// One server (`--redis-url`).
    Single(redis::Client),
    /// A Redis Cluster (`--redis-cluster`, seeds in `--redis-url`).
    Cluster(ClusterClient),
}

impl From<redis::Client> for Backend {
    fn from(client: redis::Client) -> Self {
        Backend::Single(client)
    }
}

impl From<ClusterClient> for Backend {
    fn from(client: ClusterClient) -> Self {
        Backend::Cluster(client)
    }
}

/// A connection of either kind; clones share it.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The cluster connection hands error replies back as errors; the ones a
/// command itself caused (`ERR …`, `WRONGTYPE`, `NOSCRIPT`, `CROSSSLOT` of an
/// operator's script) become the answer they are on one server. The rest
/// (`CLUSTERDOWN`, `MOVED` after the client's retries, I/O) stay failures.
fn as_reply(e: RedisError) -> Result<Value, RedisError> {
    let answer = matches!(
        e.kind(),
        ErrorKind::ResponseError
            | ErrorKind::ExtensionError
            | ErrorKind::NoScriptError
            | ErrorKind::ExecAbortError
            | ErrorKind::CrossSlot
    );
    let Some(code) = e.code().filter(|_| answer) else {
        return Err(e);
    };
    // redis-rs exports no constructor of an error reply: read one back from its
    // wire form (one line, as Redis sends it).
    let mut line = format!("-{code}");
    if let Some(detail) = e.detail() {
        line.push(' ');
        line.extend(
            detail
                .chars()
                .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
        );
    }
    line.push_str("\r\n");
    redis::parse_redis_value(line.as_bytes()).or(Err(e))
}

/// The shared connection and how it is made.
pub struct RedisLink {
    client: Backend,
    timeout: Duration,
    current: Mutex<Option<Conn>>,
    /// Held while a manager is being made, so a burst of requests during an
    /// outage makes one connection attempt at a time, not one each.
    connecting: tokio::sync::Mutex<()>,
    timeouts_in_a_row: AtomicU32,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the client: its connection info holds the URL's password.
        f.debug_struct("RedisLink")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// A link over `client` whose every command (connecting included) must
    /// answer within `timeout`. Does not connect yet.
    pub fn new(client: impl Into<Backend>, timeout: Duration) -> Self {
        Self {
            client: client.into(),
            timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            timeouts_in_a_row: AtomicU32::new(0),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        // A panic while holding this lock cannot leave the Option half-written.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config(&self) -> ConnectionManagerConfig {
        // No retries inside the manager: a failed (re)connect fails the request
        // that waits on it at once (503), and the next request tries again, so
        // the front is back as soon as Redis is, with no backoff sleep to sit out.
        ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(0)
    }

    async fn manager(&self) -> Result<Conn, RedisError> {
        if let Some(m) = self.slot().clone() {
            return Ok(m);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(m) = self.slot().clone() {
            return Ok(m);
        }
        let m = match &self.client {
            Backend::Single(client) => Conn::Single(
                ConnectionManager::new_with_config(client.clone(), self.config()).await?,
            ),
            Backend::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
        };
        *self.slot() = Some(m.clone());
        Ok(m)
    }

    /// Drops the shared manager: the next request makes a new connection.
    fn reset(&self, resets: &Counter) {
        if self.slot().take().is_some() {
            resets.inc();
        }
        self.timeouts_in_a_row.store(0, Ordering::Relaxed);
    }

    async fn bounded<T>(
        &self,
        resets: &Counter,
        work: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, LinkFailure> {
        let failure = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(v)) => {
                self.timeouts_in_a_row.store(0, Ordering::Relaxed);
                return Ok(v);
            }
            Err(_) => LinkFailure::Timeout(self.timeout),
            Ok(Err(e)) if e.is_timeout() => LinkFailure::Timeout(self.timeout),
            Ok(Err(e)) => {
                if !e.is_io_error() {
                    // The manager reconnects after I/O errors only; anything else
                    // (a handshake refused, a parse error) could leave it stuck.
                    self.reset(resets);
                }
                return Err(LinkFailure::Connection(e.to_string()));
            }
        };
        if self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= STALE_AFTER_TIMEOUTS {
            self.reset(resets);
        }
        Err(failure)
    }

    /// Sends one command; its reply may be an error reply
    /// ([`Value::ServerError`]), which is an answer, not a failure.
    pub async fn query(&self, cmd: &Cmd, resets: &Counter) -> Result<Value, LinkFailure> {
        self.bounded(resets, async {
            match self.manager().await? {
                Conn::Single(mut m) => match m.send_packed_command(cmd).await {
                    Err(e) if e.is_connection_refusal() => m.send_packed_command(cmd).await,
                    r => r,
                },
                Conn::Cluster(mut c) => c.req_packed_command(cmd).await.or_else(as_reply),
            }
        })
        .await
    }

    /// Sends `count` commands in one write (not a transaction) and returns every
    /// reply in order, error replies included.
    pub async fn query_pipeline(
        &self,
        pipe: &Pipeline,
        count: usize,
        resets: &Counter,
    ) -> Result<Vec<Value>, LinkFailure> {
        if let Conn::Cluster(c) = self.bounded(resets, self.manager()).await? {
            // One by one (concurrently): the commands may name keys of any slot.
            let replies = futures_util::future::join_all(pipe.cmd_iter().take(count).map(|cmd| {
                let mut c = c.clone();
                self.bounded(resets, async move {
                    c.req_packed_command(cmd).await.or_else(as_reply)
                })
            }))
            .await;
            return replies.into_iter().collect();
        }
        self.bounded(resets, async {
            match self.manager().await? {
                Conn::Single(mut m) => match m.send_packed_commands(pipe, 0, count).await {
                    Err(e) if e.is_connection_refusal() => {
                        m.send_packed_commands(pipe, 0, count).await
                    }
                    r => r,
                },
                Conn::Cluster(mut c) => c.req_packed_commands(pipe, 0, count).await,
            }
        })
        .await
    }

    /// Connects now if not connected yet (startup warm-up); failures are only
    /// logged, the next request tries again.
    pub async fn warm_up(&self, resets: &Counter) {
        match self.bounded(resets, self.manager()).await {
            Ok(_) => tracing::debug!("redis connected"),
            Err(e) => {
                tracing::warn!(error = %e, "redis not reachable yet; answering 503 until it is")
            }
        }
    }
}
