//! `mlops-airflow-exporter`: serves `/metrics` for Prometheus, reading
//! Airflow's REST API on each scrape.
//!
//! Configuration (environment):
//! - `AIRFLOW_URL` (default `http://airflow-apiserver:8080`)
//! - `AIRFLOW_USERNAME`, `AIRFLOW_PASSWORD`: an Airflow user (for the JWT)
//! - `EXPORTER_LISTEN` (default `0.0.0.0:9112`)
//! - `AIRFLOW_TIMEOUT_SECONDS` (default 5), `AIRFLOW_LIMIT` (default 200)
//!
//! Airflow being down, slow or answering nonsense shows as `airflow_up 0`
//! and `airflow_scrape_errors_total`, plus a log line on stderr; the
//! exporter keeps serving.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlops_airflow_exporter::airflow::{Client, Config};
use mlops_airflow_exporter::{http, metrics};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn main() {
    // `--check`: the container's health check (a FROM scratch image has no
    // shell or curl): is our own /health answering?
    if std::env::args().nth(1).as_deref() == Some("--check") {
        let listen = env("EXPORTER_LISTEN", "0.0.0.0:9112");
        let port = listen.rsplit(':').next().unwrap_or("9112");
        let ok =
            http::request(&format!("http://127.0.0.1:{port}"), "GET", "/health", &[], None, Duration::from_secs(3))
                .is_ok_and(|r| r.status == 200);
        std::process::exit(if ok { 0 } else { 1 });
    }
    let config = Config {
        base_url: env("AIRFLOW_URL", "http://airflow-apiserver:8080"),
        username: env("AIRFLOW_USERNAME", "admin"),
        password: env("AIRFLOW_PASSWORD", ""),
        timeout: Duration::from_secs(env("AIRFLOW_TIMEOUT_SECONDS", "5").parse().unwrap_or(5)),
        limit: env("AIRFLOW_LIMIT", "200").parse().unwrap_or(200),
    };
    let listen = env("EXPORTER_LISTEN", "0.0.0.0:9112");
    let listener = match std::net::TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("mlops-airflow-exporter: serving {listen}/metrics for {}", config.base_url);
    let client = Arc::new(Client::new(config));
    let counters = Arc::new(Mutex::new(metrics::Counters::default()));
    // One scrape of Airflow at a time: concurrent Prometheus scrapes wait
    // for it rather than doubling the load on the API.
    let scrape_lock = Arc::new(Mutex::new(()));
    http::serve(&listener, move |path| match path {
        "/metrics" => {
            let _one = scrape_lock.lock().expect("not poisoned");
            let snap = client.scrape();
            for (endpoint, error) in &snap.errors {
                eprintln!("scrape error ({endpoint}): {error}");
            }
            let mut c = counters.lock().expect("not poisoned");
            c.record(&snap);
            (200, "text/plain; version=0.0.4", metrics::render(&snap, &c).into_bytes())
        }
        "/health" | "/" => (200, "text/plain", b"ok\n".to_vec()),
        _ => (404, "text/plain", b"not found\n".to_vec()),
    });
}
