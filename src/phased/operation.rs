//! What a phased request runs: an [`Operation`], and its type-erased form for the
//! completer.

use std::future::Future;

use futures_core::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::claim::PhasedClaim;
use super::steps::{Finished, Steps};
use crate::error::Error;
use crate::store::Outcome;

/// The business logic of a phased request, as steps (see the [module docs](super)).
///
/// `run` is called again from the top by every holder of the request (a retry, or the
/// [`Completer`](super::Completer) for a request whose client never came back); steps
/// that are recorded return their recorded outputs without running. Between steps, do
/// nothing that is not determined by the input and the step outputs.
pub trait Operation: Send + Sync + 'static {
    /// The operation's name, recorded with each request it starts, by which the
    /// completer finds it again. Keep it stable across releases.
    const NAME: &'static str;

    /// The request's input, recorded (as JSON) before the first step, so that the
    /// completer can finish the request without its client.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The operation's error. A step that fails hands its error back through `run`; the
    /// request is then released for a retry or the completer.
    type Error: From<Error> + std::fmt::Display + Send + 'static;

    /// Runs the request's steps and ends with [`Steps::finish`].
    fn run(
        &self,
        input: &Self::Input,
        steps: &mut Steps,
    ) -> impl Future<Output = Result<Finished, Self::Error>> + Send;
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
