//! Admission: from a request's headers and the configuration, whether the filter
//! resolves a directive for it, passes it untouched, or refuses it before any lookup.
//!
//! Pure: no host calls, no counters, no state. The order of the checks is part of
//! the contract (SPEC §6): the agent first (a request we cannot attribute is refused
//! whatever its path), then whether there is a body at all (a bodiless request is
//! forwarded whatever its path: there is nothing a model could read), then the path
//! (normalised as the upstream will route it, [`crate::path`]), then what the body
//! could be.
//!
//! With `agent.source = "jwt"` the agent is the claim of the verified JWT payload the
//! host layer read for it (`verified`), never the agent header: no claim (no verified
//! payload, or no such claim in it) is 401 `missing_agent_id` whatever
//! `agent.missing` says, and a claim that is no UUID string is 400 `invalid_agent_id`.
//!
//! With `agent.source = "api_key"` the agent is whoever the presented gateway key
//! belongs to, which only the tiers know: admission checks the key's form (no key
//! header is 401 `missing_agent_id`, a malformed one 401 `invalid_api_key`), hashes
//! it, and decides everything else the headers decide ([`Then`]) for the flow to
//! apply once the key is known good. The key is checked on every request, bodiless
//! and pass paths included: the upstream gets the operator's provider key, so a
//! request without a good gateway key must never reach it.
//!
//! A body on a path that is no injection format and not an `inject.pass_paths` path
//! is refused (404 `unsupported_path`) unless `inject.other_paths` is `"pass"`: an
//! endpoint the filter does not know may be a generation endpoint. A body on a path
//! that cannot be read with certainty is refused with the same answer whatever
//! `inject.other_paths` says, since it could be an injection path read another way.

use ibex_wire::Redacted;

use crate::agent::AgentId;
use crate::apikey::{self, KeyHash, Presented};
use crate::config::{AgentSource, ApiKeySource, Config, MissingAgent, OtherPaths, Route};
use crate::inject::Format;
use crate::reply::Refusal;
use crate::worker::Then;

/// The request headers admission looks at, picked out of all of them (one host call
/// for all headers is much cheaper than one per header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadFields {
    /// `:path`, query string included.
    pub path: Option<String>,
    /// The agent header; several different values are kept joined by `,`, which is
    /// no UUID, so an ambiguous agent is refused rather than guessed.
    pub agent: Option<String>,
    /// `content-length`.
    pub content_length: Option<String>,
    /// `content-encoding`, several headers joined by `, ` as HTTP reads them.
    pub content_encoding: Option<String>,
    /// W3C `traceparent`, when the request is traced; the lookups it causes carry it.
    pub traceparent: Option<String>,
    /// The gateway key header (`api_key` source only), several headers joined by
    /// `, ` (which no key contains, so two keys are refused). Kept out of `Debug`.
    pub api_key: Option<Redacted<String>>,
    /// The host's headers could not be read at all: nothing is known of the request,
    /// which is refused (`directive_unavailable`) rather than guessed at.
    pub unreadable: bool,
}

impl HeadFields {
    /// The fields of a request whose headers could not be read.
    pub fn unreadable() -> HeadFields {
        HeadFields {
            unreadable: true,
            ..HeadFields::default()
        }
    }

    /// Picks the fields out of all request headers (names are lower case in Envoy).
    ///
    /// Values arrive as bytes: a client may send any byte but NUL, CR and LF in a
    /// header value, and a value that is not UTF-8 must not stop the filter. Invalid
    /// sequences become U+FFFD, which no field accepts (no UUID, no ASCII path, no
    /// number, no `identity`), so such a request is refused, never matched loosely.
    /// `key_header` is the gateway key header with the `api_key` source.
    pub fn pick(
        headers: Vec<(String, Vec<u8>)>,
        agent_header: &str,
        key_header: Option<&str>,
    ) -> HeadFields {
        let pairs = headers.iter().map(|(n, v)| (n.as_bytes(), v.as_slice()));
        HeadFields::pick_pairs(pairs, agent_header, key_header)
    }

