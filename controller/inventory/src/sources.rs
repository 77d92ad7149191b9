//! Where an inventory comes from, in each form Ansible reads: a YAML file,
//! an INI file ([`crate::ini`]), the JSON `ansible-inventory --list` prints
//! (a file, or the output of an executable inventory script run with
//! `--list`, and `--host NAME` when it prints no `_meta`), or a directory of
//! any of these; then the `group_vars/` and `host_vars/` beside it.
//!
//! A file is read by its form, found as Ansible finds it: an executable
//! file that starts with `#!` (or is a program) is a script; `.yml`,
//! `.yaml` and `.json` are YAML (JSON being YAML), in the YAML inventory
//! form or the `--list` form, told apart by their shape; any other file is
//! YAML when it parses to a mapping and INI otherwise (its INI errors are
//! reported, or the YAML error when the text looks like YAML).
//!
//! `group_vars/NAME` and `host_vars/NAME` are found beside the inventory
//! file (inside an inventory directory) as Ansible's `host_group_vars`
//! plugin finds them: the first of `NAME`, `NAME.yml`, `NAME.yaml`,
//! `NAME.json`, and when that is a directory every file in it (sorted,
//! recursively, hidden files and backups skipped).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mlops_yaml::{Node, Value};

use crate::InventoryError;
use crate::inventory::Inventory;

/// How deep inventory (and variables) directories may nest: past this, a
/// link loop is assumed.
const MAX_DIR_DEPTH: usize = 16;

/// How long an inventory script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Files of an inventory directory Ansible skips (`INVENTORY_IGNORE_EXTS`).
const IGNORED_ENDINGS: [&str; 12] =
    [".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg", ".retry"];

/// Reads the inventory at `path` (a file or a directory), settled, with
/// the variables of `group_vars/` and `host_vars/` beside it.
pub(crate) fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let read_err = |source| InventoryError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mut inv = Inventory::empty(path);
    let base = if meta.is_dir() {
        let files = dir_sources(path)?;
        if files.is_empty() {
            return Err(InventoryError::Source {
                path: path.to_path_buf(),
                message: "the directory holds no inventory file".into(),
                hint: "put YAML, INI or JSON inventory files (or scripts) in it, or pass one file with -i".into(),
            });
        }
        for file in files {
            read_file(&mut inv, &file)?;
        }
        path.to_path_buf()
    } else {
        read_file(&mut inv, path)?;
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    inv.finish()?;
    read_vars_dirs(&mut inv, &base)?;
    Ok(inv)
}

/// The inventory files of a directory, as Ansible takes them: sorted by
/// name, subdirectories read too, hidden files, `group_vars`, `host_vars`
/// and ignored endings skipped.
fn dir_sources(dir: &Path) -> Result<Vec<PathBuf>, InventoryError> {
    dir_sources_at(dir, 0)
}

fn dir_sources_at(dir: &Path, depth: usize) -> Result<Vec<PathBuf>, InventoryError> {
    if depth > MAX_DIR_DEPTH {
        return Err(InventoryError::Source {
            path: dir.to_path_buf(),
            message: format!("inventory directories nest more than {MAX_DIR_DEPTH} deep"),
            hint: "a symbolic link that points back up the tree makes this; remove it".into(),
        });
    }
    let read_err = |source| InventoryError::Read { path: dir.to_path_buf(), source };
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let text = name.to_string_lossy();
        if text.starts_with('.')
            || ["group_vars", "host_vars", "vars_plugins"].contains(&text.as_ref())
            || IGNORED_ENDINGS.iter().any(|e| text.ends_with(e))
        {
            continue;
        }
        let path = dir.join(&name);
        let meta = std::fs::metadata(&path).map_err(|source| InventoryError::Read { path: path.clone(), source })?;
        if meta.is_dir() {
            out.extend(dir_sources_at(&path, depth + 1)?);
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(out)
}

fn read_file(inv: &mut Inventory, path: &Path) -> Result<(), InventoryError> {
    inv.begin_file(path);
    if is_script(path) {
        return read_script(inv, path);
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| InventoryError::Read { path: path.to_path_buf(), source })?;
    read_text(inv, &text, path)
}

/// An executable that starts as a program does: `#!` or an ELF header.
/// (An inventory file that only happens to be executable, as files copied
/// from some filesystems are, is read as text.)
fn is_script(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let mut head = [0u8; 4];
    executable
        && std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .is_ok_and(|n| head[..n].starts_with(b"#!") || head[..n].starts_with(b"\x7fELF"))
}

/// Reads inventory text of any static form into `inv`.
pub(crate) fn read_text(inv: &mut Inventory, text: &str, path: &Path) -> Result<(), InventoryError> {
    inv.begin_file(path);
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if matches!(ext.as_deref(), Some("yml" | "yaml" | "json")) {
        let root = parse_yaml(text, path)?;
        return read_structured(inv, &root);
    }
    // As Ansible: YAML when the text is a YAML mapping, INI otherwise.
    let yaml = parse_yaml(text, path);
    if let Ok(root) = &yaml
        && root.value == Value::Null
        && text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(());
    }
    if let Ok(root) = &yaml
        && matches!(root.value, Value::Map(_))
    {
        return read_structured(inv, root);
    }
    match crate::ini::read(inv, text) {
        Ok(()) => Ok(()),
        Err(ini) => match yaml {
            Err(yaml) if looks_like_yaml(text) => Err(yaml),
            _ => Err(ini),
        },
    }
}

