//! `mlops-bench-rollout`: a stack deployed to many hosts, each with its own
//! sshd and Docker engine (test hosts, never this machine's engine): the
//! no-op deploy of 20 and of 50 hosts (nothing changed: every agent asked,
//! files and images compared, every service kept), and one changed service
//! rolled over 6 hosts in batches of 2, with the deploy's own phase times.
//! Prints figures; asserts nothing about time.
//!
//! Build first: `cargo build --release -p mlopsctl -p mlops-agent -p mlops-bench`.
//! Runs as root (network namespaces). `--hosts 20,50` and `--runs 5` change
//! the sizes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mlops_bench::report;
use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

/// One service with a health check; VERSION changes between rollouts.
fn compose(version: u32) -> String {
    format!(
        r#"
name: "{{project}}"
services:
  app:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    environment: {{VERSION: "{version}"}}
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
"#
    )
}

fn main() -> Result<()> {
    let target = mlops_bench::target_dir();
    let mlopsctl = target.join("release/mlopsctl");
    let agent = target.join("release/mlops-agent");
    for p in [&mlopsctl, &agent] {
        if !p.exists() {
            bail!("{} does not exist\n  hint: cargo build --release -p mlopsctl -p mlops-agent", p.display());
        }
    }
    let mut sizes = vec![20usize, 50];
    let mut runs = 5usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--hosts" => sizes = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--runs" => runs = value()?.parse()?,
            other => bail!("unknown argument {other}\n  usage: mlops-bench-rollout [--hosts 20,50] [--runs 5]"),
        }
    }
    let env = TestEnv::with_binaries(&mlopsctl, &agent)?;
    let most = sizes.iter().copied().max().unwrap_or(0).max(6);
    let started = Instant::now();
    let hosts: Vec<TestHost> = (0..most).map(|i| env.docker_host(&format!("br{i}"))).collect::<Result<_>>()?;
    println!("{most} test hosts with their own Docker engine up in {:.1} s", started.elapsed().as_secs_f64());
    let stack = TestStack::new(&compose(1))?;
    let deploy = |hosts: &[&TestHost], extra: &[&str]| -> Result<(Duration, CtlRun)> {
        let key = env.key.display().to_string();
        let dir = stack.path().display().to_string();
        let forks = hosts.len().to_string();
        let mut args = vec!["deploy", "--identity", &key, "--stack", &dir, "--forks", &forks, "--output", "json"];
        let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
        for s in &specs {
            args.extend(["--host", s.as_str()]);
        }
        args.extend(extra);
        let start = Instant::now();
        let run = env.ctl(&args);
        let took = start.elapsed();
        if run.code != 0 {
            bail!("deploy failed ({}):\n{}", run.code, run.stderr);
        }
        Ok((took, run))
    };

    for &n in &sizes {
        let some: Vec<&TestHost> = hosts.iter().take(n).collect();
        let (first, _) = deploy(&some, &[])?;
        println!(
            "first deploy of {n} hosts (agents installed, Docker, files, image built once and shipped): {:.1} s",
            first.as_secs_f64()
        );
        let mut last = None;
        let mut noop = Vec::new();
        for _ in 0..runs {
            let (took, run) = deploy(&some, &[])?;
            noop.push(took);
            last = Some(run);
        }
        report(&format!("no-op deploy of a stack, {n} hosts"), &noop, if n <= 20 { "0.5 s" } else { "1 s" });
        if let Some(run) = last {
            print_phases(&run);
        }
    }

    // A changed service rolled over 6 hosts, 2 at a time.
    let six: Vec<&TestHost> = hosts.iter().take(6).collect();
    stack.write_compose(&compose(2))?;
    let (took, run) = deploy(&six, &["--serial", "2", "--min-healthy-time", "0"])?;
    println!("changed service over 6 hosts in batches of 2: {:.2} s", took.as_secs_f64());
    print_phases(&run);
    Ok(())
}

/// The phases the deploy reported (`phases` in its JSON).
fn print_phases(run: &CtlRun) {
    let json = run.json();
    for phase in json["phases"].as_array().into_iter().flatten() {
        let secs = phase["ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
        println!("  {:<28} {secs:>8.2} s", phase["name"].as_str().unwrap_or("?"));
    }
}
