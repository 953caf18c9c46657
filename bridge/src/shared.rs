//! What every part of the bridge works with ([`BridgeInner`]): the user agent, the
//! settings, the device sessions and links, the media engine, the store and the replicator,
//! and the tables of calls (by call, by dialog, by incoming INVITE, by device, watched), with
//! the small operations on them (send a frame to a device, wait for a device to arrive, the
//! device's address-of-record and credentials, resolve a dial target, add and forget a call).
//!
//! It holds no call logic (`crate::call` does) and starts nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use thalamus_dialog_store::replicator::Replicator;
use thalamus_dialog_store::{DialogKey, DialogStore, StoredDialog};
use thalamus_ingress::registry::DeviceRegistry;
use thalamus_ingress::{DeviceLink, SessionCommand, Sessions};
use thalamus_media::MediaEngine;
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::Envelope;
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{NameAddr, Uri};
use thalamus_sip::ua::{DigestAuth, ServerTx, UserAgent};
use thalamus_telemetry::inc;
use tracing::warn;

use crate::call::core::CallKey;
use crate::config::BridgeConfig;
use crate::metrics::BridgeMetrics;
use crate::registrar;
use crate::table::CallHandle;

pub(crate) struct BridgeInner {
    pub(crate) ua: UserAgent,
    pub(crate) config: BridgeConfig,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) registry: Arc<DeviceRegistry>,
    pub(crate) media: Option<MediaEngine>,
    pub(crate) media_address: IpAddr,
    pub(crate) links: DashMap<String, DeviceLink>,
    pub(crate) calls: DashMap<CallKey, CallHandle>,
    /// Number of entries of `calls` per device (kept with `calls` by `add_call` and
    /// `forget_call`), so limits and redirects do not scan every call of the node.
    pub(crate) calls_per_device: DashMap<String, usize>,
    pub(crate) by_dialog: DashMap<DialogId, CallKey>,
    /// SIP watchers of devices' presence.
    pub(crate) watchers: crate::presence::Watchers,
    /// Devices' watches of SIP buddies, by (device, buddy URI).
    pub(crate) buddy_watches: DashMap<(String, String), crate::table::WatchHandle>,
    /// The watches' subscription dialogs.
    pub(crate) watch_dialogs: DashMap<DialogId, crate::table::WatchHandle>,
    /// The watches by the Call-ID and From tag of their first SUBSCRIBE, from before it is
    /// sent: a NOTIFY may come before the 2xx, or before the watch has its dialog registered.
    pub(crate) watch_ids: DashMap<(String, String), crate::table::WatchHandle>,
    pub(crate) by_invite: DashMap<ServerTx, CallKey>,
    /// Requests outside a dialog being handled, by merge key, with their branch.
    pub(crate) in_progress: DashMap<(String, String, u32), String>,
    pub(crate) next_incoming_ref: AtomicU32,
    pub(crate) metrics: BridgeMetrics,
    pub(crate) registrar: Option<registrar::Registrar>,
    pub(crate) store: Option<Arc<dyn DialogStore>>,
    pub(crate) replicator: Option<Arc<Replicator>>,
    pub(crate) fence: Option<thalamus_ownership::SharedFence>,
    /// Where finished calls' records go (none: no call records).
    pub(crate) records: Option<Arc<dyn thalamus_cdr::CallRecords>>,
    /// Who may reach a device (replaced whole by a configuration reload).
    pub(crate) inbound: std::sync::RwLock<Arc<crate::inbound::InboundPolicy>>,
    /// Per-device settings (address books, credentials): `config.devices` at start, replaced
    /// whole by a configuration reload.
    pub(crate) devices: std::sync::RwLock<Arc<BTreeMap<String, crate::config::DeviceSettings>>>,
    /// While set, incoming INVITEs are answered 503 with Retry-After (a node draining with no
    /// balancer to steer calls away).
    pub(crate) refuse_invites: std::sync::atomic::AtomicBool,
    /// While set, a device's `Dial` gets an MBFP `Busy` error (a draining node: the device
    /// places its call from the node it moves to).
    pub(crate) refuse_dials: std::sync::atomic::AtomicBool,
    /// Takeovers in progress, one lock per dialog (so one request, resume or API call claims
    /// and imports it, and the others find it held).
    pub(crate) takeovers: DashMap<DialogKey, Arc<tokio::sync::Mutex<()>>>,
    /// Store lookups of CANCELs for INVITEs not held here, in flight (at most
    /// [`crate::takeover::MAX_CANCEL_LOOKUPS`]; a CANCEL beyond them is answered 481 at once).
    pub(crate) cancel_lookups: Arc<tokio::sync::Semaphore>,
    /// Calls of devices that resumed here, still held by a node whose lease runs: listed in
    /// `live_calls`, claimed when the lease lapses or at the first request from either side.
    pub(crate) watched: DashMap<CallKey, StoredDialog>,
    /// The subscription records `resume` found for a device, for its `online` to claim
    /// without listing them again (taken at once: one entry per device resuming now).
    pub(crate) resumed_subscriptions: DashMap<String, Vec<StoredDialog>>,
    /// Woken whenever a device logs in here (requests waiting for their device).
    pub(crate) arrivals: tokio::sync::Notify,
    /// Requests waiting for their device now.
    pub(crate) arrival_waits: AtomicUsize,
    /// Incoming calls ringing per device (their INVITE not yet answered finally).
    pub(crate) ringing_per_device: DashMap<String, usize>,
    /// The incoming calls ringing now.
    pub(crate) ringing_calls: dashmap::DashSet<CallKey>,
    /// Texts received per device (SIP MESSAGE).
    pub(crate) texts_in: crate::limits::DeviceRates,
    /// Texts sent per device (`SendText`).
    pub(crate) texts_out: crate::limits::DeviceRates,
}

