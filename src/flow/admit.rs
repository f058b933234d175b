//! Admission: from a request's headers and the configuration, whether the filter
//! resolves a directive for it, passes it untouched, or refuses it before any lookup.
//!
//! Pure: no host calls, no counters, no state. The order of the checks is part of
//! the contract (SPEC §6): the agent first (a request we cannot attribute is refused
//! whatever its path), then the path, then what the body could be.

use crate::agent::AgentId;
use crate::config::{Config, MissingAgent};
use crate::inject::Format;
use crate::reply::Refusal;

/// The request headers admission looks at, picked out of all of them (one host call
/// for all headers is much cheaper than one per header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadFields {
    /// `:path`, query string included.
    pub path: Option<String>,
    /// The agent header; several different values are kept joined by `,`, which is
    /// no UUID, so an ambiguous agent is refused rather than guessed.
    pub agent: Option<String>,
    /// `content-length`.
    pub content_length: Option<String>,
    /// `content-encoding`, several headers joined by `, ` as HTTP reads them.
    pub content_encoding: Option<String>,
}

impl HeadFields {
    /// Picks the fields out of all request headers (names are lower case in Envoy).
    pub fn pick(headers: Vec<(String, String)>, agent_header: &str) -> HeadFields {
        let mut out = HeadFields::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                ":path" => &mut out.path,
                "content-length" => &mut out.content_length,
                "content-encoding" => &mut out.content_encoding,
                n if n == agent_header => &mut out.agent,
                _ => continue,
            };
            match slot {
                None => *slot = Some(value),
                Some(existing) if *existing != value => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                Some(_) => {}
            }
        }
        out
    }
}

/// What to do with a request, decided from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Forward untouched: no agent in `pass` mode, a path that is no format, or no
    /// body to put a directive into.
    Pass,
    /// Answer with this refusal.
    Refuse(Refusal),
    /// Resolve the agent's directive and splice it into the body in this format.
    Resolve {
        /// Whose request it is.
        agent: AgentId,
        /// Where the directive goes.
        format: Format,
    },
}

/// Decides what to do with a request from its headers.
pub fn admit(head: &HeadFields, end_of_stream: bool, config: &Config) -> Admission {
    let agent = match head.agent.as_deref() {
        None => {
            return match config.missing_agent {
                MissingAgent::Pass => Admission::Pass,
                MissingAgent::Reject => Admission::Refuse(Refusal::MissingAgentId),
            }
        }
        Some(value) => match AgentId::parse(value) {
            Some(agent) => agent,
            None => return Admission::Refuse(Refusal::InvalidAgentId),
        },
    };
    let Some(format) = head.path.as_deref().and_then(|p| config.format_for(p)) else {
        return Admission::Pass;
    };
    if end_of_stream {
        // No body: nothing a model could read, and nothing to put a directive into.
        return Admission::Pass;
    }
    if let Some(enc) = head.content_encoding.as_deref() {
        let enc = enc.trim();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            return Admission::Refuse(Refusal::UnsupportedEncoding);
        }
    }
    if let Some(len) = head
        .content_length
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if len > config.max_body_bytes {
            return Admission::Refuse(Refusal::BodyTooLarge);
        }
    }
    Admission::Resolve { agent, format }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn head(agent: Option<&str>) -> HeadFields {
        HeadFields {
            path: Some("/v1/chat/completions".into()),
            agent: agent.map(String::from),
            ..Default::default()
        }
    }

    fn config(extra: &str) -> Config {
        Config::parse(format!("{{{extra}}}").as_bytes(), None).unwrap()
    }

    #[test]
    fn head_fields_are_picked_from_all_headers() {
        let h = HeadFields::pick(
            pairs(&[
                (":path", "/v1/chat/completions"),
                ("x-agent-id", AGENT),
                ("content-length", "12"),
                ("accept", "*/*"),
            ]),
            "x-agent-id",
        );
        assert_eq!(h.path.as_deref(), Some("/v1/chat/completions"));
        assert_eq!(h.agent.as_deref(), Some(AGENT));
        assert_eq!(h.content_length.as_deref(), Some("12"));
        assert_eq!(h.content_encoding, None);
        let h = HeadFields::pick(
            pairs(&[
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
                ("x-agent-id", AGENT),
                ("x-agent-id", AGENT),
            ]),
            "x-agent-id",
        );
        assert_eq!(h.content_encoding.as_deref(), Some("identity, gzip"));
        assert_eq!(
            h.agent.as_deref(),
            Some(AGENT),
            "a repeated identical agent header is one agent"
        );
    }

    #[test]
    fn two_different_agents_are_refused() {
        let other = "00000000-0000-4000-8000-000000000001";
        let mut h = HeadFields::pick(
            pairs(&[("x-agent-id", AGENT), ("x-agent-id", other)]),
            "x-agent-id",
        );
        h.path = Some("/v1/chat/completions".into());
        assert_eq!(
            admit(&h, false, &config("")),
            Admission::Refuse(Refusal::InvalidAgentId)
        );
    }

    #[test]
    fn the_agent_is_checked_before_the_path() {
        let c = config(r#""agent":{"missing":"reject"}"#);
        let mut h = head(None);
        h.path = Some("/v1/models".into());
        assert_eq!(
            admit(&h, true, &c),
            Admission::Refuse(Refusal::MissingAgentId)
        );
        h.agent = Some("agent-7".into());
        assert_eq!(
            admit(&h, true, &c),
            Admission::Refuse(Refusal::InvalidAgentId)
        );
        assert_eq!(admit(&head(None), false, &config("")), Admission::Pass);
    }

    #[test]
    fn other_paths_and_bodiless_requests_pass() {
        let c = config("");
        let mut h = head(Some(AGENT));
        assert_eq!(admit(&h, true, &c), Admission::Pass, "no body");
        h.path = Some("/v1/models".into());
        assert_eq!(admit(&h, false, &c), Admission::Pass, "no format");
    }

    #[test]
    fn encoded_and_oversized_bodies_are_refused() {
        let c = config(r#""inject":{"max_body_bytes":100}"#);
        let mut h = head(Some(AGENT));
        h.content_encoding = Some(" Identity ".into());
        h.content_length = Some("100".into());
        assert!(matches!(admit(&h, false, &c), Admission::Resolve { .. }));
        h.content_length = Some("101".into());
        assert_eq!(
            admit(&h, false, &c),
            Admission::Refuse(Refusal::BodyTooLarge)
        );
        h.content_encoding = Some("identity, gzip".into());
        assert_eq!(
            admit(&h, false, &c),
            Admission::Refuse(Refusal::UnsupportedEncoding)
        );
    }
}
