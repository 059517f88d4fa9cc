//! Phased requests against a real PostgreSQL: steps, resumption, leases and fencing,
//! concurrent duplicates, the completer, cancellation, expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use pg_idempotency::phased::{Completer, CompleterOptions, Finished, Operation, Steps};
use pg_idempotency::{
    Begin, Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Outcome, Scope,
    StoredResponse,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

mod support;
use support::{assert_no_idle_transactions, cancel_after};

/// A card processor in memory: dedupes by the downstream key, counts every call.
#[derive(Default)]
struct Processor {
    calls: AtomicUsize,
    charges: Mutex<HashMap<Uuid, String>>,
    /// Calls that fail before charging, from the first on.
    failures_left: AtomicUsize,
}

impl Processor {
    fn charge(&self, key: Uuid) -> Result<String, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::PhaseMisuse("the processor is down (test)".into()));
        }
        let mut charges = self.charges.lock().unwrap();
        let next = charges.len();
        Ok(charges
            .entry(key)
            .or_insert_with(|| format!("ch_{next}"))
            .clone())
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn distinct_keys(&self) -> usize {
        self.charges.lock().unwrap().len()
    }
}

/// The charge operation: record the charge, call the processor, record its answer and
/// answer 201; `final_status` lets a test make the final answer one that is not kept.
struct Charge {
    processor: Arc<Processor>,
    final_status: Mutex<u16>,
    /// How long the foreign call takes.
    call_delay: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct ChargeInput {
    amount: i64,
}

impl Charge {
    fn new(processor: Arc<Processor>) -> Self {
        Self {
            processor,
            final_status: Mutex::new(201),
            call_delay: Duration::ZERO,
        }
    }
}

impl Operation for Charge {
    const NAME: &'static str = "charge";
    type Input = ChargeInput;
    type Error = Error;

    async fn run(&self, input: &ChargeInput, steps: &mut Steps) -> Result<Finished, Error> {
        let account = steps.scope().to_string();
        let id: i64 = steps
            .local("record_charge", async |tx| {
                Ok::<_, Error>(
                    sqlx::query_scalar(
                        "INSERT INTO charges (account, amount) VALUES ($1, $2) RETURNING id",
                    )
                    .bind(&account)
                    .bind(input.amount)
                    .fetch_one(&mut *tx)
                    .await?,
                )
            })
            .await?;
        let processor_id: String = steps
            .foreign("call_processor", async |key| {
                tokio::time::sleep(self.call_delay).await;
                self.processor.charge(key)
            })
            .await?;
        let status = *self.final_status.lock().unwrap();
        steps
            .finish(async |tx| {
                sqlx::query("UPDATE charges SET processor_id = $1 WHERE id = $2")
                    .bind(&processor_id)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Ok::<_, Error>(
                    StoredResponse::new(
                        status,
                        format!(r#"{{"id":{id},"processor_id":"{processor_id}"}}"#),
                    )
                    .with_header("content-type", "application/json"),
                )
            })
            .await
    }
}

async fn setup() -> Result<PgPool> {
    let pool = pg_idempotency::testing::fresh_pool().await?;
    sqlx::raw_sql(
        "CREATE TABLE charges (
            id bigserial PRIMARY KEY,
            account text NOT NULL,
            amount bigint NOT NULL,
            processor_id text
        )",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(Uuid::new_v4()).expect("v4")
}

fn scope() -> Scope {
    Scope::new("acct_1").expect("valid scope")
}

fn request(body: &[u8]) -> IdempotentRequest<'_> {
    IdempotentRequest::new("POST", "/v1/charges", body)
}

const BODY: &[u8] = br#"{"amount":1000}"#;
const INPUT: ChargeInput = ChargeInput { amount: 1000 };

async fn charges(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(pool)
        .await?)
}

/// The charges' processor ids, all set.
async fn processor_ids(pool: &PgPool) -> Result<Vec<String>> {
    let ids: Vec<Option<String>> =
        sqlx::query_scalar("SELECT processor_id FROM charges ORDER BY id")
            .fetch_all(pool)
            .await?;
    ids.into_iter()
        .map(|id| id.context("a charge without the processor's answer"))
        .collect()
}

