//! Stacks against a real Docker engine, through the real CLI, SSH and
//! agent. Each test host runs its own dockerd (see the harness); without
//! `dockerd` these tests fail, never skip.

use std::collections::BTreeMap;

use mlops_e2e::{NO_HOST, TestEnv, TestHost, TestStack};
use serde_json::Value;

/// A test host with its own Docker engine, trusting `env`.
fn stack_host(env: &TestEnv, name: &str) -> TestHost {
    let host = TestHost::with_docker(name).unwrap();
    env.trust(&host).unwrap();
    host
}

/// `init` runs once; `db` keeps data in a volume and turns healthy; `web`
/// waits for both.
const THREE: &str = r#"
name: "{project}"
x-svc: &svc
  build: ./img
services:
  init:
    <<: *svc
    command: ["sh", "-c", "sleep 0.3; echo init done"]
  db:
    <<: *svc
    command: ["sh", "-c", "trap 'exit 0' TERM; [ -f /data/token ] || date +%s%N > /data/token; echo $$MSG > /data/msg; sleep 3600 & wait"]
    environment:
      MSG: ${MSG:-hello}
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "test", "-f", "/data/msg"]
      interval: 1s
      retries: 3
  web:
    <<: *svc
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    depends_on:
      db: {condition: service_healthy}
      init: {condition: service_completed_successfully}
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
volumes:
  data:
"#;

fn deploy(env: &TestEnv, host: &TestHost, stack: &TestStack, extra_env: &[(&str, &str)]) -> mlops_e2e::CtlRun {
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let spec = host.spec("root");
    let run = env.ctl_with(
        &["deploy", "--identity", &key, "--host", &spec, "--stack", &dir, "--health-timeout", "60", "--output", "json"],
        extra_env,
    );
    if run.code != 0 {
        // What the agent saw, for whoever reads a failure.
        eprintln!("agent log of {}:\n{}", host.name, host.agent_log());
    }
    run
}

