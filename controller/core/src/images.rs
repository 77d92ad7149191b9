//! Images built once per deploy and shipped to the other hosts, with no
//! registry. A deploy to several hosts stages every host first (Docker,
//! files, and `ImagePlan`: which of the stack's images each host has,
//! by the hash of its build context there); then [`assign`] picks, for
//! each image some host lacks, a host that has it or else the first host
//! that lacks it, which builds it (`BuildImages`, under the stack's lock)
//! before any host converges: a build that fails, fails once, and no host
//! has converged (each is staged: secrets and files in place). Then every host that lacks an image receives it
//! from its source's agent through this controller (`SaveImage` piped into
//! `LoadImage`, a few 1 MiB chunks in flight, so neither side nor the
//! controller holds an image whole); a host that already has the image ID
//! under another name is only tagged (`TagImage`), and nothing is sent.
//!
//! An image the stack pulls (`image:` without `build:`) that some host
//! lacks comes from this machine's own Docker engine when it has it and
//! no host has it or a host has the same ID (see [`crate::local_engine`]),
//! else from a host that has it, else each host pulls it in its converge.
//!
//! An image is the same on two hosts when its build context hashes the
//! same there (the agent computes it from the synced files, exactly as
//! converge does); a host whose context differs (another CA bundle, say)
//! builds its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mlops_proto::v1::agent_client::AgentClient;
use mlops_proto::v1::{
    BuildImagesRequest, ImageChunk, ImagePlanRequest, ImageState, SaveImageRequest, TagImageRequest,
};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::ControllerError;
use crate::client::AgentConn;
use crate::local_engine::LocalEngine;
use crate::progress::{Progress, Step, bytes_human};
use crate::stack::StackPlan;
use crate::transport::SharedTransport;

/// At most this many hosts load an image from one source host at once
/// (each is a `docker save` on it).
const SAVES_PER_SOURCE: usize = 3;

/// An image: its tag and the hash of its build context (empty for a
/// pulled one).
pub type ImageKey = (String, String);

/// The source named for an image from this machine's Docker engine.
pub const LOCAL: &str = "(this machine)";

/// Whether an [`ImageState`] is of an image the stack pulls.
pub fn pulled(image: &ImageState) -> bool {
    image.context_hash.is_empty()
}

/// Which host each missing image comes from, and who builds what.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Per builder host: the tags it builds.
    pub builds: BTreeMap<String, Vec<String>>,
    /// Per image some host lacks: the host it comes from.
    pub source_of: BTreeMap<ImageKey, String>,
}

/// Decides where each image comes from: `reports` are the hosts in
/// deploy order with what `ImagePlan` said. An image some host lacks
/// comes from the first host that has it, else is built by the first
/// host that lacks it; one in `available` (a host of an earlier batch of
/// the rollout has it) comes from there, and is neither built nor assigned.
/// A pulled image comes from this machine's engine ([`LOCAL`]) when
/// `local` (tag → ID there) holds it and no host has it, or a host has the
/// same ID (then no host's engine is asked for a `docker save`, and the
/// bytes cross one network instead of two); with no source at all, each
/// host pulls it.
pub fn assign(
    reports: &[(String, Vec<ImageState>)],
    available: &BTreeSet<ImageKey>,
    local: &BTreeMap<String, String>,
) -> Assignment {
    let mut out = Assignment::default();
    let key = |i: &ImageState| (i.tag.clone(), i.context_hash.clone());
    for (_, images) in reports {
        for image in images.iter().filter(|i| i.id.is_empty()) {
            let k = key(image);
            if out.source_of.contains_key(&k) || available.contains(&k) {
                continue;
            }
            let holder = reports
                .iter()
                .find_map(|(host, has)| has.iter().find(|i| !i.id.is_empty() && key(i) == k).map(|i| (host, &i.id)));
            let source = match holder {
                Some(_) if pulled(image) && local.get(&k.0) == holder.map(|(_, id)| id) => LOCAL.to_string(),
                Some((host, _)) => host.clone(),
                None if pulled(image) && local.contains_key(&k.0) => LOCAL.to_string(),
                None if pulled(image) => continue,
                None => {
                    let builder = reports
                        .iter()
                        .find(|(_, has)| has.iter().any(|i| i.id.is_empty() && key(i) == k))
                        .map(|(h, _)| h.clone())
                        .expect("someone lacks it");
                    out.builds.entry(builder.clone()).or_default().push(k.0.clone());
                    builder
                }
            };
            out.source_of.insert(k, source);
        }
    }
    out
}

