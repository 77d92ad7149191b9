//! The VM tier's harness: two Vagrant VMs (`vm1` Debian 12, bare; `vm2`
//! Debian 11, with Debian's docker.io) from `vagrant/Vagrantfile`, on
//! libvirt, with boxes built on this machine by `vagrant/build-box.sh` (no
//! box can be downloaded here).
//!
//! Everything the tier makes is its own and goes when [`VmTier`] drops:
//! its `VAGRANT_HOME` (so the boxes never join the user's), its libvirt
//! storage pool in its temporary directory, its two libvirt networks and
//! its two domains, all named `mlops-test-<pid>`. The user's own Vagrant
//! machines, boxes, pools and networks are never touched. libvirtd must
//! answer on `qemu:///system`; `tests/run.sh` starts it when it does not
//! run (and stops it after).
//!
//! Guests run under QEMU's software emulation unless `MLOPS_VM_DRIVER=kvm`
//! (this project's CI machines have a paravirtual `/dev/kvm` that cannot
//! boot a stock kernel).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

const URI: &str = "qemu:///system";
/// The private network's first three octets (`vm1` is `.11`, `vm2` `.12`)
/// and the management network's; chosen apart from the namespace hosts'
/// `10.213.0.0/16`.
const NET: &str = "10.219.56";
const MGMT: &str = "10.219.121";

pub struct VmTier {
    pub dir: TempDir,
    name: String,
    project: PathBuf,
    /// Seconds each step took, for the tier's time report.
    pub timings: Vec<(String, f64)>,
}

impl VmTier {
    /// Builds both boxes, adds them to the tier's own Vagrant home and
    /// brings both VMs up (in parallel: both boot at once).
    pub fn start(workspace: &Path) -> Result<VmTier> {
        for (tool, package) in [
            ("vagrant", "vagrant vagrant-libvirt"),
            ("virsh", "libvirt-clients"),
            ("qemu-img", "qemu-utils"),
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("debootstrap", "debootstrap"),
        ] {
            ensure!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()?
                    .success(),
                "`{tool}` is missing; tests/run.sh installs it (apt-get install {package})"
            );
        }
        ensure!(
            virsh(&["version"]).status.success(),
            "libvirtd does not answer on {URI}; tests/run.sh starts it (`virtlogd -d; libvirtd -d`)"
        );
        for net in [NET, MGMT] {
            let routes =
                String::from_utf8_lossy(&Command::new("ip").args(["-4", "route"]).output()?.stdout).into_owned();
            ensure!(!routes.contains(&format!("{net}.")), "{net}.0/24 is in use on this machine; the VM tier needs it");
        }
        // Under /var/tmp: boxes and disks take gigabytes, and /tmp may be RAM.
        let dir = tempfile::Builder::new().prefix("mlops-vm-").tempdir_in("/var/tmp")?;
        // libvirt's QEMU runs as its own user: it must reach the box's
        // kernel and the pool's disks in here.
        set_mode(dir.path(), 0o755)?;
        let name = format!("mlops-test-{}", std::process::id());
        let project = dir.path().join("project");
        for sub in ["boxes", "home", "pool", "project"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
            set_mode(&dir.path().join(sub), 0o755)?;
        }
        std::fs::copy(workspace.join("vagrant/Vagrantfile"), project.join("Vagrantfile"))?;
        let mut tier = VmTier { dir, name, project, timings: Vec::new() };

