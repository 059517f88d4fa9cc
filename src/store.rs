//! The store: claim a key, replay its response, or refuse a conflicting request.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use tracing::Instrument;

use crate::claim::{Claim, Completion, TxConn};
use crate::config::Config;
use crate::error::Error;
use crate::fingerprint::{Fingerprint, Request};
use crate::key::{IdempotencyKey, KeyError};
use crate::metrics;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::sql;

/// The idempotency store: a [`PgPool`] plus [`Config`]. Cheap to clone.
///
/// See the [crate documentation](crate) for the flow.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    pool: PgPool,
    config: Arc<Config>,
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug)]
#[must_use = "a claim must be completed, and a replay answered"]
pub enum Begin {
    /// The key is yours: do the business writes through the claim, then complete it.
    Claimed(Claim),
    /// The key already has a response for this same request: answer with it, and do not
    /// run the business logic again.
    Replay(Replay),
}

/// A stored response, replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The response, exactly as stored.
    pub response: StoredResponse,
    /// When the key was first used (database clock).
    pub first_used_at: DateTime<Utc>,
}

/// What [`IdempotencyStore::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The business logic ran; `stored` says whether its response was kept (otherwise
    /// it was rolled back and the key freed, see [`Completion::RolledBack`]).
    Executed {
        /// The response the business logic produced.
        response: StoredResponse,
        /// Whether the response was stored and the business write committed.
        stored: bool,
    },
    /// The response of an earlier run of the same request.
    Replayed(Replay),
}

impl Outcome {
    /// The response to send.
    pub fn response(&self) -> &StoredResponse {
        match self {
            Outcome::Executed { response, .. } => response,
            Outcome::Replayed(replay) => &replay.response,
        }
    }

    /// The response to send, by value.
    pub fn into_response(self) -> StoredResponse {
        match self {
            Outcome::Executed { response, .. } => response,
            Outcome::Replayed(replay) => replay.response,
        }
    }

    /// Whether this is a replay.
    pub fn is_replay(&self) -> bool {
        matches!(self, Outcome::Replayed(_))
    }
}

