//! Compose variable interpolation and `.env` files.
//!
//! `$$` is a literal `$`; `$VAR` and `${VAR}` substitute; `${VAR:-d}` and
//! `${VAR-d}` give a default (when unset or empty / when unset);
//! `${VAR:?msg}` and `${VAR?msg}` make a missing variable an error;
//! `${VAR:+alt}` and `${VAR+alt}` substitute `alt` when set. Defaults and
//! alternatives are interpolated themselves.

use std::collections::BTreeMap;

/// The outcome of interpolating one string.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Interpolated {
    pub value: String,
    /// Variables that were not set and had no default (they become "").
    pub unset: Vec<String>,
}

/// Interpolates `text`. Errors carry the message of a `:?` / `?` form or
/// describe bad syntax.
pub fn interpolate(text: &str, env: &BTreeMap<String, String>) -> Result<Interpolated, String> {
    let mut out = Interpolated::default();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '$' {
            out.value.push(c);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.value.push('$');
                i += 2;
            }
            Some('{') => {
                // Find the matching brace, allowing nesting in defaults.
                let mut depth = 0;
                let mut end = None;
                for (j, ch) in chars.iter().enumerate().skip(i + 1) {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(j);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| format!("`{text}`: `${{` without a closing `}}`"))?;
                let inner: String = chars[i + 2..end].iter().collect();
                let piece = expand(&inner, env, &mut out.unset)?;
                out.value.push_str(&piece);
                i = end + 1;
            }
            Some(n) if n.is_ascii_alphabetic() || *n == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                match env.get(&name) {
                    Some(v) => out.value.push_str(v),
                    None => out.unset.push(name),
                }
                i = j;
            }
            _ => {
                // A lone `$` (end of string, or before a character that
                // cannot start a name) stays as it is, as in Compose.
                out.value.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

fn expand(inner: &str, env: &BTreeMap<String, String>, unset: &mut Vec<String>) -> Result<String, String> {
    let name_end = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
    let name = &inner[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("`${{{inner}}}` is not a valid variable reference"));
    }
    let rest = &inner[name_end..];
    let value = env.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let nested = |s: &str, unset: &mut Vec<String>| -> Result<String, String> {
        let r = interpolate(s, env)?;
        unset.extend(r.unset);
        Ok(r.value)
    };
    let (op, arg) = if let Some(a) = rest.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = rest.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = rest.strip_prefix(":+") {
        (":+", a)
    } else if let Some(a) = rest.strip_prefix('-') {
        ("-", a)
    } else if let Some(a) = rest.strip_prefix('?') {
        ("?", a)
    } else if let Some(a) = rest.strip_prefix('+') {
        ("+", a)
    } else if rest.is_empty() {
        ("", "")
    } else {
        return Err(format!("`${{{inner}}}`: unknown operator `{rest}`"));
    };
    Ok(match op {
        "" => match value {
            Some(v) => v.clone(),
            None => {
                unset.push(name.to_string());
                String::new()
            }
        },
        ":-" => {
            if set_nonempty {
                value.cloned().unwrap_or_default()
            } else {
                nested(arg, unset)?
            }
        }
        "-" => match value {
            Some(v) => v.clone(),
            None => nested(arg, unset)?,
        },
        ":?" | "?" => {
            let ok = if op == ":?" { set_nonempty } else { value.is_some() };
            if !ok {
                let msg = nested(arg, unset)?;
                return Err(if msg.is_empty() {
                    format!("required variable {name} is missing a value")
                } else {
                    format!("required variable {name} is missing a value: {msg}")
                });
            }
            value.cloned().unwrap_or_default()
        }
        ":+" => {
            if set_nonempty {
                nested(arg, unset)?
            } else {
                String::new()
            }
        }
        "+" => {
            if value.is_some() {
                nested(arg, unset)?
            } else {
                String::new()
            }
        }
        _ => unreachable!("operators listed above"),
    })
}

/// Parses a `.env` file: `KEY=value` lines, `#` comments, optional
/// `export `, single quotes literal, double quotes with `\n`, `\"`, `\\`
/// escapes. Unquoted values lose trailing ` # comments`. Errors name the
/// line.
pub fn parse_dotenv(text: &str) -> Result<BTreeMap<String, String>, (usize, String)> {
    let mut out = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((n + 1, format!("expected KEY=VALUE, found `{line}`")));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-') {
            return Err((n + 1, format!("`{key}` is not a variable name")));
        }
        let value = value.trim();
        let value = if let Some(v) = value.strip_prefix('\'') {
            v.strip_suffix('\'').ok_or((n + 1, "unterminated single quote".to_string()))?.to_string()
        } else if let Some(v) = value.strip_prefix('"') {
            let v = v.strip_suffix('"').ok_or((n + 1, "unterminated double quote".to_string()))?;
            let mut s = String::new();
            let mut chars = v.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some(other) => s.push(other),
                        None => s.push('\\'),
                    }
                } else {
                    s.push(c);
                }
            }
            s
        } else {
            value.split(" #").next().unwrap_or_default().trim().to_string()
        };
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BTreeMap<String, String> {
        [("A", "1"), ("EMPTY", ""), ("NAME", "web")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn i(s: &str) -> String {
        interpolate(s, &env()).unwrap().value
    }

    #[test]
    fn forms() {
        assert_eq!(i("x$A-${A}y"), "x1-1y");
        assert_eq!(i("$$A"), "$A");
        assert_eq!(i("${MISSING:-dflt}"), "dflt");
        assert_eq!(i("${EMPTY:-dflt}"), "dflt");
        assert_eq!(i("${EMPTY-dflt}"), "");
        assert_eq!(i("${MISSING-${NAME}-x}"), "web-x");
        assert_eq!(i("${A:+yes}${MISSING:+no}"), "yes");
        assert_eq!(i("cost: 5$"), "cost: 5$");
        let r = interpolate("${MISSING}", &env()).unwrap();
        assert_eq!((r.value.as_str(), r.unset), ("", vec!["MISSING".to_string()]));
        assert_eq!(
            interpolate("${MISSING:?set it please}", &env()).unwrap_err(),
            "required variable MISSING is missing a value: set it please"
        );
        assert!(interpolate("${EMPTY:?}", &env()).is_err());
        assert!(interpolate("${EMPTY?}", &env()).is_ok());
        assert!(interpolate("${A", &env()).is_err());
        assert!(interpolate("${1A}", &env()).is_err());
    }

    #[test]
    fn dotenv() {
        let env = parse_dotenv("# c\nexport A=1\nB = 'x $y'\nC=\"a\\nb\"\nD=v # comment\n\n").unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x $y");
        assert_eq!(env["C"], "a\nb");
        assert_eq!(env["D"], "v");
        assert_eq!(parse_dotenv("A=1\nnot a line\n").unwrap_err().0, 2);
    }
}
