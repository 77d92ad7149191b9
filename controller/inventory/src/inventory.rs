//! The inventory model: groups (with children and variables), hosts (with
//! variables and where they were written), and each host's effective
//! variables by Ansible's precedence; and Ansible's YAML inventory format.
//!
//! The YAML format: a top-level mapping of group names (`all` and any
//! others); each group may hold `hosts` (host name to a mapping of host
//! variables, or nothing), `vars` and `children` (group name to a group).
//! Host names may carry `:port` and numeric ranges (`web[01:03]`). The other
//! forms (INI, `ansible-inventory --list` JSON, scripts, directories) and
//! `group_vars/` and `host_vars/` are read in [`crate::sources`]; they all
//! fill this model through the same few calls, and [`Inventory::finish`]
//! settles it as Ansible does: a group no other group holds is a child of
//! `all`, a host in no group but `all` is in `ungrouped`.
//!
//! Variable precedence follows Ansible (lowest first): the inventory's `all`
//! variables; the inventory's variables of the host's other groups, by depth
//! (parents before children), then `ansible_group_priority`, then name;
//! `group_vars/all`; `group_vars/` of the other groups in that order; the
//! host's inventory variables; `host_vars/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::InventoryError;
use mlops_yaml::{Node, Value};

/// A parsed inventory.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// What the user named (a file or a directory), for messages.
    pub path: PathBuf,
    /// Every file read; variables and hosts name theirs by index.
    files: Vec<PathBuf>,
    /// The file being read, for [`Inventory::invalid`].
    current: usize,
    groups: BTreeMap<String, Group>,
    /// Hosts in the order they first appear.
    host_order: Vec<String>,
    hosts: BTreeMap<String, HostDef>,
}

/// A variable and the file it was written in.
#[derive(Debug, Clone)]
pub(crate) struct Var {
    pub name: String,
    pub value: Node,
    pub file: usize,
}

#[derive(Debug, Clone, Default)]
struct Group {
    /// Variables from the inventory itself.
    vars: Vec<Var>,
    /// Variables from `group_vars/`.
    dir_vars: Vec<Var>,
    /// `ansible_group_priority` (1 when unset).
    priority: Option<i64>,
    children: BTreeSet<String>,
    hosts: BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
struct HostDef {
    vars: Vec<Var>,
    /// Variables from `host_vars/`.
    dir_vars: Vec<Var>,
    /// Line and file where the host was first named.
    line: usize,
    file: usize,
}

/// A host with its effective variables.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryHost {
    pub name: String,
    /// Every group the host belongs to, directly or through children, `all` included.
    pub groups: Vec<String>,
    /// Effective variables after precedence; each with the line it came from.
    pub vars: BTreeMap<String, Node>,
    /// The file each effective variable was written in.
    pub var_files: BTreeMap<String, PathBuf>,
    /// Where the host was first named: file and line.
    pub file: PathBuf,
    pub line: usize,
}

const GROUP_KEYS: [&str; 3] = ["hosts", "vars", "children"];

