//! The two remote tiers as plain data: how to ask them (callout requests) and how to
//! read their answers. No host calls here: the request flow hands these requests to
//! the host and feeds the responses back.
//!
//! - L2, Redis behind an HTTP front, in one of two dialects (`redis.dialect`):
//!   Webdis (below), or the Upstash REST API ([`upstash`]: managed Upstash or
//!   `ibex-companion rest`, values in base64). The requests differ; what a value
//!   means (no key, empty, tombstone, directive) and the no-overwrite write are
//!   the same, and are decided here once for both.
//! - Webdis: `GET /GET/{key}.raw` answers in Redis protocol
//!   (`$-1` = no such key, `$0` = the empty string = "this agent has no directive").
//!   A value starting with a NUL byte is a *tombstone* ([`ibex_wire::TOMBSTONE`])
//!   written by the subscriber when the directive changed; Postgres text can never
//!   contain NUL, so no directive is mistaken for one. A tombstone reads as "no key".
//! - L2 writes never overwrite: an `EVAL` sets the key (with its TTL) only if
//!   neither the key nor the flush marker of its hash slot
//!   ([`ibex_wire::flush_marker_for`], set in every slot by the subscriber for a
//!   while after "invalidate all") exists. Both keys are in one slot, so the
//!   script runs on a Redis Cluster too (no `CROSSSLOT`); every other L2 command
//!   names one key. A fill that read the old
//!   directive before an invalidation therefore cannot put it back into Redis after
//!   the subscriber's tombstone. The value travels as the PUT body (Webdis's last
//!   argument); the empty string cannot, so it is sent as a trailing `/` instead.
//! - L3, the companion store: `GET /v1/agents/{id}/directive` answers
//!   `{"agent_id":…,"content":"…"|null}`.
//!
//! Key names, the tombstone and the flush marker are the wire contract shared with
//! the companion's subscriber (`ibex-wire`); only the transport is written here.
//!
//! # Hostile answers
//!
//! The readers ([`parse_redis_get`], [`redis_set_outcome`], [`parse_store`]) take
//! bytes from the network and assume nothing about them: whoever controls a Redis
//! value, Webdis or the store's answer (or sits between them and Envoy) chooses every
//! byte. Every length and offset read from an answer is checked arithmetic over the
//! target's `usize` (32 bits on wasm32, where `$4294967294` plus its CRLF wraps to 0)
//! and every slice is a `get`/`split_at_checked`; the module denies clippy's
//! `indexing_slicing` and `arithmetic_side_effects` outside its tests, and the
//! length arithmetic is generic over the width (`Width`) so native tests run it
//! over `u32` exactly as wasm32 does. The readers are strict: an answer is accepted
//! only in its one canonical spelling, and anything else is a [`TierError`], which
//! the flow treats as that tier failing (an L2 error asks the store; a store error
//! serves stale or follows `failure_mode`).
//!
//! - L2 accepts exactly `$-1\r\n`, or `$`, a decimal length (ASCII digits, no sign,
//!   no spaces, no leading zero), CRLF, exactly that many bytes, CRLF, and nothing
//!   after. Other reply types (`:`, `*`, `+`, `-ERR`), negative lengths other than
//!   the nil reply, lengths that overflow or do not match the body, a missing CRLF and
//!   trailing bytes are errors. The directive is exactly the declared bytes, which must
//!   be UTF-8 without NUL (a value starting with NUL is a tombstone; Postgres text never
//!   holds NUL, so a NUL elsewhere is not a directive either).
//! - A write-back's outcome is `Written` or `Skipped` only for Webdis's exact
//!   `{"EVAL":1}` / `{"EVAL":0}` (Upstash: `{"result":1}` / `{"result":0}`) with
//!   status 200; anything else is `Failed`.
//! - Upstash answers are one JSON object with the single member `result`, its
//!   strings in canonical base64 ([`upstash`]); decoded, a value is read by the same
//!   rules as Webdis's bulk value.
//! - L3 accepts one JSON object with the members `agent_id` and `content`, each
//!   exactly once: a duplicate (also spelled with escapes) or missing member, an
//!   `agent_id` other than the asked agent's canonical (lower-case, hyphenated) id, a
//!   `content` that is neither a string nor `null`, or that holds NUL, is an error.
//!   Other members are ignored, so a newer store may add some (the audit trail's
//!   `version_id`) without older filters failing every lookup.
//!
//! - Gateway keys (`agent.source = "api_key"`) are read with one `EVAL` that returns
//!   the value at `agent_key:{sha256hex}` and its `PTTL` (so a key is cached no
//!   longer than Redis keeps it): exactly the nil reply, or a two-element array of a
//!   canonical bulk reply and a canonical integer (or `-1`). The value is a tombstone
//!   (unknown), the empty string (no such key), or an agent id in its one canonical
//!   spelling (lower-case, hyphenated); anything else is an error. L3's answer must carry the asked hash
//!   as `key_sha256` and an `agent_id` that is canonical or `null`, each exactly once.
//!
//! So a hostile answer can make its tier fail, hide a key (a tombstone: the store is
//! asked) and — from the store, or by writing Redis — choose the text of a directive,
//! which is escaped before it is spliced into a body. It cannot panic or trap the VM,
//! make a reader touch bytes outside the body, have bytes outside the declared value
//! read as the directive, pass an answer of another shape or for another agent as an
//! answer, or have a second `content` chosen over the first (a duplicate member is
//! refused, not resolved).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use ibex_wire::Redacted;

use crate::agent::{AgentId, AGENT_ID_LEN};
use crate::apikey::KeyHash;
use crate::audit::Version;
use crate::config::{Config, Dialect};

mod upstash;

/// An HTTP callout to an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Envoy cluster name.
    pub cluster: String,
    /// HTTP method.
    pub method: &'static str,
    /// `:path`.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Request body, if any: a write-back's is directive text, so `Debug` shows only
    /// its length.
    pub body: Option<Redacted<Vec<u8>>>,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
    /// Further request headers that never change (the Upstash dialect's).
    pub headers: &'static [(&'static str, &'static str)],
    /// `Authorization` of the Upstash dialect; `Debug` shows its length only.
    pub authorization: Option<Redacted<String>>,
    /// The W3C `traceparent` of the request whose fill this is, so a trace shows the
    /// lookup as part of that request.
    pub traceparent: Option<String>,
}

/// What came back from a callout. `status` is `None` when there was no HTTP answer at
/// all (connection failure, reset, timeout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// HTTP status, if an answer arrived.
    pub status: Option<u16>,
    /// Response body.
    pub body: Vec<u8>,
}

/// The answer of a tier about one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The tier does not know (L2 only: no key).
    Unknown,
    /// The agent has no directive.
    NoDirective,
    /// The agent's directive, raw text, and its version.
    Directive(Redacted<String>, Version),
}

/// A tier failed to answer usefully (the reason is for counters and debug logs; it
/// never contains response bodies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierError(pub &'static str);

fn redis_key_path(config: &Config, agent: &AgentId) -> String {
    let mut buf = [0u8; AGENT_ID_LEN];
    ibex_wire::redis_key(&config.redis.key_prefix, agent.encode(&mut buf))
}

/// L2 read of an agent's key.
pub fn redis_get(config: &Config, agent: &AgentId) -> Callout {
    let key = redis_key_path(config, agent);
    match config.redis.dialect {
        Dialect::Webdis => redis_callout(config, "GET", format!("/GET/{key}.raw"), None),
        Dialect::Upstash => upstash_callout(config, upstash::get_body(&key)),
    }
}

/// A callout to the Redis front as Webdis takes it: everything in the path.
fn redis_callout(
    config: &Config,
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
) -> Callout {
    Callout {
        cluster: config.redis.cluster.clone(),
        method,
        path,
        authority: config.redis.authority.clone(),
        body: body.map(Redacted::new),
        timeout_ms: config.redis.timeout_ms,
        headers: &[],
        authorization: None,
        traceparent: None,
    }
}

