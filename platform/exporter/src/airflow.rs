//! One scrape of Airflow 3's REST API.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http;

#[derive(Debug, Clone)]
pub struct Config {
    /// `http://airflow-apiserver:8080`
    pub base_url: String,
    pub username: String,
    pub password: String,
    /// Per request.
    pub timeout: Duration,
    /// How many recent DAG runs and task instances to read.
    pub limit: u32,
}

/// What a scrape found. Each part is `None` when its endpoint failed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// component → healthy
    pub health: Option<BTreeMap<String, bool>>,
    pub dags: Option<Vec<Dag>>,
    pub dag_runs: Option<Vec<DagRun>>,
    pub task_instances: Option<Vec<TaskInstance>>,
    /// endpoint → error message, for the ones that failed this time.
    pub errors: BTreeMap<&'static str, String>,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dag {
    pub dag_id: String,
    pub owner: String,
    pub paused: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DagRun {
    pub dag_id: String,
    pub run_id: String,
    pub state: String,
    /// Seconds from start to end, for finished runs.
    pub duration_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskInstance {
    pub dag_id: String,
    pub task_id: String,
    pub state: String,
}

/// Parses `/api/v2/monitor/health`. Its HTTP code is 200 whatever the
/// state, so the JSON is what counts.
pub fn parse_health(body: &[u8]) -> Result<BTreeMap<String, bool>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("health is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("health is not a JSON object")?;
    let mut out = BTreeMap::new();
    for (component, detail) in obj {
        if let Some(status) = detail.get("status") {
            out.insert(component.clone(), status.as_str() == Some("healthy"));
        }
    }
    if out.is_empty() {
        return Err("health lists no component".into());
    }
    Ok(out)
}

pub fn parse_dags(body: &[u8]) -> Result<Vec<Dag>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("dags is not JSON: {e}"))?;
    let list = v.get("dags").and_then(Value::as_array).ok_or("no `dags` list")?;
    Ok(list
        .iter()
        .filter_map(|d| {
            Some(Dag {
                dag_id: d.get("dag_id")?.as_str()?.to_string(),
                owner: d
                    .get("owners")
                    .and_then(Value::as_array)
                    .and_then(|o| o.first())
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                paused: d.get("is_paused").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect())
}

pub fn parse_dag_runs(body: &[u8]) -> Result<Vec<DagRun>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("dagRuns is not JSON: {e}"))?;
    let list = v.get("dag_runs").and_then(Value::as_array).ok_or("no `dag_runs` list")?;
    Ok(list
        .iter()
        .filter_map(|r| {
            let start = r.get("start_date").and_then(Value::as_str).and_then(rfc3339_seconds);
            let end = r.get("end_date").and_then(Value::as_str).and_then(rfc3339_seconds);
            Some(DagRun {
                dag_id: r.get("dag_id")?.as_str()?.to_string(),
                run_id: r.get("dag_run_id")?.as_str()?.to_string(),
                state: r.get("state").and_then(Value::as_str).unwrap_or("none").to_string(),
                duration_seconds: match (start, end) {
                    (Some(s), Some(e)) if e >= s => Some(e - s),
                    _ => None,
                },
            })
        })
        .collect())
}

pub fn parse_task_instances(body: &[u8]) -> Result<Vec<TaskInstance>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("taskInstances is not JSON: {e}"))?;
    let list = v.get("task_instances").and_then(Value::as_array).ok_or("no `task_instances` list")?;
    Ok(list
        .iter()
        .filter_map(|t| {
            Some(TaskInstance {
                dag_id: t.get("dag_id")?.as_str()?.to_string(),
                task_id: t.get("task_id")?.as_str()?.to_string(),
                state: t.get("state").and_then(Value::as_str).unwrap_or("none").to_string(),
            })
        })
        .collect())
}

