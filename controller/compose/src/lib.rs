//! Compose files into the stack model ([`mlops_proto::stack::Stack`]).
//!
//! The file is parsed into a YAML tree that keeps positions (anchors,
//! aliases and merge keys resolved by serde-saphyr), string values are
//! interpolated ([`interpolate`]) from the environment and the stack
//! directory's `.env`, and the tree is read into the typed model. A key the
//! model does not know is a [`Warning`] naming it and its line, never
//! silently dropped; `x-*` keys are extensions and pass quietly. Invalid
//! input is a [`ComposeError`] with file, line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mlops_proto::stack::{
    Build, Condition, Healthcheck, Limits, Logging, Mount, MountKind, Network, Port, Service, Stack, StackOptions,
    Ulimit, Volume,
};
use mlops_yaml::{Node, Value};

pub mod emit;
pub mod interpolate;

/// Names tried, in order, when a directory is given.
pub const FILE_NAMES: [&str; 4] = ["compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"];

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("no Compose file in `{}` (looked for {})", dir.display(), FILE_NAMES.join(", "))]
    NotFound { dir: PathBuf },
    #[error("cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid YAML: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{}:{line}: {message}", path.display())]
    DotEnv { path: PathBuf, line: usize, message: String },
}

impl ComposeError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ComposeError::NotFound { .. } => Some("pass the directory holding compose.yaml with --stack DIR".into()),
            ComposeError::Yaml { .. } => {
                Some("check the indentation around that line: YAML nests by spaces (tabs are not allowed)".into())
            }
            _ => None,
        }
    }
}

/// Something accepted but worth telling the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path.display(), self.line, self.column, self.message)
    }
}

/// A loaded stack.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub stack: Stack,
    pub warnings: Vec<Warning>,
    /// The Compose file read.
    pub file: PathBuf,
    /// The stack directory (the Compose file's directory).
    pub dir: PathBuf,
}

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Project name; default: the file's `name:`, else the directory's name.
    pub project: Option<String>,
    /// Variables for interpolation; they win over `.env`.
    pub env: BTreeMap<String, String>,
    /// Profiles to enable; services with other profiles are left out.
    pub profiles: Vec<String>,
}

/// The Compose file: `path` itself, or the first of [`FILE_NAMES`] in it.
fn compose_file(path: &Path) -> Result<PathBuf, ComposeError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    FILE_NAMES
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| ComposeError::NotFound { dir: path.to_path_buf() })
}

fn read(file: &Path) -> Result<String, ComposeError> {
    std::fs::read_to_string(file).map_err(|source| ComposeError::Read { path: file.to_path_buf(), source })
}

/// The YAML tree of `text`; a syntax error names `file` instead of `<input>`.
fn yaml_tree(text: &str, file: &Path) -> Result<Node, ComposeError> {
    serde_saphyr::from_str(text).map_err(|e| ComposeError::Yaml {
        path: file.to_path_buf(),
        message: e.to_string().trim_start_matches("error: ").replace("<input>", &file.display().to_string()),
    })
}

/// The project name when neither `--project` nor `name:` gives one: the
/// stack directory's name.
fn default_project(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "stack".into())
}

/// Loads a Compose file, or the Compose file in a directory.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Loaded, ComposeError> {
    let file = compose_file(path)?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let text = read(&file)?;
    let dotenv_path = dir.join(".env");
    let mut env = match std::fs::read_to_string(&dotenv_path) {
        Ok(t) => interpolate::parse_dotenv(&t).map_err(|(line, message)| ComposeError::DotEnv {
            path: dotenv_path.clone(),
            line,
            message,
        })?,
        Err(_) => BTreeMap::new(),
    };
    env.extend(options.env.clone());
    parse(&text, &file, &dir, &env, options)
}

/// Parses Compose text. `file` is used in messages, `dir` to resolve
/// `env_file` and the default project name.
pub fn parse(
    text: &str,
    file: &Path,
    dir: &Path,
    env: &BTreeMap<String, String>,
    options: &LoadOptions,
) -> Result<Loaded, ComposeError> {
    let root = yaml_tree(text, file)?;
    let mut p = Parser {
        file: file.to_path_buf(),
        dir: dir.to_path_buf(),
        env,
        warnings: Vec::new(),
        rotate_at: BTreeMap::new(),
        placement_at: BTreeMap::new(),
        ui_at: BTreeMap::new(),
        migrate_at: None,
        users_at: None,
        all_services: std::collections::BTreeSet::new(),
    };
    let root = p.interpolate_tree(root)?;
    let mut stack = p.stack(&root, options)?;
    // Which variables carry credentials, with the secrets' values at hand.
    let secrets: BTreeMap<String, String> =
        stack.options.secrets.iter().filter_map(|n| env.get(n).map(|v| (n.clone(), v.clone()))).collect();
    stack.options.credentials = stack
        .services
        .iter()
        .map(|(name, svc)| {
            (name.clone(), mlops_proto::stack::credential_variables(&stack.project, &svc.environment, &secrets))
        })
        .filter(|(_, c)| !c.is_empty())
        .collect();
    p.warnings.sort_by_key(|w| (w.line, w.column));
    // Each thing is said once: an unset variable (as Compose does) at the
    // first place that names it, whether a string names it twice or an
    // anchor merged into several services carries it.
    let mut seen = std::collections::BTreeSet::new();
    let warnings: Vec<Warning> = p.warnings.into_iter().filter(|w| seen.insert(w.message.clone())).collect();
    Ok(Loaded { stack, warnings, file: file.to_path_buf(), dir: dir.to_path_buf() })
}

struct Parser<'a> {
    file: PathBuf,
    dir: PathBuf,
    env: &'a BTreeMap<String, String>,
    warnings: Vec<Warning>,
    /// Where each `x-mlops.rotate` entry is, for errors found once the
    /// services are known.
    rotate_at: BTreeMap<String, Node>,
    /// Where each part of `x-mlops.placement` is (`role NAME`,
    /// `every_host`, `remote_ports SERVICE`).
    placement_at: BTreeMap<String, Node>,
    /// Where each `x-mlops.ui` entry is, by name.
    ui_at: BTreeMap<String, Node>,
    /// Where `x-mlops.migrate` is, for errors found once the services and
    /// volumes are known.
    migrate_at: Option<Node>,
    users_at: Option<Node>,
    /// Every service of the file, in an enabled profile or not.
    all_services: std::collections::BTreeSet<String>,
}

type R<T> = Result<T, ComposeError>;

/// The service keys mlopsctl acts on (named in the unknown-key warning).
const SERVICE_KEYS: [&str; 34] = [
    "image",
    "build",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "volumes",
    "tmpfs",
    "networks",
    "network_mode",
    "depends_on",
    "healthcheck",
    "restart",
    "stop_grace_period",
    "user",
    "working_dir",
    "labels",
    "profiles",
    "deploy",
    "cap_add",
    "cap_drop",
    "read_only",
    "security_opt",
    "privileged",
    "pid",
    "init",
    "ulimits",
    "shm_size",
    "extra_hosts",
    "hostname",
    "logging",
    "x-*",
];

