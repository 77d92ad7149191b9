//! One host, from nothing to an agent answering over mTLS.
//!
//! Round trips are what cost time over SSH. When the agent is not current,
//! the host is probed with one shell command that reports everything the decisions need (user, OS, CPU,
//! sudo, installed binary hash, installed bundle hash, service manager).
//! Then only what differs is done:
//! - the binary is uploaded when its sha256 differs (to a temporary file,
//!   checked, renamed: a host never runs a half-written agent);
//! - `mlops-agent install` runs when the binary or the install bundle
//!   (certificates, port) changed, or when the agent does not answer or runs
//!   a stale binary; it (re)starts the service.
//!
//! Before any of that, the agent is asked: when it answers `Hello` with our
//! binary's and configuration's hashes and our API level, the host is
//! current, and a no-op re-deploy is one SSH connection, one tunnel,
//! `Hello` and `GetFacts`, with no command run on the host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use mlops_inventory::{Connection, Target};
use mlops_proto::layout;
use mlops_proto::v1::{HelloResponse, HostFacts, InstallBundle};
use mlops_ssh::{Session, SshOptions};
use prost::Message as _;
use serde::Serialize;

use crate::ControllerError;
use crate::agent_binary::{AgentBinary, normalize_arch};
use crate::client::{AgentConn, ClientTls, error_chain};
use crate::images::ImageSources;
use crate::progress::{Progress, Step};
use crate::stack::{StackOutcome, StackPlan, Staged};
use crate::state::{StateDir, cert_name};
use crate::transport::{SharedTransport, Transport};

/// What every host task shares.
pub struct Context {
    /// The agent to push; only `deploy` needs it.
    pub binary: Option<AgentBinary>,
    pub tls: ClientTls,
    pub ssh: SshOptions,
    /// `--identity` files, tried before each host's own.
    pub identities: Vec<PathBuf>,
    /// `deploy --take-over`: re-key an agent that trusts another
    /// controller's CA (never done without it).
    pub take_over: bool,
    /// Every CA this controller has had (current, pending, retired), PEM:
    /// an agent trusting one of them is this controller's.
    pub our_cas_pem: String,
    /// The state directory, for what hosts teach the controller (a newer
    /// revocation list); `None` where nothing is to be learnt.
    pub state: Option<Arc<StateDir>>,
}

/// The install bundle for one host, encoded, with its hash.
#[derive(Clone)]
pub struct Bundle {
    pub bytes: Vec<u8>,
    /// See `mlops_proto::bundle_sha256`: the identity and the revocation
    /// list are judged apart.
    pub sha256: String,
    /// The revocation list's number: an agent with an older one is updated.
    pub crl_number: u64,
}

impl Bundle {
    /// Every target's bundle, by name: each host's certificate issued (or
    /// reused), with the CAs and the revocation list read once. Issued
    /// before a fan-out, so one task writes the CA directory.
    pub fn for_targets(state: &StateDir, targets: &[Target]) -> Result<BTreeMap<String, Self>, ControllerError> {
        let (trusted, crl) = (state.trusted_pem()?, state.crl()?);
        let mut out = BTreeMap::new();
        for t in targets {
            let identity = state.ca.server_identity(&cert_name(&t.name))?;
            out.insert(t.name.clone(), Self::new(&trusted, &crl, identity, t));
        }
        Ok(out)
    }

    /// The bundle with `trusted` (one or more CA certificates, PEM) as the
    /// CAs whose clients the agent accepts, `crl` as the revocation list,
    /// and `identity` as its own.
    pub fn new(trusted: &str, crl: &mlops_pki::Crl, identity: mlops_pki::Identity, target: &Target) -> Self {
        let bundle = InstallBundle {
            ca_pem: trusted.to_string(),
            cert_pem: identity.cert_pem,
            key_pem: identity.key_pem,
            port: u32::from(target.agent_port),
            // Not the controller's version: a controller upgrade alone must
            // not force every agent to restart.
            controller_version: String::new(),
            crl_pem: crl.pem.clone(),
        };
        Bundle { sha256: mlops_proto::bundle_sha256(&bundle), crl_number: crl.number, bytes: bundle.encode_to_vec() }
    }
}

