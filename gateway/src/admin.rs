//! The admin HTTP endpoint: `/health` (liveness: `ok`, or `degraded: ...` while the dialog
//! store does not answer), `/metrics` (Prometheus text format),
//! `/sessions` (ids of devices with a live session, JSON), and the cluster's dialog
//! operations (UAC-mode takeover, see docs/clustering.md):
//!
//! - `GET /dialogs/{call_id}/{local_tag}/{remote_tag}`: the stored record of a dialog, read
//!   from the dialog store (whichever node owns it), and whether this node holds it;
//! - `POST /dialogs/{call_id}/{local_tag}/{remote_tag}/claim`: take the dialog over here;
//! - `POST /dialogs/{call_id}/{local_tag}/{remote_tag}/bye`: end it from here (taken over
//!   first when another node holds it), BYE with the next CSeq over the route set;
//! - `GET /devices/{device}/dialogs`: the device's live stored dialogs;
//! - `GET /drain`, `POST /drain`, `DELETE /drain`: whether the node is draining, start
//!   draining, stop draining (see [`NodeShared::set_draining`]);
//! - `GET /cluster`: this node's id, draining flag and the live set the balancers last
//!   reported (the nodes its devices are redirected among);
//! - `GET /console`: the operator console (a page built into the binary, `gateway/web/`,
//!   docs/console.md), whose data comes from `GET /console/state` and, live, from
//!   `GET /console/events` (server-sent events, one state a second). Both need the token.
//!
//! Only the POSTs and the DELETE change anything, and they need `Authorization: Bearer
//! <token>` (`admin.token`, or the one generated into `<data_dir>/admin.token`); a request
//! from a browser page of another site (an `Origin` other than this endpoint's own, or
//! `Sec-Fetch-Site` other than `same-origin`/`none`) is refused even with it. Reads need no
//! token, but for the console's data. Refusals are counted (`admin_refused_total{reason}`).
//! Path parts are percent-decoded.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::shared::NodeShared;
use thalamus_bridge::dialogs::{early_invite_of, sip_record_of, subscription_of};
use thalamus_bridge::takeover::TakeoverError;
use thalamus_dialog_store::{DialogKey, StoredDialog};

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<NodeShared>,
    shutdown: CancellationToken,
) {
    let guard = node.clone();
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/sessions", get(sessions))
        .route("/dialogs/{call_id}/{local_tag}/{remote_tag}", get(dialog))
        .route(
            "/dialogs/{call_id}/{local_tag}/{remote_tag}/claim",
            post(claim_dialog),
        )
        .route(
            "/dialogs/{call_id}/{local_tag}/{remote_tag}/bye",
            post(bye_dialog),
        )
        .route("/devices/{device}/dialogs", get(device_dialogs))
        .route(
            "/drain",
            get(drain_state).post(drain_start).delete(drain_stop),
        )
        .route("/cluster", get(cluster_state))
        .route("/console", get(console_page))
        .route("/console.js", get(console_script))
        .route("/console/state", get(console_state))
        .route("/console/events", get(console_events))
        .layer(axum::middleware::from_fn_with_state(guard, guard_mutations))
        .with_state(node);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "admin endpoint stopped");
    }
}

/// `ok`, or `degraded` with the reason while the dialog store does not answer (the node serves
/// calls, unreplicated). 200 either way: the node is alive and takes calls.
async fn health(State(node): State<Arc<NodeShared>>) -> &'static str {
    if node.store_up() {
        "ok\n"
    } else {
        "degraded: the dialog store does not answer (calls are not replicated)\n"
    }
}

/// Whether two byte strings are equal, in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lets reads through; a request that changes anything needs the bearer token and must not
/// come from a browser page of another site.
async fn guard_mutations(
    State(node): State<Arc<NodeShared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, Method};
    let method = request.method();
    if method == Method::GET || method == Method::HEAD {
        return next.run(request).await;
    }
    let headers = request.headers();
    // A browser names the page's origin; the console's own (same host) is allowed.
    let own_origin = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| format!("http://{host}"));
    let foreign_origin = headers
        .get(header::ORIGIN)
        .is_some_and(|origin| origin.to_str().ok().map(str::to_string) != own_origin);
    let cross_site = foreign_origin
        || headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "same-origin" && v != "none");
    if cross_site {
        thalamus_telemetry::inc(&node.admin_refused, "cross_site");
        return (StatusCode::FORBIDDEN, "cross-site requests are refused\n").into_response();
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if same(token.as_bytes(), node.admin_token.as_bytes()) => {
            next.run(request).await
        }
        presented => {
            thalamus_telemetry::inc(
                &node.admin_refused,
                if presented.is_some() {
                    "bad_token"
                } else {
                    "no_token"
                },
            );
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this request needs the admin token (Authorization: Bearer ...)\n",
            )
                .into_response()
        }
    }
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

