//! Fuzzes the JSON scanner and splicer with arbitrary bodies and directives.
//!
//! Input: the first byte picks the format, the bytes up to the first NUL are the
//! directive (lossy UTF-8), the rest is the body.
//!
//! Properties, checked against serde_json as the reference:
//! - nothing panics;
//! - the escaped directive reads back, as a JSON string, as the directive;
//! - a body is accepted only if it is JSON (grammar and UTF-8), and refused as
//!   malformed only if it is not: the scanner is neither looser nor stricter;
//! - an accepted body has unique top-level keys as a real parser decodes them
//!   (a duplicate is a way around the directive);
//! - the output is JSON with unique top-level keys, differs from the body only by
//!   inserted bytes (or a replaced `null`), and its target member starts with the
//!   directive in the shape the format asks for;
//! - whenever serde_json can build both documents, the output equals the body with
//!   the directive inserted by a reference implementation.
//!
//! The grammar reference is serde_json's `IgnoredAny`, which validates without
//! building values: no depth limit, no float range, lone surrogate escapes allowed —
//! the three places where `serde_json::Value` refuses valid JSON (`1e400`, nesting
//! deeper than 128, `"\ud800"`) and the scanner rightly accepts. (The checks this
//! target had before used `Value`, and so reported such bodies as crashes.)
//!
//! `make fuzz` runs it from the committed seeds (`fuzz/seeds/splice/`, one per shape
//! of each format) with the dictionary `fuzz/splice.dict`, for `FUZZ_SECONDS`.
#![no_main]

use ibex_directive::escape::escape_json_str;
use ibex_directive::inject::{splice, Format};
use ibex_directive::json::{fold_case, scan, BodyError, ValueKind};
use libfuzzer_sys::fuzz_target;

mod json_keys;
use json_keys::top_level_keys;
use serde::de::IgnoredAny;
use serde_json::{json, Value};

const PREFIX: &str = r#"{"role":"system","content":""#;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = match selector % 3 {
        0 => Format::OpenAiChat,
        1 => Format::OpenAiResponses,
        _ => Format::AnthropicMessages,
    };
    let (directive, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    let directive = String::from_utf8_lossy(directive);
    let escaped = escape_json_str(&directive);
    let read_back: Option<String> = serde_json::from_str(&format!("\"{escaped}\"")).ok();
    assert_eq!(
        read_back.as_deref(),
        Some(&*directive),
        "escaping does not read back"
    );

    let utf8 = std::str::from_utf8(body).is_ok();
    let grammar = utf8 && is_json(body);
    match splice(format, body, PREFIX, &escaped) {
        Ok(out) => {
            assert!(grammar, "accepted a body that is not JSON");
            if let Some(keys) = top_level_keys(body) {
                assert!(unique(&keys), "accepted duplicate top-level keys {keys:?}");
            }
            check_output(format, body, &out, &escaped, &directive);
        }
        Err(BodyError::InvalidUtf8) => assert!(!utf8, "valid UTF-8 refused as invalid"),
        Err(BodyError::Malformed(_)) => {
            assert!(utf8 && !grammar, "valid JSON refused as malformed")
        }
        Err(BodyError::NotAnObject) => {
            assert!(grammar, "non-JSON refused as not an object");
            assert_ne!(
                first_non_ws(body),
                Some(b'{'),
                "object refused as not an object"
            );
        }
        Err(BodyError::DuplicateKey(key)) => {
            // Found while scanning: the rest of the body may not even be JSON.
            if let Some(keys) = top_level_keys(body) {
                assert!(
                    !unique(&keys),
                    "no duplicate among {keys:?}, refused for {key:?}"
                );
            }
        }
        Err(BodyError::CaseVariant(name)) => {
            assert!(grammar, "non-JSON refused for its shape");
            if let Some(keys) = top_level_keys(body) {
                assert!(
                    keys.iter().any(|k| k != name && fold_case(k) == fold_case(name)),
                    "no case variant of {name:?} among {keys:?}"
                );
            }
        }
        Err(BodyError::MissingMember(_) | BodyError::WrongType { .. }) => {
            assert!(grammar, "non-JSON refused for its shape");
            assert_eq!(first_non_ws(body), Some(b'{'));
        }
    }
});

