//! Per-connection failure modes: while an upstream is unreachable, `open` drops its tools out of
//! lists and fails calls to them with a clear error, the rest of the endpoint unaffected;
//! `closed` makes every endpoint that includes it answer 503 until it is back.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

fn names(listed: &Value) -> Vec<String> {
    listed["result"]["tools"]
        .as_array()
        .map(|tools| tools.iter().filter_map(|t| t["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn an_open_connection_drops_out_and_a_closed_one_closes_its_endpoints() {
    let notes = Upstream::start("both").await;
    let mut spare = Upstream::start("both").await;
    let mut vital = Upstream::start("both").await;
    let mut files = quickstart(&notes.url());
    files.push((
        "more.yaml",
        format!(
            r#"apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: spare, namespace: demo}}
spec: {{prefix: spare, failureMode: open, mcp: {{url: "{}", refreshIntervalSeconds: 5}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: vital, namespace: demo}}
spec: {{prefix: vital, failureMode: closed, mcp: {{url: "{}", refreshIntervalSeconds: 5}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: mixed, namespace: demo}}
spec: {{connections: [notes, spare], personas: [admin]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: strict, namespace: demo}}
spec: {{connections: [notes, vital], personas: [admin]}}
"#,
            spare.url(),
            vital.url()
        ),
    ));
    let gateway = Gateway::start(&files).await;
    let list = |endpoint: &'static str| {
        let gateway = &gateway;
        async move { gateway.mcp_modern_at(ADMIN_KEY, endpoint, 1, "tools/list", json!({})).await }
    };
    wait_until(Duration::from_secs(10), || async {
        let mixed = names(&list("mixed").await.1);
        let strict = names(&list("strict").await.1);
        mixed.iter().any(|n| n.starts_with("spare.")) && strict.iter().any(|n| n.starts_with("vital."))
    })
    .await;

    // open: the spare's tools leave the list, the notes' stay; a call fails with a clear error.
    spare.stop();
    wait_until(Duration::from_secs(15), || async {
        !names(&list("mixed").await.1).iter().any(|n| n.starts_with("spare."))
    })
    .await;
    let (status, listed) = list("mixed").await;
    assert_eq!(status, 200);
    assert!(names(&listed).iter().any(|n| n.starts_with("notes.")), "{listed}");
    let (status, called) = gateway
        .mcp_modern_at(ADMIN_KEY, "mixed", 2, "tools/call", json!({"name": "spare.echo", "arguments": {"text": "x"}}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(called["result"]["isError"], true, "{called}");
    assert!(called["result"]["content"][0]["text"].as_str().unwrap().contains("unavailable"), "{called}");
    spare.restart().await;
    wait_until(Duration::from_secs(40), || async {
        names(&list("mixed").await.1).iter().any(|n| n.starts_with("spare."))
    })
    .await;

    // closed: the strict endpoint answers 503 naming the connection; other endpoints serve on.
    vital.stop();
    wait_until(Duration::from_secs(15), || async { list("strict").await.0 == 503 }).await;
    let (_, refused) = list("strict").await;
    assert_eq!(refused["error"]["data"], json!({"connection": "vital", "failureMode": "closed"}), "{refused}");
    let (status, _) = gateway
        .mcp_modern_at(ADMIN_KEY, "strict", 3, "tools/call", json!({"name": "notes.echo", "arguments": {"text": "x"}}))
        .await;
    assert_eq!(status, 503, "even the healthy connection's tools wait");
    assert_eq!(list("mixed").await.0, 200);
    // Refusals are audited.
    wait_until(Duration::from_secs(5), || async {
        let audited = gateway.audit("endpoint=strict&connection=vital").await;
        audited.iter().any(|e| e["status"] == "error" && e["detail"].as_str().is_some_and(|d| d.contains("closed")))
    })
    .await;
    vital.restart().await;
    wait_until(Duration::from_secs(40), || async { list("strict").await.0 == 200 }).await;
    assert!(names(&list("strict").await.1).iter().any(|n| n.starts_with("vital.")));
}
