//! The gateway as REST clients and operators see it: tool catalog and calls, hidden tools,
//! limits, audit, hot reload of manifests, an upstream that goes away and comes back, and the
//! keys dev mode mints.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

#[tokio::test]
async fn rest_lists_and_calls_tools_and_hides_what_the_persona_may_not_see() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;

    let names = gateway.tool_names(ANALYST_KEY).await;
    assert!(names.contains(&"notes.add_note".to_string()));
    assert!(!names.contains(&"notes.delete_note".to_string()));
    assert!(gateway.tool_names(ADMIN_KEY).await.contains(&"notes.delete_note".to_string()));

    let page: Value = gateway.get(ANALYST_KEY, "/api/v1/admin/tools?page=2&per_page=2").await.json().await.unwrap();
    assert_eq!(page["total"], names.len());
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["name"], names[2]);

    let schemas: Value = gateway.get(ANALYST_KEY, "/api/v1/admin/tools/schemas").await.json().await.unwrap();
    let echo = schemas["items"].as_array().unwrap().iter().find(|t| t["name"] == "notes.echo").unwrap().clone();
    assert_eq!(echo["input_schema"]["properties"]["text"]["type"], "string");

    let (status, result) = gateway.call_tool(ANALYST_KEY, "notes.add_note", json!({"title": "a", "body": "b"})).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["isError"], false);
    assert!(result.get("resultType").is_none());

    // Hidden and missing tools: same status, same body but for the name and request details.
    let r1 = gateway
        .post(ANALYST_KEY, "/api/v1/admin/tools/call", &json!({"name": "notes.delete_note", "arguments": {"id": 1}}))
        .await;
    let r2 = gateway
        .post(ANALYST_KEY, "/api/v1/admin/tools/call", &json!({"name": "notes.nothing", "arguments": {"id": 1}}))
        .await;
    assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (404, 404));
    assert_eq!(r1.headers()["content-type"], "application/problem+json");
    let (b1, b2): (Value, Value) = (r1.json().await.unwrap(), r2.json().await.unwrap());
    assert_eq!(without_request_details(b1, "notes.delete_note"), without_request_details(b2, "notes.nothing"));

    // Errors are problem documents with a detail a user can act on.
    let bad = reqwest::Client::new()
        .post(format!("{}/api/v1/admin/tools/call", gateway.base))
        .header("X-API-Key", ANALYST_KEY)
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert!(bad["detail"].as_str().unwrap().contains("invalid request body"), "{bad}");
    let unknown = gateway.get(ANALYST_KEY, "/api/v1/nope").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.headers()["content-type"], "application/problem+json");
    let unauth = reqwest::get(format!("{}/api/v1/portal/me", gateway.base)).await.unwrap();
    assert_eq!(unauth.status(), 401);
    let me: Value = gateway.get(ANALYST_KEY, "/api/v1/portal/me").await.json().await.unwrap();
    assert_eq!(me["persona"], "analyst");
    assert_eq!(me["endpoints"][0]["url"], "/mcp/demo/notes");
    // Only admin personas read the audit log.
    assert_eq!(gateway.get(ANALYST_KEY, "/api/v1/admin/audit/events").await.status(), 403);

    // The OpenAPI document describes these routes; the docs UI is served from the binary.
    let doc: Value = reqwest::get(format!("{}/api/v1/openapi.json", gateway.base)).await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(doc["paths"]["/api/v1/admin/tools/call"]["post"].is_object());
    let yaml = reqwest::get(format!("{}/api/v1/openapi.yaml", gateway.base)).await.unwrap().text().await.unwrap();
    assert!(yaml.contains("/api/v1/portal/me"));
    let docs = reqwest::get(format!("{}/docs", gateway.base)).await.unwrap().text().await.unwrap();
    assert!(docs.contains("rapi-doc"));
    let js = reqwest::get(format!("{}/docs/rapidoc-min.js", gateway.base)).await.unwrap();
    assert_eq!(js.status(), 200);

    // Everything above is audited, with filters.
    wait_until(Duration::from_secs(5), || async {
        let calls = gateway.audit("tool=notes.add_note&subject=apikey:analyst-key").await;
        calls.len() == 1 && calls[0]["status"] == "ok" && calls[0]["connection"] == "notes"
    })
    .await;
    let all = gateway.audit("limit=2").await;
    assert_eq!(all.len(), 2);
    let body: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/audit/events?limit=2").await.json().await.unwrap();
    let next = body["next_cursor"].as_str().unwrap();
    let page2 = gateway.audit(&format!("limit=2&cursor={next}")).await;
    assert_eq!(page2.len(), 2);
    // The next page continues after the first, whatever was written meanwhile (every query is
    // itself audited): older events, none repeated.
    let first_page = body["items"].as_array().unwrap();
    assert!(page2.iter().all(|e| first_page.iter().all(|f| f["id"] != e["id"])), "{first_page:?} {page2:?}");
    assert!(page2[0]["id"].as_str() < first_page[1]["id"].as_str(), "older than the first page");
    assert_eq!(gateway.get(ADMIN_KEY, "/api/v1/admin/audit/events?status=bogus").await.status(), 400);

    // Offset paging with a total, and the metrics overview.
    let paged: Value =
        gateway.get(ADMIN_KEY, "/api/v1/admin/audit/events?page=2&per_page=3").await.json().await.unwrap();
    assert_eq!(paged["page"], 2);
    assert_eq!(paged["items"].as_array().unwrap().len(), 3);
    assert!(paged["total"].as_i64().unwrap() >= 6, "{paged}");
    let overview: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/audit/metrics/overview").await.json().await.unwrap();
    assert!(overview["count"].as_i64().unwrap() >= 6, "{overview}");
    let add = overview["tools"].as_array().unwrap().iter().find(|t| t["tool"] == "notes.add_note").unwrap().clone();
    assert_eq!((add["count"].as_i64(), add["success_rate"].as_f64()), (Some(1), Some(1.0)), "{overview}");
    assert!(add["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert_eq!(gateway.get(ANALYST_KEY, "/api/v1/admin/audit/metrics/overview").await.status(), 403);
}

#[tokio::test]
async fn result_size_timeouts_and_rate_limits_are_enforced() {
    let upstream = Upstream::start("both").await;
    let mut files = quickstart(&upstream.url());
    files.push((
        "limited.yaml",
        r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: limited, namespace: demo}
spec: {tools: {allow: ["notes.*"]}, limits: {requestsPerMinute: 3}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: limited-key, namespace: demo}
spec: {persona: limited, secretName: limited-key}
---
apiVersion: v1
kind: Secret
metadata: {name: limited-key, namespace: demo}
stringData: {key: pcl_limited_0123456789abcdefghijklmnop}
"#
        .to_string(),
    ));
    let gateway = Gateway::start(&files).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;

    // maxResultBytes is 4096 for the analyst.
    let (status, r) = gateway.call_tool(ANALYST_KEY, "notes.echo", json!({"text": "0123456789", "repeat": 1000})).await;
    assert_eq!(status, 200);
    assert_eq!(r["isError"], true);
    assert!(r["content"][0]["text"].as_str().unwrap().contains("limit of 4096 bytes"), "{r}");
    // toolTimeoutSeconds is 2.
    let (status, r) = gateway.call_tool(ANALYST_KEY, "notes.sleep", json!({"millis": 5000})).await;
    assert_eq!(status, 200);
    assert_eq!(r["isError"], true);
    assert!(r["content"][0]["text"].as_str().unwrap().contains("did not answer within 2 s"), "{r}");

    // Three requests a minute, then 429 with Retry-After and the rate-limit headers.
    let key = "pcl_limited_0123456789abcdefghijklmnop";
    for _ in 0..3 {
        let r = gateway.get(key, "/api/v1/portal/me").await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["ratelimit-policy"].to_str().unwrap().contains("\"requests\";q=3;w=60"));
    }
    let r = gateway.get(key, "/api/v1/portal/me").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], 429);
    wait_until(Duration::from_secs(5), || async {
        gateway.audit("status=throttled").await.iter().any(|e| e["subject"] == "apikey:limited-key")
            && gateway.audit("tool=notes.sleep").await.iter().any(|e| e["error_code"] == "timeout")
            && gateway.audit("tool=notes.echo").await.iter().any(|e| e["error_code"] == "result_too_large")
    })
    .await;
}

