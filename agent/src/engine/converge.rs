//! From a stack model to running containers, changing only what differs.
//!
//! Each service gets a *config hash*: its model, the ID of its image, the
//! Docker names of its networks and volumes, the contents of the single
//! files it bind-mounts from the stack directory, and the hashes of the
//! services it depends on (so a dependant is replaced with its
//! dependency). Containers carry the hash as a label; a container whose
//! label matches is left alone. Directory bind mounts (a DAGs folder) are
//! live: their contents do not enter the hash, so a synced change reaches
//! the container without a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, Mount as DockerMount, MountType,
    NetworkConnectRequest, NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptions,
    StartContainerOptions, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use mlops_proto::stack::{Condition, MountKind, Service, Stack, labels};
use mlops_proto::v1::{ServiceState, StackEvent};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{EngineError, build, now_ms};

/// Where converge events go (the RPC stream); a closed stream is ignored.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Result<StackEvent, tonic::Status>>,
}

impl Events {
    pub fn new(tx: mpsc::Sender<Result<StackEvent, tonic::Status>>) -> Self {
        Events { tx }
    }

    pub async fn say(&self, service: &str, action: &str, detail: impl Into<String>) {
        let _ = self
            .tx
            .send(Ok(StackEvent {
                unix_ms: now_ms(),
                service: service.to_string(),
                action: action.to_string(),
                detail: detail.into(),
                error: false,
                services: Vec::new(),
            }))
            .await;
    }

    pub async fn finish(&self, detail: impl Into<String>, services: Vec<ServiceState>) {
        let _ = self
            .tx
            .send(Ok(StackEvent {
                unix_ms: now_ms(),
                service: String::new(),
                action: "done".into(),
                detail: detail.into(),
                error: false,
                services,
            }))
            .await;
    }

    /// A synchronous sink for code that cannot await (build progress).
    fn sync_sink(&self, service: &str) -> impl Fn(String) + Sync + use<> {
        let tx = self.tx.clone();
        let service = service.to_string();
        move |detail: String| {
            let _ = tx.try_send(Ok(StackEvent {
                unix_ms: now_ms(),
                service: service.clone(),
                action: "build".into(),
                detail,
                error: false,
                services: Vec::new(),
            }));
        }
    }
}

/// The labels that mark a network or volume as the project's.
fn owner_labels(project: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::PROJECT.to_string(), project.to_string()),
        (labels::MANAGED.to_string(), "true".to_string()),
    ])
}

fn project_filter(project: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![format!("{}={project}", labels::PROJECT)])])
}

/// Containers of a project, by service label.
async fn project_containers(
    docker: &Docker,
    project: &str,
) -> Result<BTreeMap<String, Vec<bollard::models::ContainerSummary>>, EngineError> {
    let options = ListContainersOptionsBuilder::new().all(true).filters(&project_filter(project)).build();
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for c in docker.list_containers(Some(options)).await? {
        let service = c.labels.as_ref().and_then(|l| l.get(labels::SERVICE)).cloned().unwrap_or_default();
        out.entry(service).or_default().push(c);
    }
    Ok(out)
}

fn resolve_source(files_dir: &Path, source: &str) -> PathBuf {
    if let Some(rest) = source.strip_prefix("~/") {
        return PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(rest);
    }
    let p = Path::new(source);
    if p.is_absolute() { p.to_path_buf() } else { files_dir.join(source.trim_start_matches("./")) }
}

/// The config hash of each service, in start order.
fn config_hashes(
    stack: &Stack,
    order: &[String],
    image_ids: &BTreeMap<String, String>,
    files_dir: &Path,
) -> Result<BTreeMap<String, String>, EngineError> {
    let mut hashes = BTreeMap::new();
    for name in order {
        let svc = &stack.services[name];
        let mut h = Sha256::new();
        let mut model = svc.clone();
        model.profiles.clear();
        h.update(serde_json::to_vec(&model).expect("serializable"));
        h.update(b"\0image=");
        h.update(image_ids[name].as_bytes());
        for net in stack.service_networks(name) {
            h.update(format!("\0net={}", stack.network_name(&net)).as_bytes());
        }
        for m in &svc.volumes {
            match m.kind {
                MountKind::Volume if !m.source.is_empty() => {
                    h.update(format!("\0vol={}", stack.volume_name(&m.source)).as_bytes());
                }
                MountKind::Bind => {
                    let src = resolve_source(files_dir, &m.source);
                    if src.is_file() {
                        h.update(format!("\0file={}=", m.source).as_bytes());
                        h.update(super::sync::hash_file(&src)?.as_bytes());
                    }
                }
                _ => {}
            }
        }
        for dep in svc.depends_on.keys() {
            h.update(format!("\0dep={dep}={}", hashes[dep]).as_bytes());
        }
        hashes.insert(name.clone(), hex::encode(h.finalize()));
    }
    Ok(hashes)
}

