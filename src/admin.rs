//! Operator queries: table statistics, inspecting one key, forgetting one, and
//! distributing the table with Citus.
//!
//! The `pg-idempotency` command-line tool (feature `cli`) is built on these.

use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgExecutor, Postgres};

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::provenance::Provenance;
use crate::scope::Scope;

/// The state of the `idempotency_keys` table, and how many phased requests are in
/// progress.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Rows in the table (live and expired).
    pub rows: i64,
    /// Rows past `expires_at` (database clock), waiting for the sweeper.
    pub expired_rows: i64,
    /// `created_at` of the oldest row, if any.
    pub oldest_created_at: Option<DateTime<Utc>>,
    /// Size of the table (heap and TOAST; on Citus, of all its shards), in bytes.
    pub table_bytes: i64,
    /// Size of its indexes, in bytes.
    pub index_bytes: i64,
    /// Dead tuples according to the statistics collector (vacuum reclaims them; on Citus,
    /// those of the workers, over all shards).
    pub dead_tuples: i64,
    /// [Phased requests](crate::phased) in progress (`idempotency_requests`), within their
    /// replay window.
    pub phased_in_progress: i64,
    /// Of those, the ones whose holder's lease ran out: a retry or the completer will take
    /// them over.
    pub phased_abandoned: i64,
    /// The abandoned ones by the operation that started them (`None`: not started; the
    /// completer frees their keys), most first. A completer finishes only the operations
    /// registered with it: an operation no node registers stays here until its requests
    /// expire.
    pub phased_abandoned_by_operation: Vec<(Option<String>, i64)>,
}

/// Counts rows (full scans: meant for operators, not for a hot path) and reads sizes
/// and dead tuples from the catalog, through `idempotency_storage()`, which adds them up
/// over the shards when the table is distributed with Citus.
///
/// # Errors
///
/// [`Error::Database`].
#[tracing::instrument(name = "idempotency.stats", skip_all)]
pub async fn stats<'a>(conn: impl Acquire<'a, Database = Postgres>) -> Result<Stats, Error> {
    // One transaction: through a pooler in transaction mode, each query keeps its server
    // connection (crate::db::in_transaction).
    let mut conn = conn.begin().await?;
    // The counts are a subquery of their own: Citus refuses a catalog subquery beside an
    // aggregate over a distributed table, and plans this one shard by shard.
    let row = sqlx::query!(
        r#"
        SELECT
            counted.rows                      AS "rows!",
            counted.expired_rows              AS "expired_rows!",
            counted.oldest_created_at,
            storage.table_bytes               AS "table_bytes!",
            storage.index_bytes               AS "index_bytes!",
            storage.dead_tuples               AS "dead_tuples!"
        FROM (SELECT count(*)                                    AS rows,
                     count(*) FILTER (WHERE expires_at <= now()) AS expired_rows,
                     min(created_at)                             AS oldest_created_at
              FROM idempotency_keys) counted,
             idempotency_storage() storage
        "#
    )
    .fetch_one(&mut *conn)
    .await?;
    let phased = sqlx::query!(
        r#"
        SELECT count(*) FILTER (WHERE expires_at > now())                           AS "in_progress!",
               count(*) FILTER (WHERE expires_at > now() AND leased_until <= now()) AS "abandoned!"
        FROM idempotency_requests
        "#
    )
    .fetch_one(&mut *conn)
    .await?;
    let by_operation = sqlx::query!(
        r#"
        SELECT operation, count(*) AS "abandoned!"
        FROM idempotency_requests
        WHERE expires_at > now() AND leased_until <= now()
        GROUP BY operation
        ORDER BY 2 DESC, 1
        "#
    )
    .fetch_all(&mut *conn)
    .await?;
    conn.commit().await?;
    Ok(Stats {
        rows: row.rows,
        expired_rows: row.expired_rows,
        oldest_created_at: row.oldest_created_at,
        table_bytes: row.table_bytes,
        index_bytes: row.index_bytes,
        dead_tuples: row.dead_tuples,
        phased_in_progress: phased.in_progress,
        phased_abandoned: phased.abandoned,
        phased_abandoned_by_operation: by_operation
            .into_iter()
            .map(|row| (row.operation, row.abandoned))
            .collect(),
    })
}

