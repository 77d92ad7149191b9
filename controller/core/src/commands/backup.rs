//! `mlopsctl backup` and `mlopsctl restore`: a running stack's data copied
//! to a directory on this machine, and brought back onto the same host or
//! another one, checked.
//!
//! A backup is a directory `<DIR>/<project>/<UTC time>-<host>/` (0700),
//! on this machine or kept by another host's agent (`--to-host`: the
//! export relayed into its `StoreBackup`, which writes as below):
//! - `database.sql.zst`: `pg_dumpall --clean` of `x-mlops.migrate.database`
//!   (the dump `migrate` streams; each database consistent in itself),
//!   taken while the stack runs.
//! - `volume-<name>.tar.zst`: every other named volume `migrate` moves
//!   (the metrics' with `--with-metrics`), copied live: files as they are
//!   when read (logs, artifacts and a broker's snapshot are written file by
//!   file; a database only ever goes by its dump).
//! - `secrets.json` (0600): the stack's credentials, which the restored
//!   database's roles and the platform's keys need.
//! - `manifest.json`: for each file, the length and sha256 of its data and
//!   of the file, and the rows of every table the dump holds (counted as it
//!   streams by, so they are the dump's own, not a later query's).
//!
//! Everything streams (zstd on a thread of its own, bounded channels): no
//! dump is ever held whole in memory. The directory is written as
//! `.<name>.partial`, each file flushed, then renamed: one without that
//! prefix is whole. `--keep N` then removes the oldest whole backups of
//! the stack from the same host beyond N.
//!
//! A restore checks every file's sha256 before it touches the host, then
//! does what `migrate` does on its new host: the backup's secrets stored
//! there, the stack deployed without its held services and stopped but its
//! database, each volume replaced and the dump restored through psql (again
//! when psql did not read it to its end), each checked by the agent against
//! the manifest's sha256 and length; the tables' row counts compared with
//! the dump's; the whole stack deployed healthy; Airflow's admin login and
//! newest DAG run read through its API. A backup another host keeps
//! (`--from-host`) is first fetched whole (`ReadBackup`) into a private
//! temporary directory of the state directory's.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mlops_proto::backup::{self, DATABASE_FILE, DatabaseEntry, FORMAT, FileEntry, MANIFEST, Manifest, SECRETS};
use mlops_proto::v1::agent_client::AgentClient;
use mlops_proto::v1::{
    BackupBegin, BackupFileChunk, BackupPiece, BackupPlan, BackupScheduleRequest, BackupStored, DataChunk, DataSource,
    ImportDataReply, ReadBackupRequest, backup_piece, backup_stored,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use super::migrate::{self, MigrateOptions, Plan, StepTime};
use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap::{self, Bundle};
use crate::client::AgentConn;
use crate::progress::{Progress, Report, bytes_human};

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub stack: StackOptions,
    /// Default `<state>/backups`; with `to_host`, a directory on that host
    /// (default its agent's `backups/`).
    pub to: Option<PathBuf>,
    /// The inventory host (or `USER@HOST`) that keeps the backup, instead
    /// of this machine.
    pub to_host: Option<String>,
    /// Also the volumes `x-mlops.migrate.optional` names (metrics).
    pub with_metrics: bool,
    /// Whole backups of the stack from this host kept (0: all).
    pub keep: usize,
    /// `EVERY` (`30s`, `15m`, `6h`, `1d`), `off` or `show`: the host's own
    /// schedule instead of a backup now (see [`schedule`]).
    pub schedule: Option<String>,
}

/// A host's backup schedule, as `mlopsctl backup --schedule` set or read it.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleReport {
    pub project: String,
    pub host: String,
    /// Seconds between backups and backups kept; `None`: no schedule.
    pub every_seconds: Option<u64>,
    pub keep: u32,
    /// Where the host keeps them.
    pub dir: String,
    pub next_unix: u64,
    pub last_unix: u64,
    pub taken: u64,
    pub failed: u64,
    pub last_error: String,
    /// The whole backups on the host, oldest first.
    pub kept: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub stack: StackOptions,
    /// A backup's directory; with `from_host`, on that host: its path, its
    /// name in the agent's `backups/`, or `latest`.
    pub from: PathBuf,
    /// The host that keeps the backup.
    pub from_host: Option<String>,
    pub stop_timeout: u32,
    pub health_timeout: u32,
    pub install_docker: bool,
    pub expose: bool,
    pub local_images: bool,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub project: String,
    pub host: String,
    pub dir: PathBuf,
    /// The host whose `dir` it is (`None`: this machine's).
    pub kept_on: Option<String>,
    pub manifest: Manifest,
    pub ms: u64,
    /// Older backups removed by `--keep`.
    pub removed: Vec<PathBuf>,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub project: String,
    pub host: String,
    pub from: PathBuf,
    /// The host `from` is on (`None`: this machine).
    pub from_host: Option<String>,
    pub steps: Vec<StepTime>,
}

/// The one host `--host` or `-i … --limit` names.
fn one_host(setup: &Setup, command: &str) -> Result<mlops_inventory::Target, ControllerError> {
    match setup.targets.as_slice() {
        [one] => Ok(one.clone()),
        many => Err(ControllerError::usage(
            format!("`mlopsctl {command}` acts on one host; {} are selected", many.len()),
            Some("name it with --host USER@HOST, or with -i INVENTORY --limit NAME"),
        )),
    }
}

