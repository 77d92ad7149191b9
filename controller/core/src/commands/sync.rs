//! `mlopsctl sync`: the stack's files to every host, nothing else (no
//! container changes; directory bind mounts see the new files at once).

use std::sync::Arc;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::stack::{self, StackPlan, SyncOutcome};

pub async fn sync(
    setup: &Setup,
    opts: &StackOptions,
    report: Arc<dyn Report>,
) -> Result<HostResults<SyncOutcome>, ControllerError> {
    let mut loaded = opts.load(&setup.state, report.as_ref())?;
    // The files placement generates (scrape targets) go too; a sync of
    // files does not need the inventory to place the stack.
    if let Err(e) = loaded.place(&setup.all_hosts, &setup.state) {
        report.warn(&format!("files that depend on where services run (scrape targets) are left out: {e}"));
    }
    let plan = Arc::new(StackPlan {
        project: loaded.stack.project.clone(),
        stack_json: String::new(),
        parts: Default::default(),
        tree: loaded.tree,
        install_docker: false,
        health_timeout_seconds: 0,
        holder: stack::holder(),
        sync_only: true,
        rotating: Vec::new(),
        min_healthy_seconds: 0,
        no_rollback: false,
        deploy_id: String::new(),
        images: false,
        local_images: false,
        min_free_bytes: 0,
    });
    Ok(per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, progress| {
        let plan = plan.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let r = stack::apply(&mut conn, &plan, &progress).await;
            transport.close().await;
            r.map(|s| s.sync)
        }
    })
    .await)
}
