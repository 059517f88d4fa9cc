//! The store: the entry point of both modes, over one pool and one configuration.

use std::time::Instant;

use sqlx::PgPool;
use tracing::Instrument;

use crate::claim::Claim;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::Error;
use crate::fingerprint::IdempotentRequest;
use crate::key::{IdempotencyKey, KeyError};
use crate::metrics;
use crate::outcome::{Begin, CommitOutcome, Completion, Outcome};
use crate::response::StoredResponse;
use crate::scope::Scope;

/// The idempotency store: a [`PgPool`] plus [`Config`]. Cheap to clone.
///
/// See the [crate documentation](crate) for the flow.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    engine: Engine,
}

impl IdempotencyStore {
    /// A store with the default [`Config`] (24-hour replay window, UUID v4 keys).
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, Config::default())
    }

    /// A store with the given configuration.
    pub fn with_config(pool: PgPool, config: Config) -> Self {
        Self {
            engine: Engine::new(pool, config),
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
            engine: self.engine.reconfigured(change),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        self.engine.pool()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.engine.config()
    }

    /// What both modes run on.
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Parses an `Idempotency-Key` value under the configured key policy.
    ///
    /// # Errors
    ///
    /// [`KeyError`] saying why the value is not acceptable.
    pub fn parse_key(&self, raw: &str) -> Result<IdempotencyKey, KeyError> {
        IdempotencyKey::parse(raw, self.config().key_policy())
    }

    /// Begins a request: claims `(scope, key)` for it, or finds the response of an
    /// earlier run of the same request.
    ///
    /// One round trip opens the transaction and takes the key (two more on a connection's
    /// first claim, which prepares the hot path's statements). A stored, unexpired
    /// response answers at once; if another request holds the key without one, this waits
    /// up to [`Config::in_flight_wait`] for it to finish, without holding a connection
    /// (see [`Config::with_in_flight_wait`]). Both that wait and the wait for a connection
    /// count from the request's [start](IdempotentRequest::with_waits_from).
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
        request: &IdempotentRequest<'_>,
    ) -> Result<Begin<Claim>, Error> {
        let span = tracing::info_span!(
            "idempotency.begin",
            scope = %scope,
            key = %key,
            outcome = tracing::field::Empty,
        );
        async move {
            let started = Instant::now();
            let begun = self
                .engine
                .take(scope, key, request, "claimed", |held| {
                    let claim = Claim::new(self.engine.clone(), held, request.fingerprint());
                    std::future::ready(Ok(Some(claim)))
                })
                .await;
            metrics::time(metrics::CLAIM_SECONDS, started.elapsed());
            begun
        }
        .instrument(span)
        .await
    }

    /// The closure form: begins the request, and on a claim runs `business` in the
    /// claim's transaction and completes it with the returned response.
    ///
    /// If `business` returns an error, the transaction is rolled back, the key is freed
    /// and the error is returned.
    ///
    /// ```no_run
    /// # async fn demo(store: pg_idempotency::IdempotencyStore) -> anyhow::Result<()> {
    /// use pg_idempotency::{IdempotentRequest, Scope, StoredResponse};
    ///
    /// let scope = Scope::new("acct_42")?;
    /// let key = store.parse_key("6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60")?;
    /// let body = br#"{"amount":1000,"currency":"EUR"}"#;
    /// let request = IdempotentRequest::new("POST", "/v1/payments", body);
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
        request: &IdempotentRequest<'_>,
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