/// `2024-05-01T10:00:00.123456Z` or `...+00:00` → seconds since the epoch.
pub fn rfc3339_seconds(s: &str) -> Option<f64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let (time, offset) = match rest.find(['Z', '+', '-']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "Z"),
    };
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let ss: f64 = t.next()?.parse().ok()?;
    let off_s = if offset == "Z" || offset.is_empty() {
        0
    } else {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (oh, om) = offset[1..].split_once(':').unwrap_or((&offset[1..], "0"));
        sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
    };
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 - off_s) as f64 + ss)
}

/// Talks to one Airflow; keeps its JWT between scrapes.
pub struct Client {
    config: Config,
    token: Mutex<Option<String>>,
}

impl Client {
    pub fn new(config: Config) -> Self {
        Client { config, token: Mutex::new(None) }
    }

    fn token(&self, fresh: bool) -> Result<String, String> {
        let mut guard = self.token.lock().expect("not poisoned");
        if !fresh && let Some(t) = guard.as_ref() {
            return Ok(t.clone());
        }
        let body = serde_json::json!({"username": self.config.username, "password": self.config.password}).to_string();
        let r = http::request(
            &self.config.base_url,
            "POST",
            "/auth/token",
            &[],
            Some(body.as_bytes()),
            self.config.timeout,
        )?;
        if r.status != 200 && r.status != 201 {
            return Err(format!(
                "POST /auth/token answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body).chars().take(200).collect::<String>()
            ));
        }
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("token answer is not JSON: {e}"))?;
        let token =
            v.get("access_token").and_then(Value::as_str).ok_or("token answer has no access_token")?.to_string();
        *guard = Some(token.clone());
        Ok(token)
    }

    /// GET with the JWT; on 401 gets a new token once and retries.
    fn get_authed(&self, path: &str) -> Result<Vec<u8>, String> {
        for fresh in [false, true] {
            let token = self.token(fresh)?;
            let auth = format!("Bearer {token}");
            let r = http::request(
                &self.config.base_url,
                "GET",
                path,
                &[("Authorization", &auth)],
                None,
                self.config.timeout,
            )?;
            match r.status {
                200 => return Ok(r.body),
                401 | 403 if !fresh => continue,
                s => {
                    return Err(format!(
                        "GET {path} answered {s}: {}",
                        String::from_utf8_lossy(&r.body).chars().take(200).collect::<String>()
                    ));
                }
            }
        }
        Err(format!("GET {path}: not authorized"))
    }

    pub fn scrape(&self) -> Snapshot {
        let start = Instant::now();
        let mut snap = Snapshot::default();
        let health =
            http::request(&self.config.base_url, "GET", "/api/v2/monitor/health", &[], None, self.config.timeout)
                .and_then(|r| if r.status == 200 { Ok(r.body) } else { Err(format!("health answered {}", r.status)) })
                .and_then(|b| parse_health(&b));
        match health {
            Ok(h) => snap.health = Some(h),
            Err(e) => {
                snap.errors.insert("health", e);
            }
        }
        let limit = self.config.limit;
        match self.get_authed("/api/v2/dags?limit=100").and_then(|b| parse_dags(&b)) {
            Ok(d) => snap.dags = Some(d),
            Err(e) => {
                snap.errors.insert("dags", e);
            }
        }
        match self
            .get_authed(&format!("/api/v2/dags/~/dagRuns?limit={limit}&order_by=-start_date"))
            .and_then(|b| parse_dag_runs(&b))
        {
            Ok(r) => snap.dag_runs = Some(r),
            Err(e) => {
                snap.errors.insert("dag_runs", e);
            }
        }
        match self
            .get_authed(&format!("/api/v2/dags/~/dagRuns/~/taskInstances?limit={limit}&order_by=-start_date"))
            .and_then(|b| parse_task_instances(&b))
        {
            Ok(t) => snap.task_instances = Some(t),
            Err(e) => {
                snap.errors.insert("task_instances", e);
            }
        }
        snap.duration = start.elapsed();
        snap
    }
}
