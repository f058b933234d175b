//! The POSTs to every Envoy control listener (`/ibex/v1/invalidate[/{agent}]`
//! and `/ibex/v1/invalidate/key/{sha256hex}`, paths from `ibex-wire`), each
//! retried per the policy, concurrently across listeners, and counted as sent or
//! failed.
//!
//! The bearer token goes into the `authorization` header and nowhere else: never
//! into a log line, an error or a `Debug` (it stays [`Redacted`]).

use axum::http::{header, StatusCode};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use ibex_wire::Redacted;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::retry::{with_retry, Attempt, RetryPolicy};
use super::{SubscribeConfig, SubscribeMetrics};

/// A pooled HTTP/1 client for the control listeners. Cheap to clone.
#[derive(Clone)]
pub(super) struct ControlClient {
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    urls: Vec<String>,
    token: Option<Redacted<String>>,
    request_timeout: Duration,
    retry: RetryPolicy,
}

impl ControlClient {
    /// A client for the control URLs, token and timeouts of `config`.
    pub(super) fn new(config: &SubscribeConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.request_timeout));
        Self {
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
            urls: config.control_urls.clone(),
            token: config.control_token.clone(),
            request_timeout: config.request_timeout,
            retry: config.retry,
        }
    }

    /// POSTs `path` to every control URL concurrently, each with retries.
    pub(super) async fn post_all(&self, path: &str, metrics: &SubscribeMetrics) {
        let posts = self.urls.iter().map(|base| async move {
            let url = format!("{base}{path}");
            if with_retry(self.retry, &url, || self.post_once(&url)).await {
                metrics.invalidations_sent.inc();
            } else {
                metrics.invalidation_failures.inc();
            }
        });
        futures_util::future::join_all(posts).await;
    }

    /// POSTs a key invalidation `path` to every control URL concurrently, each
    /// with retries. A listener that answers it 404 or 400 predates key entries
    /// (it reads `key/…` as no endpoint, or as a bad agent id): that answer is
    /// final for the key path, which is not retried, and the listener gets one
    /// `POST /ibex/v1/invalidate` (with the usual retries) instead, so a
    /// revocation still takes effect wherever a key might be cached.
    pub(super) async fn post_all_key(&self, path: &str, metrics: &SubscribeMetrics) {
        let posts = self.urls.iter().map(|base| async move {
            let url = format!("{base}{path}");
            let unknown = AtomicBool::new(false);
            let ok = with_retry(self.retry, &url, || async {
                match self.send(&url).await? {
                    StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => {
                        unknown.store(true, Ordering::Relaxed);
                        Ok(())
                    }
                    status => classify(status),
                }
            })
            .await;
            if ok && unknown.load(Ordering::Relaxed) {
                metrics.key_fallbacks.inc();
                tracing::warn!(
                    target_name = base.as_str(),
                    "control endpoint does not know key invalidation (filter older than API keys): invalidating all instead"
                );
                let all = format!("{base}{}", ibex_wire::INVALIDATE_PATH);
                let ok = with_retry(self.retry, &all, || self.post_once(&all)).await;
                if ok {
                    metrics.invalidations_sent.inc();
                } else {
                    metrics.invalidation_failures.inc();
                }
            } else if ok {
                metrics.invalidations_sent.inc();
            } else {
                metrics.invalidation_failures.inc();
            }
        });
        futures_util::future::join_all(posts).await;
    }

    async fn post_once(&self, url: &str) -> Result<(), Attempt> {
        classify(self.send(url).await?)
    }

    /// One POST; its status, or why there was none.
    async fn send(&self, url: &str) -> Result<StatusCode, Attempt> {
        let mut req = hyper::Request::post(url).header(header::CONTENT_LENGTH, "0");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| Attempt::Permanent("cannot build request".into()))?;
        let resp = tokio::time::timeout(self.request_timeout, self.http.request(req))
            .await
            .map_err(|_| Attempt::Transient("timeout".into()))?
            .map_err(|e| Attempt::Transient(format!("request failed: {e}")))?;
        Ok(resp.status())
    }
}

/// What a control answer means: success, a final refusal (4xx but 408 and 429)
/// or worth retrying.
fn classify(status: StatusCode) -> Result<(), Attempt> {
    if status.is_success() {
        Ok(())
    } else if status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
    {
        Err(Attempt::Permanent(format!("status {status}")))
    } else {
        Err(Attempt::Transient(format!("status {status}")))
    }
}
