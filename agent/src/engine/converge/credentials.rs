//! Phase 0: credentials of data that exists. A service's named volume
//! holds data made with the credentials it first ran with (PostgreSQL keeps
//! the password its cluster was initialised with; Grafana its admin's). A
//! model that would start such a service with another value of one of them
//! is refused before anything is touched, naming the service, the variable
//! and the volume; only a rotation (`ConvergeRequest.rotating`, which
//! changed the value in the data first) may change it.
//!
//! The record: `<state>/credentials/<project>.json`, volume name → `service/
//! VARIABLE` → the hash the model carries (`StackOptions.credentials`).
//! A volume first seen (or made) by a deploy takes that deploy's values;
//! a volume gone (`down --volumes`) takes the next one's afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bollard::Docker;
use bollard::query_parameters::ListVolumesOptionsBuilder;
use mlops_proto::stack::{MountKind, Stack};

use super::plan::project_filter;
use crate::engine::EngineError;
use crate::engine::confine;

type Records = BTreeMap<String, BTreeMap<String, String>>;

/// Checks the model against the record, then records it. `rotating`: the
/// secrets a rotation changes (their credentials may differ).
pub async fn check_and_record(
    docker: &Docker,
    stack: &Stack,
    file: &Path,
    rotating: &[String],
) -> Result<(), EngineError> {
    let existing: BTreeSet<String> = docker
        .list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&project_filter(&stack.project)).build()))
        .await?
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    let mut records = read(file)?;
    let before = records.clone();
    // Volumes gone since they were recorded start afresh.
    records.retain(|volume, _| existing.contains(volume));
    for (service, svc) in &stack.services {
        let Some(creds) = stack.options.credentials.get(service) else { continue };
        for m in &svc.volumes {
            if m.kind != MountKind::Volume || m.source.is_empty() {
                continue;
            }
            let volume = stack.volume_name(&m.source);
            let held = records.entry(volume.clone()).or_default();
            for (var, cred) in creds {
                let key = format!("{service}/{var}");
                match held.get(&key) {
                    Some(h) if *h == cred.sha256 => {}
                    Some(_) if cred.secrets.iter().any(|s| rotating.contains(s)) => {
                        held.insert(key, cred.sha256.clone());
                    }
                    Some(_) => {
                        return Err(EngineError::CredentialChanged {
                            service: service.clone(),
                            variable: var.clone(),
                            volume,
                            secrets: cred.secrets.clone(),
                        });
                    }
                    None => {
                        held.insert(key, cred.sha256.clone());
                    }
                }
            }
        }
    }
    records.retain(|_, held| !held.is_empty());
    if records != before {
        write(file, &records)?;
    }
    Ok(())
}

fn read(file: &Path) -> Result<Records, EngineError> {
    match std::fs::read_to_string(file) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| EngineError::Io {
            what: format!("{} is damaged", file.display()),
            path: file.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Records::new()),
        Err(e) => Err(EngineError::io_at("cannot read", file)(e)),
    }
}

fn write(file: &Path, records: &Records) -> Result<(), EngineError> {
    let dir = file.parent().expect("a file in a directory");
    confine::private_dir(dir).map_err(EngineError::io_at("cannot prepare", dir))?;
    let handle = std::fs::File::open(dir).map_err(EngineError::io_at("cannot open", dir))?;
    let text = serde_json::to_vec_pretty(records).expect("serializable");
    use std::os::fd::AsFd;
    confine::write_file(handle.as_fd(), file.file_name().expect("a file name"), &mut text.as_slice(), 0o600)
        .map_err(EngineError::io_at("cannot write", file))
}
