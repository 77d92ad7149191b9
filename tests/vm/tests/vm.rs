//! The VM tier: real Debian VMs (Vagrant, libvirt, QEMU) with systemd and
//! no Docker, a stateful stack on them, and the move from one to the other.
//!
//! `vm1` (Debian 12, bare) gets the agent as a systemd unit and Docker from
//! apt, both by `mlopsctl deploy`; the unit brings the agent back after
//! `kill -9`; another agent build replaces it in place. Rows written through the
//! stack's service then move with `mlopsctl migrate` to `vm2` (Debian 11:
//! glibc 2.31, so only the static agent runs there; Docker from its box, used
//! as it is: a second apt install under emulation would add minutes and
//! test nothing new), first interrupted by
//! killing the controller during the transfer, then re-run to success; the
//! rows are served on `vm2` and `vm1` is left stopped with its volume. The
//! agent is then uninstalled from both (the stack runs on). The move back
//! with `--decommission` is left to the namespace tier (tests/migrate.rs):
//! under emulation it took 19 minutes of a CI run that must stay short.
//!
//! The stack's one image (PostgreSQL 15 and busybox, from debootstrap) is
//! made on a namespace test host's engine and shipped to the VMs over the
//! agent channel, as a user's locally built image is. Each step's time is
//! printed (`vm-time:` lines) for the tier's time report.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mlops_e2e::vagrant::VmTier;
use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack, bins, release_static_agent};

const IMAGE: &str = "mlops-vmstack:1";

/// `db` is PostgreSQL with its data in a volume; `app` serves the rows
/// over HTTP (busybox httpd, CGI through psql) and writes them.
const STACK: &str = r#"
name: "{project}"
services:
  db:
    image: mlops-vmstack:1
    user: postgres
    environment:
      PGDATA: /var/lib/postgresql/data/pg
    command:
      - sh
      - -c
      - >-
        test -s "$$PGDATA/PG_VERSION" || { initdb -D "$$PGDATA" -U postgres --auth=trust >/dev/null &&
        echo 'host all all all trust' >> "$$PGDATA/pg_hba.conf"; };
        exec postgres -D "$$PGDATA" -c listen_addresses='*' -c jit=off
    volumes: ["pgdata:/var/lib/postgresql/data"]
    healthcheck:
      test: ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", "postgres"]
      interval: 2s
      retries: 90
  app:
    image: mlops-vmstack:1
    command: ["busybox", "httpd", "-f", "-p", "8080", "-h", "/srv"]
    ports: ["${MLOPS_BIND_ADDRESS:-127.0.0.1}:18480:8080"]
    depends_on:
      db: {condition: service_healthy}
    healthcheck:
      test: ["CMD", "busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/cgi-bin/rows"]
      interval: 2s
      retries: 90
volumes:
  pgdata: {}
x-mlops:
  migrate:
    database:
      service: db
      volume: pgdata
      user: postgres
      database: postgres
      verify:
        items: SELECT md5(coalesce(string_agg(id || ':' || body, ',' ORDER BY id), '')) FROM public.items
"#;

/// The CGI scripts `app` serves: `add?N` inserts N rows, `rows` prints
/// the count and a checksum over all of them.
const CGI_ADD: &str = r#"#!/bin/sh
n=${QUERY_STRING:-1}
case "$n" in *[!0-9]*) n=1 ;; esac
echo "Content-Type: text/plain"; echo
psql -h db -U postgres -qAt -v ON_ERROR_STOP=1 -c "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, body text NOT NULL)" \
  -c "INSERT INTO items (body) SELECT md5(random()::text) || repeat('x', 100) FROM generate_series(1, $n)" 2>&1
"#;
const CGI_ROWS: &str = r#"#!/bin/sh
echo "Content-Type: text/plain"; echo
psql -h db -U postgres -qAt -c "SELECT count(*) || ' ' || md5(coalesce(string_agg(id || ':' || body, ',' ORDER BY id), '')) FROM items" 2>&1
"#;

/// Each step's time: printed, and kept in `target/tmp/vm-tier-times.txt`,
/// which `tests/run.sh` prints after the suite (a passing test's output is
/// captured).
fn step(name: &str, since: Instant) {
    record(&format!("vm-time: {name}: {:.0} s", since.elapsed().as_secs_f64()));
}

