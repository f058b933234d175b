//! A strict, single-pass JSON scanner that reports where the top-level members of a
//! request body are, without building a document.
//!
//! It is what lets the filter *splice* instead of re-serialising: the body is
//! validated in one pass (RFC 8259 grammar, valid UTF-8, exactly one top-level
//! object) and the byte spans of its members are returned, so an insertion touches
//! nothing else — key order, whitespace and number spelling all survive.
//!
//! A top-level key that appears twice is an error, also when the two spellings differ
//! only by escapes (`"messages"` and `"messag\u0065s"`) or by case (`"Messages"`, or
//! `"meſſages"` with U+017F): upstream parsers disagree on which duplicate wins, and
//! Go's `encoding/json` matches keys case-insensitively, so either would be a way
//! around the directive.
//!
//! Never panics on any input, and uses no recursion (nesting depth is bounded only by
//! the body size limit).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// Why a body is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The body is not valid UTF-8.
    InvalidUtf8,
    /// The body is not valid JSON; the offset of the first offending byte.
    Malformed(usize),
    /// The body is JSON but its top level is not an object.
    NotAnObject,
    /// A top-level key appears more than once (compared after decoding escapes and
    /// folding case).
    DuplicateKey(String),
    /// The member the directive goes into is spelled in another case
    /// (`"Messages"`): case-sensitive and case-insensitive upstreams would read the
    /// body differently.
    CaseVariant(&'static str),
    /// The member the directive goes into is missing.
    MissingMember(&'static str),
    /// The member the directive goes into has the wrong JSON type.
    WrongType {
        /// Member name.
        member: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::InvalidUtf8 => f.write_str("request body is not valid UTF-8"),
            BodyError::Malformed(at) => write!(f, "request body is not valid JSON (at byte {at})"),
            BodyError::NotAnObject => f.write_str("request body must be a JSON object"),
            BodyError::DuplicateKey(k) => {
                // The key is the client's own input; bound it so the reply stays small.
                let shown: String = k.chars().take(64).collect();
                write!(
                    f,
                    "request body has the top-level key {shown:?} more than once"
                )
            }
            BodyError::MissingMember(m) => write!(f, "request body has no \"{m}\""),
            BodyError::CaseVariant(m) => {
                write!(f, "request body spells \"{m}\" in another case")
            }
            BodyError::WrongType { member, expected } => {
                write!(f, "\"{member}\" must be {expected}")
            }
        }
    }
}

/// One top-level member of the body object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    /// The key, with escapes decoded.
    pub key: Cow<'a, str>,
    /// Byte offset of the first byte of the value.
    pub value_start: usize,
    /// Byte offset just past the value.
    pub value_end: usize,
}

impl Member<'_> {
    /// The first byte of the value, which tells its JSON type.
    pub fn value_kind(&self, body: &[u8]) -> ValueKind {
        match body.get(self.value_start) {
            Some(b'{') => ValueKind::Object,
            Some(b'[') => ValueKind::Array,
            Some(b'"') => ValueKind::String,
            Some(b't') | Some(b'f') => ValueKind::Bool,
            Some(b'n') => ValueKind::Null,
            _ => ValueKind::Number,
        }
    }
}

/// JSON type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// `{…}`
    Object,
    /// `[…]`
    Array,
    /// `"…"`
    String,
    /// a number
    Number,
    /// `true` / `false`
    Bool,
    /// `null`
    Null,
}

/// The validated top-level object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopLevel<'a> {
    /// Offset of the opening `{`.
    pub open: usize,
    /// Members in body order.
    pub members: Vec<Member<'a>>,
}

impl<'a> TopLevel<'a> {
    /// The member named `key`, if present (keys are unique once scanned).
    pub fn get(&self, key: &str) -> Option<&Member<'a>> {
        self.members.iter().find(|m| m.key == key)
    }

    /// The member the directive goes into: exactly `name`, or none; a member that
    /// equals `name` only after case folding is an error.
    pub fn target(&self, name: &'static str) -> Result<Option<&Member<'a>>, BodyError> {
        let folded = fold_case(name);
        match self.members.iter().find(|m| fold_case(&m.key) == folded) {
            None => Ok(None),
            Some(m) if m.key == name => Ok(Some(m)),
            Some(_) => Err(BodyError::CaseVariant(name)),
        }
    }
}

