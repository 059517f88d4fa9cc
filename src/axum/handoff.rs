//! The hand-off of a claim between the layer and the handler.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard, TryLockError};

use crate::problem::Problems;

/// The layer puts the claim (`C`: a [`Claim`](crate::Claim) or a
/// [`PhasedClaim`](crate::phased::PhasedClaim)) into the request's extensions through
/// this; the handler borrows or takes it; after the handler returned, the layer takes
/// back what is left.
pub(crate) struct Handoff<C> {
    claim: Arc<Mutex<Option<C>>>,
    /// How the layer spells problems, for a handler that misuses the claim.
    problems: Arc<Problems>,
}

impl<C> Clone for Handoff<C> {
    fn clone(&self) -> Self {
        Self {
            claim: Arc::clone(&self.claim),
            problems: Arc::clone(&self.problems),
        }
    }
}

impl<C> Handoff<C> {
    pub(crate) fn new(claim: C, problems: Arc<Problems>) -> Self {
        Self {
            claim: Arc::new(Mutex::new(Some(claim))),
            problems,
        }
    }

    /// Takes the claim; `None` once taken, or while a handler still borrows it (it moved
    /// its borrow into a task that is still running).
    pub(crate) fn take(&self) -> Option<C> {
        self.claim
            .try_lock()
            .ok()
            .and_then(|mut claim| claim.take())
    }

    /// Borrows the slot that holds the claim until the guard is dropped; an error while
    /// someone else borrows it.
    pub(crate) fn borrow(&self) -> Result<OwnedMutexGuard<Option<C>>, TryLockError> {
        Arc::clone(&self.claim).try_lock_owned()
    }

    pub(crate) fn problems(&self) -> &Arc<Problems> {
        &self.problems
    }
}
