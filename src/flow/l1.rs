//! L1: reading and writing an agent's entry in Envoy shared data, with the rules
//! that keep it coherent with invalidations (see the README's "Invalidation without
//! resurrection"):
//! - an entry is served only while fresh and not older than the global generation
//!   (a flush says "everything changed": nothing from before it is served, not even
//!   as stale);
//! - a fill writes under the CAS version it read when it started, so a tombstone
//!   written meanwhile by the control role wins;
//! - a key that does not exist yet is anchored with a placeholder first, because
//!   proxy-wasm checks CAS only for keys that exist.
//!
//! The entry's layout is `crate::entry`; this module only decides what to read and
//! when a write may land. It never logs directive text.

use crate::agent::AGENT_ID_LEN;
use crate::audit::Version;
use crate::entry::{self, Entry, Kind, Known};
use crate::host::{Host, HostError};
use crate::metrics::Counter;
use crate::worker::{Anchor, Fill, Stale, Worker};
use ibex_wire::Redacted;
use std::cell::RefCell;

/// What L1 says about an agent.
pub(super) enum Lookup {
    /// A fresh answer.
    Fresh(Known),
    /// Nothing fresh: what the key looked like, to anchor a fill on, and an expired
    /// entry still within the stale window, if any.
    Miss {
        /// The key's CAS version and the global generation, as read now.
        anchor: Anchor,
        /// Fallback while L2 and L3 fail.
        stale: Option<Stale>,
    },
}

/// Reads the agent's entry now: from the worker's hot copy when one still serves
/// (`crate::hot`: one read of the L1 epoch instead of the entry), else from shared
/// data, keeping a hot copy of a fresh answer. `copy_bytes` is
/// `cache.worker_copy_bytes` (0: no copies).
pub(super) fn lookup<H: Host>(
    host: &H,
    worker: &RefCell<Worker>,
    key: &str,
    stale_window_ms: u64,
    copy_bytes: usize,
) -> Lookup {
    // Read before the entry: a copy is stamped with the epoch that preceded it, so
    // an invalidation landing in between ends it at the next request.
    let epoch = match copy_bytes {
        0 => None,
        _ => entry::current_epoch(host),
    };
    let now = host.now_ms();
    if let Some(epoch) = epoch {
        if let Some(known) = worker.borrow_mut().hot.get(key, epoch, now, copy_bytes) {
            return Lookup::Fresh(known);
        }
    }
    let (raw, cas) = host.shared_get(key).unwrap_or((None, None));
    // After the entry: an anchor's generation is never older than its CAS version.
    let generation = entry::current_generation(host);
    let mut stale = None;
    if let Some(e) = raw.as_deref().and_then(Entry::decode) {
        if e.is_fresh(now, generation) {
            if let Some(known) = e.known() {
                if let Some(epoch) = epoch {
                    worker
                        .borrow_mut()
                        .hot
                        .put(key, &known, e.fresh_until_ms, epoch, copy_bytes);
                }
                return Lookup::Fresh(known);
            }
        }
        if e.is_servable_stale(now, generation, stale_window_ms) {
            stale = e.known().map(|known| Stale {
                known,
                usable_until_ms: e.fresh_until_ms.saturating_add(stale_window_ms),
            });
        }
    }
    Lookup::Miss {
        anchor: Anchor { cas, generation },
        stale,
    }
}

/// What the key looks like now, to anchor a fill on: its CAS version and the
/// global generation.
pub(super) fn found<H: Host>(host: &H, key: &str) -> Anchor {
    let cas = host.shared_get(key).ok().and_then(|(_, cas)| cas);
    let generation = entry::current_generation(host);
    Anchor { cas, generation }
}

/// Makes sure the key has a CAS version a fill can be checked against: a key that
/// does not exist gets a tombstone placeholder (it reads as a miss), so an
/// invalidation that lands while the fill runs changes its version.
pub(super) fn anchor<H: Host>(host: &H, key: &str, found: Anchor) -> Anchor {
    if found.cas.is_some() {
        return found;
    }
    let placeholder = Entry {
        kind: Kind::Tombstone,
        fresh_until_ms: 0,
        generation: found.generation,
        escaped: Redacted::new(""),
        version: Version::Unknown,
    };
    let cas = match host.shared_set(key, &placeholder.encode(), None) {
        Ok(()) => host.shared_get(key).ok().and_then(|(_, c)| c),
        Err(_) => None,
    };
    // After the placeholder: what the fill reads next is no older than this.
    let generation = entry::current_generation(host);
    Anchor { cas, generation }
}

/// Writes a fill's answer, fresh for `ttl_ms`, under the CAS version read when the
/// fill started. Returns whether it was written; a fill an invalidation
/// overtook is discarded (`fill_discarded`).
pub(super) fn write<H: Host>(host: &H, fill: &Fill, known: &Known, ttl_ms: u64) -> bool {
    let mut buf = [0u8; AGENT_ID_LEN];
    let (kind, escaped, version) = match known {
        Known::Directive(escaped, version) => (Kind::Present, &**escaped.expose(), *version),
        Known::NoDirective => (Kind::NoDirective, "", Version::Unknown),
        Known::Agent(agent) => (Kind::Agent, agent.encode(&mut buf), Version::Unknown),
        Known::NoAgent => (Kind::NoAgent, "", Version::Unknown),
    };
    let entry = Entry {
        kind,
        fresh_until_ms: host.now_ms().saturating_add(ttl_ms),
        generation: fill.anchor.generation,
        escaped: Redacted::new(escaped),
        version,
    };
    let raw = entry.encode();
    match host.shared_set(&fill.key, &raw, fill.anchor.cas) {
        Ok(()) => true,
        Err(HostError::CasMismatch) => {
            // Someone wrote the key since this fill started. If it is an answer from
            // a fill that started before the last flush (older generation, not a
            // tombstone), it is stale anyway and this newer answer may replace it.
            // Anything else (a tombstone, or an answer as new as ours) wins.
            if let Ok((Some(current), Some(cas))) = host.shared_get(&fill.key) {
                let older = Entry::decode(&current).is_some_and(|e| {
                    e.kind != Kind::Tombstone && e.generation < fill.anchor.generation
                });
                if older && host.shared_set(&fill.key, &raw, Some(cas)).is_ok() {
                    return true;
                }
            }
            host.count(Counter::FillDiscarded);
            false
        }
        Err(e) => {
            log::warn!(
                "ibex_directive: {} shared data write failed: {:?}",
                fill.subject,
                e
            );
            false
        }
    }
}
