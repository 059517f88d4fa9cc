//! The layer: pre-checks, claim, run the handler, store its response and commit.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_core::future::BoxFuture;
use futures_util::FutureExt;
use http::header::ALLOW;
use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::OwnedSemaphorePermit;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use super::budget::BodyBudget;
use super::dialect::Dialect;
use super::extract::Rollback;
use super::handoff::Handoff;
use super::key_field::parse_key_field;
use super::request_id::{REQUEST_ID_HEADER, RequestId};
use super::response::{ReadBody, ReplayOf, from_stored, read_up_to, to_stored};
use super::scope::{ScopeRejection, title_case};
use crate::claim::Claim;
use crate::error::Error;
use crate::fingerprint::IdempotentRequest;
use crate::key::{IdempotencyKey, KeyPolicy};
use crate::outcome::{Begin, CommitOutcome, Completion};
use crate::phased::PhasedClaim;
use crate::problem::{Problem, Problems};
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::store::IdempotencyStore;

type ScopeFn = dyn Fn(&Parts) -> Result<Scope, ScopeRejection> + Send + Sync;

/// Exactly-once handling for the routes it wraps: a [tower layer](tower_layer::Layer)
/// over an [`IdempotencyStore`].
///
/// For each request it
/// 1. assigns a [`RequestId`](super::RequestId) (kept if an outer layer already did), and
///    passes a request whose method it does not guard straight to the handler;
/// 2. answers 413 `payload_too_large` if the body declares more than the
///    [body limit](Self::with_body_limit);
/// 3. reads the key header (default `Idempotency-Key`), a quoted Structured Field
///    String or the bare key ([the key field](super#the-key-field)): absent → 400
///    `idempotency_key_missing`, or, on a route where the key is
///    [optional](Self::optional), a plain pass-through to the handler with no claim;
///    sent twice, malformed, or not valid under the store's
///    [`KeyPolicy`](crate::KeyPolicy) → 400 `idempotency_key_invalid`;
/// 4. asks the application's scope function for the [`Scope`] (its rejection → 400
///    `idempotency_scope_invalid` or the application's own problem);
/// 5. buffers the body up to the limit (over it → 413, unreadable → 400
///    `invalid_request`);
/// 6. fingerprints method + concrete path and query string + body (no header takes part:
///    [`IdempotentRequest`](crate::IdempotentRequest)), and
///    calls [`IdempotencyStore::begin`]: a replay is answered with the stored status,
///    headers and body plus `Idempotent-Replayed: true`; a conflict or a key still in
///    flight with a 409 problem (the latter with `Retry-After`);
/// 7. on a claim, runs the handler with the claim in reach of the
///    [`IdempotentTx`](super::IdempotentTx) extractor, buffers its response, and stores
///    it and commits ([`Claim::complete`]). A response the
///    [`StorePolicy`](crate::StorePolicy) does not keep (5xx, 408, 429 by default) or one
///    marked [`Rollback`] rolls the handler's writes back and frees the key, and goes out
///    as it is. A handler that panics is answered with a 500 problem, and its writes are
///    rolled back.
///
/// Steps 2 to 6 never run the handler and never consume the key. Every response carries
/// the request id header (default `X-Request-Id`), and every problem the layer writes
/// has the same id in `request_id`. Database failures are answered with a 503 problem
/// (`Retry-After` included); other server-side failures with a 500 problem. When the
/// connection breaks around the `COMMIT` of step 7, the answer waits for the store to
/// find out what happened ([`CommitOutcome`](crate::CommitOutcome)): the stored response,
/// a 503 `request_not_committed` when nothing was committed, or the 503 with
/// `Retry-After` when that stays unknown.
///
/// [`with_ttl`](Self::with_ttl), [`with_key_policy`](Self::with_key_policy) and
/// [`with_in_flight_wait`](Self::with_in_flight_wait) give one route settings of its
/// own over the same store and pool.
///
/// Only POST and PATCH requests are guarded by default
/// ([`with_guarded_methods`](Self::with_guarded_methods)); the others pass straight
/// through. Put it on a whole router (`Router::layer`, after the routes), or per route with
/// `route_layer` (which runs after routing):
/// `.route("/v1/payments", post(create).route_layer(layer))`. The router's own answers
/// (its fallback's 404, a 405) are never stored.
#[derive(Clone)]
pub struct IdempotencyLayer {
    settings: Arc<Settings>,
}