fn services(run: &mlops_e2e::CtlRun) -> BTreeMap<String, Value> {
    let json = run.json();
    json["hosts"][0]["result"]["stack"]["services"]
        .as_array()
        .unwrap_or_else(|| panic!("no services in {json:#}\nstderr:\n{}", run.stderr))
        .iter()
        .map(|s| (s["service"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

fn ids(s: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    s.iter().map(|(k, v)| (k.clone(), v["container_id"].as_str().unwrap().to_string())).collect()
}

#[test]
fn stack_comes_up_healthy_in_order_and_a_rerun_changes_nothing() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s1");
    let stack = TestStack::new(THREE).unwrap();

    let first = deploy(&env, &host, &stack, &[]).expect_code(0);
    let s = services(&first);
    assert_eq!(s["db"]["health"], "healthy");
    assert_eq!(s["web"]["health"], "healthy");
    assert_eq!(s["init"]["state"], "exited");
    assert!(s.values().all(|v| v["changed"] == true));
    // Dependency order: web starts after db is up and init has finished.
    let started = |n: &str| s[n]["started_at_ms"].as_u64().unwrap();
    assert!(started("db") > 0 && started("init") > 0);
    assert!(started("web") > started("db"), "{s:#?}");
    assert!(started("web") >= started("init") + 300, "init ran its 0.3 s before web started: {s:#?}");

    let again = deploy(&env, &host, &stack, &[]).expect_code(0);
    let s2 = services(&again);
    assert_eq!(ids(&s), ids(&s2), "no container was recreated");
    assert!(s2.values().all(|v| v["changed"] == false));
    assert!(again.json()["hosts"][0]["result"]["stack"]["summary"].as_str().unwrap().starts_with("nothing to change"));
    assert_eq!(again.json()["hosts"][0]["result"]["stack"]["sync"]["written"], 0, "no file rewritten");
    assert!(!again.stderr.contains(": build"), "the context hash is unchanged, so nothing is built: {}", again.stderr);
}

#[test]
fn changing_a_service_recreates_it_and_its_dependants_only() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s2");
    let stack = TestStack::new(THREE).unwrap();
    let before = ids(&services(&deploy(&env, &host, &stack, &[]).expect_code(0)));
    // MSG reaches db's environment through interpolation.
    let after_run = deploy(&env, &host, &stack, &[("MSG", "changed")]).expect_code(0);
    let after = ids(&services(&after_run));
    assert_ne!(before["db"], after["db"], "db changed");
    assert_ne!(before["web"], after["web"], "web depends on db");
    assert_eq!(before["init"], after["init"], "init does not depend on db");
    assert!(after_run.stderr.contains("db: recreate"), "{}", after_run.stderr);
}

#[test]
fn a_failing_health_check_fails_the_deploy_naming_service_and_output() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s3");
    let stack = TestStack::new(
        r#"
name: "{project}"
services:
  bad:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    healthcheck:
      test: ["CMD-SHELL", "echo database is not ready >&2; exit 1"]
      interval: 1s
      retries: 2
"#,
    )
    .unwrap();
    let run = deploy(&env, &host, &stack, &[]).expect_code(1);
    let (err, hint) = failure(&run);
    assert!(err.contains("service `bad` is unhealthy"), "{err}");
    assert!(err.contains("database is not ready"), "the health check's output: {err}");
    assert_eq!(hint, format!("`mlopsctl logs bad --project {}` shows what the service printed", stack.project));
}

#[test]
fn an_orphan_is_removed_and_volume_data_survives_down_and_deploy() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s4");
    let stack = TestStack::new(THREE).unwrap();
    let first = ids(&services(&deploy(&env, &host, &stack, &[]).expect_code(0)));
    let token = host.docker(&["exec", &first["db"], "cat", "/data/token"]);
    assert!(!token.is_empty());

    // `web` leaves the stack (and nobody depends on it): its container goes.
    let without_web = THREE.split("  web:").next().unwrap().to_string() + "volumes:\n  data:\n";
    stack.write_compose(&without_web).unwrap();
    let run = deploy(&env, &host, &stack, &[]).expect_code(0);
    assert!(run.stderr.contains("web: remove orphan"), "{}", run.stderr);
    assert_eq!(host.docker(&["ps", "-aq", "--filter", &format!("id={}", first["web"])]), "");

    // down keeps the volume; the next deploy finds the same data.
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    env.ctl(&["down", "--identity", &key, "--host", &host.spec("root"), "--stack", &dir]).expect_code(0);
    let filter = format!("label=mlops.project={}", stack.project);
    assert_eq!(host.docker(&["ps", "-aq", "--filter", &filter]), "", "containers removed");
    assert_eq!(host.docker(&["network", "ls", "-q", "--filter", &filter]), "", "network removed");
    assert_ne!(host.docker(&["volume", "ls", "-q", "--filter", &filter]), "", "volume kept");
    let again = ids(&services(&deploy(&env, &host, &stack, &[]).expect_code(0)));
    assert_eq!(host.docker(&["exec", &again["db"], "cat", "/data/token"]), token, "the volume's data survived");

    env.ctl(&["down", "--identity", &key, "--host", &host.spec("root"), "--stack", &dir, "--volumes"]).expect_code(0);
    assert_eq!(host.docker(&["volume", "ls", "-q", "--filter", &filter]), "", "--volumes removes them");
}

#[test]
fn a_second_concurrent_deploy_gets_the_lock_error() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s5");
    // Healthy only after ~3 s: the first deploy holds the lock that long.
    let stack = TestStack::new(
        r#"
name: "{project}"
services:
  slow:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3; mkdir -p /tmp; touch /tmp/ready; sleep 3600 & wait"]
    healthcheck:
      test: ["CMD", "test", "-f", "/tmp/ready"]
      interval: 500ms
      start_period: 20s
"#,
    )
    .unwrap();
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let spec = host.spec("root");
    // Build first, so the race is about the converge alone.
    deploy(&env, &host, &stack, &[]).expect_code(0);
    env.ctl(&["down", "--identity", &key, "--host", &spec, "--stack", &dir]).expect_code(0);

    let first = std::thread::spawn({
        let (key, dir, spec) = (key.clone(), dir.clone(), spec.clone());
        let env_home = env.home.clone();
        let state = env.state.clone();
        let (ctl, agent) = (env.mlopsctl.clone(), env.agent.clone());
        move || {
            std::process::Command::new(ctl)
                .args(["deploy", "--identity", &key, "--host", &spec, "--stack", &dir])
                .env("HOME", env_home)
                .env("MLOPS_STATE_DIR", state)
                .env("MLOPS_AGENT_BINARY", agent)
                .output()
                .unwrap()
        }
    });
    // Wait until the first deploy is converging (its container exists).
    let filter = format!("label=mlops.project={}", stack.project);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while host.docker(&["ps", "-q", "--filter", &filter]).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the first deploy did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = env.ctl(&["deploy", "--identity", &key, "--host", &spec, "--stack", &dir]).expect_code(1);
    assert!(
        second.stderr.contains(&format!("stack `{}` is being deployed by mlopsctl", stack.project)),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("hint: wait for that deploy to finish"), "{}", second.stderr);
    let first = first.join().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // The lock went with the first deploy.
    deploy(&env, &host, &stack, &[]).expect_code(0);
}

