//! Host patterns, as `--limit` takes them (Ansible's syntax).
//!
//! A pattern is terms separated by `:` or `,`. A term names a group (all its
//! hosts) or a host, and may use `*` and `?` globs. `!term` removes hosts,
//! `&term` keeps only hosts also matched by the term. Unions are taken
//! first, then intersections, then exclusions, as Ansible does.

use std::collections::BTreeSet;

use crate::inventory::Inventory;

/// Ansible's (fnmatch) glob: `*` any run, `?` one character, `[...]` a
/// class (`[!...]` negated); everything else literal. Matched by the `glob`
/// crate, which also matches `.dockerignore` patterns; a pattern that is not
/// a valid glob (an unclosed `[`) matches only itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    is_match(pattern, pattern, text)
}

/// OpenSSH's `Host` patterns: only `*` and `?` are special (`[` and `]`
/// become one-character classes, which `glob` reads literally).
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let escaped: String = pattern
        .chars()
        .map(|c| match c {
            '[' => "[[]".to_string(),
            ']' => "[]]".to_string(),
            c => c.to_string(),
        })
        .collect();
    is_match(&escaped, pattern, text)
}

fn is_match(glob: &str, pattern: &str, text: &str) -> bool {
    match glob::Pattern::new(glob) {
        Ok(p) => p.matches(text),
        Err(_) => pattern == text,
    }
}

/// Hosts of `inv` matched by `pattern`, in inventory order. A term that
/// matches nothing is an error (naming the term), so a typo in `--limit`
/// never silently deploys to nothing or to the wrong set.
pub fn select(inv: &Inventory, pattern: &str) -> Result<Vec<String>, String> {
    let mut union = BTreeSet::new();
    let mut intersections = Vec::new();
    let mut exclusions = BTreeSet::new();
    let terms: Vec<&str> = pattern.split([':', ',']).map(str::trim).filter(|t| !t.is_empty()).collect();
    if terms.is_empty() {
        return Err("the pattern is empty".into());
    }
    for term in terms {
        if let Some(t) = term.strip_prefix('!') {
            exclusions.extend(matches(inv, t)?);
        } else if let Some(t) = term.strip_prefix('&') {
            intersections.push(matches(inv, t)?);
        } else {
            union.extend(matches(inv, term)?);
        }
    }
    if union.is_empty() && !intersections.is_empty() {
        union = inv.hosts_of_group("all");
    }
    for set in &intersections {
        union.retain(|h| set.contains(h));
    }
    union.retain(|h| !exclusions.contains(h));
    Ok(inv.host_names().iter().filter(|h| union.contains(*h)).cloned().collect())
}

fn matches(inv: &Inventory, term: &str) -> Result<BTreeSet<String>, String> {
    if term.starts_with('~') {
        return Err(format!("`{term}`: regular-expression patterns are not supported; use `*` and `?` globs"));
    }
    let mut out = BTreeSet::new();
    for group in inv.group_names() {
        if glob_match(term, group) {
            out.extend(inv.hosts_of_group(group));
        }
    }
    for host in inv.host_names() {
        if glob_match(term, host) {
            out.insert(host.clone());
        }
    }
    if out.is_empty() {
        return Err(format!("`{term}` matches no group and no host"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn globs() {
        assert!(glob_match("web*", "web01"));
        assert!(glob_match("w?b", "web"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b", "ac"));
        assert!(!glob_match("web", "web1"));
        assert!(glob_match("web[0-2]", "web1") && !glob_match("web[!0-2]", "web1"));
        assert!(glob_match("w{a,b}", "w{a,b}") && !glob_match("w{a,b}", "wa"), "braces are literal");
        assert!(glob_match("web[", "web["), "an invalid glob matches itself");
        assert!(wildcard_match("*.example.com", "db.example.com"));
        assert!(wildcard_match("[10.0.0.1]", "[10.0.0.1]") && !wildcard_match("h[12]", "h1"), "ssh: `[` is literal");
    }

    #[test]
    fn union_intersection_exclusion() {
        let inv = Inventory::parse(
            "all:\n  children:\n    web:\n      hosts:\n        w1:\n        w2:\n    eu:\n      hosts:\n        w1:\n        d1:\n    db:\n      hosts:\n        d1:\n",
            Path::new("i.yml"),
        )
        .unwrap();
        assert_eq!(select(&inv, "web").unwrap(), ["w1", "w2"]);
        assert_eq!(select(&inv, "web:db").unwrap(), ["w1", "w2", "d1"]);
        assert_eq!(select(&inv, "web:&eu").unwrap(), ["w1"]);
        assert_eq!(select(&inv, "all:!web").unwrap(), ["d1"]);
        assert_eq!(select(&inv, "w*,!w2").unwrap(), ["w1"]);
        assert!(select(&inv, "nope").unwrap_err().contains("`nope` matches no group and no host"));
    }
}
