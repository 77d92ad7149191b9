//! From what the user named (`--host` specs or an inventory with `--limit`)
//! to connection targets: address, port, user, keys, how to reach the host.
//!
//! Precedence for each setting, highest first: the `--host` spec or the
//! inventory's `ansible_*` variable, then `~/.ssh/config` for the alias,
//! then defaults (port 22, the local user name).

use std::path::{Path, PathBuf};

use crate::InventoryError;
use crate::inventory::{Inventory, InventoryHost};
use crate::ssh_config::{SshConfig, expand_tilde};
use mlops_yaml::Value;

/// Default loopback port of the agent (mirrors `mlops_proto::DEFAULT_AGENT_PORT`).
pub const DEFAULT_AGENT_PORT: u16 = 7443;

/// How the controller reaches a host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Connection {
    /// This machine, without SSH.
    Local,
    Ssh {
        /// Address or DNS name to connect to.
        address: String,
        port: u16,
        user: String,
        /// Keys named for this host, tried before the defaults and ssh-agent.
        identity_files: Vec<PathBuf>,
    },
}

/// One host to act on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Target {
    /// The name the user knows the host by (inventory name or the `--host` text).
    pub name: String,
    pub connection: Connection,
    /// Loopback port the agent listens on, on that host.
    pub agent_port: u16,
    /// Inventory groups (empty for `--host`).
    pub groups: Vec<String>,
    /// Effective inventory variables, for later stages (placement, overrides).
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// Where the host was defined: `file:line` or `--host`.
    pub origin: String,
}

impl Target {
    /// The local machine as a target (the embedded default of `mlopsctl deploy`).
    pub fn local() -> Self {
        Target {
            name: "localhost".into(),
            connection: Connection::Local,
            agent_port: DEFAULT_AGENT_PORT,
            groups: Vec::new(),
            vars: serde_json::Map::new(),
            origin: "this machine".into(),
        }
    }

    pub fn user(&self) -> Option<&str> {
        match &self.connection {
            Connection::Local => None,
            Connection::Ssh { user, .. } => Some(user),
        }
    }

    /// `user@address:port`, or `local`.
    pub fn display_address(&self) -> String {
        match &self.connection {
            Connection::Local => "local".into(),
            Connection::Ssh { address, port, user, .. } => {
                if address.contains(':') {
                    format!("{user}@[{address}]:{port}")
                } else {
                    format!("{user}@{address}:{port}")
                }
            }
        }
    }
}

/// Parses `[USER@]HOST[:PORT]` (IPv6 as `[addr]` or `[addr]:port`).
pub fn parse_host_spec(spec: &str) -> Result<(Option<String>, String, Option<u16>), InventoryError> {
    let bad = |why: &str| InventoryError::HostSpec { spec: spec.to_string(), message: why.to_string() };
    let (user, rest) = match spec.rsplit_once('@') {
        Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
        Some(_) => return Err(bad("the user before `@` is empty")),
        None => (None, spec),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (h, after) = inner.split_once(']').ok_or_else(|| bad("`[` without `]`"))?;
        match after {
            "" => (h, None),
            _ => (h, Some(after.strip_prefix(':').ok_or_else(|| bad("expected `:PORT` after `]`"))?)),
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) if !p.contains(':') => (h, Some(p)),
            Some(_) => return Err(bad("an IPv6 address must be written in brackets: `[addr]:port`")),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(bad("the host contains a space or `/`"));
    }
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(&format!("`{p}` is not a port number (1-65535)")))
        })
        .transpose()?;
    Ok((user, host.to_string(), port))
}

/// Resolves `--host` specs.
pub fn targets_from_specs(specs: &[String], ssh: &SshConfig) -> Result<Vec<Target>, InventoryError> {
    let mut out: Vec<Target> = Vec::new();
    for spec in specs {
        let (user, alias, port) = parse_host_spec(spec)?;
        if alias == "local" || alias == "localhost" && user.is_none() && port.is_none() {
            // `--host local`: this machine without SSH.
            out.push(Target::local());
            continue;
        }
        let cfg = ssh.resolve(&alias);
        let target = Target {
            name: spec.clone(),
            connection: Connection::Ssh {
                address: cfg.hostname.unwrap_or_else(|| alias.clone()),
                port: port.or(cfg.port).unwrap_or(22),
                user: user.or(cfg.user).unwrap_or_else(local_user),
                identity_files: cfg.identity_files,
            },
            agent_port: DEFAULT_AGENT_PORT,
            groups: Vec::new(),
            vars: serde_json::Map::new(),
            origin: "--host".into(),
        };
        if out.iter().any(|t| t.name == target.name) {
            continue;
        }
        out.push(target);
    }
    Ok(out)
}

