//! The commands: each resolves its targets, fans out over them with the
//! controller library, and prints through the [`Printer`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mlops_controller::agent_binary::AgentBinary;
use mlops_controller::bootstrap::{self, Bundle, Context, DeployOutcome, StatusOutcome, UninstallOutcome};
use mlops_controller::client::ClientTls;
use mlops_controller::fanout;
use mlops_controller::progress::{Progress, Step};
use mlops_controller::stack::{self, ServiceOutcome, StackOutcome, StackPlan};
use mlops_controller::state::StateDir;
use mlops_controller::sync::HashCache;
use mlops_inventory::{Connection, SshConfig, Target};
use mlops_ssh::SshOptions;
use serde_json::json;

use crate::cli::{AgentCommand, Cli, Command, Global, Output, StackArgs};
use crate::printer::{Printer, bytes_human, duration_human, render_error, table};
use crate::{EXIT_HOST_FAILED, EXIT_USAGE};

pub async fn run(cli: Cli, printer: &Printer) -> i32 {
    let needs_binary = matches!(cli.command, Command::Deploy { .. });
    let setup = match Setup::new(&cli.global, needs_binary, printer) {
        Ok(s) => s,
        Err(e) => {
            printer.error(&e);
            return EXIT_USAGE;
        }
    };
    let result = match cli.command {
        Command::Deploy { mut stack, no_stack, no_docker_install, expose, health_timeout } => {
            if expose {
                // Read by the Compose interpolation of the stack's `ports`.
                stack.vars.push(("MLOPS_BIND_ADDRESS".into(), "0.0.0.0".into()));
            }
            deploy(setup, &stack, no_stack, !no_docker_install, health_timeout, printer).await
        }
        Command::Secrets { stack } => secrets(&setup, &stack, printer),
        Command::Ui { name, stack, port } => ui(setup, &stack, &name, port, printer).await,
        Command::Status { stack } => status(setup, &stack, printer).await,
        Command::Sync { stack } => sync(setup, &stack, printer).await,
        Command::Down { stack, volumes } => down(setup, &stack, volumes, printer).await,
        Command::Watch { stack } => watch(setup, &stack, printer).await,
        Command::Logs { service, stack, follow, tail, since } => {
            logs(setup, &stack, &service, follow, tail, since.as_deref(), printer).await
        }
        Command::Agent { command: AgentCommand::Uninstall { keep_state } } => {
            Ok(uninstall(setup, keep_state, printer).await)
        }
    };
    result.unwrap_or_else(|e| {
        printer.error(&e);
        EXIT_USAGE
    })
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

/// The platform bundle compiled into mlopsctl (see build.rs).
mod bundle {
    include!(concat!(env!("OUT_DIR"), "/bundle.rs"));
}

/// The stack directory: `--stack`, else the embedded platform bundle,
/// written once into the state directory (by content hash).
fn stack_dir(state: &StateDir, args: &StackArgs) -> Result<PathBuf> {
    if let Some(dir) = &args.stack {
        return Ok(dir.clone());
    }
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (path, exec, data) in bundle::BUNDLE {
        h.update(path.as_bytes());
        h.update([u8::from(*exec)]);
        h.update(data);
    }
    let dir = state.path.join("bundle").join(&hex::encode(h.finalize())[..16]);
    if !dir.join("compose.yaml").is_file() {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        for (path, exec, data) in bundle::BUNDLE {
            let p = tmp.join(path);
            std::fs::create_dir_all(p.parent().expect("has a parent"))
                .with_context(|| format!("cannot write {}", p.display()))?;
            std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(if *exec { 0o755 } else { 0o644 }))?;
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot write {}", dir.display()))?;
    }
    Ok(dir)
}

/// Loads the Compose stack (with its generated secrets), applies `--skip`,
/// scans its directory and adds injected binaries; once, for all hosts.
fn load_stack(
    state: &StateDir,
    args: &StackArgs,
    printer: &Printer,
) -> Result<(mlops_compose::Loaded, mlops_controller::sync::LocalTree)> {
    let loaded = load_model(state, args, printer)?;
    let mut cache = HashCache::open(state.path.join("cache/file-hashes.json"));
    let mut tree = mlops_controller::sync::scan(&loaded.dir, &mut cache)?;
    cache.save();
    for (path, artifact) in &loaded.stack.options.inject {
        let source = mlops_controller::agent_binary::locate_artifact(artifact)?;
        tree.add_file(path, &source, 0o755)?;
    }
    Ok((loaded, tree))
}

/// The stack model alone (with secrets and `--skip`), for commands that
/// send no files.
fn load_model(state: &StateDir, args: &StackArgs, printer: &Printer) -> Result<mlops_compose::Loaded> {
    let dir = stack_dir(state, args)?;
    let (project, secret_names) = mlops_compose::preflight(&dir, args.project.as_deref())?;
    let secrets = mlops_controller::secrets::load_or_generate(&state.path, &project, &secret_names)?;
    let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    env.extend(secrets);
    env.extend(args.vars.iter().cloned());
    let options = mlops_compose::LoadOptions { project: Some(project), env, profiles: args.profiles.clone() };
    let mut loaded = mlops_compose::load(&dir, &options)?;
    for w in &loaded.warnings {
        printer.warn(&w.to_string());
    }
    mlops_compose::skip_services(&mut loaded.stack, &args.skip).map_err(anyhow::Error::msg)?;
    Ok(loaded)
}

/// The project named by --project, or by the stack (default: the platform).
fn project_name(state: &StateDir, args: &StackArgs) -> Result<String> {
    if args.stack.is_none()
        && let Some(p) = &args.project
    {
        return mlops_compose::normalize_project(p).with_context(|| format!("`{p}` is not a usable project name"));
    }
    Ok(mlops_compose::preflight(&stack_dir(state, args)?, args.project.as_deref())?.0)
}

fn plan(
    state: &StateDir,
    args: &StackArgs,
    install_docker: bool,
    health_timeout: u32,
    sync_only: bool,
    printer: &Printer,
) -> Result<(StackPlan, mlops_proto::stack::Stack)> {
    let (loaded, tree) = load_stack(state, args, printer)?;
    Ok((
        StackPlan {
            project: loaded.stack.project.clone(),
            stack_json: serde_json::to_string(&loaded.stack).expect("serializable"),
            tree: Arc::new(tree),
            install_docker,
            health_timeout_seconds: health_timeout,
            holder: stack::holder(),
            sync_only,
        },
        loaded.stack,
    ))
}

fn secrets(setup: &Setup, args: &StackArgs, printer: &Printer) -> Result<i32> {
    let project = project_name(&setup.state, args)?;
    let all = mlops_controller::secrets::load(&setup.state.path, &project)?;
    if all.is_empty() {
        bail!("no credentials for stack `{project}` yet; `mlopsctl deploy` generates them");
    }
    match printer.output {
        Output::Json => printer.json(&json!({"project": project, "secrets": all})),
        Output::Text => {
            let rows: Vec<Vec<String>> = all.into_iter().map(|(k, v)| vec![k, v]).collect();
            printer.stdout(&table(&["NAME", "VALUE"], &rows));
        }
    }
    Ok(0)
}

/// The access table: where each UI is, for this host.
fn access_table(stack: &mlops_proto::stack::Stack, targets: &[Target]) -> String {
    let mut rows = Vec::new();
    for t in targets {
        for (name, ui) in &stack.options.ui {
            let url = match t.connection {
                Connection::Local => format!("http://127.0.0.1:{}{}", ui.port, ui.path),
                Connection::Ssh { .. } => format!("`mlopsctl ui {name} --host {}`", t.name),
            };
            rows.push(vec![t.name.clone(), name.clone(), ui.service.clone(), url]);
        }
    }
    table(&["HOST", "UI", "SERVICE", "URL"], &rows)
}

async fn ui(setup: Setup, args: &StackArgs, name: &str, port: Option<u16>, printer: &Printer) -> Result<i32> {
    let loaded = load_model(&setup.state, args, printer)?;
    let ui = loaded
        .stack
        .options
        .ui
        .get(name)
        .with_context(|| {
            format!(
                "stack `{}` has no UI `{name}` (it has {})",
                loaded.stack.project,
                loaded.stack.options.ui.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?
        .clone();
    let [target] = setup.targets.as_slice() else { bail!("`ui` opens one host's UI; name one with --host or --limit") };
    if target.connection == Connection::Local {
        printer.stdout(&format!("http://127.0.0.1:{}{}", ui.port, ui.path));
        return Ok(0);
    }
    let transport = Arc::new(bootstrap::open_transport(target, &setup.ctx).await?);
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port.unwrap_or(ui.port))).await {
        Ok(l) => l,
        Err(_) if port.is_none() => tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?,
        Err(e) => return Err(e).context("cannot listen on the local port"),
    };
    let local = listener.local_addr()?;
    printer.stdout(&format!("http://{local}{}", ui.path));
    printer.info(&format!(
        "forwarding {local} to {}'s 127.0.0.1:{} ({}); Ctrl-C to stop",
        target.name, ui.port, ui.service
    ));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut conn, _) = accepted?;
                let transport = transport.clone();
                let remote_port = ui.port;
                tokio::spawn(async move {
                    if let Ok(mut tunnel) = transport.tunnel(remote_port).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut tunnel).await;
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    transport.close().await;
    Ok(0)
}

/// Runs `task` on every target (at most `forks` at once) with a progress
/// printer; splits the results into successes and failures.
async fn per_host<R, F, Fut>(
    setup: &Setup,
    printer: &Printer,
    task: F,
) -> (Vec<(String, R)>, Vec<(String, anyhow::Error)>)
where
    R: Send + 'static,
    F: Fn(Target, Arc<Context>, Progress) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, mlops_controller::ControllerError>> + Send + 'static,
{
    let (tx, printing) = progress_printer(printer.output, &setup.targets);
    let task_tx = tx.clone();
    let ctx = setup.ctx.clone();
    let task = Arc::new(task);
    let results = fanout::run(setup.targets.clone(), setup.forks, move |target: Target| {
        let progress = Progress::new(Some(task_tx.clone()), &target.name);
        let fut = task(target, ctx.clone(), progress.clone());
        async move {
            let r = fut.await;
            if let Err(e) = &r {
                progress.step(Step::Failed { message: e.to_string() });
            }
            r.map_err(anyhow::Error::new)
        }
    })
    .await;
    drop(tx);
    let _ = printing.await;
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (t, r) in setup.targets.iter().zip(results) {
        match r {
            Ok(Ok(o)) => ok.push((t.name.clone(), o)),
            Ok(Err(e)) => failed.push((t.name.clone(), e)),
            Err(panic) => failed.push((t.name.clone(), anyhow::anyhow!(panic))),
        }
    }
    (ok, failed)
}

fn report_json<R: serde::Serialize>(
    printer: &Printer,
    command: &str,
    ok: &[(String, R)],
    failed: &[(String, anyhow::Error)],
) {
    let mut hosts: Vec<serde_json::Value> =
        ok.iter().map(|(h, o)| json!({"host": h, "ok": true, "result": o})).collect();
    hosts.extend(failed.iter().map(|(h, e)| failure_json(h, e)));
    printer.json(&json!({"command": command, "ok": ok.len(), "failed": failed.len(), "hosts": hosts}));
}

fn exit_code(failed: &[(String, anyhow::Error)]) -> i32 {
    if failed.is_empty() { 0 } else { EXIT_HOST_FAILED }
}

async fn deploy(
    setup: Setup,
    args: &StackArgs,
    no_stack: bool,
    install_docker: bool,
    health_timeout: u32,
    printer: &Printer,
) -> Result<i32> {
    // Certificates are issued before the fan-out: the CA directory is
    // written by one task only.
    let mut bundles = std::collections::BTreeMap::new();
    for t in &setup.targets {
        let b = Bundle::for_target(&setup.state, t)
            .with_context(|| format!("cannot prepare certificates for {}", t.name))?;
        bundles.insert(t.name.clone(), b);
    }
    let (plan, stack_model) = if no_stack {
        (None, None)
    } else {
        let (p, m) = plan(&setup.state, args, install_docker, health_timeout, false, printer)?;
        (Some(p), Some(m))
    };
    let binary = setup.ctx.binary.as_ref().expect("deploy loads the agent binary");
    printer.info(&format!(
        "deploying agent {} ({}, sha256 {}){} to {} host(s)",
        mlops_controller::VERSION,
        bytes_human(binary.bytes.len() as u64),
        &binary.sha256[..12],
        plan.as_ref()
            .map(|p| format!(
                " and stack `{}` ({} files, {})",
                p.project,
                p.tree.entries.len(),
                bytes_human(p.tree.total_bytes)
            ))
            .unwrap_or_default(),
        setup.targets.len()
    ));
    let bundles = Arc::new(bundles);
    let (ok, failed) = per_host(&setup, printer, move |target, ctx, progress| {
        let bundles = bundles.clone();
        let plan = plan.clone();
        async move { bootstrap::deploy_host(&target, &ctx, &bundles[&target.name], plan.as_ref(), &progress).await }
    })
    .await;
    match printer.output {
        Output::Json => report_json(printer, "deploy", &ok, &failed),
        Output::Text => {
            if !ok.is_empty() {
                let rows: Vec<Vec<String>> = ok.iter().map(|(_, o)| agent_row(o)).collect();
                printer.stdout(&table(
                    &["HOST", "AGENT", "BINARY", "RESTARTED", "OS", "ARCH", "CPUS", "MEMORY", "DISK", "DOCKER"],
                    &rows,
                ));
                let stacks: Vec<(&str, &StackOutcome)> =
                    ok.iter().filter_map(|(h, o)| o.stack.as_ref().map(|s| (h.as_str(), s))).collect();
                if !stacks.is_empty() {
                    printer.stdout("");
                    printer.stdout(&services_table(
                        stacks.iter().flat_map(|(h, s)| s.services.iter().map(move |svc| (*h, svc))),
                    ));
                    if let Some(model) = &stack_model
                        && !model.options.ui.is_empty()
                    {
                        printer.stdout("");
                        printer.stdout(&access_table(model, &setup.targets));
                        printer.stdout(&format!(
                            "credentials: user admin; passwords with `mlopsctl secrets --project {}`",
                            model.project
                        ));
                    }
                    for (h, s) in &stacks {
                        printer.info(&format!(
                            "{h}: stack `{}`: {}; files: {} written, {} removed, {} uploaded",
                            s.project,
                            s.summary,
                            s.sync.written,
                            s.sync.removed,
                            bytes_human(s.sync.uploaded_bytes)
                        ));
                    }
                }
            }
            summarize(printer, "deploy", ok.len(), &failed);
        }
    }
    Ok(exit_code(&failed))
}

fn agent_row(o: &DeployOutcome) -> Vec<String> {
    vec![
        o.host.clone(),
        o.agent.version.clone(),
        if o.uploaded { "uploaded".into() } else { "-".into() },
        o.installed.clone().unwrap_or_else(|| "-".into()),
        o.facts.os.clone(),
        o.facts.arch.clone(),
        o.facts.cpus.to_string(),
        format!("{} free of {}", bytes_human(o.facts.memory_available_bytes), bytes_human(o.facts.memory_total_bytes)),
        format!("{} free", bytes_human(o.facts.disk_available_bytes)),
        o.stack.as_ref().filter(|s| !s.docker_version.is_empty()).map_or_else(
            || docker_cell(o.facts.docker, &o.facts.docker_version),
            |s| docker_cell(true, &s.docker_version),
        ),
    ]
}

fn services_table<'a>(rows: impl Iterator<Item = (&'a str, &'a ServiceOutcome)>) -> String {
    let rows: Vec<Vec<String>> = rows
        .map(|(h, s)| {
            vec![
                h.to_string(),
                s.service.clone(),
                s.state.clone(),
                if s.health.is_empty() { "-".into() } else { s.health.clone() },
                if s.changed { "yes".into() } else { "-".into() },
                s.container_id.chars().take(12).collect(),
            ]
        })
        .collect();
    table(&["HOST", "SERVICE", "STATE", "HEALTH", "CHANGED", "CONTAINER"], &rows)
}

async fn sync(setup: Setup, args: &StackArgs, printer: &Printer) -> Result<i32> {
    let plan = Arc::new(plan(&setup.state, args, false, 0, true, printer)?.0);
    let (ok, failed) = per_host(&setup, printer, move |target, ctx, progress| {
        let plan = plan.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let r = stack::apply(&mut conn, &plan, &progress).await;
            transport.close().await;
            r.map(|s| s.sync)
        }
    })
    .await;
    match printer.output {
        Output::Json => report_json(printer, "sync", &ok, &failed),
        Output::Text => {
            for (h, s) in &ok {
                printer.stdout(&format!(
                    "{h}: {} file(s): {} written, {} removed, {} unchanged; {} uploaded ({})",
                    s.files,
                    s.written,
                    s.removed,
                    s.unchanged,
                    bytes_human(s.uploaded_bytes),
                    s.path
                ));
            }
            summarize(printer, "sync", ok.len(), &failed);
        }
    }
    Ok(exit_code(&failed))
}

