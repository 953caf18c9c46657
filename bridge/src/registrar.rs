//! Upstream registration: while a device is online, the gateway registers the device's
//! address-of-record with an upstream registrar (REGISTER with a Contact pointing at the
//! gateway's advertised SIP address, digest challenges answered), refreshes it before it
//! expires, and removes it (Expires: 0) when the device goes away.
//!
//! Every REGISTER of a device uses one Call-ID and a CSeq taken when the gateway decides to
//! send it (not when its task runs), so a removal for a session that ended always has a lower
//! CSeq than the registration of the session that followed: a registrar that receives them out
//! of order keeps the binding (RFC 3261 10.3, step 7).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use thalamus_sip::message::{CSeq, HeaderName, Method, NameAddr, Uri};
use thalamus_sip::ua::{ClientEvent, DigestAuth, UserAgent};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::RegistrarConfig;

/// Digest credentials of one device, if it has any.
type Credentials = Option<DigestAuth>;

/// Registers online devices upstream.
#[derive(Clone)]
pub struct Registrar {
    inner: Arc<Inner>,
}

struct Inner {
    ua: UserAgent,
    config: RegistrarConfig,
    registrar_uri: Option<Uri>,
    domain: String,
    /// Each registered device's refresh task and its credentials (for the removal).
    tasks: DashMap<String, (JoinHandle<()>, Credentials)>,
    call_ids: DashMap<String, (String, u32)>,
}

impl Registrar {
    /// A registrar client for `config` on `ua`.
    pub fn new(ua: UserAgent, config: RegistrarConfig, sip_domain: &str) -> Self {
        let registrar_uri = Uri::parse(&config.uri).ok();
        if registrar_uri.is_none() {
            warn!(uri = %config.uri, "sip.registrar.uri is not a URI: devices are not registered upstream");
        }
        let domain = config
            .domain
            .clone()
            .or_else(|| {
                registrar_uri
                    .as_ref()
                    .and_then(|u| u.host().map(|h| h.to_string()))
            })
            .unwrap_or_else(|| sip_domain.to_string());
        Registrar {
            inner: Arc::new(Inner {
                ua,
                config,
                registrar_uri,
                domain,
                tasks: DashMap::new(),
                call_ids: DashMap::new(),
            }),
        }
    }

    /// The address-of-record registered for `device`.
    pub fn aor(&self, device: &str) -> String {
        format!("sip:{device}@{}", self.inner.domain)
    }

    /// Starts (or restarts) registering `device`.
    pub fn device_online(&self, device: &str, credentials: Option<DigestAuth>) {
        let inner = self.inner.clone();
        let name = device.to_string();
        let refresh_credentials = credentials.clone();
        let mut sequence = Some(self.inner.next_sequence(device));
        let task = tokio::spawn(async move {
            loop {
                let seq = sequence
                    .take()
                    .unwrap_or_else(|| inner.next_sequence(&name));
                let granted = inner
                    .register(
                        &name,
                        inner.config.expires_secs,
                        refresh_credentials.clone(),
                        seq,
                    )
                    .await;
                let wait = match granted {
                    Some(secs) if secs > 0 => {
                        info!(device = %name, expires = secs, "registered upstream");
                        Duration::from_secs(u64::from(secs) * 4 / 5)
                    }
                    _ => Duration::from_secs(30),
                };
                tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
            }
        });
        if let Some((old, _)) = self
            .inner
            .tasks
            .insert(device.to_string(), (task, credentials))
        {
            old.abort();
        }
    }

    /// Stops refreshing `device` and removes its binding.
    pub fn device_offline(&self, device: &str) {
        if let Some((_, (task, credentials))) = self.inner.tasks.remove(device) {
            task.abort();
            let inner = self.inner.clone();
            let seq = inner.next_sequence(device);
            let device = device.to_string();
            // The removal is challenged like any REGISTER: it carries the same credentials.
            tokio::spawn(async move {
                inner.register(&device, 0, credentials, seq).await;
            });
        }
    }
}

impl Inner {
    /// The Call-ID and the next CSeq for `device`'s next REGISTER. One Call-ID per device, the
    /// CSeq going up by 10 per REGISTER (room for the authenticated retries, RFC 3261 10.2).
    fn next_sequence(&self, device: &str) -> (String, u32) {
        let mut entry = self
            .call_ids
            .entry(device.to_string())
            .or_insert_with(|| (thalamus_sip::message::generate_call_id(None), 0));
        entry.1 = entry.1.saturating_add(10);
        entry.clone()
    }

