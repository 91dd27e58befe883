//! Multi round-trip requests (2026-07-28): `tools/call`, `prompts/get` and `resources/read`
//! may answer `input_required` (asking the client for elicitation, sampling or roots) with a
//! `requestState` the client echoes on its retry. Portcullis never hands out an upstream's
//! request state as is: it seals it into its own (`request_state`), bound to this caller,
//! endpoint and request, so a retry reaching any replica is checked and routed, and a tampered,
//! expired or borrowed one is refused.
//!
//! A 2025 client cannot answer `input_required`: Portcullis asks it instead, with real
//! `sampling/createMessage`, `elicitation/create` or `roots/list` requests on the request's
//! stream (only what it declared at `initialize`), and retries the upstream with the answers
//! until the result is complete.

use super::methods::{self, CallContext};
use super::protocol::RpcError;
use crate::audit::{AuditEvent, Status};
use crate::request_state;
use chrono::Utc;
use serde_json::{Map, Value, json};

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
    let name = params.get(field).and_then(Value::as_str).unwrap_or_default();
    // Copied only when a retry's state is opened or a 2025 client's answers are added.
    let mut params = std::borrow::Cow::Borrowed(params);
    let opened = params.get("requestState").map(|token| {
        token
            .as_str()
            .ok_or(request_state::Refused)
            .and_then(|t| request_state::open(ctx.request_state_key(), &ctx.binding(method, name), t, Utc::now()))
    });
    match opened {
        None => {}
        Some(Ok(Some(upstream))) => params.to_mut()["requestState"] = json!(upstream),
        Some(Ok(None)) => {
            if let Some(object) = params.to_mut().as_object_mut() {
                object.remove("requestState");
            }
        }
        Some(Err(refused)) => {
            event.status = Status::Invalid;
            event.error_code = Some("request_state".into());
            return Err(RpcError::invalid_params(refused.to_string()));
        }
    }
    let mut rounds = 0;
    let mut result = loop {
        let result = match method {
            "tools/call" => methods::tools_call(ctx, &params, event).await?,
            "prompts/get" => methods::prompts_get(ctx, &params, event).await?,
            _ => methods::resources_read(ctx, &params, event).await?,
        };
        if result.get("resultType").and_then(Value::as_str) != Some("input_required") || ctx.modern() {
            break result;
        }
        rounds += 1;
        if rounds > MAX_BRIDGED_ROUNDS {
            event.status = Status::Error;
            event.error_code = Some("input_required".into());
            return Err(RpcError::internal(format!(
                "{name} kept asking for input after {MAX_BRIDGED_ROUNDS} rounds; giving up"
            )));
        }
        let answers = ask_client(ctx, name, &result).await.inspect_err(|_| {
            event.status = Status::Error;
            event.error_code = Some("input_required".into());
        })?;
        // The retry: the original params, the answers, and the upstream's state as it gave it.
        let object = params.to_mut().as_object_mut().expect("params are an object");
        object.insert("inputResponses".into(), Value::Object(answers));
        match result.get("requestState") {
            Some(state) => object.insert("requestState".into(), state.clone()),
            None => object.remove("requestState"),
        };
    };
    if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
        return Ok(result);
    }
    let upstream = result.get("requestState").and_then(Value::as_str).map(str::to_string);
    result["requestState"] = json!(request_state::seal(
        ctx.request_state_key(),
        &ctx.binding(method, name),
        upstream.as_deref(),
        Utc::now()
    ));
    super::protocol::set_meta(&mut result, super::protocol::META_SERVER_INFO, methods::server_info());
    Ok(result)
}

/// Rounds of input a 2025 client is asked for within one request before Portcullis gives up.
const MAX_BRIDGED_ROUNDS: usize = 8;

/// Asks a 2025 client for what an `input_required` result lists, all at once, on the request's
/// stream; the answers by the upstream's keys.
async fn ask_client(ctx: &CallContext<'_>, name: &str, result: &Value) -> Result<Map<String, Value>, RpcError> {
    let Some((relay, session)) = ctx.client_channel() else {
        return Err(RpcError::internal(format!(
            "{name} needs input from the client (elicitation, sampling or roots), which Portcullis asks on the request's event stream: send Accept: text/event-stream"
        )));
    };
    let requests = result.get("inputRequests").and_then(Value::as_object).cloned().unwrap_or_default();
    let declared = session.client_capabilities.clone().unwrap_or_default();
    let mut asked = Vec::new();
    for (key, request) in requests {
        let method = request.get("method").and_then(Value::as_str).unwrap_or_default().to_string();
        let Some(capability) = crate::connectors::legacy_calls::capability_for(&method) else {
            return Err(RpcError::internal(format!(
                "{name} asked the client for {method:?}, which MCP does not define"
            )));
        };
        if declared.get(capability).is_none() {
            return Err(RpcError::internal(format!(
                "{name} needs {method} from the client, which this session did not declare at initialize"
            )));
        }
        let params = request.get("params").cloned().unwrap_or_else(|| json!({}));
        asked.push(async move {
            let answer = relay.ask(ctx.client_replies(), &session.id, &method, params, ctx.call_timeout()).await?;
            Ok::<_, RpcError>((key, answer))
        });
    }
    Ok(futures::future::try_join_all(asked).await?.into_iter().collect())
}
