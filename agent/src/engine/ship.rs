//! Images between hosts without a registry: [`save`] streams an image out
//! of this host's engine as a `docker save` tarball (`SaveImage`), [`load`]
//! streams one into it (`LoadImage`), [`tag`] names an image the host
//! already has (`TagImage`: then nothing is shipped). The controller pipes
//! one host's `save` into another's `load`; no side holds a whole image in
//! memory (the Engine API's `/images/get` and `/images/load` are streams,
//! and so are the RPCs).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bollard::Docker;
use bollard::query_parameters::{ImportImageOptionsBuilder, TagImageOptionsBuilder};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::EngineError;
use super::build::split_tag;

/// `tag`'s image as a tarball stream; refused unless `tag` is image `id`
/// here (the controller ships what it was told was built, nothing else).
pub async fn save(
    docker: &Docker,
    tag: &str,
    id: &str,
) -> Result<impl Stream<Item = Result<Bytes, EngineError>> + use<>, EngineError> {
    check_tag(tag)?;
    let here = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
    if here.as_deref() != Some(id) {
        return Err(EngineError::NotFound(format!(
            "image {tag} here is {}, not {id} (rebuilt since the plan?)",
            here.as_deref().unwrap_or("absent")
        )));
    }
    Ok(docker.export_images(&[tag]).map(|r| r.map_err(EngineError::from)))
}

/// Loads a tarball stream; `tag` must then be image `id`. Returns the
/// bytes read.
pub async fn load<S, E>(docker: &Docker, tag: &str, id: &str, tarball: S) -> Result<u64, EngineError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    check_tag(tag)?;
    let count = Arc::new(AtomicU64::new(0));
    let counted = {
        let count = count.clone();
        tarball.inspect(move |r| {
            if let Ok(b) = r {
                count.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let options = ImportImageOptionsBuilder::new().quiet(true).build();
    let mut answer = docker.import_image_stream(options, counted, None);
    while let Some(line) = answer.next().await {
        line?;
    }
    let loaded = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
    if loaded.as_deref() != Some(id) {
        return Err(EngineError::BadRequest {
            field: "image".into(),
            message: format!(
                "the tarball did not give image {tag} as {id} (it is {})",
                loaded.as_deref().unwrap_or("absent")
            ),
        });
    }
    Ok(count.load(Ordering::Relaxed))
}

/// Tags image `id` as `tag` if this host has it; `false` when it has not.
pub async fn tag(docker: &Docker, id: &str, tag: &str) -> Result<bool, EngineError> {
    check_tag(tag)?;
    if !id.starts_with("sha256:") || id.len() != 71 || !id[7..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EngineError::bad_request("id", format!("`{id}` is not an image ID (sha256:<64 hex>)")));
    }
    if docker.inspect_image(id).await.is_err() {
        return Ok(false);
    }
    let (repo, t) = split_tag(tag);
    docker.tag_image(id, Some(TagImageOptionsBuilder::new().repo(repo).tag(t).build())).await?;
    Ok(true)
}

/// A tag as a stack names images: no empty name, no digest, no spaces.
fn check_tag(tag: &str) -> Result<(), EngineError> {
    let ok = !tag.is_empty()
        && tag.len() <= 255
        && !tag.contains('@')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b));
    if ok { Ok(()) } else { Err(EngineError::bad_request("tag", format!("`{tag}` is not an image tag"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked() {
        for good in ["mlops-python:latest", "registry:5000/a/b:1.2", "grafana/grafana-oss:11.3.0", "x"] {
            assert!(check_tag(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a@sha256:00", "a;rm", "a\nb"] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }
}
