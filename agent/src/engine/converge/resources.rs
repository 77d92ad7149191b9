//! Phase 1: the stack's networks and volumes exist (created with the
//! project's labels, so that `down` finds them); external ones must exist
//! already.

use std::collections::{BTreeSet, HashMap};

use bollard::Docker;
use bollard::models::{NetworkCreateRequest, VolumeCreateRequest};
use bollard::query_parameters::InspectNetworkOptions;
use mlops_proto::stack::{Stack, labels};

use crate::engine::{Action, EngineError, Events};

/// The labels that mark a network or volume as the project's.
pub fn owner_labels(project: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::PROJECT.to_string(), project.to_string()),
        (labels::MANAGED.to_string(), "true".to_string()),
    ])
}

/// Creates what is missing; returns whether anything was created.
pub async fn ensure(docker: &Docker, stack: &Stack, order: &[String], ev: &Events) -> Result<bool, EngineError> {
    let mut changed = false;
    let wanted: BTreeSet<String> = order.iter().flat_map(|name| stack.service_networks(name)).collect();
    for key in &wanted {
        let name = stack.network_name(key);
        let external = stack.networks.get(key).is_some_and(|n| n.external);
        if docker.inspect_network(&name, None::<InspectNetworkOptions>).await.is_ok() {
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
                labels: Some(owner_labels(&stack.project)),
                ..Default::default()
            })
            .await?;
        changed = true;
        ev.say("", Action::NetworkCreated, name).await;
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
                labels: Some(owner_labels(&stack.project)),
                ..Default::default()
            })
            .await?;
        changed = true;
        ev.say("", Action::VolumeCreated, name).await;
    }
    Ok(changed)
}
