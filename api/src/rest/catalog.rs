//! MCP resources, prompts and completions over REST: what MCP clients reach through an
//! endpoint, for the whole tenant by canonical names (`<prefix>.<prompt>`, `<prefix>+<uri>`),
//! governed and audited like MCP. A resource's id in paths is its canonical URI in unpadded
//! base64url, since URIs do not fit in one path segment.

use super::Caller;
use super::handlers::{Page, Paging, note_of, query, scope, tenant_scope, with_note};
use super::problem::Problem;
use crate::audit::AuditEvent;
use crate::catalog_calls::{self, Failure, NotFound};
use crate::connectors::CallError;
use crate::state::AppState;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::Utc;
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

fn resource_id(canonical: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(canonical)
}

fn resource_uri(id: &str) -> Result<String, Problem> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| Problem::not_found(format!("there is no resource with id {id:?}")))
}

fn catalog_caller<'a>(app: &'a AppState, caller: &'a Caller) -> catalog_calls::Caller<'a> {
    catalog_calls::Caller { app, scope: tenant_scope(caller), persona: scope(caller).1, meta: Default::default() }
}

fn text(definition: &Value, field: &str) -> Option<String> {
    definition.get(field).and_then(Value::as_str).map(str::to_string)
}

/// The problem a failed resource, prompt or completion request answers with.
fn problem(failure: Failure) -> Problem {
    match failure {
        Failure::NotFound(NotFound::Resource(uri)) => Problem::not_found(format!("there is no resource {uri:?}")),
        Failure::NotFound(NotFound::Prompt(name)) => Problem::not_found(format!("there is no prompt named {name:?}")),
        Failure::Invalid(detail) => Problem::bad_request(detail),
        Failure::TooLarge { size, limit } => Problem::new(
            StatusCode::BAD_GATEWAY,
            "result-too-large",
            "Bad Gateway",
            format!("the result is {size} bytes, over this persona's limit of {limit} bytes (maxResultBytes)"),
        ),
        Failure::Upstream(CallError::Timeout(after)) => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "Gateway Timeout",
            format!("the upstream did not answer within {} s; the request was cancelled", after.as_secs()),
        ),
        Failure::Upstream(CallError::Unavailable(_)) => Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-unavailable",
            "Bad Gateway",
            "the upstream server is unavailable right now; try again later",
        ),
        Failure::Upstream(CallError::Rpc(error)) if error.code.0 == -32602 => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-arguments",
            "Unprocessable Entity",
            format!("the upstream rejected the request: {}", error.message),
        ),
        Failure::Upstream(CallError::Rpc(error)) if error.code.0 == -32021 => {
            Problem::needs_mcp_client(error.data.as_ref())
        }
        Failure::Upstream(CallError::Rpc(error)) => Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            "Bad Gateway",
            format!("the upstream answered with an error: {}", error.message),
        ),
    }
}

/// A resource in the catalog.
#[derive(Serialize, ToSchema)]
pub struct ResourceSummary {
    /// Id for `/api/v1/resources/{id}`: the canonical URI in unpadded base64url.
    pub id: String,
    /// Canonical URI, `<prefix>+<upstream uri>`.
    pub uri: String,
    /// Name given by the upstream.
    pub name: Option<String>,
    /// Display title.
    pub title: Option<String>,
    /// What it holds.
    pub description: Option<String>,
    /// Media type of its content.
    pub mime_type: Option<String>,
    /// Connection that serves it.
    pub connection: String,
}

/// The resources this persona may read, sorted by URI.
#[utoipa::path(get, path = "/api/v1/resources", tag = "resources", params(Paging),
    responses((status = 200, body = Page<ResourceSummary>), (status = 400, content_type = "application/problem+json")))]
pub async fn list_resources(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> Result<Json<Page<ResourceSummary>>, Problem> {
    let paging = query(paging)?;
    Ok(Json(paging.slice(summaries(&app, &caller).await)?))
}

async fn summaries(app: &AppState, caller: &Caller) -> Vec<ResourceSummary> {
    let resources = crate::policy::available(tenant_scope(caller).resources(&app.upstreams).await);
    resources
        .into_iter()
        .map(|r| {
            let definition = serde_json::to_value(&r.definition).unwrap_or_default();
            ResourceSummary {
                id: resource_id(&r.canonical),
                uri: r.canonical,
                name: text(&definition, "name"),
                title: text(&definition, "title"),
                description: text(&definition, "description"),
                mime_type: text(&definition, "mimeType"),
                connection: r.connection,
            }
        })
        .collect()
}

/// A resource template in the catalog.
#[derive(Serialize, ToSchema)]
pub struct TemplateSummary {
    /// Canonical URI template (RFC 6570), `<prefix>+<upstream template>`; expand it and read
    /// the result through `/api/v1/resources/{id}/content`.
    pub uri_template: String,
    /// Name given by the upstream.
    pub name: Option<String>,
    /// Display title.
    pub title: Option<String>,
    /// What its resources hold.
    pub description: Option<String>,
    /// Media type of their content.
    pub mime_type: Option<String>,
    /// Connection that serves it.
    pub connection: String,
}

/// The resource templates this persona may use, sorted.
#[utoipa::path(get, path = "/api/v1/resources/templates", tag = "resources", params(Paging),
    responses((status = 200, body = Page<TemplateSummary>), (status = 400, content_type = "application/problem+json")))]
