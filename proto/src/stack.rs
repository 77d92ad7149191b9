//! The stack model: what the controller makes of a Compose file and what
//! the agent converges. The controller parses, interpolates and validates
//! (so errors name the user's file and line); the agent receives this
//! normalized form as JSON inside `ConvergeRequest`.
//!
//! Paths in it (build contexts, bind-mount sources) that were relative in
//! the Compose file stay relative: they are relative to the stack's
//! directory, which the controller syncs to the agent first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels the agent puts on everything it creates.
pub mod labels {
    pub const PROJECT: &str = "mlops.project";
    pub const SERVICE: &str = "mlops.service";
    /// sha256 of the service's desired state (see the agent's converge).
    pub const CONFIG_HASH: &str = "mlops.config-hash";
    /// What went into the config hash, in parts (JSON: model, image,
    /// mounted files, dependencies), so a plan can say which changed.
    pub const CONFIG_PARTS: &str = "mlops.config-parts";
    /// sha256 of a build's context, Dockerfile, args and target.
    pub const CONTEXT_HASH: &str = "mlops.context-hash";
    pub const MANAGED: &str = "mlops.managed";
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    /// Compose's project name: prefixes containers, networks and volumes.
    pub project: String,
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    #[serde(default)]
    pub volumes: BTreeMap<String, Volume>,
    #[serde(default)]
    pub options: StackOptions,
}

/// `x-mlops:` at the top of the Compose file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackOptions {
    /// When a Dockerfile's base image `debian:<suite>[-slim]` is not on the
    /// host, build it with debootstrap from the host's Debian mirror instead
    /// of pulling it (for hosts without registry access). Off unless asked for.
    #[serde(default)]
    pub bootstrap_base_images: bool,
    /// Add the deploying host's CA bundle to every build context as
    /// `.mlops/host-ca.crt` (for `pip --cert` behind a TLS-inspecting proxy).
    #[serde(default)]
    pub host_ca_bundle: bool,
    /// Variables the controller generates once per deployment (random),
    /// keeps in its state directory and passes to interpolation.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Files the controller adds to the synced stack directory: path in the
    /// stack → name of a binary that ships with mlopsctl.
    #[serde(default)]
    pub inject: BTreeMap<String, String>,
    /// Web UIs, for the access table and `mlopsctl ui NAME`.
    #[serde(default)]
    pub ui: BTreeMap<String, Ui>,
    /// How secrets are rotated, by name (each one of `secrets`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rotate: BTreeMap<String, Rotation>,
    /// The credentials in each service's environment (service, then
    /// variable), as hashes: the agent refuses a deploy that would change
    /// one for a service whose named volume already holds data (see
    /// [`credential_variables`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credentials: BTreeMap<String, BTreeMap<String, Credential>>,
    /// Allow services the keys that give a container the host
    /// (`privileged`, `pid: host`, `network_mode: host`, binds of the Docker
    /// socket, powerful `cap_add`s). Off: such a stack is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_host_access: bool,
    /// Which services run on which hosts of an inventory (by group).
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    /// What `mlopsctl migrate` does beyond stopping the services and moving
    /// every named volume.
    #[serde(default, skip_serializing_if = "Migration::is_empty")]
    pub migrate: Migration,
    /// `x-mlops.users`: the Airflow whose accounts `mlopsctl users`
    /// manages (its FAB auth manager's API), as its admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<AirflowAccess>,
}

/// `x-mlops.migrate`: the steps a stack's move to another host needs
/// beyond stopping its services and streaming its named volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Services stopped first on the old host (gracefully, within the stop
    /// timeout) and not started on the new one until the switch: those
    /// that do work on their own (schedulers, workers).
    #[serde(default)]
    pub hold: Vec<String>,
    /// A PostgreSQL database moved by dump and restore (`pg_dumpall` of the
    /// quiesced database, roles included, into `psql`) instead of as a
    /// volume, and verified by row counts of every table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Database>,
    /// Volumes (their keys) moved only when asked (`--with-metrics`).
    #[serde(default)]
    pub optional: Vec<String>,
    /// Airflow's steps: the paused set kept, the admin's login and a DAG
    /// run checked on the new host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub airflow: Option<AirflowAccess>,
}

