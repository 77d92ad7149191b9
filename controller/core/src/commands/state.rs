//! `mlopsctl state export|import`: the controller's own state (its CA or
//! operator identity, the revocation list, the operators it added, the
//! cache of secrets), sealed into one file, to move a controller to another
//! machine or keep a copy. Caches that rebuild themselves (file hashes, the
//! unpacked platform bundle) are left out.
//!
//! Import writes into a state directory without a CA only, every file
//! through a temporary name, the directory's files last-to-first so that a
//! `pki/ca.pem` (what marks a CA as present) appears only once the rest is
//! there.

use std::path::{Path, PathBuf};

use base64::Engine;
use mlops_vault::{OpenWith, SealTo};
use serde::{Deserialize, Serialize};

use crate::ControllerError;
use crate::state::StateDir;

const KIND: &str = "mlopsctl-state";

/// What is carried: `pki/` and `secrets/`.
const CARRIED: &[&str] = &["pki", "secrets"];

#[derive(Serialize, Deserialize)]
struct Export {
    kind: String,
    version: u32,
    files: Vec<File>,
}

#[derive(Serialize, Deserialize)]
struct File {
    /// Relative to the state directory, `/`-separated, no `..`.
    path: String,
    mode: u32,
    data: String,
}

/// What an export or import carried.
#[derive(Debug, Serialize)]
pub struct Moved {
    pub state_dir: PathBuf,
    pub files: usize,
    pub operator: String,
    pub root: bool,
}

/// Seals the state directory's `pki/` and `secrets/` into `out` (mode
/// 0600, never over an existing file).
pub fn export(state: &StateDir, to: &SealTo, out: &Path) -> Result<Moved, ControllerError> {
    let mut files = Vec::new();
    for top in CARRIED {
        collect(&state.path, &state.path.join(top), &mut files)?;
    }
    let count = files.len();
    let export = Export { kind: KIND.into(), version: 1, files };
    let sealed = mlops_vault::seal(&serde_json::to_vec(&export).expect("serializable"), to)
        .map_err(|e| ControllerError::usage(e.to_string(), None))?;
    super::operator::write_new(out, sealed.as_bytes())?;
    Ok(Moved {
        state_dir: state.path.clone(),
        files: count,
        operator: state.ca.operator_name(),
        root: state.ca.is_root(),
    })
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<File>) -> Result<(), ControllerError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ControllerError::StateDir { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(err(dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // Locks and temporary files are this machine's business.
        if name == ".lock" || name.contains(".tmp.") {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).map_err(err(&path))?;
        if meta.is_dir() {
            collect(base, &path, out)?;
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let data = std::fs::read(&path).map_err(err(&path))?;
            let rel = path.strip_prefix(base).expect("under the base").to_string_lossy().into_owned();
            out.push(File {
                path: rel,
                mode: meta.permissions().mode() & 0o777,
                data: base64::engine::general_purpose::STANDARD.encode(data),
            });
        }
    }
    Ok(())
}

/// Opens an export into the state directory at `path`, which must hold no
/// CA yet.
pub fn import(path: &Path, sealed: &[u8], with: &OpenWith) -> Result<Moved, ControllerError> {
    let plain = mlops_vault::open(sealed, with).map_err(|e| {
        ControllerError::usage(
            e.to_string(),
            Some("check the file and the passphrase or age identity it was sealed for"),
        )
    })?;
    let export: Export =
        serde_json::from_slice(&plain).ok().filter(|e: &Export| e.kind == KIND && e.version == 1).ok_or_else(|| {
            ControllerError::usage("this is not a state export of mlopsctl", Some("`mlopsctl state export` makes one"))
        })?;
    if path.join("pki/ca.pem").exists() {
        return Err(ControllerError::usage(
            format!("the state directory `{}` already has a CA; an import never replaces one", path.display()),
            Some("import into a new state directory: --state-dir DIR (or MLOPS_STATE_DIR)"),
        ));
    }
    // Every path is checked before anything is written.
    let mut files = Vec::new();
    for f in &export.files {
        let rel = Path::new(&f.path);
        let safe = rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
            && CARRIED.iter().any(|top| rel.starts_with(top));
        if !safe {
            return Err(ControllerError::usage(
                format!("the export holds a path outside the state: `{}`", f.path),
                None,
            ));
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(&f.data)
            .map_err(|_| ControllerError::usage(format!("the export's `{}` is damaged", f.path), None))?;
        // The owner's bits and reading by others, as exported; never more.
        files.push((rel.to_path_buf(), (f.mode & 0o700) | (f.mode & 0o044), data));
    }
    // `ca.pem` files last: their presence marks a CA as complete.
    files.sort_by_key(|(p, _, _)| p.file_name().is_some_and(|n| n == "ca.pem"));
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ControllerError::StateDir { path: p, source }
    };
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err(path))?;
    for (rel, mode, data) in &files {
        let target = path.join(rel);
        let dir = target.parent().expect("has a parent");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err(dir))?;
        mlops_pki::write_atomic(&target, data, *mode)?;
    }
    let state = StateDir::open(path)?;
    Ok(Moved {
        state_dir: state.path.clone(),
        files: files.len(),
        operator: state.ca.operator_name(),
        root: state.ca.is_root(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_moves_whole_and_never_over_another() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateDir::open(&dir.path().join("a")).unwrap();
        a.ca.server_identity("web1").unwrap();
        a.ca.issue_operator("bob").unwrap();
        crate::secrets::store_cache(&a.path, "p", &[("X".to_string(), "1".to_string())].into()).unwrap();
        let out = dir.path().join("state.age");
        let to = SealTo::Passphrase("pw".into());
        let moved = export(&a, &to, &out).unwrap();
        assert!(moved.root && moved.files >= 8, "{moved:?}");
        assert!(export(&a, &to, &out).is_err(), "never over a file");

        let sealed = std::fs::read(&out).unwrap();
        let b_path = dir.path().join("b");
        let b = import(&b_path, &sealed, &OpenWith::Passphrase("pw".into())).unwrap();
        assert_eq!(b.operator, a.ca.operator_name());
        let b = StateDir::open(&b_path).unwrap();
        assert_eq!(b.ca.fingerprint(), a.ca.fingerprint(), "the same CA");
        assert_eq!(b.ca.server_identity("web1").unwrap().cert_pem, a.ca.server_identity("web1").unwrap().cert_pem);
        assert_eq!(b.ca.operators().unwrap().len(), 1);
        assert_eq!(crate::secrets::load(&b.path, "p").unwrap()["X"], "1");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(b_path.join("pki/ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Not over a CA, and not with the wrong passphrase.
        assert!(import(&b_path, &sealed, &OpenWith::Passphrase("pw".into())).is_err());
        assert!(import(&dir.path().join("c"), &sealed, &OpenWith::Passphrase("nope".into())).is_err());
        assert!(!dir.path().join("c/pki/ca.pem").exists());
    }
}
