//! `thalamus-sim buddy`: a SIP user agent on the project's own stack that plays the remote party
//! ("buddy") in tests and demos. It answers INVITEs (after a delay, or rejects them with a
//! status), answers re-INVITEs (hold and resume), BYE, INFO, MESSAGE and OPTIONS, can hang up by
//! itself after a while, and with `--echo` sends every RTP packet back where it came from (on
//! each call's media port, and on one standing echo port named in the `listening` event).
//! Every event is printed (one JSON object per line with `--json`) so tests can check what the
//! buddy saw.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{HeaderName, MediaType, Method, NameAddr, Request, Uri};
use thalamus_sip::sdp::{Codec, Direction, LocalMedia, SdpSession, SessionDescription};
use thalamus_sip::transport::TransportConfig;
use thalamus_sip::ua::{ClientEvent, UaConfig, UaEvent, UserAgent};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

use crate::events::EventPrinter;

/// Buddy settings.
#[derive(Debug, Clone)]
pub struct BuddyOptions {
    /// SIP address (UDP and TCP).
    pub listen: SocketAddr,
    /// Answer after this long (ringing meanwhile).
    pub answer_after: Duration,
    /// Reject every call with this status instead of answering.
    pub reject: Option<u16>,
    /// Send BYE this long after answering.
    pub hangup_after: Option<Duration>,
    /// Echo RTP back to its sender.
    pub echo: bool,
    /// With `echo`: echo sockets kept open outside any call (the media benchmark's baseline
    /// sends one flow to each, like one call per echo port).
    pub standing_echoes: u16,
    /// Answer MESSAGE with this status (default 200).
    pub message_status: u16,
    /// Offer and accept telephone-event (RFC 4733); without it DTMF comes as SIP INFO.
    pub telephone_event: bool,
    /// Also listen for SIP over TLS here, with this certificate chain and key (PEM files).
    pub tls: Option<(SocketAddr, std::path::PathBuf, std::path::PathBuf)>,
    /// Output.
    pub printer: EventPrinter,
}

struct CallMedia {
    sdp: SdpSession,
    local: LocalMedia,
    /// RTP packets the call's echo sent back (0 without `--echo`).
    echoed: Arc<AtomicU64>,
}

struct Buddy {
    ua: UserAgent,
    opts: BuddyOptions,
    media: Mutex<HashMap<DialogId, CallMedia>>,
    media_ip: IpAddr,
}

fn codecs(telephone_event: bool) -> Vec<Codec> {
    vec![
        Codec::pcmu(),
        Codec::pcma(),
        Codec::g722(),
        Codec::opus(111),
        Codec::telephone_event(101, 8000),
    ]
    .into_iter()
    .filter(|c| telephone_event || !c.name.eq_ignore_ascii_case("telephone-event"))
    .collect()
}

fn sdp_body(sdp: &SessionDescription) -> Option<(Bytes, MediaType)> {
    Some((Bytes::from(sdp.to_string()), MediaType::sdp()))
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::SendRecv => "sendrecv",
        Direction::SendOnly => "sendonly",
        Direction::RecvOnly => "recvonly",
        Direction::Inactive => "inactive",
    }
}

