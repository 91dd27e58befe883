//! REST handlers. Each sees only what the caller's persona may see.

use super::problem::Problem;
use super::{AuditNote, Caller};
use crate::audit::{AuditEvent, AuditFilter, AuditPage, Overview, Status};
use crate::connectors::ConnectionHealth;
use crate::idempotency::{Begin, StoredResponse};
use crate::policy::{self, ExposedTool};
use crate::state::AppState;
use crate::tool_call;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use http::StatusCode;
use portcullis_crds::kinds::Limits;
use portcullis_crds::snapshot::{CompiledPersona, Tenant};
use portcullis_store::config_store::{self, ChangelogEntry};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

type ApiResult<T> = Result<Json<T>, Problem>;

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Problem> {
    q.map(|Query(q)| q).map_err(|e| Problem::bad_request(format!("invalid query parameters: {}", e.body_text())))
}

/// Refuses callers whose persona is not an admin persona.
pub(super) fn require_admin(caller: &Caller) -> Result<(), Problem> {
    let (_, persona) = scope(caller);
    if persona.admin {
        Ok(())
    } else {
        Err(Problem::forbidden(format!("persona {:?} is not an admin persona", persona.name)))
    }
}

pub(super) fn scope(caller: &Caller) -> (&Tenant, &CompiledPersona) {
    let tenant = &caller.loaded.snapshot.tenants[&caller.identity.tenant];
    (tenant, &tenant.personas[&caller.identity.persona])
}

/// Every connection the caller's persona reaches, by canonical names.
pub(super) fn tenant_scope(caller: &Caller) -> policy::Scope<'_> {
    let (tenant, persona) = scope(caller);
    policy::Scope::tenant(&caller.identity.tenant, tenant, persona)
}

/// The persona's tools as lists show them: without those of unreachable upstreams.
async fn listed_tools(app: &AppState, caller: &Caller) -> Vec<ExposedTool> {
    policy::available(tenant_scope(caller).tools(&app.upstreams).await)
}

/// An MCP endpoint the caller may use.
#[derive(Serialize, ToSchema)]
pub struct EndpointRef {
    /// Endpoint name.
    pub name: String,
    /// Path MCP clients connect to.
    pub url: String,
}

/// The caller as Portcullis sees it.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// Tenant (namespace).
    pub tenant: String,
    /// Subject, e.g. `apikey:ci-bot`.
    pub subject: String,
    /// Persona in effect.
    pub persona: String,
    /// How the caller authenticated.
    pub auth_method: String,
    /// Public id of the key used.
    pub key_id: Option<String>,
    /// Whether the persona may administer the tenant.
    pub admin: bool,
    /// The persona's limits.
    #[schema(value_type = Object)]
    pub limits: Limits,
    /// MCP endpoints this persona may use.
    pub endpoints: Vec<EndpointRef>,
}

/// Who am I, as which persona, with which limits and endpoints.
#[utoipa::path(get, path = "/api/v1/portal/me", tag = "portal",
    responses((status = 200, body = Me), (status = 401, description = "No or invalid credential", content_type = "application/problem+json")))]
pub async fn me(Extension(caller): Extension<Caller>) -> ApiResult<Me> {
    let (tenant, persona) = scope(&caller);
    let endpoints = tenant
        .endpoints
        .values()
        .filter(|e| e.personas.is_match(&persona.name))
        .map(|e| EndpointRef { name: e.name.clone(), url: format!("/mcp/{}/{}", caller.identity.tenant, e.name) })
        .collect();
    Ok(Json(Me {
        tenant: caller.identity.tenant.clone(),
        subject: caller.identity.subject.clone(),
        persona: persona.name.clone(),
        auth_method: caller.identity.method.to_string(),
        key_id: caller.identity.key_id.clone(),
        admin: persona.admin,
        limits: persona.limits.clone(),
        endpoints,
    }))
}

/// Paging of list endpoints.
#[derive(Deserialize, IntoParams)]
pub struct Paging {
    /// Page number, from 1.
    #[param(minimum = 1, default = 1)]
    pub page: Option<u32>,
    /// Items per page, 1 to 500.
    #[param(minimum = 1, maximum = 500, default = 50)]
    pub per_page: Option<u32>,
}

