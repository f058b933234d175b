//! The one type that carries directive text through the companion.
//!
//! It exists so that content can never reach a log line by accident: it has no
//! `Display`, its `Debug` prints only the length (it is an
//! [`ibex_wire::Redacted`]), and the only way to read the text is the explicit
//! [`DirectiveText::expose`].

use std::sync::Arc;

use ibex_wire::Redacted;

/// Directive content (a system prompt). Cheap to clone; redacted in `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectiveText(Redacted<Arc<str>>);

impl DirectiveText {
    /// Wraps text read from Postgres or from an operator.
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        Self(Redacted::new(text.into()))
    }

    /// The raw text. Callers must send it only to Postgres or to an HTTP
    /// response body, never to a logger.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// Length in bytes; safe to log.
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }

    /// The text as one JSON string literal that is safe to print as a column
    /// on a terminal (`history --show-content`): `"`, `\\`, every control
    /// character (C0, DEL, C1: tabs, newlines, escape sequences) and every
    /// invisible character that can reorder or hide text (bidi controls,
    /// zero-width characters, line and paragraph separators, BOM, tags) are
    /// `\` escapes, so the literal is a single line without tabs that a
    /// terminal shows as it is, and any JSON reader (`jq -r`, `json.loads`)
    /// turns back into the exact text. Other characters, non-ASCII included,
    /// stay as they are so the text remains readable.
    ///
    /// For stdout only, on an operator's explicit request: never a logger.
    pub fn to_terminal_json(&self) -> String {
        use std::fmt::Write;
        let text = self.expose();
        let mut out = String::with_capacity(text.len() + 2);
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c.is_control() || is_invisible_format(c) => {
                    // JSON's \uXXXX is UTF-16: a character above the BMP (the
                    // tags) is its surrogate pair.
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        // Writing to a String cannot fail.
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
}

/// Characters a terminal renders as nothing, or that change how the text
/// around them is laid out: bidirectional controls (which can make a line read
/// differently from what it holds), zero-width characters, line and paragraph
/// separators, the BOM, interlinear annotations and tag characters.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

impl serde::Serialize for DirectiveText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_content() {
        let t = DirectiveText::new("top secret prompt");
        let dbg = format!("{t:?} {:?}", Some(t.clone()));
        assert!(!dbg.contains("secret"), "{dbg}");
        assert!(dbg.contains("17 bytes"));
    }

    #[test]
    fn terminal_json_is_one_safe_line_that_decodes_to_the_text() {
        let samples = [
            "",
            "plain",
            "tab\there\nnew line\r\n",
            "\"quoted\" \\ back\\slash",
            "esc \u{1b}[31mred\u{1b}[0m bell \u{7} del \u{7f} csi \u{9b}2J nul \u{0}",
            "bidi \u{202e}desrever\u{202c} \u{2066}iso\u{2069} lrm\u{200e}",
            "zero\u{200b}width\u{feff}bom \u{2028}ls\u{2029}ps shy\u{ad}",
            "tag \u{e0041}\u{e007f} crab \u{1f980} ünïcödé 中文 \u{8}\u{c}",
        ];
        for sample in samples {
            let line = DirectiveText::new(sample).to_terminal_json();
            assert!(
                line.chars()
                    .all(|c| !c.is_control() && !is_invisible_format(c)),
                "{line}"
            );
            let back: String = serde_json::from_str(&line).unwrap();
            assert_eq!(back, sample, "{line}");
        }
        assert_eq!(
            DirectiveText::new("a\tb \u{1b} \u{202e} é \u{e0041}").to_terminal_json(),
            r#""a\tb \u001b \u202e é \udb40\udc41""#
        );
    }

    #[test]
    fn serializes_as_plain_string() {
        let t = DirectiveText::new("a \"quoted\" line\n");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#""a \"quoted\" line\n""#
        );
    }
}
