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
//! - `GET /nodes/{node}/dialogs`: up to 200 live stored dialogs `node` owns (what a survivor
//!   may claim when that node is down); it needs the token;
//! - `GET /drain`, `POST /drain`, `DELETE /drain`: whether the node is draining, start
//!   draining, stop draining (see [`NodeShared::set_draining`]);
//! - `GET /cluster`: this node's id, draining flag and the live set the balancers last
//!   reported (the nodes its devices are redirected among);
//! - `GET /console`: the operator console (`crate::console`, docs/console.md), whose data
//!   needs the token.
//!
//! Only the POSTs and the DELETE change anything, and they need `Authorization: Bearer
//! <token>` (`admin.token`, or the one generated into `<data_dir>/admin.token`); a request
//! from a browser page of another site (an `Origin` other than this endpoint's own, or
//! `Sec-Fetch-Site` other than `same-origin`/`none`) is refused even with it. Reads need no
//! token, but for the console's data and the listing of a node's dialogs. Refusals are
//! counted (`admin_refused_total{reason}`).
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

use crate::console::{bearer_token, cluster_json, is_admin_token};
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
        .route("/nodes/{node}/dialogs", get(node_dialogs))
        .merge(crate::console::routes())
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
    match bearer_token(headers) {
        Some(token) if is_admin_token(&node, token) => next.run(request).await,
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
        Ok(records) => (StatusCode::OK, records_json(&node, &records)),
        Err(e) => error_response(&e),
    }
}

/// Stored records as a JSON array, each saying whether this node holds it.
fn records_json(node: &NodeShared, records: &[StoredDialog]) -> Json<Value> {
    Json(Value::Array(
        records
            .iter()
            .map(|r| record_json(r, node.bridge.holds(&r.key)))
            .collect(),
    ))
}

/// Most records `GET /nodes/{node}/dialogs` lists.
const NODE_DIALOGS_LIMIT: usize = 200;

/// The live stored dialogs another node (or this one) owns: what a survivor may claim when
/// that node is down. Up to 200, ordered by device and call.
async fn node_dialogs(
    State(node): State<Arc<NodeShared>>,
    Path(owner): Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    // A listing of many dialogs, their SDP (SDES keys) included: the token's, as the
    // console's data.
    if let Some(refused) = crate::console::read_refusal(&node, &headers, "dialogs_token") {
        return refused;
    }
    let bridge = &node.bridge;
    match bridge
        .stored_dialogs_owned_by(&owner, NODE_DIALOGS_LIMIT)
        .await
    {
        Ok(mut records) => {
            records.sort_by(|a, b| (&a.device_id, a.call_ref).cmp(&(&b.device_id, b.call_ref)));
            (StatusCode::OK, records_json(&node, &records)).into_response()
        }
        Err(e) => error_response(&e).into_response(),
    }
}
