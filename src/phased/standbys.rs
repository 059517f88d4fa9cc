//! Standby confirmation: before a holder's first external call, the standbys a failover
//! may promote have the request's row, and with it the nonce its downstream keys come
//! from ([`Config::with_standby_confirmation`](crate::Config::with_standby_confirmation)).

use std::time::{Duration, Instant};

use crate::db::in_transaction;
use crate::engine::Engine;
use crate::error::Error;
use crate::key::IdempotencyKey;
use crate::scope::Scope;

/// The first pause between two looks at the standbys; it doubles up to [`MAX_PAUSE`].
/// Replication usually lags by milliseconds.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// One look at `pg_stat_replication`.
struct Look {
    /// The position waited for: the primary's WAL insert position at the first look,
    /// past every commit made before it (the request row's creation included).
    target: String,
    /// Standbys that have flushed the WAL up to `target`.
    confirmed: u32,
    /// Standbys whose positions this role may not see.
    hidden: u32,
}

/// Looks at the standbys: how many have flushed up to `target` (`None`: up to the
/// primary's WAL insert position now, which the answer carries).
async fn look(engine: &Engine, target: Option<&str>) -> Result<Look, Error> {
    // In a transaction of its own, so that a pooler in transaction mode keeps the
    // statement's two exchanges on one server connection.
    let row = in_transaction(engine.pool(), async |conn| {
        Ok(sqlx::query!(
            r#"WITH target AS (SELECT coalesce($1::text::pg_lsn, pg_current_wal_insert_lsn()) AS lsn)
               SELECT t.lsn::text AS "target!",
                      count(r.pid) FILTER (WHERE r.flush_lsn >= t.lsn) AS "confirmed!",
                      count(r.pid) FILTER (WHERE r.state IS NULL) AS "hidden!"
               FROM target t LEFT JOIN pg_stat_replication r ON true
               GROUP BY t.lsn"#,
            target,
        )
        .fetch_one(&mut *conn)
        .await?)
    })
    .await?;
    Ok(Look {
        target: row.target,
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
/// [`Error::StandbysBehind`] after the wait, [`Error::StandbysHidden`] when the role
/// cannot see the standbys' positions, [`Error::Database`].
pub(super) async fn confirm(
    engine: &Engine,
    scope: &Scope,
    key: &IdempotencyKey,
) -> Result<(), Error> {
    let config = engine.config();
    let wanted = config.confirming_standbys();
    if wanted == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let deadline = started + config.standby_wait();
    let mut seen = look(engine, None).await?;
    let mut pause = FIRST_PAUSE;
    while seen.confirmed < wanted {
        if seen.hidden > 0 {
            return Err(Error::StandbysHidden {
                hidden: seen.hidden,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::StandbysBehind {
                scope: scope.clone(),
                key: key.clone(),
                confirmed: seen.confirmed,
                wanted,
                waited: started.elapsed(),
                retry_after: config.retry_after(),
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
        seen = look(engine, Some(&seen.target)).await?;
    }
    Ok(())
}
