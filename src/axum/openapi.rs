//! The layer's idempotency policy, published in an OpenAPI document (cargo feature
//! `openapi`, [utoipa] 6).
//!
//! [utoipa]: https://docs.rs/utoipa/6

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use utoipa::openapi::example::Example;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, Parameter, ParameterIn, PathItem};
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::{
    AdditionalProperties, Object, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Required};
use utoipa::{Modify, PartialSchema, ToSchema};

use super::layer::IdempotencyLayer;
use super::scope::title_case;
use crate::key::{IdempotencyKey, KeyPolicy};
use crate::problem::{Problem, Situation};
use crate::scope::Scope;

/// The extension every operation the policy was applied to carries.
const EXTENSION: &str = "x-idempotency";

/// A key in the examples: the IETF draft's.
const EXAMPLE_KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

/// A request id in the examples, in the server's own format.
const EXAMPLE_REQUEST_ID: &str = "req_01HZK2N5GQR9T8X4B6FJW3Y1AS";

/// The idempotency policy of an [`IdempotencyLayer`], written into an OpenAPI document: a
/// [`utoipa::Modify`] (cargo feature `openapi`).
///
/// The IETF draft (draft-ietf-httpapi-idempotency-key-header) says that a server MUST
/// publish its idempotency policy, the expiry included. This publishes what the layer it
/// was made from does, read from its settings: apply it to the document of the routes the
/// layer guards, and the document cannot say one thing while the layer does another.
///
/// To every operation it covers, it adds:
///
/// - the key header parameter (the layer's [key header](IdempotencyLayer::with_key_header),
///   `Idempotency-Key` by default), required or [optional](IdempotencyLayer::optional),
///   with the [key policy](crate::KeyPolicy) as its schema (`format: uuid` for UUID v4
///   keys; 1 to 255 visible ASCII characters for opaque ones) and the expiry in words;
/// - on each response it already declares whose status the store keeps
///   ([`StorePolicy`](crate::StorePolicy)), the [dialect](IdempotencyLayer::with_dialect)'s
///   replay headers (`Idempotent-Replayed`, `Idempotent-Replay-Of`, `Idempotent-Replay`
///   in the seed dialect, `Idempotency-*` in the IETF one); on every response, the
///   request id header;
/// - the layer's own answers as `application/problem+json` responses, by the status the
///   dialect's [`ProblemCatalogue`](crate::ProblemCatalogue) gives them (400 for a
///   missing or malformed key, 409 for a key in flight, 409 or 422 for a key reused with
///   another request, 413 over the [body limit](IdempotencyLayer::with_body_limit),
///   500, 503), each with one example per problem, made by the layer's own
///   [`Problems`](crate::Problems); `Retry-After` on the statuses that carry it. A
///   status the operation already declares (a handler's own 400, say) keeps its
///   content; the layer's problems are added to its description and examples;
/// - the extension `x-idempotency`, for machines:
///
/// ```json
/// {
///   "key_header": "Idempotency-Key",
///   "key_required": true,
///   "key_format": "uuid-v4",
///   "expires_after_seconds": 86400,
///   "expiry": "A stored response is replayed for 24 hours (86400 seconds) ...",
///   "fingerprint": ["method", "path", "query", "body"],
///   "not_stored_statuses": ["408", "429", "500-599"],
///   "stored_body_cap": 1048576,
///   "body_limit": 1048576,
///   "replay_headers": {
///     "replayed": "Idempotent-Replayed",
///     "replay_of": "Idempotent-Replay-Of",
///     "body_omitted": "Idempotent-Replay"
///   }
/// }
/// ```
///
/// and a paragraph at the end of the operation's description that says the same in words.
/// The problem responses refer to the schema component `Problem` ([`Problem`] implements
/// [`ToSchema`], so that handlers can name it in their own responses), which
/// [`apply`](Self::apply) registers unless the document has one.
///
/// Which operations it covers: those whose method the layer
/// [guards](IdempotencyLayer::with_guarded_methods) (POST and PATCH by default), on every
/// path or on the paths given to [`on_paths`](Self::on_paths). An operation that already
/// carries `x-idempotency` is left as it is, so when routes have layers with different
/// settings, apply the policies of the particular routes first and a general one last.
/// Responses the document only refers to (`$ref`) are left as they are.
///
/// ```no_run
/// # fn demo(layer: pg_idempotency::axum::IdempotencyLayer) {
/// use pg_idempotency::axum::IdempotencyPolicy;
/// use utoipa::openapi::{Info, OpenApi, Paths};
///
/// // The document of the routes, e.g. from utoipa-axum's `OpenApiRouter::split_for_parts`
/// // or a `#[derive(utoipa::OpenApi)]`.
/// let mut document = OpenApi::new(Info::new("payments", "1.0.0"), Paths::new());
/// IdempotencyPolicy::new(&layer)
///     .on_paths(["/v1/payments"])
///     .apply(&mut document);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyPolicy {
    layer: IdempotencyLayer,
    /// Path prefixes; `None`: every path.
    paths: Option<Vec<String>>,
}

