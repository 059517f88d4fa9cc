//! The dedupe scope: the tenant, account or principal an idempotency key
//! belongs to.
//!
//! Keys are unique per scope, so two tenants that happen to send the same key
//! never see each other's responses. A scope is an opaque string chosen by the
//! server (never by the client), typically a tenant or account id.
//!
//! ```
//! use pg_idempotency::Scope;
//!
//! let scope = Scope::new("tenant-42")?;
//! assert_eq!(scope.as_str(), "tenant-42");
//! assert!(Scope::new(" tenant-42").is_err());
//! # Ok::<(), pg_idempotency::ScopeError>(())
//! ```

use std::fmt;
use std::str::FromStr;

/// A validated dedupe scope: 1 to [`Scope::MAX_LEN`] bytes of UTF-8, without
/// control characters and without leading or trailing whitespace.
///
/// Control characters are refused because PostgreSQL `text` cannot hold NUL
/// and because scopes end up in logs; surrounding whitespace is refused (not
/// trimmed) because `"t1"` and `"t1 "` would otherwise be two different
/// scopes that look the same. Inner whitespace and any non-control Unicode
/// are allowed. Scopes are compared byte for byte: no case folding or Unicode
/// normalisation is applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(String);

/// Why a scope was rejected.
///
/// Messages never repeat the scope itself, only its length or a byte offset,
/// so they can be logged safely. Byte offsets count from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeError {
    /// The scope is empty.
    #[error(
        "the idempotency scope is empty: pass the tenant, account or principal id that keys \
         are unique within"
    )]
    Empty,
    /// The scope is longer than [`Scope::MAX_LEN`] bytes.
    #[error(
        "the idempotency scope is {len} bytes long but at most {max} are allowed: use a shorter \
         id (for example the tenant's primary key) as the scope",
        max = Scope::MAX_LEN
    )]
    TooLong {
        /// Length of the rejected scope, in bytes.
        len: usize,
    },
    /// The scope is not valid UTF-8 (only from [`Scope::from_bytes`]).
    #[error(
        "the idempotency scope is not valid UTF-8: pass a UTF-8 id (decode or hex-encode \
         binary ids first)"
    )]
    NotUtf8,
    /// The scope contains a control character (such as NUL, a tab or a line
    /// break).
    #[error(
        "the idempotency scope contains a control character at byte offset {position}: \
         remove it (PostgreSQL text cannot store NUL, and logs must not carry control \
         characters)"
    )]
    ControlCharacter {
        /// Byte offset of the first control character.
        position: usize,
    },
    /// The scope starts or ends with whitespace.
    #[error(
        "the idempotency scope starts or ends with whitespace: pass the id without \
         surrounding spaces (it is not trimmed automatically)"
    )]
    SurroundingWhitespace,
}

impl Scope {
    /// Longest accepted scope, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates a scope.
    ///
    /// # Errors
    ///
    /// Returns [`ScopeError::Empty`], [`ScopeError::TooLong`],
    /// [`ScopeError::SurroundingWhitespace`] or
    /// [`ScopeError::ControlCharacter`] if `scope` breaks the rules described
    /// on [`Scope`].
    pub fn new(scope: impl Into<String>) -> Result<Self, ScopeError> {
        let scope = scope.into();
        validate(&scope)?;
        Ok(Self(scope))
    }

    /// Validates a scope given as bytes.
    ///
    /// # Errors
    ///
    /// Returns [`ScopeError::NotUtf8`] if `raw` is not valid UTF-8, otherwise
    /// the errors of [`Scope::new`].
    pub fn from_bytes(raw: &[u8]) -> Result<Self, ScopeError> {
        match std::str::from_utf8(raw) {
            Ok(s) => Self::new(s),
            Err(_) if raw.len() > Self::MAX_LEN => Err(ScopeError::TooLong { len: raw.len() }),
            Err(_) => Err(ScopeError::NotUtf8),
        }
    }

