//! Where a directive goes in each request format, and the splice that puts it there.
//!
//! The output is the input with bytes inserted, nothing else (a `null` the directive
//! replaces is the one exception): the body is validated by [`crate::json::scan`] or
//! [`crate::json::scan_with`] in one pass, the splicer of its format lists the
//! insertions (`Edit`s, in body order), and one copy of the body with them goes
//! out. The pieces are prepared earlier — the chat message prefix at configuration
//! time, the escaped directive at cache-fill time — so key order, whitespace,
//! number spelling and unknown fields all survive. This module must never
//! re-serialise a body, never build a document, and never return a body that lacks
//! the directive where the provider reads it: whatever it cannot place with
//! certainty is a [`BodyError`].
//!
//! | format | where the directive `D` goes |
//! |---|---|
//! | `openai_chat` | new first element of `messages`: `{"role":R,"content":D}` |
//! | `openai_responses` | `instructions`: `D` when absent or null, else `D + "\n\n" + existing` |
//! | `openai_completions` | `prompt` string → `D + "\n\n" + prompt`; array of strings → each element so; token arrays and anything else refused; `prompt_embeds` refused |
//! | `anthropic_messages` | `system`: absent or null → `D`; string → `D + "\n\n" + s`; array → new first block `{"type":"text","text":D}` |
//! | `anthropic_batches` | every `requests[i].params`, as `anthropic_messages` |
//! | `gemini` | `systemInstruction` (or `system_instruction`): absent or null → `{"parts":[{"text":D}]}`; object → new first element `{"text":D}` of its `parts` (added when absent or null) |
//! | `gemini_count_tokens` | inside `generateContentRequest` as `gemini`; else the top-level `systemInstruction` when there is one; else a new first element `{"role":"user","parts":[{"text":D}]}` of `contents` |
//! | `bedrock_converse` | `system`: absent or null → `[{"text":D}]`; array → new first element `{"text":D}` |
//! | `ollama_generate` | `system`: absent or null → `D`; string → `D + "\n\n" + s`; refused with a `suffix`, a `template` of its own or `raw` |
//!
//! A new member is inserted first in its object, right after `{`.
//!
//! **Spellings.** Every object the splicer reads a member of is read closely: its
//! keys are unique after decoding escapes and folding case, and the member it reads
//! in another case only (`"System"`, `"Parts"`) is refused, because Go's
//! `encoding/json` would take it. Gemini's parser takes `systemInstruction` and its
//! proto name `system_instruction` alike (and `generateContentRequest` /
//! `generate_content_request`): both present is refused.
//!
//! **Members that would undo the directive** are refused: Ollama's `suffix`,
//! `template` and `raw` (the model's template, which places `system`, is skipped or
//! replaced), vLLM's `prompt_embeds` (a prompt the text directive cannot reach), and
//! in Bedrock's `additionalModelRequestFields` the native fields that carry the
//! system prompt or the conversation of a model family (`system`, `messages`,
//! `prompt`, …), which Bedrock passes to the model beside what Converse built.
//!
//! **`inject.cache_control`** (Anthropic formats): the directive's block carries
//! `"cache_control":{"type":"ephemeral"}`, so the provider can cache the prefix up to
//! it. A string `system` then becomes blocks, `[{"type":"text","text":D,
//! "cache_control":…},{"type":"text","text":<the string, its bytes verbatim>}]` (a
//! blank string — empty or whitespace only, which Anthropic refuses as a block —
//! becomes one cached block `D + "\n\n" + s` instead), and an absent or null `system`
//! a one-block array. Anthropic allows four breakpoints per request and refuses a
//! request with more, and refuses a 5-minute breakpoint before a 1-hour one: the
//! directive's block is cached only when the request (a batch request: its
//! `params`) holds fewer than four members named `cache_control` and none named
//! `ttl`, counted at any depth, in any case, wherever they are (system blocks, tools,
//! messages' content blocks, tool results, the top level: more than Anthropic
//! counts, never fewer). Otherwise the directive goes in exactly as with the option off.

#![deny(clippy::indexing_slicing)]

use crate::json::{
    scan, scan_with, string_value, BodyError, Member, Object, Read, Shape, ValueKind,
};

/// A request format the filter knows how to inject into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI chat completions (also Azure, vLLM, Ollama): a new first element of
    /// `messages`.
    OpenAiChat,
    /// OpenAI Responses: `instructions`.
    OpenAiResponses,
    /// OpenAI legacy completions: `prompt`.
    OpenAiCompletions,
    /// Anthropic messages (also on Vertex): `system`.
    AnthropicMessages,
    /// Anthropic message batches: `system` of every `requests[i].params`.
    AnthropicBatches,
    /// Gemini API and Vertex `generateContent`: `systemInstruction`.
    Gemini,
    /// Gemini API `countTokens`: inside `generateContentRequest`, or `contents`.
    GeminiCountTokens,
    /// Bedrock Converse: `system`.
    BedrockConverse,
    /// Ollama `/api/generate`: `system`.
    OllamaGenerate,
}

impl Format {
    /// Every format with its configuration name.
    pub const NAMES: &'static [(&'static str, Format)] = &[
        ("openai_chat", Format::OpenAiChat),
        ("openai_responses", Format::OpenAiResponses),
        ("openai_completions", Format::OpenAiCompletions),
        ("anthropic_messages", Format::AnthropicMessages),
        ("anthropic_batches", Format::AnthropicBatches),
        ("gemini", Format::Gemini),
        ("gemini_count_tokens", Format::GeminiCountTokens),
        ("bedrock_converse", Format::BedrockConverse),
        ("ollama_generate", Format::OllamaGenerate),
    ];
}

/// What a splice takes from the configuration, borrowed for one request.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    /// [`crate::config::Config::chat_message_prefix`]: `{"role":"<inject.role>","content":"`.
    pub message_prefix: &'a str,
    /// `inject.cache_control`: Anthropic formats cache the directive's block.
    pub cache_control: bool,
    /// Largest body the splice may produce ([`crate::config::Config::max_spliced_bytes`]).
    /// Formats with one insertion per element (completions prompts, batch requests)
    /// multiply the directive: a small body of many empty elements must not become
    /// gigabytes (a wasm32 allocation over 2 GiB aborts the VM).
    pub max_output: usize,
}

/// Separator between the directive and text the client already had there.
const JOIN: &[u8] = b"\\n\\n";

/// Start of a text block whose text follows (Anthropic).
const BLOCK_OPEN: &[u8] = b"{\"type\":\"text\",\"text\":\"";
/// End of a text block, after its text.
const BLOCK_CLOSE: &[u8] = b"\"}";
/// End of a text block that is a cache breakpoint, after its text.
const CACHED_BLOCK_CLOSE: &[u8] = b"\",\"cache_control\":{\"type\":\"ephemeral\"}}";

/// Names counted for Anthropic's breakpoint limit: `cache_control` members, and `ttl`
/// members (a 1-hour breakpoint after ours would be refused; any TTL leaves ours out).
const BREAKPOINT_NAMES: &[&str] = &["cache_control", "ttl"];
/// Breakpoints Anthropic allows per request.
const MAX_BREAKPOINTS: u32 = 4;

static COMPLETIONS: Shape = Shape {
    members: &[("prompt", Read::Elements(&Shape::FLAT))],
};
static BATCH_REQUEST: Shape = Shape {
    members: &[("params", Read::Object(&Shape::FLAT))],
};
static BATCHES: Shape = Shape {
    members: &[("requests", Read::Elements(&BATCH_REQUEST))],
};
static GEMINI: Shape = Shape {
    members: &[
        ("systemInstruction", Read::Object(&Shape::FLAT)),
        ("system_instruction", Read::Object(&Shape::FLAT)),
    ],
};
static GEMINI_COUNT_TOKENS: Shape = Shape {
    members: &[
        ("generateContentRequest", Read::Object(&GEMINI)),
        ("generate_content_request", Read::Object(&GEMINI)),
        ("systemInstruction", Read::Object(&Shape::FLAT)),
        ("system_instruction", Read::Object(&Shape::FLAT)),
    ],
};
static BEDROCK: Shape = Shape {
    members: &[("additionalModelRequestFields", Read::Object(&Shape::FLAT))],
};

/// Native request fields of the model families Bedrock serves that carry the system
/// prompt or the whole conversation (Anthropic, Nova, Mistral, OpenAI: `system`,
/// `messages`; Llama, Mistral: `prompt`; Titan: `inputText`; Cohere: `preamble`,
/// `message`, `chat_history`), case folded. Passed through
/// `additionalModelRequestFields`, one could stand beside or instead of the
/// `system` Converse built from ours.
const BEDROCK_OVERRIDES: &[&str] = &[
    "system",
    "system_prompt",
    "messages",
    "prompt",
    "inputtext",
    "preamble",
    "message",
    "chat_history",
    // Cohere Command R: sends the message without the preamble Converse builds
    // from `system`.
    "raw_prompting",
];

