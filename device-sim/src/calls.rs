//! Device-side call commands of the simulator: `call` (dial, optionally stream media and check
//! the echo, hold and resume, send DTMF, hang up), `listen` (answer or reject incoming calls)
//! and `text` (send one SIP MESSAGE through the gateway). Each logs in as one device, prints
//! every event (JSON lines with `--json`) and ends with a `summary` event.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Answer, AudioCodec, CallState, Dial, Envelope, Hangup, Hello, Hold, MediaOffer, Reject, Resume,
    SendText,
};

use crate::device::{DeviceConnection, FrameReader, FrameWriter};
use crate::events::EventPrinter;

/// How to reach the gateway as which device.
#[derive(Debug, Clone)]
pub struct Login {
    /// Gateway QUIC address.
    pub gateway: SocketAddr,
    /// TLS server name.
    pub server_name: String,
    /// Pinned fingerprint.
    pub fingerprint: Option<[u8; 32]>,
    /// Device id.
    pub device: String,
    /// Secret.
    pub secret: String,
}

/// A logged-in device.
pub struct Session {
    /// The QUIC endpoint (kept alive with the connection).
    pub endpoint: quinn::Endpoint,
    /// The connection (datagrams).
    pub conn: quinn::Connection,
    /// Control frames in.
    pub reader: FrameReader,
    /// Control frames out.
    pub writer: FrameWriter,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// Connects and logs in; prints the `welcome`.
pub async fn login(login: &Login, printer: EventPrinter) -> anyhow::Result<Session> {
    let config = crate::quic::client_config(login.fingerprint)?;
    let endpoint = crate::quic::client_endpoint(login.gateway, config)?;
    let mut conn = DeviceConnection::connect(&endpoint, login.gateway, &login.server_name).await?;
    let welcome = conn
        .hello(Hello {
            device_id: login.device.clone(),
            credential: login.secret.clone(),
            ..Default::default()
        })
        .await?;
    printer.frame(&Envelope {
        request_id: 0,
        body: Some(Body::Welcome(welcome)),
    });
    Ok(Session {
        endpoint,
        conn: conn.conn,
        reader: conn.reader,
        writer: conn.writer,
    })
}

fn device_media() -> MediaOffer {
    MediaOffer {
        audio_codecs: vec![
            AudioCodec::Pcmu as i32,
            AudioCodec::Pcma as i32,
            AudioCodec::TelephoneEvent as i32,
        ],
        ..Default::default()
    }
}

fn state_of(env: &Envelope) -> Option<(u32, CallState)> {
    match &env.body {
        Some(Body::CallEvent(e)) => Some((e.call_ref, CallState::try_from(e.state).ok()?)),
        _ => None,
    }
}

/// Settings of `call`.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Target URI or alias.
    pub target: String,
    /// Calls to place one after the other.
    pub calls: u32,
    /// Time answered before hanging up (0: wait for the other side to hang up).
    pub hold: Duration,
    /// Put the call on hold and resume it once while answered.
    pub hold_resume: bool,
    /// DTMF digits to send once answered.
    pub dtmf: String,
    /// Stream 20 ms frames while answered and count what comes back.
    pub media: bool,
    /// Give up on one call after this long.
    pub call_timeout: Duration,
}

struct MediaProbe {
    sent: u32,
    sent_at: HashMap<u16, Instant>,
    received: u32,
    in_order: u32,
    last_seq: Option<u16>,
    payload_ok: u32,
    rtt_us: Vec<u64>,
}

impl MediaProbe {
    fn new() -> Self {
        MediaProbe {
            sent: 0,
            sent_at: HashMap::new(),
            received: 0,
            in_order: 0,
            last_seq: None,
            payload_ok: 0,
            rtt_us: Vec::new(),
        }
    }

    fn frame(call_ref: u32, seq: u16) -> Bytes {
        // 20 ms of PCMU: 160 bytes, a pattern derived from the sequence so echoes are checked.
        let payload: Vec<u8> = (0..160u16)
            .map(|i| (seq.wrapping_add(i) & 0xff) as u8)
            .collect();
        MediaHeader {
            marker: seq == 0,
            payload_type: 0,
            sequence: seq,
            timestamp: u32::from(seq) * 160,
            call_ref,
            stream_id: StreamId::AUDIO,
        }
        .to_bytes(&payload)
        .unwrap_or_default()
    }

