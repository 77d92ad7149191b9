//! The command line, as clap sees it, and its translation into the
//! options of `mlops_controller::commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mlops_controller::rollout::{Count, RolloutOptions};

#[derive(Parser)]
#[command(
    name = "mlopsctl",
    version,
    about = "Deploy the MLOps platform to one or many Linux hosts and keep it healthy",
    after_help = "With neither --host nor --inventory, mlopsctl acts on this machine (no SSH).\n\nExit codes: 0 success; 1 at least one host failed; 2 bad flags, inventory or configuration."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct Global {
    /// A host to act on, as [USER@]HOST[:PORT] (repeatable). `local` means this machine.
    #[arg(long = "host", value_name = "USER@HOST[:PORT]", global = true)]
    pub hosts: Vec<String>,
    /// An Ansible inventory: YAML, INI, `ansible-inventory --list` JSON, a script, or a directory of them.
    #[arg(short = 'i', long, value_name = "FILE", global = true)]
    pub inventory: Option<PathBuf>,
    /// Only inventory hosts matching this pattern (names, groups, `*` globs, `!x`, `&x`).
    #[arg(long, value_name = "PATTERN", global = true)]
    pub limit: Option<String>,
    /// A private key to try first (repeatable).
    #[arg(long = "identity", value_name = "FILE", global = true)]
    pub identities: Vec<PathBuf>,
    /// known_hosts file [default: ~/.ssh/known_hosts]
    #[arg(long, value_name = "FILE", global = true)]
    pub known_hosts: Option<PathBuf>,
    /// Record the keys of hosts not yet in known_hosts (a changed key is still refused).
    #[arg(long, global = true)]
    pub accept_new_host_keys: bool,
    /// OpenSSH client configuration to honour [default: ~/.ssh/config]
    #[arg(long, value_name = "FILE", global = true)]
    pub ssh_config: Option<PathBuf>,
    /// Seconds allowed for connecting and authenticating to a host.
    #[arg(long, value_name = "SECS", default_value_t = 15, global = true)]
    pub connect_timeout: u64,
    /// Hosts handled at once.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000), global = true)]
    pub forks: u16,
    /// The controller's state (CA, credentials) [default: $MLOPS_STATE_DIR, else ~/.local/state/mlopsctl]
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// The agent binary to push [default: mlops-agent next to mlopsctl]
    #[arg(long, value_name = "FILE", env = "MLOPS_AGENT_BINARY", global = true)]
    pub agent_binary: Option<PathBuf>,
    /// Output format of the result (progress always goes to stderr).
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// Every progress line as it happens (on a terminal the default is one live line per host).
    #[arg(short = 'v', long, global = true)]
    pub verbose: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Which stack: a directory with a Compose file, or just a project name.
#[derive(Args, Clone, Default)]
pub struct StackArgs {
    /// A directory holding compose.yaml (or the Compose file itself).
    #[arg(long, value_name = "DIR")]
    pub stack: Option<PathBuf>,
    /// Project name [default: the Compose file's `name:`, else the directory's name]
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
    /// Enable a Compose profile (repeatable).
    #[arg(long = "profile", value_name = "NAME")]
    pub profiles: Vec<String>,
    /// Leave a service out (repeatable), e.g. `--skip grafana` where no registry can supply its image.
    #[arg(long = "skip", value_name = "SERVICE")]
    pub skip: Vec<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Install or upgrade the agent on each host, then Docker, the stack's files and the stack (default: the MLOps platform).
    Deploy {
        #[command(flatten)]
        stack: StackArgs,
        /// Only install or upgrade the agent; no stack.
        #[arg(long, conflicts_with = "stack")]
        no_stack: bool,
        /// Fail instead of installing Docker where no engine answers.
        #[arg(long)]
        no_docker_install: bool,
        /// Publish the stack's ports on every address instead of 127.0.0.1 (sets MLOPS_BIND_ADDRESS=0.0.0.0).
        #[arg(long)]
        expose: bool,
        /// Seconds each service may take to become healthy.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        health_timeout: u32,
        /// Re-key agents that another controller installed (they stop trusting it); without this they are left alone.
        #[arg(long)]
        take_over: bool,
        /// Never take images from this machine's Docker engine (by default an `image:` no host has is shipped from it when it has it; DOCKER_HOST, unix:// only, names it).
        #[arg(long)]
        no_local_images: bool,
        /// Refuse to start an image build on a host whose Docker data directory has less free space than this (e.g. 5G, 500M; 0: no floor).
        #[arg(long, value_name = "SIZE", default_value = "5G", value_parser = parse_size)]
        min_free_space: u64,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Show per host what `deploy` with the same flags would do, and why; changes nothing.
    Plan {
        #[command(flatten)]
        stack: StackArgs,
        /// Plan as if Docker could not be installed where no engine answers.
        #[arg(long)]
        no_docker_install: bool,
        /// As deploy's --expose.
        #[arg(long)]
        expose: bool,
        /// As deploy's --health-timeout (a deploy's; the plan waits for nothing).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        health_timeout: u32,
        /// As deploy's --no-local-images.
        #[arg(long)]
        no_local_images: bool,
        /// As deploy's --min-free-space.
        #[arg(long, value_name = "SIZE", default_value = "5G", value_parser = parse_size)]
        min_free_space: u64,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Print the stack as mlopsctl will run it, like `docker compose config`: interpolated, anchors and merges expanded, env_file merged, profiles and --skip applied, secrets masked; Compose YAML (JSON with --output json) that reads back into the same model. Contacts no host; a bad Compose file is the positioned error (exit 2) a deploy would give.
    Config {
        #[command(flatten)]
        stack: StackArgs,
        /// Only the names of the services that would run, one per line.
        #[arg(long)]
        services: bool,
    },
    /// Ask each host's agent how it is (and the stack's services, with --stack or --project).
    Status {
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Sync the stack's files to each host (no containers change).
    Sync {
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Remove the stack's containers and networks; volumes stay unless --volumes.
    Down {
        #[command(flatten)]
        stack: StackArgs,
        /// Also remove the stack's named volumes (their data is lost).
        #[arg(long)]
        volumes: bool,
    },
    /// Show the stack's credentials as its hosts hold them (root only on each host); hosts that disagree are reported.
    Secrets {
        #[command(subcommand)]
        command: Option<SecretsCommand>,
        #[command(flatten)]
        stack: StackArgs,
        /// Show this controller's copy (the state directory, mode 0600) without asking the hosts.
        #[arg(long)]
        cached: bool,
    },
    /// Open a service's web UI: through an SSH tunnel for a remote host; prints the local URL.
    Ui {
        /// The UI (see the access table: airflow, spark-master, prometheus, ...).
        name: String,
        #[command(flatten)]
        stack: StackArgs,
        /// Local port for the tunnel [default: the UI's own port, else any free one]
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
    },
    /// Follow the stack's service state and health transitions (from Docker events) until interrupted.
    Watch {
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Show a service's logs.
    Logs {
        /// The service.
        service: String,
        #[command(flatten)]
        stack: StackArgs,
        /// Keep streaming new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (0: all).
        #[arg(long, value_name = "N", default_value_t = 0)]
        tail: u32,
        /// Only lines from the last DURATION (e.g. 10m, 1h30m).
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
    },
    /// Manage the agent itself.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Manage the controller's certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Operators: other controllers (people, CI runners) that deploy the same hosts, each with its own identity.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// The controller's own state (CA or operator identity, revocation list, secrets cache): sealed export and import.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Print the inventory (-i, with --limit) as mlopsctl reads it, in the JSON `ansible-inventory --list` prints: any form Ansible reads (YAML, INI, --list JSON, a script, a directory), group_vars/ and host_vars/ applied; each host's connection variables checked as a deploy checks them.
    Inventory,
    /// Print a shell completion script, e.g. `mlopsctl completions bash > /etc/bash_completion.d/mlopsctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (mlopsctl(1) and one per command, mlopsctl-deploy(1) and so on) into DIR.
    Man {
        /// Where to write them, e.g. /usr/local/share/man/man1.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// The revisions each host keeps of the stack, and what was done to it, when, and by which operator.
    History {
        #[command(flatten)]
        stack: StackArgs,
        /// The newest N entries per host (0: all the agent keeps).
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: u32,
    },
    /// Move the stack with its data to another host: deploy it there, stop it here, move every named volume, start it there healthy; the old host is kept stopped (or removed with --decommission).
    Migrate {
        #[command(flatten)]
        stack: StackArgs,
        /// The host the stack runs on: an inventory name, or USER@HOST[:PORT].
        #[arg(long, value_name = "HOST")]
        from: String,
        /// The host it moves to: an inventory name, or USER@HOST[:PORT].
        #[arg(long, value_name = "HOST")]
        to: String,
        /// Print the steps, the sizes of what would move (read on the old host) and an estimate of the transfer time; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Once the stack runs healthy on the new host, remove it, its volumes and the agent from the old one.
        #[arg(long)]
        decommission: bool,
        /// Seconds each service gets to stop (SIGTERM) before it is killed.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        stop_timeout: u32,
        /// Seconds each service may take to become healthy on the new host.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        health_timeout: u32,
        /// Fail instead of installing Docker on the new host when no engine answers.
        #[arg(long)]
        no_docker_install: bool,
        /// As deploy's --expose, on the new host.
        #[arg(long)]
        expose: bool,
        /// As deploy's --no-local-images.
        #[arg(long)]
        no_local_images: bool,
        /// Also move the metrics' volumes (Prometheus's and Grafana's data: `x-mlops.migrate.optional`).
        #[arg(long)]
        with_metrics: bool,
    },
    /// Copy the running stack's data from one host (--host, or -i … --limit) to a directory here: its database dump and every named volume, zstd-compressed, with a manifest of lengths, sha256 sums and row counts, and the stack's secrets (0600).
    Backup {
        #[command(flatten)]
        stack: StackArgs,
        /// Where backups go, as DIR/PROJECT/TIME-HOST/ [default: the state directory's backups/]; with --to-host, an absolute directory on that host, root's alone [default: its agent's /var/lib/mlops-agent/backups/].
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        /// Keep the backup on this host (an inventory name, or USER@HOST) instead of this machine: the data streams from one agent to the other through mlopsctl, compressed and checked there.
        #[arg(long, value_name = "HOST")]
        to_host: Option<String>,
        /// Also copy the metrics' volumes (Prometheus's and Grafana's data: `x-mlops.migrate.optional`).
        #[arg(long)]
        with_metrics: bool,
        /// Then remove the oldest backups of the stack from this host beyond N (0: keep all); with --schedule, how many the host keeps.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep: usize,
        /// Instead of a backup now: the host's agent takes one every EVERY (30s, 15m, 6h, 1d) into its own /var/lib/mlops-agent/backups/PROJECT/, keeping --keep N; `off` removes the schedule (the backups stay), `show` prints it.
        #[arg(long, value_name = "EVERY|off|show")]
        schedule: Option<String>,
    },
    /// Bring a backup back onto one host (--host, or -i … --limit), the one it was taken from or another: every file checked first, the data replaced, row counts compared with the dump's, the stack started healthy.
    Restore {
        #[command(flatten)]
        stack: StackArgs,
        /// The backup's directory, as `mlopsctl backup` printed it; with --from-host, its directory on that host, its name in that host's backups/ (where scheduled backups go), or `latest`.
        #[arg(value_name = "BACKUP")]
        backup: PathBuf,
        /// The host (an inventory name, or USER@HOST) that keeps the backup (`backup --to-host`, or its own scheduled backups): it is fetched to this machine first.
        #[arg(long, value_name = "HOST")]
        from_host: Option<String>,
        /// Seconds each service gets to stop (SIGTERM) before it is killed.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        stop_timeout: u32,
        /// Seconds each service may take to become healthy.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        health_timeout: u32,
        /// Fail instead of installing Docker when no engine answers.
        #[arg(long)]
        no_docker_install: bool,
        /// As deploy's --expose.
        #[arg(long)]
        expose: bool,
        /// As deploy's --no-local-images.
        #[arg(long)]
        no_local_images: bool,
    },
    /// The stack's Airflow accounts (FAB auth manager): list, add, remove, set-role, set-password; through Airflow's API on the host that runs it, as the stack's admin.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Return each host to a revision its agent keeps: the one before the newest, or --to N, or --to-deploy ID.
    Rollback {
        #[command(flatten)]
        stack: StackArgs,
        /// The revision number (`mlopsctl history` lists them per host).
        #[arg(long, value_name = "N", conflicts_with = "to_deploy")]
        to: Option<u64>,
        /// The newest revision each host keeps from this deploy (the DEPLOY column of `mlopsctl history`).
        #[arg(long, value_name = "ID")]
        to_deploy: Option<String>,
        /// Seconds each service may take to become healthy.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        health_timeout: u32,
        /// Seconds a changed service without a health check must keep running to count as healthy.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        min_healthy_time: u32,
    },
}

/// How `deploy` rolls over its hosts.
#[derive(Args)]
pub struct RolloutArgs {
    /// Deploy N hosts (or N% of them) at a time, each batch healthy before the next starts.
    #[arg(long, value_name = "N|N%")]
    pub serial: Option<Count>,
    /// Failed hosts the rollout tolerates before it stops [default: 0].
    #[arg(long, value_name = "N|N%", requires = "serial")]
    pub max_fail: Option<Count>,
    /// Keep a failed revision on its host for inspection (by default the host returns to its last revision).
    #[arg(long)]
    pub no_rollback: bool,
    /// Seconds a changed service without a health check must keep running to count as healthy [default: 10 with --serial, else 0].
    #[arg(long, value_name = "SECS")]
    pub min_healthy_time: Option<u32>,
}

impl From<RolloutArgs> for RolloutOptions {
    fn from(a: RolloutArgs) -> Self {
        RolloutOptions {
            serial: a.serial,
            max_fail: a.max_fail,
            no_rollback: a.no_rollback,
            min_healthy_seconds: a.min_healthy_time,
        }
    }
}

/// How a bundle or export is sealed: age recipients, else a passphrase.
#[derive(Args)]
pub struct SealArgs {
    /// Seal to this age recipient (`age1...`, repeatable) instead of a passphrase.
    #[arg(long, value_name = "AGE_RECIPIENT")]
    pub recipient: Vec<String>,
    /// Read the passphrase from the first line of FILE (`-`: stdin) [default: $MLOPS_PASSPHRASE].
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// How a bundle or export is opened: an age identity, else a passphrase.
#[derive(Args)]
pub struct OpenArgs {
    /// Open with this age identity file [default: $MLOPS_AGE_IDENTITY, else a passphrase].
    #[arg(long, value_name = "FILE")]
    pub age_identity: Option<PathBuf>,
    /// Read the passphrase from the first line of FILE (`-`: stdin) [default: $MLOPS_PASSPHRASE].
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Give operator NAME an identity under this controller's root CA, sealed into one bundle (on stdout, or --out).
    Add {
        name: String,
        #[command(flatten)]
        seal: SealArgs,
        /// Write the bundle to FILE (mode 0600; never over an existing file).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Become an operator with a bundle from `operator add`, in a new state directory (CI: set MLOPS_OPERATOR_BUNDLE instead).
    Join {
        /// The bundle file [default: $MLOPS_OPERATOR_BUNDLE, its text or a path].
        bundle: Option<PathBuf>,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// This controller's operator name, and the operators it added.
    List,
    /// Revoke operator NAME and give the revocation list to the hosts named (agents then refuse NAME).
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum StateCommand {
    /// Seal the state directory's CA, identities and secrets cache into FILE (mode 0600).
    Export {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        seal: SealArgs,
    },
    /// Open an export into a state directory that has no CA yet (--state-dir).
    Import {
        file: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
    },
}

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Change secret NAME everywhere it is used (the stack's rotation steps, e.g. ALTER ROLE), healthy before and after.
    Rotate {
        name: String,
        #[command(flatten)]
        stack: StackArgs,
        /// Seconds each service may take to become healthy again.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        health_timeout: u32,
        /// As the stack was deployed: its ports published on every address.
        #[arg(long)]
        expose: bool,
    },
}

#[derive(Subcommand)]
pub enum UsersCommand {
    /// Every account with its roles, email, and last login.
    List {
        #[command(flatten)]
        stack: StackArgs,
    },
    /// A new account with one role (Admin, Op, User, Viewer, or a role made in Airflow). Its password comes from stdin with --password-stdin; else one is generated and printed once.
    Add {
        name: String,
        /// The account's role, e.g. Viewer (sees everything, changes nothing), User, Op, Admin.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// Its email [default: NAME@localhost]; Airflow takes each email once.
        #[arg(long, value_name = "EMAIL")]
        email: Option<String>,
        /// Read the password from standard input (one line), never from the command line.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Remove an account (its tokens stop working within Airflow's user cache time, 30 s by default).
    Remove {
        name: String,
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Give an account this one role instead of the ones it has.
    SetRole {
        name: String,
        role: String,
        #[command(flatten)]
        stack: StackArgs,
    },
    /// A new password for an account: from stdin with --password-stdin, else generated and printed once. API tokens it already holds stay valid until they expire (Airflow's jwt_expiration_time, a day by default); `remove` or `set-role` cut access within 30 s.
    SetPassword {
        name: String,
        /// Read the password from standard input (one line), never from the command line.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        stack: StackArgs,
    },
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make a new CA and re-key every host's agent with it, trusting both CAs during the switch (resumable).
    Rotate,
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Stop the agent and remove it from each host.
    Uninstall {
        /// Keep the agent's state directory (/var/lib/mlops-agent).
        #[arg(long)]
        keep_state: bool,
    },
}

impl Global {
    /// The library's view of the global flags.
    pub fn options(&self) -> mlops_controller::commands::GlobalOptions {
        mlops_controller::commands::GlobalOptions {
            hosts: self.hosts.clone(),
            inventory: self.inventory.clone(),
            limit: self.limit.clone(),
            identities: self.identities.clone(),
            known_hosts: self.known_hosts.clone(),
            accept_new_host_keys: self.accept_new_host_keys,
            ssh_config: self.ssh_config.clone(),
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout),
            forks: usize::from(self.forks),
            state_dir: self.state_dir.clone(),
            agent_binary: self.agent_binary.clone(),
            take_over: false,
        }
    }
}

impl From<StackArgs> for mlops_controller::commands::StackOptions {
    fn from(a: StackArgs) -> Self {
        mlops_controller::commands::StackOptions {
            stack: a.stack,
            project: a.project,
            profiles: a.profiles,
            skip: a.skip,
            vars: Vec::new(),
        }
    }
}

/// A size as `--min-free-space` takes it: as Compose writes sizes
/// ([`mlops_compose::parse_bytes`]), not negative.
fn parse_size(s: &str) -> Result<u64, String> {
    match mlops_compose::parse_bytes(s) {
        Some(n) if n >= 0 => Ok(n as u64),
        _ => Err(format!("`{s}`: expected a size such as 5G, 500M or 0")),
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks, and every subcommand parsed once:
    /// a subcommand's flag that shares a global flag's name (as `--limit`
    /// would) is found only when the derive reads it, so each is read here.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::{CommandFactory, Parser};
        super::Cli::command().debug_assert();
        let lines = [
            "deploy --take-over --skip grafana --min-free-space 0",
            "plan --min-free-space 20G",
            "secrets --cached",
            "secrets rotate POSTGRES_PASSWORD --project p",
            "ui airflow --port 1",
            "status",
            "config --services --profile debug --skip x",
            "inventory --limit web",
            "completions zsh",
            "man --out d",
            "sync",
            "down --volumes",
            "watch",
            "logs airflow-scheduler --tail 5",
            "agent uninstall",
            "pki rotate",
            "operator add bob --recipient age1x --out f",
            "operator join f --age-identity k",
            "operator list",
            "operator remove bob",
            "state export --out f --passphrase-file p",
            "state import f --passphrase-file p",
            "history --last 5 --limit web",
        ];
        for line in lines {
            let argv = std::iter::once("mlopsctl").chain(line.split_whitespace());
            if let Err(e) = super::Cli::try_parse_from(argv) {
                panic!("`{line}`: {e}");
            }
        }
    }

    #[test]
    fn sizes_read_as_compose_writes_them() {
        use super::parse_size;
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("500m"), Ok(500 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "G", "5x", "-1G", "five"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
