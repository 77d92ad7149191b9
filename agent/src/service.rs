//! The `mlops.agent.v1.Agent` RPC handlers.
//!
//! Handlers stay thin: they check the request, call [`crate::facts`] or
//! [`crate::engine`], and shape the answer. Long work runs in a task that
//! feeds the response stream and ends when the client goes away or the
//! agent shuts down. This module is also where the engine's own types meet
//! the wire: every failure goes through [`failure`] (one `match` from
//! [`AgentError`] to a typed `Failure`, sent in the status details), and
//! engine events, service states, health changes and log chunks are
//! converted to their messages here.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use mlops_proto::v1::agent_server::Agent;
use mlops_proto::v1::{
    BackupFileChunk, BackupPiece, BackupPlan, BackupScheduleReply, BackupScheduleRequest, BackupStored,
    BuildImagesRequest, DataChunk, DataSource, DockerStatus, DownRequest, EnsureDockerRequest, ExecReply, ExecRequest,
    ExportDataRequest, Failure, FailureKind, GetFactsRequest, GetSecretsRequest, HealthEvent, HeartbeatEvent,
    HeartbeatRequest, HelloRequest, HelloResponse, HistoryReply, HistoryRequest, HostFacts, ImageChunk, ImagePlanReply,
    ImagePlanRequest, ImageState, ImportDataReply, LoadImageReply, LogChunk, LogsRequest, PlanStackReply,
    PlanStackRequest, PlannedService, Progress, PutSecretsRequest, ReadBackupRequest, Revision, RevisionsReply,
    RevisionsRequest, RollbackRequest, SaveImageRequest, Secrets, ServiceState, StackAction, StackEvent,
    StackStatusReply, StackStatusRequest, StopServicesReply, StopServicesRequest, SyncChunk, SyncCommitRequest,
    SyncManifest, SyncPlan, SyncReport, SyncUploadReply, TagImageReply, TagImageRequest, WatchHealthRequest,
    backup_piece, backup_stored,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::{
    self, Action, EngineError, Events, Outcome, ServiceStatus, converge, docker, lock::Locks, revisions,
    sync::SyncStore, watch as engine_watch,
};
use crate::facts;
use crate::history::History;
use crate::secrets::SecretStore;
use crate::tls::Peer;

/// Errors of the RPC layer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Longest message and output a `Failure` carries: it travels in the
/// status's trailers, which HTTP/2 peers bound (16 KiB by default).
const MAX_FAILURE_TEXT: usize = 2048;

/// `text`, or its last `max` bytes (at a character boundary) after `...`:
/// the end of an output says the most.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// The one mapping from an agent error to what the controller receives:
/// a kind, the message, and the fields the kind calls for.
pub fn failure(e: &AgentError) -> Failure {
    let mut f = failure_uncapped(e);
    f.message = tail(&f.message, MAX_FAILURE_TEXT);
    f.output = tail(&f.output, MAX_FAILURE_TEXT);
    f
}

fn failure_uncapped(e: &AgentError) -> Failure {
    let mut f = Failure { message: e.to_string(), ..Default::default() };
    let kind = match e {
        AgentError::ShuttingDown => FailureKind::ShuttingDown,
        AgentError::InvalidArgument { field, .. } => {
            f.field = (*field).to_string();
            FailureKind::BadRequest
        }
        AgentError::Internal(_) => FailureKind::Internal,
        AgentError::Engine(engine) => engine_failure(engine, &mut f),
    };
    f.set_kind(kind);
    f
}

/// The kind of an engine error, its fields filled in `f`.
fn engine_failure(engine: &EngineError, f: &mut Failure) -> FailureKind {
    match engine {
        // The cause's kind and fields, and where the host is now.
        EngineError::RolledBack { cause, revision, rollback_error } => {
            f.rolled_back_to = if rollback_error.is_none() { *revision } else { 0 };
            f.rollback_error = rollback_error.clone().unwrap_or_default();
            engine_failure(cause, f)
        }
        EngineError::BadRequest { field, .. } => {
            f.field.clone_from(field);
            FailureKind::BadRequest
        }
        EngineError::NotFound(_) => FailureKind::NotFound,
        EngineError::Locked { project, holder, since } => {
            (f.project, f.holder, f.since) = (project.clone(), holder.clone(), since.clone());
            FailureKind::StackLocked
        }
        EngineError::NoEngine { socket, .. } => {
            f.path.clone_from(socket);
            FailureKind::EngineUnreachable
        }
        EngineError::Docker(_) => FailureKind::EngineError,
        EngineError::InstallFailed(_) => FailureKind::DockerInstallFailed,
        EngineError::BuildFailed { service, image, output, .. } => {
            (f.service, f.image, f.output) = (service.clone(), image.clone(), output.clone());
            FailureKind::BuildFailed
        }
        EngineError::ImageMissing { service, image, .. } => {
            (f.service, f.image) = (service.clone(), image.clone());
            FailureKind::ImageMissing
        }
        EngineError::PortInUse { service, port, holder, .. } => {
            (f.service, f.port, f.output) = (service.clone(), u32::from(*port), holder.clone());
            FailureKind::PortInUse
        }
        EngineError::Unhealthy { service, output } => {
            (f.service, f.output) = (service.clone(), output.clone());
            FailureKind::HealthCheckFailed
        }
        EngineError::Exited { service, code, logs } => {
            (f.service, f.exit_code, f.output) = (service.clone(), *code, logs.clone());
            FailureKind::ServiceExited
        }
        EngineError::Timeout { service, .. } => {
            f.service.clone_from(service);
            FailureKind::Timeout
        }
        EngineError::Io { path, source, .. } => {
            f.path.clone_from(path);
            if crate::engine::confine::is_contended(source) { FailureKind::Contended } else { FailureKind::Io }
        }
        EngineError::DiskFull { service, path, free, floor } => {
            (f.service, f.path, f.output) = (service.clone(), path.clone(), format!("{free} {floor}"));
            FailureKind::DiskFull
        }
        EngineError::CredentialChanged { service, variable, volume, secrets } => {
            (f.service, f.field, f.path, f.output) =
                (service.clone(), variable.clone(), volume.clone(), secrets.join(","));
            FailureKind::CredentialChanged
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        mlops_proto::failure::into_status(&failure(&e))
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        AgentError::Engine(e).into()
    }
}

/// The failure of a stack operation on `project`, which its `Failure` names.
fn stack_status(e: EngineError, project: &str) -> Status {
    let mut f = failure(&AgentError::Engine(e));
    if f.project.is_empty() {
        f.project = project.to_string();
    }
    mlops_proto::failure::into_status(&f)
}

fn service_state(s: ServiceStatus) -> ServiceState {
    ServiceState {
        service: s.service,
        container_id: s.container_id,
        state: s.state,
        health: s.health,
        image: s.image,
        changed: s.changed,
        started_at_ms: s.started_at_ms,
    }
}

fn stack_action(a: Action) -> StackAction {
    match a {
        Action::NetworkCreated => StackAction::NetworkCreated,
        Action::NetworkRemoved => StackAction::NetworkRemoved,
        Action::VolumeCreated => StackAction::VolumeCreated,
        Action::VolumeRemoved => StackAction::VolumeRemoved,
        Action::BuildStarted => StackAction::BuildStarted,
        Action::BuildProgress => StackAction::BuildProgress,
        Action::Built => StackAction::Built,
        Action::Pulling => StackAction::Pulling,
        Action::Waiting => StackAction::Waiting,
        Action::Created => StackAction::Created,
        Action::Recreated => StackAction::Recreated,
        Action::Started => StackAction::Started,
        Action::Unchanged => StackAction::Unchanged,
        Action::Healthy => StackAction::Healthy,
        Action::Removed => StackAction::Removed,
        Action::OrphanRemoved => StackAction::OrphanRemoved,
        Action::RollingBack => StackAction::RollingBack,
        Action::Watching => StackAction::Watching,
    }
}

fn stack_event(e: engine::Event) -> StackEvent {
    let mut ev = StackEvent { unix_ms: e.unix_ms, service: e.service, detail: e.detail, ..Default::default() };
    ev.set_action(stack_action(e.action));
    ev
}

fn docker_status(s: docker::EngineStatus) -> DockerStatus {
    DockerStatus { available: s.available, version: s.version, api_version: s.api_version, error: s.error }
}

/// How long one image load or volume import may take (see `load_image`).
const LOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// What the handlers need to know about this agent process.
#[derive(Clone, Debug)]
pub struct AgentService {
    started: Instant,
    started_unix: u64,
    binary_sha256: String,
    config_sha256: String,
    service_manager: String,
    state_dir: PathBuf,
    docker_socket: PathBuf,
    log_dir: PathBuf,
    sync: SyncStore,
    secrets: std::sync::Arc<SecretStore>,
    history: std::sync::Arc<History>,
    revisions: std::sync::Arc<revisions::Revisions>,
    /// The revocation list enforced (number, PEM), for `Hello`.
    crl: (u64, String),
    /// The end of the server certificate's validity, for `Hello`.
    cert_not_after: i64,
    locks: Locks,
    shutdown: watch::Receiver<bool>,
    /// Scheduled backups; their task is started by [`Self::start_backups`].
    backups: crate::backups::Schedules,
}

impl std::fmt::Debug for SyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncStore")
    }
}

