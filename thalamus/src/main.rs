//! `thalamus`: the one binary of a deployment. `thalamus run` runs a gateway node
//! (`thalamus-gateway`), `thalamus balancer` the SIP load balancer (`thalamus-balancer`),
//! `thalamus device ...` manages the device registry, `thalamus config` prints the effective
//! configuration and `thalamus check` checks it and the environment. It parses the command
//! line, sets up logging, starts the runtime and handles signals: for a node, SIGTERM (or
//! SIGINT) drains it (`[node] drain_deadline_secs`; a second one stops it at once) and exits 0,
//! SIGHUP reloads the configuration; the balancer stops on SIGTERM. Everything else is in the
//! crates it wires.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thalamus_gateway::config::{Config, ProcessConfigSource};
use thalamus_gateway::node::GatewayNode;
use thalamus_ingress::registry::DeviceRegistry;

#[derive(Parser, Debug)]
#[command(
    name = "thalamus",
    version,
    about = "Thalamus: a gateway between MBFP devices and SIP"
)]
struct Cli {
    /// Config file (TOML). Without one, embedded defaults are used.
    #[arg(long, short, global = true, env = "THALAMUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a gateway node.
    Run {
        /// Write the bound addresses and certificate fingerprint here as JSON once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Manage the device registry.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Print the effective configuration.
    Config,
    /// Check the configuration and the environment (data directory, free ports, certificate,
    /// dialog store, clock); exits non-zero naming what failed.
    Check,
    /// Run the SIP load balancer (its own config file: see docs/balancer.md).
    Balancer {
        /// Write the bound addresses here as JSON once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Add a device; prints its secret once (only a hash is stored).
    Add {
        /// Device id (1-64 of A-Z a-z 0-9 . _ -).
        id: String,
    },
    /// Remove a device.
    Remove {
        /// Device id.
        id: String,
    },
    /// Add `<prefix><n>` for n in first..first+count, all with one secret (load runs; one
    /// hash for all, so it is fast). Prints the secret.
    AddBulk {
        /// Id prefix.
        #[arg(long, default_value = "load-")]
        prefix: String,
        /// First number.
        #[arg(long, default_value_t = 0)]
        first: u32,
        /// How many.
        #[arg(long)]
        count: u32,
        /// The shared secret (generated when absent).
        #[arg(long)]
        secret: Option<String>,
    },
    /// List device ids.
    List,
}

/// With the `mimalloc` feature: per-thread free lists and no heap trimming, so the many small,
/// short-lived allocations of a call do not grow and shrink glibc's arenas with `mprotect` (4
/// syscalls per call with glibc's allocator). Less CPU, more memory: docs/benchmarks.md.
#[cfg(all(feature = "mimalloc", not(feature = "dhat-heap")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With the `dhat-heap` feature every allocation goes through dhat's profiler.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> anyhow::Result<()> {
    // Written to dhat-heap.json when main returns (after a SIGTERM shut the node down).
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
    let cli = Cli::parse();
    if let Command::Balancer { ready_file } = cli.command {
        return balancer(cli.config, ready_file);
    }
    let config = Config::load(&ProcessConfigSource {
        path: cli.config.clone(),
    })?;
    match cli.command {
        Command::Run { ready_file } => run(config, cli.config.clone(), ready_file),
        Command::Check => check(&config),
        Command::Device { command } => device(&config, command),
        Command::Config => {
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Balancer { .. } => Ok(()),
    }
}

/// `thalamus check`: prints one line per check and fails when any did.
fn check(config: &Config) -> anyhow::Result<()> {
    println!("ok    configuration (every key checked)");
    let findings =
        runtime("thalamus-check")?.block_on(thalamus_gateway::check::check_environment(config));
    let mut failed = Vec::new();
    for f in &findings {
        match &f.result {
            Ok(detail) => println!("ok    {}: {detail}", f.what),
            Err(reason) => {
                println!("FAIL  {}: {reason}", f.what);
                failed.push(f.what.clone());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("check failed: {}", failed.join(", "))
    }
}

fn run(
    config: Config,
    config_path: Option<PathBuf>,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let from_file = config_path.is_some();
    let log = thalamus_telemetry::init_logging(&config.log);
    let drain_deadline = std::time::Duration::from_secs(config.node.drain_deadline_secs.into());
    runtime("thalamus")?.block_on(async move {
        // Signals are handled from the start: a SIGHUP (systemctl reload) or SIGTERM while the
        // node starts is taken when it is up, not the default action that would kill it.
        let mut signals = Signals::new()?;
        let registry_path = config.node.device_registry_path();
        let data_dir = config.node.data_dir.clone();
        let inbound = &config.sip.inbound;
        let trusted: Vec<String> = inbound.trusted.iter().map(ToString::to_string).collect();
        let inbound_line = format!(
            "trusts {}; other sources: {}",
            if trusted.is_empty() { "nobody".to_string() } else { trusted.join(", ") },
            if inbound.users.is_empty() {
                "403 (add [sip.inbound] users to challenge them, or trusted networks)".to_string()
            } else {
                format!("digest challenge ({} user(s))", inbound.users.len())
            }
        );
        let node = GatewayNode::start(config).await?;
        let ready = serde_json::json!({
            "quic": node.quic_addr.to_string(),
            "admin": node.admin_addr.to_string(),
            "sip": node.sip_addr.to_string(),
            "fingerprint": node.fingerprint,
            "node_id": node.shared.node_id,
            "web": node.web_addr.map(|a| a.to_string()),
            "webtransport_certificate_hash": node.webtransport_certificate_hash(),
        });
        println!("Thalamus {} — node {}", env!("CARGO_PKG_VERSION"), node.shared.node_id);
        println!("  devices (QUIC, ALPN mbfp/1)  {}", node.quic_addr);
        println!("  SIP (UDP and TCP)            {}", node.sip_addr);
        println!("  SIP inbound                  {inbound_line}");
        println!("  admin (health, metrics)      http://{}/metrics", node.admin_addr);
        if let Some(web) = node.web_addr {
            println!("  device page (browsers)       http://{web}/");
        }
        if node.admin_token_generated {
            println!(
                "  admin token (generated now, kept in {}; POST/DELETE need it)  {}",
                data_dir.join("admin.token").display(),
                node.admin_token()
            );
        }
        println!("  certificate                  {}{}", node.cert_path.display(),
            if node.generated_cert { " (generated now, self-signed)" } else { "" });
        println!("  certificate SHA-256          {}", node.fingerprint);
        if !from_file {
            println!("  running on embedded defaults (no --config)");
        }
        let devices = node.shared.registry.len();
        println!();
        if devices == 0 {
            println!("Next: add a device and connect the simulator:");
        } else {
            println!("{devices} device(s) registered in {}. To add another and connect it:", registry_path.display());
        }
        println!("  thalamus device add earpiece-1          # prints the device secret once");
        println!(
            "  thalamus-sim connect --gateway {} --device earpiece-1 --secret <SECRET> --fingerprint {}",
            display_addr(node.quic_addr), node.fingerprint
        );
        if let Some(path) = ready_file {
            std::fs::write(&path, ready.to_string())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        // Reloads until a stop signal.
        while signals.next().await == Signal::Reload {
            reload(&node, config_path.as_ref(), log.as_ref()).await;
        }
        tracing::info!(deadline_secs = drain_deadline.as_secs(), "stop requested: draining");
        let left = node
            .drain(drain_deadline, async {
                loop {
                    if signals.next().await == Signal::Stop {
                        return;
                    }
                }
            })
            .await;
        tracing::info!(calls_left = left, "shutting down");
        node.shutdown().await;
        anyhow::Ok(())
    })
}

/// SIGHUP: reads the configuration again (same file, same environment) and applies what can
/// change while running; logs what changed and what needs a restart. A configuration that
/// does not load changes nothing (the error, naming the key, is logged).
async fn reload(
    node: &GatewayNode,
    path: Option<&PathBuf>,
    log: Option<&thalamus_telemetry::LogReload>,
) {
    let loaded = Config::load(&ProcessConfigSource {
        path: path.cloned(),
    });
    let new = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the configuration does not load; nothing changed");
            return;
        }
    };
    match node.reload(new, log).await {
        Ok(report) => {
            tracing::info!(
                applied = ?report.applied,
                needs_restart = ?report.needs_restart,
                devices_before = report.devices.0,
                devices_after = report.devices.1,
                "configuration reloaded"
            );
            if !report.needs_restart.is_empty() {
                tracing::warn!(keys = ?report.needs_restart, "changed keys need a restart to take effect");
            }
            if let Some(fp) = report.new_fingerprint {
                tracing::warn!(fingerprint = %fp, "new QUIC certificate for new connections: devices pinning the old one must be given this fingerprint");
            }
        }
        Err(e) => tracing::error!(error = %e, "reload refused; nothing further changed"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    /// SIGINT or SIGTERM.
    Stop,
    /// SIGHUP.
    Reload,
}

/// The process's signals, as a stream.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
                hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Signal::Stop,
                _ = self.term.recv() => Signal::Stop,
                _ = self.hup.recv() => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}

fn display_addr(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// A multi-threaded tokio runtime whose threads are named `name`.
fn runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
        .context("starting the tokio runtime")
}

/// `thalamus balancer`: loads the balancer's config, runs until SIGINT/SIGTERM (a SIGHUP is
/// logged and ignored: the balancer has nothing to reload). With `ready_file`, writes the bound
/// addresses there as JSON once listening.
fn balancer(config_path: Option<PathBuf>, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let config = thalamus_balancer::BalancerConfig::load(config_path.as_deref())?;
    thalamus_telemetry::init_logging(&config.log);
    runtime("thalamus-lb")?.block_on(async move {
        let mut signals = Signals::new()?;
        let lb = thalamus_balancer::RunningBalancer::start(config).await?;
        println!("Thalamus {} — SIP load balancer", env!("CARGO_PKG_VERSION"));
        println!("  SIP (UDP, TCP)     {} / {}", lb.sip_udp, lb.sip_tcp);
        if let Some(tls) = lb.sip_tls {
            println!("  SIP (TLS)          {tls}");
        }
        println!("  advertised as      {}", lb.advertised);
        println!("  heartbeats (UDP)   {}", lb.heartbeat);
        println!("  admin              http://{}/nodes  /metrics", lb.admin);
        if let Some(path) = ready_file {
            let ready = serde_json::json!({
                "sip_udp": lb.sip_udp.to_string(),
                "sip_tcp": lb.sip_tcp.to_string(),
                "sip_tls": lb.sip_tls.map(|a| a.to_string()),
                "heartbeat": lb.heartbeat.to_string(),
                "admin": lb.admin.to_string(),
                "advertised": lb.advertised,
            });
            std::fs::write(&path, ready.to_string())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        while signals.next().await == Signal::Reload {
            tracing::info!(
                "SIGHUP ignored: the balancer has no configuration to reload (restart it)"
            );
        }
        tracing::info!("shutting down");
        lb.shutdown().await;
        anyhow::Ok(())
    })
}

fn device(config: &Config, command: DeviceCommand) -> anyhow::Result<()> {
    let registry = DeviceRegistry::open(config.node.device_registry_path());
    match command {
        DeviceCommand::Add { id } => {
            let secret = registry.add(&id)?;
            eprintln!(
                "added device {id} to {} (keep the secret: it is not stored and cannot be shown again)",
                registry.path().display()
            );
            println!("{secret}");
        }
        DeviceCommand::Remove { id } => {
            registry.remove(&id)?;
            eprintln!("removed device {id}");
        }
        DeviceCommand::AddBulk {
            prefix,
            first,
            count,
            secret,
        } => {
            let secret = secret.unwrap_or_else(thalamus_ingress::registry::generate_secret);
            let ids: Vec<String> = (first..first.saturating_add(count))
                .map(|n| format!("{prefix}{n}"))
                .collect();
            registry.add_many_shared(&ids, &secret)?;
            eprintln!(
                "added {} devices {prefix}{first}.. to {}",
                ids.len(),
                registry.path().display()
            );
            println!("{secret}");
        }
        DeviceCommand::List => {
            registry.refresh()?;
            for id in registry.ids() {
                println!("{id}");
            }
        }
    }
    Ok(())
}
