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
use crate::images::{self, ImageSources};
use crate::progress::{Report, bytes_human};
use crate::stack::{self, StackPlan};
use mlops_proto::v1::ImageState;

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
    /// Batches, failures tolerated, rollback and minimum healthy time.
    pub rollout: crate::rollout::RolloutOptions,
    /// An `image:` no host has may come from this machine's Docker engine
    /// (see [`crate::local_engine`]).
    pub local_images: bool,
    /// Free bytes Docker's data directory must have on a host for an image
    /// build to start there (0: no floor).
    pub min_free_space: u64,
}

/// `--min-free-space`'s default: the platform's images take about 4 GB,
/// and a build that fills the disk starves what runs beside it.
pub const DEFAULT_MIN_FREE_SPACE: u64 = 5 << 30;

/// What `deploy` did: per host, and the stack model it deployed (for the
/// access table).
pub struct DeployReport {
    pub hosts: HostResults<DeployOutcome>,
    pub stack: Option<Stack>,
    /// How long each phase took, in order (`load`: the stack read and its
    /// files hashed; `agents`, `secrets`, then per batch `stage`, `images`,
    /// `converge`).
    pub phases: Vec<Phase>,
}

/// A phase of a deploy and its wall time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub name: String,
    pub ms: u64,
}

/// Records phases as they end.
struct Clock {
    phases: Vec<Phase>,
    since: std::time::Instant,
}

impl Clock {
    fn new() -> Self {
        Clock { phases: Vec::new(), since: std::time::Instant::now() }
    }

    fn lap(&mut self, name: impl Into<String>) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.phases.push(Phase { name: name.into(), ms });
        self.since = std::time::Instant::now();
    }
}

pub async fn deploy(
    setup: &Setup,
    opts: &DeployOptions,
    report: Arc<dyn Report>,
) -> Result<DeployReport, ControllerError> {
    deploy_with(setup, opts, report, ImageSources::default()).await
}

