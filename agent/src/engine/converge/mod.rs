//! From a stack model to running containers, changing only what differs.
//!
//! A converge is a sequence of phases, each in its own module and usable on
//! its own (the coming `plan` and `rollback` reuse them):
//!
//! 0. [`credentials`]: no credential of data that exists changes (unless a
//!    rotation changed it in the data first); nothing is touched otherwise;
//! 1. [`resources`]: the stack's networks and volumes exist;
//! 2. [`images`]: every service's image is here (built when its context
//!    changed, pulled when missing), giving each service's image ID;
//! 3. [`plan`]: each service's *config hash* and what to do with its
//!    container: keep, start, create or recreate; which containers are
//!    orphans. Pure: it reads a snapshot of the containers and changes
//!    nothing;
//! 4. [`start`]: the plan carried out in dependency order, each service
//!    waiting for its `depends_on` conditions;
//! 5. [`orphans`]: containers of services no longer in the stack removed;
//! 6. [`health`]: every health check passes, one-shots have succeeded,
//!    everything else still runs.
//!
//! [`stopped`] remembers the containers `StopServices` stopped, for the
//! plan to start them again. [`status`] reads a project's containers (also for `StackStatus` and
//! `Logs`); [`down`] removes a project; [`preview`] says what a converge
//! would do, without doing it (`mlopsctl plan`).

pub mod credentials;
pub mod health;
pub mod images;
pub mod orphans;
pub mod plan;
pub mod preview;
pub mod resources;
pub mod start;
pub mod status;
pub mod stopped;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use mlops_proto::stack::Stack;
use sha2::Digest;

use super::{EngineError, Events, Outcome, confine};

pub use status::{down, status};

/// Where a stack's files are on the host, and where the agent may make
/// temporary files for it.
#[derive(Debug, Clone)]
pub struct StackDirs {
    /// The stack's synced tree (bind sources and build contexts).
    pub files: PathBuf,
    /// A root-owned 0700 directory of the agent's (see `SyncStore::work_dir`).
    pub work: PathBuf,
    /// The record of the credentials its volumes' data was made with (see
    /// [`credentials`]).
    pub credentials: PathBuf,
    /// The containers `StopServices` stopped (see [`stopped`]).
    pub stopped: PathBuf,
}

/// How a converge is carried out (beyond the model).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Secrets a rotation is changing (see [`credentials`]).
    pub rotating: Vec<String>,
    /// How long each service may take to become healthy.
    pub health_timeout: Duration,
    /// How long a changed service without a health check must keep running.
    pub min_healthy: Duration,
    /// Service to image ID: the images a kept revision ran, used as they
    /// are (nothing built or pulled; see [`images::ensure`]).
    pub pinned: Option<BTreeMap<String, String>>,
    /// Free bytes Docker's data directory must have for a build to start
    /// (0: no floor; see [`images::check_build_space`]).
    pub build_floor: u64,
}

/// Brings the stack to the model; returns every service's state.
pub async fn converge(
    docker: &Docker,
    stack: &Stack,
    dirs: &StackDirs,
    options: &Options,
    ev: &Events,
) -> Result<Outcome, EngineError> {
    let files_dir = dirs.files.as_path();
    check_nested_binds(stack, files_dir)?;
    let order = stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    credentials::check_and_record(docker, stack, &dirs.credentials, &options.rotating).await?;
    let mut changed = resources::ensure(docker, stack, &order, ev).await?;
    let images = images::ensure(docker, stack, &order, dirs, options.pinned.as_ref(), options.build_floor, ev).await?;
    changed |= images.changed;
    let hashes = plan::config_hashes(stack, &order, &images.ids, files_dir)?;
    let parts = plan::config_parts(stack, &order, &images.ids, &hashes, files_dir);
    let mut existing = plan::existing(docker, &stack.project).await?;
    let held = stopped::read(&dirs.stopped);
    for c in existing.iter_mut() {
        c.stopped = held.contains(&c.id);
    }
    let plan = plan::plan(stack, &order, &hashes, &parts, existing);
    let ids = start::run(docker, stack, &plan, files_dir, options.health_timeout, ev).await?;
    // Every container it stopped runs again or was replaced.
    stopped::clear(&dirs.stopped);
    changed |= ids.values().any(|(_, c)| *c);
    changed |= orphans::remove(docker, &plan.orphans, ev).await?;
    health::gate(docker, stack, &order, &ids, options.health_timeout, ev).await?;
    health::hold(docker, stack, &order, &ids, options.min_healthy, ev).await?;

    let mut services = Vec::new();
    for name in &order {
        let (id, was_changed) = &ids[name];
        services.push(status::service_status(docker, name, id, *was_changed).await);
    }
    let replaced = services.iter().filter(|s| s.changed).count();
    let summary = if changed {
        format!("{replaced} of {} service(s) created or replaced", services.len())
    } else {
        format!("nothing to change: {} service(s) up to date", services.len())
    };
    Ok(Outcome { summary, services, images: images.ids, config_hashes: hashes })
}

/// What converge refuses before it touches anything: bind mounts nested in
/// another service's writable one (their sources read from `files_dir`),
/// a dependency cycle, credentials that differ from those of existing data.
pub async fn precheck(
    docker: &Docker,
    stack: &Stack,
    files_dir: &Path,
    dirs: &StackDirs,
    rotating: &[String],
) -> Result<(), EngineError> {
    check_nested_binds(stack, files_dir)?;
    stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    credentials::check_and_record(docker, stack, &dirs.credentials, rotating).await
}