impl IdempotencyPolicy {
    /// The policy of `layer` (its settings as they are now), for the operations whose
    /// method it guards on every path.
    pub fn new(layer: &IdempotencyLayer) -> Self {
        Self {
            layer: layer.clone(),
            paths: None,
        }
    }

    /// Covers only the paths that are one of `prefixes` or lie below one, segment by
    /// segment as the document spells them: `/v1/payments` covers `/v1/payments` and
    /// `/v1/payments/{id}`, not `/v1/payments-archive` (builder style). Calling it again
    /// adds prefixes.
    #[must_use]
    pub fn on_paths<I, P>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.paths
            .get_or_insert_with(Vec::new)
            .extend(prefixes.into_iter().map(Into::into));
        self
    }

    /// Writes the policy into `document` (what [`Modify::modify`] does).
    pub fn apply(&self, document: &mut OpenApi) {
        let guarded = self.layer.guarded_methods();
        let mut applied = false;
        for (path, item) in document.paths.paths.iter_mut() {
            if !self.covers(path) {
                continue;
            }
            for (method, operation) in operations_mut(item) {
                let published = operation
                    .extensions
                    .as_ref()
                    .is_some_and(|extensions| extensions.contains_key(EXTENSION));
                if guarded.contains(&method) && !published {
                    self.publish(operation);
                    applied = true;
                }
            }
        }
        if applied {
            let components = document.components.get_or_insert_with(Default::default);
            components
                .schemas
                .entry(Problem::name().into_owned())
                .or_insert_with(Problem::schema);
        }
    }

    /// Whether the document's path template `path` is covered.
    fn covers(&self, path: &str) -> bool {
        let Some(prefixes) = &self.paths else {
            return true;
        };
        prefixes.iter().any(|prefix| {
            path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
            })
        })
    }

    /// Writes the policy into one operation.
    fn publish(&self, operation: &mut Operation) {
        let key = self.key_parameter();
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        let same = |parameter: &RefOr<Parameter>| {
            matches!(parameter, RefOr::T(p) if p.parameter_in == ParameterIn::Header
                && p.name.eq_ignore_ascii_case(&key.name))
        };
        match parameters.iter_mut().find(|parameter| same(parameter)) {
            Some(existing) => *existing = RefOr::T(key),
            None => parameters.push(RefOr::T(key)),
        }

        let request_id = self.request_id_header();
        let store_policy = self.layer.store().config().store_policy();
        for (status, response) in &mut operation.responses.responses {
            let RefOr::T(response) = response else {
                continue;
            };
            if representative_status(status).is_some_and(|s| store_policy.stores(s)) {
                for (name, header) in self.replay_headers() {
                    response.headers.entry(name).or_insert(RefOr::T(header));
                }
            }
            response
                .headers
                .entry(request_id.0.clone())
                .or_insert_with(|| RefOr::T(request_id.1.clone()));
        }

        for (status, answers) in self.answers() {
            self.add_problems(operation, status, &answers);
        }

        let note = self.note();
        operation.description = Some(match operation.description.take() {
            Some(description) if !description.is_empty() => format!("{description}\n\n{note}"),
            _ => note,
        });
        operation
            .extensions
            .get_or_insert_with(Default::default)
            .insert(EXTENSION.to_owned(), self.extension());
    }

    /// The layer's problems answered with `status`, into the operation's response for it.
    fn add_problems(&self, operation: &mut Operation, status: u16, answers: &[Answer]) {
        let listed: Vec<String> = answers
            .iter()
            .map(|answer| format!("- `{}`: {}", answer.example.code, answer.when))
            .collect();
        let description = format!(
            "Answered by the idempotency layer, as `{}`:\n\n{}",
            Problem::CONTENT_TYPE,
            listed.join("\n")
        );
        let mut examples: BTreeMap<String, RefOr<Example>> = BTreeMap::new();
        for answer in answers {
            let name = if examples.contains_key(&answer.example.code) {
                format!("{}_{}", answer.example.code, examples.len() + 1)
            } else {
                answer.example.code.clone()
            };
            let value = serde_json::to_value(&answer.example).unwrap_or(Value::Null);
            let example = Example::builder()
                .summary(answer.example.title.clone())
                .value(Some(value))
                .build();
            examples.insert(name, RefOr::T(example));
        }
        let retrying: Vec<&str> = answers
            .iter()
            .filter(|answer| answer.retry_after)
            .map(|answer| answer.example.code.as_str())
            .collect();

        let response = operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(Response::new("")));
        let RefOr::T(response) = response else {
            return;
        };
        response.description = if response.description.is_empty() {
            description
        } else {
            format!("{}\n\n{description}", response.description)
        };
        let content = response
            .content
            .entry(Problem::CONTENT_TYPE.to_owned())
            .or_insert_with(|| RefOr::T(Content::new(None::<RefOr<Schema>>)));
        if let RefOr::T(content) = content {
            if content.schema.is_none() {
                content.schema = Some(RefOr::Ref(Ref::from_schema_name(Problem::name())));
            }
            if content.example.is_none() {
                content.examples.extend(examples);
            }
        }
        if !retrying.is_empty() {
            let header = Header::builder()
                .schema(Some(integer(1)))
                .description(Some(format!(
                    "Seconds to wait before retrying with the same key (with `{}`).",
                    retrying.join("`, `")
                )))
                .build();
            response
                .headers
                .entry("Retry-After".to_owned())
                .or_insert(RefOr::T(header));
        }
        let (name, header) = self.request_id_header();
        response.headers.entry(name).or_insert(RefOr::T(header));
    }

    /// The problems the layer answers itself, by status, in the order of
    /// [`Situation::ALL`].
    fn answers(&self) -> BTreeMap<u16, Vec<Answer>> {
        let layer = &self.layer;
        let problems = layer.problems();
        let config = layer.store().config();
        let key_header = problems.key_header();
        let key: IdempotencyKey = EXAMPLE_KEY.parse().expect("a UUID v4");
        let first_used = "2026-05-14T14:32:01Z".parse().expect("a time");
        let retry_after = config.retry_after();
        let window = human_duration(config.ttl());
        let mut answers: BTreeMap<u16, Vec<Answer>> = BTreeMap::new();
        for situation in Situation::ALL {
            let (example, when, retry) = match situation {
                Situation::Conflict => (
                    problems.conflict(&key, first_used, Some("req_01HZK2MB7R3W5V8KXQ2C9D4EFA")),
                    format!(
                        "the key was used in the last {window} with another request (method, \
                         path and query string, or body)"
                    ),
                    false,
                ),
                Situation::InFlight => (
                    problems.in_flight(&key, retry_after),
                    "a request with the key is still being processed; retry after \
                     `Retry-After` seconds to get its response"
                        .to_owned(),
                    true,
                ),
                Situation::KeyMissing if layer.is_key_required() => (
                    problems.key_missing(),
                    format!("the request has no `{key_header}` header"),
                    false,
                ),
                Situation::KeyMissing => continue,
                Situation::KeyInvalid => {
                    let policy = config.key_policy();
                    let reason = IdempotencyKey::parse("not a key", policy)
                        .err()
                        .map(|error| error.to_string())
                        .unwrap_or_default();
                    (
                        problems.key_invalid(&reason),
                        format!(
                            "the `{key_header}` header is not a valid key (one is {}), or \
                             the request carries more than one",
                            key_rule(policy)
                        ),
                        false,
                    )
                }
                Situation::ScopeInvalid => {
                    let reason = Scope::new("").err().map(|e| e.to_string());
                    (
                        problems.scope_invalid(&reason.unwrap_or_default()),
                        "the request's idempotency scope (its account, say) is not valid"
                            .to_owned(),
                        false,
                    )
                }
                Situation::InvalidRequest => (
                    problems
                        .invalid_request(None, "The request body could not be read completely."),
                    "the request body could not be read (the client broke off)".to_owned(),
                    false,
                ),
                Situation::PayloadTooLarge => (
                    problems.payload_too_large(layer.body_limit()),
                    format!(
                        "the request body is larger than {} bytes; nothing was done and the key \
                         is still free",
                        layer.body_limit()
                    ),
                    false,
                ),
                Situation::InternalError => (
                    problems.internal_error(),
                    "the server failed (a handler panicked, or its response could not be \
                     stored); nothing was stored and a retry with the same key is safe"
                        .to_owned(),
                    false,
                ),
                Situation::ServiceUnavailable => (
                    problems.service_unavailable(retry_after),
                    "the server is short of database connections or of memory for request \
                     bodies, the database could not be reached, or the outcome of a commit \
                     stayed unknown; retry with the same key after `Retry-After` seconds: \
                     the retry gets the stored response if the request was done, and runs \
                     it otherwise"
                        .to_owned(),
                    true,
                ),
                Situation::NotCommitted => (
                    problems.not_committed(),
                    "the database connection broke while the request was being committed and \
                     the server verified that nothing was; retry with the same key at once"
                        .to_owned(),
                    false,
                ),
            };
            answers.entry(example.status).or_default().push(Answer {
                example: example.with_request_id(EXAMPLE_REQUEST_ID),
                when,
                retry_after: retry,
            });
        }
        answers
    }

    /// The key header parameter.
    fn key_parameter(&self) -> Parameter {
        let header = self.layer.problems().key_header();
        let policy = self.layer.store().config().key_policy();
        let schema = match policy {
            KeyPolicy::UuidV4 => Object::builder()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::Custom("uuid".to_owned())))
                .build(),
            KeyPolicy::Opaque => Object::builder()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some("^[\\x21-\\x7E]+$"))
                .build(),
        };
        let replayed = title_case(self.layer.dialect().replayed_header());
        let conflict = self.layer.dialect().catalogue().kind(Situation::Conflict);
        let mut description = String::new();
        if !self.layer.is_key_required() {
            description.push_str(
                "Optional: without it the request runs as it is, with no protection against \
                 running twice. ",
            );
        }
        description.push_str(&format!(
            "Makes the request idempotent. Send a fresh key, {}, for each operation, and the \
             same key with every retry of it; a bare key and a quoted Structured Field String \
             (`\"...\"`) are the same key. A retry with the same key and the same request \
             (method, path and query string, body) gets the stored response, marked \
             `{replayed}: true`; another request with the key gets {} `{}`. {}",
            key_rule(policy),
            conflict.status,
            conflict.code,
            self.expiry(),
        ));
        Parameter::builder()
            .name(header)
            .parameter_in(ParameterIn::Header)
            .required(if self.layer.is_key_required() {
                Required::True
            } else {
                Required::False
            })
            .description(Some(description))
            .schema(Some(schema))
            .example(Some(json!(EXAMPLE_KEY)))
            .build()
    }

    /// The replay headers of a stored response, by name.
    fn replay_headers(&self) -> [(String, Header); 3] {
        let dialect = self.layer.dialect();
        let cap = self.layer.store().config().stored_body_cap();
        let request_id = title_case(self.layer.request_id_header());
        let string = |values: &[&str]| -> RefOr<Schema> {
            let object = Object::builder().schema_type(Type::String);
            let object = if values.is_empty() {
                object
            } else {
                object.enum_values(Some(values.iter().copied()))
            };
            RefOr::T(Schema::Object(object.build()))
        };
        let header = |values: &[&str], description: String| {
            Header::builder()
                .schema(Some(string(values)))
                .description(Some(description))
                .build()
        };
        [
            (
                title_case(dialect.replayed_header()),
                header(
                    &["true"],
                    "Present on a replay: the stored response of an earlier request with the \
                     same key and the same request, sent again."
                        .to_owned(),
                ),
            ),
            (
                title_case(dialect.replay_of_header()),
                header(
                    &[],
                    format!(
                        "On a replay: the {request_id} of the request whose response this is \
                         (absent for a response stored without one)."
                    ),
                ),
            ),
            (
                title_case(dialect.replay_header()),
                header(
                    &["omitted"],
                    format!(
                        "On a replay whose original body was longer than {cap} bytes and was \
                         not stored: the body is empty, status and headers are the original's."
                    ),
                ),
            ),
        ]
    }

    /// The request id header, by name.
    fn request_id_header(&self) -> (String, Header) {
        let header = Header::builder()
            .schema(Some(Schema::Object(
                Object::builder().schema_type(Type::String).build(),
            )))
            .description(Some(
                "The request's id (problems carry it in `request_id`); a replay has its own."
                    .to_owned(),
            ))
            .build();
        (title_case(self.layer.request_id_header()), header)
    }

    /// The expiry, in words.
    fn expiry(&self) -> String {
        let ttl = self.layer.store().config().ttl();
        format!(
            "A stored response is replayed for {} ({} seconds) from the first request with \
             the key; after that the key counts as unused and a request with it runs again.",
            human_duration(ttl),
            seconds(ttl)
        )
    }

    /// The paragraph added to the operation's description.
    fn note(&self) -> String {
        let header = self.layer.problems().key_header();
        let required = if self.layer.is_key_required() {
            "required"
        } else {
            "optional"
        };
        let replayed = title_case(self.layer.dialect().replayed_header());
        format!(
            "**Idempotent** with `{header}` ({required}): a retry with the same key and the \
             same request gets the stored response, marked `{replayed}: true`. {}",
            self.expiry()
        )
    }

    /// The `x-idempotency` extension.
    fn extension(&self) -> Value {
        let layer = &self.layer;
        let config = layer.store().config();
        let dialect = layer.dialect();
        let not_stored = (100..=599_u16)
            .filter(|status| !config.store_policy().stores(*status))
            .fold(Vec::<(u16, u16)>::new(), |mut ranges, status| {
                match ranges.last_mut() {
                    Some((_, end)) if *end + 1 == status => *end = status,
                    _ => ranges.push((status, status)),
                }
                ranges
            })
            .into_iter()
            .map(|(start, end)| match start == end {
                true => start.to_string(),
                false => format!("{start}-{end}"),
            })
            .collect::<Vec<_>>();
        json!({
            "key_header": layer.problems().key_header(),
            "key_required": layer.is_key_required(),
            "key_format": match config.key_policy() {
                KeyPolicy::UuidV4 => "uuid-v4",
                KeyPolicy::Opaque => "opaque",
            },
            "expires_after_seconds": seconds(config.ttl()),
            "expiry": self.expiry(),
            "fingerprint": ["method", "path", "query", "body"],
            "not_stored_statuses": not_stored,
            "stored_body_cap": config.stored_body_cap(),
            "body_limit": layer.body_limit(),
            "replay_headers": {
                "replayed": title_case(dialect.replayed_header()),
                "replay_of": title_case(dialect.replay_of_header()),
                "body_omitted": title_case(dialect.replay_header()),
            },
        })
    }
}

