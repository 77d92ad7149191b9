//! `mlops-bench-stack`: the agent's stack work, measured against a real
//! Docker engine; prints figures and asserts nothing about time.
//!
//! The engine is a test host's own dockerd (never this machine's); the
//! agent runs on a loopback port and drives it (mutual TLS, no SSH: what is
//! measured is the agent and the engine, not the transport; `mlops-bench`
//! measures that). Build first: `cargo build --release -p mlops-agent -p mlops-bench`.
//!
//! Measured (targets from the issue in brackets):
//! - no-op converge of a 10-service stack [200 ms]
//! - sync of 1,000 files / 50 MB from cold, then of one changed file [50 ms]
//! - health transition: Docker's event time to the controller receiving it [1 s]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use mlops_controller::client::{AgentConn, ClientTls};
use mlops_controller::stack;
use mlops_controller::sync::{HashCache, scan};
use mlops_controller::transport::Transport;
use mlops_e2e::{LocalAgent, TestHost, TestStack};
use mlops_pki::Ca;
use mlops_proto::v1::ConvergeRequest;

fn main() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let agent = mlops_bench::agent_binary()?;
    let pki = tempfile::tempdir()?;
    let ca = Ca::open_or_create(pki.path())?;
    let host = TestHost::with_docker("bench-stack")?;
    let local = LocalAgent::start_with(&agent, &ca, Some(&host.docker_socket()))?;
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity()?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mut conn = AgentConn::connect(Arc::new(Transport::local()), local.port, &tls).await?;
        bench_sync(&mut conn).await?;
        bench_converge_and_health(&mut conn, &host).await
    })
}

/// Milliseconds, printed by the shared report.
fn report(what: &str, samples: &mut [f64], target: &str) {
    let samples: Vec<Duration> = samples.iter().map(|ms| Duration::from_secs_f64(ms / 1000.0)).collect();
    mlops_bench::report(what, &samples, target);
}

async fn bench_sync(conn: &mut AgentConn) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tree_dir = dir.path().join("tree");
    // 1,000 files of 50 KB in 20 directories, distinct contents.
    for i in 0..1000u32 {
        let d = tree_dir.join(format!("d{:02}", i % 20));
        std::fs::create_dir_all(&d)?;
        let mut data = vec![0u8; 50_000];
        for (j, b) in data.iter_mut().enumerate() {
            *b = ((j as u32).wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8;
        }
        std::fs::write(d.join(format!("f{i:04}.bin")), data)?;
    }
    let mut cache = HashCache::default();
    let start = Instant::now();
    let tree = Arc::new(scan(&tree_dir, &mut cache)?);
    let scanned = start.elapsed();
    let out = stack::sync(conn, "bench-sync", &tree, &quiet()).await?;
    let cold = start.elapsed();
    println!(
        "sync cold: {} files, {:.1} MB: {:.0} ms (hashing and scan {:.0} ms; {} blobs uploaded)",
        out.files,
        out.uploaded_bytes as f64 / 1e6,
        cold.as_secs_f64() * 1000.0,
        scanned.as_secs_f64() * 1000.0,
        out.uploaded_blobs
    );
    let mut warm = Vec::new();
    for round in 0..10u8 {
        let changed = tree_dir.join("d07/f0007.bin");
        std::fs::write(&changed, vec![round; 50_000])?;
        let start = Instant::now();
        let tree = Arc::new(scan(&tree_dir, &mut cache)?);
        let out = stack::sync(conn, "bench-sync", &tree, &quiet()).await?;
        warm.push(start.elapsed().as_secs_f64() * 1000.0);
        if out.written != 1 || out.uploaded_blobs != 1 {
            bail!("expected one file to change, got {out:?}");
        }
    }
    report("sync of one changed file among 1,000 (scan + manifest + upload + commit)", &mut warm, "50 ms");
    Ok(())
}

const SERVICES: usize = 10;

async fn bench_converge_and_health(conn: &mut AgentConn, host: &TestHost) -> Result<()> {
    let mut compose = String::from("name: \"{project}\"\nservices:\n");
    for i in 0..SERVICES {
        compose.push_str(&format!(
            "  s{i}:\n    build: ./img\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; sleep 3600 & wait\"]\n    healthcheck:\n      test: [\"CMD\", \"true\"]\n      interval: 1s\n{}",
            if i > 0 { format!("    depends_on: [s{}]\n", i - 1) } else { String::new() }
        ));
    }
    let stack_dir = TestStack::new(&compose)?;
    let loaded = mlops_compose::load(stack_dir.path(), &mlops_compose::LoadOptions::default())?;
    let tree = Arc::new(scan(&loaded.dir, &mut HashCache::default())?);
    let root = stack::files_root(&loaded.stack.project);
    stack::sync(conn, &root, &tree, &quiet()).await?;
    let request = ConvergeRequest {
        stack_json: serde_json::to_string(&loaded.stack)?,
        holder: "mlops-bench-stack".into(),
        files_root: root,
        health_timeout_seconds: 120,
        rotating: Vec::new(),
        ..Default::default()
    };
    let converge = |conn: &mut AgentConn, request: ConvergeRequest| {
        let mut client = conn.raw().clone();
        async move {
            let mut stream = client.converge(request).await?.into_inner();
            while let Some(ev) = stream.next().await {
                let ev = ev.map_err(|s| anyhow::anyhow!("converge failed: {}", s.message()))?;
                if ev.action() == mlops_proto::v1::StackAction::Done {
                    return Ok(ev);
                }
            }
            bail!("converge ended without a result")
        }
    };
    let start = Instant::now();
    converge(conn, request.clone()).await?;
    println!(
        "converge cold, {SERVICES} services (build, create, start, healthy): {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let mut noop = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let done = converge(conn, request.clone()).await?;
        noop.push(start.elapsed().as_secs_f64() * 1000.0);
        if done.services.iter().any(|s| s.changed) {
            bail!("a no-op converge changed something: {}", done.detail);
        }
    }
    report(&format!("no-op converge, {SERVICES} services"), &mut noop, "200 ms");

    // Health: stop and start one container; time from Docker's event to arrival here.
    let mut watch = stack::watch_health(conn, &loaded.stack.project).await?;
    let container = format!("{}-s9-1", loaded.stack.project);
    let mut latencies = Vec::new();
    for round in 0..6 {
        let (args, want): (&[&str], &str) = if round % 2 == 0 {
            (&["stop", "-t", "1", &container], "exited")
        } else {
            (&["start", &container], "running")
        };
        host.docker_result(args)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ev = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), watch.message())
                .await
                .context("no health event within 10 s")??
                .context("the health stream ended")?;
            if ev.service == "s9" && ev.state == want && ev.docker_time_ns > 0 {
                let now_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                latencies.push((now_ns.saturating_sub(ev.docker_time_ns)) as f64 / 1e6);
                break;
            }
        }
    }
    report("health transition, Docker event to controller", &mut latencies, "1 s");
    Ok(())
}

/// No progress events: the bench times the sync, not a display.
fn quiet() -> mlops_controller::progress::Progress {
    mlops_controller::progress::Progress::silent("bench")
}