/// What is stored for one key. The body is only included when asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The request fingerprint stored with the key.
    pub fingerprint: Fingerprint,
    /// The stored response status.
    pub status: u16,
    /// Number of stored response headers.
    pub header_count: usize,
    /// Size of the stored response body, in bytes.
    pub body_bytes: i64,
    /// The stored body, when [`inspect`] was asked for it.
    pub body: Option<Vec<u8>>,
    /// When the key was first used (database clock).
    pub created_at: DateTime<Utc>,
    /// When the key stops being replayed (database clock).
    pub expires_at: DateTime<Utc>,
    /// Whether `expires_at` has passed (database clock): the key counts as unused.
    pub expired: bool,
    /// The request that produced the stored response (empty for rows stored without
    /// provenance).
    pub first_request: Provenance,
}

/// Reads what is stored for `(scope, key)`; `None` if nothing is (a transactional request
/// that is still running holds a lock, not a row, so it shows as `None` too; a phased
/// request in progress has a row of its own: [`inspect_request`]).
///
/// # Errors
///
/// [`Error::Database`], or [`Error::MalformedRow`] for a row this crate did not write.
#[tracing::instrument(name = "idempotency.inspect", skip_all, fields(scope = %scope, key = %key))]
pub async fn inspect<'e>(
    executor: impl PgExecutor<'e>,
    scope: &Scope,
    key: &IdempotencyKey,
    with_body: bool,
) -> Result<Option<KeyInfo>, Error> {
    let row = sqlx::query!(
        r#"
        SELECT fingerprint_version, fingerprint, status,
               jsonb_array_length(headers)                  AS "header_count!",
               octet_length(body)::bigint                   AS "body_bytes!",
               CASE WHEN $3 THEN body END                   AS body,
               created_at, expires_at,
               expires_at <= now()                          AS "expired!",
               request_id, traceparent
        FROM idempotency_keys
        WHERE scope = $1 AND key = $2
        "#,
        scope.as_str(),
        key.as_str(),
        with_body,
    )
    .fetch_optional(executor)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let malformed = |what: &str| Error::MalformedRow(what.to_owned());
    let hash = <[u8; 32]>::try_from(row.fingerprint)
        .map_err(|_| malformed("fingerprint is not 32 bytes"))?;
    Ok(Some(KeyInfo {
        fingerprint: Fingerprint::from_parts(row.fingerprint_version, hash),
        status: u16::try_from(row.status).map_err(|_| malformed("status is negative"))?,
        header_count: usize::try_from(row.header_count).unwrap_or(0),
        body_bytes: row.body_bytes,
        body: row.body,
        created_at: row.created_at,
        expires_at: row.expires_at,
        expired: row.expired,
        first_request: Provenance {
            request_id: row.request_id,
            traceparent: row.traceparent,
        },
    }))
}

/// A [phased request](crate::phased) in progress, as [`inspect_request`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestInfo {
    /// The request fingerprint.
    pub fingerprint: Fingerprint,
    /// The operation that started it (`None`: taken, never started).
    pub operation: Option<String>,
    /// The last step whose output is recorded.
    pub recovery_point: Option<String>,
    /// The names of the recorded steps.
    pub recorded_steps: Vec<String>,
    /// Holders so far (1 + takeovers).
    pub attempts: i32,
    /// When the holder's lease ends (database clock).
    pub leased_until: DateTime<Utc>,
    /// Whether the lease has run out: a retry or the completer may take the request over.
    pub abandoned: bool,
    /// When the key was first used (database clock).
    pub created_at: DateTime<Utc>,
    /// When the request stops counting (database clock).
    pub expires_at: DateTime<Utc>,
    /// Whether `expires_at` has passed: the key counts as unused.
    pub expired: bool,
    /// The request that started the operation.
    pub first_request: Provenance,
}

