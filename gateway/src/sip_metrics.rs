//! The SIP stack's Prometheus metrics, read on each scrape from the user agent's published
//! counters and the transport's atomics ([`SipCollector`]).
//!
//! Names, under the registry's prefix `thalamus_`:
//! - `sip_transactions`, `sip_dialogs` (gauges): live now;
//! - `sip_limit_refusals_total{reason}` (counter): new requests refused by a limit before they
//!   cost anything: `table_full`, `source_rate`, `source_share`, `too_many_sources` (answered
//!   503 with Retry-After) and `flood_dropped` (not answered: the source kept sending while
//!   refused);
//! - `sip_invalid_total{kind="request"|"response"}`, `sip_unknown_dialog_total`,
//!   `sip_via_maddr_ignored_total`, `sip_early_dialogs_removed_total`,
//!   `sip_bad_extension_total` (requests answered 420) (counters);
//! - `sip_messages_total{direction="received"|"sent"}`, `sip_parse_errors_total`,
//!   `sip_dropped_overload_total`, `sip_stale_requests_total` (counters);
//! - `sip_tcp_connections` (gauge), `sip_tcp_buffered_bytes` (gauge),
//!   `sip_tcp_events_total{event}` (counter): `refused` (a connection limit), `connect_failed`,
//!   `queue_full` (a destination's send queue), `closed_slow` (a message not received whole in
//!   time), `closed_buffer_limit` (the node's receive buffers full), `tls_handshake_failed`
//!   (a TLS handshake refused or timed out, either way: a certificate that does not verify),
//!   `tls_established` (a TLS handshake completed, either way). TLS connections are counted
//!   with the TCP ones.
//!
//! It only reads counters; the SIP stack keeps them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use thalamus_sip::transport::SipTransport;
use thalamus_sip::ua::SipCounters;
use thalamus_telemetry::{encode_counter as counter, encode_gauge};

/// Renders the SIP stack's counters on each scrape.
#[derive(Debug)]
pub struct SipCollector {
    counters: Arc<SipCounters>,
    transport: SipTransport,
}

impl SipCollector {
    /// Registers a collector for a user agent's counters and transport with `registry`.
    pub fn register(
        counters: Arc<SipCounters>,
        transport: SipTransport,
        registry: &mut prometheus_client::registry::Registry,
    ) {
        registry.register_collector(Box::new(SipCollector {
            counters,
            transport,
        }));
    }
}

fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn read_usize(c: &AtomicUsize) -> u64 {
    c.load(Ordering::Relaxed) as u64
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    encode_gauge(
        encoder,
        name,
        help,
        i64::try_from(value).unwrap_or(i64::MAX),
    )
}

fn labelled(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value_label, value) in values {
        let labels = [(label, *value_label)];
        ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for SipCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        let t = self.transport.stats();
        gauge(
            &mut encoder,
            "sip_transactions",
            "Live SIP transactions",
            read(&c.transactions),
        )?;
        gauge(
            &mut encoder,
            "sip_dialogs",
            "SIP dialogs in the table",
            read(&c.dialogs),
        )?;
        labelled(
            &mut encoder,
            "sip_limit_refusals",
            "New SIP requests refused by a limit (503 with Retry-After) or dropped unanswered (flood_dropped)",
            "reason",
            &[
                ("table_full", read(&c.refused_table)),
                ("source_rate", read(&c.refused_source_rate)),
                ("source_share", read(&c.refused_source_share)),
                ("too_many_sources", read(&c.refused_sources)),
                ("flood_dropped", read(&c.dropped_flood)),
            ],
        )?;
        labelled(
            &mut encoder,
            "sip_invalid",
            "SIP messages that failed validation (requests answered statelessly, responses dropped)",
            "kind",
            &[
                ("request", read(&c.invalid_requests)),
                ("response", read(&c.invalid_responses)),
            ],
        )?;
        counter(
            &mut encoder,
            "sip_early_dialogs_removed",
            "Early dialogs removed when their INVITE ended without a 2xx confirming them (losing forks, 1xx then CANCEL or timeout)",
            read(&c.early_dialogs_removed),
        )?;
        counter(
            &mut encoder,
            "sip_bad_extension",
            "SIP requests answered 420 (Bad Extension): their Require named an extension the gateway lacks",
            read(&c.bad_extension),
        )?;
        counter(
            &mut encoder,
            "sip_via_maddr_ignored",
            "SIP requests whose Via maddr was ignored (responses go to the request's source)",
            read(&c.via_maddr_ignored),
        )?;
        counter(
            &mut encoder,
            "sip_unknown_dialog",
            "In-dialog SIP requests answered 481",
            read(&c.unknown_dialog),
        )?;
        labelled(
            &mut encoder,
            "sip_messages",
            "SIP messages received and sent",
            "direction",
            &[("received", read(&t.received)), ("sent", read(&t.sent))],
        )?;
        counter(
            &mut encoder,
            "sip_parse_errors",
            "SIP messages that did not parse",
            read(&t.parse_errors),
        )?;
        counter(
            &mut encoder,
            "sip_dropped_overload",
            "SIP messages dropped because the stack's input queue was full",
            read(&t.dropped_overload),
        )?;
        counter(
            &mut encoder,
            "sip_stale_requests",
            "SIP requests dropped unanswered because they waited in the UDP socket longer than sip.limits.max_request_age_ms (the node was frozen or far behind)",
            read(&t.stale_requests),
        )?;
        gauge(
            &mut encoder,
            "sip_tcp_connections",
            "SIP TCP connections open (and being opened)",
            read_usize(&t.connections_open),
        )?;
        gauge(
            &mut encoder,
            "sip_tcp_buffered_bytes",
            "Bytes of partial SIP messages buffered by all TCP connections",
            read_usize(&t.buffered_bytes),
        )?;
        labelled(
            &mut encoder,
            "sip_tcp_events",
            "SIP TCP and TLS connection events: refused by a limit, connect failed, a destination's queue full, closed for a slow message or full buffers, a TLS handshake failed or completed",
            "event",
            &[
                ("refused", read(&t.connections_refused)),
                ("connect_failed", read(&t.connect_failures)),
                ("queue_full", read(&t.queue_full)),
                ("closed_slow", read(&t.closed_slow)),
                ("closed_buffer_limit", read(&t.closed_buffer_limit)),
                ("tls_handshake_failed", read(&t.tls_handshake_failures)),
                ("tls_established", read(&t.tls_handshakes)),
            ],
        )?;
        Ok(())
    }
}
