//! Postgres connection setup: the store's read-only pool and the single
//! read-write connection the admin commands and migrations use.
//!
//! The store pool must never be able to write, whatever role the URL names:
//! every connection it opens starts with `default_transaction_read_only = on`.
//! Nothing here logs the connection string (it may hold a password).
//!
//! Both take a [`PgEndpoint`]: the connection string and, optionally, a
//! private CA (`--pg-ca-file`). The string's `sslmode` decides whether and how
//! TLS is used ([`crate::pg_tls`]); without one, or with `sslmode=disable`,
//! connections are plaintext as they always were.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use ibex_wire::Redacted;
use tokio_postgres::NoTls;

use crate::pg_tls::{parse_ca_pem, PgTls, SslMode};
use crate::{DbFailure, Error, Result};

/// A Postgres server to connect to: connection string and optional private
/// CA. Its `Debug` shows neither.
#[derive(Clone)]
pub struct PgEndpoint {
    url: Redacted<String>,
    ca_pem: Option<Arc<[u8]>>,
}

impl fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEndpoint")
            .field("url", &self.url)
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(|p| p.len()))
            .finish()
    }
}

impl PgEndpoint {
    /// An endpoint trusting the webpki roots (when its `sslmode` uses TLS).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: Redacted::new(url.into()),
            ca_pem: None,
        }
    }

    /// Trusts the certificates of `pem` (and only those). Refused when it
    /// holds no PEM certificate.
    pub fn with_ca_pem(mut self, pem: Vec<u8>) -> Result<Self> {
        parse_ca_pem(&pem)?;
        self.ca_pem = Some(pem.into());
        Ok(self)
    }

    /// [`PgEndpoint::with_ca_pem`] with the contents of `path`.
    pub fn with_ca_file(self, path: &Path) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the Postgres CA file {}: {e}",
                path.display()
            ))
        })?;
        self.with_ca_pem(pem)
    }

    /// The parsed configuration and, when the `sslmode` uses TLS, its
    /// connector. Refuses a CA file beside a mode without TLS (it would be
    /// silently ignored).
    pub fn config(&self) -> Result<(tokio_postgres::Config, Option<PgTls>)> {
        let (conn, mode) = SslMode::split(self.url.expose())?;
        let cfg = parse_config(&conn)?;
        match mode {
            Some(mode) if mode.uses_tls() => {
                Ok((cfg, Some(PgTls::new(mode, self.ca_pem.as_deref())?)))
            }
            _ if self.ca_pem.is_some() => Err(Error::Config(
                "a Postgres CA file is set but DATABASE_URL does not ask for TLS \
                 (add sslmode=verify-full)"
                    .into(),
            )),
            // disable, or no sslmode at all: plaintext as before (not
            // tokio-postgres's and libpq's default, `prefer`).
            _ => Ok((cfg, None)),
        }
    }
}

impl From<&str> for PgEndpoint {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl From<&String> for PgEndpoint {
    fn from(url: &String) -> Self {
        Self::new(url.as_str())
    }
}

impl From<String> for PgEndpoint {
    fn from(url: String) -> Self {
        Self::new(url)
    }
}

impl From<&PgEndpoint> for PgEndpoint {
    fn from(e: &PgEndpoint) -> Self {
        e.clone()
    }
}

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
pub fn read_only_pool(pg: impl Into<PgEndpoint>, settings: &PoolSettings) -> Result<Pool> {
    let (mut cfg, tls) = pg.into().config()?;
    let options = read_only_options(cfg.get_options(), settings.statement_timeout);
    cfg.options(options);
    cfg.application_name("ibex-companion-store");
    cfg.connect_timeout(settings.acquire_timeout);
    let manager_config = ManagerConfig {
        // A closed connection is detected without a round trip; a broken one
        // surfaces as a query error and is dropped then.
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls {
        Some(tls) => Manager::from_config(cfg, tls, manager_config),
        None => Manager::from_config(cfg, NoTls, manager_config),
    };
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
pub async fn connect(
    pg: impl Into<PgEndpoint>,
    timeout: Duration,
) -> Result<tokio_postgres::Client> {
    let (mut cfg, tls) = pg.into().config()?;
    cfg.application_name("ibex-companion-admin");
    cfg.connect_timeout(timeout);
    match tls {
        Some(tls) => {
            let (client, connection) = cfg.connect(tls).await.map_err(DbFailure::from)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
        None => {
            let (client, connection) = cfg.connect(NoTls).await.map_err(DbFailure::from)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
    }
}

/// Runs an admin connection's driver until the client is dropped.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::warn!(error = %DbFailure::from(e), "admin database connection ended");
    }
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