#[tokio::test]
async fn a_tool_with_its_own_budget_is_throttled_alone_over_rest_and_mcp() {
    let upstream = Upstream::start("both").await;
    let mut files = quickstart(&upstream.url());
    files.push((
        "per-tool.yaml",
        r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: budgeted, namespace: demo}
spec:
  tools: {allow: ["notes.*"]}
  limits: {perTool: [{tool: "notes.add_*", callsPerMinute: 2}]}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {name: budgeted, namespace: demo}
spec: {connections: [notes], personas: [budgeted]}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: budgeted-key, namespace: demo}
spec: {persona: budgeted, secretName: budgeted-key}
---
apiVersion: v1
kind: Secret
metadata: {name: budgeted-key, namespace: demo}
stringData: {key: pcl_budgeted_0123456789abcdefghijklm}
"#
        .to_string(),
    ));
    let gateway = Gateway::start(&files).await;
    let key = "pcl_budgeted_0123456789abcdefghijklm";
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(key).await.is_empty() }).await;
    let add = json!({"title": "t", "body": "b"});
    for _ in 0..2 {
        assert_eq!(gateway.call_tool(key, "notes.add_note", add.clone()).await.0, 200);
    }
    let r = gateway.post(key, "/api/v1/admin/tools/call", &json!({"name": "notes.add_note", "arguments": add})).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("tool-calls of notes.add_note limit of 2"), "{body}");
    // Other tools keep their budget, and so does the same tool for another principal.
    assert_eq!(gateway.call_tool(key, "notes.list_notes", json!({})).await.0, 200);
    assert_eq!(gateway.call_tool(ADMIN_KEY, "notes.add_note", json!({"title": "t", "body": "b"})).await.0, 200);
    // Over MCP (2026-07-28 on the endpoint) the same budget answers 429 with the wait in `data`.
    let params = json!({"name": "notes.add_note", "arguments": {"title": "t", "body": "b"}});
    let (status, answer) = gateway.mcp_modern_at(key, "budgeted", 7, "tools/call", params).await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer["error"]["data"]["retryAfterSeconds"].as_u64().unwrap() >= 1, "{answer}");
    wait_until(Duration::from_secs(5), || async {
        gateway
            .audit("status=throttled&tool=notes.add_note")
            .await
            .iter()
            .any(|e| e["subject"] == "apikey:budgeted-key")
    })
    .await;
}

