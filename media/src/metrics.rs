//! Node-wide media figures: relays started, live and finished, port pairs in use, packets
//! relayed and relay latency quantiles of finished relays, and a Prometheus collector that
//! renders them on each scrape.
//!
//! The totals are counted in [`crate::totals`] by an engine and its relay tasks.
//! [`MediaCollector`] reads the totals and the port allocator when the admin endpoint renders
//! `/metrics`.
//!
//! What it does not do: no per-call labels (call counts are unbounded), no figures for relays
//! still running (their packets and latencies are added when they end) or aborted relays.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::engine::MediaEngine;

/// Renders an engine's figures on each scrape (register it with
/// [`MediaCollector::register`]). Metric names, under the registry's prefix:
///
/// - `media_ports_in_use` (gauge): RTP/RTCP port pairs allocated now;
/// - `media_relays_live` (gauge): relay tasks alive now;
/// - `media_relays_started_total`, `media_relays_finished_total` (counters);
/// - `media_relayed_packets_total{direction="to_peer"|"to_device"}` (counter, finished relays);
/// - `media_relay_latency_seconds{direction,quantile="0.5"|"0.99"|"1"}` (gauge, finished
///   relays; `1` is the maximum): time from a packet's arrival at the relay to its send;
/// - `media_srtp_refused_total{cause="authentication"|"replay"|"ssrc_limit"}` (counter,
///   finished relays): SRTP and SRTCP packets from peers refused.
#[derive(Debug, Clone)]
pub struct MediaCollector {
    engine: MediaEngine,
}

impl MediaCollector {
    /// Registers a collector for `engine` with `registry`.
    pub fn register(engine: MediaEngine, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(MediaCollector { engine }));
    }
}

use thalamus_telemetry::{encode_counter as counter, encode_gauge as gauge};

