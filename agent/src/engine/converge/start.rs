//! Phase 4: the plan carried out in dependency order. Before a service is
//! touched, each of its `depends_on` conditions must hold (started,
//! healthy, completed successfully); then its stale containers go and its
//! container is kept, started, or created from the model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, HostConfigLogConfig, Mount as DockerMount,
    MountType, NetworkConnectRequest, NetworkingConfig, PortBinding, ResourcesUlimits, RestartPolicy,
    RestartPolicyNameEnum,
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
                let body = container_body(stack, name, &sp.hash, &sp.parts, files_dir)?;
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
fn container_body(
    stack: &Stack,
    name: &str,
    hash: &str,
    parts: &str,
    files_dir: &Path,
) -> Result<ContainerCreateBody, EngineError> {
    let svc: &Service = &stack.services[name];
    // The controller refuses these when it reads the Compose file; the
    // agent checks again, since it is what hands the container the host.
    let access = svc.host_access();
    if !access.is_empty() && !stack.options.allow_host_access {
        return Err(EngineError::bad_request(
            &format!("services.{name}"),
            format!(
                "service `{name}` asks for access to the host ({}) and the stack does not allow it (x-mlops.allow_host_access)",
                access.join("; ")
            ),
        ));
    }
    let mut labels_map: HashMap<String, String> = svc.labels.clone().into_iter().collect();
    labels_map.insert(labels::PROJECT.into(), stack.project.clone());
    labels_map.insert(labels::SERVICE.into(), name.into());
    labels_map.insert(labels::CONFIG_HASH.into(), hash.into());
    if !parts.is_empty() {
        labels_map.insert(labels::CONFIG_PARTS.into(), parts.into());
    }
    labels_map.insert(labels::MANAGED.into(), "true".into());
    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for m in &svc.volumes {
        let mode = if m.read_only { ":ro" } else { "" };
        match m.kind {
            MountKind::Volume if m.source.is_empty() => binds.push(m.target.clone()),
            MountKind::Volume => binds.push(format!("{}:{}{mode}", stack.volume_name(&m.source), m.target)),
            MountKind::Bind => {
                let field = format!("services.{name}.volumes");
                let src = resolve_source(files_dir, &m.source, &field)?;
                // A host path may be a symlink to one that gives the host
                // away: judged by where it leads.
                let real = std::fs::canonicalize(&src).unwrap_or_else(|_| src.clone());
                let in_tree = matches!(super::classify(&m.source), super::Source::InTree(_));
                if !in_tree
                    && !stack.options.allow_host_access
                    && mlops_proto::stack::is_sensitive_host_path(&real.to_string_lossy())
                {
                    return Err(EngineError::bad_request(
                        &field,
                        format!(
                            "service `{name}` mounts `{}`, which is {} on the host: it gives the host away and the stack does not allow it (x-mlops.allow_host_access)",
                            m.source,
                            real.display()
                        ),
                    ));
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
    let mut exposed: Vec<String> = svc.expose.clone();
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
    let first = networks.first().map(|n| stack.network_name(n));
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
        // The service's name unless the stack names it (placement names
        // each host's instance of a service that runs on several).
        hostname: (svc.network_mode.as_deref() != Some("host"))
            .then(|| svc.hostname.clone().unwrap_or_else(|| name.to_string())),
        host_config: Some(HostConfig {
            binds: (!binds.is_empty()).then_some(binds),
            mounts: (!mounts.is_empty()).then_some(mounts),
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            restart_policy,
            nano_cpus: svc.limits.cpus.map(|c| (c * 1e9) as i64),
            memory: svc.limits.memory_bytes,
            network_mode: first.clone().or_else(|| svc.network_mode.clone()),
            cap_add: (!svc.cap_add.is_empty()).then(|| svc.cap_add.clone()),
            cap_drop: (!svc.cap_drop.is_empty()).then(|| svc.cap_drop.clone()),
            readonly_rootfs: svc.read_only.then_some(true),
            security_opt: (!svc.security_opt.is_empty()).then(|| svc.security_opt.clone()),
            tmpfs: (!svc.tmpfs.is_empty()).then(|| {
                svc.tmpfs
                    .iter()
                    .map(|t| match t.split_once(':') {
                        Some((path, opts)) => (path.to_string(), opts.to_string()),
                        None => (t.clone(), String::new()),
                    })
                    .collect()
            }),
            init: svc.init,
            // No driver named: the engine's default driver, with the options.
            log_config: svc.logging.as_ref().map(|l| HostConfigLogConfig {
                typ: (!l.driver.is_empty()).then(|| l.driver.clone()),
                config: Some(l.options.clone().into_iter().collect()),
            }),
            ulimits: (!svc.ulimits.is_empty()).then(|| {
                svc.ulimits
                    .iter()
                    .map(|(n, l)| ResourcesUlimits { name: Some(n.clone()), soft: Some(l.soft), hard: Some(l.hard) })
                    .collect()
            }),
            shm_size: svc.shm_size,
            extra_hosts: (!svc.extra_hosts.is_empty()).then(|| svc.extra_hosts.clone()),
            privileged: svc.privileged.then_some(true),
            pid_mode: svc.pid.clone(),
            ..Default::default()
        }),
        networking_config: first.map(|first| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                first,
                EndpointSettings { aliases: Some(vec![name.to_string()]), ..Default::default() },
            )])),
        }),
        stop_timeout: svc.stop_grace_period_ms.map(|ms| ms.div_ceil(1000) as i64),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlops_proto::stack::Ulimit;

    fn stack_with(svc: Service) -> Stack {
        let mut stack = Stack { project: "p".into(), ..Default::default() };
        stack.services.insert("s".into(), Service { image: Some("img".into()), ..svc });
        stack
    }

    #[test]
    fn hardening_keys_reach_the_engine() {
        let svc = Service {
            cap_drop: vec!["ALL".into()],
            read_only: true,
            security_opt: vec!["no-new-privileges:true".into()],
            tmpfs: vec!["/tmp:size=1m".into()],
            init: Some(true),
            ulimits: [("nofile".to_string(), Ulimit { soft: 1, hard: 2 })].into(),
            shm_size: Some(1 << 20),
            stop_grace_period_ms: Some(1500),
            extra_hosts: vec!["a:10.0.0.1".into()],
            expose: vec!["9000/tcp".into()],
            ..Default::default()
        };
        let body = container_body(&stack_with(svc), "s", "h", "", Path::new("/nonexistent")).unwrap();
        let hc = body.host_config.unwrap();
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges:true".to_string()]));
        assert_eq!(hc.tmpfs.unwrap()["/tmp"], "size=1m");
        assert_eq!(hc.init, Some(true));
        assert_eq!(hc.ulimits.unwrap()[0].hard, Some(2));
        assert_eq!(hc.shm_size, Some(1 << 20));
        assert_eq!(hc.extra_hosts, Some(vec!["a:10.0.0.1".to_string()]));
        assert_eq!(body.stop_timeout, Some(2));
        assert_eq!(body.exposed_ports, Some(vec!["9000/tcp".to_string()]));
    }

    #[test]
    fn host_access_needs_the_stacks_opt_in() {
        let svc = Service { privileged: true, network_mode: Some("host".into()), ..Default::default() };
        let mut stack = stack_with(svc);
        let e = container_body(&stack, "s", "h", "", Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(e.contains("privileged: true") && e.contains("network_mode: host"), "{e}");
        stack.options.allow_host_access = true;
        let body = container_body(&stack, "s", "h", "", Path::new("/nonexistent")).unwrap();
        let hc = body.host_config.unwrap();
        assert_eq!((hc.privileged, hc.network_mode.as_deref()), (Some(true), Some("host")));
        assert!(body.networking_config.is_none() && body.hostname.is_none());
    }
}
