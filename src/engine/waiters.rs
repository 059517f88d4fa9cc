//! Where duplicates of a held key wait, without holding a pooled connection.
//!
//! A duplicate that finds its key held by another request gives its connection back and
//! waits here before it looks at the key again. Whoever holds the key, this process
//! looks at it at most once at a time:
//!
//! - when a claim of this process (of a store sharing this registry) holds the key, the
//!   duplicate sleeps until that claim ends, woken with every other duplicate of the key
//!   at once; a duplicate that arrives while such a claim runs waits for it before it
//!   looks at all. When the claim stored a response, the woken duplicates get its row
//!   without a round trip;
//! - otherwise one request of this process looks at the key for all of them: a first
//!   look as the request arrives, then, while another process holds the key, again
//!   after a pause that doubles from [`FIRST_POLL`] to [`MAX_POLL`], one round trip each;
//!   it hands the others the row it finds. The others (and a request that arrives
//!   meanwhile) wait for its looks as for a claim of this process; when it stops looking
//!   (its own wait ran out, its client went away, it took the key), the next one takes
//!   over.
//!
//! At most [`Config::in_flight_waiters`] wait per key; the next one gets the in-flight
//! answer at once.
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

/// The keys that claims of this process hold, or that one of its duplicates looks at
/// while another process holds them, each with the duplicates waiting for it.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    held: Mutex<HashMap<(Scope, IdempotencyKey), Arc<Held>>>,
}

/// One held key: held by a claim of this process, or looked at for this process.
#[derive(Debug, Default)]
struct Held {
    /// Cancelled when the claim ends, or the duplicate looking for the others stops.
    ended: CancellationToken,
    /// Duplicates waiting for it.
    waiting: Mutex<usize>,
    /// The row the claim committed, or the look found, for the duplicates it wakes.
    answer: OnceLock<StoredRow>,
    /// The holder is a phased request's lease, which another may take over once it runs
    /// out: only a look can tell, so a wait that runs out looks.
    leased: AtomicBool,
}

/// How a wait ended.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The holder ended, or the pause passed: look at the key again. `waited` says
    /// whether this wait followed a holder of this process (one that ended without a
    /// row, or a lease that may have run out): the look is then a duplicate's, whose
    /// every wait counts against its in-flight wait.
    LookAgain { waited: bool },
    /// The holder of this process committed this row for the key: it answers, as a look
    /// would (a live row does not change).
    Answered(StoredRow),
    /// Too many duplicates already wait for this key: answer "in flight" now.
    Refused,
    /// The transactional claim of this process still holds the key when the wait ran
    /// out, or another process held it at this process's last look: it is in flight,
    /// and a look would only say so after waiting for a connection.
    StillHeld,
}