/// A command to an Upstash REST front: `POST /` with the command as a JSON array.
fn upstash_callout(config: &Config, body: Vec<u8>) -> Callout {
    Callout {
        headers: &upstash::HEADERS,
        authorization: config.redis.authorization.clone(),
        ..redis_callout(config, "POST", "/".to_string(), Some(body))
    }
}

/// The conditional write, URL-encoded once (it never changes):
/// `if redis.call('EXISTS',KEYS[1],KEYS[2])==0 then
///  redis.call('SET',KEYS[1],ARGV[2],'EX',ARGV[1]) return 1 end return 0`
const SET_IF_ABSENT_URL: &str = "if%20redis.call%28%27EXISTS%27%2CKEYS%5B1%5D%2CKEYS%5B2%5D%29%3D%3D0%20then%20redis.call%28%27SET%27%2CKEYS%5B1%5D%2CARGV%5B2%5D%2C%27EX%27%2CARGV%5B1%5D%29%20return%201%20end%20return%200";

/// L2 write of an agent's answer with its TTL. `None` writes "no directive".
/// The write happens only if the key and the flush marker are both absent.
pub fn redis_set(
    config: &Config,
    agent: &AgentId,
    directive: Option<(&str, Version)>,
    ttl_seconds: u64,
) -> Callout {
    let key = redis_key_path(config, agent);
    // The marker of the key's own slot: one script touches one Redis Cluster slot.
    let marker = ibex_wire::flush_marker_for(&config.redis.key_prefix, &key);
    // With its version, so an L2 hit elsewhere can name it too (audit trail).
    let value = directive.map(|(text, version)| match version {
        Version::Unknown => text.to_string(),
        Version::Id(_) => {
            let mut buf = [0u8; AGENT_ID_LEN];
            ibex_wire::versioned_directive_value(version.write(&mut buf), text)
        }
    });
    conditional_set(config, &key, &marker, value.as_deref(), ttl_seconds)
}

/// The conditional `EVAL` of `value` at `key`, unless `key` or `marker` exists.
fn conditional_set(
    config: &Config,
    key: &str,
    marker: &str,
    value: Option<&str>,
    ttl_seconds: u64,
) -> Callout {
    if config.redis.dialect == Dialect::Upstash {
        let body = upstash::set_if_absent_body(key, marker, value.unwrap_or(""), ttl_seconds);
        return upstash_callout(config, body);
    }
    let base = format!("/EVAL/{SET_IF_ABSENT_URL}/2/{key}/{marker}/{ttl_seconds}");
    match value {
        Some(text) if !text.is_empty() => {
            redis_callout(config, "PUT", base, Some(text.as_bytes().to_vec()))
        }
        // A trailing slash is Webdis's spelling of an empty last argument.
        _ => redis_callout(config, "GET", format!("{base}/"), None),
    }
}

/// What a tier says about a gateway key (`agent.source = "api_key"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAnswer {
    /// The tier does not know (L2 only: no entry, or a tombstone).
    Unknown,
    /// No active key has this hash (unknown or revoked).
    NoAgent,
    /// The key belongs to this agent.
    Agent(AgentId),
}

/// A key's read returns the value and how long Redis keeps it, in one round trip:
/// `local v=redis.call('GET',KEYS[1]) if not v then return false end
///  return {v,redis.call('PTTL',KEYS[1])}`, URL-encoded once. The filter caches a key
/// no longer than Redis does, so a revocation that only expiry can carry (the
/// subscriber was away) reaches the gateway within `cache.ttl_seconds`.
const GET_WITH_PTTL_URL: &str = "local%20v%3Dredis.call%28%27GET%27%2CKEYS%5B1%5D%29%20if%20not%20v%20then%20return%20false%20end%20return%20%7Bv%2Credis.call%28%27PTTL%27%2CKEYS%5B1%5D%29%7D";

/// L2 read of a gateway key's entry, `agent_key:{sha256hex}`, with its remaining TTL.
pub fn redis_get_key(config: &Config, key: &KeyHash) -> Callout {
    let key = ibex_wire::agent_key_redis_key(&key.hex());
    match config.redis.dialect {
        Dialect::Webdis => redis_callout(
            config,
            "GET",
            format!("/EVAL/{GET_WITH_PTTL_URL}/1/{key}.raw"),
            None,
        ),
        Dialect::Upstash => upstash_callout(config, upstash::get_with_pttl_body(&key)),
    }
}

/// L2 write of a gateway key's agent (`None`: no such key) with its TTL, under the
/// same no-overwrite rule as directives and the key entries' own flush marker.
pub fn redis_set_key(
    config: &Config,
    key: &KeyHash,
    agent: Option<&AgentId>,
    ttl_seconds: u64,
) -> Callout {
    let mut buf = [0u8; AGENT_ID_LEN];
    let value = agent.map(|a| a.encode(&mut buf));
    let entry = ibex_wire::agent_key_redis_key(&key.hex());
    let marker = ibex_wire::flush_marker_for(ibex_wire::AGENT_KEY_PREFIX, &entry);
    conditional_set(config, &entry, &marker, value, ttl_seconds)
}

/// Reads an L2 answer for a gateway key ([`redis_get_key`]) and how long Redis keeps
/// the value (ms; `None`: no expiry). Webdis: exactly `$-1\r\n` (no such entry), or
/// `*2\r\n`, a canonical bulk reply (as for directives), and the TTL: an integer
/// reply `:` or (as Webdis spells it) a bulk reply, holding a canonical decimal or
/// `-1`, then nothing. Upstash: `{"result":null}` or `{"result":["<base64>",<ms>]}`.
/// The value: a tombstone is unknown, the empty string is "no such key", anything
/// else must be an agent id in its canonical spelling (lower-case, hyphenated) or it
/// is an error.
pub fn parse_redis_key_get(
    dialect: Dialect,
    resp: &Response,
) -> Result<(KeyAnswer, Option<u64>), TierError> {
    check_status(resp)?;
    let body = resp.body.as_slice();
    match dialect {
        Dialect::Webdis if body == NIL_REPLY => Ok((KeyAnswer::Unknown, None)),
        Dialect::Webdis => {
            let (value, ttl) = value_with_pttl(body)?;
            key_value(value, ttl)
        }
        Dialect::Upstash => match upstash::read_get_with_pttl(body)? {
            None => Ok((KeyAnswer::Unknown, None)),
            Some((value, ttl)) => key_value(&value, ttl),
        },
    }
}

/// What a key entry's value means, whatever the dialect that carried it.
fn key_value(value: &[u8], ttl: Option<u64>) -> Result<(KeyAnswer, Option<u64>), TierError> {
    if ibex_wire::is_tombstone(value) {
        return Ok((KeyAnswer::Unknown, None));
    }
    if value.is_empty() {
        return Ok((KeyAnswer::NoAgent, ttl));
    }
    let text = std::str::from_utf8(value).map_err(|_| TierError("not UTF-8"))?;
    canonical_agent(text).map(|agent| (KeyAnswer::Agent(agent), ttl))
}