#[tokio::test]
async fn manifests_reload_on_change_and_a_broken_edit_keeps_the_last_good_config() {
    let upstream = Upstream::start("both").await;
    let files = quickstart(&upstream.url());
    let gateway = Gateway::start(&files).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let before = gateway.version().await.unwrap();
    assert!(gateway.tool_names(ANALYST_KEY).await.contains(&"notes.echo".to_string()));

    // Narrow the analyst to two tools: visible within two seconds, no restart.
    let personas = files[0].1.replace(
        r#"allow: ["notes.*"], deny: ["notes.delete_note"]"#,
        r#"allow: ["notes.list_notes", "notes.get_note"]"#,
    );
    assert_ne!(personas, files[0].1);
    gateway.write("personas.yaml", &personas);
    wait_until(Duration::from_secs(2), || async {
        gateway.tool_names(ANALYST_KEY).await == ["notes.get_note", "notes.list_notes"]
    })
    .await;
    let after = gateway.version().await.unwrap();
    assert!(after > before);

    // A broken edit: the problem is logged, the last good configuration keeps serving.
    gateway.write("personas.yaml", &personas.replace("notes.get_note", "notes.[broken"));
    wait_until(Duration::from_secs(3), || async { gateway.stderr.text().contains("notes.[broken") }).await;
    assert!(gateway.stderr.text().contains("Persona demo/analyst: spec.tools.allow[1]"), "{}", gateway.stderr.text());
    assert_eq!(gateway.version().await.unwrap(), after);
    assert_eq!(gateway.tool_names(ANALYST_KEY).await, ["notes.get_note", "notes.list_notes"]);
    gateway.write("keys.yaml", "kind: [unclosed\n");
    wait_until(Duration::from_secs(3), || async { gateway.stderr.text().contains("not valid YAML") }).await;
    assert_eq!(gateway.tool_names(ANALYST_KEY).await, ["notes.get_note", "notes.list_notes"]);

    // Fixed again: the new version serves.
    gateway.write("keys.yaml", &files[2].1);
    gateway.write("personas.yaml", &files[0].1);
    wait_until(Duration::from_secs(2), || async {
        gateway.tool_names(ANALYST_KEY).await.contains(&"notes.echo".to_string())
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_goes_down_fails_clearly_and_is_used_again_when_it_returns() {
    let mut upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let (status, r) = gateway.call_tool(ANALYST_KEY, "notes.list_notes", json!({})).await;
    assert_eq!((status, r["isError"].clone()), (200, json!(false)));

    upstream.stop();
    let (status, r) = gateway.call_tool(ANALYST_KEY, "notes.list_notes", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(r["isError"], true, "{r}");
    assert!(r["content"][0]["text"].as_str().unwrap().contains("unavailable"), "{r}");
    wait_until(Duration::from_secs(10), || async {
        let body: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/connections").await.json().await.unwrap();
        body["items"][0]["health"]["health"] == "unhealthy"
    })
    .await;

    upstream.restart().await;
    wait_until(Duration::from_secs(20), || async {
        let (_, r) = gateway.call_tool(ANALYST_KEY, "notes.list_notes", json!({})).await;
        r["isError"] == false
    })
    .await;
    let body: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/connections").await.json().await.unwrap();
    assert_eq!(body["items"][0]["health"]["health"], "healthy");
    wait_until(Duration::from_secs(5), || async {
        gateway
            .audit("tool=notes.list_notes&status=error")
            .await
            .iter()
            .any(|e| e["error_code"] == "upstream_unavailable")
    })
    .await;
}

#[tokio::test]
async fn dev_mode_mints_keys_once_and_keeps_them_across_restarts() {
    let upstream = Upstream::start("both").await;
    let mut files = quickstart(&upstream.url());
    files.push((
        "minted.yaml",
        r#"apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: minted, namespace: demo}
spec: {persona: analyst, secretName: minted-key}
"#
        .to_string(),
    ));
    let mut gateway = Gateway::start(&files).await;
    wait_until(Duration::from_secs(5), || async {
        gateway.stdout.text().contains("demo/minted (persona analyst): pcl_")
    })
    .await;
    let banner = gateway.stdout.text();
    let key =
        banner.split("demo/minted (persona analyst): ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    // Keys read from Secret manifests are never printed.
    assert!(!banner.contains(ANALYST_KEY) && !banner.contains(ADMIN_KEY));
    assert!(!gateway.stderr.text().contains(ANALYST_KEY));
    assert_eq!(gateway.get(&key, "/api/v1/portal/me").await.status(), 200);

    gateway.restart().await;
    gateway.wait_ready().await;
    assert_eq!(gateway.get(&key, "/api/v1/portal/me").await.status(), 200);
    assert_eq!(gateway.stdout.text().matches(&key).count(), 4, "printed again at restart (key and curl line)");
}

#[tokio::test]
async fn without_a_valid_configuration_the_gateway_is_not_ready() {
    let gateway = Gateway::start_unready(&[("bad.yaml", "apiVersion: portcullis.dev/v1alpha1\nkind: McpEndpoint\nmetadata: {name: e, namespace: demo}\nspec: {connections: [ghost]}\n".into())]).await;
    let r = reqwest::get(format!("{}/readyz", gateway.base)).await.unwrap();
    assert_eq!(r.status(), 503);
    let r = reqwest::get(format!("{}/healthz", gateway.base)).await.unwrap();
    assert_eq!(r.status(), 200);
    wait_until(Duration::from_secs(3), || async {
        gateway.stderr.text().contains(
            r#"McpEndpoint demo/e: spec.connections[0]: connection "ghost" does not exist in namespace "demo""#,
        )
    })
    .await;
    // Requests fail closed while there is no configuration.
    assert_eq!(gateway.get(ANALYST_KEY, "/api/v1/portal/me").await.status(), 503);
}

#[tokio::test]
async fn upstream_list_changed_refreshes_the_catalog_in_both_generations() {
    for protocol in ["both", "legacy"] {
        let upstream = Upstream::start_with(protocol, &["--dynamic-tools"]).await;
        let mut files = quickstart(&upstream.url());
        // Only the notification can explain a refresh within the test's window.
        files[1].1 = files[1].1.replace("refreshIntervalSeconds: 5", "refreshIntervalSeconds: 3600");
        let gateway = Gateway::start(&files).await;
        wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ADMIN_KEY).await.is_empty() }).await;
        assert!(!gateway.tool_names(ADMIN_KEY).await.contains(&"notes.archive_note".to_string()));
        let (status, r) = gateway.call_tool(ADMIN_KEY, "notes.toggle_archive", json!({})).await;
        assert_eq!(status, 200, "{r}");
        wait_until(Duration::from_secs(3), || async {
            gateway.tool_names(ADMIN_KEY).await.contains(&"notes.archive_note".to_string())
        })
        .await;
        let (status, r) = gateway.call_tool(ADMIN_KEY, "notes.archive_note", json!({"id": 7})).await;
        assert_eq!((status, r["content"][0]["text"].as_str()), (200, Some("archived note 7")), "{protocol}: {r}");
    }
}

#[tokio::test]
async fn idempotency_keys_replay_refuse_other_bodies_and_never_run_twice() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ADMIN_KEY).await.is_empty() }).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/admin/tools/call", gateway.base);
    let send = |key: &'static str, body: Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(url)
                .header("X-API-Key", ADMIN_KEY)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let add = json!({"name": "notes.add_note", "arguments": {"title": "once", "body": "only once"}});
    let first = send("add-1", add.clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["idempotent-replayed"], "false");
    let first: Value = first.json().await.unwrap();
    let again = send("add-1", add.clone()).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let (_, listed) = gateway.call_tool(ADMIN_KEY, "notes.list_notes", json!({})).await;
    assert_eq!(listed["content"][0]["text"], "1: once", "the tool ran once");

    let other = send("add-1", json!({"name": "notes.add_note", "arguments": {"title": "x", "body": "y"}})).await;
    assert_eq!(other.status(), 422);
    assert_eq!(other.headers()["content-type"], "application/problem+json");

    // Concurrent duplicates: one runs, the other is told it is in flight.
    let slow = json!({"name": "notes.sleep", "arguments": {"millis": 800}});
    let (a, b) = tokio::join!(send("slow-1", slow.clone()), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send("slow-1", slow.clone()).await
    });
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    assert_eq!(send("slow-1", slow).await.headers()["idempotent-replayed"], "true");

    let bad = http
        .post(&url)
        .header("X-API-Key", ADMIN_KEY)
        .header("Idempotency-Key", "has space")
        .json(&add)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// A body far over the limit (4 MiB by default) is still being sent when the gateway has decided
