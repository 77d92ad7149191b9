//! `mlopsctl`: deploys and runs the MLOps platform on one or many hosts.
//!
//! This crate is only the command line: argument parsing ([`cli`]) and
//! output ([`printer`]); every command is a function of
//! `mlops_controller::commands`, called from [`run`].
//!
//! Exit codes:
//! - 0: every host succeeded;
//! - 1: at least one host failed (the summary names each and why);
//! - 2: the command could not start: bad flags, inventory, Compose file,
//!   state directory or agent binary.

mod cli;
mod live;
mod printer;
mod runlog;

use std::io::IsTerminal;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};
use mlops_controller::ControllerError;
use mlops_controller::commands::{self, Setup, deploy::DeployOptions, logs::LogsOptions, operator};
use mlops_controller::progress::Report;
use mlops_controller::state::StateDir;

use crate::cli::{AgentCommand, Cli, Command, OperatorCommand, PkiCommand, SecretsCommand, StateCommand, UsersCommand};
use crate::printer::{EXIT_USAGE, Printer};

fn main() {
    // One crypto provider for the process: aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // aws-lc seeds its random generator on first use, which takes ~20 ms;
    // do it now on the side, while SSH connections are being set up,
    // rather than in the middle of the first TLS handshake.
    std::thread::spawn(|| {
        let mut seed = [0u8; 16];
        let _ = rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut seed);
    });
    let matches = Cli::command().get_matches();
    // The subcommand's name, for the run's log.
    let command = matches.subcommand_name().unwrap_or("mlopsctl").to_string();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Live lines only where a person watches: stderr a terminal that can
    // redraw, and no -v.
    let live = !cli.global.verbose
        && std::io::stderr().is_terminal()
        && std::env::var_os("TERM").is_some_and(|t| !t.is_empty() && t != "dumb");
    let printer = Arc::new(Printer::new(cli.global.output, live));
    // Diagnostics go through the printer too: above live lines, and into the run's log.
    let diagnostics = printer.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MLOPS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_ansi(false)
        .with_writer(move || DiagnosticLine { printer: diagnostics.clone(), text: Vec::new() })
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            printer.error(&anyhow::Error::new(e).context("cannot start the async runtime"));
            std::process::exit(EXIT_USAGE);
        }
    };
    let code = runtime.block_on(run(cli, &command, printer.clone())).unwrap_or_else(|e| {
        printer.error(&anyhow::Error::new(e));
        EXIT_USAGE
    });
    printer.finish(code);
    // Tasks still holding SSH sessions are not awaited past this point.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

/// One `tracing` event, written whole to the printer's stderr when dropped.
struct DiagnosticLine {
    printer: Arc<Printer>,
    text: Vec<u8>,
}

impl std::io::Write for DiagnosticLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for DiagnosticLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.text);
        let text = text.trim_end();
        if !text.is_empty() {
            self.printer.info(text);
        }
    }
}

