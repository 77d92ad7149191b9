//! The phases of converge, each driven on its own through the agent's
//! library against a test host's own Docker engine: what the coming `plan`
//! and `rollback` commands will reuse.

use std::time::Duration;

use mlops_agent::engine::converge::plan::Action as PlanAction;
use mlops_agent::engine::converge::{self, health, images, orphans, plan, resources, start};
use mlops_agent::engine::{Action, Events, docker};
use mlops_e2e::{TestHost, TestStack};

const COMPOSE: &str = r#"
name: "{project}"
services:
  db:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
  web:
    build: ./img
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    depends_on:
      db: {condition: service_healthy}
volumes:
  data:
"#;

#[tokio::test]
async fn each_phase_of_converge_works_on_its_own() {
    let host = TestHost::with_docker("phases").unwrap();
    let engine = docker::connect(&host.docker_socket()).await.unwrap();
    let dir = TestStack::new(COMPOSE).unwrap();
    let stack = mlops_compose::load(dir.path(), &mlops_compose::LoadOptions::default()).unwrap().stack;
    let order = stack.start_order().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let ev = Events::new(tx);
    let label = format!("label=mlops.project={}", dir.project);

    // 1. Networks and volumes: created once, then found.
    assert!(resources::ensure(&engine, &stack, &order, &ev).await.unwrap());
    assert!(!resources::ensure(&engine, &stack, &order, &ev).await.unwrap(), "the second time there is nothing to do");
    assert_eq!(host.docker(&["volume", "ls", "-q", "--filter", &label]), stack.volume_name("data"));

    // 2. Images: built, then current (the context hash is unchanged).
    let work = tempfile::tempdir().unwrap();
    let dirs = converge::StackDirs {
        files: dir.path().to_path_buf(),
        work: work.path().join("tmp"),
        credentials: work.path().join("credentials.json"),
        stopped: work.path().join("stopped.json"),
    };
    let built = images::ensure(&engine, &stack, &order, &dirs, None, 0, &ev).await.unwrap();
    assert!(built.changed);
    let again = images::ensure(&engine, &stack, &order, &dirs, None, 0, &ev).await.unwrap();
    assert!(!again.changed, "an unchanged context is not rebuilt");
    assert_eq!(built.ids, again.ids);

    // 3. The plan for an empty project creates everything; nothing ran yet.
    let hashes = plan::config_hashes(&stack, &order, &built.ids, dir.path()).unwrap();
    let first = plan::plan(
        &stack,
        &order,
        &hashes,
        &Default::default(),
        plan::existing(&engine, &stack.project).await.unwrap(),
    );
    assert!(first.services.iter().all(|s| s.action == PlanAction::Create), "{first:?}");
    assert_eq!(host.docker(&["ps", "-aq", "--filter", &label]), "", "planning changes nothing");

    // 4 and 6. Started in order, then healthy.
    let timeout = Duration::from_secs(60);
    let ids = start::run(&engine, &stack, &first, dir.path(), timeout, &ev).await.unwrap();
    health::gate(&engine, &stack, &order, &ids, timeout, &ev).await.unwrap();
    assert!(ids.values().all(|(_, changed)| *changed));
    // The minimum healthy time: what still runs after it passes.
    health::hold(&engine, &stack, &order, &ids, Duration::from_secs(1), &ev).await.unwrap();

    // Images by ID (a kept revision's): the same IDs, nothing built.
    let pinned = images::ensure(&engine, &stack, &order, &dirs, Some(&built.ids), 0, &ev).await.unwrap();
    assert_eq!((pinned.ids.clone(), pinned.changed), (built.ids.clone(), false));
    let mut gone = built.ids.clone();
    gone.values_mut().for_each(|id| *id = format!("sha256:{}", "0".repeat(64)));
    let e = images::ensure(&engine, &stack, &order, &dirs, Some(&gone), 0, &ev).await.unwrap_err().to_string();
    assert!(e.contains("is no longer on this host"), "{e}");

    // The same model again: every container is kept.
    let second = plan::plan(
        &stack,
        &order,
        &hashes,
        &Default::default(),
        plan::existing(&engine, &stack.project).await.unwrap(),
    );
    for s in &second.services {
        assert!(matches!(&s.action, PlanAction::Keep { id, .. } if *id == ids[&s.service].0), "{s:?}");
    }

    // 5. Without `web` in the model, its container is an orphan, and goes.
    let mut smaller = stack.clone();
    smaller.services.remove("web");
    let order = smaller.start_order().unwrap();
    let hashes = plan::config_hashes(&smaller, &order, &built.ids, dir.path()).unwrap();
    let third = plan::plan(
        &smaller,
        &order,
        &hashes,
        &Default::default(),
        plan::existing(&engine, &stack.project).await.unwrap(),
    );
    assert_eq!(third.orphans.iter().map(|o| o.service.as_str()).collect::<Vec<_>>(), ["web"]);
    assert!(orphans::remove(&engine, &third.orphans, &ev).await.unwrap());
    assert_eq!(host.docker(&["ps", "-aq", "--filter", &format!("id={}", ids["web"].0)]), "");

    // What the phases reported, in order.
    drop(ev);
    let mut actions = Vec::new();
    while let Some(e) = rx.recv().await {
        actions.push((e.service, e.action));
    }
    let find = |s: &str, a: Action| actions.iter().position(|x| x.0 == s && x.1 == a).unwrap_or(usize::MAX);
    assert!(find("", Action::VolumeCreated) < find("db", Action::BuildStarted), "{actions:?}");
    assert!(find("db", Action::Created) < find("web", Action::Waiting), "{actions:?}");
    assert!(find("web", Action::Waiting) < find("web", Action::Created), "{actions:?}");
    assert!(find("web", Action::OrphanRemoved) < usize::MAX, "{actions:?}");
}
