//! `mlops-agent`: see the library docs for the layout.
//!
//! Exit codes: 0 success; 1 the command failed (message on stderr);
//! 2 bad command line.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mlops_agent::config::{self, AgentConfig};
use mlops_agent::daemon::{self, Readiness};
use mlops_agent::install::{self, ServiceManager};
use mlops_agent::service::{self, AgentService};
use mlops_agent::tls::{self, TlsMaterial};
use mlops_proto::layout;

#[derive(Parser)]
#[command(
    name = "mlops-agent",
    version,
    about = "The mlopsctl agent: serves the controller over gRPC with mutual TLS on loopback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the controller (what the service runs).
    Serve(ServeArgs),
    /// Configure and (re)start the agent; reads an install bundle from stdin. Run by mlopsctl.
    Install {
        /// How to keep the agent running; `auto` picks systemd when it is PID 1.
        #[arg(long, default_value = "auto", value_parser = ["auto", "systemd", "daemon"])]
        service_manager: String,
    },
    /// Stop the agent and remove its files.
    Uninstall {
        /// Keep /var/lib/mlops-agent.
        #[arg(long)]
        keep_state: bool,
    },
    /// Print version, API level and the binary's sha256 as JSON.
    Version,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The configuration written by `install`.
    #[arg(long, default_value_os_t = AgentConfig::default_path())]
    config: PathBuf,
    /// Listen here instead of the configured port (loopback only).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Read ca.pem, server.pem and server.key from here instead.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The Docker engine's socket instead of the configured one.
    #[arg(long)]
    docker_socket: Option<PathBuf>,
    /// Fork into the background once listening (hosts without systemd).
    #[arg(long)]
    daemonize: bool,
    #[arg(long, default_value = layout::PIDFILE)]
    pidfile: PathBuf,
    #[arg(long, default_value = layout::LOG_FILE)]
    log_file: PathBuf,
}

fn main() {
    // One crypto provider for the whole process (aws-lc-rs).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Install { service_manager } => run_install(&service_manager),
        Command::Uninstall { keep_state } => install::uninstall(ServiceManager::detect(), keep_state)
            .map_err(Into::into)
            .map(|r| println!("{}", serde_json::to_string(&r).expect("serializable"))),
        Command::Version => {
            println!(
                "{}",
                serde_json::json!({
                    "version": mlops_agent::VERSION,
                    "api_level": mlops_proto::API_LEVEL,
                    "sha256": service::running_binary_sha256(),
                })
            );
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  Caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run_install(service_manager: &str) -> Result<()> {
    let manager = match service_manager {
        "systemd" => ServiceManager::Systemd,
        "daemon" => ServiceManager::Daemon,
        _ => ServiceManager::detect(),
    };
    let mut bundle = Vec::new();
    std::io::stdin().take(1 << 20).read_to_end(&mut bundle).context("cannot read the install bundle from stdin")?;
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let report = install::install(&bundle, &exe, manager)?;
    println!("{}", serde_json::to_string(&report).expect("serializable"));
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<()> {
    // Fork first: nothing may have started a thread yet.
    let readiness = if args.daemonize {
        daemon::daemonize(&args.log_file)
            .with_context(|| format!("cannot daemonize (log file {})", args.log_file.display()))?
    } else {
        Readiness::none()
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MLOPS_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();

    let prepared = prepare(args);
    let Prepared { listener, tls_config, cfg, config_sha256, crl, cert_not_after } = match prepared {
        Ok(p) => p,
        Err(e) => {
            readiness.failed(&format!("{e:#}"));
            return Err(e);
        }
    };
    if args.daemonize
        && let Err(e) = daemon::write_pidfile(&args.pidfile)
    {
        readiness.failed(&format!("cannot write pidfile {}: {e}", args.pidfile.display()));
        return Err(e.into());
    }
    let manager = if std::env::var_os("NOTIFY_SOCKET").is_some() {
        "systemd"
    } else if args.daemonize {
        "daemon"
    } else {
        "foreground"
    };
    let sha = service::running_binary_sha256();
    // The state directory holds trees, blobs and temporary files: root's
    // alone, whoever made it.
    mlops_agent::engine::confine::private_dir(&cfg.state_dir)
        .with_context(|| format!("cannot use the state directory {}", cfg.state_dir.display()))?;
    tracing::info!(version = mlops_agent::VERSION, addr = %cfg.listen_addr(), manager, "listening");

    // The agent's work is I/O-bound and small: one thread keeps it lean.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        readiness.ready();
        let (state_dir, docker_socket) = (cfg.state_dir.clone(), cfg.docker_socket.clone());
        let trusted: Vec<u32> = std::iter::once(0).chain(cfg.operator_uids.iter().copied()).collect();
        mlops_agent::server::serve(
            listener,
            tls_config,
            trusted,
            |stop| {
                AgentService::new(sha, config_sha256, manager, state_dir, stop)
                    .with_docker_socket(docker_socket)
                    .with_crl(crl.0, crl.1)
                    .with_cert_not_after(cert_not_after)
                    .start_backups()
            },
            shutdown_signal(),
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    });
    if args.daemonize && daemon::read_live_pid(&args.pidfile) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(&args.pidfile);
    }
    result
}

struct Prepared {
    listener: std::net::TcpListener,
    tls_config: rustls::ServerConfig,
    cfg: AgentConfig,
    /// The hash of the install bundle this configuration corresponds to.
    config_sha256: String,
    /// The revocation list enforced: number and PEM.
    crl: (u64, String),
    /// The end of the server certificate's validity (Unix seconds).
    cert_not_after: i64,
}

/// Binds the listener and loads TLS material, before readiness is reported.
fn prepare(args: &ServeArgs) -> Result<Prepared> {
    // aws-lc seeds its random generator on first use (~20 ms): pay that
    // before reporting ready, not during the controller's first handshake.
    let mut seed = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut seed)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    let mut cfg = if args.listen.is_some() && args.tls_dir.is_some() && !args.config.exists() {
        AgentConfig::default()
    } else {
        AgentConfig::load(&args.config)?
    };
    if let Some(addr) = args.listen {
        cfg.port = config::check_loopback(addr)?.port();
    }
    if let Some(dir) = &args.tls_dir {
        cfg.tls_dir = dir.clone();
    }
    if let Some(dir) = &args.state_dir {
        cfg.state_dir = dir.clone();
    }
    if let Some(socket) = &args.docker_socket {
        cfg.docker_socket = socket.clone();
    }
    let material = TlsMaterial::load(&cfg.tls_dir)?;
    let tls_config = tls::server_config(&material).context("cannot build the TLS configuration")?;
    let addr = cfg.listen_addr();
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let config_sha256 = mlops_proto::bundle_sha256(&mlops_proto::v1::InstallBundle {
        ca_pem: material.ca_pem,
        port: u32::from(cfg.port),
        ..Default::default()
    });
    let crl = (material.crl_number, material.crl_pem);
    let cert_not_after = tls::parse_certs(&material.cert_pem, "the server certificate")
        .ok()
        .and_then(|c| c.first().and_then(|c| mlops_proto::der::not_after_unix(c)))
        .unwrap_or(0);
    Ok(Prepared { listener, tls_config, cfg, config_sha256, crl, cert_not_after })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handlers can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
