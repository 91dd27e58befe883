//! The tasks extension (`io.modelcontextprotocol/tasks`, 2026-07-28) passed through to
//! upstreams that offer it.
//!
//! An upstream decides per `tools/call` whether to answer with a task (`resultType: "task"`)
//! instead of a result, and only when the request declared the extension; the caller then polls
//! `tasks/get`, answers the task's own requests for input with `tasks/update` and may
//! `tasks/cancel` it. Every caller's tasks live at the upstream under Portcullis's one identity,
//! so the upstream's task id is never handed out: the caller gets a task handle of Portcullis's
//! own, sealed (ChaCha20-Poly1305: tamper-evident and unreadable) and bound to the caller,
//! endpoint, tool, connection, the upstream's URL and the task's creation time, and expiring with
//! the task. Any replica opens it and routes the request; a handle from another caller, a forged,
//! garbled or expired one, one whose upstream now has another task under that id, or one whose
//! tool the persona may no longer see is an unknown task (`-32602`), exactly like one that never
//! existed.
//!
//! For a 2025 upstream, which has no tasks, Portcullis runs the tools a connection names in
//! `runAsTasks` as tasks itself (`connectors::task_runs`); their handles are made and served
//! here the same way.
//!
//! 2025 clients never see tasks: the extension is not announced to them nor passed upstream on
//! their behalf (2025-11-25's own tasks are a different, core design with no 1:1 mapping).

use super::methods::CallContext;
use super::protocol::RpcError;
use crate::audit::{AuditEvent, Status};
use base64::Engine;
use chrono::{DateTime, Utc};
use portcullis_store::secret_box::SecretKey;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The extension's identifier in `capabilities.extensions`.
pub const EXTENSION: &str = "io.modelcontextprotocol/tasks";

const PREFIX: &str = "pct1.";

/// How long a handle lives when the upstream gives its task no lifetime (`ttlMs: null`).
const UNLIMITED_TASK_HANDLE: chrono::Duration = chrono::Duration::days(7);

/// The statuses a task can have; anything else from an upstream is not recorded as given.
const STATUSES: [&str; 5] = ["working", "input_required", "completed", "failed", "cancelled"];

/// Whether declared client capabilities take tasks (the key is present, as upstreams check it).
pub fn declared(capabilities: Option<&Value>) -> bool {
    capabilities.and_then(|c| c.get("extensions")).and_then(|e| e.get(EXTENSION)).is_some()
}

/// Capabilities a 2025 client declared, as passed upstream: without the tasks extension, which
/// that client cannot follow.
pub fn without_tasks(capabilities: Option<Value>) -> Option<Value> {
    let mut capabilities = capabilities?;
    if let Some(extensions) = capabilities.get_mut("extensions").and_then(Value::as_object_mut) {
        extensions.remove(EXTENSION);
    }
    Some(capabilities)
}

/// What a task handle is bound to and where its task lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handle {
    /// Tenant of the endpoint.
    pub tenant: String,
    /// The caller's subject.
    pub subject: String,
    /// Endpoint name.
    pub endpoint: String,
    /// The tool's canonical name (`<prefix>.<name>`), which the persona must still see.
    pub tool: String,
    /// The connection whose upstream runs the task.
    pub connection: String,
    /// SHA-256 of the upstream's URL: a connection pointed elsewhere has none of these tasks.
    pub url_digest: String,
    /// The upstream's own task id.
    pub upstream: String,
    /// The task's `createdAt` as the upstream gave it: an id reused for another task is not
    /// this one.
    pub created_at: String,
    /// When the handle stops opening (the task's lifetime, or a week when it has none).
    pub expires: DateTime<Utc>,
}

/// What is sealed: a handle, tagged so no other sealed token of Portcullis's can pass for one.
#[derive(Serialize, Deserialize)]
struct Sealed {
    kind: String,
    handle: Handle,
}

const KIND: &str = "task";

/// Seals a handle into the task id a caller is given.
pub fn seal(key: &SecretKey, handle: &Handle) -> String {
    let sealed = Sealed { kind: KIND.into(), handle: handle.clone() };
    let plaintext = serde_json::to_vec(&sealed).unwrap_or_default();
    format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.seal(&plaintext)))
}