/// What the probe found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    pub uid: u32,
    pub os: String,
    pub arch: String,
    /// `ok`, `password`, `missing`; empty for root.
    pub sudo: String,
    pub binary_sha256: Option<String>,
    pub bundle_sha256: Option<String>,
    pub service_manager: String,
    /// The CA certificates the installed agent trusts (PEM), when one is installed.
    pub ca_pem: Option<String>,
    /// The revocation list the installed agent enforces (PEM), if any.
    pub crl_pem: Option<String>,
    /// The host's glibc (`getconf GNU_LIBC_VERSION`: `2.36`), when it has one.
    pub glibc: Option<String>,
}

fn probe_script() -> String {
    format!(
        r#"echo "uid=$(id -u)"
echo "os=$(uname -s)"
echo "arch=$(uname -m)"
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then echo sudo=missing
  elif sudo -n true 2>/dev/null; then echo sudo=ok
  else echo sudo=password; fi
fi
if [ -f {bin} ]; then echo "binary=$(sha256sum {bin} 2>/dev/null | cut -d' ' -f1)"; fi
if [ -f {bundle} ]; then echo "bundle=$(cat {bundle})"; fi
if [ "$(id -u)" = 0 ]; then ca=$(base64 -w0 {ca} 2>/dev/null); else ca=$(sudo -n base64 -w0 {ca} 2>/dev/null); fi
[ -n "$ca" ] && echo "ca=$ca"
if [ "$(id -u)" = 0 ]; then crl=$(base64 -w0 {crl} 2>/dev/null); else crl=$(sudo -n base64 -w0 {crl} 2>/dev/null); fi
[ -n "$crl" ] && echo "crl=$crl"
if [ -d /run/systemd/system ]; then echo manager=systemd; else echo manager=daemon; fi
echo "glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc //p')"
"#,
        bin = layout::BINARY,
        bundle = layout::INSTALL_HASH,
        ca = layout::TLS_CA,
        crl = layout::TLS_CRL,
    )
}

impl Probe {
    pub fn parse(text: &str) -> Option<Self> {
        let mut p = Probe::default();
        let mut saw_uid = false;
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = v.trim().to_string();
            match k {
                "uid" => {
                    p.uid = v.parse().ok()?;
                    saw_uid = true;
                }
                "os" => p.os = v,
                "arch" => p.arch = normalize_arch(&v).to_string(),
                "sudo" => p.sudo = v,
                "binary" if !v.is_empty() => p.binary_sha256 = Some(v),
                "bundle" if !v.is_empty() => p.bundle_sha256 = Some(v),
                "manager" => p.service_manager = v,
                "glibc" if !v.is_empty() => p.glibc = Some(v),
                "ca" | "crl" => {
                    use base64::Engine;
                    let text = base64::engine::general_purpose::STANDARD
                        .decode(v.as_bytes())
                        .ok()
                        .map(|b| String::from_utf8_lossy(&b).into_owned());
                    if k == "ca" { p.ca_pem = text } else { p.crl_pem = text }
                }
                _ => {}
            }
        }
        saw_uid.then_some(p)
    }

    fn needs_sudo(&self) -> bool {
        self.uid != 0
    }
}

/// Opens the transport for a target (SSH session or this machine).
pub async fn open_transport(target: &Target, ctx: &Context) -> Result<Transport, ControllerError> {
    match &target.connection {
        Connection::Local => Ok(Transport::Local { host: target.name.clone() }),
        Connection::Ssh { address, port, user, identity_files } => {
            let mut options = ctx.ssh.clone();
            options.identity_files = ctx.identities.iter().chain(identity_files).cloned().collect();
            let session = Session::connect(address, *port, user, Arc::new(options)).await?;
            Ok(Transport::Ssh { session, host: target.name.clone() })
        }
    }
}

