//! `mlopsctl migrate`: a stack and its volume data move from one test host
//! to another (each with its own sshd and Docker engine, the real agent and
//! CLI); the old host is kept stopped and intact; a migration killed
//! during the transfer is finished by running it again; a new host that
//! fails at the switch gets the old one started again; a database restore
//! cut short is done again.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

/// `db` keeps its data in a volume and counts its starts there; `web`
/// depends on it being healthy and publishes a port (on loopback).
const STACK: &str = r#"
name: "{project}"
services:
  db:
    build: ./img
    command: ["sh", "-c", "echo start >> /data/boots; trap 'exit 0' TERM; sleep 3600 & wait"]
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "test", "-f", "/data/boots"]
      interval: 1s
      retries: 30
  web:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; httpd -f -p 8080 & wait"]
    ports: ["127.0.0.1:18380:8080"]
    depends_on:
      db: {condition: service_healthy}
volumes:
  data: {}
"#;

fn container(host: &TestHost, project: &str, service: &str) -> String {
    let filter = |k: &str, v: &str| format!("label=mlops.{k}={v}");
    host.docker(&["ps", "-aq", "--filter", &filter("project", project), "--filter", &filter("service", service)])
        .trim()
        .to_string()
}

fn state(host: &TestHost, id: &str) -> String {
    host.docker(&["inspect", "-f", "{{.State.Status}}", id])
}

/// Every file of the volume as `db` sees it: path, owner, mode, link
/// target or sha256 (the same listing on both hosts means the same data).
fn listing(host: &TestHost, project: &str) -> String {
    let db = container(host, project, "db");
    let script = "cd /data && find . ! -name boots | sort | while read -r f; do \
        if [ -L \"$f\" ]; then echo \"$f link $(readlink \"$f\")\"; \
        elif [ -d \"$f\" ]; then echo \"$f dir $(stat -c '%u:%g %a' \"$f\")\"; \
        else echo \"$f $(stat -c '%u:%g %a' \"$f\") $(sha256sum < \"$f\" | cut -c1-64)\"; fi; done";
    host.docker(&["exec", &db, "sh", "-c", script])
}

/// Fills A's volume: rows, owners, modes, a link, a directory, and
/// `megabytes` of data that does not compress.
fn fill(host: &TestHost, project: &str, megabytes: u32) {
    let db = container(host, project, "db");
    let script = format!(
        "set -e; cd /data; for i in $(seq 1 1000); do echo row-$i; done > rows; \
         mkdir -p deep/er; chmod 0750 deep; chown 1234:4321 deep; \
         echo secret > deep/er/key; chmod 0600 deep/er/key; chown 999:999 deep/er/key; \
         ln -sf ../rows deep/link; ln -sf /etc/passwd outside-link; \
         head -c $(({megabytes} * 1048576)) /dev/urandom > blob"
    );
    host.docker(&["exec", &db, "sh", "-c", &script]);
}

