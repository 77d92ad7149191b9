//! A stack on one host: Docker present, files synced, converge; and the
//! operations on a deployed stack (down, status, logs, health).
//!
//! The stack's files go to the agent tree `stack-<project>`; the Compose
//! model goes as JSON in `ConvergeRequest` (see `mlops_proto::stack`).

use std::sync::Arc;

use futures::StreamExt;
use mlops_proto::v1::{
    DownRequest, EnsureDockerRequest, HealthEvent, LogsRequest, ServiceState, StackAction, StackEvent,
    StackStatusRequest, SyncCommitRequest, WatchHealthRequest,
};
use serde::Serialize;

use crate::ControllerError;
use crate::client::AgentConn;
use crate::progress::{Progress, Step};
use crate::sync::LocalTree;

/// What every host needs to deploy a stack; built once per run.
#[derive(Clone)]
pub struct StackPlan {
    pub project: String,
    pub stack_json: String,
    /// Each host's part of the stack when placement splits it between
    /// hosts (see [`crate::placement`]); a host not here gets `stack_json`.
    pub parts: std::collections::BTreeMap<String, String>,
    pub tree: Arc<LocalTree>,
    /// Install Docker where none answers (else fail).
    pub install_docker: bool,
    pub health_timeout_seconds: u32,
    /// Who deploys, for the lock.
    pub holder: String,
    /// Sync files only.
    pub sync_only: bool,
    /// Secrets a rotation is changing (see `ConvergeRequest.rotating`).
    pub rotating: Vec<String>,
    /// A deploy to several hosts: each image is built on one host and
    /// shipped to the others (see [`crate::images`]); else each host builds
    /// its own.
    pub images: bool,
    /// An `image:` no host has may be shipped from this machine's Docker
    /// engine (see [`crate::local_engine`]).
    pub local_images: bool,
    /// Seconds a changed service without a health check must keep running.
    pub min_healthy_seconds: u32,
    /// A failed converge leaves the host as it failed (else it returns to
    /// its last revision).
    pub no_rollback: bool,
    /// This deploy's id, kept with each host's revision.
    pub deploy_id: String,
    /// Free bytes a host's Docker data directory must have for a build.
    pub min_free_bytes: u64,
}

impl StackPlan {
    /// The stack model `host` runs, as JSON.
    pub fn stack_json_for(&self, host: &str) -> String {
        self.parts.get(host).unwrap_or(&self.stack_json).clone()
    }

    pub fn files_root(&self) -> String {
        files_root(&self.project)
    }

    /// Where a deploy syncs the new files: a tree no container mounts,
    /// written into [`Self::files_root`] by the converge itself (see
    /// `ConvergeRequest.staged_root`). `mlopsctl sync` writes the stack's
    /// tree directly.
    pub fn staged_root(&self) -> String {
        if self.sync_only { self.files_root() } else { format!("staged-{}", self.project) }
    }
}

/// The agent tree holding a project's files.
pub fn files_root(project: &str) -> String {
    format!("stack-{project}")
}

/// `user@host pid N`: who holds a deploy lock.
pub fn holder() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("mlopsctl {user}@{host} pid {}", std::process::id())
}

/// Where a host's deploy spent its time, in milliseconds per step (the
/// profile `mlops-bench-ansible --phases` prints). Steps a deploy did not
/// take stay 0.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HostTimings {
    /// SSH connect, key exchange and authentication.
    pub ssh_ms: u64,
    /// The agent checked (and uploaded, installed, restarted when needed),
    /// through to its TLS `Hello` and facts.
    pub agent_ms: u64,
    /// The project's secrets the host lacked, stored on it.
    pub secrets_ms: u64,
    /// `EnsureDocker`.
    pub docker_ms: u64,
    /// `SyncBegin`: the manifest sent, the missing blobs answered.
    pub manifest_ms: u64,
    /// `SyncUpload`: the missing blobs sent.
    pub upload_ms: u64,
    /// `SyncCommit`: the staged tree swapped in.
    pub commit_ms: u64,
    /// `ImagePlan`, and images fetched from other hosts.
    pub images_ms: u64,
    /// `Converge`: the agent's Docker work (builds, containers, health).
    pub converge_ms: u64,
}

