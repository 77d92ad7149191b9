//! Content-addressed directory sync.
//!
//! The controller sends a manifest (path, size, mode, sha256 per file;
//! directories; symlinks). The agent answers with the hashes its blob store
//! lacks; the controller streams just those; commit then writes the tree.
//!
//! On the host (under the agent's state directory):
//! ```text
//! blobs/<sha256>            complete, verified contents
//! blobs/partial/<sha256>    an upload in progress (kept: a later sync resumes it)
//! trees/<root>/...          the synced trees
//! trees/.index/<root>.json  what the last commit wrote (path -> sha256, mode)
//! ```
//!
//! Safety: paths must be relative, `/`-separated, without `.`/`..`
//! components; a symlink's target must resolve inside the tree; no entry may
//! sit below a symlink. Each file is written to a temporary name beside its
//! destination, fsynced, then renamed, so a reader never sees half a file.
//! Nothing in the tree changes before commit: a sync interrupted while
//! uploading leaves the previous tree as it was, and the blobs already sent
//! are not sent again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlops_proto::v1::{SyncEntry, SyncManifest, SyncPlan, SyncReport};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EngineError;

/// Limits that keep one sync from filling the host.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_entries: usize,
    pub max_chunk_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_file_bytes: 2 << 30, max_total_bytes: 20 << 30, max_entries: 200_000, max_chunk_bytes: 4 << 20 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Indexed {
    sha256: String,
    mode: u32,
    #[serde(default)]
    symlink: String,
}

struct Session {
    root: String,
    entries: Vec<SyncEntry>,
}

/// The sync store of one agent.
#[derive(Clone)]
pub struct SyncStore {
    base: PathBuf,
    limits: Limits,
    sessions: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

/// A manifest entry refused.
fn invalid(m: impl Into<String>) -> EngineError {
    EngineError::bad_request("entries", m)
}

/// A tree name: letters, digits, `-`, `_`, `.`, not starting with `.`.
pub fn check_root(root: &str) -> Result<(), EngineError> {
    if root.is_empty()
        || root.len() > 128
        || root.starts_with('.')
        || !root.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(EngineError::bad_request(
            "root",
            format!("`{root}` is not a valid tree name (letters, digits, `-`, `_`, `.`)"),
        ));
    }
    Ok(())
}

/// A relative, normalized path inside the tree.
pub fn check_path(path: &str) -> Result<PathBuf, EngineError> {
    if path.is_empty() || path.contains('\0') || path.contains('\\') {
        return Err(invalid(format!("`{path}` is not a valid path")));
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err(invalid(format!("`{path}` is absolute; paths in a sync are relative to the tree")));
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err(invalid(format!("`{path}` leaves the tree (`..`)"))),
            _ => return Err(invalid(format!("`{path}` is not a normalized relative path"))),
        }
    }
    if path.split('/').any(|part| part.is_empty() || part == "." || part.starts_with(".mlops-tmp")) {
        return Err(invalid(format!("`{path}` is not a normalized relative path")));
    }
    Ok(p.to_path_buf())
}

