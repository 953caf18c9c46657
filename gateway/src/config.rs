//! Gateway configuration: one TOML file, `THALAMUS_*` environment overrides, embedded defaults.
//!
//! Every section denies unknown keys, and every error names the key at fault. The file and the
//! environment are read through [`ConfigSource`], so tests supply their own without touching the
//! process environment. This module only reads and checks configuration; it opens no sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "THALAMUS_";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    /// A key is unknown or its value has the wrong type.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted path of the key, e.g. `quic.listen`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// An environment override names no key or cannot be applied.
    #[error("environment override {var}: {message}")]
    Env {
        /// The variable name.
        var: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Where configuration text and overrides come from (injectable for tests).
pub trait ConfigSource {
    /// The TOML text of the config file, if one is configured.
    fn file(&self) -> Result<Option<String>, ConfigError>;
    /// `(name, value)` pairs of environment variables that start with [`ENV_PREFIX`].
    fn env_overrides(&self) -> Vec<(String, String)>;
}

/// Reads the config file from disk and overrides from the process environment.
#[derive(Debug, Clone, Default)]
pub struct ProcessConfigSource {
    /// Path of the config file; `None` runs on embedded defaults.
    pub path: Option<PathBuf>,
}

impl ConfigSource for ProcessConfigSource {
    fn file(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        std::fs::read_to_string(path)
            .map(Some)
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })
    }

    fn env_overrides(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != "THALAMUS_CONFIG")
            .collect()
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// Device ingress over QUIC.
    pub quic: QuicConfig,
    /// Device session limits.
    pub session: SessionConfig,
    /// Device authentication.
    pub auth: AuthConfig,
    /// The SIP side.
    pub sip: SipConfig,
    /// Admin HTTP (health, metrics).
    pub admin: AdminConfig,
    /// The device page for browsers (`[web]`).
    pub web: WebConfig,
    /// Logging.
    pub log: LogConfig,
    /// Media relay (RTP ports, timeouts).
    pub media: thalamus_media::MediaConfig,
    /// Per-device settings (address book, SIP credentials).
    pub devices: BTreeMap<String, DeviceSettings>,
    /// Clustering: dialog store, replication, owner lease, heartbeats (`[cluster]`).
    pub cluster: crate::cluster::config::ClusterConfig,
    /// Call detail records (`[cdr]`).
    pub cdr: thalamus_cdr::CdrConfig,
}

/// Node identity and local storage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id; defaults to `node-1`.
    pub id: String,
    /// Data directory (certificates, device registry, embedded store).
    pub data_dir: PathBuf,
    /// Device registry file; defaults to `<data_dir>/devices.toml`.
    pub device_registry: Option<PathBuf>,
    /// On SIGTERM the node drains: no new calls, devices told to move, calls in progress
    /// allowed this long to finish before the process exits (a second SIGTERM ends it at
    /// once).
    pub drain_deadline_secs: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "node-1".into(),
            data_dir: PathBuf::from("thalamus-data"),
            device_registry: None,
            drain_deadline_secs: 30,
        }
    }
}

impl NodeConfig {
    /// The device registry path after defaults.
    pub fn device_registry_path(&self) -> PathBuf {
        self.device_registry
            .clone()
            .unwrap_or_else(|| self.data_dir.join("devices.toml"))
    }
}

/// QUIC listener settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate chain; with none, a self-signed one is generated in the data directory.
    pub cert: Option<PathBuf>,
    /// PEM private key (required with `cert`).
    pub key: Option<PathBuf>,
    /// Most connections at once.
    pub max_connections: u32,
    /// Most connections at once from one source IP address.
    pub max_connections_per_ip: u32,
    /// Close a connection with no traffic for this long (milliseconds).
    pub idle_timeout_ms: u32,
    /// MBFP and QUIC keepalive interval (milliseconds); must be below `idle_timeout_ms`.
    pub keepalive_interval_ms: u32,
    /// Time a device has to send `Hello` after connecting (milliseconds).
    pub hello_timeout_ms: u32,
    /// Largest QUIC datagram the gateway accepts (bytes).
    pub max_datagram_bytes: u32,
    /// Receive and send buffer of the QUIC UDP socket (bytes; 0 keeps the system default).
    /// Media from many devices arrives in bursts; the usual 208 KiB default drops datagrams
    /// under load. The kernel caps it at `net.core.rmem_max` / `wmem_max`.
    pub socket_buffer_bytes: u32,
    /// Also accept devices over WebTransport (HTTP/3, ALPN `h3`, path `/mbfp`) on the same
    /// port, with the same credentials, limits and MBFP session: the way in for browsers.
    pub webtransport: bool,
    /// Page origins (`scheme://host[:port]`) allowed to open WebTransport sessions; `"*"`
    /// allows any. A browser's CONNECT names its page's origin; a native client names none and
    /// is not checked. Empty (the default): the device page's own origins, from `web.listen`
    /// (`http://<address>`, and `http://localhost:<port>` on loopback).
    pub webtransport_origins: Vec<String>,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            cert: None,
            key: None,
            max_connections: 100_000,
            max_connections_per_ip: 2_000,
            idle_timeout_ms: 30_000,
            keepalive_interval_ms: 10_000,
            hello_timeout_ms: 10_000,
            max_datagram_bytes: 1_200,
            socket_buffer_bytes: 4 * 1024 * 1024,
            webtransport: false,
            webtransport_origins: Vec::new(),
        }
    }
}

