//! The commands: each resolves its targets, fans out over them with the
//! controller library, and prints through the [`Printer`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use mlops_controller::agent_binary::AgentBinary;
use mlops_controller::bootstrap::{self, Bundle, Context, DeployOutcome, StatusOutcome, UninstallOutcome};
use mlops_controller::client::ClientTls;
use mlops_controller::fanout;
use mlops_controller::progress::{Progress, Step};
use mlops_controller::state::StateDir;
use mlops_inventory::{Connection, SshConfig, Target};
use mlops_ssh::SshOptions;
use serde_json::json;

use crate::cli::{AgentCommand, Cli, Command, Global, Output};
use crate::printer::{Printer, bytes_human, duration_human, render_error, table};
use crate::{EXIT_HOST_FAILED, EXIT_USAGE};

pub async fn run(cli: Cli, printer: &Printer) -> i32 {
    let needs_binary = matches!(cli.command, Command::Deploy);
    let setup = match Setup::new(&cli.global, needs_binary, printer) {
        Ok(s) => s,
        Err(e) => {
            printer.error(&e);
            return EXIT_USAGE;
        }
    };
    match cli.command {
        Command::Deploy => deploy(setup, printer).await,
        Command::Status => status(setup, printer).await,
        Command::Agent { command: AgentCommand::Uninstall { keep_state } } => {
            uninstall(setup, keep_state, printer).await
        }
    }
}

/// What every command needs: targets, state, TLS, SSH options.
struct Setup {
    targets: Vec<Target>,
    state: StateDir,
    ctx: Arc<Context>,
    forks: usize,
}

impl Setup {
    fn new(g: &Global, needs_binary: bool, printer: &Printer) -> Result<Self> {
        let home = mlops_inventory::ssh_config::home_dir();
        let ssh_config_path = g.ssh_config.clone().unwrap_or_else(|| home.join(".ssh/config"));
        let ssh_config = SshConfig::load(&ssh_config_path);
        for w in &ssh_config.warnings {
            printer.warn(&format!("{}: {w}", ssh_config_path.display()));
        }
        let targets = resolve_targets(g, &ssh_config)?;

        let state_path = g.state_dir.clone().unwrap_or_else(StateDir::default_path);
        let state = StateDir::open(&state_path)?;
        let tls = ClientTls::new(state.ca.cert_pem(), &state.client_identity()?)?;
        let binary = if needs_binary { Some(AgentBinary::locate(g.agent_binary.as_deref())?) } else { None };

        let mut ssh = SshOptions::new(g.known_hosts.clone().unwrap_or_else(|| home.join(".ssh/known_hosts")));
        ssh.accept_new = g.accept_new_host_keys;
        ssh.connect_timeout = Duration::from_secs(g.connect_timeout.max(1));
        for id in &g.identities {
            if !id.is_file() {
                bail!(mlops_ssh::SshError::KeyLoad { path: id.clone(), message: "no such file".into() });
            }
        }
        let ctx = Context { binary, tls, ssh, identities: g.identities.clone() };
        Ok(Setup { targets, state, ctx: Arc::new(ctx), forks: usize::from(g.forks) })
    }
}

fn resolve_targets(g: &Global, ssh_config: &SshConfig) -> Result<Vec<Target>> {
    if g.limit.is_some() && g.inventory.is_none() {
        bail!("--limit selects hosts of an inventory, but no --inventory was given");
    }
    let mut targets = Vec::new();
    if let Some(inv) = &g.inventory {
        targets.extend(mlops_inventory::load_targets(inv, g.limit.as_deref(), ssh_config)?);
    }
    targets.extend(mlops_inventory::target::targets_from_specs(&g.hosts, ssh_config)?);
    if targets.is_empty() {
        // The embedded default: this machine, no SSH.
        targets.push(Target::local());
    }
    let mut seen_local = false;
    targets.retain(|t| {
        if t.connection == Connection::Local {
            let first = !seen_local;
            seen_local = true;
            return first;
        }
        true
    });
    let mut names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("host `{}` is named twice", w[0]);
    }
    Ok(targets)
}

