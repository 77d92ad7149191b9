//! The controller's state directory: `--state-dir`, else `$MLOPS_STATE_DIR`,
//! else `$XDG_STATE_HOME/mlopsctl`, else `~/.local/state/mlopsctl`. It is
//! created mode 0700 and holds the CA (`pki/`, see `mlops_pki`: the root,
//! or a joined operator's CA with the root in `pki/root.pem`) and the cache
//! of secrets (`secrets/`).

use std::path::{Path, PathBuf};

use mlops_pki::{Ca, Identity};

use crate::ControllerError;

pub struct StateDir {
    pub path: PathBuf,
    pub ca: Ca,
}

impl StateDir {
    /// The default location (without `--state-dir`).
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("MLOPS_STATE_DIR").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        if let Some(p) = std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()) {
            return PathBuf::from(p).join("mlopsctl");
        }
        dirs::home_dir().unwrap_or_else(|| PathBuf::from("/root")).join(".local/state/mlopsctl")
    }

    /// Opens (creating when needed) the state directory and its CA.
    pub fn open(path: &Path) -> Result<Self, ControllerError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let err = |source| ControllerError::StateDir { path: path.to_path_buf(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        let ca = Ca::open_or_create(&path.join("pki"))?;
        Ok(StateDir { path: path.to_path_buf(), ca })
    }

    /// The CA certificates the controller trusts (and agents are told to
    /// trust): its CA, and while a rotation is under way (`pki rotate`
    /// stopped before it could promote) the next one too, so agents already
    /// re-keyed stay reachable.
    pub fn trusted_pem(&self) -> Result<String, ControllerError> {
        // A joined operator trusts the root it was given, not its own CA.
        if let Ok(root) = std::fs::read_to_string(self.path.join("pki/root.pem")) {
            return Ok(root);
        }
        let mut pem = self.ca.cert_pem().to_string();
        if self.ca.has_next() {
            pem.push_str(self.ca.next()?.cert_pem());
        }
        Ok(pem)
    }

    /// Every CA this controller has had: the trusted ones and those
    /// retired by `pki rotate` (`pki/retired/*/ca.pem`).
    pub fn all_cas_pem(&self) -> Result<String, ControllerError> {
        let mut pem = self.trusted_pem()?;
        if let Ok(dir) = std::fs::read_dir(self.path.join("pki/retired")) {
            for d in dir.flatten() {
                if let Ok(old) = std::fs::read_to_string(d.path().join("ca.pem")) {
                    pem.push_str(&old);
                }
            }
        }
        Ok(pem)
    }

    pub fn client_identity(&self) -> Result<Identity, ControllerError> {
        Ok(self.ca.client_identity()?)
    }

    /// The revocation list this controller knows (see `mlops_pki::Crl`).
    pub fn crl(&self) -> Result<mlops_pki::Crl, ControllerError> {
        Ok(self.ca.crl()?)
    }

    /// The TLS client of this controller: its identity, trusting its
    /// roots, refusing what its revocation list revokes.
    pub fn client_tls(&self) -> Result<crate::client::ClientTls, ControllerError> {
        crate::client::ClientTls::new(&self.trusted_pem()?, &self.crl()?.pem, &self.client_identity()?)
    }
}

/// A host's name as a file name for its certificate: anything outside
/// `[A-Za-z0-9._@:-]` becomes `_`.
pub fn cert_name(host: &str) -> String {
    let s: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | ':') { c } else { '_' })
        .collect();
    if s.starts_with('.') || s.is_empty() { format!("_{s}") } else { s }
}
