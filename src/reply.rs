//! Refusals: the local replies a client can get from the filter (SPEC §6), as an
//! OpenAI-style JSON error. No reply ever carries directive text.

use crate::json::BodyError;
use crate::metrics::Counter;

/// Why a request is answered by the filter instead of being forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Agent header present but not a UUID.
    InvalidAgentId,
    /// Agent header missing and `agent.missing = "reject"`; with the `jwt` source no
    /// verified claim, with `api_key` no key header.
    MissingAgentId,
    /// `api_key` source: the key is malformed, unknown or revoked.
    InvalidApiKey,
    /// A body on a path that is no injection format and not in `inject.pass_paths`
    /// (with `inject.other_paths = "refuse"`), or on a path that cannot be read with
    /// certainty (an invalid or double escape, a dot segment, a control byte).
    UnsupportedPath,
    /// Body malformed, ambiguous or of the wrong shape.
    InvalidBody(BodyError),
    /// The body ended in trailers while a directive was due: it cannot be spliced
    /// from the trailers callback, and must not be released unspliced.
    RequestTrailers,
    /// Body over `inject.max_body_bytes`.
    BodyTooLarge,
    /// A `content-encoding` the filter cannot read.
    UnsupportedEncoding,
    /// L2 and L3 failed, nothing stale, `failure_mode = "closed"`.
    DirectiveUnavailable,
}

impl Refusal {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::InvalidAgentId | Refusal::InvalidBody(_) | Refusal::RequestTrailers => 400,
            Refusal::MissingAgentId | Refusal::InvalidApiKey => 401,
            Refusal::UnsupportedPath => 404,
            Refusal::BodyTooLarge => 413,
            Refusal::UnsupportedEncoding => 415,
            Refusal::DirectiveUnavailable => 503,
        }
    }

    /// Stable machine-readable code (`error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InvalidAgentId => "invalid_agent_id",
            Refusal::MissingAgentId => "missing_agent_id",
            Refusal::InvalidApiKey => "invalid_api_key",
            Refusal::UnsupportedPath => "unsupported_path",
            Refusal::InvalidBody(_) | Refusal::RequestTrailers => "invalid_body",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::UnsupportedEncoding => "unsupported_encoding",
            Refusal::DirectiveUnavailable => "directive_unavailable",
        }
    }

    /// Counter moved by this refusal.
    pub fn counter(&self) -> Counter {
        match self {
            Refusal::InvalidAgentId => Counter::RejectedInvalidAgentId,
            Refusal::MissingAgentId => Counter::RejectedMissingAgentId,
            Refusal::InvalidApiKey => Counter::RejectedInvalidApiKey,
            Refusal::UnsupportedPath => Counter::RejectedUnsupportedPath,
            Refusal::InvalidBody(_) | Refusal::RequestTrailers => Counter::RejectedInvalidBody,
            Refusal::BodyTooLarge => Counter::RejectedBodyTooLarge,
            Refusal::UnsupportedEncoding => Counter::RejectedUnsupportedEncoding,
            Refusal::DirectiveUnavailable => Counter::RejectedDirectiveUnavailable,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            Refusal::MissingAgentId | Refusal::InvalidApiKey => "authentication_error",
            Refusal::DirectiveUnavailable => "service_unavailable",
            _ => "invalid_request_error",
        }
    }

    /// `agent_header` is the header a request without an agent lacks: the agent
    /// header, or the key header with the `api_key` source.
    fn message(&self, agent_header: &str) -> String {
        match self {
            Refusal::InvalidAgentId => format!("header {agent_header} must be a UUID"),
            Refusal::MissingAgentId => format!("header {agent_header} is required"),
            // Never the key, nor its hash: the client knows what it sent.
            Refusal::InvalidApiKey => "the API key is not valid".into(),
            // Never the path itself: it is the client's text, and a reflected path
            // is one more place for escapes and markup to go wrong.
            Refusal::UnsupportedPath => {
                "this gateway does not forward a request body on this path".into()
            }
            Refusal::InvalidBody(e) => e.to_string(),
            Refusal::RequestTrailers => {
                "a request with trailers cannot carry a directive on this path".into()
            }
            Refusal::BodyTooLarge => "request body is larger than this gateway accepts".into(),
            Refusal::UnsupportedEncoding => {
                "request body must not be compressed (content-encoding must be identity)".into()
            }
            Refusal::DirectiveUnavailable => {
                "the agent's directive cannot be resolved right now; retry later".into()
            }
        }
    }

    /// The JSON body: `{"error":{"type":…,"code":…,"message":…}}`, the envelope the
    /// companion's errors share ([`ibex_wire::error_envelope`]).
    pub fn body(&self, agent_header: &str) -> String {
        ibex_wire::error_envelope(self.error_type(), self.code(), &self.message(agent_header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_style_json() {
        let cases = [
            (Refusal::InvalidAgentId, 400, "invalid_agent_id"),
            (Refusal::MissingAgentId, 401, "missing_agent_id"),
            (Refusal::InvalidApiKey, 401, "invalid_api_key"),
            (
                Refusal::InvalidBody(BodyError::Malformed(3)),
                400,
                "invalid_body",
            ),
            (Refusal::UnsupportedPath, 404, "unsupported_path"),
            (Refusal::RequestTrailers, 400, "invalid_body"),
            (Refusal::BodyTooLarge, 413, "body_too_large"),
            (Refusal::UnsupportedEncoding, 415, "unsupported_encoding"),
            (Refusal::DirectiveUnavailable, 503, "directive_unavailable"),
        ];
        for (r, status, code) in cases {
            assert_eq!(r.status(), status);
            let v: serde_json::Value = serde_json::from_str(&r.body("x-agent-id")).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["type"].is_string());
            assert!(v["error"]["message"].is_string());
        }
    }

    #[test]
    fn new_refusals_move_their_counters_and_say_why() {
        assert_eq!(
            Refusal::UnsupportedPath.counter(),
            Counter::RejectedUnsupportedPath
        );
        assert_eq!(
            Refusal::RequestTrailers.counter(),
            Counter::RejectedInvalidBody
        );
        let v: serde_json::Value =
            serde_json::from_str(&Refusal::RequestTrailers.body("x-agent-id")).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("trailers"));
        let v: serde_json::Value =
            serde_json::from_str(&Refusal::UnsupportedPath.body("x-agent-id")).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(!v["error"]["message"].as_str().unwrap().contains('/'));
    }
}