    fn on_echo(&mut self, datagram: Bytes) {
        let Ok(d) = MediaDatagram::decode(datagram) else {
            return;
        };
        self.received += 1;
        // The gateway renumbers RTP toward the device, so match echoes by payload pattern.
        let seq = d.payload.first().map(|b| u16::from(*b));
        let pattern_ok = d
            .payload
            .iter()
            .enumerate()
            .all(|(i, b)| *b == d.payload[0].wrapping_add(i as u8));
        if pattern_ok && d.payload.len() == 160 {
            self.payload_ok += 1;
        }
        if let Some(last) = self.last_seq {
            if d.header.sequence == last.wrapping_add(1) {
                self.in_order += 1;
            }
        } else {
            self.in_order += 1;
        }
        self.last_seq = Some(d.header.sequence);
        if let Some(low) = seq {
            // Find the most recent sent frame whose low byte matches.
            if let Some(at) = self
                .sent_at
                .iter()
                .filter(|(s, _)| (**s & 0xff) == low)
                .map(|(_, at)| *at)
                .max()
            {
                self.rtt_us.push(at.elapsed().as_micros() as u64);
            }
        }
    }

    fn report(&mut self) -> serde_json::Value {
        self.rtt_us.sort_unstable();
        let pct = |p: f64| -> u64 {
            if self.rtt_us.is_empty() {
                return 0;
            }
            let i = ((self.rtt_us.len() - 1) as f64 * p).round() as usize;
            self.rtt_us.get(i).copied().unwrap_or(0)
        };
        json!({
            "frames_sent": self.sent,
            "frames_received": self.received,
            "frames_in_order": self.in_order,
            "payload_matches": self.payload_ok,
            "loss_percent": if self.sent == 0 { 0.0 } else { 100.0 * (1.0 - f64::from(self.received.min(self.sent)) / f64::from(self.sent)) },
            "rtt_us_p50": pct(0.5),
            "rtt_us_p99": pct(0.99),
        })
    }
}

/// Places the calls; returns (answered and ended cleanly, failed).
pub async fn call(
    login_opts: &Login,
    opts: &CallOptions,
    printer: EventPrinter,
) -> anyhow::Result<(u32, u32)> {
    let mut s = login(login_opts, printer).await?;
    let (mut ok, mut failed) = (0u32, 0u32);
    for n in 0..opts.calls {
        let call_ref = n + 1;
        match tokio::time::timeout(opts.call_timeout, one_call(&mut s, call_ref, opts, printer))
            .await
        {
            Ok(Ok(true)) => ok += 1,
            Ok(Ok(false)) => failed += 1,
            Ok(Err(e)) => {
                printer.emit(
                    "error",
                    json!({"message": e.to_string(), "call_ref": call_ref}),
                );
                failed += 1;
                break;
            }
            Err(_) => {
                printer.emit(
                    "error",
                    json!({"message": "call timed out", "call_ref": call_ref}),
                );
                failed += 1;
            }
        }
    }
    printer.emit(
        "summary",
        json!({"calls": opts.calls, "succeeded": ok, "failed": failed}),
    );
    s.conn.close(0u32.into(), b"done");
    s.endpoint.wait_idle().await;
    Ok((ok, failed))
}

