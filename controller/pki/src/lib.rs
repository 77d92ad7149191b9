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
//! operator                            this controller's operator name (its client certificate's)
//! client.pem  client.key  client.json the controller's client identity
//! hosts/<name>/server.pem|key|json    one server identity per managed host
//! operators/<name>.json               operators this CA delegated to (root only)
//! crl.pem                             the revocation list: removed operators' CAs (numbered inside)
//! root.pem                            a joined operator's trust anchor (see below)
//! ```
//!
//! Operators. The first controller's CA is the *root*. `operator add NAME`
//! issues NAME a CA of its own, signed by the root and unable to delegate
//! further (path length 0): with it, the operator's controller issues its
//! own client certificate and the server certificates of hosts it installs,
//! each chain ending at the root that every agent trusts. Its holder joins
//! with the root certificate as `root.pem` and its CA as `ca.*`, so the rest
//! of this crate works unchanged. `operator remove NAME` puts that CA's
//! serial number on the root's revocation list (`crl.pem`, its number inside): agents
//! given the list refuse every certificate under it, and controllers refuse
//! agents whose certificate it issued.
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
const OPERATOR_FILE: &str = "operator";
const JOURNAL: &str = ".promoting";

const CA_VALIDITY: Duration = Duration::days(3650);
/// A root made now may delegate once: to operators' CAs.
const ROOT_PATH_LEN: u8 = 1;
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
    #[error("`{0}` is not an operator name (letters, digits, `.`, `-`, `_`, `@`; at most 64)")]
    BadOperatorName(String),
    #[error("operator `{0}` already exists")]
    OperatorExists(String),
    #[error("no operator `{0}`")]
    NoOperator(String),
    #[error("this controller holds an operator's CA, not the root CA: {0}")]
    NotRoot(&'static str),
    #[error("this CA was made before operators existed and cannot delegate to them")]
    CannotDelegate,
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
    /// For a CA: how many CAs may stand between it and a leaf (1 lets a
    /// root delegate to operators; CAs made before operators have 0).
    path_len: u8,
}

impl Meta {
    fn to_text(&self) -> String {
        format!(
            "common_name={}\nnot_after_unix={}\nissuer_fingerprint={}\ntls_name={}\npath_len={}\n",
            self.common_name, self.not_after_unix, self.issuer_fingerprint, self.tls_name, self.path_len
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut cn = None;
        let mut not_after = None;
        let mut issuer = None;
        let mut tls_name = String::new();
        let mut path_len = 0;
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "common_name" => cn = Some(v.to_string()),
                "not_after_unix" => not_after = v.parse().ok(),
                "issuer_fingerprint" => issuer = Some(v.to_string()),
                "tls_name" => tls_name = v.to_string(),
                "path_len" => path_len = v.parse().ok()?,
                _ => {}
            }
        }
        Some(Self { common_name: cn?, not_after_unix: not_after?, issuer_fingerprint: issuer?, tls_name, path_len })
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
            let ca = Self::open(dir)?;
            if ca.is_root() && !dir.ends_with(NEXT) && !dir.join(OPERATOR_FILE).exists() {
                write_public(&dir.join(OPERATOR_FILE), default_operator_name().as_bytes())?;
            }
            return Ok(ca);
        }
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        // A random suffix keeps two controllers' CAs apart in logs and
        // certificate viewers; the chain itself is tied to the key.
        let common_name = format!("mlopsctl CA {}", &hex::encode(Sha256::digest(key.public_key_pem()))[..12]);
        let params = ca_params(&common_name, now, ROOT_PATH_LEN);
        let cert = params.self_signed(&key)?;
        let meta = Meta {
            common_name,
            not_after_unix: params.not_after.unix_timestamp(),
            issuer_fingerprint: String::new(),
            tls_name: String::new(),
            path_len: ROOT_PATH_LEN,
        };
        write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        write_public(&dir.join("ca.json"), meta.to_text().as_bytes())?;
        if !dir.ends_with(NEXT) && !dir.join(OPERATOR_FILE).exists() {
            write_public(&dir.join(OPERATOR_FILE), default_operator_name().as_bytes())?;
        }
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
        self.leaf(&self.dir.clone(), "client", &self.operator_name(), Role::Client)
    }

    /// The name of this controller's operator: its client certificate's
    /// common name, which agents record with each deploy. `operator` in
    /// the CA's directory (in the parent's for a rotation's next CA); a
    /// root made before operators existed is named when first opened.
    pub fn operator_name(&self) -> String {
        let own = self.dir.join(OPERATOR_FILE);
        let file = if self.dir.ends_with(NEXT) && !own.exists() {
            self.dir.parent().map_or(own, |p| p.join(OPERATOR_FILE))
        } else {
            own
        };
        fs::read_to_string(file)
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "mlopsctl".into())
    }

    /// Whether this is a root CA (not an operator's, issued by a root).
    pub fn is_root(&self) -> bool {
        self.meta.issuer_fingerprint.is_empty()
    }

    /// Signs with this CA's key as `meta` describes its subject.
    fn issuer(&self, now: OffsetDateTime) -> Issuer<'static, &KeyPair> {
        Issuer::new(ca_params(&self.meta.common_name, now, self.meta.path_len), &self.key)
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
        let cert = params.signed_by(&key, &self.issuer(now))?;
        // Under an operator's CA, the chain carries that CA up to the root
        // every peer trusts.
        let chain = if self.is_root() { cert.pem() } else { format!("{}{}", cert.pem(), self.cert_pem) };
        let identity = Identity { cert_pem: chain, key_pem: key.serialize_pem() };
        let meta = Meta {
            common_name: common_name.to_string(),
            not_after_unix: params.not_after.unix_timestamp(),
            issuer_fingerprint: self.fingerprint.clone(),
            tls_name,
            path_len: 0,
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
fn ca_params(common_name: &str, not_before: OffsetDateTime, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_before + CA_VALIDITY;
    params
}

/// What an operator is given: the root to trust, a CA of its own, and the
/// revocation list as it stands. Sealed into a bundle by the controller.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct OperatorGrant {
    pub name: String,
    pub root_pem: String,
    pub ca_pem: String,
    pub ca_key_pem: String,
    /// The operator CA's subject and end of validity (what `ca.json` records).
    pub ca_common_name: String,
    pub ca_not_after_unix: i64,
    pub crl_pem: String,
}

