//! `mlopsctl deploy`, `status` and `agent uninstall` against real sshd
//! hosts (network namespaces) with the real agent.

use std::fs;

use mlops_e2e::{SUDO_PASSWORD_USER, SUDO_USER, TestEnv, TestHost, TestStack, bins, sha256_file};
use serde_json::Value;

/// A process that exists and is not a zombie (the test machine's PID 1
/// may not reap the daemons it inherits).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
}

/// Another build of the agent: the same program with different bytes.
fn another_agent_build(env: &TestEnv) -> (std::path::PathBuf, Vec<u8>) {
    let newer = env.dir.path().join("mlops-agent-newer");
    let mut bytes = fs::read(&bins().agent).unwrap();
    bytes.extend_from_slice(b"\0mlops-another-build");
    fs::write(&newer, &bytes).unwrap();
    fs::set_permissions(&newer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (newer, bytes)
}

fn deploy_with_agent(env: &TestEnv, spec: &str, agent: &std::path::Path) -> Value {
    let agent = agent.to_str().unwrap();
    env.ctl_key(&["deploy", "--no-stack", "--host", spec, "--agent-binary", agent, "--output", "json"])
        .expect_code(0)
        .json()
}

fn host_result<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == name)
        .unwrap_or_else(|| panic!("{name} not in {json:#}"))
}

