//! A project's data leaving and arriving (`mlopsctl migrate`): named
//! volumes as tar streams, a command's standard output and input as
//! streams (`pg_dump` on one host, `psql` on the other), and stopping a
//! project's services so that what is read is quiet.
//!
//! Volumes go through the Engine API's container archive endpoints on a
//! helper container that is created, never started, and removed: the
//! engine mounts the volume for the copy, reads and writes it with its
//! own confinement (links in the data stay links, owners and modes are
//! kept), and the agent never opens a file a container wrote. The helper
//! uses an image the project already has on the host, so nothing is
//! pulled.
//!
//! Nothing here holds a whole stream in memory: chunks go through as they
//! come. What arrives is checked against the sender's sha256 and length
//! (see [`Checked`]); a stream that ends early or differs fails the
//! engine's side of the copy, and the import reports an error.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, MountVolumeOptions, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use mlops_proto::stack::labels;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::EngineError;
use super::converge::plan::existing;

/// Where a helper container mounts the volume it copies. The archive's
/// entries start with this name (without the slash), so the tar one
/// helper reads is the tar the other writes at `/`.
const HELPER_MOUNT: &str = "/mlops-volume";

/// Marks helper containers, so that one left by a killed agent is found
/// and removed.
const HELPER_LABEL: &str = "mlops.volume-helper";

/// Stops the running containers of `project` (only `services` when given:
/// wave by wave when `waves` gives each its wave, a wave's at once, else
/// in the order given; all at once when none is named), first recorded in
/// `record` (see [`super::converge::stopped`]) for the next converge to
/// start them. Returns the services stopped.
pub async fn stop(
    docker: &Docker,
    project: &str,
    services: &[String],
    waves: &[u32],
    timeout: Duration,
    record: &std::path::Path,
) -> Result<Vec<String>, EngineError> {
    if !waves.is_empty() && waves.len() != services.len() {
        return Err(EngineError::bad_request(
            "waves",
            format!("{} waves for {} services: give one per service, or none", waves.len(), services.len()),
        ));
    }
    let all = existing(docker, project).await?;
    if let Some(s) = services.iter().find(|s| !all.iter().any(|c| &c.service == *s)) {
        return Err(EngineError::NotFound(format!("stack `{project}` has no service `{s}` here")));
    }
    let running: Vec<_> = all
        .into_iter()
        .filter(|c| {
            matches!(c.state.as_str(), "running" | "restarting")
                && (services.is_empty() || services.contains(&c.service))
        })
        .collect();
    let ids: Vec<String> = running.iter().map(|c| c.id.clone()).collect();
    super::converge::stopped::add(record, &ids).map_err(EngineError::io_at("recording what is stopped in", record))?;
    let options = StopContainerOptionsBuilder::new().t(timeout.as_secs().min(i32::MAX as u64) as i32).build();
    // Each group stops at once, the groups one after another.
    let groups: Vec<Vec<&str>> = if services.is_empty() {
        vec![running.iter().map(|c| c.service.as_str()).collect()]
    } else if waves.is_empty() {
        services.iter().map(|s| vec![s.as_str()]).collect()
    } else {
        let mut by_wave: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for (s, w) in services.iter().zip(waves) {
            by_wave.entry(*w).or_default().push(s);
        }
        by_wave.into_values().collect()
    };
    let mut stopped = Vec::new();
    for group in groups {
        let these: Vec<_> = running.iter().filter(|c| group.contains(&c.service.as_str())).collect();
        let stops = these.iter().map(|c| docker.stop_container(&c.id, Some(options.clone())));
        for (c, r) in these.iter().zip(futures::future::join_all(stops).await) {
            r?;
            stopped.push(c.service.clone());
        }
    }
    stopped.sort();
    stopped.dedup();
    Ok(stopped)
}

