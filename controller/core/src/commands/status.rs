//! `mlopsctl status`: each host's agent (reachable, version, uptime,
//! Docker), and with `--stack` or `--project` the stack's services, listed
//! on the same connection. Never installs anything.

use std::sync::Arc;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap::{self, StatusOutcome};
use crate::fanout::per_host;
use crate::progress::Report;
use crate::stack::{LastChange, ServiceOutcome};

/// One host's answer.
pub struct HostStatus {
    pub outcome: StatusOutcome,
    /// The stack's services, or why they could not be listed; `None` when
    /// not asked for or the agent did not answer.
    pub services: Option<Result<Vec<ServiceOutcome>, String>>,
    /// The last change to the stack on the host, and by which operator.
    pub last: Option<LastChange>,
}

impl HostStatus {
    /// The agent answered.
    pub fn ok(&self) -> bool {
        self.outcome.agent.is_some()
    }
}

/// Every target's status, in target order.
pub async fn status(
    setup: &Setup,
    opts: &StackOptions,
    report: Arc<dyn Report>,
) -> Result<Vec<HostStatus>, ControllerError> {
    let project = if opts.stack.is_some() || opts.project.is_some() { Some(opts.project(&setup.state)?) } else { None };
    let results = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let project = project.clone();
        async move {
            let (outcome, state) = bootstrap::status_host(&target, &ctx, project.as_deref()).await;
            let last = state.as_ref().and_then(|s| s.as_ref().ok()).and_then(|s| s.last.clone());
            let services = state.map(|s| s.map(|s| s.services));
            Ok::<_, ControllerError>(HostStatus { outcome, services, last })
        }
    })
    .await;
    let mut ok: std::collections::HashMap<String, HostStatus> = results.ok.into_iter().collect();
    let mut failed: std::collections::HashMap<String, ControllerError> = results.failed.into_iter().collect();
    Ok(setup
        .targets
        .iter()
        .map(|t| {
            ok.remove(&t.name).unwrap_or_else(|| {
                let e = failed.remove(&t.name);
                HostStatus {
                    outcome: StatusOutcome {
                        host: t.name.clone(),
                        address: t.display_address(),
                        reachable: false,
                        agent: None,
                        facts: None,
                        error: e.as_ref().map(ToString::to_string),
                        hint: e.as_ref().and_then(ControllerError::hint),
                    },
                    services: None,
                    last: None,
                }
            })
        })
        .collect())
}
