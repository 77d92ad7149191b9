//! Reaching the Docker engine, and installing one where none answers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bollard::Docker;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::EngineError;

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// A connection to the engine at `socket`, at the API version the engine
/// speaks (bollard would otherwise ask for a newer one and every call would
/// fail on an older engine). The version comes from `/_ping`'s headers:
/// bollard's `negotiate_version` asks `/version`, for which dockerd runs
/// `runc --version` and `docker-init --version` and asks containerd, every
/// time (most of a no-op deploy's cost on the engine's side).
pub async fn connect(socket: &Path) -> Result<Docker, EngineError> {
    let no_engine = |message: String| EngineError::NoEngine { socket: socket.display().to_string(), message };
    let ping = ping(socket).await.map_err(no_engine)?;
    let ours = bollard::API_DEFAULT_VERSION;
    let version = match parse_api_version(&ping.api_version) {
        Some((major, minor)) if (major, minor) < (ours.major_version, ours.minor_version) => {
            bollard::ClientVersion { major_version: major, minor_version: minor }
        }
        _ => *ours,
    };
    Docker::connect_with_unix(&socket.to_string_lossy(), 600, &version).map_err(|e| no_engine(e.to_string()))
}

/// What `/_ping` says about the engine: its version (`Server` header) and
/// API version (`Api-Version`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ping {
    pub server_version: String,
    pub api_version: String,
}

/// `GET /_ping` over the socket, by hand (bollard's `ping` drops the
/// headers), within 5 s.
pub async fn ping(socket: &Path) -> Result<Ping, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
        stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").await.map_err(|e| e.to_string())?;
        // The answer is a few headers and "OK"; only the headers matter
        // (read up to their end, in case the other side keeps the
        // connection open); more than 16 KiB of them is not an engine.
        let mut answer = Vec::new();
        let mut buf = [0u8; 2048];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        parse_ping(&String::from_utf8_lossy(&answer))
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("{}: no answer within 5 s", socket.display())),
    }
}

/// What Docker's data takes, from `GET /system/df` (by hand: bollard
/// reads the newer API's shape of it, which API 1.41 engines do not send),
/// within 20 s: (images' layers, containers' writable layers, volumes,
/// build cache), in bytes.
pub async fn disk_usage(socket: &Path) -> Result<(u64, u64, u64, u64), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
        // HTTP/1.0: the engine closes the connection after a body that is
        // not chunked.
        stream.write_all(b"GET /v1.41/system/df HTTP/1.0\r\nHost: docker\r\n\r\n").await.map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        // A report of many thousands of images stays far below this.
        (&mut stream).take(64 << 20).read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
        parse_disk_usage(&answer)
    };
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .unwrap_or_else(|_| Err(format!("{}: /system/df gave no answer within 20 s", socket.display())))
}

fn parse_disk_usage(answer: &[u8]) -> Result<(u64, u64, u64, u64), String> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("/system/df: no complete answer")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("/system/df answered `{}`", status.chars().take(80).collect::<String>()));
    }
    let df: serde_json::Value =
        serde_json::from_slice(&answer[split + 4..]).map_err(|e| format!("/system/df: not JSON: {e}"))?;
    let sum = |list: &str, size: &dyn Fn(&serde_json::Value) -> Option<i64>| -> u64 {
        df[list].as_array().map_or(0, |items| items.iter().filter_map(size).map(|n| n.max(0) as u64).sum())
    };
    let images = df["LayersSize"].as_i64().unwrap_or(0).max(0) as u64;
    let containers = sum("Containers", &|c| c["SizeRw"].as_i64());
    // -1: the engine did not measure it (a volume of another driver).
    let volumes = sum("Volumes", &|v| v["UsageData"]["Size"].as_i64());
    let build_cache = sum("BuildCache", &|b| b["Size"].as_i64());
    Ok((images, containers, volumes, build_cache))
}