/// `None` when `headers` carry the admin token; else the 401 to answer (counted).
fn console_refusal(
    node: &NodeShared,
    headers: &axum::http::HeaderMap,
) -> Option<axum::response::Response> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if presented.is_some_and(|t| same(t.as_bytes(), node.admin_token.as_bytes())) {
        return None;
    }
    thalamus_telemetry::inc(&node.admin_refused, "console_token");
    Some(
        (
            StatusCode::UNAUTHORIZED,
            "the console needs the admin token\n",
        )
            .into_response(),
    )
}

/// What the console shows of this node: its state, devices online, calls in progress, and
/// the cluster as the balancers last reported it.
fn console_json(node: &NodeShared) -> Value {
    let mut devices = node.sessions.device_ids();
    devices.sort();
    let online = devices.len();
    devices.truncate(CONSOLE_LIST_LIMIT);
    let calls: Vec<Value> = node
        .bridge
        .calls(CONSOLE_LIST_LIMIT)
        .into_iter()
        .map(|c| {
            json!({
                "device": c.device,
                "call_ref": c.call_ref,
                "remote": c.remote_uri,
                "state": c.state.as_str_name().trim_start_matches("CALL_STATE_").to_ascii_lowercase(),
                "age_ms": u64::try_from(c.age.as_millis()).unwrap_or(u64::MAX),
                "answered_ms": c.answered_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "media": c.quality.map(|q| json!({
                    "packets_received": q.packets_received,
                    "packets_lost": q.packets_lost,
                    "jitter_ms": q.jitter.as_secs_f64() * 1000.0,
                    "round_trip_ms": q.round_trip.map(|d| d.as_secs_f64() * 1000.0),
                })),
            })
        })
        .collect();
    let Json(cluster) = cluster_json(node);
    json!({
        "node": node.node_id,
        "draining": node.is_draining(),
        "store_up": node.store_up(),
        "devices_online": online,
        "devices": devices,
        "calls_active": node.bridge.active_calls(),
        "calls": calls,
        "cluster": cluster,
    })
}

async fn console_state(
    State(node): State<Arc<NodeShared>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Some(refused) = console_refusal(&node, &headers) {
        return refused;
    }
    Json(console_json(&node)).into_response()
}

