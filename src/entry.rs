//! The L1 cache entry: what one agent's answer looks like in Envoy shared data.
//!
//! Shared data is a byte map shared by every worker VM of one `vm_id`. An entry is a
//! fixed 18-byte header followed by the directive, already JSON-escaped (the inside
//! of a string literal) so that a hit costs no escaping:
//!
//! ```text
//! 0      version (1)
//! 1      kind: 0 = no directive, 1 = directive (version unknown), 2 = tombstone
//!        (invalidated), 3 = a gateway key's agent, 4 = no such key (unknown or
//!        revoked), 5 = directive with its version id
//! 2..10  fresh until, ms since the Unix epoch, little endian
//! 10..18 generation: the value of the global generation counter when the fill
//!        that produced this entry started; older than the counter = flushed
//! 18..   kind 1: the escaped directive; kind 3: the agent id (36 bytes, canonical);
//!        kind 5: the version id (16 bytes, the UUID's), then the escaped directive
//! ```
//!
//! Kind 5 is new with the audit trail: a VM that predates it reads one as a miss and
//! refills, and this one reads kind 1 as a directive of unknown version.
//!
//! With the 22-byte key (the agent's UUID in base64url) this keeps the overhead per
//! agent, version id included, under 64 bytes, as SPEC §8
//! asks. Entries are never trusted blindly: anything that does not decode is a miss,
//! and a key entry (kinds 3 and 4) never decodes as an agent's answer or the other
//! way round, because each has its own key shape (22 base64url characters, or
//! `ibex:k:` + 64 hex digits) and reads only its kinds.
//!
//! Gateway keys (`agent.source = "api_key"`) have entries of their own under
//! [`KEY_ENTRY_PREFIX`] + the key's SHA-256 in hex; the key itself is never stored.
//! Only keys that named an agent get one (kind 3, or the placeholder that anchored
//! their fill): the filter never writes kind 4, which older entries may still hold
//! and which reads as "no such key".

use std::rc::Rc;

use ibex_wire::Redacted;

use crate::agent::{AgentId, AGENT_ID_LEN};
use crate::apikey::KeyHash;
use crate::audit::Version;

/// Version byte of the current layout; any other value decodes as a miss.
const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 18;

/// Length of an agent's shared-data key: its UUID's 16 bytes in unpadded base64url.
/// At 22 bytes it fits libc++'s inline string, so Envoy's map keeps no heap copy of
/// it (48 B per agent saved over the 43-byte `ibex:d:{agent}` it replaced); no other
/// key can collide with it, since every other one holds a `:`.
pub const AGENT_KEY_LEN: usize = 22;
/// Shared-data key of the global generation counter ("invalidate all" bumps it).
pub const GENERATION_KEY: &str = "ibex:gen";
/// Shared-data key of the L1 epoch: 8 bytes, little endian, that the control role
/// bumps after every write it makes (each tombstone, each generation bump). A
/// worker's hot copy of an entry (`crate::hot`) serves only while the epoch is the
/// one read before the entry was, so one small read per request stands for
/// re-reading every entry.
pub const EPOCH_KEY: &str = "ibex:epoch";

/// What an entry says about its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The agent has no active directive.
    NoDirective,
    /// The agent's directive follows the header.
    Present,
    /// The entry was invalidated; it only anchors a CAS version so that fills which
    /// started before the invalidation cannot write over it.
    Tombstone,
    /// A gateway key's entry: the agent id follows the header.
    Agent,
    /// A gateway key's entry: no active key has this hash.
    NoAgent,
}

/// A decoded L1 entry, borrowing the escaped directive from the raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// What the entry says.
    pub kind: Kind,
    /// Fresh until this instant (ms since the epoch).
    pub fresh_until_ms: u64,
    /// Global generation current when the fill started.
    pub generation: u64,
    /// The directive, JSON-escaped, with `Present`; the agent id with `Agent`; empty
    /// otherwise.
    pub escaped: Redacted<&'a str>,
    /// The directive's version, with `Present` (`Unknown` otherwise).
    pub version: Version,
}

