//! Ansible's INI inventory form, read as Ansible's `ini` plugin reads it.
//!
//! Lines before any section are hosts of `ungrouped`. `[group]` holds host
//! lines (`name[:port] [key=value ...]`, ranges allowed), `[group:vars]`
//! one `key=value` per line, `[group:children]` one group name per line.
//! `[g:vars]` and `[p:children]` may name a group before the section that
//! declares it (`[g]` or `[g:children]`), but some section must declare it.
//! Comments start with `#` or `;` at the start of a line, and `#` on a host
//! line. Values go through Python's `literal_eval` as in Ansible
//! ([`crate::pylit`]): `port=2222` is a number, `x='2222'` a string, `x=yes`
//! the text `yes`.

use std::collections::BTreeMap;

use mlops_yaml::{Node, Value};

use crate::InventoryError;
use crate::inventory::{Inventory, check_group_name};
use crate::pylit;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Hosts,
    Children,
    Vars,
}

/// A group named before any section declared it.
struct Pending {
    line: usize,
    state: State,
    /// Groups whose `:children` listed it.
    parents: Vec<String>,
}

const SECTION_HINT: &str = "a section is `[group]`, `[group:vars]` or `[group:children]`, without spaces";

/// Reads INI inventory text into `inv` (its current file).
pub(crate) fn read(inv: &mut Inventory, text: &str) -> Result<(), InventoryError> {
    let mut group = "ungrouped".to_string();
    let mut state = State::Hosts;
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((name, kind)) = section(line) {
            state = match kind {
                None | Some("hosts") => State::Hosts,
                Some("children") => State::Children,
                Some("vars") => State::Vars,
                Some(other) => {
                    return Err(inv.invalid_at(
                        n,
                        1,
                        &format!("section `[{name}:{other}]` has an unknown type `{other}`"),
                        SECTION_HINT,
                    ));
                }
            };
            check_group_name(name).map_err(|(message, hint)| inv.invalid_at(n, 2, &message, hint))?;
            if !inv.has_group(name) {
                // `[g:vars]` alone does not declare `g`: some other
                // section must (checked at the end).
                if state == State::Vars && !pending.contains_key(name) {
                    pending.insert(name.to_string(), Pending { line: n, state, parents: Vec::new() });
                }
                inv.declare_group(name);
            }
            if state != State::Vars
                && let Some(p) = pending.get(name)
            {
                match p.state {
                    State::Children => add_pending_children(inv, name, &mut pending),
                    _ => {
                        pending.remove(name);
                    }
                }
            }
            group = name.to_string();
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            return Err(inv.invalid_at(n, 1, &format!("invalid section `{line}`"), SECTION_HINT));
        }
        match state {
            State::Hosts => host_line(inv, &group, line, n)?,
            State::Vars => {
                let Some((k, v)) = line.split_once('=') else {
                    return Err(inv.invalid_at(
                        n,
                        1,
                        &format!("expected `key=value` in `[{group}:vars]`, found `{line}`"),
                        "a :vars section holds one `name=value` per line",
                    ));
                };
                inv.set_group_var(&group, k.trim().to_string(), value(v.trim(), n))?;
            }
            State::Children => {
                let child = group_line(line).ok_or_else(|| {
                    inv.invalid_at(
                        n,
                        1,
                        &format!("expected a group name in `[{group}:children]`, found `{line}`"),
                        "a :children section holds one group name per line",
                    )
                })?;
                check_group_name(child).map_err(|(message, hint)| inv.invalid_at(n, 1, &message, hint))?;
                if child == "all" {
                    return Err(inv.invalid_at(
                        n,
                        1,
                        "`all` cannot be a child group",
                        "every group is already a child of `all`",
                    ));
                }
                if inv.has_group(child) {
                    inv.add_child(&group, child);
                } else {
                    pending
                        .entry(child.to_string())
                        .or_insert(Pending { line: n, state: State::Children, parents: Vec::new() })
                        .parents
                        .push(group.clone());
                }
            }
        }
    }
    // A group still pending was named but never declared; the first one
    // (by line) is reported.
    if let Some((name, p)) = pending.iter().min_by_key(|(_, p)| p.line) {
        let (message, hint) = match p.state {
            State::Vars => (
                format!("`[{name}:vars]` is for group `{name}`, which no section declares"),
                format!("declare it with `[{name}]` (its hosts) or `[{name}:children]`"),
            ),
            _ => (
                format!(
                    "`[{}:children]` lists group `{name}`, which no section declares",
                    p.parents.last().map_or("?", String::as_str)
                ),
                format!("declare it with `[{name}]` (its hosts) or `[{name}:children]`, or check the name"),
            ),
        };
        return Err(inv.invalid_at(p.line, 1, &message, &hint));
    }
    Ok(())
}

