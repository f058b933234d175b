//! The path policy: which request paths get a directive in which format
//! (`inject.paths`), which are forwarded untouched (`inject.pass_paths`), and what
//! happens to a body on any other path (`inject.other_paths`).
//!
//! Every pattern is normalised by [`crate::path::normalise`] and parsed into a
//! [`Pattern`] here, at configure time, like the request paths it is compared with,
//! once per request; nothing is normalised or parsed twice. A pattern matches a
//! normalised path that **ends with it, segment for segment**: `/chat/completions`
//! matches `/v1/chat/completions` and `/openai/deployments/d/chat/completions`, not
//! `/v1/xchat/completions` nor `/v1/chat/completions/x`. A segment of a pattern is
//! one of:
//!
//! - text, matched exactly (after normalisation, so in any case): `completions`;
//! - `{name}`, any one segment: `/model/{id}/converse` matches
//!   `/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse`;
//! - `{name}` followed by text, any segment that ends with that text (the text alone
//!   included): `/{model}:generateContent` matches `/v1beta/models/gemini-2.5-flash:generateContent`,
//!   `/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent`,
//!   but not `…:generateContentX` nor `…:generateContent/x`.
//!
//! The name is for the reader (letters, digits, `_`); `{` may stand only at the start
//! of a segment and `}` only after its name. `:` is an ordinary character for the
//! normaliser, so a verb is part of its segment, and a path that continues after it
//! (`…:generateContent/..`, `…:generateContent/x`) is no such segment (or no path at all).
//!
//! Injection patterns are tried first, most specific first: more segments first, then
//! more literal text, then by the pattern's text; so a path that is both an injection
//! and a pass path gets the directive (injecting is never a way around it), and of two
//! injection patterns the operator's narrower one wins.
//!
//! Pass patterns match the same way, by suffix, and deliberately **not** their
//! sub-paths when a body comes with them: the sub-paths of `/models` that a client
//! sends a body to are generation calls elsewhere (Gemini
//! `/v1beta/models/{m}:generateContent`, Replicate `/v1/models/{o}/{m}/predictions`,
//! Hugging Face `/models/{m}`). The sub-paths OpenAI serves (`GET`/`DELETE
//! /v1/models/{m}`) are bodiless and pass whatever their path. A pass path that stands
//! under an injection pattern (`/v1/chat/completions/models`) is not passed either.
//!
//! Matching allocates nothing: a pattern without parameters is one suffix test of the
//! normalised path, one with parameters a walk over its last segments. This module
//! must never match a path it could not normalise ([`Route::Unclear`]); a spelling no
//! pattern matches is [`Route::Other`], refused unless `inject.other_paths` passes it.

use serde_json::Value;

use super::read::{choice, err, type_name, Section};
use super::ConfigError;
use crate::inject::Format;
use crate::path::{normalise, Unclear};

/// `inject.paths` when not given: path pattern → format (SPEC §5), normalised and
/// parsed at configure time.
///
/// `/v1/messages` rather than `/messages`, so that OpenAI's `/v1/threads/{id}/messages`
/// is not read as an Anthropic request. The Gemini verbs match any last segment ending
/// with them (Gemini API `models/…` and `tunedModels/…`, Vertex publisher models and
/// endpoints). Vertex's `countTokens` takes a `systemInstruction` and is `gemini`; the
/// Gemini API's has none outside `generateContentRequest`, hence its own format.
/// Bedrock model ids hold `:` (`…-v1:0`), which a segment may; an ARN id arrives with
/// its `/` escaped, which the normaliser decodes, so the ARN spellings (one `/`) have
/// patterns of their own.
pub const DEFAULT_FORMAT_PATHS: &[(&str, Format)] = &[
    ("/chat/completions", Format::OpenAiChat),
    ("/api/chat", Format::OpenAiChat),
    ("/completions", Format::OpenAiCompletions),
    ("/responses", Format::OpenAiResponses),
    ("/responses/input_tokens", Format::OpenAiResponses),
    ("/v1/messages", Format::AnthropicMessages),
    ("/v1/messages/count_tokens", Format::AnthropicMessages),
    ("/v1/messages/batches", Format::AnthropicBatches),
    (
        "/publishers/anthropic/models/{model}:rawPredict",
        Format::AnthropicMessages,
    ),
    (
        "/publishers/anthropic/models/{model}:streamRawPredict",
        Format::AnthropicMessages,
    ),
    ("/{model}:generateContent", Format::Gemini),
    ("/{model}:streamGenerateContent", Format::Gemini),
    (
        "/publishers/google/models/{model}:countTokens",
        Format::Gemini,
    ),
    ("/{model}:countTokens", Format::GeminiCountTokens),
    ("/model/{id}/converse", Format::BedrockConverse),
    ("/model/{id}/converse-stream", Format::BedrockConverse),
    ("/model/{arn}/{id}/converse", Format::BedrockConverse),
    ("/model/{arn}/{id}/converse-stream", Format::BedrockConverse),
    ("/api/generate", Format::OllamaGenerate),
];

