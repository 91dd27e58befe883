//! Upstream connections: one live client per Connection of the current snapshot, kept in step
//! with the snapshot (added, replaced when their settings change, dropped when removed).

pub mod held_calls;
pub mod legacy_calls;
pub mod mcp;
pub mod notifications;
pub mod task_runs;
pub mod upstream_http;

use portcullis_crds::Snapshot;
use portcullis_crds::snapshot::Upstream;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub use legacy_calls::{AskClient, ClientSessions, Refused};
pub use mcp::{CallError, CallerMeta, ClientSession, ConnectionHealth, McpUpstream};
pub use notifications::NotificationSink;

/// All upstream connections, by (tenant, connection name).
pub struct Upstreams {
    http: reqwest::Client,
    changes: crate::changes::Changes,
    client_sessions: ClientSessions,
    connections: RwLock<HashMap<(String, String), Arc<McpUpstream>>>,
}

impl Upstreams {
    /// An empty registry; `sync` fills it from a snapshot.
    pub fn new(http: reqwest::Client, changes: crate::changes::Changes, client_sessions: ClientSessions) -> Self {
        Self { http, changes, client_sessions, connections: RwLock::default() }
    }

    /// Makes the live connections match the snapshot's.
    pub fn sync(&self, snapshot: &Snapshot) {
        let mut wanted: HashMap<(String, String), Upstream> = HashMap::new();
        for (tenant_name, tenant) in &snapshot.tenants {
            for (name, connection) in &tenant.connections {
                wanted.insert((tenant_name.clone(), name.clone()), connection.upstream.clone());
            }
        }
        let mut connections = self.connections.write().unwrap_or_else(|e| e.into_inner());
        connections.retain(|key, existing| wanted.get(key).is_some_and(|u| existing.upstream() == u));
        for (key, upstream) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = connections.entry(key) {
                let (tenant, name) = slot.key().clone();
                slot.insert(McpUpstream::start(
                    tenant,
                    name,
                    upstream,
                    self.http.clone(),
                    self.changes.clone(),
                    self.client_sessions.clone(),
                ));
            }
        }
    }

    /// Every live connection with its (tenant, name).
    pub fn all(&self) -> Vec<((String, String), Arc<McpUpstream>)> {
        let connections = self.connections.read().unwrap_or_else(|e| e.into_inner());
        connections.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The live connection `name` of `tenant`.
    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<McpUpstream>> {
        let connections = self.connections.read().unwrap_or_else(|e| e.into_inner());
        connections.get(&(tenant.to_string(), name.to_string())).cloned()
    }
}

/// The HTTP client for upstreams (and the identity provider). No automatic retries: reqwest
/// would otherwise copy every request's headers in case it must replay it, and a tool call is
/// not something to replay behind the caller's back.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .build()
}
