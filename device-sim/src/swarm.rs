//! `thalamus-sim swarm`: many devices at once, each its own QUIC connection and credential,
//! logged in at a bounded concurrency and then held idle. Measures handshake (QUIC + Hello to
//! Welcome) rate and latency; the benchmark script reads the gateway's memory meanwhile.
//! Devices are `<prefix><n>` for n in 0..count, all with the same secret (as provisioned for
//! load runs by `thalamus device add-bulk`). Each device is a client of the device SDK
//! (`thalamus_device::Client`, many sharing a few QUIC endpoints): it answers the gateway's
//! keepalives and keeps its session as any device would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thalamus_device::session::{Event, SessionConfig};
use thalamus_device::{Client, ClientConfig, ClientEvents};
use tokio::sync::Semaphore;

/// Swarm settings.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// Gateway QUIC address.
    pub gateway: SocketAddr,
    /// TLS server name.
    pub server_name: String,
    /// Pinned fingerprint.
    pub fingerprint: Option<[u8; 32]>,
    /// Device id prefix.
    pub prefix: String,
    /// First device number.
    pub first: u32,
    /// Number of devices.
    pub count: u32,
    /// Shared secret.
    pub secret: String,
    /// Logins in flight at once.
    pub concurrency: usize,
    /// How long to hold the sessions once all are up.
    pub hold: Duration,
    /// QUIC endpoints (UDP sockets) to spread the connections over.
    pub endpoints: usize,
}

/// What a swarm run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    /// Devices attempted.
    pub attempted: u32,
    /// Devices that got `Welcome`.
    pub connected: u32,
    /// Devices that failed, with the first error seen.
    pub failed: u32,
    /// First failure message.
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last `Welcome`.
    pub ramp_secs: f64,
    /// Welcomes per second over the ramp.
    pub handshakes_per_sec: f64,
    /// Handshake latency percentiles (milliseconds).
    pub latency_ms_p50: f64,
    /// 99th percentile.
    pub latency_ms_p99: f64,
    /// Maximum.
    pub latency_ms_max: f64,
    /// Sessions still up at the end of the hold.
    pub alive_after_hold: u32,
}

/// Longest one device's login (QUIC handshake, Hello, Welcome) may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(0.0)
}

/// Runs the swarm; `on_ready` is called once every device has logged in (or failed).
pub async fn run(
    opts: SwarmOptions,
    on_ready: impl FnOnce(&SwarmReport),
) -> anyhow::Result<SwarmReport> {
    let config = crate::quic::client_config(opts.fingerprint)?;
    let endpoints: Vec<quinn::Endpoint> = (0..opts.endpoints.max(1))
        .map(|_| crate::quic::client_endpoint(opts.gateway, config.clone()))
        .collect::<Result<_, _>>()?;
    let gate = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(opts.count as usize);
    for i in 0..opts.count {
        let endpoint = endpoints[i as usize % endpoints.len()].clone();
        let gate = gate.clone();
        let opts = opts.clone();
        let quic = config.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let t0 = Instant::now();
            let mut session = SessionConfig::new(
                format!("{}{}", opts.prefix, opts.first.saturating_add(i)),
                opts.secret.clone(),
                vec![opts.gateway.to_string()],
            );
            session.login_timeout = LOGIN_TIMEOUT;
            let mut client_config = ClientConfig::new(session, quic, &opts.server_name);
            client_config.endpoint = Some(endpoint);
            client_config.seed = u64::from(i);
            client_config.event_buffer = 16;
            client_config.datagram_buffer = 1;
            let (client, mut events) = Client::start(client_config)?;
            // The first attempt's outcome: live, or why not.
            let outcome = tokio::time::timeout(LOGIN_TIMEOUT, async {
                while let Some(event) = events.events.recv().await {
                    match event {
                        Event::Live(_) => return Ok(()),
                        Event::Disconnected { reason, .. } => anyhow::bail!("{reason}"),
                        _ => {}
                    }
                }
                anyhow::bail!("the client stopped")
            })
            .await;
            match outcome {
                Ok(Ok(())) => anyhow::Ok((client, events, t0.elapsed(), Instant::now())),
                Ok(Err(e)) => {
                    client.close().await;
                    Err(e)
                }
                Err(_) => {
                    client.close().await;
                    anyhow::bail!("no Welcome within {LOGIN_TIMEOUT:?}")
                }
            }
        }));
    }
    let mut devices: Vec<(Client, ClientEvents)> = Vec::new();
    let mut latencies = Vec::new();
    let mut failed = 0u32;
    let mut first_error = None;
    let mut last = start;
    for task in tasks {
        match task.await {
            Ok(Ok((client, events, latency, at))) => {
                latencies.push(latency.as_secs_f64() * 1000.0);
                last = last.max(at);
                devices.push((client, events));
            }
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let ramp = last.duration_since(start).as_secs_f64();
    let mut report = SwarmReport {
        attempted: opts.count,
        connected: devices.len() as u32,
        failed,
        first_error,
        ramp_secs: ramp,
        handshakes_per_sec: if ramp > 0.0 {
            devices.len() as f64 / ramp
        } else {
            0.0
        },
        latency_ms_p50: percentile(&latencies, 0.5),
        latency_ms_p99: percentile(&latencies, 0.99),
        latency_ms_max: latencies.last().copied().unwrap_or(0.0),
        alive_after_hold: 0,
    };
    on_ready(&report);
    tokio::time::sleep(opts.hold).await;
    // A device is still up when its session never left (no disconnection among its events).
    let mut alive = 0u32;
    for (_, events) in &mut devices {
        let mut up = true;
        while let Ok(e) = events.events.try_recv() {
            up &= !matches!(e, Event::Disconnected { .. } | Event::Closed(_));
        }
        alive += u32::from(up);
    }
    report.alive_after_hold = alive;
    let closing: Vec<_> = devices
        .into_iter()
        .map(|(client, _)| tokio::spawn(client.close()))
        .collect();
    for close in closing {
        let _ = close.await;
    }
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(5), e.wait_idle()).await;
    }
    Ok(report)
}