/// Returns `body` with the directive inserted where `format` reads it.
///
/// `escaped` is the directive as stored in L1 (the inside of a JSON string literal).
pub fn splice(
    format: Format,
    body: &[u8],
    options: &Options<'_>,
    escaped: &str,
) -> Result<Vec<u8>, BodyError> {
    let d = escaped.as_bytes();
    let mut edits = Edits::default();
    match format {
        Format::OpenAiChat => chat(body, &scan(body)?, options.message_prefix, d, &mut edits)?,
        Format::OpenAiResponses => responses(body, &scan(body)?, d, &mut edits)?,
        Format::OpenAiCompletions => {
            completions(body, &scan_with(body, &COMPLETIONS, &[])?, d, &mut edits)?
        }
        Format::AnthropicMessages => {
            let top = if options.cache_control {
                scan_with(body, &Shape::FLAT, BREAKPOINT_NAMES)?
            } else {
                scan(body)?
            };
            anthropic(body, &top, d, options.cache_control, &mut edits)?
        }
        Format::AnthropicBatches => {
            let counted: &'static [&'static str] = if options.cache_control {
                BREAKPOINT_NAMES
            } else {
                &[]
            };
            let top = scan_with(body, &BATCHES, counted)?;
            batches(body, &top, d, options.cache_control, &mut edits)?
        }
        Format::Gemini => gemini(body, &scan_with(body, &GEMINI, &[])?, d, &mut edits)?,
        Format::GeminiCountTokens => gemini_count_tokens(
            body,
            &scan_with(body, &GEMINI_COUNT_TOKENS, &[])?,
            d,
            &mut edits,
        )?,
        Format::BedrockConverse => bedrock(body, &scan_with(body, &BEDROCK, &[])?, d, &mut edits)?,
        Format::OllamaGenerate => ollama_generate(body, &scan(body)?, d, &mut edits)?,
    }
    edits.apply(body, options.max_output)
}

/// vLLM (and TensorRT-LLM's OpenAI server) keep only the last `truncate_prompt_tokens`
/// tokens of the prompt, cutting from the left: exactly where the directive is.
fn refuse_left_truncation(body: &[u8], top: &Object<'_>) -> Result<(), BodyError> {
    if top
        .folded("truncate_prompt_tokens")
        .is_some_and(|m| m.value_kind(body) != ValueKind::Null)
    {
        return Err(BodyError::Unsupported {
            member: "truncate_prompt_tokens",
            reason: "a prompt truncated from the start would lose the directive",
        });
    }
    Ok(())
}

fn chat<'p>(
    body: &[u8],
    top: &Object<'_>,
    prefix: &'p str,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    refuse_left_truncation(body, top)?;
    let messages = top
        .target("messages")?
        .ok_or(BodyError::MissingMember("messages"))?;
    match messages.value_kind(body) {
        ValueKind::Array => {
            edits.push(prepend_element(
                body,
                messages,
                [prefix.as_bytes(), d, b"\"}"],
            ));
            Ok(())
        }
        _ => Err(BodyError::WrongType {
            member: "messages",
            expected: "an array",
        }),
    }
}

fn responses<'p>(
    body: &[u8],
    top: &Object<'_>,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    edits.push(match top.target("instructions")? {
        None => add_member(top, [b"\"instructions\":\"", d, b"\""]),
        Some(m) => match m.value_kind(body) {
            ValueKind::Null => replace_value(m, [b"\"", d, b"\""]),
            ValueKind::String => prefix_string(m, d),
            _ => {
                return Err(BodyError::WrongType {
                    member: "instructions",
                    expected: "a string or null",
                })
            }
        },
    });
    Ok(())
}

fn completions<'p>(
    body: &[u8],
    top: &Object<'_>,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    refuse_left_truncation(body, top)?;
    // vLLM generates from `prompt_embeds` as well as from `prompt`: no text reaches it.
    if top
        .folded("prompt_embeds")
        .is_some_and(|m| m.value_kind(body) != ValueKind::Null)
    {
        return Err(BodyError::Unsupported {
            member: "prompt_embeds",
            reason: "a prompt given as embeddings cannot carry the directive",
        });
    }
    const TEXT: &str =
        "a string or a non-empty array of strings (token arrays cannot carry the directive)";
    let prompt = top
        .target("prompt")?
        .ok_or(BodyError::MissingMember("prompt"))?;
    match (prompt.value_kind(body), prompt.elements()) {
        (ValueKind::String, _) => edits.push(prefix_string(prompt, d)),
        (ValueKind::Array, Some(elements)) if !elements.is_empty() => {
            for e in elements {
                if e.value_kind(body) != ValueKind::String {
                    return Err(BodyError::WrongType {
                        member: "prompt",
                        expected: TEXT,
                    });
                }
                edits.push(Edit::new(e.value_start.saturating_add(1), 0, [d, JOIN]));
            }
        }
        _ => {
            return Err(BodyError::WrongType {
                member: "prompt",
                expected: TEXT,
            })
        }
    }
    Ok(())
}

/// `system` of one Anthropic request: the body's top level, or a batch's `params`.
fn anthropic<'p>(
    body: &[u8],
    request: &Object<'_>,
    d: &'p [u8],
    cache_control: bool,
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    let cached =
        cache_control && request.tally.get(0) < MAX_BREAKPOINTS && request.tally.get(1) == 0;
    let system = request.target("system")?;
    let kind = system.map(|m| m.value_kind(body));
    match (system, kind, cached) {
        (None, _, false) => edits.push(add_member(request, [b"\"system\":\"", d, b"\""])),
        (None, _, true) => edits.push(add_member(
            request,
            [b"\"system\":[", BLOCK_OPEN, d, CACHED_BLOCK_CLOSE, b"]"],
        )),
        (Some(m), Some(ValueKind::Null), false) => edits.push(replace_value(m, [b"\"", d, b"\""])),
        (Some(m), Some(ValueKind::Null), true) => edits.push(replace_value(
            m,
            [b"[", BLOCK_OPEN, d, CACHED_BLOCK_CLOSE, b"]"],
        )),
        (Some(m), Some(ValueKind::String), false) => edits.push(prefix_string(m, d)),
        (Some(m), Some(ValueKind::String), true) if blank(body, m) => {
            // One cached block `D\n\n<s>`: a blank block of its own would be refused.
            edits.push(Edit::new(
                m.value_start,
                0,
                [b"[{\"type\":\"text\",\"text\":"],
            ));
            edits.push(prefix_string(m, d));
            edits.push(Edit::new(
                m.value_end,
                0,
                [b",\"cache_control\":{\"type\":\"ephemeral\"}}]"],
            ));
        }
        (Some(m), Some(ValueKind::String), true) => {
            // The client's string, its bytes verbatim, becomes the second block's text.
            edits.push(Edit::new(
                m.value_start,
                0,
                [
                    b"[",
                    BLOCK_OPEN,
                    d,
                    CACHED_BLOCK_CLOSE,
                    b",{\"type\":\"text\",\"text\":",
                ],
            ));
            edits.push(Edit::new(m.value_end, 0, [b"}]"]));
        }
        (Some(m), Some(ValueKind::Array), false) => {
            edits.push(prepend_element(body, m, [BLOCK_OPEN, d, BLOCK_CLOSE]))
        }
        (Some(m), Some(ValueKind::Array), true) => edits.push(prepend_element(
            body,
            m,
            [BLOCK_OPEN, d, CACHED_BLOCK_CLOSE],
        )),
        (Some(_), _, _) => {
            return Err(BodyError::WrongType {
                member: "system",
                expected: "a string, an array of content blocks, or null",
            })
        }
    }
    Ok(())
}

/// Whether the string value `m` is empty or whitespace only, as Anthropic judges a
/// text block (generously: controls and zero-width characters count as blank too).
fn blank(body: &[u8], m: &Member<'_>) -> bool {
    string_value(body, m.value_start, m.value_end).map_or(true, |s| s.chars().all(blank_char))
}

/// Python's `str.isspace` (Anthropic's judge, presumably) and Rust's `is_whitespace`
/// disagree on a few characters: take both, controls, and the zero-width ones.
fn blank_char(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{180e}' | '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}'
        )
}

fn batches<'p>(
    body: &[u8],
    top: &Object<'_>,
    d: &'p [u8],
    cache_control: bool,
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    let requests = top
        .target("requests")?
        .ok_or(BodyError::MissingMember("requests"))?;
    let elements = match (requests.value_kind(body), requests.elements()) {
        (ValueKind::Array, Some(elements)) => elements,
        _ => {
            return Err(BodyError::WrongType {
                member: "requests",
                expected: "an array of requests",
            })
        }
    };
    for request in elements {
        let request = request.object.as_ref().ok_or(BodyError::WrongType {
            member: "requests[]",
            expected: "an object",
        })?;
        let params = request
            .target("params")?
            .ok_or(BodyError::MissingMember("requests[].params"))?;
        match (params.value_kind(body), params.object()) {
            (ValueKind::Object, Some(params)) => anthropic(body, params, d, cache_control, edits)?,
            _ => {
                return Err(BodyError::WrongType {
                    member: "requests[].params",
                    expected: "an object",
                })
            }
        }
    }
    Ok(())
}

