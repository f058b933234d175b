//! Fuzzes the readers of the remote tiers' answers (`ibex_directive::tiers`): L2 in
//! both dialects, Webdis raw replies and Upstash JSON (GET, the key read, write-back
//! outcomes), and the store's JSON (L3), for directives and for gateway keys (every
//! Redis answer is also read as a key's value, every store answer also as a key
//! lookup's, and every answer of modes 0, 2, 3 and 4 also as each of the three
//! Upstash answers).
//!
//! Input: the first byte picks the reader and the HTTP status (`sel % 5` the mode,
//! `sel / 5 % 4` the status: 200, 200, no answer, 201); the rest is the answer, or,
//! in the two building modes, what an answer is built from:
//! - 0: the bytes are a Webdis GET answer, and an Upstash answer;
//! - 1: byte 0 is a signed delta, the rest a Redis value, sent as the bulk reply
//!   `$<len + delta>\r\n<value>\r\n` (most of the fuzzer's inputs are then replies
//!   whose length is right or nearly so), and in base64 as the Upstash answers
//!   `{"result":"<b64>"}` and `{"result":["<b64>",<PTTL>]}`, the PTTL picked by
//!   `delta` mod 8 (5000, -1, 0, i64::MAX, and the errors -2, i64::MAX + 1, 5000.0, 5e3);
//! - 2: the bytes are a write-back answer (Webdis's, and Upstash's);
//! - 3: the bytes are a store answer (and an Upstash answer);
//! - 4: byte 0 picks the agent id in the answer (the one asked, or another), the rest
//!   (lossy UTF-8) is the `content` of a store answer serde_json writes, and the
//!   `result` of an Upstash answer.
//!
//! Properties, against references written independently of the readers (lengths in
//! `u128`, JSON through `serde_json::Value` and a key lister that keeps duplicates,
//! base64 through the `base64` crate):
//! - nothing panics;
//! - only status 200 is ever read;
//! - a Webdis answer is read exactly when it is the canonical nil reply or the
//!   canonical bulk reply of some value (`$`, a decimal length without sign or leading
//!   zero, CRLF, exactly that many bytes, CRLF, nothing after); a directive's text is
//!   then exactly the bytes between the header and the final CRLF, is UTF-8, and has
//!   no NUL; a value starting with NUL is "no key"; a length that does not match the
//!   value is an error;
//! - a write-back is `Written`/`Skipped` only for the exact `{"EVAL":1}`/`{"EVAL":0}`;
//! - a store answer is read exactly when it is one JSON object with the members
//!   `agent_id` (the asked agent, canonical) and `content` (a string without NUL, or
//!   null), each exactly once (other members ignored), and then as that content;
//! - a key's Redis answer (the value and its PTTL, `*2\r\n` + a bulk reply + an
//!   integer reply, or the bulk string of its digits as Webdis spells it) is read
//!   exactly when it is the nil reply or that array in its canonical spelling (the
//!   TTL a canonical decimal or `-1`) and the value is a
//!   tombstone (unknown), empty (no such key) or an agent id in its canonical
//!   spelling (36 lower-case hex digits and hyphens), and then as that with its TTL;
//!   mode 1 also sends its value in that shape;
//! - a key lookup's store answer is read exactly when it is one JSON object with
//!   `key_sha256` (the asked hash) and `agent_id` (canonical, or null), each exactly
//!   once, and then as that agent (or none);
//! - an Upstash answer is read only with status 200, when the body is UTF-8 and one
//!   JSON object (as serde_json reads JSON, whitespace and escapes included) whose
//!   only member, named exactly once, is `result`; a string in it is read only in
//!   canonical padded standard base64 (what the `base64` crate decodes and encodes
//!   back to the same string), and its bytes then mean what a Webdis value's do:
//!   - a GET's `result` is null (no key) or such a string (tombstone: no key; empty:
//!     no directive; else UTF-8 without NUL: exactly that directive);
//!   - a key read's is null (no entry) or `[<string>, <integer>]`, the integer -1
//!     (no expiry) or within 0..=i64::MAX (the TTL in ms), the value a tombstone
//!     (unknown), empty (no such key, with the TTL) or a canonical agent id;
//!   - a write-back's is `Written`/`Skipped` only for the integers 1/0.
//!
//! `make fuzz` runs it from the committed seeds (`fuzz/seeds/answers/`) with the
//! dictionary `fuzz/answers.dict`.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ibex_directive::agent::AgentId;
use ibex_directive::apikey::KeyHash;
use ibex_directive::audit::Version;
use ibex_directive::config::Dialect;
use ibex_directive::tiers::{
    parse_redis_get, parse_redis_key_get, parse_store, parse_store_key, redis_set_outcome, Answer,
    KeyAnswer, Response, WriteOutcome,
};
use libfuzzer_sys::fuzz_target;

