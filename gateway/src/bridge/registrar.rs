//! Upstream registration: while a device is online, the gateway registers the device's
//! address-of-record with an upstream registrar (REGISTER with a Contact pointing at the
//! gateway's advertised SIP address, digest challenges answered), refreshes it before it
//! expires, and removes it (Expires: 0) when the device goes away.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use thalamus_sip::message::{CSeq, HeaderName, Method, NameAddr, Uri};
use thalamus_sip::transport::PeerTransport;
use thalamus_sip::ua::{ClientEvent, UserAgent};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{Config, RegistrarConfig};

/// Digest credentials (user name, password) of one device, if it has any.
type Credentials = Option<(String, String)>;

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
    pub fn new(ua: UserAgent, config: RegistrarConfig, gateway: Config) -> Self {
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
            .unwrap_or(gateway.sip.domain);
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
    pub fn device_online(&self, device: &str, credentials: Option<(String, String)>) {
        let inner = self.inner.clone();
        let name = device.to_string();
        let refresh_credentials = credentials.clone();
        let task = tokio::spawn(async move {
            loop {
                let granted = inner
                    .register(
                        &name,
                        inner.config.expires_secs,
                        refresh_credentials.clone(),
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
            let device = device.to_string();
            // The removal is challenged like any REGISTER: it carries the same credentials.
            tokio::spawn(async move {
                inner.register(&device, 0, credentials).await;
            });
        }
    }
}

impl Inner {
    /// One REGISTER; returns the granted lifetime on a 2xx.
    async fn register(
        &self,
        device: &str,
        expires: u32,
        credentials: Option<(String, String)>,
    ) -> Option<u32> {
        let uri = self.registrar_uri.clone()?;
        let aor: NameAddr = format!("<sip:{device}@{}>", self.domain).parse().ok()?;
        let mut request = self.ua.new_request(Method::Register, uri, aor.clone(), aor);
        // One Call-ID per device, CSeq increasing across refreshes (RFC 3261 10.2).
        let (call_id, cseq) = {
            let mut entry = self
                .call_ids
                .entry(device.to_string())
                .or_insert_with(|| (thalamus_sip::message::generate_call_id(None), 0));
            entry.1 += 10;
            entry.clone()
        };
        request.headers.set_call_id(&call_id);
        request.headers.set_cseq(&CSeq::new(cseq, Method::Register));
        request
            .headers
            .push_contact(&self.ua.contact(Some(device), PeerTransport::Udp));
        request.headers.set_expires(expires);
        let mut call = match self.ua.send_with_auth(request, None, credentials).await {
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
