//! `mlops-bench-rollout`: a stack deployed to many hosts, each with its own
//! sshd and Docker engine (test hosts, never this machine's engine): the
//! no-op deploy of 20 and of 50 hosts (nothing changed: every agent asked,
//! files and images compared, every service kept), and one changed service
//! rolled over 6 hosts in batches of 2, with the deploy's own phase times.
//! Prints figures; asserts nothing about time.
//!
//! Every host shares this machine's CPUs: the no-op stack checks health
//! every 10 s (a check every second on 50 containers keeps a 2-core
//! machine ~40 % busy at rest, which is no controller's cost); the machine's
//! CPU at rest and during the no-op, and the CPU time per command, are
//! printed to show where the time goes.
//!
//! Build first: `cargo build --release -p mlopsctl -p mlops-agent -p mlops-bench`.
//! Runs as root (network namespaces). `--hosts 20,50` and `--runs 5` change
//! the sizes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mlops_bench::report;
use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

/// One service with a health check every `interval` seconds; VERSION
/// changes between rollouts.
fn compose(version: u32, interval: u32) -> String {
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
      interval: {interval}s
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
    let stack = TestStack::new(&compose(1, 10))?;
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
        let mut busy = Vec::new();
        // The machine at rest with these hosts up, for comparison.
        let idle_before = cpu_jiffies()?;
        std::thread::sleep(Duration::from_secs(2));
        println!("  machine CPU busy at rest: {:.0} %", busy_percent(idle_before, cpu_jiffies()?));
        let mut by_command = Vec::new();
        for _ in 0..runs {
            let procs = cpu_by_command();
            let before = cpu_jiffies()?;
            let (took, run) = deploy(&some, &[])?;
            let after = cpu_jiffies()?;
            by_command = diff_by_command(&procs, &cpu_by_command());
            // Share of the machine's CPUs busy during the run: near 100 %
            // means the no-op is bound by CPU (every host's sshd, agent and
            // dockerd share this machine), not by round trips.
            busy.push(busy_percent(before, after));
            noop.push(took);
            last = Some(run);
        }
        busy.sort_by(f64::total_cmp);
        println!("  machine CPU busy during the no-op: median {:.0} %", busy[busy.len() / 2]);
        let shown: Vec<String> =
            by_command.iter().take(8).map(|(c, ms)| format!("{c} {:.2} s", *ms as f64 / 1000.0)).collect();
        println!("  CPU time during the last no-op, by command: {}", shown.join(", "));
        report(&format!("no-op deploy of a stack, {n} hosts"), &noop, if n <= 20 { "0.5 s" } else { "1 s" });
        if let Some(run) = last {
            print_phases(&run);
            print_hosts(&run);
        }
    }

    // A changed service rolled over 6 hosts, 2 at a time.
    let six: Vec<&TestHost> = hosts.iter().take(6).collect();
    stack.write_compose(&compose(2, 1))?;
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

/// The share of the machine's CPU time busy between two [`cpu_jiffies`].
fn busy_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.0 - before.0) as f64 / ((after.1 - before.1) as f64).max(1.0) * 100.0
}

/// (busy, total) jiffies of every CPU, from /proc/stat.
fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    // idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Per host: how long connecting (SSH) took and the whole host, as the
/// deploy's JSON reports them (median and slowest).
fn print_hosts(run: &CtlRun) {
    let json = run.json();
    let mut connect = Vec::new();
    let mut total = Vec::new();
    for h in json["hosts"].as_array().into_iter().flatten() {
        connect.push(h["result"]["connect_ms"].as_u64().unwrap_or(0));
        total.push(h["result"]["total_ms"].as_u64().unwrap_or(0));
    }
    connect.sort_unstable();
    total.sort_unstable();
    if let (Some(c), Some(t)) = (connect.get(connect.len() / 2), total.get(total.len() / 2)) {
        let (cm, tm) = (connect.last().unwrap_or(c), total.last().unwrap_or(t));
        println!("  per host: SSH connect median {c} ms (slowest {cm}), whole host median {t} ms (slowest {tm})");
    }
}

/// CPU milliseconds (user + system) per live process: pid → (command, ms).
fn cpu_by_command() -> std::collections::HashMap<u32, (String, u64)> {
    let tick = 1000 / 100; // USER_HZ is 100 on Linux
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // comm is in parentheses and may hold spaces: split after the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // Fields 14-17 (utime, stime, and cutime, cstime of reaped
        // children: sshd's per-connection processes, this bench's
        // mlopsctl), counted from the state field (3).
        let ms = (11..15).filter_map(|i| rest.get(i)?.parse::<u64>().ok()).sum::<u64>() * tick;
        out.insert(pid, (comm, ms));
    }
    out
}

/// CPU used between two samples, summed per command, most first. A
/// process that started and ended between them counts under its parent
/// (mlopsctl under this bench, `mlops-bench-rol`).
fn diff_by_command(
    before: &std::collections::HashMap<u32, (String, u64)>,
    after: &std::collections::HashMap<u32, (String, u64)>,
) -> Vec<(String, u64)> {
    let mut sums: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (pid, (comm, ms)) in after {
        let was = before.get(pid).filter(|(c, _)| c == comm).map_or(0, |(_, m)| *m);
        *sums.entry(comm.clone()).or_default() += ms.saturating_sub(was);
    }
    // Kernel workers rename themselves as they go: their times cannot be told apart.
    let mut v: Vec<(String, u64)> = sums.into_iter().filter(|(c, ms)| *ms > 0 && !c.starts_with("kworker")).collect();
    v.sort_by_key(|(_, ms)| std::cmp::Reverse(*ms));
    v
}
