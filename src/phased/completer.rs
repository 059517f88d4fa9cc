//! Finishing phased requests whose clients never came back: a one-shot pass, and a
//! background completer that stops cleanly.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::claim::{PhasedClaim, Taker, Taking};
use super::lease::millis;
use super::operation::Operation;
use crate::db::{TxConn, in_transaction};
use crate::error::Error;
use crate::key::{IdempotencyKey, KeyPolicy};
use crate::outcome::Outcome;
use crate::scope::Scope;
use crate::store::IdempotencyStore;

/// How the completer runs.
#[derive(Debug, Clone)]
pub struct CompleterOptions {
    batch_size: u32,
    grace: Duration,
    interval: Duration,
}

impl Default for CompleterOptions {
    /// Up to 32 requests a pass, taken as soon as their lease has run out, a pass every
    /// 5 s.
    fn default() -> Self {
        Self {
            batch_size: 32,
            grace: Duration::ZERO,
            interval: Duration::from_secs(5),
        }
    }
}

impl CompleterOptions {
    /// Requests one pass takes at most (default 32; at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long after its lease ran out a request is left to its client's own retry
    /// before the completer takes it (default none).
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Time between the end of one background pass and the start of the next
    /// (default 5 s). Also the back-off step: a request waits this much longer after its
    /// lease for each earlier holder (at most 60 times).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Requests one pass takes at most.
    pub fn batch_size(&self) -> u32 {
        self.batch_size
    }

    /// The grace left to clients after a lease ran out.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Time between two background passes.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// What one [`Completer::complete_abandoned`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompleterPass {
    /// Requests driven to a stored response.
    pub completed: u64,
    /// Requests taken over whose operation failed again, or whose response the store
    /// policy does not keep (released for a later pass, which waits longer after each
    /// failed attempt), or that could not be read or taken.
    pub failed: u64,
    /// Requests abandoned before any operation started them: nothing was done, and their
    /// keys were freed.
    pub forgotten: u64,
}

impl CompleterPass {
    fn add(&mut self, other: CompleterPass) {
        self.completed += other.completed;
        self.failed += other.failed;
        self.forgotten += other.forgotten;
    }
}

/// Drives abandoned [phased requests](super) to completion with the registered
/// [`Operation`]s: a request whose holder's lease ran out (a crash, a client that gave
/// up) is taken over and resumed after its last recovery point, exactly as a client's
/// retry would.
///
/// ```no_run
/// # use pg_idempotency::phased::{Finished, Operation, Steps};
/// # struct Charge;
/// # impl Operation for Charge {
/// #     const NAME: &'static str = "charge";
/// #     type Input = ();
/// #     type Error = pg_idempotency::Error;
/// #     async fn run(&self, _: &(), _: &mut Steps) -> Result<Finished, Self::Error> { todo!() }
/// # }
/// # async fn demo(store: pg_idempotency::IdempotencyStore) {
/// use std::sync::Arc;
/// use pg_idempotency::phased::Completer;
///
/// let completer = Completer::new(store).register(Arc::new(Charge)).spawn();
/// // ... serve requests ...
/// let pass = completer.stop().await; // finishes the request in progress, then returns
/// println!("completed {} abandoned requests", pass.completed);
/// # }
/// ```
#[derive(Clone)]
pub struct Completer {
    store: IdempotencyStore,
    operations: HashMap<&'static str, Arc<dyn Resume>>,
    options: CompleterOptions,
}