/// The whole content of volume `name` (a volume of `project`) as a tar
/// stream whose entries start with `mlops-volume/`. Refused while a
/// running container mounts it (the data must be quiet to be copied),
/// unless `live`: then files are copied as they are when read (a backup of
/// a running stack's logs and artifacts).
pub async fn export(
    docker: &Docker,
    project: &str,
    name: &str,
    live: bool,
) -> Result<impl Stream<Item = Result<Bytes, EngineError>> + use<>, EngineError> {
    check_owned(docker, project, name).await?;
    let users = users_of(docker, name).await?;
    if !live {
        refuse_running(name, &users)?;
    }
    let image = helper_image(docker, project, &users).await?;
    let helper = Helper::create(docker, project, name, &image, true).await?;
    let options = DownloadFromContainerOptionsBuilder::new().path(HELPER_MOUNT).build();
    let stream = docker.download_from_container(&helper.id, Some(options));
    // The helper goes when the stream does (read to the end or dropped).
    Ok(stream.map(move |r| {
        let _keep = &helper;
        r.map_err(EngineError::from)
    }))
}

/// Replaces the content of volume `name` (a volume of `project`) with the
/// tar stream `tar` (as [`export`] makes it). The project's containers on
/// this host that mount it must be stopped; they are removed (the next
/// converge creates them again), the volume is made again empty with its
/// driver, options and labels (or made, when it is missing), and the tar
/// is written into it. `kept_images` (those of the project's newest
/// revision) serve for the copy when no container of the project is left.
pub async fn import<S>(
    docker: &Docker,
    project: &str,
    name: &str,
    kept_images: Vec<String>,
    tar: S,
) -> Result<(), EngineError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let volume = match check_owned(docker, project, name).await {
        Ok(v) => v,
        // Not made yet (or removed by an import that was cut short): made
        // here as a converge makes it.
        Err(EngineError::NotFound(_)) => VolumeSpec {
            driver: "local".into(),
            options: HashMap::new(),
            labels: super::converge::resources::owner_labels(project),
        },
        Err(e) => return Err(e),
    };
    let users = users_of(docker, name).await?;
    refuse_running(name, &users)?;
    if let Some(other) = users.iter().find(|u| u.project != project) {
        return Err(EngineError::bad_request(
            "volume",
            format!("volume `{name}` is mounted by container {} of another project; it is left as it is", other.name),
        ));
    }
    let image = match helper_image(docker, project, &users).await {
        Ok(image) => image,
        Err(e) => {
            let mut found = None;
            for id in kept_images {
                if docker.inspect_image(&id).await.is_ok() {
                    found = Some(id);
                    break;
                }
            }
            found.ok_or(e)?
        }
    };
    for u in &users {
        super::converge::orphans::remove_container(docker, &u.id).await?;
    }
    match docker.remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.to_string()),
            driver: Some(volume.driver),
            driver_opts: Some(volume.options),
            labels: Some(volume.labels),
            ..Default::default()
        })
        .await?;
    let helper = Helper::create(docker, project, name, &image, false).await?;
    let options = UploadToContainerOptionsBuilder::new().path("/").build();
    docker.upload_to_container(&helper.id, Some(options), bollard::body_try_stream(tar)).await?;
    Ok(())
}