mod json_keys;
use json_keys::top_level_keys;
use serde_json::Value;

const ASKED: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
const OTHER: &str = "00000000-0000-4000-8000-000000000000";

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let status = match sel / 5 % 4 {
        0 | 1 => Some(200),
        2 => None,
        _ => Some(201),
    };
    let agent = AgentId::parse(ASKED).expect("a UUID");
    match sel % 5 {
        0 => {
            let _ = check_redis_get(status, rest);
            check_upstash(status, rest);
        }
        1 => {
            let Some((&delta, value)) = rest.split_first() else {
                return;
            };
            let delta = i128::from(delta as i8);
            let declared = value.len() as i128 + delta;
            let body = [format!("${declared}\r\n").as_bytes(), value, b"\r\n"].concat();
            let ttl = match delta % 4 {
                0 => ":5000".to_string(),
                1 | -1 => ":-1".to_string(),
                2 | -2 => "$4\r\n5000".to_string(),
                _ => "$2\r\n-1".to_string(),
            };
            let key_body = [
                format!("*2\r\n${declared}\r\n").as_bytes(),
                value,
                format!("\r\n{ttl}\r\n").as_bytes(),
            ]
            .concat();
            let key_got = check_redis_key_get(status, &key_body);
            if delta != 0 {
                assert!(
                    key_got.is_err(),
                    "a key value length off by {delta} was read"
                );
            }
            let got = check_redis_get(status, &body);
            if delta != 0 {
                assert!(got.is_err(), "a length off by {delta} was read");
            } else if status == Some(200) {
                assert_eq!(got, expected_value(value), "a well-formed reply misread");
            }
            check_built_upstash(status, delta, value);
        }
        2 => {
            let got = redis_set_outcome(
                Dialect::Webdis,
                &Response {
                    status,
                    body: rest.to_vec(),
                },
            );
            let expected = match (status, rest) {
                (Some(200), b"{\"EVAL\":1}") => WriteOutcome::Written,
                (Some(200), b"{\"EVAL\":0}") => WriteOutcome::Skipped,
                _ => WriteOutcome::Failed,
            };
            assert_eq!(got, expected);
            check_upstash(status, rest);
        }
        3 => {
            check_store(status, rest, &agent);
            check_upstash(status, rest);
        }
        _ => {
            let Some((&pick, content)) = rest.split_first() else {
                return;
            };
            let content = String::from_utf8_lossy(content);
            let hash = if pick % 4 < 2 {
                asked_hash()
            } else {
                KeyHash::of(b"other").hex()
            };
            let key_body = if pick % 8 < 4 {
                serde_json::json!({ "key_sha256": hash, "agent_id": content })
            } else {
                serde_json::json!({ "key_sha256": hash, "agent_id": null })
            }
            .to_string();
            check_store_key(status, key_body.as_bytes());
            let id = if pick % 2 == 0 { ASKED } else { OTHER };
            let body = serde_json::json!({ "agent_id": id, "content": content }).to_string();
            check_store(status, body.as_bytes(), &agent);
            let upstash = serde_json::json!({ "result": content }).to_string();
            check_upstash(status, upstash.as_bytes());
            if status == Some(200) && id == ASKED && !content.contains('\0') {
                let got = parse_store(
                    &Response {
                        status,
                        body: body.into_bytes(),
                    },
                    &agent,
                );
                let expected = if content.is_empty() {
                    Answer::NoDirective
                } else {
                    Answer::Directive(content.into_owned().into(), Version::Unknown)
                };
                assert_eq!(got, Ok(expected), "a well-formed store answer misread");
            }
        }
    }
});

/// The key whose lookups the store answers are checked against.
fn asked_key() -> KeyHash {
    KeyHash::of(b"ibex_fuzzed")
}

fn asked_hash() -> String {
    asked_key().hex()
}

/// Whether `s` is an agent id in the one spelling the companion writes.
fn canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

