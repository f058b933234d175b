//! The subscriber's counters and its one gauge, and their Prometheus text for
//! `/metrics`. Names and help texts are part of the operator's interface: keep
//! them stable.
//!
//! Only counts live here: never a key, an agent id, directive text or a token.

use crate::metrics::{Counter, Exposition, Gauge};

/// Counters of the subscriber, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct SubscribeMetrics {
    /// Update messages for a valid agent id.
    pub messages_update: Counter,
    /// Flush messages.
    pub messages_flush: Counter,
    /// Key update messages for a valid key hash.
    pub messages_key: Counter,
    /// Messages ignored (agent id not a UUID, key hash malformed).
    pub messages_invalid: Counter,
    /// Control POSTs answered with 2xx.
    pub invalidations_sent: Counter,
    /// Targets (Redis delete or control POST) given up on.
    pub invalidation_failures: Counter,
    /// Successful Redis invalidations (per agent) and flush sweeps.
    pub redis_deletes: Counter,
    /// Connections to Redis after the first one.
    pub reconnects: Counter,
    /// Full flushes started (after connects and for flush messages).
    pub full_flushes: Counter,
    /// Liveness PINGs answered on the subscription.
    pub pings: Counter,
    /// Key invalidations a control listener did not know (404 or 400: a filter
    /// from before keys), replaced by a full invalidation of that listener.
    pub key_fallbacks: Counter,
    /// 1 while subscribed to Redis.
    pub connected: Gauge,
}

impl SubscribeMetrics {
    /// Prometheus text of all subscriber metrics.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "ibex_subscribe_messages_total",
            "counter",
            "Pub/sub messages received, by kind.",
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "update")],
            self.messages_update.get(),
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "flush")],
            self.messages_flush.get(),
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "invalid")],
            self.messages_invalid.get(),
        )
        .sample(
            "ibex_subscribe_messages_total",
            &[("kind", "key")],
            self.messages_key.get(),
        )
        .counter(
            "ibex_subscribe_invalidations_sent_total",
            "Invalidation POSTs acknowledged by a control endpoint.",
            &self.invalidations_sent,
        )
        .counter(
            "ibex_subscribe_invalidation_failures_total",
            "Invalidation targets (Redis or control endpoint) given up on after retries.",
            &self.invalidation_failures,
        )
        .counter(
            "ibex_subscribe_redis_deletes_total",
            "Redis invalidations done (a DEL or tombstone per agent update, one per flush sweep).",
            &self.redis_deletes,
        )
        .counter(
            "ibex_subscribe_reconnects_total",
            "Connections to Redis after the first one.",
            &self.reconnects,
        )
        .counter(
            "ibex_subscribe_full_flushes_total",
            "Full flushes started, after each connect and for each flush message.",
            &self.full_flushes,
        )
        .counter(
            "ibex_subscribe_pings_total",
            "Liveness PINGs answered on the Redis subscription.",
            &self.pings,
        )
        .family(
            "ibex_subscribe_control_fallbacks_total",
            "counter",
            "Invalidations a control endpoint did not know (404 or 400), replaced by a full invalidation of that endpoint, by kind.",
        )
        .sample(
            "ibex_subscribe_control_fallbacks_total",
            &[("kind", "key")],
            self.key_fallbacks.get(),
        )
        .gauge(
            "ibex_subscribe_connected",
            "1 while subscribed to Redis, else 0.",
            &self.connected,
        );
        e.finish()
    }
}
