//! `mlopsctl down`: a stack's containers and networks removed from every
//! host; its volumes only with `--volumes`.

use std::sync::Arc;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::stack;

/// The project, and each host's summary line.
pub async fn down(
    setup: &Setup,
    opts: &StackOptions,
    volumes: bool,
    report: Arc<dyn Report>,
) -> Result<(String, HostResults<String>), ControllerError> {
    let project = opts.project(&setup.state)?;
    let p = project.clone();
    let hosts = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, progress| {
        let project = p.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let r = stack::down(&mut conn, &project, volumes, &progress).await;
            transport.close().await;
            r
        }
    })
    .await;
    Ok((project, hosts))
}
