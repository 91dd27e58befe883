//! The MCP server at `/mcp/{namespace}/{endpoint}`, serving both protocol generations on one
//! URL: 2026-07-28 (stateless, per-request `_meta`, mirrored headers) and 2025-11-25 / 2025-06-18
//! / 2025-03-26 (initialize, `Mcp-Session-Id`, DELETE). See `README.md` beside this file.

pub mod methods;
pub mod mrtr;
pub mod protocol;
pub mod relay;
pub mod subscriptions;
pub mod tasks;

use crate::audit::{AuditEvent, Status};
use crate::identity::{self, Identity};
use crate::limits::Class;
use crate::rest::problem::Problem;
use crate::sessions::Session;
use crate::state::{AppState, Loaded};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::Utc;
use futures::FutureExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use methods::CallContext;
use portcullis_crds::snapshot::CompiledEndpoint;
use protocol::{Framing, RpcError};
use relay::Relay;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

/// Routes of the MCP server.
pub fn router() -> Router<AppState> {
    Router::new().route("/mcp/{tenant}/{endpoint}", post(post_message).get(get_stream).delete(delete_session))
}

const SESSION_HEADER: &str = "Mcp-Session-Id";
const VERSION_HEADER: &str = "MCP-Protocol-Version";

/// The parts of a request every MCP handler establishes first.
struct Admitted {
    loaded: Arc<Loaded>,
    identity: Identity,
    endpoint: String,
}

/// Origin check against DNS rebinding: browsers may call only from localhost or from origins
/// the endpoint lists. Requests without `Origin` (non-browser clients) pass.
fn origin_allowed(headers: &HeaderMap, endpoint: Option<&CompiledEndpoint>) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    let host_port = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    let Some(host_port) = host_port else { return false };
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
        || endpoint.is_some_and(|e| e.allowed_origins.iter().any(|o| o == origin))
}

