//! Per-deployment credentials (a stack's `x-mlops.secrets`).
//!
//! The hosts hold the truth: every host of a project keeps its secrets
//! (the agent's `GetSecrets`/`PutSecrets`, root only on the host). A deploy
//! asks every host first and [`reconcile`]s: what the hosts hold is used;
//! a value is generated only when no host holds one and every host
//! answered; hosts that hold different values stop the deploy, and nothing
//! is overwritten. The state directory keeps a copy (`secrets/<project>.env`,
//! mode 0600, directory 0700): a cache, used when the hosts hold nothing yet
//! (a deployment made before secrets lived on hosts) and by
//! `mlopsctl secrets --cached`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::ControllerError;
use crate::client::AgentConn;
use crate::error::SecretsConflict;

/// What the host behind `conn` holds for `project`.
pub async fn held_by(conn: &mut AgentConn, project: &str) -> Result<BTreeMap<String, String>, ControllerError> {
    let host = conn.host().to_string();
    let reply = conn
        .raw()
        .get_secrets(mlops_proto::v1::GetSecretsRequest { project: project.to_string() })
        .await
        .map_err(|s| ControllerError::from_status(&host, "GetSecrets", &s))?;
    Ok(reply.into_inner().values.into_iter().collect())
}

/// Stores `values` on the host behind `conn` (overwriting only with
/// `replace`) and returns what it then holds.
pub async fn store_on(
    conn: &mut AgentConn,
    project: &str,
    values: &BTreeMap<String, String>,
    replace: bool,
) -> Result<BTreeMap<String, String>, ControllerError> {
    change_on(conn, project, values, replace, &[]).await
}

/// [`store_on`], also dropping the names in `remove`.
pub async fn change_on(
    conn: &mut AgentConn,
    project: &str,
    values: &BTreeMap<String, String>,
    replace: bool,
    remove: &[String],
) -> Result<BTreeMap<String, String>, ControllerError> {
    let host = conn.host().to_string();
    let request = mlops_proto::v1::PutSecretsRequest {
        project: project.to_string(),
        values: values.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        replace,
        remove: remove.to_vec(),
    };
    let reply =
        conn.raw().put_secrets(request).await.map_err(|s| ControllerError::from_status(&host, "PutSecrets", &s))?;
    Ok(reply.into_inner().values.into_iter().collect())
}

/// Gives the host behind `conn` the `resolved` values it lacks (`held`:
/// what it held when asked), and checks it holds exactly those afterwards:
/// another controller may have stored its own in between.
pub async fn complete_on(
    conn: &mut AgentConn,
    project: &str,
    held: &BTreeMap<String, String>,
    resolved: &BTreeMap<String, String>,
) -> Result<(), ControllerError> {
    let missing: BTreeMap<String, String> =
        resolved.iter().filter(|(k, _)| !held.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let now = store_on(conn, project, &missing, false).await?;
    for (name, value) in &missing {
        let theirs = now.get(name).map(String::as_str).unwrap_or_default();
        if theirs != value {
            return Err(ControllerError::Secrets(SecretsConflict::Disagree {
                project: project.to_string(),
                name: name.clone(),
                holders: format!(
                    "{} holds sha256 {}…, this deploy has {}…",
                    conn.host(),
                    fingerprint(theirs),
                    fingerprint(value)
                ),
            }));
        }
    }
    Ok(())
}

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
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    // The kernel's generator: reading it fails only on a broken system,
    // where no credential should be made.
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("/dev/urandom is readable");
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

/// Values that stand in for secrets where a model is only checked or its
/// files synced (nothing runs with them): the cached ones, else a
/// placeholder. Nothing is generated or written.
pub fn provisional(state: &Path, project: &str, names: &[String]) -> Result<BTreeMap<String, String>, ControllerError> {
    let cached = load(state, project)?;
    Ok(names
        .iter()
        .map(|n| (n.clone(), cached.get(n).cloned().unwrap_or_else(|| "not-yet-generated".to_string())))
        .collect())
}

/// Writes `values` into the local cache of `project` (merged with what it
/// holds; atomically, 0600).
pub fn store_cache(state: &Path, project: &str, values: &BTreeMap<String, String>) -> Result<(), ControllerError> {
    let mut all = load(state, project)?;
    let before = all.clone();
    all.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
    if all != before {
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
    Ok(())
}

/// A short, safe-to-print name for a secret value: the first 8 hex digits
/// of its sha256 (never the value itself).
pub fn fingerprint(value: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(value.as_bytes())[..4])
}

/// The secrets a deploy uses, and where each came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub values: BTreeMap<String, String>,
    /// Names generated now (no host and no cache held them).
    pub generated: Vec<String>,
    /// Names taken from the local cache (no host held them).
    pub from_cache: Vec<String>,
}

/// Hosts that hold different values of one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub name: String,
    /// Per distinct value: its [`fingerprint`] and the hosts holding it.
    pub holders: Vec<(String, Vec<String>)>,
}

