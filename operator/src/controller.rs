//! One reconcile pass over everything the operator watches: key Secrets, the snapshot, status,
//! events, finalizers. Passes are whole-world (the snapshot is one document), debounced by the
//! caller, and idempotent: a pass on unchanged input writes nothing.

use crate::keys::{self, KeyAction};
use crate::kube_io;
use crate::plan::{self, Reports};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::events::Recorder;
use portcullis_crds::{ApiKey, Connection, McpEndpoint, Object, ObjectRef, Persona, Snapshot};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

/// Everything the watchers currently hold.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Personas.
    pub personas: Vec<Arc<Persona>>,
    /// Connections.
    pub connections: Vec<Arc<Connection>>,
    /// Endpoints.
    pub endpoints: Vec<Arc<McpEndpoint>>,
    /// ApiKeys.
    pub apikeys: Vec<Arc<ApiKey>>,
    /// Secrets of the watched namespaces.
    pub secrets: Vec<Arc<Secret>>,
}

/// Where snapshots go and where pod reports come from (Postgres in production).
pub trait Sink: Send + Sync {
    /// Publishes unless the latest version has the same digest; returns the version now current.
    fn publish(&self, snapshot: &Snapshot) -> impl Future<Output = anyhow::Result<i64>> + Send;
    /// The freshest reports of the API pods.
    fn reports(&self) -> impl Future<Output = Reports> + Send;
}

/// The Postgres sink: the very publishing code `portcullis publish` uses.
pub struct Postgres {
    /// Pool.
    pub pool: sqlx::PgPool,
    /// Snapshot encryption key.
    pub key: portcullis_store::secret_box::SecretKey,
}

impl Sink for Postgres {
    async fn publish(&self, snapshot: &Snapshot) -> anyhow::Result<i64> {
        use portcullis_store::config_store::{Published, publish};
        Ok(match publish(&self.pool, &self.key, snapshot, "operator").await? {
            Published::New { version, summary } => {
                tracing::info!(
                    version,
                    added = summary.added.len(),
                    changed = summary.changed.len(),
                    removed = summary.removed.len(),
                    "published a new snapshot"
                );
                version
            }
            Published::Unchanged { version } => version,
        })
    }

    async fn reports(&self) -> Reports {
        // Pods report every few seconds; two minutes of silence means the pod is gone.
        let since = Utc::now() - chrono::Duration::minutes(2);
        match portcullis_store::reports::latest(&self.pool, since).await {
            Ok(reports) => reports,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read connection reports");
                Reports::new()
            }
        }
    }
}

/// What the pass needs besides the world.
pub struct Context<S> {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Snapshot sink.
    pub sink: S,
    /// Where clients reach the API pods, for endpoint URLs in status.
    pub public_url: Option<String>,
}

/// What a pass did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The snapshot version current after the pass.
    pub version: Option<i64>,
    /// Digest of the snapshot the pass compiled.
    pub digest: String,
    /// Status patches sent.
    pub status_patches: usize,
    /// Key Secrets written (minted or rotated).
    pub keys_written: usize,
    /// Finalizers released after a revocation was published.
    pub revoked: usize,
    /// Objects that are not served.
    pub failing: usize,
    /// When the next pass must run at the latest (a rotation or an overlap ending).
    pub wake_at: Option<DateTime<Utc>>,
}

