//! `mlopsctl deploy`: the agent on every host (installed or upgraded only
//! where it differs), then, unless `--no-stack`, Docker, the stack's files
//! and the stack (default: the embedded platform).

use std::collections::BTreeMap;
use std::sync::Arc;

use mlops_inventory::Target;
use mlops_proto::stack::Stack;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap::{self, Bundle, DeployOutcome};
use crate::fanout::{HostResults, per_host, per_host_with};
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
    /// Secrets a rotation is changing (`secrets rotate`; empty otherwise).
    pub rotating: Vec<String>,
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
    let bundles = Bundle::for_targets(&setup.state, &setup.targets)?;
    let mut stack_opts = opts.stack.clone();
    if opts.expose {
        // Read by the Compose interpolation of the stack's `ports`.
        stack_opts.vars.push(("MLOPS_BIND_ADDRESS".into(), "0.0.0.0".into()));
    }
    // Read (and checked) before any host is touched; its secrets are
    // stand-ins until the hosts have been asked for theirs.
    let loaded = if opts.no_stack { None } else { Some(stack_opts.load(&setup.state, report.as_ref())?) };
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

    // 1. Every agent up to date, and what each host holds of the project's
    //    secrets; connections stay open.
    let bundles = Arc::new(bundles);
    let project = loaded.as_ref().map(|l| l.stack.project.clone());
    let prepared = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, progress| {
        let (bundles, project) = (bundles.clone(), project.clone());
        async move {
            let mut host = bootstrap::prepare_host(&target, &ctx, &bundles[&target.name], &progress).await?;
            let held = match &project {
                Some(p) => match crate::secrets::held_by(&mut host.conn, p).await {
                    Ok(held) => held,
                    Err(e) => {
                        host.close().await;
                        return Err(e);
                    }
                },
                None => BTreeMap::new(),
            };
            Ok((host, held))
        }
    })
    .await;

    // 2. The secrets, decided from what the hosts hold. When they cannot
    //    be, every host fails with the reason and nothing more is done.
    let mut prepared = prepared;
    let (plan, stack) = match loaded {
        None => (None, None),
        Some(loaded) => {
            let project = loaded.stack.project.clone();
            let held: Vec<(String, BTreeMap<String, String>)> =
                prepared.ok.iter().map(|(name, (_, held))| (name.clone(), held.clone())).collect();
            let unheard: Vec<String> = prepared.failed.iter().map(|(name, _)| name.clone()).collect();
            let cache = crate::secrets::load(&setup.state.path, &project)?;
            let names = &loaded.stack.options.secrets;
            match crate::secrets::reconcile(&project, names, &held, &cache, unheard.is_empty(), &unheard) {
                Err(conflict) => {
                    for (name, (host, _)) in std::mem::take(&mut prepared.ok) {
                        host.close().await;
                        prepared.failed.push((name, conflict.clone().into()));
                    }
                    prepared.failed.sort_by_key(|(n, _)| setup.targets.iter().position(|t| t.name == *n));
                    let hosts = HostResults { ok: Vec::new(), failed: prepared.failed };
                    return Ok(DeployReport { hosts, stack: None });
                }
                Ok(resolved) => {
                    if !resolved.generated.is_empty() {
                        report.info(&format!(
                            "generated {} for stack `{project}`; every host keeps them (`mlopsctl secrets` shows them)",
                            resolved.generated.join(", ")
                        ));
                    }
                    if !resolved.from_cache.is_empty() {
                        report.info(&format!(
                            "no host holds {} of stack `{project}` yet: this controller's copy is stored on them",
                            resolved.from_cache.join(", ")
                        ));
                    }
                    crate::secrets::store_cache(&setup.state.path, &project, &resolved.values)?;
                    let model = stack_opts.load_model_with(&setup.state, &Quiet, &resolved.values)?;
                    let plan = StackPlan {
                        project: project.clone(),
                        stack_json: serde_json::to_string(&model.stack).expect("serializable"),
                        tree: loaded.tree.clone(),
                        install_docker: opts.install_docker,
                        health_timeout_seconds: opts.health_timeout,
                        holder: stack::holder(),
                        sync_only: false,
                        rotating: opts.rotating.clone(),
                    };
                    (Some((plan, resolved.values)), Some(model.stack))
                }
            }
        }
    };

    // 3. Per host: the secrets it lacks, then the stack.
    let targets: BTreeMap<String, Target> = setup.targets.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let items = prepared.ok.into_iter().map(|(name, prepared)| (targets[&name].clone(), prepared)).collect();
    let plan = Arc::new(plan);
    let mut hosts =
        per_host_with(items, setup.forks, &setup.ctx, &report, move |target, (mut host, held), ctx, progress| {
            let plan = plan.clone();
            async move {
                if let Some((plan, secrets)) = plan.as_ref()
                    && let Err(e) = crate::secrets::complete_on(&mut host.conn, &plan.project, &held, secrets).await
                {
                    host.close().await;
                    return Err(e);
                }
                host.finish(&target, &ctx, plan.as_ref().as_ref().map(|(p, _)| p), &progress).await
            }
        })
        .await;
    hosts.failed.extend(prepared.failed);
    hosts.sort_by_targets(&setup.targets);
    Ok(DeployReport { hosts, stack })
}

/// Warnings were printed when the model was first read.
struct Quiet;

impl Report for Quiet {
    fn progress(&self, _: &crate::progress::Event) {}
    fn warn(&self, _: &str) {}
    fn info(&self, _: &str) {}
}
