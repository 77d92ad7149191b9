//! What was done to each project on this host, and by whom: one JSON line
//! per deploy, down or secret change in `<state>/history/<project>.jsonl`
//! (root only), newest last; past [`TRIM_AT`] bytes the file is cut to its
//! newest [`KEEP`] entries.
//! The operator is the common name of the client certificate the call came
//! with (see `tls::Peer`), so every controller's deploys are told apart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mlops_proto::v1::HistoryEntry;

use crate::engine::EngineError;
use crate::engine::confine;
use crate::tls::Peer;

/// Entries kept per project when the file is cut.
pub const KEEP: usize = 500;
/// The size at which it is cut (an entry is at most about 1.3 KiB).
pub const TRIM_AT: u64 = 1 << 20;

#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    lock: Mutex<()>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    unix_ms: u64,
    operator: String,
    cert_sha256: String,
    action: String,
    outcome: String,
    detail: String,
}

impl History {
    pub fn new(state_dir: &Path) -> Self {
        History { dir: state_dir.join("history"), lock: Mutex::new(()) }
    }

    fn path(&self, project: &str) -> PathBuf {
        self.dir.join(format!("{project}.jsonl"))
    }

    /// Appends an entry; cuts the file to the newest [`KEEP`] entries once
    /// it has grown past [`TRIM_AT`]. A failure is logged, never the caller's.
    pub fn record(&self, project: &str, peer: &Peer, action: &str, outcome: &str, detail: &str) {
        let line = Line {
            unix_ms: crate::engine::now_ms(),
            operator: peer.operator.clone(),
            cert_sha256: peer.cert_sha256.clone(),
            action: action.to_string(),
            outcome: outcome.to_string(),
            detail: detail.chars().take(1024).collect(),
        };
        if let Err(e) = self.append(project, &line) {
            tracing::warn!(project, "cannot record history: {e}");
        }
    }

    fn append(&self, project: &str, line: &Line) -> std::io::Result<()> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        confine::private_dir(&self.dir)?;
        let path = self.path(project);
        let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
        text.push('\n');
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)?;
        file.write_all(text.as_bytes())?;
        let size = file.metadata()?.len();
        drop(file);
        if size > TRIM_AT {
            let entries = self.read_locked(project)?;
            let kept: String = entries[entries.len().saturating_sub(KEEP)..]
                .iter()
                .filter_map(|l| serde_json::to_string(l).ok())
                .map(|l| l + "\n")
                .collect();
            let dir = std::fs::File::open(&self.dir)?;
            use std::os::fd::AsFd;
            confine::write_file(
                dir.as_fd(),
                std::ffi::OsStr::new(&format!("{project}.jsonl")),
                &mut kept.as_bytes(),
                0o600,
            )?;
        }
        Ok(())
    }

    fn read_locked(&self, project: &str) -> std::io::Result<Vec<Line>> {
        let text = match std::fs::read_to_string(self.path(project)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A line cut by a crash is skipped, not fatal.
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// The newest `limit` entries (all with 0), oldest first.
    pub fn entries(&self, project: &str, limit: usize) -> Result<Vec<HistoryEntry>, EngineError> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lines = self.read_locked(project).map_err(EngineError::io_at("cannot read", &self.path(project)))?;
        let skip = if limit == 0 { 0 } else { lines.len().saturating_sub(limit) };
        Ok(lines
            .into_iter()
            .skip(skip)
            .map(|l| HistoryEntry {
                unix_ms: l.unix_ms,
                operator: l.operator,
                cert_sha256: l.cert_sha256,
                action: l.action,
                outcome: l.outcome,
                detail: l.detail,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_kept_in_order_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        let peer = Peer { operator: "alice".into(), ..Peer::default() };
        let long = "x".repeat(1000);
        for i in 0..1000 {
            h.record("p", &peer, "deploy", "ok", &format!("run {i} {long}"));
        }
        let all = h.entries("p", 0).unwrap();
        assert!(all.len() < 1000 && all.len() >= KEEP, "cut once: {}", all.len());
        assert!(all.last().unwrap().detail.starts_with("run 999 "), "the newest kept");
        let last2 = h.entries("p", 2).unwrap();
        assert_eq!(last2.len(), 2);
        assert_eq!(last2[1].operator, "alice");
        assert!(h.entries("q", 0).unwrap().is_empty());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("history/p.jsonl")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