/// Reads `body` as a key's Webdis answer and checks it against the reference.
fn check_redis_key_get(status: Option<u16>, body: &[u8]) -> Result<(KeyAnswer, Option<u64>), ()> {
    let got = parse_redis_key_get(
        Dialect::Webdis,
        &Response {
            status,
            body: body.to_vec(),
        },
    )
    .map_err(|_| ());
    let expected = if status != Some(200) {
        Err(())
    } else if body == b"$-1\r\n" {
        Ok((KeyAnswer::Unknown, None))
    } else {
        match canonical_key_reply(body) {
            Some((value, _)) if value.first() == Some(&0) => Ok((KeyAnswer::Unknown, None)),
            Some(([], ttl)) => Ok((KeyAnswer::NoAgent, ttl)),
            Some((value, ttl)) => match std::str::from_utf8(value) {
                Ok(text) if canonical_uuid(text) => {
                    Ok((KeyAnswer::Agent(AgentId::parse(text).expect("a UUID")), ttl))
                }
                _ => Err(()),
            },
            None => Err(()),
        }
    };
    assert_eq!(got, expected, "key's Webdis answer misread");
    got
}

/// The value and TTL of `*2\r\n$<len>\r\n<value>\r\n:<ttl>\r\n` in its canonical
/// spelling (lengths in u128; the TTL a canonical decimal within u64, or -1).
fn canonical_key_reply(body: &[u8]) -> Option<(&[u8], Option<u64>)> {
    let rest = body.strip_prefix(b"*2\r\n$")?;
    let crlf = rest.windows(2).position(|w| w == b"\r\n")?;
    let header = std::str::from_utf8(&rest[..crlf]).ok()?;
    let len: u128 = header.parse().ok()?;
    if len.to_string() != header {
        return None;
    }
    let data = &rest[crlf + 2..];
    if (data.len() as u128) < len {
        return None;
    }
    let (value, after) = data.split_at(len as usize);
    let element = std::str::from_utf8(after.strip_prefix(b"\r\n")?.strip_suffix(b"\r\n")?).ok()?;
    // An integer reply, or Webdis's bulk string of the same digits.
    let ttl = match element.strip_prefix(':') {
        Some(ttl) => ttl,
        None => {
            let (n, ttl) = element.strip_prefix('$')?.split_once("\r\n")?;
            if n.parse::<usize>().ok()?.to_string() != n || n.parse::<usize>().ok()? != ttl.len() {
                return None;
            }
            ttl
        }
    };
    if ttl == "-1" {
        return Some((value, None));
    }
    let n: u64 = ttl.parse().ok()?;
    (n.to_string() == ttl).then_some((value, Some(n)))
}

/// Reads `body` as a key lookup's store answer and checks it against the reference.
fn check_store_key(status: Option<u16>, body: &[u8]) {
    let got = parse_store_key(
        &Response {
            status,
            body: body.to_vec(),
        },
        &asked_key(),
    )
    .map_err(|_| ());
    let expected = if status == Some(200) {
        reference_store_key(body)
    } else {
        Err(())
    };
    assert_eq!(got, expected, "key lookup's store answer misread");
}

fn reference_store_key(body: &[u8]) -> Result<KeyAnswer, ()> {
    std::str::from_utf8(body).map_err(|_| ())?;
    let keys = top_level_keys(body).ok_or(())?;
    let once = |name: &str| keys.iter().filter(|k| k.as_str() == name).count() == 1;
    if !once("key_sha256") || !once("agent_id") {
        return Err(());
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| ())?;
    if value["key_sha256"] != asked_hash().as_str() {
        return Err(());
    }
    match &value["agent_id"] {
        Value::Null => Ok(KeyAnswer::NoAgent),
        Value::String(s) if canonical_uuid(s) => {
            Ok(KeyAnswer::Agent(AgentId::parse(s).expect("a UUID")))
        }
        _ => Err(()),
    }
}

/// Reads `body` as a Webdis GET answer and checks it against the reference.
fn check_redis_get(status: Option<u16>, body: &[u8]) -> Result<Answer, ()> {
    let _ = check_redis_key_get(status, body);
    let got = parse_redis_get(
        Dialect::Webdis,
        &Response {
            status,
            body: body.to_vec(),
        },
    )
    .map_err(|_| ());
    if status != Some(200) {
        assert!(got.is_err(), "read an answer with status {status:?}");
        return got;
    }
    let expected = if body == b"$-1\r\n" {
        Ok(Answer::Unknown)
    } else {
        match canonical_bulk(body) {
            Some(value) => expected_value(value),
            None => Err(()),
        }
    };
    assert_eq!(got, expected, "Webdis answer misread");
    if let Ok(Answer::Directive(text, version)) = &got {
        let text = text.expose();
        let mut value = String::new();
        if let Version::Id(id) = version {
            value = format!("\0v{}", id.hyphenated());
        }
        value.push_str(text);
        let rebuilt = format!("${}\r\n{}\r\n", value.len(), value);
        assert_eq!(
            rebuilt.as_bytes(),
            body,
            "the directive is not the declared bytes"
        );
    }
    got
}

