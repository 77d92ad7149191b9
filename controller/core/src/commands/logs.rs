//! `mlopsctl logs SERVICE`: a service's output from every host, optionally
//! followed.

use std::sync::Arc;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::stack;

#[derive(Debug, Clone, Default)]
pub struct LogsOptions {
    pub service: String,
    pub follow: bool,
    /// The last N lines (0: all).
    pub tail: u32,
    /// `10m`, `1h30m`: only lines from that long ago on.
    pub since: Option<String>,
}

/// `--since` as Unix seconds (0: from the start).
fn since_unix(since: Option<&str>) -> Result<i64, ControllerError> {
    let Some(s) = since else { return Ok(0) };
    let ms = mlops_compose::parse_duration_ms(s).ok_or_else(|| {
        ControllerError::usage(format!("--since `{s}` is not a duration"), Some("write it as 10m, 1h30m or 45s"))
    })?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    Ok(now - (ms / 1000) as i64)
}

/// Calls `on_chunk(host, stream, data)` (`stream`: stdout or stderr) as
/// output arrives.
pub async fn logs(
    setup: &Setup,
    opts: &StackOptions,
    logs: &LogsOptions,
    report: Arc<dyn Report>,
    on_chunk: impl Fn(&str, &str, &[u8]) + Send + Sync + 'static,
) -> Result<HostResults<()>, ControllerError> {
    let project = opts.project(&setup.state)?;
    let since = since_unix(logs.since.as_deref())?;
    let (service, follow, tail) = (logs.service.clone(), logs.follow, logs.tail);
    let on_chunk = Arc::new(on_chunk);
    Ok(per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let (project, service, on_chunk) = (project.clone(), service.clone(), on_chunk.clone());
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let host = target.name.clone();
            let r = stack::logs(&mut conn, &project, &service, follow, tail, since, |stream, data| {
                on_chunk(&host, stream, data);
            })
            .await;
            transport.close().await;
            r
        }
    })
    .await)
}
