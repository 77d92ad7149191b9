//! Kept revisions of each project: what a successful converge brought the
//! host to, so the host can return to it (`Rollback`, and automatically
//! when a later converge fails).
//!
//! On the host (root only):
//! ```text
//! revisions/<project>/<n>.json   one revision: the model, the synced files'
//!                                manifest, each service's image ID and config hash
//! ```
//! The newest revision is what runs. The newest [`KEEP`] are kept; their
//! files' blobs are kept by the sync store's garbage collection, and their
//! images by a tag each (`mlops-kept:r<id>.<project>`), so neither a later
//! build that moves a service's tag nor `docker image prune` removes an
//! image a kept revision needs. A revision dropped from the list has its
//! tags removed (the image itself goes only when nothing else uses it),
//! and the project's dangling images (and the build cache under them) are
//! removed.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bollard::Docker;
use bollard::query_parameters::{ListImagesOptionsBuilder, RemoveImageOptionsBuilder, TagImageOptionsBuilder};
use serde::{Deserialize, Serialize};

use mlops_proto::stack::Stack;

use super::converge::{self, Options, StackDirs};
use super::sync::{FileEntry, SyncStore};
use super::{Action, EngineError, Events, Outcome, confine};

/// Revisions kept per project.
pub const KEEP: usize = 10;

/// Deploy ids kept per revision in [`Record::confirmed_by`].
pub const CONFIRMED_KEPT: usize = 20;

/// The repository of the tags that keep revisions' images.
const KEPT_REPO: &str = "mlops-kept";

/// One revision.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub number: u64,
    pub unix_ms: u64,
    pub operator: String,
    /// `deploy`, `rollback to N`, `secrets rotate`.
    pub action: String,
    #[serde(default)]
    pub deploy_id: String,
    /// Later deploys that found the host as this revision has it (newest
    /// last, at most [`CONFIRMED_KEPT`]): `rollback --to-deploy` finds it by
    /// their ids too.
    #[serde(default)]
    pub confirmed_by: Vec<String>,
    pub summary: String,
    /// The stack model (JSON) the converge was given.
    pub stack_json: String,
    /// The tree holding the stack's files, and what it held.
    pub files_root: String,
    pub files: Vec<FileEntry>,
    /// Whether `files` is what the tree held (a tree synced before the
    /// agent kept manifests has none: such a revision cannot be returned to).
    #[serde(default)]
    pub files_kept: bool,
    /// Service to image ID, and to config hash.
    pub images: BTreeMap<String, String>,
    pub config_hashes: BTreeMap<String, String>,
}

/// The revisions of every project on this host.
#[derive(Debug)]
pub struct Revisions {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Revisions {
    pub fn new(state_dir: &Path) -> Self {
        Revisions { dir: state_dir.join("revisions"), lock: Mutex::new(()) }
    }

    fn project_dir(&self, project: &str) -> PathBuf {
        self.dir.join(project)
    }

    /// Every kept revision of `project`, oldest first. A file that does not
    /// parse (cut by a crash) is skipped.
    pub fn list(&self, project: &str) -> Result<Vec<Record>, EngineError> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.list_locked(project)
    }

