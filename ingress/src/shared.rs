//! What every session driver of a served ingress shares. Data only.

use std::sync::Arc;

use crate::config::IngressConfig;
use crate::metrics::IngressMetrics;
use crate::registry::{DeviceRegistry, VerifierPool};
use crate::requests::{DevicePlacement, DeviceRequests};
use crate::resume::ResumeTokens;
use crate::session::throttle::AuthThrottle;
use crate::session::Sessions;

/// What the session drivers share.
pub(crate) struct Shared {
    pub(crate) config: IngressConfig,
    /// The short-lived certificate of WebTransport connections, when they are taken.
    pub(crate) webtransport_certs: Option<Arc<crate::tls::WebTransportCerts>>,
    pub(crate) metrics: IngressMetrics,
    pub(crate) registry: Arc<DeviceRegistry>,
    pub(crate) tokens: ResumeTokens,
    pub(crate) throttle: AuthThrottle,
    pub(crate) device_throttle: AuthThrottle<String>,
    /// Credential checks in flight per source address.
    pub(crate) pending_logins:
        dashmap::DashMap<std::net::IpAddr, std::sync::Arc<tokio::sync::Semaphore>>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) requests: Arc<dyn DeviceRequests>,
    pub(crate) placement: Arc<dyn DevicePlacement>,
    pub(crate) verifier: VerifierPool,
}
