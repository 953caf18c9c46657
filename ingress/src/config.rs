//! What ingress is configured with ([`IngressConfig`]): the node's `[quic]`, `[session]` and
//! `[auth]` settings it uses, already checked by the node's configuration. Settings only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::session::throttle::ThrottleConfig;

/// What ingress is configured with: the node's `[quic]`, `[session]` and `[auth]` settings it
/// uses, already checked by the node's configuration.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// This node's id (in `Welcome`).
    pub node_id: String,
    /// The SIP domain of device addresses-of-record (`sip:<device>@<domain>` in `Welcome`).
    pub sip_domain: String,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// Receive and send buffer of the QUIC socket (bytes; 0 keeps the system default).
    pub socket_buffer_bytes: u32,
    /// PEM certificate chain and key; with none, a self-signed pair is generated in `data_dir`.
    pub cert: Option<PathBuf>,
    /// PEM private key (with `cert`).
    pub key: Option<PathBuf>,
    /// Where a generated certificate is kept.
    pub data_dir: PathBuf,
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections at once from one source IP address.
    pub max_connections_per_ip: usize,
    /// Time a device has to send `Hello`.
    pub hello_timeout: Duration,
    /// MBFP and QUIC keepalive interval.
    pub keepalive_interval: Duration,
    /// A session with no frames for this long is closed.
    pub idle_timeout: Duration,
    /// Largest datagram accepted (announced in `Welcome`).
    pub max_datagram_bytes: u32,
    /// Largest control frame.
    pub max_frame_bytes: u32,
    /// Frames queued toward one device before its session is closed as too slow.
    pub send_queue_frames: u32,
    /// Calls per device (announced in `Welcome`).
    pub max_calls: u32,
    /// Largest text body (announced in `Welcome`).
    pub max_text_bytes: u32,
    /// The login throttle per source address.
    pub throttle: ThrottleConfig,
    /// The login throttle per device id (wrong secrets only; a device's known secret passes).
    pub device_throttle: ThrottleConfig,
    /// Credential checks one source address may have in flight at once.
    pub max_pending_logins_per_ip: usize,
    /// Accept WebTransport sessions (HTTP/3, ALPN `h3`, path [`WEBTRANSPORT_PATH`]) on the
    /// same endpoint, beside raw QUIC (ALPN `mbfp/1`).
    pub webtransport: bool,
    /// The page origins allowed to open WebTransport sessions ([`origin_allowed`]).
    pub webtransport_origins: Vec<String>,
}

/// Whether a WebTransport CONNECT with this `Origin` header may go on: a native client sends
/// none and is not checked (its credentials are); a browser names its page's origin, which
/// must be one of `allowed` (ASCII case aside) unless `allowed` lists `*`.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    origin.is_none_or(|origin| {
        let origin = canonical_origin(origin);
        allowed
            .iter()
            .any(|a| a == "*" || canonical_origin(a) == origin)
    })
}

/// An origin in lower case without its scheme's default port (`:80` for `http`, `:443` for
/// `https`), which browsers leave out.
fn canonical_origin(origin: &str) -> String {
    let origin = origin.to_ascii_lowercase();
    for (scheme, port) in [("http://", ":80"), ("https://", ":443")] {
        if origin.starts_with(scheme) {
            if let Some(bare) = origin.strip_suffix(port) {
                return bare.to_string();
            }
        }
    }
    origin
}

/// The URL path of the WebTransport session a device opens (`https://<node>:<port>/mbfp`).
pub const WEBTRANSPORT_PATH: &str = "/mbfp";

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn a_native_client_passes_and_a_browser_needs_a_listed_origin() {
        let page = vec!["http://127.0.0.1:8080".to_string()];
        assert!(origin_allowed(&page, None));
        assert!(origin_allowed(&page, Some("http://127.0.0.1:8080")));
        assert!(origin_allowed(&page, Some("HTTP://127.0.0.1:8080")));
        assert!(!origin_allowed(&page, Some("http://127.0.0.1:8081")));
        assert!(!origin_allowed(&page, Some("https://evil.example")));
        assert!(!origin_allowed(&page, Some("null")));
        assert!(!origin_allowed(&[], Some("http://127.0.0.1:8080")));
        assert!(origin_allowed(
            &["*".to_string()],
            Some("https://any.example")
        ));
        // Browsers leave the scheme's default port out.
        let default_ports = vec![
            "http://127.0.0.1:80".to_string(),
            "https://gw.example:443".to_string(),
        ];
        assert!(origin_allowed(&default_ports, Some("http://127.0.0.1")));
        assert!(origin_allowed(&default_ports, Some("https://gw.example")));
        assert!(origin_allowed(
            &default_ports,
            Some("https://gw.example:443")
        ));
        assert!(!origin_allowed(&default_ports, Some("http://gw.example")));
        assert!(!origin_allowed(&default_ports, Some("https://127.0.0.1")));
        let bare = vec!["https://gw.example".to_string()];
        assert!(origin_allowed(&bare, Some("https://gw.example:443")));
    }
}
