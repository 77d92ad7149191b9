//! `mlopsctl history`: the revisions each host keeps of the stack (what
//! `rollback` can return to; the agent's `engine::revisions`) and what was
//! done to it, by which operator (the agent's `history` module).

use std::sync::Arc;

use mlops_proto::v1::{HistoryEntry, HistoryRequest, Revision, RevisionsRequest};

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;

/// One host's record of the stack.
#[derive(Debug, Clone, Default)]
pub struct HostHistory {
    /// Kept revisions, oldest first; the newest runs.
    pub revisions: Vec<Revision>,
    /// The newest entries, oldest first.
    pub entries: Vec<HistoryEntry>,
}

/// The kept revisions and the newest `limit` entries per host (all the
/// agent keeps with 0).
pub async fn history(
    setup: &Setup,
    opts: &StackOptions,
    limit: u32,
    report: Arc<dyn Report>,
) -> Result<(String, HostResults<HostHistory>), ControllerError> {
    let project = opts.project(&setup.state)?;
    let p = project.clone();
    let results = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let project = p.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let host = conn.host().to_string();
            let revisions = conn.raw().revisions(RevisionsRequest { project: project.clone() }).await;
            let entries = conn.raw().history(HistoryRequest { project, limit }).await;
            transport.close().await;
            Ok(HostHistory {
                revisions: revisions
                    .map_err(|s| ControllerError::from_status(&host, "Revisions", &s))?
                    .into_inner()
                    .revisions,
                entries: entries.map_err(|s| ControllerError::from_status(&host, "History", &s))?.into_inner().entries,
            })
        }
    })
    .await;
    Ok((project, results))
}
