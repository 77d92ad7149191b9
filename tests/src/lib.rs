//! Test harness: real hosts on this machine, and the real binaries.
//!
//! A [`TestHost`] is a network namespace with its own address
//! (`10.213.<slot>.2`, reached through a veth pair) running its own `sshd`
//! inside a private mount namespace. The agent's directories
//! (`/etc/mlops-agent`, `/usr/local/lib/mlops-agent`, ...) are bind-mounted
//! from the host's temporary directory there, so several hosts on one
//! machine each have their own agent install, pidfile and loopback port, as
//! separate machines would. Nothing about SSH is mocked: `mlopsctl` speaks
//! to OpenSSH's sshd.
//!
//! [`TestEnv`] is the controller side: a temporary HOME (so the developer's
//! own `~/.ssh` never leaks in), a client key authorized on every test host,
//! a known_hosts file and a state directory. [`TestEnv::ctl`] runs the real
//! `mlopsctl` binary, which [`bins`] builds once per test process.
//!
//! Needs root (namespaces, mounts, users); the tests are meant for CI and
//! developer machines of the project's kind, where that holds.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

/// Users every test host has: one with passwordless sudo, one whose sudo
/// asks for a password.
pub const SUDO_USER: &str = "mlops-sudo";
pub const SUDO_PASSWORD_USER: &str = "mlops-pwsudo";

/// The agent directories a test host gets privately (see the module docs).
const PRIVATE_DIRS: [&str; 5] = [
    "/etc/mlops-agent",
    "/usr/local/lib/mlops-agent",
    "/var/lib/mlops-agent",
    "/var/log/mlops-agent",
    "/run/mlops-agent",
];

/// The built binaries under test.
pub struct Bins {
    pub mlopsctl: PathBuf,
    pub agent: PathBuf,
    /// Static (it runs in a FROM scratch image).
    pub exporter: PathBuf,
    pub workspace: PathBuf,
}

/// Builds `mlopsctl` and `mlops-agent` (debug) once per process and returns
/// their paths. `cargo test` builds only the tested package's own binaries,
/// and these tests drive the other packages' binaries; building here keeps
/// them from being stale.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let workspace =
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(&cargo)
            .args(["build", "--quiet", "-p", "mlopsctl", "-p", "mlops-agent"])
            .current_dir(&workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building mlopsctl and mlops-agent failed");
        // The exporter goes into a FROM scratch image: built static, as
        // `cargo exporter-static` does, in the debug profile.
        let status = Command::new(&cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "mlops-airflow-exporter",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--config",
            ])
            .arg("target.x86_64-unknown-linux-gnu.rustflags=['-C','target-feature=+crt-static']")
            .current_dir(&workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the static mlops-airflow-exporter failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
        Bins {
            mlopsctl: target.join("debug/mlopsctl"),
            agent: target.join("debug/mlops-agent"),
            exporter: target.join("x86_64-unknown-linux-gnu/debug/mlops-airflow-exporter"),
            workspace,
        }
    })
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(out)
}

