//! Backups a controller keeps on this host (`StoreBackup`: `mlopsctl
//! backup --to-host`), taken from another host's stack, and read back for
//! a restore anywhere (`ReadBackup`: `mlopsctl restore --from-host`).
//!
//! A stored backup has the format of every other (`mlops_proto::backup`)
//! and lives where the agent's scheduled ones do, `<state>/backups/
//! <project>/`, unless the operator names another directory. That
//! directory must be root's alone, down from `/` (no link, nothing writable
//! by group or others): backups hold the stack's credentials and are
//! restored as its database's superuser, so no local user may place, swap
//! or read anything in them.
//!
//! The data arrives as the source host exported it; the agent compresses
//! and counts it as it writes (the [`backup::Saver`] the scheduled backups
//! use, so no file is ever held whole in memory), checks each file's sums
//! against the source's, answers each file as written, and renames the
//! partial directory whole only once the controller's manifest
//! says exactly what was written (it is written as
//! `.<name>.stored.partial`: the scheduled backups' clean-up leaves it to
//! age). Anything else (an error, a stream that ends early, the agent
//! stopping) removes the partial directory.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use mlops_proto::backup::{self, DATABASE_FILE, FORMAT, MANIFEST, Manifest, SECRETS};
use mlops_proto::v1::backup_piece::Piece;
use mlops_proto::v1::{BackupBegin, BackupFileChunk, BackupPiece, StoredBackup, StoredFile, TableRows};

use crate::engine::EngineError;

/// The directory backups of every project go into: `dir` (absolute, root's
/// alone; made when `create` and missing) or, empty, `<state>/backups`.
/// Never inside the agent's state (but that) or Docker's data directory
/// (`docker_root`), where containers write volumes as root: the ownership
/// checks cannot tell a container's root from the host's.
pub fn root(state_dir: &Path, docker_root: &Path, dir: &str, create: bool) -> Result<PathBuf, EngineError> {
    let default = state_dir.join("backups");
    if dir.is_empty() || Path::new(dir) == default {
        backup::private_dir(&default).map_err(EngineError::io_at("creating", &default))?;
        return Ok(default);
    }
    let path = Path::new(dir);
    if !path.is_absolute() || path.components().any(|c| !matches!(c, Component::RootDir | Component::Normal(_))) {
        return Err(EngineError::bad_request(
            "dir",
            format!("`{dir}` is not an absolute path without `.` or `..` (a directory on this host)"),
        ));
    }
    for (inside, what) in [(state_dir, "the agent's state directory"), (docker_root, "Docker's data directory")] {
        if path.starts_with(inside) || inside.starts_with(path) {
            return Err(EngineError::bad_request(
                "dir",
                format!("{dir} is in or above {what} ({}): backups are not kept there", inside.display()),
            ));
        }
    }
    let mut here = PathBuf::new();
    for part in path.components() {
        here.push(part);
        only_roots(&here, create)?;
    }
    Ok(path.to_path_buf())
}