impl Migration {
    pub fn is_empty(&self) -> bool {
        self == &Migration::default()
    }
}

/// [`Migration::database`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    /// The service running PostgreSQL (its `psql` and `pg_dumpall` are used).
    pub service: String,
    /// Its data volume (a key of `volumes`): not streamed.
    pub volume: String,
    /// The superuser the dump and restore run as (over the local socket).
    pub user: String,
    /// The database the checks run in.
    pub database: String,
    /// Named queries whose answers must be the same on both hosts before
    /// the switch.
    #[serde(default)]
    pub verify: BTreeMap<String, String>,
}

/// An Airflow API server and its admin: [`Migration::airflow`] and
/// [`StackOptions::users`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AirflowAccess {
    /// The API server's service: commands run in it and call its API
    /// (`127.0.0.1:8080`), such as the login and DAG run a migration checks.
    pub service: String,
    /// The admin's user name, and the secret (of `x-mlops.secrets`) with
    /// its password.
    pub admin_user: String,
    pub admin_password: String,
}

/// `x-mlops.placement`: the stack's roles, each a set of services that an
/// inventory group of the same name runs. A host in none of the roles'
/// groups runs every role; with one host (or none of this), the stack is
/// deployed whole to each host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Role (inventory group) name → its services and whether one host only
    /// may run it.
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    /// Services every host of the stack runs (exporters of the host, say).
    #[serde(default)]
    pub every_host: Vec<String>,
    /// Ports of a service that services on other hosts use: published on
    /// the inventory address of the host that runs it (only there, and only
    /// when some host of the stack does not run it).
    #[serde(default)]
    pub remote_ports: BTreeMap<String, Vec<u16>>,
    /// Services Prometheus scrapes wherever they run: service → its
    /// metrics port and the file (in the stack directory) the controller
    /// writes its targets to, in Prometheus's `file_sd` format: one target
    /// per host running it (by its instance name) when the stack is split
    /// between hosts, the service's own name otherwise.
    #[serde(default)]
    pub scrape: BTreeMap<String, Scrape>,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty() && self.every_host.is_empty() && self.remote_ports.is_empty() && self.scrape.is_empty()
    }
}

/// One service of [`Placement::scrape`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scrape {
    pub port: u16,
    /// Relative to the stack directory.
    pub file: String,
}

/// One role of [`Placement`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub services: Vec<String>,
    /// On one host only (a database, a scheduler, a master).
    #[serde(default)]
    pub single: bool,
}

/// One credential in a service's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// sha256 of the project, the variable and its value (hex): compared,
    /// never reversed.
    pub sha256: String,
    /// The secrets (`x-mlops.secrets` names) whose values it carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// The variables of `environment` that hold credentials, with the secrets
/// each carries: those whose value contains a secret's value (of at least
/// 8 characters). Only those: a credential `secrets rotate` cannot change
/// must not be locked to its volume for good.
pub fn credential_variables(
    project: &str,
    environment: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
) -> BTreeMap<String, Credential> {
    use sha2::{Digest, Sha256};
    let mut out = BTreeMap::new();
    for (var, value) in environment {
        let carried: Vec<String> = secrets
            .iter()
            .filter(|(_, v)| v.len() >= 8 && value.contains(v.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        if carried.is_empty() {
            continue;
        }
        let sha256 = hex::encode(Sha256::digest(format!("mlops-credential\0{project}\0{var}\0{value}")));
        out.insert(var.clone(), Credential { sha256, secrets: carried });
    }
    out
}

/// How a secret is changed on purpose (`mlopsctl secrets rotate NAME`),
/// beyond deploying the new value (which recreates every service using it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// While the change is under way the variable holds `NEW,OLD` (as a
    /// Fernet key list does: both decrypt, the first encrypts) until
    /// `after` has moved everything to the new value; then `NEW` alone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_old: bool,
    /// Run before the new value is deployed, in the running service that
    /// holds data made with the old one, so that it accepts the new
    /// (PostgreSQL's `ALTER ROLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Hook>,
    /// Run once the services run with the new value (re-encryption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Hook>,
}

/// A command a rotation runs in a service's container, with `MLOPS_OLD`
/// and `MLOPS_NEW` in its environment (never on its command line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub service: String,
    pub command: Vec<String>,
    /// Given on the command's standard input.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdin: String,
}

