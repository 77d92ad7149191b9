//! Directory handles that cannot leave their tree.
//!
//! A synced tree is written by root but its contents come from people the
//! agent does not trust (DAG authors), and parts of it may be bind-mounted
//! writable into containers, which can swap a directory for a symlink at any
//! moment. So nothing here resolves a path string afresh: every operation
//! starts from an open directory handle and moves one component at a time.
//!
//! - Writing ([`ensure_dir`], [`write_file`], [`put_symlink`], their halves
//!   [`write_temp`], [`temp_symlink`] and [`replace`], and
//!   [`remove_all_at`]) never follows a symlink: each component is opened
//!   with `O_NOFOLLOW`, a symlink where a directory should be is replaced,
//!   and a handle already open keeps pointing at the directory it opened even
//!   if that directory is moved away meanwhile.
//! - Reading for builds and resolving bind sources ([`Tree::open_beneath`],
//!   [`Tree::real_path`]) follows symlinks only while they stay beneath the
//!   tree: Linux `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, or, on
//!   kernels before 5.6, the same rule walked by hand from the tree's handle
//!   (a `..` is a pop of the agent's own stack of handles, never an
//!   `openat("..")`, so it cannot climb above the tree either).
//!
//! Modes are the agent's, not the sender's: see [`file_mode`].

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// How many symlinks one resolution may follow (Linux's own limit).
const MAX_HOPS: usize = 40;

/// How deep a walk goes. Trees bind-mounted writable can be made arbitrarily
/// deep by a container; the walks here recurse, so they stop (with an
/// error) well before the stack would run out.
pub const MAX_DEPTH: usize = 256;

/// Flags for opening something to read that may turn out not to be a
/// regular file: a FIFO must not block the agent, a terminal must not
/// become its controlling one. Callers check the type with `fstat`.
pub const READ_ANY: OFlags = OFlags::RDONLY.union(OFlags::NONBLOCK).union(OFlags::NOCTTY);

fn too_deep(at: &OsStr) -> io::Error {
    io::Error::other(format!("`{}`: directories nested deeper than {MAX_DEPTH}", at.to_string_lossy()))
}

/// The mode the agent writes for a file sent with `mode`: 0755 when any
/// execute bit was set, 0644 otherwise. Setuid, setgid and sticky bits and
/// group or world write are never written.
pub fn file_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 { 0o755 } else { 0o644 }
}

/// Every directory of a tree: 0755, owned by root.
pub const DIR_MODE: u32 = 0o755;

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

fn escape(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("{what} leads outside the tree"))
}

/// Something (a container with a writable bind of this part of the tree)
/// replaces a directory as fast as the agent makes or opens it: the write
/// gives up rather than race on. Its own error type, not an error kind (the
/// kernel's EBUSY is another matter), is how the caller tells it from a
/// failing disk (see [`is_contended`]).
pub fn contended(what: &str) -> io::Error {
    io::Error::other(Contended(format!("{what} (a container with a writable bind of it?)")))
}

/// Whether `e` is a write that lost to something changing the tree under it.
pub fn is_contended(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Contended>())
}

#[derive(Debug)]
struct Contended(String);

impl std::fmt::Display for Contended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Contended {}

/// An open tree root.
#[derive(Debug)]
pub struct Tree {
    fd: OwnedFd,
    path: PathBuf,
}

