//! `mlopsctl secrets rotate NAME`: one secret changed on purpose,
//! everywhere it is used, with the stack healthy before and after.
//!
//! 1. Every host answers, runs the stack healthy, and holds the same value
//!    of NAME; otherwise nothing is changed. The new value is stored on
//!    every host first as `MLOPS_ROTATING_NAME`, so that a run stopped
//!    anywhere after this is resumed with the same value (a database may
//!    already hold it), health or not, by running the command again.
//! 2. The stack's `x-mlops.rotate.NAME.before` step runs where its service
//!    runs, with `MLOPS_OLD` and `MLOPS_NEW` in its environment: it makes
//!    the data accept the new value (`ALTER ROLE ... PASSWORD`).
//! 3. Every host stores the new value (with `keep_old`: `NEW,OLD`), so the
//!    hosts keep telling the truth if the run stops after this point.
//! 4. A deploy with the new value, saying it rotates NAME (so the agents'
//!    check of credentials of existing data lets it through): every service
//!    using it is recreated, in dependency order, gated on health.
//! 5. With `keep_old`: the `after` step (`airflow rotate-fernet-key`
//!    re-encrypts with the new key), then `NEW` alone is stored and
//!    deployed. `MLOPS_ROTATING_NAME` is dropped at the end.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlops_proto::stack::{Condition, Hook, Stack};
use mlops_proto::v1::ExecRequest;
use serde::Serialize;

use super::Setup;
use super::deploy::{DeployOptions, DeployReport, deploy};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;

/// The name a rotation's new value is kept under on the hosts until it is done.
const PENDING_PREFIX: &str = "MLOPS_ROTATING_";

/// One step of a rotation on one host.
#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    pub step: String,
    pub host: String,
    pub exit_code: i64,
    pub output: String,
}

/// What `secrets rotate` did.
pub struct RotateReport {
    pub project: String,
    pub name: String,
    /// Hosts where the first checks failed: nothing was changed anywhere.
    pub refused: HostResults<()>,
    /// Steps run (hooks), in order.
    pub steps: Vec<StepOutcome>,
    /// The deploys with the new value (two with `keep_old`).
    pub deploys: Vec<DeployReport>,
    /// Whether the rotation finished.
    pub done: bool,
}

/// What one host says before a rotation.
struct Before {
    /// Services of the model that do not run as they should, with why.
    unhealthy: Vec<String>,
    /// Services running here.
    running: Vec<String>,
    held: BTreeMap<String, String>,
}

