//! Rolling deploys over three hosts, each with its own sshd and Docker
//! engine, the real agent and CLI: batches (`--serial`), a batch whose new
//! revision fails its health check returned to its last revision with the
//! later batches untouched, `rollback` after a good rollout, a host that
//! goes down mid-rollout, and a controller killed mid-rollout.

use std::time::{Duration, Instant};

use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

/// `app` is healthy unless its VERSION is not 1 and the host's
/// `rollout-flag` volume holds `bad` (a host where the new revision
/// fails); `side` has no health check (its minimum healthy time counts).
fn compose(version: u32) -> String {
    format!(
        r#"
name: "{{project}}"
services:
  app:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    environment: {{VERSION: "{version}"}}
    volumes: ["flag:/flag:ro"]
    healthcheck:
      test: ["CMD-SHELL", "test \"$$VERSION\" = 1 || test ! -e /flag/bad"]
      interval: 1s
      retries: 3
  side:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    environment: {{VERSION: "{version}"}}
volumes:
  flag: {{external: true, name: rollout-flag}}
"#
    )
}

/// The VERSION `service` runs with on `host`, and its container's ID
/// (empty while it is being replaced).
fn running(host: &TestHost, project: &str, service: &str) -> (String, String) {
    let name = format!("{project}-{service}-1");
    let format = "{{.Id}}\n{{range .Config.Env}}{{println .}}{{end}}";
    let inspect = host.docker_result(&["inspect", "-f", format, &name]).unwrap_or_default();
    let version = inspect.lines().find_map(|l| l.strip_prefix("VERSION=")).unwrap_or_default().to_string();
    (version, inspect.lines().next().unwrap_or_default().trim().to_string())
}

fn versions(hosts: &[&TestHost], project: &str) -> Vec<String> {
    hosts.iter().map(|h| running(h, project, "app").0).collect()
}

fn host_result<'a>(json: &'a serde_json::Value, host: &TestHost) -> &'a serde_json::Value {
    json["hosts"].as_array().unwrap().iter().find(|h| h["host"] == host.spec("root")).unwrap()
}

fn error_of(json: &serde_json::Value, host: &TestHost) -> String {
    host_result(json, host)["error"].as_str().unwrap_or_default().to_string()
}

