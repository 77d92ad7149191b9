//! Host facts and metrics: `/proc` and `statvfs(2)`.
//!
//! Everything here is cheap (a few small file reads), so it is computed on
//! each request rather than cached; the heartbeat keeps the one piece of
//! state it needs (the previous CPU counters) itself.

use std::path::Path;

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
    fn reads_this_machine() {
        let (total, avail) = memory();
        assert!(total > 0 && avail <= total);
        let (dt, da) = disk(Path::new("/definitely/not/here"));
        assert!(dt > 0 && da <= dt, "falls back to an existing ancestor");
        assert!(self_rss() > 0);
    }
}

/// Who holds local `port` (listening TCP, or bound UDP), as `name (pid N)`:
/// read from `/proc/net/{tcp,tcp6,udp,udp6}` (socket inode), then the
/// `/proc/<pid>/fd` links. `None` when no socket or no holder is found.
pub fn port_holder(port: u16, udp: bool) -> Option<String> {
    let tables: &[&str] = if udp { &["/proc/net/udp", "/proc/net/udp6"] } else { &["/proc/net/tcp", "/proc/net/tcp6"] };
    let mut inodes = std::collections::BTreeSet::new();
    for table in tables {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let listening = if udp { *state == "07" } else { *state == "0A" };
            let local_port = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if listening && local_port == Some(port) && *inode != "0" {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref())) {
                let name = read_trimmed(&format!("/proc/{pid}/comm"));
                return Some(format!("{name} (pid {pid})"));
            }
        }
    }
    None
}

#[cfg(test)]
mod port_tests {
    #[test]
    fn the_holder_of_a_listening_port_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let holder = super::port_holder(port, false).expect("this process holds it");
        assert!(holder.ends_with(&format!("(pid {})", std::process::id())), "{holder}");
        drop(listener);
        assert_eq!(super::port_holder(port, false), None);
    }
}
