//! Multi round-trip requests (2026-07-28): `tools/call`, `prompts/get` and `resources/read`
//! may answer `input_required` (asking the client for elicitation, sampling or roots) with a
//! `requestState` the client echoes on its retry. Portcullis never hands out an upstream's
//! request state as is: it seals it into its own (`request_state`), bound to this caller,
//! endpoint and request, so a retry reaching any replica is checked and routed, and a tampered,
//! expired or borrowed one is refused.

use super::methods::{self, CallContext};
use super::protocol::RpcError;
use crate::audit::{AuditEvent, Status};
use crate::request_state;
use chrono::Utc;
use serde_json::{Value, json};

/// One round of `method`: opens the caller's request state (if any) into the upstream's,
/// forwards the request, and seals the upstream's request state into the answer when it asks
/// for input again.
pub async fn round(
    ctx: &CallContext<'_>,
    method: &str,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    let field = if method == "resources/read" { "uri" } else { "name" };
    let name = params.get(field).and_then(Value::as_str).unwrap_or_default().to_string();
    let binding = ctx.binding(method, &name);
    let mut params = params.clone();
    if let Some(token) = params.get("requestState") {
        let opened = token
            .as_str()
            .ok_or(request_state::Refused)
            .and_then(|t| request_state::open(ctx.request_state_key(), &binding, t, Utc::now()));
        match opened {
            Ok(Some(upstream)) => params["requestState"] = json!(upstream),
            Ok(None) => {
                if let Some(object) = params.as_object_mut() {
                    object.remove("requestState");
                }
            }
            Err(refused) => {
                event.status = Status::Invalid;
                event.error_code = Some("request_state".into());
                return Err(RpcError::invalid_params(refused.to_string()));
            }
        }
    }
    let mut result = match method {
        "tools/call" => methods::tools_call(ctx, &params, event).await?,
        "prompts/get" => methods::prompts_get(ctx, &params, event).await?,
        _ => methods::resources_read(ctx, &params, event).await?,
    };
    if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
        return Ok(result);
    }
    if !ctx.modern() {
        // A 2025 client cannot answer input_required; asking it through server-initiated
        // requests on its session is not built yet.
        event.status = Status::Error;
        event.error_code = Some("input_required".into());
        return Err(RpcError::internal(format!(
            "{name} needs input from the client (elicitation, sampling or roots), which Portcullis cannot yet request from a 2025 session; use a 2026-07-28 client"
        )));
    }
    let upstream = result.get("requestState").and_then(Value::as_str).map(str::to_string);
    result["requestState"] =
        json!(request_state::seal(ctx.request_state_key(), &binding, upstream.as_deref(), Utc::now()));
    result["_meta"][super::protocol::META_SERVER_INFO] =
        json!({ "name": "portcullis", "version": env!("CARGO_PKG_VERSION") });
    Ok(result)
}