/// Runs the command; an `Err` is a usage or configuration error (exit 2),
/// host failures are in the returned exit code.
async fn run(cli: Cli, command: &str, printer: Arc<Printer>) -> Result<i32, mlops_controller::ControllerError> {
    let report: Arc<dyn Report> = printer.clone();
    // What acts on the state directory alone, before any host is resolved
    // (a join or an import must find no CA there, not one made by opening it).
    let state_path = cli.global.state_dir.clone().unwrap_or_else(StateDir::default_path);
    match &cli.command {
        Command::Operator { command: OperatorCommand::Join { bundle, open } } => {
            let text = match bundle {
                Some(path) => std::fs::read_to_string(path).map_err(|e| {
                    ControllerError::usage(format!("cannot read the bundle `{}`: {e}", path.display()), None)
                })?,
                None => std::env::var(operator::BUNDLE_ENV).map_err(|_| {
                    ControllerError::usage(
                        "no bundle given",
                        Some("name the bundle file, or set MLOPS_OPERATOR_BUNDLE to its text"),
                    )
                })?,
            };
            let with = operator::open_with(open.age_identity.as_deref(), open.passphrase_file.as_deref())?;
            return Ok(printer.operator_joined(&operator::join(&state_path, &text, &with)?));
        }
        Command::State { command: StateCommand::Import { file, open } } => {
            let sealed = std::fs::read(file)
                .map_err(|e| ControllerError::usage(format!("cannot read `{}`: {e}", file.display()), None))?;
            let with = operator::open_with(open.age_identity.as_deref(), open.passphrase_file.as_deref())?;
            return Ok(printer.state_moved("imported", &commands::state::import(&state_path, &sealed, &with)?));
        }
        Command::Operator { command: OperatorCommand::Add { name, seal, out } } => {
            operator::auto_join(&state_path, report.as_ref())?;
            let state = StateDir::open(&state_path)?;
            let to = operator::seal_to(&seal.recipient, seal.passphrase_file.as_deref())?;
            return Ok(printer.operator_added(&operator::add(&state, name, &to, out.as_deref())?));
        }
        Command::Operator { command: OperatorCommand::List } => {
            operator::auto_join(&state_path, report.as_ref())?;
            return Ok(printer.operator_list(&operator::list(&StateDir::open(&state_path)?)?));
        }
        Command::State { command: StateCommand::Export { out, seal } } => {
            let state = StateDir::open(&state_path)?;
            let to = operator::seal_to(&seal.recipient, seal.passphrase_file.as_deref())?;
            return Ok(printer.state_moved("exported", &commands::state::export(&state, &to, out)?));
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "mlopsctl", &mut out);
            printer.stdout(&String::from_utf8_lossy(&out));
            return Ok(0);
        }
        Command::Man { out } => {
            let written = man_pages(out)?;
            printer.stdout(&format!("{written} man pages written to {}", out.display()));
            return Ok(0);
        }
        Command::Inventory => {
            let Some(path) = cli.global.inventory.as_deref() else {
                return Err(ControllerError::usage(
                    "`mlopsctl inventory` prints an inventory, but no --inventory was given",
                    Some("add -i FILE (a YAML, INI or JSON inventory, a script or a directory)"),
                ));
            };
            if !cli.global.hosts.is_empty() {
                return Err(ControllerError::usage(
                    "`mlopsctl inventory` prints the inventory; --host names hosts outside it",
                    Some("drop --host (use --limit to select hosts of the inventory)"),
                ));
            }
            let ssh_config = cli.global.options().ssh_config(report.as_ref());
            printer.json(&mlops_inventory::list_json(path, cli.global.limit.as_deref(), &ssh_config)?);
            return Ok(0);
        }
        _ => {}
    }
    let needs_binary = matches!(
        cli.command,
        Command::Deploy { .. }
            | Command::Migrate { .. }
            | Command::Backup { .. }
            | Command::Restore { .. }
            | Command::Pki { .. }
            | Command::Operator { .. }
            | Command::Secrets { command: Some(_), .. }
    );
    let mut options = cli.global.options();
    options.take_over = matches!(cli.command, Command::Deploy { take_over: true, .. });
    let setup = Setup::new(&options, needs_binary, report.as_ref())?;
    // `config` reads the stack and prints it: no host, nothing to log.
    if !matches!(cli.command, Command::Config { .. }) {
        printer.open_log(&setup.state.path, command);
    }
    printer.set_targets(&setup.targets);
    Ok(match cli.command {
        Command::Deploy {
            stack,
            no_stack,
            no_docker_install,
            expose,
            health_timeout,
            take_over: _,
            no_local_images,
            min_free_space,
            rollout,
        } => {
            let opts = DeployOptions {
                stack: stack.into(),
                no_stack,
                install_docker: !no_docker_install,
                expose,
                health_timeout,
                rotating: Vec::new(),
                local_images: !no_local_images,
                rollout: rollout.into(),
                min_free_space,
            };
            let r = commands::deploy::deploy(&setup, &opts, report).await?;
            printer.deploy(&r, &setup.targets)
        }
        Command::Plan {
            stack,
            no_docker_install,
            expose,
            health_timeout,
            no_local_images,
            min_free_space,
            rollout,
        } => {
            let opts = DeployOptions {
                stack: stack.into(),
                no_stack: false,
                install_docker: !no_docker_install,
                expose,
                health_timeout,
                rotating: Vec::new(),
                local_images: !no_local_images,
                rollout: rollout.into(),
                min_free_space,
            };
            printer.plan(&commands::plan::plan(&setup, &opts, report).await?)
        }
        Command::Secrets { command: None, stack, cached } => {
            printer.secrets(&commands::secrets::secrets(&setup, &stack.into(), cached, report).await?)
        }
        Command::Secrets { command: Some(SecretsCommand::Rotate { name, stack, health_timeout, expose }), .. } => {
            let opts = DeployOptions {
                stack: stack.into(),
                no_stack: false,
                install_docker: false,
                expose,
                health_timeout,
                rotating: Vec::new(),
                local_images: false,
                rollout: Default::default(),
                min_free_space: commands::deploy::DEFAULT_MIN_FREE_SPACE,
            };
            printer.rotated(&commands::rotate::rotate(&setup, &opts, &name, report).await?)
        }
        Command::Ui { name, stack, port } => {
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let p = printer.clone();
            commands::ui::ui(&setup, &stack.into(), &name, port, report.as_ref(), |o| p.ui_opened(o), shutdown).await?;
            0
        }
        Command::Config { stack, services } => {
            let resolved = commands::config::config(&setup, &stack.into(), report.as_ref())?;
            if services {
                let names: Vec<&str> = resolved.stack.services.keys().map(String::as_str).collect();
                printer.stdout(&names.join("\n"));
            } else if cli.global.output == cli::Output::Json {
                printer.json(&resolved.document);
            } else {
                printer.stdout(&mlops_compose::emit::to_yaml(&resolved.document));
            }
            0
        }
        Command::Status { stack } => printer.status(&commands::status::status(&setup, &stack.into(), report).await?),
        Command::Sync { stack } => printer.sync(&commands::sync::sync(&setup, &stack.into(), report).await?),
        Command::Down { stack, volumes } => {
            let (project, r) = commands::down::down(&setup, &stack.into(), volumes, report).await?;
            printer.down(&project, &r)
        }
        Command::Watch { stack } => {
            let p = printer.clone();
            let r = commands::watch::watch(&setup, &stack.into(), report, move |h, ev| p.health_event(h, ev)).await?;
            printer.streamed("watch", &r)
        }
        Command::Logs { service, stack, follow, tail, since } => {
            let prefix = setup.targets.len() > 1;
            let p = printer.clone();
            let opts = LogsOptions { service, follow, tail, since };
            let r = commands::logs::logs(&setup, &stack.into(), &opts, report, move |h, stream, data| {
                p.log_chunk(h, stream, data, prefix);
            })
            .await?;
            printer.streamed("logs", &r)
        }
        Command::Agent { command: AgentCommand::Uninstall { keep_state } } => {
            printer.uninstall(&commands::uninstall::uninstall(&setup, keep_state, report).await)
        }
        Command::Pki { command: PkiCommand::Rotate } => {
            printer.pki_rotate(&commands::pki::rotate(&setup, report).await?)
        }
        Command::Operator { command: OperatorCommand::Remove { name } } => {
            printer.operator_removed(&operator::remove(&setup, &name, report).await?)
        }
        Command::History { stack, last } => {
            let (project, r) = commands::history::history(&setup, &stack.into(), last, report).await?;
            printer.history(&project, &r)
        }
        Command::Rollback { stack, to, to_deploy, health_timeout, min_healthy_time } => {
            let to = commands::rollback::RollbackOptions {
                to: to.unwrap_or(0),
                to_deploy,
                health_timeout,
                min_healthy_seconds: min_healthy_time,
            };
            let (project, r) = commands::rollback::rollback(&setup, &stack.into(), &to, report).await?;
            printer.rollback(&project, &r)
        }
        Command::Migrate {
            stack,
            from,
            to,
            dry_run,
            decommission,
            stop_timeout,
            health_timeout,
            no_docker_install,
            expose,
            no_local_images,
            with_metrics,
        } => {
            let opts = commands::migrate::MigrateOptions {
                stack: stack.into(),
                from,
                to,
                dry_run,
                decommission,
                stop_timeout,
                health_timeout,
                install_docker: !no_docker_install,
                expose,
                local_images: !no_local_images,
                with_metrics,
            };
            match Box::pin(commands::migrate::migrate(&setup, &opts, report)).await {
                Ok(r) => printer.migrate(&r),
                Err(e) if nothing_done(&e) => return Err(e),
                Err(e) => printer.failed("migrate", &e),
            }
        }
        Command::Users { command } => {
            use commands::users::{UsersAction, password_from};
            let stdin_password = |given: bool| -> Result<Option<String>, ControllerError> {
                if !given {
                    return Ok(None);
                }
                if std::io::stdin().is_terminal() {
                    return Err(ControllerError::usage(
                        "--password-stdin reads the password from a pipe, and stdin is a terminal",
                        Some(
                            "pipe it in (`printf '%s\\n' \"$PW\" | mlopsctl users ...`), or leave the flag out for a generated one",
                        ),
                    ));
                }
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map_err(|e| ControllerError::usage(format!("cannot read the password from stdin: {e}"), None))?;
                password_from(&text).map(Some)
            };
            let (stack, action) = match command {
                UsersCommand::List { stack } => (stack, UsersAction::List),
                UsersCommand::Add { name, role, email, password_stdin, stack } => {
                    let password = stdin_password(password_stdin)?;
                    (stack, UsersAction::Add { name, role, email, password })
                }
                UsersCommand::Remove { name, stack } => (stack, UsersAction::Remove { name }),
                UsersCommand::SetRole { name, role, stack } => (stack, UsersAction::SetRole { name, role }),
                UsersCommand::SetPassword { name, password_stdin, stack } => {
                    let password = stdin_password(password_stdin)?;
                    (stack, UsersAction::SetPassword { name, password })
                }
            };
            match commands::users::users(&setup, &stack.into(), action, report.as_ref()).await {
                Ok(r) => printer.users(&r),
                Err(e) if nothing_done(&e) => return Err(e),
                Err(e) => printer.failed("users", &e),
            }
        }
        Command::Backup { stack, to, to_host, with_metrics, keep, schedule } => {
            let opts =
                commands::backup::BackupOptions { stack: stack.into(), to, to_host, with_metrics, keep, schedule };
            if opts.schedule.is_some() {
                let r = commands::backup::schedule(&setup, &opts, report).await?;
                return Ok(printer.backup_schedule(&r));
            }
            match Box::pin(commands::backup::backup(&setup, &opts, report)).await {
                Ok(r) => printer.backup(&r),
                Err(e) if nothing_done(&e) => return Err(e),
                Err(e) => printer.failed("backup", &e),
            }
        }
        Command::Restore {
            stack,
            backup,
            from_host,
            stop_timeout,
            health_timeout,
            no_docker_install,
            expose,
            no_local_images,
        } => {
            let opts = commands::backup::RestoreOptions {
                stack: stack.into(),
                from: backup,
                from_host,
                stop_timeout,
                health_timeout,
                install_docker: !no_docker_install,
                expose,
                local_images: !no_local_images,
            };
            match Box::pin(commands::backup::restore(&setup, &opts, report)).await {
                Ok(r) => printer.restore(&r),
                Err(e) if nothing_done(&e) => return Err(e),
                Err(e) => printer.failed("restore", &e),
            }
        }
        Command::Operator { .. }
        | Command::State { .. }
        | Command::Inventory
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("handled before the hosts are resolved")
        }
    })
}