pub async fn rotate(
    setup: &Setup,
    opts: &DeployOptions,
    name: &str,
    report: Arc<dyn Report>,
) -> Result<RotateReport, ControllerError> {
    let model = opts.stack.load_model(&setup.state, report.as_ref())?.stack;
    let project = model.project.clone();
    if !model.options.secrets.iter().any(|s| s == name) {
        return Err(ControllerError::usage(
            format!("stack `{project}` has no secret `{name}`"),
            Some(&format!("its secrets: {}", model.options.secrets.join(", "))),
        ));
    }
    let rotation = model.options.rotate.get(name).cloned().unwrap_or_default();
    let mut out = RotateReport {
        project: project.clone(),
        name: name.to_string(),
        refused: HostResults { ok: Vec::new(), failed: Vec::new() },
        steps: Vec::new(),
        deploys: Vec::new(),
        done: false,
    };

    // 1. Every host healthy (what it runs of the stack) and holding the
    //    same value.
    let layout = Arc::new(crate::placement::place(&model, &setup.all_hosts)?);
    let model = Arc::new(model);
    let m = model.clone();
    let checks = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let model = m.clone();
        let part = crate::placement::render(&model, &layout, &target.name);
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let r = async {
                let services = crate::stack::status(&mut conn, &model.project).await?.services;
                let held = crate::secrets::held_by(&mut conn, &model.project).await?;
                Ok::<_, ControllerError>((services, held))
            }
            .await;
            transport.close().await;
            let (services, held) = r?;
            let running = services.iter().filter(|s| s.state == "running").map(|s| s.service.clone()).collect();
            Ok(Before { unhealthy: unhealthy(&part, &services), running, held })
        }
    })
    .await;
    out.refused.failed.extend(checks.failed);
    if !out.refused.failed.is_empty() {
        return Ok(out);
    }
    let hosts: Vec<(String, Before)> = checks.ok;
    let pending_name = format!("{PENDING_PREFIX}{name}");
    let pending: Vec<(String, BTreeMap<String, String>)> = hosts
        .iter()
        .map(|(h, b)| {
            (
                h.clone(),
                b.held
                    .iter()
                    .filter(|(k, _)| **k == pending_name)
                    .map(|(_, v)| (pending_name.clone(), v.clone()))
                    .collect(),
            )
        })
        .collect();
    let pending = if pending.iter().any(|(_, v)| !v.is_empty()) {
        let names = vec![pending_name.clone()];
        Some(
            crate::secrets::reconcile(&project, &names, &pending, &BTreeMap::new(), false, &[])?.values[&pending_name]
                .clone(),
        )
    } else {
        None
    };
    // A new rotation needs a healthy stack; one under way goes on (the
    // stack may be down precisely because the data holds the new value).
    if pending.is_none() {
        for (host, before) in &hosts {
            if !before.unhealthy.is_empty() {
                let message = format!("not healthy before the rotation: {}", before.unhealthy.join("; "));
                out.refused
                    .failed
                    .push((host.clone(), ControllerError::RotationRefused { host: host.clone(), message }));
            }
        }
        if !out.refused.failed.is_empty() {
            return Ok(out);
        }
    }
    let held: Vec<(String, BTreeMap<String, String>)> = hosts
        .iter()
        .map(|(h, b)| {
            (h.clone(), b.held.iter().filter(|(k, _)| *k == name).map(|(k, v)| (k.clone(), v.clone())).collect())
        })
        .collect();
    if held.iter().any(|(_, v)| v.is_empty()) {
        let lacking: Vec<&str> = held.iter().filter(|(_, v)| v.is_empty()).map(|(h, _)| h.as_str()).collect();
        return Err(ControllerError::usage(
            format!(
                "{} hold{} no `{name}` for stack `{project}`",
                lacking.join(", "),
                if lacking.len() == 1 { "s" } else { "" }
            ),
            Some("`mlopsctl deploy` stores the stack's secrets on every host first"),
        ));
    }
    let names = vec![name.to_string()];
    let current = crate::secrets::reconcile(&project, &names, &held, &BTreeMap::new(), true, &[])?.values[name].clone();

    // The value held (`OLD`, `NEW,OLD` or `NEW`, depending on where a run
    // stopped) and the pending one say where a rotation is.
    let (first, second) = match current.split_once(',') {
        Some((a, b)) => (a.to_string(), Some(b.to_string())),
        None => (current.clone(), None),
    };
    let (new, old) = match &pending {
        Some(p) if *p == first => (p.clone(), second.unwrap_or_else(|| p.clone())),
        Some(p) => (p.clone(), first),
        None => (crate::secrets::generate(), first),
    };
    let env = BTreeMap::from([("MLOPS_OLD".to_string(), old.clone()), ("MLOPS_NEW".to_string(), new.clone())]);
    if pending.is_some() {
        report.info(&format!("a rotation of `{name}` was under way; finishing it with the same new value"));
    } else if let Err(e) = change_everywhere(setup, &project, &pending_name, Some(&new), &report).await {
        return Ok(stopped(out, e));
    }
    {
        // 2. The data accepts the new value (again, when resuming: the
        //    step sets a value, so running it twice is harmless).
        if let Some(hook) = &rotation.before {
            let purpose = format!("secrets rotate {name}: before");
            if let Err(e) = run_hook(setup, &hosts, &project, hook, &env, &purpose, &mut out, &report).await {
                return Ok(stopped(out, e));
            }
        }
        // 3. The hosts hold the new value.
        let staged = if rotation.keep_old && new != old { format!("{new},{old}") } else { new.clone() };
        if let Err(e) = change_everywhere(setup, &project, name, Some(&staged), &report).await {
            return Ok(stopped(out, e));
        }
    }

    // 4. Deployed: what uses it is recreated, healthy.
    let rotating = DeployOptions { rotating: names.clone(), ..opts.clone() };
    let first = deploy(setup, &rotating, report.clone()).await?;
    let ok = first.hosts.failed.is_empty();
    out.deploys.push(first);
    if !ok {
        return Ok(out);
    }
    // 5. Re-encrypted, then the old value dropped.
    if rotation.keep_old {
        if let Some(hook) = &rotation.after {
            let purpose = format!("secrets rotate {name}: after");
            if let Err(e) = run_hook(setup, &hosts, &project, hook, &env, &purpose, &mut out, &report).await {
                return Ok(stopped(out, e));
            }
        }
        if let Err(e) = change_everywhere(setup, &project, name, Some(&new), &report).await {
            return Ok(stopped(out, e));
        }
        let second = deploy(setup, &rotating, report.clone()).await?;
        let ok = second.hosts.failed.is_empty();
        out.deploys.push(second);
        if !ok {
            return Ok(out);
        }
    }
    if let Err(e) = change_everywhere(setup, &project, &pending_name, None, &report).await {
        return Ok(stopped(out, e));
    }
    out.done = true;
    Ok(out)
}

/// The report of a rotation that stopped at a step: the host it stopped
/// on, and why (exit code 1, like any host failure).
fn stopped(mut out: RotateReport, e: ControllerError) -> RotateReport {
    let host = match &e {
        ControllerError::RotationRefused { host, .. } if !host.is_empty() => host.clone(),
        ControllerError::Agent { host, .. } | ControllerError::Transport { host, .. } => host.clone(),
        _ => "-".to_string(),
    };
    out.refused.failed.push((host, e));
    out
}