    fn list_locked(&self, project: &str) -> Result<Vec<Record>, EngineError> {
        let dir = self.project_dir(project);
        let entries = match std::fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(EngineError::io_at("reading", &dir)(e)),
        };
        // Only `<n>.json` (a temporary file a crash left is not one), and
        // only when it says it is revision n.
        let mut out: Vec<Record> = entries
            .flatten()
            .filter_map(|f| {
                let n: u64 = f.file_name().to_str()?.strip_suffix(".json")?.parse().ok()?;
                let r = serde_json::from_slice::<Record>(&std::fs::read(f.path()).ok()?).ok()?;
                (r.number == n).then_some(r)
            })
            .collect();
        out.sort_by_key(|r| r.number);
        Ok(out)
    }

    /// The newest revision (what runs), if any.
    pub fn newest(&self, project: &str) -> Result<Option<Record>, EngineError> {
        Ok(self.list(project)?.pop())
    }

    /// Forgets every revision of `project` (its stack was taken down).
    pub fn clear(&self, project: &str) -> Result<(), EngineError> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = self.project_dir(project);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io_at("removing", &dir)(e)),
        }
    }

    /// Notes on the newest revision that deploy `deploy_id` found the host
    /// as it is (see [`Record::confirmed_by`]).
    pub fn confirm(&self, project: &str, deploy_id: &str) -> Result<(), EngineError> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mut newest) = self.list_locked(project)?.pop() else { return Ok(()) };
        if deploy_id.is_empty() || newest.deploy_id == deploy_id || newest.confirmed_by.iter().any(|d| d == deploy_id) {
            return Ok(());
        }
        newest.confirmed_by.push(deploy_id.to_string());
        let extra = newest.confirmed_by.len().saturating_sub(CONFIRMED_KEPT);
        newest.confirmed_by.drain(..extra);
        self.write_locked(project, &newest)
    }

    fn write_locked(&self, project: &str, record: &Record) -> Result<(), EngineError> {
        let dir = self.project_dir(project);
        confine::private_dir(&self.dir).map_err(EngineError::io_at("creating", &self.dir))?;
        confine::private_dir(&dir).map_err(EngineError::io_at("creating", &dir))?;
        let handle = std::fs::File::open(&dir).map_err(EngineError::io_at("opening", &dir))?;
        let name = format!("{}.json", record.number);
        let bytes = serde_json::to_vec(record).expect("serializable");
        confine::write_file(handle.as_fd(), OsStr::new(&name), &mut bytes.as_slice(), 0o600)
            .map_err(EngineError::io_at("writing", &dir.join(&name)))
    }

    /// Records `record` as the newest revision (its number is assigned
    /// here) and drops the oldest beyond [`KEEP`]. Returns the number and
    /// the revisions now kept.
    pub fn record(&self, project: &str, mut record: Record) -> Result<(u64, Vec<Record>), EngineError> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut kept = self.list_locked(project)?;
        record.number = kept.last().map_or(1, |r| r.number + 1);
        self.write_locked(project, &record)?;
        let dir = self.project_dir(project);
        let number = record.number;
        kept.push(record);
        while kept.len() > KEEP {
            let old = kept.remove(0);
            let _ = std::fs::remove_file(dir.join(format!("{}.json", old.number)));
        }
        Ok((number, kept))
    }
}

/// Where a converge runs, and what its revision is recorded with.
pub struct Run<'a> {
    pub docker: &'a Docker,
    pub sync: &'a SyncStore,
    pub revisions: &'a Revisions,
    pub dirs: &'a StackDirs,
    /// Who asked (the client certificate's name).
    pub operator: String,
    pub deploy_id: String,
}