        let t = Instant::now();
        // vm2's box has Docker already (`--with-docker`): installing it
        // under emulation is vm1's part, and takes minutes.
        let builds: Vec<_> = [["bookworm", ""], ["bullseye", "--with-docker"]]
            .iter()
            .map(|[suite, docker]| {
                Command::new(workspace.join("vagrant/build-box.sh"))
                    .args(Some(docker).filter(|d| !d.is_empty()))
                    .arg(suite)
                    .arg(tier.dir.path().join("boxes"))
                    .arg(debian_mirror())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        // Every build is waited for before any failure is reported: none
        // may run on in a directory that is being removed.
        let outs: Vec<_> = builds.into_iter().map(|b| b.wait_with_output()).collect();
        for (suite, out) in ["bookworm", "bullseye"].iter().zip(outs) {
            let out = out?;
            ensure!(
                out.status.success(),
                "vagrant/build-box.sh {suite} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tier.timings.push(("build both boxes".into(), t.elapsed().as_secs_f64()));

        let pool = tier.dir.path().join("pool");
        let out = virsh(&["pool-create-as", &tier.name, "dir", "--target", &pool.display().to_string()]);
        ensure!(out.status.success(), "virsh pool-create-as: {}", String::from_utf8_lossy(&out.stderr));
        for (suite, file) in [("bookworm", "mlops-bookworm.box"), ("bullseye", "mlops-bullseye-docker.box")] {
            let file = tier.dir.path().join("boxes").join(file);
            tier.vagrant(&["box", "add", "--name", &format!("mlops-test/{suite}"), &file.display().to_string()])?;
            std::fs::remove_file(file)?;
        }
        let t = Instant::now();
        tier.vagrant(&["up"]).context("vagrant up")?;
        tier.timings.push(("vagrant up (both VMs)".into(), t.elapsed().as_secs_f64()));
        Ok(tier)
    }

    /// `vagrant ARGS` in the tier's project, with the tier's settings;
    /// fails with its output.
    pub fn vagrant(&self, args: &[&str]) -> Result<String> {
        let out = self.vagrant_command(args).output()?;
        ensure!(
            out.status.success(),
            "vagrant {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout), 40),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn vagrant_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("vagrant");
        cmd.args(args)
            .current_dir(&self.project)
            .env("VAGRANT_HOME", self.dir.path().join("home"))
            .env("VAGRANT_DEFAULT_PROVIDER", "libvirt")
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .env("LIBVIRT_DEFAULT_URI", URI)
            .env("MLOPS_VM_BOX_BOOKWORM", "mlops-test/bookworm")
            .env("MLOPS_VM_BOX_BULLSEYE", "mlops-test/bullseye")
            .env("MLOPS_VM_DRIVER", std::env::var("MLOPS_VM_DRIVER").unwrap_or_else(|_| "qemu".into()))
            .env("MLOPS_VM_NAME", &self.name)
            .env("MLOPS_VM_NET", NET)
            .env("MLOPS_VM_MGMT_NET", MGMT)
            .env("MLOPS_VM_POOL", &self.name)
            // Throwaway VMs: the guests' flushes (dpkg syncs every file it
            // unpacks) need not reach this machine's disk.
            .env("MLOPS_VM_DISK_CACHE", "unsafe")
            .stdin(Stdio::null());
        cmd
    }

    /// The VM's address on the private network.
    pub fn address(&self, vm: &str) -> String {
        match vm {
            "vm1" => format!("{NET}.11"),
            "vm2" => format!("{NET}.12"),
            other => panic!("no VM {other}"),
        }
    }

    /// Authorizes `public_key` for the user `vagrant` on `vm` (as an
    /// operator adds their key) and returns the VM's ed25519 host key line
    /// for a known_hosts file, read through Vagrant's own SSH session.
    pub fn admit(&self, vm: &str, public_key: &str) -> Result<String> {
        let script = format!(
            "set -e; echo '{}' >> ~/.ssh/authorized_keys; cat /etc/ssh/ssh_host_ed25519_key.pub",
            public_key.trim()
        );
        let out = self.vagrant(&["ssh", vm, "-c", &script])?;
        let key = out.lines().rev().find(|l| l.starts_with("ssh-ed25519 ")).context("no host key")?;
        let mut parts = key.split_whitespace();
        Ok(format!("{} {} {}", self.address(vm), parts.next().unwrap(), parts.next().unwrap()))
    }

    /// Runs `script` on `vm` as `vagrant` over plain SSH with `key` (after
    /// [`VmTier::admit`]; much faster than `vagrant ssh`).
    pub fn ssh(&self, vm: &str, key: &Path, known_hosts: &Path, script: &str) -> Output {
        Command::new("ssh")
            // Not root's own SSH configuration or agent keys.
            .args(["-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-i", &key.display().to_string()])
            .args(["-o", &format!("UserKnownHostsFile={}", known_hosts.display())])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"])
            .arg(format!("vagrant@{}", self.address(vm)))
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("ssh runs")
    }

    /// Polls `check` every 2 s until it holds or `timeout` passes.
    pub fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        bail!("{what}: not within {timeout:?}")
    }
}

impl Drop for VmTier {
    fn drop(&mut self) {
        if let Ok(out) = self.vagrant_command(&["destroy", "-f"]).output()
            && !out.status.success()
        {
            eprintln!("vagrant destroy: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Whatever `vagrant destroy` left: the domains, the networks, the
        // pool (its volumes are files in the tier's directory).
        for vm in ["vm1", "vm2"] {
            let domain = format!("{}-{vm}", self.name);
            virsh(&["destroy", &domain]);
            virsh(&["undefine", &domain]);
        }
        for net in ["mgmt", "private"] {
            let net = format!("{}-{net}", self.name);
            virsh(&["net-destroy", &net]);
            virsh(&["net-undefine", &net]);
        }
        virsh(&["pool-destroy", &self.name]);
        virsh(&["pool-undefine", &self.name]);
    }
}

/// The Debian mirror this machine's apt uses (the first `URIs:` of its
/// deb822 sources that is not a security mirror), for the boxes and the
/// stack's image; Debian's own when none is found.
pub fn debian_mirror() -> String {
    let sources = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "sources"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<Vec<_>>();
    sources
        .iter()
        .flat_map(|s| s.lines())
        .filter_map(|l| l.strip_prefix("URIs:"))
        .filter_map(|l| l.split_whitespace().next())
        .find(|u| !u.contains("security"))
        .map_or_else(|| "http://deb.debian.org/debian".to_string(), |u| u.trim_end_matches('/').to_string())
}

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh").args(["-q", "-c", URI]).args(args).stdin(Stdio::null()).output().expect("virsh runs")
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
