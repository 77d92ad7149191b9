//! `mlops-agent install` and `mlops-agent uninstall`.
//!
//! The controller uploads the binary to [`layout::BINARY`], then runs
//! `install` as root with an [`InstallBundle`] on stdin. `install` checks the
//! bundle (a bad certificate is refused before anything is written), writes
//! the configuration (each file atomically, the key 0600), then (re)starts
//! the agent: through a systemd unit where PID 1 is systemd, else as a
//! daemon with a pidfile. It prints one JSON line describing what it did.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mlops_proto::layout;
use mlops_proto::v1::InstallBundle;
use prost::Message;
use serde::Serialize;

use crate::config::AgentConfig;
use crate::daemon;
use crate::tls::{self, TlsMaterial};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("stdin does not hold an install bundle ({0})")]
    Decode(#[from] prost::DecodeError),
    #[error("the install bundle is invalid: {0}")]
    Invalid(String),
    #[error("cannot write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("the agent did not start: {0}")]
    Start(String),
}

/// How the agent is kept running on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceManager {
    Systemd,
    Daemon,
}

impl ServiceManager {
    /// systemd when it is PID 1 (`sd_booted(3)`: `/run/systemd/system` exists).
    pub fn detect() -> Self {
        if Path::new("/run/systemd/system").is_dir() { ServiceManager::Systemd } else { ServiceManager::Daemon }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceManager::Systemd => "systemd",
            ServiceManager::Daemon => "daemon",
        }
    }
}

/// What `install` prints.
#[derive(Debug, Serialize)]
pub struct InstallReport {
    pub service_manager: ServiceManager,
    pub pid: Option<i32>,
    pub unit_changed: bool,
}

/// The systemd unit. `Type=notify`: `systemctl restart` returns when the
/// agent listens, and fails when it cannot.
pub fn systemd_unit(binary: &str, config: &Path) -> String {
    format!(
        "# Written by mlops-agent install; mlopsctl rewrites it on deploy.
[Unit]
Description=mlops agent (driven by mlopsctl)
After=network.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={binary} serve --config {config}
Restart=on-failure
RestartSec=2s
TimeoutStartSec=30s
TimeoutStopSec=15s
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
",
        config = config.display()
    )
}

/// Runs `install` with `bundle_bytes` (stdin). `exe` is the installed agent binary.
pub fn install(bundle_bytes: &[u8], exe: &Path, manager: ServiceManager) -> Result<InstallReport, InstallError> {
    let bundle = InstallBundle::decode(bundle_bytes)?;
    // What the agent will report in Hello once it runs this configuration.
    let config_sha256 =
        mlops_proto::bundle_sha256(&InstallBundle { controller_version: String::new(), ..bundle.clone() });
    let port = u16::try_from(bundle.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| InstallError::Invalid(format!("port {} is out of range", bundle.port)))?;
    let config_dir = Path::new(layout::CONFIG_DIR);
    let tls_dir = config_dir.join("tls");
    // Revocation lists only grow: a controller that has not seen the
    // latest one (an operator's, made before a removal) must not bring a
    // revoked operator back.
    // A list counts only when a CA the agent is to trust signed it, with
    // the number written in it.
    let offered = if bundle.crl_pem.trim().is_empty() {
        0
    } else {
        mlops_proto::der::verified_crl_number(&bundle.crl_pem, &bundle.ca_pem)
            .map_err(|e| InstallError::Invalid(format!("revocation list: {e}")))?
    };
    let (held_pem, held_number) = tls::read_crl(&tls_dir, &bundle.ca_pem).unwrap_or_default();
    let (crl_pem, crl_number) = if offered > held_number { (bundle.crl_pem, offered) } else { (held_pem, held_number) };
    let material =
        TlsMaterial { ca_pem: bundle.ca_pem, cert_pem: bundle.cert_pem, key_pem: bundle.key_pem, crl_pem, crl_number };
    // Refuse bad material before touching the working configuration.
    tls::server_config(&material).map_err(|e| InstallError::Invalid(e.to_string()))?;

    mkdir(config_dir, 0o755)?;
    mkdir(&tls_dir, 0o700)?;
    mkdir(Path::new(layout::STATE_DIR), 0o700)?;
    write(&tls_dir.join("ca.pem"), material.ca_pem.as_bytes(), 0o644)?;
    write(&tls_dir.join("server.pem"), material.cert_pem.as_bytes(), 0o644)?;
    write(&tls_dir.join("server.key"), material.key_pem.as_bytes(), 0o600)?;
    if material.crl_number > held_number {
        write(&tls_dir.join("crl.pem"), material.crl_pem.as_bytes(), 0o644)?;
    }
    // Installed through `sudo` by a non-root SSH user: that user's sshd
    // session is where the controller's tunnels come from.
    let operator_uids =
        std::env::var("SUDO_UID").ok().and_then(|u| u.parse().ok()).filter(|u| *u != 0).into_iter().collect();
    let config = AgentConfig { port, tls_dir, operator_uids, ..AgentConfig::default() };
    let config_path = AgentConfig::default_path();
    write(&config_path, serde_json::to_string_pretty(&config).expect("serializable").as_bytes(), 0o644)?;

    let report = match manager {
        ServiceManager::Systemd => restart_systemd(exe, &config_path)?,
        ServiceManager::Daemon => restart_daemon(exe, &config_path)?,
    };
    // Last: a matching hash tells the controller the install completed.
    write(Path::new(layout::INSTALL_HASH), format!("{config_sha256}\n").as_bytes(), 0o644)?;
    Ok(report)
}

