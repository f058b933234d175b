//! Postgres connection setup: the store's read-only pool and the single
//! read-write connection the admin commands and migrations use.
//!
//! The store pool must never be able to write, whatever role the URL names:
//! every connection it opens starts with `default_transaction_read_only = on`.
//! Nothing here logs the connection string (it may hold a password).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::{DbFailure, Error, Result};

/// Tuning for the store's read-only pool.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Maximum open connections.
    pub max_size: usize,
    /// Longest wait for a free connection, and for opening a new one.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every statement on the pool.
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_size: 16,
            acquire_timeout: Duration::from_millis(250),
            statement_timeout: Duration::from_millis(400),
        }
    }
}

/// Parses a libpq-style URL or key/value string without echoing it on error.
pub fn parse_config(database_url: &str) -> Result<tokio_postgres::Config> {
    database_url
        .parse::<tokio_postgres::Config>()
        // The parse error can quote the URL, password included: drop it.
        .map_err(|_| Error::Config("DATABASE_URL is not a valid Postgres connection string".into()))
}

/// Startup options that make a session read-only and bounded in time.
///
/// Appended after any `options` already in the URL so that ours win: for a
/// repeated `-c name=value` the server keeps the last one.
fn read_only_options(existing: Option<&str>, statement_timeout: Duration) -> String {
    let ours = format!(
        "-c default_transaction_read_only=on -c statement_timeout={}",
        statement_timeout.as_millis().max(1)
    );
    match existing {
        Some(e) if !e.trim().is_empty() => format!("{e} {ours}"),
        _ => ours,
    }
}

/// Builds the store's read-only pool. Connections open lazily, so this
/// succeeds while Postgres is down and the store starts anyway (it answers 503
/// until the database is back).
pub fn read_only_pool(database_url: &str, settings: &PoolSettings) -> Result<Pool> {
    let mut cfg = parse_config(database_url)?;
    let options = read_only_options(cfg.get_options(), settings.statement_timeout);
    cfg.options(options);
    cfg.application_name("ibex-companion-store");
    cfg.connect_timeout(settings.acquire_timeout);
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            // A closed connection is detected without a round trip; a broken
            // one surfaces as a query error and is dropped then.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.max_size.max(1))
        .wait_timeout(Some(settings.acquire_timeout))
        .create_timeout(Some(settings.acquire_timeout))
        .recycle_timeout(Some(settings.acquire_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Config(format!("cannot build the database pool: {e}")))
}

/// Opens one read-write connection for admin commands and migrations; its
/// driver task runs in the background until the client is dropped.
pub async fn connect(database_url: &str, timeout: Duration) -> Result<tokio_postgres::Client> {
    let mut cfg = parse_config(database_url)?;
    cfg.application_name("ibex-companion-admin");
    cfg.connect_timeout(timeout);
    let (client, connection) = cfg.connect(NoTls).await.map_err(DbFailure::from)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %DbFailure::from(e), "admin database connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_options_append_after_existing() {
        let o = read_only_options(Some("-c search_path=x"), Duration::from_millis(400));
        assert_eq!(
            o,
            "-c search_path=x -c default_transaction_read_only=on -c statement_timeout=400"
        );
        let o = read_only_options(None, Duration::from_millis(0));
        assert_eq!(
            o,
            "-c default_transaction_read_only=on -c statement_timeout=1"
        );
    }

    #[test]
    fn bad_url_error_does_not_echo_it() {
        let err = parse_config("postgres://u:hunter2@[bad").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