/// `inject.pass_paths` when not given: endpoints with a body but no prompt to direct.
pub const DEFAULT_PASS_PATHS: &[&str] = &["/models", "/embeddings", "/moderations"];

/// A configured path pattern, normalised and parsed (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The normalised pattern, parameter names included.
    text: String,
    /// Its segments, first to last.
    segments: Vec<Segment>,
    /// No parameter: `text` is matched by a suffix test.
    literal: bool,
}

/// One segment of a [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// This text exactly.
    Text(String),
    /// `{name}`: any segment.
    Any,
    /// `{name}` and this text: any segment ending with it.
    EndsWith(String),
}

impl Segment {
    fn matches(&self, segment: &str) -> bool {
        match self {
            Segment::Text(t) => segment == t,
            Segment::Any => true,
            Segment::EndsWith(t) => segment.ends_with(t.as_str()),
        }
    }

    fn literal_len(&self) -> usize {
        match self {
            Segment::Text(t) | Segment::EndsWith(t) => t.len(),
            Segment::Any => 0,
        }
    }
}

impl Pattern {
    /// Parses a normalised pattern (`/` followed by non-empty segments).
    fn parse(normalised: &str) -> Result<Pattern, &'static str> {
        let mut segments = Vec::new();
        for segment in normalised.split('/').skip(1) {
            segments.push(match segment.strip_prefix('{') {
                None if segment.contains(['{', '}']) => {
                    return Err("a {parameter} must start its segment")
                }
                None => Segment::Text(segment.to_string()),
                Some(rest) => {
                    let Some((name, tail)) = rest.split_once('}') else {
                        return Err("a {parameter} needs its closing }");
                    };
                    if name.is_empty()
                        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err("a {parameter} is named by letters, digits and _");
                    }
                    if tail.contains(['{', '}']) {
                        return Err("a segment has at most one {parameter}");
                    }
                    if tail.is_empty() {
                        Segment::Any
                    } else {
                        Segment::EndsWith(tail.to_string())
                    }
                }
            });
        }
        let literal = segments.iter().all(|s| matches!(s, Segment::Text(_)));
        Ok(Pattern {
            text: normalised.to_string(),
            segments,
            literal,
        })
    }

    /// The normalised pattern.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the normalised `path` ends with this pattern, segment for segment.
    pub fn matches(&self, path: &str) -> bool {
        if self.literal {
            // A normalised pattern starts with `/` and a normalised path has no empty
            // segment, so a plain suffix test is segment-aligned.
            return path.ends_with(self.text.as_str());
        }
        let mut segments = path.rsplit('/');
        self.segments.iter().rev().all(|pattern| {
            // The path's first item is the empty text before its leading `/`.
            segments
                .next()
                .is_some_and(|s| !s.is_empty() && pattern.matches(s))
        })
    }

    /// Whether the pattern stands in `path` at segment boundaries: some leading
    /// segments of `path` end with it.
    fn matches_within(&self, path: &str) -> bool {
        path.match_indices('/')
            .filter_map(|(at, _)| path.get(..at))
            .chain([path])
            .any(|leading| self.matches(leading))
    }

    /// Sort key, greatest first: more segments, then more literal text.
    fn specificity(&self) -> (usize, usize) {
        (
            self.segments.len(),
            self.segments.iter().map(Segment::literal_len).sum(),
        )
    }
}

impl PartialEq<&str> for Pattern {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

/// `inject.other_paths`: what a body on a path that is no format and not passed gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherPaths {
    /// Answer 404 `unsupported_path`: an endpoint the filter does not know may be a
    /// generation endpoint, and would get no directive.
    Refuse,
    /// Forward untouched.
    Pass,
}

/// What a request path is, for the configured policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// An injection path: the directive goes into the body in this format.
    Inject(Format),
    /// An `inject.pass_paths` path: forwarded untouched.
    Pass,
    /// Any other path: `inject.other_paths` decides.
    Other,
    /// A path that cannot be read with certainty: never matched loosely.
    Unclear(Unclear),
}

/// The three `inject.*` path fields, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPolicy {
    /// `inject.paths`: pattern → format, most specific first.
    pub formats: Vec<(Pattern, Format)>,
    /// `inject.pass_paths`.
    pub pass: Vec<Pattern>,
    /// `inject.other_paths`.
    pub other: OtherPaths,
}