/// What [`local_supply`] found in this machine's engine.
pub struct LocalSupply {
    pub engine: LocalEngine,
    /// Tag → ID, of the images it supplies.
    pub ids: BTreeMap<String, String>,
    /// Images it has but cannot supply: (tag, why).
    pub unfit: Vec<(String, String)>,
}

/// This machine's engine and the IDs it has of the pulled images that
/// some host lacks and no earlier batch has, each for a Linux of the
/// architecture of every host lacking it (`arch_of`: host → `uname -m`; a
/// host not in it is not checked); `None` when there are none or no engine
/// answers. Those it cannot supply are in `unfit` when no host has them
/// either (then each host pulls them).
pub async fn local_supply(
    reports: &[(String, Vec<ImageState>)],
    available: &BTreeSet<ImageKey>,
    arch_of: &BTreeMap<String, String>,
) -> Option<LocalSupply> {
    let key = |i: &ImageState| (i.tag.clone(), i.context_hash.clone());
    let all = || reports.iter().flat_map(|(_, images)| images.iter());
    // Tag → the hosts lacking it, and whether some host has it.
    let mut wanted: BTreeMap<String, (BTreeSet<&str>, bool)> = BTreeMap::new();
    for (host, images) in reports {
        for i in images.iter().filter(|i| pulled(i) && i.id.is_empty() && !available.contains(&key(i))) {
            let held = all().any(|h| !h.id.is_empty() && key(h) == key(i));
            let entry = wanted.entry(i.tag.clone()).or_default();
            entry.0.insert(host);
            entry.1 = held;
        }
    }
    if wanted.is_empty() {
        return None;
    }
    let engine = LocalEngine::connect().await?;
    let (mut ids, mut unfit) = (BTreeMap::new(), Vec::new());
    for (tag, (hosts, held)) in wanted {
        let Some(image) = engine.image(&tag).await else { continue };
        match unfit_for(&image, &hosts, arch_of) {
            Some(why) if !held => unfit.push((tag, why)),
            Some(_) => {}
            None => {
                ids.insert(tag, image.id);
            }
        }
    }
    Some(LocalSupply { engine, ids, unfit })
}

/// Why `image` cannot run on one of `hosts`: not Linux, or another
/// architecture than the host's (a host not in `arch_of` is not checked).
pub(crate) fn unfit_for(
    image: &crate::local_engine::LocalImage,
    hosts: &BTreeSet<&str>,
    arch_of: &BTreeMap<String, String>,
) -> Option<String> {
    let (host, arch) = hosts
        .iter()
        .filter_map(|h| arch_of.get(*h).map(|a| (*h, crate::local_engine::docker_arch(a))))
        .find(|(_, arch)| image.os != "linux" || image.arch != *arch)?;
    Some(format!("it is {}/{}, {host} is linux/{arch}", image.os, image.arch))
}

/// The answer to "where does this image come from", shared by the hosts
/// of a deploy once the builds are done. Cheap to clone.
#[derive(Clone, Default)]
pub struct ImageSources {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Grows between the batches of a rollout (see [`ImageSources::extend`]).
    sources: Mutex<HashMap<ImageKey, Result<Source, String>>>,
    /// Hosts other hosts may load images from.
    hosts: Mutex<BTreeSet<String>>,
    /// Their connections, kept open until every host is done with them.
    open: Mutex<Vec<SharedTransport>>,
}

#[derive(Clone)]
pub struct Source {
    /// A host of the deploy, or [`LOCAL`].
    host: String,
    origin: Origin,
    id: String,
    /// Built for this deploy (else the host had it).
    built: bool,
    saves: Arc<Semaphore>,
}

/// Where a source's tarball is read from.
#[derive(Clone)]
enum Origin {
    /// A host's agent (`SaveImage`).
    Agent(AgentClient<Channel>),
    /// This machine's engine.
    Local(LocalEngine),
}