/// Case folding for key comparison: upper- then lower-casing maps the letters Go
/// folds together (`K`/`k`/U+212A KELVIN SIGN, `s`/`S`/U+017F LONG S) to one form.
pub fn fold_case(key: &str) -> Cow<'_, str> {
    if key.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        return Cow::Borrowed(key);
    }
    Cow::Owned(
        key.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

/// Validates `body` and returns its top-level members.
pub fn scan(body: &[u8]) -> Result<TopLevel<'_>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::InvalidUtf8)?;
    let mut s = Scanner {
        b: text.as_bytes(),
        text,
        p: 0,
    };
    s.ws();
    if s.peek() != Some(b'{') {
        // Tell "valid JSON, wrong shape" apart from "not JSON".
        let start = s.p;
        return match s.value() {
            Ok(()) => {
                s.ws();
                if s.p == s.b.len() && start < s.b.len() {
                    Err(BodyError::NotAnObject)
                } else {
                    Err(BodyError::Malformed(s.p))
                }
            }
            Err(at) => Err(BodyError::Malformed(at)),
        };
    }
    let open = s.p;
    s.p += 1;
    let mut members: Vec<Member<'_>> = Vec::new();
    let mut seen: HashSet<Cow<'_, str>> = HashSet::new();
    s.ws();
    if s.peek() == Some(b'}') {
        s.p += 1;
    } else {
        loop {
            s.ws();
            let key = s.string_key().map_err(BodyError::Malformed)?;
            s.ws();
            s.expect(b':').map_err(BodyError::Malformed)?;
            s.ws();
            let value_start = s.p;
            s.value().map_err(BodyError::Malformed)?;
            let value_end = s.p;
            // Borrow from the body when the key needs no decoding and no folding.
            let folded = match &key {
                Cow::Borrowed(k) => fold_case(k),
                Cow::Owned(k) => Cow::Owned(fold_case(k).into_owned()),
            };
            if !seen.insert(folded) {
                return Err(BodyError::DuplicateKey(key.into_owned()));
            }
            members.push(Member {
                key,
                value_start,
                value_end,
            });
            s.ws();
            match s.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(BodyError::Malformed(s.p.saturating_sub(1))),
            }
        }
    }
    s.ws();
    if s.p != s.b.len() {
        return Err(BodyError::Malformed(s.p));
    }
    Ok(TopLevel { open, members })
}

struct Scanner<'a> {
    b: &'a [u8],
    text: &'a str,
    p: usize,
}

