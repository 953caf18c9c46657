//! TLS 1.3 material for the QUIC listener.
//!
//! Loads a PEM certificate chain and key from configured paths, or on first run generates a
//! self-signed certificate into the data directory (`quic-cert.pem`, `quic-key.pem`) and reuses
//! it afterwards. Devices pin it by the SHA-256 fingerprint of its DER encoding. With
//! WebTransport on, browsers (ALPN `h3`) get a short-lived certificate instead
//! ([`WebTransportCerts`]), as they require for one pinned by its hash. This module builds the
//! rustls/quinn server configuration; it does not open sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// TLS set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The PEM holds no certificate or no key.
    #[error("{path}: {what}")]
    Pem {
        /// File path.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// A certificate chain and its key, with where they came from.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// Whether it was generated on this run.
    pub generated: bool,
    /// Path of the certificate file.
    pub cert_path: PathBuf,
}

impl TlsMaterial {
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map(|c| fingerprint(c.as_ref()))
            .unwrap_or_default()
    }
}

/// SHA-256 of `der`, lower-case hex (the form `thalamus-sim --fingerprint` takes).
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the configured certificate and key, or the generated pair in `data_dir` (creating it
/// on first use).
pub fn load_or_generate(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
) -> Result<TlsMaterial, TlsError> {
    if let (Some(cert), Some(key)) = (cert, key) {
        return load_pem(cert, key, false);
    }
    let cert_path = data_dir.join("quic-cert.pem");
    let key_path = data_dir.join("quic-key.pem");
    if cert_path.exists() && key_path.exists() {
        return load_pem(&cert_path, &key_path, false);
    }
    std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let names = own_names();
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    std::fs::write(&cert_path, certified.cert.pem()).map_err(io_err(&cert_path))?;
    write_private(&key_path, certified.key_pair.serialize_pem().as_bytes())?;
    let mut material = load_pem(&cert_path, &key_path, true)?;
    material.generated = true;
    Ok(material)
}

/// The names a generated certificate carries: `localhost`, the host name, the loopback
/// addresses.
fn own_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_string());
        }
    }
    names.push("127.0.0.1".into());
    names.push("::1".into());
    names
}

/// How long the certificate for WebTransport lasts. Browsers take a certificate pinned by its
/// hash (`serverCertificateHashes`) only when it is valid for at most 14 days and ECDSA.
pub const WEBTRANSPORT_CERT_LIFETIME: Duration = Duration::from_secs(13 * 24 * 3600);
/// A certificate for WebTransport is replaced once it is this old.
pub const WEBTRANSPORT_CERT_RENEW_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);

/// The short-lived self-signed certificate served to WebTransport (ALPN `h3`) connections:
/// ECDSA P-256, valid [`WEBTRANSPORT_CERT_LIFETIME`] from an hour before it was made, made
/// again when it is [`WEBTRANSPORT_CERT_RENEW_AFTER`] old (so it is always valid for about a
/// week more). Raw QUIC devices keep the node's own certificate. Lives only in memory: a
/// browser page learns its hash from the node; a page that read the hash just before a
/// renewal fails its handshake once and must reload.
#[derive(Debug)]
pub struct WebTransportCerts {
    current: std::sync::RwLock<WebTransportCert>,
}

#[derive(Debug, Clone)]
struct WebTransportCert {
    key: Arc<CertifiedKey>,
    hash: String,
    made: SystemTime,
}

impl WebTransportCerts {
    /// Makes the first certificate.
    pub fn new() -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(make_webtransport_cert(SystemTime::now())?),
        }))
    }

    /// The SHA-256 (lower-case hex) of the certificate served now, for a page's
    /// `serverCertificateHashes`.
    pub fn hash(&self) -> String {
        self.served(SystemTime::now()).1
    }

    /// The certificate to serve at `now` (made again first when due), with its hash. The new
    /// one is made outside the lock; a lock poisoned by a panic elsewhere is used as it is.
    fn served(&self, now: SystemTime) -> (Arc<CertifiedKey>, String) {
        let due = |cert: &WebTransportCert| {
            now.duration_since(cert.made)
                .is_ok_and(|age| age >= WEBTRANSPORT_CERT_RENEW_AFTER)
        };
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if !due(&current) {
            return (current.key, current.hash);
        }
        match make_webtransport_cert(now) {
            Ok(fresh) => {
                let mut slot = self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if due(&slot) {
                    *slot = fresh;
                }
                (slot.key.clone(), slot.hash.clone())
            }
            Err(e) => {
                tracing::warn!(error = %e, "WebTransport certificate not renewed");
                (current.key, current.hash)
            }
        }
    }
}

