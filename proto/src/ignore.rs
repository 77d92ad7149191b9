//! `.dockerignore`-style patterns, used for build contexts (agent) and for
//! the files a stack sync leaves out (`.mlopsignore`, controller).

/// One `.dockerignore` rule.
#[derive(Debug, Clone)]
struct Rule {
    pattern: Vec<String>,
    negate: bool,
}

/// `.dockerignore` patterns: Go `filepath.Match` per path segment, `**`
/// for any number of segments, `!` to re-include; the last matching rule
/// wins; a rule that matches a directory covers everything below it.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    rules: Vec<Rule>,
}

impl Ignore {
    pub fn parse(text: &str) -> Self {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (negate, p) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let p = p.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
                Rule {
                    pattern: p.split('/').filter(|s| !s.is_empty() && *s != ".").map(str::to_string).collect(),
                    negate,
                }
            })
            .filter(|r| !r.pattern.is_empty())
            .collect();
        Ignore { rules }
    }

    /// Whether `rel` (a `/`-separated path in the context) is excluded.
    pub fn excluded(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for rule in &self.rules {
            // A match of the path or of any of its parent directories.
            let hit = (1..=parts.len()).any(|n| match_segments(&rule.pattern, &parts[..n]));
            if hit {
                excluded = !rule.negate;
            }
        }
        excluded
    }
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(p), _) if p == "**" => (0..=path.len()).any(|skip| match_segments(&pattern[1..], &path[skip..])),
        (Some(_), None) => false,
        (Some(p), Some(s)) => glob_segment(p, s) && match_segments(&pattern[1..], &path[1..]),
    }
}

/// `*`, `?`, `[...]` within one path segment.
fn glob_segment(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|i| go(&p[1..], &t[i..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some('[') => {
                let Some(end) = p.iter().position(|c| *c == ']') else {
                    return !t.is_empty() && t[0] == '[' && go(&p[1..], &t[1..]);
                };
                let Some(&c) = t.first() else { return false };
                let class = &p[1..end];
                let (neg, class) = match class.first() {
                    Some('^' | '!') => (true, &class[1..]),
                    _ => (false, class),
                };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= c && c <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == c;
                        i += 1;
                    }
                }
                hit != neg && go(&p[end + 1..], &t[1..])
            }
            Some('\\') if p.len() > 1 => !t.is_empty() && t[0] == p[1] && go(&p[2..], &t[1..]),
            Some(c) => !t.is_empty() && t[0] == *c && go(&p[1..], &t[1..]),
        }
    }
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore() {
        let ig = Ignore::parse("# c\n*.log\nbuild/\n!build/keep.txt\n**/secret*\n/tmp\n");
        assert!(ig.excluded("a.log"));
        assert!(!ig.excluded("d/a.log"), "`*.log` matches at the top only");
        assert!(ig.excluded("build/x.o"));
        assert!(!ig.excluded("build/keep.txt"));
        assert!(ig.excluded("deep/down/secret.key"));
        assert!(ig.excluded("secret.txt"));
        assert!(ig.excluded("tmp/x"));
        assert!(!ig.excluded("src/main.rs"));
    }
}