impl Run<'_> {
    /// Converges `stack` (given as `stack_json`, from tree `files_root`,
    /// first written from tree `staged` when given, which must hold what
    /// `staged_digest` says) and records the result as the newest
    /// revision. What the converge refuses up front is refused before the
    /// stack's files are written. When it fails later and `rollback` is
    /// set, the host returns to the newest revision kept before it (files,
    /// model, images), and the error says so.
    #[allow(clippy::too_many_arguments)]
    pub async fn converge(
        &self,
        stack_json: &str,
        stack: &Stack,
        files_root: &str,
        staged: Option<(&str, &str)>,
        options: &Options,
        rollback: bool,
        ev: &Events,
    ) -> Result<Outcome, EngineError> {
        let previous = self.revisions.newest(&stack.project)?;
        let staged_files = match staged {
            Some((root, digest)) => {
                let files = self
                    .sync
                    .manifest(root)?
                    .ok_or_else(|| EngineError::NotFound(format!("no files were synced to `{root}`; deploy again")))?;
                let entries: Vec<mlops_proto::v1::SyncEntry> = files.iter().map(Into::into).collect();
                if !digest.is_empty() && mlops_proto::manifest_digest(&entries) != digest {
                    return Err(EngineError::bad_request(
                        "staged_digest",
                        format!(
                            "`{root}` no longer holds the files this deploy synced (another deploy synced since); nothing was changed, deploy again"
                        ),
                    ));
                }
                converge::precheck(self.docker, stack, &self.sync.tree(root), self.dirs, &options.rotating).await?;
                Some(files)
            }
            None => None,
        };
        let converged = async {
            if let Some(files) = staged_files {
                let (sync, live) = (self.sync.clone(), files_root.to_string());
                tokio::task::spawn_blocking(move || sync.restore(&live, &files))
                    .await
                    .map_err(|e| EngineError::io("writing the stack's files")(std::io::Error::other(e)))??;
            }
            converge::converge(self.docker, stack, self.dirs, options, ev).await
        };
        match converged.await {
            Ok(outcome) => {
                let action = if options.rotating.is_empty() { "deploy" } else { "secrets rotate" };
                self.record(stack_json, &stack.project, files_root, action, &outcome).await;
                Ok(outcome)
            }
            // Nothing was touched: the stack was locked or had no engine.
            Err(e @ (EngineError::Locked { .. } | EngineError::NoEngine { .. })) => Err(e),
            Err(e) => match previous.filter(|_| rollback) {
                None => Err(e),
                Some(previous) => Err(self.back_to(&previous, e, options, ev).await),
            },
        }
    }

    /// After `cause`, the host returns to `revision`; the error says how
    /// that went.
    pub async fn back_to(&self, revision: &Record, cause: EngineError, options: &Options, ev: &Events) -> EngineError {
        let number = revision.number;
        ev.say("", Action::RollingBack, format!("returning to revision {number}: {cause}")).await;
        let mut options = options.clone();
        options.rotating.clear();
        let rollback_error = self.restore(revision, &options, ev).await.err().map(|e| e.to_string());
        EngineError::RolledBack { cause: Box::new(cause), revision: number, rollback_error }
    }

    /// Brings the project back to `revision`: its files written again from
    /// the blobs kept, its model converged with its images by ID. What can
    /// be checked first (the model, its images, its credentials against
    /// the data) is, before any file is written.
    pub async fn restore(&self, revision: &Record, options: &Options, ev: &Events) -> Result<Outcome, EngineError> {
        if !revision.files_kept {
            return Err(EngineError::NotFound(format!(
                "revision {} was made before this agent kept the files of revisions; deploy instead",
                revision.number
            )));
        }
        let stack: Stack = serde_json::from_str(&revision.stack_json)
            .map_err(|e| EngineError::bad_request("revision", format!("revision {}: {e}", revision.number)))?;
        for (service, id) in &revision.images {
            if self.docker.inspect_image(id).await.is_err() {
                return Err(EngineError::NotFound(format!(
                    "revision {}: the image of service `{service}` ({id}) is no longer on this host; deploy instead",
                    revision.number
                )));
            }
        }
        stack.start_order().map_err(|m| EngineError::bad_request("revision", m))?;
        super::converge::credentials::check_and_record(self.docker, &stack, &self.dirs.credentials, &options.rotating)
            .await?;
        let (sync, root, files) = (self.sync.clone(), revision.files_root.clone(), revision.files.clone());
        tokio::task::spawn_blocking(move || sync.restore(&root, &files))
            .await
            .map_err(|e| EngineError::io("restoring the revision's files")(std::io::Error::other(e)))??;
        let dirs = StackDirs { files: self.sync.tree(&revision.files_root), ..self.dirs.clone() };
        let options = Options { pinned: Some(revision.images.clone()), ..options.clone() };
        converge::converge(self.docker, &stack, &dirs, &options, ev).await
    }

    /// Records a revision of what now runs; a failure to record is logged
    /// (what runs is not undone for it).
    pub async fn record(&self, stack_json: &str, project: &str, files_root: &str, action: &str, outcome: &Outcome) {
        let files = match self.sync.manifest(files_root) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(project, "cannot read the files' manifest for the revision: {e}");
                None
            }
        };
        // A converge that found everything as the newest revision has it
        // is not a revision of its own.
        let newest = self.revisions.newest(project).ok().flatten();
        if action == "deploy"
            && let Some(newest) = newest
            && newest.stack_json == stack_json
            && newest.config_hashes == outcome.config_hashes
            && newest.images == outcome.images
            && files.as_ref().is_some_and(|f| *f == newest.files)
        {
            if let Err(e) = self.revisions.confirm(project, &self.deploy_id) {
                tracing::warn!(project, "cannot note the deploy on the revision: {e}");
            }
            return;
        }
        let record = Record {
            unix_ms: super::now_ms(),
            operator: self.operator.clone(),
            action: action.to_string(),
            deploy_id: self.deploy_id.clone(),
            summary: outcome.summary.clone(),
            stack_json: stack_json.to_string(),
            files_root: files_root.to_string(),
            files_kept: files.is_some(),
            files: files.unwrap_or_default(),
            images: outcome.images.clone(),
            config_hashes: outcome.config_hashes.clone(),
            ..Record::default()
        };
        match self.revisions.record(project, record) {
            Ok((_, kept)) => keep_images(self.docker, project, &kept).await,
            Err(e) => tracing::warn!(project, "cannot record the revision: {e}"),
        }
    }
}

