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
mod printer;

use std::sync::Arc;

use clap::Parser;
use mlops_controller::commands::{self, Setup, deploy::DeployOptions, logs::LogsOptions};
use mlops_controller::progress::Report;

use crate::cli::{AgentCommand, Cli, Command, PkiCommand};
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
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MLOPS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let printer = Arc::new(Printer::new(cli.global.output));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            printer.error(&anyhow::Error::new(e).context("cannot start the async runtime"));
            std::process::exit(EXIT_USAGE);
        }
    };
    let code = runtime.block_on(run(cli, printer.clone())).unwrap_or_else(|e| {
        printer.error(&anyhow::Error::new(e));
        EXIT_USAGE
    });
    // Tasks still holding SSH sessions are not awaited past this point.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

/// Runs the command; an `Err` is a usage or configuration error (exit 2),
/// host failures are in the returned exit code.
async fn run(cli: Cli, printer: Arc<Printer>) -> Result<i32, mlops_controller::ControllerError> {
    let report: Arc<dyn Report> = printer.clone();
    let needs_binary = matches!(cli.command, Command::Deploy { .. } | Command::Pki { .. });
    let mut options = cli.global.options();
    options.take_over = matches!(cli.command, Command::Deploy { take_over: true, .. });
    let setup = Setup::new(&options, needs_binary, report.as_ref())?;
    printer.set_targets(&setup.targets);
    Ok(match cli.command {
        Command::Deploy { stack, no_stack, no_docker_install, expose, health_timeout, take_over: _ } => {
            let opts = DeployOptions {
                stack: stack.into(),
                no_stack,
                install_docker: !no_docker_install,
                expose,
                health_timeout,
            };
            let r = commands::deploy::deploy(&setup, &opts, report).await?;
            printer.deploy(&r, &setup.targets)
        }
        Command::Secrets { stack, cached } => {
            printer.secrets(&commands::secrets::secrets(&setup, &stack.into(), cached, report).await?)
        }
        Command::Ui { name, stack, port } => {
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let p = printer.clone();
            commands::ui::ui(&setup, &stack.into(), &name, port, report.as_ref(), |o| p.ui_opened(o), shutdown).await?;
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
    })
}
