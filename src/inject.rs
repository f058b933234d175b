//! Where a directive goes in each request format, and the splice that puts it there.
//!
//! The output is the input with bytes inserted, nothing else: the body is validated by
//! [`crate::json::scan`] and the insertion is built from pieces prepared earlier (the
//! chat message prefix at configuration time, the escaped directive at cache-fill
//! time).

use crate::json::{scan, BodyError, ValueKind};

/// A request format the filter knows how to inject into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI chat completions: a new first element of `messages`.
    ChatCompletions,
}

impl Format {
    /// The format served at `path` (query string ignored), if any.
    pub fn for_path(path: &str) -> Option<Format> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        if path.ends_with("/chat/completions") {
            Some(Format::ChatCompletions)
        } else {
            None
        }
    }
}

/// Returns `body` with the directive inserted where `format` reads it.
///
/// `message_prefix` is [`crate::config::Config::chat_message_prefix`]; `escaped` is
/// the directive as stored in L1 (inside of a JSON string literal).
pub fn splice(
    format: Format,
    body: &[u8],
    message_prefix: &str,
    escaped: &str,
) -> Result<Vec<u8>, BodyError> {
    let top = scan(body)?;
    match format {
        Format::ChatCompletions => {
            let messages = top
                .get("messages")
                .ok_or(BodyError::MissingMember("messages"))?;
            if messages.value_kind(body) != ValueKind::Array {
                return Err(BodyError::WrongType {
                    member: "messages",
                    expected: "an array",
                });
            }
            let at = messages.value_start + 1;
            let empty = body[at..messages.value_end]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                == Some(&b']');
            let pieces: [&[u8]; 3] = [
                message_prefix.as_bytes(),
                escaped.as_bytes(),
                if empty { b"\"}" } else { b"\"}," },
            ];
            Ok(insert(body, at, &pieces))
        }
    }
}

/// `body` with `pieces` inserted at byte `at`, in one allocation.
fn insert(body: &[u8], at: usize, pieces: &[&[u8]]) -> Vec<u8> {
    let extra: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    out.extend_from_slice(&body[..at]);
    for p in pieces {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escape::escape_json_str;
    use serde_json::{json, Value};

    const PREFIX: &str = r#"{"role":"system","content":""#;

    fn chat(body: &str, directive: &str) -> Result<String, BodyError> {
        splice(
            Format::ChatCompletions,
            body.as_bytes(),
            PREFIX,
            &escape_json_str(directive),
        )
        .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn paths_map_to_formats_ignoring_the_query() {
        assert_eq!(
            Format::for_path("/v1/chat/completions"),
            Some(Format::ChatCompletions)
        );
        assert_eq!(
            Format::for_path("/openai/deployments/x/chat/completions?api-version=1"),
            Some(Format::ChatCompletions)
        );
        assert_eq!(Format::for_path("/v1/chat/completions/"), None);
        assert_eq!(Format::for_path("/v1/models"), None);
        assert_eq!(Format::for_path("/v1/x?p=/chat/completions"), None);
    }

    #[test]
    fn chat_directive_becomes_the_first_message_and_nothing_else_changes() {
        let body =
            r#"{"model":"m",  "messages": [ {"role":"user","content":"hi"} ], "temperature":1.50}"#;
        let out = chat(body, "Be terse.").unwrap();
        assert_eq!(
            out,
            r#"{"model":"m",  "messages": [{"role":"system","content":"Be terse."}, {"role":"user","content":"hi"} ], "temperature":1.50}"#
        );
    }

    #[test]
    fn chat_with_empty_messages_gets_no_trailing_comma() {
        assert_eq!(
            chat(r#"{"messages":[ ]}"#, "D").unwrap(),
            r#"{"messages":[{"role":"system","content":"D"} ]}"#
        );
    }

    #[test]
    fn escaped_and_non_ascii_directives_arrive_intact() {
        let directive = "Line 1\n\"quoted\" \\ tab\t é 日本 🦀 \u{1}";
        let out = chat(r#"{"messages":[{"role":"user","content":"x"}]}"#, directive).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["messages"][0],
            json!({"role":"system","content":directive})
        );
        assert_eq!(v["messages"][1]["content"], "x");
    }

    #[test]
    fn numbers_keep_their_spelling() {
        let body = r#"{"messages":[],"a":1e400,"b":-0.0,"c":1.0000000000000000001,"d":12345678901234567890123}"#;
        let out = chat(body, "D").unwrap();
        assert!(out.ends_with(
            r#","a":1e400,"b":-0.0,"c":1.0000000000000000001,"d":12345678901234567890123}"#
        ));
    }

    #[test]
    fn developer_role_comes_from_the_prefix() {
        let out = splice(
            Format::ChatCompletions,
            br#"{"messages":[]}"#,
            r#"{"role":"developer","content":""#,
            "D",
        )
        .unwrap();
        assert_eq!(out, br#"{"messages":[{"role":"developer","content":"D"}]}"#);
    }

    #[test]
    fn refuses_what_it_cannot_inject_with_certainty() {
        assert_eq!(
            chat(r#"{"model":"m"}"#, "D"),
            Err(BodyError::MissingMember("messages"))
        );
        assert!(matches!(
            chat(r#"{"messages":{}}"#, "D"),
            Err(BodyError::WrongType { .. })
        ));
        assert!(matches!(
            chat(r#"{"messages":null}"#, "D"),
            Err(BodyError::WrongType { .. })
        ));
        assert!(matches!(
            chat(r#"{"messages":[],"messages":[]}"#, "D"),
            Err(BodyError::DuplicateKey(_))
        ));
        assert!(matches!(
            chat(r#"{"messages":[}"#, "D"),
            Err(BodyError::Malformed(_))
        ));
        assert_eq!(chat("[]", "D"), Err(BodyError::NotAnObject));
    }

    #[test]
    fn output_equals_a_reference_insertion() {
        let body = r#"{"model":"gpt","messages":[{"role":"user","content":[{"type":"text","text":"hé"}]},{"role":"assistant","content":null}],"stream":true,"x":{"y":[1,2]}}"#;
        let directive = "Always cite \"sources\".";
        let out = chat(body, directive).unwrap();
        let mut expected: Value = serde_json::from_str(body).unwrap();
        expected["messages"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"role":"system","content":directive}));
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), expected);
    }
}
