//! Plugin configuration: the JSON in Envoy's `configuration` field, parsed once in
//! `on_configure` into an immutable [`Config`] shared by every request.
//!
//! Parsing is strict: an unknown field, a wrong type or an out-of-range value is an
//! error that names the field (`cache.ttl_seconds`), so Envoy rejects the listener
//! instead of running half-configured. Everything a request needs that can be derived
//! from the configuration (lower-cased header names, the JSON prefix of the injected
//! chat message) is derived here, never per request.
//!
//! This file holds the types, every default and [`Config::parse`], which reads the
//! document section by section; the JSON reader it uses (a field at a time, unknown
//! fields refused, the checks of names) is `read`, and the path policy
//! (`inject.paths`, `inject.pass_paths`, `inject.other_paths`: their defaults, how
//! they are read and how a request path is matched) is `paths`.
//!
//! This module must never touch proxy-wasm: it is unit-tested natively.

use ibex_wire::Redacted;
use serde_json::{Map, Value};
use std::fmt;

use crate::escape::escape_json_str;

mod paths;
mod read;

pub use paths::{OtherPaths, PathPolicy, Pattern, Route, DEFAULT_FORMAT_PATHS, DEFAULT_PASS_PATHS};

use read::{choice, err, header_name, key_prefix, plain_token, Section};

/// Environment variable (passed through `vm_config.environment_variables`) that sets
/// the default of `cache.ttl_seconds`.
pub const TTL_ENV: &str = "IBEX_DIRECTIVE_CACHE_TTL";

/// Which job this filter instance does on its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Resolve each request's directive and inject it.
    Data,
    /// Serve the invalidation endpoint only (loopback control listener).
    Control,
}

/// What to do with a request that carries no agent header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingAgent {
    /// Forward it untouched.
    Pass,
    /// Answer 401 `missing_agent_id`.
    Reject,
}

/// Where a request's agent comes from (`agent.source`, SPEC §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSource {
    /// `"header"`: the agent header, set by a trusted hop in front of Envoy.
    Header,
    /// `"jwt"`: a claim of the payload Envoy's `jwt_authn` filter verified; the agent
    /// header is never consulted and is removed before forwarding.
    Jwt(JwtSource),
    /// `"api_key"`: a gateway key the client presents, resolved to its agent through
    /// the tiers by its SHA-256; the key header and the agent header are removed
    /// before forwarding and the agent header is never consulted.
    ApiKey(ApiKeySource),
}

/// Where the gateway key is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeySource {
    /// `agent.api_key.header`, lower-cased.
    pub header: String,
    /// Derived: the header is `authorization`, whose value is `Bearer <key>`; any
    /// other header holds the key itself.
    pub bearer: bool,
}

impl AgentSource {
    /// The header holding the gateway key, with the `api_key` source.
    pub fn key_header(&self) -> Option<&str> {
        match self {
            AgentSource::ApiKey(k) => Some(&k.header),
            _ => None,
        }
    }
}

/// Where the verified JWT payload is and which claim of it names the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSource {
    /// `agent.jwt.provider`: the dynamic-metadata key under
    /// `envoy.filters.http.jwt_authn` where `jwt_authn` writes the verified payload,
    /// that is the provider's `payload_in_metadata` value (by convention the provider
    /// name, so set `payload_in_metadata` to it).
    pub provider: String,
    /// `agent.jwt.claim`, split at dots: the path of the claim inside the payload
    /// (`"agent_id"` → `["agent_id"]`, `"ibex.agent"` → `["ibex", "agent"]`).
    pub claim: Vec<String>,
}

impl JwtSource {
    /// The property path of the claim, as the host's property access reads it:
    /// `metadata.filter_metadata."envoy.filters.http.jwt_authn".<provider>.<claim…>`.
    pub fn property_path(&self) -> Vec<&str> {
        let mut path = vec![
            "metadata",
            "filter_metadata",
            JWT_AUTHN_NAMESPACE,
            self.provider.as_str(),
        ];
        path.extend(self.claim.iter().map(String::as_str));
        path
    }
}

/// Dynamic-metadata namespace Envoy's `jwt_authn` filter writes verified payloads in.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// What to do when the directive cannot be known (L2 and L3 failed, nothing stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Answer 503 `directive_unavailable`.
    Closed,
    /// Forward the request without a directive.
    Open,
}

/// The protocol of the HTTP front of Redis (`redis.dialect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Webdis: commands in the path, Redis protocol (`.raw`) answers.
    Webdis,
    /// The Upstash REST API (managed Upstash, or `ibex-companion rest`): commands
    /// as JSON arrays, `{"result":…}` answers, values in base64.
    Upstash,
}

/// L2 settings: the Envoy cluster in front of Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Envoy cluster name of the Redis HTTP front (`redis.cluster`).
    pub cluster: String,
    /// `:authority` sent on callouts (`redis.authority`).
    pub authority: String,
    /// The front's protocol (`redis.dialect`).
    pub dialect: Dialect,
    /// `Authorization` value of the `upstash` dialect, `Bearer <redis.token>`, built
    /// once here; `None` with Webdis, which has no authentication. Its `Debug` shows
    /// the length only.
    pub authorization: Option<Redacted<String>>,
    /// Redis key = prefix + agent id (`redis.key_prefix`).
    pub key_prefix: String,
    /// Per-callout timeout in milliseconds (`redis.timeout_ms`).
    pub timeout_ms: u64,
}

/// L3 settings: the Envoy cluster of the companion store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Envoy cluster name of the store (`store.cluster`).
    pub cluster: String,
    /// `:authority` sent on callouts (`store.authority`).
    pub authority: String,
    /// Per-callout timeout in milliseconds (`store.timeout_ms`).
    pub timeout_ms: u64,
}

