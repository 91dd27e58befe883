//! The running operator: watchers feeding caches, a debounced pass loop that only the leader
//! drives, and the health/metrics server.

use crate::controller::{self, Context, Postgres, World};
use crate::leader::Elector;
use crate::metrics::Metrics;
use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use portcullis_crds::{ApiKey, Connection, McpEndpoint, Persona};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Settings of a running operator.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Where clients reach the API pods (for endpoint URLs in status).
    pub public_url: Option<String>,
    /// Quiet time after a change before a pass runs (changes in a burst share one pass).
    pub debounce: Duration,
    /// Longest a pass waits behind a continuous stream of changes.
    pub max_delay: Duration,
    /// A pass runs at least this often (pod reports, clock-driven expiry).
    pub resync: Duration,
}

/// Caches of every watched kind, per namespace.
#[derive(Clone, Default)]
pub struct Caches {
    personas: Vec<Store<Persona>>,
    connections: Vec<Store<Connection>>,
    endpoints: Vec<Store<McpEndpoint>>,
    apikeys: Vec<Store<ApiKey>>,
    secrets: Vec<Store<Secret>>,
}

impl Caches {
    /// Everything the caches hold now.
    pub fn world(&self) -> World {
        fn all<K: Resource + Clone>(stores: &[Store<K>]) -> Vec<Arc<K>>
        where
            K::DynamicType: std::hash::Hash + Eq + Clone,
        {
            stores.iter().flat_map(|s| s.state()).collect()
        }
        World {
            personas: all(&self.personas),
            connections: all(&self.connections),
            endpoints: all(&self.endpoints),
            apikeys: all(&self.apikeys),
            secrets: all(&self.secrets),
        }
    }

    /// Waits until every cache has listed once: a pass on a half-filled cache would publish a
    /// snapshot missing objects, which would cut users off.
    pub async fn ready(&self) {
        for s in &self.personas {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.connections {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.endpoints {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.apikeys {
            let _ = s.wait_until_ready().await;
        }
        for s in &self.secrets {
            let _ = s.wait_until_ready().await;
        }
    }
}

fn watch<K>(client: &Client, namespace: Option<&str>, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().any_semantic()).default_backoff().reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(error = %e, kind = %K::kind(&()), "watch error; retrying"),
            }
        }
    });
    reader
}

/// Starts the watchers; `changed` is notified on every change.
pub fn start_watchers(client: &Client, namespaces: &[String], changed: &Arc<Notify>) -> Caches {
    let scopes: Vec<Option<&str>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.iter().map(|n| Some(n.as_str())).collect() };
    let mut caches = Caches::default();
    for scope in scopes {
        caches.personas.push(watch(client, scope, changed.clone()));
        caches.connections.push(watch(client, scope, changed.clone()));
        caches.endpoints.push(watch(client, scope, changed.clone()));
        caches.apikeys.push(watch(client, scope, changed.clone()));
        caches.secrets.push(watch(client, scope, changed.clone()));
    }
    caches
}

/// After a first change: waits until `quiet` passes without another change, but no longer than
/// `max_delay` in all, so a burst of changes (500 manifests applied at once) shares one pass.
pub async fn settle(changed: &Notify, quiet: Duration, max_delay: Duration) {
    let first = tokio::time::Instant::now();
    loop {
        let left = max_delay.saturating_sub(first.elapsed());
        if left.is_zero() {
            return;
        }
        if tokio::time::timeout(quiet.min(left), changed.notified()).await.is_err() {
            return;
        }
    }
}