/// The value of `body` when it is exactly a canonical RESP bulk reply.
fn canonical_bulk(body: &[u8]) -> Option<&[u8]> {
    let rest = body.strip_prefix(b"$")?;
    let crlf = rest.windows(2).position(|w| w == b"\r\n")?;
    let header = std::str::from_utf8(&rest[..crlf]).ok()?;
    let len: u128 = header.parse().ok()?;
    if len.to_string() != header {
        return None; // a sign, a leading zero
    }
    let data = &rest[crlf + 2..];
    if data.len() as u128 != len + 2 {
        return None;
    }
    let (value, end) = data.split_at(data.len() - 2);
    (end == b"\r\n").then_some(value)
}

/// What a Redis value means: `\0v` + a canonical version id + text is that text at
/// that version; anything else starting with NUL a tombstone (no key); else the text
/// of an unknown version.
fn expected_value(value: &[u8]) -> Result<Answer, ()> {
    let (version, text) = match value {
        [0, b'v', rest @ ..]
            if rest.len() >= 36
                && std::str::from_utf8(&rest[..36]).is_ok_and(canonical_uuid) =>
        {
            let id = std::str::from_utf8(&rest[..36]).map_err(|_| ())?;
            (version_of(id), &rest[36..])
        }
        [0, ..] => return Ok(Answer::Unknown),
        _ => (Version::Unknown, value),
    };
    match std::str::from_utf8(text) {
        Ok("") => Ok(Answer::NoDirective),
        Ok(t) if !t.contains('\0') => Ok(Answer::Directive(t.to_owned().into(), version)),
        _ => Err(()),
    }
}

/// A canonical version id as the filter's type (the reference checked the spelling);
/// the nil id is the filter's spelling of "unknown".
fn version_of(id: &str) -> Version {
    if id == "00000000-0000-0000-0000-000000000000" {
        return Version::Unknown;
    }
    Version::parse_canonical(id).expect("a canonical UUID")
}

/// Reads `body` as a store answer and checks it against the reference.
fn check_store(status: Option<u16>, body: &[u8], agent: &AgentId) {
    check_store_key(status, body);
    let got = parse_store(
        &Response {
            status,
            body: body.to_vec(),
        },
        agent,
    )
    .map_err(|_| ());
    let expected = if status == Some(200) {
        reference_store(body)
    } else {
        Err(())
    };
    assert_eq!(got, expected, "store answer misread");
}

fn reference_store(body: &[u8]) -> Result<Answer, ()> {
    let keys = top_level_keys(body).ok_or(())?;
    let once = |name: &str| keys.iter().filter(|k| k.as_str() == name).count() == 1;
    if !once("agent_id") || !once("content") {
        return Err(()); // duplicate or missing members; others are ignored
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| ())?;
    if value["agent_id"] != ASKED {
        return Err(());
    }
    // `version_id`: optional, at most once, null or a canonical UUID.
    let version = match keys.iter().filter(|k| k.as_str() == "version_id").count() {
        0 => Version::Unknown,
        1 => match &value["version_id"] {
            Value::Null => Version::Unknown,
            Value::String(id) if canonical_uuid(id) => version_of(id),
            // Spelled otherwise: an unknown version, not a failed lookup.
            Value::String(_) => Version::Unknown,
            _ => return Err(()),
        },
        _ => return Err(()),
    };
    match &value["content"] {
        Value::Null => Ok(Answer::NoDirective),
        Value::String(s) if s.is_empty() => Ok(Answer::NoDirective),
        Value::String(s) if !s.contains('\0') => {
            Ok(Answer::Directive(s.clone().into(), version))
        }
        _ => Err(()),
    }
}

/// Reads `body` as each of the three Upstash answers (a GET, a key's value with its
/// PTTL, a write-back) and checks them against the references below.
fn check_upstash(status: Option<u16>, body: &[u8]) {
    let resp = Response {
        status,
        body: body.to_vec(),
    };
    let result = upstash_result(status, body);
    let got = parse_redis_get(Dialect::Upstash, &resp).map_err(|_| ());
    let expected = result.as_ref().ok_or(()).and_then(upstash_get);
    assert_eq!(got, expected, "Upstash GET answer misread");
    if let Ok(Answer::Directive(text, version)) = &got {
        // The directive is exactly the bytes the result's base64 spells.
        let mut value = String::new();
        if let Version::Id(id) = version {
            value = format!("\0v{}", id.hyphenated());
        }
        value.push_str(text.expose());
        assert_eq!(
            result.as_ref().and_then(Value::as_str),
            Some(STANDARD.encode(value.as_bytes()).as_str()),
            "the directive is not the encoded bytes"
        );
    }
    let got = parse_redis_key_get(Dialect::Upstash, &resp).map_err(|_| ());
    let expected = result.as_ref().ok_or(()).and_then(upstash_key);
    assert_eq!(got, expected, "Upstash key answer misread");
    let got = redis_set_outcome(Dialect::Upstash, &resp);
    // `as_u64` is Some only for a JSON integer (`1.0` and `1e0` are floats).
    let expected = match result.as_ref().and_then(Value::as_u64) {
        Some(1) => WriteOutcome::Written,
        Some(0) => WriteOutcome::Skipped,
        _ => WriteOutcome::Failed,
    };
    assert_eq!(got, expected, "Upstash write outcome misread");
}

