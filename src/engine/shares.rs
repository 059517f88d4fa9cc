//! Places in the pool: how many requests may hold a connection at once (the pool's
//! size), and how many of them one scope (a tenant, an account) may hold, so that one
//! scope's flood of slow requests leaves connections for the others.
//!
//! Requests wait for their places here, in queues that a request leaves cleanly when its
//! wait runs out, and only then ask the pool: a request that gave up in the pool's own
//! queue could cancel the pool halfway through checking a connection, which closes it,
//! and under overload the pool would spend its time opening connections again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::scope::Scope;

/// The places of one pool.
#[derive(Debug)]
pub(crate) struct Shares {
    /// One per connection of the pool.
    pool: Arc<Semaphore>,
    /// Connections one scope may hold at once; `None` when a scope may hold them all.
    limit: Option<usize>,
    scopes: Mutex<Scopes>,
}

#[derive(Debug, Default)]
struct Scopes {
    places: HashMap<Scope, Arc<Semaphore>>,
    /// The map is pruned of idle scopes when it grows to this size.
    prune_at: usize,
}

/// A request's place in the pool and among the connections its scope may hold; given
/// back when dropped.
#[derive(Debug)]
pub(crate) struct Place {
    _scope: Option<OwnedSemaphorePermit>,
    _pool: OwnedSemaphorePermit,
}

/// Fewer scopes than this are never pruned.
const PRUNE_AT: usize = 1024;

impl Shares {
    /// Shares of a pool of `pool_size` connections: a scope may hold `share` of them
    /// (rounded up, at least one).
    pub(crate) fn new(pool_size: u32, share: f64) -> Self {
        let pool_size = pool_size as usize;
        // A share is a fraction of a small integer: the cast cannot lose anything that
        // matters, and the result is clamped to 1..=pool_size.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let limit = ((pool_size as f64 * share).ceil() as usize).clamp(1, pool_size.max(1));
        Self {
            pool: Arc::new(Semaphore::new(pool_size.max(1))),
            limit: (limit < pool_size).then_some(limit),
            scopes: Mutex::new(Scopes {
                places: HashMap::new(),
                prune_at: PRUNE_AT,
            }),
        }
    }

    /// How many connections one scope may hold at once (`None`: all of them).
    #[cfg(test)]
    fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// A place for a request of `scope`, waited for until `deadline` (first among its
    /// scope's places, then in the pool); `None` when none came free in time.
    pub(crate) async fn enter(&self, scope: &Scope, deadline: Instant) -> Option<Place> {
        let wait = |places: Arc<Semaphore>| async move {
            match tokio::time::timeout_at(deadline.into(), places.acquire_owned()).await {
                // The semaphores are never closed.
                Ok(Ok(permit)) => Some(permit),
                _ => None,
            }
        };
        let scope = match self.limit {
            Some(limit) => Some(wait(self.places(scope, limit)).await?),
            None => None,
        };
        let pool = wait(Arc::clone(&self.pool)).await?;
        Some(Place {
            _scope: scope,
            _pool: pool,
        })
    }

    /// The semaphore of `scope`'s places, made on first use; idle scopes are forgotten
    /// when the map grows.
    fn places(&self, scope: &Scope, limit: usize) -> Arc<Semaphore> {
        let mut scopes = self.scopes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(places) = scopes.places.get(scope) {
            return Arc::clone(places);
        }
        if scopes.places.len() >= scopes.prune_at {
            // Held only by the map: no request of the scope holds or waits for a place.
            scopes
                .places
                .retain(|_, places| Arc::strong_count(places) > 1);
            scopes.prune_at = (scopes.places.len() * 2).max(PRUNE_AT);
        }
        let places = Arc::new(Semaphore::new(limit));
        scopes.places.insert(scope.clone(), Arc::clone(&places));
        places
    }

    #[cfg(test)]
    fn known_scopes(&self) -> usize {
        self.scopes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .places
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(20)
    }

    #[test]
    fn a_share_is_rounded_up_and_a_whole_pool_is_no_limit() {
        assert_eq!(Shares::new(32, 0.5).limit(), Some(16));
        assert_eq!(Shares::new(5, 0.5).limit(), Some(3));
        assert_eq!(Shares::new(4, 0.01).limit(), Some(1));
        assert_eq!(Shares::new(4, 1.0).limit(), None);
        assert_eq!(Shares::new(1, 0.5).limit(), None);
    }

    #[tokio::test]
    async fn one_scope_holds_its_share_and_leaves_the_rest_to_others() {
        let shares = Shares::new(4, 0.5);
        let (a, b) = (Scope::new("a").unwrap(), Scope::new("b").unwrap());
        let first = shares.enter(&a, soon()).await.unwrap();
        let _second = shares.enter(&a, soon()).await.unwrap();
        assert!(
            shares.enter(&a, soon()).await.is_none(),
            "a third place for a"
        );
        assert!(shares.enter(&b, soon()).await.is_some(), "b is served");
        drop(first);
        assert!(
            shares.enter(&a, soon()).await.is_some(),
            "a's place came back"
        );
    }

    #[tokio::test]
    async fn the_pool_has_as_many_places_as_connections() {
        let shares = Shares::new(2, 1.0);
        let (a, b) = (Scope::new("a").unwrap(), Scope::new("b").unwrap());
        let first = shares.enter(&a, soon()).await.unwrap();
        let _second = shares.enter(&b, soon()).await.unwrap();
        assert!(
            shares.enter(&b, soon()).await.is_none(),
            "a third place in a pool of 2"
        );
        drop(first);
        assert!(shares.enter(&a, soon()).await.is_some());
    }

    #[tokio::test]
    async fn idle_scopes_are_forgotten_as_the_map_grows() {
        let shares = Shares::new(4, 0.5);
        let busy = Scope::new("busy").unwrap();
        let _held = shares.enter(&busy, soon()).await.unwrap();
        for n in 0..PRUNE_AT * 3 {
            let scope = Scope::new(format!("s{n}")).unwrap();
            drop(shares.enter(&scope, soon()).await.unwrap());
        }
        assert!(
            shares.known_scopes() <= PRUNE_AT,
            "{}",
            shares.known_scopes()
        );
        // The busy scope is remembered: its place is still held.
        let _second = shares.enter(&busy, soon()).await.unwrap();
        assert!(shares.enter(&busy, soon()).await.is_none());
    }
}
