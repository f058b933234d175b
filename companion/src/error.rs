//! The crate's error type and its mapping to HTTP responses.
//!
//! Messages here are written for logs and operators, so they must never carry
//! directive content or raw Postgres error text (a Postgres `DETAIL` such as
//! "Failing row contains (…)" can quote row values). Postgres failures are
//! reduced to their SQLSTATE or transport cause in [`DbFailure`]. Clients of the
//! HTTP API get only a fixed code and message per variant.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A sanitised Postgres failure: safe to log, cheap to clone (the store shares
/// one result among coalesced requests).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DbFailure {
    /// No pooled connection became available in time.
    #[error("timed out waiting for a database connection")]
    PoolTimeout,
    /// The query did not finish within its deadline.
    #[error("database query timed out")]
    QueryTimeout,
    /// The server answered with an error; only the SQLSTATE is kept.
    #[error("database error (sqlstate {0})")]
    Sql(String),
    /// Connecting or talking to the server failed (refused, closed, …).
    #[error("database connection failed: {0}")]
    Connection(String),
}

impl DbFailure {
    /// SQLSTATE of a server-side error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbFailure::Sql(code) => Some(code),
            _ => None,
        }
    }
}

impl From<tokio_postgres::Error> for DbFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            // Keep the code only: message and detail may quote values.
            return DbFailure::Sql(db.code().code().to_owned());
        }
        if let Some(code) = e.code() {
            return DbFailure::Sql(code.code().to_owned());
        }
        // Transport errors ("connection refused", "connection closed") carry
        // no row data, so their text and causes are safe and useful.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        DbFailure::Connection(text)
    }
}

impl From<deadpool_postgres::PoolError> for DbFailure {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Timeout(_) => DbFailure::PoolTimeout,
            PoolError::Backend(e) => e.into(),
            PoolError::Closed => DbFailure::Connection("pool closed".into()),
            PoolError::NoRuntimeSpecified => {
                DbFailure::Connection("pool has no runtime for timeouts".into())
            }
            PoolError::PostCreateHook(_) => {
                DbFailure::Connection("connection setup hook failed".into())
            }
        }
    }
}

/// Every error the companion reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An agent id that is not a UUID.
    #[error("invalid agent id")]
    InvalidAgentId,
    /// A key hash that is not 64 lower-case hex characters.
    #[error("invalid key sha256")]
    InvalidKeySha256,
    /// Postgres is unreachable, slow or failed.
    #[error(transparent)]
    Db(#[from] DbFailure),
    /// Redis is unreachable or failed.
    #[error("redis error: {0}")]
    Redis(String),
    /// A flag or URL that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Operator input that was rejected (never quotes the input itself).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Local I/O (listener, file, stdin).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Db(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Db(e.into())
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        // Redis errors quote command names, never argument values.
        Error::Redis(e.to_string())
    }
}

impl Error {
    /// HTTP status, error type, code and client-facing message. The message is
    /// fixed per variant so no internal detail can leak to clients.
    pub fn http_parts(&self) -> (StatusCode, &'static str, &'static str, &'static str) {
        match self {
            Error::InvalidAgentId => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_agent_id",
                "agent id must be a UUID",
            ),
            Error::InvalidKeySha256 => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_key_sha256",
                "key hash must be 64 lower-case hex characters",
            ),
            Error::Db(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "store_unavailable",
                "the directive store cannot reach its database",
            ),
            Error::Redis(_) | Error::Config(_) | Error::InvalidInput(_) | Error::Io(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal_error",
                "internal error",
            ),
        }
    }
}

/// Builds the JSON error response for a status/type/code/message tuple, in the
/// envelope shared with the filter (SPEC §6, [`ibex_wire::error_envelope`]).
pub fn json_error(
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: &'static str,
) -> Response {
    let body = ibex_wire::error_envelope(kind, code, message);
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, kind, code, message) = self.http_parts();
        json_error(status, kind, code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_errors_map_to_503_with_fixed_message() {
        let e = Error::Db(DbFailure::Connection("connection refused".into()));
        let (status, kind, code, msg) = e.http_parts();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(kind, "service_unavailable");
        assert_eq!(code, "store_unavailable");
        assert!(!msg.contains("refused"));
    }

    #[test]
    fn bad_id_maps_to_400() {
        assert_eq!(
            Error::InvalidAgentId.http_parts().0,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn bad_key_hash_maps_to_400() {
        let (status, _, code, _) = Error::InvalidKeySha256.http_parts();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_key_sha256");
    }

    #[test]
    fn sql_failure_display_shows_only_sqlstate() {
        let f = DbFailure::Sql("23502".into());
        assert_eq!(f.to_string(), "database error (sqlstate 23502)");
        assert_eq!(f.sqlstate(), Some("23502"));
    }
}
