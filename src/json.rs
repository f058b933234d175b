//! A strict, single-pass JSON scanner that reports where the members of a request
//! body are, without building a document.
//!
//! It is what lets the filter *splice* instead of re-serialising: the body is
//! validated in one pass (RFC 8259 grammar, valid UTF-8, exactly one top-level
//! object) and the byte spans of its members are returned, so an insertion touches
//! nothing else — key order, whitespace and number spelling all survive.
//!
//! [`scan`] reads the top-level members only: what the OpenAI and plain Anthropic
//! formats need. [`scan_with`] also reads chosen nested values closely, in the same
//! pass: a [`Shape`] names the members whose object value has its own members
//! recorded (Gemini's `systemInstruction`, each batch request's `params`) or whose
//! array value has its elements recorded (a completions `prompt`, a batch's
//! `requests`). It can also count the members of given names wherever they appear
//! ([`Tally`]: Anthropic's `cache_control` breakpoints), per closely read object.
//!
//! A key that appears twice in the top-level object, or in any object read closely,
//! is an error, also when the two spellings differ only by escapes (`"messages"` and
//! `"messag\u0065s"`) or by case (`"Messages"`, or `"meſſages"` with U+017F):
//! upstream parsers disagree on which duplicate wins, and Go's `encoding/json`
//! matches keys case-insensitively, so either would be a way around the directive.
//! Objects not read closely are only validated: what they hold is the model's
//! business, not a way around the directive.
//!
//! Never panics on any input. The grammar is checked without recursion (nesting depth
//! is bounded only by the body size limit); the closely read values recurse, bounded
//! by the depth of the static shapes (and by [`MAX_SHAPE_DEPTH`] whatever they are).
//! This module must never build a document or copy the body.

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
    /// A key appears more than once in a nested object the filter reads (compared
    /// like top-level keys).
    DuplicateNestedKey {
        /// The member holding that object (`"params"`, `"systemInstruction"`).
        within: &'static str,
        /// The key, decoded.
        key: String,
    },
    /// Two accepted spellings of one member are both present (Gemini's
    /// `systemInstruction` and `system_instruction`): a parser takes one of them.
    BothSpellings(&'static str, &'static str),
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
    /// A member the upstream would act on so that it skips, replaces or cannot read
    /// the directive (Ollama's `suffix`, vLLM's `prompt_embeds`).
    /// The body with the directive spliced in would exceed the spliced-body limit
    /// (`inject.max_body_bytes` × 4): one insertion per element of a large array.
    Oversized,
    Unsupported {
        /// Member name.
        member: &'static str,
        /// Why it cannot be directed.
        reason: &'static str,
    },
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::InvalidUtf8 => f.write_str("request body is not valid UTF-8"),
            BodyError::Malformed(at) => write!(f, "request body is not valid JSON (at byte {at})"),
            BodyError::NotAnObject => f.write_str("request body must be a JSON object"),
            BodyError::DuplicateKey(k) => {
                write!(
                    f,
                    "request body has the top-level key {:?} more than once",
                    shown(k)
                )
            }
            BodyError::DuplicateNestedKey { within, key } => write!(
                f,
                "request body has the key {:?} more than once in \"{within}\"",
                shown(key)
            ),
            BodyError::BothSpellings(a, b) => {
                write!(f, "request body has both \"{a}\" and \"{b}\"")
            }
            BodyError::MissingMember(m) => write!(f, "request body has no \"{m}\""),
            BodyError::CaseVariant(m) => {
                write!(f, "request body spells \"{m}\" in another case")
            }
            BodyError::WrongType { member, expected } => {
                write!(f, "\"{member}\" must be {expected}")
            }
            BodyError::Oversized => {
                f.write_str("request body would grow past the gateway's limit with the directive")
            }
            BodyError::Unsupported { member, reason } => {
                write!(f, "\"{member}\" is not supported here: {reason}")
            }
        }
    }
}