fn migrate_args(env: &TestEnv, stack: &TestStack, a: &str, b: &str) -> Vec<String> {
    [
        "migrate",
        "--identity",
        &env.key.display().to_string(),
        "--stack",
        &stack.path().display().to_string(),
        "--host",
        a,
        "--host",
        b,
        "--from",
        a,
        "--to",
        b,
        "--health-timeout",
        "60",
        "--stop-timeout",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn migrate(env: &TestEnv, stack: &TestStack, a: &TestHost, b: &TestHost, extra: &[&str]) -> CtlRun {
    let (sa, sb) = (a.spec("root"), b.spec("root"));
    let mut args = migrate_args(env, stack, &sa, &sb);
    args.extend(extra.iter().map(|s| s.to_string()));
    env.ctl(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs a migration and, once its stderr shows `line`, calls `then`;
/// returns the run.
fn migrate_until(
    env: &TestEnv,
    stack: &TestStack,
    a: &TestHost,
    b: &TestHost,
    line: &str,
    then: impl FnOnce(&mut std::process::Child),
) -> (Option<i32>, String) {
    let (sa, sb) = (a.spec("root"), b.spec("root"));
    let args = migrate_args(env, stack, &sa, &sb);
    let mut child = env
        .ctl_command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut l = String::new();
        if stderr.read_line(&mut l).unwrap() == 0 || Instant::now() > deadline {
            panic!("`{line}` never came:\n{seen}");
        }
        seen.push_str(&l);
        if l.contains(line) {
            break;
        }
    }
    then(&mut child);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    seen.push_str(&rest);
    (child.wait().unwrap().code(), seen)
}

#[test]
fn a_stack_moves_with_its_volume_data_and_the_old_host_is_kept_stopped() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("mig-a").unwrap(), env.docker_host("mig-b").unwrap());
    let stack = TestStack::new(STACK).unwrap();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    fill(&a, &project, 24);
    let before = listing(&a, &project);
    assert!(before.contains("./deep/er/key 999:999 600") && before.contains("./deep dir 1234:4321 750"), "{before}");

    // A dry run changes nothing.
    let dry = migrate(&env, &stack, &a, &b, &["--dry-run"]).expect_code(0);
    assert!(dry.stdout.contains("transfer: move volume(s)"), "{}", dry.stdout);
    // Sizes, read on A: the 24 MB of data in the volume, and an estimate.
    let size: f64 = dry
        .stdout
        .split(&format!("{project}_data ("))
        .nth(1)
        .and_then(|r| r.split(" MB)").next())
        .map_or(0.0, |n| n.parse().unwrap_or(0.0));
    assert!((25.0..27.0).contains(&size), "{}", dry.stdout);
    assert!(dry.stdout.contains("estimate:") && dry.stdout.contains("to move: about"), "{}", dry.stdout);
    assert_eq!(state(&a, &container(&a, &project, "db")), "running");
    assert!(b.docker(&["ps", "-aq"]).is_empty(), "nothing on b after a dry run");

    let run = migrate(&env, &stack, &a, &b, &["--output", "json"]).expect_code(0);
    let json = run.json();
    let result = &json["result"];
    let steps: Vec<&str> = result["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["inspect", "deploy", "quiesce", "transfer", "verify", "switch"], "{json:#}");
    let volume = &result["volumes"][0];
    assert_eq!(volume["volume"], format!("{project}_data"));
    assert!(volume["bytes"].as_u64().unwrap() > 24 << 20, "{volume:#}");
    assert!(result["downtime_ms"].as_u64().unwrap() > 0);
    assert!(result["inventory"].as_str().unwrap().contains(&b.spec("root")), "{json:#}");

    // B serves the same data, owners, modes and links; its db started
    // once more on it (its own first start went with its empty volume).
    assert_eq!(listing(&b, &project), before);
    let boots = |h: &TestHost| h.docker(&["exec", &container(h, &project, "db"), "cat", "/data/boots"]);
    assert_eq!(boots(&b).lines().count(), 2, "A's start and B's: {}", boots(&b));
    for service in ["db", "web"] {
        assert_eq!(state(&b, &container(&b, &project, service)), "running", "{service} on b");
        // A's containers are stopped, not removed.
        assert_eq!(state(&a, &container(&a, &project, service)), "exited", "{service} on a");
    }
    // A's volume still holds its data.
    let kept = a.docker(&["cp", &format!("{}:/data/rows", container(&a, &project, "db")), "-"]);
    assert!(kept.contains("row-1000"), "A keeps its data");
    assert!(!env.state.join("migrations").join(format!("{project}.json")).exists(), "no record left");

    // Moving it again would put A's old data over B's: refused.
    let again = migrate(&env, &stack, &a, &b, &[]).expect_code(2);
    assert!(again.stderr.contains("runs no service on") && again.stderr.contains("hint:"), "{}", again.stderr);

    // Back to A, which is then decommissioned... from B's side: B's stack
    // moves to A and B loses its stack, volumes and agent.
    let back = migrate(&env, &stack, &b, &a, &["--decommission"]).expect_code(0);
    assert!(back.stderr.contains("decommissioned"), "{}", back.stderr);
    assert_eq!(listing(&a, &project), before);
    assert_eq!(boots(&a).lines().count(), 3, "{}", boots(&a));
    assert!(b.docker(&["ps", "-aq", "--filter", &format!("label=mlops.project={project}")]).is_empty());
    assert!(!b.docker(&["volume", "ls", "-q"]).contains(&project), "B's volumes are gone");
    assert!(!b.path("/usr/local/lib/mlops-agent/mlops-agent").exists(), "B's agent is gone");
    assert!(!b.path("/etc/mlops-agent/tls/server.key").exists());
}

#[test]
fn an_interrupted_migration_is_finished_by_running_it_again() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("mig-c").unwrap(), env.docker_host("mig-d").unwrap());
    let stack = TestStack::new(STACK).unwrap();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    fill(&a, &project, 300);
    let before = listing(&a, &project);

    // Killed while the volume streams.
    let (code, seen) = migrate_until(&env, &stack, &a, &b, "moving volume", |child| {
        std::thread::sleep(Duration::from_millis(700));
        child.kill().unwrap();
    });
    assert_eq!(code, None, "killed:\n{seen}");
    assert!(env.state.join("migrations").join(format!("{project}.json")).exists(), "the record stays");
    assert_eq!(state(&a, &container(&a, &project, "db")), "exited", "A stays stopped: {seen}");

    let run = migrate(&env, &stack, &a, &b, &[]).expect_code(0);
    assert!(run.stderr.contains("resuming the migration"), "{}", run.stderr);
    assert_eq!(listing(&b, &project), before);
    assert_eq!(state(&b, &container(&b, &project, "web")), "running");
    assert_eq!(state(&a, &container(&a, &project, "db")), "exited");
}

#[test]
fn a_new_host_that_fails_at_the_switch_gets_the_old_one_started_again() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("mig-e").unwrap(), env.docker_host("mig-f").unwrap());
    let stack = TestStack::new(STACK).unwrap();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    fill(&a, &project, 200);
    let before = listing(&a, &project);

    // While the volume streams, another process takes B's port for `web`:
    // the switch on B fails.
    let mut squatter = None;
    let (code, seen) = migrate_until(&env, &stack, &a, &b, "moving volume", |_| {
        squatter = Some(
            b.command_inside("python3")
                .args([
                    "-c",
                    "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 18380)); s.listen(); time.sleep(600)",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    });
    if let Some(mut s) = squatter {
        let _ = s.kill();
        let _ = s.wait();
    }
    assert_eq!(code, Some(1), "{seen}");
    assert!(seen.contains("starting stack") && seen.contains("18380"), "{seen}");
    // A runs again, healthy, with its data; nothing is left half-done.
    for service in ["db", "web"] {
        assert_eq!(state(&a, &container(&a, &project, service)), "running", "{service} on a:\n{seen}");
    }
    assert_eq!(listing(&a, &project), before);
    assert!(!env.state.join("migrations").join(format!("{project}.json")).exists());
}

/// A host named by an inventory is pointed at its new machine in place:
/// its `ansible_host` rewritten, every other line (comments included) kept.
#[test]
fn the_inventory_entry_is_pointed_at_the_new_host() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("mig-g").unwrap(), env.docker_host("mig-h").unwrap());
    let stack = TestStack::new(STACK).unwrap();
    let text = format!(
        "# our one box\nall:\n  vars:\n    ansible_user: root\n  hosts:\n    box:   # the old machine\n      ansible_host: {}\n      mlops_note: kept\n",
        a.addr
    );
    let inv = env.write("inventory.yml", &text).unwrap();
    let (key, dir, inv_path) =
        (env.key.display().to_string(), stack.path().display().to_string(), inv.display().to_string());
    let base = ["--identity", key.as_str(), "-i", inv_path.as_str()];
    let stack_arg = ["--stack", dir.as_str()];
    env.ctl(&[&base[..], &["deploy", "--health-timeout", "60"], &stack_arg[..]].concat()).expect_code(0);
    let to = b.spec("root");
    let migrate = ["migrate", "--from", "box", "--to", to.as_str(), "--health-timeout", "60"];
    let run = env.ctl(&[&base[..], &migrate[..], &stack_arg[..]].concat());
    let run = run.expect_code(0);
    assert!(run.stdout.contains("host box now points at"), "{}", run.stdout);
    let edited = std::fs::read_to_string(&inv).unwrap();
    assert_eq!(edited, text.replace(&format!("ansible_host: {}", a.addr), &format!("ansible_host: {}", b.addr)));
    // The inventory now reaches the stack on B.
    let status = env.ctl(&[&base[..], &["status", "--output", "json"], &stack_arg[..]].concat()).expect_code(0).json();
    let services = status["hosts"][0]["services"].as_array().cloned().unwrap_or_default();
    assert!(services.iter().all(|s| s["state"] == "running") && !services.is_empty(), "{status:#}");
    assert_eq!(status["hosts"][0]["address"].as_str().map(|a| a.contains(&b.addr)), Some(true), "{status:#}");
    assert_eq!(state(&b, &container(&b, &stack.project, "db")), "running");
}

