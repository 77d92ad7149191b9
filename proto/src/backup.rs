//! What a backup is, for the controller (`mlopsctl backup`, `restore`)
//! and the agent (its scheduled backups) alike: the manifest's format, the
//! directory's names and how it becomes whole, the row counts read from a
//! dump as it streams by, the zstd file a stream is written into, and the
//! pruning to a retention count.
//!
//! A backup is a directory `<PROJECT>/<UTC time>-<host>/` (0700) of
//! `database.sql.zst` (a `pg_dumpall` script), `volume-<name>.tar.zst`
//! (volumes as the agent's exports stream them), `secrets.json` (0600) and
//! `manifest.json`, written as `.<name>.partial` and renamed once whole.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's format; a restore refuses others.
pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const SECRETS: &str = "secrets.json";
pub const DATABASE_FILE: &str = "database.sql.zst";
/// The longest time between two scheduled backups: a year (and no sum
/// with the time of day can overflow).
pub const MAX_EVERY_SECONDS: u64 = 366 * 86_400;
/// The shortest time between two scheduled backups.
pub const MIN_EVERY_SECONDS: u64 = 10;
/// zstd's level: about as fast as the network a dump crosses.
const LEVEL: i32 = 3;

/// What a backup's `manifest.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub project: String,
    /// The inventory name of the host it was taken from.
    pub host: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub mlopsctl: String,
    pub database: Option<DatabaseEntry>,
    pub volumes: Vec<FileEntry>,
    /// Volumes the stack declares that did not exist on the host (never
    /// used): nothing to copy.
    #[serde(default)]
    pub absent: Vec<String>,
    /// The sha256 of `secrets.json`.
    #[serde(default)]
    pub secrets_sha256: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FileEntry {
    /// A volume's Docker name (the database: its service).
    pub name: String,
    pub file: String,
    /// The data: what the agent sent, and a restore sends back.
    pub bytes: u64,
    pub sha256: String,
    /// The compressed file.
    pub file_bytes: u64,
    pub file_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseEntry {
    #[serde(flatten)]
    pub file: FileEntry,
    /// The database the checks run in (`x-mlops.migrate.database.database`).
    pub database: String,
    /// Per database, per `schema.table`: the rows the dump holds.
    pub tables: BTreeMap<String, BTreeMap<String, u64>>,
}

/// A backup's directory name: `YYYYMMDDTHHMMSSZ-<host>` for `unix_secs`,
/// and the time in RFC 3339 for its manifest.
pub fn name(unix_secs: i64, host: &str) -> (String, String) {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs % 3600 / 60, secs % 60);
    (
        format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z-{}", file_safe(host)),
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    )
}

/// The civil date of a day since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A name for a path: the characters a file name keeps, others as `_`.
pub fn file_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

/// A zstd file being written from a stream's pieces, on a thread of its
/// own (a few pieces in flight), with the length and sha256 of the file.
struct Sink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<std::io::Result<(u64, String)>>,
}

impl Sink {
    /// Makes `path` (new, 0600).
    fn create(path: &Path) -> std::io::Result<Sink> {
        use std::os::unix::fs::OpenOptionsExt;
        let output = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let writer = tokio::task::spawn_blocking(move || {
            let mut encoder = zstd::Encoder::new(Summed::new(std::io::BufWriter::new(output)), LEVEL)?;
            while let Some(piece) = rx.blocking_recv() {
                encoder.write_all(&piece)?;
            }
            let (inner, bytes, sha256) = encoder.finish()?.done();
            inner.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
            Ok((bytes, sha256))
        });
        Ok(Sink { tx, writer })
    }

    /// Adds a piece; `false` when the writer stopped (its error comes from
    /// [`Sink::finish`]).
    async fn write(&self, piece: Vec<u8>) -> bool {
        self.tx.send(piece).await.is_ok()
    }

    /// The file complete and flushed: its length and sha256.
    async fn finish(self) -> std::io::Result<(u64, String)> {
        drop(self.tx);
        self.writer.await.map_err(std::io::Error::other)?
    }
}

