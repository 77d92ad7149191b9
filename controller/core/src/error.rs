//! The controller's errors, each with the hint the CLI prints under it.
//!
//! What the agent says goes by kind: every error an agent handler returns
//! carries a typed `Failure` ([`mlops_proto::failure`]), and
//! [`ControllerError::from_status`] sorts a gRPC status into the agent's
//! answer ([`ControllerError::Agent`]), a broken connection
//! ([`ControllerError::Transport`], worth a retry) or something else.
//! Retries and hints decide on those kinds, never on message texts.

use std::path::PathBuf;

use mlops_proto::v1::{Failure, FailureKind};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no agent binary found (looked in: {})", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    AgentBinaryNotFound { searched: Vec<PathBuf> },
    #[error("no static `{name}` binary for the stack (looked in: {})", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ArtifactNotFound { name: String, variable: String, searched: Vec<PathBuf> },
    #[error("cannot read agent binary `{}`", path.display())]
    AgentBinaryRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent binary `{}` is not a Linux executable for a supported CPU", path.display())]
    AgentBinaryFormat { path: PathBuf },
    #[error("{host} runs {host_arch}, but the agent binary is built for {binary_arch}")]
    ArchMismatch { host: String, host_arch: String, binary_arch: String },
    /// A dynamically linked agent needs a newer glibc than the host has.
    #[error("{host} has glibc {have}, but the agent binary `{}` is dynamically linked and needs glibc {needed}", path.display())]
    GlibcTooOld { host: String, have: String, needed: String, path: PathBuf },
    #[error("{host} runs `{os}`; the agent supports Linux only")]
    UnsupportedOs { host: String, os: String },
    #[error("sudo on {host} asks {user} for a password; mlopsctl needs passwordless sudo to install the agent")]
    SudoNeedsPassword { host: String, user: String },
    #[error("{user} on {host} is not root and sudo is not installed")]
    NoSudo { host: String, user: String },
    #[error("probing {host} failed: {message}")]
    Probe { host: String, message: String },
    #[error("uploading the agent to {host} failed: {message}")]
    Upload { host: String, message: String },
    #[error("installing the agent on {host} failed: {message}")]
    Install { host: String, message: String },
    /// No TLS session with the agent: nothing listens, or the handshake
    /// failed. `foreign_ca`: the agent's certificate comes from another CA;
    /// `other_host`: it was issued (by our CA) for another host; `revoked`:
    /// the agent's certificate is under a removed operator's CA.
    #[error("the agent on {host} does not answer on 127.0.0.1:{port}: {message}")]
    AgentUnreachable { host: String, port: u16, message: String, foreign_ca: bool, other_host: bool, revoked: bool },
    #[error("the agent on {host} was installed by another controller (it trusts another CA); it was left as it is")]
    ForeignAgent { host: String },
    /// The agent refused our certificate as revoked (TLS 1.3 tells the
    /// client only on its first read, so this can surface in any call).
    #[error("the agent on {host} refuses this controller: its operator's certificate is revoked")]
    Revoked { host: String },
    #[error("the agent on {host} still runs binary {running} after a restart (expected {expected})")]
    StaleAgent { host: String, running: String, expected: String },
    /// The agent answered a call with a failure.
    #[error("{host}: {}", failure.message)]
    Agent { host: String, call: &'static str, failure: Box<Failure> },
    /// The connection to the agent broke during a call (the agent did not answer).
    #[error("{host}: the connection to the agent broke during {call}: {message}")]
    Transport { host: String, call: &'static str, message: String },
    /// A status that neither the agent's handlers nor the connection produced.
    #[error("{host}: {call} failed: {status}")]
    Rpc { host: String, call: &'static str, status: String },
    /// The agent ended a stream without the result it owes.
    #[error("{host}: the agent ended {call} without a result")]
    Incomplete { host: String, call: &'static str },
    /// A service of this host depends on one of another host, which failed.
    #[error(
        "{host}: not deployed: service `{service}` depends on `{dependency}`, which runs on {provider}, and {provider} failed"
    )]
    ProviderFailed { host: String, service: String, dependency: String, provider: String },
    /// A rolling deploy stopped before this host's batch: more hosts
    /// failed than `--max-fail` allows. Nothing of the stack was changed here.
    #[error(
        "{host}: not deployed: the rollout stopped before batch {batch}: {failed} failed, and --max-fail allows {allowed}"
    )]
    RolloutStopped { host: String, batch: usize, failed: String, allowed: usize },
    /// The host that was to build an image for this one could not.
    #[error("{host}: image {tag} comes from another host of this deploy, which failed: {message}")]
    ImageSource { host: String, tag: String, message: String },
    #[error("{host}: no Docker engine: {message}")]
    NoDocker { host: String, message: String },
    #[error("the agent on {host} speaks API level {level}; this needs level {needed}")]
    AgentTooOld { host: String, level: u32, needed: u32 },
    #[error(transparent)]
    Secrets(#[from] SecretsConflict),
    /// A secret rotation stopped at a step (before or after the value changed; the message says).
    #[error("{}{message}", if host.is_empty() { String::new() } else { format!("{host}: ") })]
    RotationRefused { host: String, message: String },
    #[error("local command failed: {0}")]
    Local(String),
    /// Flags or arguments that do not fit together (exit code 2).
    #[error("{message}")]
    Usage { message: String, hint: Option<String> },
    #[error(transparent)]
    Inventory(#[from] mlops_inventory::InventoryError),
    #[error(transparent)]
    Compose(#[from] mlops_compose::ComposeError),
    #[error(transparent)]
    Ssh(#[from] mlops_ssh::SshError),
    #[error(transparent)]
    Pki(#[from] mlops_pki::PkiError),
    #[error("cannot use state directory `{}`", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ControllerError {
    pub fn usage(message: impl Into<String>, hint: Option<&str>) -> ControllerError {
        ControllerError::Usage { message: message.into(), hint: hint.map(str::to_string) }
    }

    /// Sorts the status of a failed `call` to `host`: the agent's typed
    /// answer, a broken connection, or anything else.
    pub fn from_status(host: &str, call: &'static str, status: &tonic::Status) -> ControllerError {
        let host = host.to_string();
        if let Some(failure) = mlops_proto::failure::from_status(status) {
            return ControllerError::Agent { host, call, failure: Box::new(failure) };
        }
        if crate::client::revoked(status) {
            return ControllerError::Revoked { host };
        }
        // A status made on this side from an I/O, HTTP/2 or TLS error keeps
        // that error as its source; one that came over the wire has none.
        let local = std::error::Error::source(status).is_some();
        if local || matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown) {
            return ControllerError::Transport { host, call, message: crate::client::error_chain(status) };
        }
        ControllerError::Rpc { host, call, status: format!("{}: {}", status.code(), status.message()) }
    }

    /// The agent's failure, when this is one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            ControllerError::Agent { failure, .. } => Some(failure.as_ref()),
            _ => None,
        }
    }

    /// The failure's kind, when the agent answered with one.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        self.failure().map(Failure::kind)
    }

    /// The connection to the agent broke (as opposed to the agent answering
    /// with an error): worth a retry on a new connection.
    pub fn is_transport_failure(&self) -> bool {
        matches!(
            self,
            ControllerError::Transport { .. }
                | ControllerError::AgentUnreachable { foreign_ca: false, other_host: false, revoked: false, .. }
        )
    }

    /// A suggestion for the user, printed as `hint:`.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            ControllerError::AgentBinaryNotFound { .. } => "build it with `cargo agent-static` (static: any glibc), or pass --agent-binary PATH (or set MLOPS_AGENT_BINARY)".into(),
            ControllerError::ArtifactNotFound { name, variable, .. } => format!(
                "build it with `cargo {}-static` (it runs in a FROM scratch image, so it must be static), or set {variable}",
                name.trim_start_matches("mlops-airflow-").trim_start_matches("mlops-")
            ),
            ControllerError::AgentBinaryFormat { .. } | ControllerError::ArchMismatch { .. } => "pass --agent-binary with an agent built for the host's CPU (`cargo build --release -p mlops-agent --target <arch>-unknown-linux-gnu`)".into(),
            ControllerError::GlibcTooOld { .. } => "build the static agent, which runs on any x86_64 Linux whatever its glibc: `cargo agent-static` (mlopsctl then finds it without flags), or pass --agent-binary with a static build".into(),
            ControllerError::SudoNeedsPassword { user, .. } => format!("allow it with a sudoers line such as `{user} ALL=(ALL) NOPASSWD: ALL` (in /etc/sudoers.d/), or connect as root"),
            ControllerError::NoSudo { .. } => "install sudo on the host and allow the user passwordless sudo, or connect as root".into(),
            ControllerError::Revoked { .. } => "this controller's operator was removed (`mlopsctl operator remove`); ask an operator to add you again (`mlopsctl operator add`), then join with the new bundle in a new state directory".into(),
            ControllerError::AgentUnreachable { revoked: true, .. } => {
                "the agent was keyed by an operator who has since been removed; `mlopsctl deploy` re-keys it with this controller's certificate (its containers keep running)".into()
            }
            ControllerError::AgentUnreachable { other_host: true, .. } => {
                "what answers on the agent's port holds a certificate issued for another host: another host's agent key is in use here, or something took the port of a stopped agent; `mlopsctl deploy` re-installs this host's own agent".into()
            }
            ControllerError::AgentUnreachable { foreign_ca: true, .. } => {
                "that agent's certificate comes from another controller's CA (another state directory); deploy from that controller, or take the host over with `mlopsctl deploy --take-over` (it re-keys the agent; containers keep running)".into()
            }
            ControllerError::ForeignAgent { .. } => "deploy from the controller that manages it (its state directory), or pass --take-over to re-key the agent for this one: its containers keep running, but the other controller loses access".into(),
            ControllerError::Install { .. } | ControllerError::AgentUnreachable { .. } | ControllerError::StaleAgent { .. } => {
                "look at the agent's log on the host: `journalctl -u mlops-agent` (systemd) or /var/log/mlops-agent/agent.log".into()
            }
            ControllerError::Secrets(SecretsConflict::Disagree { .. }) => "each host keeps the credentials its containers and data were made with, so none is overwritten; `mlopsctl secrets` shows which host holds what. Deploy those hosts as separate projects (--project), or leave the odd ones out with --limit".into(),
            ControllerError::RotationRefused { .. } => "a rotation changes nothing until every host answers, runs the stack healthy and holds the same value; `mlopsctl status` and `mlopsctl secrets` show where things stand, and the command can be run again".into(),
            ControllerError::Secrets(SecretsConflict::Unknown { .. }) => "deploy again when every host answers, or leave the silent hosts out with --limit".into(),
            ControllerError::StateDir { .. } => "choose another with --state-dir or MLOPS_STATE_DIR".into(),
            ControllerError::ProviderFailed { provider, .. } => format!("the error of {provider} is above; once it deploys, deploy again (the hosts that depend on it follow)"),
            ControllerError::RolloutStopped { .. } => "this host still runs what it ran; fix the failed hosts (their errors are above) and deploy again, or allow failures with --max-fail N|N%".into(),
            ControllerError::ImageSource { .. } => "each image is built once per deploy and shipped to the other hosts; the error of the host that built it is above. Fix it and deploy again".into(),
            ControllerError::NoDocker { .. } => "let mlopsctl install it (drop --no-docker-install), or install Docker on the host".into(),
            ControllerError::Agent { failure, .. } => return failure_hint(failure),
            ControllerError::Transport { .. } => "the SSH connection or the agent went away mid-call; run the command again (`mlopsctl status` shows whether the agent runs)".into(),
            ControllerError::AgentTooOld { .. } => "run `mlopsctl deploy` to upgrade the agent".into(),
            ControllerError::Ssh(e) => return e.hint(),
            ControllerError::Usage { hint, .. } => return hint.clone(),
            ControllerError::Inventory(e) => return e.hint(),
            ControllerError::Compose(e) => return e.hint(),
            ControllerError::Pki(_) => "the controller's CA lives in <state-dir>/pki; check its files and permissions".into(),
            _ => return None,
        })
    }
}

