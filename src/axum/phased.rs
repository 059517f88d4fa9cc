//! Phased requests over HTTP: the handler's side.

use std::fmt;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use super::handoff::Handoff;
use super::request_id::RequestId;
use super::response::from_stored;
use crate::key::IdempotencyKey;
use crate::phased::{Operation, PhasedClaim};
use crate::problem::Problems;
use crate::scope::Scope;

/// A phased request held for this handler, behind an
/// [`IdempotencyLayer::phased`](super::IdempotencyLayer::phased): run the route's
/// [`Operation`] with it.
///
/// ```no_run
/// # use pg_idempotency::phased::{Finished, Operation, Steps};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct ChargeInput { amount: i64 }
/// # struct Charge;
/// # impl Operation for Charge {
/// #     const NAME: &'static str = "charge";
/// #     type Input = ChargeInput;
/// #     type Error = pg_idempotency::Error;
/// #     async fn run(&self, _: &ChargeInput, _: &mut Steps) -> Result<Finished, Self::Error> { todo!() }
/// # }
/// use axum::Json;
/// use axum::http::StatusCode;
/// use axum::response::{IntoResponse, Response};
/// use pg_idempotency::axum::PhasedRequest;
///
/// async fn create_charge(request: PhasedRequest, Json(input): Json<ChargeInput>) -> Response {
///     match request.run(&Charge, input).await {
///         Ok(response) => response, // stored: retries replay it
///         // The request is released: a retry resumes after its last recorded step.
///         Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
///     }
/// }
/// ```
///
/// A handler that returns without running it answers for the request as in the
/// transactional mode (stored, unless marked [`Rollback`](super::Rollback) or not kept
/// by the store policy).
pub struct PhasedRequest {
    handoff: Handoff<PhasedClaim>,
    scope: Scope,
    key: IdempotencyKey,
}

impl PhasedRequest {
    /// The scope of the request's key.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The request's key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// Runs `operation` with `input` ([`PhasedClaim::run`]) and answers with its response,
    /// exactly as it is stored (and replayed).
    ///
    /// # Errors
    ///
    /// The operation's errors (see [`PhasedClaim::run`]); the request is released, and a
    /// retry resumes it. Answer them with a 5xx: they are not stored.
    pub async fn run<O: Operation>(
        self,
        operation: &O,
        input: O::Input,
    ) -> Result<Response, O::Error> {
        let Some(claim) = self.handoff.take() else {
            tracing::error!("PhasedRequest::run called twice for one request");
            return Ok(self.handoff.problems().internal_error().into_response());
        };
        let outcome = claim.run(operation, input).await?;
        Ok(
            from_stored(outcome.response(), None).unwrap_or_else(|reason| {
                tracing::error!(%reason, "a phased request's response cannot be sent");
                self.handoff.problems().internal_error().into_response()
            }),
        )
    }
}

impl fmt::Debug for PhasedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhasedRequest")
            .field("scope", &self.scope)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PhasedRequest {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(handoff) = parts.extensions.get::<Handoff<PhasedClaim>>().cloned() else {
            tracing::error!(
                "PhasedRequest taken on a request without a phased claim: put the route \
                 behind IdempotencyLayer::phased"
            );
            let problem = Problems::default().internal_error();
            let problem = match RequestId::assigned(&parts.extensions) {
                Some(id) => problem.with_request_id(id.as_str()),
                None => problem,
            };
            return Err(problem.into_response());
        };
        let claimed = handoff.borrow().ok().and_then(|claim| {
            let claim = claim.as_ref()?;
            Some((claim.scope().clone(), claim.key().clone()))
        });
        let Some((scope, key)) = claimed else {
            tracing::error!("PhasedRequest taken twice for one request");
            return Err(handoff.problems().internal_error().into_response());
        };
        Ok(Self {
            handoff,
            scope,
            key,
        })
    }
}