fn restart_systemd(exe: &Path, config_path: &Path) -> Result<InstallReport, InstallError> {
    let unit = systemd_unit(&exe.display().to_string(), config_path);
    let unit_path = Path::new(layout::SYSTEMD_UNIT);
    let unit_changed = std::fs::read_to_string(unit_path).ok().as_deref() != Some(unit.as_str());
    if unit_changed {
        write(unit_path, unit.as_bytes(), 0o644)?;
        run("systemctl", &["daemon-reload"])?;
    }
    run("systemctl", &["enable", "--quiet", layout::SERVICE_NAME])?;
    run("systemctl", &["restart", layout::SERVICE_NAME])
        .map_err(|e| InstallError::Start(format!("{e}; see `journalctl -u {}`", layout::SERVICE_NAME)))?;
    let pid = run("systemctl", &["show", "--property=MainPID", "--value", layout::SERVICE_NAME])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|p| *p > 0);
    Ok(InstallReport { service_manager: ServiceManager::Systemd, pid, unit_changed })
}

fn restart_daemon(exe: &Path, config_path: &Path) -> Result<InstallReport, InstallError> {
    let pidfile = Path::new(layout::PIDFILE);
    if let Some(pid) = daemon::read_live_pid(pidfile) {
        daemon::stop_pid(pid, Duration::from_secs(10));
    }
    // `serve --daemonize` returns once the child listens (or failed to).
    let out = Command::new(exe)
        .args(["serve", "--daemonize", "--config"])
        .arg(config_path)
        .output()
        .map_err(|e| InstallError::Start(format!("cannot run {}: {e}", exe.display())))?;
    if !out.status.success() {
        return Err(InstallError::Start(format!(
            "{}; see {}",
            String::from_utf8_lossy(&out.stderr).trim(),
            layout::LOG_FILE
        )));
    }
    Ok(InstallReport {
        service_manager: ServiceManager::Daemon,
        pid: daemon::read_live_pid(pidfile),
        unit_changed: false,
    })
}

/// What `uninstall` removed.
#[derive(Debug, Serialize)]
pub struct UninstallReport {
    pub stopped: bool,
    pub removed: Vec<String>,
}

