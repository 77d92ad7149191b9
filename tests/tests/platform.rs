//! The MLOps platform, deployed by the real mlopsctl over SSH to a test host
//! with its own Docker engine, and then used: DAGs run
//! through the REST API, Spark jobs run on the cluster (one reads and
//! writes PostgreSQL over JDBC), Prometheus scrapes
//! everything, every dashboard query returns data, accounts with roles are
//! managed (`mlopsctl users`: a viewer cannot trigger a DAG, an admin can;
//! they move with the platform), a synced DAG appears
//! without a restart, so does a jar synced to `spark/jars/` (the next job's
//! driver and executors see it), the run history survives `down` +
//! `deploy`, the
//! database's and broker's passwords and the Fernet key are rotated with
//! DAG runs succeeding after each (and an encrypted variable still read),
//! the `mlflow` profile is added (nothing running is recreated; a DAG
//! trains a model and the run, its parameters, metrics and model are read
//! back through MLflow's REST API; Prometheus scrapes the server),
//! the platform moves to a second test host with its data (`mlopsctl
//! migrate`: run history, task logs, variables, paused set, password,
//! MLflow's runs and artifacts), is backed up while it runs and restored
//! in place (`mlopsctl backup`, `restore`: the backup's runs back, a later
//! one gone, row counts checked against the dump's),
//! and there another controller takes the platform over keeping its
//! passwords.
//!
//! Grafana is left out (`--skip grafana`): its image comes only from a
//! registry, and none is reachable here. Its dashboards are checked against
//! the live Prometheus instead.
//!
//! Slow (cold image builds on the host's new engine take minutes); one test,
//! run in CI. The platform's ports (28080, 18080, 18081, 19001) are
//! published on the test host's loopback, where the requests come from; its
//! project is `mlops-e2e` and its state directory the test's own, so a
//! platform deployed on this machine is never touched.

use std::path::Path;
use std::time::{Duration, Instant};

use mlops_e2e::airflow::{api, failed_task_logs, login, run_dag, token, wait_for};
use mlops_e2e::{NO_HOST, StepTimes, TestEnv, TestHost};
use serde_json::{Value, json};

const PROMETHEUS: &str = "http://127.0.0.1:19001";
const SPARK: &str = "http://127.0.0.1:18080";
const MLFLOW: &str = "http://127.0.0.1:15000";

/// A Spark job that finds `mlops_probe.txt` (in a jar synced to
/// `spark/jars/`) on the class path of its driver and of every executor
/// task (`reflect` runs per row, on the executors; the row's own id in the
/// name keeps Spark from computing it once on the driver).
const JAR_PROBE_JOB: &str = r#"import sys
from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
driver = spark.sparkContext._jvm.java.lang.ClassLoader.getSystemResource("mlops_probe.txt")
rows = spark.range(0, 4, 1, 4).selectExpr(
    "reflect('java.lang.ClassLoader', 'getSystemResource', "
    "concat('mlops_probe', substr(cast(id AS string), 1, 0), '.txt')) AS url"
).collect()
urls = [r.url for r in rows]
print("driver:", driver, "executors:", urls)
sys.exit(0 if driver is not None and all(u and u != "null" for u in urls) else 1)
"#;

const JAR_PROBE_DAG: &str = r#"from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag


@dag(schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def jar_probe():
    BashOperator(
        task_id="probe",
        bash_command=(
            "spark-submit --master spark://spark-master:7077 "
            "--conf spark.driver.host=$(hostname) --conf spark.driver.bindAddress=0.0.0.0 "
            "--conf spark.driver.port=7079 --conf spark.blockManager.port=7089 "
            "--conf spark.app.name=mlops-jar-probe /opt/spark/jobs/jar_probe.py"
        ),
    )


jar_probe()
"#;

/// The project name: not the default `mlops`, so that nothing here could
/// be taken for a user's platform.
const PROJECT: &str = "mlops-e2e";

fn prom_query(host: &TestHost, q: &str) -> Vec<Value> {
    let (code, text) =
        host.curl(&["-G", &format!("{PROMETHEUS}/api/v1/query"), "--data-urlencode", &format!("query={q}")]);
    assert_eq!(code, 200, "{q}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// A copy of the platform bundle (what `mlopsctl deploy` embeds), to add a DAG to.
fn copy_bundle(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../platform");
    fn copy(from: &Path, to: &Path, rel: &str) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            if r.starts_with("exporter/") && r != "exporter/Dockerfile" {
                continue;
            }
            if e.path().is_dir() {
                copy(&e.path(), &to.join(&name), &r);
            } else {
                std::fs::copy(e.path(), to.join(&name)).unwrap();
            }
        }
    }
    copy(&from, to, "");
}

/// Every distinct command line on this machine, sampled every 200 ms from
/// /proc until `stop` (the test host's processes and containers share this
/// machine's PID namespace, so they are all seen): generated secrets must
/// never be among them (a command line is readable by every user of a host).
struct CommandLines {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(std::collections::BTreeSet<String>, u32)>,
}

impl CommandLines {
    fn sample() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut seen, mut rounds) = (std::collections::BTreeSet::new(), 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
                        seen.insert(String::from_utf8_lossy(&raw).replace('\0', " "));
                    }
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            (seen, rounds)
        });
        CommandLines { stop, thread }
    }

    fn finish(self) -> (std::collections::BTreeSet<String>, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn the_platform_comes_up_works_and_keeps_its_history() {
    let mut steps = StepTimes::new(env!("CARGO_TARGET_TMPDIR"), "platform");
    let mut env = TestEnv::new().unwrap();
    // Deploying the platform builds its images: more than the default deadline.
    env.ctl_deadline = std::time::Duration::from_secs(40 * 60);
    let host = env.docker_host("platform").unwrap();
    let key = env.key.display().to_string();
    let spec = host.spec("root");
    let ctl = |args: &[&str]| {
        let mut all = vec!["--identity", key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        env.ctl(&all)
    };

    // The embedded default stack: the platform, without Grafana.
    let command_lines = CommandLines::sample();
    let run =
        ctl(&["deploy", "--project", PROJECT, "--skip", "grafana", "--health-timeout", "900", "--output", "json"]);
    if run.code != 0 {
        eprintln!("agent log:\n{}\ndockerd log:\n{}", host.agent_log(), host.dockerd_log());
    }
    let run = run.expect_code(0);
    let json = run.json();
    let services = json["hosts"][0]["result"]["stack"]["services"].as_array().unwrap().clone();
    for s in &services {
        let name = s["service"].as_str().unwrap();
        let ok = if name == "airflow-init" { s["state"] == "exited" } else { s["state"] == "running" };
        assert!(ok, "{s}");
        assert!(s["health"] == "healthy" || s["health"] == "", "{s}");
    }
    assert!(services.iter().filter(|s| s["health"] == "healthy").count() >= 10, "every component is health-checked");
    // Built here, on a new engine (the project's label names them; the
    // kept revision's tags aside): the run's later platform tests load
    // these instead of building them again.
    let label = format!("label=mlops.project={PROJECT}");
    let built = host.docker(&["images", "--filter", &label, "--format", "{{.Repository}}:{{.Tag}}"]);
    let built: Vec<&str> = built.lines().filter(|t| !t.starts_with("mlops-kept:") && !t.contains("<none>")).collect();
    assert!(built.contains(&"mlops-python:latest"), "the images were built here: {built:?}");
    steps.step("deploy (images built)");
    host.deposit_images("platform", &built).unwrap();
    steps.step("images saved to the run's depot");

    // Generated credentials: they work, admin/admin does not.
    let secrets = ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json();
    let password = secrets["secrets"]["AIRFLOW_ADMIN_PASSWORD"].as_str().unwrap().to_string();
    assert!(
        !run.stderr.contains(&password) && !run.stdout.contains(&password),
        "the password is never printed by deploy"
    );
    assert!(token(&host, "admin").is_none(), "admin/admin is refused");
    let tok = token(&host, &password).expect("the generated password works");

    // The example DAGs run to success through the REST API.
    let examples = ["example_etl", "spark_pi", "spark_jdbc"];
    for dag in examples {
        api(&host, &tok, "POST", &format!("/api/v2/dags/{dag}/dagRuns"), Some(json!({"logical_date": null})));
    }
    wait_for("the example DAG runs to succeed", Duration::from_secs(600), || {
        let runs = api(&host, &tok, "GET", "/api/v2/dags/~/dagRuns", None);
        let states: Vec<(String, String)> = runs["dag_runs"]
            .as_array()?
            .iter()
            .map(|r| (r["dag_id"].as_str().unwrap_or("").to_string(), r["state"].as_str().unwrap_or("").to_string()))
            .collect();
        if let Some(failed) = runs["dag_runs"].as_array()?.iter().find(|r| r["state"] == "failed") {
            let (dag, id) = (failed["dag_id"].as_str().unwrap(), failed["dag_run_id"].as_str().unwrap());
            panic!("a DAG run failed: {states:?}\n{}", failed_task_logs(&host, &tok, dag, id));
        }
        // (mlops_maintenance, daily, has its first run beside them.)
        let done = states.iter().filter(|(d, s)| examples.contains(&d.as_str()) && s == "success").count();
        (done == examples.len()).then_some(())
    });
    // No secret was ever on a command line, during the deploy, the health
    // checks and the DAG runs.
    let (lines, rounds) = command_lines.finish();
    assert!(rounds > 100 && lines.iter().any(|l| l.contains("redis-server")), "the sampler saw the platform");
    for (name, value) in secrets["secrets"].as_object().unwrap() {
        let value = value.as_str().unwrap();
        if let Some(line) = lines.iter().find(|l| l.contains(value)) {
            panic!("secret {name} was on a command line: {line}");
        }
    }
    eprintln!("{} distinct command lines in {rounds} samples; no secret among them", lines.len());
    steps.step("example DAGs");
    // PostgreSQL's superuser has its own password; Airflow's user is not a superuser.
    assert_ne!(secrets["secrets"]["POSTGRES_SUPERUSER_PASSWORD"], secrets["secrets"]["POSTGRES_PASSWORD"]);
    let pg = format!("{PROJECT}-postgres-1");
    let sql = "select rolname || '=' || rolsuper from pg_roles where rolname in ('airflow', 'postgres') order by 1";
    assert_eq!(host.docker(&["exec", &pg, "psql", "-U", "postgres", "-tAc", sql]), "airflow=false\npostgres=true");

    // Accounts with roles (FAB): a viewer added with a password from stdin
    // sees the DAGs and cannot trigger one; as Op it can; a generated
    // password replaces the old one; the stack's admin is not mlopsctl
    // users' to remove; an existing name, an unknown role and a missing
    // account are refused with exit 2. The viewer stays, for the migration.
    let ctl_in = |args: &[&str], input: &str| {
        let mut all = vec!["--identity", key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        env.ctl_input(&all, input)
    };
    let users = ["--project", PROJECT, "--skip", "grafana"];
    let viewer_pw = "viewer's own passphrase";
    let command_lines = CommandLines::sample();
    let added = ctl_in(
        &[&["users", "add", "vic", "--role", "Viewer", "--password-stdin"], &users[..]].concat(),
        &format!("{viewer_pw}\n"),
    );
    let added = added.expect_code(0);
    assert!(!added.stdout.contains(viewer_pw) && !added.stderr.contains(viewer_pw), "a given password is not printed");
    let listed = ctl(&[&["users", "list", "--output", "json"], &users[..]].concat()).expect_code(0).json();
    let roles: Vec<(String, String)> = listed["result"]["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a["roles"][0].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(roles, [("admin".to_string(), "Admin".to_string()), ("vic".to_string(), "Viewer".to_string())]);
    let vic = login(&host, "vic", viewer_pw).expect("the viewer logs in");
    assert!(api(&host, &vic, "GET", "/api/v2/dags", None)["dags"].as_array().is_some_and(|d| !d.is_empty()));
    let trigger = |tok: &str| {
        let auth = format!("Authorization: Bearer {tok}");
        host.curl(&[
            "-X",
            "POST",
            "http://127.0.0.1:28080/api/v2/dags/example_etl/dagRuns",
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"logical_date": null}"#,
        ])
    };
    let (code, text) = trigger(&vic);
    assert_eq!(code, 403, "a viewer cannot trigger a DAG: {text}");
    run_dag(&host, &tok, "example_etl");
    ctl(&[&["users", "set-role", "vic", "Op"], &users[..]].concat()).expect_code(0);
    // FAB caches an account's roles for up to 30 s.
    let (vic_tok, text) = wait_for("the viewer made Op to trigger a DAG", Duration::from_secs(90), || {
        let vic = login(&host, "vic", viewer_pw)?;
        let (code, text) = trigger(&vic);
        (code == 200).then_some((vic, text))
    });
    let op_run: Value = serde_json::from_str(&text).unwrap();
    let op_run = op_run["dag_run_id"].as_str().unwrap().to_string();
    wait_for("the Op's run to succeed", Duration::from_secs(600), || {
        let run = api(&host, &vic_tok, "GET", &format!("/api/v2/dags/example_etl/dagRuns/{op_run}"), None);
        assert_ne!(run["state"], "failed", "{run}");
        (run["state"] == "success").then_some(())
    });
    let reset = ctl(&[&["users", "set-password", "vic"], &users[..]].concat()).expect_code(0);
    let generated = reset.stdout.trim().to_string();
    assert!(generated.len() >= 32 && !generated.contains(char::is_whitespace), "the password alone: {}", reset.stdout);
    assert!(login(&host, "vic", viewer_pw).is_none(), "the old password no longer works");
    assert!(login(&host, "vic", &generated).is_some(), "the generated one does");
    ctl(&[&["users", "set-role", "vic", "Viewer"], &users[..]].concat()).expect_code(0);
    let refused = ctl(&[&["users", "add", "vic", "--role", "Viewer"], &users[..]].concat()).expect_code(2);
    assert!(refused.stderr.contains("Airflow refused"), "{}", refused.stderr);
    let refused = ctl(&[&["users", "add", "eve", "--role", "Boss"], &users[..]].concat()).expect_code(2);
    assert!(refused.stderr.contains("no role `Boss`") && refused.stderr.contains("Viewer"), "{}", refused.stderr);
    let refused = ctl(&[&["users", "remove", "admin"], &users[..]].concat()).expect_code(2);
    assert!(refused.stderr.contains("secrets rotate AIRFLOW_ADMIN_PASSWORD"), "{}", refused.stderr);
    let refused = ctl(&[&["users", "remove", "nobody"], &users[..]].concat()).expect_code(2);
    assert!(refused.stderr.contains("no account `nobody`"), "{}", refused.stderr);
    ctl(&[&["users", "add", "gone", "--role", "User"], &users[..]].concat()).expect_code(0);
    ctl(&[&["users", "remove", "gone"], &users[..]].concat()).expect_code(0);
    let listed = ctl(&[&["users", "list", "--output", "json"], &users[..]].concat()).expect_code(0).json();
    assert_eq!(listed["result"]["accounts"].as_array().unwrap().len(), 2, "{listed}");
    let (lines, _) = command_lines.finish();
    for (what, value) in [("the viewer's password", viewer_pw), ("the generated password", generated.as_str())] {
        assert!(!lines.iter().any(|l| l.contains(value)), "{what} was on a command line");
    }
    assert!(!lines.iter().any(|l| l.contains(&password)), "the admin's password was on a command line");
    steps.step("users");

    let (_, spark) = host.curl(&[&format!("{SPARK}/json/")]);
    let spark: Value = serde_json::from_str(&spark).unwrap();
    for app in ["mlops-spark-pi", "mlops-jdbc-summary"] {
        assert!(spark["completedapps"].as_array().unwrap().iter().any(|a| a["name"] == app), "{app}: {spark}");
    }
    // The JDBC job read `dag_run` and wrote its aggregate back: its own
    // run (running then) at least is counted.
    let summary = "select count(*) || ' ' || sum(runs) from mlops_examples.dag_run_summary";
    let summary = host.docker(&["exec", &pg, "psql", "-U", "postgres", "-d", "airflow", "-tAc", summary]);
    let counts: Vec<u32> = summary.split(' ').filter_map(|n| n.parse().ok()).collect();
    assert!(counts.len() == 2 && counts.iter().all(|&n| n >= 1), "rows and runs in the summary: `{summary}`");

    // Prometheus: every target up, the exporter's series present, and every
    // dashboard query answers with data.
    wait_for("every Prometheus target up", Duration::from_secs(120), || {
        let up = prom_query(&host, "up");
        (up.len() >= 7 && up.iter().all(|r| r["value"][1] == "1")).then_some(())
    });
    assert!(!prom_query(&host, "airflow_dag_status").is_empty());
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../platform/monitoring/grafana/dashboards");
    let mut queries = Vec::new();
    for f in std::fs::read_dir(&dashboards).unwrap().flatten() {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(f.path()).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                queries.push(t["expr"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(queries.len() >= 20, "{queries:?}");
    for q in &queries {
        wait_for(&format!("data for dashboard query `{q}`"), Duration::from_secs(90), || {
            (!prom_query(&host, q).is_empty()).then_some(())
        });
    }

    steps.step("spark and prometheus checks");
    // A new DAG, synced, is listed by Airflow within 60 s; nothing restarts.
    let before = host.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}"), "--no-trunc"]);
    let bundle = tempfile::tempdir().unwrap();
    copy_bundle(bundle.path());
    std::fs::write(
        bundle.path().join("airflow/dags/synced_later.py"),
        "from datetime import datetime\nfrom airflow.sdk import dag, task\n\n\n@dag(schedule=None, start_date=datetime(2024, 1, 1), catchup=False)\ndef synced_later():\n    @task\n    def hello():\n        print('hello')\n\n    hello()\n\n\nsynced_later()\n",
    )
    .unwrap();
    let dir = bundle.path().display().to_string();
    let synced = ctl(&["sync", "--stack", &dir, "--project", PROJECT, "--skip", "grafana", "--output", "json"])
        .expect_code(0)
        .json();
    assert_eq!(synced["hosts"][0]["result"]["written"], 1, "only the new file was written: {synced}");
    let start = Instant::now();
    wait_for("the synced DAG to be listed", Duration::from_secs(60), || {
        let dags = api(&host, &tok, "GET", "/api/v2/dags", None);
        dags["dags"].as_array()?.iter().any(|d| d["dag_id"] == "synced_later").then_some(())
    });
    eprintln!("synced DAG listed after {:.1} s", start.elapsed().as_secs_f64());

    // A jar dropped into spark/jars/ and synced: the next Spark job sees it
    // on its driver's and executors' class path, with nothing restarted.
    let jar = bundle.path().join("spark/jars/mlops-probe.jar");
    let zipped = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z: z.writestr('mlops_probe.txt', 'probe')",
        ])
        .arg(&jar)
        .status()
        .expect("python3 (installed by tests/run.sh) makes the jar");
    assert!(zipped.success());
    std::fs::write(bundle.path().join("spark/jobs/jar_probe.py"), JAR_PROBE_JOB).unwrap();
    std::fs::write(bundle.path().join("airflow/dags/jar_probe.py"), JAR_PROBE_DAG).unwrap();
    let synced = ctl(&["sync", "--stack", &dir, "--project", PROJECT, "--skip", "grafana", "--output", "json"])
        .expect_code(0)
        .json();
    assert_eq!(synced["hosts"][0]["result"]["written"], 3, "the jar, the job and the DAG: {synced}");
    wait_for("the jar probe DAG to be listed", Duration::from_secs(60), || {
        let dags = api(&host, &tok, "GET", "/api/v2/dags", None);
        dags["dags"].as_array()?.iter().any(|d| d["dag_id"] == "jar_probe").then_some(())
    });
    run_dag(&host, &tok, "jar_probe");
    let after = host.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}"), "--no-trunc"]);
    assert_eq!(before, after, "no container was restarted or replaced");

    steps.step("syncs (a DAG, a jar)");
    // down keeps the volumes: after a new deploy the run history is there.
    ctl(&["down", "--project", PROJECT]).expect_code(0);
    ctl(&["deploy", "--stack", &dir, "--project", PROJECT, "--skip", "grafana", "--health-timeout", "900"])
        .expect_code(0);
    let tok = token(&host, &password).expect("the same password after down + deploy");
    let runs = api(&host, &tok, "GET", "/api/v2/dags/~/dagRuns", None);
    let done: Vec<&Value> = runs["dag_runs"].as_array().unwrap().iter().filter(|r| r["state"] == "success").collect();
    assert!(done.len() >= 2, "the DAG run history survived: {runs}");
    steps.step("down, deploy");

    // Credentials change only on purpose: the database's and the broker's
    // passwords are rotated (PostgreSQL's `ALTER ROLE` first, then every
    // service using them recreated, gated on health), and a DAG run
    // succeeds after each.
    // An Airflow variable (stored encrypted with the Fernet key) must read
    // back after every rotation, the Fernet key's included.
    // The flags the platform was deployed with, which every later deploy repeats.
    let as_deployed = ["--stack", dir.as_str(), "--project", PROJECT, "--skip", "grafana", "--health-timeout", "900"];
    let tok = token(&host, &password).unwrap();
    let probe = json!({"key": "mlops_e2e_probe", "value": "kept through rotations"});
    api(&host, &tok, "POST", "/api/v2/variables", Some(probe));
    for name in ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY"] {
        let old =
            ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json()["secrets"][name].clone();
        let started = Instant::now();
        let rotated = ctl(&[&["secrets", "rotate", name], &as_deployed[..], &["--output", "json"]].concat());
        if rotated.code != 0 {
            eprintln!("agent log:\n{}", host.agent_log());
        }
        assert_eq!(rotated.expect_code(0).json()["done"], true);
        eprintln!("{name} rotated in {:.0} s", started.elapsed().as_secs_f64());
        let new =
            ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json()["secrets"][name].clone();
        assert_ne!(new, old, "{name} changed");
        assert!(!new.as_str().unwrap().contains(','), "a finished rotation leaves one value");
        let tok = token(&host, &password).expect("the admin password is unchanged");
        let variable = api(&host, &tok, "GET", "/api/v2/variables/mlops_e2e_probe", None);
        assert_eq!(variable["value"], "kept through rotations", "after rotating {name}");
        run_dag(&host, &tok, "example_etl");
        steps.step(&format!("rotate {name}"));
    }
    // The admin's password: airflow-init (recreated with it) sets it; the
    // old one is refused, the new one logs in and triggers a DAG.
    let old = password;
    let rotated =
        ctl(&[&["secrets", "rotate", "AIRFLOW_ADMIN_PASSWORD"], &as_deployed[..], &["--output", "json"]].concat());
    assert_eq!(rotated.expect_code(0).json()["done"], true);
    let password =
        ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json()["secrets"]["AIRFLOW_ADMIN_PASSWORD"]
            .as_str()
            .unwrap()
            .to_string();
    assert_ne!(password, old);
    assert!(token(&host, &old).is_none(), "the old admin password is refused");
    let tok = token(&host, &password).expect("the rotated admin password works");
    run_dag(&host, &tok, "example_etl");
    steps.step("rotate AIRFLOW_ADMIN_PASSWORD");

    // Retention: the maintenance DAG deletes what is older than .env's
    // ages (30 days of logs, 90 of history) and keeps what is newer. A log
    // file 45 days old and one of now; an example_etl run that started 120
    // days ago, and the newer ones.
    let worker = format!("{PROJECT}-airflow-worker-1");
    let logs = "/opt/airflow/logs/mlops-e2e-retention";
    host.docker(&[
        "exec",
        &worker,
        "sh",
        "-c",
        &format!("mkdir -p {logs} && echo old > {logs}/old.log && touch -d '45 days ago' {logs}/old.log && echo new > {logs}/new.log"),
    ]);
    let etl = api(&host, &tok, "GET", "/api/v2/dags/example_etl/dagRuns?order_by=start_date", None);
    let etl: Vec<String> =
        etl["dag_runs"].as_array().unwrap().iter().map(|r| r["dag_run_id"].as_str().unwrap().to_string()).collect();
    assert!(etl.len() >= 4, "example_etl ran at the start and after each rotation: {etl:?}");
    let old_run = &etl[0];
    let backdate = format!(
        "update dag_run set start_date = start_date - interval '120 days' where dag_id = 'example_etl' and run_id = '{old_run}'"
    );
    host.docker(&["exec", &pg, "psql", "-U", "postgres", "-d", "airflow", "-tAc", &backdate]);
    run_dag(&host, &tok, "mlops_maintenance");
    let files = host.docker(&["exec", &worker, "sh", "-c", &format!("ls {logs}")]);
    assert_eq!(files, "new.log", "the old log went, the new one stayed");
    let (code, _) = host.curl(&[
        &format!("http://127.0.0.1:28080/api/v2/dags/example_etl/dagRuns/{old_run}"),
        "-H",
        &format!("Authorization: Bearer {tok}"),
    ]);
    assert_eq!(code, 404, "the run older than 90 days was removed");
    let kept = api(&host, &tok, "GET", "/api/v2/dags/example_etl/dagRuns", None);
    let kept: Vec<&str> =
        kept["dag_runs"].as_array().unwrap().iter().map(|r| r["dag_run_id"].as_str().unwrap()).collect();
    assert_eq!(kept.len(), etl.len() - 1, "the newer runs stay: {kept:?}");
    // What was removed was exported first, and no archive table is left.
    let exported = host.docker(&[
        "exec",
        &worker,
        "sh",
        "-c",
        "cat /opt/airflow/logs/db-archive/*/_airflow_deleted__dag_run__*.csv",
    ]);
    assert!(exported.contains(old_run.as_str()), "the removed run, exported: {exported}");
    let archives = "select count(*) from pg_tables where tablename like '\\_airflow\\_deleted\\_\\_%'";
    assert_eq!(host.docker(&["exec", &pg, "psql", "-U", "postgres", "-d", "airflow", "-tAc", archives]), "0");
    steps.step("retention");

    // The mlflow profile joins the running platform: its three services
    // start, nothing that ran is recreated. A DAG trains a model on the ML
    // worker and MLflow's REST API gives back the run, its parameters and
    // metrics and the model's files; Prometheus scrapes the server.
    let ids = host.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}"), "--no-trunc"]);
    let command_lines = CommandLines::sample();
    let as_deployed = [&as_deployed[..], &["--profile", "mlflow"]].concat();
    let run = ctl(&[&["deploy"], &as_deployed[..], &["--output", "json"]].concat());
    if run.code != 0 {
        eprintln!("agent log:\n{}", host.agent_log());
    }
    let run = run.expect_code(0).json();
    let now = host.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}"), "--no-trunc"]);
    for id in ids.lines() {
        assert!(now.lines().any(|l| l == id), "container {id} was recreated by adding the profile: {run:#}");
    }
    let services = run["hosts"][0]["result"]["stack"]["services"].as_array().unwrap();
    for name in ["mlflow", "airflow-worker-ml"] {
        let s = services.iter().find(|s| s["service"] == name).unwrap_or_else(|| panic!("{name}: {run:#}"));
        assert!(s["state"] == "running" && s["health"] == "healthy", "{s}");
    }
    let sql = "select rolname || '=' || rolsuper || ' ' || (select datname from pg_database where datname = 'mlflow') from pg_roles where rolname = 'mlflow'";
    assert_eq!(host.docker(&["exec", &pg, "psql", "-U", "postgres", "-tAc", sql]), "mlflow=false mlflow");
    let tok = token(&host, &password).unwrap();
    run_dag(&host, &tok, "mlflow_train");
    let mlflow_run = mlflow_run(&host);
    eprintln!("MLflow run {} read back", mlflow_run["info"]["run_id"]);
    let params: Vec<&str> =
        mlflow_run["data"]["params"].as_array().unwrap().iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert!(params.contains(&"C") && params.contains(&"max_iter"), "{mlflow_run:#}");
    let accuracy = mlflow_run["data"]["metrics"].as_array().unwrap().iter().find(|m| m["key"] == "accuracy").unwrap();
    assert!(accuracy["value"].as_f64().unwrap() > 0.8, "{mlflow_run:#}");
    let model_files = mlflow_model_files(&host, &mlflow_run);
    assert!(model_files.contains(&"MLmodel".to_string()), "{model_files:?}");
    wait_for("Prometheus to scrape MLflow", Duration::from_secs(120), || {
        let up = prom_query(&host, "up{job=\"mlflow\"}");
        (up.len() == 1 && up[0]["value"][1] == "1").then_some(())
    });
    // A scrape can come before the server counted the requests above (a
    // run here saw `up` but no counter yet): the next one has them.
    wait_for("MLflow's request metrics in Prometheus", Duration::from_secs(120), || {
        (!prom_query(&host, "mlflow_http_request_total").is_empty()).then_some(())
    });
    // Neither its setup, its server nor the training put a secret on a
    // command line (MLFLOW_DB_PASSWORD, new here, included).
    let (lines, _) = command_lines.finish();
    assert!(lines.iter().any(|l| l.contains("mlflow.server")), "the sampler saw the tracking server");
    let secrets = ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json();
    for (name, value) in secrets["secrets"].as_object().unwrap() {
        if let Some(line) = lines.iter().find(|l| l.contains(value.as_str().unwrap())) {
            panic!("secret {name} was on a command line: {line}");
        }
    }

    steps.step("mlflow profile");
    // The platform moves to another host with its data: DAG run history,
    // task logs, variables, the paused set and the admin's password
    // arrive; a new DAG run succeeds there; the old host is kept stopped
    // and intact. What follows runs on the new host.
    let old_host = host;
    let host = migrate_there(&env, &old_host, &password, &as_deployed);
    steps.step("migrate");
    let spec = host.spec("root");
    let ctl = |args: &[&str]| {
        let mut all = vec!["--identity", key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        env.ctl(&all)
    };
    // The accounts moved with the database: the viewer logs in there.
    let listed = ctl(&[&["users", "list", "--output", "json"], &users[..]].concat()).expect_code(0).json();
    assert!(listed["result"]["accounts"].as_array().unwrap().iter().any(|a| a["name"] == "vic"), "{listed}");
    assert!(login(&host, "vic", &generated).is_some(), "the viewer's password moved too");

    // A backup of the running platform (nothing stops), then a DAG run it
    // does not hold; restored in place, the platform has the backup's
    // history again: its runs, not the later one, row counts checked
    // against the dump's.
    let backups = tempfile::tempdir().unwrap();
    let before = platform_state(&host, &password);
    let started = Instant::now();
    // The stack's flags (backup has no health timeout: it starts nothing).
    let stack_flags: Vec<&str> = as_deployed
        .iter()
        .enumerate()
        .filter(|&(i, a)| *a != "--health-timeout" && (i == 0 || as_deployed[i - 1] != "--health-timeout"))
        .map(|(_, a)| *a)
        .collect();
    let run = ctl(&[&["backup", "--to", &backups.path().display().to_string()], &stack_flags[..]].concat());
    let run = run.expect_code(0);
    eprintln!("platform backed up in {:.0} s:\n{}", started.elapsed().as_secs_f64(), run.stdout);
    let saved = run.stdout.lines().last().unwrap().to_string();
    for file in ["database.sql.zst", "manifest.json", "secrets.json", &format!("volume-{PROJECT}_airflow-logs.tar.zst")]
    {
        assert!(Path::new(&saved).join(file).is_file(), "{file} in {saved}");
    }
    let tok = token(&host, &password).unwrap();
    let later = run_dag(&host, &tok, "example_etl");
    let started = Instant::now();
    let restored = ctl(&[&["restore", &saved], &as_deployed[..], &["--output", "json"]].concat());
    if restored.code != 0 {
        eprintln!("{}\nagent log:\n{}", restored.stderr, host.agent_log());
    }
    let restored = restored.expect_code(0).json();
    eprintln!("platform restored in {:.0} s: {:#}", started.elapsed().as_secs_f64(), restored["result"]["steps"]);
    let restore_steps = restored["result"]["steps"].as_array().unwrap();
    let verify = restore_steps.iter().find(|s| s["step"] == "verify").unwrap()["detail"].as_str().unwrap();
    assert!(verify.contains("table(s) equal the dump's"), "{verify}");
    let start = restore_steps.iter().find(|s| s["step"] == "start").unwrap()["detail"].as_str().unwrap();
    assert!(start.contains("admin logs in") && start.contains("listed there"), "{start}");
    let after = platform_state(&host, &password);
    for r in &before.0 {
        assert!(after.0.contains(r), "run {r:?} of the backup is back");
    }
    assert!(!after.0.iter().any(|(id, _)| *id == later), "the run after the backup is not: {later}");
    assert_eq!(after.3, before.3, "the encrypted variable reads back");
    let tok = token(&host, &password).unwrap();
    run_dag(&host, &tok, "example_etl");
    steps.step("backup, restore in place");

    // Operator B joins with a bundle from A and deploys from its own
    // machine: nothing is re-keyed or recreated, its second deploy changes
    // nothing either, and both see the same secrets. Once A removes B, the
    // agent refuses B.
    let pass = env.write("bob-passphrase", "a passphrase for bob\n").unwrap();
    let pass = pass.to_str().unwrap();
    let bundle = env.dir.path().join("bob.bundle");
    let bundle = bundle.to_str().unwrap();
    ctl(&["operator", "add", "bob", "--passphrase-file", pass, "--out", bundle]).expect_code(0);
    let bob = TestEnv::new().unwrap();
    bob.trust(&host).unwrap();
    bob.ctl(&["operator", "join", bundle, "--passphrase-file", pass, "--host", NO_HOST]).expect_code(0);
    let bob_key = bob.key.display().to_string();
    let bob_ctl = |args: &[&str]| {
        let mut all = vec!["--identity", bob_key.as_str(), "--host", spec.as_str()];
        all.extend_from_slice(args);
        bob.ctl(&all)
    };
    let agent = host.agent_pid();
    for round in ["first", "second"] {
        let run = bob_ctl(&[&["deploy"], &as_deployed[..], &["--output", "json"]].concat()).expect_code(0).json();
        assert_eq!(run["hosts"][0]["result"]["stack"]["changed"], 0, "bob's {round} deploy: {run:#}");
        assert_eq!(run["hosts"][0]["result"]["installed"], Value::Null, "bob's {round} deploy restarted nothing");
    }
    assert_eq!(host.agent_pid(), agent);
    let theirs = bob_ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json();
    let ours = ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json();
    assert_eq!(theirs["secrets"], ours["secrets"]);
    ctl(&["operator", "remove", "bob"]).expect_code(0);
    bob_ctl(&["status"]).expect_code(1);
    ctl(&["status"]).expect_code(0);
    steps.step("a second operator");

    // Another controller (a fresh state directory) running the README's
    // first command on this host (no SSH: inside the host, as on the
    // machine itself; with this test's project and bundle) is refused with
    // the way out, and the platform is untouched; with --take-over it keeps
    // running with the passwords its hosts hold.
    let ids = host.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}"), "--no-trunc"]);
    let held = ctl(&["secrets", "--project", PROJECT, "--output", "json"]).expect_code(0).json()["secrets"].clone();
    let fresh = tempfile::tempdir().unwrap();
    let readme = |args: &str| {
        format!(
            "HOME={home} MLOPS_STATE_DIR={state} MLOPS_AGENT_BINARY={agent} MLOPS_AIRFLOW_EXPORTER_BINARY={exporter} {ctl} {args}",
            home = env.home.display(),
            state = fresh.path().display(),
            agent = env.agent.display(),
            exporter = env.exporter.as_ref().unwrap().display(),
            ctl = env.mlopsctl.display()
        )
    };
    let deploy =
        format!("deploy --skip grafana --profile mlflow --project {PROJECT} --stack {dir} --health-timeout 900");
    let refused = host.command_inside("sh").args(["-c", &readme(&deploy)]).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("installed by another controller") && stderr.contains("--take-over"), "{stderr}");
    assert_eq!(host.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}"), "--no-trunc"]), ids);
    let taken = host.exec(&readme(&format!("{deploy} --take-over --output json"))).unwrap();
    assert_eq!(taken.status.code(), Some(0), "{}", String::from_utf8_lossy(&taken.stderr));
    let taken: Value = serde_json::from_slice(&taken.stdout).unwrap();
    assert_eq!(taken["hosts"][0]["result"]["stack"]["changed"], 0, "nothing recreated: {taken:#}");
    let theirs = host.exec(&readme(&format!("secrets --project {PROJECT} --output json"))).unwrap();
    let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
    assert_eq!(theirs["secrets"], held, "the new controller uses the passwords the host holds");
    let tok = token(&host, &password).expect("the same admin password");
    run_dag(&host, &tok, "example_etl");
    ctl(&["status"]).expect_code(1);
    steps.step("taken over by another controller");
}