/// The revision `to` (0: the one before the newest), or the newest of
/// deploy `to_deploy`, among `kept`; the error lists what is kept.
pub fn pick(kept: &[Record], to: u64, to_deploy: &str) -> Result<Record, EngineError> {
    let numbers = || kept.iter().map(|r| r.number.to_string()).collect::<Vec<_>>().join(", ");
    let found = if !to_deploy.is_empty() {
        kept.iter().rev().find(|r| r.deploy_id == to_deploy || r.confirmed_by.iter().any(|d| d == to_deploy))
    } else if to == 0 {
        kept.iter().rev().nth(1)
    } else {
        kept.iter().find(|r| r.number == to)
    };
    found.cloned().ok_or_else(|| {
        let what = match (to, to_deploy) {
            (_, d) if !d.is_empty() => format!("no kept revision comes from deploy `{d}`"),
            (0, _) => "no revision before the newest is kept".to_string(),
            (n, _) => format!("revision {n} is not kept"),
        };
        EngineError::NotFound(if kept.is_empty() {
            format!("{what}: this host keeps no revision of the project")
        } else {
            format!("{what} (kept: {})", numbers())
        })
    })
}

/// The tag that keeps image `id` for `project`'s revisions.
fn kept_tag(project: &str, id: &str) -> Option<String> {
    let hex = id.strip_prefix("sha256:").filter(|h| h.len() >= 32)?;
    Some(format!("r{}.{}", &hex[..32], tag_suffix(project)))
}

/// The project as the end of a tag (at most 128 characters: `r` + 32 +
/// `.` + this): itself when it fits, else a hash of it, so two long names
/// never share their tags.
fn tag_suffix(project: &str) -> String {
    use sha2::Digest;
    if project.len() <= 128 - 34 {
        project.to_string()
    } else {
        format!("h{}", hex::encode(&sha2::Sha256::digest(project.as_bytes())[..16]))
    }
}

/// Tags every image the `kept` revisions use, and removes the tags of
/// images none of them uses any more. Failures are logged: a missing tag
/// only makes an image prunable, it changes nothing that runs.
pub async fn keep_images(docker: &Docker, project: &str, kept: &[Record]) {
    let wanted: BTreeMap<String, String> = kept
        .iter()
        .flat_map(|r| r.images.values())
        .filter_map(|id| kept_tag(project, id).map(|t| (t, id.clone())))
        .collect();
    let filters = std::collections::HashMap::from([("reference".to_string(), vec![KEPT_REPO.to_string()])]);
    let have: BTreeSet<String> =
        match docker.list_images(Some(ListImagesOptionsBuilder::new().filters(&filters).build())).await {
            Ok(images) => images
                .into_iter()
                .flat_map(|i| i.repo_tags)
                .filter_map(|t| t.strip_prefix(&format!("{KEPT_REPO}:")).map(str::to_string))
                .filter(|t| t.len() > 34 && &t[33..34] == "." && t[34..] == tag_suffix(project))
                .collect(),
            Err(e) => {
                tracing::warn!(project, "cannot list the images kept for revisions: {e}");
                return;
            }
        };
    for (tag, id) in &wanted {
        if have.contains(tag) {
            continue;
        }
        let options = TagImageOptionsBuilder::new().repo(KEPT_REPO).tag(tag).build();
        if let Err(e) = docker.tag_image(id, Some(options)).await {
            tracing::warn!(project, "cannot tag {id} for a kept revision: {e}");
        }
    }
    for tag in have.iter().filter(|t| !wanted.contains_key(*t)) {
        // Untags; the image goes only when no other tag or container uses it.
        let options = RemoveImageOptionsBuilder::new().noprune(false).build();
        if let Err(e) = docker.remove_image(&format!("{KEPT_REPO}:{tag}"), Some(options), None).await {
            tracing::debug!(project, "kept tag {tag} stays: {e}");
        }
    }
    prune_dangling(docker, project).await;
}

