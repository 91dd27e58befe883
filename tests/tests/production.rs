//! The production data plane: `portcullis serve` replicas on one Postgres and one Redis behave
//! as one gateway, lose no audit event while Postgres is away, and fail closed without Redis.

mod support;

use portcullis_e2e::backends::{Postgres, Redis, Shared};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::cluster::Cluster;
use support::*;

const LIMITED_KEY: &str = "pcl_limited_0123456789abcdefghijklmnop";
const BURST_KEY: &str = "pcl_burst_0123456789abcdefghijklmnopqr";

fn manifests(upstream: &Upstream) -> Vec<(&'static str, String)> {
    let mut files = quickstart(&upstream.url());
    files.push(("limited.yaml", limited_persona("limited", 4, LIMITED_KEY)));
    files.push(("burst.yaml", limited_persona("burst", 25, BURST_KEY)));
    files
}

/// A persona allowed `per_minute` requests, and its key `key` (ApiKey `<name>-key`).
fn limited_persona(name: &str, per_minute: u32, key: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{tools: {{allow: [\"notes.*\"]}}, limits: {{requestsPerMinute: {per_minute}}}}}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}-key, namespace: demo}}\nspec: {{persona: {name}, secretName: {name}-key}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key, namespace: demo}}\nstringData: {{key: {key}}}\n"
    )
}

async fn initialize(api: &Api) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"two-replicas","version":"1"}}}"#;
    let r = api.mcp_raw(ANALYST_KEY, &[], body).await;
    assert_eq!(r.status(), 200);
    r.headers()["mcp-session-id"].to_str().unwrap().to_string()
}

