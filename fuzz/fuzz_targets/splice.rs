//! Fuzzes the JSON scanner and splicer with arbitrary bodies and directives, in
//! every format, with `inject.cache_control` off and on.
//!
//! Input: the first byte picks the format (`% 9`, in the order of `FORMATS`) and
//! `inject.cache_control` (`/ 9 % 2`), the bytes up to the first NUL are the
//! directive (lossy UTF-8), the rest is the body.
//!
//! Properties, checked against serde_json and a plain reference reader:
//! - nothing panics;
//! - the escaped directive reads back, as a JSON string, as the directive;
//! - a body is accepted only if it is JSON (grammar and UTF-8), and refused as
//!   malformed only if it is not: the scanner is neither looser nor stricter;
//! - an accepted body has unique top-level keys as a real parser decodes them
//!   (a duplicate is a way around the directive);
//! - each refusal names what is there: a nested duplicate is in an object under the
//!   member it names, a case variant or both spellings are keys of some object;
//! - the output is JSON that rescans, holds every byte of the body in order (only a
//!   replaced `null` may go), and equals the body with the directive inserted by a
//!   reference implementation of the README's injection table, member order, number
//!   spelling and duplicate keys included.
//!
//! The grammar reference is serde_json's `IgnoredAny`, which validates without
//! building values: no depth limit, no float range, lone surrogate escapes allowed —
//! the three places where `serde_json::Value` refuses valid JSON (`1e400`, nesting
//! deeper than 128, `"\ud800"`) and the scanner rightly accepts. The meaning reference
//! is `Tree`, a reader of valid JSON written here that keeps what `Value` loses
//! (duplicates, order, numbers as spelled).
//!
//! `make fuzz` runs it from the committed seeds (`fuzz/seeds/splice/`, one per shape
//! of each format) with the dictionary `fuzz/splice.dict`, for `FUZZ_SECONDS`.
#![no_main]

use ibex_directive::escape::escape_json_str;
use ibex_directive::inject::{splice, Format, Options};
use ibex_directive::json::{fold_case, scan, BodyError};
use libfuzzer_sys::fuzz_target;

mod json_keys;
use json_keys::top_level_keys;
use serde::de::IgnoredAny;

const PREFIX: &str = r#"{"role":"system","content":""#;

/// Selector order: the first three as before, so older seeds keep their format.
const FORMATS: [Format; 9] = [
    Format::OpenAiChat,
    Format::OpenAiResponses,
    Format::AnthropicMessages,
    Format::OpenAiCompletions,
    Format::AnthropicBatches,
    Format::Gemini,
    Format::GeminiCountTokens,
    Format::BedrockConverse,
    Format::OllamaGenerate,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = FORMATS[usize::from(selector) % FORMATS.len()];
    let cache_control = (usize::from(selector) / FORMATS.len()) % 2 == 1;
    let (directive, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    let directive = String::from_utf8_lossy(directive);
    let escaped = escape_json_str(&directive);
    let read_back: Option<String> = serde_json::from_str(&format!("\"{escaped}\"")).ok();
    assert_eq!(
        read_back.as_deref(),
        Some(&*directive),
        "escaping does not read back"
    );

    let utf8 = std::str::from_utf8(body).is_ok();
    let grammar = utf8 && is_json(body);
    let tree = if grammar { Tree::read(body) } else { None };
    let options = Options {
        message_prefix: PREFIX,
        cache_control, max_output: usize::MAX,
    };
    match splice(format, body, &options, &escaped) {
        Ok(out) => {
            assert!(grammar, "accepted a body that is not JSON");
            if let Some(keys) = top_level_keys(body) {
                assert!(unique(&keys), "accepted duplicate top-level keys {keys:?}");
            }
            check_output(format, cache_control, body, tree, &out, &directive);
        }
        Err(BodyError::InvalidUtf8) => assert!(!utf8, "valid UTF-8 refused as invalid"),
        Err(BodyError::Malformed(_)) => {
            assert!(utf8 && !grammar, "valid JSON refused as malformed")
        }
        Err(BodyError::NotAnObject) => {
            assert!(grammar, "non-JSON refused as not an object");
            assert_ne!(
                first_non_ws(body),
                Some(b'{'),
                "object refused as not an object"
            );
        }
        Err(BodyError::DuplicateKey(key)) => {
            // Found while scanning: the rest of the body may not even be JSON.
            if let Some(keys) = top_level_keys(body) {
                assert!(
                    !unique(&keys),
                    "no duplicate among {keys:?}, refused for {key:?}"
                );
            }
        }
        Err(BodyError::DuplicateNestedKey { within, key }) => {
            if let Some(tree) = &tree {
                assert!(
                    tree.any_object(&mut |path, obj| path == Some(within) && !unique_members(obj)),
                    "no object under {within:?} has a duplicate, refused for {key:?}"
                );
            }
        }
        Err(BodyError::BothSpellings(a, b)) => {
            assert!(grammar, "non-JSON refused for its shape");
            if let Some(tree) = &tree {
                assert!(
                    tree.any_object(&mut |_, obj| has_folded(obj, a) && has_folded(obj, b)),
                    "no object has both {a:?} and {b:?}"
                );
            }
        }
        Err(BodyError::CaseVariant(name)) => {
            assert!(grammar, "non-JSON refused for its shape");
            if let Some(tree) = &tree {
                assert!(
                    tree.any_object(&mut |_, obj| obj
                        .iter()
                        .any(|(k, _)| k != name && fold_case(k) == fold_case(name))),
                    "no case variant of {name:?} in any object"
                );
            }
        }
        Err(
            BodyError::MissingMember(_)
            | BodyError::WrongType { .. }
            | BodyError::Unsupported { .. },
        ) => {
            assert!(grammar, "non-JSON refused for its shape");
            assert_eq!(first_non_ws(body), Some(b'{'));
        }
        // The options here allow any size.
        Err(BodyError::Oversized) => panic!("refused as oversized without a limit"),
    }
});

