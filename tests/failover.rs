//! A failover to a streaming standby during a payment storm and a stream of phased
//! charges (issue 22). The primary dies by SIGKILL (every server process at once, as with
//! its machine), the standby is promoted, and the service's address (a relay, as a
//! virtual IP or a pooler's target) moves to it; clients retry until answered, then each
//! sends its request once more, as a client whose reply was lost would. Counted on the
//! new primary: acknowledged payments lost, payments duplicated, and how many charges
//! the processor made for each charge.
//!
//! The standby streams through a relay too, stalled for half a second before the kill:
//! the standby then lacks what the primary did in that window, as a lagging asynchronous
//! standby would. With synchronous replication nothing acknowledged may be lost and
//! nothing duplicated; with asynchronous replication acknowledged writes of the window
//! are lost, but with standby confirmation (`Config::with_standby_confirmation`) the
//! processor still charges once per charge. Without it, it charges twice: the test shows
//! that too, so the checks are seen failing on the design they guard against.
//!
//! Needs the PostgreSQL server binaries and `pg_basebackup` (see
//! `pg_idempotency::testing`; `.ci/run` installs Debian's).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use pg_idempotency::metrics::STANDBY_CONFIRMATIONS;
use pg_idempotency::phased::{Finished, Operation, Steps};
use pg_idempotency::testing::{LocalCluster, LocalClusterOptions};
use pg_idempotency::{
    Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Scope, StoredResponse,
};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

mod support;
use support::{Relay, with_recorder};

/// Concurrent clients paying, and charging.
const PAYERS: usize = 8;
const CHARGERS: usize = 6;
/// How long the replication stalls before the primary dies.
const WINDOW: Duration = Duration::from_millis(500);

/// How the standby is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replication {
    /// `synchronous_standby_names` names it; `synchronous_commit = on` (the default).
    Synchronous,
    /// Asynchronous; with `confirmed`, phased requests wait for the standby before
    /// calling the processor.
    Asynchronous { confirmed: bool },
}

/// A card processor that charges once per downstream key, and refuses a key sent
/// again for another charge, as card processors do.
#[derive(Default)]
struct Processor {
    /// Downstream key → the charge (its request number) it was charged for.
    charged: Mutex<HashMap<Uuid, i64>>,
}

impl Processor {
    fn charge(&self, key: Uuid, charge: i64) -> Result<String> {
        let mut charged = self.charged.lock().expect("not poisoned");
        match *charged.entry(key).or_insert(charge) {
            first if first == charge => Ok(format!("ch_{key}")),
            first => bail!("key {key} was charged for charge {first}, not {charge}"),
        }
    }

    /// How many times each charge was charged (its downstream keys).
    fn charges_per_charge(&self) -> BTreeMap<i64, usize> {
        let mut per_charge = BTreeMap::new();
        for charge in self.charged.lock().expect("not poisoned").values() {
            *per_charge.entry(*charge).or_default() += 1;
        }
        per_charge
    }
}

/// A charge: its row, the processor's charge, the row marked with it.
struct Charge {
    processor: Arc<Processor>,
}

impl Operation for Charge {
    const NAME: &'static str = "failover.charge";
    type Input = i64;
    type Error = anyhow::Error;

    async fn run(&self, n: &i64, steps: &mut Steps) -> Result<Finished> {
        let id: i64 = steps
            .local("record", async |tx| {
                Ok::<_, anyhow::Error>(
                    sqlx::query_scalar("INSERT INTO charges (request_no) VALUES ($1) RETURNING id")
                        .bind(n)
                        .fetch_one(&mut *tx)
                        .await?,
                )
            })
            .await?;
        let charged: String = steps
            .foreign("charge", async |key| self.processor.charge(key, *n))
            .await?;
        steps
            .finish(async |tx| {
                sqlx::query("UPDATE charges SET processor_charge = $1 WHERE id = $2")
                    .bind(&charged)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Ok::<_, anyhow::Error>(StoredResponse::new(201, format!("charge {id} {charged}")))
            })
            .await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Payment,
    Charge,
}

/// A request a client got an answer to.
struct Ack {
    kind: Kind,
    n: i64,
    key: IdempotencyKey,
    response: StoredResponse,
}

/// A primary, its standby streaming through a relay, and the service's address.
struct Rig {
    primary: Arc<LocalCluster>,
    standby: Arc<LocalCluster>,
    replication: Relay,
    service: Relay,
    store: IdempotencyStore,
    charge: Charge,
}

fn shop_url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/shop")
}

