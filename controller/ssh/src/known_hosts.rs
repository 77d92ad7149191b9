//! known_hosts, read and written as OpenSSH does (sshd(8), "SSH_KNOWN_HOSTS
//! FILE FORMAT").
//!
//! - Host patterns: comma-separated, `*` and `?` wildcards, `!` negation
//!   (a negated match voids the line), `[host]:port` for other ports, hashed
//!   names (`|1|salt|hmac-sha1`), compared without case.
//! - Markers: `@revoked` keys are refused wherever they are presented;
//!   `@cert-authority` lines are recognised and reported as unsupported when
//!   they are all that could vouch for a host (never silently skipped).
//! - A host known with keys of some types that presents a key of another
//!   type is treated as a changed key, as OpenSSH does; the known types are
//!   offered first in negotiation ([`known_algorithms`]) so a host that has
//!   one of them presents it.
//! - [`learn`] (accept-new) rewrites the file atomically (temporary file in
//!   the same directory, fsync, rename) and makes a missing directory 0700.
//!
//! Lines that cannot be parsed (unknown key types, garbage) are skipped, as
//! OpenSSH skips them; they can vouch for nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{Algorithm, PublicKey};
use sha1::Sha1;

/// A line's marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// One usable line of a known_hosts file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    pub marker: Marker,
    pub patterns: String,
    pub key: PublicKey,
}

/// Every usable line of `text` (from `path`).
pub fn parse(path: &Path, text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(mut first) = words.next() else { continue };
        let marker = match first {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            m if m.starts_with('@') => continue,
            _ => Marker::None,
        };
        if marker != Marker::None {
            let Some(next) = words.next() else { continue };
            first = next;
        }
        let (Some(kind), Some(blob)) = (words.next(), words.next()) else { continue };
        let Ok(key) = PublicKey::from_openssh(&format!("{kind} {blob}")) else { continue };
        out.push(Entry { path: path.to_path_buf(), line: i + 1, marker, patterns: first.to_string(), key });
    }
    out
}

/// The name a host has in known_hosts: `host`, or `[host]:port` off port 22.
pub fn host_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

/// Whether `patterns` (one line's host field) names `name`.
pub fn host_matches(patterns: &str, name: &str) -> bool {
    let name_lc = name.to_ascii_lowercase();
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(hashed) = pattern.strip_prefix("|1|") {
            // OpenSSH hashes the name in lower case.
            matched |= hashed_matches(hashed, &name_lc);
            continue;
        }
        let (negated, p) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        if glob(p.to_ascii_lowercase().as_bytes(), name_lc.as_bytes()) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = hashed.split_once('|') else { return false };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else { return false };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else { return false };
    mac.chain_update(name.as_bytes()).verify_slice(&hash).is_ok()
}

/// `*` and `?` wildcards (iterative, with one backtrack point: linear
/// enough for host names).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// What the files say about a host presenting `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line for the host holds this key.
    Known,
    /// An `@revoked` line holds this key.
    Revoked { path: PathBuf, line: usize },
    /// The host is known with another key of the same type.
    Changed { path: PathBuf, line: usize },
    /// The host is known only with keys of other types.
    OtherType { path: PathBuf, line: usize, known: Vec<String> },
    /// Only `@cert-authority` lines name the host: unsupported here.
    CertAuthorityOnly { path: PathBuf, line: usize },
    /// Nothing names the host.
    Unknown,
}

/// The verdict for `host`:`port` presenting `key`, over `entries` (the
/// user's file first, then the system's).
pub fn check(entries: &[Entry], host: &str, port: u16, key: &PublicKey) -> Verdict {
    let name = host_name(host, port);
    let for_host: Vec<&Entry> = entries.iter().filter(|e| host_matches(&e.patterns, &name)).collect();
    // Revocation wins over everything, wherever it is.
    if let Some(e) = for_host.iter().find(|e| e.marker == Marker::Revoked && same_key(&e.key, key)) {
        return Verdict::Revoked { path: e.path.clone(), line: e.line };
    }
    let plain: Vec<&&Entry> = for_host.iter().filter(|e| e.marker == Marker::None).collect();
    if plain.iter().any(|e| same_key(&e.key, key)) {
        return Verdict::Known;
    }
    if let Some(e) = plain.iter().find(|e| e.key.algorithm() == key.algorithm()) {
        return Verdict::Changed { path: e.path.clone(), line: e.line };
    }
    if let Some(e) = plain.first() {
        let mut known: Vec<String> = plain.iter().map(|e| e.key.algorithm().to_string()).collect();
        known.dedup();
        return Verdict::OtherType { path: e.path.clone(), line: e.line, known };
    }
    if let Some(e) = for_host.iter().find(|e| e.marker == Marker::CertAuthority) {
        return Verdict::CertAuthorityOnly { path: e.path.clone(), line: e.line };
    }
    Verdict::Unknown
}

fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// The key algorithms to offer `host`:`port` first: those of its known
/// keys (RSA as its SHA-2 signature variants), in file order.
pub fn known_algorithms(entries: &[Entry], host: &str, port: u16) -> Vec<Algorithm> {
    let name = host_name(host, port);
    let mut out: Vec<Algorithm> = Vec::new();
    for e in entries.iter().filter(|e| e.marker == Marker::None && host_matches(&e.patterns, &name)) {
        let algs = match e.key.algorithm() {
            Algorithm::Rsa { .. } => vec![
                Algorithm::Rsa { hash: Some(russh::keys::HashAlg::Sha512) },
                Algorithm::Rsa { hash: Some(russh::keys::HashAlg::Sha256) },
            ],
            other => vec![other],
        };
        for a in algs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// Records `key` for `host`:`port` at the end of `path`: the file is
/// rewritten whole to a temporary file beside it and renamed over it, so a
/// crash or a concurrent reader never sees half a line. A missing
/// directory is made 0700; an existing one is left as it is.
pub fn learn(path: &Path, host: &str, port: u16, key: &PublicKey) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    // Hosts are connected to in parallel: one read-modify-write at a time
    // in this process, or two new hosts would each drop the other's line.
    static LEARNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let _one_at_a_time = LEARNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let openssh = key.to_openssh().map_err(std::io::Error::other)?;
    let mut fields = openssh.split_whitespace();
    let (kind, blob) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
    text.push_str(&format!("{} {kind} {blob}\n", host_name(host, port)));
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o600);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{name}.mlops-{}-{n}-{nanos}", std::process::id()));
    // `create_new`: the name is ours, or this fails and removes nothing.
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G2sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X";
    const EC: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBF6bGDCsQzQQ73JwDgQuOIfspM9dTss+sxdt2CAGSEQ7XcUX8Z44URyFm8c3ccqP5JyRyIo5Kqhr+g4NMnlWxkQ=";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    #[test]
    fn patterns() {
        assert!(host_matches("a.example,b.example", "b.example"));
        assert!(host_matches("*.example", "x.example"));
        assert!(host_matches("10.0.0.?", "10.0.0.7"));
        assert!(!host_matches("10.0.0.?", "10.0.0.17"));
        assert!(host_matches("[h]:2222", "[h]:2222"));
        assert!(!host_matches("h", "[h]:2222"));
        assert!(!host_matches("*.example,!bad.example", "bad.example"));
        assert!(host_matches("HOST", "host"));
        // Hashed as `ssh-keygen -H` does: HMAC-SHA1 of the name, keyed by a salt.
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = [7u8; 20];
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt).unwrap().chain_update(b"[h]:2222").finalize();
        let hashed = format!("|1|{}|{}", b64.encode(salt), b64.encode(mac.into_bytes()));
        assert!(host_matches(&hashed, "[h]:2222"));
        assert!(host_matches(&hashed, "[H]:2222"), "names are hashed in lower case");
        assert!(!host_matches(&hashed, "[h]:2223"));
        assert!(glob(b"*a*b*", b"xxaxxbxx") && !glob(b"*a*b", b"xxaxxbxx"));
    }

    #[test]
    fn verdicts() {
        let p = Path::new("kh");
        let text =
            format!("# comment\nh {ED}\n@revoked * {ED2}\n@cert-authority *.ca {EC}\ngarbage line\nother {EC}\n");
        let entries = parse(p, &text);
        assert_eq!(entries.len(), 4, "the garbage line is skipped");
        assert_eq!(check(&entries, "h", 22, &key(ED)), Verdict::Known);
        assert_eq!(check(&entries, "h", 22, &key(ED2)), Verdict::Revoked { path: p.into(), line: 3 });
        assert!(matches!(check(&entries, "h", 22, &key(EC)), Verdict::OtherType { line: 2, .. }));
        assert!(matches!(check(&entries, "x.ca", 22, &key(ED)), Verdict::CertAuthorityOnly { line: 4, .. }));
        assert_eq!(check(&entries, "new", 22, &key(ED)), Verdict::Unknown);
        assert_eq!(check(&entries, "h", 2222, &key(ED)), Verdict::Unknown);
        let changed = parse(p, &format!("h {ED2}\n"));
        assert_eq!(check(&changed, "h", 22, &key(ED)), Verdict::Changed { path: p.into(), line: 1 });
        assert_eq!(known_algorithms(&entries, "other", 22), vec![key(EC).algorithm()]);
    }

    #[test]
    fn learning_is_atomic_and_keeps_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/.ssh/known_hosts");
        learn(&path, "h", 2222, &key(ED)).unwrap();
        learn(&path, "g", 22, &key(EC)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("[h]:2222 {ED}\ng {EC}\n"));
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
        // In parallel (hosts connect at once): no line is lost.
        let keys = [key(ED), key(ED2), key(EC)];
        std::thread::scope(|s| {
            for i in 0..12 {
                let (path, k) = (&path, &keys[i % 3]);
                s.spawn(move || learn(path, &format!("p{i}"), 22, k).unwrap());
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 14, "{text}");
    }
}
