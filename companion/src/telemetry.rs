//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default
//! `info`).
//!
//! Whatever the level, no code path logs directive content; see the crate docs.
//! Records emitted through the `log` crate by dependencies are deliberately not
//! bridged (tracing-subscriber is built without `tracing-log`): tokio-postgres
//! logs statement parameters at debug level, and those parameters include
//! directive text when `set-directive` inserts a version.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