/// Removes the project's dangling images: built here for it (they carry
/// its label), tagged by nothing (a later build moved the service's tag and
/// no kept revision tags them) and used by no container (the engine refuses
/// to remove those). Their untagged parents, the classic builder's cache
/// of their steps, go with them. Images without the project's label (other
/// projects', the user's own) are never touched; one the user built FROM
/// an image of the project inherits its label, and goes too once dangling.
async fn prune_dangling(docker: &Docker, project: &str) {
    let filters = std::collections::HashMap::from([
        ("dangling".to_string(), vec!["true".to_string()]),
        ("label".to_string(), vec![format!("{}={project}", mlops_proto::stack::labels::PROJECT)]),
    ]);
    let images = match docker.list_images(Some(ListImagesOptionsBuilder::new().filters(&filters).build())).await {
        Ok(images) => images,
        Err(e) => {
            tracing::warn!(project, "cannot list the project's dangling images: {e}");
            return;
        }
    };
    let (mut count, mut bytes) = (0, 0u64);
    for image in images {
        let options = RemoveImageOptionsBuilder::new().noprune(false).build();
        match docker.remove_image(&image.id, Some(options), None).await {
            Ok(_) => (count, bytes) = (count + 1, bytes + image.size.max(0) as u64),
            Err(e) => tracing::debug!(project, "dangling image {} stays: {e}", image.id),
        }
    }
    if count > 0 {
        tracing::info!(
            project,
            "removed {count} dangling image(s) of the project ({})",
            mlops_proto::bytes_human(bytes)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_in_order_kept_to_the_newest_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revisions::new(dir.path());
        assert!(r.newest("p").unwrap().is_none());
        for i in 1..=KEEP as u64 + 3 {
            let (n, kept) = r.record("p", Record { summary: format!("run {i}"), ..Record::default() }).unwrap();
            assert_eq!(n, i);
            assert_eq!(kept.len(), (i as usize).min(KEEP));
        }
        let all = r.list("p").unwrap();
        assert_eq!(all.first().unwrap().number, 4);
        assert_eq!(all.last().unwrap().summary, format!("run {}", KEEP + 3));
        assert!(r.list("q").unwrap().is_empty(), "per project");
        r.record("q", Record::default()).unwrap();
        r.clear("q").unwrap();
        assert!(r.list("q").unwrap().is_empty() && r.newest("p").unwrap().is_some(), "cleared, that project only");
        // A file cut by a crash is skipped, so is a temporary file it left,
        // and numbering goes on after the newest.
        std::fs::write(dir.path().join("revisions/p/99.json"), b"{\"number\": 99, \"summ").unwrap();
        let whole = std::fs::read(dir.path().join("revisions/p/5.json")).unwrap();
        std::fs::write(dir.path().join("revisions/p/.mlops-tmp.ab.1.json"), &whole).unwrap();
        assert_eq!(r.list("p").unwrap().len(), KEEP);
        assert_eq!(r.newest("p").unwrap().unwrap().number, KEEP as u64 + 3);
        r.confirm("p", "d1").unwrap();
        r.confirm("p", "d1").unwrap();
        assert_eq!(r.newest("p").unwrap().unwrap().confirmed_by, ["d1"], "once");
        let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions());
        assert_eq!(mode(&dir.path().join("revisions/p")) & 0o777, 0o700);
        assert_eq!(mode(&dir.path().join("revisions/p/5.json")) & 0o777, 0o600);
    }

    #[test]
    fn a_revision_is_picked_by_number_deploy_or_as_the_one_before() {
        let rec = |n: u64, d: &str| Record { number: n, deploy_id: d.into(), ..Record::default() };
        let kept = vec![rec(3, "a"), rec(4, "b"), rec(5, "b")];
        assert_eq!(pick(&kept, 0, "").unwrap().number, 4);
        assert_eq!(pick(&kept, 3, "").unwrap().number, 3);
        assert_eq!(pick(&kept, 0, "b").unwrap().number, 5, "the newest of that deploy");
        let confirmed = vec![rec(3, "a"), Record { confirmed_by: vec!["c".into()], ..rec(4, "b") }];
        assert_eq!(pick(&confirmed, 0, "c").unwrap().number, 4, "a deploy that changed nothing names it too");
        let e = pick(&kept, 1, "").unwrap_err().to_string();
        assert!(e.contains("revision 1 is not kept (kept: 3, 4, 5)"), "{e}");
        assert!(pick(&kept[..1], 0, "").unwrap_err().to_string().contains("no revision before the newest"));
        assert!(pick(&[], 0, "x").unwrap_err().to_string().contains("keeps no revision"));
    }

    #[test]
    fn kept_tags_are_valid_and_name_the_project() {
        let id = format!("sha256:{}", "ab".repeat(32));
        let t = kept_tag("my_proj-1", &id).unwrap();
        assert_eq!(t, format!("r{}.my_proj-1", "ab".repeat(16)));
        assert!(t.len() <= 128);
        assert!(kept_tag("p", "not-an-id").is_none());
        let long = kept_tag(&"x".repeat(200), &id).unwrap();
        assert!(long.len() <= 128 && long != kept_tag(&format!("{}y", "x".repeat(199)), &id).unwrap());
    }
}