    /// [`HeadFields::pick`] straight from the host's serialized header map (the
    /// proxy-wasm layout: a `u32` count, a `u32` name and value length per header,
    /// then each name and value followed by a NUL; little endian), copying only the
    /// fields it keeps. `None` when `raw` is not such a map.
    pub fn pick_serialized(
        raw: &[u8],
        agent_header: &str,
        key_header: Option<&str>,
    ) -> Option<HeadFields> {
        let pairs = serialized_pairs(raw)?;
        Some(HeadFields::pick_pairs(
            pairs.into_iter(),
            agent_header,
            key_header,
        ))
    }

    fn pick_pairs<'a>(
        headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
        agent_header: &str,
        key_header: Option<&str>,
    ) -> HeadFields {
        let mut out = HeadFields::default();
        let mut key: Option<String> = None;
        for (name, value) in headers {
            // Compared as bytes: a name that is not UTF-8 equals none of ours, and
            // the other headers are not validated for nothing.
            let slot = match name {
                b":path" => &mut out.path,
                b"content-length" => &mut out.content_length,
                b"content-encoding" => &mut out.content_encoding,
                b"traceparent" => &mut out.traceparent,
                n if n == agent_header.as_bytes() => &mut out.agent,
                n if Some(n) == key_header.map(str::as_bytes) => &mut key,
                _ => continue,
            };
            let value = String::from_utf8_lossy(value).into_owned();
            match slot {
                None => *slot = Some(value),
                Some(existing) if *existing != value => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                Some(_) => {}
            }
        }
        out.api_key = key.map(Redacted::new);
        out
    }
}

/// The (name, value) pairs of a serialized proxy-wasm header map, or `None` when
/// the lengths do not add up.
fn serialized_pairs(raw: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let u32_at = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(bytes)).ok()
    };
    let count = u32_at(0)?;
    let mut sizes = 4usize;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if data > raw.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let (name_len, value_len) = (u32_at(sizes)?, u32_at(sizes + 4)?);
        sizes += 8;
        let name = raw.get(data..data.checked_add(name_len)?)?;
        data += name_len;
        if raw.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        let value = raw.get(data..data.checked_add(value_len)?)?;
        data += value_len;
        if raw.get(data) != Some(&0) {
            return None;
        }
        data += 1;
        pairs.push((name, value));
    }
    (data == raw.len()).then_some(pairs)
}

/// What to do with a request, decided from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Forward untouched: no agent in `pass` mode, no body to put a directive into,
    /// a pass path, or any other path with `inject.other_paths = "pass"`.
    Pass,
    /// Answer with this refusal.
    Refuse(Refusal),
    /// Resolve the agent's directive and splice it into the body in this format.
    Resolve {
        /// Whose request it is.
        agent: AgentId,
        /// Where the directive goes.
        format: Format,
    },
    /// Resolve which agent the gateway key belongs to (an unknown or revoked key is
    /// 401 `invalid_api_key`), then do what the headers decided.
    Identify {
        /// The key's hash.
        key: KeyHash,
        /// What the request gets once its key is known good.
        then: Then,
    },
}

/// Whose request it is, as far as the headers tell.
enum Who {
    Agent(AgentId),
    Key(KeyHash),
}

/// Decides what to do with a request from its headers and, with the `jwt` source,
/// the agent claim of its verified token as the host returned it (`None` when there
/// is no verified payload or no such claim; ignored with the `header` source).
#[cfg(test)]
pub fn admit(
    head: &HeadFields,
    verified: Option<&[u8]>,
    end_of_stream: bool,
    config: &Config,
) -> Admission {
    let route = head.path.as_deref().map(|p| config.route(p));
    admit_routed(head, route, verified, end_of_stream, config)
}