impl Parser<'_> {
    fn err(&self, node: &Node, message: impl Into<String>) -> ComposeError {
        ComposeError::Invalid { path: self.file.clone(), line: node.line, column: node.column, message: message.into() }
    }

    /// [`Self::err`] at `node`, or at the file's start when unknown.
    fn err_at(&self, node: Option<&Node>, message: impl Into<String>) -> ComposeError {
        let (line, column) = node.map_or((1, 1), |n| (n.line, n.column));
        ComposeError::Invalid { path: self.file.clone(), line, column, message: message.into() }
    }

    fn warn(&mut self, node: &Node, message: impl Into<String>) {
        self.warnings.push(Warning {
            path: self.file.clone(),
            line: node.line,
            column: node.column,
            message: message.into(),
        });
    }

    /// Interpolates every string value (not keys), keeping positions.
    fn interpolate_tree(&mut self, node: Node) -> R<Node> {
        let Node { value, line, column } = node;
        let value = match value {
            Value::Str(s) => {
                let r = interpolate::interpolate(&s, self.env).map_err(|m| ComposeError::Invalid {
                    path: self.file.clone(),
                    line,
                    column,
                    message: m,
                })?;
                for var in r.unset {
                    self.warnings.push(Warning {
                        path: self.file.clone(),
                        line,
                        column,
                        message: format!("variable {var} is not set; using an empty string"),
                    });
                }
                Value::Str(r.value)
            }
            Value::Seq(items) => Value::Seq(items.into_iter().map(|n| self.interpolate_tree(n)).collect::<R<_>>()?),
            Value::Map(entries) => {
                Value::Map(entries.into_iter().map(|(k, v)| Ok((k, self.interpolate_tree(v)?))).collect::<R<_>>()?)
            }
            other => other,
        };
        Ok(Node { value, line, column })
    }

    fn map<'n>(&self, node: &'n Node, what: &str) -> R<&'n [(Node, Node)]> {
        match &node.value {
            Value::Map(entries) => Ok(entries),
            Value::Null => Ok(&[]),
            _ => Err(self.err(node, format!("{what} must be a mapping, found {}", node.kind()))),
        }
    }

    fn string(&self, node: &Node, what: &str) -> R<String> {
        match &node.value {
            Value::Str(s) => Ok(s.clone()),
            Value::Int(i) => Ok(i.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(self.err(node, format!("{what} must be a string, found {}", node.kind()))),
        }
    }

    /// A port number (1-65535) at `node`.
    fn port_number(&self, node: &Node, what: &str) -> R<u16> {
        let text = self.string(node, what)?;
        match text.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(self.err(node, format!("`{text}` is not a port number"))),
        }
    }

    fn opt_string(&self, node: &Node, what: &str) -> R<Option<String>> {
        if node.value == Value::Null { Ok(None) } else { self.string(node, what).map(Some) }
    }

    fn bool(&self, node: &Node, what: &str) -> R<bool> {
        match &node.value {
            Value::Bool(b) => Ok(*b),
            Value::Str(s) if s == "true" => Ok(true),
            Value::Str(s) if s == "false" => Ok(false),
            _ => Err(self.err(node, format!("{what} must be true or false"))),
        }
    }

    fn string_list(&self, node: &Node, what: &str) -> R<Vec<String>> {
        match &node.value {
            Value::Seq(items) => items.iter().map(|i| self.string(i, what)).collect(),
            Value::Null => Ok(Vec::new()),
            _ => Err(self.err(node, format!("{what} must be a list, found {}", node.kind()))),
        }
    }

    /// `command`/`entrypoint`: a list, or a string split like a shell would.
    fn command(&self, node: &Node, what: &str) -> R<Option<Vec<String>>> {
        match &node.value {
            Value::Null => Ok(None),
            Value::Str(s) => split_words(s).map(Some).map_err(|m| self.err(node, format!("{what}: {m}"))),
            Value::Seq(_) => self.string_list(node, what).map(Some),
            _ => Err(self.err(node, format!("{what} must be a string or a list"))),
        }
    }

    /// `environment`, `labels`, `args`: a mapping or a `KEY=value` list.
    fn key_values(&self, node: &Node, what: &str, from_env: bool) -> R<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        match &node.value {
            Value::Null => {}
            Value::Map(entries) => {
                for (k, v) in entries {
                    let key = k.as_key().unwrap_or_default();
                    match &v.value {
                        Value::Null => {
                            if from_env && let Some(val) = self.env.get(&key) {
                                out.insert(key, val.clone());
                            } else if !from_env {
                                out.insert(key, String::new());
                            }
                        }
                        Value::Seq(_) | Value::Map(_) => {
                            return Err(self.err(v, format!("{what} `{key}` must be a string, found {}", v.kind())));
                        }
                        _ => {
                            out.insert(key, self.string(v, what)?);
                        }
                    }
                }
            }
            Value::Seq(items) => {
                for item in items {
                    let s = self.string(item, what)?;
                    match s.split_once('=') {
                        Some((k, v)) => {
                            out.insert(k.to_string(), v.to_string());
                        }
                        None => {
                            if from_env && let Some(val) = self.env.get(&s) {
                                out.insert(s, val.clone());
                            } else if !from_env {
                                out.insert(s, String::new());
                            }
                        }
                    }
                }
            }
            _ => return Err(self.err(node, format!("{what} must be a mapping or a list of KEY=VALUE"))),
        }
        Ok(out)
    }

    fn stack(&mut self, root: &Node, options: &LoadOptions) -> R<Stack> {
        let entries = match &root.value {
            Value::Map(e) => e.clone(),
            _ => return Err(self.err(root, "a Compose file is a mapping with `services:` at the top")),
        };
        let mut stack = Stack::default();
        let mut name = None;
        let mut services_node = None;
        for (k, v) in &entries {
            let key = k.as_key().unwrap_or_default();
            match key.as_str() {
                "services" => services_node = Some(v.clone()),
                "networks" => {
                    for (nk, nv) in self.map(v, "networks")? {
                        let n = self.network(nk, nv)?;
                        stack.networks.insert(nk.as_key().unwrap_or_default(), n);
                    }
                }
                "volumes" => {
                    for (vk, vv) in self.map(v, "volumes")? {
                        let vol = self.volume(vk, vv)?;
                        stack.volumes.insert(vk.as_key().unwrap_or_default(), vol);
                    }
                }
                "name" => name = Some(self.string(v, "name")?),
                "version" => {}
                "x-mlops" => stack.options = self.options(v)?,
                k2 if k2.starts_with("x-") => {}
                other => self.warn(k, format!("unknown top-level key `{other}` is ignored")),
            }
        }
        let project = options.project.clone().or(name).unwrap_or_else(|| default_project(&self.dir));
        stack.project = normalize_project(&project).ok_or_else(|| {
            self.err(
                root,
                format!("project name `{project}` has no letter or digit; set `name:` in the file or pass --project"),
            )
        })?;
        let services_node = services_node.ok_or_else(|| self.err(root, "no `services:` in the Compose file"))?;
        let mut positions = BTreeMap::new();
        let mut off_volumes: BTreeSet<String> = BTreeSet::new();
        for (sk, sv) in self.map(&services_node, "services")? {
            let sname = sk.as_key().unwrap_or_default();
            if sname.is_empty() || !sname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(
                    self.err(sk, format!("`{sname}` is not a valid service name (letters, digits, `-`, `_`, `.`)"))
                );
            }
            let svc = self.service(&sname, sv)?;
            self.all_services.insert(sname.clone());
            if !svc.profiles.is_empty() && !svc.profiles.iter().any(|p| options.profiles.contains(p)) {
                off_volumes
                    .extend(svc.volumes.iter().filter(|m| m.kind == MountKind::Volume).map(|m| m.source.clone()));
                continue;
            }
            positions.insert(sname.clone(), sk.clone());
            stack.services.insert(sname, svc);
        }
        if stack.services.is_empty() {
            return Err(self.err(&services_node, "the stack has no services (with the enabled profiles)"));
        }
        // Named volumes only services of profiles that are off use are not
        // made (nor moved by migrate), as Compose does.
        for volume in off_volumes {
            let used = stack.services.values().flat_map(|s| &s.volumes).any(|m| m.source == volume);
            if !used {
                stack.volumes.remove(&volume);
            }
        }
        self.validate(&stack, &positions)?;
        // What names services of profiles that are off names nothing.
        let present: BTreeSet<String> = stack.services.keys().cloned().collect();
        forget_services(&mut stack, &|s| !present.contains(s));
        Ok(stack)
    }

    fn validate(&self, stack: &Stack, positions: &BTreeMap<String, Node>) -> R<()> {
        let placement = &stack.options.placement;
        if !placement.is_empty() {
            let mut placed: BTreeMap<&str, String> = BTreeMap::new();
            let roles = placement.roles.iter().map(|(name, role)| (format!("role {name}"), &role.services));
            for (what, services) in roles.chain([("every_host".to_string(), &placement.every_host)]) {
                let at = self.placement_at.get(&what);
                for service in services {
                    // A service of a profile not enabled is not in the stack: no error.
                    if !stack.services.contains_key(service) && !self.all_services.contains(service) {
                        return Err(self.err_at(
                            at,
                            format!("x-mlops.placement: {what} names `{service}`, which is not a service"),
                        ));
                    }
                    if let Some(other) = placed.insert(service, what.clone()) {
                        return Err(self.err_at(
                            at,
                            format!(
                                "x-mlops.placement: `{service}` is in {other} and in {what}; a service has one place"
                            ),
                        ));
                    }
                }
            }
            if let Some(name) = stack.services.keys().find(|s| !placed.contains_key(s.as_str())) {
                return Err(self.err_at(
                    self.placement_at.values().next(),
                    format!("x-mlops.placement: service `{name}` is in no role and not in every_host; name its place"),
                ));
            }
            let listed = placement.remote_ports.keys().map(|s| ("remote_ports", s));
            for (what, service) in listed.chain(placement.scrape.keys().map(|s| ("scrape", s))) {
                if !stack.services.contains_key(service) && !self.all_services.contains(service) {
                    let at = self.placement_at.get(&format!("{what} {service}"));
                    return Err(self.err_at(at, format!("x-mlops.placement.{what}: `{service}` is not a service")));
                }
            }
        }
        for (name, ui) in &stack.options.ui {
            if !stack.services.contains_key(&ui.service) && !self.all_services.contains(&ui.service) {
                return Err(self.err_at(
                    self.ui_at.get(name),
                    format!("x-mlops.ui `{name}`: no service `{}` in the stack", ui.service),
                ));
            }
        }
        if let Some(at) = &self.migrate_at {
            let m = &stack.options.migrate;
            let services =
                m.hold.iter().chain(m.database.iter().map(|d| &d.service)).chain(m.airflow.iter().map(|a| &a.service));
            for service in services {
                // A service of a profile that is off is no error: it is not deployed.
                if !stack.services.contains_key(service) && !self.all_services.contains(service) {
                    return Err(self.err(at, format!("x-mlops.migrate: no service `{service}` in the stack")));
                }
            }
            for volume in m.optional.iter().chain(m.database.iter().map(|d| &d.volume)) {
                if !stack.volumes.contains_key(volume) {
                    return Err(self.err(at, format!("x-mlops.migrate: no volume `{volume}` in the stack")));
                }
            }
            if let Some(a) = &m.airflow
                && !stack.options.secrets.contains(&a.admin_password)
            {
                return Err(self.err(
                    at,
                    format!("x-mlops.migrate.airflow: `{}` is not one of x-mlops.secrets", a.admin_password),
                ));
            }
        }
        if let (Some(at), Some(u)) = (&self.users_at, &stack.options.users) {
            if !stack.services.contains_key(&u.service) && !self.all_services.contains(&u.service) {
                return Err(self.err(at, format!("x-mlops.users: no service `{}` in the stack", u.service)));
            }
            if !stack.options.secrets.contains(&u.admin_password) {
                return Err(
                    self.err(at, format!("x-mlops.users: `{}` is not one of x-mlops.secrets", u.admin_password))
                );
            }
        }
        for (secret, rotation) in &stack.options.rotate {
            for hook in rotation.before.iter().chain(&rotation.after) {
                if !stack.services.contains_key(&hook.service) {
                    return Err(self.err(
                        &self.rotate_at[secret],
                        format!("x-mlops.rotate.{secret}: no service `{}` in the stack", hook.service),
                    ));
                }
            }
        }
        for (name, svc) in &stack.services {
            let at = &positions[name];
            if svc.image.is_none() && svc.build.is_none() {
                return Err(self.err(at, format!("service `{name}` has neither `image` nor `build`")));
            }
            let access = svc.host_access();
            if !access.is_empty() && !stack.options.allow_host_access {
                return Err(self.err(
                    at,
                    format!(
                        "service `{name}` asks for access to the host ({}); refused unless the stack sets \
                         `x-mlops: {{allow_host_access: true}}`",
                        access.join("; ")
                    ),
                ));
            }
            if svc.hostname.is_some() && svc.network_mode.as_deref().is_some_and(|m| m != "none" && m != "bridge") {
                return Err(self.err(at, format!("service `{name}` sets `hostname` and shares another network namespace (`network_mode`); Docker refuses both")));
            }
            if svc.network_mode.is_some() && !svc.networks.is_empty() {
                return Err(self.err(at, format!("service `{name}` sets both `network_mode` and `networks`")));
            }
            for dep in svc.depends_on.keys() {
                if !stack.services.contains_key(dep) {
                    return Err(self.err(
                        at,
                        format!(
                            "service `{name}` depends on `{dep}`, which is not a service (or not in an enabled profile)"
                        ),
                    ));
                }
            }
            for m in &svc.volumes {
                if m.kind == MountKind::Volume && !m.source.is_empty() && !stack.volumes.contains_key(&m.source) {
                    return Err(self.err(
                        at,
                        format!(
                            "service `{name}` uses volume `{}`, which is not declared under the top-level `volumes:`",
                            m.source
                        ),
                    ));
                }
            }
            for n in &svc.networks {
                if n != "default" && !stack.networks.contains_key(n) {
                    return Err(self.err(at, format!("service `{name}` joins network `{n}`, which is not declared under the top-level `networks:`")));
                }
            }
        }
        stack.start_order().map_err(|m| self.err(positions.values().next().expect("non-empty"), m))?;
        Ok(())
    }

    fn options(&mut self, node: &Node) -> R<StackOptions> {
        let mut o = StackOptions::default();
        for (k, v) in self.map(node, "x-mlops")? {
            match k.as_key().unwrap_or_default().as_str() {
                "bootstrap_base_images" => o.bootstrap_base_images = self.bool(v, "x-mlops.bootstrap_base_images")?,
                "host_ca_bundle" => o.host_ca_bundle = self.bool(v, "x-mlops.host_ca_bundle")?,
                "allow_host_access" => o.allow_host_access = self.bool(v, "x-mlops.allow_host_access")?,
                "secrets" => {
                    o.secrets = self.string_list(v, "x-mlops.secrets")?;
                    if let Some(bad) = o.secrets.iter().find(|s| !mlops_proto::is_variable_name(s)) {
                        return Err(self.err(v, format!("x-mlops.secrets: `{bad}` is not a variable name")));
                    }
                }
                "inject" => {
                    for (ik, iv) in self.map(v, "x-mlops.inject")? {
                        let path = ik.as_key().unwrap_or_default();
                        if path.starts_with('/') || path.split('/').any(|p| p == ".." || p.is_empty()) {
                            return Err(self.err(
                                ik,
                                format!("x-mlops.inject: `{path}` must be a relative path inside the stack"),
                            ));
                        }
                        o.inject.insert(path, self.string(iv, "x-mlops.inject")?);
                    }
                }
                "ui" => {
                    for (uk, uv) in self.map(v, "x-mlops.ui")? {
                        let mut ui = mlops_proto::stack::Ui::default();
                        for (fk, fv) in self.map(uv, "x-mlops.ui entry")? {
                            match fk.as_key().unwrap_or_default().as_str() {
                                "service" => ui.service = self.string(fv, "service")?,
                                "port" => {
                                    ui.port = self
                                        .string(fv, "port")?
                                        .parse()
                                        .map_err(|_| self.err(fv, "port must be a port number"))?;
                                }
                                "path" => ui.path = self.string(fv, "path")?,
                                other => self.warn(fk, format!("unknown key `{other}` in x-mlops.ui is ignored")),
                            }
                        }
                        let name = uk.as_key().unwrap_or_default();
                        self.ui_at.insert(name.clone(), uk.clone());
                        o.ui.insert(name, ui);
                    }
                }
                "rotate" => {
                    for (rk, rv) in self.map(v, "x-mlops.rotate")? {
                        let name = rk.as_key().unwrap_or_default();
                        let mut rotation = mlops_proto::stack::Rotation::default();
                        for (fk, fv) in self.map(rv, "x-mlops.rotate entry")? {
                            match fk.as_key().unwrap_or_default().as_str() {
                                "keep_old" => rotation.keep_old = self.bool(fv, "keep_old")?,
                                "before" => rotation.before = Some(self.hook(fv, "before")?),
                                "after" => rotation.after = Some(self.hook(fv, "after")?),
                                other => self.warn(fk, format!("unknown key `{other}` in x-mlops.rotate is ignored")),
                            }
                        }
                        o.rotate.insert(name.clone(), rotation);
                        self.rotate_at.insert(name, rk.clone());
                    }
                }
                "placement" => o.placement = self.placement(v)?,
                "migrate" => {
                    o.migrate = self.migration(v)?;
                    self.migrate_at = Some(v.clone());
                }
                "users" => {
                    o.users = Some(self.airflow_access(v, "x-mlops.users")?);
                    self.users_at = Some(v.clone());
                }
                other => self.warn(k, format!("unknown key `{other}` in x-mlops is ignored")),
            }
        }
        // Checked once every key was read: `rotate` may come before `secrets`.
        for (name, at) in &self.rotate_at {
            if !o.secrets.contains(name) {
                return Err(
                    self.err(at, format!("x-mlops.rotate: `{name}` is not one of x-mlops.secrets (list it there)"))
                );
            }
        }
        Ok(o)
    }

    /// `x-mlops.placement`: `roles` (name → `services`, `single`),
    /// `every_host` and `remote_ports` (service → ports). Services are
    /// checked against the stack in `validate`.
    fn placement(&mut self, node: &Node) -> R<mlops_proto::stack::Placement> {
        let mut p = mlops_proto::stack::Placement::default();
        for (k, v) in self.map(node, "x-mlops.placement")? {
            match k.as_key().unwrap_or_default().as_str() {
                "roles" => {
                    for (rk, rv) in self.map(v, "x-mlops.placement.roles")? {
                        let name = rk.as_key().unwrap_or_default();
                        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                            return Err(self
                                .err(rk, format!("x-mlops.placement.roles: `{name}` is not an inventory group name")));
                        }
                        let mut role = mlops_proto::stack::Role::default();
                        for (fk, fv) in self.map(rv, "a role")? {
                            match fk.as_key().unwrap_or_default().as_str() {
                                "services" => role.services = self.string_list(fv, "services")?,
                                "single" => role.single = self.bool(fv, "single")?,
                                other => self.warn(fk, format!("unknown key `{other}` in a role is ignored")),
                            }
                        }
                        self.placement_at.insert(format!("role {name}"), rk.clone());
                        p.roles.insert(name, role);
                    }
                }
                "every_host" => {
                    p.every_host = self.string_list(v, "x-mlops.placement.every_host")?;
                    self.placement_at.insert("every_host".into(), v.clone());
                }
                "remote_ports" => {
                    for (sk, sv) in self.map(v, "x-mlops.placement.remote_ports")? {
                        let service = sk.as_key().unwrap_or_default();
                        let mut ports = Vec::new();
                        let items = match &sv.value {
                            mlops_yaml::Value::Seq(items) => items.clone(),
                            _ => return Err(self.err(sv, "remote_ports: a list of port numbers per service")),
                        };
                        for item in &items {
                            ports.push(self.port_number(item, "a port")?);
                        }
                        self.placement_at.insert(format!("remote_ports {service}"), sk.clone());
                        p.remote_ports.insert(service, ports);
                    }
                }
                "scrape" => {
                    for (sk, sv) in self.map(v, "x-mlops.placement.scrape")? {
                        let service = sk.as_key().unwrap_or_default();
                        let mut scrape = mlops_proto::stack::Scrape::default();
                        for (fk, fv) in self.map(sv, "a scraped service")? {
                            match fk.as_key().unwrap_or_default().as_str() {
                                "port" => scrape.port = self.port_number(fv, "port")?,
                                "file" => {
                                    let file = self.string(fv, "file")?;
                                    let inside = !file.is_empty()
                                        && std::path::Path::new(&file)
                                            .components()
                                            .all(|c| matches!(c, std::path::Component::Normal(_)));
                                    if !inside {
                                        return Err(self.err(
                                            fv,
                                            format!(
                                                "`{file}` is not a path inside the stack directory (relative, no `..`)"
                                            ),
                                        ));
                                    }
                                    scrape.file = file;
                                }
                                other => {
                                    self.warn(fk, format!("unknown key `{other}` in a scraped service is ignored"));
                                }
                            }
                        }
                        if scrape.port == 0 || scrape.file.is_empty() {
                            return Err(
                                self.err(sv, format!("x-mlops.placement.scrape.{service} needs `port` and `file`"))
                            );
                        }
                        self.placement_at.insert(format!("scrape {service}"), sk.clone());
                        p.scrape.insert(service, scrape);
                    }
                }
                other => self.warn(k, format!("unknown key `{other}` in x-mlops.placement is ignored")),
            }
        }
        Ok(p)
    }

    /// A rotation step: `service`, `command` (a list) and `stdin`.
    /// `x-mlops.migrate`: `hold` (services), `database` (`service`,
    /// `volume`, `user`, `database`, `verify`: name → query), `optional`
    /// (volumes), `airflow` (`service`, `admin_user`, `admin_password`).
    /// Names are checked against the stack in `validate`.
    fn migration(&mut self, node: &Node) -> R<mlops_proto::stack::Migration> {
        let mut m = mlops_proto::stack::Migration::default();
        for (k, v) in self.map(node, "x-mlops.migrate")? {
            match k.as_key().unwrap_or_default().as_str() {
                "hold" => m.hold = self.string_list(v, "x-mlops.migrate.hold")?,
                "optional" => m.optional = self.string_list(v, "x-mlops.migrate.optional")?,
                "database" => {
                    let mut d = mlops_proto::stack::Database::default();
                    for (fk, fv) in self.map(v, "x-mlops.migrate.database")? {
                        match fk.as_key().unwrap_or_default().as_str() {
                            "service" => d.service = self.string(fv, "service")?,
                            "volume" => d.volume = self.string(fv, "volume")?,
                            "user" => d.user = self.string(fv, "user")?,
                            "database" => d.database = self.string(fv, "database")?,
                            "verify" => {
                                for (qk, qv) in self.map(fv, "x-mlops.migrate.database.verify")? {
                                    d.verify.insert(qk.as_key().unwrap_or_default(), self.string(qv, "a query")?);
                                }
                            }
                            other => {
                                self.warn(fk, format!("unknown key `{other}` in x-mlops.migrate.database is ignored"));
                            }
                        }
                    }
                    if d.service.is_empty() || d.volume.is_empty() || d.user.is_empty() || d.database.is_empty() {
                        return Err(
                            self.err(v, "x-mlops.migrate.database needs `service`, `volume`, `user` and `database`")
                        );
                    }
                    m.database = Some(d);
                }
                "airflow" => m.airflow = Some(self.airflow_access(v, "x-mlops.migrate.airflow")?),
                other => self.warn(k, format!("unknown key `{other}` in x-mlops.migrate is ignored")),
            }
        }
        Ok(m)
    }

    /// An Airflow API server and its admin: `service`, `admin_user`,
    /// `admin_password` (the secret holding it), all three needed.
    fn airflow_access(&mut self, node: &Node, what: &str) -> R<mlops_proto::stack::AirflowAccess> {
        let mut a = mlops_proto::stack::AirflowAccess::default();
        for (fk, fv) in self.map(node, what)? {
            match fk.as_key().unwrap_or_default().as_str() {
                "service" => a.service = self.string(fv, "service")?,
                "admin_user" => a.admin_user = self.string(fv, "admin_user")?,
                "admin_password" => a.admin_password = self.string(fv, "admin_password")?,
                other => self.warn(fk, format!("unknown key `{other}` in {what} is ignored")),
            }
        }
        if a.service.is_empty() || a.admin_user.is_empty() || a.admin_password.is_empty() {
            return Err(self.err(node, format!("{what} needs `service`, `admin_user` and `admin_password`")));
        }
        Ok(a)
    }

    fn hook(&mut self, node: &Node, what: &str) -> R<mlops_proto::stack::Hook> {
        let mut hook = mlops_proto::stack::Hook::default();
        for (k, v) in self.map(node, &format!("x-mlops.rotate {what}"))? {
            match k.as_key().unwrap_or_default().as_str() {
                "service" => hook.service = self.string(v, "service")?,
                "command" => hook.command = self.string_list(v, "command")?,
                "stdin" => hook.stdin = self.string(v, "stdin")?,
                other => self.warn(k, format!("unknown key `{other}` in x-mlops.rotate {what} is ignored")),
            }
        }
        if hook.service.is_empty() || hook.command.is_empty() {
            return Err(self.err(node, format!("x-mlops.rotate {what} needs `service` and `command`")));
        }
        Ok(hook)
    }

    /// A top-level network or volume: both are `external`, `name` and
    /// `driver` to mlopsctl; `known` lists Compose options it does not act on.
    fn resource(
        &mut self,
        kind: &str,
        key: &Node,
        node: &Node,
        known: &[&str],
    ) -> R<(bool, Option<String>, Option<String>)> {
        let (mut external, mut name, mut driver) = (false, None, None);
        for (k, v) in self.map(node, &format!("{kind} `{}`", key.as_key().unwrap_or_default()))? {
            match k.as_key().unwrap_or_default().as_str() {
                "external" => external = self.bool(v, "external")?,
                "name" => name = self.opt_string(v, "name")?,
                "driver" => driver = self.opt_string(v, "driver")?,
                other if known.contains(&other) => {
                    self.warn(k, format!("{kind} option `{other}` is not supported by mlopsctl and is ignored"));
                }
                other if other.starts_with("x-") => {}
                other => self.warn(k, format!("unknown key `{other}` in {kind} is ignored")),
            }
        }
        Ok((external, name, driver))
    }

    fn network(&mut self, key: &Node, node: &Node) -> R<Network> {
        let known = ["labels", "driver_opts", "ipam", "attachable", "internal", "enable_ipv6"];
        let (external, name, driver) = self.resource("network", key, node, &known)?;
        Ok(Network { external, name, driver })
    }

    fn volume(&mut self, key: &Node, node: &Node) -> R<Volume> {
        let (external, name, driver) = self.resource("volume", key, node, &["labels", "driver_opts"])?;
        Ok(Volume { external, name, driver })
    }

    fn service(&mut self, name: &str, node: &Node) -> R<Service> {
        let mut svc = Service::default();
        let mut env_files = Vec::new();
        let mut environment = BTreeMap::new();
        for (k, v) in self.map(node, &format!("service `{name}`"))? {
            let key = k.as_key().unwrap_or_default();
            match key.as_str() {
                "image" => svc.image = self.opt_string(v, "image")?,
                "build" => svc.build = Some(self.build(v)?),
                "command" => svc.command = self.command(v, "command")?,
                "entrypoint" => svc.entrypoint = self.command(v, "entrypoint")?,
                "environment" => environment = self.key_values(v, "environment", true)?,
                "env_file" => {
                    env_files = match &v.value {
                        Value::Seq(_) => self.string_list(v, "env_file")?.into_iter().map(|s| (s, v.clone())).collect(),
                        _ => vec![(self.string(v, "env_file")?, v.clone())],
                    }
                }
                "ports" => {
                    let Value::Seq(items) = &v.value else { return Err(self.err(v, "ports must be a list")) };
                    for item in items {
                        svc.ports.push(self.port(item)?);
                    }
                }
                "volumes" => {
                    let Value::Seq(items) = &v.value else { return Err(self.err(v, "volumes must be a list")) };
                    for item in items {
                        svc.volumes.push(self.mount(item)?);
                    }
                }
                "networks" => {
                    svc.networks = match &v.value {
                        Value::Seq(_) => self.string_list(v, "networks")?,
                        Value::Map(entries) => {
                            for (_, nv) in entries {
                                for (ok, _) in self.map(nv, "network options")? {
                                    let opt = ok.as_key().unwrap_or_default();
                                    if opt != "aliases" {
                                        self.warn(ok, format!("network option `{opt}` of service `{name}` is ignored"));
                                    }
                                }
                            }
                            entries.iter().map(|(nk, _)| nk.as_key().unwrap_or_default()).collect()
                        }
                        _ => return Err(self.err(v, "networks must be a list or a mapping")),
                    }
                }
                "depends_on" => svc.depends_on = self.depends_on(v)?,
                "healthcheck" => svc.healthcheck = self.healthcheck(v)?,
                "restart" => {
                    let r = self.string(v, "restart")?;
                    let ok = matches!(r.as_str(), "no" | "always" | "unless-stopped" | "on-failure")
                        || r.strip_prefix("on-failure:").is_some_and(|n| n.parse::<u32>().is_ok());
                    if !ok {
                        return Err(self.err(
                            v,
                            format!("restart `{r}`: use no, always, unless-stopped, on-failure or on-failure:N"),
                        ));
                    }
                    svc.restart = Some(r);
                }
                "user" => svc.user = self.opt_string(v, "user")?,
                "working_dir" => svc.working_dir = self.opt_string(v, "working_dir")?,
                "labels" => svc.labels = self.key_values(v, "labels", false)?,
                "profiles" => svc.profiles = self.string_list(v, "profiles")?,
                "deploy" => svc.limits = self.deploy(name, v)?,
                "cap_add" => svc.cap_add = self.capabilities(v, "cap_add")?,
                "cap_drop" => svc.cap_drop = self.capabilities(v, "cap_drop")?,
                "read_only" => svc.read_only = self.bool(v, "read_only")?,
                "privileged" => svc.privileged = self.bool(v, "privileged")?,
                "init" => svc.init = Some(self.bool(v, "init")?),
                "security_opt" => {
                    svc.security_opt = self.string_list(v, "security_opt")?;
                    // The Engine API takes a seccomp profile itself, not a
                    // path: read it here, relative to the stack directory.
                    for opt in &mut svc.security_opt {
                        if let Some(file) = opt.strip_prefix("seccomp=").or_else(|| opt.strip_prefix("seccomp:"))
                            && file != "unconfined"
                            && file != "builtin"
                            && !file.trim_start().starts_with('{')
                        {
                            let path = self.dir.join(file);
                            let profile = std::fs::read_to_string(&path)
                                .map_err(|e| self.err(v, format!("seccomp profile `{}`: {e}", path.display())))?;
                            *opt = format!("seccomp={profile}");
                        }
                    }
                    for opt in &svc.security_opt {
                        let known = opt == "no-new-privileges"
                            || opt.starts_with("no-new-privileges:")
                            || ["seccomp=", "seccomp:", "apparmor=", "apparmor:", "label=", "label:"]
                                .iter()
                                .any(|p| opt.starts_with(p));
                        if !known {
                            return Err(self.err(
                                v,
                                format!("security_opt `{opt}`: use no-new-privileges, seccomp=, apparmor= or label="),
                            ));
                        }
                    }
                }
                "tmpfs" => {
                    svc.tmpfs = match &v.value {
                        Value::Seq(_) => self.string_list(v, "tmpfs")?,
                        _ => vec![self.string(v, "tmpfs")?],
                    };
                    if let Some(bad) = svc.tmpfs.iter().find(|t| !t.starts_with('/')) {
                        return Err(self.err(v, format!("tmpfs `{bad}` must be an absolute path in the container")));
                    }
                }
                "ulimits" => svc.ulimits = self.ulimits(v)?,
                "logging" => svc.logging = Some(self.logging(v)?),
                "shm_size" => {
                    let s = self.string(v, "shm_size")?;
                    svc.shm_size = Some(
                        parse_bytes(&s)
                            .filter(|b| *b > 0)
                            .ok_or_else(|| self.err(v, format!("shm_size `{s}` is not a size (e.g. 256m, 1g)")))?,
                    );
                }
                "stop_grace_period" => svc.stop_grace_period_ms = Some(self.duration(v)?),
                "hostname" => {
                    let name = self.string(v, "hostname")?;
                    let valid = !name.is_empty()
                        && name.len() <= 63
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                        && !name.starts_with('-');
                    if !valid {
                        return Err(
                            self.err(v, format!("hostname `{name}` is not a host name (letters, digits, `-`, `.`)"))
                        );
                    }
                    svc.hostname = Some(name);
                }
                "extra_hosts" => {
                    let hosts = match &v.value {
                        Value::Map(_) => self.key_values(v, "extra_hosts", false)?.into_iter().collect(),
                        _ => self
                            .string_list(v, "extra_hosts")?
                            .into_iter()
                            .map(|h| match h.split_once('=').or_else(|| h.split_once(':')) {
                                Some((n, ip)) => (n.to_string(), ip.to_string()),
                                None => (h, String::new()),
                            })
                            .collect::<Vec<_>>(),
                    };
                    for (host, ip) in hosts {
                        if host.is_empty() || ip.is_empty() {
                            return Err(self.err(v, format!("extra_hosts `{host}`: use HOST:IP (or HOST=IP)")));
                        }
                        svc.extra_hosts.push(format!("{host}:{ip}"));
                    }
                }
                "expose" => {
                    for p in self.string_list(v, "expose")? {
                        let (port, proto) = p.split_once('/').unwrap_or((&p, "tcp"));
                        if port.parse::<u16>().is_err() || !matches!(proto, "tcp" | "udp") {
                            return Err(self.err(v, format!("expose `{p}`: use PORT or PORT/tcp|udp")));
                        }
                        svc.expose.push(format!("{port}/{proto}"));
                    }
                }
                "pid" => {
                    let mode = self.string(v, "pid")?;
                    if mode != "host" {
                        return Err(self.err(v, format!("pid `{mode}`: only `host` is supported")));
                    }
                    svc.pid = Some(mode);
                }
                "network_mode" => {
                    let mode = self.string(v, "network_mode")?;
                    if !matches!(mode.as_str(), "host" | "none") {
                        return Err(self.err(
                            v,
                            format!("network_mode `{mode}`: only `host` and `none` are supported (or use `networks:`)"),
                        ));
                    }
                    svc.network_mode = Some(mode);
                }
                "container_name" => {
                    self.warn(k, format!("`{key}` of service `{name}` is not supported by mlopsctl and is ignored"));
                }
                other if other.starts_with("x-") => {}
                other => {
                    let known = SERVICE_KEYS.join(", ");
                    self.warn(
                        k,
                        format!("unknown key `{other}` in service `{name}` is ignored (mlopsctl reads: {known})"),
                    );
                }
            }
        }
        // env_file first, `environment` wins.
        let mut merged = BTreeMap::new();
        for (file, at) in env_files {
            let path = self.dir.join(&file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| self.err(&at, format!("env_file `{}`: {e}", path.display())))?;
            let vars = interpolate::parse_dotenv(&text).map_err(|(line, m)| ComposeError::DotEnv {
                path: path.clone(),
                line,
                message: m,
            })?;
            merged.extend(vars);
        }
        merged.extend(environment);
        svc.environment = merged;
        Ok(svc)
    }

    fn build(&mut self, node: &Node) -> R<Build> {
        let mut b = Build { context: ".".into(), dockerfile: "Dockerfile".into(), ..Default::default() };
        match &node.value {
            Value::Str(s) => b.context = s.clone(),
            Value::Map(entries) => {
                for (k, v) in entries {
                    match k.as_key().unwrap_or_default().as_str() {
                        "context" => b.context = self.string(v, "build.context")?,
                        "dockerfile" => b.dockerfile = self.string(v, "build.dockerfile")?,
                        "args" => b.args = self.key_values(v, "build.args", true)?,
                        "target" => b.target = self.opt_string(v, "build.target")?,
                        other if other.starts_with("x-") => {}
                        other => {
                            self.warn(k, format!("build option `{other}` is not supported by mlopsctl and is ignored"));
                        }
                    }
                }
            }
            _ => return Err(self.err(node, "build must be a path or a mapping")),
        }
        if b.context.contains("://") {
            return Err(self.err(node, format!("build context `{}`: only local directories are supported", b.context)));
        }
        Ok(b)
    }

    fn port(&self, node: &Node) -> R<Port> {
        let bad = |m: String| self.err(node, m);
        match &node.value {
            Value::Int(n) => Ok(Port {
                container_port: u16::try_from(*n)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad(format!("port {n} is out of range")))?,
                protocol: "tcp".into(),
                ..Default::default()
            }),
            Value::Str(s) => {
                let (spec, protocol) = match s.rsplit_once('/') {
                    Some((spec, proto)) if proto == "tcp" || proto == "udp" => (spec, proto.to_string()),
                    Some((_, proto)) => return Err(bad(format!("port `{s}`: protocol `{proto}` is not tcp or udp"))),
                    None => (s.as_str(), "tcp".to_string()),
                };
                // IPv6 host addresses come in brackets: [::1]:8080:80
                let (host_ip, rest) = if let Some(r) = spec.strip_prefix('[') {
                    let (ip, rest) = r.split_once("]:").ok_or_else(|| bad(format!("port `{s}`: bad IPv6 address")))?;
                    (ip.to_string(), rest)
                } else {
                    let parts: Vec<&str> = spec.split(':').collect();
                    if parts.len() == 3 {
                        (parts[0].to_string(), &spec[parts[0].len() + 1..])
                    } else {
                        (String::new(), spec)
                    }
                };
                let num = |p: &str| -> R<u16> {
                    if p.contains('-') {
                        return Err(bad(format!("port `{s}`: port ranges are not supported; list each port")));
                    }
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad(format!("port `{s}`: `{p}` is not a port number")))
                };
                let (host_port, container_port) = match rest.split_once(':') {
                    Some((h, c)) => (if h.is_empty() { None } else { Some(num(h)?) }, num(c)?),
                    None => (None, num(rest)?),
                };
                Ok(Port { host_ip, host_port, container_port, protocol })
            }
            Value::Map(entries) => {
                let mut p = Port { protocol: "tcp".into(), ..Default::default() };
                for (k, v) in entries {
                    match k.as_key().unwrap_or_default().as_str() {
                        "target" => {
                            p.container_port = self
                                .string(v, "target")?
                                .parse()
                                .map_err(|_| self.err(v, "target must be a port number"))?;
                        }
                        "published" => {
                            p.host_port = Some(
                                self.string(v, "published")?
                                    .parse()
                                    .map_err(|_| self.err(v, "published must be a port number"))?,
                            );
                        }
                        "host_ip" => p.host_ip = self.string(v, "host_ip")?,
                        "protocol" => p.protocol = self.string(v, "protocol")?,
                        "mode" | "name" | "app_protocol" => {}
                        other => return Err(self.err(k, format!("unknown port option `{other}`"))),
                    }
                }
                if p.container_port == 0 {
                    return Err(self.err(node, "a port needs `target`"));
                }
                Ok(p)
            }
            _ => Err(bad(format!("a port must be a string, number or mapping, found {}", node.kind()))),
        }
    }

    fn mount(&self, node: &Node) -> R<Mount> {
        match &node.value {
            Value::Str(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [t] => ("", *t, ""),
                    [src, t] => (*src, *t, ""),
                    [src, t, m] => (*src, *t, *m),
                    _ => return Err(self.err(node, format!("volume `{s}`: expected SOURCE:TARGET[:MODE]"))),
                };
                if !target.starts_with('/') {
                    return Err(self.err(
                        node,
                        format!("volume `{s}`: the target `{target}` must be an absolute path in the container"),
                    ));
                }
                let read_only = mode.split(',').any(|m| m == "ro");
                if let Some(bad) = mode.split(',').find(|m| !matches!(*m, "" | "ro" | "rw" | "z" | "Z")) {
                    return Err(self.err(node, format!("volume `{s}`: unknown mode `{bad}`")));
                }
                let kind = if source.starts_with('.') || source.starts_with('/') || source.starts_with('~') {
                    MountKind::Bind
                } else {
                    MountKind::Volume
                };
                Ok(Mount { kind, source: source.to_string(), target: target.to_string(), read_only })
            }
            Value::Map(entries) => {
                let mut kind = None;
                let mut source = String::new();
                let mut target = String::new();
                let mut read_only = false;
                for (k, v) in entries {
                    match k.as_key().unwrap_or_default().as_str() {
                        "type" => {
                            kind = Some(match self.string(v, "type")?.as_str() {
                                "volume" => MountKind::Volume,
                                "bind" => MountKind::Bind,
                                "tmpfs" => MountKind::Tmpfs,
                                other => {
                                    return Err(self.err(
                                        v,
                                        format!("volume type `{other}` is not supported (volume, bind, tmpfs)"),
                                    ));
                                }
                            });
                        }
                        "source" => source = self.string(v, "source")?,
                        "target" => target = self.string(v, "target")?,
                        "read_only" => read_only = self.bool(v, "read_only")?,
                        "bind" | "volume" | "tmpfs" | "consistency" => {}
                        other => return Err(self.err(k, format!("unknown volume option `{other}`"))),
                    }
                }
                let kind = kind.ok_or_else(|| self.err(node, "a long-form volume needs `type`"))?;
                if !target.starts_with('/') {
                    return Err(self.err(node, "a volume needs an absolute `target`"));
                }
                Ok(Mount { kind, source, target, read_only })
            }
            _ => Err(self.err(node, "a volume must be a string or a mapping")),
        }
    }

    fn depends_on(&self, node: &Node) -> R<BTreeMap<String, Condition>> {
        let mut out = BTreeMap::new();
        match &node.value {
            Value::Seq(_) => {
                for s in self.string_list(node, "depends_on")? {
                    out.insert(s, Condition::ServiceStarted);
                }
            }
            Value::Map(entries) => {
                for (k, v) in entries {
                    let mut condition = Condition::ServiceStarted;
                    for (ck, cv) in self.map(v, "depends_on entry")? {
                        match ck.as_key().unwrap_or_default().as_str() {
                            "condition" => {
                                condition = match self.string(cv, "condition")?.as_str() {
                                    "service_started" => Condition::ServiceStarted,
                                    "service_healthy" => Condition::ServiceHealthy,
                                    "service_completed_successfully" => Condition::ServiceCompletedSuccessfully,
                                    other => {
                                        return Err(self.err(cv, format!("condition `{other}`: use service_started, service_healthy or service_completed_successfully")));
                                    }
                                }
                            }
                            "restart" | "required" => {}
                            other => return Err(self.err(ck, format!("unknown depends_on option `{other}`"))),
                        }
                    }
                    out.insert(k.as_key().unwrap_or_default(), condition);
                }
            }
            Value::Null => {}
            _ => return Err(self.err(node, "depends_on must be a list or a mapping")),
        }
        Ok(out)
    }

    fn healthcheck(&self, node: &Node) -> R<Option<Healthcheck>> {
        let mut h = Healthcheck::default();
        for (k, v) in self.map(node, "healthcheck")? {
            match k.as_key().unwrap_or_default().as_str() {
                "test" => {
                    h.test = match &v.value {
                        Value::Str(s) => vec!["CMD-SHELL".into(), s.clone()],
                        Value::Seq(_) => {
                            let list = self.string_list(v, "healthcheck.test")?;
                            if !matches!(list.first().map(String::as_str), Some("CMD" | "CMD-SHELL" | "NONE")) {
                                return Err(
                                    self.err(v, "healthcheck.test as a list starts with CMD, CMD-SHELL or NONE")
                                );
                            }
                            list
                        }
                        _ => return Err(self.err(v, "healthcheck.test must be a string or a list")),
                    }
                }
                "interval" => h.interval_ms = Some(self.duration(v)?),
                "timeout" => h.timeout_ms = Some(self.duration(v)?),
                "start_period" => h.start_period_ms = Some(self.duration(v)?),
                "retries" => {
                    h.retries =
                        Some(self.string(v, "retries")?.parse().map_err(|_| self.err(v, "retries must be a number"))?);
                }
                "disable" => {
                    if self.bool(v, "disable")? {
                        h.test = vec!["NONE".into()];
                    }
                }
                "start_interval" => {}
                other => return Err(self.err(k, format!("unknown healthcheck option `{other}`"))),
            }
        }
        Ok(if h.test.is_empty() { None } else { Some(h) })
    }

    /// `cap_add`/`cap_drop`: capability names, `CAP_` optional, or `ALL`.
    fn capabilities(&self, node: &Node, what: &str) -> R<Vec<String>> {
        let caps = self.string_list(node, what)?;
        for cap in &caps {
            let name = cap.trim_start_matches("CAP_");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()) {
                return Err(self.err(node, format!("{what}: `{cap}` is not a capability (e.g. NET_BIND_SERVICE, ALL)")));
            }
        }
        Ok(caps)
    }

    /// `logging: {driver: NAME, options: {KEY: VALUE}}`: the driver's name
    /// goes to the engine as it is, so it must look like one.
    fn logging(&self, node: &Node) -> R<Logging> {
        let mut out = Logging::default();
        for (k, v) in self.map(node, "logging")? {
            match k.as_key().unwrap_or_default().as_str() {
                "driver" => {
                    let driver = self.string(v, "logging.driver")?;
                    let valid = !driver.is_empty()
                        && driver
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
                    if !valid {
                        return Err(self.err(
                            v,
                            format!("logging.driver `{driver}` is not a log driver's name (e.g. local, json-file)"),
                        ));
                    }
                    out.driver = driver;
                }
                "options" => out.options = self.key_values(v, "logging.options", false)?,
                other => return Err(self.err(k, format!("logging: unknown key `{other}` (driver, options)"))),
            }
        }
        Ok(out)
    }

    /// `ulimits`: `name: N` or `name: {soft: N, hard: M}`.
    fn ulimits(&self, node: &Node) -> R<BTreeMap<String, Ulimit>> {
        let mut out = BTreeMap::new();
        let number = |n: &Node| -> R<i64> {
            let s = self.string(n, "ulimit")?;
            s.parse::<i64>().map_err(|_| self.err(n, format!("ulimit `{s}` is not a number")))
        };
        for (k, v) in self.map(node, "ulimits")? {
            let name = k.as_key().unwrap_or_default();
            let limit = match &v.value {
                Value::Map(_) => {
                    let (mut soft, mut hard) = (None, None);
                    for (lk, lv) in self.map(v, "ulimit")? {
                        match lk.as_key().unwrap_or_default().as_str() {
                            "soft" => soft = Some(number(lv)?),
                            "hard" => hard = Some(number(lv)?),
                            other => {
                                return Err(
                                    self.err(lk, format!("ulimit `{name}`: unknown key `{other}` (soft, hard)"))
                                );
                            }
                        }
                    }
                    let (Some(soft), Some(hard)) = (soft, hard) else {
                        return Err(self.err(v, format!("ulimit `{name}` needs both soft and hard")));
                    };
                    Ulimit { soft, hard }
                }
                _ => {
                    let n = number(v)?;
                    Ulimit { soft: n, hard: n }
                }
            };
            out.insert(name, limit);
        }
        Ok(out)
    }

    /// `1m30s`, `10s`, `500ms`, `2h`; a bare number is seconds.
    fn duration(&self, node: &Node) -> R<u64> {
        let s = self.string(node, "duration")?;
        parse_duration_ms(&s).ok_or_else(|| self.err(node, format!("`{s}` is not a duration (e.g. 30s, 1m30s, 500ms)")))
    }

    fn deploy(&mut self, name: &str, node: &Node) -> R<Limits> {
        let mut limits = Limits::default();
        for (k, v) in self.map(node, "deploy")? {
            match k.as_key().unwrap_or_default().as_str() {
                "resources" => {
                    for (rk, rv) in self.map(v, "deploy.resources")? {
                        match rk.as_key().unwrap_or_default().as_str() {
                            "limits" => {
                                for (lk, lv) in self.map(rv, "deploy.resources.limits")? {
                                    match lk.as_key().unwrap_or_default().as_str() {
                                        "cpus" => {
                                            limits.cpus = Some(
                                                self.string(lv, "cpus")?
                                                    .parse::<f64>()
                                                    .ok()
                                                    .filter(|c| c.is_finite() && *c > 0.0)
                                                    .ok_or_else(|| self.err(lv, "cpus must be a positive number"))?,
                                            );
                                        }
                                        "memory" => {
                                            let m = self.string(lv, "memory")?;
                                            limits.memory_bytes = Some(parse_bytes(&m).ok_or_else(|| {
                                                self.err(lv, format!("`{m}` is not a size (e.g. 512m, 2g)"))
                                            })?);
                                        }
                                        other => {
                                            self.warn(lk, format!("limit `{other}` of service `{name}` is ignored"));
                                        }
                                    }
                                }
                            }
                            other => self.warn(rk, format!("deploy.resources.{other} of service `{name}` is ignored")),
                        }
                    }
                }
                other => self.warn(k, format!("deploy.{other} of service `{name}` is ignored")),
            }
        }
        Ok(limits)
    }
}