/// `[name]` or `[name:kind]`, a comment allowed after it.
fn section(line: &str) -> Option<(&str, Option<&str>)> {
    let inner = line.strip_prefix('[')?;
    let close = inner.find(']')?;
    let rest = inner[close + 1..].trim_start();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return None;
    }
    let inner = &inner[..close];
    let (name, kind) = match inner.split_once(':') {
        Some((n, k)) => (n, Some(k)),
        None => (inner, None),
    };
    let name_ok = !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == ':' || c == ']');
    let kind_ok = kind.is_none_or(|k| !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_'));
    (name_ok && kind_ok).then_some((name, kind))
}

/// A group name alone on its line, a comment allowed after it (`#` after
/// whitespace: `web#x` is a name, as in Ansible).
fn group_line(line: &str) -> Option<&str> {
    let end = line.find(char::is_whitespace).unwrap_or(line.len());
    let (name, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let ok = !name.is_empty() && !name.contains([':', ']']) && (rest.is_empty() || rest.starts_with('#'));
    ok.then_some(name)
}

fn host_line(inv: &mut Inventory, group: &str, line: &str, n: usize) -> Result<(), InventoryError> {
    let tokens = pylit::shlex_split(line).map_err(|e| {
        inv.invalid_at(n, 1, &format!("host line `{line}`: {e}"), "quote a value that holds spaces or `#`")
    })?;
    let Some((pattern, rest)) = tokens.split_first() else { return Ok(()) };
    if pattern == "---" {
        return Err(inv.invalid_at(
            n,
            1,
            "`---` starts a YAML document, but this file is read as INI",
            "name a YAML inventory `.yml` or `.yaml`, or check its syntax: it did not parse as YAML",
        ));
    }
    if pattern.ends_with(':') {
        return Err(inv.invalid_at(
            n,
            1,
            &format!("host `{pattern}` ends in `:`, which introduces a port"),
            "write `name:PORT`, or `name` alone",
        ));
    }
    let hosts = inv.host_pattern(pattern, n, 1)?;
    let mut vars = Vec::new();
    for t in rest {
        let Some((k, v)) = t.split_once('=') else {
            return Err(inv.invalid_at(
                n,
                1,
                &format!("expected `key=value` after host `{pattern}`, found `{t}`"),
                "host variables are `name=value` after the host name; quote a value with spaces",
            ));
        };
        vars.push((k.to_string(), value(v, n)));
    }
    for (host, port) in hosts {
        inv.add_host(group, &host, n);
        if let Some(port) = port {
            inv.set_host_var(&host, "ansible_port".into(), Node { value: Value::Int(port.into()), line: n, column: 1 });
        }
        for (k, v) in &vars {
            inv.set_host_var(&host, k.clone(), v.clone());
        }
    }
    Ok(())
}

/// A value as Ansible keeps it: the Python literal it is, else its text.
fn value(text: &str, line: usize) -> Node {
    pylit::literal(text, line).unwrap_or(Node { value: Value::Str(text.to_string()), line, column: 1 })
}

/// Declares `group`, which `:children` sections named before it existed,
/// as the child of each (and so on up, for parents that were pending too).
fn add_pending_children(inv: &mut Inventory, group: &str, pending: &mut BTreeMap<String, Pending>) {
    // A work list, not recursion: a long chain of groups must not exhaust the stack.
    let mut work = vec![group.to_string()];
    while let Some(g) = work.pop() {
        let Some(p) = pending.remove(&g) else { continue };
        for parent in p.parents {
            inv.add_child(&parent, &g);
            if pending.get(&parent).is_some_and(|p| p.state == State::Children) {
                work.push(parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("hosts"))
    }

    #[test]
    fn ansible_s_own_example() {
        let inv = parse(
            "host0 # ungrouped\n\
             [web]\nhost1\nhost2 ansible_port=222 # inline\n\n\
             [web:vars]\nhttp_port=8080\nmyvar=23 # in a vars section\n\n\
             [web:children]\napache\nnginx\n\n\
             [apache]\ntomcat1\ntomcat2 myvar=34\ntomcat3 mysecret=\"'03#pa33w0rd'\"\n\n\
             [nginx]\njenkins1\n\n[nginx:vars]\nhas_java = True\n\n[all:vars]\nhas_java = False\n\n\
             ; a comment\n[g1]\nweb[01:02]:2200 user=\"a b\"\n",
        )
        .unwrap();
        let vars = |h: &str| -> BTreeMap<String, serde_json::Value> {
            inv.host(h).unwrap().vars.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()
        };
        let v = vars("host2");
        assert_eq!(v["ansible_port"], 222);
        assert_eq!(v["http_port"], 8080);
        assert_eq!(v["has_java"], false);
        let v = vars("tomcat2");
        assert_eq!(v["myvar"], 34, "host vars win");
        assert_eq!(vars("tomcat3")["mysecret"], "03#pa33w0rd");
        assert_eq!(vars("jenkins1")["has_java"], true, "the child group wins over its parent and all");
        assert_eq!(vars("web02")["user"], "a b");
        assert_eq!(vars("web02")["ansible_port"], 2200);
        assert_eq!(inv.host("host0").unwrap().groups, ["all", "ungrouped"]);
        assert_eq!(inv.host("tomcat1").unwrap().groups, ["all", "web", "apache"]);
        assert!(inv.hosts_of_group("web").contains("jenkins1"));
        assert_eq!(inv.host("tomcat1").unwrap().line, 15);
    }

    #[test]
    fn groups_may_be_named_before_they_are_declared() {
        let inv = parse("[prod:children]\nweb\n[web:vars]\nx=1\n[web]\nw1\n").unwrap();
        assert_eq!(inv.host("w1").unwrap().groups, ["all", "prod", "web"]);
        assert_eq!(inv.host("w1").unwrap().vars["x"].to_json(), 1);
    }

    #[test]
    fn errors_name_the_line() {
        let err = |text: &str| parse(text).unwrap_err();
        let e = err("[web]\nw1\n[db:vars]\nx=1\n");
        assert_eq!(e.to_string(), "hosts:3:1: `[db:vars]` is for group `db`, which no section declares");
        let e = err("[prod:children]\nweb\ndb\n[web]\n");
        assert!(e.to_string().starts_with("hosts:3:1: `[prod:children]` lists group `db`"), "{e}");
        let e = err("[web]\nw1 port\n");
        assert!(e.to_string().starts_with("hosts:2:1: expected `key=value` after host `w1`"), "{e}");
        let e = err("[web:stuff]\n");
        assert!(e.to_string().contains("unknown type `stuff`"), "{e}");
        let e = err("[ web ]\n");
        assert!(e.to_string().contains("invalid section"), "{e}");
        let e = err("[web]\nw1 a='x\n");
        assert!(e.to_string().contains("no closing quotation"), "{e}");
    }
}
