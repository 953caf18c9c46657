//! Prometheus metrics of the gateway: every counter an operator would graph.
//!
//! One [`Metrics`] value is created at start-up and shared; it owns the registry that the admin
//! endpoint renders in the text exposition format. This module only counts; it serves nothing.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use thalamus_telemetry::ReasonLabel;

/// A label naming a message kind and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabel {
    /// `in` or `out`.
    pub direction: &'static str,
    /// Message kind, e.g. `hello`.
    pub kind: &'static str,
}

/// All gateway metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// QUIC connections accepted.
    pub connections_accepted: Counter,
    /// QUIC connections refused, by reason (`total_limit`, `per_ip_limit`).
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// QUIC connections open now.
    pub connections_open: Gauge,
    /// Device sessions live now (authenticated).
    pub sessions_live: Gauge,
    /// Sessions established (`new` or `resumed`).
    pub sessions_started: Family<ReasonLabel, Counter>,
    /// Sessions ended, by reason (`replaced`, `idle`, `closed`, `error`, `shutdown`...).
    pub sessions_ended: Family<ReasonLabel, Counter>,
    /// Failed authentications, by reason (`unknown_device`, `wrong_secret`, `bad_hello`).
    pub auth_failures: Family<ReasonLabel, Counter>,
    /// Authentications delayed because of earlier failures from the same address.
    pub auth_throttled: Counter,
    /// Control frames by direction and kind.
    pub frames: Family<FrameLabel, Counter>,
    /// Bad frames, by error (`bad_frame`, `frame_too_large`, `unsupported`, `protocol_violation`).
    pub frame_errors: Family<ReasonLabel, Counter>,
    /// Limits hit, by limit (`send_queue`, `hello_timeout`, `max_calls`...).
    pub limits_hit: Family<ReasonLabel, Counter>,
    /// Resume attempts rejected, by reason (`malformed`, `bad_signature`, `expired`).
    pub resume_rejected: Family<ReasonLabel, Counter>,
    /// Logins sent to their owner node with `Redirect`.
    pub sessions_redirected: Counter,
    /// 1 while the node is draining.
    pub draining: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("thalamus");
        let m = Self {
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            connections_open: Gauge::default(),
            sessions_live: Gauge::default(),
            sessions_started: Family::default(),
            sessions_ended: Family::default(),
            auth_failures: Family::default(),
            auth_throttled: Counter::default(),
            frames: Family::default(),
            frame_errors: Family::default(),
            limits_hit: Family::default(),
            resume_rejected: Family::default(),
            sessions_redirected: Counter::default(),
            draining: Gauge::default(),
            registry: Registry::default(),
        };
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
        registry.register(
            "node_draining",
            "1 while the node is draining (no new calls or devices)",
            m.draining.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry, for components that register their own metrics at start-up.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Renders all metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts one event with a reason label.
    pub fn inc(family: &Family<ReasonLabel, Counter>, reason: &'static str) {
        family.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts one frame.
    pub fn frame(&self, direction: &'static str, kind: &'static str) {
        self.frames
            .get_or_create(&FrameLabel { direction, kind })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_counters() {
        let m = Metrics::new();
        Metrics::inc(&m.auth_failures, "wrong_secret");
        m.frame("in", "hello");
        let text = m.render();
        assert!(
            text.contains("thalamus_device_auth_failures_total{reason=\"wrong_secret\"} 1"),
            "{text}"
        );
        assert!(text.contains("thalamus_mbfp_frames_total{direction=\"in\",kind=\"hello\"} 1"));
    }
}
