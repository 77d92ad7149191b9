//! The comparison's figures and how they are published: the results file
//! (`bench/results/ansible.json`, every sample of the latest run of each
//! host count), `bench/RESULTS.md` (tables, targets, the phase profile,
//! the machine, versions and settings) and one PNG plot per scenario
//! (`bench/plots/`). Everything here is computed from the results file,
//! so `--render` rewrites the report without measuring again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

pub fn results_path() -> PathBuf {
    mlops_bench::workspace().join("bench/results/ansible.json")
}

pub fn report_path() -> PathBuf {
    mlops_bench::workspace().join("bench/RESULTS.md")
}

pub fn plots_dir() -> PathBuf {
    mlops_bench::workspace().join("bench/plots")
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tool {
    Mlopsctl,
    AnsibleSynchronize,
    AnsibleCopy,
    Rsync,
}

impl Tool {
    pub const ALL: [Tool; 4] = [Tool::Mlopsctl, Tool::AnsibleSynchronize, Tool::AnsibleCopy, Tool::Rsync];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Mlopsctl => "mlopsctl",
            Tool::AnsibleSynchronize => "ansible synchronize",
            Tool::AnsibleCopy => "ansible copy",
            Tool::Rsync => "rsync (floor)",
        }
    }

    /// Its service's container on a host, or none (rsync runs none).
    pub fn container(self) -> Option<&'static str> {
        match self {
            Tool::Mlopsctl => Some("mlops-bench-svc-1"),
            Tool::AnsibleSynchronize => Some("mlops-bench-ansible-sync"),
            Tool::AnsibleCopy => Some("mlops-bench-ansible-copy"),
            Tool::Rsync => None,
        }
    }

    fn color(self) -> plotters::style::RGBColor {
        use plotters::style::RGBColor;
        match self {
            Tool::Mlopsctl => RGBColor(0x1f, 0x77, 0xb4),
            Tool::AnsibleSynchronize => RGBColor(0xd6, 0x27, 0x28),
            Tool::AnsibleCopy => RGBColor(0xff, 0x7f, 0x0e),
            Tool::Rsync => RGBColor(0x2c, 0xa0, 0x2c),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    First,
    Full,
    One,
    Noop,
    Config,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [Scenario::First, Scenario::Full, Scenario::One, Scenario::Noop, Scenario::Config];

    pub fn title(self) -> &'static str {
        match self {
            Scenario::First => "first run on fresh hosts",
            Scenario::Full => "sync of 1,000 changed files / 50 MB",
            Scenario::One => "one changed file among 1,000",
            Scenario::Noop => "no-op re-run",
            Scenario::Config => "changed configuration (restarts the service)",
        }
    }

    fn file(self) -> &'static str {
        match self {
            Scenario::First => "first-run",
            Scenario::Full => "full-sync",
            Scenario::One => "one-changed-file",
            Scenario::Noop => "no-op",
            Scenario::Config => "changed-config",
        }
    }
}

/// One timed run of one tool.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub hosts: usize,
    pub scenario: Scenario,
    pub tool: Tool,
    pub secs: f64,
    /// mlopsctl: the deploy's phases, in order (seconds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<(String, f64)>,
    /// mlopsctl: per step of a host, the slowest host (seconds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<(String, f64)>,
    /// The test hosts' Docker engine.
    pub docker: String,
}

/// Where and with what a run was measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// UTC, as `date -u` prints it.
    pub date: String,
    pub machine: BTreeMap<String, String>,
    pub versions: BTreeMap<String, String>,
    /// `ansible.cfg` without its comments.
    pub settings: String,
    pub runs: usize,
}

