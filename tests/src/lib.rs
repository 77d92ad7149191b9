//! Test harness: real hosts on this machine, and the real binaries.
//!
//! A [`TestHost`] is a host of its own on this machine: a network namespace
//! (address `10.213.<slot>.2`, reached through a veth pair, with NAT to the
//! outside) and a mount namespace in which `/etc`, `/home`,
//! `/usr/local/lib`, `/var/lib`, `/var/log` and `/var/mail` are overlays and
//! `/run` is a private tmpfs, so that what the host writes there (the
//! agent's directories, its users, its pidfiles, its logs) stays in the
//! host's temporary directory. (`/usr`, `/root` and `/tmp` are the
//! machine's: `tests/run.sh` installs the packages the hosts use, so no
//! host installs one.) OpenSSH's sshd runs in it; nothing about SSH is
//! mocked.
//!
//! A host made with [`HostOptions::docker`] also runs its own `dockerd`:
//! its own data root, exec root, socket, pidfile, configuration, bridge
//! subnet and cgroup parent. Its agent, its bind-mount sources, its
//! published ports and its containers are that host's alone, as on a
//! separate machine. No test uses this machine's own Docker engine, its
//! agent directories (`/etc/mlops-agent`, `/var/lib/mlops-agent`,
//! `/run/mlops-agent`, ...), its agent port or the platform's ports:
//! `tests/run.sh` checks that the machine's engine and agent files are the
//! same after the suite as before it.
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

pub mod airflow;
pub mod fuzz;
pub mod vagrant;

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

/// Users every test host has: one with passwordless sudo, one whose sudo
/// asks for a password, and an unprivileged local user (the hardening tests
/// attack the agent as it).
pub const SUDO_USER: &str = "mlops-sudo";
pub const SUDO_PASSWORD_USER: &str = "mlops-pwsudo";
pub const LOCAL_USER: &str = "mlops-local";

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

/// The run's image depot: images built once in a run (the platform's, by
/// the first test that deploys it) wait there, saved, for the tests after
/// it, which load them into their own hosts' engines instead of building
/// them again ([`TestHost::deposit_images`], [`TestHost::stock_images`]).
/// `tests/run.sh` sets `MLOPS_TEST_IMAGE_DEPOT` to a directory of its own,
/// removed after the run; without it every test builds its own.
///
/// A stocked image is used only where its build context hashes the same as
/// the deploy's (the agent's check, as for any image a host has), so a set
/// from an older bundle is rebuilt, never run.
pub fn image_depot() -> Option<PathBuf> {
    std::env::var_os("MLOPS_TEST_IMAGE_DEPOT").filter(|d| !d.is_empty()).map(PathBuf::from)
}

/// The times of a long test's steps: each printed, and appended to
/// `steps-NAME.txt` in the test's target tmp directory, which
/// `tests/run.sh` prints after the suite (a passing test's output is
/// captured, and CI's time budget needs to know where the minutes went).
pub struct StepTimes {
    file: PathBuf,
    name: String,
    started: Instant,
    last: Instant,
}

impl StepTimes {
    /// Starts the clock; `tmp` is the test's `env!("CARGO_TARGET_TMPDIR")`.
    /// A previous run's file is replaced.
    pub fn new(tmp: &str, name: &str) -> Self {
        let file = Path::new(tmp).join(format!("steps-{name}.txt"));
        let _ = std::fs::remove_file(&file);
        let now = Instant::now();
        StepTimes { file, name: name.to_string(), started: now, last: now }
    }

    /// Records the time since the previous step (or the start) as `step`'s.
    pub fn step(&mut self, step: &str) {
        let now = Instant::now();
        let line = format!(
            "time: {}: {step}: {:.0} s (at {:.0} s)",
            self.name,
            (now - self.last).as_secs_f64(),
            (now - self.started).as_secs_f64()
        );
        self.last = now;
        record_line(&self.file, &line);
    }
}

/// Prints `line` and appends it to `file`, a times file `tests/run.sh`
/// prints after the suite ([`StepTimes`]; the VM tier's own).
pub fn record_line(file: &Path, line: &str) {
    eprintln!("{line}");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(file) {
        let _ = writeln!(f, "{line}");
    }
}