#[test]
fn deploy_one_host_then_redeploy_uploads_nothing() {
    let env = TestEnv::new().unwrap();
    let host = env.host("h1").unwrap();
    let spec = host.spec("root");

    let first = env.ctl_key(&["deploy", "--no-stack", "--host", &spec, "--output", "json"]).expect_code(0).json();
    let r = &host_result(&first, &spec)["result"];
    assert_eq!(r["uploaded"], true);
    assert_eq!(r["installed"], "first install");
    assert_eq!(r["agent"]["binary_sha256"], sha256_file(&bins().agent).unwrap());
    assert_eq!(r["agent"]["service_manager"], "daemon", "PID 1 is not systemd here");
    assert_eq!(r["facts"]["arch"], std::env::consts::ARCH);
    let pid = host.agent_pid().expect("the agent runs, with a pidfile");
    assert_eq!(r["agent"]["pid"], pid);

    // The key stays private and the agent listens on loopback only.
    let mode = fs::metadata(host.path("/etc/mlops-agent/tls/server.key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    let listening = host.exec("cat /proc/net/tcp").unwrap();
    let text = String::from_utf8_lossy(&listening.stdout);
    // 7443 = 0x1D13, bound to 0100007F (127.0.0.1), state 0A (LISTEN).
    assert!(text.lines().any(|l| l.contains("0100007F:1D13") && l.contains(" 0A ")), "{text}");
    assert!(!text.lines().any(|l| l.contains("00000000:1D13")), "not on every address: {text}");

    let second = env.ctl_key(&["deploy", "--no-stack", "--host", &spec, "--output", "json"]).expect_code(0).json();
    let r = &host_result(&second, &spec)["result"];
    assert_eq!(r["uploaded"], false, "same hash: nothing uploaded");
    assert_eq!(r["installed"], Value::Null, "nothing changed: no restart");
    assert_eq!(host.agent_pid(), Some(pid), "same process");

    let status = env.ctl_key(&["status", "--host", &spec, "--output", "json"]).expect_code(0).json();
    let s = host_result(&status, &spec);
    assert_eq!(s["reachable"], true);
    assert_eq!(s["agent"]["version"], env!("CARGO_PKG_VERSION"));
}

/// The run logs of `env`'s state directory for `command`, oldest first.
fn run_logs(env: &TestEnv, command: &str) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> =
        fs::read_dir(env.state.join("logs")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    logs.retain(|p: &std::path::PathBuf| p.to_string_lossy().contains(&format!("-{command}-")));
    logs.sort();
    logs
}

#[test]
fn progress_is_live_on_a_terminal_plain_with_v_and_every_run_is_logged() {
    let env = TestEnv::new().unwrap();
    let host = env.docker_host("live").unwrap();
    let spec = host.spec("root");
    let key = env.key.display().to_string();
    let stack =
        TestStack::new("name: \"{project}\"\nservices:\n  web:\n    build: ./img\n    command: [sleep, infinity]\n")
            .unwrap();
    let dir = stack.path().display().to_string();
    let deploy = ["--identity", key.as_str(), "--host", spec.as_str(), "deploy", "--stack", dir.as_str()];

    // On a terminal: live lines redrawn in place (cursor movements), the
    // host marked done; not a line per event.
    let live = env.ctl_on_terminal(&deploy);
    assert_eq!(live.code, 0, "{}", live.stdout);
    assert!(live.stdout.contains('✓'), "the host's line ends marked done: {}", live.stdout);
    assert!(live.stdout.contains("\x1b["), "lines are redrawn: {}", live.stdout);
    // Every line is in the run's log all the same, time-stamped.
    let logs = run_logs(&env, "deploy");
    assert_eq!(logs.len(), 1, "{logs:?}");
    let log = fs::read_to_string(&logs[0]).unwrap();
    for line in ["connecting to", "ready: agent", "files synced", "web: "] {
        assert!(log.contains(line), "`{line}` in the log: {log}");
    }
    assert!(log.lines().all(|l| l.starts_with("20") && l.contains("Z ")), "{log}");

    // -v: a plain line per event, as without a terminal.
    let plain = env.ctl_on_terminal(&[&deploy[..], &["-v"]].concat());
    assert_eq!(plain.code, 0, "{}", plain.stdout);
    assert!(!plain.stdout.contains('✓') && plain.stdout.contains("connecting to"), "{}", plain.stdout);
    assert!(!plain.stdout.contains("the full log"), "a run that succeeded names no log");
    assert_eq!(run_logs(&env, "deploy").len(), 2);

    // A run that fails names its log, where the failure is too.
    let mut down = host;
    down.stop_sshd();
    let failed = env.ctl(&deploy).expect_code(1);
    let path = failed
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("the full log of this run: "))
        .unwrap_or_else(|| panic!("the log's path is printed: {}", failed.stderr));
    let log = fs::read_to_string(path).unwrap();
    assert!(log.contains("FAILED") && log.contains("error: deploy failed on 1 of 1 host(s)"), "{log}");
}

#[test]
fn five_hosts_in_parallel_from_an_inventory_with_a_sudo_user() {
    let env = TestEnv::new().unwrap();
    let hosts: Vec<TestHost> = (1..=5).map(|i| env.host(&format!("m{i}")).unwrap()).collect();
    let mut inv = String::from("all:\n  vars:\n    ansible_user: root\n  children:\n    workers:\n      hosts:\n");
    for h in &hosts[..4] {
        inv.push_str(&format!("        {}:\n          ansible_host: {}\n", h.name, h.addr));
    }
    inv.push_str(&format!(
        "    sudoers:\n      vars:\n        ansible_user: {SUDO_USER}\n        ansible_become: true\n      hosts:\n        {}:\n          ansible_host: {}\n",
        hosts[4].name, hosts[4].addr
    ));
    let path = env.write("inventory.yml", &inv).unwrap();
    let key = env.key.display().to_string();
    let out = env
        .ctl(&["deploy", "--no-stack", "-i", path.to_str().unwrap(), "--identity", &key, "--output", "json"])
        .expect_code(0);
    let json = out.json();
    assert_eq!(json["ok"], 5, "{}", out.stderr);
    for h in &hosts {
        assert!(h.agent_pid().is_some(), "{} runs an agent", h.name);
        assert_eq!(host_result(&json, &h.name)["result"]["uploaded"], true);
    }
    // Each host printed its own progress.
    for h in &hosts {
        assert!(out.stderr.contains(&format!("  {}", h.name)), "{}", out.stderr);
    }
}

#[test]
fn a_new_agent_binary_is_uploaded_and_restarted() {
    let env = TestEnv::new().unwrap();
    let host = env.host("up").unwrap();
    let spec = host.spec("root");
    env.ctl_key(&["deploy", "--no-stack", "--host", &spec]).expect_code(0);
    let old_pid = host.agent_pid().unwrap();

    let (newer, _) = another_agent_build(&env);
    let json = deploy_with_agent(&env, &spec, &newer);
    let r = &host_result(&json, &spec)["result"];
    assert_eq!(r["uploaded"], true);
    assert_eq!(r["installed"], "agent binary changed");
    let new_sha = sha256_file(&newer).unwrap();
    assert_eq!(r["agent"]["binary_sha256"], new_sha, "the running process is the new binary");
    assert_eq!(sha256_file(&host.path("/usr/local/lib/mlops-agent/mlops-agent")).unwrap(), new_sha);
    let new_pid = host.agent_pid().unwrap();
    assert_ne!(new_pid, old_pid, "restarted");
    assert!(!alive(old_pid), "the old agent is gone");
}

#[test]
fn an_agent_that_died_is_restarted_on_deploy() {
    let env = TestEnv::new().unwrap();
    let host = env.host("dead").unwrap();
    let spec = host.spec("root");
    env.ctl_key(&["deploy", "--no-stack", "--host", &spec]).expect_code(0);
    let pid = host.agent_pid().unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the agent process this test started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let json = env.ctl_key(&["deploy", "--no-stack", "--host", &spec, "--output", "json"]).expect_code(0).json();
    let r = &host_result(&json, &spec)["result"];
    assert_eq!(r["installed"], "agent was not running");
    assert_eq!(r["uploaded"], false);
    assert!(host.agent_pid().is_some_and(|p| p != pid));
}

#[test]
fn a_frozen_agent_is_reported_not_waited_for() {
    let mut env = TestEnv::new().unwrap();
    let host = env.host("frozen").unwrap();
    let spec = host.spec("root");
    env.ctl_key(&["deploy", "--no-stack", "--host", &spec]).expect_code(0);
    let pid = host.agent_pid().unwrap();
    // Stopped, not dead: the kernel still accepts connections on its port,
    // and nothing ever answers them. `status` must say so and end (bounded
    // by the connect timeout and the first call's), never wait.
    env.ctl_deadline = std::time::Duration::from_secs(120);
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the agent process this test started.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let out = env.ctl_key(&["status", "--host", &spec, "--output", "json"]);
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    let json = out.expect_code(1).json();
    assert!(json["hosts"][0]["error"].as_str().unwrap().contains("does not answer"), "{json:#}");
    env.ctl_key(&["status", "--host", &spec]).expect_code(0);
}

#[test]
fn unknown_host_key_is_refused_unless_accepted() {
    let env = TestEnv::new().unwrap();
    let host = TestHost::start_on_port("unk", 2222).unwrap();
    host.authorize("root", &env.public_key).unwrap();
    let spec = host.spec("root");

    let out = env.ctl_key(&["deploy", "--no-stack", "--host", &spec]).expect_code(1);
    assert!(out.stderr.contains(&format!("host key of {}:2222 is not known (SHA256:", host.addr)), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("ssh-keyscan -p 2222 {}", host.addr)), "{}", out.stderr);
    assert!(out.stderr.contains("hint: if this is the host you expect, pass --accept-new-host-keys"), "{}", out.stderr);
    assert!(host.agent_pid().is_none(), "nothing was installed");

    env.ctl_key(&["deploy", "--no-stack", "--host", &spec, "--accept-new-host-keys"]).expect_code(0);
    let known = fs::read_to_string(&env.known_hosts).unwrap();
    assert!(known.contains(&host.known_hosts_line()), "recorded as `[addr]:2222 key`: {known}");
    // Recorded: accepted from now on without the flag.
    env.ctl_key(&["status", "--host", &spec]).expect_code(0);
}

