//! `mlopsctl`: deploys and runs the MLOps platform on one or many hosts.
//!
//! This crate is only the command line: argument parsing ([`cli`]), output
//! ([`printer`]) and one module per command; the work is in
//! `mlops-controller`.
//!
//! Exit codes:
//! - 0: every host succeeded;
//! - 1: at least one host failed (the summary names each and why);
//! - 2: the command could not start: bad flags, inventory, state directory
//!   or agent binary.

mod cli;
mod commands;
mod printer;

use clap::Parser;

use crate::printer::Printer;

/// Exit code: some host failed.
pub const EXIT_HOST_FAILED: i32 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: i32 = 2;

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
    let printer = Printer::new(cli.global.output);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            printer.error(&anyhow::Error::new(e).context("cannot start the async runtime"));
            std::process::exit(EXIT_USAGE);
        }
    };
    let code = runtime.block_on(commands::run(cli, &printer));
    // Tasks still holding SSH sessions are not awaited past this point.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