/// Origin, authentication, endpoint visibility and audit capacity: everything decided before
/// the body is read. Rate limits are decided once the method is known (`limit`).
async fn admit(
    app: &AppState,
    headers: &HeaderMap,
    tenant: &str,
    endpoint: &str,
    event: &mut AuditEvent,
) -> Result<Admitted, Problem> {
    let Some(loaded) = app.current() else {
        event.status = Status::Error;
        event.detail = Some("no configuration loaded".into());
        return Err(Problem::unavailable("the gateway has no configuration loaded yet"));
    };
    let declared = loaded.snapshot.tenant(tenant).and_then(|t| t.endpoints.get(endpoint));
    if !origin_allowed(headers, declared) {
        event.status = Status::Denied;
        event.detail = Some("origin not allowed".into());
        return Err(Problem::forbidden("this Origin may not call this endpoint"));
    }
    let target = identity::Target { tenant: Some(tenant), endpoint: Some(endpoint) };
    let identity = match identity::authenticate(headers, &loaded.snapshot, app.credentials(), target, Utc::now()).await
    {
        Ok(identity) => identity,
        Err(error) => {
            event.status = Status::Denied;
            event.error_code = Some(error.status().as_u16().to_string());
            event.detail = Some(error.reason().into());
            event.auth_method = Some(identity::auth_method_of(headers).into());
            let mut problem = Problem::from_auth(error);
            // MCP clients find the authorization server from the challenge (RFC 9728 §5.1).
            if let Some(server) = app.oauth.as_deref()
                && error.status() == StatusCode::UNAUTHORIZED
            {
                let mut challenge = format!(
                    r#"Bearer resource_metadata="{}", scope="mcp""#,
                    server.resource_metadata(tenant, endpoint)
                );
                if error != identity::AuthError::Missing {
                    challenge.push_str(r#", error="invalid_token""#);
                }
                problem = problem.with_header(http::header::WWW_AUTHENTICATE, &challenge);
            }
            return Err(problem);
        }
    };
    event.subject = Some(identity.subject.clone());
    event.persona = Some(identity.persona.clone());
    event.auth_method = Some(identity.method.into());
    // Another tenant's endpoint, or one the persona may not use, does not exist for this caller.
    let visible = identity.tenant == tenant
        && loaded.snapshot.tenant(tenant).and_then(|t| t.endpoint_for(endpoint, &identity.persona)).is_some();
    if !visible {
        event.status = Status::Denied;
        event.error_code = Some("404".into());
        event.detail = Some("endpoint not found".into());
        return Err(Problem::not_found(format!("there is no MCP endpoint at /mcp/{tenant}/{endpoint}")));
    }
    if !app.audit.has_capacity() {
        event.status = Status::Error;
        event.detail = Some("audit queue full".into());
        return Err(Problem::unavailable("the audit log is not keeping up; retry shortly"));
    }
    Ok(Admitted { loaded, identity, endpoint: endpoint.to_string() })
}

/// Decides the request limit, and for `tools/call` the tool-call limit too, in one round trip.
async fn limit(app: &AppState, admitted: &Admitted, tool_call: bool, event: &mut AuditEvent) -> Result<(), RpcError> {
    let limits =
        &admitted.loaded.snapshot.tenants[&admitted.identity.tenant].personas[&admitted.identity.persona].limits;
    let mut checks = vec![(Class::Requests, limits.requests_per_minute)];
    if tool_call {
        checks.push((Class::ToolCalls, limits.tool_calls_per_minute));
    }
    let identity = &admitted.identity;
    let Ok(decisions) = app.limits.check_many(&identity.tenant, &identity.subject, &checks).await else {
        event.status = Status::Error;
        event.detail = Some("rate limiter unavailable".into());
        return Err(limiter_unavailable());
    };
    match crate::limits::first_refusal(&decisions) {
        None => Ok(()),
        Some((class, decision)) => {
            event.status = Status::Throttled;
            event.error_code = Some("429".into());
            Err(throttled(&decision, class.name()))
        }
    }
}

/// The error of a 2025 request when the session store (Redis) cannot answer: 503, retry later.
fn session_store_unavailable() -> RpcError {
    let mut error = RpcError::internal("The session store is unavailable; retry shortly");
    error.status = StatusCode::SERVICE_UNAVAILABLE;
    error
}

/// The error of a request refused because no rate-limit decision could be made (fail closed).
pub(crate) fn limiter_unavailable() -> RpcError {
    let mut error = RpcError::internal("Rate limiting is unavailable, so requests are refused; retry shortly");
    error.status = StatusCode::SERVICE_UNAVAILABLE;
    error
}

/// The error of a request over a rate limit: HTTP 429 with the limit and the wait in `data`.
pub(crate) fn throttled(decision: &crate::limits::Decision, class: &str) -> RpcError {
    let mut error = RpcError::internal(format!(
        "Rate limit exceeded: {} {class} per minute; retry after {} s",
        decision.limit, decision.retry_after_seconds
    ))
    .with_data(json!({ "retryAfterSeconds": decision.retry_after_seconds, "limit": decision.limit, "class": class }));
    error.status = StatusCode::TOO_MANY_REQUESTS;
    error
}

async fn finish(app: &AppState, mut event: AuditEvent, started: Instant, response: Response) -> Response {
    event.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if app.audit.record(event).await.is_err() {
        tracing::error!("Audit writer stopped; refusing to answer unaudited");
        return Problem::unavailable("the audit log is unavailable").into_response();
    }
    response
}

async fn post_message(
    State(app): State<AppState>,
    Path((tenant, endpoint)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A client that accepts an event stream may get messages about its request before the
    // answer (progress, log messages, requests of a 2025 session's own): see `relay`.
    if !protocol::accepts_event_stream(&headers) || !may_stream(body.as_deref().unwrap_or_default()) {
        return serve_post(app, tenant, endpoint, headers, body, None).await;
    }
    relay::run(move |relay, client_gone| {
        serve_post(app, tenant, endpoint, headers, body, Some((relay, client_gone))).boxed()
    })
    .await
}

/// Whether a request may have anything to send before its answer, judged from its raw body
/// without parsing it (a false positive only costs a channel): a 2026-07-28 request only when it
/// asks for progress or log messages; a 2025 one whenever it reaches an upstream (the session's
/// log level and the upstream's requests for input are known only later).
fn may_stream(body: &[u8]) -> bool {
    let contains = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
    if contains(b"progressToken") || contains(protocol::META_LOG_LEVEL.as_bytes()) {
        return true;
    }
    let modern = contains(protocol::META_PROTOCOL_VERSION.as_bytes());
    !modern
        && [&b"tools/call"[..], b"prompts/get", b"resources/read", b"completion/complete"]
            .iter()
            .any(|method| contains(method))
}

async fn serve_post(
    app: AppState,
    tenant: String,
    endpoint: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    stream: Option<(Relay, tokio::sync::oneshot::Receiver<()>)>,
) -> Response {
    let started = Instant::now();
    let request_id = crate::http_context::request_id();
    let mut unfinished = Unfinished {
        audit: &app.audit,
        event: Some(AuditEvent::new(&tenant, "mcp", "POST", &request_id, Utc::now())),
        started,
    };
    let event = unfinished.event.as_mut().expect("set above");
    event.endpoint = Some(endpoint.clone());
    let (relay, client_gone) = stream.unzip();
    let work = async {
        match admit(&app, &headers, &tenant, &endpoint, event).await {
            Err(problem) => problem.into_response(),
            Ok(admitted) => handle_message(&app, admitted, &headers, body, event, relay).await,
        }
    };
    let response = match client_gone {
        None => Some(work.await),
        Some(gone) => tokio::select! {
            response = work => Some(response),
            _ = gone => None,
        },
    };
    let response = response.unwrap_or_else(|| {
        // The client closed the request's stream: the request is cancelled (dropping it
        // cancels the upstream call) and audited as such.
        event.status = Status::Error;
        event.error_code = Some("cancelled".into());
        event.detail = Some("the client closed the stream".into());
        StatusCode::NO_CONTENT.into_response()
    });
    let event = unfinished.event.take().expect("recorded once");
    finish(&app, event, started, response).await
}

/// The audit event of a request in progress. A request whose client goes away before the
/// answer is dropped mid-way (which cancels its upstream call); the event is then recorded as
/// cancelled, so no request goes unaudited.
struct Unfinished<'a> {
    audit: &'a crate::audit::AuditLog,
    event: Option<AuditEvent>,
    started: Instant,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let Some(mut event) = self.event.take() else { return };
        event.status = Status::Error;
        if std::thread::panicking() {
            // A bug, not the client: recorded as what it is.
            event.error_code = Some("internal".into());
            event.detail = Some("the request failed inside the gateway".into());
        } else {
            event.error_code = Some("cancelled".into());
            event.detail = Some("the client went away before the answer".into());
        }
        event.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let audit = self.audit.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = audit.record(event).await;
            });
        }
    }
}

fn rpc_error_response(id: &Value, error: RpcError, event: &mut AuditEvent) -> Response {
    event.status = if error.code == -32700 || error.code == -32600 || error.status == StatusCode::BAD_REQUEST {
        Status::Invalid
    } else {
        Status::Error
    };
    event.error_code = Some(error.code.to_string());
    let status = error.status;
    protocol::framed(Framing::Json, status, &protocol::response_message(id, &Err(error)))
}

