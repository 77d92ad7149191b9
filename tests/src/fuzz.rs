//! The readers of untrusted text under random and mutated input: the
//! Compose reader, the inventory reader, `ssh_config`, known_hosts and the
//! agent's sync manifest check. The property, for every input: no panic,
//! and every refusal is an error that says where (file, line and column;
//! for a manifest, the entry).
//!
//! Inputs are valid seeds (the platform's compose.yaml, the example
//! inventories, ...) mutated a few edits at a time (bytes changed, inserted
//! or deleted, lines doubled or swapped, YAML punctuation and control
//! characters thrown in, truncation), and some text made from scratch.
//! Deterministic for a seed. `tests/tests/parsers.rs` runs a few thousand
//! inputs per reader; `mlops-fuzz` (bench crate) runs for as long as asked.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

/// xorshift64*: small, fast, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }
}

/// Pieces that matter to the readers, thrown into inputs.
const TOKENS: &[&str] = &[
    ": ",
    "- ",
    "-",
    ":",
    "&a ",
    "*a",
    "<<: *a",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "#",
    "|",
    ">",
    "\n",
    "\n  ",
    "\t",
    "${",
    "${X:-",
    "${X:?e}",
    "$$",
    "!!str ",
    "~",
    "null",
    "true",
    "0x10",
    "1e9",
    "99999999999999999999",
    "..",
    "../",
    "/",
    "*",
    "?",
    "!",
    "@revoked ",
    "@cert-authority ",
    "|1|",
    "[h]:22",
    "Host ",
    "Match ",
    "Include ",
    "=",
    "\0",
    "\r",
    "\u{1b}[2J",
    "\u{202e}",
    "é",
    "𝔘",
    "services:",
    "volumes:",
    "hosts:",
    "children:",
    "vars:",
    "ansible_host: ",
    "ansible_port: ",
    "depends_on: ",
    "condition: ",
    "healthcheck:",
    "image: x",
    "build: .",
    "ports: [",
    "\"80:80\"",
    "profiles: [",
    "x-mlops:",
    "ssh-ed25519 ",
    "AAAA",
];

fn random_char(rng: &mut Rng) -> char {
    match rng.below(8) {
        0 => char::from_u32(rng.below(0x20) as u32).unwrap_or('\0'),
        1 => char::from_u32(0x80 + rng.below(0x780) as u32).unwrap_or('é'),
        2 => char::from_u32(0x2000 + rng.below(0x80) as u32).unwrap_or('\u{2028}'),
        _ => char::from_u32(0x20 + rng.below(0x5f) as u32).unwrap_or(' '),
    }
}

/// `seed` with one to four random edits.
pub fn mutate(rng: &mut Rng, seed: &str) -> String {
    let mut text: Vec<char> = seed.chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(text.len() + 1);
        match rng.below(8) {
            0 if !text.is_empty() => {
                let i = rng.below(text.len());
                text[i] = random_char(rng);
            }
            1 => text.insert(at, random_char(rng)),
            2 | 3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                text.splice(at..at, token.chars());
            }
            4 => {
                let end = (at + 1 + rng.below(24)).min(text.len());
                text.drain(at.min(end)..end);
            }
            5 | 6 => {
                let joined: String = text.iter().collect();
                let mut lines: Vec<&str> = joined.split('\n').collect();
                let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
                if rng.below(2) == 0 {
                    lines.swap(a, b);
                } else {
                    let l = lines[a];
                    lines.insert(b, l);
                }
                text = lines.join("\n").chars().collect();
            }
            _ => text.truncate(at),
        }
    }
    text.into_iter().collect()
}

/// Text made from scratch: tokens and characters.
pub fn random_text(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(60) {
        if rng.below(3) == 0 {
            s.push(random_char(rng));
        } else {
            s.push_str(TOKENS[rng.below(TOKENS.len())]);
        }
    }
    s
}

/// What a reader made of one input.
pub enum Outcome {
    Accepted,
    /// Refused with an error that says where.
    Refused,
    /// Refused with an error that does not say where: a finding.
    Unplaced(String),
}

/// One reader under test.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<String>,
    pub run: fn(&str) -> Outcome,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Tally {
    pub inputs: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Inputs that panicked (with the panic message).
    pub panics: Vec<(String, String)>,
    /// Inputs refused without a position (with the error).
    pub unplaced: Vec<(String, String)>,
}

impl Tally {
    pub fn clean(&self) -> bool {
        self.panics.is_empty() && self.unplaced.is_empty()
    }
}

