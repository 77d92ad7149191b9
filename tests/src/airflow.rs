//! The platform's Airflow, from a test host where its API server's port
//! (28080) is published on loopback: a token for the admin, REST calls,
//! and waiting for a condition. Used by the platform tests.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::TestHost;

const AIRFLOW: &str = "http://127.0.0.1:28080";

/// A JWT for `admin` with `password`, or `None` when refused.
pub fn token(host: &TestHost, password: &str) -> Option<String> {
    login(host, "admin", password)
}

/// [`token`] for account `user`.
pub fn login(host: &TestHost, user: &str, password: &str) -> Option<String> {
    // The body goes through a file: this test samples every command line
    // for secrets, its own curl included.
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), json!({"username": user, "password": password}).to_string()).unwrap();
    let data = format!("@{}", body.path().display());
    let (code, text) = host.curl(&[
        "-X",
        "POST",
        &format!("{AIRFLOW}/auth/token"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &data,
    ]);
    (code == 201 || code == 200)
        .then(|| serde_json::from_str::<Value>(&text).ok()?["access_token"].as_str().map(str::to_string))
        .flatten()
}

/// A REST call (`/api/v2/...`) that must succeed; its JSON answer.
pub fn api(host: &TestHost, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let auth = format!("Authorization: Bearer {token}");
    let url = format!("{AIRFLOW}{path}");
    let mut args = vec!["-X", method, url.as_str(), "-H", auth.as_str(), "-H", "Content-Type: application/json"];
    let body = body.map(|b| b.to_string());
    if let Some(b) = &body {
        args.extend(["-d", b.as_str()]);
    }
    let (mut code, mut text) = host.curl(&args);
    // A GET that got no answer within curl's 20 s, or a gateway's 5xx,
    // is asked again (twice): on a loaded machine (a build, emulated VMs
    // beside) the API server can stall that long and still be healthy.
    // Never a POST: it may have been done.
    for _ in 0..2 {
        if method != "GET" || !(code == 0 || (502..=504).contains(&code)) {
            break;
        }
        std::thread::sleep(Duration::from_secs(5));
        (code, text) = host.curl(&args);
    }
    assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// `probe` until it returns something, every 2 s, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {} s waiting for {what}", limit.as_secs());
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The logs of the failed tasks of `dag`'s run `run` (every try), and the
/// last lines of the scheduler's, the workers' and the API server's own
/// logs (a task that stops answering is failed by the scheduler, and says
/// nothing itself), to show why a run failed.
pub fn failed_task_logs(host: &TestHost, token: &str, dag: &str, run: &str) -> String {
    let tis = api(host, token, "GET", &format!("/api/v2/dags/{dag}/dagRuns/{run}/taskInstances"), None);
    let mut out = String::new();
    for ti in tis["task_instances"].as_array().into_iter().flatten().filter(|t| t["state"] == "failed") {
        let task = ti["task_id"].as_str().unwrap_or_default();
        for attempt in 1..=ti["try_number"].as_u64().unwrap_or(1).max(1) {
            let path = format!("/api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}/logs/{attempt}");
            let log = api(host, token, "GET", &path, None);
            let lines: Vec<String> = match &log["content"] {
                Value::Array(items) => {
                    items.iter().map(|i| i["event"].as_str().map_or_else(|| i.to_string(), str::to_string)).collect()
                }
                other => vec![other.to_string()],
            };
            out.push_str(&format!("--- {dag} {run} {task} try {attempt}:\n{}\n", lines.join("\n")));
        }
    }
    for service in ["airflow-scheduler", "airflow-worker", "airflow-apiserver"] {
        let ids = host.docker_result(&["ps", "-aq", "--filter", &format!("label=mlops.service={service}")]);
        for id in ids.unwrap_or_default().split_whitespace() {
            // The CLI writes the container's stderr to its own.
            let logs = match host.docker_command(&["logs", "--tail", "40", id]).output() {
                Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
                Err(e) => e.to_string(),
            };
            out.push_str(&format!("--- the last lines of {service} ({id}):\n{logs}\n"));
        }
    }
    out
}

/// Triggers a run of `dag` and waits for it to succeed; its run id.
pub fn run_dag(host: &TestHost, tok: &str, dag: &str) -> String {
    let created = api(host, tok, "POST", &format!("/api/v2/dags/{dag}/dagRuns"), Some(json!({"logical_date": null})));
    let id = created["dag_run_id"].as_str().expect("a run id").to_string();
    let started = Instant::now();
    wait_for(&format!("{dag} run {id} to succeed"), Duration::from_secs(600), || {
        let run = api(host, tok, "GET", &format!("/api/v2/dags/{dag}/dagRuns/{id}"), None);
        if run["state"] == "failed" {
            panic!("{dag} run failed: {run}\n{}", failed_task_logs(host, tok, dag, &id));
        }
        (run["state"] == "success").then_some(())
    });
    eprintln!("{dag} run succeeded in {:.0} s", started.elapsed().as_secs_f64());
    id
}
