//! Phase 3: what each service's container needs, decided without changing
//! anything.
//!
//! Each service gets a *config hash*: its model, the ID of its image, the
//! Docker names of its networks and volumes, the contents of the single
//! files it bind-mounts from the stack directory, and the hashes of the
//! services it depends on (so a dependant is replaced with its
//! dependency). Containers carry the hash as a label; a container whose
//! label and name match is kept. Directory bind mounts (a DAGs folder) are
//! live: their contents do not enter the hash, so a synced change reaches
//! the container without a restart.
//!
//! [`plan`] is a pure function of the model, the hashes and a snapshot of
//! the project's containers ([`existing`]), so it can be tested without an
//! engine and shown before anything is done.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use mlops_proto::stack::{Condition, MountKind, Service, Stack, labels};
use sha2::{Digest, Sha256};

use super::hash_source;
use crate::engine::EngineError;

/// A container of the project, as found before the converge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub id: String,
    /// The service label (may name a service no longer in the stack).
    pub service: String,
    /// Container names, without the leading `/`.
    pub names: Vec<String>,
    pub config_hash: String,
    /// Its `mlops.config-parts` label (empty from an older agent).
    pub parts: String,
    /// Docker's state: running, exited, created, ...
    pub state: String,
    /// For an exited container; 0 otherwise.
    pub exit_code: i64,
    /// Stopped by `StopServices` (see [`super::stopped`]), not exited by
    /// itself: a service that may complete is not done, it runs again.
    pub stopped: bool,
}

/// What to do with one service's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Up to date and running (or a one-shot that has done its job).
    Keep { id: String, state: String },
    /// Up to date but stopped: start it again.
    Start { id: String, was: String },
    /// No container yet.
    Create,
    /// The configuration changed: the `stale` containers go, a new one comes.
    Recreate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub service: String,
    pub hash: String,
    /// What went into `hash` ([`config_parts`]); the new container's label.
    pub parts: String,
    pub action: Action,
    /// Containers of the service to remove first (old configuration,
    /// duplicates, wrong name).
    pub stale: Vec<String>,
}

/// The whole plan: services in start order, and orphans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    /// Containers of services no longer in the stack.
    pub orphans: Vec<Existing>,
}

/// A service whose container may exit 0 and be done (an init or migration
/// step): nothing restarts it.
pub fn completes(svc: &Service) -> bool {
    matches!(svc.restart.as_deref(), None | Some("no") | Some("on-failure"))
        || svc.restart.as_deref().is_some_and(|r| r.starts_with("on-failure:"))
}

/// Services some other service waits on to complete: for them only exit 0
/// will do.
pub fn one_shots(stack: &Stack) -> BTreeSet<&str> {
    stack
        .services
        .values()
        .flat_map(|s| s.depends_on.iter())
        .filter(|(_, c)| **c == Condition::ServiceCompletedSuccessfully)
        .map(|(d, _)| d.as_str())
        .collect()
}

/// The config hash of each service, computed in start order (a
/// dependant's hash includes its dependencies').
pub fn config_hashes(
    stack: &Stack,
    order: &[String],
    image_ids: &BTreeMap<String, String>,
    files_dir: &Path,
) -> Result<BTreeMap<String, String>, EngineError> {
    let mut hashes = BTreeMap::new();
    for name in order {
        let svc = &stack.services[name];
        let mut h = Sha256::new();
        let mut model = svc.clone();
        model.profiles.clear();
        h.update(serde_json::to_vec(&model).expect("serializable"));
        h.update(b"\0image=");
        h.update(image_ids[name].as_bytes());
        for net in stack.service_networks(name) {
            h.update(format!("\0net={}", stack.network_name(&net)).as_bytes());
        }
        for m in &svc.volumes {
            match m.kind {
                MountKind::Volume if !m.source.is_empty() => {
                    h.update(format!("\0vol={}", stack.volume_name(&m.source)).as_bytes());
                }
                MountKind::Bind => {
                    if let Some(sha) = hash_source(files_dir, &m.source) {
                        h.update(format!("\0file={}=", m.source).as_bytes());
                        h.update(sha.as_bytes());
                    }
                }
                _ => {}
            }
        }
        for dep in svc.depends_on.keys() {
            h.update(format!("\0dep={dep}={}", hashes[dep]).as_bytes());
        }
        hashes.insert(name.clone(), hex::encode(h.finalize()));
    }
    Ok(hashes)
}

