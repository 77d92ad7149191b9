//! All output goes through the [`Printer`]: progress lines and errors to
//! stderr, results to stdout (a table, or JSON with `--output json`).
//!
//! Errors print as uv does:
//! ```text
//! error: <what failed>
//!   Caused by: <why>
//!   hint: <what to do>
//! ```

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use mlops_controller::ControllerError;
use mlops_controller::progress::{Event, Step};
use mlops_inventory::InventoryError;
use mlops_ssh::SshError;

use crate::cli::Output;

pub struct Printer {
    pub output: Output,
    /// Serializes lines from concurrent host tasks.
    lock: Mutex<()>,
}

impl Printer {
    pub fn new(output: Output) -> Self {
        Printer { output, lock: Mutex::new(()) }
    }

    fn stderr_line(&self, line: &str) {
        let _guard = self.lock.lock().expect("not poisoned");
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    /// Result text or JSON on stdout.
    pub fn stdout(&self, text: &str) {
        let _guard = self.lock.lock().expect("not poisoned");
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        if !text.ends_with('\n') {
            let _ = out.write_all(b"\n");
        }
    }

    pub fn json(&self, value: &serde_json::Value) {
        self.stdout(&serde_json::to_string_pretty(value).expect("serializable"));
    }

    pub fn info(&self, line: &str) {
        self.stderr_line(line);
    }

    pub fn warn(&self, line: &str) {
        self.stderr_line(&format!("warning: {line}"));
    }

    /// One progress line per host step.
    pub fn progress(&self, event: &Event, width: usize) {
        let what = match &event.step {
            Step::Connecting { address } => format!("connecting to {address}"),
            Step::Connected => "connected".into(),
            Step::Probed { os, arch, service_manager } => format!("{os} {arch}, {service_manager}"),
            Step::Uploading { bytes } => format!("uploading agent ({})", bytes_human(*bytes)),
            Step::Uploaded => "agent uploaded".into(),
            Step::UpToDate => "agent up to date".into(),
            Step::Installing { reason } => format!("installing agent ({reason})"),
            Step::Installed { pid } => match pid {
                Some(pid) => format!("agent started (pid {pid})"),
                None => "agent started".into(),
            },
            Step::Handshake => "mTLS handshake".into(),
            Step::Ready { agent_version } => format!("ready: agent {agent_version}"),
            Step::Docker { message } => format!("docker: {message}"),
            Step::Synced { files, written, removed, bytes } => {
                format!(
                    "files synced: {files} in the tree, {written} written, {removed} removed, {} sent",
                    bytes_human(*bytes)
                )
            }
            Step::Service { service, action, detail } => {
                let who = if service.is_empty() { String::new() } else { format!("{service}: ") };
                if detail.is_empty() { format!("{who}{action}") } else { format!("{who}{action} {detail}") }
            }
            Step::Failed { message } => format!("FAILED: {message}"),
        };
        self.stderr_line(&format!("  {:width$}  {:>6}  {what}", event.host, secs(event.elapsed)));
    }

    /// Prints an error with its causes and hint.
    pub fn error(&self, err: &anyhow::Error) {
        self.stderr_line(&render_error(err, ""));
    }
}

/// `error: ...` with `Caused by:` lines and a `hint:`; `indent` prefixes every line.
pub fn render_error(err: &anyhow::Error, indent: &str) -> String {
    let mut lines = vec![format!("{indent}error: {err}")];
    let mut last = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        // `#[error(transparent)]` repeats its source; say each thing once.
        if text != last {
            lines.push(format!("{indent}  Caused by: {text}"));
        }
        last = text;
    }
    if let Some(hint) = hint_of(err) {
        lines.push(format!("{indent}  hint: {hint}"));
    }
    lines.join("\n")
}

/// The first hint any error in the chain offers.
pub fn hint_of(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|e| {
        if let Some(e) = e.downcast_ref::<ControllerError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<SshError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<InventoryError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<mlops_compose::ComposeError>() {
            e.hint()
        } else {
            None
        }
    })
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

pub fn bytes_human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub fn duration_human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A plain text table: a header row and left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanized() {
        assert_eq!(bytes_human(512), "512 B");
        assert_eq!(bytes_human(8 * 1024 * 1024 + 1), "8.0 MiB");
        assert_eq!(duration_human(3725), "1h2m");
        assert_eq!(table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]), "A    BB\nxyz  1");
    }
}
