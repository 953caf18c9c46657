//! `thalamus-sim sip-call`: a SIP UAC on the project's own stack that places calls at a rate
//! (INVITE with an SDP offer, ACK, hold, BYE), answering digest challenges when given a user
//! and password, and reports how many succeeded. Used to show the stack against real peers
//! (SIPp's `uas`, SIPp scenarios, Kamailio).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use thalamus_sip::message::{MediaType, Method, NameAddr, Uri};
use thalamus_sip::sdp::{Codec, LocalMedia, SdpSession};
use thalamus_sip::transport::{PeerTransport, TransportConfig};
use thalamus_sip::ua::{ClientEvent, UaConfig, UserAgent};

/// UAC settings.
#[derive(Debug, Clone)]
pub struct SipCallOptions {
    /// Request-URI of every call.
    pub target: String,
    /// Local SIP address.
    pub listen: SocketAddr,
    /// Calls to place.
    pub calls: u32,
    /// Calls started per second.
    pub rate: f64,
    /// Time between ACK and BYE.
    pub hold: Duration,
    /// Transport toward the target.
    pub transport: PeerTransport,
    /// Digest credentials.
    pub credentials: Option<(String, String)>,
    /// From user.
    pub from_user: String,
    /// Most calls in progress at once.
    pub max_concurrent: usize,
}

/// What the run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SipCallReport {
    /// Calls attempted.
    pub attempted: u64,
    /// Calls answered, ACKed and hung up with a 200 to the BYE.
    pub succeeded: u64,
    /// Calls that failed (any other outcome).
    pub failed: u64,
    /// The first failure.
    pub first_failure: Option<String>,
    /// Wall time of the run in seconds.
    pub elapsed_secs: f64,
}

#[derive(Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

/// Places the calls and waits for all of them.
pub async fn run(opts: SipCallOptions) -> anyhow::Result<SipCallReport> {
    let (ua, _events) = UserAgent::start(UaConfig {
        transport: TransportConfig {
            udp: Some(opts.listen),
            tcp: Some(opts.listen),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let counters = Arc::new(Counters::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(opts.max_concurrent.max(1)));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
    let mut tasks = Vec::new();
    for n in 0..opts.calls {
        let at = start + interval.mul_f64(f64::from(n));
        tokio::time::sleep_until(at.into()).await;
        let permit = gate.clone().acquire_owned().await?;
        let (ua, opts, counters) = (ua.clone(), opts.clone(), counters.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            match one_call(&ua, &opts).await {
                Ok(()) => {
                    counters.succeeded.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = counters.first_failure.lock() {
                        first.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let first_failure = counters.first_failure.lock().ok().and_then(|f| f.clone());
    Ok(SipCallReport {
        attempted: u64::from(opts.calls),
        succeeded: counters.succeeded.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        first_failure,
        elapsed_secs: start.elapsed().as_secs_f64(),
    })
}

async fn one_call(ua: &UserAgent, opts: &SipCallOptions) -> anyhow::Result<()> {
    let target = Uri::parse(&opts.target)?;
    let from: NameAddr = format!("<sip:{}@thalamus-sim.invalid>", opts.from_user).parse()?;
    let mut invite = ua.new_request(Method::Invite, target.clone(), from, NameAddr::new(target));
    invite
        .headers
        .push_contact(&ua.contact(Some(&opts.from_user), opts.transport));
    let local_ip = match ua.local_addr(opts.transport).map(|a| a.ip()) {
        Some(ip) if !ip.is_unspecified() => ip,
        _ => std::net::IpAddr::from([127, 0, 0, 1]),
    };
    let offer = SdpSession::with_random_id().create_offer(&LocalMedia::audio(
        local_ip,
        40_000,
        vec![
            Codec::pcmu(),
            Codec::pcma(),
            Codec::telephone_event(101, 8000),
        ],
    ))?;
    invite.set_body(Bytes::from(offer.to_string()), Some(&MediaType::sdp()));
    let mut call = ua
        .send_with_auth(
            invite,
            None,
            opts.credentials
                .clone()
                .map(|(user, password)| thalamus_sip::ua::DigestAuth::anywhere(user, password)),
        )
        .await?;
    let dialog = loop {
        match call.events.recv().await {
            Some(ClientEvent::Response { response, dialog }) if response.is_success() => {
                break dialog.ok_or_else(|| anyhow::anyhow!("2xx without a dialog"))?
            }
            Some(ClientEvent::Response { response, .. }) if response.status >= 300 => {
                anyhow::bail!("INVITE answered {} {}", response.status, response.reason)
            }
            Some(ClientEvent::Response { .. }) => {}
            Some(ClientEvent::Timeout) => anyhow::bail!("INVITE timed out"),
            Some(ClientEvent::TransportError) | None => anyhow::bail!("INVITE transport error"),
        }
    };
    ua.ack(&dialog, None).await?;
    tokio::time::sleep(opts.hold).await;
    let mut bye = ua
        .request_in_dialog(&dialog, Method::Bye, None, vec![])
        .await?;
    let result = match bye.final_response().await {
        ClientEvent::Response { response, .. } if response.status == 200 => Ok(()),
        ClientEvent::Response { response, .. } => {
            Err(anyhow::anyhow!("BYE answered {}", response.status))
        }
        _ => Err(anyhow::anyhow!("BYE timed out")),
    };
    ua.remove_dialog(&dialog).await?;
    result
}