/// Runs `target` on inputs from `rng` until `inputs` ran or `until` passed.
pub fn run(target: &Target, rng: &mut Rng, inputs: u64, until: Option<Instant>) -> Tally {
    let mut tally = Tally::default();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while tally.inputs < inputs && until.is_none_or(|u| Instant::now() < u) {
        let input = if rng.below(10) == 0 || target.seeds.is_empty() {
            random_text(rng)
        } else {
            let seed = &target.seeds[rng.below(target.seeds.len())];
            mutate(rng, seed)
        };
        tally.inputs += 1;
        match std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            Ok(Outcome::Accepted) => tally.accepted += 1,
            Ok(Outcome::Refused) => tally.refused += 1,
            Ok(Outcome::Unplaced(e)) => tally.unplaced.push((input, e)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tally.panics.push((input, msg));
            }
        }
    }
    std::panic::set_hook(quiet);
    tally
}

/// Every reader, with its seeds.
pub fn targets() -> Vec<Target> {
    vec![
        Target { name: "compose", seeds: compose_seeds(), run: compose },
        Target { name: "inventory", seeds: inventory_seeds(), run: inventory },
        Target { name: "inventory (INI)", seeds: vec![INI_INVENTORY.to_string()], run: inventory_ini },
        Target { name: "ssh_config", seeds: vec![SSH_CONFIG.to_string()], run: ssh_config },
        Target { name: "known_hosts", seeds: vec![KNOWN_HOSTS.to_string()], run: known_hosts },
        Target { name: "sync manifest", seeds: vec![MANIFEST.to_string()], run: manifest },
    ]
}

fn compose_seeds() -> Vec<String> {
    vec![
        include_str!("../../platform/compose.yaml").to_string(),
        "name: demo\nx-s: &s\n  image: x\nservices:\n  a:\n    <<: *s\n    depends_on: {b: {condition: service_healthy}}\n    ports: [\"127.0.0.1:80:80\"]\n    volumes: [\"./d:/d:ro\", \"v:/v\"]\n  b:\n    build: {context: ., args: [A=1]}\n    healthcheck: {test: [CMD, \"true\"], interval: 1s}\n    environment: {X: \"${X:-1}\"}\nvolumes:\n  v: {}\n".to_string(),
    ]
}

fn inventory_seeds() -> Vec<String> {
    vec![
        include_str!("../../inventories/example.yml").to_string(),
        include_str!("../../inventories/local.yml").to_string(),
        "all:\n  vars: {ansible_user: root}\n  children:\n    web:\n      hosts:\n        web[01:03].example: {ansible_port: 2222}\n    db:\n      hosts: {db1: {ansible_host: 10.0.0.1}}\n      children: {web: {}}\n".to_string(),
    ]
}

const INI_INVENTORY: &str = "bastion ansible_host=192.0.2.1\n[web]\nweb[01:03]:2222 a=1 b='x y' c=[1,{'k':None}] # c\n\n[web:vars]\nretries=3\nflag=True\n; note\n[all:children]\nweb\n[db:children]\nweb\n[db]\n";

const SSH_CONFIG: &str = "Host web*\n  HostName 10.0.0.%h\n  User deploy\n  Port 2222\n  IdentityFile ~/.ssh/id_web\n\nHost *\n  User root\n  IdentityFile ~/.ssh/id_ed25519\nMatch host x\n  User y\n";

const KNOWN_HOSTS: &str = "web1,10.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n[db]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G2sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X\n@revoked * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G2sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X\n@cert-authority *.ca ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n|1|BwcHBwcHBwcHBwcHBwcHBwcHBwc=|8D5yTK2Tx4cBkl5QHy4fwCTYUTI= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n*.example,!bad.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n";

/// A manifest as text: `path<TAB>kind<TAB>detail` per line, kind `f`
/// (detail: size), `d`, or `l` (detail: the link's target).
const MANIFEST: &str =
    "dags\td\t\ndags/a.py\tf\t10\ndags/l\tl\t..\nx\tl\tdags/l/dags/a.py\nd/e/f\tf\t3\nup\tl\td/e/../../dags\n";

fn compose(text: &str) -> Outcome {
    // X for the seeds' interpolation, and every secret the platform names.
    let names = ["X", "POSTGRES_PASSWORD", "POSTGRES_SUPERUSER_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_ADMIN_PASSWORD"]
        .into_iter()
        .chain(["AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD"]);
    let env: BTreeMap<String, String> = names.map(|k| (k.to_string(), "1".to_string())).collect();
    let opts = mlops_compose::LoadOptions { project: Some("fuzz".into()), ..Default::default() };
    match mlops_compose::parse(text, Path::new("compose.yaml"), Path::new("/nonexistent"), &env, &opts) {
        Ok(_) => Outcome::Accepted,
        Err(e) => {
            use mlops_compose::ComposeError as E;
            let placed = match &e {
                E::Invalid { line, .. } | E::DotEnv { line, .. } => *line > 0,
                E::Yaml { message, .. } => message.contains("line"),
                E::NotFound { .. } | E::Read { .. } => false,
            };
            if placed { Outcome::Refused } else { Outcome::Unplaced(e.to_string()) }
        }
    }
}

fn inventory(text: &str) -> Outcome {
    inventory_as(text, "inventory.yml")
}

