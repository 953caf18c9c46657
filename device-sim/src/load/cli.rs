//! The `provision` and `load` commands' arguments and their runs: parse, run, print the report
//! (text on stdout; `--json FILE` and `--plot FILE.svg` on request). The work itself is in
//! [`crate::provision`] and [`crate::load`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::report::LoadReport;
use super::LoadOptions;
use crate::provision::{self, ProvisionRequest};

/// `thalamus-sim provision`: create test devices that share one secret.
#[derive(clap::Args, Debug, Clone)]
pub struct ProvisionArgs {
    /// Number of devices.
    #[arg(long)]
    pub devices: u32,
    /// Device id prefix.
    #[arg(long, default_value = "load-")]
    pub prefix: String,
    /// First device number.
    #[arg(long, default_value_t = 0)]
    pub first: u32,
    /// The registry file to write (the gateway's `devices.toml`).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    pub registry: Option<PathBuf>,
    /// A gateway config file: runs `thalamus --config FILE device add-bulk` instead.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The gateway binary for `--config` (default: `thalamus` next to this one, else PATH).
    #[arg(long)]
    pub thalamus: Option<PathBuf>,
    /// The shared secret (generated when absent).
    #[arg(long, env = "THALAMUS_SIM_SECRET")]
    pub secret: Option<String>,
}

/// Runs `provision`: prints the shared secret on stdout.
pub fn provision(args: ProvisionArgs) -> anyhow::Result<()> {
    let request = ProvisionRequest {
        prefix: args.prefix.clone(),
        first: args.first,
        count: args.devices,
        secret: args.secret.unwrap_or_else(provision::generate_secret),
    };
    let started = std::time::Instant::now();
    let (added, place) = match (&args.registry, &args.config) {
        (Some(path), _) => (
            provision::provision_registry(path, &request)?,
            path.display().to_string(),
        ),
        (None, Some(config)) => {
            let gateway = args
                .thalamus
                .clone()
                .unwrap_or_else(provision::default_gateway_binary);
            (
                provision::provision_with_gateway(&gateway, config, &request)?,
                format!("the registry of {}", config.display()),
            )
        }
        (None, None) => anyhow::bail!("give --registry FILE or --config FILE"),
    };
    eprintln!(
        "provisioned {added} devices {}{}..{}{} in {place} ({:.2} s)",
        args.prefix,
        args.first,
        args.prefix,
        args.first.saturating_add(args.devices.saturating_sub(1)),
        started.elapsed().as_secs_f64()
    );
    println!("{}", request.secret);
    Ok(())
}