async fn handle_message(
    app: &AppState,
    admitted: Admitted,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    event: &mut AuditEvent,
    relay: Option<Relay>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let error = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                let mut e = RpcError::invalid_request(format!(
                    "Request body exceeds the limit of {} bytes",
                    app.settings.max_body_bytes
                ));
                e.status = StatusCode::PAYLOAD_TOO_LARGE;
                e
            } else {
                RpcError::invalid_request(format!("Cannot read the request body: {rejection}"))
            };
            return rpc_error_response(&Value::Null, error, event);
        }
    };
    let Some(framing) = protocol::negotiate_framing(headers) else {
        let mut e = RpcError::invalid_request("Not Acceptable: accept application/json or text/event-stream");
        e.status = StatusCode::NOT_ACCEPTABLE;
        return rpc_error_response(&Value::Null, e, event);
    };
    let mut message: Value = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(e) => return rpc_error_response(&Value::Null, RpcError::parse_error(e), event),
    };
    if message.is_array() {
        return rpc_error_response(
            &Value::Null,
            RpcError::invalid_request("Invalid Request: JSON-RPC batches are not supported"),
            event,
        );
    }
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str).map(str::to_string);
    let valid_id = id.as_ref().is_none_or(|id| id.is_string() || id.is_i64() || id.is_u64());
    if message.get("jsonrpc") != Some(&json!("2.0")) || !valid_id || (method.is_none() && !is_response(&message)) {
        return rpc_error_response(
            &id.unwrap_or(Value::Null),
            RpcError::invalid_request("Invalid Request: expected a JSON-RPC 2.0 request or notification"),
            event,
        );
    }
    // Taken, not copied: the rest of the message is only needed when it is a response.
    let params = message.as_object_mut().and_then(|m| m.remove("params")).unwrap_or(Value::Null);
    if !(params.is_null() || params.is_object()) {
        return rpc_error_response(
            &id.unwrap_or(Value::Null),
            RpcError::invalid_params("params must be an object"),
            event,
        );
    }
    let meta_version = params.get("_meta").and_then(|m| m.get(protocol::META_PROTOCOL_VERSION)).cloned();
    let method_name = method.clone().unwrap_or_default();
    event.operation = if method_name.is_empty() { "response".into() } else { method_name.clone() };
    // A 2025 request's session is looked up while its rate limit is decided: both are Redis
    // round trips, and sent together on the one multiplexed connection they cost one.
    let session_id = (meta_version.is_none() && method_name != "initialize")
        .then(|| headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()))
        .flatten();
    let lookup = async {
        match session_id {
            Some(session_id) => Some(app.sessions.touch(session_id).await),
            None => None,
        }
    };
    let (limited, looked_up) = tokio::join!(limit(app, &admitted, method_name == "tools/call", event), lookup);
    if let Err(error) = limited {
        return respond(&id.unwrap_or(Value::Null), Err(error), Framing::Json, event);
    }

    if meta_version.is_some() {
        return modern(
            app,
            &admitted,
            headers,
            framing,
            id,
            &method_name,
            params,
            meta_version.unwrap_or(Value::Null),
            event,
            relay,
        )
        .await;
    }
    if method_name != "initialize" && headers.get(SESSION_HEADER).is_none() {
        if headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok()) == Some(protocol::MODERN_VERSION) {
            return rpc_error_response(
                &id.unwrap_or(Value::Null),
                RpcError::missing_meta(protocol::META_PROTOCOL_VERSION),
                event,
            );
        }
        return rpc_error_response(
            &id.unwrap_or(Value::Null),
            RpcError::invalid_request(
                "Bad Request: no Mcp-Session-Id header. Send initialize first (2025 protocol versions) or per-request _meta (2026-07-28)",
            ),
            event,
        );
    }
    let reply = (method.is_none() && is_response(&message)).then_some(message);
    let request = LegacyRequest { id, method: &method_name, params, reply, looked_up };
    legacy(app, &admitted, headers, framing, request, event, relay).await
}

/// The methods both generations share.
async fn dispatch(
    ctx: &CallContext<'_>,
    method: &str,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    if let Some(connection) = ctx.closed_by() {
        event.connection = Some(connection.to_string());
        event.detail = Some(format!("endpoint closed: connection {connection} is unreachable (failureMode closed)"));
        let mut error = RpcError::internal(format!(
            "This endpoint is closed while connection {connection:?} is unreachable (its failureMode is closed); retry later"
        ))
        .with_data(json!({ "connection": connection, "failureMode": "closed" }));
        error.status = StatusCode::SERVICE_UNAVAILABLE;
        return Err(error);
    }
    match method {
        "tools/call" | "prompts/get" | "resources/read" => mrtr::round(ctx, method, params, event).await,
        "tools/list" => methods::tools_list(ctx, params).await,
        "resources/list" => methods::resources_list(ctx, params).await,
        "resources/templates/list" => methods::resource_templates_list(ctx, params).await,
        "prompts/list" => methods::prompts_list(ctx, params).await,
        "completion/complete" => methods::completion_complete(ctx, params, event).await,
        "tasks/get" | "tasks/update" | "tasks/cancel" if ctx.modern() => {
            methods::task_request(ctx, method, params, event).await
        }
        other => Err(RpcError::method_not_found(other, ctx.modern())),
    }
}

fn is_response(message: &Value) -> bool {
    message.get("result").is_some() || message.get("error").is_some()
}

