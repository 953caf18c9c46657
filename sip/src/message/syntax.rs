//! Lexical helpers shared by the SIP parsers (RFC 3261 section 25.1): character classes,
//! linear white space, quoted strings, `%` escapes and comma-separated lists that respect quotes
//! and angle brackets, plus the `;name=value` generic-parameter scanner used by header values.
//!
//! This module parses no header or URI by itself; it only offers the building blocks.

use std::borrow::Cow;

/// Builds a 256-entry membership table from a `const fn(u8) -> bool` predicate, so that the
/// scanners test a character class with one load instead of a chain of comparisons.
macro_rules! byte_table {
    ($pred:ident) => {{
        let mut table = [false; 256];
        let mut i = 0;
        while i < 256 {
            table[i] = $pred(i as u8);
            i += 1;
        }
        table
    }};
}
pub(crate) use byte_table;

const fn token_pred(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

static TOKEN: [bool; 256] = byte_table!(token_pred);

/// `token` characters (RFC 3261 section 25.1).
#[inline]
pub(crate) fn is_token_byte(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

/// True when every byte of `s` is a token character and `s` is not empty.
pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_token_byte(b))
}

/// Space or horizontal tab.
pub(crate) const fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Trims spaces and tabs on both sides.
pub(crate) fn trim_ws(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_ws(b)).map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or_default()
}

/// Trims spaces and tabs on both sides of a string.
pub(crate) fn trim_ws_str(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// Index of the first byte at or after `pos` that is not a space or tab.
pub(crate) fn skip_ws(s: &[u8], mut pos: usize) -> usize {
    while let Some(&b) = s.get(pos) {
        if !is_ws(b) {
            break;
        }
        pos += 1;
    }
    pos
}

/// Given `s[start] == b'"'`, returns the index just after the closing quote, honouring
/// `\` quoted-pairs. `None` when the string is not terminated.
pub(crate) fn quoted_end(s: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while let Some(&b) = s.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Removes the surrounding quotes of a quoted-string and resolves its quoted-pairs.
/// A value that is not quoted is returned unchanged.
pub(crate) fn unquote(raw: &str) -> Cow<'_, str> {
    let inner = match raw
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        Some(inner) if raw.len() >= 2 => inner,
        _ => return Cow::Borrowed(raw),
    };
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Writes `s` as a quoted-string, escaping `"` and `\`. CR and LF, which can never appear in a
/// header value, are replaced by spaces.
pub(crate) fn quote_into(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => out.push(' '),
            _ => out.push(c),
        }
    }
    out.push('"');
}

/// Returns `s` as a quoted-string.
#[cfg(test)]
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::new();
    quote_into(&mut out, s);
    out
}

/// Value of a hexadecimal digit.
pub(crate) const fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Resolves `%HH` escapes. An invalid escape (a `%` not followed by two hex digits) is kept
/// literally. Borrows when there is nothing to resolve.
pub(crate) fn percent_decode(s: &str) -> Cow<'_, [u8]> {
    let bytes = s.as_bytes();
    if !bytes.contains(&b'%') {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Cow::Owned(out)
}

/// Appends `bytes` to `out`, escaping every byte for which `keep` is false as `%HH`.
pub(crate) fn percent_encode_into(out: &mut String, bytes: &[u8], keep: impl Fn(u8) -> bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Splits a header value at the commas that separate list elements, ignoring commas inside
/// quoted strings and inside `<...>`. Each element is trimmed of surrounding white space; empty
/// elements are yielded too (callers decide whether they are allowed).
pub(crate) fn split_list(s: &str) -> ListSplit<'_> {
    ListSplit {
        s,
        pos: 0,
        done: false,
    }
}

/// Iterator returned by [`split_list`].
pub(crate) struct ListSplit<'a> {
    s: &'a str,
    pos: usize,
    done: bool,
}

impl<'a> Iterator for ListSplit<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.done {
            return None;
        }
        let bytes = self.s.as_bytes();
        let start = self.pos;
        let mut i = start;
        // Jump from one interesting byte to the next: `,` ends an element, `"` and `<` open
        // spans in which commas do not count.
        while let Some(rel) = bytes
            .get(i..)
            .and_then(|rest| memchr::memchr3(b',', b'"', b'<', rest))
        {
            let at = i + rel;
            match bytes.get(at) {
                Some(b'"') => match quoted_end(bytes, at) {
                    Some(end) => i = end,
                    None => break,
                },
                Some(b'<') => match bytes.get(at..).and_then(|rest| memchr::memchr(b'>', rest)) {
                    Some(r) => i = at + r + 1,
                    None => break,
                },
                _ => {
                    self.pos = at + 1;
                    return Some(trim_ws_str(self.s.get(start..at).unwrap_or_default()));
                }
            }
        }
        self.done = true;
        Some(trim_ws_str(self.s.get(start..).unwrap_or_default()))
    }
}

