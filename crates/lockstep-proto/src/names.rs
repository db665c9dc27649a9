//! Event type names and the patterns that select them.
//!
//! A type name is one or more dot-separated segments of lowercase ASCII letters, digits, `_` and `-`,
//! each starting with a letter or digit: `account.opened`, `funds.deposited`, `order-v2.placed`.
//!
//! A pattern has the same shape, and any segment may instead be:
//! - `*`: exactly one segment (`account.*` matches `account.opened`, not `account.fee.charged`);
//! - `>` as the last segment: one or more remaining segments (`account.>` matches both).
//!
//! The pattern `*` on its own is shorthand for `>`: every type. The `lockstep.` prefix is reserved
//! for the broker's own control records.

use std::fmt;

/// Longest type name or pattern accepted, in bytes.
pub const MAX_TYPE_LEN: usize = 255;

/// Prefix of the broker's control records; clients cannot publish under it.
pub const RESERVED_PREFIX: &str = "lockstep.";

/// Why a type name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(String);

fn valid_segment(seg: &str) -> bool {
    let mut bytes = seg.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check_len(what: &str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError(format!("{what} is empty")));
    }
    if s.len() > MAX_TYPE_LEN {
        return Err(NameError(format!(
            "{what} is {} bytes long; the limit is {MAX_TYPE_LEN}",
            s.len()
        )));
    }
    Ok(())
}

/// Checks that `name` is a valid event type name (any prefix, including the reserved one).
pub fn validate_type(name: &str) -> Result<(), NameError> {
    check_len("event type", name)?;
    if let Some(bad) = name.split('.').find(|seg| !valid_segment(seg)) {
        return Err(NameError(format!(
            "event type {name:?} has an invalid segment {bad:?}: segments are lowercase letters, \
             digits, '_' and '-', separated by '.', e.g. \"account.opened\""
        )));
    }
    Ok(())
}

/// Checks that a client may publish an event of type `name`: valid and not reserved.
pub fn validate_client_type(name: &str) -> Result<(), NameError> {
    validate_type(name)?;
    if is_reserved(name) {
        return Err(NameError(format!(
            "event type {name:?} uses the reserved prefix {RESERVED_PREFIX:?}: those are the \
             broker's control records"
        )));
    }
    Ok(())
}

/// Whether `name` is a control record type (`lockstep.` prefix).
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A parsed type pattern such as `account.*` or `billing.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypePattern {
    source: String,
    segments: Vec<Segment>,
}

impl TypePattern {
    /// Parses a pattern; see the module documentation for the grammar.
    pub fn parse(pattern: &str) -> Result<Self, NameError> {
        check_len("type pattern", pattern)?;
        let text = if pattern == "*" { ">" } else { pattern };
        let parts: Vec<&str> = text.split('.').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "*" => Segment::One,
                ">" if i == last => Segment::Rest,
                ">" => {
                    return Err(NameError(format!(
                        "type pattern {pattern:?}: '>' may only be the last segment"
                    )));
                }
                lit if valid_segment(lit) => Segment::Literal(lit.to_owned()),
                bad => {
                    return Err(NameError(format!(
                        "type pattern {pattern:?} has an invalid segment {bad:?}: use lowercase \
                         names, '*' for one segment or a trailing '>' for the rest"
                    )));
                }
            };
            segments.push(seg);
        }
        Ok(Self {
            source: pattern.to_owned(),
            segments,
        })
    }

    /// Whether this pattern selects the type `name`.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = name.split('.');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return parts.next().is_some(),
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for TypePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A set of patterns: a type is selected when any pattern matches. The empty set selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFilter {
    patterns: Vec<TypePattern>,
}

impl TypeFilter {
    /// A filter that selects every type.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses a comma-separated list such as `account.*,billing.>`; blank items are ignored.
    pub fn parse_list(list: &str) -> Result<Self, NameError> {
        Self::from_patterns(list.split(',').map(str::trim).filter(|p| !p.is_empty()))
    }

    /// Parses each pattern of `patterns`.
    pub fn from_patterns<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, NameError> {
        let patterns = patterns
            .into_iter()
            .map(TypePattern::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// Whether this filter selects every type.
    pub fn is_all(&self) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.segments == [Segment::Rest])
    }

    /// Whether the type `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(name))
    }

    /// The patterns, as written.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(TypePattern::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        for ok in [
            "account.opened",
            "a",
            "order-v2.placed",
            "x_1.y",
            "9lives.born",
        ] {
            assert!(validate_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Account.opened",
            "account..opened",
            ".account",
            "account.",
            "account opened",
            "-x.y",
            "a.*",
            "a.>",
        ] {
            assert!(validate_type(bad).is_err(), "{bad:?}");
        }
        assert!(validate_type(&"a".repeat(MAX_TYPE_LEN + 1)).is_err());
    }

    #[test]
    fn reserved_prefix_is_refused_for_clients() {
        assert!(validate_type("lockstep.barrier").is_ok());
        let err = validate_client_type("lockstep.barrier").unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        assert!(validate_client_type("lockstepper.ran").is_ok());
    }

    #[test]
    fn pattern_matching() {
        let cases = [
            ("account.*", "account.opened", true),
            ("account.*", "account.fee.charged", false),
            ("account.*", "account", false),
            ("account.>", "account.fee.charged", true),
            ("account.>", "account", false),
            ("*", "anything.at.all", true),
            (">", "x", true),
            ("*.opened", "account.opened", true),
            ("*.opened", "account.closed", false),
            ("account.opened", "account.opened", true),
            ("account.opened", "account.opened.v2", false),
        ];
        for (pattern, name, expected) in cases {
            let p = TypePattern::parse(pattern).unwrap();
            assert_eq!(p.matches(name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn bad_patterns() {
        for bad in ["", "a.>.b", "A.*", "a..b", "a.**", "a,b"] {
            assert!(TypePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filters() {
        let f = TypeFilter::parse_list("account.*, billing.>").unwrap();
        assert!(f.matches("account.opened"));
        assert!(f.matches("billing.invoice.sent"));
        assert!(!f.matches("shipping.sent"));
        assert!(!f.is_all());
        assert!(TypeFilter::parse_list("").unwrap().is_all());
        assert!(TypeFilter::parse_list("a.b,*").unwrap().is_all());
        assert!(TypeFilter::parse_list("a.b,A").is_err());
    }
}