impl Paging {
    pub(super) fn bounds(&self) -> Result<(u32, u32), Problem> {
        let page = self.page.unwrap_or(1);
        let per_page = self.per_page.unwrap_or(50);
        if page == 0 {
            return Err(Problem::bad_request("page starts at 1"));
        }
        if !(1..=500).contains(&per_page) {
            return Err(Problem::bad_request("per_page must be between 1 and 500"));
        }
        Ok((page, per_page))
    }

    pub(super) fn slice<T>(&self, items: Vec<T>) -> Result<Page<T>, Problem> {
        let (page, per_page) = self.bounds()?;
        let total = items.len();
        let start = ((page - 1) as usize).saturating_mul(per_page as usize);
        let items = items.into_iter().skip(start).take(per_page as usize).collect();
        Ok(Page { items, total, page, per_page })
    }
}

/// One page of a list.
#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    /// Items of this page.
    pub items: Vec<T>,
    /// Items in all pages.
    pub total: usize,
    /// This page, from 1.
    pub page: u32,
    /// Page size.
    pub per_page: u32,
}

/// A tool in the catalog.
#[derive(Serialize, ToSchema)]
pub struct ToolSummary {
    /// Name to call it by (`<prefix>.<tool>`).
    pub name: String,
    /// Display title.
    pub title: Option<String>,
    /// What it does.
    pub description: Option<String>,
    /// Connection that serves it.
    pub connection: String,
}

/// The tools this persona may call, sorted by name.
#[utoipa::path(get, path = "/api/v1/admin/tools", tag = "admin", params(Paging),
    responses((status = 200, body = Page<ToolSummary>), (status = 400, content_type = "application/problem+json")))]
pub async fn list_tools(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<Page<ToolSummary>> {
    let paging = query(paging)?;
    let tools = listed_tools(&app, &caller)
        .await
        .into_iter()
        .map(|t| ToolSummary {
            name: t.canonical,
            title: t.definition.title.clone(),
            description: t.definition.description.as_deref().map(str::to_string),
            connection: t.connection,
        })
        .collect();
    Ok(Json(paging.slice(tools)?))
}

/// A tool's input and output schemas.
#[derive(Serialize, ToSchema)]
pub struct ToolSchema {
    /// Tool name.
    pub name: String,
    /// JSON Schema of the arguments.
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// JSON Schema of structured results, when the tool declares one.
    #[schema(value_type = Option<Object>)]
    pub output_schema: Option<Value>,
}

/// Input and output schemas of the tools this persona may call.
#[utoipa::path(get, path = "/api/v1/admin/tools/schemas", tag = "admin", params(Paging),
    responses((status = 200, body = Page<ToolSchema>)))]
pub async fn tool_schemas(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<Page<ToolSchema>> {
    let paging = query(paging)?;
    let tools = listed_tools(&app, &caller)
        .await
        .into_iter()
        .map(|t| ToolSchema {
            name: t.canonical,
            input_schema: Value::Object((*t.definition.input_schema).clone()),
            output_schema: t.definition.output_schema.as_ref().map(|s| Value::Object((**s).clone())),
        })
        .collect();
    Ok(Json(paging.slice(tools)?))
}

/// A tool call.
#[derive(Deserialize, ToSchema)]
pub struct CallToolRequest {
    /// Tool name (`<prefix>.<tool>`).
    pub name: String,
    /// Arguments, as the tool's input schema describes.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub arguments: Option<Map<String, Value>>,
}

pub(super) fn with_note(mut response: Response, note: AuditNote) -> Response {
    response.extensions_mut().insert(note);
    response
}

pub(super) fn note_of(event: &AuditEvent) -> AuditNote {
    AuditNote {
        tool: event.tool.clone(),
        connection: event.connection.clone(),
        status: Some(event.status),
        error_code: event.error_code.clone(),
        detail: event.detail.clone(),
    }
}

/// Calls a tool. The result is the MCP `CallToolResult` (`content`, `structuredContent`,
/// `isError`); tool failures are results with `isError: true`. With `Idempotency-Key`, a retry
/// with the same key and body within 24 h returns the first response (`Idempotent-Replayed: true`)
/// instead of calling the tool again.
#[utoipa::path(post, path = "/api/v1/admin/tools/call", tag = "admin", request_body = CallToolRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: 1 to 255 visible ASCII characters, unique per request")),
    responses(
        (status = 200, description = "The tool's result", body = Object),
        (status = 400, description = "Malformed request", content_type = "application/problem+json"),
        (status = 404, description = "No such tool (or not visible to this persona)", content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still running", content_type = "application/problem+json"),
        (status = 422, description = "The upstream rejected the arguments, the Idempotency-Key was used with another body, or the tool needs what only an MCP client can declare (the tasks extension, sampling, elicitation, roots)", content_type = "application/problem+json"),
        (status = 429, description = "Tool-call rate limit", content_type = "application/problem+json"),
        (status = 502, description = "The upstream failed", content_type = "application/problem+json")))]
