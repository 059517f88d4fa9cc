//! The store: claim a key, replay its response, or refuse a conflicting request.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tracing::Instrument;

use crate::claim::{Claim, CommitOutcome, Completion, connection_broke};
use crate::config::Config;
use crate::db::{Found, StoredRow, TxConn};
use crate::error::Error;
use crate::fingerprint::{Fingerprint, Request};
use crate::key::{IdempotencyKey, KeyError};
use crate::metrics;
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::waiters::{FIRST_POLL, Holding, MAX_POLL, Waited, Waiters};

/// The idempotency store: a [`PgPool`] plus [`Config`]. Cheap to clone.
///
/// See the [crate documentation](crate) for the flow.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    pool: PgPool,
    config: Arc<Config>,
    /// The keys this store's claims hold, with the duplicates waiting for them; shared by
    /// [`reconfigured`](Self::reconfigured) copies.
    waiters: Arc<Waiters>,
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
    /// The request that produced the response (empty for rows stored without one).
    pub first_request: Provenance,
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

/// What [`IdempotencyStore::lock_key`] found.
pub(crate) enum Locked {
    /// The key has a stored response for this same request.
    Answered(Replay),
    /// The transaction holds the key's advisory lock, and the key has no live row.
    Held {
        /// The transaction.
        tx: TxConn,
        /// The key has an expired row, which counts as unused.
        expired_row: bool,
        /// Wakes this process's duplicates of the key when dropped, once the transaction
        /// has ended.
        holding: Holding,
    },
}

/// Records how a begin ended, in the current span's `outcome` and in the matching
/// counter; `ok` names a success and its counter.
pub(crate) fn record_begin<T>(
    begun: &Result<T, Error>,
    ok: impl FnOnce(&T) -> (&'static str, &'static str),
) {
    let (outcome, counter) = match begun {
        Ok(begun) => {
            let (outcome, counter) = ok(begun);
            (outcome, Some(counter))
        }
        Err(Error::Conflict { .. }) => ("conflict", Some(metrics::CONFLICTS)),
        Err(Error::InFlight { .. }) => ("in_flight", Some(metrics::IN_FLIGHT)),
        Err(_) => ("error", None),
    };
    if let Some(counter) = counter {
        metrics::count(counter, 1);
    }
    tracing::Span::current().record("outcome", outcome);
}

/// The answer a live stored row gives `request`: its replay if the request is the same,
/// else [`Error::Conflict`].
pub(crate) fn answer(
    stored: StoredRow,
    scope: &Scope,
    key: &IdempotencyKey,
    request: &Request<'_>,
) -> Result<Replay, Error> {
    if same_request(&stored.fingerprint, request)? {
        Ok(Replay {
            response: stored.response,
            first_used_at: stored.created_at,
            first_request: stored.provenance,
        })
    } else {
        Err(Error::Conflict {
            scope: scope.clone(),
            key: key.clone(),
            first_used_at: stored.created_at,
            first_request: stored.provenance,
        })
    }
}

