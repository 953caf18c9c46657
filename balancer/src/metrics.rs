//! Prometheus metrics of the balancer (prefix `thalamus_balancer`). This module only counts and
//! renders; the admin endpoint in `server` serves the text.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
pub use thalamus_telemetry::ReasonLabel;

/// A label naming a node (`external` for traffic not from or to a node).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    /// Node id or `external`.
    pub node: String,
}

/// A label naming a status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status, e.g. `503`.
    pub status: u16,
}

/// Every balancer metric.
#[derive(Debug)]
pub struct BalancerMetrics {
    registry: Registry,
    /// Requests forwarded, by destination node (`external` for requests leaving the cluster).
    pub requests_forwarded: Family<NodeLabel, Counter>,
    /// Responses forwarded, by the node that sent them (`external` otherwise).
    pub responses_forwarded: Family<NodeLabel, Counter>,
    /// Requests answered by the balancer itself, by status (200 OPTIONS, 400, 482, 483, 502, 503).
    pub answered: Family<StatusLabel, Counter>,
    /// Messages dropped, by reason.
    pub dropped: Family<ReasonLabel, Counter>,
    /// Sends that failed (socket error, unresolvable name, congested TCP).
    pub send_errors: Counter,
    /// Nodes up now.
    pub nodes_up: Gauge,
    /// Nodes up and draining now.
    pub nodes_draining: Gauge,
    /// Nodes in the table (up or down).
    pub nodes_known: Gauge,
    /// Restarts detected (new session id).
    pub restarts: Counter,
    /// Heartbeats known lost (sequence gaps, and the miss count of each take-out).
    pub heartbeats_missed: Counter,
    /// Heartbeats accepted.
    pub heartbeats_received: Counter,
    /// Heartbeats rejected or ignored, by reason.
    pub heartbeats_rejected: Family<ReasonLabel, Counter>,
    /// Nodes taken out for missed heartbeats.
    pub nodes_taken_out: Counter,
    /// Dialogs in which a new node acted after another (takeovers, as seen from here).
    pub dialogs_moved: Counter,
    /// Acts of a node in a dialog another node had taken over since (split brain).
    pub dialogs_acted_on_by_two_nodes: Counter,
    /// Dialogs the split-brain watch remembers now.
    pub dialogs_watched: Gauge,
}

impl Default for BalancerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BalancerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("thalamus_balancer");
        let m = Self {
            registry: Registry::default(),
            requests_forwarded: Family::default(),
            responses_forwarded: Family::default(),
            answered: Family::default(),
            dropped: Family::default(),
            send_errors: Counter::default(),
            nodes_up: Gauge::default(),
            nodes_draining: Gauge::default(),
            nodes_known: Gauge::default(),
            restarts: Counter::default(),
            heartbeats_missed: Counter::default(),
            heartbeats_received: Counter::default(),
            heartbeats_rejected: Family::default(),
            nodes_taken_out: Counter::default(),
            dialogs_moved: Counter::default(),
            dialogs_acted_on_by_two_nodes: Counter::default(),
            dialogs_watched: Gauge::default(),
        };
        registry.register(
            "requests_forwarded",
            "Requests forwarded, by destination node",
            m.requests_forwarded.clone(),
        );
        registry.register(
            "responses_forwarded",
            "Responses forwarded, by sending node",
            m.responses_forwarded.clone(),
        );
        registry.register(
            "answered",
            "Requests answered statelessly by the balancer, by status",
            m.answered.clone(),
        );
        registry.register("dropped", "Messages dropped, by reason", m.dropped.clone());
        registry.register("send_errors", "Sends that failed", m.send_errors.clone());
        registry.register("nodes_up", "Nodes up", m.nodes_up.clone());
        registry.register(
            "nodes_draining",
            "Nodes up and draining",
            m.nodes_draining.clone(),
        );
        registry.register("nodes_known", "Nodes in the table", m.nodes_known.clone());
        registry.register(
            "restarts",
            "Node restarts detected (new session id)",
            m.restarts.clone(),
        );
        registry.register(
            "heartbeats_missed",
            "Heartbeats known lost",
            m.heartbeats_missed.clone(),
        );
        registry.register(
            "heartbeats_received",
            "Heartbeats accepted",
            m.heartbeats_received.clone(),
        );
        registry.register(
            "heartbeats_rejected",
            "Heartbeats rejected or ignored, by reason",
            m.heartbeats_rejected.clone(),
        );
        registry.register(
            "nodes_taken_out",
            "Nodes taken out for missed heartbeats",
            m.nodes_taken_out.clone(),
        );
        registry.register(
            "dialogs_moved",
            "Dialogs in which a new node (or a restarted one) acted after another: takeovers",
            m.dialogs_moved.clone(),
        );
        registry.register(
            "dialogs_acted_on_by_two_nodes",
            "Messages a node sent in a dialog that another node had taken over since: split \
             brain, which fencing should prevent",
            m.dialogs_acted_on_by_two_nodes.clone(),
        );
        registry.register(
            "dialogs_watched",
            "Dialogs the split-brain watch remembers (acted on within its window)",
            m.dialogs_watched.clone(),
        );
        Self { registry, ..m }
    }

    /// The text exposition of every metric.
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
    fn renders_counters_by_node() {
        let m = BalancerMetrics::new();
        m.requests_forwarded
            .get_or_create(&NodeLabel { node: "n1".into() })
            .inc();
        m.answered.get_or_create(&StatusLabel { status: 483 }).inc();
        m.nodes_up.set(2);
        let text = m.render();
        assert!(text.contains("thalamus_balancer_requests_forwarded_total{node=\"n1\"} 1"));
        assert!(text.contains("thalamus_balancer_answered_total{status=\"483\"} 1"));
        assert!(text.contains("thalamus_balancer_nodes_up 2"));
    }
}
