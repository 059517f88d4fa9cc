//! [`Statement`]: hand-built SQL, injection-proof by construction.
//!
//! A simple-query string binds no parameters, so the hot path spells its values into the
//! text. The only way to make a [`Statement`] is this builder: SQL text can only be
//! appended as a `&'static str` (a constant of this crate, never runtime input), and every
//! runtime value goes through an encoder that writes a literal:
//!
//! - text becomes an escape string `E'..'` in which only printable ASCII other than `'`
//!   and `\` appears as itself; `'` is doubled, and `\`, control characters and everything
//!   beyond ASCII are written as backslash escapes (`\\`, `\x0a`, `\u00e9`, `\U0001f4b3`),
//!   so the statement is pure printable ASCII whatever the input, and reads the same under
//!   any `standard_conforming_strings`, `backslash_quote` and `client_encoding`;
//! - integers are formatted by Rust.

use std::fmt::Write as _;

/// A statement made only by this module's builder: constant SQL text and encoded literals.
/// [`TxConn`](super::TxConn) runs nothing else.
#[derive(Debug)]
#[must_use]
pub(crate) struct Statement(String);

impl Statement {
    /// A statement that starts with `sql`, with room for `extra` more bytes.
    pub(super) fn new(sql: &'static str, extra: usize) -> Self {
        let mut text = String::with_capacity(sql.len() + extra);
        text.push_str(sql);
        Self(text)
    }

    /// Appends constant SQL text.
    pub(super) fn sql(mut self, sql: &'static str) -> Self {
        self.0.push_str(sql);
        self
    }

    /// Appends `value` as a text literal.
    pub(super) fn text(mut self, value: &str) -> Self {
        let sql = &mut self.0;
        sql.reserve(value.len() + 3);
        sql.push_str("E'");
        for c in value.chars() {
            match c {
                // Doubled, not `\'`: `backslash_quote = off` refuses the backslash form.
                '\'' => sql.push_str("''"),
                '\\' => sql.push_str("\\\\"),
                ' '..='~' => sql.push(c),
                // Control characters (NUL included: the server refuses `\x00` in text,
                // where a raw NUL byte would silently cut the statement short).
                '\0'..='\x1f' | '\x7f' => {
                    write!(sql, "\\x{:02x}", u32::from(c)).expect("writing to a String")
                }
                c if u32::from(c) <= 0xffff => {
                    write!(sql, "\\u{:04x}", u32::from(c)).expect("writing to a String")
                }
                c => write!(sql, "\\U{:08x}", u32::from(c)).expect("writing to a String"),
            }
        }
        sql.push('\'');
        self
    }

    /// Appends an integer.
    pub(super) fn int(mut self, value: impl Into<i64>) -> Self {
        write!(self.0, "{}", value.into()).expect("writing to a String");
        self
    }

    /// Appends `other` (which should start with a separator such as `"; "`).
    pub(super) fn then(mut self, other: Statement) -> Self {
        self.0.push_str(&other.0);
        self
    }

    /// Whether nothing was appended to an empty start.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text to send.
    pub(super) fn into_sql(self) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(self.0)
    }

    /// The text, for tests.
    #[cfg(test)]
    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Decodes the lower- or upper-case hex that `encode(.., 'hex')` returns.
pub(super) fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            b'A'..=b'F' => Some(digit - b'A' + 10),
            _ => None,
        }
    }
    let digits = hex.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The `E'..'` literals of `sql`, decoded, and `sql` with each literal emptied.
    pub(in crate::db) fn literals(sql: &str) -> (Vec<Vec<u8>>, String) {
        let mut values = Vec::new();
        let mut skeleton = String::new();
        let mut rest = sql;
        while let Some(at) = rest.find("E'") {
            skeleton.push_str(&rest[..at + 2]);
            let mut value = String::new();
            let mut chars = rest[at + 2..].char_indices().peekable();
            let end = loop {
                let (i, c) = chars.next().expect("unterminated literal");
                match c {
                    // `''` is a quote inside the literal; a lone `'` ends it.
                    '\'' if chars.peek().map(|(_, next)| *next) == Some('\'') => {
                        chars.next();
                        value.push('\'');
                    }
                    '\'' => break at + 2 + i + 1,
                    '\\' => {
                        let (_, kind) = chars.next().expect("dangling backslash");
                        let digits = match kind {
                            '\\' => {
                                value.push(kind);
                                continue;
                            }
                            'x' => 2,
                            'u' => 4,
                            'U' => 8,
                            other => panic!("unexpected escape \\{other}"),
                        };
                        let hex: String = (0..digits).map(|_| chars.next().unwrap().1).collect();
                        value.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                    }
                    c => {
                        assert!((' '..='~').contains(&c), "raw {c:?} in a literal");
                        value.push(c);
                    }
                }
            };
            values.push(value.into_bytes());
            skeleton.push('\'');
            rest = &rest[end..];
        }
        skeleton.push_str(rest);
        (values, skeleton)
    }

    /// Text that would break out of a naive literal in every way we know of.
    pub(in crate::db) const HOSTILE: &str =
        "'); DROP TABLE idempotency_keys; --\\' $$ \u{0} \t\n\u{7f} é 💳 ''";

    /// The statement is printable ASCII and holds exactly `values`, in order.
    pub(in crate::db) fn assert_spells(statement: &Statement, values: &[&[u8]], skeleton: &str) {
        let sql = statement.as_str();
        assert!(sql.bytes().all(|b| (b' '..=b'~').contains(&b)), "{sql}");
        let (found, found_skeleton) = literals(sql);
        assert_eq!(found, values, "{sql}");
        assert_eq!(found_skeleton, skeleton);
    }

    #[test]
    fn every_value_is_a_literal_in_printable_ascii() {
        let statement = Statement::new("SELECT ", 0)
            .text(HOSTILE)
            .sql(", ")
            .int(-42_i64)
            .then(Statement::new("; SELECT ", 0).text(""));
        assert_spells(
            &statement,
            &[HOSTILE.as_bytes(), b""],
            "SELECT E'', -42; SELECT E''",
        );
    }

    #[test]
    fn hex_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let hex: String = all.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(decode_hex(&hex).unwrap(), all);
        assert_eq!(decode_hex(&hex.to_uppercase()).unwrap(), all);
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