async fn requests_in_progress(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM idempotency_requests")
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn runs_once_replays_and_refuses_another_body() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let processor = Arc::new(Processor::default());
    let charge = Charge::new(Arc::clone(&processor));
    let (scope, key) = (scope(), new_key());

    let first = store
        .run_phased(&scope, &key, &request(BODY), &charge, INPUT)
        .await?;
    let Outcome::Executed {
        response,
        stored: true,
    } = &first
    else {
        bail!("not executed and stored: {first:?}")
    };
    ensure!(response.status == 201);
    ensure!(
        requests_in_progress(&pool).await? == 0,
        "the request row stays"
    );

    let again = store
        .run_phased(&scope, &key, &request(BODY), &charge, INPUT)
        .await?;
    ensure!(again.is_replay() && again.response() == response);
    ensure!(processor.calls() == 1 && charges(&pool).await? == 1);
    ensure!(processor.charges.lock().unwrap().len() == 1);

    let other = store
        .run_phased(&scope, &key, &request(br#"{"amount":2}"#), &charge, INPUT)
        .await;
    ensure!(matches!(other, Err(Error::Conflict { .. })), "{other:?}");
    // A transactional request with the same key sees the phased response too.
    let transactional = store.begin(&scope, &key, &request(BODY)).await?;
    ensure!(matches!(transactional, pg_idempotency::Begin::Replay(_)));
    Ok(())
}

#[tokio::test]
async fn a_retry_resumes_after_the_last_recorded_step() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let processor = Arc::new(Processor::default());
    processor.failures_left.store(1, Ordering::SeqCst);
    let charge = Charge::new(Arc::clone(&processor));
    let (scope, key) = (scope(), new_key());

    // The processor fails: the charge stays recorded, the request is released.
    let failed = store
        .run_phased(&scope, &key, &request(BODY), &charge, INPUT)
        .await;
    ensure!(failed.is_err(), "{failed:?}");
    ensure!(charges(&pool).await? == 1 && requests_in_progress(&pool).await? == 1);

    // The retry resumes at the foreign step: no second charge row.
    let Begin::Claimed(claim) = store.begin_phased(&scope, &key, &request(BODY)).await? else {
        bail!("the released request was not taken at once")
    };
    ensure!(claim.attempt() == 2 && claim.recovery_point() == Some("record_charge"));
    let outcome = claim.run(&charge, INPUT).await?;
    ensure!(matches!(outcome, Outcome::Executed { stored: true, .. }));
    ensure!(charges(&pool).await? == 1, "the local step ran twice");
    ensure!(processor.calls() == 2 && processor.distinct_keys() == 1);
    ensure!(processor_ids(&pool).await? == ["ch_0"]);
    assert_no_idle_transactions(&pool).await
}

#[tokio::test]
async fn a_holder_whose_lease_was_taken_over_records_nothing() -> Result<()> {
    let pool = setup().await?;
    let config = Config::default()
        .with_lease(Duration::from_millis(200))
        .with_in_flight_wait(Duration::ZERO);
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let processor = Arc::new(Processor::default());
    let mut slow = Charge::new(Arc::clone(&processor));
    // The old holder's external call outlives its lease.
    slow.call_delay = Duration::from_millis(600);
    let fast = Charge::new(Arc::clone(&processor));
    let (scope, key) = (scope(), new_key());

    let Begin::Claimed(old) = store.begin_phased(&scope, &key, &request(BODY)).await? else {
        bail!("fresh key")
    };
    let old = tokio::spawn(async move { old.run(&slow, INPUT).await });
    // While the lease runs, a duplicate is in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = store.begin_phased(&scope, &key, &request(BODY)).await;
    ensure!(matches!(early, Err(Error::InFlight { .. })), "{early:?}");
    // Another body conflicts at once, held or not.
    let other = store.begin_phased(&scope, &key, &request(b"{}")).await;
    ensure!(matches!(other, Err(Error::Conflict { .. })), "{other:?}");

    // After it, a retry takes over and finishes; the old holder then cannot record. The
    // lease runs from the old holder's last record (its local step), which a loaded machine
    // can delay until the lease outlasts the sleep below: until the old call returns, a
    // retry that finds the request still held tries again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = loop {
        match store.begin_phased(&scope, &key, &request(BODY)).await {
            Ok(Begin::Claimed(new)) => break new,
            Err(Error::InFlight { .. }) if processor.calls() == 0 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => bail!("the lease did not run out before the old call returned: {other:?}"),
        }
    };
    ensure!(new.attempt() == 2);
    let finished = new.run(&fast, INPUT).await?;
    ensure!(matches!(finished, Outcome::Executed { stored: true, .. }));
    let old = old.await?;
    ensure!(matches!(old, Err(Error::LeaseLost { .. })), "{old:?}");

    ensure!(charges(&pool).await? == 1);
    ensure!(
        processor.distinct_keys() == 1,
        "one downstream key per charge"
    );
    let replay = store
        .run_phased(&scope, &key, &request(BODY), &fast, INPUT)
        .await?;
    ensure!(replay.is_replay() && replay.response() == finished.response());
    assert_no_idle_transactions(&pool).await
}

