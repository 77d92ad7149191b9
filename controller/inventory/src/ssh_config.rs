//! The subset of OpenSSH's client configuration (`~/.ssh/config`) that
//! decides where and as whom to connect: `Host` blocks (globs, negation,
//! several patterns), `HostName` (with `%h`), `User`, `Port`,
//! `IdentityFile` (with `~`, `%d`, `%u`, `%h`, `%r`) and `Include`.
//!
//! As in OpenSSH, the first value obtained for a keyword wins, except
//! `IdentityFile`, which accumulates. `Match` blocks are not evaluated: their
//! contents are skipped (and reported once as a warning by the caller).

use std::path::{Path, PathBuf};

use crate::pattern::{glob_match, wildcard_match};

#[derive(Debug, Clone, Default)]
pub struct SshConfig {
    blocks: Vec<Block>,
    /// Lines that could not be used, for a warning.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
struct Block {
    /// `None` for `Match` blocks, which never apply.
    patterns: Option<Vec<String>>,
    options: Vec<(String, String)>,
}

/// What the configuration says for one host alias.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshHostConfig {
    pub hostname: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_files: Vec<PathBuf>,
}

/// The largest ssh_config file (or included file) read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl SshConfig {
    /// Loads `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Self {
        let mut cfg = SshConfig::default();
        cfg.read_file(path, 0, Some(vec!["*".into()]));
        cfg
    }

    pub fn parse(text: &str) -> Self {
        let mut cfg = SshConfig::default();
        cfg.read_text(text, Path::new("."), 0, Some(vec!["*".into()]));
        cfg
    }

    fn read_file(&mut self, path: &Path, depth: usize, context: Option<Vec<String>>) {
        // Only regular files of a sane size (an `Include` of a device or a
        // huge file must not hang or exhaust the controller).
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                self.warnings.push(format!("{}: not a regular file; ignored", path.display()));
                return;
            }
            Ok(m) if m.len() > MAX_CONFIG_BYTES => {
                self.warnings.push(format!("{}: larger than {MAX_CONFIG_BYTES} bytes; ignored", path.display()));
                return;
            }
            _ => {}
        }
        match std::fs::read_to_string(path) {
            Ok(text) => self.read_text(&text, path.parent().unwrap_or(Path::new(".")), depth, context),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self.warnings.push(format!("{}: {e}", path.display())),
        }
    }

    /// `context` is the block the text starts in: every host at the top of
    /// the main file, the including block for an `Include`d file.
    fn read_text(&mut self, text: &str, dir: &Path, depth: usize, context: Option<Vec<String>>) {
        self.blocks.push(Block { patterns: context, options: Vec::new() });
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
                Some((k, v)) => (
                    k.to_ascii_lowercase(),
                    unquote(v.trim_start_matches(|c: char| c.is_whitespace() || c == '=').trim()),
                ),
                None => (line.to_ascii_lowercase(), String::new()),
            };
            match key.as_str() {
                "host" => self.blocks.push(Block {
                    patterns: Some(value.split_whitespace().map(str::to_string).collect()),
                    options: Vec::new(),
                }),
                "match" => {
                    self.warnings.push(format!("`Match {value}` blocks are not evaluated; their options are ignored"));
                    self.blocks.push(Block { patterns: None, options: Vec::new() });
                }
                "include" if depth < 8 => {
                    let current = self.blocks.last().and_then(|b| b.patterns.clone());
                    for pattern in value.split_whitespace() {
                        let full = expand_tilde(pattern);
                        let full = if full.is_absolute() { full } else { dir.join(full) };
                        for file in expand_file_glob(&full) {
                            self.read_file(&file, depth + 1, current.clone());
                        }
                    }
                    // Options after an Include continue the including block.
                    self.blocks.push(Block { patterns: current, options: Vec::new() });
                }
                _ => {
                    if let Some(block) = self.blocks.last_mut() {
                        block.options.push((key, value));
                    }
                }
            }
        }
    }

    /// Resolves `alias` (the name given on the command line or the
    /// inventory's `ansible_host`).
    pub fn resolve(&self, alias: &str) -> SshHostConfig {
        let mut out = SshHostConfig::default();
        for block in &self.blocks {
            let Some(patterns) = &block.patterns else { continue };
            if !host_matches(patterns, alias) {
                continue;
            }
            for (key, value) in &block.options {
                match key.as_str() {
                    "hostname" if out.hostname.is_none() => {
                        out.hostname = Some(value.replace("%h", alias).replace("%%", "%"));
                    }
                    "user" if out.user.is_none() => out.user = Some(value.clone()),
                    "port" if out.port.is_none() => out.port = value.parse().ok(),
                    "identityfile" => out.identity_files.push(PathBuf::from(value)),
                    _ => {}
                }
            }
        }
        // Tokens are expanded once everything is known, as OpenSSH does.
        let host = out.hostname.clone().unwrap_or_else(|| alias.to_string());
        let remote_user = out.user.clone().unwrap_or_default();
        out.identity_files = out
            .identity_files
            .iter()
            .map(|p| {
                let s = p.to_string_lossy();
                let home = home_dir().to_string_lossy().into_owned();
                let s = s
                    .replace("%d", &home)
                    .replace("%h", &host)
                    .replace("%r", &remote_user)
                    .replace("%u", &local_user())
                    .replace("%%", "%");
                expand_tilde(&s)
            })
            .collect();
        out
    }
}

