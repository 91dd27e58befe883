//! The REST API under `/api/v1`: every route authenticated (fail closed), persona-scoped,
//! rate-limited and audited by one guard; errors are RFC 7807 problem documents; the OpenAPI
//! document is generated from the handlers.

pub mod catalog;
pub mod handlers;
pub mod keys;
pub mod problem;

use crate::audit::{AuditEvent, Status};
use crate::identity::{self, Identity};
use crate::limits::{Class, Decision};
use crate::state::{AppState, Loaded};
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use http::{HeaderValue, Method, StatusCode};
use problem::Problem;
use std::sync::Arc;
use std::time::Instant;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The route whose tool-call limit the guard decides.
const TOOL_CALL_ROUTE: &str = "/api/v1/admin/tools/call";

/// POST routes that only read (they take a body), so they do not spend the write budget.
const READ_ONLY_POSTS: [&str; 2] = ["/api/v1/prompts/{name}/render", "/api/v1/completions"];

/// The authenticated caller, for handlers.
#[derive(Clone)]
pub struct Caller {
    /// Who.
    pub identity: Identity,
    /// The snapshot this request runs on, start to finish.
    pub loaded: Arc<Loaded>,
}

/// What a handler adds to the request's audit event.
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    /// Tool called.
    pub tool: Option<String>,
    /// Connection that served it.
    pub connection: Option<String>,
    /// Outcome, when not derived from the HTTP status.
    pub status: Option<Status>,
    /// Error code.
    pub error_code: Option<String>,
    /// Why it failed.
    pub detail: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Portcullis API",
        description = "Governed access to tools for agents and automation. Authenticate with an API key in `X-API-Key` or `Authorization: Bearer`. Errors are RFC 7807 problem documents.",
        license(name = "Apache-2.0")
    ),
    modifiers(&SecurityAddon),
    security(("api_key" = []), ("bearer" = [])),
    tags(
        (name = "portal", description = "The caller's own view"),
        (name = "admin", description = "Tool catalog and execution, connections, audit"),
        (name = "resources", description = "MCP resources of the connections this persona reaches"),
        (name = "prompts", description = "MCP prompts and argument completion")
    )
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The `/api/v1` routes and their OpenAPI document.
pub fn router(state: AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(handlers::me))
        .routes(routes!(handlers::list_tools))
        .routes(routes!(handlers::tool_schemas))
        .routes(routes!(handlers::call_tool))
        .routes(routes!(handlers::list_connections))
        .routes(routes!(handlers::audit_events))
        .routes(routes!(handlers::audit_overview))
        .routes(routes!(handlers::config_changelog))
        .routes(routes!(catalog::list_resources))
        .routes(routes!(catalog::list_templates))
        .routes(routes!(catalog::get_resource))
        .routes(routes!(catalog::resource_content))
        .routes(routes!(catalog::list_prompts))
        .routes(routes!(catalog::get_prompt))
        .routes(routes!(catalog::render_prompt))
        .routes(routes!(catalog::complete))
        .routes(routes!(keys::create_key, keys::list_keys))
        .routes(routes!(keys::revoke_key))
        .routes(routes!(keys::rotate_key))
        .routes(routes!(keys::create_client, keys::list_clients))
        .routes(routes!(keys::delete_client))
        .split_for_parts();
    let router = router
        .fallback(handlers::unknown_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(middleware::from_fn_with_state(state, guard));
    (router, openapi)
}

fn rate_limit_headers(response: &mut Response, decisions: &[(Class, Decision)]) {
    if decisions.is_empty() {
        return;
    }
    let policy =
        decisions.iter().map(|(c, d)| format!("\"{}\";q={};w=60", c.name(), d.limit)).collect::<Vec<_>>().join(", ");
    let state = decisions
        .iter()
        .map(|(c, d)| format!("\"{}\";r={};t={}", c.name(), d.remaining, d.reset_seconds))
        .collect::<Vec<_>>()
        .join(", ");
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
}

fn status_of(code: StatusCode) -> Status {
    match code.as_u16() {
        200..=399 => Status::Ok,
        401 | 403 => Status::Denied,
        429 => Status::Throttled,
        400 | 405 | 406 | 411 | 413 | 415 | 422 => Status::Invalid,
        _ => Status::Error,
    }
}

