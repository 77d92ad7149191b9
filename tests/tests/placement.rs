//! A stack split between hosts by inventory group (`x-mlops.placement`):
//! each host runs its roles, services on other hosts are reached by their
//! names at those hosts' inventory addresses, hosts are deployed after the
//! hosts they depend on, and an inventory that cannot run the stack is
//! refused before any host is touched. Real sshd hosts, each with its own
//! Docker engine, the real agent and CLI.

use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

/// `db` serves HTTP on 7000 (published on its host's inventory address
/// for the other hosts); `worker` is healthy only while it reaches `db` by
/// that name; every host runs `node`.
const STACK: &str = r#"
name: "{project}"
x-mlops:
  secrets: [DB_PASSWORD]
  placement:
    roles:
      db: {services: [db], single: true}
      workers: {services: [worker]}
    every_host: [node]
    remote_ports: {db: [7000]}
services:
  db:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; mkdir -p /tmp/www && echo served-by-db > /tmp/www/index.html && httpd -f -p 7000 -h /tmp/www & wait"]
    volumes: ["data:/data"]
    environment: {PASSWORD: "${DB_PASSWORD}"}
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://127.0.0.1:7000/"]
      interval: 1s
      retries: 30
  worker:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    depends_on: {db: {condition: service_healthy}}
    environment: {PASSWORD: "${DB_PASSWORD}"}
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O- http://db:7000/ | grep -q served-by-db"]
      interval: 1s
      retries: 30
  node:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
volumes:
  data:
"#;

fn inventory(env: &TestEnv, db: &[&TestHost], workers: &[&TestHost]) -> String {
    let group = |hosts: &[&TestHost]| {
        hosts.iter().map(|h| format!("        {}:\n          ansible_host: {}\n", h.name, h.addr)).collect::<String>()
    };
    let text = format!(
        "all:\n  vars:\n    ansible_user: root\n  children:\n    db:\n      hosts:\n{}    workers:\n      hosts:\n{}",
        group(db),
        group(workers)
    );
    env.write("inventory.yml", &text).unwrap().display().to_string()
}

fn deploy(env: &TestEnv, inventory: &str, stack: &TestStack, extra: &[&str]) -> CtlRun {
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let mut args = vec![
        "deploy",
        "-i",
        inventory,
        "--identity",
        &key,
        "--stack",
        &dir,
        "--health-timeout",
        "60",
        "--output",
        "json",
    ];
    args.extend(extra);
    env.ctl(&args)
}

fn services(host: &TestHost, project: &str) -> Vec<String> {
    let out = host.docker(&[
        "ps",
        "--filter",
        &format!("label=mlops.project={project}"),
        "--format",
        "{{.Label \"mlops.service\"}}",
    ]);
    let mut names: Vec<String> = out.lines().map(str::to_string).collect();
    names.sort();
    names
}

