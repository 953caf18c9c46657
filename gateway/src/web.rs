//! The device page (`[web] listen`): a page a browser loads to be a device. It serves the page
//! and its scripts (built into the binary, `gateway/web/`), and `/webtransport.json`: where
//! the node takes WebTransport sessions (`https://<the page's host>:<QUIC port>/mbfp`) and
//! the SHA-256 of the short-lived certificate it serves them, for the browser's
//! `serverCertificateHashes`.
//!
//! What it does not do: no login and no session logic of its own. The page speaks MBFP to the
//! node over WebTransport, with a device's own id and secret, like any device. No TLS: a
//! browser opens WebTransport from a page on `localhost` or `127.0.0.1` (a secure context), or
//! behind a TLS proxy.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What the page needs from the node.
#[derive(Clone)]
pub struct WebPage {
    /// The node's QUIC port (WebTransport comes in on it).
    pub quic_port: u16,
    /// The SHA-256 (hex) of the certificate WebTransport sessions get now.
    pub certificate_hash: Arc<dyn Fn() -> Option<String> + Send + Sync>,
}

impl std::fmt::Debug for WebPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPage")
            .field("quic_port", &self.quic_port)
            .finish_non_exhaustive()
    }
}

const PAGE: &str = include_str!("../web/device.html");
const DEVICE_JS: &str = include_str!("../web/device.js");
const MBFP_JS: &str = include_str!("../web/mbfp.js");

/// Serves the page on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, page: WebPage, shutdown: CancellationToken) {
    let app = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/device.js",
            get(|| async { asset("text/javascript; charset=utf-8", DEVICE_JS) }),
        )
        .route(
            "/mbfp.js",
            get(|| async { asset("text/javascript; charset=utf-8", MBFP_JS) }),
        )
        .route("/webtransport.json", get(webtransport))
        .with_state(page);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "device page stopped");
    }
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Not to be framed by another page (clicks on Call or Answer made for the user).
            (X_FRAME_OPTIONS, "DENY"),
            (CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        ],
        body,
    )
}

/// Where to open the WebTransport session, and the certificate hash to pin.
async fn webtransport(State(page): State<WebPage>, headers: HeaderMap) -> impl IntoResponse {
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_name)
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("localhost")
        .to_string();
    let hashes: Vec<String> = (page.certificate_hash)().into_iter().collect();
    (
        [(CACHE_CONTROL, "no-store")],
        Json(json!({
            "url": format!("https://{host}:{}/mbfp", page.quic_port),
            "certificate_hashes": hashes,
        })),
    )
}

/// The host of a `Host` header, without its port (`[::1]:8080` -> `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn the_host_loses_its_port() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("node.example:80"), "node.example");
    }
}
