//! MCP clients (the official Rust SDK, rmcp) of both protocol generations against the real
//! gateway in front of the real notes server; raw HTTP for the transport's edge cases.

mod support;

use rmcp::ServiceError;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use support::*;

async fn connect(url: &str, key: &str, mode: ClientLifecycleMode) -> RunningService<RoleClient, ClientConfig> {
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(url).auth_header(key),
    );
    ClientConfig::new(ClientCapabilities::default(), Implementation::new("e2e-client", "1.0"))
        .serve_with_lifecycle(transport, mode)
        .await
        .expect("MCP client connects")
}

fn modern() -> ClientLifecycleMode {
    ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] }
}

fn legacy() -> ClientLifecycleMode {
    ClientLifecycleMode::Initialize
}

async fn names(client: &RunningService<RoleClient, ClientConfig>) -> Vec<String> {
    let mut names: Vec<String> =
        client.peer().list_all_tools().await.expect("tools/list").into_iter().map(|t| t.name.to_string()).collect();
    names.sort();
    names
}

fn call(name: &str, arguments: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_string()).with_arguments(arguments.as_object().cloned().unwrap_or_default())
}

async fn expect_unknown_tool(client: &RunningService<RoleClient, ClientConfig>, name: &str) -> String {
    match client.peer().call_tool(call(name, json!({"id": 1}))).await {
        Err(ServiceError::McpError(e)) => {
            assert_eq!(e.code.0, -32602, "{e:?}");
            e.message.to_string()
        }
        other => panic!("expected the unknown-tool error for {name}, got {other:?}"),
    }
}

const ANALYST_TOOLS: [&str; 6] =
    ["notes.add_note", "notes.echo", "notes.get_note", "notes.list_notes", "notes.search_notes", "notes.sleep"];

#[tokio::test]
async fn both_generations_see_only_their_personas_tools_and_hidden_tools_do_not_exist() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let url = gateway.mcp_url("demo", "notes");
    for (mode, version) in [(modern(), "2026-07-28"), (legacy(), "2025-11-25")] {
        let client = connect(&url, ANALYST_KEY, mode).await;
        let info = client.peer().peer_info().expect("peer info");
        assert_eq!(info.protocol_version.to_string(), version);
        assert_eq!(names(&client).await, ANALYST_TOOLS);

        let result = client
            .peer()
            .call_tool(call("notes.add_note", json!({"title": "t", "body": version})))
            .await
            .expect("call");
        assert_ne!(result.is_error, Some(true));
        let text = serde_json::to_string(&result.content).unwrap();
        assert!(text.contains("added note"), "{text}");

        // The hidden tool answers exactly like one that does not exist.
        let hidden = expect_unknown_tool(&client, "notes.delete_note").await;
        let missing = expect_unknown_tool(&client, "notes.no_such_tool").await;
        assert_eq!(hidden.replace("notes.delete_note", "X"), missing.replace("notes.no_such_tool", "X"));
        client.cancel().await.ok();
    }
    // The admin persona sees the delete tool.
    let admin = connect(&url, ADMIN_KEY, modern()).await;
    assert!(names(&admin).await.contains(&"notes.delete_note".to_string()));
    // Every call above is in the audit log.
    wait_until(std::time::Duration::from_secs(5), || async {
        gateway.audit("tool=notes.add_note").await.len() == 2
            && gateway.audit("tool=notes.delete_note&status=error").await.len() == 2
    })
    .await;
    let events = gateway.audit("tool=notes.add_note").await;
    assert!(
        events.iter().all(|e| e["subject"] == "apikey:analyst-key" && e["channel"] == "mcp" && e["status"] == "ok")
    );
    assert!(events.iter().any(|e| e["client_name"] == "e2e-client"), "{events:?}");
}

#[tokio::test]
async fn legacy_upstreams_are_reached_through_initialize_and_served_to_both_generations() {
    let upstream = Upstream::start("legacy").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(std::time::Duration::from_secs(10), || async {
        let body: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/connections").await.json().await.unwrap();
        body["items"][0]["health"]["protocol_version"] == "2025-11-25"
    })
    .await;
    for mode in [modern(), legacy()] {
        let client = connect(&gateway.mcp_url("demo", "notes"), ANALYST_KEY, mode).await;
        assert_eq!(names(&client).await, ANALYST_TOOLS);
        let r = client.peer().call_tool(call("notes.echo", json!({"text": "hi"}))).await.expect("call");
        assert!(serde_json::to_string(&r.content).unwrap().contains("hi"));
    }
}

