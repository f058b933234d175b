//! Gateway API keys (`agent.source = "api_key"`, SPEC §3.1): reading the key a
//! client presents and reducing it to the only form anything else ever sees, its
//! SHA-256 ([`KeyHash`]).
//!
//! The key is hashed as soon as it is read; from then on the filter knows it only by
//! its hash: the L1 key, the Redis key, the store path, the control path and every
//! log line use the hash in lower-case hex. The key itself must never be logged,
//! counted, cached or kept past admission (`Presented` does not implement `Debug`
//! with its contents).
//!
//! Pure: no host calls.

use sha2::{Digest, Sha256};

/// Longest key accepted, in bytes. Keys issued by the companion are 48 bytes; a
/// longer value is no key of ours, and refusing it bounds the hashing work.
pub const MAX_KEY_LEN: usize = 512;

/// A key's SHA-256, the only form in which the filter keeps or sends a key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// The hash of a key's exact bytes.
    pub fn of(key: &[u8]) -> KeyHash {
        KeyHash(Sha256::digest(key).into())
    }

    /// The hash a wire spelling names (64 lower-case hex characters), or `None`.
    pub fn parse_hex(hex: &str) -> Option<KeyHash> {
        ibex_wire::parse_key_sha256_hex(hex).map(KeyHash)
    }

    /// The wire spelling: 64 lower-case hex characters.
    pub fn hex(&self) -> String {
        ibex_wire::key_sha256_hex(&self.0)
    }
}

/// Logs and `Debug` show only the first 12 hex characters: enough to match a line
/// with `companion list-keys`, and the hash is no secret anyway.
impl std::fmt::Display for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.hex();
        write!(f, "{}…", hex.get(..12).unwrap_or(&hex))
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

/// What the key header of a request holds, as far as admission is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// No key header: no agent (401 `missing_agent_id`).
    Missing,
    /// A header that holds no well-formed key (another `authorization` scheme, an
    /// empty or oversized key, bytes outside visible ASCII): 401 `invalid_api_key`
    /// without a lookup.
    Malformed,
    /// A well-formed key, already hashed.
    Key(KeyHash),
}

/// Reads the key header's value. With `bearer` (the header is `authorization`) the
/// value must be `Bearer <key>`, the scheme in any case, one or more spaces after it;
/// otherwise the whole value is the key. Surrounding spaces and tabs are not part of
/// it. A key is visible ASCII only (`!` to `~`), so two header lines joined by `, `
/// are never read as one key.
pub fn read(value: Option<&str>, bearer: bool) -> Presented {
    let Some(value) = value else {
        return Presented::Missing;
    };
    let value = value.trim_matches([' ', '\t']);
    let key = if bearer {
        match value.split_once([' ', '\t']) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
                rest.trim_start_matches([' ', '\t'])
            }
            _ => return Presented::Malformed,
        }
    } else {
        value
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Presented::Malformed;
    }
    Presented::Key(KeyHash::of(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ibex_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";

    #[test]
    fn hashes_match_known_vectors() {
        // SHA-256("test"), as `sha256sum` prints it.
        assert_eq!(
            KeyHash::of(b"test").hex(),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        let h = KeyHash::of(KEY.as_bytes());
        assert_eq!(KeyHash::parse_hex(&h.hex()), Some(h));
        assert!(!format!("{h:?} {h}").contains(KEY));
        assert_eq!(format!("{}", KeyHash::of(b"test")), "9f86d081884c…");
    }

    #[test]
    fn bearer_values_are_read_strictly() {
        let want = Presented::Key(KeyHash::of(KEY.as_bytes()));
        for ok in [
            format!("Bearer {KEY}"),
            format!("bearer {KEY}"),
            format!("BEARER   {KEY}  "),
            format!(" Bearer\t{KEY}"),
        ] {
            assert_eq!(read(Some(&ok), true), want, "{ok}");
        }
        assert_eq!(read(None, true), Presented::Missing);
        for bad in [
            String::new(),
            "Bearer".to_string(),
            "Bearer ".to_string(),
            KEY.to_string(),
            format!("Basic {KEY}"),
            format!("Bearerx {KEY}"),
            format!("Bearer {KEY}, Bearer other"),
            format!("Bearer {KEY} extra"),
            format!("Bearer {KEY}\u{e9}"),
            format!("Bearer {KEY}\u{fffd}"),
            format!("Bearer {}", "k".repeat(MAX_KEY_LEN + 1)),
        ] {
            assert_eq!(read(Some(&bad), true), Presented::Malformed, "{bad:?}");
        }
        let longest = "k".repeat(MAX_KEY_LEN);
        assert!(matches!(
            read(Some(&format!("Bearer {longest}")), true),
            Presented::Key(_)
        ));
    }

    #[test]
    fn plain_headers_hold_the_key_itself() {
        let want = Presented::Key(KeyHash::of(KEY.as_bytes()));
        assert_eq!(read(Some(KEY), false), want);
        assert_eq!(read(Some(&format!(" {KEY}\t")), false), want);
        // `Bearer x` in a plain header is a key with a space in it: malformed.
        assert_eq!(
            read(Some(&format!("Bearer {KEY}")), false),
            Presented::Malformed
        );
        assert_eq!(read(Some(""), false), Presented::Malformed);
        assert_eq!(read(None, false), Presented::Missing);
    }
}