#[derive(Clone)]
struct Settings {
    store: IdempotencyStore,
    scope: Arc<ScopeFn>,
    key_header: HeaderName,
    /// How problems are spelled: type base, the key header as named there, and the
    /// dialect's catalogue.
    problems: Arc<Problems>,
    /// The problem catalogue and the names of the replay headers.
    dialect: Dialect,
    key_required: bool,
    /// The methods whose requests are guarded; others pass straight through.
    guarded: Vec<Method>,
    /// Claims are phased requests ([`IdempotencyLayer::phased`]).
    phased: bool,
    body_limit: usize,
    /// Shared with the other layers that buffer bodies under it.
    body_budget: BodyBudget,
    request_id_header: HeaderName,
}

impl IdempotencyLayer {
    /// The default request body limit: 1 MiB.
    pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

    /// A layer over `store` that takes each request's scope from `scope` (see
    /// [`scope_from_header`](super::scope_from_header) for a ready-made one). The key is
    /// required, read from `Idempotency-Key`; bodies are limited to 1 MiB; request ids
    /// go in `X-Request-Id`.
    ///
    /// `scope` returns the tenant, account or principal that keys are unique within,
    /// usually from what an authentication layer put into the request's extensions; its
    /// error is anything that converts into [`ScopeRejection`]: a
    /// [`ScopeError`](crate::ScopeError) or a [`Problem`].
    pub fn new<F, E>(store: IdempotencyStore, scope: F) -> Self
    where
        F: Fn(&Parts) -> Result<Scope, E> + Send + Sync + 'static,
        E: Into<ScopeRejection>,
    {
        let key_header = HeaderName::from_static("idempotency-key");
        Self {
            settings: Arc::new(Settings {
                store,
                scope: Arc::new(move |parts: &Parts| scope(parts).map_err(Into::into)),
                problems: Arc::new(Problems::default()),
                dialect: Dialect::seed(),
                key_header,
                key_required: true,
                guarded: vec![Method::POST, Method::PATCH],
                phased: false,
                body_limit: Self::DEFAULT_BODY_LIMIT,
                body_budget: BodyBudget::process(),
                request_id_header: REQUEST_ID_HEADER,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// Makes the key optional: a request without it goes to the handler as it is, with
    /// no claim, no body buffering and no limit (take `Option<IdempotentTx>` there).
    #[must_use]
    pub fn optional(self) -> Self {
        self.with(|s| s.key_required = false)
    }

    /// Makes the key required (the default): a request without it gets a 400
    /// `idempotency_key_missing` problem.
    #[must_use]
    pub fn required(self) -> Self {
        self.with(|s| s.key_required = true)
    }

    /// Guards requests with these methods instead of POST and PATCH (the default, the
    /// methods the IETF draft names as not idempotent by themselves). Requests with other
    /// methods pass straight through: no key needed, no claim, nothing stored or replayed,
    /// so that the layer can sit on a whole router beside GET, HEAD, OPTIONS (CORS
    /// preflights) and TRACE. Opt PUT or DELETE in where a retry of them must not run
    /// twice:
    ///
    /// ```no_run
    /// # fn demo(layer: pg_idempotency::axum::IdempotencyLayer) {
    /// use axum::http::Method;
    ///
    /// let layer = layer.with_guarded_methods([Method::POST, Method::PUT, Method::PATCH]);
    /// # }
    /// ```
    #[must_use]
    pub fn with_guarded_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|s| s.guarded = methods)
    }

    /// Makes the routes it wraps [phased requests](crate::phased): instead of a claim's
    /// transaction, the handler gets a [`PhasedRequest`](super::PhasedRequest) and runs
    /// an [`Operation`](crate::phased::Operation) with it, whose final step stores the
    /// response. A handler that answers without running the operation (a validation
    /// error, say) is treated as in the transactional mode: its response is stored unless
    /// the store policy or a [`Rollback`](super::Rollback) marker says otherwise, in
    /// which case the request is released.
    ///
    /// Duplicates that arrive while the request runs wait without holding a connection
    /// (see [`IdempotencyStore::begin_phased`]).
    #[must_use]
    pub fn phased(self) -> Self {
        self.with(|s| s.phased = true)
    }

    /// Reads the key from `header` instead of `Idempotency-Key`; problems name it in
    /// title case (`x-idempotency-key` → `X-Idempotency-Key`).
    #[must_use]
    pub fn with_key_header(self, header: HeaderName) -> Self {
        self.with(|s| {
            let problems = (*s.problems).clone().with_key_header(title_case(&header));
            s.problems = Arc::new(problems);
            s.key_header = header;
        })
    }

    /// Builds problem `type` URIs on `base` instead of `/problems/`, e.g.
    /// `https://api.example.com/errors/` gives
    /// `https://api.example.com/errors/idempotency-conflict`.
    #[must_use]
    pub fn with_problem_type_base(self, base: impl Into<String>) -> Self {
        self.with(|s| {
            let problems = Problems::new(base)
                .with_key_header(s.problems.key_header())
                .with_catalogue(s.dialect.catalogue().clone());
            s.problems = Arc::new(problems);
        })
    }

    /// Speaks `dialect` instead of the default error specification
    /// ([`Dialect::seed`]): its problem statuses and codes, and its replay headers. For
    /// the IETF draft and its peers (422 for a key reused with another payload,
    /// `Idempotency-Replayed`): `.with_dialect(Dialect::ietf())`.
    #[must_use]
    pub fn with_dialect(self, dialect: Dialect) -> Self {
        self.with(|s| {
            let problems = (*s.problems)
                .clone()
                .with_catalogue(dialect.catalogue().clone());
            s.problems = Arc::new(problems);
            s.dialect = dialect;
        })
    }

    /// The dialect this layer speaks.
    pub fn dialect(&self) -> &Dialect {
        &self.settings.dialect
    }

    /// Stores response bodies of at most `bytes` on this route instead of the store's
    /// [cap](crate::Config::with_stored_body_cap) (1 MiB by default). A longer body
    /// still completes the request: the first client gets all of it, streamed through
    /// (the layer holds at most the cap of it), and the row keeps its status and headers;
    /// replays answer those with an empty body and the dialect's omitted-body header
    /// (`Idempotent-Replay: omitted`).
    #[must_use]
    pub fn with_stored_body_cap(self, bytes: usize) -> Self {
        self.with(|s| {
            s.store = s
                .store
                .reconfigured(|config| config.with_stored_body_cap(bytes))
        })
    }

    /// How this layer spells its problems, for handlers that answer problems of their own
    /// in the same style.
    pub fn problems(&self) -> &Problems {
        &self.settings.problems
    }

    /// Buffers request bodies up to `bytes` (default 1 MiB); a longer one gets a 413
    /// `payload_too_large` problem.
    #[must_use]
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.with(|s| s.body_limit = bytes)
    }

    /// Buffers request bodies under `budget` instead of the
    /// [process-wide one](BodyBudget::process) (64 MiB). Layers given clones of one budget
    /// share it.
    #[must_use]
    pub fn with_body_budget(self, budget: BodyBudget) -> Self {
        self.with(|s| s.body_budget = budget)
    }

    /// Reads a client's request id from, and writes it to, `header` instead of
    /// `X-Request-Id`.
    #[must_use]
    pub fn with_request_id_header(self, header: HeaderName) -> Self {
        self.with(|s| s.request_id_header = header)
    }

    /// Replays this route's responses for `ttl` instead of the store's
    /// [TTL](crate::Config::with_ttl). The store's pool is shared: routes with their own
    /// settings need no second store or pool.
    #[must_use]
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.with(|s| s.store = s.store.reconfigured(|config| config.with_ttl(ttl)))
    }

