//! `ibex-wire`: the contract between the ibex-directive filter (inside Envoy, built
//! for wasm32) and its companion (native): everything both sides must spell the same
//! way, written once (SPEC §4, §6).
//!
//! - Redis: the key of an agent's directive ([`DEFAULT_KEY_PREFIX`], [`redis_key`]),
//!   the tombstone value the subscriber writes over a changed key ([`TOMBSTONE`]) and
//!   the flush marker that blocks write-backs after "invalidate all"
//!   ([`FLUSH_MARKER_SUFFIX`]).
//! - Pub/sub: the update and flush channels ([`UPDATES_CHANNEL_PREFIX`],
//!   [`FLUSH_CHANNEL`], [`parse_channel`]).
//! - The control endpoint of Envoy's control listener ([`INVALIDATE_PATH`],
//!   [`parse_invalidate_path`]).
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

pub use envelope::error_envelope;
pub use redacted::{Redacted, SecretLen};

use std::fmt::Display;

// ------------------------------------------------------------------ Redis keys

/// Default of the filter's `redis.key_prefix` and of the subscriber's
/// `--key-prefix`: an agent's directive lives at `directive:{agent_id}`.
pub const DEFAULT_KEY_PREFIX: &str = "directive:";

/// The Redis key of an agent's directive: `{prefix}{agent_id}` (the agent id in its
/// lower-case hyphenated UUID form).
pub fn redis_key(prefix: &str, agent_id: impl Display) -> String {
    format!("{prefix}{agent_id}")
}

/// Suffix of the flush marker key, `{prefix}__flush__`. The subscriber sets it for a
/// while after "invalidate all"; while it exists the filter's conditional write-back
/// writes nothing, so a fill that read old text cannot put it back into Redis.
pub const FLUSH_MARKER_SUFFIX: &str = "__flush__";

/// The flush marker key for `prefix`: `{prefix}__flush__`.
pub fn flush_marker_key(prefix: &str) -> String {
    format!("{prefix}{FLUSH_MARKER_SUFFIX}")
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
}

/// Reads a channel name: an update (with its unchecked agent id), the flush
/// channel, or `None` for a channel that is not part of the contract.
pub fn parse_channel(name: &str) -> Option<Channel<'_>> {
    if name == FLUSH_CHANNEL {
        return Some(Channel::Flush);
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
}

/// Reads a control path (query string already removed): the invalidation it names,
/// or `None` when it is not an invalidation path at all (`/ibex/v1/invalidatex`).
pub fn parse_invalidate_path(path: &str) -> Option<InvalidateTarget<'_>> {
    match path.strip_prefix(INVALIDATE_PATH)? {
        "" | "/" => Some(InvalidateTarget::All),
        rest => rest.strip_prefix('/').map(InvalidateTarget::Agent),
    }
}

// ------------------------------------------------------------------ headers

/// Request header the filter adds when `debug_headers` is on: the tier that
/// answered (`local`, `redis`, `store`, `stale` or `none`).
pub const DEBUG_HEADER: &str = "x-ibex-directive";

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    #[test]
    fn redis_names() {
        assert_eq!(
            redis_key(DEFAULT_KEY_PREFIX, AGENT),
            "directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"
        );
        assert_eq!(flush_marker_key(DEFAULT_KEY_PREFIX), "directive:__flush__");
        assert_eq!(flush_marker_key("d:"), "d:__flush__");
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

    #[test]
    fn debug_header_is_lower_case() {
        assert_eq!(DEBUG_HEADER, DEBUG_HEADER.to_ascii_lowercase());
    }
}