/// [`admit`], with the route of `head.path` already known (`config.route` of it,
/// `None` without a path): the worker remembers the routes of the paths it sees.
pub fn admit_routed(
    head: &HeadFields,
    route: Option<Route>,
    verified: Option<&[u8]>,
    end_of_stream: bool,
    config: &Config,
) -> Admission {
    if head.unreadable {
        return Admission::Refuse(Refusal::DirectiveUnavailable);
    }
    let who = match &config.agent_source {
        AgentSource::Header => agent_of(head, config).map(Who::Agent),
        AgentSource::Jwt(_) => agent_of_claim(verified).map(Who::Agent),
        AgentSource::ApiKey(source) => key_of(head, source).map(Who::Key),
    };
    let who = match who {
        Ok(who) => who,
        Err(decided) => return decided,
    };
    match (who, then(head, route, end_of_stream, config)) {
        (Who::Key(key), then) => Admission::Identify { key, then },
        (Who::Agent(agent), Then::Inject(format)) => Admission::Resolve { agent, format },
        (Who::Agent(_), Then::Pass) => Admission::Pass,
        (Who::Agent(_), Then::Refuse(refusal)) => Admission::Refuse(refusal),
    }
}

/// What the request gets once its agent is known, by its headers alone.
fn then(head: &HeadFields, route: Option<Route>, end_of_stream: bool, config: &Config) -> Then {
    if end_of_stream {
        // No body: nothing a model could read, and nothing to put a directive into.
        return Then::Pass;
    }
    let format = match format_of(route, config) {
        Ok(format) => format,
        Err(Admission::Refuse(refusal)) => return Then::Refuse(refusal),
        Err(_) => return Then::Pass,
    };
    match body_refusal(head, config) {
        Some(refusal) => Then::Refuse(refusal),
        None => Then::Inject(format),
    }
}

/// The gateway key of the request, hashed, or what a request without a usable one
/// gets. `agent.missing` does not apply: a credential source never passes a request
/// it cannot attribute.
fn key_of(head: &HeadFields, source: &ApiKeySource) -> Result<KeyHash, Admission> {
    let value = head.api_key.as_ref().map(|v| v.expose().as_str());
    match apikey::read(value, source.bearer) {
        Presented::Key(key) => Ok(key),
        Presented::Missing => Err(Admission::Refuse(Refusal::MissingAgentId)),
        Presented::Malformed => Err(Admission::Refuse(Refusal::InvalidApiKey)),
    }
}

/// Whose request it is, or what a request without a usable agent gets.
fn agent_of(head: &HeadFields, config: &Config) -> Result<AgentId, Admission> {
    match head.agent.as_deref() {
        None => Err(match config.missing_agent {
            MissingAgent::Pass => Admission::Pass,
            MissingAgent::Reject => Admission::Refuse(Refusal::MissingAgentId),
        }),
        Some(value) => AgentId::parse(value).ok_or(Admission::Refuse(Refusal::InvalidAgentId)),
    }
}

/// Whose request it is by its verified token. The claim is what the host's property
/// access returned: a string claim comes back as its raw bytes, anything else (a
/// number, an object) comes back serialized and is no UUID.
fn agent_of_claim(claim: Option<&[u8]>) -> Result<AgentId, Admission> {
    let claim = claim.ok_or(Admission::Refuse(Refusal::MissingAgentId))?;
    std::str::from_utf8(claim)
        .ok()
        .and_then(AgentId::parse)
        .ok_or(Admission::Refuse(Refusal::InvalidAgentId))
}

/// The format a body on `path` is injected in, or what a body on any other path gets.
fn format_of(route: Option<Route>, config: &Config) -> Result<Format, Admission> {
    match route {
        Some(Route::Inject(format)) => Ok(format),
        Some(Route::Pass) => Err(Admission::Pass),
        Some(Route::Other) => Err(match config.paths.other {
            OtherPaths::Pass => Admission::Pass,
            OtherPaths::Refuse => Admission::Refuse(Refusal::UnsupportedPath),
        }),
        // No `:path` at all (CONNECT) is as unclear as a path that cannot be read.
        Some(Route::Unclear(_)) | None => Err(Admission::Refuse(Refusal::UnsupportedPath)),
    }
}

