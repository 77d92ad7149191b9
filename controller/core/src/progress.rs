//! Progress events: what each host task reports while it works. The CLI
//! turns them into lines; tests and benches can count them.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Event {
    pub host: String,
    pub step: Step,
    /// Since this host's task started.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Connecting { address: String },
    Connected,
    Probed { os: String, arch: String, service_manager: String },
    Uploading { bytes: u64 },
    Uploaded,
    UpToDate,
    Installing { reason: String },
    Installed { pid: Option<i64> },
    Handshake,
    Ready { agent_version: String },
    Docker { message: String },
    Synced { files: usize, written: u32, removed: u32, bytes: u64 },
    Service { service: String, action: String, detail: String },
    Failed { message: String },
}

/// Where events go. Cloneable; sending never blocks or fails the task.
#[derive(Clone)]
pub struct Progress {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    host: String,
    start: std::time::Instant,
}

impl Progress {
    pub fn new(tx: Option<tokio::sync::mpsc::UnboundedSender<Event>>, host: &str) -> Self {
        Progress { tx, host: host.to_string(), start: std::time::Instant::now() }
    }

    pub fn silent(host: &str) -> Self {
        Self::new(None, host)
    }

    pub fn step(&self, step: Step) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Event { host: self.host.clone(), step, elapsed: self.start.elapsed() });
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}
