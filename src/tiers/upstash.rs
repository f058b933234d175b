//! The `upstash` dialect of L2: the Upstash REST API, spoken by managed Upstash and
//! by `ibex-companion rest`. Requests and answer readers only; [`super`] chooses
//! between this and Webdis and gives the values their meaning.
//!
//! Every command is one `POST /` whose body is the command as a JSON array of
//! strings (`["EVAL","<script>","1","directive:…"]`: only `EVAL` of the filter's three
//! scripts in `ibex-wire`, so reads run where writes do), with `Authorization: Bearer <redis.token>`
//! and `Upstash-Encoding: base64`, so every string the front returns is base64 and
//! a directive comes back byte for byte whatever it contains. The answer is
//! `{"result":…}` with status 200; an `{"error":…}` (status 400 from Upstash, 4xx
//! or 5xx from the front) is that tier failing.
//!
//! The readers are as strict as Webdis's: one JSON object whose only member is
//! `result`, named once; strings in canonical base64 (standard alphabet, padded,
//! unused bits zero); the types each command can return and nothing else. They must
//! never panic or index out of bounds (the module denies both lints, like its
//! parent), and never accept a second spelling of an answer.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use serde::Deserialize;

use super::TierError;

/// Headers of every command besides `Authorization` (which comes from the
/// configuration): the body is JSON, and strings come back in base64.
pub(super) const HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("upstash-encoding", "base64"),
];

/// `["EVAL",GET_SCRIPT,"1","<key>"]`: a directive is read through a script, not a
/// plain `GET`, because managed Upstash may answer a `GET` from a replica that has not
/// yet seen the subscriber's tombstone, and the fill would then cache the old text for
/// a whole TTL; a script may write, so Upstash runs it on the key's leader, where the
/// tombstone was written. Keys are made of characters JSON needs no escape for (the
/// configuration allows letters, digits and `:_-.{}` in the prefix; the rest is an
/// agent id or a hex hash).
pub(super) fn get_body(key: &str) -> Vec<u8> {
    format!(r#"["EVAL",{},"1","{key}"]"#, json(ibex_wire::GET_SCRIPT)).into_bytes()
}

/// `["EVAL",GET_WITH_PTTL_SCRIPT,"1","<key>"]`.
pub(super) fn get_with_pttl_body(key: &str) -> Vec<u8> {
    format!(
        r#"["EVAL",{},"1","{key}"]"#,
        json(ibex_wire::GET_WITH_PTTL_SCRIPT)
    )
    .into_bytes()
}

/// `["EVAL",SET_IF_ABSENT_SCRIPT,"2","<key>","<marker>","<ttl>","<value>"]`, the
/// value escaped as a JSON string (UTF-8: a directive, its versioned form with its
/// leading NUL, or an agent id; JSON spells the NUL `\u0000`).
pub(super) fn set_if_absent_body(
    key: &str,
    marker: &str,
    value: &str,
    ttl_seconds: u64,
) -> Vec<u8> {
    format!(
        r#"["EVAL",{},"2","{key}","{marker}","{ttl_seconds}",{}]"#,
        json(ibex_wire::SET_IF_ABSENT_SCRIPT),
        json(value)
    )
    .into_bytes()
}

fn json(text: &str) -> String {
    let mut out = String::with_capacity(text.len().saturating_add(2));
    out.push('"');
    crate::escape::push_escaped(&mut out, text);
    out.push('"');
    out
}

/// `{"result":…}`: exactly that member, exactly once (serde's derive refuses a
/// duplicate, `deny_unknown_fields` anything else, `error` included).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "T: Deserialize<'de>"))]
struct Reply<T> {
    /// Required even when `T` is an `Option` (serde reads a missing `Option` member
    /// as `None` unless it is deserialized by a function).
    #[serde(deserialize_with = "present")]
    result: T,
}

fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    T::deserialize(d)
}

fn reply<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, TierError> {
    // The whole answer must be UTF-8 (serde_json reads bytes without checking
    // strings it skips; here nothing is skipped, but the rule is the store's too).
    let text = std::str::from_utf8(body).map_err(|_| TierError("not UTF-8"))?;
    super::json_object::<Reply<T>>(text).map(|r| r.result)
}

