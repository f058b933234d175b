//! The invalidation subscriber: keeps Redis (L2) and every Envoy's shared data
//! (L1) coherent with Postgres.
//!
//! For `ibex:directive:updates:{agent}` it deletes `{prefix}{agent}` from Redis
//! (or, in tombstone mode, overwrites it with a short-lived `"\0"` tombstone
//! that the filter's conditional write-back will not overwrite) first, so a
//! refill cannot read the old L2 entry, then POSTs
//! `/ibex/v1/invalidate/{agent}` to every control URL. For
//! `ibex:directive:flush`, and after every (re)connect to Redis — messages sent
//! while disconnected are lost — it sets the flush marker of every hash slot
//! (tombstone mode), deletes every other `{prefix}*` key on every master and
//! POSTs `/ibex/v1/invalidate` everywhere. One Redis or a Redis Cluster
//! (`--redis-cluster`): no command names keys of two slots (`redis_ops`). Every target is retried with exponential
//! backoff until a deadline, then counted as a failure.
//!
//! Gateway API keys (SPEC §3.1) go the same way: for
//! `ibex:agent_key:updates:{sha256hex}` (published by `revoke-key`) it tombstones
//! (or deletes) `agent_key:{sha256hex}`, then POSTs
//! `/ibex/v1/invalidate/key/{sha256hex}` everywhere; a control listener that
//! answers that path 404 or 400 (a filter from before keys) gets one
//! `/ibex/v1/invalidate` instead, with the same retries, and the key path is not
//! retried. A flush also sweeps every `agent_key:*` key (the markers
//! `agent_key:__flush__{<tag>}` set and spared, in tombstone mode). Only the key's SHA-256 is
//! ever seen here; it is logged at debug level at most.
//!
//! This file is the task: the loop that connects, `select!`s on messages, pings
//! and shutdown, and turns each message into an invalidation. Its seams, one
//! module each: `config` ([`SubscribeConfig`]), `metrics` ([`SubscribeMetrics`]),
//! `redis_ops` (the subscription, tombstones, the flush markers, DEL), `control`
//! (the POSTs to every Envoy control listener), `retry` ([`RetryPolicy`] and the
//! loop both of those use) and `endpoints` ([`app`]: health and metrics).
//!
//! It never reads directive content and must never log the control token or the
//! Redis URL.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use ibex_wire::Channel;

use crate::keys::KeySha256;
use crate::Result;

mod config;
mod control;
mod endpoints;
mod metrics;
mod redis_ops;
mod retry;

pub use config::{SubscribeConfig, DEFAULT_TOMBSTONE_TTL};
pub use endpoints::app;
pub use metrics::SubscribeMetrics;
pub use redis_ops::{glob_escape, Link};
pub use retry::RetryPolicy;

use control::ControlClient;
use retry::{with_retry, Attempt};

/// What a pub/sub message asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Invalidate one agent.
    Agent(Uuid),
    /// Invalidate everything.
    Flush,
    /// Invalidate one gateway API key's entries (it was revoked).
    Key(KeySha256),
    /// Not for us or malformed: count and ignore.
    Ignore,
}

/// Classifies a message by its channel name (payloads are ignored).
pub fn classify(channel: &str) -> Action {
    match ibex_wire::parse_channel(channel) {
        Some(Channel::Flush) => Action::Flush,
        Some(Channel::Update(id)) => Uuid::try_parse(id).map_or(Action::Ignore, Action::Agent),
        Some(Channel::Key(hash)) => KeySha256::parse(hash).map_or(Action::Ignore, Action::Key),
        None => Action::Ignore,
    }
}

/// Most invalidations that may be pending at once; beyond that they are
/// replaced by one full flush, which supersedes them all.
const MAX_PENDING: usize = 256;

/// How long in-flight invalidations may run after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The subscriber. Cheap to clone.
#[derive(Clone)]
pub struct Subscriber {
    config: Arc<SubscribeConfig>,
    metrics: Arc<SubscribeMetrics>,
    control: ControlClient,
    /// Where the subscription goes: the one server, or each seed of a
    /// cluster in turn (a cluster broadcasts every `PUBLISH` to every node).
    pubsub_clients: Arc<[redis::Client]>,
    /// The routing client of a Redis Cluster, for invalidations.
    cluster: Option<redis::cluster::ClusterClient>,
}

impl Subscriber {
    /// A subscriber for `config`.
    pub fn new(config: SubscribeConfig) -> Result<Self> {
        let pubsub_clients = config.redis.seed_clients()?.into();
        let timeout = link_timeout(&config);
        let cluster = if config.redis.is_cluster() {
            Some(config.redis.cluster_client(timeout)?)
        } else {
            None
        };
        Ok(Self {
            control: ControlClient::new(&config),
            config: Arc::new(config),
            metrics: Arc::new(SubscribeMetrics::default()),
            pubsub_clients,
            cluster,
        })
    }

    /// The subscriber's metrics.
    pub fn metrics(&self) -> &SubscribeMetrics {
        &self.metrics
    }

