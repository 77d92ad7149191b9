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

/// PEM texts of the pieces.
#[derive(Default)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The root's revocation list (empty when there is none) and its number.
    pub crl_pem: String,
    pub crl_number: u64,
}

impl TlsMaterial {
    /// Reads `ca.pem`, `server.pem`, `server.key` and, when present,
    /// `crl.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        let ca_pem = read("ca.pem")?;
        let (crl_pem, crl_number) = read_crl(dir, &ca_pem)?;
        Ok(TlsMaterial { ca_pem, cert_pem: read("server.pem")?, key_pem: read("server.key")?, crl_pem, crl_number })
    }
}

/// The revocation list in `dir` (empty when there is none) and its
/// number, read from the list and counted only when one of the CAs in
/// `ca_pem` signed it (0 otherwise).
pub fn read_crl(dir: &Path, ca_pem: &str) -> Result<(String, u64), TlsError> {
    let path = dir.join("crl.pem");
    let pem = match std::fs::read_to_string(&path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
        Err(source) => return Err(TlsError::Read { path, source }),
    };
    let number = mlops_proto::der::verified_crl_number(&pem, ca_pem).unwrap_or(0);
    Ok((pem, number))
}

/// Who is on the other end of a connection: the common name of its client
/// certificate (the operator's name, see `mlops_pki`) and the sha256 of that
/// certificate; recorded with what it deploys.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub operator: String,
    pub cert_sha256: String,
}

impl Peer {
    pub fn from_certs(certs: Option<&[CertificateDer<'_>]>) -> Self {
        use sha2::{Digest, Sha256};
        let leaf = certs.and_then(|c| c.first());
        Peer {
            operator: leaf.and_then(|c| operator_of(c)).unwrap_or_default(),
            cert_sha256: leaf.map(|c| hex::encode(Sha256::digest(c))).unwrap_or_default(),
        }
    }
}

/// The operator a verified client certificate speaks for. A certificate
/// issued by an operator's CA (`mlopsctl operator NAME ...`, signed by the
/// root) is that operator's whatever name it gives itself (an operator's
/// CA issues any name it likes); one the root issued directly is the
/// root's holder's, named by its common name.
pub fn operator_of(leaf: &[u8]) -> Option<String> {
    let issuer = mlops_proto::der::issuer_common_name(leaf)?;
    match issuer.strip_prefix("mlopsctl operator ").and_then(|rest| rest.split_whitespace().next()) {
        Some(name) => Some(name.to_string()),
        None => mlops_proto::der::subject_common_name(leaf),
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
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !material.crl_pem.trim().is_empty() {
        let crls: Vec<_> = rustls_pemfile::crls(&mut material.crl_pem.as_bytes()).filter_map(Result::ok).collect();
        if crls.is_empty() {
            return Err(TlsError::Empty { what: "the revocation list".into(), kind: "CRL" });
        }
        // The root's list covers the operators' CAs it issued; their own
        // leaves have no list (an operator is revoked as a whole).
        builder = builder.with_crls(crls).allow_unknown_revocation_status();
    }
    let verifier = builder.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_is_the_client_certificates_common_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = mlops_pki::Ca::open_or_create(dir.path()).unwrap();
        let client = ca.client_identity().unwrap();
        let der = parse_certs(&client.cert_pem, "client").unwrap().remove(0);
        assert_eq!(operator_of(&der).unwrap(), ca.operator_name());
        // Cut anywhere, it is no certificate; nothing panics.
        for n in 0..der.len() {
            let _ = operator_of(&der[..n]);
            let _ = mlops_proto::der::not_after_unix(&der[..n]);
        }
        assert_eq!(operator_of(b"\x30\x84\xff\xff\xff\xff"), None);
        let not_after = mlops_proto::der::not_after_unix(&der).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((not_after - now - 397 * 86_400).abs() < 2 * 3600, "{not_after} vs {now}");

        // An operator's certificates speak for the operator, whatever
        // common name they give themselves.
        let grant = ca.issue_operator("bob").unwrap();
        let bob = mlops_pki::join(&dir.path().join("bob"), &grant).unwrap();
        let client = bob.client_identity().unwrap();
        let der = parse_certs(&client.cert_pem, "client").unwrap().remove(0);
        assert_eq!(operator_of(&der).unwrap(), "bob");
    }
}