impl IdempotencyStore {
    /// A store with the default [`Config`] (24-hour replay window, UUID v4 keys).
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, Config::default())
    }

    /// A store with the given configuration.
    pub fn with_config(pool: PgPool, config: Config) -> Self {
        Self {
            pool,
            config: Arc::new(config),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Parses an `Idempotency-Key` value under the configured key policy.
    ///
    /// # Errors
    ///
    /// [`KeyError`] saying why the value is not acceptable.
    pub fn parse_key(&self, raw: &str) -> Result<IdempotencyKey, KeyError> {
        IdempotencyKey::parse(raw, self.config.key_policy())
    }

    /// Begins a request: claims `(scope, key)` for it, or finds the response of an
    /// earlier run of the same request.
    ///
    /// One round trip opens the transaction and takes the key (two more on a connection's
    /// first claim, which prepares the hot path's statements). A stored, unexpired
    /// response answers at once; if another request holds the key without one, this waits
    /// up to [`Config::in_flight_wait`] for it to finish.
    ///
    /// # Errors
    ///
    /// - [`Error::Conflict`]: the key was used within the replay window with a different
    ///   request (method, route or body).
    /// - [`Error::InFlight`]: another request still holds the key after the wait.
    /// - [`Error::UnknownFingerprintVersion`], [`Error::MalformedRow`],
    ///   [`Error::Database`]: server-side failures; nothing was written.
    pub async fn begin(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &Request<'_>,
    ) -> Result<Begin, Error> {
        let span = tracing::info_span!(
            "idempotency.begin",
            scope = %scope,
            key = %key,
            outcome = tracing::field::Empty,
        );
        async move {
            let started = Instant::now();
            let begun = self.claim(scope, key, request).await;
            metrics::time(metrics::CLAIM_SECONDS, started.elapsed());
            let (outcome, counter) = match &begun {
                Ok(Begin::Claimed(_)) => ("claimed", Some(metrics::CLAIMS)),
                Ok(Begin::Replay(_)) => ("replayed", Some(metrics::REPLAYS)),
                Err(Error::Conflict { .. }) => ("conflict", Some(metrics::CONFLICTS)),
                Err(Error::InFlight { .. }) => ("in_flight", Some(metrics::IN_FLIGHT)),
                Err(_) => ("error", None),
            };
            if let Some(counter) = counter {
                metrics::count(counter, 1);
            }
            tracing::Span::current().record("outcome", outcome);
            begun
        }
        .instrument(span)
        .await
    }

    async fn claim(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &Request<'_>,
    ) -> Result<Begin, Error> {
        let fingerprint = request.fingerprint();
        let lock = lock_id(scope, key);
        let (scope_str, key_str) = (scope.as_str(), key.as_str());

        let mut tx = TxConn::new(self.pool.acquire().await?);
        let claiming = Instant::now();
        let mut found = begin_claim(&mut tx, sql::claim(lock, scope_str, key_str)).await?;
        // Another request holds the key and has not stored a response (yet): wait for it,
        // for what is left of the in-flight wait, then look again.
        let remaining = self
            .config
            .in_flight_wait()
            .saturating_sub(claiming.elapsed());
        let wait_ms = i32::try_from(remaining.as_millis()).unwrap_or(i32::MAX);
        if !found.locked && found.row.as_ref().is_none_or(|row| !row.live) && wait_ms > 0 {
            let rows = tx
                .run(sql::wait_and_claim(lock, wait_ms, scope_str, key_str))
                .await?;
            found = Found::from_rows(rows)?;
        }
        match found.row {
            // A live row answers, whoever holds the lock: it cannot change until it expires.
            Some(row) if row.live => {
                tx.rollback().await?;
                let stored = row.decode()?;
                // Hash the request again only if the row was written by another version.
                let stored_version = stored.fingerprint.version();
                let ours = if stored_version == fingerprint.version() {
                    Some(fingerprint)
                } else {
                    request.fingerprint_at(stored_version)
                };
                let Some(ours) = ours else {
                    return Err(Error::UnknownFingerprintVersion {
                        version: stored_version,
                    });
                };
                if ours == stored.fingerprint {
                    Ok(Begin::Replay(Replay {
                        response: stored.response,
                        first_used_at: stored.created_at,
                    }))
                } else {
                    Err(Error::Conflict {
                        scope: scope.clone(),
                        key: key.clone(),
                        first_used_at: stored.created_at,
                    })
                }
            }
            row if found.locked => Ok(Begin::Claimed(Claim::new(
                tx,
                scope.clone(),
                key.clone(),
                fingerprint,
                // An expired row is deleted when the response is stored.
                row.is_some(),
                Arc::clone(&self.config),
            ))),
            _ => {
                tx.rollback().await?;
                Err(Error::InFlight {
                    scope: scope.clone(),
                    key: key.clone(),
                    retry_after: self.config.retry_after(),
                })
            }
        }
    }

    /// The closure form: begins the request, and on a claim runs `business` in the
    /// claim's transaction and completes it with the returned response.
    ///
    /// If `business` returns an error, the transaction is rolled back, the key is freed
    /// and the error is returned.
    ///
    /// ```no_run
    /// # async fn demo(store: pg_idempotency::IdempotencyStore) -> anyhow::Result<()> {
    /// use pg_idempotency::{Request, Scope, StoredResponse};
    ///
    /// let scope = Scope::new("acct_42")?;
    /// let key = store.parse_key("6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60")?;
    /// let body = br#"{"amount":1000,"currency":"EUR"}"#;
    /// let request = Request::new("POST", "/v1/payments", body);
    ///
    /// let outcome = store
    ///     .run(&scope, &key, &request, async |claim| {
    ///         sqlx::query("INSERT INTO payments (amount) VALUES (1000)")
    ///             .execute(&mut *claim)
    ///             .await?;
    ///         Ok::<_, anyhow::Error>(StoredResponse::new(201, r#"{"status":"paid"}"#))
    ///     })
    ///     .await?;
    /// println!("{} (replayed: {})", outcome.response().status, outcome.is_replay());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Everything [`begin`](Self::begin) and [`Claim::complete`] return, converted into
    /// `E`, and the errors of `business`.
    pub async fn run<F, E>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &Request<'_>,
        business: F,
    ) -> Result<Outcome, E>
    where
        F: AsyncFnOnce(&mut Claim) -> Result<StoredResponse, E>,
        E: From<Error>,
    {
        let mut claim = match self.begin(scope, key, request).await? {
            Begin::Replay(replay) => return Ok(Outcome::Replayed(replay)),
            Begin::Claimed(claim) => claim,
        };
        let response = match business(&mut claim).await {
            Ok(response) => response,
            Err(error) => {
                if let Err(rollback) = claim.abort().await {
                    tracing::warn!(error = %rollback, "rollback after a failed business step failed; the connection was closed");
                }
                return Err(error);
            }
        };
        let stored = claim.complete(&response).await? == Completion::Stored;
        Ok(Outcome::Executed { response, stored })
    }
}

