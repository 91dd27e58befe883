//! Portcullis in front of a third-party MCP server: the reference "everything" server from npm
//! (TypeScript SDK, 2025 protocol versions with sessions). `scripts/test` installs it and sets
//! `PORTCULLIS_TEST_EVERYTHING`.

mod support;

use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

struct Everything {
    child: Child,
}

impl Drop for Everything {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Everything {
    async fn start(port: u16) -> Self {
        let script = std::env::var("PORTCULLIS_TEST_EVERYTHING").expect(
            "PORTCULLIS_TEST_EVERYTHING must name server-everything's dist/index.js: run the tests with ./scripts/test, which installs it",
        );
        let child = Command::new("node")
            .arg(&script)
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node");
        wait_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        Everything { child }
    }
}

fn manifests(port: u16) -> Vec<(&'static str, String)> {
    let mut files = quickstart("http://127.0.0.1:1/unused");
    files[0].1.push_str("---\napiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: tester, namespace: demo}\nspec: {tools: {allow: [\"everything.*\"], deny: [\"everything.get-env\"]}, limits: {toolTimeoutSeconds: 3}}\n");
    files.push((
        "everything.yaml",
        format!(
            r#"apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: everything, namespace: demo}}
spec: {{prefix: everything, mcp: {{url: "http://127.0.0.1:{port}/mcp"}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: everything, namespace: demo}}
spec: {{connections: [everything], personas: [tester], toolNaming: {{separator: "_"}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: tester-key, namespace: demo}}
spec: {{persona: tester, secretName: tester-key}}
---
apiVersion: v1
kind: Secret
metadata: {{name: tester-key, namespace: demo}}
stringData: {{key: pcl_tester_0123456789abcdefghijklmnopq}}
"#
        ),
    ));
    files
}

const TESTER_KEY: &str = "pcl_tester_0123456789abcdefghijklmnopq";

#[tokio::test]
async fn a_third_party_legacy_server_is_governed_and_its_lost_session_is_re_established() {
    init();
    let port = free_port();
    let everything = Everything::start(port).await;
    let gateway = Gateway::start(&manifests(port)).await;
    wait_until(Duration::from_secs(15), || async { !gateway.tool_names(TESTER_KEY).await.is_empty() }).await;
    let names = gateway.tool_names(TESTER_KEY).await;
    assert!(names.contains(&"everything.echo".to_string()), "{names:?}");
    assert!(!names.contains(&"everything.get-env".to_string()), "denied tool listed: {names:?}");
    let connections: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/connections").await.json().await.unwrap();
    let everything_health =
        connections["items"].as_array().unwrap().iter().find(|c| c["name"] == "everything").cloned();
    assert!(everything_health.is_none(), "the admin persona cannot reach this endpoint, so the connection is hidden");

    // A 2026-07-28 client reaches the 2025 server through Portcullis, with the `_` separator.
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(gateway.mcp_url("demo", "everything")).auth_header(TESTER_KEY),
    );
    let client = ClientConfig::new(ClientCapabilities::default(), Implementation::new("e2e", "1"))
        .serve_with_lifecycle(
            transport,
            ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] },
        )
        .await
        .expect("connect");
    let tools = client.peer().list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "everything_echo"));
    assert!(!tools.iter().any(|t| t.name == "everything_get-env"));
    let echo = |text: &'static str| {
        CallToolRequestParams::new("everything_echo")
            .with_arguments(json!({"message": text}).as_object().unwrap().clone())
    };
    let r = client.peer().call_tool(echo("first")).await.unwrap();
    assert!(serde_json::to_string(&r.content).unwrap().contains("Echo: first"));

    // The server restarts and forgets its sessions; Portcullis notices (keepalive ping) and
    // starts a new one.
    drop(everything);
    let _everything = Everything::start(port).await;
    wait_until(Duration::from_secs(45), || async {
        client
            .peer()
            .call_tool(echo("again"))
            .await
            .is_ok_and(|r| serde_json::to_string(&r.content).unwrap().contains("Echo: again"))
    })
    .await;
}

/// The everything server asks a 2025 client that declared roots for them on the session's GET
/// stream, outside any request, and logs how many it got. Through Portcullis the request
/// reaches the client's own GET stream (each 2025 client has an upstream session of its own),
/// the answer the client POSTs goes back upstream, and the server's log message comes back.
#[tokio::test]
async fn a_2025_servers_request_outside_any_request_reaches_the_clients_get_stream_and_is_answered() {
    init();
    let port = free_port();
    let _everything = Everything::start(port).await;
    let gateway = Gateway::start(&manifests(port)).await;
    wait_until(Duration::from_secs(15), || async { !gateway.tool_names(TESTER_KEY).await.is_empty() }).await;
    let post = |session: Option<&str>, body: Value| {
        let mut request = reqwest::Client::new()
            .post(gateway.mcp_url("demo", "everything"))
            .header("X-API-Key", TESTER_KEY)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("MCP-Protocol-Version", "2025-11-25");
        if let Some(session) = session {
            request = request.header("Mcp-Session-Id", session);
        }
        request.body(body.to_string()).send()
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
        "capabilities": {"roots": {}}, "clientInfo": {"name": "rooted", "version": "1"}}});
    let response = post(None, init).await.unwrap();
    let session = response.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let level = json!({"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "info"}});
    assert_eq!(post(Some(&session), level).await.unwrap().status(), 200);
    let mut stream = gateway.session_stream(TESTER_KEY, "everything", &session).await;
    assert_eq!(stream.status(), 200);
    // The first call starts the client's upstream session; the server asks for roots soon after.
    let echo = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "everything_echo", "arguments": {"message": "hi"}}});
    assert!(post(Some(&session), echo).await.unwrap().text().await.unwrap().contains("Echo: hi"));
    let mut text = String::new();
    let request = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let chunk = stream.chunk().await.unwrap().expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(line) = text.lines().find(|l| l.contains("roots/list")) {
                return serde_json::from_str::<Value>(line.trim_start_matches("data:").trim()).unwrap();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("roots/list on the client's GET stream: {text}"));
    assert_eq!(request["method"], "roots/list");
    let answer = json!({"jsonrpc": "2.0", "id": request["id"], "result": {"roots": [
        {"uri": "file:///work/project", "name": "project"}]}});
    assert_eq!(post(Some(&session), answer).await.unwrap().status(), 202);
    let logged = tokio::time::timeout(Duration::from_secs(10), async {
        let mut text = String::new();
        while let Some(chunk) = stream.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("Roots updated") {
                return text;
            }
        }
        text
    })
    .await
    .expect("the server's log message");
    assert!(logged.contains("Roots updated: 1 root(s) received from client"), "{logged}");
}