/// The agent users ship: `cargo agent-static` (release, static, LTO'd).
/// For the VM tier, whose guests run under software emulation, where the
/// debug build moves an image at under 1 MB/s; and whose Debian 11 guest
/// has an older glibc than this machine. Built once per process, on first use.
pub fn release_static_agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let b = bins();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(&cargo)
            .args(["agent-static", "--quiet"])
            .current_dir(&b.workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "`cargo agent-static` failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| b.workspace.join("target"), PathBuf::from);
        target.join("x86_64-unknown-linux-gnu/release/mlops-agent")
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

/// Lets test hosts reach the outside as real hosts do (the Debian mirror
/// and PyPI, for debootstrap, apt and pip) through NAT: forwarding on, and
/// the test hosts' subnet accepted where Docker's FORWARD policy would drop
/// it. The only change the tests make to this machine; once per process.
fn ensure_network() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        // -w: other test processes (the VM tier runs beside the others)
        // and libvirt change the tables too.
        let script = r#"set -e
iptables -w -t nat -C POSTROUTING -s 10.213.0.0/16 ! -d 10.213.0.0/16 -j MASQUERADE 2>/dev/null \
  || iptables -w -t nat -A POSTROUTING -s 10.213.0.0/16 ! -d 10.213.0.0/16 -j MASQUERADE
iptables -w -C FORWARD -s 10.213.0.0/16 -j ACCEPT 2>/dev/null || iptables -w -I FORWARD -s 10.213.0.0/16 -j ACCEPT
iptables -w -C FORWARD -d 10.213.0.0/16 -j ACCEPT 2>/dev/null || iptables -w -I FORWARD -d 10.213.0.0/16 -j ACCEPT
sysctl -qw net.ipv4.ip_forward=1
"#;
        sh(script).map(drop).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The shell lines that give a host its users: one with passwordless sudo,
/// one whose sudo asks for a password, one without sudo, and root able to
/// log in with a key.
/// They run inside the host's mount namespace, so the users exist in the
/// host's overlay of `/etc` and `/home` only, never on this machine.
fn users_script() -> String {
    format!(
        r#"for u in {SUDO_USER} {SUDO_PASSWORD_USER} {LOCAL_USER}; do
  id -u "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$u"
  # Not locked ("!"), so sshd lets keys in; no password can match "*".
  usermod -p '*' "$u"
done
# root too, when its password field is locked.
if grep -q '^root:!' /etc/shadow; then usermod -p '*' root; fi
mkdir -p /etc/sudoers.d
printf '%s\n' '{SUDO_USER} ALL=(ALL) NOPASSWD: ALL' '{SUDO_PASSWORD_USER} ALL=(ALL) ALL' > /etc/sudoers.d/mlops-test
chmod 0440 /etc/sudoers.d/mlops-test
"#
    )
}

/// A slot: a number from 1 to 250 owned by this process, naming a test
/// host's namespace, veth, subnet and cgroup. A slot is owned by holding an
/// exclusive `flock` on `/run/mlops-test/slot-N`: concurrent test processes
/// stay apart, and a slot left by a dead process (its lock gone with it) is
/// cleaned up by the next owner, under the lock. The owner removes the file
/// when done; a lock taken on a file that was removed meanwhile is dropped
/// (its path now names another file, or none) and the slot tried again.
struct Slot {
    n: u8,
    file: PathBuf,
    _lock: fs::File,
}

impl Slot {
    fn take() -> Result<Slot> {
        use std::os::unix::io::AsRawFd;
        let dir = Path::new("/run/mlops-test");
        fs::create_dir_all(dir)?;
        for n in 1..=250u8 {
            let path = dir.join(format!("slot-{n}"));
            let file = fs::OpenOptions::new().create(true).append(true).open(&path)?;
            // SAFETY: flock(2) on a descriptor this function owns.
            #[allow(unsafe_code)]
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            use std::os::unix::fs::MetadataExt;
            let same = fs::metadata(&path).is_ok_and(|m| file.metadata().is_ok_and(|f| f.ino() == m.ino()));
            if !locked || !same {
                continue;
            }
            // Ours now. What a dead owner may have left goes first.
            kill_netns(&format!("mlt{n}"));
            kill_cgroup(&cgroup_name(n));
            let _ = Command::new("ip").args(["netns", "del", &format!("mlt{n}")]).output();
            let _ = Command::new("ip").args(["link", "del", &format!("mlv{n}")]).output();
            return Ok(Slot { n, file: path, _lock: file });
        }
        bail!("no free test host slot in /run/mlops-test")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Removed while still locked: whoever opened it before sees, once
        // the lock is theirs, that the path names another file or none.
        let _ = fs::remove_file(&self.file);
    }
}

/// The cgroup (under every controller) that holds the containers of the
/// test host in slot `n`: dockerd runs them with `--cgroup-parent`, so they
/// can be found and ended even when their engine is gone.
fn cgroup_name(n: u8) -> String {
    format!("mlops-test-{n}")
}

/// The directories of cgroup `name` in every hierarchy (v1 controllers,
/// the v2 unified tree), deepest first.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup").join(name)];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path().join(name)));
    }
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    for root in roots.iter().filter(|r| r.is_dir()) {
        walk(root, &mut out);
    }
    out
}