/// Device session limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Largest control frame (bytes, without the length prefix).
    pub max_frame_bytes: u32,
    /// Frames queued toward one device before the session is closed as too slow.
    pub send_queue_frames: u32,
    /// Most calls at once per device. A device's own `Dial` counts only calls that are not
    /// ringing (calls ringing at it never take its slots); an incoming call is refused when the
    /// device has this many in all, and answering one only when this many are up.
    pub max_calls: u32,
    /// Most incoming calls ringing at once per device; more are answered 486. Default:
    /// `max_calls`.
    pub max_ringing_calls: Option<u32>,
    /// Texts (SIP MESSAGE) one device may receive per second (0: no limit); more are answered
    /// 503 with Retry-After.
    pub texts_in_per_sec: u32,
    /// Texts one device may receive at once before `texts_in_per_sec` applies.
    pub texts_in_burst: u32,
    /// Texts (`SendText`) one device may send per second (0: no limit); more get an MBFP
    /// `LimitExceeded` error.
    pub texts_out_per_sec: u32,
    /// Texts one device may send at once before `texts_out_per_sec` applies.
    pub texts_out_burst: u32,
    /// How long a resume token is accepted after it was issued, seconds (at least 3); a live
    /// session gets a fresh one every third of it, so the latest is always good.
    pub resume_window_secs: u32,
    /// Largest text message body (bytes).
    pub max_text_bytes: u32,
    /// How long an INVITE or MESSAGE for a known device that has no session here waits for the
    /// device to log in before it is answered 480 (milliseconds; 0 answers at once). Covers a
    /// device moving between nodes (a drain, a failover, a redirect) and a quick reconnect.
    pub arrival_wait_ms: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            send_queue_frames: 256,
            max_calls: 4,
            max_ringing_calls: None,
            texts_in_per_sec: 5,
            texts_in_burst: 20,
            texts_out_per_sec: 5,
            texts_out_burst: 20,
            resume_window_secs: 300,
            max_text_bytes: 16 * 1024,
            arrival_wait_ms: 2_000,
        }
    }
}

/// Device authentication.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Failures from one address allowed in `failure_window_secs` before answers are slowed.
    pub free_failures: u32,
    /// Window over which failures are counted (seconds).
    pub failure_window_secs: u32,
    /// First added delay once over `free_failures` (milliseconds); doubles per failure.
    pub failure_delay_ms: u32,
    /// Cap on the added delay (milliseconds).
    pub max_failure_delay_ms: u32,
    /// Failures from one address in `failure_window_secs` after which its logins are refused
    /// without checking, until the window ends.
    pub max_failures_per_ip: u32,
    /// Wrong secrets for one device in the window after which its logins are refused without
    /// checking (the device's own, known secret still passes).
    pub max_failures_per_device: u32,
    /// Credential checks one address may have in flight at once (argon2 is slow by design;
    /// parallel attempts from one address must not fill the verifier pool); more wait their
    /// turn, up to `quic.hello_timeout_ms`.
    pub max_pending_per_ip: u32,
    /// Secret that signs resume tokens (hex, 32 bytes); with none, one is generated in the data
    /// directory. All nodes of a cluster must share it.
    pub resume_secret: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            free_failures: 5,
            failure_window_secs: 60,
            failure_delay_ms: 250,
            max_failure_delay_ms: 5_000,
            max_failures_per_ip: 50,
            max_failures_per_device: 20,
            max_pending_per_ip: 4,
            resume_secret: None,
        }
    }
}

/// The SIP side of the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SipConfig {
    /// UDP and TCP address to listen on.
    pub listen: SocketAddr,
    /// The gateway's SIP domain: devices are `sip:<device-id>@<domain>`.
    pub domain: String,
    /// Address put in Via and Contact (host:port), when it differs from `listen` (NAT, or a
    /// wildcard listen address). Defaults to the bound address, with 127.0.0.1 for a wildcard.
    pub advertised: Option<String>,
    /// Outbound proxy for calls and messages from devices (a SIP URI, e.g.
    /// `sip:proxy.example.com;lr`); without one, targets are resolved directly (RFC 3263).
    pub outbound_proxy: Option<String>,
    /// Seconds an incoming call rings on a device before the gateway answers 480.
    pub no_answer_timeout_secs: u32,
    /// Session timers (RFC 4028): the session interval asked for on calls the devices place
    /// and granted at most on calls they take, in seconds (0: no session timers: none asked
    /// for or granted, and a request requiring `timer` gets 420). Half of it after each
    /// refresh the refresher refreshes; a session nobody refreshes ends with a BYE.
    pub session_expires_secs: u32,
    /// The shortest session interval a peer may ask for (seconds, at least 90 as RFC 4028
    /// requires); shorter is refused 422 with this Min-SE.
    pub min_se_secs: u32,
    /// Reliable provisional responses (RFC 3262, PRACK): offered on calls devices place, and
    /// the ringing of calls they take sent reliably when the caller supports or requires them
    /// (false: a request requiring `100rel` gets 420).
    pub reliable_provisionals: bool,
    /// Gateway-wide credentials for the outbound proxy and the registrar (401/407 answered).
    pub auth: Option<SipCredentials>,
    /// Register each online device's address-of-record upstream.
    pub registrar: Option<RegistrarConfig>,
    /// Who may reach a device from outside (`[sip.inbound]`): trusted sources, digest users.
    pub inbound: thalamus_bridge::inbound::InboundConfig,
    /// What one source, one device or one connection may take (`[sip.limits]`).
    pub limits: SipLimitsConfig,
    /// Presence subscriptions of SIP watchers to devices (`[sip.presence]`).
    pub presence: SipPresenceConfig,
    /// SIP over TLS (`[sip.tls]`); absent: no TLS either way.
    pub tls: Option<SipTlsConfig>,
    /// Transaction timer T1 (milliseconds).
    pub t1_ms: u32,
    /// Transaction timer T2 (milliseconds).
    pub t2_ms: u32,
    /// Transaction timer T4 (milliseconds).
    pub t4_ms: u32,
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5060)),
            domain: "thalamus.local".into(),
            advertised: None,
            outbound_proxy: None,
            no_answer_timeout_secs: 60,
            session_expires_secs: thalamus_sip::session_timer::DEFAULT_SESSION_EXPIRES,
            min_se_secs: thalamus_sip::session_timer::MIN_SE_FLOOR,
            reliable_provisionals: true,
            auth: None,
            registrar: None,
            inbound: thalamus_bridge::inbound::InboundConfig::default(),
            limits: SipLimitsConfig::default(),
            presence: SipPresenceConfig::default(),
            tls: None,
            t1_ms: 500,
            t2_ms: 4_000,
            t4_ms: 5_000,
        }
    }
}

