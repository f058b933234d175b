//! The control role: the invalidation endpoint served on Envoy's loopback control
//! listener. It shares the data role's `vm_id`, so one call reaches the shared data
//! that every worker of the data listener reads.
//!
//! The paths and the error envelope are the wire contract (`ibex-wire`) the
//! companion's subscriber POSTs to. Shared-data keys cannot be deleted in
//! proxy-wasm, so:
//! - `POST /ibex/v1/invalidate/{agent_id}` writes a tombstone over the agent's entry.
//!   The write also changes the key's CAS version, so a fill that started before it
//!   can no longer store its (possibly old) answer.
//! - `POST /ibex/v1/invalidate/key/{sha256hex}` does the same for a gateway key's
//!   entry (after `companion revoke-key`): the key is known here only by its hash.
//! - `POST /ibex/v1/invalidate` bumps the global generation counter: every entry
//!   (agents' and keys') filled under an older generation is stale at once, in one
//!   write.
//!
//! Answers: 204 on success, 401 without the configured bearer token, 404 for any
//! other path or method, 400 for an agent id that is not a UUID or a hash that is not
//! 64 lower-case hex characters, 503 if shared data cannot be written.

use ibex_wire::{InvalidateTarget, Redacted};

use crate::agent::AgentId;
use crate::apikey::KeyHash;
use crate::audit::Version;
use crate::config::Config;
use crate::entry::{self, Entry, Kind};
use crate::host::{Host, HostError};
use crate::metrics::Counter;

/// What the control endpoint answers: status and JSON body (empty for 204).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlReply {
    /// HTTP status.
    pub status: u16,
    /// JSON body, empty for 204.
    pub body: String,
}

fn error(status: u16, code: &str, message: &str) -> ControlReply {
    ControlReply {
        status,
        body: ibex_wire::error_envelope("control_error", code, message),
    }
}

/// Handles one control request from its method, path and `authorization` header.
pub fn handle<H: Host>(
    method: Option<&str>,
    path: Option<&str>,
    authorization: Option<&str>,
    host: &H,
    config: &Config,
) -> ControlReply {
    if let Some(token) = &config.control_token {
        let presented = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        let token = token.expose();
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return error(401, "unauthorized", "a valid bearer token is required");
        }
    }
    let path = path.unwrap_or("").split('?').next().unwrap_or("");
    let Some(target) = ibex_wire::parse_invalidate_path(path) else {
        return error(404, "not_found", "no such control endpoint");
    };
    if method != Some("POST") {
        return error(404, "not_found", "no such control endpoint");
    }
    let result = match target {
        InvalidateTarget::All => invalidate_all(host),
        InvalidateTarget::Agent(agent) => match AgentId::parse(agent) {
            Some(agent) => invalidate_agent(&agent, host),
            None => return error(400, "invalid_agent_id", "agent id must be a UUID"),
        },
        InvalidateTarget::Key(hex) => match KeyHash::parse_hex(hex) {
            Some(key) => invalidate_key(&key, host),
            None => {
                return error(
                    400,
                    "invalid_key_sha256",
                    "key hash must be 64 lower-case hex characters",
                )
            }
        },
    };
    match result {
        Ok(()) => {
            host.count(Counter::Invalidations);
            ControlReply {
                status: 204,
                body: String::new(),
            }
        }
        Err(_) => error(
            503,
            "shared_data_unavailable",
            "could not write shared data",
        ),
    }
}

/// Writes a tombstone over one agent's entry.
pub fn invalidate_agent<H: Host>(agent: &AgentId, host: &H) -> Result<(), HostError> {
    tombstone(&entry::key_for(agent), host)
}

/// Writes a tombstone over one gateway key's entry.
pub fn invalidate_key<H: Host>(key: &KeyHash, host: &H) -> Result<(), HostError> {
    tombstone(&entry::key_for_api_key(key), host)
}