/// A stream's data saved into a backup's file: the data's length and
/// sha256 (and, for a dump, its tables' rows) as it passes, the file's
/// when it is complete.
pub struct Saver {
    sink: Sink,
    hasher: Sha256,
    bytes: u64,
    tables: Option<DumpTables>,
    tar: Option<TarCheck>,
}

/// What a backup's file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `pg_dumpall` script: its tables' rows are counted.
    Dump,
    /// A volume's tar: it must be whole (every entry's bytes, then the
    /// end-of-archive blocks), as a live copy can end early when a file
    /// shrinks while it is read.
    Tar,
}

/// What a [`Saver`] saved.
pub struct Saved {
    /// `name` empty: the caller names what it saved.
    pub entry: FileEntry,
    pub tables: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Saver {
    /// Makes `dir/file` (new, 0600) for data of `kind`.
    pub fn create(dir: &Path, file: &str, kind: Kind) -> std::io::Result<Saver> {
        let sink = Sink::create(&dir.join(file))?;
        Ok(Saver {
            sink,
            hasher: Sha256::new(),
            bytes: 0,
            tables: (kind == Kind::Dump).then(DumpTables::default),
            tar: (kind == Kind::Tar).then(TarCheck::default),
        })
    }

    /// Adds the stream's next piece; `false` when the file's writer stopped
    /// (its error comes from [`Saver::finish`]).
    pub async fn add(&mut self, piece: &[u8]) -> bool {
        self.hasher.update(piece);
        self.bytes += piece.len() as u64;
        if let Some(t) = &mut self.tables {
            t.feed(piece);
        }
        if let Some(t) = &mut self.tar {
            t.feed(piece);
        }
        self.sink.write(piece.to_vec()).await
    }

    /// The data's length and sha256 so far.
    pub fn sums(&self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.clone().finalize()))
    }

    /// The file complete and flushed; `file` is its name in the entry. An
    /// error too when a tar is not whole.
    pub async fn finish(self, file: &str) -> std::io::Result<Saved> {
        let (bytes, sha256) = self.sums();
        let whole = self.tar.as_ref().map_or(Ok(()), TarCheck::whole);
        let (file_bytes, file_sha256) = self.sink.finish().await?;
        whole.map_err(|e| std::io::Error::other(format!("{file} is not a whole archive: {e}")))?;
        Ok(Saved {
            entry: FileEntry { name: String::new(), file: file.to_string(), bytes, sha256, file_bytes, file_sha256 },
            tables: self.tables.map(|t| t.counts).unwrap_or_default(),
        })
    }
}

/// Follows a tar stream's headers as it passes: where each entry's data
/// ends, and whether the two zero blocks that end an archive came.
#[derive(Debug, Default)]
struct TarCheck {
    /// Bytes of the current block seen so far (a header is read whole).
    block: Vec<u8>,
    /// Bytes of entry data (and its padding) still to come.
    skip: u64,
    /// Zero blocks in a row where a header was expected.
    zeros: u32,
    /// An error in a header, kept for [`TarCheck::whole`].
    broken: Option<String>,
}

impl TarCheck {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.broken.is_none() {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (512 - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.block.len() == 512 {
                let block = std::mem::take(&mut self.block);
                self.header(&block);
            }
        }
    }

    fn header(&mut self, block: &[u8]) {
        if block.iter().all(|&b| b == 0) {
            self.zeros += 1;
            return;
        }
        if self.zeros >= 2 {
            return; // Past the end: what follows is not read by tar.
        }
        if self.zeros == 1 {
            self.broken = Some("a lone zero block inside the archive".into());
            return;
        }
        let stored: u64 = block[148..156]
            .iter()
            .skip_while(|&&b| b == b' ')
            .take_while(|&&b| b != 0 && b != b' ')
            .try_fold(0u64, |n, &b| (b'0'..=b'7').contains(&b).then(|| n * 8 + u64::from(b - b'0')))
            .unwrap_or(u64::MAX);
        let sum: u64 =
            block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        if stored != sum {
            self.broken = Some("a header's checksum does not match".into());
            return;
        }
        let size = &block[124..136];
        let size = if size[0] & 0x80 != 0 {
            // GNU base-256.
            size[1..].iter().fold(0u64, |n, &b| n.saturating_mul(256).saturating_add(u64::from(b)))
        } else {
            size.iter()
                .skip_while(|&&b| b == b' ')
                .take_while(|&&b| (b'0'..=b'7').contains(&b))
                .fold(0u64, |n, &b| n.saturating_mul(8).saturating_add(u64::from(b - b'0')))
        };
        // Links, directories and devices have no data whatever the field says.
        let has_data = matches!(block[156], b'0' | 0 | b'7' | b'x' | b'g' | b'L' | b'K');
        self.skip = if has_data { size.div_ceil(512).saturating_mul(512) } else { 0 };
    }

