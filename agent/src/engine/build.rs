//! Image builds: the context as a tar (honouring `.dockerignore`), a hash
//! that decides whether a build is needed at all, and the base images a
//! Dockerfile names (present, pulled, or, when the stack opts in and no
//! registry answers, built from the host's Debian mirror with debootstrap).

use std::collections::BTreeMap;
use std::path::Path;

use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptionsBuilder};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use mlops_proto::ignore::Ignore;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{FileType, Mode, OFlags};

use super::EngineError;
use super::confine::{self, Tree};

/// A build context, packed.
pub struct Context {
    pub tar: Vec<u8>,
    /// sha256 over the packed files, Dockerfile path, args and target.
    pub hash: String,
    pub dockerfile_text: String,
}

/// Packs the context `dir` (minus `.dockerignore`d paths; the Dockerfile
/// and `.dockerignore` always go, as Docker sends them) into a deterministic
/// tar: sorted, owner 0, fixed mtime, so the same files give the same hash.
///
/// The context is read through its directory handle (see `confine`): a
/// symlink is packed as a symlink, never followed; the Dockerfile and
/// `.dockerignore` may be links, but only to files inside the context.
pub fn pack(
    dir: &Tree,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Result<Context, EngineError> {
    pack_with(dir, dockerfile, args, target, &[])
}

/// The host's CA bundle, as `x-mlops.host_ca_bundle` adds it to contexts.
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const HOST_CA_IN_CONTEXT: &str = ".mlops/host-ca.crt";

/// The largest Dockerfile or `.dockerignore` read.
const MAX_TEXT: u64 = 4 << 20;

/// [`pack`], plus `extra` files (name in the context, contents).
pub fn pack_with(
    dir: &Tree,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    target: Option<&str>,
    extra: &[(String, Vec<u8>)],
) -> Result<Context, EngineError> {
    #[cfg(test)]
    tests::PACKS.with(|n| n.set(n.get() + 1));
    let (_, ignore) = read_ignore(dir)?;
    let dockerfile_text =
        dir.read(Path::new(dockerfile), MAX_TEXT).map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| {
            failed("", format!("cannot read Dockerfile {}/{dockerfile}: {e}", dir.path().display()), "")
        })?;
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    let walk = Walk { root: dir.path(), ignore: &ignore, dockerfile };
    walk.dir(dir.fd(), Path::new(""), 0, &mut Out::Tar(&mut builder))?;
    for (name, data) in extra {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, name, &data[..]).map_err(EngineError::io(format!("packing {name}")))?;
    }
    let tar = builder.into_inner().map_err(EngineError::io("packing the build context"))?;
    let mut h = Sha256::new();
    h.update(&tar);
    h.update(dockerfile.as_bytes());
    for (k, v) in args {
        h.update(format!("\0{k}={v}").as_bytes());
    }
    h.update(format!("\0target={}", target.unwrap_or("")).as_bytes());
    Ok(Context { tar, hash: hex::encode(h.finalize()), dockerfile_text })
}

/// The context's `.dockerignore` (empty when it has none) and its rules.
fn read_ignore(dir: &Tree) -> Result<(Vec<u8>, Ignore), EngineError> {
    let text = match dir.read(Path::new(".dockerignore"), MAX_TEXT) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(failed("", format!("{}/.dockerignore: {e}", dir.path().display()), "")),
    };
    let ignore = Ignore::parse(&String::from_utf8_lossy(&text))
        .map_err(|e| failed("", format!("{}/.dockerignore: {e}", dir.path().display()), ""))?;
    Ok((text, ignore))
}

