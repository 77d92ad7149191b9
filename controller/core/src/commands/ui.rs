//! `mlopsctl ui NAME`: a stack's web UI. On this machine it is its URL; on
//! a remote host, a local port forwarded through SSH to the UI's port on
//! the host's loopback (where the platform publishes its UIs).

use std::future::Future;
use std::sync::Arc;

use mlops_inventory::Connection;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::progress::Report;

/// Where the UI can be opened, and what it forwards to.
#[derive(Debug, Clone)]
pub struct UiOpened {
    pub url: String,
    /// For a tunnel: what it forwards to (a note for the user); `None` on this machine.
    pub forwarding: Option<String>,
}

/// Resolves UI `name` of the stack on the one target; for a remote host,
/// listens on `port` (default: the UI's own port, else any free one),
/// calls `on_open` with the URL and forwards connections until `shutdown`
/// completes.
pub async fn ui(
    setup: &Setup,
    opts: &StackOptions,
    name: &str,
    port: Option<u16>,
    report: &dyn Report,
    on_open: impl FnOnce(&UiOpened),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    let loaded = opts.load_model(&setup.state, report)?;
    let ui = loaded.stack.options.ui.get(name).cloned().ok_or_else(|| {
        ControllerError::usage(
            format!(
                "stack `{}` has no UI `{name}` (it has {})",
                loaded.stack.project,
                loaded.stack.options.ui.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            Some("the UI of a service in a Compose profile is there with that profile only: add --profile NAME as deployed (e.g. `--profile mlflow`)"),
        )
    })?;
    let [target] = setup.targets.as_slice() else {
        return Err(ControllerError::usage("`ui` opens one host's UI", Some("name one host with --host or --limit")));
    };
    if target.connection == Connection::Local {
        on_open(&UiOpened { url: format!("http://127.0.0.1:{}{}", ui.port, ui.path), forwarding: None });
        return Ok(());
    }
    let transport = Arc::new(bootstrap::open_transport(target, &setup.ctx).await?);
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port.unwrap_or(ui.port))).await {
        Ok(l) => l,
        Err(_) if port.is_none() => tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| ControllerError::Local(format!("cannot listen on a local port: {e}")))?,
        Err(e) => {
            return Err(ControllerError::Local(format!("cannot listen on local port {}: {e}", port.unwrap_or(0))));
        }
    };
    let local = listener.local_addr().map_err(|e| ControllerError::Local(e.to_string()))?;
    on_open(&UiOpened {
        url: format!("http://{local}{}", ui.path),
        forwarding: Some(format!(
            "forwarding {local} to {}'s 127.0.0.1:{} ({}); Ctrl-C to stop",
            target.name, ui.port, ui.service
        )),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut conn, _) = accepted.map_err(|e| ControllerError::Local(format!("accepting on {local}: {e}")))?;
                let transport = transport.clone();
                let remote_port = ui.port;
                tokio::spawn(async move {
                    if let Ok(mut tunnel) = transport.tunnel(remote_port).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut tunnel).await;
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    transport.close().await;
    Ok(())
}
