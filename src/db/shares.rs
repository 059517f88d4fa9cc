//! Places in the pool: how many requests may hold a connection at once (the pool's
//! size), how many of them one scope (a tenant, an account) may hold, so that one
//! scope's flood of slow requests leaves connections for the others, and how a
//! connection passes from a request that is done with it to the next one waiting.
//!
//! Requests wait for their places here, in queues that a request leaves cleanly when its
//! wait runs out, and only then ask the pool: a request that gave up in the pool's own
//! queue could cancel the pool halfway through checking a connection, which closes it,
//! and under overload the pool would spend its time opening connections again.
//!
//! A connection given back to sqlx's pool is not usable at once: sqlx pings it first, in
//! a task it spawns. Under load that task and the next request's acquire wait in the
//! runtime's queue behind every other task, and the connection idles meanwhile. So a
//! request whose transaction ended cleanly (the server confirmed `COMMIT` or `ROLLBACK`:
//! the connection is idle, outside any transaction) leaves its connection in its place,
//! and when another request waits for a place in the pool, the place passes to it with
//! the connection. With no one waiting, the connection goes back to the pool.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::metrics;
use crate::scope::Scope;

/// How long a connection may pass from place to place before it goes back to the pool,
/// where sqlx checks it and closes it once it has lived past the pool's `max_lifetime`.
const PASSED_AT_MOST: Duration = Duration::from_secs(1);

/// Fewer scopes than this are never pruned.
const PRUNE_AT: usize = 1024;

