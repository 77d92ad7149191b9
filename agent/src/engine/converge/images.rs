//! Phase 2: every service's image is here. A `build:` service is built
//! when its context hash (files after `.dockerignore`, Dockerfile, args,
//! target) differs from the label on the image of that tag, after its base
//! images are made present; an `image:` service is pulled when missing.
//! Returning to a kept revision, each service's image is the one that
//! revision ran (`pinned`), by ID: nothing is built or pulled, and the
//! service's tag is moved back to it.

use std::collections::BTreeMap;
use std::path::Path;

use bollard::Docker;
use mlops_proto::stack::{Stack, labels};

use super::open_context;
use crate::engine::{Action, EngineError, Events, build};

/// The image ID of each service, and whether any image was built or pulled.
#[derive(Debug)]
pub struct Images {
    pub ids: BTreeMap<String, String>,
    pub changed: bool,
}

pub async fn ensure(
    docker: &Docker,
    stack: &Stack,
    order: &[String],
    dirs: &super::StackDirs,
    pinned: Option<&BTreeMap<String, String>>,
    floor: u64,
    ev: &Events,
) -> Result<Images, EngineError> {
    let mut out = Images { ids: BTreeMap::new(), changed: false };
    for name in order {
        let tag = stack.image_of(name);
        if let Some(pinned) = pinned {
            let id = pin(docker, name, &tag, pinned.get(name)).await?;
            out.ids.insert(name.clone(), id);
            continue;
        }
        let id = match &stack.services[name].build {
            Some(_) => build_if_changed(docker, stack, name, &tag, dirs, floor, ev, &mut out.changed).await?,
            None => match docker.inspect_image(&tag).await {
                Ok(i) => i.id.unwrap_or_default(),
                Err(_) => {
                    ev.say(name, Action::Pulling, tag.clone()).await;
                    build::pull(docker, &tag).await.map_err(|e| e.in_service(name))?;
                    out.changed = true;
                    docker.inspect_image(&tag).await?.id.unwrap_or_default()
                }
            },
        };
        out.ids.insert(name.clone(), id);
    }
    Ok(out)
}

/// Fails with [`EngineError::DiskFull`] when Docker's data directory has
/// less than `floor` bytes free (0: no floor).
pub async fn check_build_space(docker: &Docker, floor: u64) -> Result<(), EngineError> {
    if floor == 0 {
        return Ok(());
    }
    let root = docker.info().await?.docker_root_dir.unwrap_or_else(|| "/var/lib/docker".to_string());
    let (_, free) = crate::facts::disk(Path::new(&root));
    if free < floor {
        return Err(EngineError::DiskFull { service: String::new(), path: root, free, floor });
    }
    Ok(())
}

/// The kept image `id` of service `name`, tagged `tag` again (a later
/// build may have moved the tag).
async fn pin(docker: &Docker, name: &str, tag: &str, id: Option<&String>) -> Result<String, EngineError> {
    let missing = |why: &str| {
        EngineError::NotFound(format!(
            "service `{name}`: the revision's image of {tag} {why}; deploy the stack again instead"
        ))
    };
    let id = id.ok_or_else(|| missing("is not recorded"))?;
    if !crate::engine::ship::tag(docker, id, tag).await? {
        return Err(missing(&format!("{id} is no longer on this host")));
    }
    Ok(id.clone())
}

/// An image of the stack, as this host has it.
#[derive(Debug, Clone)]
pub struct ImageState {
    /// The first service in start order that uses the tag.
    pub service: String,
    pub tag: String,
    /// The hash of its build context; empty for an `image:` (pulled) one.
    pub context_hash: String,
    /// The image of `tag` when it was built from this context (any image
    /// of `tag`, for a pulled one); else `None`.
    pub id: Option<String>,
}

/// Every image of the stack (one per tag, in start order): those it
/// builds with their context hash here and whether the image of that tag
/// was built from it, those it pulls (`image:` without `build:`, not by
/// digest) with the ID this host has of each.
pub async fn states(docker: &Docker, stack: &Stack, dirs: &super::StackDirs) -> Result<Vec<ImageState>, EngineError> {
    let order = stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    let mut out: Vec<ImageState> = Vec::new();
    for name in &order {
        let tag = stack.image_of(name);
        if out.iter().any(|s| s.tag == tag) {
            continue;
        }
        if stack.services[name].build.is_none() {
            // A pulled image: the controller may ship it from a host (or
            // its own engine) that has it. By digest, it is pulled.
            if !tag.contains('@') {
                let id = docker.inspect_image(&tag).await.ok().and_then(|i| i.id);
                out.push(ImageState { service: name.clone(), tag, context_hash: String::new(), id });
            }
            continue;
        }
        let (hash, _) = context_hash(stack, name, dirs).await?;
        let id = docker
            .inspect_image(&tag)
            .await
            .ok()
            .filter(|i| {
                let labels = i.config.as_ref().and_then(|c| c.labels.as_ref());
                labels.and_then(|l| l.get(labels::CONTEXT_HASH)).is_some_and(|h| *h == hash)
            })
            .and_then(|i| i.id);
        out.push(ImageState { service: name.clone(), tag, context_hash: hash, id });
    }
    Ok(out)
}

