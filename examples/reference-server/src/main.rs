//! mcp-reference-server: the upstream Portcullis runs the official MCP conformance suite
//! (`@modelcontextprotocol/conformance`) against, directly and through the gateway.
//!
//! It implements the suite's server fixtures (the `test_*` tools, `test://` resources and
//! templates, `test_*` prompts, completion, logging, subscriptions) for both protocol
//! generations on one URL. Requests that need the client (sampling, elicitation, roots) are
//! server-initiated requests on the request's own stream for 2025 sessions, and
//! `input_required` results (multi round-trip requests) for 2026-07-28 callers.
//! `--protocol legacy` or `--protocol modern` restricts it to one generation, to test bridging.
//! Where it speaks 2026-07-28 it also offers the tasks extension (`io.modelcontextprotocol/tasks`)
//! with the suite's task fixtures, run by rmcp's `TaskManager`.

// Logging, sampling and roots are deprecated in 2026-07-28 yet still part of the suite.
#![allow(deprecated)]

use axum::serve::ListenerExt;
use clap::{Parser, ValueEnum};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CompleteRequestParams, CompleteResult, GetPromptRequestParams,
    GetPromptResponse, Implementation, ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
    ServerCapabilities, ServerConfig, ServerRequest, SetLevelRequestParams, SubscribeRequestParams, SubscriptionFilter,
    UnsubscribeRequestParams,
};
use rmcp::model::{
    CallToolResult, CancelTaskParams, ClientCapabilities, ContentBlock, CreateTaskResult, GetTaskParams, GetTaskResult,
    UpdateTaskParams,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::task_manager::{TaskExit, TaskManager, TaskOptions};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Protocol {
    /// 2026-07-28 (stateless) and every 2025 version.
    Both,
    /// Only 2025-11-25 and older.
    Legacy,
    /// Only 2026-07-28.
    Modern,
}

#[derive(Parser, Debug)]
#[command(about = "The MCP conformance suite's reference server (Streamable HTTP at /mcp)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8790")]
    listen: String,
    /// Which protocol generations to speak.
    #[arg(long, value_enum, default_value_t = Protocol::Both)]
    protocol: Protocol,
}

const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";
const WAV: &str = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=";

/// What changes at run time and is announced on listen streams and sessions.
#[derive(Clone, Copy, Debug)]
enum Changed {
    Tools,
    Prompts,
}

#[derive(Clone)]
struct Reference {
    protocol: Protocol,
    changes: tokio::sync::broadcast::Sender<Changed>,
    // The triggers really change the lists: they toggle one extra tool and one extra prompt.
    extra_tool: Arc<std::sync::atomic::AtomicBool>,
    extra_prompt: Arc<std::sync::atomic::AtomicBool>,
    // Keys the request-state checksums of this process.
    state_key: std::collections::hash_map::RandomState,
    // Tasks of every caller (the service is cloned per session and per request).
    tasks: TaskManager,
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ErrorData> {
    serde_json::from_value(value).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

/// A complete result: `resultType` is set here (rmcp strips it again for 2025 peers).
fn result<T: serde::de::DeserializeOwned>(mut value: Value) -> Result<T, ErrorData> {
    value["resultType"] = json!("complete");
    decode(value)
}

fn text(t: impl Into<String>) -> Value {
    json!({ "type": "text", "text": t.into() })
}

fn complete(content: Vec<Value>) -> Result<CallToolResponse, ErrorData> {
    Ok(CallToolResponse::Complete(result(json!({ "content": content }))?))
}

fn object_schema(properties: Value, required: &[&str]) -> Value {
    json!({ "type": "object", "properties": properties, "required": required })
}

/// A schema that uses `$defs`, `$ref`, `$anchor`, composition and conditionals.
fn json_schema_2020_12() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "$defs": {"address": {"$anchor": "addressDef", "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
        "properties": {
            "name": {"type": "string"}, "address": {"$ref": "#/$defs/address"},
            "contactMethod": {"type": "string", "enum": ["phone", "email"]},
            "phone": {"type": "string"}, "email": {"type": "string"},
        },
        "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
        "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
        "then": {"required": ["phone"]},
        "else": {"required": ["email"]},
        "additionalProperties": false,
    })
}

fn tools() -> Vec<Value> {
    let none = object_schema(json!({}), &[]);
    let mut tools = vec![
        ("test_simple_text", "Returns a simple text", none.clone()),
        ("test_image_content", "Returns an image", none.clone()),
        ("test_audio_content", "Returns audio", none.clone()),
        ("test_embedded_resource", "Returns an embedded resource", none.clone()),
        ("test_multiple_content_types", "Returns text, an image and a resource", none.clone()),
        ("test_tool_with_logging", "Sends three log messages while it runs", none.clone()),
        ("test_error_handling", "Always fails (isError)", none.clone()),
        ("test_tool_with_progress", "Reports progress three times", none.clone()),
        (
            "test_sampling",
            "Asks the client's model to answer a prompt",
            object_schema(json!({"prompt": {"type": "string"}}), &["prompt"]),
        ),
        (
            "test_elicitation",
            "Asks the user for information",
            object_schema(json!({"message": {"type": "string"}}), &["message"]),
        ),
        ("test_elicitation_sep1034_defaults", "Elicits a form whose fields have defaults", none.clone()),
        ("test_elicitation_sep1330_enums", "Elicits a form with every kind of enum", none.clone()),
        ("test_trigger_tool_change", "Announces that the tool list changed", none.clone()),
        ("test_trigger_prompt_change", "Announces that the prompt list changed", none.clone()),
    ];
    tools.push((
        "json_schema_2020_12_tool",
        "Takes arguments described with JSON Schema 2020-12 keywords",
        json_schema_2020_12(),
    ));
    tools.push((
        "test_header_param",
        "Takes a region that clients mirror into the Mcp-Param-Region header",
        json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "priority": {"type": "integer", "x-mcp-header": "Priority"},
        }, "required": ["region"]}),
    ));
    // The multi round-trip tools: in 2025 mode they ask with server requests on the call's
    // stream instead.
    {
        tools.extend([
            ("test_missing_capability", "Needs the sampling capability", none.clone()),
            ("test_input_required_result_elicitation", "Asks for the user's name first", none.clone()),
            ("test_input_required_result_sampling", "Asks the client's model first", none.clone()),
            ("test_input_required_result_list_roots", "Asks for the client's roots first", none.clone()),
            ("test_input_required_result_request_state", "Hands out request state", none.clone()),
            ("test_input_required_result_multiple_inputs", "Asks for three inputs at once", none.clone()),
            ("test_input_required_result_multi_round", "Needs two rounds of input", none.clone()),
            ("test_input_required_result_tampered_state", "Refuses tampered request state", none.clone()),
            ("test_input_required_result_capabilities", "Asks only for what the client can do", none.clone()),
            ("test_streaming_elicitation", "Asks for input without server requests", none.clone()),
            ("test_logging_tool", "Logs only when the request asks for a level", none.clone()),
        ]);
    }
    tools.extend(task_tools(&none));
    tools
        .into_iter()
        .map(|(name, description, schema)| json!({"name": name, "description": description, "inputSchema": schema}))
        .collect()
}

