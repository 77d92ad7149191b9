//! How the controller reaches a host: an SSH session, or this machine
//! directly. Both run shell scripts (optionally as root, feeding stdin) and
//! open byte streams to the agent's loopback port.

use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;

use mlops_ssh::{ExecOutput, Session, shell_quote};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::ControllerError;

/// A byte stream to the agent.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Pin<Box<dyn Io>>;

pub enum Transport {
    Ssh {
        session: Session,
        host: String,
    },
    /// This machine; `host` is the target's name (whose certificate the
    /// agent here holds).
    Local {
        host: String,
    },
}

impl Transport {
    /// This machine as the local target (`Target::local()`, "localhost").
    pub fn local() -> Self {
        Transport::Local { host: "localhost".into() }
    }

    pub fn host(&self) -> &str {
        match self {
            Transport::Ssh { host, .. } => host,
            Transport::Local { host } => host,
        }
    }

    /// Runs `script` with `sh`. With `sudo`, it goes through `sudo -n` (for
    /// a non-root user; the probe tells whether that is needed).
    pub async fn exec(&self, script: &str, stdin: Option<&[u8]>, sudo: bool) -> Result<ExecOutput, ControllerError> {
        let command = if sudo {
            format!("sudo -n -- sh -c {}", shell_quote(script))
        } else {
            format!("sh -c {}", shell_quote(script))
        };
        match self {
            Transport::Ssh { session, .. } => Ok(session.exec(&command, stdin).await?),
            Transport::Local { .. } => {
                let mut child = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&command)
                    .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| ControllerError::Local(format!("cannot run sh: {e}")))?;
                if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
                    let data = data.to_vec();
                    // Feed stdin concurrently with reading output, as over SSH.
                    tokio::spawn(async move {
                        let _ = pipe.write_all(&data).await;
                        let _ = pipe.shutdown().await;
                    });
                }
                // The same bound as over SSH (the child is killed on drop).
                let out = tokio::time::timeout(std::time::Duration::from_secs(600), child.wait_with_output())
                    .await
                    .map_err(|_| ControllerError::Local(format!("`{command}` did not finish within 600 s")))?
                    .map_err(|e| ControllerError::Local(e.to_string()))?;
                Ok(ExecOutput {
                    status: out.status.code().map(|c| c as u32),
                    stdout: out.stdout,
                    stderr: out.stderr,
                    dropped: 0,
                })
            }
        }
    }

    /// A stream to `127.0.0.1:port` on the host. The error is the I/O
    /// error itself (callers add which agent and port).
    pub async fn tunnel(&self, port: u16) -> std::io::Result<BoxIo> {
        match self {
            Transport::Ssh { session, .. } => {
                Ok(Box::pin(session.open_tunnel("127.0.0.1", port).await.map_err(std::io::Error::other)?))
            }
            Transport::Local { .. } => {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::pin(tcp))
            }
        }
    }

    pub async fn close(&self) {
        if let Transport::Ssh { session, .. } = self {
            session.close().await;
        }
    }
}

pub type SharedTransport = Arc<Transport>;
