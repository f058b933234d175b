//! Fuzzes the readers of the remote tiers' answers (`ibex_directive::tiers`): Webdis
//! raw replies (L2 GET), write-back outcomes (L2 EVAL) and the store's JSON (L3), for
//! directives and for gateway keys (every Redis answer is also read as a key's value,
//! every store answer also as a key lookup's).
//!
//! Input: the first byte picks the reader and the HTTP status (`sel % 5` the mode,
//! `sel / 5 % 4` the status: 200, 200, no answer, 201); the rest is the answer, or,
//! in the two building modes, what an answer is built from:
//! - 0: the bytes are a Webdis GET answer;
//! - 1: byte 0 is a signed delta, the rest a Redis value, sent as the bulk reply
//!   `$<len + delta>\r\n<value>\r\n` (most of the fuzzer's inputs are then replies
//!   whose length is right or nearly so);
//! - 2: the bytes are a write-back answer;
//! - 3: the bytes are a store answer;
//! - 4: byte 0 picks the agent id in the answer (the one asked, or another), the rest
//!   (lossy UTF-8) is the `content` of a store answer serde_json writes.
//!
//! Properties, against references written independently of the readers (lengths in
//! `u128`, JSON through `serde_json::Value` and a key lister that keeps duplicates):
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
//!   once, and then as that agent (or none).
//!
//! `make fuzz` runs it from the committed seeds (`fuzz/seeds/answers/`) with the
//! dictionary `fuzz/answers.dict`.
#![no_main]

use ibex_directive::agent::AgentId;
use ibex_directive::apikey::KeyHash;
use ibex_directive::tiers::{
    parse_redis_get, parse_redis_key_get, parse_store, parse_store_key, redis_set_outcome,
    Answer, KeyAnswer, Response, WriteOutcome,
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
                assert!(key_got.is_err(), "a key value length off by {delta} was read");
            }
            let got = check_redis_get(status, &body);
            if delta != 0 {
                assert!(got.is_err(), "a length off by {delta} was read");
            } else if status == Some(200) {
                assert_eq!(got, expected_value(value), "a well-formed reply misread");
            }
        }
        2 => {
            let got = redis_set_outcome(&Response {
                status,
                body: rest.to_vec(),
            });
            let expected = match (status, rest) {
                (Some(200), b"{\"EVAL\":1}") => WriteOutcome::Written,
                (Some(200), b"{\"EVAL\":0}") => WriteOutcome::Skipped,
                _ => WriteOutcome::Failed,
            };
            assert_eq!(got, expected);
        }
        3 => check_store(status, rest, &agent),
        _ => {
            let Some((&pick, content)) = rest.split_first() else {
                return;
            };
            let content = String::from_utf8_lossy(content);
            let hash = if pick % 4 < 2 { asked_hash() } else { KeyHash::of(b"other").hex() };
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
                    Answer::Directive(content.into_owned().into())
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
    let got = parse_redis_key_get(&Response {
        status,
        body: body.to_vec(),
    })
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
    let got = parse_redis_get(&Response {
        status,
        body: body.to_vec(),
    })
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
    if let Ok(Answer::Directive(text)) = &got {
        let text = text.expose();
        let rebuilt = format!("${}\r\n{}\r\n", text.len(), text);
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

/// What a Redis value means.
fn expected_value(value: &[u8]) -> Result<Answer, ()> {
    if value.first() == Some(&0) {
        return Ok(Answer::Unknown);
    }
    match std::str::from_utf8(value) {
        Ok("") => Ok(Answer::NoDirective),
        Ok(text) if !text.contains('\0') => Ok(Answer::Directive(text.to_owned().into())),
        _ => Err(()),
    }
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
    match &value["content"] {
        Value::Null => Ok(Answer::NoDirective),
        Value::String(s) if s.is_empty() => Ok(Answer::NoDirective),
        Value::String(s) if !s.contains('\0') => Ok(Answer::Directive(s.clone().into())),
        _ => Err(()),
    }
}