/// What went into each service's config hash, in parts (a JSON object:
/// `model` (the service's model with its networks and volumes), `image`,
/// `files` (each mounted file's hash), `deps` (each dependency's config
/// hash); hashes cut to 16 hex digits). Stored on the container, it lets a
/// plan say which input changed; it decides nothing itself.
pub fn config_parts(
    stack: &Stack,
    order: &[String],
    image_ids: &BTreeMap<String, String>,
    hashes: &BTreeMap<String, String>,
    files_dir: &Path,
) -> BTreeMap<String, String> {
    let short = |bytes: &[u8]| hex::encode(&Sha256::digest(bytes)[..8]);
    let mut out = BTreeMap::new();
    for name in order {
        let svc = &stack.services[name];
        let mut model = svc.clone();
        model.profiles.clear();
        let mut text = serde_json::to_string(&model).expect("serializable");
        for net in stack.service_networks(name) {
            text.push_str(&format!("\0net={}", stack.network_name(&net)));
        }
        let mut files = BTreeMap::new();
        for m in &svc.volumes {
            match m.kind {
                MountKind::Volume if !m.source.is_empty() => {
                    text.push_str(&format!("\0vol={}", stack.volume_name(&m.source)));
                }
                MountKind::Bind => {
                    if let Some(sha) = hash_source(files_dir, &m.source) {
                        files.insert(m.source.clone(), sha[..16].to_string());
                    }
                }
                _ => {}
            }
        }
        let deps: BTreeMap<&String, &str> =
            svc.depends_on.keys().map(|d| (d, hashes.get(d).map_or("", |h| &h[..h.len().min(16)]))).collect();
        let parts = serde_json::json!({
            "model": short(text.as_bytes()),
            "image": short(image_ids.get(name).map_or(&b""[..], |i| i.as_bytes())),
            "files": files,
            "deps": deps,
        });
        out.insert(name.clone(), parts.to_string());
    }
    out
}

/// The label filter that selects a project's containers, networks, volumes.
pub fn project_filter(project: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![format!("{}={project}", labels::PROJECT)])])
}

