//! Hash maps keyed by ids this filter or Envoy assigns (context ids, callout
//! tokens, fill ids): hashed by two multiplications instead of SipHash.
//!
//! SipHash is there to stop a client from choosing keys that collide; nobody
//! outside picks these ids (Envoy numbers contexts and callouts in sequence, the
//! worker numbers fills), so the keyed hash only costs: about a hundred
//! instructions a lookup, several lookups a request. A client can still choose
//! which ids stay alive (by holding some requests open), so every bit of an id
//! reaches the bits the table indexes by: ids spaced by a power of two do not pile
//! up in one probe sequence. Never use this for a key a request carries (a path,
//! an agent id, an API key): those keep `std`'s hasher.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by an id nobody outside chooses.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
/// A set of ids nobody outside chooses.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of integer ids: the product by 2^64/φ mixes an id into its
/// high bits, which `finish` folds onto the low ones (the table indexes by the low
/// bits, and takes its tags from the top of a 64-bit hash, or from bits 25..31 of a
/// 32-bit one on wasm32).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

const PHI: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The product's low bits depend only on the id's low bits: without the fold,
        // ids spaced by 2^k would all start probing at the same slot. A second round
        // spreads ids that differ only in a few high bits (two multiplications in
        // all: still a tenth of SipHash).
        let h = (self.0 ^ (self.0 >> 32)).wrapping_mul(PHI);
        h ^ (h >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached by the integer ids this is for; correct for anything else.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(PHI);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(PHI);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_and_kept_apart() {
        let mut map: IdMap<u32, u32> = IdMap::default();
        for id in 0..10_000u32 {
            map.insert(id.wrapping_mul(7), id);
        }
        for id in 0..10_000u32 {
            assert_eq!(map.get(&id.wrapping_mul(7)), Some(&id));
        }
        assert_eq!(map.len(), 10_000);
        let mut set: IdSet<u64> = IdSet::default();
        assert!(set.insert(u64::MAX) && set.insert(0) && !set.insert(0));
    }

    fn hash(n: u32) -> u64 {
        let mut h = IdHasher::default();
        h.write_u32(n);
        h.finish()
    }

    #[test]
    fn consecutive_ids_hash_apart() {
        // Tags: the top 7 bits of a 64-bit hash, bits 25..31 of a 32-bit one.
        let tags64: std::collections::HashSet<u64> = (0..128).map(|n| hash(n) >> 57).collect();
        let tags32: std::collections::HashSet<u64> =
            (0..128).map(|n| (hash(n) as u32 >> 25).into()).collect();
        assert!(tags64.len() > 64, "{}", tags64.len());
        assert!(tags32.len() > 64, "{}", tags32.len());
    }

    #[test]
    fn ids_spaced_by_a_power_of_two_spread_over_the_slots() {
        // Ids a client could keep alive by holding every 4096th request open: their
        // slots in a 1024-slot table (the low 10 bits) must not coincide.
        for stride in [4u32, 64, 1024, 4096, 1 << 20] {
            let slots: std::collections::HashSet<u64> = (0..1000u32)
                .map(|i| hash(i.wrapping_mul(stride)) & 1023)
                .collect();
            // 1000 keys thrown at random into 1024 slots fill about 630 of them.
            assert!(slots.len() > 550, "stride {stride}: {} slots", slots.len());
        }
    }
}
