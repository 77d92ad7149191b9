//! `mlopsctl deploy`: the agent on every host (installed or upgraded only
//! where it differs), then, unless `--no-stack`, Docker, the stack's files
//! and the stack (default: the embedded platform).

use std::collections::BTreeMap;
use std::sync::Arc;

use mlops_proto::stack::Stack;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap::{self, Bundle, DeployOutcome};
use crate::fanout::{HostResults, per_host};
use crate::progress::{Report, bytes_human};
use crate::stack::{self, StackPlan};

#[derive(Debug, Clone)]
pub struct DeployOptions {
    pub stack: StackOptions,
    /// Only the agent.
    pub no_stack: bool,
    /// Install Docker where none answers (else fail).
    pub install_docker: bool,
    /// Publish the stack's ports on every address (`MLOPS_BIND_ADDRESS=0.0.0.0`).
    pub expose: bool,
    /// Seconds each service may take to become healthy.
    pub health_timeout: u32,
}

/// What `deploy` did: per host, and the stack model it deployed (for the
/// access table).
pub struct DeployReport {
    pub hosts: HostResults<DeployOutcome>,
    pub stack: Option<Stack>,
}

pub async fn deploy(
    setup: &Setup,
    opts: &DeployOptions,
    report: Arc<dyn Report>,
) -> Result<DeployReport, ControllerError> {
    // Certificates are issued before the fan-out: the CA directory is
    // written by one task only.
    let mut bundles = BTreeMap::new();
    for t in &setup.targets {
        bundles.insert(t.name.clone(), Bundle::for_target(&setup.state, t)?);
    }
    let mut stack_opts = opts.stack.clone();
    if opts.expose {
        // Read by the Compose interpolation of the stack's `ports`.
        stack_opts.vars.push(("MLOPS_BIND_ADDRESS".into(), "0.0.0.0".into()));
    }
    let loaded = if opts.no_stack { None } else { Some(stack_opts.load(&setup.state, report.as_ref())?) };
    let plan = loaded.as_ref().map(|l| StackPlan {
        project: l.stack.project.clone(),
        stack_json: serde_json::to_string(&l.stack).expect("serializable"),
        tree: l.tree.clone(),
        install_docker: opts.install_docker,
        health_timeout_seconds: opts.health_timeout,
        holder: stack::holder(),
        sync_only: false,
    });
    let binary = setup.ctx.binary.as_ref().expect("deploy loads the agent binary");
    report.info(&format!(
        "deploying agent {} ({}, sha256 {}){} to {} host(s)",
        crate::VERSION,
        bytes_human(binary.bytes.len() as u64),
        &binary.sha256[..12],
        loaded
            .as_ref()
            .map(|l| format!(
                " and stack `{}` ({} files, {})",
                l.stack.project,
                l.tree.entries.len(),
                bytes_human(l.tree.total_bytes)
            ))
            .unwrap_or_default(),
        setup.targets.len()
    ));
    let bundles = Arc::new(bundles);
    let hosts = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, progress| {
        let bundles = bundles.clone();
        let plan = plan.clone();
        async move { bootstrap::deploy_host(&target, &ctx, &bundles[&target.name], plan.as_ref(), &progress).await }
    })
    .await;
    Ok(DeployReport { hosts, stack: loaded.map(|l| l.stack) })
}