#[allow(clippy::too_many_arguments, reason = "one request's parts, passed once")]
async fn modern(
    app: &AppState,
    admitted: &Admitted,
    headers: &HeaderMap,
    framing: Framing,
    id: Option<Value>,
    method: &str,
    params: Value,
    version: Value,
    event: &mut AuditEvent,
    relay: Option<Relay>,
) -> Response {
    let reply_id = id.clone().unwrap_or(Value::Null);
    // A header that disagrees with the body is a mismatch, whatever the versions are.
    if let Some(header) = headers.get(VERSION_HEADER)
        && let Some(body) = version.as_str()
        && protocol::decode_header_value(header).as_deref() != Some(body)
    {
        return rpc_error_response(
            &reply_id,
            RpcError::header_mismatch(format!(
                "{VERSION_HEADER} does not match _meta {}",
                protocol::META_PROTOCOL_VERSION
            )),
            event,
        );
    }
    if version.as_str() != Some(protocol::MODERN_VERSION) {
        return rpc_error_response(&reply_id, RpcError::unsupported_version(&version), event);
    }
    if method.is_empty() {
        return rpc_error_response(
            &reply_id,
            RpcError::invalid_request("Invalid Request: clients do not send responses in 2026-07-28"),
            event,
        );
    }
    if let Err(e) = protocol::check_mirrored(headers, VERSION_HEADER, protocol::MODERN_VERSION) {
        return rpc_error_response(&reply_id, e, event);
    }
    let Some(id) = id else {
        // Core 2026-07-28 defines no client notifications over HTTP; accept and ignore them.
        return StatusCode::ACCEPTED.into_response();
    };
    if let Err(e) = protocol::check_mirrored(headers, "Mcp-Method", method) {
        return rpc_error_response(&id, e, event);
    }
    let name_field = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
        _ => None,
    };
    if let Some(field) = name_field {
        let Some(value) = params.get(field).and_then(Value::as_str) else {
            return rpc_error_response(&id, RpcError::invalid_params(format!("params.{field} is required")), event);
        };
        if let Err(e) = protocol::check_mirrored(headers, "Mcp-Name", value) {
            return rpc_error_response(&id, e, event);
        }
    }
    let meta = params.get("_meta").cloned().unwrap_or(Value::Null);
    if !meta.get(protocol::META_CLIENT_CAPABILITIES).is_some_and(Value::is_object) {
        return rpc_error_response(&id, RpcError::missing_meta(protocol::META_CLIENT_CAPABILITIES), event);
    }
    event.client_name =
        meta.get(protocol::META_CLIENT_INFO).and_then(|c| c.get("name")).and_then(Value::as_str).map(str::to_string);
    if let Some(level) = meta.get(protocol::META_LOG_LEVEL)
        && level.as_str().is_none_or(|l| crate::connectors::notifications::level_rank(l).is_none())
    {
        return rpc_error_response(
            &id,
            RpcError::invalid_params(format!("{} must be a log level such as \"info\"", protocol::META_LOG_LEVEL)),
            event,
        );
    }
    if method == "subscriptions/listen" {
        return listen(app, admitted, headers, id, &params, event).await;
    }
    let ctx = CallContext::new(app, &admitted.loaded, &admitted.identity, &admitted.endpoint, true)
        .with_request_meta(&meta)
        .with_headers(headers)
        .with_relay(relay, &params);
    let outcome = match method {
        "server/discover" => Ok(methods::discover(&ctx)),
        other => dispatch(&ctx, other, &params, event).await,
    };
    respond(&id, outcome, framing, event)
}

/// `subscriptions/listen` (2026-07-28): an event stream that acknowledges the honoured subset of
/// the filter, then carries the requested `notifications/{tools,resources,prompts}/list_changed`
/// whenever what this tenant's callers see may have changed (a new configuration, an upstream's
/// catalog; from any replica), each tagged with the listen request's id, and
/// `notifications/resources/updated` for the `resourceSubscriptions` the persona may read
/// (followed upstream while the stream is open).
async fn listen(
    app: &AppState,
    admitted: &Admitted,
    headers: &HeaderMap,
    id: Value,
    params: &Value,
    event: &mut AuditEvent,
) -> Response {
    if !protocol::accepts_event_stream(headers) {
        let mut e =
            RpcError::invalid_request("subscriptions/listen answers with an event stream: accept text/event-stream");
        e.status = StatusCode::NOT_ACCEPTABLE;
        return rpc_error_response(&id, e, event);
    }
    let requested = params.get("notifications").cloned().unwrap_or(Value::Null);
    if !requested.is_object() {
        return rpc_error_response(&id, RpcError::invalid_params("params.notifications must be an object"), event);
    }
    // Task status notifications belong to the tasks extension, which the request must declare
    // (they are not relayed: callers poll tasks/get).
    let capabilities = params.get("_meta").and_then(|m| m.get(protocol::META_CLIENT_CAPABILITIES));
    if requested.get("taskIds").is_some() && !tasks::declared(capabilities) {
        return rpc_error_response(&id, tasks::missing_extension(), event);
    }
    // Each list Portcullis serves can change (configuration, upstream catalogs); resource
    // update subscriptions are not offered, so they are left out of the honoured subset.
    let meta = json!({ "io.modelcontextprotocol/subscriptionId": id });
    let mut honoured = serde_json::Map::new();
    let mut changed = Vec::new();
    for list in ListKind::ALL {
        if requested.get(list.flag()) == Some(&Value::Bool(true)) {
            honoured.insert(list.flag().into(), Value::Bool(true));
            let notification = json!({ "jsonrpc": "2.0", "method": list.method(), "params": { "_meta": meta } });
            changed.push((list, protocol::sse_event(&notification)));
        }
    }
    // Resources the persona may not read, or whose upstream cannot follow them, are left out of
    // the honoured subset, like anything else not offered.
    let mut followed = ListenSubscriptions { entries: Vec::new(), meta: meta.clone(), following: Vec::new() };
    if let Some(uris) = requested.get("resourceSubscriptions").and_then(Value::as_array) {
        if uris.len() > MAX_RESOURCE_SUBSCRIPTIONS {
            return rpc_error_response(
                &id,
                RpcError::invalid_params(format!(
                    "at most {MAX_RESOURCE_SUBSCRIPTIONS} resourceSubscriptions per listen stream"
                )),
                event,
            );
        }
        let ctx = CallContext::new(app, &admitted.loaded, &admitted.identity, &admitted.endpoint, true);
        for uri in uris.iter().filter_map(Value::as_str) {
            let Some(resource) = ctx.resolve_resource(uri).await else { continue };
            if resource.upstream.subscribe(&resource.upstream_uri).await.is_err() {
                continue;
            }
            followed.entries.push(crate::sessions::Subscription {
                uri: uri.to_string(),
                connection: resource.connection.clone(),
                upstream_uri: resource.upstream_uri.clone(),
            });
            followed.following.push((resource.upstream.clone(), resource.upstream_uri.clone()));
        }
        let honoured_uris: Vec<&str> = followed.entries.iter().map(|e| e.uri.as_str()).collect();
        if !honoured_uris.is_empty() {
            honoured.insert("resourceSubscriptions".into(), json!(honoured_uris));
        }
    }
    let ack = protocol::sse_event(&json!({
        "jsonrpc": "2.0",
        "method": "notifications/subscriptions/acknowledged",
        "params": { "notifications": honoured, "_meta": meta },
    }));
    let followed =
        if followed.entries.is_empty() { Followed::Nothing } else { Followed::Listen(std::sync::Arc::new(followed)) };
    notification_stream(app, &admitted.identity.tenant, Some(ack), changed, followed)
}