/// to refuse it. The client must read the 413, not a connection cut mid-upload (EPIPE or reset):
/// the rest of the body is read and dropped before the connection closes or is reused.
#[tokio::test]
async fn a_body_far_over_the_limit_is_answered_413_not_cut_off() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    let body = format!(r#"{{"name":"notes.echo","arguments":{{"text":"{}"}}}}"#, "x".repeat(16 * 1024 * 1024));
    let http = reqwest::Client::new();
    let upload = |url: String| {
        http.post(url)
            .header("X-API-Key", ANALYST_KEY)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.clone())
            .send()
    };
    for attempt in 0..3 {
        let r = upload(format!("{}/api/v1/admin/tools/call", gateway.base))
            .await
            .unwrap_or_else(|e| panic!("REST attempt {attempt}: the upload was cut off: {e:?}"));
        assert_eq!(r.status(), 413, "REST attempt {attempt}");
        let problem: Value = r.json().await.expect("problem+json");
        assert_eq!(problem["status"], 413);
        let r = upload(gateway.mcp_url("demo", "notes"))
            .await
            .unwrap_or_else(|e| panic!("MCP attempt {attempt}: the upload was cut off: {e:?}"));
        assert_eq!(r.status(), 413, "MCP attempt {attempt}");
    }
    // The gateway still serves calls afterwards.
    let (status, _) = gateway.call_tool(ANALYST_KEY, "notes.echo", json!({"text": "after"})).await;
    assert_eq!(status, 200);
}