/// Builds the images `tags` (of `build:` services) whose context changed,
/// and nothing else (`BuildImages`: the host that builds for the others).
pub async fn build_tags(
    docker: &Docker,
    stack: &Stack,
    tags: &[String],
    dirs: &super::StackDirs,
    floor: u64,
    ev: &Events,
) -> Result<crate::engine::Outcome, EngineError> {
    let order = stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    if let Some(unknown) =
        tags.iter().find(|t| !order.iter().any(|n| stack.services[n].build.is_some() && stack.image_of(n) == **t))
    {
        return Err(EngineError::bad_request("tags", format!("no service of the stack builds `{unknown}`")));
    }
    let mut changed = false;
    let mut done: Vec<String> = Vec::new();
    for name in &order {
        let tag = stack.image_of(name);
        if stack.services[name].build.is_none() || done.contains(&tag) || !tags.contains(&tag) {
            continue;
        }
        build_if_changed(docker, stack, name, &tag, dirs, floor, ev, &mut changed).await?;
        done.push(tag);
    }
    let summary = if changed {
        format!("{} image(s) current, some built", done.len())
    } else {
        format!("{} image(s) current, none built", done.len())
    };
    Ok(crate::engine::Outcome { summary, ..Default::default() })
}

/// The hash of service `name`'s build context (it decides whether the
/// image is current), packed only when something in it changed (and then
/// the packed context too).
async fn context_hash(
    stack: &Stack,
    name: &str,
    dirs: &super::StackDirs,
) -> Result<(String, Option<build::Context>), EngineError> {
    packed(stack, name, dirs, true).await
}

/// The packed build context of service `name`.
async fn context(stack: &Stack, name: &str, dirs: &super::StackDirs) -> Result<build::Context, EngineError> {
    packed(stack, name, dirs, false).await.map(|(_, ctx)| ctx.expect("packed"))
}

async fn packed(
    stack: &Stack,
    name: &str,
    dirs: &super::StackDirs,
    hash_only: bool,
) -> Result<(String, Option<build::Context>), EngineError> {
    let b = stack.services[name].build.as_ref().expect("a build service");
    let dir = open_context(&dirs.files, &b.context, &format!("services.{name}.build.context"))
        .map_err(|e| e.in_service(name))?;
    let (dockerfile, args, target) = (b.dockerfile.clone(), b.args.clone(), b.target.clone());
    let extra = if stack.options.host_ca_bundle {
        let ca = std::fs::read(build::HOST_CA_BUNDLE)
            .map_err(EngineError::io_at("x-mlops.host_ca_bundle: reading", Path::new(build::HOST_CA_BUNDLE)))?;
        vec![(build::HOST_CA_IN_CONTEXT.to_string(), ca)]
    } else {
        Vec::new()
    };
    tokio::task::spawn_blocking(move || match hash_only {
        true => build::context_hash(&dir, &dockerfile, &args, target.as_deref(), &extra),
        false => {
            build::pack_with(&dir, &dockerfile, &args, target.as_deref(), &extra).map(|c| (c.hash.clone(), Some(c)))
        }
    })
    .await
    .map_err(|e| EngineError::io("packing the build context")(std::io::Error::other(e)))?
    .map_err(|e| e.in_service(name))
}

#[allow(clippy::too_many_arguments)]
async fn build_if_changed(
    docker: &Docker,
    stack: &Stack,
    name: &str,
    tag: &str,
    dirs: &super::StackDirs,
    floor: u64,
    ev: &Events,
    changed: &mut bool,
) -> Result<String, EngineError> {
    let b = stack.services[name].build.as_ref().expect("a build service");
    let (hash, packed) = context_hash(stack, name, dirs).await?;
    let existing = docker.inspect_image(tag).await.ok();
    let current = existing
        .as_ref()
        .and_then(|i| i.config.as_ref())
        .and_then(|c| c.labels.as_ref())
        .and_then(|l| l.get(labels::CONTEXT_HASH))
        .is_some_and(|h| *h == hash);
    if current {
        return Ok(existing.and_then(|i| i.id).unwrap_or_default());
    }
    // A build that fills the disk fails half-way and starves what runs
    // here (PostgreSQL first): refused before it starts.
    check_build_space(docker, floor).await.map_err(|e| e.in_service(name))?;
    let ctx = match packed {
        Some(ctx) => ctx,
        None => context(stack, name, dirs).await?,
    };
    ev.say(name, Action::BuildStarted, tag).await;
    let say = ev.progress_sink(name);
    for base in build::base_images(&ctx.dockerfile_text, &b.args) {
        build::ensure_base(docker, &base, stack.options.bootstrap_base_images, &dirs.work, &say)
            .await
            .map_err(|e| e.in_service(name))?;
    }
    let image_labels = BTreeMap::from([
        (labels::PROJECT.to_string(), stack.project.clone()),
        (labels::CONTEXT_HASH.to_string(), ctx.hash.clone()),
    ]);
    let spec = build::BuildSpec {
        tag,
        dockerfile: &b.dockerfile,
        args: &b.args,
        target: b.target.as_deref(),
        labels: image_labels,
    };
    let id = build::build(docker, spec, ctx, &say).await.map_err(|e| e.in_service(name))?;
    *changed = true;
    ev.say(name, Action::Built, tag).await;
    Ok(id)
}
