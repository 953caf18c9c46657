//! Configuration of `thalamus balancer`: one TOML file (every section denies unknown keys),
//! embedded defaults when there is none. This module only reads and checks; it opens nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thalamus_sip::message::Host;

use crate::membership::MembershipConfig;
use crate::router::RouterConfig;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BalancerConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    /// A key is unknown, has the wrong type or a bad value.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted path of the key, e.g. `heartbeat.miss_count`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole balancer configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BalancerConfig {
    /// The SIP side.
    pub sip: SipSection,
    /// Node heartbeats.
    pub heartbeat: HeartbeatSection,
    /// Admin HTTP (`/nodes`, `/metrics`, `/health`).
    pub admin: AdminSection,
    /// Logging.
    pub log: thalamus_telemetry::LogConfig,
}

/// The SIP side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SipSection {
    /// UDP and TCP address to listen on.
    pub listen: SocketAddr,
    /// `host` or `host:port` written in our Via and Record-Route; defaults to the listen address
    /// (which must then be a specific IP). Without a port, the bound port is used.
    pub advertised: Option<String>,
    /// Other `host:port` values that mean this balancer in a Route or Request-URI.
    pub aliases: Vec<String>,
    /// Gateway domains: requests for `sip:<device>@<domain>` are routed by the device id.
    pub domains: Vec<String>,
    /// Requests larger than this many bytes are sent over TCP.
    pub udp_max_bytes: usize,
    /// Messages queued between the transport and the router before new ones are dropped; 0
    /// (the default): no queue, each message is routed on the task that received it.
    pub queue: usize,
    /// SIP over TLS toward clients and outward destinations (`[sip.tls]`, the gateway's
    /// settings); nodes are reached over UDP (TCP for large requests) as before.
    pub tls: Option<thalamus_sip::transport::tls::TlsSettings>,
}

impl Default for SipSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5060)),
            advertised: None,
            aliases: Vec::new(),
            domains: Vec::new(),
            udp_max_bytes: 1300,
            queue: 0,
            tls: None,
        }
    }
}

/// Node heartbeats.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatSection {
    /// UDP address heartbeats arrive on.
    pub listen: SocketAddr,
    /// Expected time between heartbeats of a node (milliseconds).
    pub interval_ms: u64,
    /// Heartbeats a node may miss before it is taken out.
    pub miss_count: u32,
    /// Consecutive heartbeats a taken-out node needs to come back.
    pub rejoin_count: u32,
    /// A node out for this long is forgotten (seconds).
    pub forget_after_secs: u64,
    /// Most nodes.
    pub max_nodes: usize,
    /// Shared secret (text); when set, heartbeats must carry its HMAC-SHA256 and a timestamp
    /// within `max_skew_ms` of this clock, and only they are answered. Required unless
    /// `listen` is a loopback address or `insecure` is set.
    pub secret: Option<String>,
    /// Accept unauthenticated heartbeats on a non-loopback listener (anyone who reaches the
    /// port can then join a node): for closed lab networks only.
    pub insecure: bool,
    /// Largest difference between a heartbeat's timestamp and this clock (milliseconds).
    pub max_skew_ms: u64,
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5070)),
            interval_ms: 1000,
            miss_count: 3,
            rejoin_count: 2,
            forget_after_secs: 3600,
            max_nodes: 256,
            secret: None,
            insecure: false,
            max_skew_ms: 10_000,
        }
    }
}

/// Admin HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address to serve on.
    pub listen: SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9070)),
        }
    }
}

