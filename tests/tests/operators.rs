//! Several controllers on the same hosts: a deployment's credentials live
//! on its hosts (root only), a second controller uses them instead of
//! making its own, and hosts that disagree stop the deploy. Real sshd
//! hosts, each with its own Docker engine, the real agent and CLI.

use std::collections::BTreeMap;

use mlops_e2e::{CtlRun, NO_HOST, TestEnv, TestHost, TestStack};
use serde_json::Value;

/// `db` keeps the password it first started with in its volume, as
/// PostgreSQL does, and is healthy only while its environment still has
/// that password: a deploy with another password would break it.
const SECRET_STACK: &str = r#"
name: "{project}"
x-mlops:
  secrets: [DB_PASSWORD]
services:
  db:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; [ -f /data/pw ] || echo \"$$PASSWORD\" > /data/pw; sleep 3600 & wait"]
    environment:
      PASSWORD: ${DB_PASSWORD}
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD-SHELL", "test \"$$(cat /data/pw)\" = \"$$PASSWORD\""]
      interval: 1s
      retries: 3
volumes:
  data:
"#;

fn deploy(env: &TestEnv, hosts: &[&TestHost], stack: &TestStack, extra: &[&str]) -> CtlRun {
    env.deploy_stack(hosts, stack, extra)
}

fn secrets(env: &TestEnv, hosts: &[&TestHost], stack: &TestStack) -> CtlRun {
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let mut args = vec!["secrets", "--identity", &key, "--stack", &dir, "--output", "json"];
    let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
    for s in &specs {
        args.extend(["--host", s.as_str()]);
    }
    env.ctl(&args)
}