/// Whether `request` is the one `stored` fingerprints (hashed again at the stored
/// version if another release wrote it).
///
/// # Errors
///
/// [`Error::UnknownFingerprintVersion`] for a version this build does not know.
pub(crate) fn same_request(stored: &Fingerprint, request: &Request<'_>) -> Result<bool, Error> {
    let version = stored.version();
    request
        .fingerprint_at(version)
        .map(|ours| ours == *stored)
        .ok_or(Error::UnknownFingerprintVersion { version })
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
            waiters: Arc::default(),
        }
    }

    /// The same store, sharing this one's pool, with its configuration changed by
    /// `change`: the settings of one route (TTL, key policy, in-flight wait, ...) in a
    /// service whose routes differ. Cheap: no second pool, no new connection.
    ///
    /// ```no_run
    /// # fn demo(store: pg_idempotency::IdempotencyStore) {
    /// use std::time::Duration;
    /// use pg_idempotency::KeyPolicy;
    ///
    /// let exports = store.reconfigured(|config| {
    ///     config
    ///         .with_ttl(Duration::from_secs(7 * 24 * 3600))
    ///         .with_key_policy(KeyPolicy::Opaque)
    /// });
    /// assert_eq!(exports.config().ttl(), Duration::from_secs(604_800));
    /// # }
    /// ```
    #[must_use]
    pub fn reconfigured(&self, change: impl FnOnce(Config) -> Config) -> Self {
        Self {
            pool: self.pool.clone(),
            config: Arc::new(change((*self.config).clone())),
            waiters: Arc::clone(&self.waiters),
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

    /// The configuration, shared with the claims of this store.
    pub(crate) fn shared_config(&self) -> Arc<Config> {
        Arc::clone(&self.config)
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
    /// up to [`Config::in_flight_wait`] for it to finish, without holding a connection
    /// (see [`Config::with_in_flight_wait`]).
    ///
    /// # Errors
    ///
    /// - [`Error::Conflict`]: the key was used within the replay window with a different
    ///   request (method, path and query string, or body).
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
            record_begin(&begun, |begun| match begun {
                Begin::Claimed(_) => ("claimed", metrics::CLAIMS),
                Begin::Replay(_) => ("replayed", metrics::REPLAYS),
            });
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
        Ok(match self.lock_key(scope, key, request).await? {
            Locked::Answered(replay) => Begin::Replay(replay),
            Locked::Held {
                tx,
                expired_row,
                holding,
            } => Begin::Claimed(Claim::new(
                self,
                tx,
                holding,
                scope.clone(),
                key.clone(),
                request.fingerprint(),
                // An expired row is deleted when the response is stored.
                expired_row,
            )),
        })
    }

    /// Opens a transaction, tries the key's advisory lock and answers from the key's live
    /// row if it has one (a replay, or [`Error::Conflict`]). While another request holds
    /// the key without a live row, gives the connection back and waits (see
    /// [`crate::waiters`]), then tries again, for at most [`Config::in_flight_wait`].
    ///
    /// # Errors
    ///
    /// [`Error::InFlight`] if the key stayed held and no live row appeared, or too many
    /// duplicates of the key already wait in this process; [`Error::Conflict`]; the
    /// store's server-side errors.
    pub(crate) async fn lock_key(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &Request<'_>,
    ) -> Result<Locked, Error> {
        let deadline = Instant::now() + self.config.in_flight_wait();
        let limit = self.config.in_flight_waiters();
        // No pause before the first look; then it doubles.
        let mut pause = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.waiters.wait(scope, key, pause, left, limit).await {
                Waited::Refused => return Err(self.in_flight(scope, key)),
                Waited::Answered(row) => {
                    return answer(row, scope, key, request).map(Locked::Answered);
                }
                Waited::LookAgain => {}
            }
            let (mut tx, found) = self.open_claim(scope, key).await?;
            match found.row {
                // A live row answers, whoever holds the lock: it cannot change until it
                // expires.
                Some(row) if row.live => {
                    tx.rollback().await?;
                    return answer(row.decode()?, scope, key, request).map(Locked::Answered);
                }
                row if found.locked => {
                    return Ok(Locked::Held {
                        tx,
                        expired_row: row.is_some(),
                        holding: self.waiters.hold(scope, key),
                    });
                }
                _ => tx.rollback().await?,
            }
            // Another request holds the key and has not stored a response (yet).
            if Instant::now() >= deadline {
                return Err(self.in_flight(scope, key));
            }
            pause = Some(pause.map_or(FIRST_POLL, |pause| (pause * 2).min(MAX_POLL)));
        }
    }

    /// Takes a pooled connection and, in one round trip, opens a transaction on it, tries
    /// the key's lock and looks the key up.
    ///
    /// That round trip checks the connection too, so unless the configuration asks for
    /// the pool's checks ([`Config::with_pool_checks`]), an idle connection is taken as
    /// it is ([`PgPool::try_acquire`](sqlx::PgPool::try_acquire): no ping, no `before_acquire`
    /// hook). If the server
    /// closed it while it sat in the pool (a restart, a proxy's idle timeout), nothing has
    /// run: it is closed, and the claim runs on a connection taken with the pool's checks.
    async fn open_claim(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
    ) -> Result<(TxConn, Found), Error> {
        let idle = if self.config.pool_checks() {
            None
        } else {
            self.pool.try_acquire()
        };
        if let Some(conn) = idle {
            let mut tx = TxConn::new(conn);
            match tx.begin_claim(scope, key).await {
                Err(Error::Database(error)) if connection_broke(&error) => {
                    tracing::debug!(%error, "an idle connection was closed; claiming on another");
                    tx.discard();
                }
                found => return found.map(|found| (tx, found)),
            }
        }
        let mut tx = TxConn::new(self.pool.acquire().await?);
        let found = tx.begin_claim(scope, key).await?;
        Ok((tx, found))
    }

    /// [`Error::InFlight`] for this key, with the configured retry hint.
    pub(crate) fn in_flight(&self, scope: &Scope, key: &IdempotencyKey) -> Error {
        Error::InFlight {
            scope: scope.clone(),
            key: key.clone(),
            retry_after: self.config.retry_after(),
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
    /// `E`, and the errors of `business`; except an [`Error::CommitInterrupted`] whose
    /// outcome is [`CommitOutcome::Stored`], which is an [`Outcome::Executed`] with the
    /// stored response.
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
        match claim.complete(&response).await {
            Ok(completion) => Ok(Outcome::Executed {
                response,
                stored: completion == Completion::Stored,
            }),
            // The reply to COMMIT was lost, but the store found the response stored.
            Err(Error::CommitInterrupted {
                outcome: CommitOutcome::Stored(replay),
                ..
            }) => Ok(Outcome::Executed {
                response: replay.response,
                stored: true,
            }),
            Err(error) => Err(error.into()),
        }
    }
}
