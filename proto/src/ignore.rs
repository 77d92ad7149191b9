//! `.dockerignore`-style patterns, used for build contexts (agent) and for
//! the files a stack sync leaves out (`.mlopsignore`, controller). The
//! matching is the `glob` crate's (rust-lang's; the same crate matches
//! `--limit` and `ssh_config` patterns, and it has no regex engine, which
//! keeps the agent small); this module adds Docker's rules around it.

use glob::{MatchOptions, Pattern};

/// A Go `filepath.Match` pattern in the `glob` crate's syntax: Go escapes
/// with `\` where `glob` writes a one-character class (`\*` is `[*]`), and
/// negates a class with `[^...]` where `glob` writes `[!...]`.
fn go_to_glob(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 4);
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next @ ('*' | '?' | '[' | ']')) => {
                    out.push('[');
                    out.push(next);
                    out.push(']');
                }
                Some(next) => out.push(next),
                None => out.push('\\'),
            },
            '[' if chars.peek() == Some(&'^') => {
                chars.next();
                out.push_str("[!");
            }
            _ => out.push(c),
        }
    }
    out
}

/// `*` and `?` stay within a path segment, as in Go.
const OPTIONS: MatchOptions =
    MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: false };

/// One `.dockerignore` rule.
#[derive(Debug, Clone)]
struct Rule {
    glob: Pattern,
    negate: bool,
}

/// `.dockerignore` patterns: Go `filepath.Match` syntax per path segment
/// (`*` and `?` stay within a segment, `[...]` classes, `\` escapes), `**`
/// for any number of segments, `!` to re-include; the last matching rule
/// wins; a rule that matches a directory covers everything below it.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    rules: Vec<Rule>,
}

impl Ignore {
    /// Parses the file's text; a pattern that is not a valid glob is an
    /// error naming its line (Docker refuses such a file too).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negate, p) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let cleaned: Vec<&str> = p
                .trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/')
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .collect();
            if cleaned.is_empty() {
                continue;
            }
            let glob = Pattern::new(&go_to_glob(&cleaned.join("/")))
                .map_err(|e| format!("line {}: `{line}` is not a valid pattern: {}", n + 1, e.msg))?;
            rules.push(Rule { glob, negate });
        }
        Ok(Ignore { rules })
    }

    /// Whether `rel` (a `/`-separated path in the context) is excluded.
    pub fn excluded(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').collect();
        let prefixes: Vec<String> = (1..=parts.len()).map(|n| parts[..n].join("/")).collect();
        let mut excluded = false;
        for rule in &self.rules {
            // A match of the path or of any of its parent directories.
            if prefixes.iter().any(|p| rule.glob.matches_with(p, OPTIONS)) {
                excluded = !rule.negate;
            }
        }
        excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore() {
        let ig = Ignore::parse("# c\n*.log\nbuild/\n!build/keep.txt\n**/secret*\n/tmp\n").unwrap();
        assert!(ig.excluded("a.log"));
        assert!(!ig.excluded("d/a.log"), "`*.log` matches at the top only");
        assert!(ig.excluded("build/x.o"));
        assert!(!ig.excluded("build/keep.txt"));
        assert!(ig.excluded("deep/down/secret.key"));
        assert!(ig.excluded("secret.txt"));
        assert!(ig.excluded("tmp/x"));
        assert!(!ig.excluded("src/main.rs"));
    }

    #[test]
    fn go_syntax_classes_escapes_and_deep_stars() {
        let ig = Ignore::parse("[^a]x\nlog[0-9]\n\\*lit\ndocs/**/*.md\n").unwrap();
        assert!(ig.excluded("bx") && !ig.excluded("ax"), "a negated class");
        assert!(ig.excluded("log7") && !ig.excluded("logx"));
        assert!(ig.excluded("*lit") && !ig.excluded("xlit"), "an escaped star is literal");
        assert!(ig.excluded("docs/a/b/c.md") && ig.excluded("docs/c.md") && !ig.excluded("c.md"));
        let literal = Ignore::parse("a{b,c}\n\\[^x]\n").unwrap();
        assert!(literal.excluded("a{b,c}") && !literal.excluded("ab"), "braces are literal, as in Go");
        assert!(literal.excluded("[^x]") && !literal.excluded("y"), "an escaped `[^` stays literal");
        let e = Ignore::parse("ok\n[unclosed\n").unwrap_err();
        assert!(e.starts_with("line 2: `[unclosed` is not a valid pattern"), "{e}");
    }
}
