//! Attacks on a real agent on test hosts, each refused (issue 8). The
//! attackers of the threat model (ARCHITECTURE.md): whoever can put files
//! into a stack directory, unprivileged users on a host, containers, and
//! the network between controller and host.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::Path;

use mlops_e2e::{TestEnv, TestHost, TestStack};

const IDLE: &str = r#"
name: "{project}"
services:
  idle:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"#;

fn sync(env: &TestEnv, host: &TestHost, stack: &TestStack) -> mlops_e2e::CtlRun {
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    env.ctl(&["sync", "--identity", &key, "--host", &host.spec("root"), "--stack", &dir])
}

/// Kills a child started in its own process group, and everything in it.
fn end_group(child: &mut std::process::Child) {
    // SAFETY: kill(2) on the process group of a child this test started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Installs the agent alone (hosts without an engine).
fn agent_only(env: &TestEnv, host: &TestHost) {
    let key = env.key.display().to_string();
    env.ctl(&["deploy", "--no-stack", "--identity", &key, "--host", &host.spec("root")]).expect_code(0);
}

fn tree(host: &TestHost, stack: &TestStack) -> std::path::PathBuf {
    host.path(&format!("/var/lib/mlops-agent/trees/stack-{}", stack.project))
}

/// Links that each stay inside, chained so the whole leads out: the agent
/// resolves every link through the manifest and refuses the sync, naming
/// the entry; the host's tree keeps what the previous sync wrote.
#[test]
fn symlink_chains_that_leave_the_tree_are_refused() {
    let env = TestEnv::new().unwrap();
    let host = env.host("hard-links").unwrap();
    let stack = TestStack::new(IDLE).unwrap();
    agent_only(&env, &host);
    std::fs::write(stack.path().join("dag.py"), "ok").unwrap();
    sync(&env, &host, &stack).expect_code(0);
    assert_eq!(std::fs::read_to_string(tree(&host, &stack).join("dag.py")).unwrap(), "ok");

    let shapes: [&[(&str, &str)]; 5] = [
        // The reported one: `d/l -> ..` climbs one level per use.
        &[("d/l", ".."), ("x", "d/l/d/l/d/l/d/l/../../../../../../../../etc")],
        // A link to a link whose target is the tree's parent.
        &[("a", "b/c"), ("b/c", "../.."), ("x", "a/../etc")],
        // A relative link to a link that is absolute.
        &[("a/b", "../c"), ("c", "/etc"), ("x", "a/b")],
        // A loop.
        &[("p", "q"), ("q", "p")],
        // Plain escapes.
        &[("x", "../../../../../../etc")],
    ];
    for shape in shapes {
        let dir = stack.path().join("links");
        let _ = std::fs::remove_dir_all(&dir);
        for (link, target) in shape {
            let at = dir.join(link);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            symlink(target, &at).unwrap();
        }
        let run = sync(&env, &host, &stack);
        assert_ne!(run.code, 0, "{shape:?} was accepted:\n{}", run.stderr);
        assert!(
            run.stderr.contains("leads outside the tree") || run.stderr.contains("too many levels"),
            "{shape:?}: {}",
            run.stderr
        );
        assert!(run.stderr.contains("symlink `links/"), "the entry is named: {}", run.stderr);
        assert!(!tree(&host, &stack).join("links").exists(), "{shape:?}: nothing was written");
    }
    // Chains that stay inside are synced as links.
    let dir = stack.path().join("links");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(dir.join("d")).unwrap();
    symlink("..", dir.join("d/l")).unwrap();
    symlink("d/l/d/l/f", dir.join("x")).unwrap();
    std::fs::write(dir.join("f"), "inside").unwrap();
    sync(&env, &host, &stack).expect_code(0);
    assert_eq!(std::fs::read_to_string(tree(&host, &stack).join("links/x")).unwrap(), "inside");
}

/// A setuid-root file in the stack directory arrives 0755; a world-writable
/// one 0644; a sticky directory 0755. Checked in the tree and from inside a
/// container that mounts it.
#[test]
fn setuid_and_other_special_modes_are_never_written() {
    let env = TestEnv::new().unwrap();
    let host = env.docker_host("hard-modes").unwrap();
    let stack = TestStack::new(
        r#"
name: "{project}"
services:
  idle:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    volumes: ["./tools:/tools:ro"]
"#,
    )
    .unwrap();
    let tools = stack.path().join("tools");
    std::fs::create_dir(&tools).unwrap();
    std::fs::copy("/bin/busybox", tools.join("suid")).unwrap();
    std::fs::set_permissions(tools.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(tools.join("open"), "x").unwrap();
    std::fs::set_permissions(tools.join("open"), std::fs::Permissions::from_mode(0o2666)).unwrap();
    std::fs::set_permissions(&tools, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    env.ctl(&["deploy", "--identity", &key, "--host", &host.spec("root"), "--stack", &dir, "--health-timeout", "60"])
        .expect_code(0);
    let mode = |p: &str| std::fs::symlink_metadata(tree(&host, &stack).join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode("tools/suid"), mode("tools/open"), mode("tools")), (0o755, 0o644, 0o755));
    let container = format!("{}-idle-1", stack.project);
    let seen = host.docker(&["exec", &container, "stat", "-c", "%a %u", "/tools/suid", "/tools/open", "/tools"]);
    assert_eq!(seen.split_whitespace().collect::<Vec<_>>(), ["755", "0", "644", "0", "755", "0"], "{seen}");
}

/// A container with a writable bind of part of the stack's tree swaps the
/// directories the agent writes into for symlinks to a host directory, as
/// fast as it can, while the operator syncs again and again: the agent's
/// writes and removals stay in the tree, and the host directory is intact.
#[test]
fn a_container_swapping_a_writable_bind_for_symlinks_cannot_redirect_syncs() {
    let env = TestEnv::new().unwrap();
    let host = env.docker_host("hard-swap").unwrap();
    host.exec("mkdir -p /var/lib/victim && echo keep > /var/lib/victim/keep").unwrap();
    let stack = TestStack::new(
        r#"
name: "{project}"
services:
  swapper:
    build: ./img
    command:
      - sh
      - -c
      - |
        trap 'exit 0' TERM
        while true; do
          rm -rf /data/sub /data/gone; ln -s /var/lib/victim /data/sub 2>/dev/null
          ln -s ../../../../../../../../var/lib/victim /data/gone 2>/dev/null
          rm -rf /data/deep/er; ln -s /var/lib/victim /data/deep/er 2>/dev/null
        done
    volumes: ["./data:/data"]
"#,
    )
    .unwrap();
    let data = stack.path().join("data");
    let write_round = |round: u32| {
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::create_dir_all(data.join("deep/er")).unwrap();
        std::fs::write(data.join("sub/keep"), format!("round {round}")).unwrap();
        std::fs::write(data.join("deep/er/file"), format!("round {round}")).unwrap();
        // Every other round lists `gone`, so the next removes it.
        if round.is_multiple_of(2) {
            std::fs::create_dir_all(data.join("gone")).unwrap();
            std::fs::write(data.join("gone/keep"), format!("round {round}")).unwrap();
        }
    };
    write_round(0);
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    env.ctl(&["deploy", "--identity", &key, "--host", &host.spec("root"), "--stack", &dir, "--health-timeout", "60"])
        .expect_code(0);
    let mut synced = 0;
    for round in 1..=20 {
        write_round(round);
        // A sync may lose a race and say so; it must never write outside.
        let run = sync(&env, &host, &stack);
        if run.code == 0 {
            synced += 1;
        } else {
            // Lost races are named as such, with the hint to stop the writer.
            assert!(
                run.stderr.contains("a container with a writable bind of")
                    && run.stderr.contains("nothing was written outside the stack's tree"),
                "round {round}: {}",
                run.stderr
            );
        }
    }
    let victim = host.exec("ls -A /var/lib/victim; cat /var/lib/victim/keep").unwrap();
    assert_eq!(String::from_utf8_lossy(&victim.stdout), "keep\nkeep\n", "the host directory is untouched");
    // A sync that loses a race to the container fails (saying so); one that
    // completes wrote its files into the tree.
    eprintln!("{synced} of 20 syncs completed while the container was swapping");
    // The swapper really was swapping.
    let container = format!("{}-swapper-1", stack.project);
    assert_eq!(host.docker(&["inspect", "-f", "{{.State.Running}}", &container]), "true");
}

/// The agent's state and work directories are root's alone: a local user
/// can neither read a tree nor plant anything where the agent makes its
/// temporary files (debootstrap trees included).
#[test]
fn local_users_cannot_reach_the_agents_state_or_temporary_files() {
    let env = TestEnv::new().unwrap();
    let host = env.host("hard-state").unwrap();
    let stack = TestStack::new(IDLE).unwrap();
    agent_only(&env, &host);
    sync(&env, &host, &stack).expect_code(0);
    let state = Path::new("/var/lib/mlops-agent");
    let meta = std::fs::metadata(host.path(&state.display().to_string())).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    for attempt in [
        "ls /var/lib/mlops-agent/trees",
        "mkdir /var/lib/mlops-agent/tmp/debootstrap-bookworm.x",
        "ln -s /etc /var/lib/mlops-agent/tmp/x",
        "cat /var/lib/mlops-agent/trees/.index/*",
    ] {
        let out = host.exec_as_local_user(attempt);
        assert!(!out.status.success(), "{attempt} succeeded as a local user");
    }
}

/// known_hosts as OpenSSH reads it: a host known with a key of one type
/// that presents another type is refused like a changed key (even with
/// --accept-new-host-keys); known types are offered first, so a host known
/// by its ECDSA key presents that one; `@revoked` keys and hosts vouched for
/// only by `@cert-authority` are refused. known_hosts is never changed by a
/// refusal.
#[test]
fn host_keys_are_checked_as_openssh_does() {
    let env = TestEnv::new().unwrap();
    let host = TestHost::start("hard-keys").unwrap();
    host.authorize("root", &env.public_key).unwrap();
    let key = env.key.display().to_string();
    let name = host.known_hosts_name();
    let status = |known: &str, accept_new: bool| {
        std::fs::write(&env.known_hosts, known).unwrap();
        let spec = host.spec("root");
        let mut args = vec!["status", "--identity", &key, "--host", &spec];
        if accept_new {
            args.push("--accept-new-host-keys");
        }
        let mut run = env.ctl(&args);
        // `status` prints each host's state (errors included) on stdout.
        run.stderr = format!("{}{}", run.stdout, run.stderr);
        let after = std::fs::read_to_string(&env.known_hosts).unwrap();
        (run, after)
    };
    // Another host's RSA key recorded for this host; the host has none.
    let other = tempfile::tempdir().unwrap();
    let rsa = other.path().join("rsa");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&rsa)
        .status()
        .unwrap();
    assert!(made.success());
    let rsa_pub = std::fs::read_to_string(rsa.with_extension("pub")).unwrap();
    let rsa_pub: Vec<&str> = rsa_pub.split_whitespace().take(2).collect();
    let known = format!("{name} {}\n", rsa_pub.join(" "));
    let (run, after) = status(&known, true);
    assert_ne!(run.code, 0, "a key of another type was accepted:\n{}", run.stderr);
    assert!(run.stderr.contains("HAS CHANGED"), "{}", run.stderr);
    assert_eq!(after, known, "nothing recorded");

    // Known by its ECDSA key only: offered first, so the host presents it.
    let known = format!("{name} {}\n", host.host_key_ecdsa);
    let (run, _) = status(&known, false);
    assert!(!run.stderr.to_lowercase().contains("host key"), "the ECDSA key is the one negotiated: {}", run.stderr);

    // Revoked, even though a plain line also holds it.
    let known = format!("{name} {}\n@revoked * {}\n", host.host_key, host.host_key);
    let (run, after) = status(&known, true);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("REVOKED") && run.stderr.contains(":2"), "{}", run.stderr);
    assert_eq!(after, known);

    // Only a certificate authority vouches for the host: reported, refused.
    let known = format!("@cert-authority * {}\n", rsa_pub.join(" "));
    let (run, after) = status(&known, true);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("@cert-authority") && run.stderr.contains("not supported"), "{}", run.stderr);
    assert_eq!(after, known);

    // Unknown with accept-new: recorded (whole lines, file rewritten).
    let (run, after) = status("# mine\n", true);
    assert!(!run.stderr.to_lowercase().contains("host key"), "{}", run.stderr);
    assert!(after.starts_with("# mine\n") && after.contains(&format!("{name} ssh-ed25519 ")), "{after}");
}