/// Writes the tombstone, then bumps the L1 epoch: in that order, so a worker that
/// sees the new epoch and re-reads the entry finds the tombstone. An invalidation
/// whose epoch bump failed is an error (503), for the subscriber to retry: workers'
/// hot copies would not end otherwise. (64 lost CAS races in a row, or a failing
/// shared-data write: neither happens short of a host fault; a subscriber that
/// gives up retrying leaves copies to their TTL, and logs it.)
fn tombstone<H: Host>(key: &str, host: &H) -> Result<(), HostError> {
    let generation = entry::current_generation(host);
    let tombstone = Entry {
        kind: Kind::Tombstone,
        fresh_until_ms: 0,
        generation,
        escaped: Redacted::new(""),
        version: Version::Unknown,
    };
    host.shared_set(key, &tombstone.encode(), None)?;
    bump_epoch(host)
}

/// Bumps the global generation, then the L1 epoch (see [`tombstone`]).
pub fn invalidate_all<H: Host>(host: &H) -> Result<(), HostError> {
    bump_generation(host)?;
    bump_epoch(host)
}

/// Creates the L1 epoch if it does not exist yet (a control role does, when it is
/// configured): workers serve hot copies only under an epoch, and only a control
/// role that bumps it may make one.
pub fn start_epoch<H: Host>(host: &H) -> Result<(), HostError> {
    match host.shared_get(entry::EPOCH_KEY)? {
        (Some(_), _) => Ok(()),
        (None, _) => bump_epoch(host),
    }
}