/// SIP over TLS (`[sip.tls]`): the settings the balancer shares.
pub type SipTlsConfig = thalamus_sip::transport::tls::TlsSettings;

/// The transport's TLS settings of `[sip.tls]`, files read; errors name the key.
fn sip_tls(tls: &SipTlsConfig) -> Result<thalamus_sip::transport::TlsTransportConfig, ConfigError> {
    tls.transport("sip.tls").map_err(|e| ConfigError::Key {
        key: e.key,
        message: e.message,
    })
}

/// Presence subscriptions (`[sip.presence]`): SIP watchers SUBSCRIBE to a device's presence
/// (RFC 3856); these bound them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SipPresenceConfig {
    /// Subscriptions to one device at once (over it: 503).
    pub max_per_device: usize,
    /// Subscriptions from one watcher address at once (over it: 503).
    pub max_per_watcher: usize,
    /// Subscriptions on the node at once (over it: 503).
    pub max_total: usize,
    /// Shortest subscription accepted, seconds (shorter: 423 with Min-Expires).
    pub min_expires_secs: u32,
    /// Longest subscription granted, seconds (longer is lowered; also the default).
    pub max_expires_secs: u32,
    /// SIP buddies one device watches at once (MBFP `Watch`; over it: `LIMIT_EXCEEDED`).
    pub watches_per_device: usize,
    /// Devices' watches of SIP buddies on the node at once.
    pub watches_total: usize,
    /// Seconds a watch's SUBSCRIBE asks for when the device names none (between
    /// `min_expires_secs` and `max_expires_secs`).
    pub watch_expires_secs: u32,
}

impl Default for SipPresenceConfig {
    fn default() -> Self {
        let d = thalamus_bridge::presence::PresenceConfig::default();
        Self {
            max_per_device: d.max_per_device,
            max_per_watcher: d.max_per_watcher,
            max_total: d.max_total,
            min_expires_secs: d.min_expires,
            max_expires_secs: d.max_expires,
            watches_per_device: d.watches_per_device,
            watches_total: d.watches_total,
            watch_expires_secs: d.watch_expires,
        }
    }
}

/// Limits on what one source, device or connection may take from the SIP side (`[sip.limits]`).
/// Sources in `sip.inbound.trusted` (the carrier, the balancer) are exempt from the per-source
/// limits; everything is bound by the totals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SipLimitsConfig {
    /// Live SIP transactions on the node (client and server); over it, new requests get 503.
    pub max_transactions: usize,
    /// New server transactions per second from one untrusted address (0: no limit).
    pub source_rate: u32,
    /// New server transactions one untrusted address may start at once.
    pub source_burst: u32,
    /// Live server transactions one untrusted address may hold (0: no limit).
    pub source_max_live: usize,
    /// Untrusted addresses tracked at once.
    pub max_sources: usize,
    /// SIP TCP connections at once.
    pub max_tcp_connections: usize,
    /// SIP TCP connections from one address.
    pub max_tcp_connections_per_ip: usize,
    /// A SIP message on TCP must arrive whole within this many milliseconds of its first byte.
    pub tcp_message_timeout_ms: u32,
    /// Bytes of partial messages all SIP TCP connections may buffer together.
    pub tcp_max_buffered_bytes: usize,
    /// Milliseconds to open an outbound SIP TCP connection.
    pub tcp_connect_timeout_ms: u32,
    /// A UDP request that waited in the socket longer than this many milliseconds (the node was
    /// frozen, or far behind) is dropped unanswered: its sender has retransmitted it by then,
    /// maybe to another node. 0: never dropped.
    pub max_request_age_ms: u32,
}

impl Default for SipLimitsConfig {
    fn default() -> Self {
        let transport = thalamus_sip::transport::TransportConfig::default();
        let transactions = thalamus_sip::transaction::TransactionConfig::default();
        Self {
            max_transactions: transactions.max_transactions,
            source_rate: transactions.per_source.rate,
            source_burst: transactions.per_source.burst,
            source_max_live: transactions.per_source.max_live,
            max_sources: transactions.per_source.max_sources,
            max_tcp_connections: transport.max_connections,
            max_tcp_connections_per_ip: transport.max_connections_per_ip,
            tcp_message_timeout_ms: 10_000,
            tcp_max_buffered_bytes: transport.max_buffered_bytes,
            tcp_connect_timeout_ms: 5_000,
            max_request_age_ms: 1_000,
        }
    }
}

/// Admin HTTP endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// TCP address for `/health` and `/metrics`.
    pub listen: SocketAddr,
    /// Bearer token that requests changing anything (`POST`, `DELETE`) must present. With
    /// none, one is generated at first start into `<data_dir>/admin.token` and printed once.
    pub token: Option<String>,
    /// Admin addresses of the SIP load balancers (their `admin.listen`), whose node table
    /// (`GET /nodes`) the operator console shows. None: the console shows the live set only.
    pub balancers: Vec<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token: None,
            balancers: Vec::new(),
        }
    }
}

/// The device page: a browser logs in as a device over WebTransport (docs/console.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// TCP address of the page (plain HTTP: a browser takes WebTransport from a page on
    /// `localhost` or `127.0.0.1`, or behind a TLS proxy). None: no page. Needs
    /// `quic.webtransport`.
    pub listen: Option<SocketAddr>,
}

pub use thalamus_bridge::config::{DeviceSettings, RegistrarConfig, SipCredentials};
pub use thalamus_telemetry::{LogConfig, LogFormat};

impl Config {
    /// Loads the configuration from `source`: defaults, then the file, then the environment.
    pub fn load(source: &dyn ConfigSource) -> Result<Self, ConfigError> {
        let mut doc = match source.file()? {
            Some(text) => text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax(e.to_string()))?,
            None => toml::Table::new(),
        };
        let mut overrides = source.env_overrides();
        overrides.sort();
        for (var, value) in overrides {
            apply_env_override(&mut doc, &var, &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| ConfigError::Key {
                key: e.path().to_string(),
                message: e.inner().message().to_string(),
            },
        )?;
        config.check()?;
        Ok(config)
    }

