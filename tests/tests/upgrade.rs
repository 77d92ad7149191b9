//! The platform upgraded in place from the previous release's bundle
//! (`tests/fixtures/platform-previous`: Airflow with its SimpleAuthManager)
//! to this one (the FAB auth manager, its provider in the image, the admin
//! kept by `airflow-init`), by the real mlopsctl over SSH to a test host
//! with its own Docker engine:
//! - the database migration (`airflow db migrate`, which now makes FAB's
//!   tables) runs once, in the one new `airflow-init` container, and ends
//!   before any new Airflow component (API server, scheduler, DAG
//!   processor, triggerer, worker) starts;
//! - the DAG run history, the admin's password and an encrypted variable
//!   are kept; a DAG runs to success afterwards; `mlopsctl users` works on
//!   the upgraded platform.
//!
//! Grafana is left out (no registry here). Slow: the previous bundle's
//! Python image is built here; the run's other images (the same in both
//! bundles, and this bundle's Python image) come from the run's depot when
//! the platform test built them earlier in the run.

use std::path::Path;
use std::time::{Duration, Instant};

use mlops_e2e::airflow::{api, run_dag, token};
use mlops_e2e::{TestEnv, TestHost};
use serde_json::{Value, json};

const PROJECT: &str = "mlops-e2e-upgrade";

/// Every DAG run as (id, state), oldest first.
fn runs(host: &TestHost, tok: &str) -> Vec<(String, String)> {
    let runs = api(host, tok, "GET", "/api/v2/dags/~/dagRuns?limit=1000&order_by=id", None);
    runs["dag_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["dag_run_id"].as_str().unwrap().to_string(), r["state"].as_str().unwrap().to_string()))
        .collect()
}

/// A container's time field (`State.StartedAt`, `State.FinishedAt`): its
/// whole seconds as RFC 3339 text in UTC (which sorts) and its nanoseconds
/// (Docker trims the fraction's trailing zeros, so the whole text does not
/// sort).
fn instant(host: &TestHost, container: &str, field: &str) -> (String, u64) {
    let text = host.docker(&["inspect", "-f", &format!("{{{{.State.{field}}}}}"), container]);
    let text = text.trim().trim_end_matches('Z');
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let nanos: u64 = format!("{fraction:0<9}")[..9].parse().unwrap_or_else(|_| panic!("{container} {field}: {text}"));
    (whole.to_string(), nanos)
}

#[test]
fn the_platform_upgrades_from_the_previous_bundle_keeping_its_history() {
    let mut env = TestEnv::new().unwrap();
    // The previous bundle's Python image is built: more than the default deadline.
    env.ctl_deadline = Duration::from_secs(40 * 60);
    let host = env.docker_host("upgrade").unwrap();
    let key = env.key.display().to_string();
    let spec = host.spec("root");
    let ctl = |args: &[&str]| {
        let mut all = vec!["--identity", key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        env.ctl(&all)
    };
    // This bundle's images, built by the platform test earlier in the run:
    // those the bundles share are used as they are; the previous bundle's
    // Python image differs (its build context does) and is built.
    let stocked = host.stock_images("platform").unwrap();
    let previous = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/platform-previous/.");
    let copied = std::process::Command::new("cp").arg("-a").arg(&fixture).arg(previous.path()).status().unwrap();
    assert!(copied.success());
    let old = previous.path().display().to_string();
    let deploy = ["deploy", "--project", PROJECT, "--skip", "grafana", "--health-timeout", "900", "--output", "json"];

    let started = Instant::now();
    let run = ctl(&[&deploy[..], &["--stack", &old]].concat());
    if run.code != 0 {
        eprintln!("agent log:\n{}", host.agent_log());
    }
    run.expect_code(0);
    eprintln!("the previous bundle deployed in {:.0} s", started.elapsed().as_secs_f64());
    let secrets = ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json();
    let password = secrets["secrets"]["AIRFLOW_ADMIN_PASSWORD"].as_str().unwrap().to_string();
    let tok = token(&host, &password).expect("the admin logs in to the previous bundle's Airflow");
    let first = run_dag(&host, &tok, "example_etl");
    api(&host, &tok, "POST", "/api/v2/variables", Some(json!({"key": "upgrade_probe", "value": "kept across"})));
    let before = runs(&host, &tok);
    assert!(before.contains(&(first, "success".to_string())), "{before:?}");

    // The previous build took the Python image's tag; this bundle's image
    // comes back from the depot (as a deploy from another host ships it).
    if stocked {
        host.stock_images("platform").unwrap();
    }
    let started = Instant::now();
    let run = ctl(&deploy);
    if run.code != 0 {
        eprintln!("agent log:\n{}", host.agent_log());
    }
    let run = run.expect_code(0).json();
    eprintln!("upgraded in {:.0} s", started.elapsed().as_secs_f64());
    let stack = &run["hosts"][0]["result"]["stack"];
    let changed: Vec<&str> = stack["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["changed"] == true)
        .filter_map(|s| s["service"].as_str())
        .collect();
    eprintln!("changed by the upgrade: {changed:?} ({} in all)", stack["changed"]);
    assert!(stack["changed"].as_u64().unwrap_or(0) >= 6, "the Airflow services were recreated: {stack:#}");

    // The migration ran once, in the one init container, and ended before
    // every new Airflow component started.
    let label = format!("label=mlops.project={PROJECT}");
    let inits =
        host.docker(&["ps", "-a", "--filter", &label, "--filter", "name=airflow-init", "--format", "{{.Names}}"]);
    let inits: Vec<&str> = inits.lines().collect();
    assert_eq!(inits.len(), 1, "one init container: {inits:?}");
    let init = inits[0];
    assert_eq!(host.docker(&["inspect", "-f", "{{.State.ExitCode}}", init]).trim(), "0");
    let log = host.docker(&["logs", init]);
    assert_eq!(log.matches("Database migration done").count(), 1, "one migration:\n{log}");
    assert!(log.contains("admin `admin` created"), "FAB's admin made from the deployment's password:\n{log}");
    let migrated = instant(&host, init, "FinishedAt");
    for service in
        ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker"]
    {
        let container = format!("{PROJECT}-{service}-1");
        let started = instant(&host, &container, "StartedAt");
        assert!(started > migrated, "{service} started at {started:?}, before the migration ended at {migrated:?}");
        // A component that started early and crashed would show only its
        // restart's time.
        assert_eq!(host.docker(&["inspect", "-f", "{{.RestartCount}}", &container]).trim(), "0", "{service} restarted");
    }

    // Kept: the admin's password, the run history, the encrypted variable.
    let tok = token(&host, &password).expect("the same admin password after the upgrade");
    let after = runs(&host, &tok);
    for r in &before {
        assert!(after.contains(r), "run {r:?} is kept: {after:?}");
    }
    let probe = api(&host, &tok, "GET", "/api/v2/variables/upgrade_probe", None);
    assert_eq!(probe["value"], "kept across", "{probe}");
    run_dag(&host, &tok, "example_etl");
    let users = ctl(&["users", "list", "--project", PROJECT, "--skip", "grafana", "--output", "json"]).expect_code(0);
    let accounts: Value = users.json()["result"]["accounts"].clone();
    assert_eq!(accounts.as_array().map(Vec::len), Some(1), "{accounts}");
    assert_eq!(accounts[0]["name"], "admin");
    assert_eq!(accounts[0]["roles"], json!(["Admin"]));
}