/// What a deploy did on one host.
#[derive(Debug, Clone, Serialize)]
pub struct DeployOutcome {
    pub host: String,
    pub address: String,
    /// The agent binary was uploaded (its hash differed).
    pub uploaded: bool,
    /// Why `install` ran, when it did (it restarts the agent).
    pub installed: Option<String>,
    pub agent: AgentInfo,
    pub facts: FactsSummary,
    /// The stack deployed, with `--stack`.
    pub stack: Option<StackOutcome>,
    pub connect_ms: u64,
    pub total_ms: u64,
    /// Where the time went, step by step.
    pub timings: crate::stack::HostTimings,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub version: String,
    pub api_level: u32,
    pub binary_sha256: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub service_manager: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FactsSummary {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    pub docker: bool,
    pub docker_version: String,
    pub docker_error: String,
    pub host_uptime_seconds: u64,
    /// Docker's data directory and what its data takes (`status` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_disk: Option<DockerDiskSummary>,
}

/// The file system of Docker's data directory and what Docker's data
/// takes on it, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct DockerDiskSummary {
    pub root_dir: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub images_bytes: u64,
    pub containers_bytes: u64,
    pub volumes_bytes: u64,
    pub build_cache_bytes: u64,
    /// Why the usage figures are missing, when they are.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl FactsSummary {
    fn from_facts(f: &HostFacts) -> Self {
        let docker = f.docker.clone().unwrap_or_default();
        FactsSummary {
            hostname: f.hostname.clone(),
            os: f.os.clone(),
            kernel: f.kernel.clone(),
            arch: f.arch.clone(),
            cpus: f.cpus,
            memory_total_bytes: f.memory_total_bytes,
            memory_available_bytes: f.memory_available_bytes,
            disk_total_bytes: f.disk_total_bytes,
            disk_available_bytes: f.disk_available_bytes,
            docker: docker.available,
            docker_version: docker.version,
            docker_error: docker.error,
            host_uptime_seconds: f.host_uptime_seconds,
            docker_disk: f.docker_disk.as_ref().map(|d| DockerDiskSummary {
                root_dir: d.root_dir.clone(),
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
                images_bytes: d.images_bytes,
                containers_bytes: d.containers_bytes,
                volumes_bytes: d.volumes_bytes,
                build_cache_bytes: d.build_cache_bytes,
                error: d.error.clone(),
            }),
        }
    }
}

fn agent_info(hello: &HelloResponse, facts: &HostFacts) -> AgentInfo {
    AgentInfo {
        version: hello.agent_version.clone(),
        api_level: hello.api_level,
        binary_sha256: hello.binary_sha256.clone(),
        pid: hello.pid,
        uptime_seconds: facts.agent_uptime_seconds,
        service_manager: facts.service_manager.clone(),
    }
}

/// Brings the agent on `target` up to date and returns what it did.
pub async fn deploy_host(
    target: &Target,
    ctx: &Context,
    bundle: &Bundle,
    stack: Option<&StackPlan>,
    progress: &Progress,
) -> Result<DeployOutcome, ControllerError> {
    let stack = stack.map(|plan| (plan, None));
    prepare_host(target, ctx, bundle, progress).await?.finish(target, ctx, stack, None, progress).await
}

/// A host whose agent is current, its connection kept open for what comes
/// next (the stack, once every host has been asked for its secrets).
pub struct Prepared {
    pub transport: SharedTransport,
    pub conn: AgentConn,
    started: Instant,
    connect_ms: u64,
    /// The connection's steps so far; a deploy adds its own.
    pub timings: crate::stack::HostTimings,
    uploaded: bool,
    installed: Option<String>,
    hello: HelloResponse,
    facts: HostFacts,
}

/// The first half of [`deploy_host`]: connect and bring the agent up to date.
pub async fn prepare_host(
    target: &Target,
    ctx: &Context,
    bundle: &Bundle,
    progress: &Progress,
) -> Result<Prepared, ControllerError> {
    let started = Instant::now();
    progress.step(Step::Connecting { address: target.display_address() });
    let transport: SharedTransport = Arc::new(open_transport(target, ctx).await?);
    let connect_ms = started.elapsed().as_millis() as u64;
    progress.step(Step::Connected);
    let checking = Instant::now();
    match ensure_agent(target, ctx, bundle, progress, transport.clone()).await {
        Ok((uploaded, installed, hello, facts, conn)) => {
            progress.step(Step::Ready { agent_version: hello.agent_version.clone() });
            let timings = crate::stack::HostTimings {
                ssh_ms: connect_ms,
                agent_ms: checking.elapsed().as_millis() as u64,
                ..Default::default()
            };
            Ok(Prepared { transport, conn, started, connect_ms, timings, uploaded, installed, hello, facts })
        }
        Err(e) => {
            transport.close().await;
            Err(e)
        }
    }
}

