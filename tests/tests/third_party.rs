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
