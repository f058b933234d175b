//! `ibex-wire`: the contract between the ibex-directive filter (inside Envoy, built
//! for wasm32) and its companion (native): everything both sides must spell the same
//! way, written once (SPEC §4, §6).
//!
//! - Redis: the key of an agent's directive ([`DEFAULT_KEY_PREFIX`], [`redis_key`]),
//!   the tombstone value the subscriber writes over a changed key ([`TOMBSTONE`]) and
//!   the per-slot flush markers that block write-backs after "invalidate all"
//!   ([`flush_marker_for`], [`flush_marker_key`]), and the Redis Cluster hash slots
//!   they rest on ([`key_slot`], [`crc16`], module `slot`).
//! - The two Lua scripts the filter runs through `EVAL` ([`FILTER_SCRIPTS`]), which
//!   the REST front allows by default.
//! - Pub/sub: the update and flush channels ([`UPDATES_CHANNEL_PREFIX`],
//!   [`FLUSH_CHANNEL`], [`parse_channel`]).
//! - The control endpoint of Envoy's control listener ([`INVALIDATE_PATH`],
//!   [`parse_invalidate_path`]).
//! - Gateway API keys (SPEC §3.1), known on the wire only by their SHA-256 in
//!   lower-case hex ([`is_key_sha256_hex`], [`key_sha256_hex`]): the Redis key
//!   [`agent_key_redis_key`], the update channel [`key_updates_channel`], the store
//!   path [`store_key_path`] and the control path [`invalidate_key_path`].
//! - Which W3C `traceparent` is passed on and logged ([`traceparent_trace_id`]).
//! - The debug request header ([`DEBUG_HEADER`]) and the JSON error envelope of every
//!   error answer ([`error_envelope`]).
//! - [`Redacted`], the wrapper that keeps secrets and directive text out of `Debug`
//!   output on both sides.
//!
//! What it must never do: depend on another crate (the filter's wasm module links it,
//! and the pure filter core must stay free of anything the companion or proxy-wasm
//! needs), perform I/O, log, or hold state. It is names, small pure functions and one
//! wrapper type; each side keeps its own transport.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod envelope;
mod redacted;
mod slot;

pub use envelope::error_envelope;
pub use redacted::{Redacted, SecretLen};
pub use slot::{
    crc16, flush_marker_for, flush_marker_key, hashed_part, is_cluster_safe_prefix,
    is_flush_marker, key_slot, slot_tag, FLUSH_MARKER_SUFFIX, SLOTS, TAG_LEN,
};

use std::fmt::Display;

// --------------------------------------------------------------- Redis scripts

/// The filter's conditional write-back: `KEYS[1]` (the entry) is set to `ARGV[2]`
/// with `EX ARGV[1]` only if neither it (a value or a tombstone) nor `KEYS[2]` (the
/// flush marker of the entry's slot, [`flush_marker_for`], so both keys share a
/// Redis Cluster slot) exists; returns 1 when written, 0 when not. The REST front
/// runs no other write script unless told to.
pub const SET_IF_ABSENT_SCRIPT: &str = "if redis.call('EXISTS',KEYS[1],KEYS[2])==0 then redis.call('SET',KEYS[1],ARGV[2],'EX',ARGV[1]) return 1 end return 0";

/// The filter's read of a gateway key's entry: nil when `KEYS[1]` does not exist,
/// else its value and its `PTTL` (so the filter caches it no longer than Redis).
pub const GET_WITH_PTTL_SCRIPT: &str = "local v=redis.call('GET',KEYS[1]) if not v then return false end return {v,redis.call('PTTL',KEYS[1])}";

/// The filter's directive read in the `upstash` dialect: the value of `KEYS[1]`, or
/// nil. A plain `GET` may be answered by any of Upstash's replicas, which may not have
/// the subscriber's tombstone yet (it is written to the key's leader); a script may
/// write, so it runs where the key's writes run.
pub const GET_SCRIPT: &str = "return redis.call('GET',KEYS[1])";

