//! The controller's certificate authority.
//!
//! The controller owns one CA, kept in `<state-dir>/pki/`. From it, each
//! managed host gets a server certificate (delivered to the host over SSH and
//! used by `mlops-agent` for TLS) and the controller gets one client
//! certificate. The agent accepts only clients whose certificate chains to
//! this CA, so the CA key is the controller's authority over every host.
//!
//! Layout of the `pki/` directory (private keys are mode 0600, the directory
//! 0700; every file is written to a temporary name and renamed, so a crash
//! never leaves half a key):
//!
//! ```text
//! ca.pem  ca.key  ca.json             the authority (json: its subject and validity)
//! client.pem  client.key  client.json the controller's client identity
//! hosts/<name>/server.pem|key|json    one server identity per managed host
//! ```
//!
//! Rotation (`mlopsctl pki rotate`): a second CA is made in `next/` and
//! issues every host a new server certificate while agents trust both CAs;
//! then [`Ca::promote_next`] retires the old CA and its leaves to
//! `retired/<fingerprint>/` and moves the new one in. The move is journalled
//! in `next/.promoting` so a crash half-way is finished on the next open,
//! never mistaken for a missing CA.
//!
//! Certificates are ECDSA P-256. The `*.json` files record what the
//! certificate says (validity, issuing CA fingerprint) so that reuse decisions
//! need no X.509 parser.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// The DNS name the server certificate of host `host` carries, and the
/// only name the controller accepts when it means to reach that host: one
/// host's agent key (stolen, or a process that took the port of a stopped
/// agent with it) cannot pass for another host's agent. A hash, because
/// inventory names are not DNS names; independent of the CA, so a CA
/// rotation keeps it.
pub fn agent_tls_name(host: &str) -> String {
    let h = hex::encode(Sha256::digest(format!("mlops-agent\0{host}")));
    format!("h{}.agents.mlops", &h[..24])
}

/// Where a rotation's new CA grows, and its journal.
const NEXT: &str = "next";
const JOURNAL: &str = ".promoting";

const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(397);
/// A leaf certificate this close to expiry is replaced on the next deploy.
const RENEW_BEFORE: Duration = Duration::days(30);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid {what}")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("host name `{0}` cannot be used as a directory name")]
    BadHostName(String),
}

type Result<T, E = PkiError> = std::result::Result<T, E>;

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    // Never print key material, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// What the `*.json` sidecar of a certificate records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    common_name: String,
    not_after_unix: i64,
    /// sha256 of the issuing CA's certificate (DER), hex; empty for the CA.
    issuer_fingerprint: String,
    /// The DNS name a server certificate carries ([`agent_tls_name`]);
    /// empty otherwise (and in certificates of versions before it).
    tls_name: String,
}

impl Meta {
    fn to_text(&self) -> String {
        format!(
            "common_name={}\nnot_after_unix={}\nissuer_fingerprint={}\ntls_name={}\n",
            self.common_name, self.not_after_unix, self.issuer_fingerprint, self.tls_name
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut cn = None;
        let mut not_after = None;
        let mut issuer = None;
        let mut tls_name = String::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "common_name" => cn = Some(v.to_string()),
                "not_after_unix" => not_after = v.parse().ok(),
                "issuer_fingerprint" => issuer = Some(v.to_string()),
                "tls_name" => tls_name = v.to_string(),
                _ => {}
            }
        }
        Some(Self { common_name: cn?, not_after_unix: not_after?, issuer_fingerprint: issuer?, tls_name })
    }
}