    /// Cross-key checks that serde cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.node.id.is_empty() || self.node.id.len() > 64 {
            return bad("node.id", "must be 1 to 64 characters");
        }
        if self.session.resume_window_secs < 3 {
            return bad(
                "session.resume_window_secs",
                "must be at least 3 (a live session gets a fresh token every third of it)",
            );
        }
        if thalamus_telemetry::check_level(&self.log.level).is_err() {
            return bad(
                "log.level",
                "is not a tracing filter directive (e.g. `info,thalamus_bridge=debug`)",
            );
        }
        if self.cdr.queue == 0 {
            return bad("cdr.queue", "must be at least 1");
        }
        if self.cdr.max_file_bytes < 4096 {
            return bad("cdr.max_file_bytes", "must be at least 4096");
        }
        if self.quic.cert.is_some() != self.quic.key.is_some() {
            return bad("quic.key", "quic.cert and quic.key must be given together");
        }
        if self.quic.keepalive_interval_ms == 0
            || self.quic.keepalive_interval_ms >= self.quic.idle_timeout_ms
        {
            return bad(
                "quic.keepalive_interval_ms",
                "must be above 0 and below quic.idle_timeout_ms",
            );
        }
        if self.quic.max_connections == 0 || self.quic.max_connections_per_ip == 0 {
            return bad("quic.max_connections", "limits must be above 0");
        }
        if self.web.listen.is_some() && !self.quic.webtransport {
            return bad(
                "web.listen",
                "the device page needs quic.webtransport = true (browsers log in over WebTransport)",
            );
        }
        if let Some(origin) = self
            .quic
            .webtransport_origins
            .iter()
            .find(|o| !is_origin(o))
        {
            return bad(
                "quic.webtransport_origins",
                &format!("{origin:?} is not an origin (scheme://host[:port], or \"*\")"),
            );
        }
        if self.quic.webtransport_origins.is_empty()
            && self.web.listen.is_some_and(|l| l.ip().is_unspecified())
        {
            return bad(
                "quic.webtransport_origins",
                "list the origins the device page is reached at (e.g. \"http://gw.example.com:8080\") \
                 when web.listen is a wildcard address",
            );
        }
        if self.session.max_frame_bytes < 256 || self.session.max_frame_bytes > 16 * 1024 * 1024 {
            return bad(
                "session.max_frame_bytes",
                "must be between 256 and 16777216",
            );
        }
        if self.session.texts_in_per_sec > 0 && self.session.texts_in_burst == 0 {
            return bad(
                "session.texts_in_burst",
                "must be at least 1 when texts_in_per_sec is set",
            );
        }
        if self.session.texts_out_per_sec > 0 && self.session.texts_out_burst == 0 {
            return bad(
                "session.texts_out_burst",
                "must be at least 1 when texts_out_per_sec is set",
            );
        }
        if self.session.send_queue_frames == 0 {
            return bad("session.send_queue_frames", "must be above 0");
        }
        if self.quic.max_datagram_bytes < 64 {
            return bad("quic.max_datagram_bytes", "must be at least 64");
        }
        if self.sip.domain.is_empty() || self.sip.domain.contains(['@', ' ', ';']) {
            return bad("sip.domain", "must be a host name");
        }
        if self.sip.t1_ms == 0 || self.sip.t2_ms < self.sip.t1_ms {
            return bad("sip.t2_ms", "T1 must be above 0 and T2 at least T1");
        }
        let limits = &self.sip.limits;
        if limits.max_transactions < 64 {
            return bad("sip.limits.max_transactions", "must be at least 64");
        }
        if limits.source_rate > 0 && limits.source_burst == 0 {
            return bad(
                "sip.limits.source_burst",
                "must be at least 1 when source_rate is set",
            );
        }
        if limits.max_sources == 0 {
            return bad("sip.limits.max_sources", "must be at least 1");
        }
        if limits.max_tcp_connections == 0 || limits.max_tcp_connections_per_ip == 0 {
            return bad(
                "sip.limits.max_tcp_connections",
                "max_tcp_connections and max_tcp_connections_per_ip must be at least 1",
            );
        }
        if limits.max_request_age_ms != 0 && limits.max_request_age_ms < 100 {
            return bad(
                "sip.limits.max_request_age_ms",
                "must be 0 (off) or at least 100",
            );
        }
        if limits.tcp_message_timeout_ms < 100 {
            return bad("sip.limits.tcp_message_timeout_ms", "must be at least 100");
        }
        if limits.tcp_max_buffered_bytes < 65_536 {
            return bad(
                "sip.limits.tcp_max_buffered_bytes",
                "must be at least 65536 (one largest message)",
            );
        }
        if limits.tcp_connect_timeout_ms < 100 {
            return bad("sip.limits.tcp_connect_timeout_ms", "must be at least 100");
        }
        let presence = &self.sip.presence;
        for (key, value) in [
            ("sip.presence.max_per_device", presence.max_per_device),
            ("sip.presence.max_per_watcher", presence.max_per_watcher),
            ("sip.presence.max_total", presence.max_total),
            (
                "sip.presence.watches_per_device",
                presence.watches_per_device,
            ),
            ("sip.presence.watches_total", presence.watches_total),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if presence.min_expires_secs == 0 {
            return bad("sip.presence.min_expires_secs", "must be at least 1");
        }
        if presence.max_expires_secs < presence.min_expires_secs {
            return bad(
                "sip.presence.max_expires_secs",
                "must be at least sip.presence.min_expires_secs",
            );
        }
        if presence.watch_expires_secs < presence.min_expires_secs
            || presence.watch_expires_secs > presence.max_expires_secs
        {
            return bad(
                "sip.presence.watch_expires_secs",
                "must be between sip.presence.min_expires_secs and sip.presence.max_expires_secs",
            );
        }
        if self.sip.session_expires_secs != 0 {
            if self.sip.min_se_secs < thalamus_sip::session_timer::MIN_SE_FLOOR {
                return bad(
                    "sip.min_se_secs",
                    "must be at least 90 (RFC 4028 section 4)",
                );
            }
            if self.sip.session_expires_secs < self.sip.min_se_secs {
                return bad(
                    "sip.session_expires_secs",
                    "must be 0 (no session timers) or at least sip.min_se_secs",
                );
            }
        }
        if let Err(e) = self.media.validate() {
            return Err(ConfigError::Key {
                key: e.key.to_string(),
                message: e.message,
            });
        }
        if let Err(e) = self.cluster.validate() {
            return Err(ConfigError::Key {
                key: e.key.to_string(),
                message: e.message,
            });
        }
        if let Some(secret) = &self.auth.resume_secret {
            if hex::decode(secret).map(|s| s.len()) != Ok(32) {
                return bad("auth.resume_secret", "must be 64 hex digits (32 bytes)");
            }
        }
        if self.auth.max_pending_per_ip == 0 {
            return bad("auth.max_pending_per_ip", "must be at least 1");
        }
        if self.auth.max_failures_per_ip < self.auth.free_failures
            || self.auth.max_failures_per_device < self.auth.free_failures
        {
            return bad(
                "auth.max_failures_per_ip",
                "max_failures_per_ip and max_failures_per_device must be at least free_failures",
            );
        }
        if let Some(token) = &self.admin.token {
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(
                    "admin.token",
                    "must be at least 16 printable characters without spaces",
                );
            }
        }
        self.advertised()?;
        self.outbound_proxy()?;
        self.inbound_policy()?;
        if let Some(registrar) = &self.sip.registrar {
            if thalamus_sip::message::Uri::parse(&registrar.uri).is_err() {
                return bad("sip.registrar.uri", "is not a SIP URI");
            }
        }
        let trunk = self.trunk_hosts();
        let sent_nowhere = |c: &SipCredentials| c.hosts.is_empty() && trunk.is_empty();
        if self.sip.auth.as_ref().is_some_and(sent_nowhere) {
            return bad(
                "sip.auth.hosts",
                "credentials would be sent nowhere: name the hosts they are for (or configure \
                 sip.outbound_proxy or sip.registrar, whose hosts are the default)",
            );
        }
        for (device, settings) in &self.devices {
            if settings.auth.as_ref().is_some_and(sent_nowhere) {
                return Err(ConfigError::Key {
                    key: format!("devices.{device}.auth.hosts"),
                    message: "credentials would be sent nowhere: name the hosts they are for \
                              (or configure sip.outbound_proxy or sip.registrar)"
                        .into(),
                });
            }
            for (alias, uri) in &settings.address_book {
                if thalamus_sip::message::Uri::parse(uri).is_err() {
                    return Err(ConfigError::Key {
                        key: format!("devices.{device}.address_book.{alias}"),
                        message: format!("{uri:?} is not a URI"),
                    });
                }
            }
        }
        Ok(())
    }

    /// `sip.advertised` as a host and an optional port.
    fn advertised(
        &self,
    ) -> Result<Option<(thalamus_sip::message::Host, Option<u16>)>, ConfigError> {
        let Some(text) = &self.sip.advertised else {
            return Ok(None);
        };
        thalamus_sip::message::Host::parse_with_port(text)
            .map(Some)
            .ok_or_else(|| ConfigError::Key {
                key: "sip.advertised".into(),
                message: format!("{text:?} is not host or host:port"),
            })
    }

    /// The inbound SIP policy of `[sip.inbound]`.
    pub fn inbound_policy(&self) -> Result<thalamus_bridge::inbound::InboundPolicy, ConfigError> {
        thalamus_bridge::inbound::InboundPolicy::new(&self.sip.inbound, &self.sip.domain).map_err(
            |e| ConfigError::Key {
                key: "sip.inbound.nonce_secret".into(),
                message: e.to_string(),
            },
        )
    }

    /// `sip.outbound_proxy` as a SIP URI.
    fn outbound_proxy(&self) -> Result<Option<thalamus_sip::message::SipUri>, ConfigError> {
        let Some(text) = &self.sip.outbound_proxy else {
            return Ok(None);
        };
        thalamus_sip::message::SipUri::parse(text)
            .map(Some)
            .map_err(|e| ConfigError::Key {
                key: "sip.outbound_proxy".into(),
                message: e.to_string(),
            })
    }

    /// Device ingress's settings (`[node]`, `[quic]`, `[session]`, `[auth]`, `sip.domain`).
    pub fn ingress(&self) -> thalamus_ingress::IngressConfig {
        self.ingress_with_page(self.web.listen)
    }

    /// [`Config::ingress`] for a device page bound at `page` (its origins are the sessions'
    /// default origins): the node binds the page first, and a port of 0 becomes a real one.
    pub fn ingress_with_page(&self, page: Option<SocketAddr>) -> thalamus_ingress::IngressConfig {
        let ms = |v: u32| Duration::from_millis(v.into());
        thalamus_ingress::IngressConfig {
            node_id: self.node.id.clone(),
            sip_domain: self.sip.domain.clone(),
            listen: self.quic.listen,
            socket_buffer_bytes: self.quic.socket_buffer_bytes,
            cert: self.quic.cert.clone(),
            key: self.quic.key.clone(),
            data_dir: self.node.data_dir.clone(),
            max_connections: self.quic.max_connections as usize,
            max_connections_per_ip: self.quic.max_connections_per_ip as usize,
            hello_timeout: ms(self.quic.hello_timeout_ms),
            keepalive_interval: ms(self.quic.keepalive_interval_ms),
            idle_timeout: ms(self.quic.idle_timeout_ms),
            max_datagram_bytes: self.quic.max_datagram_bytes,
            max_frame_bytes: self.session.max_frame_bytes,
            send_queue_frames: self.session.send_queue_frames,
            max_calls: self.session.max_calls,
            max_text_bytes: self.session.max_text_bytes,
            throttle: thalamus_ingress::ThrottleConfig {
                free_failures: self.auth.free_failures,
                window: Duration::from_secs(self.auth.failure_window_secs.into()),
                base_delay: ms(self.auth.failure_delay_ms),
                max_delay: ms(self.auth.max_failure_delay_ms),
                max_failures: self.auth.max_failures_per_ip,
                max_tracked: 65_536,
            },
            device_throttle: thalamus_ingress::ThrottleConfig {
                free_failures: self.auth.free_failures,
                window: Duration::from_secs(self.auth.failure_window_secs.into()),
                base_delay: ms(self.auth.failure_delay_ms),
                max_delay: ms(self.auth.max_failure_delay_ms),
                max_failures: self.auth.max_failures_per_device,
                max_tracked: 65_536,
            },
            max_pending_logins_per_ip: self.auth.max_pending_per_ip as usize,
            webtransport: self.quic.webtransport,
            webtransport_origins: self.webtransport_origins(page),
        }
    }

    /// The page origins allowed to open WebTransport sessions: `quic.webtransport_origins`,
    /// or those of the device page at `page` (`Config::page_origins`).
    fn webtransport_origins(&self, page: Option<SocketAddr>) -> Vec<String> {
        if !self.quic.webtransport_origins.is_empty() {
            return self.quic.webtransport_origins.clone();
        }
        page.map(Self::page_origins).unwrap_or_default()
    }

    /// The origins of the device page served at `page`: `http://<page>`, and
    /// `http://localhost:<port>` when `page` is on loopback.
    fn page_origins(page: SocketAddr) -> Vec<String> {
        let mut origins = vec![format!("http://{page}")];
        if page.ip().is_loopback() {
            origins.push(format!("http://localhost:{}", page.port()));
        }
        origins
    }

    /// The per-source limits of new SIP transactions (`[sip.limits]`; trusted sources are
    /// exempt).
    pub fn sip_source_limits(&self) -> thalamus_sip::transaction::SourceLimits {
        let limits = &self.sip.limits;
        thalamus_sip::transaction::SourceLimits {
            rate: limits.source_rate,
            burst: limits.source_burst,
            max_live: limits.source_max_live,
            max_sources: limits.max_sources,
        }
    }

    /// Session timers (`sip.session_expires_secs`, `sip.min_se_secs`), `None` when off.
    pub fn session_timer(&self) -> Option<thalamus_sip::session_timer::TimerConfig> {
        (self.sip.session_expires_secs != 0).then_some(thalamus_sip::session_timer::TimerConfig {
            session_expires: self.sip.session_expires_secs,
            min_se: self.sip.min_se_secs,
        })
    }

    /// The bridge's settings (`node.id`, `[sip]`, `[session]`, `[cluster]`, `[devices]`).
    pub fn bridge(&self) -> thalamus_bridge::BridgeConfig {
        thalamus_bridge::BridgeConfig {
            node_id: self.node.id.clone(),
            sip_domain: self.sip.domain.clone(),
            no_answer_timeout: Duration::from_secs(self.sip.no_answer_timeout_secs.into()),
            max_calls: self.session.max_calls,
            max_ringing: self
                .session
                .max_ringing_calls
                .unwrap_or(self.session.max_calls),
            texts_in: thalamus_bridge::limits::Rate {
                per_sec: self.session.texts_in_per_sec,
                burst: self.session.texts_in_burst,
            },
            texts_out: thalamus_bridge::limits::Rate {
                per_sec: self.session.texts_out_per_sec,
                burst: self.session.texts_out_burst,
            },
            max_text_bytes: self.session.max_text_bytes,
            arrival_wait: Duration::from_millis(self.session.arrival_wait_ms.into()),
            device_grace: Duration::from_secs(u64::from(self.session.resume_window_secs).min(60)),
            credentials: self.sip.auth.clone(),
            registrar: self.sip.registrar.clone(),
            devices: self.devices.clone(),
            trunk_hosts: self.trunk_hosts(),
            write_ahead_timeout: self.cluster.write_ahead_timeout(),
            takeover_timeout: self.cluster.takeover_timeout(),
            reinvite_after_takeover: self.cluster.reinvite_after_takeover,
            session_timer: self.session_timer(),
            reliable_provisionals: self.sip.reliable_provisionals,
            presence: thalamus_bridge::presence::PresenceConfig {
                max_per_device: self.sip.presence.max_per_device,
                max_per_watcher: self.sip.presence.max_per_watcher,
                max_total: self.sip.presence.max_total,
                min_expires: self.sip.presence.min_expires_secs,
                max_expires: self.sip.presence.max_expires_secs,
                watches_per_device: self.sip.presence.watches_per_device,
                watches_total: self.sip.presence.watches_total,
                watch_expires: self.sip.presence.watch_expires_secs,
                deactivate_departed: self.cluster.heartbeat.is_some(),
            },
        }
    }

    /// The hosts of the outbound proxy and the registrar: where credentials without their own
    /// `hosts` may be sent.
    pub fn trunk_hosts(&self) -> Vec<String> {
        let proxy = self
            .outbound_proxy()
            .ok()
            .flatten()
            .map(|u| u.host.to_string());
        let registrar = self
            .sip
            .registrar
            .as_ref()
            .and_then(|r| thalamus_sip::message::Uri::parse(&r.uri).ok())
            .and_then(|u| u.host().map(|h| h.to_string()));
        proxy.into_iter().chain(registrar).collect()
    }

    /// The SIP user agent's settings (`[sip]`: listen, advertised, outbound proxy, timers).
    pub fn user_agent(&self) -> Result<thalamus_sip::ua::UaConfig, ConfigError> {
        let (advertised_host, advertised_port) = match self.advertised()? {
            Some((host, port)) => (Some(host), port),
            None => (None, None),
        };
        let timers = thalamus_sip::transaction::TimerConfig {
            t1: Duration::from_millis(self.sip.t1_ms.into()),
            t2: Duration::from_millis(self.sip.t2_ms.into()),
            t4: Duration::from_millis(self.sip.t4_ms.into()),
        };
        let limits = &self.sip.limits;
        let mut endpoint = thalamus_sip::endpoint::EndpointConfig::default();
        endpoint.transactions.timers = timers;
        endpoint.transactions.max_transactions = limits.max_transactions;
        endpoint.transactions.per_source = self.sip_source_limits();
        endpoint.exempt_sources = self.sip.inbound.trusted.clone();
        if self.session_timer().is_some() {
            endpoint
                .supported
                .push(thalamus_sip::session_timer::OPTION_TAG.to_string());
        }
        if self.sip.reliable_provisionals {
            endpoint
                .supported
                .push(thalamus_sip::endpoint::RELIABLE_TAG.to_string());
        }
        // INVITE with Replaces (RFC 3891) is taken for a device's answered call.
        endpoint
            .supported
            .push(thalamus_sip::dialog::REPLACES_TAG.to_string());
        // REFER without its implicit subscription (RFC 4488) is taken too.
        endpoint
            .supported
            .push(thalamus_sip::dialog::NOREFERSUB_TAG.to_string());
        endpoint.dialogs.timers = thalamus_sip::dialog::RetransmitTimers {
            t1: timers.t1,
            t2: timers.t2,
        };
        Ok(thalamus_sip::ua::UaConfig {
            transport: thalamus_sip::transport::TransportConfig {
                udp: Some(self.sip.listen),
                tcp: Some(self.sip.listen),
                max_connections: limits.max_tcp_connections,
                max_connections_per_ip: limits.max_tcp_connections_per_ip,
                message_timeout: Duration::from_millis(limits.tcp_message_timeout_ms.into()),
                max_buffered_bytes: limits.tcp_max_buffered_bytes,
                connect_timeout: Duration::from_millis(limits.tcp_connect_timeout_ms.into()),
                max_request_age: Duration::from_millis(limits.max_request_age_ms.into()),
                tls: self.sip.tls.as_ref().map(sip_tls).transpose()?,
                ..Default::default()
            },
            endpoint,
            advertised_host,
            advertised_port,
            outbound_proxy: self.outbound_proxy()?,
            ..Default::default()
        })
    }

    /// The address written into SDP when a relay has none of its own: `media.address`, else
    /// the host of `sip.advertised` when it is an IP address, else the bound SIP address
    /// (127.0.0.1 for a wildcard).
    pub fn media_address(&self, sip_addr: SocketAddr) -> std::net::IpAddr {
        self.media
            .sdp_address()
            .or_else(|| {
                self.advertised()
                    .ok()
                    .flatten()
                    .and_then(|(host, _)| host.ip())
            })
            .unwrap_or_else(|| {
                if sip_addr.ip().is_unspecified() {
                    std::net::IpAddr::from([127, 0, 0, 1])
                } else {
                    sip_addr.ip()
                }
            })
    }

    /// Renders the effective configuration as TOML (for `thalamus config show`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The top-level sections of the configuration (what an override's first word may name).
