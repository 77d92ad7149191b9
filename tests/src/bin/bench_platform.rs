//! `mlops-bench-platform`: the platform on this machine, timed. Prints
//! figures; asserts nothing about time.
//!
//! ```text
//! cargo build --release -p mlopsctl -p mlops-agent -p mlops-e2e && cargo exporter-static
//! target/release/mlops-bench-platform [--cold]
//! ```
//!
//! - deploy to all-healthy, with cold image builds (`--cold` removes the
//!   platform's images and the Debian base first) [5 min] or warm caches
//!   (after `down`) [60 s];
//! - a changed DAG landing on the host (`mlopsctl sync`) [0.5 s];
//! - the platform's idle memory, per container (from the engine's stats).
//!
//! Uses the release `mlopsctl` on this machine (no SSH) and a state
//! directory of its own. Leaves the platform running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let cold = std::env::args().any(|a| a == "--cold");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let ctl = target.join("release/mlopsctl");
    if !ctl.exists() {
        bail!(
            "{} does not exist\n  hint: cargo build --release -p mlopsctl -p mlops-agent && cargo exporter-static",
            ctl.display()
        );
    }
    let state = std::env::temp_dir().join("mlops-bench-platform-state");
    let run = |args: &[&str]| -> Result<Duration> {
        let start = Instant::now();
        let out = Command::new(&ctl).args(args).env("MLOPS_STATE_DIR", &state).output().context("mlopsctl")?;
        if !out.status.success() {
            bail!("mlopsctl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(start.elapsed())
    };
    let docker = |args: &[&str]| {
        Command::new("docker").args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };

    let _ = run(&["down", "--project", "mlops"]);
    if cold {
        for image in [
            "mlops-python:latest",
            "mlops-postgres:latest",
            "mlops-redis:latest",
            "mlops-prometheus:latest",
            "mlops-airflow-exporter:latest",
            "debian:bookworm-slim",
        ] {
            let _ = docker(&["rmi", "-f", image]);
        }
        let _ = docker(&["builder", "prune", "-af"]);
        let _ = docker(&["image", "prune", "-f"]);
    }
    let first = run(&["deploy", "--skip", "grafana", "--health-timeout", "900"])?;
    println!(
        "deploy to all-healthy, {} image builds: {:.1} s (target {})",
        if cold { "cold" } else { "cached" },
        first.as_secs_f64(),
        if cold { "5 min" } else { "60 s" }
    );
    run(&["down", "--project", "mlops"])?;
    let warm = run(&["deploy", "--skip", "grafana", "--health-timeout", "900"])?;
    println!("deploy to all-healthy after down, warm caches: {:.1} s (target 60 s)", warm.as_secs_f64());
    let noop = run(&["deploy", "--skip", "grafana"])?;
    println!("no-op re-deploy of the platform: {:.2} s", noop.as_secs_f64());

    // A changed DAG: a copy of the bundle as the stack, one DAG edited per round.
    let bundle = tempfile::tempdir()?;
    copy(&workspace.join("platform"), bundle.path(), "")?;
    let dir = bundle.path().display().to_string();
    run(&["sync", "--stack", &dir, "--skip", "grafana"])?;
    let mut times = Vec::new();
    for round in 0..5 {
        let dag = bundle.path().join("airflow/dags/example_etl.py");
        let mut text = std::fs::read_to_string(&dag)?;
        text.push_str(&format!("\n# edit {round}\n"));
        std::fs::write(&dag, text)?;
        times.push(run(&["sync", "--stack", &dir, "--skip", "grafana"])?.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "a changed DAG landing on the host (mlopsctl sync, whole command): median {:.0} ms, max {:.0} ms (target 500 ms)",
        times[2], times[4]
    );

    std::thread::sleep(Duration::from_secs(60));
    let stats = docker(&["stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}"])?;
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