/// `systemInstruction` of a Gemini request: the body's top level, or a count's
/// `generateContentRequest`.
fn gemini<'p>(
    body: &[u8],
    request: &Object<'_>,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    const SI: &str = "systemInstruction";
    let Some(si) = one_of(request, SI, "system_instruction")? else {
        edits.push(add_member(
            request,
            [
                b"\"systemInstruction\":{\"parts\":[{\"text\":\"",
                d,
                b"\"}]}",
            ],
        ));
        return Ok(());
    };
    match (si.value_kind(body), si.object()) {
        // Proto JSON reads null as unset.
        (ValueKind::Null, _) => edits.push(replace_value(
            si,
            [b"{\"parts\":[{\"text\":\"", d, b"\"}]}"],
        )),
        (ValueKind::Object, Some(content)) => match content.target("parts")? {
            None => edits.push(add_member(
                content,
                [b"\"parts\":[{\"text\":\"", d, b"\"}]"],
            )),
            Some(parts) => match parts.value_kind(body) {
                ValueKind::Array => {
                    edits.push(prepend_element(body, parts, [b"{\"text\":\"", d, b"\"}"]))
                }
                ValueKind::Null => edits.push(replace_value(parts, [b"[{\"text\":\"", d, b"\"}]"])),
                _ => {
                    return Err(BodyError::WrongType {
                        member: "systemInstruction.parts",
                        expected: "an array of parts",
                    })
                }
            },
        },
        _ => {
            return Err(BodyError::WrongType {
                member: SI,
                expected: "an object (a Content with parts)",
            })
        }
    }
    Ok(())
}

/// The Gemini API's `countTokens` takes `contents`, or a whole `generateContentRequest`
/// (never both), and has no system instruction of its own; Vertex's takes a
/// `systemInstruction` beside `contents`. The count should include the directive
/// that generation will get: inside the request when there is one, else in the
/// system instruction when there is one, else as a leading user turn (the
/// directive's tokens, give or take the turn's framing).
fn gemini_count_tokens<'p>(
    body: &[u8],
    top: &Object<'_>,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    const GCR: &str = "generateContentRequest";
    if let Some(request) = one_of(top, GCR, "generate_content_request")? {
        match (request.value_kind(body), request.object()) {
            (ValueKind::Object, Some(request)) => return gemini(body, request, d, edits),
            (ValueKind::Null, _) => {}
            _ => {
                return Err(BodyError::WrongType {
                    member: GCR,
                    expected: "an object (a GenerateContentRequest)",
                })
            }
        }
    }
    if one_of(top, "systemInstruction", "system_instruction")?.is_some() {
        return gemini(body, top, d, edits);
    }
    let contents = top
        .target("contents")?
        .ok_or(BodyError::MissingMember("contents"))?;
    match contents.value_kind(body) {
        ValueKind::Array => {
            edits.push(prepend_element(
                body,
                contents,
                [b"{\"role\":\"user\",\"parts\":[{\"text\":\"", d, b"\"}]}"],
            ));
            Ok(())
        }
        _ => Err(BodyError::WrongType {
            member: "contents",
            expected: "an array of contents",
        }),
    }
}

/// The member spelled `camel` or `snake` (Proto JSON accepts both): None when
/// neither is there; refused when both are, or one only in another case.
fn one_of<'o, 'a>(
    obj: &'o Object<'a>,
    camel: &'static str,
    snake: &'static str,
) -> Result<Option<&'o Member<'a>>, BodyError> {
    match (obj.folded(camel), obj.folded(snake)) {
        (Some(_), Some(_)) => Err(BodyError::BothSpellings(camel, snake)),
        (Some(m), None) if m.key == camel => Ok(Some(m)),
        (Some(_), None) => Err(BodyError::CaseVariant(camel)),
        (None, Some(m)) if m.key == snake => Ok(Some(m)),
        (None, Some(_)) => Err(BodyError::CaseVariant(snake)),
        (None, None) => Ok(None),
    }
}

fn bedrock<'p>(
    body: &[u8],
    top: &Object<'_>,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    const EXTRA: &str = "additionalModelRequestFields";
    if let Some(extra) = top.target(EXTRA)?.and_then(|m| m.object()) {
        if extra
            .members
            .iter()
            .any(|m| BEDROCK_OVERRIDES.contains(&&*crate::json::fold_case(&m.key)))
        {
            return Err(BodyError::Unsupported {
                member: EXTRA,
                reason: "it names a native field that carries the system prompt or the conversation (system, messages, prompt, inputText, preamble, message, chat_history)",
            });
        }
    }
    edits.push(match top.target("system")? {
        None => add_member(top, [b"\"system\":[{\"text\":\"", d, b"\"}]"]),
        Some(m) => match m.value_kind(body) {
            ValueKind::Null => replace_value(m, [b"[{\"text\":\"", d, b"\"}]"]),
            ValueKind::Array => prepend_element(body, m, [b"{\"text\":\"", d, b"\"}"]),
            _ => {
                return Err(BodyError::WrongType {
                    member: "system",
                    expected: "an array of system content blocks",
                })
            }
        },
    });
    Ok(())
}

fn ollama_generate<'p>(
    body: &[u8],
    top: &Object<'_>,
    d: &'p [u8],
    edits: &mut Edits<'p>,
) -> Result<(), BodyError> {
    // Ollama decodes with Go's encoding/json: these are read in any case.
    let unset = |name: &str, off: &[u8]| {
        top.folded(name).map_or(true, |m| {
            m.value_kind(body) == ValueKind::Null
                || body.get(m.value_start..m.value_end) == Some(off)
        })
    };
    if !unset("suffix", b"\"\"") {
        return Err(BodyError::Unsupported {
            member: "suffix",
            reason: "Ollama leaves the system prompt out of a prompt with a suffix",
        });
    }
    if !unset("template", b"\"\"") {
        return Err(BodyError::Unsupported {
            member: "template",
            reason: "a template of the request's own decides whether the system prompt is used",
        });
    }
    if !unset("raw", b"false") {
        return Err(BodyError::Unsupported {
            member: "raw",
            reason: "Ollama applies no template, so no system prompt, in raw mode",
        });
    }
    edits.push(match top.target("system")? {
        None => add_member(top, [b"\"system\":\"", d, b"\""]),
        Some(m) => match m.value_kind(body) {
            ValueKind::Null => replace_value(m, [b"\"", d, b"\""]),
            ValueKind::String => prefix_string(m, d),
            _ => {
                return Err(BodyError::WrongType {
                    member: "system",
                    expected: "a string or null",
                })
            }
        },
    });
    Ok(())
}

/// Most pieces one edit is built of.
const PIECES: usize = 6;

/// One insertion: `pieces`, in order, at byte `at` of the body, in place of the
/// `replaces` bytes there (a `null`; 0 for a pure insertion).
#[derive(Debug, Clone, Copy)]
struct Edit<'p> {
    at: usize,
    replaces: usize,
    pieces: [&'p [u8]; PIECES],
    /// How many of `pieces` are set (an empty piece, an empty directive, is one).
    used: usize,
}

