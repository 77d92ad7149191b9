//! Images built once per deploy and shipped to the other hosts through the
//! agents and the controller, with no registry: real sshd hosts, each with
//! its own Docker engine, the real agent and CLI.

use mlops_e2e::{CtlRun, TestEnv, TestHost, TestStack};
use serde_json::Value;

const STACK: &str = r#"
name: "{project}"
services:
  app:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"#;

/// Per host (in the order given): how the image arrived, and from where.
fn arrivals(run: &CtlRun) -> Vec<(String, Value)> {
    run.json()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let images = h["result"]["stack"]["images"].as_array().cloned().unwrap_or_default();
            assert_eq!(images.len(), 1, "one image: {h:#}");
            (images[0]["arrival"].as_str().unwrap().to_string(), images[0].clone())
        })
        .collect()
}

fn image_id(host: &TestHost, tag: &str) -> String {
    host.docker(&["image", "inspect", "-f", "{{.Id}}", tag]).trim().to_string()
}

#[test]
fn an_image_is_built_on_one_host_and_shipped_to_the_others() {
    let env = TestEnv::new().unwrap();
    let (h1, h2, h3) =
        (env.docker_host("img1").unwrap(), env.docker_host("img2").unwrap(), env.docker_host("img3").unwrap());
    let hosts = [&h1, &h2, &h3];
    let stack = TestStack::new(STACK).unwrap();
    let tag = format!("{}-app", stack.project);

    // 1. Built once; the two other hosts receive it, with its bytes counted.
    let first = env.deploy_stack(&hosts, &stack, &[]).expect_code(0);
    let got = arrivals(&first);
    let built: Vec<usize> = (0..3).filter(|&i| got[i].0 == "built").collect();
    assert_eq!(built.len(), 1, "built on exactly one host: {got:?}\n{}", first.stderr);
    let builder = hosts[built[0]].spec("root");
    for (i, (arrival, image)) in got.iter().enumerate() {
        if i != built[0] {
            assert_eq!(arrival, "shipped", "{got:?}");
            assert_eq!(image["from"].as_str().unwrap(), builder, "{image:#}");
            assert!(image["bytes"].as_u64().unwrap() > 500_000, "a busybox image: {image:#}");
        }
    }
    assert_eq!(first.stderr.matches("shipped from").count(), 2, "{}", first.stderr);
    let id = image_id(&h1, &tag);
    assert!(id.starts_with("sha256:"), "{id}");
    for h in hosts {
        assert_eq!(image_id(h, &tag), id, "{}", h.name);
        assert!(!h.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={}", stack.project)]).is_empty());
    }

    // 2. Nothing to do: every host has it.
    let again = env.deploy_stack(&hosts, &stack, &[]).expect_code(0);
    assert!(arrivals(&again).iter().all(|(a, _)| a == "current"), "{:?}", arrivals(&again));

    // 3. A host that has the image under another name only has it tagged:
    //    nothing is sent.
    h2.docker(&["tag", &tag, "kept:1"]);
    h2.docker(&["rmi", &tag]);
    let tagged = env.deploy_stack(&hosts, &stack, &[]).expect_code(0);
    let got = arrivals(&tagged);
    assert_eq!(got[1].0, "tagged", "{got:?}");
    assert_eq!(got[1].1["bytes"], 0);
    assert!(got[0].0 == "current" && got[2].0 == "current", "{got:?}");
    assert_eq!(image_id(&h2, &tag), id);

    // 4. A changed context: built once again, shipped again.
    std::fs::write(stack.path().join("img/notes.txt"), "a changed build context\n").unwrap();
    let changed = env.deploy_stack(&hosts, &stack, &[]).expect_code(0);
    let got = arrivals(&changed);
    assert_eq!(got.iter().filter(|(a, _)| a == "built").count(), 1, "{got:?}");
    assert_eq!(got.iter().filter(|(a, _)| a == "shipped").count(), 2, "{got:?}");
    let new_id = image_id(&h1, &tag);
    assert_ne!(new_id, id);
    for h in hosts {
        assert_eq!(image_id(h, &tag), new_id, "{}", h.name);
    }

    // 5. A build that fails fails once: the other hosts say where and why,
    //    and build nothing themselves.
    std::fs::write(stack.path().join("img/Dockerfile"), "FROM scratch\nCOPY missing-file /x\n").unwrap();
    let failed = env.deploy_stack(&hosts, &stack, &[]).expect_code(1);
    let json = failed.json();
    let errors: Vec<&str> = json["hosts"].as_array().unwrap().iter().map(|h| h["error"].as_str().unwrap()).collect();
    let own = errors.iter().filter(|e| !e.contains("comes from another host")).count();
    assert_eq!(own, 1, "one host built and failed: {errors:#?}");
    assert_eq!(errors.iter().filter(|e| e.contains("comes from another host of this deploy")).count(), 2);
    assert_eq!(failed.stderr.matches(": building ").count(), 1, "{}", failed.stderr);
    for h in hosts {
        assert_eq!(image_id(h, &tag), new_id, "the running image stays: {}", h.name);
    }
}

/// A stack that pulls its image (`image:` without `build:`).
const PULLED: &str = r#"
name: "{project}"
services:
  app:
    image: "{project}-pulled:1"
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"#;

/// An image the stack pulls and no host has comes from the controller
/// machine's own Docker engine (how a user with a registry supplies
/// Grafana to hosts without one). Here a test host's engine stands in for
/// it, named by DOCKER_HOST: the tests never use this machine's engine.
#[test]
fn an_image_no_host_has_comes_from_the_controller_machines_engine() {
    let env = TestEnv::new().unwrap();
    let (local, h1, h2) =
        (env.docker_host("loc0").unwrap(), env.docker_host("loc1").unwrap(), env.docker_host("loc2").unwrap());
    let stack = TestStack::new(PULLED).unwrap();
    let tag = format!("{}-pulled:1", stack.project);
    local.docker(&["build", "-q", "-t", &tag, &stack.path().join("img").display().to_string()]);
    let id = image_id(&local, &tag);
    let engine = format!("unix://{}", local.docker_socket().display());
    let (key, dir) = (env.key.display().to_string(), stack.path().display().to_string());
    let run = |command: &str, hosts: &[&TestHost], extra: &[&str]| {
        let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
        let mut args = vec![command, "--identity", &key, "--stack", &dir, "--output", "json"];
        if command == "deploy" {
            args.extend(["--health-timeout", "60"]);
        }
        for s in &specs {
            args.extend(["--host", s.as_str()]);
        }
        args.extend(extra);
        env.ctl_with(&args, &[("DOCKER_HOST", engine.as_str())])
    };

    // 1. Told not to, the host pulls it, and there is no registry here:
    //    the deploy fails naming the image; nothing was taken from the engine.
    let refused = run("deploy", &[&h2], &["--no-local-images"]).expect_code(1);
    assert!(refused.stdout.contains(&tag) || refused.stderr.contains(&tag), "{}", refused.stderr);
    assert!(h2.docker_result(&["image", "inspect", &tag]).is_err(), "h2 has no {tag}");

    // 2. One host: plan says it comes from this machine's engine, and the
    //    deploy streams it from there (the host checks the ID it loaded).
    let plan = run("plan", &[&h1], &[]).expect_code(0).json();
    let planned = &plan["hosts"][0]["result"]["images"][0];
    assert_eq!((planned["tag"].as_str(), planned["action"].as_str()), (Some(tag.as_str()), Some("ship")), "{plan:#}");
    assert_eq!(planned["from"], "this machine's Docker engine");
    let one = run("deploy", &[&h1], &[]).expect_code(0);
    let got = arrivals(&one);
    assert_eq!(got[0].0, "shipped", "{got:?}");
    assert_eq!(got[0].1["from"], "this machine's Docker engine");
    assert!(got[0].1["bytes"].as_u64().unwrap() > 500_000, "a busybox image: {:#}", got[0].1);
    assert!(one.stderr.contains("shipped from this machine's Docker engine"), "{}", one.stderr);
    assert_eq!(image_id(&h1, &tag), id);

    // 3. Two hosts: h1 has it now, and so has this machine, the very same
    //    image: h2 gets it from this machine (h1's engine saves nothing;
    //    host-to-host shipping is the test above, and `migrate`'s); h1
    //    receives nothing.
    let two = run("deploy", &[&h1, &h2], &[]).expect_code(0);
    let got = arrivals(&two);
    assert_eq!(got[0].0, "current", "{got:?}");
    assert_eq!(
        (got[1].0.as_str(), got[1].1["from"].as_str()),
        ("shipped", Some("this machine's Docker engine")),
        "{got:?}"
    );
    assert_eq!(image_id(&h2, &tag), id);
    assert!(!h2.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={}", stack.project)]).is_empty());
}
