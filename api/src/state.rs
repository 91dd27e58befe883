//! Shared state of the HTTP server: the current snapshot (swapped atomically), upstreams,
//! sessions, limits and the audit log.

use crate::audit::AuditLog;
use crate::connectors::Upstreams;
use crate::limits::RateLimiter;
use crate::sessions::SessionStore;
use chrono::{DateTime, Utc};
use portcullis_crds::Snapshot;
use portcullis_store::config_store::{ChangelogEntry, summarize};
use std::sync::Arc;
use tokio::sync::watch;

/// A snapshot as loaded by this process.
pub struct Loaded {
    /// Version, increasing with every successful load.
    pub version: u64,
    /// The compiled configuration.
    pub snapshot: Snapshot,
    /// When this process loaded it.
    pub loaded_at: DateTime<Utc>,
}

/// Settings of the HTTP server.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Largest page of tools/list.
    pub page_size: usize,
}

/// Cheap to clone; one per process.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What `AppState` holds.
pub struct Inner {
    /// The current snapshot; `None` until the first successful load.
    pub snapshot: watch::Sender<Option<Arc<Loaded>>>,
    /// Live upstream connections.
    pub upstreams: Upstreams,
    /// 2025-protocol sessions.
    pub sessions: std::sync::Arc<dyn SessionStore>,
    /// Rate limits.
    pub limits: Box<dyn RateLimiter>,
    /// Idempotency keys.
    pub idempotency: Box<dyn crate::idempotency::IdempotencyStore>,
    /// Audit queue.
    pub audit: AuditLog,
    /// Server settings.
    pub settings: ServerSettings,
    /// Shared backends whose health decides readiness (production only).
    pub backends: Option<Backends>,
    /// Verifier of the organisation's OIDC tokens, when an issuer is configured.
    pub oidc: Option<Arc<crate::oidc::OidcVerifier>>,
    /// Keys minted over REST.
    pub rest_keys: Option<Arc<crate::rest_keys::RestKeys>>,
    /// Seals the `requestState` of `input_required` results (shared by replicas).
    pub request_state_key: portcullis_store::secret_box::SecretKey,
    /// Requests sent to 2025 clients on a request's stream, waiting for the client's answer.
    pub client_replies: crate::mcp::relay::PendingReplies,
    /// Requests of 2025 sessions in progress here, which the client may cancel.
    pub in_flight: crate::mcp::relay::InFlight,
    /// 2025 sessions' resource subscriptions this replica follows upstream.
    pub followed: crate::mcp::subscriptions::Followed,
    /// Changes that listen streams turn into list_changed notifications.
    pub changes: crate::changes::Changes,
    /// Portcullis's OAuth authorization server, when configured.
    pub oauth: Option<Arc<crate::oauth::AuthServer>>,
    /// Versions loaded by this process, for the changelog of dev mode (production reads the
    /// published versions from Postgres).
    pub history: std::sync::Mutex<Vec<ChangelogEntry>>,
}

/// Versions the in-memory changelog keeps.
const HISTORY_LIMIT: usize = 1000;

/// Postgres and Redis of the production data plane.
pub struct Backends {
    /// Postgres.
    pub postgres: sqlx::PgPool,
    /// Redis.
    pub redis: redis::aio::ConnectionManager,
    /// Whether the pod is unready without Redis (`--when-redis-down closed`); with `local` the
    /// pod keeps serving what does not need Redis.
    pub redis_required: bool,
}

impl Backends {
    /// Why the pod is not ready, if a backend does not answer within a second.
    pub async fn unavailable(&self) -> Option<&'static str> {
        let limit = std::time::Duration::from_secs(1);
        let pg = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&self.postgres)).await;
        if !matches!(pg, Ok(Ok(_))) {
            return Some("Postgres does not answer");
        }
        if !self.redis_required {
            return None;
        }
        let mut redis = self.redis.clone();
        let ping = tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(&mut redis)).await;
        if !matches!(ping, Ok(Ok(_))) {
            return Some("Redis does not answer");
        }
        None
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Wraps the parts.
    pub fn new(inner: Inner) -> Self {
        let state = Self(Arc::new(inner));
        // Not holding the state: background work must not keep it (and its audit writer) alive.
        tokio::spawn(crate::mcp::relay::deliver_forwarded(Arc::downgrade(&state.0)));
        tokio::spawn(crate::mcp::subscriptions::sweep(Arc::downgrade(&state.0)));
        state
    }

    /// What authentication consults besides the snapshot.
    pub fn credentials(&self) -> crate::identity::Credentials<'_> {
        crate::identity::Credentials {
            oidc: self.oidc.as_deref(),
            rest_keys: self.rest_keys.as_deref(),
            oauth: self.oauth.as_deref(),
        }
    }

    /// The snapshot requests should run on, if one is loaded.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.snapshot.borrow().clone()
    }

    /// Swaps in a new snapshot and brings upstream connections in line with it.
    pub fn install(&self, version: u64, snapshot: Snapshot) {
        self.upstreams.sync(&snapshot);
        // Tenants whose compiled configuration differs: their callers may see other tools.
        if let Some(previous) = self.current() {
            let names: std::collections::BTreeSet<&String> =
                previous.snapshot.tenants.keys().chain(snapshot.tenants.keys()).collect();
            for name in names {
                if previous.snapshot.tenants.get(name) != snapshot.tenants.get(name) {
                    self.changes.announce(name);
                }
            }
        }
        if self.backends.is_none() {
            let previous = self.current();
            let summary = summarize(previous.as_ref().map(|l| &l.snapshot), &snapshot);
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            history.push(ChangelogEntry {
                version: version.try_into().unwrap_or(i64::MAX),
                digest: snapshot.digest.clone(),
                source: "manifests".into(),
                created_at: Utc::now(),
                summary,
            });
            if history.len() > HISTORY_LIMIT {
                history.remove(0);
            }
        }
        self.snapshot.send_replace(Some(Arc::new(Loaded { version, snapshot, loaded_at: Utc::now() })));
    }
}
