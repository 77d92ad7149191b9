//! `mlopsctl history`: what was done to the stack on each host, by which
//! operator (the agent's record, see the agent's `history` module).

use std::sync::Arc;

use mlops_proto::v1::{HistoryEntry, HistoryRequest};

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;

/// The newest `limit` entries per host (all the agent keeps with 0).
pub async fn history(
    setup: &Setup,
    opts: &StackOptions,
    limit: u32,
    report: Arc<dyn Report>,
) -> Result<(String, HostResults<Vec<HistoryEntry>>), ControllerError> {
    let project = opts.project(&setup.state)?;
    let p = project.clone();
    let results = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let project = p.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let host = conn.host().to_string();
            let reply = conn.raw().history(HistoryRequest { project, limit }).await;
            transport.close().await;
            Ok(reply.map_err(|s| ControllerError::from_status(&host, "History", &s))?.into_inner().entries)
        }
    })
    .await;
    Ok((project, results))
}