    /// Accepts keys under `policy` on this route instead of the store's
    /// [key policy](crate::Config::with_key_policy).
    #[must_use]
    pub fn with_key_policy(self, policy: KeyPolicy) -> Self {
        self.with(|s| {
            s.store = s
                .store
                .reconfigured(|config| config.with_key_policy(policy))
        })
    }

    /// Lets a duplicate on this route wait `wait` for the request holding its key, instead
    /// of the store's [in-flight wait](crate::Config::with_in_flight_wait).
    #[must_use]
    pub fn with_in_flight_wait(self, wait: Duration) -> Self {
        self.with(|s| {
            s.store = s
                .store
                .reconfigured(|config| config.with_in_flight_wait(wait))
        })
    }

    /// The store, with this layer's settings (see [`with_ttl`](Self::with_ttl)).
    pub fn store(&self) -> &IdempotencyStore {
        &self.settings.store
    }

    /// Whether requests without a key are refused (the default) or passed through
    /// ([`optional`](Self::optional)).
    pub fn is_key_required(&self) -> bool {
        self.settings.key_required
    }

    /// The methods whose requests are guarded (POST and PATCH unless
    /// [`with_guarded_methods`](Self::with_guarded_methods) said otherwise).
    pub fn guarded_methods(&self) -> &[Method] {
        &self.settings.guarded
    }