/// Moves the L1 epoch to a value no copy can carry: past the current one, and at
/// least the clock in milliseconds, so that even a malformed epoch (which workers
/// read as "no copies") is replaced by one newer than any that was ever readable
/// (compare-and-swap, retried on contention).
fn bump_epoch<H: Host>(host: &H) -> Result<(), HostError> {
    for _ in 0..64 {
        let (raw, cas) = host.shared_get(entry::EPOCH_KEY)?;
        let old = raw.as_deref().and_then(entry::decode_epoch).unwrap_or(0);
        let next = old.wrapping_add(1).max(host.now_ms()).max(1);
        match host.shared_set(entry::EPOCH_KEY, &next.to_le_bytes(), cas) {
            Ok(()) => return Ok(()),
            Err(HostError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(HostError::CasMismatch)
}

/// Adds one to the generation counter in shared data (compare-and-swap, retried on
/// contention). A key that does not exist yet is created at 1: proxy-wasm checks
/// CAS only for keys that exist, and two first bumps racing both write 1, which
/// still differs from the 0 every reader took the absent key for.
fn bump_generation<H: Host>(host: &H) -> Result<(), HostError> {
    let key = entry::GENERATION_KEY;
    for _ in 0..64 {
        let (raw, cas) = host.shared_get(key)?;
        let next = entry::decode_generation(raw.as_deref()).saturating_add(1);
        match host.shared_set(key, &next.to_le_bytes(), cas) {
            Ok(()) => return Ok(()),
            Err(HostError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(HostError::CasMismatch)
}

/// Compares secrets without an early exit that would leak their common prefix length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{FakeHost, SharedData};

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    fn cfg(token: Option<&str>) -> Config {
        let raw = match token {
            Some(t) => format!(r#"{{"role":"control","control":{{"token":"{t}"}}}}"#),
            None => r#"{"role":"control"}"#.to_string(),
        };
        Config::parse(raw.as_bytes(), None).unwrap()
    }

    fn fresh_entry(h: &FakeHost) {
        let e = Entry {
            kind: Kind::Present,
            fresh_until_ms: u64::MAX,
            generation: 0,
            escaped: Redacted::new("D"),
            version: Version::Unknown,
        };
        h.shared_set(
            &crate::entry::key_for(&crate::agent::AgentId::parse(AGENT).unwrap()),
            &e.encode(),
            None,
        )
        .unwrap();
    }

    fn entry_of(h: &FakeHost) -> Vec<u8> {
        h.shared
            .get(&crate::entry::key_for(
                &crate::agent::AgentId::parse(AGENT).unwrap(),
            ))
            .unwrap()
    }

    #[test]
    fn invalidating_an_agent_tombstones_its_entry() {
        let h = FakeHost::with_shared(SharedData::default());
        fresh_entry(&h);
        let r = handle(
            Some("POST"),
            Some(&format!("/ibex/v1/invalidate/{AGENT}")),
            None,
            &h,
            &cfg(None),
        );
        assert_eq!(r.status, 204);
        let raw = entry_of(&h);
        let e = Entry::decode(&raw).unwrap();
        assert_eq!(e.kind, Kind::Tombstone);
        assert!(!e.is_fresh(0, 0));
        assert_eq!(h.counter(Counter::Invalidations), 1);
    }

    #[test]
    fn invalidating_all_makes_every_entry_stale_in_one_write() {
        let h = FakeHost::with_shared(SharedData::default());
        fresh_entry(&h);
        for expected in 1..=3u64 {
            let r = handle(
                Some("POST"),
                Some("/ibex/v1/invalidate"),
                None,
                &h,
                &cfg(None),
            );
            assert_eq!(r.status, 204);
            assert_eq!(entry::current_generation(&h), expected);
        }
        let raw = entry_of(&h);
        assert!(!Entry::decode(&raw)
            .unwrap()
            .is_fresh(0, entry::current_generation(&h)));
    }

    #[test]
    fn token_is_required_when_configured_and_nothing_changes_without_it() {
        let h = FakeHost::with_shared(SharedData::default());
        fresh_entry(&h);
        let c = cfg(Some("s3cret"));
        let path = format!("/ibex/v1/invalidate/{AGENT}");
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let r = handle(Some("POST"), Some(&path), auth, &h, &c);
            assert_eq!(r.status, 401, "{auth:?}");
            assert!(!r.body.contains("s3cret"));
        }
        assert_eq!(Entry::decode(&entry_of(&h)).unwrap().kind, Kind::Present);
        let r = handle(Some("POST"), Some(&path), Some("Bearer s3cret"), &h, &c);
        assert_eq!(r.status, 204);
    }

    #[test]
    fn anything_else_is_404_or_400() {
        let h = FakeHost::with_shared(SharedData::default());
        let c = cfg(None);
        assert_eq!(
            handle(Some("GET"), Some("/ibex/v1/invalidate"), None, &h, &c).status,
            404
        );
        assert_eq!(
            handle(Some("POST"), Some("/other"), None, &h, &c).status,
            404
        );
        assert_eq!(
            handle(Some("POST"), Some("/ibex/v1/invalidatex"), None, &h, &c).status,
            404
        );
        assert_eq!(
            handle(Some("POST"), Some("/ibex/v1/invalidate/nope"), None, &h, &c).status,
            400
        );
        for bad in ["", "ABC", &"A".repeat(64), &"0".repeat(63)] {
            let r = handle(
                Some("POST"),
                Some(&format!("/ibex/v1/invalidate/key/{bad}")),
                None,
                &h,
                &c,
            );
            assert_eq!(r.status, 400, "{bad}");
            assert!(r.body.contains("invalid_key_sha256"));
        }
    }

    #[test]
    fn invalidating_a_key_tombstones_its_entry_only() {
        let h = FakeHost::with_shared(SharedData::default());
        fresh_entry(&h);
        let key = KeyHash::of(b"ibex_k");
        let entry_key = entry::key_for_api_key(&key);
        let e = Entry {
            kind: Kind::Agent,
            fresh_until_ms: u64::MAX,
            generation: 0,
            escaped: Redacted::new(AGENT),
            version: Version::Unknown,
        };
        h.shared_set(&entry_key, &e.encode(), None).unwrap();
        let path = ibex_wire::invalidate_key_path(&key.hex());
        let r = handle(Some("POST"), Some(&path), None, &h, &cfg(None));
        assert_eq!(r.status, 204);
        let raw = h.shared.get(&entry_key).unwrap();
        assert_eq!(Entry::decode(&raw).unwrap().kind, Kind::Tombstone);
        assert_eq!(Entry::decode(&entry_of(&h)).unwrap().kind, Kind::Present);
        assert_eq!(h.counter(Counter::Invalidations), 1);
    }
}
