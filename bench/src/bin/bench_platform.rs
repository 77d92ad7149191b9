//! `mlops-bench-platform`: the platform, timed, on a test host with its own
//! Docker engine (never this machine's engine, agent or platform). Prints
//! figures; asserts nothing about time.
//!
//! ```text
//! cargo build --release -p mlopsctl -p mlops-agent -p mlops-bench && cargo exporter-static
//! target/release/mlops-bench-platform
//! ```
//!
//! - deploy to all-healthy on a host whose engine has no image at all: the
//!   Debian base from debootstrap and every image built [5 min];
//! - deploy to all-healthy after `down`, images cached [60 s];
//! - no-op re-deploy;
//! - a changed DAG landing on the host (`mlopsctl sync`, whole command) [0.5 s];
//! - the platform's idle memory, per container (from the engine's stats).
//!
//! The test host, its engine and everything on it go away when it ends.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mlops_e2e::TestEnv;

fn main() -> Result<()> {
    let target = mlops_bench::target_dir();
    let (ctl, agent) = (target.join("release/mlopsctl"), target.join("release/mlops-agent"));
    let exporter = target.join("x86_64-unknown-linux-gnu/release/mlops-airflow-exporter");
    for p in [&ctl, &agent, &exporter] {
        if !p.exists() {
            bail!(
                "{} does not exist\n  hint: cargo build --release -p mlopsctl -p mlops-agent && cargo exporter-static",
                p.display()
            );
        }
    }
    let mut env = TestEnv::with_binaries(&ctl, &agent)?;
    // A first deploy builds every image of the platform.
    env.ctl_deadline = std::time::Duration::from_secs(60 * 60);
    env.exporter = Some(exporter);
    let host = env.docker_host("bench-platform")?;
    let (key, spec) = (env.key.display().to_string(), host.spec("root"));
    let run = |args: &[&str]| -> Result<Duration> {
        let mut all = vec!["--identity", key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        let start = Instant::now();
        let out = env.ctl(&all);
        if out.code != 0 {
            bail!("mlopsctl {args:?} failed:\n{}", out.stderr);
        }
        Ok(start.elapsed())
    };

    let cold = run(&["deploy", "--skip", "grafana", "--health-timeout", "900"])?;
    println!(
        "deploy to all-healthy, new engine (debootstrap base and every image built): {:.1} s (target 5 min)",
        cold.as_secs_f64()
    );
    run(&["down", "--project", "mlops"])?;
    let warm = run(&["deploy", "--skip", "grafana", "--health-timeout", "900"])?;
    println!("deploy to all-healthy after down, images cached: {:.1} s (target 60 s)", warm.as_secs_f64());
    let noop = run(&["deploy", "--skip", "grafana"])?;
    println!("no-op re-deploy of the platform: {:.2} s", noop.as_secs_f64());

    // A changed DAG: a copy of the bundle as the stack, one DAG edited per round.
    let bundle = tempfile::tempdir()?;
    copy(&mlops_bench::workspace().join("platform"), bundle.path(), "")?;
    let dir = bundle.path().display().to_string();
    run(&["sync", "--stack", &dir, "--skip", "grafana"])?;
    let mut times = Vec::new();
    for round in 0..5 {
        let dag = bundle.path().join("airflow/dags/example_etl.py");
        let mut text = std::fs::read_to_string(&dag)?;
        text.push_str(&format!("\n# edit {round}\n"));
        std::fs::write(&dag, text)?;
        times.push(run(&["sync", "--stack", &dir, "--skip", "grafana"])?);
    }
    mlops_bench::report("a changed DAG landing on the host (mlopsctl sync, whole command)", &times, "500 ms");

    std::thread::sleep(Duration::from_secs(60));
    let stats = host.docker_result(&["stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}"])?;
    let mut total = 0.0;
    let mut rows: Vec<(f64, String)> = Vec::new();
    for line in stats.lines().filter(|l| l.starts_with("mlops-")) {
        let (name, usage) = line.split_once('\t').unwrap_or((line, ""));
        let used = usage.split('/').next().unwrap_or("").trim();
        let mib = parse_mem(used);
        total += mib;
        rows.push((mib, name.to_string()));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("platform idle memory after 60 s: {total:.0} MiB in {} containers", rows.len());
    for (mib, name) in rows {
        println!("  {name:32} {mib:8.1} MiB");
    }
    Ok(())
}

/// `123.4MiB` and the like, as `docker stats` prints them, in MiB.
fn parse_mem(s: &str) -> f64 {
    let num: String = s.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let v: f64 = num.parse().unwrap_or(0.0);
    match s.trim_start_matches(num.as_str()) {
        "GiB" => v * 1024.0,
        "KiB" | "kB" => v / 1024.0,
        "B" => v / 1024.0 / 1024.0,
        _ => v,
    }
}

/// Copies the platform bundle as `mlopsctl` embeds it (the exporter's sources stay out).
fn copy(from: &Path, to: &Path, rel: &str) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let r = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if r.starts_with("exporter/") && r != "exporter/Dockerfile" {
            continue;
        }
        if e.path().is_dir() {
            copy(&e.path(), &to.join(&name), &r)?;
        } else {
            std::fs::copy(e.path(), to.join(&name))?;
        }
    }
    Ok(())
}