/// Whether text that is neither valid YAML nor valid INI was meant as YAML:
/// its first line is `---` or a `key:`.
fn looks_like_yaml(text: &str) -> bool {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
    first.is_some_and(|l| l == "---" || l.ends_with(':'))
}

pub(crate) fn parse_yaml(text: &str, path: &Path) -> Result<Node, InventoryError> {
    if text.trim().is_empty() {
        return Ok(Node { value: Value::Null, line: 1, column: 1 });
    }
    let yaml = serde_saphyr::from_str(text);
    if yaml.is_err()
        && text.trim_start().starts_with('{')
        && let Ok(json) = serde_json::from_str::<serde_json::Value>(text)
    {
        // JSON that the YAML parser does not take (compact `{"a":1}` is
        // JSON but not every YAML parser's YAML): no positions inside it.
        return Ok(from_json(&json));
    }
    yaml.map_err(|e| InventoryError::Yaml {
        path: path.to_path_buf(),
        // The parser's text starts with its own `error: ` and calls the
        // source `<input>`; name the file instead.
        message: e.to_string().trim_start_matches("error: ").replace("<input>", &path.display().to_string()),
    })
}

/// A JSON value as a tree without positions (line 1 for all of it).
fn from_json(v: &serde_json::Value) -> Node {
    use serde_json::Value as J;
    let value = match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => Value::Seq(items.iter().map(from_json).collect()),
        J::Object(m) => Value::Map(
            m.iter().map(|(k, v)| (Node { value: Value::Str(k.clone()), line: 1, column: 1 }, from_json(v))).collect(),
        ),
    };
    Node { value, line: 1, column: 1 }
}

/// A YAML document in the YAML inventory form or the `--list` form. An
/// empty one is an empty inventory (Ansible reads it as INI, with nothing
/// in it).
fn read_structured(inv: &mut Inventory, root: &Node) -> Result<(), InventoryError> {
    if let Value::Map(entries) = &root.value
        && let Some((k, _)) = entries.iter().find(|(k, _)| k.as_key().as_deref() == Some("plugin"))
    {
        return Err(inv.invalid_at(
            k.line,
            k.column,
            "this is the configuration of an inventory plugin, which mlopsctl does not run",
            "let Ansible run it and pass what it prints: `ansible-inventory -i FILE --list > hosts.json`, then -i hosts.json",
        ));
    }
    match &root.value {
        Value::Null => Ok(()),
        _ if is_list_form(root) => read_list(inv, root).map(|_| ()),
        _ => inv.read_yaml(root),
    }
}

/// The `--list` form: it has `_meta` (`ansible-inventory --list` always
/// prints it); a YAML inventory never does.
fn is_list_form(root: &Node) -> bool {
    let Value::Map(entries) = &root.value else { return false };
    entries.iter().any(|(k, _)| k.as_key().as_deref() == Some("_meta"))
}