/// How many resources one listen stream may follow.
const MAX_RESOURCE_SUBSCRIPTIONS: usize = 100;

/// The lists whose changes clients hear of.
#[derive(Clone, Copy)]
enum ListKind {
    Tools,
    Resources,
    Prompts,
}

impl ListKind {
    const ALL: [ListKind; 3] = [ListKind::Tools, ListKind::Resources, ListKind::Prompts];

    /// Its flag in a listen filter.
    fn flag(self) -> &'static str {
        match self {
            ListKind::Tools => "toolsListChanged",
            ListKind::Resources => "resourcesListChanged",
            ListKind::Prompts => "promptsListChanged",
        }
    }

    /// Its notification.
    fn method(self) -> &'static str {
        match self {
            ListKind::Tools => "notifications/tools/list_changed",
            ListKind::Resources => "notifications/resources/list_changed",
            ListKind::Prompts => "notifications/prompts/list_changed",
        }
    }

    /// Whether `lists` (all when unset) includes it.
    fn in_change(self, lists: Option<crate::changes::Lists>) -> bool {
        lists.is_none_or(|l| match self {
            ListKind::Tools => l.tools,
            ListKind::Resources => l.resources,
            ListKind::Prompts => l.prompts,
        })
    }
}

/// The notifications of `changed` that a change of `lists` (all when unset) calls for.
fn list_changes(changed: &[(ListKind, Bytes)], lists: Option<crate::changes::Lists>) -> Bytes {
    let mut events = Vec::new();
    for (list, event) in changed {
        if list.in_change(lists) {
            events.extend_from_slice(event);
        }
    }
    Bytes::from(events)
}

/// Whose resource subscriptions a notification stream carries updates for.
#[derive(Clone)]
enum Followed {
    /// Nobody's.
    Nothing,
    /// A 2025 session's (`resources/subscribe`); the stream keeps the session alive.
    Session(String),
    /// A listen stream's own `resourceSubscriptions`.
    Listen(std::sync::Arc<ListenSubscriptions>),
}

/// The resources a listen stream follows; when the stream ends they are let go upstream.
struct ListenSubscriptions {
    entries: Vec<crate::sessions::Subscription>,
    meta: Value,
    following: Vec<(std::sync::Arc<crate::connectors::McpUpstream>, String)>,
}

impl Drop for ListenSubscriptions {
    fn drop(&mut self) {
        let following = std::mem::take(&mut self.following);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for (upstream, uri) in following {
                    upstream.unsubscribe(&uri).await;
                }
            });
        }
    }
}

