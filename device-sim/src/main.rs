//! `thalamus-sim`: simulated Thalamus devices.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thalamus_sim::connect::{self, ConnectOptions, StopReason};
use thalamus_sim::events::EventPrinter;
use thalamus_sim::load::cli::resolve_gateway;

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

/// Which gateway, as which device.
#[derive(clap::Args, Debug, Clone)]
struct LoginArgs {
    /// Gateway QUIC address (host:port).
    #[arg(long, default_value = "127.0.0.1:4433")]
    gateway: String,
    /// Device id.
    #[arg(long)]
    device: String,
    /// Device secret.
    #[arg(long, env = "THALAMUS_SIM_SECRET")]
    secret: String,
    /// SHA-256 fingerprint of the gateway certificate.
    #[arg(long)]
    fingerprint: Option<String>,
    /// The MBFP v1 revision the device speaks: 2 (default) declares `Capabilities.transfer`;
    /// 1 plays a device built before it (its remote party's transfers are declined).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    revision: u8,
    /// One JSON object per line per event.
    #[arg(long)]
    json: bool,
}

impl LoginArgs {
    fn login(&self) -> anyhow::Result<(thalamus_sim::calls::Login, EventPrinter)> {
        let (gateway, server_name) = resolve_gateway(&self.gateway)?;
        let fingerprint = self
            .fingerprint
            .as_deref()
            .map(thalamus_sim::quic::parse_fingerprint)
            .transpose()?;
        Ok((
            thalamus_sim::calls::Login {
                gateway,
                server_name,
                fingerprint,
                device: self.device.clone(),
                secret: self.secret.clone(),
                takes_transfers: self.revision >= 2,
            },
            EventPrinter { json: self.json },
        ))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Log in as a device and place calls through the gateway.
    Call {
        #[command(flatten)]
        login: LoginArgs,
        /// SIP URI or address book alias to call.
        #[arg(long)]
        target: String,
        /// Calls to place one after the other.
        #[arg(long, default_value_t = 1)]
        calls: u32,
        /// Milliseconds to stay answered before hanging up (0: wait for the remote hangup).
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
        /// Hold and resume the call once after the answer.
        #[arg(long)]
        hold_resume: bool,
        /// DTMF digits to send after the answer.
        #[arg(long, default_value = "")]
        dtmf: String,
        /// Once answered, transfer the call to this SIP URI or alias (blind transfer: the
        /// gateway sends REFER); the call ends when the transfer succeeds, and is hung up when
        /// it fails (or when --hold-ms runs out first).
        #[arg(long, conflicts_with = "consult")]
        transfer_to: Option<String>,
        /// Once answered, call this SIP URI or alias too (a consultation), and once that call
        /// is answered transfer the first call to it in its place (attended transfer, RFC
        /// 3891: REFER with Replaces); the consultation is hung up if its remote party has
        /// not ended it 3 s after the first call ended.
        #[arg(long)]
        consult: Option<String>,
        /// Stream 20 ms audio frames and report what comes back (use with an echoing peer).
        #[arg(long)]
        media: bool,
        /// Offer the earpiece's signal data stream (stream 2) and, once answered, stream a
        /// synthetic 8-channel 250 Hz signal on it; check every sample the other side sends
        /// and print a `signal_report` per call (use with another device's `listen --signal`).
        #[arg(long)]
        signal: bool,
        /// Offer VP8 video and, once answered, stream synthetic 15 fps frames split into
        /// packets (RFC 7741); put together and check the frames that come in and print a
        /// `video_report` per call.
        #[arg(long)]
        video: bool,
        /// Seconds before one call is given up.
        #[arg(long, default_value_t = 60)]
        call_timeout_secs: u64,
        /// Devices calling at once, each its own connection: `<device>0` .. `<device>N-1`
        /// (e.g. from `thalamus device add-bulk --prefix <device>`); 1 uses `--device` itself.
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        /// Write this file once every device's first call is answered (for scripts).
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
        /// Milliseconds after each answer at which the device moves to a new local UDP port
        /// (QUIC connection migration, as when a device changes networks).
        #[arg(long)]
        rebind_after_ms: Option<u64>,
    },
    /// Log in as a device and answer (or reject) incoming calls.
    Listen {
        #[command(flatten)]
        login: LoginArgs,
        /// Reject with this SIP status instead of answering.
        #[arg(long)]
        reject: Option<u32>,
        /// Do not answer at all.
        #[arg(long)]
        ignore: bool,
        /// Ring this long before answering.
        #[arg(long, default_value_t = 0)]
        answer_after_ms: u64,
        /// Hang up this long after answering (0: the caller hangs up).
        #[arg(long, default_value_t = 0)]
        hangup_after_ms: u64,
        /// Exit after this many calls have ended (0: never).
        #[arg(long, default_value_t = 0)]
        calls: u32,
        /// Send every media datagram of an answered call back (a device-side echo).
        #[arg(long)]
        echo: bool,
        /// Answer with the signal data stream and, once a call is answered, stream a
        /// synthetic 8-channel 250 Hz signal on it; check every sample the caller sends and
        /// print a `signal_report` per call.
        #[arg(long)]
        signal: bool,
        /// Answer with VP8 video and, once a call is answered, stream synthetic 15 fps frames;
        /// put together and check the frames that come in and print a `video_report` per call.
        #[arg(long)]
        video: bool,
        /// While listening, also call this SIP URI (or alias) `--dial-count` times, one call
        /// every `--dial-every-ms`, each hung up once answered (call refs 1, 2, ...).
        #[arg(long)]
        dial: Option<String>,
        /// Calls to place with `--dial`.
        #[arg(long, default_value_t = 1)]
        dial_count: u32,
        /// Milliseconds between the `--dial` calls (the first goes after one interval).
        #[arg(long, default_value_t = 500)]
        dial_every_ms: u64,
    },
    /// Log in as a device and send one text message (SIP MESSAGE).
    Text {
        #[command(flatten)]
        login: LoginArgs,
        /// SIP URI or address book alias.
        #[arg(long)]
        to: String,
        /// The text.
        #[arg(long)]
        body: String,
    },
    /// Watch SIP buddies' presence through the gateway (it subscribes on the device's
    /// behalf), print each change, then unwatch.
    Watch {
        #[command(flatten)]
        login: LoginArgs,
        /// A SIP URI or address book alias to watch (repeat for several).
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        /// Seconds asked for each subscription period (0: the gateway's default).
        #[arg(long, default_value_t = 0)]
        expires_secs: u32,
        /// How long to watch before unwatching, milliseconds.
        #[arg(long, default_value_t = 10_000)]
        for_ms: u64,
    },
    /// Connect one device, print its events, and keep the session alive.
    Connect {
        /// Gateway QUIC address (host:port); a comma-separated list gives more entry points,
        /// tried in turn when a connection fails or is lost.
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
        /// Once live, set the device's presence (what SIP watchers see): available, busy,
        /// away or offline.
        #[arg(long)]
        presence: Option<String>,
        /// The note that goes with --presence.
        #[arg(long, default_value = "")]
        note: String,
        /// One JSON object per line per event.
        #[arg(long)]
        json: bool,
    },
    /// A SIP user agent that plays the remote party: answers (or rejects) calls, echoes RTP.
    Buddy {
        /// SIP address to listen on (UDP and TCP).
        #[arg(long, default_value = "127.0.0.1:5070")]
        listen: SocketAddr,
        /// Ring this long before answering.
        #[arg(long, default_value_t = 0)]
        answer_after_ms: u64,
        /// Reject every call with this SIP status.
        #[arg(long)]
        reject: Option<u16>,
        /// Hang up this long after answering.
        #[arg(long)]
        hangup_after_ms: Option<u64>,
        /// Echo RTP back to its sender.
        #[arg(long)]
        echo: bool,
        /// With --echo: echo ports kept open outside calls (listed in the `listening` event).
        #[arg(long, default_value_t = 1)]
        standing_echoes: u16,
        /// Answer MESSAGE requests with this status.
        #[arg(long, default_value_t = 200)]
        message_status: u16,
        /// Do not negotiate telephone-event (DTMF then arrives as SIP INFO).
        #[arg(long)]
        no_telephone_event: bool,
        /// Also listen for SIP over TLS on this address (with --tls-certificate and
        /// --tls-key; the `listening` event names the bound address as `tls`).
        #[arg(long, requires_all = ["tls_certificate", "tls_key"])]
        tls_listen: Option<SocketAddr>,
        /// PEM file: the certificate chain the buddy presents over TLS.
        #[arg(long)]
        tls_certificate: Option<std::path::PathBuf>,
        /// PEM file: its private key.
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
        /// One JSON object per line per event.
        #[arg(long)]
        json: bool,
    },
    /// Place SIP calls from a user agent on the project's stack (INVITE, ACK, BYE).
    SipCall {
        /// Request-URI to call.
        #[arg(long)]
        target: String,
        /// Local SIP address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Number of calls.
        #[arg(long, default_value_t = 1)]
        calls: u32,
        /// Calls per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Milliseconds between ACK and BYE.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Use TCP toward the target.
        #[arg(long)]
        tcp: bool,
        /// Digest user name.
        #[arg(long)]
        user: Option<String>,
        /// Digest password.
        #[arg(long)]
        password: Option<String>,
        /// Most calls in progress at once.
        #[arg(long, default_value_t = 200)]
        max_concurrent: usize,
    },
    /// Devices over WebTransport (as browsers connect): log in, stay, and optionally call a
    /// target with audio; prints a `wt_load` summary.
    WtLoad {
        /// The node's QUIC address.
        #[arg(long)]
        gateway: SocketAddr,
        /// SHA-256 (hex) of the node's WebTransport certificate (its ready file's
        /// `webtransport_certificate_hash`, or its device page's `/webtransport.json`).
        #[arg(long)]
        certificate_hash: String,
        /// The devices' shared secret (`provision`).
        #[arg(long)]
        secret: String,
        /// Device id prefix.
        #[arg(long, default_value = "load-")]
        prefix: String,
        /// How many devices.
        #[arg(long, default_value_t = 1)]
        devices: u32,
        /// Seconds to stay once every device is in.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Where to write the run's phase (JSON).
        #[arg(long)]
        status_file: Option<std::path::PathBuf>,
        /// Each device calls this once live, with audio.
        #[arg(long)]
        target: Option<String>,
        /// How long each call streams before hanging up (ms).
        #[arg(long, default_value_t = 3000)]
        hold_ms: u64,
        /// Calls per second over all devices (device n dials n/cps s after its login; 0: all
        /// at once).
        #[arg(long, default_value_t = 0.0)]
        cps: f64,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Create test devices that share one secret (for load runs); prints the secret.
    Provision(thalamus_sim::load::cli::ProvisionArgs),
    /// Many devices placing (or answering) calls at a rate; reports set-up latency and failures.
    Load(thalamus_sim::load::cli::LoadArgs),
    /// Stream 20 ms RTP frames to a UDP echo from several sockets at once and report loss and
    /// round-trip times (the no-gateway baseline of `call --media`).
    EchoProbe {
        /// The UDP echo (e.g. the `echo` address `buddy --echo` prints); repeat it to spread
        /// the flows over several echoes (round robin).
        #[arg(long, required = true)]
        target: Vec<SocketAddr>,
        /// Concurrent flows, one socket each.
        #[arg(long, default_value_t = 1)]
        flows: u32,
        /// Seconds each flow streams.
        #[arg(long, default_value_t = 10)]
        secs: u64,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("THALAMUS_SIM_LOG")
        // web_transport_quinn warns about every session closed without a close capsule (the
        // node ends a run's sessions by closing their connections).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,web_transport_quinn=error"));
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
            presence,
            note,
            json,
        } => {
            let presence = match presence.as_deref() {
                None => None,
                Some(name) => Some((
                    thalamus_proto::v1::PresenceState::from_str_name(&format!(
                        "PRESENCE_STATE_{}",
                        name.to_ascii_uppercase()
                    ))
                    .ok_or_else(|| {
                        anyhow::anyhow!("--presence: one of available, busy, away, offline")
                    })?,
                    note,
                )),
            };
            let mut entry_points = gateway.split(',').map(str::trim).filter(|g| !g.is_empty());
            let first = entry_points.next().unwrap_or("127.0.0.1:4433");
            let (addr, default_name) = resolve_gateway(first)?;
            let fallbacks = entry_points
                .map(|g| resolve_gateway(g).map(|(a, _)| a))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let fingerprint = fingerprint
                .as_deref()
                .map(thalamus_sim::quic::parse_fingerprint)
                .transpose()?;
            let reason = connect::run(ConnectOptions {
                gateway: addr,
                fallbacks,
                server_name: server_name.unwrap_or(default_name),
                device_id: device,
                secret,
                fingerprint,
                max_attempts,
                presence,
                printer: EventPrinter { json },
            })
            .await?;
            Ok(match reason {
                StopReason::Unauthenticated => ExitCode::from(3),
                StopReason::Replaced => ExitCode::from(4),
                StopReason::GaveUp => ExitCode::from(5),
            })
        }
        Command::Call {
            login,
            target,
            calls,
            hold_ms,
            hold_resume,
            dtmf,
            transfer_to,
            consult,
            media,
            signal,
            video,
            call_timeout_secs,
            parallel,
            ready_file,
            rebind_after_ms,
        } => {
            let (login, printer) = login.login()?;
            let (ok, failed) = thalamus_sim::calls::call(
                &login,
                &thalamus_sim::calls::CallOptions {
                    target,
                    calls,
                    hold: std::time::Duration::from_millis(hold_ms),
                    hold_resume,
                    dtmf,
                    transfer_to,
                    consult,
                    media,
                    streams: thalamus_sim::streams::StreamChoice { signal, video },
                    call_timeout: std::time::Duration::from_secs(call_timeout_secs),
                    parallel,
                    ready_file,
                    rebind_after: rebind_after_ms.map(std::time::Duration::from_millis),
                },
                printer,
            )
            .await?;
            Ok(
                if failed == 0 && ok == calls.saturating_mul(parallel.max(1)) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::Listen {
            login,
            reject,
            ignore,
            answer_after_ms,
            hangup_after_ms,
            calls,
            echo,
            signal,
            video,
            dial,
            dial_count,
            dial_every_ms,
        } => {
            let (login, printer) = login.login()?;
            thalamus_sim::calls::listen(
                &login,
                &thalamus_sim::calls::ListenOptions {
                    reject,
                    answer_after: std::time::Duration::from_millis(answer_after_ms),
                    hangup_after: std::time::Duration::from_millis(hangup_after_ms),
                    calls,
                    ignore,
                    echo,
                    streams: thalamus_sim::streams::StreamChoice { signal, video },
                    dial,
                    dial_count,
                    dial_every: std::time::Duration::from_millis(dial_every_ms),
                },
                printer,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch {
            login,
            targets,
            expires_secs,
            for_ms,
        } => {
            let (login, printer) = login.login()?;
            let (active, failed) = thalamus_sim::calls::watch(
                &login,
                &targets,
                expires_secs,
                std::time::Duration::from_millis(for_ms),
                printer,
            )
            .await?;
            Ok(
                if failed == 0 && active == u32::try_from(targets.len()).unwrap_or(u32::MAX) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::Text { login, to, body } => {
            let (login, printer) = login.login()?;
            let status = thalamus_sim::calls::text(&login, &to, &body, printer).await?;
            Ok(if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Buddy {
            listen,
            answer_after_ms,
            reject,
            hangup_after_ms,
            echo,
            standing_echoes,
            message_status,
            no_telephone_event,
            tls_listen,
            tls_certificate,
            tls_key,
            json,
        } => {
            let tls = match (tls_listen, tls_certificate, tls_key) {
                (Some(listen), Some(chain), Some(key)) => Some((listen, chain, key)),
                _ => None,
            };
            thalamus_sim::buddy::run(thalamus_sim::buddy::BuddyOptions {
                listen,
                answer_after: std::time::Duration::from_millis(answer_after_ms),
                reject,
                hangup_after: hangup_after_ms.map(std::time::Duration::from_millis),
                echo,
                standing_echoes,
                message_status,
                telephone_event: !no_telephone_event,
                tls,
                printer: EventPrinter { json },
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SipCall {
            target,
            listen,
            calls,
            rate,
            hold_ms,
            tcp,
            user,
            password,
            max_concurrent,
        } => {
            let report = thalamus_sim::sipcall::run(thalamus_sim::sipcall::SipCallOptions {
                target,
                listen,
                calls,
                rate,
                hold: std::time::Duration::from_millis(hold_ms),
                transport: if tcp {
                    thalamus_sip::transport::PeerTransport::Tcp
                } else {
                    thalamus_sip::transport::PeerTransport::Udp
                },
                credentials: user.zip(password),
                from_user: "sim".into(),
                max_concurrent,
            })
            .await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(
                if report.failed == 0 && report.succeeded == u64::from(calls) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::EchoProbe {
            target,
            flows,
            secs,
            json,
        } => {
            let summary = thalamus_sim::media::echo_probe(
                &thalamus_sim::media::EchoProbeOptions {
                    targets: target,
                    flows,
                    duration: std::time::Duration::from_secs(secs),
                },
                EventPrinter { json },
            )
            .await?;
            Ok(if summary["frames_sent"].as_u64().unwrap_or(0) > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::WtLoad {
            gateway,
            certificate_hash,
            secret,
            prefix,
            devices,
            duration,
            status_file,
            target,
            hold_ms,
            cps,
            json,
        } => {
            let opts = thalamus_sim::webtransport::WtLoadOptions {
                gateway,
                certificate_hash,
                secret,
                prefix,
                devices,
                duration: std::time::Duration::from_secs(duration),
                status_file,
                target,
                hold: std::time::Duration::from_millis(hold_ms),
                cps,
            };
            Ok(
                if thalamus_sim::webtransport::wt_load(opts, EventPrinter { json }).await? {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::Provision(args) => {
            thalamus_sim::load::cli::provision(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => Ok(if thalamus_sim::load::cli::load(args).await? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
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
            let (addr, server_name) = resolve_gateway(&gateway)?;
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