/// A service's web UI published on the host's loopback.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ui {
    pub service: String,
    /// Host port (the one published in `ports`).
    pub port: u16,
    #[serde(default)]
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// The image to run, or the tag to give the built image.
    pub image: Option<String>,
    pub build: Option<Build>,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// `env_file` contents merged under `environment`.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub volumes: Vec<Mount>,
    /// Networks to join; empty means the project's default network.
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub depends_on: BTreeMap<String, Condition>,
    pub healthcheck: Option<Healthcheck>,
    /// `no`, `always`, `on-failure[:N]`, `unless-stopped`.
    pub restart: Option<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Compose's hardening and runtime keys. Skipped when unset so that a
    /// service that sets none keeps the configuration hash it had before
    /// they existed (no container is recreated by an agent upgrade).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// A read-only root filesystem.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// `no-new-privileges[:true]`, `seccomp=...`, `apparmor=...`, `label=...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_opt: Vec<String>,
    /// `PATH[:OPTIONS]` tmpfs mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<String>,
    /// Run an init (tini) as PID 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
    /// Compose `logging`: the container's log driver and its options (such
    /// as rotation: `max-size`, `max-file`); Docker's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<i64>,
    /// How long `stop` waits before SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period_ms: Option<u64>,
    /// `HOST:IP` entries for /etc/hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
    /// The container's host name (unset: Docker's, the container ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Ports exposed to the stack's networks without publishing (`8080`, `8080/udp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<String>,
    /// The keys below give a container the host; refused unless the stack
    /// sets `x-mlops.allow_host_access` (see [`Service::host_access`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// `host` (the host's PID namespace), or unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<String>,
    /// `host` or `none`, or unset (the project's networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One `ulimits` entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    pub soft: i64,
    pub hard: i64,
}

/// Host paths whose bind mount hands a container the host: the container
/// engines' sockets and state, the host's configuration and secrets, root's
/// home, devices, and the agent's own keys and state. Binding one of them,
/// anything below it, or a directory above it (`/`, `/run`, `/var`) is host
/// access. (`/proc` and `/sys` are not on the list: exporters read them,
/// and a container has its own views of both anyway.)
const SENSITIVE_HOST_PATHS: [&str; 13] = [
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/docker",
    "/run/containerd",
    "/var/run/containerd",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/etc",
    "/root",
    "/boot",
    "/dev",
    "/var/lib/mlops-agent",
    "/usr/local/lib/mlops-agent",
];

/// `path` with `.`, `..` and repeated `/` resolved as text (`/var/lib/../run`
/// is `/var/run`), as the kernel will see it, symlinks aside (the agent
/// resolves those on the host before it creates a container).
pub fn normalize_host_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether binding host path `path` (absolute) hands a container the host.
pub fn is_sensitive_host_path(path: &str) -> bool {
    let p = std::path::PathBuf::from(normalize_host_path(path));
    p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".sock"))
        || SENSITIVE_HOST_PATHS.iter().any(|s| {
            let s = std::path::Path::new(s);
            s.starts_with(&p) || p.starts_with(s)
        })
}

/// Capabilities that give a container control of the host (or of what
/// other containers see), refused without `allow_host_access`.
const HOST_CAPABILITIES: [&str; 13] = [
    "ALL",
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_TIME",
    "SYS_BOOT",
    "DAC_READ_SEARCH",
    "BPF",
    "PERFMON",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "SYSLOG",
];

