//! MCP methods served by Portcullis itself: discovery, initialize, and the tools, resources,
//! prompts and completion methods aggregated over an endpoint's connections.

use super::protocol::{self, RpcError};
use crate::audit::AuditEvent;
use crate::catalog_calls::{self, Failure, NotFound};
use crate::connectors::CallError;
use crate::connectors::CallerMeta;
use crate::identity::Identity;
use crate::policy::{ExposedTool, Scope};
use crate::state::{AppState, Loaded};
use crate::tool_call;
use base64::Engine;
use portcullis_crds::snapshot::{CompiledEndpoint, CompiledPersona, Tenant};
use serde_json::{Value, json};

/// How long clients may cache lists (ms). Short: lists change with config and upstreams.
const LIST_TTL_MS: u64 = 5_000;

/// What a method needs to know about the caller.
pub struct CallContext<'a> {
    app: &'a AppState,
    identity: &'a Identity,
    tenant: &'a Tenant,
    endpoint: &'a CompiledEndpoint,
    persona: &'a CompiledPersona,
    modern: bool,
    caller_meta: CallerMeta,
    headers: Option<&'a http::HeaderMap>,
    relay: Option<super::relay::Relay>,
    session: Option<crate::sessions::Session>,
}

impl<'a> CallContext<'a> {
    /// Context for an admitted request (tenant, endpoint and persona exist: `admit` checked).
    pub fn new(app: &'a AppState, loaded: &'a Loaded, identity: &'a Identity, endpoint: &'a str, modern: bool) -> Self {
        let tenant = &loaded.snapshot.tenants[&identity.tenant];
        Self {
            app,
            identity,
            tenant,
            endpoint: &tenant.endpoints[endpoint],
            persona: &tenant.personas[&identity.persona],
            modern,
            caller_meta: CallerMeta::default(),
            headers: None,
            relay: None,
            session: None,
        }
    }

    /// The caller's 2025 session: its log level applies to this request.
    pub fn with_session(mut self, session: crate::sessions::Session) -> Self {
        self.caller_meta.log_level = session.log_level.clone();
        self.caller_meta.client_session = Some(crate::connectors::ClientSession {
            id: session.id.clone(),
            capabilities: super::tasks::without_tasks(session.client_capabilities.clone()),
        });
        self.session = Some(session);
        self
    }

    /// The request's own stream, when the client accepts one: notifications about the request
    /// go there, and a 2025 session's client can be asked for input on it. Call after
    /// `with_request_meta` / `with_session`.
    pub fn with_relay(mut self, relay: Option<super::relay::Relay>, params: &Value) -> Self {
        if let Some(relay) = &relay {
            self.caller_meta.notifications = Some(relay.sink(params, self.caller_meta.log_level.as_deref()));
            if let Some(session) = &self.session {
                // What the session's client declared it can answer, upstreams may ask for (as
                // `with_session` took it: without tasks, which it cannot follow).
                self.caller_meta.client_capabilities =
                    self.caller_meta.client_session.as_ref().and_then(|client| client.capabilities.clone());
                self.caller_meta.ask_client = Some(std::sync::Arc::new(super::relay::SessionClient {
                    relay: relay.clone(),
                    pending: self.app.client_replies.clone(),
                    session: session.id.clone(),
                    declared: session.client_capabilities.clone().unwrap_or_default(),
                    timeout: self.call_timeout(),
                }));
            }
        }
        self.relay = relay;
        self
    }

    /// The stream and session through which a 2025 client can be asked for input.
    pub fn client_channel(&self) -> Option<(&super::relay::Relay, &crate::sessions::Session)> {
        Some((self.relay.as_ref()?, self.session.as_ref()?))
    }

    /// Requests to the client wait for answers here.
    pub fn client_replies(&self) -> &super::relay::PendingReplies {
        &self.app.client_replies
    }

