//! TLS 1.3 material for the QUIC listener.
//!
//! Loads a PEM certificate chain and key from configured paths, or on first run generates a
//! self-signed certificate into the data directory (`quic-cert.pem`, `quic-key.pem`) and reuses
//! it afterwards. Devices pin it by the SHA-256 fingerprint of its DER encoding. This module
//! builds the rustls/quinn server configuration; it does not open sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
    let mut names = vec!["localhost".to_string()];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_string());
        }
    }
    names.push("127.0.0.1".into());
    names.push("::1".into());
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    std::fs::write(&cert_path, certified.cert.pem()).map_err(io_err(&cert_path))?;
    write_private(&key_path, certified.key_pair.serialize_pem().as_bytes())?;
    let mut material = load_pem(&cert_path, &key_path, true)?;
    material.generated = true;
    Ok(material)
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

/// The quinn server crypto configuration: TLS 1.3 only, ALPN `mbfp/1`, and `h3` too with
/// `webtransport`.
pub fn server_crypto(
    material: &TlsMaterial,
    webtransport: bool,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(material.chain.clone(), material.key.clone_key())?;
    tls.alpn_protocols = vec![thalamus_proto::ALPN.to_vec()];
    if webtransport {
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
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(None, None, dir.path()).unwrap();
        assert!(first.generated);
        assert_eq!(first.fingerprint().len(), 64);
        let second = load_or_generate(None, None, dir.path()).unwrap();
        assert!(!second.generated);
        assert_eq!(first.fingerprint(), second.fingerprint());
        server_crypto(&second, false).unwrap();
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