impl Modify for IdempotencyPolicy {
    /// [`IdempotencyPolicy::apply`].
    fn modify(&self, openapi: &mut OpenApi) {
        self.apply(openapi);
    }
}

/// One of the layer's own answers: an example of it, when it is given, and whether it
/// carries `Retry-After`.
struct Answer {
    example: Problem,
    when: String,
    retry_after: bool,
}

/// The schema of a [`Problem`]: an object with exactly the fields `type`, `title`,
/// `status`, `detail`, `code`, `advice_code`, `param` and `request_id` (the last two may
/// be `null`), all of them always present.
impl PartialSchema for Problem {
    fn schema() -> RefOr<Schema> {
        let string = |description: &str| {
            Object::builder()
                .schema_type(Type::String)
                .description(Some(description))
                .build()
        };
        let nullable = |description: &str| {
            Object::builder()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .description(Some(description))
                .build()
        };
        let fields = [
            (
                "type",
                Object::builder()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::Custom("uri-reference".to_owned())))
                    .description(Some("A URI reference naming the problem type."))
                    .build(),
            ),
            (
                "title",
                string("A short, human-readable summary of the problem type."),
            ),
            (
                "status",
                Object::builder()
                    .schema_type(Type::Integer)
                    .minimum(Some(100))
                    .maximum(Some(999))
                    .description(Some("The HTTP status code."))
                    .build(),
            ),
            (
                "detail",
                string("A human-readable explanation of this occurrence."),
            ),
            (
                "code",
                string("A stable, machine-readable error code, e.g. `idempotency_conflict`."),
            ),
            (
                "advice_code",
                string("A stable, machine-readable hint of what the client should do."),
            ),
            (
                "param",
                nullable("The request parameter (header or field) at fault, if any."),
            ),
            (
                "request_id",
                nullable("The identifier of the request, for support."),
            ),
        ];
        let mut object = Object::builder()
            .schema_type(Type::Object)
            .description(Some(
                "A problem details object (RFC 9457), served as `application/problem+json`.",
            ))
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
        for (name, schema) in fields {
            object = object.property(name, schema).required(name);
        }
        RefOr::T(Schema::Object(object.build()))
    }
}

