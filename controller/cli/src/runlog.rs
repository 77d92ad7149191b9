//! The full log of each run that acts on hosts: every progress line (as
//! `-v` prints them), warning, note and error, each stamped with its UTC
//! time, in the state directory's `logs/` (owner-only, the newest
//! [`KEEP`] runs kept). Its path is printed when the run fails, so the
//! whole story is there even when a terminal showed only live lines.
//!
//! Only what goes to stderr is logged: results on stdout (such as the
//! output of `mlopsctl secrets`) never are.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How many run logs are kept.
pub const KEEP: usize = 50;

pub struct RunLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl RunLog {
    /// A new log for `command` in `state`/logs, after removing the oldest
    /// beyond [`KEEP`].
    pub fn create(state: &Path, command: &str) -> std::io::Result<RunLog> {
        let dir = state.join("logs");
        std::fs::create_dir_all(&dir)?;
        prune(&dir, KEEP - 1);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // `20261206T214003Z`: names sort by time.
        let stamp = crate::printer::unix_date(now.as_secs() as i64).replace(['-', ':'], "").replace(' ', "T");
        let path = dir.join(format!("{stamp}Z-{command}-{}.log", std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).mode(0o600).open(&path)?;
        let log = RunLog { path, file: Mutex::new(file) };
        let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
        log.line(&format!("mlopsctl {} ({})", env!("CARGO_PKG_VERSION"), args.join(" ")));
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `text` (each of its lines stamped). A failed write is
    /// ignored: the log must never fail the run it records.
    pub fn line(&self, text: &str) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let stamp = format!("{}.{:03}Z", crate::printer::unix_date(now.as_secs() as i64), now.subsec_millis());
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(&format!("{stamp} {line}\n"));
        }
        let _ = self.file.lock().expect("not poisoned").write_all(out.as_bytes());
    }
}

/// Removes the oldest logs of `dir` until at most `keep` remain.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log") && p.is_file())
        .collect();
    if logs.len() <= keep {
        return;
    }
    logs.sort();
    for old in &logs[..logs.len() - keep] {
        let _ = std::fs::remove_file(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_private_stamped_and_the_oldest_go() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("logs");
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..KEEP + 5 {
            std::fs::write(dir.join(format!("20000101T0000{i:02}Z-deploy-1.log")), "old").unwrap();
        }
        std::fs::write(dir.join("keep-me.txt"), "not a log").unwrap();
        let log = RunLog::create(state.path(), "deploy").unwrap();
        log.line("  host  1.00s  connected\nsecond line");
        let logs =
            std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.path().extension().unwrap() == "log").count();
        assert_eq!(logs, KEEP);
        assert!(dir.join("keep-me.txt").exists());
        assert!(!dir.join("20000101T000000Z-deploy-1.log").exists(), "the oldest went");
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].ends_with("Z   host  1.00s  connected") && lines[2].ends_with("Z second line"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(log.path()).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