impl PathPolicy {
    /// What `raw` (a `:path`, query included) is: normalised once, then matched.
    pub fn route(&self, raw: &str) -> Route {
        let path = match normalise(raw) {
            Ok(path) => path,
            Err(why) => return Route::Unclear(why),
        };
        if let Some((_, format)) = self.formats.iter().find(|(p, _)| p.matches(&path)) {
            return Route::Inject(*format);
        }
        // `/v1/chat/completions/models` is no models listing: an upstream that
        // routes by prefix (a Go ServeMux subtree, an Express mount) would run it as
        // a generation. A pass path under an injection pattern is not passed.
        let under_a_format = self.formats.iter().any(|(p, _)| p.matches_within(&path));
        if !under_a_format && self.pass.iter().any(|p| p.matches(&path)) {
            return Route::Pass;
        }
        Route::Other
    }
}

/// Reads `paths`, `pass_paths` and `other_paths` of the `inject` section.
pub(super) fn read(inject: &mut Section<'_>) -> Result<PathPolicy, ConfigError> {
    let formats = read_formats(inject)?;
    let pass = read_pass(inject)?;
    let other = choice(
        &inject.field_path("other_paths"),
        &inject.string("other_paths", "refuse")?,
        &[("refuse", OtherPaths::Refuse), ("pass", OtherPaths::Pass)],
    )?;
    Ok(PathPolicy {
        formats,
        pass,
        other,
    })
}

/// `inject.paths`: an object of path pattern → format name.
fn read_formats(inject: &mut Section<'_>) -> Result<Vec<(Pattern, Format)>, ConfigError> {
    let field = inject.field_path("paths");
    let entries: Vec<(String, String, Format)> = match inject.take("paths") {
        None => DEFAULT_FORMAT_PATHS
            .iter()
            .map(|(p, f)| (format!("{field}.{p}"), p.to_string(), *f))
            .collect(),
        Some(Value::Object(map)) => {
            let mut out = Vec::with_capacity(map.len());
            for (pattern, format) in map {
                let item = format!("{field}.{pattern}");
                let Value::String(name) = format else {
                    return Err(err(
                        &item,
                        format!("expected a format name, got {}", type_name(&format)),
                    ));
                };
                let format = choice(&item, &name, Format::NAMES)?;
                out.push((item, pattern, format));
            }
            out
        }
        Some(other) => {
            return Err(err(
                &field,
                format!("expected an object, got {}", type_name(&other)),
            ))
        }
    };
    let mut formats: Vec<(Pattern, Format)> = Vec::with_capacity(entries.len());
    for (item, pattern, format) in entries {
        let pattern = pattern_of(&item, &pattern)?;
        // Parameter names aside, the same pattern twice is one path with two formats.
        if formats.iter().any(|(p, _)| p.segments == pattern.segments) {
            return Err(err(&item, "the same path as another entry once normalised"));
        }
        formats.push((pattern, format));
    }
    // Most specific first: of two literal patterns that match one path, one contains
    // the other and has more segments; with parameters, more literal text is narrower.
    formats.sort_by(|a, b| {
        b.0.specificity()
            .cmp(&a.0.specificity())
            .then_with(|| a.0.text.cmp(&b.0.text))
    });
    Ok(formats)
}

/// `inject.pass_paths`: an array of path patterns.
fn read_pass(inject: &mut Section<'_>) -> Result<Vec<Pattern>, ConfigError> {
    let field = inject.field_path("pass_paths");
    match inject.take("pass_paths") {
        None => DEFAULT_PASS_PATHS
            .iter()
            .map(|p| pattern_of(&field, p))
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let item_field = format!("{field}[{i}]");
                match item {
                    Value::String(p) => pattern_of(&item_field, p),
                    other => Err(err(
                        &item_field,
                        format!("expected a path, got {}", type_name(other)),
                    )),
                }
            })
            .collect(),
        Some(other) => Err(err(
            &field,
            format!("expected an array of paths, got {}", type_name(&other)),
        )),
    }
}