fn key_error(key: &str, message: impl Into<String>) -> BalancerConfigError {
    BalancerConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

impl BalancerConfig {
    /// Loads `path`, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, BalancerConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| BalancerConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        Self::parse(&text)
    }

    /// Parses TOML text and checks it.
    pub fn parse(text: &str) -> Result<Self, BalancerConfigError> {
        let doc = text
            .parse::<toml::Table>()
            .map_err(|e| BalancerConfigError::Syntax(e.to_string()))?;
        let config: BalancerConfig = serde_path_to_error::deserialize(toml::Value::Table(doc))
            .map_err(|e: serde_path_to_error::Error<toml::de::Error>| {
                key_error(&e.path().to_string(), e.inner().message())
            })?;
        config.check()?;
        Ok(config)
    }

    /// Cross-key checks that serde cannot express.
    pub fn check(&self) -> Result<(), BalancerConfigError> {
        let hb = &self.heartbeat;
        if !(10..=60_000).contains(&hb.interval_ms) {
            return Err(key_error("heartbeat.interval_ms", "must be 10 to 60000"));
        }
        if !(1..=100).contains(&hb.miss_count) {
            return Err(key_error("heartbeat.miss_count", "must be 1 to 100"));
        }
        if !(1..=100).contains(&hb.rejoin_count) {
            return Err(key_error("heartbeat.rejoin_count", "must be 1 to 100"));
        }
        if !(1..=65_536).contains(&hb.max_nodes) {
            return Err(key_error("heartbeat.max_nodes", "must be 1 to 65536"));
        }
        if hb.secret.as_deref() == Some("") {
            return Err(key_error("heartbeat.secret", "must not be empty"));
        }
        if hb.secret.is_none() && !hb.listen.ip().is_loopback() && !hb.insecure {
            return Err(key_error(
                "heartbeat.secret",
                "required when heartbeat.listen is not a loopback address: without it anyone \
                 who reaches the port can join a node (set heartbeat.insecure = true to allow \
                 that on a closed network)",
            ));
        }
        if !(100..=600_000).contains(&hb.max_skew_ms) {
            return Err(key_error("heartbeat.max_skew_ms", "must be 100 to 600000"));
        }
        if !(200..=65_000).contains(&self.sip.udp_max_bytes) {
            return Err(key_error("sip.udp_max_bytes", "must be 200 to 65000"));
        }
        if self.sip.queue != 0 && !(16..=1_000_000).contains(&self.sip.queue) {
            return Err(key_error(
                "sip.queue",
                "must be 0 (no queue) or 16 to 1000000",
            ));
        }
        match &self.sip.advertised {
            Some(a) if Host::parse_with_port(a).is_none() => {
                return Err(key_error("sip.advertised", "must be host or host:port"))
            }
            None if self.sip.listen.ip().is_unspecified() => {
                return Err(key_error(
                    "sip.advertised",
                    "required when sip.listen is a wildcard address",
                ))
            }
            _ => {}
        }
        for (i, a) in self.sip.aliases.iter().enumerate() {
            if !matches!(Host::parse_with_port(a), Some((_, Some(_)))) {
                return Err(key_error(&format!("sip.aliases[{i}]"), "must be host:port"));
            }
        }
        for (i, d) in self.sip.domains.iter().enumerate() {
            if !matches!(Host::parse(d), Ok(Host::Domain(_))) {
                return Err(key_error(
                    &format!("sip.domains[{i}]"),
                    "must be a domain name",
                ));
            }
        }
        Ok(())
    }

    /// The liveness settings.
    pub fn membership(&self) -> MembershipConfig {
        MembershipConfig {
            interval: Duration::from_millis(self.heartbeat.interval_ms),
            miss_count: self.heartbeat.miss_count,
            rejoin_count: self.heartbeat.rejoin_count,
            forget_after: Duration::from_secs(self.heartbeat.forget_after_secs),
            max_nodes: self.heartbeat.max_nodes,
        }
    }

    /// The routing settings, given the port the SIP listener is bound to.
    pub fn router(&self, bound_sip: SocketAddr) -> RouterConfig {
        let (host, port) = match self
            .sip
            .advertised
            .as_deref()
            .and_then(Host::parse_with_port)
        {
            Some((h, p)) => (h, p.unwrap_or(bound_sip.port())),
            None => (Host::from(bound_sip.ip()), bound_sip.port()),
        };
        let mut aliases: Vec<(Host, u16)> = self
            .sip
            .aliases
            .iter()
            .filter_map(|a| match Host::parse_with_port(a) {
                Some((h, Some(p))) => Some((h, p)),
                _ => None,
            })
            .collect();
        if !bound_sip.ip().is_unspecified() {
            aliases.push((Host::from(bound_sip.ip()), bound_sip.port()));
        }
        RouterConfig {
            advertised_host: host,
            advertised_port: port,
            aliases,
            domains: self.sip.domains.clone(),
            udp_max_bytes: self.sip.udp_max_bytes,
            tls_port: None,
        }
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_an_advertised_address() {
        let err = BalancerConfig::parse("").unwrap_err();
        assert!(err.to_string().contains("sip.advertised"), "{err}");
        let c = BalancerConfig::parse("[sip]\nadvertised = \"lb.example.net\"\n").unwrap();
        assert_eq!(c.heartbeat.interval_ms, 1000);
        assert_eq!(c.heartbeat.miss_count, 3);
        assert_eq!(c.heartbeat.rejoin_count, 2);
        let r = c.router("0.0.0.0:5080".parse().unwrap());
        assert_eq!(r.advertised_host, Host::Domain("lb.example.net".into()));
        assert_eq!(r.advertised_port, 5080);
        assert!(r.aliases.is_empty());
    }

    #[test]
    fn full_file_parses() {
        let text = r#"
[sip]
listen = "127.0.0.1:5080"
advertised = "192.0.2.1:5060"
aliases = ["lb.example.net:5060"]
domains = ["gw.example.net"]
udp_max_bytes = 1200

[heartbeat]
listen = "127.0.0.1:5070"
interval_ms = 200
miss_count = 4
rejoin_count = 3
secret = "k"

[admin]
listen = "127.0.0.1:9071"

[log]
level = "debug"
format = "json"
"#;
        let c = BalancerConfig::parse(text).unwrap();
        let m = c.membership();
        assert_eq!(m.interval, Duration::from_millis(200));
        assert_eq!(m.miss_count, 4);
        assert_eq!(m.rejoin_count, 3);
        let r = c.router("127.0.0.1:5080".parse().unwrap());
        assert_eq!(r.advertised_port, 5060);
        assert_eq!(r.aliases.len(), 2);
        assert_eq!(r.domains, vec!["gw.example.net".to_string()]);
        assert_eq!(BalancerConfig::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn errors_name_the_key() {
        let e = BalancerConfig::parse("[sip]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e =
            BalancerConfig::parse("[sip]\nlisten = \"127.0.0.1:1\"\n[heartbeat]\nmiss_count = 0\n")
                .unwrap_err();
        assert!(e.to_string().contains("heartbeat.miss_count"), "{e}");
        let e = BalancerConfig::parse("[heartbeat]\ninterval_ms = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("heartbeat.interval_ms"), "{e}");
        let e =
            BalancerConfig::parse("[sip]\nlisten = \"127.0.0.1:1\"\ndomains = [\"10.0.0.1\"]\n")
                .unwrap_err();
        assert!(e.to_string().contains("sip.domains[0]"), "{e}");
        assert!(matches!(
            BalancerConfig::load(Some(Path::new("/nonexistent/x.toml"))),
            Err(BalancerConfigError::Read { .. })
        ));
    }

    #[test]
    fn a_heartbeat_listener_off_loopback_needs_a_secret() {
        let open = "[sip]\nlisten = \"127.0.0.1:5060\"\n[heartbeat]\nlisten = \"0.0.0.0:5070\"\n";
        let e = BalancerConfig::parse(open).unwrap_err();
        assert!(e.to_string().contains("heartbeat.secret"), "{e}");
        BalancerConfig::parse(&format!("{open}secret = \"s3cret\"\n")).unwrap();
        BalancerConfig::parse(&format!("{open}insecure = true\n")).unwrap();
        // Loopback (the default) needs none.
        BalancerConfig::parse("[sip]\nlisten = \"127.0.0.1:5060\"\n").unwrap();
        BalancerConfig::parse(
            "[sip]\nlisten = \"127.0.0.1:5060\"\n[heartbeat]\nlisten = \"[::1]:5070\"\n",
        )
        .unwrap();
    }
}