    /// One REGISTER with the Call-ID and CSeq `sequence`; returns the granted lifetime on a 2xx.
    async fn register(
        &self,
        device: &str,
        expires: u32,
        credentials: Option<DigestAuth>,
        sequence: (String, u32),
    ) -> Option<u32> {
        let uri = self.registrar_uri.clone()?;
        let aor: NameAddr = format!("<sip:{device}@{}>", self.domain).parse().ok()?;
        let mut request = self.ua.new_request(Method::Register, uri, aor.clone(), aor);
        let (call_id, cseq) = sequence;
        request.headers.set_call_id(&call_id);
        request.headers.set_cseq(&CSeq::new(cseq, Method::Register));
        let (contact, destination) = self.ua.contact_for(Some(device), &request).await;
        request.headers.push_contact(&contact);
        request.headers.set_expires(expires);
        let mut call = match self
            .ua
            .send_with_auth(request, destination, credentials)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(device, error = %e, "REGISTER not sent");
                return None;
            }
        };
        match call.final_response().await {
            ClientEvent::Response { response, .. } if response.is_success() => {
                let from_contact = response.headers.contact().ok().and_then(|contacts| {
                    contacts.iter().find_map(|c| match c {
                        thalamus_sip::message::Contact::Address(a) => a.expires(),
                        thalamus_sip::message::Contact::Wildcard => None,
                    })
                });
                Some(
                    from_contact
                        .or_else(|| response.headers.expires().ok().flatten())
                        .unwrap_or(expires),
                )
            }
            ClientEvent::Response { response, .. } => {
                warn!(device, status = response.status, "REGISTER refused");
                let _ = response.headers.get(&HeaderName::Warning);
                None
            }
            other => {
                debug!(device, ?other, "REGISTER failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use thalamus_sip::message::{Message, Request, Response};
    use thalamus_sip::transport::TransportConfig;
    use thalamus_sip::ua::UaConfig;
    use tokio::net::UdpSocket;

    /// Receives one REGISTER, answers 200 and returns it.
    async fn answer_one(registrar: &UdpSocket) -> Request {
        let mut buf = vec![0u8; 65_535];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), registrar.recv_from(&mut buf))
            .await
            .expect("a REGISTER in time")
            .unwrap();
        let Message::Request(req) = Message::parse(Bytes::copy_from_slice(&buf[..n])).unwrap()
        else {
            panic!("not a request")
        };
        let ok = Response::from_request(&req, 200, None);
        registrar.send_to(&ok.to_bytes(), from).await.unwrap();
        req
    }

    fn cseq_and_expires(req: &Request) -> (u32, u32) {
        (
            req.headers.cseq().unwrap().seq,
            req.headers.expires().unwrap().unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removal_always_has_a_lower_cseq_than_the_registration_after_it() {
        let registrar = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (ua, _events) = UserAgent::start(UaConfig {
            transport: TransportConfig {
                udp: Some("127.0.0.1:0".parse().unwrap()),
                tcp: None,
                ..Default::default()
            },
            resolver: thalamus_sip::resolve::Resolver::fixed(),
            ..Default::default()
        })
        .await
        .unwrap();
        let config = RegistrarConfig {
            uri: format!("sip:{}", registrar.local_addr().unwrap()),
            domain: Some("gw.example.net".into()),
            expires_secs: 600,
        };
        let r = Registrar::new(ua, config, "thalamus.local");
        let taken = |r: &Registrar| r.inner.call_ids.get("dev").map_or(0, |e| e.1);

        r.device_online("dev", None);
        let first = answer_one(&registrar).await;
        assert_eq!(cseq_and_expires(&first).1, 600);
        // A quick re-login: the session ends and the next one starts at once. Each CSeq is
        // taken before the call returns, in call order, whatever order the tasks run in.
        let before = taken(&r);
        r.device_offline("dev");
        let removal_seq = taken(&r);
        assert!(removal_seq > before);
        r.device_online("dev", None);
        assert!(taken(&r) > removal_seq);
        let (a, b) = (answer_one(&registrar).await, answer_one(&registrar).await);
        let mut seen = [cseq_and_expires(&a), cseq_and_expires(&b)];
        seen.sort();
        let (low, high) = (seen[0], seen[1]);
        assert_eq!(low.1, 0, "the removal is the lower CSeq: {seen:?}");
        assert_eq!(high.1, 600, "{seen:?}");
        assert_eq!(low.0, removal_seq);
        assert_eq!(
            a.headers.call_id().unwrap(),
            b.headers.call_id().unwrap(),
            "one Call-ID per device"
        );
    }
}
