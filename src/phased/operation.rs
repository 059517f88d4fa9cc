//! What a phased request runs: an [`Operation`].

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::steps::{Finished, Steps};
use crate::error::Error;

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
