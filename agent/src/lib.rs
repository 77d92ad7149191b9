//! `mlops-agent`: the process the controller drives on each host.
//!
//! Layout of this crate:
//! - [`backups`]: backups taken on the agent's own schedule.
//! - [`config`]: what the agent reads at start (`/etc/mlops-agent/agent.json`, TLS files).
//! - [`tls`]: the rustls server configuration that admits only clients
//!   whose certificate chains to the controller's CA.
//! - [`server`]: the listener, TLS handshakes and the tonic server, with an
//!   explicit shutdown signal passed in by the caller.
//! - [`service`]: the RPC handlers; thin, they call [`facts`] and
//!   [`engine`], map every error to a typed `Failure` in one place, and turn
//!   the engine's events into messages.
//! - [`facts`]: host facts and metrics read from `/proc`, `statvfs` and the
//!   Docker socket.
//! - [`engine`]: the Docker engine, file sync and stacks (see its docs); it
//!   knows nothing of the RPC layer.
//! - [`install`]: `mlops-agent install|uninstall`, run by the controller over
//!   SSH: writes configuration and the service definition, (re)starts.
//! - [`daemon`]: running as a plain daemon where PID 1 is not systemd, and
//!   `sd_notify` readiness where it is.
//! - [`secrets`]: each project's credentials, kept on the host (root only).
//! - [`history`]: what each operator did to each project on this host.
//! - [`stored`]: backups a controller keeps on this host, and reads back.

pub mod backups;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod facts;
pub mod history;
pub mod install;
pub mod secrets;
pub mod server;
pub mod service;
pub mod stored;
pub mod tls;

/// The agent's version, reported to the controller.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
