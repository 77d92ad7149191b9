//! What the benchmark binaries share: where the release builds are, and
//! one way to print a series of timings.
//!
//! The binaries (`src/bin/`) run the real `mlopsctl` and `mlops-agent` on
//! test hosts from the end-to-end harness (`mlops-e2e`): network namespaces
//! with their own sshd and, where a stack is deployed, their own Docker
//! engine. They never act on this machine's own engine or agent. They
//! print figures and assert nothing about time.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else `target/`).
pub fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ is in the workspace");
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from)
}

/// The release `mlopsctl`, and the agent users ship: the static build
/// (`cargo agent-static`) when there is one, else the release build.
pub fn release_binaries() -> (PathBuf, PathBuf) {
    let target = target_dir();
    let static_agent = target.join("x86_64-unknown-linux-gnu/release/mlops-agent");
    let agent = if static_agent.exists() { static_agent } else { target.join("release/mlops-agent") };
    (target.join("release/mlopsctl"), agent)
}

/// The agent binary to run: the first argument, else the release build;
/// an error with the build command when it is missing.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let agent = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| target_dir().join("release/mlops-agent"));
    if !agent.exists() {
        anyhow::bail!("{} does not exist\n  hint: cargo build --release -p mlops-agent", agent.display());
    }
    println!("agent: {}", agent.display());
    Ok(agent)
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ is in the workspace").to_path_buf()
}

/// Prints `what: median, p90, min, max (n runs; target)` in milliseconds.
pub fn report(what: &str, samples: &[Duration], target: &str) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    let p90 = ms[((ms.len() as f64 * 0.9).ceil() as usize).saturating_sub(1).min(ms.len() - 1)];
    println!(
        "{what}: median {median:.1} ms, p90 {p90:.1} ms, min {:.1} ms, max {:.1} ms ({} runs; target {target})",
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    );
}