/// Reads the `--list` form; true when it carried `_meta` (the hosts'
/// variables), as a script that prints it need not be asked per host.
fn read_list(inv: &mut Inventory, root: &Node) -> Result<bool, InventoryError> {
    let hint = "the --list form maps group names to `{\"hosts\": [...], \"vars\": {...}, \"children\": [...]}` \
                (or to a list of hosts), and `_meta` to `{\"hostvars\": {HOST: {...}}}`";
    let Value::Map(entries) = &root.value else {
        return Err(inv.invalid_at(root.line, root.column, "expected a JSON object of groups", hint));
    };
    let mut meta = None;
    for (k, v) in entries {
        if k.as_key().as_deref() == Some("_meta") {
            meta = Some(v);
            continue;
        }
        let group = inv.group_name(k)?;
        inv.declare_group(&group);
        match &v.value {
            Value::Null => {}
            Value::Seq(hosts) => list_hosts(inv, &group, hosts)?,
            Value::Map(fields) => {
                for (fk, fv) in fields {
                    match (fk.as_key().as_deref(), &fv.value) {
                        (Some("hosts"), Value::Seq(hosts)) => list_hosts(inv, &group, hosts)?,
                        (Some("vars"), _) => {
                            for (name, value) in inv.read_vars(fv, &format!("vars of group `{group}`"))? {
                                inv.set_group_var(&group, name, value)?;
                            }
                        }
                        (Some("children"), Value::Seq(children)) => {
                            for c in children {
                                let child = inv.group_name(c)?;
                                if child == "all" {
                                    return Err(inv.invalid_at(c.line, c.column, "`all` cannot be a child group", ""));
                                }
                                inv.add_child(&group, &child);
                            }
                        }
                        (Some(key), _) => {
                            return Err(inv.invalid_at(
                                fk.line,
                                fk.column,
                                &format!("group `{group}`: unexpected `{key}` ({})", fv.kind()),
                                hint,
                            ));
                        }
                        (None, _) => return Err(inv.invalid_at(fk.line, fk.column, "a key must be a string", hint)),
                    }
                }
            }
            _ => {
                return Err(inv.invalid_at(
                    v.line,
                    v.column,
                    &format!("group `{group}` must be an object or a list of hosts, found {}", v.kind()),
                    hint,
                ));
            }
        }
    }
    let Some(meta) = meta else { return Ok(false) };
    let Value::Map(fields) = &meta.value else {
        return Err(inv.invalid_at(meta.line, meta.column, "`_meta` must be an object", hint));
    };
    for (fk, fv) in fields {
        if fk.as_key().as_deref() != Some("hostvars") {
            // `profile` and anything newer Ansible adds: not variables.
            continue;
        }
        let Value::Map(hosts) = &fv.value else {
            return Err(inv.invalid_at(fv.line, fv.column, "`_meta.hostvars` must be an object", hint));
        };
        for (h, vars) in hosts {
            let name = h.as_key().unwrap_or_default();
            // As Ansible: variables of a host no group lists are ignored.
            if inv.has_host(&name) {
                for (k, v) in inv.read_vars(vars, &format!("`_meta.hostvars` of `{name}`"))? {
                    inv.set_host_var(&name, k, v);
                }
            }
        }
    }
    Ok(true)
}

fn list_hosts(inv: &mut Inventory, group: &str, hosts: &[Node]) -> Result<(), InventoryError> {
    for h in hosts {
        let name = match &h.value {
            Value::Str(s) if !s.is_empty() && !s.chars().any(char::is_whitespace) => s.clone(),
            _ => {
                return Err(inv.invalid_at(
                    h.line,
                    h.column,
                    &format!("group `{group}`: a host must be a name, found {}", h.kind()),
                    "",
                ));
            }
        };
        inv.add_host(group, &name, h.line);
    }
    Ok(())
}

/// Runs an inventory script with `--list` and reads what it prints; when it
/// prints no `_meta`, asks it for each host's variables with `--host NAME`.
fn read_script(inv: &mut Inventory, path: &Path) -> Result<(), InventoryError> {
    let out = run_script(path, &["--list"])?;
    let root = script_json(path, "--list", &out)?;
    if !matches!(root.value, Value::Map(_)) {
        return Err(script_error(path, "--list", format!("printed {}, not a JSON object of groups", root.kind())));
    }
    let before: Vec<String> = inv.host_names().to_vec();
    if read_list(inv, &root)? {
        return Ok(());
    }
    let new: Vec<String> = inv.host_names().iter().filter(|h| !before.contains(h)).cloned().collect();
    for host in new {
        let out = run_script(path, &["--host", &host])?;
        let vars = script_json(path, &format!("--host {host}"), &out)?;
        for (k, v) in inv.read_vars(&vars, &format!("`--host {host}`"))? {
            inv.set_host_var(&host, k, v);
        }
    }
    Ok(())
}

fn script_error(path: &Path, args: &str, message: String) -> InventoryError {
    InventoryError::Script { path: path.to_path_buf(), args: args.to_string(), message }
}