/// The hash [`pack_with`] would give, without packing when nothing in the
/// context changed since it was last packed: a walk that only looks at
/// each entry's metadata (device, inode, size, mode, mtime and ctime, which
/// a write changes and no one but root can set back) finds the hash of an
/// earlier pack. A no-op deploy asks this for every built image twice
/// (`ImagePlan`, then the converge); reading, packing and hashing every
/// file each time was most of the agent's work in it. On a miss the packed
/// context comes too (a build needs it).
///
/// What it misses: a write through a shared memory mapping of a file
/// (a container with a writable bind mount into the tree) may leave the
/// times as they were until the page is written back; such a change is
/// not built in until something else in the context changes. The stack's
/// tree is the agent's own, and containers that write into it are the
/// stack's own choice.
pub fn context_hash(
    dir: &Tree,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    target: Option<&str>,
    extra: &[(String, Vec<u8>)],
) -> Result<(String, Option<Context>), EngineError> {
    use std::sync::{LazyLock, Mutex};
    static KNOWN: LazyLock<Mutex<BTreeMap<String, String>>> = LazyLock::new(Default::default);
    let stamp = stamp(dir, dockerfile, args, target, extra)?;
    if let Some(stamp) = &stamp
        && let Some(hash) = KNOWN.lock().expect("not poisoned").get(stamp)
    {
        return Ok((hash.clone(), None));
    }
    let packed = pack_with(dir, dockerfile, args, target, extra)?;
    if let Some(stamp) = stamp {
        let mut known = KNOWN.lock().expect("not poisoned");
        // A few contexts per stack; a stale entry is only a miss.
        if known.len() >= 512 {
            known.clear();
        }
        known.insert(stamp, packed.hash.clone());
    }
    Ok((packed.hash.clone(), Some(packed)))
}