/// The validated, immutable plugin configuration. Its `Debug` shows the control
/// token's length only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `role`: data or control.
    pub role: Role,
    /// `agent.header`, lower-cased: where the agent id is read.
    pub agent_header: String,
    /// `agent.missing`: what a request without the header gets (header source only:
    /// with `jwt`, a request without a verified claim is always refused).
    pub missing_agent: MissingAgent,
    /// `agent.source` with `agent.jwt.*` / `agent.api_key.*`: where the agent comes
    /// from.
    pub agent_source: AgentSource,
    /// `cache.ttl_seconds`: freshness of positive entries in L1 and L2.
    pub ttl_seconds: u64,
    /// `cache.negative_ttl_seconds`: freshness of "no directive" entries.
    pub negative_ttl_seconds: u64,
    /// `cache.stale_if_error_seconds`: how long past expiry an entry may still be
    /// served while L2 and L3 both fail.
    pub stale_if_error_seconds: u64,
    /// `cache.worker_copy_bytes`: how many bytes of L1 answers each worker VM keeps
    /// a copy of in its own memory, so a warm hit reads no shared data (0: none).
    pub worker_copy_bytes: usize,
    /// `redis.*`.
    pub redis: RedisConfig,
    /// `store.*`.
    pub store: StoreConfig,
    /// `inject.role`: role of the inserted chat message (`system` or `developer`).
    pub inject_role: String,
    /// `inject.max_body_bytes`: larger request bodies are refused with 413.
    pub max_body_bytes: u64,
    /// Derived: the largest body a splice may produce, 4 × `inject.max_body_bytes`
    /// (a directive per completions prompt or batch request multiplies it); a body
    /// that would grow past it is refused with 413.
    pub max_spliced_bytes: usize,
    /// `inject.cache_control`: in the Anthropic formats, the directive's block is a
    /// prompt-cache breakpoint (while the request has room for one).
    pub cache_control: bool,
    /// `inject.paths`, `inject.pass_paths` and `inject.other_paths`, normalised:
    /// which paths get a directive, which pass untouched, what any other gets.
    pub paths: PathPolicy,
    /// `failure_mode`.
    pub failure_mode: FailureMode,
    /// `control.token`: bearer token the control role requires, if any.
    pub control_token: Option<Redacted<String>>,
    /// `debug_headers`: add `x-ibex-directive` to the upstream request.
    pub debug_headers: bool,
    /// `audit.response_header`: the client gets `x-ibex-directive-version`.
    pub audit_response_header: bool,
    /// `audit.filter_state`: how each request's audit record goes into filter state
    /// for the access log: `"combined"` (one property, `wasm.ibex.audit`), `"fields"`
    /// (four, `wasm.ibex.agent_id` …: each costs Envoy about 3 µs of CPU, measured)
    /// or `"off"`.
    pub audit_filter_state: crate::audit::Layout,
    /// Derived: `{"role":"<inject.role>","content":"` — the chat message prefix,
    /// built once so a request only appends the cached, already-escaped directive.
    pub chat_message_prefix: String,
}

/// A configuration that must be refused, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field (`cache.ttl_seconds`), or the env variable name.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid ibex_directive configuration: field `{}`: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Longest TTL accepted, in seconds (one year): beyond it a typo is likelier than intent.
const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;
/// Default of `cache.worker_copy_bytes`: per worker VM, two halves of 4 MiB
/// (`crate::hot`), about 17 000 agents of a 400-byte directive. A hot set larger
/// than a half turns every hit into a miss of the copies (one read more than none).
const DEFAULT_WORKER_COPY_BYTES: u64 = 8 << 20;
/// Upper bound of `cache.worker_copy_bytes` (64 MiB): a wasm32 VM has 4 GiB in all,
/// and the maps' real size is a multiple of what they count.
const MAX_WORKER_COPY_BYTES: u64 = 64 << 20;
/// Longest callout timeout accepted, in milliseconds.
const MAX_TIMEOUT_MS: u64 = 60_000;

impl Config {
    /// What the request path `raw` (`:path`, query included) is for this
    /// configuration: normalised as the upstream will route it, then matched.
    pub fn route(&self, raw: &str) -> Route {
        self.paths.route(raw)
    }

