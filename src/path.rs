//! The request path as an upstream will route it: `:path` normalised once per request
//! (and every configured path pattern once, at configure time) so that one spelling of
//! an LLM endpoint cannot reach the upstream as another, undirected.
//!
//! Upstreams differ in how they read a path: ASGI servers (vLLM, SGLang, LiteLLM)
//! decode percent-escapes before routing and Starlette redirects a trailing `/`,
//! Java servers drop `;params` (`..;/`), some routers fold case or merge `//`, and
//! Envoy's own `normalize_path` turns `\` into `/`. [`normalise`] applies all of these
//! at once, so every rewrite makes *more* spellings match an injection pattern, never
//! fewer; what it cannot read one way for certain it refuses ([`Unclear`]) rather than
//! guess. The rules, in order:
//!
//! 1. the query string and the fragment are dropped (from the first raw `?` or `#`);
//! 2. the path must start with `/` (`*` and absolute forms are [`Unclear::NotOrigin`]);
//! 3. each `%XX` is decoded once, as ASGI servers do; `%` not followed by two hex
//!    digits is [`Unclear::InvalidEscape`]. An escape that decodes to `%` is
//!    [`Unclear::EscapedPercent`] (a second decoding further on could turn `%2573`
//!    into `s`), and one that decodes to `?` or `#` is [`Unclear::EscapedDelimiter`]
//!    (a hop that decodes and re-parses would cut the path there);
//! 4. every byte, raw or decoded, must be printable ASCII (`!` … `~`): controls, NUL,
//!    space, DEL and non-ASCII are [`Unclear::Byte`] (some routers fold `ſ` to `s`);
//! 5. `\` separates segments like `/`;
//! 6. in each segment, `;` and what follows it up to the next separator are dropped;
//! 7. empty segments are dropped: `//` is merged and a trailing `/` goes;
//! 8. a `.` or `..` segment (after 6, so `..;x` too) is [`Unclear::DotSegment`]: no
//!    client sends one on purpose, and resolving it would pick one reading of a path
//!    that upstreams read in two;
//! 9. ASCII letters are folded to lower case.
//!
//! The result is `/` followed by the segments joined by `/`, or `/` alone. It is never
//! longer than the input, so [`normalise`] allocates once, the input's length; it has
//! no indexing and no unchecked arithmetic, and never panics.
//!
//! Pure: no proxy-wasm, unit-tested natively.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fmt;
use std::str::Bytes;

/// Why a path cannot be read with certainty. A request with a body on such a path is
/// refused; which reason it was is for tests and logs, never for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unclear {
    /// Not an origin-form path starting with `/` (`*`, `http://…`, empty).
    NotOrigin,
    /// `%` not followed by two hex digits.
    InvalidEscape,
    /// An escape decoding to `%`: a second decoding could make another path of it.
    EscapedPercent,
    /// An escape decoding to `?` or `#`: a hop that decodes and re-parses cuts there.
    EscapedDelimiter,
    /// A byte outside printable ASCII, raw or decoded.
    Byte,
    /// A `.` or `..` segment.
    DotSegment,
}

impl fmt::Display for Unclear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unclear::NotOrigin => "does not start with /",
            Unclear::InvalidEscape => "has a % not followed by two hex digits",
            Unclear::EscapedPercent => "has an escape that decodes to %",
            Unclear::EscapedDelimiter => "has an escape that decodes to ? or #",
            Unclear::Byte => "has a byte that is not printable ASCII",
            Unclear::DotSegment => "has a . or .. segment",
        })
    }
}

/// `raw` (a `:path`, query included) as an upstream will route it; see the module
/// documentation for the rules.
pub fn normalise(raw: &str) -> Result<String, Unclear> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let mut bytes = path.bytes();
    if bytes.next() != Some(b'/') {
        return Err(Unclear::NotOrigin);
    }
    let mut out = Segments::with_capacity(path.len());
    while let Some(b) = bytes.next() {
        if b == b'%' {
            out.push_decoded(decode_escape(&mut bytes)?)?;
        } else {
            out.push(b)?;
        }
    }
    out.finish()
}

