//! Where a directive goes in each request format, and the splice that puts it there.
//!
//! The output is the input with bytes inserted, nothing else: the body is validated by
//! [`crate::json::scan`] and the insertion is built from pieces prepared earlier (the
//! chat message prefix at configuration time, the escaped directive at cache-fill
//! time). Key order, whitespace, number spelling and unknown fields all survive.
//!
//! | format | where the directive `D` goes |
//! |---|---|
//! | OpenAI chat completions | new first element of `messages`: `{"role":R,"content":D}` |
//! | OpenAI Responses | `instructions`: `D` when absent or null, else `D + "\n\n" + existing` |
//! | Anthropic messages | `system`: absent or null → `D`; string → `D + "\n\n" + s`; array → new first block `{"type":"text","text":D}` |
//!
//! A new top-level member is inserted first in the object, right after `{`.

use crate::json::{scan, BodyError, Member, TopLevel, ValueKind};

/// A request format the filter knows how to inject into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI chat completions: a new first element of `messages`.
    OpenAiChat,
    /// OpenAI Responses: `instructions`.
    OpenAiResponses,
    /// Anthropic messages: `system`.
    AnthropicMessages,
}

impl Format {
    /// Every format with its configuration name.
    pub const NAMES: &'static [(&'static str, Format)] = &[
        ("openai_chat", Format::OpenAiChat),
        ("openai_responses", Format::OpenAiResponses),
        ("anthropic_messages", Format::AnthropicMessages),
    ];
}

/// Separator between the directive and text the client already had there.
const JOIN: &str = "\\n\\n";

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
    let d = escaped.as_bytes();
    match format {
        Format::OpenAiChat => {
            let messages = top
                .target("messages")?
                .ok_or(BodyError::MissingMember("messages"))?;
            expect_kind(body, messages, "messages", &[ValueKind::Array], "an array")?;
            prepend_element(body, messages, &[message_prefix.as_bytes(), d, b"\"}"])
        }
        Format::OpenAiResponses => match top.target("instructions")? {
            None => Ok(add_member(body, &top, &[b"\"instructions\":\"", d, b"\""])),
            Some(m) => match m.value_kind(body) {
                ValueKind::Null => Ok(replace_value(body, m, &[b"\"", d, b"\""])),
                ValueKind::String => Ok(prefix_string(body, m, d)),
                _ => Err(BodyError::WrongType {
                    member: "instructions",
                    expected: "a string or null",
                }),
            },
        },
        Format::AnthropicMessages => match top.target("system")? {
            None => Ok(add_member(body, &top, &[b"\"system\":\"", d, b"\""])),
            Some(m) => match m.value_kind(body) {
                ValueKind::Null => Ok(replace_value(body, m, &[b"\"", d, b"\""])),
                ValueKind::String => Ok(prefix_string(body, m, d)),
                ValueKind::Array => {
                    prepend_element(body, m, &[b"{\"type\":\"text\",\"text\":\"", d, b"\"}"])
                }
                _ => Err(BodyError::WrongType {
                    member: "system",
                    expected: "a string, an array of content blocks, or null",
                }),
            },
        },
    }
}

fn expect_kind(
    body: &[u8],
    m: &Member<'_>,
    member: &'static str,
    kinds: &[ValueKind],
    expected: &'static str,
) -> Result<(), BodyError> {
    if kinds.contains(&m.value_kind(body)) {
        Ok(())
    } else {
        Err(BodyError::WrongType { member, expected })
    }
}

/// New first element of the array `m`, followed by a comma unless it was empty.
fn prepend_element(body: &[u8], m: &Member<'_>, element: &[&[u8]]) -> Result<Vec<u8>, BodyError> {
    let at = m.value_start + 1;
    let empty = body[at..m.value_end]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        == Some(&b']');
    let mut pieces: Vec<&[u8]> = element.to_vec();
    if !empty {
        pieces.push(b",");
    }
    Ok(insert(body, at, &pieces))
}

/// New first member of the top-level object.
fn add_member(body: &[u8], top: &TopLevel<'_>, member: &[&[u8]]) -> Vec<u8> {
    let mut pieces: Vec<&[u8]> = member.to_vec();
    if !top.members.is_empty() {
        pieces.push(b",");
    }
    insert(body, top.open + 1, &pieces)
}