/// `thalamus-sim load`: many devices placing (or answering) calls at a rate.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Gateway QUIC address (host:port); for a cluster, several entry points (repeat the
    /// option or separate them with commas). Device n logs in at entry point n mod their
    /// number and follows the node's redirect to its owner.
    #[arg(long, default_value = "127.0.0.1:4433", value_delimiter = ',')]
    pub gateway: Vec<String>,
    /// SHA-256 fingerprint of the gateway certificate; for a cluster whose nodes have their own
    /// certificates, one per node (repeat or separate with commas): any of them is accepted.
    #[arg(long, value_delimiter = ',')]
    pub fingerprint: Vec<String>,
    /// Seconds a device that lost its node keeps trying to log in again (at the other entry
    /// points, resuming its session with its resume token so its calls go on); 0: it gives up
    /// at once and its calls fail.
    #[arg(long, default_value_t = 30.0)]
    pub reconnect_secs: f64,
    /// The devices' QUIC idle timeout in milliseconds: how soon a device notices that its
    /// node is gone (keepalives every third of it; the lower of the device's and the gateway's
    /// applies). 0: the gateway's.
    #[arg(long, default_value_t = 0)]
    pub idle_timeout_ms: u64,
    /// Device id prefix (devices are `<prefix>0` .. `<prefix>N-1`, from `provision`).
    #[arg(long, default_value = "load-")]
    pub prefix: String,
    /// First device number.
    #[arg(long, default_value_t = 0)]
    pub first: u32,
    /// Number of devices, each its own QUIC connection.
    #[arg(long, default_value_t = 10)]
    pub devices: u32,
    /// The secret the devices share.
    #[arg(long, env = "THALAMUS_SIM_SECRET")]
    pub secret: String,
    /// Calls started per second, spread over the devices (0: devices stay idle).
    #[arg(long, default_value_t = 10.0)]
    pub cps: f64,
    /// Seconds of calling (incoming mode: the longest the run lasts).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Milliseconds answered before the device hangs up (0: the other side hangs up).
    /// Default 1000 for outgoing calls, 0 with --incoming.
    #[arg(long)]
    pub hold_ms: Option<u64>,
    /// SIP URI (or address book alias) the devices call and text.
    #[arg(long, default_value = "")]
    pub target: String,
    /// Stream 20 ms audio frames on answered calls and count what comes back (use an
    /// echoing peer such as `thalamus-sim buddy --echo`).
    #[arg(long)]
    pub media: bool,
    /// Text messages per second to the target over the calling window.
    #[arg(long, default_value_t = 0.0)]
    pub texts_per_s: f64,
    /// The devices answer calls (from a SIP load generator) instead of placing them.
    #[arg(long)]
    pub incoming: bool,
    /// With --incoming: stop once this many calls have finished.
    #[arg(long, default_value_t = 0)]
    pub expect_calls: u64,
    /// Seconds before an unanswered call is given up.
    #[arg(long, default_value_t = 30)]
    pub call_timeout_secs: u64,
    /// Seconds the devices sit idle between the last login and the first call.
    #[arg(long, default_value_t = 0.0)]
    pub idle_secs: f64,
    /// Most calls per device (at most the gateway's limit from Welcome).
    #[arg(long)]
    pub max_calls_per_device: Option<u32>,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 64)]
    pub login_concurrency: usize,
    /// UDP sockets to spread the connections over.
    #[arg(long, default_value_t = 4)]
    pub endpoints: usize,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw latency and calls per second over time here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Rewrite this file every second with the phase and counts (for scripts).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Most entry points one run may be given.
const MAX_ENTRY_POINTS: usize = 64;

/// Resolves a gateway `host:port` to an address and the TLS server name to present: the host
/// itself, or `localhost` for an IP address (the gateway's self-signed certificate names it).
pub fn resolve_gateway(gateway: &str) -> anyhow::Result<(SocketAddr, String)> {
    let addr = gateway
        .to_socket_addrs()
        .with_context(|| format!("resolving {gateway}"))?
        .next()
        .with_context(|| format!("{gateway} resolves to no address"))?;
    let host = gateway
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or("localhost");
    let name = if host.parse::<std::net::IpAddr>().is_ok() {
        "localhost".to_string()
    } else {
        host.to_string()
    };
    Ok((addr, name))
}

fn seconds(value: f64, name: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| *d <= Duration::from_secs(24 * 3600))
        .with_context(|| format!("--{name} must be 0 to 86400 seconds"))
}