impl Inventory {
    /// Reads an inventory in any of the forms Ansible reads: a YAML, INI
    /// or `ansible-inventory --list` JSON file, an executable script, or a
    /// directory of them, with `group_vars/` and `host_vars/` beside it.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        crate::sources::load(path)
    }

    /// Parses inventory text in the form its name and content say (YAML,
    /// INI or `--list` JSON; no script is run, no `group_vars/` read);
    /// `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, InventoryError> {
        let mut inv = Inventory::empty(path);
        crate::sources::read_text(&mut inv, text, path)?;
        inv.finish()?;
        Ok(inv)
    }

    /// An inventory with only `all` and `ungrouped`, as Ansible starts.
    pub(crate) fn empty(path: &Path) -> Self {
        let mut inv = Inventory { path: path.to_path_buf(), ..Default::default() };
        inv.groups.insert("all".into(), Group::default());
        inv.groups.insert("ungrouped".into(), Group::default());
        inv
    }

    /// Registers a file about to be read; errors found from now on name it.
    pub(crate) fn begin_file(&mut self, path: &Path) -> usize {
        let i = match self.files.iter().position(|f| f == path) {
            Some(i) => i,
            None => {
                self.files.push(path.to_path_buf());
                self.files.len() - 1
            }
        };
        self.current = i;
        i
    }

    pub(crate) fn current_file(&self) -> &Path {
        self.files.get(self.current).map_or(self.path.as_path(), PathBuf::as_path)
    }

    pub(crate) fn invalid_at(&self, line: usize, column: usize, message: &str, hint: &str) -> InventoryError {
        InventoryError::Invalid {
            path: self.current_file().to_path_buf(),
            line,
            column,
            message: message.to_string(),
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        }
    }

    fn invalid(&self, node: &Node, message: &str, hint: &str) -> InventoryError {
        self.invalid_at(node.line, node.column, message, hint)
    }

    pub(crate) fn declare_group(&mut self, name: &str) {
        self.groups.entry(name.to_string()).or_default();
    }

    pub(crate) fn add_child(&mut self, parent: &str, child: &str) {
        self.declare_group(child);
        self.groups.entry(parent.to_string()).or_default().children.insert(child.to_string());
    }

    /// Adds host `name` to `group` (first naming it at `line` of the
    /// current file).
    pub(crate) fn add_host(&mut self, group: &str, name: &str, line: usize) {
        let file = self.current;
        self.hosts.entry(name.to_string()).or_insert_with(|| HostDef { line, file, ..Default::default() });
        if !self.host_order.iter().any(|h| h == name) {
            self.host_order.push(name.to_string());
        }
        self.groups.entry(group.to_string()).or_default().hosts.insert(name.to_string());
    }

    pub(crate) fn set_host_var(&mut self, host: &str, name: String, value: Node) {
        let file = self.current;
        if let Some(h) = self.hosts.get_mut(host) {
            h.vars.push(Var { name, value, file });
        }
    }

    pub(crate) fn set_host_dir_var(&mut self, host: &str, name: String, value: Node) {
        let file = self.current;
        if let Some(h) = self.hosts.get_mut(host) {
            h.dir_vars.push(Var { name, value, file });
        }
    }

    /// A group variable from the inventory; `ansible_group_priority` sets
    /// the group's priority instead, as in Ansible.
    pub(crate) fn set_group_var(&mut self, group: &str, name: String, value: Node) -> Result<(), InventoryError> {
        if name == "ansible_group_priority" {
            let priority = match &value.value {
                Value::Int(i) => Some(*i),
                Value::Str(s) => s.trim().parse().ok(),
                _ => None,
            };
            let priority = priority.ok_or_else(|| {
                self.invalid(
                    &value,
                    &format!("group `{group}`: `ansible_group_priority` must be a whole number"),
                    "groups of one depth apply their variables by priority, lowest first (default 1)",
                )
            })?;
            self.groups.entry(group.to_string()).or_default().priority = Some(priority);
            return Ok(());
        }
        let file = self.current;
        self.groups.entry(group.to_string()).or_default().vars.push(Var { name, value, file });
        Ok(())
    }

    pub(crate) fn set_group_dir_var(&mut self, group: &str, name: String, value: Node) {
        let file = self.current;
        if let Some(g) = self.groups.get_mut(group) {
            g.dir_vars.push(Var { name, value, file });
        }
    }

    /// Settles the inventory as Ansible does once every source is read:
    /// groups no other group holds become children of `all`; hosts in no
    /// group but `all` are in `ungrouped`, and only those; no cycles.
    pub(crate) fn finish(&mut self) -> Result<(), InventoryError> {
        let held: BTreeSet<String> = self.groups.values().flat_map(|g| g.children.iter().cloned()).collect();
        let orphans: Vec<String> = self.groups.keys().filter(|g| *g != "all" && !held.contains(*g)).cloned().collect();
        for g in orphans {
            self.add_child("all", &g);
        }
        self.check_cycles()?;
        let mut grouped = BTreeSet::new();
        for (name, g) in &self.groups {
            if name != "all" && name != "ungrouped" {
                grouped.extend(g.hosts.iter().cloned());
            }
        }
        // Hosts held through a child group count too.
        let all_hosts: Vec<String> = self.host_order.clone();
        let ungrouped = self.groups.get_mut("ungrouped").expect("always there");
        for h in all_hosts {
            if grouped.contains(&h) {
                ungrouped.hosts.remove(&h);
            } else {
                ungrouped.hosts.insert(h);
            }
        }
        Ok(())
    }

    /// Names every file this inventory was read from (for `group_vars/`
    /// errors and variable origins).
    pub(crate) fn file(&self, i: usize) -> &Path {
        self.files.get(i).map_or(self.path.as_path(), PathBuf::as_path)
    }

    /// Reads Ansible's YAML inventory form from a parsed document.
    pub(crate) fn read_yaml(&mut self, root: &Node) -> Result<(), InventoryError> {
        let entries = match &root.value {
            Value::Map(entries) => entries,
            Value::Null => {
                return Err(self.invalid(
                    root,
                    "the inventory is empty",
                    "an inventory starts with `all:` (or another group name) at the top level",
                ));
            }
            _ => {
                return Err(self.invalid(
                    root,
                    &format!("expected a mapping of group names at the top level, found {}", root.kind()),
                    "an inventory starts with `all:` (or another group name) at the top level",
                ));
            }
        };
        for (key, value) in entries {
            let name = self.group_name(key)?;
            self.read_group(&name, value, 0)?;
        }
        Ok(())
    }

    pub(crate) fn group_name(&self, key: &Node) -> Result<String, InventoryError> {
        let name = key.as_key().ok_or_else(|| self.invalid(key, "a group name must be a string", ""))?;
        check_group_name(&name).map_err(|(message, hint)| self.invalid(key, &message, hint))?;
        Ok(name)
    }

    fn read_group(&mut self, name: &str, node: &Node, depth: usize) -> Result<(), InventoryError> {
        if depth > 64 {
            return Err(self.invalid(node, "groups nest more than 64 levels deep", ""));
        }
        self.declare_group(name);
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
                    for (k, v) in self.read_vars(value, &format!("vars of group `{name}`"))? {
                        self.set_group_var(name, k, v)?;
                    }
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
                            self.add_child(name, &child);
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
            let names = self.host_pattern(&raw, key.line, key.column)?;
            let vars = self.read_vars(value, &format!("host `{raw}`"))?;
            for (name, port) in names {
                self.add_host(group, &name, key.line);
                if let Some(port) = port {
                    let node = Node { value: Value::Int(port.into()), line: key.line, column: key.column };
                    self.set_host_var(&name, "ansible_port".into(), node);
                }
                for (k, v) in &vars {
                    self.set_host_var(&name, k.clone(), v.clone());
                }
            }
        }
        Ok(())
    }

    /// A host pattern (`name`, `name:port`, `web[01:03]`) as the hosts it
    /// names, each with the port it carries.
    pub(crate) fn host_pattern(
        &self,
        raw: &str,
        line: usize,
        column: usize,
    ) -> Result<Vec<(String, Option<u16>)>, InventoryError> {
        let (pattern, port) = split_host_port(raw)
            .map_err(|m| self.invalid_at(line, column, &m, "write `name:PORT` or set `ansible_port`"))?;
        let names = expand_ranges(&pattern)
            .map_err(|m| self.invalid_at(line, column, &m, "a range looks like `web[01:10]` or `db[a:c]`"))?;
        if names.iter().any(String::is_empty) {
            return Err(self.invalid_at(line, column, "empty host name", ""));
        }
        Ok(names.into_iter().map(|n| (n, port)).collect())
    }

    pub(crate) fn read_vars(&self, node: &Node, whose: &str) -> Result<Vec<(String, Node)>, InventoryError> {
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

    /// Refuses a cycle of groups, naming it. Depth-first with three
    /// colours and an explicit stack: linear in groups and links, and a long
    /// chain of groups does not exhaust the call stack.
    fn check_cycles(&self) -> Result<(), InventoryError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Colour {
            White,
            Grey,
            Black,
        }
        let mut colour: BTreeMap<&str, Colour> = self.groups.keys().map(|g| (g.as_str(), Colour::White)).collect();
        let roots = std::iter::once("all").chain(self.groups.keys().map(String::as_str));
        for root in roots {
            if colour[root] != Colour::White {
                continue;
            }
            // The path from the root, each group with its children still to visit.
            let mut path: Vec<(&str, std::collections::btree_set::Iter<'_, String>)> =
                vec![(root, self.groups[root].children.iter())];
            colour.insert(root, Colour::Grey);
            while let Some((_, children)) = path.last_mut() {
                match children.next().map(String::as_str) {
                    Some(child) => match colour.get(child).copied().unwrap_or(Colour::Black) {
                        Colour::White => {
                            colour.insert(child, Colour::Grey);
                            path.push((child, self.groups[child].children.iter()));
                        }
                        Colour::Grey => {
                            let start = path.iter().position(|(g, _)| *g == child).unwrap_or(0);
                            let mut cycle: Vec<&str> = path[start..].iter().map(|(g, _)| *g).collect();
                            cycle.push(child);
                            return Err(InventoryError::Cycle { path: self.path.clone(), cycle: cycle.join(" -> ") });
                        }
                        Colour::Black => {}
                    },
                    None => {
                        let (done, _) = path.pop().expect("not empty");
                        colour.insert(done, Colour::Black);
                    }
                }
            }
        }
        Ok(())
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

    /// The depth of each group below `all` (its longest path from it),
    /// which orders variable precedence: children after their parents, in
    /// one pass over the groups in topological order.
    fn depths(&self) -> BTreeMap<&str, usize> {
        // Kahn's order over the (acyclic, checked when settled) graph.
        let mut parents_left: BTreeMap<&str, usize> = self.groups.keys().map(|g| (g.as_str(), 0)).collect();
        for g in self.groups.values() {
            for c in &g.children {
                *parents_left.entry(c.as_str()).or_default() += 1;
            }
        }
        let mut ready: Vec<&str> = parents_left.iter().filter(|(_, n)| **n == 0).map(|(g, _)| *g).collect();
        let mut depth: BTreeMap<&str, usize> = ready.iter().map(|g| (*g, 0)).collect();
        while let Some(g) = ready.pop() {
            let d = depth[g];
            for c in self.groups.get(g).map(|g| &g.children).into_iter().flatten() {
                let c = c.as_str();
                let slot = depth.entry(c).or_default();
                *slot = (*slot).max(d + 1);
                let left = parents_left.get_mut(c).expect("every group counted");
                *left -= 1;
                if *left == 0 {
                    ready.push(c);
                }
            }
        }
        depth
    }

    /// The groups host `name` is in, directly or through children (`all`
    /// left out): its direct groups and their ancestors.
    fn groups_of(&self, name: &str) -> BTreeSet<&str> {
        let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (g, group) in &self.groups {
            for c in &group.children {
                parents.entry(c.as_str()).or_default().push(g.as_str());
            }
        }
        let mut out = BTreeSet::new();
        let mut work: Vec<&str> =
            self.groups.iter().filter(|(_, g)| g.hosts.contains(name)).map(|(g, _)| g.as_str()).collect();
        while let Some(g) = work.pop() {
            if out.insert(g) {
                work.extend(parents.get(g).into_iter().flatten().copied());
            }
        }
        out.remove("all");
        out
    }

    /// A host with its effective variables, or `None` when not in the inventory.
    pub fn host(&self, name: &str) -> Option<InventoryHost> {
        let def = self.hosts.get(name)?;
        let depths = self.depths();
        let mut groups: Vec<&str> = self.groups_of(name).into_iter().collect();
        groups.sort_by_key(|g| (depths.get(g).copied().unwrap_or(0), self.groups[*g].priority.unwrap_or(1), *g));
        let all = &self.groups["all"];
        let layers = std::iter::once(&all.vars)
            .chain(groups.iter().map(|g| &self.groups[*g].vars))
            .chain(std::iter::once(&all.dir_vars))
            .chain(groups.iter().map(|g| &self.groups[*g].dir_vars))
            .chain([&def.vars, &def.dir_vars]);
        let mut vars = BTreeMap::new();
        let mut var_files = BTreeMap::new();
        for var in layers.flatten() {
            vars.insert(var.name.clone(), var.value.clone());
            var_files.insert(var.name.clone(), self.file(var.file).to_path_buf());
        }
        Some(InventoryHost {
            name: name.to_string(),
            groups: std::iter::once("all").chain(groups).map(str::to_string).collect(),
            vars,
            var_files,
            file: self.file(def.file).to_path_buf(),
            line: def.line,
        })
    }

    /// The inventory as `ansible-inventory --list` prints it, for `hosts`
    /// (the selected ones): `_meta.hostvars` with each host's effective
    /// variables (hosts without any left out), `all` with its children,
    /// and each group with its hosts and children (empty keys and groups
    /// left out).
    pub fn to_list_json(&self, hosts: &[String]) -> serde_json::Value {
        use serde_json::{Map, Value as J, json};
        let selected: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
        let mut out = Map::new();
        for (name, g) in &self.groups {
            let mut entry = Map::new();
            if name != "all" {
                let hs: Vec<&str> = self
                    .host_order
                    .iter()
                    .filter(|h| g.hosts.contains(*h) && selected.contains(h.as_str()))
                    .map(String::as_str)
                    .collect();
                if !hs.is_empty() {
                    entry.insert("hosts".into(), json!(hs));
                }
            }
            if !g.children.is_empty() {
                entry.insert("children".into(), json!(g.children));
            }
            if !entry.is_empty() {
                out.insert(name.clone(), J::Object(entry));
            }
        }
        let mut hostvars = Map::new();
        for h in self.host_order.iter().filter(|h| selected.contains(h.as_str())) {
            let host = self.host(h).expect("a host of this inventory");
            if !host.vars.is_empty() {
                hostvars.insert(h.clone(), host.vars.iter().map(|(k, v)| (k.clone(), v.to_json())).collect());
            }
        }
        out.insert("_meta".into(), json!({ "hostvars": hostvars }));
        J::Object(out)
    }
}

/// Ansible's rule for group names as mlopsctl enforces it: no whitespace
/// and none of the characters host patterns give a meaning to. `Err` holds
/// the message and a hint.
pub(crate) fn check_group_name(name: &str) -> Result<(), (String, &'static str)> {
    if name.is_empty()
        || name.chars().any(|c| c.is_whitespace() || matches!(c, ':' | ',' | '!' | '&' | '*' | '?' | '[' | ']'))
    {
        return Err((
            format!("`{name}` is not a valid group name"),
            "group names are letters, digits, `_`, `-` and `.`",
        ));
    }
    Ok(())
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