/// The places of one pool.
#[derive(Debug)]
pub(crate) struct Shares {
    /// One per connection of the pool.
    pool: Arc<Seats>,
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

/// The pool's places: those free, and the requests waiting for one, first come first
/// served.
#[derive(Debug)]
struct Seats {
    queue: Mutex<Queue>,
}

#[derive(Debug)]
struct Queue {
    free: usize,
    /// While a request waits here no place is free. A request that gave up leaves its
    /// closed sender behind, skipped when a place is passed on.
    waiting: VecDeque<oneshot::Sender<Seat>>,
}

/// One of the pool's places; passed on when dropped, with the connection left in it.
#[derive(Debug)]
struct Seat {
    /// `None` once passed on.
    seats: Option<Arc<Seats>>,
    left: Option<Passed>,
}

/// A connection passed on with a place.
#[derive(Debug)]
struct Passed {
    conn: PoolConnection<Postgres>,
    /// When it first left the pool's idle queue for a place.
    since: Instant,
}

/// A request's place in the pool and among the connections its scope may hold; given
/// back when dropped.
#[derive(Debug)]
pub(crate) struct Place {
    _scope: Option<OwnedSemaphorePermit>,
    seat: Seat,
    /// Whether a connection left here may pass to the next request, which takes it
    /// without the pool's checks.
    pass_on: bool,
    /// When the connection this place holds first left the pool's idle queue, if it
    /// came with the place.
    since: Option<Instant>,
}

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
            pool: Arc::new(Seats {
                queue: Mutex::new(Queue {
                    free: pool_size.max(1),
                    waiting: VecDeque::new(),
                }),
            }),
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
    /// scope's places, then in the pool); `None` when none came free in time. With
    /// `pass_on`, a connection left in the place passes on with it (see
    /// [`Place::leave`]); without, it goes back to the pool.
    pub(crate) async fn enter(
        &self,
        scope: &Scope,
        deadline: Instant,
        pass_on: bool,
    ) -> Option<Place> {
        let scope = match self.limit {
            Some(limit) => {
                let places = self.places(scope, limit);
                match tokio::time::timeout_at(deadline.into(), places.acquire_owned()).await {
                    // The semaphores are never closed.
                    Ok(Ok(permit)) => Some(permit),
                    _ => return None,
                }
            }
            None => None,
        };
        let mut seat = self.pool.take(deadline).await?;
        if !pass_on {
            // Back to the pool, which checks it.
            seat.left = None;
        }
        Some(Place {
            _scope: scope,
            since: seat.left.as_ref().map(|passed| passed.since),
            seat,
            pass_on,
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

impl Seats {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place, waited for until `deadline`.
    async fn take(self: &Arc<Self>, deadline: Instant) -> Option<Seat> {
        let passed = {
            let mut queue = self.queue();
            if queue.free > 0 {
                queue.free -= 1;
                return Some(Seat {
                    seats: Some(Arc::clone(self)),
                    left: None,
                });
            }
            // Requests give up in the order they came, so those that did are at the
            // front.
            while queue
                .waiting
                .front()
                .is_some_and(oneshot::Sender::is_closed)
            {
                queue.waiting.pop_front();
            }
            let (pass, passed) = oneshot::channel();
            queue.waiting.push_back(pass);
            passed
        };
        // A place sent just as the wait ran out is dropped with the receiver, which
        // passes it on again.
        match tokio::time::timeout_at(deadline.into(), passed).await {
            Ok(Ok(seat)) => Some(seat),
            _ => None,
        }
    }

    /// Passes a place, with `left` in it, to the first request still waiting; frees it
    /// if none is.
    fn give_back(self: Arc<Self>, mut left: Option<Passed>) {
        let mut queue = self.queue();
        while let Some(waiting) = queue.waiting.pop_front() {
            let passes_connection = left.is_some();
            let seat = Seat {
                seats: Some(Arc::clone(&self)),
                left,
            };
            match waiting.send(seat) {
                Ok(()) => {
                    drop(queue);
                    if passes_connection {
                        metrics::count(metrics::CONNECTIONS_PASSED, 1);
                    }
                    return;
                }
                Err(mut seat) => {
                    // That request gave up: not passed on, so not given back either.
                    seat.seats = None;
                    left = seat.left.take();
                }
            }
        }
        queue.free += 1;
        drop(queue);
        // Back to the pool, after the lock.
        drop(left);
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(seats) = self.seats.take() {
            seats.give_back(self.left.take());
        }
    }
}

impl Place {
    /// The connection the previous holder of this place left in it, if any: idle,
    /// outside any transaction, taken without the pool's checks.
    pub(crate) fn take_connection(&mut self) -> Option<PoolConnection<Postgres>> {
        self.seat.left.take().map(|passed| passed.conn)
    }

    /// Gives the place back with `conn`, which the caller's transaction left idle and
    /// outside any transaction: the next request waiting for a place gets both, or, when
    /// none waits (or passing on is off, or the connection has passed from place to
    /// place for a while), the connection goes back to the pool.
    pub(crate) fn leave(mut self, conn: PoolConnection<Postgres>) {
        let now = Instant::now();
        let since = self.since.unwrap_or(now);
        if self.pass_on && now.duration_since(since) < PASSED_AT_MOST {
            self.seat.left = Some(Passed { conn, since });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A place for `scope`, waited for 20 ms.
    async fn enter(shares: &Shares, scope: &Scope) -> Option<Place> {
        shares
            .enter(scope, Instant::now() + Duration::from_millis(20), true)
            .await
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
        let first = enter(&shares, &a).await.unwrap();
        let _second = enter(&shares, &a).await.unwrap();
        assert!(enter(&shares, &a).await.is_none(), "a third place for a");
        assert!(enter(&shares, &b).await.is_some(), "b is served");
        drop(first);
        assert!(enter(&shares, &a).await.is_some(), "a's place came back");
    }

    #[tokio::test]
    async fn the_pool_has_as_many_places_as_connections() {
        let shares = Shares::new(2, 1.0);
        let (a, b) = (Scope::new("a").unwrap(), Scope::new("b").unwrap());
        let first = enter(&shares, &a).await.unwrap();
        let _second = enter(&shares, &b).await.unwrap();
        assert!(
            enter(&shares, &b).await.is_none(),
            "a third place in a pool of 2"
        );
        drop(first);
        assert!(enter(&shares, &a).await.is_some());
    }

    #[tokio::test]
    async fn a_place_given_up_on_passes_to_the_next_request_and_then_is_free() {
        let shares = Arc::new(Shares::new(1, 1.0));
        let a = Scope::new("a").unwrap();
        let held = enter(&shares, &a).await.unwrap();
        // One request gives up, one waits longer: the place skips the first.
        assert!(enter(&shares, &a).await.is_none());
        let waiting = tokio::spawn({
            let shares = Arc::clone(&shares);
            let a = a.clone();
            async move {
                let later = Instant::now() + Duration::from_secs(10);
                shares.enter(&a, later, true).await.is_some()
            }
        });
        while !shares
            .pool
            .queue()
            .waiting
            .iter()
            .any(|waiting| !waiting.is_closed())
        {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert!(waiting.await.unwrap(), "the waiting request got the place");
        // Given back by that request (dropped in its task): free again.
        assert!(enter(&shares, &a).await.is_some());
    }

    #[tokio::test]
    async fn a_place_passed_to_a_request_cancelled_before_it_looked_comes_back() {
        let shares = Shares::new(1, 1.0);
        let a = Scope::new("a").unwrap();
        let held = enter(&shares, &a).await.unwrap();
        let mut waiting =
            Box::pin(shares.enter(&a, Instant::now() + Duration::from_secs(10), true));
        // Polled once: it waits in the queue.
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        // The place is sent to it, and it is dropped before it takes it.
        drop(held);
        drop(waiting);
        assert!(enter(&shares, &a).await.is_some(), "the place was lost");
    }

    #[tokio::test]
    async fn idle_scopes_are_forgotten_as_the_map_grows() {
        let shares = Shares::new(4, 0.5);
        let busy = Scope::new("busy").unwrap();
        let _held = enter(&shares, &busy).await.unwrap();
        for n in 0..PRUNE_AT * 3 {
            let scope = Scope::new(format!("s{n}")).unwrap();
            drop(enter(&shares, &scope).await.unwrap());
        }
        assert!(
            shares.known_scopes() <= PRUNE_AT,
            "{}",
            shares.known_scopes()
        );
        // The busy scope is remembered: its place is still held.
        let _second = enter(&shares, &busy).await.unwrap();
        assert!(enter(&shares, &busy).await.is_none());
    }
}