fn parse_ping(answer: &str) -> Result<Ping, String> {
    let mut lines = answer.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("/_ping answered `{}`", status.chars().take(80).collect::<String>()));
    }
    let mut ping = Ping::default();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "api-version" => ping.api_version = value.to_string(),
            // `Docker/20.10.24+dfsg1 (linux)`
            "server" => {
                if let Some(v) = value.strip_prefix("Docker/") {
                    ping.server_version = v.split_whitespace().next().unwrap_or_default().to_string();
                }
            }
            _ => {}
        }
    }
    if ping.api_version.is_empty() {
        return Err("/_ping answered without an Api-Version header: not a Docker engine?".into());
    }
    Ok(ping)
}

fn parse_api_version(v: &str) -> Option<(usize, usize)> {
    let (major, minor) = v.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether an engine answers, and what it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub available: bool,
    pub version: String,
    pub api_version: String,
    /// Why it is not available.
    pub error: String,
}

/// Whether an engine answers and what it is, from `/_ping` (or, for an
/// engine that names no version there, `GET /version`), or why there is
/// no answer.
pub async fn status(socket: &Path) -> EngineStatus {
    match ping(socket).await {
        Ok(p) if !p.server_version.is_empty() => {
            return EngineStatus {
                available: true,
                version: p.server_version,
                api_version: p.api_version,
                error: String::new(),
            };
        }
        Ok(_) => {}
        Err(message) => {
            let error = EngineError::NoEngine { socket: socket.display().to_string(), message }.to_string();
            return EngineStatus { available: false, error, ..Default::default() };
        }
    }
    let attempt = async {
        let docker = connect(socket).await?;
        let v = docker.version().await?;
        Ok::<_, EngineError>(v)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(v)) => EngineStatus {
            available: true,
            version: v.version.unwrap_or_default(),
            api_version: v.api_version.unwrap_or_default(),
            error: String::new(),
        },
        Ok(Err(e)) => EngineStatus { available: false, error: e.to_string(), ..Default::default() },
        Err(_) => EngineStatus {
            available: false,
            error: format!("{}: no answer within 5 s", socket.display()),
            ..Default::default()
        },
    }
}

/// Sends progress lines to the caller; a closed channel (caller gone) is ignored.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::Sender<String>,
}

impl Reporter {
    pub fn new(tx: mpsc::Sender<String>) -> Self {
        Reporter { tx }
    }

    pub async fn say(&self, message: impl Into<String>) {
        let _ = self.tx.send(message.into()).await;
    }
}