fn record(line: &str) {
    mlops_e2e::record_line(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-tier-times.txt"), line);
}

/// The stack's image, made on `build`'s engine: a debootstrap tree with
/// PostgreSQL 15 and busybox, imported. Left out to keep it small (it is
/// shipped between emulated VMs, at a few hundred KiB/s): LLVM (used only by
/// PostgreSQL's JIT), the cluster the package made, Perl, glibc's locale
/// sources and iconv modules, docs and dpkg's records.
fn make_image(build: &TestHost) {
    let dir = tempfile::Builder::new().prefix("mlops-vmstack-").tempdir().unwrap();
    let root = dir.path().join("root");
    let mirror = mlops_e2e::vagrant::debian_mirror();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=postgresql-15,busybox-static", "bookworm"])
        .arg(&root)
        .arg(&mirror)
        .output()
        .unwrap();
    assert!(out.status.success(), "debootstrap: {}", String::from_utf8_lossy(&out.stdout));
    let script = format!(
        "set -e; cd {root}; rm -rf usr/lib/llvm-* usr/lib/x86_64-linux-gnu/libLLVM* usr/lib/x86_64-linux-gnu/libz3.so* \
         usr/lib/postgresql/15/lib/llvmjit* usr/lib/postgresql/15/lib/bitcode usr/share/doc usr/share/man usr/share/locale var/cache/apt/* var/lib/apt/lists/* \
         var/lib/postgresql/15 etc/postgresql usr/share/i18n usr/share/perl usr/lib/x86_64-linux-gnu/perl usr/lib/x86_64-linux-gnu/gconv \
         usr/lib/x86_64-linux-gnu/libperl.so* var/lib/dpkg/info var/cache/debconf; \
         mkdir -p srv/cgi-bin var/lib/postgresql/data; chroot . chown postgres:postgres var/lib/postgresql/data; \
         chmod 755 srv/cgi-bin",
        root = root.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (name, text) in [("add", CGI_ADD), ("rows", CGI_ROWS)] {
        let p = root.join("srv/cgi-bin").join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let mut tar = Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
    let out = Command::new("docker")
        .env("DOCKER_HOST", format!("unix://{}", build.docker_socket().display()))
        .env("DOCKER_CONFIG", dir.path().join("cli"))
        .args([
            "import",
            "-c",
            "ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ])
        .args(["-c", "ENV LANG=C.UTF-8", "-", IMAGE])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the image tree failed");
    assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
    record(&format!(
        "vm-image: {}",
        build.docker(&["image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}", IMAGE])
    ));
}

struct Tier<'a> {
    env: &'a TestEnv,
    vms: &'a VmTier,
    inventory: String,
    stack: String,
    docker_host: String,
}

impl Tier<'_> {
    fn ctl(&self, args: &[&str], agent: &Path) -> CtlRun {
        self.env.ctl_with(&self.args(args), &self.envs(agent))
    }

    /// A command without a stack (`agent uninstall`).
    fn ctl_hosts(&self, args: &[&str], agent: &Path) -> CtlRun {
        let mut all = vec!["--identity", self.env.key.to_str().unwrap(), "-i", &self.inventory];
        all.extend_from_slice(args);
        self.env.ctl_with(&all, &self.envs(agent))
    }

    fn args<'b>(&'b self, args: &[&'b str]) -> Vec<&'b str> {
        let mut all = vec!["--identity", self.env.key.to_str().unwrap(), "-i", &self.inventory];
        all.extend_from_slice(args);
        all.extend(["--stack", &self.stack]);
        all
    }

    fn envs<'b>(&'b self, agent: &'b Path) -> Vec<(&'b str, &'b str)> {
        vec![("MLOPS_AGENT_BINARY", agent.to_str().unwrap()), ("DOCKER_HOST", &self.docker_host)]
    }

    /// `script` on `vm` as `vagrant`: its stdout, or a panic with stderr.
    fn on(&self, vm: &str, script: &str) -> String {
        let out = self.vms.ssh(vm, &self.env.key, &self.env.known_hosts, script);
        assert!(
            out.status.success(),
            "on {vm}: {script}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn http(&self, vm: &str, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "120"])
            .arg(format!("http://{}:18480{path}", self.vms.address(vm)))
            .output()
            .unwrap();
        assert!(out.status.success(), "GET {path} on {vm}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The project's containers on `vm`: `service state` lines, sorted.
    fn containers(&self, vm: &str, project: &str) -> String {
        self.on(
            vm,
            &format!(
                "sudo docker ps -a --filter label=mlops.project={project} --format '{{{{.Label \"mlops.service\"}}}} {{{{.State}}}}' | sort"
            ),
        )
    }

    fn agent_pid(&self, vm: &str) -> String {
        self.on(vm, "sudo systemctl show -p MainPID --value mlops-agent.service")
    }
}

#[test]
fn a_stack_moves_between_real_vms_with_its_rows() {
    let started = Instant::now();
    let _ = std::fs::remove_file(Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-tier-times.txt"));
    let b = bins();
    // The VMs come up while the image is made and the agent built.
    // (Scoped: if this thread panics first, the VMs' thread is still
    // joined and the tier it made dropped, which removes the VMs.)
    let (env, build, agent, vms) = std::thread::scope(|scope| {
        let vms = scope.spawn(|| VmTier::start(&b.workspace));
        let mut env = TestEnv::new().unwrap();
        // Under emulation a deploy installs Docker with apt and ships images slowly.
        env.ctl_deadline = std::time::Duration::from_secs(40 * 60);
        let build = env.docker_host("vmbuild").unwrap();
        let t = Instant::now();
        make_image(&build);
        step("the stack's image (debootstrap, import)", t);
        let agent = release_static_agent().to_path_buf();
        (env, build, agent, vms.join().unwrap().unwrap())
    });
    for (what, secs) in &vms.timings {
        record(&format!("vm-time: {what}: {secs:.0} s"));
    }
    step("ready (boxes, VMs, image, agent)", started);

    for vm in ["vm1", "vm2"] {
        let line = vms.admit(vm, &env.public_key).unwrap();
        env.add_known_host(&line).unwrap();
    }
    let stack = TestStack::new(STACK).unwrap();
    let project = stack.project.clone();
    let inventory_text = format!(
        "# The VM tier's hosts.\nall:\n  vars:\n    ansible_user: vagrant\n  hosts:\n    vm1:\n      ansible_host: {}\n    vm2:\n      ansible_host: {}\n",
        vms.address("vm1"),
        vms.address("vm2")
    );
    let inventory = env.write("inventory.yml", &inventory_text).unwrap();
    let tier = Tier {
        env: &env,
        vms: &vms,
        inventory: inventory.display().to_string(),
        stack: stack.path().display().to_string(),
        docker_host: format!("unix://{}", build.docker_socket().display()),
    };
    let glibc = tier.on("vm2", "ldd --version | head -1");
    assert!(glibc.ends_with("2.31"), "vm2 is Debian 11: {glibc}");

    // vm2's glibc is older than the dynamically linked agent needs: refused
    // before anything is installed, with a hint.
    let refused = tier.ctl(&["deploy", "--limit", "vm2"], &b.agent).expect_code(1);
    assert!(refused.stderr.contains("glibc") && refused.stderr.contains("hint:"), "{}", refused.stderr);
    assert_eq!(tier.on("vm2", "test -e /usr/local/lib/mlops-agent/mlops-agent && echo yes || echo no"), "no");
    assert_eq!(tier.on("vm1", "test -e /usr/sbin/dockerd && echo yes || echo no"), "no", "vm1's box has no Docker");
    assert_eq!(tier.on("vm2", "sudo systemctl is-active docker.service"), "active", "vm2's box runs Docker");

    // 1. Deploy to vm1, bare: the agent as a systemd unit, Docker from apt,
    // the image shipped over the agent channel.
    let t = Instant::now();
    let run = tier.ctl(&["deploy", "--limit", "vm1", "--expose", "--health-timeout", "600"], &agent).expect_code(0);
    step("deploy to bare vm1 (Docker from apt, image shipped)", t);
    assert!(run.stderr.contains("installing docker.io"), "{}", run.stderr);
    assert!(run.stderr.contains("mlops-vmstack:1: shipped from"), "{}", run.stderr);
    assert_eq!(tier.on("vm1", "sudo systemctl is-active mlops-agent.service"), "active");
    assert_eq!(tier.on("vm1", "sudo systemctl is-enabled mlops-agent.service"), "enabled");
    assert_eq!(tier.on("vm1", "dpkg-query -W -f '${Status}' docker.io"), "install ok installed");
    assert_eq!(tier.containers("vm1", &project), "app running\ndb running");

    // 2. systemd brings the agent back after kill -9.
    let pid = tier.agent_pid("vm1");
    tier.on("vm1", &format!("sudo kill -9 {pid}"));
    vms.wait("systemd restarts the agent", Duration::from_secs(60), || {
        let now = tier.agent_pid("vm1");
        now != pid && now != "0" && tier.on("vm1", "sudo systemctl is-active mlops-agent.service || true") == "active"
    })
    .unwrap();
    tier.ctl(&["status", "--limit", "vm1"], &agent).expect_code(0);

    // 3. Another agent build (this machine's dynamically linked debug one:
    // vm1's glibc is new enough) replaces it in place; the migration below
    // puts the release build back the same way.
    let hash = |vm: &str| tier.on(vm, "sudo sha256sum /usr/local/lib/mlops-agent/mlops-agent | cut -c1-64");
    assert_eq!(hash("vm1"), mlops_e2e::sha256_file(&agent).unwrap());
    let t = Instant::now();
    let run = tier.ctl(&["deploy", "--limit", "vm1", "--expose", "--health-timeout", "600"], &b.agent).expect_code(0);
    step("agent upgraded in place", t);
    assert_eq!(hash("vm1"), mlops_e2e::sha256_file(&b.agent).unwrap(), "{}", run.stderr);
    assert_eq!(tier.on("vm1", "sudo systemctl is-active mlops-agent.service"), "active");
    assert_eq!(tier.containers("vm1", &project), "app running\ndb running", "the stack kept running");

    // 4. Rows, written through the service.
    for _ in 0..4 {
        tier.http("vm1", "/cgi-bin/add?50000");
    }
    let rows = tier.http("vm1", "/cgi-bin/rows");
    assert!(rows.starts_with("200000 "), "{rows}");

    // 5. The move, interrupted: the controller is killed during the transfer.
    let t = Instant::now();
    let migrate =
        ["migrate", "--from", "vm1", "--to", "vm2", "--expose", "--health-timeout", "600", "--stop-timeout", "10"];
    let mut cmd = env.ctl_command(&tier.args(&migrate));
    for (k, v) in tier.envs(&agent) {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        if stderr.read_line(&mut l).unwrap() == 0 {
            panic!("the migration ended before its transfer:\n{seen}");
        }
        seen.push_str(&l);
        if l.contains("dumping database") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    step("migrate vm1 → vm2, until killed during the transfer", t);
    assert!(env.state.join("migrations").join(format!("{project}.json")).exists(), "{seen}");
    // A stays stopped (its database runs only to be dumped).
    assert!(tier.containers("vm1", &project).starts_with("app exited\n"), "{seen}");

    // 6. Re-run: it resumes and finishes.
    let t = Instant::now();
    let run = tier.ctl(&migrate, &agent);
    let run = run.expect_code(0);
    step("migrate vm1 → vm2, re-run to success", t);
    assert!(run.stderr.contains("resuming the migration"), "{}", run.stderr);
    assert_eq!(tier.http("vm2", "/cgi-bin/rows"), rows, "every row arrived and vm2 serves it");
    assert!(seen.contains("vm2") && !seen.contains("installing docker.io"), "vm2's own engine was used:\n{seen}");
    // The image vm2 lacked came from the controller machine's engine (it
    // has the very image vm1 runs), not from a save on vm1.
    assert!(seen.contains("mlops-vmstack:1: shipped from this machine's Docker engine"), "{seen}");
    assert_eq!(tier.on("vm2", "sudo systemctl is-active mlops-agent.service"), "active");
    // vm1 is stopped, with its volume.
    assert_eq!(tier.containers("vm1", &project), "app exited\ndb exited");
    assert_eq!(tier.on("vm1", &format!("sudo docker volume ls -q | grep -c '^{project}_pgdata$' || true")), "1");
    // Both are inventory hosts: the inventory is left as it is, and the
    // change to make is printed.
    assert_eq!(std::fs::read_to_string(&inventory).unwrap(), inventory_text);
    assert!(run.stdout.contains("stack now served by vm2"), "{}", run.stdout);

    // 7. Uninstalled from both: the units and the binaries go; the stack
    // runs on on vm2, vm1 keeps its stopped copy. (The move back with
    // --decommission, 19 minutes under emulation, is the namespace tier's:
    // tests/tests/migrate.rs; its agent removal is this uninstall.)
    let t = Instant::now();
    let run = tier.ctl_hosts(&["agent", "uninstall"], &agent);
    run.expect_code(0);
    step("agent uninstalled from both", t);
    for vm in ["vm1", "vm2"] {
        assert_eq!(tier.on(vm, "sudo systemctl cat mlops-agent.service >/dev/null 2>&1 && echo yes || echo no"), "no");
        assert_eq!(tier.on(vm, "pgrep -x mlops-agent >/dev/null && echo yes || echo no"), "no");
        assert_eq!(tier.on(vm, "test -e /usr/local/lib/mlops-agent/mlops-agent && echo yes || echo no"), "no");
    }
    assert_eq!(tier.containers("vm2", &project), "app running\ndb running");
    assert_eq!(tier.http("vm2", "/cgi-bin/rows"), rows);
    assert_eq!(tier.containers("vm1", &project), "app exited\ndb exited");
    step("the whole VM tier", started);
}
