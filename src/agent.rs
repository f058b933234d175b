//! The agent id: read from a request header, which must parse as a UUID.
//!
//! Ids are normalised to the lower-case hyphenated form so that every spelling of one
//! UUID (upper case, braces, no hyphens) shares one cache key in L1 and Redis.

use uuid::Uuid;

/// A validated agent id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgentId(Uuid);

/// Buffer size of the hyphenated form.
pub const AGENT_ID_LEN: usize = 36;

impl AgentId {
    /// Parses a header value; `None` when it is not a UUID.
    pub fn parse(header_value: &str) -> Option<AgentId> {
        Uuid::try_parse(header_value.trim()).ok().map(AgentId)
    }

    /// The UUID's 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The canonical lower-case hyphenated form, without allocating.
    pub fn encode<'b>(&self, buf: &'b mut [u8; AGENT_ID_LEN]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl std::fmt::Display for AgentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; AGENT_ID_LEN];
        f.write_str(self.encode(&mut buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_normalises_them() {
        let canonical = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
        for spelling in [
            canonical,
            "6F1C1A3E-5B7D-4C2A-9E0F-123456789ABC",
            "6f1c1a3e5b7d4c2a9e0f123456789abc",
            "{6f1c1a3e-5b7d-4c2a-9e0f-123456789abc}",
            " 6f1c1a3e-5b7d-4c2a-9e0f-123456789abc ",
        ] {
            let id = AgentId::parse(spelling).unwrap_or_else(|| panic!("{spelling}"));
            assert_eq!(id.to_string(), canonical);
        }
    }

    #[test]
    fn refuses_what_is_not_a_uuid() {
        for bad in [
            "",
            "agent-7",
            "6f1c1a3e-5b7d-4c2a-9e0f-123456789abz",
            "../../etc",
            "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc0",
        ] {
            assert!(AgentId::parse(bad).is_none(), "{bad}");
        }
    }
}