#[test]
fn a_changed_host_key_is_refused_even_with_accept_new() {
    let env = TestEnv::new().unwrap();
    let host = TestHost::start("chg").unwrap();
    host.authorize("root", &env.public_key).unwrap();
    let other = TestHost::start("other").unwrap();
    // known_hosts holds another machine's key for this address.
    env.add_known_host(&format!("{} {}", host.known_hosts_name(), other.host_key)).unwrap();

    let out =
        env.ctl_key(&["deploy", "--no-stack", "--host", &host.spec("root"), "--accept-new-host-keys"]).expect_code(1);
    assert!(out.stderr.contains("HAS CHANGED"), "{}", out.stderr);
    assert!(out.stderr.contains(&"known_hosts:1".to_string()), "names the line: {}", out.stderr);
    assert!(out.stderr.contains("ssh-keygen -R"), "{}", out.stderr);
    assert!(host.agent_pid().is_none());
    let known = fs::read_to_string(&env.known_hosts).unwrap();
    assert_eq!(known.lines().count(), 1, "nothing was added: {known}");
}

#[test]
fn hashed_known_hosts_entries_are_accepted() {
    let env = TestEnv::new().unwrap();
    let host = env.host("hash").unwrap();
    let out = std::process::Command::new("ssh-keygen").arg("-H").arg("-f").arg(&env.known_hosts).output().unwrap();
    assert!(out.status.success());
    let known = fs::read_to_string(&env.known_hosts).unwrap();
    assert!(known.starts_with("|1|") && !known.contains(&host.addr), "hashed: {known}");
    env.ctl_key(&["deploy", "--no-stack", "--host", &host.spec("root")]).expect_code(0);
}