fn ms_since(t: std::time::Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncOutcome {
    pub files: usize,
    pub uploaded_blobs: u32,
    pub uploaded_bytes: u64,
    pub written: u32,
    pub removed: u32,
    pub unchanged: u32,
    pub path: String,
    /// `SyncBegin`, `SyncUpload` and `SyncCommit`.
    #[serde(skip)]
    pub took_ms: [u64; 3],
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceOutcome {
    pub service: String,
    pub state: String,
    pub health: String,
    pub container_id: String,
    pub image: String,
    pub changed: bool,
    pub started_at_ms: u64,
}

impl From<ServiceState> for ServiceOutcome {
    fn from(s: ServiceState) -> Self {
        ServiceOutcome {
            service: s.service,
            state: s.state,
            health: s.health,
            container_id: s.container_id,
            image: s.image,
            changed: s.changed,
            started_at_ms: s.started_at_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StackOutcome {
    pub project: String,
    pub docker_version: String,
    pub sync: SyncOutcome,
    /// Empty with `sync_only`.
    pub services: Vec<ServiceOutcome>,
    /// How many services were created or replaced.
    pub changed: usize,
    pub summary: String,
    /// How each image the stack builds came to be here (deploys to
    /// several hosts; empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<crate::images::ImageOutcome>,
    /// The staging and converge steps on this host (the connection's
    /// steps are 0 here; the deploy's outcome fills them in).
    pub timings: HostTimings,
}

/// Syncs `tree` into agent tree `root`, sending only what the agent lacks
/// (its bytes reported to `progress` as they go).
pub async fn sync(
    conn: &mut AgentConn,
    root: &str,
    tree: &Arc<LocalTree>,
    progress: &Progress,
) -> Result<SyncOutcome, ControllerError> {
    let host = conn.host().to_string();
    let rpc = |call: &'static str, s: tonic::Status| ControllerError::from_status(&host, call, &s);
    let started = std::time::Instant::now();
    let plan = conn.raw().sync_begin(tree.manifest(root)).await.map_err(|s| rpc("SyncBegin", s))?.into_inner();
    let mut out = SyncOutcome { files: tree.entries.iter().filter(|e| !e.is_dir).count(), ..Default::default() };
    out.took_ms[0] = ms_since(started);
    let started = std::time::Instant::now();
    if !plan.missing.is_empty() {
        // Each missing blob is sent once, however many files share it.
        let missing: std::collections::HashSet<&String> = plan.missing.iter().collect();
        let sizes: std::collections::HashMap<&String, u64> =
            tree.entries.iter().filter(|e| missing.contains(&e.sha256)).map(|e| (&e.sha256, e.size)).collect();
        let total = sizes.values().sum::<u64>();
        let mut meter = crate::progress::TransferMeter::new(progress, "files", Some(total));
        let chunks = tree.chunks(plan.sync_id.clone(), plan.missing.clone());
        let chunks = tokio_stream::wrappers::ReceiverStream::new(chunks).map(move |c| {
            meter.add(c.data.len() as u64);
            c
        });
        let reply = conn.raw().sync_upload(chunks).await.map_err(|s| rpc("SyncUpload", s))?.into_inner();
        out.uploaded_blobs = reply.blobs;
        out.uploaded_bytes = reply.bytes;
    }
    out.took_ms[1] = ms_since(started);
    let started = std::time::Instant::now();
    let report = conn
        .raw()
        .sync_commit(SyncCommitRequest { sync_id: plan.sync_id })
        .await
        .map_err(|s| rpc("SyncCommit", s))?
        .into_inner();
    out.written = report.written;
    out.removed = report.removed;
    out.unchanged = report.unchanged;
    out.path = report.path;
    out.took_ms[2] = ms_since(started);
    Ok(out)
}

/// What [`stage`] did on a host: Docker answers, the files are there,
/// and (deploys to several hosts) which images the host has current.
#[derive(Debug, Clone, Default)]
pub struct Staged {
    pub docker_version: String,
    pub sync: SyncOutcome,
    /// `ImagePlan`'s answer, when the deploy shares images between hosts.
    pub images: Vec<mlops_proto::v1::ImageState>,
    /// Docker, the files and the image plan (the other steps are 0).
    pub timings: HostTimings,
}

/// Docker, then the files; then, when the deploy ships images between
/// hosts, which of the stack's images this host has.
pub async fn stage(conn: &mut AgentConn, plan: &StackPlan, progress: &Progress) -> Result<Staged, ControllerError> {
    let host = conn.host().to_string();
    let rpc = |call: &'static str, s: tonic::Status| ControllerError::from_status(&host, call, &s);

    let mut timings = HostTimings::default();
    let started = std::time::Instant::now();
    let mut docker_version = String::new();
    if !plan.sync_only {
        let mut stream = conn
            .raw()
            .ensure_docker(EnsureDockerRequest { install: plan.install_docker })
            .await
            .map_err(|s| rpc("EnsureDocker", s))?
            .into_inner();
        while let Some(p) = stream.next().await {
            let p = p.map_err(|s| rpc("EnsureDocker", s))?;
            if p.done {
                let d = p.docker.unwrap_or_default();
                if !d.available {
                    return Err(ControllerError::NoDocker { host: host.clone(), message: d.error });
                }
                docker_version = d.version;
            } else {
                progress.step(Step::Docker { message: p.message });
            }
        }
    }

    timings.docker_ms = ms_since(started);
    let sync = sync(conn, &plan.staged_root(), &plan.tree, progress).await?;
    [timings.manifest_ms, timings.upload_ms, timings.commit_ms] = sync.took_ms;
    progress.step(Step::Synced {
        files: sync.files,
        written: sync.written,
        removed: sync.removed,
        bytes: sync.uploaded_bytes,
    });
    let started = std::time::Instant::now();
    let images = match (plan.images, plan.local_images) {
        _ if plan.sync_only => Vec::new(),
        (true, _) => crate::images::plan(conn, plan).await?,
        // One host: only its pulled images may come from elsewhere (this
        // machine's engine); it builds its own in the converge.
        (false, true) => crate::images::plan(conn, plan).await?.into_iter().filter(crate::images::pulled).collect(),
        (false, false) => Vec::new(),
    };
    timings.images_ms = ms_since(started);
    Ok(Staged { docker_version, sync, images, timings })
}

/// The stack on a staged host: its images from the hosts that have them
/// (deploys to several hosts), then `Converge`.
pub async fn converge(
    conn: &mut AgentConn,
    plan: &StackPlan,
    staged: &Staged,
    sources: Option<&crate::images::ImageSources>,
    progress: &Progress,
) -> Result<StackOutcome, ControllerError> {
    let host = conn.host().to_string();
    let rpc = |call: &'static str, s: tonic::Status| ControllerError::from_status(&host, call, &s);
    let sync = staged.sync.clone();
    if plan.sync_only {
        return Ok(StackOutcome {
            project: plan.project.clone(),
            docker_version: staged.docker_version.clone(),
            summary: format!("{} file(s) written, {} removed", sync.written, sync.removed),
            sync,
            services: Vec::new(),
            changed: 0,
            images: Vec::new(),
            timings: staged.timings,
        });
    }
    let mut timings = staged.timings;
    let started = std::time::Instant::now();
    let images = match sources {
        Some(sources) => crate::images::fetch(conn, &staged.images, sources, progress).await?,
        None => Vec::new(),
    };
    timings.images_ms += ms_since(started);
    let started = std::time::Instant::now();

    let request = mlops_proto::v1::ConvergeRequest {
        stack_json: plan.stack_json_for(&host),
        holder: plan.holder.clone(),
        files_root: plan.files_root(),
        staged_root: plan.staged_root(),
        staged_digest: if plan.sync_only { String::new() } else { mlops_proto::manifest_digest(&plan.tree.entries) },
        health_timeout_seconds: plan.health_timeout_seconds,
        rotating: plan.rotating.clone(),
        min_healthy_seconds: plan.min_healthy_seconds,
        no_rollback: plan.no_rollback,
        deploy_id: plan.deploy_id.clone(),
        min_free_bytes: plan.min_free_bytes,
    };
    let stream = conn.raw().converge(request).await.map_err(|s| rpc("Converge", s))?.into_inner();
    let done = follow(&host, "Converge", stream, progress).await?;
    timings.converge_ms = ms_since(started);
    let services: Vec<ServiceOutcome> = done.services.into_iter().map(ServiceOutcome::from).collect();
    let changed = services.iter().filter(|s| s.changed).count();
    Ok(StackOutcome {
        project: plan.project.clone(),
        docker_version: staged.docker_version.clone(),
        sync,
        services,
        changed,
        summary: done.detail,
        images,
        timings,
    })
}

/// Docker, files, converge: the stack part of `deploy` on one host (each
/// host builds its own images).
pub async fn apply(
    conn: &mut AgentConn,
    plan: &StackPlan,
    progress: &Progress,
) -> Result<StackOutcome, ControllerError> {
    let staged = stage(conn, plan, progress).await?;
    converge(conn, plan, &staged, None, progress).await
}

/// Reports a stack stream's events as progress until its `DONE` event,
/// which it returns; a failure ends the stream as a status.
pub(crate) async fn follow(
    host: &str,
    call: &'static str,
    mut stream: tonic::Streaming<StackEvent>,
    progress: &Progress,
) -> Result<StackEvent, ControllerError> {
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| ControllerError::from_status(host, call, &s))?;
        if ev.action() == StackAction::Done {
            return Ok(ev);
        }
        progress.step(Step::Service { service: ev.service.clone(), action: ev.action(), detail: ev.detail });
    }
    Err(ControllerError::Incomplete { host: host.to_string(), call })
}

/// Removes the stack's containers and networks (and volumes if asked).
pub async fn down(
    conn: &mut AgentConn,
    project: &str,
    volumes: bool,
    progress: &Progress,
) -> Result<String, ControllerError> {
    let host = conn.host().to_string();
    let request = DownRequest { project: project.to_string(), volumes, holder: holder() };
    let stream =
        conn.raw().down(request).await.map_err(|s| ControllerError::from_status(&host, "Down", &s))?.into_inner();
    Ok(follow(&host, "Down", stream, progress).await?.detail)
}

/// The last thing done to a project on a host, and by whom (the agent's history).
#[derive(Debug, Clone, Serialize)]
pub struct LastChange {
    pub unix_ms: u64,
    /// The operator: the common name of the client certificate it came with.
    pub operator: String,
    pub action: String,
    pub outcome: String,
    pub detail: String,
}

/// What a host runs of a project: its services, who holds its deploy lock
/// (if anyone), and the last change.
pub struct StackState {
    pub services: Vec<ServiceOutcome>,
    pub lock_holder: String,
    pub last: Option<LastChange>,
}

pub async fn status(conn: &mut AgentConn, project: &str) -> Result<StackState, ControllerError> {
    let host = conn.host().to_string();
    let reply = conn
        .raw()
        .stack_status(StackStatusRequest { project: project.to_string() })
        .await
        .map_err(|s| ControllerError::from_status(&host, "StackStatus", &s))?
        .into_inner();
    Ok(StackState {
        services: reply.services.into_iter().map(ServiceOutcome::from).collect(),
        lock_holder: reply.lock_holder,
        last: reply.last.map(|e| LastChange {
            unix_ms: e.unix_ms,
            operator: e.operator,
            action: e.action,
            outcome: e.outcome,
            detail: e.detail,
        }),
    })
}

/// Streams a service's logs into `out` until the stream ends.
pub async fn logs(
    conn: &mut AgentConn,
    project: &str,
    service: &str,
    follow: bool,
    tail: u32,
    since: i64,
    mut out: impl FnMut(&str, &[u8]),
) -> Result<(), ControllerError> {
    let host = conn.host().to_string();
    let rpc = |s: tonic::Status| ControllerError::from_status(&host, "Logs", &s);
    let request = LogsRequest { project: project.to_string(), service: service.to_string(), follow, since, tail };
    let mut stream = conn.raw().logs(request).await.map_err(rpc)?.into_inner();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(rpc)?;
        out(&chunk.stream, &chunk.data);
    }
    Ok(())
}

/// Health transitions of a project until the stream ends.
pub async fn watch_health(
    conn: &mut AgentConn,
    project: &str,
) -> Result<tonic::Streaming<HealthEvent>, ControllerError> {
    let host = conn.host().to_string();
    Ok(conn
        .raw()
        .watch_health(WatchHealthRequest { project: project.to_string() })
        .await
        .map_err(|s| ControllerError::from_status(&host, "WatchHealth", &s))?
        .into_inner())
}