/// Errors inside the scanner are the offset of the offending byte.
type At = usize;

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.p).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        if c.is_some() {
            self.p += 1;
        }
        c
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.p += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), At> {
        if self.peek() == Some(c) {
            self.p += 1;
            Ok(())
        } else {
            Err(self.p)
        }
    }

    /// Any JSON value, iteratively: `stack` holds the open containers.
    fn value(&mut self) -> Result<(), At> {
        // true = inside an object (expecting keys), false = inside an array.
        let mut stack: Vec<bool> = Vec::new();
        loop {
            // Parse one value start.
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    self.p += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.p += 1;
                    } else {
                        stack.push(true);
                        self.member_key()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.p += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.p += 1;
                    } else {
                        stack.push(false);
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return Err(self.p),
            }
            // A value is complete: close containers as far as the input says.
            loop {
                let Some(&in_object) = stack.last() else {
                    return Ok(());
                };
                self.ws();
                match (self.next(), in_object) {
                    (Some(b','), true) => {
                        self.ws();
                        self.member_key()?;
                        break;
                    }
                    (Some(b','), false) => break,
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        stack.pop();
                    }
                    _ => return Err(self.p.saturating_sub(1)),
                }
            }
        }
    }

    /// `"key"` `:` inside a nested object (the key itself is not needed).
    fn member_key(&mut self) -> Result<(), At> {
        if self.peek() != Some(b'"') {
            return Err(self.p);
        }
        self.string()?;
        self.ws();
        self.expect(b':')
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), At> {
        if self.b[self.p..].starts_with(word) {
            self.p += word.len();
            Ok(())
        } else {
            Err(self.p)
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.p;
        while let Some(b'0'..=b'9') = self.peek() {
            self.p += 1;
        }
        self.p - start
    }

    fn number(&mut self) -> Result<(), At> {
        if self.peek() == Some(b'-') {
            self.p += 1;
        }
        match self.peek() {
            Some(b'0') => self.p += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.p),
        }
        if self.peek() == Some(b'.') {
            self.p += 1;
            if self.digits() == 0 {
                return Err(self.p);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.p += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.p += 1;
            }
            if self.digits() == 0 {
                return Err(self.p);
            }
        }
        Ok(())
    }

    /// Skips a string, validating escapes. Returns whether it contained any.
    fn string(&mut self) -> Result<bool, At> {
        self.expect(b'"')?;
        let mut escaped = false;
        loop {
            match self.next() {
                None => return Err(self.p),
                Some(b'"') => return Ok(escaped),
                Some(b'\\') => {
                    escaped = true;
                    match self.next() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                        Some(b'u') => {
                            for _ in 0..4 {
                                match self.next() {
                                    Some(c) if c.is_ascii_hexdigit() => {}
                                    _ => return Err(self.p.saturating_sub(1)),
                                }
                            }
                        }
                        _ => return Err(self.p.saturating_sub(1)),
                    }
                }
                Some(0x00..=0x1f) => return Err(self.p - 1),
                Some(_) => {}
            }
        }
    }

    /// A top-level key, decoded (borrowed when it has no escapes).
    fn string_key(&mut self) -> Result<Cow<'a, str>, At> {
        let start = self.p;
        let escaped = self.string()?;
        let inner = &self.text[start + 1..self.p - 1];
        if !escaped {
            return Ok(Cow::Borrowed(inner));
        }
        Ok(Cow::Owned(decode_escapes(inner)))
    }
}

