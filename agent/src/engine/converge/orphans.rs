//! Phase 5: containers of services that left the stack are removed.

use bollard::Docker;
use bollard::query_parameters::RemoveContainerOptionsBuilder;

use super::plan::Existing;
use crate::engine::{Action, EngineError, Events};

/// Stops (with the container's own grace period: the service's
/// `stop_grace_period`, else Docker's 10 s) and removes a container with
/// its anonymous volumes.
pub async fn remove_container(docker: &Docker, id: &str) -> Result<(), EngineError> {
    // A container that is not running cannot be stopped; removal decides.
    let _ = docker.stop_container(id, None::<bollard::query_parameters::StopContainerOptions>).await;
    docker.remove_container(id, Some(RemoveContainerOptionsBuilder::new().force(true).v(true).build())).await?;
    Ok(())
}

/// Removes `orphans`; returns whether there were any.
pub async fn remove(docker: &Docker, orphans: &[Existing], ev: &Events) -> Result<bool, EngineError> {
    for c in orphans {
        remove_container(docker, &c.id).await?;
        ev.say(&c.service, Action::OrphanRemoved, "not in the stack any more").await;
    }
    Ok(!orphans.is_empty())
}