#[test]
fn a_wrong_private_key_is_a_clear_error() {
    let env = TestEnv::new().unwrap();
    let host = env.host("key").unwrap();
    let wrong = env.dir.path().join("wrong_ed25519");
    std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&wrong)
        .status()
        .unwrap();
    let out = env
        .ctl(&["deploy", "--no-stack", "--host", &host.spec("root"), "--identity", wrong.to_str().unwrap()])
        .expect_code(1);
    assert!(out.stderr.contains(&format!("permission denied for root@{}:22", host.addr)), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("tried {}", wrong.display())), "{}", out.stderr);
    assert!(
        out.stderr.contains("hint: check that one of these public keys is in ~root/.ssh/authorized_keys"),
        "{}",
        out.stderr
    );

    let missing = env
        .ctl(&["deploy", "--no-stack", "--host", &host.spec("root"), "--identity", "/nonexistent/key"])
        .expect_code(2);
    assert!(missing.stderr.contains("cannot load private key /nonexistent/key: no such file"), "{}", missing.stderr);
}

#[test]
fn sudo_that_needs_a_password_is_named() {
    let env = TestEnv::new().unwrap();
    let host = env.host("pw").unwrap();
    let out = env.ctl_key(&["deploy", "--no-stack", "--host", &host.spec(SUDO_PASSWORD_USER)]).expect_code(1);
    assert!(
        out.stderr
            .contains(&format!("sudo on {} asks {SUDO_PASSWORD_USER} for a password", host.spec(SUDO_PASSWORD_USER))),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("NOPASSWD"), "{}", out.stderr);
}

#[test]
fn a_down_host_fails_alone() {
    let env = TestEnv::new().unwrap();
    let a = env.host("ok-a").unwrap();
    let b = env.host("ok-b").unwrap();
    let mut down = env.host("down").unwrap();
    down.stop_sshd();
    let inv = format!(
        "all:\n  vars:\n    ansible_user: root\n  hosts:\n    ok-a:\n      ansible_host: {}\n    down:\n      ansible_host: {}\n    ok-b:\n      ansible_host: {}\n",
        a.addr, down.addr, b.addr
    );
    let path = env.write("inv.yml", &inv).unwrap();
    let out =
        env.ctl_key(&["deploy", "--no-stack", "-i", path.to_str().unwrap(), "--connect-timeout", "5"]).expect_code(1);
    assert!(a.agent_pid().is_some() && b.agent_pid().is_some(), "the others succeeded");
    assert!(out.stderr.contains("error: deploy failed on 1 of 3 host(s): down"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("cannot connect to {}:22", down.addr)), "{}", out.stderr);
    assert!(out.stderr.contains("Caused by: Connection refused"), "{}", out.stderr);
    // The table still lists the hosts that worked.
    assert!(
        out.stdout.contains("ok-a") && out.stdout.contains("ok-b") && !out.stdout.contains("down"),
        "{}",
        out.stdout
    );

    let status = env.ctl_key(&["status", "-i", path.to_str().unwrap(), "--output", "json"]).expect_code(1).json();
    assert_eq!(host_result(&status, "down")["reachable"], false);
    assert_eq!(host_result(&status, "ok-a")["reachable"], true);
}