async fn down(setup: Setup, args: &StackArgs, volumes: bool, printer: &Printer) -> Result<i32> {
    let project = project_name(&setup.state, args)?;
    let p2 = project.clone();
    let (ok, failed) = per_host(&setup, printer, move |target, ctx, progress| {
        let project = p2.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let r = stack::down(&mut conn, &project, volumes, &progress).await;
            transport.close().await;
            r
        }
    })
    .await;
    match printer.output {
        Output::Json => report_json(printer, "down", &ok, &failed),
        Output::Text => {
            for (h, s) in &ok {
                printer.stdout(&format!("{h}: stack `{project}`: {s}"));
            }
            summarize(printer, "down", ok.len(), &failed);
        }
    }
    Ok(exit_code(&failed))
}

async fn watch(setup: Setup, args: &StackArgs, printer: &Printer) -> Result<i32> {
    let project = project_name(&setup.state, args)?;
    let output = printer.output;
    let results = fanout::run(setup.targets.clone(), setup.forks, {
        let ctx = setup.ctx.clone();
        move |target: Target| {
            let ctx = ctx.clone();
            let project = project.clone();
            async move {
                let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
                let mut stream = stack::watch_health(&mut conn, &project).await?;
                let p = Printer::new(output);
                let result = loop {
                    match stream.message().await {
                        Ok(Some(ev)) => match output {
                            Output::Json => p.stdout(&json!({"host": target.name, "unix_ms": ev.unix_ms, "docker_time_ns": ev.docker_time_ns, "service": ev.service, "state": ev.state, "health": ev.health, "health_output": ev.health_output}).to_string()),
                            Output::Text => {
                                let health = if ev.health.is_empty() { String::new() } else { format!(" ({})", ev.health) };
                                let output = if ev.health_output.is_empty() { String::new() } else { format!(": {}", ev.health_output) };
                                p.stdout(&format!("{} {} {} {}{health}{output}", clock(ev.unix_ms), target.name, ev.service, ev.state));
                            }
                        },
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(mlops_controller::ControllerError::Rpc { host: target.name.clone(), call: "WatchHealth", status: s.message().to_string() }),
                    }
                };
                transport.close().await;
                result
            }
        }
    })
    .await;
    let failed: Vec<(String, anyhow::Error)> = setup
        .targets
        .iter()
        .zip(results)
        .filter_map(|(t, r)| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some((t.name.clone(), anyhow::Error::new(e))),
            Err(p) => Some((t.name.clone(), anyhow::anyhow!(p))),
        })
        .collect();
    if !failed.is_empty() {
        summarize(printer, "watch", setup.targets.len() - failed.len(), &failed);
    }
    Ok(exit_code(&failed))
}

