//! Redis Cluster hash slots, and the per-slot flush markers built on them.
//!
//! A Redis Cluster runs a multi-key command (or a script's keys) only when every
//! key lies in one of its 16384 hash slots, else it answers `CROSSSLOT`. The
//! filter's conditional write-back reads two keys: the entry and a flush marker.
//! One marker for all entries cannot share a slot with all of them, so there is
//! one marker per slot: `{prefix}__flush__{<tag>}`, where `<tag>` is a Redis hash
//! tag that puts the marker into the slot it stands for ([`slot_tag`]). On a
//! flush the subscriber sets all 16384 ([`flush_marker_key`] for every slot); the
//! write-back checks the one in its entry's slot ([`flush_marker_for`]). The same
//! scheme runs on a single Redis, so there is one behaviour, tested everywhere.
//!
//! Slots are computed as Redis computes them: CRC16-XMODEM of the key, or of its
//! hash tag (the text between the first `{` and the next `}`, when not empty),
//! modulo 16384 ([`key_slot`]).
//!
//! # The tags
//!
//! A tag is 4 characters from `@ABCDEFGHIJKLMNO` (`0x40 | n`, 4 bits each). CRC16
//! with a zero start and no final XOR is linear over GF(2): the CRC of a tag is
//! the CRC of `@@@@` XORed with the CRCs of the bits set in it. Of those 16 bit
//! columns 14 are independent in the slot's 14 bits, so every slot has a tag, and
//! the one chosen (the others' bits left zero) is found by solving that linear
//! system once, at compile time ([`INVERSE`]): no table, no search, a few XORs
//! per write-back.
//!
//! What it must never do: allocate beyond the key it returns, or hold state.

/// Number of Redis Cluster hash slots.
pub const SLOTS: u16 = 16384;

/// CRC16-XMODEM (polynomial 0x1021, start 0, no reflection, no final XOR): the
/// checksum Redis Cluster hashes keys with.
pub const fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    let mut i = 0;
    while i < data.len() {
        crc ^= (data[i] as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        i += 1;
    }
    crc
}

/// The part of `key` Redis hashes: its hash tag (between the first `{` and the
/// first `}` after it) when that is not empty, else the whole key.
pub fn hashed_part(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let after = key.get(open + 1..).unwrap_or_default();
    match after.iter().position(|&b| b == b'}') {
        Some(close) if close > 0 => after.get(..close).unwrap_or(key),
        _ => key,
    }
}

/// The hash slot of `key`, as `CLUSTER KEYSLOT` answers.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS
}

/// Length of a slot's tag.
pub const TAG_LEN: usize = 4;

/// The tag with no bit set: every tag is this XOR the bits of its slot's solution.
const BASE: [u8; TAG_LEN] = [0x40; TAG_LEN];

/// Bits a tag can vary: 4 per character.
const TAG_BITS: usize = 4 * TAG_LEN;

/// Bits of a slot.
const SLOT_BITS: usize = 14;

/// The tag with only bit `i` set (bit `i % 4` of character `i / 4`).
const fn tag_with_bit(i: usize) -> [u8; TAG_LEN] {
    let mut t = BASE;
    t[i / 4] |= 1 << (i % 4);
    t
}

/// For every slot bit `j`, the tag bits whose columns XOR to exactly that slot
/// bit: Gaussian elimination over GF(2) on the 16 columns `crc16(tag with bit i) ^
/// crc16(BASE)` (the CRC's linear part) restricted to 14 bits. A column that adds
/// nothing to the basis is never used, so each slot gets one tag. A singular
/// system would leave zeros here, and the unit test that checks every slot's tag
/// would fail.
const INVERSE: [u16; SLOT_BITS] = {
    const MASK: u16 = SLOTS - 1;
    let base = crc16(&BASE);
    // basis[b]: a column combination (value, tag bits) whose highest slot bit is b.
    let mut basis_value = [0u16; SLOT_BITS];
    let mut basis_combo = [0u16; SLOT_BITS];
    let mut i = 0;
    while i < TAG_BITS {
        let mut value = (crc16(&tag_with_bit(i)) ^ base) & MASK;
        let mut combo: u16 = 1 << i;
        let mut b = SLOT_BITS;
        while b > 0 {
            b -= 1;
            if value & (1 << b) != 0 {
                if basis_value[b] == 0 {
                    basis_value[b] = value;
                    basis_combo[b] = combo;
                    break;
                }
                value ^= basis_value[b];
                combo ^= basis_combo[b];
            }
        }
        i += 1;
    }
    // Express every unit vector through the basis, highest bit first.
    let mut inverse = [0u16; SLOT_BITS];
    let mut j = 0;
    while j < SLOT_BITS {
        let mut value: u16 = 1 << j;
        let mut combo: u16 = 0;
        let mut b = SLOT_BITS;
        while b > 0 {
            b -= 1;
            if value & (1 << b) != 0 && basis_value[b] != 0 {
                value ^= basis_value[b];
                combo ^= basis_combo[b];
            }
        }
        inverse[j] = combo;
        j += 1;
    }
    inverse
};