/// Why a deploy cannot tell a project's secrets; every host of the deploy
/// fails with it (so it is `Clone`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretsConflict {
    #[error(
        "the hosts of stack `{project}` hold different values of secret `{name}` ({holders}); no secret was overwritten and the stack was not deployed"
    )]
    Disagree { project: String, name: String, holders: String },
    #[error("no credentials for stack `{project}` were found, and {} did not answer: they may hold them; none were generated", hosts.join(", "))]
    Unknown { project: String, hosts: Vec<String> },
}

/// `mlopsctl logs SERVICE` as the user would type it for this failure.
fn logs_command(failure: &Failure) -> String {
    if failure.project.is_empty() || failure.project == "mlops" {
        format!("mlopsctl logs {}", failure.service)
    } else {
        format!("mlopsctl logs {} --project {}", failure.service, failure.project)
    }
}

/// What to do about an agent's failure, by its kind; and, when the host
/// was returned to its last revision, that it was.
fn failure_hint(f: &Failure) -> Option<String> {
    let hint = kind_hint(f);
    if f.rolled_back_to == 0 {
        return hint;
    }
    let back = format!(
        "the host runs revision {} again (`mlopsctl history` lists them); deploy with --no-rollback to keep a failed revision for inspection",
        f.rolled_back_to
    );
    Some(match hint {
        Some(h) => format!("{h}; {back}"),
        None => back,
    })
}