impl Prepared {
    /// The second half of [`deploy_host`]: the stack, if any (staged
    /// here unless `staged` says it was; its images from `sources` when the
    /// deploy ships them); then the connection is closed, unless other
    /// hosts may still load images from this one (`sources` closes it then).
    pub async fn finish(
        mut self,
        target: &Target,
        ctx: &Context,
        stack: Option<(&StackPlan, Option<Staged>)>,
        sources: Option<&ImageSources>,
        progress: &Progress,
    ) -> Result<DeployOutcome, ControllerError> {
        let stack = match stack {
            Some((plan, staged)) => {
                let staged = match staged {
                    Some(s) => Ok(s),
                    None => self.stage(target, ctx, plan, progress).await,
                };
                Some(match staged {
                    Ok(staged) => {
                        let (plan, progress) = (plan.clone(), progress.clone());
                        with_retry(target, ctx, &self.transport, &mut self.conn, &progress.clone(), move |conn| {
                            let (plan, staged, progress) = (plan.clone(), staged.clone(), progress.clone());
                            let sources = sources.cloned();
                            Box::pin(async move {
                                crate::stack::converge(conn, &plan, &staged, sources.as_ref(), &progress).await
                            })
                        })
                        .await
                    }
                    Err(e) => Err(e),
                })
            }
            None => None,
        }
        .transpose();
        match sources.filter(|s| s.is_source(&target.name)) {
            Some(sources) => sources.keep_open(self.transport.clone()),
            None => self.close().await,
        }
        let stack = stack?;
        let mut timings = stack.as_ref().map(|s| s.timings).unwrap_or_default();
        (timings.ssh_ms, timings.agent_ms, timings.secrets_ms) =
            (self.timings.ssh_ms, self.timings.agent_ms, self.timings.secrets_ms);
        Ok(DeployOutcome {
            host: target.name.clone(),
            address: target.display_address(),
            uploaded: self.uploaded,
            installed: self.installed,
            agent: agent_info(&self.hello, &self.facts),
            facts: FactsSummary::from_facts(&self.facts),
            stack,
            connect_ms: self.connect_ms,
            total_ms: self.started.elapsed().as_millis() as u64,
            timings,
        })
    }

    /// Docker and the stack's files on the host, and which of its images
    /// the host has (see [`crate::stack::stage`]).
    pub async fn stage(
        &mut self,
        target: &Target,
        ctx: &Context,
        plan: &StackPlan,
        progress: &Progress,
    ) -> Result<Staged, ControllerError> {
        let (plan, progress) = (plan.clone(), progress.clone());
        with_retry(target, ctx, &self.transport, &mut self.conn, &progress.clone(), move |conn| {
            let (plan, progress) = (plan.clone(), progress.clone());
            Box::pin(async move { crate::stack::stage(conn, &plan, &progress).await })
        })
        .await
    }

    /// Builds `tags` here for the other hosts of the deploy; what the host
    /// then has.
    pub async fn build_images(
        &mut self,
        target: &Target,
        ctx: &Context,
        plan: &StackPlan,
        tags: Vec<String>,
        progress: &Progress,
    ) -> Result<Vec<mlops_proto::v1::ImageState>, ControllerError> {
        let (plan, progress) = (plan.clone(), progress.clone());
        with_retry(target, ctx, &self.transport, &mut self.conn, &progress.clone(), move |conn| {
            let (plan, tags, progress) = (plan.clone(), tags.clone(), progress.clone());
            Box::pin(async move { crate::images::build(conn, &plan, tags, &progress).await })
        })
        .await
    }

    /// The agent's client, for other hosts' calls to it (image shipping).
    pub fn client(&mut self) -> mlops_proto::v1::agent_client::AgentClient<tonic::transport::Channel> {
        self.conn.raw().clone()
    }

    pub async fn close(&self) {
        self.transport.close().await;
    }

    /// The connection to the host, for keeping it open after this.
    /// The host's architecture, as its agent reports it (`x86_64`, ...).
    pub fn arch(&self) -> &str {
        &self.facts.arch
    }

    pub fn transport(&self) -> SharedTransport {
        self.transport.clone()
    }
}

