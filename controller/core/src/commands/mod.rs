//! Every `mlopsctl` command, as a function of this library: the CLI parses
//! flags into [`GlobalOptions`] and the command's options, calls the
//! function, and prints what it returns. One module per command.
//!
//! - [`Setup`]: what every command needs (targets, state directory, TLS,
//!   SSH options), built once from the global options.
//! - [`StackOptions`] and [`LoadedStack`]: which stack (a directory, or the
//!   embedded platform bundle, see [`bundle`]), with its generated secrets,
//!   profiles and `--skip`.
//! - Commands fan out over hosts with [`crate::fanout::per_host`] and report
//!   progress, warnings and notes through a [`Report`].

pub mod backup;
pub mod bundle;
pub mod config;
pub mod deploy;
pub mod down;
pub mod history;
pub mod logs;
pub mod migrate;
pub mod operator;
pub mod pki;
pub mod plan;
pub mod rollback;
pub mod rotate;
pub mod secrets;
pub mod state;
pub mod status;
pub mod sync;
pub mod ui;
pub mod uninstall;
pub mod users;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mlops_inventory::{Connection, SshConfig, Target};
use mlops_ssh::SshOptions;

use crate::ControllerError;
use crate::agent_binary::AgentBinary;
use crate::bootstrap::Context;
use crate::progress::Report;
use crate::state::StateDir;
use crate::sync::{HashCache, LocalTree};

/// The options every command takes (the CLI's global flags).
#[derive(Debug, Clone, Default)]
pub struct GlobalOptions {
    /// `--host` specs, `[USER@]HOST[:PORT]` or `local`.
    pub hosts: Vec<String>,
    pub inventory: Option<PathBuf>,
    pub limit: Option<String>,
    pub identities: Vec<PathBuf>,
    /// Default `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_keys: bool,
    /// Default `~/.ssh/config`.
    pub ssh_config: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub forks: usize,
    /// Default [`StateDir::default_path`].
    pub state_dir: Option<PathBuf>,
    pub agent_binary: Option<PathBuf>,
    /// `deploy --take-over` (see `bootstrap::Context::take_over`).
    pub take_over: bool,
}

/// What every command needs: targets, state, TLS, SSH options.
pub struct Setup {
    pub targets: Vec<Target>,
    /// Every host of the inventory (and `--host`), `--limit` or not: where
    /// a stack's roles are placed (see [`crate::placement`]).
    pub all_hosts: Vec<Target>,
    pub state: Arc<StateDir>,
    pub ctx: Arc<Context>,
    pub forks: usize,
    /// `~/.ssh/config` (or `--ssh-config`), for hosts named after setup.
    pub ssh_config: SshConfig,
}

impl GlobalOptions {
    /// `~/.ssh/config` (or `--ssh-config`), its warnings sent to `report`.
    pub fn ssh_config(&self, report: &dyn Report) -> SshConfig {
        let path =
            self.ssh_config.clone().unwrap_or_else(|| mlops_inventory::ssh_config::home_dir().join(".ssh/config"));
        let config = SshConfig::load(&path);
        for w in &config.warnings {
            report.warn(&format!("{}: {w}", path.display()));
        }
        config
    }
}

impl Setup {
    /// Resolves the targets (no host at all means this machine), opens the
    /// state directory and its CA, and, when `needs_binary`, finds the agent
    /// binary. Warnings (about `~/.ssh/config`) go to `report`.
    pub fn new(g: &GlobalOptions, needs_binary: bool, report: &dyn Report) -> Result<Self, ControllerError> {
        let home = mlops_inventory::ssh_config::home_dir();
        let ssh_config = g.ssh_config(report);
        let targets = resolve_targets(g, &ssh_config)?;
        let all_hosts = match &g.limit {
            Some(_) => {
                let unlimited = GlobalOptions { limit: None, ..g.clone() };
                resolve_targets(&unlimited, &ssh_config)?
            }
            None => targets.clone(),
        };

        let state_path = g.state_dir.clone().unwrap_or_else(StateDir::default_path);
        operator::auto_join(&state_path, report)?;
        let state = Arc::new(StateDir::open(&state_path)?);
        let tls = state.client_tls()?;
        let binary = if needs_binary { Some(AgentBinary::locate(g.agent_binary.as_deref())?) } else { None };

        let mut ssh = SshOptions::new(g.known_hosts.clone().unwrap_or_else(|| home.join(".ssh/known_hosts")));
        ssh.accept_new = g.accept_new_host_keys;
        ssh.connect_timeout = g.connect_timeout.max(Duration::from_secs(1));
        for id in &g.identities {
            if !id.is_file() {
                return Err(mlops_ssh::SshError::KeyLoad { path: id.clone(), message: "no such file".into() }.into());
            }
        }
        let ctx = Context {
            binary,
            tls,
            ssh,
            identities: g.identities.clone(),
            take_over: g.take_over,
            our_cas_pem: state.all_cas_pem()?,
            state: Some(state.clone()),
        };
        Ok(Setup { targets, all_hosts, state, ctx: Arc::new(ctx), forks: g.forks.max(1), ssh_config })
    }
}