    fn whole(&self) -> Result<(), String> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.skip > 0 || !self.block.is_empty() && self.zeros < 2 {
            return Err("it ends inside an entry".into());
        }
        if self.zeros < 2 {
            return Err("it ends without the end-of-archive blocks".into());
        }
        Ok(())
    }
}

/// The data of a backup's file, decompressed as it is read.
pub fn open(path: &Path) -> std::io::Result<impl Read + use<>> {
    zstd::Decoder::new(std::fs::File::open(path)?)
}

/// A writer that counts and hashes what passes through it.
struct Summed<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Summed<W> {
    fn new(inner: W) -> Self {
        Summed { inner, hasher: Sha256::new(), bytes: 0 }
    }

    fn done(mut self) -> (W, u64, String) {
        let _ = self.inner.flush();
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The rows of each table a plain `pg_dumpall` script holds, counted as it
/// streams by: in the text format of `COPY … FROM stdin;` each row is one
/// line (newlines inside values are escaped) until a line `\.`. Only a
/// line's beginning is kept, so a long row costs no memory.
#[derive(Debug, Default)]
pub struct DumpTables {
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    database: String,
    /// The table whose rows are being read.
    copying: Option<String>,
    /// The current line's first bytes.
    line: Vec<u8>,
}

/// A line's bytes kept by [`DumpTables`]: enough for any `COPY` or
/// `\connect` line it reads.
const LINE_KEPT: usize = 4096;

impl DumpTables {
    pub fn feed(&mut self, mut data: &[u8]) {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            self.keep(&data[..i]);
            let line = std::mem::take(&mut self.line);
            self.line_done(&line);
            data = &data[i + 1..];
        }
        self.keep(data);
    }

    fn keep(&mut self, part: &[u8]) {
        let room = LINE_KEPT.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn line_done(&mut self, line: &[u8]) {
        if let Some(table) = &self.copying {
            if line == b"\\." {
                self.copying = None;
            } else {
                *self.counts.entry(self.database.clone()).or_default().entry(table.clone()).or_default() += 1;
            }
            return;
        }
        let line = String::from_utf8_lossy(line);
        if let Some(rest) = line.strip_prefix("\\connect ") {
            self.database = connect_target(rest);
        } else if let Some(rest) = line.strip_prefix("COPY ")
            && line.ends_with(" FROM stdin;")
        {
            let table = qualified_name(rest);
            self.counts.entry(self.database.clone()).or_default().entry(table.clone()).or_default();
            self.copying = Some(table);
        }
    }
}

/// The `schema.table` a dump's `COPY` line begins with, identifiers
/// unquoted as PostgreSQL reads them (`"my ""odd"" table"`).
fn qualified_name(text: &str) -> String {
    let (mut name, mut quoted, mut chars) = (String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                name.push('"');
            }
            '"' => quoted = !quoted,
            ' ' | '(' if !quoted => break,
            c => name.push(c),
        }
    }
    name
}

/// The database a dump's `\connect` line names: `-reuse-previous=on
/// "dbname='airflow'"` (pg_dumpall 12 and later) or `airflow`.
fn connect_target(rest: &str) -> String {
    if let Some((_, after)) = rest.split_once("dbname='") {
        let mut name = String::new();
        let mut chars = after.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => name.extend(chars.next()),
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    name.push('\'');
                }
                '\'' => break,
                c => name.push(c),
            }
        }
        return name;
    }
    match rest.trim().strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or_default().to_string(),
        None => rest.split_whitespace().last().unwrap_or_default().to_string(),
    }
}

pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A new file (0600), flushed to disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Starts a backup in `partial` (made here, 0700): `secrets.json` (0600)
/// written; the manifest to fill in, its secrets' sha256 set.
pub fn begin(
    partial: &Path,
    project: &str,
    host: &str,
    version: &str,
    secrets: &BTreeMap<String, String>,
) -> std::io::Result<Manifest> {
    std::fs::create_dir(partial)?;
    set_mode(partial, 0o700)?;
    let (json, manifest) = new_manifest(project, host, version, secrets);
    write_file(&partial.join(SECRETS), &json)?;
    Ok(manifest)
}

/// A backup's `secrets.json` for `secrets`, and its manifest to fill in
/// (the secrets' sha256 set).
pub fn new_manifest(
    project: &str,
    host: &str,
    version: &str,
    secrets: &BTreeMap<String, String>,
) -> (Vec<u8>, Manifest) {
    let json = serde_json::to_vec_pretty(secrets).expect("serializable");
    let manifest = Manifest {
        format: FORMAT,
        project: project.to_string(),
        host: host.to_string(),
        created: String::new(),
        mlopsctl: version.to_string(),
        database: None,
        volumes: Vec::new(),
        absent: Vec::new(),
        secrets_sha256: hex::encode(Sha256::digest(&json)),
    };
    (json, manifest)
}

/// Whether `name` is a backup directory's name as [`name`] makes it.
pub fn is_name(name: &str) -> bool {
    let host = name.get(17..).unwrap_or_default();
    name.get(..16).is_some_and(is_stamp)
        && name.as_bytes().get(16) == Some(&b'-')
        && !host.is_empty()
        && host == file_safe(host)
}

/// Whether `file` is the name of a data file a backup holds: the dump, or
/// a volume's archive (never the manifest, the secrets, or a hidden file).
pub fn is_data_file(file: &str) -> bool {
    file == DATABASE_FILE
        || file
            .strip_prefix("volume-")
            .and_then(|v| v.strip_suffix(".tar.zst"))
            .is_some_and(|v| !v.is_empty() && !v.starts_with('.') && v == file_safe(v))
}

/// The whole backups of `project` in `parent` (named as [`name`] names
/// them, with a manifest of this format saying they are the project's),
/// oldest first.
pub fn whole_backups(parent: &Path, project: &str) -> Vec<String> {
    let ours_by_manifest = |p: &Path| {
        std::fs::read(p.join(MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
            .is_some_and(|m| m.format == FORMAT && m.project == project)
    };
    let mut ours: Vec<String> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_name(n) && ours_by_manifest(&parent.join(n)))
        .collect();
    // The names start with the time: their order is the backups'.
    ours.sort();
    ours
}

/// Makes the whole backup `partial` (its files written) the backup `name`
/// in `parent`: its manifest written, everything flushed, renamed.
pub fn complete(parent: &Path, partial: &Path, name: &str, manifest: &Manifest) -> std::io::Result<PathBuf> {
    write_file(&partial.join(MANIFEST), &serde_json::to_vec_pretty(manifest).expect("serializable"))?;
    sync_dir(partial)?;
    let dir = parent.join(name);
    std::fs::rename(partial, &dir)?;
    sync_dir(parent)?;
    Ok(dir)
}

/// A new directory (0700), and its parents.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)
}

/// Removes the oldest whole backups of `project` in `parent` taken from
/// `host` beyond `keep` (0: none removed), never `newest` (the one just
/// taken, whatever the clock said); the directories removed, and why
/// others could not be. Only directories named as [`name`] names them,
/// whose manifest says they are this project's, count.
pub fn prune(parent: &Path, project: &str, host: &str, keep: usize, newest: &str) -> (Vec<PathBuf>, Vec<String>) {
    if keep == 0 {
        return (Vec::new(), Vec::new());
    }
    let host = file_safe(host);
    let ours: Vec<PathBuf> = whole_backups(parent, project)
        .into_iter()
        .filter(|n| n != newest && n.get(17..) == Some(host.as_str()))
        .map(|n| parent.join(n))
        .collect();
    let excess = (ours.len() + 1).saturating_sub(keep);
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for old in ours.into_iter().take(excess) {
        match std::fs::remove_dir_all(&old) {
            Ok(()) => removed.push(old),
            Err(e) => failed.push(format!("cannot remove the old backup {}: {e}", old.display())),
        }
    }
    (removed, failed)
}