/// [`deploy`] with images that hosts outside the deploy supply (`migrate`:
/// the host the stack leaves); the hosts of the deploy load them from
/// there instead of building them.
pub async fn deploy_with(
    setup: &Setup,
    opts: &DeployOptions,
    report: Arc<dyn Report>,
    sources: ImageSources,
) -> Result<DeployReport, ControllerError> {
    let seeded = !sources.available().is_empty();
    let mut clock = Clock::new();
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
    let mut loaded = if opts.no_stack { None } else { Some(stack_opts.load(&setup.state, report.as_ref())?) };
    // Where each service runs: checked against the whole inventory now.
    let layout = match loaded.as_mut() {
        Some(l) => Some(l.place(&setup.all_hosts, &setup.state)?),
        None => None,
    };
    if let Some(layout) = layout.as_ref().filter(|l| l.split) {
        for t in &setup.targets {
            report.info(&format!(
                "{}: roles {} ({} service(s))",
                t.name,
                layout.roles[&t.name].join(", "),
                layout.services[&t.name].len()
            ));
        }
    }
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
    if loaded.is_some() {
        clock.lap("load");
    }

    let deploy_id = crate::rollout::deploy_id();
    if loaded.is_some() {
        report.info(&format!(
            "deploy {deploy_id}{}",
            match opts.rollout.serial {
                Some(n) => format!(
                    ": {n} host(s) per batch, each healthy before the next{}",
                    match opts.rollout.max_fail(setup.targets.len()) {
                        0 => String::new(),
                        m => format!(", up to {m} failed host(s)"),
                    }
                ),
                None => String::new(),
            }
        ));
    }

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

    clock.lap("agents");
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
                    return Ok(DeployReport { hosts, stack: None, phases: clock.phases });
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
                    let model = stack_opts.load_model_with(&setup.state, &crate::progress::Quiet, &resolved.values)?;
                    let layout = layout.as_ref().expect("a stack has a layout");
                    let parts = match layout.split {
                        true => setup
                            .targets
                            .iter()
                            .map(|t| {
                                let part = crate::placement::render(&model.stack, layout, &t.name);
                                (t.name.clone(), serde_json::to_string(&part).expect("serializable"))
                            })
                            .collect(),
                        false => BTreeMap::new(),
                    };
                    let plan = StackPlan {
                        project: project.clone(),
                        stack_json: serde_json::to_string(&model.stack).expect("serializable"),
                        parts,
                        tree: loaded.tree.clone(),
                        install_docker: opts.install_docker,
                        health_timeout_seconds: opts.health_timeout,
                        holder: stack::holder(),
                        sync_only: false,
                        rotating: opts.rotating.clone(),
                        // With several hosts, each image is built once; a
                        // host outside the deploy may have them.
                        images: prepared.ok.len() > 1 || seeded,
                        local_images: local_images(opts, setup, &model.stack),
                        min_healthy_seconds: opts.rollout.min_healthy_seconds(),
                        no_rollback: opts.rollout.no_rollback,
                        deploy_id: deploy_id.clone(),
                        min_free_bytes: opts.min_free_space,
                    };
                    (Some((plan, resolved.values)), Some(model.stack))
                }
            }
        }
    };

    // 3–5, per batch of the rollout (one batch without --serial): each
    // host's secrets, Docker and files; the images its hosts lack; then
    // the stack, healthy before the next batch starts. Hosts of a batch
    // after one that failed beyond --max-fail are left as they are.
    let targets: BTreeMap<String, Target> = setup.targets.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let plan = Arc::new(plan);
    clock.lap("secrets");
    let mut failed = prepared.failed;
    let mut waiting: BTreeMap<String, PreparedHost> = prepared.ok.into_iter().collect();
    let order: Vec<String> = match &layout {
        Some(layout) => layout.waves_of(&waiting.keys().cloned().collect::<Vec<_>>()).concat(),
        None => setup.targets.iter().filter(|t| waiting.contains_key(&t.name)).map(|t| t.name.clone()).collect(),
    };
    let batches = crate::rollout::batches(&order, opts.rollout.serial);
    let allowed = opts.rollout.max_fail(setup.targets.len());
    let mut hosts = HostResults { ok: Vec::new(), failed: Vec::new() };
    // Set once more hosts failed than --max-fail allows: (batch, who failed).
    let mut stopped: Option<(usize, String)> = None;
    for (i, batch) in batches.iter().enumerate() {
        let items: Vec<(String, PreparedHost)> =
            batch.iter().map(|n| (n.clone(), waiting.remove(n).expect("each host is in one batch"))).collect();
        let failed_so_far: Vec<&str> = hosts.failed.iter().chain(failed.iter()).map(|(n, _)| n.as_str()).collect();
        if stopped.is_none() && batches.len() > 1 && failed_so_far.len() > allowed {
            report.warn(&format!(
                "{} failed, and --max-fail allows {allowed}: the rollout stops before batch {}; later batches are left as they are",
                failed_so_far.join(", "),
                i + 1
            ));
            stopped = Some((i + 1, failed_so_far.join(", ")));
        }
        if let Some((at, why)) = &stopped {
            for (name, (host, _)) in items {
                host.close().await;
                let e =
                    ControllerError::RolloutStopped { host: name.clone(), batch: *at, failed: why.clone(), allowed };
                failed.push((name, e));
            }
            continue;
        }
        if batches.len() > 1 {
            report.info(&format!("batch {}/{}: {}", i + 1, batches.len(), batch.join(", ")));
        }
        let rolling = batches.len() > 1;
        let label = if rolling { format!("batch {}: ", i + 1) } else { String::new() };
        let batch = Batch { items, rolling, label };
        let done =
            roll_batch(setup, &report, &targets, &plan, &layout, &stack, &sources, batch, &mut failed, &mut clock)
                .await;
        hosts.ok.extend(done.ok);
        hosts.failed.extend(done.failed);
    }
    sources.close_all().await;
    hosts.failed.append(&mut failed);
    hosts.sort_by_targets(&setup.targets);
    Ok(DeployReport { hosts, stack, phases: clock.phases })
}

/// The hosts of one batch, and how its phases are named.
struct Batch {
    items: Vec<(String, PreparedHost)>,
    /// One of several batches (hosts of later batches may load images
    /// from this one's).
    rolling: bool,
    label: String,
}

