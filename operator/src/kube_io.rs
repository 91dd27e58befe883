//! The operator's writes to the Kubernetes API: status (server-side apply under one field
//! manager), ApiKey Secrets, the revocation finalizer, and Events. Nothing here ever logs or
//! returns a key.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use portcullis_crds::{API_VERSION, ApiKey, Connection, McpEndpoint, ObjectRef, Persona};
use serde_json::{Value, json};

/// The one field manager every write of the operator uses.
pub const FIELD_MANAGER: &str = "portcullis-operator";
/// Finalizer that holds a deleted ApiKey until its revocation is published.
pub const FINALIZER: &str = "portcullis.dev/revoke-key";

/// Applies `status` to the object `r` (one of the four kinds) with server-side apply.
pub async fn apply_status(client: &Client, r: &ObjectRef, status: &Value) -> Result<(), kube::Error> {
    let body = json!({ "apiVersion": API_VERSION, "kind": r.kind, "status": status });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&body);
    match r.kind.as_str() {
        "Persona" => Api::<Persona>::namespaced(client.clone(), &r.namespace)
            .patch_status(&r.name, &params, &patch)
            .await
            .map(drop),
        "Connection" => Api::<Connection>::namespaced(client.clone(), &r.namespace)
            .patch_status(&r.name, &params, &patch)
            .await
            .map(drop),
        "McpEndpoint" => Api::<McpEndpoint>::namespaced(client.clone(), &r.namespace)
            .patch_status(&r.name, &params, &patch)
            .await
            .map(drop),
        "ApiKey" => Api::<ApiKey>::namespaced(client.clone(), &r.namespace)
            .patch_status(&r.name, &params, &patch)
            .await
            .map(drop),
        _ => Ok(()),
    }
}

/// Creates or updates an ApiKey's Secret with server-side apply.
pub async fn write_secret(client: &Client, secret: &Secret) -> Result<(), kube::Error> {
    let namespace = secret.metadata.namespace.as_deref().unwrap_or("default");
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let mut body = serde_json::to_value(secret).unwrap_or_default();
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map(drop)
}

/// Sets the ApiKey's finalizers to `finalizers`, guarded by its resourceVersion so a concurrent
/// change to the list is never overwritten (the API answers 409 and the next pass retries).
pub async fn set_finalizers(client: &Client, apikey: &ApiKey, finalizers: Vec<String>) -> Result<(), kube::Error> {
    let namespace = apikey.metadata.namespace.as_deref().unwrap_or("default");
    let name = apikey.metadata.name.as_deref().unwrap_or_default();
    let body = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": apikey.metadata.resource_version } });
    Api::<ApiKey>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(drop)
}

/// Adds the revocation finalizer.
pub async fn add_finalizer(client: &Client, apikey: &ApiKey) -> Result<(), kube::Error> {
    let mut finalizers = apikey.metadata.finalizers.clone().unwrap_or_default();
    finalizers.push(FINALIZER.to_string());
    set_finalizers(client, apikey, finalizers).await
}

/// Removes the revocation finalizer (after the revocation is published).
pub async fn remove_finalizer(client: &Client, apikey: &ApiKey) -> Result<(), kube::Error> {
    let finalizers = apikey.metadata.finalizers.iter().flatten().filter(|f| *f != FINALIZER).cloned().collect();
    set_finalizers(client, apikey, finalizers).await
}

/// Whether the ApiKey carries the revocation finalizer.
pub fn has_finalizer(apikey: &ApiKey) -> bool {
    apikey.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER)
}

/// Publishes a Kubernetes Event about `object`; failures are logged, never fatal.
pub async fn event<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    object: &K,
    warning: bool,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "cannot publish an event");
    }
}