#[tokio::test]
async fn legacy_session_lifecycle() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let r = gateway.mcp_raw(ANALYST_KEY, &[], init).await;
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["result"]["protocolVersion"], "2025-06-18");
    assert!(body["result"].get("resultType").is_none());

    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let with = |s: &str| vec![("Mcp-Session-Id", s.to_string()), ("MCP-Protocol-Version", "2025-06-18".to_string())];
    let send = |headers: Vec<(&'static str, String)>, key: &'static str, body: &'static str| {
        let gateway = &gateway;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            gateway.mcp_raw(key, &h, body).await
        }
    };
    assert_eq!(send(with(&session), ANALYST_KEY, list).await.status(), 200);
    // A notification is accepted.
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    assert_eq!(send(with(&session), ANALYST_KEY, note).await.status(), 202);
    // No session header: 400. Unknown session: 404. Someone else's session: 404.
    assert_eq!(send(vec![], ANALYST_KEY, list).await.status(), 400);
    assert_eq!(send(with("nope"), ANALYST_KEY, list).await.status(), 404);
    assert_eq!(send(with(&session), ADMIN_KEY, list).await.status(), 404);
    // An unsupported protocol version: 400; another supported 2025 one is accepted.
    let wrong = vec![("Mcp-Session-Id", session.clone()), ("MCP-Protocol-Version", "2024-01-01".to_string())];
    assert_eq!(send(wrong, ANALYST_KEY, list).await.status(), 400);
    let older = vec![("Mcp-Session-Id", session.clone()), ("MCP-Protocol-Version", "2025-03-26".to_string())];
    assert_eq!(send(older, ANALYST_KEY, list).await.status(), 200);
    // Unknown methods inside a session are 200 with -32601, never 404.
    let r = send(with(&session), ANALYST_KEY, r#"{"jsonrpc":"2.0","id":3,"method":"no/such_method"}"#).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32601);
    // DELETE ends it.
    let client = reqwest::Client::new();
    let del = client
        .delete(gateway.mcp_url("demo", "notes"))
        .header("X-API-Key", ANALYST_KEY)
        .header("Mcp-Session-Id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(send(with(&session), ANALYST_KEY, list).await.status(), 404);
}

#[tokio::test]
async fn malformed_and_mismatched_requests_get_the_spec_errors() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    const MODERN_HEADERS: [(&str, &str); 2] = [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/list")];
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;

    let check = |status: u16, code: i64, r: (u16, Value)| {
        assert_eq!(r.0, status, "{:?}", r.1);
        assert_eq!(r.1["error"]["code"], code, "{:?}", r.1);
        r.1
    };
    let raw = |headers: &'static [(&'static str, &'static str)], body: String| {
        let gateway = &gateway;
        async move {
            let r = gateway.mcp_raw(ANALYST_KEY, headers, &body).await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    check(400, -32700, raw(&[], "{not json".into()).await);
    check(400, -32600, raw(&[], "[]".into()).await);
    check(400, -32600, raw(&MODERN_HEADERS, r#"{"jsonrpc":"1.0","id":1,"method":"tools/list"}"#.into()).await);
    // Header and body disagree.
    let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"notes.echo",{meta}}}}}"#);
    let e = check(400, -32020, raw(&MODERN_HEADERS, body).await);
    assert!(e["error"]["message"].as_str().unwrap().contains("Mcp-Method"));
    // Missing protocol version header.
    let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{{meta}}}}}"#);
    check(400, -32020, raw(&[("Mcp-Method", "tools/list")], body).await);
    // Mcp-Name must match, base64-encoded values are decoded.
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"notes.echo","arguments":{{"text":"x"}},{meta}}}}}"#
    );
    const CALL_HEADERS: [(&str, &str); 3] =
        [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "notes.list_notes")];
    check(400, -32020, raw(&CALL_HEADERS, body.clone()).await);
    // "notes.echo" in base64.
    const ENCODED: [(&str, &str); 3] = [
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "=?base64?bm90ZXMuZWNobw==?="),
    ];
    let ok = raw(&ENCODED, body).await;
    assert_eq!(ok.0, 200, "{:?}", ok.1);
    assert_eq!(ok.1["result"]["resultType"], "complete");
    // Unsupported version lists what is supported.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"1900-01-01","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let e = check(
        400,
        -32022,
        raw(&[("MCP-Protocol-Version", "1900-01-01"), ("Mcp-Method", "tools/list")], body.into()).await,
    );
    assert_eq!(e["error"]["data"]["requested"], "1900-01-01");
    assert!(e["error"]["data"]["supported"].as_array().unwrap().contains(&json!("2026-07-28")));
    // Missing clientCapabilities.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    check(400, -32602, raw(&MODERN_HEADERS, body.into()).await);
    // Unknown method: 404 on the stateless generation.
    let r = gateway.mcp_modern(ANALYST_KEY, 9, "no/such_method", json!({})).await;
    check(404, -32601, r);
    // A bad cursor.
    let r = gateway.mcp_modern(ANALYST_KEY, 10, "tools/list", json!({"cursor": "%%%"})).await;
    check(200, -32602, r);
    // Oversized bodies are refused before parsing. One byte over the default limit (4 MiB): the
    // gateway then has read the whole body when it answers. A body much larger than the limit
    // is answered while the client still writes it, and the client may see its write fail
    // (EPIPE) before it reads the 413.
    let envelope = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":""}}"#;
    let big =
        envelope.replace(r#""pad":"""#, &format!(r#""pad":"{}""#, "x".repeat(4 * 1024 * 1024 + 1 - envelope.len())));
    assert_eq!(big.len(), 4 * 1024 * 1024 + 1);
    let r = raw(&[], big).await;
    assert_eq!(r.0, 413);
    // SSE when the client accepts only SSE.
    let r = reqwest::Client::new()
        .post(gateway.mcp_url("demo", "notes"))
        .header("X-API-Key", ANALYST_KEY)
        .header("accept", "text/event-stream")
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "server/discover")
        .body(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{{{meta}}}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    assert!(text.starts_with("event: message\ndata: {") && text.contains("supportedVersions"), "{text}");
}

