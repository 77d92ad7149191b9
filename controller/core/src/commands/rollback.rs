//! `mlopsctl rollback`: every host back to a revision its agent keeps (the
//! one before the newest, a number, or the newest of a deploy id), with
//! the files, model and images that revision ran; recorded as a new
//! revision. Each host's revisions are its own (`mlopsctl history`).

use std::sync::Arc;

use mlops_proto::v1::RollbackRequest;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::stack;

/// Which revision to return to.
#[derive(Debug, Clone, Default)]
pub struct RollbackOptions {
    /// A revision number (0: the one before the newest, on each host).
    pub to: u64,
    /// A deploy id instead (each host's newest revision from that deploy).
    pub to_deploy: Option<String>,
    pub health_timeout: u32,
    pub min_healthy_seconds: u32,
}

/// The project, and each host's summary line.
pub async fn rollback(
    setup: &Setup,
    opts: &StackOptions,
    to: &RollbackOptions,
    report: Arc<dyn Report>,
) -> Result<(String, HostResults<String>), ControllerError> {
    let project = opts.project(&setup.state)?;
    let request = RollbackRequest {
        project: project.clone(),
        to: to.to,
        to_deploy: to.to_deploy.clone().unwrap_or_default(),
        holder: stack::holder(),
        health_timeout_seconds: to.health_timeout,
        min_healthy_seconds: to.min_healthy_seconds,
    };
    let hosts = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, progress| {
        let request = request.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let host = conn.host().to_string();
            let result = async {
                let stream = conn
                    .raw()
                    .rollback(request)
                    .await
                    .map_err(|s| ControllerError::from_status(&host, "Rollback", &s))?
                    .into_inner();
                Ok(stack::follow(&host, "Rollback", stream, &progress).await?.detail)
            }
            .await;
            transport.close().await;
            result
        }
    })
    .await;
    Ok((project, hosts))
}
