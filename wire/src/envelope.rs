//! The JSON error envelope of every error answer, from the filter's local replies,
//! its control endpoint and the companion's HTTP APIs alike (SPEC §6):
//! `{"error":{"type":"…","code":"…","message":"…"}}`.
//!
//! Built by hand because this crate has no dependencies. The message must never
//! carry directive text or secrets; callers pass fixed or sanitised text.

use std::fmt::Write as _;

/// The error body `{"error":{"type":…,"code":…,"message":…}}`, members in that
/// order, each value JSON-escaped.
pub fn error_envelope(kind: &str, code: &str, message: &str) -> String {
    let mut out = String::with_capacity(48 + kind.len() + code.len() + message.len());
    out.push_str("{\"error\":{\"type\":");
    push_json_string(&mut out, kind);
    out.push_str(",\"code\":");
    push_json_string(&mut out, code);
    out.push_str(",\"message\":");
    push_json_string(&mut out, message);
    out.push_str("}}");
    out
}

/// Appends `s` as a quoted JSON string: `"` and `\` escaped, control characters
/// below U+0020 as their short escape or `\u00XX`; everything else kept as UTF-8.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_has_type_code_message_in_order() {
        assert_eq!(
            error_envelope(
                "invalid_request_error",
                "invalid_agent_id",
                "header x must be a UUID"
            ),
            r#"{"error":{"type":"invalid_request_error","code":"invalid_agent_id","message":"header x must be a UUID"}}"#
        );
    }

    #[test]
    fn values_are_escaped() {
        assert_eq!(
            error_envelope("t", "c", "a \"q\" \\ b\n\u{1}\u{1f} é/"),
            r#"{"error":{"type":"t","code":"c","message":"a \"q\" \\ b\n\u0001\u001f é/"}}"#
        );
        assert_eq!(
            error_envelope("", "\u{8}\u{c}\r\t", ""),
            r#"{"error":{"type":"","code":"\b\f\r\t","message":""}}"#
        );
    }

    /// Every character below U+0800 survives a round trip through a strict
    /// reader of the escapes written above.
    #[test]
    fn escaping_round_trips() {
        let all: String = (0u32..0x800).filter_map(char::from_u32).collect();
        let mut out = String::new();
        push_json_string(&mut out, &all);
        assert_eq!(unescape(&out), all);
    }

    fn unescape(quoted: &str) -> String {
        let inner = &quoted[1..quoted.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            assert!(c >= ' ' && c != '"', "unescaped {c:?}");
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next().unwrap() {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let n = u32::from_str_radix(&hex, 16).unwrap();
                    out.push(char::from_u32(n).unwrap());
                }
                other => panic!("bad escape \\{other}"),
            }
        }
        out
    }
}