/// Runs one pass. Kubernetes write failures are logged and counted; they do not stop the pass
/// (the next pass retries). A publish failure stops it before finalizers are released.
pub async fn reconcile<S: Sink>(ctx: &Context<S>, world: &World, now: DateTime<Utc>) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut secrets: BTreeMap<(String, String), Secret> = world
        .secrets
        .iter()
        .map(|s| ((ns(&s.metadata.namespace), s.metadata.name.clone().unwrap_or_default()), (**s).clone()))
        .collect();

    // Keys first, so a freshly minted key is in this pass's snapshot.
    let mut wake_at: Option<DateTime<Utc>> = None;
    for apikey in world.apikeys.iter().filter(|k| k.metadata.deletion_timestamp.is_none()) {
        if !kube_io::has_finalizer(apikey)
            && let Err(e) = kube_io::add_finalizer(&ctx.client, apikey).await
        {
            tracing::warn!(error = %e, apikey = ?apikey.metadata.name, "cannot add the revocation finalizer");
        }
        let slot = (ns(&apikey.metadata.namespace), apikey.spec.secret_name.clone());
        let existing = secrets.get(&slot);
        let action = keys::decide(apikey, existing, now);
        match &action {
            KeyAction::Keep { next_rotation } => wake_at = earliest(wake_at, *next_rotation),
            KeyAction::LeaveForeign => {}
            KeyAction::Mint | KeyAction::Rotate { .. } => {
                let Some(secret) = keys::desired_secret(apikey, existing, &action, &keys::mint(), now) else {
                    continue;
                };
                match kube_io::write_secret(&ctx.client, &secret).await {
                    Ok(()) => {
                        outcome.keys_written += 1;
                        let (reason, note) = match action {
                            KeyAction::Rotate { previous_valid_until } => (
                                "KeyRotated",
                                format!(
                                    "a new key was written to Secret {:?}; the previous key works until {previous_valid_until}",
                                    apikey.spec.secret_name
                                ),
                            ),
                            _ => {
                                ("KeyMinted", format!("a new key was written to Secret {:?}", apikey.spec.secret_name))
                            }
                        };
                        kube_io::event(&ctx.recorder, apikey.as_ref(), false, reason, &note).await;
                        if let KeyAction::Rotate { previous_valid_until } = action {
                            wake_at = earliest(wake_at, Some(previous_valid_until));
                        }
                        secrets.insert(slot, secret);
                    }
                    Err(e) => tracing::warn!(error = %e, apikey = ?apikey.metadata.name, "cannot write the key Secret"),
                }
            }
        }
        // An overlap ending changes the snapshot: wake then.
        if let Some(until) = secrets
            .get(&(ns(&apikey.metadata.namespace), apikey.spec.secret_name.clone()))
            .and_then(previous_valid_until)
            && until > now
        {
            wake_at = earliest(wake_at, Some(until));
        }
        if let Some(expires) = apikey.spec.expires_at.filter(|e| *e > now) {
            wake_at = earliest(wake_at, Some(expires));
        }
    }

    let (objects, generations) = objects(world, &secrets);
    let reports = ctx.sink.reports().await;
    let plan = plan::plan(&objects, &generations, &reports, ctx.public_url.as_deref(), now);
    outcome.digest = plan.snapshot.digest.clone();
    outcome.failing = plan.failures.len();
    outcome.version = Some(ctx.sink.publish(&plan.snapshot).await?);

    // The revocation is published: deleted keys may go.
    for apikey in world.apikeys.iter().filter(|k| k.metadata.deletion_timestamp.is_some() && kube_io::has_finalizer(k))
    {
        match kube_io::remove_finalizer(&ctx.client, apikey).await {
            Ok(()) => outcome.revoked += 1,
            Err(e) => tracing::warn!(error = %e, apikey = ?apikey.metadata.name, "cannot release the finalizer"),
        }
    }

    let stored = stored_statuses(world);
    for (r, mut desired) in plan.statuses {
        let existing = stored.get(&r).and_then(|s| s.as_ref());
        plan::carry_transition_times(&mut desired, existing);
        if existing == Some(&desired) {
            continue;
        }
        if let Err(e) = kube_io::apply_status(&ctx.client, &r, &desired).await {
            tracing::warn!(error = %e, object = %r, "cannot write status");
            continue;
        }
        outcome.status_patches += 1;
        if let Some(failure) = plan.failures.get(&r) {
            let before = existing.and_then(ready_reason);
            if before.as_deref() != Some(failure.reason.as_str()) {
                event_for(ctx, world, &r, &failure.reason, &failure.message).await;
            }
        }
    }
    outcome.wake_at = wake_at;
    Ok(outcome)
}

fn ready_reason(status: &serde_json::Value) -> Option<String> {
    let conditions = status.get("conditions")?.as_array()?;
    let ready = conditions.iter().find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))?;
    if ready.get("status")?.as_str()? == "True" {
        return None;
    }
    Some(ready.get("reason")?.as_str()?.to_string())
}

