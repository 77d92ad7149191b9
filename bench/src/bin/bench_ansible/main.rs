//! `mlops-bench-ansible`: the same job done by `mlopsctl`, by Ansible
//! (`bench/ansible/synchronize.yml`, and `copy.yml` at one host) and, for
//! the file sync alone, by plain `rsync` over SSH in parallel (the floor),
//! on the same test hosts in one run; then the report (`report.rs`).
//!
//! The job: a DAG tree (1,000 files, 50 MB) and a rendered configuration
//! file on every host, and a service (a container built from a small
//! context) that mounts both and is restarted when its configuration
//! changes. Each tool keeps its own copy on the hosts (its own directory,
//! container or project), so none sees another's work.
//!
//! Hosts are network namespaces with their own sshd and Docker engine (the
//! end-to-end harness). Ansible is installed from PyPI into this harness's
//! own virtualenv (`target/bench-ansible/venv`, pinned by
//! `bench/ansible/requirements.txt`). It prints figures and asserts nothing
//! about time; it does check that every tool did the work, every run.
//!
//! ```text
//! cargo build --release -p mlopsctl -p mlops-bench && cargo agent-static
//! target/release/mlops-bench-ansible --hosts 1,10,50 --runs 3 --phases
//! target/release/mlops-bench-ansible --render     # the report again, from bench/results/ansible.json
//! ```

mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mlops_e2e::{TestEnv, TestHost, output_within};
use serde_json::{Value, json};

use report::{Results, Sample, Scenario, Tool};

/// Files in the DAG tree, and the size of each (50 MB in all).
const FILES: usize = 1000;
const FILE_BYTES: usize = 50_000;
/// Where Ansible's and rsync's copies go on a host: under /var/lib, which
/// every test host has to itself (an overlay); /srv or /opt would be this
/// machine's own, shared by all hosts.
const REMOTE_ROOT: &str = "/var/lib/mlops-bench";

struct Args {
    mlopsctl: PathBuf,
    agent: PathBuf,
    hosts: Vec<usize>,
    runs: usize,
    /// Samples per scenario of `ansible.builtin.copy` (one host only).
    copy_runs: usize,
    phases: bool,
    /// Only the report, from the results file.
    render: bool,
}

