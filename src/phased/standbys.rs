//! Standby confirmation: before a holder's first external call, the standbys a failover
//! may promote have the request's row, and with it the nonce its downstream keys come
//! from ([`Config::with_standby_confirmation`](crate::Config::with_standby_confirmation)).
//!
//! Every look checks, in one statement, that the row is still the holder's on the server
//! it reads: a failover between two looks may promote a standby that lacks the row, and
//! positions on the new server's timeline say nothing about rows it never had. A server
//! that has the row and standbys that flushed past the first look's position (taken on a
//! server that had the row too, so past its creation) have it: the first position is past
//! the row's creation on every timeline that holds the row.

use std::time::{Duration, Instant};

use super::lease::Lease;
use crate::error::Error;
use crate::metrics;

/// The first pause between two looks at the standbys; it doubles up to [`MAX_PAUSE`].
/// Replication usually lags by milliseconds.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// One look at `pg_stat_replication`.
struct Look {
    /// The position waited for: the primary's WAL insert position at the first look,
    /// past every commit made before it (the request row's creation included).
    target: String,
    /// Whether the request's row still carries the holder's token on this server.
    held: bool,
    /// Standbys that have flushed the WAL up to `target`.
    confirmed: u32,
    /// Standbys whose positions this role may not see.
    hidden: u32,
}

/// Looks at the request's row and the standbys: whether the holder still holds the row,
/// and how many standbys have flushed up to `target` (`None`: up to the primary's WAL
/// insert position now, which the answer carries).
async fn look(lease: &Lease, target: Option<&str>) -> Result<Look, Error> {
    // In a transaction of its own, so that a pooler in transaction mode keeps the
    // statement's two exchanges on one server connection.
    let row = lease.engine().in_transaction(lease.scope(), true, async |conn| {
        Ok(sqlx::query!(
            r#"WITH target AS (SELECT coalesce($4::text::pg_lsn, pg_current_wal_insert_lsn()) AS lsn)
               SELECT t.lsn::text AS "target!",
                      EXISTS (SELECT FROM idempotency_requests
                              WHERE scope = $1 AND key = $2 AND lease_token = $3) AS "held!",
                      count(r.pid) FILTER (WHERE r.flush_lsn >= t.lsn) AS "confirmed!",
                      count(r.pid) FILTER (WHERE r.state IS NULL) AS "hidden!"
               FROM target t LEFT JOIN pg_stat_replication r ON true
               GROUP BY t.lsn"#,
            lease.scope().as_str(),
            lease.key().as_str(),
            lease.token(),
            target,
        )
        .fetch_one(&mut *conn)
        .await?)
    })
    .await?;
    Ok(Look {
        target: row.target,
        held: row.held,
        confirmed: u32::try_from(row.confirmed).unwrap_or(u32::MAX),
        hidden: u32::try_from(row.hidden).unwrap_or(u32::MAX),
    })
}

/// Waits until the configured number of standbys have flushed everything committed so
/// far (so the request's row), polling at most for the configured wait. Returns at once
/// when no standby is asked for.
///
/// # Errors
///
/// [`Error::LeaseLost`] when the row is no longer the holder's (taken over, deleted, or
/// missing on a promoted standby), [`Error::StandbysBehind`] after the wait,
/// [`Error::StandbysHidden`] when the role cannot see the standbys' positions,
/// [`Error::Database`].
pub(super) async fn confirm(lease: &Lease) -> Result<(), Error> {
    let wanted = lease.engine().config().confirming_standbys();
    if wanted == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let confirmed = wait(lease, wanted, started).await;
    let outcome = match &confirmed {
        Ok(()) => Some("confirmed"),
        Err(Error::StandbysBehind { .. }) => Some("behind"),
        Err(Error::StandbysHidden { .. }) => Some("hidden"),
        Err(Error::LeaseLost { .. }) => Some("lease_lost"),
        Err(_) => None, // the database failed: the caller's error, not a confirmation's
    };
    if let Some(outcome) = outcome {
        metrics::count_labeled(metrics::STANDBY_CONFIRMATIONS, "outcome", outcome);
    }
    match &confirmed {
        Ok(()) => tracing::debug!(waited = ?started.elapsed(), "standbys have the request's row"),
        Err(error) => tracing::warn!(%error, "no external call: standby confirmation failed"),
    }
    confirmed
}

/// [`confirm`]'s looks, from `started`, until `wanted` standbys confirm or the wait ends.
async fn wait(lease: &Lease, wanted: u32, started: Instant) -> Result<(), Error> {
    let config = lease.engine().config();
    let deadline = started + config.standby_wait();
    let mut seen = look(lease, None).await?;
    let mut pause = FIRST_PAUSE;
    loop {
        if !seen.held {
            return Err(lease.lost());
        }
        if seen.confirmed >= wanted {
            return Ok(());
        }
        if seen.hidden > 0 {
            return Err(Error::StandbysHidden {
                hidden: seen.hidden,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::StandbysBehind {
                scope: lease.scope().clone(),
                key: lease.key().clone(),
                confirmed: seen.confirmed,
                wanted,
                waited: started.elapsed(),
                retry_after: config.retry_after(),
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
        seen = look(lease, Some(&seen.target)).await?;
    }
}
