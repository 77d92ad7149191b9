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
}

/// What a [`Saver`] saved.
pub struct Saved {
    /// `name` empty: the caller names what it saved.
    pub entry: FileEntry,
    pub tables: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Saver {
    /// Makes `dir/file` (new, 0600); `dump`: count a `pg_dumpall` script's rows.
    pub fn create(dir: &Path, file: &str, dump: bool) -> std::io::Result<Saver> {
        let sink = Sink::create(&dir.join(file))?;
        Ok(Saver { sink, hasher: Sha256::new(), bytes: 0, tables: dump.then(DumpTables::default) })
    }

    /// Adds the stream's next piece; `false` when the file's writer stopped
    /// (its error comes from [`Saver::finish`]).
    pub async fn add(&mut self, piece: &[u8]) -> bool {
        self.hasher.update(piece);
        self.bytes += piece.len() as u64;
        if let Some(t) = &mut self.tables {
            t.feed(piece);
        }
        self.sink.write(piece.to_vec()).await
    }

    /// The data's length and sha256 so far.
    pub fn sums(&self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.clone().finalize()))
    }

    /// The file complete and flushed; `file` is its name in the entry.
    pub async fn finish(self, file: &str) -> std::io::Result<Saved> {
        let (bytes, sha256) = self.sums();
        let (file_bytes, file_sha256) = self.sink.finish().await?;
        Ok(Saved {
            entry: FileEntry { name: String::new(), file: file.to_string(), bytes, sha256, file_bytes, file_sha256 },
            tables: self.tables.map(|t| t.counts).unwrap_or_default(),
        })
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
            let table: String = rest.split([' ', '(']).next().unwrap_or_default().replace('"', "");
            self.counts.entry(self.database.clone()).or_default().entry(table.clone()).or_default();
            self.copying = Some(table);
        }
    }
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

/// Removes the oldest whole backups of `parent`'s stack taken from `host`
/// beyond `keep` (0: none removed); the directories removed, and why
/// others could not be. Only
/// directories named as [`backup`] names them and holding a manifest count.
pub fn prune(parent: &Path, host: &str, keep: usize) -> (Vec<PathBuf>, Vec<String>) {
    if keep == 0 {
        return (Vec::new(), Vec::new());
    }
    let suffix = format!("-{}", file_safe(host));
    let mut ours: Vec<PathBuf> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.strip_suffix(&suffix).is_some_and(is_stamp) && p.join(MANIFEST).is_file()
        })
        .collect();
    // The names start with the time: their order is the backups'.
    ours.sort();
    let excess = ours.len().saturating_sub(keep);
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for old in ours.into_iter().take(excess) {
        match std::fs::remove_dir_all(&old) {
            Ok(()) => removed.push(old),
            Err(e) => failed.push(format!("cannot remove the old backup {}: {e}", old.display())),
        }
    }
    (removed, failed)
}

/// `YYYYMMDDTHHMMSSZ`.
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
            COPY public.\"Odd\" (x) FROM stdin;\n\\.\n\
            \\connect postgres\nCOPY public.t (x) FROM stdin;\n7\n\\.\nSELECT 1;\n";
        for cut in [1, 3, 7, 64, dump.len()] {
            let mut t = DumpTables::default();
            for piece in dump.as_bytes().chunks(cut) {
                t.feed(piece);
            }
            let airflow = &t.counts["airflow"];
            assert_eq!(airflow["public.dag_run"], 2, "cut {cut}");
            assert_eq!(airflow["public.Odd"], 0);
            assert_eq!(t.counts["postgres"]["public.t"], 1);
            assert!(!t.counts.contains_key("template1"));
        }
    }

    #[test]
    fn connect_lines_name_their_database() {
        assert_eq!(connect_target("-reuse-previous=on \"dbname='air''flow'\""), "air'flow");
        assert_eq!(connect_target("airflow"), "airflow");
        assert_eq!(connect_target("\"my db\""), "my db");
    }

    #[test]
    fn only_whole_backups_of_the_host_are_pruned_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, whole: bool| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            if whole {
                std::fs::write(d.join(MANIFEST), "{}").unwrap();
            }
        };
        for name in ["20261201T000000Z-h1", "20261202T000000Z-h1", "20261203T000000Z-h1", "20261204T000000Z-h1"] {
            make(name, true);
        }
        make("20261130T000000Z-h1", false);
        make("20261101T000000Z-h2", true);
        make("notes-h1", true);
        make(".20261205T000000Z-h1.partial", true);
        let removed = prune(dir.path(), "h1", 2).0;
        let names: Vec<_> = removed.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["20261201T000000Z-h1", "20261202T000000Z-h1"]);
        for kept in
            ["20261203T000000Z-h1", "20261204T000000Z-h1", "20261130T000000Z-h1", "20261101T000000Z-h2", "notes-h1"]
        {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
        assert!(prune(dir.path(), "h1", 0).0.is_empty());
    }

    #[test]
    fn names_carry_the_utc_time() {
        assert_eq!(name(0, "h"), ("19700101T000000Z-h".into(), "1970-01-01T00:00:00Z".into()));
        assert_eq!(name(1_796_644_800, "root@10.0.0.5:22").0, "20261207T120000Z-root_10.0.0.5_22");
        assert_eq!(name(951_782_400, "x").1, "2000-02-29T00:00:00Z");
    }
}
