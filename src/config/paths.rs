//! The path policy: which request paths get a directive in which format
//! (`inject.paths`), which are forwarded untouched (`inject.pass_paths`), and what
//! happens to a body on any other path (`inject.other_paths`).
//!
//! Every pattern is normalised by [`crate::path::normalise`] here, at configure time,
//! like the request paths it is compared with, once per request; nothing is
//! normalised twice. A pattern matches a normalised path that **ends with it, segment
//! for segment**: `/chat/completions` matches `/v1/chat/completions` and
//! `/openai/deployments/d/chat/completions`, not `/v1/xchat/completions` nor
//! `/v1/chat/completions/x`. (A normalised pattern starts with `/` and a normalised
//! path has no empty segment, so a plain suffix test is segment-aligned.)
//!
//! Injection patterns are tried first, longest first, so a path that is both an
//! injection and a pass path gets the directive: injecting is never a way around it.
//!
//! Pass patterns match the same way, by suffix, and deliberately **not** their
//! sub-paths when a body comes with them: the sub-paths of `/models` that a client
//! sends a body to are generation calls elsewhere (Gemini
//! `/v1beta/models/{m}:generateContent`, Replicate `/v1/models/{o}/{m}/predictions`,
//! Hugging Face `/models/{m}`). The sub-paths OpenAI serves (`GET`/`DELETE
//! /v1/models/{m}`) are bodiless and pass whatever their path.

use serde_json::Value;

use super::read::{choice, err, type_name, Section};
use super::ConfigError;
use crate::inject::Format;
use crate::path::{normalise, Unclear};

/// `inject.paths` when not given: normalised suffix → format (SPEC §5, for the
/// formats this filter knows). `/v1/messages` rather than `/messages`, so that
/// OpenAI's `/v1/threads/{id}/messages` is not read as an Anthropic request.
pub const DEFAULT_FORMAT_PATHS: &[(&str, Format)] = &[
    ("/chat/completions", Format::OpenAiChat),
    ("/responses", Format::OpenAiResponses),
    ("/responses/input_tokens", Format::OpenAiResponses),
    ("/v1/messages", Format::AnthropicMessages),
    ("/v1/messages/count_tokens", Format::AnthropicMessages),
];

/// `inject.pass_paths` when not given: endpoints with a body but no prompt to direct.
pub const DEFAULT_PASS_PATHS: &[&str] = &["/models", "/embeddings", "/moderations"];

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

/// The three `inject.*` path fields, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPolicy {
    /// `inject.paths`: normalised suffix → format, longest suffix first.
    pub formats: Vec<(String, Format)>,
    /// `inject.pass_paths`: normalised suffixes.
    pub pass: Vec<String>,
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
        if let Some((_, format)) = self.formats.iter().find(|(p, _)| path.ends_with(p)) {
            return Route::Inject(*format);
        }
        // `/v1/chat/completions/models` is no models listing: an upstream that
        // routes by prefix (a Go ServeMux subtree, an Express mount) would run it as
        // a generation. A pass path under an injection pattern is not passed.
        let under_a_format = self
            .formats
            .iter()
            .any(|(p, _)| contains_segments(&path, p));
        if !under_a_format && self.pass.iter().any(|p| path.ends_with(p.as_str())) {
            return Route::Pass;
        }
        Route::Other
    }
}

/// Whether `pattern` (a normalised path starting with `/`) stands in `path` at
/// segment boundaries: followed by `/` or the end.
fn contains_segments(path: &str, pattern: &str) -> bool {
    path.match_indices(pattern).any(|(at, _)| {
        let end = at.saturating_add(pattern.len());
        matches!(path.as_bytes().get(end), None | Some(b'/'))
    })
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
fn read_formats(inject: &mut Section<'_>) -> Result<Vec<(String, Format)>, ConfigError> {
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
    let mut formats: Vec<(String, Format)> = Vec::with_capacity(entries.len());
    for (item, pattern, format) in entries {
        let pattern = pattern_of(&item, &pattern)?;
        if formats.iter().any(|(p, _)| *p == pattern) {
            return Err(err(&item, "the same path as another entry once normalised"));
        }
        formats.push((pattern, format));
    }
    // Longest first: of two matching suffixes one contains the other, and the longer
    // one is the operator's more specific choice.
    formats.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    Ok(formats)
}

/// `inject.pass_paths`: an array of path patterns.
fn read_pass(inject: &mut Section<'_>) -> Result<Vec<String>, ConfigError> {
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

/// A configured pattern, normalised as request paths are. It must name at least one
/// segment: `/` would match nothing but the root, which is no endpoint.
fn pattern_of(field: &str, raw: &str) -> Result<String, ConfigError> {
    if !raw.starts_with('/') || raw.contains(['?', '#']) {
        return Err(err(field, "a path must start with / and have no query"));
    }
    let pattern = normalise(raw).map_err(|why| err(field, format!("the path {why}")))?;
    if pattern == "/" {
        return Err(err(field, "a path must name at least one segment"));
    }
    Ok(pattern)
}
