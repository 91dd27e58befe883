//! The operator's compile-and-publish path, fed the objects a cluster would hold, against real
//! Postgres and a running `portcullis serve`: applying, changing and deleting each kind changes
//! what the replica serves within a second; keys are minted and revoked. The Kubernetes API is
//! the fake one of `portcullis_operator::fake_api` (no API server runs here).

mod support;

use chrono::Utc;
use kube::runtime::events::{Recorder, Reporter};
use portcullis_e2e::backends::Shared;
use portcullis_operator::controller::{Context, Postgres, World, reconcile};
use portcullis_operator::fake_api::{Call, fake_apiserver, world};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::cluster::{Cluster, SECRET_KEY};
use support::*;

fn yaml(files: &[(&str, String)]) -> String {
    files.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n---\n")
}

struct Operator {
    pool: sqlx::PgPool,
}

impl Operator {
    /// One pass over `world`; returns the calls it made to the Kubernetes API.
    async fn pass(&self, world: &World) -> Vec<Call> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (client, calls) = fake_apiserver(world, log);
        let recorder = kube_recorder(client.clone());
        let sink = Postgres {
            pool: self.pool.clone(),
            key: portcullis_store::secret_box::SecretKey::from_text(SECRET_KEY).unwrap(),
        };
        let ctx = Context { client, recorder, sink, public_url: None };
        reconcile(&ctx, world, Utc::now()).await.expect("pass");
        calls.lock().unwrap().clone()
    }
}

fn kube_recorder(client: kube::Client) -> Recorder {
    Recorder::new(client, Reporter { controller: "portcullis-operator".into(), instance: None })
}

/// Waits up to a second for `check` to hold; returns how long it took.
async fn within_a_second<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not served within a second");
}