/// Each agent has its own identity: host B's server key and certificate,
/// installed in place of host A's agent (a stolen key, or whatever takes A's
/// port while its agent is down), do not pass for A's agent. The controller
/// refuses it and says why; a deploy re-installs A's own identity.
#[test]
fn another_hosts_server_key_does_not_pass_for_this_hosts_agent() {
    let env = TestEnv::new().unwrap();
    let (a, b) = (env.host("hard-id-a").unwrap(), env.host("hard-id-b").unwrap());
    for h in [&a, &b] {
        agent_only(&env, h);
    }
    for file in ["server.pem", "server.key"] {
        let tls = format!("/etc/mlops-agent/tls/{file}");
        std::fs::copy(b.path(&tls), a.path(&tls)).unwrap();
    }
    // Restart A's agent with B's identity (as a daemon, as installed here).
    a.exec("kill $(cat /run/mlops-agent/agent.pid); while [ -e /run/mlops-agent/agent.pid ]; do sleep 0.1; done")
        .unwrap();
    a.exec("/usr/local/lib/mlops-agent/mlops-agent serve --daemonize --config /etc/mlops-agent/agent.json").unwrap();
    let key = env.key.display().to_string();
    let run = env.ctl(&["status", "--identity", &key, "--host", &a.spec("root")]);
    let text = format!("{}{}", run.stdout, run.stderr);
    assert_ne!(run.code, 0, "{text}");
    assert!(text.contains("not valid for name"), "{text}");
    assert!(text.contains("issued for another host"), "the hint says what it means: {text}");
    // B itself is fine, and a deploy gives A its own identity back.
    env.ctl(&["status", "--identity", &key, "--host", &b.spec("root")]).expect_code(0);
    env.ctl(&["deploy", "--no-stack", "--identity", &key, "--host", &a.spec("root")]).expect_code(0);
    env.ctl(&["status", "--identity", &key, "--host", &a.spec("root")]).expect_code(0);
}

