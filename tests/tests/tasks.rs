//! The tasks extension (`io.modelcontextprotocol/tasks`) through the gateway, in front of the
//! reference upstream, which runs its task fixtures with rmcp's task manager: a 2026-07-28
//! client that declares the extension gets tasks under handles of Portcullis's own, bound to it;
//! nobody else can reach them, and 2025 clients never see a task.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const TASKS: &str = "io.modelcontextprotocol/tasks";

fn with_tasks(mut params: Value) -> Value {
    params["_meta"] = json!({"io.modelcontextprotocol/clientCapabilities": {"extensions": {TASKS: {}}}});
    params
}

/// Polls `tasks/get` until the task reaches `status` (or ends).
async fn wait_for(gateway: &Gateway, key: &str, task_id: &str, status: &str) -> Value {
    let mut last = Value::Null;
    for attempt in 0..100 {
        let (code, task) =
            gateway.mcp_modern(key, 100 + attempt, "tasks/get", with_tasks(json!({"taskId": task_id}))).await;
        assert_eq!(code, 200, "{task}");
        last = task["result"].clone();
        let now = last["status"].as_str().unwrap_or_default();
        if now == status || ["completed", "failed", "cancelled"].contains(&now) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("task never reached {status}: {last}");
}

#[tokio::test]
async fn tasks_run_under_handles_bound_to_the_caller_and_vanish_with_the_tool() {
    let upstream = Upstream::start_binary("mcp-reference-server", "both", &[]).await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;

    // Announced, since the upstream offers it.
    let (_, discovered) = gateway.mcp_modern(ANALYST_KEY, 1, "server/discover", json!({})).await;
    assert!(discovered["result"]["capabilities"]["extensions"][TASKS].is_object(), "{discovered}");

    // A task: the caller gets Portcullis's handle, and the task's lifetime as the upstream set it.
    let call = with_tasks(json!({"name": "notes.slow_compute", "arguments": {"seconds": 0.3, "label": "e2e"}}));
    let (code, created) = gateway.mcp_modern(ANALYST_KEY, 2, "tools/call", call).await;
    assert_eq!(code, 200, "{created}");
    let created = &created["result"];
    assert_eq!(created["resultType"], "task", "{created}");
    let task_id = created["taskId"].as_str().expect("taskId").to_string();
    assert!(task_id.starts_with("pct1."), "the upstream's id is not handed out: {task_id}");
    assert!(created.get("ttlMs").is_some(), "ttlMs is the task's lifetime and stays: {created}");
    let done = wait_for(&gateway, ANALYST_KEY, &task_id, "completed").await;
    assert_eq!(done["taskId"], task_id.as_str(), "{done}");
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["result"]["content"][0]["text"].as_str().unwrap().contains("slow_compute(e2e) done"), "{done}");

    // Without declaring the extension the same call runs synchronously.
    let (_, sync) = gateway
        .mcp_modern(ANALYST_KEY, 3, "tools/call", json!({"name": "notes.slow_compute", "arguments": {"seconds": 0}}))
        .await;
    assert_eq!(sync["result"]["resultType"], "complete", "{sync}");
    assert!(sync["result"].get("taskId").is_none(), "{sync}");

    // tasks/* need the extension declared: -32021, HTTP 400.
    let (code, refused) = gateway.mcp_modern(ANALYST_KEY, 4, "tasks/get", json!({"taskId": task_id})).await;
    assert_eq!((code, refused["error"]["code"].as_i64()), (400, Some(-32021)), "{refused}");

    // Another caller, a forged id, an id that never existed: all one unknown task.
    for (key, id) in [(ADMIN_KEY, task_id.as_str()), (ANALYST_KEY, "pct1.Zm9yZ2Vk"), (ANALYST_KEY, "nonexistent-12345")]
    {
        let (code, unknown) = gateway.mcp_modern(key, 5, "tasks/get", with_tasks(json!({"taskId": id}))).await;
        assert_eq!((code, unknown["error"]["code"].as_i64()), (200, Some(-32602)), "{id}: {unknown}");
        assert!(!unknown.to_string().contains("upstream"), "{unknown}");
    }

    // A task that asks the user: its input request arrives through tasks/get, the answer
    // through tasks/update, under the handle.
    let call = with_tasks(json!({"name": "notes.confirm_delete", "arguments": {"filename": "a.txt"}}));
    let (_, created) = gateway.mcp_modern(ANALYST_KEY, 6, "tools/call", call).await;
    let asking_id = created["result"]["taskId"].as_str().expect("a task").to_string();
    let asking = wait_for(&gateway, ANALYST_KEY, &asking_id, "input_required").await;
    assert_eq!(asking["status"], "input_required", "{asking}");
    assert_eq!(asking["inputRequests"]["confirm"]["method"], "elicitation/create", "{asking}");
    let answer =
        json!({"taskId": asking_id, "inputResponses": {"confirm": {"action": "accept", "content": {"confirm": true}}}});
    let (code, ack) = gateway.mcp_modern(ANALYST_KEY, 7, "tasks/update", with_tasks(answer)).await;
    assert_eq!((code, ack["result"]["resultType"].as_str()), (200, Some("complete")), "{ack}");
    let done = wait_for(&gateway, ANALYST_KEY, &asking_id, "completed").await;
    assert!(done["result"]["content"][0]["text"].as_str().unwrap().contains("confirmed = true"), "{done}");

    // A running task cancelled through its handle.
    let call = with_tasks(json!({"name": "notes.slow_compute", "arguments": {"seconds": 30}}));
    let (_, created) = gateway.mcp_modern(ANALYST_KEY, 8, "tools/call", call).await;
    let long_id = created["result"]["taskId"].as_str().expect("a task").to_string();
    let (code, _) = gateway.mcp_modern(ANALYST_KEY, 9, "tasks/cancel", with_tasks(json!({"taskId": long_id}))).await;
    assert_eq!(code, 200);
    assert_eq!(wait_for(&gateway, ANALYST_KEY, &long_id, "cancelled").await["status"], "cancelled");

    // Audited with the tool and connection behind the handle (audit is written in batches:
    // each is waited for, not assumed written with another).
    wait_until(Duration::from_secs(5), || async {
        gateway.audit("tool=notes.slow_compute").await.iter().any(|e| e["operation"] == "tasks/get")
    })
    .await;
    wait_until(Duration::from_secs(5), || async {
        let events = gateway.audit("tool=notes.confirm_delete").await;
        events.iter().any(|e| e["operation"] == "tasks/update" && e["connection"] == "notes")
    })
    .await;

    // The persona loses the tool: its tasks are gone for that caller too.
    let call = with_tasks(json!({"name": "notes.slow_compute", "arguments": {"seconds": 30}}));
    let (_, created) = gateway.mcp_modern(ANALYST_KEY, 10, "tools/call", call).await;
    let orphan_id = created["result"]["taskId"].as_str().expect("a task").to_string();
    let personas = quickstart(&upstream.url()).into_iter().find(|(name, _)| *name == "personas.yaml").unwrap().1;
    gateway.write(
        "personas.yaml",
        &personas.replace(r#"deny: ["notes.delete_note"]"#, r#"deny: ["notes.delete_note", "notes.slow_compute"]"#),
    );
    wait_until(Duration::from_secs(10), || async {
        !gateway.tool_names(ANALYST_KEY).await.contains(&"notes.slow_compute".to_string())
    })
    .await;
    let (_, gone) = gateway.mcp_modern(ANALYST_KEY, 11, "tasks/get", with_tasks(json!({"taskId": orphan_id}))).await;
    assert_eq!(gone["error"]["code"], -32602, "{gone}");

    // The connection now points at another server: its tasks are not this one's.
    let (_, still) = gateway.mcp_modern(ANALYST_KEY, 12, "tasks/get", with_tasks(json!({"taskId": asking_id}))).await;
    assert_eq!(still["result"]["status"], "completed", "{still}");
    let other = Upstream::start_binary("mcp-reference-server", "both", &[]).await;
    let connection = quickstart(&other.url()).into_iter().find(|(name, _)| *name == "notes.yaml").unwrap().1;
    gateway.write("notes.yaml", &connection);
    wait_until(Duration::from_secs(10), || async {
        let (_, answer) =
            gateway.mcp_modern(ANALYST_KEY, 13, "tasks/get", with_tasks(json!({"taskId": asking_id}))).await;
        answer["error"]["code"] == -32602
    })
    .await;
}

#[tokio::test]
async fn task_notifications_on_a_listen_stream_need_the_extension() {
    let upstream = Upstream::start_binary("mcp-reference-server", "both", &[]).await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let (code, refused) =
        gateway.mcp_modern(ANALYST_KEY, 1, "subscriptions/listen", json!({"notifications": {"taskIds": ["x"]}})).await;
    assert_eq!((code, refused["error"]["code"].as_i64()), (400, Some(-32021)), "{refused}");
}

#[tokio::test]
async fn a_2025_session_never_gets_a_task() {
    let upstream = Upstream::start_binary("mcp-reference-server", "both", &[]).await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    // Even when its initialize claims the extension.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
        "capabilities": {"extensions": {TASKS: {}}}, "clientInfo": {"name": "old", "version": "1"}}});
    let response = gateway.mcp_raw(ANALYST_KEY, &[], &init.to_string()).await;
    let session = response.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let initialized: Value = response.json().await.unwrap();
    assert!(initialized["result"]["capabilities"].get("extensions").is_none(), "{initialized}");
    let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "notes.slow_compute", "arguments": {"seconds": 0, "label": "old"}}});
    let text = gateway.mcp_raw(ANALYST_KEY, &headers, &call.to_string()).await.text().await.unwrap();
    assert!(text.contains("slow_compute(old) done") && !text.contains("taskId"), "{text}");
    let get = json!({"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {"taskId": "x"}});
    let text = gateway.mcp_raw(ANALYST_KEY, &headers, &get.to_string()).await.text().await.unwrap();
    assert!(text.contains("-32601"), "tasks/* do not exist for 2025 sessions: {text}");
}

#[tokio::test]
async fn an_endpoint_without_a_task_offering_upstream_announces_no_tasks() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let (_, discovered) = gateway.mcp_modern(ANALYST_KEY, 1, "server/discover", json!({})).await;
    assert!(discovered["result"]["capabilities"].get("extensions").is_none(), "{discovered}");
    let (code, missing) = gateway.mcp_modern(ANALYST_KEY, 2, "tasks/get", with_tasks(json!({"taskId": "x"}))).await;
    assert_eq!((code, missing["error"]["code"].as_i64()), (404, Some(-32601)), "{missing}");
}