/// Named `Problem` in a document's schema components.
impl ToSchema for Problem {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Problem")
    }
}

/// The operations of a path item, with their methods.
fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    let query = Method::from_bytes(b"QUERY").ok();
    let fixed = [
        (Some(Method::GET), &mut item.get),
        (Some(Method::PUT), &mut item.put),
        (Some(Method::POST), &mut item.post),
        (Some(Method::DELETE), &mut item.delete),
        (Some(Method::OPTIONS), &mut item.options),
        (Some(Method::HEAD), &mut item.head),
        (Some(Method::PATCH), &mut item.patch),
        (Some(Method::TRACE), &mut item.trace),
        (query, &mut item.query),
    ];
    let fixed = fixed
        .into_iter()
        .filter_map(|(method, operation)| Some((method?, operation.as_mut()?)));
    let additional = item
        .additional_operations
        .iter_mut()
        .filter_map(|(name, operation)| {
            Some((Method::from_bytes(name.as_bytes()).ok()?, operation))
        });
    fixed.chain(additional)
}

/// A status that stands for a response key: `201` → 201, `2XX` → 200, `default` → none.
fn representative_status(key: &str) -> Option<u16> {
    match key.as_bytes() {
        [digit @ b'1'..=b'5', b'X' | b'x', b'X' | b'x'] => Some(u16::from(digit - b'0') * 100),
        _ => key.parse().ok(),
    }
}

