//! The agent's Docker engine work, all through the Engine API (bollard;
//! nothing shells out to the `docker` CLI).
//!
//! - [`docker`]: connecting (API version negotiated: engines as old as 1.41
//!   answer), and installing and starting an engine when none answers.
//! - [`sync`]: the content-addressed file sync behind `SyncBegin`/`SyncUpload`/`SyncCommit`.
//! - [`build`]: build contexts (tar, `.dockerignore`, context hash), base
//!   images (pull, or debootstrap when asked and no registry answers).
//! - [`converge`]: a stack model to containers, networks and volumes,
//!   changing only what differs, in named phases; `down` and `status`.
//! - [`watch`]: health transitions from Docker events, and logs.
//! - [`lock`]: one deploy per stack at a time.
//! - [`exec`]: a command in a running service's container (secret rotation).
//! - [`ship`]: images out of and into the engine as tarball streams
//!   (images built once, shipped to the other hosts).
//! - [`volumes`]: a project's data leaving and arriving (`migrate`):
//!   volumes and command output as checked streams, services stopped.
//! - [`revisions`]: what each successful converge brought a project to,
//!   kept so the host can return to it.
//!
//! The engine knows nothing of the RPC layer: it reports through its own
//! types ([`Event`], [`EngineError`], [`ServiceStatus`],
//! [`watch::HealthChange`], [`watch::LogChunk`], [`docker::EngineStatus`]),
//! and `service.rs` turns them into messages and statuses. (The sync store
//! takes and returns the sync messages of `mlops_proto::v1` as plain data.)

pub mod build;
pub mod confine;
pub mod converge;
pub mod docker;
pub mod exec;
pub mod lock;
pub mod revisions;
pub mod ship;
pub mod sync;
pub mod volumes;
pub mod watch;

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Errors of the engine layer; each is one kind of failure the controller
/// can tell apart (see `service.rs` for the mapping).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request (or the stack model in it) is invalid; `field` names what.
    #[error("{message}")]
    BadRequest { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("stack `{project}` is being deployed by {holder} (since {since})")]
    Locked { project: String, holder: String, since: String },
    #[error("no Docker engine answers at {socket}: {message}")]
    NoEngine { socket: String, message: String },
    #[error("Docker engine: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("{0}")]
    InstallFailed(String),
    /// An image build, or the base image it needs, failed.
    #[error("{}{}{message}{}", service_prefix(service), build_of(image), output_suffix(output))]
    BuildFailed { service: String, image: String, message: String, output: String },
    #[error("{}cannot pull image {image}: {message}", service_prefix(service))]
    ImageMissing { service: String, image: String, message: String },
    #[error("service `{service}` cannot publish port {address}: it is in use{}", if holder.is_empty() { String::new() } else { format!(" by {holder}") })]
    PortInUse { service: String, address: String, port: u16, holder: String },
    #[error("service `{service}` is unhealthy; last health check: {output}")]
    Unhealthy { service: String, output: String },
    #[error("service `{service}` exited with code {code}; last log lines: {logs}")]
    Exited { service: String, code: i64, logs: String },
    #[error("service `{service}` was not {condition} after {seconds} s{detail}")]
    Timeout { service: String, condition: String, seconds: u64, detail: String },
    /// A model would start `service` with another value of `variable`
    /// than the data in `volume` was made with.
    #[error(
        "service `{service}`: `{variable}` differs from the value the data in volume `{volume}` was made with; refused before anything was changed"
    )]
    CredentialChanged { service: String, variable: String, volume: String, secrets: Vec<String> },
    /// A converge failed with `cause`; the host was then returned to kept
    /// revision `revision` (`rollback_error`: why that failed too).
    #[error("{cause}; {}", match rollback_error {
        None => format!("the host was returned to revision {revision}"),
        Some(e) => format!("returning the host to revision {revision} failed too: {e}"),
    })]
    RolledBack { cause: Box<EngineError>, revision: u64, rollback_error: Option<String> },
    /// Too little free space in Docker's data directory to start a build.
    #[error(
        "{}only {} free in {path} (Docker's data), below the {} floor for image builds; nothing was built",
        service_prefix(service),
        mlops_proto::bytes_human(*free),
        mlops_proto::bytes_human(*floor)
    )]
    DiskFull { service: String, path: String, free: u64, floor: u64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn service_prefix(service: &str) -> String {
    if service.is_empty() { String::new() } else { format!("service `{service}`: ") }
}

fn build_of(image: &str) -> String {
    if image.is_empty() { "build failed: ".into() } else { format!("build of {image} failed: ") }
}

fn output_suffix(output: &str) -> String {
    if output.is_empty() { String::new() } else { format!("; last output: {output}") }
}

impl EngineError {
    /// An I/O error while doing `what` (which names the file when there is one).
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let what = what.into();
        move |source| EngineError::Io { what, path: String::new(), source }
    }

    /// An I/O error on `path`.
    pub fn io_at(what: &str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EngineError {
        let (what, path) = (format!("{what} {}", path.display()), path.display().to_string());
        move |source| EngineError::Io { what, path, source }
    }

    pub fn bad_request(field: &str, message: impl Into<String>) -> EngineError {
        EngineError::BadRequest { field: field.to_string(), message: message.into() }
    }

    /// Names the service a build or pull failure belongs to.
    pub fn in_service(mut self, name: &str) -> EngineError {
        if let EngineError::BuildFailed { service, .. }
        | EngineError::ImageMissing { service, .. }
        | EngineError::DiskFull { service, .. } = &mut self
        {
            *service = name.to_string();
        }
        self
    }
}

/// What a stack operation did (see [`Events`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    NetworkCreated,
    NetworkRemoved,
    VolumeCreated,
    VolumeRemoved,
    BuildStarted,
    BuildProgress,
    Built,
    Pulling,
    Waiting,
    Created,
    Recreated,
    Started,
    Unchanged,
    Healthy,
    Removed,
    OrphanRemoved,
    /// A failed converge returns the host to a kept revision.
    RollingBack,
    /// A changed service without a health check is watched for its minimum healthy time.
    Watching,
}

