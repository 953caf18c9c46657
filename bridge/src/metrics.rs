//! The bridge's Prometheus metrics ([`BridgeMetrics`]): calls, texts, refusals, takeovers,
//! write-aheads, lost dialogs and arrival waits. It only counts; the node registers and
//! renders them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use thalamus_telemetry::ReasonLabel;

/// Bridge counters.
#[derive(Debug, Clone)]
pub struct BridgeMetrics {
    /// Calls started, by direction (`outgoing`, `incoming`).
    pub calls_started: Family<ReasonLabel, Counter>,
    /// Calls ended, by end reason.
    pub calls_ended: Family<ReasonLabel, Counter>,
    /// Calls in progress.
    pub calls_active: Gauge,
    /// SIP requests refused by the bridge, by status class reason.
    pub sip_refused: Family<ReasonLabel, Counter>,
    /// Texts, by direction and outcome.
    pub texts: Family<ReasonLabel, Counter>,
    /// Takeover attempts, by outcome (`claimed`, `claimed_early`: a ringing call, `ended`,
    /// `not_found`, `lost_race`, `unavailable`, `invalid`, `disabled`).
    pub takeovers: Family<ReasonLabel, Counter>,
    /// Time from a request for an unknown dialog arriving to its answer by the call that took
    /// the dialog over, seconds.
    pub takeover_latency: Histogram,
    /// Local CSeq writes ahead of an in-dialog request, by outcome (`written`, `timeout`,
    /// `error`, `lost`: another node owns the dialog, the request was not sent).
    pub write_ahead: Family<ReasonLabel, Counter>,
    /// Dialogs dropped because another node took them over (a replication conflict).
    pub dialogs_lost: Counter,
    /// Requests for a device not logged in here that waited for it, by outcome (`arrived`,
    /// `timeout`, `refused`: too many waiting).
    pub arrival_waits: Family<ReasonLabel, Counter>,
    /// Time from a call's start (the device's `Dial`, or the INVITE for the device) to its
    /// answer, seconds, by direction (`outgoing`, `incoming`). It includes the ringing.
    pub call_setup: Family<ReasonLabel, Histogram>,
    /// Presence subscriptions (SIP watchers of devices) held on this node.
    pub presence_subscriptions: Gauge,
    /// Presence NOTIFYs, by outcome (`sent`, `refused`: a non-2xx other than 481, `gone`: 481,
    /// no answer or not sendable, which ends the subscription).
    pub presence_notifies: Family<ReasonLabel, Counter>,
    /// Devices' watches of SIP buddies held on this node.
    pub buddy_watches: Gauge,
    /// Events of devices' watches of SIP buddies (`subscribed`, `ended`, `update`: a presence
    /// change sent to the device).
    pub buddy_presence: Family<ReasonLabel, Counter>,
}

fn setup_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

impl Default for BridgeMetrics {
    fn default() -> Self {
        Self {
            calls_started: Family::default(),
            calls_ended: Family::default(),
            calls_active: Gauge::default(),
            sip_refused: Family::default(),
            texts: Family::default(),
            takeovers: Family::default(),
            takeover_latency: Histogram::new([
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
            ]),
            write_ahead: Family::default(),
            dialogs_lost: Counter::default(),
            arrival_waits: Family::default(),
            call_setup: Family::new_with_constructor(setup_histogram),
            presence_subscriptions: Gauge::default(),
            presence_notifies: Family::default(),
            buddy_watches: Gauge::default(),
            buddy_presence: Family::default(),
        }
    }
}

impl BridgeMetrics {
    /// Registers the bridge's metrics.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "calls_started",
            "Calls started, by direction",
            self.calls_started.clone(),
        );
        registry.register(
            "calls_ended",
            "Calls ended, by MBFP end reason",
            self.calls_ended.clone(),
        );
        registry.register(
            "calls_active",
            "Calls in progress",
            self.calls_active.clone(),
        );
        registry.register(
            "sip_refused",
            "SIP requests the bridge refused",
            self.sip_refused.clone(),
        );
        registry.register("texts", "Text messages", self.texts.clone());
        registry.register(
            "takeovers",
            "Dialog takeovers, by outcome",
            self.takeovers.clone(),
        );
        registry.register(
            "call_setup_seconds",
            "Time from a call's start (Dial, or the INVITE for the device) to its answer, by direction",
            self.call_setup.clone(),
        );
        registry.register(
            "takeover_latency_seconds",
            "Request for an unknown dialog in to its answer out, after a takeover",
            self.takeover_latency.clone(),
        );
        registry.register(
            "write_ahead",
            "Local CSeq writes ahead of in-dialog requests, by outcome",
            self.write_ahead.clone(),
        );
        registry.register(
            "dialogs_lost",
            "Dialogs dropped because another node took them over",
            self.dialogs_lost.clone(),
        );
        registry.register(
            "presence_subscriptions",
            "Presence subscriptions of SIP watchers held on this node",
            self.presence_subscriptions.clone(),
        );
        registry.register(
            "presence_notifies",
            "Presence NOTIFYs sent to SIP watchers, by outcome",
            self.presence_notifies.clone(),
        );
        registry.register(
            "buddy_watches",
            "Watches of SIP buddies' presence by devices held on this node",
            self.buddy_watches.clone(),
        );
        registry.register(
            "buddy_presence",
            "Events of devices' watches of SIP buddies, by kind",
            self.buddy_presence.clone(),
        );
        registry.register(
            "device_arrival_waits",
            "Requests for a device not logged in here that waited for it, by outcome",
            self.arrival_waits.clone(),
        );
    }
}
