//! Phase 6, and the waits of phase 4: a container reaching a condition
//! (started, healthy, completed successfully), or failing fast, named, when
//! it no longer can (unhealthy after its start period, exited).

use std::collections::BTreeSet;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, LogsOptionsBuilder};
use futures::StreamExt;
use mlops_proto::stack::{Condition, Service, Stack};

use super::plan::{completes, one_shots};
use super::start::Started;
use crate::engine::{Action, EngineError, Events, now_ms};

/// A service's health-check start period: failures within it are not final.
pub fn start_period(svc: &Service) -> Duration {
    Duration::from_millis(svc.healthcheck.as_ref().and_then(|h| h.start_period_ms).unwrap_or(0))
}

/// `2024-01-02T03:04:05.123456789Z` (Docker's timestamps) to Unix
/// milliseconds; `None` for anything else, and for Docker's "never"
/// (`0001-01-01T00:00:00Z`) and other instants before 1970.
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The output of a container's last health check, as `exit N: text`.
pub fn last_health_output(state: &bollard::models::ContainerState) -> String {
    state
        .health
        .as_ref()
        .and_then(|h| h.log.as_ref())
        .and_then(|l| l.last())
        .map(|r| format!("exit {}: {}", r.exit_code.unwrap_or(-1), r.output.clone().unwrap_or_default().trim()))
        .unwrap_or_else(|| "(no health check has run)".into())
}

/// A container's last `n` log lines, joined with ` | `.
pub async fn tail_logs(docker: &Docker, id: &str, n: usize) -> String {
    let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&n.to_string()).build();
    let mut stream = docker.logs(id, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() { "(none)".into() } else { lines.join(" | ") }
}

/// When the container's newest health check began (Unix ms), if one has run.
fn last_check_began_ms(state: &bollard::models::ContainerState) -> Option<u64> {
    state.health.as_ref()?.log.as_ref()?.last()?.start.as_deref().and_then(rfc3339_ms)
}