/// Most requests waiting for their device at once (`session.arrival_wait_ms`).
pub const MAX_ARRIVAL_WAITS: usize = 4096;

struct ArrivalWaitGuard<'a>(&'a AtomicUsize);

impl Drop for ArrivalWaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BridgeInner {
    /// Sends a frame to a device if it is online (dropped otherwise: it will see its calls'
    /// state when it resumes).
    pub(crate) fn to_device(&self, device: &str, request_id: u64, body: Body) -> bool {
        let Some(session) = self.sessions.get(device) else {
            return false;
        };
        let env = Envelope {
            request_id,
            body: Some(body),
        };
        if session
            .commands
            .try_send(SessionCommand::Send(Box::new(env)))
            .is_err()
        {
            warn!(device, "session command queue full; frame dropped");
            return false;
        }
        true
    }

    pub(crate) fn device_online(&self, device: &str) -> bool {
        self.sessions.get(device).is_some()
    }

    /// Whether `device` is online, waiting up to `session.arrival_wait_ms` for it to log in
    /// when it is not (a device moving here from a draining or dead node, or reconnecting).
    /// At most [`MAX_ARRIVAL_WAITS`] requests wait at once; others do not wait.
    pub(crate) async fn wait_for_arrival(&self, device: &str) -> bool {
        if self.device_online(device) {
            return true;
        }
        let wait = self.config.arrival_wait;
        if wait.is_zero() {
            return false;
        }
        let waiting = self.arrival_waits.fetch_add(1, Ordering::Relaxed);
        let _guard = ArrivalWaitGuard(&self.arrival_waits);
        if waiting >= MAX_ARRIVAL_WAITS {
            inc(&self.metrics.arrival_waits, "refused");
            return false;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrivals.notified();
            tokio::pin!(arrived);
            // Registered before the check, so an arrival between the two is not missed.
            arrived.as_mut().enable();
            if self.device_online(device) {
                inc(&self.metrics.arrival_waits, "arrived");
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                inc(&self.metrics.arrival_waits, "timeout");
                return false;
            }
        }
    }

    /// The device's address-of-record, `sip:<device>@<domain>`.
    pub(crate) fn aor(&self, device: &str) -> NameAddr {
        let host =
            thalamus_sip::message::Host::parse(&self.config.sip_domain).unwrap_or_else(|_| {
                thalamus_sip::message::Host::Domain(self.config.sip_domain.clone())
            });
        NameAddr::new(Uri::Sip(
            thalamus_sip::message::SipUri::new(host).with_user(device),
        ))
    }

    /// Digest credentials for requests on behalf of `device`, scoped to the realms and hosts
    /// they are for (by default the outbound proxy's and the registrar's hosts; with neither,
    /// none are sent).
    pub(crate) fn credentials(&self, device: &str) -> Option<DigestAuth> {
        let a = self
            .device_settings()
            .get(device)
            .and_then(|d| d.auth.clone())
            .or_else(|| self.config.credentials.clone())?;
        let hosts = if a.hosts.is_empty() {
            self.config.trunk_hosts.clone()
        } else {
            a.hosts
        };
        if hosts.is_empty() {
            return None;
        }
        Some(DigestAuth {
            username: a.username,
            password: a.password,
            realms: a.realms,
            hosts,
            allow_md5_without_qop: a.allow_md5_without_qop,
        })
    }