impl<'a> Entry<'a> {
    /// Decodes raw shared-data bytes; `None` for anything malformed.
    pub fn decode(raw: &'a [u8]) -> Option<Entry<'a>> {
        if raw.len() < HEADER_LEN || raw[0] != VERSION {
            return None;
        }
        let kind = match raw[1] {
            0 => Kind::NoDirective,
            1 | 5 => Kind::Present,
            2 => Kind::Tombstone,
            3 => Kind::Agent,
            4 => Kind::NoAgent,
            _ => return None,
        };
        let fresh_until_ms = u64::from_le_bytes(raw[2..10].try_into().ok()?);
        let generation = u64::from_le_bytes(raw[10..18].try_into().ok()?);
        let (version, payload) = if raw[1] == 5 {
            let id: [u8; 16] = raw.get(HEADER_LEN..HEADER_LEN + 16)?.try_into().ok()?;
            (Version::from_bytes(id), &raw[HEADER_LEN + 16..])
        } else {
            (Version::Unknown, &raw[HEADER_LEN..])
        };
        let escaped = std::str::from_utf8(payload).ok()?;
        match kind {
            Kind::Present => {}
            // Only the canonical spelling: one agent, one byte string.
            Kind::Agent => {
                let mut buf = [0u8; AGENT_ID_LEN];
                if AgentId::parse(escaped)?.encode(&mut buf) != escaped {
                    return None;
                }
            }
            _ if !escaped.is_empty() => return None,
            _ => {}
        }
        Some(Entry {
            kind,
            fresh_until_ms,
            generation,
            escaped: Redacted::new(escaped),
            version,
        })
    }

    /// Encodes into the shared-data layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 16 + self.escaped.expose().len());
        out.push(VERSION);
        out.push(match self.kind {
            Kind::NoDirective => 0,
            Kind::Present if self.version == Version::Unknown => 1,
            Kind::Present => 5,
            Kind::Tombstone => 2,
            Kind::Agent => 3,
            Kind::NoAgent => 4,
        });
        out.extend_from_slice(&self.fresh_until_ms.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        if self.kind == Kind::Present && self.version != Version::Unknown {
            out.extend_from_slice(&self.version.to_bytes());
        }
        if matches!(self.kind, Kind::Present | Kind::Agent) {
            out.extend_from_slice(self.escaped.expose().as_bytes());
        }
        out
    }

    /// Whether the entry may be served as fresh at `now_ms` under global generation
    /// `current_generation`.
    pub fn is_fresh(&self, now_ms: u64, current_generation: u64) -> bool {
        self.kind != Kind::Tombstone
            && self.generation >= current_generation
            && now_ms < self.fresh_until_ms
    }

    /// Whether the entry may still be served while L2 and L3 both fail: not
    /// invalidated, not flushed, and expired for at most `stale_window_ms`.
    pub fn is_servable_stale(
        &self,
        now_ms: u64,
        current_generation: u64,
        stale_window_ms: u64,
    ) -> bool {
        self.kind != Kind::Tombstone
            && self.generation >= current_generation
            && now_ms < self.fresh_until_ms.saturating_add(stale_window_ms)
    }
}

/// What is known of an agent's directive (owned and already JSON-escaped), or of a
/// gateway key's agent: what an L1 entry, a tier's answer or a stale fallback hands
/// to the requests it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// The agent's directive, JSON-escaped (the inside of a string literal), and its
    /// version. Shared, not copied, by every request it answers and by the worker's
    /// hot copy (`crate::hot`).
    Directive(Redacted<Rc<str>>, Version),
    /// The agent has no active directive.
    NoDirective,
    /// The gateway key belongs to this agent.
    Agent(AgentId),
    /// No active key has this hash: unknown, or revoked.
    NoAgent,
}

