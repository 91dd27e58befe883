//! Resources, resource templates, prompts and completion through the gateway: aggregated from
//! upstreams of either generation, served to clients of either generation (the official Rust
//! SDK) and over REST, filtered per persona, with hidden things answering like missing ones.

mod support;

use rmcp::ServiceError;
use rmcp::model::{ClientCapabilities, ClientConfig, ClientRequest, Implementation, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use std::time::Duration;
use support::*;

type Client = RunningService<RoleClient, ClientConfig>;

async fn connect(url: &str, key: &str, modern: bool) -> Client {
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(url).auth_header(key),
    );
    let mode = if modern {
        ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] }
    } else {
        ClientLifecycleMode::Initialize
    };
    ClientConfig::new(ClientCapabilities::default(), Implementation::new("e2e-client", "1.0"))
        .serve_with_lifecycle(transport, mode)
        .await
        .expect("MCP client connects")
}

/// Any request, as JSON in and out: the SDK's typed request built from `method` and `params`.
async fn request(client: &Client, method: &str, params: Value) -> Result<Value, rmcp::ErrorData> {
    let request: ClientRequest =
        serde_json::from_value(json!({"method": method, "params": params})).expect("a valid request");
    match client.peer().send_request(request).await {
        Ok(result) => Ok(serde_json::to_value(result).unwrap()),
        Err(ServiceError::McpError(e)) => Err(e),
        Err(other) => panic!("{method} failed outside MCP: {other:?}"),
    }
}

async fn uris(client: &Client) -> Vec<String> {
    let listed = client.peer().list_all_resources().await.expect("resources/list");
    let mut uris: Vec<String> = listed.into_iter().map(|r| r.uri.clone()).collect();
    uris.sort();
    uris
}

/// Adds a note through the admin's REST tool call and waits until the gateway's catalog lists
/// it as a resource (the upstream announces the change; the gateway refreshes).
async fn add_note(gateway: &Gateway, title: &str, body: &str) -> String {
    let (status, result) = gateway.call_tool(ADMIN_KEY, "notes.add_note", json!({"title": title, "body": body})).await;
    assert_eq!(status, 200, "{result}");
    let text = result["content"][0]["text"].as_str().unwrap().to_string();
    let id = text.trim_start_matches("added note ").to_string();
    let uri = format!("notes+note://{id}");
    wait_until(Duration::from_secs(10), || async {
        let listed: Value = gateway.get(ADMIN_KEY, "/api/v1/resources").await.json().await.unwrap();
        listed["items"].as_array().unwrap().iter().any(|r| r["uri"] == uri)
    })
    .await;
    id
}

/// The error's message with the name or URI it names replaced, to compare two errors.
fn shape(error: &rmcp::ErrorData, name: &str) -> (i32, String) {
    (error.code.0, error.message.replace(name, "<name>"))
}

