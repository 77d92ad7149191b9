//! Which of a project's containers `StopServices` stopped: a record the
//! next converge reads, so that a stopped service that may complete (an
//! exit 0 would count as done) is started again rather than kept, and then
//! clears. A file per project under the agent's state directory, written
//! atomically; a record that cannot be read counts as empty (then such a
//! service stays stopped until its configuration changes, as before).

use std::collections::BTreeSet;
use std::path::Path;

/// The container IDs recorded.
pub fn read(path: &Path) -> BTreeSet<String> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Adds `ids` to the record.
pub fn add(path: &Path, ids: &[String]) -> std::io::Result<()> {
    let mut all = read(path);
    all.extend(ids.iter().cloned());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(&all).expect("serializable"))?;
    std::fs::rename(&tmp, path)
}

/// Forgets the record (its containers run again, or were replaced).
pub fn clear(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_add_up_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stopped/p.json");
        assert!(read(&path).is_empty());
        add(&path, &["a".into()]).unwrap();
        add(&path, &["b".into(), "a".into()]).unwrap();
        assert_eq!(read(&path), BTreeSet::from(["a".to_string(), "b".to_string()]));
        clear(&path);
        assert!(read(&path).is_empty());
    }
}
