//! Where a request's dedupe scope comes from.

use http::HeaderName;
use http::request::Parts;

use crate::problem::{Problem, Problems};
use crate::scope::{Scope, ScopeError};

/// Why the application's scope function refused a request.
///
/// The scope function (given to [`IdempotencyLayer::new`](super::IdempotencyLayer::new))
/// may return any error that converts into this: a [`ScopeError`] (answered 400
/// `idempotency_scope_invalid`) or a whole [`Problem`] (answered as it is, e.g. a 401
/// when the request carries no credentials).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ScopeRejection {
    /// The scope taken from the request is not valid: answered with a 400
    /// `idempotency_scope_invalid` problem.
    Invalid {
        /// Why, for the client (the problem's `detail`).
        reason: String,
        /// The header or field the scope came from (the problem's `param`).
        param: Option<String>,
    },
    /// Answered with this problem (its `request_id` is filled in).
    Problem(Box<Problem>),
}

impl ScopeRejection {
    /// An invalid scope, for the reason given.
    pub fn invalid(reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            reason: reason.to_string(),
            param: None,
        }
    }

    /// Names the header or field at fault (no effect on [`ScopeRejection::Problem`]).
    #[must_use]
    pub fn with_param(self, name: impl Into<String>) -> Self {
        match self {
            Self::Invalid { reason, .. } => Self::Invalid {
                reason,
                param: Some(name.into()),
            },
            other => other,
        }
    }

    /// The problem to answer with.
    pub(crate) fn into_problem(self, problems: &Problems) -> Problem {
        match self {
            Self::Invalid { reason, param } => {
                let problem = problems.scope_invalid(&reason);
                match param {
                    Some(param) => problem.with_param(param),
                    None => problem,
                }
            }
            Self::Problem(problem) => *problem,
        }
    }
}

impl From<ScopeError> for ScopeRejection {
    fn from(error: ScopeError) -> Self {
        Self::invalid(error)
    }
}

impl From<Problem> for ScopeRejection {
    fn from(problem: Problem) -> Self {
        Self::Problem(Box::new(problem))
    }
}

/// A scope function that reads the scope from a request header, with a fallback scope
/// when the header is absent (or a 400 when `default` is `None`).
///
/// A value that is not a valid [`Scope`] (not UTF-8, control characters, surrounding
/// whitespace, more than 255 bytes), or a header sent twice, is answered with a 400
/// `idempotency_scope_invalid` problem naming the header in `param`.
///
/// Only use this when the header is set by something the server trusts (an
/// authenticating proxy): the scope is what keeps one client's keys and responses apart
/// from another's. Scopes taken from authentication usually come from the request's
/// extensions instead.
///
/// ```
/// use http::HeaderName;
/// use pg_idempotency::Scope;
/// use pg_idempotency::axum::scope_from_header;
///
/// let scope = scope_from_header(
///     HeaderName::from_static("x-account-id"),
///     Some(Scope::new("default").unwrap()),
/// );
/// let (parts, ()) = http::Request::new(()).into_parts();
/// assert_eq!(scope(&parts).unwrap().as_str(), "default");
/// ```
pub fn scope_from_header(
    name: HeaderName,
    default: Option<Scope>,
) -> impl Fn(&Parts) -> Result<Scope, ScopeRejection> + Clone + Send + Sync + 'static {
    let display = title_case(&name);
    move |parts: &Parts| {
        let mut values = parts.headers.get_all(&name).iter();
        match (values.next(), values.next(), &default) {
            (None, _, Some(default)) => Ok(default.clone()),
            (None, _, None) => Err(ScopeRejection::invalid(format!(
                "this request requires an {display} header"
            ))
            .with_param(display.clone())),
            (Some(_), Some(_), _) => Err(ScopeRejection::invalid(format!(
                "the {display} header appears more than once; send it once"
            ))
            .with_param(display.clone())),
            (Some(value), None, _) => Scope::from_bytes(value.as_bytes())
                .map_err(|error| ScopeRejection::from(error).with_param(display.clone())),
        }
    }
}

/// `x-account-id` → `X-Account-Id`, for messages and `param`.
pub(crate) fn title_case(name: &HeaderName) -> String {
    let mut out = String::with_capacity(name.as_str().len());
    let mut upper = true;
    for c in name.as_str().chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemKind;

    fn parts(values: &[&[u8]]) -> Parts {
        let mut request = http::Request::new(());
        for value in values {
            request.headers_mut().append(
                "x-account-id",
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        request.into_parts().0
    }

    fn param(rejection: ScopeRejection) -> Option<String> {
        match rejection {
            ScopeRejection::Invalid { param, .. } => param,
            ScopeRejection::Problem(_) => panic!("not an invalid scope"),
        }
    }

    #[test]
    fn title_cases_header_names() {
        assert_eq!(
            title_case(&HeaderName::from_static("idempotency-key")),
            "Idempotency-Key"
        );
        assert_eq!(
            title_case(&HeaderName::from_static("x-account-id")),
            "X-Account-Id"
        );
        assert_eq!(title_case(&HeaderName::from_static("a--b")), "A--B");
    }

    #[test]
    fn header_scope() {
        let name = HeaderName::from_static("x-account-id");
        let with_default = scope_from_header(name.clone(), Some(Scope::new("d").unwrap()));
        let without = scope_from_header(name, None);
        assert_eq!(with_default(&parts(&[])).unwrap().as_str(), "d");
        assert_eq!(
            with_default(&parts(&[b"acct_1"])).unwrap().as_str(),
            "acct_1"
        );
        assert_eq!(
            param(without(&parts(&[])).unwrap_err()).as_deref(),
            Some("X-Account-Id")
        );
        // Control characters reach the server as a tab or a C1 control in UTF-8.
        let c1 = "a\u{85}b";
        for bad in [
            &[&b"a\tb"[..]][..],
            &[c1.as_bytes()],
            &[b"\xff\xfe"],
            &[b" a"],
            &[b"a", b"b"],
        ] {
            let err = with_default(&parts(bad)).unwrap_err();
            assert_eq!(param(err).as_deref(), Some("X-Account-Id"), "{bad:?}");
        }
        let long = "a".repeat(256);
        assert!(with_default(&parts(&[long.as_bytes()])).is_err());
    }

    #[test]
    fn rejections_become_problems() {
        let problems = Problems::new("/p/");
        let problem = ScopeRejection::from(ScopeError::Empty)
            .with_param("X-Tenant")
            .into_problem(&problems);
        assert_eq!(problem.status, 400);
        assert_eq!(problem.code, "idempotency_scope_invalid");
        assert_eq!(problem.param.as_deref(), Some("X-Tenant"));
        let unauthorized = ProblemKind {
            slug: "unauthorized",
            status: 401,
            title: "t",
            code: "unauthorized",
            advice_code: "log_in",
        };
        let own = problems.custom(&unauthorized, "d");
        let problem = ScopeRejection::from(own.clone())
            .with_param("x")
            .into_problem(&problems);
        assert_eq!(problem, own);
    }
}
