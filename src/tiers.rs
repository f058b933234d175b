//! The two remote tiers as plain data: how to ask them (callout requests) and how to
//! read their answers. No host calls here: the request flow hands these requests to
//! the host and feeds the responses back.
//!
//! - L2, Redis behind Webdis: `GET /GET/{key}.raw` answers in Redis protocol
//!   (`$-1` = no such key, `$0` = the empty string = "this agent has no directive").
//!   A value starting with a NUL byte is a *tombstone* ([`ibex_wire::TOMBSTONE`])
//!   written by the subscriber when the directive changed; Postgres text can never
//!   contain NUL, so no directive is mistaken for one. A tombstone reads as "no key".
//! - L2 writes never overwrite: an `EVAL` sets the key (with its TTL) only if
//!   neither the key nor the flush marker ([`ibex_wire::flush_marker_key`], set by
//!   the subscriber for a while after "invalidate all") exists. A fill that read the old
//!   directive before an invalidation therefore cannot put it back into Redis after
//!   the subscriber's tombstone. The value travels as the PUT body (Webdis's last
//!   argument); the empty string cannot, so it is sent as a trailing `/` instead.
//! - L3, the companion store: `GET /v1/agents/{id}/directive` answers
//!   `{"agent_id":…,"content":"…"|null}`.
//!
//! Key names, the tombstone and the flush marker are the wire contract shared with
//! the companion's subscriber (`ibex-wire`); only the transport is written here.

use ibex_wire::Redacted;

use crate::agent::{AgentId, AGENT_ID_LEN};
use crate::config::Config;

/// An HTTP callout to an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Envoy cluster name.
    pub cluster: String,
    /// HTTP method.
    pub method: &'static str,
    /// `:path`.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Request body, if any: a write-back's is directive text, so `Debug` shows only
    /// its length.
    pub body: Option<Redacted<Vec<u8>>>,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
}

/// What came back from a callout. `status` is `None` when there was no HTTP answer at
/// all (connection failure, reset, timeout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// HTTP status, if an answer arrived.
    pub status: Option<u16>,
    /// Response body.
    pub body: Vec<u8>,
}

/// The answer of a tier about one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The tier does not know (L2 only: no key).
    Unknown,
    /// The agent has no directive.
    NoDirective,
    /// The agent's directive, raw text.
    Directive(Redacted<String>),
}

/// A tier failed to answer usefully (the reason is for counters and debug logs; it
/// never contains response bodies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierError(pub &'static str);

fn redis_key_path(config: &Config, agent: &AgentId) -> String {
    let mut buf = [0u8; AGENT_ID_LEN];
    ibex_wire::redis_key(&config.redis.key_prefix, agent.encode(&mut buf))
}

/// L2 read of an agent's key.
pub fn redis_get(config: &Config, agent: &AgentId) -> Callout {
    Callout {
        cluster: config.redis.cluster.clone(),
        method: "GET",
        path: format!("/GET/{}.raw", redis_key_path(config, agent)),
        authority: config.redis.authority.clone(),
        body: None,
        timeout_ms: config.redis.timeout_ms,
    }
}

/// The conditional write, URL-encoded once (it never changes):
/// `if redis.call('EXISTS',KEYS[1],KEYS[2])==0 then
///  redis.call('SET',KEYS[1],ARGV[2],'EX',ARGV[1]) return 1 end return 0`
const SET_IF_ABSENT_SCRIPT: &str = "if%20redis.call%28%27EXISTS%27%2CKEYS%5B1%5D%2CKEYS%5B2%5D%29%3D%3D0%20then%20redis.call%28%27SET%27%2CKEYS%5B1%5D%2CARGV%5B2%5D%2C%27EX%27%2CARGV%5B1%5D%29%20return%201%20end%20return%200";

/// L2 write of an agent's answer with its TTL. `None` writes "no directive".
/// The write happens only if the key and the flush marker are both absent.
pub fn redis_set(
    config: &Config,
    agent: &AgentId,
    directive: Option<&str>,
    ttl_seconds: u64,
) -> Callout {
    let key = redis_key_path(config, agent);
    let marker = ibex_wire::flush_marker_key(&config.redis.key_prefix);
    let base = format!("/EVAL/{SET_IF_ABSENT_SCRIPT}/2/{key}/{marker}/{ttl_seconds}");
    let (method, path, body) = match directive {
        Some(text) if !text.is_empty() => {
            ("PUT", base, Some(Redacted::new(text.as_bytes().to_vec())))
        }
        // A trailing slash is Webdis's spelling of an empty last argument.
        _ => ("GET", format!("{base}/"), None),
    };
    Callout {
        cluster: config.redis.cluster.clone(),
        method,
        path,
        authority: config.redis.authority.clone(),
        body,
        timeout_ms: config.redis.timeout_ms,
    }
}