impl std::fmt::Debug for OperatorGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorGrant").field("name", &self.name).finish_non_exhaustive()
    }
}

/// An operator the root delegated to (`operators/<name>.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct OperatorRecord {
    pub name: String,
    /// The serial number of its CA, hex.
    pub serial: String,
    /// sha256 of its CA certificate (DER), hex.
    pub fingerprint: String,
    pub added_unix: i64,
    pub revoked_unix: Option<i64>,
}

/// The revocation list: its number (higher is newer) and PEM text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Crl {
    pub number: u64,
    pub pem: String,
}

/// `letters, digits, . - _ @`, 1 to 64 characters.
pub fn is_operator_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
}

/// `user@hostname` of whoever runs this, as an operator name.
fn default_operator_name() -> String {
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into());
    let host = fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let name: String = format!("{user}@{host}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@') { c } else { '_' })
        .take(64)
        .collect();
    if is_operator_name(&name) { name } else { "operator".into() }
}

impl Ca {
    /// Issues operator `name` a CA under this root and records it.
    pub fn issue_operator(&self, name: &str) -> Result<OperatorGrant> {
        if !is_operator_name(name) {
            return Err(PkiError::BadOperatorName(name.to_string()));
        }
        if !self.is_root() {
            return Err(PkiError::NotRoot("only the root's holder adds operators"));
        }
        if self.meta.path_len < 1 {
            return Err(PkiError::CannotDelegate);
        }
        if name == self.operator_name() {
            return Err(PkiError::OperatorExists(name.to_string()));
        }
        let _lock = lock(&self.dir)?;
        let record_path = self.dir.join("operators").join(format!("{name}.json"));
        if let Ok(text) = fs::read_to_string(&record_path) {
            let old: OperatorRecord = serde_json::from_str(&text)
                .map_err(|_| PkiError::Corrupt { path: record_path.clone(), what: "operator record" })?;
            if old.revoked_unix.is_none() {
                return Err(PkiError::OperatorExists(name.to_string()));
            }
            // Added again after a removal: the revoked CA keeps its record
            // (and its place on the list) under its serial.
            let kept = self.dir.join("operators").join(format!("{name}.{}.json", old.serial));
            fs::rename(&record_path, &kept).map_err(|source| PkiError::Io { action: "rename", path: kept, source })?;
        }
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate()?;
        let mut serial = [0u8; 16];
        key_random(&mut serial);
        serial[0] &= 0x7f;
        let common_name =
            format!("mlopsctl operator {name} {}", &hex::encode(Sha256::digest(key.public_key_pem()))[..12]);
        let mut params = ca_params(&common_name, now - Duration::hours(1), 0);
        params.not_after = OffsetDateTime::from_unix_timestamp(self.meta.not_after_unix).unwrap_or(now + CA_VALIDITY);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer(now))?;
        let der =
            pem_to_der(&cert.pem()).ok_or(PkiError::Corrupt { path: record_path.clone(), what: "certificate" })?;
        let record = OperatorRecord {
            name: name.to_string(),
            serial: hex::encode(serial),
            fingerprint: hex::encode(Sha256::digest(der)),
            added_unix: now.unix_timestamp(),
            revoked_unix: None,
        };
        create_private_dir(&self.dir.join("operators"))?;
        write_public(&record_path, &serde_json::to_vec_pretty(&record).expect("serializable"))?;
        let crl = self.crl()?;
        Ok(OperatorGrant {
            name: name.to_string(),
            root_pem: self.cert_pem.clone(),
            ca_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
            ca_common_name: common_name,
            ca_not_after_unix: params.not_after.unix_timestamp(),
            crl_pem: crl.pem,
        })
    }

    /// The operators this root delegated to, by name.
    pub fn operators(&self) -> Result<Vec<OperatorRecord>> {
        let dir = self.dir.join("operators");
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(out) };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "json") {
                let text = read(&path)?;
                out.push(serde_json::from_str(&text).map_err(|_| PkiError::Corrupt { path, what: "operator record" })?);
            }
        }
        out.sort_by(|a: &OperatorRecord, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Revokes operator `name`: its CA goes on a new revocation list.
    pub fn revoke_operator(&self, name: &str) -> Result<Crl> {
        if !self.is_root() {
            return Err(PkiError::NotRoot("only the root's holder removes operators"));
        }
        let _lock = lock(&self.dir)?;
        let path = self.dir.join("operators").join(format!("{name}.json"));
        if !is_operator_name(name) || !path.exists() {
            return Err(PkiError::NoOperator(name.to_string()));
        }
        let mut record: OperatorRecord = serde_json::from_str(&read(&path)?)
            .map_err(|_| PkiError::Corrupt { path: path.clone(), what: "operator record" })?;
        let now = OffsetDateTime::now_utc();
        if record.revoked_unix.is_none() {
            record.revoked_unix = Some(now.unix_timestamp());
            write_public(&path, &serde_json::to_vec_pretty(&record).expect("serializable"))?;
        }
        let revoked: Vec<rcgen::RevokedCertParams> = self
            .operators()?
            .into_iter()
            .filter_map(|r| {
                let serial = hex::decode(&r.serial).ok()?;
                let when = OffsetDateTime::from_unix_timestamp(r.revoked_unix?).ok()?;
                Some(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&serial),
                    revocation_time: when,
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect();
        let number = self.crl()?.number.checked_add(1).ok_or(PkiError::Corrupt {
            path: self.dir.join("crl.pem"),
            what: "revocation list (its number cannot grow)",
        })?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + CA_VALIDITY,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let pem = params.signed_by(&self.issuer(now))?.pem()?;
        write_public(&self.dir.join("crl.pem"), pem.as_bytes())?;
        Ok(Crl { number, pem })
    }

    /// The CA certificates this controller's revocation list must be
    /// signed by: the root (`root.pem` for a joined operator; for a
    /// rotation's next CA, its parent's).
    fn trust_pem(&self) -> String {
        let dir = if self.dir.ends_with(NEXT) { self.dir.parent().unwrap_or(&self.dir) } else { &self.dir };
        fs::read_to_string(dir.join("root.pem")).or_else(|_| fs::read_to_string(dir.join("ca.pem"))).unwrap_or_default()
    }

    /// The revocation list as this controller knows it (number 0 and no
    /// text before any operator was removed). The number is the one
    /// written in the list.
    pub fn crl(&self) -> Result<Crl> {
        // A rotation's next CA shares its parent's list (it revokes
        // under the old root until the new one is promoted).
        let dir = if self.dir.ends_with(NEXT) { self.dir.parent().unwrap_or(&self.dir) } else { &self.dir };
        let pem = match fs::read_to_string(dir.join("crl.pem")) {
            Ok(p) => p,
            Err(_) => return Ok(Crl::default()),
        };
        let number = mlops_proto::der::verified_crl_number(&pem, &self.trust_pem())
            .map_err(|_| PkiError::Corrupt { path: dir.join("crl.pem"), what: "revocation list of the root" })?;
        Ok(Crl { number, pem })
    }

    /// Keeps `pem` when it is a list the root signed with a higher number
    /// than the one held (a list an agent or a bundle brought): lists only
    /// grow. Returns whether it was kept.
    pub fn adopt_crl(&self, pem: &str) -> Result<bool> {
        let Ok(number) = mlops_proto::der::verified_crl_number(pem, &self.trust_pem()) else {
            return Ok(false);
        };
        // Compared under the lock: two hosts reporting lists at once must
        // not leave the older one.
        let _lock = lock(&self.dir)?;
        if number <= self.crl()?.number {
            return Ok(false);
        }
        write_public(&self.dir.join("crl.pem"), pem.as_bytes())?;
        Ok(true)
    }
}

/// Makes `dir` (a new state directory's `pki/`) the PKI of the operator
/// `grant` names: the root as `root.pem`, the operator's CA as its own.
/// Refused when `dir` already holds a CA.
pub fn join(dir: &Path, grant: &OperatorGrant) -> Result<Ca> {
    create_private_dir(dir)?;
    let _lock = lock(dir)?;
    if dir.join("ca.pem").exists() {
        return Err(PkiError::NotRoot("this state directory already has a CA; join into a new one (--state-dir)"));
    }
    let bad = |what| PkiError::Corrupt { path: dir.join("bundle"), what };
    let root_der = pem_to_der(&grant.root_pem).ok_or(bad("root certificate"))?;
    KeyPair::from_pem(&grant.ca_key_pem).map_err(|_| bad("operator key"))?;
    pem_to_der(&grant.ca_pem).ok_or(bad("operator certificate"))?;
    if !is_operator_name(&grant.name) {
        return Err(PkiError::BadOperatorName(grant.name.clone()));
    }
    let meta = Meta {
        common_name: grant.ca_common_name.clone(),
        not_after_unix: grant.ca_not_after_unix,
        issuer_fingerprint: hex::encode(Sha256::digest(root_der)),
        tls_name: String::new(),
        path_len: 0,
    };
    write_public(&dir.join("root.pem"), grant.root_pem.as_bytes())?;
    write_public(&dir.join(OPERATOR_FILE), grant.name.as_bytes())?;
    if !grant.crl_pem.is_empty() {
        mlops_proto::der::verified_crl_number(&grant.crl_pem, &grant.root_pem).map_err(|_| bad("revocation list"))?;
        write_public(&dir.join("crl.pem"), grant.crl_pem.as_bytes())?;
    }
    write_private(&dir.join("ca.key"), grant.ca_key_pem.as_bytes())?;
    write_public(&dir.join("ca.json"), meta.to_text().as_bytes())?;
    write_public(&dir.join("ca.pem"), grant.ca_pem.as_bytes())?;
    Ca::open(dir)
}

/// Random bytes from the kernel (for serial numbers).
fn key_random(buf: &mut [u8]) {
    use std::io::Read;
    if fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).is_err() {
        // A serial needs to be unique, not secret: fall back to the clock.
        let t = OffsetDateTime::now_utc().unix_timestamp_nanos().to_be_bytes();
        for (b, t) in buf.iter_mut().zip(t.iter().cycle()) {
            *b ^= t;
        }
    }
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

    fn ders(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes()).map(Result::unwrap).collect()
    }

    /// Whether an agent trusting `root` (with `crl`, if any) accepts the client chain `pem`.
    fn client_accepted(root: &str, crl: Option<&str>, pem: &str) -> bool {
        use rustls::server::WebPkiClientVerifier;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ders(root).remove(0)).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut b = WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider);
        if let Some(crl) = crl {
            let der = rustls_pemfile::crls(&mut crl.as_bytes()).next().unwrap().unwrap();
            b = b.with_crls([der]).allow_unknown_revocation_status();
        }
        let chain = ders(pem);
        let now = rustls::pki_types::UnixTime::now();
        b.build().unwrap().verify_client_cert(&chain[0], &chain[1..], now).is_ok()
    }

    #[test]
    fn operators_get_a_ca_under_the_root_and_removal_revokes_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = Ca::open_or_create(&dir.path().join("a")).unwrap();
        assert!(root.is_root());
        let grant = root.issue_operator("bob").unwrap();
        assert!(matches!(root.issue_operator("bob"), Err(PkiError::OperatorExists(_))));
        assert!(matches!(root.issue_operator("../x"), Err(PkiError::BadOperatorName(_))));

        let bob = join(&dir.path().join("b"), &grant).unwrap();
        assert!(!bob.is_root());
        assert_eq!(bob.operator_name(), "bob");
        assert!(matches!(bob.issue_operator("carol"), Err(PkiError::NotRoot(_))), "no further delegation");
        let client = bob.client_identity().unwrap();
        assert_eq!(ders(&client.cert_pem).len(), 2, "the chain carries bob's CA");
        assert!(client_accepted(root.cert_pem(), None, &client.cert_pem));
        assert!(client_accepted(root.cert_pem(), None, &root.client_identity().unwrap().cert_pem));
        // A server certificate bob issues verifies up to the root.
        let server = bob.server_identity("web1").unwrap();
        let chain = ders(&server.cert_pem);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ders(root.cert_pem()).remove(0)).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots)).build().unwrap();
        let name = rustls::pki_types::ServerName::try_from(agent_tls_name("web1")).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], rustls::pki_types::UnixTime::now()).unwrap();

        let crl = root.revoke_operator("bob").unwrap();
        assert_eq!(crl.number, 1);
        assert!(!client_accepted(root.cert_pem(), Some(&crl.pem), &client.cert_pem), "bob is refused");
        assert!(client_accepted(root.cert_pem(), Some(&crl.pem), &root.client_identity().unwrap().cert_pem));
        assert!(root.operators().unwrap()[0].revoked_unix.is_some());
        assert_eq!(root.revoke_operator("bob").unwrap().number, 2, "a new list each time");
        assert!(matches!(root.revoke_operator("nobody"), Err(PkiError::NoOperator(_))));
        // Lists only grow, and only lists the root signed count.
        assert!(!bob.adopt_crl("").unwrap());
        assert!(bob.adopt_crl(&crl.pem).unwrap());
        assert_eq!(bob.crl().unwrap().number, 1);
        assert!(!bob.adopt_crl(&crl.pem).unwrap(), "not twice");
        let other = Ca::open_or_create(&dir.path().join("other")).unwrap();
        other.issue_operator("x").unwrap();
        let forged = other.revoke_operator("x").unwrap();
        let forged = other.revoke_operator("x").unwrap().number.max(forged.number);
        let forged_pem = std::fs::read_to_string(dir.path().join("other/crl.pem")).unwrap();
        assert_eq!(forged, 2);
        assert!(!root.adopt_crl(&forged_pem).unwrap(), "a list another CA signed is not the root's");
        assert_eq!(root.crl().unwrap().number, 2);
        // A removed operator can be added again (a new CA); the old one stays revoked.
        root.issue_operator("bob").unwrap();
        assert_eq!(root.operators().unwrap().iter().filter(|o| o.name == "bob").count(), 2);
    }

    #[test]
    fn a_root_made_before_operators_cannot_delegate() {
        let dir = tempfile::tempdir().unwrap();
        Ca::open_or_create(dir.path()).unwrap();
        let meta = fs::read_to_string(dir.path().join("ca.json")).unwrap().replace("path_len=1\n", "");
        fs::write(dir.path().join("ca.json"), meta).unwrap();
        assert!(matches!(Ca::open(dir.path()).unwrap().issue_operator("bob"), Err(PkiError::CannotDelegate)));
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let id = Ca::open_or_create(dir.path()).unwrap().client_identity().unwrap();
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }
}
