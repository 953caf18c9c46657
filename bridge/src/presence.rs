//! Presence of devices for SIP watchers (RFC 3856 over RFC 6665, PIDF bodies of RFC 3863),
//! sans-IO: the subscription table with its limits and expiry, what a device's presence is
//! (online, in a call, what it set itself), and the PIDF document that says it.
//!
//! [`Subscriptions`] is fed SUBSCRIBEs (admitted against the limits, per device, per watcher
//! address and in total, and the interval bounds), refreshes, removals and timestamps; it says
//! what to answer and which subscriptions expired. [`DevicePresence`] renders as PIDF.
//!
//! It does not send NOTIFYs, read a clock or know dialogs beyond their ids: the bridge's shell
//! does (`crate::watchers`); `Watchers` holds this node's table and what devices set.
//! Subscriptions belong to the node that holds the device (they are replicated to the dialog
//! store by the shell, and follow the device: see `crate::watchers`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use thalamus_proto::v1::PresenceState;
use thalamus_sip::dialog::DialogId;

/// Limits and intervals of presence subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// Subscriptions to one device at once.
    pub max_per_device: usize,
    /// Subscriptions from one watcher address at once.
    pub max_per_watcher: usize,
    /// Subscriptions on the node at once.
    pub max_total: usize,
    /// Shortest interval accepted (shorter: 423 with Min-Expires).
    pub min_expires: u32,
    /// Longest interval granted (longer is lowered to it); also the default.
    pub max_expires: u32,
    /// Buddies one device watches at once (its `Watch`es over it: `LIMIT_EXCEEDED`).
    pub watches_per_device: usize,
    /// Watches of buddies on the node at once.
    pub watches_total: usize,
    /// Seconds a watch's SUBSCRIBE asks for when the device names none (a device's own ask is
    /// kept within `min_expires`..`max_expires`).
    pub watch_expires: u32,
    /// End a device's subscriptions with `terminated;reason=deactivated` when it leaves this
    /// node for longer than its grace period, so its watchers subscribe again at the node it
    /// reached (on in a cluster, where a device moves between live nodes).
    pub deactivate_departed: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            max_per_device: 32,
            max_per_watcher: 64,
            max_total: 10_000,
            min_expires: 60,
            max_expires: 3600,
            watches_per_device: 32,
            watches_total: 10_000,
            watch_expires: 600,
            deactivate_departed: false,
        }
    }
}

/// What to answer a SUBSCRIBE (or a refresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// 200 with this Expires (0: a fetch or an unsubscribe: one NOTIFY that ends it).
    Accept {
        /// Seconds granted.
        expires: u32,
    },
    /// 423 Interval Too Brief, with Min-Expires.
    TooBrief {
        /// The shortest interval accepted.
        min_expires: u32,
    },
    /// A limit is reached: 503 (Retry-After), counted under this label.
    Limit(&'static str),
}

#[derive(Debug, Clone)]
struct Subscription {
    device: String,
    watcher: IpAddr,
    expires_at: Instant,
}

/// The subscriptions of this node, by dialog.
#[derive(Debug, Default)]
pub struct Subscriptions {
    config: PresenceConfig,
    by_dialog: HashMap<DialogId, Subscription>,
    per_device: HashMap<String, usize>,
    per_watcher: HashMap<IpAddr, usize>,
}