impl Service {
    /// What this service asks for that gives its container the host: each
    /// as the Compose text a user would recognise. Empty for a contained
    /// service. The compose reader refuses these (with a position) unless
    /// the stack opts in, and the agent checks again before creating it.
    pub fn host_access(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.privileged {
            out.push("privileged: true".to_string());
        }
        if self.pid.as_deref() == Some("host") {
            out.push("pid: host".into());
        }
        if self.network_mode.as_deref() == Some("host") {
            out.push("network_mode: host".into());
        }
        for cap in &self.cap_add {
            let c = cap.to_ascii_uppercase();
            if HOST_CAPABILITIES.contains(&c.trim_start_matches("CAP_")) {
                out.push(format!("cap_add: {cap}"));
            }
        }
        for opt in &self.security_opt {
            let o = opt.to_ascii_lowercase().replace(':', "=");
            if o.ends_with("unconfined") || o == "label=disable" {
                out.push(format!("security_opt: {opt}"));
            }
        }
        for m in &self.volumes {
            // `~/x` is root's home on the host; relative sources are in the
            // stack's tree (confined by the agent).
            let host = if m.source.starts_with("~") {
                Some(format!("/root/{}", m.source.trim_start_matches('~')))
            } else {
                m.source.starts_with('/').then(|| m.source.clone())
            };
            if m.kind == MountKind::Bind && host.as_deref().is_some_and(is_sensitive_host_path) {
                out.push(format!("volumes: {}:{} (a host path that gives the host away)", m.source, m.target));
            }
        }
        out
    }
}

/// A container's log driver (Docker's `--log-driver`/`--log-opt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logging {
    /// Empty: the engine's default driver, with `options`.
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// Relative to the stack directory (or absolute on the host).
    pub context: String,
    /// Relative to the context.
    pub dockerfile: String,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    pub target: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Empty: every address.
    #[serde(default)]
    pub host_ip: String,
    /// None: Docker picks one.
    pub host_port: Option<u16>,
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A named volume of the stack (or an external one).
    Volume,
    /// A host path.
    Bind,
    /// An anonymous tmpfs.
    Tmpfs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub kind: MountKind,
    /// Volume name, or host path (relative to the stack directory when it starts with `.`).
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    ServiceStarted,
    ServiceHealthy,
    ServiceCompletedSuccessfully,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// Docker's form: `["CMD", ...]`, `["CMD-SHELL", "..."]`, or `["NONE"]`.
    pub test: Vec<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
    pub start_period_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub cpus: Option<f64>,
    pub memory_bytes: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Use an existing network of this name instead of creating one.
    #[serde(default)]
    pub external: bool,
    /// The Docker name; default `<project>_<key>`.
    pub name: Option<String>,
    pub driver: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    #[serde(default)]
    pub external: bool,
    pub name: Option<String>,
    pub driver: Option<String>,
}

impl Stack {
    /// The Docker name of a stack network.
    pub fn network_name(&self, key: &str) -> String {
        match self.networks.get(key).and_then(|n| n.name.clone()) {
            Some(name) => name,
            None => format!("{}_{key}", self.project),
        }
    }

    /// The Docker name of a stack volume.
    pub fn volume_name(&self, key: &str) -> String {
        match self.volumes.get(key).and_then(|v| v.name.clone()) {
            Some(name) => name,
            None => format!("{}_{key}", self.project),
        }
    }

    /// The image a service runs: its `image`, else `<project>-<service>` for builds.
    pub fn image_of(&self, name: &str) -> String {
        let svc = &self.services[name];
        svc.image.clone().unwrap_or_else(|| format!("{}-{name}", self.project))
    }

    /// The container of a service (one replica).
    pub fn container_name(&self, name: &str) -> String {
        format!("{}-{name}-1", self.project)
    }

    /// The networks a service joins (the default network when it names
    /// none; none with `network_mode`).
    pub fn service_networks(&self, name: &str) -> Vec<String> {
        let svc = &self.services[name];
        if svc.network_mode.is_some() {
            // `host` or `none`: no project network.
            Vec::new()
        } else if svc.networks.is_empty() {
            vec!["default".to_string()]
        } else {
            svc.networks.clone()
        }
    }

