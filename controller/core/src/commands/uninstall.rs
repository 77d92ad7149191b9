//! `mlopsctl agent uninstall`: the agent stopped and removed from every host.

use std::sync::Arc;

use super::Setup;
use crate::bootstrap::{self, UninstallOutcome};
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;

pub async fn uninstall(setup: &Setup, keep_state: bool, report: Arc<dyn Report>) -> HostResults<UninstallOutcome> {
    per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| async move {
        bootstrap::uninstall_host(&target, &ctx, keep_state).await
    })
    .await
}
