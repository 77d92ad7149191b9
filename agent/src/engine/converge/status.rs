//! A project's containers as they are (`StackStatus`, `Logs`, the end of a
//! converge), and `down`.

use bollard::Docker;
use bollard::query_parameters::{
    InspectContainerOptions, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, RemoveVolumeOptions,
};

use super::health::rfc3339_ms;
use super::orphans::remove_container;
use super::plan::{existing, project_filter};
use crate::engine::{Action, EngineError, Events, Outcome, ServiceStatus};

/// The state of a service's container, as the engine reports it.
pub async fn service_status(docker: &Docker, service: &str, id: &str, changed: bool) -> ServiceStatus {
    let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await.ok();
    let state = inspect.as_ref().and_then(|i| i.state.clone()).unwrap_or_default();
    ServiceStatus {
        service: service.to_string(),
        container_id: id.to_string(),
        state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        health: state.health.and_then(|h| h.status).map(|s| s.to_string()).filter(|s| s != "none").unwrap_or_default(),
        image: inspect.and_then(|i| i.config.and_then(|c| c.image)).unwrap_or_default(),
        changed,
        started_at_ms: state.started_at.as_deref().and_then(rfc3339_ms).unwrap_or(0),
    }
}

/// Every service container of a project, with state and health, by service.
pub async fn status(docker: &Docker, project: &str) -> Result<Vec<ServiceStatus>, EngineError> {
    let mut found = existing(docker, project).await?;
    found.sort_by(|a, b| a.service.cmp(&b.service).then(a.id.cmp(&b.id)));
    let mut out = Vec::new();
    for c in found {
        out.push(service_status(docker, &c.service, &c.id, false).await);
    }
    Ok(out)
}

/// Removes a project's containers and networks; its volumes only with `volumes`.
pub async fn down(docker: &Docker, project: &str, volumes: bool, ev: &Events) -> Result<Outcome, EngineError> {
    let containers = existing(docker, project).await?;
    for c in &containers {
        remove_container(docker, &c.id).await?;
        ev.say(&c.service, Action::Removed, c.names.first().cloned().unwrap_or_default()).await;
    }
    let networks =
        docker.list_networks(Some(ListNetworksOptionsBuilder::new().filters(&project_filter(project)).build())).await?;
    for n in networks {
        let name = n.name.unwrap_or_default();
        docker.remove_network(&name).await?;
        ev.say("", Action::NetworkRemoved, name).await;
    }
    if volumes {
        let list = docker
            .list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&project_filter(project)).build()))
            .await?;
        for v in list.volumes.unwrap_or_default() {
            docker.remove_volume(&v.name, None::<RemoveVolumeOptions>).await?;
            ev.say("", Action::VolumeRemoved, v.name).await;
        }
    }
    let summary = format!(
        "removed {} container(s){}",
        containers.len(),
        if volumes { " and the volumes" } else { "; volumes kept" }
    );
    Ok(Outcome { summary, ..Default::default() })
}