/// Authentication, audit capacity, rate limits and the audit event of every REST request.
async fn guard(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let operation =
        format!("{} {}", request.method(), route.clone().unwrap_or_else(|| request.uri().path().to_string()));
    let mut event = AuditEvent::new("", "rest", operation, &crate::http_context::request_id(), Utc::now());
    let mut decisions = Vec::new();
    let (headers, method) = (request.headers().clone(), request.method().clone());
    let response = match admit(&app, &headers, &method, route.as_deref(), &mut event, &mut decisions).await {
        Err(problem) => problem.into_response(),
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
    };
    let mut response = response;
    rate_limit_headers(&mut response, &decisions);
    if event.status == Status::Ok {
        event.status = status_of(response.status());
        if event.status != Status::Ok {
            event.error_code = Some(response.status().as_u16().to_string());
        }
    }
    if let Some(note) = response.extensions_mut().remove::<AuditNote>() {
        event.tool = note.tool.or(event.tool);
        event.connection = note.connection.or(event.connection);
        event.status = note.status.unwrap_or(event.status);
        event.error_code = note.error_code.or(event.error_code);
        event.detail = note.detail.or(event.detail);
    }
    event.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if app.audit.record(event).await.is_err() {
        return Problem::unavailable("the audit log is unavailable").into_response();
    }
    response
}

async fn admit(
    app: &AppState,
    headers: &http::HeaderMap,
    method: &Method,
    route: Option<&str>,
    event: &mut AuditEvent,
    decisions: &mut Vec<(Class, Decision)>,
) -> Result<Caller, Problem> {
    let Some(loaded) = app.current() else {
        event.status = Status::Error;
        return Err(Problem::unavailable("the gateway has no configuration loaded yet"));
    };
    let identity =
        identity::authenticate(headers, &loaded.snapshot, app.credentials(), identity::Target::default(), Utc::now())
            .await
            .map_err(|error| {
                event.status = Status::Denied;
                event.error_code = Some(error.status().as_u16().to_string());
                event.detail = Some(error.reason().into());
                event.auth_method = Some(identity::auth_method_of(headers).into());
                // Like MCP's URL, the tenant a request names gets its refusals in its audit log.
                if let Some(named) = headers.get(identity::TENANT_HEADER).and_then(|v| v.to_str().ok())
                    && loaded.snapshot.tenant(named).is_some()
                {
                    event.tenant = named.to_string();
                }
                Problem::from_auth(error)
            })?;
    event.tenant = identity.tenant.clone();
    event.subject = Some(identity.subject.clone());
    event.persona = Some(identity.persona.clone());
    event.auth_method = Some(identity.method.into());
    if !app.audit.has_capacity() {
        event.status = Status::Error;
        return Err(Problem::unavailable("the audit log is not keeping up; retry shortly"));
    }
    let limits = &loaded.snapshot.tenants[&identity.tenant].personas[&identity.persona].limits;
    let mut classes = vec![(Class::Requests, limits.requests_per_minute)];
    let read_only = route.is_some_and(|r| READ_ONLY_POSTS.contains(&r));
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) && !read_only {
        classes.push((Class::Writes, limits.writes_per_minute));
    }
    // Decided here with the others, in the same round trip, rather than in the handler.
    if route == Some(TOOL_CALL_ROUTE) {
        classes.push((Class::ToolCalls, limits.tool_calls_per_minute));
    }
    let Ok(decided) = app.limits.check_many(&identity.tenant, &identity.subject, &classes).await else {
        event.status = Status::Error;
        event.detail = Some("rate limiter unavailable".into());
        return Err(Problem::unavailable("rate limiting is unavailable, so requests are refused; retry shortly"));
    };
    *decisions = decided;
    if let Some((class, decision)) = crate::limits::first_refusal(decisions) {
        event.status = Status::Throttled;
        event.error_code = Some("429".into());
        return Err(Problem::throttled(&decision, class.name()));
    }
    Ok(Caller { identity, loaded })
}