/// A file without a known extension: YAML when it is a YAML mapping, else
/// INI (most of what the fuzzer makes goes the INI way).
fn inventory_ini(text: &str) -> Outcome {
    inventory_as(text, "hosts")
}

fn inventory_as(text: &str, name: &str) -> Outcome {
    use mlops_inventory::InventoryError as E;
    match mlops_inventory::inventory::Inventory::parse(text, Path::new(name)) {
        Ok(inv) => {
            // What the commands do next with an inventory.
            let _ = mlops_inventory::pattern::select(&inv, "all:!web:&db");
            let names = inv.host_names().to_vec();
            let _ = mlops_inventory::target::targets_from_inventory(&inv, &names, &Default::default());
            Outcome::Accepted
        }
        Err(e) => {
            let placed = match &e {
                E::Invalid { line, .. } => *line > 0,
                E::Yaml { message, .. } => message.contains("line"),
                // Names the groups that form it.
                E::Cycle { cycle, .. } => !cycle.is_empty(),
                E::Read { .. } | E::Limit { .. } | E::HostSpec { .. } | E::Script { .. } | E::Source { .. } => false,
            };
            if placed { Outcome::Refused } else { Outcome::Unplaced(e.to_string()) }
        }
    }
}

fn ssh_config(text: &str) -> Outcome {
    // An `Include` in the text may name real files: they are only read
    // (regular files up to 1 MiB), never written.
    let cfg = mlops_inventory::SshConfig::parse(text);
    for alias in ["web1", "db", "x", ""] {
        let _ = cfg.resolve(alias);
    }
    Outcome::Accepted
}

fn known_hosts(text: &str) -> Outcome {
    use mlops_ssh::known_hosts as kh;
    let entries = kh::parse(Path::new("known_hosts"), text);
    let key = russh_key();
    for (host, port) in [("web1", 22), ("db", 2222), ("x.ca", 22), ("bad.example", 22)] {
        let _ = kh::check(&entries, host, port, &key);
        let _ = kh::known_algorithms(&entries, host, port);
    }
    for e in &entries {
        let _ = kh::host_matches(&e.patterns, "[web1]:2222");
    }
    Outcome::Accepted
}

fn russh_key() -> mlops_ssh::PublicKey {
    mlops_ssh::PublicKey::from_openssh(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ",
    )
    .expect("a valid key")
}

fn manifest(text: &str) -> Outcome {
    use mlops_proto::v1::{SyncEntry, SyncManifest};
    static STORE: std::sync::OnceLock<(tempfile::TempDir, mlops_agent::engine::sync::SyncStore)> =
        std::sync::OnceLock::new();
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = mlops_agent::engine::sync::SyncStore::new(dir.path(), Default::default());
        (dir, store)
    });
    let mut entries = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, '\t');
        let (path, kind, detail) = (f.next().unwrap_or(""), f.next().unwrap_or("f"), f.next().unwrap_or(""));
        entries.push(match kind {
            "d" => SyncEntry { path: path.into(), is_dir: true, mode: 0o755, ..Default::default() },
            "l" => SyncEntry { path: path.into(), symlink_target: detail.into(), ..Default::default() },
            _ => SyncEntry {
                path: path.into(),
                size: detail.parse().unwrap_or(1),
                mode: 0o644,
                sha256: "0".repeat(64),
                ..Default::default()
            },
        });
    }
    match store.begin(SyncManifest { root: "fuzz".into(), entries }) {
        Ok(_) => Outcome::Accepted,
        // A manifest error names the entry (or the limit) it is about.
        Err(mlops_agent::engine::EngineError::BadRequest { message, .. }) if !message.is_empty() => Outcome::Refused,
        Err(e) => Outcome::Unplaced(e.to_string()),
    }
}

/// Runs every target for `per_target` (or `inputs` each), printing a line
/// per target; returns whether all were clean.
pub fn report(seed: u64, inputs: u64, per_target: Option<Duration>, out: &mut dyn std::io::Write) -> bool {
    let mut clean = true;
    for (i, t) in targets().iter().enumerate() {
        let mut rng = Rng::new(seed.wrapping_add(i as u64 * 7919));
        let started = Instant::now();
        let tally = run(t, &mut rng, inputs, per_target.map(|d| started + d));
        let _ = writeln!(
            out,
            "{:<14} {:>9} inputs in {:>6.1} s: {:>8} accepted, {:>8} refused with a position; {} panics, {} unplaced errors",
            t.name,
            tally.inputs,
            started.elapsed().as_secs_f64(),
            tally.accepted,
            tally.refused,
            tally.panics.len(),
            tally.unplaced.len()
        );
        for (input, why) in tally.panics.iter().take(3) {
            let _ = writeln!(out, "  PANIC {why}\n  input: {input:?}");
        }
        for (input, why) in tally.unplaced.iter().take(3) {
            let _ = writeln!(out, "  UNPLACED {why}\n  input: {input:?}");
        }
        clean &= tally.clean();
    }
    clean
}