impl Subscriptions {
    /// An empty table with `config`.
    pub fn new(config: PresenceConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Subscriptions held now.
    pub fn len(&self) -> usize {
        self.by_dialog.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.by_dialog.is_empty()
    }

    /// Whether anyone watches `device` (a lookup, not a scan: asked on every call's start and
    /// end).
    pub fn watched(&self, device: &str) -> bool {
        self.per_device.contains_key(device)
    }

    /// Whether `dialog` is a subscription here.
    pub fn contains(&self, dialog: &DialogId) -> bool {
        self.by_dialog.contains_key(dialog)
    }

    fn interval(&self, asked: Option<u32>) -> Result<u32, Admit> {
        let asked = asked.unwrap_or(self.config.max_expires);
        if asked != 0 && asked < self.config.min_expires {
            return Err(Admit::TooBrief {
                min_expires: self.config.min_expires,
            });
        }
        Ok(asked.min(self.config.max_expires))
    }

    /// A new SUBSCRIBE from `watcher` to `device` asking for `asked` seconds (absent: the
    /// default): checked against the interval bounds and the limits. A fetch (`Expires: 0`)
    /// takes no place.
    pub fn admit(&self, device: &str, watcher: IpAddr, asked: Option<u32>) -> Admit {
        let expires = match self.interval(asked) {
            Ok(e) => e,
            Err(refused) => return refused,
        };
        if expires == 0 {
            return Admit::Accept { expires };
        }
        if self.by_dialog.len() >= self.config.max_total {
            return Admit::Limit("total");
        }
        if self.per_device.get(device).copied().unwrap_or(0) >= self.config.max_per_device {
            return Admit::Limit("per_device");
        }
        if self.per_watcher.get(&watcher).copied().unwrap_or(0) >= self.config.max_per_watcher {
            return Admit::Limit("per_watcher");
        }
        Admit::Accept { expires }
    }

    /// Records the subscription admitted as `dialog` at `now` for `expires` seconds.
    pub fn insert(
        &mut self,
        dialog: DialogId,
        device: &str,
        watcher: IpAddr,
        now: Instant,
        expires: u32,
    ) {
        if expires == 0 {
            return;
        }
        self.remove(&dialog);
        *self.per_device.entry(device.to_string()).or_default() += 1;
        *self.per_watcher.entry(watcher).or_default() += 1;
        self.by_dialog.insert(
            dialog,
            Subscription {
                device: device.to_string(),
                watcher,
                expires_at: now + Duration::from_secs(u64::from(expires)),
            },
        );
    }

    /// A SUBSCRIBE in `dialog` (a refresh, or `Expires: 0`: an unsubscribe, which removes it):
    /// what to answer, and the device; `None` when `dialog` is no subscription here (481).
    pub fn refresh(
        &mut self,
        dialog: &DialogId,
        now: Instant,
        asked: Option<u32>,
    ) -> Option<(Admit, String)> {
        // Past its expiry it is over (RFC 6665 4.1.2.2), even before `expire` reaps it: 481,
        // and the reaping sends its last NOTIFY.
        let device = self
            .by_dialog
            .get(dialog)
            .filter(|s| s.expires_at > now)?
            .device
            .clone();
        let expires = match self.interval(asked) {
            Ok(e) => e,
            Err(refused) => return Some((refused, device)),
        };
        if expires == 0 {
            self.remove(dialog);
        } else if let Some(s) = self.by_dialog.get_mut(dialog) {
            s.expires_at = now + Duration::from_secs(u64::from(expires));
        }
        Some((Admit::Accept { expires }, device))
    }

    /// Forgets `dialog` (its last NOTIFY failed, or it ended); the device it watched.
    pub fn remove(&mut self, dialog: &DialogId) -> Option<String> {
        let s = self.by_dialog.remove(dialog)?;
        decrement(&mut self.per_device, &s.device);
        decrement(&mut self.per_watcher, &s.watcher);
        Some(s.device)
    }

    /// The subscriptions to `device` still running at `now`, each with the seconds it has
    /// left (one past its expiry gets no more NOTIFYs but the last one, from `expire`).
    pub fn of_device(&self, device: &str, now: Instant) -> Vec<(DialogId, u32)> {
        self.by_dialog
            .iter()
            .filter(|(_, s)| s.device == device && s.expires_at > now)
            .map(|(d, s)| (d.clone(), secs_left(s.expires_at, now)))
            .collect()
    }

    /// The device `dialog` watches, the watcher's address and when it expires.
    pub fn describe(&self, dialog: &DialogId) -> Option<(String, IpAddr, Instant)> {
        self.by_dialog
            .get(dialog)
            .map(|s| (s.device.clone(), s.watcher, s.expires_at))
    }

    /// The seconds `dialog` has left at `now`.
    pub fn expires_in(&self, dialog: &DialogId, now: Instant) -> Option<u32> {
        self.by_dialog
            .get(dialog)
            .map(|s| secs_left(s.expires_at, now))
    }

    /// When the next subscription expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.by_dialog.values().map(|s| s.expires_at).min()
    }

    /// Removes the subscriptions expired at `now`: each with its device (the last NOTIFY says
    /// `terminated;reason=timeout`).
    pub fn expire(&mut self, now: Instant) -> Vec<(DialogId, String)> {
        let due: Vec<DialogId> = self
            .by_dialog
            .iter()
            .filter(|(_, s)| s.expires_at <= now)
            .map(|(d, _)| d.clone())
            .collect();
        due.into_iter()
            .filter_map(|d| self.remove(&d).map(|device| (d, device)))
            .collect()
    }
}

fn secs_left(at: Instant, now: Instant) -> u32 {
    u32::try_from(at.saturating_duration_since(now).as_secs()).unwrap_or(u32::MAX)
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// Longest note a device may set (longer is cut at a character boundary).
pub const MAX_NOTE_BYTES: usize = 256;

/// What a device's presence is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicePresence {
    /// A session is live.
    pub online: bool,
    /// It has a call.
    pub in_call: bool,
    /// What the device said it is (`PresenceUpdate`), if anything.
    pub state: Option<PresenceState>,
    /// Its note.
    pub note: String,
}

