//! Tokenizer for auth header values: `scheme param=value, param="quoted", ...`, possibly several
//! challenges in one value, plus the quoting used when formatting.
//!
//! It is tolerant (any amount of whitespace and line folding, empty list elements, missing commas
//! after quoted strings, case-insensitive names) and bounded ([`MAX_HEADER_VALUE_LEN`],
//! [`MAX_PARAMS`]). It knows nothing about what the parameters mean.

use super::{DigestError, MAX_HEADER_VALUE_LEN, MAX_PARAMS};
use std::fmt::Write as _;

/// One scheme with its parameters, e.g. `Digest realm="x", nonce="y"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthItem {
    /// The scheme as written (compare ignoring case).
    pub scheme: String,
    /// Parameters in order: (name lowercased, unquoted value).
    pub params: Vec<(String, String)>,
}

impl AuthItem {
    /// Whether the scheme is `Digest`.
    pub fn is_digest(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("digest")
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// A byte cursor over the input; every slice boundary it produces sits next to an ASCII byte,
/// and slicing goes through `str::get`, so it never panics.
struct Cursor<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_ws) {
            self.pos += 1;
        }
    }

    fn skip_ws_and_commas(&mut self) {
        while self.peek().is_some_and(|b| is_ws(b) || b == b',') {
            self.pos += 1;
        }
    }

    fn malformed(&self, reason: &'static str) -> DigestError {
        DigestError::Malformed {
            at: self.pos,
            reason,
        }
    }

    fn slice(&self, start: usize, end: usize) -> Result<&'a str, DigestError> {
        self.input.get(start..end).ok_or(DigestError::Malformed {
            at: start,
            reason: "not at a character boundary",
        })
    }

    /// A non-empty token, or an error.
    fn token(&mut self, what: &'static str) -> Result<&'a str, DigestError> {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.malformed(what));
        }
        self.slice(start, self.pos)
    }

    /// A quoted-string starting at the opening quote; returns the unescaped content.
    fn quoted(&mut self) -> Result<String, DigestError> {
        let open = self.pos;
        self.pos += 1;
        let rest = self.slice(self.pos, self.input.len())?;
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, escaped)) => out.push(escaped),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(DigestError::Malformed {
            at: open,
            reason: "unterminated quoted string",
        })
    }

    /// An unquoted value: anything up to whitespace, comma or quote (tolerant of peers that
    /// leave URIs and other non-token values unquoted).
    fn unquoted(&mut self) -> Result<&'a str, DigestError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| !is_ws(b) && b != b',' && b != b'"' && !b.is_ascii_control())
        {
            self.pos += 1;
        }
        self.slice(start, self.pos)
    }
}

/// Splits an auth header value into its schemes and parameters.
pub(crate) fn parse_auth_items(input: &str) -> Result<Vec<AuthItem>, DigestError> {
    if input.len() > MAX_HEADER_VALUE_LEN {
        return Err(DigestError::TooLong(input.len()));
    }
    let mut cur = Cursor { input, pos: 0 };
    let mut items = Vec::new();
    let mut total_params = 0usize;
    cur.skip_ws_and_commas();
    while !cur.at_end() {
        let scheme = cur.token("expected an auth scheme")?;
        let mut item = AuthItem {
            scheme: scheme.to_string(),
            params: Vec::new(),
        };
        let mut first = true;
        loop {
            cur.skip_ws_and_commas();
            if cur.at_end() {
                break;
            }
            let item_start = cur.pos;
            let name = cur.token("expected a parameter name")?;
            cur.skip_ws();
            if cur.peek() == Some(b'=') {
                cur.pos += 1;
                cur.skip_ws();
                let value = if cur.peek() == Some(b'"') {
                    cur.quoted()?
                } else {
                    cur.unquoted()?.to_string()
                };
                total_params += 1;
                if total_params > MAX_PARAMS {
                    return Err(DigestError::TooManyParams);
                }
                item.params.push((name.to_ascii_lowercase(), value));
            } else if first && !item.is_digest() {
                // token68 credentials of another scheme (e.g. `Basic dXNlcg`): kept as a
                // nameless parameter, never looked at.
                item.params.push((String::new(), name.to_string()));
            } else {
                // The start of the next challenge.
                cur.pos = item_start;
                break;
            }
            first = false;
        }
        items.push(item);
        if items.len() > MAX_PARAMS {
            return Err(DigestError::TooManyParams);
        }
    }
    if items.is_empty() {
        return Err(DigestError::Empty);
    }
    Ok(items)
}

/// Returns the parameters of a single Digest item as a lookup table that rejects duplicates.
pub(crate) struct ParamTable<'a> {
    params: &'a [(String, String)],
}