    /// One Redis invalidation with retries, counted as a delete or a failure.
    async fn redis_step<F, Fut>(&self, what: &str, op: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), Attempt>>,
    {
        let ok = with_retry(self.config.retry, what, op).await;
        if ok {
            self.metrics.redis_deletes.inc();
        } else {
            self.metrics.invalidation_failures.inc();
        }
        ok
    }

    /// Invalidates one agent: Redis key first (DEL or tombstone), then every
    /// Envoy.
    pub async fn invalidate_agent(&self, conn: Link, agent_id: Uuid) {
        let started = Instant::now();
        let key = ibex_wire::redis_key(&self.config.key_prefix, agent_id);
        let tombstone_ttl = self.config.tombstone_ttl;
        let what = if tombstone_ttl.is_some() {
            "redis tombstone"
        } else {
            "redis DEL"
        };
        self.redis_step(what, || {
            redis_ops::invalidate_key(conn.clone(), &key, tombstone_ttl)
        })
        .await;
        self.control
            .post_all(&ibex_wire::invalidate_agent_path(agent_id), &self.metrics)
            .await;
        tracing::debug!(agent_id = %agent_id, elapsed_us = started.elapsed().as_micros() as u64, "agent invalidated");
    }

    /// Invalidates one gateway API key: `agent_key:{sha256hex}` first (DEL or
    /// tombstone, exactly like a directive key), then every Envoy, on the key
    /// path (falling back to "invalidate all" where that path is unknown).
    pub async fn invalidate_key(&self, conn: Link, key: KeySha256) {
        let started = Instant::now();
        let hex = key.hex();
        let redis_key = ibex_wire::agent_key_redis_key(&hex);
        let tombstone_ttl = self.config.tombstone_ttl;
        let what = if tombstone_ttl.is_some() {
            "redis key tombstone"
        } else {
            "redis key DEL"
        };
        self.redis_step(what, || {
            redis_ops::invalidate_key(conn.clone(), &redis_key, tombstone_ttl)
        })
        .await;
        self.control
            .post_all_key(&ibex_wire::invalidate_key_path(&hex), &self.metrics)
            .await;
        tracing::debug!(key_sha256 = %hex, elapsed_us = started.elapsed().as_micros() as u64, "key invalidated");
    }

