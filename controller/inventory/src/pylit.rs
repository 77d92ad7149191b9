//! The two bits of Python an INI inventory's values go through in Ansible:
//! `shlex.split(line, comments=True)` for a host line, and
//! `ast.literal_eval` for every value (a value that is not a Python literal
//! stays the text it was).
//!
//! [`literal`] reads Python's literal forms: numbers (`_` separators,
//! `0x`/`0o`/`0b`), strings (single, double and triple quotes, `r`/`u`/`b`
//! prefixes, escapes, adjacent strings joined), `True`, `False`, `None`,
//! lists, tuples and sets (lists, as Ansible makes them), dicts, one sign on
//! a number, and comments. What it does not read (complex numbers,
//! integers beyond 64 bits, `\N{...}` escapes) is kept as text, as Ansible
//! keeps any text that is not a literal.

use mlops_yaml::{Node, Value};

/// `shlex.split(line, comments=True)` in POSIX mode: words split on
/// spaces, tabs and line ends, `'...'` taken as it is, `"..."` with only
/// `\"` and `\\` as escapes (any other backslash kept), a backslash outside
/// quotes escaping the next character, `#` starting a comment where a word
/// starts or inside one.
pub fn shlex_split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // Whether the current word exists even if empty (`''` is a word).
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' => break,
            '\\' => {
                let next = chars.next().ok_or("no escaped character after the last `\\`")?;
                word.push(next);
                in_word = true;
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("no closing quotation (`'`)".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("no closing quotation (`\"`)".into()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("no closing quotation (`\"`)".into()),
                    }
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// What `ast.literal_eval(text)` gives, as Ansible keeps it; `None` when
/// the text is not a Python literal (Ansible then keeps the text itself).
pub fn literal(text: &str, line: usize) -> Option<Node> {
    // literal_eval strips leading spaces and tabs (not other whitespace).
    let text = text.trim_start_matches([' ', '\t']);
    let mut p = Parser { s: text.as_bytes(), text, i: 0, line };
    let first = p.expr(0)?;
    // `80,443` (or `1,`) is a tuple, which Ansible keeps as a list.
    let node = if p.eat(b',') {
        let mut items = vec![first];
        loop {
            p.skip_space();
            if p.i == p.s.len() {
                break;
            }
            items.push(p.expr(1)?);
            if !p.eat(b',') {
                break;
            }
        }
        p.node(Value::Seq(items))
    } else {
        first
    };
    p.skip_space();
    (p.i == p.s.len()).then_some(node)
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
    line: usize,
}

impl Parser<'_> {
    fn node(&self, value: Value) -> Node {
        Node { value, line: self.line, column: 1 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Whitespace, line continuations and comments between tokens. Inside
    /// brackets newlines are whitespace too; at the top level the text is
    /// one line anyway (or a newline ends it, which `literal` then refuses
    /// unless only whitespace follows).
    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => self.i += 1,
                b'\\' if self.s.get(self.i + 1) == Some(&b'\n') => self.i += 2,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self, depth: usize) -> Option<Node> {
        if depth > 64 {
            return None;
        }
        self.skip_space();
        match self.peek()? {
            b'[' => {
                self.i += 1;
                let items = self.items(b']', depth)?;
                Some(self.node(Value::Seq(items)))
            }
            b'(' => {
                self.i += 1;
                // `()` and `(a,)` are tuples, `(a)` is `a`.
                if self.eat(b')') {
                    return Some(self.node(Value::Seq(Vec::new())));
                }
                let first = self.expr(depth + 1)?;
                if self.eat(b')') {
                    return Some(first);
                }
                if !self.eat(b',') {
                    return None;
                }
                let mut items = vec![first];
                items.extend(self.items(b')', depth)?);
                Some(self.node(Value::Seq(items)))
            }
            b'{' => {
                self.i += 1;
                self.dict_or_set(depth)
            }
            b'+' | b'-' => {
                let negative = self.peek() == Some(b'-');
                self.i += 1;
                self.skip_space();
                match self.number()?.value {
                    Value::Int(i) if negative => Some(self.node(Value::Int(i.checked_neg()?))),
                    Value::Float(f) if negative => Some(self.node(Value::Float(-f))),
                    v => Some(self.node(v)),
                }
            }
            b'0'..=b'9' | b'.' => {
                if self.s[self.i..].starts_with(b"...") {
                    // Ellipsis: Ansible keeps it as the text `...`.
                    self.i += 3;
                    return Some(self.node(Value::Str("...".into())));
                }
                self.number()
            }
            b'"' | b'\'' => self.strings(),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                    self.i += 1;
                }
                let word = &self.text[start..self.i];
                match word {
                    "True" => Some(self.node(Value::Bool(true))),
                    "False" => Some(self.node(Value::Bool(false))),
                    "None" => Some(self.node(Value::Null)),
                    // A string prefix (`r'..'`, `b".."`, `u'..'`, `rb'..'`).
                    _ if matches!(self.peek(), Some(b'"' | b'\'')) && is_prefix(word) => {
                        self.i = start;
                        self.strings()
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Items up to `close`, a trailing comma allowed.
    fn items(&mut self, close: u8, depth: usize) -> Option<Vec<Node>> {
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Some(items);
            }
            items.push(self.expr(depth + 1)?);
            if self.eat(close) {
                return Some(items);
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    fn dict_or_set(&mut self, depth: usize) -> Option<Node> {
        if self.eat(b'}') {
            return Some(self.node(Value::Map(Vec::new())));
        }
        let first = self.expr(depth + 1)?;
        if self.eat(b':') {
            let mut entries = vec![(first, self.expr(depth + 1)?)];
            loop {
                if self.eat(b'}') {
                    break;
                }
                if !self.eat(b',') {
                    return None;
                }
                if self.eat(b'}') {
                    break;
                }
                let k = self.expr(depth + 1)?;
                if !self.eat(b':') {
                    return None;
                }
                entries.push((k, self.expr(depth + 1)?));
            }
            // A later key replaces an earlier one, as in a Python dict.
            let mut out: Vec<(Node, Node)> = Vec::new();
            for (k, v) in entries {
                match out.iter_mut().find(|(old, _)| old.value == k.value) {
                    Some(slot) => slot.1 = v,
                    None => out.push((k, v)),
                }
            }
            return Some(self.node(Value::Map(out)));
        }
        // A set: Ansible turns it into a list (without repeats).
        let mut items = vec![first];
        if !self.eat(b'}') {
            if !self.eat(b',') {
                return None;
            }
            items.extend(self.items(b'}', depth)?);
        }
        let mut out: Vec<Node> = Vec::new();
        for item in items {
            if !out.iter().any(|o| o.value == item.value) {
                out.push(item);
            }
        }
        Some(self.node(Value::Seq(out)))
    }

    fn number(&mut self) -> Option<Node> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.') {
            // An exponent's sign belongs to the number.
            let c = self.s[self.i];
            self.i += 1;
            if matches!(c, b'e' | b'E')
                && matches!(self.peek(), Some(b'+' | b'-'))
                && !self.text[start..].starts_with("0x")
                && !self.text[start..].starts_with("0X")
            {
                self.i += 1;
            }
        }
        let raw = &self.text[start..self.i];
        // Underscores only between digits.
        if raw.starts_with('_') || raw.ends_with('_') || raw.contains("__") {
            return None;
        }
        let digits = raw.replace('_', "");
        let lower = digits.to_ascii_lowercase();
        let radix = |prefix: &str, radix: u32| -> Option<Option<Value>> {
            let rest = lower.strip_prefix(prefix)?;
            Some(i64::from_str_radix(rest, radix).ok().map(Value::Int))
        };
        if let Some(v) = radix("0x", 16).or_else(|| radix("0o", 8)).or_else(|| radix("0b", 2)) {
            return v.map(|v| self.node(v));
        }
        if raw.contains("._") || raw.contains("_.") || lower.ends_with('j') {
            return None;
        }
        if lower.bytes().all(|c| c.is_ascii_digit()) {
            // `0123` is a syntax error in Python 3; `000` is zero.
            if lower.len() > 1 && lower.starts_with('0') && lower.bytes().any(|c| c != b'0') {
                return None;
            }
            return lower.parse::<i64>().ok().map(|i| self.node(Value::Int(i)));
        }
        let valid_float = lower.bytes().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'+' | b'-'))
            && lower.bytes().any(|c| c.is_ascii_digit());
        if !valid_float {
            return None;
        }
        lower.parse::<f64>().ok().filter(|f| f.is_finite()).map(|f| self.node(Value::Float(f)))
    }

    /// One or more adjacent string literals, joined.
    fn strings(&mut self) -> Option<Node> {
        let mut out = String::new();
        let mut any = false;
        loop {
            self.skip_space();
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                self.i += 1;
            }
            let prefix = &self.text[start..self.i];
            if !matches!(self.peek(), Some(b'"' | b'\'')) || !is_prefix(prefix) {
                self.i = start;
                break;
            }
            let raw = prefix.to_ascii_lowercase().contains('r');
            out.push_str(&self.string(raw)?);
            any = true;
        }
        any.then(|| self.node(Value::Str(out)))
    }

    fn string(&mut self, raw: bool) -> Option<String> {
        let q = self.peek()?;
        let triple = self.s[self.i..].starts_with(&[q, q, q]);
        self.i += if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let rest = &self.text[self.i..];
            let c = rest.chars().next()?;
            if c as u32 == q as u32 {
                if !triple {
                    self.i += 1;
                    return Some(out);
                }
                if self.s[self.i..].starts_with(&[q, q, q]) {
                    self.i += 3;
                    return Some(out);
                }
            }
            if c == '\n' && !triple {
                return None;
            }
            self.i += c.len_utf8();
            if c != '\\' {
                out.push(c);
                continue;
            }
            let e = self.text[self.i..].chars().next()?;
            self.i += e.len_utf8();
            if raw {
                // A raw string keeps the backslash (and a quote after it).
                out.push('\\');
                out.push(e);
                continue;
            }
            match e {
                '\n' => {}
                '\\' | '\'' | '"' => out.push(e),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'a' => out.push('\x07'),
                'b' => out.push('\x08'),
                'f' => out.push('\x0c'),
                'v' => out.push('\x0b'),
                '0'..='7' => {
                    let mut v = e.to_digit(8)?;
                    for _ in 0..2 {
                        match self.peek() {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                self.i += 1;
                            }
                            _ => break,
                        }
                    }
                    out.push(char::from_u32(v)?);
                }
                'x' | 'u' | 'U' => {
                    let n = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let hex = self.text.get(self.i..self.i + n)?;
                    if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                        return None;
                    }
                    self.i += n;
                    out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                }
                // `\N{NAME}` needs Unicode's name table: kept as text.
                'N' => return None,
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }
}

