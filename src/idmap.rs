//! Hash maps keyed by ids this filter or Envoy assigns (context ids, callout
//! tokens, fill ids): hashed by one multiplication instead of SipHash.
//!
//! SipHash is there to stop a client from choosing keys that collide; nobody
//! outside picks these ids (Envoy numbers contexts and callouts in sequence, the
//! worker numbers fills), so the keyed hash only costs: about a hundred
//! instructions a lookup, several lookups a request. Never use this for a key a
//! request carries (a path, an agent id, an API key): those keep `std`'s hasher.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by an id nobody outside chooses.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
/// A set of ids nobody outside chooses.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of integer ids: the product by 2^64/φ spreads consecutive ids
/// over the high bits the table uses for its tags, and keeps them distinct in the
/// low bits it indexes by.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

const PHI: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
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

    #[test]
    fn consecutive_ids_hash_apart() {
        let hash = |n: u32| {
            let mut h = IdHasher::default();
            h.write_u32(n);
            h.finish()
        };
        // The top 7 bits (hashbrown's tags) differ for most neighbours.
        let distinct: std::collections::HashSet<u64> = (0..128).map(|n| hash(n) >> 57).collect();
        assert!(distinct.len() > 64, "{}", distinct.len());
    }
}
