//! TLS for the agent's listener: the host's server certificate, and client
//! authentication against the controller's CA only. A client without a
//! certificate, or with one from any other issuer, fails the handshake and
//! never reaches an RPC handler.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} holds no PEM {kind}")]
    Empty { what: String, kind: &'static str },
    #[error("invalid TLS material: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid CA certificate: {0}")]
    Verifier(String),
}

/// PEM texts of the three pieces.
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsMaterial {
    /// Reads `ca.pem`, `server.pem` and `server.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(TlsMaterial { ca_pem: read("ca.pem")?, cert_pem: read("server.pem")?, key_pem: read("server.key")? })
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes()).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Empty { what: what.to_string(), kind: "certificate" });
    }
    Ok(certs)
}

pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or(TlsError::Empty { what: what.to_string(), kind: "private key" })
}

/// The server configuration: our identity, and mandatory client
/// certificates issued by the controller's CA. HTTP/2 only (gRPC).
pub fn server_config(material: &TlsMaterial) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in parse_certs(&material.ca_pem, "the CA file")? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&material.cert_pem, "the server certificate")?,
            parse_key(&material.key_pem, "the server key")?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