pub async fn call_tool(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Problem::too_large(app.settings.max_body_bytes).into_response();
        }
        Err(rejection) => {
            return Problem::bad_request(format!("cannot read the request body: {rejection}")).into_response();
        }
    };
    let (app, caller) = (&app, &caller);
    idempotent(app, caller, &headers, "tools/call", body, |body| async move { execute_call(app, caller, &body).await })
        .await
}

/// Runs `run` once per `Idempotency-Key` (scoped to the caller and `operation`): a retry with the
/// same key and body within 24 h gets the first response (`Idempotent-Replayed: true`), another
/// body a 422, a duplicate while the first runs a 409. Without the header, `run` just runs.
pub(super) async fn idempotent<F, Fut>(
    app: &AppState,
    caller: &Caller,
    headers: &http::HeaderMap,
    operation: &str,
    body: Bytes,
    run: F,
) -> Response
where
    F: FnOnce(Bytes) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..0x7f).contains(&b)) => {
            Some(k.to_string())
        }
        Some(_) => {
            return Problem::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters").into_response();
        }
    };
    let Some(key) = key else {
        return run(body).await;
    };
    // Keys are the caller's own: another subject's identical key is another request.
    let scoped = portcullis_crds::keys::digest(&format!(
        "{}\n{}\n{operation}\n{key}",
        caller.identity.tenant, caller.identity.subject
    ));
    let body_hash = portcullis_crds::keys::digest(&String::from_utf8_lossy(&body));
    match app.idempotency.begin(&scoped, &body_hash).await {
        Err(_) => Problem::unavailable("idempotency keys cannot be checked right now; retry shortly").into_response(),
        Ok(Begin::InFlight) => Problem::new(
            StatusCode::CONFLICT,
            "idempotency-in-flight",
            "Conflict",
            "a request with this Idempotency-Key is still being processed; retry after it finishes",
        )
        .into_response(),
        Ok(Begin::Mismatch) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Unprocessable Entity",
            "this Idempotency-Key was already used with a different request body; use a new key",
        )
        .into_response(),
        Ok(Begin::Replay(stored)) => {
            let mut response =
                (StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK), stored.body).into_response();
            if let Ok(v) = http::HeaderValue::from_str(&stored.content_type) {
                response.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            response.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
            with_note(response, AuditNote { detail: Some("idempotent replay".into()), ..Default::default() })
        }
        Ok(Begin::Fresh) => {
            let response = run(body.clone()).await;
            let status = response.status();
            // Transient refusals are not remembered: a retry should run.
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                let _ = app.idempotency.abandon(&scoped).await;
                return response;
            }
            let (mut parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
            let stored = StoredResponse {
                status: status.as_u16(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/json")
                    .to_string(),
                body: String::from_utf8_lossy(&bytes).to_string(),
            };
            if app.idempotency.complete(&scoped, &body_hash, stored).await.is_err() {
                tracing::warn!("Could not store an idempotent response; a retry would run again");
            }
            parts.headers.insert("idempotent-replayed", http::HeaderValue::from_static("false"));
            Response::from_parts(parts, axum::body::Body::from(bytes))
        }
    }
}