/// The standard output of `command` run in `service`'s running container,
/// as a stream; a last item is an error when the command fails (its exit
/// code and the end of its standard error).
pub async fn exec_out(
    docker: &Docker,
    project: &str,
    service: &str,
    command: Vec<String>,
    env: &BTreeMap<String, String>,
) -> Result<impl Stream<Item = Result<Bytes, EngineError>> + use<>, EngineError> {
    let exec = super::exec::create(docker, project, service, command, env, false).await?;
    let StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec, Some(StartExecOptions { detach: false, tty: false, output_capacity: None })).await?
    else {
        return Err(super::exec::detached());
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, EngineError>>(4);
    let (docker, service) = (docker.clone(), service.to_string());
    tokio::spawn(async move {
        let mut errors: Vec<u8> = Vec::new();
        while let Some(frame) = output.next().await {
            match frame {
                Ok(bollard::container::LogOutput::StdOut { message }) => {
                    if tx.send(Ok(message)).await.is_err() {
                        // The caller went away; the command ends when its
                        // output is no longer read (the engine closes it).
                        return;
                    }
                }
                Ok(other) => super::exec::keep_tail(&mut errors, &other.into_bytes()),
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
        let code = match docker.inspect_exec(&exec).await {
            Ok(i) => i.exit_code.unwrap_or(-1),
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if code != 0 {
            let logs = String::from_utf8_lossy(&errors).into_owned();
            let _ = tx.send(Err(EngineError::Exited { service, code, logs })).await;
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A command's input: `data`, then `trailer` once `data` ended well.
pub struct Input<S> {
    pub data: S,
    pub trailer: Bytes,
}

/// Runs `command` in `service`'s running container with `input` on its
/// standard input; its exit code and the last of its output. When the
/// data fails part-way, the command's input is closed (without the
/// trailer) and the error returned (the command has seen part of the data:
/// imports must be safe to run again, which `migrate`'s are).
pub async fn exec_in<S>(
    docker: &Docker,
    project: &str,
    service: &str,
    command: Vec<String>,
    env: &BTreeMap<String, String>,
    input: Input<S>,
) -> Result<(i64, String), EngineError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let Input { data: input, trailer } = input;
    let exec = super::exec::create(docker, project, service, command, env, true).await?;
    let StartExecResults::Attached { mut output, input: mut stdin } =
        docker.start_exec(&exec, Some(StartExecOptions { detach: false, tty: false, output_capacity: None })).await?
    else {
        return Err(super::exec::detached());
    };
    // Output is read while input is written: a command that writes much
    // would otherwise block on a full pipe and never read the rest.
    let reader = tokio::spawn(async move {
        let mut text: Vec<u8> = Vec::new();
        while let Some(frame) = output.next().await {
            match frame {
                Ok(f) => super::exec::keep_tail(&mut text, &f.into_bytes()),
                Err(e) => return Err(EngineError::from(e)),
            }
        }
        Ok(text)
    });
    let mut input = std::pin::pin!(input);
    let mut failed = None;
    while let Some(chunk) = input.next().await {
        match chunk {
            Ok(bytes) => {
                if let Err(e) = stdin.write_all(&bytes).await {
                    failed = Some(EngineError::Io {
                        what: format!("writing to `{service}`'s command"),
                        path: String::new(),
                        source: e,
                    });
                    break;
                }
            }
            Err(e) => {
                failed = Some(EngineError::Io { what: "the data stream".into(), path: String::new(), source: e });
                break;
            }
        }
    }
    if failed.is_none()
        && !trailer.is_empty()
        && let Err(e) = stdin.write_all(&trailer).await
    {
        failed =
            Some(EngineError::Io { what: format!("writing to `{service}`'s command"), path: String::new(), source: e });
    }
    let _ = stdin.shutdown().await;
    drop(stdin);
    let text = reader.await.map_err(|e| EngineError::Io {
        what: "reading the command's output".into(),
        path: String::new(),
        source: std::io::Error::other(e),
    })??;
    if let Some(e) = failed {
        return Err(e);
    }
    let code = docker.inspect_exec(&exec).await?.exit_code.unwrap_or(-1);
    Ok((code, String::from_utf8_lossy(&text).into_owned()))
}

/// A stream of chunks checked against the sender's digest: yields the
/// data, then ends only if the `end` marker came and matched; otherwise
/// its last item is an error (and the engine's side of a copy fails).
/// The digest and length that arrived are in [`Checked::result`].
pub struct Checked<S> {
    inner: S,
    hash: Sha256,
    bytes: u64,
    done: bool,
    result: Arc<Mutex<Option<(u64, String)>>>,
}

/// One item of the incoming stream: data, or the end marker with the
/// sender's sha256 and length.
pub enum Piece {
    Data(Bytes),
    End { sha256: String, bytes: u64 },
}

impl<S> Checked<S> {
    pub fn new(inner: S) -> Self {
        Checked { inner, hash: Sha256::new(), bytes: 0, done: false, result: Arc::new(Mutex::new(None)) }
    }

    /// Set once the end marker came and matched: (length, sha256).
    pub fn result(&self) -> Arc<Mutex<Option<(u64, String)>>> {
        self.result.clone()
    }
}

impl<S, E> Stream for Checked<S>
where
    S: Stream<Item = Result<Piece, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let bad = |m: String| Some(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, m)));
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the stream ended after {} bytes without its end marker", self.bytes),
                ))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(bad(format!("the stream broke after {} bytes: {e}", self.bytes)))
            }
            Poll::Ready(Some(Ok(Piece::Data(b)))) => {
                self.hash.update(&b);
                self.bytes += b.len() as u64;
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Ok(Piece::End { sha256, bytes }))) => {
                self.done = true;
                let got = hex::encode(std::mem::take(&mut self.hash).finalize());
                if got != sha256 || bytes != self.bytes {
                    return Poll::Ready(bad(format!(
                        "the data differs from what was sent: {} bytes with sha256 {got} arrived, {bytes} bytes with sha256 {sha256} were sent",
                        self.bytes
                    )));
                }
                *self.result.lock().expect("not poisoned") = Some((self.bytes, got));
                Poll::Ready(None)
            }
        }
    }
}

