//! JSON string escaping, done once when a directive enters the L1 cache so that no
//! request ever escapes it again.
//!
//! The output is the *inside* of a JSON string literal (no surrounding quotes), which
//! is what every splice needs: a new string value, or a prefix spliced into an
//! existing string right after its opening quote.

/// Escapes `s` as the body of a JSON string literal (RFC 8259 §7): `"` and `\`,
/// and every control character below U+0020. Everything else, non-ASCII included,
/// is kept as UTF-8, which is valid JSON.
pub fn escape_json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_escaped(&mut out, s);
    out
}

/// Appends the escaped form of `s` to `out`.
pub fn push_escaped(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let replacement: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every byte matched above is ASCII, so `i` is a char boundary.
        out.push_str(&s[start..i]);
        if replacement.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(replacement);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(s: &str) {
        let escaped = escape_json_str(s);
        let parsed: String = serde_json::from_str(&format!("\"{escaped}\"")).unwrap();
        assert_eq!(parsed, s);
    }

    #[test]
    fn escapes_what_json_requires() {
        assert_eq!(escape_json_str("plain"), "plain");
        assert_eq!(escape_json_str("a\"b\\c"), "a\\\"b\\\\c");
        assert_eq!(escape_json_str("l1\nl2\r\t"), "l1\\nl2\\r\\t");
        assert_eq!(
            escape_json_str("\u{0}\u{1f}\u{8}\u{c}"),
            "\\u0000\\u001f\\b\\f"
        );
        assert_eq!(escape_json_str("/ é 日本 🦀"), "/ é 日本 🦀");
    }

    #[test]
    fn round_trips_through_a_json_parser() {
        for s in [
            "",
            "x",
            "\"",
            "\\\\\"",
            "é\n\u{7f}\u{2028}",
            "Be terse.\n\n- never\t\"lie\"",
        ] {
            roundtrip(s);
        }
        let all: String = (0u32..0x800).filter_map(char::from_u32).collect();
        roundtrip(&all);
    }
}
