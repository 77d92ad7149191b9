//! Content-addressed directory sync.
//!
//! The controller sends a manifest (path, size, mode, sha256 per file;
//! directories; symlinks). The agent answers with the hashes its blob store
//! lacks; the controller streams just those; commit then writes the tree.
//!
//! On the host (under the agent's state directory):
//! ```text
//! blobs/<sha256>            complete, verified contents
//! blobs/partial/<sha256>    an upload in progress (kept a day: a later sync resumes it)
//! trees/<root>/...          the synced trees
//! trees/.index/<root>.json  what the last commit wrote (path -> sha256, mode)
//! trees/.manifest/<root>.json  the last commit's manifest (kept with revisions)
//! tmp/                      the agent's temporary files (builds' debootstrap trees)
//! ```
//!
//! Safety: paths must be relative, `/`-separated, without `.`/`..`
//! components; every symlink must resolve inside the tree, following every
//! link of the manifest on the way; no entry may sit below a symlink. Modes
//! are normalised (0644/0755, never setuid). The tree is written through
//! directory handles that never follow a link ([`super::confine`]). Each
//! file is written to an unguessable temporary name beside its destination;
//! once all are written, one `syncfs` makes them durable and they are
//! renamed into place, so a reader never sees half a file and a crash never
//! leaves a renamed file without its data. Blobs are flushed the same way,
//! once per upload; a blob a crash cut short is known by its size.
//! Nothing in the tree changes before commit: a sync interrupted while
//! uploading leaves the previous tree as it was, and the blobs already sent
//! are not sent again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlops_proto::v1::{SyncEntry, SyncManifest, SyncPlan, SyncReport};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use rustix::fs::{FileType, Mode, OFlags};

use super::{EngineError, confine};

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

/// A manifest entry as the agent keeps it on disk: the last commit's
/// manifest of each tree, and a revision's files (see
/// `engine::revisions`), so a tree can be written again from blobs alone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub symlink: String,
    #[serde(default)]
    pub dir: bool,
}

impl From<&SyncEntry> for FileEntry {
    fn from(e: &SyncEntry) -> Self {
        FileEntry {
            path: e.path.clone(),
            size: e.size,
            mode: e.mode,
            sha256: e.sha256.clone(),
            symlink: e.symlink_target.clone(),
            dir: e.is_dir,
        }
    }
}

impl From<&FileEntry> for SyncEntry {
    fn from(e: &FileEntry) -> Self {
        SyncEntry {
            path: e.path.clone(),
            size: e.size,
            mode: e.mode,
            sha256: e.sha256.clone(),
            symlink_target: e.symlink.clone(),
            is_dir: e.dir,
        }
    }
}

