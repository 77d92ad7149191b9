//! Phase 4: the plan carried out in dependency order. Before a service is
//! touched, each of its `depends_on` conditions must hold (started,
//! healthy, completed successfully); then its stale containers go and its
//! container is kept, started, or created from the model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, Mount as DockerMount, MountType,
    NetworkConnectRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{CreateContainerOptionsBuilder, StartContainerOptions};
use mlops_proto::stack::{Condition, MountKind, Service, Stack, labels};

use super::health::{start_period, wait_for};
use super::orphans::remove_container;
use super::plan::{Action as PlanAction, Plan};
use super::resolve_source;
use crate::engine::{Action, EngineError, Events};

/// Each service's container ID, and whether this converge created,
/// replaced or started it.
pub type Started = BTreeMap<String, (String, bool)>;

pub async fn run(
    docker: &Docker,
    stack: &Stack,
    plan: &Plan,
    files_dir: &Path,
    health_timeout: Duration,
    ev: &Events,
) -> Result<Started, EngineError> {
    let mut ids: Started = BTreeMap::new();
    for sp in &plan.services {
        let name = &sp.service;
        let svc = &stack.services[name];
        for (dep, cond) in &svc.depends_on {
            let (dep_id, _) = &ids[dep];
            if *cond != Condition::ServiceStarted {
                let what = match cond {
                    Condition::ServiceHealthy => "healthy",
                    Condition::ServiceCompletedSuccessfully => "completed",
                    Condition::ServiceStarted => "started",
                };
                ev.say(name, Action::Waiting, format!("for {dep} ({what})")).await;
            }
            wait_for(docker, dep, dep_id, *cond, start_period(&stack.services[dep]), health_timeout).await?;
        }
        for id in &sp.stale {
            remove_container(docker, id).await?;
        }
        match &sp.action {
            PlanAction::Keep { id, state } => {
                ev.say(name, Action::Unchanged, state.clone()).await;
                ids.insert(name.clone(), (id.clone(), false));
            }
            PlanAction::Start { id, was } => {
                ev.say(name, Action::Started, format!("was {was}")).await;
                start_container(docker, svc, name, id).await?;
                ids.insert(name.clone(), (id.clone(), true));
            }
            PlanAction::Create | PlanAction::Recreate => {
                let body = container_body(stack, name, &sp.hash, files_dir)?;
                let cname = stack.container_name(name);
                let created = docker
                    .create_container(Some(CreateContainerOptionsBuilder::new().name(&cname).build()), body)
                    .await?;
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
                start_container(docker, svc, name, &created.id).await?;
                let action = if sp.action == PlanAction::Create { Action::Created } else { Action::Recreated };
                ev.say(name, action, cname).await;
                ids.insert(name.clone(), (created.id, true));
            }
        }
    }
    Ok(ids)
}

/// Starts a container. When the engine refuses and the service publishes
/// ports, each port is tried: one another process holds becomes a
/// [`EngineError::PortInUse`] naming it, rather than the engine's message.
async fn start_container(docker: &Docker, svc: &Service, service: &str, id: &str) -> Result<(), EngineError> {
    let Err(e) = docker.start_container(id, None::<StartContainerOptions>).await else { return Ok(()) };
    for p in &svc.ports {
        let Some(port) = p.host_port else { continue };
        let ip = if p.host_ip.is_empty() { "0.0.0.0" } else { p.host_ip.as_str() };
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else { continue };
        let addr = std::net::SocketAddr::new(ip, port);
        let taken = if p.protocol == "udp" {
            std::net::UdpSocket::bind(addr).err()
        } else {
            std::net::TcpListener::bind(addr).err()
        }
        .is_some_and(|err| err.kind() == std::io::ErrorKind::AddrInUse);
        if taken {
            return Err(EngineError::PortInUse {
                service: service.to_string(),
                address: addr.to_string(),
                port,
                holder: crate::facts::port_holder(port, p.protocol == "udp").unwrap_or_default(),
            });
        }
    }
    Err(e.into())
}

/// The container a service's model describes, labelled with its project,
/// service and config hash.
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
                let src = resolve_source(files_dir, &m.source, &format!("services.{name}.volumes"))?;
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