async fn event_for<S>(ctx: &Context<S>, world: &World, r: &ObjectRef, reason: &str, message: &str) {
    let matches =
        |m: &kube::api::ObjectMeta| m.name.as_deref() == Some(r.name.as_str()) && ns(&m.namespace) == r.namespace;
    match r.kind.as_str() {
        "Persona" => {
            if let Some(o) = world.personas.iter().find(|o| matches(&o.metadata)) {
                kube_io::event(&ctx.recorder, o.as_ref(), true, reason, message).await;
            }
        }
        "Connection" => {
            if let Some(o) = world.connections.iter().find(|o| matches(&o.metadata)) {
                kube_io::event(&ctx.recorder, o.as_ref(), true, reason, message).await;
            }
        }
        "McpEndpoint" => {
            if let Some(o) = world.endpoints.iter().find(|o| matches(&o.metadata)) {
                kube_io::event(&ctx.recorder, o.as_ref(), true, reason, message).await;
            }
        }
        "ApiKey" => {
            if let Some(o) = world.apikeys.iter().find(|o| matches(&o.metadata)) {
                kube_io::event(&ctx.recorder, o.as_ref(), true, reason, message).await;
            }
        }
        _ => {}
    }
}

fn ns(namespace: &Option<String>) -> String {
    namespace.clone().unwrap_or_else(|| "default".to_string())
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn previous_valid_until(secret: &Secret) -> Option<DateTime<Utc>> {
    let text = keys::value(secret, portcullis_crds::keys::SECRET_PREVIOUS_VALID_UNTIL)?;
    Some(DateTime::parse_from_rfc3339(text.trim()).ok()?.with_timezone(&Utc))
}

/// The compiler's input: the custom resources (deleted ApiKeys left out: they are revoked) and
/// only the Secrets they reference, with each object's generation.
pub fn objects(world: &World, secrets: &BTreeMap<(String, String), Secret>) -> (Vec<Object>, BTreeMap<ObjectRef, i64>) {
    let mut objects = Vec::new();
    let mut referenced = BTreeSet::new();
    for p in &world.personas {
        objects.push(Object::Persona((**p).clone()));
    }
    for c in &world.connections {
        if let Some(from) = c.spec.mcp.as_ref().and_then(|m| m.headers_from.as_ref()) {
            referenced.insert((ns(&c.metadata.namespace), from.secret_ref.name.clone()));
        }
        objects.push(Object::Connection((**c).clone()));
    }
    for e in &world.endpoints {
        objects.push(Object::McpEndpoint((**e).clone()));
    }
    for k in world.apikeys.iter().filter(|k| k.metadata.deletion_timestamp.is_none()) {
        referenced.insert((ns(&k.metadata.namespace), k.spec.secret_name.clone()));
        objects.push(Object::ApiKey((**k).clone()));
    }
    for slot in &referenced {
        if let Some(secret) = secrets.get(slot) {
            objects.push(Object::Secret(secret.clone()));
        }
    }
    let mut generations = BTreeMap::new();
    for object in &objects {
        let generation = match object {
            Object::Persona(o) => o.metadata.generation,
            Object::Connection(o) => o.metadata.generation,
            Object::McpEndpoint(o) => o.metadata.generation,
            Object::ApiKey(o) => o.metadata.generation,
            Object::Secret(_) => None,
        };
        if let Some(g) = generation {
            generations.insert(object.object_ref(), g);
        }
    }
    (objects, generations)
}

fn stored_statuses(world: &World) -> BTreeMap<ObjectRef, Option<serde_json::Value>> {
    let mut out = BTreeMap::new();
    let mut put = |kind: &str, m: &kube::api::ObjectMeta, status: Option<serde_json::Value>| {
        out.insert(ObjectRef::new(kind, &ns(&m.namespace), m.name.as_deref().unwrap_or_default()), status);
    };
    for o in &world.personas {
        put("Persona", &o.metadata, o.status.as_ref().and_then(|s| serde_json::to_value(s).ok()));
    }
    for o in &world.connections {
        put("Connection", &o.metadata, o.status.as_ref().and_then(|s| serde_json::to_value(s).ok()));
    }
    for o in &world.endpoints {
        put("McpEndpoint", &o.metadata, o.status.as_ref().and_then(|s| serde_json::to_value(s).ok()));
    }
    for o in &world.apikeys {
        put("ApiKey", &o.metadata, o.status.as_ref().and_then(|s| serde_json::to_value(s).ok()));
    }
    out
}

#[cfg(test)]
mod tests;