    /// Parses the plugin configuration. `raw` is the `configuration` string (empty
    /// means all defaults); `env_ttl` is the value of [`TTL_ENV`] if set.
    pub fn parse(raw: &[u8], env_ttl: Option<&str>) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(raw).map_err(|_| err("<root>", "not valid UTF-8"))?;
        let value = if text.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_str::<Value>(text)
                .map_err(|e| err("<root>", format!("not valid JSON: {e}")))?
        };
        let mut root = Section::new("", value)?;

        let role = choice(
            "role",
            &root.string("role", "data")?,
            &[("data", Role::Data), ("control", Role::Control)],
        )?;

        let mut agent = root.section("agent")?;
        let agent_header = header_name("agent.header", &agent.string("header", "x-agent-id")?)?;
        let missing_agent = choice(
            "agent.missing",
            &agent.string("missing", "pass")?,
            &[
                ("pass", MissingAgent::Pass),
                ("reject", MissingAgent::Reject),
            ],
        )?;
        let agent_source = agent_source(&mut agent, &agent_header)?;
        agent.finish()?;

        let ttl_default = match env_ttl {
            None => 60,
            Some(s) => match s.trim().parse::<u64>() {
                Ok(n) if (1..=MAX_TTL_SECONDS).contains(&n) => n,
                _ => {
                    return Err(err(
                        TTL_ENV,
                        format!("must be an integer between 1 and {MAX_TTL_SECONDS}"),
                    ))
                }
            },
        };
        let mut cache = root.section("cache")?;
        let ttl_seconds = cache.integer("ttl_seconds", ttl_default, 1, MAX_TTL_SECONDS)?;
        let negative_ttl_seconds = cache.integer("negative_ttl_seconds", 10, 1, MAX_TTL_SECONDS)?;
        let stale_if_error_seconds =
            cache.integer("stale_if_error_seconds", 300, 0, MAX_TTL_SECONDS)?;
        let worker_copy_bytes = cache.integer(
            "worker_copy_bytes",
            DEFAULT_WORKER_COPY_BYTES,
            0,
            MAX_WORKER_COPY_BYTES,
        )?;
        cache.finish()?;

        let mut section = root.section("redis")?;
        let cluster = plain_token("redis.cluster", &section.string("cluster", "ibex_redis")?)?;
        let authority = plain_token(
            "redis.authority",
            &section.string("authority", "ibex_redis")?,
        )?;
        let dialect = choice(
            "redis.dialect",
            &section.string("dialect", "webdis")?,
            &[("webdis", Dialect::Webdis), ("upstash", Dialect::Upstash)],
        )?;
        let token = section.opt_string("token")?;
        let authorization = match (dialect, token) {
            (Dialect::Upstash, Some(t)) if header_safe_token(&t) => {
                Some(Redacted::new(format!("Bearer {t}")))
            }
            (Dialect::Upstash, Some(_)) => {
                return Err(err(
                    "redis.token",
                    "must be non-empty printable ASCII without spaces",
                ))
            }
            (Dialect::Upstash, None) => {
                return Err(err(
                    "redis.token",
                    "is required with redis.dialect \"upstash\"",
                ))
            }
            (Dialect::Webdis, Some(_)) => {
                return Err(err(
                    "redis.token",
                    "is only for redis.dialect \"upstash\" (Webdis has no authentication)",
                ))
            }
            (Dialect::Webdis, None) => None,
        };
        let redis = RedisConfig {
            cluster,
            authority,
            dialect,
            authorization,
            key_prefix: key_prefix(
                "redis.key_prefix",
                &section.string("key_prefix", ibex_wire::DEFAULT_KEY_PREFIX)?,
            )?,
            timeout_ms: section.integer("timeout_ms", 50, 1, MAX_TIMEOUT_MS)?,
        };
        section.finish()?;

        let mut store = root.section("store")?;
        let store_cfg = StoreConfig {
            cluster: plain_token("store.cluster", &store.string("cluster", "ibex_store")?)?,
            authority: plain_token("store.authority", &store.string("authority", "ibex_store")?)?,
            timeout_ms: store.integer("timeout_ms", 500, 1, MAX_TIMEOUT_MS)?,
        };
        store.finish()?;

        let mut inject = root.section("inject")?;
        let inject_role = inject.string("role", "system")?;
        choice(
            "inject.role",
            &inject_role,
            &[("system", ()), ("developer", ())],
        )?;
        let max_body_bytes = inject.integer("max_body_bytes", 1_048_576, 1, 64 * 1_048_576)?;
        let cache_control = inject.boolean("cache_control", false)?;
        let paths = paths::read(&mut inject)?;
        inject.finish()?;

        let failure_mode = choice(
            "failure_mode",
            &root.string("failure_mode", "closed")?,
            &[("closed", FailureMode::Closed), ("open", FailureMode::Open)],
        )?;

        let mut control = root.section("control")?;
        let control_token = control.opt_string("token")?;
        if let Some(t) = &control_token {
            if !header_safe_token(t) {
                return Err(err(
                    "control.token",
                    "must be non-empty printable ASCII without spaces",
                ));
            }
        }
        control.finish()?;

        let mut audit = root.section("audit")?;
        let audit_response_header = audit.boolean("response_header", false)?;
        let audit_filter_state = choice(
            "audit.filter_state",
            &audit.string("filter_state", "combined")?,
            &[
                ("combined", crate::audit::Layout::Combined),
                ("fields", crate::audit::Layout::Fields),
                ("off", crate::audit::Layout::Off),
            ],
        )?;
        audit.finish()?;

        let debug_headers = root.boolean("debug_headers", false)?;
        root.finish()?;

        let chat_message_prefix = format!(
            "{{\"role\":\"{}\",\"content\":\"",
            escape_json_str(&inject_role)
        );

        Ok(Config {
            role,
            agent_header,
            missing_agent,
            agent_source,
            ttl_seconds,
            negative_ttl_seconds,
            stale_if_error_seconds,
            worker_copy_bytes: usize::try_from(worker_copy_bytes).unwrap_or(usize::MAX),
            redis,
            store: store_cfg,
            inject_role,
            max_body_bytes,
            max_spliced_bytes: usize::try_from(max_body_bytes.saturating_mul(4))
                .unwrap_or(usize::MAX),
            cache_control,
            paths,
            failure_mode,
            control_token: control_token.map(Redacted::new),
            debug_headers,
            audit_response_header,
            audit_filter_state,
            chat_message_prefix,
        })
    }
}