#[test]
fn limit_selects_inventory_hosts() {
    let env = TestEnv::new().unwrap();
    let w1 = env.host("w1").unwrap();
    let w2 = env.host("w2").unwrap();
    let d1 = env.host("d1").unwrap();
    let inv = format!(
        "all:\n  vars:\n    ansible_user: root\n  children:\n    web:\n      hosts:\n        w1: {{ansible_host: {}}}\n        w2: {{ansible_host: {}}}\n    db:\n      hosts:\n        d1: {{ansible_host: {}}}\n",
        w1.addr, w2.addr, d1.addr
    );
    let path = env.write("inv.yml", &inv).unwrap();
    let json = env
        .ctl_key(&["deploy", "--no-stack", "-i", path.to_str().unwrap(), "--limit", "web:!w2", "--output", "json"])
        .expect_code(0)
        .json();
    let names: Vec<&str> = json["hosts"].as_array().unwrap().iter().map(|h| h["host"].as_str().unwrap()).collect();
    assert_eq!(names, ["w1"]);
    assert!(w1.agent_pid().is_some() && w2.agent_pid().is_none() && d1.agent_pid().is_none());

    let out = env.ctl_key(&["deploy", "--no-stack", "-i", path.to_str().unwrap(), "--limit", "nosuch"]).expect_code(2);
    assert!(out.stderr.contains("--limit `nosuch`: `nosuch` matches no group and no host"), "{}", out.stderr);
}

#[test]
fn uninstall_removes_the_agent() {
    let env = TestEnv::new().unwrap();
    let host = env.host("rm").unwrap();
    let spec = host.spec(SUDO_USER);
    env.ctl_key(&["deploy", "--no-stack", "--host", &spec]).expect_code(0);
    let pid = host.agent_pid().unwrap();
    let out = env.ctl_key(&["agent", "uninstall", "--host", &spec]).expect_code(0);
    assert!(out.stdout.contains("agent removed"), "{}", out.stdout);
    assert!(!alive(pid), "the agent stopped");
    assert!(!host.path("/usr/local/lib/mlops-agent/mlops-agent").exists());
    assert!(!host.path("/etc/mlops-agent/tls/server.key").exists());
    let status = env.ctl_key(&["status", "--host", &spec, "--output", "json"]).expect_code(1).json();
    assert_eq!(host_result(&status, &spec)["reachable"], true);
    assert_eq!(host_result(&status, &spec)["agent"], Value::Null);
    // Again: nothing to do, not an error.
    let again = env.ctl_key(&["agent", "uninstall", "--host", &spec]).expect_code(0);
    assert!(again.stdout.contains("no agent installed"), "{}", again.stdout);
}