/// `db` stands for a PostgreSQL service: its `psql` and `pg_dumpall` are
/// the stand-ins below (FAKE_PSQL, FAKE_DUMPALL), its "database" the file
/// /data/db.sql.
const DB_STACK: &str = r#"
name: "{project}"
services:
  db:
    build: ./img
    command: ["sh", "-c", "touch /data/db.sql; trap 'exit 0' TERM; sleep 3600 & wait"]
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "test", "-f", "/data/db.sql"]
      interval: 1s
      retries: 30
volumes:
  data: {}
x-mlops:
  migrate:
    database: {service: db, volume: data, user: postgres, database: postgres}
"#;

/// A stand-in for `pg_dumpall` (a real PostgreSQL cannot be built for the
/// namespace tiers in their time): prints the "database".
const FAKE_DUMPALL: &str = "#!/bin/sh\ncat /data/db.sql\n";

/// A stand-in for `psql`: a check (`-A`, as migrate's checks run it)
/// answers the count and digest of the database's lines; a restore stores
/// its input as the database and prints what its `\echo` lines say, as
/// psql does. It plays a psql whose input the engine ended early, as
/// Docker's exec was seen to do: when the dump holds `cut-every-restore`
/// it keeps only the first 200 bytes, and with `cut-one-restore` it does so
/// once per host (its volume remembers). Either way it exits 0, as psql
/// does when its input ends at a line inside a COPY.
const FAKE_PSQL: &str = r#"#!/bin/sh
data() { grep -v '^\\echo ' /data/db.sql | grep .; }
case " $* " in
*" -A "*) cat > /dev/null; echo "public.db $(data | wc -l) $(data | md5sum | cut -c1-32)"; exit 0 ;;
esac
cat > /data/.in
if grep -q cut-every-restore /data/.in || { grep -q cut-one-restore /data/.in && [ ! -e /data/was-cut-once ]; }; then
  grep -q cut-one-restore /data/.in && touch /data/was-cut-once
  head -c 200 /data/.in > /data/db.sql
