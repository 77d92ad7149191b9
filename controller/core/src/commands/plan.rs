//! `mlopsctl plan`: per host, what `deploy` with the same flags would do,
//! and why, changing nothing that runs.
//!
//! Per host: whether the agent and Docker would be installed; which files
//! would change; which images would be built there, shipped from another
//! host or are current; and each service's fate (keep, start, create,
//! recreate) with the inputs that changed (config, image, a mounted file,
//! a dependency), from the agent's own converge phases run read-only
//! (`PlanStack`). The new files go to a scratch tree of the agent's
//! (`plan-...`, removed at the end), never to the tree containers mount;
//! the blobs uploaded for it stay in the agent's content-addressed store,
//! so the deploy that follows does not send them again. Agents are not
//! installed or upgraded, secrets are not generated or stored: a host
//! without an agent (or Docker) is planned as a fresh one.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlops_inventory::Target;
use mlops_proto::v1::{EnsureDockerRequest, ImageState, PlanStackRequest, PlannedService};
use serde::Serialize;
use tokio_stream::StreamExt;

use super::Setup;
use super::deploy::DeployOptions;
use crate::ControllerError;
use crate::bootstrap;
use crate::client::AgentConn;
use crate::fanout::{HostResults, per_host, per_host_with};
use crate::images;
use crate::progress::Report;
use crate::stack::{self, StackPlan};
use crate::transport::SharedTransport;

