//! RFC 7807 problem documents: the one place HTTP errors become responses.

use crate::identity::AuthError;
use crate::limits::Decision;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde_json::json;

/// An HTTP error, answered as `application/problem+json`. Boxed: it travels in `Result`s.
#[derive(Debug)]
pub struct Problem(Box<Inner>);

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    headers: HeaderMap,
}

impl Problem {
    /// A problem of type `https://portcullis.dev/problems/<slug>`.
    pub fn new(status: StatusCode, slug: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self(Box::new(Inner { status, slug, title, detail: detail.into(), headers: HeaderMap::new() }))
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.0.headers.insert(name, value);
        }
        self
    }

    /// The refusal of an authentication decision: 401 with a challenge, 403 without a persona,
    /// 400 when the tenant must be named.
    pub fn from_auth(error: AuthError) -> Self {
        match error {
            AuthError::NoPersona => Self::forbidden(error.to_string()),
            AuthError::TenantRequired => Self::bad_request(error.to_string()),
            other => Self::unauthorized(other),
        }
    }

    /// 401 with the `WWW-Authenticate` challenge.
    pub fn unauthorized(error: AuthError) -> Self {
        let challenge = match error {
            AuthError::Missing => r#"Bearer realm="portcullis""#.to_string(),
            other => format!(r#"Bearer realm="portcullis", error="invalid_token", error_description="{other}""#),
        };
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", error.to_string())
            .with_header(header::WWW_AUTHENTICATE, &challenge)
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not Found", detail)
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", "Bad Request", detail)
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload Too Large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 429 with `Retry-After`.
    pub fn throttled(decision: &Decision, class: &str) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too Many Requests",
            format!(
                "the {class} limit of {} per minute is used up; retry after {} s",
                decision.limit, decision.retry_after_seconds
            ),
        )
        .with_header(header::RETRY_AFTER, &decision.retry_after_seconds.to_string())
    }

    /// 503.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service Unavailable", detail)
    }

    /// 422 for what needs an MCP client (`-32021`: sampling, elicitation, roots, or the tasks
    /// extension), which a REST caller cannot be: `required` names it, as the upstream did.
    pub fn needs_mcp_client(required: Option<&serde_json::Value>) -> Self {
        let required = required.and_then(|data| data.get("requiredCapabilities")).map(|r| r.to_string());
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "mcp-client-required",
            "Unprocessable Entity",
            format!(
                "this needs a client capability that only an MCP client can declare ({}); call it over MCP",
                required.as_deref().unwrap_or("not named")
            ),
        )
    }

    /// 500 without internal detail (that goes to the log with the request id).
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal Server Error",
            "something went wrong; the request id is in the log",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let problem = *self.0;
        let info = crate::http_context::current();
        let mut body = json!({
            "type": format!("https://portcullis.dev/problems/{}", problem.slug),
            "title": problem.title,
            "status": problem.status.as_u16(),
            "detail": problem.detail,
        });
        if let Some(info) = info {
            body["instance"] = json!(info.path);
            body["request_id"] = json!(info.id);
        }
        let mut response = (problem.status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response.headers_mut().extend(problem.headers);
        response
    }
}
