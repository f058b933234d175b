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
    // UTF-8 is checked in the same pass: the grammar takes only ASCII outside
    // strings, and the string scan validates every non-ASCII byte inside them, so an
    // accepted body is valid UTF-8. A refused one is refused as invalid UTF-8 when
    // it is not UTF-8, whatever the scan found first (as when UTF-8 was checked in a
    // pass of its own before the grammar): refusals are the rare path.
    scan_once(body, shape, counted).map_err(|e| match std::str::from_utf8(body) {
        Ok(_) => e,
        Err(_) => BodyError::InvalidUtf8,
    })
}

/// [`scan_with`] but for the kind of a refusal: a body that is not UTF-8 may be
/// refused as malformed (at the byte that is not UTF-8, or at an earlier error).
fn scan_once<'a>(
    body: &'a [u8],
    shape: &'static Shape,
    counted: &'static [&'static str],
) -> Result<TopLevel<'a>, BodyError> {
    let mut s = Scanner {
        b: body,
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

/// The keys of one object, folded, to refuse a duplicate: compared one by one
/// while there are few of them (most objects have a handful of keys, and a set
/// would hash every one), hashed once there are more.
struct Seen<'a> {
    few: [Cow<'a, str>; FEW_KEYS],
    len: usize,
    many: HashSet<Cow<'a, str>>,
}

/// How many keys [`Seen`] compares one by one.
const FEW_KEYS: usize = 16;

impl Default for Seen<'_> {
    fn default() -> Self {
        const NONE: Cow<'static, str> = Cow::Borrowed("");
        Seen {
            few: [NONE; FEW_KEYS],
            len: 0,
            many: HashSet::new(),
        }
    }
}

impl<'a> Seen<'a> {
    /// Adds `key`; false when it was there already.
    fn insert(&mut self, key: Cow<'a, str>) -> bool {
        if self.len < FEW_KEYS {
            if self.few.iter().take(self.len).any(|k| *k == key) {
                return false;
            }
            if let Some(slot) = self.few.get_mut(self.len) {
                *slot = key;
                self.len += 1;
                return true;
            }
        }
        if self.many.is_empty() {
            self.many.extend(self.few.iter_mut().map(std::mem::take));
        }
        self.many.insert(key)
    }
}

struct Scanner<'a> {
    b: &'a [u8],
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
        let mut seen = Seen::default();
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

    /// Skips a string, validating escapes, control bytes and UTF-8. Offsets of
    /// errors are those of the first offending byte (of an unfinished escape at the
    /// end of the body: its last byte; of an unfinished string: the body's length);
    /// an error at a byte that is not UTF-8 becomes [`BodyError::InvalidUtf8`] in
    /// [`scan_with`].
    ///
    /// Plain text is skipped sixteen bytes at a time ([`after_plain`]); the byte
    /// that ends it is handled as a byte-by-byte scan would, and the scan goes on
    /// after it.
    fn string(&mut self) -> Result<(), At> {
        self.expect(b'"')?;
        let b = self.b;
        // The bytes after the ones read so far; offsets are computed back from it.
        let mut rest = b.get(self.p..).unwrap_or_default();
        let at = |rest: &[u8]| b.len() - rest.len();
        loop {
            rest = after_plain(rest);
            let Some((&c, tail)) = rest.split_first() else {
                // The body ends inside the string.
                return Err(b.len());
            };
            match c {
                b'"' => {
                    self.p = at(tail);
                    return Ok(());
                }
                b'\\' => rest = after_escape(rest).map_err(|e| at(rest) + e)?,
                0x80..=0xff => {
                    // Non-ASCII text comes in runs (CJK, emoji): read on.
                    loop {
                        rest = after_utf8(rest).ok_or(at(rest))?;
                        if !matches!(rest.first(), Some(0x80..=0xff)) {
                            break;
                        }
                    }
                }
                // A control byte.
                _ => return Err(at(rest)),
            }
        }
    }

    /// A top-level key, decoded (borrowed when it has no escapes).
    fn string_key(&mut self) -> Result<Cow<'a, str>, At> {
        let start = self.p;
        self.string()?;
        let b: &'a [u8] = self.b;
        // UTF-8 already, as the string scan validated it: the check cannot fail.
        let inner = b
            .get(start + 1..self.p - 1)
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or(start)?;
        if !inner.contains('\\') {
            return Ok(Cow::Borrowed(inner));
        }
        Ok(Cow::Owned(decode_escapes(inner)))
    }
}