fn sigkill(pid: i32) {
    // SAFETY: plain kill(2); the pids come from this host's namespace or cgroup.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Kills every process in cgroup `name` (the containers of one test host)
/// and removes the cgroup.
fn kill_cgroup(name: &str) {
    let dirs = cgroup_dirs(name);
    if dirs.is_empty() {
        return;
    }
    for _ in 0..50 {
        let mut any = false;
        for dir in &dirs {
            for pid in fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    sigkill(pid);
                    any = true;
                }
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in dirs {
        let _ = fs::remove_dir(dir);
    }
}

/// Kills every process in network namespace `netns`.
fn kill_netns(netns: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_else(|_| Vec::new());
    for pid in pids {
        sigkill(pid);
    }
}

/// A host: its own network namespace and mount namespace, sshd, agent
/// directories and, when asked, Docker engine.
pub struct TestHost {
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub netns: String,
    /// The sshd host public key line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
    /// Its second host key (`ecdsa-sha2-nistp256 AAAA...`): a host with keys
    /// of two types, as most are.
    pub host_key_ecdsa: String,
    dir: TempDir,
    /// `sleep infinity`, holding the host's mount namespace; everything
    /// of the host runs in its namespaces (`nsenter --target`).
    anchor: Child,
    sshd: Option<Child>,
    dockerd: Option<Child>,
    slot: Slot,
}

/// How a test host differs from the default.
#[derive(Debug, Clone, Copy)]
pub struct HostOptions {
    pub port: u16,
    /// Run the host's own Docker engine (see the module docs).
    pub docker: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions { port: 22, docker: false }
    }
}

/// Directories a test host sees through an overlay of its own: the
/// machine's files show through, and whatever the host creates in them
/// (the agent's directories, among others) lands in the host's temporary
/// directory instead of on the machine.
const OVERLAID: [&str; 6] = ["/etc", "/home", "/usr/local/lib", "/var/lib", "/var/log", "/var/mail"];

impl TestHost {
    /// A host with sshd and no Docker engine.
    pub fn start(name: &str) -> Result<TestHost> {
        Self::start_with(name, HostOptions::default())
    }

    /// A host whose sshd listens on `port`.
    pub fn start_on_port(name: &str, port: u16) -> Result<TestHost> {
        Self::start_with(name, HostOptions { port, ..HostOptions::default() })
    }

    /// A host with its own Docker engine.
    pub fn with_docker(name: &str) -> Result<TestHost> {
        Self::start_with(name, HostOptions { docker: true, ..HostOptions::default() })
    }

    pub fn start_with(name: &str, options: HostOptions) -> Result<TestHost> {
        let HostOptions { port, docker } = options;
        ensure_network()?;
        let slot = Slot::take()?;
        let n = slot.n;
        let netns = format!("mlt{n}");
        let veth = format!("mlv{n}");
        let addr = format!("10.213.{n}.2");
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
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ecdsa", "-N", "", "-C", name, "-f"])
            .arg(d.join("host_ecdsa")))?;
        let public = |file: &str| -> Result<String> {
            Ok(fs::read_to_string(d.join(file))?.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        };
        let (host_key, host_key_ecdsa) = (public("host_ed25519.pub")?, public("host_ecdsa.pub")?);
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
HostKey {dir}/host_ecdsa
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

        // The host's mount namespace: overlays, a private /run, and the
        // agent's directories from this host's temporary directory. Mount
        // points are created inside the overlays, never on the machine.
        let mut script = String::from("set -e\n");
        for (i, lower) in OVERLAID.iter().enumerate().filter(|(_, p)| Path::new(p).is_dir()) {
            let (upper, work) = (d.join(format!("overlay/{i}/upper")), d.join(format!("overlay/{i}/work")));
            fs::create_dir_all(&upper)?;
            fs::create_dir_all(&work)?;
            script.push_str(&format!(
                "mount -t overlay mlops-test -o lowerdir={lower},upperdir={},workdir={} {lower}\n",
                upper.display(),
                work.display()
            ));
        }
        script.push_str("mount -t tmpfs -o mode=0755 mlops-test /run\nmkdir -p /run/sshd\n");
        // Where /var/run is a directory rather than Debian's link to /run.
        script.push_str("if [ ! -L /var/run ]; then mount --bind /run /var/run; fi\n");
        for p in PRIVATE_DIRS {
            script.push_str(&format!("mkdir -p {p}\nmount --bind {}{p} {p}\n", d.join("root").display()));
        }
        script.push_str(&users_script());
        script.push_str(&format!("touch {}/namespace-ready\nexec sleep infinity\n", d.display()));
        let anchor = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("namespace.log"))?)
            .spawn()
            .context("cannot start the host's namespace")?;
        let mut host = TestHost {
            name: name.to_string(),
            addr,
            port,
            netns,
            host_key,
            host_key_ecdsa,
            dir,
            anchor,
            sshd: None,
            dockerd: None,
            slot,
        };
        host.wait_for("its namespace", Duration::from_secs(10), |h| Ok(h.dir.path().join("namespace-ready").exists()))?;

        let sshd = host
            .command_inside("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(host.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(host.dir.path().join("sshd.log"))?)
            .spawn()
            .context("cannot start sshd")?;
        host.sshd = Some(sshd);
        let target = format!("{}:{}", host.addr, host.port).parse()?;
        host.wait_for("sshd to listen", Duration::from_secs(10), |_| {
            Ok(TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok())
        })?;
        if docker {
            host.start_dockerd()?;
        }
        Ok(host)
    }

    /// A command that runs inside the host's network and mount namespaces.
    pub fn command_inside(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.anchor.id().to_string(), "--mount", "--net", "--", program]);
        cmd
    }

    /// Polls `ready` until it holds; fails early, with the logs, when a
    /// process of the host has died.
    fn wait_for(&mut self, what: &str, limit: Duration, mut ready: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if ready(self)? {
                return Ok(());
            }
            for (process, log, child) in [
                ("the namespace holder", "namespace.log", Some(&mut self.anchor)),
                ("sshd", "sshd.log", self.sshd.as_mut()),
                ("dockerd", "dockerd.log", self.dockerd.as_mut()),
            ] {
                if let Some(child) = child
                    && let Some(status) = child.try_wait()?
                {
                    let log = fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
                    bail!(
                        "test host {}: {process} exited ({status}) while waiting for {what}:\n{}",
                        self.name,
                        tail.join("\n")
                    );
                }
            }
            ensure!(
                Instant::now() < deadline,
                "test host {}: {what} not ready within {} s",
                self.name,
                limit.as_secs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the host's own dockerd: its own data root (in the host's
    /// temporary directory), exec root, pidfile and socket (in the host's
    /// private /run: the agent finds it at the usual /var/run/docker.sock),
    /// configuration file, bridge subnet and cgroup parent. A second socket
    /// in the temporary directory lets tests on the machine inspect it.
    fn start_dockerd(&mut self) -> Result<()> {
        let d = self.dir.path().to_path_buf();
        fs::create_dir_all(d.join("docker"))?;
        // dockerd 20.10 writes its identity key to /etc/docker/key.json
        // unless told otherwise; this keeps it (and every setting) private.
        fs::write(
            d.join("daemon.json"),
            serde_json::json!({"deprecated-key-path": d.join("docker-key.json")}).to_string(),
        )?;
        let n = self.slot.n;
        let dockerd = self
            .command_inside("dockerd")
            .arg("--data-root")
            .arg(d.join("docker"))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .args([
                "--exec-root",
                "/run/docker",
                "--pidfile",
                "/run/docker.pid",
                "--bip",
                &format!("172.30.{n}.1/24"),
                "--cgroup-parent",
                &format!("/{}", cgroup_name(n)),
                "--shutdown-timeout",
                "2",
                "-H",
                "unix:///run/docker.sock",
                "-H",
            ])
            .arg(format!("unix://{}", self.docker_socket().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("dockerd.log"))?)
            .spawn()
            .context("cannot start dockerd (tests/run.sh installs docker.io)")?;
        self.dockerd = Some(dockerd);
        self.wait_for("its Docker engine", Duration::from_secs(60), |h| {
            Ok(h.docker_command(&["version", "--format", "{{.Server.Version}}"]).output()?.status.success())
        })
    }

    /// The host's Docker engine socket, as this machine reaches it.
    pub fn docker_socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// The docker CLI, set to talk to this host's engine, with `args`.
    pub fn docker_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.docker_socket().display()))
            .env("DOCKER_CONFIG", self.dir.path().join("docker-cli"))
            .stdin(Stdio::null());
        cmd
    }

    /// The `docker` CLI against this host's engine (tests only inspect and
    /// poke with it; mlopsctl never runs it). Fails with the CLI's stderr
    /// when the command fails.
    pub fn docker_result(&self, args: &[&str]) -> Result<String> {
        ensure!(self.dockerd.is_some(), "test host {} has no Docker engine (HostOptions::docker)", self.name);
        let out = self.docker_command(args).output().context("cannot run the docker CLI")?;
        ensure!(
            out.status.success(),
            "docker {} on test host {} failed ({}): {}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// [`TestHost::docker_result`], panicking on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        self.docker_result(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Puts `tags` (built on this host) into the run's image depot, unless
    /// it holds them already: one `docker save` of all of them, so their
    /// shared layers are written once. See [`image_depot`].
    pub fn deposit_images(&self, set: &str, tags: &[&str]) -> Result<()> {
        let Some(depot) = image_depot() else { return Ok(()) };
        let file = depot.join(format!("{set}.tar"));
        if file.exists() {
            return Ok(());
        }
        fs::create_dir_all(&depot)?;
        let partial = depot.join(format!(".{set}.tar.{}", std::process::id()));
        let out = self
            .docker_command(&[&["save", "-o", partial.to_str().context("depot path")?], tags].concat())
            .output()
            .context("cannot run the docker CLI")?;
        if !out.status.success() {
            let _ = fs::remove_file(&partial);
            bail!("docker save {} on {}: {}", tags.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        // Whole or not at all: a run killed mid-save leaves no set.
        fs::rename(&partial, &file)?;
        Ok(())
    }

    /// Loads image set `set` from the run's depot into this host's engine;
    /// false when the depot has no such set (the deploy then builds).
    pub fn stock_images(&self, set: &str) -> Result<bool> {
        let Some(file) = image_depot().map(|d| d.join(format!("{set}.tar"))).filter(|f| f.exists()) else {
            return Ok(false);
        };
        self.docker_result(&["load", "-q", "-i", file.to_str().context("depot path")?])?;
        Ok(true)
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

    /// A file of this host's private agent directories, as the machine
    /// reaches it (`path` is one of the agent directories, as the host sees it).
    pub fn path(&self, path: &str) -> PathBuf {
        self.dir.path().join("root").join(path.trim_start_matches('/'))
    }

    /// Runs a shell command inside the host's namespaces, as the host's
    /// processes see things.
    pub fn exec(&self, script: &str) -> Result<Output> {
        run(self.command_inside("sh").arg("-c").arg(script))
    }

    /// A shell command as the host's unprivileged user ([`LOCAL_USER`]);
    /// its output whatever its exit status (attacks are expected to fail).
    pub fn exec_as_local_user(&self, script: &str) -> Output {
        self.command_inside("runuser")
            .args(["-u", LOCAL_USER, "--", "sh", "-c", script])
            .output()
            .expect("runuser runs (util-linux)")
    }

    /// HTTP from inside the host (its loopback, where the platform publishes
    /// its UIs): `curl` with `args`; the status code and the body.
    pub fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = self
            .command_inside("curl")
            .args(["-s", "-m", "20", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl runs (tests/run.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse().unwrap_or(0), body.to_string())
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

    pub fn dockerd_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Containers first (by their cgroup: fast, and certain even if the
        // engine is stuck), then the engine, which then has nothing to stop.
        if let Some(mut dockerd) = self.dockerd.take() {
            kill_cgroup(&cgroup_name(self.slot.n));
            // SAFETY: plain kill(2) on our own child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(dockerd.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while dockerd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = dockerd.kill();
            let _ = dockerd.wait();
        }
        self.stop_sshd();
        // Agents started over SSH (and containerd) live on in the
        // namespace; end them, and the namespace holder with them.
        kill_netns(&self.netns);
        let _ = self.anchor.kill();
        let _ = self.anchor.wait();
        // The namespaces (and the mounts on the data root) go only when the
        // last process in them has: wait for that before anything is removed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pids().is_empty() && Instant::now() < deadline {
            kill_netns(&self.netns);
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_cgroup(&cgroup_name(self.slot.n));
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
    /// How long one `mlopsctl` run may take before [`Self::ctl`] kills it
    /// and fails (10 minutes unless a test that deploys the platform, or
    /// works in VMs, gives itself more).
    pub ctl_deadline: Duration,
}

/// A target for commands expected to fail before they reach any host:
/// a loopback port where nothing listens, so that even if one went further
/// it would reach nothing.
pub const NO_HOST: &str = "root@127.0.0.1:1";

/// Runs `cmd` to its end with its output captured, or kills it once
/// `deadline` has passed: then its exit code is -1 and its stderr ends
/// with a line that says so. A command that hangs fails its own test
/// instead of holding the whole suite until CI's limit (CI once lost a run
/// to a `status` that waited 80 minutes).
pub fn output_within(cmd: &mut Command, deadline: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the command starts");
    // Read both pipes while waiting: a child that fills one would block.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let (status, killed) = loop {
        if let Some(status) = child.try_wait().expect("the command can be waited for") {
            break (status, false);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            break (child.wait().expect("the killed command is reaped"), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = stderr.join().unwrap_or_default();
    if killed {
        let line = format!("\n[the test harness killed this command after {} s: it hung]\n", deadline.as_secs());
        stderr.extend_from_slice(line.as_bytes());
    }
    Output { status, stdout, stderr }
}

/// What a run of `mlopsctl` produced.
#[derive(Debug)]
pub struct CtlRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CtlRun {
    fn from(out: Output) -> Self {
        CtlRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
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
            ctl_deadline: Duration::from_secs(10 * 60),
        })
    }

    /// Starts a host that trusts this environment's key for root and the
    /// sudo users, and records its host key in known_hosts.
    pub fn host(&self, name: &str) -> Result<TestHost> {
        let host = TestHost::start(name)?;
        self.trust(&host)?;
        Ok(host)
    }

    /// [`TestEnv::host`] with the host's own Docker engine.
    pub fn docker_host(&self, name: &str) -> Result<TestHost> {
        let host = TestHost::with_docker(name)?;
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

    /// Runs `mlopsctl` on this machine. Without `--host` or `-i` it would
    /// act on this machine itself, so every call must name a target (a test
    /// host, or a loopback port where nothing listens for commands expected
    /// to stop first); commands that act on "this machine" run inside a
    /// test host instead (see `cli.rs`).
    pub fn ctl_with(&self, args: &[&str], env: &[(&str, &str)]) -> CtlRun {
        let mut cmd = self.ctl_command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        CtlRun::from(output_within(&mut cmd, self.ctl_deadline))
    }

    /// Runs `mlopsctl` as [`Self::ctl`] does with `input` on its standard
    /// input (a file: what a person pipes in, e.g. a password).
    pub fn ctl_input(&self, args: &[&str], input: &str) -> CtlRun {
        let mut cmd = self.ctl_command(args);
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        fs::write(file.path(), input).expect("the input is written");
        cmd.stdin(fs::File::open(file.path()).expect("the input opens"));
        CtlRun::from(output_within(&mut cmd, self.ctl_deadline))
    }

    /// Runs `mlopsctl` as [`Self::ctl`] does, but on a terminal, as a
    /// person would (a pseudo-terminal from util-linux's `script`): what the
    /// terminal showed, stderr and stdout together, is in `stdout`.
    pub fn ctl_on_terminal(&self, args: &[&str]) -> CtlRun {
        let inner = self.ctl_command(args);
        let quote = |a: &std::ffi::OsStr| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''"));
        let line: Vec<String> = std::iter::once(inner.get_program()).chain(inner.get_args()).map(quote).collect();
        let mut cmd = Command::new("script");
        // -e: its exit code is mlopsctl's; -f: nothing held back; the
        // transcript file is not wanted (stdout has it all).
        cmd.args(["-q", "-e", "-f", "-c", &line.join(" "), "/dev/null"]).env_clear().stdin(Stdio::null());
        for (k, v) in inner.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.env("TERM", "xterm-256color");
        CtlRun::from(output_within(&mut cmd, self.ctl_deadline))
    }

    /// The `mlopsctl` command [`Self::ctl`] runs, to spawn it (a test that
    /// kills it mid-way); the same rule on naming a target holds.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let targeted = args.iter().any(|a| matches!(*a, "--host" | "-i" | "--inventory"))
            || args.iter().any(|a| a.starts_with("--host=") || a.starts_with("--inventory="));
        let informational = args.iter().any(|a| matches!(*a, "--help" | "-h" | "--version" | "-V"));
        assert!(
            targeted || informational,
            "mlopsctl {args:?} names no host, so it would act on this machine; pass --host (e.g. {NO_HOST})"
        );
        let mut cmd = Command::new(&self.mlopsctl);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("USER", "root")
            .env("MLOPS_STATE_DIR", &self.state)
            .env("MLOPS_AGENT_BINARY", &self.agent)
            // Never this machine's engine as a source of images: a test
            // that wants one names a test host's (`ctl_with`).
            .env("DOCKER_HOST", format!("unix://{}/no-docker-engine.sock", self.home.display()))
            .stdin(Stdio::null());
        if let Some(exporter) = &self.exporter {
            cmd.env("MLOPS_AIRFLOW_EXPORTER_BINARY", exporter);
        }
        cmd
    }

    /// `mlopsctl deploy` of `stack` to `hosts` (as root, JSON output, a
    /// 60 s health timeout), plus `extra` flags.
    pub fn deploy_stack(&self, hosts: &[&TestHost], stack: &TestStack, extra: &[&str]) -> CtlRun {
        let key = self.key.display().to_string();
        let dir = stack.path().display().to_string();
        let mut args =
            vec!["deploy", "--identity", &key, "--stack", &dir, "--health-timeout", "60", "--output", "json"];
        let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
        for s in &specs {
            args.extend(["--host", s.as_str()]);
        }
        args.extend(extra);
        self.ctl(&args)
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
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
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

/// A stack directory for tests: `img/` builds a tiny image (static busybox
/// on `scratch`: no registry, no base image needed), `compose.yaml` is the
/// caller's. Its containers live on a test host's own engine and go with it.
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
}

/// The agent binary run directly on a loopback port with certificates from
/// `ca`, without SSH: for RPC-level tests. Its state is a temporary
/// directory; its Docker socket is a path where no engine answers unless
/// one is given (a test host's: [`TestHost::docker_socket`]).
pub struct LocalAgent {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub state: PathBuf,
    /// The socket the agent uses for Docker.
    pub docker_socket: PathBuf,
    _dir: TempDir,
}

impl LocalAgent {
    /// An agent with no Docker engine.
    pub fn start(agent: &Path, ca: &mlops_pki::Ca) -> Result<LocalAgent> {
        Self::start_with(agent, ca, None)
    }

    /// An agent driving the engine at `docker_socket` (None: no engine).
    pub fn start_with(agent: &Path, ca: &mlops_pki::Ca, docker_socket: Option<&Path>) -> Result<LocalAgent> {
        let dir = tempfile::tempdir()?;
        let tls = dir.path().join("tls");
        fs::create_dir(&tls)?;
        // `Transport::local()` reaches "localhost" (the local target's name).
        let id = ca.server_identity("localhost")?;
        fs::write(tls.join("ca.pem"), ca.cert_pem())?;
        fs::write(tls.join("server.pem"), &id.cert_pem)?;
        fs::write(tls.join("server.key"), &id.key_pem)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = dir.path().join("agent.log");
        let state = dir.path().join("state");
        let docker_socket = docker_socket.map_or_else(|| dir.path().join("no-engine/docker.sock"), Path::to_path_buf);
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
            .arg("--docker-socket")
            .arg(&docker_socket)
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
        Ok(LocalAgent { child, port, log, state, docker_socket, _dir: dir })
    }

    /// The agent's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
