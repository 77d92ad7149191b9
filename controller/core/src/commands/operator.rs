//! `mlopsctl operator add|join|list|remove`: several controllers (people,
//! CI runners) deploying the same hosts, each with an identity of its own.
//!
//! `add NAME` (on the controller holding the root CA) issues NAME a CA
//! under the root (see `mlops_pki`) and seals it, with the root and the
//! revocation list, into one bundle ([`mlops_vault`]: a passphrase or age
//! recipients). `join` opens a bundle into a new state directory; a
//! controller whose state directory has no CA yet joins by itself when
//! `MLOPS_OPERATOR_BUNDLE` is set (CI: see [`auto_join`]). `remove NAME`
//! revokes NAME's CA and gives the new revocation list to the hosts named.
//!
//! The hosts hold what operators share: the project's secrets (see
//! `crate::secrets`). So a joined operator's deploy finds them there,
//! recreates nothing, and its no-op deploy changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlops_pki::{OperatorGrant, OperatorRecord};
use mlops_vault::{OpenWith, SealTo};
use serde::{Deserialize, Serialize};

use super::Setup;
use crate::ControllerError;
use crate::bootstrap::{self, Bundle, DeployOutcome};
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::state::StateDir;

/// What a bundle holds, before sealing.
#[derive(Serialize, Deserialize)]
struct Payload {
    kind: String,
    version: u32,
    grant: OperatorGrant,
}

const KIND: &str = "mlopsctl-operator";

/// `MLOPS_OPERATOR_BUNDLE`: a bundle's text (or the path of a file with it).
pub const BUNDLE_ENV: &str = "MLOPS_OPERATOR_BUNDLE";
/// `MLOPS_PASSPHRASE`: the passphrase of a bundle or state export.
pub const PASSPHRASE_ENV: &str = "MLOPS_PASSPHRASE";
/// `MLOPS_AGE_IDENTITY`: an age identity (its text, or the path of its file).
pub const AGE_IDENTITY_ENV: &str = "MLOPS_AGE_IDENTITY";

/// How to seal: `--recipient` keys, else a passphrase from
/// `--passphrase-file` (`-`: stdin) or `MLOPS_PASSPHRASE`.
pub fn seal_to(recipients: &[String], passphrase_file: Option<&Path>) -> Result<SealTo, ControllerError> {
    if !recipients.is_empty() {
        if passphrase_file.is_some() {
            return Err(ControllerError::usage(
                "--recipient and --passphrase-file exclude each other",
                Some("seal to age recipients or with a passphrase, not both"),
            ));
        }
        return Ok(SealTo::Recipients(recipients.to_vec()));
    }
    Ok(SealTo::Passphrase(passphrase(passphrase_file)?))
}

/// How to open: `--age-identity` (or `MLOPS_AGE_IDENTITY`), else a
/// passphrase as for [`seal_to`].
pub fn open_with(age_identity: Option<&Path>, passphrase_file: Option<&Path>) -> Result<OpenWith, ControllerError> {
    if let Some(path) = age_identity {
        return Ok(OpenWith::Identities(read_text(path, "--age-identity")?));
    }
    if passphrase_file.is_none()
        && let Ok(value) = std::env::var(AGE_IDENTITY_ENV)
        && !value.is_empty()
    {
        return Ok(OpenWith::Identities(text_or_file(&value, AGE_IDENTITY_ENV)?));
    }
    Ok(OpenWith::Passphrase(passphrase(passphrase_file)?))
}

fn passphrase(file: Option<&Path>) -> Result<String, ControllerError> {
    let text = match file {
        Some(p) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_line(&mut s)
                .map_err(|e| ControllerError::Local(format!("cannot read the passphrase from stdin: {e}")))?;
            s
        }
        Some(p) => read_text(p, "--passphrase-file")?,
        None => std::env::var(PASSPHRASE_ENV).map_err(|_| {
            ControllerError::usage(
                "no passphrase given",
                Some("pass --passphrase-file FILE (`-` reads one line of stdin), set MLOPS_PASSPHRASE, or use age keys (--recipient to seal, --age-identity to open)"),
            )
        })?,
    };
    let line = text.lines().next().unwrap_or_default().to_string();
    if line.is_empty() {
        return Err(ControllerError::usage("the passphrase is empty", None));
    }
    Ok(line)
}