/// An event stream of change notifications for `tenant`: `first` (an acknowledgement) once,
/// then the notifications of `changed` for the lists a change concerns, updates of the resources
/// `followed`, and keep-alive comments; a followed 2025 session is kept alive (sessions expire
/// after idle time, and an open stream is not idle) and its end ends the stream.
fn notification_stream(
    app: &AppState,
    tenant: &str,
    first: Option<Bytes>,
    changed: Vec<(ListKind, Bytes)>,
    followed: Followed,
) -> Response {
    let changed = std::sync::Arc::new(changed);
    let receiver = app.changes.subscribe();
    let (app, tenant) = (app.clone(), tenant.to_string());
    // Keep-alives go out every 15 s whatever else the bus carries (other tenants' changes must
    // not keep pushing the next one back).
    const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);
    let start = (receiver, first, tokio::time::Instant::now() + KEEP_ALIVE);
    let stream = futures::stream::unfold(start, move |(mut receiver, first, keep_alive)| {
        let (app, tenant, changed, followed) = (app.clone(), tenant.clone(), changed.clone(), followed.clone());
        async move {
            if let Some(first) = first {
                return Some((Ok::<_, std::io::Error>(first), (receiver, None, keep_alive)));
            }
            loop {
                tokio::select! {
                    change = receiver.recv() => match (change, &changed) {
                        (Ok(c), _) if c.tenant != tenant => continue,
                        (Ok(crate::changes::Change { session: Some(message), .. }), _) => {
                            let Followed::Session(id) = &followed else { continue };
                            if message.session != *id {
                                continue;
                            }
                            // The session ended: so does its stream.
                            if message.ended() {
                                return None;
                            }
                            let Some(message) = message.message else { continue };
                            if !session_wants(&app, id, &message).await {
                                continue;
                            }
                            return Some((Ok(protocol::sse_event(&message)), (receiver, None, keep_alive)));
                        }
                        (Ok(c), _) if !crate::changes::Changes::is_change(&c) => continue,
                        (Ok(crate::changes::Change { updated: Some(update), .. }), _) => {
                            let events = match &followed {
                                Followed::Nothing => continue,
                                Followed::Listen(listen) => {
                                    resource_updates(&listen.entries, &update, Some(&listen.meta))
                                }
                                Followed::Session(id) => match app.sessions.touch(id).await.ok().flatten() {
                                    Some(session) => resource_updates(&session.subscriptions, &update, None),
                                    // The session ended: so does its stream.
                                    None => return None,
                                },
                            };
                            if events.is_empty() {
                                continue;
                            }
                            return Some((Ok(events), (receiver, None, keep_alive)));
                        }
                        (Ok(c), changed) => {
                            let events = list_changes(changed, c.lists);
                            if events.is_empty() {
                                continue;
                            }
                            return Some((Ok(events), (receiver, None, keep_alive)));
                        }
                        // Missed some: tell the client to list everything again rather than miss one.
                        (Err(tokio::sync::broadcast::error::RecvError::Lagged(_)), changed) if !changed.is_empty() => {
                            return Some((Ok(list_changes(changed, None)), (receiver, None, keep_alive)));
                        }
                        (Err(tokio::sync::broadcast::error::RecvError::Closed), _) => return None,
                        _ => continue,
                    },
                    // Keep-alive comments keep proxies from closing an idle stream.
                    _ = tokio::time::sleep_until(keep_alive) => {
                        if let Followed::Session(id) = &followed {
                            // A session that ended (DELETE, expiry) ends its stream.
                            if !matches!(app.sessions.touch(id).await, Ok(Some(_))) {
                                return None;
                            }
                        }
                        let next = tokio::time::Instant::now() + KEEP_ALIVE;
                        return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), (receiver, None, next)));
                    }
                }
            }
        }
    });
    let mut response = axum::body::Body::from_stream(stream).into_response();
    protocol::event_stream_headers(&mut response);
    response
}

/// Whether 2025 session `id` is to be sent `message` from its upstream sessions: log messages
/// only at or above the level it set with `logging/setLevel`, as on its requests' streams.
async fn session_wants(app: &AppState, id: &str, message: &Value) -> bool {
    if message.get("method").and_then(Value::as_str) != Some("notifications/message") {
        return true;
    }
    let Ok(Some(session)) = app.sessions.touch(id).await else { return false };
    let rank = |level: Option<&str>| level.and_then(crate::connectors::notifications::level_rank);
    let level = message.get("params").and_then(|p| p.get("level")).and_then(Value::as_str);
    // As on a request's stream: none until the session sets a level.
    matches!((rank(level), rank(session.log_level.as_deref())), (Some(level), Some(wanted)) if level >= wanted)
}

/// `notifications/resources/updated` for each subscription that `update` concerns (none:
/// empty), tagged with `meta` on a listen stream.
fn resource_updates(
    subscriptions: &[crate::sessions::Subscription],
    update: &crate::changes::ResourceUpdated,
    meta: Option<&Value>,
) -> Bytes {
    let mut events = Vec::new();
    for subscription in subscriptions {
        if subscription.connection == update.connection && subscription.upstream_uri == update.uri {
            let mut params = json!({ "uri": subscription.uri });
            if let Some(meta) = meta {
                params["_meta"] = meta.clone();
            }
            events.extend_from_slice(&protocol::sse_event(&json!({
                "jsonrpc": "2.0",
                "method": "notifications/resources/updated",
                "params": params,
            })));
        }
    }
    Bytes::from(events)
}

fn respond(id: &Value, outcome: Result<Value, RpcError>, framing: Framing, event: &mut AuditEvent) -> Response {
    match outcome {
        Ok(result) => protocol::framed(framing, StatusCode::OK, &protocol::response_message(id, &Ok(result))),
        Err(error) if error.status == StatusCode::TOO_MANY_REQUESTS => {
            event.status = Status::Throttled;
            event.error_code = Some("429".into());
            let retry =
                error.data.as_ref().and_then(|d| d.get("retryAfterSeconds")).and_then(Value::as_u64).unwrap_or(1);
            let mut response =
                protocol::framed(Framing::Json, error.status, &protocol::response_message(id, &Err(error)));
            if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            response
        }
        Err(error) => rpc_error_response(id, error, event),
    }
}

/// A 2025 request (or a client's response) as `serve_post` read it.
struct LegacyRequest<'a> {
    id: Option<Value>,
    method: &'a str,
    params: Value,
    /// A response of the client to a request of Portcullis's.
    reply: Option<Value>,
    /// Its session, when already looked up (with the rate limit).
    looked_up: Option<anyhow::Result<Option<Session>>>,
}