/// The console's state once a second, as server-sent events, until the client goes.
async fn console_events(
    State(node): State<Arc<NodeShared>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if let Some(refused) = console_refusal(&node, &headers) {
        return refused;
    }
    let ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    let stream = futures::stream::unfold((node, ticks), |(node, mut ticks)| async move {
        ticks.tick().await;
        let event = Event::default()
            .event("state")
            .json_data(console_json(&node))
            .unwrap_or_else(|_| Event::default().comment("unencodable state"));
        Some((Ok::<_, std::convert::Infallible>(event), (node, ticks)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
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

fn drain_json(node: &NodeShared) -> Json<Value> {
    Json(json!({
        "draining": node.is_draining(),
        "sessions": node.sessions.len(),
        "heartbeats": node.heartbeats.is_some(),
    }))
}

async fn cluster_state(State(node): State<Arc<NodeShared>>) -> Json<Value> {
    cluster_json(&node)
}

fn cluster_json(node: &NodeShared) -> Json<Value> {
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

async fn drain_state(State(node): State<Arc<NodeShared>>) -> Json<Value> {
    drain_json(&node)
}

async fn drain_start(State(node): State<Arc<NodeShared>>) -> Json<Value> {
    node.set_draining(true);
    drain_json(&node)
}

async fn drain_stop(State(node): State<Arc<NodeShared>>) -> Json<Value> {
    node.set_draining(false);
    drain_json(&node)
}

type DialogPath = Path<(String, String, String)>;

fn error_response(e: &TakeoverError) -> (StatusCode, Json<Value>) {
    let status = match e {
        TakeoverError::NotFound => StatusCode::NOT_FOUND,
        TakeoverError::Ended => StatusCode::GONE,
        TakeoverError::LostRace { .. } | TakeoverError::OwnerAlive(_) => StatusCode::CONFLICT,
        TakeoverError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        TakeoverError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        TakeoverError::Disabled => StatusCode::NOT_IMPLEMENTED,
    };
    (
        status,
        Json(json!({"error": e.label(), "message": e.to_string()})),
    )
}

/// A stored record as JSON (the SIP dialog export inlined when it parses).
fn record_json(record: &StoredDialog, held_here: bool) -> Value {
    json!({
        "call_id": record.key.call_id,
        "local_tag": record.key.local_tag,
        "remote_tag": record.key.remote_tag,
        "device_id": record.device_id,
        "call_ref": record.call_ref,
        "owner": record.owner,
        "epoch": record.epoch,
        "version": record.version,
        "updated_at_ms": record.updated_at_ms,
        "state": if record.is_live() { "live" } else { "tombstone" },
        "held_here": held_here,
        // An early record (a ringing call, `early-and-confirmed`) holds the INVITE, not a
        // dialog export.
        "early": early_invite_of(record).is_some(),
        // A SIP watcher's subscription to the device's presence (its dialog inlined below).
        "subscription": subscription_of(record).is_some(),
        "sip_dialog": sip_record_of(record)
            .ok()
            .or_else(|| subscription_of(record).and_then(Result::ok).map(|s| s.dialog)),
        "media": {"local_sdp": record.media.local_sdp, "remote_sdp": record.media.remote_sdp},
    })
}

async fn dialog(
    State(node): State<Arc<NodeShared>>,
    Path((call_id, local_tag, remote_tag)): DialogPath,
) -> (StatusCode, Json<Value>) {
    let bridge = &node.bridge;
    let key = DialogKey::new(call_id, local_tag, remote_tag);
    match bridge.stored_dialog(&key).await {
        Ok(Some(record)) => (
            StatusCode::OK,
            Json(record_json(&record, bridge.holds(&key))),
        ),
        Ok(None) => error_response(&TakeoverError::NotFound),
        Err(e) => error_response(&e),
    }
}

/// Runs a dialog operation of the bridge (claim or hang up) and answers with the call it
/// concerned, or the takeover error.
fn dialog_operation_response(
    node: &NodeShared,
    success: StatusCode,
    outcome: Result<(String, u32), TakeoverError>,
) -> (StatusCode, Json<Value>) {
    match outcome {
        Ok((device, call_ref)) => (
            success,
            Json(json!({"device_id": device, "call_ref": call_ref, "node_id": node.node_id})),
        ),
        Err(e) => error_response(&e),
    }
}

async fn claim_dialog(
    State(node): State<Arc<NodeShared>>,
    Path((call_id, local_tag, remote_tag)): DialogPath,
) -> (StatusCode, Json<Value>) {
    let bridge = &node.bridge;
    let key = DialogKey::new(call_id, local_tag, remote_tag);
    let outcome = bridge.claim_dialog(&key).await;
    dialog_operation_response(&node, StatusCode::OK, outcome)
}

async fn bye_dialog(
    State(node): State<Arc<NodeShared>>,
    Path((call_id, local_tag, remote_tag)): DialogPath,
) -> (StatusCode, Json<Value>) {
    let bridge = &node.bridge;
    let key = DialogKey::new(call_id, local_tag, remote_tag);
    let outcome = bridge.hangup_dialog(&key).await;
    dialog_operation_response(&node, StatusCode::ACCEPTED, outcome)
}

async fn device_dialogs(
    State(node): State<Arc<NodeShared>>,
    Path(device): Path<String>,
) -> (StatusCode, Json<Value>) {
    let bridge = &node.bridge;
    match bridge.stored_dialogs_of(&device).await {
        Ok(records) => (
            StatusCode::OK,
            Json(Value::Array(
                records
                    .iter()
                    .map(|r| record_json(r, bridge.holds(&r.key)))
                    .collect(),
            )),
        ),
        Err(e) => error_response(&e),
    }
}