fn container_body(stack: &Stack, name: &str, hash: &str, files_dir: &Path) -> Result<ContainerCreateBody, EngineError> {
    let svc: &Service = &stack.services[name];
    let mut labels_map: HashMap<String, String> = svc.labels.clone().into_iter().collect();
    labels_map.insert(labels::PROJECT.into(), stack.project.clone());
    labels_map.insert(labels::SERVICE.into(), name.into());
    labels_map.insert(labels::CONFIG_HASH.into(), hash.into());
    labels_map.insert(labels::MANAGED.into(), "true".into());
    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for m in &svc.volumes {
        let mode = if m.read_only { ":ro" } else { "" };
        match m.kind {
            MountKind::Volume if m.source.is_empty() => binds.push(m.target.clone()),
            MountKind::Volume => binds.push(format!("{}:{}{mode}", stack.volume_name(&m.source), m.target)),
            MountKind::Bind => {
                let src = resolve_source(files_dir, &m.source);
                if m.source.starts_with('.') && !src.exists() {
                    return Err(EngineError::Invalid(format!(
                        "service `{name}` mounts `{}`, which is not in the stack directory ({})",
                        m.source,
                        src.display()
                    )));
                }
                binds.push(format!("{}:{}{mode}", src.display(), m.target));
            }
            MountKind::Tmpfs => mounts.push(DockerMount {
                target: Some(m.target.clone()),
                typ: Some(MountType::TMPFS),
                ..Default::default()
            }),
        }
    }
    let mut exposed = Vec::new();
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &svc.ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        exposed.push(key.clone());
        port_bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_with(Vec::new).push(PortBinding {
            host_ip: (!p.host_ip.is_empty()).then(|| p.host_ip.clone()),
            host_port: Some(p.host_port.map(|h| h.to_string()).unwrap_or_default()),
        });
    }
    let restart_policy = svc.restart.as_deref().map(|r| {
        let (name, count) = match r.split_once(':') {
            Some((n, c)) => (n, c.parse().ok()),
            None => (r, None),
        };
        RestartPolicy {
            name: Some(match name {
                "always" => RestartPolicyNameEnum::ALWAYS,
                "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
                "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
                _ => RestartPolicyNameEnum::NO,
            }),
            maximum_retry_count: count,
        }
    });
    let networks = stack.service_networks(name);
    let first = stack.network_name(&networks[0]);
    let healthcheck = svc.healthcheck.as_ref().map(|h| HealthConfig {
        test: Some(h.test.clone()),
        interval: h.interval_ms.map(|v| v as i64 * 1_000_000),
        timeout: h.timeout_ms.map(|v| v as i64 * 1_000_000),
        retries: h.retries.map(i64::from),
        start_period: h.start_period_ms.map(|v| v as i64 * 1_000_000),
        start_interval: None,
    });
    Ok(ContainerCreateBody {
        image: Some(stack.image_of(name)),
        cmd: svc.command.clone(),
        entrypoint: svc.entrypoint.clone(),
        env: Some(svc.environment.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels_map),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        healthcheck,
        user: svc.user.clone(),
        working_dir: svc.working_dir.clone(),
        hostname: Some(name.to_string()),
        host_config: Some(HostConfig {
            binds: (!binds.is_empty()).then_some(binds),
            mounts: (!mounts.is_empty()).then_some(mounts),
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            restart_policy,
            nano_cpus: svc.limits.cpus.map(|c| (c * 1e9) as i64),
            memory: svc.limits.memory_bytes,
            network_mode: Some(first.clone()),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                first,
                EndpointSettings { aliases: Some(vec![name.to_string()]), ..Default::default() },
            )])),
        }),
        ..Default::default()
    })
}

