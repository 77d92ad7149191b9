//! Per-deployment credentials: generated once per project, kept in the
//! state directory (`secrets/<project>.env`, mode 0600, directory 0700),
//! passed to Compose interpolation, shown only by `mlopsctl secrets`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::ControllerError;

fn file(state: &Path, project: &str) -> PathBuf {
    state.join("secrets").join(format!("{project}.env"))
}

/// The stored secrets of `project` (empty when none).
pub fn load(state: &Path, project: &str) -> Result<BTreeMap<String, String>, ControllerError> {
    let path = file(state, project);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ControllerError::StateDir { path, source }),
    };
    Ok(text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// 32 random bytes, URL-safe base64 (44 characters): also the format of a
/// Fernet key.
pub fn generate() -> Result<String, ControllerError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| ControllerError::StateDir { path: "/dev/urandom".into(), source })?;
    Ok(base64::engine::general_purpose::URL_SAFE.encode(bytes))
}

/// The secrets `names` of `project`: stored ones as they are, missing ones
/// generated and stored (atomically, 0600) before they are used.
pub fn load_or_generate(
    state: &Path,
    project: &str,
    names: &[String],
) -> Result<BTreeMap<String, String>, ControllerError> {
    let mut all = load(state, project)?;
    let mut changed = false;
    for name in names {
        if !all.contains_key(name) {
            all.insert(name.clone(), generate()?);
            changed = true;
        }
    }
    if changed {
        let path = file(state, project);
        let dir = path.parent().expect("has a parent");
        let err = |source| ControllerError::StateDir { path: dir.to_path_buf(), source };
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
        let text: String = all.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        mlops_pki::write_atomic(&path, text.as_bytes(), 0o600)?;
    }
    Ok(names.iter().map(|n| (n.clone(), all[n].clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["A".to_string(), "B".to_string()];
        let first = load_or_generate(dir.path(), "p", &names).unwrap();
        assert_eq!(first["A"].len(), 44);
        assert_ne!(first["A"], first["B"]);
        let again = load_or_generate(dir.path(), "p", &names).unwrap();
        assert_eq!(first, again, "stable across deploys");
        let mode = std::fs::metadata(dir.path().join("secrets/p.env")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let more = load_or_generate(dir.path(), "p", &["C".to_string()]).unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!(load(dir.path(), "p").unwrap().len(), 3);
    }
}