/// Runs a step of the stack; when the connection to the agent breaks
/// mid-way (not an answer from the agent: the tunnel or HTTP/2 connection
/// itself), opens a new one and runs it again. Every step is idempotent,
/// and the agent drops the first attempt (and its lock) once it sees its
/// client gone; until it has, the retry may meet that lock, so it waits a
/// little for it.
async fn with_retry<T>(
    target: &Target,
    ctx: &Context,
    transport: &SharedTransport,
    conn: &mut AgentConn,
    progress: &Progress,
    mut step: impl for<'c> FnMut(&'c mut AgentConn) -> futures::future::BoxFuture<'c, Result<T, ControllerError>>,
) -> Result<T, ControllerError> {
    let first = match step(conn).await {
        Err(e) if e.is_transport_failure() => e,
        other => return other,
    };
    tracing::warn!(host = %target.name, "connection to the agent broke ({first}); retrying on a new one");
    progress.step(Step::Retry { message: format!("the connection to the agent broke ({first}); reconnecting") });
    let mut last = first;
    for attempt in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(300 * (attempt + 1))).await;
        let mut fresh = match AgentConn::connect(transport.clone(), target.agent_port, &ctx.tls).await {
            Ok(c) => c,
            Err(e) => {
                last = e;
                continue;
            }
        };
        match step(&mut fresh).await {
            Err(e) if e.failure_kind() == Some(mlops_proto::v1::FailureKind::StackLocked) => last = e,
            Err(e) if e.is_transport_failure() => last = e,
            other => {
                *conn = fresh;
                return other;
            }
        }
    }
    Err(last)
}

/// Connects to the agent already running on `target` (no install), and
/// checks it speaks at least this controller's API level.
pub async fn connect_agent(target: &Target, ctx: &Context) -> Result<(SharedTransport, AgentConn), ControllerError> {
    let transport: SharedTransport = Arc::new(open_transport(target, ctx).await?);
    let mut conn = AgentConn::connect(transport.clone(), target.agent_port, &ctx.tls).await?;
    let hello = conn.hello().await?;
    if hello.api_level < mlops_proto::API_LEVEL {
        transport.close().await;
        return Err(ControllerError::AgentTooOld {
            host: target.name.clone(),
            level: hello.api_level,
            needed: mlops_proto::API_LEVEL,
        });
    }
    Ok((transport, conn))
}

/// What the agent answering on the host (if any) runs.
enum Running {
    /// It refuses this controller: its operator was removed.
    Refused(ControllerError),
    /// Our binary, our configuration, our API level: nothing to do.
    Current(Box<(HelloResponse, HostFacts, AgentConn)>),
    /// It answers, but must be restarted; the reason says why.
    Stale(String),
    /// Nothing answers (not installed, stopped, crashed, or not ours).
    Down(String),
}

/// Asks the agent first: a current agent answers `Hello` with our binary
/// and configuration hashes, and then the deploy is one SSH connection and
/// one tunnel, with no command run on the host.
async fn check_running(
    transport: &SharedTransport,
    target: &Target,
    ctx: &Context,
    bundle: &Bundle,
    binary: &AgentBinary,
) -> Running {
    let answer = async {
        let mut conn = AgentConn::connect(transport.clone(), target.agent_port, &ctx.tls).await?;
        let hello = conn.hello().await?;
        Ok::<_, ControllerError>((conn, hello))
    };
    let (mut conn, hello) = match tokio::time::timeout(std::time::Duration::from_secs(10), answer).await {
        Ok(Ok(x)) => x,
        Ok(Err(e @ ControllerError::Revoked { .. })) => return Running::Refused(e),
        Ok(Err(e)) => return Running::Down(error_chain(&e)),
        Err(_) => return Running::Down("no answer within 10 s".into()),
    };
    if hello.api_level != mlops_proto::API_LEVEL {
        return Running::Stale(format!(
            "agent speaks API level {} (controller {})",
            hello.api_level,
            mlops_proto::API_LEVEL
        ));
    }
    if hello.binary_sha256 != binary.sha256 {
        return Running::Stale("running agent is an older binary".into());
    }
    if hello.config_sha256 != bundle.sha256 {
        return Running::Stale("configuration changed".into());
    }
    if hello.crl_number < bundle.crl_number {
        return Running::Stale("its revocation list is older (an operator was removed)".into());
    }
    if hello.crl_number > bundle.crl_number {
        adopt_crl(ctx, &target.name, &hello);
    }
    // The configuration hash leaves the host's certificate out (operators
    // issue their own): one close to its end is replaced here.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if hello.cert_not_after_unix != 0 && hello.cert_not_after_unix < now + RENEW_WITHIN_SECS {
        return Running::Stale("its certificate expires within 30 days".into());
    }
    match conn.facts().await {
        Ok(facts) => Running::Current(Box::new((hello, facts, conn))),
        Err(e) => Running::Down(error_chain(&e)),
    }
}