/// A container of any project that mounts a volume.
struct User {
    id: String,
    name: String,
    project: String,
    running: bool,
    image: String,
}

/// What a volume is made with, to make it again.
struct VolumeSpec {
    driver: String,
    options: HashMap<String, String>,
    labels: HashMap<String, String>,
}

/// Refuses a volume that is not `project`'s (created by its converge,
/// with its labels): a migration moves what the project made, nothing else.
async fn check_owned(docker: &Docker, project: &str, name: &str) -> Result<VolumeSpec, EngineError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err(EngineError::bad_request("volume", format!("`{name}` is not a volume name")));
    }
    let v = match docker.inspect_volume(name).await {
        Ok(v) => v,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
            return Err(EngineError::NotFound(format!("volume `{name}` does not exist here")));
        }
        Err(e) => return Err(e.into()),
    };
    if v.labels.get(labels::PROJECT).map(String::as_str) != Some(project) {
        return Err(EngineError::bad_request(
            "volume",
            format!(
                "volume `{name}` is not one stack `{project}` created here (no `{}` label for it)",
                labels::PROJECT
            ),
        ));
    }
    Ok(VolumeSpec { driver: v.driver, options: v.options, labels: v.labels })
}

/// Containers that mount volume `name`, with their project.
async fn users_of(docker: &Docker, name: &str) -> Result<Vec<User>, EngineError> {
    let filters = HashMap::from([("volume".to_string(), vec![name.to_string()])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    Ok(docker
        .list_containers(Some(options))
        .await?
        .into_iter()
        .filter(|c| !c.labels.as_ref().is_some_and(|l| l.contains_key(HELPER_LABEL)))
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            User {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .unwrap_or_default()
                    .first()
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                project: labels.get(labels::PROJECT).cloned().unwrap_or_default(),
                // A restarting or paused container writes again any time.
                running: c.state.is_some_and(|s| matches!(s.to_string().as_str(), "running" | "restarting" | "paused")),
                image: c.image_id.unwrap_or_default(),
            }
        })
        .collect())
}

fn refuse_running(name: &str, users: &[User]) -> Result<(), EngineError> {
    match users.iter().find(|u| u.running) {
        Some(u) => Err(EngineError::bad_request(
            "volume",
            format!("volume `{name}` is mounted by running container {}: its data is not quiet; stop it first", u.name),
        )),
        None => Ok(()),
    }
}