fn make_webtransport_cert(now: SystemTime) -> Result<WebTransportCert, TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(own_names()).map_err(generate)?;
    let from = now
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    params.not_before = from.into();
    params.not_after = (from + WEBTRANSPORT_CERT_LIFETIME).into();
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let cert = params.self_signed(&key_pair).map_err(generate)?;
    let der = CertificateDer::from(cert.der().to_vec());
    let private = PrivateKeyDer::try_from(key_pair.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)?;
    let hash = fingerprint(der.as_ref());
    Ok(WebTransportCert {
        key: Arc::new(CertifiedKey::new(vec![der], signing)),
        hash,
        made: now,
    })
}

/// Picks the certificate by the ALPN a client offers: WebTransport's short-lived one for
/// `h3`, the node's own otherwise.
#[derive(Debug)]
struct ByAlpn {
    own: Arc<CertifiedKey>,
    webtransport: Arc<WebTransportCerts>,
}

impl ResolvesServerCert for ByAlpn {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let h3 = web_transport_quinn::ALPN.as_bytes();
        let wants_h3 = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == h3));
        if wants_h3 {
            Some(self.webtransport.served(SystemTime::now()).0)
        } else {
            Some(self.own.clone())
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))
}

fn load_pem(cert: &Path, key: &Path, generated: bool) -> Result<TlsMaterial, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(io_err(cert))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(io_err(cert))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            what: "no CERTIFICATE block",
        });
    }
    let key_pem = std::fs::read(key).map_err(io_err(key))?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(io_err(key))?
        .ok_or_else(|| TlsError::Pem {
            path: key.to_path_buf(),
            what: "no PRIVATE KEY block",
        })?;
    Ok(TlsMaterial {
        chain,
        key: key_der,
        generated,
        cert_path: cert.to_path_buf(),
    })
}

/// The quinn server crypto configuration: TLS 1.3 only, ALPN `mbfp/1`; with `webtransport`,
/// `h3` too, whose connections get the short-lived certificate of [`WebTransportCerts`].
pub fn server_crypto(
    material: &TlsMaterial,
    webtransport: Option<&Arc<WebTransportCerts>>,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth();
    let mut tls = match webtransport {
        Some(certs) => {
            let signing = rustls::crypto::ring::sign::any_supported_type(&material.key)?;
            builder.with_cert_resolver(Arc::new(ByAlpn {
                own: Arc::new(CertifiedKey::new(material.chain.clone(), signing)),
                webtransport: certs.clone(),
            }))
        }
        None => builder.with_single_cert(material.chain.clone(), material.key.clone_key())?,
    };
    tls.alpn_protocols = vec![thalamus_proto::ALPN.to_vec()];
    if webtransport.is_some() {
        tls.alpn_protocols
            .push(web_transport_quinn::ALPN.as_bytes().to_vec());
    }
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webtransport_certificate_is_replaced_when_a_week_old() {
        let certs = WebTransportCerts::new().unwrap();
        let made = certs.current.read().unwrap().made;
        let (first_key, first) = certs.served(made);
        assert_eq!(certs.hash(), first);
        assert_eq!(first_key.cert.len(), 1);
        assert_eq!(fingerprint(first_key.cert[0].as_ref()), first);
        // Five days on: the same; six: a new one, served from then on.
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(certs.served(made + 5 * day).1, first);
        let (_, second) = certs.served(made + 6 * day);
        assert_ne!(second, first);
        assert_eq!(certs.served(made + 7 * day).1, second);
        assert!(WEBTRANSPORT_CERT_LIFETIME + Duration::from_secs(3600) <= 14 * day);
    }

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(None, None, dir.path()).unwrap();
        assert!(first.generated);
        assert_eq!(first.fingerprint().len(), 64);
        let second = load_or_generate(None, None, dir.path()).unwrap();
        assert!(!second.generated);
        assert_eq!(first.fingerprint(), second.fingerprint());
        server_crypto(&second, None).unwrap();
    }

    #[test]
    fn configured_paths_win_and_bad_pem_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a pem").unwrap();
        let err = load_or_generate(Some(&bad), Some(&bad), dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err}");
    }
}
