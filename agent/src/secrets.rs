//! A project's credentials, kept on the host so that they belong to the
//! deployment rather than to whichever controller made them.
//!
//! One file per project, `<state>/secrets/<project>.json` (the state
//! directory is root's, 0700; the `secrets` directory 0700; each file 0600),
//! replaced whole by temp-and-rename. Read-modify-write runs under one
//! mutex, so when two controllers store a project's first secrets at once,
//! the second gets the first's values back instead of overwriting them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::engine::EngineError;
use crate::engine::confine;

/// At most this many secrets per project, each value at most this long:
/// credentials, not a key-value store.
const MAX_SECRETS: usize = 256;
const MAX_VALUE: usize = 4096;

#[derive(Debug)]
pub struct SecretStore {
    dir: PathBuf,
    lock: Mutex<()>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct File {
    values: BTreeMap<String, String>,
}

impl SecretStore {
    pub fn new(state_dir: &Path) -> Self {
        SecretStore { dir: state_dir.join("secrets"), lock: Mutex::new(()) }
    }

    fn path(&self, project: &str) -> PathBuf {
        self.dir.join(format!("{project}.json"))
    }

    /// Everything the host holds for `project` (empty when nothing).
    pub fn get(&self, project: &str) -> Result<BTreeMap<String, String>, EngineError> {
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.read(project)
    }

    /// Stores `values` for `project`, drops the names in `remove`, and
    /// returns what the host then holds. Without `replace`, a name already
    /// held keeps its value.
    pub fn put(
        &self,
        project: &str,
        values: BTreeMap<String, String>,
        replace: bool,
        remove: &[String],
    ) -> Result<BTreeMap<String, String>, EngineError> {
        check(&values)?;
        let _held = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut held = self.read(project)?;
        let before = held.clone();
        for (name, value) in values {
            if replace {
                held.insert(name, value);
            } else {
                held.entry(name).or_insert(value);
            }
        }
        for name in remove {
            held.remove(name);
        }
        if held.len() > MAX_SECRETS {
            return Err(EngineError::bad_request("values", format!("more than {MAX_SECRETS} secrets for one project")));
        }
        if held != before {
            self.write(project, &held)?;
        }
        Ok(held)
    }

    fn read(&self, project: &str) -> Result<BTreeMap<String, String>, EngineError> {
        let path = self.path(project);
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            // The file is ours, never a link someone put there.
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(EngineError::io_at("cannot read", &path)(e)),
        };
        let mut text = String::new();
        file.by_ref()
            .take(2 * (MAX_SECRETS * (MAX_VALUE + 256)) as u64)
            .read_to_string(&mut text)
            .map_err(EngineError::io_at("cannot read", &path))?;
        let parsed: File = serde_json::from_str(&text).map_err(|e| EngineError::Io {
            what: format!("{} is damaged", path.display()),
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Ok(parsed.values)
    }

    fn write(&self, project: &str, values: &BTreeMap<String, String>) -> Result<(), EngineError> {
        confine::private_dir(&self.dir).map_err(EngineError::io_at("cannot prepare", &self.dir))?;
        let dir = std::fs::File::open(&self.dir).map_err(EngineError::io_at("cannot open", &self.dir))?;
        let text = serde_json::to_vec_pretty(&File { values: values.clone() }).expect("serializable");
        let name = format!("{project}.json");
        use std::os::fd::AsFd;
        confine::write_file(dir.as_fd(), OsStr::new(&name), &mut text.as_slice(), 0o600)
            .map_err(EngineError::io_at("cannot write", &self.path(project)))?;
        // The rename must reach the disk before a controller is told the
        // secret is stored: it may start containers with it next.
        dir.sync_all().map_err(EngineError::io_at("cannot sync", &self.dir))
    }
}

/// Names as Compose interpolation reads them; values printable, bounded.
fn check(values: &BTreeMap<String, String>) -> Result<(), EngineError> {
    if values.len() > MAX_SECRETS {
        return Err(EngineError::bad_request("values", format!("more than {MAX_SECRETS} secrets")));
    }
    for (name, value) in values {
        if !mlops_proto::is_variable_name(name) {
            return Err(EngineError::bad_request("values", format!("`{name}` is not a variable name")));
        }
        if value.len() > MAX_VALUE || value.is_empty() || value.chars().any(char::is_control) {
            return Err(EngineError::bad_request(
                "values",
                format!("the value of `{name}` must be 1 to {MAX_VALUE} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn held_values_are_kept_unless_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        assert!(store.get("p").unwrap().is_empty());
        let held = store.put("p", map(&[("A", "one")]), false, &[]).unwrap();
        assert_eq!(held, map(&[("A", "one")]));
        let held = store.put("p", map(&[("A", "two"), ("B", "b")]), false, &[]).unwrap();
        assert_eq!(held, map(&[("A", "one"), ("B", "b")]), "a held name keeps its value");
        let held = store.put("p", map(&[("A", "two")]), true, &[]).unwrap();
        assert_eq!(held["A"], "two");
        assert_eq!(store.get("p").unwrap(), held);
        assert!(store.get("q").unwrap().is_empty(), "projects are apart");
        let held = store.put("p", BTreeMap::new(), false, &["B".to_string()]).unwrap();
        assert!(!held.contains_key("B"), "removed");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("secrets/p.json")), 0o600);
        assert_eq!(mode(&dir.path().join("secrets")), 0o700);
    }

    #[test]
    fn bad_names_and_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        for bad in [map(&[("1A", "x")]), map(&[("A-B", "x")]), map(&[("A", "")]), map(&[("A", "x\ny")])] {
            assert!(matches!(store.put("p", bad, false, &[]), Err(EngineError::BadRequest { .. })));
        }
        assert!(!dir.path().join("secrets/p.json").exists(), "nothing written");
    }

    #[test]
    fn a_link_in_place_of_the_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("elsewhere"), "{\"values\":{\"A\":\"theirs\"}}").unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("secrets/p.json")).unwrap();
        assert!(store.get("p").is_err());
        assert!(store.put("p", map(&[("A", "ours")]), true, &[]).is_err(), "refused, not written through");
        assert_eq!(std::fs::read_to_string(dir.path().join("elsewhere")).unwrap(), "{\"values\":{\"A\":\"theirs\"}}");
    }
}