/// Makes sure an engine answers at `socket`; with `install`, installs
/// `docker.io` from the OS repository (Debian and Ubuntu) and starts it
/// (systemd where PID 1 is systemd, else `dockerd` as a daemon).
pub async fn ensure(
    socket: &Path,
    install: bool,
    log_dir: &Path,
    report: &Reporter,
) -> Result<EngineStatus, EngineError> {
    let current = status(socket).await;
    if current.available || !install {
        return Ok(current);
    }
    report.say(format!("no engine at {} ({})", socket.display(), current.error)).await;
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let family = format!("{} {}", field("ID"), field("ID_LIKE"));
    if !family.split_whitespace().any(|f| f == "debian" || f == "ubuntu") {
        return Err(EngineError::InstallFailed(format!(
            "cannot install Docker on `{}`: only Debian and Ubuntu are supported; install Docker yourself",
            field("PRETTY_NAME")
        )));
    }
    if which("dockerd").is_none() {
        let mut packages = vec!["docker.io"];
        // Debian's kernel enables AppArmor, and dockerd then refuses to
        // create any container unless `apparmor_parser` loads its default
        // profile; the `apparmor` package is only a Recommends of docker.io
        // (seen on a minimal Debian 12 VM).
        let apparmor =
            std::fs::read_to_string("/sys/module/apparmor/parameters/enabled").is_ok_and(|v| v.trim() == "Y");
        if apparmor && which("apparmor_parser").is_none() {
            packages.push("apparmor");
        }
        report.say(format!("installing {} from the OS repository", packages.join(" and "))).await;
        run_streaming("apt-get", &["update", "-q"], report).await?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&packages);
        run_streaming("apt-get", &args, report).await?;
    }
    let systemd = Path::new("/run/systemd/system").is_dir();
    if systemd {
        report.say("starting docker.service").await;
        run_streaming("systemctl", &["enable", "--now", "docker.service"], report).await?;
    } else {
        let dockerd = which("dockerd").ok_or_else(|| EngineError::InstallFailed("dockerd is not installed".into()))?;
        std::fs::create_dir_all(log_dir).map_err(EngineError::io_at("creating", log_dir))?;
        let log_path = log_dir.join("dockerd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(EngineError::io_at("opening", &log_path))?;
        report.say(format!("starting dockerd (no systemd; log {})", log_path.display())).await;
        // setsid: dockerd must outlive this agent process and its session.
        std::process::Command::new("setsid")
            .arg(dockerd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(EngineError::io("log file"))?)
            .stderr(log)
            .spawn()
            .map_err(EngineError::io("starting dockerd"))?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let s = status(socket).await;
        if s.available {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(EngineError::InstallFailed(format!("the engine did not answer within 90 s: {}", s.error)));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// How long a package install (or any command the engine runs) may take.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Runs a command, sending each output line as progress; fails with its
/// last lines when it fails, or when it runs past [`COMMAND_TIMEOUT`]
/// (it is killed).
pub async fn run_streaming(program: &str, args: &[&str], report: &Reporter) -> Result<(), EngineError> {
    tokio::time::timeout(COMMAND_TIMEOUT, run_streaming_inner(program, args, report)).await.unwrap_or_else(|_| {
        Err(EngineError::InstallFailed(format!(
            "`{program} {}` did not finish within {} minutes and was stopped",
            args.join(" "),
            COMMAND_TIMEOUT.as_secs() / 60
        )))
    })
}

async fn run_streaming_inner(program: &str, args: &[&str], report: &Reporter) -> Result<(), EngineError> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(EngineError::io(format!("running {program}")))?;
    // Both pipes feed one channel, so lines arrive in about the order printed.
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let pump = |reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>, tx: mpsc::Sender<String>| {
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).await.is_err() {
                    break;
                }
            }
        })
    };
    pump(Box::new(child.stdout.take().expect("piped")), tx.clone());
    pump(Box::new(child.stderr.take().expect("piped")), tx);
    let mut tail: Vec<String> = Vec::new();
    while let Some(l) = rx.recv().await {
        // A line is shown and kept whole up to 4 KiB.
        let l: String = l.chars().take(4096).collect();
        report.say(format!("{program}: {l}")).await;
        tail.push(l);
        if tail.len() > 10 {
            tail.remove(0);
        }
    }
    let status = child.wait().await.map_err(EngineError::io(format!("waiting for {program}")))?;
    if !status.success() {
        return Err(EngineError::InstallFailed(format!(
            "`{program} {}` failed ({status}): {}",
            args.join(" "),
            tail.join(" | ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_names_the_engine_and_its_api_version() {
        let answer = "HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nDocker-Experimental: false\r\nServer: Docker/20.10.24+dfsg1 (linux)\r\n\r\nOK";
        let p = parse_ping(answer).unwrap();
        assert_eq!((p.server_version.as_str(), p.api_version.as_str()), ("20.10.24+dfsg1", "1.41"));
        assert_eq!(parse_api_version(&p.api_version), Some((1, 41)));
        assert!(parse_ping("HTTP/1.0 404 Not Found\r\n\r\n").unwrap_err().contains("404"));
        assert!(parse_ping("HTTP/1.0 200 OK\r\nServer: nginx\r\n\r\nOK").unwrap_err().contains("Api-Version"));
        assert!(parse_ping("").is_err());
        assert_eq!(parse_api_version("1.x"), None);
    }

    #[test]
    fn disk_usage_sums_what_an_api_1_41_engine_reports() {
        let body = r#"{"LayersSize":1000,"Images":[{"Size":900}],"Containers":[{"SizeRw":10},{"SizeRw":5}],
            "Volumes":[{"UsageData":{"Size":300}},{"UsageData":{"Size":-1}}],"BuildCache":null}"#;
        let answer = format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
        assert_eq!(parse_disk_usage(answer.as_bytes()), Ok((1000, 15, 300, 0)));
        assert!(parse_disk_usage(b"HTTP/1.0 500 Internal\r\n\r\n{}").unwrap_err().contains("500"));
        assert!(parse_disk_usage(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
