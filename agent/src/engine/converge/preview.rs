//! What a converge would do, found without doing it (`mlopsctl plan`).
//!
//! The controller syncs the new files into a scratch tree of their own
//! (never the stack's tree, which containers mount), and the preview runs
//! the converge's own phases read-only against it: the image phase's
//! states (a `build:` image is current when the image of its tag was built
//! from this very context), the config hashes, and the pure [`plan`]. A
//! service whose image would be built or pulled gets a stand-in image ID,
//! so its container is replaced exactly when converge would replace it.
//! Each replacement names the inputs that changed, read from the
//! `mlops.config-parts` label of the container it replaces.

use std::collections::BTreeMap;

use bollard::Docker;
use mlops_proto::stack::Stack;

use super::StackDirs;
use super::images::{self, ImageState};
use super::plan::{self, Action};
use crate::engine::EngineError;

/// One service's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePreview {
    pub service: String,
    /// `keep`, `start`, `create` or `recreate`.
    pub action: String,
    /// Why (for `start` and `recreate`).
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Preview {
    pub services: Vec<ServicePreview>,
    /// Services whose containers would be removed (no longer in the stack).
    pub orphans: Vec<String>,
    /// The stack's `build:` images as this host has them.
    pub images: Vec<ImageState>,
    /// `image:` tags that would be pulled.
    pub pulls: Vec<String>,
}

/// Stand-in ID of an image a converge would build or pull first.
fn stand_in(tag: &str) -> String {
    format!("(new image of {tag})")
}

pub async fn preview(docker: &Docker, stack: &Stack, dirs: &StackDirs) -> Result<Preview, EngineError> {
    let order = stack.start_order().map_err(|m| EngineError::bad_request("stack_json", m))?;
    let images = images::states(docker, stack, dirs).await?;
    let mut ids = BTreeMap::new();
    let mut pulls = Vec::new();
    for name in &order {
        let tag = stack.image_of(name);
        let id = match &stack.services[name].build {
            Some(_) => images.iter().find(|i| i.tag == tag && !i.context_hash.is_empty()).and_then(|i| i.id.clone()),
            None => match docker.inspect_image(&tag).await {
                Ok(i) => i.id,
                Err(_) => {
                    if !pulls.contains(&tag) {
                        pulls.push(tag.clone());
                    }
                    None
                }
            },
        };
        ids.insert(name.clone(), id.unwrap_or_else(|| stand_in(&tag)));
    }
    let hashes = plan::config_hashes(stack, &order, &ids, &dirs.files)?;
    let parts = plan::config_parts(stack, &order, &ids, &hashes, &dirs.files);
    let mut existing = plan::existing(docker, &stack.project).await?;
    let held = super::stopped::read(&dirs.stopped);
    for c in existing.iter_mut() {
        c.stopped = held.contains(&c.id);
    }
    let old_parts: BTreeMap<String, String> = existing
        .iter()
        .filter(|c| c.names.contains(&stack.container_name(&c.service)))
        .map(|c| (c.service.clone(), c.parts.clone()))
        .collect();
    let planned = plan::plan(stack, &order, &hashes, &parts, existing);
    let mut services = Vec::new();
    for sp in &planned.services {
        let (action, reasons) = match &sp.action {
            Action::Keep { .. } => ("keep", Vec::new()),
            Action::Start { was, .. } => ("start", vec![format!("its container is {was}")]),
            Action::Create => ("create", Vec::new()),
            Action::Recreate => {
                let old = old_parts.get(&sp.service).map(String::as_str).unwrap_or_default();
                ("recreate", why(old, &sp.parts, &ids[&sp.service]))
            }
        };
        services.push(ServicePreview { service: sp.service.clone(), action: action.into(), reasons });
    }
    let mut orphans: Vec<String> = planned.orphans.into_iter().map(|c| c.service).collect();
    orphans.sort();
    orphans.dedup();
    Ok(Preview { services, orphans, images, pulls })
}

/// Which inputs differ between the parts of the old container and the new
/// one (see `plan::config_parts`).
fn why(old: &str, new: &str, image_id: &str) -> Vec<String> {
    let (Ok(old), Ok(new)) =
        (serde_json::from_str::<serde_json::Value>(old), serde_json::from_str::<serde_json::Value>(new))
    else {
        return vec!["its configuration changed (its container predates config parts)".into()];
    };
    let mut out = Vec::new();
    if old["model"] != new["model"] {
        out.push("config".to_string());
    }
    if old["image"] != new["image"] {
        out.push(if image_id.starts_with("(new image") { "image (built or pulled first)" } else { "image" }.into());
    }
    let files = |v: &serde_json::Value| -> BTreeMap<String, String> {
        v["files"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.to_string())).collect()
    };
    let (old_files, new_files) = (files(&old), files(&new));
    for (path, sha) in &new_files {
        if old_files.get(path) != Some(sha) {
            out.push(format!("file {path}"));
        }
    }
    for path in old_files.keys().filter(|p| !new_files.contains_key(*p)) {
        out.push(format!("file {path} (no longer mounted)"));
    }
    let deps = |v: &serde_json::Value| -> BTreeMap<String, String> {
        v["deps"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.to_string())).collect()
    };
    let (old_deps, new_deps) = (deps(&old), deps(&new));
    for (dep, hash) in &new_deps {
        if old_deps.get(dep) != Some(hash) {
            out.push(format!("dependency `{dep}` is replaced"));
        }
    }
    if out.is_empty() {
        out.push("its configuration changed".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_what_changed() {
        let old = r#"{"model":"a","image":"i","files":{"./x.conf":"1"},"deps":{"db":"d1"}}"#;
        let same = why(old, old, "sha256:x");
        assert_eq!(same, ["its configuration changed"]);
        let new = r#"{"model":"b","image":"j","files":{"./x.conf":"2"},"deps":{"db":"d2"}}"#;
        assert_eq!(
            why(old, new, "(new image of t)"),
            ["config", "image (built or pulled first)", "file ./x.conf", "dependency `db` is replaced"]
        );
        assert_eq!(why("", new, "i"), ["its configuration changed (its container predates config parts)"]);
    }
}