impl Disagreement {
    pub fn describe(&self) -> String {
        self.holders
            .iter()
            .map(|(fp, hosts)| {
                format!("{} hold{} sha256 {fp}…", hosts.join(", "), if hosts.len() == 1 { "s" } else { "" })
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What the hosts hold of one secret.
pub struct Holders {
    /// Per distinct value: its [`fingerprint`], the hosts holding it, the value.
    pub values: Vec<(String, Vec<String>, String)>,
    /// Hosts holding no value of it.
    pub lacking: Vec<String>,
}

impl Holders {
    /// The disagreement these holders make (values left out).
    pub fn disagreement(&self, name: &str) -> Disagreement {
        Disagreement {
            name: name.to_string(),
            holders: self.values.iter().map(|(fp, hosts, _)| (fp.clone(), hosts.clone())).collect(),
        }
    }
}

/// Groups the hosts by the value of `name` they hold.
pub fn holders(name: &str, hosts: &[(String, BTreeMap<String, String>)]) -> Holders {
    let mut out = Holders { values: Vec::new(), lacking: Vec::new() };
    for (host, held) in hosts {
        let Some(v) = held.get(name) else {
            out.lacking.push(host.clone());
            continue;
        };
        let fp = fingerprint(v);
        match out.values.iter_mut().find(|(f, _, _)| *f == fp) {
            Some((_, hs, _)) => hs.push(host.clone()),
            None => out.values.push((fp, vec![host.clone()], v.clone())),
        }
    }
    out
}

/// Decides the values of `names` from what each host holds (`hosts`: host
/// name and its secrets, for every host that answered), the local `cache`,
/// and `all_answered` (whether every targeted host answered). See the
/// module's documentation for the rules.
pub fn reconcile(
    project: &str,
    names: &[String],
    hosts: &[(String, BTreeMap<String, String>)],
    cache: &BTreeMap<String, String>,
    all_answered: bool,
    unreachable: &[String],
) -> Result<Resolved, SecretsConflict> {
    let mut out = Resolved::default();
    for name in names {
        let held = holders(name, hosts);
        if held.values.len() > 1 {
            return Err(SecretsConflict::Disagree {
                project: project.to_string(),
                name: name.clone(),
                holders: held.disagreement(name).describe(),
            });
        }
        let value = match held.values.into_iter().next().map(|(_, _, v)| v) {
            Some(v) => v,
            None => match cache.get(name) {
                Some(v) => {
                    out.from_cache.push(name.clone());
                    v.clone()
                }
                None if all_answered => {
                    out.generated.push(name.clone());
                    generate()
                }
                None => {
                    return Err(SecretsConflict::Unknown { project: project.to_string(), hosts: unreachable.to_vec() });
                }
            },
        };
        out.values.insert(name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_cache_is_private_and_merged() {
        let dir = tempfile::tempdir().unwrap();
        store_cache(dir.path(), "p", &map(&[("A", "1"), ("B", "2")])).unwrap();
        store_cache(dir.path(), "p", &map(&[("B", "3"), ("C", "4")])).unwrap();
        assert_eq!(load(dir.path(), "p").unwrap(), map(&[("A", "1"), ("B", "3"), ("C", "4")]));
        let mode = std::fs::metadata(dir.path().join("secrets/p.env")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names = vec!["A".to_string(), "Z".to_string()];
        assert_eq!(provisional(dir.path(), "p", &names).unwrap()["A"], "1");
        assert_eq!(provisional(dir.path(), "p", &names).unwrap()["Z"], "not-yet-generated");
    }

    #[test]
    fn hosts_win_over_the_cache_and_generation() {
        let names = vec!["A".to_string(), "B".to_string(), "C".to_string()];
        let hosts = vec![("h1".to_string(), map(&[("A", "host-a")])), ("h2".to_string(), map(&[]))];
        let cache = map(&[("A", "cached-a"), ("B", "cached-b")]);
        let r = reconcile("p", &names, &hosts, &cache, true, &[]).unwrap();
        assert_eq!(r.values["A"], "host-a", "a host's value wins over the cache");
        assert_eq!(r.values["B"], "cached-b");
        assert_eq!(r.from_cache, vec!["B"]);
        assert_eq!(r.generated, vec!["C"]);
        assert_eq!(r.values["C"].len(), 44);
    }

    #[test]
    fn hosts_that_disagree_stop_everything() {
        let names = vec!["A".to_string()];
        let hosts = vec![
            ("h1".to_string(), map(&[("A", "one")])),
            ("h2".to_string(), map(&[("A", "two")])),
            ("h3".to_string(), map(&[("A", "one")])),
        ];
        let e = reconcile("p", &names, &hosts, &BTreeMap::new(), true, &[]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`A`") && text.contains("h1, h3 hold sha256") && text.contains("h2 holds"), "{text}");
        assert!(!text.contains("one") && !text.contains("two"), "values never printed: {text}");
    }

    #[test]
    fn nothing_is_generated_while_a_host_is_unheard() {
        let names = vec!["A".to_string()];
        let hosts = vec![("h1".to_string(), map(&[]))];
        let e = reconcile("p", &names, &hosts, &BTreeMap::new(), false, &["h2".to_string()]).unwrap_err();
        assert!(e.to_string().contains("h2"), "{e}");
        // What a host or the cache holds is enough.
        let cache = map(&[("A", "c")]);
        assert_eq!(reconcile("p", &names, &hosts, &cache, false, &["h2".to_string()]).unwrap().values["A"], "c");
    }
}