#[test]
fn ssh_config_aliases_and_ssh_agent_keys_are_used() {
    let env = TestEnv::new().unwrap();
    let host = env.host("alias").unwrap();
    // ~/.ssh/config names the host; the key is offered only by ssh-agent.
    fs::write(env.home.join(".ssh/config"), format!("Host box\n  HostName {}\n  User {SUDO_USER}\n", host.addr))
        .unwrap();
    let sock = env.dir.path().join("agent.sock");
    let agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let added = std::process::Command::new("ssh-add").arg(&env.key).env("SSH_AUTH_SOCK", &sock).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));

    let sock = sock.display().to_string();
    let out = env
        .ctl_with(&["deploy", "--no-stack", "--host", "box", "--output", "json"], &[("SSH_AUTH_SOCK", &sock)])
        .expect_code(0);
    let json = out.json();
    assert_eq!(host_result(&json, "box")["result"]["address"], format!("{SUDO_USER}@{}:22", host.addr));
    assert!(host.agent_pid().is_some());

    // Without the agent there is no key to offer.
    let out = env.ctl(&["status", "--host", "box"]).expect_code(1);
    assert!(
        out.stdout.contains("no key was available") || out.stderr.contains("no key was available"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn an_agent_running_an_older_binary_is_restarted() {
    let env = TestEnv::new().unwrap();
    let host = env.host("stale").unwrap();
    let spec = host.spec("root");
    env.ctl_key(&["deploy", "--no-stack", "--host", &spec]).expect_code(0);
    let old_pid = host.agent_pid().unwrap();
    // The file on the host is replaced behind the agent's back (a package
    // manager, a half-finished earlier deploy): the process still runs the old code.
    let (newer, bytes) = another_agent_build(&env);
    let installed = host.path("/usr/local/lib/mlops-agent/mlops-agent");
    fs::write(installed.with_extension("new"), &bytes).unwrap();
    fs::set_permissions(installed.with_extension("new"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::rename(installed.with_extension("new"), &installed).unwrap();

    let json = deploy_with_agent(&env, &spec, &newer);
    let r = &host_result(&json, &spec)["result"];
    assert_eq!(r["uploaded"], false, "the file already matched");
    assert_eq!(r["installed"], "running agent is an older binary");
    assert_eq!(r["agent"]["binary_sha256"], sha256_file(&newer).unwrap());
    assert_ne!(host.agent_pid(), Some(old_pid));
}

#[test]
fn an_agent_of_another_controller_is_named_as_such() {
    let first = TestEnv::new().unwrap();
    let host = first.host("taken").unwrap();
    first.ctl_key(&["deploy", "--no-stack", "--host", &host.spec("root")]).expect_code(0);
    // Another state directory, so another CA: the agent refuses it, and
    // the status says why and what to do.
    let second = TestEnv::new().unwrap();
    second.trust(&host).unwrap();
    let status = second.ctl_key(&["status", "--host", &host.spec("root"), "--output", "json"]).expect_code(1).json();
    let h = &status["hosts"][0];
    assert_eq!(h["reachable"], true);
    assert!(h["hint"].as_str().unwrap().contains("another controller's CA"), "{h:#}");
    let text = second.ctl_key(&["status", "--host", &host.spec("root")]).expect_code(1);
    let row = text.stdout.lines().nth(1).unwrap();
    assert!(row.contains(" no agent "), "{row}");
    // The cause is said once, not repeated down the chain.
    assert_eq!(row.matches("does not answer").count(), 1, "{row}");
    assert!(text.stderr.contains("another controller's CA"), "{}", text.stderr);

    // A deploy from the second controller leaves the agent alone and says
    // why (it would lock the first controller out); the first still
    // reaches it.
    let pid = host.agent_pid();
    let run = second.ctl_key(&["deploy", "--no-stack", "--host", &host.spec("root")]).expect_code(1);
    assert!(run.stderr.contains("installed by another controller"), "{}", run.stderr);
    assert!(run.stderr.contains("--take-over"), "the hint names the way out: {}", run.stderr);
    assert_eq!(host.agent_pid(), pid, "the agent was not restarted");
    first.ctl_key(&["status", "--host", &host.spec("root")]).expect_code(0);
    // With --take-over it is re-keyed for the second; the first is refused now.
    second.ctl_key(&["deploy", "--no-stack", "--take-over", "--host", &host.spec("root")]).expect_code(0);
    second.ctl_key(&["status", "--host", &host.spec("root")]).expect_code(0);
    first.ctl_key(&["status", "--host", &host.spec("root")]).expect_code(1);
}