    /// The per-device settings now (a reload replaces them whole).
    pub(crate) fn device_settings(&self) -> Arc<BTreeMap<String, crate::config::DeviceSettings>> {
        match self.devices.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The inbound policy now (a reload replaces it whole).
    pub(crate) fn inbound_policy(&self) -> Arc<crate::inbound::InboundPolicy> {
        match self.inbound.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Resolves a Dial/SendText target: an alias of the device's address book, or a URI. A bare
    /// user name or number becomes a URI in the gateway's domain (or the outbound proxy's).
    pub(crate) fn target_uri(&self, device: &str, target: &str) -> Result<Uri, String> {
        let target = target.trim();
        if let Some(uri) = self
            .device_settings()
            .get(device)
            .and_then(|d| d.address_book.get(target))
        {
            return Uri::parse(uri).map_err(|e| format!("address book entry {target}: {e}"));
        }
        if target.contains(':') {
            return Uri::parse(target).map_err(|e| format!("{target}: {e}"));
        }
        if target.is_empty() || target.contains(['@', ' ', '<', '>']) {
            return Err(format!(
                "{target:?} is neither a URI nor an address book alias"
            ));
        }
        Uri::parse(&format!("sip:{target}@{}", self.config.sip_domain))
            .map_err(|e| format!("{target}: {e}"))
    }

    /// The Refer-To target of an attended transfer of `device`'s call `call_ref` in place of
    /// its call `replaces`: the remote party of `replaces` with a Replaces header naming that
    /// call's dialog (RFC 3891). The other call must be answered, here.
    pub(crate) fn replacing_target(
        &self,
        device: &str,
        call_ref: u32,
        replaces: u32,
    ) -> Result<String, String> {
        if replaces == call_ref {
            return Err("a call cannot replace itself".to_string());
        }
        let other = self
            .calls
            .get(&(device.to_string(), replaces))
            .filter(|c| c.is_answered())
            .map(|c| (c.dialog(), c.remote_uri()));
        match other {
            Some((Some(dialog), remote)) => replaces_target(&remote, &dialog),
            _ => Err(format!(
                "no answered call with call_ref {replaces} on this node to replace"
            )),
        }
    }

    /// Records a new call (and counts it for its device).
    pub(crate) fn add_call(&self, key: CallKey, handle: CallHandle) {
        let device = key.0.clone();
        if self.calls.insert(key, handle).is_none() {
            *self.calls_per_device.entry(device).or_insert(0) += 1;
        }
    }

    /// Calls `device` has on this node.
    pub(crate) fn device_call_count(&self, device: &str) -> usize {
        self.calls_per_device.get(device).map_or(0, |n| *n)
    }

    /// Incoming calls ringing at `device` on this node.
    pub(crate) fn ringing_count(&self, device: &str) -> usize {
        self.ringing_per_device.get(device).map_or(0, |n| *n)
    }

    /// Calls of `device` that count against `max_calls`: all but those ringing.
    pub(crate) fn busy_count(&self, device: &str) -> usize {
        self.device_call_count(device)
            .saturating_sub(self.ringing_count(device))
    }

    pub(crate) fn forget_call(&self, key: &CallKey) {
        if let Some((_, handle)) = self.calls.remove(key) {
            if let Some(d) = handle.dialog() {
                self.by_dialog.remove(&d);
            }
            self.metrics.calls_active.dec();
            self.calls_per_device.remove_if_mut(&key.0, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }
}

/// Forgets a request's merge key, and stops counting its call as ringing, when its handling
/// ends.
pub struct InProgress {
    pub(crate) inner: Arc<BridgeInner>,
    pub(crate) key: Option<(String, String, u32)>,
    /// The call this INVITE rings (counted in `ringing_per_device` and `ringing_calls`).
    pub(crate) ringing: Option<CallKey>,
}

impl InProgress {
    /// Counts this INVITE's call as ringing at its device until it is dropped.
    pub(crate) fn ring(&mut self, key: &CallKey) {
        *self
            .inner
            .ringing_per_device
            .entry(key.0.clone())
            .or_insert(0) += 1;
        self.inner.ringing_calls.insert(key.clone());
        self.ringing = Some(key.clone());
    }
}

impl std::fmt::Debug for InProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProgress")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.inner.in_progress.remove(key);
        }
        if let Some(key) = &self.ringing {
            self.inner.ringing_calls.remove(key);
            self.inner.ringing_per_device.remove_if_mut(&key.0, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }
}

/// `remote` (a SIP URI) with a Replaces header naming `dialog` from its peer's side: where the
/// transferee of an attended transfer is sent, to take that dialog's place (RFC 3891 section
/// 6.1). URI headers `remote` had are dropped.
pub(crate) fn replaces_target(remote: &str, dialog: &DialogId) -> Result<String, String> {
    let mut uri =
        Uri::parse(remote).map_err(|e| format!("the other call's party {remote}: {e}"))?;
    let sip = uri
        .as_sip_mut()
        .ok_or_else(|| format!("the other call's party {remote} is not a SIP URI"))?;
    sip.headers = vec![thalamus_sip::message::UriHeader::escaped(
        "Replaces",
        &dialog.replaces(),
    )];
    Ok(uri.to_string())
}

#[cfg(test)]
mod replaces_tests {
    use super::*;

    #[test]
    fn the_target_names_the_other_party_and_its_dialog_escaped() {
        let dialog = DialogId::new("7f3a@10.0.0.1", "gw-tag", "peer-tag");
        assert_eq!(
            replaces_target("sip:bob@example.org:5070?Subject=x", &dialog).unwrap(),
            "sip:bob@example.org:5070?Replaces=7f3a%4010.0.0.1%3Bto-tag%3Dpeer-tag%3Bfrom-tag%3Dgw-tag"
        );
        assert!(replaces_target("tel:+15551234", &dialog).is_err());
        assert!(replaces_target("", &dialog).is_err());
    }
}