impl AgentService {
    /// `binary_sha256` identifies the running executable and
    /// `config_sha256` its configuration; `shutdown` ends long-lived streams
    /// when the server stops.
    pub fn new(
        binary_sha256: String,
        config_sha256: String,
        service_manager: &str,
        state_dir: PathBuf,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let sync = SyncStore::new(&state_dir, engine::sync::Limits::default());
        sync.collect_garbage();
        let secrets = std::sync::Arc::new(SecretStore::new(&state_dir));
        let locks = Locks::default();
        let backups = crate::backups::Schedules::new(
            &state_dir,
            PathBuf::from(docker::DEFAULT_SOCKET),
            locks.clone(),
            secrets.clone(),
        );
        AgentService {
            started: Instant::now(),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            binary_sha256,
            config_sha256,
            service_manager: service_manager.to_string(),
            sync,
            secrets,
            history: std::sync::Arc::new(History::new(&state_dir)),
            revisions: std::sync::Arc::new(revisions::Revisions::new(&state_dir)),
            crl: (0, String::new()),
            cert_not_after: 0,
            state_dir,
            docker_socket: PathBuf::from(docker::DEFAULT_SOCKET),
            log_dir: PathBuf::from(mlops_proto::layout::LOG_DIR),
            locks,
            shutdown,
            backups,
        }
    }

    pub fn with_docker_socket(mut self, socket: PathBuf) -> Self {
        self.backups =
            crate::backups::Schedules::new(&self.state_dir, socket.clone(), self.locks.clone(), self.secrets.clone());
        self.docker_socket = socket;
        self
    }

    /// Starts the task that takes scheduled backups; it ends with the
    /// server's shutdown signal.
    pub fn start_backups(self) -> Self {
        tokio::spawn(self.backups.clone().run(self.shutdown.clone()));
        self
    }

    pub fn with_crl(mut self, number: u64, pem: String) -> Self {
        self.crl = (number, pem);
        self
    }

    pub fn with_cert_not_after(mut self, unix: i64) -> Self {
        self.cert_not_after = unix;
        self
    }