/// `D\n\n` spliced right after the opening quote of the string `m`.
fn prefix_string(body: &[u8], m: &Member<'_>, d: &[u8]) -> Vec<u8> {
    insert(body, m.value_start + 1, &[d, JOIN.as_bytes()])
}

/// The value of `m` (a `null`) replaced by `pieces`.
fn replace_value(body: &[u8], m: &Member<'_>, pieces: &[&[u8]]) -> Vec<u8> {
    let extra: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    out.extend_from_slice(&body[..m.value_start]);
    for p in pieces {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&body[m.value_end..]);
    out
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
            Format::OpenAiChat,
            body.as_bytes(),
            PREFIX,
            &escape_json_str(directive),
        )
        .map(|v| String::from_utf8(v).unwrap())
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
            Format::OpenAiChat,
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

    fn splice_str(format: Format, body: &str, directive: &str) -> Result<String, BodyError> {
        splice(format, body.as_bytes(), PREFIX, &escape_json_str(directive))
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn the_target_member_in_another_case_is_refused() {
        for (format, body) in [
            (Format::OpenAiChat, r#"{"Messages":[]}"#),
            (Format::OpenAiResponses, r#"{"INSTRUCTIONS":"x"}"#),
            (Format::AnthropicMessages, r#"{"System":"x","messages":[]}"#),
        ] {
            assert!(
                matches!(
                    splice_str(format, body, "D"),
                    Err(BodyError::CaseVariant(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn responses_instructions_are_set_or_prefixed() {
        let r = |b: &str| splice_str(Format::OpenAiResponses, b, "D \"q\"");
        assert_eq!(
            r(r#"{"model":"m","input":"hi"}"#).unwrap(),
            r#"{"instructions":"D \"q\"","model":"m","input":"hi"}"#
        );
        assert_eq!(r(r#"{}"#).unwrap(), r#"{"instructions":"D \"q\""}"#);
        assert_eq!(
            r(r#"{ "instructions" : null }"#).unwrap(),
            r#"{ "instructions" : "D \"q\"" }"#
        );
        assert_eq!(
            r(r#"{"instructions":"Be kind."}"#).unwrap(),
            r#"{"instructions":"D \"q\"\n\nBe kind."}"#
        );
        assert_eq!(
            r(r#"{"instructions":""}"#).unwrap(),
            r#"{"instructions":"D \"q\"\n\n"}"#
        );
        assert!(matches!(
            r(r#"{"instructions":["x"]}"#),
            Err(BodyError::WrongType {
                member: "instructions",
                ..
            })
        ));
        assert!(matches!(
            r(r#"{"instructions":"a","instructions":"b"}"#),
            Err(BodyError::DuplicateKey(_))
        ));
        let v: Value = serde_json::from_str(&r(r#"{"instructions":"Be kind."}"#).unwrap()).unwrap();
        assert_eq!(v["instructions"], "D \"q\"\n\nBe kind.");
    }

    #[test]
    fn anthropic_system_in_every_shape() {
        let a = |b: &str| splice_str(Format::AnthropicMessages, b, "D");
        assert_eq!(
            a(r#"{"model":"c","messages":[]}"#).unwrap(),
            r#"{"system":"D","model":"c","messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":null,"messages":[]}"#).unwrap(),
            r#"{"system":"D","messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":"Be kind.","messages":[]}"#).unwrap(),
            r#"{"system":"D\n\nBe kind.","messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":[],"messages":[]}"#).unwrap(),
            r#"{"system":[{"type":"text","text":"D"}],"messages":[]}"#
        );
        let blocks = r#"{"system":[ {"type":"text","text":"S","cache_control":{"type":"ephemeral"}} ],"messages":[]}"#;
        assert_eq!(
            a(blocks).unwrap(),
            r#"{"system":[{"type":"text","text":"D"}, {"type":"text","text":"S","cache_control":{"type":"ephemeral"}} ],"messages":[]}"#
        );
        assert!(matches!(
            a(r#"{"system":{"type":"text"}}"#),
            Err(BodyError::WrongType {
                member: "system",
                ..
            })
        ));
        assert!(matches!(
            a(r#"{"system":1}"#),
            Err(BodyError::WrongType { .. })
        ));
        assert!(matches!(
            a(r#"{"system":"a","\u0073ystem":"b"}"#),
            Err(BodyError::DuplicateKey(_))
        ));
    }

    mod properties {
        //! Generated bodies against a reference insertion done with serde_json.
        use super::*;
        use proptest::prelude::*;

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                (-1e9f64..1e9).prop_map(|f| json!(f)),
                ".*".prop_map(Value::String),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// The member the directive goes into, in every shape a client may send.
        fn target(format: Format) -> BoxedStrategy<Option<Value>> {
            let blocks = prop::collection::vec(
                ".*".prop_map(
                    |t| json!({"type":"text","text":t,"cache_control":{"type":"ephemeral"}}),
                ),
                0..3,
            )
            .prop_map(Value::Array);
            match format {
                Format::OpenAiChat => prop::collection::vec(
                    (".*", ".*").prop_map(|(r, c)| json!({"role": r, "content": c})),
                    0..4,
                )
                .prop_map(|v| Some(Value::Array(v)))
                .boxed(),
                Format::OpenAiResponses => prop_oneof![
                    Just(None),
                    Just(Some(Value::Null)),
                    ".*".prop_map(|s| Some(Value::String(s))),
                ]
                .boxed(),
                Format::AnthropicMessages => prop_oneof![
                    Just(None),
                    Just(Some(Value::Null)),
                    ".*".prop_map(|s| Some(Value::String(s))),
                    blocks.prop_map(Some),
                ]
                .boxed(),
            }
        }

        fn member_name(format: Format) -> &'static str {
            match format {
                Format::OpenAiChat => "messages",
                Format::OpenAiResponses => "instructions",
                Format::AnthropicMessages => "system",
            }
        }

        fn reference(format: Format, mut body: Value, d: &str) -> Value {
            let obj = body.as_object_mut().unwrap();
            let key = member_name(format);
            match (format, obj.get_mut(key)) {
                (Format::OpenAiChat, Some(Value::Array(a))) => {
                    a.insert(0, json!({"role":"system","content":d}))
                }
                (_, Some(Value::String(s))) => *s = format!("{d}\n\n{s}"),
                (_, Some(Value::Array(a))) => a.insert(0, json!({"type":"text","text":d})),
                _ => {
                    obj.insert(key.to_string(), Value::String(d.to_string()));
                }
            }
            body
        }

        fn case() -> impl Strategy<Value = (Format, Value, bool, String)> {
            prop_oneof![
                Just(Format::OpenAiChat),
                Just(Format::OpenAiResponses),
                Just(Format::AnthropicMessages)
            ]
            .prop_flat_map(|format| {
                (
                    Just(format),
                    prop::collection::btree_map("[a-z_]{1,8}", value(), 0..5),
                    target(format),
                    any::<bool>(),
                    ".*",
                )
                    .prop_map(|(format, others, target, pretty, d)| {
                        let mut obj: serde_json::Map<String, Value> = others.into_iter().collect();
                        let key = member_name(format);
                        obj.remove(key);
                        if let Some(t) = target {
                            obj.insert(key.to_string(), t);
                        }
                        (format, Value::Object(obj), pretty, d)
                    })
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn splice_matches_the_reference_and_changes_nothing_else((format, body, pretty, d) in case()) {
                let text = if pretty { serde_json::to_string_pretty(&body) } else { serde_json::to_string(&body) }.unwrap();
                let out = splice(format, text.as_bytes(), PREFIX, &escape_json_str(&d)).unwrap();
                let parsed: Value = serde_json::from_slice(&out).unwrap();
                // The reference starts from the text as parsed, so both sides read
                // numbers the same way.
                let base: Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(parsed, reference(format, base, &d));
                // Outside the insertion, byte for byte: a common prefix and suffix
                // cover the whole input (a null replaced by a string counts as 4 bytes).
                let input = text.as_bytes();
                let prefix = input.iter().zip(&out).take_while(|(a, b)| a == b).count();
                let suffix = input.iter().rev().zip(out.iter().rev()).take_while(|(a, b)| a == b).count();
                let replaced = input.len().saturating_sub(prefix + suffix.min(input.len() - prefix));
                prop_assert!(replaced == 0 || (replaced <= 4 && input[prefix..prefix + replaced] == b"null"[..replaced]),
                    "changed {} input bytes", replaced);
            }

            #[test]
            fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), d in ".*") {
                for format in [Format::OpenAiChat, Format::OpenAiResponses, Format::AnthropicMessages] {
                    if let Ok(out) = splice(format, &bytes, PREFIX, &escape_json_str(&d)) {
                        prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
                    }
                }
            }
        }
    }
}
