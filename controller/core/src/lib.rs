//! What `mlopsctl` does, without the command line.
//!
//! The path of a deploy through this crate:
//! 1. [`state::StateDir`] opens the controller's state (CA, client identity).
//! 2. [`fanout::run`] runs one task per [`mlops_inventory::Target`], at most
//!    `forks` at a time; a failing host never stops the others.
//! 3. Per host, [`transport::Transport`] is either an SSH session
//!    ([`mlops_ssh::Session`]) or this machine; [`bootstrap::ensure_agent`]
//!    probes the host with one shell command, uploads the agent binary only
//!    when its sha256 differs, pipes an install bundle (certificates, port)
//!    to `mlops-agent install` when anything changed, then connects.
//! 4. [`client::AgentConn`] is gRPC over TLS (client certificate) over an
//!    SSH `direct-tcpip` channel to the agent's loopback port (or plain
//!    loopback TCP for this machine). `Hello` compares API level and binary
//!    hash; a stale agent is restarted, then `GetFacts`.
//!
//! 5. With a stack ([`stack::StackPlan`]): `EnsureDocker`, the stack directory
//!    through [`sync`] (content-addressed; only what the agent lacks), then
//!    `Converge`, whose events stream back.
//!
//! Progress goes out as [`progress::Event`]s for the caller to print.

pub mod agent_binary;
pub mod bootstrap;
pub mod client;
pub mod error;
pub mod fanout;
pub mod progress;
pub mod secrets;
pub mod stack;
pub mod state;
pub mod sync;
pub mod transport;

pub use error::ControllerError;

/// The controller's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