/// A `GET`: `None` for `{"result":null}` (no such key), else the value's bytes.
pub(super) fn read_get(body: &[u8]) -> Result<Option<Vec<u8>>, TierError> {
    reply::<Option<String>>(body)?
        .map(|b64| decode(b64.as_bytes()))
        .transpose()
}

/// A value and its remaining TTL in ms (`None`: no expiry).
pub(super) type ValueWithTtl = (Vec<u8>, Option<u64>);

/// The key read: `{"result":null}` (no such key), or `{"result":["<b64>",<ms>]}`
/// with the `PTTL` a non-negative integer or `-1` (no expiry).
pub(super) fn read_get_with_pttl(body: &[u8]) -> Result<Option<ValueWithTtl>, TierError> {
    let Some((b64, pttl)) = reply::<Option<(String, i64)>>(body)? else {
        return Ok(None);
    };
    let ttl = match pttl {
        -1 => None,
        ms => Some(u64::try_from(ms).map_err(|_| TierError("bad TTL reply"))?),
    };
    Ok(Some((decode(b64.as_bytes())?, ttl)))
}

/// The conditional write's answer: `Some(true)` for `{"result":1}`, `Some(false)`
/// for `{"result":0}`, `None` for anything else.
pub(super) fn read_written(body: &[u8]) -> Option<bool> {
    match reply::<u8>(body) {
        Ok(1) => Some(true),
        Ok(0) => Some(false),
        _ => None,
    }
}

