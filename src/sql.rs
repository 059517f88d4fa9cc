//! The two hot-path statements, built by hand.
//!
//! Every request that runs its business logic pays for a claim (`BEGIN` + taking the
//! key) and a completion (storing the response + `COMMIT`). sqlx has no pipelining, and
//! `BEGIN`/`COMMIT` would each be a round trip of their own, so each pair travels as one
//! simple-query string: one round trip each. A simple query binds no parameters, so the
//! values are spelled into the text, and this module is the one place that does it.
//!
//! Injection-proof by construction: the only things ever interpolated are integers
//! formatted by Rust, and hex digits produced by [`hex_into`]. Text and bytes are
//! shipped as `decode('<hex>', 'hex')` (with `convert_from(.., 'UTF8')` for text), so
//! no quote, backslash or NUL of the input can reach the SQL parser, whatever
//! `standard_conforming_strings` is set to.

use crate::fingerprint::Fingerprint;

/// `BEGIN`, then claim `(scope, key)` through `idempotency_claim`, waiting at most
/// `wait_ms` for another holder. Yields one row:
/// `state, fingerprint_version, fingerprint (hex), status, headers (jsonb),
/// body (hex), created_at (µs since the epoch)`.
pub(crate) fn begin_and_claim(lock: i64, wait_ms: i32, scope: &str, key: &str) -> String {
    let mut sql = String::with_capacity(384 + 2 * (scope.len() + key.len()));
    sql.push_str(
        "BEGIN; SELECT c.state, c.fingerprint_version, encode(c.fingerprint, 'hex'), \
         c.status, c.headers, encode(c.body, 'hex'), \
         (extract(epoch FROM c.created_at) * 1000000)::bigint \
         FROM idempotency_claim(",
    );
    sql.push_str(&lock.to_string());
    sql.push_str(", ");
    sql.push_str(&wait_ms.to_string());
    sql.push_str(", ");
    text_into(&mut sql, scope);
    sql.push_str(", ");
    text_into(&mut sql, key);
    sql.push_str(") AS c");
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
        256 + 2 * (row.scope.len() + row.key.len() + row.headers_json.len() + row.body.len()),
    );
    sql.push_str("SELECT idempotency_store(");
    text_into(&mut sql, row.scope);
    sql.push_str(", ");
    text_into(&mut sql, row.key);
    sql.push_str(", ");
    sql.push_str(&row.fingerprint.version().to_string());
    sql.push_str("::smallint, ");
    bytea_into(&mut sql, row.fingerprint.hash());
    sql.push_str(", ");
    sql.push_str(&row.status.to_string());
    sql.push_str("::smallint, ");
    text_into(&mut sql, row.headers_json);
    sql.push_str("::jsonb, ");
    bytea_into(&mut sql, row.body);
    sql.push_str(", ");
    sql.push_str(&row.ttl_ms.to_string());
    sql.push_str("); COMMIT");
    sql
}

/// `convert_from(decode('<hex>', 'hex'), 'UTF8')`: a text value.
fn text_into(sql: &mut String, value: &str) {
    sql.push_str("convert_from(");
    bytea_into(sql, value.as_bytes());
    sql.push_str(", 'UTF8')");
}

/// `decode('<hex>', 'hex')`: a bytea value.
fn bytea_into(sql: &mut String, value: &[u8]) {
    sql.push_str("decode('");
    hex_into(sql, value);
    sql.push_str("', 'hex')");
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

    /// Everything between the fixed SQL fragments must be hex digits or digits.
    fn literals(sql: &str) -> Vec<&str> {
        sql.split("decode('")
            .skip(1)
            .map(|rest| &rest[..rest.find('\'').unwrap()])
            .collect()
    }

    /// The statement with every hex literal emptied: what is left is fixed SQL.
    fn without_literals(sql: &str) -> String {
        let mut out = String::new();
        let mut rest = sql;
        while let Some(at) = rest.find("decode('") {
            let (head, tail) = rest.split_at(at + "decode('".len());
            out.push_str(head);
            rest = &tail[tail.find('\'').unwrap()..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn hostile_text_only_ever_appears_as_hex() {
        let hostile = "'); DROP TABLE idempotency_keys; --\\' $$ \u{0} é";
        let sql = begin_and_claim(-42, 2000, hostile, hostile);
        assert!(!sql.contains("DROP"), "{sql}");
        assert_eq!(without_literals(&sql), begin_and_claim(-42, 2000, "", ""));
        assert!(sql.starts_with("BEGIN; SELECT "));
        assert!(sql.contains("idempotency_claim(-42, 2000, convert_from(decode('"));
        for literal in literals(&sql) {
            assert!(literal.bytes().all(|b| b.is_ascii_hexdigit()), "{literal}");
            assert_eq!(decode_hex(literal).unwrap(), hostile.as_bytes());
        }
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
            headers_json: r#"[["x-a","'"]]"#,
            body: &body,
            ttl_ms: 86_400_000,
        };
        let sql = store_and_commit(&row);
        let empty = Row {
            scope: "",
            key: "",
            headers_json: "",
            body: &[],
            fingerprint: &Fingerprint::from_parts(1, [0; 32]),
            ..row
        };
        let expected = store_and_commit(&empty);
        assert_eq!(without_literals(&sql), without_literals(&expected));
        assert!(sql.starts_with("SELECT idempotency_store("));
        assert!(sql.ends_with(", 86400000); COMMIT"));
        assert!(sql.contains(", 1::smallint, ") && sql.contains(", 201::smallint, "));
        let decoded: Vec<Vec<u8>> = literals(&sql)
            .into_iter()
            .map(|l| decode_hex(l).unwrap())
            .collect();
        assert_eq!(
            decoded,
            vec![
                b"acct'1".to_vec(),
                b"k\\".to_vec(),
                vec![0xab; 32],
                br#"[["x-a","'"]]"#.to_vec(),
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
