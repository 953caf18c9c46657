//! QUIC client set-up for simulated devices: TLS 1.3, ALPN `mbfp/1`, and either a pinned
//! certificate (SHA-256 of the gateway's DER certificate, as the gateway prints it) or the
//! WebPKI roots. Builds configurations and endpoints; speaks no MBFP.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Client set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    /// The fingerprint is not 32 bytes of hex.
    #[error("fingerprint must be 64 hex digits (colons allowed): {0}")]
    BadFingerprint(String),
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn refused the configuration or the socket.
    #[error("QUIC: {0}")]
    Quic(String),
}

/// Parses a fingerprint given as hex, with or without `:` separators.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientSetupError> {
    let clean: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&clean).map_err(|_| ClientSetupError::BadFingerprint(text.into()))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| ClientSetupError::BadFingerprint(text.into()))
}

/// Accepts the certificates pinned, by the SHA-256 of their DER encoding (one per node of a
/// cluster whose nodes each have their own).
#[derive(Debug)]
struct PinnedCert {
    fingerprints: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if self.fingerprints.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The quinn client configuration for MBFP.
pub fn client_config(
    fingerprint: Option<[u8; 32]>,
) -> Result<quinn::ClientConfig, ClientSetupError> {
    client_config_pinned(fingerprint.into_iter().collect())
}

/// [`client_config`] accepting any of `fingerprints` (none: the WebPKI roots).
pub fn client_config_pinned(
    fingerprints: Vec<[u8; 32]>,
) -> Result<quinn::ClientConfig, ClientSetupError> {
    client_config_with(fingerprints, None)
}

/// [`client_config_pinned`] with the device's own QUIC idle timeout (the connection counts as
/// lost after this long without a packet from the gateway; the lower of both sides' applies),
/// keepalives every third of it. `None`: the gateway's, keepalives every 5 s.
pub fn client_config_with(
    fingerprints: Vec<[u8; 32]>,
    idle_timeout: Option<std::time::Duration>,
) -> Result<quinn::ClientConfig, ClientSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match fingerprints.is_empty() {
        false => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprints,
                provider,
            }))
            .with_no_client_auth(),
        true => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![thalamus_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientSetupError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    match idle_timeout {
        Some(idle) => {
            let timeout = quinn::IdleTimeout::try_from(idle)
                .map_err(|_| ClientSetupError::Quic("idle timeout too large".into()))?;
            transport
                .max_idle_timeout(Some(timeout))
                .keep_alive_interval(Some(idle / 3));
        }
        None => {
            transport.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
        }
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client endpoint on an ephemeral port of the right address family for `gateway`.
pub fn client_endpoint(
    gateway: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, ClientSetupError> {
    let bind: SocketAddr = if gateway.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| ClientSetupError::Quic("bind".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| ClientSetupError::Quic("bind".into()))?
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientSetupError::Quic(e.to_string()))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_and_without_colons() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex64).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint("zz").is_err());
    }
}