/// Opens the transaction and runs `claim` (see [`sql::claim`]) in it, in one round trip.
///
/// On a connection that lacks the hot path's prepared statements (the first claim on a
/// new connection, or one after `DISCARD ALL`), the `EXECUTE` fails with SQLSTATE 26000
/// before anything is written: open the transaction again, prepare what is missing and
/// run `claim`, in two more round trips.
async fn begin_claim(tx: &mut TxConn, claim: String) -> Result<Found, Error> {
    let rows = match tx.run(format!("BEGIN; {claim}")).await {
        Err(error) if sql::is_unprepared(&error) => {
            let present: Vec<String> = tx
                .run(sql::FIND_PREPARED.to_owned())
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            tracing::debug!("preparing the hot-path statements on this connection");
            tx.run(sql::prepare_missing(&present) + &claim).await?
        }
        rows => rows?,
    };
    Found::from_rows(rows)
}

/// Prepares the store's hot-path statements on a new connection, for
/// [`PgPoolOptions::after_connect`](sqlx::postgres::PgPoolOptions::after_connect).
///
/// Optional: without it, a connection's first claim prepares them itself, after the
/// server has answered (and logged) `prepared statement "pgidem_lookup_v1" does not exist`
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
    let found = sqlx::query!(
        r#"SELECT to_regclass('idempotency_keys') IS NOT NULL AS "migrated!",
                  array(SELECT name::text FROM pg_prepared_statements
                        WHERE starts_with(name, 'pgidem_')) AS "present!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    let prepare = sql::prepare_missing(&found.present);
    if found.migrated && !prepare.is_empty() {
        sqlx::raw_sql(AssertSqlSafe(prepare))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
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

/// What a claim statement ([`sql::claim`], [`sql::wait_and_claim`]) found.
struct Found {
    /// Whether this transaction holds the key's advisory lock.
    locked: bool,
    /// The key's row, live or expired.
    row: Option<FoundRow>,
}

impl Found {
    /// Reads the rows of a claim statement: the lock's, then the lookup's (see
    /// [`sql::LOOKUP`]).
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

struct FoundRow {
    row: PgRow,
    live: bool,
}

/// A stored response with its fingerprint.
struct StoredRow {
    fingerprint: Fingerprint,
    response: StoredResponse,
    created_at: DateTime<Utc>,
}

impl FoundRow {
    fn decode(self) -> Result<StoredRow, Error> {
        let row = &self.row;
        let malformed = |what: &str| Error::MalformedRow(what.to_owned());
        let version: i16 = row.try_get(0)?;
        let hash = sql::decode_hex(&row.try_get::<String, _>(1)?)
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| malformed("fingerprint is not 32 bytes"))?;
        let status: i16 = row.try_get(2)?;
        let Json(headers): Json<Vec<(String, String)>> = row.try_get(3)?;
        let body = sql::decode_hex(&row.try_get::<String, _>(4)?)
            .ok_or_else(|| malformed("body is not hex"))?;
        let created_at = DateTime::from_timestamp_micros(row.try_get(5)?)
            .ok_or_else(|| malformed("created_at is out of range"))?;
        Ok(StoredRow {
            fingerprint: Fingerprint::from_parts(version, hash),
            response: StoredResponse {
                status: u16::try_from(status).map_err(|_| malformed("status is negative"))?,
                headers,
                body,
            },
            created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_separate_scope_from_key() {
        let a = lock_id(
            &Scope::new("ab").unwrap(),
            &IdempotencyKey::parse("c", crate::KeyPolicy::Opaque).unwrap(),
        );
        let b = lock_id(
            &Scope::new("a").unwrap(),
            &IdempotencyKey::parse("bc", crate::KeyPolicy::Opaque).unwrap(),
        );
        assert_ne!(a, b);
    }
}