impl Entry<'_> {
    /// What the entry says of its agent; `None` for a tombstone, which says nothing.
    pub fn known(&self) -> Option<Known> {
        match self.kind {
            Kind::Present => Some(Known::Directive(
                Redacted::new(Rc::from(*self.escaped.expose())),
                self.version,
            )),
            Kind::NoDirective => Some(Known::NoDirective),
            Kind::Agent => AgentId::parse(self.escaped.expose()).map(Known::Agent),
            Kind::NoAgent => Some(Known::NoAgent),
            Kind::Tombstone => None,
        }
    }
}

/// Shared-data key prefix of gateway key entries: `ibex:k:{sha256hex}`.
pub const KEY_ENTRY_PREFIX: &str = "ibex:k:";

/// Shared-data key of a gateway key: [`KEY_ENTRY_PREFIX`] + its SHA-256 in hex.
pub fn key_for_api_key(hash: &KeyHash) -> String {
    let mut key = String::with_capacity(KEY_ENTRY_PREFIX.len() + ibex_wire::KEY_SHA256_HEX_LEN);
    key.push_str(KEY_ENTRY_PREFIX);
    key.push_str(&hash.hex());
    key
}

/// Shared-data key of an agent: its UUID in unpadded base64url ([`AGENT_KEY_LEN`]).
pub fn key_for(agent: &AgentId) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut key = String::with_capacity(AGENT_KEY_LEN);
    // 16 bytes = five 3-byte groups (20 characters) and one byte (2 characters).
    let bytes = agent.as_bytes();
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        let chars = group.len() + 1;
        for i in 0..chars {
            key.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    key
}

/// The global generation counter as it is now in shared data (unreadable = 0).
pub fn current_generation<H: crate::host::Host>(host: &H) -> u64 {
    decode_generation(
        host.shared_get(GENERATION_KEY)
            .ok()
            .and_then(|(v, _)| v)
            .as_deref(),
    )
}

/// The L1 epoch as it is now in shared data. Unreadable (absent, malformed, or the
/// read failed) is `None`: then no hot copy may serve, since a bump could not be
/// seen either. Only a control role creates it (`control::start_epoch`), so a VM
/// whose invalidations come from a control role that does not bump it (none, or an
/// older build) never serves a copy.
pub fn current_epoch<H: crate::host::Host>(host: &H) -> Option<u64> {
    match host.shared_get(EPOCH_KEY) {
        Ok((Some(raw), _)) => decode_epoch(&raw),
        _ => None,
    }
}

/// Decodes the L1 epoch (8 bytes, little endian); anything else is `None`.
pub fn decode_epoch(raw: &[u8]) -> Option<u64> {
    raw.try_into().ok().map(u64::from_le_bytes)
}