fn host_matches(patterns: &[String], alias: &str) -> bool {
    let mut matched = false;
    for p in patterns {
        for p in p.split(',') {
            if let Some(neg) = p.strip_prefix('!') {
                if wildcard_match(neg, alias) {
                    return false;
                }
            } else if wildcard_match(p, alias) {
                matched = true;
            }
        }
    }
    matched
}

fn unquote(s: &str) -> String {
    s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s).to_string()
}

pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

fn local_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

/// `~/x` → `$HOME/x`.
pub fn expand_tilde(s: &str) -> PathBuf {
    match s.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if s == "~" => home_dir(),
        None => PathBuf::from(s),
    }
}

/// Expands a glob in the last path component (what `Include config.d/*`
/// needs; OpenSSH uses glob(3) there, so `[...]` classes work too).
fn expand_file_glob(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.contains(['*', '?', '[']) {
        return vec![path.to_path_buf()];
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| glob_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_value_wins_and_identity_files_accumulate() {
        let cfg = SshConfig::parse(
            "Host web1\n  HostName 10.0.0.5\n  Port 2222\n  IdentityFile /k/web\nHost web* !web9\n  User deploy\n  Port 22\n  IdentityFile /k/%h\nHost *\n  User nobody\n",
        );
        let r = cfg.resolve("web1");
        assert_eq!(r.hostname.as_deref(), Some("10.0.0.5"));
        assert_eq!(r.port, Some(2222));
        assert_eq!(r.user.as_deref(), Some("deploy"));
        assert_eq!(r.identity_files, [PathBuf::from("/k/web"), PathBuf::from("/k/10.0.0.5")]);
        let r9 = cfg.resolve("web9");
        assert_eq!(r9.user.as_deref(), Some("nobody"), "negated pattern excludes");
        assert_eq!(r9.port, None);
    }

    #[test]
    fn equals_syntax_quotes_and_hostname_token() {
        let cfg = SshConfig::parse("Host=box\n  HostName=\"%h.example\"\n  user = me\n");
        let r = cfg.resolve("box");
        assert_eq!(r.hostname.as_deref(), Some("box.example"));
        assert_eq!(r.user.as_deref(), Some("me"));
    }

    #[test]
    fn include_reads_other_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(dir.path().join("conf.d/a.conf"), "Host inc\n  Port 2200\n").unwrap();
        std::fs::write(dir.path().join("config"), "Include conf.d/*.conf\n").unwrap();
        assert_eq!(SshConfig::load(&dir.path().join("config")).resolve("inc").port, Some(2200));
    }
}