/// Opens a task id; `None` for anything Portcullis did not seal with this key as a task handle,
/// or that has expired.
pub fn open(key: &SecretKey, task_id: &str, now: DateTime<Utc>) -> Option<Handle> {
    let encoded = task_id.strip_prefix(PREFIX)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let sealed: Sealed = serde_json::from_slice(&key.open(&bytes).ok()?).ok()?;
    (sealed.kind == KIND && sealed.handle.expires > now).then_some(sealed.handle)
}

/// SHA-256 of an upstream URL, as handles hold it.
pub fn url_digest(url: &str) -> String {
    portcullis_crds::keys::digest(url)
}

/// When a handle for a task created `now` with lifetime `ttl_ms` expires.
fn expiry(ttl_ms: Option<&Value>, now: DateTime<Utc>) -> DateTime<Utc> {
    // Capped before adding: the lifetime comes from the upstream, and must not overflow.
    let longest = UNLIMITED_TASK_HANDLE.num_milliseconds().unsigned_abs();
    let ms = ttl_ms.and_then(Value::as_u64).map_or(longest, |ms| ms.min(longest));
    now + chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The error for a task this caller cannot reach, whatever the reason.
fn unknown_task(task_id: &str) -> RpcError {
    RpcError::invalid_params(format!("Unknown task: {task_id}")).with_data(json!({ "taskId": task_id }))
}

/// -32021: the request did not declare the extension it needs.
pub fn missing_extension() -> RpcError {
    let error = missing_extension_error();
    RpcError::from_upstream(i64::from(error.code.0), error.message, error.data)
}

/// The same, as connectors answer it.
pub fn missing_extension_error() -> rmcp::ErrorData {
    crate::connectors::legacy_calls::missing_capability(json!({ "extensions": { EXTENSION: {} } }))
}

/// A task status for the audit log: one of the extension's, never free text from an upstream.
fn status_of(task: &Value) -> &'static str {
    let status = task.get("status").and_then(Value::as_str).unwrap_or_default();
    STATUSES.iter().find(|s| **s == status).copied().unwrap_or("unrecognised")
}

/// A `tools/call` result the upstream turned into a task: its id becomes a sealed handle.
/// Refused when the caller did not ask for tasks (the upstream broke the rule, and the caller
/// could not follow the task; it is cancelled upstream).
pub async fn handed_out(
    ctx: &CallContext<'_>,
    tool: &crate::policy::ExposedTool,
    mut result: Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    let upstream_id = result.get("taskId").and_then(Value::as_str).map(str::to_string);
    let Some(upstream_id) = upstream_id else {
        event.status = Status::Error;
        event.error_code = Some("invalid_task".into());
        return Err(RpcError::internal(format!("The server behind {} answered with a task without an id", tool.name)));
    };
    if !ctx.takes_tasks() {
        let cancel = Map::from_iter([("taskId".to_string(), json!(upstream_id))]);
        let _ = tool.upstream.request("tasks/cancel", cancel, ctx.caller_meta(), ctx.call_timeout()).await;
        event.status = Status::Error;
        event.error_code = Some("unexpected_task".into());
        return Err(RpcError::internal(format!(
            "The server behind {} answered with a task, which this request did not ask for",
            tool.name
        )));
    }
    let now = Utc::now();
    let handle = Handle {
        tenant: ctx.tenant_name().to_string(),
        subject: ctx.subject().to_string(),
        endpoint: ctx.endpoint_name().to_string(),
        tool: tool.canonical.clone(),
        connection: tool.connection.clone(),
        url_digest: url_digest(tool.upstream.url()),
        upstream: upstream_id,
        created_at: result.get("createdAt").and_then(Value::as_str).unwrap_or_default().to_string(),
        expires: expiry(result.get("ttlMs"), now),
    };
    result["taskId"] = json!(seal(ctx.request_state_key(), &handle));
    if let Some(object) = result.as_object_mut() {
        // Not a list: nothing to cache.
        object.remove("cacheScope");
        object.remove("requestState");
    }
    event.detail = Some(format!("task created ({})", status_of(&result)));
    Ok(result)
}