/// What `deploy` would do on one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostPlan {
    /// `running`, or what deploy would do about it (`install`, `upgrade ...`).
    pub agent: String,
    /// The engine's version, or `install`.
    pub docker: String,
    pub files_changed: u32,
    pub files_removed: u32,
    /// What deploy would have sent (the plan sent it to the agent's store).
    pub bytes_to_send: u64,
    pub images: Vec<PlannedImage>,
    /// `image:` tags that would be pulled.
    pub pulls: Vec<String>,
    pub services: Vec<ServicePlan>,
    /// Services whose containers would be removed.
    pub orphans: Vec<String>,
    /// The batch of the rollout the host is in (1-based).
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedImage {
    pub tag: String,
    /// `current`, `build` (here, for every host that lacks it), `ship`
    /// (from `from`) or `tag` (`from` has it; this host has its ID).
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePlan {
    pub service: String,
    pub action: String,
    pub reasons: Vec<String>,
}

impl From<PlannedService> for ServicePlan {
    fn from(s: PlannedService) -> Self {
        ServicePlan { service: s.service, action: s.action, reasons: s.reasons }
    }
}

pub struct PlanReport {
    pub project: String,
    /// Secrets the deploy would generate (no host or cache holds them).
    pub generated: Vec<String>,
    pub batches: usize,
    pub hosts: HostResults<HostPlan>,
}

/// A host as the plan found it: its agent's connection, or none (fresh).
struct Probe {
    conn: Option<(SharedTransport, AgentConn)>,
    agent: String,
    held: BTreeMap<String, String>,
    /// `uname -m`, when the agent answers.
    arch: Option<String>,
}

pub async fn plan(setup: &Setup, opts: &DeployOptions, report: Arc<dyn Report>) -> Result<PlanReport, ControllerError> {
    let mut stack_opts = opts.stack.clone();
    if opts.expose {
        stack_opts.vars.push(("MLOPS_BIND_ADDRESS".into(), "0.0.0.0".into()));
    }
    let mut loaded = stack_opts.load(&setup.state, report.as_ref())?;
    let layout = loaded.place(&setup.all_hosts, &setup.state)?;
    let project = loaded.stack.project.clone();

    // 1. Each host's agent, if it answers, and the secrets it holds.
    let p = project.clone();
    let probed = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let project = p.clone();
        async move {
            match bootstrap::connect_agent(&target, &ctx).await {
                Ok((transport, mut conn)) => match crate::secrets::held_by(&mut conn, &project).await {
                    Ok(held) => {
                        let arch = conn.facts().await.ok().map(|f| f.arch);
                        Ok(Probe { conn: Some((transport, conn)), agent: "running".into(), held, arch })
                    }
                    Err(e) => {
                        transport.close().await;
                        Err(e)
                    }
                },
                Err(ControllerError::AgentTooOld { level, needed, .. }) => Ok(Probe {
                    conn: None,
                    agent: format!("upgrade (it speaks API level {level}; this needs {needed})"),
                    held: BTreeMap::new(),
                    arch: None,
                }),
                Err(ControllerError::AgentUnreachable { message, .. }) => {
                    Ok(Probe { conn: None, agent: format!("install ({message})"), held: BTreeMap::new(), arch: None })
                }
                Err(e) => Err(e),
            }
        }
    })
    .await;

    // 2. The secrets as deploy would decide them (nothing stored).
    let held: Vec<(String, BTreeMap<String, String>)> =
        probed.ok.iter().filter(|(_, p)| p.conn.is_some()).map(|(n, p)| (n.clone(), p.held.clone())).collect();
    let unheard: Vec<String> = probed.failed.iter().map(|(n, _)| n.clone()).collect();
    let cache = crate::secrets::load(&setup.state.path, &project)?;
    let names = &loaded.stack.options.secrets;
    let resolved = match crate::secrets::reconcile(&project, names, &held, &cache, unheard.is_empty(), &unheard) {
        Ok(r) => r,
        Err(conflict) => {
            let mut failed = probed.failed;
            for (name, probe) in probed.ok {
                if let Some((transport, _)) = probe.conn {
                    transport.close().await;
                }
                failed.push((name, conflict.clone().into()));
            }
            let hosts = HostResults { ok: Vec::new(), failed };
            return Ok(PlanReport { project, generated: Vec::new(), batches: 0, hosts });
        }
    };
    let model = stack_opts.load_model_with(&setup.state, &crate::progress::Quiet, &resolved.values)?;
    let parts: BTreeMap<String, String> = setup
        .targets
        .iter()
        .map(|t| {
            let part = crate::placement::render(&model.stack, &layout, &t.name);
            (t.name.clone(), serde_json::to_string(&part).expect("serializable"))
        })
        .collect();
    let plan = Arc::new(StackPlan {
        project: project.clone(),
        stack_json: serde_json::to_string(&model.stack).expect("serializable"),
        parts: if layout.split { parts.clone() } else { BTreeMap::new() },
        tree: loaded.tree.clone(),
        install_docker: opts.install_docker,
        health_timeout_seconds: opts.health_timeout,
        holder: stack::holder(),
        sync_only: false,
        rotating: Vec::new(),
        images: true,
        local_images: false,
        min_healthy_seconds: 0,
        no_rollback: false,
        deploy_id: String::new(),
        min_free_bytes: opts.min_free_space,
    });

    let archs: BTreeMap<String, String> =
        probed.ok.iter().filter_map(|(n, p)| Some((n.clone(), p.arch.clone()?))).collect();

    // 3. Per host: Docker, the files in a scratch tree, the agent's preview.
    let targets: BTreeMap<String, Target> = setup.targets.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let items = probed.ok.into_iter().map(|(name, probe)| (targets[&name].clone(), probe)).collect();
    let mut planned = per_host_with(items, setup.forks, &setup.ctx, &report, move |target, probe, _ctx, _progress| {
        let plan = plan.clone();
        async move {
            let Some((transport, mut conn)) = probe.conn else {
                return Ok((fresh(&plan, &target.name, probe.agent, "install"), fresh_images(&plan, &target.name)));
            };
            let result = preview(&mut conn, &plan, &target.name).await;
            transport.close().await;
            result
        }
    })
    .await;
    planned.sort_by_targets(&setup.targets);

    // 4. Where each image would come from, as deploy decides it: batch by
    //    batch, an image a host of an earlier batch has (or got) comes from
    //    there, else from a host of this batch that has it, else it is
    //    built by the first host of this batch that lacks it.
    let reports: BTreeMap<String, Vec<ImageState>> =
        planned.ok.iter().map(|(n, (_, i))| (n.clone(), i.clone())).collect();
    let order: Vec<String> = layout.waves_of(&planned.ok.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()).concat();
    let batches = crate::rollout::batches(&order, opts.rollout.serial);
    // Pulled images: from this machine's engine if it has them (and no
    // host has them, or has the same).
    let all: Vec<(String, Vec<ImageState>)> = reports.iter().map(|(n, i)| (n.clone(), i.clone())).collect();
    let local = match crate::commands::deploy::local_images(opts, setup, &model.stack) {
        true => images::local_supply(&all, &Default::default(), &archs).await.map(|l| l.ids),
        false => None,
    };
    let local = local.unwrap_or_default();
    let mut source_of: BTreeMap<images::ImageKey, String> = BTreeMap::new();
    for batch in &batches {
        let these: Vec<(String, Vec<ImageState>)> = batch.iter().map(|n| (n.clone(), reports[n].clone())).collect();
        let available = source_of.keys().cloned().collect();
        let assignment = images::assign(&these, &available, &local);
        source_of.extend(assignment.source_of);
        // After its batch, a host has every image of its part.
        for (host, states) in &these {
            for i in states {
                source_of.entry((i.tag.clone(), i.context_hash.clone())).or_insert_with(|| host.clone());
            }
        }
    }
    let mut hosts = HostResults { ok: Vec::new(), failed: probed.failed };
    hosts.failed.append(&mut planned.failed);
    for (name, (mut host, states)) in planned.ok {
        host.batch = batches.iter().position(|b| b.contains(&name)).map_or(1, |i| i + 1);
        host.images = states
            .iter()
            .map(|i| {
                let key = (i.tag.clone(), i.context_hash.clone());
                let source = source_of.get(&key);
                let (action, from) = match source {
                    _ if !i.id.is_empty() => ("current", None),
                    Some(s) if s == images::LOCAL => ("ship", Some(crate::local_engine::NAME.to_string())),
                    Some(s) if *s == name => ("build", None),
                    Some(s) => ("ship", Some(s.clone())),
                    None if images::pulled(i) => ("pull", None),
                    None => ("build", None),
                };
                PlannedImage { tag: i.tag.clone(), action: action.into(), from }
            })
            .collect();
        hosts.ok.push((name, host));
    }
    hosts.sort_by_targets(&setup.targets);
    Ok(PlanReport { project, generated: resolved.generated, batches: batches.len(), hosts })
}

