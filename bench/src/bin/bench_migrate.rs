//! `mlops-bench-migrate`: `mlopsctl migrate` of a PostgreSQL stack holding
//! about 1 GB (`MLOPS_BENCH_MIGRATE_MB`) between two test hosts with their
//! own sshd and Docker engine (never this machine's), against the time to
//! stream as many bytes over the same link (`ssh a cat | ssh b cat`, through
//! this machine, as the migration's stream goes). Prints figures; asserts
//! nothing about time.
//!
//! The downtime (from the quiesce to B healthy, as `migrate` reports it)
//! has a target of at most 2x the stream's time.
//!
//! ```text
//! cargo build --release -p mlopsctl -p mlops-agent -p mlops-bench
//! target/release/mlops-bench-migrate
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mlops_e2e::{TestEnv, TestHost, TestStack};

const STACK: &str = r#"
name: "{project}"
x-mlops:
  bootstrap_base_images: true
  secrets: [POSTGRES_PASSWORD, POSTGRES_SUPERUSER_PASSWORD]
  migrate:
    database:
      service: postgres
      volume: data
      user: postgres
      database: bench
      # As light as the platform's own checks (alembic_version, a checksum
      # over DAG runs): the row counts of every table are checked anyway.
      verify:
        newest row: SELECT max(id) FROM public.t
services:
  postgres:
    build: {context: ./postgres, args: {BASE_IMAGE: "debian:bookworm-slim"}}
    image: "{project}-postgres:latest"
    read_only: true
    tmpfs: ["/tmp:mode=1777"]
    shm_size: 128m
    environment:
      POSTGRES_USER: bench
      POSTGRES_DB: bench
      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD}
      POSTGRES_SUPERUSER_PASSWORD: ${POSTGRES_SUPERUSER_PASSWORD}
    volumes: ["data:/var/lib/postgresql/data"]
    healthcheck:
      test: ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", "bench", "-d", "bench"]
      interval: 1s
      retries: 120
volumes:
  data: {}
"#;