async fn remove_container(docker: &Docker, id: &str) -> Result<(), EngineError> {
    let _ = docker.stop_container(id, Some(StopContainerOptionsBuilder::new().t(10).build())).await;
    docker.remove_container(id, Some(RemoveContainerOptionsBuilder::new().force(true).v(true).build())).await?;
    Ok(())
}

/// The state of a service's container, as the API reports it.
pub async fn service_state(
    docker: &Docker,
    stack_project: &str,
    service: &str,
    id: &str,
    changed: bool,
) -> ServiceState {
    let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await.ok();
    let state = inspect.as_ref().and_then(|i| i.state.clone()).unwrap_or_default();
    let started_at_ms = state.started_at.as_deref().and_then(time_from_rfc3339_ms).unwrap_or(0);
    let _ = stack_project;
    ServiceState {
        service: service.to_string(),
        container_id: id.to_string(),
        state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        health: state.health.and_then(|h| h.status).map(|s| s.to_string()).filter(|s| s != "none").unwrap_or_default(),
        image: inspect.and_then(|i| i.config.and_then(|c| c.image)).unwrap_or_default(),
        changed,
        started_at_ms,
    }
}

/// `2024-01-02T03:04:05.123456789Z` → Unix milliseconds.
pub fn time_from_rfc3339_ms(s: &str) -> Option<u64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let rest = rest.trim_end_matches('Z');
    let (hms, frac) = rest.split_once('.').unwrap_or((rest, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms_frac: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    let ms = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms_frac;
    (y > 1970).then_some(ms as u64)
}

/// Waits until `service`'s container meets `condition`; fails fast when it
/// cannot any more (unhealthy, exited), naming the service and why.
async fn wait_for(
    docker: &Docker,
    service: &str,
    id: &str,
    condition: Condition,
    grace: Duration,
    timeout: Duration,
) -> Result<(), EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await?;
        let state = inspect.state.unwrap_or_default();
        let status = state.status.map(|s| s.to_string()).unwrap_or_default();
        let exit = state.exit_code.unwrap_or(0);
        let health = state.health.clone().and_then(|h| h.status).map(|h| h.to_string()).unwrap_or_default();
        let exited = status == "exited" || status == "dead";
        match condition {
            Condition::ServiceStarted if status == "running" || exited => return Ok(()),
            Condition::ServiceCompletedSuccessfully if exited && exit == 0 => return Ok(()),
            Condition::ServiceHealthy if health == "healthy" => return Ok(()),
            // Within the health check's start period, a failure is not yet
            // final (some engines report "unhealthy" during it anyway).
            Condition::ServiceHealthy
                if health == "unhealthy"
                    && state
                        .started_at
                        .as_deref()
                        .and_then(time_from_rfc3339_ms)
                        .is_none_or(|t| now_ms() > t + grace.as_millis() as u64) =>
            {
                let output = last_health_output(&state);
                return Err(EngineError::Failed(format!(
                    "service `{service}` is unhealthy; last health check: {output}"
                )));
            }
            _ => {}
        }
        if exited && !(condition == Condition::ServiceStarted) {
            let logs = tail_logs(docker, id, 5).await;
            return Err(EngineError::Failed(format!(
                "service `{service}` exited with code {exit}; last log lines: {logs}"
            )));
        }
        if tokio::time::Instant::now() > deadline {
            let what = match condition {
                Condition::ServiceHealthy => {
                    format!("healthy (health: {})", if health.is_empty() { "no health check" } else { &health })
                }
                Condition::ServiceCompletedSuccessfully => "completed".to_string(),
                Condition::ServiceStarted => "started".to_string(),
            };
            let mut msg = format!("service `{service}` was not {what} after {} s", timeout.as_secs());
            if health == "starting" {
                msg.push_str(&format!("; last health check: {}", last_health_output(&state)));
            }
            return Err(EngineError::Failed(msg));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn start_period(svc: &Service) -> Duration {
    Duration::from_millis(svc.healthcheck.as_ref().and_then(|h| h.start_period_ms).unwrap_or(0))
}

pub fn last_health_output(state: &bollard::models::ContainerState) -> String {
    state
        .health
        .as_ref()
        .and_then(|h| h.log.as_ref())
        .and_then(|l| l.last())
        .map(|r| format!("exit {}: {}", r.exit_code.unwrap_or(-1), r.output.clone().unwrap_or_default().trim()))
        .unwrap_or_else(|| "(no health check has run)".into())
}

async fn tail_logs(docker: &Docker, id: &str, n: usize) -> String {
    let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&n.to_string()).build();
    let mut stream = docker.logs(id, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() { "(none)".into() } else { lines.join(" | ") }
}

/// Brings the stack to the model. Returns every service's state.
pub async fn converge(
    docker: &Docker,
    stack: &Stack,
    files_dir: &Path,
    health_timeout: Duration,
    ev: &Events,
) -> Result<Vec<ServiceState>, EngineError> {
    let order = stack.start_order().map_err(EngineError::Invalid)?;
    let project = &stack.project;
    let mut changed_anything = false;

    // Networks and volumes.
    let mut wanted_networks: BTreeSet<String> = BTreeSet::new();
    for name in &order {
        wanted_networks.extend(stack.service_networks(name));
    }
    for key in &wanted_networks {
        let name = stack.network_name(key);
        let external = stack.networks.get(key).is_some_and(|n| n.external);
        if docker.inspect_network(&name, None::<bollard::query_parameters::InspectNetworkOptions>).await.is_ok() {
            continue;
        }
        if external {
            return Err(EngineError::NotFound(format!("external network `{name}` does not exist")));
        }
        let driver = stack.networks.get(key).and_then(|n| n.driver.clone()).unwrap_or_else(|| "bridge".into());
        docker
            .create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some(driver),
                labels: Some(owner_labels(project)),
                ..Default::default()
            })
            .await?;
        changed_anything = true;
        ev.say("", "network", format!("created {name}")).await;
    }
    for (key, vol) in &stack.volumes {
        let name = stack.volume_name(key);
        if docker.inspect_volume(&name).await.is_ok() {
            continue;
        }
        if vol.external {
            return Err(EngineError::NotFound(format!("external volume `{name}` does not exist")));
        }
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                driver: vol.driver.clone(),
                labels: Some(owner_labels(project)),
                ..Default::default()
            })
            .await?;
        changed_anything = true;
        ev.say("", "volume", format!("created {name}")).await;
    }

    // Images: build what changed, pull what is missing.
    let mut image_ids = BTreeMap::new();
    for name in &order {
        let svc = &stack.services[name];
        let tag = stack.image_of(name);
        if let Some(b) = &svc.build {
            let dir = resolve_source(files_dir, &b.context);
            let (dockerfile, args, target) = (b.dockerfile.clone(), b.args.clone(), b.target.clone());
            let pack_dir = dir.clone();
            let extra = if stack.options.host_ca_bundle {
                let ca = std::fs::read(build::HOST_CA_BUNDLE).map_err(|e| {
                    EngineError::Failed(format!("x-mlops.host_ca_bundle: cannot read {}: {e}", build::HOST_CA_BUNDLE))
                })?;
                vec![(build::HOST_CA_IN_CONTEXT.to_string(), ca)]
            } else {
                Vec::new()
            };
            let ctx = tokio::task::spawn_blocking(move || {
                build::pack_with(&pack_dir, &dockerfile, &args, target.as_deref(), &extra)
            })
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))??;
            let existing = docker.inspect_image(&tag).await.ok();
            let current = existing
                .as_ref()
                .and_then(|i| i.config.as_ref())
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(labels::CONTEXT_HASH))
                .is_some_and(|h| *h == ctx.hash);
            let id = if current {
                existing.and_then(|i| i.id).unwrap_or_default()
            } else {
                ev.say(name, "build", format!("building {tag}")).await;
                let say = ev.sync_sink(name);
                for base in build::base_images(&ctx.dockerfile_text, &b.args) {
                    build::ensure_base(docker, &base, stack.options.bootstrap_base_images, &say).await?;
                }
                let image_labels = BTreeMap::from([
                    (labels::PROJECT.to_string(), project.clone()),
                    (labels::CONTEXT_HASH.to_string(), ctx.hash.clone()),
                ]);
                let spec = build::BuildSpec {
                    tag: &tag,
                    dockerfile: &b.dockerfile,
                    args: &b.args,
                    target: b.target.as_deref(),
                    labels: image_labels,
                };
                let id = build::build(docker, spec, ctx, &say)
                    .await
                    .map_err(|e| EngineError::Failed(format!("service `{name}`: {e}")))?;
                changed_anything = true;
                ev.say(name, "built", tag.clone()).await;
                id
            };
            image_ids.insert(name.clone(), id);
        } else {
            let id = match docker.inspect_image(&tag).await {
                Ok(i) => i.id.unwrap_or_default(),
                Err(_) => {
                    ev.say(name, "pull", format!("pulling {tag}")).await;
                    build::pull(docker, &tag)
                        .await
                        .map_err(|e| EngineError::Failed(format!("service `{name}`: cannot pull image {tag}: {e}")))?;
                    changed_anything = true;
                    docker.inspect_image(&tag).await?.id.unwrap_or_default()
                }
            };
            image_ids.insert(name.clone(), id);
        }
    }

    let hashes = config_hashes(stack, &order, &image_ids, files_dir)?;
    let mut existing = project_containers(docker, project).await?;
    let mut ids: BTreeMap<String, (String, bool)> = BTreeMap::new();
    // Services someone waits on to complete: for them, only exit 0 will do.
    let one_shot: BTreeSet<&str> = stack
        .services
        .values()
        .flat_map(|s| s.depends_on.iter())
        .filter(|(_, c)| **c == Condition::ServiceCompletedSuccessfully)
        .map(|(d, _)| d.as_str())
        .collect();
    // A container that exited 0 and that nothing restarts has done its job
    // (an init or migration step); converge leaves it as it is.
    let completes = |svc: &Service| {
        matches!(svc.restart.as_deref(), None | Some("no") | Some("on-failure"))
            || svc.restart.as_deref().is_some_and(|r| r.starts_with("on-failure:"))
    };

    for name in &order {
        let svc = &stack.services[name];
        for (dep, cond) in &svc.depends_on {
            let (dep_id, _) = &ids[dep];
            if *cond != Condition::ServiceStarted {
                ev.say(
                    name,
                    "wait",
                    format!(
                        "for {dep} ({})",
                        match cond {
                            Condition::ServiceHealthy => "healthy",
                            Condition::ServiceCompletedSuccessfully => "completed",
                            Condition::ServiceStarted => "started",
                        }
                    ),
                )
                .await;
            }
            wait_for(docker, dep, dep_id, *cond, start_period(&stack.services[dep]), health_timeout).await?;
        }
        let hash = &hashes[name];
        let mine = existing.remove(name).unwrap_or_default();
        let (keep, stale): (Vec<_>, Vec<_>) = mine.into_iter().partition(|c| {
            c.labels.as_ref().and_then(|l| l.get(labels::CONFIG_HASH)) == Some(hash)
                && c.names
                    .as_ref()
                    .is_some_and(|n| n.iter().any(|n| n.trim_start_matches('/') == stack.container_name(name)))
        });
        for c in &stale {
            remove_container(docker, c.id.as_deref().unwrap_or_default()).await?;
        }
        if let Some(c) = keep.first() {
            let id = c.id.clone().unwrap_or_default();
            let state = c.state.map(|s| s.to_string()).unwrap_or_default();
            let inspect = docker.inspect_container(&id, None::<InspectContainerOptions>).await?;
            let exit = inspect.state.as_ref().and_then(|s| s.exit_code).unwrap_or(0);
            if state == "running" || (state == "exited" && exit == 0 && completes(svc)) {
                ev.say(name, "unchanged", state).await;
                ids.insert(name.clone(), (id, false));
                continue;
            }
            ev.say(name, "start", format!("was {state}")).await;
            docker.start_container(&id, None::<StartContainerOptions>).await?;
            changed_anything = true;
            ids.insert(name.clone(), (id, true));
            continue;
        }
        let body = container_body(stack, name, hash, files_dir)?;
        let cname = stack.container_name(name);
        let created =
            docker.create_container(Some(CreateContainerOptionsBuilder::new().name(&cname).build()), body).await?;
        for net in stack.service_networks(name).iter().skip(1) {
            docker
                .connect_network(
                    &stack.network_name(net),
                    NetworkConnectRequest {
                        container: created.id.clone(),
                        endpoint_config: Some(EndpointSettings {
                            aliases: Some(vec![name.clone()]),
                            ..Default::default()
                        }),
                    },
                )
                .await?;
        }
        docker.start_container(&created.id, None::<StartContainerOptions>).await?;
        changed_anything = true;
        ev.say(name, if stale.is_empty() { "create" } else { "recreate" }, cname).await;
        ids.insert(name.clone(), (created.id, true));
    }

    // Orphans: containers of services no longer in the stack.
    for (service, containers) in existing {
        for c in containers {
            remove_container(docker, c.id.as_deref().unwrap_or_default()).await?;
            changed_anything = true;
            ev.say(&service, "remove", "orphan: not in the stack any more").await;
        }
    }

    // Every service with a health check must be healthy; a one-shot must
    // have succeeded; everything else must still run.
    for name in &order {
        let (id, _) = &ids[name];
        let svc = &stack.services[name];
        let has_check = svc.healthcheck.as_ref().is_some_and(|h| h.test.first().is_some_and(|t| t != "NONE"));
        if has_check {
            wait_for(docker, name, id, Condition::ServiceHealthy, start_period(svc), health_timeout).await?;
            if ids[name].1 {
                ev.say(name, "healthy", "").await;
            }
        } else if one_shot.contains(name.as_str()) {
            wait_for(docker, name, id, Condition::ServiceCompletedSuccessfully, Duration::ZERO, health_timeout).await?;
        } else {
            let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await?;
            let state = inspect.state.unwrap_or_default();
            let completed = state.status.map(|s| s.to_string()).as_deref() == Some("exited")
                && state.exit_code == Some(0)
                && completes(svc);
            if state.running != Some(true) && state.restarting != Some(true) && !completed {
                let logs = tail_logs(docker, id, 5).await;
                return Err(EngineError::Failed(format!(
                    "service `{name}` is not running (exit code {}); last log lines: {logs}",
                    state.exit_code.unwrap_or(0)
                )));
            }
        }
    }

    let mut states = Vec::new();
    for name in &order {
        let (id, changed) = &ids[name];
        states.push(service_state(docker, project, name, id, *changed).await);
    }
    let changed = states.iter().filter(|s| s.changed).count();
    let summary = if changed_anything {
        format!("{changed} of {} service(s) created or replaced", states.len())
    } else {
        format!("nothing to change: {} service(s) up to date", states.len())
    };
    ev.finish(summary, states.clone()).await;
    Ok(states)
}

