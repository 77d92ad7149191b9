//! A command in a running service's container (`Exec`): the steps of a
//! secret rotation. Values travel in the environment and on standard
//! input, never on the command line; the output kept is its last 16 KiB.

use std::collections::BTreeMap;
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::EngineError;
use super::converge::plan::existing;

/// Output kept: the end says the most.
const KEEP: usize = 16 * 1024;

/// Runs `command` in `service` of `project` (its running container); the
/// exit code and the last of its output.
pub async fn exec(
    docker: &Docker,
    project: &str,
    service: &str,
    command: Vec<String>,
    env: &BTreeMap<String, String>,
    stdin: Vec<u8>,
    timeout: Duration,
) -> Result<(i64, String), EngineError> {
    if command.is_empty() {
        return Err(EngineError::bad_request("command", "an empty command"));
    }
    let container = existing(docker, project)
        .await?
        .into_iter()
        .find(|c| c.service == service && c.state == "running")
        .ok_or_else(|| EngineError::NotFound(format!("stack `{project}` has no running service `{service}` here")))?;
    let config = ExecConfig {
        cmd: Some(command),
        env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        attach_stdin: Some(!stdin.is_empty()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let created = docker.create_exec(&container.id, config).await?;
    let run = async {
        let StartExecResults::Attached { mut output, mut input } = docker
            .start_exec(&created.id, Some(StartExecOptions { detach: false, tty: false, output_capacity: None }))
            .await?
        else {
            return Err(EngineError::Io {
                what: "the engine detached the command".into(),
                path: String::new(),
                source: std::io::Error::other("detached"),
            });
        };
        if !stdin.is_empty() {
            input.write_all(&stdin).await.map_err(EngineError::io("writing the command's input"))?;
        }
        input.shutdown().await.map_err(EngineError::io("closing the command's input"))?;
        let mut text: Vec<u8> = Vec::new();
        while let Some(chunk) = output.next().await {
            text.extend_from_slice(&chunk?.into_bytes());
            if text.len() > 2 * KEEP {
                text.drain(..text.len() - KEEP);
            }
        }
        Ok::<_, EngineError>(text)
    };
    let text = tokio::time::timeout(timeout, run).await.map_err(|_| EngineError::Timeout {
        service: service.to_string(),
        condition: "done with the command".into(),
        seconds: timeout.as_secs(),
        detail: String::new(),
    })??;
    let code = docker.inspect_exec(&created.id).await?.exit_code.unwrap_or(-1);
    let start = text.len().saturating_sub(KEEP);
    Ok((code, String::from_utf8_lossy(&text[start..]).into_owned()))
}