/// Decodes the global generation counter (absent or malformed = 0).
pub fn decode_generation(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|r| r.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        for (kind, escaped) in [
            (Kind::Present, "Be terse.\\n\\u0000 é"),
            (Kind::NoDirective, ""),
            (Kind::Tombstone, ""),
        ] {
            let e = Entry {
                kind,
                fresh_until_ms: 1_700_000_000_123,
                generation: 42,
                escaped: Redacted::new(escaped),
                version: Version::Unknown,
            };
            let raw = e.encode();
            assert_eq!(raw.len(), HEADER_LEN + escaped.len());
            assert_eq!(Entry::decode(&raw), Some(e));
        }
    }

    #[test]
    fn malformed_bytes_are_a_miss() {
        let good = Entry {
            kind: Kind::Present,
            fresh_until_ms: 1,
            generation: 0,
            escaped: Redacted::new("x"),
            version: Version::Unknown,
        }
        .encode();
        assert!(Entry::decode(&good[..HEADER_LEN - 1]).is_none());
        let mut bad_version = good.clone();
        bad_version[0] = 9;
        assert!(Entry::decode(&bad_version).is_none());
        let mut bad_kind = good.clone();
        bad_kind[1] = 7;
        assert!(Entry::decode(&bad_kind).is_none());
        let mut bad_utf8 = good.clone();
        bad_utf8.push(0xff);
        assert!(Entry::decode(&bad_utf8).is_none());
        let mut absent_with_text = good;
        absent_with_text[1] = 0;
        assert!(Entry::decode(&absent_with_text).is_none());
    }

    #[test]
    fn freshness_respects_time_generation_and_tombstones() {
        let e = Entry {
            kind: Kind::Present,
            fresh_until_ms: 1000,
            generation: 3,
            escaped: Redacted::new("d"),
            version: Version::Unknown,
        };
        assert!(e.is_fresh(999, 3));
        assert!(!e.is_fresh(1000, 3));
        assert!(
            !e.is_fresh(10, 4),
            "a flush after the fill started makes it stale"
        );
        assert!(e.is_servable_stale(1500, 3, 600));
        assert!(!e.is_servable_stale(1600, 3, 600));
        assert!(!e.is_servable_stale(1500, 4, 600));
        let t = Entry {
            kind: Kind::Tombstone,
            ..e
        };
        assert!(!t.is_fresh(0, 0));
        assert!(!t.is_servable_stale(0, 0, u64::MAX));
    }

    #[test]
    fn key_entries_round_trip_and_hold_only_canonical_agent_ids() {
        let agent = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
        let e = Entry {
            kind: Kind::Agent,
            fresh_until_ms: 5,
            generation: 1,
            escaped: Redacted::new(agent),
            version: Version::Unknown,
        };
        let raw = e.encode();
        assert_eq!(Entry::decode(&raw), Some(e));
        assert_eq!(
            e.known(),
            Some(Known::Agent(AgentId::parse(agent).unwrap()))
        );
        for bad in ["", "6F1C1A3E-5B7D-4C2A-9E0F-123456789ABC", "not-a-uuid"] {
            let raw = Entry {
                escaped: Redacted::new(bad),
                version: Version::Unknown,
                ..e
            }
            .encode();
            assert!(Entry::decode(&raw).is_none(), "{bad:?}");
        }
        let none = Entry {
            kind: Kind::NoAgent,
            escaped: Redacted::new(""),
            version: Version::Unknown,
            ..e
        };
        assert_eq!(Entry::decode(&none.encode()), Some(none));
        assert_eq!(none.known(), Some(Known::NoAgent));
        let mut with_text = none.encode();
        with_text.push(b'x');
        assert!(Entry::decode(&with_text).is_none());
        let k = key_for_api_key(&KeyHash::of(b"test"));
        assert_eq!(
            k,
            "ibex:k:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn overhead_per_agent_stays_under_64_bytes() {
        let agent = AgentId::parse("6f1c1a3e-5b7d-4c2a-9e0f-123456789abc").unwrap();
        // Key, header and the version id of a directive entry (kind 5).
        assert!(key_for(&agent).len() + HEADER_LEN + 16 <= 64);
    }

    #[test]
    fn agent_keys_are_the_uuid_in_base64url_one_per_agent() {
        let agent = AgentId::parse("6f1c1a3e-5b7d-4c2a-9e0f-123456789abc").unwrap();
        // python3 -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.UUID("6f1c1a3e-5b7d-4c2a-9e0f-123456789abc").bytes))'
        assert_eq!(key_for(&agent), "bxwaPlt9TCqeDxI0VniavA");
        let all_ones = AgentId::parse("ffffffff-ffff-ffff-ffff-ffffffffffff").unwrap();
        assert_eq!(key_for(&all_ones), "_____________________w");
        let nil = AgentId::parse("00000000-0000-0000-0000-000000000000").unwrap();
        assert_eq!(key_for(&nil), "AAAAAAAAAAAAAAAAAAAAAA");
        assert!(
            !key_for(&agent).contains(':'),
            "no collision with ibex:gen or ibex:k:"
        );
    }

    #[test]
    fn generation_decodes_defensively() {
        assert_eq!(decode_generation(None), 0);
        assert_eq!(decode_generation(Some(&[1, 2])), 0);
        assert_eq!(decode_generation(Some(&7u64.to_le_bytes())), 7);
    }
}