/// `tasks/get`, `tasks/update` or `tasks/cancel` (2026-07-28 callers only): opened, checked
/// against the caller and persona, and forwarded to the upstream that runs the task.
pub async fn request(
    ctx: &CallContext<'_>,
    method: &str,
    params: &Value,
    event: &mut AuditEvent,
) -> Result<Value, RpcError> {
    let task_id = params.get("taskId").and_then(Value::as_str);
    let opened = task_id.and_then(|id| open(ctx.request_state_key(), id, Utc::now())).filter(|h| ctx.owns(h));
    // A replica whose catalogs are not loaded yet still serves a valid handle.
    if opened.is_none() && !ctx.offers_tasks() {
        return Err(RpcError::method_not_found(method, true));
    }
    if !ctx.takes_tasks() {
        event.status = Status::Invalid;
        event.error_code = Some("-32021".into());
        return Err(missing_extension());
    }
    let Some(task_id) = task_id else {
        return Err(RpcError::invalid_params("params.taskId is required"));
    };
    let Some(handle) = opened else {
        event.status = Status::Invalid;
        event.detail = Some("unknown task".into());
        return Err(unknown_task(task_id));
    };
    event.tool = Some(handle.tool.clone());
    event.connection = Some(handle.connection.clone());
    // What the persona may no longer see is gone, tasks included; so is a task of another
    // server now behind the same connection name.
    let tool = ctx
        .visible_tool(&handle.tool, &handle.connection)
        .await
        .filter(|tool| url_digest(tool.upstream.url()) == handle.url_digest);
    let Some(tool) = tool else {
        event.status = Status::Invalid;
        event.detail = Some("unknown task".into());
        return Err(unknown_task(task_id));
    };
    // A task Portcullis runs is served whatever the upstream speaks.
    if !tool.upstream.speaks_modern() && !crate::connectors::task_runs::is_run(&handle.upstream) {
        event.status = Status::Error;
        event.detail = Some("the upstream does not speak 2026-07-28 right now".into());
        return Err(RpcError::internal(
            "The server running this task cannot be reached in 2026-07-28 right now; try again later",
        ));
    }
    // Only what the method takes: the upstream's id, and for an update the answers.
    let mut forwarded = Map::from_iter([("taskId".to_string(), json!(handle.upstream))]);
    if method == "tasks/update" {
        forwarded.insert("inputResponses".into(), params.get("inputResponses").cloned().unwrap_or_else(|| json!({})));
    }
    let hide = |text: String| text.replace(&handle.upstream, task_id);
    let answer = tool.upstream.request(method, forwarded, ctx.caller_meta(), ctx.call_timeout()).await;
    let mut result = match answer {
        Ok(result) => result,
        Err(crate::connectors::CallError::Rpc(error)) => {
            event.status = Status::Error;
            // The upstream forgot the task (expired, restarted): the caller's id is unknown.
            if error.code.0 == -32602 && method != "tasks/update" {
                event.detail = Some("unknown task upstream".into());
                return Err(unknown_task(task_id));
            }
            let data = error.data.and_then(|d| serde_json::from_str(&hide(d.to_string())).ok());
            return Err(RpcError::from_upstream(i64::from(error.code.0), hide(error.message.to_string()), data));
        }
        Err(crate::connectors::CallError::Timeout(after)) => {
            event.status = Status::Error;
            event.detail = Some("timeout".into());
            return Err(RpcError::internal(format!("{method} did not answer within {} s", after.as_secs())));
        }
        Err(crate::connectors::CallError::Unavailable(detail)) => {
            tracing::warn!(connection = %handle.connection, %detail, "{method}: upstream unavailable");
            event.status = Status::Error;
            event.detail = Some("upstream unavailable".into());
            return Err(RpcError::internal(format!(
                "The server running this task ({}) is unavailable right now; try again later",
                tool.name
            )));
        }
    };
    if result.get("resultType").and_then(Value::as_str).is_some_and(|t| t != "complete") {
        event.status = Status::Error;
        event.detail = Some("the upstream answered with something other than a complete result".into());
        return Err(RpcError::internal(format!(
            "The server running this task answered {method} with an invalid result"
        )));
    }
    if method != "tasks/get" {
        // Acknowledgements are empty.
        return Ok(json!({}));
    }
    if !result.is_object() {
        result = json!({});
    }
    if result.get("taskId").and_then(Value::as_str) != Some(handle.upstream.as_str())
        || result.get("createdAt").and_then(Value::as_str).unwrap_or_default() != handle.created_at
    {
        // The upstream has another task under this id now.
        event.status = Status::Invalid;
        event.detail = Some("unknown task (the upstream's id now names another task)".into());
        return Err(unknown_task(task_id));
    }
    // The caller knows the task by its handle only.
    result["taskId"] = json!(task_id);
    if let Some(object) = result.as_object_mut() {
        object.remove("cacheScope");
        object.remove("requestState");
    }
    let status = status_of(&result);
    event.detail = Some(format!("task {status}"));
    if status == "failed" {
        event.status = Status::Error;
        event.error_code = Some("task_failed".into());
    } else if result.get("result").and_then(|r| r.get("isError")) == Some(&Value::Bool(true)) {
        event.status = Status::Error;
        event.error_code = Some("tool_error".into());
    }
    ctx.cap_task_answer(&mut result, &tool.name, event)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_text("0123456789abcdef0123456789abcdef-test-key").unwrap()
    }

    fn handle(now: DateTime<Utc>) -> Handle {
        Handle {
            tenant: "acme".into(),
            subject: "apikey:a".into(),
            endpoint: "tools".into(),
            tool: "jobs.slow_compute".into(),
            connection: "jobs".into(),
            url_digest: url_digest("http://jobs:8080/mcp"),
            upstream: "0c3f-upstream-task".into(),
            created_at: "2026-11-23T20:00:00Z".into(),
            expires: expiry(Some(&json!(60_000)), now),
        }
    }

    #[test]
    fn a_handle_opens_only_as_sealed_until_it_expires_and_hides_the_upstream_id() {
        let now = Utc::now();
        let token = seal(&key(), &handle(now));
        assert!(token.starts_with(PREFIX));
        assert!(!token.contains("0c3f-upstream-task") && !token.contains("apikey"), "nothing is readable");
        assert_eq!(open(&key(), &token, now), Some(handle(now)));
        assert_eq!(open(&key(), &token, now + chrono::Duration::seconds(61)), None, "expired with the task");
        let other_key = SecretKey::from_text("another-key-another-key-another-key-1234").unwrap();
        assert_eq!(open(&other_key, &token, now), None);
        assert_eq!(open(&key(), "0c3f-upstream-task", now), None);
        assert_eq!(open(&key(), &format!("{token}A"), now), None);
        let mut flipped = token.into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(open(&key(), &String::from_utf8(flipped).unwrap(), now), None);
        // A request state sealed with the same key is no task handle.
        let binding = crate::request_state::Binding {
            tenant: "acme".into(),
            subject: "apikey:a".into(),
            endpoint: "tools".into(),
            method: "tools/call".into(),
            name: "x".into(),
        };
        let state = crate::request_state::seal(&key(), &binding, Some("s"), now);
        assert_eq!(open(&key(), &state.replacen("pcs1.", PREFIX, 1), now), None);
    }

    #[test]
    fn handles_live_as_long_as_their_task_and_at_most_a_week() {
        let now = Utc::now();
        assert_eq!(expiry(Some(&json!(1000)), now), now + chrono::Duration::seconds(1));
        assert_eq!(expiry(None, now), now + UNLIMITED_TASK_HANDLE);
        assert_eq!(expiry(Some(&Value::Null), now), now + UNLIMITED_TASK_HANDLE);
        assert_eq!(expiry(Some(&json!(u64::MAX)), now), now + UNLIMITED_TASK_HANDLE);
    }

    #[test]
    fn only_a_declared_extension_takes_tasks_and_2025_capabilities_lose_it() {
        let with = json!({"sampling": {}, "extensions": {EXTENSION: {}, "other/ext": {}}});
        assert!(declared(Some(&with)));
        assert!(!declared(Some(&json!({"sampling": {}}))));
        assert!(!declared(None));
        let stripped = without_tasks(Some(with)).unwrap();
        assert!(!declared(Some(&stripped)));
        assert_eq!(stripped, json!({"sampling": {}, "extensions": {"other/ext": {}}}));
        assert_eq!(without_tasks(None), None);
    }

    #[test]
    fn only_the_extensions_statuses_reach_the_audit_log() {
        assert_eq!(status_of(&json!({"status": "completed"})), "completed");
        assert_eq!(status_of(&json!({"status": "<script>very long text</script>"})), "unrecognised");
        assert_eq!(status_of(&json!({})), "unrecognised");
    }
}