/// A hash of what [`pack_with`] would read, by metadata; `None` when some
/// file changed within the last 2 s (a write in the same clock tick as the
/// walk could leave its times as they were: such a context is packed).
fn stamp(
    dir: &Tree,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    target: Option<&str>,
    extra: &[(String, Vec<u8>)],
) -> Result<Option<String>, EngineError> {
    let (ignore_text, ignore) = read_ignore(dir)?;
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(dir.path().as_os_str().as_bytes());
    field(&ignore_text);
    field(dockerfile.as_bytes());
    for (k, v) in args {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(target.unwrap_or("").as_bytes());
    for (name, data) in extra {
        field(name.as_bytes());
        field(&Sha256::digest(data));
    }
    let mut stamp = Stamp { hash: Sha256::new(), racy: false, now: std::time::SystemTime::now() };
    let walk = Walk { root: dir.path(), ignore: &ignore, dockerfile };
    walk.dir(dir.fd(), Path::new(""), 0, &mut Out::Stamp(&mut stamp))?;
    if stamp.racy {
        return Ok(None);
    }
    h.update(stamp.hash.finalize());
    Ok(Some(hex::encode(h.finalize())))
}

/// What a [`Walk`] makes: the context's tar, or its [`stamp`].
enum Out<'a> {
    Tar(&'a mut tar::Builder<Vec<u8>>),
    Stamp(&'a mut Stamp),
}

struct Stamp {
    hash: Sha256,
    /// A file changed within the last 2 s.
    racy: bool,
    now: std::time::SystemTime,
}

impl Stamp {
    fn entry(&mut self, kind: &[u8], path: &Path, rest: &[i64]) {
        let path = path.as_os_str().as_bytes();
        self.hash.update(kind);
        self.hash.update((path.len() as u64).to_le_bytes());
        self.hash.update(path);
        for v in rest {
            self.hash.update(v.to_le_bytes());
        }
    }

    fn file(&mut self, path: &Path, meta: &std::fs::Metadata) {
        use std::os::unix::fs::MetadataExt;
        let at = |secs: i64, nanos: i64| {
            std::time::UNIX_EPOCH + std::time::Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
        };
        let recent = |t: std::time::SystemTime| {
            self.now.duration_since(t).map_or(true, |d| d < std::time::Duration::from_secs(2))
        };
        if recent(at(meta.ctime(), meta.ctime_nsec())) || recent(at(meta.mtime(), meta.mtime_nsec())) {
            self.racy = true;
        }
        let fields = [
            meta.dev() as i64,
            meta.ino() as i64,
            meta.size() as i64,
            i64::from(meta.mode()),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        ];
        self.entry(b"f", path, &fields);
    }
}

/// One walk over a context: entries in path order (a directory before
/// what it holds, names byte-sorted), each opened from its parent's handle
/// without following links.
struct Walk<'a> {
    root: &'a Path,
    ignore: &'a Ignore,
    dockerfile: &'a str,
}

impl Walk<'_> {
    fn dir(&self, dir: BorrowedFd<'_>, rel: &Path, depth: usize, out: &mut Out<'_>) -> Result<(), EngineError> {
        let io = |p: &Path| {
            let at = self.root.join(p);
            move |e: std::io::Error| EngineError::io_at("packing", &at)(e)
        };
        if depth > confine::MAX_DEPTH {
            let deep = std::io::Error::other(format!("directories nested deeper than {}", confine::MAX_DEPTH));
            return Err(io(rel)(deep));
        }
        for (name, kind) in confine::entries(dir).map_err(io(rel))? {
            let child = rel.join(&name);
            let child_s = child.to_string_lossy();
            let always = child_s == self.dockerfile || child_s == ".dockerignore";
            let excluded = !always && self.ignore.excluded(&child_s);
            let open = |flags: OFlags| {
                rustix::fs::openat(dir, name.as_os_str(), flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| io(&child)(e.into()))
            };
            match kind {
                FileType::Directory => {
                    let sub = open(OFlags::DIRECTORY | OFlags::RDONLY)?;
                    if !excluded {
                        let meta =
                            std::fs::File::from(sub.try_clone().map_err(io(&child))?).metadata().map_err(io(&child))?;
                        match out {
                            Out::Tar(out) => {
                                let mut header = tar::Header::new_gnu();
                                header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
                                out.append_data(&mut header, &child, std::io::empty()).map_err(io(&child))?;
                            }
                            Out::Stamp(stamp) => {
                                use std::os::unix::fs::MetadataExt;
                                stamp.entry(b"d", &child, &[i64::from(meta.mode())]);
                            }
                        }
                    }
                    // Walked even when excluded: `!` rules may re-include below it.
                    self.dir(sub.as_fd(), &child, depth + 1, out)?;
                }
                _ if excluded => {}
                FileType::RegularFile => {
                    // Checked again on the open handle: it may have been
                    // swapped (for a FIFO, a device) since it was listed.
                    let file = std::fs::File::from(open(confine::READ_ANY)?);
                    let meta = file.metadata().map_err(io(&child))?;
                    if !meta.is_file() {
                        continue;
                    }
                    let out = match out {
                        Out::Tar(out) => out,
                        Out::Stamp(stamp) => {
                            stamp.file(&child, &meta);
                            continue;
                        }
                    };
                    let mut data = Vec::with_capacity(meta.len() as usize);
                    std::io::Read::read_to_end(&mut std::io::Read::take(&file, meta.len()), &mut data)
                        .map_err(io(&child))?;
                    if data.len() as u64 != meta.len() {
                        let changed = std::io::Error::other("changed while being packed; build again");
                        return Err(io(&child)(changed));
                    }
                    let mut header = tar::Header::new_gnu();
                    header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
                    out.append_data(&mut header, &child, &data[..]).map_err(io(&child))?;
                }
                FileType::Symlink => {
                    let target =
                        rustix::fs::readlinkat(dir, name.as_os_str(), Vec::new()).map_err(|e| io(&child)(e.into()))?;
                    let target = std::ffi::OsStr::from_bytes(target.as_bytes());
                    let out = match out {
                        Out::Tar(out) => out,
                        Out::Stamp(stamp) => {
                            stamp.entry(b"l", &child, &[target.len() as i64]);
                            stamp.hash.update(target.as_bytes());
                            continue;
                        }
                    };
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o755);
                    header.set_mtime(tar::DETERMINISTIC_TIMESTAMP);
                    header.set_uid(0);
                    header.set_gid(0);
                    header.set_size(0);
                    out.append_link(&mut header, &child, target).map_err(io(&child))?;
                }
                // Sockets, pipes and devices have no place in a build
                // context (and opening a pipe would block).
                _ => {}
            }
        }
        Ok(())
    }
}