/// `agent.source`, `agent.jwt` and `agent.api_key`. Each section is checked whenever
/// it is given; the jwt provider is required only when the source is `"jwt"`.
fn agent_source(agent: &mut Section<'_>, agent_header: &str) -> Result<AgentSource, ConfigError> {
    let source = agent.string("source", "header")?;
    let mut jwt = Section::new(
        "agent.jwt",
        agent.take("jwt").unwrap_or(Value::Object(Map::new())),
    )?;
    let provider = jwt.opt_string("provider")?;
    let claim = jwt.string("claim", "agent_id")?;
    jwt.finish()?;
    let mut key = Section::new(
        "agent.api_key",
        agent.take("api_key").unwrap_or(Value::Object(Map::new())),
    )?;
    let key_header = header_name(
        "agent.api_key.header",
        &key.string("header", "authorization")?,
    )?;
    key.finish()?;
    if let Some(p) = &provider {
        if p.is_empty() || p.chars().any(char::is_control) {
            return Err(err(
                "agent.jwt.provider",
                "must be a non-empty string without control characters",
            ));
        }
    }
    let segments: Vec<String> = claim.split('.').map(String::from).collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || s.chars().any(char::is_control))
    {
        return Err(err(
            "agent.jwt.claim",
            "must be a claim name or a dotted path of them (`ibex.agent`), each part non-empty and without control characters",
        ));
    }
    // The key header is removed before forwarding, and admission reads these
    // headers for other purposes: sharing one would make a key of an agent id or
    // drop the body's framing.
    if key_header == agent_header || RESERVED_KEY_HEADERS.contains(&key_header.as_str()) {
        return Err(err(
            "agent.api_key.header",
            format!("\"{key_header}\" cannot hold the key (it is agent.header or a header the request needs)"),
        ));
    }
    match source.as_str() {
        "header" => Ok(AgentSource::Header),
        "jwt" => match provider {
            Some(provider) => Ok(AgentSource::Jwt(JwtSource {
                provider,
                claim: segments,
            })),
            None => Err(err(
                "agent.jwt.provider",
                "required when agent.source is \"jwt\"",
            )),
        },
        "api_key" => Ok(AgentSource::ApiKey(ApiKeySource {
            bearer: key_header == "authorization",
            header: key_header,
        })),
        other => choice(
            "agent.source",
            other,
            &[("header", ()), ("jwt", ()), ("api_key", ())],
        )
        .map(|()| AgentSource::Header),
    }
}

/// Headers that can never carry the gateway key.
const RESERVED_KEY_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-encoding",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
];

