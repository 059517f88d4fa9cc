//! The steps of a phased request: local, foreign and final.

use std::fmt;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::Instrument;
use uuid::Uuid;

use super::lease::{Lease, Taken, boundary, rollback};
use super::standbys;
use crate::db::{TxConn, executor_over_tx};
use crate::error::Error;
use crate::key::IdempotencyKey;
use crate::outcome::{CommitOutcome, Completion};
use crate::response::StoredResponse;
use crate::scope::Scope;

/// The downstream idempotency key of step `step` of the request `(scope, key)` whose row
/// has `nonce`: the same on every attempt of the request (retries, takeovers, the
/// completer), different for every step, and different for another request with the same
/// scope and key (after expiry, after `forget`, after the completer freed it), whose row
/// has another nonce. Spelled as a UUID v4 (so that a service that accepts only UUID v4
/// keys, as this crate does by default, accepts it): 122 bits of SHA-256 over the four.
///
/// A row created before nonces existed has none (`None`): its keys come from the scope,
/// the key and the step, as they did when it started.
fn downstream_key(scope: &Scope, key: &IdempotencyKey, nonce: Option<Uuid>, step: &str) -> Uuid {
    let mut hasher = Sha256::new();
    let nonce = nonce.map(|nonce| nonce.into_bytes());
    match &nonce {
        Some(_) => hasher.update(b"pg-idempotency/downstream/v2\0"),
        None => hasher.update(b"pg-idempotency/downstream\0"),
    }
    let parts = [scope.as_str().as_bytes(), key.as_str().as_bytes()]
        .into_iter()
        .chain(nonce.as_ref().map(<[u8; 16]>::as_slice))
        .chain([step.as_bytes()]);
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The steps of one run of a phased request, handed to [`Operation::run`](super::Operation::run).
///
/// Steps are named; a name must be unique within the operation and stable across
/// releases, since it keys the recorded output (and the downstream key). A step whose
/// output is recorded returns it without running.
pub struct Steps {
    lease: Lease,
    progress: Map<String, Value>,
    /// The request's nonce (see [`downstream_key`]).
    nonce: Option<Uuid>,
    /// The steps this run has passed, to catch a name used twice.
    passed: Vec<String>,
    /// Whether the standbys asked for have confirmed the request's row (see
    /// [`standbys::confirm`]): once per holder, before its first external call.
    standbys_confirmed: bool,
}

/// The final step's transaction, or a local step's: run the step's writes through it
/// (`query.execute(&mut *tx)`); the step commits it together with its output.
pub struct StepTx {
    /// With the request's place among the connections its scope may hold, kept until the
    /// step ends.
    tx: TxConn,
}

executor_over_tx!(StepTx, tx);

impl fmt::Debug for StepTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepTx").finish_non_exhaustive()
    }
}

/// The end of a phased request, made only by [`Steps::finish`]: its response, and
/// whether it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Finished {
    response: StoredResponse,
    stored: bool,
}

impl Finished {
    /// The response.
    pub fn response(&self) -> &StoredResponse {
        &self.response
    }

    /// The response, by value.
    pub fn into_response(self) -> StoredResponse {
        self.response
    }

    /// Whether the response was stored (else the store policy does not keep its status,
    /// and the request is still in progress, released for a retry or the completer).
    pub fn is_stored(&self) -> bool {
        self.stored
    }
}