async fn list_in_session(api: &Api, session: &str) -> u16 {
    let body = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    api.mcp_raw(ANALYST_KEY, &[("Mcp-Session-Id", session), ("MCP-Protocol-Version", "2025-11-25")], body)
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn two_replicas_share_sessions_rate_limits_configuration_and_audit() {
    let upstream = Upstream::start("both").await;
    let backends = Shared::start().await;
    let cluster =
        Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, &manifests(&upstream));
    let published = cluster.publish();
    assert!(published.contains("published version 1"), "{published}");
    assert!(cluster.publish().contains("unchanged: version 1"), "a publish without changes writes nothing");
    // Both migrate at start, concurrently.
    let (a, b) = tokio::join!(cluster.replica(), cluster.replica());
    a.wait_ready().await;
    b.wait_ready().await;

    // A session created on A is used, then ended, on B.
    let session = initialize(&a).await;
    assert_eq!(list_in_session(&b, &session).await, 200);
    let ended = reqwest::Client::new()
        .delete(b.mcp_url("demo", "notes"))
        .header("X-API-Key", ANALYST_KEY)
        .header("Mcp-Session-Id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), 204);
    assert_eq!(list_in_session(&a, &session).await, 404);

    // One client's limit (4 a minute) is shared by both replicas.
    let mut statuses = Vec::new();
    for api in [&*a, &*b, &*a, &*b, &*a] {
        statuses.push(api.get(LIMITED_KEY, "/api/v1/portal/me").await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    assert_eq!(b.get(LIMITED_KEY, "/api/v1/portal/me").await.status(), 429);

    // An Idempotency-Key used on A is replayed by B.
    let add = json!({"name": "notes.add_note", "arguments": {"title": "t", "body": "b"}});
    let http = reqwest::Client::new();
    let mut replayed = Vec::new();
    for api in [&*a, &*b] {
        let r = http
            .post(format!("{}/api/v1/admin/tools/call", api.base))
            .header("X-API-Key", ADMIN_KEY)
            .header("Idempotency-Key", "shared-key")
            .json(&add)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        replayed.push(r.headers()["idempotent-replayed"].to_str().unwrap().to_string());
    }
    assert_eq!(replayed, ["false", "true"]);

    // A publish is served by both within a second.
    wait_until(Duration::from_secs(10), || async { !a.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let narrowed = quickstart(&upstream.url())[0]
        .1
        .replace(r#"allow: ["notes.*"], deny: ["notes.delete_note"]"#, r#"allow: ["notes.echo"]"#);
    cluster.write("personas.yaml", &narrowed);
    let out = cluster.publish();
    assert!(out.contains("published version 2") && out.contains("changed: Persona demo/analyst"), "{out}");
    let published_at = Instant::now();
    wait_until(Duration::from_secs(1), || async {
        a.tool_names(ANALYST_KEY).await == ["notes.echo"] && b.tool_names(ANALYST_KEY).await == ["notes.echo"]
    })
    .await;
    let took = published_at.elapsed();

    // What A audited, B reports (one audit log in Postgres).
    let (status, _) = a.call_tool(ANALYST_KEY, "notes.echo", json!({"text": "audited"})).await;
    assert_eq!(status, 200);
    wait_until(Duration::from_secs(5), || async { b.audit("tool=notes.echo&status=ok").await.len() == 1 }).await;
    let throttled = b.audit("status=throttled&subject=apikey:limited-key").await;
    assert_eq!(throttled.len(), 2, "{throttled:?}");
    // The overview is computed in SQL over both replicas' events.
    let overview: Value = a.get(ADMIN_KEY, "/api/v1/admin/audit/metrics/overview").await.json().await.unwrap();
    let echo = overview["tools"].as_array().unwrap().iter().find(|t| t["tool"] == "notes.echo").unwrap().clone();
    assert_eq!((echo["count"].as_i64(), echo["success_rate"].as_f64()), (Some(1), Some(1.0)), "{overview}");
    assert!(overview["count"].as_i64().unwrap() > 10 && overview["success_rate"].as_f64().unwrap() < 1.0, "{overview}");
    let paged: Value =
        b.get(ADMIN_KEY, "/api/v1/admin/audit/events?page=1&per_page=2&status=throttled").await.json().await.unwrap();
    assert_eq!(paged["total"], 2, "{paged}");
    eprintln!("publish to both replicas serving: {took:?}");
}

/// Many requests at once, on both replicas: each principal's limit holds exactly, however the
/// decisions interleave, and one principal's refusals do not spill onto another's requests.
#[tokio::test]
async fn a_burst_of_concurrent_requests_on_two_replicas_gets_exactly_the_limit() {
    let upstream = Upstream::start("both").await;
    let (_backends, _cluster, a, b) = two_replicas_serving(&manifests(&upstream)).await;
    let requests = (0..120).map(|i| {
        let (api, key) = match i % 4 {
            0 => (&*a, BURST_KEY),
            1 => (&*b, BURST_KEY),
            2 => (&*a, ANALYST_KEY),
            _ => (&*b, ANALYST_KEY),
        };
        async move { (key, api.get(key, "/api/v1/portal/me").await.status().as_u16()) }
    });
    let statuses = futures::future::join_all(requests).await;
    let count = |key: &str, status: u16| statuses.iter().filter(|s| **s == (key, status)).count();
    // The burst persona allows 25 a minute: 25 of its 60 pass, whichever replica they reached.
    assert_eq!(count(BURST_KEY, 200), 25, "{statuses:?}");
    assert_eq!(count(BURST_KEY, 429), 35, "{statuses:?}");
    // The analyst's 60, decided alongside, all pass.
    assert_eq!(count(ANALYST_KEY, 200), 60, "{statuses:?}");
}

#[tokio::test]
async fn every_answered_call_has_exactly_one_audit_row_across_a_postgres_restart() {
    let upstream = Upstream::start("both").await;
    let mut postgres = Postgres::start().await;
    let redis = Redis::start().await;
    let cluster = Cluster::new(&postgres.url(), &redis.url(), "outage:", &manifests(&upstream));
    cluster.publish();
    let replica = cluster.replica().await;
    replica.wait_ready().await;
    wait_until(Duration::from_secs(10), || async { !replica.tool_names(ADMIN_KEY).await.is_empty() }).await;

    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/admin/tools/call", replica.base);
    let mut answered = HashSet::new();
    let started = Instant::now();
    let mut stopped = false;
    let mut restarted = false;
    while started.elapsed() < Duration::from_secs(8) {
        if !stopped && started.elapsed() > Duration::from_secs(2) {
            postgres.stop();
            stopped = true;
        }
        if !restarted && started.elapsed() > Duration::from_secs(5) {
            postgres.restart().await;
            restarted = true;
        }
        let r = http
            .post(&url)
            .header("X-API-Key", ADMIN_KEY)
            .json(&json!({"name": "notes.echo", "arguments": {"text": "x"}}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            answered.insert(r.headers()["x-request-id"].to_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered.len() > 50, "only {} calls were answered", answered.len());

    // After Postgres returns, the buffered events are written: each answered call exactly once.
    let request_ids = || async {
        all_events(&replica, "tool=notes.echo")
            .await
            .iter()
            .map(|e| e["request_id"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<String>>()
    };
    wait_until(Duration::from_secs(30), || async { request_ids().await.len() >= answered.len() }).await;
    let audited = request_ids().await;
    let unique: HashSet<String> = audited.iter().cloned().collect();
    assert_eq!(unique.len(), audited.len(), "an event was written twice");
    assert_eq!(unique, answered, "audited calls differ from answered calls");
}

async fn all_events(api: &Api, filter: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/admin/audit/events?{filter}&limit=1000");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = api.get(ADMIN_KEY, &path).await;
        if r.status() != 200 {
            return Vec::new();
        }
        let page: Value = r.json().await.unwrap();
        events.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return events,
        }
    }
}

#[tokio::test]
async fn without_redis_the_gateway_fails_closed_and_recovers_by_itself() {
    let upstream = Upstream::start("both").await;
    let postgres = Postgres::start().await;
    let mut redis = Redis::start().await;
    let cluster = Cluster::new(&postgres.url(), &redis.url(), "redis-outage:", &manifests(&upstream));
    cluster.publish();
    let replica = cluster.replica().await;
    replica.wait_ready().await;
    assert_eq!(replica.get(ANALYST_KEY, "/api/v1/portal/me").await.status(), 200);

    redis.stop();
    let refused = replica.get(ANALYST_KEY, "/api/v1/portal/me").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let (status, body) = replica.mcp_modern(ANALYST_KEY, 1, "tools/list", json!({})).await;
    assert_eq!(status, 503, "{body}");
    let ready = reqwest::get(format!("{}/readyz", replica.base)).await.unwrap();
    assert_eq!(ready.status(), 503);

    redis.restart().await;
    wait_until(Duration::from_secs(20), || async {
        replica.get(ANALYST_KEY, "/api/v1/portal/me").await.status() == 200
    })
    .await;
    replica.wait_ready().await;
    // The refusals were audited too.
    wait_until(Duration::from_secs(5), || async {
        replica.audit("status=error").await.iter().any(|e| e["detail"] == "rate limiter unavailable")
    })
    .await;
}

#[tokio::test]
async fn with_local_limits_the_gateway_keeps_serving_without_redis_and_still_limits() {
    let upstream = Upstream::start("both").await;
    let postgres = Postgres::start().await;
    let mut redis = Redis::start().await;
    let cluster = Cluster::new(&postgres.url(), &redis.url(), "redis-local:", &manifests(&upstream));
    cluster.publish();
    let replica = cluster.replica_with(&[("PORTCULLIS_WHEN_REDIS_DOWN", "local")]).await;
    replica.wait_ready().await;
    redis.stop();
    // Stateless requests keep working, on this pod's own limits.
    assert_eq!(replica.get(ANALYST_KEY, "/api/v1/portal/me").await.status(), 200);
    let (status, body) = replica.mcp_modern(ANALYST_KEY, 1, "tools/list", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let ready = reqwest::get(format!("{}/readyz", replica.base)).await.unwrap();
    assert_eq!(ready.status(), 200, "a pod that can serve stays in the load balancer");
    // The limited persona (4 a minute) is still limited, by this pod.
    let statuses: Vec<u16> = futures_statuses(&replica, LIMITED_KEY, 5).await;
    assert_eq!(statuses, vec![200, 200, 200, 200, 429], "{statuses:?}");
    assert!(replica.stderr.text().contains("--when-redis-down local"), "the fallback is logged");
    // What needs Redis still fails closed: a 2025 session cannot be created.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    assert_eq!(replica.mcp_raw(ANALYST_KEY, &[], body).await.status(), 503);
}

async fn futures_statuses(api: &Api, key: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(api.get(key, "/api/v1/portal/me").await.status().as_u16());
    }
    out
}

#[tokio::test]
async fn keys_minted_over_rest_work_on_every_replica_and_a_revocation_reaches_all_within_a_second() {
    let upstream = Upstream::start("both").await;
    let backends = Shared::start().await;
    let cluster =
        Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, &manifests(&upstream));
    cluster.publish();
    let (a, b) = tokio::join!(cluster.replica(), cluster.replica());
    a.wait_ready().await;
    b.wait_ready().await;
    let minted: Value =
        a.post(ADMIN_KEY, "/api/v1/admin/auth/keys", &json!({"persona": "analyst"})).await.json().await.unwrap();
    let key = minted["key"].as_str().unwrap_or_else(|| panic!("no key: {minted}\n{}", a.stderr.text())).to_string();
    let id = minted["id"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(2), || async { b.get(&key, "/api/v1/portal/me").await.status() == 200 }).await;
    let listed: Value = b.get(ADMIN_KEY, "/api/v1/admin/auth/keys").await.json().await.unwrap();
    assert_eq!(listed["total"], 1, "{listed}");

    let revoked = reqwest::Client::new()
        .delete(format!("{}/api/v1/admin/auth/keys/{id}", b.base))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let started = Instant::now();
    wait_until(Duration::from_secs(1), || async { a.get(&key, "/api/v1/portal/me").await.status() == 401 }).await;
    eprintln!("revocation on B refused on A after {:?}", started.elapsed());
}

#[tokio::test]
async fn tool_list_changes_reach_listen_streams_on_every_replica_through_redis() {
    let upstream = Upstream::start("both").await;
    let backends = Shared::start().await;
    let cluster =
        Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, &manifests(&upstream));
    cluster.publish();
    let (a, b) = tokio::join!(cluster.replica(), cluster.replica());
    a.wait_ready().await;
    b.wait_ready().await;
    let stream = ListenStream::open(&b, ANALYST_KEY, "notes").await;
    wait_until(Duration::from_secs(5), || async { stream.count("notifications/subscriptions/acknowledged") == 1 })
        .await;
    let channel = format!("{}changes", backends.redis_prefix);

    // A change another pod noticed arrives over Redis and reaches B's stream.
    let payload = json!({"tenant": "demo", "origin": "another-pod"}).to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &backends.redis_url, "PUBLISH", &channel, &payload])
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(Duration::from_secs(5), || async { stream.count("notifications/tools/list_changed") >= 1 }).await;
    // Another tenant's change does not.
    let before = stream.count("notifications/tools/list_changed");
    let other = json!({"tenant": "elsewhere", "origin": "another-pod"}).to_string();
    std::process::Command::new("redis-cli")
        .args(["-u", &backends.redis_url, "PUBLISH", &channel, &other])
        .output()
        .unwrap();

    // And a pod publishes what it notices: a configuration change, seen by A and B.
    let mut subscriber = std::process::Command::new("redis-cli")
        .args(["-u", &backends.redis_url, "SUBSCRIBE", &channel])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::default();
    lines.collect(subscriber.stdout.take().unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.write("limited.yaml", "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: limited, namespace: demo}\nspec: {tools: {allow: [\"notes.list_*\"]}}\n");
    cluster.publish();
    wait_until(Duration::from_secs(5), || async { lines.text().contains("\"tenant\":\"demo\"") }).await;
    let _ = subscriber.kill();
    let _ = subscriber.wait();
    wait_until(Duration::from_secs(5), || async { stream.count("notifications/tools/list_changed") > before }).await;
}

/// Two `serve` replicas on fresh backends with the quickstart manifests in front of `upstream`,
/// both ready and listing its tools.
async fn two_replicas_in_front_of(
    upstream: &Upstream,
) -> (Shared, Cluster, support::cluster::Replica, support::cluster::Replica) {
    two_replicas_serving(&quickstart(&upstream.url())).await
}

async fn two_replicas_serving(
    files: &[(&str, String)],
) -> (Shared, Cluster, support::cluster::Replica, support::cluster::Replica) {
    let backends = Shared::start().await;
    let cluster = Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, files);
    cluster.publish();
    let (a, b) = tokio::join!(cluster.replica(), cluster.replica());
    for replica in [&a, &b] {
        replica.wait_ready().await;
        wait_until(Duration::from_secs(10), || async { !replica.tool_names(ANALYST_KEY).await.is_empty() }).await;
    }
    (backends, cluster, a, b)
}

#[tokio::test]
async fn a_2025_clients_answer_and_cancellation_reach_the_replica_that_holds_its_request() {
    // The reference upstream (2026-07-28) asks for sampling with input_required; Portcullis asks
    // the 2025 client on its request stream, held by A. The client's answer arrives at B.
    let upstream = Upstream::start_binary("mcp-reference-server", "both", &[]).await;
    let (_backends, _cluster, a, b) = two_replicas_in_front_of(&upstream).await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"sampling":{}},"clientInfo":{"name":"sampler","version":"1"}}}"#;
    let session = a.mcp_raw(ANALYST_KEY, &[], init).await.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"notes.test_sampling","arguments":{"prompt":"What is 2+2?"}}}"#;
    let mut stream = a.mcp_raw(ANALYST_KEY, &headers, call).await;
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let request = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(line) = text.lines().find(|l| l.contains("sampling/createMessage")) {
            break serde_json::from_str::<Value>(line.trim_start_matches("data:").trim()).unwrap();
        }
    };
    let answer = json!({"jsonrpc": "2.0", "id": request["id"], "result": {
        "role": "assistant", "content": {"type": "text", "text": "four"}, "model": "test-model"}});
    assert_eq!(b.mcp_raw(ANALYST_KEY, &headers, &answer.to_string()).await.status(), 202);
    let mut rest = String::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("LLM response: four"), "{rest}");

    // A cancellation sent to B stops the request running on A.
    let slow = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"notes.test_sampling","arguments":{"prompt":"never answered"}}}"#;
    let mut stream = a.mcp_raw(ANALYST_KEY, &headers, slow).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await.unwrap();
    let cancel = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":8}}"#;
    assert_eq!(b.mcp_raw(ANALYST_KEY, &headers, cancel).await.status(), 202);
    let mut rest = String::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("Request cancelled by the client"), "{rest}");
}

