//! MCP methods served by Portcullis itself: discovery, initialize, tools/list and tools/call.

use super::protocol::{self, RpcError};
use crate::audit::AuditEvent;
use crate::identity::Identity;
use crate::policy::{self, ExposedTool};
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
        }
    }

    async fn tools(&self) -> Vec<ExposedTool> {
        policy::endpoint_tools(&self.identity.tenant, self.tenant, self.endpoint, self.persona, &self.app.upstreams)
            .await
    }

    /// Adds what 2026-07-28 results carry.
    fn complete(&self, mut result: Value, cacheable: bool) -> Value {
        if self.modern {
            result["resultType"] = json!("complete");
            if cacheable {
                result["ttlMs"] = json!(LIST_TTL_MS);
                result["cacheScope"] = json!("private");
            }
            result["_meta"][protocol::META_SERVER_INFO] = server_info();
        } else if let Some(object) = result.as_object_mut() {
            object.remove("resultType");
        }
        result
    }
}

fn server_info() -> Value {
    json!({ "name": "portcullis", "version": env!("CARGO_PKG_VERSION") })
}

/// What this server offers. Tool-list changes reach 2026-07-28 clients on a
/// `subscriptions/listen` stream and 2025 sessions on their GET stream.
fn capabilities() -> Value {
    json!({ "tools": { "listChanged": true } })
}

/// `server/discover` (2026-07-28).
pub fn discover(ctx: &CallContext<'_>) -> Value {
    let mut result = json!({
        "supportedVersions": protocol::supported_versions(),
        "capabilities": capabilities(),
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

/// `tools/list`: the persona's tools of this endpoint, sorted, paged by an opaque cursor
/// (the last name of the previous page, so pages stay stable while the catalog changes).
pub async fn tools_list(ctx: &CallContext<'_>, params: &Value) -> Result<Value, RpcError> {
    let after = match params.get("cursor") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.is_empty() => None,
        Some(Value::String(c)) => Some(decode_cursor(c).ok_or_else(|| RpcError::invalid_params("Invalid cursor"))?),
        Some(_) => return Err(RpcError::invalid_params("Invalid cursor")),
    };
    let tools = ctx.tools().await;
    let page_size = ctx.app.settings.page_size.max(1);
    let mut remaining = tools.iter().filter(|t| after.as_deref().is_none_or(|a| t.name.as_str() > a)).peekable();
    let mut page = Vec::new();
    let mut last = None;
    while page.len() < page_size {
        let Some(tool) = remaining.next() else { break };
        let mut definition = serde_json::to_value(&tool.definition).unwrap_or_else(|_| json!({}));
        definition["name"] = json!(tool.name);
        page.push(definition);
        last = Some(tool.name.clone());
    }
    let mut result = json!({ "tools": page });
    if remaining.peek().is_some()
        && let Some(last) = last
    {
        result["nextCursor"] = json!(encode_cursor(&last));
    }
    Ok(ctx.complete(result, true))
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
    let Some(tool) = ctx.tools().await.into_iter().find(|t| t.name == name) else {
        return Err(RpcError::unknown_tool(name));
    };
    match tool_call::check_tool_rate(ctx.app.limits.as_ref(), ctx.identity, ctx.persona, &tool, event).await {
        Ok(()) => {}
        Err(tool_call::ToolRateRefusal::Unavailable) => return Err(super::limiter_unavailable()),
        Err(tool_call::ToolRateRefusal::Throttled(decision)) => {
            return Err(super::throttled(&decision, &format!("tool-calls of {}", tool.name)));
        }
    }
    match tool_call::call(ctx.persona, &tool, arguments, event).await {
        Ok(result) => Ok(ctx.complete(result, false)),
        Err(error) => {
            let mut e = RpcError::internal(error.message.to_string());
            e.code = i64::from(error.code.0);
            e.data = error.data;
            Err(e)
        }
    }
}
