//! How a store behaves: replay window, bounded wait for in-flight duplicates, which
//! responses are kept, which keys are accepted.
//!
//! Nothing here is about HTTP: how errors are spelled for clients is
//! [`Problems`](crate::Problems)' business.

use std::time::Duration;

use crate::key::KeyPolicy;
use crate::response::StorePolicy;

/// Settings of an [`IdempotencyStore`](crate::IdempotencyStore).
///
/// Start from [`Config::default`] and change what you need:
///
/// ```
/// use std::time::Duration;
/// use pg_idempotency::Config;
///
/// let config = Config::default()
///     .with_ttl(Duration::from_secs(48 * 3600))
///     .with_in_flight_wait(Duration::from_millis(500));
/// assert_eq!(config.ttl(), Duration::from_secs(172_800));
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    ttl: Duration,
    in_flight_wait: Duration,
    in_flight_waiters: usize,
    retry_after: Duration,
    commit_resolution_wait: Duration,
    store_policy: StorePolicy,
    key_policy: KeyPolicy,
    lease: Duration,
    pool_checks: bool,
    stored_body_cap: usize,
    connection_wait: Duration,
    scope_share: f64,
    confirming_standbys: u32,
    standby_wait: Duration,
}

impl Default for Config {
    /// 24-hour replay window, 2 s wait for an in-flight duplicate, at most 1024 of them
    /// waiting per key in one process, a 1 s retry hint,
    /// 5 s to resolve an interrupted commit, the default [`StorePolicy`], UUID v4 keys,
    /// 30 s leases for phased requests, claims that check their connection themselves,
    /// response bodies stored up to 1 MiB, at most 2 s of waiting for a connection, half
    /// of the pool for one scope, no standby confirmation before external calls.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            in_flight_wait: Duration::from_secs(2),
            in_flight_waiters: 1024,
            retry_after: Duration::from_secs(1),
            commit_resolution_wait: Duration::from_secs(5),
            store_policy: StorePolicy::default(),
            key_policy: KeyPolicy::default(),
            lease: Duration::from_secs(30),
            pool_checks: false,
            stored_body_cap: Self::DEFAULT_STORED_BODY_CAP,
            connection_wait: Duration::from_secs(2),
            scope_share: 0.5,
            confirming_standbys: 0,
            standby_wait: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// The default [stored body cap](Self::with_stored_body_cap): 1 MiB.
    ///
    /// Why 1 MiB: every replay reads the whole row into memory and writes it out again,
    /// and every byte stored is written twice (heap and WAL) and kept for the replay
    /// window; an answer an API gives to a write is rarely larger than a few kilobytes.
    /// 1 MiB is also the default request body limit of the axum layer and the cap the
    /// IETF draft's peers use, so a client sees the same bound in both directions.
    pub const DEFAULT_STORED_BODY_CAP: usize = 1024 * 1024;

    /// Stores response bodies of at most `bytes` (default
    /// [1 MiB](Self::DEFAULT_STORED_BODY_CAP)). A response with a longer body still
    /// completes its request: its status and headers are stored without the body
    /// ([`StoredResponse::body_omitted`](crate::StoredResponse::body_omitted)), the first
    /// client gets the whole response, and replays say that the body was omitted.
    #[must_use]
    pub fn with_stored_body_cap(mut self, bytes: usize) -> Self {
        self.stored_body_cap = bytes;
        self
    }

    /// Lets a request wait at most `wait` (default 2 s) for a pooled connection to take
    /// its key with; then it gets [`Error::NoConnection`](crate::Error::NoConnection),
    /// which the axum layer answers with a 503 and `Retry-After`. The wait counts from the
    /// request's [start](crate::IdempotentRequest::with_waits_from), which the axum layer
    /// sets before the request waits for its share of the body budget: both waits end
    /// together. A duplicate that looks again at its key after waiting for the request
    /// holding it waits for its connection no longer than its
    /// [in-flight wait](Self::with_in_flight_wait) leaves it.
    ///
    /// The transactional mode holds a connection for as long as its handler runs: slow
    /// handlers exhaust a pool. This wait turns that into fast, clear answers instead of
    /// requests that hang for the pool's own timeout (sqlx's default: 30 s).
    #[must_use]
    pub fn with_connection_wait(mut self, wait: Duration) -> Self {
        self.connection_wait = wait;
        self
    }