#[tokio::test]
async fn sixty_four_concurrent_duplicates_run_once() -> Result<()> {
    let pool = setup().await?;
    let config = Config::default().with_in_flight_wait(Duration::from_secs(5));
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let processor = Arc::new(Processor::default());
    let mut charge = Charge::new(Arc::clone(&processor));
    charge.call_delay = Duration::from_millis(300);
    let charge = Arc::new(charge);
    let (scope, key) = (scope(), new_key());

    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (store, charge, scope, key) = (
                store.clone(),
                Arc::clone(&charge),
                scope.clone(),
                key.clone(),
            );
            tokio::spawn(async move {
                store
                    .run_phased(&scope, &key, &request(BODY), &*charge, INPUT)
                    .await
            })
        })
        .collect();
    let (mut executed, mut replayed, mut in_flight) = (0, 0, 0);
    let mut responses = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(Outcome::Replayed(replay)) => {
                replayed += 1;
                responses.push(replay.response);
            }
            Ok(outcome) => {
                executed += 1;
                responses.push(outcome.into_response());
            }
            Err(Error::InFlight { .. }) => in_flight += 1,
            Err(error) => bail!("{error}"),
        }
    }
    ensure!(
        executed == 1,
        "{executed} executed, {replayed} replayed, {in_flight} in flight"
    );
    ensure!(responses.windows(2).all(|pair| pair[0] == pair[1]));
    ensure!(charges(&pool).await? == 1 && processor.calls() == 1);
    assert_no_idle_transactions(&pool).await
}

/// A store whose leases last 100 ms, the processor and the charge operation.
async fn with_short_leases() -> Result<(PgPool, IdempotencyStore, Arc<Processor>, Arc<Charge>)> {
    let pool = setup().await?;
    let config = Config::default().with_lease(Duration::from_millis(100));
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let processor = Arc::new(Processor::default());
    let charge = Arc::new(Charge::new(Arc::clone(&processor)));
    Ok((pool, store, processor, charge))
}

/// A request abandoned after its first step: its holder vanished (its future dropped)
/// during the external call. Returns its key.
async fn abandon_during_the_call(
    store: &IdempotencyStore,
    processor: &Arc<Processor>,
) -> Result<IdempotencyKey> {
    let key = new_key();
    let Begin::Claimed(claim) = store.begin_phased(&scope(), &key, &request(BODY)).await? else {
        bail!("fresh key")
    };
    let mut slow = Charge::new(Arc::clone(processor));
    slow.call_delay = Duration::from_secs(60);
    let vanished = tokio::time::timeout(Duration::from_millis(300), claim.run(&slow, INPUT)).await;
    ensure!(vanished.is_err(), "the holder should have been cut off");
    Ok(key)
}

