//! The audit trail (SPEC §7): which directive version each request got, from which
//! tier, and what became of it. Plain data here; the host layer writes it where
//! Envoy's access log can print it, once per request, when its outcome is decided.
//!
//! A record names an agent id, a version id, a tier and an outcome: never directive
//! text, which nothing in this module holds.

use uuid::Uuid;

use crate::agent::{AgentId, AGENT_ID_LEN};
use crate::flow::Source;
use crate::reply::Refusal;

/// The version of a directive: the id of its `directive_versions` row, as the store
/// names it. Answers from older stores and Redis values written by older filters or
/// other writers carry none: `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Version {
    /// The answer did not say.
    #[default]
    Unknown,
    /// This version.
    Id(Uuid),
}

impl Version {
    /// Reads a version id in its one canonical spelling (lower-case, hyphenated).
    pub fn parse_canonical(text: &str) -> Option<Version> {
        if !ibex_wire::is_canonical_uuid(text.as_bytes()) {
            return None;
        }
        // The nil UUID is how an entry spells "unknown": never a version.
        Uuid::try_parse(text)
            .ok()
            .filter(|id| !id.is_nil())
            .map(Version::Id)
    }

    /// Its 16 bytes in an L1 entry; the nil UUID (never a real row's id, which
    /// `gen_random_uuid` makes) stands for `Unknown`.
    pub fn to_bytes(self) -> [u8; 16] {
        match self {
            Version::Unknown => [0; 16],
            Version::Id(id) => *id.as_bytes(),
        }
    }

    /// The inverse of [`Version::to_bytes`].
    pub fn from_bytes(bytes: [u8; 16]) -> Version {
        if bytes == [0; 16] {
            Version::Unknown
        } else {
            Version::Id(Uuid::from_bytes(bytes))
        }
    }

    /// The canonical id, or `unknown`.
    pub fn write<'b>(&self, buf: &'b mut [u8; AGENT_ID_LEN]) -> &'b str {
        match self {
            Version::Unknown => "unknown",
            Version::Id(id) => id.hyphenated().encode_lower(buf),
        }
    }
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded with the directive spliced in.
    Injected,
    /// Forwarded untouched: the agent has no directive.
    NoDirective,
    /// Forwarded untouched with nothing to resolve (no agent, pass path, bodiless).
    Passed,
    /// Refused with this code.
    Refused(&'static str),
    /// Forwarded without its directive because it was unknowable and
    /// `failure_mode` is open.
    FailedOpen,
}

/// One request's audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    /// The agent, once known.
    pub agent: Option<AgentId>,
    /// The directive's version; `None` when the request got no directive.
    pub version: Option<Version>,
    /// The tier whose answer the request was served with (`None` before one
    /// answered).
    pub tier: Option<Source>,
}

impl Record {
    /// The field values Envoy's access log prints: agent id (or `-`), directive
    /// version (`none` without a directive), tier (`none` before any), outcome.
    pub fn fields(&self, outcome: Outcome) -> Fields {
        let mut agent = [0u8; AGENT_ID_LEN];
        let mut version = [0u8; AGENT_ID_LEN];
        let agent = self.agent.map_or("-", |a| a.encode(&mut agent)).to_string();
        let version = match (outcome, self.version) {
            (Outcome::Injected, Some(v)) => v.write(&mut version).to_string(),
            _ => "none".to_string(),
        };
        let tier = self.tier.map_or("none", Source::as_str);
        let outcome = match outcome {
            Outcome::Injected => "injected".to_string(),
            Outcome::NoDirective => "no_directive".to_string(),
            Outcome::Passed => "passed".to_string(),
            Outcome::Refused(code) => format!("refused:{code}"),
            Outcome::FailedOpen => "failed_open".to_string(),
        };
        Fields {
            agent_id: agent,
            directive_version: version,
            tier,
            outcome,
        }
    }
}