/// An image the host has for a helper: that of a container mounting the
/// volume, else of any container of the project.
async fn helper_image(docker: &Docker, project: &str, users: &[User]) -> Result<String, EngineError> {
    if let Some(u) = users.iter().find(|u| u.project == project && !u.image.is_empty()) {
        return Ok(u.image.clone());
    }
    let filters = super::converge::plan::project_filter(project);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    docker
        .list_containers(Some(options))
        .await?
        .into_iter()
        .find_map(|c| c.image_id.filter(|i| !i.is_empty()))
        .ok_or_else(|| {
            EngineError::NotFound(format!(
                "stack `{project}` has no container here whose image could copy its volumes (deploy it first)"
            ))
        })
}

/// A created, never started container that mounts one volume; removed
/// when dropped.
struct Helper {
    docker: Docker,
    id: String,
}

impl Helper {
    async fn create(
        docker: &Docker,
        project: &str,
        volume: &str,
        image: &str,
        read_only: bool,
    ) -> Result<Self, EngineError> {
        // One left by an agent killed mid-copy goes first.
        let filters = HashMap::from([("label".to_string(), vec![format!("{HELPER_LABEL}={volume}")])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        for c in docker.list_containers(Some(options)).await? {
            if let Some(id) = c.id {
                let _ =
                    docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
            }
        }
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            // Never run: the engine needs a command to create it.
            cmd: Some(vec!["/mlops-volume-helper-is-never-started".into()]),
            entrypoint: Some(vec![]),
            labels: Some(HashMap::from([(HELPER_LABEL.to_string(), volume.to_string())])),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                mounts: Some(vec![Mount {
                    target: Some(HELPER_MOUNT.into()),
                    source: Some(volume.into()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(read_only),
                    volume_options: Some(MountVolumeOptions { no_copy: Some(true), ..Default::default() }),
                    ..Default::default()
                }]),
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("{project}-mlops-volume-{}", super::now_ms());
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = docker.create_container(Some(options), body).await?;
        Ok(Helper { docker: docker.clone(), id: created.id })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let (docker, id) = (self.docker.clone(), std::mem::take(&mut self.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ =
                    docker.remove_container(&id, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(
        items: Vec<Result<Piece, String>>,
    ) -> Checked<futures::stream::Iter<std::vec::IntoIter<Result<Piece, String>>>> {
        Checked::new(futures::stream::iter(items))
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[tokio::test]
    async fn a_stream_counts_only_when_its_end_matches() {
        let data = |s: &'static str| Ok(Piece::Data(Bytes::from_static(s.as_bytes())));
        let end = |sha256: String, bytes| Ok(Piece::End { sha256, bytes });

        let mut good = pieces(vec![data("ab"), data("c"), end(sha(b"abc"), 3)]);
        let result = good.result();
        let mut got = Vec::new();
        while let Some(b) = good.next().await {
            got.extend_from_slice(&b.unwrap());
        }
        assert_eq!(got, b"abc");
        assert_eq!(*result.lock().unwrap(), Some((3, sha(b"abc"))));

        // Cut short: no end marker.
        let mut short = pieces(vec![data("ab")]);
        let items: Vec<_> = (&mut short).collect().await;
        assert!(items.last().unwrap().as_ref().unwrap_err().to_string().contains("without its end marker"));
        assert!(short.result().lock().unwrap().is_none());

        // Changed on the way, or a length that differs.
        for bad in [end(sha(b"abd"), 3), end(sha(b"abc"), 4)] {
            let mut s = pieces(vec![data("abc"), bad]);
            let items: Vec<_> = (&mut s).collect().await;
            assert!(items.last().unwrap().as_ref().unwrap_err().to_string().contains("differs"));
            assert!(s.result().lock().unwrap().is_none());
        }

        // Broken by the sender.
        let mut broken = pieces(vec![data("a"), Err("agent stopped".into())]);
        let items: Vec<_> = (&mut broken).collect().await;
        assert!(items.last().unwrap().as_ref().unwrap_err().to_string().contains("agent stopped"));
    }
}