async fn ensure_agent(
    target: &Target,
    ctx: &Context,
    bundle: &Bundle,
    progress: &Progress,
    transport: SharedTransport,
) -> Result<(bool, Option<String>, HelloResponse, HostFacts, AgentConn), ControllerError> {
    let host = target.name.clone();
    let binary = ctx.binary.as_ref().expect("deploy has an agent binary");
    let running = match check_running(&transport, target, ctx, bundle, binary).await {
        Running::Current(answer) => {
            progress.step(Step::UpToDate);
            let (hello, facts, conn) = *answer;
            return Ok((false, None, hello, facts, conn));
        }
        // A removed operator does not get to re-key the agent (SSH would
        // let it; it would lock the other operators out until they deploy).
        Running::Refused(e) => return Err(e),
        other => other,
    };

    let probe = run_probe(&transport, &host).await?;
    progress.step(Step::Probed {
        os: probe.os.clone(),
        arch: probe.arch.clone(),
        service_manager: probe.service_manager.clone(),
    });
    check_probe(&probe, target, Some(binary))?;
    // An agent another controller installed is never re-keyed implicitly:
    // that would lock its controller out (and a platform's credentials
    // live with that controller today).
    if let Some(theirs) = &probe.ca_pem
        && !shares_a_ca(theirs, &ctx.our_cas_pem)
        && !ctx.take_over
    {
        return Err(ControllerError::ForeignAgent { host });
    }
    // The same, when the agent is not running to say so: its list revokes us.
    if let (Some(crl), Some(state)) = (&probe.crl_pem, &ctx.state)
        && !crl.trim().is_empty()
        && crate::client::crl_revokes_us(&state.trusted_pem()?, crl, &state.client_identity()?)
    {
        return Err(ControllerError::Revoked { host });
    }
    let sudo = probe.needs_sudo();

    let mut uploaded = false;
    if probe.binary_sha256.as_deref() != Some(binary.sha256.as_str()) {
        progress.step(Step::Uploading { bytes: binary.bytes.len() as u64 });
        upload(&transport, &host, binary, sudo).await?;
        uploaded = true;
        progress.step(Step::Uploaded);
    }

    let reason = if probe.binary_sha256.is_none() {
        "first install".to_string()
    } else if uploaded {
        "agent binary changed".to_string()
    } else if probe.bundle_sha256.as_deref() != Some(bundle.sha256.as_str()) {
        "configuration changed".to_string()
    } else {
        match running {
            Running::Stale(reason) => reason,
            Running::Down(why) => {
                tracing::debug!(%host, "agent not answering: {why}");
                "agent was not running".to_string()
            }
            Running::Current(_) | Running::Refused(_) => unreachable!("returned above"),
        }
    };
    install(&transport, &host, bundle, sudo, &reason, progress).await?;

    progress.step(Step::Handshake);
    let mut conn = AgentConn::connect(transport.clone(), target.agent_port, &ctx.tls).await?;
    let hello = conn.hello().await?;
    if hello.binary_sha256 != binary.sha256 || hello.config_sha256 != bundle.sha256 {
        return Err(ControllerError::StaleAgent {
            host,
            running: short(&hello.binary_sha256),
            expected: short(&binary.sha256),
        });
    }
    let facts = conn.facts().await?;
    Ok((uploaded, Some(reason), hello, facts, conn))
}

/// Keeps a newer revocation list an agent reports (an operator was removed
/// by another controller) once it checks the root signed it, so this
/// controller spreads it to the hosts it deploys next and refuses agents
/// keyed by the removed operator.
fn adopt_crl(ctx: &Context, host: &str, hello: &HelloResponse) {
    let Some(state) = &ctx.state else { return };
    match state.ca.adopt_crl(&hello.crl_pem) {
        Ok(true) => {
            tracing::info!(%host, number = hello.crl_number, "adopted the newer revocation list the agent holds");
        }
        Ok(false) => {
            tracing::warn!(%host, number = hello.crl_number, "the agent reports a revocation list the root did not sign, or not a newer one; ignored");
        }
        Err(e) => tracing::warn!(%host, "cannot keep the agent's revocation list: {e}"),
    }
}