#[tokio::test]
async fn authentication_fails_closed_and_foreign_endpoints_do_not_exist() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let http = reqwest::Client::new();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#;
    for key in [None, Some("pcl_wrongwrongwrongwrongwrongwrong"), Some("not-a-portcullis-key")] {
        let mut r = http.post(gateway.mcp_url("demo", "notes")).header("content-type", "application/json").body(body);
        if let Some(key) = key {
            r = r.header("authorization", format!("Bearer {key}"));
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    // A persona the endpoint does not admit gets exactly what a missing endpoint gives.
    let hidden = gateway.mcp_raw(OUTSIDER_KEY, &[], body).await;
    assert_eq!(hidden.status(), 404);
    let hidden: Value = hidden.json().await.unwrap();
    let missing = http
        .post(gateway.mcp_url("demo", "nothing-here"))
        .header("X-API-Key", OUTSIDER_KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.unwrap();
    assert_eq!(without_request_details(hidden, "notes"), without_request_details(missing, "nothing-here"));
    // Browser origins other than localhost are refused (DNS rebinding).
    let evil = gateway.mcp_raw(ANALYST_KEY, &[("Origin", "http://evil.example")], body).await;
    assert_eq!(evil.status(), 403);
    let local = gateway.mcp_raw(ANALYST_KEY, &[("Origin", "http://localhost:6274")], body).await;
    assert_eq!(local.status(), 200);
    // Auth failures are audited under the tenant named in the URL.
    wait_until(std::time::Duration::from_secs(5), || async {
        gateway.audit("status=denied").await.iter().filter(|e| e["channel"] == "mcp").count() >= 3
    })
    .await;
}

#[tokio::test]
async fn a_listen_stream_acknowledges_its_filter_and_announces_tool_list_changes() {
    let upstream = Upstream::start("both").await;
    let files = quickstart(&upstream.url());
    let gateway = Gateway::start(&files).await;
    wait_until(std::time::Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() })
        .await;
    let stream = ListenStream::open(&gateway, ANALYST_KEY, "notes").await;
    wait_until(std::time::Duration::from_secs(5), || async {
        stream.count("notifications/subscriptions/acknowledged") == 1
    })
    .await;
    let ack = stream.messages.lock().unwrap()[0].clone();
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "the acknowledgement comes first");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true, "promptsListChanged": true, "resourcesListChanged": true,
            "resourceSubscriptions": ["notes+note://1"]}),
        "only what is honoured: not the resource the persona may not read"
    );
    assert_eq!(ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1");
    assert_eq!(stream.count("notifications/tools/list_changed"), 0);

    // A persona edit changes what the analyst sees: the stream says so.
    let edited = files[0].1.replace(r#"deny: ["notes.delete_note"]"#, r#"deny: ["notes.delete_note", "notes.echo"]"#);
    gateway.write("personas.yaml", &edited);
    wait_until(std::time::Duration::from_secs(5), || async { stream.count("notifications/tools/list_changed") >= 1 })
        .await;
    let changed = stream
        .messages
        .lock()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "notifications/tools/list_changed")
        .cloned()
        .unwrap();
    assert_eq!(changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1");

    // server/discover advertises it.
    let (_, discovered) = gateway.mcp_modern(ANALYST_KEY, 2, "server/discover", json!({})).await;
    assert_eq!(discovered["result"]["capabilities"]["tools"]["listChanged"], true, "{discovered}");
}

#[tokio::test]
async fn a_2025_session_gets_tool_list_changes_on_its_get_stream() {
    let upstream = Upstream::start("both").await;
    let files = quickstart(&upstream.url());
    let gateway = Gateway::start(&files).await;
    wait_until(std::time::Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() })
        .await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"get-stream","version":"1"}}}"#;
    let r = gateway.mcp_raw(ANALYST_KEY, &[], init).await;
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let get = |session: Option<&str>, key: &str| {
        let mut request = reqwest::Client::new()
            .get(gateway.mcp_url("demo", "notes"))
            .header("X-API-Key", key)
            .header("accept", "text/event-stream")
            .header("MCP-Protocol-Version", "2025-11-25");
        if let Some(s) = session {
            request = request.header("Mcp-Session-Id", s);
        }
        request.send()
    };
    assert_eq!(get(None, ANALYST_KEY).await.unwrap().status(), 400, "the stream belongs to a session");
    assert_eq!(get(Some("no-such-session"), ANALYST_KEY).await.unwrap().status(), 404);
    assert_eq!(get(Some(&session), ADMIN_KEY).await.unwrap().status(), 404, "another caller's session does not exist");
    let mut stream = get(Some(&session), ANALYST_KEY).await.unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");

    let edited = files[0].1.replace(r#"deny: ["notes.delete_note"]"#, r#"deny: ["notes.delete_note", "notes.echo"]"#);
    gateway.write("personas.yaml", &edited);
    let received = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut text = String::new();
        while let Ok(Some(chunk)) = stream.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("notifications/tools/list_changed") {
                return text;
            }
        }
        text
    })
    .await
    .expect("a notification within 5 s");
    assert!(received.contains("\"method\":\"notifications/tools/list_changed\""), "{received}");
    let (_, init_result) = (0, gateway.mcp_raw(ANALYST_KEY, &[], init).await.json::<Value>().await.unwrap());
    assert_eq!(init_result["result"]["capabilities"]["tools"]["listChanged"], true);
}