/// Prints progress events as they come; ends when every sender is dropped.
fn progress_printer(
    output: Output,
    targets: &[Target],
) -> (tokio::sync::mpsc::UnboundedSender<mlops_controller::progress::Event>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let width = targets.iter().map(|t| t.name.len()).max().unwrap_or(4);
    let handle = tokio::spawn(async move {
        let p = Printer::new(output);
        while let Some(event) = rx.recv().await {
            p.progress(&event, width);
        }
    });
    (tx, handle)
}

async fn deploy(setup: Setup, printer: &Printer) -> i32 {
    let Setup { targets, state, ctx, forks } = setup;
    // Certificates are issued before the fan-out: the CA directory is
    // written by one task only.
    let mut bundles = Vec::new();
    for t in &targets {
        match Bundle::for_target(&state, t) {
            Ok(b) => bundles.push(b),
            Err(e) => {
                printer.error(&anyhow::Error::new(e).context(format!("cannot prepare certificates for {}", t.name)));
                return EXIT_USAGE;
            }
        }
    }
    let binary = ctx.binary.as_ref().expect("deploy loads the agent binary");
    printer.info(&format!(
        "deploying agent {} ({}, sha256 {}) to {} host(s)",
        mlops_controller::VERSION,
        bytes_human(binary.bytes.len() as u64),
        &binary.sha256[..12],
        targets.len()
    ));
    let (tx, printing) = progress_printer(printer.output, &targets);
    let items: Vec<(Target, Bundle)> = targets.iter().cloned().zip(bundles).collect();
    let task_tx = tx.clone();
    let results = fanout::run(items, forks, move |(target, bundle)| {
        let ctx = ctx.clone();
        let progress = Progress::new(Some(task_tx.clone()), &target.name);
        async move {
            let r = bootstrap::deploy_host(&target, &ctx, &bundle, &progress).await;
            if let Err(e) = &r {
                progress.step(Step::Failed { message: e.to_string() });
            }
            r.map_err(anyhow::Error::new)
        }
    })
    .await;
    drop(tx);
    let _ = printing.await;

    let mut ok: Vec<DeployOutcome> = Vec::new();
    let mut failed: Vec<(String, anyhow::Error)> = Vec::new();
    for (t, r) in targets.iter().zip(results) {
        match r {
            Ok(Ok(o)) => ok.push(o),
            Ok(Err(e)) => failed.push((t.name.clone(), e)),
            Err(panic) => failed.push((t.name.clone(), anyhow::anyhow!(panic))),
        }
    }
    match printer.output {
        Output::Json => {
            let mut hosts: Vec<serde_json::Value> =
                ok.iter().map(|o| json!({"host": o.host, "ok": true, "result": o})).collect();
            hosts.extend(failed.iter().map(|(h, e)| failure_json(h, e)));
            printer.json(&json!({"command": "deploy", "ok": ok.len(), "failed": failed.len(), "hosts": hosts}));
        }
        Output::Text => {
            if !ok.is_empty() {
                let rows: Vec<Vec<String>> = ok
                    .iter()
                    .map(|o| {
                        vec![
                            o.host.clone(),
                            o.agent.version.clone(),
                            if o.uploaded { "uploaded".into() } else { "-".into() },
                            o.installed.clone().unwrap_or_else(|| "-".into()),
                            o.facts.os.clone(),
                            o.facts.arch.clone(),
                            o.facts.cpus.to_string(),
                            format!(
                                "{} free of {}",
                                bytes_human(o.facts.memory_available_bytes),
                                bytes_human(o.facts.memory_total_bytes)
                            ),
                            format!("{} free", bytes_human(o.facts.disk_available_bytes)),
                            docker_cell(o.facts.docker, &o.facts.docker_version),
                        ]
                    })
                    .collect();
                printer.stdout(&table(
                    &["HOST", "AGENT", "BINARY", "RESTARTED", "OS", "ARCH", "CPUS", "MEMORY", "DISK", "DOCKER"],
                    &rows,
                ));
            }
            summarize(printer, "deploy", ok.len(), &failed);
        }
    }
    if failed.is_empty() { 0 } else { EXIT_HOST_FAILED }
}

fn docker_cell(available: bool, version: &str) -> String {
    if available { format!("yes ({version})") } else { "no".into() }
}