const SECTIONS: &[&str] = &[
    "node", "quic", "session", "auth", "sip", "admin", "log", "media", "devices", "cluster",
];

/// Applies `THALAMUS_SECTION__KEY=value` to the document: the part after the prefix is split on
/// `__` into a key path, lower-cased. The value is read as a TOML value when it is one (numbers,
/// booleans, arrays), else as a string.
fn apply_env_override(doc: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    if !rest.contains("__") {
        // Other programs' variables share the prefix (THALAMUS_SIM_SECRET for the simulator,
        // THALAMUS_TEST_THREADS for the test script): only one that names a section of ours
        // is a mistyped override.
        let first = rest
            .split('_')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !SECTIONS.contains(&first.as_str()) {
            return Ok(());
        }
    }
    let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Env {
            var: var.into(),
            message: "expected THALAMUS_<SECTION>__<KEY>, e.g. THALAMUS_QUIC__LISTEN".into(),
        });
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut table = doc;
    let (last, parents) = path.split_last().ok_or_else(|| ConfigError::Env {
        var: var.into(),
        message: "empty key".into(),
    })?;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("`{part}` is not a section"),
                })
            }
        };
    }
    table.insert(last.clone(), parsed);
    Ok(())
}

/// A [`ConfigSource`] made of fixed strings, for tests and embedding.
#[derive(Debug, Clone, Default)]
pub struct StaticConfigSource {
    /// File text.
    pub file: Option<String>,
    /// Environment overrides.
    pub env: BTreeMap<String, String>,
}

