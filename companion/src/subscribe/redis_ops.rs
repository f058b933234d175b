//! The subscriber's Redis side: the subscription itself, and the commands that
//! invalidate L2 — one agent's (or one API key's `agent_key:…`) key (a tombstone
//! or a `DEL`) and the flush sweep (the per-slot flush markers, then every
//! `{prefix}*` key; likewise for `agent_key:*`). Each function is one attempt;
//! the caller retries.
//!
//! It runs on one Redis server or on a Redis Cluster ([`Link`]) with the same
//! commands, none of which names two keys of different slots: a tombstone is one
//! `SET`, the markers are one `SET` each (pipelined to the master that owns their
//! slot), the sweep `SCAN`s every master and deletes each key with its own `DEL`.
//! Pub/sub needs no routing: a cluster delivers a `PUBLISH` to the subscribers of
//! every node, so the subscription is one connection to one seed node.
//!
//! Key names, channels, the tombstone and the markers come from `ibex-wire`. It
//! never reads a value (directive text) and logs only counts.

use std::time::Duration;

use ibex_wire::TOMBSTONE;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use super::retry::Attempt;

/// Escapes Redis glob metacharacters so the prefix matches literally in SCAN.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The connection invalidations run on: one Redis server, or a Redis Cluster
/// (commands routed by key slot, node-wide ones sent to each master). Cheap to
/// clone; clones share the connection.
#[derive(Clone)]
pub enum Link {
    /// One server (or whatever answers at one address).
    Single(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// A master and the slot ranges it serves; `addr` is `None` on a single server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Master {
    addr: Option<(String, u16)>,
    slots: Vec<(u16, u16)>,
}

/// Commands per pipeline of markers: bounds one write (about 400 KiB) and one
/// reply, in few round trips (a flush writes 32768 markers and its L1
/// invalidation waits for them).
const PIPELINE_CHUNK: usize = 8192;

/// `COUNT` of each `SCAN` of the sweep: the markers alone are 32768 keys, so a
/// small count would make a flush hundreds of round trips; one call of this
/// size holds Redis about a millisecond.
const SCAN_COUNT: usize = 10_000;

impl Link {
    async fn query(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd).await,
            Link::Cluster(c) => c.req_packed_command(cmd).await,
        }
        .and_then(server_error)
    }

    /// The masters and their slots: `CLUSTER SLOTS` on a cluster; on one
    /// server, itself with every slot.
    async fn masters(&mut self) -> redis::RedisResult<Vec<Master>> {
        match self {
            Link::Single(_) => Ok(vec![Master {
                addr: None,
                slots: vec![(0, ibex_wire::SLOTS - 1)],
            }]),
            Link::Cluster(c) => {
                let reply = c
                    .route_command(
                        &redis::cmd("CLUSTER").arg("SLOTS").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                parse_cluster_slots(&reply)
            }
        }
    }

    /// Runs `cmd` on `master` (a node-wide command such as `SCAN`).
    async fn on_master(&mut self, master: &Master, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match (self, &master.addr) {
            (Link::Cluster(c), Some((host, port))) => c
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    }),
                )
                .await
                .and_then(server_error),
            (link, _) => link.query(cmd).await,
        }
    }

    /// Sends `pipe` (`count` commands, each on one key of a slot `master`
    /// serves) to `master` in one write; any error reply fails the attempt.
    async fn pipeline_on(
        &mut self,
        master: &Master,
        pipe: &redis::Pipeline,
        count: usize,
    ) -> redis::RedisResult<()> {
        let values = match (self, &master.addr) {
            (Link::Cluster(c), Some((host, port))) => {
                c.route_pipeline(
                    pipe,
                    0,
                    count,
                    SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    },
                )
                .await?
            }
            (Link::Cluster(c), None) => c.req_packed_commands(pipe, 0, count).await?,
            (Link::Single(c), _) => c.req_packed_commands(pipe, 0, count).await?,
        };
        values
            .into_iter()
            .try_for_each(|v| server_error(v).map(drop))
    }
}

