//! The idempotency policy published in an OpenAPI document (`IdempotencyPolicy`, cargo
//! feature `openapi`): what a layer in the seed dialect and one in the IETF dialect
//! publish, which operations they cover, and that the document's problem examples are
//! what the layer answers.
//!
//! No database: the pool is lazy and never connects (a pool needs a Tokio runtime, hence
//! `tokio::test` throughout), and the requests sent to the layer are refused before it
//! would claim a key.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::Json;
use axum::http::{HeaderName, StatusCode};
use pg_idempotency::axum::{Dialect, IdempotencyLayer, IdempotencyPolicy, scope_from_header};
use pg_idempotency::{IdempotencyStore, KeyPolicy, Problem, Scope};
use serde_json::{Value, json};
use support::{Answer, PROBLEM_FIELDS, Server, client};
use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

/// A layer over a store whose pool never connects.
fn layer() -> IdempotencyLayer {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(100))
        .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
        .expect("a lazy pool");
    let scope = scope_from_header(
        HeaderName::from_static("x-account-id"),
        Some(Scope::new("default").expect("a scope")),
    );
    IdempotencyLayer::new(IdempotencyStore::new(pool), scope)
}

/// Creates an order.
#[utoipa::path(
    post,
    path = "/v1/orders",
    responses(
        (status = 201, description = "Created."),
        (status = 400, description = "The order is not valid.", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn create_order() -> (StatusCode, Json<Value>) {
    (StatusCode::CREATED, Json(json!({ "id": 1 })))
}

/// Reads an order.
#[utoipa::path(get, path = "/v1/orders/{id}", params(("id" = u64, Path)),
    responses((status = 200, description = "The order.")))]
async fn get_order() -> Json<Value> {
    Json(json!({ "id": 1 }))
}

/// Changes an order.
#[utoipa::path(patch, path = "/v1/orders/{id}", params(("id" = u64, Path)),
    responses((status = 200, description = "Changed.")))]
async fn change_order() -> Json<Value> {
    Json(json!({ "id": 1 }))
}

/// Logs in (not guarded in the tests that name the paths).
#[utoipa::path(post, path = "/v1/login", responses((status = 204, description = "Done.")))]
async fn login() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The routes, with `layer` on the order routes, and their document.
fn routes(layer: &IdempotencyLayer) -> (axum::Router, OpenApi) {
    OpenApiRouter::new()
        .routes(routes!(create_order).map(|route| route.route_layer(layer.clone())))
        .routes(routes!(get_order, change_order).map(|route| route.route_layer(layer.clone())))
        .routes(routes!(login))
        .split_for_parts()
}

/// The document of the routes with `policy` applied, as JSON.
fn document(layer: &IdempotencyLayer, policy: &IdempotencyPolicy) -> Result<Value> {
    let (_, mut document) = routes(layer);
    policy.apply(&mut document);
    Ok(serde_json::to_value(&document)?)
}

/// The names of the examples of `operation`'s `status` problem response.
fn examples(operation: &Value, status: &str) -> Vec<String> {
    operation["responses"][status]["content"]["application/problem+json"]["examples"]
        .as_object()
        .map(|examples| examples.keys().cloned().collect())
        .unwrap_or_default()
}

/// The header parameter `name` of `operation`.
fn header_parameter<'a>(operation: &'a Value, name: &str) -> Option<&'a Value> {
    operation["parameters"]
        .as_array()?
        .iter()
        .find(|parameter| parameter["in"] == "header" && parameter["name"] == name)
}