    /// How long the persona lets a call take.
    pub fn call_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.persona.limits.tool_timeout_seconds))
    }

    /// The request's headers, for checks of mirrored tool arguments (2026-07-28).
    pub fn with_headers(mut self, headers: &'a http::HeaderMap) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Passes what the request's `_meta` says about the client on to upstreams.
    pub fn with_request_meta(mut self, meta: &Value) -> Self {
        self.caller_meta = CallerMeta {
            client_capabilities: meta.get(protocol::META_CLIENT_CAPABILITIES).cloned(),
            log_level: meta.get(protocol::META_LOG_LEVEL).and_then(Value::as_str).map(str::to_string),
            notifications: None,
            ask_client: None,
            client_session: None,
        };
        self
    }

    /// What a request state issued to this caller for `method` on `name` is bound to.
    pub fn binding(&self, method: &str, name: &str) -> crate::request_state::Binding {
        crate::request_state::Binding {
            tenant: self.identity.tenant.clone(),
            subject: self.identity.subject.clone(),
            endpoint: self.endpoint.name.clone(),
            method: method.to_string(),
            name: name.to_string(),
        }
    }

    /// The key request states are sealed with.
    pub fn request_state_key(&self) -> &portcullis_store::secret_box::SecretKey {
        &self.app.request_state_key
    }

    /// A connection of this endpoint in failure mode `closed` whose upstream is unreachable:
    /// the endpoint answers errors until it is back.
    pub fn closed_by(&self) -> Option<&str> {
        self.endpoint.connections.iter().map(String::as_str).find(|name| {
            self.tenant
                .connections
                .get(*name)
                .is_some_and(|c| c.failure_mode == portcullis_crds::kinds::FailureMode::Closed)
                && self.app.upstreams.get(&self.identity.tenant, name).is_some_and(|u| u.is_down())
        })
    }

    /// The connection and upstream URI behind `uri`, if the persona may read it.
    pub async fn resolve_resource(&self, uri: &str) -> Option<crate::policy::ResolvedResource> {
        self.scope().resolve_uri(&self.app.upstreams, uri).await
    }

    /// Whether the caller speaks 2026-07-28.
    pub fn modern(&self) -> bool {
        self.modern
    }

    /// What upstream requests carry of the caller's request metadata.
    pub fn caller_meta(&self) -> &CallerMeta {
        &self.caller_meta
    }

    /// Whether this request declared the tasks extension (2026-07-28 callers only).
    pub fn takes_tasks(&self) -> bool {
        self.modern && super::tasks::declared(self.caller_meta.client_capabilities.as_ref())
    }

    /// Whether a connection of this endpoint offers the tasks extension (its upstream's, or
    /// tasks Portcullis runs for it).
    pub fn offers_tasks(&self) -> bool {
        self.endpoint
            .connections
            .iter()
            .any(|name| self.app.upstreams.get(&self.identity.tenant, name).is_some_and(|u| u.offers_tasks()))
    }

    /// The caller's tenant.
    pub fn tenant_name(&self) -> &str {
        &self.identity.tenant
    }

    /// The caller's subject.
    pub fn subject(&self) -> &str {
        &self.identity.subject
    }

    /// The endpoint's name.
    pub fn endpoint_name(&self) -> &str {
        &self.endpoint.name
    }

    /// Whether a task handle was issued to this caller on this endpoint.
    pub fn owns(&self, handle: &super::tasks::Handle) -> bool {
        handle.tenant == self.identity.tenant
            && handle.subject == self.identity.subject
            && handle.endpoint == self.endpoint.name
    }

    /// The tool with canonical name `canonical` on `connection`, if the persona still sees it.
    pub async fn visible_tool(&self, canonical: &str, connection: &str) -> Option<ExposedTool> {
        self.scope().tool_by_canonical(&self.app.upstreams, connection, canonical).await
    }

    /// A `tasks/get` answer over the persona's size cap: an inlined result becomes a tool error,
    /// as a `tools/call` result would; an answer still over the cap (a long error, input
    /// requests, status message) is refused.
    pub fn cap_task_answer(&self, task: &mut Value, tool: &str, event: &mut AuditEvent) -> Result<(), RpcError> {
        let limit = self.persona.limits.max_result_bytes;
        let size = crate::tool_call::json_size(task);
        if size <= limit {
            return Ok(());
        }
        event.status = crate::audit::Status::Error;
        event.error_code = Some("result_too_large".into());
        let message = format!(
            "The answer of {tool}'s task is {size} bytes, over this persona's limit of {limit} bytes (maxResultBytes)."
        );
        if task.get("result").is_some() {
            task["result"] = crate::tool_call::error_result(message.clone());
            if crate::tool_call::json_size(task) <= limit {
                return Ok(());
            }
        }
        Err(RpcError::internal(message))
    }

    fn scope(&self) -> Scope<'a> {
        Scope::endpoint(&self.identity.tenant, self.tenant, self.endpoint, self.persona)
    }

    async fn tools(&self) -> Vec<ExposedTool> {
        self.scope().tools(&self.app.upstreams).await
    }

    /// Adds what 2026-07-28 results carry (and strips it for 2025 clients: an upstream of the
    /// other generation may have put it there).
    fn complete(&self, mut result: Value, cacheable: bool) -> Value {
        if !result.is_object() {
            result = json!({});
        }
        if result.get("resultType").and_then(Value::as_str) == Some("input_required") {
            // Not final, never cacheable; `mrtr` decides what the caller gets.
            if let Some(object) = result.as_object_mut() {
                object.remove("ttlMs");
                object.remove("cacheScope");
            }
            return result;
        }
        if self.modern {
            result["resultType"] = json!("complete");
            if cacheable {
                result["ttlMs"] = json!(LIST_TTL_MS);
                result["cacheScope"] = json!("private");
            } else if let Some(object) = result.as_object_mut() {
                object.remove("ttlMs");
                object.remove("cacheScope");
            }
            protocol::set_meta(&mut result, protocol::META_SERVER_INFO, server_info());
        } else if let Some(object) = result.as_object_mut() {
            object.remove("resultType");
            object.remove("ttlMs");
            object.remove("cacheScope");
        }
        result
    }
}

