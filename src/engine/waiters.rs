//! Where duplicates of a held key wait, without holding a pooled connection.
//!
//! A duplicate that finds its key held by another request gives its connection back and
//! waits here before it looks at the key again:
//!
//! - when a claim of this process (of a store sharing this registry) holds the key, the
//!   duplicate sleeps until that claim ends, woken with every other duplicate of the key
//!   at once; a duplicate that arrives while such a claim runs waits for it before it
//!   looks at all. When the claim stored a response, the woken duplicates get its row
//!   without a round trip. At most [`Config::in_flight_waiters`] wait per key; the next
//!   one gets the in-flight answer at once;
//! - when another process holds the key, the duplicate polls: it sleeps, then looks
//!   again in one round trip, with a pause that doubles from [`FIRST_POLL`] to
//!   [`MAX_POLL`].
//!
//! [`Config::in_flight_waiters`]: crate::Config::in_flight_waiters

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::StoredRow;
use crate::key::IdempotencyKey;
use crate::scope::Scope;

/// The first pause of a duplicate whose key another process holds, doubled after each
/// look up to [`MAX_POLL`].
pub(crate) const FIRST_POLL: Duration = Duration::from_millis(10);
/// The longest pause between two looks at a key another process holds.
pub(crate) const MAX_POLL: Duration = Duration::from_millis(200);

/// The keys that claims of this process hold, each with the duplicates waiting for it.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    held: Mutex<HashMap<(Scope, IdempotencyKey), Arc<Held>>>,
}

/// One held key.
#[derive(Debug, Default)]
struct Held {
    /// Cancelled when the claim ends.
    ended: CancellationToken,
    /// Duplicates waiting for it.
    waiting: Mutex<usize>,
    /// The row the claim committed, for the duplicates it wakes.
    answer: OnceLock<StoredRow>,
    /// The holder is a phased request's lease, which another may take over once it runs
    /// out: only a look can tell, so a wait that runs out looks.
    leased: AtomicBool,
}

/// How a wait ended.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The holder ended, or the pause passed: look at the key again.
    LookAgain,
    /// The holder of this process committed this row for the key: it answers, as a look
    /// would (a live row does not change).
    Answered(StoredRow),
    /// Too many duplicates already wait for this key: answer "in flight" now.
    Refused,
    /// The transactional claim of this process still holds the key when the wait ran
    /// out: it is in flight, and a look would only say so after waiting for a connection.
    StillHeld,
}

/// Registration of a key a claim holds; dropping it (when the claim ends, after its
/// commit or rollback) wakes the duplicates waiting for the key.
#[derive(Debug)]
pub(crate) struct Holding {
    waiters: Arc<Waiters>,
    key: (Scope, IdempotencyKey),
    held: Arc<Held>,
}

impl Waiters {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(Scope, IdempotencyKey), Arc<Held>>> {
        // The map stays consistent whatever panicked while it was locked.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `(scope, key)` as held by a claim of this process until the returned
    /// [`Holding`] is dropped.
    pub(crate) fn hold(self: &Arc<Self>, scope: &Scope, key: &IdempotencyKey) -> Holding {
        let name = (scope.clone(), key.clone());
        let held = Arc::new(Held::default());
        // A claim that ended without dropping its holding yet (its rollback is under way)
        // may still be registered: the new holder takes its place and wakes its waiters.
        if let Some(previous) = self.held().insert(name.clone(), Arc::clone(&held)) {
            previous.ended.cancel();
        }
        Holding {
            waiters: Arc::clone(self),
            key: name,
            held,
        }
    }

    /// Waits, without a connection, before looking at `(scope, key)`: until the claim of
    /// this process that holds it ends (at most `left`), or, when none does, for `pause`
    /// (at most `left`; no wait at all without a pause, before the first look).
    /// [`Waited::Refused`] when `limit` duplicates already wait for the key in this
    /// process.
    pub(crate) async fn wait(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        pause: Option<Duration>,
        left: Duration,
        limit: usize,
    ) -> Waited {
        let held = self.held().get(&(scope.clone(), key.clone())).cloned();
        let Some(held) = held else {
            if let Some(pause) = pause {
                tokio::time::sleep(pause.min(left)).await;
            }
            return Waited::LookAgain;
        };
        let Some(_waiting) = Waiting::enter(&held, limit) else {
            return Waited::Refused;
        };
        let ended = tokio::time::timeout(left, held.ended.cancelled())
            .await
            .is_ok();
        match held.answer.get() {
            Some(row) => Waited::Answered(row.clone()),
            None if ended || held.leased.load(Ordering::Relaxed) => Waited::LookAgain,
            None => Waited::StillHeld,
        }
    }
}

/// A duplicate counted among a held key's waiters until it is dropped, however its wait
/// ends: woken, timed out, or its future dropped (the client went away).
struct Waiting<'a>(&'a Held);

impl<'a> Waiting<'a> {
    /// Counts a waiter in, unless `limit` already wait.
    fn enter(held: &'a Held, limit: usize) -> Option<Self> {
        let mut waiting = held.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if *waiting >= limit {
            return None;
        }
        *waiting += 1;
        Some(Self(held))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        *self
            .0
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner) -= 1;
    }
}