/// A key is the client's own input: bound it so the reply stays small.
fn shown(key: &str) -> String {
    key.chars().take(64).collect()
}

/// How deep closely read values may nest in [`scan_with`]; deeper [`Shape`]s are
/// read plainly (the shapes of this crate nest two or three deep).
pub const MAX_SHAPE_DEPTH: usize = 8;

/// How many names [`scan_with`] can count.
pub const MAX_COUNTED: usize = 4;

/// Which members of an object [`scan_with`] reads closely, and how.
#[derive(Debug)]
pub struct Shape {
    /// Member names, exactly as decoded (no other case), with how their value is read.
    /// A value of another JSON type than the one named is only validated.
    pub members: &'static [(&'static str, Read)],
}

impl Shape {
    /// No member read closely: an object's own members only.
    pub const FLAT: Shape = Shape { members: &[] };

    fn read_of(&self, key: &str) -> Option<(&'static str, Read)> {
        self.members.iter().find(|(name, _)| *name == key).copied()
    }
}

/// How a closely read member's value is read.
#[derive(Debug, Clone, Copy)]
pub enum Read {
    /// An object: its members are recorded with this shape, duplicates refused.
    Object(&'static Shape),
    /// An array: its elements are recorded; elements that are objects are read with
    /// this shape, duplicates refused.
    Elements(&'static Shape),
}

/// Counts of the names given to [`scan_with`], in their order, within one object
/// (its nested values included, however deep). A key counts when it equals the name
/// after decoding escapes and folding case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally([u32; MAX_COUNTED]);

impl Tally {
    /// How many keys of the `i`-th counted name; 0 for a name not counted.
    pub fn get(&self, i: usize) -> u32 {
        self.0.get(i).copied().unwrap_or(0)
    }

    fn since(&self, start: &Tally) -> Tally {
        let mut out = Tally::default();
        for ((o, now), then) in out.0.iter_mut().zip(self.0).zip(start.0) {
            *o = now.saturating_sub(then);
        }
        out
    }
}

/// One member of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    /// The key, with escapes decoded.
    pub key: Cow<'a, str>,
    /// Byte offset of the first byte of the value.
    pub value_start: usize,
    /// Byte offset just past the value.
    pub value_end: usize,
    /// What [`scan_with`] read inside the value, when its [`Shape`] named the member.
    pub inner: Inner<'a>,
}

impl Member<'_> {
    /// The first byte of the value, which tells its JSON type.
    pub fn value_kind(&self, body: &[u8]) -> ValueKind {
        kind_at(body, self.value_start)
    }

    /// The value's object, when it was read closely.
    pub fn object(&self) -> Option<&Object<'_>> {
        match &self.inner {
            Inner::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The value's array elements, when they were read closely.
    pub fn elements(&self) -> Option<&[Element<'_>]> {
        match &self.inner {
            Inner::Elements(e) => Some(e),
            _ => None,
        }
    }
}

/// What was read inside a member's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inner<'a> {
    /// Only validated: the shape did not name it, or its type was not the one named.
    Skipped,
    /// An object read closely.
    Object(Box<Object<'a>>),
    /// An array whose elements were recorded.
    Elements(Vec<Element<'a>>),
}

/// One element of an array read closely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element<'a> {
    /// Byte offset of the first byte of the element.
    pub value_start: usize,
    /// Byte offset just past the element.
    pub value_end: usize,
    /// The element's members, when it is an object.
    pub object: Option<Object<'a>>,
}

impl Element<'_> {
    /// The first byte of the element, which tells its JSON type.
    pub fn value_kind(&self, body: &[u8]) -> ValueKind {
        kind_at(body, self.value_start)
    }
}

