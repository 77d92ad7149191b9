//! This machine's own Docker engine as a source of images. A user with
//! registry access pulls an image here (Grafana, say) and a deploy ships
//! it to hosts that have none, through their agents like any image one
//! host ships to another (see [`crate::images`]). Only an image the stack
//! pulls (`image:` without `build:`) that no host of the deploy has is
//! taken from here.
//!
//! Read only: the engine is asked for an image's ID and for its `docker
//! save` stream, nothing else. Where it is: `DOCKER_HOST` when that is a
//! `unix://` socket, else `/var/run/docker.sock`; `--no-local-images`
//! leaves it alone, and so does a deploy to this machine (its engine is
//! the host's).

use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use futures::{Stream, StreamExt};

/// How the report names it.
pub const NAME: &str = "this machine's Docker engine";

/// The engine, connected at the version it speaks.
#[derive(Clone)]
pub struct LocalEngine {
    docker: Docker,
    pub socket: PathBuf,
}

/// The socket `DOCKER_HOST` names (only `unix://`), else the default;
/// `None` when `DOCKER_HOST` names another kind of engine.
pub fn socket() -> Option<PathBuf> {
    match std::env::var("DOCKER_HOST") {
        Ok(v) if !v.is_empty() => v.strip_prefix("unix://").map(PathBuf::from),
        _ => Some(PathBuf::from("/var/run/docker.sock")),
    }
}

impl LocalEngine {
    /// The engine at [`socket`], if one answers within 3 s.
    pub async fn connect() -> Option<LocalEngine> {
        let socket = socket()?;
        if !socket.exists() {
            return None;
        }
        let attempt = async {
            let docker =
                Docker::connect_with_unix(&socket.to_string_lossy(), 600, bollard::API_DEFAULT_VERSION).ok()?;
            docker.negotiate_version().await.ok()
        };
        let docker = tokio::time::timeout(Duration::from_secs(3), attempt).await.ok().flatten()?;
        Some(LocalEngine { docker, socket })
    }

    /// The ID of the image `tag` here, if there is one.
    pub async fn image_id(&self, tag: &str) -> Option<String> {
        self.docker.inspect_image(tag).await.ok().and_then(|i| i.id)
    }

    /// `tag` as a `docker save` tarball stream (`/images/get`).
    pub fn save(&self, tag: &str) -> impl Stream<Item = Result<prost::bytes::Bytes, String>> + Send + use<> {
        self.docker.export_images(&[tag]).map(|r| r.map_err(|e| e.to_string()))
    }
}