/// `*2\r\n$<len>\r\n<value>\r\n` then `:<ms>\r\n` or `$<n>\r\n<ms>\r\n`, nothing
/// else.
fn value_with_pttl(body: &[u8]) -> Result<(&[u8], Option<u64>), TierError> {
    let rest = body
        .strip_prefix(b"*2\r\n$")
        .ok_or(TierError("not a value and its TTL"))?;
    let (len, data) = length_line::<usize>(rest)?;
    let (value, after) = data
        .split_at_checked(len)
        .ok_or(TierError("length mismatch"))?;
    let element = after
        .strip_prefix(b"\r\n")
        .and_then(|t| t.strip_suffix(b"\r\n"))
        .ok_or(TierError("bad TTL reply"))?;
    // Redis sends the TTL as an integer reply; Webdis's raw output re-encodes an
    // integer inside an array as a bulk string of its decimal digits. Either, exactly.
    let ttl = match element.split_first() {
        Some((b':', digits)) => digits,
        Some((b'$', rest)) => {
            let (len, digits) = length_line::<usize>(rest)?;
            if len != digits.len() {
                return Err(TierError("bad TTL reply"));
            }
            digits
        }
        _ => return Err(TierError("bad TTL reply")),
    };
    let ttl = match ttl {
        b"-1" => None,
        digits => Some(decimal::<u64>(digits)?),
    };
    Ok((value, ttl))
}

/// An agent id exactly as the companion spells it.
fn canonical_agent(text: &str) -> Result<AgentId, TierError> {
    let agent = AgentId::parse(text).ok_or(TierError("not an agent id"))?;
    let mut buf = [0u8; AGENT_ID_LEN];
    if agent.encode(&mut buf) != text {
        return Err(TierError("agent id not canonical"));
    }
    Ok(agent)
}

/// L3 read of a gateway key: `GET /v1/keys/{sha256hex}`.
pub fn store_get_key(config: &Config, key: &KeyHash) -> Callout {
    store_callout(config, ibex_wire::store_key_path(&key.hex()))
}

/// A `GET` of `path` from the store.
fn store_callout(config: &Config, path: String) -> Callout {
    Callout {
        cluster: config.store.cluster.clone(),
        method: "GET",
        path,
        authority: config.store.authority.clone(),
        body: None,
        timeout_ms: config.store.timeout_ms,
        headers: &[],
        authorization: None,
        traceparent: None,
    }
}

/// The store's key answer: these two members, each exactly once; others ignored.
#[derive(serde::Deserialize)]
struct StoreKeyBody {
    key_sha256: String,
    /// Required: `null` is "no such key", a missing member is an error.
    #[serde(deserialize_with = "required")]
    agent_id: Option<String>,
}

/// Reads an L3 key answer; the hash in the body must be the one asked for, and the
/// agent id canonical (see "Hostile answers" above).
pub fn parse_store_key(resp: &Response, key: &KeyHash) -> Result<KeyAnswer, TierError> {
    check_status(resp)?;
    let text = std::str::from_utf8(&resp.body).map_err(|_| TierError("not UTF-8"))?;
    let body: StoreKeyBody = json_object(text)?;
    if body.key_sha256 != key.hex() {
        return Err(TierError("answer for another key"));
    }
    match body.agent_id {
        None => Ok(KeyAnswer::NoAgent),
        Some(agent) => canonical_agent(&agent).map(KeyAnswer::Agent),
    }
}

/// Reads `text` as one JSON object into `T`. serde's derived readers of a struct
/// also take its members as an array in order (`["<agent>","text"]`), a second
/// spelling of the answer: only an object is accepted.
pub(crate) fn json_object<'a, T: serde::Deserialize<'a>>(text: &'a str) -> Result<T, TierError> {
    // JSON whitespace is space, tab, CR and LF.
    if !text
        .trim_start_matches([' ', '\t', '\r', '\n'])
        .starts_with('{')
    {
        return Err(TierError("not a JSON object"));
    }
    serde_json::from_str(text).map_err(|_| TierError("bad body"))
}

/// The nil bulk reply: no such key.
const NIL_REPLY: &[u8] = b"$-1\r\n";

/// Reads an L2 GET answer (see "Hostile answers" above).
pub fn parse_redis_get(dialect: Dialect, resp: &Response) -> Result<Answer, TierError> {
    check_status(resp)?;
    let body = resp.body.as_slice();
    match dialect {
        Dialect::Webdis if body == NIL_REPLY => Ok(Answer::Unknown),
        Dialect::Webdis => read_value(bulk_value::<usize>(body)?),
        Dialect::Upstash => match upstash::read_get(body)? {
            None => Ok(Answer::Unknown),
            Some(value) => read_value(&value),
        },
    }
}

fn check_status(resp: &Response) -> Result<(), TierError> {
    match resp.status {
        None => Err(TierError("no answer")),
        Some(200) => Ok(()),
        Some(_) => Err(TierError("bad status")),
    }
}

/// What a Redis value means: a tombstone, no directive, or a directive with its
/// version when the value carries one ([`ibex_wire::read_directive_value`]).
fn read_value(value: &[u8]) -> Result<Answer, TierError> {
    let (version, text) = match ibex_wire::read_directive_value(value) {
        ibex_wire::DirectiveValue::Tombstone => return Ok(Answer::Unknown),
        ibex_wire::DirectiveValue::Text { version, text } => (version, text),
    };
    // Canonical already (the wire checked); only the nil id, which means unknown,
    // is no version.
    let version = version
        .and_then(Version::parse_canonical)
        .unwrap_or_default();
    let text = std::str::from_utf8(text).map_err(|_| TierError("not UTF-8"))?;
    directive(text, version)
}

/// Text from a tier as an answer: empty is "no directive"; NUL (which Postgres text
/// cannot hold) makes it no directive of ours.
fn directive(text: impl AsRef<str> + Into<String>, version: Version) -> Result<Answer, TierError> {
    if text.as_ref().contains('\0') {
        Err(TierError("NUL in directive"))
    } else if text.as_ref().is_empty() {
        Ok(Answer::NoDirective)
    } else {
        Ok(Answer::Directive(Redacted::new(text.into()), version))
    }
}

/// The unsigned integer that holds a length: `usize` in the filter, so 32 bits on
/// wasm32 and 64 natively; tests also run the arithmetic over `u32` and `u64`
/// explicitly, whatever the native width.
pub(crate) trait Width: Copy + Eq + TryFrom<usize> + TryInto<usize> {
    /// `self * 10 + digit`, or `None` when it overflows.
    fn push_digit(self, digit: u8) -> Option<Self>;
    /// `self + 2` (the CRLF after a bulk value), or `None` when it overflows.
    fn plus_crlf(self) -> Option<Self>;
    /// Zero.
    const ZERO: Self;
}

macro_rules! width {
    ($($t:ty),*) => {$(
        impl Width for $t {
            fn push_digit(self, digit: u8) -> Option<Self> {
                self.checked_mul(10)?.checked_add(<$t>::from(digit))
            }
            fn plus_crlf(self) -> Option<Self> {
                self.checked_add(2)
            }
            const ZERO: Self = 0;
        }
    )*};
}
width!(u32, u64, usize);

/// A decimal length in its canonical spelling: ASCII digits only, no sign, no
/// leading zero, within `W`.
fn decimal<W: Width>(digits: &[u8]) -> Result<W, TierError> {
    match digits {
        [] => return Err(TierError("no length")),
        [b'0', _, ..] => return Err(TierError("leading zero in length")),
        _ => {}
    }
    digits.iter().try_fold(W::ZERO, |n, &d| {
        if !d.is_ascii_digit() {
            return Err(TierError("bad length"));
        }
        n.push_digit(d.wrapping_sub(b'0'))
            .ok_or(TierError("length overflows"))
    })
}

/// A bulk reply's length line after its `$`: the canonical decimal length (in `W`)
/// and everything after its CRLF.
fn length_line<W: Width>(rest: &[u8]) -> Result<(W, &[u8]), TierError> {
    let digits_end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    let (digits, after) = rest
        .split_at_checked(digits_end)
        .ok_or(TierError("bad length"))?;
    let len: W = decimal(digits)?;
    let data = after
        .strip_prefix(b"\r\n")
        .ok_or(TierError("bad length line"))?;
    Ok((len, data))
}