fn read_text(path: &Path, what: &str) -> Result<String, ControllerError> {
    std::fs::read_to_string(path)
        .map_err(|e| ControllerError::usage(format!("cannot read {what} `{}`: {e}", path.display()), None))
}

/// The value itself when it looks like the thing, else the file it names.
fn text_or_file(value: &str, what: &str) -> Result<String, ControllerError> {
    if value.contains("-----BEGIN") || value.contains("AGE-SECRET-KEY-") {
        return Ok(value.to_string());
    }
    read_text(Path::new(value), what)
}

/// What `operator add` made.
#[derive(Debug, Serialize)]
pub struct Added {
    pub name: String,
    /// The sealed bundle (armored text), unless it went to `out`.
    #[serde(skip)]
    pub bundle: String,
    pub out: Option<PathBuf>,
}

/// Issues operator `name` a CA and seals its bundle; writes it to `out`
/// (mode 0600, never over an existing file) or returns it.
pub fn add(state: &StateDir, name: &str, to: &SealTo, out: Option<&Path>) -> Result<Added, ControllerError> {
    if let Some(out) = out
        && out.exists()
    {
        return Err(ControllerError::usage(
            format!("`{}` exists; a bundle is never written over a file", out.display()),
            None,
        ));
    }
    let grant = state.ca.issue_operator(name).map_err(|e| match e {
        mlops_pki::PkiError::CannotDelegate => ControllerError::usage(
            "this controller's CA was made before operators existed and cannot delegate to them",
            Some("run `mlopsctl pki rotate` with every host (-i INVENTORY) once: it makes a CA that can"),
        ),
        mlops_pki::PkiError::NotRoot(why) => ControllerError::usage(
            format!("this controller holds an operator's CA: {why}"),
            Some("run `mlopsctl operator add` on the controller that added you"),
        ),
        other => other.into(),
    })?;
    let payload = Payload { kind: KIND.into(), version: 1, grant };
    let sealed = mlops_vault::seal(&serde_json::to_vec(&payload).expect("serializable"), to).map_err(|e| vault(&e))?;
    if let Some(out) = out {
        write_new(out, sealed.as_bytes())?;
    }
    Ok(Added {
        name: name.to_string(),
        bundle: if out.is_some() { String::new() } else { sealed },
        out: out.map(Path::to_path_buf),
    })
}

fn vault(e: &mlops_vault::VaultError) -> ControllerError {
    ControllerError::usage(e.to_string(), Some("check the bundle and the passphrase or age identity it was sealed for"))
}

/// Creates `path` (mode 0600) with `bytes`; refuses to replace anything.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), ControllerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| ControllerError::usage(format!("cannot write `{}`: {e}", path.display()), None);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(err)
}

/// What `operator join` did.
#[derive(Debug, Serialize)]
pub struct Joined {
    pub name: String,
    pub state_dir: PathBuf,
    pub root_fingerprint: String,
}