async fn one_call(
    s: &mut Session,
    call_ref: u32,
    opts: &CallOptions,
    printer: EventPrinter,
) -> anyhow::Result<bool> {
    s.writer
        .send(Body::Dial(Dial {
            call_ref,
            target: opts.target.clone(),
            media: Some(device_media()),
            headers: Default::default(),
        }))
        .await?;
    let mut answered_at: Option<Instant> = None;
    let mut probe = MediaProbe::new();
    let mut media_tick = tokio::time::interval(Duration::from_millis(20));
    let mut did_hold = false;
    let mut hung_up = false;
    loop {
        let hangup_due =
            answered_at.is_some_and(|at| !opts.hold.is_zero() && at.elapsed() >= opts.hold);
        if hangup_due && !hung_up {
            hung_up = true;
            s.writer.send(Body::Hangup(Hangup { call_ref })).await?;
        }
        tokio::select! {
            frame = s.reader.next() => {
                let env = frame?;
                match &env.body {
                    Some(Body::Ping(_)) => continue,
                    Some(Body::CallEvent(e)) if e.call_ref == call_ref && e.stats.is_some() && e.reason == "media statistics" => {
                        printer.frame(&env);
                        continue;
                    }
                    _ => {}
                }
                printer.frame(&env);
                match state_of(&env) {
                    Some((r, CallState::Answered)) if r == call_ref => {
                        answered_at = Some(Instant::now());
                        for digit in opts.dtmf.chars() {
                            s.writer.send(Body::Dtmf(thalamus_proto::v1::Dtmf {
                                call_ref,
                                digit: digit.to_string(),
                                duration_ms: 100,
                            })).await?;
                        }
                        if opts.hold_resume && !did_hold {
                            did_hold = true;
                            s.writer.send(Body::Hold(Hold { call_ref })).await?;
                        }
                    }
                    Some((r, CallState::Held)) if r == call_ref && opts.hold_resume => {
                        s.writer.send(Body::Resume(Resume { call_ref })).await?;
                    }
                    Some((r, CallState::Ended)) if r == call_ref => {
                        if opts.media {
                            // Let the last echoes arrive.
                            let until = Instant::now() + Duration::from_millis(200);
                            while let Ok(Ok(d)) = tokio::time::timeout(until.saturating_duration_since(Instant::now()), s.conn.read_datagram()).await {
                                probe.on_echo(d);
                            }
                            printer.emit("media_report", probe.report());
                        }
                        return Ok(answered_at.is_some());
                    }
                    _ => {}
                }
            }
            _ = media_tick.tick(), if opts.media && answered_at.is_some() && !hung_up => {
                let seq = probe.sent as u16;
                probe.sent_at.retain(|k, _| k.wrapping_sub(seq) > 0xfe00 || *k == seq);
                probe.sent_at.insert(seq, Instant::now());
                probe.sent += 1;
                let _ = s.conn.send_datagram(MediaProbe::frame(call_ref, seq));
            }
            _ = sleep_until(answered_at.map(|at| at + opts.hold)), if !opts.hold.is_zero() && !hung_up => {}
            datagram = s.conn.read_datagram(), if opts.media => {
                if let Ok(d) = datagram {
                    probe.on_echo(d);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Settings of `listen`.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Reject with this status instead of answering.
    pub reject: Option<u32>,
    /// Ring this long before answering.
    pub answer_after: Duration,
    /// Hang up this long after answering (0: wait for the caller).
    pub hangup_after: Duration,
    /// Stop after this many calls ended (0: run until stopped).
    pub calls: u32,
    /// Do not answer at all (the gateway's no-answer timeout applies).
    pub ignore: bool,
}

/// Answers incoming calls until `calls` have ended.
pub async fn listen(
    login_opts: &Login,
    opts: &ListenOptions,
    printer: EventPrinter,
) -> anyhow::Result<(u32, u32)> {
    let mut s = login(login_opts, printer).await?;
    let (mut answered, mut ended) = (0u32, 0u32);
    let mut pending: Vec<(Instant, Envelope)> = Vec::new();
    let mut hangups: Vec<(Instant, u32)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tokio::select! {
            frame = s.reader.next() => {
                let env = frame?;
                if let Some(Body::Ping(_)) = env.body {
                    continue;
                }
                printer.frame(&env);
                match &env.body {
                    Some(Body::IncomingCall(c)) => {
                        let call_ref = c.call_ref;
                        if opts.ignore {
                            continue;
                        }
                        let reply = match opts.reject {
                            Some(code) => Envelope { request_id: 0, body: Some(Body::Reject(Reject { call_ref, sip_status: code, reason: String::new() })) },
                            None => Envelope { request_id: 0, body: Some(Body::Answer(Answer { call_ref, media: Some(device_media()) })) },
                        };
                        pending.push((Instant::now() + opts.answer_after, reply));
                    }
                    Some(Body::CallEvent(e)) if e.state == CallState::Answered as i32 => {
                        answered += 1;
                        if !opts.hangup_after.is_zero() {
                            hangups.push((Instant::now() + opts.hangup_after, e.call_ref));
                        }
                    }
                    Some(Body::CallEvent(e)) if e.state == CallState::Ended as i32 && e.reason != "media statistics" => {
                        ended += 1;
                        if opts.calls > 0 && ended >= opts.calls {
                            printer.emit("summary", json!({"answered": answered, "ended": ended}));
                            s.conn.close(0u32.into(), b"done");
                            s.endpoint.wait_idle().await;
                            return Ok((answered, ended));
                        }
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let due: Vec<Envelope> = pending.iter().filter(|(at, _)| *at <= now).map(|(_, e)| e.clone()).collect();
                pending.retain(|(at, _)| *at > now);
                for env in due {
                    s.writer.send_envelope(&env).await?;
                }
                let due: Vec<u32> = hangups.iter().filter(|(at, _)| *at <= now).map(|(_, r)| *r).collect();
                hangups.retain(|(at, _)| *at > now);
                for call_ref in due {
                    s.writer.send(Body::Hangup(Hangup { call_ref })).await?;
                }
            }
        }
    }
}

/// Sends one text; returns the final SIP status.
pub async fn text(
    login_opts: &Login,
    to: &str,
    body: &str,
    printer: EventPrinter,
) -> anyhow::Result<u32> {
    let mut s = login(login_opts, printer).await?;
    let id = s
        .writer
        .send(Body::SendText(SendText {
            to: to.into(),
            content_type: "text/plain".into(),
            body: body.as_bytes().to_vec(),
        }))
        .await?;
    loop {
        let env = s.reader.next().await?;
        match &env.body {
            Some(Body::TextStatus(t)) if env.request_id == id => {
                printer.frame(&env);
                s.conn.close(0u32.into(), b"done");
                s.endpoint.wait_idle().await;
                return Ok(t.sip_status);
            }
            Some(Body::Error(_)) if env.request_id == id => {
                printer.frame(&env);
                anyhow::bail!("the gateway refused the text");
            }
            Some(Body::Ping(_)) => {}
            _ => printer.frame(&env),
        }
    }
}
