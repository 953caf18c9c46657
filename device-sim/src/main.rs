//! `thalamus-sim`: simulated Thalamus devices.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thalamus_sim::connect::{self, ConnectOptions, StopReason};
use thalamus_sim::events::EventPrinter;

#[derive(Parser, Debug)]
#[command(
    name = "thalamus-sim",
    version,
    about = "Simulated devices for the Thalamus gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect one device, print its events, and keep the session alive.
    Connect {
        /// Gateway QUIC address (host:port).
        #[arg(long, default_value = "127.0.0.1:4433")]
        gateway: String,
        /// Device id.
        #[arg(long)]
        device: String,
        /// Device secret (from `thalamus device add`).
        #[arg(long, env = "THALAMUS_SIM_SECRET")]
        secret: String,
        /// SHA-256 fingerprint of the gateway certificate (pins it); without it the WebPKI
        /// roots are used.
        #[arg(long)]
        fingerprint: Option<String>,
        /// TLS server name (defaults to the gateway host).
        #[arg(long)]
        server_name: Option<String>,
        /// Give up after this many failed reconnects in a row.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// One JSON object per line per event.
        #[arg(long)]
        json: bool,
    },
    /// Log in many devices (`<prefix><n>`), hold them idle, and report handshake figures.
    Swarm {
        /// Gateway QUIC address (host:port).
        #[arg(long, default_value = "127.0.0.1:4433")]
        gateway: String,
        /// SHA-256 fingerprint of the gateway certificate.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Device id prefix.
        #[arg(long, default_value = "load-")]
        prefix: String,
        /// First device number.
        #[arg(long, default_value_t = 0)]
        first: u32,
        /// Number of devices.
        #[arg(long, default_value_t = 1000)]
        devices: u32,
        /// The secret all these devices share.
        #[arg(long, env = "THALAMUS_SIM_SECRET")]
        secret: String,
        /// Logins in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to hold the sessions after all are up.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
        /// UDP sockets to spread the connections over.
        #[arg(long, default_value_t = 4)]
        endpoints: usize,
        /// Write this file (e.g. "ready") once all devices are up, for scripts.
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
    },
}

fn resolve(gateway: &str) -> anyhow::Result<(SocketAddr, String)> {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("THALAMUS_SIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thalamus-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thalamus-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Connect {
            gateway,
            device,
            secret,
            fingerprint,
            server_name,
            max_attempts,
            json,
        } => {
            let (addr, default_name) = resolve(&gateway)?;
            let fingerprint = fingerprint
                .as_deref()
                .map(thalamus_sim::quic::parse_fingerprint)
                .transpose()?;
            let reason = connect::run(ConnectOptions {
                gateway: addr,
                server_name: server_name.unwrap_or(default_name),
                device_id: device,
                secret,
                fingerprint,
                max_attempts,
                printer: EventPrinter { json },
            })
            .await?;
            return Ok(match reason {
                StopReason::Unauthenticated => ExitCode::from(3),
                StopReason::Replaced => ExitCode::from(4),
                StopReason::GaveUp => ExitCode::from(5),
            });
        }
        Command::Swarm {
            gateway,
            fingerprint,
            prefix,
            first,
            devices,
            secret,
            concurrency,
            hold_secs,
            endpoints,
            ready_file,
        } => {
            let (addr, server_name) = resolve(&gateway)?;
            let fingerprint = fingerprint
                .as_deref()
                .map(thalamus_sim::quic::parse_fingerprint)
                .transpose()?;
            let report = thalamus_sim::swarm::run(
                thalamus_sim::swarm::SwarmOptions {
                    gateway: addr,
                    server_name,
                    fingerprint,
                    prefix,
                    first,
                    count: devices,
                    secret,
                    concurrency,
                    hold: std::time::Duration::from_secs(hold_secs),
                    endpoints,
                },
                |report| {
                    eprintln!(
                        "{} of {} devices up in {:.2} s ({:.0} handshakes/s)",
                        report.connected,
                        report.attempted,
                        report.ramp_secs,
                        report.handshakes_per_sec
                    );
                    if let Some(path) = &ready_file {
                        let _ = std::fs::write(path, "ready");
                    }
                },
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