fn check_output(format: Format, body: &[u8], out: &[u8], escaped: &str, directive: &str) {
    assert!(is_json(out), "output is not JSON");

    // Outside the insertion, byte for byte: a common prefix and suffix cover the
    // whole body, except a `null` replaced by the new string.
    let prefix = body.iter().zip(out).take_while(|(a, b)| a == b).count();
    let suffix = body[prefix..]
        .iter()
        .rev()
        .zip(out[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let changed = &body[prefix..body.len() - suffix];
    assert!(
        b"null".starts_with(changed),
        "bytes outside the insertion changed: {:?}",
        String::from_utf8_lossy(changed)
    );

    // The target member, rescanned, starts with the directive in the right shape.
    let top = scan(out).expect("the output must rescan");
    let d = escaped.as_bytes();
    let (name, starts): (&str, Vec<Vec<u8>>) = match format {
        Format::OpenAiChat => (
            "messages",
            vec![[b"[", PREFIX.as_bytes(), d, b"\"}"].concat()],
        ),
        Format::OpenAiResponses => (
            "instructions",
            vec![[b"\"", d, b"\""].concat(), [b"\"", d, b"\\n\\n"].concat()],
        ),
        Format::AnthropicMessages => (
            "system",
            vec![
                [b"\"", d, b"\""].concat(),
                [b"\"", d, b"\\n\\n"].concat(),
                [&b"[{\"type\":\"text\",\"text\":\""[..], d, b"\"}"].concat(),
            ],
        ),
    };
    let member = top.get(name).expect("the output has the target member");
    let value = &out[member.value_start..member.value_end];
    assert!(
        starts.iter().any(|s| value.starts_with(s)),
        "{name} does not start with the directive"
    );
    if member.value_kind(out) == ValueKind::String && value.len() == d.len() + 2 {
        // A whole new string: the body had no such member, or it was null.
        let before = scan(body).expect("accepted body scans");
        assert!(before
            .get(name)
            .map_or(true, |m| m.value_kind(body) == ValueKind::Null));
    }

    // The full meaning, whenever serde_json can build both documents.
    if let (Ok(before), Ok(after)) = (
        serde_json::from_slice::<Value>(body),
        serde_json::from_slice::<Value>(out),
    ) {
        assert_eq!(
            after,
            reference(format, before, directive),
            "output differs from the reference insertion"
        );
    }
}

/// The body with `d` inserted by serde_json, as the README's injection table says.
fn reference(format: Format, mut body: Value, d: &str) -> Value {
    let obj = body.as_object_mut().expect("accepted bodies are objects");
    match format {
        Format::OpenAiChat => {
            obj.get_mut("messages")
                .and_then(Value::as_array_mut)
                .expect("messages is an array")
                .insert(0, json!({"role": "system", "content": d}));
        }
        Format::OpenAiResponses | Format::AnthropicMessages => {
            let key = if format == Format::OpenAiResponses {
                "instructions"
            } else {
                "system"
            };
            match obj.get_mut(key) {
                Some(Value::String(s)) => *s = format!("{d}\n\n{s}"),
                Some(Value::Array(blocks)) => blocks.insert(0, json!({"type": "text", "text": d})),
                _ => {
                    obj.insert(key.to_string(), Value::String(d.to_string()));
                }
            }
        }
    }
    body
}

/// JSON grammar only (serde_json's `IgnoredAny`: iterative, any depth, any number).
fn is_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok() && serde_json::from_slice::<IgnoredAny>(bytes).is_ok()
}

fn first_non_ws(bytes: &[u8]) -> Option<u8> {
    bytes
        .iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// No two keys equal after case folding (Go upstreams match keys case-insensitively).
fn unique(keys: &[String]) -> bool {
    let mut sorted: Vec<String> = keys.iter().map(|k| fold_case(k).into_owned()).collect();
    sorted.sort();
    sorted.windows(2).all(|w| w[0] != w[1])
}
