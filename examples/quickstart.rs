//! The quick start: a payment taken once, a retry replayed, a changed retry refused.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Uses `DATABASE_URL` when set; otherwise a throwaway PostgreSQL (testcontainers when
//! Docker answers, else a temporary cluster from the installed PostgreSQL binaries),
//! removed at exit.

use anyhow::Result;
use pg_idempotency::{
    Begin, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Problems, Scope,
    StoredResponse,
};
use sqlx::PgPool;

/// One payment request through the store: what an HTTP handler does.
async fn take_payment(
    store: &IdempotencyStore,
    scope: &Scope,
    key: &IdempotencyKey,
    body: &[u8],
) -> Result<StoredResponse, Error> {
    let request = IdempotentRequest::new("POST", "/v1/payments", body);
    match store.begin(scope, key, &request).await? {
        // Seen before: answer exactly what the first request got, without charging again.
        Begin::Replay(replay) => Ok(replay.response),
        // First time: charge, and store the response in the same transaction.
        Begin::Claimed(mut claim) => {
            let payment: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let amount = payment["amount"].as_i64().unwrap_or(0);
            let (id, created_at): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
                "INSERT INTO payments (account, amount) VALUES ($1, $2) RETURNING id, created_at",
            )
            .bind(scope.as_str())
            .bind(amount)
            .fetch_one(&mut claim)
            .await?;
            let body = serde_json::json!({ "id": id, "amount": amount, "created_at": created_at });
            let response = StoredResponse::new(201, body.to_string())
                .with_header("content-type", "application/json");
            claim.complete(&response).await?; // response row + payment commit together
            Ok(response)
        }
    }
}

async fn payment_rows(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(pool)
        .await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    // DATABASE_URL, else a throwaway server; the crate's migrations are applied either way.
    let database = pg_idempotency::testing::TestDatabase::create().await?;
    let pool = database.pool().clone();
    println!("database: {}", database.name());
    pg_idempotency::migrate(&pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS payments (
            id         bigserial PRIMARY KEY,
            account    text NOT NULL,
            amount     bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .execute(&pool)
    .await?;
    println!("1. created the payments table and applied the idempotency migrations");

    let store = IdempotencyStore::new(pool.clone());
    let scope = Scope::new("acct_42")?;
    let key = IdempotencyKey::from_uuid(uuid::Uuid::new_v4())?;
    let body = br#"{"amount": 1000, "currency": "EUR"}"#;

    let first = take_payment(&store, &scope, &key, body).await?;
    println!(
        "2. payment with Idempotency-Key {key}: {} {}  (payments rows: {})",
        first.status,
        String::from_utf8_lossy(&first.body),
        payment_rows(&pool).await?
    );

    // The client never saw the reply and retries: same key, same body (other whitespace).
    let retry = take_payment(&store, &scope, &key, br#"{"currency":"EUR","amount":1000}"#).await?;
    println!(
        "3. retry with the same key and body: {} {}  (identical: {}, payments rows: {})",
        retry.status,
        String::from_utf8_lossy(&retry.body),
        retry == first,
        payment_rows(&pool).await?
    );

    // A retry whose body changed is refused with the 409 problem.
    match take_payment(
        &store,
        &scope,
        &key,
        br#"{"amount": 2000, "currency": "EUR"}"#,
    )
    .await
    {
        Err(error @ Error::Conflict { .. }) => {
            let problem = Problems::default().for_error(&error).expect("client error");
            println!(
                "4. retry with the same key and another body: {} {}  (payments rows: {})",
                problem.status,
                String::from_utf8_lossy(&problem.to_json()),
                payment_rows(&pool).await?
            );
        }
        other => anyhow::bail!("expected a conflict, got {other:?}"),
    }
    database.close().await?;
    Ok(())
}
