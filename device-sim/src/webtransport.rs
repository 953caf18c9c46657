//! `wt-load`: devices over WebTransport, the way browsers reach a node (issue 20), in numbers.
//! Each device opens its own WebTransport session (HTTP/3 over its own QUIC connection) to
//! `https://<gateway>/mbfp`, pinning the node's WebTransport certificate by its hash, logs in
//! with `Hello` as a QUIC device does, answers the gateway's pings and pings it back, and
//! stays until the run ends. Devices are `<prefix><n>` with the secret `provision` printed.
//! With `--target` each device also calls it once its session is live, streams 20 ms audio
//! frames (PCMU, `--hold-ms`) and counts the frames that come back.
//!
//! It prints one `wt_load` summary (devices connected and failed, calls answered, frames sent
//! and received) and writes `--status-file` (`{"phase": "connected", "connected": n}` once every
//! device has logged in or failed, `"done"` at the end) for the benchmark scripts.
//!
//! What it does not do: no resume, no reconnect, no texts, no incoming calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde_json::json;
use thalamus_proto::media::{MediaHeader, StreamId};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    AudioCodec, CallState, Capabilities, Dial, Envelope, Hangup, Hello, MediaOffer, Ping,
};
use thalamus_proto::{encode_frame, FrameDecoder};

use crate::events::EventPrinter;

