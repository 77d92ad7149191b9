//! Backups the agent takes on its own schedule (`BackupSchedule`), so that
//! they run whether or not a controller is connected, on hosts with and
//! without systemd alike.
//!
//! A project's schedule is `<state>/schedules/<project>.json` (what to
//! copy, how often, how many to keep, and how the last runs went). One
//! task, started with the server and stopped by its shutdown signal, wakes
//! when the next backup is due and takes it as `mlopsctl backup` does (the
//! same format, `mlops_proto::backup`): the dump from the database's
//! running service, the volumes copied live, the project's secrets, into
//! `<state>/backups/<project>/`, then removes the oldest beyond `keep`. A
//! backup holds the project's lock like an export; one that finds the lock
//! taken (a deploy) tries again a minute later.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mlops_proto::backup::{self, DATABASE_FILE, DatabaseEntry, FileEntry, Manifest};
use mlops_proto::v1::{BackupPlan, BackupScheduleReply, DataSource};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::engine::lock::Locks;
use crate::engine::{EngineError, docker};
use crate::secrets::SecretStore;

/// How long a backup that found the project locked waits to try again.
const RETRY_LOCKED: u64 = 60;

/// A project's schedule as the agent keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    database_service: String,
    database_command: Vec<String>,
    database_env: BTreeMap<String, String>,
    database_name: String,
    volumes: Vec<String>,
    every_seconds: u64,
    keep: u32,
    next_unix: u64,
    last_unix: u64,
    taken: u64,
    failed: u64,
    last_error: String,
}

impl Record {
    fn plan(&self) -> BackupPlan {
        BackupPlan {
            database: (!self.database_service.is_empty()).then(|| DataSource {
                service: self.database_service.clone(),
                command: self.database_command.clone(),
                env: self.database_env.clone().into_iter().collect(),
                ..Default::default()
            }),
            database_name: self.database_name.clone(),
            volumes: self.volumes.clone(),
            every_seconds: self.every_seconds,
            keep: self.keep,
        }
    }
}

/// The schedules of this host's projects, and the task that runs them.
#[derive(Clone, Debug)]
pub struct Schedules {
    dir: PathBuf,
    backups: PathBuf,
    docker_socket: PathBuf,
    locks: Locks,
    secrets: Arc<SecretStore>,
    /// This host's name, in the backups' names and manifests.
    host: String,
    /// Told when a schedule changes, so the task looks again.
    changed: Arc<tokio::sync::Notify>,
    /// Held by every read-change-write of a schedule file (RPCs and the
    /// task), so none undoes another's.
    edits: Arc<std::sync::Mutex<()>>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Schedules {
    pub fn new(state_dir: &Path, docker_socket: PathBuf, locks: Locks, secrets: Arc<SecretStore>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        Schedules {
            dir: state_dir.join("schedules"),
            backups: state_dir.join("backups"),
            docker_socket,
            locks,
            secrets,
            host,
            changed: Arc::new(tokio::sync::Notify::new()),
            edits: Arc::default(),
        }
    }

    fn path(&self, project: &str) -> PathBuf {
        self.dir.join(format!("{project}.json"))
    }

    fn load(&self, project: &str) -> Result<Option<Record>, EngineError> {
        let path = self.path(project);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| EngineError::io_at("cannot read the schedule", &path)(std::io::Error::other(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io_at("cannot read the schedule", &path)(e)),
        }
    }

    fn save(&self, project: &str, record: &Record) -> Result<(), EngineError> {
        let path = self.path(project);
        // Named per process and call: two writers never share one.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("json.{}.{n}.tmp", std::process::id()));
        let written = (|| {
            backup::private_dir(&self.dir)?;
            let _ = std::fs::remove_file(&tmp);
            backup::write_file(&tmp, &serde_json::to_vec_pretty(record).expect("serializable"))?;
            std::fs::rename(&tmp, &path)
        })();
        written.map_err(EngineError::io_at("cannot write the schedule", &path))
    }

    /// Sets `project`'s schedule (the first backup one interval from now);
    /// `plan` was checked by the caller.
    pub fn set(&self, project: &str, plan: BackupPlan) -> Result<BackupScheduleReply, EngineError> {
        let db = plan.database.unwrap_or_default();
        let edit = self.edits.lock().expect("not poisoned");
        let kept = self.load(project)?.unwrap_or_default();
        let record = Record {
            database_service: db.service,
            database_command: db.command,
            database_env: db.env.into_iter().collect(),
            database_name: plan.database_name,
            volumes: plan.volumes,
            every_seconds: plan.every_seconds,
            keep: plan.keep,
            next_unix: now().saturating_add(plan.every_seconds),
            ..kept
        };
        self.save(project, &record)?;
        drop(edit);
        self.changed.notify_one();
        self.get(project)
    }

    /// Removes `project`'s schedule; its backups stay.
    pub fn remove(&self, project: &str) -> Result<BackupScheduleReply, EngineError> {
        let edit = self.edits.lock().expect("not poisoned");
        match std::fs::remove_file(self.path(project)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::io_at("cannot remove the schedule", &self.path(project))(e)),
        }
        drop(edit);
        self.changed.notify_one();
        self.get(project)
    }