/// Error of the generic-parameter scanner: a short description of what is wrong.
pub(crate) type SyntaxResult<T> = Result<T, &'static str>;

/// Scans `*( SEMI generic-param )` (RFC 3261 section 25.1) in `s`, which must hold nothing else
/// apart from white space. `generic-param = token [ EQUAL gen-value ]` where `gen-value` is a
/// token, a host (IPv6 references included) or a quoted-string; values are returned as written
/// (quotes kept).
pub(crate) fn scan_params(s: &str) -> ParamScan<'_> {
    ParamScan {
        s,
        pos: 0,
        failed: false,
    }
}

/// Iterator returned by [`scan_params`].
pub(crate) struct ParamScan<'a> {
    s: &'a str,
    pos: usize,
    failed: bool,
}

const fn param_value_pred(b: u8) -> bool {
    b > 0x20 && b != 0x7f && !matches!(b, b';' | b',' | b'"' | b'<' | b'>' | b'=' | b'\\')
}

static PARAM_VALUE: [bool; 256] = byte_table!(param_value_pred);

/// Bytes allowed in an unquoted parameter value: visible ASCII and UTF-8 except separators.
#[inline]
fn is_param_value_byte(b: u8) -> bool {
    PARAM_VALUE[usize::from(b)]
}

impl<'a> ParamScan<'a> {
    fn step(&mut self) -> SyntaxResult<Option<(&'a str, Option<&'a str>)>> {
        let bytes = self.s.as_bytes();
        let mut i = skip_ws(bytes, self.pos);
        match bytes.get(i) {
            None => return Ok(None),
            Some(b';') => i += 1,
            Some(_) => return Err("unexpected character where ';' was expected"),
        }
        i = skip_ws(bytes, i);
        let name_start = i;
        while bytes.get(i).is_some_and(|&b| is_token_byte(b)) {
            i += 1;
        }
        if i == name_start {
            return Err("empty parameter name");
        }
        let name = self.s.get(name_start..i).unwrap_or_default();
        let after_name = skip_ws(bytes, i);
        if bytes.get(after_name) != Some(&b'=') {
            self.pos = i;
            return Ok(Some((name, None)));
        }
        i = skip_ws(bytes, after_name + 1);
        let value_start = i;
        if bytes.get(i) == Some(&b'"') {
            i = quoted_end(bytes, i).ok_or("unterminated quoted parameter value")?;
        } else {
            while bytes.get(i).is_some_and(|&b| is_param_value_byte(b)) {
                i += 1;
            }
            if i == value_start {
                return Err("empty parameter value");
            }
        }
        self.pos = i;
        Ok(Some((
            name,
            Some(self.s.get(value_start..i).unwrap_or_default()),
        )))
    }
}