/// Resolves inventory hosts (already selected by `--limit`).
pub fn targets_from_inventory(
    inv: &Inventory,
    names: &[String],
    ssh: &SshConfig,
) -> Result<Vec<Target>, InventoryError> {
    names
        .iter()
        .map(|name| {
            let host = inv.host(name).expect("selected from this inventory");
            target_from_host(inv, &host, ssh)
        })
        .collect()
}

fn target_from_host(inv: &Inventory, host: &InventoryHost, ssh: &SshConfig) -> Result<Target, InventoryError> {
    let var = |key: &str| host.vars.get(key);
    // Variable `key`'s error, at its place: the file it was written in (the
    // inventory, or a file of group_vars/ or host_vars/), line and column.
    let err = |key: &str, message: String, hint: &str| {
        let node = var(key).expect("errors are about variables that are set");
        InventoryError::Invalid {
            path: host.var_files.get(key).unwrap_or(&inv.path).clone(),
            line: node.line,
            column: node.column,
            message: format!("host `{}`: {message}", host.name),
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        }
    };
    let string = |key: &str| -> Result<Option<String>, InventoryError> {
        match var(key) {
            None => Ok(None),
            Some(node) => match &node.value {
                Value::Str(s) if s.contains("{{") => Err(err(
                    key,
                    format!("`{key}` uses a Jinja template, which mlopsctl does not evaluate"),
                    "write the value itself",
                )),
                Value::Str(s) => Ok(Some(s.clone())),
                Value::Int(i) => Ok(Some(i.to_string())),
                Value::Null => Ok(None),
                _ => Err(err(key, format!("`{key}` must be a string, found {}", node.kind()), "")),
            },
        }
    };
    let port = |key: &str| -> Result<Option<u16>, InventoryError> {
        match var(key) {
            None => Ok(None),
            Some(node) => {
                let n = match &node.value {
                    Value::Int(i) => Some(*i),
                    Value::Str(s) => s.trim().parse().ok(),
                    _ => None,
                };
                n.and_then(|n| u16::try_from(n).ok())
                    .filter(|p| *p > 0)
                    .map(Some)
                    .ok_or_else(|| err(key, format!("`{key}` must be a port number (1-65535)"), ""))
            }
        }
    };
    let boolean = |key: &str| -> Result<Option<bool>, InventoryError> {
        match var(key) {
            None => Ok(None),
            Some(node) => match &node.value {
                Value::Bool(b) => Ok(Some(*b)),
                Value::Str(s) if ["yes", "true", "1", "on"].contains(&s.to_lowercase().as_str()) => Ok(Some(true)),
                Value::Str(s) if ["no", "false", "0", "off"].contains(&s.to_lowercase().as_str()) => Ok(Some(false)),
                Value::Int(i) => Ok(Some(*i != 0)),
                _ => Err(err(key, format!("`{key}` must be true or false"), "")),
            },
        }
    };

    let agent_port = port("mlops_agent_port")?.unwrap_or(DEFAULT_AGENT_PORT);
    let connection_kind = string("ansible_connection")?;
    // Checked even though sudo is what mlopsctl uses: a method it cannot
    // honour must not be silently replaced.
    if let Some(method) = string("ansible_become_method")?
        && method != "sudo"
    {
        return Err(err(
            "ansible_become_method",
            format!("become method `{method}` is not supported"),
            "mlopsctl uses passwordless sudo for non-root users",
        ));
    }
    if boolean("ansible_become")? == Some(true)
        && let Some(u) = string("ansible_become_user")?
        && u != "root"
    {
        return Err(err(
            "ansible_become_user",
            format!("`ansible_become_user: {u}`: the agent must be installed as root"),
            "remove ansible_become_user or set it to root",
        ));
    }
    let connection = match connection_kind.as_deref() {
        Some("local") => Connection::Local,
        None | Some("ssh") | Some("smart") | Some("paramiko") => {
            let alias = string("ansible_host")?.unwrap_or_else(|| host.name.clone());
            let cfg = ssh.resolve(&alias);
            let mut identity_files = Vec::new();
            for key in ["ansible_ssh_private_key_file", "ansible_private_key_file"] {
                if let Some(path) = string(key)? {
                    let p = expand_tilde(&path);
                    // A relative key path is relative to the inventory file
                    // that names the host.
                    let p = if p.is_relative() { host.file.parent().unwrap_or(Path::new(".")).join(p) } else { p };
                    identity_files.push(p);
                }
            }
            identity_files.extend(cfg.identity_files);
            Connection::Ssh {
                address: cfg.hostname.unwrap_or(alias),
                port: port("ansible_port")?.or(port("ansible_ssh_port")?).or(cfg.port).unwrap_or(22),
                user: string("ansible_user")?.or(string("ansible_ssh_user")?).or(cfg.user).unwrap_or_else(local_user),
                identity_files,
            }
        }
        Some(other) => {
            return Err(err(
                "ansible_connection",
                format!("connection type `{other}` is not supported"),
                "use `ssh` (the default) or `local`",
            ));
        }
    };
    Ok(Target {
        name: host.name.clone(),
        connection,
        agent_port,
        groups: host.groups.clone(),
        vars: host.vars.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
        origin: format!("{}:{}", host.file.display(), host.line),
    })
}