    fn uptime(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Docker's data directory as the engine says; `None` when no engine
    /// answers.
    async fn engine_root(&self) -> Option<String> {
        let docker = docker::connect(&self.docker_socket).await.ok()?;
        Some(docker.info().await.ok()?.docker_root_dir.unwrap_or_else(|| DEFAULT_DOCKER_ROOT.to_string()))
    }

    /// Docker's data directory (its default when no engine answers).
    async fn docker_root(&self) -> PathBuf {
        PathBuf::from(self.engine_root().await.unwrap_or_else(|| DEFAULT_DOCKER_ROOT.to_string()))
    }

    /// Docker's data directory's file system and what Docker's data takes;
    /// `None` when no engine answers.
    async fn docker_disk(&self) -> Option<mlops_proto::v1::DockerDisk> {
        let root = self.engine_root().await?;
        let (total_bytes, available_bytes) = facts::disk(std::path::Path::new(&root));
        let mut disk =
            mlops_proto::v1::DockerDisk { root_dir: root, total_bytes, available_bytes, ..Default::default() };
        match docker::disk_usage(&self.docker_socket).await {
            Ok((images, containers, volumes, cache)) => {
                (disk.images_bytes, disk.containers_bytes, disk.volumes_bytes, disk.build_cache_bytes) =
                    (images, containers, volumes, cache);
            }
            Err(e) => disk.error = e,
        }
        Some(disk)
    }
}

/// sha256 of this process's executable, read through `/proc/self/exe` so
/// that it names the binary actually running even after the file on disk
/// was replaced.
pub fn running_binary_sha256() -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open("/proc/self/exe") else { return String::new() };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return String::new(),
        }
    }
    hex::encode(hasher.finalize())
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(controller = %req.controller_version, api_level = req.api_level, "hello");
        Ok(Response::new(HelloResponse {
            api_level: mlops_proto::API_LEVEL,
            agent_version: crate::VERSION.to_string(),
            binary_sha256: self.binary_sha256.clone(),
            pid: std::process::id(),
            started_at_unix: self.started_unix,
            config_sha256: self.config_sha256.clone(),
            crl_number: self.crl.0,
            crl_pem: self.crl.1.clone(),
            cert_not_after_unix: self.cert_not_after,
        }))
    }

    async fn get_facts(&self, request: Request<GetFactsRequest>) -> Result<Response<HostFacts>, Status> {
        let (memory_total_bytes, memory_available_bytes) = facts::memory();
        let (disk_total_bytes, disk_available_bytes) = facts::disk(&self.state_dir);
        let docker_disk = match request.into_inner().docker_disk {
            true => self.docker_disk().await,
            false => None,
        };
        Ok(Response::new(HostFacts {
            agent_version: crate::VERSION.to_string(),
            api_level: mlops_proto::API_LEVEL,
            hostname: facts::read_trimmed("/proc/sys/kernel/hostname"),
            os: facts::os_name(),
            kernel: facts::read_trimmed("/proc/sys/kernel/osrelease"),
            arch: std::env::consts::ARCH.to_string(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_total_bytes,
            memory_available_bytes,
            disk_total_bytes,
            disk_available_bytes,
            docker: Some(docker_status(docker::status(&self.docker_socket).await)),
            agent_uptime_seconds: self.uptime(),
            host_uptime_seconds: facts::host_uptime(),
            service_manager: self.service_manager.clone(),
            docker_disk,
        }))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<Self::HeartbeatStream>, Status> {
        if *self.shutdown.borrow() {
            return Err(AgentError::ShuttingDown.into());
        }
        let interval_ms = request.into_inner().interval_ms;
        if interval_ms == 0 {
            return Err(AgentError::InvalidArgument { field: "interval_ms", message: "must be positive".into() }.into());
        }
        let interval = Duration::from_millis(u64::from(interval_ms.clamp(200, 60_000)));
        let (tx, rx) = mpsc::channel(4);
        let mut shutdown = self.shutdown.clone();
        let svc = self.clone();
        // The task ends when the client goes away (send fails) or the
        // server shuts down; it holds nothing else.
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            let mut last = facts::CpuTimes::read();
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.changed() => break,
                }
                let now = facts::CpuTimes::read();
                let (_, memory_available_bytes) = facts::memory();
                let event = HeartbeatEvent {
                    seq,
                    unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                    cpu_busy: now.busy_since(&last),
                    load1: facts::load1(),
                    memory_available_bytes,
                    disk_available_bytes: facts::disk(&svc.state_dir).1,
                    agent_rss_bytes: facts::self_rss(),
                    agent_uptime_seconds: svc.uptime(),
                };
                last = now;
                seq += 1;
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type EnsureDockerStream = BoxStream<Progress>;

    async fn ensure_docker(
        &self,
        request: Request<EnsureDockerRequest>,
    ) -> Result<Response<Self::EnsureDockerStream>, Status> {
        let install = request.into_inner().install;
        let (tx, rx) = mpsc::channel(32);
        let (socket, log_dir) = (self.docker_socket.clone(), self.log_dir.clone());
        let mut stop = self.shutdown.clone();
        tokio::spawn(async move {
            let (lines_tx, mut lines) = mpsc::channel::<String>(32);
            let report = docker::Reporter::new(lines_tx);
            let work = async move { docker::ensure(&socket, install, &log_dir, &report).await };
            let forward = async {
                while let Some(message) = lines.recv().await {
                    let _ = tx.send(Ok(Progress { unix_ms: engine::now_ms(), message, ..Default::default() })).await;
                }
            };
            tokio::select! {
                (result, ()) = async { tokio::join!(work, forward) } => {
                    let last = result.map(|status| {
                        let message = if status.available {
                            format!("Docker {} (API {}) answers", status.version, status.api_version)
                        } else {
                            format!("no Docker engine: {}", status.error)
                        };
                        Progress { unix_ms: engine::now_ms(), message, done: true, docker: Some(docker_status(status)) }
                    });
                    let _ = tx.send(last.map_err(Status::from)).await;
                }
                // Not on the controller going away: killing apt-get or dpkg
                // mid-way would leave the host's packages half-installed.
                _ = stop.changed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sync_begin(&self, request: Request<SyncManifest>) -> Result<Response<SyncPlan>, Status> {
        let store = self.sync.clone();
        let manifest = request.into_inner();
        let plan = blocking(move || store.begin(manifest)).await?;
        Ok(Response::new(plan))
    }

    async fn sync_upload(
        &self,
        request: Request<tonic::Streaming<SyncChunk>>,
    ) -> Result<Response<SyncUploadReply>, Status> {
        let mut chunks = request.into_inner();
        let mut reply = SyncUploadReply::default();
        let received = async {
            while let Some(chunk) = chunks.message().await? {
                let store = self.sync.clone();
                let len = chunk.data.len() as u64;
                let done =
                    blocking(move || store.write_chunk(&chunk.sync_id, &chunk.sha256, chunk.offset, &chunk.data))
                        .await?;
                reply.bytes += len;
                if done {
                    reply.blobs += 1;
                }
            }
            Ok::<(), Status>(())
        }
        .await;
        // The blobs stored, flushed at once (also those of an upload cut
        // short: a later sync keeps them); an upload that wrote nothing
        // has nothing to flush.
        let flushed = if reply.bytes > 0 {
            let store = self.sync.clone();
            blocking(move || store.flush_blobs()).await
        } else {
            Ok(())
        };
        received?;
        flushed?;
        Ok(Response::new(reply))
    }

    async fn sync_commit(&self, request: Request<SyncCommitRequest>) -> Result<Response<SyncReport>, Status> {
        let store = self.sync.clone();
        let id = request.into_inner().sync_id;
        Ok(Response::new(blocking(move || store.commit(&id)).await?))
    }

    type ConvergeStream = BoxStream<StackEvent>;

    async fn converge(
        &self,
        request: Request<mlops_proto::v1::ConvergeRequest>,
    ) -> Result<Response<Self::ConvergeStream>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        let (stack, dirs) = self.stack_of(&req.stack_json, &req.files_root)?;
        if !req.staged_root.is_empty() {
            engine::sync::check_root(&req.staged_root).map_err(AgentError::from)?;
        }
        let options = converge::Options {
            rotating: req.rotating.clone(),
            health_timeout: health_timeout(req.health_timeout_seconds),
            min_healthy: Duration::from_secs(u64::from(req.min_healthy_seconds)),
            pinned: None,
            build_floor: req.min_free_bytes,
        };
        // A rotation changes data before it converges: the revision before
        // it no longer fits that data, so a failed rotation is not undone
        // here (`secrets rotate` has its own way back).
        let rollback = !req.no_rollback && req.rotating.is_empty();
        let (tx, rx) = mpsc::channel(64);
        let pending = self.locks.try_acquire(&stack.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let (stop, history, locks) = (self.shutdown.clone(), self.history.clone(), self.locks.clone());
        let (sync, revisions) = (self.sync.clone(), self.revisions.clone());
        tokio::spawn(async move {
            let project = stack.project.clone();
            let Some(guard) = lock_after_orphan(pending, &locks, &project, &req.holder, &tx).await else { return };
            let operator = peer.operator.clone();
            let work = |events: Events| async move {
                let run = revisions::Run {
                    docker: &docker,
                    sync: &sync,
                    revisions: &revisions,
                    dirs: &dirs,
                    operator,
                    deploy_id: req.deploy_id.clone(),
                };
                let staged =
                    (!req.staged_root.is_empty()).then_some((req.staged_root.as_str(), req.staged_digest.as_str()));
                run.converge(&req.stack_json, &stack, &req.files_root, staged, &options, rollback, &events).await
            };
            let done = |end: End| {
                end.record(&history, &project, &peer, "deploy");
                drop(guard);
            };
            Box::pin(stream_stack_work(work, tx, stop, &project, "converge", Some(&locks), done)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RollbackStream = BoxStream<StackEvent>;

    async fn rollback(&self, request: Request<RollbackRequest>) -> Result<Response<Self::RollbackStream>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        // The revision's own tree replaces `files` (see `Run::restore`).
        let dirs = self.project_dirs(&req.project, &format!("stack-{}", req.project));
        let options = converge::Options {
            health_timeout: health_timeout(req.health_timeout_seconds),
            min_healthy: Duration::from_secs(u64::from(req.min_healthy_seconds)),
            ..converge::Options::default()
        };
        let (tx, rx) = mpsc::channel(64);
        let pending = self.locks.try_acquire(&req.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let (stop, history, locks) = (self.shutdown.clone(), self.history.clone(), self.locks.clone());
        let (sync, revisions) = (self.sync.clone(), self.revisions.clone());
        tokio::spawn(async move {
            let project = req.project.clone();
            let Some(guard) = lock_after_orphan(pending, &locks, &project, &req.holder, &tx).await else { return };
            // Picked under the lock: a converge its controller left may
            // have recorded a revision while this waited.
            let listed = revisions.list(&project);
            let target = match listed.and_then(|kept| Ok((revisions::pick(&kept, req.to, &req.to_deploy)?, kept))) {
                Ok(found) => found,
                Err(e) => {
                    let _ = tx.send(Err(stack_status(e, &project))).await;
                    return;
                }
            };
            let (target, kept) = target;
            let operator = peer.operator.clone();
            let number = target.number;
            let work = |events: Events| async move {
                let run = revisions::Run {
                    docker: &docker,
                    sync: &sync,
                    revisions: &revisions,
                    dirs: &dirs,
                    operator,
                    deploy_id: target.deploy_id.clone(),
                };
                let mut outcome = match run.restore(&target, &options, &events).await {
                    Ok(outcome) => outcome,
                    // Half-way is no place to stay: back to what ran.
                    Err(e) => match kept.last().filter(|newest| newest.number != target.number) {
                        Some(newest) => return Err(run.back_to(newest, e, &options, &events).await),
                        None => return Err(e),
                    },
                };
                let action = format!("rollback to {}", target.number);
                outcome.summary = format!("back on revision {}: {}", target.number, outcome.summary);
                run.record(&target.stack_json, &req.project, &target.files_root, &action, &outcome).await;
                Ok(outcome)
            };
            let done = |end: End| {
                end.record(&history, &project, &peer, &format!("rollback to {number}"));
                drop(guard);
            };
            Box::pin(stream_stack_work(work, tx, stop, &project, "rollback", Some(&locks), done)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn revisions(&self, request: Request<RevisionsRequest>) -> Result<Response<RevisionsReply>, Status> {
        let project = request.into_inner().project;
        check_project(&project)?;
        let store = self.revisions.clone();
        let kept = blocking(move || store.list(&project)).await?;
        let revisions = kept
            .into_iter()
            .map(|r| Revision {
                number: r.number,
                unix_ms: r.unix_ms,
                operator: r.operator,
                action: r.action,
                deploy_id: r.deploy_id,
                confirmed_by: r.confirmed_by,
                summary: r.summary,
                images: r.images.into_iter().collect(),
                config_hashes: r.config_hashes.into_iter().collect(),
            })
            .collect();
        Ok(Response::new(RevisionsReply { revisions }))
    }

    type DownStream = BoxStream<StackEvent>;

    async fn down(&self, request: Request<DownRequest>) -> Result<Response<Self::DownStream>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        let pending = self.locks.try_acquire(&req.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let (tx, rx) = mpsc::channel(64);
        let stop = self.shutdown.clone();
        let (history, revisions, locks) = (self.history.clone(), self.revisions.clone(), self.locks.clone());
        tokio::spawn(async move {
            let Some(guard) = lock_after_orphan(pending, &locks, &req.project, &req.holder, &tx).await else { return };
            let (project, volumes) = (req.project.clone(), req.volumes);
            // A stack taken down has no revision to return to: a deploy
            // that fails later leaves nothing running, as before it.
            let work = |events: Events| async move {
                let outcome = converge::down(&docker, &req.project, volumes, &events).await?;
                revisions.clear(&req.project)?;
                revisions::keep_images(&docker, &req.project, &[]).await;
                Ok(outcome)
            };
            let done = |end: End| {
                end.record(&history, &project, &peer, if volumes { "down --volumes" } else { "down" });
                drop(guard);
            };
            stream_stack_work(work, tx, stop, &project, "down", None, done).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stack_status(&self, request: Request<StackStatusRequest>) -> Result<Response<StackStatusReply>, Status> {
        let project = request.into_inner().project;
        check_project(&project)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let services = converge::status(&docker, &project).await.map_err(AgentError::from)?;
        let history = self.history.clone();
        let p = project.clone();
        let last = blocking(move || history.entries(&p, 1)).await?.pop();
        Ok(Response::new(StackStatusReply {
            services: services.into_iter().map(service_state).collect(),
            lock_holder: self.locks.holder(&project).unwrap_or_default(),
            last,
        }))
    }

    type WatchHealthStream = BoxStream<HealthEvent>;

    async fn watch_health(
        &self,
        request: Request<WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        let project = request.into_inner().project;
        check_project(&project)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let (tx, rx) = mpsc::channel(64);
        let stop = self.shutdown.clone();
        let what = format!("health watch of {project}");
        tokio::spawn(stream_engine_work(
            what,
            tx,
            |sink| engine_watch::health(docker, project, sink, stop),
            health_event,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type LogsStream = BoxStream<LogChunk>;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let req = request.into_inner();
        check_project(&req.project)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let states = converge::status(&docker, &req.project).await.map_err(AgentError::from)?;
        let container =
            states.into_iter().find(|s| s.service == req.service).map(|s| s.container_id).ok_or_else(|| {
                AgentError::from(EngineError::NotFound(format!(
                    "stack `{}` has no service `{}` running here",
                    req.project, req.service
                )))
            })?;
        let (tx, rx) = mpsc::channel(64);
        let stop = self.shutdown.clone();
        let what = format!("logs of {} in {}", req.service, req.project);
        let work = move |sink| engine_watch::logs(docker, container, req.follow, req.since, req.tail, sink, stop);
        tokio::spawn(stream_engine_work(what, tx, work, log_chunk));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_secrets(&self, request: Request<GetSecretsRequest>) -> Result<Response<Secrets>, Status> {
        let project = request.into_inner().project;
        check_project(&project)?;
        let store = self.secrets.clone();
        let p = project.clone();
        let values = blocking(move || store.get(&p)).await?;
        Ok(Response::new(Secrets { project, values: values.into_iter().collect() }))
    }

    async fn put_secrets(&self, request: Request<PutSecretsRequest>) -> Result<Response<Secrets>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        let names: Vec<String> = req.values.keys().cloned().collect();
        tracing::info!(project = %req.project, ?names, replace = req.replace, "storing secrets");
        let mut detail = format!("{} {}", if req.replace { "replaced" } else { "stored" }, names.join(", "));
        if !req.remove.is_empty() {
            detail.push_str(&format!("; dropped {}", req.remove.join(", ")));
        }
        let store = self.secrets.clone();
        let p = req.project.clone();
        let remove = req.remove.clone();
        let values = blocking(move || store.put(&p, req.values.into_iter().collect(), req.replace, &remove)).await?;
        let history = self.history.clone();
        let p = req.project.clone();
        blocking(move || {
            history.record(&p, &peer, "secrets", "ok", &detail);
            Ok(())
        })
        .await?;
        Ok(Response::new(Secrets { project: req.project, values: values.into_iter().collect() }))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecReply>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let timeout = Duration::from_secs(if req.timeout_seconds == 0 { 300 } else { u64::from(req.timeout_seconds) });
        let env = req.env.into_iter().collect();
        let (exit_code, output) =
            engine::exec::exec(&docker, &req.project, &req.service, req.command, &env, req.stdin, timeout)
                .await
                .map_err(AgentError::from)?;
        let (history, project) = (self.history.clone(), req.project.clone());
        let detail = format!("{}: exec in {} exited {exit_code}", req.purpose, req.service);
        let outcome = if exit_code == 0 { "ok" } else { "failed" };
        blocking(move || {
            history.record(&project, &peer, "exec", outcome, &detail);
            Ok(())
        })
        .await?;
        Ok(Response::new(ExecReply { exit_code, output }))
    }

    async fn image_plan(&self, request: Request<ImagePlanRequest>) -> Result<Response<ImagePlanReply>, Status> {
        let req = request.into_inner();
        let (stack, dirs) = self.stack_of(&req.stack_json, &req.files_root)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let states = converge::images::states(&docker, &stack, &dirs).await.map_err(AgentError::from)?;
        let images = states
            .into_iter()
            .map(|s| ImageState {
                service: s.service,
                tag: s.tag,
                context_hash: s.context_hash,
                id: s.id.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ImagePlanReply { images }))
    }

    async fn plan_stack(&self, request: Request<PlanStackRequest>) -> Result<Response<PlanStackReply>, Status> {
        let req = request.into_inner();
        if !req.files_root.starts_with("plan-") {
            return Err(AgentError::InvalidArgument {
                field: "files_root",
                message: format!("`{}` is not a plan's scratch tree (`plan-...`)", req.files_root),
            }
            .into());
        }
        engine::sync::check_root(&req.live_root).map_err(AgentError::from)?;
        let (stack, dirs) = self.stack_of(&req.stack_json, &req.files_root)?;
        let docker = docker::connect(&self.docker_socket).await;
        let preview = match docker {
            Ok(docker) => converge::preview::preview(&docker, &stack, &dirs).await,
            Err(e) => Err(e),
        };
        let (sync, root, live) = (self.sync.clone(), req.files_root.clone(), req.live_root.clone());
        let diff = blocking(move || {
            let diff = sync.diff(&root, &live);
            sync.remove_tree(&root)?;
            diff
        })
        .await?;
        let preview = preview.map_err(AgentError::from)?;
        let (files_changed, files_removed) = diff;
        Ok(Response::new(PlanStackReply {
            services: preview
                .services
                .into_iter()
                .map(|s| PlannedService { service: s.service, action: s.action, reasons: s.reasons })
                .collect(),
            orphans: preview.orphans,
            images: preview
                .images
                .into_iter()
                .map(|s| ImageState {
                    service: s.service,
                    tag: s.tag,
                    context_hash: s.context_hash,
                    id: s.id.unwrap_or_default(),
                })
                .collect(),
            pulls: preview.pulls,
            files_changed,
            files_removed,
        }))
    }

    type BuildImagesStream = BoxStream<StackEvent>;

    async fn build_images(
        &self,
        request: Request<BuildImagesRequest>,
    ) -> Result<Response<Self::BuildImagesStream>, Status> {
        let req = request.into_inner();
        let (stack, dirs) = self.stack_of(&req.stack_json, &req.files_root)?;
        let pending = self.locks.try_acquire(&stack.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let (tx, rx) = mpsc::channel(64);
        let (stop, locks) = (self.shutdown.clone(), self.locks.clone());
        tokio::spawn(async move {
            let project = stack.project.clone();
            let Some(guard) = lock_after_orphan(pending, &locks, &project, &req.holder, &tx).await else { return };
            let (tags, floor) = (req.tags, req.min_free_bytes);
            let work = |events: Events| async move {
                converge::images::build_tags(&docker, &stack, &tags, &dirs, floor, &events).await
            };
            // Not in the history: the deploy it belongs to is.
            let done = |_: End| drop(guard);
            Box::pin(stream_stack_work(work, tx, stop, &project, "image build", None, done)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SaveImageStream = BoxStream<ImageChunk>;

    async fn save_image(&self, request: Request<SaveImageRequest>) -> Result<Response<Self::SaveImageStream>, Status> {
        let req = request.into_inner();
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let tarball = engine::ship::save(&docker, &req.tag, &req.id).await.map_err(AgentError::from)?;
        // Few messages in flight: the image streams at the pace the
        // receiving host loads it.
        let (tx, rx) = mpsc::channel(4);
        let mut stop = self.shutdown.clone();
        tokio::spawn(async move {
            let mut tarball = std::pin::pin!(tarball);
            loop {
                let next = tokio::select! {
                    next = tarball.next() => next,
                    _ = stop.changed() => {
                        let _ = tx.send(Err(AgentError::ShuttingDown.into())).await;
                        return;
                    }
                };
                match next {
                    Some(Ok(bytes)) => {
                        let mut rest = bytes;
                        while !rest.is_empty() {
                            let piece = rest.split_to(rest.len().min(mlops_proto::IMAGE_CHUNK));
                            let chunk = ImageChunk { data: piece, ..Default::default() };
                            if tx.send(Ok(chunk)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(AgentError::from(e).into())).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn load_image(
        &self,
        request: Request<tonic::Streaming<ImageChunk>>,
    ) -> Result<Response<LoadImageReply>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks.message().await?.ok_or(AgentError::InvalidArgument {
            field: "tag",
            message: "the stream ended before its first chunk".into(),
        })?;
        // The engine answers `/images/load` only once it has read and
        // unpacked the whole tarball: a big image on a slow disk takes
        // longer than the client's usual bound (seen: 250 MB into an
        // emulated VM). The stream itself ends the load if the controller
        // goes away.
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?.with_timeout(LOAD_TIMEOUT);
        let (tag, id) = (first.tag, first.id);
        let head = futures::stream::once(async move { Ok::<_, Status>(first.data) });
        let tarball = head.chain(chunks.map(|c| c.map(|c| c.data)));
        let bytes = engine::ship::load(&docker, &tag, &id, tarball).await.map_err(AgentError::from)?;
        Ok(Response::new(LoadImageReply { bytes }))
    }

    async fn tag_image(&self, request: Request<TagImageRequest>) -> Result<Response<TagImageReply>, Status> {
        let req = request.into_inner();
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let present = engine::ship::tag(&docker, &req.id, &req.tag).await.map_err(AgentError::from)?;
        Ok(Response::new(TagImageReply { present }))
    }

    async fn stop_services(
        &self,
        request: Request<StopServicesRequest>,
    ) -> Result<Response<StopServicesReply>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        let _guard = self.locks.acquire(&req.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let timeout = Duration::from_secs(if req.timeout_seconds == 0 { 10 } else { u64::from(req.timeout_seconds) });
        let record = self.state_dir.join("stopped").join(format!("{}.json", req.project));
        let stopped = engine::volumes::stop(&docker, &req.project, &req.services, &req.waves, timeout, &record)
            .await
            .map_err(|e| stack_status(e, &req.project))?;
        let (history, project) = (self.history.clone(), req.project.clone());
        let detail = format!("stopped {}", if stopped.is_empty() { "nothing".into() } else { stopped.join(", ") });
        blocking(move || {
            history.record(&project, &peer, "stop", "ok", &detail);
            Ok(())
        })
        .await?;
        Ok(Response::new(StopServicesReply { stopped }))
    }

    type ExportDataStream = BoxStream<DataChunk>;

    async fn backup_schedule(
        &self,
        request: Request<BackupScheduleRequest>,
    ) -> Result<Response<BackupScheduleReply>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        let (backups, project) = (self.backups.clone(), req.project.clone());
        let (reply, what) = match (req.schedule, req.remove) {
            (Some(_), true) => {
                return Err(AgentError::InvalidArgument {
                    field: "remove",
                    message: "set a schedule or remove it, not both".into(),
                }
                .into());
            }
            (Some(plan), false) => {
                check_backup_plan(&req.project, &plan)?;
                let what = format!("every {} s, {} kept", plan.every_seconds, plan.keep);
                (blocking(move || backups.set(&project, plan)).await?, Some(what))
            }
            (None, true) => (blocking(move || backups.remove(&project)).await?, Some("removed".to_string())),
            (None, false) => (blocking(move || backups.get(&project)).await?, None),
        };
        if let Some(detail) = what {
            let (history, p) = (self.history.clone(), req.project.clone());
            blocking(move || {
                history.record(&p, &peer, "backup schedule", "ok", &detail);
                Ok(())
            })
            .await?;
        }
        Ok(Response::new(reply))
    }

    async fn export_data(
        &self,
        request: Request<ExportDataRequest>,
    ) -> Result<Response<Self::ExportDataStream>, Status> {
        let peer = peer(&request);
        let source = request.into_inner().source.unwrap_or_default();
        check_source(&source)?;
        if !source.input_trailer.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "input_trailer",
                message: "an export has no input: a trailer goes with an import into a command".into(),
            }
            .into());
        }
        let what = if source.volume.is_empty() {
            format!("the output of a command in {}", source.service)
        } else {
            format!("volume {}", source.volume)
        };
        // No deploy starts the project's services while its data leaves.
        let holder = format!("an export of {what} by {}", peer.operator);
        let guard = self.locks.acquire(&source.project, &holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let project = source.project.clone();
        let data: Pin<Box<dyn Stream<Item = Result<bytes::Bytes, EngineError>> + Send>> = if source.volume.is_empty() {
            let env = source.env.into_iter().collect();
            Box::pin(
                engine::volumes::exec_out(&docker, &project, &source.service, source.command, &env)
                    .await
                    .map_err(|e| stack_status(e, &project))?,
            )
        } else {
            Box::pin(
                engine::volumes::export(&docker, &project, &source.volume, source.live)
                    .await
                    .map_err(|e| stack_status(e, &project))?,
            )
        };
        // Few messages in flight: the data streams at the pace the
        // receiving host writes it.
        let (tx, rx) = mpsc::channel(4);
        let mut stop = self.shutdown.clone();
        let history = self.history.clone();
        tokio::spawn(async move {
            // Released before the last message: the controller's next call
            // (a backup's next volume after its dump) must find the stack
            // free. Dropped with the task otherwise.
            let guard = guard;
            use sha2::Digest;
            let (mut hash, mut total) = (sha2::Sha256::new(), 0u64);
            let mut data = data;
            loop {
                let next = tokio::select! {
                    next = data.next() => next,
                    _ = stop.changed() => {
                        let _ = tx.send(Err(AgentError::ShuttingDown.into())).await;
                        return;
                    }
                };
                match next {
                    Some(Ok(mut rest)) => {
                        hash.update(&rest);
                        total += rest.len() as u64;
                        while !rest.is_empty() {
                            let piece = rest.split_to(rest.len().min(mlops_proto::IMAGE_CHUNK));
                            if tx.send(Ok(DataChunk { data: piece, ..Default::default() })).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        drop((data, guard));
                        let _ = tx.send(Err(stack_status(e, &project))).await;
                        return;
                    }
                    None => {
                        drop(data);
                        let sha256 = hex::encode(hash.finalize());
                        let detail = format!("exported {total} bytes: {what} (sha256 {})", &sha256[..12]);
                        let p = project.clone();
                        let _ = tokio::task::spawn_blocking(move || history.record(&p, &peer, "export", "ok", &detail))
                            .await;
                        drop(guard);
                        let end = DataChunk { end: true, sha256, bytes: total, ..Default::default() };
                        let _ = tx.send(Ok(end)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import_data(
        &self,
        request: Request<tonic::Streaming<DataChunk>>,
    ) -> Result<Response<ImportDataReply>, Status> {
        let peer = peer(&request);
        let mut chunks = request.into_inner();
        let first = chunks.message().await?.ok_or(AgentError::InvalidArgument {
            field: "target",
            message: "the stream ended before its first chunk".into(),
        })?;
        let target = first.target.clone().unwrap_or_default();
        check_source(&target)?;
        if target.live {
            return Err(AgentError::InvalidArgument {
                field: "live",
                message: "an import is never live: a volume's containers are stopped to replace its content".into(),
            }
            .into());
        }
        if !target.volume.is_empty() && !target.input_trailer.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "input_trailer",
                message: "a volume's archive takes no trailer: it goes with an import into a command".into(),
            }
            .into());
        }
        let project = target.project.clone();
        let piece = |c: DataChunk| {
            if c.end {
                engine::volumes::Piece::End { sha256: c.sha256, bytes: c.bytes }
            } else {
                engine::volumes::Piece::Data(c.data)
            }
        };
        let head = futures::stream::once(async move { Ok::<_, Status>(first) });
        let checked = engine::volumes::Checked::new(Box::pin(head.chain(chunks).map(move |c| c.map(piece))));
        let arrived = checked.result();
        // A volume's archive is answered once it is all unpacked: as an
        // image load (see `load_image`), longer than the usual bound.
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?.with_timeout(LOAD_TIMEOUT);
        let (exit_code, output, what) = if target.volume.is_empty() {
            let env = target.env.into_iter().collect();
            let input = engine::volumes::Input { data: checked, trailer: target.input_trailer.into() };
            let (code, output) =
                engine::volumes::exec_in(&docker, &project, &target.service, target.command, &env, input)
                    .await
                    .map_err(|e| stack_status(e, &project))?;
            (code, output, format!("data into a command in {}", target.service))
        } else {
            let holder = format!("an import into volume {} by {}", target.volume, peer.operator);
            let _guard = self.locks.acquire(&project, &holder).map_err(AgentError::from)?;
            let revisions = self.revisions.clone();
            let p = project.clone();
            let kept = blocking(move || Ok(revisions.newest(&p)?.map(|r| r.images.into_values().collect()))).await?;
            engine::volumes::import(&docker, &project, &target.volume, kept.unwrap_or_default(), checked)
                .await
                .map_err(|e| stack_status(e, &project))?;
            (0, String::new(), format!("volume {}", target.volume))
        };
        // The engine may end its side without reading to the end marker.
        let Some((bytes, sha256)) = arrived.lock().expect("not poisoned").clone() else {
            return Err(stack_status(
                EngineError::bad_request("data", format!("{what}: the stream was not read to its end marker")),
                &project,
            ));
        };
        let (history, p) = (self.history.clone(), project.clone());
        let detail = format!("imported {bytes} bytes: {what} (sha256 {})", &sha256[..12]);
        let outcome = if exit_code == 0 { "ok" } else { "failed" };
        blocking(move || {
            history.record(&p, &peer, "import", outcome, &detail);
            Ok(())
        })
        .await?;
        Ok(Response::new(ImportDataReply { bytes, sha256, exit_code, output: tail(&output, 16 * 1024) }))
    }

    type StoreBackupStream = BoxStream<BackupStored>;

    async fn store_backup(
        &self,
        request: Request<tonic::Streaming<BackupPiece>>,
    ) -> Result<Response<Self::StoreBackupStream>, Status> {
        let peer = peer(&request);
        let mut pieces = request.into_inner();
        let begin = match pieces.message().await? {
            Some(BackupPiece { piece: Some(backup_piece::Piece::Begin(begin)) }) => begin,
            _ => {
                return Err(AgentError::InvalidArgument {
                    field: "begin",
                    message: "a stored backup's first piece begins it".into(),
                }
                .into());
            }
        };
        check_project(&begin.project)?;
        let project = begin.project.clone();
        let (state_dir, source) = (self.state_dir.clone(), begin.source_host.clone());
        let docker_root = self.docker_root().await;
        let mut store = blocking(move || crate::stored::Store::begin(&state_dir, &docker_root, begin)).await?;
        let (tx, rx) = mpsc::channel(2);
        let (mut stop, history) = (self.shutdown.clone(), self.history.clone());
        tokio::spawn(async move {
            let result = async {
                loop {
                    let piece = tokio::select! {
                        piece = pieces.message() => piece?,
                        _ = stop.changed() => return Err(Status::from(AgentError::ShuttingDown)),
                    };
                    let Some(piece) = piece else {
                        return Err(Status::from(EngineError::bad_request(
                            "manifest",
                            "the stream ended before the backup's manifest: nothing was kept",
                        )));
                    };
                    let stored = match store.piece(piece).await.map_err(|e| stack_status(e, &project))? {
                        None => continue,
                        Some(crate::stored::Step::File(file)) => backup_stored::Stored::File(file),
                        Some(crate::stored::Step::Done(done)) => return Ok(done),
                    };
                    if tx.send(Ok(BackupStored { stored: Some(stored) })).await.is_err() {
                        return Err(Status::cancelled("the controller went away"));
                    }
                }
            }
            .await;
            let (outcome, detail) = match &result {
                Ok(done) => ("ok", format!("stored a backup from {source}: {}", done.dir)),
                Err(status) => {
                    let partial = store.partial().to_path_buf();
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(partial)).await;
                    ("failed", format!("storing a backup from {source}: {}", status.message()))
                }
            };
            let p = project.clone();
            let _ =
                tokio::task::spawn_blocking(move || history.record(&p, &peer, "backup stored", outcome, &detail)).await;
            let _ = tx.send(result.map(|done| BackupStored { stored: Some(backup_stored::Stored::Done(done)) })).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadBackupStream = BoxStream<BackupFileChunk>;

    async fn read_backup(
        &self,
        request: Request<ReadBackupRequest>,
    ) -> Result<Response<Self::ReadBackupStream>, Status> {
        let peer = peer(&request);
        let req = request.into_inner();
        check_project(&req.project)?;
        let (state_dir, docker_root) = (self.state_dir.clone(), self.docker_root().await);
        let (project, dir, name) = (req.project.clone(), req.dir.clone(), req.name.clone());
        let (dir, files) =
            blocking(move || crate::stored::find(&state_dir, &docker_root, &dir, &project, &name)).await?;
        // Few chunks in flight: the file is read at the pace the
        // controller writes it.
        let (tx, rx) = mpsc::channel(4);
        let (stop, history, project) = (self.shutdown.clone(), self.history.clone(), req.project.clone());
        tokio::task::spawn_blocking(move || {
            use crate::stored::Sent;
            let emit = |chunk| tx.blocking_send(Ok(chunk)).is_ok();
            let (outcome, detail) = match crate::stored::send(&dir, &files, emit, &stop) {
                Ok(Sent::Whole(bytes)) => ("ok", format!("read backup {} ({bytes} bytes)", dir.display())),
                Ok(Sent::Abandoned(bytes)) => (
                    "failed",
                    format!("reading backup {}: the controller went away after {bytes} bytes", dir.display()),
                ),
                Ok(Sent::Stopped) => {
                    let _ = tx.blocking_send(Err(AgentError::ShuttingDown.into()));
                    ("failed", format!("reading backup {}: the agent stopped", dir.display()))
                }
                Err(e) => {
                    let detail = format!("reading backup {}: {e}", dir.display());
                    let _ = tx.blocking_send(Err(stack_status(e, &project)));
                    ("failed", detail)
                }
            };
            history.record(&project, &peer, "backup read", outcome, &detail);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn history(&self, request: Request<HistoryRequest>) -> Result<Response<HistoryReply>, Status> {
        let req = request.into_inner();
        check_project(&req.project)?;
        let history = self.history.clone();
        let entries = blocking(move || history.entries(&req.project, req.limit as usize)).await?;
        Ok(Response::new(HistoryReply { entries }))
    }
}

/// Where Docker keeps its data unless configured otherwise.
const DEFAULT_DOCKER_ROOT: &str = "/var/lib/docker";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, EngineError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::from(AgentError::Internal(format!("a file task failed: {e}"))))?
        .map_err(Status::from)
}

/// A data source or target names a project and either a volume or a
/// service and command.
fn check_source(source: &DataSource) -> Result<(), AgentError> {
    check_project(&source.project)?;
    if source.live && source.volume.is_empty() {
        return Err(AgentError::InvalidArgument {
            field: "live",
            message: "`live` is for a volume's export: a command's output is read as it runs anyway".into(),
        });
    }
    if source.input_trailer.len() > MAX_INPUT_TRAILER {
        return Err(AgentError::InvalidArgument {
            field: "input_trailer",
            message: format!("{} bytes, more than the {MAX_INPUT_TRAILER} allowed", source.input_trailer.len()),
        });
    }
    match (source.volume.is_empty(), source.service.is_empty() || source.command.is_empty()) {
        (false, true) | (true, false) => Ok(()),
        _ => Err(AgentError::InvalidArgument {
            field: "source",
            message: "name a volume, or a service and a command (not both)".into(),
        }),
    }
}

/// A backup schedule names what an export could: the database's dump
/// command in a service, volumes by name; at least every
/// [`mlops_proto::backup::MIN_EVERY_SECONDS`], at least one kept.
fn check_backup_plan(project: &str, plan: &BackupPlan) -> Result<(), AgentError> {
    if let Some(db) = &plan.database {
        check_source(&DataSource { project: project.to_string(), ..db.clone() })?;
        if db.service.is_empty() || !db.volume.is_empty() || db.live || !db.input_trailer.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "schedule.database",
                message: "the database's dump is a service and a command".into(),
            });
        }
    }
    for volume in &plan.volumes {
        check_source(&DataSource { project: project.to_string(), volume: volume.clone(), ..Default::default() })?;
    }
    let (min, max) = (mlops_proto::backup::MIN_EVERY_SECONDS, mlops_proto::backup::MAX_EVERY_SECONDS);
    if !(min..=max).contains(&plan.every_seconds) {
        return Err(AgentError::InvalidArgument {
            field: "schedule.every_seconds",
            message: format!("{} s: between {min} s and {max} s", plan.every_seconds),
        });
    }
    if plan.keep == 0 {
        return Err(AgentError::InvalidArgument { field: "schedule.keep", message: "keep at least one backup".into() });
    }
    Ok(())
}

/// The largest `DataSource.input_trailer`: a line or two a command echoes.
const MAX_INPUT_TRAILER: usize = 4096;

fn check_project(project: &str) -> Result<(), AgentError> {
    if project.is_empty()
        || !project.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(AgentError::InvalidArgument {
            field: "project",
            message: format!("`{project}` is not a project name (lowercase letters, digits, `-`, `_`)"),
        });
    }
    Ok(())
}

fn health_event(c: engine_watch::HealthChange) -> HealthEvent {
    HealthEvent {
        unix_ms: c.unix_ms,
        service: c.service,
        state: c.state,
        health: c.health,
        health_output: c.health_output,
        container_id: c.container_id,
        docker_time_ns: c.docker_time_ns,
    }
}

fn log_chunk(c: engine_watch::LogChunk) -> LogChunk {
    let stream = match c.stream {
        engine_watch::Output::Stdout => "stdout",
        engine_watch::Output::Stderr => "stderr",
    };
    LogChunk { stream: stream.into(), data: c.data.into() }
}

/// Drives engine work that reports through a channel of its own items
/// (health changes, log chunks), each turned into a message of the RPC
/// stream by `convert`; the work's failure is the stream's last item. The
/// client going away ends it even when nothing happens (no event, no log
/// line) to notice that by.
async fn stream_engine_work<E, M, W, F>(what: String, tx: mpsc::Sender<Result<M, Status>>, work: W, convert: fn(E) -> M)
where
    W: FnOnce(mpsc::Sender<E>) -> F,
    F: std::future::Future<Output = Result<(), EngineError>>,
{
    let (sink, mut items) = mpsc::channel(64);
    let work = work(sink);
    let forward = async {
        while let Some(item) = items.recv().await {
            if tx.send(Ok(convert(item))).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        (result, ()) = async { tokio::join!(work, forward) } => {
            if let Err(e) = result {
                let _ = tx.send(Err(e.into())).await;
            }
        }
        () = tx.closed() => tracing::info!("{what}: the client went away; stopped"),
    }
}

/// Drives stack work: its events become `StackEvent`s as they come, then
/// its outcome a last `DONE` event, or its failure the stream's final
/// status. When the agent shuts down, the work is dropped. When the
/// controller goes away, the work is dropped too, unless `finish_alone` is
/// given: a converge is not
/// stopped half-way (see `engine::lock`); its lock is marked orphaned and
/// it runs to its end. However it ends, `done` is given how (to record it
/// and release the caller's lock), before the last message is sent.
async fn stream_stack_work<W, F>(
    work: W,
    tx: mpsc::Sender<Result<StackEvent, Status>>,
    mut stop: watch::Receiver<bool>,
    project: &str,
    what: &str,
    finish_alone: Option<&Locks>,
    done: impl FnOnce(End),
) where
    W: FnOnce(Events) -> F,
    F: std::future::Future<Output = Result<Outcome, EngineError>>,
{
    let (events_tx, mut events) = mpsc::channel(64);
    // The work owns the only sender: when it ends, the forwarding below
    // drains what is left and ends too, so the last event comes last.
    let work = work(Events::new(events_tx));
    let forward = async {
        while let Some(e) = events.recv().await {
            let _ = tx.send(Ok(stack_event(e))).await;
        }
    };
    let finish = |result: Result<Outcome, EngineError>| {
        let last = result.map(|outcome| {
            let mut ev = StackEvent {
                unix_ms: engine::now_ms(),
                detail: outcome.summary,
                services: outcome.services.into_iter().map(service_state).collect(),
                ..Default::default()
            };
            ev.set_action(StackAction::Done);
            ev
        });
        let end = match &last {
            Ok(ev) => End::Ok(ev.detail.clone()),
            Err(e) => End::Failed(e.to_string()),
        };
        (last.map_err(|e| stack_status(e, project)), end)
    };
    let shutting_down = |tx: &mpsc::Sender<Result<StackEvent, Status>>| {
        tracing::warn!("{what} of {project}: the agent is shutting down; stopped");
        let _ = tx.try_send(Err(AgentError::ShuttingDown.into()));
        End::Interrupted("the agent stopped".into())
    };
    // The work lives in this block only: stopped early, it is dropped (and
    // what it holds let go) before `done` releases the lock.
    let (last, end) = {
        let mut both = std::pin::pin!(async { tokio::join!(work, forward) });
        tokio::select! {
            (result, ()) = &mut both => {
                let (last, end) = finish(result);
                (Some(last), end)
            }
            () = tx.closed() => (None, match finish_alone {
                None => {
                    tracing::warn!("{what} of {project}: the controller went away; stopped");
                    End::Interrupted("the controller went away".into())
                }
                Some(locks) => {
                    tracing::warn!("{what} of {project}: the controller went away; finishing alone");
                    locks.orphan(project);
                    tokio::select! {
                        (result, ()) = &mut both => match finish(result).1 {
                            End::Ok(d) => End::Ok(format!("{d} (finished after the controller went away)")),
                            End::Failed(d) => End::Failed(format!("{d} (after the controller went away)")),
                            other => other,
                        },
                        _ = stop.changed() => shutting_down(&tx),
                    }
                }
            }),
            _ = stop.changed() => (None, shutting_down(&tx)),
        }
    };
    // Recorded, and the lock released, before the controller hears the
    // end: its next call (a deploy after the build, the next volume of a
    // backup) must find the stack free.
    done(end);
    if let Some(last) = last {
        let _ = tx.send(last).await;
    }
}

/// How a stack call ended, for the history.
enum End {
    Ok(String),
    Failed(String),
    Interrupted(String),
}

impl End {
    fn record(self, history: &History, project: &str, peer: &Peer, action: &str) {
        let (outcome, detail) = match self {
            End::Ok(d) => ("ok", d),
            End::Failed(d) => ("failed", d),
            End::Interrupted(d) => ("interrupted", d),
        };
        history.record(project, peer, action, outcome, &detail);
    }
}

impl AgentService {
    /// The stack model of a request, checked, and where its files are.
    fn stack_of(
        &self,
        stack_json: &str,
        files_root: &str,
    ) -> Result<(mlops_proto::stack::Stack, converge::StackDirs), AgentError> {
        let stack: mlops_proto::stack::Stack = serde_json::from_str(stack_json).map_err(|e| {
            AgentError::InvalidArgument { field: "stack_json", message: format!("not a stack model: {e}") }
        })?;
        check_project(&stack.project)?;
        engine::sync::check_root(files_root)?;
        let dirs = self.project_dirs(&stack.project, files_root);
        Ok((stack, dirs))
    }

    /// Where a project's files (tree `files_root`), temporary files and
    /// credentials record are; both names checked by the caller.
    fn project_dirs(&self, project: &str, files_root: &str) -> converge::StackDirs {
        converge::StackDirs {
            files: self.sync.tree(files_root),
            work: self.sync.work_dir(),
            credentials: self.state_dir.join("credentials").join(format!("{project}.json")),
            // As `stop_services` writes it.
            stopped: self.state_dir.join("stopped").join(format!("{project}.json")),
        }
    }
}

/// How long a deploy waits for one its controller left (see
/// `engine::lock`) before it gives up with the lock error: that work ends
/// within its health timeouts, plus its return to the last revision.
const ORPHAN_PATIENCE: Duration = Duration::from_secs(20 * 60);

/// The lock `pending` (from `Locks::try_acquire`), or, when work its
/// controller left holds it, the lock once that work ends (the caller is
/// told it waits). `None` when it never came: the stream has the error.
async fn lock_after_orphan(
    pending: Option<engine::lock::Guard>,
    locks: &Locks,
    project: &str,
    holder: &str,
    tx: &mpsc::Sender<Result<StackEvent, Status>>,
) -> Option<engine::lock::Guard> {
    if let Some(g) = pending {
        return Some(g);
    }
    let waiting = |other: &str| {
        let mut ev = StackEvent {
            unix_ms: engine::now_ms(),
            detail: format!("waiting for the deploy {other} left behind (its controller went away) to finish"),
            ..Default::default()
        };
        ev.set_action(StackAction::Waiting);
        let _ = tx.try_send(Ok(ev));
    };
    let acquired = tokio::select! {
        acquired = locks.acquire_after_orphan(project, holder, ORPHAN_PATIENCE, waiting) => acquired,
        // Its own controller went away while it waited: nothing was done,
        // and nothing is left to finish alone.
        () = tx.closed() => return None,
    };
    match acquired {
        Ok(g) => Some(g),
        Err(e) => {
            let _ = tx.send(Err(stack_status(e, project))).await;
            None
        }
    }
}

/// Seconds to wait for each service to become healthy (0: 300).
fn health_timeout(seconds: u32) -> Duration {
    Duration::from_secs(if seconds == 0 { 300 } else { u64::from(seconds) })
}

/// Who made the call (see [`Peer`]); unknown for a call without TLS
/// (tests that serve the handlers directly).
fn peer<T>(request: &Request<T>) -> Peer {
    request.extensions().get::<Peer>().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_outputs_are_cut_to_their_end() {
        let output = format!("{}the last line", "é".repeat(5000));
        let e = AgentError::Engine(EngineError::Unhealthy { service: "web".into(), output });
        let f = failure(&e);
        assert_eq!(f.kind(), FailureKind::HealthCheckFailed);
        assert!(f.output.len() <= MAX_FAILURE_TEXT + 3 && f.message.len() <= MAX_FAILURE_TEXT + 3);
        assert!(f.output.starts_with("...") && f.output.ends_with("the last line"), "{}", f.output);
        // The whole status stays far below what HTTP/2 peers accept.
        let status = mlops_proto::failure::into_status(&f);
        assert!(status.details().len() + status.message().len() < 8 * 1024);
    }
}
