//! `mlops-bench`: how fast the controller brings up and re-checks agents.
//!
//! Runs the release `mlopsctl` against test hosts (sshd in network
//! namespaces, as the end-to-end tests use) and prints figures; it asserts
//! nothing about time. Build first:
//!
//! ```text
//! cargo build --release -p mlopsctl && cargo agent-static
//! sudo target/release/mlops-bench        # or: cargo run --release -p mlops-bench --bin mlops-bench
//! ```
//!
//! Measured (targets from the issue in brackets):
//! - fresh host to agent answering over mTLS [1.5 s]
//! - no-op re-deploy of 1 host [150 ms] and of 20 hosts in parallel [1 s]
//! - agent binary size and whether it is static [8 MB]
//! - agent idle RSS [10 MB]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mlops_bench::report;
use mlops_e2e::{TestEnv, TestHost, rss_bytes};

struct Args {
    mlopsctl: PathBuf,
    agent: PathBuf,
    hosts: usize,
    runs: usize,
}

fn parse_args() -> Result<Args> {
    let (mlopsctl, agent) = mlops_bench::release_binaries();
    let mut args = Args { mlopsctl, agent, hosts: 20, runs: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--mlopsctl" => args.mlopsctl = value()?.into(),
            "--agent" => args.agent = value()?.into(),
            "--hosts" => args.hosts = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "-h" | "--help" => {
                println!("usage: mlops-bench [--mlopsctl PATH] [--agent PATH] [--hosts N (20)] [--runs N (10)]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    for p in [&args.mlopsctl, &args.agent] {
        if !p.exists() {
            bail!("{} does not exist\n  hint: cargo build --release -p mlopsctl && cargo agent-static", p.display());
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    println!("mlopsctl: {}\nagent:    {}", args.mlopsctl.display(), args.agent.display());

    let bytes = std::fs::read(&args.agent)?;
    let size_mb = bytes.len() as f64 / 1e6;
    println!(
        "agent binary: {:.2} MB ({} bytes), {}",
        size_mb,
        bytes.len(),
        if mlops_controller::agent_binary::is_static(&bytes) { "static" } else { "dynamically linked" }
    );

    let env = TestEnv::with_binaries(&args.mlopsctl, &args.agent)?;
    let key = env.key.display().to_string();
    let deploy = |hosts: &[String]| -> Result<Duration> {
        let mut argv: Vec<&str> = vec!["deploy", "--no-stack", "--identity", &key, "--forks", "50"];
        for h in hosts {
            argv.extend(["--host", h.as_str()]);
        }
        let start = Instant::now();
        let run = env.ctl(&argv);
        let took = start.elapsed();
        if run.code != 0 {
            bail!("deploy failed ({}):\n{}", run.code, run.stderr);
        }
        Ok(took)
    };

    // Fresh hosts: nothing installed, agent answering at the end.
    // Hosts stay up until the end: a freed slot would give the next host the
    // same address with another host key, which known_hosts rightly refuses.
    let mut fresh = Vec::new();
    let mut keep = Vec::new();
    for i in 0..3 {
        let host = env.host(&format!("fresh{i}"))?;
        fresh.push(deploy(&[host.spec("root")])?);
        keep.push(host);
    }
    report("fresh host -> agent answering over mTLS", &fresh, "1.5 s");

    // No-op re-deploy of one host.
    let one = env.host("noop")?;
    deploy(&[one.spec("root")])?;
    let noop: Vec<Duration> = (0..args.runs).map(|_| deploy(&[one.spec("root")])).collect::<Result<_>>()?;
    report("no-op re-deploy, 1 host", &noop, "150 ms");

    // N hosts in parallel.
    let hosts: Vec<TestHost> = (0..args.hosts).map(|i| env.host(&format!("p{i}"))).collect::<Result<_>>()?;
    let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
    let first = deploy(&specs)?;
    report(&format!("fresh deploy, {} hosts in parallel", args.hosts), &[first], "-");
    let runs: Vec<Duration> = (0..args.runs.min(5)).map(|_| deploy(&specs)).collect::<Result<_>>()?;
    report(&format!("no-op re-deploy, {} hosts in parallel", args.hosts), &runs, "1 s");

    // Idle memory of an agent that has served a deploy.
    std::thread::sleep(Duration::from_secs(3));
    let rss: Vec<u64> = hosts.iter().filter_map(|h| h.agent_pid().and_then(rss_bytes)).collect();
    if rss.is_empty() {
        bail!("no agent process found");
    }
    let max = *rss.iter().max().expect("non-empty");
    let avg = rss.iter().sum::<u64>() / rss.len() as u64;
    println!(
        "agent idle RSS: avg {:.1} MB, max {:.1} MB over {} agents (target 10 MB)",
        avg as f64 / 1e6,
        max as f64 / 1e6,
        rss.len()
    );
    Ok(())
}