/// The controller's certificate authority, loaded from (or created in) a
/// directory.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
    meta: Meta,
    fingerprint: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl Ca {
    /// Opens the CA in `dir`, creating it (and `dir`, mode 0700) when absent.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        // Several mlopsctl runs may share a state directory: one creates or
        // promotes at a time, the others then open what it made.
        let _lock = lock(dir)?;
        if dir.join(NEXT).join(JOURNAL).exists() {
            // A rotation stopped half-way: finish it.
            return Self::promote_locked(dir);
        }
        let cert_path = dir.join("ca.pem");
        if cert_path.exists() {
            return Self::open(dir);
        }
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        // A random suffix keeps two controllers' CAs apart in logs and
        // certificate viewers; the chain itself is tied to the key.
        let common_name = format!("mlopsctl CA {}", &hex::encode(Sha256::digest(key.public_key_pem()))[..12]);
        let params = ca_params(&common_name, now);
        let cert = params.self_signed(&key)?;
        let meta = Meta {
            common_name,
            not_after_unix: params.not_after.unix_timestamp(),
            issuer_fingerprint: String::new(),
            tls_name: String::new(),
        };
        write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        write_public(&dir.join("ca.json"), meta.to_text().as_bytes())?;
        // The certificate goes last: its presence is what marks the CA as complete.
        write_public(&cert_path, cert.pem().as_bytes())?;
        Self::open(dir)
    }

    /// Opens an existing CA.
    pub fn open(dir: &Path) -> Result<Self> {
        let cert_pem = read(&dir.join("ca.pem"))?;
        let key_path = dir.join("ca.key");
        let key = KeyPair::from_pem(&read(&key_path)?)
            .map_err(|_| PkiError::Corrupt { path: key_path, what: "private key" })?;
        let meta_path = dir.join("ca.json");
        let meta =
            Meta::parse(&read(&meta_path)?).ok_or(PkiError::Corrupt { path: meta_path, what: "CA description" })?;
        let der = pem_to_der(&cert_pem)
            .ok_or_else(|| PkiError::Corrupt { path: dir.join("ca.pem"), what: "PEM certificate" })?;
        Ok(Self { dir: dir.to_path_buf(), cert_pem, key, meta, fingerprint: hex::encode(Sha256::digest(der)) })
    }

    /// The CA that replaces this one in a rotation (`next/`), made on first
    /// use; kept until [`Ca::promote_next`] so a rotation can be resumed.
    pub fn next(&self) -> Result<Ca> {
        Ca::open_or_create(&self.dir.join(NEXT))
    }

    /// Whether a rotation is under way (a next CA exists).
    pub fn has_next(&self) -> bool {
        self.dir.join(NEXT).join("ca.pem").exists()
    }

    /// Makes the CA in `dir/next/` the CA of `dir`: the old CA, its client
    /// identity and its host certificates go to `dir/retired/<fingerprint>/`,
    /// the new CA and the host certificates it issued move in. Two journalled
    /// phases (retire, install), each made of renames that can be redone, so
    /// a crash is finished by the next [`Ca::open_or_create`].
    pub fn promote_next(dir: &Path) -> Result<Ca> {
        let _lock = lock(dir)?;
        Self::promote_locked(dir)
    }

    fn promote_locked(dir: &Path) -> Result<Ca> {
        let next = dir.join(NEXT);
        let journal = next.join(JOURNAL);
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| PkiError::Io { action, path, source }
        };
        let mut phase = fs::read_to_string(&journal).unwrap_or_default();
        if phase.is_empty() {
            let old = read(&dir.join("ca.pem"))
                .ok()
                .and_then(|p| pem_to_der(&p))
                .map_or_else(|| "unknown".to_string(), |d| hex::encode(Sha256::digest(d))[..12].to_string());
            phase = format!("retire {old}");
            write_private(&journal, phase.as_bytes())?;
        }
        let fingerprint = phase.split_whitespace().nth(1).unwrap_or("unknown").to_string();
        if phase.starts_with("retire") {
            let retired = dir.join("retired").join(&fingerprint);
            create_private_dir(&retired)?;
            for item in ["hosts", "client.pem", "client.key", "client.json", "ca.key", "ca.json", "ca.pem"] {
                let from = dir.join(item);
                if from.symlink_metadata().is_ok() {
                    fs::rename(&from, retired.join(item)).map_err(io("retire", &from))?;
                }
            }
            write_private(&journal, format!("install {fingerprint}").as_bytes())?;
        }
        // A `hosts/` made since the retire phase (a deploy issuing from the
        // old CA meanwhile) goes to the retired CA too.
        let stray = dir.join("hosts");
        if next.join("hosts").exists() && stray.exists() {
            let late = dir.join("retired").join(&fingerprint).join(format!("hosts.late.{}", std::process::id()));
            fs::rename(&stray, &late).map_err(io("retire", &stray))?;
        }
        // `ca.pem` last: its presence marks a complete CA.
        for item in ["hosts", "ca.key", "ca.json", "ca.pem"] {
            let from = next.join(item);
            if from.symlink_metadata().is_ok() {
                fs::rename(&from, dir.join(item)).map_err(io("install", &from))?;
            }
        }
        fs::remove_dir_all(&next).map_err(io("remove", &next))?;
        Self::open(dir)
    }

    /// The CA certificate, PEM: what both sides trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// sha256 of the CA certificate (DER), hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The controller's client identity, issued on first use and renewed when
    /// close to expiry or issued by another CA.
    pub fn client_identity(&self) -> Result<Identity> {
        self.leaf(&self.dir.clone(), "client", "mlopsctl", Role::Client)
    }

    /// The server identity of host `name`, issued on first use. Reused as
    /// long as it is valid, so that a re-deploy delivers the same bytes and
    /// the agent needs no restart.
    pub fn server_identity(&self, name: &str) -> Result<Identity> {
        if name.is_empty()
            || name.starts_with('.')
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | ':'))
        {
            return Err(PkiError::BadHostName(name.to_string()));
        }
        let dir = self.dir.join("hosts").join(name);
        create_private_dir(&dir)?;
        self.leaf(&dir, "server", name, Role::Server)
    }

    fn leaf(&self, dir: &Path, stem: &str, common_name: &str, role: Role) -> Result<Identity> {
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        let meta_path = dir.join(format!("{stem}.json"));
        let now = OffsetDateTime::now_utc();
        let tls_name = match role {
            Role::Server => agent_tls_name(common_name),
            Role::Client => String::new(),
        };
        if let (Ok(cert_pem), Ok(key_pem), Ok(meta)) =
            (fs::read_to_string(&cert_path), fs::read_to_string(&key_path), fs::read_to_string(&meta_path))
            && let Some(meta) = Meta::parse(&meta)
            && meta.issuer_fingerprint == self.fingerprint
            && meta.common_name == common_name
            && meta.tls_name == tls_name
            && meta.not_after_unix > (now + RENEW_BEFORE).unix_timestamp()
        {
            return Ok(Identity { cert_pem, key_pem });
        }

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.not_before = now - Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match role {
            Role::Server => {
                // This host's name only: no shared name that every agent has.
                params.subject_alt_names = vec![SanType::DnsName(tls_name.clone().try_into()?)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            Role::Client => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let issuer = Issuer::new(ca_params(&self.meta.common_name, now), &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let identity = Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        let meta = Meta {
            common_name: common_name.to_string(),
            not_after_unix: params.not_after.unix_timestamp(),
            issuer_fingerprint: self.fingerprint.clone(),
            tls_name,
        };
        write_private(&key_path, identity.key_pem.as_bytes())?;
        write_public(&cert_path, identity.cert_pem.as_bytes())?;
        write_public(&meta_path, meta.to_text().as_bytes())?;
        Ok(identity)
    }
}

#[derive(Clone, Copy)]
enum Role {
    Server,
    Client,
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mlopsctl");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The CA's parameters. Issuing needs only its subject and key, so the same
/// function rebuilds them from `ca.json` when the CA is loaded.
fn ca_params(common_name: &str, not_before: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_before + CA_VALIDITY;
    params
}

/// Decodes the first certificate of a PEM text to DER.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let mut reader = std::io::BufReader::new(pem.as_bytes());
    rustls_pemfile::certs(&mut reader).next()?.ok().map(|c| c.to_vec())
}

/// An exclusive lock on `dir/.lock`, held until the file is dropped.
fn lock(dir: &Path) -> Result<fs::File> {
    let path = dir.join(".lock");
    let io = |action, source| PkiError::Io { action, path: path.clone(), source };
    let file =
        fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| io("open", e))?;
    file.lock().map_err(|e| io("lock", e))?;
    Ok(file)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| PkiError::Io { action: "read", path: path.to_path_buf(), source })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| PkiError::Io { action: "create directory", path: dir.to_path_buf(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o644)
}

/// Writes `bytes` to `path` through a temporary file in the same directory:
/// created with `mode` (never wider, so a key is never readable by others
/// even for an instant), fsynced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |action, source| PkiError::Io { action, path: path.to_path_buf(), source };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    file.write_all(bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("rename into place", e)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_reuses_and_protects_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let ca = Ca::open_or_create(&pki).unwrap();
        let a = ca.server_identity("web1").unwrap();
        let b = Ca::open_or_create(&pki).unwrap().server_identity("web1").unwrap();
        assert_eq!(a.cert_pem, b.cert_pem, "a valid certificate is reused");
        for key in ["ca.key", "hosts/web1/server.key"] {
            let mode = fs::metadata(pki.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let mode = fs::metadata(&pki).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_new_ca_reissues_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let first = Ca::open_or_create(&pki).unwrap().client_identity().unwrap();
        for f in ["ca.pem", "ca.key", "ca.json"] {
            fs::remove_file(pki.join(f)).unwrap();
        }
        let second = Ca::open_or_create(&pki).unwrap().client_identity().unwrap();
        assert_ne!(first.cert_pem, second.cert_pem);
    }

    #[test]
    fn each_host_has_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(dir.path()).unwrap();
        let (a, b) = (agent_tls_name("web1"), agent_tls_name("web2"));
        assert_ne!(a, b);
        assert!(a.starts_with('h') && a.ends_with(".agents.mlops"), "{a}");
        let meta = fs::read_to_string(dir.path().join("hosts/web1/server.json")).err();
        assert!(meta.is_some(), "nothing issued yet");
        ca.server_identity("web1").unwrap();
        let meta = fs::read_to_string(dir.path().join("hosts/web1/server.json")).unwrap();
        assert!(meta.contains(&format!("tls_name={a}")), "{meta}");
    }

    #[test]
    fn rotation_promotes_the_next_ca_and_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let old = Ca::open_or_create(&pki).unwrap();
        old.server_identity("web1").unwrap();
        let old_client = old.client_identity().unwrap();
        let next = old.next().unwrap();
        let web1 = next.server_identity("web1").unwrap();
        assert!(old.has_next());
        assert_ne!(old.fingerprint(), next.fingerprint());
        // A crash after the old CA was retired, before the new moved in.
        fs::write(pki.join("next/.promoting"), format!("retire {}", &old.fingerprint()[..12])).unwrap();
        let retired = pki.join("retired").join(&old.fingerprint()[..12]);
        fs::create_dir_all(&retired).unwrap();
        fs::rename(pki.join("ca.pem"), retired.join("ca.pem")).unwrap();
        let promoted = Ca::open_or_create(&pki).unwrap();
        assert_eq!(promoted.fingerprint(), next.fingerprint(), "the journal finished the move; no third CA");
        assert!(!pki.join("next").exists());
        assert!(retired.join("ca.key").exists() && retired.join("hosts/web1/server.pem").exists());
        assert_eq!(promoted.server_identity("web1").unwrap().cert_pem, web1.cert_pem, "the new certificate is kept");
        assert!(retired.join("client.pem").exists());
        assert_ne!(promoted.client_identity().unwrap().cert_pem, old_client.cert_pem, "a new client identity");
    }

    #[test]
    fn rejects_path_like_host_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(ca.server_identity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let id = Ca::open_or_create(dir.path()).unwrap().client_identity().unwrap();
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }
}
