//! Phase 2: every service's image is here. A `build:` service is built
//! when its context hash (files after `.dockerignore`, Dockerfile, args,
//! target) differs from the label on the image of that tag, after its base
//! images are made present; an `image:` service is pulled when missing.

use std::collections::BTreeMap;
use std::path::Path;

use bollard::Docker;
use mlops_proto::stack::{Stack, labels};

use super::open_context;
use crate::engine::{Action, EngineError, Events, build};

/// The image ID of each service, and whether any image was built or pulled.
pub struct Images {
    pub ids: BTreeMap<String, String>,
    pub changed: bool,
}

pub async fn ensure(
    docker: &Docker,
    stack: &Stack,
    order: &[String],
    dirs: &super::StackDirs,
    ev: &Events,
) -> Result<Images, EngineError> {
    let mut out = Images { ids: BTreeMap::new(), changed: false };
    for name in order {
        let tag = stack.image_of(name);
        let id = match &stack.services[name].build {
            Some(_) => build_if_changed(docker, stack, name, &tag, dirs, ev, &mut out.changed).await?,
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

async fn build_if_changed(
    docker: &Docker,
    stack: &Stack,
    name: &str,
    tag: &str,
    dirs: &super::StackDirs,
    ev: &Events,
    changed: &mut bool,
) -> Result<String, EngineError> {
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
    let ctx =
        tokio::task::spawn_blocking(move || build::pack_with(&dir, &dockerfile, &args, target.as_deref(), &extra))
            .await
            .map_err(|e| EngineError::io("packing the build context")(std::io::Error::other(e)))?
            .map_err(|e| e.in_service(name))?;
    let existing = docker.inspect_image(tag).await.ok();
    let current = existing
        .as_ref()
        .and_then(|i| i.config.as_ref())
        .and_then(|c| c.labels.as_ref())
        .and_then(|l| l.get(labels::CONTEXT_HASH))
        .is_some_and(|h| *h == ctx.hash);
    if current {
        return Ok(existing.and_then(|i| i.id).unwrap_or_default());
    }
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
