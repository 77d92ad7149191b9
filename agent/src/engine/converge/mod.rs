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

use super::{EngineError, Events, Outcome};

pub use status::{down, status};

/// Brings the stack to the model; returns every service's state.
pub async fn converge(
    docker: &Docker,
    stack: &Stack,
    files_dir: &Path,
    health_timeout: Duration,
    ev: &Events,
) -> Result<Outcome, EngineError> {
    let order = stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    let mut changed = resources::ensure(docker, stack, &order, ev).await?;
    let images = images::ensure(docker, stack, &order, files_dir, ev).await?;
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

/// Where a bind mount's source is on the host: `./x` in the stack's
/// synced tree, `~/x` in root's home, absolute paths as they are.
pub fn resolve_source(files_dir: &Path, source: &str) -> PathBuf {
    if let Some(rest) = source.strip_prefix("~/") {
        return PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(rest);
    }
    let p = Path::new(source);
    if p.is_absolute() { p.to_path_buf() } else { files_dir.join(source.trim_start_matches("./")) }
}
