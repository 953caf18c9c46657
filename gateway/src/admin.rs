//! The admin HTTP endpoint: `/health` (liveness), `/metrics` (Prometheus text format) and
//! `/sessions` (ids of devices with a live session, JSON). Read-only; it changes nothing.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::node::NodeShared;

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<NodeShared>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/sessions", get(sessions))
        .with_state(node);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "admin endpoint stopped");
    }
}

async fn metrics(State(node): State<Arc<NodeShared>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
}

async fn sessions(State(node): State<Arc<NodeShared>>) -> Json<Vec<String>> {
    let mut ids = node.sessions.device_ids();
    ids.sort();
    Json(ids)
}
