//! `mlopsctl migrate --from A --to B`: a stack moves to another host with
//! its data, and the old host is kept until the new one is verified.
//!
//! The steps, each recorded in `<state>/migrations/<project>.json` once
//! done, so that a migration stopped at any point is finished by running
//! the same command again:
//!
//! 1. **Deploy on B**: the agent, Docker, the stack's files and images
//!    (loaded from A's engine where A has them, else built), with A's
//!    secrets (stored on B before anything runs there), healthy.
//! 2. **Quiesce**: B's services and then A's are stopped (Docker's stop:
//!    SIGTERM, then SIGKILL after `--stop-timeout`), dependents first.
//!    A's containers and volumes stay.
//! 3. **Transfer**: every named volume of the stack streams from A's agent
//!    through this controller into B's (`ExportData` into `ImportData`),
//!    checked by sha256 and length at B; a volume already moved is not
//!    moved again unless A ran again since.
//! 4. **Switch**: B's stack converges again (its moved volumes mounted)
//!    and must be healthy; then the inventory entry changes (printed).
//!    A stays stopped and intact, unless `--decommission` removes its
//!    stack, volumes and agent.
//!
//! When a step after the quiesce fails, A is started again as it was (its
//! newest revision, health-gated) and the command fails: A keeps its data
//! until B is verified.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use mlops_inventory::Target;
use mlops_proto::v1::{
    DataChunk, DataSource, ExportDataRequest, ImagePlanRequest, PutSecretsRequest, RevisionsRequest, RollbackRequest,
    StackStatusRequest, StopServicesRequest,
};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

use super::deploy::{self, DeployOptions};
use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap::{self, Bundle};
use crate::client::AgentConn;
use crate::images::{ImageSources, Source};
use crate::progress::{Progress, Report, bytes_human};
use crate::stack;

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub stack: StackOptions,
    /// Hosts by inventory name, or `[USER@]HOST[:PORT]`.
    pub from: String,
    pub to: String,
    /// Print the steps and what would move; change nothing.
    pub dry_run: bool,
    /// Remove A's stack, volumes and agent once B is verified.
    pub decommission: bool,
    /// Seconds a service gets to stop before it is killed.
    pub stop_timeout: u32,
    pub health_timeout: u32,
    pub install_docker: bool,
    pub expose: bool,
    pub local_images: bool,
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateReport {
    pub project: String,
    pub from: String,
    pub to: String,
    /// Each step, in order, with its wall time.
    pub steps: Vec<StepTime>,
    pub volumes: Vec<VolumeMove>,
    /// Milliseconds from the quiesce to B healthy: how long the stack did
    /// not serve.
    pub downtime_ms: u64,
    /// The change to the inventory that points users at B.
    pub inventory: String,
    pub decommissioned: bool,
    /// `--dry-run`: nothing was changed.
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub step: String,
    pub ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMove {
    pub volume: String,
    pub bytes: u64,
    pub sha256: String,
    pub ms: u64,
    /// Moved by an earlier run of this migration.
    #[serde(default)]
    pub earlier: bool,
}

/// An unfinished migration, as this controller keeps it between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    from: String,
    to: String,
    /// B was deployed and healthy (before A was stopped).
    b_deployed: bool,
    /// A's services were stopped by this migration: which ran before.
    a_stopped: bool,
    a_running: Vec<String>,
    /// Volumes moved (and checked) while A stayed stopped.
    volumes: Vec<VolumeMove>,
}

impl Record {
    fn path(setup: &Setup, project: &str) -> PathBuf {
        setup.state.path.join("migrations").join(format!("{project}.json"))
    }

    fn load(path: &std::path::Path) -> Result<Option<Record>, ControllerError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ControllerError::usage(
                    format!("{} is not a migration record: {e}", path.display()),
                    Some("it is this controller's record of an unfinished migration; remove it to start over"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ControllerError::StateDir { path: path.to_path_buf(), source }),
        }
    }

    fn save(&self, path: &std::path::Path) -> Result<(), ControllerError> {
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir).map_err(|source| ControllerError::StateDir { path: dir.to_path_buf(), source })?;
        let text = serde_json::to_vec_pretty(self).expect("serializable");
        Ok(mlops_pki::write_atomic(path, &text, 0o600)?)
    }
}