/// A symlink at `link` pointing to `target` must stay inside the tree.
fn check_symlink(link: &Path, target: &str) -> Result<(), EngineError> {
    if target.is_empty() || Path::new(target).is_absolute() {
        return Err(invalid(format!("symlink `{}` -> `{target}` points outside the tree", link.display())));
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in Path::new(target).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return Err(invalid(format!("symlink `{}` -> `{target}` is not allowed", link.display()))),
        }
        if depth < 0 {
            return Err(invalid(format!("symlink `{}` -> `{target}` points outside the tree", link.display())));
        }
    }
    Ok(())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl SyncStore {
    pub fn new(state_dir: &Path, limits: Limits) -> Self {
        SyncStore { base: state_dir.to_path_buf(), limits, sessions: Arc::default() }
    }

    fn blobs(&self) -> PathBuf {
        self.base.join("blobs")
    }

    /// Where tree `root` lives.
    pub fn tree(&self, root: &str) -> PathBuf {
        self.base.join("trees").join(root)
    }

    fn index_path(&self, root: &str) -> PathBuf {
        self.base.join("trees/.index").join(format!("{root}.json"))
    }

    fn has_blob(&self, sha: &str) -> bool {
        self.blobs().join(sha).is_file()
    }

    /// Checks the manifest and says which contents are missing.
    pub fn begin(&self, manifest: SyncManifest) -> Result<SyncPlan, EngineError> {
        check_root(&manifest.root)?;
        let l = self.limits;
        if manifest.entries.len() > l.max_entries {
            return Err(invalid(format!("{} entries exceed the limit of {}", manifest.entries.len(), l.max_entries)));
        }
        let mut seen = BTreeSet::new();
        let mut links = BTreeSet::new();
        let mut total = 0u64;
        for e in &manifest.entries {
            let p = check_path(&e.path)?;
            if !seen.insert(p.clone()) {
                return Err(invalid(format!("`{}` appears twice", e.path)));
            }
            if !e.symlink_target.is_empty() {
                check_symlink(&p, &e.symlink_target)?;
                links.insert(p);
            } else if !e.is_dir {
                if !is_sha256(&e.sha256) {
                    return Err(invalid(format!("`{}`: `{}` is not a sha256", e.path, e.sha256)));
                }
                if e.size > l.max_file_bytes {
                    return Err(invalid(format!(
                        "`{}` is {} bytes; the limit per file is {}",
                        e.path, e.size, l.max_file_bytes
                    )));
                }
                total += e.size;
            }
            if e.mode & !0o7777 != 0 {
                return Err(invalid(format!("`{}`: mode {:o} is not a permission mode", e.path, e.mode)));
            }
        }
        if total > l.max_total_bytes {
            return Err(invalid(format!("the tree holds {total} bytes; the limit is {}", l.max_total_bytes)));
        }
        for p in &seen {
            if p.ancestors().skip(1).any(|a| links.contains(a)) {
                return Err(invalid(format!("`{}` lies below a symlink", p.display())));
            }
        }
        let mut missing = BTreeMap::new();
        for e in manifest.entries.iter().filter(|e| !e.is_dir && e.symlink_target.is_empty()) {
            if !self.has_blob(&e.sha256) {
                missing.insert(e.sha256.clone(), e.size);
            }
        }
        let sync_id = {
            let mut h = Sha256::new();
            h.update(super::now_ms().to_le_bytes());
            h.update(std::process::id().to_le_bytes());
            h.update(manifest.root.as_bytes());
            h.update((self.sessions.lock().expect("not poisoned").len() as u64).to_le_bytes());
            hex::encode(&h.finalize()[..12])
        };
        let plan = SyncPlan {
            sync_id: sync_id.clone(),
            missing_bytes: missing.values().sum(),
            missing: missing.into_keys().collect(),
            path: self.tree(&manifest.root).display().to_string(),
        };
        let mut sessions = self.sessions.lock().expect("not poisoned");
        // Sessions are small; keep the newest few in case a controller
        // abandons them (a crash between begin and commit).
        if sessions.len() > 64 {
            sessions.clear();
        }
        sessions.insert(sync_id, Arc::new(Session { root: manifest.root, entries: manifest.entries }));
        Ok(plan)
    }

    fn session(&self, id: &str) -> Result<Arc<Session>, EngineError> {
        self.sessions.lock().expect("not poisoned").get(id).cloned().ok_or_else(|| {
            EngineError::NotFound(format!("no sync `{id}` in progress (it may have been superseded); start again"))
        })
    }

    /// Appends one chunk of blob `sha` at `offset`. Returns true when the
    /// blob is complete and verified.
    pub fn write_chunk(&self, sync_id: &str, sha: &str, offset: u64, data: &[u8]) -> Result<bool, EngineError> {
        let session = self.session(sync_id)?;
        let entry =
            session.entries.iter().find(|e| e.sha256 == sha && e.symlink_target.is_empty() && !e.is_dir).ok_or_else(
                || EngineError::bad_request("sha256", format!("blob {sha} is not in sync {sync_id}'s manifest")),
            )?;
        if data.len() > self.limits.max_chunk_bytes {
            return Err(EngineError::bad_request(
                "data",
                format!("a chunk of {} bytes exceeds {}", data.len(), self.limits.max_chunk_bytes),
            ));
        }
        if self.has_blob(sha) {
            return Ok(true);
        }
        let partial_dir = self.blobs().join("partial");
        std::fs::create_dir_all(&partial_dir).map_err(EngineError::io("creating the blob store"))?;
        let partial = partial_dir.join(sha);
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if offset != have {
            // Resuming from the start is always possible; anything else
            // would leave a hole.
            if offset != 0 {
                return Err(EngineError::bad_request(
                    "offset",
                    format!("blob {sha}: chunk at offset {offset}, but {have} bytes are stored"),
                ));
            }
        }
        if offset + data.len() as u64 > entry.size {
            return Err(EngineError::bad_request(
                "data",
                format!("blob {sha}: more data than its declared size {}", entry.size),
            ));
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .append(offset != 0)
            .open(&partial)
            .map_err(EngineError::io_at("writing", &partial))?;
        f.write_all(data).map_err(EngineError::io_at("writing", &partial))?;
        if offset + data.len() as u64 == entry.size {
            f.sync_all().map_err(EngineError::io("fsync"))?;
            drop(f);
            let got = hash_file(&partial)?;
            if got != sha {
                let _ = std::fs::remove_file(&partial);
                return Err(EngineError::bad_request("data", format!("blob {sha}: the data received hashes to {got}")));
            }
            std::fs::rename(&partial, self.blobs().join(sha)).map_err(EngineError::io("storing a blob"))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes the tree of sync `sync_id`: changed files replaced atomically,
    /// files no longer listed removed.
    pub fn commit(&self, sync_id: &str) -> Result<SyncReport, EngineError> {
        let session = self.session(sync_id)?;
        let missing: Vec<&str> = session
            .entries
            .iter()
            .filter(|e| !e.is_dir && e.symlink_target.is_empty() && !self.has_blob(&e.sha256))
            .map(|e| e.path.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(EngineError::bad_request(
                "sync_id",
                format!(
                    "{} file(s) were not uploaded, first `{}`; the tree was not changed",
                    missing.len(),
                    missing[0]
                ),
            ));
        }
        let tree = self.tree(&session.root);
        std::fs::create_dir_all(&tree).map_err(EngineError::io_at("creating", &tree))?;
        let old: BTreeMap<String, Indexed> = std::fs::read(self.index_path(&session.root))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut index = BTreeMap::new();
        let mut report = SyncReport { path: tree.display().to_string(), ..Default::default() };
        // Directories first (sorted: parents before children).
        let mut entries: Vec<&SyncEntry> = session.entries.iter().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for e in entries.iter().filter(|e| e.is_dir) {
            let dir = tree.join(&e.path);
            if dir.is_symlink() || (dir.exists() && !dir.is_dir()) {
                remove_any(&dir)?;
            }
            std::fs::create_dir_all(&dir).map_err(EngineError::io_at("creating", &dir))?;
            let mode = if e.mode == 0 { 0o755 } else { e.mode };
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode));
        }
        for e in entries.iter().filter(|e| !e.is_dir) {
            let dest = tree.join(&e.path);
            let want = Indexed { sha256: e.sha256.clone(), mode: e.mode, symlink: e.symlink_target.clone() };
            let on_disk_ok = old.get(&e.path) == Some(&want) && (dest.is_symlink() || dest.is_file());
            index.insert(e.path.clone(), want.clone());
            if on_disk_ok {
                report.unchanged += 1;
                continue;
            }
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(EngineError::io_at("creating", parent))?;
            }
            let tmp =
                dest.with_file_name(format!(".mlops-tmp.{}", dest.file_name().unwrap_or_default().to_string_lossy()));
            let _ = std::fs::remove_file(&tmp);
            if e.symlink_target.is_empty() {
                copy_synced(&self.blobs().join(&e.sha256), &tmp, if e.mode == 0 { 0o644 } else { e.mode })?;
            } else {
                std::os::unix::fs::symlink(&e.symlink_target, &tmp)
                    .map_err(EngineError::io_at("creating symlink", &dest))?;
            }
            if dest.is_dir() && !dest.is_symlink() {
                std::fs::remove_dir_all(&dest).map_err(EngineError::io_at("replacing", &dest))?;
            }
            std::fs::rename(&tmp, &dest).map_err(EngineError::io_at("renaming into", &dest))?;
            report.written += 1;
        }
        // Remove what the manifest no longer lists.
        let listed: BTreeSet<PathBuf> = session.entries.iter().map(|e| PathBuf::from(&e.path)).collect();
        report.removed = remove_unlisted(&tree, &tree, &listed)?;
        if let Ok(dir) = std::fs::File::open(&tree) {
            let _ = dir.sync_all();
        }
        let index_path = self.index_path(&session.root);
        std::fs::create_dir_all(index_path.parent().expect("has parent"))
            .map_err(EngineError::io("creating the index directory"))?;
        let tmp = index_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&index).expect("serializable"))
            .map_err(EngineError::io("writing the index"))?;
        std::fs::rename(&tmp, &index_path).map_err(EngineError::io("writing the index"))?;
        self.sessions.lock().expect("not poisoned").remove(sync_id);
        self.collect_garbage();
        Ok(report)
    }

    /// Drops blobs no tree refers to and no session in progress needs. Only
    /// blobs older than an hour go: another sync may be uploading right now
    /// for a tree it has not committed yet.
    fn collect_garbage(&self) {
        let mut keep = BTreeSet::new();
        if let Ok(dir) = std::fs::read_dir(self.base.join("trees/.index")) {
            for f in dir.flatten() {
                if let Ok(b) = std::fs::read(f.path())
                    && let Ok(index) = serde_json::from_slice::<BTreeMap<String, Indexed>>(&b)
                {
                    keep.extend(index.into_values().map(|i| i.sha256));
                }
            }
        }
        for s in self.sessions.lock().expect("not poisoned").values() {
            keep.extend(s.entries.iter().map(|e| e.sha256.clone()));
        }
        if let Ok(dir) = std::fs::read_dir(self.blobs()) {
            for f in dir.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let old = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if is_sha256(&name) && !keep.contains(&name) && old {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

fn remove_any(p: &Path) -> Result<(), EngineError> {
    let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    r.map_err(EngineError::io_at("removing", p))
}

fn remove_unlisted(tree: &Path, dir: &Path, listed: &BTreeSet<PathBuf>) -> Result<u32, EngineError> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(tree).expect("below the tree").to_path_buf();
        let is_real_dir = path.is_dir() && !path.is_symlink();
        if !listed.contains(&rel) {
            // An unlisted directory still holding listed files stays
            // (the manifest implies its parents).
            if is_real_dir && listed.iter().any(|l| l.starts_with(&rel)) {
                removed += remove_unlisted(tree, &path, listed)?;
                continue;
            }
            remove_any(&path)?;
            removed += 1;
        } else if is_real_dir {
            removed += remove_unlisted(tree, &path, listed)?;
        }
    }
    Ok(removed)
}

fn copy_synced(from: &Path, to: &Path, mode: u32) -> Result<(), EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from).map_err(EngineError::io_at("reading blob", from))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .map_err(EngineError::io_at("creating", to))?;
    std::io::copy(&mut src, &mut dst).map_err(EngineError::io_at("writing", to))?;
    // The umask may have narrowed the mode at creation.
    dst.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(EngineError::io("chmod"))?;
    dst.sync_all().map_err(EngineError::io_at("fsync", to))
}