impl<'p> Edit<'p> {
    fn new<const N: usize>(at: usize, replaces: usize, pieces: [&'p [u8]; N]) -> Edit<'p> {
        debug_assert!(N <= PIECES);
        let mut all: [&'p [u8]; PIECES] = [b""; PIECES];
        for (slot, piece) in all.iter_mut().zip(pieces) {
            *slot = piece;
        }
        Edit {
            at,
            replaces,
            pieces: all,
            used: N,
        }
    }

    /// The edit with `piece` after its others.
    fn with(mut self, piece: &'p [u8]) -> Edit<'p> {
        if let Some(slot) = self.pieces.get_mut(self.used) {
            *slot = piece;
            self.used += 1;
        }
        debug_assert!(self.used <= PIECES, "an edit has at most PIECES pieces");
        self
    }

    fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }
}

/// Edits held inline: how many a request of one object needs at most.
const INLINE_EDITS: usize = 3;

/// The edits of one body, in body order: the first few inline (no allocation for
/// the formats with one request per body), the rest of a batch on the heap.
#[derive(Default)]
struct Edits<'p> {
    inline: [Option<Edit<'p>>; INLINE_EDITS],
    more: Vec<Edit<'p>>,
}

impl<'p> Edits<'p> {
    fn push(&mut self, edit: Edit<'p>) {
        match self.inline.iter_mut().find(|e| e.is_none()) {
            Some(slot) => *slot = Some(edit),
            None => self.more.push(edit),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Edit<'p>> {
        self.inline.iter().flatten().chain(&self.more)
    }

    /// The body with every edit made, in one allocation of the final size. Edits out
    /// of body order cannot be built by this module; were one to be, the body is
    /// refused as malformed (the fuzz target reports that), never mangled.
    fn apply(&self, body: &[u8], max_output: usize) -> Result<Vec<u8>, BodyError> {
        let total = self
            .iter()
            .try_fold(body.len(), |n, e| n.checked_add(e.len()))
            .filter(|&n| n <= max_output)
            .ok_or(BodyError::Oversized)?;
        let mut out = Vec::with_capacity(total);
        let mut copied = 0;
        for edit in self.iter() {
            let before = body
                .get(copied..edit.at)
                .ok_or(BodyError::Malformed(edit.at))?;
            out.extend_from_slice(before);
            for piece in edit.pieces {
                out.extend_from_slice(piece);
            }
            copied = edit.at.saturating_add(edit.replaces);
        }
        out.extend_from_slice(body.get(copied..).ok_or(BodyError::Malformed(copied))?);
        Ok(out)
    }
}

/// New first element of the array `m`, followed by a comma unless it was empty.
fn prepend_element<'p, const N: usize>(
    body: &[u8],
    m: &Member<'_>,
    element: [&'p [u8]; N],
) -> Edit<'p> {
    let at = m.value_start.saturating_add(1);
    let empty = body
        .get(at..m.value_end)
        .and_then(|inside| inside.iter().find(|b| !b.is_ascii_whitespace()))
        == Some(&b']');
    let edit = Edit::new(at, 0, element);
    if empty {
        edit
    } else {
        edit.with(b",")
    }
}

/// New first member of the object `obj`, followed by a comma unless it was empty.
fn add_member<'p, const N: usize>(obj: &Object<'_>, member: [&'p [u8]; N]) -> Edit<'p> {
    let edit = Edit::new(obj.open.saturating_add(1), 0, member);
    if obj.members.is_empty() {
        edit
    } else {
        edit.with(b",")
    }
}

/// `D\n\n` spliced right after the opening quote of the string `m`.
fn prefix_string<'p>(m: &Member<'_>, d: &'p [u8]) -> Edit<'p> {
    Edit::new(m.value_start.saturating_add(1), 0, [d, JOIN])
}

/// The value of `m` (a `null`) replaced by `pieces`.
fn replace_value<'p, const N: usize>(m: &Member<'_>, pieces: [&'p [u8]; N]) -> Edit<'p> {
    Edit::new(
        m.value_start,
        m.value_end.saturating_sub(m.value_start),
        pieces,
    )
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::escape::escape_json_str;
    use serde_json::{json, Value};

    const PREFIX: &str = r#"{"role":"system","content":""#;
    const OPTS: Options<'static> = Options {
        message_prefix: PREFIX,
        cache_control: false,
        max_output: usize::MAX,
    };

    fn chat(body: &str, directive: &str) -> Result<String, BodyError> {
        splice(
            Format::OpenAiChat,
            body.as_bytes(),
            &OPTS,
            &escape_json_str(directive),
        )
        .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn chat_directive_becomes_the_first_message_and_nothing_else_changes() {
        let body =
            r#"{"model":"m",  "messages": [ {"role":"user","content":"hi"} ], "temperature":1.50}"#;
        let out = chat(body, "Be terse.").unwrap();
        assert_eq!(
            out,
            r#"{"model":"m",  "messages": [{"role":"system","content":"Be terse."}, {"role":"user","content":"hi"} ], "temperature":1.50}"#
        );
    }

    #[test]
    fn chat_with_empty_messages_gets_no_trailing_comma() {
        assert_eq!(
            chat(r#"{"messages":[ ]}"#, "D").unwrap(),
            r#"{"messages":[{"role":"system","content":"D"} ]}"#
        );
    }

    #[test]
    fn escaped_and_non_ascii_directives_arrive_intact() {
        let directive = "Line 1\n\"quoted\" \\ tab\t é 日本 🦀 \u{1}";
        let out = chat(r#"{"messages":[{"role":"user","content":"x"}]}"#, directive).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["messages"][0],
            json!({"role":"system","content":directive})
        );
        assert_eq!(v["messages"][1]["content"], "x");
    }

    #[test]
    fn numbers_keep_their_spelling() {
        let body = r#"{"messages":[],"a":1e400,"b":-0.0,"c":1.0000000000000000001,"d":12345678901234567890123}"#;
        let out = chat(body, "D").unwrap();
        assert!(out.ends_with(
            r#","a":1e400,"b":-0.0,"c":1.0000000000000000001,"d":12345678901234567890123}"#
        ));
    }

    #[test]
    fn developer_role_comes_from_the_prefix() {
        let out = splice(
            Format::OpenAiChat,
            br#"{"messages":[]}"#,
            &Options {
                message_prefix: r#"{"role":"developer","content":""#,
                cache_control: false,
                max_output: usize::MAX,
            },
            "D",
        )
        .unwrap();
        assert_eq!(out, br#"{"messages":[{"role":"developer","content":"D"}]}"#);
    }

    #[test]
    fn refuses_what_it_cannot_inject_with_certainty() {
        assert_eq!(
            chat(r#"{"model":"m"}"#, "D"),
            Err(BodyError::MissingMember("messages"))
        );
        assert!(matches!(
            chat(r#"{"messages":{}}"#, "D"),
            Err(BodyError::WrongType { .. })
        ));
        assert!(matches!(
            chat(r#"{"messages":null}"#, "D"),
            Err(BodyError::WrongType { .. })
        ));
        assert!(matches!(
            chat(r#"{"messages":[],"messages":[]}"#, "D"),
            Err(BodyError::DuplicateKey(_))
        ));
        assert!(matches!(
            chat(r#"{"messages":[}"#, "D"),
            Err(BodyError::Malformed(_))
        ));
        assert_eq!(chat("[]", "D"), Err(BodyError::NotAnObject));
    }

    #[test]
    fn output_equals_a_reference_insertion() {
        let body = r#"{"model":"gpt","messages":[{"role":"user","content":[{"type":"text","text":"hé"}]},{"role":"assistant","content":null}],"stream":true,"x":{"y":[1,2]}}"#;
        let directive = "Always cite \"sources\".";
        let out = chat(body, directive).unwrap();
        let mut expected: Value = serde_json::from_str(body).unwrap();
        expected["messages"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"role":"system","content":directive}));
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), expected);
    }

    fn splice_str(format: Format, body: &str, directive: &str) -> Result<String, BodyError> {
        splice(format, body.as_bytes(), &OPTS, &escape_json_str(directive))
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn the_target_member_in_another_case_is_refused() {
        for (format, body) in [
            (Format::OpenAiChat, r#"{"Messages":[]}"#),
            (Format::OpenAiResponses, r#"{"INSTRUCTIONS":"x"}"#),
            (Format::AnthropicMessages, r#"{"System":"x","messages":[]}"#),
        ] {
            assert!(
                matches!(
                    splice_str(format, body, "D"),
                    Err(BodyError::CaseVariant(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn responses_instructions_are_set_or_prefixed() {
        let r = |b: &str| splice_str(Format::OpenAiResponses, b, "D \"q\"");
        assert_eq!(
            r(r#"{"model":"m","input":"hi"}"#).unwrap(),
            r#"{"instructions":"D \"q\"","model":"m","input":"hi"}"#
        );
        assert_eq!(r(r#"{}"#).unwrap(), r#"{"instructions":"D \"q\""}"#);
        assert_eq!(
            r(r#"{ "instructions" : null }"#).unwrap(),
            r#"{ "instructions" : "D \"q\"" }"#
        );
        assert_eq!(
            r(r#"{"instructions":"Be kind."}"#).unwrap(),
            r#"{"instructions":"D \"q\"\n\nBe kind."}"#
        );
        assert_eq!(
            r(r#"{"instructions":""}"#).unwrap(),
            r#"{"instructions":"D \"q\"\n\n"}"#
        );
        assert!(matches!(
            r(r#"{"instructions":["x"]}"#),
            Err(BodyError::WrongType {
                member: "instructions",
                ..
            })
        ));
        assert!(matches!(
            r(r#"{"instructions":"a","instructions":"b"}"#),
            Err(BodyError::DuplicateKey(_))
        ));
        let v: Value = serde_json::from_str(&r(r#"{"instructions":"Be kind."}"#).unwrap()).unwrap();
        assert_eq!(v["instructions"], "D \"q\"\n\nBe kind.");
    }

    #[test]
    fn anthropic_system_in_every_shape() {
        let a = |b: &str| splice_str(Format::AnthropicMessages, b, "D");
        assert_eq!(
            a(r#"{"model":"c","messages":[]}"#).unwrap(),
            r#"{"system":"D","model":"c","messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":null,"messages":[]}"#).unwrap(),
            r#"{"system":"D","messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":"Be kind.","messages":[]}"#).unwrap(),
            r#"{"system":"D\n\nBe kind.","messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":[],"messages":[]}"#).unwrap(),
            r#"{"system":[{"type":"text","text":"D"}],"messages":[]}"#
        );
        let blocks = r#"{"system":[ {"type":"text","text":"S","cache_control":{"type":"ephemeral"}} ],"messages":[]}"#;
        assert_eq!(
            a(blocks).unwrap(),
            r#"{"system":[{"type":"text","text":"D"}, {"type":"text","text":"S","cache_control":{"type":"ephemeral"}} ],"messages":[]}"#
        );
        assert!(matches!(
            a(r#"{"system":{"type":"text"}}"#),
            Err(BodyError::WrongType {
                member: "system",
                ..
            })
        ));
        assert!(matches!(
            a(r#"{"system":1}"#),
            Err(BodyError::WrongType { .. })
        ));
        assert!(matches!(
            a(r#"{"system":"a","\u0073ystem":"b"}"#),
            Err(BodyError::DuplicateKey(_))
        ));
    }

    fn cached(format: Format, body: &str, directive: &str) -> Result<String, BodyError> {
        let options = Options {
            message_prefix: PREFIX,
            cache_control: true,
            max_output: usize::MAX,
        };
        splice(
            format,
            body.as_bytes(),
            &options,
            &escape_json_str(directive),
        )
        .map(|v| String::from_utf8(v).unwrap())
    }

    fn wrong_type(r: Result<String, BodyError>, name: &str) -> bool {
        matches!(r, Err(BodyError::WrongType { member, .. }) if member == name)
    }

    fn unsupported(r: Result<String, BodyError>, name: &str) -> bool {
        matches!(r, Err(BodyError::Unsupported { member, .. }) if member == name)
    }

    #[test]
    fn completions_prompt_strings_are_prefixed() {
        let c = |b: &str| splice_str(Format::OpenAiCompletions, b, "D");
        assert_eq!(
            c(r#"{"model":"m","prompt":"Once","n":2}"#).unwrap(),
            r#"{"model":"m","prompt":"D\n\nOnce","n":2}"#
        );
        assert_eq!(
            c(r#"{"prompt": [ "a" , "" ,"c\"" ]}"#).unwrap(),
            r#"{"prompt": [ "D\n\na" , "D\n\n" ,"D\n\nc\"" ]}"#
        );
        assert_eq!(
            c(r#"{"prompt":"","prompt_embeds":null}"#).unwrap(),
            r#"{"prompt":"D\n\n","prompt_embeds":null}"#
        );
    }

    #[test]
    fn left_truncation_is_refused_for_chat_and_completions() {
        for body in [
            r#"{"messages":[],"truncate_prompt_tokens":8}"#,
            r#"{"messages":[],"Truncate_Prompt_Tokens":-1}"#,
        ] {
            assert!(
                unsupported(chat(body, "D"), "truncate_prompt_tokens"),
                "{body}"
            );
        }
        let c = |b: &str| splice_str(Format::OpenAiCompletions, b, "D");
        assert!(unsupported(
            c(r#"{"prompt":"a","truncate_prompt_tokens":8}"#),
            "truncate_prompt_tokens"
        ));
        assert!(chat(r#"{"messages":[],"truncate_prompt_tokens":null}"#, "D").is_ok());
    }

    #[test]
    fn a_splice_that_would_outgrow_the_limit_is_refused() {
        let body = format!(r#"{{"prompt":[{}]}}"#, vec!["\"\""; 1000].join(","));
        let options = Options {
            message_prefix: PREFIX,
            cache_control: false,
            max_output: body.len() + 1000 * 7 - 1,
        };
        let r = splice(Format::OpenAiCompletions, body.as_bytes(), &options, "DDD");
        assert_eq!(r, Err(BodyError::Oversized));
        let roomy = Options {
            max_output: body.len() + 1000 * 7,
            ..options
        };
        let out = splice(Format::OpenAiCompletions, body.as_bytes(), &roomy, "DDD").unwrap();
        assert_eq!(
            out.len(),
            body.len() + 1000 * 7,
            "D, D, D and the escaped blank line"
        );
    }

    #[test]
    fn completions_refuse_what_carries_no_text() {
        let c = |b: &str| splice_str(Format::OpenAiCompletions, b, "D");
        for tokens in [
            r#"{"prompt":[1,2,3]}"#,
            r#"{"prompt":[[1,2],[3]]}"#,
            r#"{"prompt":["a",1]}"#,
            r#"{"prompt":[1,"a"]}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":null}"#,
            r#"{"prompt":7}"#,
            r#"{"prompt":{"text":"a"}}"#,
            r#"{"prompt":["a",null]}"#,
        ] {
            assert!(wrong_type(c(tokens), "prompt"), "{tokens}");
        }
        assert_eq!(
            c(r#"{"model":"m"}"#),
            Err(BodyError::MissingMember("prompt"))
        );
        assert_eq!(
            c(r#"{"Prompt":"a"}"#),
            Err(BodyError::CaseVariant("prompt"))
        );
        assert!(matches!(
            c(r#"{"prompt":"a","pr\u006fmpt":"b"}"#),
            Err(BodyError::DuplicateKey(_))
        ));
        for embeds in [
            r#"{"prompt":"a","prompt_embeds":"AAAA"}"#,
            r#"{"prompt":"a","prompt_embeds":["AAAA"]}"#,
            r#"{"prompt":"a","Prompt_Embeds":"AAAA"}"#,
        ] {
            assert!(unsupported(c(embeds), "prompt_embeds"), "{embeds}");
        }
    }

    #[test]
    fn batches_direct_every_request() {
        let b = |body: &str| splice_str(Format::AnthropicBatches, body, "D");
        let body = r#"{"requests":[{"custom_id":"a","params":{"model":"c","messages":[]}},{"custom_id":"b","params":{"system":"S","messages":[]}},{"params":{"system":[{"type":"text","text":"T"}]}},{"params":{"system":null}},{"params":{}}]}"#;
        assert_eq!(
            b(body).unwrap(),
            r#"{"requests":[{"custom_id":"a","params":{"system":"D","model":"c","messages":[]}},{"custom_id":"b","params":{"system":"D\n\nS","messages":[]}},{"params":{"system":[{"type":"text","text":"D"},{"type":"text","text":"T"}]}},{"params":{"system":"D"}},{"params":{"system":"D"}}]}"#
        );
        assert_eq!(b(r#"{"requests":[ ]}"#).unwrap(), r#"{"requests":[ ]}"#);
    }

    #[test]
    fn batches_refuse_requests_they_cannot_direct() {
        let b = |body: &str| splice_str(Format::AnthropicBatches, body, "D");
        assert_eq!(b(r#"{}"#), Err(BodyError::MissingMember("requests")));
        assert!(wrong_type(b(r#"{"requests":{}}"#), "requests"));
        assert!(wrong_type(b(r#"{"requests":null}"#), "requests"));
        assert_eq!(
            b(r#"{"requests":[{"params":{}},{"custom_id":"x"}]}"#),
            Err(BodyError::MissingMember("requests[].params"))
        );
        assert!(wrong_type(
            b(r#"{"requests":[{"params":{}}, 1]}"#),
            "requests[]"
        ));
        assert!(wrong_type(
            b(r#"{"requests":[{"params":"x"}]}"#),
            "requests[].params"
        ));
        assert!(wrong_type(
            b(r#"{"requests":[{"params":null}]}"#),
            "requests[].params"
        ));
        assert!(wrong_type(
            b(r#"{"requests":[{"params":{"system":1}}]}"#),
            "system"
        ));
        assert_eq!(
            b(r#"{"requests":[{"Params":{}}]}"#),
            Err(BodyError::CaseVariant("params"))
        );
        assert_eq!(
            b(r#"{"requests":[{"params":{"SYSTEM":"x"}}]}"#),
            Err(BodyError::CaseVariant("system"))
        );
        assert_eq!(
            b(r#"{"Requests":[]}"#),
            Err(BodyError::CaseVariant("requests"))
        );
        for (dup, within) in [
            (r#"{"requests":[{"params":{},"params":{}}]}"#, "requests"),
            (
                r#"{"requests":[{"params":{},"p\u0061rams":{}}]}"#,
                "requests",
            ),
            (
                r#"{"requests":[{"params":{"system":"a","System":"b"}}]}"#,
                "params",
            ),
            (
                r#"{"requests":[{"params":{}},{"params":{"system":"a","sy\u0073tem":[]}}]}"#,
                "params",
            ),
        ] {
            assert!(
                matches!(b(dup), Err(BodyError::DuplicateNestedKey { within: w, .. }) if w == within),
                "{dup}"
            );
        }
        assert!(matches!(
            b(r#"{"requests":[],"requests":[]}"#),
            Err(BodyError::DuplicateKey(_))
        ));
    }

    #[test]
    fn gemini_system_instruction_in_every_shape() {
        let g = |b: &str| splice_str(Format::Gemini, b, "D");
        assert_eq!(
            g(r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"}]},"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#
        );
        assert_eq!(
            g(r#"{}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"}]}}"#
        );
        assert_eq!(
            g(r#"{"systemInstruction":{"parts":[{"text":"S"}]},"contents":[]}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"},{"text":"S"}]},"contents":[]}"#
        );
        assert_eq!(
            g(r#"{"system_instruction":{"role":"system","parts":[ ]}}"#).unwrap(),
            r#"{"system_instruction":{"role":"system","parts":[{"text":"D"} ]}}"#
        );
        assert_eq!(
            g(r#"{"systemInstruction":{"role":"user"}}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"}],"role":"user"}}"#
        );
        assert_eq!(
            g(r#"{"systemInstruction":{}}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"}]}}"#
        );
        assert_eq!(
            g(r#"{"systemInstruction":{"parts":null}}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"}]}}"#
        );
        assert_eq!(
            g(r#"{"systemInstruction":null}"#).unwrap(),
            r#"{"systemInstruction":{"parts":[{"text":"D"}]}}"#
        );
    }

    #[test]
    fn gemini_refuses_its_traps() {
        let g = |b: &str| splice_str(Format::Gemini, b, "D");
        assert!(wrong_type(
            g(r#"{"systemInstruction":"Be nice."}"#),
            "systemInstruction"
        ));
        assert!(wrong_type(
            g(r#"{"systemInstruction":[{"text":"x"}]}"#),
            "systemInstruction"
        ));
        assert!(wrong_type(
            g(r#"{"system_instruction":1}"#),
            "systemInstruction"
        ));
        assert!(wrong_type(
            g(r#"{"systemInstruction":{"parts":{"text":"x"}}}"#),
            "systemInstruction.parts"
        ));
        assert!(wrong_type(
            g(r#"{"systemInstruction":{"parts":"x"}}"#),
            "systemInstruction.parts"
        ));
        for both in [
            r#"{"systemInstruction":{},"system_instruction":{}}"#,
            r#"{"system_instruction":null,"systemInstruction":{"parts":[]}}"#,
            r#"{"systemInstruction":{},"System_Instruction":{}}"#,
        ] {
            assert_eq!(
                g(both),
                Err(BodyError::BothSpellings(
                    "systemInstruction",
                    "system_instruction"
                )),
                "{both}"
            );
        }
        for (variant, name) in [
            (r#"{"SystemInstruction":{}}"#, "systemInstruction"),
            (r#"{"systeminstruction":{}}"#, "systemInstruction"),
            (r#"{"SYSTEM_INSTRUCTION":{}}"#, "system_instruction"),
            ("{\"\u{17f}ystemInstruction\":{}}", "systemInstruction"),
            (r#"{"systemInstruction":{"Parts":[]}}"#, "parts"),
        ] {
            assert_eq!(g(variant), Err(BodyError::CaseVariant(name)), "{variant}");
        }
        for (dup, within) in [
            (
                r#"{"systemInstruction":{"parts":[],"parts":[]}}"#,
                "systemInstruction",
            ),
            (
                r#"{"systemInstruction":{"parts":[],"PARTS":[]}}"#,
                "systemInstruction",
            ),
            (
                r#"{"system_instruction":{"parts":[],"p\u0061rts":[]}}"#,
                "system_instruction",
            ),
        ] {
            assert!(
                matches!(g(dup), Err(BodyError::DuplicateNestedKey { within: w, .. }) if w == within),
                "{dup}"
            );
        }
        assert!(matches!(
            g(r#"{"systemInstruction":{},"systemInstruction":{}}"#),
            Err(BodyError::DuplicateKey(_))
        ));
    }

    #[test]
    fn gemini_count_tokens_counts_what_generation_gets() {
        let g = |b: &str| splice_str(Format::GeminiCountTokens, b, "D");
        assert_eq!(
            g(r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#).unwrap(),
            r#"{"contents":[{"role":"user","parts":[{"text":"D"}]},{"parts":[{"text":"hi"}]}]}"#
        );
        assert_eq!(
            g(r#"{"generateContentRequest":{"model":"models/m","contents":[]}}"#).unwrap(),
            r#"{"generateContentRequest":{"systemInstruction":{"parts":[{"text":"D"}]},"model":"models/m","contents":[]}}"#
        );
        assert_eq!(
            g(r#"{"generate_content_request":{"system_instruction":{"parts":[{"text":"S"}]}}}"#)
                .unwrap(),
            r#"{"generate_content_request":{"system_instruction":{"parts":[{"text":"D"},{"text":"S"}]}}}"#
        );
        assert_eq!(
            g(r#"{"generateContentRequest":null,"contents":[]}"#).unwrap(),
            r#"{"generateContentRequest":null,"contents":[{"role":"user","parts":[{"text":"D"}]}]}"#
        );
        // Vertex: a system instruction beside contents.
        assert_eq!(
            g(r#"{"contents":[],"systemInstruction":{"parts":[{"text":"S"}]}}"#).unwrap(),
            r#"{"contents":[],"systemInstruction":{"parts":[{"text":"D"},{"text":"S"}]}}"#
        );
        assert_eq!(g(r#"{}"#), Err(BodyError::MissingMember("contents")));
        assert!(wrong_type(g(r#"{"contents":{}}"#), "contents"));
        assert!(wrong_type(
            g(r#"{"generateContentRequest":[]}"#),
            "generateContentRequest"
        ));
        assert!(wrong_type(
            g(r#"{"generateContentRequest":{"systemInstruction":"x"}}"#),
            "systemInstruction"
        ));
        assert_eq!(
            g(r#"{"generateContentRequest":{},"generate_content_request":{}}"#),
            Err(BodyError::BothSpellings(
                "generateContentRequest",
                "generate_content_request"
            ))
        );
        assert_eq!(
            g(r#"{"GenerateContentRequest":{}}"#),
            Err(BodyError::CaseVariant("generateContentRequest"))
        );
        assert!(matches!(
            g(r#"{"generateContentRequest":{"model":"a","Model":"b"}}"#),
            Err(BodyError::DuplicateNestedKey {
                within: "generateContentRequest",
                ..
            })
        ));
        assert_eq!(
            g(r#"{"generateContentRequest":{"systemInstruction":{},"system_instruction":{}}}"#),
            Err(BodyError::BothSpellings(
                "systemInstruction",
                "system_instruction"
            ))
        );
    }

    #[test]
    fn bedrock_system_blocks() {
        let b = |body: &str| splice_str(Format::BedrockConverse, body, "D");
        assert_eq!(
            b(r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#).unwrap(),
            r#"{"system":[{"text":"D"}],"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#
        );
        assert_eq!(
            b(r#"{"system":[{"text":"S"},{"cachePoint":{"type":"default"}}]}"#).unwrap(),
            r#"{"system":[{"text":"D"},{"text":"S"},{"cachePoint":{"type":"default"}}]}"#
        );
        assert_eq!(
            b(r#"{"system":[]}"#).unwrap(),
            r#"{"system":[{"text":"D"}]}"#
        );
        assert_eq!(
            b(r#"{"system":null}"#).unwrap(),
            r#"{"system":[{"text":"D"}]}"#
        );
        assert_eq!(
            b(r#"{"additionalModelRequestFields":{"top_k":5,"thinking":{"type":"enabled"}}}"#)
                .unwrap(),
            r#"{"system":[{"text":"D"}],"additionalModelRequestFields":{"top_k":5,"thinking":{"type":"enabled"}}}"#
        );
    }

    #[test]
    fn bedrock_refuses_its_traps() {
        let b = |body: &str| splice_str(Format::BedrockConverse, body, "D");
        assert!(wrong_type(b(r#"{"system":{"text":"S"}}"#), "system"));
        assert!(wrong_type(b(r#"{"system":"S"}"#), "system"));
        assert_eq!(b(r#"{"System":[]}"#), Err(BodyError::CaseVariant("system")));
        for over in [
            r#"{"additionalModelRequestFields":{"system":"other"}}"#,
            r#"{"additionalModelRequestFields":{"System":"other"}}"#,
            r#"{"additionalModelRequestFields":{"messages":[]}}"#,
            r#"{"additionalModelRequestFields":{"prompt":"x"}}"#,
            r#"{"additionalModelRequestFields":{"inputText":"x"}}"#,
            r#"{"additionalModelRequestFields":{"preamble":"x"}}"#,
        ] {
            assert!(
                unsupported(b(over), "additionalModelRequestFields"),
                "{over}"
            );
        }
        assert_eq!(
            b(r#"{"AdditionalModelRequestFields":{}}"#),
            Err(BodyError::CaseVariant("additionalModelRequestFields"))
        );
        assert!(matches!(
            b(r#"{"additionalModelRequestFields":{"top_k":1,"top_k":2}}"#),
            Err(BodyError::DuplicateNestedKey { .. })
        ));
    }

    #[test]
    fn ollama_generate_system() {
        let o = |body: &str| splice_str(Format::OllamaGenerate, body, "D");
        assert_eq!(
            o(r#"{"model":"llama3","prompt":"hi"}"#).unwrap(),
            r#"{"system":"D","model":"llama3","prompt":"hi"}"#
        );
        assert_eq!(
            o(r#"{"system":"S","suffix":"","template":"","raw":false}"#).unwrap(),
            r#"{"system":"D\n\nS","suffix":"","template":"","raw":false}"#
        );
        assert_eq!(
            o(r#"{"system":null,"suffix":null,"raw":null}"#).unwrap(),
            r#"{"system":"D","suffix":null,"raw":null}"#
        );
        assert!(wrong_type(o(r#"{"system":["S"]}"#), "system"));
        assert_eq!(
            o(r#"{"System":"S"}"#),
            Err(BodyError::CaseVariant("system"))
        );
        for (trap, member) in [
            (r#"{"prompt":"def f(","suffix":"  return x"}"#, "suffix"),
            (r#"{"Suffix":"x"}"#, "suffix"),
            (r#"{"template":"{{ .Prompt }}"}"#, "template"),
            (r#"{"TEMPLATE":"{{ .Prompt }}"}"#, "template"),
            (r#"{"raw":true}"#, "raw"),
            (r#"{"Raw":true}"#, "raw"),
            (r#"{"raw":"false"}"#, "raw"),
            (r#"{"raw":0}"#, "raw"),
        ] {
            assert!(unsupported(o(trap), member), "{trap}");
        }
    }

    #[test]
    fn cache_control_marks_the_directive_block() {
        let a = |b: &str| cached(Format::AnthropicMessages, b, "D");
        assert_eq!(
            a(r#"{"messages":[]}"#).unwrap(),
            r#"{"system":[{"type":"text","text":"D","cache_control":{"type":"ephemeral"}}],"messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":null}"#).unwrap(),
            r#"{"system":[{"type":"text","text":"D","cache_control":{"type":"ephemeral"}}]}"#
        );
        assert_eq!(
            a(r#"{"system": "Be \"kind\".\u00e9" ,"messages":[]}"#).unwrap(),
            r#"{"system": [{"type":"text","text":"D","cache_control":{"type":"ephemeral"}},{"type":"text","text":"Be \"kind\".\u00e9"}] ,"messages":[]}"#
        );
        assert_eq!(
            a(r#"{"system":[ {"type":"text","text":"S"} ]}"#).unwrap(),
            r#"{"system":[{"type":"text","text":"D","cache_control":{"type":"ephemeral"}}, {"type":"text","text":"S"} ]}"#
        );
        // A blank string would be a blank block, which Anthropic refuses: one block.
        for blank in [r#""""#, r#"" \n ""#, r#""\n\t\u00a0""#] {
            let body = format!(r#"{{"system":{blank}}}"#);
            let inner = &blank[1..blank.len() - 1];
            assert_eq!(
                a(&body).unwrap(),
                format!(
                    r#"{{"system":[{{"type":"text","text":"D\n\n{inner}","cache_control":{{"type":"ephemeral"}}}}]}}"#
                ),
                "{blank}"
            );
        }
    }

    #[test]
    fn cache_control_leaves_room_for_four_breakpoints() {
        let a = |b: &str| cached(Format::AnthropicMessages, b, "D");
        let cc = r#""cache_control":{"type":"ephemeral"}"#;
        let body = |n: usize| {
            let blocks: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"type":"text","text":"m{i}",{cc}}}"#))
                .collect();
            format!(
                r#"{{"system":"S","messages":[{{"role":"user","content":[{}]}}]}}"#,
                blocks.join(",")
            )
        };
        assert!(a(&body(3))
            .unwrap()
            .contains(r#""text":"D","cache_control""#));
        assert_eq!(
            a(&body(4)).unwrap(),
            splice_str(Format::AnthropicMessages, &body(4), "D").unwrap(),
            "four already: exactly as with the option off"
        );
        // Counted wherever they are: tools, system blocks, tool results, any case.
        for full in [
            format!(
                r#"{{"tools":[{{"name":"a",{cc}}},{{"name":"b",{cc}}}],"system":[{{"type":"text","text":"S",{cc}}}],"messages":[{{"role":"user","content":[{{"type":"tool_result","content":[{{"type":"text","text":"r",{cc}}}]}}]}}]}}"#
            ),
            format!(
                r#"{{"tools":[{{"name":"a",{cc}}},{{"name":"b","Cache_Control":{{}}}},{{"name":"c","cache\u005fcontrol":{{}}}},{{"name":"d","cache_control":null}}]}}"#
            ),
        ] {
            let out = a(&full).unwrap();
            assert!(!out.contains(r#""text":"D","cache_control""#), "{full}");
            assert_eq!(
                out,
                splice_str(Format::AnthropicMessages, &full, "D").unwrap()
            );
        }
        // A TTL anywhere: a 5-minute breakpoint before a 1-hour one is refused upstream.
        let ttl = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"1h"}}]}]}"#;
        assert_eq!(
            a(ttl).unwrap(),
            splice_str(Format::AnthropicMessages, ttl, "D").unwrap()
        );
    }

    #[test]
    fn cache_control_counts_each_batch_request_alone() {
        let cc = r#""cache_control":{"type":"ephemeral"}"#;
        let four = format!(
            r#"{{"tools":[{{"name":"a",{cc}}},{{"name":"b",{cc}}},{{"name":"c",{cc}}},{{"name":"d",{cc}}}]}}"#
        );
        let body = format!(
            r#"{{"requests":[{{"custom_id":"full","params":{four}}},{{"custom_id":"free","params":{{"system":"S"}}}}]}}"#
        );
        let out = cached(Format::AnthropicBatches, &body, "D").unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["requests"][0]["params"]["system"], "D");
        assert_eq!(
            v["requests"][1]["params"]["system"],
            json!([{"type":"text","text":"D","cache_control":{"type":"ephemeral"}},{"type":"text","text":"S"}])
        );
        assert_eq!(
            splice_str(Format::AnthropicBatches, &body, "D").unwrap(),
            out.replace(
                r#"[{"type":"text","text":"D","cache_control":{"type":"ephemeral"}},{"type":"text","text":"S"}]"#,
                r#""D\n\nS""#
            ),
            "off: plain strings"
        );
    }

    #[test]
    fn cache_control_leaves_the_other_formats_alone() {
        for (format, body) in [
            (Format::OpenAiChat, r#"{"messages":[]}"#),
            (Format::OpenAiResponses, r#"{"instructions":"x"}"#),
            (Format::Gemini, r#"{"contents":[]}"#),
            (Format::BedrockConverse, r#"{"system":[]}"#),
            (Format::OllamaGenerate, r#"{"system":"s"}"#),
            (Format::OpenAiCompletions, r#"{"prompt":["a","b"]}"#),
        ] {
            assert_eq!(
                cached(format, body, "D"),
                splice_str(format, body, "D"),
                "{format:?}"
            );
        }
    }

    #[test]
    fn an_empty_directive_still_makes_valid_json() {
        for format in Format::NAMES.iter().map(|(_, f)| *f) {
            let body = match format {
                Format::OpenAiChat => r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Format::OpenAiCompletions => r#"{"prompt":["a","b"]}"#,
                Format::AnthropicBatches => r#"{"requests":[{"params":{}},{"params":{}}]}"#,
                Format::GeminiCountTokens => r#"{"contents":[1]}"#,
                _ => r#"{"a":1}"#,
            };
            for cache_control in [false, true] {
                let options = Options {
                    message_prefix: PREFIX,
                    cache_control,
                    max_output: usize::MAX,
                };
                let out = splice(format, body.as_bytes(), &options, "").unwrap();
                serde_json::from_slice::<Value>(&out).unwrap_or_else(|e| {
                    panic!("{format:?}: {e}: {}", String::from_utf8_lossy(&out))
                });
            }
        }
    }

    mod properties {
        //! Generated bodies of every format, in every shape its target may have,
        //! against a reference insertion done with serde_json; and the output is the
        //! input plus insertions only.
        use super::*;
        use proptest::prelude::*;

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                (-1e9f64..1e9).prop_map(|f| json!(f)),
                ".*".prop_map(Value::String),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Other members of an object, none of them a name the format reads.
        fn others(
            reserved: &'static [&'static str],
        ) -> impl Strategy<Value = serde_json::Map<String, Value>> {
            prop::collection::btree_map("[a-z_]{1,8}", value(), 0..4).prop_map(move |m| {
                m.into_iter()
                    .filter(|(k, _)| !reserved.contains(&k.as_str()))
                    .collect()
            })
        }

        /// `obj` with `key` set to `v`, or without it for None.
        fn with(mut obj: serde_json::Map<String, Value>, key: &str, v: Option<Value>) -> Value {
            obj.remove(key);
            if let Some(v) = v {
                obj.insert(key.to_string(), v);
            }
            Value::Object(obj)
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                ".*",
                Just(String::new()),
                Just(" \n".to_string()),
                "[ \t]{0,3}"
            ]
        }

        fn cc() -> Value {
            json!({"type":"ephemeral"})
        }

        /// An Anthropic request: `system` in every shape, breakpoints around it.
        fn anthropic_request() -> impl Strategy<Value = Value> {
            let blocks = prop::collection::vec(
                (text(), any::<bool>()).prop_map(|(t, c)| {
                    let mut b = json!({"type":"text","text":t});
                    if c {
                        b["cache_control"] = cc();
                    }
                    b
                }),
                0..3,
            )
            .prop_map(Value::Array);
            let system = prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                text().prop_map(|s| Some(Value::String(s))),
                blocks.prop_map(Some),
            ];
            let messages = (0usize..5, any::<bool>()).prop_map(|(n, ttl)| {
                let content: Vec<Value> = (0..n)
                    .map(|i| {
                        let mut control = cc();
                        if ttl && i == 0 {
                            control["ttl"] = json!("1h");
                        }
                        json!({"type":"text","text":"m","cache_control":control})
                    })
                    .collect();
                json!([{"role":"user","content":content}])
            });
            (others(&["system", "messages", "ttl"]), system, messages).prop_map(
                |(obj, system, messages)| {
                    let mut v = with(obj, "system", system);
                    v["messages"] = messages;
                    v
                },
            )
        }

        fn gemini_content() -> impl Strategy<Value = Option<Value>> {
            let parts = prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                prop::collection::vec(".*".prop_map(|t| json!({"text": t})), 0..3)
                    .prop_map(|p| Some(Value::Array(p))),
            ];
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                (parts, any::<bool>()).prop_map(|(parts, role)| {
                    let mut c = serde_json::Map::new();
                    if role {
                        c.insert("role".into(), json!("system"));
                    }
                    Some(with(c, "parts", parts))
                }),
            ]
        }

        fn gemini_request() -> impl Strategy<Value = Value> {
            (
                others(&["system_instruction", "contents", "generate_content_request"]),
                gemini_content(),
                any::<bool>(),
            )
                .prop_map(|(obj, si, snake)| {
                    let key = if snake {
                        "system_instruction"
                    } else {
                        "systemInstruction"
                    };
                    let mut v = with(obj, key, si);
                    v["contents"] = json!([{"role":"user","parts":[{"text":"hi"}]}]);
                    v
                })
        }

        fn body(format: Format) -> BoxedStrategy<Value> {
            match format {
                Format::OpenAiChat => (
                    others(&["messages"]),
                    prop::collection::vec(
                        (".*", ".*").prop_map(|(r, c)| json!({"role": r, "content": c})),
                        0..4,
                    ),
                )
                    .prop_map(|(o, m)| with(o, "messages", Some(Value::Array(m))))
                    .boxed(),
                Format::OpenAiResponses => (
                    others(&["instructions"]),
                    prop_oneof![
                        Just(None),
                        Just(Some(Value::Null)),
                        ".*".prop_map(|s| Some(Value::String(s))),
                    ],
                )
                    .prop_map(|(o, t)| with(o, "instructions", t))
                    .boxed(),
                Format::OpenAiCompletions => (
                    others(&["prompt", "prompt_embeds"]),
                    prop_oneof![
                        ".*".prop_map(Value::String),
                        prop::collection::vec(".*".prop_map(Value::String), 1..4)
                            .prop_map(Value::Array),
                    ],
                )
                    .prop_map(|(o, p)| with(o, "prompt", Some(p)))
                    .boxed(),
                Format::AnthropicMessages => anthropic_request().boxed(),
                Format::AnthropicBatches => (
                    others(&["requests"]),
                    prop::collection::vec(
                        ("[a-z0-9]{1,8}", anthropic_request())
                            .prop_map(|(id, p)| json!({"custom_id": id, "params": p})),
                        0..4,
                    ),
                )
                    .prop_map(|(o, r)| with(o, "requests", Some(Value::Array(r))))
                    .boxed(),
                Format::Gemini => gemini_request().boxed(),
                Format::GeminiCountTokens => prop_oneof![
                    (
                        others(&["generate_content_request", "contents"]),
                        gemini_request()
                    )
                        .prop_map(|(o, r)| with(
                            o,
                            "generateContentRequest",
                            Some(r)
                        )),
                    gemini_request(),
                    others(&["contents", "system_instruction", "generate_content_request"])
                        .prop_map(|o| with(o, "contents", Some(json!([{"parts":[{"text":"x"}]}])))),
                ]
                .boxed(),
                Format::BedrockConverse => (
                    others(&["system"]),
                    prop_oneof![
                        Just(None),
                        Just(Some(Value::Null)),
                        prop::collection::vec(".*".prop_map(|t| json!({"text": t})), 0..3)
                            .prop_map(|s| Some(Value::Array(s))),
                    ],
                )
                    .prop_map(|(o, s)| with(o, "system", s))
                    .boxed(),
                Format::OllamaGenerate => (
                    others(&["system", "suffix", "raw"]),
                    prop_oneof![
                        Just(None),
                        Just(Some(Value::Null)),
                        ".*".prop_map(|s| Some(Value::String(s))),
                    ],
                    prop_oneof![Just(None), Just(Some(json!(""))), Just(Some(Value::Null))],
                    prop_oneof![Just(None), Just(Some(json!(false)))],
                )
                    .prop_map(|(o, s, suffix, raw)| {
                        let v = with(o, "system", s);
                        let Value::Object(o) = v else { unreachable!() };
                        let v = with(o, "suffix", suffix);
                        let Value::Object(o) = v else { unreachable!() };
                        with(o, "raw", raw)
                    })
                    .boxed(),
            }
        }

        /// Keys named `name` (case folded) anywhere in `v`.
        fn count_keys(v: &Value, name: &str) -> u32 {
            match v {
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| u32::from(k.to_lowercase() == name) + count_keys(v, name))
                    .sum(),
                Value::Array(a) => a.iter().map(|v| count_keys(v, name)).sum(),
                _ => 0,
            }
        }

        fn block(d: &str, cached: bool) -> Value {
            let mut b = json!({"type":"text","text":d});
            if cached {
                b["cache_control"] = cc();
            }
            b
        }

        fn reference_anthropic(request: &mut Value, d: &str, cache_control: bool) {
            let cached = cache_control
                && count_keys(request, "cache_control") < 4
                && count_keys(request, "ttl") == 0;
            let obj = request.as_object_mut().unwrap();
            let new = match obj.remove("system") {
                None | Some(Value::Null) if cached => json!([block(d, true)]),
                None | Some(Value::Null) => json!(d),
                Some(Value::String(s)) if !cached => json!(format!("{d}\n\n{s}")),
                Some(Value::String(s)) if s.chars().all(blank_char) => {
                    json!([block(&format!("{d}\n\n{s}"), true)])
                }
                Some(Value::String(s)) => json!([block(d, true), {"type":"text","text":s}]),
                Some(Value::Array(mut a)) => {
                    a.insert(0, block(d, cached));
                    Value::Array(a)
                }
                Some(other) => panic!("generated system {other}"),
            };
            obj.insert("system".into(), new);
        }

        fn reference_gemini(request: &mut Value, d: &str) {
            let obj = request.as_object_mut().unwrap();
            let key = if obj.contains_key("system_instruction") {
                "system_instruction"
            } else {
                "systemInstruction"
            };
            match obj.get_mut(key) {
                Some(Value::Object(content)) => match content.get_mut("parts") {
                    Some(Value::Array(parts)) => parts.insert(0, json!({"text": d})),
                    _ => {
                        content.insert("parts".into(), json!([{"text": d}]));
                    }
                },
                _ => {
                    obj.insert(key.into(), json!({"parts":[{"text": d}]}));
                }
            }
        }

        fn reference(format: Format, mut body: Value, d: &str, cache_control: bool) -> Value {
            let prefixed = |s: &str| Value::String(format!("{d}\n\n{s}"));
            let obj = body.as_object_mut().unwrap();
            match format {
                Format::OpenAiChat => obj["messages"]
                    .as_array_mut()
                    .unwrap()
                    .insert(0, json!({"role":"system","content":d})),
                Format::OpenAiResponses | Format::OllamaGenerate => {
                    let key = if format == Format::OllamaGenerate {
                        "system"
                    } else {
                        "instructions"
                    };
                    let new = match obj.get(key) {
                        Some(Value::String(s)) => prefixed(s),
                        _ => json!(d),
                    };
                    obj.insert(key.into(), new);
                }
                Format::OpenAiCompletions => {
                    let new = match &obj["prompt"] {
                        Value::String(s) => prefixed(s),
                        Value::Array(a) => {
                            Value::Array(a.iter().map(|s| prefixed(s.as_str().unwrap())).collect())
                        }
                        other => panic!("generated prompt {other}"),
                    };
                    obj.insert("prompt".into(), new);
                }
                Format::AnthropicMessages => reference_anthropic(&mut body, d, cache_control),
                Format::AnthropicBatches => {
                    for r in obj["requests"].as_array_mut().unwrap() {
                        reference_anthropic(&mut r["params"], d, cache_control);
                    }
                }
                Format::Gemini => reference_gemini(&mut body, d),
                Format::GeminiCountTokens => {
                    if let Some(r) = obj.get_mut("generateContentRequest") {
                        reference_gemini(r, d)
                    } else if obj.contains_key("systemInstruction")
                        || obj.contains_key("system_instruction")
                    {
                        reference_gemini(&mut body, d)
                    } else {
                        obj["contents"]
                            .as_array_mut()
                            .unwrap()
                            .insert(0, json!({"role":"user","parts":[{"text":d}]}));
                    }
                }
                Format::BedrockConverse => match obj.get_mut("system") {
                    Some(Value::Array(a)) => a.insert(0, json!({"text": d})),
                    _ => {
                        obj.insert("system".into(), json!([{"text": d}]));
                    }
                },
            }
            body
        }

        fn case() -> impl Strategy<Value = (Format, Value, bool, bool, String)> {
            prop::sample::select(Format::NAMES.iter().map(|(_, f)| *f).collect::<Vec<_>>())
                .prop_flat_map(|format| {
                    (
                        Just(format),
                        body(format),
                        any::<bool>(),
                        any::<bool>(),
                        ".*",
                    )
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn splice_matches_the_reference_and_only_inserts((format, body, pretty, cache_control, d) in case()) {
                let text = if pretty { serde_json::to_string_pretty(&body) } else { serde_json::to_string(&body) }.unwrap();
                let options = Options { message_prefix: PREFIX, cache_control, max_output: usize::MAX, };
                let out = splice(format, text.as_bytes(), &options, &escape_json_str(&d)).unwrap();
                let parsed: Value = serde_json::from_slice(&out).unwrap();
                // The reference starts from the text as parsed, so both sides read
                // numbers the same way.
                let base: Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(parsed, reference(format, base, &d, cache_control));
                prop_assert!(only_inserted(text.as_bytes(), &out), "bytes of the input changed");
            }

            #[test]
            fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), d in ".*", cache_control: bool) {
                let options = Options { message_prefix: PREFIX, cache_control, max_output: usize::MAX, };
                for (_, format) in Format::NAMES {
                    if let Ok(out) = splice(*format, &bytes, &options, &escape_json_str(&d)) {
                        prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
                        prop_assert!(only_inserted(&bytes, &out));
                    }
                }
            }
        }

        /// Whether `input` is a subsequence of `out` once both lose their `null`
        /// literals (a replaced `null` is the one thing a splice may remove): nothing
        /// of the input was dropped, changed or moved.
        fn only_inserted(input: &[u8], out: &[u8]) -> bool {
            let (input, out) = (without_nulls(input), without_nulls(out));
            let mut rest = out.iter();
            input.iter().all(|b| rest.any(|o| o == b))
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

        #[test]
        fn the_insertion_check_catches_a_change() {
            assert!(only_inserted(br#"{"a":null}"#, br#"{"x":1,"a":"D"}"#));
            assert!(!only_inserted(br#"{"a":1}"#, br#"{"a":2}"#));
            assert!(!only_inserted(br#"{"a":"b","c":1}"#, br#"{"c":1,"a":"b"}"#));
            assert!(!only_inserted(br#"{"a":"null"}"#, br#"{"a":""}"#));
        }
    }
}