/// The value of a whole RESP bulk reply `$<len>\r\n<len bytes>\r\n`, its length
/// checked with `W`'s arithmetic.
pub(crate) fn bulk_value<W: Width>(body: &[u8]) -> Result<&[u8], TierError> {
    let rest = match body.split_first() {
        Some((b'$', rest)) => rest,
        Some((b'-', _)) => return Err(TierError("error reply")),
        Some(_) => return Err(TierError("not a bulk reply")),
        None => return Err(TierError("empty reply")),
    };
    let (len, data) = length_line::<W>(rest)?;
    let expected = len.plus_crlf().ok_or(TierError("length overflows"))?;
    let actual = W::try_from(data.len()).map_err(|_| TierError("length mismatch"))?;
    if actual != expected {
        return Err(TierError("length mismatch"));
    }
    let len: usize = len.try_into().map_err(|_| TierError("length mismatch"))?;
    let (value, end) = data
        .split_at_checked(len)
        .ok_or(TierError("length mismatch"))?;
    if end != b"\r\n" {
        return Err(TierError("missing final CRLF"));
    }
    Ok(value)
}

/// Outcome of an L2 write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The key was set.
    Written,
    /// Not set: the key, a tombstone or the flush marker was there.
    Skipped,
    /// The write failed.
    Failed,
}

/// Reads the answer to [`redis_set`].
pub fn redis_set_outcome(dialect: Dialect, resp: &Response) -> WriteOutcome {
    let written = match (resp.status, dialect, resp.body.as_slice()) {
        (Some(200), Dialect::Webdis, b"{\"EVAL\":1}") => Some(true),
        (Some(200), Dialect::Webdis, b"{\"EVAL\":0}") => Some(false),
        (Some(200), Dialect::Upstash, body) => upstash::read_written(body),
        _ => None,
    };
    match written {
        Some(true) => WriteOutcome::Written,
        Some(false) => WriteOutcome::Skipped,
        None => WriteOutcome::Failed,
    }
}

/// L3 read of an agent's directive.
pub fn store_get(config: &Config, agent: &AgentId) -> Callout {
    let mut buf = [0u8; AGENT_ID_LEN];
    store_callout(
        config,
        format!("/v1/agents/{}/directive", agent.encode(&mut buf)),
    )
}

/// The store's answer: these two members, each exactly once (serde refuses a
/// duplicate); members it does not name are ignored.
#[derive(serde::Deserialize)]
struct StoreBody {
    agent_id: String,
    /// Required: `null` is "no directive", a missing member is an error.
    #[serde(deserialize_with = "required")]
    content: Option<String>,
    /// The active version's id; a store that predates the audit trail sends none,
    /// and `null` goes with `content: null`.
    #[serde(default)]
    version_id: Option<String>,
}

/// A member that must be present even though it may be `null` (serde reads a
/// missing `Option` member as `None` unless told otherwise).
fn required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    serde::Deserialize::deserialize(d)
}