fn phase_data(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Error {
    let what = what.into();
    move |source| Error::PhaseData { what, source }
}

impl Steps {
    pub(super) fn new(lease: Lease, taken: Taken) -> Self {
        Self {
            lease,
            progress: taken.progress,
            nonce: taken.nonce,
            passed: Vec::new(),
            standbys_confirmed: false,
        }
    }

    /// The scope of the request.
    pub fn scope(&self) -> &Scope {
        self.lease.scope()
    }

    /// The request's key.
    pub fn key(&self) -> &IdempotencyKey {
        self.lease.key()
    }

    /// The downstream idempotency key of step `step` of this request: the same on every
    /// attempt of this request, different for every step, and different for any other
    /// request, also one with the same scope and key after this one expired, was
    /// forgotten or freed. Spelled as a UUID v4.
    pub fn downstream_key(&self, step: &str) -> Uuid {
        downstream_key(self.lease.scope(), self.lease.key(), self.nonce, step)
    }

    /// Passes step `name`: its recorded output, if it has one.
    fn pass<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, Error> {
        if self.passed.iter().any(|passed| passed == name) {
            return Err(Error::PhaseMisuse(format!(
                "step '{name}' appears twice in one operation; give every step its own name"
            )));
        }
        self.passed.push(name.to_owned());
        self.progress
            .get(name)
            .map(|recorded| {
                T::deserialize(recorded).map_err(phase_data(format!("output of step '{name}'")))
            })
            .transpose()
    }

    /// A local step: runs `step` in a transaction of its own and commits its writes
    /// together with its output, which later runs of the request get back without
    /// running it. If the step fails, its writes roll back and the error is returned.
    ///
    /// # Errors
    ///
    /// The step's error; [`Error::NoConnection`] (no place or connection for the request's
    /// scope within the [connection wait](crate::Config::with_connection_wait): nothing
    /// ran); [`Error::LeaseLost`] (its writes rolled back),
    /// [`Error::PhaseData`], [`Error::PhaseMisuse`], [`Error::Database`] (converted).
    /// After a database error around `COMMIT` the step may or may not be recorded; a
    /// retry finds out and either skips or runs it.
    pub async fn local<T, E, F>(&mut self, name: &str, step: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(&mut StepTx) -> Result<T, E>,
    {
        if let Some(recorded) = self.pass(name)? {
            return Ok(recorded);
        }
        let span = tracing::info_span!("idempotency.step", step = name, kind = "local");
        async move {
            // The record extends the lease from the transaction's start (`now()`): count
            // from before `BEGIN`.
            let began = Instant::now();
            let mut tx = StepTx::begin(&self.lease).await?;
            let output = match step(&mut tx).await {
                Ok(output) => output,
                Err(error) => {
                    rollback(tx.tx).await;
                    return Err(error);
                }
            };
            let recorded = match serde_json::to_value(&output) {
                Ok(recorded) => recorded,
                Err(source) => {
                    rollback(tx.tx).await;
                    return Err(phase_data(format!("output of step '{name}'"))(source).into());
                }
            };
            self.lease
                .commit_step(tx.tx, began, (name, &recorded))
                .await?;
            self.progress.insert(name.to_owned(), recorded);
            Ok(output)
        }
        .instrument(span)
        .await
    }

    /// A foreign step: an external call, made outside any transaction with this step's
    /// [downstream key](Self::downstream_key), which the other system must use to dedupe
    /// repeated calls. Its output is recorded as soon as it returns; later runs of the
    /// request get it back without calling again.
    ///
    /// A crash after the call and before the record makes the next holder call again,
    /// with the same downstream key: the other system answers the first call's result.
    ///
    /// # Errors
    ///
    /// The call's error (nothing recorded: the next run calls again);
    /// [`Error::LeaseLost`] and [`Error::NoConnection`] (before the call: no call is
    /// made), [`Error::StandbysBehind`] and [`Error::StandbysHidden`] (no call is made; see
    /// [`Config::with_standby_confirmation`](crate::Config::with_standby_confirmation)),
    /// [`Error::PhaseData`],
    /// [`Error::PhaseMisuse`], [`Error::Database`] (converted).
    pub async fn foreign<T, E, F>(&mut self, name: &str, call: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(Uuid) -> Result<T, E>,
    {
        if let Some(recorded) = self.pass(name)? {
            return Ok(recorded);
        }
        let downstream = self.downstream_key(name);
        let span = tracing::info_span!(
            "idempotency.step",
            step = name,
            kind = "foreign",
            downstream_key = %downstream
        );
        async move {
            // A failover must not forget the nonce behind the downstream key once the
            // other system has seen that key.
            if !self.standbys_confirmed {
                standbys::confirm(&self.lease).await?;
                self.standbys_confirmed = true;
            }
            // A holder that lost its lease makes no call: renew it first, unless the last
            // renewal left more than half of it (then no takeover can have happened).
            if !self.lease.fresh() {
                self.lease.renew(None).await?;
            }
            boundary(name, "before_call");
            let output = call(downstream).await?;
            boundary(name, "after_call");
            let recorded = serde_json::to_value(&output)
                .map_err(phase_data(format!("output of step '{name}'")))?;
            self.lease.renew(Some((name, &recorded))).await?;
            self.progress.insert(name.to_owned(), recorded);
            Ok(output)
        }
        .instrument(span)
        .await
    }

    /// The final step: runs `step` in a transaction of its own and stores the response it
    /// returns with the key, committing both together; retries then replay it.
    ///
    /// A response the [`StorePolicy`](crate::StorePolicy) does not keep rolls back this
    /// step's writes (the earlier steps stay recorded) and releases the request, so that
    /// a retry or the completer resumes it.
    ///
    /// # Errors
    ///
    /// The step's error (its writes rolled back); [`Error::NoConnection`] (nothing ran);
    /// [`Error::InvalidStatus`],
    /// [`Error::LeaseLost`], [`Error::Database`] (converted). After a database error
    /// around `COMMIT` the response may or may not be stored; a retry replays it or runs
    /// the final step again.
    pub async fn finish<E, F>(&mut self, step: F) -> Result<Finished, E>
    where
        E: From<Error>,
        F: AsyncFnOnce(&mut StepTx) -> Result<StoredResponse, E>,
    {
        let span = tracing::info_span!(
            "idempotency.step",
            step = "finish",
            kind = "final",
            status = tracing::field::Empty
        );
        async move {
            let mut tx = StepTx::begin(&self.lease).await?;
            let response = match step(&mut tx).await {
                Ok(response) => response,
                Err(error) => {
                    rollback(tx.tx).await;
                    return Err(error);
                }
            };
            tracing::Span::current().record("status", response.status);
            match self.lease.store_final(tx.tx, &response).await {
                Ok(completion) => Ok(Finished {
                    stored: completion == Completion::Stored,
                    response,
                }),
                // The reply to COMMIT was lost, and the response is stored: this one, or
                // an identical request's that ran after this one rolled back.
                Err(Error::CommitInterrupted {
                    outcome: CommitOutcome::Stored(replay),
                    ..
                }) => Ok(Finished {
                    response: replay.response,
                    stored: true,
                }),
                Err(error) => Err(error.into()),
            }
        }
        .instrument(span)
        .await
    }

    /// After the operation failed: ends the lease now, so that a retry or the completer
    /// can resume the request at once (see [`Lease::release_after_error`]).
    pub(super) async fn release_after_error(&self) {
        self.lease.release_after_error().await;
    }
}

impl StepTx {
    /// A transaction of its own for a step of the request `lease` holds.
    async fn begin(lease: &Lease) -> Result<Self, Error> {
        Ok(Self {
            tx: lease.engine().begin_placed(lease.scope()).await?,
        })
    }
}

impl fmt::Debug for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steps")
            .field("scope", self.lease.scope())
            .field("key", self.lease.key())
            .field("recorded", &self.progress.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPolicy;

    #[test]
    fn downstream_keys_are_stable_uuid_v4_and_separate_their_parts() {
        let scope = Scope::new("acct_1").unwrap();
        let key =
            IdempotencyKey::parse("6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60", KeyPolicy::default())
                .unwrap();
        let nonce = Some(Uuid::new_v4());
        let a = downstream_key(&scope, &key, nonce, "charge");
        assert_eq!(a, downstream_key(&scope, &key, nonce, "charge"));
        assert_eq!(a.get_version_num(), 4);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert!(IdempotencyKey::parse(&a.to_string(), KeyPolicy::default()).is_ok());
        assert_ne!(a, downstream_key(&scope, &key, nonce, "refund"));
        let other_scope = Scope::new("acct_2").unwrap();
        assert_ne!(a, downstream_key(&other_scope, &key, nonce, "charge"));
        // Another request with the same scope and key has another nonce.
        assert_ne!(
            a,
            downstream_key(&scope, &key, Some(Uuid::new_v4()), "charge")
        );
        assert_ne!(a, downstream_key(&scope, &key, None, "charge"));
        // Lengths are part of the hash: moving bytes between parts changes the key.
        let (ab, c) = (
            Scope::new("ab").unwrap(),
            IdempotencyKey::parse("c", KeyPolicy::Opaque).unwrap(),
        );
        let (a_, bc) = (
            Scope::new("a").unwrap(),
            IdempotencyKey::parse("bc", KeyPolicy::Opaque).unwrap(),
        );
        assert_ne!(
            downstream_key(&ab, &c, nonce, "s"),
            downstream_key(&a_, &bc, nonce, "s")
        );
    }

    #[test]
    fn rows_without_a_nonce_keep_the_keys_they_started_with() {
        let scope = Scope::new("acct_1").unwrap();
        let key =
            IdempotencyKey::parse("6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60", KeyPolicy::default())
                .unwrap();
        // The key that releases before nonces derived for this request and step.
        assert_eq!(
            downstream_key(&scope, &key, None, "call_processor").to_string(),
            "5be3d28c-e814-4077-b038-6f753aaef162"
        );
    }
}