/// Who answers: `_meta["io.modelcontextprotocol/serverInfo"]` on 2026-07-28 results.
pub(super) fn server_info() -> Value {
    json!({ "name": "portcullis", "version": env!("CARGO_PKG_VERSION") })
}

/// What this server offers. List changes reach 2026-07-28 clients on a `subscriptions/listen`
/// stream and 2025 sessions on their GET stream; log messages of a request are relayed on its
/// stream (2025: at the session's `logging/setLevel`; 2026-07-28: at the request's `logLevel`).
fn capabilities() -> Value {
    json!({
        "tools": { "listChanged": true },
        // 2025 sessions subscribe with resources/subscribe, 2026-07-28 clients on a listen stream.
        "resources": { "listChanged": true, "subscribe": true },
        "prompts": { "listChanged": true },
        "completions": {},
        "logging": {},
    })
}

/// `server/discover` (2026-07-28): the tasks extension is announced when a connection of the
/// endpoint offers it.
pub fn discover(ctx: &CallContext<'_>) -> Value {
    let mut capabilities = capabilities();
    if ctx.offers_tasks() {
        capabilities["extensions"] = json!({ super::tasks::EXTENSION: {} });
    }
    let mut result = json!({
        "supportedVersions": protocol::supported_versions(),
        "capabilities": capabilities,
    });
    if let Some(instructions) = &ctx.endpoint.instructions {
        result["instructions"] = json!(instructions);
    }
    ctx.complete(result, true)
}

/// The `initialize` result (2025).
pub fn initialize_result(ctx: &CallContext<'_>, version: &str) -> Value {
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": capabilities(),
        "serverInfo": server_info(),
    });
    if let Some(instructions) = &ctx.endpoint.instructions {
        result["instructions"] = json!(instructions);
    }
    result
}

