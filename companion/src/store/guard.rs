//! What lets the store share a query that was already sent: Redis shows no
//! invalidation of the agent since.
//!
//! A lookup may come from a request made after a directive update, so it must not
//! get a snapshot taken before that update. Every update reaches an Envoy only after
//! the subscriber wrote its agent's tombstone (or, for "invalidate all", the flush
//! marker) into Redis, where it stays for the tombstone's life (10 s by default), and
//! no write-back replaces it meanwhile (they are conditional). So when, after a
//! lookup arrived, Redis holds neither the agent's tombstone nor the flush marker, no
//! invalidation of that agent was published between the shared query's snapshot and
//! the lookup, provided the query is younger than a tombstone's life: the sharing
//! window plus the lookup deadline must stay below it (`--share-window-ms`).
//!
//! A fleet's Envoys each miss L1 and Redis for a cold agent and reach the store at
//! slightly different moments, before the first answer is written back to Redis;
//! this is what keeps that to one Postgres query per agent. It only reads Redis (a
//! `GET` of the agent's key and an `EXISTS` of the marker); any failure or doubt
//! means "not clean": the lookup runs its own query, as it would without Redis.
//!
//! Needs the subscriber's tombstones: with `--tombstone-ttl 0` (invalidation by
//! `DEL`), an update leaves no trace and the store must run without a guard.

use std::time::Duration;

use ibex_wire::{flush_marker_for, read_directive_value, redis_key, DirectiveValue};
use redis::Value;
use uuid::Uuid;

use crate::metrics::Counter;
use crate::rest::link::RedisLink;

/// Default of `--share-window-ms`: how long after its answer a query may still be
/// shared. Covers a filter's write-back (sent on its root's 50 ms tick) landing in
/// Redis and the lookups that missed Redis just before it; with the store's longest
/// lookup deadline it stays well below the subscriber's 10 s tombstone life.
pub const DEFAULT_SHARE_WINDOW: Duration = Duration::from_secs(3);

/// Default bound of the guard's Redis read: a slow Redis costs a lookup this much
/// at most, then it runs its own query.
pub const DEFAULT_GUARD_TIMEOUT: Duration = Duration::from_millis(50);

/// Reads Redis for traces of an invalidation (see the module documentation).
pub struct InvalidationGuard {
    link: RedisLink,
    key_prefix: String,
    resets: Counter,
}

impl std::fmt::Debug for InvalidationGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationGuard")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl InvalidationGuard {
    /// A guard over `client`, for directive keys `{key_prefix}{agent}` (the
    /// filter's `redis.key_prefix`, the subscriber's `--key-prefix`), each read
    /// bounded by `timeout`. Does not connect yet.
    pub fn new(client: redis::Client, key_prefix: &str, timeout: Duration) -> Self {
        Self {
            link: RedisLink::new(client, timeout),
            key_prefix: key_prefix.to_owned(),
            resets: Counter::default(),
        }
    }

    /// True when Redis holds neither `agent`'s tombstone nor the flush marker.
    /// Reads only; never logs a value.
    pub async fn clean(&self, agent: Uuid) -> bool {
        // The flush marker of the entry's own slot (a flush sets one in every slot):
        // both keys in one slot, so the pipeline is one node's on a cluster too.
        let key = redis_key(&self.key_prefix, agent);
        let marker = flush_marker_for(&self.key_prefix, &key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("EXISTS").arg(&marker);
        match self.link.query_pipeline(&pipe, 2, &self.resets).await {
            Ok(replies) => match replies.as_slice() {
                [value, Value::Int(0)] => match value {
                    Value::Nil => true,
                    Value::BulkString(bytes) => {
                        !matches!(read_directive_value(bytes), DirectiveValue::Tombstone)
                    }
                    _ => false,
                },
                _ => false,
            },
            Err(e) => {
                tracing::debug!(error = %e, "invalidation guard: redis unreadable, not sharing");
                false
            }
        }
    }
}