    /// The request body limit in bytes ([`with_body_limit`](Self::with_body_limit)).
    pub fn body_limit(&self) -> usize {
        self.settings.body_limit
    }

    /// The header that carries request ids
    /// ([`with_request_id_header`](Self::with_request_id_header)).
    pub fn request_id_header(&self) -> &HeaderName {
        &self.settings.request_id_header
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("IdempotencyLayer")
            .field("key_header", &s.key_header)
            .field("key_required", &s.key_required)
            .field("guarded", &s.guarded)
            .field("phased", &s.phased)
            .field("body_limit", &s.body_limit)
            .field("request_id_header", &s.request_id_header)
            .field("config", s.store.config())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            settings: Arc::clone(&self.settings),
        }
    }
}

/// The service of [`IdempotencyLayer`], around the route's handler `S`.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

impl<S> Service<Request> for Idempotency<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clone takes the place of the service that was polled ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let settings = Arc::clone(&self.settings);
        Box::pin(async move { Ok(handle(&settings, inner, request).await) })
    }
}

async fn handle<S>(settings: &Settings, inner: S, mut request: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let request_id = RequestId::of_request(&mut request, &settings.request_id_header);
    let matched = request.extensions().get::<MatchedPath>();
    let routed = matched.is_some();
    let route = match matched {
        Some(matched) => matched.as_str().to_owned(),
        None => request.uri().path().to_owned(),
    };
    let span = tracing::info_span!(
        "idempotency.http",
        request_id = %request_id,
        method = %request.method(),
        route = %route,
        key = tracing::field::Empty,
        scope = tracing::field::Empty,
        outcome = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let flow = Flow {
        settings,
        request_id: &request_id,
        route: &route,
        routed,
    };
    let mut response = flow
        .run(inner, request)
        .instrument(span.clone())
        .await
        .unwrap_or_else(|early| *early);
    span.record("status", response.status().as_u16());
    response.headers_mut().insert(
        settings.request_id_header.clone(),
        request_id.header_value(),
    );
    response
}

/// An answer a stage of [`Flow::run`] gives without running the handler (boxed: a
/// `Response` is large, and most requests pass every stage).
type Early = Box<Response>;

struct Flow<'a> {
    settings: &'a Settings,
    request_id: &'a RequestId,
    route: &'a str,
    /// Whether routing matched a route before the layer (no: a router's fallback, or the
    /// layer outside routing).
    routed: bool,
}

fn record(field: &str, value: &str) {
    tracing::Span::current().record(field, value);
}