/// Runs the buddy until the process is stopped.
pub async fn run(opts: BuddyOptions) -> anyhow::Result<()> {
    let tls = match &opts.tls {
        Some((listen, chain, key)) => {
            let (chain, key) = (std::fs::read(chain)?, std::fs::read(key)?);
            Some(thalamus_sip::transport::TlsTransportConfig {
                listen: Some(*listen),
                server: Some(thalamus_sip::transport::tls::server_config(&chain, &key)?),
                // The buddy answers; it does not check whom it calls back.
                client: thalamus_sip::transport::tls::client_config(&[], false)?,
                handshake_timeout: Duration::from_secs(5),
            })
        }
        None => None,
    };
    let (ua, mut events) = UserAgent::start(UaConfig {
        transport: TransportConfig {
            udp: Some(opts.listen),
            tcp: Some(opts.listen),
            tls,
            ..Default::default()
        },
        endpoint: thalamus_sip::endpoint::EndpointConfig {
            // The buddy stands in for a carrier that takes a gateway's whole load (a thousand
            // calls back to back in the tests, hundreds a second in load runs): like SIPp, it
            // puts no per-source limit on who sends it requests.
            exempt_sources: vec![
                ipnet::IpNet::from(ipnet::Ipv4Net::default()),
                ipnet::IpNet::from(ipnet::Ipv6Net::default()),
            ],
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let media_ip = match opts.listen.ip() {
        ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    // With --echo, echo sockets outside any call: the baseline of the media benchmark
    // (`thalamus-sim echo-probe --target <echo>...`) measures the same echo with no gateway.
    let mut standing_echoes = Vec::new();
    if opts.echo {
        for _ in 0..opts.standing_echoes.max(1) {
            standing_echoes.push(SocketAddr::new(
                media_ip,
                start_echo(media_ip, None, opts.printer).await?.0,
            ));
        }
    }
    opts.printer.emit(
        "listening",
        json!({
            "sip": ua.local_addr(thalamus_sip::transport::PeerTransport::Udp).map(|a| a.to_string()),
            "tls": ua.local_addr(thalamus_sip::transport::PeerTransport::Tls).map(|a| a.to_string()),
            "echo": standing_echoes.first().map(|a| a.to_string()),
            "echo_ports": standing_echoes.iter().map(|a| a.port()).collect::<Vec<_>>(),
        }),
    );
    let buddy = Arc::new(Buddy {
        ua,
        opts,
        media: Mutex::new(HashMap::new()),
        media_ip,
    });
    while let Some(event) = events.recv().await {
        let buddy = buddy.clone();
        tokio::spawn(async move {
            if let Err(e) = buddy.handle(event).await {
                buddy
                    .opts
                    .printer
                    .emit("error", json!({"message": e.to_string()}));
            }
        });
    }
    Ok(())
}

impl Buddy {
    async fn handle(self: &Arc<Self>, event: UaEvent) -> anyhow::Result<()> {
        let p = self.opts.printer;
        match event {
            UaEvent::Request { tx, request, .. } => match request.method {
                Method::Invite => self.incoming_call(tx, request).await?,
                Method::Message => {
                    p.emit(
                        "message",
                        json!({
                            "from": request.headers.from().map(|f| f.uri.to_string()).unwrap_or_default(),
                            "content_type": request.headers.content_type().ok().flatten().map(|m| m.to_string()),
                            "body": String::from_utf8_lossy(&request.body),
                        }),
                    );
                    self.ua
                        .respond(tx, self.opts.message_status, None, None)
                        .await?;
                }
                Method::Options => {
                    self.ua
                        .respond_with_headers(
                            tx,
                            200,
                            None,
                            None,
                            vec![(HeaderName::Allow, ALLOW.to_string())],
                        )
                        .await?;
                }
                _ => {
                    self.ua
                        .respond_with_headers(
                            tx,
                            405,
                            None,
                            None,
                            vec![(HeaderName::Allow, ALLOW.to_string())],
                        )
                        .await?;
                }
            },
            UaEvent::DialogRequest {
                tx,
                dialog,
                request,
                ..
            } => match request.method {
                Method::Bye => {
                    let media = self.media.lock().await.remove(&dialog);
                    let echoed = media.map_or(0, |m| m.echoed.load(Ordering::Relaxed));
                    p.emit(
                        "bye",
                        json!({"call_id": dialog.call_id, "rtp_echoed": echoed}),
                    );
                    self.ua.respond(tx, 200, None, None).await?;
                    self.ua.remove_dialog(&dialog).await?;
                }
                Method::Invite | Method::Update => {
                    let answer = self.reanswer(&dialog, &request).await;
                    match answer {
                        Some((sdp, direction)) => {
                            p.emit(
                                "reinvite",
                                json!({"call_id": dialog.call_id, "direction": direction}),
                            );
                            self.ua.respond(tx, 200, None, sdp_body(&sdp)).await?;
                        }
                        None => {
                            self.ua.respond(tx, 488, None, None).await?;
                        }
                    }
                }
                Method::Info => {
                    let body = String::from_utf8_lossy(&request.body).to_string();
                    let digit = body
                        .lines()
                        .find_map(|l| l.strip_prefix("Signal=").map(|d| d.trim().to_string()));
                    p.emit(
                        "info",
                        json!({"call_id": dialog.call_id, "digit": digit, "body": body}),
                    );
                    self.ua.respond(tx, 200, None, None).await?;
                }
                Method::Message => {
                    p.emit(
                        "message",
                        json!({"call_id": dialog.call_id, "body": String::from_utf8_lossy(&request.body)}),
                    );
                    self.ua.respond(tx, 200, None, None).await?;
                }
                Method::Refer => {
                    let target = request
                        .headers
                        .text(&HeaderName::ReferTo)
                        .ok()
                        .flatten()
                        .and_then(|t| t.parse::<NameAddr>().ok())
                        .map(|n| n.uri);
                    match target {
                        Some(target) => {
                            self.ua.respond(tx, 202, None, None).await?;
                            p.emit(
                                "refer",
                                json!({"call_id": dialog.call_id, "target": target.to_string()}),
                            );
                            tokio::spawn(transfer(
                                self.ua.clone(),
                                dialog,
                                target,
                                self.media_ip,
                                p,
                            ));
                        }
                        None => {
                            self.ua.respond(tx, 400, Some("Bad Refer-To"), None).await?;
                        }
                    }
                }
                _ => {
                    self.ua
                        .respond_with_headers(
                            tx,
                            405,
                            None,
                            None,
                            vec![(HeaderName::Allow, ALLOW.to_string())],
                        )
                        .await?;
                }
            },
            UaEvent::UnknownDialog { tx, .. } => self.ua.reject_unknown(tx).await?,
            UaEvent::Ack { dialog, .. } => p.emit("ack", json!({"call_id": dialog.call_id})),
            UaEvent::Cancelled { .. } => p.emit("cancelled", json!({})),
            UaEvent::PrackTimeout { .. } => p.emit("prack_timeout", json!({})),
            UaEvent::AckTimeout { dialog } => {
                p.emit("ack_timeout", json!({"call_id": dialog.call_id}));
                let _ = self
                    .ua
                    .request_in_dialog(&dialog, Method::Bye, None, vec![])
                    .await;
            }
        }
        Ok(())
    }

    async fn incoming_call(
        self: &Arc<Self>,
        tx: thalamus_sip::ua::ServerTx,
        request: Request,
    ) -> anyhow::Result<()> {
        let p = self.opts.printer;
        let call_id = request.headers.call_id().unwrap_or_default().to_string();
        p.emit(
            "invite",
            json!({
                "call_id": call_id,
                "from": request.headers.from().map(|f| f.uri.to_string()).unwrap_or_default(),
                "to": request.uri.to_string(),
            }),
        );
        if let Some(status) = self.opts.reject {
            self.ua.respond(tx, status, None, None).await?;
            p.emit("rejected", json!({"call_id": call_id, "status": status}));
            return Ok(());
        }
        self.ua.respond(tx, 180, None, None).await?;
        if !self.opts.answer_after.is_zero() {
            tokio::time::sleep(self.opts.answer_after).await;
        }
        let (port, echoed) = if self.opts.echo {
            start_echo(self.media_ip, Some(ECHO_IDLE), self.opts.printer).await?
        } else {
            (40_000, Arc::new(AtomicU64::new(0)))
        };
        let local = LocalMedia::audio(self.media_ip, port, codecs(self.opts.telephone_event));
        let mut session = SdpSession::with_random_id();
        let sdp = if request.body.is_empty() {
            session.create_offer(&local)?
        } else {
            let offer = SessionDescription::from_bytes(&request.body)?;
            match session.create_answer(&offer, &local) {
                Ok(answer) => answer,
                Err(e) => {
                    p.emit(
                        "rejected",
                        json!({"call_id": call_id, "status": 488, "reason": e.to_string()}),
                    );
                    self.ua.respond(tx, 488, None, None).await?;
                    return Ok(());
                }
            }
        };
        // The INVITE may have been cancelled while ringing: then the answer is refused.
        let Ok(Some(dialog)) = self.ua.respond(tx, 200, None, sdp_body(&sdp)).await else {
            return Ok(());
        };
        p.emit("answered", json!({"call_id": call_id, "media_port": port}));
        self.media.lock().await.insert(
            dialog.clone(),
            CallMedia {
                sdp: session,
                local,
                echoed,
            },
        );
        if let Some(after) = self.opts.hangup_after {
            let buddy = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if !buddy.media.lock().await.contains_key(&dialog) {
                    return; // already ended by the other side
                }
                buddy.media.lock().await.remove(&dialog);
                buddy
                    .opts
                    .printer
                    .emit("hangup_sent", json!({"call_id": dialog.call_id}));
                if let Ok(mut bye) = buddy
                    .ua
                    .request_in_dialog(&dialog, Method::Bye, None, vec![])
                    .await
                {
                    if let thalamus_sip::ua::ClientEvent::Response { response, .. } =
                        bye.final_response().await
                    {
                        buddy.opts.printer.emit(
                            "bye_answered",
                            json!({"call_id": dialog.call_id, "status": response.status}),
                        );
                    }
                }
                let _ = buddy.ua.remove_dialog(&dialog).await;
            });
        }
        Ok(())
    }

    async fn reanswer(
        &self,
        dialog: &DialogId,
        request: &Request,
    ) -> Option<(SessionDescription, &'static str)> {
        let offer = SessionDescription::from_bytes(&request.body).ok()?;
        let mut media = self.media.lock().await;
        let call = media.get_mut(dialog)?;
        let remote_direction = offer.media_direction(0).unwrap_or(Direction::SendRecv);
        let answer = call.sdp.create_answer(&offer, &call.local).ok()?;
        Some((answer, direction_name(remote_direction)))
    }
}

const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, MESSAGE, UPDATE, REFER";

/// How long a call's echo socket lives without packets (the call is long over by then).
const ECHO_IDLE: Duration = Duration::from_secs(60);

/// The RTP timestamp and digit of an RFC 4733 end packet (payload type 101, as the buddy offers
/// and answers telephone-event), or `None` for any other packet.
/// The transferee's side of a blind transfer (RFC 3515): reports "100 Trying" in a NOTIFY,
/// calls `target` (a short call: answered, it is hung up a second later), then reports the
/// call's final status in a last NOTIFY that ends the implicit subscription.
async fn transfer(ua: UserAgent, dialog: DialogId, target: Uri, media_ip: IpAddr, p: EventPrinter) {
    notify_refer(&ua, &dialog, "SIP/2.0 100 Trying", "active;expires=60").await;
    let (status, reason) = match call_transfer_target(&ua, &target, media_ip).await {
        Ok(answer) => answer,
        Err(e) => (503, format!("Service Unavailable ({e})")),
    };
    notify_refer(
        &ua,
        &dialog,
        &format!("SIP/2.0 {status} {reason}"),
        "terminated;reason=noresource",
    )
    .await;
    p.emit(
        "transfer_done",
        json!({"call_id": dialog.call_id, "target": target.to_string(), "status": status}),
    );
}

async fn notify_refer(ua: &UserAgent, dialog: &DialogId, sipfrag: &str, state: &str) {
    let headers = vec![
        (HeaderName::Event, "refer".to_string()),
        (HeaderName::SubscriptionState, state.to_string()),
    ];
    let body = Some((
        Bytes::from(format!("{sipfrag}\r\n")),
        MediaType::new("message", "sipfrag"),
    ));
    match ua
        .request_in_dialog(dialog, Method::Notify, body, headers)
        .await
    {
        Ok(mut call) => {
            let _ = call.final_response().await;
        }
        Err(e) => tracing::debug!(error = %e, "NOTIFY not sent"),
    }
}

/// Calls `target` for a transfer: its final status and reason; an answered call is hung up a
/// second later.
async fn call_transfer_target(
    ua: &UserAgent,
    target: &Uri,
    media_ip: IpAddr,
) -> anyhow::Result<(u16, String)> {
    let from: NameAddr = "<sip:buddy@thalamus-sim.invalid>".parse()?;
    let mut invite = ua.new_request(
        Method::Invite,
        target.clone(),
        from,
        NameAddr::new(target.clone()),
    );
    invite
        .headers
        .push_contact(&ua.contact(Some("buddy"), thalamus_sip::transport::PeerTransport::Udp));
    let offer = SdpSession::with_random_id().create_offer(&LocalMedia::audio(
        media_ip,
        40_000,
        codecs(true),
    ))?;
    invite.set_body(Bytes::from(offer.to_string()), Some(&MediaType::sdp()));
    let mut call = ua.send_with_auth(invite, None, None).await?;
    loop {
        match call.events.recv().await {
            Some(ClientEvent::Response { response, dialog }) if response.is_success() => {
                let dialog = dialog.ok_or_else(|| anyhow::anyhow!("2xx without a dialog"))?;
                ua.ack(&dialog, None).await?;
                let ua = ua.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Ok(mut bye) = ua
                        .request_in_dialog(&dialog, Method::Bye, None, vec![])
                        .await
                    {
                        let _ = bye.final_response().await;
                    }
                    let _ = ua.remove_dialog(&dialog).await;
                });
                return Ok((response.status, response.reason.clone()));
            }
            Some(ClientEvent::Response { response, .. }) if response.status >= 300 => {
                return Ok((response.status, response.reason.clone()));
            }
            Some(ClientEvent::Response { .. }) => {}
            Some(ClientEvent::Timeout) => return Ok((408, "Request Timeout".into())),
            Some(ClientEvent::TransportError) | None => {
                anyhow::bail!("transport error")
            }
        }
    }
}