impl Setup {
    /// A host by its inventory (or `--host`) name, else `spec` read as
    /// `[USER@]HOST[:PORT]`.
    pub fn host(&self, spec: &str) -> Result<Target, ControllerError> {
        if let Some(t) = self.all_hosts.iter().find(|t| t.name == spec) {
            return Ok(t.clone());
        }
        let mut found = mlops_inventory::target::targets_from_specs(&[spec.to_string()], &self.ssh_config)?;
        Ok(found.remove(0))
    }

    /// The same setup acting on `targets` only (placement among them too).
    pub fn only(&self, targets: Vec<Target>) -> Setup {
        Setup {
            all_hosts: targets.clone(),
            targets,
            state: self.state.clone(),
            ctx: self.ctx.clone(),
            forks: self.forks,
            ssh_config: self.ssh_config.clone(),
        }
    }
}

fn resolve_targets(g: &GlobalOptions, ssh_config: &SshConfig) -> Result<Vec<Target>, ControllerError> {
    if g.limit.is_some() && g.inventory.is_none() {
        return Err(ControllerError::usage(
            "--limit selects hosts of an inventory, but no --inventory was given",
            Some("add -i FILE, or name hosts with --host"),
        ));
    }
    let mut targets = Vec::new();
    if let Some(inv) = &g.inventory {
        targets.extend(mlops_inventory::load_targets(inv, g.limit.as_deref(), ssh_config)?);
    }
    targets.extend(mlops_inventory::target::targets_from_specs(&g.hosts, ssh_config)?);
    if targets.is_empty() {
        // The embedded default: this machine, no SSH.
        targets.push(Target::local());
    }
    let mut seen_local = false;
    targets.retain(|t| {
        if t.connection == Connection::Local {
            let first = !seen_local;
            seen_local = true;
            return first;
        }
        true
    });
    let mut names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(ControllerError::usage(format!("host `{}` is named twice", w[0]), None));
    }
    Ok(targets)
}

/// Which stack: a directory with a Compose file, or just a project name;
/// without `--stack`, the embedded platform bundle.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// A directory holding compose.yaml (or the Compose file itself).
    pub stack: Option<PathBuf>,
    /// Overrides the Compose file's `name:`.
    pub project: Option<String>,
    pub profiles: Vec<String>,
    /// Services left out (`--skip`).
    pub skip: Vec<String>,
    /// Interpolation variables set by flags (such as `--expose`).
    pub vars: Vec<(String, String)>,
}

impl StackOptions {
    /// The stack directory: `--stack`, else the embedded platform bundle,
    /// written once into the state directory.
    pub fn dir(&self, state: &StateDir) -> Result<PathBuf, ControllerError> {
        match &self.stack {
            Some(dir) => Ok(dir.clone()),
            None => bundle::materialize(state),
        }
    }

    /// The project named by `--project`, or by the stack (default: the platform).
    pub fn project(&self, state: &StateDir) -> Result<String, ControllerError> {
        if self.stack.is_none()
            && let Some(p) = &self.project
        {
            return mlops_compose::normalize_project(p).ok_or_else(|| {
                ControllerError::usage(
                    format!("--project `{p}` is not a usable project name"),
                    Some("use lowercase letters, digits, `-` and `_`"),
                )
            });
        }
        Ok(mlops_compose::preflight(&self.dir(state)?, self.project.as_deref())?.0)
    }

