//! A fake Kubernetes API server for tests (the kube-rs `tower-test` pattern): every request is
//! recorded and answered like an API server would, with the object it names or the body sent.
//! Enabled for this crate's tests and, with the `testing` feature, for the end-to-end tests.

use crate::controller::World;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use portcullis_crds::{Object, parse_manifests};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One request the operator sent.
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// URL query.
    pub query: String,
    /// JSON body (Null when none).
    pub body: Value,
}

/// A fake API server: answers every request with the object it names (or the body it was
/// sent), and records the requests in order in `log` and `calls`.
pub fn fake_apiserver(world: &World, log: Arc<Mutex<Vec<String>>>) -> (Client, Arc<Mutex<Vec<Call>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let mut objects: BTreeMap<String, Value> = BTreeMap::new();
    let mut put = |plural: &str, m: &kube::api::ObjectMeta, v: Value| {
        let path = format!(
            "/apis/portcullis.dev/v1alpha1/namespaces/{}/{plural}/{}",
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default()
        );
        objects.insert(path, v);
    };
    for o in &world.personas {
        put("personas", &o.metadata, serde_json::to_value(o.as_ref()).unwrap());
    }
    for o in &world.connections {
        put("connections", &o.metadata, serde_json::to_value(o.as_ref()).unwrap());
    }
    for o in &world.endpoints {
        put("mcpendpoints", &o.metadata, serde_json::to_value(o.as_ref()).unwrap());
    }
    for o in &world.apikeys {
        put("apikeys", &o.metadata, serde_json::to_value(o.as_ref()).unwrap());
    }
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(format!("{method} {path}"));
            recorded.lock().unwrap().push(Call { method, path: path.clone(), query, body: body.clone() });
            let answer = objects.get(path.trim_end_matches("/status")).cloned().unwrap_or(body);
            send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap());
        }
    });
    (Client::new(service, "default"), calls)
}

/// A world from manifests; ApiKeys get a uid and a resourceVersion like stored objects.
pub fn world(yaml: &str) -> World {
    let (objects, problems) = parse_manifests("t.yaml", yaml);
    assert!(problems.is_empty(), "{problems:?}");
    let mut w = World::default();
    for (i, o) in objects.into_iter().enumerate() {
        match o {
            Object::Persona(mut p) => {
                p.metadata.generation = Some(3);
                w.personas.push(Arc::new(p));
            }
            Object::Connection(c) => w.connections.push(Arc::new(c)),
            Object::McpEndpoint(e) => w.endpoints.push(Arc::new(e)),
            Object::ApiKey(mut k) => {
                k.metadata.uid = Some(format!("uid-{i}"));
                k.metadata.resource_version = Some("41".into());
                w.apikeys.push(Arc::new(k));
            }
            Object::Secret(s) => w.secrets.push(Arc::new(s)),
        }
    }
    w
}