/// An error reply as an error (a `MOVED` during a resharding, a `READONLY`…),
/// so the attempt fails and is retried.
fn server_error(v: Value) -> redis::RedisResult<Value> {
    match v {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

/// Reads `CLUSTER SLOTS`: `[[start, end, [host, port, …], replicas…], …]`,
/// the master of each range first. Ranges of one master are gathered.
fn parse_cluster_slots(reply: &Value) -> redis::RedisResult<Vec<Master>> {
    let bad = || {
        redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected CLUSTER SLOTS reply",
        ))
    };
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let mut out: Vec<Master> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(bad());
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return Err(bad());
        };
        let host = match node.first() {
            Some(Value::BulkString(h)) => String::from_utf8(h.clone()).map_err(|_| bad())?,
            Some(Value::SimpleString(h)) => h.clone(),
            _ => return Err(bad()),
        };
        let Some(Value::Int(port)) = node.get(1) else {
            return Err(bad());
        };
        let slot = |n: i64| u16::try_from(n).ok().filter(|s| *s < ibex_wire::SLOTS);
        let (Some(start), Some(end), Ok(port)) = (slot(*start), slot(*end), u16::try_from(*port))
        else {
            return Err(bad());
        };
        let addr = Some((host, port));
        match out.iter_mut().find(|m| m.addr == addr) {
            Some(m) => m.slots.push((start, end)),
            None => out.push(Master {
                addr,
                slots: vec![(start, end)],
            }),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Subscribes to every agent's and every key's update channel and to the flush
/// channel on `pubsub_client`, and opens the connection the invalidations run
/// on (`cluster`'s when given, else one to the same server); `timeout` bounds
/// connecting and every answer.
pub(super) async fn connect(
    pubsub_client: &redis::Client,
    cluster: Option<&redis::cluster::ClusterClient>,
    timeout: Duration,
) -> redis::RedisResult<(PubSub, Link)> {
    let timed_out = || redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out"));
    let mut pubsub = tokio::time::timeout(timeout, pubsub_client.get_async_pubsub())
        .await
        .map_err(|_| timed_out())??;
    pubsub
        .psubscribe(ibex_wire::UPDATES_CHANNEL_PATTERN)
        .await?;
    pubsub
        .psubscribe(ibex_wire::KEY_UPDATES_CHANNEL_PATTERN)
        .await?;
    pubsub.subscribe(ibex_wire::FLUSH_CHANNEL).await?;
    let link = match cluster {
        Some(cluster) => Link::Cluster(
            tokio::time::timeout(timeout, cluster.get_async_connection())
                .await
                .map_err(|_| timed_out())??,
        ),
        None => {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout);
            Link::Single(
                pubsub_client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            )
        }
    };
    Ok((pubsub, link))
}

/// One agent's key: overwritten by a tombstone living `tombstone_ttl`, or deleted
/// when that is `None`.
pub(super) async fn invalidate_key(
    mut link: Link,
    key: &str,
    tombstone_ttl: Option<Duration>,
) -> Result<(), Attempt> {
    let cmd = match tombstone_ttl {
        Some(ttl) => set_with_ttl(key, TOMBSTONE, ttl),
        None => {
            let mut c = redis::cmd("DEL");
            c.arg(key);
            c
        }
    };
    link.query(&cmd)
        .await
        .map(|_| ())
        .map_err(|e| Attempt::Transient(e.to_string()))
}

/// The flush sweep of every key under each of `prefixes`, master by master:
/// with a `tombstone_ttl`, first the flush markers of every slot the master
/// serves (so no write-back lands between its sweep and its markers), then a
/// `DEL` of every key under the prefixes except the markers (of any of them).
pub(super) async fn sweep(
    mut link: Link,
    prefixes: &[&str],
    tombstone_ttl: Option<Duration>,
) -> Result<(), Attempt> {
    let transient = |e: redis::RedisError| Attempt::Transient(e.to_string());
    if let Some(ttl) = tombstone_ttl {
        // The single marker filters from before per-slot markers check
        // (`{prefix}__flush__`, one key: routed like any other), so they stay
        // guarded while a fleet is upgraded.
        for prefix in prefixes {
            let legacy = format!("{prefix}{}", ibex_wire::FLUSH_MARKER_SUFFIX);
            link.query(&set_with_ttl(&legacy, TOMBSTONE, ttl))
                .await
                .map_err(transient)?;
        }
    }
    let masters = link.masters().await.map_err(transient)?;
    let mut deleted = 0u64;
    for master in &masters {
        if let Some(ttl) = tombstone_ttl {
            set_markers(&mut link, master, prefixes, ttl)
                .await
                .map_err(transient)?;
        }
        for prefix in prefixes {
            deleted += delete_matching(&mut link, master, prefix, prefixes)
                .await
                .map_err(transient)?;
        }
    }
    tracing::debug!(deleted, masters = masters.len(), "redis keys flushed");
    Ok(())
}

