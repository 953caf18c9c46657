//! Rendering of gateway frames and connection events for people (`connect`) and programs
//! (`--json`: one JSON object per line, the format in docs/simulator-json.md).

use std::io::Write;
use std::time::SystemTime;

use serde_json::{json, Map, Value};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    CallState, EndReason, Envelope, ErrorCode, GoodbyeReason, MediaOffer, MediaStats, PresenceState,
};

/// Lower-case enum name without its type prefix: `ERROR_CODE_FRAME_TOO_LARGE` -> `frame_too_large`.
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

fn error_code(code: i32) -> String {
    ErrorCode::try_from(code).map_or_else(
        |_| format!("code_{code}"),
        |c| enum_name(c.as_str_name(), "ERROR_CODE_"),
    )
}

fn media(m: &Option<MediaOffer>) -> Value {
    match m {
        None => Value::Null,
        Some(m) => json!({
            "audio_codecs": m.audio_codecs.iter().map(|c| thalamus_proto::v1::AudioCodec::try_from(*c)
                .map_or_else(|_| c.to_string(), |c| enum_name(c.as_str_name(), "AUDIO_CODEC_"))).collect::<Vec<_>>(),
            "video_codecs": m.video_codecs.iter().map(|c| thalamus_proto::v1::VideoCodec::try_from(*c)
                .map_or_else(|_| c.to_string(), |c| enum_name(c.as_str_name(), "VIDEO_CODEC_"))).collect::<Vec<_>>(),
        }),
    }
}

/// The JSON fields of a gateway frame: `(event name, fields)`.
pub fn frame_fields(env: &Envelope) -> (&'static str, Value) {
    let kind = thalamus_proto::body_kind(env.body.as_ref());
    let fields = match &env.body {
        Some(Body::Welcome(w)) => json!({
            "session_id": w.session_id,
            "resumed": w.resumed,
            "address_of_record": w.address_of_record,
            "keepalive_interval_ms": w.keepalive_interval_ms,
            "idle_timeout_ms": w.idle_timeout_ms,
            "node_id": w.node_id,
            "live_calls": w.live_calls.iter().map(|c| json!({"call_ref": c.call_ref, "remote_uri": c.remote_uri})).collect::<Vec<_>>(),
        }),
        Some(Body::Error(e)) => json!({
            "code": error_code(e.code),
            "message": e.message,
            "request_id": e.request_id,
        }),
        Some(Body::Goodbye(g)) => json!({
            "reason": GoodbyeReason::try_from(g.reason)
                .map_or_else(|_| g.reason.to_string(), |r| enum_name(r.as_str_name(), "GOODBYE_REASON_")),
            "message": g.message,
        }),
        Some(Body::Redirect(r)) => json!({"address": r.address, "node_id": r.node_id}),
        Some(Body::Pong(p)) => json!({"nonce": p.nonce, "request_id": env.request_id}),
        Some(Body::Ping(p)) => json!({"nonce": p.nonce}),
        Some(Body::CallEvent(c)) => json!({
            "call_ref": c.call_ref,
            "state": CallState::try_from(c.state)
                .map_or_else(|_| c.state.to_string(), |s| enum_name(s.as_str_name(), "CALL_STATE_")),
            "sip_status": c.sip_status,
            "reason": c.reason,
            "end_reason": EndReason::try_from(c.end_reason)
                .map_or_else(|_| c.end_reason.to_string(), |s| enum_name(s.as_str_name(), "END_REASON_")),
            "media": media(&c.media),
            "stats": c.stats.as_ref().map(stats_json),
            "streams": c.streams.iter().map(stats_json).collect::<Vec<_>>(),
        }),
        Some(Body::IncomingCall(c)) => json!({
            "call_ref": c.call_ref,
            "from_uri": c.from_uri,
            "display_name": c.display_name,
            "to_uri": c.to_uri,
            "call_waiting": c.call_waiting,
            "replaces_call_ref": c.replaces_call_ref,
            "media": media(&c.media),
        }),
        Some(Body::TextReceived(t)) => json!({
            "from_uri": t.from_uri,
            "display_name": t.display_name,
            "content_type": t.content_type,
            "body": String::from_utf8_lossy(&t.body),
        }),
        Some(Body::TextStatus(t)) => json!({
            "sip_status": t.sip_status,
            "reason": t.reason,
            "delivered": t.delivered,
            "request_id": env.request_id,
        }),
        Some(Body::Dtmf(d)) => {
            json!({"call_ref": d.call_ref, "digit": d.digit, "duration_ms": d.duration_ms})
        }
        Some(Body::TransferRequested(t)) => json!({
            "call_ref": t.call_ref,
            "new_call_ref": t.new_call_ref,
            "target": t.target,
            "referred_by": t.referred_by,
        }),
        Some(Body::TransferStatus(t)) => json!({
            "call_ref": t.call_ref,
            "sip_status": t.sip_status,
            "reason": t.reason,
            "done": t.done,
            "request_id": env.request_id,
        }),
        // The token itself is a secret: never printed.
        Some(Body::ResumeToken(t)) => json!({"valid_for_secs": t.valid_for_secs}),
        Some(Body::PresenceUpdate(p)) => json!({
            "uri": p.uri,
            "state": PresenceState::try_from(p.state)
                .map_or_else(|_| p.state.to_string(), |s| enum_name(s.as_str_name(), "PRESENCE_STATE_")),
            "note": p.note,
        }),
        Some(Body::WatchStatus(w)) => json!({
            "target": w.target,
            "active": w.active,
            "sip_status": w.sip_status,
            "reason": w.reason,
            "request_id": env.request_id,
        }),
        _ => json!({}),
    };
    (kind, fields)
}

