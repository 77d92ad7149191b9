//! The wire contract between the controller and the agent.
//!
//! `proto/agent.proto` is the source of truth; this crate only compiles it
//! and adds the constants both sides agree on.

#![allow(clippy::all, clippy::pedantic, unreachable_pub)]

/// Generated types and service stubs for `mlops.agent.v1`.
pub mod v1 {
    tonic::include_proto!("mlops.agent.v1");
}

/// The API level this build speaks. Bump it when an RPC or a field that the
/// controller relies on is added: a controller that sees an agent with a
/// lower level upgrades the agent before using the newer calls.
pub const API_LEVEL: u32 = 1;

/// The TLS server name every agent certificate carries. The controller
/// reaches agents through SSH tunnels, so the DNS name of the host plays no
/// part; the certificate chain to the controller's CA is what authenticates.
pub const AGENT_TLS_NAME: &str = "mlops-agent";

/// Default loopback port the agent listens on.
pub const DEFAULT_AGENT_PORT: u16 = 7443;