    /// `project`'s schedule (absent when it has none) and its backups.
    pub fn get(&self, project: &str) -> Result<BackupScheduleReply, EngineError> {
        let dir = self.backups.join(project);
        let suffix = format!("-{}", backup::file_safe(&self.host));
        let mut kept: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(backup::MANIFEST).is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(&suffix) && !n.starts_with('.'))
            .collect();
        kept.sort();
        let record = self.load(project)?;
        Ok(BackupScheduleReply {
            schedule: record.as_ref().map(Record::plan),
            dir: dir.display().to_string(),
            next_unix: record.as_ref().map_or(0, |r| r.next_unix),
            last_unix: record.as_ref().map_or(0, |r| r.last_unix),
            taken: record.as_ref().map_or(0, |r| r.taken),
            failed: record.as_ref().map_or(0, |r| r.failed),
            last_error: record.map(|r| r.last_error).unwrap_or_default(),
            kept,
        })
    }

    /// Every project with a schedule.
    fn projects(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Takes the backups that are due until `stop` turns true; a backup
    /// under way when it does is abandoned (its `.partial` directory is
    /// removed by the project's next backup).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let mut next = now() + 300;
            for project in self.projects() {
                let Ok(Some(mut record)) = self.load(&project) else { continue };
                // A clock set back does not postpone backups beyond one interval.
                let due = record.next_unix.min(now().saturating_add(record.every_seconds));
                if due <= now() {
                    let taken = tokio::select! {
                        r = self.take(&project, &record) => r,
                        _ = stop.changed() => return,
                    };
                    // A schedule changed or removed meanwhile wins.
                    let edit = self.edits.lock().expect("not poisoned");
                    let Ok(Some(current)) = self.load(&project) else { continue };
                    if current.every_seconds != record.every_seconds || current.next_unix != record.next_unix {
                        next = next.min(current.next_unix);
                        continue;
                    }
                    record = current;
                    let ended = now();
                    match taken {
                        Ok(name) => {
                            record.taken += 1;
                            record.last_unix = ended;
                            record.last_error = String::new();
                            record.next_unix = ended.saturating_add(record.every_seconds);
                            tracing::info!(project, backup = name, "scheduled backup taken");
                        }
                        Err(Postponed(why)) => {
                            record.last_error = why;
                            record.next_unix = ended.saturating_add(RETRY_LOCKED.min(record.every_seconds));
                        }
                        Err(Failed(why)) => {
                            record.failed += 1;
                            record.last_unix = ended;
                            tracing::warn!(project, error = why, "scheduled backup failed");
                            record.last_error = why;
                            record.next_unix = ended.saturating_add(record.every_seconds);
                        }
                    }
                    if let Err(e) = self.save(&project, &record) {
                        tracing::warn!(project, error = %e, "cannot record the scheduled backup");
                    }
                    drop(edit);
                    next = next.min(record.next_unix);
                } else {
                    next = next.min(due);
                }
            }
            let wait = Duration::from_secs(next.saturating_sub(now()).max(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One backup of `project`: its directory's name.
    async fn take(&self, project: &str, record: &Record) -> Result<String, Outcome> {
        let _guard =
            self.locks.acquire(project, "a scheduled backup").map_err(|e| Postponed(format!("postponed: {e}")))?;
        let parent = self.backups.join(project);
        // What an agent stopped or killed mid-backup left: its own at once
        // (the lock says no other scheduled backup of the project runs),
        // others once a day old (a backup another host's controller is
        // storing here, `stored.rs`, holds no lock and may be under way).
        let own = backup::file_safe(&self.host);
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let inner = name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")).unwrap_or_default();
            if backup::is_name(inner) && inner.get(17..) == Some(own.as_str()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        for stale in backup::stale_partials(&parent, now() as i64, backup::STALE_PARTIAL_SECS) {
            let _ = std::fs::remove_dir_all(stale);
        }
        let (name, created) = backup::name(now() as i64, &self.host);
        let partial = parent.join(format!(".{name}.partial"));
        let result = self.write(project, record, &parent, &partial).await;
        let mut manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(Failed(e));
            }
        };
        manifest.created = created;
        // Flushes and removals of whole trees: off the agent's one thread.
        let (host, keep, p) = (self.host.clone(), record.keep as usize, project.to_string());
        let finished = tokio::task::spawn_blocking(move || {
            if let Err(e) = backup::complete(&parent, &partial, &name, &manifest) {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(Failed(format!("cannot write the backup in {}: {e}", parent.display())));
            }
            let (_, failed) = backup::prune(&parent, &p, &host, keep, &name);
            for why in failed {
                tracing::warn!(project = p, error = why, "cannot prune");
            }
            Ok(name)
        });
        finished.await.map_err(|e| Failed(format!("the backup's last step failed: {e}")))?
    }

    /// The backup's files in `partial` (made here); its manifest but the time.
    async fn write(&self, project: &str, record: &Record, parent: &Path, partial: &Path) -> Result<Manifest, String> {
        backup::private_dir(parent).map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
        let secrets = self.secrets.get(project).map_err(|e| e.to_string())?;
        let mut manifest = backup::begin(partial, project, &self.host, crate::VERSION, &secrets)
            .map_err(|e| format!("cannot write the backup in {}: {e}", partial.display()))?;
        let docker = docker::connect(&self.docker_socket).await.map_err(|e| e.to_string())?;
        if !record.database_service.is_empty() {
            let dump = crate::engine::volumes::exec_out(
                &docker,
                project,
                &record.database_service,
                record.database_command.clone(),
                &record.database_env,
            )
            .await
            .map_err(|e| format!("the dump in `{}`: {e}", record.database_service))?;
            let saved = save(dump, partial, DATABASE_FILE, backup::Kind::Dump).await?;
            manifest.database = Some(DatabaseEntry {
                file: FileEntry { name: record.database_service.clone(), ..saved.entry },
                database: record.database_name.clone(),
                tables: saved.tables,
            });
        }
        for volume in &record.volumes {
            let file = format!("volume-{}.tar.zst", backup::file_safe(volume));
            let data = match crate::engine::volumes::export(&docker, project, volume, true).await {
                Ok(data) => data,
                Err(EngineError::NotFound(_)) => {
                    manifest.absent.push(volume.clone());
                    continue;
                }
                Err(e) => return Err(format!("volume {volume}: {e}")),
            };
            let saved = save(data, partial, &file, backup::Kind::Tar).await?;
            manifest.volumes.push(FileEntry { name: volume.clone(), ..saved.entry });
        }
        Ok(manifest)
    }
}

/// Why a scheduled backup was not taken.
enum Outcome {
    /// The project was locked: tried again soon, not counted as failed.
    Postponed(String),
    Failed(String),
}
use Outcome::{Failed, Postponed};

/// Saves a stream into `dir/file` (see [`backup::Saver`]).
async fn save<S>(data: S, dir: &Path, file: &str, kind: backup::Kind) -> Result<backup::Saved, String>
where
    S: tokio_stream::Stream<Item = Result<bytes::Bytes, EngineError>>,
{
    let mut data = std::pin::pin!(data);
    let cannot = |e: std::io::Error| format!("cannot write {file}: {e}");
    let mut saver = backup::Saver::create(dir, file, kind).map_err(cannot)?;
    while let Some(piece) = data.next().await {
        let piece = piece.map_err(|e| format!("{file}: {e}"))?;
        if !saver.add(&piece).await {
            break;
        }
    }
    saver.finish(file).await.map_err(cannot)
}