fn encode_cursor(name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

fn decode_cursor(cursor: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    String::from_utf8(bytes).ok()
}

/// One page of a sorted list, paged by an opaque cursor: the last key of the previous page,
/// so pages stay stable while the catalog changes.
fn page(ctx: &CallContext<'_>, params: &Value, field: &str, items: Vec<(String, Value)>) -> Result<Value, RpcError> {
    let after = match params.get("cursor") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.is_empty() => None,
        Some(Value::String(c)) => Some(decode_cursor(c).ok_or_else(|| RpcError::invalid_params("Invalid cursor"))?),
        Some(_) => return Err(RpcError::invalid_params("Invalid cursor")),
    };
    let page_size = ctx.app.settings.page_size.max(1);
    let mut remaining =
        items.into_iter().filter(|(key, _)| after.as_deref().is_none_or(|a| key.as_str() > a)).peekable();
    let mut page = Vec::new();
    let mut last = None;
    while page.len() < page_size {
        let Some((key, item)) = remaining.next() else { break };
        page.push(item);
        last = Some(key);
    }
    let mut result = json!({ field: page });
    if remaining.peek().is_some()
        && let Some(last) = last
    {
        result["nextCursor"] = json!(encode_cursor(&last));
    }
    Ok(ctx.complete(result, true))
}

/// An upstream definition with its name (or URI) field replaced by the exposed one.
fn renamed(definition: &impl serde::Serialize, field: &str, name: &str) -> Value {
    let mut value = serde_json::to_value(definition).unwrap_or_else(|_| json!({}));
    value[field] = json!(name);
    value
}

/// `tools/list`: the persona's tools of this endpoint, sorted.
pub async fn tools_list(ctx: &CallContext<'_>, params: &Value) -> Result<Value, RpcError> {
    let tools = crate::policy::available(ctx.tools().await);
    let items = tools.into_iter().map(|t| (t.name.clone(), renamed(&t.definition, "name", &t.name)));
    page(ctx, params, "tools", items.collect())
}

/// `prompts/list`: the persona's prompts of this endpoint, sorted.
pub async fn prompts_list(ctx: &CallContext<'_>, params: &Value) -> Result<Value, RpcError> {
    let prompts = crate::policy::available(ctx.scope().prompts(&ctx.app.upstreams).await);
    let items = prompts.into_iter().map(|p| (p.name.clone(), renamed(&p.definition, "name", &p.name)));
    page(ctx, params, "prompts", items.collect())
}

/// `resources/list`: the persona's concrete resources of this endpoint, sorted by URI.
pub async fn resources_list(ctx: &CallContext<'_>, params: &Value) -> Result<Value, RpcError> {
    let resources = crate::policy::available(ctx.scope().resources(&ctx.app.upstreams).await);
    let items = resources.into_iter().map(|r| (r.name.clone(), renamed(&r.definition, "uri", &r.name)));
    page(ctx, params, "resources", items.collect())
}

/// `resources/templates/list`: the persona's resource templates of this endpoint, sorted.
pub async fn resource_templates_list(ctx: &CallContext<'_>, params: &Value) -> Result<Value, RpcError> {
    let templates = crate::policy::available(ctx.scope().templates(&ctx.app.upstreams).await);
    let items = templates.into_iter().map(|t| (t.name.clone(), renamed(&t.definition, "uriTemplate", &t.name)));
    page(ctx, params, "resourceTemplates", items.collect())
}

fn required_str<'p>(params: &'p Value, field: &str) -> Result<&'p str, RpcError> {
    params
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params(format!("params.{field} is required")))
}

