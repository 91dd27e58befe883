//! Reading a resource, getting a prompt and completing an argument: the same for MCP and REST.
//! Each resolves the caller's name for the thing to the connection behind it (what the persona
//! may not see is not found), forwards the request with the upstream's own names, and fills in
//! the audit fields. The caller's protocol turns a `Failure` into its own error.

use crate::audit::{AuditEvent, Status};
use crate::connectors::{CallError, CallerMeta, McpUpstream};
use crate::policy::Scope;
use crate::state::AppState;
use portcullis_crds::snapshot::CompiledPersona;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Why a request produced no result.
#[derive(Debug)]
pub enum Failure {
    /// No such resource, prompt or reference for this caller (hidden ones included).
    NotFound(NotFound),
    /// The request itself is malformed.
    Invalid(String),
    /// The upstream failed or refused.
    Upstream(CallError),
    /// The result is larger than the persona's `maxResultBytes`.
    TooLarge {
        /// Size of the result in bytes.
        size: u64,
        /// The persona's limit.
        limit: u64,
    },
}

/// What was not found, for the error message of the caller's protocol.
#[derive(Debug)]
pub enum NotFound {
    /// A resource URI.
    Resource(String),
    /// A prompt name.
    Prompt(String),
}

/// The caller's scope and limits.
pub struct Caller<'a> {
    /// Application state (upstreams).
    pub app: &'a AppState,
    /// Names and visibility.
    pub scope: Scope<'a>,
    /// Limits.
    pub persona: &'a CompiledPersona,
    /// What the caller's request metadata passes on upstream.
    pub meta: CallerMeta,
}

impl Caller<'_> {
    fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.persona.limits.tool_timeout_seconds))
    }

    fn check_size(&self, result: &Value, event: &mut AuditEvent) -> Result<(), Failure> {
        let size = crate::tool_call::json_size(result);
        let limit = self.persona.limits.max_result_bytes;
        if size > limit {
            event.status = Status::Error;
            event.error_code = Some("result_too_large".into());
            return Err(Failure::TooLarge { size, limit });
        }
        Ok(())
    }
}

fn not_found(failure: NotFound, event: &mut AuditEvent) -> Failure {
    event.status = Status::Invalid;
    event.error_code = Some("not_found".into());
    Failure::NotFound(failure)
}

fn upstream_failed(error: CallError, event: &mut AuditEvent) -> Failure {
    event.status = Status::Error;
    event.error_code = Some(match &error {
        CallError::Timeout(_) => "timeout".into(),
        CallError::Unavailable(_) => "upstream_unavailable".into(),
        CallError::Rpc(e) => e.code.0.to_string(),
    });
    Failure::Upstream(error)
}

/// Copies the caller's params for the upstream, without the caller's own `_meta`.
pub fn upstream_params(params: &Value) -> Map<String, Value> {
    let mut params = params.as_object().cloned().unwrap_or_default();
    params.remove("_meta");
    params
}