/// Writes mlopsctl(1) and a page per command (`mlopsctl-deploy(1)`, and
/// `mlopsctl-operator-add(1)` for nested ones) into `dir`, each through a
/// temporary file renamed into place; returns how many.
fn man_pages(dir: &std::path::Path) -> Result<usize, ControllerError> {
    fn write(dir: &std::path::Path, cmd: &clap::Command, name: &str, count: &mut usize) -> Result<(), ControllerError> {
        let cmd = cmd.clone().name(name.to_string());
        let mut page = Vec::new();
        let io = |e: std::io::Error| {
            ControllerError::Local(format!("cannot write the man page of {name} in {}: {e}", dir.display()))
        };
        clap_mangen::Man::new(cmd.clone()).render(&mut page).map_err(io)?;
        let path = dir.join(format!("{name}.1"));
        let tmp = dir.join(format!(".{name}.1.tmp"));
        std::fs::write(&tmp, &page).and_then(|()| std::fs::rename(&tmp, &path)).map_err(io)?;
        *count += 1;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            write(dir, sub, &format!("{name}-{}", sub.get_name()), count)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        ControllerError::usage(
            format!("cannot create `{}`: {e}", dir.display()),
            Some("--out names a directory to write the pages into"),
        )
    })?;
    let mut count = 0;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    write(dir, &cmd, "mlopsctl", &mut count)?;
    Ok(count)
}

/// Bad flags, inventory, stack or backup: nothing was done (exit 2, as
/// any usage error), unlike a command that failed on its way (exit 1).
fn nothing_done(e: &ControllerError) -> bool {
    matches!(
        e,
        ControllerError::Usage { .. }
            | ControllerError::Inventory(_)
            | ControllerError::Compose(_)
            | ControllerError::StateDir { .. }
    )
}