/// Every script the filter sends through `EVAL`: what the REST front allows by
/// default.
pub const FILTER_SCRIPTS: [&str; 3] = [SET_IF_ABSENT_SCRIPT, GET_WITH_PTTL_SCRIPT, GET_SCRIPT];

// ------------------------------------------------------------------ Redis keys

/// Default of the filter's `redis.key_prefix` and of the subscriber's
/// `--key-prefix`: an agent's directive lives at `directive:{agent_id}`.
pub const DEFAULT_KEY_PREFIX: &str = "directive:";

/// The Redis key of an agent's directive: `{prefix}{agent_id}` (the agent id in its
/// lower-case hyphenated UUID form).
pub fn redis_key(prefix: &str, agent_id: impl Display) -> String {
    format!("{prefix}{agent_id}")
}

/// Value of a Redis tombstone, written by the subscriber over the key of an agent
/// whose directive changed: a single NUL. Postgres text can never contain NUL, so no
/// directive is ever mistaken for a tombstone; the filter reads one as "no key" and
/// its conditional write-back does not overwrite it.
pub const TOMBSTONE: &str = "\0";

/// True when a Redis value is a tombstone (it starts with NUL).
pub fn is_tombstone(value: &[u8]) -> bool {
    value.first() == Some(&0)
}

/// Start of a directive's Redis value that carries its version (the audit trail):
/// NUL, `v`, the version id (36 characters, lower-case hyphenated UUID), then the
/// text. The leading NUL makes filters that predate versions read it as a tombstone
/// (ask the store), never as text.
pub const VERSIONED_PREFIX: &[u8] = b"\0v";

/// Length of a UUID in its canonical lower-case hyphenated spelling.
pub const UUID_LEN: usize = 36;

/// What a directive's Redis value says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectiveValue<'a> {
    /// A tombstone (or anything else that starts with NUL): ask the store.
    Tombstone,
    /// The text (empty: no directive), with its version id when the value carries
    /// one (values written by older filters or other writers do not).
    Text {
        /// The version id, canonical, if the value names one.
        version: Option<&'a str>,
        /// The directive text's bytes (not yet checked to be UTF-8).
        text: &'a [u8],
    },
}

/// Reads a directive's Redis value.
pub fn read_directive_value(value: &[u8]) -> DirectiveValue<'_> {
    let Some(rest) = value.strip_prefix(VERSIONED_PREFIX) else {
        return if is_tombstone(value) {
            DirectiveValue::Tombstone
        } else {
            DirectiveValue::Text {
                version: None,
                text: value,
            }
        };
    };
    match (rest.get(..UUID_LEN), rest.get(UUID_LEN..)) {
        (Some(id), Some(text)) if is_canonical_uuid(id) => DirectiveValue::Text {
            // Canonical means ASCII, so this cannot fail.
            version: std::str::from_utf8(id).ok(),
            text,
        },
        _ => DirectiveValue::Tombstone,
    }
}

/// The Redis value of `text` at version `version_id` (canonical, see
/// [`is_canonical_uuid`]).
pub fn versioned_directive_value(version_id: &str, text: &str) -> String {
    let mut out = String::with_capacity(VERSIONED_PREFIX.len() + version_id.len() + text.len());
    out.push_str("\0v");
    out.push_str(version_id);
    out.push_str(text);
    out
}

/// The trace id (32 lower-case hex digits) of a W3C trace context `traceparent` in
/// its one version-00 spelling: `00-`, the trace id, `-`, 16 hex digits of parent
/// id, `-`, 2 of flags, neither id all zeros. `None` for anything else, which the
/// filter does not pass on and the companion does not log: a header a client could
/// shape freely reaches neither a callout nor a log line.
pub fn traceparent_trace_id(value: &str) -> Option<&str> {
    let b = value.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    let ok = b.len() == 55
        && b.starts_with(b"00-")
        && b.get(35) == Some(&b'-')
        && b.get(52) == Some(&b'-')
        && b.get(3..35).is_some_and(|t| hex(t) && nonzero(t))
        && b.get(36..52).is_some_and(|p| hex(p) && nonzero(p))
        && b.get(53..55).is_some_and(hex);
    if ok {
        value.get(3..35)
    } else {
        None
    }
}