/// The tasks extension's fixtures (SEP-2663).
fn task_tools(none: &Value) -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "greet",
            "Greets by name; never runs as a task",
            object_schema(json!({"name": {"type": "string"}}), &["name"]),
        ),
        (
            "slow_compute",
            "Sleeps `seconds`; a task when the client takes tasks",
            object_schema(json!({"seconds": {"type": "number"}, "label": {"type": "string"}}), &[]),
        ),
        ("failing_job", "Runs only as a task, which ends in a tool error", none.clone()),
        ("protocol_error_job", "Fails with a protocol error; a task when the client takes tasks", none.clone()),
        (
            "confirm_delete",
            "Asks the user to confirm: inside a task, or with input_required without one",
            object_schema(json!({"filename": {"type": "string"}}), &[]),
        ),
        ("multi_input", "Runs only as a task, which asks two questions at once", none.clone()),
        ("test_tool_with_task", "Asks for a name (input_required), then runs as a task", none.clone()),
    ]
}

/// Task fixtures that cannot run without becoming a task.
const TASK_ONLY: [&str; 3] = ["failing_job", "multi_input", "test_tool_with_task"];

fn tool_text(t: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(t)])
}

/// A form elicitation asking for `properties`, all required.
fn elicitation(message: &str, properties: Value) -> Result<rmcp::model::InputRequest, ErrorData> {
    let required: Vec<&String> = properties.as_object().map(|p| p.keys().collect()).unwrap_or_default();
    decode(json!({"method": "elicitation/create", "params": {"mode": "form", "message": message,
        "requestedSchema": {"type": "object", "properties": properties, "required": required}}}))
}

