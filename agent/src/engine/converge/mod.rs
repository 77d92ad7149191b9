//! From a stack model to running containers, changing only what differs.
//!
//! A converge is a sequence of phases, each in its own module and usable on
//! its own (the coming `plan` and `rollback` reuse them):
//!
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
//! [`status`] reads a project's containers (also for `StackStatus` and
//! `Logs`); [`down`] removes a project.

pub mod health;
pub mod images;
pub mod orphans;
pub mod plan;
pub mod resources;
pub mod start;
pub mod status;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use mlops_proto::stack::Stack;
use sha2::Digest;

use super::{EngineError, Events, Outcome, confine};

pub use status::{down, status};

/// Where a stack's files are on the host, and where the agent may make
/// temporary files for it.
pub struct StackDirs {
    /// The stack's synced tree (bind sources and build contexts).
    pub files: PathBuf,
    /// A root-owned 0700 directory of the agent's (see `SyncStore::work_dir`).
    pub work: PathBuf,
}

/// Brings the stack to the model; returns every service's state.
pub async fn converge(
    docker: &Docker,
    stack: &Stack,
    dirs: &StackDirs,
    health_timeout: Duration,
    ev: &Events,
) -> Result<Outcome, EngineError> {
    let files_dir = dirs.files.as_path();
    let order = stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    let mut changed = resources::ensure(docker, stack, &order, ev).await?;
    let images = images::ensure(docker, stack, &order, dirs, ev).await?;
    changed |= images.changed;
    let hashes = plan::config_hashes(stack, &order, &images.ids, files_dir)?;
    let existing = plan::existing(docker, &stack.project).await?;
    let plan = plan::plan(stack, &order, &hashes, existing);
    let ids = start::run(docker, stack, &plan, files_dir, health_timeout, ev).await?;
    changed |= ids.values().any(|(_, c)| *c);
    changed |= orphans::remove(docker, &plan.orphans, ev).await?;
    health::gate(docker, stack, &order, &ids, health_timeout, ev).await?;

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
    Ok(Outcome { summary, services })
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
    let file = match classify(source) {
        Source::Host(p) => std::fs::File::open(p).ok()?,
        Source::InTree(rel) => std::fs::File::from(
            confine::Tree::open(files_dir).ok()?.open_beneath(rel, rustix::fs::OFlags::RDONLY).ok()?,
        ),
    };
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut &file, &mut h).ok()?;
    Some(hex::encode(h.finalize()))
}