#[tokio::test]
async fn a_2025_client_cancels_a_running_call_with_notifications_cancelled() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(std::time::Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() })
        .await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"canceller","version":"1"}}}"#;
    let session =
        gateway.mcp_raw(ANALYST_KEY, &[], init).await.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let sleep = r#"{"jsonrpc":"2.0","id":"slow-1","method":"tools/call","params":{"name":"notes.sleep","arguments":{"millis":1500}}}"#;
    let running = gateway.mcp_raw(ANALYST_KEY, &headers, sleep);
    let cancel = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let cancelled =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"slow-1","reason":"user"}}"#;
        gateway.mcp_raw(ANALYST_KEY, &headers, cancelled).await.status()
    };
    let (answer, cancel_status) = tokio::join!(running, cancel);
    assert_eq!(cancel_status, 202);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["error"]["message"], "Request cancelled by the client", "{answer}");
    wait_until(std::time::Duration::from_secs(5), || async {
        gateway.audit("tool=notes.sleep&status=error").await.iter().any(|e| e["detail"] == "cancelled by the client")
    })
    .await;

    // Another session's cancellation of the same id reaches nothing: the call completes.
    let other = gateway.mcp_raw(ANALYST_KEY, &[], init).await.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let other_headers = [("Mcp-Session-Id", other.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let sleep = r#"{"jsonrpc":"2.0","id":"slow-2","method":"tools/call","params":{"name":"notes.sleep","arguments":{"millis":800}}}"#;
    let running = gateway.mcp_raw(ANALYST_KEY, &headers, sleep);
    let foreign_cancel = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let cancelled = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"slow-2"}}"#;
        gateway.mcp_raw(ANALYST_KEY, &other_headers, cancelled).await.status()
    };
    let (answer, status) = tokio::join!(running, foreign_cancel);
    assert_eq!(status, 202);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["result"]["isError"], false, "{answer}");
}

#[tokio::test]
async fn a_request_whose_client_goes_away_is_cancelled_and_still_audited() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(std::time::Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() })
        .await;
    let (status, _) = gateway
        .mcp_modern(ANALYST_KEY, 1, "tools/call", json!({"name": "notes.sleep", "arguments": {"millis": 5}}))
        .await;
    assert_eq!(status, 200);
    // Both answer paths: a plain JSON answer, and the task that may stream (progress asked).
    for (n, progress) in [(1usize, false), (2, true)] {
        let mut params = json!({"name": "notes.sleep", "arguments": {"millis": 1500}});
        if progress {
            params["_meta"] = json!({"progressToken": "p"});
        }
        let call = gateway.mcp_modern(ANALYST_KEY, 10 + n as u64, "tools/call", params);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(300), call).await.is_err());
        wait_until(std::time::Duration::from_secs(5), || async {
            let events = gateway.audit("tool=notes.sleep&status=error").await;
            events.iter().filter(|e| e["error_code"] == "cancelled").count() >= n
        })
        .await;
    }
}