fn script_json(path: &Path, args: &str, out: &[u8]) -> Result<Node, InventoryError> {
    let text =
        std::str::from_utf8(out).map_err(|_| script_error(path, args, "printed text that is not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Err(script_error(path, args, "printed nothing (it must print a JSON object)".into()));
    }
    parse_yaml(text, path).map_err(|e| script_error(path, args, format!("printed something that is not JSON: {e}")))
}

/// Runs `path args` (in this process's working directory, as Ansible
/// does), its output read as it comes (a large inventory does not block on
/// a full pipe). It runs in a process group of its own: after
/// [`SCRIPT_TIMEOUT`], or when something it started still holds its output
/// open after it exits, the whole group is killed.
fn run_script(path: &Path, args: &[&str]) -> Result<Vec<u8>, InventoryError> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    let shown = args.join(" ");
    let program =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut child = Command::new(&program)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| script_error(path, &shown, format!("cannot run it: {e}")))?;
    let pgid = rustix::process::Pid::from_child(&child);
    let kill_group = || {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    };
    let (tx, rx) = mpsc::channel();
    for (is_out, pipe) in [
        (true, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        (false, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send((is_out, buf));
        });
    }
    drop(tx);
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => {
                kill_group();
                let _ = child.wait();
                let why = match other {
                    Err(e) => format!("cannot wait for it: {e}"),
                    _ => format!("still running after {} s; stopped", SCRIPT_TIMEOUT.as_secs()),
                };
                return Err(script_error(path, &shown, why));
            }
        }
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok((true, buf)) => stdout = buf,
            Ok((false, buf)) => stderr = buf,
            Err(_) => {
                kill_group();
                return Err(script_error(
                    path,
                    &shown,
                    "exited, but something it started still holds its output open; stopped".into(),
                ));
            }
        }
    }
    if !status.success() {
        let text = String::from_utf8_lossy(&stderr);
        let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(script_error(
            path,
            &shown,
            format!(
                "it failed ({status}){}",
                if tail.is_empty() { String::new() } else { format!(": {}", tail.join(" / ")) }
            ),
        ));
    }
    Ok(stdout)
}