impl Tree {
    /// Opens the directory at `path` (its last component must not be a
    /// symlink; the path up to it is the agent's own, root-owned).
    pub fn open(path: &Path) -> io::Result<Tree> {
        let fd = rustix::fs::open(path, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(errno)?;
        Ok(Tree { fd, path: path.to_path_buf() })
    }

    /// Where the tree is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` (relative to the tree) with `flags`, following symlinks
    /// only while they stay beneath the tree. An absolute `rel`, a `..` above
    /// the root, or a link that leads out is refused.
    pub fn open_beneath(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        if rel.is_absolute() {
            return Err(escape(&format!("`{}`", rel.display())));
        }
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        for _ in 0..8 {
            match rustix::fs::openat2(&self.fd, rel, flags | OFlags::CLOEXEC, Mode::empty(), resolve) {
                Ok(fd) => return Ok(fd),
                Err(rustix::io::Errno::XDEV) => return Err(escape(&format!("`{}`", rel.display()))),
                Err(rustix::io::Errno::NOSYS) => return open_beneath_by_hand(self.fd.as_fd(), rel, flags),
                // A rename somewhere in the tree during a `..`: try again.
                Err(rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
        Err(contended(&format!("`{}` keeps changing while it is being opened", rel.display())))
    }

    /// The host path `rel` resolves to, with every symlink followed and the
    /// result checked to lie in the tree: what a bind mount may be given.
    pub fn real_path(&self, rel: &Path) -> io::Result<PathBuf> {
        let fd = self.open_beneath(rel, OFlags::PATH)?;
        let real = fd_path(fd.as_fd())?;
        let root = fd_path(self.fd.as_fd())?;
        if !real.starts_with(&root) {
            return Err(escape(&format!("`{}`", rel.display())));
        }
        Ok(real)
    }

    /// A directory beneath this tree, as a tree of its own (build contexts).
    pub fn subtree(&self, rel: &Path) -> io::Result<Tree> {
        let fd = self.open_beneath(rel, OFlags::DIRECTORY | OFlags::RDONLY)?;
        let path = fd_path(fd.as_fd())?;
        Ok(Tree { fd, path })
    }

    /// Reads the file at `rel` (beneath the tree), at most `limit` bytes.
    pub fn read(&self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let fd = self.open_beneath(rel, READ_ANY)?;
        let file = std::fs::File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{}` is not a file", rel.display())));
        }
        let mut out = Vec::new();
        file.take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("`{}` is larger than {limit} bytes", rel.display()),
            ));
        }
        Ok(out)
    }
}

/// The path the kernel has for an open handle.
fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `openat2(RESOLVE_BENEATH)` for kernels without it: one component at a
/// time from the root handle, links read and their components queued.
fn open_beneath_by_hand(root: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut queue: VecDeque<OsString> = components(rel)?;
    let mut hops = 0;
    loop {
        let Some(name) = queue.pop_front() else {
            // The path ended on a directory (or was `.`): open it as asked.
            let dir = stack.last().map_or(root, |d| d.as_fd());
            return rustix::fs::openat(dir, ".", flags | OFlags::CLOEXEC, Mode::empty()).map_err(errno);
        };
        if name == ".." {
            if stack.pop().is_none() {
                return Err(escape(&format!("`{}`", rel.display())));
            }
            continue;
        }
        let dir = stack.last().map_or(root, |d| d.as_fd());
        let last = queue.is_empty();
        let open_flags = if last { flags } else { OFlags::DIRECTORY | OFlags::RDONLY };
        match rustix::fs::openat(dir, name.as_os_str(), open_flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        {
            Ok(fd) if last => {
                // O_PATH|O_NOFOLLOW opens a symlink itself: follow it here.
                if flags.contains(OFlags::PATH) && is_symlink(fd.as_fd()) {
                    drop(fd);
                } else {
                    return Ok(fd);
                }
            }
            Ok(fd) => {
                stack.push(fd);
                continue;
            }
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {}
            Err(e) => return Err(errno(e)),
        }
        // A symlink (or a file where a directory was expected).
        let target = match rustix::fs::readlinkat(dir, name.as_os_str(), Vec::new()) {
            Ok(t) => OsString::from_vec(t.into_bytes()),
            Err(rustix::io::Errno::INVAL) => return Err(errno(rustix::io::Errno::NOTDIR)),
            Err(e) => return Err(errno(e)),
        };
        hops += 1;
        if hops > MAX_HOPS {
            return Err(errno(rustix::io::Errno::LOOP));
        }
        if Path::new(&target).is_absolute() {
            return Err(escape(&format!("`{}`", rel.display())));
        }
        for c in components(Path::new(&target))?.into_iter().rev() {
            queue.push_front(c);
        }
    }
}

fn is_symlink(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink)
}

/// The components of a relative path (`.` dropped, `..` kept).
fn components(p: &Path) -> io::Result<VecDeque<OsString>> {
    let mut out = VecDeque::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push_back(n.to_os_string()),
            Component::ParentDir => out.push_back("..".into()),
            Component::CurDir => {}
            _ => return Err(escape(&format!("`{}`", p.display()))),
        }
    }
    Ok(out)
}

/// What is at `name` in `dir`, without following a symlink.
fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(FileType::from_raw_mode(s.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

/// Whether `name` in `dir` is, without following it, what a commit wrote:
/// a regular file with `mode` (when `link` is empty) or a symlink to `link`.
pub fn is_as_written(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, link: &str) -> bool {
    let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else { return false };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile if link.is_empty() => st.st_mode & 0o7777 == mode,
        FileType::Symlink if !link.is_empty() => {
            rustix::fs::readlinkat(dir, name, Vec::new()).is_ok_and(|t| t.as_bytes() == link.as_bytes())
        }
        _ => false,
    }
}

/// Opens directory `name` in `dir`, creating it, or replacing whatever
/// else is there (a symlink, a file), then sets it to root 0755.
pub fn ensure_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for _ in 0..3 {
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => {
                normalise(fd.as_fd(), DIR_MODE)?;
                return Ok(fd);
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => remove_all_at(dir, name)?,
            Err(e) => return Err(errno(e)),
        }
        match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(errno(e)),
        }
    }
    // Something keeps replacing the directory as fast as it is made.
    Err(contended(&format!("`{}` keeps changing while it is being created", name.to_string_lossy())))
}

/// Mode `mode`, owner root (when the agent is root), on an open handle.
fn normalise(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    if st.st_mode & 0o7777 != mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(errno)?;
    }
    if rustix::process::geteuid().is_root() && (st.st_uid != 0 || st.st_gid != 0) {
        rustix::fs::fchown(fd, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT)).map_err(errno)?;
    }
    Ok(())
}

/// A temporary name beside `name` that nobody can guess.
fn temp_name(name: &OsStr) -> OsString {
    let mut random = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty());
    let mut t = OsString::from(".mlops-tmp.");
    t.push(hex::encode(random));
    t.push(".");
    // Long names would overflow NAME_MAX with the prefix.
    let bytes = name.as_bytes();
    t.push(OsStr::from_bytes(&bytes[..bytes.len().min(200)]));
    t
}

/// The agent's directory for temporary files, `dir`: made when missing,
/// refused unless it is a real directory owned by the agent's user; set to
/// 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let fd =
        rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).map_err(errno)?;
    let st = rustix::fs::fstat(&fd).map_err(errno)?;
    if st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is owned by uid {}, not by the agent", dir.display(), st.st_uid),
        ));
    }
    if st.st_mode & 0o7777 != 0o700 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(errno)?;
    }
    Ok(())
}

/// A new directory `<prefix>.<random>` in the private directory `parent`
/// (see [`private_dir`]), created with `mkdir`, which fails rather than
/// reuse anything already there.
pub fn fresh_dir(parent: &Path, prefix: &str) -> io::Result<PathBuf> {
    private_dir(parent)?;
    let mut random = [0u8; 12];
    rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty()).map_err(errno)?;
    let dir = parent.join(format!("{prefix}.{}", hex::encode(random)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Writes `name` in `dir` from `contents`: a fresh file (`O_EXCL`, never
/// following a link) with `mode`, fsynced, then renamed over whatever was
/// there (a directory there is removed first).
pub fn write_file(dir: BorrowedFd<'_>, name: &OsStr, contents: &mut dyn Read, mode: u32) -> io::Result<()> {
    let tmp = write_temp(dir, name, contents, mode, true)?;
    replace(dir, &tmp, name)
}

/// The first half of [`write_file`]: `contents` in a fresh file with an
/// unguessable name beside `name` (`O_EXCL`, never following a link), its
/// name returned; fsynced only with `sync` (a caller writing many files
/// flushes them all at once with `syncfs` before it renames them into
/// place with [`replace`]).
pub fn write_temp(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    contents: &mut dyn Read,
    mode: u32,
    sync: bool,
) -> io::Result<OsString> {
    let tmp = temp_name(name);
    let fd = rustix::fs::openat(
        dir,
        tmp.as_os_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(errno)?;
    let mut file = std::fs::File::from(fd);
    let written = io::copy(contents, &mut file)
        .and_then(|_| file.flush())
        .and_then(|()| normalise(file.as_fd(), mode))
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) });
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(dir, tmp.as_os_str(), AtFlags::empty());
        return Err(e);
    }
    Ok(tmp)
}

/// Makes `name` in `dir` a symlink to `target` (by rename, so atomically).
pub fn put_symlink(dir: BorrowedFd<'_>, name: &OsStr, target: &str) -> io::Result<()> {
    let tmp = temp_symlink(dir, name, target)?;
    replace(dir, &tmp, name)
}

/// The first half of [`put_symlink`]: the link under an unguessable name
/// beside `name`, returned.
pub fn temp_symlink(dir: BorrowedFd<'_>, name: &OsStr, target: &str) -> io::Result<OsString> {
    let tmp = temp_name(name);
    rustix::fs::symlinkat(target, dir, tmp.as_os_str()).map_err(errno)?;
    Ok(tmp)
}

/// Renames `tmp` (made by [`write_temp`] or [`temp_symlink`]) over `name`
/// in `dir` (a directory there is removed first); `tmp` is removed when
/// the rename fails.
pub fn replace(dir: BorrowedFd<'_>, tmp: &OsStr, name: &OsStr) -> io::Result<()> {
    if kind_at(dir, name)? == Some(FileType::Directory) {
        remove_all_at(dir, name)?;
    }
    rustix::fs::renameat(dir, tmp, dir, name).map_err(|e| {
        let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
        errno(e)
    })
}

/// Removes `name` in `dir` and, if it is a directory, everything below it,
/// without following any symlink.
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove_all_at_depth(dir, name, 0)
}

fn remove_all_at_depth(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(too_deep(name));
    }
    match rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(sub) => {
            for (child, _) in entries(sub.as_fd())? {
                remove_all_at_depth(sub.as_fd(), &child, depth + 1)?;
            }
            match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(errno(e)),
            }
        }
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(errno(e)),
            }
        }
        Err(e) => Err(errno(e)),
    }
}

/// The entries of an open directory (without `.` and `..`), with their
/// kind as seen without following links.
pub fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<(OsString, FileType)>> {
    let mut out = Vec::new();
    let listing = rustix::fs::Dir::read_from(dir).map_err(errno)?;
    for entry in listing {
        let entry = entry.map_err(errno)?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::Unknown => kind_at(dir, name)?.unwrap_or(FileType::Unknown),
            k => k,
        };
        out.push((name.to_os_string(), kind));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contention_is_told_from_the_kernel_s_busy() {
        assert!(is_contended(&contended("`x` keeps changing")));
        assert!(!is_contended(&io::Error::from(io::ErrorKind::ResourceBusy)));
        assert!(!is_contended(&io::Error::other("keeps changing")));
    }
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/f"), b"inside").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        symlink("..", root.join("d/up")).unwrap();
        symlink("d/up/d/up/../secret", root.join("chain")).unwrap();
        symlink("e/f", root.join("d/ok")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../secret", root.join("out")).unwrap();
        let tree = Tree::open(&root).unwrap();
        (dir, tree)
    }

    #[test]
    fn reads_follow_links_only_beneath() {
        for by_hand in [false, true] {
            let (_dir, tree) = setup();
            let read = |rel: &str| -> io::Result<Vec<u8>> {
                let fd = if by_hand {
                    open_beneath_by_hand(tree.fd(), Path::new(rel), OFlags::RDONLY)?
                } else {
                    tree.open_beneath(Path::new(rel), OFlags::RDONLY)?
                };
                let mut out = Vec::new();
                std::fs::File::from(fd).read_to_end(&mut out)?;
                Ok(out)
            };
            assert_eq!(read("d/ok").unwrap(), b"inside", "by hand: {by_hand}");
            assert_eq!(read("d/up/d/e/f").unwrap(), b"inside", "by hand: {by_hand}");
            for bad in ["chain", "abs/passwd", "out", "../secret", "d/../../secret", "d/up/../secret"] {
                assert!(read(bad).is_err(), "{bad} by hand: {by_hand}");
            }
        }
    }

    #[test]
    fn real_path_stays_in_the_tree() {
        let (dir, tree) = setup();
        let real = tree.real_path(Path::new("d/up/d/e")).unwrap();
        assert_eq!(real, std::fs::canonicalize(dir.path().join("tree/d/e")).unwrap());
        assert!(tree.real_path(Path::new("out")).is_err());
        assert!(tree.real_path(Path::new("/etc")).is_err());
    }

    #[test]
    fn writes_never_follow_links() {
        let (dir, tree) = setup();
        // A directory swapped for a link to the outside is replaced, and
        // the outside is untouched.
        let outside = dir.path().join("victim");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        symlink(&outside, dir.path().join("tree/swapped")).unwrap();
        let sub = ensure_dir(tree.fd(), OsStr::new("swapped")).unwrap();
        write_file(sub.as_fd(), OsStr::new("keep"), &mut &b"new"[..], 0o644).unwrap();
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"x");
        assert_eq!(std::fs::read(dir.path().join("tree/swapped/keep")).unwrap(), b"new");
        // Removal of a link removes the link, not what it points at.
        symlink(&outside, dir.path().join("tree/gone")).unwrap();
        remove_all_at(tree.fd(), OsStr::new("gone")).unwrap();
        assert!(outside.join("keep").exists());
        // A FIFO where a file is read does not block, and is refused.
        let fifo = dir.path().join("tree/fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
        let e = tree.read(Path::new("fifo"), 10).unwrap_err();
        assert!(e.to_string().contains("not a file"), "{e}");
        // Modes are the agent's.
        write_file(tree.fd(), OsStr::new("suid"), &mut &b"x"[..], file_mode(0o4755)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tree/suid")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert_eq!(file_mode(0o4644), 0o644);
        assert_eq!(file_mode(0o2777), 0o755);
        assert_eq!(file_mode(0o666), 0o644);
    }
}