impl CallContext<'_> {
    fn catalog_caller(&self) -> catalog_calls::Caller<'_> {
        catalog_calls::Caller {
            app: self.app,
            scope: self.scope(),
            persona: self.persona,
            meta: self.caller_meta.clone(),
        }
    }

    /// The MCP error of a failed resource, prompt or completion request.
    fn failure(&self, failure: Failure, what: &str) -> RpcError {
        match failure {
            Failure::NotFound(NotFound::Resource(uri)) => RpcError::resource_not_found(&uri, self.modern),
            Failure::NotFound(NotFound::Prompt(name)) => RpcError::unknown_prompt(&name),
            Failure::Invalid(detail) => RpcError::invalid_params(detail),
            Failure::TooLarge { size, limit } => RpcError::internal(format!(
                "The result of {what} is {size} bytes, over this persona's limit of {limit} bytes (maxResultBytes)"
            )),
            Failure::Upstream(CallError::Timeout(after)) => {
                RpcError::internal(format!("{what} did not answer within {} s and was cancelled", after.as_secs()))
            }
            Failure::Upstream(CallError::Unavailable(detail)) => {
                tracing::warn!(%detail, "{what}: upstream unavailable");
                RpcError::internal(format!("The server behind {what} is unavailable right now; try again later"))
            }
            Failure::Upstream(CallError::Rpc(error)) => {
                RpcError::from_upstream(i64::from(error.code.0), error.message.to_string(), error.data)
            }
        }
    }
}

/// Whether an upstream answered with a task.
fn is_task(result: &Value) -> bool {
    result.get("resultType").and_then(Value::as_str) == Some("task")
}

/// Only `tools/call` may become a task; an upstream's task for anything else is an invalid
/// answer (its id is not handed out).
fn task_refused(method: &str, event: &mut AuditEvent) -> RpcError {
    event.status = crate::audit::Status::Error;
    event.error_code = Some("unexpected_task".into());
    RpcError::internal(format!("The upstream answered {method} with a task, which only tools/call may"))
}

/// `resources/read`, routed by URI to the connection that serves it. A URI the persona may not
/// read answers exactly like one that does not exist.
pub async fn resources_read(ctx: &CallContext<'_>, params: &Value, event: &mut AuditEvent) -> Result<Value, RpcError> {
    let uri = required_str(params, "uri")?;
    match catalog_calls::read_resource(&ctx.catalog_caller(), uri, params, event).await {
        Ok(result) if is_task(&result) => Err(task_refused("resources/read", event)),
        Ok(result) => Ok(ctx.complete(result, true)),
        Err(failure) => Err(ctx.failure(failure, uri)),
    }
}

/// `prompts/get`, routed by name; hidden prompts are unknown prompts.
pub async fn prompts_get(ctx: &CallContext<'_>, params: &Value, event: &mut AuditEvent) -> Result<Value, RpcError> {
    let name = required_str(params, "name")?;
    match catalog_calls::get_prompt(&ctx.catalog_caller(), name, params, event).await {
        Ok(result) if is_task(&result) => Err(task_refused("prompts/get", event)),
        Ok(result) => Ok(ctx.complete(result, false)),
        Err(failure) => Err(ctx.failure(failure, name)),
    }
}

/// `completion/complete`, routed by its reference (a prompt, or a resource template or URI) to
/// the connection behind it; a reference the persona cannot see is refused like a missing one.
pub async fn completion_complete(
    ctx: &CallContext<'_>,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    match catalog_calls::complete(&ctx.catalog_caller(), params, event).await {
        Ok(result) if is_task(&result) => Err(task_refused("completion/complete", event)),
        Ok(result) => Ok(ctx.complete(result, false)),
        Err(failure) => Err(ctx.failure(failure, "completion/complete")),
    }
}

