//! Prometheus metrics of device ingress: connections, sessions, logins, frames and the limits
//! they hit. [`IngressMetrics::register`] adds them to the node's registry (prefix `thalamus`);
//! this module only counts, it renders and serves nothing.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use thalamus_telemetry::{inc, ReasonLabel};

/// A label naming a message kind and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabel {
    /// `in` or `out`.
    pub direction: &'static str,
    /// Message kind, e.g. `hello`.
    pub kind: &'static str,
    /// The transport the session came over: `quic` or `webtransport`.
    pub transport: &'static str,
}

/// A label naming a reason and the transport of the session it happened on.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabel {
    /// The reason.
    pub reason: &'static str,
    /// `quic` or `webtransport`.
    pub transport: &'static str,
}

/// Counts one session event of `reason` on `transport`.
pub fn inc_session(
    family: &Family<SessionLabel, Counter>,
    reason: &'static str,
    transport: &'static str,
) {
    family
        .get_or_create(&SessionLabel { reason, transport })
        .inc();
}

/// A label naming the transport a device came over: `quic` or `webtransport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `quic` (MBFP on its own QUIC connection) or `webtransport` (in a WebTransport session).
    pub transport: &'static str,
}

/// Bumps `family`'s counter of `transport`.
pub fn inc_transport(family: &Family<TransportLabel, Counter>, transport: &'static str) {
    family.get_or_create(&TransportLabel { transport }).inc();
}

/// The ingress metrics.
#[derive(Debug, Clone, Default)]
pub struct IngressMetrics {
    /// QUIC connections accepted.
    pub connections_accepted: Counter,
    /// QUIC connections refused, by reason (`total_limit`, `per_ip_limit`).
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// QUIC connections open now.
    pub connections_open: Gauge,
    /// Device sessions live now (authenticated).
    pub sessions_live: Gauge,
    /// Sessions established (`new` or `resumed`). This family and the next four carry the
    /// session's transport (`transport`: `quic` or `webtransport`) beside the reason.
    pub sessions_started: Family<SessionLabel, Counter>,
    /// Sessions ended, by reason (`replaced`, `idle`, `closed`, `error`, `shutdown`...).
    pub sessions_ended: Family<SessionLabel, Counter>,
    /// Failed authentications, by reason (`unknown_device`, `wrong_secret`, `bad_hello`).
    pub auth_failures: Family<SessionLabel, Counter>,
    /// Authentications delayed because of earlier failures from the same address.
    pub auth_throttled: Counter,
    /// Control frames by direction and kind.
    pub frames: Family<FrameLabel, Counter>,
    /// Bad frames, by error (`bad_frame`, `frame_too_large`, `unsupported`, `protocol_violation`).
    pub frame_errors: Family<SessionLabel, Counter>,
    /// Limits hit, by limit (`send_queue`, `hello_timeout`, `max_calls`...).
    pub limits_hit: Family<ReasonLabel, Counter>,
    /// Resume attempts rejected, by reason (`malformed`, `bad_signature`, `expired`).
    pub resume_rejected: Family<SessionLabel, Counter>,
    /// Logins sent to their owner node with `Redirect`.
    pub sessions_redirected: Counter,
    /// Connections that reached the session driver, by transport.
    pub connections_by_transport: Family<TransportLabel, Counter>,
    /// Device sessions live now, by transport.
    pub sessions_live_by_transport: Family<TransportLabel, Gauge>,
}

impl IngressMetrics {
    /// Registers every ingress metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "quic_connections_accepted",
            "QUIC connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "quic_connections_refused",
            "QUIC connections refused by a limit",
            m.connections_refused.clone(),
        );
        registry.register(
            "quic_connections_open",
            "QUIC connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "device_connections",
            "Device connections that reached a session, by transport (quic, webtransport)",
            m.connections_by_transport.clone(),
        );
        registry.register(
            "device_sessions_live_by_transport",
            "Authenticated device sessions live now, by transport (quic, webtransport)",
            m.sessions_live_by_transport.clone(),
        );
        registry.register(
            "device_sessions_live",
            "Authenticated device sessions live now",
            m.sessions_live.clone(),
        );
        registry.register(
            "device_sessions_started",
            "Device sessions established",
            m.sessions_started.clone(),
        );
        registry.register(
            "device_sessions_ended",
            "Device sessions ended, by reason",
            m.sessions_ended.clone(),
        );
        registry.register(
            "device_auth_failures",
            "Failed device authentications",
            m.auth_failures.clone(),
        );
        registry.register(
            "device_auth_throttled",
            "Authentications slowed down after repeated failures",
            m.auth_throttled.clone(),
        );
        registry.register("mbfp_frames", "MBFP control frames", m.frames.clone());
        registry.register(
            "mbfp_frame_errors",
            "MBFP frames rejected, by error",
            m.frame_errors.clone(),
        );
        registry.register("limits_hit", "Configured limits hit", m.limits_hit.clone());
        registry.register(
            "resume_rejected",
            "Resume tokens rejected",
            m.resume_rejected.clone(),
        );
        registry.register(
            "device_sessions_redirected",
            "Logins sent to the device's owner node with Redirect",
            m.sessions_redirected.clone(),
        );
    }

    /// Counts one frame of a session on `transport`.
    pub fn frame(&self, direction: &'static str, kind: &'static str, transport: &'static str) {
        self.frames
            .get_or_create(&FrameLabel {
                direction,
                kind,
                transport,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_counters() {
        let m = IngressMetrics::default();
        let mut registry = Registry::with_prefix("thalamus");
        m.register(&mut registry);
        inc_session(&m.auth_failures, "wrong_secret", "quic");
        m.frame("in", "hello", "quic");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "thalamus_device_auth_failures_total{reason=\"wrong_secret\",transport=\"quic\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "thalamus_mbfp_frames_total{direction=\"in\",kind=\"hello\",transport=\"quic\"} 1"
        ));
    }
}