/// Where events go.
#[derive(Debug, Clone, Copy)]
pub struct EventPrinter {
    /// One JSON object per line instead of human text.
    pub json: bool,
}

impl EventPrinter {
    /// The `Welcome` of an SDK session that went live, printed as the frame it was.
    pub fn welcome(&self, welcome: thalamus_proto::v1::Welcome) {
        self.frame(&Envelope {
            request_id: 0,
            body: Some(Body::Welcome(welcome)),
        });
    }

    /// A redirect the SDK session followed, printed as the frame it was.
    pub fn redirect(&self, address: String, node_id: String) {
        self.frame(&Envelope {
            request_id: 0,
            body: Some(Body::Redirect(thalamus_proto::v1::Redirect {
                address,
                node_id,
            })),
        });
    }

    /// `disconnected`: the SDK session lost its connection (and the gateway's close code).
    pub fn disconnected(&self, reason: &str, close_code: Option<u32>) {
        let mut fields = serde_json::json!({ "reason": reason });
        if let Some(code) = close_code {
            fields["close_code"] = serde_json::json!(code);
        }
        self.emit("disconnected", fields);
    }

    /// `reconnecting`: the SDK session tries again after `wait`, failed attempt `attempt`.
    pub fn reconnecting(&self, attempt: u32, wait: std::time::Duration, next: Option<String>) {
        self.emit(
            "reconnecting",
            serde_json::json!({
                "attempt": attempt,
                "delay_ms": u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "gateway": next.unwrap_or_default(),
            }),
        );
    }

    /// Prints one event with its fields.
    pub fn emit(&self, event: &str, fields: Value) {
        let mut out = std::io::stdout().lock();
        if self.json {
            let mut obj = Map::new();
            obj.insert(
                "ts".into(),
                Value::String(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
            );
            obj.insert("event".into(), Value::String(event.into()));
            if let Value::Object(f) = fields {
                obj.extend(f);
            }
            let _ = writeln!(out, "{}", Value::Object(obj));
        } else {
            let text = match &fields {
                Value::Object(f) if !f.is_empty() => f
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            };
            let _ = writeln!(out, "{event:<14} {text}");
        }
        let _ = out.flush();
    }

    /// Prints a frame received from the gateway.
    pub fn frame(&self, env: &Envelope) {
        let (event, fields) = frame_fields(env);
        self.emit(event, fields);
    }
}

/// The gateway's statistics of one stream (a `MediaStats`) as JSON.
pub(crate) fn stats_json(s: &MediaStats) -> Value {
    json!({
        "stream_id": s.stream_id,
        "packets_sent": s.packets_sent,
        "packets_received": s.packets_received,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "packets_lost": s.packets_lost,
        "jitter_us": s.jitter_us,
        "relay_latency_us": s.relay_latency_us,
        "round_trip_us": s.round_trip_us,
        "peer_reported_lost": s.peer_reported_lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_proto::v1::{Error, Goodbye};

    #[test]
    fn enums_render_without_prefix() {
        let env = Envelope {
            request_id: 3,
            body: Some(Body::Error(Error {
                code: ErrorCode::FrameTooLarge as i32,
                message: "m".into(),
                request_id: 3,
            })),
        };
        let (event, fields) = frame_fields(&env);
        assert_eq!(event, "error");
        assert_eq!(fields["code"], "frame_too_large");
        let env = Envelope {
            request_id: 0,
            body: Some(Body::Goodbye(Goodbye {
                reason: GoodbyeReason::Replaced as i32,
                message: String::new(),
            })),
        };
        assert_eq!(frame_fields(&env).1["reason"], "replaced");
    }
}