/// What the host's agent holds for `project`, read from its file (and the file's mode).
fn held(host: &TestHost, project: &str) -> (BTreeMap<String, String>, u32) {
    let path = host.path(&format!("/var/lib/mlops-agent/secrets/{project}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).unwrap();
    let values = json["values"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().into()));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777;
    (values.collect(), mode)
}

/// The stack's container ids on `host`.
fn containers(host: &TestHost, project: &str) -> String {
    host.docker(&["ps", "-q", "--no-trunc", "--filter", &format!("label=mlops.project={project}")])
}

#[test]
fn credentials_live_on_the_hosts_and_a_second_controller_keeps_them() {
    let a = TestEnv::new().unwrap();
    let (h1, h2) = (a.docker_host("sec1").unwrap(), a.docker_host("sec2").unwrap());
    let hosts = [&h1, &h2];
    let stack = TestStack::new(SECRET_STACK).unwrap();
    let first = deploy(&a, &hosts, &stack, &[]).expect_code(0);
    assert!(first.stderr.contains("generated DB_PASSWORD"), "{}", first.stderr);

    // Every host holds the same value, root only; `secrets` reads it from them.
    let (on_h1, mode) = held(&h1, &stack.project);
    assert_eq!(mode, 0o600);
    assert_eq!(held(&h2, &stack.project).0, on_h1, "one value for the project");
    let shown = secrets(&a, &hosts, &stack).expect_code(0).json();
    assert_eq!(shown["source"], "hosts");
    assert_eq!(shown["secrets"]["DB_PASSWORD"], on_h1["DB_PASSWORD"].as_str());
    let before = (containers(&h1, &stack.project), containers(&h2, &stack.project));

    // Another controller (its own state directory, so its own CA, and no
    // copy of the secrets) takes the hosts over: it uses the hosts'
    // password, so nothing is recreated and the service stays healthy.
    let b = TestEnv::new().unwrap();
    b.trust(&h1).unwrap();
    b.trust(&h2).unwrap();
    let taken = deploy(&b, &hosts, &stack, &["--take-over"]).expect_code(0);
    assert!(!taken.stderr.contains("generated"), "{}", taken.stderr);
    assert_eq!((containers(&h1, &stack.project), containers(&h2, &stack.project)), before, "nothing recreated");
    for h in taken.json()["hosts"].as_array().unwrap() {
        assert_eq!(h["result"]["stack"]["changed"], 0, "{h:#}");
    }
    let shown_b = secrets(&b, &hosts, &stack).expect_code(0).json();
    assert_eq!(shown_b["secrets"], shown["secrets"]);
    // Its local copy is a cache of what the hosts hold.
    let cached = b.ctl(&[
        "secrets",
        "--host",
        &h1.spec("root"),
        "--stack",
        stack.path().to_str().unwrap(),
        "--cached",
        "--output",
        "json",
    ]);
    assert_eq!(cached.expect_code(0).json()["secrets"], shown["secrets"]);

    // Hosts that disagree: nothing is overwritten, nothing deployed, and
    // neither value is printed.
    let mut other = on_h1.clone();
    other.insert("DB_PASSWORD".into(), "a-value-h2-was-given-by-hand".into());
    let file = h2.path(&format!("/var/lib/mlops-agent/secrets/{}.json", stack.project));
    std::fs::write(&file, serde_json::to_string(&serde_json::json!({ "values": other })).unwrap()).unwrap();
    let refused = deploy(&b, &hosts, &stack, &[]).expect_code(1);
    let json = refused.json();
    assert_eq!(json["failed"], 2, "every host of the project stops: {json:#}");
    let error = json["hosts"][0]["error"].as_str().unwrap();
    assert!(error.contains("different values of secret `DB_PASSWORD`"), "{error}");
    assert!(error.contains(&h1.spec("root")) && error.contains(&h2.spec("root")), "{error}");
    for text in [&refused.stdout, &refused.stderr] {
        assert!(!text.contains("a-value-h2-was-given-by-hand"), "{text}");
        assert!(!text.contains(on_h1["DB_PASSWORD"].as_str()), "{text}");
    }
    assert_eq!(held(&h1, &stack.project).0, on_h1, "h1 keeps its value");
    assert_eq!(held(&h2, &stack.project).0, other, "h2 keeps its value");
    assert_eq!((containers(&h1, &stack.project), containers(&h2, &stack.project)), before);
    let report = secrets(&b, &hosts, &stack).expect_code(1);
    assert_eq!(report.json()["disagreements"][0]["name"], "DB_PASSWORD", "{}", report.stdout);
}

fn agent_pids(hosts: &[&TestHost]) -> Vec<Option<i32>> {
    hosts.iter().map(|h| h.agent_pid()).collect()
}

fn changed(run: &CtlRun) -> Vec<Value> {
    run.json()["hosts"].as_array().unwrap().iter().map(|h| h["result"]["stack"]["changed"].clone()).collect()
}

#[test]
fn operators_share_the_hosts_and_a_removed_one_is_refused() {
    let a = TestEnv::new().unwrap();
    let (h1, h2) = (a.docker_host("op1").unwrap(), a.docker_host("op2").unwrap());
    let hosts = [&h1, &h2];
    let stack = TestStack::new(SECRET_STACK).unwrap();
    deploy(&a, &hosts, &stack, &[]).expect_code(0);
    let (pids, before) = (agent_pids(&hosts), (containers(&h1, &stack.project), containers(&h2, &stack.project)));

    // A adds bob; bob joins on his machine (another state directory).
    let pass = a.write("passphrase", "a long passphrase for bob\n").unwrap();
    let pass = pass.to_str().unwrap();
    let bundle = a.dir.path().join("bob.bundle");
    let bundle = bundle.to_str().unwrap();
    a.ctl(&["operator", "add", "bob", "--passphrase-file", pass, "--out", bundle, "--host", NO_HOST]).expect_code(0);
    let text = std::fs::read_to_string(bundle).unwrap();
    assert!(text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----") && !text.contains("PRIVATE KEY"), "{text}");
    let b = TestEnv::new().unwrap();
    b.trust(&h1).unwrap();
    b.trust(&h2).unwrap();
    let wrong = a.write("wrong", "not it\n").unwrap();
    b.ctl(&["operator", "join", bundle, "--passphrase-file", wrong.to_str().unwrap(), "--host", NO_HOST])
        .expect_code(2);
    b.ctl(&["operator", "join", bundle, "--passphrase-file", pass, "--host", NO_HOST]).expect_code(0);

    // Bob deploys: his agents' identities are as good as A's, so nothing
    // is re-keyed or restarted, nothing recreated; his second deploy is a no-op.
    let first = deploy(&b, &hosts, &stack, &[]).expect_code(0);
    assert_eq!(changed(&first), vec![Value::from(0), Value::from(0)], "{}", first.stdout);
    assert_eq!(agent_pids(&hosts), pids, "no agent restarted");
    assert_eq!((containers(&h1, &stack.project), containers(&h2, &stack.project)), before);
    let again = deploy(&b, &hosts, &stack, &[]).expect_code(0);
    for h in again.json()["hosts"].as_array().unwrap() {
        assert_eq!(h["result"]["installed"], Value::Null, "{h:#}");
        assert_eq!(h["result"]["stack"]["changed"], 0);
    }
    assert_eq!(
        secrets(&b, &hosts, &stack).expect_code(0).json()["secrets"],
        secrets(&a, &hosts, &stack).json()["secrets"]
    );

    // The agents recorded who did what; `status` shows the last change.
    let dir = stack.path().to_str().unwrap().to_string();
    let key = a.key.display().to_string();
    let status = a
        .ctl(&["status", "--identity", &key, "--host", &h1.spec("root"), "--stack", &dir, "--output", "json"])
        .expect_code(0)
        .json();
    assert_eq!(status["hosts"][0]["last_change"]["operator"], "bob", "{status:#}");
    assert_eq!(status["hosts"][0]["last_change"]["action"], "deploy");
    let history = a
        .ctl(&["history", "--identity", &key, "--host", &h1.spec("root"), "--stack", &dir, "--output", "json"])
        .expect_code(0)
        .json();
    let operators: Vec<&str> = history["hosts"][0]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "deploy")
        .map(|e| e["operator"].as_str().unwrap())
        .collect();
    assert_eq!(operators.len(), 3, "{history:#}");
    assert!(operators[0].starts_with("root@"), "A's deploy: {operators:?}");
    assert_eq!(&operators[1..], ["bob", "bob"]);

    // A removes bob: the agents refuse him from then on; A goes on.
    let removed = a.ctl(&[
        "operator",
        "remove",
        "bob",
        "--identity",
        &key,
        "--host",
        &h1.spec("root"),
        "--host",
        &h2.spec("root"),
    ]);
    removed.expect_code(0);
    // Several times: the agent's verdict on a TLS 1.3 client certificate
    // comes after the handshake, racing the first call (CI once saw only
    // "connection closed").
    for _ in 0..8 {
        let refused = b.ctl_key(&["status", "--host", &h1.spec("root"), "--output", "json"]).expect_code(1).json();
        assert!(refused["hosts"][0]["error"].as_str().unwrap().contains("certificate is revoked"), "{refused:#}");
        assert!(refused["hosts"][0]["hint"].as_str().unwrap().contains("operator add"), "{refused:#}");
    }
    deploy(&b, &hosts, &stack, &[]).expect_code(1);
    // Not even through SSH: bob's deploy did not re-key the agents (they
    // keep the certificate A gave them).
    for h in hosts {
        let theirs = std::fs::read_to_string(h.path("/etc/mlops-agent/tls/server.pem")).unwrap();
        let ours = std::fs::read_to_string(a.state.join("pki/hosts").join(h.spec("root")).join("server.pem")).unwrap();
        assert_eq!(theirs, ours, "{}", h.name);
    }
    a.ctl_key(&["status", "--host", &h1.spec("root"), "--host", &h2.spec("root")]).expect_code(0);
    let listed = a.ctl(&["operator", "list", "--host", NO_HOST, "--output", "json"]).expect_code(0).json();
    assert!(listed["operators"][0]["revoked_unix"].is_number(), "{listed:#}");

    // CI: a fresh runner with its bundle (sealed to an age key) in the
    // environment deploys in one command, as its own operator.
    let (identity, recipient) = mlops_vault::generate_identity();
    let ci_bundle = a.dir.path().join("ci.bundle");
    let ci_bundle = ci_bundle.to_str().unwrap();
    a.ctl(&["operator", "add", "ci", "--recipient", &recipient, "--out", ci_bundle, "--host", NO_HOST]).expect_code(0);
    let ci = TestEnv::new().unwrap();
    ci.trust(&h1).unwrap();
    ci.trust(&h2).unwrap();
    let ci_text = std::fs::read_to_string(ci_bundle).unwrap();
    let env = [("MLOPS_OPERATOR_BUNDLE", ci_text.as_str()), ("MLOPS_AGE_IDENTITY", identity.as_str())];
    let ci_key = ci.key.display().to_string();
    let ci_dir = stack.path().display().to_string();
    let mut args = vec!["deploy", "--identity", &ci_key, "--stack", &ci_dir, "--output", "json"];
    let specs = [h1.spec("root"), h2.spec("root")];
    for s in &specs {
        args.extend(["--host", s.as_str()]);
    }
    let run = ci.ctl_with(&args, &env).expect_code(0);
    assert!(run.stderr.contains("joined as operator `ci`"), "{}", run.stderr);
    assert_eq!(changed(&run), vec![Value::from(0), Value::from(0)]);

    // The controller moves to another machine: its state, sealed, opens
    // there (never over a CA), and deploys exactly as before.
    let exported = a.dir.path().join("state.age");
    let exported = exported.to_str().unwrap();
    a.ctl(&["state", "export", "--out", exported, "--passphrase-file", pass, "--host", NO_HOST]).expect_code(0);
    let moved = TestEnv::new().unwrap();
    moved.trust(&h1).unwrap();
    moved.trust(&h2).unwrap();
    moved.ctl(&["state", "import", exported, "--passphrase-file", pass, "--host", NO_HOST]).expect_code(0);
    moved.ctl(&["state", "import", exported, "--passphrase-file", pass, "--host", NO_HOST]).expect_code(2);
    let pids = agent_pids(&hosts);
    let again = deploy(&moved, &hosts, &stack, &[]).expect_code(0);
    assert_eq!(changed(&again), vec![Value::from(0), Value::from(0)]);
    assert_eq!(agent_pids(&hosts), pids, "the moved controller is the same controller to the agents");
}

/// `db` as in [`SECRET_STACK`], a client `app` with the password in a
/// URL, and how each secret is rotated: `before` changes the password the
/// data holds (as `ALTER ROLE` would); `TOKEN` keeps the old value beside
/// the new one until `after` has run (as a Fernet key does).
const ROTATING_STACK: &str = r#"
name: "{project}"
x-mlops:
  secrets: [DB_PASSWORD, TOKEN]
  rotate:
    DB_PASSWORD:
      before: {service: db, command: ["sh", "-c", "if [ -f /data/fail-once ]; then rm /data/fail-once; exit 3; fi; echo \"$$MLOPS_NEW\" > /data/pw"]}
    TOKEN:
      keep_old: true
      after: {service: db, command: ["sh", "-c", "echo \"$$MLOPS_NEW\" > /data/token && echo re-encrypted"]}
services:
  db:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; [ -f /data/pw ] || echo \"$$PASSWORD\" > /data/pw; sleep 3600 & wait"]
    environment:
      PASSWORD: ${DB_PASSWORD}
      TOKEN: ${TOKEN}
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD-SHELL", "test \"$$(cat /data/pw)\" = \"$$PASSWORD\""]
      interval: 1s
      retries: 3
  app:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    environment:
      DB_URL: db://app:${DB_PASSWORD}@db/app
    depends_on:
      db: {condition: service_healthy}