impl fmt::Debug for Completer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completer")
            .field("operations", &self.operations.keys().collect::<Vec<_>>())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Completer {
    /// A completer over `store` with no operations yet and the default options.
    pub fn new(store: IdempotencyStore) -> Self {
        Self {
            store,
            operations: HashMap::new(),
            options: CompleterOptions::default(),
        }
    }

    /// Completes the requests that `operation` started (by [`Operation::NAME`]).
    /// Requests of operations that are not registered are left alone (another node may
    /// know them) and take no place in a pass's batch.
    #[must_use]
    pub fn register<O: Operation>(mut self, operation: Arc<O>) -> Self {
        self.operations.insert(O::NAME, operation);
        self
    }

    /// Replaces the options.
    #[must_use]
    pub fn with_options(mut self, options: CompleterOptions) -> Self {
        self.options = options;
        self
    }

    /// One pass: takes up to a batch of requests whose lease ran out (oldest first) and
    /// resumes each with its operation; frees the keys of requests that no operation
    /// started. A request another holder takes meanwhile is skipped.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the requests cannot be listed; a failure of one request is
    /// logged and counted in [`CompleterPass::failed`].
    pub async fn complete_abandoned(&self) -> Result<CompleterPass, Error> {
        self.pass(&CancellationToken::new()).await
    }

    async fn pass(&self, stop: &CancellationToken) -> Result<CompleterPass, Error> {
        let span = tracing::info_span!(
            "idempotency.complete_abandoned",
            completed = tracing::field::Empty,
            failed = tracing::field::Empty,
            forgotten = tracing::field::Empty,
        );
        async move {
            let known: Vec<&str> = self.operations.keys().copied().collect();
            // A request whose earlier takeovers failed waits longer each time (its
            // attempts times the interval, at most 60 of them); one whose key got a
            // response meanwhile (the key was used by a transactional request too) can
            // never finish and is left to expire.
            // Only requests it can finish: unstarted ones (their keys are freed), and
            // those of the operations registered here; others are left to the nodes that
            // know them, and never fill a batch (`stats` counts them by operation).
            let abandoned = in_transaction(self.store.pool(), async |conn| {
                Ok(sqlx::query!(
                r#"SELECT scope, key, operation FROM idempotency_requests r
                   WHERE leased_until <= now() - ($1::bigint + least(attempts - 1, 60) * $3::bigint)
                                                 * interval '1 millisecond'
                     AND expires_at > now()
                     AND (operation IS NULL OR operation = ANY($4::text[]))
                     AND NOT EXISTS (SELECT FROM idempotency_keys k
                                     WHERE k.scope = r.scope AND k.key = r.key
                                       AND k.expires_at > now())
                   ORDER BY leased_until
                   LIMIT $2"#,
                millis(self.options.grace),
                i64::from(self.options.batch_size),
                millis(self.options.interval),
                &known as &[&str],
            )
            .fetch_all(&mut *conn)
            .await?)
            })
            .await?;
            let mut pass = CompleterPass::default();
            for row in abandoned {
                if stop.is_cancelled() {
                    break;
                }
                let request = Abandoned::read(&row.scope, &row.key);
                let done = match (request, row.operation) {
                    (Err(error), _) => Err(error),
                    (Ok(request), None) => self.forget_unstarted(&request).await,
                    (Ok(request), Some(operation)) => match self.operations.get(operation.as_str())
                    {
                        Some(resume) => self.resume(&request, resume.as_ref()).await,
                        // Registered when the pass began, so always there.
                        None => Ok(CompleterPass::default()),
                    },
                };
                // One request's failure (a malformed row, a database error) is counted,
                // and the pass goes on with the others.
                pass.add(done.unwrap_or_else(|error| {
                    tracing::warn!(%error, scope = row.scope, "an abandoned request could not be completed");
                    CompleterPass {
                        failed: 1,
                        ..CompleterPass::default()
                    }
                }));
            }
            let span = tracing::Span::current();
            span.record("completed", pass.completed);
            span.record("failed", pass.failed);
            span.record("forgotten", pass.forgotten);
            Ok(pass)
        }
        .instrument(span)
        .await
    }

    /// Frees the key of a request no operation started (nothing was done for it).
    async fn forget_unstarted(&self, request: &Abandoned) -> Result<CompleterPass, Error> {
        let deleted = in_transaction(self.store.pool(), async |conn| {
            Ok(sqlx::query!(
                r#"DELETE FROM idempotency_requests
               WHERE scope = $1 AND key = $2 AND operation IS NULL AND leased_until <= now()"#,
                request.scope.as_str(),
                request.key.as_str(),
            )
            .execute(&mut *conn)
            .await?)
        })
        .await?;
        Ok(CompleterPass {
            forgotten: deleted.rows_affected(),
            ..CompleterPass::default()
        })
    }

    async fn resume(
        &self,
        request: &Abandoned,
        resume: &dyn Resume,
    ) -> Result<CompleterPass, Error> {
        let taking = Taking {
            engine: self.store.engine(),
            scope: &request.scope,
            key: &request.key,
            taker: Taker::Completer,
        };
        let holding = self.store.engine().hold(&request.scope, &request.key);
        let began = Instant::now();
        let tx = TxConn::begin(self.store.pool()).await?;
        let Some(mut claim) = taking.take(tx, began, holding).await? else {
            return Ok(CompleterPass::default());
        };
        // The completer takes only started requests, which have their input.
        let Some(input) = claim.take_input() else {
            claim.release().await?;
            return Ok(CompleterPass::default());
        };
        Ok(match resume.resume(claim, input).await {
            Ok(Outcome::Executed { stored: true, .. }) => CompleterPass {
                completed: 1,
                ..CompleterPass::default()
            },
            Ok(_) => CompleterPass {
                failed: 1,
                ..CompleterPass::default()
            },
            Err(error) => {
                tracing::warn!(%error, scope = %request.scope, key = %request.key, "completing an abandoned request failed; it is released for a later pass");
                CompleterPass {
                    failed: 1,
                    ..CompleterPass::default()
                }
            }
        })
    }

    /// Starts completing now and then every [`CompleterOptions::interval`], with a
    /// token of its own. Must be called inside a tokio runtime.
    pub fn spawn(self) -> CompleterTask {
        self.spawn_with_token(CancellationToken::new())
    }

    /// Like [`spawn`](Self::spawn), stopping when `stop` (or a parent of it) is cancelled.
    pub fn spawn_with_token(self, stop: CancellationToken) -> CompleterTask {
        let task = tokio::spawn(self.run(stop.clone()));
        CompleterTask { stop, task }
    }

    async fn run(self, stop: CancellationToken) -> CompleterPass {
        let mut total = CompleterPass::default();
        while !stop.is_cancelled() {
            match self.pass(&stop).await {
                Ok(pass) => total.add(pass),
                Err(error) => {
                    tracing::warn!(%error, "completing abandoned phased requests failed; retrying at the next interval")
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.options.interval) => {}
            }
        }
        total
    }
}

