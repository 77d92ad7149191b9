//! Running in the background, and telling whoever started us when we are
//! ready.
//!
//! - Under systemd (`Type=notify`), readiness is `READY=1` on
//!   `$NOTIFY_SOCKET`, so `systemctl restart` returns once the agent listens.
//! - Without systemd, `serve --daemonize` forks before any thread exists.
//!   The parent waits on a pipe until the child reports that it listens
//!   (or why it could not) and exits 0 or 1 accordingly, so the caller of
//!   `install` learns of a failure at once instead of from a later timeout.
//!   The child starts a new session, writes the pidfile and logs to a file.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The child's end of the readiness pipe.
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// Nobody waits (foreground run).
    pub fn none() -> Self {
        Readiness { pipe: None }
    }

    /// Reports success: the parent exits 0. Also notifies systemd when it
    /// started us.
    pub fn ready(mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"ok\n");
        }
        sd_notify("READY=1");
    }

    /// Reports failure: the parent prints `message` and exits 1.
    pub fn failed(mut self, message: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(format!("error: {message}\n").as_bytes());
        }
    }
}

/// Forks into the background. Returns in the child only; the parent exits
/// with the child's verdict. Must be called before any thread is started
/// (so before the tokio runtime).
pub fn daemonize(log_file: &Path) -> std::io::Result<Readiness> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = OpenOptions::new().create(true).append(true).mode(0o640).open(log_file)?;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a two-element array as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded at this point (documented precondition), so
    // the child may continue running Rust code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls on valid descriptors in the child.
            unsafe {
                libc::setsid();
                let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if devnull >= 0 {
                    libc::dup2(devnull, 0);
                    libc::close(devnull);
                }
                libc::dup2(log.as_raw_fd(), 1);
                libc::dup2(log.as_raw_fd(), 2);
            }
            std::env::set_current_dir("/")?;
            Ok(Readiness { pipe: Some(File::from(write_end)) })
        }
        _child => {
            drop(write_end);
            let mut verdict = String::new();
            let _ = File::from(read_end).read_to_string(&mut verdict);
            if verdict.starts_with("ok") {
                std::process::exit(0);
            }
            let message = verdict.trim();
            eprintln!(
                "{}",
                if message.is_empty() {
                    format!("error: the agent exited before it was ready; see {}", log_file.display())
                } else {
                    message.to_string()
                }
            );
            std::process::exit(1);
        }
    }
}

/// Writes our pid to `path` (atomically).
pub fn write_pidfile(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(tmp, path)
}

/// The pid in `path` if that process is alive.
pub fn read_live_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks for existence and permission.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0 && is_agent(pid)).then_some(pid)
}

/// Whether `pid` runs an `mlops-agent` executable (also one replaced on
/// disk since it started: "mlops-agent (deleted)"). A pidfile outlives its
/// process, and the number may since belong to anything else.
fn is_agent(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.trim_end_matches(" (deleted)") == "mlops-agent"
    })
}

/// Sends SIGTERM and waits up to `grace` for the process to go away, then
/// SIGKILL. Returns whether a process was stopped. The process is pinned
/// with a pidfd and checked to be an agent first, so a number reused by
/// another process meanwhile is never signalled.
pub fn stop_pid(pid: i32, grace: std::time::Duration) -> bool {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let Some(pidfd) = Pid::from_raw(pid).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok()) else {
        return false;
    };
    if !is_agent(pid) || pidfd_send_signal(&pidfd, Signal::TERM).is_err() {
        return false;
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        // SAFETY: signal 0 only checks for existence.
        if unsafe { libc::kill(pid, 0) } != 0 || is_zombie(pid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = pidfd_send_signal(&pidfd, Signal::KILL);
    true
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// `sd_notify(3)`: a datagram to `$NOTIFY_SOCKET`, when systemd set it.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = result {
        tracing::warn!("sd_notify failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfile_naming_another_program_is_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pidfile = dir.path().join("agent.pid");
        std::fs::write(&pidfile, other.id().to_string()).unwrap();
        assert_eq!(read_live_pid(&pidfile), None, "a live pid that is not an agent");
        assert!(!stop_pid(other.id() as i32, std::time::Duration::from_millis(100)));
        assert!(other.try_wait().unwrap().is_none(), "sleep is still running");
        other.kill().unwrap();
        let _ = other.wait();
    }
}
