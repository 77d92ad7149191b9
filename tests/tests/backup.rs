//! `mlopsctl backup` and `mlopsctl restore` on test hosts (each with its
//! own sshd and Docker engine, the real agent and CLI): a running stack's
//! database dump and live volume go to a directory on this machine, come
//! back onto another host checked, and a damaged backup or a restore that
//! lost rows is refused; `--keep` prunes; a backup kept by another host's
//! agent (`--to-host`, and the scheduled ones) restores from there
//! (`--from-host`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

/// `db` stands for a PostgreSQL service (its `psql` and `pg_dumpall` are
/// the stand-ins below, its "database" the file /data/db.sql, kept as a
/// dump script); `app` writes files into a volume while it runs.
const STACK: &str = r#"
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
  app:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do date >> /files/log; sleep 1; done & wait"]
    volumes: ["files:/files"]
    depends_on:
      db: {condition: service_healthy}
volumes:
  data: {}
  files: {}
x-mlops:
  migrate:
    hold: [app]
    database: {service: db, volume: data, user: postgres, database: postgres}
"#;

/// A stand-in for `pg_dumpall` (a real PostgreSQL cannot be built for the
/// namespace tiers in their time): prints the "database", a dump script.
const FAKE_DUMPALL: &str = "#!/bin/sh\ncat /data/db.sql\n";

/// A stand-in for `psql`: a check (`-A`, as the row counts run) answers
/// `public.t N`, N the rows of the script's COPY; a restore stores its input
/// as the database and prints what its `\echo` lines say, as psql does.
/// With `lose-a-row` in the script it drops the last row as it restores.
const FAKE_PSQL: &str = r#"#!/bin/sh
case " $* " in
*" -A "*) cat > /dev/null; echo "public.t $(grep -c '^row ' /data/db.sql)"; exit 0 ;;
esac
cat > /data/.in
if grep -q lose-a-row /data/.in; then
  last=$(grep '^row ' /data/.in | tail -n 1)
  grep -vxF "$last" /data/.in > /data/db.sql
else
  cp /data/.in /data/db.sql
fi
rm -f /data/.in
sed -n 's/^\\echo //p' /data/db.sql
"#;

fn container(host: &TestHost, project: &str, service: &str) -> String {
    let filter = |k: &str, v: &str| format!("label=mlops.{k}={v}");
    host.docker(&["ps", "-aq", "--filter", &filter("project", project), "--filter", &filter("service", service)])
        .trim()
        .to_string()
}

fn stack() -> TestStack {
    let stack = TestStack::new(STACK).unwrap();
    let img = stack.path().join("img");
    for (name, text) in [("psql", FAKE_PSQL), ("pg_dumpall", FAKE_DUMPALL)] {
        std::fs::write(img.join(name), text).unwrap();
        std::fs::set_permissions(img.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dockerfile = std::fs::read_to_string(img.join("Dockerfile")).unwrap();
    std::fs::write(img.join("Dockerfile"), format!("{dockerfile}COPY psql pg_dumpall /usr/local/bin/\n")).unwrap();
    stack
}

/// The "database": a dump script with `rows` rows in one table.
fn fill(host: &TestHost, project: &str, rows: u32, marker: &str) {
    let script = format!(
        "set -e; {{ echo '\\connect -reuse-previous=on \"dbname='\\''postgres'\\''\"'; echo '-- {marker}'; \
         echo 'COPY public.t (line) FROM stdin;'; for i in $(seq 1 {rows}); do echo \"row $i\"; done; \
         echo '\\.'; }} > /data/db.sql"
    );
    host.docker(&["exec", &container(host, project, "db"), "sh", "-c", &script]);
}

fn ctl(env: &TestEnv, stack: &TestStack, host: &TestHost, args: &[&str]) -> CtlRun {
    let (key, dir, spec) = (env.key.display().to_string(), stack.path().display().to_string(), host.spec("root"));
    let mut all = vec![args[0], "--identity", &key, "--stack", &dir, "--host", &spec];
    all.extend(&args[1..]);
    env.ctl(&all)
}

/// The backup directory a run printed (its last line of output).
fn printed_dir(run: &CtlRun) -> PathBuf {
    PathBuf::from(run.stdout.lines().last().expect("the backup's directory is printed"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_backup_restored_on_another_host_passes_verification_and_a_damaged_one_is_refused() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("bak-a").unwrap(), env.docker_host("bak-b").unwrap());
    let stack = stack();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    fill(&a, &project, 3000, "kept whole");
    let backups = tempfile::tempdir().unwrap();
    let to = backups.path().display().to_string();

    // Taken while the stack runs: `app` keeps writing into its volume.
    let run = ctl(&env, &stack, &a, &["backup", "--to", &to]).expect_code(0);
    let dir = printed_dir(&run);
    assert!(dir.starts_with(backups.path().join(&project)), "{}", run.stdout);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("secrets.json")), 0o600);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["database"]["tables"]["postgres"]["public.t"], 3000, "{manifest:#}");
    let volumes = manifest["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 1, "the database's volume goes by its dump: {manifest:#}");
    assert!(volumes[0]["name"].as_str().unwrap().ends_with("_files"), "{manifest:#}");
    assert_eq!(state(&a, &container(&a, &project, "app")), "running", "a backup stops nothing");
    let log_a = a.docker(&["exec", &container(&a, &project, "app"), "cat", "/files/log"]);

    // Onto another host: its data is the backup's, checked.
    let run = ctl(&env, &stack, &b, &["restore", &dir.display().to_string(), "--health-timeout", "60"]).expect_code(0);
    assert!(run.stdout.contains("row counts of 1 table(s) equal the dump's"), "{}", run.stdout);
    let db_b = b.docker(&["exec", &container(&b, &project, "db"), "sh", "-c", "grep -c '^row ' /data/db.sql"]);
    assert_eq!(db_b.trim(), "3000");
    let log_b = b.docker(&["exec", &container(&b, &project, "app"), "cat", "/files/log"]);
    let first = log_b.lines().next().unwrap_or_default();
    assert!(!first.is_empty() && log_a.starts_with(first), "the volume's log came along:\n{log_b}\nvs\n{log_a}");
    assert_eq!(state(&b, &container(&b, &project, "app")), "running");

    // A damaged file is found before the host is touched.
    let broken = backups.path().join("broken");
    copy_dir(&dir, &broken);
    let file = broken.join("database.sql.zst");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let run = ctl(&env, &stack, &b, &["restore", &broken.display().to_string()]).expect_code(2);
    assert!(run.stderr.contains("database.sql.zst is damaged"), "{}", run.stderr);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);

    // A restore that loses a row fails its verification.
    fill(&a, &project, 50, "lose-a-row");
    let lossy = printed_dir(&ctl(&env, &stack, &a, &["backup", "--to", &to]).expect_code(0));
    let run = ctl(&env, &stack, &b, &["restore", &lossy.display().to_string(), "--health-timeout", "60"]);
    let run = run.expect_code(1);
    assert!(
        run.stderr.contains("verification failed") && run.stderr.contains("public.t: 50 in the dump, 49 on"),
        "{}",
        run.stderr
    );
}