/// A host whose agent (or engine) is not there yet: everything its part of
/// the stack runs would be created.
fn fresh(plan: &StackPlan, host: &str, agent: String, docker: &str) -> HostPlan {
    let stack: mlops_proto::stack::Stack = serde_json::from_str(&plan.stack_json_for(host)).expect("our own model");
    let services = stack
        .start_order()
        .unwrap_or_default()
        .into_iter()
        .map(|s| ServicePlan { service: s, action: "create".into(), reasons: Vec::new() })
        .collect();
    let bytes = plan.tree.total_bytes;
    let files = plan.tree.entries.iter().filter(|e| !e.is_dir).count() as u32;
    HostPlan {
        agent,
        docker: docker.into(),
        files_changed: files,
        files_removed: 0,
        bytes_to_send: bytes,
        images: Vec::new(),
        pulls: Vec::new(),
        services,
        orphans: Vec::new(),
        batch: 1,
    }
}

/// The images a fresh host would need: every image the stack builds (its
/// context hash is not known before its files are there; hosts with the
/// same files have the same).
fn fresh_images(plan: &StackPlan, host: &str) -> Vec<ImageState> {
    let stack: mlops_proto::stack::Stack = serde_json::from_str(&plan.stack_json_for(host)).expect("our own model");
    let mut out: Vec<ImageState> = Vec::new();
    for name in stack.start_order().unwrap_or_default() {
        let tag = stack.image_of(&name);
        if out.iter().any(|i| i.tag == tag) {
            continue;
        }
        // A pulled image keeps its empty context hash: another host or
        // this machine's engine may supply it.
        let context_hash = match stack.services[&name].build.is_some() {
            true => "(not known yet)".to_string(),
            false if tag.contains('@') => continue,
            false => String::new(),
        };
        out.push(ImageState { service: name, tag, context_hash, id: String::new() });
    }
    out
}

/// Docker's state, the files in a scratch tree, and the agent's preview.
async fn preview(
    conn: &mut AgentConn,
    plan: &StackPlan,
    host: &str,
) -> Result<(HostPlan, Vec<ImageState>), ControllerError> {
    let name = conn.host().to_string();
    let rpc = |call: &'static str, s: tonic::Status| ControllerError::from_status(&name, call, &s);
    let mut stream = conn
        .raw()
        .ensure_docker(EnsureDockerRequest { install: false })
        .await
        .map_err(|s| rpc("EnsureDocker", s))?
        .into_inner();
    let mut docker = None;
    while let Some(p) = stream.next().await {
        let p = p.map_err(|s| rpc("EnsureDocker", s))?;
        if p.done {
            docker = p.docker.filter(|d| d.available).map(|d| d.version);
        }
    }
    let Some(docker) = docker else {
        let what = if plan.install_docker { "install" } else { "none answers (and --no-docker-install)" };
        return Ok((fresh(plan, host, "running".into(), what), fresh_images(plan, host)));
    };
    let scratch = format!("plan-{}-{:x}-{}", plan.project, std::process::id(), crate::rollout::salt());
    // A plan's scratch upload is not progress the user asked for.
    let sync = stack::sync(conn, &scratch, &plan.tree, &crate::progress::Progress::silent(host)).await?;
    let request =
        PlanStackRequest { stack_json: plan.stack_json_for(host), files_root: scratch, live_root: plan.files_root() };
    let reply = conn.raw().plan_stack(request).await.map_err(|s| rpc("PlanStack", s))?.into_inner();
    let host_plan = HostPlan {
        agent: "running".into(),
        docker,
        files_changed: reply.files_changed,
        files_removed: reply.files_removed,
        bytes_to_send: sync.uploaded_bytes,
        images: Vec::new(),
        pulls: reply.pulls,
        services: reply.services.into_iter().map(ServicePlan::from).collect(),
        orphans: reply.orphans,
        batch: 1,
    };
    Ok((host_plan, reply.images))
}
