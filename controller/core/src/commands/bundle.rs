//! The platform bundle compiled into the controller (see `build.rs`): the
//! default stack of `mlopsctl deploy`. It is written once into the state
//! directory, under `bundle/<content hash>/`, and used from there like any
//! stack directory.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use sha2::Digest;

use crate::ControllerError;
use crate::state::StateDir;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/bundle.rs"));
}

/// The bundle's files: (path, executable, contents).
pub fn files() -> &'static [(&'static str, bool, &'static [u8])] {
    embedded::BUNDLE
}

/// The bundle's content hash (16 hex digits).
pub fn hash() -> String {
    let mut h = sha2::Sha256::new();
    for (path, exec, data) in files() {
        h.update(path.as_bytes());
        h.update([u8::from(*exec)]);
        h.update(data);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// The bundle's directory in the state directory, written when missing
/// (into a temporary directory, then renamed: never half there).
pub fn materialize(state: &StateDir) -> Result<PathBuf, ControllerError> {
    let dir = state.path.join("bundle").join(hash());
    if dir.join("compose.yaml").is_file() {
        return Ok(dir);
    }
    let err = |path: &PathBuf| {
        let path = path.clone();
        move |source| ControllerError::StateDir { path, source }
    };
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    for (path, exec, data) in files() {
        let p = tmp.join(path);
        std::fs::create_dir_all(p.parent().expect("has a parent")).map_err(err(&p))?;
        std::fs::write(&p, data).map_err(err(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(if *exec { 0o755 } else { 0o644 }))
            .map_err(err(&p))?;
    }
    std::fs::rename(&tmp, &dir).map_err(err(&dir))?;
    Ok(dir)
}
