//! The wire contract between the controller and the agent.
//!
//! `proto/agent.proto` is the source of truth; this crate compiles it and
//! adds what both sides share: constants, the agent's file layout, the
//! install-bundle hash, and [`net::QuickAck`] for the sockets on the path.

#![allow(clippy::all, clippy::pedantic, unreachable_pub)]

pub mod backup;
pub mod der;
pub mod ignore;
pub mod net;
pub mod stack;

/// Generated types and service stubs for `mlops.agent.v1`.
pub mod v1 {
    tonic::include_proto!("mlops.agent.v1");
}

/// The API level this build speaks. Bump it when an RPC or a field that the
/// controller relies on is added: a controller that sees an agent with a
/// lower level upgrades the agent before using the newer calls.
///
/// Level 3: `StackEvent.action` is a `StackAction`, and every error carries
/// a `Failure` in its status details.
/// Level 4: `GetSecrets` and `PutSecrets` (a project's credentials are
/// kept on its hosts).
/// Level 5: `ImagePlan`, `BuildImages`, `SaveImage`, `LoadImage` and
/// `TagImage` (images built once and shipped between hosts).
/// Level 6: revisions (`Revisions`, `Rollback`; a failed converge returns
/// the host to its newest revision), minimum healthy time.
/// Level 7: `StopServices`, `ExportData`, `ImportData` (a project's data
/// moves between hosts: `migrate`).
/// Level 8: `DataSource.input_trailer` (an import into a command proves it
/// read its input to the end), `StopServicesRequest.waves`.
/// Level 9: `DataSource.live` (a running stack's volumes exported for a
/// backup), `BackupSchedule` (backups the agent takes on its own schedule).
/// Level 10: `StoreBackup`, `ReadBackup` (backups kept on another host),
/// `FailureKind::Contended`.
pub const API_LEVEL: u32 = 10;

/// The largest piece of an image tarball in one `ImageChunk` (agents and
/// the controller both cut to it).
pub const IMAGE_CHUNK: usize = 1 << 20;

/// sha256 (hex) of what makes an agent's configuration current for a
/// controller: the CAs it trusts and its port. The controller hashes the
/// bundle it sends; the agent rebuilds the bundle from the configuration
/// it runs with and reports the same hash in `Hello`. prost encodes fields
/// in order, so equal bundles give equal bytes.
///
/// Left out: the host's own certificate and key, and the revocation list.
/// Another operator's controller (under the same root) issues the host a
/// different but equally valid certificate, and two operators must not
/// re-key each other's agents on every deploy; the TLS handshake already
/// checks that certificate (chain, host name, expiry, revocation), and an
/// agent whose certificate fails it is re-installed. The list is compared
/// by its number (`HelloResponse.crl_number`).
pub fn bundle_sha256(bundle: &v1::InstallBundle) -> String {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let judged = v1::InstallBundle {
        ca_pem: bundle.ca_pem.clone(),
        port: bundle.port,
        controller_version: bundle.controller_version.clone(),
        ..Default::default()
    };
    hex::encode(Sha256::digest(judged.encode_to_vec()))
}

/// The sha256 of a sync manifest's entries, in order (the protobuf
/// encoding of the manifest without its root): a converge checks that the
/// staged tree it writes the stack's files from holds what its deploy
/// synced (`ConvergeRequest.staged_digest`).
pub fn manifest_digest(entries: &[v1::SyncEntry]) -> String {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let manifest = v1::SyncManifest { root: String::new(), entries: entries.to_vec() };
    hex::encode(Sha256::digest(manifest.encode_to_vec()))
}

/// Whether `name` can name a secret: a shell-style variable name
/// (`[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes), as Compose interpolation
/// reads it. The controller checks `x-mlops.secrets` with it and the agent
/// every name it is asked to store.
pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Default loopback port the agent listens on.
pub const DEFAULT_AGENT_PORT: u16 = 7443;

/// `n` bytes as people read them: `512 B`, `1.5 KiB`, `3.2 GiB` (binary
/// units, one decimal), the same on both sides of the wire.
pub fn bytes_human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// Where the agent lives on a host. Shared because the controller's probe
/// (a shell script run over SSH before the agent may exist) reads the same
/// paths the agent writes.
pub mod layout {
    /// The agent binary.
    pub const BINARY: &str = "/usr/local/lib/mlops-agent/mlops-agent";
    pub const BINARY_DIR: &str = "/usr/local/lib/mlops-agent";
    /// Configuration: `agent.json`, `tls/`, `install.sha256`.
    pub const CONFIG_DIR: &str = "/etc/mlops-agent";
    /// sha256 (hex) of the last install bundle; world-readable, holds no secret.
    pub const INSTALL_HASH: &str = "/etc/mlops-agent/install.sha256";
    /// The CA certificates whose clients the agent accepts.
    pub const TLS_CA: &str = "/etc/mlops-agent/tls/ca.pem";
    /// The revocation list the agent enforces (with `crl.number` beside it).
    pub const TLS_CRL: &str = "/etc/mlops-agent/tls/crl.pem";
    /// State the agent keeps (synced files, stacks, in later versions).
    pub const STATE_DIR: &str = "/var/lib/mlops-agent";
    /// The pidfile of the plain daemon (hosts without systemd).
    pub const RUN_DIR: &str = "/run/mlops-agent";
    pub const PIDFILE: &str = "/run/mlops-agent/agent.pid";
    /// Log of the plain daemon; under systemd the journal has it.
    pub const LOG_DIR: &str = "/var/log/mlops-agent";
    pub const LOG_FILE: &str = "/var/log/mlops-agent/agent.log";
    pub const SYSTEMD_UNIT: &str = "/etc/systemd/system/mlops-agent.service";
    pub const SERVICE_NAME: &str = "mlops-agent.service";
}

/// How a [`v1::Failure`] travels: in the details of a gRPC status, so that
/// unary calls and streams carry it the same way.
pub mod failure {
    use prost::Message;

    use crate::v1::{Failure, FailureKind};

    /// The status an agent returns for `failure`: the code follows the kind
    /// (for gRPC-generic clients), the details carry the whole failure.
    pub fn into_status(failure: &Failure) -> tonic::Status {
        use tonic::Code;
        let code = match failure.kind() {
            FailureKind::BadRequest => Code::InvalidArgument,
            FailureKind::NotFound => Code::NotFound,
            FailureKind::StackLocked | FailureKind::CredentialChanged => Code::FailedPrecondition,
            FailureKind::DiskFull => Code::ResourceExhausted,
            FailureKind::EngineUnreachable | FailureKind::ShuttingDown => Code::Unavailable,
            FailureKind::Contended => Code::Aborted,
            FailureKind::Timeout => Code::DeadlineExceeded,
            FailureKind::DockerInstallFailed
            | FailureKind::BuildFailed
            | FailureKind::ImageMissing
            | FailureKind::PortInUse
            | FailureKind::HealthCheckFailed
            | FailureKind::ServiceExited => Code::Aborted,
            FailureKind::EngineError | FailureKind::Io | FailureKind::Internal | FailureKind::Unspecified => {
                Code::Internal
            }
        };
        tonic::Status::with_details(code, failure.message.clone(), failure.encode_to_vec().into())
    }

    /// The failure a status carries; `None` for a status the agent did not
    /// send (the connection broke, or something between the two answered).
    pub fn from_status(status: &tonic::Status) -> Option<Failure> {
        if status.details().is_empty() {
            return None;
        }
        Failure::decode(status.details()).ok().filter(|f| f.kind() != FailureKind::Unspecified)
    }
}