impl Flow<'_> {
    fn problems(&self) -> &Problems {
        &self.settings.problems
    }

    fn problem(&self, problem: Problem) -> Response {
        problem
            .with_request_id(self.request_id.as_str())
            .into_response()
    }

    /// `problem` as the early answer of a stage.
    fn early(&self, problem: Problem) -> Early {
        Box::new(self.problem(problem))
    }

    fn internal_error(&self) -> Response {
        self.problem(self.problems().internal_error())
    }

    /// A stored response as sent; a replay of `replay_of`'s response when that is given.
    fn send_stored(&self, response: &StoredResponse, replay_of: Option<&Provenance>) -> Response {
        let replay = replay_of.map(|first| ReplayOf {
            first,
            dialect: &self.settings.dialect,
        });
        from_stored(response, replay).unwrap_or_else(|reason| {
            tracing::error!(%reason, "a stored response cannot be sent");
            self.internal_error()
        })
    }

    /// The answer to a failure of the store: 503 for the database (busy or failing), 500
    /// otherwise.
    fn server_error(&self, error: &Error) -> Response {
        let unavailable = || {
            self.problem(
                self.problems()
                    .service_unavailable(self.settings.store.config().retry_after()),
            )
        };
        match error {
            // Load, not a fault: the pool was exhausted for the whole connection wait.
            Error::NoConnection { .. } => {
                record("outcome", "no_connection");
                tracing::warn!(%error, "no database connection in time");
                unavailable()
            }
            Error::Database(_) | Error::CommitInterrupted { .. } => {
                tracing::error!(%error, "idempotency store failed");
                unavailable()
            }
            _ => {
                tracing::error!(%error, "idempotency store failed");
                self.internal_error()
            }
        }
    }

    /// The stages of a request: its key, its scope, its body and fingerprint, the key's
    /// claim, and the handler with that claim. Every stage but the last may answer
    /// itself (`Err`), without running the handler and without consuming the key.
    async fn run<S>(&self, inner: S, request: Request) -> Result<Response, Early>
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        if !self.settings.guarded.contains(request.method()) {
            record("outcome", "not_guarded");
            return Ok(call(inner, request).await);
        }
        let Some(key) = self.key(&request)? else {
            record("outcome", "pass_through");
            return Ok(call(inner, request).await);
        };
        record("key", key.as_str());
        let (parts, body) = request.into_parts();
        let scope = self.scope(&parts)?;
        record("scope", scope.as_str());
        // The request's waits (for the body budget, a connection, its key's holder)
        // share one deadline, counted from here; reading its body does not count.
        let arrived = Instant::now();
        // Held until the request is answered: the body lives as long.
        let _budget = self.budget(body.size_hint().exact(), arrived).await?;
        let reading = Instant::now();
        let body = self.body(body).await?;
        let waits_from = arrived + reading.elapsed();
        // The concrete path and query string; the route template only for rows stored
        // under fingerprint version 1.
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |target| target.as_str());
        let fingerprinted = IdempotentRequest::new(parts.method.as_str(), target, &body)
            .with_route_template(self.route)
            .with_waits_from(waits_from);
        let store = &self.settings.store;
        if self.settings.phased {
            // Boxed: the phased begin's future is nearly twice the transactional one's,
            // which the requests of transactional routes need not carry.
            let begun = Box::pin(store.begin_phased(&scope, &key, &fingerprinted)).await;
            self.claimed(begun, Handler { inner, parts, body }).await
        } else {
            let begun = store.begin(&scope, &key, &fingerprinted).await;
            self.claimed(begun, Handler { inner, parts, body }).await
        }
    }

    /// The request's key: `None` for a request without one on a route where it is
    /// optional; a 400 problem for a missing or malformed key, or one sent twice; a 413
    /// for a body that declares more than the limit (checked before the key is missed,
    /// so that an oversized request learns that first).
    fn key(&self, request: &Request) -> Result<Option<IdempotencyKey>, Early> {
        let settings = self.settings;
        let problems = self.problems();
        let mut keys = request.headers().get_all(&settings.key_header).iter();
        let raw_key = match (keys.next(), keys.next()) {
            (None, _) if !settings.key_required => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(self.early(
                    problems
                        .key_invalid(&"the header appears more than once; send exactly one key"),
                ));
            }
            (raw_key, _) => raw_key,
        };
        if request.body().size_hint().lower() > settings.body_limit as u64 {
            record("outcome", "too_large");
            return Err(self.early(problems.payload_too_large(settings.body_limit)));
        }
        let Some(raw_key) = raw_key else {
            record("outcome", "key_missing");
            return Err(self.early(problems.key_missing()));
        };
        match parse_key_field(raw_key.as_bytes(), settings.store.config().key_policy()) {
            Ok(key) => Ok(Some(key)),
            Err(reason) => {
                record("outcome", "key_invalid");
                Err(self.early(problems.key_invalid(&reason)))
            }
        }
    }

    /// The request's scope, from the application's scope function.
    fn scope(&self, parts: &Parts) -> Result<Scope, Early> {
        (self.settings.scope)(parts).map_err(|rejection| {
            record("outcome", "scope_rejected");
            self.early(rejection.into_problem(self.problems()))
        })
    }

    /// The request body's share of the body budget: its `declared` length, or the body
    /// limit; a 503 when the budget stays spent for the connection wait from `arrived`.
    async fn budget(
        &self,
        declared: Option<u64>,
        arrived: Instant,
    ) -> Result<OwnedSemaphorePermit, Early> {
        let settings = self.settings;
        let limit = settings.body_limit as u64;
        let bytes = declared.unwrap_or(limit).min(limit);
        let config = settings.store.config();
        let deadline = arrived + config.connection_wait();
        match settings.body_budget.reserve(bytes, deadline).await {
            Some(reserved) => Ok(reserved),
            None => {
                record("outcome", "body_budget_spent");
                tracing::warn!(bytes, "the body budget stayed spent; answered 503");
                Err(self.early(self.problems().service_unavailable(config.retry_after())))
            }
        }
    }

    /// The request's body, read up to the limit.
    async fn body(&self, body: Body) -> Result<Bytes, Early> {
        let limit = self.settings.body_limit;
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<LengthLimitError>() => {
                record("outcome", "too_large");
                Err(self.early(self.problems().payload_too_large(limit)))
            }
            Err(error) => {
                record("outcome", "body_unreadable");
                tracing::debug!(%error, "the request body could not be read");
                Err(self.early(
                    self.problems()
                        .invalid_request(None, "The request body could not be read completely."),
                ))
            }
        }
    }

    /// Answers what beginning the request found: a replay, a refusal, or, on a claim,
    /// the handler's answer.
    async fn claimed<S, C: Held>(
        &self,
        begun: Result<Begin<C>, Error>,
        handler: Handler<S>,
    ) -> Result<Response, Early>
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        match begun {
            // Boxed: the handler's run and the completion are most of a request's
            // future (7.5 of its 10.6 KB with rustc 1.95), which every duplicate, held
            // for as long as it waits, would carry too.
            Ok(Begin::Claimed(claim)) => Ok(Box::pin(self.handle(claim, handler)).await),
            Ok(Begin::Replay(replay)) => {
                record("outcome", "replayed");
                Ok(self.send_stored(&replay.response, Some(&replay.first_request)))
            }
            Err(error) => Err(Box::new(self.refused(&error))),
        }
    }

    /// The answer when the store refused to begin: a conflict or in-flight problem, or a
    /// server error.
    fn refused(&self, error: &Error) -> Response {
        match self.problems().for_error(error) {
            Some(problem) => {
                record(
                    "outcome",
                    if matches!(error, Error::Conflict { .. }) {
                        "conflict"
                    } else {
                        "in_flight"
                    },
                );
                self.problem(problem)
            }
            None => self.server_error(error),
        }
    }

    /// Runs the handler with `claim` in reach, catching a panic, then answers: with the
    /// handler's response stored and committed, or with it alone if the handler took the
    /// claim for itself (a phased request's operation).
    async fn handle<S, C: Held>(&self, mut claim: C, handler: Handler<S>) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let Handler {
            inner,
            mut parts,
            body,
        } = handler;
        claim.set_provenance(self.provenance(&parts.headers));
        let handoff = Handoff::new(claim, Arc::clone(&self.settings.problems));
        parts.extensions.insert(handoff.clone());
        let request = Request::from_parts(parts, Body::from(body));
        let answered = AssertUnwindSafe(call(inner, request)).catch_unwind().await;
        match (handoff.take(), answered) {
            (Some(claim), Ok(response)) => self.complete(claim, response).await,
            (None, Ok(response)) => C::taken_by_handler(self, response),
            (claim, Err(_panic)) => {
                record("outcome", "panicked");
                tracing::error!("the handler panicked; its writes are rolled back");
                if let Some(claim) = claim {
                    claim.give_back().await;
                }
                self.internal_error()
            }
        }
    }

    /// Which request holds the claim: its id, and its W3C `traceparent` if it has one.
    fn provenance(&self, headers: &http::HeaderMap) -> Provenance {
        let provenance = Provenance::new(self.request_id.as_str());
        match traceparent(headers) {
            Some(traceparent) => provenance.with_traceparent(traceparent),
            None => provenance,
        }
    }

    /// Stores the handler's response and commits, or gives the key back.
    async fn complete<C: Held>(&self, claim: C, response: Response) -> Response {
        let (stored, response) = match self.storable(response).await {
            Storable::Store(stored, response) => (stored, response),
            Storable::Not(response) => {
                claim.give_back().await;
                return response;
            }
        };
        match claim.store(&stored).await {
            Ok(Completion::Stored) => {
                record("outcome", "stored");
                Self::stored(&stored, response)
            }
            Ok(_) => {
                record("outcome", "not_kept");
                response
            }
            // The reply to COMMIT was lost; the store found out what happened.
            Err(Error::CommitInterrupted {
                outcome: CommitOutcome::Stored(replay),
                ..
            }) => {
                record("outcome", "stored_after_lost_commit");
                if replay.response == stored {
                    Self::stored(&stored, response)
                } else {
                    // An identical request's response, stored after this one rolled back.
                    self.send_stored(&replay.response, Some(&replay.first_request))
                }
            }
            Err(Error::CommitInterrupted {
                outcome: CommitOutcome::NotStored,
                ..
            }) => {
                record("outcome", "not_committed");
                self.problem(self.problems().not_committed())
            }
            Err(error) => {
                record("outcome", "complete_failed");
                self.server_error(&error)
            }
        }
    }

    /// The handler's response in the form it would be stored in, or the answer to send
    /// without storing anything (marked [`Rollback`], or a body that failed).
    async fn storable(&self, response: Response) -> Storable {
        let (parts, body) = response.into_parts();
        if parts.extensions.get::<Rollback>().is_some() {
            record("outcome", "rolled_back");
            return Storable::Not(Response::from_parts(parts, body));
        }
        if self.answered_by_the_router(&parts) {
            record("outcome", "not_handled");
            return Storable::Not(Response::from_parts(parts, body));
        }
        let cap = self.settings.store.config().stored_body_cap();
        let (body, send) = match read_up_to(body, cap).await {
            Ok(ReadBody::Whole(body)) => (Some(body.clone()), Body::from(body)),
            Ok(ReadBody::Over(body)) => (None, body),
            Err(error) => {
                record("outcome", "response_body_failed");
                tracing::error!(%error, "the handler's response body failed; rolled back");
                return Storable::Not(self.internal_error());
            }
        };
        match to_stored(
            &parts,
            body,
            &self.settings.request_id_header,
            &self.settings.dialect,
        ) {
            Ok(stored) => Storable::Store(stored, Response::from_parts(parts, send)),
            Err(reason) => {
                record("outcome", "unstorable");
                tracing::error!(%reason, "the handler's response cannot be stored; rolled back");
                Storable::Not(self.internal_error())
            }
        }
    }

    /// Whether no handler produced `response`: a router's fallback (404 on a request
    /// that matched no route) or a method router's 405 (which names the methods the
    /// route has in `Allow`). Such answers are not stored: the key stays free.
    fn answered_by_the_router(&self, response: &http::response::Parts) -> bool {
        (response.status == StatusCode::NOT_FOUND && !self.routed)
            || (response.status == StatusCode::METHOD_NOT_ALLOWED
                && response.headers.contains_key(ALLOW))
    }

    /// A response that was just stored, sent as it will be replayed (the same status
    /// and headers) with `response`'s body: the stored one, or all of a body over the
    /// cap, streamed through.
    fn stored(stored: &StoredResponse, response: Response) -> Response {
        match from_stored(stored, None) {
            Ok(mut sent) => {
                *sent.body_mut() = response.into_body();
                sent
            }
            // Not for a status the handler produced: `from_stored` refuses only
            // statuses outside HTTP's.
            Err(_) => response,
        }
    }
}

