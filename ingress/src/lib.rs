//! thalamus-ingress: where devices come in. The QUIC endpoint and its TLS material, the
//! connection limits, the device sessions (the sans-IO [`session::core::SessionCore`] and its
//! tokio driver), resume tokens, the device registry cache and the login throttle.
//!
//! A node binds ingress with [`Ingress::bind`] (so its QUIC address is known before anything
//! else starts), then [`BoundIngress::serve`]s it with what ingress hands device requests to:
//!
//! * [`DeviceRequests`]: calls, texts and media datagrams of live devices, and their comings
//!   and goings. The bridge implements it; tests use a fake.
//! * [`DevicePlacement`]: whether a device that logged in here belongs on another node (a
//!   `Redirect`). The node implements it from the live set the balancers report.
//!
//! This is the only crate that names quinn: the rest of the node sees a device's connection
//! as a [`DeviceLink`] (datagrams out) and its session as a [`SessionHandle`] (frames out, in
//! [`Sessions`]). It knows nothing of SIP and does not decide where devices belong.
#![forbid(unsafe_code)]

pub mod config;
pub mod endpoint;
pub mod metrics;
pub mod registry;
pub mod requests;
pub mod resume;
pub mod session;
mod shared;
pub mod tls;

pub use config::IngressConfig;
pub use endpoint::{BoundIngress, Ingress, IngressDeps, IngressError, RunningIngress};
pub use metrics::IngressMetrics;
pub use registry::{DeviceRegistry, VerifierPool};
pub use requests::{DevicePlacement, DeviceRequests, ServeHere};
pub use resume::{ResumeTokens, SessionId};
pub use session::throttle::{AuthThrottle, ThrottleConfig};
pub use session::{DeviceLink, LinkError, SessionCommand, SessionHandle, Sessions};
