//! `ibex-companion`: the native side of ibex-directive.
//!
//! The Envoy filter resolves each agent's directive through three levels; this
//! crate provides the pieces that live outside Envoy:
//!
//! - [`store`]: the read-only HTTP API over Postgres that the filter calls on an
//!   L1/L2 miss (SPEC §4).
//! - [`subscribe`]: turns `PUBLISH ibex:directive:updates:{agent}` into a Redis
//!   `DEL` plus a POST to every Envoy control listener.
//! - [`admin`]: `set-directive`, `clear-directive` and `flush` for operators and
//!   tests.
//! - [`migrate`]: the embedded schema migrations.
//!
//! Privacy rule for the whole crate: directive content is never logged, never
//! put into an error message and never printed by a `Debug` impl. Content
//! travels only inside [`DirectiveText`], whose `Debug` redacts it.

pub mod admin;
pub mod cli;
pub mod db;
pub mod error;
pub mod metrics;
pub mod migrate;
pub mod shutdown;
pub mod store;
pub mod subscribe;
pub mod telemetry;
mod text;

pub use error::{DbFailure, Error};
pub use text::DirectiveText;

/// Result type used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Redis channel an update for one agent is published on (suffix: agent id).
pub const UPDATES_CHANNEL_PREFIX: &str = "ibex:directive:updates:";

/// Redis channel that invalidates every cached directive.
pub const FLUSH_CHANNEL: &str = "ibex:directive:flush";

/// Channel name for an update of `agent_id`.
pub fn updates_channel(agent_id: &uuid::Uuid) -> String {
    format!("{UPDATES_CHANNEL_PREFIX}{}", agent_id.hyphenated())
}