/// A bind mount's source or a build context, as the stack names it.
enum Source<'a> {
    /// `./x` or `x`: inside the stack's synced tree, resolved beneath it.
    InTree(&'a Path),
    /// `~/x` (root's home) or an absolute path: chosen by the compose file.
    Host(PathBuf),
}

fn classify(source: &str) -> Source<'_> {
    if let Some(rest) = source.strip_prefix("~/") {
        return Source::Host(PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(rest));
    }
    let p = Path::new(source);
    if p.is_absolute() { Source::Host(p.to_path_buf()) } else { Source::InTree(p) }
}

/// Why a source in the tree cannot be used, as a request error on `field`.
fn unusable(field: &str, files_dir: &Path, source: &str, e: &std::io::Error) -> EngineError {
    let why = if e.kind() == std::io::ErrorKind::NotFound {
        format!("`{source}` is not in the stack directory ({})", files_dir.join(source).display())
    } else if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!("`{source}` resolves outside the stack directory (through a symlink); it is refused")
    } else {
        format!("`{source}` cannot be used: {e}")
    };
    EngineError::bad_request(field, why)
}

/// Where a bind mount's source is on the host: `./x` in the stack's synced
/// tree (every symlink followed, and refused if that leaves the tree), `~/x`
/// in root's home, absolute paths as they are. `field` names the mount for
/// errors.
pub fn resolve_source(files_dir: &Path, source: &str, field: &str) -> Result<PathBuf, EngineError> {
    match classify(source) {
        Source::Host(p) => Ok(p),
        Source::InTree(rel) => confine::Tree::open(files_dir)
            .and_then(|tree| tree.real_path(rel))
            .map_err(|e| unusable(field, files_dir, source, &e)),
    }
}

/// Refuses a bind source in the stack's tree that lies inside another bind
/// source mounted writable: the container with the writable mount could
/// replace the inner path with a symlink, and Docker resolves bind sources
/// afresh (as root, following links) every time it starts a container,
/// restarts included.
fn check_nested_binds(stack: &Stack, files_dir: &Path) -> Result<(), EngineError> {
    let mut binds: Vec<(&str, &str, PathBuf, bool)> = Vec::new();
    for (name, svc) in &stack.services {
        for m in svc.volumes.iter().filter(|m| m.kind == mlops_proto::stack::MountKind::Bind) {
            if let Source::InTree(_) = classify(&m.source)
                && let Ok(real) = resolve_source(files_dir, &m.source, "")
            {
                binds.push((name, &m.source, real, !m.read_only));
            }
        }
    }
    for (name, source, real, _) in &binds {
        if let Some((writer, outer, _, _)) =
            binds.iter().find(|(_, _, w, writable)| *writable && real != w && real.starts_with(w))
        {
            return Err(EngineError::bad_request(
                &format!("services.{name}.volumes"),
                format!(
                    "service `{name}` mounts `{source}`, which lies inside `{outer}`, mounted writable by service \
                     `{writer}`: that container could replace it with a symlink, followed when `{name}` next starts; \
                     mount `{outer}` read-only, or keep the two apart"
                ),
            ));
        }
    }
    Ok(())
}

/// A build context opened for reading, confined like [`resolve_source`].
pub fn open_context(files_dir: &Path, source: &str, field: &str) -> Result<confine::Tree, EngineError> {
    match classify(source) {
        Source::Host(p) => {
            let real = std::fs::canonicalize(&p).map_err(EngineError::io_at("opening the build context", &p))?;
            confine::Tree::open(&real).map_err(EngineError::io_at("opening the build context", &p))
        }
        Source::InTree(rel) => confine::Tree::open(files_dir)
            .and_then(|tree| tree.subtree(rel))
            .map_err(|e| unusable(field, files_dir, source, &e)),
    }
}

/// The sha256 of a bind-mounted file (None for a directory or a source
/// that cannot be resolved; converge reports those when it mounts them).
pub fn hash_source(files_dir: &Path, source: &str) -> Option<String> {
    // Opened without blocking (a FIFO there must not hang the agent), then
    // taken only if it is a regular file.
    let file = match classify(source) {
        Source::Host(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(p).ok()?
        }
        Source::InTree(rel) => {
            std::fs::File::from(confine::Tree::open(files_dir).ok()?.open_beneath(rel, confine::READ_ANY).ok()?)
        }
    };
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut &file, &mut h).ok()?;
    Some(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlops_proto::stack::{Mount, MountKind, Service};

    fn bind(source: &str, read_only: bool) -> Mount {
        Mount { kind: MountKind::Bind, source: source.into(), target: "/m".into(), read_only }
    }

    #[test]
    fn a_bind_inside_another_services_writable_bind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/sub")).unwrap();
        let mut stack = Stack { project: "p".into(), ..Default::default() };
        let svc = |m: Vec<Mount>| Service { image: Some("i".into()), volumes: m, ..Default::default() };
        stack.services.insert("writer".into(), svc(vec![bind("./data", false)]));
        stack.services.insert("reader".into(), svc(vec![bind("./data/sub", true)]));
        let e = check_nested_binds(&stack, dir.path()).unwrap_err().to_string();
        assert!(e.contains("`./data/sub`, which lies inside `./data`") && e.contains("`writer`"), "{e}");
        // Read-only outside, or side by side: fine.
        stack.services.insert("writer".into(), svc(vec![bind("./data", true)]));
        assert!(check_nested_binds(&stack, dir.path()).is_ok());
        stack.services.insert("writer".into(), svc(vec![bind("./data/sub", false)]));
        assert!(check_nested_binds(&stack, dir.path()).is_ok(), "the same directory twice is not nested");
    }
}
