//! The hot path's statements, how they are sent, and how their rows are read.
//!
//! Every request that runs its business logic pays for a claim (`BEGIN` + taking the key)
//! and a completion (storing the response, then `COMMIT`). sqlx has no pipelining, and
//! `BEGIN` would be a round trip of its own, so the claim travels as one simple-query
//! string ([`Statement`]): one round trip. The completion stores the response with bound
//! parameters (a statement sqlx prepares once per connection) and then commits: two round
//! trips, so that a failed statement never puts the response into the server's log (the
//! server logs a failed simple query whole, literals included).
//!
//! The server parses and plans a simple query every time, and for the lookup that was
//! most of the cost of a claim. It is therefore a server-side prepared statement
//! ([`LOOKUP`]): prepared once per connection, then run as `EXECUTE name(literals)`,
//! which skips planning (docs/BENCHMARKS.md has the figures). A
//! connection that has not prepared them (new, or after `DISCARD ALL`) answers the first
//! `EXECUTE` with SQLSTATE 26000; [`TxConn::begin_claim`] then prepares what is missing and
//! claims again, and [`prepare_connection`] lets a pool prepare new connections up front.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::statement::{Statement, decode_hex};
use super::tx::TxConn;
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::outcome::Replay;
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;

/// A statement the hot path prepares once per connection and then `EXECUTE`s.
///
/// The name carries a version: a changed text gets a new name, so a connection that
/// prepared an older text never runs it.
#[derive(Debug)]
struct Prepared {
    name: &'static str,
    /// `PREPARE <name>(<params>) AS <body>`.
    prepare: &'static str,
    /// `EXECUTE <name>(`.
    execute: &'static str,
}

/// The key's row, if any, read back by [`FoundRow::decode`]: `fingerprint_version,
/// fingerprint (hex), status, headers (jsonb), body (hex), created_at (µs since the
/// epoch), live (not expired), request_id, traceparent`. Bytes come back as hex and the
/// time as microseconds, so that the client reads them from a simple query whatever
/// `bytea_output` and `DateStyle` say. The parameters are `text`, so the comparison uses
/// the column's collation and the primary key.
///
/// The name's version changes with the text: a node of an earlier release prepares and
/// runs its own text, which stays valid on the migrated table, so old and new nodes serve
/// side by side during a rolling deploy.
const LOOKUP: Prepared = Prepared {
    name: "pgidem_lookup_v3",
    prepare: "PREPARE pgidem_lookup_v3(text, text) AS \
              SELECT fingerprint_version, encode(fingerprint, 'hex'), status, headers, \
              encode(body, 'hex'), (extract(epoch FROM created_at) * 1000000)::bigint, \
              expires_at > now(), request_id, traceparent, body_omitted \
              FROM idempotency_keys WHERE scope = $1 AND key = $2",
    execute: "EXECUTE pgidem_lookup_v3(",
};

/// Every prepared statement of the hot path. The response is never among them: it is
/// stored with bound parameters ([`insert_key_row`]), so that it never reaches the
/// server's log.
const PREPARED: [&Prepared; 1] = [&LOOKUP];

/// The primary key of `idempotency_keys`: storing a response meets it when a row is in
/// the way. A prefix, because Citus names a shard's constraint `<name>_<shard id>`.
const KEY_CONSTRAINT: &str = "idempotency_keys_pkey";

/// `PREPARE` statements for those of [`PREPARED`] whose names are not in `present`, each
/// followed by `; `; empty if none is missing.
fn prepare_missing(present: &[String]) -> Statement {
    PREPARED
        .into_iter()
        .filter(|statement| !present.iter().any(|name| name == statement.name))
        .fold(Statement::new("", 0), |sql, statement| {
            sql.sql(statement.prepare).sql("; ")
        })
}

/// Whether `error` says that a prepared statement does not exist (SQLSTATE 26000).
fn is_unprepared(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("26000"))
}