fn kind_hint(f: &Failure) -> Option<String> {
    Some(match f.kind() {
        FailureKind::StackLocked => {
            "wait for that deploy to finish; a lock held by a controller that died is released when its connection closes (a converge it left runs to its end, and the next deploy waits for it)".into()
        }
        FailureKind::ImageMissing => format!(
            "`{}` is not on the host and could not be pulled (the cause is above); load it there (`docker load`), or leave the service out with --skip {}",
            f.image, f.service
        ),
        FailureKind::BuildFailed => format!(
            "the build's last output is above; fix the Dockerfile or the build context of service `{}` and deploy again",
            f.service
        ),
        FailureKind::PortInUse => format!(
            "free port {} on the host{}, or publish service `{}` on another port (its `ports:`)",
            f.port,
            if f.output.is_empty() { String::new() } else { format!(" (held by {})", f.output) },
            f.service
        ),
        FailureKind::HealthCheckFailed | FailureKind::ServiceExited | FailureKind::Timeout if !f.service.is_empty() => {
            format!("`{}` shows what the service printed", logs_command(f))
        }
        FailureKind::EngineUnreachable => {
            "start the host's Docker engine, or let mlopsctl install it (drop --no-docker-install)".into()
        }
        FailureKind::DockerInstallFailed => {
            "install Docker on the host yourself (Debian/Ubuntu: `apt-get install docker.io`), then deploy again".into()
        }
        FailureKind::EngineError => {
            "the host's Docker engine refused; its log says more (`journalctl -u docker`, or /var/log/mlops-agent/dockerd.log)".into()
        }
        FailureKind::BadRequest if f.field == "dir" => {
            "name a directory that root owns and group and others cannot write, from `/` down (`chown root D; chmod go-w D` for each), outside the agent's state and Docker's data; or drop --to for the agent's own backups/".into()
        }
        FailureKind::BadRequest if f.field == "name" => {
            "a backup of that name (the same second, from the same host) is there already: run the backup again".into()
        }
        FailureKind::BadRequest if f.field == "backup" => {
            "that backup on the host cannot be trusted: restore another (`latest`, or a name `backup --schedule show` lists)".into()
        }
        FailureKind::BadRequest if f.field.starts_with("services.") => {
            format!("fix `{}` in the stack's Compose file and deploy again", f.field)
        }
        FailureKind::BadRequest => format!(
            "the agent refused `{}`; if this controller and the agent differ in version, `mlopsctl deploy` upgrades the agent",
            f.field
        ),
        FailureKind::CredentialChanged => {
            let secret = f.output.split(',').find(|s| !s.is_empty());
            format!(
                "the data in volume `{}` was made with the old value of `{}`; {}, or start that data afresh with `mlopsctl down --volumes` (it deletes the data)",
                f.path,
                f.field,
                match secret {
                    Some(name) => format!("change it with `mlopsctl secrets rotate {name}` (it changes the data too)"),
                    None => "put the old value back".to_string(),
                }
            )
        }
        FailureKind::ShuttingDown => "the agent was stopping (a restart or upgrade); run the command again".into(),
        FailureKind::Io => format!("check `{}` on the host (space, permissions)", f.path),
        FailureKind::Contended => format!(
            "nothing was written outside the stack's tree; a container with a writable bind of `{}` keeps replacing it: stop it or mount it read-only (`:ro`), then sync again",
            f.path
        ),
        FailureKind::DiskFull => format!(
            "free space in {} on the host (`mlopsctl status` shows what Docker's data takes; `docker image prune`, `docker builder prune`, or old volumes), or lower the floor with --min-free-space",
            f.path
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind) -> Failure {
        let mut f =
            Failure { message: "m".into(), service: "web".into(), project: "shop".into(), ..Default::default() };
        f.set_kind(kind);
        f
    }

    #[test]
    fn statuses_sort_into_answers_and_broken_connections() {
        let answered = mlops_proto::failure::into_status(&failure(FailureKind::HealthCheckFailed));
        let e = ControllerError::from_status("h", "Converge", &answered);
        assert_eq!(e.failure_kind(), Some(FailureKind::HealthCheckFailed));
        assert!(!e.is_transport_failure());
        assert_eq!(e.hint().unwrap(), "`mlopsctl logs web --project shop` shows what the service printed");

        // What tonic makes of a connection that broke: a status whose
        // source is the I/O error, with no agent failure in it.
        let broke = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let e = ControllerError::from_status("h", "Converge", &broke);
        assert!(e.is_transport_failure(), "{e:?}");

        // A status from the wire that is neither (an older or foreign server).
        let other = tonic::Status::unimplemented("no such method");
        let e = ControllerError::from_status("h", "Converge", &other);
        assert!(matches!(e, ControllerError::Rpc { .. }) && !e.is_transport_failure(), "{e:?}");
    }

    #[test]
    fn every_failure_kind_that_calls_for_action_has_a_hint() {
        for kind in [
            FailureKind::StackLocked,
            FailureKind::ImageMissing,
            FailureKind::BuildFailed,
            FailureKind::PortInUse,
            FailureKind::HealthCheckFailed,
            FailureKind::ServiceExited,
            FailureKind::Timeout,
            FailureKind::EngineUnreachable,
            FailureKind::DockerInstallFailed,
            FailureKind::EngineError,
            FailureKind::DiskFull,
            FailureKind::Contended,
        ] {
            let e = ControllerError::Agent { host: "h".into(), call: "Converge", failure: Box::new(failure(kind)) };
            assert!(e.hint().is_some(), "{kind:?}");
        }
    }
}
