//! The `mlops.agent.v1.Agent` RPC handlers.
//!
//! Handlers stay thin: they gather what [`crate::facts`] reads and shape it
//! into messages. Failures go through [`AgentError`] and its one conversion
//! into `tonic::Status`.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use mlops_proto::v1::agent_server::Agent;
use mlops_proto::v1::{GetFactsRequest, HeartbeatEvent, HeartbeatRequest, HelloRequest, HelloResponse, HostFacts};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::facts;

/// Errors of the RPC layer, mapped to gRPC status codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        match e {
            AgentError::ShuttingDown => Status::unavailable(e.to_string()),
            AgentError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// What the handlers need to know about this agent process.
#[derive(Debug, Clone)]
pub struct AgentService {
    started: Instant,
    started_unix: u64,
    binary_sha256: String,
    config_sha256: String,
    service_manager: String,
    state_dir: PathBuf,
    docker_socket: PathBuf,
    shutdown: watch::Receiver<bool>,
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
            state_dir,
            docker_socket: PathBuf::from(facts::DOCKER_SOCKET),
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
            docker: Some(facts::docker_status(&self.docker_socket).await),
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
}