/// Every container of `project` (running or not), with what the plan needs.
pub async fn existing(docker: &Docker, project: &str) -> Result<Vec<Existing>, EngineError> {
    let options = ListContainersOptionsBuilder::new().all(true).filters(&project_filter(project)).build();
    let mut out = Vec::new();
    for c in docker.list_containers(Some(options)).await? {
        let labels = c.labels.unwrap_or_default();
        let id = c.id.unwrap_or_default();
        let state = c.state.map(|s| s.to_string()).unwrap_or_default();
        // The list does not carry exit codes; only exited containers need one.
        let exit_code = if state == "exited" {
            match docker.inspect_container(&id, None::<InspectContainerOptions>).await {
                Ok(i) => i.state.and_then(|s| s.exit_code).unwrap_or(0),
                // Removed since it was listed: it is not there any more.
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        } else {
            0
        };
        out.push(Existing {
            service: labels.get(labels::SERVICE).cloned().unwrap_or_default(),
            config_hash: labels.get(labels::CONFIG_HASH).cloned().unwrap_or_default(),
            parts: labels.get(labels::CONFIG_PARTS).cloned().unwrap_or_default(),
            names: c.names.unwrap_or_default().into_iter().map(|n| n.trim_start_matches('/').to_string()).collect(),
            id,
            state,
            exit_code,
            stopped: false,
        });
    }
    Ok(out)
}

/// What to do with each service's container, in start order, and which
/// containers are orphans.
pub fn plan(
    stack: &Stack,
    order: &[String],
    hashes: &BTreeMap<String, String>,
    parts: &BTreeMap<String, String>,
    existing: Vec<Existing>,
) -> Plan {
    let mut by_service: BTreeMap<String, Vec<Existing>> = BTreeMap::new();
    for c in existing {
        by_service.entry(c.service.clone()).or_default().push(c);
    }
    let mut services = Vec::new();
    for name in order {
        let svc = &stack.services[name];
        let hash = hashes[name].clone();
        let mine = by_service.remove(name).unwrap_or_default();
        let wanted_name = stack.container_name(name);
        let (mut keep, stale): (Vec<Existing>, Vec<Existing>) =
            mine.into_iter().partition(|c| c.config_hash == hash && c.names.contains(&wanted_name));
        // One container per service: any duplicate goes too.
        let mut stale: Vec<String> = stale.into_iter().map(|c| c.id).collect();
        if keep.len() > 1 {
            stale.extend(keep.drain(1..).map(|c| c.id));
        }
        let action = match keep.pop() {
            Some(c)
                if c.state == "running"
                    || (c.state == "exited" && c.exit_code == 0 && completes(svc) && !c.stopped) =>
            {
                Action::Keep { id: c.id, state: c.state }
            }
            Some(c) => Action::Start { id: c.id, was: c.state },
            None if stale.is_empty() => Action::Create,
            None => Action::Recreate,
        };
        let parts = parts.get(name).cloned().unwrap_or_default();
        services.push(ServicePlan { service: name.clone(), hash, parts, action, stale });
    }
    Plan { services, orphans: by_service.into_values().flatten().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlops_proto::stack::Service;

    fn stack(names: &[&str]) -> Stack {
        Stack {
            project: "p".into(),
            services: names.iter().map(|n| (n.to_string(), Service::default())).collect(),
            ..Default::default()
        }
    }

    fn container(stack: &Stack, service: &str, hash: &str, state: &str, exit_code: i64) -> Existing {
        Existing {
            id: format!("{service}-{hash}-{state}"),
            service: service.into(),
            names: vec![stack.container_name(service)],
            config_hash: hash.into(),
            parts: String::new(),
            state: state.into(),
            exit_code,
            stopped: false,
        }
    }

    fn hashes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn matching_running_containers_are_kept_and_nothing_else_happens() {
        let s = stack(&["a", "b"]);
        let order = vec!["a".to_string(), "b".to_string()];
        let found = vec![container(&s, "a", "h1", "running", 0), container(&s, "b", "h2", "running", 0)];
        let p = plan(&s, &order, &hashes(&[("a", "h1"), ("b", "h2")]), &BTreeMap::new(), found);
        assert!(p.orphans.is_empty());
        for sp in &p.services {
            assert!(matches!(sp.action, Action::Keep { .. }), "{sp:?}");
            assert!(sp.stale.is_empty());
        }
    }

    #[test]
    fn a_changed_hash_recreates_and_a_missing_container_is_created() {
        let s = stack(&["a", "b"]);
        let order = vec!["a".to_string(), "b".to_string()];
        let old = container(&s, "a", "old", "running", 0);
        let p = plan(&s, &order, &hashes(&[("a", "new"), ("b", "h")]), &BTreeMap::new(), vec![old.clone()]);
        assert_eq!(p.services[0].action, Action::Recreate);
        assert_eq!(p.services[0].stale, vec![old.id]);
        assert_eq!(p.services[1].action, Action::Create);
    }

    #[test]
    fn stopped_containers_start_unless_they_completed() {
        let mut s = stack(&["init", "web", "daemon"]);
        s.services.get_mut("daemon").unwrap().restart = Some("always".into());
        let order: Vec<String> = ["init", "web", "daemon"].map(String::from).to_vec();
        let found = vec![
            container(&s, "init", "h", "exited", 0),
            container(&s, "web", "h", "exited", 1),
            container(&s, "daemon", "h", "exited", 0),
        ];
        let p =
            plan(&s, &order, &hashes(&[("init", "h"), ("web", "h"), ("daemon", "h")]), &BTreeMap::new(), found.clone());
        assert!(matches!(p.services[0].action, Action::Keep { .. }), "an init step that exited 0 is done");
        let mut stopped = found;
        stopped[0].stopped = true;
        let q = plan(&s, &order, &hashes(&[("init", "h"), ("web", "h"), ("daemon", "h")]), &BTreeMap::new(), stopped);
        assert!(matches!(q.services[0].action, Action::Start { .. }), "one stopped by StopServices is not done");
        assert!(matches!(&p.services[1].action, Action::Start { was, .. } if was == "exited"), "a failure is retried");
        assert!(
            matches!(p.services[2].action, Action::Start { .. }),
            "a service restarted `always` is not done when it exits 0"
        );
    }

    #[test]
    fn orphans_duplicates_and_foreign_names_are_found() {
        let s = stack(&["a"]);
        let order = vec!["a".to_string()];
        let keep = container(&s, "a", "h", "running", 0);
        let duplicate = Existing { id: "dup".into(), ..keep.clone() };
        let renamed = Existing { id: "renamed".into(), names: vec!["other-name".into()], ..keep.clone() };
        let orphan = container(&s, "gone", "h", "running", 0);
        let p = plan(
            &s,
            &order,
            &hashes(&[("a", "h")]),
            &BTreeMap::new(),
            vec![keep.clone(), duplicate, renamed, orphan.clone()],
        );
        assert_eq!(p.services[0].action, Action::Keep { id: keep.id, state: "running".into() });
        let mut stale = p.services[0].stale.clone();
        stale.sort();
        assert_eq!(stale, ["dup", "renamed"]);
        assert_eq!(p.orphans, vec![orphan]);
    }
}
