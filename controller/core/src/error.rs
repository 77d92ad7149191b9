//! The controller's errors, each with the hint the CLI prints under it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no agent binary found (looked in: {})", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    AgentBinaryNotFound { searched: Vec<PathBuf> },
    #[error("no static `{name}` binary for the stack (looked in: {})", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ArtifactNotFound { name: String, variable: String, searched: Vec<PathBuf> },
    #[error("cannot read agent binary `{}`", path.display())]
    AgentBinaryRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent binary `{}` is not a Linux executable for a supported CPU", path.display())]
    AgentBinaryFormat { path: PathBuf },
    #[error("{host} runs {host_arch}, but the agent binary is built for {binary_arch}")]
    ArchMismatch { host: String, host_arch: String, binary_arch: String },
    #[error("{host} runs `{os}`; the agent supports Linux only")]
    UnsupportedOs { host: String, os: String },
    #[error("sudo on {host} asks {user} for a password; mlopsctl needs passwordless sudo to install the agent")]
    SudoNeedsPassword { host: String, user: String },
    #[error("{user} on {host} is not root and sudo is not installed")]
    NoSudo { host: String, user: String },
    #[error("probing {host} failed: {message}")]
    Probe { host: String, message: String },
    #[error("uploading the agent to {host} failed: {message}")]
    Upload { host: String, message: String },
    #[error("installing the agent on {host} failed: {message}")]
    Install { host: String, message: String },
    #[error("the agent on {host} does not answer on 127.0.0.1:{port}: {message}")]
    AgentUnreachable { host: String, port: u16, message: String },
    #[error("the agent on {host} still runs binary {running} after a restart (expected {expected})")]
    StaleAgent { host: String, running: String, expected: String },
    #[error("{host}: {call} failed: {status}")]
    Rpc { host: String, call: &'static str, status: String },
    #[error("{host}: no Docker engine: {message}")]
    NoDocker { host: String, message: String },
    #[error("{host}: {message}")]
    Converge { host: String, message: String },
    #[error("{host}: {message}")]
    StackLocked { host: String, message: String },
    #[error("the agent on {host} speaks API level {level}; this needs level {needed}")]
    AgentTooOld { host: String, level: u32, needed: u32 },
    #[error("local command failed: {0}")]
    Local(String),
    #[error(transparent)]
    Ssh(#[from] mlops_ssh::SshError),
    #[error(transparent)]
    Pki(#[from] mlops_pki::PkiError),
    #[error("cannot use state directory `{}`", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ControllerError {
    /// The connection to the agent broke (as opposed to the agent answering
    /// with an error): worth a retry on a new connection.
    pub fn is_transport_failure(&self) -> bool {
        let text = match self {
            ControllerError::Rpc { status, .. } => status,
            ControllerError::Converge { message, .. } => message,
            ControllerError::AgentUnreachable { .. } => return true,
            _ => return false,
        };
        ["h2 protocol error", "transport error", "connection reset", "broken pipe", "error reading a body"]
            .iter()
            .any(|m| text.contains(m))
    }

    /// A suggestion for the user, printed as `hint:`.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            ControllerError::AgentBinaryNotFound { .. } => "build it with `cargo build --release -p mlops-agent`, or pass --agent-binary PATH (or set MLOPS_AGENT_BINARY)".into(),
            ControllerError::ArtifactNotFound { name, variable, .. } => format!(
                "build it with `cargo {}-static` (it runs in a FROM scratch image, so it must be static), or set {variable}",
                name.trim_start_matches("mlops-airflow-").trim_start_matches("mlops-")
            ),
            ControllerError::AgentBinaryFormat { .. } | ControllerError::ArchMismatch { .. } => "pass --agent-binary with an agent built for the host's CPU (`cargo build --release -p mlops-agent --target <arch>-unknown-linux-gnu`)".into(),
            ControllerError::SudoNeedsPassword { user, .. } => format!("allow it with a sudoers line such as `{user} ALL=(ALL) NOPASSWD: ALL` (in /etc/sudoers.d/), or connect as root"),
            ControllerError::NoSudo { .. } => "install sudo on the host and allow the user passwordless sudo, or connect as root".into(),
            ControllerError::AgentUnreachable { message, .. } if message.contains("UnknownIssuer") => {
                "that agent's certificate comes from another controller's CA (another state directory); `mlopsctl deploy` from this one takes the host over".into()
            }
            ControllerError::Install { .. } | ControllerError::AgentUnreachable { .. } | ControllerError::StaleAgent { .. } => {
                "look at the agent's log on the host: `journalctl -u mlops-agent` (systemd) or /var/log/mlops-agent/agent.log".into()
            }
            ControllerError::StateDir { .. } => "choose another with --state-dir or MLOPS_STATE_DIR".into(),
            ControllerError::NoDocker { .. } => "let mlopsctl install it (drop --no-docker-install), or install Docker on the host".into(),
            ControllerError::StackLocked { .. } => "wait for that deploy to finish; a lock held by a controller that died is released when its connection closes".into(),
            ControllerError::AgentTooOld { .. } => "run `mlopsctl deploy` to upgrade the agent".into(),
            ControllerError::Converge { message, .. } if message.contains("cannot pull image") => {
                "where no registry can supply an image (Grafana's, on hosts without registry access), leave that service out with --skip SERVICE".into()
            }
            ControllerError::Converge { message, .. } if message.contains("unhealthy") || message.contains("exited") => {
                "`mlopsctl logs SERVICE` shows what the service printed".into()
            }
            ControllerError::Ssh(e) => return e.hint(),
            ControllerError::Pki(_) => "the controller's CA lives in <state-dir>/pki; check its files and permissions".into(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_told_from_answers() {
        let broke = ControllerError::Converge {
            host: "h".into(),
            message: "h2 protocol error: error reading a body from connection".into(),
        };
        assert!(broke.is_transport_failure());
        let answered = ControllerError::Converge {
            host: "h".into(),
            message: "service `web` is unhealthy; last health check: exit 1".into(),
        };
        assert!(!answered.is_transport_failure());
        let locked =
            ControllerError::StackLocked { host: "h".into(), message: "stack `p` is being deployed by x".into() };
        assert!(!locked.is_transport_failure());
    }
}