/// Reads the phased request in progress with `(scope, key)`, if any.
///
/// # Errors
///
/// [`Error::Database`], or [`Error::MalformedRow`] for a row this crate did not write.
#[tracing::instrument(name = "idempotency.inspect_request", skip_all, fields(scope = %scope, key = %key))]
pub async fn inspect_request<'e>(
    executor: impl PgExecutor<'e>,
    scope: &Scope,
    key: &IdempotencyKey,
) -> Result<Option<RequestInfo>, Error> {
    let row = sqlx::query!(
        r#"
        SELECT fingerprint_version, fingerprint, operation, recovery_point,
               array(SELECT jsonb_object_keys(progress) ORDER BY 1) AS "recorded_steps!",
               attempts, leased_until, leased_until <= now() AS "abandoned!",
               created_at, expires_at, expires_at <= now() AS "expired!",
               request_id, traceparent
        FROM idempotency_requests
        WHERE scope = $1 AND key = $2
        "#,
        scope.as_str(),
        key.as_str(),
    )
    .fetch_optional(executor)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let hash = <[u8; 32]>::try_from(row.fingerprint)
        .map_err(|_| Error::MalformedRow("fingerprint is not 32 bytes".to_owned()))?;
    Ok(Some(RequestInfo {
        fingerprint: Fingerprint::from_parts(row.fingerprint_version, hash),
        operation: row.operation,
        recovery_point: row.recovery_point,
        recorded_steps: row.recorded_steps,
        attempts: row.attempts,
        leased_until: row.leased_until,
        abandoned: row.abandoned,
        created_at: row.created_at,
        expires_at: row.expires_at,
        expired: row.expired,
        first_request: Provenance {
            request_id: row.request_id,
            traceparent: row.traceparent,
        },
    }))
}

/// Deletes what is stored for `(scope, key)`, so the next request with the key runs
/// fresh: its stored response, and a [phased request](crate::phased) in progress with it
/// (whose recorded steps are then forgotten too: a holder still running it can record
/// nothing more). Returns whether there was a row. An operator's tool: a released key no
/// longer protects against a duplicate of its request.
///
/// # Errors
///
/// [`Error::Database`].
#[tracing::instrument(name = "idempotency.forget", skip_all, fields(scope = %scope, key = %key))]
pub async fn forget<'e>(
    executor: impl PgExecutor<'e>,
    scope: &Scope,
    key: &IdempotencyKey,
) -> Result<bool, Error> {
    let deleted = sqlx::query_scalar!(
        r#"WITH request AS (
               DELETE FROM idempotency_requests WHERE scope = $1 AND key = $2 RETURNING 1),
           stored AS (
               DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 RETURNING 1)
           SELECT (SELECT count(*) FROM request) + (SELECT count(*) FROM stored) AS "deleted!""#,
        scope.as_str(),
        key.as_str()
    )
    .fetch_one(executor)
    .await?;
    Ok(deleted > 0)
}

/// Distributes `idempotency_keys` by `scope` on Citus, and `idempotency_requests` (phased
/// requests in progress) co-located with it (`idempotency_distribute()`): `true` if it
/// did, `false` if the tables already were. Run it once, on the coordinator, before the
/// tables grow: distributing copies their rows. Then co-locate the business tables with
/// [`colocate`].
///
/// # Errors
///
/// [`Error::Database`]: the `citus` extension is not in the database (SQLSTATE 42704),
/// or the table is already distributed another way (0A000).
#[tracing::instrument(name = "idempotency.distribute", skip_all)]
pub async fn distribute<'e>(executor: impl PgExecutor<'e>) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar!(r#"SELECT idempotency_distribute() AS "distributed!""#)
            .fetch_one(executor)
            .await?,
    )
}

/// Distributes the business table `table` by its tenant column `column` on Citus,
/// co-located with `idempotency_keys` (`idempotency_colocate()`): `true` if it did,
/// `false` if it already was. A request's key row and its business rows then live on
/// one worker, and its transaction stays on that worker.
///
/// `column` must hold the request's scope, with the scope's type (`text`). `table` is
/// resolved like a name in SQL (`search_path`, `schema.table`, quoted identifiers): it
/// is passed as a value, never spliced into SQL.
///
/// # Errors
///
/// [`Error::Database`]: `idempotency_keys` is not distributed yet (55000), the table
/// does not exist (42P01), or it is distributed another way (0A000); Citus' own errors,
/// e.g. a unique constraint without the tenant column.
#[tracing::instrument(name = "idempotency.colocate", skip(executor))]
pub async fn colocate<'e>(
    executor: impl PgExecutor<'e>,
    table: &str,
    column: &str,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(
        r#"SELECT idempotency_colocate($1::text::regclass, $2) AS "distributed!""#,
        table,
        column
    )
    .fetch_one(executor)
    .await?)
}