#[tokio::test]
async fn operator_passes_change_what_serve_serves_within_a_second() {
    let upstream = Upstream::start("both").await;
    let backends = Shared::start().await;
    let cluster = Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, &[]);
    let pool = sqlx::PgPool::connect(&backends.database_url).await.unwrap();
    portcullis_store::migrate(&pool).await.unwrap();
    let operator = Operator { pool };
    let replica = cluster.replica().await;

    // Apply: the quickstart objects as the cluster would hold them.
    let files = quickstart(&upstream.url());
    let mut w = world(&yaml(&files));
    operator.pass(&w).await;
    replica.wait_ready().await;
    let took = within_a_second("apply", || async { replica.tool_names(ANALYST_KEY).await.len() >= 2 }).await;
    eprintln!("apply served after {took:?}");
    let names = replica.tool_names(ANALYST_KEY).await;
    assert!(names.contains(&"notes.add_note".to_string()), "{names:?}");

    // The replica reports what it sees of the upstream; the next pass mirrors it into status.
    portcullis_e2e::wait_until(Duration::from_secs(10), || async {
        let since = Utc::now() - chrono::Duration::minutes(1);
        let reports = portcullis_store::reports::latest(&operator.pool, since).await.unwrap_or_default();
        reports.get(&("demo".to_string(), "notes".to_string())).is_some_and(|r| r.health == "healthy")
    })
    .await;
    let calls = operator.pass(&w).await;
    let connection = calls.iter().find(|c| c.path.ends_with("/connections/notes/status")).expect("connection status");
    assert_eq!(connection.body["status"]["health"], "healthy", "{}", connection.body);
    let upstream_tools = connection.body["status"]["toolCount"].as_u64().expect("tool count");
    assert!(upstream_tools >= names.len() as u64, "{}", connection.body);
    let persona = calls.iter().find(|c| c.path.ends_with("/personas/analyst/status")).expect("persona status");
    assert_eq!(persona.body["status"]["toolCount"].as_u64(), Some(names.len() as u64), "{}", persona.body);

    // Change a Persona: the analyst loses notes.add_note.
    let changed =
        files[0].1.replace(r#"deny: ["notes.delete_note"]"#, r#"deny: ["notes.delete_note", "notes.add_note"]"#);
    assert_ne!(changed, files[0].1);
    let mut edited = files.clone();
    edited[0].1 = changed;
    let changed_world = world(&yaml(&edited));
    w.personas = changed_world.personas.clone();
    operator.pass(&w).await;
    within_a_second("persona change", || async {
        !replica.tool_names(ANALYST_KEY).await.contains(&"notes.add_note".to_string())
    })
    .await;

    // Delete the McpEndpoint: nothing reaches the connection any more.
    let endpoints = std::mem::take(&mut w.endpoints);
    operator.pass(&w).await;
    within_a_second("endpoint delete", || async { replica.tool_names(ANALYST_KEY).await.is_empty() }).await;
    w.endpoints = endpoints;
    operator.pass(&w).await;
    within_a_second("endpoint re-apply", || async { !replica.tool_names(ANALYST_KEY).await.is_empty() }).await;

    // Credentials from a Secret: referencing one, then changing its value, each publish a new
    // version the replica loads (the values travel sealed); the tools keep being served.
    let version = |pool: sqlx::PgPool| async move {
        portcullis_store::config_store::latest_version(&pool).await.unwrap().unwrap_or(0)
    };
    let before = version(operator.pool.clone()).await;
    let with_secret = world(&format!(
        "{}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: notes-auth, namespace: demo}}\nstringData: {{X-Upstream-Token: upstream-token-one-5f2c}}\n",
        yaml(&edited).replace(
            "refreshIntervalSeconds: 5}",
            "refreshIntervalSeconds: 5, headersFrom: {secretRef: {name: notes-auth}}}"
        )
    ));
    assert_eq!(
        with_secret.connections[0].spec.mcp.as_ref().unwrap().headers_from.as_ref().unwrap().secret_ref.name,
        "notes-auth"
    );
    w.connections = with_secret.connections.clone();
    w.secrets = with_secret.secrets.clone();
    operator.pass(&w).await;
    let referenced = version(operator.pool.clone()).await;
    assert!(referenced > before, "referencing a Secret publishes");
    let rotated = world(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: notes-auth, namespace: demo}\nstringData: {X-Upstream-Token: upstream-token-two-9d1e}\n",
    );
    w.secrets.retain(|s| s.metadata.name.as_deref() != Some("notes-auth"));
    w.secrets.extend(rotated.secrets.iter().cloned());
    operator.pass(&w).await;
    assert!(version(operator.pool.clone()).await > referenced, "a changed Secret value publishes");
    let stored: String =
        sqlx::query_scalar("SELECT snapshot::text FROM config_snapshots ORDER BY version DESC LIMIT 1")
            .fetch_one(&operator.pool)
            .await
            .unwrap();
    assert!(!stored.contains("upstream-token-two-9d1e"), "secret values are sealed, not in the snapshot document");
    within_a_second("credentials change", || async { !replica.tool_names(ANALYST_KEY).await.is_empty() }).await;

    // Delete the Connection: the endpoint is left without it (DependencyNotReady) and the tools
    // go; apply it again and they return.
    let connections = std::mem::take(&mut w.connections);
    let calls = operator.pass(&w).await;
    within_a_second("connection delete", || async { replica.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let endpoint_status = calls.iter().find(|c| c.path.ends_with("/mcpendpoints/notes/status")).expect("status");
    assert!(endpoint_status.body.to_string().contains("ReferenceNotFound"), "{}", endpoint_status.body);
    w.connections = connections;
    operator.pass(&w).await;
    within_a_second("connection re-apply", || async { !replica.tool_names(ANALYST_KEY).await.is_empty() }).await;

    // A new ApiKey without a Secret: the operator mints the key, the replica accepts it.
    let ci = "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: ci, namespace: demo}\nspec: {persona: analyst, secretName: ci-key}\n";
    let with_ci = world(&format!("{}\n---\n{ci}", yaml(&edited)));
    w.apikeys = with_ci.apikeys.clone();
    let calls = operator.pass(&w).await;
    let secret = calls.iter().find(|c| c.path == "/api/v1/namespaces/demo/secrets/ci-key").expect("key minted");
    let key = decode(&secret.body["data"]["key"]);
    within_a_second("minted key", || async { replica.get(&key, "/api/v1/portal/me").await.status() == 200 }).await;

    // Delete it: the revocation is published, then the finalizer is released.
    let mut deleting = (*w.apikeys.iter().find(|k| k.metadata.name.as_deref() == Some("ci")).unwrap().as_ref()).clone();
    deleting.metadata.deletion_timestamp = Some(portcullis_operator::plan::time(Utc::now()));
    deleting.metadata.finalizers = Some(vec!["portcullis.dev/revoke-key".into()]);
    w.apikeys.retain(|k| k.metadata.name.as_deref() != Some("ci"));
    w.apikeys.push(Arc::new(deleting));
    w.secrets.push(Arc::new(serde_json::from_value(secret.body.clone()).unwrap()));
    let calls = operator.pass(&w).await;
    assert!(calls.iter().any(|c| c.method == "PATCH" && c.path.ends_with("/apikeys/ci")), "finalizer released");
    within_a_second("revoked key", || async { replica.get(&key, "/api/v1/portal/me").await.status() == 401 }).await;

    // The changelog tells the tenant's administrators what each version changed.
    let log: Value = replica.get(ADMIN_KEY, "/api/v1/admin/config/changelog?per_page=2").await.json().await.unwrap();
    assert_eq!(log["items"].as_array().unwrap().len(), 2, "{log}");
    assert!(log["total"].as_u64().unwrap() >= 6, "{log}");
    let newest = &log["items"][0];
    assert_eq!(newest["source"], "operator");
    assert_eq!(newest["summary"]["removed"], serde_json::json!(["ApiKey demo/ci"]), "{log}");
    let analyst = replica.get(ANALYST_KEY, "/api/v1/admin/config/changelog").await;
    assert_eq!(analyst.status(), 403, "administrators only");
}

fn decode(value: &Value) -> String {
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap()).unwrap()).unwrap()
}