/// An agent certificate ending within this many seconds is replaced.
const RENEW_WITHIN_SECS: i64 = 30 * 86_400;

/// Whether two PEM bundles have a certificate in common.
fn shares_a_ca(a: &str, b: &str) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ders = |pem: &str| -> Vec<Vec<u8>> {
        CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).map(|c| c.to_vec()).collect()
    };
    let theirs = ders(a);
    ders(b).iter().any(|c| theirs.contains(c))
}

fn short(sha: &str) -> String {
    sha.chars().take(12).collect()
}

pub async fn run_probe(transport: &Transport, host: &str) -> Result<Probe, ControllerError> {
    let out = transport.exec(&probe_script(), None, false).await?;
    Probe::parse(&out.stdout_str()).ok_or_else(|| ControllerError::Probe {
        host: host.to_string(),
        message: format!(
            "unexpected output (exit {}): {}{}",
            out.status.map_or("none".into(), |s| s.to_string()),
            out.stdout_str().trim(),
            out.stderr_str().trim()
        ),
    })
}

fn check_probe(probe: &Probe, target: &Target, binary: Option<&AgentBinary>) -> Result<(), ControllerError> {
    let host = target.name.clone();
    if probe.os != "Linux" {
        return Err(ControllerError::UnsupportedOs { host, os: probe.os.clone() });
    }
    if let Some(binary) = binary
        && probe.arch != binary.arch
    {
        return Err(ControllerError::ArchMismatch {
            host,
            host_arch: probe.arch.clone(),
            binary_arch: binary.arch.to_string(),
        });
    }
    if let Some(binary) = binary
        && let Some(needed) = &binary.glibc
        && let Some(have) = &probe.glibc
        && crate::agent_binary::version_lt(have, needed)
    {
        return Err(ControllerError::GlibcTooOld {
            host,
            have: have.clone(),
            needed: needed.clone(),
            path: binary.path.clone(),
        });
    }
    let user = target.user().map_or_else(|| std::env::var("USER").unwrap_or_default(), str::to_string);
    match probe.sudo.as_str() {
        "password" => Err(ControllerError::SudoNeedsPassword { host, user }),
        "missing" => Err(ControllerError::NoSudo { host, user }),
        _ => Ok(()),
    }
}

async fn upload(transport: &Transport, host: &str, binary: &AgentBinary, sudo: bool) -> Result<(), ControllerError> {
    // Streamed to a temporary file beside the target, checked, then renamed:
    // the installed binary is either the old one or the complete new one.
    let script = format!(
        r#"set -e
umask 022
mkdir -p {dir}
tmp={dir}/.mlops-agent.upload.$$
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
got=$(sha256sum "$tmp" | cut -d' ' -f1)
if [ "$got" != "{sha}" ]; then echo "checksum mismatch after upload: got $got, expected {sha}" >&2; exit 3; fi
chmod 0755 "$tmp"
mv -f "$tmp" {bin}
trap - EXIT
"#,
        dir = layout::BINARY_DIR,
        bin = layout::BINARY,
        sha = binary.sha256,
    );
    let out = transport.exec(&script, Some(&binary.bytes), sudo).await?;
    if !out.success() {
        return Err(ControllerError::Upload { host: host.to_string(), message: failure_text(&out) });
    }
    Ok(())
}

async fn install(
    transport: &Transport,
    host: &str,
    bundle: &Bundle,
    sudo: bool,
    reason: &str,
    progress: &Progress,
) -> Result<(), ControllerError> {
    progress.step(Step::Installing { reason: reason.to_string() });
    let out = transport.exec(&format!("exec {} install", layout::BINARY), Some(&bundle.bytes), sudo).await?;
    if !out.success() {
        return Err(ControllerError::Install { host: host.to_string(), message: failure_text(&out) });
    }
    let pid = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v["pid"].as_i64());
    progress.step(Step::Installed { pid });
    Ok(())
}

