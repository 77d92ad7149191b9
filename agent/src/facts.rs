//! Host facts and metrics: `/proc`, `statvfs(2)` and the Docker socket.
//!
//! Everything here is cheap (a few small file reads), so it is computed on
//! each request rather than cached; the heartbeat keeps the one piece of
//! state it needs (the previous CPU counters) itself.

use std::path::Path;
use std::time::Duration;

use mlops_proto::v1::DockerStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `PRETTY_NAME` from os-release, else the kernel name.
pub fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string())
}

pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// (total, available) bytes from `/proc/meminfo`.
pub fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// (total, available to unprivileged users) bytes of the filesystem holding `path`
/// (or its nearest existing ancestor).
#[allow(unsafe_code)]
pub fn disk(path: &Path) -> (u64, u64) {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => return (0, 0),
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return (0, 0) };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
    // zeroed out-parameter that statvfs fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize;
    (st.f_blocks * frsize, st.f_bavail * frsize)
}

/// Seconds since boot.
pub fn host_uptime() -> u64 {
    read_trimmed("/proc/uptime").split_whitespace().next().and_then(|s| s.parse::<f64>().ok()).map_or(0, |s| s as u64)
}

pub fn load1() -> f64 {
    read_trimmed("/proc/loadavg").split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0)
}

/// Resident set size of this process.
pub fn self_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Aggregate CPU counters from `/proc/stat`: (busy, total) jiffies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        Self::parse(text.lines().next().unwrap_or_default())
    }

    fn parse(line: &str) -> Self {
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|s| s.parse().ok()).collect();
        let total: u64 = v.iter().take(8).sum();
        // idle + iowait are not busy.
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        CpuTimes { busy: total.saturating_sub(idle), total }
    }

    /// Busy fraction between two readings.
    pub fn busy_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Asks the Docker engine for its version over its socket.
///
/// A plain HTTP/1.0 request keeps this check free of a Docker client
/// library; the engine work (later) uses the full API.
pub async fn docker_status(socket: &Path) -> DockerStatus {
    let attempt = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream.write_all(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n").await?;
        let mut buf = Vec::new();
        stream.take(256 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let reply = match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return DockerStatus {
                available: false,
                error: format!("{}: {e}", socket.display()),
                ..Default::default()
            };
        }
        Err(_) => {
            return DockerStatus {
                available: false,
                error: format!("{}: no answer within 3 s", socket.display()),
                ..Default::default()
            };
        }
    };
    parse_version_reply(&reply)
}

fn parse_version_reply(reply: &[u8]) -> DockerStatus {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        return DockerStatus {
            available: false,
            error: format!("unexpected answer: {}", head.lines().next().unwrap_or_default()),
            ..Default::default()
        };
    }
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    DockerStatus {
        available: true,
        version: json["Version"].as_str().unwrap_or_default().to_string(),
        api_version: json["ApiVersion"].as_str().unwrap_or_default().to_string(),
        error: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_busy_fraction() {
        let a = CpuTimes::parse("cpu  100 0 100 700 100 0 0 0 0 0");
        let b = CpuTimes::parse("cpu  200 0 200 1400 200 0 0 0 0 0");
        assert_eq!(a.total, 1000);
        assert!((b.busy_since(&a) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn docker_version_reply() {
        let ok = parse_version_reply(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Version\":\"20.10.24\",\"ApiVersion\":\"1.41\"}");
        assert!(ok.available);
        assert_eq!(ok.api_version, "1.41");
        let bad = parse_version_reply(b"HTTP/1.0 500 Internal Server Error\r\n\r\n");
        assert!(!bad.available);
        assert!(bad.error.contains("500"));
    }

    #[tokio::test]
    async fn no_socket_is_reported_not_fatal() {
        let s = docker_status(Path::new("/nonexistent/docker.sock")).await;
        assert!(!s.available);
        assert!(s.error.contains("/nonexistent/docker.sock"));
    }

    #[test]
    fn reads_this_machine() {
        let (total, avail) = memory();
        assert!(total > 0 && avail <= total);
        let (dt, da) = disk(Path::new("/definitely/not/here"));
        assert!(dt > 0 && da <= dt, "falls back to an existing ancestor");
        assert!(self_rss() > 0);
    }
}