/// `mlopsctl pki rotate`: a run where one host cannot be reached promotes
/// nothing (the others trust both CAs, and the controller still reaches
/// them); the next run finishes. Afterwards every agent trusts only the new
/// CA, the old controller state is refused, and the stack's containers were
/// never restarted.
#[test]
fn ca_rotation_rekeys_every_agent_without_downtime() {
    let env = TestEnv::new().unwrap();
    let a = env.docker_host("hard-rot-a").unwrap();
    let b = env.host("hard-rot-b").unwrap();
    let key = env.key.display().to_string();
    let stack = TestStack::new(IDLE).unwrap();
    let dir = stack.path().display().to_string();
    env.ctl(&["deploy", "--identity", &key, "--host", &a.spec("root"), "--stack", &dir, "--health-timeout", "60"])
        .expect_code(0);
    agent_only(&env, &b);
    // A host of this controller left out of the rotation.
    let c = env.host("hard-rot-c").unwrap();
    agent_only(&env, &c);
    let container = format!("{}-idle-1", stack.project);
    let started = a.docker(&["inspect", "-f", "{{.State.StartedAt}}", &container]);
    let old_state = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", env.state.display()))
        .arg(old_state.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let old_ca = std::fs::read_to_string(env.state.join("pki/ca.pem")).unwrap();
    let (sa, sb) = (a.spec("root"), b.spec("root"));

    // One host unreachable: nothing is promoted.
    let run =
        env.ctl(&["pki", "rotate", "--identity", &key, "--host", &sa, "--host", &sb, "--host", mlops_e2e::NO_HOST]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stdout.contains("was not promoted"), "{}", run.stdout);
    assert_eq!(std::fs::read_to_string(env.state.join("pki/ca.pem")).unwrap(), old_ca);
    let trusted = std::fs::read_to_string(a.path("/etc/mlops-agent/tls/ca.pem")).unwrap();
    assert_eq!(trusted.matches("BEGIN CERTIFICATE").count(), 2, "A trusts both CAs meanwhile");
    env.ctl(&["status", "--identity", &key, "--host", &sa]).expect_code(0);

    // The rerun resumes with the same new CA and finishes.
    let next_ca = std::fs::read_to_string(env.state.join("pki/next/ca.pem")).unwrap();
    let run = env.ctl(&["pki", "rotate", "--identity", &key, "--host", &sa, "--host", &sb]).expect_code(0);
    assert!(run.stdout.contains("trusts CA") && run.stdout.contains("only"), "{}", run.stdout);
    assert_eq!(std::fs::read_to_string(env.state.join("pki/ca.pem")).unwrap(), next_ca);
    for h in [&a, &b] {
        assert_eq!(std::fs::read_to_string(h.path("/etc/mlops-agent/tls/ca.pem")).unwrap(), next_ca);
        env.ctl(&["status", "--identity", &key, "--host", &h.spec("root")]).expect_code(0);
    }
    assert!(env.state.join("pki/retired").read_dir().unwrap().count() == 1);
    assert_eq!(a.docker(&["inspect", "-f", "{{.State.StartedAt}}", &container]), started, "no container restarted");

    // The host left out still trusts only the retired CA: the warning
    // named it, and a deploy re-keys it (it is this controller's, not
    // another's).
    assert!(run.stderr.contains("not in this run"), "{}", run.stderr);
    env.ctl(&["deploy", "--no-stack", "--identity", &key, "--host", &c.spec("root")]).expect_code(0);
    env.ctl(&["status", "--identity", &key, "--host", &c.spec("root")]).expect_code(0);

    // The old CA (a copy of the state before) is no longer trusted.
    let old_dir = old_state.path().display().to_string();
    let run = env.ctl(&["status", "--state-dir", &old_dir, "--identity", &key, "--host", &sa]);
    assert_ne!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

/// A local user opens 1,000 TCP connections to the agent's port and leaves
/// them idle (each would hold a TLS handshake for its timeout), then keeps
/// opening more while the operator runs `mlopsctl status`: the agent drops
/// the user's oldest past its cap, never the controller's (its tunnel comes
/// from root's sshd session), `status` answers, and the agent's log does
/// not get a line per connection.
#[test]
fn a_thousand_idle_connections_from_a_local_user_do_not_lock_the_controller_out() {
    let env = TestEnv::new().unwrap();
    let host = env.host("hard-flood").unwrap();
    agent_only(&env, &host);
    let log_before = host.agent_log().lines().count();
    // bash's /dev/tcp, as the unprivileged user; it holds them for 120 s.
    let mut flood = host
        .command_inside("runuser")
        .args(["-u", mlops_e2e::LOCAL_USER, "--", "bash", "-c"])
        .arg(
            "ulimit -n 8192; for i in $(seq 1000); do exec {fd}<>/dev/tcp/127.0.0.1/7443 || exit 1; done; \
             echo opened; for i in $(seq 5000); do exec {fd}<>/dev/tcp/127.0.0.1/7443; done; sleep 120",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(flood.stdout.as_mut().unwrap()), &mut first).unwrap();
    assert_eq!(first.trim(), "opened", "the local user opened its connections");
    let key = env.key.display().to_string();
    let started = std::time::Instant::now();
    let run = env.ctl(&["status", "--identity", &key, "--host", &host.spec("root")]);
    let took = started.elapsed();
    end_group(&mut flood);
    assert_eq!(run.code, 0, "status answered during the flood:\n{}{}", run.stdout, run.stderr);
    eprintln!("status answered in {:.2} s with 1,000 idle connections open", took.as_secs_f64());
    let log = host.agent_log();
    let new_lines = log.lines().count() - log_before;
    assert!(new_lines < 100, "the agent's log stayed short ({new_lines} new lines):\n{log}");
    assert!(log.contains("dropping the oldest"), "the agent said what it did:\n{log}");
}

/// The reported attack on debootstrap: a local user owns the directory the
/// agent used to build the Debian base image in (`/tmp/mlops-debootstrap-
/// <suite>-<pid>`) and keeps planting a file in it while the agent builds.
/// The agent builds under its own 0700 directory instead: the image has no
/// planted file, and the user's directory is left as it was.
#[test]
fn a_local_user_racing_on_the_debootstrap_path_cannot_poison_the_base_image() {
    let env = TestEnv::new().unwrap();
    let host = env.docker_host("hard-race").unwrap();
    agent_only(&env, &host);
    let agent_pid = std::fs::read_to_string(host.path("/run/mlops-agent/agent.pid")).unwrap();
    let dir = format!("/tmp/mlops-debootstrap-bookworm-{}", agent_pid.trim());
    let mut racer = host
        .command_inside("runuser")
        .args(["-u", mlops_e2e::LOCAL_USER, "--", "sh", "-c"])
        .arg(format!(
            "while true; do mkdir -p {dir}/etc 2>/dev/null; echo poisoned > {dir}/etc/mlops-poisoned 2>/dev/null; sleep 0.05; done"
        ))
        // Its own process group, so the loop (a child of runuser) ends with it.
        .process_group(0)
        .spawn()
        .unwrap();
    let stack = TestStack::new(
        r#"
name: "{project}"
x-mlops: {bootstrap_base_images: true}
services:
  base:
    build: ./base
    command: ["sleep", "3600"]
"#,
    )
    .unwrap();
    std::fs::create_dir(stack.path().join("base")).unwrap();
    std::fs::write(stack.path().join("base/Dockerfile"), "FROM debian:bookworm-slim\nRUN true\n").unwrap();
    let key = env.key.display().to_string();
    let sdir = stack.path().display().to_string();
    let run = env.ctl(&["deploy", "--identity", &key, "--host", &host.spec("root"), "--stack", &sdir]);
    end_group(&mut racer);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("debootstrap"), "the base image was built here: {}", run.stderr);
    let planted = host.docker_result(&["run", "--rm", "debian:bookworm-slim", "cat", "/etc/mlops-poisoned"]);
    assert!(planted.is_err(), "the base image holds the planted file: {planted:?}");
    // Nothing of the agent's build is left in its work directory.
    let work = std::fs::read_dir(host.path("/var/lib/mlops-agent/tmp")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(work, 0, "the agent's temporary tree was removed");
}
