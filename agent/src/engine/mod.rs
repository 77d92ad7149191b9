//! The agent's Docker engine work, all through the Engine API (bollard;
//! nothing shells out to the `docker` CLI).
//!
//! - [`docker`]: connecting (API version negotiated: engines as old as 1.41
//!   answer), and installing and starting an engine when none answers.
//! - [`sync`]: the content-addressed file sync behind `SyncBegin`/`SyncUpload`/`SyncCommit`.
//! - [`build`]: build contexts (tar, `.dockerignore`, context hash), base
//!   images (pull, or debootstrap when asked and no registry answers).
//! - [`converge`]: a stack model to containers, networks and volumes,
//!   changing only what differs; `down`.
//! - [`watch`]: health transitions from Docker events, and logs.
//! - [`lock`]: one deploy per stack at a time.

pub mod build;
pub mod converge;
pub mod docker;
pub mod lock;
pub mod sync;
pub mod watch;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Errors of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("Docker engine: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("no Docker engine answers at {socket}: {message}")]
    NoEngine { socket: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("stack `{project}` is being deployed by {holder} (since {since})")]
    Locked { project: String, holder: String, since: String },
    #[error("{0}")]
    Failed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let what = what.into();
        move |source| EngineError::Io { what, source }
    }
}