/// The transaction-scoped advisory lock that serialises requests with one key.
///
/// 64 bits of SHA-256 over the scope and the key: a collision only makes two unrelated
/// keys wait for each other, never share a response (that is decided by the unique
/// `(scope, key)` row).
fn lock_id(scope: &Scope, key: &IdempotencyKey) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(b"pg-idempotency/lock\0");
    hasher.update((scope.as_str().len() as u64).to_be_bytes());
    hasher.update(scope.as_str().as_bytes());
    hasher.update(key.as_str().as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// `EXECUTE pgidem_lookup_v3(scope, key)`, behind `lock` (a statement that yields one
/// boolean row: whether the key's advisory lock is held).
fn lookup(lock: Statement, scope: &Scope, key: &IdempotencyKey) -> Statement {
    lock.sql("; ")
        .sql(LOOKUP.execute)
        .text(scope.as_str())
        .sql(", ")
        .text(key.as_str())
        .sql(")")
}

/// Tries the key's advisory lock, then looks the key up.
fn try_lock_and_lookup(scope: &Scope, key: &IdempotencyKey) -> Statement {
    let lock = Statement::new("SELECT pg_try_advisory_xact_lock(", 96)
        .int(lock_id(scope, key))
        .sql(")");
    lookup(lock, scope, key)
}

/// Waits at most `wait_ms` for the key's advisory lock, then looks the key up with a
/// fresh snapshot.
fn wait_and_lookup(wait_ms: i32, scope: &Scope, key: &IdempotencyKey) -> Statement {
    let lock = Statement::new("SELECT idempotency_wait_lock(", 96)
        .int(lock_id(scope, key))
        .sql(", ")
        .int(wait_ms)
        .sql(")");
    lookup(lock, scope, key)
}

/// The key row that [`TxConn::insert_key_row`] writes.
#[derive(Clone, Copy)]
pub(crate) struct KeyRow<'a> {
    pub scope: &'a Scope,
    pub key: &'a IdempotencyKey,
    pub fingerprint: &'a Fingerprint,
    pub response: &'a StoredResponse,
    pub provenance: &'a Provenance,
    pub window: Window,
    pub expired: ExpiredRow,
}

/// When a key row was first used and until when it replays.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Window {
    /// From now (the transaction's start) for this long: a transactional claim.
    From(Duration),
    /// The times of the phased request the row ends.
    Kept {
        created_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
}

/// The key's expired row, which counts as unused and which a new row replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpiredRow {
    /// The key had none: an expired row found after a broken `COMMIT` is this one's
    /// (a TTL shorter than the resolution wait).
    Absent,
    /// The key has one: [`TxConn::insert_key_row`] deletes it first.
    Present,
    /// The transaction deleted it already ([`TxConn::end_request`]).
    Deleted,
}

/// The phased request that [`TxConn::end_request`] ended: its times and provenance, which
/// its key row keeps.
#[derive(Debug)]
pub(crate) struct EndedRequest {
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub provenance: Provenance,
}

/// Waits for the key's advisory lock, deletes the key's expired row, and deletes the
/// request's row if `token` still fences it, returning its times and provenance.
fn lock_and_end_request(scope: &Scope, key: &IdempotencyKey, token: i64) -> Statement {
    let key_row = |statement: Statement| {
        statement
            .sql(" WHERE scope = ")
            .text(scope.as_str())
            .sql(" AND key = ")
            .text(key.as_str())
    };
    let lock = Statement::new("SELECT pg_advisory_xact_lock(", 480)
        .int(lock_id(scope, key))
        .sql("); DELETE FROM idempotency_keys");
    let cleared = key_row(lock).sql(" AND expires_at <= now(); DELETE FROM idempotency_requests");
    key_row(cleared).sql(" AND lease_token = ").int(token).sql(
        " RETURNING (extract(epoch FROM created_at) * 1000000)::bigint, \
             (extract(epoch FROM expires_at) * 1000000)::bigint, request_id, traceparent",
    )
}