fn check_output(
    format: Format,
    cache_control: bool,
    body: &[u8],
    tree: Option<Tree>,
    out: &[u8],
    directive: &str,
) {
    assert!(is_json(out), "output is not JSON");
    scan(out).expect("the output must rescan");
    assert!(
        only_inserted(body, out),
        "bytes of the body were dropped, changed or moved"
    );
    if let (Some(before), Some(after)) = (tree, Tree::read(out)) {
        assert_eq!(
            after,
            reference(format, cache_control, before, directive),
            "output differs from the reference insertion"
        );
    }
}

/// A JSON value as written: members in order with their duplicates, numbers as
/// spelled, strings decoded (a lone surrogate as U+FFFD, on both sides alike).
#[derive(Debug, Clone, PartialEq)]
enum Tree {
    Obj(Vec<(String, Tree)>),
    Arr(Vec<Tree>),
    Str(String),
    Num(String),
    Lit(&'static str),
}

impl Tree {
    /// Reads a body already known to be JSON; None when it nests too deep to recurse.
    fn read(bytes: &[u8]) -> Option<Tree> {
        let mut r = Reader { b: bytes, p: 0 };
        let t = r.value(0)?;
        Some(t)
    }

    /// Whether `f` holds for some object, given the key of the member it is the
    /// value of (or whose array holds it) — None for the top level.
    fn any_object(&self, f: &mut dyn FnMut(Option<&str>, &[(String, Tree)]) -> bool) -> bool {
        fn walk(
            t: &Tree,
            under: Option<&str>,
            f: &mut dyn FnMut(Option<&str>, &[(String, Tree)]) -> bool,
        ) -> bool {
            match t {
                Tree::Obj(members) => {
                    f(under, members) || members.iter().any(|(k, v)| walk(v, Some(k), f))
                }
                Tree::Arr(items) => items.iter().any(|v| walk(v, under, f)),
                _ => false,
            }
        }
        walk(self, None, f)
    }

