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
}

impl std::fmt::Debug for AgentBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBinary")
            .field("path", &self.path)
            .field("size", &self.bytes.len())
            .field("sha256", &self.sha256)
            .field("arch", &self.arch)
            .finish()
    }
}

impl AgentBinary {
    /// Finds the binary: the explicit path if given (`--agent-binary` or
    /// `MLOPS_AGENT_BINARY`), else `mlops-agent` next to the running
    /// `mlopsctl`, which is where `cargo build` and the release archive put it.
    pub fn locate(explicit: Option<&Path>) -> Result<Self, ControllerError> {
        let candidates: Vec<PathBuf> = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("mlops-agent")))
                .into_iter()
                .collect(),
        };
        let path = candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or(ControllerError::AgentBinaryNotFound { searched: candidates })?;
        Self::load(&path)
    }

    pub fn load(path: &Path) -> Result<Self, ControllerError> {
        let bytes = std::fs::read(path)
            .map_err(|source| ControllerError::AgentBinaryRead { path: path.to_path_buf(), source })?;
        let arch = elf_arch(&bytes).ok_or_else(|| ControllerError::AgentBinaryFormat { path: path.to_path_buf() })?;
        Ok(AgentBinary {
            path: path.to_path_buf(),
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
    fn reads_elf_machine() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&me), Some(std::env::consts::ARCH));
        assert_eq!(elf_arch(b"#!/bin/sh\necho hi\n"), None);
    }
}