impl Holding {
    /// Marks the holder as a lease that may run out and be taken over (a phased request):
    /// duplicates whose wait runs out then look at the key instead of answering "in
    /// flight" at once.
    pub(crate) fn leased(self) -> Self {
        self.held.leased.store(true, Ordering::Relaxed);
        self
    }

    /// The key held.
    pub(crate) fn key(&self) -> &(Scope, IdempotencyKey) {
        &self.key
    }

    /// Hands the row the claim committed to the duplicates waiting for it (made only if
    /// some wait), before they are woken.
    pub(crate) fn answer(&self, row: impl FnOnce() -> StoredRow) {
        if *self
            .held
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            > 0
        {
            let _ = self.held.answer.set(row());
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut held = self.waiters.held();
        if let Entry::Occupied(entry) = held.entry(self.key.clone())
            && Arc::ptr_eq(entry.get(), &self.held)
        {
            entry.remove();
        }
        drop(held);
        self.held.ended.cancel();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;
    use crate::KeyPolicy;

    fn name() -> (Scope, IdempotencyKey) {
        (
            Scope::new("s").unwrap(),
            IdempotencyKey::parse("k", KeyPolicy::Opaque).unwrap(),
        )
    }

    #[tokio::test]
    async fn waiters_wake_when_the_holder_ends_and_are_bounded() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let holding = waiters.hold(&scope, &key);
        let long = Duration::from_secs(3600);
        let wait = || waiters.wait(&scope, &key, None, long, 2);
        let (first, second) = (wait(), wait());
        tokio::pin!(first, second);
        // Both wait (the holder has not ended); a third is refused at once.
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        assert!(matches!(wait().await, Waited::Refused));
        drop(holding);
        assert!(matches!(first.await, Waited::LookAgain));
        assert!(matches!(second.await, Waited::LookAgain));
        assert!(waiters.held().is_empty());
    }

    #[tokio::test]
    async fn a_duplicate_that_gives_up_no_longer_counts() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let _holding = waiters.hold(&scope, &key);
        let long = Duration::from_secs(3600);
        for _ in 0..3 {
            // The only place, taken and given up (the client went away).
            let mut waiting = Box::pin(waiters.wait(&scope, &key, None, long, 1));
            assert!(waiting.as_mut().now_or_never().is_none());
            drop(waiting);
        }
        let mut waiting = Box::pin(waiters.wait(&scope, &key, None, long, 1));
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "refused: a place leaked"
        );
    }

    #[tokio::test]
    async fn a_wait_that_runs_out_while_the_key_is_held_says_so() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let holding = waiters.hold(&scope, &key);
        let wait = || waiters.wait(&scope, &key, None, Duration::from_millis(10), 8);
        let waited = wait().await;
        assert!(matches!(waited, Waited::StillHeld), "{waited:?}");
        // A lease may have run out and be taken over: only a look can tell.
        let _leased = holding.leased();
        let waited = wait().await;
        assert!(matches!(waited, Waited::LookAgain), "{waited:?}");
    }

    #[tokio::test]
    async fn without_a_local_holder_a_duplicate_sleeps_one_pause_after_a_look() {
        let waiters = Waiters::default();
        let (scope, key) = name();
        let started = std::time::Instant::now();
        let second = Duration::from_secs(1);
        let waited = waiters
            .wait(&scope, &key, Some(FIRST_POLL), second, 0)
            .await;
        assert!(matches!(waited, Waited::LookAgain));
        assert!(started.elapsed() >= FIRST_POLL);
        // Before the first look, there is nothing to wait for.
        let waited = waiters.wait(&scope, &key, None, second, 0).now_or_never();
        assert!(matches!(waited, Some(Waited::LookAgain)));
    }

    #[tokio::test]
    async fn woken_waiters_get_the_committed_row_unmade_without_waiters() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let row = StoredRow {
            fingerprint: crate::Fingerprint::from_parts(2, [7; 32]),
            replay: crate::Replay {
                response: crate::StoredResponse::new(201, "paid"),
                first_used_at: chrono::DateTime::UNIX_EPOCH,
                first_request: crate::Provenance::default(),
            },
        };
        // Nobody waits: the row is not even made.
        let alone = waiters.hold(&scope, &key);
        alone.answer(|| unreachable!("no duplicate waits"));
        drop(alone);

        let holding = waiters.hold(&scope, &key);
        let long = Duration::from_secs(3600);
        let first = waiters.wait(&scope, &key, None, long, 8);
        let second = waiters.wait(&scope, &key, None, long, 8);
        tokio::pin!(first, second);
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        let body = row.replay.response.body.as_ptr();
        holding.answer(|| row);
        drop(holding);
        let (Waited::Answered(first), Waited::Answered(second)) = (first.await, second.await)
        else {
            panic!("both waiters expected the row");
        };
        assert_eq!(first.replay.response.body, &b"paid"[..]);
        // One copy of the body, shared by every woken duplicate.
        assert_eq!(first.replay.response.body.as_ptr(), body);
        assert_eq!(second.replay.response.body.as_ptr(), body);
    }

    #[tokio::test]
    async fn a_new_holder_replaces_one_that_has_not_dropped_yet() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let old = waiters.hold(&scope, &key);
        let new = waiters.hold(&scope, &key);
        assert!(old.held.ended.is_cancelled());
        drop(old);
        assert_eq!(waiters.held().len(), 1, "the new holder stays registered");
        drop(new);
        assert!(waiters.held().is_empty());
    }
}