/// Python's string prefixes that give a literal (`f` strings are not).
fn is_prefix(p: &str) -> bool {
    matches!(p.to_ascii_lowercase().as_str(), "" | "r" | "u" | "b" | "br" | "rb")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(text: &str) -> Option<serde_json::Value> {
        literal(text, 1).map(|n| n.to_json())
    }

    #[test]
    fn literals_as_python_reads_them() {
        use serde_json::json;
        assert_eq!(lit("222"), Some(json!(222)));
        assert_eq!(lit("-5"), Some(json!(-5)));
        assert_eq!(lit("1_000"), Some(json!(1000)));
        assert_eq!(lit("0x1F"), Some(json!(31)));
        assert_eq!(lit("1.5e3"), Some(json!(1500.0)));
        assert_eq!(lit("True"), Some(json!(true)));
        assert_eq!(lit("None"), Some(json!(null)));
        assert_eq!(lit("'03#pa33w0rd'"), Some(json!("03#pa33w0rd")));
        assert_eq!(lit(r#""a\tb" 'c'"#), Some(json!("a\tbc")));
        assert_eq!(lit(r"r'a\nb'"), Some(json!("a\\nb")));
        assert_eq!(lit("[1, 'x', (2,), {'k': None}]"), Some(json!([1, "x", [2], {"k": null}])));
        assert_eq!(lit("23 # a comment"), Some(json!(23)));
        assert_eq!(lit("..."), Some(json!("...")));
        assert_eq!(lit("80,443"), Some(json!([80, 443])));
        assert_eq!(lit("'a', "), Some(json!(["a"])));
        // Not literals: Ansible keeps the text.
        for text in ["true", "yes", "0123", "1 2", "", "hello # c", "--5", "1+2j", "a=b", "{'a': }", "f'x'"] {
            assert_eq!(lit(text), None, "{text}");
        }
    }

    #[test]
    fn shlex_as_python_splits() {
        assert_eq!(shlex_split(r#"h1 a=1 b="x y" c='p#q' # note"#).unwrap(), ["h1", "a=1", "b=x y", "c=p#q"]);
        assert_eq!(shlex_split(r#"h mysecret="'03#pa33w0rd'""#).unwrap(), ["h", "mysecret='03#pa33w0rd'"]);
        assert_eq!(shlex_split(r#"h a=b#c d=\e "\q\"""#).unwrap(), ["h", "a=b"]);
        assert_eq!(shlex_split(r#"h p="\$HOME \"q\" \\""#).unwrap(), ["h", r#"p=\$HOME "q" \"#]);
        assert_eq!(shlex_split(r#"h e='' f=\ g"#).unwrap(), ["h", "e=", "f= g"]);
        assert!(shlex_split("h a='x").unwrap_err().contains("no closing quotation"));
    }
}