/// One batch of the rollout: each host's secrets, Docker and files; the
/// images its hosts lack (from `sources`, which it extends, or built once
/// here); then each host's stack, in waves when the stack is split
/// between hosts (a host after those running what its services depend
/// on). `failed` collects the hosts that fail before their converge.
#[allow(clippy::too_many_arguments)]
async fn roll_batch(
    setup: &Setup,
    report: &Arc<dyn Report>,
    targets: &BTreeMap<String, Target>,
    plan: &Arc<Option<(StackPlan, BTreeMap<String, String>)>>,
    layout: &Option<crate::placement::Layout>,
    stack: &Option<Stack>,
    sources: &ImageSources,
    batch: Batch,
    failed: &mut Vec<(String, ControllerError)>,
    clock: &mut Clock,
) -> HostResults<DeployOutcome> {
    let Batch { items, rolling, label } = batch;
    // 3. Per host: the secrets it lacks, Docker and the stack's files (and,
    //    deploying to several hosts, which of its images the host has).
    let items = items.into_iter().map(|(name, prepared)| (targets[&name].clone(), prepared)).collect();
    let staging = plan.clone();
    let mut staged =
        per_host_with(items, setup.forks, &setup.ctx, report, move |target, (mut host, held), ctx, progress| {
            let plan = staging.clone();
            async move {
                let Some((plan, secrets)) = plan.as_ref() else { return Ok((host, None)) };
                let started = std::time::Instant::now();
                let completed = crate::secrets::complete_on(&mut host.conn, &plan.project, &held, secrets).await;
                host.timings.secrets_ms = started.elapsed().as_millis() as u64;
                let staged = match completed {
                    Ok(()) => host.stage(&target, &ctx, plan, &progress).await,
                    Err(e) => Err(e),
                };
                match staged {
                    Ok(staged) => Ok((host, Some(staged))),
                    Err(e) => {
                        host.close().await;
                        Err(e)
                    }
                }
            }
        })
        .await;
    staged.sort_by_targets(&setup.targets);
    failed.append(&mut staged.failed);

    clock.lap(format!("{label}stage"));
    // 4. Images some host lacks: built once, where no host has them,
    //    before any host converges (see `crate::images`).
    if let Some((p, _)) = plan.as_ref().as_ref().filter(|(p, _)| p.images || p.local_images) {
        let (ready, built) = build_images(setup, report, p, staged.ok, sources, failed).await;
        sources.extend(&built);
        staged.ok = ready;
        if rolling {
            // Later batches may load from these hosts what they have.
            sources.extend(&holders(&mut staged.ok));
        }
    }

    clock.lap(format!("{label}images"));
    // 5. Per host: its images from their sources, then the stack; in
    //    waves when the stack is split between hosts.
    let names: Vec<String> = staged.ok.iter().map(|(n, _)| n.clone()).collect();
    let waves = match layout {
        Some(layout) => layout.waves_of(&names),
        None => vec![names],
    };
    let mut waiting: BTreeMap<String, StagedHost> = staged.ok.into_iter().collect();
    let mut hosts = HostResults { ok: Vec::new(), failed: Vec::new() };
    for wave in waves {
        let mut items = Vec::new();
        for name in wave {
            let item = waiting.remove(&name).expect("each host is in one wave");
            // A host whose services depend on a failed host's does not start.
            let broken = layout.as_ref().and_then(|l| failed_provider(l, stack, &name, &hosts.failed, failed));
            match broken {
                Some(e) => {
                    // Other hosts may still load images from it.
                    if sources.is_source(&name) {
                        sources.keep_open(item.0.transport());
                    } else {
                        item.0.close().await;
                    }
                    failed.push((name, e));
                }
                None => items.push((targets[&name].clone(), item)),
            }
        }
        let shared = sources.clone();
        let plan = plan.clone();
        let mut done =
            per_host_with(items, setup.forks, &setup.ctx, report, move |target, (host, staged), ctx, progress| {
                let (plan, sources) = (plan.clone(), shared.clone());
                async move {
                    let shipping = plan.as_ref().as_ref().is_some_and(|(p, _)| p.images || p.local_images);
                    let stack = plan.as_ref().as_ref().map(|(p, _)| (p, staged));
                    host.finish(&target, &ctx, stack, shipping.then_some(&sources), &progress).await
                }
            })
            .await;
        hosts.ok.append(&mut done.ok);
        hosts.failed.append(&mut done.failed);
    }
    clock.lap(format!("{label}converge"));
    hosts
}

/// Every image the staged hosts have, as a source (for later batches).
fn holders(staged: &mut [(String, StagedHost)]) -> ImageSources {
    let mut out = std::collections::HashMap::new();
    for (name, (host, s)) in staged.iter_mut() {
        for image in s.iter().flat_map(|s| s.images.iter()).filter(|i| !i.id.is_empty()) {
            out.entry((image.tag.clone(), image.context_hash.clone()))
                .or_insert_with(|| Ok(images::Source::new(name, host.client(), image.id.clone(), false)));
        }
    }
    ImageSources::new(out)
}

/// Why `host` cannot be deployed: a host running a service that one of
/// its services depends on failed.
fn failed_provider(
    layout: &crate::placement::Layout,
    stack: &Option<Stack>,
    host: &str,
    failed_now: &[(String, ControllerError)],
    failed_before: &[(String, ControllerError)],
) -> Option<ControllerError> {
    let stack = stack.as_ref()?;
    let mine = layout.services.get(host)?;
    for service in mine {
        for dep in stack.services[service].depends_on.keys().filter(|d| !mine.contains(*d)) {
            for provider in layout.hosts_of(dep) {
                if failed_now.iter().chain(failed_before).any(|(n, _)| n == provider) {
                    return Some(ControllerError::ProviderFailed {
                        host: host.to_string(),
                        service: service.clone(),
                        dependency: dep.clone(),
                        provider: provider.to_string(),
                    });
                }
            }
        }
    }
    None
}

