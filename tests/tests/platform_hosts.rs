//! The MLOps platform across three hosts by inventory group, deployed by
//! the real mlopsctl over SSH to test hosts that each have their own
//! Docker engine:
//! - `pl-a`: db, airflow, spark_master and monitoring;
//! - `pl-b`: airflow_workers and spark_workers (the only Celery worker);
//! - `pl-c`: spark_workers.
//!
//! Checked: each image comes from pl-a (built there, or loaded from the
//! run's image depot when the platform test built it earlier in the run)
//! and is shipped to the others;
//! the Spark master lists two ALIVE workers, one per worker host, at their
//! hosts' addresses; a DAG task runs on pl-b's Celery worker and the API
//! server on pl-a returns its log (fetched from pl-b's log server); the
//! `spark_pi` DAG succeeds with its driver in pl-b's worker and executors
//! on pl-b and pl-c; Prometheus on pl-a scrapes the node exporter of every
//! host.
//!
//! Grafana is left out (`--skip grafana`): no registry here. Slow (the
//! platform's images are built, or loaded, once, then shipped); run in CI.

use std::time::Duration;

use mlops_e2e::airflow::{api, token, wait_for};
use mlops_e2e::{TestEnv, TestHost};
use serde_json::{Value, json};

const PROJECT: &str = "mlops-e2e-hosts";

fn inventory(env: &TestEnv, a: &TestHost, b: &TestHost, c: &TestHost) -> String {
    let host = |h: &TestHost| format!("        {}:\n          ansible_host: {}\n", h.name, h.addr);
    let group = |name: &str, hosts: &[&TestHost]| {
        format!("    {name}:\n      hosts:\n{}", hosts.iter().map(|h| host(h)).collect::<String>())
    };
    let mut text = String::from("all:\n  vars:\n    ansible_user: root\n  children:\n");
    for name in ["db", "airflow", "spark_master", "monitoring"] {
        text.push_str(&group(name, &[a]));
    }
    text.push_str(&group("airflow_workers", &[b]));
    text.push_str(&group("spark_workers", &[b, c]));
    env.write("inventory.yml", &text).unwrap().display().to_string()
}