/// A hash tag whose slot is `slot` (taken modulo [`SLOTS`]): 4 characters of
/// `@A-O`, never `{` or `}`, and safe unescaped in a URL path segment.
pub fn slot_tag(slot: u16) -> [u8; TAG_LEN] {
    let target = (slot ^ crc16(&BASE)) % SLOTS;
    let mut bits: u16 = 0;
    for (j, combo) in INVERSE.iter().enumerate() {
        if target & (1 << j) != 0 {
            bits ^= combo;
        }
    }
    let mut tag = BASE;
    for (k, c) in tag.iter_mut().enumerate() {
        // Four bits per character; `k < 4`, so the shift stays below 16.
        *c |= ((bits >> (4 * k)) & 0x0f) as u8;
    }
    tag
}

/// Suffix of every flush marker after the prefix, before its hash tag.
pub const FLUSH_MARKER_SUFFIX: &str = "__flush__";

/// The flush marker of `slot` for entries under `prefix`:
/// `{prefix}__flush__{<tag>}`, a key in that slot (when `prefix` passes
/// [`is_cluster_safe_prefix`]).
pub fn flush_marker_key(prefix: &str, slot: u16) -> String {
    let tag = slot_tag(slot);
    let mut out = String::with_capacity(prefix.len() + FLUSH_MARKER_SUFFIX.len() + TAG_LEN + 2);
    out.push_str(prefix);
    out.push_str(FLUSH_MARKER_SUFFIX);
    out.push('{');
    // The tag is ASCII by construction.
    out.extend(tag.iter().map(|&b| char::from(b)));
    out.push('}');
    out
}

/// The flush marker that guards the write-back of `key` (an entry under
/// `prefix`): the marker of `key`'s slot, so the write-back's two keys share a
/// slot.
pub fn flush_marker_for(prefix: &str, key: &str) -> String {
    flush_marker_key(prefix, key_slot(key.as_bytes()))
}

/// True for a flush marker under `prefix` (`{prefix}__flush__…`): never an entry
/// (an agent id or a key hash never starts with `_`), so the REST front refuses to
/// let the filter's token write one and the flush sweep spares them.
pub fn is_flush_marker(prefix: &str, key: &[u8]) -> bool {
    key.strip_prefix(prefix.as_bytes())
        .is_some_and(|rest| rest.starts_with(FLUSH_MARKER_SUFFIX.as_bytes()))
}

/// True when entries under `prefix` and their flush markers always share a slot:
/// either `prefix` holds no `{`, or its first `{` opens a non-empty hash tag that
/// closes inside `prefix` (then every entry and every marker hashes that tag). A
/// `{` without its `}` in the prefix, or `{}`, would make Redis hash the marker's
/// own braces differently from the entry.
pub fn is_cluster_safe_prefix(prefix: &str) -> bool {
    let b = prefix.as_bytes();
    match b.iter().position(|&c| c == b'{') {
        None => true,
        Some(open) => b
            .get(open + 1..)
            .and_then(|after| after.iter().position(|&c| c == b'}'))
            .is_some_and(|close| close > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem() {
        // The test vector of the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"a{b"), crc16(b"a{b") % SLOTS);
    }

    #[test]
    fn every_slot_has_its_own_tag() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert!(tag.iter().all(|b| (0x40..=0x4f).contains(b)), "{tag:?}");
            assert_eq!(key_slot(&tag), slot, "{tag:?}");
            assert!(seen.insert(tag));
            let marker = flush_marker_key("directive:", slot);
            assert_eq!(key_slot(marker.as_bytes()), slot, "{marker}");
        }
    }

    #[test]
    fn markers_share_their_entrys_slot() {
        for prefix in [
            "directive:",
            "agent_key:",
            "d:",
            "{ibex}:",
            "x{t}y:",
            "a}b:",
        ] {
            assert!(is_cluster_safe_prefix(prefix), "{prefix}");
            for agent in [
                "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc",
                "00000000-0000-0000-0000-000000000000",
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            ] {
                let key = format!("{prefix}{agent}");
                let marker = flush_marker_for(prefix, &key);
                assert_eq!(
                    key_slot(marker.as_bytes()),
                    key_slot(key.as_bytes()),
                    "{key} {marker}"
                );
                assert!(is_flush_marker(prefix, marker.as_bytes()));
                assert!(!is_flush_marker(prefix, key.as_bytes()));
            }
        }
        assert_eq!(
            flush_marker_for(
                "directive:",
                "directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"
            ),
            flush_marker_key(
                "directive:",
                key_slot(b"directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc")
            )
        );
    }

    #[test]
    fn tags_are_pinned() {
        // stack/contract.py computes the same names; tests/test_redis_cluster.py
        // pins the same values, so both sides stay in step.
        assert_eq!(
            flush_marker_for(
                "directive:",
                "directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"
            ),
            "directive:__flush__{DHJ@}"
        );
        assert_eq!(&slot_tag(0), b"DLH@");
        assert_eq!(&slot_tag(13881), b"@@@@");
        assert_eq!(&slot_tag(16383), b"EKCA");
    }

    #[test]
    fn unsafe_prefixes_are_named() {
        for prefix in ["a{b:", "{}:", "{", "x{}{y}:"] {
            assert!(!is_cluster_safe_prefix(prefix), "{prefix}");
        }
        assert!(is_cluster_safe_prefix(""));
    }
}