/// The JSON type of the value starting at `at` in a scanned body.
pub fn kind_at(body: &[u8], at: usize) -> ValueKind {
    match body.get(at) {
        Some(b'{') => ValueKind::Object,
        Some(b'[') => ValueKind::Array,
        Some(b'"') => ValueKind::String,
        Some(b't') | Some(b'f') => ValueKind::Bool,
        Some(b'n') => ValueKind::Null,
        _ => ValueKind::Number,
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

/// A validated object: the top level of a body, or a nested object read closely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object<'a> {
    /// Offset of the opening `{`.
    pub open: usize,
    /// Members in body order; their keys are unique, also after case folding.
    pub members: Vec<Member<'a>>,
    /// The counted names inside this object, nested values included.
    pub tally: Tally,
}

/// The body's top-level object.
pub type TopLevel<'a> = Object<'a>;

impl<'a> Object<'a> {
    /// The member named `key`, if present (keys are unique once scanned).
    pub fn get(&self, key: &str) -> Option<&Member<'a>> {
        self.members.iter().find(|m| m.key == key)
    }

    /// The member the directive goes into: exactly `name`, or none; a member that
    /// equals `name` only after case folding is an error.
    pub fn target(&self, name: &'static str) -> Result<Option<&Member<'a>>, BodyError> {
        match self.folded(name) {
            None => Ok(None),
            Some(m) if m.key == name => Ok(Some(m)),
            Some(_) => Err(BodyError::CaseVariant(name)),
        }
    }

    /// The member equal to `name` after case folding, however it is spelled: what a
    /// case-insensitive parser (Go's `encoding/json`) reads as `name`.
    pub fn folded(&self, name: &str) -> Option<&Member<'a>> {
        self.members.iter().find(|m| eq_folded(&m.key, name))
    }
}

/// Whether `a` and `b` are equal after [`fold_case`], without allocating.
pub fn eq_folded(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    let folded = |s: &'_ str| {
        s.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    // Rare (a non-ASCII key); fold_case's own form, so the two can never disagree.
    folded(a) == folded(b)
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

/// The text of the string value spanning `start..end` of a scanned body, escapes
/// decoded; None when the span is not a string.
pub fn string_value(body: &[u8], start: usize, end: usize) -> Option<Cow<'_, str>> {
    if body.get(start) != Some(&b'"') || end < start.checked_add(2)? {
        return None;
    }
    let inner = body.get(start.checked_add(1)?..end.checked_sub(1)?)?;
    let text = std::str::from_utf8(inner).ok()?;
    if text.contains('\\') {
        Some(Cow::Owned(decode_escapes(text)))
    } else {
        Some(Cow::Borrowed(text))
    }
}

/// Validates `body` and returns its top-level members.
pub fn scan(body: &[u8]) -> Result<TopLevel<'_>, BodyError> {
    scan_with(body, &Shape::FLAT, &[])
}

/// Validates `body` and returns its top-level members, the values `shape` names read
/// closely (recursively, by their own shapes), and in every object read the count of
/// the keys named in `counted` (lower-case names, at most [`MAX_COUNTED`]).
pub fn scan_with<'a>(
    body: &'a [u8],
    shape: &'static Shape,
    counted: &'static [&'static str],
) -> Result<TopLevel<'a>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::InvalidUtf8)?;
    let mut s = Scanner {
        b: text.as_bytes(),
        text,
        p: 0,
        counted,
        tally: Tally::default(),
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
    let top = s.object(shape, None, 0)?;
    s.ws();
    if s.p != s.b.len() {
        return Err(BodyError::Malformed(s.p));
    }
    Ok(top)
}

struct Scanner<'a> {
    b: &'a [u8],
    text: &'a str,
    p: usize,
    /// Names whose keys are counted wherever they appear; empty on the fast path.
    counted: &'static [&'static str],
    /// Keys of `counted` seen so far.
    tally: Tally,
}

/// Errors inside the scanner are the offset of the offending byte.
type At = usize;