/// Runs the migration (see the module docs). `Err` for what stops it
/// before or after A was stopped (A then started again).
pub async fn migrate(
    setup: &Setup,
    opts: &MigrateOptions,
    report: Arc<dyn Report>,
) -> Result<MigrateReport, ControllerError> {
    let project = opts.stack.project(&setup.state)?;
    let (a, b) = (setup.host(&opts.from)?, setup.host(&opts.to)?);
    if a.name == b.name || a.connection == b.connection {
        return Err(ControllerError::usage(
            format!("--from and --to name the same host ({})", a.display_address()),
            Some("migrate moves a stack to another host"),
        ));
    }
    let record_path = Record::path(setup, &project);
    let mut record = match Record::load(&record_path)? {
        Some(r) if r.from != a.name || r.to != b.name => {
            return Err(ControllerError::usage(
                format!(
                    "a migration of stack `{project}` from {} to {} is unfinished ({})",
                    r.from,
                    r.to,
                    record_path.display()
                ),
                Some(&format!(
                    "finish it with `mlopsctl migrate --from {} --to {}`; {} was kept stopped by it until then",
                    r.from, r.to, r.from
                )),
            ));
        }
        Some(r) => {
            report.info(&format!(
                "resuming the migration of stack `{project}` from {} to {} ({} volume(s) already moved)",
                a.name,
                b.name,
                r.volumes.len()
            ));
            r
        }
        None => Record { from: a.name.clone(), to: b.name.clone(), ..Default::default() },
    };
    let mut out = MigrateReport {
        project: project.clone(),
        from: a.name.clone(),
        to: b.name.clone(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut clock = Instant::now();
    let mut lap = |out: &mut MigrateReport, step: &str, detail: String| {
        out.steps.push(StepTime { step: step.into(), ms: clock.elapsed().as_millis() as u64, detail });
        clock = Instant::now();
    };

    // A: its agent current, what it runs and holds.
    let bundles = Bundle::for_targets(&setup.state, &[a.clone(), b.clone()])?;
    let progress_a = Progress::new(Some(report.clone()), &a.name);
    let mut host_a = bootstrap::prepare_host(&a, &setup.ctx, &bundles[&a.name], &progress_a).await?;
    let result = async {
        let services = status(&mut host_a.conn, &project).await?;
        if services.is_empty() {
            return Err(ControllerError::usage(
                format!("stack `{project}` has no containers on {}: there is nothing to migrate", a.name),
                Some("name the stack with --stack (or --project) as it was deployed, and the host it runs on with --from"),
            ));
        }
        let secrets = crate::secrets::held_by(&mut host_a.conn, &project).await?;
        let model = opts.stack.load_model_with(&setup.state, &crate::progress::Quiet, &secrets)?;
        let volumes: Vec<String> =
            model.stack.volumes.iter().filter(|(_, v)| !v.external).map(|(k, _)| model.stack.volume_name(k)).collect();
        let order = model.stack.start_order().map_err(|m| ControllerError::usage(m, None))?;
        let running: Vec<String> =
            services.iter().filter(|s| s.state == "running").map(|s| s.service.clone()).collect();
        if running.is_empty() && !record.a_stopped {
            // What a finished migration leaves behind: moving it again
            // would put old data over the new host's.
            return Err(ControllerError::usage(
                format!("stack `{project}` runs no service on {}: it may have been moved already", a.name),
                Some(&format!(
                    "migrate moves a running stack; to move {}'s data anyway, start the stack there first (`mlopsctl deploy`)",
                    a.name
                )),
            ));
        }
        lap(&mut out, "inspect", format!("{} service(s), {} running, {} volume(s)", services.len(), running.len(), volumes.len()));
        if opts.dry_run {
            out.steps.extend(dry_run_steps(&a, &b, &project, &running, &volumes, opts));
            return Ok(None);
        }

        let deploy_opts = DeployOptions {
            stack: opts.stack.clone(),
            no_stack: false,
            install_docker: opts.install_docker,
            expose: opts.expose,
            health_timeout: opts.health_timeout,
            rotating: Vec::new(),
            rollout: Default::default(),
            local_images: opts.local_images,
        };
        let only_b = setup.only(vec![b.clone()]);
        if record.a_stopped && record.b_deployed {
            // B was deployed before A stopped; its containers may be gone
            // with a half-moved volume, and come back at the switch.
            lap(&mut out, "deploy", format!("done by the earlier attempt on {}", b.name));
            return Ok(Some((volumes, order, running, deploy_opts, only_b)));
        }
        // 1. B deployed, healthy, with A's secrets and images.
        let progress_b = Progress::new(Some(report.clone()), &b.name);
        {
            let mut host_b = bootstrap::prepare_host(&b, &setup.ctx, &bundles[&b.name], &progress_b).await?;
            let put = PutSecretsRequest {
                project: project.clone(),
                values: secrets.clone().into_iter().collect(),
                ..Default::default()
            };
            let held = host_b.conn.raw().put_secrets(put).await;
            host_b.close().await;
            let held = held.map_err(|s| ControllerError::from_status(&b.name, "PutSecrets", &s))?.into_inner().values;
            let differ: Vec<&str> =
                secrets.iter().filter(|(k, v)| held.get(*k) != Some(*v)).map(|(k, _)| k.as_str()).collect();
            if !differ.is_empty() {
                return Err(ControllerError::usage(
                    format!(
                        "{} holds other values of {} for stack `{project}` than {} (it ran the stack before)",
                        b.name,
                        differ.join(", "),
                        a.name
                    ),
                    Some(&format!(
                        "the stack's data from {} would not open with them on {1}; remove the old deployment from {1} first (`mlopsctl down --volumes` and `mlopsctl secrets` there), or migrate to another host",
                        a.name, b.name
                    )),
                ));
            }
        }
        let seed = image_sources(&mut host_a, &a.name, &model.stack, &project).await?;
        deployed(deploy::deploy_with(&only_b, &deploy_opts, report.clone(), seed).await?, &b.name)?;
        record.b_deployed = true;
        record.save(&record_path)?;
        lap(&mut out, "deploy", format!("stack `{project}` healthy on {}", b.name));
        Ok(Some((volumes, order, running, deploy_opts, only_b)))
    }
    .await;
    let (volumes, order, running, deploy_opts, only_b) = match result {
        Ok(Some(found)) => found,
        Ok(None) => {
            host_a.close().await;
            return Ok(out);
        }
        Err(e) => {
            host_a.close().await;
            return Err(e);
        }
    };

    // 2.–4., A stopped: any failure from here starts A again.
    let quiesced = Instant::now();
    let moved = async {
        let mut conn_b = connect(&b, setup).await?;
        let stopped_b = stop(&mut conn_b, &b.name, &project, &[], opts.stop_timeout).await?;
        let mut dependents_first = order.clone();
        dependents_first.reverse();
        let stopped_a = stop(&mut host_a.conn, &a.name, &project, &dependents_first, opts.stop_timeout).await?;
        if !record.a_stopped {
            record.a_stopped = true;
            record.a_running = running.clone();
        } else if !stopped_a.is_empty() {
            // A ran again since the last run: what was moved is stale.
            report.warn(&format!("{} ran again since the last attempt: every volume is moved again", a.name));
            record.volumes.clear();
        }
        record.save(&record_path)?;
        lap(
            &mut out,
            "quiesce",
            format!("stopped on {}: {}; on {}: {}", a.name, list(&stopped_a), b.name, list(&stopped_b)),
        );

        for volume in &volumes {
            if let Some(done) = record.volumes.iter().find(|v| &v.volume == volume) {
                out.volumes.push(VolumeMove { earlier: true, ..done.clone() });
                continue;
            }
            let source = DataSource { project: project.clone(), volume: volume.clone(), ..Default::default() };
            report.info(&format!("{}: moving volume {volume} to {}", a.name, b.name));
            let started = Instant::now();
            match pipe(&mut host_a.conn, &a.name, &mut conn_b, &b.name, source.clone(), source).await {
                Ok((bytes, sha256)) => {
                    let m = VolumeMove {
                        volume: volume.clone(),
                        bytes,
                        sha256,
                        ms: started.elapsed().as_millis() as u64,
                        earlier: false,
                    };
                    report.info(&format!(
                        "{}: volume {volume}: {} in {:.1} s, sha256 {} checked",
                        b.name,
                        bytes_human(bytes),
                        m.ms as f64 / 1000.0,
                        &m.sha256[..12]
                    ));
                    record.volumes.push(m.clone());
                    record.save(&record_path)?;
                    out.volumes.push(m);
                }
                Err(e @ ControllerError::Agent { .. })
                    if e.failure_kind() == Some(mlops_proto::v1::FailureKind::NotFound)
                        && matches!(&e, ControllerError::Agent { call: "ExportData", .. }) =>
                {
                    report.info(&format!(
                        "{}: volume {volume} does not exist there (never used): nothing to move",
                        a.name
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        conn_b.close().await;
        let total: u64 = out.volumes.iter().filter(|v| !v.earlier).map(|v| v.bytes).sum();
        let detail = format!("{} volume(s), {} moved", out.volumes.len(), bytes_human(total));
        lap(&mut out, "transfer", detail);

        // 4. B runs the moved data, healthy.
        deployed(deploy::deploy(&only_b, &deploy_opts, report.clone()).await?, &b.name)?;
        lap(&mut out, "switch", format!("stack `{project}` healthy on {} with the moved data", b.name));
        Ok::<_, ControllerError>(())
    }
    .await;
    if let Err(e) = moved {
        report.warn(&format!("the migration stopped: {e}; starting stack `{project}` on {} again", a.name));
        let restarted = restart(&mut host_a.conn, &a.name, &project, opts, &progress_a).await;
        host_a.close().await;
        return Err(match restarted {
            Ok(()) => {
                // Nothing of A is stopped by this migration any more.
                let _ = std::fs::remove_file(&record_path);
                e
            }
            Err(r) => {
                report.warn(&format!("{} could not be started again: {r}", a.name));
                e
            }
        });
    }
    out.downtime_ms = quiesced.elapsed().as_millis() as u64;
    out.inventory = inventory_change(&a, &b);
    report.info(&out.inventory);

    if opts.decommission {
        let only_a = setup.only(vec![a.clone()]);
        host_a.close().await;
        let (_, down) = super::down::down(&only_a, &opts.stack, true, report.clone()).await?;
        if let Some((_, e)) = down.failed.into_iter().next() {
            return Err(e);
        }
        let gone = super::uninstall::uninstall(&only_a, false, report.clone()).await;
        if let Some((_, e)) = gone.failed.into_iter().next() {
            return Err(e);
        }
        out.decommissioned = true;
        lap(&mut out, "decommission", format!("stack `{project}`, its volumes and the agent removed from {}", a.name));
    } else {
        host_a.close().await;
    }
    let _ = std::fs::remove_file(&record_path);
    Ok(out)
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "nothing running".into() } else { names.join(", ") }
}

/// What the migration would do, for `--dry-run`.
fn dry_run_steps(
    a: &Target,
    b: &Target,
    project: &str,
    running: &[String],
    volumes: &[String],
    opts: &MigrateOptions,
) -> Vec<StepTime> {
    let step = |s: &str, d: String| StepTime { step: s.into(), ms: 0, detail: d };
    vec![
        step(
            "deploy",
            format!("deploy stack `{project}` on {} with {}'s secrets and images; wait until healthy", b.name, a.name),
        ),
        step(
            "quiesce",
            format!(
                "stop {} on {} (dependents first, {} s each before SIGKILL)",
                list(running),
                a.name,
                if opts.stop_timeout == 0 { 10 } else { opts.stop_timeout }
            ),
        ),
        step(
            "transfer",
            if volumes.is_empty() {
                "no named volumes".into()
            } else {
                format!("move volume(s) {}", volumes.join(", "))
            },
        ),
        step("switch", format!("start stack `{project}` on {} with the moved data; wait until healthy", b.name)),
        step(
            "after",
            if opts.decommission {
                format!("remove stack `{project}`, its volumes and the agent from {}", a.name)
            } else {
                format!("leave {} stopped and intact", a.name)
            },
        ),
    ]
}

/// A deploy that failed on its one host, as an error.
fn deployed(report: deploy::DeployReport, host: &str) -> Result<(), ControllerError> {
    match report.hosts.failed.into_iter().next() {
        Some((_, e)) => Err(e),
        None if report.hosts.ok.is_empty() => {
            Err(ControllerError::Local(format!("the deploy to {host} ended without a result")))
        }
        None => Ok(()),
    }
}

async fn connect(target: &Target, setup: &Setup) -> Result<Connected, ControllerError> {
    let (transport, conn) = bootstrap::connect_agent(target, &setup.ctx).await?;
    Ok(Connected { transport, conn })
}

/// A host's agent connection with its transport (closed by [`Self::close`]).
struct Connected {
    transport: crate::transport::SharedTransport,
    conn: AgentConn,
}

impl Connected {
    async fn close(&self) {
        self.transport.close().await;
    }
}

impl std::ops::Deref for Connected {
    type Target = AgentConn;
    fn deref(&self) -> &AgentConn {
        &self.conn
    }
}

impl std::ops::DerefMut for Connected {
    fn deref_mut(&mut self) -> &mut AgentConn {
        &mut self.conn
    }
}

async fn status(conn: &mut AgentConn, project: &str) -> Result<Vec<mlops_proto::v1::ServiceState>, ControllerError> {
    let host = conn.host().to_string();
    let reply = conn.raw().stack_status(StackStatusRequest { project: project.to_string() }).await;
    Ok(reply.map_err(|s| ControllerError::from_status(&host, "StackStatus", &s))?.into_inner().services)
}

async fn stop(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    services: &[String],
    timeout: u32,
) -> Result<Vec<String>, ControllerError> {
    let request = StopServicesRequest {
        project: project.to_string(),
        services: services.to_vec(),
        timeout_seconds: timeout,
        holder: stack::holder(),
    };
    let reply = conn.raw().stop_services(request).await;
    Ok(reply.map_err(|s| ControllerError::from_status(host, "StopServices", &s))?.into_inner().stopped)
}

/// The stack's images A has, as sources for B.
async fn image_sources(
    host_a: &mut bootstrap::Prepared,
    name: &str,
    stack: &mlops_proto::stack::Stack,
    project: &str,
) -> Result<ImageSources, ControllerError> {
    let request = ImagePlanRequest {
        stack_json: serde_json::to_string(stack).expect("serializable"),
        files_root: stack::files_root(project),
    };
    let reply = host_a.conn.raw().image_plan(request).await;
    let images = reply.map_err(|s| ControllerError::from_status(name, "ImagePlan", &s))?.into_inner().images;
    let client = host_a.client();
    let found: HashMap<_, _> = images
        .into_iter()
        .filter(|i| !i.id.is_empty())
        .map(|i| ((i.tag, i.context_hash), Ok(Source::new(name, client.clone(), i.id, false))))
        .collect();
    Ok(ImageSources::new(found))
}

/// Streams `source` on one host into `target` on another; the bytes and
/// the sha256 the receiver checked.
async fn pipe(
    from: &mut AgentConn,
    from_host: &str,
    to: &mut AgentConn,
    to_host: &str,
    source: DataSource,
    target: DataSource,
) -> Result<(u64, String), ControllerError> {
    let mut stream = from
        .raw()
        .export_data(ExportDataRequest { source: Some(source) })
        .await
        .map_err(|s| ControllerError::from_status(from_host, "ExportData", &s))?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DataChunk { target: Some(target), ..Default::default() }).await.expect("the receiver is here");
    // A failed export must fail the import, not end it early: the import
    // call is dropped (cancelled) when forwarding returns an error, and
    // an import without the end marker counts for nothing anyway.
    let from_host = from_host.to_string();
    let forward = async move {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| ControllerError::from_status(&from_host, "ExportData", &s))?;
            let end = chunk.end;
            if tx.send(chunk).await.is_err() || end {
                break;
            }
        }
        Ok::<_, ControllerError>(())
    };
    let import = async {
        to.raw()
            .import_data(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ControllerError::from_status(to_host, "ImportData", &s))
    };
    let ((), reply) = tokio::try_join!(forward, import)?;
    Ok((reply.bytes, reply.sha256))
}

/// Starts A's stack again as it was: its newest revision, health-gated.
async fn restart(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    opts: &MigrateOptions,
    progress: &Progress,
) -> Result<(), ControllerError> {
    let reply = conn.raw().revisions(RevisionsRequest { project: project.to_string() }).await;
    let revisions = reply.map_err(|s| ControllerError::from_status(host, "Revisions", &s))?.into_inner().revisions;
    let Some(newest) = revisions.iter().map(|r| r.number).max() else {
        return Err(ControllerError::Local(format!("{host} keeps no revision of stack `{project}` to start")));
    };
    let request = RollbackRequest {
        project: project.to_string(),
        to: newest,
        holder: stack::holder(),
        health_timeout_seconds: opts.health_timeout,
        ..Default::default()
    };
    let events = conn.raw().rollback(request).await.map_err(|s| ControllerError::from_status(host, "Rollback", &s))?;
    stack::follow(host, "Rollback", events.into_inner(), progress).await?;
    Ok(())
}

/// The one-line change that points the inventory at B.
fn inventory_change(a: &Target, b: &Target) -> String {
    match (a.origin.as_str(), b.origin.as_str()) {
        ("--host", _) => {
            format!("stack now served by {}: use `--host {}` where you used `--host {}`", b.name, b.name, a.name)
        }
        (origin, _) => format!(
            "inventory {origin}: stack now served by {}; put {} in {}'s groups ({}) in place of it",
            b.name,
            b.name,
            a.name,
            if a.groups.is_empty() { "none".to_string() } else { a.groups.join(", ") }
        ),
    }
}