impl Source {
    pub fn new(host: &str, client: AgentClient<Channel>, id: String, built: bool) -> Source {
        let saves = Arc::new(Semaphore::new(SAVES_PER_SOURCE));
        Source { host: host.to_string(), origin: Origin::Agent(client), id, built, saves }
    }

    /// Image `id` from this machine's engine.
    pub fn local(engine: LocalEngine, id: String) -> Source {
        let saves = Arc::new(Semaphore::new(SAVES_PER_SOURCE));
        Source { host: LOCAL.to_string(), origin: Origin::Local(engine), id, built: false, saves }
    }

    /// How the report names where it comes from.
    fn name(&self) -> &str {
        match self.origin {
            Origin::Agent(_) => &self.host,
            Origin::Local(_) => crate::local_engine::NAME,
        }
    }
}

impl ImageSources {
    /// Each image's source, or why it has none (its build failed, its
    /// host went away).
    pub fn new(sources: HashMap<ImageKey, Result<Source, String>>) -> ImageSources {
        // One limit per source host, whatever the image.
        let mut limits: HashMap<String, Arc<Semaphore>> = HashMap::new();
        let mut hosts = BTreeSet::new();
        let sources = sources
            .into_iter()
            .map(|(k, v)| {
                let v = v.map(|mut s| {
                    s.saves = limits.entry(s.host.clone()).or_insert_with(|| s.saves.clone()).clone();
                    hosts.insert(s.host.clone());
                    s
                });
                (k, v)
            })
            .collect();
        ImageSources {
            inner: Arc::new(Inner {
                sources: Mutex::new(sources),
                hosts: Mutex::new(hosts),
                open: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds `more` (a later batch's sources); an image already sourced
    /// keeps its source. Source hosts keep one limit on their saves.
    pub fn extend(&self, more: &ImageSources) {
        let more_sources = std::mem::take(&mut *more.inner.sources.lock().expect("not poisoned"));
        let mut sources = self.inner.sources.lock().expect("not poisoned");
        let mut hosts = self.inner.hosts.lock().expect("not poisoned");
        let limits: HashMap<String, Arc<Semaphore>> =
            sources.values().flatten().map(|s| (s.host.clone(), s.saves.clone())).collect();
        for (k, v) in more_sources {
            if sources.get(&k).is_some_and(Result::is_ok) {
                continue;
            }
            let v = v.map(|mut s| {
                if let Some(limit) = limits.get(&s.host) {
                    s.saves = limit.clone();
                }
                hosts.insert(s.host.clone());
                s
            });
            sources.insert(k, v);
        }
        drop((sources, hosts));
        let open = std::mem::take(&mut *more.inner.open.lock().expect("not poisoned"));
        self.inner.open.lock().expect("not poisoned").extend(open);
    }

    /// The images some source supplies.
    pub fn available(&self) -> BTreeSet<ImageKey> {
        let sources = self.inner.sources.lock().expect("not poisoned");
        sources.iter().filter(|(_, v)| v.is_ok()).map(|(k, _)| k.clone()).collect()
    }

    /// Whether other hosts may load images from `host`.
    pub fn is_source(&self, host: &str) -> bool {
        self.inner.hosts.lock().expect("not poisoned").contains(host)
    }

    /// Keeps a source host's connection open until [`Self::close_all`].
    pub fn keep_open(&self, transport: SharedTransport) {
        self.inner.open.lock().expect("not poisoned").push(transport);
    }

    /// Closes the connections kept for shipping, once every host is done.
    pub async fn close_all(&self) {
        let open = std::mem::take(&mut *self.inner.open.lock().expect("not poisoned"));
        for transport in open {
            transport.close().await;
        }
    }
}

/// How one image came to be current on a host.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// It was already current here.
    Current,
    /// Built here (for the other hosts too).
    Built,
    /// Another host had it; this host had the image ID and only tagged it.
    Tagged,
    /// Streamed from the host that built or had it.
    Shipped,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageOutcome {
    pub tag: String,
    pub arrival: Arrival,
    /// The host it came from, when not this one.
    pub from: Option<String>,
    pub bytes: u64,
    pub ms: u64,
}

/// `ImagePlan` on this host: the stack's images, current or not.
pub async fn plan(conn: &mut AgentConn, plan: &StackPlan) -> Result<Vec<ImageState>, ControllerError> {
    let host = conn.host().to_string();
    let request = ImagePlanRequest { stack_json: plan.stack_json_for(&host), files_root: plan.staged_root() };
    Ok(conn
        .raw()
        .image_plan(request)
        .await
        .map_err(|s| ControllerError::from_status(&host, "ImagePlan", &s))?
        .into_inner()
        .images)
}

/// `BuildImages` of `tags` on this host, then what it has.
pub async fn build(
    conn: &mut AgentConn,
    plan: &StackPlan,
    tags: Vec<String>,
    progress: &Progress,
) -> Result<Vec<ImageState>, ControllerError> {
    let host = conn.host().to_string();
    let build = BuildImagesRequest {
        stack_json: plan.stack_json_for(&host),
        holder: plan.holder.clone(),
        files_root: plan.staged_root(),
        tags,
        min_free_bytes: plan.min_free_bytes,
    };
    let stream = conn
        .raw()
        .build_images(build)
        .await
        .map_err(|s| ControllerError::from_status(&host, "BuildImages", &s))?
        .into_inner();
    crate::stack::follow(&host, "BuildImages", stream, progress).await?;
    self::plan(conn, plan).await
}

/// Makes every image in `wanted` (this host's `ImagePlan`, from before
/// any build) current here: tagged or shipped from its source.
pub async fn fetch(
    conn: &mut AgentConn,
    wanted: &[ImageState],
    sources: &ImageSources,
    progress: &Progress,
) -> Result<Vec<ImageOutcome>, ControllerError> {
    let host = conn.host().to_string();
    let mut out = Vec::new();
    for image in wanted {
        let tag = image.tag.clone();
        if !image.id.is_empty() {
            out.push(ImageOutcome { tag, arrival: Arrival::Current, from: None, bytes: 0, ms: 0 });
            continue;
        }
        let key = (image.tag.clone(), image.context_hash.clone());
        let found = sources.inner.sources.lock().expect("not poisoned").get(&key).cloned();
        let source = match &found {
            Some(Ok(source)) => source,
            // A pulled image whose source failed: the converge pulls it.
            Some(Err(message)) if pulled(image) => {
                progress.step(Step::Image { tag, detail: format!("no source ({message}); pulled instead") });
                continue;
            }
            Some(Err(message)) => {
                return Err(ControllerError::ImageSource { host, tag, message: message.clone() });
            }
            // Pulled in the converge (no host nor this machine has it).
            None if pulled(image) => continue,
            None => {
                let message = "no host of this deploy has it or built it".to_string();
                return Err(ControllerError::ImageSource { host, tag, message });
            }
        };
        if source.host == host {
            let arrival = if source.built { Arrival::Built } else { Arrival::Current };
            out.push(ImageOutcome { tag, arrival, from: None, bytes: 0, ms: 0 });
            continue;
        }
        let started = Instant::now();
        let tagged = conn
            .raw()
            .tag_image(TagImageRequest { id: source.id.clone(), tag: tag.clone() })
            .await
            .map_err(|s| ControllerError::from_status(&host, "TagImage", &s))?
            .into_inner()
            .present;
        if tagged {
            progress.step(Step::Image {
                tag: tag.clone(),
                detail: format!("as on {}; this host has its ID, nothing sent", source.name()),
            });
            let ms = started.elapsed().as_millis() as u64;
            out.push(ImageOutcome {
                tag,
                arrival: Arrival::Tagged,
                from: Some(source.name().to_string()),
                bytes: 0,
                ms,
            });
            continue;
        }
        let (bytes, ms) = match ship(conn, source, &tag, progress).await {
            Ok(done) => done,
            // Pulled where it could not be shipped (the converge pulls it
            // when the host still lacks it).
            Err(e) if pulled(image) => {
                let why = crate::client::error_chain(&e);
                progress.step(Step::Image {
                    tag,
                    detail: format!("not shipped from {}: {why}; pulled instead", source.name()),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        progress.step(Step::Image {
            tag: tag.clone(),
            detail: format!(
                "shipped from {}: {} in {:.1} s ({}/s)",
                source.name(),
                bytes_human(bytes),
                ms as f64 / 1000.0,
                bytes_human((bytes as f64 / (ms.max(1) as f64 / 1000.0)) as u64)
            ),
        });
        out.push(ImageOutcome { tag, arrival: Arrival::Shipped, from: Some(source.name().to_string()), bytes, ms });
    }
    Ok(out)
}

/// Streams `tag` from `source` into this host's engine (the bytes reported
/// to `progress` as they go); bytes and milliseconds.
async fn ship(
    conn: &mut AgentConn,
    source: &Source,
    tag: &str,
    progress: &Progress,
) -> Result<(u64, u64), ControllerError> {
    let host = conn.host().to_string();
    let _permit = source.saves.acquire().await.expect("never closed");
    let started = Instant::now();
    // What goes wrong on the source is not this host's connection
    // breaking: no retry here, the error names the source.
    let (to, what, from) = (host.clone(), tag.to_string(), source.host.clone());
    let failed = move |message: String| ControllerError::ImageSource { host: to.clone(), tag: what.clone(), message };
    let from_source = {
        let failed = failed.clone();
        move |s: tonic::Status| {
            failed(crate::client::error_chain(&ControllerError::from_status(&from, "SaveImage", &s)))
        }
    };
    type Tarball =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<prost::bytes::Bytes, ControllerError>> + Send>>;
    let mut tarball: Tarball = match &source.origin {
        Origin::Agent(client) => {
            let save = SaveImageRequest { tag: tag.to_string(), id: source.id.clone() };
            let stream = client.clone().save_image(save).await.map_err(from_source.clone())?.into_inner();
            Box::pin(stream.map(move |c| c.map(|c| c.data).map_err(&from_source)))
        }
        Origin::Local(engine) => {
            // The tag may have moved since it was looked up: what is
            // loaded is checked against the ID on the host's side.
            let local = move |e: String| failed(format!("{}: {e}", crate::local_engine::NAME));
            Box::pin(engine.save(tag).map(move |c| c.map_err(&local)))
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let first = ImageChunk { tag: tag.to_string(), id: source.id.clone(), data: Default::default() };
    tx.send(first).await.expect("the receiver is here");
    // A failed save must fail the load, not end it early: the load call is
    // dropped (cancelled) when forwarding returns an error.
    let (chunk_tag, chunk_id) = (tag.to_string(), source.id.clone());
    // The size of an image's tarball is known only once it is made.
    let mut meter = crate::progress::TransferMeter::new(progress, format!("image {tag} from {}", source.name()), None);
    let forward = async move {
        while let Some(data) = tarball.next().await {
            let mut rest = data?;
            meter.add(rest.len() as u64);
            // The engine's pieces can be larger than a gRPC message may be.
            while !rest.is_empty() {
                let data = rest.split_to(rest.len().min(mlops_proto::IMAGE_CHUNK));
                let chunk = ImageChunk { tag: chunk_tag.clone(), id: chunk_id.clone(), data };
                if tx.send(chunk).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok::<_, ControllerError>(())
    };
    let load = async {
        conn.raw()
            .load_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ControllerError::from_status(&host, "LoadImage", &s))
    };
    let ((), reply) = tokio::try_join!(forward, load)?;
    Ok((reply.bytes, started.elapsed().as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(tag: &str, hash: &str, id: &str) -> ImageState {
        ImageState { service: tag.into(), tag: tag.into(), context_hash: hash.into(), id: id.into() }
    }

    #[test]
    fn an_image_comes_from_a_host_that_has_it_else_the_first_that_lacks_it_builds_it() {
        let reports = vec![
            ("a".to_string(), vec![state("py", "h1", ""), state("pg", "h2", "")]),
            ("b".to_string(), vec![state("py", "h1", ""), state("pg", "h2", "sha256:pg")]),
            ("c".to_string(), vec![state("py", "h1", ""), state("pg", "h2", "")]),
        ];
        let a = assign(&reports, &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(a.builds, BTreeMap::from([("a".to_string(), vec!["py".to_string()])]));
        assert_eq!(a.source_of[&("py".into(), "h1".into())], "a");
        assert_eq!(a.source_of[&("pg".into(), "h2".into())], "b", "b has it: nobody builds it");
    }

    #[test]
    fn another_context_is_another_image() {
        // c's context differs (another CA bundle, say): it builds its own.
        let reports = vec![
            ("a".to_string(), vec![state("py", "h1", "sha256:1")]),
            ("b".to_string(), vec![state("py", "h1", "")]),
            ("c".to_string(), vec![state("py", "other", "")]),
        ];
        let a = assign(&reports, &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(a.builds, BTreeMap::from([("c".to_string(), vec!["py".to_string()])]));
        assert_eq!(a.source_of[&("py".into(), "h1".into())], "a");
        assert_eq!(a.source_of[&("py".into(), "other".into())], "c");
    }

    #[test]
    fn a_pulled_image_comes_from_this_machine_when_it_has_the_same_else_a_host_else_is_pulled() {
        let reports = vec![
            (
                "a".to_string(),
                vec![
                    state("grafana", "", ""),
                    state("redis", "", "sha256:r"),
                    state("pg", "", "sha256:p"),
                    state("x", "", ""),
                ],
            ),
            (
                "b".to_string(),
                vec![state("grafana", "", ""), state("redis", "", ""), state("pg", "", ""), state("x", "", "")],
            ),
        ];
        let local = BTreeMap::from([
            ("grafana".to_string(), "sha256:g".to_string()),
            ("redis".to_string(), "sha256:another".to_string()),
            ("pg".to_string(), "sha256:p".to_string()),
        ]);
        let a = assign(&reports, &BTreeSet::new(), &local);
        assert!(a.builds.is_empty(), "a pulled image is never built: {a:?}");
        assert_eq!(a.source_of[&("grafana".into(), String::new())], LOCAL);
        assert_eq!(a.source_of[&("redis".into(), String::new())], "a", "this machine's is another image");
        assert_eq!(a.source_of[&("pg".into(), String::new())], LOCAL, "the same image: no host saves it");
        assert!(!a.source_of.contains_key(&("x".into(), String::new())), "no source: each host pulls it");
    }

    #[test]
    fn an_image_from_this_machine_must_fit_every_host_that_lacks_it() {
        let image = |os: &str, arch: &str| crate::local_engine::LocalImage {
            id: "sha256:x".into(),
            os: os.into(),
            arch: arch.into(),
        };
        let arch_of = BTreeMap::from([("a".to_string(), "x86_64".to_string()), ("b".into(), "aarch64".into())]);
        let a = BTreeSet::from(["a"]);
        assert_eq!(unfit_for(&image("linux", "amd64"), &a, &arch_of), None);
        assert_eq!(unfit_for(&image("linux", "amd64"), &BTreeSet::from(["unknown"]), &arch_of), None);
        let why = unfit_for(&image("linux", "amd64"), &BTreeSet::from(["a", "b"]), &arch_of).unwrap();
        assert_eq!(why, "it is linux/amd64, b is linux/arm64");
        assert!(unfit_for(&image("windows", "amd64"), &a, &arch_of).unwrap().contains("windows/amd64"));
    }

    #[test]
    fn nothing_missing_nothing_to_do() {
        let reports = vec![("a".to_string(), vec![state("py", "h1", "sha256:1")])];
        assert_eq!(assign(&reports, &BTreeSet::new(), &BTreeMap::new()), Assignment::default());
    }

    #[test]
    fn an_image_an_earlier_batch_has_is_neither_built_nor_reassigned() {
        let reports = vec![("c".to_string(), vec![state("py", "h1", ""), state("pg", "h2", "")])];
        let earlier = BTreeSet::from([("py".to_string(), "h1".to_string())]);
        let a = assign(&reports, &earlier, &BTreeMap::new());
        assert_eq!(a.builds, BTreeMap::from([("c".to_string(), vec!["pg".to_string()])]));
        assert!(!a.source_of.contains_key(&("py".into(), "h1".into())));
    }
}