/// Checks that `dir` is a directory (not a link) of this process's user
/// that nobody else can write; made (0700) when missing and `create`.
fn only_roots(dir: &Path, create: bool) -> Result<(), EngineError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            match std::fs::create_dir(dir) {
                Ok(()) => backup::set_mode(dir, 0o700).map_err(EngineError::io_at("creating", dir))?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(EngineError::io_at("creating", dir)(e)),
            }
            std::fs::symlink_metadata(dir).map_err(EngineError::io_at("reading", dir))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::NotFound(format!("{} does not exist on this host", dir.display())));
        }
        Err(e) => return Err(EngineError::io_at("reading", dir)(e)),
        Ok(meta) => meta,
    };
    let me = rustix::process::geteuid().as_raw();
    if !meta.file_type().is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(EngineError::bad_request(
            "dir",
            format!(
                "{} is not a directory only the agent's user (uid {me}) can write (it is {}owned by uid {}, mode {:o}): backups are not kept there",
                dir.display(),
                if meta.file_type().is_symlink() { "a link, " } else { "" },
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// A backup being stored: its partial directory, and the files written.
pub struct Store {
    parent: PathBuf,
    partial: PathBuf,
    name: String,
    project: String,
    source_host: String,
    keep: u32,
    secrets_sha256: String,
    written: BTreeMap<String, StoredFile>,
    current: Option<(String, backup::Saver)>,
}

impl Store {
    /// Starts the backup `begin` names (blocking file work): its directory
    /// checked or made, a day-old partial one of a killed run removed, the
    /// secrets written.
    pub fn begin(state_dir: &Path, docker_root: &Path, begin: BackupBegin) -> Result<Store, EngineError> {
        if !backup::is_name(&begin.name) {
            return Err(EngineError::bad_request(
                "begin.name",
                format!("`{}` is not a backup's name (YYYYMMDDTHHMMSSZ-HOST)", begin.name),
            ));
        }
        if begin.source_host.is_empty() {
            return Err(EngineError::bad_request("source_host", "the host the backup was taken from is missing"));
        }
        let parent = root(state_dir, docker_root, &begin.dir, true)?.join(&begin.project);
        only_roots(&parent, true)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for stale in backup::stale_partials(&parent, now as i64, backup::STALE_PARTIAL_SECS) {
            let _ = std::fs::remove_dir_all(&stale);
        }
        if parent.join(&begin.name).exists() {
            return Err(EngineError::bad_request(
                "name",
                format!("{} exists already on this host", parent.join(&begin.name).display()),
            ));
        }
        // `.stored` in its name: the scheduled backups' clean-up removes
        // only its own partial directories at once (see `backups.rs`).
        let partial = parent.join(format!(".{}.stored.partial", begin.name));
        let secrets = begin.secrets.into_iter().collect();
        let manifest = match backup::begin(&partial, &begin.project, &begin.source_host, "", &secrets) {
            Ok(manifest) => manifest,
            Err(e) => {
                // Made by this run (another's would have made it exist).
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    let _ = std::fs::remove_dir_all(&partial);
                }
                return Err(EngineError::io_at("writing the backup in", &partial)(e));
            }
        };
        Ok(Store {
            parent,
            partial,
            name: begin.name,
            project: begin.project,
            source_host: begin.source_host,
            keep: begin.keep,
            secrets_sha256: manifest.secrets_sha256,
            written: BTreeMap::new(),
            current: None,
        })
    }

    /// Where the backup is being written.
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    /// Takes the stream's next piece: `Some` when it completed a file (to
    /// answer) or the whole backup.
    pub async fn piece(&mut self, piece: BackupPiece) -> Result<Option<Step>, EngineError> {
        match piece.piece {
            None | Some(Piece::Begin(_)) => Err(EngineError::bad_request(
                "piece",
                "only the first piece begins a backup; this one is not a part of it",
            )),
            Some(Piece::File(start)) => {
                if let Some((file, _)) = &self.current {
                    return Err(EngineError::bad_request("file", format!("{file} did not end before the next file")));
                }
                if !backup::is_data_file(&start.file) || self.written.contains_key(&start.file) {
                    return Err(EngineError::bad_request(
                        "file",
                        format!("`{}` is not a data file's name, or it came twice", start.file),
                    ));
                }
                let kind = if start.dump { backup::Kind::Dump } else { backup::Kind::Tar };
                let saver = backup::Saver::create(&self.partial, &start.file, kind)
                    .map_err(EngineError::io_at("creating", &self.partial.join(&start.file)))?;
                self.current = Some((start.file, saver));
                Ok(None)
            }
            Some(Piece::Data(data)) => {
                let Some((_, saver)) = &mut self.current else {
                    return Err(EngineError::bad_request("data", "data came before its file was named"));
                };
                if !saver.add(&data).await {
                    // The writer stopped: its error comes with the end.
                    let (file, saver) = self.current.take().expect("a file is open");
                    let path = self.partial.join(&file);
                    return Err(match saver.finish(&file).await {
                        Err(e) => EngineError::io_at("writing", &path)(e),
                        Ok(_) => EngineError::Io {
                            what: format!("writing {}", path.display()),
                            path: path.display().to_string(),
                            source: std::io::Error::other("the file's writer stopped"),
                        },
                    });
                }
                Ok(None)
            }
            Some(Piece::FileEnd(end)) => {
                let Some((file, saver)) = self.current.take() else {
                    return Err(EngineError::bad_request("file_end", "a file ended that was not begun"));
                };
                let path = self.partial.join(&file);
                let saved = saver.finish(&file).await.map_err(EngineError::io_at("writing", &path))?;
                let e = saved.entry;
                if e.sha256 != end.sha256 || e.bytes != end.bytes {
                    return Err(EngineError::bad_request(
                        "data",
                        format!(
                            "{file} arrived damaged: {} bytes with sha256 {}, its source sent {} with {}",
                            e.bytes, e.sha256, end.bytes, end.sha256
                        ),
                    ));
                }
                let tables = saved
                    .tables
                    .into_iter()
                    .flat_map(|(database, tables)| {
                        tables.into_iter().map(move |(table, rows)| TableRows {
                            database: database.clone(),
                            table,
                            rows,
                        })
                    })
                    .collect();
                let stored = StoredFile {
                    file: file.clone(),
                    bytes: e.bytes,
                    sha256: e.sha256,
                    file_bytes: e.file_bytes,
                    file_sha256: e.file_sha256,
                    tables,
                };
                self.written.insert(file, stored.clone());
                Ok(Some(Step::File(stored)))
            }
            Some(Piece::Manifest(json)) => {
                if let Some((file, _)) = &self.current {
                    return Err(EngineError::bad_request(
                        "manifest",
                        format!("{file} did not end before the manifest"),
                    ));
                }
                let manifest: Manifest = serde_json::from_slice(&json)
                    .map_err(|e| EngineError::bad_request("manifest", format!("not a backup's manifest: {e}")))?;
                self.check(&manifest).map_err(|m| EngineError::bad_request("manifest", m))?;
                let (parent, partial, name) = (self.parent.clone(), self.partial.clone(), self.name.clone());
                let (project, host, keep) = (self.project.clone(), self.source_host.clone(), self.keep);
                let done = tokio::task::spawn_blocking(move || {
                    let dir = backup::complete(&parent, &partial, &name, &manifest)
                        .map_err(EngineError::io_at("completing the backup in", &parent))?;
                    let (removed, failed) = backup::prune(&parent, &project, &host, keep as usize, &name);
                    Ok::<_, EngineError>(StoredBackup {
                        dir: dir.display().to_string(),
                        removed: removed.iter().map(|p| p.display().to_string()).collect(),
                        failed,
                    })
                })
                .await
                .map_err(|e| EngineError::io("completing the backup")(std::io::Error::other(e)))??;
                Ok(Some(Step::Done(done)))
            }
        }
    }

    /// Whether `manifest` says exactly what was written: the project and
    /// host, the secrets, every file with its sums (none more, none less),
    /// and the dump's tables as they were counted here.
    fn check(&self, manifest: &Manifest) -> Result<(), String> {
        if manifest.format != FORMAT || manifest.project != self.project || manifest.host != self.source_host {
            return Err(format!(
                "it is of format {}, project `{}`, host `{}`; this backup is of format {FORMAT}, `{}`, `{}`",
                manifest.format, manifest.project, manifest.host, self.project, self.source_host
            ));
        }
        if manifest.secrets_sha256 != self.secrets_sha256 {
            return Err("its secrets' sha256 is not that of the secrets written".into());
        }
        let entries: Vec<_> = manifest.database.iter().map(|d| &d.file).chain(&manifest.volumes).collect();
        let mut named = std::collections::BTreeSet::new();
        for entry in &entries {
            let Some(w) = self.written.get(&entry.file).filter(|_| named.insert(entry.file.as_str())) else {
                return Err(format!("it names {}, which was not written (or names it twice)", entry.file));
            };
            if (w.bytes, &w.sha256, w.file_bytes, &w.file_sha256)
                != (entry.bytes, &entry.sha256, entry.file_bytes, &entry.file_sha256)
            {
                return Err(format!("its sums of {} are not those of the file written", entry.file));
            }
        }
        if let Some(missing) = self.written.keys().find(|f| !named.contains(f.as_str())) {
            return Err(format!("it does not name {missing}, which was written"));
        }
        if let Some(d) = &manifest.database {
            if d.file.file != DATABASE_FILE {
                return Err(format!("its dump is {}, not {DATABASE_FILE}", d.file.file));
            }
            let counted = &self.written[DATABASE_FILE].tables;
            let listed: usize = d.tables.values().map(BTreeMap::len).sum();
            let same = listed == counted.len()
                && counted.iter().all(|t| d.tables.get(&t.database).and_then(|m| m.get(&t.table)) == Some(&t.rows));
            if !same {
                return Err("its tables' rows are not those counted in the dump written".into());
            }
        }
        Ok(())
    }
}

/// What a piece of a stored backup completed.
pub enum Step {
    File(StoredFile),
    Done(StoredBackup),
}

/// A whole backup of `project` in `dir` (as [`root`] takes it): `name`, or
/// the newest for `latest`. Its directory and the files to send: the
/// manifest, the secrets, the files the manifest names.
pub fn find(
    state_dir: &Path,
    docker_root: &Path,
    dir: &str,
    project: &str,
    name: &str,
) -> Result<(PathBuf, Vec<String>), EngineError> {
    let root = root(state_dir, docker_root, dir, false)?;
    let parent = root.join(project);
    if !parent.exists() {
        return Err(EngineError::NotFound(format!(
            "no backup of project `{project}` in {} on this host",
            root.display()
        )));
    }
    only_roots(&parent, false)?;
    let whole = backup::whole_backups(&parent, project);
    let found = match name {
        "latest" => whole.last().cloned(),
        name => whole.iter().find(|n| *n == name).cloned(),
    };
    let Some(name) = found else {
        let there =
            if whole.is_empty() { "there is none".to_string() } else { format!("there are: {}", whole.join(", ")) };
        return Err(EngineError::NotFound(format!(
            "no whole backup `{name}` of project `{project}` in {} on this host; {there}",
            parent.display()
        )));
    };
    let dir = parent.join(&name);
    let text = std::fs::read(dir.join(MANIFEST)).map_err(EngineError::io_at("reading", &dir.join(MANIFEST)))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| EngineError::bad_request("backup", format!("{}: not a backup's manifest: {e}", dir.display())))?;
    let mut files = vec![MANIFEST.to_string(), SECRETS.to_string()];
    for entry in manifest.database.iter().map(|d| &d.file).chain(&manifest.volumes) {
        if !backup::is_data_file(&entry.file) {
            return Err(EngineError::bad_request(
                "backup",
                format!("{}: its manifest names `{}`, not a data file's name", dir.display(), entry.file),
            ));
        }
        files.push(entry.file.clone());
    }
    Ok((dir, files))
}

/// How sending a backup ended.
pub enum Sent {
    /// Every file, this many bytes.
    Whole(u64),
    /// The receiver went away after this many bytes.
    Abandoned(u64),
    /// The agent is stopping.
    Stopped,
}

/// Sends `files` of backup `dir` as chunks to `emit` (blocking; `false`:
/// the receiver is gone), each file opened without following a link, until
/// done, or `stop` says the agent stops.
pub fn send(
    dir: &Path,
    files: &[String],
    mut emit: impl FnMut(BackupFileChunk) -> bool,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Sent, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut total = 0u64;
    for (i, file) in files.iter().enumerate() {
        let path = dir.join(file);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(EngineError::io_at("reading", &path))?;
        let mut first = Some(BackupFileChunk {
            file: file.clone(),
            data: Default::default(),
            dir: if i == 0 { dir.display().to_string() } else { String::new() },
        });
        let mut buf = vec![0u8; mlops_proto::IMAGE_CHUNK];
        loop {
            let n = f.read(&mut buf).map_err(EngineError::io_at("reading", &path))?;
            if n == 0 && first.is_none() {
                break;
            }
            if *stop.borrow() {
                return Ok(Sent::Stopped);
            }
            let mut chunk = first.take().unwrap_or_default();
            chunk.data = buf[..n].to_vec().into();
            total += n as u64;
            if !emit(chunk) {
                return Ok(Sent::Abandoned(total));
            }
            if n == 0 {
                break;
            }
        }
    }
    Ok(Sent::Whole(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_directory_must_be_absolute_and_plain() {
        let state = tempfile::tempdir().unwrap();
        for bad in ["relative/dir", "/a/../b", "../b"] {
            let e = root(state.path(), Path::new("/var/lib/docker"), bad, true).unwrap_err();
            assert!(matches!(e, EngineError::BadRequest { ref field, .. } if field == "dir"), "{bad}: {e}");
        }
    }

    #[test]
    fn never_inside_the_agent_s_state_or_docker_s_data() {
        let state = Path::new("/var/lib/mlops-agent");
        let docker = Path::new("/var/lib/docker");
        for bad in ["/var/lib/docker/volumes/x_data/_data", "/var/lib/mlops-agent/trees", "/var/lib", "/"] {
            let e = root(state, docker, bad, true).unwrap_err();
            assert!(e.to_string().contains("backups are not kept there"), "{bad}: {e}");
        }
    }

    // Each directory of the path, from `/`, is checked as these are.
    #[test]
    fn each_directory_on_the_way_is_the_agent_s_alone_and_no_link() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        backup::set_mode(&open, 0o777).unwrap();
        let e = only_roots(&open, true).unwrap_err();
        assert!(e.to_string().contains("only the agent's user"), "{e}");
        let good = tmp.path().join("good");
        std::fs::create_dir(&good).unwrap();
        backup::set_mode(&good, 0o755).unwrap();
        only_roots(&good, false).unwrap();
        std::os::unix::fs::symlink(&good, tmp.path().join("link")).unwrap();
        let e = only_roots(&tmp.path().join("link"), true).unwrap_err();
        assert!(e.to_string().contains("a link"), "{e}");
        // Reading never makes one; storing makes it 0700.
        let missing = good.join("missing");
        assert!(matches!(only_roots(&missing, false), Err(EngineError::NotFound(_))));
        assert!(!missing.exists());
        only_roots(&missing, true).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&missing).unwrap().permissions().mode() & 0o777, 0o700);
    }

    fn piece(p: Piece) -> BackupPiece {
        BackupPiece { piece: Some(p) }
    }

    /// A store of one dump: begun, the file written and answered with the
    /// sums and rows it holds.
    async fn one_file(state: &Path, name: &str) -> (Store, StoredFile) {
        let begin = BackupBegin {
            project: "shop".into(),
            name: name.into(),
            secrets: [("K".to_string(), "v".to_string())].into(),
            keep: 1,
            source_host: "a".into(),
            ..Default::default()
        };
        let state_dir = state.to_path_buf();
        let docker = Path::new("/var/lib/docker");
        let mut store =
            tokio::task::spawn_blocking(move || Store::begin(&state_dir, docker, begin)).await.unwrap().unwrap();
        let dump = b"\\connect postgres\nCOPY public.t (x) FROM stdin;\n1\n2\n\\.\n".to_vec();
        let start = mlops_proto::v1::BackupFileStart { file: DATABASE_FILE.into(), dump: true };
        assert!(store.piece(piece(Piece::File(start))).await.unwrap().is_none());
        assert!(store.piece(piece(Piece::Data(dump[..9].to_vec().into()))).await.unwrap().is_none());
        assert!(store.piece(piece(Piece::Data(dump[9..].to_vec().into()))).await.unwrap().is_none());
        use sha2::Digest;
        let end = mlops_proto::v1::DataChunk {
            end: true,
            sha256: hex::encode(sha2::Sha256::digest(&dump)),
            bytes: dump.len() as u64,
            ..Default::default()
        };
        let Some(Step::File(file)) = store.piece(piece(Piece::FileEnd(end))).await.unwrap() else {
            panic!("a file's end is answered with the file")
        };
        (store, file)
    }

    fn manifest_of(file: &StoredFile, secrets_sha256: &str) -> Manifest {
        let (_, mut m) = backup::new_manifest("shop", "a", "x", &[("K".to_string(), "v".to_string())].into());
        assert_eq!(m.secrets_sha256, secrets_sha256);
        let entry = backup::FileEntry {
            name: "db".into(),
            file: file.file.clone(),
            bytes: file.bytes,
            sha256: file.sha256.clone(),
            file_bytes: file.file_bytes,
            file_sha256: file.file_sha256.clone(),
        };
        let tables = [("postgres".to_string(), [("public.t".to_string(), 2u64)].into())].into();
        m.database = Some(backup::DatabaseEntry { file: entry, database: "postgres".into(), tables });
        m
    }

    #[tokio::test]
    async fn a_stored_backup_is_renamed_whole_only_with_a_manifest_of_what_was_written() {
        let state = tempfile::tempdir().unwrap();
        let (mut store, file) = one_file(state.path(), "20260101T000000Z-a").await;
        assert_eq!(file.tables, [TableRows { database: "postgres".into(), table: "public.t".into(), rows: 2 }]);
        let good = manifest_of(&file, &store.secrets_sha256.clone());
        // A manifest that says another length, or rows, is refused.
        let mut lying = good.clone();
        lying.database.as_mut().unwrap().file.bytes += 1;
        let mut fewer = good.clone();
        fewer.database.as_mut().unwrap().tables.get_mut("postgres").unwrap().insert("public.t".into(), 1);
        let mut empty = good.clone();
        empty.database = None;
        for bad in [lying, fewer, empty] {
            let json = serde_json::to_vec(&bad).unwrap();
            let e = store.piece(piece(Piece::Manifest(json))).await.err().expect("refused");
            assert!(matches!(e, EngineError::BadRequest { ref field, .. } if field == "manifest"), "{e}");
        }
        assert!(store.partial().exists(), "nothing whole yet");
        let Some(Step::Done(done)) =
            store.piece(piece(Piece::Manifest(serde_json::to_vec(&good).unwrap()))).await.unwrap()
        else {
            panic!("the manifest completes the backup")
        };
        let parent = state.path().join("backups/shop");
        assert_eq!(Path::new(&done.dir), parent.join("20260101T000000Z-a"));
        assert!(!store.partial().exists());
        assert_eq!(backup::whole_backups(&parent, "shop"), ["20260101T000000Z-a"]);

        // The next from the same host, with keep 1, removes it; one with
        // the same name is refused before anything is written.
        let (mut next, file) = one_file(state.path(), "20260102T000000Z-a").await;
        let m = manifest_of(&file, &next.secrets_sha256.clone());
        let Some(Step::Done(done)) = next.piece(piece(Piece::Manifest(serde_json::to_vec(&m).unwrap()))).await.unwrap()
        else {
            panic!("completed")
        };
        assert_eq!(done.removed, [parent.join("20260101T000000Z-a").display().to_string()]);
        let again = BackupBegin {
            project: "shop".into(),
            name: "20260102T000000Z-a".into(),
            source_host: "a".into(),
            ..Default::default()
        };
        assert!(Store::begin(state.path(), Path::new("/var/lib/docker"), again).is_err());

        // Read back: the newest, its manifest and secrets first.
        let docker = Path::new("/var/lib/docker");
        let (dir, files) = find(state.path(), docker, "", "shop", "latest").unwrap();
        assert_eq!(dir, parent.join("20260102T000000Z-a"));
        assert_eq!(files, [MANIFEST, SECRETS, DATABASE_FILE]);
        let e = find(state.path(), docker, "", "shop", "20260101T000000Z-a").unwrap_err();
        assert!(e.to_string().contains("there are: 20260102T000000Z-a"), "{e}");
    }

    #[tokio::test]
    async fn data_that_is_not_what_its_source_sent_is_refused() {
        let state = tempfile::tempdir().unwrap();
        let begin = BackupBegin {
            project: "shop".into(),
            name: "20260101T000000Z-a".into(),
            source_host: "a".into(),
            ..Default::default()
        };
        let mut store = Store::begin(state.path(), Path::new("/var/lib/docker"), begin).unwrap();
        for bad in ["../x", ".hidden.tar.zst", "manifest.json", "volume-.tar.zst"] {
            let start = mlops_proto::v1::BackupFileStart { file: bad.into(), dump: false };
            assert!(store.piece(piece(Piece::File(start))).await.is_err(), "{bad}");
        }
        let start = mlops_proto::v1::BackupFileStart { file: "volume-v.tar.zst".into(), dump: false };
        store.piece(piece(Piece::File(start))).await.unwrap();
        store.piece(piece(Piece::Data(vec![0u8; 1024].into()))).await.unwrap();
        let end = mlops_proto::v1::DataChunk { end: true, sha256: "00".into(), bytes: 1024, ..Default::default() };
        let e = store.piece(piece(Piece::FileEnd(end))).await.err().expect("refused");
        assert!(e.to_string().contains("arrived damaged"), "{e}");
    }
}