impl Meta {
    pub fn gather(mlopsctl: &Path, ansible: &BTreeMap<String, String>, config: &Path, runs: usize) -> Result<Meta> {
        let first_line = |program: &str, args: &[&str]| -> String {
            std::process::Command::new(program)
                .args(args)
                .output()
                .map(|o| {
                    // ssh -V prints to stderr.
                    let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                    String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_string()
                })
                .unwrap_or_else(|e| format!("({program}: {e})"))
        };
        let mut machine = BTreeMap::new();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).unwrap_or(": ?");
        machine.insert(
            "CPU".into(),
            format!(
                "{} × {}",
                std::thread::available_parallelism().map_or(0, usize::from),
                model.trim_start_matches([' ', '\t', ':'])
            ),
        );
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        machine.insert("memory".into(), format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0));
        let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let pretty = os.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).unwrap_or("?").trim_matches('"');
        machine.insert("OS".into(), pretty.to_string());
        machine.insert(
            "kernel".into(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        );
        let mut versions = ansible.clone();
        versions.insert("mlopsctl".into(), first_line(&mlopsctl.display().to_string(), &["--version"]));
        versions.insert("rsync".into(), first_line("rsync", &["--version"]));
        versions.insert("OpenSSH".into(), first_line("ssh", &["-V"]));
        versions.insert("Python".into(), first_line("python3", &["--version"]));
        let settings = std::fs::read_to_string(config)
            .with_context(|| format!("cannot read {}", config.display()))?
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Meta { date: first_line("date", &["-u"]), machine, versions, settings, runs })
    }
}

/// The latest run of each host count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SizeRun {
    pub hosts: usize,
    pub meta: Meta,
    pub samples: Vec<Sample>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub sizes: Vec<SizeRun>,
}

impl Results {
    pub fn load() -> Result<Results> {
        let path = results_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {}\n  hint: run mlops-bench-ansible without --render first", path.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a results file of this version", path.display()))
    }

    /// The results so far, or none when there are none (or they are of
    /// another format: they are replaced as the run goes).
    pub fn load_or_new() -> Results {
        Results::load().unwrap_or_default()
    }

    pub fn replace(&mut self, hosts: usize, meta: Meta, samples: Vec<Sample>) {
        self.sizes.retain(|s| s.hosts != hosts);
        self.sizes.push(SizeRun { hosts, meta, samples });
        self.sizes.sort_by_key(|s| s.hosts);
    }

    /// Written whole to a temporary file, then renamed over the old one.
    pub fn save(&self) -> Result<()> {
        let path = results_path();
        std::fs::create_dir_all(path.parent().expect("in bench/results"))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn times(&self, hosts: usize, scenario: Scenario, tool: Tool) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .sizes
            .iter()
            .filter(|s| s.hosts == hosts)
            .flat_map(|s| &s.samples)
            .filter(|s| s.scenario == scenario && s.tool == tool)
            .map(|s| s.secs)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self, hosts: usize, scenario: Scenario, tool: Tool) -> Option<f64> {
        median(&self.times(hosts, scenario, tool))
    }
}