async fn legacy(
    app: &AppState,
    admitted: &Admitted,
    headers: &HeaderMap,
    framing: Framing,
    request: LegacyRequest<'_>,
    event: &mut AuditEvent,
    relay: Option<Relay>,
) -> Response {
    let LegacyRequest { id, method, params, reply, looked_up } = request;
    let reply_id = id.clone().unwrap_or(Value::Null);
    let tenant = &admitted.identity.tenant;
    if method == "initialize" {
        let Some(id) = id else {
            return rpc_error_response(
                &Value::Null,
                RpcError::invalid_request("initialize must be a request with an id"),
                event,
            );
        };
        let requested = params.get("protocolVersion").and_then(Value::as_str).unwrap_or("");
        // Standard negotiation: echo a version we speak, else offer our newest stateful one.
        let version = protocol::LEGACY_VERSIONS
            .iter()
            .find(|v| **v == requested)
            .copied()
            .unwrap_or(protocol::LEGACY_VERSIONS[0]);
        let client_name =
            params.get("clientInfo").and_then(|c| c.get("name")).and_then(Value::as_str).map(str::to_string);
        event.client_name = client_name.clone();
        let session = Session {
            id: uuid::Uuid::new_v4().simple().to_string(),
            tenant: tenant.clone(),
            endpoint: admitted.endpoint.clone(),
            subject: admitted.identity.subject.clone(),
            protocol_version: version.to_string(),
            client_name,
            created_at: Utc::now(),
            client_capabilities: params.get("capabilities").filter(|c| c.is_object()).cloned(),
            log_level: None,
            subscriptions: Vec::new(),
        };
        if let Err(error) = app.sessions.create(session.clone()).await {
            tracing::error!(?error, "Cannot store session");
            return rpc_error_response(&id, session_store_unavailable(), event);
        }
        let ctx = CallContext::new(app, &admitted.loaded, &admitted.identity, &admitted.endpoint, false);
        let result = methods::initialize_result(&ctx, version);
        let mut response = protocol::framed(framing, StatusCode::OK, &protocol::response_message(&id, &Ok(result)));
        if let Ok(value) = HeaderValue::from_str(&session.id) {
            response.headers_mut().insert(http::HeaderName::from_static("mcp-session-id"), value);
        }
        return response;
    }
    let session_id = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    let looked_up = match looked_up {
        Some(looked_up) => looked_up,
        None => app.sessions.touch(session_id).await,
    };
    let session = match looked_up {
        Ok(session) => session,
        Err(error) => {
            tracing::error!(?error, "Session store failed");
            return rpc_error_response(&reply_id, session_store_unavailable(), event);
        }
    };
    // A session of another caller or endpoint is indistinguishable from an unknown one.
    let Some(session) = session
        .filter(|s| s.tenant == *tenant && s.endpoint == admitted.endpoint && s.subject == admitted.identity.subject)
    else {
        event.status = Status::Invalid;
        event.error_code = Some("404".into());
        event.detail = Some("session not found".into());
        let body = json!({"jsonrpc": "2.0", "id": reply_id, "error": {"code": -32001, "message": "Session not found: initialize a new session"}});
        return protocol::framed(Framing::Json, StatusCode::NOT_FOUND, &body);
    };
    event.client_name = session.client_name.clone();
    // 2025 servers must refuse an invalid or unsupported MCP-Protocol-Version; a supported one
    // other than the negotiated version is accepted (clients have been seen sending it).
    if let Some(header_version) = headers.get(VERSION_HEADER)
        && !protocol::LEGACY_VERSIONS.iter().any(|v| header_version.to_str().ok() == Some(*v))
    {
        return rpc_error_response(
            &reply_id,
            RpcError::invalid_request(format!(
                "Bad Request: unsupported MCP-Protocol-Version {:?}; this session negotiated {}",
                header_version.to_str().unwrap_or("?"),
                session.protocol_version
            )),
            event,
        );
    }
    if let Some(reply) = reply {
        // The client's answer to a request Portcullis sent on one of this session's streams.
        if let Err(reply) = app.client_replies.deliver(&session.id, reply) {
            // The request it answers waits on another replica's stream.
            let message = crate::changes::ClientMessage {
                session: session.id.clone(),
                kind: crate::changes::ClientMessageKind::Reply,
                message: reply,
            };
            app.changes.forward_client_message(tenant, message);
        }
        return StatusCode::ACCEPTED.into_response();
    }
    let Some(id) = id else {
        // Notifications are accepted; a cancellation stops the request if it runs here.
        if method == "notifications/cancelled"
            && let Some(request) = params.get("requestId")
            && !app.in_flight.cancel(&session.id, request)
        {
            // The request may run on another replica.
            let message = crate::changes::ClientMessage {
                session: session.id.clone(),
                kind: crate::changes::ClientMessageKind::Cancel,
                message: request.clone(),
            };
            app.changes.forward_client_message(tenant, message);
        }
        return StatusCode::ACCEPTED.into_response();
    };
    let outcome = match method {
        "ping" => Ok(json!({})),
        "logging/setLevel" => set_log_level(app, session, &params).await,
        "resources/subscribe" | "resources/unsubscribe" => {
            let ctx = CallContext::new(app, &admitted.loaded, &admitted.identity, &admitted.endpoint, false);
            methods::resource_subscription(&ctx, session, method == "resources/subscribe", &params, event).await
        }
        other => {
            let mut running = app.in_flight.start(&session.id, &id);
            let ctx = CallContext::new(app, &admitted.loaded, &admitted.identity, &admitted.endpoint, false)
                .with_session(session)
                .with_relay(relay, &params);
            // A cancelled request is dropped, which cancels its upstream request too.
            let outcome = tokio::select! {
                outcome = dispatch(&ctx, other, &params, event) => Some(outcome),
                Ok(()) = &mut running.cancelled => None,
            };
            outcome.unwrap_or_else(|| {
                event.detail = Some("cancelled by the client".into());
                Err(RpcError::internal("Request cancelled by the client"))
            })
        }
    };
    respond(&id, outcome, framing, event)
}