/// The local user name, which OpenSSH also uses when no user is given.
fn local_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_specs() {
        assert_eq!(parse_host_spec("root@h:2222").unwrap(), (Some("root".into()), "h".into(), Some(2222)));
        assert_eq!(parse_host_spec("h").unwrap(), (None, "h".into(), None));
        assert_eq!(parse_host_spec("u@[::1]:22").unwrap(), (Some("u".into()), "::1".into(), Some(22)));
        assert!(parse_host_spec("u@h:0").unwrap_err().to_string().contains("not a port number"));
        assert!(parse_host_spec("::1").is_err());
        assert!(parse_host_spec("@h").is_err());
    }

    #[test]
    fn inventory_vars_beat_ssh_config() {
        let inv = Inventory::parse(
            "all:\n  vars:\n    ansible_user: admin\n  hosts:\n    a:\n      ansible_host: 10.1.1.1\n      ansible_port: \"2200\"\n      ansible_ssh_private_key_file: keys/a\n      mlops_agent_port: 9000\n    b:\n      ansible_connection: local\n",
            Path::new("/inv/hosts.yml"),
        )
        .unwrap();
        let ssh = SshConfig::parse("Host 10.1.1.1\n  User ignored\n  Port 1\n  IdentityFile /k/cfg\n");
        let t = targets_from_inventory(&inv, &["a".into(), "b".into()], &ssh).unwrap();
        assert_eq!(
            t[0].connection,
            Connection::Ssh {
                address: "10.1.1.1".into(),
                port: 2200,
                user: "admin".into(),
                identity_files: vec!["/inv/keys/a".into(), "/k/cfg".into()],
            }
        );
        assert_eq!(t[0].agent_port, 9000);
        assert_eq!(t[0].origin, "/inv/hosts.yml:5");
        assert_eq!(t[1].connection, Connection::Local);
    }

    #[test]
    fn bad_port_names_line() {
        let inv = Inventory::parse("all:\n  hosts:\n    a:\n      ansible_port: http\n", Path::new("i.yml")).unwrap();
        let e = targets_from_inventory(&inv, &["a".into()], &SshConfig::default()).unwrap_err();
        assert_eq!(e.to_string(), "i.yml:4:21: host `a`: `ansible_port` must be a port number (1-65535)");
    }

    #[test]
    fn ssh_config_applies_to_host_specs() {
        let ssh = SshConfig::parse("Host box\n  HostName 192.0.2.7\n  User ops\n  Port 2022\n");
        let t = targets_from_specs(&["box".into(), "me@box:22".into()], &ssh).unwrap();
        assert_eq!(t[0].display_address(), "ops@192.0.2.7:2022");
        assert_eq!(t[1].display_address(), "me@192.0.2.7:22");
    }
}