impl Reference {
    /// The task fixtures: a task when the request declared the tasks extension (and the tool
    /// may be one), else synchronous, or refused with -32021 for tools that only run as tasks.
    async fn call_task_fixture(
        &self,
        name: &str,
        params: &Value,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let takes_tasks = self.protocol != Protocol::Legacy
            && Self::modern(context)
            && context.client_capabilities().is_some_and(|c| c.supports_tasks());
        // A 2025 server has no tasks: its form of each fixture just runs (and asks with server
        // requests on the call's stream).
        if !Self::modern(context) {
            return self.call_task_fixture_2025(name, params, context).await;
        }
        if TASK_ONLY.contains(&name) && !takes_tasks {
            return Err(ErrorData::missing_required_client_capability(
                ClientCapabilities::builder().enable_tasks().build(),
            ));
        }
        let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
        let spawn = |future: rmcp::task_manager::TaskFuture| -> CallToolResponse {
            CreateTaskResult::new(self.tasks.spawn(TaskOptions::default(), move |_| future)).into()
        };
        match name {
            "greet" => Ok(tool_text(format!("Hello, {}!", arguments["name"].as_str().unwrap_or("friend"))).into()),
            "slow_compute" => {
                let seconds = arguments["seconds"].as_f64().unwrap_or(1.0).clamp(0.0, 600.0);
                let done = tool_text(format!(
                    "slow_compute({}) done after {seconds}s",
                    arguments["label"].as_str().unwrap_or("compute")
                ));
                let sleep = tokio::time::sleep(Duration::from_secs_f64(seconds));
                if !takes_tasks {
                    sleep.await;
                    return Ok(done.into());
                }
                // Cancellation is cooperative: this one stops when asked.
                let task = self.tasks.spawn(TaskOptions::default(), move |task| {
                    Box::pin(async move {
                        tokio::select! {
                            _ = task.cancelled() => Err(TaskExit::Cancelled),
                            _ = sleep => Ok(done),
                        }
                    })
                });
                Ok(CreateTaskResult::new(task).into())
            }
            "failing_job" => Ok(spawn(Box::pin(async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(CallToolResult::error(vec![ContentBlock::text("failing_job failed on purpose")]))
            }))),
            "protocol_error_job" => {
                let error = ErrorData::internal_error("protocol_error_job failed on purpose", None);
                if !takes_tasks {
                    return Err(error);
                }
                Ok(spawn(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err(TaskExit::Error(error))
                })))
            }
            "confirm_delete" => {
                let filename = arguments["filename"].as_str().unwrap_or("file.txt").to_string();
                let ask = elicitation(&format!("Delete {filename}?"), json!({"confirm": {"type": "boolean"}}))?;
                if !takes_tasks {
                    // Without tasks it asks the way any request can (input_required, or a
                    // server request on a 2025 session).
                    let answers = match self.inputs(context, params, json!({"confirm": ask})).await? {
                        Ok(answers) => answers,
                        Err(input_required) => return Ok(input_required),
                    };
                    let confirmed = answers["confirm"]["content"]["confirm"].as_bool().unwrap_or(false);
                    return Ok(tool_text(format!("confirm_delete({filename}): confirmed = {confirmed}")).into());
                }
                let task = self.tasks.spawn(TaskOptions::default(), move |task| {
                    Box::pin(async move {
                        let answer = task.request_input("confirm", ask).await?;
                        let confirmed = answer["content"]["confirm"].as_bool().unwrap_or(false);
                        Ok(tool_text(format!("confirm_delete({filename}): confirmed = {confirmed}")))
                    })
                });
                Ok(CreateTaskResult::new(task).into())
            }
            "multi_input" => {
                let (ask_a, ask_b) = (
                    elicitation("Provide value A", json!({"value": {"type": "string"}}))?,
                    elicitation("Provide value B", json!({"value": {"type": "string"}}))?,
                );
                let task = self.tasks.spawn(TaskOptions::default(), move |task| {
                    Box::pin(async move {
                        // Both asked at once, so both are pending together.
                        let (a, b) =
                            tokio::join!(task.request_input("input-a", ask_a), task.request_input("input-b", ask_b));
                        let (a, b) = (a?, b?);
                        let value = |v: &Value| v["content"]["value"].as_str().unwrap_or("(none)").to_string();
                        Ok(tool_text(format!("multi_input: a = {}, b = {}", value(&a), value(&b))))
                    })
                });
                Ok(CreateTaskResult::new(task).into())
            }
            "test_tool_with_task" => {
                // Round 1 asks for a name (input_required); the retry with it becomes a task.
                let name = &params["inputResponses"]["user_name"];
                if !name.is_object() {
                    let ask = elicitation("What is your name?", json!({"name": {"type": "string"}}))?;
                    return Ok(CallToolResponse::InputRequired(decode(json!({
                        "resultType": "input_required", "inputRequests": {"user_name": ask},
                    }))?));
                }
                let done =
                    tool_text(format!("Hello, {}! (async)", name["content"]["name"].as_str().unwrap_or("friend")));
                Ok(spawn(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(done)
                })))
            }
            other => Err(ErrorData::invalid_params(format!("Unknown tool: {other}"), None)),
        }
    }

    /// The task fixtures as a 2025 server has them: ordinary calls, which take as long as they
    /// take and ask with server requests.
    async fn call_task_fixture_2025(
        &self,
        name: &str,
        params: &Value,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
        let done = |text: String| Ok(tool_text(text).into());
        match name {
            "greet" => done(format!("Hello, {}!", arguments["name"].as_str().unwrap_or("friend"))),
            "slow_compute" => {
                let seconds = arguments["seconds"].as_f64().unwrap_or(1.0).clamp(0.0, 600.0);
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                done(format!(
                    "slow_compute({}) done after {seconds}s",
                    arguments["label"].as_str().unwrap_or("compute")
                ))
            }
            "failing_job" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(CallToolResult::error(vec![ContentBlock::text("failing_job failed on purpose")]).into())
            }
            "protocol_error_job" => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(ErrorData::internal_error("protocol_error_job failed on purpose", None))
            }
            "confirm_delete" => {
                let filename = arguments["filename"].as_str().unwrap_or("file.txt").to_string();
                let ask = elicitation(&format!("Delete {filename}?"), json!({"confirm": {"type": "boolean"}}))?;
                let answers = self.ask_all(context, &json!({ "confirm": ask })).await?;
                let confirmed = answers["confirm"]["content"]["confirm"].as_bool().unwrap_or(false);
                done(format!("confirm_delete({filename}): confirmed = {confirmed}"))
            }
            "multi_input" => {
                let asks = json!({
                    "a": elicitation("Provide value A", json!({"value": {"type": "string"}}))?,
                    "b": elicitation("Provide value B", json!({"value": {"type": "string"}}))?,
                });
                let answers = self.ask_all(context, &asks).await?;
                let value = |key: &str| answers[key]["content"]["value"].as_str().unwrap_or("(none)").to_string();
                done(format!("multi_input: a = {}, b = {}", value("a"), value("b")))
            }
            "test_tool_with_task" => {
                let ask = elicitation("What is your name?", json!({"name": {"type": "string"}}))?;
                let answers = self.ask_all(context, &json!({ "user_name": ask })).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                done(format!(
                    "Hello, {}! (async)",
                    answers["user_name"]["content"]["name"].as_str().unwrap_or("friend")
                ))
            }
            other => Err(ErrorData::invalid_params(format!("Unknown tool: {other}"), None)),
        }
    }

    /// What the client declared: per request in 2026-07-28, at initialize in 2025.
    fn client_capabilities(context: &RequestContext<RoleServer>) -> Value {
        let declared = if Self::modern(context) {
            context.meta.client_capabilities()
        } else {
            context.peer.peer_info().map(|info| info.capabilities.clone())
        };
        serde_json::to_value(declared.unwrap_or_default()).unwrap_or_default()
    }

    fn modern(context: &RequestContext<RoleServer>) -> bool {
        context.meta.protocol_version().is_some_and(|v| !v.has_initialize())
    }

    fn seal(&self, state: &Value) -> String {
        let text = state.to_string();
        let mut hasher = self.state_key.build_hasher();
        hasher.write(text.as_bytes());
        format!("{:016x}.{text}", hasher.finish())
    }

    fn open(&self, sealed: &str) -> Option<Value> {
        let (checksum, text) = sealed.split_once('.')?;
        let mut hasher = self.state_key.build_hasher();
        hasher.write(text.as_bytes());
        (format!("{:016x}", hasher.finish()) == checksum).then(|| serde_json::from_str(text).ok()).flatten()
    }

    /// A server-initiated request on a 2025 session (sent on the request's own stream).
    async fn ask(&self, context: &RequestContext<RoleServer>, method: &str, params: Value) -> Result<Value, ErrorData> {
        let request: ServerRequest = decode(json!({ "method": method, "params": params }))?;
        let answer = context
            .peer
            .send_request(request)
            .await
            .map_err(|e| ErrorData::internal_error(format!("the client did not answer {method}: {e}"), None))?;
        serde_json::to_value(answer).map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }

    /// Modern callers get `input_required` with `requests` unless the retry carries answers
    /// for all of them; legacy callers are asked directly. Returns the answers by key.
    async fn inputs(
        &self,
        context: &RequestContext<RoleServer>,
        params: &Value,
        requests: Value,
    ) -> Result<Result<Value, CallToolResponse>, ErrorData> {
        if Self::modern(context) {
            let responses = params.get("inputResponses").cloned().unwrap_or(Value::Null);
            let keys: Vec<&String> = requests.as_object().map(|o| o.keys().collect()).unwrap_or_default();
            if responses.is_object() && keys.iter().all(|k| responses.get(k.as_str()).is_some()) {
                return Ok(Ok(responses));
            }
            return Ok(Err(CallToolResponse::InputRequired(decode(json!({
                "resultType": "input_required", "inputRequests": requests,
            }))?)));
        }
        // 2025: server requests, sent together and awaited together.
        Ok(Ok(Value::Object(self.ask_all(context, &requests).await?)))
    }

    /// Sends each of `requests` (key → method and params) to the client at once; the answers by
    /// key.
    async fn ask_all(
        &self,
        context: &RequestContext<RoleServer>,
        requests: &Value,
    ) -> Result<serde_json::Map<String, Value>, ErrorData> {
        let requests = requests.as_object().cloned().unwrap_or_default();
        let asked = requests.iter().map(|(key, request)| async move {
            // Named with the key the 2026-07-28 form uses, for a gateway that bridges to
            // 2026-07-28 clients (Portcullis's `portcullis.dev/inputKey`); rmcp's roots/list
            // takes no params to carry it.
            let mut params = request["params"].clone();
            if let Some(params) = params.as_object_mut().filter(|_| request["method"] != "roots/list") {
                params.insert("_meta".into(), json!({ "portcullis.dev/inputKey": key }));
            }
            let answer = self.ask(context, request["method"].as_str().unwrap_or(""), params).await?;
            Ok::<_, ErrorData>((key.clone(), answer))
        });
        Ok(futures::future::try_join_all(asked).await?.into_iter().collect())
    }

    async fn log(&self, context: &RequestContext<RoleServer>, message: &str) {
        let params = json!({ "level": "info", "logger": "reference", "data": message });
        if let Ok(params) = decode(params) {
            let _ = context.peer.notify_logging_message(params).await;
        }
    }

    async fn call(
        &self,
        name: &str,
        params: &Value,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if task_tools(&Value::Null).iter().any(|(tool, _, _)| *tool == name) {
            return self.call_task_fixture(name, params, context).await;
        }
        let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
        match name {
            "test_simple_text" => complete(vec![text("This is a simple text response for testing.")]),
            "json_schema_2020_12_tool" | "test_extra_tool" => complete(vec![text("ok")]),
            "test_header_param" => complete(vec![text(format!("region {}", arguments["region"]))]),
            "test_image_content" => complete(vec![json!({"type": "image", "data": PNG, "mimeType": "image/png"})]),
            "test_audio_content" => complete(vec![json!({"type": "audio", "data": WAV, "mimeType": "audio/wav"})]),
            "test_embedded_resource" => complete(vec![json!({"type": "resource", "resource": {
                "uri": "test://embedded-resource", "mimeType": "text/plain", "text": "This is an embedded resource content."}})]),
            "test_multiple_content_types" => complete(vec![
                text("Multiple content types test:"),
                json!({"type": "image", "data": PNG, "mimeType": "image/png"}),
                json!({"type": "resource", "resource": {"uri": "test://mixed-content-resource",
                    "mimeType": "application/json", "text": "{\"test\":\"data\",\"value\":123}"}}),
            ]),
            "test_error_handling" => Ok(CallToolResponse::Complete(result(json!({
                "content": [text("This tool intentionally returns an error for testing")], "isError": true,
            }))?)),
            "test_tool_with_logging" | "test_logging_tool" => {
                // 2026-07-28 callers get log messages only when they ask for a level.
                let wanted = !Self::modern(context) || context.meta.log_level().is_some();
                for message in ["Tool execution started", "Tool processing data", "Tool execution completed"] {
                    if wanted {
                        self.log(context, message).await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                complete(vec![text("Tool with logging executed successfully")])
            }
            "test_tool_with_progress" => {
                let token = context.meta.get_progress_token();
                for progress in [0, 50, 100] {
                    if let Some(token) = &token
                        && let Ok(params) = decode(json!({"progressToken": token, "progress": progress, "total": 100}))
                    {
                        let _ = context.peer.notify_progress(params).await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let token = token.map(|t| serde_json::to_value(t).unwrap_or_default()).unwrap_or(Value::Null);
                complete(vec![text(token.as_str().map(str::to_string).unwrap_or_else(|| token.to_string()))])
            }
            "test_sampling" | "test_input_required_result_sampling" => {
                let prompt = arguments.get("prompt").and_then(Value::as_str).unwrap_or("Say hello").to_string();
                let request = json!({"sampling": {"method": "sampling/createMessage", "params": {
                    "messages": [{"role": "user", "content": {"type": "text", "text": prompt}}], "maxTokens": 100}}});
                match self.inputs(context, params, request).await? {
                    Err(input_required) => Ok(input_required),
                    Ok(answers) => {
                        let reply = &answers["sampling"]["content"]["text"];
                        complete(vec![text(format!("LLM response: {}", reply.as_str().unwrap_or("")))])
                    }
                }
            }
            "test_elicitation"
            | "test_elicitation_sep1034_defaults"
            | "test_elicitation_sep1330_enums"
            | "test_input_required_result_elicitation"
            | "test_streaming_elicitation" => {
                let message = arguments.get("message").and_then(Value::as_str).unwrap_or("Please provide your name");
                let schema = match name {
                    "test_elicitation_sep1034_defaults" => json!({"type": "object", "properties": {
                        "name": {"type": "string", "default": "John Doe"},
                        "age": {"type": "integer", "default": 30},
                        "score": {"type": "number", "default": 95.5},
                        "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
                        "verified": {"type": "boolean", "default": true}}}),
                    "test_elicitation_sep1330_enums" => json!({"type": "object", "properties": {
                        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
                        "titledSingle": {"type": "string", "oneOf": [
                            {"const": "value1", "title": "First Option"}, {"const": "value2", "title": "Second Option"},
                            {"const": "value3", "title": "Third Option"}]},
                        "legacyEnum": {"type": "string", "enum": ["opt1", "opt2", "opt3"],
                            "enumNames": ["Option One", "Option Two", "Option Three"]},
                        "untitledMulti": {"type": "array", "minItems": 1, "maxItems": 3,
                            "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
                        "titledMulti": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"anyOf": [
                            {"const": "value1", "title": "First Choice"}, {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"}]}}}}),
                    "test_elicitation" => json!({"type": "object", "properties": {
                        "username": {"type": "string"}, "email": {"type": "string"}}}),
                    _ => json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}),
                };
                let key = if name.starts_with("test_input_required") || name == "test_streaming_elicitation" {
                    "user_name"
                } else {
                    "elicitation"
                };
                let request = json!({ key: {"method": "elicitation/create", "params": {
                    "mode": "form", "message": message, "requestedSchema": schema}}});
                match self.inputs(context, params, request).await? {
                    Err(input_required) => Ok(input_required),
                    Ok(answers) => {
                        let answer = &answers[key];
                        if key == "user_name" {
                            // The name must be a string; anything else is asked again.
                            let Some(user) = answer["content"]["name"].as_str() else {
                                return Ok(CallToolResponse::InputRequired(decode(json!({
                                    "resultType": "input_required",
                                    "inputRequests": { key: {"method": "elicitation/create", "params": {
                                        "mode": "form", "message": message, "requestedSchema": schema}}},
                                }))?));
                            };
                            return complete(vec![text(format!("Hello, {user}!"))]);
                        }
                        complete(vec![text(format!(
                            "User response: action={}, content={}",
                            answer["action"].as_str().unwrap_or("?"),
                            answer["content"]
                        ))])
                    }
                }
            }
            "test_input_required_result_list_roots" => {
                let request = json!({"roots": {"method": "roots/list", "params": {}}});
                match self.inputs(context, params, request).await? {
                    Err(input_required) => Ok(input_required),
                    Ok(answers) => complete(vec![text(format!("Roots: {}", answers["roots"]["roots"]))]),
                }
            }
            "test_input_required_result_multiple_inputs" => {
                let request = json!({
                    "user_name": {"method": "elicitation/create", "params": {"mode": "form", "message": "Your name?",
                        "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}},
                    "sampling": {"method": "sampling/createMessage", "params": {
                        "messages": [{"role": "user", "content": {"type": "text", "text": "Say hello"}}], "maxTokens": 50}},
                    "roots": {"method": "roots/list", "params": {}},
                });
                self.stateful_rounds(context, name, params, request, 1).await
            }
            "test_input_required_result_request_state"
            | "test_input_required_result_tampered_state"
            | "test_input_required_result_multi_round" => {
                let request = json!({"user_name": {"method": "elicitation/create", "params": {"mode": "form",
                    "message": "Your name?", "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}}});
                let rounds = if name.ends_with("multi_round") { 2 } else { 1 };
                self.stateful_rounds(context, name, params, request, rounds).await
            }
            "test_input_required_result_capabilities" => {
                // Ask only for what this request's client (2025: this session's) declared.
                let capabilities = Self::client_capabilities(context);
                let mut request = serde_json::Map::new();
                if capabilities.get("elicitation").is_some() {
                    request.insert("user_name".into(), json!({"method": "elicitation/create", "params": {"mode": "form",
                        "message": "Your name?", "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}}));
                }
                if capabilities.get("sampling").is_some() {
                    request.insert("sampling".into(), json!({"method": "sampling/createMessage", "params": {
                        "messages": [{"role": "user", "content": {"type": "text", "text": "Say hello"}}], "maxTokens": 50}}));
                }
                match self.inputs(context, params, Value::Object(request)).await? {
                    Err(input_required) => Ok(input_required),
                    Ok(_) => complete(vec![text("Used only the declared capabilities")]),
                }
            }
            "test_missing_capability" => {
                if Self::client_capabilities(context).get("sampling").is_none() {
                    return Err(ErrorData::new(
                        rmcp::model::ErrorCode(-32021),
                        "This tool needs the sampling capability",
                        Some(json!({"requiredCapabilities": {"sampling": {}}})),
                    ));
                }
                complete(vec![text("The client can sample")])
            }
            "test_trigger_tool_change" | "test_trigger_prompt_change" => {
                let change = if name == "test_trigger_tool_change" { Changed::Tools } else { Changed::Prompts };
                let flag = match change {
                    Changed::Tools => &self.extra_tool,
                    Changed::Prompts => &self.extra_prompt,
                };
                flag.fetch_xor(true, std::sync::atomic::Ordering::SeqCst);
                let _ = self.changes.send(change);
                let _ = match change {
                    Changed::Tools => context.peer.notify_tool_list_changed().await,
                    Changed::Prompts => context.peer.notify_prompt_list_changed().await,
                };
                complete(vec![text("announced")])
            }
            other => Err(ErrorData::invalid_params(format!("Unknown tool: {other}"), None)),
        }
    }

    /// Input over `rounds` rounds, carried in sealed request state: a tampered state is refused.
    async fn stateful_rounds(
        &self,
        context: &RequestContext<RoleServer>,
        name: &str,
        params: &Value,
        request: Value,
        rounds: u64,
    ) -> Result<CallToolResponse, ErrorData> {
        if !Self::modern(context) {
            // 2025: each round asks with server requests, all at once, and waits for the answers.
            for _ in 0..rounds {
                self.ask_all(context, &request).await?;
            }
            return complete(vec![text(format!("Completed after {rounds} round(s) of input"))]);
        }
        let round = match params.get("requestState").and_then(Value::as_str) {
            None => 0,
            Some(sealed) => match self.open(sealed) {
                Some(state) if state["tool"] == name => state["round"].as_u64().unwrap_or(0),
                _ => return Err(ErrorData::invalid_params("requestState is invalid or was tampered with", None)),
            },
        };
        let answered = params
            .get("inputResponses")
            .and_then(Value::as_object)
            .is_some_and(|responses| request.as_object().is_some_and(|r| r.keys().all(|k| responses.contains_key(k))));
        let round = if answered && params.get("requestState").is_some() { round + 1 } else { round };
        if round >= rounds {
            return complete(vec![text(format!("Completed after {rounds} round(s) of input"))]);
        }
        let state = self.seal(&json!({ "tool": name, "round": round }));
        Ok(CallToolResponse::InputRequired(decode(json!({
            "resultType": "input_required", "inputRequests": request, "requestState": state,
        }))?))
    }
}

fn prompts() -> Value {
    json!([
        {"name": "test_simple_prompt", "description": "A prompt without arguments"},
        {"name": "test_prompt_with_arguments", "description": "A prompt with two required arguments",
            "arguments": [{"name": "arg1", "description": "First", "required": true},
                          {"name": "arg2", "description": "Second", "required": true}]},
        {"name": "test_prompt_with_embedded_resource", "description": "A prompt that embeds a resource",
            "arguments": [{"name": "resourceUri", "description": "URI to embed", "required": true}]},
        {"name": "test_prompt_with_image", "description": "A prompt with an image"},
    ])
}

/// 2026-07-28 callers also get a prompt that needs client input first.
fn prompts_for() -> Value {
    let mut all = prompts();
    if let Some(list) = all.as_array_mut() {
        list.push(
            json!({"name": "test_input_required_result_prompt", "description": "Needs the client's input first"}),
        );
    }
    all
}

impl ServerHandler for Reference {
    /// rmcp checks `Mcp-Param-*` headers against the tool this returns.
    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        tools().into_iter().find(|t| t["name"] == name).and_then(|t| serde_json::from_value(t).ok())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut listed = tools();
        if self.extra_tool.load(std::sync::atomic::Ordering::SeqCst) {
            listed.push(json!({"name": "test_extra_tool", "description": "Present after test_trigger_tool_change",
                "inputSchema": {"type": "object"}}));
        }
        result(json!({ "tools": listed }))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let params = serde_json::to_value(&request).unwrap_or_default();
        let name = request.name.to_string();
        self.call(&name, &params, &context).await
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        result(json!({ "resources": [
            {"uri": "test://static-text", "name": "static-text", "description": "Static text", "mimeType": "text/plain"},
            {"uri": "test://static-binary", "name": "static-binary", "description": "A PNG", "mimeType": "image/png"},
            {"uri": "test://watched-resource", "name": "watched-resource", "description": "Subscribable", "mimeType": "text/plain"},
        ]}))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        result(json!({ "resourceTemplates": [{"uriTemplate": "test://template/{id}/data", "name": "template",
            "description": "Data by id", "mimeType": "application/json"}]}))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let uri = request.uri.as_str();
        let content = match uri {
            "test://static-text" => {
                json!({"uri": uri, "mimeType": "text/plain", "text": "This is the content of the static text resource."})
            }
            "test://static-binary" => json!({"uri": uri, "mimeType": "image/png", "blob": PNG}),
            "test://watched-resource" => json!({"uri": uri, "mimeType": "text/plain", "text": "Watched content."}),
            _ => match uri.strip_prefix("test://template/").and_then(|rest| rest.strip_suffix("/data")) {
                Some(id) if !id.is_empty() && !id.contains('/') => json!({"uri": uri, "mimeType": "application/json",
                    "text": json!({"id": id, "templateTest": true, "data": format!("Data for ID: {id}")}).to_string()}),
                _ => {
                    return Err(ErrorData::resource_not_found(
                        format!("Resource not found: {uri}"),
                        Some(json!({"uri": uri})),
                    ));
                }
            },
        };
        let read: rmcp::model::ReadResourceResult = result(json!({ "contents": [content] }))?;
        Ok(read.into())
    }

    async fn subscribe(
        &self,
        _request: SubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        Ok(())
    }

    async fn unsubscribe(
        &self,
        _request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        Ok(())
    }

    async fn set_level(
        &self,
        _request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        Ok(())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let mut listed = prompts_for();
        if self.extra_prompt.load(std::sync::atomic::Ordering::SeqCst)
            && let Some(list) = listed.as_array_mut()
        {
            list.push(json!({"name": "test_extra_prompt", "description": "Present after test_trigger_prompt_change"}));
        }
        result(json!({ "prompts": listed }))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        if request.name == "test_input_required_result_prompt" {
            let params = serde_json::to_value(&request).unwrap_or_default();
            let ask = json!({"context": {"method": "elicitation/create", "params": {"mode": "form",
                "message": "What context should the prompt use?",
                "requestedSchema": {"type": "object", "properties": {"context": {"type": "string"}}}}}});
            return match self.inputs(&context, &params, ask).await? {
                Err(CallToolResponse::InputRequired(input)) => Ok(GetPromptResponse::InputRequired(input)),
                Err(_) => Err(ErrorData::internal_error("unexpected response", None)),
                Ok(answers) => {
                    let given = answers["context"]["content"]["context"].as_str().unwrap_or("none").to_string();
                    let prompt: rmcp::model::GetPromptResult = result(json!({"messages": [
                        {"role": "user", "content": text(format!("Use this context: {given}"))}]}))?;
                    Ok(prompt.into())
                }
            };
        }
        let arguments = request.arguments.unwrap_or_default();
        let argument = |name: &str| -> Result<String, ErrorData> {
            arguments
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| ErrorData::invalid_params(format!("Missing required argument: {name}"), None))
        };
        let messages = match request.name.as_str() {
            "test_simple_prompt" => json!([{"role": "user", "content": text("This is a simple prompt for testing.")}]),
            "test_prompt_with_arguments" => {
                let (a, b) = (argument("arg1")?, argument("arg2")?);
                json!([{"role": "user", "content": text(format!("Prompt with arguments: arg1='{a}', arg2='{b}'"))}])
            }
            "test_prompt_with_embedded_resource" => {
                let uri = argument("resourceUri")?;
                json!([
                    {"role": "user", "content": {"type": "resource", "resource": {"uri": uri, "mimeType": "text/plain",
                        "text": "Embedded resource content for testing."}}},
                    {"role": "user", "content": text("Please process the embedded resource above.")},
                ])
            }
            "test_prompt_with_image" => json!([
                {"role": "user", "content": {"type": "image", "data": PNG, "mimeType": "image/png"}},
                {"role": "user", "content": text("Please analyze the image above.")},
            ]),
            other => return Err(ErrorData::invalid_params(format!("Unknown prompt: {other}"), None)),
        };
        let prompt: rmcp::model::GetPromptResult = result(json!({ "messages": messages }))?;
        Ok(prompt.into())
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        let value = request.argument.value.clone();
        let candidates = ["test", "testing", "tested", "other"];
        let values: Vec<&str> = candidates.iter().copied().filter(|c| c.starts_with(value.as_str())).collect();
        result(json!({ "completion": { "values": values, "total": values.len(), "hasMore": false } }))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        Ok(GetTaskResult::new(self.tasks.get_task(&request.task_id)?))
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.tasks.update_task(&request.task_id, request.input_responses)
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.tasks.cancel_task(&request.task_id)
    }

    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_resources()
            .enable_resources_subscribe()
            .enable_resources_list_changed()
            .enable_prompts()
            .enable_prompts_list_changed()
            .enable_logging()
            .enable_completions();
        // Tasks are a 2026-07-28 extension.
        let capabilities =
            if self.protocol == Protocol::Legacy { capabilities.build() } else { capabilities.enable_tasks().build() };
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("mcp-reference-server", env!("CARGO_PKG_VERSION")))
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        let offered = SubscriptionFilter::builder().tools_list_changed().prompts_list_changed().build();
        Some(requested.intersection(&offered))
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let mut changes = self.changes.subscribe();
        loop {
            tokio::select! {
                _ = context.cancelled() => return Ok(()),
                change = changes.recv() => {
                    let sent = match change {
                        Ok(Changed::Tools) => context.sink().notify_tool_list_changed().await,
                        Ok(Changed::Prompts) => context.sink().notify_prompt_list_changed().await,
                        Err(_) => return Ok(()),
                    };
                    if matches!(sent, Err(rmcp::service::SubscriptionSendError::SubscriptionClosed)) {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        match self.protocol {
            Protocol::Both => Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS),
            Protocol::Legacy => Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25)),
            Protocol::Modern => Cow::Owned(vec![ProtocolVersion::V_2026_07_28]),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let reference = Reference {
        protocol: args.protocol,
        changes: tokio::sync::broadcast::channel(16).0,
        extra_tool: Arc::default(),
        extra_prompt: Arc::default(),
        state_key: std::collections::hash_map::RandomState::new(),
        tasks: TaskManager::new(),
    };
    let service: StreamableHttpService<Reference, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(reference.clone()),
        Arc::default(),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    println!("mcp-reference-server listening on http://{addr}/mcp ({:?})", args.protocol);
    axum::serve(
        listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        }),
        router,
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
