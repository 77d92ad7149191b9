//! SSH for the controller, on russh.
//!
//! One [`Session`] per host: it connects, checks the host key against
//! known_hosts (plain and hashed entries, `[host]:port`), authenticates with
//! key files and then ssh-agent keys, and offers the two things the
//! controller needs: run a command (optionally feeding it stdin) and open a
//! `direct-tcpip` tunnel to a port on the host's loopback.
//!
//! Host key policy, as OpenSSH's `StrictHostKeyChecking` (the file format
//! and matching are in [`known_hosts`]):
//! - a known key that matches: accepted;
//! - an unknown host: refused, unless `accept_new` (OpenSSH's `accept-new`),
//!   which records the key;
//! - a known host with another key, or with keys of other types only: always
//!   refused (the known types are offered first, so a host that has one
//!   presents it);
//! - an `@revoked` key: always refused; a host vouched for only by an
//!   `@cert-authority` line: refused as unsupported.

pub mod known_hosts;

pub use russh::keys::PublicKey;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, AuthResult, Handle};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelStream};
use tokio::io::AsyncWriteExt;

/// How to treat host keys and which credentials to offer.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// The user's known_hosts file (read, and appended to on accept-new).
    pub known_hosts: PathBuf,
    /// Also consulted, read-only: the system-wide file.
    pub global_known_hosts: Option<PathBuf>,
    /// Record unknown host keys instead of refusing them.
    pub accept_new: bool,
    /// Key files to try first, in order (`--identity`, inventory, ssh config).
    /// A listed file that does not exist is skipped, as OpenSSH does.
    pub identity_files: Vec<PathBuf>,
    /// Then try `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa` when present.
    pub default_identities: bool,
    /// Then try the keys of the agent at `$SSH_AUTH_SOCK`.
    pub use_agent: bool,
    /// For TCP connect plus handshake plus authentication.
    pub connect_timeout: Duration,
    /// For one remote command, from start to exit status.
    pub exec_timeout: Duration,
}

/// What a remote command may print on each stream; the rest is dropped
/// (and counted), so a host cannot exhaust the controller's memory.
pub const MAX_EXEC_OUTPUT: usize = 1 << 20;

impl SshOptions {
    pub fn new(known_hosts: PathBuf) -> Self {
        SshOptions {
            known_hosts,
            global_known_hosts: Some(PathBuf::from("/etc/ssh/ssh_known_hosts")),
            accept_new: false,
            identity_files: Vec::new(),
            default_identities: true,
            use_agent: true,
            connect_timeout: Duration::from_secs(15),
            exec_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {secs} s connecting to {addr}")]
    Timeout { addr: String, secs: u64 },
    #[error("host key of {host} is not known ({fingerprint}); refusing to connect")]
    UnknownHostKey { host: String, address: String, port: u16, fingerprint: String, known_hosts: PathBuf },
    #[error(
        "HOST KEY OF {host} HAS CHANGED ({fingerprint}, known_hosts has another key at {}:{line}); refusing to connect",
        known_hosts.display()
    )]
    HostKeyChanged { host: String, address: String, port: u16, fingerprint: String, known_hosts: PathBuf, line: usize },
    #[error("host key of {host} ({fingerprint}) is REVOKED in {}:{line}; refusing to connect", known_hosts.display())]
    HostKeyRevoked { host: String, fingerprint: String, known_hosts: PathBuf, line: usize },
    #[error(
        "{host} is vouched for only by a @cert-authority line ({}:{line}); host certificates are not supported",
        known_hosts.display()
    )]
    HostCertUnsupported { host: String, address: String, port: u16, known_hosts: PathBuf, line: usize },
    #[error("cannot record the host key of {host} in {}: {message}", known_hosts.display())]
    LearnHostKey { host: String, known_hosts: PathBuf, message: String },
    #[error("cannot read known_hosts {}: {message}", path.display())]
    KnownHosts { path: PathBuf, message: String },
    #[error(
        "permission denied for {user}@{host}: the server accepted none of the offered keys ({})",
        describe_tried(tried)
    )]
    AuthFailed {
        user: String,
        host: String,
        tried: Vec<String>,
        /// Keys that could not be used at all (encrypted, unreadable).
        skipped: Vec<String>,
    },
    #[error("cannot load private key {}: {message}", path.display())]
    KeyLoad { path: PathBuf, message: String },
    #[error("the SSH connection to {host} failed")]
    Protocol {
        host: String,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("`{command}` on {host} did not finish within {secs} s")]
    ExecTimeout { host: String, command: String, secs: u64 },
    #[error("{host} refused a tunnel to {target}: {reason}")]
    Tunnel { host: String, target: String, reason: String },
}