impl<'a> Scanner<'a> {
    /// The object at `p` (a `{`), its members recorded. `within` names the member
    /// holding it (None: the top level); `depth` counts the closely read values around it.
    fn object(
        &mut self,
        shape: &'static Shape,
        within: Option<&'static str>,
        depth: usize,
    ) -> Result<Object<'a>, BodyError> {
        let open = self.p;
        let tally_at_open = self.tally;
        self.expect(b'{').map_err(BodyError::Malformed)?;
        let mut members: Vec<Member<'a>> = Vec::new();
        let mut seen: HashSet<Cow<'a, str>> = HashSet::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.p += 1;
        } else {
            loop {
                self.ws();
                let key = self.string_key().map_err(BodyError::Malformed)?;
                if !self.counted.is_empty() {
                    self.count(&key);
                }
                self.ws();
                self.expect(b':').map_err(BodyError::Malformed)?;
                self.ws();
                let value_start = self.p;
                let inner = match shape.read_of(&key) {
                    Some((name, read)) if depth < MAX_SHAPE_DEPTH => {
                        self.closely(name, read, depth + 1)?
                    }
                    _ => {
                        self.value().map_err(BodyError::Malformed)?;
                        Inner::Skipped
                    }
                };
                let value_end = self.p;
                // Borrow from the body when the key needs no decoding and no folding.
                let folded = match &key {
                    Cow::Borrowed(k) => fold_case(k),
                    Cow::Owned(k) => Cow::Owned(fold_case(k).into_owned()),
                };
                if !seen.insert(folded) {
                    let key = key.into_owned();
                    return Err(match within {
                        None => BodyError::DuplicateKey(key),
                        Some(within) => BodyError::DuplicateNestedKey { within, key },
                    });
                }
                members.push(Member {
                    key,
                    value_start,
                    value_end,
                    inner,
                });
                self.ws();
                match self.next() {
                    Some(b',') => continue,
                    Some(b'}') => break,
                    _ => return Err(BodyError::Malformed(self.p.saturating_sub(1))),
                }
            }
        }
        Ok(Object {
            open,
            members,
            tally: self.tally.since(&tally_at_open),
        })
    }

    /// The value at `p` of the member `name`, read as `read` says when it has the
    /// type named there, else only validated.
    fn closely(
        &mut self,
        name: &'static str,
        read: Read,
        depth: usize,
    ) -> Result<Inner<'a>, BodyError> {
        match (read, self.peek()) {
            (Read::Object(shape), Some(b'{')) => Ok(Inner::Object(Box::new(self.object(
                shape,
                Some(name),
                depth,
            )?))),
            (Read::Elements(shape), Some(b'[')) => self.elements(name, shape, depth),
            _ => {
                self.value().map_err(BodyError::Malformed)?;
                Ok(Inner::Skipped)
            }
        }
    }

    /// The array at `p` (a `[`), each element's span recorded and object elements
    /// read with `shape`.
    fn elements(
        &mut self,
        name: &'static str,
        shape: &'static Shape,
        depth: usize,
    ) -> Result<Inner<'a>, BodyError> {
        self.expect(b'[').map_err(BodyError::Malformed)?;
        let mut elements = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.p += 1;
            return Ok(Inner::Elements(elements));
        }
        loop {
            self.ws();
            let value_start = self.p;
            let object = if self.peek() == Some(b'{') {
                Some(self.object(shape, Some(name), depth)?)
            } else {
                self.value().map_err(BodyError::Malformed)?;
                None
            };
            elements.push(Element {
                value_start,
                value_end: self.p,
                object,
            });
            self.ws();
            match self.next() {
                Some(b',') => continue,
                Some(b']') => return Ok(Inner::Elements(elements)),
                _ => return Err(BodyError::Malformed(self.p.saturating_sub(1))),
            }
        }
    }

    /// Counts `key` (decoded) when it is one of the counted names, in any case.
    fn count(&mut self, key: &str) {
        let folded = fold_case(key);
        for (slot, name) in self.tally.0.iter_mut().zip(self.counted) {
            if folded == *name {
                *slot = slot.saturating_add(1);
            }
        }
    }

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

    /// `"key"` `:` inside an object not read closely (the key is only counted).
    fn member_key(&mut self) -> Result<(), At> {
        if self.peek() != Some(b'"') {
            return Err(self.p);
        }
        if self.counted.is_empty() {
            self.string()?;
        } else {
            let key = self.string_key()?;
            self.count(&key);
        }
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
    fn folded_comparison_matches_fold_case() {
        for (a, b, same) in [
            ("systemInstruction", "SYSTEMINSTRUCTION", true),
            ("system_instruction", "systemInstruction", false),
            ("\u{17f}ystem", "system", true),
            ("\u{212a}ind", "KIND", true),
            ("caf\u{e9}", "CAF\u{c9}", true),
            ("a", "ab", false),
            ("\u{df}", "ss", true),
        ] {
            assert_eq!(eq_folded(a, b), same, "{a} {b}");
            assert_eq!(eq_folded(a, b), fold_case(a) == fold_case(b), "{a} {b}");
        }
    }

    #[test]
    fn decodes_escaped_keys() {
        assert_eq!(
            keys(r#"{"\u006dodel":1,"a\nb":2,"\ud83e\udd80":3}"#),
            ["model", "a\nb", "🦀"]
        );
        assert_eq!(decode_escapes(r"\ud800x"), "\u{fffd}x");
    }

    static PARAMS: Shape = Shape {
        members: &[("system", Read::Object(&Shape::FLAT))],
    };
    static REQUEST: Shape = Shape {
        members: &[("params", Read::Object(&PARAMS))],
    };
    static BATCH: Shape = Shape {
        members: &[
            ("requests", Read::Elements(&REQUEST)),
            ("prompt", Read::Elements(&Shape::FLAT)),
        ],
    };

    #[test]
    fn closely_read_values_record_their_members_and_elements() {
        let body = r#"{"requests":[{"custom_id":"a","params":{"model":"m","system":"s"}}, 7 ,{"params":[1]}],"prompt":["x", 2],"other":{"params":{}}}"#;
        let top = scan_with(body.as_bytes(), &BATCH, &[]).unwrap();
        let requests = top.get("requests").unwrap().elements().unwrap();
        assert_eq!(requests.len(), 3);
        let first = requests[0].object.as_ref().unwrap();
        let params = first.get("params").unwrap().object().unwrap();
        assert_eq!(&body[params.open..params.open + 1], "{");
        let system = params.get("system").unwrap();
        assert_eq!(&body[system.value_start..system.value_end], r#""s""#);
        assert_eq!(
            system.inner,
            Inner::Skipped,
            "not an object: validated only"
        );
        assert_eq!(&body[requests[1].value_start..requests[1].value_end], "7");
        assert_eq!(requests[1].object, None);
        let third = requests[2].object.as_ref().unwrap();
        assert_eq!(third.get("params").unwrap().inner, Inner::Skipped);
        let prompt = top.get("prompt").unwrap().elements().unwrap();
        assert_eq!(prompt[0].value_kind(body.as_bytes()), ValueKind::String);
        assert_eq!(prompt[1].value_kind(body.as_bytes()), ValueKind::Number);
        assert_eq!(top.get("other").unwrap().inner, Inner::Skipped);
        // The same body through the fast path: top-level members only, same spans.
        let flat = scan(body.as_bytes()).unwrap();
        assert!(flat.members.iter().all(|m| m.inner == Inner::Skipped));
        assert_eq!(
            flat.members.iter().map(|m| m.value_end).collect::<Vec<_>>(),
            top.members.iter().map(|m| m.value_end).collect::<Vec<_>>()
        );
        let empty = scan_with(br#"{"requests":[ ],"prompt":[]}"#, &BATCH, &[]).unwrap();
        assert_eq!(empty.get("requests").unwrap().elements(), Some(&[][..]));
    }

    #[test]
    fn duplicates_in_closely_read_objects_are_refused_however_spelled() {
        for (dup, within) in [
            (r#"{"requests":[{"params":{},"params":{}}]}"#, "requests"),
            (r#"{"requests":[{"params":{},"Params":{}}]}"#, "requests"),
            (
                r#"{"requests":[{},{"params":{"a":1,"\u0061":2}}]}"#,
                "params",
            ),
            (
                r#"{"requests":[{"params":{"system":{"x":1,"X":2}}}]}"#,
                "system",
            ),
            (
                "{\"requests\":[{\"params\":{\"kind\":1,\"\u{212a}ind\":2}}]}",
                "params",
            ),
        ] {
            match scan_with(dup.as_bytes(), &BATCH, &[]) {
                Err(BodyError::DuplicateNestedKey { within: w, .. }) => {
                    assert_eq!(w, within, "{dup}")
                }
                other => panic!("{dup}: {other:?}"),
            }
        }
        // Objects not read closely keep their duplicates: validated only.
        for ok in [
            r#"{"requests":[{"params":{"model":{"k":1,"k":2}}}]}"#,
            r#"{"other":{"params":{"a":1,"a":2}}}"#,
            r#"{"requests":[{"Params":{"a":1,"a":2}}]}"#,
        ] {
            scan_with(ok.as_bytes(), &BATCH, &[]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(matches!(
            scan_with(br#"{"requests":[{"params":{"a":1,}}]}"#, &BATCH, &[]),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            scan_with(br#"{"requests":[{"params":{"a":1}]}"#, &BATCH, &[]),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            scan_with(br#"{"requests":[1,]}"#, &BATCH, &[]),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn counted_names_are_tallied_per_object_at_any_depth() {
        const COUNTED: &[&str] = &["cache_control", "ttl"];
        let body = r#"{"requests":[
            {"params":{"system":[{"text":"a","cache_control":{"type":"ephemeral"}}],
                       "messages":[{"content":[{"Cache_Control":{"ttl":"1h"}},{"cache\u005fcontrol":null}]}]}},
            {"params":{"tools":[{"name":"t","cache_control":{}}],"x":"cache_control"}}],
            "cache_control":1}"#;
        let top = scan_with(body.as_bytes(), &BATCH, COUNTED).unwrap();
        assert_eq!((top.tally.get(0), top.tally.get(1)), (5, 1));
        let requests = top.get("requests").unwrap().elements().unwrap();
        let params = |i: usize| {
            requests[i]
                .object
                .as_ref()
                .unwrap()
                .get("params")
                .unwrap()
                .object()
                .unwrap()
                .tally
        };
        assert_eq!((params(0).get(0), params(0).get(1)), (3, 1));
        assert_eq!(
            (params(1).get(0), params(1).get(1)),
            (1, 0),
            "a string is no key"
        );
        assert_eq!(top.tally.get(2), 0);
        assert_eq!(scan(body.as_bytes()).unwrap().tally, Tally::default());
    }

    #[test]
    fn string_values_decode() {
        let body = br#"{"a":"x\ny\u00e9","b":"plain","c":1}"#;
        let top = scan(body).unwrap();
        let v = |k: &str| {
            let m = top.get(k).unwrap();
            string_value(body, m.value_start, m.value_end)
        };
        assert_eq!(v("a").as_deref(), Some("x\ny\u{e9}"));
        assert!(matches!(v("b"), Some(Cow::Borrowed("plain"))));
        assert_eq!(v("c"), None);
        assert_eq!(string_value(body, 100, 2), None);
        assert_eq!(string_value(body, 5, 6), None);
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 200_000;
        let body = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        scan(body.as_bytes()).unwrap();
    }
}
