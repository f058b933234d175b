//! The store's counters and latency histograms, and their Prometheus text for
//! `/metrics`. Names and help texts are part of the operator's interface: keep them
//! stable. Labels are fixed strings (results); never an agent id or a key hash.

use crate::metrics::{Counter, Exposition, Histogram, LATENCY_BUCKETS};

/// Counters of the store, exported on `/metrics`.
#[derive(Debug)]
pub struct StoreMetrics {
    /// Lookups answered with content.
    pub found: Counter,
    /// Lookups answered with `content: null`.
    pub none: Counter,
    /// Lookups answered with 503.
    pub error: Counter,
    /// Requests rejected before lookup (bad agent id).
    pub bad_requests: Counter,
    /// Lookups that joined a query for the same agent not yet sent.
    pub coalesced: Counter,
    /// Queries actually sent to Postgres.
    pub db_queries: Counter,
    /// Lookups that shared a query already sent (or just answered) after Redis
    /// showed no invalidation of the agent since they arrived.
    pub shared_late: Counter,
    /// Lookups that found such a query but Redis showed an invalidation (or could
    /// not be read): they ran their own.
    pub share_refused: Counter,
    /// End-to-end lookup latency, by request.
    pub latency: Histogram,
    /// Key lookups of an active key.
    pub key_found: Counter,
    /// Key lookups answered with `agent_id: null` (unknown or revoked).
    pub key_none: Counter,
    /// Key lookups answered with 503.
    pub key_error: Counter,
    /// Key lookups rejected before lookup (malformed hash).
    pub key_bad_requests: Counter,
    /// Key lookups that joined a query for the same key not yet sent.
    pub key_coalesced: Counter,
    /// Key queries actually sent to Postgres.
    pub key_db_queries: Counter,
    /// End-to-end key lookup latency, by request.
    pub key_latency: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            found: Counter::default(),
            none: Counter::default(),
            error: Counter::default(),
            bad_requests: Counter::default(),
            coalesced: Counter::default(),
            db_queries: Counter::default(),
            shared_late: Counter::default(),
            share_refused: Counter::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            key_found: Counter::default(),
            key_none: Counter::default(),
            key_error: Counter::default(),
            key_bad_requests: Counter::default(),
            key_coalesced: Counter::default(),
            key_db_queries: Counter::default(),
            key_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl StoreMetrics {
    /// Prometheus text of all store metrics.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "ibex_store_lookups_total",
            "counter",
            "Directive lookups that reached the store with a valid agent id, by result.",
        )
        .sample(
            "ibex_store_lookups_total",
            &[("result", "found")],
            self.found.get(),
        )
        .sample(
            "ibex_store_lookups_total",
            &[("result", "none")],
            self.none.get(),
        )
        .sample(
            "ibex_store_lookups_total",
            &[("result", "error")],
            self.error.get(),
        )
        .counter(
            "ibex_store_bad_requests_total",
            "Lookups rejected because the agent id is not a UUID.",
            &self.bad_requests,
        )
        .counter(
            "ibex_store_coalesced_total",
            "Lookups that shared a query for the same agent that was waiting for a connection.",
            &self.coalesced,
        )
        .counter(
            "ibex_store_db_queries_total",
            "Resolution queries sent to Postgres.",
            &self.db_queries,
        )
        .counter(
            "ibex_store_shared_late_total",
            "Lookups that shared a query for the same agent already sent or just answered, Redis showing no invalidation since.",
            &self.shared_late,
        )
        .counter(
            "ibex_store_share_refused_total",
            "Lookups that found such a query but ran their own: Redis showed an invalidation or could not be read.",
            &self.share_refused,
        )
        .histogram(
            "ibex_store_lookup_seconds",
            "Lookup latency as seen by the handler.",
            &self.latency,
        );
        e.family(
            "ibex_store_key_lookups_total",
            "counter",
            "Gateway API key lookups that reached the store with a valid hash, by result.",
        )
        .sample(
            "ibex_store_key_lookups_total",
            &[("result", "found")],
            self.key_found.get(),
        )
        .sample(
            "ibex_store_key_lookups_total",
            &[("result", "none")],
            self.key_none.get(),
        )
        .sample(
            "ibex_store_key_lookups_total",
            &[("result", "error")],
            self.key_error.get(),
        )
        .counter(
            "ibex_store_key_bad_requests_total",
            "Key lookups rejected because the hash is not 64 lower-case hex characters.",
            &self.key_bad_requests,
        )
        .counter(
            "ibex_store_key_coalesced_total",
            "Key lookups that shared a query for the same key that was waiting for a connection.",
            &self.key_coalesced,
        )
        .counter(
            "ibex_store_key_db_queries_total",
            "Key resolution queries sent to Postgres.",
            &self.key_db_queries,
        )
        .histogram(
            "ibex_store_key_lookup_seconds",
            "Key lookup latency as seen by the handler.",
            &self.key_latency,
        );
        e.finish()
    }
}