#[tokio::test]
async fn the_completer_finishes_abandoned_requests_and_frees_unstarted_ones() -> Result<()> {
    let (pool, store, processor, charge) = with_short_leases().await?;
    let scope = scope();

    // Abandoned after its first step: the holder vanished (its future dropped) during the
    // external call.
    let abandoned = abandon_during_the_call(&store, &processor).await?;
    ensure!(processor.calls() == 0 && charges(&pool).await? == 1);

    // Taken, never started: nothing was done, so the completer frees the key.
    let unstarted = new_key();
    let Begin::Claimed(idle) = store
        .begin_phased(&scope, &unstarted, &request(BODY))
        .await?
    else {
        bail!("fresh key")
    };
    drop(idle);

    tokio::time::sleep(Duration::from_millis(150)).await;
    let completer = Completer::new(store.clone()).register(Arc::clone(&charge));
    let pass = completer.complete_abandoned().await?;
    ensure!(
        pass.completed == 1 && pass.forgotten == 1 && pass.failed == 0,
        "{pass:?}"
    );
    ensure!(requests_in_progress(&pool).await? == 0);
    ensure!(charges(&pool).await? == 1 && processor_ids(&pool).await? == ["ch_0"]);

    // The client's retry replays the completer's response; the freed key runs fresh.
    let replay = store
        .run_phased(&scope, &abandoned, &request(BODY), &*charge, INPUT)
        .await?;
    ensure!(replay.is_replay() && replay.response().status == 201);
    let fresh = store
        .run_phased(&scope, &unstarted, &request(BODY), &*charge, INPUT)
        .await?;
    ensure!(!fresh.is_replay());

    // The background completer stops cleanly.
    let task = Completer::new(store.clone())
        .register(charge)
        .with_options(CompleterOptions::default().with_interval(Duration::from_millis(10)))
        .spawn();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let total = tokio::time::timeout(Duration::from_secs(5), task.stop()).await?;
    ensure!(total.completed == 0, "{total:?}");
    assert_no_idle_transactions(&pool).await
}

#[tokio::test]
async fn the_completer_is_not_blocked_by_operations_it_does_not_know() -> Result<()> {
    let (pool, store, processor, charge) = with_short_leases().await?;
    let scope = scope();

    // More abandoned requests of an operation this node does not know than a pass takes,
    // all abandoned long before the one it knows.
    sqlx::query(
        "INSERT INTO idempotency_requests
           (scope, key, fingerprint_version, fingerprint, operation, input, lease_token,
            leased_until, created_at, expires_at)
         SELECT 'acct_elsewhere', 'k' || i, 2, sha256(i::text::bytea), 'elsewhere.op', '{}',
                i, now() - interval '1 hour', now() - interval '1 hour',
                now() + interval '1 day'
         FROM generate_series(1, 40) AS i",
    )
    .execute(&pool)
    .await?;
    let abandoned = abandon_during_the_call(&store, &processor).await?;
    tokio::time::sleep(Duration::from_millis(150)).await;

    let stats = pg_idempotency::admin::stats(&pool).await?;
    ensure!(
        stats.phased_abandoned_by_operation
            == [
                (Some("elsewhere.op".to_owned()), 40),
                (Some("charge".to_owned()), 1)
            ],
        "{stats:?}"
    );
    let completer = Completer::new(store.clone()).register(Arc::clone(&charge));
    let pass = completer.complete_abandoned().await?;
    ensure!(pass.completed == 1 && pass.failed == 0, "{pass:?}");
    let stats = pg_idempotency::admin::stats(&pool).await?;
    ensure!(
        stats.phased_abandoned_by_operation == [(Some("elsewhere.op".to_owned()), 40)],
        "{stats:?}"
    );
    let replay = store
        .run_phased(&scope, &abandoned, &request(BODY), &*charge, INPUT)
        .await?;
    ensure!(replay.is_replay() && replay.response().status == 201);
    Ok(())
}

