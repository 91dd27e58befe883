//! The `portcullis-operator` binary, two replicas, against an in-memory Kubernetes API server
//! (`support/fake_kube.rs`), real Postgres and a running `portcullis serve`: objects applied to
//! the API server are served; only the leader writes; a burst of 300 objects publishes a handful
//! of versions; SIGTERM hands leadership over; a deleted key is revoked before it goes.

mod support;

use portcullis_e2e::backends::Shared;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::cluster::{Cluster, SECRET_KEY};
use support::fake_kube::FakeKube;
use support::*;

const PERSONAS: &str = "/apis/portcullis.dev/v1alpha1/personas";
const APIKEYS: &str = "/apis/portcullis.dev/v1alpha1/apikeys";
const SECRETS: &str = "/api/v1/secrets";
const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";

struct OperatorProcess {
    child: Option<Killed>,
    port: u16,
    metrics: u16,
    stderr: Lines,
}

impl OperatorProcess {
    fn start(name: &str, kube_port: u16, database_url: &str, dir: &std::path::Path) -> Self {
        let kubeconfig = dir.join(format!("kubeconfig-{name}"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{kube_port}\"}}}}]\nusers: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\ncurrent-context: fake\n"
            ),
        )
        .unwrap();
        let metrics = free_port();
        let mut child = Command::new(bin("portcullis-operator"))
            .args(["run", "--debounce-ms", "200", "--max-delay-ms", "800", "--resync-seconds", "5"])
            .env("KUBECONFIG", &kubeconfig)
            .env("DATABASE_URL", database_url)
            .env("PORTCULLIS_SECRET_KEY", SECRET_KEY)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "portcullis-system")
            .env("PORTCULLIS_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis-operator");
        let stderr = Lines::default();
        stderr.collect(child.stderr.take().unwrap());
        OperatorProcess { child: Some(Killed(child)), port: kube_port, metrics, stderr }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics)).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.trim().parse().ok()))
    }

    fn terminate(&mut self) {
        if let Some(Killed(child)) = &self.child {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
    }
}

fn manifests(upstream_url: &str) -> Vec<Value> {
    let files = quickstart(upstream_url);
    let mut out = Vec::new();
    for (_, text) in files {
        for doc in text.split("\n---\n") {
            let v: Value = serde_yaml::from_str(doc).unwrap();
            // Keys come from the operator here, not from Secret manifests.
            if v["kind"] == "Secret" {
                continue;
            }
            out.push(v);
        }
    }
    out
}

fn key_of(kube: &FakeKube, secret: &str) -> Option<String> {
    use base64::Engine;
    let s = kube.get(SECRETS, "demo", secret)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s["data"]["key"].as_str()?).ok()?;
    String::from_utf8(bytes).ok()
}