    /// Invalidates everything: every `{prefix}*` key and every `agent_key:*`
    /// key, on every master, then every Envoy. In tombstone mode the flush
    /// markers of every slot ([`ibex_wire::flush_marker_key`]) are set first
    /// (and spared), so no write-back lands between the sweep and the markers.
    pub async fn flush_all(&self, conn: Link) {
        let started = Instant::now();
        self.metrics.full_flushes.inc();
        let prefixes = [self.config.key_prefix.as_str(), ibex_wire::AGENT_KEY_PREFIX];
        let tombstone_ttl = self.config.tombstone_ttl;
        // One step (one count, one retry unit) for both prefixes, master by
        // master; markers of either prefix are spared by both sweeps, so a
        // prefix that also matches `agent_key:` cannot delete the key markers.
        self.redis_step("redis SCAN+DEL", || {
            redis_ops::sweep(conn.clone(), &prefixes, tombstone_ttl)
        })
        .await;
        self.control
            .post_all(ibex_wire::INVALIDATE_PATH, &self.metrics)
            .await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "full flush done"
        );
    }

    /// Bound of connecting to Redis and of each answer on the link (PINGs
    /// included): the control POST timeout, at least one second.
    fn link_timeout(&self) -> Duration {
        link_timeout(&self.config)
    }

    /// The subscriber loop: connect, subscribe, flush all, handle messages;
    /// reconnect with backoff when the link drops; return when `shutdown`
    /// turns true (or its sender is dropped).
    pub async fn run_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let mut first = true;
        let mut failures = 0u32;
        let mut attempts = 0usize;
        loop {
            // A failed attempt moves on to the next seed, so a cluster node that
            // is down does not keep the subscriber away (never empty:
            // `seed_clients` refuses a URL list without a node).
            let seed = &self.pubsub_clients[attempts % self.pubsub_clients.len()];
            let connected = tokio::select! {
                r = redis_ops::connect(seed, self.cluster.as_ref(), self.link_timeout()) => r,
                _ = wait_shutdown(&mut shutdown) => return,
            };
            let (pubsub, conn) = match connected {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    attempts = attempts.wrapping_add(1);
                    let delay = RetryPolicy {
                        initial: Duration::from_millis(50),
                        max: self.config.reconnect_max,
                        deadline: Duration::MAX,
                    }
                    .delay(failures);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot subscribe to redis");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = wait_shutdown(&mut shutdown) => return,
                    }
                }
            };
            failures = 0;
            if first {
                tracing::info!("subscribed to redis");
            } else {
                self.metrics.reconnects.inc();
                tracing::info!("re-subscribed to redis");
            }
            first = false;
            self.metrics.connected.set(1);
            let stop = self.session(pubsub, conn, &mut shutdown).await;
            self.metrics.connected.set(0);
            if stop {
                return;
            }
            tracing::warn!("redis subscription lost, reconnecting");
        }
    }

    /// One connected session. Returns true when shutdown was requested, false
    /// when the connection was lost.
    async fn session(
        &self,
        pubsub: redis::aio::PubSub,
        conn: Link,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut tasks = JoinSet::new();
        // Anything published while we were away is lost: start from scratch.
        self.spawn_flush(&mut tasks, &conn);
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.config.ping_interval,
            self.config.ping_interval,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ping_timeout = self.link_timeout();
        let lost = loop {
            tokio::select! {
                _ = wait_shutdown(shutdown) => break false,
                msg = stream.next() => match msg {
                    Some(msg) => self.dispatch(msg.get_channel_name(), &mut tasks, &conn),
                    None => break true,
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(ping_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => self.metrics.pings.inc(),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "redis ping failed");
                            break true;
                        }
                        Err(_) => {
                            tracing::warn!("redis ping timed out");
                            break true;
                        }
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        };
        if lost {
            // The flush that follows the reconnect supersedes these.
            tasks.abort_all();
            return false;
        }
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!(
                pending = tasks.len(),
                "shutdown: abandoning pending invalidations"
            );
            tasks.abort_all();
        }
        true
    }

    fn spawn_flush(&self, tasks: &mut JoinSet<()>, conn: &Link) {
        let this = self.clone();
        let conn = conn.clone();
        tasks.spawn(async move { this.flush_all(conn).await });
    }

    fn dispatch(&self, channel: &str, tasks: &mut JoinSet<()>, conn: &Link) {
        let action = classify(channel);
        match action {
            Action::Agent(_) => self.metrics.messages_update.inc(),
            Action::Flush => self.metrics.messages_flush.inc(),
            Action::Key(_) => self.metrics.messages_key.inc(),
            Action::Ignore => {
                self.metrics.messages_invalid.inc();
                tracing::debug!(
                    "ignoring message on a channel without a valid agent id or key hash"
                );
                return;
            }
        }
        if tasks.len() >= MAX_PENDING {
            tracing::warn!(
                pending = tasks.len(),
                "too many pending invalidations, replacing them with a full flush"
            );
            tasks.abort_all();
            self.spawn_flush(tasks, conn);
            return;
        }
        match action {
            Action::Agent(agent_id) => {
                tracing::debug!(agent_id = %agent_id, "update message");
                let this = self.clone();
                let conn = conn.clone();
                tasks.spawn(async move { this.invalidate_agent(conn, agent_id).await });
            }
            Action::Flush => {
                tracing::info!("flush message");
                self.spawn_flush(tasks, conn);
            }
            Action::Key(key) => {
                tracing::debug!(key_sha256 = %key, "key update message");
                let this = self.clone();
                let conn = conn.clone();
                tasks.spawn(async move { this.invalidate_key(conn, key).await });
            }
            Action::Ignore => {}
        }
    }
}

/// Bound of connecting to Redis and of each answer: the control POST timeout,
/// at least one second.
fn link_timeout(config: &SubscribeConfig) -> Duration {
    config.request_timeout.max(Duration::from_secs(1))
}

/// Resolves once `rx` holds true or its sender is gone.
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs the subscriber loop and, when `listener` is given, its HTTP server,
/// until `shutdown` resolves.
pub async fn run(
    subscriber: Subscriber,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    tracing::info!(control_urls = ?subscriber.config.control_urls, "subscriber starting");
    if subscriber.config.control_urls.is_empty() {
        tracing::warn!("no control URLs: only Redis keys will be invalidated");
    }
    let server = match listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "subscriber metrics listening");
            }
            let mut rx = rx.clone();
            let app = app(subscriber.clone());
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { wait_shutdown(&mut rx).await })
                    .await
            }))
        }
        None => None,
    };
    subscriber.run_loop(rx).await;
    if let Some(server) = server {
        match server.await {
            Ok(r) => r?,
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    tracing::info!("subscriber stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_channels() {
        let id = Uuid::new_v4();
        assert_eq!(
            classify(&format!("ibex:directive:updates:{id}")),
            Action::Agent(id)
        );
        assert_eq!(classify("ibex:directive:flush"), Action::Flush);
        assert_eq!(classify("ibex:directive:updates:nope"), Action::Ignore);
        assert_eq!(classify("ibex:directive:updates:"), Action::Ignore);
        assert_eq!(classify("other"), Action::Ignore);
        let key = KeySha256::of(b"ibex_test");
        assert_eq!(
            classify(&format!("ibex:agent_key:updates:{key}")),
            Action::Key(key)
        );
        assert_eq!(
            classify(&format!(
                "ibex:agent_key:updates:{}",
                key.hex().to_ascii_uppercase()
            )),
            Action::Ignore
        );
        assert_eq!(classify("ibex:agent_key:updates:"), Action::Ignore);
        assert_eq!(
            classify("ibex:agent_key:updates:ibex_a-key-by-mistake"),
            Action::Ignore
        );
    }
}