/// What [`Flow::storable`] made of a handler's response.
enum Storable {
    /// Store this; the response (with all of its body) to send if it is not kept, and
    /// whose body goes with the stored form if it is.
    Store(StoredResponse, Response),
    /// Send this, store nothing.
    Not(Response),
}

async fn call<S>(mut inner: S, request: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    match inner.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The request a claim's handler gets.
struct Handler<S> {
    inner: S,
    parts: Parts,
    body: Bytes,
}

/// A claim the layer hands to a handler: a transactional [`Claim`] or a [`PhasedClaim`].
trait Held: Send + Sync + Sized + 'static {
    fn set_provenance(&mut self, provenance: Provenance);

    /// Stores the handler's response with the key and commits.
    fn store(
        self,
        response: &StoredResponse,
    ) -> impl Future<Output = Result<Completion, Error>> + Send;

    /// Gives the key back without storing anything (best effort: a failure is logged,
    /// and the claim ends by itself).
    fn give_back(self) -> impl Future<Output = ()> + Send;

    /// The answer when the handler kept the claim for itself.
    fn taken_by_handler(flow: &Flow<'_>, response: Response) -> Response;
}

impl Held for Claim {
    fn set_provenance(&mut self, provenance: Provenance) {
        Claim::set_provenance(self, provenance);
    }

    async fn store(self, response: &StoredResponse) -> Result<Completion, Error> {
        self.complete(response).await
    }

    async fn give_back(self) {
        if let Err(error) = self.abort().await {
            tracing::warn!(%error, "rollback failed; the connection was closed, which rolls back");
        }
    }

    /// The handler still holds an [`IdempotentTx`](super::IdempotentTx) somewhere.
    fn taken_by_handler(flow: &Flow<'_>, _response: Response) -> Response {
        record("outcome", "claim_still_held");
        tracing::error!(
            "the handler returned while an IdempotentTx was still alive (moved into a \
             task?); its writes roll back when it is dropped"
        );
        flow.internal_error()
    }
}

impl Held for PhasedClaim {
    fn set_provenance(&mut self, provenance: Provenance) {
        PhasedClaim::set_provenance(self, provenance);
    }

    async fn store(self, response: &StoredResponse) -> Result<Completion, Error> {
        self.finish(response).await
    }

    async fn give_back(self) {
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "releasing a phased request failed; its lease will run out");
        }
    }

    /// The handler ran the operation, which stored its response or released the request.
    fn taken_by_handler(_flow: &Flow<'_>, response: Response) -> Response {
        record("outcome", "phased");
        response
    }
}

