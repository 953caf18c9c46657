//! What the bridge is configured with ([`BridgeConfig`]), and the serde sections it owns:
//! SIP credentials, the upstream registrar and per-device settings (`[devices.<id>]`).
//!
//! The node builds a [`BridgeConfig`] from the `[node]`, `[sip]`, `[session]`, `[cluster]`
//! and `[devices]` sections after checking them; the bridge sees nothing else of the
//! configuration. This module only holds settings.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Digest credentials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SipCredentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Realms whose challenges they answer (empty: any realm of an allowed host).
    #[serde(default)]
    pub realms: Vec<String>,
    /// Hosts they may be sent to (a request's next hop or Request-URI host). Empty: the
    /// outbound proxy's and the registrar's hosts; with neither, they are never sent.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Answer MD5 challenges that offer no qop (RFC 2069, weaker); off by default.
    #[serde(default)]
    pub allow_md5_without_qop: bool,
}

/// Upstream registration of device addresses-of-record (`[sip.registrar]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistrarConfig {
    /// Registrar URI (Request-URI of the REGISTER), e.g. `sip:registrar.example.com`.
    pub uri: String,
    /// Domain of the registered addresses-of-record (defaults to the registrar's host).
    #[serde(default)]
    pub domain: Option<String>,
    /// Requested registration lifetime (seconds); refreshed before it runs out.
    #[serde(default = "default_register_expires")]
    pub expires_secs: u32,
}

fn default_register_expires() -> u32 {
    600
}

/// Per-device settings, by device id (`[devices.<id>]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSettings {
    /// Buddy aliases: `Dial{target: "bob"}` calls the URI given here.
    pub address_book: BTreeMap<String, String>,
    /// Credentials for this device's registration and calls (override `sip.auth`).
    pub auth: Option<SipCredentials>,
}

/// The bridge's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// This node's id (the owner named in dialog records).
    pub node_id: String,
    /// The gateway's SIP domain: devices are `sip:<device-id>@<domain>`.
    pub sip_domain: String,
    /// How long an incoming call rings on a device before it is answered 480.
    pub no_answer_timeout: Duration,
    /// Most calls at once per device. `Dial` and `Answer` count only calls that are not ringing
    /// (calls ringing at a device never take the slots of its own `Dial`); an incoming INVITE
    /// counts them all.
    pub max_calls: u32,
    /// Most incoming calls ringing at once per device; more are answered 486.
    pub max_ringing: u32,
    /// Texts (SIP MESSAGE) a device may receive; more are answered 503 with Retry-After.
    pub texts_in: crate::limits::Rate,
    /// Texts (`SendText`) a device may send; more get an MBFP `LimitExceeded` error.
    pub texts_out: crate::limits::Rate,
    /// Largest text body.
    pub max_text_bytes: u32,
    /// How long a request for a known device that is not logged in waits for it.
    pub arrival_wait: Duration,
    /// How long the calls of a device that lost its session wait for it to come back.
    pub device_grace: Duration,
    /// Gateway-wide credentials for the outbound proxy and the registrar.
    pub credentials: Option<SipCredentials>,
    /// Register online devices upstream.
    pub registrar: Option<RegistrarConfig>,
    /// Per-device settings.
    pub devices: BTreeMap<String, DeviceSettings>,
    /// Hosts of the outbound proxy and the registrar: where credentials without `hosts` may go.
    pub trunk_hosts: Vec<String>,
    /// Longest wait for the write of a local CSeq before the request that uses it is sent.
    pub write_ahead_timeout: Duration,
    /// Longest wait for the store while taking a dialog over.
    pub takeover_timeout: Duration,
    /// After a takeover, re-INVITE the peer so media follows.
    pub reinvite_after_takeover: bool,
    /// Session timers (RFC 4028) on calls; `None`: off.
    pub session_timer: Option<thalamus_sip::session_timer::TimerConfig>,
    /// Reliable provisional responses (RFC 3262, PRACK) on calls.
    pub reliable_provisionals: bool,
    /// Presence subscriptions of SIP watchers: limits and intervals.
    pub presence: crate::presence::PresenceConfig,
}

impl Default for BridgeConfig {
    /// The settings of a node on its embedded defaults.
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            sip_domain: "thalamus.local".into(),
            no_answer_timeout: Duration::from_secs(60),
            max_calls: 4,
            max_ringing: 4,
            texts_in: crate::limits::Rate {
                per_sec: 5,
                burst: 20,
            },
            texts_out: crate::limits::Rate {
                per_sec: 5,
                burst: 20,
            },
            max_text_bytes: 16 * 1024,
            arrival_wait: Duration::from_secs(2),
            device_grace: Duration::from_secs(60),
            credentials: None,
            registrar: None,
            devices: BTreeMap::new(),
            trunk_hosts: Vec::new(),
            write_ahead_timeout: Duration::from_millis(250),
            takeover_timeout: Duration::from_secs(2),
            reinvite_after_takeover: true,
            session_timer: Some(thalamus_sip::session_timer::TimerConfig::default()),
            reliable_provisionals: true,
            presence: crate::presence::PresenceConfig::default(),
        }
    }
}
