//! ibex-directive: an Envoy proxy-wasm filter that puts each agent's current
//! directive (a system prompt kept in Postgres) into every LLM request.
//!
//! The crate is a pure core plus a thin host layer:
//! - [`config`], [`agent`], [`entry`], [`escape`], [`json`], [`inject`], [`tiers`],
//!   [`reply`] and [`flow`] are plain Rust, unit-tested natively with `cargo test`;
//! - [`host::Host`] is the one seam to Envoy: shared data with CAS, callouts, the
//!   request body and headers, local replies, the clock and counters;
//! - `envoy` (wasm32 only) exports the proxy-wasm callbacks, maps them to
//!   [`flow::Event`]s and implements the trait with `abi`'s host calls (our own
//!   ABI layer, not the SDK). Native builds never link host calls.
//!
//! Nothing in this crate may log directive text, at any level.

pub mod agent;
pub mod apikey;
pub mod audit;
pub mod breaker;
pub mod config;
pub mod control;
pub mod entry;
pub mod escape;
pub mod flow;
pub mod host;
pub mod hot;
pub mod idmap;
pub mod inject;
pub mod json;
pub mod metrics;
pub mod path;
pub mod reply;
pub mod tiers;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod envoy;