#[tokio::test]
async fn resources_prompts_and_completion_reach_both_client_generations_from_both_upstream_generations() {
    for upstream_protocol in ["both", "legacy"] {
        let upstream = Upstream::start(upstream_protocol).await;
        let gateway = Gateway::start(&quickstart(&upstream.url())).await;
        let url = gateway.mcp_url("demo", "notes");
        let id = add_note(&gateway, "Quarterly plan", "Ship resources.").await;
        let note = format!("notes+note://{id}");
        for modern in [true, false] {
            let context = format!("upstream {upstream_protocol}, modern client {modern}");
            let analyst = connect(&url, ANALYST_KEY, modern).await;
            // The analyst may read notes and the index, not the logo: it is not listed.
            assert_eq!(uris(&analyst).await, vec![note.clone(), "notes+notes://index".to_string()], "{context}");
            let templates = request(&analyst, "resources/templates/list", json!({})).await.unwrap();
            assert_eq!(templates["resourceTemplates"][0]["uriTemplate"], "notes+note://{id}", "{context}");

            let read = request(&analyst, "resources/read", json!({"uri": note})).await.unwrap();
            assert_eq!(read["contents"][0]["uri"], note, "contents name the exposed URI ({context})");
            assert!(read["contents"][0]["text"].as_str().unwrap().contains("Ship resources."), "{context}: {read}");
            if modern {
                assert_eq!(read["cacheScope"], "private", "{context}: {read}");
                assert!(read["ttlMs"].is_u64(), "{context}: {read}");
            }

            // A hidden resource reads exactly like a missing one, with the caller's generation's code.
            let hidden =
                request(&analyst, "resources/read", json!({"uri": "notes+notes://logo.png"})).await.unwrap_err();
            let missing = request(&analyst, "resources/read", json!({"uri": "notes+note://999"})).await.unwrap_err();
            assert_eq!(hidden.code.0, if modern { -32602 } else { -32002 }, "{context}: {hidden:?}");
            assert_eq!(shape(&hidden, "notes+notes://logo.png"), shape(&missing, "notes+note://999"), "{context}");
            // A URI of a connection this endpoint does not have is missing too.
            let foreign = request(&analyst, "resources/read", json!({"uri": "other+note://1"})).await.unwrap_err();
            assert_eq!(shape(&foreign, "other+note://1"), shape(&missing, "notes+note://999"), "{context}");

            // The analyst sees no prompts; the prompt answers like a missing one, and so does
            // completion against it.
            let prompts = request(&analyst, "prompts/list", json!({})).await.unwrap();
            assert_eq!(prompts["prompts"], json!([]), "{context}");
            let hidden =
                request(&analyst, "prompts/get", json!({"name": "notes.summarize_note", "arguments": {"id": id}}))
                    .await
                    .unwrap_err();
            let missing = request(&analyst, "prompts/get", json!({"name": "notes.nope"})).await.unwrap_err();
            assert_eq!(hidden.code.0, -32602);
            assert_eq!(shape(&hidden, "notes.summarize_note"), shape(&missing, "notes.nope"), "{context}");
            let completion = json!({"ref": {"type": "ref/prompt", "name": "notes.summarize_note"},
                "argument": {"name": "id", "value": ""}});
            let refused = request(&analyst, "completion/complete", completion.clone()).await.unwrap_err();
            assert_eq!(shape(&refused, "notes.summarize_note"), shape(&missing, "notes.nope"), "{context}");
            // Completion against a visible template is routed to its upstream.
            let suggested = request(
                &analyst,
                "completion/complete",
                json!({
                "ref": {"type": "ref/resource", "uri": "notes+note://{id}"}, "argument": {"name": "id", "value": id}}),
            )
            .await
            .unwrap();
            assert_eq!(suggested["completion"]["values"], json!([id]), "{context}: {suggested}");
            // … and against a hidden resource it is refused like a missing one.
            let refused = request(&analyst, "completion/complete", json!({
                "ref": {"type": "ref/resource", "uri": "notes+notes://logo.png"}, "argument": {"name": "x", "value": ""}}))
            .await
            .unwrap_err();
            assert_eq!(refused.code.0, if modern { -32602 } else { -32002 }, "{context}");
            analyst.cancel().await.ok();

            // The admin sees and uses the prompt.
            let admin = connect(&url, ADMIN_KEY, modern).await;
            assert_eq!(uris(&admin).await.len(), 3, "{context}");
            let prompts = request(&admin, "prompts/list", json!({})).await.unwrap();
            assert_eq!(prompts["prompts"][0]["name"], "notes.summarize_note", "{context}");
            let got = request(
                &admin,
                "prompts/get",
                json!({"name": "notes.summarize_note", "arguments": {"id": id, "style": "detailed"}}),
            )
            .await
            .unwrap();
            let text = got["messages"][0]["content"]["text"].as_str().unwrap();
            assert!(text.contains("detailed summary") && text.contains("Quarterly plan"), "{context}: {got}");
            let suggested = request(&admin, "completion/complete", completion).await.unwrap();
            assert_eq!(suggested["completion"]["values"], json!([id]), "{context}");
            // An upstream's own refusal of the arguments comes back as its error.
            let refused = request(&admin, "prompts/get", json!({"name": "notes.summarize_note", "arguments": {}}))
                .await
                .unwrap_err();
            assert_eq!(refused.code.0, -32602, "{context}");
            admin.cancel().await.ok();
        }
        // Reads and prompt gets are audited under their canonical names.
        wait_until(Duration::from_secs(5), || async {
            gateway.audit(&format!("tool={}", urlencode(&note))).await.len() >= 2
                && !gateway.audit("tool=notes.summarize_note&status=ok").await.is_empty()
        })
        .await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn resource_id(canonical: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(canonical)
}

#[tokio::test]
async fn rest_serves_resources_with_their_content_types_and_prompts_and_completions() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let id = add_note(&gateway, "Budget", "Numbers.").await;
    let note = format!("notes+note://{id}");

    let listed: Value = gateway.get(ANALYST_KEY, "/api/v1/resources").await.json().await.unwrap();
    let listed: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|r| r["uri"].as_str().unwrap()).collect();
    assert_eq!(listed, vec![note.as_str(), "notes+notes://index"]);

    // Text comes back as text with its media type.
    let r = gateway.get(ANALYST_KEY, &format!("/api/v1/resources/{}/content", resource_id(&note))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/markdown");
    assert_eq!(r.text().await.unwrap(), "# Budget\n\nNumbers.");
    // A blob comes back decoded, as the PNG it is.
    let logo = resource_id("notes+notes://logo.png");
    let r = gateway.get(ADMIN_KEY, &format!("/api/v1/resources/{logo}/content")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(&r.bytes().await.unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    // Hidden from the analyst: exactly a missing resource.
    let hidden = gateway.get(ANALYST_KEY, &format!("/api/v1/resources/{logo}/content")).await;
    assert_eq!(hidden.status(), 404);
    let hidden = without_request_details(hidden.json().await.unwrap(), "notes+notes://logo.png");
    let missing =
        gateway.get(ANALYST_KEY, &format!("/api/v1/resources/{}/content", resource_id("notes+note://999"))).await;
    assert_eq!(missing.status(), 404);
    assert_eq!(hidden, without_request_details(missing.json().await.unwrap(), "notes+note://999"));
    let r = gateway.get(ANALYST_KEY, &format!("/api/v1/resources/{logo}")).await;
    assert_eq!(r.status(), 404);
    let r: Value =
        gateway.get(ANALYST_KEY, &format!("/api/v1/resources/{}", resource_id(&note))).await.json().await.unwrap();
    assert_eq!(r["mime_type"], "text/markdown");
    assert_eq!(r["connection"], "notes");
    // A URI expanded from a template reads too, though not listed.
    let r = gateway.get(ANALYST_KEY, "/api/v1/resources/templates").await;
    let templates: Value = r.json().await.unwrap();
    assert_eq!(templates["items"][0]["uri_template"], "notes+note://{id}");

    // Prompts: hidden from the analyst, rendered for the admin.
    let analyst_prompts: Value = gateway.get(ANALYST_KEY, "/api/v1/prompts").await.json().await.unwrap();
    assert_eq!(analyst_prompts["total"], 0);
    let r = gateway
        .post(ANALYST_KEY, "/api/v1/prompts/notes.summarize_note/render", &json!({"arguments": {"id": id}}))
        .await;
    assert_eq!(r.status(), 404);
    let r = gateway.get(ADMIN_KEY, "/api/v1/prompts/notes.summarize_note").await;
    let prompt: Value = r.json().await.unwrap();
    assert_eq!(prompt["arguments"][0]["name"], "id", "{prompt}");
    let r =
        gateway.post(ADMIN_KEY, "/api/v1/prompts/notes.summarize_note/render", &json!({"arguments": {"id": id}})).await;
    assert_eq!(r.status(), 200);
    let rendered: Value = r.json().await.unwrap();
    assert!(rendered["messages"][0]["content"]["text"].as_str().unwrap().contains("Budget"), "{rendered}");
    assert!(rendered.get("resultType").is_none(), "no MCP wire fields over REST: {rendered}");
    // The upstream's refusal of the arguments is a 422.
    let r = gateway.post(ADMIN_KEY, "/api/v1/prompts/notes.summarize_note/render", &json!({"arguments": {}})).await;
    assert_eq!(r.status(), 422);

    // Completions.
    let body =
        json!({"ref": {"type": "ref/resource", "uri": "notes+note://{id}"}, "argument": {"name": "id", "value": ""}});
    let r = gateway.post(ANALYST_KEY, "/api/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    let completion: Value = r.json().await.unwrap();
    assert_eq!(completion["completion"]["values"], json!([id]));
    let body =
        json!({"ref": {"type": "ref/prompt", "name": "notes.summarize_note"}, "argument": {"name": "id", "value": ""}});
    assert_eq!(gateway.post(ANALYST_KEY, "/api/v1/completions", &body).await.status(), 404);
    assert_eq!(gateway.post(ADMIN_KEY, "/api/v1/completions", &body).await.status(), 200);
    let r =
        gateway.post(ADMIN_KEY, "/api/v1/completions", &json!({"ref": {"type": "ref/other"}, "argument": {}})).await;
    assert_eq!(r.status(), 400);

    // Audited like MCP, under canonical names.
    wait_until(Duration::from_secs(5), || async {
        !gateway.audit(&format!("tool={}&status=ok", urlencode(&note))).await.is_empty()
            && !gateway.audit("tool=notes.summarize_note&status=ok").await.is_empty()
    })
    .await;
}

#[tokio::test]
async fn upstream_resource_changes_reach_listen_streams() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let stream = ListenStream::open(&gateway, ANALYST_KEY, "notes").await;
    wait_until(Duration::from_secs(5), || async { stream.count("notifications/subscriptions/acknowledged") == 1 })
        .await;
    assert_eq!(stream.count("notifications/resources/list_changed"), 0);
    // Adding a note changes the upstream's resources; it announces that, the gateway refreshes
    // its catalog, and the listen stream hears of it.
    add_note(&gateway, "New", "note").await;
    wait_until(Duration::from_secs(5), || async { stream.count("notifications/resources/list_changed") >= 1 }).await;
    let messages = stream.messages.lock().unwrap().clone();
    let changed = messages.iter().find(|m| m["method"] == "notifications/resources/list_changed").unwrap();
    assert_eq!(changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1");
    // Only the list that changed is announced.
    assert_eq!(stream.count("notifications/tools/list_changed"), 0);
    assert_eq!(stream.count("notifications/prompts/list_changed"), 0);
}

#[tokio::test]
async fn a_listen_stream_hears_updates_of_the_resources_it_follows() {
    for upstream_protocol in ["both", "legacy"] {
        let upstream = Upstream::start(upstream_protocol).await;
        let gateway = Gateway::start(&quickstart(&upstream.url())).await;
        wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
        let stream = ListenStream::open_following(&gateway, ANALYST_KEY, "notes", &["notes+notes://index"]).await;
        wait_until(Duration::from_secs(5), || async { stream.count("notifications/subscriptions/acknowledged") == 1 })
            .await;
        let ack = stream.messages.lock().unwrap()[0].clone();
        assert_eq!(ack["params"]["notifications"]["resourceSubscriptions"], json!(["notes+notes://index"]));
        // The upstream is asked to follow the URI (a new listen upstream, or resources/subscribe).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, _) = gateway.call_tool(ADMIN_KEY, "notes.add_note", json!({"title": "t", "body": "b"})).await;
        assert_eq!(status, 200);
        wait_until(Duration::from_secs(10), || async { stream.count("notifications/resources/updated") >= 1 }).await;
        let messages = stream.messages.lock().unwrap().clone();
        let updated = messages.iter().find(|m| m["method"] == "notifications/resources/updated").unwrap();
        assert_eq!(updated["params"]["uri"], "notes+notes://index", "{upstream_protocol}: {updated}");
        assert_eq!(updated["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1");
    }
}

/// Reads an event stream until `needle` appears (at most `limit`); everything read so far.
async fn read_until(stream: &mut reqwest::Response, needle: &str, limit: Duration) -> String {
    let mut text = String::new();
    let _ = tokio::time::timeout(limit, async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains(needle) {
                return;
            }
        }
    })
    .await;
    text
}

#[tokio::test]
async fn a_2025_session_hears_updates_of_the_resources_it_subscribed_to() {
    // The gateway follows a 2026-07-28 upstream through `subscriptions/listen` and a 2025 one
    // through `resources/subscribe`; either way the update reaches the session's GET stream.
    for upstream_protocol in ["both", "legacy"] {
        let upstream = Upstream::start(upstream_protocol).await;
        let gateway = Gateway::start(&quickstart(&upstream.url())).await;
        wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
        let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"subscriber","version":"1"}}}"#;
        let initialized = gateway.mcp_raw(ANALYST_KEY, &[], init).await;
        let session = initialized.headers()["mcp-session-id"].to_str().unwrap().to_string();
        let capabilities = initialized.json::<Value>().await.unwrap()["result"]["capabilities"].clone();
        assert_eq!(capabilities["resources"]["subscribe"], true, "{capabilities}");
        let call = |id: u64, method: &str, params: Value| {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
            let session = session.clone();
            let gateway = &gateway;
            async move {
                let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
                gateway.mcp_raw(ANALYST_KEY, &headers, &body).await.json::<Value>().await.unwrap()
            }
        };
        let mut stream = gateway.session_stream(ANALYST_KEY, "notes", &session).await;
        assert_eq!(stream.status(), 200);

        // A resource the persona may not read cannot be subscribed to, exactly like a missing one.
        let hidden = call(2, "resources/subscribe", json!({"uri": "notes+notes://logo.png"})).await;
        let missing = call(3, "resources/subscribe", json!({"uri": "notes+notes://nothing"})).await;
        assert_eq!(hidden["error"]["code"], -32002, "{hidden}");
        assert_eq!(
            hidden["error"]["message"].as_str().unwrap().replace("logo.png", "X"),
            missing["error"]["message"].as_str().unwrap().replace("nothing", "X")
        );

        let subscribed = call(4, "resources/subscribe", json!({"uri": "notes+notes://index"})).await;
        assert_eq!(subscribed["result"], json!({}), "{subscribed}");
        // The upstream's listen stream is opened anew with the URI; give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, added) = gateway.call_tool(ADMIN_KEY, "notes.add_note", json!({"title": "t", "body": "b"})).await;
        assert_eq!(status, 200, "{added}");
        let heard = read_until(&mut stream, "notifications/resources/updated", Duration::from_secs(10)).await;
        assert!(
            heard.contains(r#""method":"notifications/resources/updated","params":{"uri":"notes+notes://index"}"#),
            "{upstream_protocol}: {heard}"
        );

        // After unsubscribing, another change brings no update (only list changes).
        let unsubscribed = call(5, "resources/unsubscribe", json!({"uri": "notes+notes://index"})).await;
        assert_eq!(unsubscribed["result"], json!({}), "{unsubscribed}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        gateway.call_tool(ADMIN_KEY, "notes.add_note", json!({"title": "t2", "body": "b"})).await;
        let later = read_until(&mut stream, "notifications/resources/updated", Duration::from_secs(2)).await;
        assert!(!later.contains("notifications/resources/updated"), "{upstream_protocol}: {later}");
    }
}

#[tokio::test]
async fn a_listen_stream_may_follow_at_most_a_hundred_resources() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let uris: Vec<String> = (0..101).map(|i| format!("notes+note://{i}")).collect();
    let body = json!({"jsonrpc": "2.0", "id": "too-many", "method": "subscriptions/listen", "params": {
        "notifications": {"resourceSubscriptions": uris},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let answer: Value = reqwest::Client::new()
        .post(gateway.mcp_url("demo", "notes"))
        .header("X-API-Key", ANALYST_KEY)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "subscriptions/listen")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("at most 100"), "{answer}");
}
