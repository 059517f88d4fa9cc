//! The two hot-path statements, built by hand.
//!
//! Every request that runs its business logic pays for a claim (`BEGIN` + taking the
//! key) and a completion (storing the response + `COMMIT`). sqlx has no pipelining, and
//! `BEGIN`/`COMMIT` would each be a round trip of their own, so each pair travels as one
//! simple-query string: one round trip each. A simple query binds no parameters, so the
//! values are spelled into the text, and this module is the one place that does it.
//!
//! The server parses and plans a simple query every time, so the text is kept as plain
//! as possible: every value is a literal, not a function call (each function call in the
//! text costs the server a name lookup and type resolution on every request; the
//! benchmark measured ~30 µs of server CPU per request for the earlier
//! `convert_from(decode('<hex>', 'hex'), 'UTF8')` form).
//!
//! Injection-proof by construction, and independent of `standard_conforming_strings`,
//! `backslash_quote` and `client_encoding`: text goes into an escape string `E'..'` in
//! which only printable ASCII other than `'` and `\` appears as itself; `'` is doubled,
//! and `\`, control characters and everything beyond ASCII are written as backslash escapes
//! (`\'`, `\\`, `\x0a`, `\u00e9`, `\U0001f4b3`), so the statement is pure printable
//! ASCII whatever the input. Bytes go as `E'\\x<hex>'` (bytea hex input). Integers are
//! formatted by Rust.

use std::fmt::Write as _;

use crate::fingerprint::Fingerprint;

/// `BEGIN`, then claim `(scope, key)` through `idempotency_claim`, waiting at most
/// `wait_ms` for another holder. Yields one row:
/// `state, fingerprint_version, fingerprint (hex), status, headers (jsonb),
/// body (hex), created_at (µs since the epoch)`.
pub(crate) fn begin_and_claim(lock: i64, wait_ms: i32, scope: &str, key: &str) -> String {
    let mut sql = String::with_capacity(96 + 2 * (scope.len() + key.len()));
    sql.push_str("BEGIN; SELECT * FROM idempotency_claim(");
    write!(sql, "{lock}, {wait_ms}, ").expect("writing to a String");
    text_into(&mut sql, scope);
    sql.push_str(", ");
    text_into(&mut sql, key);
    sql.push(')');
    sql
}

/// What `store_and_commit` writes.
pub(crate) struct Row<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub fingerprint: &'a Fingerprint,
    pub status: u16,
    pub headers_json: &'a str,
    pub body: &'a [u8],
    pub ttl_ms: i64,
}

/// Store the response through `idempotency_store`, then `COMMIT`.
pub(crate) fn store_and_commit(row: &Row<'_>) -> String {
    let mut sql = String::with_capacity(
        160 + 2 * (row.scope.len() + row.key.len() + row.headers_json.len() + row.body.len()),
    );
    sql.push_str("SELECT idempotency_store(");
    text_into(&mut sql, row.scope);
    sql.push_str(", ");
    text_into(&mut sql, row.key);
    write!(sql, ", {}::smallint, ", row.fingerprint.version()).expect("writing to a String");
    bytea_into(&mut sql, row.fingerprint.hash());
    write!(sql, ", {}::smallint, ", row.status).expect("writing to a String");
    text_into(&mut sql, row.headers_json);
    sql.push_str(", ");
    bytea_into(&mut sql, row.body);
    write!(sql, ", {}); COMMIT", row.ttl_ms).expect("writing to a String");
    sql
}

/// `E'<value>'`: a text literal in printable ASCII, every other character escaped.
fn text_into(sql: &mut String, value: &str) {
    sql.reserve(value.len() + 3);
    sql.push_str("E'");
    for c in value.chars() {
        match c {
            // Doubled, not `\'`: `backslash_quote = off` refuses the backslash form.
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            ' '..='~' => sql.push(c),
            // Control characters (NUL included: the server refuses `\x00` in text, where
            // a raw NUL byte would silently cut the statement short).
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
}

/// `E'\\x<hex>'`: a bytea literal.
fn bytea_into(sql: &mut String, value: &[u8]) {
    sql.push_str("E'\\\\x");
    hex_into(sql, value);
    sql.push('\'');
}

/// Lower-case hex digits of `bytes`, and nothing else.
fn hex_into(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

/// Decodes the lower- or upper-case hex that `encode(.., 'hex')` returns.
pub(crate) fn decode_hex(hex: &str) -> Option<Vec<u8>> {
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
mod tests {
    use super::*;

    /// The `E'..'` literals of `sql`, decoded, and `sql` with each literal emptied.
    fn literals(sql: &str) -> (Vec<Vec<u8>>, String) {
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
            // A bytea literal is `\x` and hex digits once the escapes are undone.
            values.push(match value.strip_prefix("\\x") {
                Some(hex) => decode_hex(hex).expect("bytea literal is hex"),
                None => value.into_bytes(),
            });
            skeleton.push('\'');
            rest = &rest[end..];
        }
        skeleton.push_str(rest);
        (values, skeleton)
    }

    const HOSTILE: &str = "'); DROP TABLE idempotency_keys; --\\' $$ \u{0} \t\n\u{7f} é 💳 ''";

    #[test]
    fn hostile_text_is_escaped_into_printable_ascii() {
        let sql = begin_and_claim(-42, 2000, HOSTILE, HOSTILE);
        assert!(sql.bytes().all(|b| (b' '..=b'~').contains(&b)), "{sql}");
        let (values, skeleton) = literals(&sql);
        assert_eq!(values, vec![HOSTILE.as_bytes().to_vec(); 2]);
        assert_eq!(skeleton, literals(&begin_and_claim(-42, 2000, "", "")).1);
        assert_eq!(
            skeleton,
            "BEGIN; SELECT * FROM idempotency_claim(-42, 2000, E'', E'')"
        );
    }

    #[test]
    fn store_statement_round_trips_every_value() {
        let fingerprint = Fingerprint::from_parts(1, [0xab; 32]);
        let body = [0u8, 39, 92, 255, b'$'];
        let row = Row {
            scope: "acct'1",
            key: "k\\",
            fingerprint: &fingerprint,
            status: 201,
            headers_json: HOSTILE,
            body: &body,
            ttl_ms: 86_400_000,
        };
        let sql = store_and_commit(&row);
        assert!(sql.bytes().all(|b| (b' '..=b'~').contains(&b)), "{sql}");
        let (values, skeleton) = literals(&sql);
        assert_eq!(
            skeleton,
            "SELECT idempotency_store(E'', E'', 1::smallint, E'', 201::smallint, E'', E'', \
             86400000); COMMIT"
        );
        assert_eq!(
            values,
            vec![
                b"acct'1".to_vec(),
                b"k\\".to_vec(),
                vec![0xab; 32],
                HOSTILE.as_bytes().to_vec(),
                body.to_vec()
            ]
        );
    }

    #[test]
    fn hex_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut hex = String::new();
        hex_into(&mut hex, &all);
        assert_eq!(hex.len(), 512);
        assert_eq!(decode_hex(&hex).unwrap(), all);
        assert_eq!(decode_hex(&hex.to_uppercase()).unwrap(), all);
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