/// One in each byte of a word.
const ONES: u64 = u64::from_le_bytes([1; 8]);
/// The high bit of each byte of a word.
const HIGH: u64 = ONES * 0x80;

/// Whether `c` ends a run of plain string text: `"`, `\`, a control byte (< 0x20) or
/// a non-ASCII byte (≥ 0x80). What [`stops`] flags.
#[inline(always)]
fn is_stop(c: u8) -> bool {
    c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c)
}

/// The bytes of `w` (eight body bytes, little-endian) that end a run of plain
/// string text ([`is_stop`]) have their high bit set in the result, no other bit
/// is, and the result is 0 exactly when there is none. Exact for the lowest such
/// byte, not above it: a byte above may be flagged without being one.
///
/// Three terms, each on every byte at once. `x ^ 0x02` is below 0x21 exactly when
/// `x` is a control byte (xor 2 permutes 0x00..=0x1f) or `"` (0x22 ^ 2 = 0x20),
/// and subtracting 0x21 then sets the high bit; `x ^ b'\\'` is 0 exactly for `\`,
/// and subtracting 1 sets it; the last term is the high bits themselves. A byte
/// that is none of these is in 0x20..=0x7f: its first two terms are then
/// 0..=0x5e and 0..=0x7e, high bit clear. A subtraction borrows out of a byte
/// only where that byte underflowed, which is where it is one of the flagged
/// kinds; so below the lowest flagged byte nothing borrowed, and every byte there
/// is read as it is.
#[inline(always)]
fn stops(w: u64) -> u64 {
    stops_unmasked(w) & HIGH
}

/// [`stops`] before its mask: its high bits are those of [`stops`], the others noise.
#[inline(always)]
fn stops_unmasked(w: u64) -> u64 {
    let control_or_quote = (w ^ (ONES * 0x02)).wrapping_sub(ONES * 0x21);
    let backslash = (w ^ (ONES * u64::from(b'\\'))).wrapping_sub(ONES);
    control_or_quote | backslash | w
}

/// `s` from its first byte that ends a run of plain string text ([`is_stop`]) on,
/// empty when it has none: sixteen bytes at a time (two words), then the last ones
/// one by one.
#[inline(always)]
fn after_plain(mut s: &[u8]) -> &[u8] {
    while let Some((pair, tail)) = s.split_first_chunk::<16>() {
        let (lo, hi) = pair.split_at(8);
        let (lo, hi) = (word(lo), word(hi));
        if (stops_unmasked(lo) | stops_unmasked(hi)) & HIGH != 0 {
            let m = stops(lo);
            let at = if m != 0 {
                first_flagged(m)
            } else {
                8 + first_flagged(stops(hi))
            };
            return s.get(at..).unwrap_or_default();
        }
        s = tail;
    }
    let plain = s.iter().position(|&c| is_stop(c)).unwrap_or(s.len());
    s.get(plain..).unwrap_or_default()
}

/// Eight bytes, little-endian (from a slice of eight, as [`after_plain`] cuts them;
/// a shorter one would be padded with spaces, which cannot happen).
#[inline(always)]
fn word(bytes: &[u8]) -> u64 {
    let mut w = [b' '; 8];
    for (to, from) in w.iter_mut().zip(bytes) {
        *to = *from;
    }
    u64::from_le_bytes(w)
}

/// The index of the lowest byte whose high bit is set in `m` (not 0).
#[inline(always)]
fn first_flagged(m: u64) -> usize {
    (m.trailing_zeros() / 8) as usize
}

/// `s` (starting with a `\`) after its escape, or the offset in `s` of the first
/// offending byte (the last byte of `s` when it ends inside the escape).
#[inline(always)]
fn after_escape(s: &[u8]) -> Result<&[u8], usize> {
    let Some(&c) = s.get(1) else {
        return Err(0);
    };
    if SIMPLE_ESCAPES[usize::from(c)] {
        return Ok(s.get(2..).unwrap_or_default());
    }
    if c != b'u' {
        return Err(1);
    }
    for i in 2..6 {
        match s.get(i) {
            Some(c) if c.is_ascii_hexdigit() => {}
            Some(_) => return Err(i),
            None => return Err(i - 1),
        }
    }
    Ok(s.get(6..).unwrap_or_default())
}

/// The bytes that make a two-byte escape after `\` (RFC 8259 §7), by value.
static SIMPLE_ESCAPES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    let simple = b"\"\\/bfnrt";
    while i < simple.len() {
        t[simple[i] as usize] = true;
        i += 1;
    }
    t
};