    /// The scope as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The scope as an owned string.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

fn validate(scope: &str) -> Result<(), ScopeError> {
    let (Some(first), Some(last)) = (scope.chars().next(), scope.chars().next_back()) else {
        return Err(ScopeError::Empty);
    };
    if scope.len() > Scope::MAX_LEN {
        return Err(ScopeError::TooLong { len: scope.len() });
    }
    if first.is_whitespace() || last.is_whitespace() {
        return Err(ScopeError::SurroundingWhitespace);
    }
    if let Some((position, _)) = scope.char_indices().find(|&(_, c)| c.is_control()) {
        return Err(ScopeError::ControlCharacter { position });
    }
    Ok(())
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Scope {
    type Error = ScopeError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for Scope {
    type Error = ScopeError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Scope {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<Scope> for String {
    fn from(scope: Scope) -> Self {
        scope.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_safe_message(err: &ScopeError) {
        let msg = err.to_string();
        assert!(msg.len() < 300, "message too long: {msg}");
        assert!(
            !msg.chars().any(char::is_control),
            "control char in {msg:?}"
        );
        assert!(msg.starts_with("the idempotency scope"), "{msg}");
    }

    #[test]
    fn accepts_ordinary_scopes() {
        for raw in [
            "t",
            "tenant-42",
            "acct 7 / eu",
            "ユーザー",
            "a\u{200b}b",
            "🦀",
        ] {
            let scope = Scope::new(raw).unwrap();
            assert_eq!(scope.as_str(), raw);
            assert_eq!(scope.to_string(), raw);
            assert_eq!(scope.as_ref(), raw);
            assert_eq!(raw.parse::<Scope>().unwrap(), scope);
            assert_eq!(Scope::try_from(raw).unwrap(), scope);
            assert_eq!(Scope::try_from(raw.to_owned()).unwrap(), scope);
            assert_eq!(Scope::from_bytes(raw.as_bytes()).unwrap(), scope);
            assert_eq!(String::from(scope.clone()), raw);
            assert_eq!(scope.into_string(), raw);
        }
    }

    #[test]
    fn case_is_preserved() {
        assert_ne!(Scope::new("T1").unwrap(), Scope::new("t1").unwrap());
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(Scope::new(""), Err(ScopeError::Empty));
        assert_eq!(Scope::from_bytes(b""), Err(ScopeError::Empty));
        assert_safe_message(&ScopeError::Empty);
    }

    #[test]
    fn length_limit_is_in_bytes() {
        assert!(Scope::new("a".repeat(255)).is_ok());
        assert_eq!(
            Scope::new("a".repeat(256)),
            Err(ScopeError::TooLong { len: 256 })
        );
        // 85 three-byte characters = 255 bytes; one more is too long.
        assert!(Scope::new("ユ".repeat(85)).is_ok());
        assert_eq!(
            Scope::new("ユ".repeat(86)),
            Err(ScopeError::TooLong { len: 258 })
        );
        let err = Scope::new("x".repeat(10 * 1024)).unwrap_err();
        assert_eq!(err, ScopeError::TooLong { len: 10240 });
        assert!(!err.to_string().contains("xxxx"));
        assert_safe_message(&err);
        assert_eq!(
            Scope::from_bytes(&[0xff; 300]),
            Err(ScopeError::TooLong { len: 300 })
        );
    }

    #[test]
    fn rejects_not_utf8() {
        assert_eq!(Scope::from_bytes(b"tenant\xff"), Err(ScopeError::NotUtf8));
        assert_eq!(Scope::from_bytes(b"\xc3"), Err(ScopeError::NotUtf8));
        assert_safe_message(&ScopeError::NotUtf8);
    }

    #[test]
    fn rejects_control_characters_including_nul() {
        for (raw, position) in [
            ("a\0b", 1),
            ("\0", 0),
            ("ab\u{1b}[0m", 2),
            ("a\tb", 1),
            ("a\nb", 1),
            ("é\u{7f}", 2),
            ("a\u{85}b", 1),
        ] {
            let err = Scope::new(raw).unwrap_err();
            assert_eq!(err, ScopeError::ControlCharacter { position }, "{raw:?}");
            assert_safe_message(&err);
        }
        assert_eq!(
            Scope::from_bytes(b"t\x00"),
            Err(ScopeError::ControlCharacter { position: 1 })
        );
    }

    #[test]
    fn rejects_surrounding_whitespace_without_trimming() {
        for raw in [" t", "t ", "\tt", "t\n", "\u{3000}t", "t\u{a0}", " "] {
            assert_eq!(
                Scope::new(raw),
                Err(ScopeError::SurroundingWhitespace),
                "{raw:?}"
            );
        }
        assert_safe_message(&ScopeError::SurroundingWhitespace);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            match Scope::from_bytes(&raw) {
                Ok(scope) => prop_assert_eq!(scope.as_str().as_bytes(), &raw[..]),
                Err(e) => assert_safe_message(&e),
            }
        }

        #[test]
        fn accepted_scopes_follow_the_rules(raw in any::<String>()) {
            match Scope::new(raw.clone()) {
                Ok(scope) => {
                    prop_assert_eq!(scope.as_str(), &raw);
                    prop_assert!(!raw.is_empty() && raw.len() <= Scope::MAX_LEN);
                    prop_assert!(!raw.chars().any(char::is_control));
                    prop_assert_eq!(raw.trim(), &raw);
                }
                Err(e) => assert_safe_message(&e),
            }
        }
    }
}