impl LoadArgs {
    /// The run's settings.
    pub fn options(&self) -> anyhow::Result<LoadOptions> {
        let mut gateways = Vec::with_capacity(self.gateway.len());
        let mut server_name = String::new();
        for g in &self.gateway {
            let (addr, name) = resolve_gateway(g)?;
            if server_name.is_empty() {
                server_name = name;
            }
            gateways.push(addr);
        }
        if gateways.is_empty() || gateways.len() > MAX_ENTRY_POINTS {
            anyhow::bail!("--gateway takes 1 to {MAX_ENTRY_POINTS} addresses");
        }
        let fingerprints = self
            .fingerprint
            .iter()
            .map(|f| crate::quic::parse_fingerprint(f))
            .collect::<Result<Vec<_>, _>>()?;
        if !self.incoming && (self.cps > 0.0 || self.texts_per_s > 0.0) && self.target.is_empty() {
            anyhow::bail!("--target is required to place calls or send texts");
        }
        let hold_default = if self.incoming { 0 } else { 1000 };
        Ok(LoadOptions {
            gateways,
            server_name,
            fingerprints,
            reconnect: seconds(self.reconnect_secs, "reconnect-secs")?,
            idle_timeout: (self.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(self.idle_timeout_ms.clamp(100, 600_000))),
            prefix: self.prefix.clone(),
            first: self.first,
            devices: self.devices,
            secret: self.secret.clone(),
            login_concurrency: self.login_concurrency,
            endpoints: self.endpoints,
            cps: self.cps,
            duration: seconds(self.duration, "duration")?,
            hold: Duration::from_millis(self.hold_ms.unwrap_or(hold_default)),
            target: self.target.clone(),
            media: self.media,
            texts_per_sec: self.texts_per_s,
            incoming: self.incoming,
            expect_calls: self.expect_calls,
            call_timeout: Duration::from_secs(self.call_timeout_secs.clamp(1, 3600)),
            idle_before: seconds(self.idle_secs, "idle-secs")?,
            max_calls_per_device: self.max_calls_per_device,
            status_file: self.status_file.clone(),
            progress: !self.quiet,
        })
    }
}

/// The report as text, for people.
pub fn summary(r: &LoadReport) -> String {
    let mut s = String::new();
    let l = &r.setup_latency;
    s.push_str(&format!(
        "mode {}: {} of {} devices logged in ({} failed) in {:.1} s\n",
        r.mode, r.devices_connected, r.devices, r.login_failures, r.login_secs
    ));
    s.push_str(&format!(
        "calls: attempted {} answered {} failed {} (not placed, devices busy: {}); {:.1} calls/s of {} asked; peak {} in progress\n",
        r.attempted, r.answered, r.failed, r.not_placed_devices_busy, r.achieved_cps, r.target_cps, r.peak_calls_in_progress
    ));
    s.push_str(&format!(
        "setup latency ms: p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} (mean {:.3}, {} samples)\n",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p99_9_ms, l.max_ms, l.mean_ms, l.count
    ));
    for (reason, n) in &r.failures {
        s.push_str(&format!("failed: {reason}: {n}\n"));
    }
    for (reason, n) in &r.answered_ended {
        s.push_str(&format!("answered, ended by {reason}: {n}\n"));
    }
    if let Some(m) = &r.media {
        s.push_str(&format!(
            "media: {} frames sent, {} back, {:.2}% lost\n",
            m.frames_sent, m.frames_received, m.loss_percent
        ));
    }
    if r.nodes.len() > 1 || r.reconnects.reconnects > 0 {
        for (node, n) in &r.nodes {
            s.push_str(&format!(
                "node {node}: devices {} at start, {} at end; answered {}, failed {}; devices that came after losing a node {}\n",
                n.devices_at_start, n.devices_at_end, n.answered, n.failed, n.reconnects_in
            ));
        }
        let rc = &r.reconnects;
        s.push_str(&format!(
            "reconnects: {} ({} resumed, {} gave up); calls kept {}, lost with their node {}; time ms p50 {:.1} max {:.1}\n",
            rc.reconnects, rc.resumed, rc.gave_up, rc.calls_kept, rc.calls_lost, rc.time.p50_ms, rc.time.max_ms
        ));
    }
    if let Some(t) = &r.texts {
        s.push_str(&format!(
            "texts: {} sent, {} delivered, {} failed; latency ms p50 {:.3} p99 {:.3}\n",
            t.attempted, t.delivered, t.failed, t.latency.p50_ms, t.latency.p99_ms
        ));
    }
    s
}

/// Runs `load`; returns whether every device logged in and no call failed.
pub async fn load(args: LoadArgs) -> anyhow::Result<bool> {
    let opts = args.options()?;
    let report = super::run(opts).await?;
    print!("{}", summary(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        super::plot::write_svg(&report, path)?;
    }
    let texts_ok = report.texts.as_ref().is_none_or(|t| t.failed == 0);
    Ok(report.failed == 0 && report.login_failures == 0 && texts_ok)
}