/// Removes a project's containers and networks; its volumes only with `volumes`.
pub async fn down(docker: &Docker, project: &str, volumes: bool, ev: &Events) -> Result<(), EngineError> {
    let containers = project_containers(docker, project).await?;
    let mut count = 0;
    for (service, list) in containers {
        for c in list {
            remove_container(docker, c.id.as_deref().unwrap_or_default()).await?;
            ev.say(
                &service,
                "remove",
                c.names.and_then(|n| n.first().cloned()).unwrap_or_default().trim_start_matches('/').to_string(),
            )
            .await;
            count += 1;
        }
    }
    let networks =
        docker.list_networks(Some(ListNetworksOptionsBuilder::new().filters(&project_filter(project)).build())).await?;
    for n in networks {
        let name = n.name.unwrap_or_default();
        docker.remove_network(&name).await?;
        ev.say("", "network", format!("removed {name}")).await;
    }
    if volumes {
        let list = docker
            .list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&project_filter(project)).build()))
            .await?;
        for v in list.volumes.unwrap_or_default() {
            docker.remove_volume(&v.name, None::<RemoveVolumeOptions>).await?;
            ev.say("", "volume", format!("removed {}", v.name)).await;
        }
    }
    ev.finish(
        format!("removed {count} container(s){}", if volumes { " and the volumes" } else { "; volumes kept" }),
        Vec::new(),
    )
    .await;
    Ok(())
}

/// Every service container of a project, with state and health.
pub async fn status(docker: &Docker, project: &str) -> Result<Vec<ServiceState>, EngineError> {
    let mut out = Vec::new();
    for (service, list) in project_containers(docker, project).await? {
        for c in list {
            out.push(service_state(docker, project, &service, c.id.as_deref().unwrap_or_default(), false).await);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(time_from_rfc3339_ms("1970-01-02T00:00:00Z"), None);
        assert_eq!(time_from_rfc3339_ms("2024-01-01T00:00:00.5Z"), Some(1_704_067_200_500));
        assert_eq!(time_from_rfc3339_ms("2026-11-27T08:30:15.123456789Z"), Some(1_795_768_215_123));
    }
}