async fn execute_call(app: &AppState, caller: &Caller, body: &[u8]) -> Response {
    let request: CallToolRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => return Problem::bad_request(format!("invalid request body: {e}")).into_response(),
    };
    let persona = scope(caller).1;
    let Some(tool) = tenant_scope(caller).tool(&app.upstreams, &request.name).await else {
        let note = AuditNote { tool: Some(request.name.clone()), ..Default::default() };
        return with_note(
            Problem::not_found(format!("there is no tool named {:?}", request.name)).into_response(),
            note,
        );
    };
    let mut event = AuditEvent::new(&caller.identity.tenant, "rest", "", "", Utc::now());
    match tool_call::check_tool_rate(app.limits.as_ref(), &caller.identity, persona, &tool, &mut event).await {
        Ok(()) => {}
        Err(refusal) => {
            let problem = match refusal {
                tool_call::ToolRateRefusal::Throttled(decision) => {
                    Problem::throttled(&decision, &format!("tool-calls of {}", tool.canonical))
                }
                tool_call::ToolRateRefusal::Unavailable => {
                    Problem::unavailable("rate limiting is unavailable, so requests are refused; retry shortly")
                }
            };
            return with_note(problem.into_response(), note_of(&event));
        }
    }
    let caller_meta = crate::connectors::CallerMeta::default();
    let outcome = tool_call::call(persona, &tool, request.arguments, Map::new(), &caller_meta, &mut event).await;
    let response = match outcome {
        Ok(mut result) => {
            // `resultType` belongs to the MCP 2026-07-28 wire format, not to REST.
            if let Some(object) = result.as_object_mut() {
                object.remove("resultType");
            }
            Json(result).into_response()
        }
        Err(error) if error.code.0 == -32602 => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-arguments",
            "Unprocessable Entity",
            format!("the tool rejected the request: {}", error.message),
        )
        .into_response(),
        Err(error) if error.code.0 == -32021 => Problem::needs_mcp_client(error.data.as_ref()).into_response(),
        Err(error) => Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            "Bad Gateway",
            format!("the tool's server answered with an error: {}", error.message),
        )
        .into_response(),
    };
    with_note(response, note_of(&event))
}

/// A connection this persona can reach, with its health.
#[derive(Serialize, ToSchema)]
pub struct ConnectionView {
    /// Connection name.
    pub name: String,
    /// Prefix of its tools.
    pub prefix: String,
    /// Health as this replica observes it.
    pub health: ConnectionHealth,
}

/// Connections behind the endpoints this persona may use, with health (error details for
/// admin personas only).
#[utoipa::path(get, path = "/api/v1/admin/connections", tag = "admin", params(Paging),
    responses((status = 200, body = Page<ConnectionView>)))]
pub async fn list_connections(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<Page<ConnectionView>> {
    let paging = query(paging)?;
    let (tenant, persona) = scope(&caller);
    let views = tenant
        .connections_for(&persona.name)
        .into_iter()
        .filter_map(|c| {
            let upstream = app.upstreams.get(&caller.identity.tenant, &c.name)?;
            let mut health = upstream.health();
            // Error texts can name internal hosts: only administrators see them.
            if !persona.admin {
                health.last_error = health.last_error.map(|_| "hidden: ask an administrator".to_string());
            }
            Some(ConnectionView { name: c.name.clone(), prefix: c.prefix.clone(), health })
        })
        .collect();
    Ok(Json(paging.slice(views)?))
}

/// Filters of the audit query.
#[derive(Deserialize, IntoParams)]
pub struct AuditQuery {
    /// Events at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Events before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Exact subject, e.g. `apikey:ci-bot`.
    pub subject: Option<String>,
    /// Exact persona.
    pub persona: Option<String>,
    /// Exact tool name (`<prefix>.<tool>`).
    pub tool: Option<String>,
    /// `ok`, `error`, `denied`, `throttled` or `invalid`.
    pub status: Option<String>,
    /// Exact connection name.
    pub connection: Option<String>,
    /// Exact MCP endpoint name.
    pub endpoint: Option<String>,
    /// `api_key` (more methods arrive with OIDC and OAuth).
    pub auth_method: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 1000 (also accepted as `per_page`).
    #[param(minimum = 1, maximum = 1000, default = 50)]
    pub limit: Option<u32>,
    /// Page size, 1 to 1000.
    #[param(minimum = 1, maximum = 1000, default = 50)]
    pub per_page: Option<u32>,
    /// Page number from 1: offset paging with `total`, instead of `cursor`.
    #[param(minimum = 1)]
    pub page: Option<u32>,
}

/// The tenant's audit events, newest first (admin personas only).
#[utoipa::path(get, path = "/api/v1/admin/audit/events", tag = "admin", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, description = "Not an admin persona", content_type = "application/problem+json")))]
pub async fn audit_events(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<AuditPage> {
    require_admin(&caller)?;
    let q = query(q)?;
    if let Some(status) = &q.status
        && !["ok", "error", "denied", "throttled", "invalid"].contains(&status.as_str())
    {
        return Err(Problem::bad_request("status must be one of ok, error, denied, throttled, invalid"));
    }
    if let Some(cursor) = &q.cursor
        && !crate::audit::valid_cursor(cursor)
    {
        return Err(Problem::bad_request("cursor is not one this API issued"));
    }
    let limit = q.per_page.or(q.limit).unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request("per_page (or limit) must be between 1 and 1000"));
    }
    if q.page == Some(0) {
        return Err(Problem::bad_request("page starts at 1"));
    }
    if q.page.is_some() && q.cursor.is_some() {
        return Err(Problem::bad_request("use either page or cursor, not both"));
    }
    let filter = AuditFilter {
        from: q.from,
        to: q.to,
        subject: q.subject,
        persona: q.persona,
        tool: q.tool,
        status: q.status,
        connection: q.connection,
        endpoint: q.endpoint,
        auth_method: q.auth_method,
        cursor: q.cursor,
        page: q.page,
        limit,
    };
    let page = app.audit.query(&caller.identity.tenant, &filter).await.map_err(|error| {
        tracing::error!(?error, "Audit query failed");
        Problem::internal()
    })?;
    Ok(Json(page))
}

