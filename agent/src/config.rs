//! The agent's start-up configuration.
//!
//! `mlops-agent install` writes `/etc/mlops-agent/agent.json` and the TLS
//! files under `/etc/mlops-agent/tls/`; `mlops-agent serve` reads them.
//! Flags on `serve` can point elsewhere (tests run agents side by side).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mlops_proto::layout;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not valid agent configuration: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("listen address {0} is not a loopback address; the agent is reached only through SSH tunnels")]
    NotLoopback(SocketAddr),
}

/// `agent.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Loopback port to listen on.
    pub port: u16,
    /// Directory with `ca.pem`, `server.pem`, `server.key`.
    pub tls_dir: PathBuf,
    /// Where the agent keeps state.
    pub state_dir: PathBuf,
    /// The Docker engine's socket.
    #[serde(default = "default_docker_socket")]
    pub docker_socket: PathBuf,
    /// Users (besides root) whose connections to the port are the
    /// controller's: the SSH user that installed the agent (its sshd
    /// session opens the tunnel). Their handshakes are never crowded out by
    /// other local users' connections.
    #[serde(default)]
    pub operator_uids: Vec<u32>,
}

fn default_docker_socket() -> PathBuf {
    PathBuf::from(crate::engine::docker::DEFAULT_SOCKET)
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            port: mlops_proto::DEFAULT_AGENT_PORT,
            tls_dir: Path::new(layout::CONFIG_DIR).join("tls"),
            state_dir: PathBuf::from(layout::STATE_DIR),
            docker_socket: default_docker_socket(),
            operator_uids: Vec::new(),
        }
    }
}

impl AgentConfig {
    pub fn default_path() -> PathBuf {
        Path::new(layout::CONFIG_DIR).join("agent.json")
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text)
            .map_err(|e| ConfigError::Invalid { path: path.to_path_buf(), message: e.to_string() })
    }

    /// The listen address: always loopback.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// Refuses anything but a loopback address.
pub fn check_loopback(addr: SocketAddr) -> Result<SocketAddr, ConfigError> {
    if addr.ip().is_loopback() { Ok(addr) } else { Err(ConfigError::NotLoopback(addr)) }
}