/// `HH:MM:SS.mmm` (UTC) of Unix milliseconds.
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (s / 3600) % 24, (s / 60) % 60, s % 60, unix_ms % 1000)
}

/// `10m`, `1h30m`, `45s` ago, as Unix seconds.
fn since_unix(since: Option<&str>) -> Result<i64> {
    let Some(s) = since else { return Ok(0) };
    let ms = mlops_compose::parse_duration_ms(s)
        .with_context(|| format!("--since `{s}` is not a duration (e.g. 10m, 1h30m)"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    Ok(now - (ms / 1000) as i64)
}

async fn logs(
    setup: Setup,
    args: &StackArgs,
    service: &str,
    follow: bool,
    tail: u32,
    since: Option<&str>,
    printer: &Printer,
) -> Result<i32> {
    let project = project_name(&setup.state, args)?;
    let since = since_unix(since)?;
    let prefix = setup.targets.len() > 1;
    let service = service.to_string();
    let results = fanout::run(setup.targets.clone(), setup.forks, {
        let ctx = setup.ctx.clone();
        move |target: Target| {
            let ctx = ctx.clone();
            let (project, service) = (project.clone(), service.clone());
            async move {
                let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
                let host = target.name.clone();
                let r = stack::logs(&mut conn, &project, &service, follow, tail, since, |stream, data| {
                    use std::io::Write;
                    let text = String::from_utf8_lossy(data);
                    let mut out: Box<dyn Write> = if stream == "stderr" {
                        Box::new(std::io::stderr().lock())
                    } else {
                        Box::new(std::io::stdout().lock())
                    };
                    if prefix {
                        for line in text.split_inclusive('\n') {
                            let _ = write!(out, "{host} | {line}");
                        }
                    } else {
                        let _ = out.write_all(data);
                    }
                    let _ = out.flush();
                })
                .await;
                transport.close().await;
                r
            }
        }
    })
    .await;
    let mut failed = Vec::new();
    for (t, r) in setup.targets.iter().zip(results) {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push((t.name.clone(), anyhow::Error::new(e))),
            Err(p) => failed.push((t.name.clone(), anyhow::anyhow!(p))),
        }
    }
    if !failed.is_empty() {
        summarize(printer, "logs", setup.targets.len() - failed.len(), &failed);
    }
    Ok(exit_code(&failed))
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

/// A host's stack services, or why they could not be listed (None: not asked).
type ServiceList = Option<Result<Vec<ServiceOutcome>, String>>;

async fn status(setup: Setup, args: &StackArgs, printer: &Printer) -> Result<i32> {
    let project =
        if args.stack.is_some() || args.project.is_some() { Some(project_name(&setup.state, args)?) } else { None };
    let Setup { targets, ctx, forks, .. } = setup;
    let results = fanout::run(targets.clone(), forks, move |target| {
        let ctx = ctx.clone();
        let project = project.clone();
        async move { bootstrap::status_host(&target, &ctx, project.as_deref()).await }
    })
    .await;
    let (outcomes, services): (Vec<StatusOutcome>, Vec<ServiceList>) = targets
        .iter()
        .zip(results)
        .map(|(t, r)| {
            r.unwrap_or_else(|e| {
                (
                    StatusOutcome {
                        host: t.name.clone(),
                        address: t.display_address(),
                        reachable: false,
                        agent: None,
                        facts: None,
                        error: Some(e),
                    },
                    None,
                )
            })
        })
        .unzip();
    let failed = outcomes.iter().filter(|o| o.agent.is_none()).count();
    match printer.output {
        Output::Json => {
            let hosts: Vec<serde_json::Value> = outcomes
                .iter()
                .zip(&services)
                .map(|(o, s)| {
                    let mut v = serde_json::to_value(o).expect("serializable");
                    match s {
                        Some(Ok(list)) => v["services"] = json!(list),
                        Some(Err(e)) => v["services_error"] = json!(e),
                        None => {}
                    }
                    v
                })
                .collect();
            printer
                .json(&json!({"command": "status", "ok": outcomes.len() - failed, "failed": failed, "hosts": hosts}));
        }
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
            let listed: Vec<(&str, &ServiceOutcome)> = outcomes
                .iter()
                .zip(&services)
                .filter_map(|(o, s)| match s {
                    Some(Ok(list)) => Some(list.iter().map(move |svc| (o.host.as_str(), svc))),
                    _ => None,
                })
                .flatten()
                .collect();
            if !listed.is_empty() {
                printer.stdout("");
                printer.stdout(&services_table(listed.into_iter()));
            }
            for (o, s) in outcomes.iter().zip(&services) {
                if let Some(Err(e)) = s {
                    printer.warn(&format!("{}: cannot list the stack's services: {e}", o.host));
                }
            }
        }
    }
    Ok(if failed == 0 { 0 } else { EXIT_HOST_FAILED })
}

async fn uninstall(setup: Setup, keep_state: bool, printer: &Printer) -> i32 {
    let (ok, failed): (Vec<(String, UninstallOutcome)>, _) =
        per_host(&setup, printer, move |target, ctx, _progress| async move {
            bootstrap::uninstall_host(&target, &ctx, keep_state).await
        })
        .await;
    match printer.output {
        Output::Json => report_json(printer, "agent uninstall", &ok, &failed),
        Output::Text => {
            for (_, o) in &ok {
                if o.was_installed {
                    printer.stdout(&format!("{}: agent removed ({})", o.host, o.removed.join(", ")));
                } else {
                    printer.stdout(&format!("{}: no agent installed", o.host));
                }
            }
            summarize(printer, "agent uninstall", ok.len(), &failed);
        }
    }
    exit_code(&failed)
}
