//! `mlopsctl plan` against real hosts (own sshd and Docker engine each),
//! the real agent and CLI: it changes nothing, says why each service
//! would be replaced, and the deploy that follows does exactly what it
//! said (services created or replaced, files written, images built and
//! shipped).

use std::collections::BTreeMap;

use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};

const STACK: &str = r#"
name: "{project}"
services:
  db:
    build: ./img
    image: "{project}-img"
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    volumes: ["./db.conf:/etc/db.conf:ro"]
  web:
    build: ./img
    image: "{project}-img"
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    depends_on: [db]
  side:
    build: ./img
    image: "{project}-img"
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"#;

fn result<'a>(json: &'a serde_json::Value, host: &TestHost) -> &'a serde_json::Value {
    let h = json["hosts"].as_array().unwrap().iter().find(|h| h["host"] == host.spec("root")).unwrap();
    assert_eq!(h["ok"], true, "{h:#}");
    &h["result"]
}

/// Service → what the plan says.
fn planned(json: &serde_json::Value, host: &TestHost) -> BTreeMap<String, (String, Vec<String>)> {
    result(json, host)["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let reasons = s["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
            (s["service"].as_str().unwrap().to_string(), (s["action"].as_str().unwrap().to_string(), reasons))
        })
        .collect()
}

/// Service → whether the deploy created or replaced it.
fn changed(json: &serde_json::Value, host: &TestHost) -> BTreeMap<String, bool> {
    result(json, host)["stack"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["service"].as_str().unwrap().to_string(), s["changed"].as_bool().unwrap()))
        .collect()
}

/// The deploy did what the plan said: the same services created or
/// replaced, and no other.
fn agrees(plan: &serde_json::Value, deploy: &serde_json::Value, hosts: &[&TestHost]) {
    for h in hosts {
        let said: BTreeMap<String, bool> = planned(plan, h)
            .into_iter()
            .map(|(s, (action, _))| (s, action == "create" || action == "recreate"))
            .collect();
        assert_eq!(said, changed(deploy, h), "{}: plan {plan:#} deploy {deploy:#}", h.name);
    }
}

fn ctl(env: &TestEnv, command: &str, hosts: &[&TestHost], stack: &TestStack) -> CtlRun {
    let key = env.key.display().to_string();
    let dir = stack.path().display().to_string();
    let mut args = vec![command, "--identity", &key, "--stack", &dir, "--health-timeout", "60", "--output", "json"];
    let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
    for s in &specs {
        args.extend(["--host", s.as_str()]);
    }
    env.ctl(&args)
}

fn containers(host: &TestHost, project: &str) -> String {
    host.docker(&["ps", "-aq", "--no-trunc", "--filter", &format!("label=mlops.project={project}")])
}