fn sh(script: &str) -> Result<Output> {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Creates the test users and their sudo rules once per machine.
fn ensure_users() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let script = format!(
            r#"set -e
for u in {SUDO_USER} {SUDO_PASSWORD_USER}; do
  id -u "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$u" 2>/dev/null || id -u "$u" >/dev/null
  # Not locked ("!"), so sshd lets keys in; no password can match "*".
  usermod -p '*' "$u"
done
# root too, when its password field is locked.
grep -q '^root:!' /etc/shadow && usermod -p '*' root || true
mkdir -p /etc/sudoers.d
printf '%s\n' '{SUDO_USER} ALL=(ALL) NOPASSWD: ALL' '{SUDO_PASSWORD_USER} ALL=(ALL) ALL' > /etc/sudoers.d/mlops-test.tmp
chmod 0440 /etc/sudoers.d/mlops-test.tmp
mv /etc/sudoers.d/mlops-test.tmp /etc/sudoers.d/mlops-test
mkdir -p /run/sshd
# Test hosts reach the outside like real hosts do (the Debian mirror, for
# debootstrap and apt) through NAT; Docker's FORWARD policy would drop it.
iptables -t nat -C POSTROUTING -s 10.213.0.0/16 ! -d 10.213.0.0/16 -j MASQUERADE 2>/dev/null \
  || iptables -t nat -A POSTROUTING -s 10.213.0.0/16 ! -d 10.213.0.0/16 -j MASQUERADE
iptables -C FORWARD -s 10.213.0.0/16 -j ACCEPT 2>/dev/null || iptables -I FORWARD -s 10.213.0.0/16 -j ACCEPT
iptables -C FORWARD -d 10.213.0.0/16 -j ACCEPT 2>/dev/null || iptables -I FORWARD -d 10.213.0.0/16 -j ACCEPT
sysctl -qw net.ipv4.ip_forward=1
"#
        );
        sh(&script).map(drop).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A slot: a number from 1 to 250 owned by this process, naming a test
/// host's namespace, veth and subnet. Files in /run/mlops-test keep
/// concurrent test processes apart; a slot left by a dead process is reused.
struct Slot {
    n: u8,
    file: PathBuf,
}

impl Slot {
    fn take() -> Result<Slot> {
        let dir = Path::new("/run/mlops-test");
        fs::create_dir_all(dir)?;
        for n in 1..=250u8 {
            let file = dir.join(format!("slot-{n}"));
            match fs::OpenOptions::new().write(true).create_new(true).open(&file) {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id())?;
                    return Ok(Slot { n, file });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner: Option<i32> = fs::read_to_string(&file).ok().and_then(|s| s.trim().parse().ok());
                    let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if !alive {
                        // Stale: its namespace may still exist.
                        let _ = Command::new("ip").args(["netns", "del", &format!("mlt{n}")]).output();
                        let _ = fs::remove_file(&file);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no free test host slot in /run/mlops-test")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
    }
}

/// A host: its own network namespace, sshd and agent directories.
pub struct TestHost {
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub netns: String,
    /// The sshd host public key line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
    dir: TempDir,
    sshd: Option<Child>,
    slot: Slot,
    share_state: bool,
}

/// How a test host differs from the default.
#[derive(Debug, Clone, Copy)]
pub struct HostOptions {
    pub port: u16,
    /// Keep `/var/lib/mlops-agent` shared with the machine. Stack tests need
    /// this: the machine's one dockerd resolves bind-mount sources in its
    /// own mount namespace, so the agent's synced trees must be where
    /// dockerd looks. Trees are per project, so tests stay apart.
    pub share_state: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions { port: 22, share_state: false }
    }
}

impl TestHost {
    pub fn start(name: &str) -> Result<TestHost> {
        Self::start_with(name, HostOptions::default())
    }

    /// A host whose sshd listens on `port`.
    pub fn start_on_port(name: &str, port: u16) -> Result<TestHost> {
        Self::start_with(name, HostOptions { port, ..HostOptions::default() })
    }

    pub fn start_with(name: &str, options: HostOptions) -> Result<TestHost> {
        let HostOptions { port, share_state } = options;
        ensure_users()?;
        let slot = Slot::take()?;
        let n = slot.n;
        let netns = format!("mlt{n}");
        let veth = format!("mlv{n}");
        let addr = format!("10.213.{n}.2");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        sh(&format!(
            "set -e
ip netns add {netns}
ip link add {veth} type veth peer name eth0 netns {netns}
ip addr add 10.213.{n}.1/24 dev {veth}
ip link set {veth} up
ip netns exec {netns} sh -c 'ip addr add {addr}/24 dev eth0 && ip link set eth0 up && ip link set lo up && ip route add default via 10.213.{n}.1'"
        ))?;
        let dir = tempfile::Builder::new().prefix(&format!("mlops-host-{name}-")).tempdir()?;
        let d = dir.path();
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(d.join("host_ed25519")))?;
        let host_key =
            fs::read_to_string(d.join("host_ed25519.pub"))?.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        fs::create_dir_all(d.join("authorized_keys"))?;
        for sub in PRIVATE_DIRS {
            fs::create_dir_all(d.join("root").join(sub.trim_start_matches('/')))?;
        }
        // sshd refuses keys in group/world-writable paths only with
        // StrictModes, which is off; still keep the directory private.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}
ListenAddress {addr}
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys/%u
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxSessions 50
MaxStartups 200
LogLevel VERBOSE
",
                dir = d.display()
            ),
        )?;
        let binds: String = PRIVATE_DIRS
            .iter()
            .filter(|p| !(share_state && **p == "/var/lib/mlops-agent"))
            .map(|p| format!("mkdir -p {p} && mount --bind {root}{p} {p} && ", root = d.join("root").display()))
            .collect();
        let sshd = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{binds} exec /usr/sbin/sshd -D -e -f {}/sshd_config", d.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("sshd.log"))?)
            .spawn()
            .context("cannot start sshd")?;
        let mut host =
            TestHost { name: name.to_string(), addr, port, netns, host_key, dir, sshd: Some(sshd), slot, share_state };
        host.wait_listening()?;
        Ok(host)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&format!("{}:{}", self.addr, self.port).parse()?, Duration::from_millis(200))
                .is_ok()
            {
                return Ok(());
            }
            if let Some(child) = &mut self.sshd
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "sshd exited ({status}): {}",
                    fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("sshd on {} did not listen within 10 s", self.addr)
    }

    /// Lets `public_key` log in as `user`.
    pub fn authorize(&self, user: &str, public_key: &str) -> Result<()> {
        let path = self.dir.path().join("authorized_keys").join(user);
        let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{}", public_key.trim())?;
        Ok(())
    }

    /// `[addr]:port` or `addr`, as known_hosts spells it.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 { self.addr.clone() } else { format!("[{}]:{}", self.addr, self.port) }
    }

    pub fn known_hosts_line(&self) -> String {
        format!("{} {}", self.known_hosts_name(), self.host_key)
    }

    /// `user@addr:port`.
    pub fn spec(&self, user: &str) -> String {
        format!("{user}@{}:{}", self.addr, self.port)
    }

    /// A file of this host's private agent directories, as the host sees
    /// `path` (one of the agent directories).
    pub fn path(&self, path: &str) -> PathBuf {
        if self.share_state && path.starts_with("/var/lib/mlops-agent") {
            return PathBuf::from(path);
        }
        self.dir.path().join("root").join(path.trim_start_matches('/'))
    }

    /// Runs a shell command inside the host's namespaces (network and the
    /// private agent directories), as the host's processes see them.
    pub fn exec(&self, script: &str) -> Result<Output> {
        let binds: String = PRIVATE_DIRS
            .iter()
            .filter(|p| !(self.share_state && **p == "/var/lib/mlops-agent"))
            .map(|p| format!("mount --bind {root}{p} {p} && ", root = self.dir.path().join("root").display()))
            .collect();
        run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{binds} {script}")))
    }

    /// Pids of every process in the host's network namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The pid in the agent's pidfile, when that process is alive.
    pub fn agent_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.path("/run/mlops-agent/agent.pid")).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Stops sshd: the host is down for SSH (its address still answers, with a refusal).
    pub fn stop_sshd(&mut self) {
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.path("/var/log/mlops-agent/agent.log")).unwrap_or_default()
    }

    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop_sshd();
        // Agents started over SSH live on in the namespace; end them too.
        for pid in self.pids() {
            // SAFETY: plain kill(2) on pids that `ip netns pids` listed.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        let _ = Command::new("ip").args(["link", "del", &format!("mlv{}", self.slot.n)]).output();
    }
}