fn main() -> Result<()> {
    let target = mlops_bench::target_dir();
    let (ctl, agent) = (target.join("release/mlopsctl"), target.join("release/mlops-agent"));
    for p in [&ctl, &agent] {
        if !p.exists() {
            bail!("{} does not exist\n  hint: cargo build --release -p mlopsctl -p mlops-agent", p.display());
        }
    }
    let mb: u64 = std::env::var("MLOPS_BENCH_MIGRATE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let env = TestEnv::with_binaries(&ctl, &agent)?;
    let (a, b) = (env.docker_host("bench-mig-a")?, env.docker_host("bench-mig-b")?);
    let stack = TestStack::new(STACK)?;
    copy_dir(&mlops_bench::workspace().join("platform/postgres"), &stack.path().join("postgres"))?;
    let (key, dir) = (env.key.display().to_string(), stack.path().display().to_string());
    let (sa, sb) = (a.spec("root"), b.spec("root"));
    let ctl = |args: &[&str]| -> Result<serde_json::Value> {
        let mut all = vec!["--identity", key.as_str(), "--host", sa.as_str(), "--host", sb.as_str()];
        all.extend_from_slice(args);
        let run = env.ctl(&all);
        if run.code != 0 {
            bail!("mlopsctl {args:?} failed ({}):\n{}", run.code, run.stderr);
        }
        Ok(if run.stdout.trim_start().starts_with('{') { run.json() } else { serde_json::Value::Null })
    };

    let started = Instant::now();
    ctl(&["deploy", "--host", &sa, "--stack", &dir, "--health-timeout", "600", "--output", "json"])
        .context("deploying to a")?;
    println!("postgres deployed on a (image built) in {:.0} s", started.elapsed().as_secs_f64());

    // About `mb` MB of rows of ~1 KB (stored inline, as a dump writes them).
    let pg = container(&a, &stack.project)?;
    let rows = mb * 1024;
    let started = Instant::now();
    a.docker_result(&[
        "exec",
        &pg,
        "psql",
        "-q",
        "-U",
        "postgres",
        "-d",
        "bench",
        "-c",
        &format!(
            "CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 31) AS payload FROM generate_series(1, {rows}) g; \
             ALTER TABLE t ADD PRIMARY KEY (id)"
        ),
    ])?;
    let size = a.docker_result(&[
        "exec",
        &pg,
        "psql",
        "-tA",
        "-U",
        "postgres",
        "-d",
        "bench",
        "-c",
        "SELECT pg_database_size('bench')",
    ])?;
    let size: u64 = size.trim().parse().unwrap_or(0);
    println!("{rows} rows written in {:.0} s; database {:.0} MB", started.elapsed().as_secs_f64(), size as f64 / 1e6);

    // PostgreSQL's own pace on this machine: the dump alone, read to nothing.
    let started = Instant::now();
    a.docker_result(&["exec", &pg, "sh", "-c", "pg_dumpall --clean --if-exists -U postgres | wc -c"])?;
    let dump_alone = started.elapsed();
    println!("pg_dumpall alone on a (to wc -c): {:.1} s", dump_alone.as_secs_f64());

    // The link: as many bytes from a to b through this machine over SSH.
    let ssh = |h: &TestHost, command: String| {
        format!(
            "ssh -T -i {} -p {} -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} root@{} '{command}'",
            env.key.display(),
            h.port,
            env.known_hosts.display(),
            h.addr
        )
    };
    let pipe = format!("{} | {}", ssh(&a, format!("head -c {size} /dev/zero")), ssh(&b, "cat > /dev/null".to_string()));
    let mut link = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        if !std::process::Command::new("sh").args(["-c", &pipe]).status()?.success() {
            bail!("`{pipe}` failed");
        }
        link.push(start.elapsed());
    }
    link.sort();
    let link = link[1];
    println!(
        "streaming {:.0} MB a -> this machine -> b over SSH: {:.1} s ({:.0} MB/s), median of 3",
        size as f64 / 1e6,
        link.as_secs_f64(),
        size as f64 / 1e6 / link.as_secs_f64()
    );

    let started = Instant::now();
    let moved =
        ctl(&["migrate", "--from", &sa, "--to", &sb, "--stack", &dir, "--health-timeout", "600", "--output", "json"])
            .context("migrating")?;
    let total = started.elapsed();
    let result = &moved["result"];
    let downtime = Duration::from_millis(result["downtime_ms"].as_u64().unwrap_or(0));
    for step in result["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:<10} {:>7.1} s  {}",
            step["step"].as_str().unwrap_or(""),
            step["ms"].as_f64().unwrap_or(0.0) / 1000.0,
            step["detail"].as_str().unwrap_or("")
        );
    }
    // The restore alone, on b: the same dump from its own tmpfs into psql.
    let pg_b = container(&b, &stack.project)?;
    b.docker_result(&["exec", &pg_b, "sh", "-c", "pg_dumpall --clean --if-exists -U postgres > /tmp/dump.sql"])?;
    let started = Instant::now();
    b.docker_result(&[
        "exec",
        &pg_b,
        "sh",
        "-c",
        "psql -X -q -U postgres -d postgres -f /tmp/dump.sql >/dev/null 2>&1; rm /tmp/dump.sql",
    ])?;
    let restore_alone = started.elapsed();
    println!("psql restore alone on b (from a file): {:.1} s", restore_alone.as_secs_f64());
    let dump = result["database"]["bytes"].as_u64().unwrap_or(0);
    println!(
        "migrate: {:.1} s in all; dump {:.0} MB in {:.1} s; downtime (quiesce to B healthy) {:.1} s = {:.2} x the stream's time (target <= 2)",
        total.as_secs_f64(),
        dump as f64 / 1e6,
        result["database"]["ms"].as_f64().unwrap_or(0.0) / 1000.0,
        downtime.as_secs_f64(),
        downtime.as_secs_f64() / link.as_secs_f64()
    );
    Ok(())
}

fn container(host: &TestHost, project: &str) -> Result<String> {
    let id = host.docker_result(&["ps", "-q", "--filter", &format!("label=mlops.project={project}")])?;
    Ok(id.lines().next().context("the postgres container")?.to_string())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}