#[test]
fn backups_beyond_keep_are_pruned_oldest_first() {
    let env = TestEnv::new().unwrap();
    let a = env.docker_host("bak-k").unwrap();
    let stack = stack();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    fill(&a, &stack.project, 10, "pruned");
    let backups = tempfile::tempdir().unwrap();
    let to = backups.path().display().to_string();
    let mut made = Vec::new();
    for _ in 0..3 {
        // Names are to the second.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        made.push(printed_dir(&ctl(&env, &stack, &a, &["backup", "--to", &to, "--keep", "2"]).expect_code(0)));
    }
    assert!(!made[0].exists(), "the oldest is removed");
    assert!(made[1].exists() && made[2].exists());
    let left: Vec<_> = std::fs::read_dir(backups.path().join(&stack.project)).unwrap().collect();
    assert_eq!(left.len(), 2, "no partial directory left behind: {left:?}");
}

/// The host's agent takes backups on its own, keeps the newest `--keep`,
/// and one of them restores onto another host.
#[test]
fn a_scheduled_backup_runs_on_the_host_and_prunes_to_its_count() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("bak-s").unwrap(), env.docker_host("bak-t").unwrap());
    let stack = stack();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    fill(&a, &project, 200, "scheduled");
    let run = ctl(&env, &stack, &a, &["backup", "--schedule", "10s"]).expect_code(2);
    assert!(run.stderr.contains("--schedule needs --keep N"), "{}", run.stderr);
    let run = ctl(&env, &stack, &a, &["backup", "--schedule", "10s", "--keep", "2"]).expect_code(0);
    assert!(run.stdout.contains("every 10 s, the newest 2 kept"), "{}", run.stdout);

    // Three taken (the first 10 s after the schedule was set), two kept.
    let show = || {
        let run = ctl(&env, &stack, &a, &["backup", "--schedule", "show", "--output", "json"]).expect_code(0);
        serde_json::from_str::<serde_json::Value>(&run.stdout).unwrap()["result"].clone()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let seen = loop {
        let seen = show();
        if seen["taken"].as_u64().unwrap_or(0) >= 3 {
            break seen;
        }
        assert!(std::time::Instant::now() < deadline, "three backups never came: {seen:#}");
        assert_eq!(seen["failed"], 0, "{seen:#}");
        std::thread::sleep(std::time::Duration::from_secs(2));
    };
    assert_eq!(seen["kept"].as_array().unwrap().len(), 2, "{seen:#}");
    let run = ctl(&env, &stack, &a, &["backup", "--schedule", "off"]).expect_code(0);
    assert!(run.stdout.contains("no backup schedule"), "{}", run.stdout);
    let on_host = a.path(seen["dir"].as_str().unwrap());
    let mut whole: Vec<_> = std::fs::read_dir(&on_host)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    whole.sort();
    assert_eq!(whole.len(), 2, "pruned to two: {whole:?}");
    assert_eq!(mode(&on_host.join(&whole[1]).join("secrets.json")), 0o600);

    // The newest, fetched from the host that took it, restores onto another.
    let from = a.spec("root");
    let run = ctl(&env, &stack, &b, &["restore", "latest", "--from-host", &from, "--health-timeout", "60"]);
    let run = run.expect_code(0);
    assert!(run.stdout.contains("row counts of 1 table(s) equal the dump's"), "{}", run.stdout);
    assert!(run.stdout.contains(&format!("fetch: backup {}", seen["dir"].as_str().unwrap())), "{}", run.stdout);
    assert!(run.stderr.contains(&whole[1]), "the newest is the one restored: {}", run.stderr);
    let rows = b.docker(&["exec", &container(&b, &project, "db"), "sh", "-c", "grep -c '^row ' /data/db.sql"]);
    assert_eq!(rows.trim(), "200");
}

