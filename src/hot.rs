//! A worker VM's own copies of fresh L1 answers, so that a warm hit reads no entry
//! from shared data: no host call that copies the entry into the VM, no decode, no
//! allocation of the directive (copies share it, [`Known`] holds an `Rc`).
//!
//! **Exactly as coherent as L1.** A copy is served only while
//! - the **L1 epoch** in shared data is still the value read *before* the entry was
//!   read: the control role bumps the epoch after every tombstone it writes and
//!   after every generation bump ("invalidate all"), so any invalidation ends every
//!   copy on every worker at once (the next request re-reads shared data), and
//! - the entry's own freshness lasts (`fresh_until_ms`, the same instant).
//!
//! Every write the control role makes to L1 is followed by a bump, and a data
//! role's fill writes only under the CAS version and generation it read before its
//! tier's answer (`flow::l1`), so it cannot replace an entry a later invalidation
//! made. So a copy that passes both checks is the entry L1 would serve now, or one
//! as good (another worker's fill of the same answer). An epoch only a control role
//! creates: a VM without one (no control role, or one of an older build that would
//! not bump it) serves no copies.
//!
//! **Bounded.** Two halves of `cache.worker_copy_bytes / 2` each: copies go into
//! the young half; when it is full it becomes the old half (the previous old half is
//! dropped) and a copy found in the old half moves back to the young one. Each copy
//! counts its key, its payload and [`OVERHEAD`]. A copy larger than a half is not
//! kept.
//!
//! Keeps no tombstone and no stale answer. Makes no host calls; logs nothing.

use std::collections::HashMap;

use crate::entry::Known;

/// Bytes counted per copy beyond its key and payload: the map's slot (key string,
/// copy, control byte, at a load factor of 7/8), the key's heap block and the
/// `Rc`'s header, with the allocator's rounding. Measured natively at about 1.5 ×
/// a count of 64, so 128.
pub const OVERHEAD: usize = 128;

#[derive(Debug)]
struct HotCopy {
    known: Known,
    fresh_until_ms: u64,
    epoch: u64,
    bytes: usize,
}

impl HotCopy {
    fn serves(&self, epoch: u64, now_ms: u64) -> bool {
        self.epoch == epoch && now_ms < self.fresh_until_ms
    }
}

/// The copies of one worker VM (see the module doc).
#[derive(Debug, Default)]
pub struct Hot {
    young: HashMap<String, HotCopy>,
    old: HashMap<String, HotCopy>,
    young_bytes: usize,
}

impl Hot {
    /// The copy of `key`, if it still serves under L1 epoch `epoch` at `now_ms`. A
    /// copy that does not is dropped.
    pub fn get(&mut self, key: &str, epoch: u64, now_ms: u64, budget: usize) -> Option<Known> {
        if let Some(copy) = self.young.get(key) {
            if copy.serves(epoch, now_ms) {
                return Some(copy.known.clone());
            }
            if let Some(gone) = self.young.remove(key) {
                self.young_bytes = self.young_bytes.saturating_sub(gone.bytes);
            }
            return None;
        }
        let copy = self.old.remove(key)?;
        if !copy.serves(epoch, now_ms) {
            return None;
        }
        let known = copy.known.clone();
        self.insert(key.to_owned(), copy, budget);
        Some(known)
    }

    /// Keeps a copy of `key`'s fresh answer, read from shared data after the L1 epoch
    /// was read as `epoch`. `budget` is `cache.worker_copy_bytes`.
    pub fn put(
        &mut self,
        key: &str,
        known: &Known,
        fresh_until_ms: u64,
        epoch: u64,
        budget: usize,
    ) {
        let bytes = key.len() + payload_len(known) + OVERHEAD;
        if bytes > budget / 2 {
            return;
        }
        self.old.remove(key);
        let copy = HotCopy {
            known: known.clone(),
            fresh_until_ms,
            epoch,
            bytes,
        };
        self.insert(key.to_owned(), copy, budget);
    }

    fn insert(&mut self, key: String, copy: HotCopy, budget: usize) {
        if let Some(previous) = self.young.remove(&key) {
            self.young_bytes = self.young_bytes.saturating_sub(previous.bytes);
        }
        if self.young_bytes + copy.bytes > budget / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes += copy.bytes;
        self.young.insert(key, copy);
    }

    /// How many copies are kept, and the bytes the young half counts.
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        (self.young.len() + self.old.len(), self.young_bytes)
    }
}

fn payload_len(known: &Known) -> usize {
    match known {
        Known::Directive(escaped, _) => escaped.expose().len(),
        Known::Agent(_) => crate::agent::AGENT_ID_LEN,
        Known::NoDirective | Known::NoAgent => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Version;
    use ibex_wire::Redacted;
    use std::rc::Rc;

    fn directive(text: &str) -> Known {
        Known::Directive(Redacted::new(Rc::from(text)), Version::Unknown)
    }

    const MB: usize = 1 << 20;

    #[test]
    fn a_copy_serves_only_under_its_epoch_and_while_fresh() {
        let mut hot = Hot::default();
        hot.put("a", &directive("x"), 1_000, 7, MB);
        assert_eq!(hot.get("a", 7, 999, MB), Some(directive("x")));
        assert_eq!(hot.get("a", 8, 999, MB), None, "another epoch");
        assert_eq!(
            hot.get("a", 7, 999, MB),
            None,
            "dropped once it did not serve"
        );
        hot.put("a", &directive("x"), 1_000, 7, MB);
        assert_eq!(hot.get("a", 7, 1_000, MB), None, "expired at fresh_until");
        assert_eq!(hot.sizes().0, 0);
    }

    #[test]
    fn the_halves_bound_the_bytes_and_keep_what_is_used() {
        let budget = 2 * (3 * (1 + 10 + OVERHEAD));
        let mut hot = Hot::default();
        let text = "0123456789";
        for key in ["a", "b", "c"] {
            hot.put(key, &directive(text), 10, 1, budget);
        }
        assert_eq!(hot.sizes(), (3, 3 * (11 + OVERHEAD)));
        // The young half is full: the next copy turns it into the old half.
        hot.put("d", &directive(text), 10, 1, budget);
        assert_eq!(hot.sizes(), (4, 11 + OVERHEAD));
        // A copy used from the old half moves back to the young one.
        assert!(hot.get("a", 1, 0, budget).is_some());
        hot.put("e", &directive(text), 10, 1, budget);
        // Full again: b and c (old, unused) go; a, d, e stay.
        hot.put("f", &directive(text), 10, 1, budget);
        for key in ["a", "d", "e", "f"] {
            assert!(hot.get(key, 1, 0, budget).is_some(), "{key}");
        }
        for key in ["b", "c"] {
            assert!(hot.get(key, 1, 0, budget).is_none(), "{key}");
        }
    }

    #[test]
    fn a_copy_larger_than_a_half_is_not_kept_and_no_budget_keeps_nothing() {
        let mut hot = Hot::default();
        hot.put("a", &directive(&"x".repeat(1000)), 10, 1, 1000);
        hot.put("b", &Known::NoDirective, 10, 1, 0);
        assert_eq!(hot.sizes().0, 0);
        assert!(hot.get("a", 1, 0, 1000).is_none());
    }

    #[test]
    fn a_new_copy_replaces_the_old_one_of_its_key() {
        let mut hot = Hot::default();
        hot.put("a", &directive("old"), 10, 1, MB);
        hot.put("a", &directive("new"), 20, 2, MB);
        assert_eq!(hot.get("a", 2, 15, MB), Some(directive("new")));
        assert_eq!(hot.sizes(), (1, 1 + 3 + OVERHEAD));
    }
}
