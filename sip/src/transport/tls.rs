//! TLS settings for the SIP transport, built from PEM: the server side (our certificate chain
//! and key, for connections we accept) and the client side (the roots that servers we connect
//! to must chain to, and whether their certificates are checked at all); and [`TlsSettings`],
//! the `[sip.tls]` configuration section the gateway and the balancer share, which reads the
//! files and names the key at fault.
//!
//! What it does not do: no client certificates (mutual TLS), no certificate revocation, no
//! session resumption settings beyond rustls' defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM holds no certificate.
    #[error("no certificate in the PEM")]
    NoCertificate,
    /// The PEM holds no private key.
    #[error("no private key in the PEM")]
    NoKey,
    /// The PEM could not be read.
    #[error("unreadable PEM: {0}")]
    Pem(String),
    /// rustls refused the settings (a key that does not match the certificate, say).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM bundle.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// The server side: our certificate chain (leaf first) and its private key, both PEM.
pub fn server_config(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(chain_pem)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| TlsError::Pem(e.to_string()))?
        .ok_or(TlsError::NoKey)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The client side: servers must present a certificate chaining to one of `roots_pem` and
/// naming the host; with `verify` false any certificate is taken (for a lab only: anyone on
/// the path can then read and change the signalling).
pub fn client_config(roots_pem: &[u8], verify: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = if verify {
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certificates(roots_pem)?);
        if added == 0 {
            return Err(TlsError::NoCertificate);
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Takes any server certificate (its signatures are still checked, so the handshake is
/// sound; who holds the key is not).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The system's bundle of trusted roots (Debian's `ca-certificates`).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// SIP over TLS as configured (`[sip.tls]`, RFC 3261 section 26): a listener with our
/// certificate, and the roots the servers we connect to must chain to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Address to listen on for TLS, e.g. `0.0.0.0:5061` (unset: outbound TLS only).
    pub listen: Option<SocketAddr>,
    /// PEM file: the certificate chain (leaf first) presented. Needed to listen.
    pub certificate: Option<PathBuf>,
    /// PEM file: the certificate's private key.
    pub private_key: Option<PathBuf>,
    /// PEM file: the roots servers' certificates must chain to (default: the system bundle,
    /// [`SYSTEM_ROOTS`]).
    pub ca_certificates: Option<PathBuf>,
    /// Check the certificates of the servers connected to (their chain, and that they name the
    /// host). Turning it off lets anyone on the path read and change the signalling, SRTP keys
    /// included: for a lab only.
    pub verify_server: bool,
    /// Longest a TLS handshake may take, either way (milliseconds).
    pub handshake_timeout_ms: u32,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            listen: None,
            certificate: None,
            private_key: None,
            ca_certificates: None,
            verify_server: true,
            handshake_timeout_ms: 5_000,
        }
    }
}

/// A [`TlsSettings`] key that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct TlsSettingsError {
    /// The dotted key, e.g. `sip.tls.certificate`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl TlsSettings {
    /// The transport's TLS settings, with the files read; errors name the key under `section`
    /// (e.g. `sip.tls`).
    pub fn transport(&self, section: &str) -> Result<super::TlsTransportConfig, TlsSettingsError> {
        let error = |key: &str, message: String| TlsSettingsError {
            key: format!("{section}.{key}"),
            message,
        };
        let read = |key: &str, path: &Path| {
            std::fs::read(path).map_err(|e| error(key, format!("{}: {e}", path.display())))
        };
        let server = match (&self.certificate, &self.private_key) {
            (Some(chain), Some(private_key)) => Some(
                server_config(
                    &read("certificate", chain)?,
                    &read("private_key", private_key)?,
                )
                .map_err(|e| error("certificate", e.to_string()))?,
            ),
            (None, None) if self.listen.is_none() => None,
            (None, _) => {
                return Err(error(
                    "certificate",
                    "needed to listen for TLS (with private_key)".into(),
                ))
            }
            (Some(_), None) => return Err(error("private_key", "needed with certificate".into())),
        };
        let roots = if self.verify_server {
            let path = self
                .ca_certificates
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
            read("ca_certificates", &path)?
        } else {
            Vec::new()
        };
        let client = client_config(&roots, self.verify_server)
            .map_err(|e| error("ca_certificates", e.to_string()))?;
        if self.handshake_timeout_ms < 100 {
            return Err(error("handshake_timeout_ms", "must be at least 100".into()));
        }
        Ok(super::TlsTransportConfig {
            listen: self.listen,
            server,
            client,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms.into()),
        })
    }
}