fn median(sorted: &[f64]) -> Option<f64> {
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn secs(s: f64) -> String {
    if s < 10.0 { format!("{s:.2}") } else { format!("{s:.1}") }
}

/// The results table: per host count and scenario, each tool's median
/// (min–max, samples) and its time as a multiple of mlopsctl's.
pub fn table(results: &Results) -> String {
    let mut t = String::new();
    for size in &results.sizes {
        let n = size.hosts;
        let _ = writeln!(t, "\n### {n} host{}\n", if n == 1 { "" } else { "s" });
        let tools: Vec<Tool> =
            Tool::ALL.into_iter().filter(|&tool| size.samples.iter().any(|s| s.tool == tool)).collect();
        let mut head = "| scenario |".to_string();
        let mut rule = "|---|".to_string();
        for tool in &tools {
            head += &format!(" {} |", tool.name());
            rule += "---:|";
            if *tool != Tool::Mlopsctl {
                head += " × mlopsctl |";
                rule += "---:|";
            }
        }
        let _ = writeln!(t, "{head}\n{rule}");
        for scenario in Scenario::ALL {
            let ours = results.median(n, scenario, Tool::Mlopsctl);
            let mut row = format!("| {} |", scenario.title());
            for &tool in &tools {
                let times = results.times(n, scenario, tool);
                match median(&times) {
                    Some(m) => {
                        let spread = if times.len() > 1 {
                            format!(" ({}–{}, {} runs)", secs(times[0]), secs(times[times.len() - 1]), times.len())
                        } else {
                            " (1 run)".to_string()
                        };
                        row += &format!(" {}{spread} |", secs(m));
                        if tool != Tool::Mlopsctl {
                            row += &match ours {
                                Some(o) if o > 0.0 => format!(" **{:.1}×** |", m / o),
                                _ => " |".to_string(),
                            };
                        }
                    }
                    None => row += if tool == Tool::Mlopsctl { " – |" } else { " – | |" },
                }
            }
            let _ = writeln!(t, "{row}");
        }
    }
    t
}

/// One target of the issue, judged on the figures.
struct Verdict {
    target: String,
    hosts: usize,
    measured: String,
    met: bool,
}

fn verdicts(results: &Results) -> Vec<Verdict> {
    let mut out = Vec::new();
    for size in &results.sizes {
        let n = size.hosts;
        let m = |scenario, tool| results.median(n, scenario, tool);
        if n >= 10 {
            for scenario in [Scenario::Noop, Scenario::One] {
                if let (Some(o), Some(a)) = (m(scenario, Tool::Mlopsctl), m(scenario, Tool::AnsibleSynchronize)) {
                    out.push(Verdict {
                        target: format!("{}: ≥ 20× faster than Ansible synchronize", scenario.title()),
                        hosts: n,
                        measured: format!("{:.1}× ({} s against {} s)", a / o, secs(o), secs(a)),
                        met: a / o >= 20.0,
                    });
                }
                if let (Some(o), Some(r)) = (m(scenario, Tool::Mlopsctl), m(scenario, Tool::Rsync)) {
                    out.push(Verdict {
                        target: format!("{}: faster than the rsync floor", scenario.title()),
                        hosts: n,
                        measured: format!("{:.2}× ({} s against {} s)", r / o, secs(o), secs(r)),
                        met: o < r,
                    });
                }
            }
        }
        if let (Some(o), Some(r)) = (m(Scenario::Full, Tool::Mlopsctl), m(Scenario::Full, Tool::Rsync)) {
            out.push(Verdict {
                target: "full sync within 1.1× of the rsync floor".into(),
                hosts: n,
                measured: format!("{:.2}× the floor ({} s against {} s)", o / r, secs(o), secs(r)),
                met: o <= 1.1 * r,
            });
        }
        for tool in [Tool::AnsibleSynchronize, Tool::AnsibleCopy] {
            if let (Some(o), Some(a)) = (m(Scenario::First, Tool::Mlopsctl), m(Scenario::First, tool)) {
                out.push(Verdict {
                    target: format!("first run faster than {}", tool.name()),
                    hosts: n,
                    measured: format!("{:.1}× ({} s against {} s)", a / o, secs(o), secs(a)),
                    met: o < a,
                });
            }
        }
    }
    out
}

/// The medians of mlopsctl's phases and steps, per host count and
/// scenario; and for a missed target, the largest of them.
fn profile(results: &Results) -> (String, BTreeMap<(usize, Scenario), String>) {
    let mut t = String::new();
    let mut largest = BTreeMap::new();
    let names = |pick: fn(&Sample) -> &Vec<(String, f64)>| -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for s in results.sizes.iter().flat_map(|s| &s.samples).filter(|s| s.tool == Tool::Mlopsctl) {
            for (name, _) in pick(s) {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    };
    let phases = names(|s| &s.phases);
    let steps = names(|s| &s.steps);
    if phases.is_empty() {
        return (t, largest);
    }
    let _ = writeln!(
        t,
        "Wall time of each phase of the deploy (`phases` in `mlopsctl deploy --output json`), then per step of a \
         host the slowest host (`timings` of each host), medians in seconds:\n"
    );
    let mut head = "| hosts | scenario |".to_string();
    let mut rule = "|---|---|".to_string();
    for p in &phases {
        head += &format!(" {p} |");
        rule += "---:|";
    }
    head += " ‖ |";
    rule += "---|";
    for s in &steps {
        head += &format!(" {s} |");
        rule += "---:|";
    }
    let _ = writeln!(t, "{head}\n{rule}");
    for size in &results.sizes {
        for scenario in Scenario::ALL {
            let ours: Vec<&Sample> =
                size.samples.iter().filter(|s| s.tool == Tool::Mlopsctl && s.scenario == scenario).collect();
            if ours.is_empty() {
                continue;
            }
            let med = |pick: fn(&Sample) -> &Vec<(String, f64)>, name: &str| -> f64 {
                let mut v: Vec<f64> = ours
                    .iter()
                    .map(|s| pick(s).iter().filter(|(n, _)| n == name).map(|(_, x)| x).sum::<f64>())
                    .collect();
                v.sort_by(f64::total_cmp);
                median(&v).unwrap_or(0.0)
            };
            let mut row = format!("| {} | {} |", size.hosts, scenario.title());
            let mut top: Vec<(String, f64)> = Vec::new();
            for p in &phases {
                let x = med(|s| &s.phases, p);
                row += &format!(" {} |", secs(x));
                top.push((format!("phase `{p}`"), x));
            }
            row += " |";
            let mut top_step: Vec<(String, f64)> = Vec::new();
            for s in &steps {
                let x = med(|s| &s.steps, s);
                row += &format!(" {} |", secs(x));
                top_step.push((format!("step `{s}`"), x));
            }
            let _ = writeln!(t, "{row}");
            let best = |v: &[(String, f64)]| v.iter().max_by(|a, b| a.1.total_cmp(&b.1)).cloned();
            if let (Some((p, px)), Some((s, sx))) = (best(&top), best(&top_step)) {
                largest.insert(
                    (size.hosts, scenario),
                    format!("largest: {p} {} s; slowest host's largest {s} {} s", secs(px), secs(sx)),
                );
            }
        }
    }
    (t, largest)
}

/// RESULTS.md and the plots, from `results`.
pub fn write(results: &Results) -> Result<()> {
    let plots = plots_dir();
    std::fs::create_dir_all(&plots)?;
    let mut written = Vec::new();
    for scenario in Scenario::ALL {
        let path = plots.join(format!("{}.png", scenario.file()));
        if plot(results, scenario, &path)? {
            written.push((scenario, path));
        }
    }
    let md = markdown(results, &written);
    let path = report_path();
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, md)?;
    std::fs::rename(&tmp, &path)?;
    println!("wrote {} and {} plot(s) in {}", path.display(), written.len(), plots.display());
    Ok(())
}

fn markdown(results: &Results, plots: &[(Scenario, PathBuf)]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# mlopsctl against Ansible: the same job on the same hosts\n\n\
         Generated by `mlops-bench-ansible` (bench/src/bin/bench_ansible/); do not edit by hand. To measure again and \
         regenerate this file, the plots and `bench/results/ansible.json` (about 1.5 hours here, most of it \
         `ansible.builtin.copy` at one host and Ansible at 50 hosts):\n\n\
         ```sh\n\
         cargo build --release -p mlopsctl -p mlops-bench && cargo agent-static\n\
         target/release/mlops-bench-ansible --hosts 1,10,50 --runs 3 --phases\n\
         target/release/mlops-bench-ansible --render   # this file and the plots again, from the JSON\n\
         ```\n\n\
         It runs as root (it makes network namespaces) and acts only on its own test hosts: each is a network \
         namespace with its own sshd and its own Docker engine, with private /etc, /var/lib and /run.\n\n\
         ## The job\n\n\
         Every tool puts the same things on every host: a tree of 1,000 DAG files (50,000 random bytes each, \
         50 MB, in 20 directories), a configuration file rendered from variables, and a service: an image built \
         from a small context (busybox) and a container that mounts both, restarted when its configuration \
         changes. Each tool keeps its own copy (directory, image, container), and after every run the harness \
         checks, on every host and inside each tool's container, the checksum of a changed file and the \
         configuration (and after a configuration change that the container was restarted).\n\n\
         - **mlopsctl**: `mlopsctl deploy -i INVENTORY --stack DIR --forks N`, the stack being a Compose file \
         with the service, its build context, `./dags` and `./conf/app.conf` as bind mounts. The first run \
         uploads and installs the agent on each host. With several hosts the image is built once and shipped.\n\
         - **ansible synchronize**: `bench/ansible/synchronize.yml`: `ansible.posix.synchronize` (rsync under \
         Ansible, with `delete`) for the DAG tree and the build context, `ansible.builtin.template` for the \
         configuration, `community.docker.docker_image` (build on the host) and \
         `community.docker.docker_container`, against each host's own dockerd; a handler restarts the \
         container when the configuration changed. community.docker because it is the collection Ansible's \
         docs point to for containers (its modules talk to the Docker API with the Python SDK the targets \
         have); `docker_compose_v2` would need the Compose CLI plugin, which this machine's Debian docker.io \
         does not ship.\n\
         - **ansible copy**: `bench/ansible/copy.yml`: the same with `ansible.builtin.copy`, what most \
         playbooks use. It makes one module call per file, which takes about a second per file here, so it \
         runs at one host only and once per scenario.\n\
         - **rsync (floor)**: the DAG tree alone, one `rsync -a --delete` per host, all at once, each over a \
         new SSH connection (as each mlopsctl run connects afresh). It builds and restarts nothing, so it has \
         no figure for the configuration change and is a floor for the file part only.\n\n\
         Absolute times on a shared 2-core machine are noisy; the ratios, measured in the same run, are the \
         point. `× mlopsctl` is the tool's median time divided by mlopsctl's: above 1, mlopsctl is faster."
    );
    if let Some(meta) = results.sizes.first().map(|s| &s.meta) {
        let _ = writeln!(md, "\n## The machine\n");
        for (k, v) in &meta.machine {
            let _ = writeln!(md, "- {k}: {v}");
        }
        let _ = writeln!(md, "\n## Versions\n");
        for (k, v) in &meta.versions {
            let _ = writeln!(md, "- {k}: {v}");
        }
        if let Some(docker) = results.sizes.first().and_then(|s| s.samples.first()).map(|s| &s.docker) {
            let _ = writeln!(md, "- Docker engine on the test hosts: {docker}");
        }
        let _ = writeln!(
            md,
            "\n## Ansible's settings\n\n`bench/ansible/ansible.cfg`, and `--forks N` for N hosts; no fact gathering, \
             pipelining, ControlPersist (one SSH connection per host kept across tasks and runs), host key checking \
             on, against the harness's known_hosts:\n\n```ini\n{}\n```",
            meta.settings
        );
        let _ = writeln!(md, "\nRuns:");
        for size in &results.sizes {
            let _ = writeln!(
                md,
                "- {} host(s): {}, {} run(s) per scenario after the first run",
                size.hosts, size.meta.date, size.meta.runs
            );
        }
    }
    let _ = writeln!(md, "\n## Results\n\nSeconds: median (min–max, runs).\n{}", table(results));
    let (profile, largest) = profile(results);
    let _ = writeln!(md, "## Targets\n\n| target | hosts | measured | |\n|---|---:|---|---|");
    let verdicts = verdicts(results);
    for v in &verdicts {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            v.target,
            v.hosts,
            v.measured,
            if v.met { "met" } else { "**missed**" }
        );
    }
    let missed: Vec<&Verdict> = verdicts.iter().filter(|v| !v.met).collect();
    if !missed.is_empty() {
        let _ = writeln!(md, "\nWhere mlopsctl's time went in the missed ones (from the phase profile below):\n");
        for v in &missed {
            let scenario = Scenario::ALL
                .into_iter()
                .find(|s| v.target.starts_with(s.title()))
                .unwrap_or(if v.target.starts_with("full") { Scenario::Full } else { Scenario::First });
            let why = largest.get(&(v.hosts, scenario)).cloned().unwrap_or_else(|| "no profile".into());
            let _ = writeln!(md, "- {} at {} host(s): {why}", v.target, v.hosts);
        }
        if missed.iter().any(|v| v.target.starts_with("full")) {
            let _ = writeln!(
                md,
                "\nWhy a full sync costs more than the floor: rsync writes each file once, into the page cache, and \
                 is done. mlopsctl's agent writes each file three times and makes each copy durable before it \
                 answers: into its content-addressed blob store (`upload`: an interrupted sync resumes from there, \
                 and a kept revision is restored from it without the controller), into the staged tree at \
                 `commit` (nothing a container sees changes before that), and into the live tree when the \
                 converge switches the stack (`converge`: a deploy that fails health checks leaves the old tree \
                 in place); and its bytes go through TLS and gRPC inside the SSH channel. Those guarantees are \
                 the difference; on one shared 2-core machine with 10 or 50 hosts writing to the same disk, the \
                 extra copies weigh more than at one host."
            );
        }
    }
    if !profile.is_empty() {
        let _ = writeln!(md, "\n## Where mlopsctl's time goes\n\n{profile}");
        let _ = writeln!(
            md,
            "Phases: `load` reads the stack and hashes its files on this machine; `agents` connects (SSH), checks \
             and if needed uploads, installs and restarts each agent, then its TLS `Hello`; `secrets` settles the \
             stack's secrets; `stage` is Docker checked and the files synced; `images` builds images no host has \
             and `converge` ships them and starts the services, gated on health. Steps (slowest host): `ssh` \
             connect and authenticate, `agent` the agent check through `Hello`, `manifest` the manifest sent and \
             the missing files answered (`SyncBegin`), `upload` the missing files, `commit` the tree swapped in, \
             `docker` Docker checked, `images` the image plan and transfers, `converge` the agent's Docker work. \
             The process's own start and the inventory read are in the total only."
        );
    }
    if !plots.is_empty() {
        let _ = writeln!(
            md,
            "\n## Plots\n\nTime against hosts, both axes logarithmic; points are medians, bars min–max.\n"
        );
        for (scenario, path) in plots {
            let name = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
            let _ = writeln!(md, "![{}](plots/{name})\n", scenario.title());
        }
    }
    md
}

