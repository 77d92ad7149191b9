//! `mlopsctl rollback`: every host back to a revision its agent keeps, with
//! the files, model and images that revision ran; recorded as a new
//! revision. Each host's revisions are its own (`mlopsctl history`).
//!
//! Without `--to`/`--to-deploy` it undoes the last change: the newest
//! revision any host made names the last deploy; the revision before it
//! on such a host names the deploy before; every host returns to its
//! newest revision from that deploy (made or found unchanged by it). After
//! a rollout that stopped half-way, or one finished by a second deploy,
//! every host is back where the whole platform was before; a failed
//! revision kept with `--no-rollback` is undone too. When no host has a
//! revision before the last deploy's, each returns to the one before its
//! newest.

use std::sync::Arc;

use mlops_proto::v1::{Revision, RevisionsRequest, RollbackRequest};

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
    // The last change, when no target is named: each host's revisions.
    let before = if to.to == 0 && to.to_deploy.is_none() {
        let p = project.clone();
        let listed = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
            let project = p.clone();
            async move {
                let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
                let host = conn.host().to_string();
                let reply = conn.raw().revisions(RevisionsRequest { project }).await;
                transport.close().await;
                Ok(reply.map_err(|s| ControllerError::from_status(&host, "Revisions", &s))?.into_inner().revisions)
            }
        })
        .await;
        if !listed.failed.is_empty() {
            // Undoing a change on some hosts only would split them.
            return Ok((project, HostResults { ok: Vec::new(), failed: listed.failed }));
        }
        deploy_before_last(&listed.ok)
    } else {
        None
    };
    let mut request = request;
    if let Some(before) = before {
        report.info(&format!("undoing the last deploy: every host back to its revision from deploy {before}"));
        request.to_deploy = before;
    }
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

/// The deploy before the last one (see the module docs), when a host
/// keeps a revision of it.
pub fn deploy_before_last(hosts: &[(String, Vec<Revision>)]) -> Option<String> {
    let newest = |revs: &[Revision]| revs.iter().max_by_key(|r| r.number).cloned();
    let last = hosts.iter().filter_map(|(_, revs)| newest(revs)).max_by_key(|r| r.unix_ms)?;
    hosts
        .iter()
        .filter(|(_, revs)| newest(revs).is_some_and(|n| n.deploy_id == last.deploy_id))
        .filter_map(|(_, revs)| {
            let mut sorted: Vec<&Revision> = revs.iter().collect();
            sorted.sort_by_key(|r| r.number);
            sorted.iter().rev().nth(1).map(|r| (r.unix_ms, r.deploy_id.clone()))
        })
        .filter(|(_, d)| !d.is_empty())
        .max()
        .map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(number: u64, unix_ms: u64, deploy: &str) -> Revision {
        Revision { number, unix_ms, deploy_id: deploy.into(), ..Default::default() }
    }

    #[test]
    fn the_last_change_is_undone_everywhere() {
        // A rollout of d2 stopped: a took it, b failed and returned to d1,
        // c was never reached.
        let stopped = vec![
            ("a".to_string(), vec![rev(1, 10, "d1"), rev(2, 50, "d2")]),
            ("b".to_string(), vec![rev(1, 11, "d1")]),
            ("c".to_string(), vec![rev(1, 12, "d1")]),
        ];
        assert_eq!(deploy_before_last(&stopped).as_deref(), Some("d1"));
        // d3 finished it: a found itself unchanged, b and c took it.
        let finished = vec![
            ("a".to_string(), vec![rev(1, 10, "d1"), rev(2, 50, "d2")]),
            ("b".to_string(), vec![rev(1, 11, "d1"), rev(2, 60, "d3")]),
            ("c".to_string(), vec![rev(1, 12, "d1"), rev(2, 61, "d3")]),
        ];
        assert_eq!(deploy_before_last(&finished).as_deref(), Some("d1"));
        // Nothing before: each host goes one back on its own.
        assert_eq!(deploy_before_last(&[("a".to_string(), vec![rev(1, 10, "d1")])]), None);
        assert_eq!(deploy_before_last(&[]), None);
    }
}