fn describe_tried(tried: &[String]) -> String {
    if tried.is_empty() { "no key was available".into() } else { format!("tried {}", tried.join(", ")) }
}

impl SshError {
    /// A suggestion for the user, printed as `hint:`.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            SshError::Connect { .. } | SshError::Timeout { .. } => "check that the host is up, that sshd listens on that address and port, and that no firewall is in the way".into(),
            SshError::UnknownHostKey { address, port, known_hosts, .. } => format!(
                "if this is the host you expect, pass --accept-new-host-keys to record its key in {} (or add it with `ssh-keyscan {}{address} >> {}`)",
                known_hosts.display(),
                if *port == 22 { String::new() } else { format!("-p {port} ") },
                known_hosts.display()
            ),
            SshError::HostKeyChanged { address, port, known_hosts, .. } => format!(
                "someone may be intercepting the connection, or the host was reinstalled; if you know it was, remove the old key with `ssh-keygen -R {} -f {}`",
                if *port == 22 { address.clone() } else { format!("'[{address}]:{port}'") },
                known_hosts.display()
            ),
            SshError::AuthFailed { user, skipped, .. } => {
                let mut h = format!("check that one of these public keys is in ~{user}/.ssh/authorized_keys on the host, or pass --identity FILE");
                if !skipped.is_empty() {
                    h.push_str(&format!("; not usable: {}", skipped.join(", ")));
                }
                h
            }
            SshError::HostKeyRevoked { .. } => "the key was revoked on purpose: do not connect; ask whoever runs the host for its new key".into(),
            SshError::HostCertUnsupported { address, port, known_hosts, .. } => format!(
                "record the host's own key instead: `ssh-keyscan {}{address} >> {}` (after checking its fingerprint)",
                if *port == 22 { String::new() } else { format!("-p {port} ") },
                known_hosts.display()
            ),
            SshError::KeyLoad { .. } => "keys protected by a passphrase can be used through ssh-agent: `ssh-add FILE`".into(),
            SshError::Tunnel { .. } => "is the agent running on the host? `mlopsctl deploy` starts it".into(),
            SshError::LearnHostKey { .. } | SshError::KnownHosts { .. } => "check the file's permissions, or choose another with --known-hosts".into(),
            SshError::ExecTimeout { .. } => "the host may be overloaded or the command stuck; look at it with ssh, then run the command again".into(),
            SshError::Protocol { .. } => return None,
        })
    }
}

/// What a finished remote command produced.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// `None` when the command was killed by a signal (or the server sent no status).
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Bytes past [`MAX_EXEC_OUTPUT`] on either stream, dropped.
    pub dropped: u64,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// The host key verdict, written by the russh handler and read after the
/// handshake to give a precise error.
#[derive(Debug, Clone)]
enum Verdict {
    Unknown { fingerprint: String },
    Changed { fingerprint: String, path: PathBuf, line: usize },
    Revoked { fingerprint: String, path: PathBuf, line: usize },
    CertAuthorityOnly { path: PathBuf, line: usize },
    KnownHostsError { path: PathBuf, message: String },
    LearnFailed { message: String },
}