#[test]
fn compose_problems_are_reported_before_anything_runs() {
    let env = TestEnv::new().unwrap();
    // An unknown key is a warning with its line; the deploy goes on (here
    // it stops at the next problem: an unknown stack option value).
    let stack = TestStack::new(
        "name: \"{project}\"\nservices:\n  a:\n    build: ./img\n    sysctls: {a: 1}\n    restart: sometimes\n",
    )
    .unwrap();
    let dir = stack.path().display().to_string();
    let compose = stack.path().join("compose.yaml").display().to_string();
    let run = env.ctl(&["sync", "--stack", &dir, "--host", NO_HOST]).expect_code(2);
    assert!(run.stderr.contains(&format!("error: {compose}:6:14: restart `sometimes`")), "{}", run.stderr);
    stack
        .write_compose(
            "name: \"{project}\"\nservices:\n  a:\n    build: ./img\n    sysctls: {a: 1}\n    ports: [\"99999:80\"]\n",
        )
        .unwrap();
    let run = env.ctl(&["deploy", "--stack", &dir, "--host", NO_HOST]).expect_code(2);
    assert!(
        run.stderr.contains(&format!("error: {compose}:6:13: port `99999:80`: `99999` is not a port number")),
        "{}",
        run.stderr
    );
    // Warnings come out with the line even when the stack is fine.
    stack.write_compose("name: \"{project}\"\nservices:\n  a:\n    build: ./img\n    sysctls: {a: 1}\n").unwrap();
    // (`ui` reads the whole Compose file, then stops: this stack has no UI.)
    let run = env.ctl(&["ui", "web", "--stack", &dir, "--host", NO_HOST]).expect_code(2);
    assert!(run.stderr.contains("has no UI `web`"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("warning: {compose}:5:5: unknown key `sysctls` in service `a` is ignored")),
        "{}",
        run.stderr
    );
}

#[test]
fn logs_and_status_of_a_deployed_stack() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s6");
    let stack = TestStack::new(THREE).unwrap();
    deploy(&env, &host, &stack, &[]).expect_code(0);
    let key = env.key.display().to_string();
    let spec = host.spec("root");
    let logs =
        env.ctl(&["logs", "init", "--project", &stack.project, "--identity", &key, "--host", &spec]).expect_code(0);
    assert_eq!(logs.stdout, "init done\n");
    let status = env
        .ctl(&["status", "--project", &stack.project, "--identity", &key, "--host", &spec, "--output", "json"])
        .expect_code(0)
        .json();
    let names: Vec<&str> =
        status["hosts"][0]["services"].as_array().unwrap().iter().map(|s| s["service"].as_str().unwrap()).collect();
    assert_eq!(names, ["db", "init", "web"]);
    let missing =
        env.ctl(&["logs", "nope", "--project", &stack.project, "--identity", &key, "--host", &spec]).expect_code(1);
    assert!(missing.stderr.contains("has no service `nope`"), "{}", missing.stderr);
}