/// A backup kept by another host's agent, in a directory of that host's:
/// written there whole (compressed and checked there), pruned there, and
/// restored from there; a directory others could write is refused.
#[test]
fn a_backup_kept_on_another_host_restores_from_there() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.docker_host("bak-h").unwrap(), env.docker_host("bak-i").unwrap());
    let stack = stack();
    let project = stack.project.clone();
    env.deploy_stack(&[&a], &stack, &[]).expect_code(0);
    let keeper = b.spec("root");

    // Refused before anything is written: a relative directory (here), one
    // a local user of the keeping host could write (there).
    let run = ctl(&env, &stack, &a, &["backup", "--to-host", &keeper, "--to", "rel/dir"]).expect_code(2);
    assert!(run.stderr.contains("absolute path") && run.stderr.contains("hint:"), "{}", run.stderr);
    // (/var/lib: the test host's own, an overlay of this machine's.)
    let on_b = |script: &str| String::from_utf8(b.exec(script).unwrap().stdout).unwrap();
    on_b("mkdir -p /var/lib/open && chmod 777 /var/lib/open");
    let run = ctl(&env, &stack, &a, &["backup", "--to-host", &keeper, "--to", "/var/lib/open/backups"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("/var/lib/open is not a directory only the agent's user"), "{}", run.stderr);
    assert!(run.stderr.contains("hint:") && run.stderr.contains("chmod go-w"), "{}", run.stderr);
    assert_eq!(on_b("ls -A /var/lib/open"), "", "nothing made under a directory others write");

    let mut made = Vec::new();
    for (round, rows) in [(1, 700), (2, 800)] {
        fill(&a, &project, rows, &format!("round {round}"));
        // Names are to the second.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let to = ["backup", "--to-host", &keeper, "--to", "/var/lib/mlops-test-backups", "--keep", "1"];
        let run = ctl(&env, &stack, &a, &to);
        let run = run.expect_code(0);
        assert!(run.stderr.contains(&format!("kept on {keeper}")), "{}", run.stderr);
        made.push(printed_dir(&run));
    }
    let dir = &made[1];
    assert!(dir.starts_with(format!("/var/lib/mlops-test-backups/{project}/")), "{}", dir.display());
    let there = dir.display().to_string();
    assert_eq!(on_b(&format!("stat -c %a {there} {there}/secrets.json")), "700\n600\n");
    let manifest: serde_json::Value = serde_json::from_str(&on_b(&format!("cat {there}/manifest.json"))).unwrap();
    assert_eq!(manifest["database"]["tables"]["postgres"]["public.t"], 800, "{manifest:#}");
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let left = on_b(&format!("ls -A /var/lib/mlops-test-backups/{project}"));
    assert_eq!(left, format!("{name}\n"), "pruned to one there, no partial directory left");

    // Restored from there onto the keeping host itself, checked as any.
    let run = ctl(&env, &stack, &b, &["restore", &there, "--from-host", &keeper, "--health-timeout", "60"]);
    let run = run.expect_code(0);
    assert!(run.stdout.contains("row counts of 1 table(s) equal the dump's"), "{}", run.stdout);
    let rows = b.docker(&["exec", &container(&b, &project, "db"), "sh", "-c", "grep -c '^row ' /data/db.sql"]);
    assert_eq!(rows.trim(), "800");
    // What was fetched here is gone with the restore.
    let fetched: Vec<_> = std::fs::read_dir(&env.state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".restore-"))
        .collect();
    assert!(fetched.is_empty(), "{fetched:?}");
    // A name the host does not keep: the ones it keeps are named.
    let missing = format!("/var/lib/mlops-test-backups/{project}/20200101T000000Z-x");
    let run = ctl(&env, &stack, &b, &["restore", &missing, "--from-host", &keeper]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains(&format!("there are: {name}")), "{}", run.stderr);
}

fn state(host: &TestHost, id: &str) -> String {
    host.docker(&["inspect", "-f", "{{.State.Status}}", id])
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
