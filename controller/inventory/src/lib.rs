//! Which hosts to act on, and how to reach them.
//!
//! - [`inventory`]: the inventory model (groups, children, vars, precedence)
//!   and Ansible's YAML form.
//! - [`sources`]: every other form Ansible reads (INI in [`ini`], with its
//!   Python values in [`pylit`]; `ansible-inventory --list` JSON; scripts;
//!   directories) and `group_vars/` / `host_vars/`.
//! - [`pattern`]: `--limit` host patterns.
//! - [`ssh_config`]: the parts of `~/.ssh/config` that pick address, user, port and keys.
//! - [`target`]: all of the above resolved into [`Target`]s.
//! - [`edit`]: a host of a YAML inventory pointed at another machine, in place.

use std::path::PathBuf;

pub mod edit;
mod ini;
pub mod inventory;
pub mod pattern;
pub mod pylit;
mod sources;
pub mod ssh_config;
pub mod target;
pub use mlops_yaml as yaml;

pub use inventory::Inventory;
pub use ssh_config::SshConfig;
pub use target::{Connection, Target};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid YAML: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid { path: PathBuf, line: usize, column: usize, message: String, hint: Option<String> },
    #[error("{}: groups form a cycle: {cycle}", path.display())]
    Cycle { path: PathBuf, cycle: String },
    #[error("{}: --limit `{pattern}`: {message}", path.display())]
    Limit { path: PathBuf, pattern: String, message: String },
    #[error("--host `{spec}`: {message}")]
    HostSpec { spec: String, message: String },
    #[error("inventory script `{}` {args}: {message}", path.display())]
    Script { path: PathBuf, args: String, message: String },
    #[error("{}: {message}", path.display())]
    Source { path: PathBuf, message: String, hint: String },
}

impl InventoryError {
    /// A suggestion for the user, printed as `hint:`.
    pub fn hint(&self) -> Option<String> {
        match self {
            InventoryError::Read { .. } => {
                Some("pass an Ansible inventory with -i/--inventory: a YAML, INI or `ansible-inventory --list` JSON file, a script, or a directory of them".into())
            }
            InventoryError::Yaml { .. } => {
                Some("check the indentation around that line: YAML nests by spaces (tabs are not allowed)".into())
            }
            InventoryError::Invalid { hint, .. } => hint.clone(),
            InventoryError::Cycle { .. } => {
                Some("a group cannot be its own descendant; remove one of the `children:` entries".into())
            }
            InventoryError::Limit { .. } => {
                Some("--limit takes host or group names, `*` globs, `!name` to exclude and `&name` to intersect".into())
            }
            InventoryError::HostSpec { .. } => {
                Some("write --host USER@HOST[:PORT], e.g. --host root@10.0.0.5:22".into())
            }
            InventoryError::Source { hint, .. } => Some(hint.clone()),
            InventoryError::Script { path, .. } => Some(format!(
                "run it yourself: `{} --list` must print JSON as `ansible-inventory --list` does; \
                 a static inventory file must not be an executable starting with `#!`",
                path.display()
            )),
        }
    }
}

/// Loads an inventory and selects hosts with an optional `--limit` pattern.
pub fn load_targets(
    path: &std::path::Path,
    limit: Option<&str>,
    ssh: &SshConfig,
) -> Result<Vec<Target>, InventoryError> {
    let inv = Inventory::load(path)?;
    let names = select(&inv, limit)?;
    target::targets_from_inventory(&inv, &names, ssh)
}

/// The inventory at `path` as `ansible-inventory --list` prints it, for
/// the hosts `limit` selects, after checking that each of them resolves to
/// a connection target as a deploy would resolve it.
pub fn list_json(
    path: &std::path::Path,
    limit: Option<&str>,
    ssh: &SshConfig,
) -> Result<serde_json::Value, InventoryError> {
    let inv = Inventory::load(path)?;
    let names = select(&inv, limit)?;
    target::targets_from_inventory(&inv, &names, ssh)?;
    Ok(inv.to_list_json(&names))
}

/// The hosts `limit` selects (all without one), in inventory order; an
/// error when there are none.
pub fn select(inv: &Inventory, limit: Option<&str>) -> Result<Vec<String>, InventoryError> {
    let names = match limit {
        Some(pattern) => pattern::select(inv, pattern).map_err(|message| InventoryError::Limit {
            path: inv.path.clone(),
            pattern: pattern.to_string(),
            message,
        })?,
        None => inv.host_names().to_vec(),
    };
    if names.is_empty() {
        return Err(InventoryError::Invalid {
            path: inv.path.clone(),
            line: 1,
            column: 1,
            message: "the inventory has no hosts".into(),
            hint: Some(
                "add hosts: in YAML under `all: hosts:` or a group's `hosts:`, in INI one per line under `[group]`"
                    .into(),
            ),
        });
    }
    Ok(names)
}