/// A request the completer found, read back from its row.
struct Abandoned {
    scope: Scope,
    key: IdempotencyKey,
}

impl Abandoned {
    fn read(scope: &str, key: &str) -> Result<Self, Error> {
        Ok(Self {
            scope: Scope::new(scope)?,
            // Stored keys are in their canonical form under any policy.
            key: IdempotencyKey::parse(key, KeyPolicy::Opaque)?,
        })
    }
}

/// A background [`Completer`], running until it is stopped.
#[derive(Debug)]
pub struct CompleterTask {
    stop: CancellationToken,
    task: JoinHandle<CompleterPass>,
}

impl CompleterTask {
    /// The token that stops this completer.
    pub fn token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Asks the completer to stop and waits for it: the request in progress is finished
    /// (or fails and is released), no new one starts. Returns what it did over its life.
    pub async fn stop(self) -> CompleterPass {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the completer to stop (after its token is cancelled) and returns what it
    /// did over its life.
    pub async fn join(self) -> CompleterPass {
        match self.task.await {
            Ok(pass) => pass,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => CompleterPass::default(),
        }
    }
}

/// An [`Operation`] whose input comes as recorded JSON, for the completer's registry.
pub(super) trait Resume: Send + Sync {
    /// Decodes `input` and runs the operation on `claim`; errors as text, for the log.
    fn resume(&self, claim: PhasedClaim, input: Value) -> BoxFuture<'_, Result<Outcome, String>>;
}

impl<O: Operation> Resume for O {
    fn resume(&self, claim: PhasedClaim, input: Value) -> BoxFuture<'_, Result<Outcome, String>> {
        Box::pin(async move {
            let input: O::Input = match serde_json::from_value(input) {
                Ok(input) => input,
                Err(source) => {
                    let error = Error::PhaseData {
                        what: "input".to_owned(),
                        source,
                    };
                    if let Err(release) = claim.release().await {
                        tracing::warn!(error = %release, "releasing an undecodable request failed");
                    }
                    return Err(error.to_string());
                }
            };
            claim
                .run(self, input)
                .await
                .map_err(|error| error.to_string())
        })
    }
}