/// Reads an L3 answer; the agent id in the body must be the one asked for, spelled
/// as the store spells it (see "Hostile answers" above).
pub fn parse_store(resp: &Response, agent: &AgentId) -> Result<Answer, TierError> {
    check_status(resp)?;
    // serde's derived reader refuses a member named twice ("duplicate field"), even
    // when one spelling uses escapes: keys are compared decoded.
    // The whole body must be UTF-8, ignored members included: serde_json skips an
    // unread string without validating it.
    let text = std::str::from_utf8(&resp.body).map_err(|_| TierError("not UTF-8"))?;
    let body: StoreBody = json_object(text)?;
    let mut buf = [0u8; AGENT_ID_LEN];
    if body.agent_id != agent.encode(&mut buf) {
        return Err(TierError("answer for another agent"));
    }
    // The version is for the audit trail only: an id spelled otherwise than the
    // companion spells it (another store) is an unknown version, not a failed lookup
    // (which would open the breaker and refuse cold agents over a log field).
    let version = body
        .version_id
        .and_then(|id| Version::parse_canonical(&id))
        .unwrap_or_default();
    match body.content {
        None => Ok(Answer::NoDirective),
        // An empty directive injects nothing useful; it is none, as in L2.
        Some(c) => directive(c, version),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> Config {
        Config::parse(b"{}", None).unwrap()
    }
    fn agent() -> AgentId {
        AgentId::parse("6f1c1a3e-5b7d-4c2a-9e0f-123456789abc").unwrap()
    }
    fn ok(body: &[u8]) -> Response {
        Response {
            status: Some(200),
            body: body.to_vec(),
        }
    }

    #[test]
    fn builds_webdis_requests() {
        let c = redis_get(&cfg(), &agent());
        assert_eq!(
            (c.method, c.path.as_str(), c.cluster.as_str(), c.timeout_ms),
            (
                "GET",
                "/GET/directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc.raw",
                "ibex_redis",
                50
            )
        );
        let w = redis_set(&cfg(), &agent(), Some(("Be terse.", Version::Unknown)), 60);
        let key = "directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
        let marker = ibex_wire::flush_marker_for("directive:", key);
        // The marker of the key's own slot, so the script is cluster-safe.
        assert_eq!(
            ibex_wire::key_slot(marker.as_bytes()),
            ibex_wire::key_slot(key.as_bytes())
        );
        let tail = format!("/2/{key}/{marker}/60");
        assert_eq!(w.method, "PUT");
        assert!(w.path.starts_with("/EVAL/if%20redis.call"), "{}", w.path);
        assert!(w.path.ends_with(&tail), "{}", w.path);
        assert_eq!(
            w.body.as_ref().map(|b| b.expose().as_slice()),
            Some(&b"Be terse."[..])
        );
        let n = redis_set(&cfg(), &agent(), None, 10);
        assert_eq!((n.method, n.body), ("GET", None));
        assert!(n.path.ends_with(&format!("/{marker}/10/")), "{}", n.path);
        assert!(!format!("{w:?}").contains("terse"));
    }

    #[test]
    fn reads_webdis_raw_replies() {
        assert_eq!(
            parse_redis_get(Dialect::Webdis, &ok(b"$-1\r\n")),
            Ok(Answer::Unknown)
        );
        assert_eq!(
            parse_redis_get(Dialect::Webdis, &ok(b"$0\r\n\r\n")),
            Ok(Answer::NoDirective)
        );
        assert_eq!(
            parse_redis_get(Dialect::Webdis, &ok(b"$7\r\nab\r\n\"\xc3\xa9\r\n")),
            Ok(Answer::Directive("ab\r\n\"é".into(), Version::Unknown))
        );
        for bad in [
            &b"-ERR wrong"[..],
            b"$5\r\nab\r\n",
            b"$x\r\n",
            b"$2\r\n\xff\xfe\r\n",
            b"",
        ] {
            assert!(
                parse_redis_get(Dialect::Webdis, &ok(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(parse_redis_get(
            Dialect::Webdis,
            &Response {
                status: None,
                body: vec![]
            }
        )
        .is_err());
        assert!(parse_redis_get(
            Dialect::Webdis,
            &Response {
                status: Some(503),
                body: b"$-1\r\n".to_vec()
            }
        )
        .is_err());
        assert_eq!(
            parse_redis_get(Dialect::Webdis, &ok(b"$1\r\n\0\r\n")),
            Ok(Answer::Unknown),
            "tombstone"
        );
        assert_eq!(
            parse_redis_get(Dialect::Webdis, &ok(b"$3\r\n\0ab\r\n")),
            Ok(Answer::Unknown),
            "tombstone"
        );
        assert_eq!(
            redis_set_outcome(Dialect::Webdis, &ok(br#"{"EVAL":1}"#)),
            WriteOutcome::Written
        );
        assert_eq!(
            redis_set_outcome(Dialect::Webdis, &ok(br#"{"EVAL":0}"#)),
            WriteOutcome::Skipped
        );
        assert_eq!(
            redis_set_outcome(Dialect::Webdis, &ok(br#"{"EVAL":[false,"ERR"]}"#)),
            WriteOutcome::Failed
        );
        assert_eq!(
            redis_set_outcome(Dialect::Webdis, &Response::default()),
            WriteOutcome::Failed
        );
    }

    #[test]
    fn the_encoded_script_is_the_documented_one() {
        assert_eq!(
            percent_decode(super::SET_IF_ABSENT_URL),
            ibex_wire::SET_IF_ABSENT_SCRIPT
        );
        assert_eq!(
            percent_decode(super::GET_WITH_PTTL_URL),
            ibex_wire::GET_WITH_PTTL_SCRIPT
        );
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn builds_and_reads_store_requests() {
        let c = store_get(&cfg(), &agent());
        assert_eq!(
            c.path,
            "/v1/agents/6f1c1a3e-5b7d-4c2a-9e0f-123456789abc/directive"
        );
        assert_eq!((c.cluster.as_str(), c.timeout_ms), ("ibex_store", 500));
        let id = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
        assert_eq!(
            parse_store(
                &ok(format!(r#"{{"agent_id":"{id}","content":"D"}}"#).as_bytes()),
                &agent()
            ),
            Ok(Answer::Directive("D".into(), Version::Unknown))
        );
        assert_eq!(
            parse_store(
                &ok(format!(r#"{{"agent_id":"{id}","content":null}}"#).as_bytes()),
                &agent()
            ),
            Ok(Answer::NoDirective)
        );
        let other = r#"{"agent_id":"00000000-0000-4000-8000-000000000000","content":"D"}"#;
        assert!(parse_store(&ok(other.as_bytes()), &agent()).is_err());
        assert!(parse_store(&ok(b"{}"), &agent()).is_err());
        assert!(parse_store(
            &Response {
                status: Some(503),
                body: vec![]
            },
            &agent()
        )
        .is_err());
    }

    fn webdis(body: &[u8]) -> Result<Answer, TierError> {
        parse_redis_get(Dialect::Webdis, &ok(body))
    }

    const ID: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    fn store(body: &str) -> Result<Answer, TierError> {
        parse_store(&ok(body.as_bytes()), &agent())
    }

    /// The bug this module once had: on wasm32 `usize` is `u32`, so the old
    /// `data.len() != len + 2` check wrapped `4294967294 + 2` to 0, matched the empty
    /// rest of `$4294967294\r\n`, and `&data[len..]` then sliced out of bounds: a
    /// panic, so a trap of the VM. The same arithmetic over `u32`, checked, refuses it.
    #[test]
    fn the_wasm32_length_wrap_is_an_error() {
        let body = b"$4294967294\r\n";
        let (len, rest_len) = (4_294_967_294u32, 0u32);
        assert_eq!(len.wrapping_add(2), rest_len, "the unchecked check passed");
        assert!(
            b"".get(len as usize..).is_none(),
            "and the slice was out of range"
        );

        assert_eq!(
            bulk_value::<u32>(body),
            Err(TierError("length overflows")),
            "wasm32 arithmetic"
        );
        assert_eq!(
            bulk_value::<u32>(b"$4294967295\r\n").map(<[u8]>::len),
            Err(TierError("length overflows"))
        );
        assert_eq!(
            bulk_value::<u32>(b"$4294967296\r\n"),
            Err(TierError("length overflows"))
        );
        assert_eq!(bulk_value::<u64>(body), Err(TierError("length mismatch")));
        // The 64-bit twins of the wrap, natively.
        assert_eq!(
            bulk_value::<u64>(b"$18446744073709551614\r\n"),
            Err(TierError("length overflows"))
        );
        assert_eq!(
            bulk_value::<u64>(b"$18446744073709551616\r\n"),
            Err(TierError("length overflows"))
        );
        for hostile in [
            &body[..],
            b"$4294967295\r\n",
            b"$4294967293\r\nab",
            b"$18446744073709551614\r\n",
            b"$18446744073709551615\r\n",
            b"$99999999999999999999999999999999\r\n",
        ] {
            assert!(webdis(hostile).is_err(), "{hostile:?}");
            assert!(bulk_value::<u32>(hostile).is_err(), "{hostile:?}");
            assert!(bulk_value::<u64>(hostile).is_err(), "{hostile:?}");
        }
    }

    #[test]
    fn webdis_replies_are_read_strictly() {
        assert_eq!(
            webdis(b"$5\r\nhello\r\n"),
            Ok(Answer::Directive("hello".into(), Version::Unknown))
        );
        // The declared bytes exactly, whatever they contain.
        assert_eq!(
            webdis(b"$11\r\n$3\r\nabc\r\n\r\n\r\n"),
            Ok(Answer::Directive(
                "$3\r\nabc\r\n\r\n".into(),
                Version::Unknown
            ))
        );
        for (bad, why) in [
            (&b"$+5\r\nhello\r\n"[..], "plus sign"),
            (b"$ 5\r\nhello\r\n", "space"),
            (b"$5 \r\nhello\r\n", "trailing space"),
            (b"$05\r\nhello\r\n", "leading zero"),
            (b"$00\r\n\r\n", "leading zero"),
            (b"$-0\r\n\r\n", "negative zero"),
            (b"$-2\r\n", "negative length"),
            (b"$-1\r\n\r\n", "nil with trailing bytes"),
            (b"$-1\r\nhello\r\n", "nil with a value"),
            (b"$-1", "nil without CRLF"),
            (b"$-1\n", "nil with LF only"),
            (b"$5\nhello\r\n", "LF only after the length"),
            (b"$5\rhello\r\n", "CR only after the length"),
            (b"$5\r\nhello", "no final CRLF"),
            (b"$5\r\nhello\n", "LF only at the end"),
            (b"$5\r\nhelloXY", "other bytes where the CRLF goes"),
            (b"$5\r\nhello\r\nX", "trailing bytes"),
            (b"$5\r\nhello\r\n$5\r\nhello\r\n", "two replies"),
            (b"$4\r\nhello\r\n", "length shorter than the value"),
            (b"$6\r\nhello\r\n", "length longer than the value"),
            (b"$100\r\nhello\r\n", "length longer than the body"),
            (b"$", "no length"),
            (b"$\r\n\r\n", "empty length"),
            (b"$5", "no CRLF after the length"),
            (b"$\xd9\xa5\r\nhello\r\n", "a non-ASCII digit"),
            (b"$\xef\xbc\x95\r\nhello\r\n", "a fullwidth digit"),
            (b":1\r\n", "an integer reply"),
            (b"*1\r\n$5\r\nhello\r\n", "an array reply"),
            (b"+OK\r\n", "a status reply"),
            (b"-ERR wrong\r\n", "an error reply"),
            (b"-WRONGTYPE Operation against a key\r\n", "an error reply"),
            (b"_\r\n", "a RESP3 null"),
            (b" $5\r\nhello\r\n", "leading space"),
            (b"$5\r\nhel\0o\r\n", "NUL inside the value"),
            (b"$5\r\nhello\0\r\n", "length off by the NUL"),
            (b"$6\r\nhello\0\r\n", "NUL at the end"),
            (b"$3\r\n\xc3\x28a\r\n", "not UTF-8"),
            (b"$3\r\n\xed\xa0\x80\r\n", "a UTF-8 surrogate"),
            (b"", "empty body"),
        ] {
            assert!(webdis(bad).is_err(), "{why}: {bad:?}");
        }
        // A tombstone is "no key", whatever follows its NUL.
        assert_eq!(webdis(b"$2\r\n\0\xff\r\n"), Ok(Answer::Unknown));
    }

    #[test]
    fn the_store_answer_is_read_strictly() {
        let good = format!(r#"{{"agent_id":"{ID}","content":"D"}}"#);
        assert_eq!(
            store(&good),
            Ok(Answer::Directive("D".into(), Version::Unknown))
        );
        assert_eq!(
            store(&format!(r#" {{ "content" : "D" , "agent_id" : "{ID}" }} "#)),
            Ok(Answer::Directive("D".into(), Version::Unknown)),
            "member order and whitespace do not matter"
        );
        // serde would read a struct's members from an array too: one spelling only.
        assert!(store(&format!(r#"["{ID}","D"]"#)).is_err());
        assert!(store(&format!(r#" ["{ID}",null]"#)).is_err());
        let mut unread_bad_utf8 =
            format!(r#"{{"agent_id":"{ID}","content":"A","x":"?"}}"#).into_bytes();
        let at = unread_bad_utf8.len() - 3;
        unread_bad_utf8[at] = 0x8a;
        assert!(
            parse_store(&ok(&unread_bad_utf8), &agent()).is_err(),
            "an ignored member is still read as UTF-8"
        );
        let v = "0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d";
        assert_eq!(
            store(&format!(
                r#"{{"agent_id":"{ID}","content":"D","version_id":"{v}"}}"#
            )),
            Ok(Answer::Directive(
                "D".into(),
                Version::parse_canonical(v).unwrap()
            ))
        );
        assert_eq!(
            store(&format!(
                r#"{{"agent_id":"{ID}","content":null,"version_id":null}}"#
            )),
            Ok(Answer::NoDirective)
        );
        for odd in ["\"v1\"", "\"0B6C7A4E-1F2D-4C3B-8A9E-5D6F7A8B9C0D\"", "\"\""] {
            assert_eq!(
                store(&format!(
                    r#"{{"agent_id":"{ID}","content":"D","version_id":{odd}}}"#
                )),
                Ok(Answer::Directive("D".into(), Version::Unknown)),
                "{odd}: an unknown version, not a failed lookup"
            );
        }
        for bad in ["1", "{}", "[]"] {
            assert!(
                store(&format!(
                    r#"{{"agent_id":"{ID}","content":"D","version_id":{bad}}}"#
                ))
                .is_err(),
                "{bad}: not a string"
            );
        }
        for extra in [r#""Content":"E""#, r#""x":{"content":"E"}"#] {
            assert_eq!(
                store(&format!(r#"{{"agent_id":"{ID}","content":"D",{extra}}}"#)),
                Ok(Answer::Directive("D".into(), Version::Unknown)),
                "other members are ignored: {extra}"
            );
        }
        assert_eq!(
            store(&format!(r#"{{"agent_id":"{ID}","content":""}}"#)),
            Ok(Answer::NoDirective)
        );
        for (bad, why) in [
            (
                format!(r#"{{"agent_id":"{ID}","content":"D","content":"E"}}"#),
                "duplicate content",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":null,"content":"E"}}"#),
                "duplicate content",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":"D","cont\u0065nt":"E"}}"#),
                "escaped duplicate",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","agent_id":"{ID}","content":"D"}}"#),
                "duplicate agent_id",
            ),
            (format!(r#"{{"agent_id":"{ID}"}}"#), "missing content"),
            (r#"{"content":"D"}"#.to_owned(), "missing agent_id"),
            (
                format!(r#"{{"agent_id":"{ID}","content":5}}"#),
                "content a number",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":["D"]}}"#),
                "content an array",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":"a\u0000b"}}"#),
                "NUL inside",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":"\u0000"}}"#),
                "a tombstone",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":"\ud800"}}"#),
                "lone surrogate",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":"D"}}x"#),
                "trailing bytes",
            ),
            (
                format!(r#"{{"agent_id":"{ID}","content":"D"}}{{}}"#),
                "two documents",
            ),
            (format!(r#"{{"agent_id":"{ID}","content":"D""#), "truncated"),
            (
                format!(r#"[{{"agent_id":"{ID}","content":"D"}}]"#),
                "an array",
            ),
            (
                format!(r#"{{"agent_id":" {ID}","content":"D"}}"#),
                "padded id",
            ),
            (
                format!(r#"{{"agent_id":"{}","content":"D"}}"#, ID.to_uppercase()),
                "upper-case id",
            ),
            (
                format!(r#"{{"agent_id":"{{{ID}}}","content":"D"}}"#),
                "braced id",
            ),
            (
                format!(r#"{{"agent_id":"{}","content":"D"}}"#, ID.replace('-', "")),
                "simple id",
            ),
            (
                r#"{"agent_id":"00000000-0000-4000-8000-000000000000","content":"D"}"#.to_owned(),
                "another agent",
            ),
            (r#"{"agent_id":null,"content":"D"}"#.to_owned(), "null id"),
            (String::new(), "empty"),
        ] {
            assert!(store(&bad).is_err(), "{why}: {bad}");
        }
        let mut not_utf8 = format!(r#"{{"agent_id":"{ID}","content":"D"}}"#).into_bytes();
        let at = not_utf8.len() - 3;
        not_utf8[at] = 0xff;
        assert!(parse_store(&ok(&not_utf8), &agent()).is_err());
        for status in [None, Some(201), Some(404), Some(500)] {
            let resp = Response {
                status,
                body: good.clone().into_bytes(),
            };
            assert!(parse_store(&resp, &agent()).is_err(), "{status:?}");
        }
    }

    #[test]
    fn write_outcomes_are_exact() {
        for body in [
            &br#"{"EVAL":1} "#[..],
            br#"{"EVAL": 1}"#,
            br#"{"EVAL":1}{"EVAL":1}"#,
            b"1",
            b"",
        ] {
            assert_eq!(
                redis_set_outcome(Dialect::Webdis, &ok(body)),
                WriteOutcome::Failed,
                "{body:?}"
            );
        }
        let resp = Response {
            status: Some(201),
            body: br#"{"EVAL":1}"#.to_vec(),
        };
        assert_eq!(
            redis_set_outcome(Dialect::Webdis, &resp),
            WriteOutcome::Failed
        );
    }

    /// The canonical bulk reply of `value`, with its length off by `delta`.
    fn bulk(value: &[u8], delta: i64) -> Vec<u8> {
        let declared = value.len() as i64 + delta;
        [format!("${declared}\r\n").as_bytes(), value, b"\r\n"].concat()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// No bytes make a reader panic, and the 32-bit arithmetic reads every
        /// reply a 64-bit one does (bodies here are far below 4 GiB).
        #[test]
        fn arbitrary_answers_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..64),
            status in prop_oneof![Just(Some(200u16)), any::<Option<u16>>()],
        ) {
            let resp = Response { status, body: body.clone() };
            let _ = parse_redis_get(Dialect::Webdis, &resp);
            let _ = redis_set_outcome(Dialect::Webdis, &resp);
            let _ = parse_store(&resp, &agent());
            prop_assert_eq!(bulk_value::<u32>(&body).ok(), bulk_value::<u64>(&body).ok());
            prop_assert_eq!(bulk_value::<usize>(&body), bulk_value::<u64>(&body));
        }

        /// Replies shaped like Webdis's, with prefixes and suffixes that mutate them.
        #[test]
        fn reply_like_answers_never_panic(
            head in prop_oneof![Just(""), Just("$"), Just("$-"), Just("$+"), Just("$0")],
            digits in "[0-9]{0,24}",
            sep in prop_oneof![Just(""), Just("\r\n"), Just("\n"), Just("\r")],
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let body = [head.as_bytes(), digits.as_bytes(), sep.as_bytes(), &tail].concat();
            let _ = webdis(&body);
            prop_assert_eq!(bulk_value::<u32>(&body).ok(), bulk_value::<u64>(&body).ok());
        }

        /// A bulk reply is read as exactly its value when its length is right, and
        /// refused when it is not.
        #[test]
        fn bulk_replies_round_trip(
            value in proptest::collection::vec(any::<u8>(), 0..48),
            delta in prop_oneof![Just(0i64), -3i64..4, any::<i32>().prop_map(i64::from)],
        ) {
            let body = bulk(&value, delta);
            let got = webdis(&body);
            if delta != 0 {
                prop_assert!(got.is_err());
                return Ok(());
            }
            prop_assert_eq!(bulk_value::<u32>(&body), Ok(&value[..]));
            let expected = match std::str::from_utf8(&value) {
                _ if value.first() == Some(&0) => Ok(Answer::Unknown),
                Ok(t) if t.contains('\0') => Err(TierError("NUL in directive")),
                Ok("") => Ok(Answer::NoDirective),
                Ok(t) => Ok(Answer::Directive(t.into(), Version::Unknown)),
                Err(_) => Err(TierError("not UTF-8")),
            };
            prop_assert_eq!(got, expected);
        }

        /// Any text the store sends (as JSON) is read back as itself.
        #[test]
        fn store_answers_round_trip(text in any::<String>(), other in any::<bool>()) {
            let id = if other { "00000000-0000-4000-8000-000000000000" } else { ID };
            let body = serde_json::json!({"agent_id": id, "content": text}).to_string();
            let expected = if other {
                Err(TierError("answer for another agent"))
            } else {
                directive(text.clone(), Version::Unknown)
            };
            prop_assert_eq!(store(&body), expected);
        }
    }

    mod keys {
        use super::*;

        fn key() -> KeyHash {
            KeyHash::of(b"ibex_k")
        }

        #[test]
        fn builds_key_requests() {
            let hex = key().hex();
            let c = redis_get_key(&cfg(), &key());
            assert!(
                c.path.starts_with("/EVAL/local%20v%3Dredis.call"),
                "{}",
                c.path
            );
            assert!(
                c.path.ends_with(&format!("/1/agent_key:{hex}.raw")),
                "{}",
                c.path
            );
            let c = store_get_key(&cfg(), &key());
            assert_eq!(
                (c.cluster.as_str(), c.path),
                ("ibex_store", format!("/v1/keys/{hex}"))
            );
            let marker = ibex_wire::flush_marker_for("agent_key:", &format!("agent_key:{hex}"));
            let w = redis_set_key(&cfg(), &key(), Some(&agent()), 60);
            assert_eq!(w.method, "PUT");
            assert!(w.path.ends_with(&format!("/2/agent_key:{hex}/{marker}/60")));
            assert_eq!(
                w.body.as_ref().map(|b| b.expose().as_slice()),
                Some(&b"6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"[..])
            );
            let n = redis_set_key(&cfg(), &key(), None, 10);
            assert_eq!((n.method, n.body), ("GET", None));
            assert!(n.path.ends_with(&format!("/{marker}/10/")));
        }

        #[test]
        fn reads_redis_key_values_strictly() {
            let reply = |v: &str, ttl: &str| {
                ok(format!("*2\r\n${}\r\n{}\r\n:{ttl}\r\n", v.len(), v).as_bytes())
            };
            let uuid = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &ok(b"$-1\r\n")),
                Ok((KeyAnswer::Unknown, None))
            );
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &reply("\0", "9000")),
                Ok((KeyAnswer::Unknown, None))
            );
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &reply("", "9000")),
                Ok((KeyAnswer::NoAgent, Some(9000)))
            );
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &reply(uuid, "59123")),
                Ok((KeyAnswer::Agent(agent()), Some(59123)))
            );
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &reply(uuid, "-1")),
                Ok((KeyAnswer::Agent(agent()), None))
            );
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &reply(uuid, "0")),
                Ok((KeyAnswer::Agent(agent()), Some(0)))
            );
            // Webdis's raw spelling, as a real Webdis 0.1.9 answers.
            let webdis = |v: &str, ttl: &str| {
                ok(format!("*2\r\n${}\r\n{v}\r\n${}\r\n{ttl}\r\n", v.len(), ttl.len()).as_bytes())
            };
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &webdis(uuid, "59999")),
                Ok((KeyAnswer::Agent(agent()), Some(59999)))
            );
            assert_eq!(
                parse_redis_key_get(Dialect::Webdis, &webdis("", "-1")),
                Ok((KeyAnswer::NoAgent, None))
            );
            for bad in [
                format!("*2\r\n$36\r\n{uuid}\r\n$4\r\n59999\r\n"),
                format!("*2\r\n$36\r\n{uuid}\r\n$6\r\n59999\r\n"),
                format!("*2\r\n$36\r\n{uuid}\r\n$05\r\n59999\r\n"),
                format!("*2\r\n$36\r\n{uuid}\r\n$5\r\n5999x\r\n"),
                format!("*2\r\n$36\r\n{uuid}\r\n$\r\n\r\n"),
                format!("*2\r\n$36\r\n{uuid}\r\n+5\r\n"),
            ] {
                assert!(
                    parse_redis_key_get(Dialect::Webdis, &ok(bad.as_bytes())).is_err(),
                    "{bad:?}"
                );
            }
            for bad in [
                "6F1C1A3E-5B7D-4C2A-9E0F-123456789ABC",
                "{6f1c1a3e-5b7d-4c2a-9e0f-123456789abc}",
                " 6f1c1a3e-5b7d-4c2a-9e0f-123456789abc",
                "agent",
            ] {
                assert!(
                    parse_redis_key_get(Dialect::Webdis, &reply(bad, "1")).is_err(),
                    "{bad}"
                );
            }
            for ttl in ["-2", "01", "+5", "", "1 ", "18446744073709551616"] {
                assert!(
                    parse_redis_key_get(Dialect::Webdis, &reply(uuid, ttl)).is_err(),
                    "{ttl:?}"
                );
            }
            let exact = format!("*2\r\n$36\r\n{uuid}\r\n:5\r\n");
            for bad in [
                format!("{exact}x"),
                exact.replacen("$36", "$35", 1),
                exact.replacen("$36", "$37", 1),
                exact.replacen("$36", "$036", 1),
                exact.replacen("*2", "*3", 1),
                format!("$36\r\n{uuid}\r\n"),
                "$0\r\n\r\n".to_string(),
                "*-1\r\n".to_string(),
                ":1\r\n".to_string(),
                format!("*2\r\n${}\r\n", u64::MAX),
            ] {
                assert!(
                    parse_redis_key_get(Dialect::Webdis, &ok(bad.as_bytes())).is_err(),
                    "{bad:?}"
                );
            }
            assert!(parse_redis_key_get(Dialect::Webdis, &Response::default()).is_err());
            let mut not_ok = reply(uuid, "5");
            not_ok.status = Some(500);
            assert!(parse_redis_key_get(Dialect::Webdis, &not_ok).is_err());
        }

        #[test]
        fn reads_store_key_answers_strictly() {
            let hex = key().hex();
            let answer = |v: &str| ok(v.as_bytes());
            assert_eq!(
                parse_store_key(
                    &answer(&format!(
                        r#"{{"key_sha256":"{hex}","agent_id":"6f1c1a3e-5b7d-4c2a-9e0f-123456789abc","label":"x"}}"#
                    )),
                    &key()
                ),
                Ok(KeyAnswer::Agent(agent()))
            );
            assert_eq!(
                parse_store_key(
                    &answer(&format!(r#"{{"key_sha256":"{hex}","agent_id":null}}"#)),
                    &key()
                ),
                Ok(KeyAnswer::NoAgent)
            );
            let other = KeyHash::of(b"other").hex();
            for bad in [
                format!(r#"{{"key_sha256":"{other}","agent_id":null}}"#),
                format!(r#"{{"key_sha256":"{hex}"}}"#),
                r#"{"agent_id":null}"#.to_string(),
                format!(
                    r#"{{"key_sha256":"{hex}","agent_id":null,"agent_id":"6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"}}"#
                ),
                format!(
                    r#"{{"key_sha256":"{hex}","agent_id":"6F1C1A3E-5B7D-4C2A-9E0F-123456789ABC"}}"#
                ),
                format!(r#"{{"key_sha256":"{hex}","agent_id":7}}"#),
                format!(r#"[{{"key_sha256":"{hex}","agent_id":null}}]"#),
            ] {
                assert!(parse_store_key(&answer(&bad), &key()).is_err(), "{bad}");
            }
            let mut not_utf8 =
                format!(r#"{{"key_sha256":"{hex}","agent_id":null,"x":"#).into_bytes();
            not_utf8.extend_from_slice(b"\"\xff\"}");
            assert!(parse_store_key(&ok(&not_utf8), &key()).is_err());
            let status = Response {
                status: Some(503),
                body: format!(r#"{{"key_sha256":"{hex}","agent_id":null}}"#).into_bytes(),
            };
            assert!(parse_store_key(&status, &key()).is_err());
            let array = format!(r#"["{}",null]"#, key().hex());
            assert!(parse_store_key(&ok(array.as_bytes()), &key()).is_err());
        }
    }

    mod upstash_dialect {
        use super::*;

        fn cfg() -> Config {
            Config::parse(br#"{"redis":{"dialect":"upstash","token":"tok"}}"#, None).unwrap()
        }
        fn up(body: &str) -> Response {
            ok(body.as_bytes())
        }
        fn body_of(c: &Callout) -> Vec<String> {
            serde_json::from_slice(c.body.as_ref().unwrap().expose()).unwrap()
        }

        #[test]
        fn every_command_is_a_json_array_posted_with_the_token() {
            let id = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
            let key = KeyHash::of(b"ibex_k");
            let calls = [
                redis_get(&cfg(), &agent()),
                redis_set(
                    &cfg(),
                    &agent(),
                    Some(("Be \"terse\".\r\n", Version::Unknown)),
                    60,
                ),
                redis_set(&cfg(), &agent(), None, 10),
                redis_get_key(&cfg(), &key),
                redis_set_key(&cfg(), &key, Some(&agent()), 60),
                redis_set_key(&cfg(), &key, None, 10),
            ];
            for c in &calls {
                assert_eq!((c.method, c.path.as_str()), ("POST", "/"));
                assert_eq!(c.cluster, "ibex_redis");
                assert_eq!(
                    c.authorization.as_ref().map(|a| a.expose().as_str()),
                    Some("Bearer tok")
                );
                assert_eq!(
                    c.headers,
                    [
                        ("content-type", "application/json"),
                        ("upstash-encoding", "base64")
                    ]
                );
                assert!(!format!("{c:?}").contains("tok\""), "token in Debug: {c:?}");
            }
            let dkey = format!("directive:{id}");
            let marker = ibex_wire::flush_marker_for("directive:", &dkey);
            assert_eq!(
                body_of(&calls[0]),
                ["EVAL", ibex_wire::GET_SCRIPT, "1", dkey.as_str()]
            );
            assert_eq!(
                body_of(&calls[1]),
                [
                    "EVAL",
                    ibex_wire::SET_IF_ABSENT_SCRIPT,
                    "2",
                    &dkey,
                    &marker,
                    "60",
                    "Be \"terse\".\r\n"
                ]
            );
            assert_eq!(body_of(&calls[2])[5..], ["10", ""]);
            let kkey = ibex_wire::agent_key_redis_key(&key.hex());
            assert_eq!(
                body_of(&calls[3]),
                ["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", kkey.as_str()]
            );
            assert_eq!(
                body_of(&calls[4])[3..],
                [
                    kkey.as_str(),
                    &ibex_wire::flush_marker_for("agent_key:", &kkey),
                    "60",
                    id
                ]
            );
            assert_eq!(body_of(&calls[5])[6], "");
            assert!(!format!("{:?}", calls[1]).contains("terse"));
        }

        #[test]
        fn reads_values_as_webdis_does_once_decoded() {
            let u = Dialect::Upstash;
            assert_eq!(
                parse_redis_get(u, &up(r#"{"result":null}"#)),
                Ok(Answer::Unknown)
            );
            assert_eq!(
                parse_redis_get(u, &up(r#"{"result":""}"#)),
                Ok(Answer::NoDirective)
            );
            assert_eq!(
                parse_redis_get(u, &up(r#"{"result":"AA=="}"#)),
                Ok(Answer::Unknown)
            );
            assert_eq!(
                parse_redis_get(u, &up(r#"{"result":"AGFi"}"#)),
                Ok(Answer::Unknown)
            );
            // "ab\r\n\"é" in base64: bytes are exactly what Redis holds.
            assert_eq!(
                parse_redis_get(u, &up(r#"{"result":"YWINCiLDqQ=="}"#)),
                Ok(Answer::Directive("ab\r\n\"é".into(), Version::Unknown))
            );
            for bad in [
                r#"{"result":"YQBi"}"#, // NUL inside: no directive of ours
                r#"{"result":"//4="}"#, // not UTF-8
                r#"{"result":"YWI"}"#,  // not canonical base64
                r#"{"result":"ab"}"#,   // a plain string: the front ignored the encoding
                r#"{"error":"WRONGTYPE"}"#,
            ] {
                assert!(parse_redis_get(u, &up(bad)).is_err(), "{bad}");
            }
            let status = Response {
                status: Some(401),
                body: br#"{"error":"Unauthorized"}"#.to_vec(),
            };
            assert!(parse_redis_get(u, &status).is_err());
            assert!(parse_redis_get(u, &Response::default()).is_err());
            // A Webdis answer is not an Upstash one, nor the other way round.
            assert!(parse_redis_get(u, &ok(b"$-1\r\n")).is_err());
            assert!(parse_redis_get(Dialect::Webdis, &up(r#"{"result":null}"#)).is_err());
        }

        #[test]
        fn reads_key_entries_and_write_outcomes() {
            let u = Dialect::Upstash;
            let id = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
            let b64 = "NmYxYzFhM2UtNWI3ZC00YzJhLTllMGYtMTIzNDU2Nzg5YWJj";
            assert_eq!(
                parse_redis_key_get(u, &up(&format!(r#"{{"result":["{b64}",59000]}}"#))),
                Ok((KeyAnswer::Agent(AgentId::parse(id).unwrap()), Some(59000)))
            );
            assert_eq!(
                parse_redis_key_get(u, &up(r#"{"result":["",-1]}"#)),
                Ok((KeyAnswer::NoAgent, None))
            );
            assert_eq!(
                parse_redis_key_get(u, &up(r#"{"result":["AA==",100]}"#)),
                Ok((KeyAnswer::Unknown, None))
            );
            assert_eq!(
                parse_redis_key_get(u, &up(r#"{"result":null}"#)),
                Ok((KeyAnswer::Unknown, None))
            );
            // Upper-case hex is another spelling of the agent: refused.
            let upper = "NkYxQzFBM0UtNUI3RC00QzJBLTlFMEYtMTIzNDU2Nzg5QUJD";
            assert!(
                parse_redis_key_get(u, &up(&format!(r#"{{"result":["{upper}",1]}}"#))).is_err()
            );
            assert_eq!(
                redis_set_outcome(u, &up(r#"{"result":1}"#)),
                WriteOutcome::Written
            );
            assert_eq!(
                redis_set_outcome(u, &up(r#"{"result":0}"#)),
                WriteOutcome::Skipped
            );
            assert_eq!(
                redis_set_outcome(u, &ok(br#"{"EVAL":1}"#)),
                WriteOutcome::Failed
            );
            let refused = Response {
                status: Some(403),
                body: br#"{"result":1}"#.to_vec(),
            };
            assert_eq!(redis_set_outcome(u, &refused), WriteOutcome::Failed);
        }
    }
}