impl DevicePresence {
    /// Sets what the device said (a `PresenceUpdate`): its state and note (cut to
    /// [`MAX_NOTE_BYTES`]).
    pub fn set_by_device(&mut self, state: PresenceState, note: &str) {
        self.state = Some(state);
        let mut end = note.len().min(MAX_NOTE_BYTES);
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        self.note = note[..end].to_string();
    }

    /// Open (reachable) or closed: online, and not set offline by the device.
    pub fn open(&self) -> bool {
        self.online && self.state != Some(PresenceState::Offline)
    }

    /// The PIDF document (RFC 3863) of `entity` (the device's address-of-record): a tuple
    /// open or closed; an RPID person (RFC 4480) with the activity (`on-the-phone` in a call,
    /// `busy` or `away` as the device set it); the device's note.
    pub fn pidf(&self, entity: &str) -> String {
        let basic = if self.open() { "open" } else { "closed" };
        let activity = if !self.open() {
            None
        } else if self.in_call {
            Some("on-the-phone")
        } else {
            match self.state {
                Some(PresenceState::Busy) => Some("busy"),
                Some(PresenceState::Away) => Some("away"),
                _ => None,
            }
        };
        let mut xml = String::with_capacity(512);
        xml.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n");
        xml.push_str(
            "<presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
             xmlns:dm=\"urn:ietf:params:xml:ns:pidf:data-model\" \
             xmlns:rpid=\"urn:ietf:params:xml:ns:pidf:rpid\" entity=\"",
        );
        xml.push_str(&escape(entity));
        xml.push_str("\">\r\n");
        xml.push_str("<tuple id=\"device\"><status><basic>");
        xml.push_str(basic);
        xml.push_str("</basic></status></tuple>\r\n");
        if let Some(activity) = activity {
            xml.push_str("<dm:person id=\"person\"><rpid:activities><rpid:");
            xml.push_str(activity);
            xml.push_str("/></rpid:activities></dm:person>\r\n");
        }
        if !self.note.is_empty() {
            xml.push_str("<note>");
            xml.push_str(&escape(&self.note));
            xml.push_str("</note>\r\n");
        }
        xml.push_str("</presence>\r\n");
        xml
    }
}

/// XML character escaping (text and attribute values).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// The presence state of this node: the subscriptions, what devices set themselves, and the
/// last document each device's watchers were sent (a NOTIFY goes only when it changes).
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    subs: Mutex<Subscriptions>,
    pub(crate) set_by_device: DashMap<String, DevicePresence>,
    pub(crate) last_sent: DashMap<String, String>,
    /// Subscriptions with a NOTIFY in flight, and whether another must follow it (one at a
    /// time per subscription, in order; changes meanwhile are folded into the next one).
    pub(crate) in_flight: DashMap<DialogId, Option<String>>,
    /// Subscriptions whose record is in the dialog store: what their next write continues.
    pub(crate) stored: DashMap<DialogId, Replicated>,
}

/// Where a subscription's record stands: the epoch this node holds it at, the store version
/// its writes continue from, and how many NOTIFYs may go before the local CSeq written ahead
/// runs out (`None`: none was written, the import floor covers them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Replicated {
    pub(crate) epoch: u64,
    pub(crate) base_version: u64,
    pub(crate) notifies_left: Option<u32>,
}