struct Client {
    host: String,
    port: u16,
    options: Arc<SshOptions>,
    /// known_hosts as read once for this connection (or why it could not be).
    entries: Result<Vec<known_hosts::Entry>, (PathBuf, String)>,
    verdict: Arc<Mutex<Option<Verdict>>>,
}

/// Every usable line of the user's and the system's known_hosts files.
fn known_entries(options: &SshOptions) -> Result<Vec<known_hosts::Entry>, (PathBuf, String)> {
    let mut entries = Vec::new();
    for path in std::iter::once(&options.known_hosts).chain(options.global_known_hosts.as_ref()) {
        match std::fs::read_to_string(path) {
            Ok(text) => entries.extend(known_hosts::parse(path, &text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err((path.clone(), e.to_string())),
        }
    }
    Ok(entries)
}

impl Client {
    fn check(&self, key: &russh::keys::PublicKey) -> Result<bool, Verdict> {
        use known_hosts::Verdict as K;
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let entries = self
            .entries
            .as_ref()
            .map_err(|(path, message)| Verdict::KnownHostsError { path: path.clone(), message: message.clone() })?;
        match known_hosts::check(entries, &self.host, self.port, key) {
            K::Known => Ok(true),
            K::Revoked { path, line } => Err(Verdict::Revoked { fingerprint, path, line }),
            K::Changed { path, line } | K::OtherType { path, line, .. } => {
                Err(Verdict::Changed { fingerprint, path, line })
            }
            K::CertAuthorityOnly { path, line } => Err(Verdict::CertAuthorityOnly { path, line }),
            K::Unknown if self.options.accept_new => {
                known_hosts::learn(&self.options.known_hosts, &self.host, self.port, key)
                    .map_err(|e| Verdict::LearnFailed { message: e.to_string() })?;
                tracing::info!(host = %self.host, port = self.port, %fingerprint, "recorded new host key");
                Ok(true)
            }
            K::Unknown => Err(Verdict::Unknown { fingerprint }),
        }
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, server_public_key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(cert) => {
                // Host certificates are checked as plain keys against known_hosts.
                &russh::keys::PublicKey::new(cert.public_key().clone(), "")
            }
        };
        match self.check(key) {
            Ok(ok) => Ok(ok),
            Err(v) => {
                *self.verdict.lock().expect("not poisoned") = Some(v);
                Ok(false)
            }
        }
    }
}

/// An authenticated SSH connection to one host.
pub struct Session {
    handle: Handle<Client>,
    exec_timeout: Duration,
    /// `user@host:port`, for messages.
    label: String,
    host: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Session {
    /// Connects, verifies the host key and authenticates, all within
    /// `options.connect_timeout`.
    pub async fn connect(address: &str, port: u16, user: &str, options: Arc<SshOptions>) -> Result<Session, SshError> {
        let label = if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") };
        let timeout = options.connect_timeout;
        match tokio::time::timeout(timeout, Self::connect_inner(address, port, user, options, &label)).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout { addr: label, secs: timeout.as_secs() }),
        }
    }

    async fn connect_inner(
        address: &str,
        port: u16,
        user: &str,
        options: Arc<SshOptions>,
        label: &str,
    ) -> Result<Session, SshError> {
        // Offer the key types known_hosts holds for this host first, as
        // OpenSSH does: a host with several keys then presents a known one.
        let entries = known_entries(&options);
        let mut preferred = russh::Preferred::default();
        if let Ok(entries) = &entries {
            let mut keys = known_hosts::known_algorithms(entries, address, port);
            keys.extend(preferred.key.iter().filter(|a| !keys.contains(a)).cloned().collect::<Vec<_>>());
            preferred.key = keys.into();
        }
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            nodelay: true,
            preferred,
            ..Default::default()
        });
        let verdict = Arc::new(Mutex::new(None));
        let handler =
            Client { host: address.to_string(), port, options: options.clone(), entries, verdict: verdict.clone() };
        let socket = tokio::net::TcpStream::connect((address, port))
            .await
            .map_err(|source| SshError::Connect { addr: label.to_string(), source })?;
        let _ = socket.set_nodelay(true);
        let handle = match client::connect_stream(config, mlops_proto::net::QuickAck::new(socket), handler).await {
            Ok(h) => h,
            Err(e) => {
                let host = label.to_string();
                return Err(match verdict.lock().expect("not poisoned").take() {
                    Some(Verdict::Unknown { fingerprint }) => SshError::UnknownHostKey {
                        host,
                        address: address.to_string(),
                        port,
                        fingerprint,
                        known_hosts: options.known_hosts.clone(),
                    },
                    Some(Verdict::Changed { fingerprint, path, line }) => SshError::HostKeyChanged {
                        host,
                        address: address.to_string(),
                        port,
                        fingerprint,
                        known_hosts: path,
                        line,
                    },
                    Some(Verdict::Revoked { fingerprint, path, line }) => {
                        SshError::HostKeyRevoked { host, fingerprint, known_hosts: path, line }
                    }
                    Some(Verdict::CertAuthorityOnly { path, line }) => SshError::HostCertUnsupported {
                        host,
                        address: address.to_string(),
                        port,
                        known_hosts: path,
                        line,
                    },
                    Some(Verdict::KnownHostsError { path, message }) => SshError::KnownHosts { path, message },
                    Some(Verdict::LearnFailed { message }) => {
                        SshError::LearnHostKey { host, known_hosts: options.known_hosts.clone(), message }
                    }
                    None => SshError::Protocol { host, source: Box::new(e) },
                });
            }
        };
        let mut session = Session {
            handle,
            exec_timeout: options.exec_timeout,
            label: format!("{user}@{label}"),
            host: label.to_string(),
        };
        session.authenticate(user, &options).await?;
        Ok(session)
    }

    async fn authenticate(&mut self, user: &str, options: &SshOptions) -> Result<(), SshError> {
        let mut tried = Vec::new();
        let mut skipped = Vec::new();
        let mut files: Vec<PathBuf> = options.identity_files.clone();
        if options.default_identities {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
                files.push(home.join(".ssh").join(name));
            }
        }
        let mut seen = Vec::new();
        for path in files {
            if seen.contains(&path) || !path.exists() {
                continue;
            }
            seen.push(path.clone());
            let key = match load_key(&path) {
                Ok(k) => k,
                Err(why) => {
                    skipped.push(format!("{} ({why})", path.display()));
                    continue;
                }
            };
            tried.push(path.display().to_string());
            let hash = self.rsa_hash(&key).await?;
            let result = self
                .handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
                .map_err(|e| self.protocol(e))?;
            if matches!(result, AuthResult::Success) {
                return Ok(());
            }
        }
        if options.use_agent && std::env::var_os("SSH_AUTH_SOCK").is_some() {
            match AgentClient::connect_env().await {
                Ok(mut agent) => {
                    let identities = agent.request_identities().await.unwrap_or_default();
                    for identity in identities {
                        let AgentIdentity::PublicKey { key, comment } = identity else { continue };
                        tried.push(format!(
                            "agent key {}",
                            if comment.is_empty() { key.fingerprint(HashAlg::Sha256).to_string() } else { comment }
                        ));
                        let hash = if key.algorithm().is_rsa() {
                            self.handle.best_supported_rsa_hash().await.map_err(|e| self.protocol(e))?.flatten()
                        } else {
                            None
                        };
                        match self.handle.authenticate_publickey_with(user, key, hash, &mut agent).await {
                            Ok(AuthResult::Success) => return Ok(()),
                            Ok(_) => {}
                            Err(e) => skipped.push(format!("agent key ({e})")),
                        }
                    }
                }
                Err(e) => skipped.push(format!("ssh-agent at $SSH_AUTH_SOCK ({e})")),
            }
        }
        Err(SshError::AuthFailed { user: user.to_string(), host: self.host.clone(), tried, skipped })
    }

    async fn rsa_hash(&self, key: &PrivateKey) -> Result<Option<HashAlg>, SshError> {
        // Only RSA needs this, and asking may wait for the server's
        // extension info, so other key types skip it.
        if !key.algorithm().is_rsa() {
            return Ok(None);
        }
        Ok(self.handle.best_supported_rsa_hash().await.map_err(|e| self.protocol(e))?.flatten())
    }

    fn protocol(&self, source: russh::Error) -> SshError {
        SshError::Protocol { host: self.host.clone(), source: Box::new(source) }
    }

    /// `user@host:port`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `command` through the remote user's shell, feeding `stdin`
    /// (then end-of-file) when given, and collects its output (at most
    /// [`MAX_EXEC_OUTPUT`] per stream), within the session's exec timeout.
    pub async fn exec(&self, command: &str, stdin: Option<&[u8]>) -> Result<ExecOutput, SshError> {
        let timeout = self.exec_timeout;
        tokio::time::timeout(timeout, self.exec_inner(command, stdin)).await.unwrap_or_else(|_| {
            Err(SshError::ExecTimeout {
                host: self.host.clone(),
                command: command.split_whitespace().next().unwrap_or_default().chars().take(80).collect(),
                secs: timeout.as_secs(),
            })
        })
    }

    async fn exec_inner(&self, command: &str, stdin: Option<&[u8]>) -> Result<ExecOutput, SshError> {
        let channel = self.handle.channel_open_session().await.map_err(|e| self.protocol(e))?;
        channel.exec(true, command).await.map_err(|e| self.protocol(e))?;
        let (mut read, write) = channel.split();
        // Write and read at once: a command that prints while it reads
        // would otherwise fill the window and stall both sides.
        let writer = async {
            if let Some(data) = stdin {
                let mut w = write.make_writer();
                w.write_all(data).await?;
                w.flush().await?;
                drop(w);
            }
            write.eof().await.map_err(std::io::Error::other)
        };
        let reader = async {
            let mut out = ExecOutput::default();
            let keep = |buf: &mut Vec<u8>, data: &[u8], dropped: &mut u64| {
                let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len()).min(data.len());
                buf.extend_from_slice(&data[..room]);
                *dropped += (data.len() - room) as u64;
            };
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => keep(&mut out.stdout, &data, &mut out.dropped),
                    ChannelMsg::ExtendedData { data, ext: 1 } => keep(&mut out.stderr, &data, &mut out.dropped),
                    ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                    _ => {}
                }
            }
            out
        };
        let (written, out) = tokio::join!(writer, reader);
        if let Err(e) = written {
            // The command may exit before reading all of stdin; its status says more.
            tracing::debug!(host = %self.host, "stdin not fully written: {e}");
            if out.status.is_none() {
                return Err(self.protocol(russh::Error::IO(e)));
            }
        }
        Ok(out)
    }

    /// Opens a `direct-tcpip` channel to `host:port` as seen from the server
    /// (the agent's loopback listener), as a byte stream.
    pub async fn open_tunnel(&self, host: &str, port: u16) -> Result<ChannelStream<client::Msg>, SshError> {
        let channel =
            self.handle.channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0).await.map_err(|e| {
                SshError::Tunnel {
                    host: self.host.clone(),
                    target: format!("{host}:{port}"),
                    reason: match e {
                        russh::Error::ChannelOpenFailure(reason) => format!("{reason:?}"),
                        other => other.to_string(),
                    },
                }
            })?;
        Ok(channel.into_stream())
    }

    /// Ends the session politely.
    /// Says goodbye to the server, for at most five seconds: a session
    /// whose peer stopped reading must not hold the command up (the
    /// connection goes with the process anyway).
    pub async fn close(&self) {
        let goodbye = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), goodbye).await;
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }
}

fn load_key(path: &Path) -> Result<PrivateKey, String> {
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => Err("encrypted with a passphrase; add it to ssh-agent".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    shell_words::quote(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/d-e"), "abc/d-e");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
