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
    let created = create(docker, project, service, command, env, !stdin.is_empty()).await?;
    let run = async {
        let StartExecResults::Attached { mut output, mut input } = docker
            .start_exec(&created, Some(StartExecOptions { detach: false, tty: false, output_capacity: None }))
            .await?
        else {
            return Err(detached());
        };
        if !stdin.is_empty() {
            input.write_all(&stdin).await.map_err(EngineError::io("writing the command's input"))?;
        }
        input.shutdown().await.map_err(EngineError::io("closing the command's input"))?;
        let mut text: Vec<u8> = Vec::new();
        while let Some(chunk) = output.next().await {
            keep_tail(&mut text, &chunk?.into_bytes());
        }
        Ok::<_, EngineError>(text)
    };
    let text = tokio::time::timeout(timeout, run).await.map_err(|_| EngineError::Timeout {
        service: service.to_string(),
        condition: "done with the command".into(),
        seconds: timeout.as_secs(),
        detail: String::new(),
    })??;
    let code = docker.inspect_exec(&created).await?.exit_code.unwrap_or(-1);
    let start = text.len().saturating_sub(KEEP);
    Ok((code, String::from_utf8_lossy(&text[start..]).into_owned()))
}

/// Creates `command` as an exec in `service`'s running container (values in
/// `env`, never on the command line); its exec ID.
pub async fn create(
    docker: &Docker,
    project: &str,
    service: &str,
    command: Vec<String>,
    env: &BTreeMap<String, String>,
    stdin: bool,
) -> Result<String, EngineError> {
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
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    Ok(docker.create_exec(&container.id, config).await?.id)
}

/// The engine answered a start with no attached streams.
pub fn detached() -> EngineError {
    EngineError::Io {
        what: "the engine detached the command".into(),
        path: String::new(),
        source: std::io::Error::other("detached"),
    }
}

/// Appends `more` to `text`, keeping about its last [`KEEP`] bytes.
pub fn keep_tail(text: &mut Vec<u8>, more: &[u8]) {
    text.extend_from_slice(more);
    if text.len() > 2 * KEEP {
        text.drain(..text.len() - KEEP);
    }
}
