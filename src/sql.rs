//! The hot-path statements, built by hand.
//!
//! Every request that runs its business logic pays for a claim (`BEGIN` + taking the
//! key) and a completion (storing the response + `COMMIT`). sqlx has no pipelining, and
//! `BEGIN`/`COMMIT` would each be a round trip of their own, so each group travels as one
//! simple-query string: one round trip each. A simple query binds no parameters, so the
//! values are spelled into the text, and this module is the one place that does it.
//!
//! The server parses and plans a simple query every time, and for the lookup and the
//! insert that was most of the cost of a request. Those two are therefore server-side
//! prepared statements ([`LOOKUP`], [`INSERT`]): prepared once per connection, then run as
//! `EXECUTE name(literals)`, which skips planning (docs/BENCHMARKS.md has the figures). A
//! connection that has not prepared them (new, or after `DISCARD ALL`) answers the first
//! `EXECUTE` with SQLSTATE 26000; the store then prepares what is missing and retries
//! ([`is_unprepared`], [`FIND_PREPARED`], [`prepare_missing`]).
//!
//! Injection-proof by construction, and independent of `standard_conforming_strings`,
//! `backslash_quote` and `client_encoding`: text goes into an escape string `E'..'` in
//! which only printable ASCII other than `'` and `\` appears as itself; `'` is doubled,
//! and `\`, control characters and everything beyond ASCII are written as backslash escapes
//! (`\'`, `\\`, `\x0a`, `\u00e9`, `\U0001f4b3`), so the statement is pure printable
//! ASCII whatever the input. Bytes go as `E'\\x<hex>'` (bytea hex input). Integers are
//! formatted by Rust. The prepared statements' texts are constants.

use std::fmt::Write as _;

use crate::fingerprint::Fingerprint;

/// A statement the hot path prepares once per connection and then `EXECUTE`s.
///
/// The name carries a version: a changed text gets a new name, so a connection that
/// prepared an older text never runs it.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub name: &'static str,
    params: &'static str,
    body: &'static str,
}

/// The key's row, if any: `fingerprint_version, fingerprint (hex), status, headers
/// (jsonb), body (hex), created_at (µs since the epoch), live (not expired)`. Bytes come
/// back as hex and the time as microseconds, so that the client reads them from a simple
/// query whatever `bytea_output` and `DateStyle` say. The parameters are `text`, so the
/// comparison uses the column's collation and the primary key.
pub(crate) const LOOKUP: Prepared = Prepared {
    name: "pgidem_lookup_v1",
    params: "text, text",
    body: "SELECT fingerprint_version, encode(fingerprint, 'hex'), status, headers, \
           encode(body, 'hex'), (extract(epoch FROM created_at) * 1000000)::bigint, \
           expires_at > now() \
           FROM idempotency_keys WHERE scope = $1 AND key = $2",
};

/// Stores a completed request. A plain `INSERT`: if a row is in the way, it fails with a
/// unique violation, and the server skips the `COMMIT` behind it.
pub(crate) const INSERT: Prepared = Prepared {
    name: "pgidem_insert_v1",
    params: "text, text, smallint, bytea, smallint, jsonb, bytea, bigint",
    body: "INSERT INTO idempotency_keys \
           (scope, key, fingerprint_version, fingerprint, status, headers, body, \
            created_at, expires_at) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now() + $8 * interval '1 millisecond')",
};

/// Every prepared statement of the hot path.
pub(crate) const PREPARED: [&Prepared; 2] = [&LOOKUP, &INSERT];

/// Ends the failed attempt, opens the transaction again and lists which of [`PREPARED`]
/// the connection has. The transaction stays open from here to the retried claim, so a
/// pooler in transaction mode keeps the same server connection for all of it.
pub(crate) const FIND_PREPARED: &str = "ROLLBACK; BEGIN; \
    SELECT name FROM pg_prepared_statements WHERE starts_with(name, 'pgidem_')";

/// `PREPARE` statements for those of [`PREPARED`] whose names are not in `present`, each
/// followed by `; `.
pub(crate) fn prepare_missing(present: &[String]) -> String {
    PREPARED
        .into_iter()
        .filter(|statement| !present.iter().any(|name| name == statement.name))
        .fold(String::new(), |mut sql, statement| {
            let Prepared { name, params, body } = statement;
            write!(sql, "PREPARE {name}({params}) AS {body}; ").expect("writing to a String");
            sql
        })
}

/// Whether `error` says that a prepared statement does not exist (SQLSTATE 26000).
pub(crate) fn is_unprepared(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("26000"))
}

/// Tries the key's advisory lock and looks the key up, inside a transaction (prefix
/// `BEGIN; ` to open it in the same round trip). Yields two rows: whether the lock is
/// held, then the key's row (see [`LOOKUP`]) if there is one.
pub(crate) fn claim(lock: i64, scope: &str, key: &str) -> String {
    let mut sql = format!("SELECT pg_try_advisory_xact_lock({lock}); ");
    lookup_into(&mut sql, scope, key);
    sql
}

/// Inside the claim's transaction: wait at most `wait_ms` for the key's advisory lock,
/// then look the key up with a fresh snapshot. The same rows as [`claim`].
pub(crate) fn wait_and_claim(lock: i64, wait_ms: i32, scope: &str, key: &str) -> String {
    let mut sql = format!("SELECT idempotency_wait_lock({lock}, {wait_ms}); ");
    lookup_into(&mut sql, scope, key);
    sql
}