#[tokio::test]
async fn a_final_status_that_is_not_kept_leaves_the_request_to_resume() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let processor = Arc::new(Processor::default());
    let charge = Charge::new(Arc::clone(&processor));
    *charge.final_status.lock().unwrap() = 503;
    let (scope, key) = (scope(), new_key());

    let first = store
        .run_phased(&scope, &key, &request(BODY), &charge, INPUT)
        .await?;
    ensure!(
        matches!(first, Outcome::Executed { stored: false, .. }),
        "{first:?}"
    );
    ensure!(requests_in_progress(&pool).await? == 1);
    ensure!(
        processor_ids(&pool).await.is_err(),
        "the final step's write rolled back"
    );

    *charge.final_status.lock().unwrap() = 201;
    let second = store
        .run_phased(&scope, &key, &request(BODY), &charge, INPUT)
        .await?;
    ensure!(matches!(second, Outcome::Executed { stored: true, .. }));
    ensure!(charges(&pool).await? == 1 && processor.calls() == 1);
    Ok(())
}

#[tokio::test]
async fn cancelled_at_every_await_point_nothing_is_duplicated_or_stuck() -> Result<()> {
    let pool = setup().await?;
    let config = Config::default().with_lease(Duration::from_millis(50));
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let processor = Arc::new(Processor::default());
    let charge = Charge::new(Arc::clone(&processor));
    let scope = scope();
    let (mut keys, mut cancelled, mut finished_in_a_row) = (0, 0, 0);
    // How many await points a run has depends on timing (a reply that is already there
    // costs no `Pending`, more often on a loaded machine), so a run may finish before the
    // sweep has reached its last point: the sweep ends only after five runs in a row
    // finished.
    for polls in 1.. {
        let key = new_key();
        keys += 1;
        let body = request(BODY);
        let run = store.run_phased(&scope, &key, &body, &charge, INPUT);
        let finished = cancel_after(run, polls).await;
        assert_no_idle_transactions(&pool).await?;
        if let Some(outcome) = finished {
            ensure!(outcome?.response().status == 201);
            finished_in_a_row += 1;
            if finished_in_a_row == 5 {
                break;
            }
            continue;
        }
        finished_in_a_row = 0;
        cancelled += 1;
        // The retry (after the lease) finishes the request exactly once.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let outcome = store
            .run_phased(&scope, &key, &request(BODY), &charge, INPUT)
            .await?;
        ensure!(outcome.response().status == 201, "{outcome:?}");
    }
    ensure!(cancelled > 5, "only {cancelled} await points");
    ensure!(
        charges(&pool).await? == i64::try_from(keys)?,
        "charges: one per key"
    );
    ensure!(processor.distinct_keys() == keys);
    ensure!(processor_ids(&pool).await?.len() == keys);
    ensure!(requests_in_progress(&pool).await? == 0);
    Ok(())
}

#[tokio::test]
async fn abandoned_requests_expire_and_are_swept() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let charge = Charge::new(Arc::new(Processor::default()));
    let (scope, key) = (scope(), new_key());
    let Begin::Claimed(claim) = store.begin_phased(&scope, &key, &request(BODY)).await? else {
        bail!("fresh key")
    };
    drop(claim);
    sqlx::query(
        "UPDATE idempotency_requests SET leased_until = now() - interval '1 day',
         created_at = now() - interval '2 days', expires_at = now() - interval '1 day'",
    )
    .execute(&pool)
    .await?;
    // Past its replay window the key counts as unused, even with another body.
    let other = store
        .run_phased(
            &scope,
            &key,
            &request(br#"{"amount":7}"#),
            &charge,
            ChargeInput { amount: 7 },
        )
        .await?;
    ensure!(!other.is_replay());

    let stale = new_key();
    let Begin::Claimed(claim) = store.begin_phased(&scope, &stale, &request(BODY)).await? else {
        bail!("fresh key")
    };
    drop(claim);
    sqlx::query("UPDATE idempotency_requests SET expires_at = now() - interval '1 s'")
        .execute(&pool)
        .await?;
    let swept = pg_idempotency::delete_expired(&pool, 1000).await?;
    ensure!(swept == 1, "{swept}");
    ensure!(requests_in_progress(&pool).await? == 0);
    Ok(())
}

