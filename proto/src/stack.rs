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

    /// The networks a service joins (the default network when it names none).
    pub fn service_networks(&self, name: &str) -> Vec<String> {
        let svc = &self.services[name];
        if svc.networks.is_empty() { vec!["default".to_string()] } else { svc.networks.clone() }
    }

    /// Services in an order where each comes after what it depends on.
    /// Errors name a cycle or a missing dependency.
    pub fn start_order(&self) -> Result<Vec<String>, String> {
        let mut order = Vec::new();
        let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 visiting, 2 done
        fn visit<'a>(
            stack: &'a Stack,
            name: &'a str,
            state: &mut BTreeMap<&'a str, u8>,
            order: &mut Vec<String>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), String> {
            match state.get(name) {
                Some(2) => return Ok(()),
                Some(1) => {
                    path.push(name);
                    let start = path.iter().position(|p| *p == name).unwrap_or(0);
                    return Err(format!("services depend on each other in a cycle: {}", path[start..].join(" -> ")));
                }
                _ => {}
            }
            let svc = stack.services.get(name).ok_or_else(|| {
                format!("service `{}` depends on `{name}`, which is not a service", path.last().copied().unwrap_or("?"))
            })?;
            state.insert(name, 1);
            path.push(name);
            for dep in svc.depends_on.keys() {
                visit(stack, dep, state, order, path)?;
            }
            path.pop();
            state.insert(name, 2);
            order.push(name.to_string());
            Ok(())
        }
        for name in self.services.keys() {
            visit(self, name, &mut state, &mut order, &mut Vec::new())?;
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
        stack.services.insert("db".into(), svc(&["nope"]));
        assert!(stack.start_order().unwrap_err().contains("`nope`, which is not a service"));
    }
}
