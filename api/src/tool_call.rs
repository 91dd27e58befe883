//! One tool call, the same for MCP and REST: tool-call rate limit, the upstream call with the
//! persona's timeout and result-size cap, and the audit fields it fills in.

use crate::audit::{AuditEvent, Status};
use crate::connectors::{CallError, CallerMeta};
use crate::identity::Identity;
use crate::limits::{Class, Decision, RateLimiter, first_refusal};
use crate::policy::ExposedTool;
use portcullis_crds::snapshot::CompiledPersona;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// A per-tool budget (`limits.perTool`) refused the call, or could not be decided.
pub enum ToolRateRefusal {
    /// Over the tool's budget.
    Throttled(Decision),
    /// The limiter is unavailable: fail closed.
    Unavailable,
}

/// Decides the tool's own budget when the persona gives it one (`limits.perTool`); tools without
/// a rule cost nothing here. Each matching tool has its own bucket per principal.
pub async fn check_tool_rate(
    limits: &dyn RateLimiter,
    identity: &Identity,
    persona: &CompiledPersona,
    tool: &ExposedTool,
    event: &mut AuditEvent,
) -> Result<(), ToolRateRefusal> {
    let Some(per_minute) = persona.tool_rate(&tool.canonical) else { return Ok(()) };
    event.tool = Some(tool.canonical.clone());
    event.connection = Some(tool.connection.clone());
    let principal = format!("{}|tool:{}", identity.subject, tool.canonical);
    let Ok(decisions) = limits.check_many(&identity.tenant, &principal, &[(Class::ToolCalls, per_minute)]).await else {
        event.status = Status::Error;
        event.detail = Some("rate limiter unavailable".into());
        return Err(ToolRateRefusal::Unavailable);
    };
    match first_refusal(&decisions) {
        None => Ok(()),
        Some((_, decision)) => {
            event.status = Status::Throttled;
            event.error_code = Some("429".into());
            event.detail = Some(format!("per-tool limit of {per_minute} calls per minute"));
            Err(ToolRateRefusal::Throttled(decision))
        }
    }
}

/// The size of `value` as compact JSON, counted without building the text (results can be
/// large, and are serialised again for the response).
pub fn json_size(value: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len() as u64;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// A tool result the model reads as a failure.
pub(crate) fn error_result(text: String) -> Value {
    json!({ "content": [{ "type": "text", "text": text }], "isError": true })
}

/// Calls `tool` for `persona`, whose tool-call rate limit the caller has already decided (in the
/// same Redis round trip as the request limit). Failures the model should read (timeout, an
/// upstream that is down, a result over the size cap) come back as tool results with
/// `isError: true`.
/// `extra` holds the caller's other params for the upstream (a retry's `inputResponses`, the
/// upstream's `requestState`).
pub async fn call(
    persona: &CompiledPersona,
    tool: &ExposedTool,
    arguments: Option<Map<String, Value>>,
    extra: Map<String, Value>,
    caller: &CallerMeta,
    event: &mut AuditEvent,
) -> Result<Value, rmcp::ErrorData> {
    event.tool = Some(tool.canonical.clone());
    event.connection = Some(tool.connection.clone());
    let timeout = Duration::from_secs(u64::from(persona.limits.tool_timeout_seconds));
    match tool.upstream.call(&tool.upstream_name, arguments, extra, caller, timeout).await {
        Ok(value) => {
            let size = json_size(&value);
            if size > persona.limits.max_result_bytes {
                event.status = Status::Error;
                event.error_code = Some("result_too_large".into());
                return Ok(error_result(format!(
                    "The result of {} is {size} bytes, over this persona's limit of {} bytes (maxResultBytes).",
                    tool.name, persona.limits.max_result_bytes
                )));
            }
            if value.get("isError") == Some(&Value::Bool(true)) {
                event.status = Status::Error;
                event.error_code = Some("tool_error".into());
            }
            Ok(value)
        }
        Err(CallError::Timeout(after)) => {
            event.status = Status::Error;
            event.error_code = Some("timeout".into());
            Ok(error_result(format!("{} did not answer within {} s and was cancelled.", tool.name, after.as_secs())))
        }
        Err(CallError::Unavailable(detail)) => {
            tracing::warn!(connection = %tool.connection, %detail, "Tool call failed: upstream unavailable");
            event.status = Status::Error;
            event.error_code = Some("upstream_unavailable".into());
            event.detail = Some("upstream unavailable".into());
            Ok(error_result(format!(
                "The server behind {} (connection {:?}) is unavailable right now; try again later.",
                tool.name, tool.connection
            )))
        }
        Err(CallError::Rpc(error)) => {
            event.status = Status::Error;
            event.error_code = Some(error.code.0.to_string());
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_size_is_the_length_of_the_compact_text() {
        for value in [
            serde_json::json!({"content": [{"type": "text", "text": "héllo \"quoted\" \n line"}], "isError": false}),
            serde_json::json!(null),
            serde_json::json!([1, 2.5, "x", {"a": {"b": []}}]),
        ] {
            assert_eq!(super::json_size(&value), value.to_string().len() as u64, "{value}");
        }
    }
}