/// Whether `error` is the key row's insert meeting a live row for the key (another
/// transaction stored one first, without sharing the key's lock).
///
/// Citus relays a worker's unique violation without the constraint's name: the key
/// row's insert is then the only statement that can raise it (a deferred unique
/// constraint of a business table reports its own name, at `COMMIT`).
pub(crate) fn key_taken(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(error)
        if error.is_unique_violation()
            && error.constraint().is_none_or(|name| name.starts_with(KEY_CONSTRAINT)))
}

/// Deletes the key's expired row if there is one to replace, then stores the response,
/// with bound parameters: the extended protocol carries the values apart from the
/// statement text, so when a statement fails the server logs its text with `$1`..`$10`,
/// and the values only as `log_parameter_max_length_on_error` allows (default 0: none).
/// A plain `INSERT`: if a row is in the way, it fails with a unique violation on
/// [`KEY_CONSTRAINT`]. Returns the row's `created_at`.
async fn insert(conn: &mut PgConnection, row: &KeyRow<'_>) -> Result<DateTime<Utc>, sqlx::Error> {
    let (scope, key, response) = (row.scope.as_str(), row.key.as_str(), row.response);
    if row.expired == ExpiredRow::Present {
        sqlx::query!(
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND expires_at <= now()",
            scope,
            key
        )
        .execute(&mut *conn)
        .await?;
    }
    let status = i16::try_from(response.status)
        .map_err(|_| sqlx::Error::Protocol(format!("status {} out of range", response.status)))?;
    let (created_at, expires_at, ttl_ms) = match row.window {
        Window::From(ttl) => (
            None,
            None,
            i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        ),
        Window::Kept {
            created_at,
            expires_at,
        } => (Some(created_at), Some(expires_at), 0),
    };
    sqlx::query!(
        "INSERT INTO idempotency_keys \
         (scope, key, fingerprint_version, fingerprint, status, headers, body, \
         created_at, expires_at, request_id, traceparent, body_omitted) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), \
         coalesce($9, now() + $10::bigint * interval '1 millisecond'), $11, $12, $13) \
         RETURNING created_at",
        scope,
        key,
        row.fingerprint.version(),
        row.fingerprint.hash().as_slice(),
        status,
        Json(&response.headers) as _,
        &response.body[..],
        created_at,
        expires_at,
        ttl_ms,
        row.provenance.request_id.as_deref(),
        row.provenance.traceparent.as_deref(),
        response.body_omitted,
    )
    .fetch_one(conn)
    .await
    .map(|stored| stored.created_at)
}

impl TxConn {
    /// Opens the transaction, tries the key's advisory lock and looks the key up, in one
    /// round trip.
    ///
    /// On a connection that lacks the hot path's prepared statements (the first claim on
    /// a new connection, or one after `DISCARD ALL`), the `EXECUTE` fails with SQLSTATE
    /// 26000 before anything is written: the transaction is opened again, what is missing
    /// is prepared inside it, and the claim runs, in two more round trips. The transaction
    /// stays open from there on, so a pooler in transaction mode keeps one server
    /// connection for all of it.
    pub(crate) async fn begin_claim(
        &mut self,
        scope: &Scope,
        key: &IdempotencyKey,
    ) -> Result<Found, Error> {
        self.begin_and_lookup(|| try_lock_and_lookup(scope, key))
            .await
    }

    /// After a claim's connection broke around `COMMIT`, on a new connection: prepares
    /// the hot path's statements if the connection lacks them (one round trip, so that
    /// the wait is not repeated after a failed `EXECUTE`), then opens a transaction,
    /// waits at most `wait_ms` for the key's advisory lock and reads the key's row, in
    /// one more round trip.
    ///
    /// The lock is held by the old transaction until it ends, and a transaction that
    /// commits is visible to new snapshots before it releases its locks: once the lock is
    /// taken, the row says whether the old transaction committed.
    pub(crate) async fn begin_resolution(
        &mut self,
        wait_ms: i32,
        scope: &Scope,
        key: &IdempotencyKey,
    ) -> Result<Found, Error> {
        prepare_connection(self.conn()).await?;
        self.begin_and_lookup(|| wait_and_lookup(wait_ms, scope, key))
            .await
    }