#[test]
fn inventory_groups_place_services_and_hosts_reach_each_other_by_service_name() {
    let env = TestEnv::new().unwrap();
    let (h1, h2, h3) =
        (env.docker_host("pl1").unwrap(), env.docker_host("pl2").unwrap(), env.docker_host("pl3").unwrap());
    let stack = TestStack::new(STACK).unwrap();
    let project = stack.project.clone();

    // An inventory that would run the database twice is refused; no host
    // is touched.
    let twice = inventory(&env, &[&h1, &h2], &[&h3]);
    let refused = deploy(&env, &twice, &stack, &[]).expect_code(2);
    assert!(refused.stderr.contains("role `db` (db) runs on one host only, but"), "{}", refused.stderr);
    assert!(refused.stderr.contains("hint: keep one host in inventory group `db`"), "{}", refused.stderr);
    for h in [&h1, &h2, &h3] {
        assert!(h.agent_pid().is_none(), "{} was touched", h.name);
    }

    let inv = inventory(&env, &[&h1], &[&h2, &h3]);
    let first = deploy(&env, &inv, &stack, &[]).expect_code(0);
    assert!(first.stderr.contains(&format!("{}: roles db (2 service(s))", h1.name)), "{}", first.stderr);
    assert_eq!(services(&h1, &project), ["db", "node"]);
    for h in [&h2, &h3] {
        // Healthy: the worker reached `db` on h1 by its name.
        assert_eq!(services(h, &project), ["node", "worker"], "{}", h.name);
        let health = h.docker(&["inspect", "-f", "{{.State.Health.Status}}", &format!("{project}-worker-1")]);
        assert_eq!(health.trim(), "healthy", "{}", h.name);
        // The database's volume lives on the database's host only.
        let volumes = h.docker(&["volume", "ls", "-q", "--filter", &format!("label=mlops.project={project}")]);
        assert!(volumes.trim().is_empty(), "{}: {volumes}", h.name);
    }
    // Published for the other hosts on h1's inventory address only.
    let bound = h1.docker(&["port", &format!("{project}-db-1"), "7000"]);
    assert_eq!(bound.trim(), format!("{}:7000", h1.addr), "{bound}");
    // h1 was deployed before the hosts that depend on it: its last line
    // comes before their first line about their stack.
    let lines: Vec<&str> = first.stderr.lines().collect();
    let db_healthy = lines.iter().position(|l| l.contains(&format!("  {} ", h1.name)) && l.contains("db: healthy"));
    let worker_first =
        lines.iter().position(|l| l.contains(&format!("  {} ", h2.name)) && l.contains("worker: create"));
    assert!(db_healthy.unwrap() < worker_first.unwrap(), "{}", first.stderr);

    // A deploy limited to one worker host still knows where the database
    // runs (from the inventory) and changes nothing.
    let limited = deploy(&env, &inv, &stack, &["--limit", &h3.name]).expect_code(0);
    let json = limited.json();
    assert_eq!(json["hosts"].as_array().unwrap().len(), 1);
    assert_eq!(json["hosts"][0]["result"]["stack"]["changed"], 0, "{}", limited.stdout);

    // A secret is rotated across the split stack: each host is checked
    // against what it runs, and both sides get the new value.
    let dir = stack.path().display().to_string();
    let password = |h: &TestHost, service: &str| {
        let env = h.docker(&[
            "inspect",
            "-f",
            "{{range .Config.Env}}{{println .}}{{end}}",
            &format!("{project}-{service}-1"),
        ]);
        env.lines().find_map(|l| l.strip_prefix("PASSWORD=")).unwrap_or_default().to_string()
    };
    let old = password(&h2, "worker");
    env.ctl(&[
        "secrets",
        "rotate",
        "DB_PASSWORD",
        "-i",
        &inv,
        "--identity",
        &env.key.display().to_string(),
        "--stack",
        &dir,
        "--health-timeout",
        "60",
    ])
    .expect_code(0);
    let new = password(&h1, "db");
    assert!(!old.is_empty() && new != old, "{old} -> {new}");
    assert_eq!(password(&h2, "worker"), new);
    assert_eq!(password(&h3, "worker"), new);

    // The database's host fails its health check: the hosts that depend on
    // it are not deployed, and say why; their containers are left running.
    let before = h2.docker(&["ps", "-q", "--no-trunc"]);
    stack
        .write_compose(
            &STACK
                .replace(r#"test: ["CMD", "wget", "-q", "-O-", "http://127.0.0.1:7000/"]"#, r#"test: ["CMD", "false"]"#)
                .replace("retries: 30\n  worker", "retries: 2\n  worker"),
        )
        .unwrap();
    let failed = deploy(&env, &inv, &stack, &[]).expect_code(1);
    let json = failed.json();
    let error_of = |name: &str| {
        json["hosts"].as_array().unwrap().iter().find(|h| h["host"] == name).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(error_of(&h1.name).contains("health"), "{}", error_of(&h1.name));
    for h in [&h2, &h3] {
        let e = error_of(&h.name);
        assert!(e.contains(&format!("depends on `db`, which runs on {}", h1.name)), "{e}");
    }
    assert_eq!(h2.docker(&["ps", "-q", "--no-trunc"]), before, "untouched");
}
