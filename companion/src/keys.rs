//! Gateway API keys (SPEC §3.1): generating one, and the SHA-256 that is the
//! only form in which a key is ever stored, cached, published or logged.
//!
//! A key is `ibex_` followed by 43 base64url characters (32 bytes from the OS
//! RNG, 256 bits, no padding). It exists in clear only inside [`ApiKey`], whose
//! `Debug` is redacted and which has no `Display`: `issue-key` prints it once on
//! stdout, `revoke-key --key-stdin` hashes it, and nothing else ever sees it.
//! [`KeySha256`] is the digest, spelt on the wire as 64 lower-case hex
//! characters ([`ibex_wire::key_sha256_hex`]); it is not secret, but it names a
//! credential, so it is treated like an id (debug logs at most).

use std::fmt;

use ibex_wire::Redacted;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Prefix of every key `issue-key` makes: easy to recognise for a secret scanner
/// and for an operator who pasted the wrong thing.
pub const KEY_PREFIX: &str = "ibex_";

/// Random bytes in a key.
pub const KEY_RANDOM_BYTES: usize = 32;

/// A gateway API key in clear. Redacted in `Debug`; read only through
/// [`ApiKey::expose`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey(Redacted<String>);

impl ApiKey {
    /// A new key: [`KEY_PREFIX`] + base64url of 32 bytes from the OS RNG.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; KEY_RANDOM_BYTES];
        getrandom::fill(&mut bytes)
            .map_err(|e| Error::Config(format!("the OS random number generator failed: {e}")))?;
        let mut key = String::with_capacity(KEY_PREFIX.len() + 43);
        key.push_str(KEY_PREFIX);
        base64url(&bytes, &mut key);
        Ok(Self(Redacted::new(key)))
    }

    /// Wraps a key an operator supplied (`revoke-key --key-stdin`): surrounding
    /// whitespace (the newline of `echo`) is dropped; an empty key is refused.
    pub fn from_input(raw: &str) -> Result<Self> {
        let key = raw.trim();
        if key.is_empty() {
            return Err(Error::InvalidInput(
                "the key read from stdin is empty".into(),
            ));
        }
        Ok(Self(Redacted::new(key.to_owned())))
    }

    /// The key in clear: for stdout of `issue-key` only, never a logger.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// Its SHA-256, over exactly the bytes a client presents.
    pub fn sha256(&self) -> KeySha256 {
        KeySha256::of(self.expose().as_bytes())
    }
}

/// The SHA-256 of a key: what Postgres stores (`bytea`, 32 bytes) and what the
/// wire spells as 64 lower-case hex characters (`Display`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeySha256(pub [u8; 32]);

impl KeySha256 {
    /// SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Parses the wire spelling (64 lower-case hex characters, nothing else).
    pub fn parse(hex: &str) -> Option<Self> {
        ibex_wire::parse_key_sha256_hex(hex).map(Self)
    }

    /// Reads the 32 bytes of a `bytea` column.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// The wire spelling: 64 lower-case hex characters.
    pub fn hex(&self) -> String {
        ibex_wire::key_sha256_hex(&self.0)
    }
}

impl fmt::Display for KeySha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for KeySha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySha256({})", self.hex())
    }
}

impl serde::Serialize for KeySha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

/// Appends the unpadded base64url (RFC 4648 §5) encoding of `bytes` to `out`.
fn base64url(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut push = |six: u32| out.push(char::from(ALPHABET[(six & 0x3f) as usize]));
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        push(n >> 18);
        push(n >> 12);
        if chunk.len() > 1 {
            push(n >> 6);
        }
        if chunk.len() > 2 {
            push(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_known_vectors() {
        assert_eq!(
            KeySha256::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            KeySha256::of(b"test").hex(),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn generated_keys_are_prefixed_random_and_redacted() {
        let a = ApiKey::generate().unwrap();
        let b = ApiKey::generate().unwrap();
        assert_ne!(a, b);
        let body = a.expose().strip_prefix(KEY_PREFIX).unwrap();
        assert_eq!(body.len(), 43);
        assert!(body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(body), "{dbg}");
        assert!(ibex_wire::is_key_sha256_hex(&a.sha256().to_string()));
    }

    #[test]
    fn base64url_matches_rfc4648() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff], "-_8"),
        ] {
            let mut out = String::new();
            base64url(input, &mut out);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn input_keys_are_trimmed_and_hash_round_trips() {
        let k = ApiKey::from_input("  ibex_abc\n").unwrap();
        assert_eq!(k.expose(), "ibex_abc");
        assert_eq!(k.sha256(), KeySha256::of(b"ibex_abc"));
        assert!(ApiKey::from_input(" \n").is_err());
        let h = k.sha256();
        assert_eq!(KeySha256::parse(&h.hex()), Some(h));
        assert_eq!(KeySha256::from_bytes(&h.0), Some(h));
        assert_eq!(KeySha256::from_bytes(&[0; 31]), None);
        assert_eq!(KeySha256::parse(&h.hex().to_ascii_uppercase()), None);
    }
}