fn failure_text(out: &mlops_ssh::ExecOutput) -> String {
    let text = format!("{}{}", out.stderr_str().trim(), out.stdout_str().trim());
    let text = text.trim().trim_start_matches("error: ");
    match out.status {
        Some(code) if text.is_empty() => format!("exit status {code}"),
        Some(_) => text.to_string(),
        None => format!("killed: {text}"),
    }
}

/// What `status` learns about one host.
#[derive(Debug, Clone, Serialize)]
pub struct StatusOutcome {
    pub host: String,
    pub address: String,
    /// The host answered (SSH, or this machine).
    pub reachable: bool,
    /// The agent answered over mTLS.
    pub agent: Option<AgentInfo>,
    pub facts: Option<FactsSummary>,
    /// Why the agent or host did not answer.
    pub error: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

/// Connects and asks the agent; never installs anything.
/// With `project`, also lists that stack's services on the same connection
/// (`None` when not asked or the agent did not answer).
pub async fn status_host(
    target: &Target,
    ctx: &Context,
    project: Option<&str>,
) -> (StatusOutcome, Option<Result<crate::stack::StackState, String>>) {
    let mut out = StatusOutcome {
        host: target.name.clone(),
        address: target.display_address(),
        reachable: false,
        agent: None,
        facts: None,
        error: None,
        hint: None,
    };
    let transport: SharedTransport = match open_transport(target, ctx).await {
        Ok(t) => Arc::new(t),
        Err(e) => {
            (out.error, out.hint) = (Some(error_chain(&e)), e.hint());
            return (out, None);
        }
    };
    out.reachable = true;
    let answer = async {
        let mut conn = AgentConn::connect(transport.clone(), target.agent_port, &ctx.tls).await?;
        let hello = conn.hello().await?;
        let facts = conn.facts_with_disk().await?;
        Ok::<_, ControllerError>((hello, facts, conn))
    }
    .await;
    let mut services = None;
    match answer {
        Ok((hello, facts, mut conn)) => {
            out.agent = Some(agent_info(&hello, &facts));
            out.facts = Some(FactsSummary::from_facts(&facts));
            if let Some(p) = project {
                services = Some(crate::stack::status(&mut conn, p).await.map_err(|e| error_chain(&e)));
            }
        }
        Err(e) => (out.error, out.hint) = (Some(error_chain(&e)), e.hint()),
    }
    transport.close().await;
    (out, services)
}

/// What `agent uninstall` did on one host.
#[derive(Debug, Clone, Serialize)]
pub struct UninstallOutcome {
    pub host: String,
    pub was_installed: bool,
    pub removed: Vec<String>,
}

pub async fn uninstall_host(
    target: &Target,
    ctx: &Context,
    keep_state: bool,
) -> Result<UninstallOutcome, ControllerError> {
    let transport = open_transport(target, ctx).await?;
    let result = async {
        let probe = run_probe(&transport, &target.name).await?;
        check_probe(&probe, target, None)?;
        if probe.binary_sha256.is_none() {
            return Ok(UninstallOutcome { host: target.name.clone(), was_installed: false, removed: Vec::new() });
        }
        let flag = if keep_state { " --keep-state" } else { "" };
        let out = transport.exec(&format!("exec {} uninstall{flag}", layout::BINARY), None, probe.needs_sudo()).await?;
        if !out.success() {
            return Err(ControllerError::Install { host: target.name.clone(), message: failure_text(&out) });
        }
        let removed = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v["removed"].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            })
            .unwrap_or_default();
        Ok(UninstallOutcome { host: target.name.clone(), was_installed: true, removed })
    }
    .await;
    transport.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_parsing() {
        let p = Probe::parse("uid=1000\nos=Linux\narch=amd64\nsudo=ok\nbinary=abc\nmanager=daemon\n").unwrap();
        assert_eq!(p.arch, "x86_64");
        assert!(p.needs_sudo());
        assert_eq!(p.binary_sha256.as_deref(), Some("abc"));
        assert_eq!(p.bundle_sha256, None);
        assert!(Probe::parse("Welcome to the machine\n").is_none());
    }

    #[test]
    fn probe_script_runs_here() {
        let out = std::process::Command::new("sh").arg("-c").arg(probe_script()).output().unwrap();
        let p = Probe::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
        assert_eq!(p.os, "Linux");
        assert_eq!(p.arch, std::env::consts::ARCH);
    }
}
