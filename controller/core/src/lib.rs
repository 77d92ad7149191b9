//! What `mlopsctl` does, without the command line: every command is a
//! function of [`commands`], and the CLI only parses flags and prints.
//!
//! The path of a deploy through this crate:
//! 1. [`commands::Setup`] resolves the targets ([`mlops_inventory`]) and
//!    opens the controller's state ([`state::StateDir`]: CA, client
//!    identity); [`commands::StackOptions`] loads the stack (a directory,
//!    or the embedded platform bundle) once for all hosts.
//! 2. [`fanout::per_host`] runs one task per [`mlops_inventory::Target`],
//!    at most `forks` at a time; a failing host never stops the others.
//! 3. Per host, [`transport::Transport`] is either an SSH session
//!    ([`mlops_ssh::Session`]) or this machine; [`bootstrap::deploy_host`]
//!    first asks the agent (`Hello` over [`client::AgentConn`]: gRPC over
//!    TLS with the controller's client certificate, through an SSH
//!    `direct-tcpip` channel to the agent's loopback port); only when it is
//!    not current does it probe the host with one shell command, upload the
//!    agent binary when its sha256 differs, and pipe an install bundle
//!    (certificates, port) to `mlops-agent install`.
//! 4. With a stack ([`stack::StackPlan`]): `EnsureDocker`, the stack
//!    directory through [`sync`] (content-addressed; only what the agent
//!    lacks), then `Converge`, whose events stream back.
//!
//! Progress, warnings and notes go to a [`progress::Report`]; failures are
//! [`ControllerError`]s, the agent's by their typed kind.

pub mod agent_binary;
pub mod bootstrap;
pub mod client;
pub mod commands;
pub mod error;
pub mod fanout;
pub mod images;
pub mod local_engine;
pub mod placement;
pub mod progress;
pub mod rollout;
pub mod secrets;
pub mod stack;
pub mod state;
pub mod sync;
pub mod transport;

pub use error::ControllerError;

/// The controller's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