/// Reads `group_vars/` and `host_vars/` under `base` for every group and
/// host of the settled inventory.
fn read_vars_dirs(inv: &mut Inventory, base: &Path) -> Result<(), InventoryError> {
    for (sub, for_groups) in [("group_vars", true), ("host_vars", false)] {
        let dir = base.join(sub);
        if !dir.is_dir() {
            continue;
        }
        let names: Vec<String> =
            if for_groups { inv.group_names().map(str::to_string).collect() } else { inv.host_names().to_vec() };
        for name in names {
            // A name that is not one file name (`/srv/chroot`, `..`) names
            // no variables file (Ansible skips names that start with `/`).
            if name.contains('/') || name == "." || name == ".." {
                continue;
            }
            let files =
                vars_files(&dir, &name).map_err(|source| InventoryError::Read { path: dir.join(&name), source })?;
            for file in files {
                inv.begin_file(&file);
                let text = std::fs::read_to_string(&file)
                    .map_err(|source| InventoryError::Read { path: file.clone(), source })?;
                if text.starts_with("$ANSIBLE_VAULT") {
                    return Err(inv.invalid_at(
                        1,
                        1,
                        "this file is encrypted with Ansible Vault, which mlopsctl does not decrypt",
                        "keep the variables mlopsctl reads (ansible_host, ansible_user, ansible_port, keys) in a plain file; \
                         the stack's own secrets are generated and kept by mlopsctl",
                    ));
                }
                let root = parse_yaml(&text, &file)?;
                let whose = format!("{sub}/{name}");
                for (k, v) in inv.read_vars(&root, &whose)? {
                    if for_groups {
                        inv.set_group_dir_var(&name, k, v);
                    } else {
                        inv.set_host_dir_var(&name, k, v);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The variables files of `name` in `dir`: the first of `name`, `name.yml`,
/// `name.yaml`, `name.json` that exists, every file inside when it is a
/// directory.
fn vars_files(dir: &Path, name: &str) -> std::io::Result<Vec<PathBuf>> {
    for ext in ["", ".yml", ".yaml", ".json"] {
        let path = dir.join(format!("{name}{ext}"));
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => return files_in(&path),
            Ok(_) => return Ok(vec![path]),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Vec::new())
}

fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    files_in_at(dir, 0)
}

fn files_in_at(dir: &Path, depth: usize) -> std::io::Result<Vec<PathBuf>> {
    if depth > MAX_DIR_DEPTH {
        return Err(std::io::Error::other(format!("directories nest more than {MAX_DIR_DEPTH} deep (a link loop?)")));
    }
    let mut names: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let text = name.to_string_lossy();
        if text.starts_with('.') || text.ends_with('~') {
            continue;
        }
        let path = dir.join(&name);
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_string);
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() && ext.is_none() {
            out.extend(files_in_at(&path, depth + 1)?);
        } else if meta.is_file() && ext.as_deref().is_none_or(|e| ["yml", "yaml", "json"].contains(&e)) {
            out.push(path);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn var(inv: &Inventory, host: &str, key: &str) -> serde_json::Value {
        inv.host(host).unwrap().vars.get(key).map(Node::to_json).unwrap_or_default()
    }

    #[test]
    fn group_vars_and_host_vars_follow_ansible_s_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let inv_path = write(
            dir.path(),
            "hosts",
            "[web]\nw1 from_host=inv\n[web:vars]\nfrom_group=inv\nfrom_all=web-inv\n[all:vars]\nfrom_all=all-inv\n",
        );
        write(dir.path(), "group_vars/all.yml", "from_all: all-dir\nfrom_group: all-dir\nonly_all: 1\n");
        write(dir.path(), "group_vars/web/a.yml", "from_group: web-dir\n");
        write(dir.path(), "group_vars/web/b.yaml", "later: b\n");
        write(dir.path(), "group_vars/web/.hidden.yml", "later: hidden\n");
        write(dir.path(), "host_vars/w1", "from_host: dir\n");
        let inv = Inventory::load(&inv_path).unwrap();
        // group_vars/all is above every group variable of the inventory file.
        assert_eq!(var(&inv, "w1", "from_all"), "all-dir");
        assert_eq!(var(&inv, "w1", "from_group"), "web-dir");
        assert_eq!(var(&inv, "w1", "later"), "b");
        assert_eq!(var(&inv, "w1", "only_all"), 1);
        assert_eq!(var(&inv, "w1", "from_host"), "dir");
        let h = inv.host("w1").unwrap();
        assert_eq!(h.var_files["from_group"], dir.path().join("group_vars/web/a.yml"));
        assert_eq!(h.file, inv_path);
    }

    #[test]
    fn list_json_scripts_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let list = r#"{"_meta": {"hostvars": {"a": {"ansible_port": 2200}}, "profile": "inventory_legacy"},
            "all": {"children": ["ungrouped", "web"]}, "web": {"hosts": ["a"], "vars": {"x": 1}}, "ungrouped": {"hosts": ["b"]}}"#;
        let inv = Inventory::load(&write(dir.path(), "inv.json", list)).unwrap();
        assert_eq!(var(&inv, "a", "ansible_port"), 2200);
        assert_eq!(inv.host("b").unwrap().groups, ["all", "ungrouped"]);

        // A script without _meta is asked per host.
        let script = write(
            dir.path(),
            "s/inventory.sh",
            "#!/bin/sh\ncase \"$1\" in\n--list) echo '{\"db\": [\"d1\", \"d2\"]}' ;;\n\
             --host) echo \"{\\\"name_of\\\": \\\"$2\\\"}\" ;;\nesac\n",
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let inv = Inventory::load(&script).unwrap();
        assert_eq!(var(&inv, "d2", "name_of"), "d2");

        // A directory: every file, the script included; group_vars inside it.
        write(dir.path(), "s/web.ini", "[web]\nw1\n");
        write(dir.path(), "s/README.md", "not an inventory\n");
        write(dir.path(), "s/group_vars/db.yml", "tier: db\n");
        let inv = Inventory::load(&dir.path().join("s")).unwrap();
        assert_eq!(inv.host_names(), ["d1", "d2", "w1"]);
        assert_eq!(var(&inv, "d1", "tier"), "db");

        let failing = write(dir.path(), "bad.sh", "#!/bin/sh\necho oops >&2\nexit 3\n");
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Inventory::load(&failing).unwrap_err();
        assert!(e.to_string().contains("--list") && e.to_string().contains("oops"), "{e}");
    }

    #[test]
    fn a_broken_yaml_file_without_extension_gets_the_yaml_error() {
        let e = Inventory::parse("all:\n  hosts:\n    a:\n   bad: [\n", Path::new("hosts")).unwrap_err();
        assert!(e.to_string().starts_with("hosts: invalid YAML"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "group_vars/all.yml", "$ANSIBLE_VAULT;1.1;AES256\n6162\n");
        let e = Inventory::load(&write(dir.path(), "hosts", "h1\n")).unwrap_err();
        assert!(e.to_string().contains("Ansible Vault"), "{e}");
    }
}