/// What the headers say about a body the directive would go into.
fn body_refusal(head: &HeadFields, config: &Config) -> Option<Refusal> {
    if let Some(enc) = head.content_encoding.as_deref() {
        let enc = enc.trim();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            return Some(Refusal::UnsupportedEncoding);
        }
    }
    let len = head
        .content_length
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok());
    match len {
        Some(len) if len > config.max_body_bytes => Some(Refusal::BodyTooLarge),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.as_bytes().to_vec()))
            .collect()
    }

    /// The proxy-wasm serialization of a header map (as the host writes it).
    fn serialize(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = (headers.len() as u32).to_le_bytes().to_vec();
        for (n, v) in headers {
            out.extend_from_slice(&(n.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (n, v) in headers {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn the_serialized_map_is_read_like_the_pairs() {
        let headers = vec![
            (":path".to_string(), b"/v1/chat/completions".to_vec()),
            ("x-agent-id".to_string(), AGENT.as_bytes().to_vec()),
            ("content-encoding".to_string(), b"identity".to_vec()),
            ("content-encoding".to_string(), b"gzip".to_vec()),
            ("x-junk".to_string(), b"caf\xe9\0".to_vec()),
            ("authorization".to_string(), b"Bearer k".to_vec()),
            ("empty".to_string(), Vec::new()),
        ];
        let raw = serialize(&headers);
        for key in [None, Some("authorization")] {
            assert_eq!(
                HeadFields::pick_serialized(&raw, "x-agent-id", key),
                Some(HeadFields::pick(headers.clone(), "x-agent-id", key))
            );
        }
        assert_eq!(
            HeadFields::pick_serialized(&serialize(&[]), "x-agent-id", None),
            Some(HeadFields::default())
        );
        // Anything whose lengths do not add up is no map.
        let mut bad = vec![
            raw[..raw.len() - 1].to_vec(),
            [raw.as_slice(), b"x"].concat(),
        ];
        let mut no_nul = raw.clone();
        // The NUL after the first name, `:path`.
        no_nul[4 + 7 * 8 + ":path".len()] = b'x';
        bad.push(no_nul);
        let mut huge = raw.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        bad.push(huge);
        let mut long_name = raw.clone();
        long_name[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        bad.push(long_name);
        bad.push(vec![1, 0, 0]);
        for raw in bad {
            assert_eq!(HeadFields::pick_serialized(&raw, "x-agent-id", None), None);
        }
    }

    #[test]
    fn header_values_that_are_not_utf8_are_refused_not_matched() {
        let c = config("");
        let raw = |fields: &[(&str, &[u8])]| {
            let headers = fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect();
            HeadFields::pick(headers, "x-agent-id", None)
        };
        let agent = AGENT.as_bytes();
        let chat = b"/v1/chat/completions".as_slice();
        // An unrelated header never matters.
        let h = raw(&[
            (":path", chat),
            ("x-agent-id", agent),
            ("x-junk", b"caf\xe9"),
        ]);
        assert!(matches!(
            admit(&h, None, false, &c),
            Admission::Resolve { .. }
        ));
        let mut bad_agent = agent.to_vec();
        bad_agent[0] = 0xff;
        let h = raw(&[(":path", chat), ("x-agent-id", &bad_agent)]);
        assert_eq!(
            admit(&h, None, false, &c),
            Admission::Refuse(Refusal::InvalidAgentId)
        );
        let h = raw(&[(":path", b"/v1/chat/completion\xf3"), ("x-agent-id", agent)]);
        assert_eq!(
            admit(&h, None, false, &c),
            Admission::Refuse(Refusal::UnsupportedPath)
        );
        let h = raw(&[
            (":path", chat),
            ("x-agent-id", agent),
            ("content-encoding", b"identit\xff"),
        ]);
        assert_eq!(
            admit(&h, None, false, &c),
            Admission::Refuse(Refusal::UnsupportedEncoding)
        );
    }

    fn head(agent: Option<&str>) -> HeadFields {
        HeadFields {
            path: Some("/v1/chat/completions".into()),
            agent: agent.map(String::from),
            ..Default::default()
        }
    }

    fn config(extra: &str) -> Config {
        Config::parse(format!("{{{extra}}}").as_bytes(), None).unwrap()
    }

    #[test]
    fn head_fields_are_picked_from_all_headers() {
        let h = HeadFields::pick(
            pairs(&[
                (":path", "/v1/chat/completions"),
                ("x-agent-id", AGENT),
                ("content-length", "12"),
                ("accept", "*/*"),
            ]),
            "x-agent-id",
            None,
        );
        assert_eq!(h.path.as_deref(), Some("/v1/chat/completions"));
        assert_eq!(h.agent.as_deref(), Some(AGENT));
        assert_eq!(h.content_length.as_deref(), Some("12"));
        assert_eq!(h.content_encoding, None);
        let h = HeadFields::pick(
            pairs(&[
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
                ("x-agent-id", AGENT),
                ("x-agent-id", AGENT),
            ]),
            "x-agent-id",
            None,
        );
        assert_eq!(h.content_encoding.as_deref(), Some("identity, gzip"));
        assert_eq!(
            h.agent.as_deref(),
            Some(AGENT),
            "a repeated identical agent header is one agent"
        );
    }

    #[test]
    fn two_different_agents_are_refused() {
        let other = "00000000-0000-4000-8000-000000000001";
        let mut h = HeadFields::pick(
            pairs(&[("x-agent-id", AGENT), ("x-agent-id", other)]),
            "x-agent-id",
            None,
        );
        h.path = Some("/v1/chat/completions".into());
        assert_eq!(
            admit(&h, None, false, &config("")),
            Admission::Refuse(Refusal::InvalidAgentId)
        );
    }

    #[test]
    fn the_agent_is_checked_before_the_path() {
        let c = config(r#""agent":{"missing":"reject"}"#);
        let mut h = head(None);
        h.path = Some("/v1/models".into());
        assert_eq!(
            admit(&h, None, true, &c),
            Admission::Refuse(Refusal::MissingAgentId)
        );
        h.agent = Some("agent-7".into());
        assert_eq!(
            admit(&h, None, true, &c),
            Admission::Refuse(Refusal::InvalidAgentId)
        );
        assert_eq!(
            admit(&head(None), None, false, &config("")),
            Admission::Pass
        );
    }

    #[test]
    fn other_paths_and_bodiless_requests_pass() {
        let c = config("");
        let mut h = head(Some(AGENT));
        assert_eq!(admit(&h, None, true, &c), Admission::Pass, "no body");
        h.path = Some("/v1/models".into());
        assert_eq!(admit(&h, None, false, &c), Admission::Pass, "no format");
    }

    #[test]
    fn encoded_and_oversized_bodies_are_refused() {
        let c = config(r#""inject":{"max_body_bytes":100}"#);
        let mut h = head(Some(AGENT));
        h.content_encoding = Some(" Identity ".into());
        h.content_length = Some("100".into());
        assert!(matches!(
            admit(&h, None, false, &c),
            Admission::Resolve { .. }
        ));
        h.content_length = Some("101".into());
        assert_eq!(
            admit(&h, None, false, &c),
            Admission::Refuse(Refusal::BodyTooLarge)
        );
        h.content_encoding = Some("identity, gzip".into());
        assert_eq!(
            admit(&h, None, false, &c),
            Admission::Refuse(Refusal::UnsupportedEncoding)
        );
    }

    fn on(path: &str, end_of_stream: bool, c: &Config) -> Admission {
        let mut h = head(Some(AGENT));
        h.path = Some(path.into());
        admit(&h, None, end_of_stream, c)
    }

    const UNSUPPORTED: Admission = Admission::Refuse(Refusal::UnsupportedPath);

    /// Every spelling an upstream could route to chat completions gets the directive
    /// or is refused, whatever `inject.other_paths` says; none is forwarded as is.
    #[test]
    fn aliases_of_an_injection_path_are_injected_or_refused() {
        let injected = [
            "/v1/chat/completions/",
            "/v1//chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat/completion%73",
            "/V1/CHAT/COMPLETIONS",
            "/v1/chat/completions;x=1",
            "/v1/chat\\completions",
            "/openai/deployments/d/chat/completions?api-version=2024-10-21",
        ];
        let refused = [
            "/v1/chat/completion%2573",
            "/v1/chat/completion%zz",
            "/v1/chat/completions%",
            "/v1/chat/completions%00",
            "/v1/chat/completions%3F",
            "/v1/chat/completion\u{17f}",
            "/v1/models/../chat/completions",
            "/v1/./chat/completions",
            "*",
        ];
        for c in [config(""), config(r#""inject":{"other_paths":"pass"}"#)] {
            for path in injected {
                match on(path, false, &c) {
                    Admission::Resolve { format, .. } => {
                        assert_eq!(format, Format::OpenAiChat, "{path}")
                    }
                    other => panic!("{path}: {other:?}"),
                }
            }
            for path in refused {
                assert_eq!(on(path, false, &c), UNSUPPORTED, "{path}");
            }
        }
        let mut h = head(Some(AGENT));
        h.path = None;
        assert_eq!(admit(&h, None, false, &config("")), UNSUPPORTED, "no :path");
    }

    #[test]
    fn unknown_endpoints_are_refused_unless_other_paths_is_pass() {
        let unknown = [
            "/v1beta/models/gemini-2.0-flash:batchGenerateContent",
            "/v1beta/cachedContents",
            "/model/anthropic.claude-3-haiku/invoke",
            "/v1/projects/p/locations/l/publishers/meta/models/llama:rawPredict",
            "/api/embed",
            "/v1/images/generations",
            "/v1/threads/thread_1/messages",
            "/v1/threads/runs",
            "/v1/models/gpt-4o",
            "/",
        ];
        let refuse = config("");
        let pass = config(r#""inject":{"other_paths":"pass"}"#);
        for path in unknown {
            assert_eq!(on(path, false, &refuse), UNSUPPORTED, "{path}");
            assert_eq!(on(path, false, &pass), Admission::Pass, "{path}");
        }
    }

    #[test]
    fn every_provider_endpoint_resolves_in_its_format() {
        let c = config("");
        for (path, format) in [
            ("/v1/messages/batches", Format::AnthropicBatches),
            ("/v1/completions", Format::OpenAiCompletions),
            (
                "/v1beta/models/gemini-2.0-flash:generateContent",
                Format::Gemini,
            ),
            (
                "/v1/projects/p/locations/l/publishers/google/models/g:streamGenerateContent",
                Format::Gemini,
            ),
            (
                "/v1beta/models/gemini-2.0-flash:countTokens",
                Format::GeminiCountTokens,
            ),
            (
                "/model/anthropic.claude-3-haiku/converse",
                Format::BedrockConverse,
            ),
            ("/api/chat", Format::OpenAiChat),
            ("/api/generate", Format::OllamaGenerate),
        ] {
            match on(path, false, &c) {
                Admission::Resolve { format: f, .. } => assert_eq!(f, format, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn openai_thread_messages_are_not_anthropic() {
        let c = config("");
        assert_eq!(on("/v1/threads/x/messages", false, &c), UNSUPPORTED);
        assert!(matches!(
            on("/v1/messages", false, &c),
            Admission::Resolve {
                format: Format::AnthropicMessages,
                ..
            }
        ));
    }

    #[test]
    fn pass_paths_and_bodiless_requests_are_forwarded_whatever_the_path() {
        let c = config("");
        for path in [
            "/v1/embeddings",
            "/v1/moderations",
            "/v1/models",
            "/api/embeddings",
        ] {
            assert_eq!(on(path, false, &c), Admission::Pass, "{path}");
        }
        for path in [
            "/v1/models",
            "/v1/models/gpt-4o",
            "/v1/messages/batches/b1",
            "/v1/chat/completions",
            "/v1/chat/completion%2573",
            "*",
        ] {
            assert_eq!(on(path, true, &c), Admission::Pass, "bodiless {path}");
        }
        let c = config(r#""inject":{"pass_paths":[]}"#);
        assert_eq!(on("/v1/embeddings", false, &c), UNSUPPORTED);
    }

    #[test]
    fn the_agent_is_checked_before_any_path_rule() {
        let c = config(r#""agent":{"missing":"reject"}"#);
        let mut h = head(None);
        for path in ["/v1/completions", "/v1/chat/completion%2573"] {
            h.path = Some(path.into());
            h.agent = None;
            assert_eq!(
                admit(&h, None, false, &c),
                Admission::Refuse(Refusal::MissingAgentId)
            );
            h.agent = Some("agent-7".into());
            assert_eq!(
                admit(&h, None, false, &c),
                Admission::Refuse(Refusal::InvalidAgentId)
            );
        }
    }
}

#[cfg(test)]
mod jwt_source {
    use super::*;

    const AGENT: &str = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
    const OTHER: &str = "00000000-0000-4000-8000-000000000001";

    fn jwt(extra: &str) -> Config {
        Config::parse(
            format!(r#"{{"agent":{{"source":"jwt","jwt":{{"provider":"idp"}}{extra}}}}}"#)
                .as_bytes(),
            None,
        )
        .unwrap()
    }

    fn head(agent: Option<&str>) -> HeadFields {
        HeadFields {
            path: Some("/v1/chat/completions".into()),
            agent: agent.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn the_verified_claim_is_the_agent_and_the_header_is_not_consulted() {
        let c = jwt("");
        for header in [None, Some(OTHER), Some("not-a-uuid")] {
            match admit(&head(header), Some(AGENT.as_bytes()), false, &c) {
                Admission::Resolve { agent, .. } => assert_eq!(agent.to_string(), AGENT),
                other => panic!("{header:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn no_claim_is_401_whatever_agent_missing_says() {
        for c in [
            jwt(""),
            jwt(r#","missing":"pass""#),
            jwt(r#","missing":"reject""#),
        ] {
            for eos in [false, true] {
                assert_eq!(
                    admit(&head(Some(AGENT)), None, eos, &c),
                    Admission::Refuse(Refusal::MissingAgentId)
                );
            }
        }
    }

    #[test]
    fn a_claim_that_is_no_uuid_string_is_400() {
        let c = jwt("");
        for claim in [
            b"agent-7".as_slice(),
            b"",
            &42f64.to_le_bytes(),
            b"\xff\xfe",
            b"\n\x08\n\x06agent",
        ] {
            assert_eq!(
                admit(&head(None), Some(claim), false, &c),
                Admission::Refuse(Refusal::InvalidAgentId),
                "{claim:?}"
            );
        }
    }

    #[test]
    fn the_header_source_ignores_any_claim() {
        let c = Config::parse(b"{}", None).unwrap();
        assert_eq!(
            admit(&head(None), Some(AGENT.as_bytes()), false, &c),
            Admission::Pass
        );
    }
}

#[cfg(test)]
mod review_serialized {
    use super::*;

    fn serialize(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = (headers.len() as u32).to_le_bytes().to_vec();
        for (n, v) in headers {
            out.extend_from_slice(&(n.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (n, v) in headers {
            out.extend_from_slice(n);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn random_maps_and_their_mutations_never_panic_and_agree_with_the_pairs() {
        let mut s: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let names: [&[u8]; 7] = [
            b":path",
            b"x-agent-id",
            b"authorization",
            b"content-length",
            b"\xff\xfe",
            b"",
            b"x",
        ];
        for _ in 0..20_000 {
            let n = (rnd() % 6) as usize;
            let headers: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                .map(|_| {
                    let name = names[(rnd() % 7) as usize].to_vec();
                    let len = (rnd() % 6) as usize;
                    let value = (0..len).map(|_| (rnd() % 256) as u8).collect();
                    (name, value)
                })
                .collect();
            let raw = serialize(&headers);
            let got = HeadFields::pick_serialized(&raw, "x-agent-id", Some("authorization"));
            let pairs = headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()));
            let want = HeadFields::pick_pairs(pairs, "x-agent-id", Some("authorization"));
            assert_eq!(got, Some(want));
            // Mutations: any byte, truncation, extension.
            for _ in 0..8 {
                let mut m = raw.clone();
                match rnd() % 3 {
                    0 if !m.is_empty() => {
                        let i = (rnd() as usize) % m.len();
                        m[i] = rnd() as u8;
                    }
                    1 => m.truncate((rnd() as usize) % (m.len() + 1)),
                    _ => m.push(rnd() as u8),
                }
                let _ = HeadFields::pick_serialized(&m, "x-agent-id", Some("authorization"));
            }
        }
    }
}