/// The request's W3C `traceparent`, if it has exactly one that is well formed
/// (`<version>-<trace id>-<parent id>-<flags>` in lower-case hex, 2-32-16-2 digits, version
/// not `ff`, ids not all zeros); anything else is not stored.
fn traceparent(headers: &http::HeaderMap) -> Option<&str> {
    let mut values = headers.get_all("traceparent").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let value = value.to_str().ok()?;
    let fields: Vec<&str> = value.split('-').collect();
    let [version, trace_id, parent_id, flags] = fields[..] else {
        return None;
    };
    let hex = |field: &str, len: usize| {
        field.len() == len
            && field
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let zeros = |field: &str| field.bytes().all(|b| b == b'0');
    (hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && !zeros(trace_id)
        && hex(parent_id, 16)
        && !zeros(parent_id)
        && hex(flags, 2))
    .then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_well_formed_traceparent_is_taken() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = http::HeaderMap::new();
        assert_eq!(traceparent(&headers), None);
        headers.insert("traceparent", http::HeaderValue::from_static(good));
        assert_eq!(traceparent(&headers), Some(good));
        headers.append("traceparent", http::HeaderValue::from_static(good));
        assert_eq!(traceparent(&headers), None, "two of them");
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", http::HeaderValue::from_static(bad));
            assert_eq!(traceparent(&headers), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// A request's future until it claims, which a waiting duplicate holds for as long as
    /// it waits: the claim's handling and the phased begin are boxed out of it (with both
    /// inline it was 10.6 KB under rustc 1.95, now 3.0 KB).
    #[tokio::test]
    async fn a_waiting_request_carries_no_handler_state() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1/none")
            .expect("a lazy pool");
        let store = IdempotencyStore::new(pool);
        let layer = IdempotencyLayer::new(store, |_: &Parts| Scope::new("s"));
        let service =
            layer.layer(axum::Router::new().route("/", axum::routing::post(|| async { "" })));
        let request = handle(
            &service.settings,
            service.inner.clone(),
            Request::new(Body::empty()),
        );
        let bytes = std::mem::size_of_val(&request);
        println!("a request's future until it claims: {bytes} bytes");
        assert!(bytes <= 4096, "{bytes} bytes");
    }
}
