//! An ordered list of `;name[=value]` parameters, used by URIs (uri-parameters), Via, name-addr
//! headers (From, To, Contact, Route...) and media types.
//!
//! Names compare case-insensitively; names and values are kept exactly as written (escapes and
//! quotes included) so that a parsed value serializes back unchanged. It does not parse; the
//! parsers of the owning types fill it.

use std::fmt;

use super::syntax::unquote;

/// One parameter: a name and an optional value, both as written on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Param {
    /// Parameter name as written (compare with [`str::eq_ignore_ascii_case`]).
    pub name: String,
    /// Parameter value as written: `None` for a flag parameter such as `;lr`. Quoted values keep
    /// their quotes; URI parameter values keep their `%` escapes.
    pub value: Option<String>,
}

impl Param {
    /// Creates a parameter.
    pub fn new(name: impl Into<String>, value: Option<impl Into<String>>) -> Self {
        Self {
            name: name.into(),
            value: value.map(Into::into),
        }
    }
}

/// An ordered parameter list. Lookup by name is case-insensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Params(Vec<Param>);

impl Params {
    /// An empty list.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no parameter.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parameters in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Param> {
        self.0.iter()
    }

    /// The first parameter named `name`.
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.0.iter().find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The value of the first parameter named `name`, as written. `None` when the parameter is
    /// absent or has no value.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|p| p.value.as_deref())
    }

    /// The value of the first parameter named `name` with its quotes removed and quoted-pairs
    /// resolved.
    pub fn unquoted_value(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.value(name).map(unquote)
    }

    /// True when a parameter named `name` is present (with or without value).
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets parameter `name`: replaces the value of the first one with that name (removing any
    /// later duplicates) or appends it.
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        let mut found = false;
        self.0.retain_mut(|p| {
            if !p.name.eq_ignore_ascii_case(name) {
                return true;
            }
            if found {
                return false;
            }
            found = true;
            p.value = value.map(str::to_owned);
            true
        });
        if !found {
            self.0.push(Param::new(name, value));
        }
    }

    /// Appends a parameter, even if one with the same name exists.
    pub fn push(&mut self, param: Param) {
        self.0.push(param);
    }

    /// Removes every parameter named `name`; returns true when one was removed.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|p| !p.name.eq_ignore_ascii_case(name));
        before != self.0.len()
    }
}

impl<'a> IntoIterator for &'a Params {
    type Item = &'a Param;
    type IntoIter = std::slice::Iter<'a, Param>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<Param> for Params {
    fn from_iter<T: IntoIterator<Item = Param>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Writes `;name[=value]` for each parameter.
impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            f.write_str(";")?;
            f.write_str(&p.name)?;
            if let Some(v) = &p.value {
                f.write_str("=")?;
                f.write_str(v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_is_case_insensitive_and_set_replaces() {
        let mut p: Params = [
            Param::new("Tag", Some("a")),
            Param::new("lr", None::<String>),
        ]
        .into_iter()
        .collect();
        assert_eq!(p.value("tag"), Some("a"));
        assert!(p.contains("LR"));
        assert_eq!(p.value("lr"), None);
        p.push(Param::new("tag", Some("dup")));
        p.set("TAG", Some("b"));
        assert_eq!(p.len(), 2);
        assert_eq!(p.to_string(), ";Tag=b;lr");
        p.set("q", Some("0.5"));
        assert_eq!(p.to_string(), ";Tag=b;lr;q=0.5");
        assert!(p.remove("lr"));
        assert!(!p.remove("lr"));
        assert_eq!(p.to_string(), ";Tag=b;q=0.5");
    }

    #[test]
    fn unquoted_values() {
        let p: Params = [Param::new("n", Some(r#""a \"b\"""#))]
            .into_iter()
            .collect();
        assert_eq!(p.unquoted_value("n").as_deref(), Some(r#"a "b""#));
    }
}