/// The controller side of a test: HOME, keys, known_hosts, state.
pub struct TestEnv {
    pub dir: TempDir,
    pub home: PathBuf,
    pub state: PathBuf,
    pub known_hosts: PathBuf,
    /// The client key, authorized on hosts by [`TestEnv::host`].
    pub key: PathBuf,
    pub public_key: String,
    /// The binaries `ctl` runs.
    pub mlopsctl: PathBuf,
    pub agent: PathBuf,
    /// The static exporter the platform stack injects.
    pub exporter: Option<PathBuf>,
}

/// What a run of `mlopsctl` produced.
#[derive(Debug)]
pub struct CtlRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlRun {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(self.code, code, "exit code\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

impl TestEnv {
    /// An environment running the debug binaries this test process built.
    pub fn new() -> Result<TestEnv> {
        let bins = bins();
        let mut env = Self::with_binaries(&bins.mlopsctl, &bins.agent)?;
        env.exporter = Some(bins.exporter.clone());
        Ok(env)
    }

    /// An environment running the given binaries (the benchmark passes release builds).
    pub fn with_binaries(mlopsctl: &Path, agent: &Path) -> Result<TestEnv> {
        let dir = tempfile::Builder::new().prefix("mlops-ctl-").tempdir()?;
        let home = dir.path().join("home");
        fs::create_dir_all(home.join(".ssh"))?;
        // The key lives outside ~/.ssh: tests choose when it is offered.
        let key = dir.path().join("client_ed25519");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "mlops-test-client", "-f"])
            .arg(&key))?;
        let public_key = fs::read_to_string(key.with_extension("pub"))?;
        Ok(TestEnv {
            state: dir.path().join("state"),
            known_hosts: home.join(".ssh/known_hosts"),
            home,
            key,
            public_key,
            dir,
            mlopsctl: mlopsctl.to_path_buf(),
            agent: agent.to_path_buf(),
            exporter: None,
        })
    }

    /// Starts a host that trusts this environment's key for root and the
    /// sudo users, and records its host key in known_hosts.
    pub fn host(&self, name: &str) -> Result<TestHost> {
        let host = TestHost::start(name)?;
        self.trust(&host)?;
        Ok(host)
    }

    pub fn trust(&self, host: &TestHost) -> Result<()> {
        for user in ["root", SUDO_USER, SUDO_PASSWORD_USER] {
            host.authorize(user, &self.public_key)?;
        }
        self.add_known_host(&host.known_hosts_line())
    }

    pub fn add_known_host(&self, line: &str) -> Result<()> {
        let mut f = fs::OpenOptions::new().create(true).append(true).open(&self.known_hosts)?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    /// Runs `mlopsctl` with this environment: its HOME, state dir, key.
    pub fn ctl(&self, args: &[&str]) -> CtlRun {
        self.ctl_with(args, &[])
    }

    pub fn ctl_with(&self, args: &[&str], env: &[(&str, &str)]) -> CtlRun {
        let mut cmd = Command::new(&self.mlopsctl);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("USER", "root")
            .env("MLOPS_STATE_DIR", &self.state)
            .env("MLOPS_AGENT_BINARY", &self.agent)
            .stdin(Stdio::null());
        if let Some(exporter) = &self.exporter {
            cmd.env("MLOPS_AIRFLOW_EXPORTER_BINARY", exporter);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("mlopsctl runs");
        CtlRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `--identity KEY` plus `args`.
    pub fn ctl_key(&self, args: &[&str]) -> CtlRun {
        let key = self.key.display().to_string();
        let mut all = vec!["--identity", key.as_str()];
        all.extend_from_slice(args);
        self.ctl(&all)
    }

    /// Writes a file in the environment's directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        fs::write(&path, text)?;
        Ok(path)
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Fails the test (never skips) when no Docker engine answers: CI starts one.
pub fn require_docker() {
    let out = Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "these tests need a Docker engine, and none answers: {}\n  hint: start dockerd (tests/run.sh does)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "these tests need the docker CLI and engine: {e}\n  hint: apt-get install docker.io; tests/run.sh starts dockerd"
        ),
    }
}

/// A stack directory for tests: `img/` builds a tiny image (static busybox
/// on `scratch`: no registry, no base image needed), `compose.yaml` is the
/// caller's. Dropping it removes everything Docker holds for the project.
pub struct TestStack {
    pub dir: TempDir,
    pub project: String,
}

impl TestStack {
    /// `compose` may use `{project}`; services build `./img`.
    pub fn new(compose: &str) -> Result<TestStack> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let project = format!("t{}x{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let dir = tempfile::Builder::new().prefix("mlops-stack-").tempdir()?;
        let img = dir.path().join("img");
        fs::create_dir_all(&img)?;
        fs::copy("/bin/busybox", img.join("busybox"))
            .context("busybox-static is needed (/bin/busybox); tests/run.sh installs it")?;
        fs::write(
            img.join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        )?;
        let stack = TestStack { dir, project };
        stack.write_compose(compose)?;
        Ok(stack)
    }

    pub fn write_compose(&self, compose: &str) -> Result<()> {
        fs::write(self.dir.path().join("compose.yaml"), compose.replace("{project}", &self.project))?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `docker` CLI output (tests only inspect with it; mlopsctl never runs it).
    pub fn docker(args: &[&str]) -> String {
        let out = Command::new("docker").args(args).output().expect("docker runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        let filter = format!("label=mlops.project={}", self.project);
        let ids = Self::docker(&["ps", "-aq", "--filter", &filter]);
        for id in ids.split_whitespace() {
            Self::docker(&["rm", "-f", id]);
        }
        for n in Self::docker(&["network", "ls", "-q", "--filter", &filter]).split_whitespace() {
            Self::docker(&["network", "rm", n]);
        }
        for v in Self::docker(&["volume", "ls", "-q", "--filter", &filter]).split_whitespace() {
            Self::docker(&["volume", "rm", "-f", v]);
        }
        for i in Self::docker(&["images", "-q", "--filter", &filter]).split_whitespace() {
            Self::docker(&["rmi", "-f", i]);
        }
        let _ = fs::remove_dir_all(format!("/var/lib/mlops-agent/trees/stack-{}", self.project));
        let _ = fs::remove_file(format!("/var/lib/mlops-agent/trees/.index/stack-{}.json", self.project));
    }
}

/// The agent binary run directly on a loopback port with certificates from
/// `ca`, without SSH: for RPC-level tests.
pub struct LocalAgent {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub state: PathBuf,
    _dir: TempDir,
}

impl LocalAgent {
    pub fn start(agent: &Path, ca: &mlops_pki::Ca) -> Result<LocalAgent> {
        Self::start_with(agent, ca, &[])
    }

    /// With extra `serve` arguments (such as `--docker-socket`).
    pub fn start_with(agent: &Path, ca: &mlops_pki::Ca, extra: &[&str]) -> Result<LocalAgent> {
        let dir = tempfile::tempdir()?;
        let tls = dir.path().join("tls");
        fs::create_dir(&tls)?;
        let id = ca.server_identity("local-agent-test")?;
        fs::write(tls.join("ca.pem"), ca.cert_pem())?;
        fs::write(tls.join("server.pem"), &id.cert_pem)?;
        fs::write(tls.join("server.key"), &id.key_pem)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = dir.path().join("agent.log");
        let state = dir.path().join("state");
        let child = Command::new(agent)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
                "/nonexistent/agent.json",
                "--tls-dir",
            ])
            .arg(&tls)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "agent did not listen: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(LocalAgent { child, port, log, state, _dir: dir })
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