pub fn hash_file(path: &Path) -> Result<String, EngineError> {
    let mut f = std::fs::File::open(path).map_err(EngineError::io_at("reading", path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(EngineError::io_at("reading", path))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, data: &[u8]) -> SyncEntry {
        SyncEntry {
            path: path.into(),
            size: data.len() as u64,
            mode: 0o644,
            sha256: hex::encode(Sha256::digest(data)),
            ..Default::default()
        }
    }

    fn sync(store: &SyncStore, root: &str, files: &[(&str, &[u8])]) -> Result<SyncReport, EngineError> {
        let entries = files.iter().map(|(p, d)| entry(p, d)).collect();
        let plan = store.begin(SyncManifest { root: root.into(), entries })?;
        for (_, d) in files {
            let sha = hex::encode(Sha256::digest(d));
            if plan.missing.contains(&sha) {
                store.write_chunk(&plan.sync_id, &sha, 0, d)?;
            }
        }
        store.commit(&plan.sync_id)
    }

    #[test]
    fn writes_changes_only_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path(), Limits::default());
        let r = sync(&store, "t", &[("a.txt", b"one"), ("d/b.txt", b"two")]).unwrap();
        assert_eq!((r.written, r.removed, r.unchanged), (2, 0, 0));
        let r = sync(&store, "t", &[("a.txt", b"one"), ("d/c.txt", b"three")]).unwrap();
        assert_eq!((r.written, r.removed, r.unchanged), (1, 1, 1));
        let tree = store.tree("t");
        assert_eq!(std::fs::read(tree.join("d/c.txt")).unwrap(), b"three");
        assert!(!tree.join("d/b.txt").exists());
    }

    #[test]
    fn refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path(), Limits::default());
        for bad in ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", ""] {
            let e = store.begin(SyncManifest { root: "t".into(), entries: vec![entry(bad, b"x")] });
            assert!(e.is_err(), "{bad}");
        }
        for (link, target) in [("l", "/etc"), ("l", ".."), ("d/l", "../../x")] {
            let e = SyncEntry { path: link.into(), symlink_target: target.into(), ..Default::default() };
            assert!(store.begin(SyncManifest { root: "t".into(), entries: vec![e] }).is_err(), "{link} -> {target}");
        }
        let ok = SyncEntry { path: "d/l".into(), symlink_target: "../x".into(), ..Default::default() };
        assert!(store.begin(SyncManifest { root: "t".into(), entries: vec![ok.clone()] }).is_ok());
        let below = entry("d/l/f", b"x");
        assert!(store.begin(SyncManifest { root: "t".into(), entries: vec![ok, below] }).is_err(), "below a symlink");
        assert!(store.begin(SyncManifest { root: "../t".into(), entries: vec![] }).is_err());
    }

    #[test]
    fn limits_and_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path(), Limits { max_file_bytes: 4, ..Limits::default() });
        let e = store.begin(SyncManifest { root: "t".into(), entries: vec![entry("big", b"12345")] }).unwrap_err();
        assert!(e.to_string().contains("the limit per file is 4"), "{e}");
        let plan = store.begin(SyncManifest { root: "t".into(), entries: vec![entry("f", b"1234")] }).unwrap();
        let sha = plan.missing[0].clone();
        assert!(store.write_chunk(&plan.sync_id, &sha, 0, b"abcd").unwrap_err().to_string().contains("hashes to"));
        let e = store.commit(&plan.sync_id).unwrap_err();
        assert!(e.to_string().contains("were not uploaded"), "{e}");
    }
}