/// A 2026-07-28 client in front of a 2025-only upstream: the upstream's call that asks for input
/// is held on the replica that started it; the client's retry, reaching the other replica, is
/// handed to the holder over Redis and completes the call there.
#[tokio::test]
async fn a_retry_of_a_call_held_on_one_replica_completes_it_from_the_other() {
    let upstream = Upstream::start_binary("mcp-reference-server", "legacy", &[]).await;
    let (_backends, _cluster, a, b) = two_replicas_in_front_of(&upstream).await;
    let capabilities = json!({"io.modelcontextprotocol/clientCapabilities": {"elicitation": {}}});
    let call =
        json!({"name": "notes.test_elicitation", "arguments": {"message": "Who are you?"}, "_meta": capabilities});
    let (code, asked) = a.mcp_modern(ANALYST_KEY, 1, "tools/call", call.clone()).await;
    assert_eq!(code, 200, "{asked}");
    assert_eq!(asked["result"]["resultType"], "input_required", "{asked}");
    // The upstream names its request (`portcullis.dev/inputKey`): the client answers under it.
    let requests = asked["result"]["inputRequests"].as_object().expect("inputRequests");
    let (key, input) = requests.iter().next().expect("one request");
    assert_eq!((key.as_str(), &input["method"]), ("elicitation", &json!("elicitation/create")), "{asked}");
    let state = asked["result"]["requestState"].as_str().expect("requestState").to_string();

    let mut retry = call.clone();
    retry["requestState"] = json!(state);
    retry["inputResponses"] =
        json!({"elicitation": {"action": "accept", "content": {"username": "ana", "email": "ana@example.com"}}});
    let (code, done) = b.mcp_modern(ANALYST_KEY, 2, "tools/call", retry).await;
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["result"]["resultType"], "complete", "{done}");
    let text = done["result"]["content"][0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("action=accept") && text.contains("ana@example.com"), "{done}");

    // The call has ended: its state no longer names anything, on either replica.
    let mut again = call;
    again["requestState"] = json!(state);
    again["inputResponses"] = json!({"elicitation": {"action": "accept", "content": {}}});
    let (_, ended) = a.mcp_modern(ANALYST_KEY, 3, "tools/call", again).await;
    assert_eq!(ended["error"]["code"], -32602, "{ended}");
}