impl Watchers {
    pub(crate) fn new(config: PresenceConfig) -> Self {
        Self {
            subs: Mutex::new(Subscriptions::new(config)),
            ..Self::default()
        }
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Subscriptions) -> R) -> R {
        match self.subs.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Whether `dialog` is a subscription of this node.
    pub(crate) fn holds(&self, dialog: &DialogId) -> bool {
        self.with(|s| s.contains(dialog))
    }

    /// Subscriptions held now.
    pub(crate) fn count(&self) -> usize {
        self.with(|s| s.len())
    }

    /// The device's `PresenceUpdate`.
    pub(crate) fn set_by_device(&self, device: &str, state: PresenceState, note: &str) {
        self.set_by_device
            .entry(device.to_string())
            .or_default()
            .set_by_device(state, note);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)]
    use super::*;

    fn dialog(n: u32) -> DialogId {
        DialogId::new(format!("call-{n}"), "l", "r")
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn intervals_are_bounded_and_a_fetch_takes_no_place() {
        let t = Subscriptions::new(PresenceConfig::default());
        assert_eq!(
            t.admit("dev", ip(1), Some(30)),
            Admit::TooBrief { min_expires: 60 }
        );
        assert_eq!(
            t.admit("dev", ip(1), Some(86_400)),
            Admit::Accept { expires: 3600 }
        );
        assert_eq!(t.admit("dev", ip(1), None), Admit::Accept { expires: 3600 });
        assert_eq!(t.admit("dev", ip(1), Some(0)), Admit::Accept { expires: 0 });
    }

    #[test]
    fn limits_per_device_per_watcher_and_in_total_hold_and_free_up() {
        let t0 = Instant::now();
        let mut t = Subscriptions::new(PresenceConfig {
            max_per_device: 2,
            max_per_watcher: 3,
            max_total: 4,
            ..PresenceConfig::default()
        });
        t.insert(dialog(1), "a", ip(1), t0, 600);
        t.insert(dialog(2), "a", ip(1), t0, 600);
        assert_eq!(t.admit("a", ip(2), Some(600)), Admit::Limit("per_device"));
        t.insert(dialog(3), "b", ip(1), t0, 600);
        assert_eq!(t.admit("c", ip(1), Some(600)), Admit::Limit("per_watcher"));
        t.insert(dialog(4), "c", ip(2), t0, 600);
        assert_eq!(t.admit("d", ip(3), Some(600)), Admit::Limit("total"));
        // A fetch is always answered.
        assert_eq!(t.admit("d", ip(3), Some(0)), Admit::Accept { expires: 0 });
        assert_eq!(t.remove(&dialog(1)), Some("a".to_string()));
        assert_eq!(
            t.admit("a", ip(2), Some(600)),
            Admit::Accept { expires: 600 }
        );
        assert_eq!(
            t.admit("d", ip(1), Some(600)),
            Admit::Accept { expires: 600 }
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn refreshes_extend_unsubscribes_remove_and_expiry_is_on_the_virtual_clock() {
        let t0 = Instant::now();
        let mut t = Subscriptions::new(PresenceConfig::default());
        t.insert(dialog(1), "a", ip(1), t0, 600);
        t.insert(dialog(2), "a", ip(2), t0, 120);
        assert!(t.watched("a") && !t.watched("b"));
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(120)));
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(
            t.refresh(&dialog(2), t1, Some(600)),
            Some((Admit::Accept { expires: 600 }, "a".to_string()))
        );
        assert_eq!(t.expires_in(&dialog(2), t1), Some(600));
        assert_eq!(
            t.refresh(&dialog(2), t1, Some(10)).map(|(a, _)| a),
            Some(Admit::TooBrief { min_expires: 60 })
        );
        assert_eq!(t.refresh(&dialog(9), t1, Some(300)), None, "481");
        assert!(t.expire(t0 + Duration::from_secs(599)).is_empty());
        assert_eq!(
            t.expire(t0 + Duration::from_secs(600)),
            vec![(dialog(1), "a".to_string())]
        );
        assert_eq!(
            t.refresh(&dialog(2), t1, Some(0)).map(|(a, _)| a),
            Some(Admit::Accept { expires: 0 })
        );
        assert!(t.is_empty());
        assert!(!t.watched("a"), "the per-device index follows removals");
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn a_subscription_past_its_expiry_gets_no_notify_and_its_refresh_gets_481() {
        let t0 = Instant::now();
        let mut t = Subscriptions::new(PresenceConfig::default());
        t.insert(dialog(1), "a", ip(1), t0, 60);
        t.insert(dialog(2), "a", ip(2), t0, 600);
        let before = t0 + Duration::from_secs(59);
        assert_eq!(t.of_device("a", before).len(), 2);
        // The device changes state after the first one expired, before the ticker reaped it:
        // only the running one is notified.
        let after = t0 + Duration::from_secs(61);
        assert_eq!(t.of_device("a", after), vec![(dialog(2), 539)]);
        // The watcher's late refresh finds it over (481), and does not revive it.
        assert_eq!(t.refresh(&dialog(1), after, Some(600)), None);
        assert_eq!(t.expire(after), vec![(dialog(1), "a".to_string())]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_pidf_says_open_closed_busy_and_the_note_escaped() {
        let mut p = DevicePresence::default();
        let doc = p.pidf("sip:dev@gw");
        assert!(doc.contains("<basic>closed</basic>"), "{doc}");
        assert!(doc.contains("entity=\"sip:dev@gw\""));
        p.online = true;
        assert!(p.pidf("sip:dev@gw").contains("<basic>open</basic>"));
        p.set_by_device(PresenceState::Busy, "in a <meeting> & \"away\"");
        let doc = p.pidf("sip:dev@gw");
        assert!(doc.contains("<rpid:busy/>"), "{doc}");
        assert!(
            doc.contains("<note>in a &lt;meeting&gt; &amp; &quot;away&quot;</note>"),
            "{doc}"
        );
        p.in_call = true;
        assert!(p.pidf("sip:dev@gw").contains("<rpid:on-the-phone/>"));
        p.set_by_device(PresenceState::Offline, "");
        let doc = p.pidf("sip:dev@gw");
        assert!(
            doc.contains("<basic>closed</basic>") && !doc.contains("<note>"),
            "{doc}"
        );
        p.set_by_device(PresenceState::Available, &"é".repeat(200));
        assert!(p.note.len() <= MAX_NOTE_BYTES);
    }
}