/// An operation whose local step holds its transaction until told to go on.
#[derive(Default)]
struct HeldStep {
    entered: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

impl Operation for HeldStep {
    const NAME: &'static str = "phased.held_step";
    type Input = ();
    type Error = Error;

    async fn run(&self, _input: &(), steps: &mut Steps) -> Result<Finished, Error> {
        steps
            .local("held", async |_tx| {
                self.entered.notify_one();
                self.go.notified().await;
                Ok::<_, Error>(())
            })
            .await?;
        steps
            .finish(async |_tx| Ok::<_, Error>(StoredResponse::new(201, "done")))
            .await
    }
}

/// Issue 24: a phased step's transaction takes its scope's place among the pool's
/// connections, as a claim does. With a scope's one place held by a step, another
/// request of that scope gets `NoConnection` at the end of the connection wait, and
/// another scope's request is served meanwhile.
#[tokio::test]
async fn phased_steps_hold_their_scopes_places() -> Result<()> {
    let pool = setup().await?;
    let config = Config::default()
        .with_scope_share(0.01) // one place per scope
        .with_connection_wait(Duration::from_millis(200));
    let store = IdempotencyStore::with_config(pool, config);
    let step = Arc::new(HeldStep::default());
    let running = {
        let (store, step) = (store.clone(), Arc::clone(&step));
        tokio::spawn(async move {
            store
                .run_phased(&scope(), &new_key(), &request(b""), &*step, ())
                .await
        })
    };
    step.entered.notified().await;
    match store.begin(&scope(), &new_key(), &request(b"x")).await {
        Err(Error::NoConnection { .. }) => {}
        Err(error) => bail!("expected NoConnection, got {error}"),
        Ok(_) => bail!("a claim got the place that the held step has"),
    }
    let Begin::Claimed(other) = store
        .begin(&Scope::new("acct_2")?, &new_key(), &request(b"x"))
        .await?
    else {
        bail!("another scope's fresh key")
    };
    other.complete(&StoredResponse::new(201, "")).await?;
    step.go.notify_one();
    let outcome = running.await??;
    ensure!(outcome.response().status == 201, "{outcome:?}");
    let Begin::Claimed(again) = store.begin(&scope(), &new_key(), &request(b"x")).await? else {
        bail!("the scope's place is free again")
    };
    drop(again);
    Ok(())
}

/// Issue 24: a duplicate answers within its in-flight wait whatever the load. One whose
/// wait for a lease of this process ran out looks at the key (the lease may have run out),
/// but waits for a connection no longer than its in-flight wait left it, not a whole
/// connection wait afresh, and then answers "in flight".
#[tokio::test]
async fn a_duplicate_looks_within_its_in_flight_wait() -> Result<()> {
    let pool = setup().await?;
    let config = Config::default()
        .with_scope_share(0.01) // one place per scope, which the held step takes
        .with_in_flight_wait(Duration::from_millis(100))
        // Three times as long as this test waits for the duplicate's answer.
        .with_connection_wait(Duration::from_secs(60));
    let store = IdempotencyStore::with_config(pool, config);
    let step = Arc::new(HeldStep::default());
    let key = new_key();
    let running = {
        let (store, step, key) = (store.clone(), Arc::clone(&step), key.clone());
        tokio::spawn(async move {
            store
                .run_phased(&scope(), &key, &request(b""), &*step, ())
                .await
        })
    };
    step.entered.notified().await;
    let duplicate = tokio::time::timeout(
        Duration::from_secs(20),
        store.begin(&scope(), &key, &request(b"")),
    )
    .await
    .context("the duplicate waited for a connection after its in-flight wait")?;
    match duplicate {
        Err(Error::InFlight { .. }) => {}
        Err(error) => bail!("expected InFlight, got {error}"),
        Ok(_) => bail!("the duplicate took the key of a running request"),
    }
    step.go.notify_one();
    let outcome = running.await??;
    ensure!(outcome.response().status == 201, "{outcome:?}");
    Ok(())
}
