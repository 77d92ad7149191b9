//! The `mlops.agent.v1.Agent` RPC handlers.
//!
//! Handlers stay thin: they check the request, call [`crate::facts`] or
//! [`crate::engine`], and shape the answer. Long work runs in a task that
//! feeds the response stream and ends when the client goes away or the
//! agent shuts down. Failures go through [`AgentError`] and its one
//! conversion into `tonic::Status`.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use mlops_proto::v1::agent_server::Agent;
use mlops_proto::v1::{
    DownRequest, EnsureDockerRequest, GetFactsRequest, HealthEvent, HeartbeatEvent, HeartbeatRequest, HelloRequest,
    HelloResponse, HostFacts, LogChunk, LogsRequest, Progress, StackEvent, StackStatusReply, StackStatusRequest,
    SyncChunk, SyncCommitRequest, SyncManifest, SyncPlan, SyncReport, SyncUploadReply, WatchHealthRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::{self, EngineError, converge, docker, lock::Locks, sync::SyncStore, watch as engine_watch};
use crate::facts;

/// Errors of the RPC layer, mapped to gRPC status codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let message = e.to_string();
        match e {
            AgentError::ShuttingDown => Status::unavailable(message),
            AgentError::InvalidArgument(_) => Status::invalid_argument(message),
            AgentError::Engine(engine) => match engine {
                EngineError::Invalid(_) => Status::invalid_argument(message),
                EngineError::NotFound(_) => Status::not_found(message),
                EngineError::Locked { .. } => Status::failed_precondition(message),
                EngineError::NoEngine { .. } => Status::unavailable(message),
                EngineError::Failed(_) => Status::aborted(message),
                EngineError::Docker(_) | EngineError::Io { .. } => Status::internal(message),
            },
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        AgentError::Engine(e).into()
    }
}

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
    locks: Locks,
    shutdown: watch::Receiver<bool>,
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
        AgentService {
            started: Instant::now(),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            binary_sha256,
            config_sha256,
            service_manager: service_manager.to_string(),
            sync: SyncStore::new(&state_dir, engine::sync::Limits::default()),
            state_dir,
            docker_socket: PathBuf::from(docker::DEFAULT_SOCKET),
            log_dir: PathBuf::from(mlops_proto::layout::LOG_DIR),
            locks: Locks::default(),
            shutdown,
        }
    }

    pub fn with_docker_socket(mut self, socket: PathBuf) -> Self {
        self.docker_socket = socket;
        self
    }

    fn uptime(&self) -> u64 {
        self.started.elapsed().as_secs()
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
        }))
    }

    async fn get_facts(&self, _: Request<GetFactsRequest>) -> Result<Response<HostFacts>, Status> {
        let (memory_total_bytes, memory_available_bytes) = facts::memory();
        let (disk_total_bytes, disk_available_bytes) = facts::disk(&self.state_dir);
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
            docker: Some(docker::status(&self.docker_socket).await),
            agent_uptime_seconds: self.uptime(),
            host_uptime_seconds: facts::host_uptime(),
            service_manager: self.service_manager.clone(),
        }))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<Self::HeartbeatStream>, Status> {
        if *self.shutdown.borrow() {
            return Err(AgentError::ShuttingDown.into());
        }
        let interval_ms = request.into_inner().interval_ms;
        if interval_ms == 0 {
            return Err(AgentError::InvalidArgument("interval_ms must be positive".into()).into());
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
            let report = docker::Reporter::new(tx.clone());
            tokio::select! {
                r = docker::ensure(&socket, install, &log_dir, &report) => match r {
                    Ok(status) => report.done(status).await,
                    Err(e) => { let _ = tx.send(Err(e.into())).await; }
                },
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
        while let Some(chunk) = chunks.message().await? {
            let store = self.sync.clone();
            let len = chunk.data.len() as u64;
            let done =
                blocking(move || store.write_chunk(&chunk.sync_id, &chunk.sha256, chunk.offset, &chunk.data)).await?;
            reply.bytes += len;
            if done {
                reply.blobs += 1;
            }
        }
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
        let req = request.into_inner();
        let stack: mlops_proto::stack::Stack = serde_json::from_str(&req.stack_json)
            .map_err(|e| AgentError::InvalidArgument(format!("stack_json is not a stack model: {e}")))?;
        check_project(&stack.project)?;
        engine::sync::check_root(&req.files_root).map_err(AgentError::from)?;
        let guard = self.locks.acquire(&stack.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let files_dir = self.sync.tree(&req.files_root);
        let timeout = Duration::from_secs(if req.health_timeout_seconds == 0 {
            300
        } else {
            u64::from(req.health_timeout_seconds)
        });
        let (tx, rx) = mpsc::channel(64);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let events = converge::Events::new(tx.clone());
            let work = converge::converge(&docker, &stack, &files_dir, timeout, &events);
            Box::pin(run_until_gone(work, &tx, stop, &format!("converge of {}", stack.project))).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownStream = BoxStream<StackEvent>;

    async fn down(&self, request: Request<DownRequest>) -> Result<Response<Self::DownStream>, Status> {
        let req = request.into_inner();
        check_project(&req.project)?;
        let guard = self.locks.acquire(&req.project, &req.holder).map_err(AgentError::from)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let (tx, rx) = mpsc::channel(64);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let events = converge::Events::new(tx.clone());
            let work = async { converge::down(&docker, &req.project, req.volumes, &events).await.map(|()| Vec::new()) };
            run_until_gone(work, &tx, stop, &format!("down of {}", req.project)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stack_status(&self, request: Request<StackStatusRequest>) -> Result<Response<StackStatusReply>, Status> {
        let project = request.into_inner().project;
        check_project(&project)?;
        let docker = docker::connect(&self.docker_socket).await.map_err(AgentError::from)?;
        let services = converge::status(&docker, &project).await.map_err(AgentError::from)?;
        Ok(Response::new(StackStatusReply { services, lock_holder: self.locks.holder(&project).unwrap_or_default() }))
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
        tokio::spawn(async move {
            if let Err(e) = engine_watch::health(docker, project, tx.clone(), stop).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
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
        tokio::spawn(async move {
            if let Err(e) =
                engine_watch::logs(docker, container, req.follow, req.since, req.tail, tx.clone(), stop).await
            {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, EngineError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?.map_err(Status::from)
}

fn check_project(project: &str) -> Result<(), AgentError> {
    if project.is_empty()
        || !project.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(AgentError::InvalidArgument(format!(
            "`{project}` is not a project name (lowercase letters, digits, `-`, `_`)"
        )));
    }
    Ok(())
}

/// Drives stack work, reporting its failure as a final error event. When
/// the controller goes away or the agent shuts down, the work is dropped
/// (and the caller's lock guard with it).
async fn run_until_gone(
    work: impl std::future::Future<Output = Result<Vec<mlops_proto::v1::ServiceState>, EngineError>>,
    tx: &mpsc::Sender<Result<StackEvent, Status>>,
    mut stop: watch::Receiver<bool>,
    what: &str,
) {
    tokio::select! {
        r = work => {
            if let Err(e) = r {
                let _ = tx
                    .send(Ok(StackEvent { unix_ms: engine::now_ms(), service: String::new(), action: "error".into(), detail: e.to_string(), error: true, services: Vec::new() }))
                    .await;
            }
        }
        () = tx.closed() => tracing::warn!("{what}: the controller went away; stopped"),
        _ = stop.changed() => tracing::warn!("{what}: the agent is shutting down; stopped"),
    }
}
