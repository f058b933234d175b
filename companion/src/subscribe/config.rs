//! The subscriber's settings, validated once at start so that a typo in a URL
//! fails there and not on the first message.
//!
//! The Redis URL (it may carry a password) and the control token are kept in
//! [`Redacted`], so `{:?}` of the configuration never shows them; nothing here
//! may log or echo them.

use std::time::Duration;

use axum::http::Uri;
use ibex_wire::Redacted;

use super::RetryPolicy;
use crate::redis_conn::RedisEndpoint;
use crate::{Error, Result};

/// Default life of Redis tombstones and the flush marker: well above the
/// longest fill the filter can run (its callout timeouts, 50 + 500 ms by default).
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(10);

/// Everything the subscriber needs; validated by [`SubscribeConfig::new`].
#[derive(Clone, Debug)]
pub struct SubscribeConfig {
    pub(super) redis: RedisEndpoint,
    pub(super) control_urls: Vec<String>,
    pub(super) control_token: Option<Redacted<String>>,
    pub(super) key_prefix: String,
    /// `None`: invalidate Redis by `DEL`. `Some(ttl)`: write a tombstone
    /// (`"\0"`, expiring after `ttl`) instead, and set the flush markers of
    /// every slot (`{prefix}__flush__{<tag>}`) for `ttl` on a full flush, so
    /// that a filter write-back already in flight cannot put old text back into
    /// Redis (the filter writes only when neither the key nor its slot's marker
    /// exists).
    pub tombstone_ttl: Option<Duration>,
    /// Retry policy for every Redis command and control POST.
    pub retry: RetryPolicy,
    /// Timeout of one control POST attempt.
    pub request_timeout: Duration,
    /// How often the Redis subscription is pinged to detect a dead link.
    pub ping_interval: Duration,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max: Duration,
}

impl SubscribeConfig {
    /// Validates URLs up front so that a typo fails at start, not on the first
    /// message. Control URLs must be plain `http://` (loopback, no TLS).
    pub fn new(
        redis_url: impl Into<String>,
        control_urls: impl IntoIterator<Item = String>,
        control_token: Option<String>,
        key_prefix: impl Into<String>,
    ) -> Result<Self> {
        Self::with_endpoint(
            RedisEndpoint::new(redis_url),
            control_urls,
            control_token,
            key_prefix,
        )
    }

    /// [`SubscribeConfig::new`] for a Redis endpoint that may carry a private
    /// CA (`rediss://` with `--redis-ca-file`).
    pub fn with_endpoint(
        redis: RedisEndpoint,
        control_urls: impl IntoIterator<Item = String>,
        control_token: Option<String>,
        key_prefix: impl Into<String>,
    ) -> Result<Self> {
        redis.client()?;
        let key_prefix = key_prefix.into();
        if !ibex_wire::is_cluster_safe_prefix(&key_prefix) {
            return Err(Error::Config(
                "--key-prefix has a { that opens no hash tag closed within it: entries \
                 and their flush markers would lie in different Redis Cluster slots"
                    .into(),
            ));
        }
        let mut urls = Vec::new();
        for raw in control_urls {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            urls.push(normalize_control_url(raw)?);
        }
        Ok(Self {
            redis,
            control_urls: urls,
            control_token: control_token.filter(|t| !t.is_empty()).map(Redacted::new),
            key_prefix,
            tombstone_ttl: Some(DEFAULT_TOMBSTONE_TTL),
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(2),
        })
    }

    /// The validated control base URLs, without trailing slash.
    pub fn control_urls(&self) -> &[String] {
        &self.control_urls
    }
}

fn normalize_control_url(raw: &str) -> Result<String> {
    let trimmed = raw.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|_| Error::Config(format!("control URL {raw:?} is not a valid URL")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(Error::Config(format!(
            "control URL {raw:?} must look like http://host:port"
        )));
    }
    if uri.query().is_some() {
        return Err(Error::Config(format!(
            "control URL {raw:?} must not have a query string"
        )));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls_are_validated_and_normalised() {
        let c = SubscribeConfig::new(
            "redis://:hunter2@127.0.0.1:6379",
            vec!["http://127.0.0.1:19000/".to_string(), " ".to_string()],
            Some("secret-token".into()),
            "directive:",
        )
        .unwrap();
        assert_eq!(c.control_urls(), ["http://127.0.0.1:19000"]);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret-token"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        for bad in ["https://x:1", "127.0.0.1:1", "http://x:1/?a=b", "nope"] {
            assert!(
                SubscribeConfig::new("redis://127.0.0.1", vec![bad.to_string()], None, "d:")
                    .is_err(),
                "{bad}"
            );
        }
    }
}