/// The `result` of an Upstash answer: status 200, a UTF-8 body that is one JSON
/// object (as serde_json reads JSON) whose only member, named exactly once, is
/// `result`. None for anything else, a JSON array included (serde's derived struct
/// readers also take `[<result>]`; that is not the object the dialect answers).
fn upstash_result(status: Option<u16>, body: &[u8]) -> Option<Value> {
    if status != Some(200) {
        return None;
    }
    std::str::from_utf8(body).ok()?;
    if top_level_keys(body)? != ["result"] {
        return None;
    }
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(mut members) => members.remove("result"),
        _ => None,
    }
}

/// The bytes a string of canonical, padded, standard base64 spells: the one string
/// the `base64` crate writes for them.
fn canonical_base64(text: &str) -> Option<Vec<u8>> {
    let bytes = STANDARD.decode(text).ok()?;
    (STANDARD.encode(&bytes) == text).then_some(bytes)
}

/// What an Upstash GET's `result` means: null is no key, a canonical base64 string
/// is a Redis value (read as Webdis's), anything else an error.
fn upstash_get(result: &Value) -> Result<Answer, ()> {
    match result {
        Value::Null => Ok(Answer::Unknown),
        Value::String(s) => expected_value(&canonical_base64(s).ok_or(())?),
        _ => Err(()),
    }
}

/// What the key read's `result` means: null is no entry; `[<base64>, <PTTL>]` with
/// the PTTL an integer that is -1 (no expiry) or within 0..=i64::MAX is the value
/// (tombstone, empty, or a canonical agent id) with its TTL.
fn upstash_key(result: &Value) -> Result<(KeyAnswer, Option<u64>), ()> {
    let items = match result {
        Value::Null => return Ok((KeyAnswer::Unknown, None)),
        Value::Array(items) => items,
        _ => return Err(()),
    };
    let [Value::String(b64), Value::Number(pttl)] = items.as_slice() else {
        return Err(());
    };
    let ttl = match pttl.as_i64().ok_or(())? {
        -1 => None,
        ms if ms >= 0 => Some(ms as u64),
        _ => return Err(()),
    };
    let value = canonical_base64(b64).ok_or(())?;
    if value.first() == Some(&0) {
        return Ok((KeyAnswer::Unknown, None));
    }
    if value.is_empty() {
        return Ok((KeyAnswer::NoAgent, ttl));
    }
    match std::str::from_utf8(&value) {
        Ok(text) if canonical_uuid(text) => {
            Ok((KeyAnswer::Agent(AgentId::parse(text).expect("a UUID")), ttl))
        }
        _ => Err(()),
    }
}

/// Mode 1's value, sent in canonical Upstash answers: a GET's and a key read's with
/// a PTTL `delta` picks (some of them out of range). Checked against the references,
/// and a well-formed GET must read as the value itself.
fn check_built_upstash(status: Option<u16>, delta: i128, value: &[u8]) {
    let b64 = STANDARD.encode(value);
    let body = format!(r#"{{"result":"{b64}"}}"#);
    check_upstash(status, body.as_bytes());
    if status == Some(200) {
        let got = parse_redis_get(
            Dialect::Upstash,
            &Response {
                status,
                body: body.into_bytes(),
            },
        )
        .map_err(|_| ());
        assert_eq!(
            got,
            expected_value(value),
            "a well-formed Upstash GET misread"
        );
    }
    let pttl = match delta.rem_euclid(8) {
        0 => "5000",
        1 => "-1",
        2 => "0",
        3 => "9223372036854775807",
        4 => "-2",
        5 => "9223372036854775808",
        6 => "5000.0",
        _ => "5e3",
    };
    let key_body = format!(r#"{{"result":["{b64}",{pttl}]}}"#);
    check_upstash(status, key_body.as_bytes());
}
