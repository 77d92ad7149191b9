//! Health transitions from Docker's event stream (no polling), and logs.

use std::collections::HashMap;

use bollard::Docker;
use bollard::query_parameters::{EventsOptionsBuilder, InspectContainerOptions, LogsOptionsBuilder};
use futures::StreamExt;
use mlops_proto::stack::labels;
use tokio::sync::{mpsc, watch};

use super::converge::health::last_health_output;
use super::converge::status;
use super::{EngineError, now_ms};

/// A service's state or health as it changed (or, first, as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChange {
    /// When the agent saw it.
    pub unix_ms: u64,
    pub service: String,
    pub state: String,
    pub health: String,
    /// For an unhealthy service: its last health check's output.
    pub health_output: String,
    pub container_id: String,
    /// When Docker reported it (0 for the initial state).
    pub docker_time_ns: u64,
}

/// Which of a container's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// A piece of a container's output.
#[derive(Debug, Clone)]
pub struct LogChunk {
    pub stream: Output,
    pub data: bytes::Bytes,
}

/// Streams the project's current service states, then every change Docker
/// reports, until `tx` closes or `stop` fires.
pub async fn health(
    docker: Docker,
    project: String,
    tx: mpsc::Sender<HealthChange>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    // Subscribe first, then take the snapshot: nothing falls in between.
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        ("label".to_string(), vec![format!("{}={project}", labels::PROJECT)]),
    ]);
    let mut events = docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
    // What was last sent per container: Docker emits several events for
    // one change (kill, die, stop, restart...); only transitions go out.
    let mut last: HashMap<String, (String, String)> = HashMap::new();
    for s in status(&docker, &project).await? {
        last.insert(s.container_id.clone(), (s.state.clone(), s.health.clone()));
        let ev = HealthChange {
            unix_ms: now_ms(),
            service: s.service,
            state: s.state,
            health: s.health,
            health_output: String::new(),
            container_id: s.container_id,
            docker_time_ns: 0,
        };
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
    loop {
        let item = tokio::select! {
            item = events.next() => item,
            _ = stop.changed() => return Ok(()),
            () = tx.closed() => return Ok(()),
        };
        let Some(item) = item else { return Ok(()) };
        let msg = item?;
        let action = msg.action.clone().unwrap_or_default();
        // exec_* and attach events say nothing about state.
        let relevant = action.starts_with("health_status")
            || matches!(
                action.as_str(),
                "start" | "die" | "stop" | "kill" | "pause" | "unpause" | "restart" | "oom" | "destroy" | "create"
            );
        if !relevant {
            continue;
        }
        let actor = msg.actor.unwrap_or_default();
        let attrs = actor.attributes.unwrap_or_default();
        let id = actor.id.unwrap_or_default();
        let service = attrs.get(labels::SERVICE).cloned().unwrap_or_default();
        let (state, health, output) = if action == "destroy" {
            ("removed".to_string(), String::new(), String::new())
        } else {
            match docker.inspect_container(&id, None::<InspectContainerOptions>).await {
                Ok(i) => {
                    let st = i.state.unwrap_or_default();
                    let health = st
                        .health
                        .as_ref()
                        .and_then(|h| h.status)
                        .map(|h| h.to_string())
                        .filter(|h| h != "none")
                        .unwrap_or_default();
                    let output = if health == "unhealthy" { last_health_output(&st) } else { String::new() };
                    (st.status.map(|s| s.to_string()).unwrap_or_default(), health, output)
                }
                Err(_) => ("removed".to_string(), String::new(), String::new()),
            }
        };
        // health_status events carry the new status in the action itself,
        // which is what changed even if inspect raced ahead. A container
        // that is not running has no health to speak of.
        let health = action.strip_prefix("health_status: ").map(str::to_string).unwrap_or(health);
        let (health, output) = if state == "running" { (health, output) } else { (String::new(), String::new()) };
        if last.get(&id) == Some(&(state.clone(), health.clone())) {
            continue;
        }
        last.insert(id.clone(), (state.clone(), health.clone()));
        let ev = HealthChange {
            unix_ms: now_ms(),
            service,
            state,
            health,
            health_output: output,
            container_id: id,
            docker_time_ns: msg.time_nano.unwrap_or(0).max(0) as u64,
        };
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
}

/// Streams a service's logs.
pub async fn logs(
    docker: Docker,
    container: String,
    follow: bool,
    since: i64,
    tail: u32,
    tx: mpsc::Sender<LogChunk>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    let tail = if tail == 0 { "all".to_string() } else { tail.to_string() };
    let options = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .follow(follow)
        .since(since.max(0) as i32)
        .tail(&tail)
        .build();
    let mut stream = docker.logs(&container, Some(options));
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = stop.changed() => return Ok(()),
            () = tx.closed() => return Ok(()),
        };
        let Some(item) = item else { return Ok(()) };
        let out = item?;
        let (stream, data) = match out {
            bollard::container::LogOutput::StdErr { message } => (Output::Stderr, message),
            bollard::container::LogOutput::StdOut { message } | bollard::container::LogOutput::Console { message } => {
                (Output::Stdout, message)
            }
            bollard::container::LogOutput::StdIn { .. } => continue,
        };
        if tx.send(LogChunk { stream, data }).await.is_err() {
            return Ok(());
        }
    }
}