/// `resources/subscribe` and `resources/unsubscribe` (2025): the session remembers what it
/// follows, the upstream is asked to send updates, and updates reach the session's GET stream
/// (`notifications/resources/updated`, from whichever replica noticed them). A URI the persona
/// may not read is not found, as for `resources/read`.
pub async fn resource_subscription(
    ctx: &CallContext<'_>,
    mut session: crate::sessions::Session,
    subscribe: bool,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    let uri = required_str(params, "uri")?;
    let Some(resource) = ctx.scope().resolve_uri(&ctx.app.upstreams, uri).await else {
        event.status = crate::audit::Status::Invalid;
        event.error_code = Some("not_found".into());
        return Err(RpcError::resource_not_found(uri, false));
    };
    event.tool = Some(resource.canonical.clone());
    event.connection = Some(resource.connection.clone());
    let subscription = crate::sessions::Subscription {
        uri: uri.to_string(),
        connection: resource.connection.clone(),
        upstream_uri: resource.upstream_uri.clone(),
    };
    let known = session.subscriptions.iter().position(|s| *s == subscription);
    match (subscribe, known) {
        (true, None) => {
            resource
                .upstream
                .subscribe(&resource.upstream_uri)
                .await
                .map_err(|e| ctx.failure(Failure::Upstream(e), uri))?;
            // Followed by this replica until the session lets go or ends.
            ctx.app.followed.add(&session.id, &resource.upstream, &resource.upstream_uri);
            session.subscriptions.push(subscription);
        }
        (false, Some(index)) => {
            session.subscriptions.remove(index);
            let (tenant, connection) = (&session.tenant, &resource.connection);
            super::subscriptions::release(ctx.app, tenant, &session.id, connection, &resource.upstream_uri).await;
        }
        // Subscribing twice, or unsubscribing what was not subscribed, changes nothing.
        _ => return Ok(json!({})),
    }
    match ctx.app.sessions.save(session).await {
        Ok(_) => Ok(json!({})),
        Err(error) => {
            tracing::error!(?error, "Cannot store session");
            let mut e = RpcError::internal("The session store is unavailable; retry shortly");
            e.status = http::StatusCode::SERVICE_UNAVAILABLE;
            Err(e)
        }
    }
}

/// `tasks/get`, `tasks/update`, `tasks/cancel`: the answer of the upstream that runs the task,
/// whose `ttlMs` (how long the task lives) is not a cache hint.
pub async fn task_request(
    ctx: &CallContext<'_>,
    method: &str,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    let mut result = super::tasks::request(ctx, method, params, event).await?;
    result["resultType"] = json!("complete");
    protocol::set_meta(&mut result, protocol::META_SERVER_INFO, server_info());
    Ok(result)
}

/// `tools/call`, routed to the connection that serves the tool.
pub async fn tools_call(ctx: &CallContext<'_>, params: &Value, event: &mut AuditEvent) -> Result<Value, RpcError> {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return Err(RpcError::invalid_params("params.name is required"));
    };
    event.tool = Some(name.to_string());
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => Some(map.clone()),
        Some(_) => return Err(RpcError::invalid_params("params.arguments must be an object")),
    };
    // Hidden and non-existent tools are one and the same answer.
    let Some(tool) = ctx.scope().tool(&ctx.app.upstreams, name).await else {
        return Err(RpcError::unknown_tool(name));
    };
    if let Some(headers) = ctx.headers {
        let arguments = params.get("arguments").unwrap_or(&Value::Null);
        protocol::check_param_headers(headers, &tool.definition.input_schema, arguments)?;
    }
    match tool_call::check_tool_rate(ctx.app.limits.as_ref(), ctx.identity, ctx.persona, &tool, event).await {
        Ok(()) => {}
        Err(tool_call::ToolRateRefusal::Unavailable) => return Err(super::limiter_unavailable()),
        Err(tool_call::ToolRateRefusal::Throttled(decision)) => {
            return Err(super::throttled(&decision, &format!("tool-calls of {}", tool.name)));
        }
    }
    // The caller's other params (a retry's inputResponses and requestState), without copying
    // the arguments again.
    let extra = params
        .as_object()
        .map(|all| {
            all.iter()
                // `task` is 2025-11-25's task request, which Portcullis does not pass on.
                .filter(|(key, _)| !matches!(key.as_str(), "name" | "arguments" | "_meta" | "task"))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    match tool_call::call(ctx.persona, &tool, arguments, extra, &ctx.caller_meta, event).await {
        Ok(result) if is_task(&result) => {
            let mut task = super::tasks::handed_out(ctx, &tool, result, event).await?;
            // Its ttlMs is how long the task lives, not a cache hint.
            protocol::set_meta(&mut task, protocol::META_SERVER_INFO, server_info());
            Ok(task)
        }
        Ok(result) => Ok(ctx.complete(result, false)),
        Err(error) => Err(RpcError::from_upstream(i64::from(error.code.0), error.message.to_string(), error.data)),
    }
}
