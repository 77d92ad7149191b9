//! The controller's side of file sync: a local directory as a manifest,
//! and the blobs the agent asks for.
//!
//! Hashing every file on every sync would make a one-file change cost as
//! much as the whole tree, so hashes are cached in the state directory,
//! keyed by path, size, modification time and inode; only files whose
//! metadata changed are read again.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlops_proto::ignore::Ignore;
use mlops_proto::v1::{SyncChunk, SyncEntry, SyncManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ControllerError;

/// Bytes per upload message.
pub const CHUNK_BYTES: usize = 1 << 20;

/// A scanned local directory.
#[derive(Debug, Clone, Default)]
pub struct LocalTree {
    pub root: PathBuf,
    pub entries: Vec<SyncEntry>,
    /// Where to read each content hash from.
    pub sources: BTreeMap<String, PathBuf>,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct CachedHash {
    size: u64,
    mtime_ns: i64,
    ino: u64,
    sha256: String,
}

/// The hash cache, one JSON file in the state directory.
#[derive(Debug, Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, CachedHash>,
    dirty: bool,
}

impl HashCache {
    pub fn open(path: PathBuf) -> Self {
        let entries = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashCache { path: Some(path), entries, dirty: false }
    }

    /// Writes the cache back (atomically) if it changed.
    pub fn save(&self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        if std::fs::write(&tmp, serde_json::to_vec(&self.entries).expect("serializable")).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    fn hash(&mut self, path: &Path, meta: &std::fs::Metadata) -> Result<String, ControllerError> {
        let key = path.display().to_string();
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        if let Some(c) = self.entries.get(&key)
            && c.size == meta.len()
            && c.mtime_ns == mtime_ns
            && c.ino == meta.ino()
        {
            return Ok(c.sha256.clone());
        }
        let sha = hash_file(path)?;
        self.entries.insert(key, CachedHash { size: meta.len(), mtime_ns, ino: meta.ino(), sha256: sha.clone() });
        self.dirty = true;
        Ok(sha)
    }
}

fn hash_file(path: &Path) -> Result<String, ControllerError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ControllerError::Local(format!("cannot read {}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| ControllerError::Local(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Scans `root`: every file, directory and symlink, minus `.git` and the
/// patterns of `root/.mlopsignore`.
pub fn scan(root: &Path, cache: &mut HashCache) -> Result<LocalTree, ControllerError> {
    let ignore_path = root.join(".mlopsignore");
    let ignore = Ignore::parse(&std::fs::read_to_string(&ignore_path).unwrap_or_default()).map_err(|e| {
        ControllerError::usage(
            format!("{}: {e}", ignore_path.display()),
            Some("patterns follow .dockerignore: `*`, `?`, `[...]`, `**`, `!` to re-include"),
        )
    })?;
    let mut tree = LocalTree { root: root.to_path_buf(), ..Default::default() };
    walk(root, root, &ignore, cache, &mut tree)?;
    tree.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(tree)
}

fn walk(
    root: &Path,
    dir: &Path,
    ignore: &Ignore,
    cache: &mut HashCache,
    tree: &mut LocalTree,
) -> Result<(), ControllerError> {
    let read = std::fs::read_dir(dir)
        .map_err(|e| ControllerError::Local(format!("cannot read directory {}: {e}", dir.display())))?;
    for entry in read {
        let entry =
            entry.map_err(|e| ControllerError::Local(format!("cannot read directory {}: {e}", dir.display())))?;
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("below the root").to_string_lossy().into_owned();
        let name = entry.file_name();
        if name == ".git" || ignore.excluded(&rel) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| ControllerError::Local(format!("cannot stat {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(|e| ControllerError::Local(format!("cannot read link {}: {e}", path.display())))?;
            tree.entries.push(SyncEntry {
                path: rel,
                symlink_target: target.to_string_lossy().into_owned(),
                ..Default::default()
            });
        } else if meta.is_dir() {
            tree.entries.push(SyncEntry { path: rel, mode, is_dir: true, ..Default::default() });
            walk(root, &path, ignore, cache, tree)?;
        } else if meta.is_file() {
            let sha = cache.hash(&path, &meta)?;
            tree.total_bytes += meta.len();
            tree.sources.entry(sha.clone()).or_insert(path.clone());
            tree.entries.push(SyncEntry { path: rel, size: meta.len(), mode, sha256: sha, ..Default::default() });
        } else {
            return Err(ControllerError::Local(format!(
                "{} is neither a file, a directory nor a symlink; it cannot be synced",
                path.display()
            )));
        }
    }
    Ok(())
}

impl LocalTree {
    /// Adds (or replaces) the file at `rel` with the contents of `source`,
    /// which may live outside the scanned directory (injected artifacts).
    pub fn add_file(&mut self, rel: &str, source: &Path, mode: u32) -> Result<(), ControllerError> {
        let sha = hash_file(source)?;
        let size = std::fs::metadata(source)
            .map_err(|e| ControllerError::Local(format!("cannot stat {}: {e}", source.display())))?
            .len();
        // Parent directories of `rel` that the scan did not see.
        let mut parent = Path::new(rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let ps = p.to_string_lossy().into_owned();
            if !self.entries.iter().any(|e| e.path == ps) {
                self.entries.push(SyncEntry { path: ps, mode: 0o755, is_dir: true, ..Default::default() });
            }
            parent = p.parent();
        }
        let replaced: u64 = self.entries.iter().filter(|e| e.path == rel).map(|e| e.size).sum();
        self.entries.retain(|e| e.path != rel);
        self.total_bytes = self.total_bytes - replaced + size;
        self.sources.insert(sha.clone(), source.to_path_buf());
        self.entries.push(SyncEntry { path: rel.to_string(), size, mode, sha256: sha, ..Default::default() });
        self.entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(())
    }

    pub fn manifest(&self, root: &str) -> SyncManifest {
        SyncManifest { root: root.to_string(), entries: self.entries.clone() }
    }

    /// A stream of upload chunks for `missing` hashes, read on a blocking
    /// thread as the agent takes them.
    pub fn chunks(self: &Arc<Self>, sync_id: String, missing: Vec<String>) -> tokio::sync::mpsc::Receiver<SyncChunk> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let tree = self.clone();
        tokio::task::spawn_blocking(move || {
            for sha in missing {
                let Some(path) = tree.sources.get(&sha) else { continue };
                let Ok(mut f) = std::fs::File::open(path) else { continue };
                let mut offset = 0u64;
                loop {
                    let mut buf = vec![0u8; CHUNK_BYTES];
                    let mut filled = 0;
                    while filled < buf.len() {
                        match f.read(&mut buf[filled..]) {
                            Ok(0) => break,
                            Ok(n) => filled += n,
                            Err(_) => return,
                        }
                    }
                    buf.truncate(filled);
                    let last = filled < CHUNK_BYTES;
                    if filled > 0 || offset == 0 {
                        let chunk = SyncChunk { sync_id: sync_id.clone(), sha256: sha.clone(), offset, data: buf };
                        if tx.blocking_send(chunk).is_err() {
                            return;
                        }
                    }
                    offset += filled as u64;
                    if last {
                        break;
                    }
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_with_ignores_and_caches_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::create_dir_all(d.join(".git")).unwrap();
        std::fs::write(d.join(".git/HEAD"), "x").unwrap();
        std::fs::write(d.join("a.txt"), "a").unwrap();
        std::fs::write(d.join("sub/b.log"), "b").unwrap();
        std::fs::write(d.join(".mlopsignore"), "**/*.log\n").unwrap();
        std::os::unix::fs::symlink("a.txt", d.join("link")).unwrap();
        // Beside the tree, not in it (it would be scanned), and in a
        // directory of this test's own (never /tmp/cache.json).
        let cache_dir = tempfile::tempdir().unwrap();
        let cache_path = cache_dir.path().join("cache.json");
        let mut cache = HashCache::open(cache_path.clone());
        let tree = scan(d, &mut cache).unwrap();
        let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, [".mlopsignore", "a.txt", "link", "sub"]);
        assert_eq!(tree.entries[2].symlink_target, "a.txt");
        cache.save();
        let mut again = HashCache::open(cache_path);
        assert!(!again.entries.is_empty());
        let tree2 = scan(d, &mut again).unwrap();
        assert!(!again.dirty, "nothing re-hashed");
        assert_eq!(tree.entries, tree2.entries);
    }
}