#[test]
fn health_transitions_come_from_docker_events() {
    use std::io::BufRead;
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s7");
    let stack = TestStack::new(THREE).unwrap();
    let web = ids(&services(&deploy(&env, &host, &stack, &[]).expect_code(0)))["web"].clone();
    let key = env.key.display().to_string();
    let mut child = std::process::Command::new(&env.mlopsctl)
        .args([
            "watch",
            "--project",
            &stack.project,
            "--identity",
            &key,
            "--host",
            &host.spec("root"),
            "--output",
            "json",
        ])
        .env("HOME", &env.home)
        .env("MLOPS_STATE_DIR", &env.state)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    let next = |want: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ev = rx.recv_timeout(left).expect("the expected event did not come");
            if want(&ev) {
                return ev;
            }
        }
    };
    // First the current state of every service...
    next(&|e| e["service"] == "web" && e["health"] == "healthy");
    // ...then what Docker reports.
    host.docker(&["stop", "-t", "1", &web]);
    let stopped = next(&|e| e["service"] == "web" && e["state"] == "exited");
    assert!(stopped["docker_time_ns"].as_u64().unwrap() > 0, "{stopped}");
    assert_eq!(stopped["health"], "", "a stopped container has no health: {stopped}");
    host.docker(&["start", &web]);
    next(&|e| e["service"] == "web" && e["state"] == "running");
    next(&|e| e["service"] == "web" && e["health"] == "healthy");
    let _ = child.kill();
    let _ = child.wait();
    // With nothing happening in the stack, the agent still notices that the
    // watcher went away, and stops watching.
    let gone = format!("health watch of {}: the client went away; stopped", stack.project);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !host.agent_log().contains(&gone) {
        assert!(std::time::Instant::now() < deadline, "the watch lives on:\n{}", host.agent_log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_missing_debian_base_image_is_built_from_the_mirror_when_asked() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s8");
    let stack = TestStack::new(
        r#"
name: "{project}"
x-mlops:
  bootstrap_base_images: true
services:
  deb:
    build: ./deb
"#,
    )
    .unwrap();
    let deb = stack.path().join("deb");
    std::fs::create_dir_all(&deb).unwrap();
    std::fs::write(
        deb.join("Dockerfile"),
        "FROM debian:bookworm\nRUN echo built-on-debian > /built\nCMD [\"sh\", \"-c\", \"cat /built /etc/debian_version; trap 'exit 0' TERM; sleep 3600 & wait\"]\n",
    )
    .unwrap();
    // No registry here, and the host's engine is new: the base image must
    // come from the host's mirror.
    assert_eq!(host.docker(&["images", "-q", "debian:bookworm"]), "");
    let run = deploy(&env, &host, &stack, &[]).expect_code(0);
    assert!(run.stderr.contains("building it with debootstrap from this host's Debian mirror"), "{}", run.stderr);
    assert_ne!(host.docker(&["images", "-q", "debian:bookworm"]), "", "the base image stays for later builds");
    let key = env.key.display().to_string();
    let logs = env
        .ctl(&["logs", "deb", "--project", &stack.project, "--identity", &key, "--host", &host.spec("root")])
        .expect_code(0);
    assert!(logs.stdout.starts_with("built-on-debian\n12."), "{}", logs.stdout);
}

#[test]
fn ui_opens_an_ssh_tunnel_to_the_hosts_loopback() {
    use std::io::BufRead;
    let env = TestEnv::new().unwrap();
    let host = env.host("ui").unwrap();
    // Something listening on the host's loopback only, as the platform's UIs do.
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "hello from the host\n").unwrap();
    host.exec(&format!("/bin/busybox httpd -p 127.0.0.1:18555 -h {}", www.path().display())).unwrap();
    let stack = TestStack::new(
        "name: \"{project}\"\nx-mlops:\n  ui:\n    web: {service: web, port: 18555, path: /index.html}\nservices:\n  web:\n    build: ./img\n",
    )
    .unwrap();
    let local_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let key = env.key.display().to_string();
    let mut child = std::process::Command::new(&env.mlopsctl)
        .args([
            "ui",
            "web",
            "--stack",
            &stack.path().display().to_string(),
            "--identity",
            &key,
            "--host",
            &host.spec("root"),
        ])
        .args(["--port", &local_port])
        .env("HOME", &env.home)
        .env("MLOPS_STATE_DIR", &env.state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut url = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut url).unwrap();
    assert_eq!(url.trim(), format!("http://127.0.0.1:{local_port}/index.html"));
    let out = std::process::Command::new("curl").args(["-s", "-m", "10", url.trim()]).output().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the host\n");
}