/// The base images of a Dockerfile: every `FROM` that is not `scratch` or
/// an earlier stage, with `ARG`s (declared before the first `FROM`, with
/// defaults, overridden by build args) substituted.
pub fn base_images(dockerfile: &str, args: &BTreeMap<String, String>) -> Vec<String> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut seen_from = false;
    // Join continuation lines.
    let text = dockerfile.replace("\\\n", " ");
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let Some(instr) = words.next() else { continue };
        match instr.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                if let Some(decl) = words.next() {
                    let (k, v) = decl.split_once('=').map_or((decl, ""), |(k, v)| (k, v));
                    let v = args.get(k).cloned().unwrap_or_else(|| v.trim_matches('"').to_string());
                    vars.insert(k.to_string(), v);
                }
            }
            "FROM" => {
                seen_from = true;
                let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                let Some(image) = rest.first() else { continue };
                let mut image = image.to_string();
                for (k, v) in &vars {
                    image = image.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
                }
                if let [_, as_kw, name] = rest.as_slice()
                    && as_kw.eq_ignore_ascii_case("as")
                {
                    stages.push(name.to_lowercase());
                }
                if image != "scratch" && !stages.contains(&image.to_lowercase()) && !out.contains(&image) {
                    out.push(image);
                }
            }
            _ => {}
        }
    }
    out
}

/// Makes sure `image` is present: already there; or, with `bootstrap` and
/// a `debian:<suite>[-slim]` name, built from the host's Debian mirror
/// (no registry is tried: the option exists for hosts without one); or
/// pulled. `say` reports progress.
pub async fn ensure_base(
    docker: &Docker,
    image: &str,
    bootstrap: bool,
    work_dir: &Path,
    say: &(dyn Fn(String) + Sync),
) -> Result<(), EngineError> {
    if docker.inspect_image(image).await.is_ok() {
        return Ok(());
    }
    if bootstrap && let Some(suite) = debian_suite(image) {
        say(format!("base image {image} is not here; building it with debootstrap from this host's Debian mirror"));
        return debootstrap_image(docker, image, &suite, work_dir, say).await;
    }
    say(format!("pulling base image {image}"));
    pull(docker, image).await.map_err(|e| {
        let why = match e {
            EngineError::ImageMissing { message, .. } => message,
            other => other.to_string(),
        };
        failed(
            image,
            if bootstrap {
                format!("the base image is not on this host and cannot be pulled ({why}); debootstrap can only make debian:<suite> images")
            } else {
                format!(
                    "the base image is not on this host and cannot be pulled ({why}); load it with `docker load`, or set `x-mlops: {{bootstrap_base_images: true}}` to build Debian bases from the host's mirror"
                )
            },
            "",
        )
    })
}

/// Pulls `image` (`name[:tag]`, default tag `latest`).
pub async fn pull(docker: &Docker, image: &str) -> Result<(), EngineError> {
    let (name, tag) = split_tag(image);
    let options = CreateImageOptionsBuilder::new().from_image(name).tag(tag).build();
    let mut stream = docker.create_image(Some(options), None, None);
    let missing =
        |message: String| EngineError::ImageMissing { service: String::new(), image: image.to_string(), message };
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| missing(e.to_string()))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(missing(err));
        }
    }
    Ok(())
}

pub fn split_tag(image: &str) -> (&str, &str) {
    // The tag follows the last `:` after the last `/` (a registry port is not a tag).
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], &image[slash + i + 1..]),
        None => (image, "latest"),
    }
}

/// `debian:bookworm`, `debian:bookworm-slim`, `docker.io/library/debian:12` → the suite.
fn debian_suite(image: &str) -> Option<String> {
    let (name, tag) = split_tag(image);
    let name = name.trim_start_matches("docker.io/").trim_start_matches("library/");
    if name != "debian" {
        return None;
    }
    let tag = tag.trim_end_matches("-slim");
    Some(match tag {
        "12" | "stable" | "latest" => "bookworm".to_string(),
        "11" => "bullseye".to_string(),
        "13" => "trixie".to_string(),
        t if t.chars().all(|c| c.is_ascii_lowercase()) => t.to_string(),
        _ => return None,
    })
}