/// The window of the metrics overview.
#[derive(Deserialize, IntoParams)]
pub struct Window {
    /// Start (RFC 3339); defaults to one hour before `to`.
    pub from: Option<DateTime<Utc>>,
    /// End (RFC 3339); defaults to now.
    pub to: Option<DateTime<Utc>>,
}

/// Count, success rate and p50/p95/p99 latency over a window, overall and per tool (admin
/// personas only). Computed in SQL on Postgres.
#[utoipa::path(get, path = "/api/v1/admin/audit/metrics/overview", tag = "admin", params(Window),
    responses((status = 200, body = Overview), (status = 403, description = "Not an admin persona", content_type = "application/problem+json")))]
pub async fn audit_overview(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<Window>, QueryRejection>,
) -> ApiResult<Overview> {
    require_admin(&caller)?;
    let q = query(q)?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - chrono::Duration::hours(1));
    if from >= to {
        return Err(Problem::bad_request("from must be before to"));
    }
    let overview = app.audit.overview(&caller.identity.tenant, from, to).await.map_err(|error| {
        tracing::error!(?error, "Audit overview failed");
        Problem::internal()
    })?;
    Ok(Json(overview))
}

/// Published configuration versions that changed this tenant, newest first, with what changed
/// (admin personas only). Dev mode lists the versions this process loaded.
#[utoipa::path(get, path = "/api/v1/admin/config/changelog", tag = "admin", params(Paging),
    responses((status = 200, body = Page<ChangelogEntry>), (status = 403, description = "Not an admin persona", content_type = "application/problem+json")))]
pub async fn config_changelog(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<Page<ChangelogEntry>> {
    let paging = query(paging)?;
    require_admin(&caller)?;
    let tenant = &caller.identity.tenant;
    let Some(backends) = &app.backends else {
        let history = app.history.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let entries = history
            .into_iter()
            .rev()
            .map(|e| ChangelogEntry { summary: e.summary.for_tenant(tenant), ..e })
            .filter(|e| !e.summary.is_empty())
            .collect();
        return Ok(Json(paging.slice(entries)?));
    };
    let (page, per_page) = paging.bounds()?;
    let offset = i64::from(page - 1) * i64::from(per_page);
    let (items, total) =
        config_store::changelog(&backends.postgres, tenant, offset, per_page.into()).await.map_err(|error| {
            tracing::error!(%error, "Changelog query failed");
            Problem::internal()
        })?;
    Ok(Json(Page { items, total: total.try_into().unwrap_or(0), page, per_page }))
}

/// Unknown routes under `/api/v1`.
pub async fn unknown_route(uri: http::Uri) -> Response {
    with_note(
        Problem::not_found(format!("there is no API route {}; see /api/v1/openapi.json", uri.path())).into_response(),
        AuditNote { status: Some(Status::Invalid), ..Default::default() },
    )
}

/// Known routes with another method.
pub async fn method_not_allowed(method: http::Method, uri: http::Uri) -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method Not Allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}