else
  cp /data/.in /data/db.sql
fi
rm -f /data/.in
sed -n 's/^\\echo //p' /data/db.sql
"#;

/// A restore whose input was cut short exits 0 and would leave part of the
/// data: migrate sees it (psql never echoed the marker sent after the
/// dump), restores again, and gives up after three attempts, starting A
/// again; cut once, the second attempt moves every row.
#[test]
fn a_restore_cut_short_is_done_again_and_never_switched_to() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("mig-i").unwrap(), env.docker_host("mig-j").unwrap());
    let stack = TestStack::new(DB_STACK).unwrap();
    let img = stack.path().join("img");
    for (name, text) in [("psql", FAKE_PSQL), ("pg_dumpall", FAKE_DUMPALL)] {
        std::fs::write(img.join(name), text).unwrap();
        std::fs::set_permissions(img.join(name), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let dockerfile = std::fs::read_to_string(img.join("Dockerfile")).unwrap();
    std::fs::write(img.join("Dockerfile"), format!("{dockerfile}COPY psql pg_dumpall /usr/local/bin/\n")).unwrap();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    let db = container(&a, &project, "db");
    let rows = |marker: &str| {
        format!(
            "set -e; echo '-- {marker}' > /data/db.sql; for i in $(seq 1 3000); do echo \"row $i of the table\"; done >> /data/db.sql"
        )
    };
    a.docker(&["exec", &db, "sh", "-c", &rows("cut-every-restore")]);

    // Cut every time: three restores, then A runs again; nothing switched.
    let run = migrate(&env, &stack, &a, &b, &[]).expect_code(1);
    assert_eq!(run.stderr.matches("; restoring again (attempt").count(), 2, "{}", run.stderr);
    assert!(run.stderr.contains("restoring again (attempt 3 of 3)"), "{}", run.stderr);
    assert!(run.stderr.contains("3 times; nothing was switched"), "{}", run.stderr);
    assert_eq!(state(&a, &container(&a, &project, "db")), "running", "A runs again:\n{}", run.stderr);
    assert!(!env.state.join("migrations").join(format!("{project}.json")).exists());

    // Cut once: the second restore is whole, and B serves every row.
    a.docker(&["exec", &db, "sh", "-c", &rows("cut-one-restore")]);
    let want = a.docker(&["exec", &db, "cat", "/data/db.sql"]);
    let run = migrate(&env, &stack, &a, &b, &[]).expect_code(0);
    assert!(run.stderr.contains("restoring again (attempt 2 of 3)"), "{}", run.stderr);
    assert!(!run.stderr.contains("attempt 3 of 3"), "{}", run.stderr);
    let got =
        b.docker(&["exec", &container(&b, &project, "db"), "sh", "-c", "grep -v '^\\\\echo ' /data/db.sql | grep ."]);
    assert_eq!(got.trim_end(), want.trim_end());
    assert_eq!(got.lines().count(), 3001);
}
