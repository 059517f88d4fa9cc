//! What handlers use: the claim's transaction, and the "do not store" marker.

use std::convert::Infallible;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequestParts, Request};
use axum::response::{IntoResponse, IntoResponseParts, Response, ResponseParts};
use http::request::Parts;
use tokio::sync::{OwnedMappedMutexGuard, OwnedMutexGuard};

use super::handoff::Handoff;
use super::request_id::RequestId;
use crate::claim::Claim;
use crate::problem::Problems;

/// The claimed key's open transaction, for a handler behind an
/// [`IdempotencyLayer`](super::IdempotencyLayer): run the business writes through it.
///
/// It dereferences to the [`Claim`], and `&mut *tx` is an sqlx executor:
///
/// ```no_run
/// use axum::http::StatusCode;
/// use pg_idempotency::axum::IdempotentTx;
///
/// async fn create(mut tx: IdempotentTx) -> StatusCode {
///     let account = tx.scope().to_string();
///     match sqlx::query("INSERT INTO orders (account) VALUES ($1)")
///         .bind(account)
///         .execute(&mut *tx)
///         .await
///     {
///         Ok(_) => StatusCode::CREATED,
///         // A 5xx is not stored: the layer rolls back and the key stays free.
///         Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
///     }
/// }
/// ```
///
/// The layer commits the transaction together with the handler's response once the
/// handler has returned, so neither commit nor roll back here (the type does not let
/// you). Use it within the handler: the layer cannot take the claim back while an
/// `IdempotentTx` is still alive elsewhere (moved into a spawned task), and then answers
/// 500 and rolls back when that task drops it.
///
/// On a route whose key is optional, take `Option<IdempotentTx>`: `None` when the
/// request carried no key. Taking `IdempotentTx` where there is no claim (no layer, or
/// an optional key that was not sent), or twice in one handler, is a bug in the
/// application and is answered with a 500 problem.
pub struct IdempotentTx {
    guard: OwnedMappedMutexGuard<Option<Claim>, Claim>,
}

impl IdempotentTx {
    /// `Ok(None)`: no claim on this request; `Err`: the claim is in use (a bug in the
    /// application), answered with a 500 problem spelled by the layer's [`Problems`].
    fn extract(parts: &Parts) -> Result<Option<Self>, Arc<Problems>> {
        let Some(handoff) = parts.extensions.get::<Handoff<Claim>>() else {
            return Ok(None);
        };
        let misuse = |what: &str| {
            tracing::error!(
                "{what}: take IdempotentTx once per handler and keep it within the handler"
            );
            Arc::clone(handoff.problems())
        };
        let guard: OwnedMutexGuard<Option<Claim>> = handoff
            .borrow()
            .map_err(|_| misuse("the claim of this request is already in use"))?;
        let guard = OwnedMutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| misuse("the claim of this request was already completed"))?;
        Ok(Some(Self { guard }))
    }
}

/// The 500 problem for a misused extractor, with the request id when a layer set one.
fn misuse_response(parts: &Parts, problems: &Problems) -> Response {
    let problem = problems.internal_error();
    match RequestId::assigned(&parts.extensions) {
        Some(id) => problem.with_request_id(id.as_str()),
        None => problem,
    }
    .into_response()
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotentTx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match Self::extract(parts) {
            Ok(Some(tx)) => Ok(tx),
            Ok(None) => {
                tracing::error!(
                    "IdempotentTx taken on a request without a claim: put the route behind \
                     IdempotencyLayer, and take Option<IdempotentTx> where the key is optional"
                );
                Err(misuse_response(parts, &Problems::default()))
            }
            Err(problems) => Err(misuse_response(parts, &problems)),
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotentTx {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Self::extract(parts).map_err(|problems| misuse_response(parts, &problems))
    }
}

impl Deref for IdempotentTx {
    type Target = Claim;

    fn deref(&self) -> &Claim {
        &self.guard
    }
}

impl DerefMut for IdempotentTx {
    fn deref_mut(&mut self) -> &mut Claim {
        &mut self.guard
    }
}

impl fmt::Debug for IdempotentTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotentTx").field(&*self.guard).finish()
    }
}

/// "Do not store this response": the layer rolls back the handler's writes, frees the
/// key and sends the response as it is.
///
/// Return it with any response whose request should not consume the key, typically a
/// validation error found before writing anything, so that the client can fix the body
/// and retry with the same key:
///
/// ```no_run
/// use axum::http::StatusCode;
/// use axum::response::{IntoResponse, Response};
/// use pg_idempotency::axum::Rollback;
///
/// async fn create(body: axum::body::Bytes) -> Response {
///     if body.is_empty() {
///         return (StatusCode::BAD_REQUEST, Rollback, "empty body").into_response();
///     }
///     StatusCode::CREATED.into_response()
/// }
/// ```
///
/// Without the marker every response the [`StorePolicy`](crate::StorePolicy) keeps is
/// stored, 4xx included, and replayed to retries. It is a response extension, so a
/// middleware can also set it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollback;

impl IntoResponseParts for Rollback {
    type Error = Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// An extractor wrapper that marks the extractor's rejection with [`Rollback`].
///
/// axum's own extractors answer bad input with a 4xx (`Json` with 400, 415 or 422, for
/// instance); behind the layer such an answer would be stored and would consume the key.
/// Wrapped, the rejection is sent as it is and the key stays free:
///
/// ```no_run
/// use pg_idempotency::axum::RollbackOnReject;
///
/// async fn create(
///     RollbackOnReject(axum::extract::Query(params)): RollbackOnReject<
///         axum::extract::Query<std::collections::HashMap<String, String>>,
///     >,
/// ) -> String {
///     format!("{} parameters", params.len())
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RollbackOnReject<E>(pub E);

impl<S, E> FromRequestParts<S> for RollbackOnReject<E>
where
    E: FromRequestParts<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        E::from_request_parts(parts, state)
            .await
            .map(Self)
            .map_err(|rejection| (Rollback, rejection).into_response())
    }
}

impl<S, E> FromRequest<S> for RollbackOnReject<E>
where
    E: FromRequest<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        E::from_request(request, state)
            .await
            .map(Self)
            .map_err(|rejection| (Rollback, rejection).into_response())
    }
}