async fn published_versions(database_url: &str) -> i64 {
    let out =
        Command::new("psql").args([database_url, "-tAc", "SELECT count(*) FROM config_snapshots"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(-1)
}

#[tokio::test]
async fn two_operator_replicas_reconcile_a_cluster_into_what_serve_serves() {
    let upstream = Upstream::start("both").await;
    let backends = Shared::start().await;
    let cluster = Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, &[]);
    let replica = cluster.replica().await;
    let kube = FakeKube::new();
    let (port_a, port_b) = (kube.listen().await, kube.listen().await);
    let dir = tempfile::tempdir().unwrap();
    for object in manifests(&upstream.url()) {
        kube.apply(object);
    }
    let mut a = OperatorProcess::start("operator-a", port_a, &backends.database_url, dir.path());
    let mut b = OperatorProcess::start("operator-b", port_b, &backends.database_url, dir.path());

    // The keys are minted, published and accepted by the replica.
    let started = Instant::now();
    wait_until(Duration::from_secs(30), || async { key_of(&kube, "analyst-key").is_some() }).await;
    let analyst = key_of(&kube, "analyst-key").unwrap();
    wait_until(Duration::from_secs(10), || async { replica.tool_names(&analyst).await.len() >= 2 }).await;
    eprintln!("first objects served {:?} after the operators started", started.elapsed());

    // Exactly one leader, and every write but the election came through its port.
    let holder = kube.get(LEASES, "portcullis-system", "portcullis-operator").expect("lease")["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let (leader, follower) = if holder == "operator-a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let non_lease_writes = |kube: &FakeKube| -> Vec<(u16, String, String)> {
        kube.writes().into_iter().filter(|(_, _, path)| !path.contains("/leases")).collect()
    };
    let writes = non_lease_writes(&kube);
    assert!(!writes.is_empty());
    assert!(writes.iter().all(|(port, _, _)| *port == leader.port), "a follower wrote: {writes:?}");
    assert_eq!(leader.metric("portcullis_operator_leader").await, Some(1.0));
    assert_eq!(follower.metric("portcullis_operator_leader").await, Some(0.0));

    // Status written by server-side apply, with the minted key's id and the endpoint's URL.
    let status = kube.get(APIKEYS, "demo", "analyst-key").unwrap()["status"].clone();
    assert_eq!(status["conditions"][0]["status"], "True", "{status}");
    assert!(status["keyId"].is_string() && !status.to_string().contains(&analyst));
    let finalizers = kube.get(APIKEYS, "demo", "analyst-key").unwrap()["metadata"]["finalizers"].clone();
    assert_eq!(finalizers, json!(["portcullis.dev/revoke-key"]));

    // A burst of 300 personas publishes a handful of versions, not 300.
    let before = published_versions(&backends.database_url).await;
    for i in 0..300 {
        kube.apply(json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Persona",
            "metadata": {"name": format!("bulk-{i}"), "namespace": "demo"}, "spec": {"tools": {"allow": ["notes.list_*"]}}}));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    wait_until(Duration::from_secs(10), || async {
        kube.get(PERSONAS, "demo", "bulk-299").is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
    })
    .await;
    let after = published_versions(&backends.database_url).await;
    eprintln!("300 personas applied in a burst: {} versions published", after - before);
    assert!((1..=4).contains(&(after - before)), "{before} → {after}");

    // A pass over unchanged objects writes no status (re-applying an object unchanged wakes it).
    let noop = || {
        kube.apply(json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Persona",
        "metadata": {"name": "bulk-0", "namespace": "demo"}, "spec": {"tools": {"allow": ["notes.list_*"]}}}))
    };
    let passes = leader.metric("portcullis_operator_passes_total").await.unwrap();
    noop();
    wait_until(Duration::from_secs(5), || async {
        leader.metric("portcullis_operator_passes_total").await.is_some_and(|p| p > passes)
    })
    .await;
    let patches = leader.metric("portcullis_operator_status_patches_total").await.unwrap();
    let passes = leader.metric("portcullis_operator_passes_total").await.unwrap();
    noop();
    wait_until(Duration::from_secs(5), || async {
        leader.metric("portcullis_operator_passes_total").await.is_some_and(|p| p > passes)
    })
    .await;
    assert_eq!(leader.metric("portcullis_operator_status_patches_total").await, Some(patches), "nothing re-patched");

    // SIGTERM: the leader releases the lease and the other replica takes over and serves changes.
    leader.terminate();
    let handover = Instant::now();
    wait_until(Duration::from_secs(15), || async {
        kube.get(LEASES, "portcullis-system", "portcullis-operator")
            .is_some_and(|l| l["spec"]["holderIdentity"].as_str().is_some_and(|h| h != holder))
    })
    .await;
    eprintln!("leadership handed over after {:?}", handover.elapsed());
    assert!(leader.stderr.text().contains("released the lease"), "{}", leader.stderr.text());

    // The new leader revokes a deleted key before letting it go.
    kube.delete(APIKEYS, "demo", "analyst-key");
    wait_until(Duration::from_secs(10), || async { kube.get(APIKEYS, "demo", "analyst-key").is_none() }).await;
    wait_until(Duration::from_secs(5), || async { replica.get(&analyst, "/api/v1/portal/me").await.status() == 401 })
        .await;
    assert!(kube.get(SECRETS, "demo", "analyst-key").is_none(), "the owned Secret is garbage-collected");
    let _ = follower.stderr.text();
}
