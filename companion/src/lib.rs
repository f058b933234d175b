//! `ibex-companion`: the native side of ibex-directive.
//!
//! The Envoy filter resolves each agent's directive through three levels; this
//! crate provides the pieces that live outside Envoy:
//!
//! - [`store`]: the read-only HTTP API over Postgres that the filter calls on an
//!   L1/L2 miss (SPEC §4).
//! - [`subscribe`]: turns `PUBLISH ibex:directive:updates:{agent}` into a Redis
//!   `DEL` plus a POST to every Envoy control listener.
//! - [`admin`]: `set-directive`, `clear-directive`, `history`, `activate` and
//!   `flush` for operators and tests; `issue-key`, `revoke-key` and `list-keys`
//!   for gateway API keys ([`keys`]: only their SHA-256 is ever stored,
//!   published or logged).
//! - [`migrate`]: the embedded schema migrations.
//! - [`db`], [`pg_tls`]: Postgres connections, plaintext or TLS by the URL's
//!   `sslmode`, against the webpki roots or a private CA.
//! - [`redis_conn`]: every Redis client's endpoint: `redis://`, or TLS
//!   `rediss://` against the webpki roots or a private CA.
//! - [`rest`]: an Upstash-compatible REST front of Redis (bearer token,
//!   allowlisted commands, one pooled connection), the filter's default L2
//!   front.
//!
//! Key, channel and path names, the tombstone, the flush marker and the JSON
//! error envelope are the wire contract shared with the filter: they come from
//! `ibex-wire`, never spelled here.
//!
//! Privacy rule for the whole crate: directive content is never logged, never
//! put into an error message and never printed by a `Debug` impl. Content
//! travels only inside [`DirectiveText`], whose `Debug` redacts it; secrets
//! (tokens, URLs with passwords) inside [`ibex_wire::Redacted`].

pub mod admin;
pub mod cli;
pub mod db;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod migrate;
pub mod pg_tls;
pub mod redis_conn;
pub mod rest;
pub mod shutdown;
pub mod store;
pub mod subscribe;
pub mod telemetry;
mod text;
pub mod trace;

pub use error::{DbFailure, Error};
pub use text::DirectiveText;

/// Result type used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