/// What a platform holds that a migration must carry: every DAG run (id
/// and state), each DAG's paused flag, the `load` task's log of the
/// newest successful example_etl run, the probe variable.
type PlatformState = (Vec<(String, String)>, Vec<(String, bool)>, String, Value);

fn platform_state(host: &TestHost, password: &str) -> PlatformState {
    let tok = token(host, password).expect("the admin's password works");
    let runs = api(host, &tok, "GET", "/api/v2/dags/~/dagRuns?limit=1000&order_by=id", None);
    let runs: Vec<(String, String)> = runs["dag_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["dag_run_id"].as_str().unwrap().to_string(), r["state"].as_str().unwrap().to_string()))
        .collect();
    let dags = api(host, &tok, "GET", "/api/v2/dags?limit=1000", None);
    let mut paused: Vec<(String, bool)> = dags["dags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["dag_id"].as_str().unwrap().to_string(), d["is_paused"].as_bool().unwrap()))
        .collect();
    paused.sort();
    let etl = api(host, &tok, "GET", "/api/v2/dags/example_etl/dagRuns?state=success&order_by=-id&limit=1", None);
    let run = etl["dag_runs"][0]["dag_run_id"].as_str().expect("a successful example_etl run").to_string();
    let log =
        api(host, &tok, "GET", &format!("/api/v2/dags/example_etl/dagRuns/{run}/taskInstances/load/logs/1"), None);
    let log = log["content"].to_string();
    let variable = api(host, &tok, "GET", "/api/v2/variables/mlops_e2e_probe", None)["value"].clone();
    (runs, paused, log, variable)
}

/// `mlopsctl migrate` from `a` to a new host (see the caller), which it returns.
fn migrate_there(env: &TestEnv, a: &TestHost, password: &str, as_deployed: &[&str]) -> TestHost {
    let b = env.docker_host("platform-b").unwrap();
    let key = env.key.display().to_string();
    let (sa, sb) = (a.spec("root"), b.spec("root"));
    let migrate = |from: &str, to: &str, extra: &[&str]| {
        let mut args = vec!["--identity", key.as_str(), "--host", sa.as_str(), "--host", sb.as_str(), "migrate"];
        args.extend(["--from", from, "--to", to]);
        args.extend_from_slice(as_deployed);
        args.extend_from_slice(extra);
        let run = env.ctl(&args);
        if run.code != 0 {
            eprintln!(
                "{}
agent log of {}:
{}
agent log of {}:
{}",
                run.stderr,
                a.name,
                a.agent_log(),
                b.name,
                b.agent_log()
            );
        }
        run
    };
    let before = platform_state(a, password);
    let mlflow_before = mlflow_run(a);
    let files_before = mlflow_model_files(a, &mlflow_before);
    assert!(before.2.contains("sum of squares"), "the task's own output is in its log: {}", before.2);
    let started = Instant::now();
    let moved = migrate(&sa, &sb, &["--output", "json"]).expect_code(0).json();
    eprintln!("platform migrated in {:.0} s: {:#}", started.elapsed().as_secs_f64(), moved["result"]["steps"]);
    let result = &moved["result"];
    let steps: Vec<&str> = result["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["inspect", "deploy", "quiesce", "transfer", "verify", "switch"]);
    let verify = result["steps"][4]["detail"].as_str().unwrap();
    assert!(verify.contains("row counts of every table equal") && verify.contains("alembic_version equal"), "{verify}");
    assert!(
        verify.contains("dag runs equal") && verify.contains("logs in") && verify.contains("listed there"),
        "{verify}"
    );
    assert!(result["database"]["bytes"].as_u64().unwrap() > 100_000, "{result:#}");
    let volumes: Vec<&str> =
        result["volumes"].as_array().unwrap().iter().map(|v| v["volume"].as_str().unwrap()).collect();
    let mut volumes = volumes.clone();
    volumes.sort_unstable();
    let moved = ["airflow-logs", "mlflow-artifacts", "redis-data"].map(|v| format!("{PROJECT}_{v}"));
    assert_eq!(volumes, moved, "every named volume but the metrics' (no --with-metrics)");

    // B has everything A had; A is stopped, its data kept.
    let after = platform_state(&b, password);
    assert_eq!(after.0, before.0, "every DAG run, with its state");
    assert_eq!(after.1, before.1, "the paused set");
    assert!(after.2.contains("sum of squares"), "the task log: {}", after.2);
    assert_eq!(after.3, before.3, "the encrypted variable reads back (same Fernet key)");
    // MLflow's run (its database) and its model's files (its volume) too.
    let mlflow_after = mlflow_run(&b);
    assert_eq!(mlflow_after["info"], mlflow_before["info"]);
    assert_eq!(mlflow_model_files(&b, &mlflow_after), files_before);
    let tok = token(&b, password).unwrap();
    run_dag(&b, &tok, "example_etl");
    let running = a.docker(&["ps", "-q", "--filter", &format!("label=mlops.project={PROJECT}")]);
    assert!(running.is_empty(), "A is stopped: {running}");
    assert!(a.docker(&["volume", "ls", "-q"]).contains(&format!("{PROJECT}_postgres-data")), "A keeps its data");

    b
}

/// MLflow's REST API on `host`: `method` `path` with `body`, as JSON.
fn mlflow_api(host: &TestHost, method: &str, path: &str, body: Option<Value>) -> Value {
    let url = format!("{MLFLOW}{path}");
    let mut args = vec!["-X", method, url.as_str()];
    let body = body.map(|b| b.to_string());
    if let Some(b) = &body {
        args.extend(["-H", "Content-Type: application/json", "--data", b.as_str()]);
    }
    let (code, text) = host.curl(&args);
    assert_eq!(code, 200, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The newest run of the example experiment, finished, through MLflow's REST API.
fn mlflow_run(host: &TestHost) -> Value {
    let experiment =
        mlflow_api(host, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=mlops-example", None);
    let id = experiment["experiment"]["experiment_id"].as_str().unwrap().to_string();
    let body = json!({"experiment_ids": [id], "max_results": 1, "order_by": ["attributes.start_time DESC"]});
    let runs = mlflow_api(host, "POST", "/api/2.0/mlflow/runs/search", Some(body));
    let run = runs["runs"][0].clone();
    assert_eq!(run["info"]["status"], "FINISHED", "{runs:#}");
    run
}

/// The files of the model `run` logged, listed by the server that stores them.
fn mlflow_model_files(host: &TestHost, run: &Value) -> Vec<String> {
    let model = run["outputs"]["model_outputs"][0]["model_id"].as_str().unwrap_or_else(|| panic!("a model: {run:#}"));
    let model = mlflow_api(host, "GET", &format!("/api/2.0/mlflow/logged-models/{model}"), None);
    let uri = model["model"]["info"]["artifact_uri"].as_str().unwrap();
    let path = uri.strip_prefix("mlflow-artifacts:/").unwrap_or_else(|| panic!("proxied artifacts: {uri}"));
    let listed = mlflow_api(host, "GET", &format!("/api/2.0/mlflow-artifacts/artifacts?path={path}"), None);
    let mut files: Vec<String> =
        listed["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap().to_string()).collect();
    files.sort();
    files
}