/// A host with its agent current and what it holds of the project's
/// secrets, its connection open.
type PreparedHost = (bootstrap::Prepared, BTreeMap<String, String>);

/// A staged host, with its connection open.
type StagedHost = (bootstrap::Prepared, Option<stack::Staged>);

/// Builds each image no host has on the first host that lacks it (those
/// hosts in parallel); returns the hosts still in the deploy and where
/// each image comes from. A host whose build fails fails, and so, later,
/// does every host that needed its image.
async fn build_images(
    setup: &Setup,
    report: &Arc<dyn Report>,
    plan: &StackPlan,
    staged: Vec<(String, StagedHost)>,
    earlier: &ImageSources,
    failed: &mut Vec<(String, ControllerError)>,
) -> (Vec<(String, StagedHost)>, ImageSources) {
    let reports: Vec<(String, Vec<ImageState>)> = staged
        .iter()
        .map(|(name, (_, s))| (name.clone(), s.as_ref().map(|s| s.images.clone()).unwrap_or_default()))
        .collect();
    let available = earlier.available();
    let local = match plan.local_images {
        true => {
            let arch_of = staged.iter().map(|(name, (host, _))| (name.clone(), host.arch().to_string())).collect();
            images::local_supply(&reports, &available, &arch_of).await
        }
        false => None,
    };
    for (tag, why) in local.iter().flat_map(|l| l.unfit.iter()) {
        report.warn(&format!("{tag} in {} is not shipped ({why}); hosts pull it", crate::local_engine::NAME));
    }
    let local_ids = local.as_ref().map(|l| l.ids.clone()).unwrap_or_default();
    let assignment = Arc::new(images::assign(&reports, &available, &local_ids));
    let (builders, mut ready): (Vec<_>, Vec<_>) =
        staged.into_iter().partition(|(name, _)| assignment.builds.contains_key(name));
    let mut built: BTreeMap<String, Vec<ImageState>> = BTreeMap::new();
    if !builders.is_empty() {
        let items = builders
            .into_iter()
            .map(|(name, item)| (setup.targets.iter().find(|t| t.name == name).expect("a target").clone(), item))
            .collect();
        let (plan, tags) = (Arc::new(plan.clone()), assignment.clone());
        let mut done = per_host_with(items, setup.forks, &setup.ctx, report, move |target, item, ctx, progress| {
            let (plan, tags) = (plan.clone(), tags.builds[&target.name].clone());
            async move {
                let (mut host, staged) = item;
                match host.build_images(&target, &ctx, &plan, tags, &progress).await {
                    Ok(states) => Ok((host, staged, states)),
                    Err(e) => {
                        host.close().await;
                        Err(e)
                    }
                }
            }
        })
        .await;
        for (name, (host, staged, states)) in std::mem::take(&mut done.ok) {
            built.insert(name.clone(), states);
            ready.push((name, (host, staged)));
        }
        failed.append(&mut done.failed);
    }
    let mut sources = std::collections::HashMap::new();
    for (key, from) in &assignment.source_of {
        if let (images::LOCAL, Some(l)) = (from.as_str(), &local) {
            sources.insert(key.clone(), Ok(images::Source::local(l.engine.clone(), l.ids[&key.0].clone())));
            continue;
        }
        let source = match ready.iter_mut().find(|(name, _)| name == from) {
            Some((name, (host, staged))) => {
                let was_built = built.contains_key(name.as_str()) && assignment.builds[name.as_str()].contains(&key.0);
                let states = match built.get(name.as_str()) {
                    Some(states) => states.as_slice(),
                    None => staged.as_ref().map(|s| s.images.as_slice()).unwrap_or_default(),
                };
                match states.iter().find(|i| (&i.tag, &i.context_hash) == (&key.0, &key.1) && !i.id.is_empty()) {
                    Some(image) => Ok(images::Source::new(name, host.client(), image.id.clone(), was_built)),
                    None => Err(format!("{name} does not have {} after its build", key.0)),
                }
            }
            None => {
                let why = failed.iter().find(|(n, _)| n == from).map(|(_, e)| e.to_string()).unwrap_or_default();
                Err(format!("{from}: {why}"))
            }
        };
        sources.insert(key.clone(), source);
    }
    ready.sort_by_key(|(n, _)| setup.targets.iter().position(|t| t.name == *n));
    (ready, ImageSources::new(sources))
}

/// Whether an `image:` no host has may come from this machine's engine:
/// allowed, the stack pulls some image, and no host is this machine.
pub(crate) fn local_images(opts: &DeployOptions, setup: &Setup, stack: &Stack) -> bool {
    opts.local_images
        && stack.services.values().any(|s| s.build.is_none())
        && !setup.targets.iter().any(|t| matches!(t.connection, mlops_inventory::Connection::Local))
}
