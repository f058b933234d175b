//! Redis replies as Upstash's JSON answers: `{"result": X}` or `{"error": "…"}`.
//!
//! The mapping follows Upstash's REST documentation: nil → `null`, integer →
//! number, array → array (nested), strings → JSON strings. A bulk string that is
//! not valid UTF-8 has each invalid sequence replaced by U+FFFD, as Upstash
//! documents; a client that needs the exact bytes asks for
//! `Upstash-Encoding: base64`, under which every string is standard base64 with
//! padding *except the `OK` status* (Upstash: "all strings in the response will be
//! base64 encoded, except for the "OK" response"). Other statuses (`PONG`) are
//! encoded too: the docs say "all strings", and the official Python SDK
//! (upstash-redis 1.8.0, `http.decode`) keeps a literal `"OK"` and base64-decodes
//! every other string, so a plain `"PONG"` would break it.
//!
//! What it must never do: log or otherwise keep a value; it only reshapes.

use base64::Engine as _;
use redis::Value;
use serde_json::{Map, Number, Value as Json};

/// How strings are written in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8 text, invalid sequences replaced by U+FFFD.
    Text,
    /// Standard base64 with padding (`Upstash-Encoding: base64`), except `OK`.
    Base64,
}

impl Encoding {
    fn string(self, bytes: &[u8]) -> Json {
        match self {
            Encoding::Text => Json::String(String::from_utf8_lossy(bytes).into_owned()),
            Encoding::Base64 => {
                Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// One command's answer, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"result": …}`
    Result(Json),
    /// `{"error": "…"}`: Redis's error text (code, space, detail), as Upstash
    /// passes it on.
    Error(String),
}

impl Reply {
    /// The JSON object of this answer.
    pub fn to_json(&self) -> Json {
        let mut m = Map::with_capacity(1);
        match self {
            Reply::Result(v) => m.insert("result".into(), v.clone()),
            Reply::Error(e) => m.insert("error".into(), Json::String(e.clone())),
        };
        Json::Object(m)
    }

    /// The answer as bytes of JSON.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }
}

/// The text of a Redis error reply, as Redis sent it (`ERR wrong number …`);
/// `None` for any other value.
pub fn error_text(value: &Value) -> Option<String> {
    // (redis-rs does not export the error type itself, only its methods.)
    let Value::ServerError(e) = value else {
        return None;
    };
    Some(match e.details() {
        Some(d) => format!("{} {d}", e.code()),
        None => e.code().to_owned(),
    })
}

/// The answer to one Redis reply: an error reply becomes [`Reply::Error`],
/// anything else [`Reply::Result`].
pub fn reply(value: &Value, enc: Encoding) -> Reply {
    match error_text(value) {
        Some(e) => Reply::Error(e),
        None => Reply::Result(to_json(value, enc)),
    }
}

/// One Redis value as JSON. RESP2 (what the companion speaks unless the URL asks
/// for RESP3) yields only nil, integers, bulk and status strings, arrays and
/// errors; the RESP3 types are written as RESP2 would carry them (maps and sets as
/// flat arrays, doubles and big numbers as strings, booleans as 1/0), so an
/// Upstash client sees the shapes it knows. An error nested in an array (only a
/// script can return one) becomes its text.
pub fn to_json(value: &Value, enc: Encoding) -> Json {
    match value {
        Value::Nil => Json::Null,
        Value::Int(i) => Json::Number(Number::from(*i)),
        Value::BulkString(b) => enc.string(b),
        Value::Okay => Json::String("OK".into()),
        Value::SimpleString(s) => enc.string(s.as_bytes()),
        Value::Array(items) | Value::Set(items) => {
            Json::Array(items.iter().map(|v| to_json(v, enc)).collect())
        }
        Value::Map(pairs) => Json::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| [to_json(k, enc), to_json(v, enc)])
                .collect(),
        ),
        Value::Attribute { data, .. } => to_json(data, enc),
        Value::Double(d) => enc.string(d.to_string().as_bytes()),
        Value::Boolean(b) => Json::Number(Number::from(i64::from(*b))),
        Value::VerbatimString { text, .. } => enc.string(text.as_bytes()),
        Value::BigNumber(n) => enc.string(n.to_string().as_bytes()),
        Value::Push { data, .. } => Json::Array(data.iter().map(|v| to_json(v, enc)).collect()),
        Value::ServerError(_) => enc.string(error_text(value).unwrap_or_default().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value, enc: Encoding) -> String {
        String::from_utf8(reply(&v, enc).to_body()).unwrap()
    }

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn upstash_documented_shapes() {
        let t = Encoding::Text;
        assert_eq!(body(Value::Okay, t), r#"{"result":"OK"}"#);
        assert_eq!(body(bulk(b"bar"), t), r#"{"result":"bar"}"#);
        assert_eq!(body(Value::Nil, t), r#"{"result":null}"#);
        assert_eq!(body(Value::Int(137), t), r#"{"result":137}"#);
        assert_eq!(
            body(
                Value::Array(vec![bulk(b"value1"), Value::Nil, bulk(b"value2")]),
                t
            ),
            r#"{"result":["value1",null,"value2"]}"#
        );
        // Upstash-Encoding: base64 — GET foo → "YmFy", SET → "OK".
        let b = Encoding::Base64;
        assert_eq!(body(bulk(b"bar"), b), r#"{"result":"YmFy"}"#);
        assert_eq!(body(Value::Okay, b), r#"{"result":"OK"}"#);
    }

    #[test]
    fn base64_covers_every_string_but_ok() {
        let b = Encoding::Base64;
        assert_eq!(
            body(Value::SimpleString("PONG".into()), b),
            r#"{"result":"UE9ORw=="}"#
        );
        // A bulk "OK" (a value) is still encoded: only the status is spared.
        assert_eq!(body(bulk(b"OK"), b), r#"{"result":"T0s="}"#);
        assert_eq!(body(bulk(b"\0"), b), r#"{"result":"AA=="}"#);
        assert_eq!(body(bulk(b""), b), r#"{"result":""}"#);
        assert_eq!(
            body(
                Value::Array(vec![bulk(b"v"), Value::Int(9998), Value::Nil]),
                b
            ),
            r#"{"result":["dg==",9998,null]}"#
        );
        assert_eq!(
            body(
                Value::Array(vec![Value::Array(vec![bulk(b"ab")]), Value::Okay]),
                b
            ),
            r#"{"result":[["YWI="],"OK"]}"#
        );
    }

    #[test]
    fn text_is_utf8_with_replacement_for_invalid_bytes() {
        let t = Encoding::Text;
        assert_eq!(body(bulk(b"a\xffb"), t), "{\"result\":\"a\u{fffd}b\"}");
        assert_eq!(body(bulk(b"\0"), t), r#"{"result":"\u0000"}"#);
        assert_eq!(body(bulk(b"\r"), t), r#"{"result":"\r"}"#);
        assert_eq!(
            body(bulk("é😀\u{fffd}".as_bytes()), t),
            "{\"result\":\"é😀\u{fffd}\"}"
        );
        assert_eq!(
            body(Value::SimpleString("PONG".into()), t),
            r#"{"result":"PONG"}"#
        );
    }

    #[test]
    fn errors_carry_redis_text() {
        let e =
            redis::parse_redis_value(b"-ERR value is not an integer or out of range\r\n").unwrap();
        assert_eq!(
            body(e, Encoding::Base64),
            r#"{"error":"ERR value is not an integer or out of range"}"#
        );
        let e = redis::parse_redis_value(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        )
        .unwrap();
        assert_eq!(
            reply(&e, Encoding::Text),
            Reply::Error(
                "WRONGTYPE Operation against a key holding the wrong kind of value".into()
            )
        );
        assert_eq!(
            reply(
                &redis::parse_redis_value(b"-NOSCRIPT\r\n").unwrap(),
                Encoding::Text
            ),
            Reply::Error("NOSCRIPT".into())
        );
    }

    #[test]
    fn resp3_types_in_resp2_shapes() {
        let t = Encoding::Text;
        assert_eq!(
            to_json(&Value::Map(vec![(bulk(b"k"), Value::Int(1))]), t),
            serde_json::json!(["k", 1])
        );
        assert_eq!(to_json(&Value::Boolean(true), t), serde_json::json!(1));
        assert_eq!(to_json(&Value::Double(1.5), t), serde_json::json!("1.5"));
    }
}