    /// `BEGIN`, then `lock_and_lookup()`, preparing the hot path's statements first if
    /// the connection lacks them.
    async fn begin_and_lookup(
        &mut self,
        lock_and_lookup: impl Fn() -> Statement,
    ) -> Result<Found, Error> {
        let begin = Statement::new("BEGIN; ", 0);
        let rows = match self.run(begin.then(lock_and_lookup())).await {
            Err(error) if is_unprepared(&error) => {
                let find = Statement::new(
                    "ROLLBACK; BEGIN; SELECT name FROM pg_prepared_statements \
                     WHERE starts_with(name, 'pgidem_')",
                    0,
                );
                let present: Vec<String> = self
                    .run(find)
                    .await?
                    .iter()
                    .map(|row| row.try_get(0))
                    .collect::<Result<_, _>>()?;
                tracing::debug!("preparing the hot-path statements on this connection");
                self.run(prepare_missing(&present).then(lock_and_lookup()))
                    .await?
            }
            rows => rows?,
        };
        Found::from_rows(rows)
    }

    /// Inside the transaction of a phased request's final step: waits for the key's
    /// advisory lock, so that no claim or takeover of the key runs between here and
    /// `COMMIT`, deletes the key's expired row, which the new row replaces, and ends the
    /// request, if `token` still fences it. One round trip.
    ///
    /// `None` if the request's row no longer has this token (another holder took it).
    pub(crate) async fn end_request(
        &mut self,
        scope: &Scope,
        key: &IdempotencyKey,
        token: i64,
    ) -> Result<Option<EndedRequest>, Error> {
        let rows = self.run(lock_and_end_request(scope, key, token)).await?;
        // The lock's row, then the ended request's.
        let Some(ended) = rows.into_iter().nth(1) else {
            return Ok(None);
        };
        let micros = |at: i64| {
            DateTime::from_timestamp_micros(at)
                .ok_or_else(|| Error::MalformedRow("a request's time is out of range".into()))
        };
        Ok(Some(EndedRequest {
            created_at: micros(ended.try_get(0)?)?,
            expires_at: micros(ended.try_get(1)?)?,
            provenance: Provenance {
                request_id: ended.try_get(2)?,
                traceparent: ended.try_get(3)?,
            },
        }))
    }

    /// Stores the key row in the transaction (one round trip, two with an expired row to
    /// replace) and returns its `created_at`. A live row in the way fails with an error
    /// that [`key_taken`] recognises.
    pub(crate) async fn insert_key_row(
        &mut self,
        row: &KeyRow<'_>,
    ) -> Result<DateTime<Utc>, sqlx::Error> {
        self.run_bound(async |conn| insert(conn, row).await).await
    }
}