/// Reads an L2 GET answer.
pub fn parse_redis_get(resp: &Response) -> Result<Answer, TierError> {
    match resp.status {
        None => return Err(TierError("no answer")),
        Some(200) => {}
        Some(_) => return Err(TierError("bad status")),
    }
    let b = resp.body.as_slice();
    if b == b"$-1\r\n" {
        return Ok(Answer::Unknown);
    }
    let rest = b.strip_prefix(b"$").ok_or(TierError("not a bulk reply"))?;
    let nl = rest
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(TierError("truncated reply"))?;
    let len: usize = std::str::from_utf8(&rest[..nl])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(TierError("bad length"))?;
    let data = &rest[nl + 2..];
    if data.len() != len + 2 || &data[len..] != b"\r\n" {
        return Err(TierError("length mismatch"));
    }
    let value = &data[..len];
    if ibex_wire::is_tombstone(value) {
        return Ok(Answer::Unknown);
    }
    let text = std::str::from_utf8(value).map_err(|_| TierError("not UTF-8"))?;
    if text.is_empty() {
        Ok(Answer::NoDirective)
    } else {
        Ok(Answer::Directive(Redacted::new(text.to_owned())))
    }
}

/// Outcome of an L2 write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The key was set.
    Written,
    /// Not set: the key, a tombstone or the flush marker was there.
    Skipped,
    /// The write failed.
    Failed,
}

/// Reads the answer to [`redis_set`].
pub fn redis_set_outcome(resp: &Response) -> WriteOutcome {
    match (resp.status, resp.body.as_slice()) {
        (Some(200), b"{\"EVAL\":1}") => WriteOutcome::Written,
        (Some(200), b"{\"EVAL\":0}") => WriteOutcome::Skipped,
        _ => WriteOutcome::Failed,
    }
}

/// L3 read of an agent's directive.
pub fn store_get(config: &Config, agent: &AgentId) -> Callout {
    let mut buf = [0u8; AGENT_ID_LEN];
    Callout {
        cluster: config.store.cluster.clone(),
        method: "GET",
        path: format!("/v1/agents/{}/directive", agent.encode(&mut buf)),
        authority: config.store.authority.clone(),
        body: None,
        timeout_ms: config.store.timeout_ms,
    }
}

#[derive(serde::Deserialize)]
struct StoreBody {
    agent_id: String,
    content: Option<String>,
}