/// One plotted point: hosts, median, min and max seconds.
type Point = (f64, f64, f64, f64);

/// Time against hosts for one scenario, every tool; false when there is
/// nothing to plot.
fn plot(results: &Results, scenario: Scenario, path: &Path) -> Result<bool> {
    use plotters::prelude::*;
    let hosts: Vec<usize> = results.sizes.iter().map(|s| s.hosts).collect();
    let mut series: Vec<(Tool, Vec<Point>)> = Vec::new();
    for tool in Tool::ALL {
        let points: Vec<Point> = hosts
            .iter()
            .filter_map(|&n| {
                let t = results.times(n, scenario, tool);
                Some((n as f64, median(&t)?, t[0], t[t.len() - 1]))
            })
            .collect();
        if !points.is_empty() {
            series.push((tool, points));
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    let all = series.iter().flat_map(|(_, p)| p.iter().flat_map(|&(_, m, lo, hi)| [m, lo, hi]));
    let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (x_hi, draw_err) =
        (*hosts.iter().max().unwrap_or(&1) as f64 * 1.6, |e| anyhow!("plot {}: {e}", path.display()));
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(scenario.title(), ("sans-serif", 26))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..x_hi).log_scale(), ((lo / 1.5).max(0.005)..hi * 1.5).log_scale())
        .map_err(|e| draw_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("hosts")
        .y_desc("seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if *y < 1.0 { format!("{y:.2}") } else { format!("{y:.0}") })
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    for (tool, points) in &series {
        let color = tool.color();
        chart
            .draw_series(LineSeries::new(points.iter().map(|&(x, m, _, _)| (x, m)), color.stroke_width(3)))
            .map_err(|e| draw_err(e.to_string()))?
            .label(tool.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        chart
            .draw_series(points.iter().map(|&(x, m, _, _)| Circle::new((x, m), 5, color.filled())))
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .draw_series(
                points.iter().map(|&(x, _, lo, hi)| PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(2))),
            )
            .map_err(|e| draw_err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    root.present().map_err(|e| draw_err(e.to_string()))?;
    Ok(true)
}