/// Prepares the store's hot-path statements on a new connection, for
/// [`PgPoolOptions::after_connect`](sqlx::postgres::PgPoolOptions::after_connect).
///
/// Optional: without it, a connection's first claim prepares them itself, after the
/// server has answered (and logged) `prepared statement "pgidem_lookup_v3" does not exist`
/// once. With it, that error never appears. Does nothing while the migrations have not
/// created `idempotency_keys` yet, so a pool that runs them can still connect.
///
/// ```no_run
/// # async fn demo() -> Result<(), sqlx::Error> {
/// use sqlx::postgres::PgPoolOptions;
///
/// let pool = PgPoolOptions::new()
///     .after_connect(|conn, _meta| Box::pin(pg_idempotency::prepare_connection(conn)))
///     .connect("postgres://localhost/app")
///     .await?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// The database error if a statement fails, which makes sqlx discard the connection.
pub async fn prepare_connection(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    // In a transaction, so that a pooler in transaction mode keeps one server connection
    // for the query's two exchanges and the `PREPARE`s (crate::db::in_transaction). It
    // writes nothing, so it ends with `ROLLBACK`, which keeps the prepared statements
    // (`PREPARE` is not transactional); no `COMMIT` whose reply could be lost, which
    // matters when this runs to resolve a lost reply to a claim's `COMMIT`.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let found = sqlx::query!(
        r#"SELECT to_regclass('idempotency_keys') IS NOT NULL AS "migrated!",
                  array(SELECT name::text FROM pg_prepared_statements
                        WHERE starts_with(name, 'pgidem_')) AS "present!""#
    )
    .fetch_one(&mut *tx)
    .await?;
    let prepare = prepare_missing(&found.present);
    if found.migrated && !prepare.is_empty() {
        sqlx::raw_sql(prepare.into_sql()).execute(&mut *tx).await?;
    }
    tx.rollback().await
}

/// What a claim's lookup found.
pub(crate) struct Found {
    /// Whether this transaction holds the key's advisory lock.
    pub locked: bool,
    /// The key's row, live or expired.
    pub row: Option<FoundRow>,
}

impl Found {
    /// Reads the rows of a claim: the lock's, then the lookup's (see [`LOOKUP`]).
    fn from_rows(rows: Vec<PgRow>) -> Result<Self, Error> {
        let mut rows = rows.into_iter();
        let locked = rows
            .next()
            .ok_or_else(|| Error::MalformedRow("the claim returned no rows".to_owned()))?
            .try_get(0)?;
        let row = rows
            .next()
            .map(|row| -> Result<_, Error> {
                let live = row.try_get(6)?;
                Ok(FoundRow { row, live })
            })
            .transpose()?;
        Ok(Self { locked, row })
    }
}

/// The key's row, as [`LOOKUP`] returns it.
pub(crate) struct FoundRow {
    row: PgRow,
    /// Not expired.
    pub live: bool,
}

/// A stored response with the fingerprint of the request that produced it.
#[derive(Debug, Clone)]
pub(crate) struct StoredRow {
    pub fingerprint: Fingerprint,
    pub replay: Replay,
}