/// Seconds in `30s`, `15m`, `6h`, `1d` (or a plain number of seconds).
fn parse_every(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = number.parse().ok()?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// `mlopsctl backup --schedule`: sets (`EVERY`, with `--keep`), removes
/// (`off`) or shows (`show`) the selected host's own schedule of backups of
/// the stack, which its agent takes into its state directory
/// (`/var/lib/mlops-agent/backups/PROJECT/`, in this module's format:
/// `restore --from-host` fetches one) and prunes to `--keep`.
pub async fn schedule(
    setup: &Setup,
    opts: &BackupOptions,
    report: Arc<dyn Report>,
) -> Result<ScheduleReport, ControllerError> {
    let project = opts.stack.project(&setup.state)?;
    let host = one_host(setup, "backup")?;
    let what = opts.schedule.clone().unwrap_or_default();
    let mut request = BackupScheduleRequest { project: project.clone(), ..Default::default() };
    match what.as_str() {
        "show" => {}
        "off" => request.remove = true,
        every => {
            let (min, max) = (backup::MIN_EVERY_SECONDS, backup::MAX_EVERY_SECONDS);
            let Some(every_seconds) = parse_every(every).filter(|s| (min..=max).contains(s)) else {
                return Err(ControllerError::usage(
                    format!(
                        "--schedule {every}: not a time between backups from {min} s to a year, nor `off` or `show`"
                    ),
                    Some("write it as 30s, 15m, 6h or 1d"),
                ));
            };
            if opts.keep == 0 {
                return Err(ControllerError::usage(
                    "--schedule needs --keep N: how many backups the host keeps",
                    Some("e.g. --schedule 1d --keep 7"),
                ));
            }
            if opts.to.is_some() || opts.to_host.is_some() {
                return Err(ControllerError::usage(
                    "--to and --to-host say where a backup taken now goes; scheduled backups stay on the host",
                    Some("drop them; `mlopsctl restore --from-host HOST latest` restores the newest the host took"),
                ));
            }
            request.schedule = Some(BackupPlan {
                every_seconds,
                keep: u32::try_from(opts.keep).unwrap_or(u32::MAX),
                ..Default::default()
            });
        }
    }
    let bundles = Bundle::for_targets(&setup.state, std::slice::from_ref(&host))?;
    let progress = Progress::new(Some(report.clone()), &host.name);
    let mut prepared = bootstrap::prepare_host(&host, &setup.ctx, &bundles[&host.name], &progress).await?;
    let reply = async {
        if let Some(schedule) = &mut request.schedule {
            // What to copy, from the stack as the host runs it (its secrets).
            let secrets = crate::secrets::held_by(&mut prepared.conn, &project).await?;
            let model = opts.stack.load_model_with(&setup.state, &crate::progress::Quiet, &secrets)?;
            let plan = Plan::new(&model.stack, &plan_options(&opts.stack, opts.with_metrics), &Default::default())?;
            schedule.database = plan.database.as_ref().map(|d| migrate::dump_source(&project, d));
            schedule.database_name = plan.database.as_ref().map(|d| d.database.clone()).unwrap_or_default();
            schedule.volumes = plan.volumes;
        }
        let reply = prepared.conn.raw().backup_schedule(request).await;
        reply.map_err(|s| ControllerError::from_status(&host.name, "BackupSchedule", &s))
    }
    .await;
    prepared.close().await;
    let reply = reply?.into_inner();
    Ok(ScheduleReport {
        project,
        host: host.name.clone(),
        every_seconds: reply.schedule.as_ref().map(|s| s.every_seconds),
        keep: reply.schedule.as_ref().map_or(0, |s| s.keep),
        dir: reply.dir,
        next_unix: reply.next_unix,
        last_unix: reply.last_unix,
        taken: reply.taken,
        failed: reply.failed,
        last_error: reply.last_error,
        kept: reply.kept,
    })
}

/// Backs up the stack from the one selected host (see the module docs).
pub async fn backup(
    setup: &Setup,
    opts: &BackupOptions,
    report: Arc<dyn Report>,
) -> Result<BackupReport, ControllerError> {
    let started = Instant::now();
    let project = opts.stack.project(&setup.state)?;
    let host = one_host(setup, "backup")?;
    let keeper = opts.to_host.as_deref().map(|spec| setup.host(spec)).transpose()?;
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (name, created) = backup::name(unix as i64, &host.name);
    let mut dest = match &keeper {
        None => {
            let root = opts.to.clone().unwrap_or_else(|| setup.state.path.join("backups"));
            let parent = root.join(&project);
            own_private_dir(&parent)?;
            // What runs killed midway left (a day old: no run of now's).
            for stale in backup::stale_partials(&parent, unix as i64, backup::STALE_PARTIAL_SECS) {
                match std::fs::remove_dir_all(&stale) {
                    Ok(()) => {
                        report.info(&format!("removed {}, left by a backup that did not finish", stale.display()));
                    }
                    Err(e) => report
                        .warn(&format!("cannot remove {}, left by a backup that did not finish: {e}", stale.display())),
                }
            }
            let partial = parent.join(format!(".{name}.partial"));
            Dest::Local { parent, partial, name: name.clone(), keep: opts.keep }
        }
        Some(keeper) => {
            let dir = match &opts.to {
                Some(dir) if !dir.is_absolute() => {
                    return Err(ControllerError::usage(
                        format!(
                            "--to {}: with --to-host it names a directory on that host, by its absolute path",
                            dir.display()
                        ),
                        Some("write it from `/`, or drop --to for the agent's own backups/ directory there"),
                    ));
                }
                Some(dir) => dir.display().to_string(),
                None => String::new(),
            };
            Dest::Host(Box::new(Remote {
                host: keeper.name.clone(),
                client: None,
                begin: BackupBegin {
                    project: project.clone(),
                    name: name.clone(),
                    dir,
                    secrets: Default::default(),
                    keep: u32::try_from(opts.keep).unwrap_or(u32::MAX),
                    source_host: host.name.clone(),
                },
                tx: None,
                replies: None,
            }))
        }
    };

    let targets: Vec<_> = std::iter::once(host.clone()).chain(keeper.clone()).collect();
    let bundles = Bundle::for_targets(&setup.state, &targets)?;
    let progress = Progress::new(Some(report.clone()), &host.name);
    let mut prepared = bootstrap::prepare_host(&host, &setup.ctx, &bundles[&host.name], &progress).await?;
    let mut kept = None;
    let result = async {
        if let (Some(keeper), Dest::Host(remote)) = (&keeper, &mut dest) {
            let progress = Progress::new(Some(report.clone()), &keeper.name);
            let mut p = bootstrap::prepare_host(keeper, &setup.ctx, &bundles[&keeper.name], &progress).await?;
            remote.client = Some(p.conn.raw().clone());
            kept = Some(p);
        }
        let mut manifest =
            take(&mut prepared.conn, &host.name, &project, opts, setup, &mut dest, report.as_ref()).await?;
        manifest.created = created;
        dest.complete(&manifest).await.map(|done| (manifest, done))
    }
    .await;
    dest.discard();
    prepared.close().await;
    if let Some(p) = kept {
        p.close().await;
    }
    let (manifest, (dir, removed, failed)) = result?;
    for why in failed {
        report.warn(&why);
    }
    Ok(BackupReport {
        project,
        host: host.name.clone(),
        dir,
        kept_on: keeper.map(|k| k.name),
        manifest,
        ms: started.elapsed().as_millis() as u64,
        removed,
    })
}

/// Where a backup's files go: a directory on this machine, or another
/// host's agent, which writes them as it would its own (`StoreBackup`).
enum Dest {
    Local { parent: PathBuf, partial: PathBuf, name: String, keep: usize },
    Host(Box<Remote>),
}

/// A backup streaming into another host's agent.
struct Remote {
    host: String,
    client: Option<AgentClient<tonic::transport::Channel>>,
    /// Sent once the secrets are known.
    begin: BackupBegin,
    tx: Option<tokio::sync::mpsc::Sender<BackupPiece>>,
    replies: Option<tonic::Streaming<BackupStored>>,
}

impl Remote {
    /// Sends `piece`; when the agent has ended the stream, its reason.
    async fn send(&mut self, piece: backup_piece::Piece) -> Result<(), ControllerError> {
        let tx = self.tx.as_ref().expect("the backup was begun");
        if tx.send(BackupPiece { piece: Some(piece) }).await.is_ok() {
            return Ok(());
        }
        Err(match self.reply().await {
            Err(e) => e,
            Ok(_) => ControllerError::Local(format!("{}: the agent ended the backup's stream early", self.host)),
        })
    }

    /// The agent's next answer.
    async fn reply(&mut self) -> Result<backup_stored::Stored, ControllerError> {
        let replies = self.replies.as_mut().expect("the backup was begun");
        match replies.message().await {
            Ok(Some(BackupStored { stored: Some(stored) })) => Ok(stored),
            Ok(_) => Err(ControllerError::Local(format!("{}: the agent ended the backup's stream early", self.host))),
            Err(s) => Err(ControllerError::from_status(&self.host, "StoreBackup", &s)),
        }
    }
}

impl Dest {
    /// Starts the backup with the stack's secrets: its manifest to fill in.
    async fn begin(
        &mut self,
        project: &str,
        host: &str,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Manifest, ControllerError> {
        match self {
            Dest::Local { partial, .. } => backup::begin(partial, project, host, crate::VERSION, secrets)
                .map_err(|e| ControllerError::Local(format!("cannot write the backup in {}: {e}", partial.display()))),
            Dest::Host(remote) => {
                remote.begin.secrets = secrets.clone().into_iter().collect();
                // A few pieces in flight: the source sends at the pace the
                // keeping host writes.
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                let begin = BackupPiece { piece: Some(backup_piece::Piece::Begin(remote.begin.clone())) };
                tx.send(begin).await.expect("the receiver is here");
                let client = remote.client.as_mut().expect("connected");
                let replies = client
                    .store_backup(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map_err(|s| ControllerError::from_status(&remote.host, "StoreBackup", &s))?
                    .into_inner();
                (remote.tx, remote.replies) = (Some(tx), Some(replies));
                Ok(backup::new_manifest(project, host, crate::VERSION, secrets).1)
            }
        }
    }

    /// Streams `source` from `host` into the backup's `file`.
    async fn save(
        &mut self,
        conn: &mut AgentConn,
        host: &str,
        source: DataSource,
        file: &str,
        kind: backup::Kind,
    ) -> Result<backup::Saved, ControllerError> {
        match self {
            Dest::Local { partial, .. } => {
                let saved = save(conn, host, source, partial, file, kind).await;
                if saved.is_err() {
                    let _ = std::fs::remove_file(partial.join(file));
                }
                saved
            }
            Dest::Host(remote) => save_remote(conn, host, source, remote, file, kind).await,
        }
    }

    /// The backup made whole with `manifest`: its directory, the older
    /// ones `--keep` removed, and why others could not be.
    async fn complete(&mut self, manifest: &Manifest) -> Result<(PathBuf, Vec<PathBuf>, Vec<String>), ControllerError> {
        match self {
            Dest::Local { parent, partial, name, keep } => {
                let dir = backup::complete(parent, partial, name, manifest).map_err(|e| {
                    ControllerError::Local(format!("cannot write the backup in {}: {e}", parent.display()))
                })?;
                let (removed, failed) = backup::prune(parent, &manifest.project, &manifest.host, *keep, name);
                Ok((dir, removed, failed))
            }
            Dest::Host(remote) => {
                let json = serde_json::to_vec_pretty(manifest).expect("serializable");
                remote.send(backup_piece::Piece::Manifest(json)).await?;
                match remote.reply().await? {
                    backup_stored::Stored::Done(done) => {
                        let failed = done.failed.into_iter().map(|why| format!("{}: {why}", remote.host)).collect();
                        Ok((PathBuf::from(done.dir), done.removed.into_iter().map(PathBuf::from).collect(), failed))
                    }
                    backup_stored::Stored::File(f) => Err(ControllerError::Local(format!(
                        "{}: the agent answered the manifest with a file ({})",
                        remote.host, f.file
                    ))),
                }
            }
        }
    }

    /// What an unfinished backup left: a local partial directory removed;
    /// a stream to another host closed (its agent removes what it wrote).
    fn discard(&mut self) {
        match self {
            Dest::Local { partial, .. } => {
                let _ = std::fs::remove_dir_all(partial);
            }
            Dest::Host(remote) => {
                remote.tx = None;
            }
        }
    }
}

/// Makes `dir` (0700) where backups go, refused unless it is a directory
/// of this user's (not a link): backups hold the stack's secrets and are
/// restored as the database's superuser, so nobody else may place or
/// change what is in it.
fn own_private_dir(dir: &Path) -> Result<(), ControllerError> {
    use std::os::unix::fs::MetadataExt;
    let cannot = |e: std::io::Error| ControllerError::Local(format!("cannot make {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(cannot)?;
    let meta = std::fs::symlink_metadata(dir).map_err(cannot)?;
    // Who runs this (the kernel gives /proc/self to the process's user).
    let me = std::fs::metadata("/proc/self").map_err(cannot)?.uid();
    if !meta.is_dir() || meta.uid() != me {
        return Err(ControllerError::usage(
            format!("{} is not a directory of this user's (uid {me}): backups are not written there", dir.display()),
            Some("name with --to a directory you own, not a link (the default is the state directory's backups/)"),
        ));
    }
    backup::set_mode(dir, 0o700).map_err(cannot)
}

/// Writes the backup's files into `dest`; the manifest, but its creation
/// time.
async fn take(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    opts: &BackupOptions,
    setup: &Setup,
    dest: &mut Dest,
    report: &dyn Report,
) -> Result<Manifest, ControllerError> {
    let services = migrate::status(conn, project).await?;
    if !services.iter().any(|s| s.state == "running") {
        return Err(ControllerError::usage(
            format!("stack `{project}` runs no service on {host}: there is nothing to back up"),
            Some("name the stack with --stack (or --project) as it was deployed, and the host it runs on with --host"),
        ));
    }
    let secrets = crate::secrets::held_by(conn, project).await?;
    let model = opts.stack.load_model_with(&setup.state, &crate::progress::Quiet, &secrets)?;
    let plan = Plan::new(&model.stack, &plan_options(&opts.stack, opts.with_metrics), &Default::default())?;
    if let Some(d) = &plan.database
        && !services.iter().any(|s| s.service == d.service && s.state == "running")
    {
        return Err(ControllerError::usage(
            format!("{host}: the database's service `{}` of stack `{project}` is not running", d.service),
            Some("a backup dumps the database through it: start the stack (`mlopsctl deploy`) and back up again"),
        ));
    }
    let mut manifest = dest.begin(project, host, &secrets).await?;
    if let Some(d) = &plan.database {
        let clock = Instant::now();
        report.info(&format!("{host}: dumping database `{}` (roles included)", d.service));
        let saved = dest.save(conn, host, migrate::dump_source(project, d), DATABASE_FILE, backup::Kind::Dump).await?;
        let (file, tables) = (saved.entry, saved.tables);
        report.info(&format!(
            "{host}: database dumped: {} ({} compressed) in {:.1} s, {} table(s)",
            bytes_human(file.bytes),
            bytes_human(file.file_bytes),
            clock.elapsed().as_secs_f64(),
            tables.get(&d.database).map_or(0, BTreeMap::len)
        ));
        manifest.database = Some(DatabaseEntry {
            file: FileEntry { name: d.service.clone(), ..file },
            database: d.database.clone(),
            tables,
        });
    }
    for volume in &plan.volumes {
        let clock = Instant::now();
        let source =
            DataSource { project: project.to_string(), volume: volume.clone(), live: true, ..Default::default() };
        let file_name = format!("volume-{}.tar.zst", backup::file_safe(volume));
        match dest.save(conn, host, source, &file_name, backup::Kind::Tar).await.map(|s| s.entry) {
            Ok(file) => {
                report.info(&format!(
                    "{host}: volume {volume}: {} ({} compressed) in {:.1} s",
                    bytes_human(file.bytes),
                    bytes_human(file.file_bytes),
                    clock.elapsed().as_secs_f64()
                ));
                manifest.volumes.push(FileEntry { name: volume.clone(), ..file });
            }
            Err(e @ ControllerError::Agent { call: "ExportData", .. })
                if e.failure_kind() == Some(mlops_proto::v1::FailureKind::NotFound) =>
            {
                report.info(&format!("{host}: volume {volume} does not exist there (never used): nothing to copy"));
                manifest.absent.push(volume.clone());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(manifest)
}

/// The options [`Plan`] reads, for a backup or a restore (a plan made
/// for a migration, without one).
fn plan_options(stack: &StackOptions, with_metrics: bool) -> MigrateOptions {
    MigrateOptions {
        stack: stack.clone(),
        from: String::new(),
        to: String::new(),
        dry_run: false,
        decommission: false,
        stop_timeout: 60,
        health_timeout: 300,
        install_docker: true,
        expose: false,
        local_images: true,
        with_metrics,
    }
}

/// Streams `source` from `host` into `dir/file`, zstd-compressed on a
/// thread of its own (a few chunks in flight: the host sends at the pace
/// the disk takes it). The data's sums are checked against the agent's.
async fn save(
    conn: &mut AgentConn,
    host: &str,
    source: DataSource,
    dir: &Path,
    file: &str,
    kind: backup::Kind,
) -> Result<backup::Saved, ControllerError> {
    let cannot = |e: std::io::Error| ControllerError::Local(format!("cannot write {}: {e}", dir.join(file).display()));
    let mut saver = backup::Saver::create(dir, file, kind).map_err(cannot)?;
    let mut stream = migrate::export(conn, host, source).await?;
    let mut end = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| ControllerError::from_status(host, "ExportData", &s))?;
        if !chunk.data.is_empty() && !saver.add(&chunk.data).await {
            break;
        }
        if chunk.end {
            end = Some((chunk.sha256, chunk.bytes));
            break;
        }
    }
    let (bytes, sha256) = saver.sums();
    let saved = saver.finish(file).await.map_err(cannot)?;
    match end {
        Some((sent, length)) if sent == sha256 && length == bytes => Ok(saved),
        Some((sent, length)) => Err(ControllerError::Local(format!(
            "{host}: {file} arrived damaged: {bytes} bytes with sha256 {sha256}, sent {length} with {sent}"
        ))),
        None => Err(ControllerError::Local(format!("{host}: the stream of {file} ended before its end"))),
    }
}

/// Streams `source` from `host` into the backup's `file` on the keeping
/// host: its agent compresses and counts what arrives, checks it against
/// the sums the source sent, and answers with the file as written.
async fn save_remote(
    conn: &mut AgentConn,
    host: &str,
    source: DataSource,
    remote: &mut Remote,
    file: &str,
    kind: backup::Kind,
) -> Result<backup::Saved, ControllerError> {
    use backup_piece::Piece;
    let mut stream = migrate::export(conn, host, source).await?;
    let (mut started, mut end) = (false, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| ControllerError::from_status(host, "ExportData", &s))?;
        // The file is named with its first data: a volume that does not
        // exist fails before it, and leaves nothing on the keeping host.
        if !started {
            let start = mlops_proto::v1::BackupFileStart { file: file.to_string(), dump: kind == backup::Kind::Dump };
            remote.send(Piece::File(start)).await?;
            started = true;
        }
        if chunk.end {
            end = Some(chunk);
            break;
        }
        if !chunk.data.is_empty() {
            remote.send(Piece::Data(chunk.data)).await?;
        }
    }
    let Some(end) = end else {
        return Err(ControllerError::Local(format!("{host}: the stream of {file} ended before its end")));
    };
    let (sha256, bytes) = (end.sha256.clone(), end.bytes);
    remote
        .send(Piece::FileEnd(DataChunk { end: true, sha256: end.sha256, bytes: end.bytes, ..Default::default() }))
        .await?;
    let stored = match remote.reply().await? {
        backup_stored::Stored::File(f) if f.file == file => f,
        _ => {
            return Err(ControllerError::Local(format!(
                "{}: the agent did not answer {file} with the file it wrote",
                remote.host
            )));
        }
    };
    if stored.sha256 != sha256 || stored.bytes != bytes {
        return Err(ControllerError::Local(format!(
            "{}: {file} arrived damaged: {} bytes with sha256 {}, {host} sent {bytes} with {sha256}",
            remote.host, stored.bytes, stored.sha256
        )));
    }
    let mut tables: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for t in stored.tables {
        tables.entry(t.database).or_default().insert(t.table, t.rows);
    }
    Ok(backup::Saved {
        entry: FileEntry {
            name: String::new(),
            file: stored.file,
            bytes: stored.bytes,
            sha256: stored.sha256,
            file_bytes: stored.file_bytes,
            file_sha256: stored.file_sha256,
        },
        tables,
    })
}

/// Reads a backup's manifest and checks every file it names: present, of
/// its length and sha256. `shown` is the backup as errors name it.
fn check_backup(dir: &Path, shown: &Path) -> Result<(Manifest, BTreeMap<String, String>), ControllerError> {
    let damaged = |what: String| {
        ControllerError::usage(
            format!("backup {}: {what}", shown.display()),
            Some("restore from another backup (`ls` the stack's backup directory); this one cannot be trusted"),
        )
    };
    let text = std::fs::read(dir.join(MANIFEST)).map_err(|e| {
        ControllerError::usage(
            format!("{} cannot be read: {e}", dir.join(MANIFEST).display()),
            Some("name a backup's directory, as `mlopsctl backup` printed it"),
        )
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| damaged(format!("{MANIFEST} is not a backup's manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(ControllerError::usage(
            format!("backup {} has format {}; this mlopsctl reads format {FORMAT}", shown.display(), manifest.format),
            Some(&format!("restore it with the mlopsctl that wrote it ({})", manifest.mlopsctl)),
        ));
    }
    let files = manifest.database.iter().map(|d| &d.file).chain(&manifest.volumes);
    for entry in files {
        if entry.file.contains('/') || entry.file.starts_with('.') {
            return Err(damaged(format!("{MANIFEST} names a file outside the backup: {}", entry.file)));
        }
        let path = dir.join(&entry.file);
        let (bytes, sha256) =
            backup::file_sums(&path).map_err(|e| damaged(format!("{} cannot be read: {e}", entry.file)))?;
        if bytes != entry.file_bytes || sha256 != entry.file_sha256 {
            return Err(damaged(format!(
                "{} is damaged: {bytes} bytes with sha256 {sha256}, the manifest says {} with {}",
                entry.file, entry.file_bytes, entry.file_sha256
            )));
        }
    }
    let text = std::fs::read(dir.join(SECRETS)).map_err(|e| damaged(format!("{SECRETS} cannot be read: {e}")))?;
    if hex::encode(Sha256::digest(&text)) != manifest.secrets_sha256 {
        return Err(damaged(format!("{SECRETS} is not the one the manifest names (its sha256 differs)")));
    }
    let secrets =
        serde_json::from_slice(&text).map_err(|e| damaged(format!("{SECRETS} is not the stack's secrets: {e}")))?;
    Ok((manifest, secrets))
}

/// Every table whose rows a dump holds, with its count, one per line:
/// ordinary tables (a partitioned table's rows are its partitions'), each
/// counted alone (`ONLY`: an inheritance parent's own rows), not those of
/// extensions (their `CREATE EXTENSION` fills them).
const DUMPED_ROW_COUNTS: &str = "SELECT n.nspname || '.' || c.relname || ' ' || \
    (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM ONLY %I.%I', n.nspname, c.relname), false, true, '')))[1]::text \
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e WHERE e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass \
    AND e.objid = c.oid AND e.deptype = 'e') ORDER BY 1";

/// Restores a backup onto the one selected host (see the module docs).
pub async fn restore(
    setup: &Setup,
    opts: &RestoreOptions,
    report: Arc<dyn Report>,
) -> Result<RestoreReport, ControllerError> {
    let host = one_host(setup, "restore")?;
    let project = opts.stack.project(&setup.state)?;
    let mut clock = Instant::now();
    // A backup another host keeps is fetched first, whole, into a private
    // directory of this machine's (removed when the restore ends): each of
    // its files is then checked and read as a local backup's are.
    let fetched = match &opts.from_host {
        None => None,
        Some(spec) => Some(fetch(setup, spec, &project, &opts.from, report.clone()).await?),
    };
    let from = fetched.as_ref().map_or(opts.from.clone(), |f| f.tmp.path().to_path_buf());
    let opts = &RestoreOptions { from, ..opts.clone() };
    // The backup as the operator knows it.
    let shown = fetched.as_ref().map_or(opts.from.clone(), |f| f.dir.clone());
    let (manifest, secrets) = check_backup(&opts.from, &shown)?;
    if manifest.project != project {
        return Err(ControllerError::usage(
            format!("backup {} is of stack `{}`, not `{project}`", shown.display(), manifest.project),
            Some(&format!("name the stack it was taken of (--project {})", manifest.project)),
        ));
    }
    let mut out = RestoreReport {
        project: project.clone(),
        host: host.name.clone(),
        from: shown.clone(),
        from_host: fetched.as_ref().map(|f| f.host.clone()),
        steps: Vec::new(),
    };
    if let Some(f) = &fetched {
        lap(&mut out, &mut clock, "fetch", f.detail.clone());
    }
    let model = opts.stack.load_model_with(&setup.state, &crate::progress::Quiet, &secrets)?;
    let migrate_opts = MigrateOptions {
        stop_timeout: opts.stop_timeout,
        health_timeout: opts.health_timeout,
        install_docker: opts.install_docker,
        expose: opts.expose,
        local_images: opts.local_images,
        ..plan_options(&opts.stack, true)
    };
    let plan = Plan::new(&model.stack, &migrate_opts, &secrets.clone().into_iter().collect())?;
    match (&manifest.database, &plan.database) {
        (Some(have), Some(want)) if have.file.name == want.service && have.database == want.database => {}
        (None, None) => {}
        (have, want) => {
            return Err(ControllerError::usage(
                format!(
                    "backup {} holds {} but the stack's database is {}",
                    shown.display(),
                    have.as_ref().map_or("no database".into(), |d| format!("the dump of `{}`", d.file.name)),
                    want.as_ref().map_or("none".into(), |d| format!("`{}`", d.service))
                ),
                Some("restore it with the stack (--stack, --profile, --skip) it was taken of"),
            ));
        }
    }
    if let Some(v) = manifest.volumes.iter().find(|v| !plan.volumes.contains(&v.name)) {
        return Err(ControllerError::usage(
            format!("backup {} holds volume {}, which the stack does not have", shown.display(), v.name),
            Some("restore it with the stack (--stack, --profile, --skip) it was taken of"),
        ));
    }
    let detail = format!(
        "{} file(s) of the backup taken on {} at {}: lengths and sha256 as its manifest says",
        manifest.volumes.len() + usize::from(manifest.database.is_some()),
        manifest.host,
        manifest.created
    );
    lap(&mut out, &mut clock, "check", detail);

    // The host: its agent, the backup's secrets, the stack but its held services.
    let bundles = Bundle::for_targets(&setup.state, std::slice::from_ref(&host))?;
    let progress = Progress::new(Some(report.clone()), &host.name);
    let mut prepared = bootstrap::prepare_host(&host, &setup.ctx, &bundles[&host.name], &progress).await?;
    let held = migrate::hold_secrets(&mut prepared.conn, &host.name, &project, &secrets, "the backup").await;
    prepared.close().await;
    held?;
    let only = setup.only(vec![host.clone()]);
    migrate::deployed(super::deploy::deploy(&only, &plan.deploy_unheld, report.clone()).await?, &host.name)?;
    lap(&mut out, &mut clock, "deploy", format!("stack `{project}` healthy on {} but its held services", host.name));

    let mut conn = migrate::connect(&host, setup).await?;
    let result = restore_data(&mut conn, &host.name, &project, &plan, &manifest, opts, report.as_ref(), &mut out).await;
    conn.close().await;
    if let Err(e) = result {
        // Services were stopped and data may be half replaced: nothing
        // starts on data that did not pass.
        if out.steps.iter().any(|s| s.step == "quiesce") {
            report.warn(&format!(
                "{}: stack `{project}` is left stopped but its database, its data partly restored; run this restore again (or another), or `mlopsctl deploy` to start it as it is",
                host.name
            ));
        }
        return Err(e);
    }
    clock = Instant::now();

    // Everything, healthy; then Airflow's admin and newest run through its API.
    migrate::deployed(super::deploy::deploy(&only, &plan.deploy, report.clone()).await?, &host.name)?;
    let mut checked = vec![format!("stack `{project}` healthy on {}", host.name)];
    if let (Some((af, password)), Some(d)) = (&plan.airflow, &plan.database) {
        let mut conn = migrate::connect(&host, setup).await?;
        let seen = async {
            let last = migrate::sql(&mut conn, &host.name, &project, d, migrate::LAST_RUN).await?;
            migrate::api_check(&mut conn, &host.name, &project, af, password, last.trim()).await
        }
        .await;
        conn.close().await;
        checked.push(format!("{} logs in{}", af.admin_user, seen?));
    }
    lap(&mut out, &mut clock, "start", checked.join("; "));
    Ok(out)
}

/// A backup fetched from the host that keeps it.
struct Fetched {
    /// Where it is on this machine (0700, removed with this).
    tmp: tempfile::TempDir,
    /// The keeping host's name, and the backup's directory there.
    host: String,
    dir: PathBuf,
    detail: String,
}

/// Which backup `--from-host` names with `backup`: the agent's directory
/// (`""`) or another, and a name (or `latest`). An absolute path is a
/// backup's directory as `backup --to-host` printed it: `DIR/PROJECT/NAME`.
fn backup_on_host(backup: &Path, project: &str) -> Result<(String, String), ControllerError> {
    let shown = backup.display().to_string();
    let name = backup.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let usage = |what: String| {
        ControllerError::usage(
            what,
            Some(
                "with --from-host, name the backup as `mlopsctl backup --to-host` printed it, by its name in the host's backups/, or `latest`",
            ),
        )
    };
    if backup.is_absolute() {
        let parent = backup.parent().filter(|p| p.file_name().and_then(|n| n.to_str()) == Some(project));
        let (Some(parent), true) = (parent, backup::is_name(name)) else {
            return Err(usage(format!(
                "{shown} is not the directory of a backup of stack `{project}` (DIR/{project}/NAME)"
            )));
        };
        let root = parent.parent().unwrap_or(Path::new("/"));
        return Ok((root.display().to_string(), name.to_string()));
    }
    if shown == "latest" || (backup::is_name(&shown) && !shown.contains('/')) {
        return Ok((String::new(), shown));
    }
    Err(usage(format!("`{shown}` is neither a backup's name (YYYYMMDDTHHMMSSZ-HOST), `latest`, nor an absolute path")))
}

/// Fetches the backup `backup` of `project` that host `spec` keeps (see
/// [`backup_on_host`]) into a new private directory of the state's.
async fn fetch(
    setup: &Setup,
    spec: &str,
    project: &str,
    backup: &Path,
    report: Arc<dyn Report>,
) -> Result<Fetched, ControllerError> {
    let (dir, name) = backup_on_host(backup, project)?;
    let keeper = setup.host(spec)?;
    let local = |e: std::io::Error| {
        ControllerError::Local(format!("cannot make a directory in {} for the backup: {e}", setup.state.path.display()))
    };
    std::fs::create_dir_all(&setup.state.path).map_err(local)?;
    // What a restore killed midway left (a day old: no restore of now's).
    for entry in std::fs::read_dir(&setup.state.path).into_iter().flatten().flatten() {
        let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        let day = std::time::Duration::from_secs(backup::STALE_PARTIAL_SECS as u64);
        if entry.file_name().to_string_lossy().starts_with(".restore-") && old.is_some_and(|age| age > day) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    // tempfile makes it 0700: the backup holds the stack's secrets.
    let tmp = tempfile::Builder::new().prefix(".restore-").tempdir_in(&setup.state.path).map_err(local)?;
    let bundles = Bundle::for_targets(&setup.state, std::slice::from_ref(&keeper))?;
    let progress = Progress::new(Some(report.clone()), &keeper.name);
    let mut prepared = bootstrap::prepare_host(&keeper, &setup.ctx, &bundles[&keeper.name], &progress).await?;
    let request = ReadBackupRequest { project: project.to_string(), dir, name };
    let result = async {
        let mut stream = prepared
            .conn
            .raw()
            .read_backup(request)
            .await
            .map_err(|s| ControllerError::from_status(&keeper.name, "ReadBackup", &s))?
            .into_inner();
        let (mut there, mut file, mut total, mut files) = (String::new(), None::<tokio::fs::File>, 0u64, Vec::new());
        while let Some(chunk) = stream.next().await {
            let BackupFileChunk { file: name, data, dir } =
                chunk.map_err(|s| ControllerError::from_status(&keeper.name, "ReadBackup", &s))?;
            if !dir.is_empty() {
                there = dir;
            }
            if !name.is_empty() {
                // Only a backup's own files, each once, by name alone.
                if !(name == MANIFEST || name == SECRETS || backup::is_data_file(&name)) || files.contains(&name) {
                    return Err(ControllerError::Local(format!(
                        "{}: the backup's stream names `{name}`, not a file of a backup (or twice)",
                        keeper.name
                    )));
                }
                if let Some(f) = file.take() {
                    f.sync_all().await.map_err(local)?;
                }
                let path = tmp.path().join(&name);
                let f = tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).await;
                file = Some(f.map_err(local)?);
                files.push(name);
            }
            let Some(f) = file.as_mut() else {
                return Err(ControllerError::Local(format!(
                    "{}: the backup's stream sent data before a file",
                    keeper.name
                )));
            };
            tokio::io::AsyncWriteExt::write_all(f, &data).await.map_err(local)?;
            total += data.len() as u64;
        }
        if let Some(f) = file.take() {
            f.sync_all().await.map_err(local)?;
        }
        Ok((there, total, files.len()))
    }
    .await;
    prepared.close().await;
    let (there, total, count) = result?;
    report.info(&format!("{}: fetched backup {there} ({})", keeper.name, bytes_human(total)));
    let detail =
        format!("backup {there} of {} fetched from {}: {count} file(s), {}", project, keeper.name, bytes_human(total));
    Ok(Fetched { tmp, host: keeper.name, dir: PathBuf::from(there), detail })
}

/// Ends a step of a restore: its time since `clock`, which starts again.
fn lap(out: &mut RestoreReport, clock: &mut Instant, step: &str, detail: String) {
    out.steps.push(StepTime { step: step.into(), ms: clock.elapsed().as_millis() as u64, detail });
    *clock = Instant::now();
}

/// The stack stopped but its database, its volumes replaced, the dump
/// restored and its row counts checked.
#[allow(clippy::too_many_arguments)]
async fn restore_data(
    conn: &mut AgentConn,
    host: &str,
    project: &str,
    plan: &Plan,
    manifest: &Manifest,
    opts: &RestoreOptions,
    report: &dyn Report,
    out: &mut RestoreReport,
) -> Result<(), ControllerError> {
    let mut clock = Instant::now();
    let mut all: Vec<String> = plan.hold.iter().chain(&plan.rest).cloned().collect();
    let running = migrate::status(conn, project).await?;
    all.retain(|s| running.iter().any(|r| &r.service == s));
    let waves = plan.waves(&all);
    let stopped = migrate::stop(conn, host, project, Some((&all, waves)), opts.stop_timeout).await?;
    let what = if stopped.is_empty() { "nothing".into() } else { stopped.join(", ") };
    lap(out, &mut clock, "quiesce", format!("stopped on {host}: {what}"));

    let mut total = 0;
    for v in &manifest.volumes {
        report.info(&format!("{host}: restoring volume {} ({})", v.name, bytes_human(v.bytes)));
        let target = DataSource { project: project.to_string(), volume: v.name.clone(), ..Default::default() };
        send_file(conn, host, &opts.from.join(&v.file), v, target).await?;
        total += v.bytes;
    }
    let mut verified = vec![format!("{} volume(s): sha256 and length checked by the agent", manifest.volumes.len())];
    if let (Some(entry), Some(d)) = (&manifest.database, &plan.database) {
        report.info(&format!("{host}: restoring database `{}` ({})", d.service, bytes_human(entry.file.bytes)));
        let (target, marker) = migrate::restore_target(project, d);
        let mut attempt = 1;
        loop {
            let reply = send_file(conn, host, &opts.from.join(&entry.file.file), &entry.file, target.clone()).await?;
            if migrate::restored(report, host, d, &marker, reply, &mut attempt)?.is_some() {
                break;
            }
        }
        total += entry.file.bytes;
        let detail = format!("{} volume(s) and the database, {} restored", manifest.volumes.len(), bytes_human(total));
        lap(out, &mut clock, "transfer", detail);
        // Every database the dump holds rows of (the platform's MLflow too).
        let mut tables = 0;
        for (database, want) in entry.tables.iter().filter(|(db, _)| !db.is_empty()) {
            let in_db = mlops_proto::stack::Database { database: database.clone(), ..d.clone() };
            let listed = migrate::sql(conn, host, project, &in_db, DUMPED_ROW_COUNTS).await?;
            let mut here: BTreeMap<String, u64> = BTreeMap::new();
            for line in listed.lines().filter(|l| !l.trim().is_empty()) {
                let (table, n) = line.rsplit_once(' ').unwrap_or((line, ""));
                here.insert(table.to_string(), n.trim().parse().unwrap_or(u64::MAX));
            }
            let differ: Vec<String> = want
                .keys()
                .chain(here.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .filter(|t| want.get(*t) != here.get(*t))
                .take(10)
                .map(|t| {
                    let show = |n: Option<&u64>| n.map_or("(none)".to_string(), u64::to_string);
                    format!("{t}: {} in the dump, {} on {host}", show(want.get(t)), show(here.get(t)))
                })
                .collect();
            if !differ.is_empty() {
                return Err(ControllerError::Local(format!(
                    "verification failed: the row counts of database `{database}` on {host} differ from the backup's: {}",
                    differ.join("; ")
                )));
            }
            tables += want.len();
        }
        let databases: Vec<&str> = entry.tables.keys().map(String::as_str).filter(|d| !d.is_empty()).collect();
        verified.push(format!(
            "the row counts of {tables} table(s) equal the dump's (database(s) {})",
            databases.join(", ")
        ));
    } else {
        let detail = format!("{} volume(s), {} restored", manifest.volumes.len(), bytes_human(total));
        lap(out, &mut clock, "transfer", detail);
    }
    lap(out, &mut clock, "verify", verified.join("; "));
    Ok(())
}

/// Streams the data of `entry`'s file (decompressed on a thread of its own)
/// into `target` on the host; the end chunk carries the manifest's sha256
/// and length, which the agent checks, and is sent only when what was read
/// matches them too.
async fn send_file(
    conn: &mut AgentConn,
    host: &str,
    path: &Path,
    entry: &FileEntry,
    target: DataSource,
) -> Result<ImportDataReply, ControllerError> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DataChunk { target: Some(target), ..Default::default() }).await.expect("the receiver is here");
    let (path_owned, want) = (path.to_path_buf(), entry.clone());
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut decoder =
            backup::open(&path_owned).map_err(|e| format!("cannot read {}: {e}", path_owned.display()))?;
        let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
        loop {
            let mut buf = vec![0u8; mlops_proto::IMAGE_CHUNK];
            let n =
                read_full(&mut decoder, &mut buf).map_err(|e| format!("{} is damaged: {e}", path_owned.display()))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            bytes += n as u64;
            if tx.blocking_send(DataChunk { data: buf.into(), ..Default::default() }).is_err() {
                return Ok(());
            }
        }
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != want.sha256 || bytes != want.bytes {
            // No end chunk: the import counts for nothing.
            return Err(format!(
                "{} holds {bytes} bytes with sha256 {sha256}, the manifest says {} with {}",
                path_owned.display(),
                want.bytes,
                want.sha256
            ));
        }
        let end = DataChunk { end: true, sha256, bytes, ..Default::default() };
        let _ = tx.blocking_send(end);
        Ok(())
    });
    let reply = conn
        .raw()
        .import_data(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| ControllerError::from_status(host, "ImportData", &s));
    let read = reader.await.map_err(|e| ControllerError::Local(format!("the reading thread failed: {e}")))?;
    // What the file held explains a failed import better than the import.
    read.map_err(|e| ControllerError::Local(format!("restoring onto {host}: {e}")))?;
    reply
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::parse_every;

    #[test]
    fn times_between_backups_read_with_their_unit() {
        assert_eq!(parse_every("30s"), Some(30));
        assert_eq!(parse_every("15m"), Some(900));
        assert_eq!(parse_every("6h"), Some(21_600));
        assert_eq!(parse_every("1d"), Some(86_400));
        assert_eq!(parse_every("45"), Some(45));
        for bad in ["", "d", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_every(bad), None, "{bad}");
        }
    }
}