/// Stops the agent and removes what `install` created. With `keep_state`,
/// `/var/lib/mlops-agent` stays.
pub fn uninstall(manager: ServiceManager, keep_state: bool) -> Result<UninstallReport, InstallError> {
    let mut stopped = false;
    let mut removed = Vec::new();
    let unit = Path::new(layout::SYSTEMD_UNIT);
    if manager == ServiceManager::Systemd && unit.exists() {
        stopped = run("systemctl", &["disable", "--now", "--quiet", layout::SERVICE_NAME]).is_ok();
        std::fs::remove_file(unit).map_err(|source| InstallError::Write { path: unit.into(), source })?;
        removed.push(layout::SYSTEMD_UNIT.to_string());
        run("systemctl", &["daemon-reload"])?;
    }
    if let Some(pid) = daemon::read_live_pid(Path::new(layout::PIDFILE))
        && pid != std::process::id() as i32
    {
        stopped |= daemon::stop_pid(pid, Duration::from_secs(10));
    }
    let mut dirs = vec![layout::CONFIG_DIR, layout::RUN_DIR, layout::LOG_DIR, layout::BINARY_DIR];
    if !keep_state {
        dirs.push(layout::STATE_DIR);
    }
    for dir in dirs {
        if remove_tree(Path::new(dir))? {
            removed.push(dir.to_string());
        }
    }
    Ok(UninstallReport { stopped, removed })
}

/// Removes `dir` and its contents. When `dir` itself cannot go because it
/// is a mount point (EBUSY), its emptied self stays. Returns whether it existed.
fn remove_tree(dir: &Path) -> Result<bool, InstallError> {
    let err = |source| InstallError::Write { path: dir.into(), source };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(err(e)),
    };
    for entry in entries {
        let path = entry.map_err(err)?.path();
        let result = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|source| InstallError::Write { path: path.clone(), source })?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) => Err(err(e)),
    }
}

fn mkdir(dir: &Path, mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| InstallError::Write { path: dir.into(), source };
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Writes through a temporary file in the same directory, created with
/// `mode`, fsynced, renamed over `path`.
fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| InstallError::Write { path: path.into(), source };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

fn run(program: &str, args: &[&str]) -> Result<String, InstallError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| InstallError::Command { command: command.clone(), output: e.to_string() })?;
    if !out.status.success() {
        return Err(InstallError::Command { command, output: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_file() {
        let unit = systemd_unit(layout::BINARY, Path::new("/etc/mlops-agent/agent.json"));
        // systemd must wait for readiness, restart on failure, and start at boot.
        for line in [
            "Type=notify",
            "Restart=on-failure",
            "ExecStart=/usr/local/lib/mlops-agent/mlops-agent serve --config /etc/mlops-agent/agent.json",
            "WantedBy=multi-user.target",
            "[Unit]",
            "[Service]",
            "[Install]",
        ] {
            assert!(unit.lines().any(|l| l == line), "missing `{line}` in\n{unit}");
        }
        // Every non-comment line is a section or key=value: nothing systemd would reject.
        for line in unit.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            assert!(line.starts_with('[') && line.ends_with(']') || line.contains('='), "bad line `{line}`");
        }
    }

    #[test]
    fn bad_bundles_are_refused_before_writing() {
        let err = install(b"\xff\xff\xff", Path::new("/bin/false"), ServiceManager::Daemon).unwrap_err();
        assert!(matches!(err, InstallError::Decode(_)), "{err}");
        let bundle = InstallBundle {
            ca_pem: "not pem".into(),
            cert_pem: String::new(),
            key_pem: String::new(),
            port: 7443,
            controller_version: "t".into(),
            ..Default::default()
        };
        let err = install(&bundle.encode_to_vec(), Path::new("/bin/false"), ServiceManager::Daemon).unwrap_err();
        assert!(matches!(err, InstallError::Invalid(_)), "{err}");
        let bundle = InstallBundle { port: 70000, ..bundle };
        assert!(
            install(&bundle.encode_to_vec(), Path::new("/bin/false"), ServiceManager::Daemon)
                .unwrap_err()
                .to_string()
                .contains("70000")
        );
    }

    #[test]
    fn remove_tree_empties_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("x");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), "1").unwrap();
        assert!(remove_tree(&d).unwrap());
        assert!(!d.exists());
        assert!(!remove_tree(&d).unwrap());
    }
}