/// The value of one base64 character of the standard alphabet.
fn sextet(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c.wrapping_sub(b'A'),
        b'a'..=b'z' => c.wrapping_sub(b'a').wrapping_add(26),
        b'0'..=b'9' => c.wrapping_sub(b'0').wrapping_add(52),
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Canonical base64 (RFC 4648 §4, padded): length a multiple of four, padding only
/// at the end, the bits padding leaves unused zero. Anything else is an error, so
/// one value has one spelling.
pub(super) fn decode(text: &[u8]) -> Result<Vec<u8>, TierError> {
    const BAD: TierError = TierError("bad base64");
    if text.len() % 4 != 0 {
        return Err(BAD);
    }
    let mut out = Vec::with_capacity((text.len() / 4).saturating_mul(3));
    let mut quads = text.chunks_exact(4).peekable();
    while let Some(quad) = quads.next() {
        let last = quads.peek().is_none();
        let [a, b, c, d] = <[u8; 4]>::try_from(quad).map_err(|_| BAD)?;
        let (a, b) = (sextet(a).ok_or(BAD)?, sextet(b).ok_or(BAD)?);
        match (c, d) {
            (b'=', b'=') if last => {
                if b & 0x0f != 0 {
                    return Err(BAD);
                }
                out.push(((a << 2) | (b >> 4)) as u8);
            }
            (c, b'=') if last => {
                let c = sextet(c).ok_or(BAD)?;
                if c & 0x03 != 0 {
                    return Err(BAD);
                }
                let n = (a << 18) | (b << 12) | (c << 6);
                out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8]);
            }
            (c, d) => {
                let n =
                    (a << 18) | (b << 12) | (sextet(c).ok_or(BAD)? << 6) | sextet(d).ok_or(BAD)?;
                out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 4648 §4 encoding, written here independently of the decoder.
    fn encode(bytes: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn decodes_the_rfc_4648_test_vectors() {
        for (plain, b64) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(decode(b64.as_bytes()).unwrap(), plain.as_bytes(), "{b64}");
            assert_eq!(encode(plain.as_bytes()), b64);
        }
    }

    #[test]
    fn refuses_every_other_spelling() {
        for bad in [
            "Zg",
            "Zg=",
            "Zg===",
            "Zh==",
            "Zm9=",
            "Zm9v=",
            "=Zm9",
            "Zm=v",
            "Zg==Zg==",
            "Zm9v\n",
            "Zm9-",
            "Zm9_",
            " Zm9",
            "Zm 9v",
            "Zm9v Zg==",
        ] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trips_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(decode(encode(&bytes).as_bytes()).unwrap(), bytes);
        }

        #[test]
        fn arbitrary_text_never_panics(text in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(bytes) = decode(&text) {
                // Whatever is accepted is the one canonical spelling of its bytes.
                let canonical = encode(&bytes);
                prop_assert_eq!(canonical.as_bytes(), &text[..]);
            }
        }
    }

    #[test]
    fn reads_get_answers() {
        assert_eq!(read_get(br#"{"result":null}"#), Ok(None));
        assert_eq!(read_get(br#"{"result":"YmFy"}"#), Ok(Some(b"bar".to_vec())));
        assert_eq!(read_get(br#"{"result":""}"#), Ok(Some(vec![])));
        assert_eq!(
            read_get(br#"{"result":"AA=="}"#),
            Ok(Some(vec![0])),
            "tombstone"
        );
        for bad in [
            &br#"{"error":"ERR wrong number of arguments"}"#[..],
            br#"{"result":"YmFy","result":"YmF6"}"#,
            br#"{"result":"YmFy","error":"x"}"#,
            br#"{"result":"bar"}"#,
            br#"{"result":1}"#,
            br#"{"result":["YmFy"]}"#,
            br#"{}"#,
            br#"[{"result":"YmFy"}]"#,
            br#"["YmFy"]"#,
            br#" [null]"#,
            b"{\"result\":\"YmFy\"}\xff",
            b"",
        ] {
            assert!(read_get(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn reads_key_answers_with_their_ttl() {
        assert_eq!(read_get_with_pttl(br#"{"result":null}"#), Ok(None));
        assert_eq!(
            read_get_with_pttl(br#"{"result":["YWJj",59000]}"#),
            Ok(Some((b"abc".to_vec(), Some(59000))))
        );
        assert_eq!(
            read_get_with_pttl(br#"{"result":["",-1]}"#),
            Ok(Some((vec![], None)))
        );
        for bad in [
            &br#"{"result":["YWJj",-2]}"#[..],
            br#"{"result":["YWJj",1.5]}"#,
            br#"{"result":["YWJj","59000"]}"#,
            br#"{"result":["YWJj"]}"#,
            br#"{"result":["YWJj",1,2]}"#,
            br#"{"result":"YWJj"}"#,
            br#"{"result":[null,1]}"#,
            br#"{"result":["YWJ",1]}"#,
            br#"{"result":["YWJj",18446744073709551616]}"#,
        ] {
            assert!(
                read_get_with_pttl(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn reads_write_outcomes_exactly() {
        assert_eq!(read_written(br#"{"result":1}"#), Some(true));
        assert_eq!(read_written(br#"{"result":0}"#), Some(false));
        for bad in [
            &br#"{"result":2}"#[..],
            br#"{"result":"1"}"#,
            br#"{"result":null}"#,
            br#"{"error":"ERR"}"#,
            br#"{"result":1,"result":1}"#,
            br#"[1]"#,
            b"",
        ] {
            assert_eq!(
                read_written(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn builds_command_bodies_as_json_arrays() {
        let g: Vec<String> = serde_json::from_slice(&get_body("directive:x")).unwrap();
        assert_eq!(g, ["EVAL", ibex_wire::GET_SCRIPT, "1", "directive:x"]);
        let w = String::from_utf8(set_if_absent_body("k", "m", "a\"b\\c\r\u{1F600}", 60)).unwrap();
        let parsed: Vec<String> = serde_json::from_str(&w).unwrap();
        assert_eq!(
            parsed,
            [
                "EVAL",
                ibex_wire::SET_IF_ABSENT_SCRIPT,
                "2",
                "k",
                "m",
                "60",
                "a\"b\\c\r\u{1F600}"
            ]
        );
        let r: Vec<String> = serde_json::from_slice(&get_with_pttl_body("agent_key:ab")).unwrap();
        assert_eq!(
            r,
            ["EVAL", ibex_wire::GET_WITH_PTTL_SCRIPT, "1", "agent_key:ab"]
        );
    }
}
