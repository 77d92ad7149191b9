//! Prometheus metrics for Airflow 3, from its REST API.
//!
//! - [`airflow`]: what one scrape reads (`/api/v2/monitor/health` without
//!   auth; `/api/v2/dags`, DAG runs and task instances with a JWT from
//!   `POST /auth/token`) and how each answer is parsed. A bad, slow or
//!   missing answer becomes a scrape error metric and a log line, never a
//!   crash.
//! - [`metrics`]: the exposition text, with names of the established Airflow
//!   exporters (`airflow_dag_status`, `airflow_task_status`,
//!   `airflow_dag_run_duration`, ...).
//! - [`http`]: a small HTTP/1.0 client and server on `std::net` (no TLS: the
//!   exporter talks to Airflow over the stack's private network).
//! - [`dns`]: an A-record resolver over UDP, because a static binary in a
//!   `FROM scratch` image has no NSS modules for glibc's resolver.

pub mod airflow;
pub mod dns;
pub mod http;
pub mod metrics;