/// `s` after the UTF-8 encoded character it starts with (a byte ≥ 0x80), or None
/// when the bytes there are not UTF-8: a continuation byte first, an overlong form
/// (C0, C1, E0 then under A0, F0 then under 90), a surrogate (ED then A0..), past
/// U+10FFFF (F4 then 90.., F5..FF), or a sequence cut short. The bytes
/// `std::str::from_utf8` accepts (Unicode's table 3-7).
///
/// Reads the first four bytes as one word, checks the marker bits of the sequence
/// its lead announces and the range of the code point it encodes: a form too long
/// encodes a code point the shorter one could, a surrogate is D800..DFFF. Within
/// four bytes of the end, byte by byte ([`utf8_len_bytewise`]).
#[inline(always)]
fn after_utf8(s: &[u8]) -> Option<&[u8]> {
    let Some(four) = s.first_chunk::<4>() else {
        return s.get(utf8_len_bytewise(s)?..);
    };
    let w = u32::from_le_bytes(*four);
    let lead = w & 0xff;
    let len = if lead < 0xe0 {
        // 110xxxxx 10xxxxxx; C0 and C1 would encode below 0x80.
        if w & 0xc0e0 != 0x80c0 || lead < 0xc2 {
            return None;
        }
        2
    } else if lead < 0xf0 {
        // 1110xxxx 10xxxxxx 10xxxxxx. The code point's top five bits (the lead's
        // four, the second byte's 0x20) tell both faults: 0 is below 0x800 (a form
        // too long), 0x1b is D800..DFFF (a surrogate).
        let top = (w & 0x0f) << 1 | (w >> 13 & 1);
        if w & 0x00c0_c0f0 != 0x0080_80e0 || top == 0 || top == 0x1b {
            return None;
        }
        3
    } else {
        // 11110xxx 10xxxxxx 10xxxxxx 10xxxxxx
        let cp = (w & 0x07) << 18 | (w << 4 & 0x3f000) | (w >> 10 & 0xfc0) | (w >> 24 & 0x3f);
        if w & 0xc0c0_c0f8 != 0x8080_80f0 || !(0x1_0000..=0x10_ffff).contains(&cp) {
            return None;
        }
        4
    };
    s.get(len..)
}