/// A configured pattern, normalised as request paths are, then parsed. It must name
/// at least one segment: `/` would match nothing but the root, which is no endpoint.
fn pattern_of(field: &str, raw: &str) -> Result<Pattern, ConfigError> {
    if !raw.starts_with('/') || raw.contains(['?', '#']) {
        return Err(err(field, "a path must start with / and have no query"));
    }
    let pattern = normalise(raw).map_err(|why| err(field, format!("the path {why}")))?;
    if pattern == "/" {
        return Err(err(field, "a path must name at least one segment"));
    }
    Pattern::parse(&pattern).map_err(|why| err(field, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(raw: &str) -> Pattern {
        Pattern::parse(&normalise(raw).unwrap()).unwrap()
    }

    #[test]
    fn segments_are_text_parameters_or_parameters_with_a_tail() {
        let p = pattern("/Models/{Model}:generateContent");
        assert_eq!(p.as_str(), "/models/{model}:generatecontent");
        assert_eq!(
            p.segments,
            [
                Segment::Text("models".into()),
                Segment::EndsWith(":generatecontent".into())
            ]
        );
        assert!(!p.literal);
        assert_eq!(
            pattern("/model/{id}/converse").segments,
            [
                Segment::Text("model".into()),
                Segment::Any,
                Segment::Text("converse".into())
            ]
        );
        assert!(pattern("/chat/completions").literal);
        for (bad, why) in [
            ("/a{x}", "start its segment"),
            ("/a}", "start its segment"),
            ("/{x", "closing"),
            ("/{}", "named"),
            ("/{a-b}", "named"),
            ("/{a}{b}", "at most one"),
            ("/{a}:x}", "at most one"),
        ] {
            let e = Pattern::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn matching_is_by_whole_last_segments() {
        let verb = pattern("/{model}:generateContent");
        for (path, hit) in [
            ("/v1beta/models/gemini:generatecontent", true),
            ("/gemini:generatecontent", true),
            ("/v1beta/models/:generatecontent", true),
            ("/a:b:generatecontent", true),
            ("/v1beta/models/gemini:generatecontentx", false),
            ("/v1beta/models/gemini:generatecontent/x", false),
            ("/v1beta/models/geminigeneratecontent", false),
            ("/", false),
        ] {
            assert_eq!(verb.matches(path), hit, "{path}");
        }
        let converse = pattern("/model/{id}/converse");
        for (path, hit) in [
            ("/model/m/converse", true),
            ("/x/model/anthropic.claude-v1:0/converse", true),
            ("/model/converse", false),
            ("/converse", false),
            ("/models/m/converse", false),
            ("/model/a/b/converse", false),
            ("/model/m/converse/x", false),
        ] {
            assert_eq!(converse.matches(path), hit, "{path}");
        }
        assert!(converse.matches_within("/model/m/converse/models"));
        assert!(converse.matches_within("/model/m/converse"));
        assert!(!converse.matches_within("/model/m/conversex/models"));
        assert!(pattern("/chat/completions").matches_within("/v1/chat/completions/models"));
        assert!(!pattern("/chat/completions").matches_within("/v1/chat/completionsx/models"));
    }

    #[test]
    fn more_specific_patterns_sort_first() {
        let mut all: Vec<Pattern> = [
            "/{m}:counttokens",
            "/publishers/google/models/{m}:counttokens",
            "/completions",
            "/chat/completions",
            "/{a}/b",
            "/a/{b}",
            "/model/{id}/converse",
        ]
        .iter()
        .map(|p| pattern(p))
        .collect();
        all.sort_by(|a, b| {
            b.specificity()
                .cmp(&a.specificity())
                .then_with(|| a.text.cmp(&b.text))
        });
        let order: Vec<&str> = all.iter().map(Pattern::as_str).collect();
        assert_eq!(
            order,
            [
                "/publishers/google/models/{m}:counttokens",
                "/model/{id}/converse",
                "/chat/completions",
                "/a/{b}",
                "/{a}/b",
                "/{m}:counttokens",
                "/completions",
            ]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The plain reading of a pattern: its segments are the path's last ones.
        fn reference(pattern: &[Segment], path: &str) -> bool {
            let segments: Vec<&str> = path.split('/').skip(1).filter(|s| !s.is_empty()).collect();
            segments.len() >= pattern.len()
                && segments[segments.len() - pattern.len()..]
                    .iter()
                    .zip(pattern)
                    .all(|(s, p)| p.matches(s))
        }

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof!["[ab:]{1,3}", Just("{x}".to_string()), "\\{x\\}[:b]{1,2}"]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn matches_like_the_reference(
                pattern in prop::collection::vec(segment(), 1..4),
                path in prop::collection::vec("[ab:]{1,3}", 0..6),
            ) {
                let p = Pattern::parse(&format!("/{}", pattern.join("/"))).unwrap();
                let path = format!("/{}", path.join("/"));
                prop_assert_eq!(p.matches(&path), reference(&p.segments, &path), "{} {}", p.as_str(), path);
                // The suffix test of literal patterns agrees with the segment walk.
                let walked = Pattern { literal: false, ..p.clone() };
                prop_assert_eq!(p.matches(&path), walked.matches(&path));
            }
        }
    }
}