/// Reads an L3 answer; the agent id in the body must be the one asked for.
pub fn parse_store(resp: &Response, agent: &AgentId) -> Result<Answer, TierError> {
    match resp.status {
        None => return Err(TierError("no answer")),
        Some(200) => {}
        Some(_) => return Err(TierError("bad status")),
    }
    let body: StoreBody = serde_json::from_slice(&resp.body).map_err(|_| TierError("bad body"))?;
    if AgentId::parse(&body.agent_id) != Some(*agent) {
        return Err(TierError("answer for another agent"));
    }
    Ok(match body.content {
        None => Answer::NoDirective,
        // An empty directive injects nothing useful; treat it as none, like L2 does.
        Some(c) if c.is_empty() => Answer::NoDirective,
        Some(c) => Answer::Directive(Redacted::new(c)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(b"{}", None).unwrap()
    }
    fn agent() -> AgentId {
        AgentId::parse("6f1c1a3e-5b7d-4c2a-9e0f-123456789abc").unwrap()
    }
    fn ok(body: &[u8]) -> Response {
        Response {
            status: Some(200),
            body: body.to_vec(),
        }
    }

    #[test]
    fn builds_webdis_requests() {
        let c = redis_get(&cfg(), &agent());
        assert_eq!(
            (c.method, c.path.as_str(), c.cluster.as_str(), c.timeout_ms),
            (
                "GET",
                "/GET/directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc.raw",
                "ibex_redis",
                50
            )
        );
        let w = redis_set(&cfg(), &agent(), Some("Be terse."), 60);
        let tail = "/2/directive:6f1c1a3e-5b7d-4c2a-9e0f-123456789abc/directive:__flush__/60";
        assert_eq!(w.method, "PUT");
        assert!(w.path.starts_with("/EVAL/if%20redis.call"), "{}", w.path);
        assert!(w.path.ends_with(tail), "{}", w.path);
        assert_eq!(
            w.body.as_ref().map(|b| b.expose().as_slice()),
            Some(&b"Be terse."[..])
        );
        let n = redis_set(&cfg(), &agent(), None, 10);
        assert_eq!((n.method, n.body), ("GET", None));
        assert!(n.path.ends_with("/directive:__flush__/10/"), "{}", n.path);
        assert!(!format!("{w:?}").contains("terse"));
    }

    #[test]
    fn reads_webdis_raw_replies() {
        assert_eq!(parse_redis_get(&ok(b"$-1\r\n")), Ok(Answer::Unknown));
        assert_eq!(parse_redis_get(&ok(b"$0\r\n\r\n")), Ok(Answer::NoDirective));
        assert_eq!(
            parse_redis_get(&ok(b"$7\r\nab\r\n\"\xc3\xa9\r\n")),
            Ok(Answer::Directive("ab\r\n\"é".into()))
        );
        for bad in [
            &b"-ERR wrong"[..],
            b"$5\r\nab\r\n",
            b"$x\r\n",
            b"$2\r\n\xff\xfe\r\n",
            b"",
        ] {
            assert!(parse_redis_get(&ok(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_redis_get(&Response {
            status: None,
            body: vec![]
        })
        .is_err());
        assert!(parse_redis_get(&Response {
            status: Some(503),
            body: b"$-1\r\n".to_vec()
        })
        .is_err());
        assert_eq!(
            parse_redis_get(&ok(b"$1\r\n\0\r\n")),
            Ok(Answer::Unknown),
            "tombstone"
        );
        assert_eq!(
            parse_redis_get(&ok(b"$3\r\n\0ab\r\n")),
            Ok(Answer::Unknown),
            "tombstone"
        );
        assert_eq!(
            redis_set_outcome(&ok(br#"{"EVAL":1}"#)),
            WriteOutcome::Written
        );
        assert_eq!(
            redis_set_outcome(&ok(br#"{"EVAL":0}"#)),
            WriteOutcome::Skipped
        );
        assert_eq!(
            redis_set_outcome(&ok(br#"{"EVAL":[false,"ERR"]}"#)),
            WriteOutcome::Failed
        );
        assert_eq!(
            redis_set_outcome(&Response::default()),
            WriteOutcome::Failed
        );
    }

    #[test]
    fn the_encoded_script_is_the_documented_one() {
        let decoded = percent_decode(super::SET_IF_ABSENT_SCRIPT);
        assert_eq!(decoded, "if redis.call('EXISTS',KEYS[1],KEYS[2])==0 then redis.call('SET',KEYS[1],ARGV[2],'EX',ARGV[1]) return 1 end return 0");
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn builds_and_reads_store_requests() {
        let c = store_get(&cfg(), &agent());
        assert_eq!(
            c.path,
            "/v1/agents/6f1c1a3e-5b7d-4c2a-9e0f-123456789abc/directive"
        );
        assert_eq!((c.cluster.as_str(), c.timeout_ms), ("ibex_store", 500));
        let id = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc";
        assert_eq!(
            parse_store(
                &ok(format!(r#"{{"agent_id":"{id}","content":"D"}}"#).as_bytes()),
                &agent()
            ),
            Ok(Answer::Directive("D".into()))
        );
        assert_eq!(
            parse_store(
                &ok(format!(r#"{{"agent_id":"{id}","content":null}}"#).as_bytes()),
                &agent()
            ),
            Ok(Answer::NoDirective)
        );
        let other = r#"{"agent_id":"00000000-0000-4000-8000-000000000000","content":"D"}"#;
        assert!(parse_store(&ok(other.as_bytes()), &agent()).is_err());
        assert!(parse_store(&ok(b"{}"), &agent()).is_err());
        assert!(parse_store(
            &Response {
                status: Some(503),
                body: vec![]
            },
            &agent()
        )
        .is_err());
    }
}
