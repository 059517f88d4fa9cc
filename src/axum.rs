//! HTTP integration for [axum] 0.8 (cargo feature `axum`): exactly-once handlers in a few
//! lines.
//!
//! Put an [`IdempotencyLayer`] on the routes that need it, and take an [`IdempotentTx`]
//! in their handlers: it is the claimed key's open transaction, and the business writes
//! go through it with plain sqlx. The layer does the rest: it checks the
//! `Idempotency-Key`, buffers and fingerprints the request, answers replays, conflicts
//! and in-flight duplicates itself, and after the handler returned stores the handler's
//! response **and commits it together with the handler's writes**.
//!
//! ```no_run
//! use axum::body::Bytes;
//! use axum::http::{HeaderName, StatusCode};
//! use axum::response::{IntoResponse, Response};
//! use axum::routing::post;
//! use axum::Router;
//! use pg_idempotency::axum::{IdempotencyLayer, IdempotentTx, RequestId, Rollback, scope_from_header};
//! use pg_idempotency::{IdempotencyStore, Problems};
//!
//! async fn create_order(request_id: RequestId, mut tx: IdempotentTx, body: Bytes) -> Response {
//!     // Validate before writing. `Rollback`: do not store this answer, keep the key free.
//!     let Some(quantity) = std::str::from_utf8(&body).ok().and_then(|s| s.parse::<i32>().ok())
//!     else {
//!         let problem = Problems::default().invalid_request(Some("quantity"), "Send a whole number.")
//!             .with_request_id(request_id.as_str());
//!         return (Rollback, problem).into_response();
//!     };
//!     let account = tx.scope().to_string();
//!     let inserted = sqlx::query("INSERT INTO orders (account, quantity) VALUES ($1, $2)")
//!         .bind(account)
//!         .bind(quantity)
//!         .execute(&mut *tx) // in the claim's transaction
//!         .await;
//!     match inserted {
//!         // Stored with the key and committed with the row, then replayed to retries.
//!         Ok(_) => (StatusCode::CREATED, "created").into_response(),
//!         // 5xx is not stored: the layer rolls back and the client may retry the key.
//!         Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
//!     }
//! }
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
//! pg_idempotency::migrate(&pool).await?;
//! let store = IdempotencyStore::new(pool);
//!
//! // Keys are unique per scope: usually the authenticated account (here a header that a
//! // trusted proxy sets).
//! let scope = scope_from_header(HeaderName::from_static("x-account-id"), None);
//! let idempotency = IdempotencyLayer::new(store, scope);
//!
//! let app = Router::new()
//!     .route("/v1/orders", post(create_order).route_layer(idempotency));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## How the claim gets to the handler and back
//!
//! The layer claims the key ([`IdempotencyStore::begin`](crate::IdempotencyStore::begin))
//! before the handler runs and puts the [`Claim`](crate::Claim) into the request's
//! extensions behind a shared handle. The [`IdempotentTx`] extractor borrows it for the
//! handler's lifetime (it dereferences to the claim; `&mut *tx` is an sqlx executor) and
//! gives it back when the handler returns. The layer then buffers the response, and
//! [completes](crate::Claim::complete) the claim with it: response and business rows are
//! committed together, or both are rolled back. A handler therefore never
//! commits, and cannot forget to.
//!
//! ## The key field
//!
//! The IETF draft (draft-ietf-httpapi-idempotency-key-header) sends the key as a
//! Structured Field String, `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`;
//! many clients send it bare. The layer accepts both as the same key, under either
//! [`KeyPolicy`](crate::KeyPolicy): the quotes are removed and `\"` and `\\` unescaped
//! before the policy judges the key. A quoted key that is malformed (no closing quote,
//! another escape, a byte outside printable ASCII, parameters such as `;a=1`, or anything
//! after it) is refused with a 400 `idempotency_key_invalid` that says which. More than
//! one key (two header lines, or a list in one) is refused too.
//!
//! ## Which responses are stored
//!
//! Every response the [`StorePolicy`](crate::StorePolicy) keeps (by default all but
//! 5xx, 408 and 429), 4xx included: a retry gets the same answer. Not stored, so the
//! handler's writes are rolled back and the key stays free for a retry:
//!
//! - a response the policy does not keep;
//! - a response that carries the [`Rollback`] marker: **this is how a handler says "the
//!   request was invalid, I wrote nothing, do not consume the key"** (return
//!   `(Rollback, problem)`). axum's own extractors reject bad input with a 4xx that does
//!   not carry the marker and would be stored; wrap them in [`RollbackOnReject`], or
//!   parse in the handler as above;
//! - a handler that panics: the layer answers a 500 problem and rolls back;
//! - a response that cannot be stored (a header value that is not UTF-8, a body stream
//!   that fails): 500 problem, rolled back.
//!
//! Requests that fail before the handler runs never consume the key either.
//!
//! ## What the layer answers itself
//!
//! | situation | status | `code` |
//! |---|---|---|
//! | no key on a route that requires one | 400 | `idempotency_key_missing` |
//! | key malformed (key policy, or a malformed quoted key), or sent twice | 400 | `idempotency_key_invalid` |
//! | scope function refused the request | 400 | `idempotency_scope_invalid` (or the application's problem) |
//! | body over the limit (default 1 MiB) | 413 | `payload_too_large` |
//! | body unreadable (client broke off) | 400 | `invalid_request` |
//! | same key, another method, path, query string or body | 409 (422 in the [IETF dialect](#dialects)) | `idempotency_conflict` |
//! | same key still being processed | 409 + `Retry-After` | `idempotency_key_in_use` |
//! | database unreachable or failing | 503 + `Retry-After` | `service_unavailable` |
//! | connection broke around `COMMIT`, verified that nothing was committed | 503 + `Retry-After: 0` | `request_not_committed` |
//! | connection broke around `COMMIT`, outcome unknown after the wait | 503 + `Retry-After` | `service_unavailable` |
//! | handler panicked, other server failures | 500 | `internal_error` |
//!
//! Problems are `application/problem+json` ([`Problem`](crate::Problem)) with exactly
//! the fields `type`, `title`, `status`, `detail`, `code`, `advice_code`, `param` and
//! `request_id`, spelled by the layer's [`Problems`](crate::Problems) (type base
//! [`with_problem_type_base`](IdempotencyLayer::with_problem_type_base), key header
//! [`with_key_header`](IdempotencyLayer::with_key_header); handlers get the same with
//! [`IdempotencyLayer::problems`]). Every response that passes the layer carries the
//! request id in a header (default `X-Request-Id`; see [`RequestId`]); add
//! [`RequestIdLayer`] (tower-http's request-id layers, with [`MakeRequestIds`]) around the
//! whole router to give the other routes one as well.
//!
//! ## Replays
//!
//! A replay has the stored status, headers (in order, duplicates kept) and body bytes,
//! plus `Idempotent-Replayed: true`, the current request's own id header, and
//! `Idempotent-Replay-Of` with the id of the request whose response it replays
//! ([`IDEMPOTENT_REPLAY_OF_HEADER`]; absent for responses stored before provenance was).
//! The first answer is sent from the stored form too, so the two are byte for byte the
//! same apart from those headers (and a body over the cap, which only the first answer
//! has). The header names are the [dialect's](#dialects). Hop-by-hop headers are not stored; a `Date` is added
//! when the handler set none, so a replay carries the date of the original, as an HTTP
//! cache would.
//!
//! The layer stores each response with its request's id and, when the request carries a
//! well-formed W3C `traceparent`, that too ([`Provenance`](crate::Provenance)); a 409
//! `idempotency_conflict` names the first request beside its time, and
//! `pg-idempotency inspect` shows both.
//!
//! ## A lost reply to `COMMIT`
//!
//! When the database connection breaks while the response is being committed, the layer
//! does not guess: the store finds out on another connection (waiting at most
//! [`Config::commit_resolution_wait`](crate::Config::commit_resolution_wait) for the old
//! transaction to end, see [`CommitOutcome`](crate::CommitOutcome)). If the write is
//! stored, the client gets the stored response, as if nothing had happened; if nothing
//! was committed, a 503 `request_not_committed` problem that says so (`Retry-After: 0`: retry at once);
//! only if the old backend still held the key when the wait passed, the 503
//! `service_unavailable` with `Retry-After`.
//!
//! ## Routing
//!
//! The layer guards POST and PATCH requests
//! ([`with_guarded_methods`](IdempotencyLayer::with_guarded_methods) to change that);
//! requests with any other method (GET, HEAD, CORS `OPTIONS` preflights, TRACE) pass
//! straight through, with no key needed and nothing stored or replayed. So it can go on a
//! whole router (`Router::layer`, after the routes), or on the routes that need it
//! (`MethodRouter::route_layer`, `Router::route_layer`, which run after routing and leave
//! 404 and 405 answers alone). Answers no handler produced are never stored either: the
//! router's fallback (404 for a path that matched no route) and a method router's 405
//! (with `Allow`) go out as they are and leave the key free. The fingerprint covers
//! the concrete path and query string (`/v1/orders/1?dry_run=true`), so reusing a key
//! on `/v1/orders/1` and `/v1/orders/2` with the same body is a conflict. The route
//! template from [`MatchedPath`] (`/v1/orders/{id}`; outside routing, the URI path) only
//! serves rows stored under fingerprint version 1, which covered the template instead.
//!
//! A route may make the key [optional](IdempotencyLayer::optional): without one, the
//! request passes through untouched and the handler takes `Option<IdempotentTx>`.
//!
//! The request body is held in memory up to the body limit (1 MiB by default). The
//! handler's response is held up to the stored-body cap (1 MiB by default,
//! [`Config::with_stored_body_cap`](crate::Config::with_stored_body_cap), per route
//! [`with_stored_body_cap`](IdempotencyLayer::with_stored_body_cap)): a longer body still
//! completes the request, and is streamed to the first client while the row keeps only its
//! status and headers; a replay answers those with an empty body and
//! `Idempotent-Replay: omitted`. Stored bodies are shared, not copied, between replays and
//! the duplicates that waited for them.
//!
//! ## Dialects
//!
//! By default the layer speaks the error specification this crate follows (409
//! `idempotency_conflict`, `Idempotent-Replayed`). [`Dialect::ietf`] speaks the IETF
//! draft and the peers that follow it: 422 `fingerprint-mismatch` for a key reused with
//! another payload, `Idempotency-Replayed`, `Idempotency-Replay-Of`,
//! `Idempotency-Replay: omitted`, and kebab-case codes (`missing-key`, `invalid-key`,
//! ...). Give it with [`IdempotencyLayer::with_dialect`]; override single problems with
//! [`Dialect::with_problem`] (a [`ProblemCatalogue`](crate::ProblemCatalogue) entry per
//! [`Situation`](crate::Situation)). `examples/conformance.rs` passes the anyonce
//! conformance suite, 20 of 20, in the IETF dialect.
//!
//! ## Publishing the policy (OpenAPI)
//!
//! The IETF draft says that a server MUST publish its idempotency policy, the expiry
//! included. With the cargo feature `openapi`, `IdempotencyPolicy` writes a layer's
//! policy into an OpenAPI document made with [utoipa] 6 (by hand, with
//! `#[derive(utoipa::OpenApi)]`, or with utoipa-axum's `OpenApiRouter`): for every
//! operation the layer guards, the key header parameter, the replay headers, the table
//! above as `application/problem+json` responses (by the dialect's statuses: 409 or 422
//! for a reused key), `Retry-After`, and the expiry, in words and in the `x-idempotency`
//! extension. It reads the layer's settings rather than repeating them, so the document
//! changes when the layer does; [`Problem`](crate::Problem) implements
//! `utoipa::ToSchema` for handlers' own problem responses.
//!
//! ```no_run
//! # fn demo(idempotency: pg_idempotency::axum::IdempotencyLayer) {
//! use axum::routing::get;
//! use axum::{Json, Router};
//! use pg_idempotency::axum::IdempotencyPolicy;
//! use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
//! use utoipa_axum::routes;
//!
//! /// Creates an order.
//! #[utoipa::path(post, path = "/v1/orders", responses((status = 201, description = "Created.")))]
//! async fn create_order() -> &'static str {
//!     "created"
//! }
//!
//! let (router, mut document) = OpenApiRouter::new()
//!     .routes(routes!(create_order).map(|route| route.route_layer(idempotency.clone())))
//!     .split_for_parts();
//! IdempotencyPolicy::new(&idempotency).apply(&mut document);
//! let app: Router = router.route("/openapi.json", get(move || async move { Json(document) }));
//! # }
//! ```
//!
//! Why utoipa: it is the OpenAPI crate of the axum ecosystem that is kept up (utoipa-axum
//! collects the document from the routes themselves, so they cannot drift apart), and its
//! `Modify` is the hook it offers for exactly this, a change to the
//! whole document after it is built. The crate uses only utoipa's document model and
//! builds it by hand; the derives are the application's.
//!
//! [axum]: https://docs.rs/axum/0.8
//! [utoipa]: https://docs.rs/utoipa/6
//! [`MatchedPath`]: ::axum::extract::MatchedPath

mod budget;
mod dialect;
mod extract;
mod handoff;
mod key_field;
mod layer;
#[cfg(feature = "openapi")]
mod openapi;
mod phased;
mod request_id;
mod response;
mod scope;

pub use budget::BodyBudget;
pub use dialect::{
    Dialect, IDEMPOTENT_REPLAY_HEADER, IDEMPOTENT_REPLAY_OF_HEADER, IDEMPOTENT_REPLAYED_HEADER,
};
pub use extract::{IdempotentTx, Rollback, RollbackOnReject};
pub use layer::{Idempotency, IdempotencyLayer};
#[cfg(feature = "openapi")]
pub use openapi::IdempotencyPolicy;
pub use phased::PhasedRequest;
pub use request_id::{
    MakeRequestIds, REQUEST_ID_HEADER, RequestId, RequestIdLayer, RequestIdService,
};
pub use scope::{ScopeRejection, scope_from_header};