/// True for a UUID in its one canonical spelling: 8-4-4-4-12 lower-case hex digits.
pub fn is_canonical_uuid(s: &[u8]) -> bool {
    s.len() == UUID_LEN
        && s.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

// ------------------------------------------------------------------ pub/sub

/// Channel prefix of per-agent updates: a writer publishes
/// `ibex:directive:updates:{agent_id}` after changing that agent's directive
/// (the payload is ignored).
pub const UPDATES_CHANNEL_PREFIX: &str = "ibex:directive:updates:";

/// The `PSUBSCRIBE` pattern that matches every per-agent update channel.
pub const UPDATES_CHANNEL_PATTERN: &str = "ibex:directive:updates:*";

/// Channel whose messages invalidate every cached directive.
pub const FLUSH_CHANNEL: &str = "ibex:directive:flush";

/// The update channel of one agent: `ibex:directive:updates:{agent_id}`.
pub fn updates_channel(agent_id: impl Display) -> String {
    format!("{UPDATES_CHANNEL_PREFIX}{agent_id}")
}

/// What a message on a channel asks for, by the channel's name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel<'a> {
    /// An update of one agent; the text after the prefix, not yet checked to be a
    /// UUID.
    Update(&'a str),
    /// Invalidate everything.
    Flush,
    /// An update (revocation) of one gateway API key; the text after
    /// [`KEY_UPDATES_CHANNEL_PREFIX`], not yet checked with [`is_key_sha256_hex`].
    Key(&'a str),
}

/// Reads a channel name: an update (with its unchecked agent id), a key update
/// (with its unchecked SHA-256 hex), the flush channel, or `None` for a channel
/// that is not part of the contract.
pub fn parse_channel(name: &str) -> Option<Channel<'_>> {
    if name == FLUSH_CHANNEL {
        return Some(Channel::Flush);
    }
    if let Some(hash) = name.strip_prefix(KEY_UPDATES_CHANNEL_PREFIX) {
        return Some(Channel::Key(hash));
    }
    name.strip_prefix(UPDATES_CHANNEL_PREFIX)
        .map(Channel::Update)
}

// ------------------------------------------------------------------ control endpoint

/// Path of the control listener's "invalidate all" endpoint (`POST`, answers 204);
/// `{INVALIDATE_PATH}/{agent_id}` invalidates one agent.
pub const INVALIDATE_PATH: &str = "/ibex/v1/invalidate";

/// The path that invalidates one agent: `/ibex/v1/invalidate/{agent_id}`.
pub fn invalidate_agent_path(agent_id: impl Display) -> String {
    format!("{INVALIDATE_PATH}/{agent_id}")
}

/// What an invalidation path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateTarget<'a> {
    /// Every agent (`/ibex/v1/invalidate`, with or without a trailing `/`).
    All,
    /// One agent; the last segment, not yet checked to be a UUID.
    Agent(&'a str),
    /// One gateway API key (`/ibex/v1/invalidate/key/{sha256hex}`); the text after
    /// [`INVALIDATE_KEY_PATH`]`/`, not yet checked with [`is_key_sha256_hex`].
    Key(&'a str),
}

/// Reads a control path (query string already removed): the invalidation it names,
/// or `None` when it is not an invalidation path at all (`/ibex/v1/invalidatex`).
/// `/ibex/v1/invalidate/key/{x}` is always a [`InvalidateTarget::Key`], whatever
/// `x` is; `/ibex/v1/invalidate/key` alone stays an (invalid) agent id.
pub fn parse_invalidate_path(path: &str) -> Option<InvalidateTarget<'_>> {
    match path.strip_prefix(INVALIDATE_PATH)? {
        "" | "/" => Some(InvalidateTarget::All),
        rest => {
            let rest = rest.strip_prefix('/')?;
            match rest.strip_prefix(INVALIDATE_KEY_SEGMENT) {
                Some(hash) => Some(InvalidateTarget::Key(hash)),
                None => Some(InvalidateTarget::Agent(rest)),
            }
        }
    }
}

// ------------------------------------------------------------------ gateway API keys

/// Length of a key's SHA-256 in hex: 64 characters.
pub const KEY_SHA256_HEX_LEN: usize = 64;

/// True when `s` is a key's SHA-256 as the wire spells it: exactly 64 lower-case
/// hex characters (`0-9a-f`). Upper case is refused, so one key has one spelling
/// in every cache, channel and path.
pub fn is_key_sha256_hex(s: &str) -> bool {
    s.len() == KEY_SHA256_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The wire spelling of a SHA-256 digest: 64 lower-case hex characters. The digest
/// is SHA-256 over the exact bytes of the key as the client presents it (after
/// `Bearer ` when it comes in `authorization`), nothing added or trimmed.
pub fn key_sha256_hex(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(KEY_SHA256_HEX_LEN);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The digest a [`is_key_sha256_hex`] string spells, or `None` when it is not one
/// (wrong length, upper case, not hex).
pub fn parse_key_sha256_hex(s: &str) -> Option<[u8; 32]> {
    if !is_key_sha256_hex(s) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *byte = (nibble(*hi)? << 4) | nibble(*lo)?;
    }
    Some(out)
}

/// Redis key prefix of key-to-agent entries: `agent_key:{sha256hex}`. Fixed (not
/// the directive's `redis.key_prefix`). The value is the agent id (lower-case
/// hyphenated UUID), the empty string for "no such key, or revoked" (kept for the
/// negative TTL), or a [`TOMBSTONE`] the subscriber wrote after a revocation.
/// Every such key is written with a TTL. The flush markers of these entries are
/// [`flush_marker_key`]`(AGENT_KEY_PREFIX, slot)`, `agent_key:__flush__{<tag>}`
/// (never a valid hash, so they cannot collide with an entry).
pub const AGENT_KEY_PREFIX: &str = "agent_key:";

/// The Redis key of one key's entry: `agent_key:{sha256hex}`.
pub fn agent_key_redis_key(key_sha256_hex: &str) -> String {
    format!("{AGENT_KEY_PREFIX}{key_sha256_hex}")
}

/// Channel prefix of key updates: `companion revoke-key` publishes
/// `ibex:agent_key:updates:{sha256hex}` after revoking that key in Postgres (the
/// payload is ignored).
pub const KEY_UPDATES_CHANNEL_PREFIX: &str = "ibex:agent_key:updates:";

/// The `PSUBSCRIBE` pattern that matches every key update channel. It does not
/// overlap [`UPDATES_CHANNEL_PATTERN`].
pub const KEY_UPDATES_CHANNEL_PATTERN: &str = "ibex:agent_key:updates:*";

/// The update channel of one key: `ibex:agent_key:updates:{sha256hex}`.
pub fn key_updates_channel(key_sha256_hex: &str) -> String {
    format!("{KEY_UPDATES_CHANNEL_PREFIX}{key_sha256_hex}")
}

/// Store path prefix of key lookups. `GET /v1/keys/{sha256hex}` answers 200
/// `{"key_sha256":"…","agent_id":"…"}` for an active key, 200
/// `{"key_sha256":"…","agent_id":null}` for an unknown or revoked one, 400
/// (`invalid_key_sha256`) for a malformed hash and 503 (`store_unavailable`) when
/// Postgres is unreachable or slow.
pub const STORE_KEYS_PATH: &str = "/v1/keys";

/// The store path that resolves one key: `/v1/keys/{sha256hex}`.
pub fn store_key_path(key_sha256_hex: &str) -> String {
    format!("{STORE_KEYS_PATH}/{key_sha256_hex}")
}

/// The segment after [`INVALIDATE_PATH`]`/` that names a key invalidation.
const INVALIDATE_KEY_SEGMENT: &str = "key/";

/// Path prefix of the control listener's key invalidation:
/// `POST /ibex/v1/invalidate/key/{sha256hex}` drops that key's L1 entry (answers
/// 204, like the agent path). A control role that predates keys answers 404 (or
/// 400, reading `key/…` as a bad agent id); the subscriber then falls back to
/// `POST /ibex/v1/invalidate` on that listener once, without retrying the key path.
pub const INVALIDATE_KEY_PATH: &str = "/ibex/v1/invalidate/key";

/// The control path that invalidates one key: `/ibex/v1/invalidate/key/{sha256hex}`.
pub fn invalidate_key_path(key_sha256_hex: &str) -> String {
    format!("{INVALIDATE_KEY_PATH}/{key_sha256_hex}")
}

// ------------------------------------------------------------------ headers

/// Request header the filter adds when `debug_headers` is on: the tier that
/// answered (`local`, `redis`, `store`, `stale` or `none`).
pub const DEBUG_HEADER: &str = "x-ibex-directive";

#[cfg(test)]
mod tests {

    #[test]
    fn directive_values_carry_their_version_or_none() {
        let id = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
        let v = versioned_directive_value(id, "Be terse.").into_bytes();
        assert_eq!(
            read_directive_value(&v),
            DirectiveValue::Text {
                version: Some(id),
                text: b"Be terse."
            }
        );
        assert!(is_tombstone(&v), "older filters read it as a tombstone");
        assert_eq!(
            read_directive_value(b"plain"),
            DirectiveValue::Text {
                version: None,
                text: b"plain"
            }
        );
        assert_eq!(
            read_directive_value(b""),
            DirectiveValue::Text {
                version: None,
                text: b""
            }
        );
        for tomb in [
            &b"\0"[..],
            b"\0v",
            b"\0v6f1c1a3e-5b7d-4c2a-9e0f-123456789ab",
            b"\0v6F1C1A3E-5B7D-4C2A-9E0F-123456789ABC text",
            b"\0x6f1c1a3e-5b7d-4c2a-9e0f-123456789abc",
        ] {
            assert_eq!(
                read_directive_value(tomb),
                DirectiveValue::Tombstone,
                "{tomb:?}"
            );
        }
    }

    use super::*;

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    #[test]
    fn redis_names() {
        assert_eq!(
            redis_key(DEFAULT_KEY_PREFIX, AGENT),
            "directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"
        );
        assert!(flush_marker_key(DEFAULT_KEY_PREFIX, 0).starts_with("directive:__flush__{"));
        assert!(flush_marker_key("d:", 1).starts_with("d:__flush__{"));
    }

    #[test]
    fn tombstones_start_with_nul() {
        assert!(is_tombstone(TOMBSTONE.as_bytes()));
        assert!(is_tombstone(b"\0ab"));
        assert!(!is_tombstone(b""));
        assert!(!is_tombstone(b"Be terse.\0"));
    }

    #[test]
    fn channels_round_trip() {
        let ch = updates_channel(AGENT);
        assert_eq!(ch, format!("ibex:directive:updates:{AGENT}"));
        assert_eq!(parse_channel(&ch), Some(Channel::Update(AGENT)));
        assert_eq!(parse_channel(FLUSH_CHANNEL), Some(Channel::Flush));
        assert_eq!(
            parse_channel("ibex:directive:updates:"),
            Some(Channel::Update(""))
        );
        assert_eq!(parse_channel("ibex:directive:flushx"), None);
        assert_eq!(parse_channel("other"), None);
        assert_eq!(
            UPDATES_CHANNEL_PATTERN.strip_suffix('*'),
            Some(UPDATES_CHANNEL_PREFIX)
        );
    }

    #[test]
    fn invalidate_paths_round_trip() {
        let p = invalidate_agent_path(AGENT);
        assert_eq!(p, format!("/ibex/v1/invalidate/{AGENT}"));
        assert_eq!(
            parse_invalidate_path(&p),
            Some(InvalidateTarget::Agent(AGENT))
        );
        assert_eq!(
            parse_invalidate_path(INVALIDATE_PATH),
            Some(InvalidateTarget::All)
        );
        assert_eq!(
            parse_invalidate_path("/ibex/v1/invalidate/"),
            Some(InvalidateTarget::All)
        );
        assert_eq!(
            parse_invalidate_path("/ibex/v1/invalidate/nope"),
            Some(InvalidateTarget::Agent("nope"))
        );
        assert_eq!(parse_invalidate_path("/ibex/v1/invalidatex"), None);
        assert_eq!(parse_invalidate_path("/ibex/v1"), None);
        assert_eq!(parse_invalidate_path("/other"), None);
    }

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn key_hash_validator() {
        assert!(is_key_sha256_hex(HASH));
        assert!(is_key_sha256_hex(&"0".repeat(64)));
        assert!(!is_key_sha256_hex(&HASH.to_ascii_uppercase()));
        assert!(!is_key_sha256_hex(&HASH[..63]));
        assert!(!is_key_sha256_hex(&format!("{HASH}0")));
        assert!(!is_key_sha256_hex(""));
        assert!(!is_key_sha256_hex(&"g".repeat(64)));
        assert!(!is_key_sha256_hex(FLUSH_MARKER_SUFFIX));
        // 64 bytes but not 64 ASCII characters.
        assert!(!is_key_sha256_hex(&"é".repeat(32)));
    }

    #[test]
    fn key_hash_hex_round_trips() {
        let mut digest = [0u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::try_from(i * 8).unwrap_or(0) ^ 0xa5;
        }
        let hex = key_sha256_hex(&digest);
        assert!(is_key_sha256_hex(&hex));
        assert_eq!(parse_key_sha256_hex(&hex), Some(digest));
        assert_eq!(key_sha256_hex(&[0xff; 32]), "f".repeat(64));
        assert_eq!(parse_key_sha256_hex(&HASH.to_ascii_uppercase()), None);
        assert_eq!(parse_key_sha256_hex("ab"), None);
    }

    #[test]
    fn key_names() {
        assert_eq!(agent_key_redis_key(HASH), format!("agent_key:{HASH}"));
        assert!(flush_marker_key(AGENT_KEY_PREFIX, 7).starts_with("agent_key:__flush__{"));
        assert_eq!(
            key_updates_channel(HASH),
            format!("ibex:agent_key:updates:{HASH}")
        );
        assert_eq!(
            KEY_UPDATES_CHANNEL_PATTERN.strip_suffix('*'),
            Some(KEY_UPDATES_CHANNEL_PREFIX)
        );
        assert!(!KEY_UPDATES_CHANNEL_PREFIX.starts_with(UPDATES_CHANNEL_PREFIX));
        assert_eq!(store_key_path(HASH), format!("/v1/keys/{HASH}"));
        assert_eq!(
            invalidate_key_path(HASH),
            format!("/ibex/v1/invalidate/key/{HASH}")
        );
    }

    #[test]
    fn key_channels_parse() {
        assert_eq!(
            parse_channel(&key_updates_channel(HASH)),
            Some(Channel::Key(HASH))
        );
        assert_eq!(
            parse_channel("ibex:agent_key:updates:"),
            Some(Channel::Key(""))
        );
        assert_eq!(parse_channel("ibex:agent_key:updatesx"), None);
        // The agent channel is unaffected.
        assert_eq!(
            parse_channel(&updates_channel(AGENT)),
            Some(Channel::Update(AGENT))
        );
    }

    #[test]
    fn key_invalidate_paths_parse() {
        assert_eq!(
            parse_invalidate_path(&invalidate_key_path(HASH)),
            Some(InvalidateTarget::Key(HASH))
        );
        assert_eq!(
            parse_invalidate_path("/ibex/v1/invalidate/key/"),
            Some(InvalidateTarget::Key(""))
        );
        assert_eq!(
            parse_invalidate_path("/ibex/v1/invalidate/key"),
            Some(InvalidateTarget::Agent("key"))
        );
        assert_eq!(
            parse_invalidate_path(&invalidate_agent_path(AGENT)),
            Some(InvalidateTarget::Agent(AGENT))
        );
    }

    #[test]
    fn debug_header_is_lower_case() {
        assert_eq!(DEBUG_HEADER, DEBUG_HEADER.to_ascii_lowercase());
    }
}