#[test]
fn plan_changes_nothing_and_deploy_does_what_it_said() {
    let env = TestEnv::new().unwrap();
    let (h1, h2) = (env.docker_host("pn1").unwrap(), env.docker_host("pn2").unwrap());
    let hosts = [&h1, &h2];
    let stack = TestStack::new(STACK).unwrap();
    let project = stack.project.clone();
    std::fs::write(stack.path().join("db.conf"), "size=1\n").unwrap();

    // Fresh hosts: the agent would be installed and everything created;
    // nothing is installed by the plan.
    let fresh = ctl(&env, "plan", &hosts, &stack).expect_code(0).json();
    for h in hosts {
        assert!(result(&fresh, h)["agent"].as_str().unwrap().starts_with("install"), "{fresh:#}");
        assert!(planned(&fresh, h).values().all(|(a, _)| a == "create"), "{fresh:#}");
        assert!(h.agent_pid().is_none(), "the plan installed nothing on {}", h.name);
    }
    let first = ctl(&env, "deploy", &hosts, &stack).expect_code(0).json();
    agrees(&fresh, &first, &hosts);

    // Nothing changed: every service kept, no file to write, images current.
    let same = ctl(&env, "plan", &hosts, &stack).expect_code(0).json();
    for h in hosts {
        assert!(planned(&same, h).values().all(|(a, _)| a == "keep"), "{same:#}");
        assert_eq!(result(&same, h)["files_changed"], 0);
        assert!(result(&same, h)["images"].as_array().unwrap().iter().all(|i| i["action"] == "current"));
    }

    // A mounted file changes: its service and its dependant are replaced,
    // and the plan says why; running containers and files are untouched.
    std::fs::write(stack.path().join("db.conf"), "size=2\n").unwrap();
    let before: Vec<String> = hosts.iter().map(|h| containers(h, &project)).collect();
    let run = ctl(&env, "plan", &hosts, &stack).expect_code(0);
    let file_change = run.json();
    for h in hosts {
        let p = planned(&file_change, h);
        assert_eq!(p["db"], ("recreate".to_string(), vec!["file ./db.conf".to_string()]), "{file_change:#}");
        assert_eq!(p["web"], ("recreate".to_string(), vec!["dependency `db` is replaced".to_string()]));
        assert_eq!(p["side"].0, "keep");
        assert_eq!(result(&file_change, h)["files_changed"], 1);
        let live = h.path(&format!("/var/lib/mlops-agent/trees/stack-{project}/db.conf"));
        assert_eq!(std::fs::read_to_string(live).unwrap(), "size=1\n", "the stack's tree is untouched");
        let trees = std::fs::read_dir(h.path("/var/lib/mlops-agent/trees")).unwrap();
        let scratch: Vec<_> =
            trees.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("plan-")).collect();
        assert!(scratch.is_empty(), "the scratch tree is removed");
    }
    let after: Vec<String> = hosts.iter().map(|h| containers(h, &project)).collect();
    assert_eq!(before, after, "the plan replaced nothing");
    let text = env
        .ctl_key(&["plan", "--stack", &stack.path().display().to_string(), "--host", &h1.spec("root")])
        .expect_code(0);
    assert!(text.stdout.contains("  db: recreate (file ./db.conf)"), "{}", text.stdout);
    assert!(text.stdout.contains("  files: 1 to write, 0 to remove"), "{}", text.stdout);
    let deployed = ctl(&env, "deploy", &hosts, &stack).expect_code(0).json();
    agrees(&file_change, &deployed, &hosts);
    for h in hosts {
        assert_eq!(result(&deployed, h)["stack"]["sync"]["written"], 1);
    }

    // The image changes: built on the first host, shipped to the second,
    // every service replaced for it.
    let dockerfile = stack.path().join("img/Dockerfile");
    let mut text = std::fs::read_to_string(&dockerfile).unwrap();
    text.push_str("RUN [\"/bin/sh\", \"-c\", \"echo 2 > /version\"]\n");
    std::fs::write(&dockerfile, text).unwrap();
    let image_change = ctl(&env, "plan", &hosts, &stack).expect_code(0).json();
    let tag = format!("{project}-img");
    let image = |h: &TestHost| result(&image_change, h)["images"][0].clone();
    assert_eq!((image(&h1)["tag"].as_str().unwrap(), image(&h1)["action"].as_str().unwrap()), (tag.as_str(), "build"));
    assert_eq!(image(&h2)["action"], "ship", "{image_change:#}");
    assert_eq!(image(&h2)["from"], h1.spec("root"));
    assert!(planned(&image_change, &h2)["side"].1.contains(&"image (built or pulled first)".to_string()));
    let deployed = ctl(&env, "deploy", &hosts, &stack).expect_code(0).json();
    agrees(&image_change, &deployed, &hosts);
    let arrival = |h: &TestHost| result(&deployed, h)["stack"]["images"][0]["arrival"].clone();
    assert_eq!((arrival(&h1), arrival(&h2)), (serde_json::json!("built"), serde_json::json!("shipped")));
}