#[test]
fn the_platform_spans_hosts_by_inventory_group() {
    let mut env = TestEnv::new().unwrap();
    // Deploying the platform builds its images: more than the default deadline.
    env.ctl_deadline = std::time::Duration::from_secs(40 * 60);
    let (a, b, c) =
        (env.docker_host("pl-a").unwrap(), env.docker_host("pl-b").unwrap(), env.docker_host("pl-c").unwrap());
    let inv = inventory(&env, &a, &b, &c);
    // Built once per run (tests/platform.rs builds them on a new engine).
    if a.stock_images("platform").unwrap() {
        eprintln!("pl-a: the platform's images loaded from the run's depot");
    }
    let key = env.key.display().to_string();
    let run = env.ctl(&[
        "deploy",
        "-i",
        &inv,
        "--identity",
        &key,
        "--project",
        PROJECT,
        "--skip",
        "grafana",
        "--health-timeout",
        "900",
        "--output",
        "json",
    ]);
    if run.code != 0 {
        for h in [&a, &b, &c] {
            eprintln!("{} agent log:\n{}", h.name, h.agent_log());
        }
    }
    let run = run.expect_code(0);
    let json = run.json();
    let result = |h: &TestHost| -> Value {
        json["hosts"].as_array().unwrap().iter().find(|r| r["host"] == h.name.as_str()).unwrap()["result"].clone()
    };

    // From pl-a (built or stocked there); shipped to the others.
    for h in [&b, &c] {
        let images = result(h)["stack"]["images"].as_array().cloned().unwrap_or_default();
        assert!(!images.is_empty(), "{}: {:#}", h.name, result(h));
        for image in images {
            assert_eq!(image["arrival"], "shipped", "{}: {image:#}", h.name);
            assert_eq!(image["from"], a.name.as_str(), "{image:#}");
        }
    }
    let services = |h: &TestHost| -> Vec<String> {
        let mut s: Vec<String> = result(h)["stack"]["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["service"].as_str().unwrap().to_string())
            .collect();
        s.sort();
        s
    };
    assert_eq!(services(&b), ["airflow-worker", "node-exporter", "spark-worker"]);
    assert_eq!(services(&c), ["node-exporter", "spark-worker"]);
    assert!(!services(&a).contains(&"airflow-worker".to_string()) && services(&a).contains(&"postgres".to_string()));

    // Two ALIVE workers, one on each worker host, named by its address.
    let (code, text) = a.curl(&["http://127.0.0.1:18080/json/"]);
    assert_eq!(code, 200, "{text}");
    let master: Value = serde_json::from_str(&text).unwrap();
    let alive: Vec<&Value> = master["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "ALIVE").collect();
    assert_eq!(alive.len(), 2, "{master:#}");
    for h in [&b, &c] {
        assert!(
            alive.iter().any(|w| w["webuiaddress"].as_str().unwrap().contains(&format!("//{}:", h.addr))),
            "{}: {master:#}",
            h.name
        );
    }

    // A DAG task on pl-b's worker; its log through pl-a's API server.
    let secrets = env
        .ctl(&["secrets", "-i", &inv, "--identity", &key, "--project", PROJECT, "--limit", &a.name, "--output", "json"])
        .expect_code(0)
        .json();
    let password = secrets["secrets"]["AIRFLOW_ADMIN_PASSWORD"].as_str().unwrap().to_string();
    let tok = token(&a, &password).expect("the generated password works");
    let mut runs = Vec::new();
    for dag in ["example_etl", "spark_pi"] {
        let run = api(&a, &tok, "POST", &format!("/api/v2/dags/{dag}/dagRuns"), Some(json!({"logical_date": null})));
        runs.push((dag, run["dag_run_id"].as_str().unwrap().to_string()));
    }
    wait_for("both DAG runs to succeed", Duration::from_secs(900), || {
        let states: Vec<String> = runs
            .iter()
            .map(|(dag, id)| {
                api(&a, &tok, "GET", &format!("/api/v2/dags/{dag}/dagRuns/{id}"), None)["state"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert!(!states.iter().any(|s| s == "failed"), "a DAG run failed: {runs:?} {states:?}");
        states.iter().all(|s| s == "success").then_some(())
    });
    let (dag, id) = &runs[1];
    let tis = api(&a, &tok, "GET", &format!("/api/v2/dags/{dag}/dagRuns/{id}/taskInstances"), None);
    let ti = &tis["task_instances"][0];
    assert_eq!(ti["hostname"], "airflow-worker-pl-b", "ran on pl-b's worker: {ti:#}");
    let task = ti["task_id"].as_str().unwrap();
    let log = api(&a, &tok, "GET", &format!("/api/v2/dags/{dag}/dagRuns/{id}/taskInstances/{task}/logs/1"), None);
    let text = log.to_string();
    assert!(text.contains("Pi is roughly"), "the log, from pl-b's log server: {text}");

    // Prometheus on pl-a scrapes every host's node exporter, each by its
    // instance name, published on its host's inventory address only.
    let bound = c.docker(&["port", &format!("{PROJECT}-node-exporter-1"), "9100"]);
    assert_eq!(bound.trim(), format!("{}:9100", c.addr), "{bound}");
    wait_for("every host's node exporter to be up in Prometheus", Duration::from_secs(120), || {
        let (code, text) = a.curl(&["http://127.0.0.1:19001/api/v1/targets?state=active"]);
        let targets: Value = serde_json::from_str(&text).ok()?;
        let up: Vec<String> = targets["data"]["activeTargets"]
            .as_array()?
            .iter()
            .filter(|t| t["labels"]["job"] == "node" && t["health"] == "up")
            .filter_map(|t| t["labels"]["host"].as_str().map(str::to_string))
            .collect();
        let mut up = up;
        up.sort();
        (code == 200 && up == [a.name.clone(), b.name.clone(), c.name.clone()]).then_some(())
    });
}
