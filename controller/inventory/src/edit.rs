//! Pointing an inventory host at another machine (`mlopsctl migrate`): its
//! `ansible_host`, `ansible_port` and `ansible_user` in the YAML file
//! changed in place (and `mlops_address` when it named the old machine),
//! every other byte of the file (comments, order, quoting) kept.
//!
//! Only a host written in block style (`name:` then its variables, one per
//! line, indented) is edited; anything else (a flow mapping, variables that
//! come from a group or from elsewhere) is left alone and the caller prints
//! the change instead. The edited file is read back: unless the host then
//! resolves to the new address, port and user, the file is restored. The
//! file is replaced atomically (a temporary file renamed over it, with its
//! mode kept).

use std::path::Path;

use crate::{Connection, SshConfig};

/// Where a host should now point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAddress {
    pub address: String,
    pub port: u16,
    pub user: String,
}

/// Points host `name` (defined at `line`, 1-based, of `path`) at `to`.
/// `Err` says why the file was not changed.
pub fn point_host_at(path: &Path, line: usize, name: &str, to: &NewAddress, ssh: &SshConfig) -> Result<(), String> {
    let before = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let current = resolve(path, name, ssh)?;
    let after = edit(&before, line, name, &current, to)?;
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).map_err(|e| e.to_string())?.permissions().mode() & 0o7777
    };
    write(path, &after, mode)?;
    match resolve(path, name, ssh) {
        Ok(now) if &now == to => Ok(()),
        other => {
            write(path, &before, mode)?;
            Err(match other {
                Ok(now) => format!(
                    "after the edit it still resolves to {}@{}:{} (its variables come from elsewhere too); it was left as it was",
                    now.user, now.address, now.port
                ),
                Err(e) => format!("the edited file did not load ({e}); it was left as it was"),
            })
        }
    }
}

fn resolve(path: &Path, name: &str, ssh: &SshConfig) -> Result<NewAddress, String> {
    let targets = crate::load_targets(path, None, ssh).map_err(|e| e.to_string())?;
    match targets.into_iter().find(|t| t.name == name).map(|t| t.connection) {
        Some(Connection::Ssh { address, port, user, .. }) => Ok(NewAddress { address, port, user }),
        Some(Connection::Local) => Err(format!("`{name}` is this machine (ansible_connection: local)")),
        None => Err(format!("it has no host `{name}`")),
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.mlops-{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write it: {e}")
        })
}