/// The length of the UTF-8 character at the start of `s`, byte by byte, by the
/// ranges of Unicode's table 3-7.
fn utf8_len_bytewise(s: &[u8]) -> Option<usize> {
    let within = |i: usize, lo: u8, hi: u8| s.get(i).is_some_and(|c| (lo..=hi).contains(c));
    let (len, lo, hi) = match *s.first()? {
        0xc2..=0xdf => return within(1, 0x80, 0xbf).then_some(2),
        0xe0 => (3, 0xa0, 0xbf),
        0xe1..=0xec | 0xee..=0xef => (3, 0x80, 0xbf),
        0xed => (3, 0x80, 0x9f),
        0xf0 => (4, 0x90, 0xbf),
        0xf1..=0xf3 => (4, 0x80, 0xbf),
        0xf4 => (4, 0x80, 0x8f),
        _ => return None,
    };
    let ok = within(1, lo, hi) && within(2, 0x80, 0xbf) && (len == 3 || within(3, 0x80, 0xbf));
    ok.then_some(len)
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

    /// The string scan as it was, a byte at a time, on a body already known to be
    /// UTF-8: the end of the string at 0 (past its closing quote), or the offset of
    /// the first offending byte.
    fn bytewise_string(b: &[u8]) -> Result<usize, At> {
        let mut p = 1;
        let mut next = || {
            let c = b.get(p).copied();
            if c.is_some() {
                p += 1;
            }
            (c, p)
        };
        loop {
            match next() {
                (None, p) => return Err(p),
                (Some(b'"'), p) => return Ok(p),
                (Some(b'\\'), _) => match next() {
                    (Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't'), _) => {}
                    (Some(b'u'), _) => {
                        for _ in 0..4 {
                            match next() {
                                (Some(c), _) if c.is_ascii_hexdigit() => {}
                                (_, p) => return Err(p - 1),
                            }
                        }
                    }
                    (_, p) => return Err(p - 1),
                },
                (Some(0x00..=0x1f), p) => return Err(p - 1),
                (Some(_), _) => {}
            }
        }
    }

    /// The scan of the string at the start of `b` (a `"`) as [`Scanner::string`]
    /// does it: the end of the string, or the offset of the first offending byte.
    fn string_at_start(b: &[u8]) -> Result<usize, At> {
        let mut s = Scanner {
            b,
            p: 0,
            counted: &[],
            tally: Tally::default(),
        };
        s.string().map(|()| s.p)
    }

    /// Checks the string scan of `b` against the bytewise scan and
    /// `std::str::from_utf8`: the same end or error, except that bytes that are not
    /// UTF-8 before that point are the error, at the first of them.
    fn check_string(b: &[u8]) {
        let bytewise = bytewise_string(b);
        let decided_at = match bytewise {
            Ok(end) => end - 1,
            Err(at) => at,
        };
        let expected = match std::str::from_utf8(b) {
            Err(e) if e.valid_up_to() < decided_at => Err(e.valid_up_to()),
            _ => bytewise,
        };
        assert_eq!(
            string_at_start(b),
            expected,
            "{:?}",
            String::from_utf8_lossy(b)
        );
        // The whole body decides like the string does, when the string is all of
        // `b` or fails at a byte of it before its last (what follows a shorter
        // string is the grammar's business, and the `}` after `b` would go on an
        // unfinished string or escape).
        let body = [br#"{"k":"#.as_slice(), b, b"}"].concat();
        let expected = match (expected, std::str::from_utf8(&body)) {
            (_, Err(_)) => Err(BodyError::InvalidUtf8),
            (Ok(end), _) if end == b.len() => Ok(()),
            (Err(at), _) if at + 1 < b.len() => Err(BodyError::Malformed(at + 5)),
            _ => return,
        };
        assert_eq!(
            scan(&body).map(|_| ()),
            expected,
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }

    /// What may end a run of plain text, and what may not: each kind of byte the
    /// scan handles, valid and not, cut short, and plain bytes next to the flagged
    /// ones (`#` and `]` are what a borrow can flag, DEL and space the edges).
    const SPECIALS: &[&[u8]] = &[
        b"\"",
        b"\\n",
        b"\\\"",
        b"\\\\",
        b"\\/",
        b"\\u00e9",
        b"\\uD83E\\udd80",
        b"\\x",
        b"\\u12g4",
        b"\\",
        b"\\u12",
        b"\x00",
        b"\x01",
        b"\n",
        b"\x1f",
        b" ",
        b"!",
        b"#",
        b"]",
        b"\"#",
        b"\\]",
        b"\x7f",
        "\u{e9}".as_bytes(),
        "\u{2603}".as_bytes(),
        "\u{1f980}".as_bytes(),
        "\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}".as_bytes(),
        "\u{e9}\u{65e5}\u{672c}\u{8a9e}x".as_bytes(),
        b"\x80",
        b"\xbf",
        b"\xc0\x80",
        b"\xc1\xbf",
        b"\xc3",
        b"\xc3a",
        b"\xe0\x80\x80",
        b"\xe0\x9f\xbf",
        b"\xed\xa0\x80",
        b"\xed\xbf\xbf",
        b"\xe2\x98",
        b"\xe2\x98a",
        b"\xf0\x8f\xbf\xbf",
        b"\xf4\x90\x80\x80",
        b"\xf5\x80\x80\x80",
        b"\xf0\x9f\xa6",
        b"\xff",
        b"\xfe",
    ];

    #[test]
    fn special_bytes_at_every_offset_of_a_run() {
        for len in 0..40 {
            for at in 0..=len {
                for special in SPECIALS {
                    let mut b = vec![b'"'];
                    b.extend(std::iter::repeat(b'a').take(at));
                    b.extend_from_slice(special);
                    b.extend(std::iter::repeat(b'z').take(len - at));
                    // The string ending at the end of the buffer, with its quote
                    // and without, and with one more special after it.
                    check_string(&b);
                    b.push(b'"');
                    check_string(&b);
                    b.pop();
                    for other in SPECIALS {
                        let mut two = b.clone();
                        two.extend_from_slice(other);
                        two.push(b'"');
                        check_string(&two);
                    }
                }
            }
        }
    }

    #[test]
    fn every_utf8_sequence_of_up_to_three_bytes_and_the_four_byte_leads() {
        let mut seqs: Vec<Vec<u8>> = Vec::new();
        for lead in 0x80..=0xffu8 {
            for second in 0..=0xffu8 {
                seqs.push(vec![lead, second]);
                if (0xe0..=0xef).contains(&lead) {
                    for third in 0..=0xffu8 {
                        seqs.push(vec![lead, second, third]);
                    }
                }
                if lead >= 0xf0 {
                    for tail in [[0x80, 0x80], [0xbf, 0xbf], [0x80, b'a'], [0xc0, 0x80]] {
                        seqs.push(vec![lead, second, tail[0], tail[1]]);
                    }
                }
            }
        }
        for seq in seqs {
            // The word-at-a-time decoding, and byte by byte at the end of the body.
            let b = [b"\"".as_slice(), &seq, b"\"abc"].concat();
            assert_eq!(
                string_at_start(&b).is_ok(),
                std::str::from_utf8(&seq).is_ok(),
                "{seq:x?}"
            );
            let b = [b"\"".as_slice(), &seq].concat();
            let expected = match std::str::from_utf8(&seq) {
                Ok(_) => b.len(),
                Err(e) => e.valid_up_to() + 1,
            };
            assert_eq!(string_at_start(&b), Err(expected), "{seq:x?} at the end");
        }
    }

    #[test]
    fn the_word_mask_flags_every_byte_to_handle_and_nothing_before_the_first() {
        // Every byte value at every position of a plain word, and after each of
        // the bytes that borrow.
        for at in 0..8 {
            for x in 0..=0xffu8 {
                for before in [b'a', b'"', b'\\', b'\x00', b'\x1f', 0x80, b'#', b']'] {
                    let mut w = [b'a'; 8];
                    w[at] = x;
                    if at > 0 {
                        w[at - 1] = before;
                    }
                    let m = stops(u64::from_le_bytes(w));
                    let first = w.iter().position(|&c| is_stop(c));
                    assert_eq!(first.map(|_| first_flagged(m)), first, "{w:x?}");
                    assert_eq!(m == 0, first.is_none(), "{w:x?}");
                    for (i, &c) in w.iter().enumerate() {
                        if is_stop(c) {
                            assert_ne!(m >> (8 * i + 7) & 1, 0, "{w:x?} byte {i}");
                        }
                    }
                    assert_eq!(m & !HIGH, 0);
                }
            }
        }
    }

    #[test]
    fn a_refused_body_that_is_not_utf8_is_refused_as_such_wherever_the_fault() {
        for bad in [
            &b"{\"a\":01,\"b\":\"\xff\"}"[..],
            b"{\"a\"}\xff",
            b"{\"a\":1}\xff",
            b"{\xff}",
            b"\xff{}",
            b"[\"\xc3\"]",
            b"{\"a\":1,\"a\":\"\xed\xa0\x80\"}",
            b"{\"a\":\"\\x\xe2\x98\"}",
            b"{\"a\":\"\x01\xf4\x90\x80\x80\"}",
            b"{\"a\":\"x\xc0\x80",
        ] {
            assert_eq!(scan(bad), Err(BodyError::InvalidUtf8), "{bad:x?}");
        }
        // And UTF-8 alone decides nothing else: these fail as they did.
        assert_eq!(scan(b"{\"a\":01}"), Err(BodyError::Malformed(6)));
        assert_eq!(
            scan(b"{\"a\":1,\"a\":\"\xc3\xa9\"}"),
            Err(BodyError::DuplicateKey("a".into()))
        );
    }

    #[test]
    fn many_keys_are_compared_one_by_one_then_hashed_alike() {
        let body = |keys: &[String]| {
            let members: Vec<String> = keys.iter().map(|k| format!("\"{k}\":0")).collect();
            format!("{{{}}}", members.join(","))
        };
        for n in [1, 2, FEW_KEYS - 1, FEW_KEYS, FEW_KEYS + 1, FEW_KEYS + 2, 40] {
            let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            let all = body(&keys);
            assert_eq!(scan(all.as_bytes()).unwrap().members.len(), n);
            // A duplicate of every earlier key, in every position, also folded.
            for later in 0..=n {
                for earlier in 0..n {
                    for spelled in [keys[earlier].clone(), keys[earlier].to_uppercase()] {
                        let mut dup = keys.clone();
                        dup.insert(later, spelled.clone());
                        let expected = if later <= earlier {
                            // The copy comes first: the original is the duplicate.
                            keys[earlier].clone()
                        } else {
                            spelled
                        };
                        assert_eq!(
                            scan(body(&dup).as_bytes()),
                            Err(BodyError::DuplicateKey(expected)),
                            "{n} keys, k{earlier} again at {later}"
                        );
                    }
                }
            }
        }
    }
}