fn failure_json(host: &str, e: &anyhow::Error) -> serde_json::Value {
    json!({
        "host": host,
        "ok": false,
        "error": format!("{e:#}"),
        "hint": crate::printer::hint_of(e),
    })
}

fn summarize(printer: &Printer, what: &str, ok: usize, failed: &[(String, anyhow::Error)]) {
    if failed.is_empty() {
        printer.info(&format!("{what}: {ok} host(s) succeeded"));
        return;
    }
    let names: Vec<&str> = failed.iter().map(|(h, _)| h.as_str()).collect();
    let mut text =
        format!("error: {what} failed on {} of {} host(s): {}", failed.len(), ok + failed.len(), names.join(", "));
    for (host, e) in failed {
        text.push_str(&format!("\n  {host}:\n{}", render_error(e, "    ")));
    }
    printer.info(&text);
}

async fn status(setup: Setup, printer: &Printer) -> i32 {
    let Setup { targets, ctx, forks, .. } = setup;
    let results = fanout::run(targets.clone(), forks, move |target| {
        let ctx = ctx.clone();
        async move { bootstrap::status_host(&target, &ctx).await }
    })
    .await;
    let outcomes: Vec<StatusOutcome> = targets
        .iter()
        .zip(results)
        .map(|(t, r)| {
            r.unwrap_or_else(|e| StatusOutcome {
                host: t.name.clone(),
                address: t.display_address(),
                reachable: false,
                agent: None,
                facts: None,
                error: Some(e),
            })
        })
        .collect();
    let failed = outcomes.iter().filter(|o| o.agent.is_none()).count();
    match printer.output {
        Output::Json => printer
            .json(&json!({"command": "status", "ok": outcomes.len() - failed, "failed": failed, "hosts": outcomes})),
        Output::Text => {
            let rows: Vec<Vec<String>> = outcomes
                .iter()
                .map(|o| {
                    let agent = o.agent.as_ref();
                    vec![
                        o.host.clone(),
                        match (o.reachable, agent.is_some()) {
                            (true, true) => "yes".into(),
                            (true, false) => "ssh only".into(),
                            _ => "no".into(),
                        },
                        agent.map_or("-".into(), |a| a.version.clone()),
                        agent.map_or("-".into(), |a| duration_human(a.uptime_seconds)),
                        o.facts.as_ref().map_or("-".into(), |f| docker_cell(f.docker, &f.docker_version)),
                        o.error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            printer.stdout(&table(&["HOST", "REACHABLE", "AGENT", "UPTIME", "DOCKER", "ERROR"], &rows));
        }
    }
    if failed == 0 { 0 } else { EXIT_HOST_FAILED }
}

async fn uninstall(setup: Setup, keep_state: bool, printer: &Printer) -> i32 {
    let Setup { targets, ctx, forks, .. } = setup;
    let results = fanout::run(targets.clone(), forks, move |target| {
        let ctx = ctx.clone();
        async move { bootstrap::uninstall_host(&target, &ctx, keep_state).await.map_err(anyhow::Error::new) }
    })
    .await;
    let mut ok: Vec<UninstallOutcome> = Vec::new();
    let mut failed = Vec::new();
    for (t, r) in targets.iter().zip(results) {
        match r {
            Ok(Ok(o)) => ok.push(o),
            Ok(Err(e)) => failed.push((t.name.clone(), e)),
            Err(p) => failed.push((t.name.clone(), anyhow::anyhow!(p))),
        }
    }
    match printer.output {
        Output::Json => {
            let mut hosts: Vec<serde_json::Value> =
                ok.iter().map(|o| json!({"host": o.host, "ok": true, "result": o})).collect();
            hosts.extend(failed.iter().map(|(h, e)| failure_json(h, e)));
            printer
                .json(&json!({"command": "agent uninstall", "ok": ok.len(), "failed": failed.len(), "hosts": hosts}));
        }
        Output::Text => {
            for o in &ok {
                if o.was_installed {
                    printer.stdout(&format!("{}: agent removed ({})", o.host, o.removed.join(", ")));
                } else {
                    printer.stdout(&format!("{}: no agent installed", o.host));
                }
            }
            summarize(printer, "agent uninstall", ok.len(), &failed);
        }
    }
    if failed.is_empty() { 0 } else { EXIT_HOST_FAILED }
}