/// `SET key value EX ttl` (at least one second: Redis has no shorter `EX`).
fn set_with_ttl(key: &str, value: &str, ttl: Duration) -> redis::Cmd {
    let mut c = redis::cmd("SET");
    c.arg(key).arg(value).arg("EX").arg(ttl.as_secs().max(1));
    c
}

/// Sets the flush marker of every slot `master` serves, for every prefix, in
/// pipelines of [`PIPELINE_CHUNK`] single-key `SET`s.
async fn set_markers(
    link: &mut Link,
    master: &Master,
    prefixes: &[&str],
    ttl: Duration,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    let mut count = 0usize;
    for &(start, end) in &master.slots {
        for slot in start..=end {
            for prefix in prefixes {
                pipe.add_command(set_with_ttl(
                    &ibex_wire::flush_marker_key(prefix, slot),
                    TOMBSTONE,
                    ttl,
                ));
                count += 1;
                if count == PIPELINE_CHUNK {
                    link.pipeline_on(master, &pipe, count).await?;
                    pipe = redis::pipe();
                    count = 0;
                }
            }
        }
    }
    if count > 0 {
        link.pipeline_on(master, &pipe, count).await?;
    }
    Ok(())
}

/// SCANs `master` for keys under `prefix` and deletes every one that is no
/// flush marker under any of `prefixes`, one `DEL` per key (keys of one node
/// may lie in different slots); returns how many were deleted. Keys whose name
/// goes on with `_` after the prefix are the markers' namespace and are not
/// swept (no entry is named so: agent ids and key hashes are hex).
async fn delete_matching(
    link: &mut Link,
    master: &Master,
    prefix: &str,
    prefixes: &[&str],
) -> redis::RedisResult<u64> {
    // Not the markers (`{prefix}__flush__…`, spared anyway): no entry's name
    // starts with `_`, so SCAN need not send them back.
    let pattern = format!("{}[^_]*", glob_escape(prefix));
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let reply = link
            .on_master(
                master,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT),
            )
            .await?;
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(&reply)?;
        let mut pipe = redis::pipe();
        let mut count = 0usize;
        for key in keys.iter().filter(|k| {
            !prefixes
                .iter()
                .any(|p| ibex_wire::is_flush_marker(p, k.as_bytes()))
        }) {
            pipe.cmd("DEL").arg(key);
            count += 1;
        }
        if count > 0 {
            link.pipeline_on(master, &pipe, count).await?;
            deleted += count as u64;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_slots_are_read_per_master() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                node("127.0.0.1", 7000),
            ]),
        ]);
        let masters = parse_cluster_slots(&reply).unwrap();
        assert_eq!(
            masters,
            [
                Master {
                    addr: Some(("127.0.0.1".into(), 7000)),
                    slots: vec![(0, 5460), (10923, 16383)]
                },
                Master {
                    addr: Some(("127.0.0.1".into(), 7001)),
                    slots: vec![(5461, 10922)]
                },
            ]
        );
        assert!(parse_cluster_slots(&Value::Array(vec![])).is_err());
        let out_of_range = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16384),
            node("h", 1),
        ])]);
        assert!(parse_cluster_slots(&out_of_range).is_err());
    }

    #[test]
    fn glob_escape_makes_prefix_literal() {
        assert_eq!(glob_escape("directive:"), "directive:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