/// How a device starts: when it dials after its login, and its turn to log in (given back once
/// it is in).
struct Start {
    dial_after: Duration,
    login: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Most devices logging in at once.
const MAX_LOGINS_AT_ONCE: usize = 64;

/// Settings of `wt-load`.
#[derive(Debug, Clone)]
pub struct WtLoadOptions {
    /// The node's QUIC address (WebTransport comes in on it).
    pub gateway: SocketAddr,
    /// SHA-256 (hex) of the node's WebTransport certificate.
    pub certificate_hash: String,
    /// The devices' shared secret (`provision`).
    pub secret: String,
    /// Device id prefix.
    pub prefix: String,
    /// How many devices.
    pub devices: u32,
    /// How long the run lasts once every device is in.
    pub duration: Duration,
    /// Where to write the run's phase.
    pub status_file: Option<PathBuf>,
    /// Call this once live (each device), with audio.
    pub target: Option<String>,
    /// How long each call streams before hanging up.
    pub hold: Duration,
    /// Calls per second over all devices: device `n` dials `n / cps` seconds after its
    /// login (0: all at once).
    pub cps: f64,
}

#[derive(Debug, Default)]
struct Counts {
    connected: AtomicU64,
    failed: AtomicU64,
    answered: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
}

/// Runs the devices; `true` when every one logged in (and every call, if any, was answered).
pub async fn wt_load(opts: WtLoadOptions, printer: EventPrinter) -> anyhow::Result<bool> {
    let hash = hex::decode(&opts.certificate_hash)?;
    let client =
        web_transport_quinn::ClientBuilder::new().with_server_certificate_hashes(vec![hash])?;
    let url: url::Url = format!("https://{}/mbfp", opts.gateway).parse()?;
    let counts = Arc::new(Counts::default());
    let stop = stop_signal();
    // At most this many logins at once: the node checks each secret with argon2, one source
    // address's checks in turn, and a login that waits past its hello timeout fails.
    let logins = Arc::new(tokio::sync::Semaphore::new(MAX_LOGINS_AT_ONCE));
    let mut tasks = Vec::with_capacity(opts.devices as usize);
    for n in 0..opts.devices {
        let (client, url, counts, opts, stop, logins) = (
            client.clone(),
            url.clone(),
            counts.clone(),
            opts.clone(),
            stop.clone(),
            logins.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let device = format!("{}{n}", opts.prefix);
            let dial_after = if opts.cps > 0.0 {
                Duration::from_secs_f64(f64::from(n) / opts.cps)
            } else {
                Duration::ZERO
            };
            let start = Start {
                dial_after,
                login: logins.acquire_owned().await.ok(),
            };
            let run = one_device(&client, url, &device, &opts, &counts, stop, start);
            if let Err(e) = run.await {
                tracing::debug!(device, error = %e, "WebTransport device failed");
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }));
        // Spread the handshakes a little (the node checks each secret with argon2).
        if n % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let all_in = async {
        loop {
            let done =
                counts.connected.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed);
            if done >= u64::from(opts.devices) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(300), all_in).await;
    write_status(&opts, "connected", &counts);
    tokio::time::sleep(opts.duration).await;
    stop.send_replace(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    write_status(&opts, "done", &counts);
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    printer.emit(
        "wt_load",
        json!({
            "devices": opts.devices,
            "connected": load(&counts.connected),
            "failed": load(&counts.failed),
            "calls_answered": load(&counts.answered),
            "frames_sent": load(&counts.frames_sent),
            "frames_received": load(&counts.frames_received),
        }),
    );
    let calls_ok = opts.target.is_none() || load(&counts.answered) == u64::from(opts.devices);
    Ok(load(&counts.connected) == u64::from(opts.devices) && calls_ok)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A stop signal every device watches.
fn stop_signal() -> Arc<tokio::sync::watch::Sender<bool>> {
    Arc::new(tokio::sync::watch::channel(false).0)
}

fn write_status(opts: &WtLoadOptions, phase: &str, counts: &Counts) {
    if let Some(path) = &opts.status_file {
        let status = json!({
            "phase": phase,
            "connected": counts.connected.load(Ordering::Relaxed),
            "failed": counts.failed.load(Ordering::Relaxed),
            "answered": counts.answered.load(Ordering::Relaxed),
        });
        let _ = std::fs::write(path, status.to_string());
    }
}

async fn one_device(
    client: &web_transport_quinn::Client,
    url: url::Url,
    device: &str,
    opts: &WtLoadOptions,
    counts: &Counts,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    start: Start,
) -> anyhow::Result<()> {
    let Start {
        dial_after,
        mut login,
    } = start;
    let mut stopped = stop.subscribe();
    let session = client.connect(url).await?;
    let (mut send, mut recv) = session.open_bi().await?;
    let mut request_id = 0u64;
    let mut frame = BytesMut::new();
    let mut write = |body: Body, frame: &mut BytesMut| -> anyhow::Result<()> {
        request_id += 1;
        frame.clear();
        encode_frame(
            &Envelope {
                request_id,
                body: Some(body),
            },
            64 * 1024,
            frame,
        )?;
        Ok(())
    };
    write(
        Body::Hello(Hello {
            device_id: device.to_string(),
            credential: opts.secret.clone(),
            capabilities: Some(Capabilities {
                audio_codecs: vec![AudioCodec::Pcmu as i32],
                ..Default::default()
            }),
            software_version: "thalamus-sim wt-load".into(),
            resume_token: Vec::new(),
        }),
        &mut frame,
    )?;
    send.write_all(&frame).await?;
    let decoder = FrameDecoder::new(64 * 1024);
    let mut buf = BytesMut::new();
    let mut keepalive = Duration::from_secs(5);
    let mut live = false;
    let mut call: Option<tokio::time::Instant> = None;
    let mut sequence = 0u16;
    // Audio every 20 ms while a call is up. Its ticks are not read between calls, so they
    // are not made up for (a burst of every tick missed since the login, once the call is
    // answered, is what this used to send), and it starts again at each answer.
    let mut frames = tokio::time::interval(Duration::from_millis(20));
    frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings = tokio::time::interval(keepalive);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    let mut dial_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => {
                let Some(chunk) = chunk? else { break };
                buf.extend_from_slice(&chunk.bytes);
                while let Some(env) = decoder.decode(&mut buf)? {
                    match env.body {
                        Some(Body::Welcome(w)) => {
                            live = true;
                            // Logged in: the next device may start its login.
                            drop(login.take());
                            counts.connected.fetch_add(1, Ordering::Relaxed);
                            keepalive = Duration::from_millis(u64::from(w.keepalive_interval_ms.max(1000)) / 2);
                            pings = tokio::time::interval(keepalive);
                            pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            dial_at = opts.target.as_ref().map(|_| tokio::time::Instant::now() + dial_after);
                        }
                        Some(Body::Error(e)) if !live => anyhow::bail!("refused: {}", e.message),
                        Some(Body::CallEvent(e)) if e.call_ref == 1 && e.state == CallState::Answered as i32 => {
                            counts.answered.fetch_add(1, Ordering::Relaxed);
                            call = Some(tokio::time::Instant::now());
                            frames.reset_immediately();
                        }
                        Some(Body::CallEvent(e)) if e.call_ref == 1 && e.state == CallState::Ended as i32 => {
                            call = None;
                        }
                        _ => {}
                    }
                }
            }
            () = sleep_until(dial_at) => {
                dial_at = None;
                if let Some(target) = &opts.target {
                                write(Body::Dial(Dial {
                                    call_ref: 1,
                                    target: target.clone(),
                                    media: Some(MediaOffer {
                                        audio_codecs: vec![AudioCodec::Pcmu as i32],
                                        ..Default::default()
                                    }),
                                    headers: Default::default(),
                                }), &mut frame)?;
                                send.write_all(&frame).await?;
                }
            }
            datagram = session.read_datagram() => {
                if datagram.is_ok_and(|d| MediaHeader::decode(&d).is_ok_and(|h| h.call_ref == 1)) {
                    counts.frames_received.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = frames.tick(), if call.is_some() => {
                if call.is_some_and(|at| at.elapsed() >= opts.hold) {
                    write(Body::Hangup(Hangup { call_ref: 1 }), &mut frame)?;
                    send.write_all(&frame).await?;
                    call = None;
                    continue;
                }
                let header = MediaHeader {
                    marker: sequence == 0,
                    payload_type: 0,
                    sequence,
                    timestamp: u32::from(sequence) * 160,
                    call_ref: 1,
                    stream_id: StreamId::AUDIO,
                };
                sequence = sequence.wrapping_add(1);
                if session.send_datagram(header.to_bytes(&[0xff; 160])?).is_ok() {
                    counts.frames_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = pings.tick(), if live => {
                nonce += 1;
                write(Body::Ping(Ping { nonce }), &mut frame)?;
                send.write_all(&frame).await?;
            }
            _ = stopped.changed() => break,
        }
    }
    session.close(0, b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), session.closed()).await;
    Ok(())
}
