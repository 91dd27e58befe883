//! The official MCP Python SDK (PyPI `mcp`, pinned in `tests/python/requirements.txt`) drives a
//! session through the gateway in each protocol generation (`tests/python/drive_session.py`):
//! what the persona sees, a tool call with progress and log messages relayed, a resource read
//! and a prompt, all under the gateway's names.
//!
//! Needs a Python with that package (`scripts/test` makes a virtualenv and sets
//! `PORTCULLIS_TEST_PYTHON`).

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const KEY: &str = "pcl_python_sdk_key_0123456789abcdefghijklmnopqrs";

fn manifests(upstream_url: &str) -> Vec<(&'static str, String)> {
    vec![(
        "python.yaml",
        format!(
            r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {{name: sdk, namespace: python}}
spec:
  tools: {{allow: ["reference.*"], deny: ["reference.test_error_handling"]}}
  resources: {{allow: ["reference+test://static-*"]}}
  prompts: {{allow: ["reference.test_simple_prompt"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: reference, namespace: python}}
spec: {{prefix: reference, mcp: {{url: "{upstream_url}"}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: sdk, namespace: python}}
spec: {{connections: [reference]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: sdk, namespace: python}}
spec: {{persona: sdk, secretName: sdk-key}}
---
apiVersion: v1
kind: Secret
metadata: {{name: sdk-key, namespace: python}}
stringData: {{key: {KEY}}}
"#
        ),
    )]
}

/// Runs the Python driver; its JSON report.
fn drive(url: &str, generation: &str, args: &[&str]) -> Value {
    let python = std::env::var("PORTCULLIS_TEST_PYTHON")
        .expect("PORTCULLIS_TEST_PYTHON is not set: run ./scripts/test, which installs the MCP Python SDK");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/drive_session.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .args(["--url", url, "--api-key", KEY, "--generation", generation, "--timeout", "30"])
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "the Python SDK failed ({generation}): {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON report")
}

#[tokio::test]
async fn the_python_sdk_drives_a_session_in_each_generation() {
    let upstream = Upstream::start_binary("mcp-reference-server", "both", &[]).await;
    let gateway = Gateway::start(&manifests(&upstream.url())).await;
    let url = gateway.mcp_url("python", "sdk");
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(KEY).await.is_empty() }).await;
    for (generation, version) in [("2025", "2025-11-25"), ("2026", "2026-07-28")] {
        let report = drive(
            &url,
            generation,
            &[
                "--tool",
                "reference.test_tool_with_progress",
                "--resource",
                "reference+test://static-text",
                "--prompt",
                "reference.test_simple_prompt",
            ],
        );
        assert_eq!(report["protocolVersion"], version, "{report}");
        let tools: Vec<&str> = report["tools"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(tools.contains(&"reference.test_simple_text"), "{generation}: {tools:?}");
        assert!(!tools.contains(&"reference.test_error_handling"), "{generation}: a denied tool is listed");
        // Progress reaches the SDK's callback under its own token, in order.
        let progress: Vec<f64> =
            report["progress"].as_array().unwrap().iter().filter_map(|p| p["progress"].as_f64()).collect();
        assert!(progress.len() >= 3 && progress.windows(2).all(|w| w[0] <= w[1]), "{generation}: {report}");
        let resources: Vec<&str> = report["resources"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(resources.contains(&"reference+test://static-text"), "{generation}: {resources:?}");
        assert!(!resources.contains(&"reference+test://watched-resource"), "{generation}: a hidden resource is listed");
        assert_eq!(report["read"]["contents"][0]["uri"], "reference+test://static-text", "{report}");
        assert!(report["prompt"]["messages"].as_array().is_some_and(|m| !m.is_empty()), "{report}");

        // Log messages at or above the level asked for, none below.
        let logged = drive(&url, generation, &["--tool", "reference.test_tool_with_logging", "--log-level", "info"]);
        assert!(logged["logs"].as_array().is_some_and(|l| l.len() >= 3), "{generation}: {logged}");
        let quiet = drive(&url, generation, &["--tool", "reference.test_tool_with_logging", "--log-level", "error"]);
        assert_eq!(quiet["logs"], json!([]), "{generation}: {quiet}");
    }
}