impl ConfigSource for StaticConfigSource {
    fn file(&self) -> Result<Option<String>, ConfigError> {
        Ok(self.file.clone())
    }
    fn env_overrides(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Resolves a path relative to the data directory unless it is absolute.
pub fn in_data_dir(data_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        data_dir.join(path)
    }
}

/// Whether `text` is `*` or an origin as browsers send it: `http://` or `https://`, then a
/// host (and port), and nothing after.
fn is_origin(text: &str) -> bool {
    if text == "*" {
        return true;
    }
    let Some(authority) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return false;
    };
    !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_window_under_3_s_and_a_bad_log_level_are_refused_by_key() {
        let mut c = Config::default();
        c.session.resume_window_secs = 2;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("session.resume_window_secs"), "{e}");
        let mut c = Config::default();
        c.log.level = "info,thalamus=[[".into();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
        assert!(Config::default().check().is_ok());
    }

    #[test]
    fn webtransport_origins_are_checked_by_key_and_default_to_the_device_pages() {
        let mut c = Config::default();
        c.quic.webtransport = true;
        assert!(c.ingress().webtransport_origins.is_empty());
        c.web.listen = Some("127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            c.ingress().webtransport_origins,
            ["http://127.0.0.1:8080", "http://localhost:8080"]
        );
        c.web.listen = Some("0.0.0.0:8080".parse().unwrap());
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("quic.webtransport_origins"), "{e}");
        c.quic.webtransport_origins = vec!["https://gw.example.com:8443".into()];
        assert!(c.check().is_ok());
        assert_eq!(
            c.ingress().webtransport_origins,
            ["https://gw.example.com:8443"]
        );
        for wrong in [
            "gw.example.com",
            "https://gw.example.com/",
            "ftp://x",
            "https://",
        ] {
            c.quic.webtransport_origins = vec![wrong.into()];
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains("quic.webtransport_origins"), "{wrong}: {e}");
        }
        c.quic.webtransport_origins = vec!["*".into()];
        assert!(c.check().is_ok());
    }

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&StaticConfigSource {
            file: file.map(str::to_string),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn embedded_defaults() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.quic.listen.port(), 4433);
        assert_eq!(c.sip.listen.port(), 5060);
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.node.data_dir, PathBuf::from("thalamus-data"));
        assert_eq!(c.session.max_frame_bytes, 65536);
    }

    #[test]
    fn file_values_and_env_overrides() {
        let c = load(
            Some("[quic]\nlisten = \"127.0.0.1:5000\"\n[session]\nmax_calls = 9\n"),
            &[
                ("THALAMUS_SESSION__MAX_CALLS", "3"),
                ("THALAMUS_NODE__ID", "edge-7"),
            ],
        )
        .unwrap();
        assert_eq!(c.quic.listen.port(), 5000);
        assert_eq!(c.session.max_calls, 3);
        assert_eq!(c.node.id, "edge-7");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(Some("[quic]\nlisten_port = 1\n"), &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("quic"), "{text}");
        assert!(text.contains("listen_port"), "{text}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load(Some("[session]\nmax_calls = \"many\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("session.max_calls"), "{err}");
    }

    #[test]
    fn bad_env_override_is_named() {
        let err = load(None, &[("THALAMUS_QUIC__LISTEN", "not-an-address")]).unwrap_err();
        assert!(err.to_string().contains("quic.listen"), "{err}");
        let err = load(None, &[("THALAMUS_QUIC_LISTEN", "1")]).unwrap_err();
        assert!(err.to_string().contains("THALAMUS_QUIC_LISTEN"), "{err}");
        // Other programs' variables with the prefix are not ours to refuse.
        load(
            None,
            &[("THALAMUS_SIM_SECRET", "x"), ("THALAMUS_TEST_THREADS", "4")],
        )
        .unwrap();
    }

    #[test]
    fn cross_key_checks() {
        let err = load(
            Some("[quic]\nkeepalive_interval_ms = 40000\nidle_timeout_ms = 30000\n"),
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("quic.keepalive_interval_ms"),
            "{err}"
        );
        let err = load(Some("[quic]\ncert = \"/x.pem\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("quic.key"), "{err}");
    }

    #[test]
    fn values_the_node_parses_at_start_are_checked_with_their_key() {
        for (toml, key) in [
            (
                "[sip]\nadvertised = \"gw.example.com:port\"\n",
                "sip.advertised",
            ),
            ("[sip]\nadvertised = \"[::1\"\n", "sip.advertised"),
            (
                "[sip]\noutbound_proxy = \"proxy.example.com\"\n",
                "sip.outbound_proxy",
            ),
            (
                "[sip.registrar]\nuri = \"not a uri\"\n",
                "sip.registrar.uri",
            ),
            (
                "[devices.ear-1.address_book]\nnurse = \"<sip:nurse>\"\n",
                "devices.ear-1.address_book.nurse",
            ),
            ("[auth]\nresume_secret = \"abcd\"\n", "auth.resume_secret"),
        ] {
            let err = load(Some(toml), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
        // Good values pass, and each component gets them parsed.
        let c = load(
            Some(
                "[sip]\nadvertised = \"203.0.113.10:5070\"\noutbound_proxy = \"sip:proxy.example.com;lr\"\n\
                 [session]\narrival_wait_ms = 500\n[cluster]\nreinvite_after_takeover = false\n",
            ),
            &[],
        )
        .unwrap();
        let ua = c.user_agent().unwrap();
        assert_eq!(ua.advertised_port, Some(5070));
        assert!(ua.outbound_proxy.is_some());
        assert_eq!(
            c.media_address("0.0.0.0:5060".parse().unwrap()),
            "203.0.113.10".parse::<std::net::IpAddr>().unwrap()
        );
        let bridge = c.bridge();
        assert_eq!(bridge.arrival_wait, std::time::Duration::from_millis(500));
        assert!(!bridge.reinvite_after_takeover);
        assert_eq!(bridge.node_id, c.node.id);
        let ingress = c.ingress();
        assert_eq!(ingress.listen, c.quic.listen);
        assert_eq!(ingress.max_calls, c.session.max_calls);
    }

    #[test]
    fn device_sections() {
        let c = load(
            Some(
                "[devices.earpiece-1.address_book]\nbob = \"sip:bob@example.com\"\n\n[devices.earpiece-1.auth]\nusername = \"e1\"\npassword = \"p\"\nhosts = [\"example.com\"]\n",
            ),
            &[],
        )
        .unwrap();
        let d = &c.devices["earpiece-1"];
        assert_eq!(d.address_book["bob"], "sip:bob@example.com");
        assert_eq!(d.auth.as_ref().unwrap().username, "e1");
        let err = load(Some("[devices.x]\nnickname = 1\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("nickname"), "{err}");
    }

    #[test]
    fn cluster_section() {
        let c = load(
            Some("[cluster]\nreplication = \"off\"\n[cluster.store]\nbackend = \"memory\"\n"),
            &[("THALAMUS_CLUSTER__LEASE_TTL_MS", "1500")],
        )
        .unwrap();
        assert_eq!(
            c.cluster.replication,
            crate::cluster::config::ReplicationMode::Off
        );
        assert_eq!(c.cluster.lease_ttl_ms, 1500);
        let err = load(Some("[cluster]\nlease_ttl_ms = 1\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("cluster.lease_ttl_ms"), "{err}");
        let err = load(Some("[cluster.store]\nbackend = \"etcd\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("cluster.store"), "{err}");
    }

    #[test]
    fn defaults_render_and_reload() {
        let c = Config::default();
        let again = load(Some(&c.to_toml()), &[]).unwrap();
        assert_eq!(c, again);
    }
}