/// The text with host `name`'s block (its key at `line`) pointing at `to`:
/// each of `ansible_host`, `ansible_port`, `ansible_user` that must change
/// is rewritten where the block has it, else added as the block's first
/// line.
fn edit(text: &str, line: usize, name: &str, current: &NewAddress, to: &NewAddress) -> Result<String, String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let at = line.checked_sub(1).filter(|&i| i < lines.len()).ok_or("the host's line is past the end")?;
    let key_line = lines[at];
    let indent = key_line.len() - key_line.trim_start().len();
    let (key, rest) = key_line.trim().split_once(':').ok_or("the host's line is not `name:`")?;
    if key.trim().trim_matches(|c| c == '"' || c == '\'') != name {
        return Err(format!("line {line} does not define `{name}`"));
    }
    let rest = rest.trim();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return Err("the host is not written as a block (`name:` with its variables below)".into());
    }
    // The block: the lines below that are blank, comments or indented more.
    let mut end = at + 1;
    let mut child_indent = None;
    while end < lines.len() {
        let l = lines[end];
        let t = l.trim();
        let i = l.len() - l.trim_start().len();
        if !t.is_empty() && !t.starts_with('#') {
            if i <= indent {
                break;
            }
            child_indent.get_or_insert(i);
        }
        end += 1;
    }
    let child = child_indent.unwrap_or(indent + 2);
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut added = Vec::new();
    let port = to.port.to_string();
    let wanted = [
        ("ansible_host", current.address != to.address, to.address.as_str()),
        ("ansible_port", current.port != to.port, port.as_str()),
        ("ansible_user", current.user != to.user, to.user.as_str()),
    ];
    for (var, changes, value) in wanted {
        if !changes {
            continue;
        }
        if value.is_empty() || value.chars().any(|c| c.is_whitespace() || "#:'\"{}[],&*!|>%@`".contains(c)) {
            return Err(format!("`{value}` would need quoting"));
        }
        let found = (at + 1..end).find(|&i| {
            let l = lines[i];
            l.len() - l.trim_start().len() == child && l.trim_start().starts_with(&format!("{var}:"))
        });
        match found {
            Some(i) => {
                let newline = if lines[i].ends_with('\n') { "\n" } else { "" };
                out[i] = format!("{}{var}: {value}{newline}", " ".repeat(child));
            }
            None => added.push(format!("{}{var}: {value}\n", " ".repeat(child))),
        }
    }
    // `mlops_address` (the address other hosts use) follows when it named
    // the old machine.
    for i in at + 1..end {
        let l = lines[i];
        if l.len() - l.trim_start().len() == child
            && let Some(v) = l.trim_start().strip_prefix("mlops_address:")
            && v.trim() == current.address
            && current.address != to.address
        {
            let newline = if l.ends_with('\n') { "\n" } else { "" };
            out[i] = format!("{}mlops_address: {}{newline}", " ".repeat(child), to.address);
        }
    }
    if !added.is_empty() {
        if !out[at].ends_with('\n') {
            out[at].push('\n');
        }
        out.splice(at + 1..at + 1, added);
    }
    Ok(out.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INV: &str = "\
# production
all:
  vars:
    ansible_user: root
  children:
    db:
      hosts:
        mlops1:   # the old box
          ansible_host: 10.0.0.5
          mlops_address: 10.0.0.5
        mlops2:
    airflow:
      hosts:
        mlops1:
";

    fn to(address: &str, port: u16, user: &str) -> NewAddress {
        NewAddress { address: address.into(), port, user: user.into() }
    }

    #[test]
    fn a_host_is_pointed_at_its_new_machine_and_nothing_else_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yml");
        std::fs::write(&path, INV).unwrap();
        let ssh = SshConfig::default();
        point_host_at(&path, 8, "mlops1", &to("10.0.0.9", 2222, "root"), &ssh).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            INV.replace(
                "          ansible_host: 10.0.0.5\n          mlops_address: 10.0.0.5\n",
                "          ansible_port: 2222\n          ansible_host: 10.0.0.9\n          mlops_address: 10.0.0.9\n"
            )
        );
        // A host with no variables gets its block.
        point_host_at(&path, 12, "mlops2", &to("10.0.0.7", 22, "ops"), &ssh).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("        mlops2:\n          ansible_host: 10.0.0.7\n          ansible_user: ops\n"),
            "{text}"
        );
        let t = crate::load_targets(&path, None, &ssh).unwrap();
        assert_eq!(t.iter().filter(|t| t.name == "mlops1").count(), 1);
    }

    #[test]
    fn what_cannot_be_edited_safely_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yml");
        let flow = "all:\n  hosts:\n    a: {ansible_host: 10.0.0.5}\n";
        std::fs::write(&path, flow).unwrap();
        let ssh = SshConfig::default();
        let e = point_host_at(&path, 3, "a", &to("10.0.0.9", 22, "root"), &ssh).unwrap_err();
        assert!(e.contains("block"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), flow);
        // Its address comes from its group: the host's own variable, added, wins (as in Ansible).
        let grouped =
            "all:\n  children:\n    g:\n      vars:\n        ansible_host: 10.0.0.5\n      hosts:\n        a:\n";
        std::fs::write(&path, grouped).unwrap();
        point_host_at(&path, 7, "a", &to("10.0.0.9", 22, "root"), &ssh).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let t = crate::load_targets(&path, None, &ssh).unwrap();
        assert!(
            matches!(&t[0].connection, Connection::Ssh { address, .. } if address == "10.0.0.9"),
            "host vars win over group vars: {text}"
        );
    }
}