impl<'a> ParamTable<'a> {
    /// Checks for duplicate names and wraps the parameters.
    pub fn new(params: &'a [(String, String)]) -> Result<Self, DigestError> {
        for (i, (name, _)) in params.iter().enumerate() {
            if params.iter().skip(i + 1).any(|(other, _)| other == name) {
                return Err(DigestError::DuplicateParam(name.clone()));
            }
        }
        Ok(ParamTable { params })
    }

    /// The value of a parameter (name in lower case).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of a required parameter.
    pub fn require(&self, name: &'static str) -> Result<&'a str, DigestError> {
        self.get(name).ok_or(DigestError::MissingParam(name))
    }
}

/// Writes `name="value"`, escaping `"` and `\` and dropping control characters, which cannot
/// be carried in a header.
pub(crate) fn write_quoted(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes `name=token`.
pub(crate) fn write_token(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, "{name}={value}");
}

/// Whether a value that will be sent contains no control characters (CR, LF, NUL...).
pub(crate) fn is_header_safe(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(item: &AuthItem) -> Vec<(&str, &str)> {
        item.params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn splits_params_with_varied_whitespace_and_quoting() {
        let items = parse_auth_items(
            "Digest  realm = \"a b\" ,nonce=\"x\\\"y\",\r\n\t algorithm=SHA-256,,qop=\"auth,auth-int\"",
        )
        .unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].scheme, "Digest");
        assert_eq!(
            params(&items[0]),
            vec![
                ("realm", "a b"),
                ("nonce", "x\"y"),
                ("algorithm", "SHA-256"),
                ("qop", "auth,auth-int")
            ]
        );
    }

    #[test]
    fn splits_several_challenges() {
        let items = parse_auth_items(
            "Digest realm=\"r\", nonce=\"1\", algorithm=SHA-256, DIGEST realm=\"r\", nonce=\"2\", Basic realm=\"x\"",
        )
        .unwrap();
        assert_eq!(items.len(), 3);
        assert!(items[1].is_digest());
        assert_eq!(params(&items[1]), vec![("realm", "r"), ("nonce", "2")]);
        assert_eq!(items[2].scheme, "Basic");
    }

    #[test]
    fn token68_of_other_schemes_is_skipped() {
        let items = parse_auth_items("Basic QWxhZGRpbjpvcGVu==, Digest realm=\"r\"").unwrap();
        assert_eq!(items.len(), 2);
        assert!(items[1].is_digest());
    }

    #[test]
    fn names_are_lowercased_and_missing_commas_tolerated() {
        let items = parse_auth_items("digest REALM=\"a\"NONCE=\"b\"").unwrap();
        assert_eq!(params(&items[0]), vec![("realm", "a"), ("nonce", "b")]);
    }

    #[test]
    fn errors_on_malformed_values() {
        assert_eq!(parse_auth_items("   "), Err(DigestError::Empty));
        assert!(matches!(
            parse_auth_items("Digest realm=\"open"),
            Err(DigestError::Malformed { .. })
        ));
        assert!(matches!(
            parse_auth_items("\"Digest\" realm=x"),
            Err(DigestError::Malformed { .. })
        ));
        assert!(matches!(
            parse_auth_items("Digest realm=\"x\\"),
            Err(DigestError::Malformed { .. })
        ));
        let long = format!("Digest realm=\"{}\"", "a".repeat(MAX_HEADER_VALUE_LEN));
        assert!(matches!(
            parse_auth_items(&long),
            Err(DigestError::TooLong(_))
        ));
        let many: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert_eq!(
            parse_auth_items(&format!("Digest {}", many.join(","))),
            Err(DigestError::TooManyParams)
        );
    }

    #[test]
    fn non_ascii_values_are_kept() {
        let items = parse_auth_items("Digest username=\"Jäsøn\", realm=ü").unwrap();
        assert_eq!(
            params(&items[0]),
            vec![("username", "Jäsøn"), ("realm", "ü")]
        );
    }

    #[test]
    fn duplicate_params_are_rejected() {
        let items = parse_auth_items("Digest realm=a, Realm=b").unwrap();
        assert!(matches!(
            ParamTable::new(&items[0].params),
            Err(DigestError::DuplicateParam(n)) if n == "realm"
        ));
    }

    #[test]
    fn quoting_escapes_and_drops_control_characters() {
        let mut out = String::new();
        write_quoted(&mut out, "a", "x\"y\\z\r\nw");
        assert_eq!(out, "a=\"x\\\"y\\\\zw\"");
        assert!(!is_header_safe("a\r\nb"));
        assert!(is_header_safe("a\tb"));
    }
}