/// Waits until `service`'s container meets `condition`; fails fast when it
/// cannot any more (unhealthy after `grace`, exited), naming the service
/// and why. An "unhealthy" that only checks made before this wait began
/// gave is not final: a container left running may have been fixed since
/// (a file it checks restored), and its next check says so.
pub async fn wait_for(
    docker: &Docker,
    service: &str,
    id: &str,
    condition: Condition,
    grace: Duration,
    timeout: Duration,
) -> Result<(), EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let began = now_ms();
    loop {
        let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await?;
        let state = inspect.state.unwrap_or_default();
        let status = state.status.map(|s| s.to_string()).unwrap_or_default();
        let exit = state.exit_code.unwrap_or(0);
        let health = state.health.clone().and_then(|h| h.status).map(|h| h.to_string()).unwrap_or_default();
        let exited = status == "exited" || status == "dead";
        match condition {
            Condition::ServiceStarted if status == "running" || exited => return Ok(()),
            Condition::ServiceCompletedSuccessfully if exited && exit == 0 => return Ok(()),
            Condition::ServiceHealthy if health == "healthy" => return Ok(()),
            // Within the health check's start period, a failure is not yet
            // final (some engines report "unhealthy" during it anyway).
            Condition::ServiceHealthy
                if health == "unhealthy"
                    && state
                        .started_at
                        .as_deref()
                        .and_then(rfc3339_ms)
                        .is_none_or(|t| now_ms() > t + grace.as_millis() as u64)
                    && last_check_began_ms(&state).is_none_or(|t| t >= began) =>
            {
                return Err(EngineError::Unhealthy {
                    service: service.to_string(),
                    output: last_health_output(&state),
                });
            }
            _ => {}
        }
        if exited && condition != Condition::ServiceStarted {
            let logs = tail_logs(docker, id, 5).await;
            return Err(EngineError::Exited { service: service.to_string(), code: exit, logs });
        }
        if tokio::time::Instant::now() > deadline {
            let condition = match condition {
                Condition::ServiceHealthy => {
                    format!("healthy (health: {})", if health.is_empty() { "no health check" } else { &health })
                }
                Condition::ServiceCompletedSuccessfully => "completed".to_string(),
                Condition::ServiceStarted => "started".to_string(),
            };
            let detail = if health == "starting" {
                format!("; last health check: {}", last_health_output(&state))
            } else {
                String::new()
            };
            return Err(EngineError::Timeout {
                service: service.to_string(),
                condition,
                seconds: timeout.as_secs(),
                detail,
            });
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Every service with a health check must be healthy; a one-shot must have
/// succeeded; everything else must still run (or have completed, for a
/// service nothing restarts).
pub async fn gate(
    docker: &Docker,
    stack: &Stack,
    order: &[String],
    ids: &Started,
    timeout: Duration,
    ev: &Events,
) -> Result<(), EngineError> {
    let one_shot: BTreeSet<&str> = one_shots(stack);
    for name in order {
        let (id, changed) = &ids[name];
        let svc = &stack.services[name];
        let has_check = svc.healthcheck.as_ref().is_some_and(|h| h.test.first().is_some_and(|t| t != "NONE"));
        if has_check {
            wait_for(docker, name, id, Condition::ServiceHealthy, start_period(svc), timeout).await?;
            if *changed {
                ev.say(name, Action::Healthy, "").await;
            }
        } else if one_shot.contains(name.as_str()) {
            wait_for(docker, name, id, Condition::ServiceCompletedSuccessfully, Duration::ZERO, timeout).await?;
        } else {
            let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await?;
            let state = inspect.state.unwrap_or_default();
            let completed = state.status.map(|s| s.to_string()).as_deref() == Some("exited")
                && state.exit_code == Some(0)
                && completes(svc);
            if state.running != Some(true) && state.restarting != Some(true) && !completed {
                let logs = tail_logs(docker, id, 5).await;
                return Err(EngineError::Exited { service: name.clone(), code: state.exit_code.unwrap_or(0), logs });
            }
        }
    }
    Ok(())
}

/// Changed services without a health check (and not one-shots) must keep
/// running `min` after they started: the same container, not exited or
/// restarted in between. What crashes a few seconds after it starts (a
/// bad configuration read late, a connection refused) fails the deploy
/// here rather than after it.
pub async fn hold(
    docker: &Docker,
    stack: &Stack,
    order: &[String],
    ids: &Started,
    min: Duration,
    ev: &Events,
) -> Result<(), EngineError> {
    if min.is_zero() {
        return Ok(());
    }
    let one_shot: BTreeSet<&str> = one_shots(stack);
    let mut watched = Vec::new();
    for name in order {
        let (id, changed) = &ids[name];
        let svc = &stack.services[name];
        let has_check = svc.healthcheck.as_ref().is_some_and(|h| h.test.first().is_some_and(|t| t != "NONE"));
        if !*changed || has_check || one_shot.contains(name.as_str()) {
            continue;
        }
        let state = docker.inspect_container(id, None::<InspectContainerOptions>).await?;
        let (st, restarts) = (state.state.unwrap_or_default(), state.restart_count.unwrap_or(0));
        if st.running != Some(true) {
            // Completed, as a service nothing restarts may: nothing to
            // watch. Anything else stopped since the gate looked.
            let completed = st.status.map(|s| s.to_string()).as_deref() == Some("exited")
                && st.exit_code == Some(0)
                && completes(svc);
            if completed {
                continue;
            }
            let logs = tail_logs(docker, id, 5).await;
            return Err(EngineError::Exited { service: name.clone(), code: st.exit_code.unwrap_or(0), logs });
        }
        let started = st.started_at.as_deref().and_then(rfc3339_ms).unwrap_or_else(now_ms);
        watched.push((name.clone(), id.clone(), started, restarts));
    }
    let Some(until) = watched.iter().map(|(_, _, started, _)| started + min.as_millis() as u64).max() else {
        return Ok(());
    };
    let names: Vec<&str> = watched.iter().map(|(n, ..)| n.as_str()).collect();
    ev.say("", Action::Watching, format!("{} must keep running {} s", names.join(", "), min.as_secs())).await;
    loop {
        for (name, id, started, restarts) in &watched {
            let inspect = docker.inspect_container(id, None::<InspectContainerOptions>).await?;
            let st = inspect.state.clone().unwrap_or_default();
            let now_started = st.started_at.as_deref().and_then(rfc3339_ms).unwrap_or(*started);
            if st.running != Some(true) || inspect.restart_count.unwrap_or(0) != *restarts || now_started != *started {
                let logs = tail_logs(docker, id, 5).await;
                return Err(EngineError::Exited { service: name.clone(), code: st.exit_code.unwrap_or(0), logs });
            }
        }
        if now_ms() >= until {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250).min(Duration::from_millis(until.saturating_sub(now_ms())))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps() {
        assert_eq!(rfc3339_ms("2024-01-01T00:00:00.5Z"), Some(1_704_067_200_500));
        assert_eq!(rfc3339_ms("2026-11-27T08:30:15.123456789Z"), Some(1_795_768_215_123));
        assert_eq!(rfc3339_ms("1970-01-02T00:00:00Z"), Some(86_400_000), "1970 is a year like any other");
        assert_eq!(rfc3339_ms("2024-01-01T01:00:00+01:00"), Some(1_704_067_200_000));
        assert_eq!(rfc3339_ms("0001-01-01T00:00:00Z"), None, "Docker's never-started");
        for odd in ["", "T", "2024-01-01", "2024-01-01T00:00:00.\u{e9}Z", "2024-13-01T00:00:00Z", "ß-ü-äTx"] {
            assert_eq!(rfc3339_ms(odd), None, "{odd:?}");
        }
    }
}