fn saturating_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for MediaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.engine.totals();
        gauge(
            &mut encoder,
            "media_ports_in_use",
            "RTP/RTCP port pairs allocated now",
            saturating_i64(self.engine.ports_in_use()),
        )?;
        gauge(
            &mut encoder,
            "media_relays_live",
            "Media relay tasks alive now",
            saturating_i64(totals.live()),
        )?;
        counter(
            &mut encoder,
            "media_relays_started",
            "Media relays started",
            totals.started(),
        )?;
        let finished = totals.finished();
        counter(
            &mut encoder,
            "media_relays_finished",
            "Media relays that ended normally",
            finished.relays,
        )?;
        {
            let mut metric_encoder = encoder.encode_descriptor(
                "media_relayed_packets",
                "Packets relayed by finished relays, by direction",
                None,
                MetricType::Counter,
            )?;
            for (direction, value) in [
                ("to_peer", finished.packets_to_peer),
                ("to_device", finished.packets_to_device),
            ] {
                let labels = [("direction", direction)];
                ConstCounter::new(value).encode(metric_encoder.encode_family(&labels)?)?;
            }
        }
        {
            let mut metric_encoder = encoder.encode_descriptor(
                "media_srtp_refused",
                "SRTP and SRTCP packets from SIP peers refused by finished relays, by cause",
                None,
                MetricType::Counter,
            )?;
            for (cause, value) in [
                ("authentication", finished.srtp_auth_failed),
                ("replay", finished.srtp_replayed),
                ("ssrc_limit", finished.srtp_too_many_ssrcs),
            ] {
                let labels = [("cause", cause)];
                ConstCounter::new(value).encode(metric_encoder.encode_family(&labels)?)?;
            }
        }
        let mut metric_encoder = encoder.encode_descriptor(
            "media_relay_latency_seconds",
            "Relay latency (arrival at the relay to send) of finished relays: quantiles, 1 is the maximum",
            None,
            MetricType::Gauge,
        )?;
        for (direction, histogram) in [
            ("to_peer", &finished.latency_to_peer),
            ("to_device", &finished.latency_to_device),
        ] {
            for (quantile, value) in [
                ("0.5", histogram.percentile(0.5)),
                ("0.99", histogram.percentile(0.99)),
                ("1", histogram.max()),
            ] {
                let labels = [("direction", direction), ("quantile", quantile)];
                ConstGauge::new(value.as_secs_f64())
                    .encode(metric_encoder.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::totals::EngineTotals;
    use crate::MediaConfig;
    use prometheus_client::registry::Registry;

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[test]
    fn refused_srtp_is_counted_by_cause() {
        use crate::relay::{RelayCore, RelaySettings, RemotePeer, SrtpKeys};
        let engine = MediaEngine::new(MediaConfig::default()).unwrap();
        let mut registry = Registry::with_prefix("thalamus");
        MediaCollector::register(engine.clone(), &mut registry);
        #[allow(clippy::disallowed_methods)] // a unit test: the core takes any instant
        let t0 = std::time::Instant::now();
        let mut core = RelayCore::new(
            RelaySettings::new(7, thalamus_proto::media::StreamId::AUDIO),
            t0,
        );
        let sdp = "v=0\r\no=p 1 1 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n\
                   m=audio 5004 RTP/SAVP 0\r\n";
        let remote = thalamus_sip::sdp::SessionDescription::parse(sdp)
            .unwrap()
            .remote_media(&thalamus_sip::sdp::MediaKind::Audio)
            .unwrap();
        let keys = SrtpKeys {
            suite: thalamus_sip::sdp::CryptoSuite::AesCm128HmacSha1_80,
            local: vec![1; 30],
            remote: vec![2; 30],
        };
        core.set_peer(
            RemotePeer::from_remote_media(&remote).with_srtp(Some(keys)),
            t0,
        );
        // A forged packet (no valid tag) from the peer's address.
        let mut forged = vec![0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9];
        forged.extend_from_slice(&[0u8; 40]);
        core.handle_rtp(&forged, "192.0.2.5:5004".parse().unwrap(), t0);
        engine.totals().add_finished(&core);
        let text = render(&registry);
        assert_eq!(
            sample(
                &text,
                "thalamus_media_srtp_refused_total{cause=\"authentication\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "thalamus_media_srtp_refused_total{cause=\"replay\"}"),
            0.0
        );
    }

    #[test]
    fn totals_count_started_live_and_ended() {
        let totals = EngineTotals::default();
        totals.task_started();
        totals.task_started();
        totals.task_ended();
        assert_eq!((totals.started(), totals.live()), (2, 1));
        assert_eq!(totals.finished().relays, 0);
    }

    #[tokio::test]
    async fn collector_renders_ports_relays_and_latency() {
        let engine = MediaEngine::new(MediaConfig {
            address: [127, 0, 0, 1].into(),
            rtp_port_min: 31_000,
            rtp_port_max: 31_999,
            ..MediaConfig::default()
        })
        .unwrap();
        let mut registry = Registry::with_prefix("thalamus");
        MediaCollector::register(engine.clone(), &mut registry);
        let text = render(&registry);
        assert_eq!(sample(&text, "thalamus_media_ports_in_use"), 0.0);
        assert_eq!(sample(&text, "thalamus_media_relays_live"), 0.0);

        // A device link that collects datagrams, and a peer that echoes RTP.
        struct Collect(tokio::sync::mpsc::UnboundedSender<bytes::Bytes>);
        impl crate::DatagramSink for Collect {
            fn send_datagram(&self, datagram: bytes::Bytes) -> Result<(), crate::DatagramError> {
                let _ = self.0.send(datagram);
                Ok(())
            }
        }
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer_port = peer.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = peer.recv_from(&mut buf).await {
                let _ = peer.send_to(&buf[..n], from).await;
            }
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let relay = engine
            .start(crate::RelaySpec::audio(7), std::sync::Arc::new(Collect(tx)))
            .unwrap();
        let sdp = format!(
            "v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {peer_port} RTP/AVP 0\r\na=sendrecv\r\n"
        );
        let remote = thalamus_sip::sdp::SessionDescription::parse(&sdp)
            .unwrap()
            .remote_media(&thalamus_sip::sdp::MediaKind::Audio)
            .unwrap();
        relay.set_remote_media(&remote).await.unwrap();
        let text = render(&registry);
        assert_eq!(sample(&text, "thalamus_media_ports_in_use"), 1.0);
        assert_eq!(sample(&text, "thalamus_media_relays_live"), 1.0);
        assert_eq!(sample(&text, "thalamus_media_relays_started_total"), 1.0);
        let input = relay.device_input();
        for seq in 0..5u16 {
            let datagram = thalamus_proto::media::MediaHeader {
                marker: seq == 0,
                payload_type: 0,
                sequence: seq,
                timestamp: u32::from(seq) * 160,
                call_ref: 7,
                stream_id: thalamus_proto::media::StreamId::AUDIO,
            }
            .to_bytes(&[0xd5; 160])
            .unwrap();
            input.feed(datagram).unwrap();
            let echoed = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(echoed.len(), 13 + 160);
        }
        relay.stop().await.unwrap();
        let text = render(&registry);
        assert_eq!(sample(&text, "thalamus_media_ports_in_use"), 0.0);
        assert_eq!(sample(&text, "thalamus_media_relays_live"), 0.0);
        assert_eq!(sample(&text, "thalamus_media_relays_finished_total"), 1.0);
        for direction in ["to_peer", "to_device"] {
            assert_eq!(
                sample(
                    &text,
                    &format!("thalamus_media_relayed_packets_total{{direction=\"{direction}\"}}")
                ),
                5.0
            );
            let max = sample(
                &text,
                &format!(
                    "thalamus_media_relay_latency_seconds{{direction=\"{direction}\",quantile=\"1\"}}"
                ),
            );
            let p50 = sample(
                &text,
                &format!(
                    "thalamus_media_relay_latency_seconds{{direction=\"{direction}\",quantile=\"0.5\"}}"
                ),
            );
            assert!(max > 0.0 && p50 <= max, "{text}");
        }
    }
}