volumes:
  data:
"#;

fn container_of(host: &TestHost, project: &str, service: &str) -> String {
    host.docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=mlops.project={project}"),
        "--filter",
        &format!("label=mlops.service={service}"),
    ])
}

#[test]
fn credentials_change_only_on_purpose_and_rotation_keeps_the_stack_healthy() {
    let env = TestEnv::new().unwrap();
    let host = env.docker_host("rot1").unwrap();
    let stack = TestStack::new(ROTATING_STACK).unwrap();
    deploy(&env, &[&host], &stack, &[]).expect_code(0);
    let (db, app) = (container_of(&host, &stack.project, "db"), container_of(&host, &stack.project, "app"));
    let (first, _) = held(&host, &stack.project);

    // A model that would start `db` with another password than its data
    // holds is refused before anything is touched, naming what and why.
    stack
        .write_compose(&ROTATING_STACK.replace("PASSWORD: ${DB_PASSWORD}", "PASSWORD: ${DB_PASSWORD}-changed"))
        .unwrap();
    let refused = deploy(&env, &[&host], &stack, &[]).expect_code(1).json();
    let h = &refused["hosts"][0];
    assert!(h["error"].as_str().unwrap().contains("service `db`: `PASSWORD` differs"), "{h:#}");
    assert!(h["error"].as_str().unwrap().contains(&format!("{}_data", stack.project)), "{h:#}");
    assert!(h["hint"].as_str().unwrap().contains("mlopsctl secrets rotate DB_PASSWORD"), "{h:#}");
    assert_eq!(container_of(&host, &stack.project, "db"), db, "nothing touched");
    stack.write_compose(ROTATING_STACK).unwrap();
    // So is a host whose stored password was changed by hand (as a second
    // controller with its own secrets once did).
    let file = host.path(&format!("/var/lib/mlops-agent/secrets/{}.json", stack.project));
    let original = std::fs::read_to_string(&file).unwrap();
    let mut changed = first.clone();
    changed.insert("DB_PASSWORD".into(), "changed-by-hand-0123456789".into());
    std::fs::write(&file, serde_json::to_string(&serde_json::json!({ "values": changed })).unwrap()).unwrap();
    deploy(&env, &[&host], &stack, &[]).expect_code(1);
    assert_eq!(container_of(&host, &stack.project, "db"), db);
    std::fs::write(&file, original).unwrap();

    // A rotation while a service is down is refused, changing nothing.
    host.docker(&["stop", "-t", "1", &app]);
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let spec = host.spec("root");
    let rotate = |name: &str| {
        env.ctl(&["secrets", "rotate", name, "--stack", &dir, "--identity", &key, "--host", &spec, "--output", "json"])
    };
    let run = rotate("DB_PASSWORD").expect_code(1);
    assert!(run.stdout.contains("`app` is exited"), "{}", run.stdout);
    assert_eq!(held(&host, &stack.project).0, first, "nothing changed");
    host.docker(&["start", &app]);
    deploy(&env, &[&host], &stack, &[]).expect_code(0);

    // A rotation whose step fails stops there, keeping its new value on
    // the hosts; the next run goes on with that same value.
    let db_now = container_of(&host, &stack.project, "db");
    host.docker(&["exec", &db_now, "touch", "/data/fail-once"]);
    let stopped = rotate("DB_PASSWORD").expect_code(1).json();
    assert!(stopped["failed"][0]["error"].as_str().unwrap().contains("exited with code 3"), "{stopped:#}");
    let (mid, _) = held(&host, &stack.project);
    assert_eq!(mid["DB_PASSWORD"], first["DB_PASSWORD"], "the value is unchanged until the step succeeded");
    let pending = mid["MLOPS_ROTATING_DB_PASSWORD"].clone();

    // The rotation: the data takes the new password, then everything
    // using it is recreated with it and healthy.
    let run = rotate("DB_PASSWORD").expect_code(0);
    let json = run.json();
    assert_eq!(json["done"], true, "{json:#}");
    let (after, _) = held(&host, &stack.project);
    assert_ne!(after["DB_PASSWORD"], first["DB_PASSWORD"]);
    assert_eq!(after["DB_PASSWORD"], pending, "the stopped rotation's value");
    assert!(!after.contains_key("MLOPS_ROTATING_DB_PASSWORD"), "its bookkeeping is dropped");
    assert_eq!(after["TOKEN"], first["TOKEN"], "the other secret is untouched");
    assert!(!run.stdout.contains(&after["DB_PASSWORD"]) && !run.stderr.contains(&after["DB_PASSWORD"]));
    assert_ne!(container_of(&host, &stack.project, "db"), db, "db runs with the new value");
    assert_ne!(container_of(&host, &stack.project, "app"), app, "so does its client");
    let pw = host.docker(&["exec", &container_of(&host, &stack.project, "db"), "cat", "/data/pw"]);
    assert_eq!(pw.trim(), after["DB_PASSWORD"], "the data holds the new password");
    // A deploy afterwards is a no-op: the record follows the rotation.
    let again = deploy(&env, &[&host], &stack, &[]).expect_code(0);
    assert_eq!(changed_count(&again), 0);

    // keep_old: NEW,OLD first, the `after` step, then NEW alone.
    let run = rotate("TOKEN").expect_code(0);
    let json = run.json();
    assert_eq!(json["deploys"].as_array().unwrap().len(), 2, "{json:#}");
    assert!(json["steps"][0]["output"].as_str().unwrap().contains("re-encrypted"), "{json:#}");
    let (last, _) = held(&host, &stack.project);
    assert!(!last["TOKEN"].contains(','), "the old value is dropped at the end");
    assert_ne!(last["TOKEN"], first["TOKEN"]);
    let token = host.docker(&["exec", &container_of(&host, &stack.project, "db"), "cat", "/data/token"]);
    assert_eq!(token.trim(), last["TOKEN"]);

    // The history says who rotated what.
    let history = env
        .ctl(&["history", "--identity", &key, "--host", &spec, "--stack", &dir, "--last", "0", "--output", "json"])
        .expect_code(0)
        .json();
    let details: Vec<&str> =
        history["hosts"][0]["entries"].as_array().unwrap().iter().map(|e| e["detail"].as_str().unwrap()).collect();
    assert!(details.iter().any(|d| d.starts_with("secrets rotate DB_PASSWORD: before")), "{details:?}");
    assert!(details.iter().any(|d| d.starts_with("replaced DB_PASSWORD")), "{details:?}");
}

fn changed_count(run: &CtlRun) -> i64 {
    run.json()["hosts"][0]["result"]["stack"]["changed"].as_i64().unwrap()
}