/// Only the blob hashes of a file that lists entries (a manifest or a
/// revision), for garbage collection.
#[derive(Deserialize)]
struct Listed {
    #[serde(default)]
    files: Vec<FileEntry>,
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

/// Every symlink of a manifest must resolve inside the tree, following
/// every link on the way (as the kernel would once the tree is written):
/// `d/l -> ..` is fine, `x -> d/l/d/l/../..` is not. Links are resolved
/// through the manifest itself, which is all the tree will hold after the
/// commit (unlisted entries are removed). A dangling link is fine as long
/// as its path stays inside.
fn check_links(links: &BTreeMap<PathBuf, String>) -> Result<(), EngineError> {
    for (link, target) in links {
        resolve_in_manifest(links, link, target)?;
    }
    Ok(())
}

fn resolve_in_manifest(links: &BTreeMap<PathBuf, String>, link: &Path, target: &str) -> Result<(), EngineError> {
    let outside = |via: &str| {
        invalid(format!(
            "symlink `{}` -> `{target}` leads outside the tree{via}; links must resolve inside the synced directory",
            link.display()
        ))
    };
    if target.is_empty() || target.contains('\0') {
        return Err(invalid(format!("symlink `{}` has an invalid target", link.display())));
    }
    let mut stack: Vec<&std::ffi::OsStr> = Vec::new();
    if let Some(parent) = link.parent() {
        stack.extend(parent.components().map(|c| c.as_os_str()));
    }
    let mut queue: std::collections::VecDeque<(Component<'_>, &str)> = std::collections::VecDeque::new();
    queue.extend(Path::new(target).components().map(|c| (c, target)));
    let mut hops = 0;
    while let Some((c, from)) = queue.pop_front() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    let via = if from == target { String::new() } else { format!(" (through `{from}`)") };
                    return Err(outside(&via));
                }
            }
            Component::Normal(name) => {
                stack.push(name);
                let here: PathBuf = stack.iter().collect();
                if let Some((held, next)) = links.get_key_value(&here) {
                    hops += 1;
                    if hops > 40 {
                        return Err(invalid(format!(
                            "symlink `{}` -> `{target}`: too many levels of links (a loop?)",
                            link.display()
                        )));
                    }
                    if Path::new(next).is_absolute() {
                        return Err(outside(&format!(" (through `{}` -> `{next}`)", held.display())));
                    }
                    stack.pop();
                    for c in Path::new(next.as_str()).components().rev() {
                        queue.push_front((c, next.as_str()));
                    }
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(outside("")),
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

    /// The agent's directory for temporary files (root, 0700): nothing the
    /// agent makes goes to a shared `/tmp`.
    pub fn work_dir(&self) -> PathBuf {
        self.base.join("tmp")
    }

    /// Where tree `root` lives.
    pub fn tree(&self, root: &str) -> PathBuf {
        self.base.join("trees").join(root)
    }

    fn index_path(&self, root: &str) -> PathBuf {
        self.base.join("trees/.index").join(format!("{root}.json"))
    }

    fn manifest_path(&self, root: &str) -> PathBuf {
        self.base.join("trees/.manifest").join(format!("{root}.json"))
    }

    /// The manifest tree `root` was last committed with (`None` before its
    /// first commit, or from an agent that did not keep it).
    pub fn manifest(&self, root: &str) -> Result<Option<Vec<FileEntry>>, EngineError> {
        check_root(root)?;
        let path = self.manifest_path(root);
        match std::fs::read(&path) {
            Ok(b) => Ok(serde_json::from_slice::<Listed>(&b).ok().map(|l| l.files)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io_at("reading", &path)(e)),
        }
    }

    /// How the tree `new` (committed) differs from the tree `live`: files
    /// (and links) written anew or changed, and removed.
    pub fn diff(&self, new: &str, live: &str) -> Result<(u32, u32), EngineError> {
        let new = self.manifest(new)?.unwrap_or_default();
        let live = self.manifest(live)?.unwrap_or_default();
        let key = |e: &FileEntry| (e.sha256.clone(), confine::file_mode(e.mode), e.symlink.clone());
        let live: BTreeMap<&str, _> = live.iter().filter(|e| !e.dir).map(|e| (e.path.as_str(), key(e))).collect();
        let newer: BTreeMap<&str, _> = new.iter().filter(|e| !e.dir).map(|e| (e.path.as_str(), key(e))).collect();
        let changed = newer.iter().filter(|(p, k)| live.get(*p) != Some(*k)).count();
        let removed = live.keys().filter(|p| !newer.contains_key(*p)).count();
        Ok((changed as u32, removed as u32))
    }

    /// Removes tree `root` (a plan's scratch tree) and what the store keeps
    /// about it; its blobs go with the next garbage collection.
    pub fn remove_tree(&self, root: &str) -> Result<(), EngineError> {
        check_root(root)?;
        let tree = self.tree(root);
        match std::fs::remove_dir_all(&tree) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::io_at("removing", &tree)(e)),
        }
        for path in [self.index_path(root), self.manifest_path(root)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io_at("removing", &path)(e)),
            }
        }
        Ok(())
    }

    /// Writes tree `root` as `files` lists it, from blobs this store holds
    /// (a revision's files: its blobs are kept while it is). Checked and
    /// written exactly as a sync's commit.
    pub fn restore(&self, root: &str, files: &[FileEntry]) -> Result<SyncReport, EngineError> {
        let manifest = SyncManifest { root: root.to_string(), entries: files.iter().map(SyncEntry::from).collect() };
        let plan = self.begin(manifest)?;
        if let Some(sha) = plan.missing.first() {
            self.sessions.lock().expect("not poisoned").remove(&plan.sync_id);
            return Err(EngineError::NotFound(format!(
                "{} file(s) of the revision are no longer stored on this host (first: blob {sha})",
                plan.missing.len()
            )));
        }
        self.commit(&plan.sync_id)
    }

    /// Whether the store holds blob `sha` whole: of its size (a blob a
    /// crash cut short before [`Self::flush_blobs`] is not).
    fn has_blob(&self, sha: &str, size: u64) -> bool {
        std::fs::metadata(self.blobs().join(sha)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Checks the manifest and says which contents are missing.
    pub fn begin(&self, manifest: SyncManifest) -> Result<SyncPlan, EngineError> {
        check_root(&manifest.root)?;
        let l = self.limits;
        if manifest.entries.len() > l.max_entries {
            return Err(invalid(format!("{} entries exceed the limit of {}", manifest.entries.len(), l.max_entries)));
        }
        let mut seen = BTreeSet::new();
        let mut links = BTreeMap::new();
        let mut total = 0u64;
        for e in &manifest.entries {
            let p = check_path(&e.path)?;
            if !seen.insert(p.clone()) {
                return Err(invalid(format!("`{}` appears twice", e.path)));
            }
            if !e.symlink_target.is_empty() {
                links.insert(p, e.symlink_target.clone());
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
            if p.ancestors().skip(1).any(|a| links.contains_key(a)) {
                return Err(invalid(format!("`{}` lies below a symlink", p.display())));
            }
        }
        check_links(&links)?;
        let mut missing = BTreeMap::new();
        for e in manifest.entries.iter().filter(|e| !e.is_dir && e.symlink_target.is_empty()) {
            if !self.has_blob(&e.sha256, e.size) {
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
        if self.has_blob(sha, entry.size) {
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
            // Flushed with the rest of the upload (`flush_blobs`), not here.
            drop(f);
            let got = if offset == 0 { hex::encode(Sha256::digest(data)) } else { hash_file(&partial)? };
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
            .filter(|e| !e.is_dir && e.symlink_target.is_empty() && !self.has_blob(&e.sha256, e.size))
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
        let trees = self.base.join("trees");
        std::fs::create_dir_all(&trees).map_err(EngineError::io_at("creating", &trees))?;
        let trees_dir = confine::Tree::open(&trees).map_err(EngineError::io_at("opening", &trees))?;
        let root = confine::ensure_dir(trees_dir.fd(), OsStr::new(&session.root))
            .map_err(EngineError::io_at("creating", &tree))?;
        let old: BTreeMap<String, Indexed> = std::fs::read(self.index_path(&session.root))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut index = BTreeMap::new();
        let mut report = SyncReport { path: tree.display().to_string(), ..Default::default() };
        // Every write goes through directory handles opened one component
        // at a time without following links (see `confine`): a directory a
        // container swapped for a symlink is replaced, never written through.
        let mut dirs = Dirs { tree: &tree, open: HashMap::from([(PathBuf::new(), root)]) };
        let mut entries: Vec<&SyncEntry> = session.entries.iter().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for e in entries.iter().filter(|e| e.is_dir) {
            dirs.get(Path::new(&e.path))?;
        }
        // Files are written beside their places first, all of them, then
        // made durable by one `syncfs` of the tree's filesystem, then
        // renamed into place: a crash never leaves a renamed file without
        // its data, and one flush costs a fraction of a thousand fsyncs.
        let mut pending: Vec<(&SyncEntry, std::ffi::OsString)> = Vec::new();
        let written = self.write_pending(&tree, &mut dirs, &entries, &old, &mut index, &mut report, &mut pending);
        let written = written.and_then(|()| {
            if pending.is_empty() {
                // Nothing written: nothing to flush.
                return Ok(());
            }
            let root = dirs.get(Path::new(""))?;
            rustix::fs::syncfs(root).map_err(|e| EngineError::io_at("flushing", &tree)(e.into()))
        });
        if let Err(e) = written {
            for (e, tmp) in &pending {
                let parent = Path::new(&e.path).parent().unwrap_or(Path::new(""));
                if let Ok(dir) = dirs.get(parent) {
                    let _ = rustix::fs::unlinkat(dir, tmp.as_os_str(), rustix::fs::AtFlags::empty());
                }
            }
            return Err(e);
        }
        for (i, (e, tmp)) in pending.iter().enumerate() {
            let path = Path::new(&e.path);
            let (parent, name) = (path.parent().unwrap_or(Path::new("")), path.file_name().expect("checked path"));
            let mut placed = confine::replace(dirs.get(parent)?, tmp, name);
            if placed.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
                // The directory was removed since (a container with a
                // writable bind of it), the file written there with it:
                // open it afresh and write the file again, once.
                dirs.forget(parent);
                placed = self.write_one(dirs.get(parent)?, e, name);
            }
            if let Err(err) = placed {
                for (e, tmp) in &pending[i + 1..] {
                    let parent = Path::new(&e.path).parent().unwrap_or(Path::new(""));
                    if let Ok(dir) = dirs.get(parent) {
                        let _ = rustix::fs::unlinkat(dir, tmp.as_os_str(), rustix::fs::AtFlags::empty());
                    }
                }
                return Err(write_error(&tree, path, err));
            }
            report.written += 1;
        }
        // Remove what the manifest no longer lists.
        let listed: BTreeSet<PathBuf> = session.entries.iter().map(|e| PathBuf::from(&e.path)).collect();
        // Every directory the manifest lists or implies.
        let dirs_listed: BTreeSet<PathBuf> = listed.iter().flat_map(|p| p.ancestors().map(Path::to_path_buf)).collect();
        let root = dirs.get(Path::new(""))?;
        report.removed = remove_unlisted(&tree, root, Path::new(""), &listed, &dirs_listed)?;
        let _ = rustix::fs::fsync(root);
        let index_path = self.index_path(&session.root);
        std::fs::create_dir_all(index_path.parent().expect("has parent"))
            .map_err(EngineError::io("creating the index directory"))?;
        let tmp = index_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&index).expect("serializable"))
            .map_err(EngineError::io("writing the index"))?;
        std::fs::rename(&tmp, &index_path).map_err(EngineError::io("writing the index"))?;
        let manifest_path = self.manifest_path(&session.root);
        std::fs::create_dir_all(manifest_path.parent().expect("has parent"))
            .map_err(EngineError::io("creating the manifest directory"))?;
        let files: Vec<FileEntry> = session.entries.iter().map(FileEntry::from).collect();
        let tmp = manifest_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&serde_json::json!({ "files": files })).expect("serializable"))
            .map_err(EngineError::io("writing the manifest"))?;
        std::fs::rename(&tmp, &manifest_path).map_err(EngineError::io("writing the manifest"))?;
        self.sessions.lock().expect("not poisoned").remove(sync_id);
        self.collect_garbage();
        Ok(report)
    }

    /// The first half of [`Self::commit`]: every file and link that is
    /// not already as the manifest says written under a temporary name
    /// beside its place (in `pending`, unsynced); the index filled in.
    #[allow(clippy::too_many_arguments)]
    fn write_pending<'e>(
        &self,
        tree: &Path,
        dirs: &mut Dirs<'_>,
        entries: &[&'e SyncEntry],
        old: &BTreeMap<String, Indexed>,
        index: &mut BTreeMap<String, Indexed>,
        report: &mut SyncReport,
        pending: &mut Vec<(&'e SyncEntry, std::ffi::OsString)>,
    ) -> Result<(), EngineError> {
        for &e in entries.iter().filter(|e| !e.is_dir) {
            let path = Path::new(&e.path);
            let (parent, name) = (path.parent().unwrap_or(Path::new("")), path.file_name().expect("checked path"));
            let mode = if e.symlink_target.is_empty() { confine::file_mode(e.mode) } else { 0o777 };
            let want = Indexed { sha256: e.sha256.clone(), mode, symlink: e.symlink_target.clone() };
            let dir = dirs.get(parent)?;
            // What the last commit wrote, and still so on disk (a container
            // with a writable bind may have changed a mode or a link since).
            let on_disk_ok =
                old.get(&e.path) == Some(&want) && confine::is_as_written(dir, name, mode, &e.symlink_target);
            index.insert(e.path.clone(), want);
            if on_disk_ok {
                report.unchanged += 1;
                continue;
            }
            let blob = self.blobs().join(&e.sha256);
            let write = |dir: BorrowedFd<'_>| {
                if e.symlink_target.is_empty() {
                    let mut src = std::fs::File::open(&blob)?;
                    confine::write_temp(dir, name, &mut src, mode, false)
                } else {
                    confine::temp_symlink(dir, name, &e.symlink_target)
                }
            };
            let mut written = write(dir);
            if written.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
                // The directory was removed while open (a container with a
                // writable bind of it): open it afresh, once.
                dirs.forget(parent);
                written = write(dirs.get(parent)?);
            }
            pending.push((e, written.map_err(|err| write_error(tree, path, err))?));
        }
        Ok(())
    }

    /// Writes one entry in place, durably (the fallback of [`Self::commit`]
    /// for a file whose directory went away between its two halves).
    fn write_one(&self, dir: BorrowedFd<'_>, e: &SyncEntry, name: &OsStr) -> std::io::Result<()> {
        if e.symlink_target.is_empty() {
            let mut src = std::fs::File::open(self.blobs().join(&e.sha256))?;
            confine::write_file(dir, name, &mut src, confine::file_mode(e.mode))
        } else {
            confine::put_symlink(dir, name, &e.symlink_target)
        }
    }

    /// Flushes the blob store to disk (one `syncfs`): called when an upload
    /// ends, so blobs are durable before a tree is written from them. A
    /// blob a crash cut short before that is found by its size and sent
    /// again (see [`Self::has_blob`]).
    pub fn flush_blobs(&self) -> Result<(), EngineError> {
        let blobs = self.blobs();
        let Ok(dir) = std::fs::File::open(&blobs) else { return Ok(()) };
        rustix::fs::syncfs(&dir).map_err(|e| EngineError::io_at("flushing", &blobs)(e.into()))
    }

    /// Drops blobs no tree refers to and no session in progress needs. Only
    /// blobs older than an hour go: another sync may be uploading right now
    /// for a tree it has not committed yet. Uploads abandoned for a day
    /// (`blobs/partial/`) and leftovers in the work directory (a build the
    /// agent did not live to clean up) go too. Run after each commit and when
    /// the agent starts.
    pub fn collect_garbage(&self) {
        let older_than = |m: std::io::Result<std::fs::Metadata>, secs: u64| {
            m.and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > secs)
        };
        let live: BTreeSet<String> = self
            .sessions
            .lock()
            .expect("not poisoned")
            .values()
            .flat_map(|s| s.entries.iter().map(|e| e.sha256.clone()))
            .collect();
        if let Ok(dir) = std::fs::read_dir(self.blobs().join("partial")) {
            for f in dir.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !live.contains(&name) && older_than(f.metadata(), 24 * 3600) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir(self.work_dir()) {
            for f in dir.flatten() {
                // A debootstrap killed mid-way may leave /proc or /sys
                // mounted inside its tree: such a directory is left alone.
                if older_than(f.path().symlink_metadata(), 24 * 3600) && !has_mounts_below(&f.path()) {
                    let _ = std::fs::remove_dir_all(f.path());
                }
            }
        }
        // A plan's scratch tree left by a plan that was cut off.
        if let Ok(dir) = std::fs::read_dir(self.base.join("trees")) {
            for f in dir.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("plan-") && older_than(f.path().symlink_metadata(), 3600) {
                    let _ = self.remove_tree(&name);
                }
            }
        }
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
        // Kept revisions (`revisions/<project>/<n>.json`) keep their files.
        let projects = std::fs::read_dir(self.base.join("revisions")).into_iter().flatten().flatten();
        for f in projects.flat_map(|p| std::fs::read_dir(p.path()).into_iter().flatten().flatten()) {
            if let Ok(b) = std::fs::read(f.path())
                && let Ok(listed) = serde_json::from_slice::<Listed>(&b)
            {
                keep.extend(listed.files.into_iter().map(|e| e.sha256));
            }
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

fn has_mounts_below(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return true };
    mounts.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| Path::new(m).starts_with(dir))
}