/// What a key is under `policy`, in words.
fn key_rule(policy: KeyPolicy) -> &'static str {
    match policy {
        KeyPolicy::UuidV4 => "a random UUID v4 in the 36-character hyphenated form",
        KeyPolicy::Opaque => "1 to 255 visible ASCII characters (0x21 to 0x7E), case-sensitive",
    }
}

/// An integer schema with a minimum.
fn integer(minimum: i64) -> Schema {
    Schema::Object(
        Object::builder()
            .schema_type(Type::Integer)
            .minimum(Some(minimum))
            .build(),
    )
}

/// `duration` in seconds: whole when it is whole.
fn seconds(duration: Duration) -> Value {
    match duration.subsec_nanos() {
        0 => json!(duration.as_secs()),
        _ => json!(duration.as_secs_f64()),
    }
}

/// `duration` in the largest unit that divides it: `24 hours`, `90 minutes`, `3 days`.
/// Whole days only from two days on, so that the default reads `24 hours`.
fn human_duration(duration: Duration) -> String {
    let plural = |n: u128, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if duration.subsec_nanos() != 0 || duration.is_zero() {
        return plural(duration.as_millis(), "millisecond");
    }
    let secs = u128::from(duration.as_secs());
    if secs % 86_400 == 0 && secs >= 2 * 86_400 {
        return plural(secs / 86_400, "day");
    }
    for (unit, length) in [("hour", 3_600), ("minute", 60)] {
        if secs % length == 0 {
            return plural(secs / length, unit);
        }
    }
    plural(secs, "second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_words() {
        let words = |secs| human_duration(Duration::from_secs(secs));
        assert_eq!(words(86_400), "24 hours");
        assert_eq!(words(172_800), "2 days");
        assert_eq!(words(3_600), "1 hour");
        assert_eq!(words(5_400), "90 minutes");
        assert_eq!(words(61), "61 seconds");
        assert_eq!(words(1), "1 second");
        assert_eq!(
            human_duration(Duration::from_millis(1500)),
            "1500 milliseconds"
        );
        assert_eq!(seconds(Duration::from_secs(86_400)), json!(86_400));
        assert_eq!(seconds(Duration::from_millis(1500)), json!(1.5));
    }

    #[test]
    fn response_keys_stand_for_statuses() {
        assert_eq!(representative_status("201"), Some(201));
        assert_eq!(representative_status("2XX"), Some(200));
        assert_eq!(representative_status("4xx"), Some(400));
        assert_eq!(representative_status("default"), None);
        assert_eq!(representative_status("9XX"), None);
    }

    #[test]
    fn header_names_are_title_cased() {
        let name = http::HeaderName::from_static("idempotent-replay-of");
        assert_eq!(title_case(&name), "Idempotent-Replay-Of");
    }
}
