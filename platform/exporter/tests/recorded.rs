//! The exporter against Airflow 3 answers served by a fake Airflow on
//! loopback (named as such: the real one runs in the platform's end-to-end
//! test). `tests/fixtures/recorded/` holds answers recorded from the
//! platform's Airflow 3.3.2; `constructed_*` ones add states a fresh
//! platform does not show (an unhealthy component, failed and running
//! runs); malformed, refusing and silent answers are made up in the tests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlops_airflow_exporter::airflow::{self, Client, Config};
use mlops_airflow_exporter::metrics::{Counters, render};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A fake Airflow: path prefix → (status, body, delay). Records requests.
struct FakeAirflow {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

fn fake_airflow(routes: Vec<(&'static str, u16, String, Duration)>) -> FakeAirflow {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut s = conn.unwrap();
            let routes = routes.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut auth = String::new();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("authorization:") {
                        auth = h.trim().to_string();
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                std::io::Read::read_exact(&mut reader, &mut body).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                log.lock().unwrap().push(format!("{} {path} {auth}", line.split_whitespace().next().unwrap()));
                let (status, text, delay) = routes
                    .iter()
                    .find(|(p, ..)| path.starts_with(p))
                    .map(|(_, s, b, d)| (*s, b.clone(), *d))
                    .unwrap_or((404, "{\"detail\":\"Not Found\"}".into(), Duration::ZERO));
                std::thread::sleep(delay);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    FakeAirflow { port, seen }
}

fn client(port: u16) -> Client {
    Client::new(Config {
        base_url: format!("http://127.0.0.1:{port}"),
        username: "admin".into(),
        password: "pw".into(),
        timeout: Duration::from_millis(500),
        limit: 100,
    })
}

fn routes_from(prefix: &str) -> Vec<(&'static str, u16, String, Duration)> {
    vec![
        ("/api/v2/monitor/health", 200, fixture(&format!("{prefix}health.json")), Duration::ZERO),
        ("/auth/token", 201, "{\"access_token\":\"jwt-1\"}".into(), Duration::ZERO),
        (
            "/api/v2/dags/~/dagRuns/~/taskInstances",
            200,
            fixture(&format!("{prefix}task_instances.json")),
            Duration::ZERO,
        ),
        ("/api/v2/dags/~/dagRuns", 200, fixture(&format!("{prefix}dag_runs.json")), Duration::ZERO),
        ("/api/v2/dags", 200, fixture(&format!("{prefix}dags.json")), Duration::ZERO),
    ]
}

fn routes() -> Vec<(&'static str, u16, String, Duration)> {
    routes_from("constructed_")
}

#[test]
fn answers_recorded_from_airflow_3_become_metrics() {
    let fake = fake_airflow(routes_from("recorded/"));
    let snap = client(fake.port).scrape();
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mut counters = Counters::default();
    counters.record(&snap);
    let text = render(&snap, &counters);
    for line in [
        "airflow_up 1",
        "airflow_component_healthy{component=\"metadatabase\"} 1",
        "airflow_component_healthy{component=\"dag_processor\"} 1",
        "airflow_dag_paused{dag_id=\"spark_pi\",owner=\"airflow\"} 0",
        "airflow_dag_status{dag_id=\"example_etl\",owner=\"data-team\",status=\"success\"} 1",
        "airflow_task_status{dag_id=\"example_etl\",task_id=\"load\",owner=\"data-team\",status=\"success\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
    let duration =
        text.lines().find(|l| l.starts_with("airflow_dag_run_duration{dag_id=\"example_etl\"")).expect("a duration");
    let secs: f64 = duration.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((4.0..6.0).contains(&secs), "{duration}");
}

#[test]
fn constructed_answers_become_metrics() {
    let fake = fake_airflow(routes());
    let snap = client(fake.port).scrape();
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mut counters = Counters::default();
    counters.record(&snap);
    let text = render(&snap, &counters);
    for line in [
        "airflow_up 1",
        "airflow_component_healthy{component=\"scheduler\"} 1",
        "airflow_component_healthy{component=\"dag_processor\"} 0",
        "airflow_dag_paused{dag_id=\"spark_pi\",owner=\"airflow\"} 1",
        "airflow_dag_status{dag_id=\"example_etl\",owner=\"data-team\",status=\"success\"} 1",
        "airflow_dag_status{dag_id=\"example_etl\",owner=\"data-team\",status=\"running\"} 1",
        "airflow_dag_status{dag_id=\"spark_pi\",owner=\"airflow\",status=\"failed\"} 1",
        "airflow_task_status{dag_id=\"example_etl\",task_id=\"transform\",owner=\"data-team\",status=\"success\"} 1",
        "airflow_task_status{dag_id=\"example_etl\",task_id=\"orphan\",owner=\"data-team\",status=\"none\"} 1",
        "airflow_dag_run_duration{dag_id=\"example_etl\",run_id=\"manual__2026-11-27T08:45:00+00:00\",status=\"success\"} 12.500",
        "airflow_dag_run_duration{dag_id=\"spark_pi\",run_id=\"scheduled__x\",status=\"failed\"} 60.000",
        "airflow_scrape_errors_total{endpoint=\"dags\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
    assert!(!text.contains("run_id=\"manual__2026-11-27T08:46:00+00:00\""), "a running DAG run has no duration yet");
    // Health needs no token; the rest carries the JWT.
    let seen = fake.seen.lock().unwrap().clone();
    assert!(seen.iter().any(|r| r == "GET /api/v2/monitor/health "), "{seen:?}");
    assert!(
        seen.iter().filter(|r| r.starts_with("GET /api/v2/dags")).all(|r| r.ends_with("Authorization: Bearer jwt-1")),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|r| r.starts_with("POST /auth/token")).count(), 1, "one token for the scrape");
}

#[test]
fn malformed_refusing_and_silent_answers_are_scrape_errors() {
    let mut r = routes();
    r[0] = ("/api/v2/monitor/health", 200, "<html>gateway error</html>".into(), Duration::ZERO);
    r[2] = ("/api/v2/dags/~/dagRuns/~/taskInstances", 200, "{\"task_instances\":[".into(), Duration::ZERO);
    r[3] = ("/api/v2/dags/~/dagRuns", 500, "{\"detail\":\"boom\"}".into(), Duration::ZERO);
    r[4] = ("/api/v2/dags", 200, fixture("constructed_dags.json"), Duration::from_secs(2));
    let fake = fake_airflow(r);
    let c = client(fake.port);
    let snap = c.scrape();
    let errors: BTreeMap<_, _> = snap.errors.clone();
    assert!(errors["health"].contains("not JSON"), "{errors:?}");
    assert!(errors["task_instances"].contains("not JSON"), "{errors:?}");
    assert!(errors["dag_runs"].contains("answered 500"), "{errors:?}");
    assert!(errors["dags"].contains("within 500 ms"), "{errors:?}");
    let mut counters = Counters::default();
    counters.record(&snap);
    counters.record(&c.scrape());
    let text = render(&snap, &counters);
    assert!(text.contains("airflow_up 0\n"), "{text}");
    assert!(text.contains("airflow_scrape_errors_total{endpoint=\"dag_runs\"} 2\n"), "{text}");
}

#[test]
fn a_refused_token_and_an_expired_one() {
    let mut r = routes();
    r[1] = ("/auth/token", 401, fixture("recorded/token_refused.json"), Duration::ZERO);
    let fake = fake_airflow(r);
    let snap = client(fake.port).scrape();
    assert!(snap.health.is_some(), "health needs no token");
    assert!(snap.errors["dags"].contains("POST /auth/token answered 401"), "{:?}", snap.errors);

    // Nothing listens: every endpoint fails, nothing panics.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let snap = client(port).scrape();
    assert_eq!(snap.errors.len(), 4, "{:?}", snap.errors);
}

#[test]
fn parsers_take_what_is_there() {
    assert!(airflow::parse_health(b"{}").is_err());
    assert_eq!(airflow::parse_dags(b"{\"dags\":[{\"no_id\":1},{\"dag_id\":\"a\"}]}").unwrap().len(), 1);
    assert!(airflow::parse_dag_runs(b"{\"wrong\":[]}").is_err());
    assert_eq!(airflow::rfc3339_seconds("1970-01-01T00:01:00+00:00"), Some(60.0));
    assert_eq!(airflow::rfc3339_seconds("1970-01-01T01:00:00+01:00"), Some(0.0));
    assert_eq!(airflow::rfc3339_seconds("1970-01-01T00:00:01.5Z"), Some(1.5));
}