/// The tree's directories opened so far during one commit, by relative path.
struct Dirs<'a> {
    tree: &'a Path,
    open: HashMap<PathBuf, OwnedFd>,
}

impl Dirs<'_> {
    /// The handle of directory `rel`, made (root, 0755) where missing and
    /// put in place of anything else found there.
    fn get(&mut self, rel: &Path) -> Result<BorrowedFd<'_>, EngineError> {
        let mut here = PathBuf::new();
        for c in rel.components() {
            let parent = here.clone();
            here.push(c);
            if !self.open.contains_key(&here) {
                let fd = confine::ensure_dir(self.open[&parent].as_fd(), c.as_os_str())
                    .map_err(EngineError::io_at("creating", &self.tree.join(&here)))?;
                self.open.insert(here.clone(), fd);
            }
        }
        Ok(self.open[&here].as_fd())
    }

    /// Drops the handles of `rel` and below (their directories were
    /// removed from under them).
    fn forget(&mut self, rel: &Path) {
        if !rel.as_os_str().is_empty() {
            self.open.retain(|p, _| !p.starts_with(rel));
        }
    }
}

/// Removes, below directory `rel` (open as `dir`), every entry the manifest
/// does not list. Never follows a link: a link is removed as a link.
fn remove_unlisted(
    tree: &Path,
    dir: BorrowedFd<'_>,
    rel: &Path,
    listed: &BTreeSet<PathBuf>,
    implied: &BTreeSet<PathBuf>,
) -> Result<u32, EngineError> {
    let mut removed = 0;
    let io = |p: &Path| {
        let at = tree.join(p);
        move |e: std::io::Error| EngineError::io_at("removing", &at)(e)
    };
    for (name, kind) in confine::entries(dir).map_err(io(rel))? {
        let child = rel.join(&name);
        let is_dir = kind == FileType::Directory;
        // An unlisted directory still holding listed files stays (the
        // manifest implies its parents).
        let keep_dir = is_dir && implied.contains(&child);
        if keep_dir {
            let sub = match rustix::fs::openat(
                dir,
                name.as_os_str(),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(sub) => sub,
                // Gone since it was listed (a container sharing the tree
                // removed it): nothing is left to remove.
                Err(rustix::io::Errno::NOENT) => continue,
                // Swapped for a link or a file since it was listed: it is
                // not the directory the manifest means; removed as what it is.
                Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                    confine::remove_all_at(dir, &name).map_err(io(&child))?;
                    removed += 1;
                    continue;
                }
                Err(e) => return Err(io(&child)(e.into())),
            };
            removed += remove_unlisted(tree, sub.as_fd(), &child, listed, implied)?;
        } else if !listed.contains(&child) {
            confine::remove_all_at(dir, &name).map_err(io(&child))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A file of `tree` that could not be written, and why. Its directory gone
/// between being opened and the file being made means something removes it
/// as fast as the agent makes it: that is the contention
/// [`confine::contended`] names, not a disk fault.
fn write_error(tree: &Path, path: &Path, err: std::io::Error) -> EngineError {
    let err = if err.kind() == std::io::ErrorKind::NotFound {
        confine::contended("its directory keeps being removed while it is being written")
    } else {
        err
    };
    EngineError::io_at("writing", &tree.join(path))(err)
}

fn hash_file(path: &Path) -> Result<String, EngineError> {
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
        // Chains: each link alone stays inside, together they leave.
        let link = |p: &str, t: &str| SyncEntry { path: p.into(), symlink_target: t.into(), ..Default::default() };
        let chains: [&[(&str, &str)]; 4] = [
            &[("d/l", ".."), ("x", "d/l/d/l/d/l/d/l/../../../../../../../../etc")],
            &[("a", "b/c"), ("b/c", ".."), ("x", "a/..")],
            &[("p", "q"), ("q", "p")],
            &[("a/b", "../c"), ("c", "/etc"), ("x", "a/b")],
        ];
        for chain in chains {
            let entries = chain.iter().map(|(p, t)| link(p, t)).collect();
            let e = store.begin(SyncManifest { root: "t".into(), entries }).unwrap_err().to_string();
            assert!(e.contains("outside the tree") || e.contains("too many levels"), "{chain:?}: {e}");
        }
        let inside = vec![link("d/l", ".."), link("x", "d/l/d/l/f"), link("y", "d/l/d"), entry("f", b"x")];
        assert!(store.begin(SyncManifest { root: "t".into(), entries: inside }).is_ok());
        let ok = SyncEntry { path: "d/l".into(), symlink_target: "../x".into(), ..Default::default() };
        assert!(store.begin(SyncManifest { root: "t".into(), entries: vec![ok.clone()] }).is_ok());
        let below = entry("d/l/f", b"x");
        assert!(store.begin(SyncManifest { root: "t".into(), entries: vec![ok, below] }).is_err(), "below a symlink");
        assert!(store.begin(SyncManifest { root: "../t".into(), entries: vec![] }).is_err());
    }

    #[test]
    fn modes_are_normalised() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path(), Limits::default());
        let mut suid = entry("bin/sh", b"#!");
        suid.mode = 0o4755;
        let mut world = entry("w", b"w");
        world.mode = 0o2666;
        let d = SyncEntry { path: "bin".into(), is_dir: true, mode: 0o1777, ..Default::default() };
        let plan = store.begin(SyncManifest { root: "t".into(), entries: vec![suid, world, d] }).unwrap();
        for (sha, data) in [(hex::encode(Sha256::digest(b"#!")), &b"#!"[..]), (hex::encode(Sha256::digest(b"w")), b"w")]
        {
            store.write_chunk(&plan.sync_id, &sha, 0, data).unwrap();
        }
        store.commit(&plan.sync_id).unwrap();
        let mode = |p: &str| std::fs::symlink_metadata(store.tree("t").join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode("bin/sh"), mode("w"), mode("bin")), (0o755, 0o644, 0o755));
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

    #[test]
    fn a_blob_cut_short_is_asked_for_again_and_a_commit_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncStore::new(dir.path(), Limits::default());
        // Two chunks: the blob is hashed from the file, not the last chunk.
        let plan = store.begin(SyncManifest { root: "t".into(), entries: vec![entry("f", b"abcdef")] }).unwrap();
        let sha = plan.missing[0].clone();
        assert!(!store.write_chunk(&plan.sync_id, &sha, 0, b"abc").unwrap());
        assert!(store.write_chunk(&plan.sync_id, &sha, 3, b"def").unwrap());
        store.flush_blobs().unwrap();
        store.commit(&plan.sync_id).unwrap();
        let names: Vec<_> = std::fs::read_dir(store.tree("t")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f"], "only the file, no temporary name left beside it");
        // What a crash before the flush can leave: the blob's name, not
        // all of its bytes. It counts as missing, and is taken again.
        std::fs::write(store.blobs().join(&sha), b"abc").unwrap();
        let plan = store.begin(SyncManifest { root: "u".into(), entries: vec![entry("f", b"abcdef")] }).unwrap();
        assert_eq!(plan.missing, std::slice::from_ref(&sha));
        assert!(store.write_chunk(&plan.sync_id, &sha, 0, b"abcdef").unwrap());
        store.commit(&plan.sync_id).unwrap();
        assert_eq!(std::fs::read(store.tree("u").join("f")).unwrap(), b"abcdef");
    }
}
