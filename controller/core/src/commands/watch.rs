//! `mlopsctl watch`: a stack's state and health transitions, as Docker
//! reports them, from every host, until the streams end or the caller
//! stops it.

use std::sync::Arc;

use mlops_proto::v1::HealthEvent;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::stack;

/// Calls `on_event(host, event)` for each event from each host.
pub async fn watch(
    setup: &Setup,
    opts: &StackOptions,
    report: Arc<dyn Report>,
    on_event: impl Fn(&str, &HealthEvent) + Send + Sync + 'static,
) -> Result<HostResults<()>, ControllerError> {
    let project = opts.project(&setup.state)?;
    let on_event = Arc::new(on_event);
    Ok(per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let (project, on_event) = (project.clone(), on_event.clone());
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let result = async {
                let mut stream = stack::watch_health(&mut conn, &project).await?;
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => on_event(&target.name, &ev),
                        Ok(None) => return Ok(()),
                        Err(s) => return Err(ControllerError::from_status(&target.name, "WatchHealth", &s)),
                    }
                }
            }
            .await;
            transport.close().await;
            result
        }
    })
    .await)
}
