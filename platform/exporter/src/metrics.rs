//! The Prometheus text exposition of a [`Snapshot`].

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::airflow::Snapshot;

/// Counters that live across scrapes.
#[derive(Debug, Default)]
pub struct Counters {
    pub scrapes: u64,
    pub errors: BTreeMap<&'static str, u64>,
}

impl Counters {
    pub fn record(&mut self, snap: &Snapshot) {
        self.scrapes += 1;
        for endpoint in snap.errors.keys() {
            *self.errors.entry(endpoint).or_default() += 1;
        }
    }
}

/// A label value, escaped as the exposition format wants.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn render(snap: &Snapshot, counters: &Counters) -> String {
    let mut out = String::new();
    family(&mut out, "airflow_up", "gauge", "Whether Airflow's API answered the health endpoint.");
    let _ = writeln!(out, "airflow_up {}", u8::from(snap.health.is_some()));

    family(
        &mut out,
        "airflow_component_healthy",
        "gauge",
        "Health of each Airflow component, from /api/v2/monitor/health.",
    );
    for (c, ok) in snap.health.iter().flatten() {
        let _ = writeln!(out, "airflow_component_healthy{{component=\"{}\"}} {}", esc(c), u8::from(*ok));
    }

    let owners: BTreeMap<&str, &str> =
        snap.dags.iter().flatten().map(|d| (d.dag_id.as_str(), d.owner.as_str())).collect();
    let owner = |dag: &str| esc(owners.get(dag).copied().unwrap_or(""));

    family(&mut out, "airflow_dag_paused", "gauge", "Whether a DAG is paused.");
    for d in snap.dags.iter().flatten() {
        let _ = writeln!(
            out,
            "airflow_dag_paused{{dag_id=\"{}\",owner=\"{}\"}} {}",
            esc(&d.dag_id),
            esc(&d.owner),
            u8::from(d.paused)
        );
    }

    family(&mut out, "airflow_dag_status", "gauge", "Recent DAG runs by DAG and state.");
    let mut dag_status: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for r in snap.dag_runs.iter().flatten() {
        *dag_status.entry((&r.dag_id, &r.state)).or_default() += 1;
    }
    for ((dag, status), n) in &dag_status {
        let _ = writeln!(
            out,
            "airflow_dag_status{{dag_id=\"{}\",owner=\"{}\",status=\"{}\"}} {n}",
            esc(dag),
            owner(dag),
            esc(status)
        );
    }

    family(&mut out, "airflow_task_status", "gauge", "Recent task instances by DAG, task and state.");
    let mut task_status: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    for t in snap.task_instances.iter().flatten() {
        *task_status.entry((&t.dag_id, &t.task_id, &t.state)).or_default() += 1;
    }
    for ((dag, task, status), n) in &task_status {
        let _ = writeln!(
            out,
            "airflow_task_status{{dag_id=\"{}\",task_id=\"{}\",owner=\"{}\",status=\"{}\"}} {n}",
            esc(dag),
            esc(task),
            owner(dag),
            esc(status)
        );
    }

    family(&mut out, "airflow_dag_run_duration", "gauge", "Duration of recent finished DAG runs, in seconds.");
    for r in snap.dag_runs.iter().flatten() {
        if let Some(d) = r.duration_seconds {
            let _ = writeln!(
                out,
                "airflow_dag_run_duration{{dag_id=\"{}\",run_id=\"{}\",status=\"{}\"}} {d:.3}",
                esc(&r.dag_id),
                esc(&r.run_id),
                esc(&r.state)
            );
        }
    }

    family(
        &mut out,
        "airflow_scrape_errors_total",
        "counter",
        "Failed reads of an Airflow endpoint since the exporter started.",
    );
    for endpoint in ["health", "dags", "dag_runs", "task_instances"] {
        let _ = writeln!(
            out,
            "airflow_scrape_errors_total{{endpoint=\"{endpoint}\"}} {}",
            counters.errors.get(endpoint).copied().unwrap_or(0)
        );
    }
    family(&mut out, "airflow_scrape_duration_seconds", "gauge", "How long the last scrape of Airflow took.");
    let _ = writeln!(out, "airflow_scrape_duration_seconds {:.3}", snap.duration.as_secs_f64());
    family(&mut out, "airflow_exporter_scrapes_total", "counter", "Scrapes since the exporter started.");
    let _ = writeln!(out, "airflow_exporter_scrapes_total {}", counters.scrapes);
    out
}