/// The JSON error of the only host of a failed run, with its hint.
fn failure(run: &mlops_e2e::CtlRun) -> (String, String) {
    let json = run.json();
    let host = &json["hosts"][0];
    (
        host["error"].as_str().unwrap_or_else(|| panic!("no error in {json:#}")).to_string(),
        host["hint"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn a_port_taken_by_another_process_is_named_with_its_holder() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s9");
    // Something of the host's own holds the port the stack publishes.
    let www = tempfile::tempdir().unwrap();
    host.exec(&format!("/bin/busybox httpd -p 0.0.0.0:18601 -h {}", www.path().display())).unwrap();
    let stack = TestStack::new(
        "name: \"{project}\"\nservices:\n  web:\n    build: ./img\n    command: [\"httpd\", \"-f\", \"-p\", \"80\"]\n    ports: [\"18601:80\"]\n",
    )
    .unwrap();
    let run = deploy(&env, &host, &stack, &[]).expect_code(1);
    let (error, hint) = failure(&run);
    assert!(
        error.contains("service `web` cannot publish port 0.0.0.0:18601: it is in use by busybox (pid "),
        "{error}"
    );
    assert!(hint.starts_with("free port 18601 on the host (held by busybox (pid "), "{hint}");
}

#[test]
fn an_image_no_registry_supplies_is_named_with_the_way_out() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s10");
    // A registry on the host's own loopback where nothing listens: the pull
    // fails at once, and no traffic leaves the test host.
    let stack =
        TestStack::new("name: \"{project}\"\nservices:\n  grafana:\n    image: 127.0.0.1:9/grafana:1\n").unwrap();
    let run = deploy(&env, &host, &stack, &[]).expect_code(1);
    let (error, hint) = failure(&run);
    assert!(error.contains("service `grafana`: cannot pull image 127.0.0.1:9/grafana:1"), "{error}");
    assert!(hint.contains("--skip grafana"), "{hint}");
    assert!(run.stderr.contains("grafana: pulling 127.0.0.1:9/grafana:1"), "{}", run.stderr);
}

/// Compose `logging` reaches the engine: a container that writes about a
/// megabyte a second keeps its log under the cap its rotation sets (two
/// files of 64 KiB), and `mlopsctl logs` still reads it.
#[test]
fn a_chatty_container_s_log_stays_under_its_rotation_cap() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "s9");
    let stack = TestStack::new(
        r#"
name: "{project}"
services:
  chatty:
    build: ./img
    command: [sh, -c, "while :; do echo 'a line of about a hundred bytes, written as fast as the shell can, again and again and again'; done"]
    logging:
      driver: json-file
      options: {max-size: 64k, max-file: "2"}
"#,
    )
    .unwrap();
    deploy(&env, &host, &stack, &[]).expect_code(0);
    let container = format!("{}-chatty-1", stack.project);
    let config = host.docker(&["inspect", "--format", "{{json .HostConfig.LogConfig}}", &container]);
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["Type"], "json-file", "{config}");
    assert_eq!(config["Config"]["max-size"], "64k", "{config}");
    let log_path = std::path::PathBuf::from(host.docker(&["inspect", "--format", "{{.LogPath}}", &container]));
    let dir = log_path.parent().unwrap();
    let name = log_path.file_name().unwrap().to_string_lossy().into_owned();
    // Long enough for an unrotated log to grow far past the cap.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let sizes = || -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    let total = sizes();
    assert!(total > 0, "the container writes to its log");
    // Two files of 64 KiB, and what one write can add past the cap.
    assert!(total <= 2 * 64 * 1024 + 16 * 1024, "{total} bytes of log kept");
    let key = env.key.display().to_string();
    let spec = host.spec("root");
    let logs = env
        .ctl(&["logs", "chatty", "--tail", "3", "--project", &stack.project, "--identity", &key, "--host", &spec])
        .expect_code(0);
    assert!(logs.stdout.lines().count() >= 1 && logs.stdout.contains("a line of about"), "{}", logs.stdout);
}