/// A record as the strings Envoy gets (filter state `wasm.ibex.<field>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// `agent_id`.
    pub agent_id: String,
    /// `directive_version`.
    pub directive_version: String,
    /// `tier`.
    pub tier: &'static str,
    /// `outcome`.
    pub outcome: String,
}

impl Fields {
    /// The four fields in one value, in this order, separated by one space (none of
    /// them holds one): `agent_id directive_version tier outcome`.
    pub fn combined(&self) -> String {
        // Pushed, not `format!`ed: once per request, and the formatting machinery
        // costs several times the copies.
        let parts = [
            self.agent_id.as_str(),
            self.directive_version.as_str(),
            self.tier,
            self.outcome.as_str(),
        ];
        let mut out = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(part);
        }
        out
    }
}

/// How a request's audit record goes into filter state (`audit.filter_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One property, `wasm.ibex.audit` = [`Fields::combined`]: one host call.
    Combined,
    /// Four properties, `wasm.ibex.agent_id`, `.directive_version`, `.tier`,
    /// `.outcome`: four host calls (each a filter-state object Envoy makes).
    Fields,
    /// None.
    Off,
}

impl Outcome {
    /// The outcome of a refusal.
    pub fn refused(refusal: &Refusal) -> Outcome {
        Outcome::Refused(refusal.code())
    }
}

/// Whether a `traceparent` is passed on to the lookups it causes
/// ([`ibex_wire::traceparent_trace_id`] says which are).
pub fn valid_traceparent(value: &str) -> bool {
    ibex_wire::traceparent_trace_id(value).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_combined_value_is_the_four_fields_in_order() {
        let f = Fields {
            agent_id: "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc".into(),
            directive_version: "none".into(),
            tier: "local",
            outcome: "refused:missing_agent_id".into(),
        };
        assert_eq!(
            f.combined(),
            "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc none local refused:missing_agent_id"
        );
        assert_eq!(f.combined().split(' ').count(), 4);
    }

    #[test]
    fn only_a_well_formed_traceparent_is_passed_on() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx: y",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn versions_round_trip_and_have_one_spelling() {
        let id = "0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d";
        let v = Version::parse_canonical(id).unwrap();
        assert_eq!(Version::from_bytes(v.to_bytes()), v);
        assert_eq!(Version::from_bytes([0; 16]), Version::Unknown);
        let mut buf = [0u8; AGENT_ID_LEN];
        assert_eq!(v.write(&mut buf), id);
        for bad in [
            "0B6C7A4E-1F2D-4C3B-8A9E-5D6F7A8B9C0D",
            "0b6c7a4e1f2d4c3b8a9e5d6f7a8b9c0d",
            "{0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d}",
            "00000000-0000-0000-0000-000000000000",
            "",
        ] {
            assert_eq!(Version::parse_canonical(bad), None, "{bad}");
        }
    }

    #[test]
    fn fields_name_no_version_unless_injected() {
        let agent = AgentId::parse("6f1c1a3e-5b7d-4c2a-9e0f-123456789abc");
        let v = Version::parse_canonical("0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d");
        let r = Record {
            agent,
            version: v,
            tier: Some(Source::Redis),
        };
        let f = r.fields(Outcome::Injected);
        assert_eq!(
            (
                f.agent_id.as_str(),
                f.directive_version.as_str(),
                f.tier,
                f.outcome.as_str()
            ),
            (
                "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc",
                "0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d",
                "redis",
                "injected"
            )
        );
        let refused = r.fields(Outcome::Refused("invalid_body"));
        assert_eq!(
            (refused.directive_version.as_str(), refused.outcome.as_str()),
            ("none", "refused:invalid_body")
        );
        let empty = Record::default().fields(Outcome::Passed);
        assert_eq!(
            (
                empty.agent_id.as_str(),
                empty.directive_version.as_str(),
                empty.tier
            ),
            ("-", "none", "none")
        );
    }
}