/// The names of the headers of `operation`'s `status` response.
fn headers(operation: &Value, status: &str) -> Vec<String> {
    operation["responses"][status]["headers"]
        .as_object()
        .map(|headers| headers.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_seed_layer_publishes_its_key_statuses_headers_and_expiry() -> Result<()> {
    let layer = layer();
    let document = document(&layer, &IdempotencyPolicy::new(&layer))?;
    let create = &document["paths"]["/v1/orders"]["post"];

    let key = header_parameter(create, "Idempotency-Key").context("no key parameter")?;
    ensure!(key["required"] == true, "{key}");
    ensure!(key["schema"]["format"] == "uuid", "{key}");
    let description = key["description"].as_str().context("no description")?;
    ensure!(
        description.contains("24 hours (86400 seconds)"),
        "{description}"
    );

    // A stored status carries the replay headers of the seed dialect.
    ensure!(
        headers(create, "201")
            == [
                "Idempotent-Replay",
                "Idempotent-Replay-Of",
                "Idempotent-Replayed",
                "X-Request-Id"
            ],
        "{:?}",
        headers(create, "201")
    );
    let replayed = &create["responses"]["201"]["headers"]["Idempotent-Replayed"];
    ensure!(replayed["schema"]["enum"] == json!(["true"]), "{replayed}");
    let omitted = &create["responses"]["201"]["headers"]["Idempotent-Replay"];
    ensure!(omitted["schema"]["enum"] == json!(["omitted"]), "{omitted}");

    // The handler's own 400 keeps its words; the layer's join them.
    let bad = &create["responses"]["400"];
    let words = bad["description"].as_str().context("no description")?;
    ensure!(words.starts_with("The order is not valid."), "{words}");
    ensure!(
        examples(create, "400")
            == [
                "idempotency_key_invalid",
                "idempotency_key_missing",
                "idempotency_scope_invalid",
                "invalid_request"
            ],
        "{:?}",
        examples(create, "400")
    );
    // 409 for both a reused key and a key in flight; no 422.
    ensure!(examples(create, "409") == ["idempotency_conflict", "idempotency_key_in_use"]);
    ensure!(headers(create, "409").contains(&"Retry-After".to_owned()));
    ensure!(create["responses"].get("422").is_none());
    ensure!(examples(create, "413") == ["payload_too_large"]);
    ensure!(examples(create, "500") == ["internal_error"]);
    ensure!(examples(create, "503") == ["request_not_committed", "service_unavailable"]);
    let retry_after = &create["responses"]["503"]["headers"]["Retry-After"];
    ensure!(retry_after["schema"]["type"] == "integer", "{retry_after}");
    ensure!(
        create["responses"]["503"]["content"]["application/problem+json"]["schema"]["$ref"]
            == "#/components/schemas/Problem"
    );
    // A problem is never a replay.
    ensure!(!headers(create, "503").contains(&"Idempotent-Replayed".to_owned()));

    let policy = &create["x-idempotency"];
    ensure!(
        policy
            == &json!({
                "key_header": "Idempotency-Key",
                "key_required": true,
                "key_format": "uuid-v4",
                "expires_after_seconds": 86400,
                "expiry": "A stored response is replayed for 24 hours (86400 seconds) from the \
                    first request with the key; after that the key counts as unused and a \
                    request with it runs again.",
                "fingerprint": ["method", "path", "query", "body"],
                "not_stored_statuses": ["408", "429", "500-599"],
                "stored_body_cap": 1048576,
                "body_limit": 1048576,
                "replay_headers": {
                    "replayed": "Idempotent-Replayed",
                    "replay_of": "Idempotent-Replay-Of",
                    "body_omitted": "Idempotent-Replay",
                },
            }),
        "{policy:#}"
    );
    let note = create["description"].as_str().context("no description")?;
    ensure!(
        note.contains("**Idempotent** with `Idempotency-Key` (required)"),
        "{note}"
    );

    // PATCH is guarded too, and without `on_paths` so is the unguarded login route (the
    // policy cannot know where the layer is; `on_paths` says it).
    let change = &document["paths"]["/v1/orders/{id}"]["patch"];
    ensure!(header_parameter(change, "Idempotency-Key").is_some());
    ensure!(document["paths"]["/v1/login"]["post"]["x-idempotency"].is_object());
    // GET passes the layer: left alone.
    let read = &document["paths"]["/v1/orders/{id}"]["get"];
    ensure!(
        header_parameter(read, "Idempotency-Key").is_none() && read.get("x-idempotency").is_none()
    );
    ensure!(headers(read, "200").is_empty());

    let problem = &document["components"]["schemas"]["Problem"];
    let fields: Vec<&str> = problem["properties"]
        .as_object()
        .context("no properties")?
        .keys()
        .map(String::as_str)
        .collect();
    ensure!(fields == PROBLEM_FIELDS, "{fields:?}");
    ensure!(
        problem["required"]
            == json!([
                "type",
                "title",
                "status",
                "detail",
                "code",
                "advice_code",
                "param",
                "request_id"
            ])
    );
    ensure!(problem["additionalProperties"] == false);
    ensure!(problem["properties"]["param"]["type"] == json!(["string", "null"]));
    Ok(())
}

#[tokio::test]
async fn an_ietf_layer_publishes_422_and_its_own_headers() -> Result<()> {
    let layer = layer()
        .with_dialect(Dialect::ietf())
        .with_ttl(Duration::from_secs(3600))
        .with_key_policy(KeyPolicy::Opaque)
        .with_stored_body_cap(4096)
        .optional();
    let policy = IdempotencyPolicy::new(&layer).on_paths(["/v1/orders"]);
    let document = document(&layer, &policy)?;
    let create = &document["paths"]["/v1/orders"]["post"];

    let key = header_parameter(create, "Idempotency-Key").context("no key parameter")?;
    ensure!(key["required"] == false, "{key}");
    ensure!(
        key["schema"]["maxLength"] == 255 && key["schema"]["minLength"] == 1,
        "{key}"
    );
    let description = key["description"].as_str().context("no description")?;
    ensure!(description.starts_with("Optional:"), "{description}");
    ensure!(
        description.contains("422 `fingerprint-mismatch`"),
        "{description}"
    );
    ensure!(
        description.contains("1 hour (3600 seconds)"),
        "{description}"
    );

    ensure!(
        headers(create, "201")
            == [
                "Idempotency-Replay",
                "Idempotency-Replay-Of",
                "Idempotency-Replayed",
                "X-Request-Id"
            ],
        "{:?}",
        headers(create, "201")
    );
    ensure!(examples(create, "422") == ["fingerprint-mismatch"]);
    ensure!(examples(create, "409") == ["request-in-flight"]);
    ensure!(headers(create, "409").contains(&"Retry-After".to_owned()));
    ensure!(!headers(create, "422").contains(&"Retry-After".to_owned()));
    // An optional key is never missing.
    ensure!(
        examples(create, "400") == ["invalid-key", "invalid-request", "invalid-scope"],
        "{:?}",
        examples(create, "400")
    );
    ensure!(headers(create, "503").contains(&"Retry-After".to_owned()));

    let policy = &create["x-idempotency"];
    ensure!(policy["expires_after_seconds"] == 3600, "{policy}");
    ensure!(policy["key_required"] == false && policy["key_format"] == "opaque");
    ensure!(policy["stored_body_cap"] == 4096);
    ensure!(policy["replay_headers"]["replayed"] == "Idempotency-Replayed");

    // Outside the paths named: left alone.
    let login = &document["paths"]["/v1/login"]["post"];
    ensure!(login.get("x-idempotency").is_none() && login.get("parameters").is_none());
    ensure!(headers(login, "204").is_empty());
    ensure!(document["paths"]["/v1/orders/{id}"]["patch"]["x-idempotency"].is_object());
    Ok(())
}

#[tokio::test]
async fn the_first_policy_applied_to_an_operation_wins() -> Result<()> {
    let seed = layer();
    let ietf = layer().with_dialect(Dialect::ietf());
    let once = document(&seed, &IdempotencyPolicy::new(&seed))?;

    let (_, mut twice) = routes(&seed);
    IdempotencyPolicy::new(&seed).modify(&mut twice);
    IdempotencyPolicy::new(&seed).apply(&mut twice);
    IdempotencyPolicy::new(&ietf).apply(&mut twice);
    ensure!(serde_json::to_value(&twice)? == once);

    // The particular routes first, a general policy for the rest.
    let (_, mut mixed) = routes(&seed);
    IdempotencyPolicy::new(&ietf)
        .on_paths(["/v1/login"])
        .apply(&mut mixed);
    IdempotencyPolicy::new(&seed).apply(&mut mixed);
    let mixed = serde_json::to_value(&mixed)?;
    ensure!(examples(&mixed["paths"]["/v1/login"]["post"], "422") == ["fingerprint-mismatch"]);
    ensure!(examples(&mixed["paths"]["/v1/orders"]["post"], "409").len() == 2);
    Ok(())
}

#[tokio::test]
async fn paths_are_covered_segment_by_segment() -> Result<()> {
    let layer = layer();
    let covered = |prefix: &str| -> Result<Vec<String>> {
        let document = document(&layer, &IdempotencyPolicy::new(&layer).on_paths([prefix]))?;
        let paths = document["paths"].as_object().context("no paths")?;
        Ok(paths
            .iter()
            .filter(|(_, item)| {
                item.as_object()
                    .is_some_and(|item| item.values().any(|o| o.get("x-idempotency").is_some()))
            })
            .map(|(path, _)| path.clone())
            .collect())
    };
    ensure!(covered("/v1/orders")? == ["/v1/orders", "/v1/orders/{id}"]);
    ensure!(covered("/v1/orders/{id}")? == ["/v1/orders/{id}"]);
    ensure!(covered("/v1/order")?.is_empty());
    ensure!(covered("/v1/")?.len() == 3);
    ensure!(covered("/")?.len() == 3);
    Ok(())
}

/// The example of `code` in `operation`'s `status` response, without its request id.
fn example(operation: &Value, status: &str, code: &str) -> Result<Value> {
    let mut value = operation["responses"][status]["content"]["application/problem+json"]
        ["examples"][code]["value"]
        .clone();
    value
        .as_object_mut()
        .with_context(|| format!("no example {code} in {status}"))?
        .remove("request_id");
    Ok(value)
}

#[tokio::test]
async fn the_examples_are_what_the_layer_answers() -> Result<()> {
    let layer = layer()
        .with_key_header(HeaderName::from_static("x-idem-key"))
        .with_problem_type_base("https://api.example.com/errors/")
        .with_body_limit(16);
    let (router, mut document) = routes(&layer);
    IdempotencyPolicy::new(&layer).apply(&mut document);
    let document = serde_json::to_value(&document)?;
    let create = &document["paths"]["/v1/orders"]["post"];
    ensure!(header_parameter(create, "X-Idem-Key").is_some());
    ensure!(create["x-idempotency"]["body_limit"] == 16);

    let server = Server::start(router).await?;
    let post = |key: Option<&'static str>, body: &'static str| {
        let request = client().post(server.url("/v1/orders")).body(body);
        let request = match key {
            Some(key) => request.header("x-idem-key", key),
            None => request,
        };
        async move { Answer::of(request.send().await?).await }
    };
    let checks = [
        (post(None, "{}").await?, "400", "idempotency_key_missing"),
        (
            post(Some("not a key"), "{}").await?,
            "400",
            "idempotency_key_invalid",
        ),
        (
            post(
                Some("8e03978e-40d5-43e8-bc93-6894a57f9324"),
                "{\"over\": \"sixteen\"}",
            )
            .await?,
            "413",
            "payload_too_large",
        ),
    ];
    for (answer, status, code) in checks {
        let mut body = answer.problem(status.parse()?, code)?;
        body.as_object_mut()
            .context("not an object")?
            .remove("request_id");
        let example = example(create, status, code)?;
        ensure!(
            body == example,
            "{code}: answered {body:#}, documented {example:#}"
        );
    }
    server.stop().await
}