/// The model's services that do not run as they should on a host: a
/// one-shot (something waits for it to complete) must have exited, every
/// other service must run and not be unhealthy.
fn unhealthy(model: &Stack, services: &[crate::stack::ServiceOutcome]) -> Vec<String> {
    let one_shots: Vec<&String> = model
        .services
        .values()
        .flat_map(|s| s.depends_on.iter())
        .filter(|(_, d)| **d == Condition::ServiceCompletedSuccessfully)
        .map(|(name, _)| name)
        .collect();
    let mut out = Vec::new();
    for name in model.services.keys() {
        let Some(s) = services.iter().find(|s| &s.service == name) else {
            out.push(format!("`{name}` is not deployed"));
            continue;
        };
        if one_shots.contains(&name) {
            continue;
        }
        if s.state != "running" {
            out.push(format!("`{name}` is {}", s.state));
        } else if !s.health.is_empty() && s.health != "healthy" {
            out.push(format!("`{name}` is {}", s.health));
        }
    }
    out
}

/// Runs `hook` on every host where its service runs; a failure stops the
/// rotation (with the command's output).
#[allow(clippy::too_many_arguments)]
async fn run_hook(
    setup: &Setup,
    hosts: &[(String, Before)],
    project: &str,
    hook: &Hook,
    env: &BTreeMap<String, String>,
    purpose: &str,
    out: &mut RotateReport,
    report: &Arc<dyn Report>,
) -> Result<(), ControllerError> {
    let on: Vec<&String> = hosts.iter().filter(|(_, b)| b.running.contains(&hook.service)).map(|(h, _)| h).collect();
    if on.is_empty() {
        return Err(ControllerError::RotationRefused {
            host: String::new(),
            message: format!("{purpose}: service `{}` runs on none of the hosts", hook.service),
        });
    }
    for host in on {
        let target = setup.targets.iter().find(|t| &t.name == host).expect("a target of the run");
        report.info(&format!("{host}: {purpose} (in `{}`)", hook.service));
        let (transport, mut conn) = bootstrap::connect_agent(target, &setup.ctx).await?;
        let request = ExecRequest {
            project: project.to_string(),
            service: hook.service.clone(),
            command: hook.command.clone(),
            env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            stdin: hook.stdin.clone().into_bytes(),
            timeout_seconds: 600,
            purpose: purpose.to_string(),
        };
        let reply = conn.raw().exec(request).await;
        transport.close().await;
        let reply = reply.map_err(|s| ControllerError::from_status(host, "Exec", &s))?.into_inner();
        // What the step printed stays with the report; a value it echoed
        // would be there too, so the values are cut out first.
        let output = env.values().fold(reply.output, |text, v| text.replace(v.as_str(), "***"));
        out.steps.push(StepOutcome {
            step: purpose.to_string(),
            host: host.clone(),
            exit_code: reply.exit_code,
            output: output.clone(),
        });
        if reply.exit_code != 0 {
            return Err(ControllerError::RotationRefused {
                host: host.clone(),
                message: format!("{purpose} exited with code {}: {}", reply.exit_code, output.trim()),
            });
        }
    }
    Ok(())
}

/// Stores `value` as `name` on every host (replacing) and in the cache;
/// with `value` `None`, drops `name` on every host instead (the
/// rotation's bookkeeping).
async fn change_everywhere(
    setup: &Setup,
    project: &str,
    name: &str,
    value: Option<&str>,
    report: &Arc<dyn Report>,
) -> Result<(), ControllerError> {
    let values: BTreeMap<String, String> = value.map(|v| (name.to_string(), v.to_string())).into_iter().collect();
    let remove: Vec<String> = if value.is_none() { vec![name.to_string()] } else { Vec::new() };
    let change = Arc::new((project.to_string(), values.clone(), remove));
    let changed = per_host(&setup.targets, setup.forks, &setup.ctx, report, move |target, ctx, _progress| {
        let change = change.clone();
        async move {
            let (project, values, remove) = change.as_ref();
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let r = crate::secrets::change_on(&mut conn, project, values, true, remove).await;
            transport.close().await;
            r.map(|_| ())
        }
    })
    .await;
    if let Some((host, e)) = changed.failed.into_iter().next() {
        let what = if value.is_some() { "stored" } else { "dropped" };
        return Err(ControllerError::RotationRefused {
            host: host.clone(),
            message: format!(
                "`{name}` could not be {what} on {host} ({e}); once {host} answers, run the same command again: it goes on with the same new value"
            ),
        });
    }
    // The cache keeps secrets, not a rotation's bookkeeping.
    if !values.is_empty() && !name.starts_with(PENDING_PREFIX) {
        crate::secrets::store_cache(&setup.state.path, project, &values)?;
    }
    Ok(())
}
