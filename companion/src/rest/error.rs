//! [`RestError`]: every way the REST front refuses or fails a request, and its
//! HTTP answer in Upstash's shape, `{"error": "…"}`.
//!
//! Messages shown to clients are fixed or name the command only: never an
//! argument, never Redis's connection error text (it may name hosts), never the
//! token. A failure's cause is kept beside it for the log line.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::command::Refusal;
use super::encode::Reply;
use super::link::LinkFailure;
use super::metrics::Outcome;

/// Everything the front answers with an error of its own (Redis's error
/// replies are answers, see [`Reply::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Missing or wrong token (401). Upstash's text, which its SDKs surface as
    /// `UpstashError: Unauthorized`.
    #[error("Unauthorized")]
    Unauthorized,
    /// A command or script outside the allowlist (403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// Malformed request (400); the message names no argument.
    #[error("{0}")]
    BadRequest(String),
    /// Body above `--max-body-bytes` (413).
    #[error("ERR request body is larger than {0} bytes")]
    TooLarge(usize),
    /// A method that runs no command (405): only GET, POST and PUT do.
    #[error("ERR method not allowed: commands run only on GET, POST and PUT")]
    MethodNotAllowed,
    /// The body did not arrive within `--body-timeout-ms` (408); the
    /// connection is closed after the answer.
    #[error("ERR request body not received within {} ms", .0.as_millis())]
    BodyTimeout(std::time::Duration),
    /// Redis unreachable or too slow (503). The cause is for logs only.
    #[error("ERR Redis is unavailable")]
    Unavailable(LinkFailure),
}

impl From<Refusal> for RestError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Forbidden(m) => RestError::Forbidden(m),
            Refusal::BadRequest(m) => RestError::BadRequest(m),
        }
    }
}

impl RestError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            RestError::Unauthorized => StatusCode::UNAUTHORIZED,
            RestError::Forbidden(_) => StatusCode::FORBIDDEN,
            RestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RestError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// How it is counted.
    pub fn outcome(&self) -> Outcome {
        match self {
            RestError::Unauthorized => Outcome::Unauthorized,
            RestError::Forbidden(_) => Outcome::Forbidden,
            RestError::BadRequest(_)
            | RestError::TooLarge(_)
            | RestError::MethodNotAllowed
            | RestError::BodyTimeout(_) => Outcome::BadRequest,
            RestError::Unavailable(_) => Outcome::Unavailable,
        }
    }
}

/// A JSON answer with `status`.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
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

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let mut resp = json_response(self.status(), Reply::Error(self.to_string()).to_body());
        match self {
            RestError::MethodNotAllowed => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, POST, PUT"));
            }
            // The rest of that body may still come: the connection cannot be
            // reused, so it is closed instead of waiting to drain it.
            RestError::BodyTimeout(_) => {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_fixed_texts() {
        assert_eq!(RestError::Unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Reply::Error(RestError::Unauthorized.to_string()).to_body(),
            br#"{"error":"Unauthorized"}"#.to_vec()
        );
        let e = RestError::Unavailable(LinkFailure::Connection(
            "Connection refused to redis://:hunter2@10.0.0.1".into(),
        ));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.to_string(), "ERR Redis is unavailable");
        assert_eq!(
            RestError::TooLarge(10).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(RestError::TooLarge(10).outcome(), Outcome::BadRequest);
        assert_eq!(
            RestError::from(Refusal::Forbidden("x")).status(),
            StatusCode::FORBIDDEN
        );
        let r = RestError::MethodNotAllowed.into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, POST, PUT");
        let e = RestError::BodyTimeout(std::time::Duration::from_millis(1500));
        assert_eq!(
            e.to_string(),
            "ERR request body not received within 1500 ms"
        );
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(r.headers()[header::CONNECTION], "close");
    }
}