    /// The stack model with stand-ins for its secrets (see
    /// [`crate::secrets::provisional`]) and `--skip` applied: for checking
    /// it and for what does not run it (sync, ui). Warnings about the
    /// Compose file go to `report`.
    pub fn load_model(&self, state: &StateDir, report: &dyn Report) -> Result<mlops_compose::Loaded, ControllerError> {
        let dir = self.dir(state)?;
        let (project, secret_names) = mlops_compose::preflight(&dir, self.project.as_deref())?;
        let secrets = crate::secrets::provisional(&state.path, &project, &secret_names)?;
        self.load_model_with(state, report, &secrets)
    }

    /// The stack model with `secrets` (decided by the hosts, see
    /// [`crate::secrets::reconcile`]) and `--skip` applied.
    pub fn load_model_with(
        &self,
        state: &StateDir,
        report: &dyn Report,
        secrets: &BTreeMap<String, String>,
    ) -> Result<mlops_compose::Loaded, ControllerError> {
        let dir = self.dir(state)?;
        let (project, _) = mlops_compose::preflight(&dir, self.project.as_deref())?;
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(self.vars.iter().cloned());
        let options = mlops_compose::LoadOptions { project: Some(project), env, profiles: self.profiles.clone() };
        let mut loaded = mlops_compose::load(&dir, &options)?;
        for w in &loaded.warnings {
            report.warn(&w.to_string());
        }
        mlops_compose::skip_services(&mut loaded.stack, &self.skip)
            .map_err(|m| ControllerError::usage(m, Some("--skip takes the name of a service of the stack")))?;
        Ok(loaded)
    }

    /// The model and the scanned stack directory (with injected binaries),
    /// once for all hosts.
    pub fn load(&self, state: &StateDir, report: &dyn Report) -> Result<LoadedStack, ControllerError> {
        let loaded = self.load_model(state, report)?;
        let mut cache = HashCache::open(state.path.join("cache/file-hashes.json"));
        let mut tree = crate::sync::scan(&loaded.dir, &mut cache)?;
        cache.save();
        for (path, artifact) in &loaded.stack.options.inject {
            let source = crate::agent_binary::locate_artifact(artifact)?;
            tree.add_file(path, &source, 0o755)?;
        }
        Ok(LoadedStack { stack: loaded.stack, tree: Arc::new(tree) })
    }
}

/// A stack ready to go to hosts: its model and its files.
pub struct LoadedStack {
    pub stack: mlops_proto::stack::Stack,
    pub tree: Arc<LocalTree>,
}

impl LoadedStack {
    /// Where each service runs among `all_hosts` (see [`crate::placement`]),
    /// with the files that depend on it (`x-mlops.placement.scrape`
    /// targets) written into the state directory and put in the tree.
    pub fn place(
        &mut self,
        all_hosts: &[mlops_inventory::Target],
        state: &StateDir,
    ) -> Result<crate::placement::Layout, ControllerError> {
        let layout = crate::placement::place(&self.stack, all_hosts)?;
        let generated = crate::placement::scrape_targets(&self.stack, &layout);
        if !generated.is_empty() {
            let dir = state.path.join("generated").join(&self.stack.project);
            std::fs::create_dir_all(&dir)
                .map_err(|e| ControllerError::Local(format!("cannot create {}: {e}", dir.display())))?;
            let mut tree = (*self.tree).clone();
            for (file, text) in generated {
                // Named by content and never rewritten in place: runs that
                // overlap (a plan beside a deploy) each upload what they hashed.
                use sha2::Digest;
                let local = dir.join(format!("{}.json", hex::encode(sha2::Sha256::digest(text.as_bytes()))));
                if !local.exists() {
                    let tmp = dir.join(format!(".{}.{}.tmp", std::process::id(), crate::rollout::salt()));
                    std::fs::write(&tmp, &text)
                        .and_then(|()| std::fs::rename(&tmp, &local))
                        .map_err(|e| ControllerError::Local(format!("cannot write {}: {e}", local.display())))?;
                }
                tree.add_file(&file, &local, 0o644)?;
            }
            self.tree = Arc::new(tree);
        }
        Ok(layout)
    }
}
