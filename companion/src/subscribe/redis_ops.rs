//! The subscriber's Redis side: the subscription itself, and the commands that
//! invalidate L2 — one agent's (or one API key's `agent_key:…`) key (a tombstone
//! or a `DEL`) and the flush sweep (the flush marker, then every `{prefix}*`
//! key; likewise for `agent_key:*`). Each function is one attempt;
//! the caller retries.
//!
//! Key names, channels, the tombstone and the marker come from `ibex-wire`. It
//! never reads a value (directive text) and logs only counts.

use std::time::Duration;

use ibex_wire::TOMBSTONE;
use redis::aio::{MultiplexedConnection, PubSub};

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

/// Subscribes to every agent's and every key's update channel and to the flush
/// channel, and opens
/// the connection the invalidations run on; `timeout` bounds connecting and
/// every answer.
pub(super) async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<(PubSub, MultiplexedConnection)> {
    let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out")))??;
    pubsub
        .psubscribe(ibex_wire::UPDATES_CHANNEL_PATTERN)
        .await?;
    pubsub
        .psubscribe(ibex_wire::KEY_UPDATES_CHANNEL_PATTERN)
        .await?;
    pubsub.subscribe(ibex_wire::FLUSH_CHANNEL).await?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    Ok((pubsub, conn))
}

/// One agent's key: overwritten by a tombstone living `tombstone_ttl`, or deleted
/// when that is `None`.
pub(super) async fn invalidate_key(
    mut conn: MultiplexedConnection,
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
    cmd.query_async::<redis::Value>(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| Attempt::Transient(e.to_string()))
}

/// The flush sweep: with a `tombstone_ttl`, first the flush marker `marker` (so
/// no write-back lands between the sweep and the marker), then a DEL of every key
/// matching `pattern` except the marker.
pub(super) async fn sweep(
    mut conn: MultiplexedConnection,
    pattern: &str,
    marker: &str,
    tombstone_ttl: Option<Duration>,
) -> Result<(), Attempt> {
    let keep = match tombstone_ttl {
        Some(ttl) => {
            set_with_ttl(marker, TOMBSTONE, ttl)
                .query_async::<redis::Value>(&mut conn)
                .await
                .map_err(|e| Attempt::Transient(e.to_string()))?;
            Some(marker)
        }
        None => None,
    };
    delete_matching(&mut conn, pattern, keep)
        .await
        .map(|n| tracing::debug!(deleted = n, "redis keys flushed"))
        .map_err(|e| Attempt::Transient(e.to_string()))
}

/// `SET key value EX ttl` (at least one second: Redis has no shorter `EX`).
fn set_with_ttl(key: &str, value: &str, ttl: Duration) -> redis::Cmd {
    let mut c = redis::cmd("SET");
    c.arg(key).arg(value).arg("EX").arg(ttl.as_secs().max(1));
    c
}

/// SCAN for `pattern` and DEL every match except `keep`; returns how many
/// were deleted.
async fn delete_matching(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    keep: Option<&str>,
) -> redis::RedisResult<u64> {
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|k| Some(k.as_str()) != keep)
            .collect();
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(conn).await?;
            deleted += n;
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
    fn glob_escape_makes_prefix_literal() {
        assert_eq!(glob_escape("directive:"), "directive:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
