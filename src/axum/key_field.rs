//! The `Idempotency-Key` field value: what the IETF draft
//! (draft-ietf-httpapi-idempotency-key-header) sends, a Structured Field String
//! (`"8e03978e-40d5-43e8-bc93-6894a57f9324"`, RFC 9651 §3.3.3), or the bare key that
//! clients written before the draft send. Both spell the same key.

use std::fmt;

use crate::key::{IdempotencyKey, KeyError, KeyPolicy};

/// Why an `Idempotency-Key` field value is not a key. The message never repeats the
/// value, only at most one offending byte, so it is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyFieldError {
    /// A quoted key without its closing quote.
    #[error(
        "the quoted key (a Structured Field String) has no closing '\"': send \
         \"<key>\" or the bare key"
    )]
    Unterminated,
    /// A backslash followed by something other than `"` or `\`.
    #[error(
        "the quoted key has a backslash before {} at byte offset {position}; a Structured \
         Field String allows only \\\" and \\\\ as escapes",
        ByteName(*byte)
    )]
    BadEscape {
        /// Byte offset of the escaped byte.
        position: usize,
        /// The escaped byte.
        byte: u8,
    },
    /// A byte a Structured Field String cannot hold (outside printable ASCII).
    #[error(
        "the quoted key contains {} at byte offset {position}; a Structured Field String \
         holds only printable ASCII",
        ByteName(*byte)
    )]
    InvalidByte {
        /// Byte offset of the byte.
        position: usize,
        /// The byte.
        byte: u8,
    },
    /// The quoted key has Structured Field parameters (`"<key>";a=1`).
    #[error(
        "the quoted key has parameters (';' at byte offset {position}); send the key \
         alone, without parameters"
    )]
    Parameters {
        /// Byte offset of the `;`.
        position: usize,
    },
    /// Something follows the quoted key.
    #[error(
        "the quoted key is followed by {} at byte offset {position}; send exactly one key",
        ByteName(*byte)
    )]
    Trailing {
        /// Byte offset of the byte.
        position: usize,
        /// The byte.
        byte: u8,
    },
    /// The key itself is not acceptable under the key policy.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A byte written safely into a message: printable ASCII as `'c'`, anything else in hex.
struct ByteName(u8);

impl fmt::Display for ByteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b' '..=b'~' => write!(f, "'{}'", char::from(self.0)),
            byte => write!(f, "the byte 0x{byte:02X}"),
        }
    }
}

/// Reads a key from one `Idempotency-Key` field value: a Structured Field String, or the
/// bare key; under `policy` either way.
pub(crate) fn parse_key_field(
    raw: &[u8],
    policy: KeyPolicy,
) -> Result<IdempotencyKey, KeyFieldError> {
    let Some(quoted) = raw.strip_prefix(b"\"") else {
        return Ok(IdempotencyKey::parse_bytes(raw, policy)?);
    };
    let mut key = String::with_capacity(quoted.len());
    let mut bytes = quoted.iter().copied().enumerate().map(|(i, b)| (i + 1, b));
    let end = loop {
        match bytes.next() {
            None => return Err(KeyFieldError::Unterminated),
            Some((position, b'"')) => break position + 1,
            Some((_, b'\\')) => match bytes.next() {
                None => return Err(KeyFieldError::Unterminated),
                Some((_, byte @ (b'"' | b'\\'))) => key.push(char::from(byte)),
                Some((position, byte)) => return Err(KeyFieldError::BadEscape { position, byte }),
            },
            Some((_, byte @ b' '..=b'~')) => key.push(char::from(byte)),
            Some((position, byte)) => return Err(KeyFieldError::InvalidByte { position, byte }),
        }
    };
    // A Structured Field parser discards trailing spaces; nothing else may follow.
    if let Some((offset, &byte)) = raw[end..].iter().enumerate().find(|(_, b)| **b != b' ') {
        let position = end + offset;
        return Err(match byte {
            b';' => KeyFieldError::Parameters { position },
            byte => KeyFieldError::Trailing { position, byte },
        });
    }
    Ok(IdempotencyKey::parse(&key, policy)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

    fn uuid(raw: &str) -> Result<IdempotencyKey, KeyFieldError> {
        parse_key_field(raw.as_bytes(), KeyPolicy::UuidV4)
    }

    fn opaque(raw: &[u8]) -> Result<IdempotencyKey, KeyFieldError> {
        parse_key_field(raw, KeyPolicy::Opaque)
    }

    #[test]
    fn quoted_and_bare_are_the_same_key_under_both_policies() {
        let bare = uuid(V4).unwrap();
        assert_eq!(uuid(&format!("\"{V4}\"")).unwrap(), bare);
        assert_eq!(uuid(&format!("\"{}\"", V4.to_uppercase())).unwrap(), bare);
        assert_eq!(uuid(&format!("\"{V4}\"  ")).unwrap(), bare);
        assert_eq!(opaque(b"\"tok_42\"").unwrap(), opaque(b"tok_42").unwrap());
        // Escapes are undone before the key policy looks.
        assert_eq!(opaque(br#""a\"b\\c""#).unwrap().as_str(), r#"a"b\c"#);
    }

    #[test]
    fn the_quoted_form_is_judged_without_its_quotes() {
        // 38 bytes with the quotes; a UUID has 36.
        assert!(uuid(&format!("\"{V4}\"")).is_ok());
    }

    #[test]
    fn malformed_strings_say_what_is_wrong() {
        let cases: [(&[u8], KeyFieldError, &str); 8] = [
            (b"\"abc", KeyFieldError::Unterminated, "no closing"),
            (b"\"abc\\", KeyFieldError::Unterminated, "no closing"),
            (
                b"\"a\\nb\"",
                KeyFieldError::BadEscape {
                    position: 3,
                    byte: b'n',
                },
                "backslash before 'n' at byte offset 3",
            ),
            (
                b"\"ab\"; a=1",
                KeyFieldError::Parameters { position: 4 },
                "parameters",
            ),
            (
                b"\"ab\", \"cd\"",
                KeyFieldError::Trailing {
                    position: 4,
                    byte: b',',
                },
                "exactly one key",
            ),
            (
                b"\"ab\"x",
                KeyFieldError::Trailing {
                    position: 4,
                    byte: b'x',
                },
                "followed by 'x'",
            ),
            (
                b"\"a\tb\"",
                KeyFieldError::InvalidByte {
                    position: 2,
                    byte: b'\t',
                },
                "the byte 0x09",
            ),
            (
                "\"é\"".as_bytes(),
                KeyFieldError::InvalidByte {
                    position: 1,
                    byte: 0xC3,
                },
                "the byte 0xC3",
            ),
        ];
        for (raw, error, says) in cases {
            let found = opaque(raw).unwrap_err();
            assert_eq!(found, error, "{}", String::from_utf8_lossy(raw));
            assert!(found.to_string().contains(says), "{found}");
        }
        // The key policy still judges what is inside the quotes.
        assert_eq!(uuid("\"\""), Err(KeyFieldError::Key(KeyError::Empty)));
        assert!(matches!(
            uuid("\"2ed6657d-e927-568b-95e1-2665a8aea6a2\""),
            Err(KeyFieldError::Key(KeyError::WrongVersion { version: 5 }))
        ));
    }

    #[test]
    fn messages_never_repeat_the_value() {
        let secret = "\"s3cr3t-v4lue\\q\"";
        let message = opaque(secret.as_bytes()).unwrap_err().to_string();
        assert!(!message.contains("s3cr3t"), "{message}");
    }
}