fn parse_args() -> Result<Args> {
    let (mlopsctl, agent) = mlops_bench::release_binaries();
    let mut args =
        Args { mlopsctl, agent, hosts: vec![1, 10, 50], runs: 3, copy_runs: 1, phases: false, render: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n  hint: see --help"));
        match a.as_str() {
            "--mlopsctl" => args.mlopsctl = value()?.into(),
            "--agent" => args.agent = value()?.into(),
            "--hosts" => {
                args.hosts = value()?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().with_context(|| format!("--hosts: `{n}` is not a number")))
                    .collect::<Result<_>>()?;
                ensure!(
                    args.hosts.iter().all(|&n| (1..=200).contains(&n)),
                    "--hosts: each count must be 1 to 200\n  hint: --hosts 1,10,50"
                );
            }
            "--runs" => args.runs = value()?.parse().context("--runs needs a number")?,
            "--copy-runs" => args.copy_runs = value()?.parse().context("--copy-runs needs a number")?,
            "--phases" => args.phases = true,
            "--render" => args.render = true,
            "-h" | "--help" => {
                println!(
                    "usage: mlops-bench-ansible [--hosts N,N,.. (1,10,50)] [--runs N (3)] [--copy-runs N (1; 0: no copy.yml)] \
                     [--phases] [--mlopsctl PATH] [--agent PATH]\n       mlops-bench-ansible --render\n\n\
                     Writes {} (the figures of every host count measured, the latest run of each),\n\
                     then {} and {}/*.png from it; --render only rewrites the report and plots.",
                    report::results_path().display(),
                    report::report_path().display(),
                    report::plots_dir().display()
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n  hint: see --help"),
        }
    }
    ensure!(args.runs >= 1, "--runs must be at least 1");
    if !args.render {
        for p in [&args.mlopsctl, &args.agent] {
            if !p.exists() {
                bail!(
                    "{} does not exist\n  hint: cargo build --release -p mlopsctl -p mlops-bench && cargo agent-static",
                    p.display()
                );
            }
        }
    }
    Ok(args)
}

/// Ansible in a virtualenv of its own, installed (or reused when it
/// already holds exactly the pinned set).
struct Ansible {
    venv: PathBuf,
    config: PathBuf,
    playbooks: PathBuf,
}

impl Ansible {
    fn install() -> Result<Ansible> {
        let dir = mlops_bench::workspace().join("bench/ansible");
        let requirements = dir.join("requirements.txt");
        let venv = mlops_bench::target_dir().join("bench-ansible/venv");
        let mut want: Vec<String> = std::fs::read_to_string(&requirements)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.to_lowercase())
            .collect();
        want.sort();
        if Self::frozen(&venv).as_ref() != Some(&want) {
            println!("installing Ansible into {} (pinned: {})", venv.display(), requirements.display());
            let _ = std::fs::remove_dir_all(&venv);
            let python =
                ["/usr/bin/python3", "python3"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("python3");
            run(Command::new(python).args(["-m", "venv"]).arg(&venv))
                .context("python3 -m venv failed\n  hint: apt-get install python3-venv")?;
            run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--no-deps", "-r"]).arg(&requirements))
                .context("pip install of bench/ansible/requirements.txt failed (PyPI must be reachable)")?;
        }
        Ok(Ansible { venv, config: dir.join("ansible.cfg"), playbooks: dir })
    }

    fn frozen(venv: &Path) -> Option<Vec<String>> {
        let out = Command::new(venv.join("bin/pip")).args(["freeze", "--local"]).output().ok()?;
        let mut have: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_lowercase).collect();
        have.sort();
        Some(have)
    }

    /// The versions the report names: ansible-core, the `ansible` package,
    /// and the two collections the playbooks use.
    fn versions(&self) -> Result<BTreeMap<String, String>> {
        let mut v = BTreeMap::new();
        let core = run(Command::new(self.venv.join("bin/ansible-playbook")).arg("--version"))?;
        v.insert("ansible-core".into(), core.lines().next().unwrap_or_default().to_string());
        for line in Self::frozen(&self.venv).unwrap_or_default() {
            if let Some(version) = line.strip_prefix("ansible==") {
                v.insert("ansible (PyPI package)".into(), version.to_string());
            }
        }
        for collection in ["ansible.posix", "community.docker"] {
            let out = run(Command::new(self.venv.join("bin/ansible-galaxy"))
                .args(["collection", "list", collection, "--format", "json"])
                .env("ANSIBLE_CONFIG", &self.config))?;
            let listed: Value = serde_json::from_str(&out).context("ansible-galaxy collection list --format json")?;
            let version = listed
                .as_object()
                .into_iter()
                .flat_map(|paths| paths.values())
                .find_map(|c| c[collection]["version"].as_str())
                .unwrap_or("?");
            v.insert(collection.to_string(), version.to_string());
        }
        Ok(v)
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A file's bytes: incompressible, from its index and a generation.
fn content(index: usize, generation: u64) -> Vec<u8> {
    let mut x = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = Vec::with_capacity(FILE_BYTES);
    while out.len() < FILE_BYTES {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(FILE_BYTES);
    out
}

fn dag_path(index: usize) -> String {
    format!("dags/d{:02}/dag_{index:04}.py", index % 20)
}

fn write_dag(stack: &Path, index: usize, generation: u64) -> Result<()> {
    let path = stack.join(dag_path(index));
    std::fs::create_dir_all(path.parent().expect("in a directory"))?;
    std::fs::write(path, content(index, generation))?;
    Ok(())
}

/// The configuration, rendered as `templates/app.conf.j2` renders it.
fn render_config(vars: &Value) -> String {
    format!(
        "[service]\nname = {}\nworkers = {}\nlog_level = {}\n",
        vars["bench_service"].as_str().unwrap_or_default(),
        vars["bench_workers"],
        vars["bench_log_level"].as_str().unwrap_or_default()
    )
}

/// One size of the comparison: N hosts and what the tools need.
struct Bench<'a> {
    env: &'a TestEnv,
    ansible: &'a Ansible,
    hosts: Vec<TestHost>,
    stack: tempfile::TempDir,
    work: tempfile::TempDir,
    vars: Value,
    generation: u64,
}

/// What one run of a tool reported beyond its time (mlopsctl only).
#[derive(Default)]
struct Profile {
    /// The deploy's phases, in order, in seconds.
    phases: Vec<(String, f64)>,
    /// Per step of a host (`timings` of each host's outcome): the slowest
    /// host's time, in seconds.
    steps: Vec<(String, f64)>,
}

impl Bench<'_> {
    fn n(&self) -> usize {
        self.hosts.len()
    }

    fn write_inventory(&self) -> Result<PathBuf> {
        let mut hosts = serde_json::Map::new();
        for h in &self.hosts {
            hosts.insert(
                h.name.clone(),
                json!({"ansible_host": h.addr, "ansible_port": h.port, "ansible_user": "root"}),
            );
        }
        let inventory = json!({"all": {
            "children": {"bench": {"hosts": hosts}},
            "vars": {
                "ansible_ssh_private_key_file": self.env.key,
                // community.docker needs `requests` on the target: the
                // virtualenv's Python has it (Debian's python3 beneath).
                "ansible_python_interpreter": self.ansible.venv.join("bin/python"),
                // OpenSSH reads ~/.ssh from the password database, not
                // $HOME: the environment's known hosts, named.
                "ansible_ssh_common_args": format!("-o UserKnownHostsFile={}", self.env.known_hosts.display()),
            }
        }});
        // JSON is YAML: one file for Ansible and mlopsctl alike.
        let path = self.work.path().join("inventory.yml");
        std::fs::write(&path, serde_json::to_string_pretty(&inventory)?)?;
        Ok(path)
    }

    fn render(&self) -> Result<()> {
        let conf = self.stack.path().join("conf");
        std::fs::create_dir_all(&conf)?;
        std::fs::write(conf.join("app.conf"), render_config(&self.vars))?;
        Ok(())
    }

    /// Runs `tool` once; its time, and mlopsctl's profile.
    fn run(&self, tool: Tool, inventory: &Path) -> Result<(Duration, Profile)> {
        let n = self.n().to_string();
        let started = Instant::now();
        let profile = match tool {
            Tool::Mlopsctl => {
                let key = self.env.key.display().to_string();
                let (inv, dir) = (inventory.display().to_string(), self.stack.path().display().to_string());
                let args = [
                    "deploy",
                    "-i",
                    &inv,
                    "--identity",
                    &key,
                    "--stack",
                    &dir,
                    "--forks",
                    &n,
                    "--health-timeout",
                    "120",
                    "--output",
                    "json",
                ];
                let run = self.env.ctl(&args);
                ensure!(run.code == 0, "mlopsctl deploy failed ({}):\n{}", run.code, run.stderr);
                profile_of(&run.json())
            }
            Tool::AnsibleSynchronize | Tool::AnsibleCopy => {
                let service = tool.container().expect("Ansible runs a service");
                let playbook = match tool {
                    Tool::AnsibleCopy => "copy.yml",
                    _ => "synchronize.yml",
                };
                let mut vars = self.vars.clone();
                vars["bench_src"] = json!(self.stack.path());
                vars["bench_root"] = json!(format!("{REMOTE_ROOT}/{service}"));
                vars["bench_service"] = json!(service);
                let vars_file = self.work.path().join("vars.json");
                std::fs::write(&vars_file, vars.to_string())?;
                let path = format!(
                    "{}:{}",
                    self.ansible.venv.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                );
                let mut cmd = Command::new(self.ansible.venv.join("bin/ansible-playbook"));
                cmd.arg("-i")
                    .arg(inventory)
                    .arg(self.ansible.playbooks.join(playbook))
                    .args(["--forks", &n, "-e"])
                    .arg(format!("@{}", vars_file.display()))
                    .env_clear()
                    .env("PATH", path)
                    .env("HOME", &self.env.home)
                    .env("ANSIBLE_CONFIG", &self.ansible.config)
                    .env("ANSIBLE_LOCAL_TEMP", self.work.path().join("ansible-tmp"))
                    .env("LANG", "C.UTF-8")
                    .stdin(Stdio::null());
                let out = output_within(&mut cmd, Duration::from_secs(3600));
                ensure!(
                    out.status.success(),
                    "ansible-playbook {playbook} failed ({}):\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                Profile::default()
            }
            Tool::Rsync => {
                // Plain rsync: each run connects afresh (as mlopsctl does;
                // no ControlPersist master kept between runs).
                let ssh = format!(
                    "ssh -i {} -o BatchMode=yes -o UserKnownHostsFile={}",
                    self.env.key.display(),
                    self.env.known_hosts.display(),
                );
                let children: Vec<_> = self
                    .hosts
                    .iter()
                    .map(|h| {
                        Command::new("rsync")
                            .args(["-a", "--delete", "--mkpath", "-e"])
                            .arg(format!("{ssh} -p {}", h.port))
                            .arg(format!("{}/dags/", self.stack.path().display()))
                            .arg(format!("root@{}:{REMOTE_ROOT}/rsync/dags/", h.addr))
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::piped())
                            .spawn()
                    })
                    .collect::<Result<_, _>>()?;
                for child in children {
                    let out = child.wait_with_output()?;
                    ensure!(out.status.success(), "rsync failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                Profile::default()
            }
        };
        Ok((started.elapsed(), profile))
    }

    /// Every host holds what `tool` was to put there: file 0 of the DAG
    /// tree as it is here, and (where it runs a service) the configuration,
    /// both as its container sees them.
    fn check(&self, tool: Tool) -> Result<()> {
        let local = run(Command::new("md5sum").arg(self.stack.path().join(dag_path(0))))?;
        let want = local.split_whitespace().next().unwrap_or_default().to_string();
        // Ansible's template names its own service; the rest is the same.
        let strip = |s: &str| s.lines().filter(|l| !l.starts_with("name =")).collect::<Vec<_>>().join("\n");
        let conf = strip(&render_config(&self.vars));
        for h in &self.hosts {
            let sum = match tool.container() {
                Some(c) => {
                    let served = h.docker_result(&["exec", c, "cat", "/etc/app/app.conf"])?;
                    ensure!(
                        strip(&served) == conf,
                        "{}: {} runs with another configuration:\n{served}",
                        h.name,
                        tool.name()
                    );
                    h.docker_result(&["exec", c, "md5sum", &format!("/{}", dag_path(0))])?
                }
                // As the host sees its /var/lib (an overlay of its own).
                None => {
                    String::from_utf8_lossy(&h.exec(&format!("md5sum {REMOTE_ROOT}/rsync/{}", dag_path(0)))?.stdout)
                        .into_owned()
                }
            };
            ensure!(
                sum.split_whitespace().next() == Some(want.as_str()),
                "{}: {} left another {} than this machine's",
                h.name,
                tool.name(),
                dag_path(0)
            );
        }
        Ok(())
    }

    /// When `tool`'s container on each host last started.
    fn started_at(&self, tool: Tool) -> Result<Vec<String>> {
        let c = tool.container().expect("a tool that runs a service");
        self.hosts.iter().map(|h| h.docker_result(&["inspect", "-f", "{{.State.StartedAt}}", c])).collect()
    }
}

/// The deploy's phases, and each host step's slowest host, from
/// `mlopsctl deploy --output json`.
fn profile_of(json: &Value) -> Profile {
    let secs = |ms: &Value| ms.as_f64().unwrap_or(0.0) / 1000.0;
    let phases = json["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["name"].as_str().unwrap_or("?").to_string(), secs(&p["ms"])))
        .collect();
    let mut steps: Vec<(String, f64)> = Vec::new();
    for h in json["hosts"].as_array().into_iter().flatten() {
        for (step, ms) in h["result"]["timings"].as_object().into_iter().flatten() {
            let step = step.trim_end_matches("_ms").to_string();
            match steps.iter_mut().find(|(s, _)| *s == step) {
                Some((_, slowest)) => *slowest = slowest.max(secs(ms)),
                None => steps.push((step, secs(ms))),
            }
        }
    }
    Profile { phases, steps }
}

/// Stops the SSH masters Ansible's ControlPersist left for these hosts
/// (they would outlive the hosts by two minutes).
fn stop_ssh_masters(env: &TestEnv) {
    let dir = env.home.join(".ansible/cp");
    let _ = Command::new("pkill").arg("-f").arg(dir.display().to_string()).status();
    let _ = std::fs::remove_dir_all(dir);
}

fn bench_size(env: &TestEnv, ansible: &Ansible, n: usize, args: &Args, out: &mut Vec<Sample>) -> Result<()> {
    println!("\n== {n} host(s)");
    let t = Instant::now();
    let hosts: Vec<TestHost> = (0..n).map(|i| env.docker_host(&format!("b{n}x{i}"))).collect::<Result<_>>()?;
    println!("hosts up in {:.1} s", t.elapsed().as_secs_f64());
    let stack = tempfile::Builder::new().prefix("mlops-bench-stack-").tempdir()?;
    let img = stack.path().join("img");
    std::fs::create_dir_all(&img)?;
    std::fs::copy("/bin/busybox", img.join("busybox"))
        .context("/bin/busybox is needed\n  hint: apt-get install busybox-static")?;
    std::fs::write(
        img.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )?;
    std::fs::write(
        stack.path().join("compose.yaml"),
        "name: mlops-bench\nservices:\n  svc:\n    build: ./img\n    image: mlops-bench-svc:1\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; sleep 86400 & wait\"]\n    volumes: [\"./dags:/dags:ro\", \"./conf/app.conf:/etc/app/app.conf:ro\"]\n",
    )?;
    let mut bench = Bench {
        env,
        ansible,
        hosts,
        stack,
        work: tempfile::Builder::new().prefix("mlops-bench-work-").tempdir()?,
        vars: json!({"bench_service": "svc", "bench_workers": 1, "bench_log_level": "info"}),
        generation: 1,
    };
    for i in 0..FILES {
        write_dag(bench.stack.path(), i, bench.generation)?;
    }
    bench.render()?;
    let inventory = bench.write_inventory()?;
    let docker = bench.hosts[0].docker_result(&["version", "--format", "{{.Server.Version}}"])?;
    let phases = args.phases;
    let copy_runs = if n == 1 { args.copy_runs } else { 0 };
    let sample = |bench: &Bench<'_>, scenario: Scenario, run: usize, out: &mut Vec<Sample>| -> Result<()> {
        // ansible.builtin.copy makes one module call per file: about 15
        // minutes for 1,000 files to one host here, so it runs at one
        // host only, `--copy-runs` times per scenario.
        let tools = [Tool::Mlopsctl, Tool::AnsibleSynchronize, Tool::AnsibleCopy, Tool::Rsync]
            .into_iter()
            .filter(|&t| t != Tool::AnsibleCopy || run < copy_runs)
            // rsync restarts nothing.
            .filter(|&t| t != Tool::Rsync || scenario != Scenario::Config);
        for tool in tools {
            let before = if scenario == Scenario::Config { Some(bench.started_at(tool)?) } else { None };
            let (took, profile) = bench.run(tool, &inventory)?;
            bench.check(tool).with_context(|| format!("after {} ({})", tool.name(), scenario.title()))?;
            if let Some(before) = before {
                let after = bench.started_at(tool)?;
                ensure!(
                    before.iter().zip(&after).all(|(b, a)| b != a),
                    "{} did not restart the service on every host after a configuration change",
                    tool.name()
                );
            }
            println!("  {:<46} {:<20} {:>8.2} s", scenario.title(), tool.name(), took.as_secs_f64());
            if phases && tool == Tool::Mlopsctl {
                let line = |v: &[(String, f64)]| {
                    v.iter().map(|(name, s)| format!("{name} {s:.2}")).collect::<Vec<_>>().join(", ")
                };
                println!("      phases (s): {}", line(&profile.phases));
                println!("      slowest host per step (s): {}", line(&profile.steps));
            }
            out.push(Sample {
                hosts: n,
                scenario,
                tool,
                secs: took.as_secs_f64(),
                phases: profile.phases,
                steps: profile.steps,
                docker: docker.clone(),
            });
        }
        Ok(())
    };
    // First run: each tool's first contact with the hosts (Docker is there;
    // nothing of the tool's own is).
    sample(&bench, Scenario::First, 0, out)?;
    let runs = args.runs.max(copy_runs);
    for run in 0..runs {
        bench.generation += 1;
        for i in 0..FILES {
            write_dag(bench.stack.path(), i, bench.generation)?;
        }
        sample(&bench, Scenario::Full, run, out)?;
    }
    for run in 0..runs {
        write_dag(bench.stack.path(), 0, 1_000_000 + run as u64)?;
        sample(&bench, Scenario::One, run, out)?;
    }
    for run in 0..runs {
        sample(&bench, Scenario::Noop, run, out)?;
    }
    for run in 0..runs {
        bench.vars["bench_workers"] = json!(2 + run);
        bench.render()?;
        sample(&bench, Scenario::Config, run, out)?;
    }
    stop_ssh_masters(env);
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.render {
        let results = Results::load()?;
        return report::write(&results);
    }
    let ansible = Ansible::install()?;
    let env = TestEnv::with_binaries(&args.mlopsctl, &args.agent)?;
    let mut results = Results::load_or_new();
    let meta = report::Meta::gather(&args.mlopsctl, &ansible.versions()?, &ansible.config, args.runs)?;
    println!("mlopsctl: {}\nagent:    {}", args.mlopsctl.display(), args.agent.display());
    for (k, v) in &meta.versions {
        println!("{k}: {v}");
    }
    println!("Ansible settings ({}):\n{}", ansible.config.display(), meta.settings);
    for &n in &args.hosts {
        let mut samples = Vec::new();
        let outcome = bench_size(&env, &ansible, n, &args, &mut samples);
        stop_ssh_masters(&env);
        outcome?;
        // The latest run of each host count replaces the one before.
        results.replace(n, meta.clone(), samples);
        results.save()?;
        report::write(&results)?;
    }
    println!("\n{}", report::table(&results));
    Ok(())
}
