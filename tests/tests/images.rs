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