impl FoundRow {
    /// Decodes the columns of [`LOOKUP`].
    pub(crate) fn decode(self) -> Result<StoredRow, Error> {
        let row = &self.row;
        let malformed = |what: &str| Error::MalformedRow(what.to_owned());
        let version: i16 = row.try_get(0)?;
        let hash = decode_hex(&row.try_get::<String, _>(1)?)
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| malformed("fingerprint is not 32 bytes"))?;
        let status: i16 = row.try_get(2)?;
        let Json(headers): Json<Vec<(String, String)>> = row.try_get(3)?;
        let body = decode_hex(&row.try_get::<String, _>(4)?)
            .ok_or_else(|| malformed("body is not hex"))?
            .into();
        let created_at = DateTime::from_timestamp_micros(row.try_get(5)?)
            .ok_or_else(|| malformed("created_at is out of range"))?;
        Ok(StoredRow {
            fingerprint: Fingerprint::from_parts(version, hash),
            replay: Replay {
                response: StoredResponse {
                    status: u16::try_from(status).map_err(|_| malformed("status is negative"))?,
                    headers,
                    body,
                    body_omitted: row.try_get(9)?,
                },
                first_used_at: created_at,
                first_request: Provenance {
                    request_id: row.try_get(7)?,
                    traceparent: row.try_get(8)?,
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::statement::tests::assert_spells;
    use super::*;
    use crate::KeyPolicy;

    /// As hostile as a scope and an opaque key may be (the statement tests try control
    /// characters too, which neither accepts).
    const SCOPE: &str = "'); DROP TABLE idempotency_keys; --\\' $$ é 💳 ''";
    const KEY: &str = "');DROP--\\'$$''";

    #[test]
    fn claims_spell_scope_and_key_as_literals() {
        let scope = Scope::new(SCOPE).unwrap();
        let key = IdempotencyKey::parse(KEY, KeyPolicy::Opaque).unwrap();
        let lock = lock_id(&scope, &key);
        let (scope_bytes, key_bytes) = (SCOPE.as_bytes(), KEY.as_bytes());
        assert_spells(
            &try_lock_and_lookup(&scope, &key),
            &[scope_bytes, key_bytes],
            &format!(
                "SELECT pg_try_advisory_xact_lock({lock}); EXECUTE pgidem_lookup_v3(E'', E'')"
            ),
        );
        assert_spells(
            &wait_and_lookup(2000, &scope, &key),
            &[scope_bytes, key_bytes],
            &format!(
                "SELECT idempotency_wait_lock({lock}, 2000); EXECUTE pgidem_lookup_v3(E'', E'')"
            ),
        );
    }

    #[test]
    fn the_final_step_spells_scope_and_key_as_literals() {
        let scope = Scope::new(SCOPE).unwrap();
        let key = IdempotencyKey::parse(KEY, KeyPolicy::Opaque).unwrap();
        let lock = lock_id(&scope, &key);
        let (scope_bytes, key_bytes) = (SCOPE.as_bytes(), KEY.as_bytes());
        assert_spells(
            &lock_and_end_request(&scope, &key, -7),
            &[scope_bytes, key_bytes, scope_bytes, key_bytes],
            &format!(
                "SELECT pg_advisory_xact_lock({lock}); DELETE FROM idempotency_keys \
                 WHERE scope = E'' AND key = E'' AND expires_at <= now(); \
                 DELETE FROM idempotency_requests WHERE scope = E'' AND key = E'' \
                 AND lease_token = -7 RETURNING (extract(epoch FROM created_at) * 1000000)::bigint, \
                 (extract(epoch FROM expires_at) * 1000000)::bigint, request_id, traceparent"
            ),
        );
    }

    #[test]
    fn prepare_spells_each_missing_statement() {
        let all = prepare_missing(&[]);
        assert!(
            all.as_str()
                .starts_with("PREPARE pgidem_lookup_v3(text, text) AS SELECT ")
        );
        assert!(all.as_str().ends_with("; "));
        assert_eq!(all.as_str().matches("PREPARE ").count(), PREPARED.len());

        let names = PREPARED.map(|statement| statement.name.to_owned());
        assert!(prepare_missing(&names).is_empty());
        // A connection that an older release prepared still gets ours.
        assert_eq!(
            prepare_missing(&["pgidem_insert_v2".to_owned()]).as_str(),
            all.as_str()
        );
        for statement in PREPARED {
            let name = statement.name;
            assert!(statement.prepare.starts_with(&format!("PREPARE {name}(")));
            assert_eq!(statement.execute, format!("EXECUTE {name}("));
        }
    }

    /// benches/pgbench runs the same statements as the crate.
    #[test]
    fn the_pgbench_scripts_prepare_these_statements() {
        let preamble = include_str!("../../benches/pgbench/prepare.sql");
        for statement in PREPARED {
            let line = format!("{};", statement.prepare);
            assert!(
                preamble.lines().any(|l| l == line),
                "benches/pgbench/prepare.sql lacks\n{line}"
            );
        }
    }

    #[test]
    fn lock_ids_separate_scope_from_key() {
        let a = lock_id(
            &Scope::new("ab").unwrap(),
            &IdempotencyKey::parse("c", KeyPolicy::Opaque).unwrap(),
        );
        let b = lock_id(
            &Scope::new("a").unwrap(),
            &IdempotencyKey::parse("bc", KeyPolicy::Opaque).unwrap(),
        );
        assert_ne!(a, b);
    }
}
