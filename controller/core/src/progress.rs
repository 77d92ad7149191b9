//! What commands tell the user while they work: per-host progress events,
//! warnings and notes. They go to a [`Report`], which the CLI implements
//! with its printer (plain lines, or one live line per host on a
//! terminal). [`TransferMeter`] turns a stream of bytes sent into
//! [`Step::Transfer`] events, a few per second at most.

use std::sync::Arc;
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
    Connecting {
        address: String,
    },
    Connected,
    Probed {
        os: String,
        arch: String,
        service_manager: String,
    },
    Uploading {
        bytes: u64,
    },
    Uploaded,
    UpToDate,
    Installing {
        reason: String,
    },
    Installed {
        pid: Option<i64>,
    },
    Handshake,
    Ready {
        agent_version: String,
    },
    Docker {
        message: String,
    },
    Synced {
        files: usize,
        written: u32,
        removed: u32,
        bytes: u64,
    },
    Service {
        service: String,
        action: mlops_proto::v1::StackAction,
        detail: String,
    },
    /// An image the stack builds, built on another host of the deploy.
    Image {
        tag: String,
        detail: String,
    },
    /// The connection to the agent broke mid-way; the step is tried again.
    Retry {
        message: String,
    },
    /// Bytes of `what` sent so far, of `total` when known: for a live
    /// progress bar, not a line of its own.
    Transfer {
        what: String,
        done: u64,
        total: Option<u64>,
    },
    Failed {
        message: String,
    },
    /// This host's part of the command's current step ended well (another
    /// step may follow).
    Done,
}

/// Where a command's progress, warnings and notes go.
pub trait Report: Send + Sync {
    fn progress(&self, event: &Event);
    fn warn(&self, message: &str);
    fn info(&self, message: &str);
}

/// One host's progress: events stamped with the host and the time since
/// its task started. Cloneable; reporting never fails the task (a
/// `Report` writes a line and returns).
#[derive(Clone)]
pub struct Progress {
    report: Option<Arc<dyn Report>>,
    host: String,
    start: std::time::Instant,
}

impl Progress {
    pub fn new(report: Option<Arc<dyn Report>>, host: &str) -> Self {
        Progress { report, host: host.to_string(), start: std::time::Instant::now() }
    }

    pub fn silent(host: &str) -> Self {
        Self::new(None, host)
    }

    pub fn step(&self, step: Step) {
        if let Some(report) = &self.report {
            report.progress(&Event { host: self.host.clone(), step, elapsed: self.start.elapsed() });
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Counts the bytes of one transfer and reports them as
/// [`Step::Transfer`]: at the start, then at most every 200 ms (a transfer
/// moves thousands of chunks; a terminal needs a few updates a second).
/// The step that follows the transfer says how it ended.
pub struct TransferMeter {
    progress: Progress,
    what: String,
    total: Option<u64>,
    done: u64,
    last: std::time::Instant,
}

impl TransferMeter {
    const EVERY: Duration = Duration::from_millis(200);

    pub fn new(progress: &Progress, what: impl Into<String>, total: Option<u64>) -> Self {
        let last = std::time::Instant::now();
        let meter = TransferMeter { progress: progress.clone(), what: what.into(), total, done: 0, last };
        meter.emit();
        meter
    }

    pub fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if self.last.elapsed() >= Self::EVERY {
            self.last = std::time::Instant::now();
            self.emit();
        }
    }

    fn emit(&self) {
        self.progress.step(Step::Transfer { what: self.what.clone(), done: self.done, total: self.total });
    }
}

/// `512 B`, `8.0 MiB`: sizes as people read them.
pub use mlops_proto::bytes_human;

/// A report that drops everything: for a second read of what was already
/// reported once (a stack model read again with its secrets).
pub struct Quiet;

impl Report for Quiet {
    fn progress(&self, _: &Event) {}
    fn warn(&self, _: &str) {}
    fn info(&self, _: &str) {}
}