/// Disk pressure. A build below the free-space floor is refused before it
/// starts, naming the service, Docker's data directory and the floor,
/// with the way out. `status` shows that directory's free space and what
/// Docker's data takes. Once no kept revision uses an image of the stack
/// (`down` forgets the revisions) and it is tagged by nothing, the agent
/// removes it; a dangling image that is not the stack's stays.
#[test]
fn builds_stop_at_the_free_space_floor_status_shows_the_disk_and_stale_images_go() {
    let env = TestEnv::new().unwrap();
    let host = stack_host(&env, "disk");
    let stack =
        TestStack::new("name: \"{project}\"\nservices:\n  web:\n    build: ./img\n    command: [sleep, infinity]\n")
            .unwrap();
    let (key, dir, spec) = (env.key.display().to_string(), stack.path().display().to_string(), host.spec("root"));
    let ctl = |args: &[&str]| {
        let mut all = vec!["--identity", key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        env.ctl(&all)
    };
    let ours = || -> Vec<String> {
        let label = format!("label=mlops.project={}", stack.project);
        let mut ids: Vec<String> =
            host.docker(&["images", "-q", "--no-trunc", "--filter", &label]).lines().map(str::to_string).collect();
        // One line per tag: a kept revision's tag names an image twice.
        ids.sort();
        ids.dedup();
        ids
    };

    // 1000 TiB: more than any test machine has.
    let refused = ctl(&["deploy", "--stack", &dir, "--min-free-space", "1000T"]).expect_code(1);
    for part in ["service `web`", "free in", "(Docker's data), below the", "floor for image builds", "--min-free-space"]
    {
        assert!(refused.stderr.contains(part), "`{part}` in:\n{}", refused.stderr);
    }
    assert!(ours().is_empty(), "nothing was built");
    let bad = ctl(&["deploy", "--stack", &dir, "--min-free-space", "lots"]).expect_code(2);
    assert!(bad.stderr.contains("expected a size such as 5G"), "{}", bad.stderr);

    // Under the default floor (5 GiB) it builds; a second revision moves the tag.
    ctl(&["deploy", "--stack", &dir]).expect_code(0);
    let first = ours();
    assert_eq!(first.len(), 1, "{first:?}");
    let dockerfile = stack.path().join("img/Dockerfile");
    let mut text = std::fs::read_to_string(&dockerfile).unwrap();
    text.push_str("RUN [\"/bin/busybox\", \"touch\", \"/second\"]\n");
    std::fs::write(&dockerfile, text).unwrap();
    ctl(&["deploy", "--stack", &dir]).expect_code(0);
    let both = ours();
    assert_eq!(both.len(), 2, "the first image stays for the kept revision: {both:?}");

    let status = ctl(&["status", "--output", "json"]).expect_code(0).json();
    let disk = &status["hosts"][0]["facts"]["docker_disk"];
    assert!(disk["root_dir"].as_str().unwrap().ends_with("/docker"), "{disk:#}");
    assert!(
        disk["available_bytes"].as_u64().unwrap() > 0
            && disk["total_bytes"].as_u64() > disk["available_bytes"].as_u64()
    );
    assert!(disk["images_bytes"].as_u64().unwrap() > 0, "{disk:#}");
    let text = ctl(&["status"]).expect_code(0);
    assert!(text.stdout.contains("DOCKER DATA") && text.stdout.contains("BUILD CACHE"), "{}", text.stdout);

    // Somebody else's dangling image: imported twice under one tag.
    let scratch = tempfile::tempdir().unwrap();
    for n in ["1", "2"] {
        let tar = scratch.path().join(format!("{n}.tar"));
        std::fs::write(scratch.path().join("f"), n).unwrap();
        let out = std::process::Command::new("tar")
            .args(["-C", scratch.path().to_str().unwrap(), "-cf", tar.to_str().unwrap(), "f"])
            .output()
            .unwrap();
        assert!(out.status.success());
        host.docker(&["import", tar.to_str().unwrap(), "someone-else:1"]);
    }
    let theirs = host.docker(&["images", "-q", "--no-trunc", "--filter", "dangling=true"]);
    assert_eq!(theirs.lines().count(), 1, "{theirs}");

    ctl(&["down", "--stack", &dir]).expect_code(0);
    let left = ours();
    assert_eq!(left.len(), 1, "the stale image went, the current one stayed: {left:?}");
    assert!(both.contains(&left[0]) && !first.contains(&left[0]), "{left:?} {first:?}");
    assert_eq!(host.docker(&["images", "-q", "--no-trunc", "--filter", "dangling=true"]), theirs, "theirs stays");
}
