//! The node's Prometheus registry (prefix `thalamus`) and the node-level metrics that belong
//! to no component (`node_draining`).
//!
//! Every component registers its own metrics here at start-up (ingress, bridge, media,
//! replication); the admin endpoint renders them all in the text exposition format. This module
//! only holds and renders; it serves nothing.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The registry and the node's own metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// 1 while the node is draining.
    pub draining: Gauge,
    /// 1 while the node steps aside (it alone lost the dialog store).
    pub stepped_aside: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with the node's own metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("thalamus");
        let draining = Gauge::default();
        registry.register(
            "node_draining",
            "1 while the node is draining (no new calls or devices)",
            draining.clone(),
        );
        let stepped_aside = Gauge::default();
        registry.register(
            "node_stepped_aside",
            "1 while the node steps aside: its dialog store does not answer while other nodes \
             reach theirs, so it drains until the store answers",
            stepped_aside.clone(),
        );
        Self {
            registry,
            draining,
            stepped_aside,
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_components_register() {
        let mut m = Metrics::new();
        let ingress = thalamus_ingress::IngressMetrics::default();
        ingress.register(m.registry_mut());
        thalamus_ingress::metrics::inc_session(&ingress.auth_failures, "wrong_secret", "quic");
        m.draining.set(1);
        let text = m.render();
        assert!(
            text.contains(
                "thalamus_device_auth_failures_total{reason=\"wrong_secret\",transport=\"quic\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("thalamus_node_draining 1"), "{text}");
    }
}
