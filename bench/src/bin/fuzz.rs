//! `mlops-fuzz`: the readers of untrusted text (Compose, inventory,
//! ssh_config, known_hosts, sync manifests) under random and mutated input
//! for as long as asked, longer than the test suite runs them
//! (`tests/tests/parsers.rs`). Prints, per reader, how many inputs ran and
//! what became of them; exits 1 when an input panicked or was refused
//! without saying where, printing it.
//!
//! ```text
//! cargo run --release -p mlops-bench --bin mlops-fuzz -- [--seconds N] [--seed N]
//! ```

use std::time::Duration;

fn main() {
    let mut seconds = 60u64;
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("error: {a} needs a number\n  hint: mlops-fuzz [--seconds N] [--seed N]");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--seconds" => seconds = value(&mut args),
            "--seed" => seed = value(&mut args),
            _ => {
                eprintln!("error: unknown argument `{a}`\n  hint: mlops-fuzz [--seconds N] [--seed N]");
                std::process::exit(2);
            }
        }
    }
    let per_target = Duration::from_secs(seconds.max(1)) / mlops_e2e::fuzz::targets().len() as u32;
    println!("mlops-fuzz: seed {seed}, {} s per reader", per_target.as_secs_f64());
    let clean = mlops_e2e::fuzz::report(seed, u64::MAX, Some(per_target), &mut std::io::stdout());
    if !clean {
        println!("FAILED: rerun with --seed {seed} to reproduce");
        std::process::exit(1);
    }
}