fn telephone_event_end(packet: &[u8]) -> Option<(u32, &'static str)> {
    const DIGITS: [&str; 16] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "#", "A", "B", "C", "D",
    ];
    let first = *packet.first()?;
    if first >> 6 != 2 || packet.get(1)? & 0x7f != 101 {
        return None;
    }
    let offset = 12 + 4 * usize::from(first & 0x0f);
    let offset = if first & 0x10 != 0 {
        let words = u16::from_be_bytes([*packet.get(offset + 2)?, *packet.get(offset + 3)?]);
        offset + 4 + 4 * usize::from(words)
    } else {
        offset
    };
    let event = *packet.get(offset)?;
    let end = packet.get(offset + 1)? & 0x80 != 0;
    let ts = u32::from_be_bytes([
        *packet.get(4)?,
        *packet.get(5)?,
        *packet.get(6)?,
        *packet.get(7)?,
    ]);
    if !end {
        return None;
    }
    DIGITS.get(usize::from(event)).map(|d| (ts, *d))
}

/// Binds an RTP port that sends every packet back to its source; returns the port and the
/// count of packets sent back. The echo ends after `idle` without packets (never when `None`).
async fn start_echo(
    ip: IpAddr,
    idle: Option<Duration>,
    printer: EventPrinter,
) -> anyhow::Result<(u16, Arc<AtomicU64>)> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    let port = socket.local_addr()?.port();
    let echoed = Arc::new(AtomicU64::new(0));
    let count = echoed.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut last_event: Option<u32> = None;
        loop {
            let received = match idle {
                Some(idle) => match tokio::time::timeout(idle, socket.recv_from(&mut buf)).await {
                    Ok(received) => received,
                    Err(_) => break,
                },
                None => socket.recv_from(&mut buf).await,
            };
            let Ok((n, from)) = received else { break };
            if let Some(packet) = buf.get(..n) {
                if let Some((timestamp, digit)) = telephone_event_end(packet) {
                    if last_event.replace(timestamp) != Some(timestamp) {
                        printer.emit("dtmf", json!({"digit": digit, "source": from.to_string()}));
                    }
                }
                if socket.send_to(packet, from).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok((port, echoed))
}