/// The duplicate of this process that looks at a key another process holds, for itself
/// and for the others waiting: registered until dropped (or until a claim of this
/// process takes the key), waking the others then.
pub(crate) type Looking = Holding;

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
        // A claim that ended without dropping its holding yet (its rollback is under way),
        // or a duplicate looking at the key, may still be registered: the new holder takes
        // its place and wakes its waiters.
        if let Some(previous) = self.held().insert(name.clone(), Arc::clone(&held)) {
            previous.ended.cancel();
        }
        self.holding(name, held)
    }

    /// The registration of the claim or look that `name` waits for in this process; when
    /// there is none and `look` is set, registers `looking` as the duplicate that looks.
    fn follow(
        self: &Arc<Self>,
        name: &(Scope, IdempotencyKey),
        look: bool,
        looking: &mut Option<Looking>,
    ) -> Option<Arc<Held>> {
        match self.held().entry(name.clone()) {
            Entry::Occupied(entry) => Some(Arc::clone(entry.get())),
            Entry::Vacant(entry) => {
                if look {
                    let held = Arc::clone(entry.insert(Arc::default()));
                    *looking = Some(self.holding(name.clone(), held));
                }
                None
            }
        }
    }

    fn holding(self: &Arc<Self>, key: (Scope, IdempotencyKey), held: Arc<Held>) -> Holding {
        Holding {
            waiters: Arc::clone(self),
            key,
            held,
        }
    }

    /// Waits, without a connection, before looking at `(scope, key)`, at most `left`:
    ///
    /// - while a claim of this process holds it, or another request of this process
    ///   looks at it, until that one ends; [`Waited::Refused`] when `limit` duplicates
    ///   already wait for the key in this process;
    /// - when `looking` is this request's own registration, still current, for `pause`;
    /// - else, having registered in `looking` as the request that looks for the others:
    ///   before the first look (no `pause`) not at all, after it for `pause` (not at all
    ///   if a claim or a look it waited for just ended without a row: the key may be
    ///   free).
    ///
    /// [`Waited::StillHeld`] when a look after the first would come after `left`.
    pub(crate) async fn wait(
        self: &Arc<Self>,
        scope: &Scope,
        key: &IdempotencyKey,
        pause: Option<Duration>,
        left: Duration,
        limit: usize,
        looking: &mut Option<Looking>,
    ) -> Waited {
        let name = (scope.clone(), key.clone());
        let deadline = tokio::time::Instant::now() + left;
        let mut woken = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if looking
                .as_ref()
                .is_some_and(|own| own.held.ended.is_cancelled())
            {
                // A claim of this process took the key: wait for it as the others do.
                *looking = None;
            }
            let followed = match looking {
                Some(_) => None,
                None => self.follow(&name, pause.is_none() || !left.is_zero(), looking),
            };
            let Some(held) = followed else {
                if looking.is_none() {
                    return Waited::StillHeld;
                }
                if let Some(pause) = pause
                    && !woken
                {
                    tokio::time::sleep(pause.min(left)).await;
                }
                return Waited::LookAgain { waited: woken };
            };
            let Some(_waiting) = Waiting::enter(&held, limit) else {
                return Waited::Refused;
            };
            let ended = tokio::time::timeout(left, held.ended.cancelled())
                .await
                .is_ok();
            match held.answer.get() {
                Some(row) => return Waited::Answered(row.clone()),
                // The claim or the look ended without a row: wait for the next one, or
                // look.
                None if ended => woken = true,
                None if held.leased.load(Ordering::Relaxed) => {
                    return Waited::LookAgain { waited: true };
                }
                None => return Waited::StillHeld,
            }
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

    const LONG: Duration = Duration::from_secs(3600);

    /// A wait of the key [`name`]s; a registration to look for the others, if it made
    /// one, ends with it.
    async fn wait(waiters: &Arc<Waiters>, pause: Option<Duration>, left: Duration) -> Waited {
        wait_bounded(waiters, pause, left, 8).await
    }

    async fn wait_bounded(
        waiters: &Arc<Waiters>,
        pause: Option<Duration>,
        left: Duration,
        limit: usize,
    ) -> Waited {
        let (scope, key) = name();
        waiters
            .wait(&scope, &key, pause, left, limit, &mut None)
            .await
    }

    /// A request registered as the one that looks at the key [`name`]s, after its pause.
    async fn registered(waiters: &Arc<Waiters>) -> Option<Looking> {
        let (scope, key) = name();
        let mut looking = None;
        let waited = (waiters.wait(&scope, &key, Some(FIRST_POLL), LONG, 8, &mut looking)).await;
        assert!(matches!(waited, Waited::LookAgain { .. }), "{waited:?}");
        assert!(looking.is_some());
        looking
    }

    fn row(body: &'static str) -> StoredRow {
        StoredRow {
            fingerprint: crate::Fingerprint::from_parts(2, [7; 32]),
            replay: crate::Replay {
                response: crate::StoredResponse::new(201, body),
                first_used_at: chrono::DateTime::UNIX_EPOCH,
                first_request: crate::Provenance::default(),
            },
        }
    }

    #[tokio::test]
    async fn waiters_wake_when_the_holder_ends_and_are_bounded() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let holding = waiters.hold(&scope, &key);
        let (first, second) = (
            wait_bounded(&waiters, None, LONG, 2),
            wait_bounded(&waiters, None, LONG, 2),
        );
        tokio::pin!(first, second);
        // Both wait (the holder has not ended); a third is refused at once.
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        let third = wait_bounded(&waiters, None, LONG, 2).await;
        assert!(matches!(third, Waited::Refused), "{third:?}");
        drop(holding);
        // They waited for the holder: what they look for now is a duplicate's look.
        assert!(matches!(first.await, Waited::LookAgain { waited: true }));
        assert!(matches!(second.await, Waited::LookAgain { waited: true }));
        assert!(waiters.held().is_empty());
    }

    #[tokio::test]
    async fn a_duplicate_that_gives_up_no_longer_counts() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let _holding = waiters.hold(&scope, &key);
        for _ in 0..3 {
            // The only place, taken and given up (the client went away).
            let mut waiting = Box::pin(wait_bounded(&waiters, None, LONG, 1));
            assert!(waiting.as_mut().now_or_never().is_none());
            drop(waiting);
        }
        let mut waiting = Box::pin(wait_bounded(&waiters, None, LONG, 1));
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
        let short = Duration::from_millis(10);
        let waited = wait(&waiters, None, short).await;
        assert!(matches!(waited, Waited::StillHeld), "{waited:?}");
        // A lease may have run out and be taken over: only a look can tell.
        let _leased = holding.leased();
        let waited = wait(&waiters, None, short).await;
        assert!(
            matches!(waited, Waited::LookAgain { waited: true }),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn without_a_holder_of_this_process_one_duplicate_looks_after_a_pause() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        // Before the first look, there is nothing to wait for: the request registers as
        // the one that looks, and looks.
        let mut looking = None;
        let waited =
            (waiters.wait(&scope, &key, None, Duration::ZERO, 8, &mut looking)).now_or_never();
        assert!(
            matches!(waited, Some(Waited::LookAgain { waited: false })),
            "{waited:?}"
        );
        assert!(looking.is_some());
        // After it, it sleeps its pause before each look.
        let started = std::time::Instant::now();
        let waited = (waiters.wait(&scope, &key, Some(FIRST_POLL), LONG, 8, &mut looking)).await;
        assert!(matches!(waited, Waited::LookAgain { .. }), "{waited:?}");
        assert!(started.elapsed() >= FIRST_POLL);
        assert!(looking.is_some());
        // Its next wait is a pause again, as long as it stays registered.
        let waited = (waiters.wait(&scope, &key, Some(FIRST_POLL), LONG, 8, &mut looking)).await;
        assert!(matches!(waited, Waited::LookAgain { .. }), "{waited:?}");
        assert!(looking.is_some());
        // A wait with nothing left after the first look says "in flight" without a look.
        let waited = wait(&Arc::default(), Some(FIRST_POLL), Duration::ZERO).now_or_never();
        assert!(matches!(waited, Some(Waited::StillHeld)), "{waited:?}");
    }

    #[tokio::test]
    async fn the_others_wait_for_the_look_and_get_the_row_it_found() {
        let waiters = Arc::new(Waiters::default());
        let looking = registered(&waiters).await;
        // Another duplicate after its first look, and one that has not looked yet.
        let polling = wait(&waiters, Some(FIRST_POLL), LONG);
        let arriving = wait(&waiters, None, LONG);
        tokio::pin!(polling, arriving);
        assert!(polling.as_mut().now_or_never().is_none());
        assert!(arriving.as_mut().now_or_never().is_none());
        let looking = looking.expect("registered");
        looking.answer(|| row("paid"));
        drop(looking);
        for waited in [polling.await, arriving.await] {
            let Waited::Answered(row) = waited else {
                panic!("expected the row: {waited:?}");
            };
            assert_eq!(row.replay.response.body, &b"paid"[..]);
        }
        assert!(waiters.held().is_empty());
    }

    #[tokio::test]
    async fn when_the_look_stops_without_a_row_the_next_duplicate_looks_at_once() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let first = registered(&waiters).await;
        let mut second = None;
        let mut third = None;
        {
            let a = waiters.wait(&scope, &key, Some(LONG), LONG, 8, &mut second);
            let b = waiters.wait(&scope, &key, Some(LONG), LONG, 8, &mut third);
            tokio::pin!(a, b);
            assert!(a.as_mut().now_or_never().is_none());
            assert!(b.as_mut().now_or_never().is_none());
            // The first one's client went away.
            drop(first);
            // The second takes over and looks without its (long) pause: the key may
            // be free; the third waits for its look.
            let waited = a.as_mut().now_or_never();
            assert!(
                matches!(waited, Some(Waited::LookAgain { .. })),
                "{waited:?}"
            );
            assert!(b.as_mut().now_or_never().is_none());
        }
        assert!(second.is_some());
        assert!(third.is_none());
    }

    #[tokio::test]
    async fn a_claim_of_this_process_takes_over_from_a_look() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let mut looking = registered(&waiters).await;
        let other = wait(&waiters, Some(FIRST_POLL), LONG);
        tokio::pin!(other);
        assert!(other.as_mut().now_or_never().is_none());
        // The look found the key free and took it.
        let holding = waiters.hold(&scope, &key);
        // Both the other duplicate and the one that looked now wait for the claim.
        assert!(other.as_mut().now_or_never().is_none());
        {
            let own = waiters.wait(&scope, &key, Some(FIRST_POLL), LONG, 8, &mut looking);
            tokio::pin!(own);
            assert!(own.as_mut().now_or_never().is_none());
        }
        assert!(looking.is_none(), "the look's registration was given up");
        holding.answer(|| row("paid"));
        drop(holding);
        assert!(matches!(other.await, Waited::Answered(_)));
        assert!(waiters.held().is_empty());
    }

    #[tokio::test]
    async fn woken_waiters_get_the_committed_row_unmade_without_waiters() {
        let waiters = Arc::new(Waiters::default());
        let (scope, key) = name();
        let row = row("paid");
        // Nobody waits: the row is not even made.
        let alone = waiters.hold(&scope, &key);
        alone.answer(|| unreachable!("no duplicate waits"));
        drop(alone);

        let holding = waiters.hold(&scope, &key);
        let first = wait(&waiters, None, LONG);
        let second = wait(&waiters, None, LONG);
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