/// The project name and `x-mlops.secrets` of a Compose file, read before
/// interpolation (the secrets are what interpolation needs).
pub fn preflight(path: &Path, project: Option<&str>) -> Result<(String, Vec<String>), ComposeError> {
    let file = compose_file(path)?;
    let root = yaml_tree(&read(&file)?, &file)?;
    let mut name = None;
    let mut secrets = Vec::new();
    if let Value::Map(entries) = &root.value {
        for (k, v) in entries {
            match (k.as_key().as_deref(), &v.value) {
                (Some("name"), Value::Str(s)) => name = Some(s.clone()),
                (Some("x-mlops"), Value::Map(opts)) => {
                    for (ok, ov) in opts {
                        if ok.as_key().as_deref() == Some("secrets")
                            && let Value::Seq(items) = &ov.value
                        {
                            secrets.extend(items.iter().filter_map(Node::as_key));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let raw = project.map(str::to_string).or(name).unwrap_or_else(|| default_project(&dir));
    let project = normalize_project(&raw).ok_or_else(|| ComposeError::Invalid {
        path: file.clone(),
        line: 1,
        column: 1,
        message: format!("project name `{raw}` has no letter or digit"),
    })?;
    Ok((project, secrets))
}

/// Leaves `skip`ped services out of the stack; a service that depends on
/// one of them is an error naming both.
pub fn skip_services(stack: &mut Stack, skip: &[String]) -> Result<(), String> {
    for s in skip {
        if !stack.services.contains_key(s) {
            return Err(format!(
                "--skip {s}: the stack has no service `{s}` (it has {})",
                stack.services.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    for (name, svc) in &stack.services {
        if skip.contains(name) {
            continue;
        }
        if let Some(dep) = svc.depends_on.keys().find(|d| skip.contains(d)) {
            return Err(format!("--skip {dep}: service `{name}` depends on it; skip `{name}` too"));
        }
    }
    stack.services.retain(|name, _| !skip.contains(name));
    forget_services(stack, &|s| skip.iter().any(|k| k == s));
    if stack.services.is_empty() {
        return Err("--skip leaves no service".into());
    }
    Ok(())
}

/// Drops what `x-mlops` says about services that are `gone` (skipped, or
/// in profiles that are off): their UIs, places, ports, scrape targets and
/// holds. A role left without services is no role (see placement).
fn forget_services(stack: &mut Stack, gone: &dyn Fn(&str) -> bool) {
    stack.options.ui.retain(|_, ui| !gone(&ui.service));
    let placement = &mut stack.options.placement;
    for role in placement.roles.values_mut() {
        role.services.retain(|s| !gone(s));
    }
    placement.every_host.retain(|s| !gone(s));
    placement.remote_ports.retain(|s, _| !gone(s));
    placement.scrape.retain(|s, _| !gone(s));
    stack.options.migrate.hold.retain(|s| !gone(s));
}

/// Compose's project name rules: lowercase letters, digits, `-`, `_`.
pub fn normalize_project(name: &str) -> Option<String> {
    let s: String =
        name.to_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    let s = s.trim_start_matches(['-', '_']).to_string();
    (!s.is_empty()).then_some(s)
}

pub fn parse_duration_ms(s: &str) -> Option<u64> {
    if let Ok(secs) = s.parse::<u64>() {
        return Some(secs * 1000);
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(n) = chars.peek().filter(|n| n.is_ascii_alphabetic()) {
            unit.push(*n);
            chars.next();
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        total += v * match unit.as_str() {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "us" => 0.001,
            _ => return None,
        };
        any = true;
    }
    (any && num.is_empty()).then_some(total as u64)
}

/// A size as Compose (Docker's `RAMInBytes`) writes it: bytes, or with a
/// binary unit `k`, `m`, `g` or `t`, optionally followed by `b` or `ib`
/// (`512`, `1.5m`, `2g`, `5GiB`); any case.
pub fn parse_bytes(s: &str) -> Option<i64> {
    let s = s.trim().to_lowercase();
    let s = s.strip_suffix("ib").or_else(|| s.strip_suffix('b')).unwrap_or(&s);
    let (num, shift) = match s.chars().last().map(|c| "kmgt".find(c))? {
        Some(unit) => (&s[..s.len() - 1], 10 * (unit + 1)),
        None => (s, 0),
    };
    num.trim().parse::<f64>().ok().filter(|n| n.is_finite()).map(|n| (n * (1u64 << shift) as f64) as i64)
}

/// Splits like a POSIX shell (quotes and backslashes; no expansion), as
/// Compose does for a `command:` or `entrypoint:` string. Compose's
/// splitter (go-shellwords) keeps a word that starts with `#`, where a
/// shell (and `shell_words`) would take it for a comment: such a `#` is
/// escaped first.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut escaped = String::with_capacity(s.len() + 4);
    let (mut quote, mut word_start, mut backslash) = (None::<char>, true, false);
    for c in s.chars() {
        if backslash {
            backslash = false;
        } else if c == '\\' && quote != Some('\'') {
            backslash = true;
        } else if quote == Some(c) {
            quote = None;
        } else if quote.is_none() && (c == '\'' || c == '"') {
            quote = Some(c);
        } else if quote.is_none() && c == '#' && word_start {
            escaped.push('\\');
        }
        word_start = quote.is_none() && !backslash && c.is_whitespace();
        escaped.push(c);
    }
    shell_words::split(&escaped).map_err(|_| "an unterminated quote".to_string())
}

#[cfg(test)]
mod tests;
