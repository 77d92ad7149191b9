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
}

/// The socket `DOCKER_HOST` names (only `unix://`), else the default;
/// `None` when `DOCKER_HOST` names another kind of engine. Docker CLI
/// contexts (`docker context use`, `DOCKER_CONTEXT`) are not read: set
/// `DOCKER_HOST` to such an engine's socket.
pub fn socket() -> Option<PathBuf> {
    socket_from(std::env::var("DOCKER_HOST").ok().as_deref())
}

fn socket_from(docker_host: Option<&str>) -> Option<PathBuf> {
    match docker_host {
        Some(v) if !v.is_empty() => v.strip_prefix("unix://").map(PathBuf::from),
        _ => Some(PathBuf::from("/var/run/docker.sock")),
    }
}

/// Docker's name for an architecture `uname -m` names.
pub fn docker_arch(uname: &str) -> &str {
    match uname {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "armv7l" | "armv6l" | "arm" => "arm",
        "i686" | "i386" | "x86" => "386",
        "powerpc64le" | "ppc64le" => "ppc64le",
        other => other,
    }
}

/// An image in the engine: its ID and platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    pub id: String,
    pub os: String,
    pub arch: String,
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
        Some(LocalEngine { docker })
    }

    /// The image `tag` here, if there is one (within 10 s).
    pub async fn image(&self, tag: &str) -> Option<LocalImage> {
        let inspect = tokio::time::timeout(Duration::from_secs(10), self.docker.inspect_image(tag)).await.ok()?.ok()?;
        Some(LocalImage {
            id: inspect.id?,
            os: inspect.os.unwrap_or_default(),
            arch: inspect.architecture.unwrap_or_default(),
        })
    }

    /// `tag` as a `docker save` tarball stream (`/images/get`).
    pub fn save(&self, tag: &str) -> impl Stream<Item = Result<prost::bytes::Bytes, String>> + Send + use<> {
        self.docker.export_images(&[tag]).map(|r| r.map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_unix_socket_is_used() {
        assert_eq!(socket_from(None), Some(PathBuf::from("/var/run/docker.sock")));
        assert_eq!(socket_from(Some("")), Some(PathBuf::from("/var/run/docker.sock")));
        assert_eq!(socket_from(Some("unix:///run/user/1000/docker.sock")), Some("/run/user/1000/docker.sock".into()));
        assert_eq!(socket_from(Some("tcp://10.0.0.1:2376")), None);
        assert_eq!(socket_from(Some("ssh://me@box")), None);
    }

    #[test]
    fn architectures_by_docker_names() {
        assert_eq!(docker_arch("x86_64"), "amd64");
        assert_eq!(docker_arch("aarch64"), "arm64");
        assert_eq!(docker_arch("s390x"), "s390x");
    }
}
