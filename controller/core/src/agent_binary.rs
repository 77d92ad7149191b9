//! The agent binary the controller pushes: where it is, its hash, its CPU.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ControllerError;

/// The agent executable, read once per run.
#[derive(Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub bytes: std::sync::Arc<Vec<u8>>,
    /// sha256, hex.
    pub sha256: String,
    /// `uname -m` style: `x86_64`, `aarch64`.
    pub arch: &'static str,
    /// For a dynamically linked binary, the newest glibc version it needs
    /// (`2.34`); `None` for a static one.
    pub glibc: Option<String>,
}

impl std::fmt::Debug for AgentBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBinary")
            .field("path", &self.path)
            .field("size", &self.bytes.len())
            .field("sha256", &self.sha256)
            .field("arch", &self.arch)
            .field("glibc", &self.glibc)
            .finish()
    }
}

impl AgentBinary {
    /// Finds the binary: the explicit path if given (`--agent-binary` or
    /// `MLOPS_AGENT_BINARY`), else the static agent that `cargo agent-static`
    /// builds beside the running `mlopsctl`'s target directory (it runs on
    /// any glibc), else `mlops-agent` next to `mlopsctl`, which is where
    /// `cargo build` and the release archive put it; when both are there,
    /// the static one unless the other is newer.
    pub fn locate(explicit: Option<&Path>) -> Result<Self, ControllerError> {
        let candidates: Vec<PathBuf> = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => match std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
                Some(dir) => {
                    let profile = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let static_build =
                        dir.join("..").join("x86_64-unknown-linux-gnu").join(&profile).join("mlops-agent");
                    vec![static_build, dir.join("mlops-agent")]
                }
                None => Vec::new(),
            },
        };
        // The static build first, unless the other was built after it (a
        // stale static agent is not pushed over a fresh one).
        let modified = |p: &PathBuf| std::fs::metadata(p).ok().filter(|m| m.is_file()).and_then(|m| m.modified().ok());
        let mut found: Vec<(&PathBuf, std::time::SystemTime)> =
            candidates.iter().filter_map(|p| modified(p).map(|m| (p, m))).collect();
        if let [(_, first), (_, second)] = found.as_slice()
            && second > first
        {
            found.swap(0, 1);
        }
        let path = found
            .first()
            .map(|(p, _)| (*p).clone())
            .ok_or(ControllerError::AgentBinaryNotFound { searched: candidates.clone() })?;
        Self::load(&path)
    }

    pub fn load(path: &Path) -> Result<Self, ControllerError> {
        let bytes = std::fs::read(path)
            .map_err(|source| ControllerError::AgentBinaryRead { path: path.to_path_buf(), source })?;
        let arch = elf_arch(&bytes).ok_or_else(|| ControllerError::AgentBinaryFormat { path: path.to_path_buf() })?;
        let glibc = if is_static(&bytes) { None } else { glibc_needed(&bytes) };
        Ok(AgentBinary {
            path: path.to_path_buf(),
            glibc,
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: std::sync::Arc::new(bytes),
            arch,
        })
    }
}

/// The CPU of a 64-bit little-endian ELF executable.
pub fn elf_arch(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    match u16::from_le_bytes([bytes[18], bytes[19]]) {
        0x3e => Some("x86_64"),
        0xb7 => Some("aarch64"),
        0xf3 => Some("riscv64"),
        _ => None,
    }
}

/// An ELF executable without a `PT_INTERP` program header needs no dynamic
/// loader (what a `FROM scratch` image requires).
pub fn is_static(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return false };
    elf_arch(elf).is_some()
        && !(0..phnum)
            .any(|i| elf.get(phoff + i * phentsize..phoff + i * phentsize + 4) == Some(&3u32.to_le_bytes()[..]))
}

/// A binary that ships with mlopsctl and goes into a stack (`x-mlops.inject`):
/// `$MLOPS_<NAME>_BINARY` (name upper-cased, `-` as `_`), else next to
/// `mlopsctl`, else in cargo's static-target output beside it. It must be
/// static: it runs in a `FROM scratch` image.
pub fn locate_artifact(name: &str) -> Result<PathBuf, ControllerError> {
    let var = format!("MLOPS_{}_BINARY", name.trim_start_matches("mlops-").to_uppercase().replace('-', "_"));
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os(&var) {
        candidates.push(PathBuf::from(p));
    } else if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        candidates.push(dir.join(name));
        for profile in ["release", "debug"] {
            candidates.push(dir.join("..").join("x86_64-unknown-linux-gnu").join(profile).join(name));
        }
    }
    for c in &candidates {
        if let Ok(bytes) = std::fs::read(c)
            && is_static(&bytes)
        {
            return Ok(c.clone());
        }
    }
    Err(ControllerError::ArtifactNotFound { name: name.to_string(), variable: var, searched: candidates })
}

/// The newest `GLIBC_x.y` version a dynamically linked executable asks
/// for: the version names its dynamic string table carries (the linker
/// writes one per symbol version it needs).
pub fn glibc_needed(elf: &[u8]) -> Option<String> {
    const TAG: &[u8] = b"GLIBC_";
    let mut best: Option<String> = None;
    let mut i = 0;
    while let Some(at) = elf[i..].windows(TAG.len()).position(|w| w == TAG) {
        let start = i + at + TAG.len();
        let end =
            elf[start..].iter().position(|b| !(b.is_ascii_digit() || *b == b'.')).map_or(elf.len(), |n| start + n);
        let version = String::from_utf8_lossy(&elf[start..end]).trim_end_matches('.').to_string();
        // Only whole names (`GLIBC_2.34\0`), not `GLIBC_PRIVATE` or text.
        if version.contains('.') && elf.get(end) == Some(&0) && best.as_deref().is_none_or(|b| version_lt(b, &version))
        {
            best = Some(version);
        }
        i = start;
    }
    best
}

/// Whether dotted version `a` is older than `b` (`2.9` < `2.31`).
pub fn version_lt(a: &str, b: &str) -> bool {
    let parts = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    parts(a) < parts(b)
}

/// Maps `uname -m` spellings to ours.
pub fn normalize_arch(uname_m: &str) -> &str {
    match uname_m {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_names_the_glibc_it_needs() {
        // This test binary is dynamically linked against this machine's glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static(&me));
        let needed = glibc_needed(&me).expect("a GLIBC_ version");
        assert!(version_lt("2.2", &needed) && !version_lt("2.99", &needed), "{needed}");
        let fake = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.17\0see GLIBC_2.99 text";
        assert_eq!(glibc_needed(fake).as_deref(), Some("2.34"));
        assert!(version_lt("2.31", "2.34") && version_lt("2.9", "2.31") && !version_lt("2.36", "2.34"));
    }

    #[test]
    fn reads_elf_machine() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&me), Some(std::env::consts::ARCH));
        assert_eq!(elf_arch(b"#!/bin/sh\necho hi\n"), None);
    }
}