/// Opens a bundle (`bundle`: its text) into the state directory at `path`,
/// which must not have a CA yet.
pub fn join(path: &Path, bundle: &str, with: &OpenWith) -> Result<Joined, ControllerError> {
    let plain = mlops_vault::open(bundle.as_bytes(), with).map_err(|e| vault(&e))?;
    let payload: Payload = serde_json::from_slice(&plain)
        .ok()
        .filter(|p: &Payload| p.kind == KIND && p.version == 1)
        .ok_or_else(|| {
        ControllerError::usage(
            "this is not an operator bundle of mlopsctl",
            Some("`mlopsctl operator add NAME` makes one"),
        )
    })?;
    if path.join("pki/ca.pem").exists() {
        return Err(ControllerError::usage(
            format!("the state directory `{}` already has a CA", path.display()),
            Some("join into a new state directory: --state-dir DIR (or MLOPS_STATE_DIR)"),
        ));
    }
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let err = |source| ControllerError::StateDir { path: path.to_path_buf(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    mlops_pki::join(&path.join("pki"), &payload.grant)?;
    let state = StateDir::open(path)?;
    let root = mlops_pki::pem_to_der(&payload.grant.root_pem).unwrap_or_default();
    use sha2::Digest;
    Ok(Joined {
        name: payload.grant.name,
        state_dir: state.path,
        root_fingerprint: hex::encode(sha2::Sha256::digest(root)),
    })
}

/// CI: when the state directory at `path` has no CA and
/// `MLOPS_OPERATOR_BUNDLE` is set, joins with it (opened as
/// [`open_with`] says, from the environment) before anything else, so one
/// `mlopsctl deploy` is enough on a fresh runner. Returns whether it joined.
pub fn auto_join(path: &Path, report: &dyn Report) -> Result<bool, ControllerError> {
    let Ok(value) = std::env::var(BUNDLE_ENV) else { return Ok(false) };
    if value.is_empty() || path.join("pki/ca.pem").exists() {
        return Ok(false);
    }
    let bundle = text_or_file(&value, BUNDLE_ENV)?;
    let joined = join(path, &bundle, &open_with(None, None)?)?;
    report.info(&format!("joined as operator `{}` (from {BUNDLE_ENV})", joined.name));
    Ok(true)
}

/// What `operator list` shows.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// This controller's operator name.
    pub me: String,
    /// Whether this controller holds the root CA.
    pub root: bool,
    /// The operators the root delegated to (empty on a joined operator).
    pub operators: Vec<OperatorRecord>,
    pub crl_number: u64,
}

pub fn list(state: &StateDir) -> Result<Listing, ControllerError> {
    Ok(Listing {
        me: state.ca.operator_name(),
        root: state.ca.is_root(),
        operators: state.ca.operators()?,
        crl_number: state.crl()?.number,
    })
}

/// What `operator remove` did: the new list, and each host given it.
pub struct Removed {
    pub name: String,
    pub crl_number: u64,
    pub hosts: HostResults<DeployOutcome>,
}

/// Revokes operator `name` and hands the new revocation list to every
/// target (an agent restart each; containers keep running).
pub async fn remove(setup: &Setup, name: &str, report: Arc<dyn Report>) -> Result<Removed, ControllerError> {
    let crl = setup.state.ca.revoke_operator(name).map_err(|e| match e {
        mlops_pki::PkiError::NoOperator(n) => ControllerError::usage(
            format!("no operator `{n}`"),
            Some("`mlopsctl operator list` shows the operators this controller added"),
        ),
        mlops_pki::PkiError::NotRoot(why) => ControllerError::usage(
            format!("this controller holds an operator's CA: {why}"),
            Some("run `mlopsctl operator remove` on the controller that added the operator"),
        ),
        other => other.into(),
    })?;
    report.info(&format!(
        "operator `{name}` revoked (revocation list {}); giving the list to {} host(s)",
        crl.number,
        setup.targets.len()
    ));
    // The setup's TLS was built before the list changed: agents keyed by
    // the removed operator must be refused on this run already.
    let tls = setup.state.client_tls()?;
    let ctx = Arc::new(bootstrap::Context {
        binary: setup.ctx.binary.clone(),
        tls,
        ssh: setup.ctx.ssh.clone(),
        identities: setup.ctx.identities.clone(),
        take_over: false,
        our_cas_pem: setup.ctx.our_cas_pem.clone(),
        state: setup.ctx.state.clone(),
    });
    let bundles = Arc::new(Bundle::for_targets(&setup.state, &setup.targets)?);
    let hosts = per_host(&setup.targets, setup.forks, &ctx, &report, move |target, ctx, progress| {
        let bundles = bundles.clone();
        async move { bootstrap::deploy_host(&target, &ctx, &bundles[&target.name], None, &progress).await }
    })
    .await;
    Ok(Removed { name: name.to_string(), crl_number: crl.number, hosts })
}
