//! A small in-memory Kubernetes API server over HTTP, enough for the operator binary: list and
//! watch (from a resourceVersion, with replay), get, create, replace with optimistic
//! concurrency, server-side apply (objects and status), JSON merge patch, delete with
//! finalizers and owner-reference garbage collection, Leases and Events. It serves the same
//! state on several ports, so a test can tell which operator replica sent which write.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Collection key: `/api/v1/secrets` or `/apis/portcullis.dev/v1alpha1/personas` form (no namespace).
type Collection = String;

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    collection: Collection,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<(Collection, String, String), Value>,
    history: Vec<Change>,
    /// (port, method, path) of every request except reads.
    writes: Vec<(u16, String, String)>,
}

/// The fake API server.
#[derive(Clone)]
pub struct FakeKube {
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Change>,
}

struct Port {
    kube: FakeKube,
    port: u16,
}

impl FakeKube {
    /// An empty cluster.
    pub fn new() -> Self {
        Self { store: Arc::default(), changes: broadcast::channel(100_000).0 }
    }

    /// Serves the cluster on a new local port; returns the port.
    pub async fn listen(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app = Router::new().fallback(handle).with_state(Arc::new(Port { kube: self.clone(), port }));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        port
    }

    /// Creates or updates an object as `kubectl apply` would (generation bumps when the spec changes).
    pub fn apply(&self, object: Value) {
        let (collection, namespace, name) = address(&object);
        let mut s = self.store.lock().unwrap();
        let existing = s.objects.get(&(collection.clone(), namespace.clone(), name.clone())).cloned();
        let mut object = object;
        match existing {
            Some(old) => {
                let spec_changed = old.get("spec") != object.get("spec") || old.get("data") != object.get("data");
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(spec_changed);
                for keep in ["uid", "creationTimestamp", "finalizers", "ownerReferences", "deletionTimestamp"] {
                    if !old["metadata"][keep].is_null() && object["metadata"][keep].is_null() {
                        object["metadata"][keep] = old["metadata"][keep].clone();
                    }
                }
                object["metadata"]["generation"] = json!(generation);
                if object.get("status").is_none() && old.get("status").is_some() {
                    object["status"] = old["status"].clone();
                }
                s.put(collection, namespace, name, object, "MODIFIED", &self.changes);
            }
            None => {
                s.uid += 1;
                object["metadata"]["uid"] = json!(format!("uid-{}", s.uid));
                object["metadata"]["generation"] = json!(1);
                object["metadata"]["creationTimestamp"] = json!("2026-11-23T00:00:00Z");
                s.put(collection, namespace, name, object, "ADDED", &self.changes);
            }
        }
    }

    /// Deletes an object as `kubectl delete` would.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        self.store.lock().unwrap().delete(collection, namespace, name, &self.changes);
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let s = self.store.lock().unwrap();
        s.objects.get(&(collection.to_string(), namespace.to_string(), name.to_string())).cloned()
    }

    /// Writes (port, method, path) so far.
    pub fn writes(&self) -> Vec<(u16, String, String)> {
        self.store.lock().unwrap().writes.clone()
    }
}

impl Store {
    fn put(
        &mut self,
        collection: Collection,
        namespace: String,
        name: String,
        mut object: Value,
        kind: &'static str,
        changes: &broadcast::Sender<Change>,
    ) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert((collection.clone(), namespace.clone(), name), object.clone());
        let change = Change { rv: self.rv, collection, namespace, kind, object: object.clone() };
        self.history.push(change.clone());
        let _ = changes.send(change);
        object
    }

    fn delete(&mut self, collection: &str, namespace: &str, name: &str, changes: &broadcast::Sender<Change>) -> bool {
        let key = (collection.to_string(), namespace.to_string(), name.to_string());
        let Some(mut object) = self.objects.get(&key).cloned() else { return false };
        let finalizers = object["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if finalizers {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!("2026-11-23T00:00:00Z");
                self.put(key.0, key.1, key.2, object, "MODIFIED", changes);
            }
            return true;
        }
        self.objects.remove(&key);
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let uid = object["metadata"]["uid"].clone();
        let change = Change { rv: self.rv, collection: key.0, namespace: key.1, kind: "DELETED", object };
        self.history.push(change.clone());
        let _ = changes.send(change);
        // Garbage collection: objects owned by the deleted one go too.
        let owned: Vec<(Collection, String, String)> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (c, ns, n) in owned {
            self.delete(&c, &ns, &n, changes);
        }
        true
    }
}

fn plural(kind: &str) -> String {
    match kind {
        "McpEndpoint" => "mcpendpoints".into(),
        other => format!("{}s", other.to_lowercase()),
    }
}

fn address(object: &Value) -> (Collection, String, String) {
    let api_version = object["apiVersion"].as_str().unwrap_or("v1");
    let kind = object["kind"].as_str().unwrap_or_default();
    let prefix = if api_version.contains('/') { format!("/apis/{api_version}") } else { format!("/api/{api_version}") };
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    (format!("{prefix}/{}", plural(kind)), namespace, name)
}

/// A request path: collection, namespace, name, subresource.
type Target = (Collection, Option<String>, Option<String>, Option<String>);

/// Splits a request path into its target.
fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (format!("/api/{}", parts.get(1)?), &parts[2..]),
        "apis" => (format!("/apis/{}/{}", parts.get(1)?, parts.get(2)?), &parts[3..]),
        _ => return None,
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] => Some((
            format!("{prefix}/{plural}"),
            Some(ns.to_string()),
            tail.first().map(|s| s.to_string()),
            tail.get(1).map(|s| s.to_string()),
        )),
        [plural] => Some((format!("{prefix}/{plural}"), None, None, None)),
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn ok(object: Value) -> Response {
    axum::Json(object).into_response()
}

fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

async fn handle(State(port): State<Arc<Port>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let content_type =
        request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let bytes: Bytes = axum::body::to_bytes(request.into_body(), 16 << 20).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some((collection, namespace, name, subresource)) = parse(&path) else {
        return status(404, "NotFound", &format!("no route {path}"));
    };
    let kube = &port.kube;
    if method != Method::GET {
        kube.store.lock().unwrap().writes.push((port.port, method.to_string(), path.clone()));
    }
    let changes = &kube.changes;
    match (method.clone(), name) {
        (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            watch(kube, collection, namespace, since)
        }
        (Method::GET, None) => {
            let s = kube.store.lock().unwrap();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((c, ns, _), _)| *c == collection && namespace.as_ref().is_none_or(|n| n == ns))
                .map(|(_, o)| o.clone())
                .collect();
            ok(
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => {
            let s = kube.store.lock().unwrap();
            match s.objects.get(&(collection, namespace.unwrap_or_default(), name.clone())) {
                Some(o) => ok(o.clone()),
                None => status(404, "NotFound", &format!("{name} not found")),
            }
        }
        (Method::POST, None) => {
            let namespace = namespace.unwrap_or_default();
            let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let mut s = kube.store.lock().unwrap();
            if s.objects.contains_key(&(collection.clone(), namespace.clone(), name.clone())) {
                return status(409, "AlreadyExists", &format!("{name} already exists"));
            }
            let mut object = body;
            object["metadata"]["namespace"] = json!(namespace);
            s.uid += 1;
            object["metadata"]["uid"] = json!(format!("uid-{}", s.uid));
            (StatusCode::CREATED, axum::Json(s.put(collection, namespace, name, object, "ADDED", changes)))
                .into_response()
        }
        (Method::PUT, Some(name)) => {
            let namespace = namespace.unwrap_or_default();
            let mut s = kube.store.lock().unwrap();
            let key = (collection.clone(), namespace.clone(), name.clone());
            let Some(current) = s.objects.get(&key) else { return status(404, "NotFound", "not found") };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the object has been modified");
            }
            ok(s.put(collection, namespace, name, body, "MODIFIED", changes))
        }
        (Method::PATCH, Some(name)) => {
            let namespace = namespace.unwrap_or_default();
            let mut s = kube.store.lock().unwrap();
            let key = (collection.clone(), namespace.clone(), name.clone());
            let existing = s.objects.get(&key).cloned();
            let apply = content_type.starts_with("application/apply-patch");
            let mut object = match (existing, apply, subresource.as_deref()) {
                (None, true, None) => {
                    let mut o = body.clone();
                    s.uid += 1;
                    o["metadata"]["uid"] = json!(format!("uid-{}", s.uid));
                    o
                }
                (None, _, _) => return status(404, "NotFound", &format!("{name} not found")),
                (Some(mut o), true, Some("status")) => {
                    o["status"] = body["status"].clone();
                    o
                }
                (Some(mut o), true, _) => {
                    for field in ["data", "type", "spec"] {
                        if !body[field].is_null() {
                            o[field] = body[field].clone();
                        }
                    }
                    for field in ["labels", "ownerReferences", "annotations"] {
                        if !body["metadata"][field].is_null() {
                            o["metadata"][field] = body["metadata"][field].clone();
                        }
                    }
                    o
                }
                (Some(mut o), false, _) => {
                    let expected = &body["metadata"]["resourceVersion"];
                    if !expected.is_null() && *expected != o["metadata"]["resourceVersion"] {
                        return status(409, "Conflict", "the object has been modified");
                    }
                    merge(&mut o, &body);
                    o
                }
            };
            object["metadata"]["namespace"] = json!(namespace);
            let finalized = !object["metadata"]["deletionTimestamp"].is_null()
                && object["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
            let stored = s.put(collection.clone(), namespace.clone(), name.clone(), object, "MODIFIED", changes);
            if finalized {
                s.delete(&collection, &namespace, &name, changes);
            }
            ok(stored)
        }
        (Method::DELETE, Some(name)) => {
            let mut s = kube.store.lock().unwrap();
            if s.delete(&collection, &namespace.unwrap_or_default(), &name, changes) {
                ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
            } else {
                status(404, "NotFound", "not found")
            }
        }
        _ => status(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

/// A watch: replays changes after `since`, then streams new ones as JSON lines.
fn watch(kube: &FakeKube, collection: Collection, namespace: Option<String>, since: u64) -> Response {
    let receiver = kube.changes.subscribe();
    let replay: Vec<Change> = {
        let s = kube.store.lock().unwrap();
        s.history.iter().filter(|c| c.rv > since).cloned().collect()
    };
    let last = replay.last().map_or(since, |c| c.rv);
    let wanted = move |c: &Change| c.collection == collection && namespace.as_ref().is_none_or(|n| *n == c.namespace);
    let line = |c: &Change| {
        let mut text = serde_json::to_vec(&json!({"type": c.kind, "object": c.object})).unwrap();
        text.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(text))
    };
    let first: Vec<_> = replay.iter().filter(|c| wanted(c)).map(line).collect();
    let rest = futures::stream::unfold((receiver, last), move |(mut rx, last)| {
        let wanted = wanted.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.rv > last && wanted(&c) => {
                        let mut text = serde_json::to_vec(&json!({"type": c.kind, "object": c.object})).unwrap();
                        text.push(b'\n');
                        let rv = c.rv;
                        return Some((Ok::<_, std::io::Error>(Bytes::from(text)), (rx, rv)));
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::iter(first), rest);
    Response::builder().header("content-type", "application/json").body(Body::from_stream(stream)).unwrap()
}