pub async fn list_templates(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> Result<Json<Page<TemplateSummary>>, Problem> {
    let paging = query(paging)?;
    let templates = crate::policy::available(tenant_scope(&caller).templates(&app.upstreams).await);
    let items = templates
        .into_iter()
        .map(|t| {
            let definition = serde_json::to_value(&t.definition).unwrap_or_default();
            TemplateSummary {
                uri_template: t.canonical,
                name: text(&definition, "name"),
                title: text(&definition, "title"),
                description: text(&definition, "description"),
                mime_type: text(&definition, "mimeType"),
                connection: t.connection,
            }
        })
        .collect();
    Ok(Json(paging.slice(items)?))
}

/// One listed resource.
#[utoipa::path(get, path = "/api/v1/resources/{id}", tag = "resources",
    params(("id" = String, Path, description = "Canonical URI in unpadded base64url")),
    responses((status = 200, body = ResourceSummary), (status = 404, content_type = "application/problem+json")))]
pub async fn get_resource(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<ResourceSummary>, Problem> {
    let uri = resource_uri(&id)?;
    summaries(&app, &caller)
        .await
        .into_iter()
        .find(|r| r.uri == uri)
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("there is no resource {uri:?}")))
}

/// A resource's content with its own media type: text as is, blobs decoded. A resource that
/// comes in several parts answers `application/json` with the MCP `contents` array. Any URI the
/// persona may read works, listed or expanded from a template.
#[utoipa::path(get, path = "/api/v1/resources/{id}/content", tag = "resources",
    params(("id" = String, Path, description = "Canonical URI in unpadded base64url")),
    responses(
        (status = 200, description = "The content, with the resource's media type"),
        (status = 404, content_type = "application/problem+json"),
        (status = 502, description = "The upstream failed", content_type = "application/problem+json"),
        (status = 504, description = "The upstream did not answer in time", content_type = "application/problem+json")))]
pub async fn resource_content(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let uri = match resource_uri(&id) {
        Ok(uri) => uri,
        Err(problem) => return problem.into_response(),
    };
    let mut event = AuditEvent::new(&caller.identity.tenant, "rest", "", "", Utc::now());
    let outcome = catalog_calls::read_resource(&catalog_caller(&app, &caller), &uri, &json!({}), &mut event).await;
    let response = match outcome {
        Err(failure) => problem(failure).into_response(),
        Ok(result) => match result.get("contents").and_then(Value::as_array).map(Vec::as_slice) {
            Some([single]) => content_response(single),
            Some(_) => Json(json!({ "contents": result["contents"] })).into_response(),
            None => {
                problem(Failure::Upstream(CallError::Unavailable("a read without contents".into()))).into_response()
            }
        },
    };
    with_note(response, note_of(&event))
}

fn content_response(content: &Value) -> Response {
    let mime = content.get("mimeType").and_then(Value::as_str);
    let (body, default_type) = if let Some(text) = content.get("text").and_then(Value::as_str) {
        (Bytes::from(text.to_string()), "text/plain; charset=utf-8")
    } else if let Some(blob) = content.get("blob").and_then(Value::as_str) {
        match base64::engine::general_purpose::STANDARD.decode(blob) {
            Ok(bytes) => (Bytes::from(bytes), "application/octet-stream"),
            Err(_) => {
                return problem(Failure::Upstream(CallError::Unavailable("a blob that is not base64".into())))
                    .into_response();
            }
        }
    } else {
        return Json(content.clone()).into_response();
    };
    let content_type =
        mime.and_then(|m| HeaderValue::from_str(m).ok()).unwrap_or_else(|| HeaderValue::from_static(default_type));
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

/// A prompt in the catalog.
#[derive(Serialize, ToSchema)]
pub struct PromptSummary {
    /// Name to get it by (`<prefix>.<prompt>`).
    pub name: String,
    /// Display title.
    pub title: Option<String>,
    /// What it is for.
    pub description: Option<String>,
    /// Its arguments (`name`, `description`, `required`).
    #[schema(value_type = Vec<Object>)]
    pub arguments: Vec<Value>,
    /// Connection that serves it.
    pub connection: String,
}

async fn prompt_summaries(app: &AppState, caller: &Caller) -> Vec<PromptSummary> {
    let prompts = crate::policy::available(tenant_scope(caller).prompts(&app.upstreams).await);
    prompts
        .into_iter()
        .map(|p| {
            let definition = serde_json::to_value(&p.definition).unwrap_or_default();
            PromptSummary {
                name: p.name,
                title: text(&definition, "title"),
                description: text(&definition, "description"),
                arguments: definition.get("arguments").and_then(Value::as_array).cloned().unwrap_or_default(),
                connection: p.connection,
            }
        })
        .collect()
}

/// The prompts this persona may use, sorted by name.
#[utoipa::path(get, path = "/api/v1/prompts", tag = "prompts", params(Paging),
    responses((status = 200, body = Page<PromptSummary>), (status = 400, content_type = "application/problem+json")))]