/// The revisions `host` keeps: (number, action, deploy id).
fn revisions(env: &TestEnv, host: &TestHost, stack: &TestStack) -> Vec<(u64, String, String)> {
    let json = env
        .ctl_key(&["history", "--project", &stack.project, "--host", &host.spec("root"), "--output", "json"])
        .expect_code(0)
        .json();
    json["hosts"][0]["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["number"].as_u64().unwrap(),
                r["action"].as_str().unwrap().to_string(),
                r["deploy_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn deploy(env: &TestEnv, hosts: &[&TestHost], stack: &TestStack, extra: &[&str]) -> CtlRun {
    env.deploy_stack(hosts, stack, extra)
}

#[test]
fn a_rollout_stops_at_a_failing_batch_returns_it_and_rolls_back_on_request() {
    let env = TestEnv::new().unwrap();
    let (r1, r2, r3) =
        (env.docker_host("ro1").unwrap(), env.docker_host("ro2").unwrap(), env.docker_host("ro3").unwrap());
    let hosts = [&r1, &r2, &r3];
    for h in hosts {
        h.docker(&["volume", "create", "rollout-flag"]);
    }
    let stack = TestStack::new(&compose(1)).unwrap();
    let project = stack.project.clone();
    deploy(&env, &hosts, &stack, &[]).expect_code(0);
    let before: Vec<(String, String)> = hosts.iter().map(|h| running(h, &project, "app")).collect();
    assert!(before.iter().all(|(v, _)| v == "1"));

    // The new revision fails on r2 only.
    let mountpoint = r2.docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", "rollout-flag"]);
    r2.exec(&format!("touch {}/bad", mountpoint.trim())).unwrap();
    stack.write_compose(&compose(2)).unwrap();
    let run = deploy(&env, &hosts, &stack, &["--serial", "1", "--min-healthy-time", "2"]).expect_code(1);
    let json = run.json();
    assert!(run.stderr.contains("batch 1/3: "), "{}", run.stderr);
    assert!(run.stderr.contains("watching: side must keep running 2 s"), "{}", run.stderr);
    // Batch 1 went through; batch 2 failed its health check and is back on
    // its revision, healthy; batch 3 was not touched.
    assert_eq!(versions(&hosts, &project), ["2", "1", "1"]);
    let e2 = error_of(&json, &r2);
    assert!(e2.contains("service `app` is unhealthy") && e2.contains("the host was returned to revision 1"), "{e2}");
    let hint = host_result(&json, &r2)["hint"].as_str().unwrap().to_string();
    assert!(hint.contains("runs revision 1 again") && hint.contains("--no-rollback"), "{hint}");
    assert!(run.stderr.contains("ROLLING BACK: returning to revision 1"), "{}", run.stderr);
    let health = r2.docker(&["inspect", "-f", "{{.State.Health.Status}}", &format!("{project}-app-1")]);
    assert_eq!(health.trim(), "healthy");
    let e3 = error_of(&json, &r3);
    assert!(e3.contains("not deployed: the rollout stopped before batch 3") && e3.contains(&r2.spec("root")), "{e3}");
    assert_eq!(running(&r3, &project, "app"), before[2], "r3 untouched");
    assert_eq!(revisions(&env, &r2, &stack).len(), 1, "a failed converge is no revision");
    assert_eq!(revisions(&env, &r1, &stack).len(), 2);

    // With --no-rollback the failed revision stays for inspection.
    let kept = deploy(&env, &[&r2], &stack, &["--no-rollback"]).expect_code(1);
    assert!(!error_of(&kept.json(), &r2).contains("returned to revision"));
    assert_eq!(running(&r2, &project, "app").0, "2", "the failed revision stays");

    // Fixed, the rollout goes through every batch; r1 changes nothing and
    // records no new revision.
    r2.exec(&format!("rm {}/bad", mountpoint.trim())).unwrap();
    let good = deploy(&env, &hosts, &stack, &["--serial", "2", "--min-healthy-time", "1"]).expect_code(0);
    assert!(good.stderr.contains(&format!("batch 2/2: {}", r3.spec("root"))), "{}", good.stderr);
    assert_eq!(versions(&hosts, &project), ["2", "2", "2"]);
    assert_eq!(revisions(&env, &r1, &stack).len(), 2, "nothing changed on r1: no new revision");

    // `rollback`: every host back to the revision before its newest.
    let key = env.key.display().to_string();
    let mut args = vec!["rollback", "--project", project.as_str(), "--identity", key.as_str(), "--output", "json"];
    let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
    for s in &specs {
        args.extend(["--host", s.as_str()]);
    }
    let back = env.ctl(&args).expect_code(0);
    assert_eq!(versions(&hosts, &project), ["1", "1", "1"], "{}", back.stdout);
    let r1_revisions = revisions(&env, &r1, &stack);
    assert_eq!(r1_revisions.last().unwrap().1, "rollback to 1", "{r1_revisions:?}");
    // Forward again by the good deploy's id: r1 made its revision in the
    // failed rollout, and the good one found it as it was.
    let good_id = deploy_id(&good);
    assert_ne!(r1_revisions[1].2, good_id);
    let mut forward = args.clone();
    forward.extend(["--to-deploy", good_id.as_str()]);
    env.ctl(&forward).expect_code(0);
    assert_eq!(versions(&hosts, &project), ["2", "2", "2"]);
    let mut unknown = args.clone();
    unknown.extend(["--to", "99"]);
    let refused = env.ctl(&unknown).expect_code(1);
    assert!(refused.stdout.contains("revision 99 is not kept (kept: 1, 2, 3, 4)"), "{}", refused.stdout);
}

#[test]
fn a_host_down_or_a_controller_killed_mid_rollout_leaves_every_host_on_a_revision() {
    let env = TestEnv::new().unwrap();
    let (r1, r2, r3) =
        (env.docker_host("rk1").unwrap(), env.docker_host("rk2").unwrap(), env.docker_host("rk3").unwrap());
    let hosts = [&r1, &r2, &r3];
    for h in hosts {
        h.docker(&["volume", "create", "rollout-flag"]);
    }
    let stack = TestStack::new(&compose(1)).unwrap();
    let project = stack.project.clone();
    deploy(&env, &hosts, &stack, &[]).expect_code(0);

    // r3's agent dies while batch 1 runs: r3 fails, the others deploy
    // (one failure allowed), and the summary names it.
    stack.write_compose(&compose(2)).unwrap();
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
    let rollout = |extra: &[&str]| {
        let mut args =
            vec!["deploy", "--identity", &key, "--stack", &dir, "--health-timeout", "60", "--output", "json"];
        for s in &specs {
            args.extend(["--host", s.as_str()]);
        }
        args.extend(extra);
        env.ctl_command(&args)
    };
    let child = rollout(&["--serial", "1", "--max-fail", "1", "--min-healthy-time", "4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("r1 runs version 2", || running(&r1, &project, "app").0 == "2");
    let agent = r3.agent_pid().expect("r3's agent runs");
    nix_kill(agent);
    let out = child.wait_with_output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    assert_eq!(versions(&[&r1, &r2], &project), ["2", "2"]);
    assert!(!error_of(&json, &r3).is_empty(), "{json:#}");
    assert_eq!(running(&r3, &project, "app").0, "1", "r3 still runs its revision");

    // The controller is killed while batch 1 converges: that host finishes
    // on its own (one revision, healthy), the later hosts are untouched,
    // and the next run converges everything (no stale lock).
    deploy(&env, &hosts, &stack, &[]).expect_code(0);
    stack.write_compose(&compose(3)).unwrap();
    let r2_before = running(&r2, &project, "app");
    let mut child = rollout(&["--serial", "1", "--min-healthy-time", "6"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("r1 runs version 3", || running(&r1, &project, "app").0 == "3");
    child.kill().unwrap();
    child.wait().unwrap();
    // The agent goes on alone: its revision appears once `side` has kept
    // running its 6 s.
    wait_until("r1 records revision 3's deploy", || {
        revisions(&env, &r1, &stack).len() == 3 && running(&r1, &project, "side").0 == "3"
    });
    assert_eq!(running(&r2, &project, "app"), r2_before, "r2 untouched");
    let again = deploy(&env, &hosts, &stack, &["--serial", "1", "--min-healthy-time", "1"]).expect_code(0);
    assert_eq!(versions(&hosts, &project), ["3", "3", "3"], "{}", again.stderr);
    let r1_result = host_result(&again.json(), &r1)["result"]["stack"]["changed"].clone();
    assert_eq!(r1_result, 0, "r1 was already there");
}

/// The id a deploy printed (`deploy 20261205T120000Z-ab12...`).
fn deploy_id(run: &CtlRun) -> String {
    run.stderr
        .lines()
        .filter_map(|l| l.split("deploy ").nth(1))
        .filter_map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next())
        .find(|id| id.len() == 21 && id.contains('T'))
        .unwrap_or_else(|| panic!("no deploy id in {}", run.stderr))
        .to_string()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills a process of a test host (its agent) at once.
fn nix_kill(pid: i32) {
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}