/// A bearer token that fits in a header value as it is: printable ASCII, no spaces.
fn header_safe_token(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::Format;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s.as_bytes(), None)
    }

    #[test]
    fn empty_configuration_gives_every_default() {
        for raw in ["", "  ", "{}"] {
            let c = parse(raw).unwrap();
            assert_eq!(c.role, Role::Data);
            assert_eq!(c.agent_header, "x-agent-id");
            assert_eq!(c.missing_agent, MissingAgent::Pass);
            assert_eq!(c.agent_source, AgentSource::Header);
            assert_eq!(c.ttl_seconds, 60);
            assert_eq!(c.negative_ttl_seconds, 10);
            assert_eq!(c.stale_if_error_seconds, 300);
            assert_eq!(c.worker_copy_bytes, 8 << 20);
            assert_eq!(c.redis.cluster, "ibex_redis");
            assert_eq!(c.redis.authority, "ibex_redis");
            assert_eq!(c.redis.key_prefix, "directive:");
            assert_eq!(c.redis.timeout_ms, 50);
            assert_eq!(c.store.cluster, "ibex_store");
            assert_eq!(c.store.authority, "ibex_store");
            assert_eq!(c.store.timeout_ms, 500);
            assert_eq!(c.inject_role, "system");
            assert_eq!(c.max_body_bytes, 1_048_576);
            assert!(!c.cache_control);
            assert_eq!(c.failure_mode, FailureMode::Closed);
            assert_eq!(c.control_token, None);
            assert!(!c.debug_headers);
            assert_eq!(c.chat_message_prefix, r#"{"role":"system","content":""#);
        }
    }

    #[test]
    fn every_field_can_be_set() {
        let c = parse(
            r#"{"role":"control","agent":{"header":"X-Tenant-Agent","missing":"reject"},
            "cache":{"ttl_seconds":5,"negative_ttl_seconds":2,"stale_if_error_seconds":0},
            "redis":{"cluster":"r","authority":"r.local","dialect":"webdis","key_prefix":"d:","timeout_ms":20},
            "store":{"cluster":"s","authority":"s.local","timeout_ms":300},
            "inject":{"role":"developer","max_body_bytes":1000,"cache_control":true},
            "failure_mode":"open","control":{"token":"s3cret"},"debug_headers":true}"#,
        )
        .unwrap();
        assert_eq!(c.role, Role::Control);
        assert_eq!(c.agent_header, "x-tenant-agent");
        assert_eq!(c.missing_agent, MissingAgent::Reject);
        assert_eq!(
            (
                c.ttl_seconds,
                c.negative_ttl_seconds,
                c.stale_if_error_seconds
            ),
            (5, 2, 0)
        );
        assert_eq!(c.redis.key_prefix, "d:");
        assert_eq!(c.redis.timeout_ms, 20);
        assert_eq!(c.store.authority, "s.local");
        assert_eq!(c.max_body_bytes, 1000);
        assert!(c.cache_control);
        assert_eq!(c.failure_mode, FailureMode::Open);
        assert_eq!(
            c.control_token.as_ref().map(|t| t.expose().as_str()),
            Some("s3cret")
        );
        assert!(c.debug_headers);
        assert_eq!(c.chat_message_prefix, r#"{"role":"developer","content":""#);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "token must not reach debug output"
        );
        assert_eq!(
            (c.redis.dialect, c.redis.authorization),
            (Dialect::Webdis, None)
        );
    }

    #[test]
    fn the_upstash_dialect_carries_its_bearer_token() {
        let c = parse(r#"{"redis":{"dialect":"upstash","token":"AYk-Tok_en="}}"#).unwrap();
        assert_eq!(c.redis.dialect, Dialect::Upstash);
        assert_eq!(
            c.redis.authorization.as_ref().map(|a| a.expose().as_str()),
            Some("Bearer AYk-Tok_en=")
        );
        assert!(!format!("{c:?}").contains("AYk"), "token in debug output");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"cache":{"ttl_secondz":5}}"#,
                "cache.ttl_secondz",
                "unknown",
            ),
            (
                r#"{"cache":{"ttl_seconds":"5"}}"#,
                "cache.ttl_seconds",
                "integer",
            ),
            (
                r#"{"cache":{"ttl_seconds":0}}"#,
                "cache.ttl_seconds",
                "between",
            ),
            (
                r#"{"cache":{"ttl_seconds":-1}}"#,
                "cache.ttl_seconds",
                "integer",
            ),
            (
                r#"{"cache":{"worker_copy_bytes":67108865}}"#,
                "cache.worker_copy_bytes",
                "between",
            ),
            (
                r#"{"cache":{"worker_copy_bytes":"1M"}}"#,
                "cache.worker_copy_bytes",
                "integer",
            ),
            (
                r#"{"cache":{"ttl_seconds":1.5}}"#,
                "cache.ttl_seconds",
                "integer",
            ),
            (r#"{"failure_mode":"half"}"#, "failure_mode", "one of"),
            (r#"{"agent":{"missing":true}}"#, "agent.missing", "string"),
            (
                r#"{"agent":{"header":"x agent"}}"#,
                "agent.header",
                "header name",
            ),
            (r#"{"agent":"x"}"#, "agent", "object"),
            (r#"{"inject":{"role":"user"}}"#, "inject.role", "one of"),
            (
                r#"{"inject":{"cache_control":"ephemeral"}}"#,
                "inject.cache_control",
                "true or false",
            ),
            (
                r#"{"redis":{"dialect":"redis"}}"#,
                "redis.dialect",
                "one of",
            ),
            (
                r#"{"redis":{"dialect":"upstash"}}"#,
                "redis.token",
                "required",
            ),
            (
                r#"{"redis":{"dialect":"upstash","token":"a b"}}"#,
                "redis.token",
                "printable",
            ),
            (
                r#"{"redis":{"dialect":"upstash","token":""}}"#,
                "redis.token",
                "printable",
            ),
            (r#"{"redis":{"token":"t"}}"#, "redis.token", "only for"),
            (
                r#"{"redis":{"key_prefix":"a/b"}}"#,
                "redis.key_prefix",
                "may only",
            ),
            (r#"{"redis":{"cluster":""}}"#, "redis.cluster", "valid name"),
            (
                r#"{"store":{"timeout_ms":0}}"#,
                "store.timeout_ms",
                "between",
            ),
            (
                r#"{"debug_headers":"yes"}"#,
                "debug_headers",
                "true or false",
            ),
            (r#"{"control":{"token":""}}"#, "control.token", "non-empty"),
            (r#"{"rol":"data"}"#, "rol", "unknown"),
            (r#"[1]"#, "<root>", "object"),
            (r#"{"#, "<root>", "JSON"),
        ];
        for (raw, field, reason) in cases {
            let e = parse(raw).unwrap_err();
            assert_eq!(e.field, field, "for {raw}");
            assert!(e.reason.contains(reason), "for {raw}: {}", e.reason);
            assert!(e.to_string().contains(field));
        }
    }

    #[test]
    fn the_agent_can_come_from_a_verified_jwt() {
        let c = parse(r#"{"agent":{"source":"jwt","jwt":{"provider":"idp"}}}"#).unwrap();
        let AgentSource::Jwt(jwt) = &c.agent_source else {
            panic!("{:?}", c.agent_source)
        };
        assert_eq!(jwt.provider, "idp");
        assert_eq!(jwt.claim, ["agent_id"]);
        assert_eq!(
            jwt.property_path(),
            [
                "metadata",
                "filter_metadata",
                "envoy.filters.http.jwt_authn",
                "idp",
                "agent_id"
            ]
        );
        let c =
            parse(r#"{"agent":{"source":"jwt","jwt":{"provider":"idp","claim":"ibex.agent"}}}"#)
                .unwrap();
        let AgentSource::Jwt(jwt) = &c.agent_source else {
            panic!()
        };
        assert_eq!(jwt.claim, ["ibex", "agent"]);
        let c = parse(r#"{"agent":{"source":"header"}}"#).unwrap();
        assert_eq!(c.agent_source, AgentSource::Header);
    }

    #[test]
    fn the_agent_can_come_from_a_gateway_key() {
        let c = parse(r#"{"agent":{"source":"api_key"}}"#).unwrap();
        assert_eq!(
            c.agent_source,
            AgentSource::ApiKey(ApiKeySource {
                header: "authorization".into(),
                bearer: true
            })
        );
        assert_eq!(c.agent_source.key_header(), Some("authorization"));
        let c =
            parse(r#"{"agent":{"source":"api_key","api_key":{"header":"X-Api-Key"}}}"#).unwrap();
        assert_eq!(
            c.agent_source,
            AgentSource::ApiKey(ApiKeySource {
                header: "x-api-key".into(),
                bearer: false
            })
        );
        assert_eq!(AgentSource::Header.key_header(), None);
    }

    #[test]
    fn bad_agent_sources_are_refused_by_name() {
        for (raw, field, reason) in [
            (
                r#"{"agent":{"source":"jwt"}}"#,
                "agent.jwt.provider",
                "required",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{}}}"#,
                "agent.jwt.provider",
                "required",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":""}}}"#,
                "agent.jwt.provider",
                "non-empty",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":7}}}"#,
                "agent.jwt.provider",
                "string",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":"a\u0000b"}}}"#,
                "agent.jwt.provider",
                "control",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":"p","claim":""}}}"#,
                "agent.jwt.claim",
                "non-empty",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":"p","claim":"a..b"}}}"#,
                "agent.jwt.claim",
                "non-empty",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":"p","claim":"a."}}}"#,
                "agent.jwt.claim",
                "non-empty",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":"p","claim":["a"]}}}"#,
                "agent.jwt.claim",
                "string",
            ),
            (
                r#"{"agent":{"source":"jwt","jwt":{"provider":"p","issuer":"x"}}}"#,
                "agent.jwt.issuer",
                "unknown",
            ),
            (r#"{"agent":{"jwt":"p"}}"#, "agent.jwt", "object"),
            (
                r#"{"agent":{"source":"api_key","api_key":{"header":"x agent"}}}"#,
                "agent.api_key.header",
                "valid header name",
            ),
            (
                r#"{"agent":{"source":"api_key","api_key":{"header":"X-Agent-Id"}}}"#,
                "agent.api_key.header",
                "cannot hold the key",
            ),
            (
                r#"{"agent":{"api_key":{"header":"content-length"}}}"#,
                "agent.api_key.header",
                "cannot hold the key",
            ),
            (
                r#"{"agent":{"api_key":{"prefix":"sk-"}}}"#,
                "agent.api_key.prefix",
                "unknown",
            ),
            (r#"{"agent":{"source":"cookie"}}"#, "agent.source", "one of"),
            (r#"{"agent":{"source":1}}"#, "agent.source", "string"),
        ] {
            let e = parse(raw).unwrap_err();
            assert_eq!(e.field, field, "{raw}");
            assert!(e.reason.contains(reason), "{raw}: {}", e.reason);
            assert!(e.to_string().contains(field));
        }
    }

    #[test]
    fn ttl_comes_from_the_environment_unless_configured() {
        let c = Config::parse(b"{}", Some("7")).unwrap();
        assert_eq!(c.ttl_seconds, 7);
        let c = Config::parse(br#"{"cache":{"ttl_seconds":9}}"#, Some("7")).unwrap();
        assert_eq!(c.ttl_seconds, 9);
        let e = Config::parse(b"{}", Some("soon")).unwrap_err();
        assert_eq!(e.field, TTL_ENV);
    }

    #[test]
    fn paths_map_to_formats_as_the_upstream_routes_them() {
        let c = parse("{}").unwrap();
        let chat = Route::Inject(Format::OpenAiChat);
        for raw in [
            "/v1/chat/completions",
            "/openai/deployments/x/chat/completions?api-version=1",
            "/v1/chat/completions/",
            "/V1/Chat/Completions;x",
        ] {
            assert_eq!(c.route(raw), chat, "{raw}");
        }
        let responses = Route::Inject(Format::OpenAiResponses);
        assert_eq!(c.route("/v1/responses"), responses);
        assert_eq!(c.route("/v1/responses/input_tokens"), responses);
        let messages = Route::Inject(Format::AnthropicMessages);
        assert_eq!(c.route("/v1/messages?beta=true"), messages);
        assert_eq!(c.route("/anthropic/v1/messages"), messages);
        assert_eq!(c.route("/v1/messages/count_tokens"), messages);
        assert_eq!(c.route("/v1/threads/t/messages"), Route::Other);
        assert_eq!(
            c.route("/v1/messages/batches"),
            Route::Inject(Format::AnthropicBatches)
        );
        assert_eq!(
            c.route("/v1/xchat/completions"),
            Route::Inject(Format::OpenAiCompletions),
            "no chat path, but a legacy completions one"
        );
        assert_eq!(c.route("/v1/chat/completions/x"), Route::Other);
        assert_eq!(c.route("/v1/x?p=/chat/completions"), Route::Other);
        assert_eq!(
            c.route("/v1/chat/completion%2573"),
            Route::Unclear(crate::path::Unclear::EscapedPercent)
        );
    }

    #[test]
    fn default_paths_cover_every_provider() {
        let c = parse("{}").unwrap();
        for (raw, format) in [
            // Azure OpenAI: deployment paths, api-version in the query.
            (
                "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                Format::OpenAiChat,
            ),
            (
                "/openai/deployments/gpt-35/completions?api-version=2024-10-21",
                Format::OpenAiCompletions,
            ),
            (
                "/openai/responses?api-version=2025-04-01-preview",
                Format::OpenAiResponses,
            ),
            ("/v1/completions", Format::OpenAiCompletions),
            ("/v1/chat/completions", Format::OpenAiChat),
            // Ollama: native and OpenAI-compatible.
            ("/api/chat", Format::OpenAiChat),
            ("/api/generate", Format::OllamaGenerate),
            ("/v1/completions", Format::OpenAiCompletions),
            // Anthropic.
            ("/v1/messages/batches", Format::AnthropicBatches),
            ("/v1/messages/count_tokens", Format::AnthropicMessages),
            // Vertex Anthropic, its token count included.
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict",
                Format::AnthropicMessages,
            ),
            (
                "/v1/projects/p/locations/global/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict",
                Format::AnthropicMessages,
            ),
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict",
                Format::AnthropicMessages,
            ),
            // Gemini API and Vertex Gemini.
            (
                "/v1beta/models/gemini-2.5-flash:generateContent",
                Format::Gemini,
            ),
            (
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                Format::Gemini,
            ),
            ("/v1/tunedModels/my-model:generateContent", Format::Gemini),
            (
                "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
                Format::Gemini,
            ),
            (
                "/v1beta1/projects/p/locations/l/endpoints/123:streamGenerateContent",
                Format::Gemini,
            ),
            (
                "/v1beta/models/gemini-2.5-flash:countTokens",
                Format::GeminiCountTokens,
            ),
            (
                "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:countTokens",
                Format::Gemini,
            ),
            // Spellings the normaliser folds: case, an escaped colon, ;params, a trailing /.
            (
                "/v1beta/models/gemini-2.5-flash:GENERATECONTENT",
                Format::Gemini,
            ),
            (
                "/v1beta/models/gemini-2.5-flash%3AgenerateContent",
                Format::Gemini,
            ),
            ("/v1beta/models/g:generateContent;x/", Format::Gemini),
            // Bedrock: ids with `:`, cross-region profiles, an ARN whose `/` was escaped.
            (
                "/model/anthropic.claude-3-sonnet-20240229-v1:0/converse",
                Format::BedrockConverse,
            ),
            (
                "/model/us.anthropic.claude-3-5-haiku-20241022-v1:0/converse-stream",
                Format::BedrockConverse,
            ),
            (
                "/model/anthropic.claude-3-sonnet-20240229-v1%3A0/converse",
                Format::BedrockConverse,
            ),
            (
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse",
                Format::BedrockConverse,
            ),
        ] {
            assert_eq!(c.route(raw), Route::Inject(format), "{raw}");
        }
        for raw in [
            // A verb is the end of the path, never a segment it continues from.
            "/v1beta/models/g:generateContent/x",
            "/v1beta/models/g:generateContentx",
            "/v1beta/models/g:embedContent",
            "/v1beta/models/g:batchGenerateContent",
            "/v1/projects/p/locations/l/publishers/meta/models/llama:rawPredict",
            "/v1/projects/p/locations/l/publishers/anthropic/models/claude:predict",
            // Bedrock: other operations, and an id that is not one segment (or two).
            "/model/m/invoke",
            "/model/m/converse/x",
            "/model/converse",
            "/model/a/b/c/converse",
            "/v1/messages/batches/msgbatch_1/cancel",
            "/api/embed",
        ] {
            assert_eq!(c.route(raw), Route::Other, "{raw}");
        }
        assert_eq!(
            c.route("/v1beta/models/g:generateContent/.."),
            Route::Unclear(crate::path::Unclear::DotSegment)
        );
        assert_eq!(
            c.route("/v1beta/models/g:generateContent/models"),
            Route::Other,
            "a pass path under an injection pattern is not passed"
        );
        assert_eq!(
            c.route("/model/m/converse/embeddings"),
            Route::Other,
            "under a pattern with parameters too"
        );
    }

    #[test]
    fn pass_paths_match_by_suffix_and_not_their_sub_paths() {
        let c = parse("{}").unwrap();
        assert_eq!(c.paths.pass, ["/models", "/embeddings", "/moderations"]);
        assert_eq!(c.paths.other, OtherPaths::Refuse);
        for raw in [
            "/v1/models",
            "/v1/embeddings",
            "/openai/deployments/d/embeddings?api-version=1",
            "/v1/moderations/",
            "/api/embeddings",
            "/models",
        ] {
            assert_eq!(c.route(raw), Route::Pass, "{raw}");
        }
        for raw in [
            "/v1/models/gpt-4o",
            "/v1/models/o/m/predictions",
            "/v1/embeddingsx",
            "/v1/xmodels",
            // under a generation path: a prefix-routing upstream would generate
            "/v1/chat/completions/models",
            "/v1/chat/completions;/models",
            "/v1/chat/completions%3B/models",
            "/v1/chat/completions/embeddings",
            "/v1/responses/models",
            "/v1/messages/moderations",
        ] {
            assert_eq!(c.route(raw), Route::Other, "{raw}");
        }
        assert_eq!(
            c.route("/v1beta/models/gemini-pro:generateContent"),
            Route::Inject(Format::Gemini),
            "generation under /models"
        );
        assert_eq!(
            c.route("/v1/chat/completionsx/models"),
            Route::Pass,
            "not at a boundary"
        );
        assert_eq!(
            c.route("/v1/models/x/chat/completions"),
            Route::Inject(Format::OpenAiChat),
            "an injection path wins over a pass path"
        );
    }

    #[test]
    fn configured_paths_replace_the_defaults_and_are_normalised() {
        let c = parse(
            r#"{"inject":{"paths":{"/Generate/":"openai_chat","/v2/chat%2Fcompletions":"openai_responses","/chat/completions":"openai_chat"},
            "pass_paths":["/Tokenize//", "/detokenize;x"],"other_paths":"pass"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.paths
                .formats
                .iter()
                .map(|(p, f)| (p.as_str(), *f))
                .collect::<Vec<_>>(),
            [
                ("/v2/chat/completions", Format::OpenAiResponses),
                ("/chat/completions", Format::OpenAiChat),
                ("/generate", Format::OpenAiChat),
            ],
            "normalised, longest first"
        );
        assert_eq!(c.route("/v1/GENERATE"), Route::Inject(Format::OpenAiChat));
        assert_eq!(
            c.route("/v2/chat/completions"),
            Route::Inject(Format::OpenAiResponses)
        );
        assert_eq!(
            c.route("/v1/messages"),
            Route::Other,
            "a configured mapping replaces the defaults"
        );
        assert_eq!(c.paths.pass, ["/tokenize", "/detokenize"]);
        assert_eq!(c.route("/v1/models"), Route::Other, "and pass_paths too");
        assert_eq!(c.route("/tokenize"), Route::Pass);
        assert_eq!(c.paths.other, OtherPaths::Pass);

        let c = parse(
            r#"{"inject":{"paths":{"/v1/{tenant}/generate":"ollama_generate","/{m}:predict":"gemini"},
            "pass_paths":["/{m}:embedContent"]}}"#,
        )
        .unwrap();
        assert_eq!(
            c.route("/v1/acme/generate"),
            Route::Inject(Format::OllamaGenerate)
        );
        assert_eq!(c.route("/v1/generate"), Route::Other);
        assert_eq!(
            c.route("/v1/models/x:PREDICT"),
            Route::Inject(Format::Gemini)
        );
        assert_eq!(c.route("/v1beta/models/e:embedContent"), Route::Pass);
        assert_eq!(
            c.route("/v1beta/models/e:predict/models/e:embedContent"),
            Route::Other,
            "a pass path under an injection pattern is not passed"
        );

        let c = parse(r#"{"inject":{"paths":{},"pass_paths":[]}}"#).unwrap();
        assert!(c.paths.formats.is_empty() && c.paths.pass.is_empty());
        assert_eq!(c.route("/v1/chat/completions"), Route::Other);
    }

    #[test]
    fn bad_path_fields_are_refused_by_name() {
        for (raw, field, reason) in [
            (
                r#"{"inject":{"paths":{"/x":"soap"}}}"#,
                "inject.paths./x",
                "one of",
            ),
            (
                r#"{"inject":{"paths":{"x":"openai_chat"}}}"#,
                "inject.paths.x",
                "start with /",
            ),
            (
                r#"{"inject":{"paths":{"/x?y":"openai_chat"}}}"#,
                "inject.paths./x?y",
                "no query",
            ),
            (
                r#"{"inject":{"paths":{"/x":1}}}"#,
                "inject.paths./x",
                "format name",
            ),
            (r#"{"inject":{"paths":["/x"]}}"#, "inject.paths", "object"),
            (
                r#"{"inject":{"paths":{"//":"openai_chat"}}}"#,
                "inject.paths.//",
                "segment",
            ),
            (
                r#"{"inject":{"paths":{"/a/../b":"openai_chat"}}}"#,
                "inject.paths./a/../b",
                ". or ..",
            ),
            (
                r#"{"inject":{"paths":{"/a%zz":"openai_chat"}}}"#,
                "inject.paths./a%zz",
                "hex",
            ),
            (
                r#"{"inject":{"paths":{"/A":"openai_chat","/a/":"openai_chat"}}}"#,
                "inject.paths./a/",
                "same path",
            ),
            (
                r#"{"inject":{"paths":{"/v{n}/chat":"openai_chat"}}}"#,
                "inject.paths./v{n}/chat",
                "start its segment",
            ),
            (
                r#"{"inject":{"paths":{"/model/{id/converse":"bedrock_converse"}}}"#,
                "inject.paths./model/{id/converse",
                "closing",
            ),
            (
                r#"{"inject":{"paths":{"/model/{id}/converse":"bedrock_converse","/Model/{other}/Converse":"bedrock_converse"}}}"#,
                "inject.paths./model/{id}/converse",
                "same path",
            ),
            (
                r#"{"inject":{"pass_paths":["/{m}:embed{x}"]}}"#,
                "inject.pass_paths[0]",
                "at most one",
            ),
            (
                r#"{"inject":{"pass_paths":"/models"}}"#,
                "inject.pass_paths",
                "array",
            ),
            (
                r#"{"inject":{"pass_paths":["/m",2]}}"#,
                "inject.pass_paths[1]",
                "a number",
            ),
            (
                r#"{"inject":{"pass_paths":["models"]}}"#,
                "inject.pass_paths[0]",
                "start with /",
            ),
            (
                r#"{"inject":{"pass_paths":["/"]}}"#,
                "inject.pass_paths[0]",
                "segment",
            ),
            (
                r#"{"inject":{"pass_paths":["/a%00"]}}"#,
                "inject.pass_paths[0]",
                "printable",
            ),
            (
                r#"{"inject":{"other_paths":"forward"}}"#,
                "inject.other_paths",
                "one of",
            ),
            (
                r#"{"inject":{"other_paths":false}}"#,
                "inject.other_paths",
                "string",
            ),
        ] {
            let e = parse(raw).unwrap_err();
            assert_eq!(e.field, field, "{raw}");
            assert!(e.reason.contains(reason), "{raw}: {}", e.reason);
        }
    }

    #[test]
    fn null_means_default() {
        let c = parse(r#"{"cache":{"ttl_seconds":null},"control":{"token":null}}"#).unwrap();
        assert_eq!(c.ttl_seconds, 60);
        assert_eq!(c.control_token, None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                prop_oneof![
                    Just("data".to_string()),
                    Just("control".to_string()),
                    Just("closed".to_string()),
                    Just("open".to_string()),
                    Just("reject".to_string()),
                    Just("jwt".to_string()),
                    Just("header".to_string()),
                    Just("webdis".to_string()),
                    Just("refuse".to_string()),
                    Just("pass".to_string()),
                    Just("openai_chat".to_string()),
                    Just("/V1/Chat%2fCompletions/".to_string()),
                    Just("/a/../b".to_string()),
                    Just("/%zz".to_string()),
                    ".{0,12}",
                ]
                .prop_map(Value::String),
            ];
            let names = prop_oneof![
                Just("role"),
                Just("agent"),
                Just("header"),
                Just("missing"),
                Just("source"),
                Just("jwt"),
                Just("provider"),
                Just("claim"),
                Just("cache"),
                Just("ttl_seconds"),
                Just("negative_ttl_seconds"),
                Just("stale_if_error_seconds"),
                Just("redis"),
                Just("cluster"),
                Just("authority"),
                Just("dialect"),
                Just("upstash"),
                Just("webdis"),
                Just("key_prefix"),
                Just("timeout_ms"),
                Just("store"),
                Just("inject"),
                Just("max_body_bytes"),
                Just("cache_control"),
                Just("paths"),
                Just("pass_paths"),
                Just("other_paths"),
                Just("/X/"),
                Just("//"),
                Just("failure_mode"),
                Just("control"),
                Just("token"),
                Just("debug_headers"),
                Just("audit"),
                Just("response_header"),
                Just("/x"),
                Just("bogus"),
            ];
            leaf.prop_recursive(3, 32, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    prop::collection::btree_map(names.clone().prop_map(String::from), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any JSON: parsed or refused with a named field, never a panic; and
            /// whatever is accepted is within the documented ranges.
            #[test]
            fn arbitrary_json_is_parsed_or_refused_with_a_field(v in json(), env in proptest::option::of("[0-9a-z]{0,4}")) {
                match Config::parse(v.to_string().as_bytes(), env.as_deref()) {
                    Ok(c) => {
                        prop_assert!(c.ttl_seconds >= 1 && c.negative_ttl_seconds >= 1);
                        prop_assert!(c.redis.timeout_ms >= 1 && c.store.timeout_ms >= 1);
                        prop_assert!(c.max_body_bytes >= 1);
                        prop_assert!(!c.paths.formats.is_empty() || v.pointer("/inject/paths").is_some());
                        let mut patterns = c.paths.formats.iter().map(|(p, _)| p).chain(&c.paths.pass);
                        prop_assert!(patterns.all(|p| p.as_str().len() > 1 && crate::path::normalise(p.as_str()).as_deref() == Ok(p.as_str())));
                    }
                    Err(e) => prop_assert!(!e.field.is_empty() && !e.reason.is_empty()),
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
                let _ = Config::parse(&bytes, None);
            }
        }
    }
}