    /// Services in an order where each comes after what it depends on.
    /// Errors name a cycle or a missing dependency. A depth-first walk with
    /// an explicit stack (a model from the wire may chain thousands of
    /// services; recursion would overflow the agent's stack).
    pub fn start_order(&self) -> Result<Vec<String>, String> {
        let mut order = Vec::new();
        let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 visiting, 2 done
        for root in self.services.keys() {
            if state.contains_key(root.as_str()) {
                continue;
            }
            // (service, its dependencies not yet visited)
            let mut path: Vec<(&str, std::collections::btree_map::Keys<'_, String, Condition>)> = Vec::new();
            state.insert(root, 1);
            path.push((root, self.services[root].depends_on.keys()));
            while let Some((name, deps)) = path.last_mut() {
                let name = *name;
                match deps.next() {
                    Some(dep) => match state.get(dep.as_str()) {
                        Some(2) => {}
                        Some(_) => {
                            let names: Vec<&str> = path.iter().map(|(n, _)| *n).collect();
                            let start = names.iter().position(|p| *p == dep).unwrap_or(0);
                            return Err(format!(
                                "services depend on each other in a cycle: {} -> {dep}",
                                names[start..].join(" -> ")
                            ));
                        }
                        None => {
                            let svc = self.services.get(dep).ok_or_else(|| {
                                format!("service `{name}` depends on `{dep}`, which is not a service")
                            })?;
                            state.insert(dep, 1);
                            path.push((dep, svc.depends_on.keys()));
                        }
                    },
                    None => {
                        state.insert(name, 2);
                        order.push(name.to_string());
                        path.pop();
                    }
                }
            }
        }
        Ok(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(deps: &[&str]) -> Service {
        Service {
            depends_on: deps.iter().map(|d| (d.to_string(), Condition::ServiceStarted)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn start_order_and_cycles() {
        let mut stack = Stack { project: "p".into(), ..Default::default() };
        stack.services.insert("web".into(), svc(&["db", "cache"]));
        stack.services.insert("db".into(), svc(&[]));
        stack.services.insert("cache".into(), svc(&["db"]));
        assert_eq!(stack.start_order().unwrap(), ["db", "cache", "web"]);
        stack.services.insert("db".into(), svc(&["web"]));
        let err = stack.start_order().unwrap_err();
        assert!(err.contains("cycle"), "{err}");
        assert!(err.contains("db -> web"), "the cycle is named: {err}");
        stack.services.insert("db".into(), svc(&["nope"]));
        assert!(stack.start_order().unwrap_err().contains("`nope`, which is not a service"));
    }

    #[test]
    fn a_long_dependency_chain_needs_no_deep_stack() {
        let mut stack = Stack { project: "p".into(), ..Default::default() };
        let n = 50_000;
        for i in 0..n {
            let deps: Vec<String> = if i + 1 < n { vec![format!("s{:06}", i + 1)] } else { Vec::new() };
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            stack.services.insert(format!("s{i:06}"), svc(&deps));
        }
        // Run on a small stack, as a tokio worker thread would have.
        let order = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || stack.start_order())
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(order.first().map(String::as_str), Some("s049999"));
        assert_eq!(order.len(), n);
    }

    #[test]
    fn host_access_is_named() {
        let mut s = Service { privileged: true, pid: Some("host".into()), ..Default::default() };
        s.cap_add = vec!["NET_BIND_SERVICE".into(), "SYS_ADMIN".into()];
        s.volumes.push(Mount {
            kind: MountKind::Bind,
            source: "/var/run/docker.sock".into(),
            target: "/s".into(),
            read_only: true,
        });
        s.volumes.push(Mount { kind: MountKind::Bind, source: "/proc".into(), target: "/p".into(), read_only: true });
        s.cap_add.push("cap_sys_time".into());
        s.security_opt.push("label:disable".into());
        let a = s.host_access();
        assert_eq!(a.len(), 6, "{a:?}");
        assert!(Service::default().host_access().is_empty());
        for bad in
            ["/", "/.", "//run", "/run/.", "/var/lib/../../run", "/etc/shadow", "/var/lib/docker/volumes", "/x/y.sock"]
        {
            assert!(is_sensitive_host_path(bad), "{bad}");
        }
        for fine in ["/proc", "/sys", "/srv/data", "/var/log/app", "/opt/models"] {
            assert!(!is_sensitive_host_path(fine), "{fine}");
        }
        assert_eq!(normalize_host_path("//a/./b/../c/"), "/a/c");
    }
}
