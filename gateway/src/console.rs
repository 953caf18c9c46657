//! The operator console on the admin endpoint: the page and its script (built into the binary,
//! `gateway/web/console.{html,js}`, docs/console.md) and its data, which needs the admin token:
//!
//! - `GET /console/state`: this node (state, devices online, calls with each stream's figures
//!   read from their relays now), the live set the balancers last reported, and the cluster's
//!   node table (state, draining, load) read from the balancers' `GET /nodes` (`[admin]
//!   balancers`, `crate::cluster_table`);
//! - `GET /console/events`: the same state once a second as server-sent events.
//!
//! The console's actions (drain, claim) are the admin endpoint's own `POST`s (`crate::admin`).
//! What it does not do: keep history (the page samples `/metrics` for its charts), or reach
//! other nodes' admin endpoints (a node's calls are listed by that node's console).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::shared::NodeShared;

/// The console's routes (the admin endpoint adds its guard around them).
pub(crate) fn routes() -> Router<Arc<NodeShared>> {
    Router::new()
        .route("/console", get(console_page))
        .route("/console.js", get(console_script))
        .route("/console/state", get(console_state))
        .route("/console/events", get(console_events))
}

const CONSOLE_PAGE: &str = include_str!("../web/console.html");
const CONSOLE_JS: &str = include_str!("../web/console.js");
/// Most devices and calls the console lists (the counts are always whole).
const CONSOLE_LIST_LIMIT: usize = 500;

async fn console_page() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (axum::http::header::X_FRAME_OPTIONS, "DENY"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "frame-ancestors 'none'",
            ),
        ],
        CONSOLE_PAGE,
    )
}

async fn console_script() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        CONSOLE_JS,
    )
}

/// `None` when `headers` carry the admin token; else the 401 to answer, counted under
/// `reason` (`console_token` for the console's data).
pub(crate) fn read_refusal(
    node: &NodeShared,
    headers: &axum::http::HeaderMap,
    reason: &'static str,
) -> Option<axum::response::Response> {
    if bearer_token(headers).is_some_and(|t| is_admin_token(node, t)) {
        return None;
    }
    thalamus_telemetry::inc(&node.admin_refused, reason);
    Some(
        (
            StatusCode::UNAUTHORIZED,
            "this needs the admin token (Authorization: Bearer ...)\n",
        )
            .into_response(),
    )
}

/// What the console shows of this node: its state, devices online, calls in progress with
/// each stream's figures, the live set the balancers last reported, and their node table.
async fn console_json(node: &NodeShared) -> Value {
    let mut devices = node.sessions.device_ids();
    devices.sort();
    let online = devices.len();
    devices.truncate(CONSOLE_LIST_LIMIT);
    let calls: Vec<Value> = node
        .bridge
        .calls(CONSOLE_LIST_LIMIT)
        .await
        .into_iter()
        .map(|c| {
            json!({
                "device": c.device,
                "call_ref": c.call_ref,
                "remote": c.remote_uri,
                "state": c.state.as_str_name().trim_start_matches("CALL_STATE_").to_ascii_lowercase(),
                "age_ms": u64::try_from(c.age.as_millis()).unwrap_or(u64::MAX),
                "answered_ms": c.answered_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "media": c.media.iter().map(|q| json!({
                    "stream": q.stream.name(),
                    "packets_received": q.packets_received,
                    "packets_lost": q.packets_lost,
                    "jitter_ms": q.jitter.as_secs_f64() * 1000.0,
                    "round_trip_ms": q.round_trip.map(|d| d.as_secs_f64() * 1000.0),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let Json(cluster) = cluster_json(node);
    let nodes = node.balancer_table.read().await;
    json!({
        "node": node.node_id,
        "draining": node.is_draining(),
        "store_up": node.store_up(),
        "devices_online": online,
        "devices": devices,
        "calls_active": node.bridge.active_calls(),
        "calls": calls,
        "cluster": cluster,
        "nodes": nodes,
    })
}

async fn console_state(
    State(node): State<Arc<NodeShared>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Some(refused) = read_refusal(&node, &headers, "console_token") {
        return refused;
    }
    Json(console_json(&node).await).into_response()
}

/// The console's state once a second, as server-sent events, until the client goes.
async fn console_events(
    State(node): State<Arc<NodeShared>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if let Some(refused) = read_refusal(&node, &headers, "console_token") {
        return refused;
    }
    let ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    let stream = futures::stream::unfold((node, ticks), |(node, mut ticks)| async move {
        ticks.tick().await;
        let event = Event::default()
            .event("state")
            .json_data(console_json(&node).await)
            .unwrap_or_else(|_| Event::default().comment("unencodable state"));
        Some((Ok::<_, std::convert::Infallible>(event), (node, ticks)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The token a request presents (`Authorization: Bearer <token>`), if any.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `token` is the node's admin token, compared in time that depends on the lengths
/// only.
pub(crate) fn is_admin_token(node: &NodeShared, token: &str) -> bool {
    let (a, b) = (token.as_bytes(), node.admin_token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// This node's id and draining flag, and the live set the balancers last reported (the
/// admin endpoint's `GET /cluster`).
pub(crate) fn cluster_json(node: &NodeShared) -> Json<Value> {
    let live = node
        .heartbeats
        .as_ref()
        .and_then(|hb| hb.live_set(std::time::Duration::MAX))
        .map(|live| {
            json!({
                "from": live.from.to_string(),
                "age_ms": u64::try_from(tokio::time::Instant::now().into_std().saturating_duration_since(live.received).as_millis()).unwrap_or(u64::MAX),
                "eligible": live.eligible.iter().map(|n| json!({
                    "node": n.node.as_str(),
                    "quic": n.quic.map(|q| q.to_string()),
                })).collect::<Vec<_>>(),
            })
        });
    Json(json!({
        "node": node.node_id,
        "draining": node.is_draining(),
        "live_set": live,
    }))
}