async fn pool(url: &str, connections: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(url)?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, pg_idempotency::testing::TestServerError> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// Polls `sql` (one count) on `pool` until it is at least 1, for at most 30 s.
async fn until_counted(pool: &PgPool, sql: &'static str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await? < 1 {
        ensure!(Instant::now() < deadline, "never true: {sql}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

impl Rig {
    async fn start(replication: Replication, config: Config) -> Result<Rig> {
        let primary =
            Arc::new(blocking(|| LocalCluster::start(LocalClusterOptions::default())).await?);
        let admin = pool(&primary.url(), 2).await?;
        sqlx::query("CREATE DATABASE shop").execute(&admin).await?;
        let shop = pool(&shop_url(primary.port()), 2).await?;
        pg_idempotency::migrate(&shop).await?;
        sqlx::raw_sql(
            "CREATE TABLE payments (id bigserial PRIMARY KEY, request_no bigint NOT NULL);
             CREATE TABLE charges (id bigserial PRIMARY KEY, request_no bigint NOT NULL,
                                   processor_charge text)",
        )
        .execute(&shop)
        .await?;
        let relay = Relay::start(primary.port()).await?;
        let standby = {
            let (primary, port) = (Arc::clone(&primary), relay.port());
            Arc::new(blocking(move || primary.start_standby(port)).await?)
        };
        until_counted(
            &admin,
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .await?;
        if replication == Replication::Synchronous {
            sqlx::query("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
                .execute(&admin)
                .await?;
            sqlx::query("SELECT pg_reload_conf()")
                .execute(&admin)
                .await?;
            until_counted(
                &admin,
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .await?;
        }
        let service = Relay::start(primary.port()).await?;
        let clients = (PAYERS + CHARGERS) as u32 + 4;
        let store =
            IdempotencyStore::with_config(pool(&shop_url(service.port()), clients).await?, config);
        Ok(Rig {
            primary,
            standby,
            replication: relay,
            service,
            store,
            charge: Charge {
                processor: Arc::new(Processor::default()),
            },
        })
    }

    /// Sends one request once.
    async fn send(&self, kind: Kind, n: i64, key: &IdempotencyKey) -> Result<StoredResponse> {
        let body = n.to_string();
        match kind {
            Kind::Payment => {
                let request = IdempotentRequest::new("POST", "/payments", body.as_bytes());
                let outcome = self
                    .store
                    .run(&Scope::new("payments")?, key, &request, async |claim| {
                        let id: i64 = sqlx::query_scalar(
                            "INSERT INTO payments (request_no) VALUES ($1) RETURNING id",
                        )
                        .bind(n)
                        .fetch_one(&mut *claim)
                        .await?;
                        Ok::<_, Error>(StoredResponse::new(201, format!("payment {id}")))
                    })
                    .await?;
                Ok(outcome.into_response())
            }
            Kind::Charge => {
                let request = IdempotentRequest::new("POST", "/charges", body.as_bytes());
                let outcome = self
                    .store
                    .run_phased(&Scope::new("charges")?, key, &request, &self.charge, n)
                    .await?;
                Ok(outcome.into_response())
            }
        }
    }

    /// Sends one request with its key until it is answered with a stored response, as a
    /// client retries: after connection errors, a dead server, a lost reply, a key still
    /// held, a request not finished.
    async fn until_answered(
        &self,
        kind: Kind,
        n: i64,
        key: &IdempotencyKey,
    ) -> Result<StoredResponse> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.send(kind, n, key).await {
                Ok(response) if response.status == 201 => return Ok(response),
                Err(error) if matches!(error.downcast_ref(), Some(Error::Conflict { .. })) => {
                    bail!("{kind:?} {n} conflicted with itself: {error}")
                }
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                answer => bail!("{kind:?} {n} never got an answer: {answer:?}"),
            }
        }
    }
}

/// What a failover did.
#[derive(Debug, Default)]
struct Counts {
    acked: [usize; 2],
    /// Acknowledged, then answered otherwise after the failover (the write was lost and
    /// done again).
    lost: [usize; 2],
    /// Requests with more than one business row.
    duplicated: [usize; 2],
    /// Charges the processor charged more than once.
    charged_twice: usize,
    /// The most charges the processor made for one charge.
    most_charges: usize,
}

/// Runs the storm, the failover and the retries; counts on the new primary.
async fn failover(replication: Replication) -> Result<Counts> {
    let confirming = u32::from(replication == Replication::Asynchronous { confirmed: true });
    let config = Config::default()
        .with_lease(Duration::from_secs(1))
        .with_standby_confirmation(confirming, Duration::from_secs(2));
    let rig = Arc::new(Rig::start(replication, config).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicI64::new(0));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for kind in [Kind::Payment; PAYERS]
        .into_iter()
        .chain([Kind::Charge; CHARGERS])
    {
        let (rig, stop, next, acks) = (
            Arc::clone(&rig),
            Arc::clone(&stop),
            Arc::clone(&next),
            Arc::clone(&acks),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let key = IdempotencyKey::from_uuid(Uuid::new_v4())?;
                let response = rig.until_answered(kind, n, &key).await?;
                acks.lock().expect("not poisoned").push(Ack {
                    kind,
                    n,
                    key,
                    response,
                });
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let acked = || acks.lock().expect("not poisoned").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked() < 200 {
        ensure!(
            Instant::now() < deadline,
            "the storm is too slow: {} answers in 30 s",
            acked()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.replication.stall();
    tokio::time::sleep(WINDOW).await;
    let in_window = acked();
    blocking({
        let primary = Arc::clone(&rig.primary);
        move || primary.kill()
    })
    .await?;
    rig.replication.cut();
    blocking({
        let standby = Arc::clone(&rig.standby);
        move || standby.promote()
    })
    .await?;
    rig.service.point_at(rig.standby.port());
    rig.service.cut();
    // The new primary gets a standby of its own, as an operator (or the failover
    // manager) gives it: until then, confirmed phased requests make no external call.
    let _next_standby = blocking({
        let new_primary = Arc::clone(&rig.standby);
        move || new_primary.start_standby(new_primary.port())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await??;
    }
    let acks = std::mem::take(&mut *acks.lock().expect("not poisoned"));
    eprintln!(
        "{replication:?}: {in_window} answers before the kill, {} in all",
        acks.len()
    );

    let mut counts = Counts::default();
    for ack in &acks {
        let again = rig.until_answered(ack.kind, ack.n, &ack.key).await?;
        counts.acked[ack.kind as usize] += 1;
        if again != ack.response {
            counts.lost[ack.kind as usize] += 1;
        }
    }
    let new_primary = pool(&shop_url(rig.standby.port()), 2).await?;
    let (payments, charges): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT request_no FROM payments GROUP BY 1
                                       HAVING count(*) > 1) AS p),
                (SELECT count(*) FROM (SELECT request_no FROM charges GROUP BY 1
                                       HAVING count(*) > 1) AS c)",
    )
    .fetch_one(&new_primary)
    .await?;
    counts.duplicated = [usize::try_from(payments)?, usize::try_from(charges)?];
    let charges = rig.charge.processor.charges_per_charge();
    counts.charged_twice = charges.values().filter(|c| **c > 1).count();
    counts.most_charges = charges.values().copied().max().unwrap_or(0);
    let answered_charges = acks.iter().filter(|a| a.kind == Kind::Charge).count();
    ensure!(
        charges.len() == answered_charges,
        "{} charges answered, the processor charged {}",
        answered_charges,
        charges.len()
    );
    eprintln!("{replication:?}: {counts:?}");
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_replication_loses_nothing_acknowledged_and_charges_once() -> Result<()> {
    let counts = failover(Replication::Synchronous).await?;
    ensure!(counts.lost == [0, 0], "acknowledged and lost: {counts:?}");
    ensure!(counts.duplicated == [0, 0], "duplicated: {counts:?}");
    ensure!(counts.most_charges == 1, "charged twice: {counts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_replication_with_standby_confirmation_charges_once() -> Result<()> {
    let counts = failover(Replication::Asynchronous { confirmed: true }).await?;
    ensure!(
        counts.lost[Kind::Payment as usize] > 0,
        "no write fell in the window: {counts:?}"
    );
    ensure!(counts.duplicated == [0, 0], "duplicated: {counts:?}");
    ensure!(counts.most_charges == 1, "charged twice: {counts:?}");
    Ok(())
}

/// The design before standby confirmation, shown failing: a charge whose row the
/// failover lost is created again with another nonce, so another downstream key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_replication_without_confirmation_charges_twice() -> Result<()> {
    let counts = failover(Replication::Asynchronous { confirmed: false }).await?;
    ensure!(
        counts.lost[Kind::Charge as usize] > 0,
        "no charge fell in the window: {counts:?}"
    );
    ensure!(counts.duplicated == [0, 0], "duplicated: {counts:?}");
    ensure!(
        counts.charged_twice > 0,
        "the lost rows never charged twice: {counts:?}"
    );
    Ok(())
}

/// Standby confirmation makes no call while the standby lags, and says what to do when
/// the role cannot see the standbys.
#[test]
fn standby_confirmation_makes_no_call_without_the_standby() -> Result<()> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    with_recorder(&recorder, standby_confirmation_checks())?;
    let outcomes: BTreeMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == STANDBY_CONFIRMATIONS)
        .filter_map(|(key, _, _, value)| {
            let outcome = key.key().labels().next()?.value().to_owned();
            match value {
                DebugValue::Counter(n) => Some((outcome, n)),
                _ => None,
            }
        })
        .collect();
    // One of each (a retry after the stall may find the standby behind once more).
    ensure!(
        outcomes.keys().eq(["behind", "confirmed", "hidden"]) && outcomes["hidden"] == 1,
        "{STANDBY_CONFIRMATIONS}: {outcomes:?}"
    );
    Ok(())
}

async fn standby_confirmation_checks() -> Result<()> {
    let config = Config::default().with_standby_confirmation(1, Duration::from_millis(300));
    let rig = Rig::start(
        Replication::Asynchronous { confirmed: true },
        config.clone(),
    )
    .await?;
    let key = IdempotencyKey::from_uuid(Uuid::new_v4())?;
    rig.replication.stall();
    let error = rig
        .send(Kind::Charge, 1, &key)
        .await
        .expect_err("the standby lags");
    match error.downcast_ref() {
        Some(Error::StandbysBehind {
            confirmed: 0,
            wanted: 1,
            ..
        }) => {}
        _ => bail!("expected StandbysBehind, got {error:?}"),
    }
    ensure!(
        rig.charge.processor.charges_per_charge().is_empty(),
        "the processor was called"
    );
    rig.replication.resume();
    let response = rig.until_answered(Kind::Charge, 1, &key).await?;
    ensure!(
        rig.charge.processor.charges_per_charge() == BTreeMap::from([(1, 1)]),
        "{response:?}"
    );

    // A role without pg_monitor sees the standby but not its position.
    let primary = pool(&shop_url(rig.primary.port()), 2).await?;
    sqlx::raw_sql(
        "CREATE ROLE app LOGIN;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app",
    )
    .execute(&primary)
    .await?;
    let app_url = format!("postgres://app@127.0.0.1:{}/shop", rig.primary.port());
    let app = IdempotencyStore::with_config(pool(&app_url, 2).await?, config);
    let rig = Rig { store: app, ..rig };
    let key = IdempotencyKey::from_uuid(Uuid::new_v4())?;
    let error = rig
        .send(Kind::Charge, 2, &key)
        .await
        .expect_err("the positions are hidden");
    match error.downcast_ref() {
        Some(error @ Error::StandbysHidden { hidden: 1 }) => {
            ensure!(
                error.to_string().contains("grant the role pg_monitor"),
                "{error}"
            )
        }
        _ => bail!("expected StandbysHidden, got {error:?}"),
    }
    ensure!(
        !rig.charge.processor.charges_per_charge().contains_key(&2),
        "the processor was called"
    );
    Ok(())
}