pub async fn list_prompts(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> Result<Json<Page<PromptSummary>>, Problem> {
    let paging = query(paging)?;
    Ok(Json(paging.slice(prompt_summaries(&app, &caller).await)?))
}

/// One prompt.
#[utoipa::path(get, path = "/api/v1/prompts/{name}", tag = "prompts",
    params(("name" = String, Path, description = "`<prefix>.<prompt>`")),
    responses((status = 200, body = PromptSummary), (status = 404, content_type = "application/problem+json")))]
pub async fn get_prompt(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<PromptSummary>, Problem> {
    prompt_summaries(&app, &caller)
        .await
        .into_iter()
        .find(|p| p.name == name)
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("there is no prompt named {name:?}")))
}

/// Arguments of a prompt.
#[derive(Deserialize, ToSchema)]
pub struct RenderPrompt {
    /// Argument values by name.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
}

fn json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Problem> {
    let body = body.map_err(|e| Problem::bad_request(format!("cannot read the request body: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| Problem::bad_request(format!("invalid request body: {e}")))
}

/// Renders a prompt with arguments: the MCP `GetPromptResult` (`description`, `messages`).
#[utoipa::path(post, path = "/api/v1/prompts/{name}/render", tag = "prompts", request_body = RenderPrompt,
    params(("name" = String, Path, description = "`<prefix>.<prompt>`")),
    responses(
        (status = 200, description = "The prompt's messages", body = Object),
        (status = 400, content_type = "application/problem+json"),
        (status = 404, content_type = "application/problem+json"),
        (status = 422, description = "The upstream rejected the arguments", content_type = "application/problem+json"),
        (status = 502, content_type = "application/problem+json")))]
pub async fn render_prompt(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: RenderPrompt = match json_body(body) {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    let mut event = AuditEvent::new(&caller.identity.tenant, "rest", "", "", Utc::now());
    let params = json!({ "arguments": request.arguments });
    let response = match catalog_calls::get_prompt(&catalog_caller(&app, &caller), &name, &params, &mut event).await {
        Ok(result) => Json(strip_wire_fields(result)).into_response(),
        Err(failure) => problem(failure).into_response(),
    };
    with_note(response, note_of(&event))
}

/// A completion request, as MCP's `completion/complete` params.
#[derive(Deserialize, ToSchema)]
pub struct CompleteRequest {
    /// `{"type": "ref/prompt", "name": "<prefix>.<prompt>"}` or `{"type": "ref/resource", "uri": "<canonical template or URI>"}`.
    #[serde(rename = "ref")]
    #[schema(value_type = Object)]
    pub reference: Value,
    /// `{"name": …, "value": …}`: the argument being completed.
    #[schema(value_type = Object)]
    pub argument: Value,
    /// `{"arguments": {…}}`: values of other arguments already chosen.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
}

/// Suggests values for a prompt's or resource template's argument: `{"completion": {"values", "total", "hasMore"}}`.
#[utoipa::path(post, path = "/api/v1/completions", tag = "prompts", request_body = CompleteRequest,
    responses(
        (status = 200, description = "Suggested values", body = Object),
        (status = 400, content_type = "application/problem+json"),
        (status = 404, description = "No such prompt or resource (or not visible to this persona)", content_type = "application/problem+json"),
        (status = 502, content_type = "application/problem+json")))]
pub async fn complete(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: CompleteRequest = match json_body(body) {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    let mut params = json!({ "ref": request.reference, "argument": request.argument });
    if let Some(context) = request.context {
        params["context"] = context;
    }
    let mut event = AuditEvent::new(&caller.identity.tenant, "rest", "", "", Utc::now());
    let response = match catalog_calls::complete(&catalog_caller(&app, &caller), &params, &mut event).await {
        Ok(result) => Json(strip_wire_fields(result)).into_response(),
        Err(failure) => problem(failure).into_response(),
    };
    with_note(response, note_of(&event))
}

/// Drops what belongs to the MCP 2026-07-28 wire format, not to REST.
fn strip_wire_fields(mut result: Value) -> Value {
    if let Some(object) = result.as_object_mut() {
        for field in ["resultType", "ttlMs", "cacheScope"] {
            object.remove(field);
        }
    }
    result
}
