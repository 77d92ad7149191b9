//! Ansible's YAML inventory format, read into groups and hosts with their
//! effective variables.
//!
//! The format: a top-level mapping of group names (`all` and any others,
//! which are implicitly children of `all`); each group may hold `hosts`
//! (host name to a mapping of host variables, or nothing), `vars` and
//! `children` (group name to a group). Host names may carry `:port` and
//! numeric ranges (`web[01:03]`).
//!
//! Variable precedence follows Ansible: `all` first, then other groups by
//! depth (parents before children, groups of one depth by name), then the
//! host's own variables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::InventoryError;
use mlops_yaml::{Node, Value};

/// A parsed inventory.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Where it came from, for error messages.
    pub path: PathBuf,
    groups: BTreeMap<String, Group>,
    /// Hosts in the order they first appear.
    host_order: Vec<String>,
    hosts: BTreeMap<String, HostDef>,
}

#[derive(Debug, Clone, Default)]
struct Group {
    vars: Vec<(String, Node)>,
    children: BTreeSet<String>,
    hosts: BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
struct HostDef {
    vars: Vec<(String, Node)>,
    /// Line where the host was first named.
    line: usize,
}

/// A host with its effective variables.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryHost {
    pub name: String,
    /// Every group the host belongs to, directly or through children, `all` included.
    pub groups: Vec<String>,
    /// Effective variables after precedence; each with the line it came from.
    pub vars: BTreeMap<String, Node>,
    pub line: usize,
}

const GROUP_KEYS: [&str; 3] = ["hosts", "vars", "children"];

