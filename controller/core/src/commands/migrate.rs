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
//! 2. **Quiesce** (every run, A may have run again since the last): with
//!    `x-mlops.migrate.airflow`, the DAGs not paused are recorded (once)
//!    and paused; A's held services stop first, then the rest but its
//!    database (Docker's stop: SIGTERM, then SIGKILL after
//!    `--stop-timeout`), dependents first; then B's. Containers and
//!    volumes stay. If A had to be stopped again after an earlier attempt
//!    moved data, everything is moved again.
//! 3. **Transfer**: the database by `pg_dumpall` into `psql`, every other
//!    named volume streamed from A's agent through this controller into
//!    B's (`ExportData` into `ImportData`), checked by sha256 and length
//!    at B; a volume already moved is not moved again.
//! 4. **Verify**: row counts of every table and the stack's checks equal
//!    on both hosts; Airflow's admin login and A's newest DAG run on B.
//! 5. **Switch**: the paused set restored on B, B's whole stack converged
//!    and healthy; A's database stopped; the inventory entry pointed at B
//!    (edited in place when it can be, else printed). A stays stopped and
//!    intact, unless `--decommission` removes its stack, volumes and agent.
//!
//! When a step after the quiesce and before the switch succeeded fails, B
//! is stopped and then A started again as it was (its newest revision,
//! health-gated, its paused set), and the command fails: A keeps its data
//! until B is verified. If B cannot be stopped, A is left stopped (the two
//! must not run side by side) and the record stays for the next run.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use mlops_inventory::Target;
use mlops_proto::v1::{
    DataChunk, DataSource, ExecRequest, ExportDataRequest, ImagePlanRequest, PutSecretsRequest, RevisionsRequest,
    RollbackRequest, StackStatusRequest, StopServicesRequest,
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
    /// Also move the volumes `x-mlops.migrate.optional` names (metrics).
    pub with_metrics: bool,
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
    /// The database, by dump and restore (`x-mlops.migrate.database`).
    pub database: Option<VolumeMove>,
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
    /// A's services were (being) stopped by this migration.
    a_stopped: bool,
    /// Volumes moved (and checked) while A stayed stopped.
    volumes: Vec<VolumeMove>,
    /// Airflow: the DAGs that were not paused on A (recorded before A's
    /// are paused; restored on B at the switch, or on A when it starts again).
    #[serde(default)]
    unpaused: Option<Vec<String>>,
    /// B holds A's data, checked: what is left is the switch.
    #[serde(default)]
    verified: bool,
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

/// What the stack's `x-mlops.migrate` asks for, reduced to what this
/// model has (services skipped or in profiles that are off drop out).
#[derive(Clone)]
pub(super) struct Plan {
    /// Held services, in the order they stop (dependents first).
    pub(super) hold: Vec<String>,
    /// Every other service, dependents first, without the database's.
    pub(super) rest: Vec<String>,
    pub(super) database: Option<mlops_proto::stack::Database>,
    pub(super) airflow: Option<(mlops_proto::stack::AirflowAccess, String)>,
    /// The Docker names of the volumes streamed.
    pub(super) volumes: Vec<String>,
    pub(super) deploy: DeployOptions,
    /// The deploy that runs all but the held services.
    pub(super) deploy_unheld: DeployOptions,
    /// Each service's `depends_on`.
    deps: BTreeMap<String, Vec<String>>,
}

impl Plan {
    pub(super) fn new(
        model: &mlops_proto::stack::Stack,
        opts: &MigrateOptions,
        secrets: &HashMap<String, String>,
    ) -> Result<Plan, ControllerError> {
        let m = &model.options.migrate;
        let mut order = model.start_order().map_err(|e| ControllerError::usage(e, None))?;
        order.reverse();
        let database = m.database.clone().filter(|d| model.services.contains_key(&d.service));
        let hold: Vec<String> = order.iter().filter(|s| m.hold.contains(s)).cloned().collect();
        let rest = order
            .iter()
            .filter(|s| !hold.contains(s) && database.as_ref().is_none_or(|d| &d.service != *s))
            .cloned()
            .collect();
        let airflow = m.airflow.clone().filter(|a| model.services.contains_key(&a.service)).map(|a| {
            let password = secrets.get(&a.admin_password).cloned().unwrap_or_default();
            (a, password)
        });
        let volumes = model
            .volumes
            .iter()
            .filter(|(k, v)| !v.external && database.as_ref().is_none_or(|d| &d.volume != *k))
            .filter(|(k, _)| opts.with_metrics || !m.optional.contains(k))
            .map(|(k, _)| model.volume_name(k))
            .collect();
        let deploy = DeployOptions {
            stack: opts.stack.clone(),
            no_stack: false,
            install_docker: opts.install_docker,
            expose: opts.expose,
            health_timeout: opts.health_timeout,
            rotating: Vec::new(),
            rollout: Default::default(),
            local_images: opts.local_images,
            min_free_space: super::deploy::DEFAULT_MIN_FREE_SPACE,
        };
        let mut deploy_unheld = deploy.clone();
        deploy_unheld.stack.skip.extend(hold.iter().cloned());
        let deps =
            model.services.iter().map(|(name, s)| (name.clone(), s.depends_on.keys().cloned().collect())).collect();
        Ok(Plan { hold, rest, database, airflow, volumes, deploy, deploy_unheld, deps })
    }

    /// Whether `service` depends on `on`, directly or through others.
    fn depends(&self, service: &str, on: &str) -> bool {
        let mut seen = std::collections::BTreeSet::new();
        let mut next = vec![service];
        while let Some(s) = next.pop() {
            for d in self.deps.get(s).into_iter().flatten() {
                if d == on {
                    return true;
                }
                if seen.insert(d.as_str()) {
                    next.push(d);
                }
            }
        }
        false
    }

    /// The wave each of `list` stops in: after every service of `list`
    /// that depends on it (directly or through services not in `list`),
    /// so dependents stop first and services that do not depend on each
    /// other stop together (one by one, the platform's dozen services took
    /// minutes to stop).
    pub(super) fn waves(&self, list: &[String]) -> Vec<u32> {
        let mut wave = vec![0u32; list.len()];
        // At most one pass per service: a chain of n needs n − 1.
        for _ in 0..list.len() {
            let mut changed = false;
            for (i, s) in list.iter().enumerate() {
                for (j, d) in list.iter().enumerate() {
                    if i != j && self.depends(d, s) && wave[i] < wave[j] + 1 {
                        wave[i] = wave[j] + 1;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        wave
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
    let record = match Record::load(&record_path)? {
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
                "resuming the migration of stack `{project}` from {} to {} ({} volume(s) already moved{})",
                a.name,
                b.name,
                r.volumes.len(),
                if r.verified { ", verified" } else { "" }
            ));
            r
        }
        None => Record { from: a.name.clone(), to: b.name.clone(), ..Default::default() },
    };
    let out = MigrateReport {
        project: project.clone(),
        from: a.name.clone(),
        to: b.name.clone(),
        dry_run: opts.dry_run,
        ..Default::default()
    };

    // A: its agent current, what it runs and holds.
    let bundles = Bundle::for_targets(&setup.state, &[a.clone(), b.clone()])?;
    let progress_a = Progress::new(Some(report.clone()), &a.name);
    let host_a = bootstrap::prepare_host(&a, &setup.ctx, &bundles[&a.name], &progress_a).await?;
    let mut run = Run {
        setup,
        opts,
        report: report.clone(),
        project,
        a,
        b,
        record,
        record_path,
        out,
        clock: Instant::now(),
        host_a,
        quiesced: None,
        paused: None,
        rekey: None,
    };
    let result = run.steps(&bundles).await;
    let Run { mut host_a, mut out, record_path, a, project, paused, rekey, .. } = run;
    match result {
        Ok(()) => {}
        Err((e, false)) => {
            host_a.close().await;
            return Err(e);
        }
        Err((e, true)) => {
            // A was stopped: it runs again as it was. B stops first, so that
            // its copy (its schedulers, if the switch began) never runs
            // beside A.
            report.warn(&format!("the migration stopped: {e}; starting stack `{project}` on {} again", a.name));
            let b = setup.host(&opts.to)?;
            let b_stopped = match connect(&b, setup).await {
                Ok(mut conn_b) => {
                    let stopped = stop(&mut conn_b, &b.name, &project, None, opts.stop_timeout).await;
                    conn_b.close().await;
                    stopped.map(|_| ())
                }
                Err(c) => Err(c),
            };
            if let Err(s) = b_stopped {
                report.warn(&format!(
                    "{}: its copy of the stack could not be stopped ({s}); {} is left stopped so that the two never run side by side: run this migration again, or stop {} and deploy to {}",
                    b.name, a.name, b.name, a.name
                ));
                host_a.close().await;
                return Err(e);
            }
            match restart(&mut host_a.conn, &a.name, &project, opts, paused, &progress_a).await {
                Ok(()) => {
                    // Nothing of A is stopped by this migration any more.
                    let _ = std::fs::remove_file(&record_path);
                }
                Err(r) => report.warn(&format!("{} could not be started again: {r}", a.name)),
            }
            host_a.close().await;
            return Err(e);
        }
    }
    if opts.dry_run {
        host_a.close().await;
        return Ok(out);
    }
    report.info(&out.inventory);
    host_a.close().await;
    if let Some(target) = rekey {
        let rekeyed = async {
            let bundles = Bundle::for_targets(&setup.state, std::slice::from_ref(&target))?;
            let progress = Progress::new(Some(report.clone()), &target.name);
            bootstrap::prepare_host(&target, &setup.ctx, &bundles[&target.name], &progress).await?.close().await;
            Ok::<_, ControllerError>(())
        };
        if let Err(e) = rekeyed.await {
            report.warn(&format!(
                "{}: its agent could not be keyed as `{}` ({e}); `mlopsctl deploy -i INVENTORY --limit {}` does it",
                opts.to, target.name, target.name
            ));
        }
    }
    if opts.decommission {
        let clock = Instant::now();
        let only_a = setup.only(vec![a.clone()]);
        let (_, down) = super::down::down(&only_a, &opts.stack, true, report.clone()).await?;
        if let Some((_, e)) = down.failed.into_iter().next() {
            return Err(e);
        }
        let gone = super::uninstall::uninstall(&only_a, false, report.clone()).await;
        if let Some((_, e)) = gone.failed.into_iter().next() {
            return Err(e);
        }
        out.decommissioned = true;
        out.steps.push(StepTime {
            step: "decommission".into(),
            ms: clock.elapsed().as_millis() as u64,
            detail: format!("stack `{project}`, its volumes and the agent removed from {}", a.name),
        });
    }
    let _ = std::fs::remove_file(&record_path);
    Ok(out)
}

/// One migration under way.
struct Run<'a> {
    setup: &'a Setup,
    opts: &'a MigrateOptions,
    report: Arc<dyn Report>,
    project: String,
    a: Target,
    b: Target,
    record: Record,
    record_path: PathBuf,
    out: MigrateReport,
    clock: Instant,
    host_a: bootstrap::Prepared,
    /// When A's stack stopped serving.
    quiesced: Option<Instant>,
    /// A's DAGs this migration paused, to unpause when A starts again.
    paused: Option<(mlops_proto::stack::AirflowAccess, Vec<String>)>,
    /// B under A's inventory name, once the inventory points it there.
    rekey: Option<Target>,
}

/// An error, and whether A was stopped by then (and must start again).
type StepError = (ControllerError, bool);

impl Run<'_> {
    /// Says which task instances run on A, if any (`warn`: as a warning).
    async fn tasks_running(&mut self, d: &mlops_proto::stack::Database, why: &str, warn: bool) {
        let busy = sql(&mut self.host_a.conn, &self.a.name, &self.project, d, RUNNING_TASKS).await.unwrap_or_default();
        if !busy.trim().is_empty() {
            let text = format!("{}: {why}: {}", self.a.name, busy.lines().collect::<Vec<_>>().join(", "));
            if warn { self.report.warn(&text) } else { self.report.info(&text) }
        }
    }

    fn lap(&mut self, step: &str, detail: String) {
        self.out.steps.push(StepTime { step: step.into(), ms: self.clock.elapsed().as_millis() as u64, detail });
        self.clock = Instant::now();
    }

    fn save(&self) -> Result<(), ControllerError> {
        self.record.save(&self.record_path)
    }

    async fn steps(&mut self, bundles: &BTreeMap<String, Bundle>) -> Result<(), StepError> {
        let before = |e: ControllerError| (e, false);
        let (a, b, project) = (self.a.clone(), self.b.clone(), self.project.clone());
        let services = status(&mut self.host_a.conn, &project).await.map_err(before)?;
        if services.is_empty() {
            return Err(before(ControllerError::usage(
                format!("stack `{project}` has no containers on {}: there is nothing to migrate", a.name),
                Some(
                    "name the stack with --stack (or --project) as it was deployed, and the host it runs on with --from",
                ),
            )));
        }
        let secrets = crate::secrets::held_by(&mut self.host_a.conn, &project).await.map_err(before)?;
        let model =
            self.opts.stack.load_model_with(&self.setup.state, &crate::progress::Quiet, &secrets).map_err(before)?;
        let plan = Plan::new(&model.stack, self.opts, &secrets.clone().into_iter().collect()).map_err(before)?;
        let running: Vec<String> =
            services.iter().filter(|s| s.state == "running").map(|s| s.service.clone()).collect();
        let missing: Vec<&str> = model
            .stack
            .services
            .keys()
            .filter(|name| !services.iter().any(|s| &&s.service == name))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            // Part of a stack split between hosts, or deployed with other
            // flags: moving it would start the rest on B too.
            return Err(before(ControllerError::usage(
                format!("{} runs only part of stack `{project}`: not {}", a.name, missing.join(", ")),
                Some(
                    "migrate moves a stack that runs whole on one host; name it as it was deployed (--skip, --profile), or move roles of a split stack by changing the inventory and deploying",
                ),
            )));
        }
        let extra: Vec<&str> =
            services.iter().map(|s| s.service.as_str()).filter(|s| !model.stack.services.contains_key(*s)).collect();
        if !extra.is_empty() {
            return Err(before(ControllerError::usage(
                format!(
                    "{} runs services of stack `{project}` that this model leaves out: {}",
                    a.name,
                    extra.join(", ")
                ),
                Some("name the stack as it was deployed (--skip, --profile): their data would stay behind"),
            )));
        }
        let unmoved: Vec<&String> =
            if self.opts.with_metrics { Vec::new() } else { model.stack.options.migrate.optional.iter().collect() };
        if self.opts.decommission && !unmoved.is_empty() {
            return Err(before(ControllerError::usage(
                format!(
                    "--decommission would remove volume(s) {} from {}, which move only with --with-metrics",
                    unmoved.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                    a.name
                ),
                Some("add --with-metrics, or decommission the old host yourself once you no longer need them"),
            )));
        }
        if running.is_empty() && !self.record.a_stopped {
            // What a finished migration leaves behind: moving it again
            // would put old data over the new host's.
            return Err(before(ControllerError::usage(
                format!("stack `{project}` runs no service on {}: it may have been moved already", a.name),
                Some(&format!(
                    "migrate moves a running stack; to move {}'s data anyway, start the stack there first (`mlopsctl deploy`)",
                    a.name
                )),
            )));
        }
        self.lap(
            "inspect",
            format!(
                "{} service(s), {} running, {} volume(s) to stream",
                services.len(),
                running.len(),
                plan.volumes.len()
            ),
        );
        if self.opts.dry_run {
            let sizes = sizes(&mut self.host_a.conn, &a.name, &project, &model.stack, &plan, &running).await;
            let steps = dry_run_steps(&a, &b, &project, &running, &plan, &sizes, self.opts);
            self.out.steps.extend(steps);
            return Ok(());
        }

        // 1. B deployed (held services left out), healthy, with A's secrets and images.
        let only_b = self.setup.only(vec![b.clone()]);
        if self.record.a_stopped && self.record.b_deployed {
            // B was deployed before A stopped; its containers may be gone
            // with a half-moved volume, and come back at the switch.
            self.lap("deploy", format!("done by the earlier attempt on {}", b.name));
        } else {
            let progress_b = Progress::new(Some(self.report.clone()), &b.name);
            let mut host_b =
                bootstrap::prepare_host(&b, &self.setup.ctx, &bundles[&b.name], &progress_b).await.map_err(before)?;
            let held = hold_secrets(&mut host_b.conn, &b.name, &project, &secrets, &a.name).await;
            host_b.close().await;
            held.map_err(before)?;
            let seed = image_sources(&mut self.host_a, &a.name, &model.stack, &project, self.opts.local_images)
                .await
                .map_err(before)?;
            let deployed_b = deploy::deploy_with(&only_b, &plan.deploy_unheld, self.report.clone(), seed).await;
            deployed(deployed_b.map_err(before)?, &b.name).map_err(before)?;
            self.record.b_deployed = true;
            self.save().map_err(before)?;
            let held = if plan.hold.is_empty() { String::new() } else { format!("; held: {}", plan.hold.join(", ")) };
            self.lap("deploy", format!("stack `{project}` healthy on {}{held}", b.name));
        }

        // From here A is (being) stopped: any failure starts it again.
        let after = |e: ControllerError| (e, true);
        self.quiesced = Some(Instant::now());
        self.steps_after_quiesce(&plan, &only_b).await.map_err(after)?;
        self.out.downtime_ms = self.quiesced.map_or(0, |q| q.elapsed().as_millis() as u64);
        let (change, edited) = inventory_change(&a, &b, &self.setup.ssh_config);
        self.out.inventory = change;
        if edited {
            // The inventory's name for A now means B: B's agent is keyed
            // under it (its certificate names the host), or the next
            // command would refuse it.
            self.rekey = Some(Target { connection: b.connection.clone(), ..a.clone() });
        }
        Ok(())
    }

    async fn steps_after_quiesce(&mut self, plan: &Plan, only_b: &Setup) -> Result<(), ControllerError> {
        let (a, b, project) = (self.a.clone(), self.b.clone(), self.project.clone());
        let mut conn_b = connect(&b, self.setup).await?;
        let result = self.move_and_switch(plan, only_b, &mut conn_b).await;
        conn_b.close().await;
        result?;
        // A stopped entirely: its database too, now that B serves. B is
        // live from here: a failure is a warning, never a return to A.
        if let Some(d) = &plan.database {
            let only = Some((std::slice::from_ref(&d.service), vec![0]));
            if let Err(e) = stop(&mut self.host_a.conn, &a.name, &project, only, self.opts.stop_timeout).await {
                self.report.warn(&format!("{}: its database could not be stopped ({e}); stop it by hand", a.name));
            }
        }
        Ok(())
    }

    async fn move_and_switch(
        &mut self,
        plan: &Plan,
        only_b: &Setup,
        conn_b: &mut Connected,
    ) -> Result<(), ControllerError> {
        let (a, b, project) = (self.a.clone(), self.b.clone(), self.project.clone());
        let timeout = self.opts.stop_timeout;
        // 2. Quiesce, on every run: A may have run again since an earlier
        //    attempt (then what was moved is stale, verification included).
        if !self.record.a_stopped {
            self.record.a_stopped = true;
            self.save()?;
        }
        if let (Some((af, _)), Some(d)) = (&plan.airflow, &plan.database) {
            if self.record.unpaused.is_none() {
                let listed = sql(&mut self.host_a.conn, &a.name, &project, d, UNPAUSED).await?;
                let (ids, odd): (Vec<String>, Vec<String>) =
                    listed.lines().map(str::to_string).partition(|id| is_dag_id(id));
                if !odd.is_empty() {
                    self.report.warn(&format!("{}: ignored DAG ids that are not Airflow's: {odd:?}", a.name));
                }
                self.record.unpaused = Some(ids);
                self.save()?;
            }
            let unpaused = self.record.unpaused.clone().unwrap_or_default();
            self.paused = Some((af.clone(), unpaused.clone()));
            // Paused through the API server's CLI while it runs (an
            // earlier attempt may have paused them and stopped it).
            let api_runs = status(&mut self.host_a.conn, &project)
                .await?
                .iter()
                .any(|s| s.service == af.service && s.state == "running");
            if !unpaused.is_empty() && api_runs {
                airflow(&mut self.host_a.conn, &a.name, &project, af, &["dags", "pause"], &unpaused).await?;
                self.report.info(&format!("{}: paused {} DAG(s): {}", a.name, unpaused.len(), unpaused.join(", ")));
            }
            self.tasks_running(d, &format!("waiting up to {timeout} s for running task(s) to finish"), false).await;
        }
        let held = Some((plan.hold.as_slice(), plan.waves(&plan.hold)));
        let stopped_held = stop(&mut self.host_a.conn, &a.name, &project, held, timeout).await?;
        if let (Some(_), Some(d)) = (&plan.airflow, &plan.database) {
            let why = format!(
                "still running when the workers stopped after {timeout} s (Airflow handles them as it does any worker lost mid-task)"
            );
            self.tasks_running(d, &why, true).await;
        }
        let rest = Some((plan.rest.as_slice(), plan.waves(&plan.rest)));
        let stopped_rest = stop(&mut self.host_a.conn, &a.name, &project, rest, timeout).await?;
        let ran_again = !(stopped_held.is_empty() && stopped_rest.is_empty());
        if ran_again && (self.record.verified || !self.record.volumes.is_empty()) {
            self.report.warn(&format!("{} ran again since the last attempt: everything is moved again", a.name));
            self.record.volumes.clear();
            self.record.verified = false;
            self.save()?;
        }
        let mut stopped_a = stopped_held;
        stopped_a.extend(stopped_rest);
        if !self.record.verified {
            // B's copy stops too, but for its database.
            let keep_db: Vec<String> = plan.database.iter().map(|d| d.service.clone()).collect();
            let b_all = status(conn_b, &project).await?;
            let b_rest: Vec<String> =
                b_all.iter().map(|s| s.service.clone()).filter(|s| !keep_db.contains(s)).collect();
            let stopped_b =
                stop(conn_b, &b.name, &project, Some((b_rest.as_slice(), plan.waves(&b_rest))), timeout).await?;
            self.lap(
                "quiesce",
                format!("stopped on {}: {}; on {}: {}", a.name, list(&stopped_a), b.name, list(&stopped_b)),
            );

            // 3. Transfer: the database by dump and restore, the volumes as streams.
            let mut verified = Vec::new();
            if let Some(d) = &plan.database {
                let started = Instant::now();
                self.report
                    .info(&format!("{}: dumping database `{}` (roles included) into {}", a.name, d.service, b.name));
                let dump = dump_source(&project, d);
                let (restore, marker) = restore_target(&project, d);
                let mut attempt = 1;
                let reply = loop {
                    let reply =
                        pipe(&mut self.host_a.conn, &a.name, conn_b, &b.name, dump.clone(), restore.clone()).await?;
                    let done = restored(self.report.as_ref(), &b.name, d, &marker, reply, &mut attempt)
                        .map_err(|e| ControllerError::Local(format!("{e}; nothing was switched")))?;
                    if let Some(reply) = done {
                        break reply;
                    }
                };
                self.report.info(&format!(
                    "{}: database restored: {} in {:.1} s, sha256 {} checked",
                    b.name,
                    bytes_human(reply.bytes),
                    started.elapsed().as_secs_f64(),
                    &reply.sha256[..12]
                ));
                self.out.database = Some(VolumeMove {
                    volume: format!("database in `{}`", d.service),
                    bytes: reply.bytes,
                    sha256: reply.sha256,
                    ms: started.elapsed().as_millis() as u64,
                    earlier: false,
                });
            }
            for volume in &plan.volumes {
                if let Some(done) = self.record.volumes.iter().find(|v| &v.volume == volume) {
                    self.out.volumes.push(VolumeMove { earlier: true, ..done.clone() });
                    continue;
                }
                let source = DataSource { project: project.clone(), volume: volume.clone(), ..Default::default() };
                self.report.info(&format!("{}: moving volume {volume} to {}", a.name, b.name));
                let started = Instant::now();
                match pipe(&mut self.host_a.conn, &a.name, conn_b, &b.name, source.clone(), source).await {
                    Ok(reply) => {
                        let m = VolumeMove {
                            volume: volume.clone(),
                            bytes: reply.bytes,
                            sha256: reply.sha256,
                            ms: started.elapsed().as_millis() as u64,
                            earlier: false,
                        };
                        self.report.info(&format!(
                            "{}: volume {volume}: {} in {:.1} s, sha256 {} checked",
                            b.name,
                            bytes_human(m.bytes),
                            m.ms as f64 / 1000.0,
                            &m.sha256[..12]
                        ));
                        self.record.volumes.push(m.clone());
                        self.save()?;
                        self.out.volumes.push(m);
                    }
                    Err(e @ ControllerError::Agent { call: "ExportData", .. })
                        if e.failure_kind() == Some(mlops_proto::v1::FailureKind::NotFound) =>
                    {
                        self.report.info(&format!(
                            "{}: volume {volume} does not exist there (never used): nothing to move",
                            a.name
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
            let total: u64 = self.out.volumes.iter().filter(|v| !v.earlier).map(|v| v.bytes).sum::<u64>()
                + self.out.database.as_ref().map_or(0, |d| d.bytes);
            let detail = format!(
                "{} volume(s){}, {} moved",
                self.out.volumes.len(),
                if plan.database.is_some() { " and the database" } else { "" },
                bytes_human(total)
            );
            self.lap("transfer", detail);

            // 4. Verify before switching.
            if let Some(d) = &plan.database {
                let mut checks = vec![("row counts of every table".to_string(), ROW_COUNTS.to_string())];
                checks.extend(d.verify.iter().map(|(k, v)| (k.clone(), v.clone())));
                for (name, query) in checks {
                    let here = sql(&mut self.host_a.conn, &a.name, &project, d, &query).await?;
                    let there = sql(conn_b, &b.name, &project, d, &query).await?;
                    if here != there {
                        let differ: Vec<String> = diff_lines(&here, &there);
                        return Err(ControllerError::Local(format!(
                            "verification failed: {name} differ between {} and {}: {}",
                            a.name,
                            b.name,
                            differ.join("; ")
                        )));
                    }
                    let n = here.lines().count();
                    verified.push(format!("{name} equal ({n} line(s))"));
                }
            }
            if let (Some((af, password)), Some(d)) = (&plan.airflow, &plan.database) {
                let last = sql(&mut self.host_a.conn, &a.name, &project, d, LAST_RUN).await?;
                // B's API server up (the held services still held), then
                // the admin's login and A's newest DAG run through it.
                deployed(deploy::deploy(only_b, &plan.deploy_unheld, self.report.clone()).await?, &b.name)?;
                let seen = api_check(conn_b, &b.name, &project, af, password, last.trim()).await?;
                verified.push(format!("{} logs in on {}{seen}", af.admin_user, b.name));
            }
            if plan.database.is_none() {
                verified.push("every volume's sha256 and length checked on arrival".into());
            }
            self.record.verified = true;
            self.save()?;
            self.lap("verify", verified.join("; "));
        }

        // 5. Switch: the paused set as it was, then everything on B.
        if let (Some((af, _)), Some(unpaused)) = (&plan.airflow, &self.record.unpaused)
            && !unpaused.is_empty()
        {
            airflow(conn_b, &b.name, &project, af, &["dags", "unpause"], unpaused).await?;
        }
        deployed(deploy::deploy(only_b, &plan.deploy, self.report.clone()).await?, &b.name)?;
        let unpaused = self
            .record
            .unpaused
            .as_ref()
            .map(|u| format!("; unpaused as on {}: {}", a.name, list(u)))
            .unwrap_or_default();
        self.lap("switch", format!("stack `{project}` healthy on {} with the moved data{unpaused}", b.name));
        Ok(())
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "nothing running".into() } else { names.join(", ") }
}

/// The rate the estimate of `--dry-run` assumes for the transfer (dump and
/// restore, volume streams): what `mlops-bench-migrate` measured end to
/// end, agent to controller to agent over SSH (44 MB/s for streams; a
/// 1 GB dump restored at about the same). Slower links and disks take
/// longer.
const ESTIMATE_BYTES_PER_SECOND: f64 = 40e6;

/// What `--dry-run` reports A holds: the database's size on disk (every
/// database, as `pg_database_size` counts it; the dump is smaller, without
/// indexes) and each streamed volume's, by `du` in a running service that
/// mounts it. `None` where that cannot be read (no such service running,
/// no `du` in its image).
#[derive(Debug, Default)]
struct Sizes {
    /// Set when the stack has a database to move.
    database: Option<Option<u64>>,
    volumes: Vec<(String, Option<u64>)>,
}

impl Sizes {
    fn known(&self) -> u64 {
        self.database.flatten().unwrap_or(0) + self.volumes.iter().filter_map(|(_, s)| *s).sum::<u64>()
    }

    fn unknown(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        if self.database == Some(None) {
            names.push("the database");
        }
        names.extend(self.volumes.iter().filter(|(_, s)| s.is_none()).map(|(v, _)| v.as_str()));
        names
    }
}

async fn sizes(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    model: &mlops_proto::stack::Stack,
    plan: &Plan,
    running: &[String],
) -> Sizes {
    let mut out = Sizes::default();
    if let Some(d) = &plan.database {
        let q = "SELECT sum(pg_database_size(datname))::bigint FROM pg_catalog.pg_database";
        out.database = Some(if running.contains(&d.service) {
            sql(conn, host, project, d, q).await.ok().and_then(|o| o.trim().parse().ok())
        } else {
            None
        });
    }
    for volume in &plan.volumes {
        let key = model.volumes.keys().find(|k| &model.volume_name(k) == volume);
        let mount = key.and_then(|k| {
            model.services.iter().filter(|(name, _)| running.contains(name)).find_map(|(name, s)| {
                s.volumes
                    .iter()
                    .find(|m| m.kind == mlops_proto::stack::MountKind::Volume && &m.source == k)
                    .map(|m| (name.clone(), m.target.clone()))
            })
        });
        let mut size = None;
        if let Some((service, target)) = mount {
            let request = ExecRequest {
                project: project.to_string(),
                service,
                command: vec!["du".into(), "-skx".into(), target],
                timeout_seconds: 120,
                purpose: "migrate --dry-run (sizes)".into(),
                ..Default::default()
            };
            if let Ok(reply) = conn.raw().exec(request).await {
                let reply = reply.into_inner();
                let kib = reply.output.split_whitespace().next().and_then(|n| n.parse::<u64>().ok());
                size = kib.filter(|_| reply.exit_code == 0).map(|k| k * 1024);
            }
        }
        out.volumes.push((volume.clone(), size));
    }
    out
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// What the migration would do, for `--dry-run`.
fn dry_run_steps(
    a: &Target,
    b: &Target,
    project: &str,
    running: &[String],
    plan: &Plan,
    sizes: &Sizes,
    opts: &MigrateOptions,
) -> Vec<StepTime> {
    let step = |s: &str, d: String| StepTime { step: s.into(), ms: 0, detail: d };
    let held = if plan.hold.is_empty() {
        String::new()
    } else {
        format!(" (held until the switch: {})", plan.hold.join(", "))
    };
    let size = |s: Option<u64>| s.map_or_else(|| "size unknown".to_string(), megabytes);
    let mut transfer = Vec::new();
    if let Some(d) = &plan.database {
        transfer.push(format!(
            "database in `{}` ({} on disk) by pg_dumpall into psql (roles included)",
            d.service,
            size(sizes.database.flatten())
        ));
    }
    if !sizes.volumes.is_empty() {
        let each: Vec<String> = sizes.volumes.iter().map(|(v, s)| format!("{v} ({})", size(*s))).collect();
        transfer.push(format!("volume(s) {}", each.join(", ")));
    }
    let unknown = sizes.unknown();
    let estimate = if sizes.known() == 0 && !unknown.is_empty() {
        format!("none: no size could be read on {} ({})", a.name, unknown.join(", "))
    } else {
        format!(
            "{} to move: about {:.0} s at {:.0} MB/s (mlops-bench-migrate's rate; the stop timeouts, B's deploy, which may install Docker and ship images, and the health waits come on top){}",
            megabytes(sizes.known()),
            sizes.known() as f64 / ESTIMATE_BYTES_PER_SECOND,
            ESTIMATE_BYTES_PER_SECOND / 1e6,
            if unknown.is_empty() { String::new() } else { format!("; not counted: {}", unknown.join(", ")) }
        )
    };
    let mut verify = vec![];
    if plan.database.is_some() {
        verify.push("row counts of every table and the stack's checks equal on both hosts".to_string());
    }
    if let Some((af, _)) = &plan.airflow {
        verify.push(format!("{} logs in on {} and A's newest DAG run is listed there", af.admin_user, b.name));
    }
    if verify.is_empty() {
        verify.push("every volume's sha256 and length on arrival".into());
    }
    vec![
        step(
            "deploy",
            format!(
                "deploy stack `{project}` on {} with {}'s secrets and images{held}; wait until healthy",
                b.name, a.name
            ),
        ),
        step(
            "quiesce",
            format!(
                "{}stop {} on {} (held services first; {} s each before SIGKILL)",
                if plan.airflow.is_some() { "record which DAGs are unpaused and pause them; " } else { "" },
                list(running),
                a.name,
                if opts.stop_timeout == 0 { 10 } else { opts.stop_timeout }
            ),
        ),
        step(
            "transfer",
            if transfer.is_empty() { "nothing to move".into() } else { format!("move {}", transfer.join("; ")) },
        ),
        step("verify", verify.join("; ")),
        step("switch", format!("start stack `{project}` on {} with the moved data; wait until healthy", b.name)),
        step(
            "after",
            if opts.decommission {
                format!("remove stack `{project}`, its volumes and the agent from {}", a.name)
            } else {
                format!("leave {} stopped and intact", a.name)
            },
        ),
        step("estimate", estimate),
    ]
}

/// A deploy that failed on its one host, as an error.
pub(super) fn deployed(report: deploy::DeployReport, host: &str) -> Result<(), ControllerError> {
    match report.hosts.failed.into_iter().next() {
        Some((_, e)) => Err(e),
        None if report.hosts.ok.is_empty() => {
            Err(ControllerError::Local(format!("the deploy to {host} ended without a result")))
        }
        None => Ok(()),
    }
}

pub(super) async fn connect(target: &Target, setup: &Setup) -> Result<Connected, ControllerError> {
    let (transport, conn) = bootstrap::connect_agent(target, &setup.ctx).await?;
    Ok(Connected { transport, conn })
}

/// A host's agent connection with its transport (closed by [`Self::close`]).
pub(super) struct Connected {
    transport: crate::transport::SharedTransport,
    conn: AgentConn,
}

impl Connected {
    pub(super) async fn close(&self) {
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

pub(super) async fn status(
    conn: &mut AgentConn,
    project: &str,
) -> Result<Vec<mlops_proto::v1::ServiceState>, ControllerError> {
    let host = conn.host().to_string();
    let reply = conn.raw().stack_status(StackStatusRequest { project: project.to_string() }).await;
    Ok(reply.map_err(|s| ControllerError::from_status(&host, "StackStatus", &s))?.into_inner().services)
}

/// Stops `services` (in that order; `None`: all of the project's at once);
/// the services stopped.
pub(super) async fn stop(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    services: Option<(&[String], Vec<u32>)>,
    timeout: u32,
) -> Result<Vec<String>, ControllerError> {
    // The agent reads an empty list as all of them.
    if services.as_ref().is_some_and(|(s, _)| s.is_empty()) {
        return Ok(Vec::new());
    }
    let (services, waves) = services.map(|(s, w)| (s.to_vec(), w)).unwrap_or_default();
    let request = StopServicesRequest {
        project: project.to_string(),
        services,
        waves,
        timeout_seconds: timeout,
        holder: stack::holder(),
    };
    let reply = conn.raw().stop_services(request).await;
    Ok(reply.map_err(|s| ControllerError::from_status(host, "StopServices", &s))?.into_inner().stopped)
}

/// The stack's images A has, as sources for B: from this machine's engine
/// when it has the same image (`local`: it may be asked), so that A's
/// engine saves nothing and the bytes cross one network, not two.
async fn image_sources(
    host_a: &mut bootstrap::Prepared,
    name: &str,
    stack: &mlops_proto::stack::Stack,
    project: &str,
    local: bool,
) -> Result<ImageSources, ControllerError> {
    let request = ImagePlanRequest {
        stack_json: serde_json::to_string(stack).expect("serializable"),
        files_root: stack::files_root(project),
    };
    let reply = host_a.conn.raw().image_plan(request).await;
    let images = reply.map_err(|s| ControllerError::from_status(name, "ImagePlan", &s))?.into_inner().images;
    let client = host_a.client();
    let engine = match local && images.iter().any(|i| crate::images::pulled(i) && !i.id.is_empty()) {
        true => crate::local_engine::LocalEngine::connect().await,
        false => None,
    };
    // The same ID, for A's platform (an ID may name a multi-platform index).
    let arch_of = BTreeMap::from([(name.to_string(), host_a.arch().to_string())]);
    let a_only = std::collections::BTreeSet::from([name]);
    let mut found = HashMap::new();
    for i in images.into_iter().filter(|i| !i.id.is_empty()) {
        let here = match (&engine, crate::images::pulled(&i)) {
            (Some(engine), true) => engine
                .image(&i.tag)
                .await
                .filter(|l| l.id == i.id && crate::images::unfit_for(l, &a_only, &arch_of).is_none())
                .map(|_| engine.clone()),
            _ => None,
        };
        let source = match here {
            Some(engine) => Source::local(engine, i.id),
            None => Source::new(name, client.clone(), i.id, false),
        };
        found.insert((i.tag, i.context_hash), Ok(source));
    }
    Ok(ImageSources::new(found))
}

/// The stream of `source` on `host` (its chunks' errors are the caller's
/// to name: `ExportData`).
pub(super) async fn export(
    conn: &mut AgentConn,
    host: &str,
    source: DataSource,
) -> Result<tonic::Streaming<DataChunk>, ControllerError> {
    let reply = conn.raw().export_data(ExportDataRequest { source: Some(source) }).await;
    Ok(reply.map_err(|s| ControllerError::from_status(host, "ExportData", &s))?.into_inner())
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
) -> Result<mlops_proto::v1::ImportDataReply, ControllerError> {
    let mut stream = export(from, from_host, source).await?;
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
    Ok(reply)
}

/// Starts A's stack again as it was: its newest revision, health-gated.
async fn restart(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    opts: &MigrateOptions,
    paused: Option<(mlops_proto::stack::AirflowAccess, Vec<String>)>,
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
    if let Some((af, unpaused)) = paused.filter(|(_, u)| !u.is_empty()) {
        airflow(conn, host, project, &af, &["dags", "unpause"], &unpaused).await?;
    }
    Ok(())
}

/// `pg_dumpall --clean` of `d`'s server (roles included): what migrate
/// and backup export.
pub(super) fn dump_source(project: &str, d: &mlops_proto::stack::Database) -> DataSource {
    DataSource {
        project: project.to_string(),
        service: d.service.clone(),
        command: vec!["pg_dumpall".into(), "--clean".into(), "--if-exists".into(), format!("--username={}", d.user)],
        ..Default::default()
    }
}

/// Where a `pg_dumpall --clean` script of `d` is restored (psql in its
/// service) and the marker psql echoes once it has read the script to its
/// end (see [`restored`]).
pub(super) fn restore_target(project: &str, d: &mlops_proto::stack::Database) -> (DataSource, String) {
    // psql says it read the dump to its end: with the input cut short
    // (Docker's exec has been seen to end it early) it would still exit 0,
    // having committed a COPY cut at a line.
    let marker = format!("mlops-restore-read-to-its-end-{}", &crate::secrets::generate()[..16]);
    let target = DataSource {
        project: project.to_string(),
        service: d.service.clone(),
        // Only warnings and errors: notices (`... does not exist,
        // skipping`) would crowd errors out of the output kept.
        env: [("PGOPTIONS".to_string(), "-c client_min_messages=warning".to_string())].into(),
        command: vec![
            "psql".into(),
            "-X".into(),
            "-q".into(),
            format!("--username={}", d.user),
            "-d".into(),
            "postgres".into(),
        ],
        input_trailer: format!("\n\\echo {marker}\n").into_bytes(),
        ..Default::default()
    };
    (target, marker)
}

/// Judges restore number `attempt` of a dump into [`restore_target`]:
/// `Some` when psql read it to its end without errors, `None` when it must
/// be restored again (`attempt` counted up), an error when it failed or
/// was cut short [`RESTORE_ATTEMPTS`] times (the caller says what that
/// leaves).
pub(super) fn restored(
    report: &dyn Report,
    host: &str,
    d: &mlops_proto::stack::Database,
    marker: &str,
    reply: mlops_proto::v1::ImportDataReply,
    attempt: &mut u32,
) -> Result<Option<mlops_proto::v1::ImportDataReply>, ControllerError> {
    let errors = restore_errors(&reply.output, &d.user, reply.exit_code);
    if reply.output.lines().any(|l| l.trim() == marker) {
        errors.map_err(|m| ControllerError::Local(format!("{host}: restoring the database failed: {m}")))?;
        return Ok(Some(reply));
    }
    // Cut mid-line or mid-statement, psql also reports errors: those of a
    // cut input, so a reason to restore again rather than to give up.
    let why = format!(
        "{host}: psql did not read the dump to its end (its input was cut short, or it stopped){}",
        errors.err().map(|m| format!("; it said: {m}")).unwrap_or_default()
    );
    if *attempt >= RESTORE_ATTEMPTS {
        return Err(ControllerError::Local(format!("{why}, {RESTORE_ATTEMPTS} times")));
    }
    *attempt += 1;
    // The dump drops and makes again what it restores: a second run
    // replaces what the first left.
    report.warn(&format!("{why}; restoring again (attempt {attempt} of {RESTORE_ATTEMPTS})"));
    Ok(None)
}

/// Stores `secrets` for `project` on `host` before anything of the stack
/// runs there; refused when the host already holds other values (its data
/// would not open with `from`'s, nor `from`'s with its).
pub(super) async fn hold_secrets(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    secrets: &BTreeMap<String, String>,
    from: &str,
) -> Result<(), ControllerError> {
    let put = PutSecretsRequest {
        project: project.to_string(),
        values: secrets.clone().into_iter().collect(),
        ..Default::default()
    };
    let held = conn.raw().put_secrets(put).await;
    let held = held.map_err(|s| ControllerError::from_status(host, "PutSecrets", &s))?.into_inner().values;
    let differ: Vec<&str> = secrets.iter().filter(|(k, v)| held.get(*k) != Some(*v)).map(|(k, _)| k.as_str()).collect();
    if !differ.is_empty() {
        return Err(ControllerError::usage(
            format!(
                "{host} holds other values of {} for stack `{project}` than {from} (it ran the stack before)",
                differ.join(", ")
            ),
            Some(&format!(
                "the stack's data from {from} would not open with them on {host}; remove the old deployment from {host} first (`mlopsctl down --volumes` and `mlopsctl secrets` there), or use another host"
            )),
        ));
    }
    Ok(())
}

/// Restores of the database tried before a migration gives up, when the
/// engine ends psql's input early.
const RESTORE_ATTEMPTS: u32 = 3;

/// The search path of every check (`PGOPTIONS`): the system catalog only;
/// tables are named with their schema.
const SAFE_PATH: &str = "-c search_path=pg_catalog,pg_temp";
/// The DAGs not paused, one per line.
const UNPAUSED: &str = "SELECT dag_id FROM public.dag WHERE NOT is_paused ORDER BY 1";
/// Task instances running, one per line.
const RUNNING_TASKS: &str = "SELECT dag_id || '.' || task_id || ' (' || run_id || ')' FROM public.task_instance \
    WHERE state IN ('running', 'restarting') ORDER BY 1";
/// The newest DAG run: its DAG and run id.
pub(super) const LAST_RUN: &str = "SELECT dag_id || ' ' || run_id FROM public.dag_run ORDER BY id DESC LIMIT 1";
/// Every table of the live schema (read from the database: the set changes
/// between versions) with its row count, one per line.
pub(super) const ROW_COUNTS: &str = "SELECT table_schema || '.' || table_name || ' ' || \
    (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', table_schema, table_name), false, true, '')))[1]::text \
    FROM information_schema.tables WHERE table_type = 'BASE TABLE' \
    AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1";

/// Runs `query` with psql in the database's service; its rows, one per
/// line, columns joined by `|`.
pub(super) async fn sql(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    d: &mlops_proto::stack::Database,
    query: &str,
) -> Result<String, ControllerError> {
    let request = ExecRequest {
        project: project.to_string(),
        service: d.service.clone(),
        command: ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", &d.user, "-d", &d.database]
            .map(String::from)
            .to_vec(),
        stdin: format!("{query};\n").into_bytes(),
        // Run as the superuser in a database another role owns: nothing
        // that role created (in `public`, or a schema named after the
        // superuser) is found by an unqualified name.
        env: [("PGOPTIONS".to_string(), SAFE_PATH.to_string())].into(),
        timeout_seconds: 300,
        purpose: "migrate".into(),
    };
    let reply =
        conn.raw().exec(request).await.map_err(|s| ControllerError::from_status(host, "Exec", &s))?.into_inner();
    if reply.exit_code != 0 {
        return Err(ControllerError::Local(format!(
            "{host}: a query in `{}` failed (exit {}): {}",
            d.service,
            reply.exit_code,
            reply.output.trim()
        )));
    }
    Ok(reply.output)
}

/// Runs `airflow ARGS --treat-dag-id-as-regex -y REGEX` in the API
/// server's service, REGEX matching exactly `dags`.
async fn airflow(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    af: &mlops_proto::stack::AirflowAccess,
    args: &[&str],
    dags: &[String],
) -> Result<(), ControllerError> {
    let escaped: Vec<String> = dags.iter().map(|d| regex_escape(d)).collect();
    let mut command: Vec<String> = std::iter::once("airflow").chain(args.iter().copied()).map(String::from).collect();
    command.extend(["--treat-dag-id-as-regex".into(), "-y".into(), format!("^({})$", escaped.join("|"))]);
    let request = ExecRequest {
        project: project.to_string(),
        service: af.service.clone(),
        command,
        timeout_seconds: 300,
        purpose: "migrate".into(),
        ..Default::default()
    };
    let reply =
        conn.raw().exec(request).await.map_err(|s| ControllerError::from_status(host, "Exec", &s))?.into_inner();
    if reply.exit_code != 0 {
        return Err(ControllerError::Local(format!(
            "{host}: `airflow {}` failed (exit {}): {}",
            args.join(" "),
            reply.exit_code,
            reply.output.trim()
        )));
    }
    Ok(())
}

/// Whether `id` is a DAG id as Airflow allows them (letters, digits, `_`,
/// `.`, `-`): anything else read from the database is not acted on.
fn is_dag_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 250 && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A DAG id as a regular expression that matches only itself.
fn regex_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Logs in on the API server as the admin (password in the environment,
/// never on the command line) and, when `run` names one (`DAG RUN_ID`),
/// reads that DAG run through the API. Returns what it saw, for the report.
pub(super) async fn api_check(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    af: &mlops_proto::stack::AirflowAccess,
    password: &str,
    run: &str,
) -> Result<String, ControllerError> {
    const SCRIPT: &str = r#"
import json, os, urllib.parse as p, urllib.request as u
base = "http://127.0.0.1:8080"
body = json.dumps({"username": os.environ["MLOPS_USER"], "password": os.environ["MLOPS_PASSWORD"]}).encode()
req = u.Request(base + "/auth/token", data=body, headers={"Content-Type": "application/json"})
token = json.load(u.urlopen(req, timeout=30))["access_token"]
run = os.environ.get("MLOPS_RUN", "")
if run:
    dag, run_id = run.split(" ", 1)
    url = base + "/api/v2/dags/" + p.quote(dag, safe="") + "/dagRuns/" + p.quote(run_id, safe="")
    got = json.load(u.urlopen(u.Request(url, headers={"Authorization": "Bearer " + token}), timeout=30))
    print(got["dag_id"], got["dag_run_id"], got["state"])
print("login ok")
"#;
    let env = [("MLOPS_USER", af.admin_user.as_str()), ("MLOPS_PASSWORD", password), ("MLOPS_RUN", run)];
    let request = ExecRequest {
        project: project.to_string(),
        service: af.service.clone(),
        command: vec!["python".into(), "-c".into(), SCRIPT.into()],
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        timeout_seconds: 120,
        purpose: "migrate".into(),
        ..Default::default()
    };
    let reply =
        conn.raw().exec(request).await.map_err(|s| ControllerError::from_status(host, "Exec", &s))?.into_inner();
    if reply.exit_code != 0 || !reply.output.contains("login ok") {
        return Err(ControllerError::Local(format!(
            "verification failed on {host}: the admin's login{} through the API failed: {}",
            if run.is_empty() { String::new() } else { format!(" or DAG run `{run}`") },
            reply.output.trim()
        )));
    }
    Ok(match reply.output.lines().next().filter(|_| !run.is_empty()) {
        Some(line) => format!("; DAG run {line} listed there"),
        None => String::new(),
    })
}

/// What psql reported while restoring a `pg_dumpall --clean` script:
/// errors other than those such a script makes by design (it recreates the
/// role it runs as, and cannot drop it) fail the restore.
fn restore_errors(output: &str, user: &str, exit_code: i64) -> Result<(), String> {
    let benign = [format!("role \"{user}\" already exists"), "current user cannot be dropped".to_string()];
    let errors: Vec<&str> =
        output.lines().filter(|l| l.contains("ERROR:") && !benign.iter().any(|b| l.contains(b.as_str()))).collect();
    if exit_code != 0 || !errors.is_empty() {
        return Err(format!(
            "psql exited {exit_code}{}",
            if errors.is_empty() { String::new() } else { format!(": {}", errors.join("; ")) }
        ));
    }
    Ok(())
}

/// The lines of `a` and `b` that differ (at most 10), as `a → b`.
pub(super) fn diff_lines(a: &str, b: &str) -> Vec<String> {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = Vec::new();
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (la.get(i).copied().unwrap_or("(none)"), lb.get(i).copied().unwrap_or("(none)"));
        if x != y {
            out.push(format!("{x} → {y}"));
        }
    }
    out.truncate(10);
    out
}

/// Points the inventory at B: A's entry edited in place when A comes from
/// a YAML inventory and B is named by address (see
/// [`mlops_inventory::edit`]); otherwise the change to make, in one line.
fn inventory_change(a: &Target, b: &Target, ssh: &mlops_inventory::SshConfig) -> (String, bool) {
    let from_inventory = a.origin.rsplit_once(':').and_then(|(p, l)| Some((p, l.parse::<usize>().ok()?)));
    match (from_inventory, &b.connection, b.origin.as_str()) {
        (Some((path, line)), mlops_inventory::Connection::Ssh { address, port, user, .. }, "--host") => {
            let to = mlops_inventory::edit::NewAddress { address: address.clone(), port: *port, user: user.clone() };
            match mlops_inventory::edit::point_host_at(std::path::Path::new(path), line, &a.name, &to, ssh) {
                Ok(()) => (format!("inventory {path}: host {} now points at {user}@{address}:{port}", a.name), true),
                Err(why) => (
                    format!(
                        "inventory {path}: point host {} at {user}@{address}:{port} (ansible_host: {address}, ansible_port: {port}, ansible_user: {user}); not edited: {why}",
                        a.name
                    ),
                    false,
                ),
            }
        }
        (Some((path, _)), _, _) => (
            format!(
                "inventory {path}: stack now served by {}; put {} in {}'s groups ({}) in place of it",
                b.name,
                b.name,
                a.name,
                if a.groups.is_empty() { "none".to_string() } else { a.groups.join(", ") }
            ),
            false,
        ),
        (None, _, _) => (
            format!("stack now served by {}: use `--host {}` where you used `--host {}`", b.name, b.name, a.name),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The platform's own `x-mlops.migrate`, as a migration plans it.
    #[test]
    fn the_platform_holds_its_schedulers_and_workers_and_dumps_its_database() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../platform");
        let secrets: BTreeMap<String, String> =
            mlops_compose::preflight(&dir, None).unwrap().1.into_iter().map(|s| (s, "x".repeat(20))).collect();
        let options = mlops_compose::LoadOptions { project: None, env: secrets.clone(), profiles: Vec::new() };
        let loaded = mlops_compose::load(&dir, &options).unwrap();
        let opts = MigrateOptions {
            stack: StackOptions::default(),
            from: "a".into(),
            to: "b".into(),
            dry_run: false,
            decommission: false,
            stop_timeout: 60,
            health_timeout: 300,
            install_docker: true,
            expose: false,
            local_images: true,
            with_metrics: false,
        };
        let plan = Plan::new(&loaded.stack, &opts, &secrets.into_iter().collect()).unwrap();
        // Dependents first: the workers before the scheduler they need.
        assert_eq!(plan.hold.len(), 4, "{:?}", plan.hold);
        let at = |s: &str| plan.hold.iter().position(|h| h == s).unwrap();
        assert!(at("airflow-worker") < at("airflow-scheduler"), "{:?}", plan.hold);
        assert_eq!(plan.database.as_ref().unwrap().service, "postgres");
        assert!(!plan.rest.contains(&"postgres".to_string()) && plan.rest.contains(&"airflow-apiserver".to_string()));
        assert!(plan.rest.iter().position(|s| s == "airflow-apiserver") < plan.rest.iter().position(|s| s == "redis"));
        // Waves: a service stops after all that depend on it, and those
        // that do not depend on each other stop together.
        for list in [&plan.hold, &plan.rest] {
            let waves = plan.waves(list);
            let wave = |s: &str| list.iter().position(|x| x == s).map(|i| waves[i]);
            for (i, s) in list.iter().enumerate() {
                for d in &plan.deps[s] {
                    if let Some(w) = wave(d) {
                        assert!(
                            waves[i] < w,
                            "{s} (wave {}) stops before {d} (wave {w}): {list:?} {waves:?}",
                            waves[i]
                        );
                    }
                }
            }
        }
        let waves = plan.waves(&plan.rest);
        assert!(waves.iter().filter(|w| **w == 0).count() > 1, "{:?} {waves:?}", plan.rest);
        assert!(*waves.iter().max().unwrap() < plan.rest.len() as u32 - 1, "not one by one: {waves:?}");
        // `c` reaches `a` through `b`, which is not in the list.
        let chain = ["d", "c", "a", "x"].map(String::from);
        let deps = [("d", vec!["c"]), ("c", vec!["b"]), ("b", vec!["a"]), ("a", vec![]), ("x", vec![])];
        let chained = Plan {
            deps: deps.map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect())).into(),
            ..plan.clone()
        };
        assert_eq!(chained.waves(&chain), [0, 1, 2, 0]);
        let p = loaded.stack.project.clone();
        assert_eq!(plan.volumes, vec![format!("{p}_airflow-logs"), format!("{p}_redis-data")]);
        assert_eq!(plan.deploy_unheld.stack.skip.len(), 4);
        let (af, password) = plan.airflow.unwrap();
        assert_eq!((af.admin_user.as_str(), password.len()), ("admin", 20));

        let metrics =
            Plan::new(&loaded.stack, &MigrateOptions { with_metrics: true, ..opts }, &HashMap::new()).unwrap();
        assert_eq!(metrics.volumes.len(), 4, "{:?}", metrics.volumes);
    }

    #[test]
    fn dag_ids_match_only_themselves() {
        assert_eq!(regex_escape("etl.daily-v2"), "etl\\.daily\\-v2");
        assert_eq!(regex_escape("spark_pi"), "spark_pi");
    }

    #[test]
    fn a_restore_fails_on_errors_other_than_those_pg_dumpall_makes_by_design() {
        let by_design = "psql:<stdin>:14: ERROR:  current user cannot be dropped\n\
                         psql:<stdin>:22: ERROR:  role \"postgres\" already exists\n";
        assert!(restore_errors(by_design, "postgres", 0).is_ok());
        let real =
            format!("{by_design}psql:<stdin>:90: ERROR:  database \"airflow\" is being accessed by other users\n");
        let e = restore_errors(&real, "postgres", 0).unwrap_err();
        assert!(e.contains("being accessed") && !e.contains("cannot be dropped"), "{e}");
        assert!(restore_errors("", "postgres", 2).is_err());
    }

    #[test]
    fn differing_lines_are_named() {
        assert_eq!(diff_lines("a 1\nb 2\n", "a 1\nb 3\nc 0\n"), ["b 2 → b 3", "(none) → c 0"]);
    }
}