/// `resources/read` of `uri` (as the caller names it); `params` are the caller's other params.
/// The contents come back with their URIs as the caller names them.
pub async fn read_resource(
    caller: &Caller<'_>,
    uri: &str,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, Failure> {
    let Some(resource) = caller.scope.resolve_uri(&caller.app.upstreams, uri).await else {
        return Err(not_found(NotFound::Resource(uri.to_string()), event));
    };
    event.tool = Some(resource.canonical.clone());
    event.connection = Some(resource.connection.clone());
    let mut forwarded = upstream_params(params);
    forwarded.insert("uri".into(), json!(resource.upstream_uri));
    let mut result = match resource.upstream.request("resources/read", forwarded, &caller.meta, caller.timeout()).await
    {
        Ok(result) => result,
        // Not found upstream (2025's -32002 or 2026-07-28's -32602) is not found here.
        Err(CallError::Rpc(e)) if e.code.0 == -32002 || e.code.0 == -32602 => {
            return Err(not_found(NotFound::Resource(uri.to_string()), event));
        }
        Err(error) => return Err(upstream_failed(error, event)),
    };
    if caller.scope.prefixed()
        && let Some((prefix, _)) = resource.canonical.split_once('+')
        && let Some(contents) = result.get_mut("contents").and_then(Value::as_array_mut)
    {
        for content in contents {
            if let Some(inner) = content.get("uri").and_then(Value::as_str) {
                content["uri"] = json!(format!("{prefix}+{inner}"));
            }
        }
    }
    caller.check_size(&result, event)?;
    Ok(result)
}

/// `prompts/get` of `name` (as the caller names it) with the caller's params.
pub async fn get_prompt(
    caller: &Caller<'_>,
    name: &str,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, Failure> {
    let prompts = caller.scope.prompts(&caller.app.upstreams).await;
    let Some(prompt) = prompts.into_iter().find(|p| p.name == name) else {
        return Err(not_found(NotFound::Prompt(name.to_string()), event));
    };
    event.tool = Some(prompt.canonical.clone());
    event.connection = Some(prompt.connection.clone());
    let mut forwarded = upstream_params(params);
    forwarded.insert("name".into(), json!(prompt.upstream_name));
    let result = prompt
        .upstream
        .request("prompts/get", forwarded, &caller.meta, caller.timeout())
        .await
        .map_err(|e| upstream_failed(e, event))?;
    caller.check_size(&result, event)?;
    Ok(result)
}

/// `completion/complete` routed by `params.ref` (a prompt, or a resource template or URI).
pub async fn complete(caller: &Caller<'_>, params: &Value, event: &mut AuditEvent) -> Result<Value, Failure> {
    let Some(reference) = params.get("ref").filter(|r| r.is_object()) else {
        return Err(Failure::Invalid(
            "ref is required: {\"type\": \"ref/prompt\", \"name\": …} or {\"type\": \"ref/resource\", \"uri\": …}"
                .into(),
        ));
    };
    let field = |name: &str| {
        reference.get(name).and_then(Value::as_str).ok_or_else(|| Failure::Invalid(format!("ref.{name} is required")))
    };
    let upstreams = &caller.app.upstreams;
    let (upstream, upstream_ref, canonical, connection): (Arc<McpUpstream>, Value, String, String) =
        match reference.get("type").and_then(Value::as_str) {
            Some("ref/prompt") => {
                let name = field("name")?;
                let prompts = caller.scope.prompts(upstreams).await;
                let Some(prompt) = prompts.into_iter().find(|p| p.name == name) else {
                    return Err(not_found(NotFound::Prompt(name.to_string()), event));
                };
                let upstream_ref = json!({ "type": "ref/prompt", "name": prompt.upstream_name });
                (prompt.upstream, upstream_ref, prompt.canonical, prompt.connection)
            }
            Some("ref/resource") => {
                let uri = field("uri")?;
                let template = caller.scope.templates(upstreams).await.into_iter().find(|t| t.name == uri);
                let (upstream, upstream_uri, canonical, connection) = match template {
                    Some(t) => (t.upstream, t.upstream_name, t.canonical, t.connection),
                    None => match caller.scope.resolve_uri(upstreams, uri).await {
                        Some(r) => (r.upstream, r.upstream_uri, r.canonical, r.connection),
                        None => return Err(not_found(NotFound::Resource(uri.to_string()), event)),
                    },
                };
                (upstream, json!({ "type": "ref/resource", "uri": upstream_uri }), canonical, connection)
            }
            _ => return Err(Failure::Invalid("ref.type must be ref/prompt or ref/resource".into())),
        };
    event.tool = Some(canonical);
    event.connection = Some(connection);
    if !upstream.catalog().completions {
        // The upstream offers no completion: nothing to suggest.
        return Ok(json!({ "completion": { "values": [], "hasMore": false } }));
    }
    let mut forwarded = upstream_params(params);
    // Only tools/call, prompts/get and resources/read take part in multi round-trip requests
    // (and only through `mcp::mrtr`, which checks the caller's sealed state).
    forwarded.remove("requestState");
    forwarded.remove("inputResponses");
    forwarded.insert("ref".into(), upstream_ref);
    upstream
        .request("completion/complete", forwarded, &caller.meta, caller.timeout())
        .await
        .map_err(|e| upstream_failed(e, event))
}
