//! The subscriber's own HTTP endpoints: `/healthz`, `/readyz` (200 while
//! subscribed to Redis) and `/metrics` (Prometheus text of
//! [`SubscribeMetrics`](super::SubscribeMetrics)).
//!
//! They expose state and counts only; never a key, a URL with credentials or the
//! control token.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::Subscriber;
use crate::metrics::CONTENT_TYPE;

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
}

/// The subscriber's own HTTP endpoints: `/healthz`, `/readyz` (200 while
/// subscribed to Redis) and `/metrics`.
pub fn app(subscriber: Subscriber) -> Router {
    let ready = subscriber.clone();
    let metrics = subscriber;
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || async move {
                if ready.metrics().connected.get() == 1 {
                    (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response()
                } else {
                    crate::error::json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service_unavailable",
                        "redis_unavailable",
                        "not subscribed to redis",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                let body = metrics.metrics().render();
                Response::builder()
                    .header(header::CONTENT_TYPE, CONTENT_TYPE)
                    .body(axum::body::Body::from(body))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }),
        )
}