impl<'a> Iterator for ParamScan<'a> {
    type Item = SyntaxResult<(&'a str, Option<&'a str>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Finds the value of parameter `name` (case-insensitive) in a generic-parameter list, without
/// allocating. `Some(None)` is a parameter present without a value. Stops at a syntax error.
pub(crate) fn find_param<'a>(params: &'a str, name: &str) -> Option<Option<&'a str>> {
    scan_params(params)
        .map_while(Result::ok)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_classes() {
        assert!(is_token(b"INVITE"));
        assert!(is_token(b"!interesting-Method0123456789_*+`.%indeed'~"));
        assert!(!is_token(b""));
        assert!(!is_token(b"a b"));
        assert!(!is_token(b"a,b"));
    }

    #[test]
    fn trims_white_space() {
        assert_eq!(trim_ws(b" \t a b \t"), b"a b");
        assert_eq!(trim_ws(b"   "), b"");
        assert_eq!(trim_ws(b""), b"");
    }

    #[test]
    fn quoted_strings() {
        let s = br#""a \"b\" c" rest"#;
        assert_eq!(quoted_end(s, 0), Some(11));
        assert_eq!(quoted_end(br#""unterminated"#, 0), None);
        assert_eq!(quoted_end(br#""ends in backslash\"#, 0), None);
        assert_eq!(unquote(r#""J Rosenberg \\\"""#), r#"J Rosenberg \""#);
        assert_eq!(unquote("token"), "token");
        assert_eq!(unquote("\""), "\"");
        assert_eq!(quote(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(unquote(&quote("x\"y\\z")), "x\"y\\z");
    }

    #[test]
    fn percent_escapes() {
        assert_eq!(&*percent_decode("a%20b%41"), b"a bA");
        assert_eq!(&*percent_decode("null-%00-null"), b"null-\0-null");
        assert_eq!(&*percent_decode("bad%zz%4"), b"bad%zz%4");
        assert!(matches!(percent_decode("plain"), Cow::Borrowed(_)));
        let mut out = String::new();
        percent_encode_into(&mut out, b"a b\0", |b| b.is_ascii_alphanumeric());
        assert_eq!(out, "a%20b%00");
    }

    #[test]
    fn list_splitting_respects_quotes_and_angles() {
        let items: Vec<&str> =
            split_list(r#""Doe, John" <sip:a@b;x=1,2>;p="1,2" , <sip:c@d> ,x"#).collect();
        assert_eq!(
            items,
            vec![r#""Doe, John" <sip:a@b;x=1,2>;p="1,2""#, "<sip:c@d>", "x"]
        );
        let empty: Vec<&str> = split_list(";;,;,,").collect();
        assert_eq!(empty, vec![";;", ";", "", ""]);
        let unterminated: Vec<&str> = split_list(r#""a, b"#).collect();
        assert_eq!(unterminated, vec![r#""a, b"#]);
    }

    #[test]
    fn generic_params() {
        let got: Vec<_> = scan_params(" ; newparam =\t newvalue ;  secondparam ; q = 0.33")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            vec![
                ("newparam", Some("newvalue")),
                ("secondparam", None),
                ("q", Some("0.33"))
            ]
        );
        let quoted: Vec<_> = scan_params(r#";p="a;b""#)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(quoted, vec![("p", Some(r#""a;b""#))]);
        let v6: Vec<_> = scan_params(";received=[2001:db8::1]")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(v6, vec![("received", Some("[2001:db8::1]"))]);
        assert!(scan_params(";;").any(|r| r.is_err()));
        assert!(scan_params(";a=").any(|r| r.is_err()));
        assert!(scan_params("x").any(|r| r.is_err()));
        assert!(scan_params(r#";a="open"#).any(|r| r.is_err()));
        assert_eq!(find_param(";tag=abc;lr", "TAG"), Some(Some("abc")));
        assert_eq!(find_param(";tag=abc;lr", "lr"), Some(None));
        assert_eq!(find_param(";tag=abc;lr", "x"), None);
    }
}