impl Inventory {
    /// Reads and parses an inventory file.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| InventoryError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses inventory text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, InventoryError> {
        let root: Node = if text.trim().is_empty() {
            Node { value: Value::Null, line: 1, column: 1 }
        } else {
            serde_saphyr::from_str(text).map_err(|e| InventoryError::Yaml {
                path: path.to_path_buf(),
                // The parser's text starts with its own `error: ` and calls
                // the source `<input>`; name the file instead.
                message: e.to_string().trim_start_matches("error: ").replace("<input>", &path.display().to_string()),
            })?
        };
        let mut inv = Inventory { path: path.to_path_buf(), ..Default::default() };
        inv.groups.insert("all".into(), Group::default());
        let entries = match &root.value {
            Value::Map(entries) => entries,
            Value::Null => {
                return Err(inv.invalid(
                    &root,
                    "the inventory is empty",
                    "an inventory starts with `all:` (or another group name) at the top level",
                ));
            }
            _ => {
                return Err(inv.invalid(
                    &root,
                    &format!("expected a mapping of group names at the top level, found {}", root.kind()),
                    "an inventory starts with `all:` (or another group name) at the top level",
                ));
            }
        };
        for (key, value) in entries {
            let name = inv.group_name(key)?;
            if name != "all" {
                inv.groups.get_mut("all").expect("all exists").children.insert(name.clone());
            }
            inv.read_group(&name, value, 0)?;
        }
        inv.check_cycles()?;
        Ok(inv)
    }

    fn invalid(&self, node: &Node, message: &str, hint: &str) -> InventoryError {
        InventoryError::Invalid {
            path: self.path.clone(),
            line: node.line,
            column: node.column,
            message: message.to_string(),
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        }
    }

    fn group_name(&self, key: &Node) -> Result<String, InventoryError> {
        let name = key.as_key().ok_or_else(|| self.invalid(key, "a group name must be a string", ""))?;
        if name.is_empty()
            || name.chars().any(|c| c.is_whitespace() || matches!(c, ':' | ',' | '!' | '&' | '*' | '?' | '[' | ']'))
        {
            return Err(self.invalid(
                key,
                &format!("`{name}` is not a valid group name"),
                "group names are letters, digits, `_`, `-` and `.`",
            ));
        }
        Ok(name)
    }

    fn read_group(&mut self, name: &str, node: &Node, depth: usize) -> Result<(), InventoryError> {
        if depth > 64 {
            return Err(self.invalid(node, "groups nest more than 64 levels deep", ""));
        }
        self.groups.entry(name.to_string()).or_default();
        let entries = match &node.value {
            Value::Null => return Ok(()),
            Value::Map(entries) => entries,
            _ => {
                return Err(self.invalid(
                    node,
                    &format!("group `{name}` must be a mapping, found {}", node.kind()),
                    "a group holds `hosts:`, `vars:` and `children:`",
                ));
            }
        };
        for (key, value) in entries {
            let field = key.as_key().unwrap_or_default();
            match field.as_str() {
                "hosts" => self.read_hosts(name, value)?,
                "vars" => {
                    let vars = self.read_vars(value, &format!("vars of group `{name}`"))?;
                    self.groups.get_mut(name).expect("inserted above").vars.extend(vars);
                }
                "children" => match &value.value {
                    Value::Null => {}
                    Value::Map(children) => {
                        for (ckey, cvalue) in children {
                            let child = self.group_name(ckey)?;
                            if child == "all" {
                                return Err(self.invalid(
                                    ckey,
                                    "`all` cannot be a child group",
                                    "every group is already a child of `all`",
                                ));
                            }
                            self.groups.get_mut(name).expect("inserted above").children.insert(child.clone());
                            self.read_group(&child, cvalue, depth + 1)?;
                        }
                    }
                    _ => {
                        return Err(self.invalid(
                            value,
                            &format!(
                                "`children` of group `{name}` must be a mapping of group names, found {}",
                                value.kind()
                            ),
                            "write `children:` followed by indented `groupname:` lines",
                        ));
                    }
                },
                other => {
                    return Err(self.invalid(
                        key,
                        &format!("unknown key `{other}` in group `{name}`"),
                        &format!(
                            "a group may hold only {}; host variables go under `hosts: {{HOST: {{...}}}}`, group variables under `vars:`",
                            GROUP_KEYS.map(|k| format!("`{k}`")).join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn read_hosts(&mut self, group: &str, node: &Node) -> Result<(), InventoryError> {
        let entries = match &node.value {
            Value::Null => return Ok(()),
            Value::Map(entries) => entries,
            Value::Seq(_) => {
                return Err(self.invalid(
                    node,
                    &format!("`hosts` of group `{group}` is a list; Ansible's YAML inventory wants a mapping"),
                    "write each host as `name:` (followed by its variables, or nothing) instead of `- name`",
                ));
            }
            _ => {
                return Err(self.invalid(
                    node,
                    &format!("`hosts` of group `{group}` must be a mapping, found {}", node.kind()),
                    "",
                ));
            }
        };
        for (key, value) in entries {
            let raw = key.as_key().ok_or_else(|| self.invalid(key, "a host name must be a string", ""))?;
            let (pattern, port) =
                split_host_port(&raw).map_err(|m| self.invalid(key, &m, "write `name:PORT` or set `ansible_port`"))?;
            let names = expand_ranges(&pattern)
                .map_err(|m| self.invalid(key, &m, "a range looks like `web[01:10]` or `db[a:c]`"))?;
            let mut vars = self.read_vars(value, &format!("host `{raw}`"))?;
            if let Some(port) = port {
                vars.insert(
                    0,
                    (
                        "ansible_port".into(),
                        Node { value: Value::Int(port.into()), line: key.line, column: key.column },
                    ),
                );
            }
            for name in names {
                if name.is_empty() {
                    return Err(self.invalid(key, "empty host name", ""));
                }
                let host =
                    self.hosts.entry(name.clone()).or_insert_with(|| HostDef { vars: Vec::new(), line: key.line });
                host.vars.extend(vars.iter().cloned());
                if !self.host_order.contains(&name) {
                    self.host_order.push(name.clone());
                }
                self.groups.get_mut(group).expect("group exists").hosts.insert(name);
            }
        }
        Ok(())
    }

    fn read_vars(&self, node: &Node, whose: &str) -> Result<Vec<(String, Node)>, InventoryError> {
        match &node.value {
            Value::Null => Ok(Vec::new()),
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| {
                    let key = k.as_key().ok_or_else(|| self.invalid(k, "a variable name must be a string", ""))?;
                    Ok((key, v.clone()))
                })
                .collect(),
            _ => Err(self.invalid(
                node,
                &format!("{whose} must be a mapping of variables, found {}", node.kind()),
                "write `name: value` pairs, indented under it",
            )),
        }
    }

    fn check_cycles(&self) -> Result<(), InventoryError> {
        fn visit(inv: &Inventory, name: &str, stack: &mut Vec<String>) -> Result<(), String> {
            if let Some(pos) = stack.iter().position(|g| g == name) {
                let mut cycle = stack[pos..].to_vec();
                cycle.push(name.to_string());
                return Err(cycle.join(" -> "));
            }
            stack.push(name.to_string());
            for child in &inv.groups[name].children {
                visit(inv, child, stack)?;
            }
            stack.pop();
            Ok(())
        }
        visit(self, "all", &mut Vec::new()).map_err(|cycle| InventoryError::Cycle { path: self.path.clone(), cycle })
    }

    /// Group names, sorted.
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// Host names in the order they first appear.
    pub fn host_names(&self) -> &[String] {
        &self.host_order
    }

    pub fn has_group(&self, name: &str) -> bool {
        self.groups.contains_key(name)
    }

    pub fn has_host(&self, name: &str) -> bool {
        self.hosts.contains_key(name)
    }

    /// Every host of a group, through its children.
    pub fn hosts_of_group(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut stack = vec![name.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(g) = stack.pop() {
            if !seen.insert(g.clone()) {
                continue;
            }
            if let Some(group) = self.groups.get(&g) {
                out.extend(group.hosts.iter().cloned());
                stack.extend(group.children.iter().cloned());
            }
        }
        if name == "all" {
            out.extend(self.hosts.keys().cloned());
        }
        out
    }

    /// The depth of each group below `all` (its longest path), which orders
    /// variable precedence.
    fn depths(&self) -> BTreeMap<&str, usize> {
        // The graph is acyclic (checked at parse time), so this ends.
        let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
        let mut stack = vec![("all", 0usize)];
        while let Some((g, d)) = stack.pop() {
            if depth.get(g).is_some_and(|old| *old >= d) && g != "all" {
                continue;
            }
            depth.insert(g, d);
            for child in &self.groups[g].children {
                stack.push((child.as_str(), d + 1));
            }
        }
        depth
    }

    /// A host with its effective variables, or `None` when not in the inventory.
    pub fn host(&self, name: &str) -> Option<InventoryHost> {
        let def = self.hosts.get(name)?;
        let depths = self.depths();
        let mut groups: Vec<&str> = self
            .groups
            .keys()
            .map(String::as_str)
            .filter(|g| *g == "all" || self.hosts_of_group(g).contains(name))
            .collect();
        groups.sort_by_key(|g| (depths.get(g).copied().unwrap_or(0), *g));
        let mut vars = BTreeMap::new();
        for g in &groups {
            for (k, v) in &self.groups[*g].vars {
                vars.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in &def.vars {
            vars.insert(k.clone(), v.clone());
        }
        Some(InventoryHost {
            name: name.to_string(),
            groups: groups.into_iter().map(str::to_string).collect(),
            vars,
            line: def.line,
        })
    }
}

/// `host:2222` → (`host`, Some(2222)). IPv6 literals in brackets keep their colons.
fn split_host_port(raw: &str) -> Result<(String, Option<u16>), String> {
    // A colon inside `[...]` belongs to a range (`web[01:03]`) or an IPv6
    // literal; only one after the last `]` can introduce a port.
    let tail_start = raw.rfind(']').map_or(0, |i| i + 1);
    let tail = &raw[tail_start..];
    let split = match tail.matches(':').count() {
        1 if tail_start > 0 || !raw.contains('[') => tail.find(':').map(|i| tail_start + i),
        _ => None,
    };
    let Some(at) = split else {
        return Ok((raw.to_string(), None));
    };
    let (host, p) = (&raw[..at], &raw[at + 1..]);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).filter(|h| h.contains(':')).unwrap_or(host);
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .map(|p| (host.to_string(), Some(p)))
        .ok_or_else(|| format!("`{raw}`: `{p}` is not a port number"))
}

/// Expands Ansible host ranges: `web[01:03]` → web01, web02, web03;
/// `db[a:c]`; `n[0:10:5]` with a stride.
pub fn expand_ranges(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('[') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find(']').map(|i| i + open).ok_or_else(|| format!("`{pattern}`: `[` without `]`"))?;
    let (prefix, inner, suffix) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let parts: Vec<&str> = inner.split(':').collect();
    let (start, end, step) = match parts.as_slice() {
        [a, b] => (*a, *b, 1usize),
        [a, b, s] => {
            (*a, *b, s.parse().ok().filter(|s| *s > 0).ok_or_else(|| format!("`{pattern}`: bad stride `{s}`"))?)
        }
        _ => return Err(format!("`{pattern}`: a range is `[start:end]` or `[start:end:stride]`")),
    };
    let mut items = Vec::new();
    if let (Ok(a), Ok(b)) = (start.parse::<u64>(), end.parse::<u64>()) {
        if a > b || b - a > 10_000 {
            return Err(format!("`{pattern}`: range must go upwards and hold at most 10000 hosts"));
        }
        let width = if start.starts_with('0') && start.len() > 1 { start.len() } else { 0 };
        for i in (a..=b).step_by(step) {
            items.push(format!("{i:0width$}"));
        }
    } else if start.len() == 1 && end.len() == 1 {
        let (a, b) = (start.as_bytes()[0], end.as_bytes()[0]);
        if !a.is_ascii_lowercase() && !a.is_ascii_uppercase() || a > b {
            return Err(format!("`{pattern}`: bad letter range"));
        }
        for c in (a..=b).step_by(step) {
            items.push((c as char).to_string());
        }
    } else {
        return Err(format!("`{pattern}`: a range is numbers or single letters"));
    }
    let mut out = Vec::new();
    for rest in expand_ranges(suffix)? {
        for item in &items {
            out.push(format!("{prefix}{item}{rest}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("inv.yml"))
    }

    #[test]
    fn precedence_and_nested_groups() {
        let inv = parse(
            "all:
  vars:
    ansible_user: deploy
    tier: base
  children:
    web:
      vars:
        tier: web
      children:
        web_eu:
          vars:
            tier: web_eu
          hosts:
            w1:
              ansible_host: 10.0.0.1
    db:
      hosts:
        d1:
          tier: mine
        w1:
",
        )
        .unwrap();
        let w1 = inv.host("w1").unwrap();
        assert_eq!(w1.vars["tier"].to_json(), "web_eu", "the deepest group wins");
        assert_eq!(w1.vars["ansible_user"].to_json(), "deploy");
        assert_eq!(w1.groups, ["all", "db", "web", "web_eu"]);
        assert_eq!(inv.host("d1").unwrap().vars["tier"].to_json(), "mine", "host vars win");
        assert_eq!(inv.hosts_of_group("web").into_iter().collect::<Vec<_>>(), ["w1"]);
        assert_eq!(inv.host_names(), ["w1", "d1"]);
    }

    #[test]
    fn top_level_groups_are_children_of_all_and_ranges_expand() {
        let inv = parse("web:\n  hosts:\n    web[01:03]:\n    other:2222:\n").unwrap();
        assert_eq!(inv.hosts_of_group("all").len(), 4);
        assert!(inv.has_host("web02"));
        assert_eq!(inv.host("other").unwrap().vars["ansible_port"].to_json(), 2222);
    }

    #[test]
    fn merge_keys_work() {
        let inv = parse("all:\n  hosts:\n    a: &common\n      ansible_user: u\n      ansible_port: 2200\n    b:\n      <<: *common\n      ansible_port: 2201\n").unwrap();
        let b = inv.host("b").unwrap();
        assert_eq!(b.vars["ansible_user"].to_json(), "u");
        assert_eq!(b.vars["ansible_port"].to_json(), 2201);
    }

    #[test]
    fn errors_name_line_and_field() {
        let err = parse("all:\n  hosts:\n    a:\n  childern:\n    x:\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("inv.yml:4:3"), "{text}");
        assert!(text.contains("unknown key `childern`"), "{text}");
        assert!(err.hint().unwrap().contains("`children`"));

        let err = parse("all:\n  hosts:\n    - a\n").unwrap_err();
        assert!(err.to_string().contains("inv.yml:3:5"), "{err}");

        let err = parse("all:\n  hosts:\n    a:\n   bad: [\n").unwrap_err();
        assert!(err.to_string().starts_with("inv.yml: invalid YAML"), "{err}");
        assert!(err.to_string().contains("line 4") || err.to_string().contains(":4:"), "{err}");
    }

    #[test]
    fn cycles_are_refused() {
        let err =
            parse("all:\n  children:\n    a:\n      children:\n        b:\n          children:\n            a:\n")
                .unwrap_err();
        assert!(err.to_string().contains("a -> b -> a"), "{err}");
    }
}