/// One step of a stack operation; `service` is empty for stack-wide steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub unix_ms: u64,
    pub service: String,
    pub action: Action,
    pub detail: String,
}

/// Where a stack operation's events go. A closed receiver (the caller went
/// away) is ignored: the work itself is stopped by dropping its future.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
}

impl Events {
    pub fn new(tx: mpsc::Sender<Event>) -> Self {
        Events { tx }
    }

    fn event(service: &str, action: Action, detail: String) -> Event {
        Event { unix_ms: now_ms(), service: service.to_string(), action, detail }
    }

    pub async fn say(&self, service: &str, action: Action, detail: impl Into<String>) {
        let _ = self.tx.send(Self::event(service, action, detail.into())).await;
    }

    /// A synchronous sink for code that cannot await (build progress); a
    /// line is dropped rather than waited for when the channel is full.
    pub fn progress_sink(&self, service: &str) -> impl Fn(String) + Sync + use<> {
        let tx = self.tx.clone();
        let service = service.to_string();
        move |detail: String| {
            let _ = tx.try_send(Self::event(&service, Action::BuildProgress, detail));
        }
    }
}

/// A service's container as the engine reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStatus {
    pub service: String,
    pub container_id: String,
    /// Docker's state: created, running, exited, ...
    pub state: String,
    /// healthy, unhealthy, starting, or empty without a health check.
    pub health: String,
    pub image: String,
    /// Created or replaced by this converge.
    pub changed: bool,
    /// Unix milliseconds when the container last started (0: never).
    pub started_at_ms: u64,
}

/// What a converge or down ends with.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub summary: String,
    pub services: Vec<ServiceStatus>,
    /// After a converge: each service's image ID and config hash (what a
    /// revision keeps).
    pub images: std::collections::BTreeMap<String, String>,
    pub config_hashes: std::collections::BTreeMap<String, String>,
}