    /// Lets the requests of one scope hold at most `share` of the pool's connections at
    /// once (default 0.5: half; rounded up, at least one), so that one tenant's flood of
    /// slow requests leaves connections for the others. A request over its scope's share
    /// waits for a place within the [connection wait](Self::with_connection_wait), like
    /// one for a connection. `1.0` turns shares off: do so for a service with a single
    /// scope, which would otherwise use half its pool. Values outside `0.0..=1.0` are
    /// clamped. The share is the store's: routes with settings of their own share it.
    #[must_use]
    pub fn with_scope_share(mut self, share: f64) -> Self {
        self.scope_share = if share.is_nan() {
            1.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self
    }

    /// How long a stored response is replayed (default 24 hours). After that the key
    /// counts as unused: a new request with it runs fresh and replaces the old row.
    /// Values below one millisecond are raised to one millisecond.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How long a duplicate waits for the request holding its key to finish before it
    /// gets [`Error::InFlight`](crate::Error::InFlight) (default 2 s; zero answers at
    /// once), counted from the request's
    /// [start](crate::IdempotentRequest::with_waits_from), as the connection wait is. A
    /// waiting duplicate holds no pooled connection: it is woken when a claim of
    /// this process holding its key ends; when another process holds it, one duplicate
    /// of this process looks again now and then (10 ms, doubling up to 200 ms), one
    /// short round trip each time, and wakes the others with the row it finds.
    #[must_use]
    pub fn with_in_flight_wait(mut self, wait: Duration) -> Self {
        self.in_flight_wait = wait;
        self
    }

    /// How many duplicates of one key may wait in this process for the request that
    /// holds it (default 1024); the next one gets [`Error::InFlight`](crate::Error::InFlight)
    /// at once. Waiting costs no connection, only a little memory.
    #[must_use]
    pub fn with_in_flight_waiters(mut self, waiters: usize) -> Self {
        self.in_flight_waiters = waiters;
        self
    }

    /// The retry hint given with an in-flight answer (default 1 s; HTTP `Retry-After`).
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// How long [`Claim::complete`](crate::Claim::complete) may spend finding out what
    /// happened when the connection broke around `COMMIT` (default 5 s).
    ///
    /// On another connection it waits, at most this long, for the key's advisory lock:
    /// the lock is free once the old transaction has ended (committed, or rolled back
    /// because its backend saw the connection close), and then the key's row tells. Only
    /// when the old backend still holds the lock after this wait (it cannot be reached
    /// and has not noticed yet) is the outcome
    /// [unknown](crate::CommitOutcome::Unknown). The wait covers taking a connection
    /// from the pool too; one more round trip at most, and never more than a second,
    /// is added to it. Zero gives up at once unless the lock is free.
    #[must_use]
    pub fn with_commit_resolution_wait(mut self, wait: Duration) -> Self {
        self.commit_resolution_wait = wait;
        self
    }

    /// Which response statuses are stored (default: all but 5xx, 408 and 429).
    #[must_use]
    pub fn with_store_policy(mut self, policy: StorePolicy) -> Self {
        self.store_policy = policy;
        self
    }

    /// Which `Idempotency-Key` values are accepted (default: UUID v4 only).
    #[must_use]
    pub fn with_key_policy(mut self, policy: KeyPolicy) -> Self {
        self.key_policy = policy;
        self
    }

    /// How long the holder of a [phased request](crate::phased) keeps it without
    /// recording progress (default 30 s; at least 1 ms). Each recorded step renews it.
    /// Once it has run out, a retry or the [`Completer`](crate::phased::Completer) may
    /// take the request over, and the old holder can record nothing more. Make it longer
    /// than the slowest step, the external call's timeout included.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// Before the first external call ([`Steps::foreign`](crate::phased::Steps::foreign))
    /// of each holder of a phased request, waits until `standbys` streaming standbys have
    /// flushed the primary's write-ahead log up to that moment, for at most `wait`
    /// (default: `0` standbys, no wait). Set it when you fail over to an asynchronous
    /// standby (docs/RELIABILITY.md, "Failover").
    ///
    /// Why: a request's downstream keys come from the nonce its row got when it was
    /// created. A failover to a standby that had not received that row forgets the
    /// nonce; the client's retry creates the row again with another nonce and calls the
    /// other system with another key, which it charges a second time. Once a standby has
    /// the row, a failover to it keeps the nonce, so a retry sends the same keys. With
    /// synchronous replication every `COMMIT` already waits for the standby, and this is
    /// not needed.
    ///
    /// The wait reads `pg_stat_replication` on the primary: the database role needs the
    /// privileges of `pg_read_all_stats` (e.g. `GRANT pg_monitor TO app`), without which
    /// the call fails with [`Error::StandbysHidden`](crate::Error::StandbysHidden). When
    /// fewer than `standbys` confirm within `wait`, no call is made and the step fails
    /// with [`Error::StandbysBehind`](crate::Error::StandbysBehind) (503 with
    /// `Retry-After` over HTTP); the request is released for a retry. Count only
    /// standbys you would fail over to; a failover manager that promotes the most
    /// advanced standby needs `1`.
    #[must_use]
    pub fn with_standby_confirmation(mut self, standbys: u32, wait: Duration) -> Self {
        self.confirming_standbys = standbys;
        self.standby_wait = wait;
        self
    }

    /// Whether a claim takes its connection through the pool's checks (default `false`).
    ///
    /// A claim's first round trip (`BEGIN`, the key's lock, the key's row) tells whether
    /// its connection works before anything has run, so by default a claim takes an
    /// idle connection without sqlx's ping ([`PgPool::try_acquire`]) and, should the
    /// server have closed it meanwhile, closes it and claims again on one that
    /// [`PgPool::acquire`] checked. That saves the ping's round trip on every request
    /// (docs/BENCHMARKS.md, "The pool's ping"). Likewise, when requests wait for a place
    /// in the pool, a request whose transaction ended passes its connection straight to
    /// the next one instead of giving it back to the pool, which would ping it first
    /// (for at most a second at a time; then it goes back to the pool and its checks).
    /// A pool's [`before_acquire`](sqlx::pool::PoolOptions::before_acquire) and
    /// [`after_release`](sqlx::pool::PoolOptions::after_release) hooks do not run for
    /// such a connection: if yours do something a claim needs, set this to `true`.
    ///
    /// [`PgPool::try_acquire`]: sqlx::PgPool::try_acquire
    /// [`PgPool::acquire`]: sqlx::PgPool::acquire
    #[must_use]
    pub fn with_pool_checks(mut self, pool_checks: bool) -> Self {
        self.pool_checks = pool_checks;
        self
    }

    /// The replay window.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The bounded wait for an in-flight duplicate.
    pub fn in_flight_wait(&self) -> Duration {
        self.in_flight_wait
    }

    /// How many duplicates of one key may wait in this process.
    pub fn in_flight_waiters(&self) -> usize {
        self.in_flight_waiters
    }

    /// The retry hint given with an in-flight answer.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The bounded wait for the outcome of an interrupted commit.
    pub fn commit_resolution_wait(&self) -> Duration {
        self.commit_resolution_wait
    }

    /// The store policy.
    pub fn store_policy(&self) -> &StorePolicy {
        &self.store_policy
    }

    /// The key policy.
    pub fn key_policy(&self) -> KeyPolicy {
        self.key_policy
    }

    /// Whether a claim takes its connection through the pool's checks.
    pub fn pool_checks(&self) -> bool {
        self.pool_checks
    }

    /// The lease of a phased request's holder.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The largest response body that is stored.
    pub fn stored_body_cap(&self) -> usize {
        self.stored_body_cap
    }

    /// How long a request waits for a pooled connection.
    pub fn connection_wait(&self) -> Duration {
        self.connection_wait
    }

    /// The share of the pool one scope may hold.
    pub fn scope_share(&self) -> f64 {
        self.scope_share
    }

    /// How many standbys must have a phased request's row before its first external call
    /// (`0`: none, no wait).
    pub fn confirming_standbys(&self) -> u32 {
        self.confirming_standbys
    }

    /// How long a phased request waits for its standbys before an external call.
    pub fn standby_wait(&self) -> Duration {
        self.standby_wait
    }
}