/// Polls `tasks/get` on `replica` until the task has `status`.
async fn task_reaches(replica: &support::cluster::Replica, task_id: &str, status: &str) -> Value {
    let mut last = Value::Null;
    for attempt in 0..100 {
        let params = json!({"taskId": task_id, "_meta": {"io.modelcontextprotocol/clientCapabilities": {
            "extensions": {"io.modelcontextprotocol/tasks": {}}}}});
        let (code, task) = replica.mcp_modern(ANALYST_KEY, 100 + attempt, "tasks/get", params).await;
        assert_eq!(code, 200, "{task}");
        last = task["result"].clone();
        if last["status"] == status {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the task never became {status}: {last}");
}

#[tokio::test]
async fn tasks_portcullis_runs_for_a_2025_upstream_are_served_by_every_replica() {
    // The upstream speaks only 2025 (no tasks); the connection names tools Portcullis runs as
    // tasks. A task started on A is polled, answered and cancelled through B.
    let upstream = Upstream::start_binary("mcp-reference-server", "legacy", &[]).await;
    let files: Vec<_> = quickstart(&upstream.url())
        .into_iter()
        .map(|(name, text)| {
            let tasks = "refreshIntervalSeconds: 5, runAsTasks: {optional: [confirm_delete, slow_compute], required: [failing_job]}}}";
            (name, text.replace("refreshIntervalSeconds: 5}}", tasks))
        })
        .collect();
    let (_backends, _cluster, a, b) = two_replicas_serving(&files).await;
    let tasks = json!({"elicitation": {}, "extensions": {"io.modelcontextprotocol/tasks": {}}});
    let meta = json!({"io.modelcontextprotocol/clientCapabilities": tasks});

    let (_, discovered) = a.mcp_modern(ANALYST_KEY, 1, "server/discover", json!({})).await;
    assert!(
        discovered["result"]["capabilities"]["extensions"]["io.modelcontextprotocol/tasks"].is_object(),
        "announced while Portcullis runs tasks for the connection: {discovered}"
    );

    let call = json!({"name": "notes.confirm_delete", "arguments": {"filename": "a.txt"}, "_meta": meta});
    let (code, created) = a.mcp_modern(ANALYST_KEY, 2, "tools/call", call).await;
    assert_eq!(code, 200, "{created}");
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    assert_eq!(created["result"]["status"], "working", "{created}");
    let task_id = created["result"]["taskId"].as_str().expect("a task id").to_string();
    assert!(task_id.starts_with("pct1.") && !created.to_string().contains("portcullis-run-"), "{created}");

    let asking = task_reaches(&b, &task_id, "input_required").await;
    let requests = asking["inputRequests"].as_object().expect("input requests");
    assert_eq!(requests.len(), 1, "{asking}");
    let (key, request) = requests.iter().next().expect("one request");
    assert_eq!(request["method"], "elicitation/create", "{asking}");
    assert!(asking.get("requestState").is_none(), "{asking}");
    let answer = json!({"taskId": task_id, "_meta": meta,
        "inputResponses": { key.as_str(): {"action": "accept", "content": {"confirm": true}}}});
    let (code, ack) = b.mcp_modern(ANALYST_KEY, 3, "tasks/update", answer).await;
    assert_eq!((code, ack["result"]["resultType"].as_str()), (200, Some("complete")), "{ack}");
    let done = task_reaches(&b, &task_id, "completed").await;
    let text = done["result"]["content"][0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("confirmed = true"), "{done}");

    // Another caller cannot reach it.
    let (_, other) = b.mcp_modern(ADMIN_KEY, 4, "tasks/get", json!({"taskId": task_id, "_meta": meta})).await;
    assert_eq!(other["error"]["code"], -32602, "{other}");

    // A tool that runs only as a task refuses a client that does not take tasks.
    let (code, refused) = a.mcp_modern(ANALYST_KEY, 5, "tools/call", json!({"name": "notes.failing_job"})).await;
    assert_eq!((code, refused["error"]["code"].as_i64()), (400, Some(-32021)), "{refused}");
    // REST callers cannot take tasks: a problem that says so, not an upstream failure.
    let (code, problem) = a.call_tool(ANALYST_KEY, "notes.failing_job", json!({})).await;
    assert_eq!(code, 422, "{problem}");
    assert_eq!(problem["type"], "https://portcullis.dev/problems/mcp-client-required", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("io.modelcontextprotocol/tasks"), "{problem}");
    // Other tools run as ordinary calls for it.
    let sync = json!({"name": "notes.slow_compute", "arguments": {"seconds": 0}});
    let (_, answered) = a.mcp_modern(ANALYST_KEY, 6, "tools/call", sync).await;
    assert_eq!(answered["result"]["resultType"], "complete", "{answered}");

    // A long task started on A, cancelled through B.
    let call = json!({"name": "notes.slow_compute", "arguments": {"seconds": 60}, "_meta": meta});
    let (_, created) = a.mcp_modern(ANALYST_KEY, 7, "tools/call", call).await;
    let long_id = created["result"]["taskId"].as_str().expect("a task id").to_string();
    let (code, ack) = b.mcp_modern(ANALYST_KEY, 8, "tasks/cancel", json!({"taskId": long_id, "_meta": meta})).await;
    assert_eq!(code, 200, "{ack}");
    assert_eq!(task_reaches(&a, &long_id, "cancelled").await["status"], "cancelled");
}

/// Opens a 2025 session on `replica` with its GET stream, at log level `debug`.
async fn session_with_stream(replica: &support::cluster::Replica, client: &str) -> (String, reqwest::Response) {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
        "capabilities": {}, "clientInfo": {"name": client, "version": "1"}}});
    let response = replica.mcp_raw(ANALYST_KEY, &[], &init.to_string()).await;
    let session = response.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let level = r#"{"jsonrpc":"2.0","id":2,"method":"logging/setLevel","params":{"level":"debug"}}"#;
    assert_eq!(replica.mcp_raw(ANALYST_KEY, &headers, level).await.status(), 200);
    let stream = replica.session_stream(ANALYST_KEY, "notes", &session).await;
    assert_eq!(stream.status(), 200);
    (session, stream)
}