fn lookup_into(sql: &mut String, scope: &str, key: &str) {
    write!(sql, "EXECUTE {}(", LOOKUP.name).expect("writing to a String");
    text_into(sql, scope);
    sql.push_str(", ");
    text_into(sql, key);
    sql.push(')');
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
    /// The claim saw an expired row for the key: delete it first.
    pub replace_expired: bool,
}

/// Store the response (see [`INSERT`]), then `COMMIT`.
pub(crate) fn store_and_commit(row: &Row<'_>) -> String {
    let mut sql = String::with_capacity(
        160 + 4 * (row.scope.len() + row.key.len()) + 2 * (row.headers_json.len() + row.body.len()),
    );
    if row.replace_expired {
        sql.push_str("DELETE FROM idempotency_keys WHERE scope = ");
        text_into(&mut sql, row.scope);
        sql.push_str(" AND key = ");
        text_into(&mut sql, row.key);
        sql.push_str(" AND expires_at <= now(); ");
    }
    write!(sql, "EXECUTE {}(", INSERT.name).expect("writing to a String");
    text_into(&mut sql, row.scope);
    sql.push_str(", ");
    text_into(&mut sql, row.key);
    write!(sql, ", {}, ", row.fingerprint.version()).expect("writing to a String");
    bytea_into(&mut sql, row.fingerprint.hash());
    write!(sql, ", {}, ", row.status).expect("writing to a String");
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
        for (sql, empty, skeleton_expected) in [
            (
                claim(-42, HOSTILE, HOSTILE),
                claim(-42, "", ""),
                "SELECT pg_try_advisory_xact_lock(-42); EXECUTE pgidem_lookup_v1(E'', E'')",
            ),
            (
                wait_and_claim(-42, 2000, HOSTILE, HOSTILE),
                wait_and_claim(-42, 2000, "", ""),
                "SELECT idempotency_wait_lock(-42, 2000); EXECUTE pgidem_lookup_v1(E'', E'')",
            ),
        ] {
            assert!(sql.bytes().all(|b| (b' '..=b'~').contains(&b)), "{sql}");
            let (values, skeleton) = literals(&sql);
            assert_eq!(values, vec![HOSTILE.as_bytes().to_vec(); 2]);
            assert_eq!(skeleton, literals(&empty).1);
            assert_eq!(skeleton, skeleton_expected);
        }
    }

    #[test]
    fn store_statement_round_trips_every_value() {
        let fingerprint = Fingerprint::from_parts(1, [0xab; 32]);
        let body = [0u8, 39, 92, 255, b'$'];
        let mut row = Row {
            scope: "acct'1",
            key: "k\\",
            fingerprint: &fingerprint,
            status: 201,
            headers_json: HOSTILE,
            body: &body,
            ttl_ms: 86_400_000,
            replace_expired: false,
        };
        let insert = "EXECUTE pgidem_insert_v1(E'', E'', 1, E'', 201, E'', E'', 86400000); COMMIT";
        let values = vec![
            b"acct'1".to_vec(),
            b"k\\".to_vec(),
            vec![0xab; 32],
            HOSTILE.as_bytes().to_vec(),
            body.to_vec(),
        ];
        let sql = store_and_commit(&row);
        assert!(sql.bytes().all(|b| (b' '..=b'~').contains(&b)), "{sql}");
        assert_eq!(literals(&sql), (values.clone(), insert.to_owned()));

        row.replace_expired = true;
        let sql = store_and_commit(&row);
        assert!(sql.bytes().all(|b| (b' '..=b'~').contains(&b)), "{sql}");
        let (replacing, skeleton) = literals(&sql);
        assert_eq!(
            skeleton,
            format!(
                "DELETE FROM idempotency_keys WHERE scope = E'' AND key = E'' \
                 AND expires_at <= now(); {insert}"
            )
        );
        assert_eq!(replacing[..2], values[..2]);
        assert_eq!(replacing[2..], values);
    }

    #[test]
    fn prepare_spells_each_missing_statement() {
        let all = prepare_missing(&[]);
        assert!(all.starts_with("PREPARE pgidem_lookup_v1(text, text) AS SELECT "));
        assert!(all.contains("; PREPARE pgidem_insert_v1(text, text, smallint, "));
        assert!(all.ends_with("; "));
        assert_eq!(all.matches("PREPARE ").count(), 2);

        let insert_only = prepare_missing(&["pgidem_lookup_v1".to_owned()]);
        assert!(insert_only.starts_with("PREPARE pgidem_insert_v1("));
        assert_eq!(insert_only.matches("PREPARE ").count(), 1);

        let names = PREPARED.map(|statement| statement.name.to_owned());
        assert_eq!(prepare_missing(&names), "");
    }

    /// benches/pgbench runs the same statements as the crate.
    #[test]
    fn the_pgbench_scripts_prepare_these_statements() {
        let preamble = include_str!("../benches/pgbench/prepare.sql");
        for Prepared { name, params, body } in PREPARED {
            let line = format!("PREPARE {name}({params}) AS {body};");
            assert!(
                preamble.lines().any(|l| l == line),
                "benches/pgbench/prepare.sql lacks\n{line}"
            );
        }
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
