//! The command line's own behaviour: bad input gives exit code 2 and an
//! error naming the file, line and field, with a hint; this machine is the
//! default target.

use mlops_e2e::{NO_HOST, TestEnv, TestHost};

/// Replaces the per-run temporary directory with `$TMP` so the expected
/// text can be written out in full.
fn normalize(env: &TestEnv, text: &str) -> String {
    text.replace(&env.dir.path().display().to_string(), "$TMP")
}

#[test]
fn malformed_inventory_names_file_line_and_column() {
    let env = TestEnv::new().unwrap();
    let path = env.write("bad.yml", "all:\n  hosts:\n    web1:\n      ansible_port: 22\n   oops: [1, 2\n").unwrap();
    let out = env.ctl(&["deploy", "-i", path.to_str().unwrap()]).expect_code(2);
    let err = normalize(&env, &out.stderr);
    assert!(err.starts_with("error: $TMP/bad.yml: invalid YAML: "), "{err}");
    assert!(err.contains("line 5") || err.contains(":5:"), "names the line: {err}");
    assert!(err.contains("hint: check the indentation"), "{err}");
}

#[test]
fn inventory_field_errors_name_the_line_and_suggest() {
    let env = TestEnv::new().unwrap();
    let path = env.write("inv.yml", "all:\n  hosts:\n    a:\n  childern:\n    web:\n").unwrap();
    let out = env.ctl(&["status", "-i", path.to_str().unwrap()]).expect_code(2);
    assert_eq!(
        normalize(&env, &out.stderr),
        "error: $TMP/inv.yml:4:3: unknown key `childern` in group `all`\n  hint: a group may hold only `hosts`, `vars`, `children`; host variables go under `hosts: {HOST: {...}}`, group variables under `vars:`\n"
    );

    let path = env.write("port.yml", "all:\n  hosts:\n    a:\n      ansible_port: twenty-two\n").unwrap();
    let out = env.ctl(&["status", "-i", path.to_str().unwrap()]).expect_code(2);
    assert_eq!(
        normalize(&env, &out.stderr),
        "error: $TMP/port.yml:4:21: host `a`: `ansible_port` must be a port number (1-65535)\n"
    );

    let out = env.ctl(&["status", "-i", "/nonexistent/inventory.yml"]).expect_code(2);
    assert!(
        out.stderr.starts_with(
            "error: cannot read inventory `/nonexistent/inventory.yml`\n  Caused by: No such file or directory"
        ),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_flags_exit_2() {
    let env = TestEnv::new().unwrap();
    let out = env.ctl(&["deploy", "--host", "root@box:99999"]).expect_code(2);
    assert_eq!(
        out.stderr,
        "error: --host `root@box:99999`: `99999` is not a port number (1-65535)\n  hint: write --host USER@HOST[:PORT], e.g. --host root@10.0.0.5:22\n"
    );
    let out = env.ctl(&["deploy", "--limit", "web", "--host", NO_HOST]).expect_code(2);
    assert!(
        out.stderr.contains("--limit selects hosts of an inventory, but no --inventory was given"),
        "{}",
        out.stderr
    );
    let out = env.ctl(&["deploy", "--forks", "0", "--host", NO_HOST]).expect_code(2);
    assert!(out.stderr.contains("--forks"), "{}", out.stderr);
    let out = env.ctl(&["deploy", "--agent-binary", "/nonexistent/agent", "--host", NO_HOST]).expect_code(2);
    assert!(out.stderr.contains("no agent binary found (looked in: /nonexistent/agent)"), "{}", out.stderr);
    assert!(out.stderr.contains("hint: build it with"), "{}", out.stderr);
}

#[test]
fn help_lists_commands_and_exit_codes() {
    let env = TestEnv::new().unwrap();
    let out = env.ctl(&["--help"]).expect_code(0);
    for needle in [
        "deploy",
        "status",
        "agent",
        "--inventory",
        "--limit",
        "--accept-new-host-keys",
        "--forks",
        "Exit codes: 0 success; 1 at least one host failed; 2",
    ] {
        assert!(out.stdout.contains(needle), "missing {needle}:\n{}", out.stdout);
    }
}

/// `mlopsctl deploy` with no host and no inventory installs the agent on
/// this machine and talks to it through the same mTLS path. Run inside a
/// test host's namespaces so that it gets its own loopback and agent
/// directories instead of the machine's.
#[test]
fn deploy_without_hosts_targets_this_machine() {
    let env = TestEnv::new().unwrap();
    let host = TestHost::start("local").unwrap();
    let bins = mlops_e2e::bins();
    let script = format!(
        "HOME={home} MLOPS_STATE_DIR={state} MLOPS_AGENT_BINARY={agent} {ctl} deploy --no-stack --output json",
        home = env.home.display(),
        state = env.state.display(),
        agent = bins.agent.display(),
        ctl = bins.mlopsctl.display()
    );
    // Before the deploy: this machine answers, its agent does not; the
    // status says so, and says why once.
    let before = host
        .command_inside("sh")
        .args(["-c", &script.replace(" deploy --no-stack --output json", " status")])
        .output()
        .unwrap();
    assert_eq!(before.status.code(), Some(1));
    let row = String::from_utf8_lossy(&before.stdout).lines().nth(1).unwrap_or_default().to_string();
    assert!(row.starts_with("localhost") && row.contains(" no agent "), "{row}");
    assert_eq!(row.matches("does not answer").count(), 1, "{row}");
    assert!(!row.contains("ssh"), "no SSH is involved on this machine: {row}");

    let out = host.exec(&script).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &json["hosts"][0];
    assert_eq!(r["host"], "localhost");
    assert_eq!(r["result"]["address"], "local");
    assert_eq!(r["result"]["installed"], "first install");
    assert!(host.agent_pid().is_some(), "the agent runs on this (namespaced) machine");
    let again = host.exec(&script.replace(" deploy --no-stack ", " status ")).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(status["hosts"][0]["agent"]["pid"], host.agent_pid().unwrap());
}

/// `mlopsctl config` prints the platform as it will run, secrets masked,
/// and what it prints is a Compose file that `config` reads back into the
/// same thing; `--services` names what runs; a bad file is the positioned
/// error a deploy would give, without reaching any host.
#[test]
fn config_prints_a_compose_file_that_reads_back_the_same() {
    let env = TestEnv::new().unwrap();
    let first = env.ctl(&["config", "--skip", "grafana", "--host", NO_HOST]).expect_code(0).stdout;
    assert!(first.contains("airflow-scheduler:"), "{first}");
    assert!(first.contains("********"), "secrets are masked: {first}");
    let again_dir = env.dir.path().join("again");
    std::fs::create_dir_all(&again_dir).unwrap();
    std::fs::write(again_dir.join("compose.yaml"), &first).unwrap();
    let second = env.ctl(&["config", "--stack", again_dir.to_str().unwrap(), "--host", NO_HOST]).expect_code(0).stdout;
    assert_eq!(first, second, "the printed file means what was read");

    let json = env.ctl(&["config", "--output", "json", "--host", NO_HOST]).expect_code(0).stdout;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(json["services"]["grafana"].is_object(), "--skip applies only when given");
    let names = env.ctl(&["config", "--services", "--skip", "grafana", "--host", NO_HOST]).expect_code(0).stdout;
    assert!(names.lines().any(|l| l == "postgres") && !names.lines().any(|l| l == "grafana"), "{names}");

    let bad = env.write("bad.yaml", "services:\n  web:\n    image: x\n    ports: [\"80:99999\"]\n").unwrap();
    let out = env.ctl(&["config", "--stack", bad.to_str().unwrap(), "--host", NO_HOST]).expect_code(2);
    assert_eq!(
        normalize(&env, &out.stderr),
        "error: $TMP/bad.yaml:4:13: port `80:99999`: `99999` is not a port number\n"
    );
}

/// Completion scripts that their shell reads without error, and a man page
/// per command, from the same definitions as the command line itself.
#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    let env = TestEnv::new().unwrap();
    for (shell, check) in [("bash", "bash"), ("zsh", ""), ("fish", "")] {
        let script = env.ctl(&["completions", shell, "--host", NO_HOST]).expect_code(0).stdout;
        assert!(script.contains("migrate") && script.contains("inventory"), "{shell}: {script}");
        if !check.is_empty() {
            let path = env.write(&format!("completion.{shell}"), &script).unwrap();
            let status = std::process::Command::new(check).arg("-n").arg(&path).status().unwrap();
            assert!(status.success(), "{check} -n rejects the {shell} completion script");
        }
    }
    let dir = env.dir.path().join("man1");
    let out = env.ctl(&["man", "--out", dir.to_str().unwrap(), "--host", NO_HOST]).expect_code(0).stdout;
    assert!(out.contains("man pages written to"), "{out}");
    let page = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.1"))).unwrap_or_default();
    assert!(page("mlopsctl").contains(".TH mlopsctl 1"), "{}", page("mlopsctl"));
    assert!(page("mlopsctl-deploy").contains("health"), "{}", page("mlopsctl-deploy"));
    assert!(page("mlopsctl-operator-add").contains(".TH mlopsctl-operator-add 1"), "{}", page("mlopsctl-operator-add"));
}

/// `mlopsctl users` refuses what it can before reaching a host: a name that
/// is no account name, a password on stdin that is empty or short, the
/// stack's own admin, a stack that names no Airflow for accounts.
#[test]
fn users_refuses_bad_input_before_any_host() {
    let env = TestEnv::new().unwrap();
    let out = env.ctl(&["users", "add", "a b", "--role", "Viewer", "--host", NO_HOST]).expect_code(2);
    assert!(
        out.stderr.starts_with("error: `a b` is not a usable account name\n  hint: use up to 64 letters, digits, `.`, `_`, `-` or `@`, not starting with `-`\n"),
        "{}",
        out.stderr
    );
    let args = ["users", "add", "vic", "--role", "Viewer", "--password-stdin", "--host", NO_HOST];
    let out = env.ctl_input(&args, "short\n").expect_code(2);
    assert!(
        out.stderr.starts_with("error: the password on standard input is shorter than 8 characters\n"),
        "{}",
        out.stderr
    );
    let out = env.ctl_input(&args, "").expect_code(2);
    assert!(
        out.stderr.starts_with("error: the password on standard input must be one non-empty line\n"),
        "{}",
        out.stderr
    );
    let out = env.ctl(&["users", "set-role", "admin", "Viewer", "--host", NO_HOST]).expect_code(2);
    assert!(
        out.stderr.starts_with("error: `admin` is the stack's admin, kept by the deployment: `users set-role` leaves it as it is\n  hint: its password is the secret AIRFLOW_ADMIN_PASSWORD: `mlopsctl secrets rotate AIRFLOW_ADMIN_PASSWORD`\n"),
        "{}",
        out.stderr
    );
    // FAB's names ignore case: `ADMIN` is the admin too.
    let out = env.ctl(&["users", "remove", "ADMIN", "--host", NO_HOST]).expect_code(2);
    assert!(out.stderr.contains("is the stack's admin"), "{}", out.stderr);
    let out =
        env.ctl(&["users", "add", "vic", "--role", "Viewer", "--email", "nope", "--host", NO_HOST]).expect_code(2);
    assert!(out.stderr.starts_with("error: --email `nope` is not an email address\n"), "{}", out.stderr);
    let stack = env.write("plain/compose.yaml", "services:\n  web:\n    image: busybox\n").unwrap();
    let dir = stack.parent().unwrap().to_str().unwrap();
    let out = env.ctl(&["users", "list", "--stack", dir, "--host", NO_HOST]).expect_code(2);
    assert!(
        out.stderr.starts_with("error: stack `plain` names no Airflow whose accounts mlopsctl manages\n"),
        "{}",
        out.stderr
    );
}