/// The host's Debian mirror, from apt's sources.
pub fn debian_mirror() -> Option<String> {
    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next())
        .map(str::to_string);
    from_deb822.or_else(|| {
        std::fs::read_to_string("/etc/apt/sources.list").ok()?.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "deb").then(|| w.find(|x| x.starts_with("http")).map(str::to_string)).flatten()
        })
    })
}

async fn debootstrap_image(
    docker: &Docker,
    image: &str,
    suite: &str,
    work_dir: &Path,
    say: &(dyn Fn(String) + Sync),
) -> Result<(), EngineError> {
    let mirror =
        debian_mirror().ok_or_else(|| failed(image, "no Debian mirror found in /etc/apt/sources.list(.d)", ""))?;
    if !Path::new("/usr/sbin/debootstrap").exists() {
        say("installing debootstrap".into());
        let out = bounded(
            tokio::process::Command::new("apt-get")
                .args(["install", "-y", "-q", "debootstrap"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .await
        .map_err(EngineError::io("running apt-get"))?;
        if !out.status.success() {
            return Err(failed(image, "installing debootstrap failed", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    // Under the agent's own 0700 directory, with a name nobody can guess,
    // made fresh (a shared /tmp would let a local user own the path first and
    // poison the base image every platform image is built from).
    let dir = super::confine::fresh_dir(work_dir, &format!("debootstrap-{suite}"))
        .map_err(EngineError::io_at("creating a directory in", work_dir))?;
    say(format!("debootstrap --variant=minbase {suite} from {mirror} (about a minute)"));
    let out =
        bounded(tokio::process::Command::new("debootstrap").args(["--variant=minbase", suite]).arg(&dir).arg(&mirror))
            .await
            .map_err(EngineError::io("running debootstrap"));
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        // debootstrap says why on stdout or stderr, depending on the step.
        let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let why: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let why = why[why.len().saturating_sub(3)..].join(" | ");
        return Err(failed(image, format!("debootstrap {suite} from {mirror} failed"), why));
    }
    say(format!("importing {image}"));
    let tar_dir = dir.clone();
    let tar = tokio::task::spawn_blocking(move || {
        trim_tree(&tar_dir)?;
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", &tar_dir)?;
        b.into_inner()
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
    .map_err(EngineError::io("trimming and packing the debootstrap tree"));
    let _ = std::fs::remove_dir_all(&dir);
    let tar = tar?;
    let (name, tag) = split_tag(image);
    // Import through `POST /images/create?fromSrc=-` with repo and tag.
    let create = CreateImageOptionsBuilder::new().from_src("-").repo(name).tag(tag).build();
    let mut stream = docker.create_image(Some(create), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = stream.next().await {
        let info = item?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(failed(image, format!("importing the debootstrap tree: {err}"), ""));
        }
    }
    docker
        .inspect_image(image)
        .await
        .map_err(|e| failed(image, format!("imported, but it cannot be inspected: {e}"), ""))?;
    Ok(())
}

/// Removes what debootstrap leaves in `root` that no image needs: the
/// packages it downloaded (`var/cache/apt/archives/*.deb`, about 110 MB of
/// a 200 MB tree) and apt's caches and lists (`apt-get update` makes them
/// again). Every image built on the base carries it, and every image is
/// shipped whole to the hosts that run it: each megabyte here is paid once
/// per image per host. The tree is the agent's own (a fresh directory in its
/// 0700 work directory); a directory reached through a link is left alone,
/// and links in them are removed as links, never followed.
fn trim_tree(root: &Path) -> std::io::Result<()> {
    let dirs = [
        ("var/cache/apt/archives", ".deb"),
        ("var/cache/apt/archives/partial", ""),
        ("var/cache/apt", ".bin"),
        ("var/lib/apt/lists", ""),
    ];
    'dirs: for (dir, suffix) in dirs {
        let mut path = root.to_path_buf();
        for part in Path::new(dir) {
            path.push(part);
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(_) => continue 'dirs,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'dirs,
                Err(e) => return Err(e),
            }
        }
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // apt's lock files stay, as a fresh install has them.
            if entry.file_type()?.is_dir() || name == "lock" || !name.ends_with(suffix) {
                continue;
            }
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Runs `cmd` to completion within [`super::docker::COMMAND_TIMEOUT`]
/// (killed past it), collecting its output.
async fn bounded(cmd: &mut tokio::process::Command) -> std::io::Result<std::process::Output> {
    let child = cmd.kill_on_drop(true).output();
    tokio::time::timeout(super::docker::COMMAND_TIMEOUT, child).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "did not finish within 30 minutes and was stopped"))
    })
}

/// A build failure (the service is named by the caller, see
/// [`EngineError::in_service`]).
fn failed(image: &str, message: impl Into<String>, output: impl Into<String>) -> EngineError {
    EngineError::BuildFailed {
        service: String::new(),
        image: image.to_string(),
        message: message.into(),
        output: output.into(),
    }
}

/// What to build: the tag, and the build's parameters.
pub struct BuildSpec<'a> {
    pub tag: &'a str,
    pub dockerfile: &'a str,
    pub args: &'a BTreeMap<String, String>,
    pub target: Option<&'a str>,
    pub labels: BTreeMap<String, String>,
}

/// Builds `spec.tag` from a packed context; returns the image ID.
pub async fn build(
    docker: &Docker,
    spec: BuildSpec<'_>,
    ctx: Context,
    say: &(dyn Fn(String) + Sync),
) -> Result<String, EngineError> {
    let BuildSpec { tag, dockerfile, args, target, labels } = spec;
    let buildargs: std::collections::HashMap<String, String> = args.clone().into_iter().collect();
    let labels: std::collections::HashMap<String, String> = labels.into_iter().collect();
    let mut options = BuildImageOptionsBuilder::new()
        .dockerfile(dockerfile)
        .t(tag)
        .rm(true)
        .forcerm(true)
        .buildargs(&buildargs)
        .labels(&labels);
    if let Some(t) = target {
        options = options.target(t);
    }
    let mut stream = docker.build_image(options.build(), None, Some(bollard::body_full(ctx.tar.into())));
    let mut tail: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| failed(tag, e.to_string(), tail.join(" | ")))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(failed(tag, err.trim(), tail.join(" | ")));
        }
        if let Some(line) = info.stream {
            let line = line.trim_end().to_string();
            if line.starts_with("Step ") {
                say(line.clone());
            }
            if !line.is_empty() {
                tail.push(line);
                if tail.len() > 8 {
                    tail.remove(0);
                }
            }
        }
    }
    let inspect = docker.inspect_image(tag).await?;
    inspect.id.ok_or_else(|| failed(tag, "the built image has no ID", ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_images_with_args_and_stages() {
        let df = "ARG BASE=debian:bookworm-slim\nARG TAG\nFROM ${BASE} AS builder\nRUN x\nFROM --platform=linux/amd64 builder\nFROM scratch\nFROM python:$TAG\n";
        let args = [("TAG".to_string(), "3.11".to_string())].into();
        assert_eq!(base_images(df, &args), ["debian:bookworm-slim", "python:3.11"]);
    }

    #[test]
    fn a_debootstrap_tree_loses_its_packages_and_caches_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        let kept = outside.path().join("kept.deb");
        std::fs::write(&kept, "not the tree's").unwrap();
        for d in ["var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "etc/apt"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let file = |p: &str| std::fs::write(root.join(p), "x").unwrap();
        for p in [
            "var/cache/apt/archives/apt_2.6.1_amd64.deb",
            "var/cache/apt/archives/partial/half.deb",
            "var/cache/apt/archives/lock",
            "var/cache/apt/pkgcache.bin",
            "var/cache/apt/srcpkgcache.bin",
            "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
            "var/lib/apt/lists/lock",
            "etc/apt/sources.list",
        ] {
            file(p);
        }
        std::os::unix::fs::symlink(&kept, root.join("var/cache/apt/archives/link.deb")).unwrap();
        trim_tree(root).unwrap();
        let left = |d: &str| {
            let mut names: Vec<String> = std::fs::read_dir(root.join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(left("var/cache/apt/archives"), ["lock", "partial"]);
        assert!(left("var/cache/apt/archives/partial").is_empty());
        assert_eq!(left("var/cache/apt"), ["archives"]);
        assert_eq!(left("var/lib/apt/lists"), ["lock", "partial"]);
        assert_eq!(left("etc/apt"), ["sources.list"]);
        assert!(kept.exists(), "a link is removed, never followed");
        // A tree without apt's directories is left as it is; one whose
        // `var/lib/apt` is a link is not trimmed through it.
        trim_tree(outside.path()).unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(linked.path().join("var/lib")).unwrap();
        std::fs::create_dir_all(outside.path().join("lists")).unwrap();
        std::fs::write(outside.path().join("lists/InRelease"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), linked.path().join("var/lib/apt")).unwrap();
        trim_tree(linked.path()).unwrap();
        assert!(outside.path().join("lists/InRelease").exists(), "nothing is removed through a link");
    }

    #[test]
    fn tags_and_suites() {
        assert_eq!(split_tag("debian:bookworm"), ("debian", "bookworm"));
        assert_eq!(split_tag("localhost:5000/x"), ("localhost:5000/x", "latest"));
        assert_eq!(debian_suite("debian:bookworm-slim").as_deref(), Some("bookworm"));
        assert_eq!(debian_suite("debian:12").as_deref(), Some("bookworm"));
        assert_eq!(debian_suite("ubuntu:22.04"), None);
    }

    #[test]
    fn packing_is_deterministic_and_ignores() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(d.join(".dockerignore"), "*.tmp\n").unwrap();
        std::fs::write(d.join("a.txt"), "a").unwrap();
        std::fs::write(d.join("b.tmp"), "b").unwrap();
        let t = || Tree::open(d).unwrap();
        let one = pack(&t(), "Dockerfile", &BTreeMap::new(), None).unwrap();
        let two = pack(&t(), "Dockerfile", &BTreeMap::new(), None).unwrap();
        assert_eq!(one.hash, two.hash);
        let names: Vec<String> = tar::Archive::new(&one.tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"a.txt".to_string()) && !names.contains(&"b.tmp".to_string()), "{names:?}");
        std::fs::write(d.join("b.tmp"), "changed").unwrap();
        assert_eq!(
            pack(&t(), "Dockerfile", &BTreeMap::new(), None).unwrap().hash,
            one.hash,
            "ignored files do not count"
        );
        std::fs::write(d.join("a.txt"), "changed").unwrap();
        assert_ne!(pack(&t(), "Dockerfile", &BTreeMap::new(), None).unwrap().hash, one.hash);
        let args = [("X".to_string(), "1".to_string())].into();
        assert_ne!(pack(&t(), "Dockerfile", &args, None).unwrap().hash, one.hash);
    }

    thread_local! {
        /// Packs made by this test's thread.
        pub static PACKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_context_hash_is_remembered_until_anything_in_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a.txt"), "aaaa").unwrap();
        std::os::unix::fs::symlink("sub/a.txt", d.join("link")).unwrap();
        let t = || Tree::open(d).unwrap();
        let none = BTreeMap::new();
        let packed = |args: &BTreeMap<String, String>| pack(&t(), "Dockerfile", args, None).unwrap().hash;
        let hashed = |args: &BTreeMap<String, String>| context_hash(&t(), "Dockerfile", args, None, &[]).unwrap().0;
        let packs = || PACKS.with(std::cell::Cell::get);
        // Files written just now are packed every time (their times could
        // still change within the clock tick); older ones are remembered.
        assert!(stamp(&t(), "Dockerfile", &none, None, &[]).unwrap().is_none(), "racy: not remembered");
        assert_eq!(hashed(&none), packed(&none));
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert!(stamp(&t(), "Dockerfile", &none, None, &[]).unwrap().is_some());
        assert_eq!(hashed(&none), packed(&none));
        let before = packs();
        let remembered = hashed(&none);
        assert_eq!(packs(), before, "an unchanged context is not packed again");
        assert_eq!(remembered, packed(&none), "from memory, the same");
        let (_, ctx) = context_hash(&t(), "Dockerfile", &none, None, &[]).unwrap();
        assert!(ctx.is_none(), "a hit has nothing packed");
        let args = BTreeMap::from([("X".to_string(), "1".to_string())]);
        assert_eq!(hashed(&args), packed(&args));
        std::fs::remove_file(d.join("link")).unwrap();
        std::os::unix::fs::symlink("Dockerfile", d.join("link")).unwrap();
        assert_eq!(hashed(&none), packed(&none), "a link that points elsewhere");
        // Rewritten in place with the same size and its mtime set back:
        // its ctime still tells, once it is old enough to be remembered.
        let before = std::fs::metadata(d.join("sub/a.txt")).unwrap().modified().unwrap();
        std::fs::write(d.join("sub/a.txt"), "bbbb").unwrap();
        let f = std::fs::File::options().write(true).open(d.join("sub/a.txt")).unwrap();
        f.set_modified(before).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(hashed(&none), packed(&none), "a rewritten file is packed again");
        let extra = [("x".to_string(), b"1".to_vec())];
        let (hash, ctx) = context_hash(&t(), "Dockerfile", &none, None, &extra).unwrap();
        assert_eq!(hash, pack_with(&t(), "Dockerfile", &none, None, &extra).unwrap().hash);
        assert_eq!(ctx.map(|c| c.hash), Some(hash), "a miss brings the packed context");
    }
}
#[cfg(test)]
#[test]
fn a_context_never_reads_outside_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(dir.path().join("key.pem"), "SECRET").unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    std::os::unix::fs::symlink("../key.pem", ctx.join("key")).unwrap();
    let packed = pack(&Tree::open(&ctx).unwrap(), "Dockerfile", &BTreeMap::new(), None).unwrap();
    assert!(!packed.tar.windows(6).any(|w| w == b"SECRET"), "a link is packed as a link");
    // A Dockerfile or .dockerignore that leads out is refused.
    let e = pack(&Tree::open(&ctx).unwrap(), "key", &BTreeMap::new(), None).err().unwrap();
    assert!(e.to_string().contains("outside the tree"), "{e}");
    std::os::unix::fs::symlink("../key.pem", ctx.join(".dockerignore")).unwrap();
    assert!(pack(&Tree::open(&ctx).unwrap(), "Dockerfile", &BTreeMap::new(), None).is_err());
    std::fs::remove_file(ctx.join(".dockerignore")).unwrap();
    // A FIFO in a context (a container may make one in a writable bind) is
    // left out, and does not block the packing.
    let fifo = ctx.join("pipe");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o644), 0).unwrap();
    let packed = pack(&Tree::open(&ctx).unwrap(), "Dockerfile", &BTreeMap::new(), None).unwrap();
    let names: Vec<String> = tar::Archive::new(&packed.tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(!names.contains(&"pipe".to_string()), "{names:?}");
}

#[cfg(test)]
#[test]
fn extra_files_are_in_the_context() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let ctx = pack_with(
        &Tree::open(dir.path()).unwrap(),
        "Dockerfile",
        &BTreeMap::new(),
        None,
        &[(HOST_CA_IN_CONTEXT.to_string(), b"CA".to_vec())],
    )
    .unwrap();
    let mut names = Vec::new();
    for e in tar::Archive::new(&ctx.tar[..]).entries().unwrap() {
        let e = e.unwrap();
        names.push((e.path().unwrap().display().to_string(), e.header().entry_type().as_byte()));
    }
    assert!(names.iter().any(|(n, _)| n == ".mlops/host-ca.crt"), "{names:?}");
}