/// What arrives on `stream` within `within`.
async fn read_for(stream: &mut reqwest::Response, within: Duration, enough: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    let _ = tokio::time::timeout(within, async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if enough(&text) {
                return;
            }
        }
    })
    .await;
    text
}

/// A 2025 client in front of a 2025-only upstream gets an upstream session of its own: what the
/// upstream sends on that session's GET stream (rmcp sends a tool's log messages there) reaches
/// that client's GET stream, here held by one replica while the call runs on the other, and no
/// other client's.
#[tokio::test]
async fn a_2025_upstreams_session_messages_reach_only_their_own_clients_stream_on_any_replica() {
    let upstream = Upstream::start_binary("mcp-reference-server", "legacy", &[]).await;
    let (_backends, _cluster, a, b) = two_replicas_in_front_of(&upstream).await;
    let (caller, mut caller_stream) = session_with_stream(&a, "caller").await;
    let (bystander, mut bystander_stream) = session_with_stream(&a, "bystander").await;
    let call = |id: u64, tool: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
            .to_string()
    };
    // Both sessions have called, so both have upstream sessions on B.
    for session in [&caller, &bystander] {
        let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
        let answer = b.mcp_raw(ANALYST_KEY, &headers, &call(3, "notes.test_simple_text")).await.text().await.unwrap();
        assert!(answer.contains("simple text response"), "{answer}");
    }

    let headers = [("Mcp-Session-Id", caller.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let answer = b.mcp_raw(ANALYST_KEY, &headers, &call(4, "notes.test_tool_with_logging")).await.text().await.unwrap();
    assert!(answer.contains("Tool with logging executed successfully"), "{answer}");
    let received =
        read_for(&mut caller_stream, Duration::from_secs(10), |t| t.contains("Tool execution completed")).await;
    for message in ["Tool execution started", "Tool processing data", "Tool execution completed"] {
        assert!(received.contains(message), "{message} on the caller's GET stream: {received}");
    }
    assert!(received.contains("notifications/message"), "{received}");
    let overheard =
        read_for(&mut bystander_stream, Duration::from_millis(1500), |t| t.contains("notifications/message")).await;
    assert!(!overheard.contains("notifications/message"), "another session's log messages: {overheard}");

    // Below the session's level: not relayed.
    let level = r#"{"jsonrpc":"2.0","id":5,"method":"logging/setLevel","params":{"level":"error"}}"#;
    assert_eq!(a.mcp_raw(ANALYST_KEY, &headers, level).await.status(), 200);
    let answer = b.mcp_raw(ANALYST_KEY, &headers, &call(6, "notes.test_tool_with_logging")).await.text().await.unwrap();
    assert!(answer.contains("executed successfully"), "{answer}");
    let below =
        read_for(&mut caller_stream, Duration::from_millis(1500), |t| t.contains("notifications/message")).await;
    assert!(!below.contains("notifications/message"), "info messages below level error: {below}");

    // The session's end (DELETE on B) ends its stream on A.
    let deleted = b.end_session(ANALYST_KEY, "notes", &caller).await;
    assert_eq!(deleted.status(), 204);
    let ended =
        tokio::time::timeout(Duration::from_secs(10), async { while let Ok(Some(_)) = caller_stream.chunk().await {} })
            .await;
    assert!(ended.is_ok(), "the deleted session's GET stream ended");
}

/// The resources replica `replica` follows upstream for subscribed callers of the notes
/// connection.
async fn followed_on(replica: &support::cluster::Replica) -> u64 {
    let connections: Value = replica.get(ADMIN_KEY, "/api/v1/admin/connections").await.json().await.unwrap();
    let notes = connections["items"].as_array().unwrap().iter().find(|c| c["name"] == "notes").cloned();
    notes.expect("the notes connection")["health"]["subscribed_resources"].as_u64().expect("a count")
}

/// A 2025 session's subscription is followed upstream by the replica that served
/// `resources/subscribe`; an unsubscribe or a DELETE served by another replica reaches it.
#[tokio::test]
async fn a_subscription_is_let_go_upstream_whichever_replica_hears_the_unsubscribe_or_delete() {
    let upstream = Upstream::start("legacy").await;
    let (_backends, _cluster, a, b) = two_replicas_in_front_of(&upstream).await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"subscriber","version":"1"}}}"#;
    let session = a.mcp_raw(ANALYST_KEY, &[], init).await.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let headers = [("Mcp-Session-Id", session.as_str()), ("MCP-Protocol-Version", "2025-11-25")];
    let (subscribe, unsubscribe) = (
        r#"{"jsonrpc":"2.0","id":2,"method":"resources/subscribe","params":{"uri":"notes+notes://index"}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"resources/unsubscribe","params":{"uri":"notes+notes://index"}}"#,
    );
    assert_eq!(followed_on(&a).await, 0);
    assert_eq!(a.mcp_raw(ANALYST_KEY, &headers, subscribe).await.status(), 200);
    assert_eq!((followed_on(&a).await, followed_on(&b).await), (1, 0));
    assert_eq!(b.mcp_raw(ANALYST_KEY, &headers, unsubscribe).await.status(), 200);
    wait_until(Duration::from_secs(5), || async { followed_on(&a).await == 0 }).await;

    assert_eq!(a.mcp_raw(ANALYST_KEY, &headers, subscribe).await.status(), 200);
    assert_eq!(followed_on(&a).await, 1);
    let deleted = b.end_session(ANALYST_KEY, "notes", &session).await;
    assert_eq!(deleted.status(), 204);
    wait_until(Duration::from_secs(5), || async { followed_on(&a).await == 0 }).await;
}