/// How long a `.<name>.partial` directory may have been under way before
/// a later backup takes it for one a killed run left (no backup streams
/// that long; one of a run still going is younger).
pub const STALE_PARTIAL_SECS: i64 = 24 * 3600;

/// The `.<name>.partial` directories in `parent` whose name's time is more
/// than `older_than` seconds before `now_unix`: what runs killed midway
/// left. Names that are not a backup's are never listed.
pub fn stale_partials(parent: &Path, now_unix: i64, older_than: i64) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")) else { return false };
            inner.get(..16).filter(|s| is_stamp(s)).and_then(stamp_unix).is_some_and(|t| t < now_unix - older_than)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `YYYYMMDDTHHMMSSZ` as Unix seconds.
fn stamp_unix(s: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(9..11)?, n(11..13)?, n(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Howard Hinnant's days_from_civil, the inverse of civil_from_days.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn is_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b.iter().enumerate().all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit())
}

/// A file's length and sha256.
pub fn file_sums(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let (mut hasher, mut bytes, mut buf) = (Sha256::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((bytes, hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_s_rows_are_counted_per_database_and_table_across_chunks() {
        let dump = "--\n\\connect template1\n\\connect -reuse-previous=on \"dbname='airflow'\"\n\
            CREATE TABLE public.dag_run (id integer);\n\
            COPY public.dag_run (id, dag_id) FROM stdin;\n1\tetl\n2\tetl\\nwith a newline\n\\.\n\
            COPY public.\"Odd \"\"one\"\"\" (x) FROM stdin;\n\\.\n\
            \\connect postgres\nCOPY public.t (x) FROM stdin;\n7\n\\.\nSELECT 1;\n";
        for cut in [1, 3, 7, 64, dump.len()] {
            let mut t = DumpTables::default();
            for piece in dump.as_bytes().chunks(cut) {
                t.feed(piece);
            }
            let airflow = &t.counts["airflow"];
            assert_eq!(airflow["public.dag_run"], 2, "cut {cut}");
            assert_eq!(airflow["public.Odd \"one\""], 0);
            assert_eq!(t.counts["postgres"]["public.t"], 1);
            assert!(!t.counts.contains_key("template1"));
        }
    }

    #[test]
    fn names_and_data_files_are_only_what_a_backup_writes() {
        assert!(is_name(&name(1_700_000_000, "web-1.example").0));
        for bad in ["20260101T000000Z-", "20260101T000000Z", "20260101T000000Z-a/b", "x0260101T000000Z-a", "..", ""] {
            assert!(!is_name(bad), "{bad}");
        }
        assert!(is_data_file(DATABASE_FILE) && is_data_file("volume-shop_files.tar.zst"));
        for bad in [MANIFEST, SECRETS, "volume-.tar.zst", "volume-..tar.zst", "volume-a/b.tar.zst", ".x", "x.tar.zst"] {
            assert!(!is_data_file(bad), "{bad}");
        }
    }

    #[test]
    fn connect_lines_name_their_database() {
        assert_eq!(connect_target("-reuse-previous=on \"dbname='air''flow'\""), "air'flow");
        assert_eq!(connect_target("airflow"), "airflow");
        assert_eq!(connect_target("\"my db\""), "my db");
    }

    #[test]
    fn only_whole_backups_of_the_project_and_host_are_pruned_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, project: Option<&str>| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            if let Some(project) = project {
                let m = Manifest {
                    format: FORMAT,
                    project: project.into(),
                    host: String::new(),
                    created: String::new(),
                    mlopsctl: String::new(),
                    database: None,
                    volumes: Vec::new(),
                    absent: Vec::new(),
                    secrets_sha256: String::new(),
                };
                std::fs::write(d.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
            }
        };
        for name in ["20261201T000000Z-h1", "20261202T000000Z-h1", "20261203T000000Z-h1", "20261204T000000Z-h1"] {
            make(name, Some("p"));
        }
        // The one just taken, after the clock went back: never removed.
        make("20201231T000000Z-h1", Some("p"));
        make("20261130T000000Z-h1", None);
        make("20261129T000000Z-h1", Some("other"));
        std::fs::create_dir(dir.path().join("20261128T000000Z-h1")).unwrap();
        std::fs::write(dir.path().join("20261128T000000Z-h1").join(MANIFEST), "{}").unwrap();
        make("20261101T000000Z-h2", Some("p"));
        make("notes-h1", Some("p"));
        make(".20261205T000000Z-h1.partial", Some("p"));
        let removed = prune(dir.path(), "p", "h1", 3, "20201231T000000Z-h1").0;
        let names: Vec<_> = removed.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["20261201T000000Z-h1", "20261202T000000Z-h1"]);
        for kept in [
            "20201231T000000Z-h1",
            "20261203T000000Z-h1",
            "20261204T000000Z-h1",
            "20261130T000000Z-h1",
            "20261129T000000Z-h1",
            "20261128T000000Z-h1",
            "20261101T000000Z-h2",
            "notes-h1",
        ] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
        assert!(prune(dir.path(), "p", "h1", 0, "").0.is_empty());
    }

    /// A tar made by the `tar` crate's rules (ustar headers), whole and cut.
    fn tar_of(files: &[(&str, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, size) in files {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(b"0000644");
            h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            out.extend_from_slice(&h);
            out.extend(std::iter::repeat_n(b'x', *size));
            out.extend(std::iter::repeat_n(0, size.div_ceil(512) * 512 - size));
        }
        out.extend([0u8; 1024]);
        out
    }

    #[test]
    fn a_tar_is_whole_only_with_every_entry_and_its_end() {
        let whole = tar_of(&[("a", 3), ("b", 1024), ("c", 0), ("d", 700)]);
        for cut in [1, 100, 512, 4096, whole.len()] {
            let mut t = TarCheck::default();
            for piece in whole.chunks(cut) {
                t.feed(piece);
            }
            assert_eq!(t.whole(), Ok(()), "cut {cut}");
        }
        for end in [whole.len() - 512, whole.len() - 1024, 512 + 100, 600, 0] {
            let mut t = TarCheck::default();
            t.feed(&whole[..end]);
            assert!(t.whole().is_err(), "ended at {end}");
        }
        let mut damaged = whole;
        damaged[513 + 512] ^= 1; // b's name
        let mut t = TarCheck::default();
        t.feed(&damaged);
        assert!(t.whole().is_err());
    }

    #[test]
    fn names_carry_the_utc_time() {
        assert_eq!(name(0, "h"), ("19700101T000000Z-h".into(), "1970-01-01T00:00:00Z".into()));
        assert_eq!(name(1_796_644_800, "root@10.0.0.5:22").0, "20261207T120000Z-root_10.0.0.5_22");
        assert_eq!(name(951_782_400, "x").1, "2000-02-29T00:00:00Z");
    }

    #[test]
    fn stale_partials_are_old_backup_names_only() {
        for t in [0, 951_782_400, 1_796_644_800, 4_102_444_799] {
            assert_eq!(stamp_unix(&name(t, "h").0[..16]), Some(t), "{t}");
        }
        let dir = tempfile::tempdir().unwrap();
        let now = 1_796_644_800; // 2026-12-07T12:00:00Z
        for n in [
            ".20261205T000000Z-h.partial", // two and a half days old
            ".20261207T110000Z-h.partial", // an hour old: perhaps still running
            ".20261205T000000Z-h",         // not a partial
            ".notes.partial",              // not a backup's name
            "20261205T000000Z-h",          // a whole backup
        ] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        let stale = stale_partials(dir.path(), now, STALE_PARTIAL_SECS);
        assert_eq!(stale, vec![dir.path().join(".20261205T000000Z-h.partial")]);
    }
}