/// The pass loop: after a change, wait for `debounce` of quiet (at most `max_delay`), then run
/// a pass if this replica leads. Runs at least every `resync`, and when a key is due.
pub async fn pass_loop(
    ctx: Context<Postgres>,
    caches: Caches,
    elector: Elector,
    changed: Arc<Notify>,
    settings: Settings,
    metrics: Arc<Metrics>,
) {
    caches.ready().await;
    metrics.caches_ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!("caches filled");
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = changed.notified() => settle(&changed, settings.debounce, settings.max_delay).await,
            _ = tokio::time::sleep_until(next) => {}
        }
        metrics.leading.store(elector.is_leading(), std::sync::atomic::Ordering::SeqCst);
        let mut wake = tokio::time::Instant::now() + settings.resync;
        if elector.is_leading() {
            let started = std::time::Instant::now();
            let world = caches.world();
            match controller::reconcile(&ctx, &world, Utc::now()).await {
                Ok(outcome) => {
                    metrics.record_pass(&outcome, started.elapsed());
                    if let Some(at) = outcome.wake_at {
                        let until = (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50);
                        wake = wake.min(tokio::time::Instant::now() + until);
                    }
                }
                Err(e) => {
                    metrics.record_failure();
                    tracing::warn!(error = %e, "reconcile pass failed; retrying");
                    wake = tokio::time::Instant::now() + Duration::from_secs(2);
                }
            }
        } else {
            // Followers check often so a takeover is quick.
            wake = tokio::time::Instant::now() + Duration::from_secs(1);
        }
        next = wake;
    }
}

/// Everything `portcullis-operator run` needs.
pub struct RunArgs {
    /// Settings.
    pub settings: Settings,
    /// Postgres pool.
    pub pool: sqlx::PgPool,
    /// Snapshot encryption key.
    pub key: portcullis_store::secret_box::SecretKey,
    /// Lease namespace and name.
    pub lease: (String, String),
    /// This replica's identity (pod name).
    pub identity: String,
    /// Address of /healthz and /metrics.
    pub metrics_addr: std::net::SocketAddr,
}

/// Runs until SIGTERM/SIGINT, then releases the lease.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot reach a Kubernetes API server (run in a cluster, or set KUBECONFIG): {e}")
    })?;
    let changed = Arc::new(Notify::new());
    let caches = start_watchers(&client, &args.settings.namespaces, &changed);
    let elector = Elector::new(client.clone(), &args.lease.0, &args.lease.1, &args.identity, Duration::from_secs(15));
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
    tokio::spawn(elector.clone().run());
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "portcullis-operator".into(), instance: Some(args.identity.clone()) },
    );
    let ctx = Context {
        client,
        recorder,
        sink: Postgres { pool: args.pool, key: args.key },
        public_url: args.settings.public_url.clone(),
    };
    let passes = tokio::spawn(pass_loop(ctx, caches, elector.clone(), changed, args.settings, metrics));
    shutdown_signal().await;
    tracing::info!("shutting down");
    passes.abort();
    elector.release().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_shares_a_handful_of_passes() {
        let changed = Arc::new(Notify::new());
        let burst = changed.clone();
        // 500 objects applied over half a second.
        tokio::spawn(async move {
            for _ in 0..500 {
                burst.notify_one();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let start = tokio::time::Instant::now();
        let mut passes = 0;
        while start.elapsed() < Duration::from_secs(5) {
            if tokio::time::timeout(Duration::from_secs(1), changed.notified()).await.is_err() {
                continue;
            }
            settle(&changed, Duration::from_millis(300), Duration::from_millis(1000)).await;
            passes += 1;
        }
        assert!((1..=2).contains(&passes), "{passes} passes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_continuous_stream_still_publishes_within_max_delay() {
        let changed = Arc::new(Notify::new());
        let stream = changed.clone();
        tokio::spawn(async move {
            loop {
                stream.notify_one();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        changed.notified().await;
        let start = tokio::time::Instant::now();
        settle(&changed, Duration::from_millis(300), Duration::from_millis(1000)).await;
        assert!(start.elapsed() <= Duration::from_millis(1000), "{:?}", start.elapsed());
        assert!(start.elapsed() >= Duration::from_millis(900), "it did wait for the stream: {:?}", start.elapsed());
    }
}