    fn obj_mut(&mut self) -> &mut Vec<(String, Tree)> {
        match self {
            Tree::Obj(m) => m,
            other => panic!("not an object: {other:?}"),
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Tree> {
        self.obj_mut()
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn get(&self, key: &str) -> Option<&Tree> {
        match self {
            Tree::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn text(s: impl Into<String>) -> Tree {
        Tree::Str(s.into())
    }

    fn obj(members: &[(&str, Tree)]) -> Tree {
        Tree::Obj(
            members
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    /// Keys (folded) equal to `name` anywhere inside, duplicates included.
    fn count_keys(&self, name: &str) -> usize {
        match self {
            Tree::Obj(m) => m
                .iter()
                .map(|(k, v)| usize::from(fold_case(k) == name) + v.count_keys(name))
                .sum(),
            Tree::Arr(a) => a.iter().map(|v| v.count_keys(name)).sum(),
            _ => 0,
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl Reader<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.p), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.p += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<Tree> {
        if depth > 2000 {
            return None;
        }
        self.ws();
        let t = match self.b[self.p] {
            b'{' => {
                self.p += 1;
                let mut members = Vec::new();
                self.ws();
                if self.b[self.p] == b'}' {
                    self.p += 1;
                } else {
                    loop {
                        self.ws();
                        let k = self.string();
                        self.ws();
                        self.p += 1; // ':'
                        let v = self.value(depth + 1)?;
                        members.push((k, v));
                        self.ws();
                        self.p += 1;
                        if self.b[self.p - 1] == b'}' {
                            break;
                        }
                    }
                }
                Tree::Obj(members)
            }
            b'[' => {
                self.p += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b[self.p] == b']' {
                    self.p += 1;
                } else {
                    loop {
                        items.push(self.value(depth + 1)?);
                        self.ws();
                        self.p += 1;
                        if self.b[self.p - 1] == b']' {
                            break;
                        }
                    }
                }
                Tree::Arr(items)
            }
            b'"' => Tree::Str(self.string()),
            b't' => self.lit("true"),
            b'f' => self.lit("false"),
            b'n' => self.lit("null"),
            _ => {
                let start = self.p;
                while matches!(
                    self.b.get(self.p),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.p += 1;
                }
                Tree::Num(String::from_utf8_lossy(&self.b[start..self.p]).into_owned())
            }
        };
        Some(t)
    }

    fn lit(&mut self, word: &'static str) -> Tree {
        self.p += word.len();
        Tree::Lit(word)
    }

    /// A string at `p`, decoded; escapes as RFC 8259 says, UTF-16 pairs joined.
    fn string(&mut self) -> String {
        self.p += 1;
        let mut units: Vec<u16> = Vec::new();
        let mut out = String::new();
        let flush = |units: &mut Vec<u16>, out: &mut String| {
            out.extend(char::decode_utf16(units.drain(..)).map(|c| c.unwrap_or('\u{fffd}')));
        };
        loop {
            match self.b[self.p] {
                b'"' => {
                    self.p += 1;
                    flush(&mut units, &mut out);
                    return out;
                }
                b'\\' => {
                    let e = self.b[self.p + 1];
                    self.p += 2;
                    if e == b'u' {
                        let hex = std::str::from_utf8(&self.b[self.p..self.p + 4]).unwrap();
                        units.push(u16::from_str_radix(hex, 16).unwrap());
                        self.p += 4;
                        continue;
                    }
                    flush(&mut units, &mut out);
                    out.push(match e {
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        other => char::from(other),
                    });
                }
                _ => {
                    flush(&mut units, &mut out);
                    let rest = std::str::from_utf8(&self.b[self.p..]).unwrap();
                    let c = rest.chars().next().unwrap();
                    out.push(c);
                    self.p += c.len_utf8();
                }
            }
        }
    }
}

/// The body with `d` inserted as the README's injection table says, new members
/// first in their object, new elements first in their array.
fn reference(format: Format, cache_control: bool, mut body: Tree, d: &str) -> Tree {
    let prefixed = |s: &str| Tree::text(format!("{d}\n\n{s}"));
    let set_or_prefix = |obj: &mut Tree, key: &str| match obj.get_mut(key) {
        Some(Tree::Str(s)) => *s = format!("{d}\n\n{s}"),
        Some(v) => *v = Tree::text(d),
        None => obj.obj_mut().insert(0, (key.into(), Tree::text(d))),
    };
    match format {
        Format::OpenAiChat => match body.get_mut("messages") {
            Some(Tree::Arr(a)) => a.insert(
                0,
                Tree::obj(&[("role", Tree::text("system")), ("content", Tree::text(d))]),
            ),
            other => panic!("messages {other:?}"),
        },
        Format::OpenAiResponses => set_or_prefix(&mut body, "instructions"),
        Format::OllamaGenerate => set_or_prefix(&mut body, "system"),
        Format::OpenAiCompletions => match body.get_mut("prompt") {
            Some(Tree::Str(s)) => *s = format!("{d}\n\n{s}"),
            Some(Tree::Arr(a)) => {
                for s in a {
                    let Tree::Str(text) = s else {
                        panic!("prompt element {s:?}")
                    };
                    *s = prefixed(text);
                }
            }
            other => panic!("prompt {other:?}"),
        },
        Format::AnthropicMessages => anthropic(&mut body, d, cache_control),
        Format::AnthropicBatches => match body.get_mut("requests") {
            Some(Tree::Arr(requests)) => {
                for r in requests {
                    anthropic(r.get_mut("params").expect("params"), d, cache_control);
                }
            }
            other => panic!("requests {other:?}"),
        },
        Format::Gemini => gemini(&mut body, d),
        Format::GeminiCountTokens => {
            let gcr = ["generateContentRequest", "generate_content_request"]
                .into_iter()
                .find(|k| matches!(body.get(k), Some(Tree::Obj(_))));
            let si = ["systemInstruction", "system_instruction"]
                .iter()
                .any(|k| body.get(k).is_some());
            match gcr {
                Some(k) => gemini(body.get_mut(k).expect("request"), d),
                None if si => gemini(&mut body, d),
                None => match body.get_mut("contents") {
                    Some(Tree::Arr(a)) => a.insert(
                        0,
                        Tree::obj(&[
                            ("role", Tree::text("user")),
                            (
                                "parts",
                                Tree::Arr(vec![Tree::obj(&[("text", Tree::text(d))])]),
                            ),
                        ]),
                    ),
                    other => panic!("contents {other:?}"),
                },
            }
        }
        Format::BedrockConverse => {
            let block = Tree::obj(&[("text", Tree::text(d))]);
            match body.get_mut("system") {
                Some(Tree::Arr(a)) => a.insert(0, block),
                Some(v) => *v = Tree::Arr(vec![block]),
                None => body
                    .obj_mut()
                    .insert(0, ("system".into(), Tree::Arr(vec![block]))),
            }
        }
    }
    body
}

fn anthropic(request: &mut Tree, d: &str, cache_control: bool) {
    let cached =
        cache_control && request.count_keys("cache_control") < 4 && request.count_keys("ttl") == 0;
    let block = |text: &str, cached: bool| {
        let mut members = vec![("type", Tree::text("text")), ("text", Tree::text(text))];
        if cached {
            members.push((
                "cache_control",
                Tree::obj(&[("type", Tree::text("ephemeral"))]),
            ));
        }
        Tree::obj(&members)
    };
    let new = match request.get_mut("system") {
        Some(Tree::Arr(a)) => {
            a.insert(0, block(d, cached));
            return;
        }
        Some(Tree::Str(s)) if !cached => Tree::text(format!("{d}\n\n{s}")),
        Some(Tree::Str(s)) if s.chars().all(blank) => {
            Tree::Arr(vec![block(&format!("{d}\n\n{s}"), true)])
        }
        Some(Tree::Str(s)) => Tree::Arr(vec![block(d, true), block(s, false)]),
        _ if cached => Tree::Arr(vec![block(d, true)]),
        _ => Tree::text(d),
    };
    match request.get_mut("system") {
        Some(v) => *v = new,
        None => request.obj_mut().insert(0, ("system".into(), new)),
    }
}

fn blank(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{180e}' | '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}'
        )
}

fn gemini(request: &mut Tree, d: &str) {
    let part = || Tree::obj(&[("text", Tree::text(d))]);
    let content = || Tree::obj(&[("parts", Tree::Arr(vec![part()]))]);
    let key = ["systemInstruction", "system_instruction"]
        .into_iter()
        .find(|k| request.get(k).is_some());
    let Some(key) = key else {
        request
            .obj_mut()
            .insert(0, ("systemInstruction".into(), content()));
        return;
    };
    let si = request.get_mut(key).expect("present");
    match si {
        Tree::Obj(_) => match si.get_mut("parts") {
            Some(Tree::Arr(parts)) => parts.insert(0, part()),
            Some(v) => *v = Tree::Arr(vec![part()]),
            None => si
                .obj_mut()
                .insert(0, ("parts".into(), Tree::Arr(vec![part()]))),
        },
        _ => *si = content(),
    }
}

/// Whether `body` is a subsequence of `out` once both lose their `null` literals
/// (a replaced `null` is the one thing a splice may remove).
fn only_inserted(body: &[u8], out: &[u8]) -> bool {
    let (body, out) = (without_nulls(body), without_nulls(out));
    let mut rest = out.iter();
    body.iter().all(|b| rest.any(|o| o == b))
}

/// `json` with the `null` literals outside strings taken out.
fn without_nulls(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped, mut i) = (false, false, 0);
    while i < json.len() {
        let b = json[i];
        if in_string {
            in_string = escaped || b != b'"';
            escaped = !escaped && b == b'\\';
        } else if json[i..].starts_with(b"null") {
            i += 4;
            continue;
        } else {
            in_string = b == b'"';
        }
        out.push(b);
        i += 1;
    }
    out
}

/// JSON grammar only (serde_json's `IgnoredAny`: iterative, any depth, any number).
fn is_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok() && serde_json::from_slice::<IgnoredAny>(bytes).is_ok()
}

fn first_non_ws(bytes: &[u8]) -> Option<u8> {
    bytes
        .iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// No two keys equal after case folding (Go upstreams match keys case-insensitively).
fn unique(keys: &[String]) -> bool {
    let mut sorted: Vec<String> = keys.iter().map(|k| fold_case(k).into_owned()).collect();
    sorted.sort();
    sorted.windows(2).all(|w| w[0] != w[1])
}

fn unique_members(members: &[(String, Tree)]) -> bool {
    unique(&members.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
}

fn has_folded(members: &[(String, Tree)], name: &str) -> bool {
    members.iter().any(|(k, _)| fold_case(k) == fold_case(name))
}