/// Decodes the escapes of an already-validated string body. Lone surrogates become
/// U+FFFD, which can only make two keys compare equal, never hide a duplicate.
fn decode_escapes(inner: &str) -> String {
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    let mut pending_high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != '\\' {
            if pending_high.take().is_some() {
                out.push('\u{fffd}');
            }
            out.push(c);
            continue;
        }
        let e = chars.next().unwrap_or('\\');
        if e != 'u' {
            if pending_high.take().is_some() {
                out.push('\u{fffd}');
            }
            out.push(match e {
                'b' => '\u{8}',
                'f' => '\u{c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                other => other,
            });
            continue;
        }
        let hex: String = chars.by_ref().take(4).collect();
        let unit = u32::from_str_radix(&hex, 16).unwrap_or(0xfffd);
        match (pending_high.take(), unit) {
            (Some(high), 0xdc00..=0xdfff) => {
                let cp = 0x10000 + ((high - 0xd800) << 10) + (unit - 0xdc00);
                out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
            }
            (prev, 0xd800..=0xdbff) => {
                if prev.is_some() {
                    out.push('\u{fffd}');
                }
                pending_high = Some(unit);
            }
            (prev, _) => {
                if prev.is_some() {
                    out.push('\u{fffd}');
                }
                out.push(char::from_u32(unit).unwrap_or('\u{fffd}'));
            }
        }
    }
    if pending_high.is_some() {
        out.push('\u{fffd}');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(body: &str) -> Vec<String> {
        scan(body.as_bytes())
            .unwrap()
            .members
            .iter()
            .map(|m| m.key.to_string())
            .collect()
    }

    #[test]
    fn finds_top_level_members_and_their_spans() {
        let body = r#" { "model" : "m", "messages":[{"role":"user","content":"hi"}] ,"n":1e400} "#;
        let top = scan(body.as_bytes()).unwrap();
        assert_eq!(top.open, 1);
        let m = top.get("messages").unwrap();
        assert_eq!(
            &body[m.value_start..m.value_end],
            r#"[{"role":"user","content":"hi"}]"#
        );
        assert_eq!(m.value_kind(body.as_bytes()), ValueKind::Array);
        let n = top.get("n").unwrap();
        assert_eq!(&body[n.value_start..n.value_end], "1e400");
        assert_eq!(keys(body), ["model", "messages", "n"]);
    }

    #[test]
    fn accepts_every_valid_shape() {
        for ok in [
            "{}",
            r#"{"a":[]}"#,
            r#"{"a":{}}"#,
            r#"{"a":[1,-0.0,2.5E+3,0,-1e-7,true,false,null,"s\"\\\/\b\f\n\r\t\u00e9\ud83e\udd80"]}"#,
            r#"{"a":{"b":{"c":[[[]],{"d":null}]}}}"#,
            "{\"a\":\"\u{e9}\u{1F980}\"}",
            r#"{"a":"\ud800"}"#,
            "\t\r\n{\"a\" :\n1 }\n",
        ] {
            scan(ok.as_bytes()).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(serde_json::from_str::<serde_json::Value>(ok).is_ok() || ok.contains("ud800"));
        }
    }

    #[test]
    fn refuses_malformed_json() {
        for bad in [
            "",
            "{",
            "}",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":"x}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            r#"{a:1}"#,
            r#"{"a":1}{"#,
            r#"{"a":1} x"#,
            r#"{"a":[}"#,
            r#"{"a":{]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{'a':1}"#,
            r#"{"a":NaN}"#,
            r#"{"a":Infinity}"#,
        ] {
            assert!(
                matches!(scan(bad.as_bytes()), Err(BodyError::Malformed(_))),
                "{bad:?}"
            );
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "reference accepts {bad:?}"
            );
        }
    }

    #[test]
    fn refuses_non_objects_and_bad_utf8() {
        assert_eq!(scan(b"[1]"), Err(BodyError::NotAnObject));
        assert_eq!(scan(b" \"s\" "), Err(BodyError::NotAnObject));
        assert_eq!(scan(b"{\"a\":\"\xff\"}"), Err(BodyError::InvalidUtf8));
        assert_eq!(scan(b"{\"a\":\"\xc3\"}"), Err(BodyError::InvalidUtf8));
    }

    #[test]
    fn refuses_duplicate_top_level_keys_however_spelled() {
        for dup in [
            r#"{"messages":[],"messages":[]}"#,
            r#"{"messages":[],"messag\u0065s":[]}"#,
            r#"{"system":"a","x":1,"\u0073ystem":[]}"#,
            r#"{"a\ud83e\udd80":1,"a🦀":2}"#,
            r#"{"messages":[],"Messages":[]}"#,
            r#"{"model":"a","MODEL":"b"}"#,
            "{\"messages\":[],\"me\u{17f}\u{17f}ages\":[]}",
            "{\"kind\":1,\"\u{212a}ind\":2}",
        ] {
            assert!(
                matches!(scan(dup.as_bytes()), Err(BodyError::DuplicateKey(_))),
                "{dup}"
            );
        }
        // Nested duplicates are the model's business, not a way around the directive.
        scan(br#"{"a":{"k":1,"k":2}}"#).unwrap();
    }

    #[test]
    fn decodes_escaped_keys() {
        assert_eq!(
            keys(r#"{"\u006dodel":1,"a\nb":2,"\ud83e\udd80":3}"#),
            ["model", "a\nb", "🦀"]
        );
        assert_eq!(decode_escapes(r"\ud800x"), "\u{fffd}x");
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 200_000;
        let body = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        scan(body.as_bytes()).unwrap();
    }
}