/// `logging/setLevel` (2025): the session's level, applied to the log messages relayed on its
/// requests' streams (and asked of 2026-07-28 upstreams per request).
async fn set_log_level(app: &AppState, mut session: Session, params: &Value) -> Result<Value, RpcError> {
    let level = params.get("level").and_then(Value::as_str).unwrap_or_default();
    if crate::connectors::notifications::level_rank(level).is_none() {
        return Err(RpcError::invalid_params(format!(
            "level must be one of debug, info, notice, warning, error, critical, alert, emergency; got {level:?}"
        )));
    }
    session.log_level = Some(level.to_string());
    let (tenant, id) = (session.tenant.clone(), session.id.clone());
    match app.sessions.save(session).await {
        Ok(_) => {
            // The upstream sessions kept for it, on every replica, take the level too.
            app.changes.set_session_level(&tenant, &id, level);
            Ok(json!({}))
        }
        Err(error) => {
            tracing::error!(?error, "Cannot store session");
            Err(session_store_unavailable())
        }
    }
}

/// The standalone GET stream of a 2025 session: `notifications/{tools,resources,prompts}/list_changed`
/// whenever what the tenant's callers see may have changed (from any replica).
async fn session_stream(
    app: &AppState,
    admitted: &Admitted,
    headers: &HeaderMap,
    tenant: &str,
    endpoint: &str,
    event: &mut AuditEvent,
) -> Response {
    if !protocol::accepts_event_stream(headers) {
        event.status = Status::Invalid;
        event.error_code = Some("406".into());
        return StatusCode::NOT_ACCEPTABLE.into_response();
    }
    let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string) else {
        event.status = Status::Invalid;
        event.error_code = Some("400".into());
        return (StatusCode::BAD_REQUEST, "the GET stream belongs to a session: send Mcp-Session-Id").into_response();
    };
    // A session of another caller or endpoint is indistinguishable from an unknown one.
    let owned = matches!(app.sessions.touch(&id).await, Ok(Some(s))
        if s.tenant == tenant && s.endpoint == endpoint && s.subject == admitted.identity.subject);
    if !owned {
        event.status = Status::Invalid;
        event.error_code = Some("404".into());
        return StatusCode::NOT_FOUND.into_response();
    }
    let changed = ListKind::ALL
        .iter()
        .map(|list| (*list, protocol::sse_event(&json!({"jsonrpc": "2.0", "method": list.method()}))))
        .collect();
    notification_stream(app, tenant, None, changed, Followed::Session(id))
}

async fn get_stream(
    State(app): State<AppState>,
    Path((tenant, endpoint)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let mut event = AuditEvent::new(&tenant, "mcp", "GET", &crate::http_context::request_id(), Utc::now());
    event.endpoint = Some(endpoint.clone());
    let response = match admit(&app, &headers, &tenant, &endpoint, &mut event).await {
        Err(problem) => problem.into_response(),
        Ok(admitted) if let Err(error) = limit(&app, &admitted, false, &mut event).await => {
            respond(&Value::Null, Err(error), Framing::Json, &mut event)
        }
        Ok(admitted) => session_stream(&app, &admitted, &headers, &tenant, &endpoint, &mut event).await,
    };
    finish(&app, event, started, response).await
}

async fn delete_session(
    State(app): State<AppState>,
    Path((tenant, endpoint)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let mut event = AuditEvent::new(&tenant, "mcp", "DELETE", &crate::http_context::request_id(), Utc::now());
    event.endpoint = Some(endpoint.clone());
    let response = match admit(&app, &headers, &tenant, &endpoint, &mut event).await {
        Err(problem) => problem.into_response(),
        Ok(admitted) if let Err(error) = limit(&app, &admitted, false, &mut event).await => {
            respond(&Value::Null, Err(error), Framing::Json, &mut event)
        }
        Ok(admitted) => match headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
            None => {
                event.status = Status::Invalid;
                event.error_code = Some("405".into());
                let mut response = StatusCode::METHOD_NOT_ALLOWED.into_response();
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
                response
            }
            Some(id) => {
                let owned = match app.sessions.touch(id).await {
                    Ok(Some(s))
                        if s.tenant == tenant && s.endpoint == endpoint && s.subject == admitted.identity.subject =>
                    {
                        Some(s)
                    }
                    _ => None,
                };
                if owned.is_some() && app.sessions.delete(id).await.unwrap_or(false) {
                    // The upstream sessions kept for it and its subscriptions end: here, and
                    // on every other replica over the bus.
                    app.changes.end_session(&tenant, id);
                    subscriptions::release_all(&app, id).await;
                    StatusCode::NO_CONTENT.into_response()
                } else {
                    event.status = Status::Invalid;
                    event.error_code = Some("404".into());
                    StatusCode::NOT_FOUND.into_response()
                }
            }
        },
    };
    finish(&app, event, started, response).await
}

#[cfg(test)]
mod tests {
    use super::may_stream;

    #[test]
    fn only_requests_that_can_hear_something_before_the_answer_may_stream() {
        let modern = |extra: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28"{extra}}}}}}}"#
            )
        };
        assert!(!may_stream(modern("").as_bytes()), "a plain 2026-07-28 call answers as JSON");
        assert!(may_stream(modern(r#","progressToken":"p""#).as_bytes()));
        assert!(may_stream(modern(r#","io.modelcontextprotocol/logLevel":"info""#).as_bytes()));
        assert!(may_stream(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#));
        assert!(!may_stream(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#));
    }
}