/// The byte of the escape whose `%` was just read.
fn decode_escape(bytes: &mut Bytes<'_>) -> Result<u8, Unclear> {
    let hi = bytes.next().and_then(hex_value);
    let lo = bytes.next().and_then(hex_value);
    match (hi, lo) {
        // hi < 16, so the shift is exact.
        (Some(hi), Some(lo)) => Ok(hi.wrapping_shl(4) | lo),
        _ => Err(Unclear::InvalidEscape),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// The normalised path being built: complete segments, each preceded by `/`, then
/// the current segment from `start` on.
struct Segments {
    out: String,
    start: usize,
    in_params: bool,
}

impl Segments {
    fn with_capacity(capacity: usize) -> Segments {
        let mut out = String::with_capacity(capacity);
        out.push('/');
        Segments {
            out,
            start: 1,
            in_params: false,
        }
    }

    /// A byte that came from an escape: the delimiters it could spell are unclear
    /// (raw `%`, `?` and `#` never get here: they start an escape or end the path).
    fn push_decoded(&mut self, b: u8) -> Result<(), Unclear> {
        match b {
            b'%' => Err(Unclear::EscapedPercent),
            b'?' | b'#' => Err(Unclear::EscapedDelimiter),
            _ => self.push(b),
        }
    }

    fn push(&mut self, b: u8) -> Result<(), Unclear> {
        match b {
            b'/' | b'\\' => self.end_segment(),
            b';' => {
                self.in_params = true;
                Ok(())
            }
            b'!'..=b'~' => {
                if !self.in_params {
                    self.out.push(char::from(b.to_ascii_lowercase()));
                }
                Ok(())
            }
            _ => Err(Unclear::Byte),
        }
    }

    /// Closes the current segment: an empty one is dropped, a dot segment refused.
    fn end_segment(&mut self) -> Result<(), Unclear> {
        match self.out.get(self.start..).unwrap_or("") {
            "" => {}
            "." | ".." => return Err(Unclear::DotSegment),
            _ => self.out.push('/'),
        }
        self.start = self.out.len();
        self.in_params = false;
        Ok(())
    }

    fn finish(mut self) -> Result<String, Unclear> {
        self.end_segment()?;
        // The `/` end_segment left after the last segment; the root keeps its own.
        if self.out.len() > 1 {
            self.out.pop();
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_of_one_endpoint_normalise_to_it() {
        for raw in [
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/chat/completions//",
            "/v1//chat/completions",
            "//v1/chat///completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/chat/completion%73",
            "/v1/chat/completion%53",
            "/%76%31/chat/completions",
            "/V1/CHAT/COMPLETIONS",
            "/v1/Chat/Completions?x=/y",
            "/v1/chat/completions;x=1",
            "/v1;a=b/chat;c/completions;d=e/",
            "/v1/chat/completions%3Bx",
            "/v1\\chat\\completions",
            "/v1/chat%5Ccompletions",
            "/v1/;x/chat/completions",
            "/v1/chat/completions?",
            "/v1/chat/completions#frag",
            "/v1/chat/completions?a=%zz",
        ] {
            assert_eq!(
                normalise(raw).as_deref(),
                Ok("/v1/chat/completions"),
                "{raw}"
            );
        }
    }

    #[test]
    fn the_root_and_plain_paths() {
        for (raw, want) in [
            ("/", "/"),
            ("//", "/"),
            ("/;x", "/"),
            ("/?q", "/"),
            ("/a", "/a"),
            ("/a.b/...", "/a.b/..."),
            (
                "/models/gemini-pro:generateContent",
                "/models/gemini-pro:generatecontent",
            ),
            ("/a%2B%7e", "/a+~"),
        ] {
            assert_eq!(normalise(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn what_cannot_be_read_for_certain_is_unclear() {
        use Unclear::*;
        for (raw, why) in [
            ("", NotOrigin),
            ("*", NotOrigin),
            ("?/v1/chat/completions", NotOrigin),
            ("http://h/v1/chat/completions", NotOrigin),
            ("v1/chat/completions", NotOrigin),
            ("/v1/chat/completions%", InvalidEscape),
            ("/v1/chat/completions%7", InvalidEscape),
            ("/v1/chat/completion%zz", InvalidEscape),
            ("/v1/chat/completion%7g", InvalidEscape),
            ("/v1/chat/completion%+73", InvalidEscape),
            ("/v1/chat/completion%2573", EscapedPercent),
            ("/v1/chat/completion%25", EscapedPercent),
            ("/v1/chat/completions%3Fx", EscapedDelimiter),
            ("/v1/chat/completions%23", EscapedDelimiter),
            ("/v1/chat/completions%00", Byte),
            ("/v1/chat/completions%0a", Byte),
            ("/v1/chat/completions%20", Byte),
            ("/v1/chat/completions%7F", Byte),
            ("/v1/chat/completions\u{7f}", Byte),
            ("/v1/chat/completion\u{17f}", Byte),
            ("/v1/chat/completion%C5%BF", Byte),
            ("/v1/chat /completions", Byte),
            ("/v1/chat\t/completions", Byte),
            ("/v1/models/../chat/completions", DotSegment),
            ("/v1/./chat/completions", DotSegment),
            ("/v1/chat/completions/.", DotSegment),
            ("/v1/chat/completions/..", DotSegment),
            ("/v1/%2e%2E/chat/completions", DotSegment),
            ("/v1/..;x/chat/completions", DotSegment),
            ("/v1\\..\\chat", DotSegment),
            ("/.", DotSegment),
        ] {
            assert_eq!(normalise(raw), Err(why), "{raw}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn pathlike() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    Just("/".to_string()),
                    Just("//".to_string()),
                    Just("\\".to_string()),
                    Just(";".to_string()),
                    Just(".".to_string()),
                    Just("%".to_string()),
                    Just("%2F".to_string()),
                    Just("%25".to_string()),
                    Just("%73".to_string()),
                    Just("?".to_string()),
                    "[a-zA-Z]{1,4}",
                    "%[0-9a-fA-F]{2}",
                    any::<char>().prop_map(String::from),
                ],
                0..12,
            )
            .prop_map(|parts| format!("/{}", parts.concat()))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            /// Whatever comes in: no panic, and a result in the canonical shape that
            /// normalising again leaves alone, never longer than the input.
            #[test]
            fn normalised_paths_are_canonical(raw in prop_oneof![pathlike(), ".{0,24}"]) {
                if let Ok(p) = normalise(&raw) {
                    prop_assert!(p.starts_with('/'));
                    prop_assert!(p == "/" || !p.ends_with('/'));
                    prop_assert!(!p.contains("//"));
                    prop_assert!(p.bytes().all(|b| b.is_ascii_graphic()));
                    prop_assert!(!p.contains(['%', ';', '\\', '?', '#']));
                    prop_assert!(!p.bytes().any(|b| b.is_ascii_uppercase()));
                    prop_assert!(!p.split('/').any(|s| s == "." || s == ".."));
                    prop_assert!(p.len() <= raw.len().max(1));
                    prop_assert_eq!(normalise(&p), Ok(p.clone()));
                }
            }
        }
    }
}
