//! A budget for the request bodies the layers buffer at once.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many bytes of request bodies the [`IdempotencyLayer`](super::IdempotencyLayer)s
/// that share it may buffer at once. A guarded request takes its share before its body is
/// read (its declared `Content-Length`, or the body limit when it declares none) and gives
/// it back when it has been answered. A request that finds the budget spent waits for it
/// within the store's [connection wait](crate::Config::with_connection_wait), and is
/// then answered 503 `service_unavailable` with `Retry-After`, its body unread. The wait
/// counts against the same deadline as the request's wait for a connection: both run from
/// its arrival.
///
/// Every layer without a budget of its own shares [`BodyBudget::process`]: 64 MiB, which
/// is 64 bodies at the default 1 MiB limit, or tens of thousands of the few-kilobyte
/// bodies an API's writes usually carry. It bounds the bodies a flood of large requests
/// can make the layers hold, whatever the number of connections; raise it with the memory
/// the service may spend on bodies in flight. What the process keeps besides is the
/// allocator's: glibc's arenas keep freed 1 MiB buffers unless its mmap threshold is
/// fixed (docs/OPERATIONS.md, "Overload: an exhausted pool").
///
/// ```
/// use pg_idempotency::axum::BodyBudget;
///
/// let budget = BodyBudget::new(256 * 1024 * 1024);
/// assert_eq!(budget.bytes(), 256 * 1024 * 1024);
/// # let _ = |layer: pg_idempotency::axum::IdempotencyLayer| layer.with_body_budget(budget.clone());
/// ```
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: u32,
    available: Arc<Semaphore>,
}

impl BodyBudget {
    /// The size of the [process-wide](Self::process) budget: 64 MiB.
    pub const DEFAULT_BYTES: usize = 64 * 1024 * 1024;

    /// A budget of `bytes` (at most 4 GiB - 1: larger values are cut to that).
    pub fn new(bytes: usize) -> Self {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        Self {
            bytes,
            available: Arc::new(Semaphore::new(bytes as usize)),
        }
    }

    /// The budget shared by every layer of the process that was not given one:
    /// [`DEFAULT_BYTES`](Self::DEFAULT_BYTES).
    pub fn process() -> Self {
        static PROCESS: LazyLock<BodyBudget> =
            LazyLock::new(|| BodyBudget::new(BodyBudget::DEFAULT_BYTES));
        PROCESS.clone()
    }

    /// The budget's size.
    pub fn bytes(&self) -> usize {
        self.bytes as usize
    }

    /// How many of its bytes no request holds now.
    pub fn available(&self) -> usize {
        self.available.available_permits()
    }

    /// `bytes` of the budget (all of it, if `bytes` is more), waited for until
    /// `deadline`; `None` when they did not come free in time.
    pub(crate) async fn reserve(
        &self,
        bytes: u64,
        deadline: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.bytes);
        let reserved = Arc::clone(&self.available).acquire_many_owned(bytes);
        match tokio::time::timeout_at(deadline.into(), reserved).await {
            // The semaphore is never closed.
            Ok(Ok(permit)) => Some(permit),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(20)
    }

    #[tokio::test]
    async fn reservations_are_bounded_and_given_back() {
        let budget = BodyBudget::new(100);
        let first = budget.reserve(60, soon()).await.unwrap();
        assert_eq!(budget.available(), 40);
        assert!(
            budget.reserve(60, soon()).await.is_none(),
            "over the budget"
        );
        let small = budget.reserve(40, soon()).await.unwrap();
        drop((first, small));
        assert_eq!(budget.available(), 100);
        // More than the whole budget takes all of it, so it can still be served alone.
        let all = budget.reserve(1_000, soon()).await.unwrap();
        assert_eq!(budget.available(), 0);
        drop(all);
        // Clones share one budget; the process budget is one for every caller.
        let clone = budget.clone();
        let _held = clone.reserve(100, soon()).await.unwrap();
        assert_eq!(budget.available(), 0);
        assert_eq!(BodyBudget::process().bytes(), BodyBudget::DEFAULT_BYTES);
        let _process = BodyBudget::process().reserve(1, soon()).await.unwrap();
        assert!(BodyBudget::process().available() < BodyBudget::DEFAULT_BYTES);
    }
}
