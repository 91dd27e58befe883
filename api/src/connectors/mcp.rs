//! Portcullis as an MCP client of one upstream server over Streamable HTTP.
//!
//! This is the only module that touches rmcp's client. It speaks the newest protocol the
//! upstream supports (2026-07-28 via `server/discover`, falling back to the 2025 `initialize`
//! handshake), keeps the tool catalog fresh (on `list_changed` and on a timer), reconnects after
//! failures with backoff, and reports health.

use super::held_calls::{self, HeldCalls};
use super::notifications::NotificationSink;
use super::upstream_http::{self, UpstreamHttp};
use crate::mcp::protocol::{
    META_CLIENT_CAPABILITIES, META_CLIENT_INFO, META_LOG_LEVEL, META_PROTOCOL_VERSION, MODERN_VERSION,
    encode_header_value,
};
use chrono::{DateTime, Utc};
use portcullis_crds::snapshot::Upstream;
use rmcp::ClientHandler;
use rmcp::model::{
    ClientCapabilities, ClientConfig, ClientRequest, Implementation, PingRequest, Prompt, ProtocolVersion, Resource,
    ResourceTemplate, ServerCapabilities, ServerNotification, SubscriptionFilter, Tool,
};
use rmcp::service::{
    ClientCacheConfig, ClientInitializeError, ClientLifecycleMode, ClientServiceExt, NotificationContext, RoleClient,
    RunningService, ServiceError,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Mutex, Notify};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const LIST_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
// 2025 sessions can die silently (an upstream restart, an idle timeout); some servers then answer
// with an error rmcp cannot tie to the request, which would leave calls hanging. A ping finds out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Health of an upstream as this process observes it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectionHealth {
    /// `unknown` (not yet contacted), `healthy` or `unhealthy`.
    pub health: String,
    /// Protocol version spoken with the upstream, once connected.
    pub protocol_version: Option<String>,
    /// Tools in the last catalog fetched.
    pub tool_count: usize,
    /// Why the last contact failed.
    pub last_error: Option<String>,
    /// When the catalog was last fetched.
    pub catalog_fetched_at: Option<DateTime<Utc>>,
    /// Resources this process follows upstream for subscribed callers.
    pub subscribed_resources: usize,
}

/// What an upstream request carries of the caller's own request metadata (2026-07-28 `_meta`).
#[derive(Clone, Debug, Default)]
pub struct CallerMeta {
    /// The caller's declared client capabilities (what an `input_required` may ask for).
    pub client_capabilities: Option<serde_json::Value>,
    /// The caller's requested log level.
    pub log_level: Option<String>,
    /// Where notifications about the request (progress, log messages) go, when the caller has
    /// a stream to receive them.
    pub notifications: Option<NotificationSink>,
    /// Who answers a 2025 upstream's requests for client input during the request.
    pub ask_client: Option<Arc<dyn super::legacy_calls::AskClient>>,
    /// The caller's 2025 session, when it has one: a 2025 upstream is asked on an upstream
    /// session of that client's own.
    pub client_session: Option<ClientSession>,
}

/// A 2025 client session, as far as upstream requests made for it need to know.
#[derive(Clone, Debug)]
pub struct ClientSession {
    /// Its `Mcp-Session-Id` at Portcullis.
    pub id: String,
    /// What its client declared it can be asked, at initialize.
    pub capabilities: Option<serde_json::Value>,
}

/// How one request to a 2026-07-28 upstream broke.
enum Broken {
    /// The upstream could not be reached (or a proxy says it is gone).
    Unreachable(String),
    /// The upstream answered this request with something that is no answer.
    Failed(String),
}

/// Why a tool call did not produce an upstream result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The upstream did not answer in time; the call was cancelled upstream.
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The upstream cannot be reached or its session failed.
    #[error("the upstream is unavailable: {0}")]
    Unavailable(String),
    /// The upstream answered with a JSON-RPC error.
    #[error("the upstream refused the call: {}", .0.message)]
    Rpc(rmcp::ErrorData),
}

/// Receives the upstream's notifications.
#[derive(Clone)]
struct Listener {
    catalog_changed: Arc<Notify>,
    changes: crate::changes::Changes,
    tenant: String,
    connection: String,
}

impl ClientHandler for Listener {
    async fn on_resource_updated(
        &self,
        params: rmcp::model::ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.changes.announce_updated(&self.tenant, &self.connection, &params.uri);
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.catalog_changed.notify_one();
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.catalog_changed.notify_one();
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.catalog_changed.notify_one();
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("portcullis", env!("CARGO_PKG_VERSION")))
    }
}

/// Everything an upstream offers, as last fetched (the upstream's own names and URIs).
#[derive(Debug, Default, PartialEq)]
pub struct Catalog {
    /// Tools.
    pub tools: Vec<Tool>,
    /// Concrete resources.
    pub resources: Vec<Resource>,
    /// Resource templates (RFC 6570 URI templates).
    pub templates: Vec<ResourceTemplate>,
    /// Prompts.
    pub prompts: Vec<Prompt>,
    /// Whether the upstream answers `completion/complete`.
    pub completions: bool,
    /// Whether the upstream offers resource subscriptions.
    pub subscribe: bool,
    /// Whether the upstream offers the tasks extension (only over 2026-07-28).
    pub tasks: bool,
}

struct State {
    health: portcullis_crds::kinds::Health,
    protocol_version: Option<String>,
    last_error: Option<String>,
    catalog: Arc<Catalog>,
    catalog_fetched_at: Option<DateTime<Utc>>,
}

/// One upstream MCP server and its background refresher.
pub struct McpUpstream {
    /// Tenant of the Connection.
    pub tenant: String,
    /// Connection name.
    pub name: String,
    upstream: Upstream,
    transport: Arc<Transport>,
    changes: crate::changes::Changes,
    next_id: std::sync::atomic::AtomicU64,
    live: Mutex<Option<Arc<RunningService<RoleClient, Listener>>>>,
    state: RwLock<State>,
    catalog_changed: Arc<Notify>,
    // Requests to a 2025 upstream, each on its own stream.
    legacy: Arc<super::legacy_calls::LegacyCalls>,
    // Calls to a 2025 upstream waiting for a 2026-07-28 client's input.
    held: HeldCalls,
    // Calls to a 2025 upstream that Portcullis runs as tasks.
    runs: super::task_runs::TaskRuns,
    // Retries of calls held on other replicas, waiting for the holder's messages.
    exchanges: Arc<std::sync::Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<serde_json::Value>>>>,
    // Upstream URIs callers subscribed to, each with its number of subscriptions.
    subscriptions: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    tasks: RwLock<Vec<tokio::task::AbortHandle>>,
    // The `subscriptions/listen` stream of a 2026-07-28 upstream, while connected.
    change_listener: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    // True once the first catalog fetch has succeeded or failed.
    first_attempt: tokio::sync::watch::Sender<bool>,
}

impl Drop for McpUpstream {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            task.abort();
        }
        self.stop_change_listener();
        self.runs.stop_all();
    }
}

impl McpUpstream {
    /// Creates the connection and starts refreshing its catalog in the background.
    pub fn start(
        tenant: String,
        name: String,
        upstream: Upstream,
        http: reqwest::Client,
        changes: crate::changes::Changes,
        client_sessions: super::legacy_calls::ClientSessions,
    ) -> Arc<Self> {
        let catalog_changed = Arc::new(Notify::new());
        let transport = Arc::new(Transport::new(http, &upstream));
        let legacy = super::legacy_calls::LegacyCalls::new(
            transport.clone(),
            super::legacy_calls::Announcements {
                catalog_changed: catalog_changed.clone(),
                changes: changes.clone(),
                tenant: tenant.clone(),
                connection: name.clone(),
            },
            client_sessions,
        );
        let this = Arc::new(Self {
            tenant,
            name,
            upstream,
            transport,
            changes,
            next_id: std::sync::atomic::AtomicU64::new(1),
            live: Mutex::new(None),
            state: RwLock::new(State {
                health: portcullis_crds::kinds::Health::Unknown,
                protocol_version: None,
                last_error: None,
                catalog: Arc::default(),
                catalog_fetched_at: None,
            }),
            catalog_changed,
            legacy,
            held: HeldCalls::default(),
            runs: super::task_runs::TaskRuns::default(),
            exchanges: Arc::default(),
            subscriptions: std::sync::Mutex::default(),
            tasks: RwLock::new(Vec::new()),
            change_listener: std::sync::Mutex::new(None),
            first_attempt: tokio::sync::watch::channel(false).0,
        });
        // The task holds only a weak reference, so dropping the connection ends it.
        let refresher = tokio::spawn(refresh_loop(Arc::downgrade(&this))).abort_handle();
        let keepalive = tokio::spawn(keepalive_loop(Arc::downgrade(&this))).abort_handle();
        let held_relay = tokio::spawn(held_relay_loop(Arc::downgrade(&this), this.changes.subscribe())).abort_handle();
        *this.tasks.write().unwrap_or_else(|e| e.into_inner()) = vec![refresher, keepalive, held_relay];
        this
    }

    /// Waits (at most `limit`) until the first catalog fetch has finished, so that the first
    /// requests after a start or reload see the upstream's tools instead of an empty list.
    pub async fn wait_first_attempt(&self, limit: Duration) {
        let mut done = self.first_attempt.subscribe();
        let _ = tokio::time::timeout(limit, done.wait_for(|d| *d)).await;
    }

    /// The settings this connection was started with.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The last catalog fetched (the upstream's own names and URIs).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.read_state().catalog.clone()
    }

    /// Whether the upstream is known to be unreachable (its last contact failed).
    pub fn is_down(&self) -> bool {
        self.read_state().health == portcullis_crds::kinds::Health::Unhealthy
    }

    /// Health as observed.
    pub fn health(&self) -> ConnectionHealth {
        let s = self.read_state();
        ConnectionHealth {
            health: format!("{:?}", s.health).to_lowercase(),
            protocol_version: s.protocol_version.clone(),
            tool_count: s.catalog.tools.len(),
            last_error: s.last_error.clone(),
            catalog_fetched_at: s.catalog_fetched_at,
            subscribed_resources: self.subscribed().len(),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The upstream's URL.
    pub fn url(&self) -> &str {
        let Upstream::Mcp { url, .. } = &self.upstream;
        url
    }

    /// Whether the upstream is spoken to in 2026-07-28 (as far as this process knows now).
    pub fn speaks_modern(&self) -> bool {
        self.read_state().protocol_version.as_deref() == Some(MODERN_VERSION)
    }

    fn refresh_interval(&self) -> Duration {
        let Upstream::Mcp { refresh_interval_seconds, .. } = &self.upstream;
        Duration::from_secs(u64::from(*refresh_interval_seconds))
    }

    fn transport(&self) -> Result<StreamableHttpClientTransport<reqwest::Client>, String> {
        let Upstream::Mcp { url, headers, .. } = &self.upstream;
        let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
        let mut custom = HashMap::new();
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("authorization")
                && let Some(token) = value.expose().strip_prefix("Bearer ")
            {
                config = config.auth_header(token.to_string());
                continue;
            }
            let name =
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))?;
            let value =
                http::HeaderValue::from_str(value.expose()).map_err(|_| format!("invalid value for header {name}"))?;
            custom.insert(name, value);
        }
        Ok(StreamableHttpClientTransport::with_client(self.transport.http.clone(), config.custom_headers(custom)))
    }

    async fn handshake(
        &self,
        lifecycle: ClientLifecycleMode,
    ) -> Result<RunningService<RoleClient, Listener>, ClientInitializeError> {
        let listener = Listener {
            catalog_changed: self.catalog_changed.clone(),
            changes: self.changes.clone(),
            tenant: self.tenant.clone(),
            connection: self.name.clone(),
        };
        let transport = self.transport().map_err(ClientInitializeError::ConnectionClosed)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, listener.serve_with_lifecycle(transport, lifecycle)).await {
            Ok(result) => result,
            Err(_) => Err(ClientInitializeError::ConnectionClosed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        }
    }

    async fn connect(&self) -> Result<Arc<RunningService<RoleClient, Listener>>, String> {
        let auto = ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            legacy_version: Some(ProtocolVersion::V_2025_11_25),
        };
        let service = match self.handshake(auto).await {
            Ok(service) => service,
            // A server that answers discovery but lists only 2025 versions is served through
            // the initialize handshake, at the newest version it offers.
            Err(ClientInitializeError::NoCompatibleProtocolVersion { server_supported, .. })
                if server_supported.iter().any(|v| v.has_initialize()) =>
            {
                self.handshake(ClientLifecycleMode::Initialize)
                    .await
                    .map_err(|e| format!("cannot initialize a session with {}: {}", self.url(), root_cause(&e)))?
            }
            Err(e) => return Err(format!("cannot connect to {}: {}", self.url(), root_cause(&e))),
        };
        // Portcullis keeps its own catalog; rmcp's response cache would only add staleness.
        service.peer().set_response_cache_config(ClientCacheConfig::disabled()).await;
        self.listen_for_changes(&service);
        // A new 2025 session starts without the subscriptions the last one had.
        if service.peer().peer_info().is_some_and(|info| info.protocol_version.has_initialize()) {
            for uri in self.subscribed() {
                if let Ok(request) = client_request("resources/subscribe", serde_json::json!({ "uri": uri })) {
                    let _ = tokio::time::timeout(LIST_TIMEOUT, service.peer().send_request(request)).await;
                }
            }
        }
        let protocol = service.peer().peer_info().map(|info| info.protocol_version.to_string());
        tracing::info!(tenant = %self.tenant, connection = %self.name, protocol = ?protocol, "Connected to upstream");
        self.write_state().protocol_version = protocol;
        Ok(Arc::new(service))
    }

    /// The live client, connecting (or reconnecting after a failure) when needed.
    async fn live(&self) -> Result<Arc<RunningService<RoleClient, Listener>>, String> {
        let mut live = self.live.lock().await;
        if let Some(service) = live.as_ref()
            && !service.peer().is_transport_closed()
        {
            return Ok(service.clone());
        }
        *live = None;
        let service = self.connect().await.inspect_err(|e| self.mark_unhealthy(e.clone()))?;
        *live = Some(service.clone());
        Ok(service)
    }

    fn mark_unhealthy(&self, error: String) {
        let mut state = self.write_state();
        let went_down = state.health != portcullis_crds::kinds::Health::Unhealthy;
        if went_down {
            tracing::warn!(tenant = %self.tenant, connection = %self.name, %error, "Upstream unhealthy");
        }
        state.health = portcullis_crds::kinds::Health::Unhealthy;
        state.last_error = Some(error);
        drop(state);
        if went_down {
            // Its tools, resources and prompts drop out of lists (or its endpoints close).
            self.changes.announce(&self.tenant);
        }
    }

    fn mark_healthy(&self) {
        let mut state = self.write_state();
        let came_back = state.health == portcullis_crds::kinds::Health::Unhealthy;
        if came_back {
            tracing::info!(tenant = %self.tenant, connection = %self.name, "Upstream healthy again");
        }
        state.health = portcullis_crds::kinds::Health::Healthy;
        state.last_error = None;
        drop(state);
        if came_back {
            self.changes.announce(&self.tenant);
        }
    }

    async fn forget_live(&self) {
        *self.live.lock().await = None;
        self.stop_change_listener();
    }

    fn stop_change_listener(&self) {
        if let Some(task) = self.change_listener.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    /// A 2026-07-28 upstream announces tool changes on a `subscriptions/listen` stream (2025
    /// upstreams use the session's GET stream, which rmcp keeps and hands to `Listener`).
    fn listen_for_changes(&self, service: &RunningService<RoleClient, Listener>) {
        let Some(info) = service.peer().peer_info() else { return };
        let capabilities = &info.capabilities;
        let tools = capabilities.tools.as_ref().and_then(|t| t.list_changed) == Some(true);
        let resources = capabilities.resources.as_ref().and_then(|r| r.list_changed) == Some(true);
        let prompts = capabilities.prompts.as_ref().and_then(|p| p.list_changed) == Some(true);
        let subscribed: Vec<String> = if capabilities.resources.as_ref().and_then(|r| r.subscribe) == Some(true) {
            self.subscribed()
        } else {
            Vec::new()
        };
        if info.protocol_version.has_initialize() || !(tools || prompts || resources || !subscribed.is_empty()) {
            return;
        }
        let peer = service.peer().clone();
        let changed = self.catalog_changed.clone();
        let (changes, tenant, connection) = (self.changes.clone(), self.tenant.clone(), self.name.clone());
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            while !peer.is_transport_closed() {
                let mut filter = SubscriptionFilter::builder();
                if tools {
                    filter = filter.tools_list_changed();
                }
                if resources {
                    filter = filter.resources_list_changed();
                }
                if prompts {
                    filter = filter.prompts_list_changed();
                }
                if !subscribed.is_empty() {
                    filter = filter.resource_subscriptions(subscribed.iter().cloned());
                }
                if let Ok(mut subscription) = peer.listen(filter.build()).await {
                    backoff = Duration::from_secs(1);
                    while let Ok(Some(notification)) = subscription.next().await {
                        match notification {
                            ServerNotification::ToolListChangedNotification(_)
                            | ServerNotification::ResourceListChangedNotification(_)
                            | ServerNotification::PromptListChangedNotification(_) => changed.notify_one(),
                            ServerNotification::ResourceUpdatedNotification(update) => {
                                changes.announce_updated(&tenant, &connection, &update.params.uri);
                            }
                            _ => {}
                        }
                    }
                    // Changes may have been missed while the stream was down.
                    changed.notify_one();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        if let Some(previous) =
            self.change_listener.lock().unwrap_or_else(|e| e.into_inner()).replace(task.abort_handle())
        {
            previous.abort();
        }
    }

    /// Pings a 2025 session; when it does not answer, drops it so the next use starts a new one.
    async fn keepalive(&self) {
        let Some(service) = self.live.lock().await.clone() else { return };
        let stateful = service.peer().peer_info().is_some_and(|info| info.protocol_version.has_initialize());
        if !stateful {
            // 2026-07-28 has neither sessions nor ping.
            return;
        }
        let ping =
            ClientRequest::PingRequest(PingRequest { method: Default::default(), extensions: Default::default() });
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, service.peer().send_request(ping)).await {
            Ok(Ok(_)) | Ok(Err(ServiceError::McpError(_))) => {}
            Ok(Err(e)) => self.session_lost(root_cause(&e)).await,
            Err(_) => {
                self.session_lost(format!("the session did not answer a ping within {KEEPALIVE_TIMEOUT:?}")).await
            }
        }
    }

    async fn session_lost(&self, error: String) {
        self.mark_unhealthy(error);
        self.forget_live().await;
        self.catalog_changed.notify_one();
    }

    /// Fetches the whole catalog (tools, and resources, templates and prompts when the upstream
    /// offers them), following pagination. One failed list fails the whole refresh: a partial
    /// catalog would make things vanish from lists.
    pub async fn refresh(&self) -> Result<(), String> {
        let service = self.live().await?;
        let (capabilities, version) = service
            .peer()
            .peer_info()
            .map(|info| (info.capabilities.clone(), info.protocol_version.clone()))
            .unwrap_or_default();
        let result = tokio::time::timeout(LIST_TIMEOUT, fetch_catalog(service.peer(), &capabilities, &version)).await;
        let catalog = match result {
            Ok(Ok(catalog)) => catalog,
            Ok(Err(error)) => {
                self.mark_unhealthy(error.clone());
                self.forget_live().await;
                return Err(error);
            }
            Err(_) => {
                let error = format!("listing the catalog did not finish within {LIST_TIMEOUT:?}");
                self.mark_unhealthy(error.clone());
                self.forget_live().await;
                return Err(error);
            }
        };
        self.mark_healthy();
        let changed = {
            let mut state = self.write_state();
            let old = &state.catalog;
            let changed = crate::changes::Lists {
                tools: old.tools != catalog.tools,
                resources: old.resources != catalog.resources || old.templates != catalog.templates,
                prompts: old.prompts != catalog.prompts,
            };
            let first = state.catalog_fetched_at.is_none();
            state.catalog = Arc::new(catalog);
            state.catalog_fetched_at = Some(Utc::now());
            Some(changed).filter(|c| !first && c.any())
        };
        if let Some(lists) = changed {
            // Listen streams of this tenant tell their clients to list again what changed.
            self.changes.announce_lists(&self.tenant, lists);
        }
        Ok(())
    }

    /// Calls an upstream tool (by the upstream's own name), cancelling it after `timeout`.
    /// `extra` carries the other params of the caller's request (a retry's `inputResponses`
    /// and the upstream's `requestState`).
    pub async fn call(
        &self,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        extra: serde_json::Map<String, serde_json::Value>,
        caller: &CallerMeta,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        let mut params = extra;
        params.insert("name".into(), tool.into());
        params.insert("arguments".into(), serde_json::Value::Object(arguments.unwrap_or_default()));
        self.request("tools/call", params, caller, timeout).await
    }

    /// Sends one request (`tools/call`, `resources/read`, `prompts/get`, `completion/complete`…)
    /// with `params` in the upstream's own names, cancelling it after `timeout`; the upstream's
    /// result comes back as JSON.
    pub async fn request(
        &self,
        method: &str,
        mut params: serde_json::Map<String, serde_json::Value>,
        caller: &CallerMeta,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        if method.starts_with("tasks/")
            && params.get("taskId").and_then(serde_json::Value::as_str).is_some_and(super::task_runs::is_run)
        {
            return self.run_request(method, params).await;
        }
        // A 2026-07-28 upstream needs no session: one plain POST, its JSON relayed as is
        // (no decoding into typed results and re-encoding on the hot path).
        if self.speaks_modern() {
            return self.request_direct(method, params, caller, timeout).await;
        }
        // A 2025 session has neither request state nor input responses: a retry continues a
        // call held for a 2026-07-28 client (see `held_calls`).
        let responses = params.remove("inputResponses");
        let state = params.remove("requestState");
        params.remove("_meta");
        let multi_round = matches!(method, "tools/call" | "prompts/get" | "resources/read");
        if let Some(handle) =
            state.as_ref().and_then(serde_json::Value::as_str).and_then(HeldCalls::handle).filter(|_| multi_round)
        {
            let outcome = match self.held.resume(handle, responses.as_ref(), timeout).await {
                Some(outcome) => Some(outcome),
                // Another replica may hold it.
                None => self.resume_elsewhere(handle, responses.as_ref(), timeout).await,
            };
            let outcome = outcome.ok_or_else(|| {
                CallError::Rpc(rmcp::ErrorData::invalid_params(
                    "requestState names a call that has ended; call again",
                    None,
                ))
            })?;
            return self.held_outcome(outcome, timeout).await;
        }
        let preferred = self.read_state().protocol_version.clone();
        // A 2026-07-28 caller declares its capabilities per request and has no stream to be asked
        // on: the upstream's requests for input reach it through a held call or a task run. The
        // capabilities choose the upstream session (one declaring what this client can answer)
        // and are checked against each request for input.
        let declared = caller.client_capabilities.as_ref().filter(|_| caller.ask_client.is_none());
        // A tool the connection runs as a task: a task for a caller that takes tasks; one that
        // runs only as a task refuses the others.
        let Upstream::Mcp { run_as_tasks, .. } = &self.upstream;
        let task_tool = params
            .get("name")
            .and_then(serde_json::Value::as_str)
            .filter(|name| method == "tools/call" && !self.speaks_modern() && run_as_tasks.runs(name));
        if let Some(tool) = task_tool {
            let required = run_as_tasks.requires(tool);
            match declared.filter(|d| crate::mcp::tasks::declared(Some(d))) {
                None if required => {
                    let mut refused = crate::mcp::tasks::missing_extension_error();
                    refused.message =
                        "This tool runs only as a task: declare the io.modelcontextprotocol/tasks extension".into();
                    return Err(CallError::Rpc(refused));
                }
                None => {}
                Some(declared) => {
                    if !self.runs.is_full() && run_as_tasks.input_first(tool) {
                        // Its input first, then its task.
                        let call = self.asking_call("tools/call", params, caller, preferred);
                        let runs = self.runs.clone();
                        let outcome =
                            self.held.start_before_task(declared.clone(), call, runs, responses, timeout).await;
                        return self.held_outcome(outcome, timeout).await;
                    }
                    let call = self.asking_call("tools/call", params.clone(), caller, preferred.clone());
                    if let Some(created) = self.runs.start(declared.clone(), call) {
                        return Ok(created);
                    }
                    // This replica runs as many as it keeps: others run as plain calls, except
                    // those that run only as tasks.
                    if required {
                        return Err(CallError::Unavailable("too many tasks running on this replica".into()));
                    }
                }
            }
        }
        if let Some(declared) = declared {
            let call = self.asking_call(method, params, caller, preferred);
            let outcome = self.held.start(declared.clone(), call, responses, timeout).await;
            return self.held_outcome(outcome, timeout).await;
        }
        match tokio::time::timeout(timeout, self.legacy.request(method, params, caller, preferred.as_deref())).await {
            // Dropping the request on timeout sends notifications/cancelled upstream.
            Err(_) => Err(CallError::Timeout(timeout)),
            Ok(Err(error)) => {
                self.unreachable(error.clone()).await;
                Err(CallError::Unavailable(error))
            }
            Ok(Ok(message)) => {
                self.mark_healthy();
                answer_of(message)
            }
        }
    }

    /// The 2025 call of `method` for `caller`, who is asked for input through the `AskClient`
    /// the call is given (a held call's or a task run's).
    fn asking_call(
        &self,
        method: &str,
        params: serde_json::Map<String, serde_json::Value>,
        caller: &CallerMeta,
        preferred: Option<String>,
    ) -> impl FnOnce(
        Arc<dyn super::legacy_calls::AskClient>,
    ) -> futures::future::BoxFuture<'static, Result<serde_json::Value, String>> {
        let (legacy, method, mut caller) = (self.legacy.clone(), method.to_string(), caller.clone());
        move |asker| {
            Box::pin(async move {
                caller.ask_client = Some(asker);
                legacy.request(&method, params, &caller, preferred.as_deref()).await
            })
        }
    }

    /// Whether callers may be offered the tasks extension for this connection: the upstream
    /// offers it, or Portcullis runs some of its tools as tasks.
    pub fn offers_tasks(&self) -> bool {
        let Upstream::Mcp { run_as_tasks, .. } = &self.upstream;
        self.catalog().tasks || (!self.speaks_modern() && !run_as_tasks.is_empty())
    }

    /// `tasks/get`, `tasks/update` or `tasks/cancel` about a run of Portcullis's: served here,
    /// or by the replica that runs it; -32602 when none does (ended, expired or lost).
    async fn run_request(
        &self,
        method: &str,
        params: serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, CallError> {
        let answer = match self.runs.serve(method, &params) {
            Some(answer) => Some(answer),
            None => {
                let exchange = uuid::Uuid::new_v4().simple().to_string();
                let message = crate::changes::HeldMessage::Task {
                    connection: self.name.clone(),
                    exchange: exchange.clone(),
                    method: method.to_string(),
                    params,
                };
                self.ask_elsewhere(exchange, message, Duration::ZERO)
                    .await
                    .and_then(|mut outcome| outcome.get_mut("answer").map(serde_json::Value::take))
            }
        };
        answer.ok_or_else(|| CallError::Rpc(rmcp::ErrorData::invalid_params("Unknown task", None)))
    }

    /// Sends `message` (about exchange `exchange`) to the other replicas and waits for the
    /// answer of the one that has what it is about: at once, or after an `accepted` within
    /// `limit`. `None` when no replica answers.
    async fn ask_elsewhere(
        &self,
        exchange: String,
        message: crate::changes::HeldMessage,
        limit: Duration,
    ) -> Option<serde_json::Value> {
        struct Forget<'a>(&'a McpUpstream, String);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.exchanges.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
            }
        }
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        self.exchanges.lock().unwrap_or_else(|e| e.into_inner()).insert(exchange.clone(), sender);
        let _forget = Forget(self, exchange);
        self.changes.send_held(&self.tenant, message);
        let first = tokio::time::timeout(HOLDER_ANSWERS_WITHIN, received.recv()).await.ok()??;
        if first.get("accepted").is_some() {
            return tokio::time::timeout(limit + HOLDER_ANSWERS_WITHIN, received.recv()).await.ok()?;
        }
        Some(first)
    }

    /// Hands a retry of a call held on another replica to that replica over the change bus, and
    /// waits for its outcome; `None` when no replica holds the call.
    async fn resume_elsewhere(
        &self,
        handle: &str,
        responses: Option<&serde_json::Value>,
        limit: Duration,
    ) -> Option<held_calls::Outcome> {
        let exchange = uuid::Uuid::new_v4().simple().to_string();
        let message = crate::changes::HeldMessage::Retry {
            connection: self.name.clone(),
            exchange: exchange.clone(),
            handle: handle.to_string(),
            responses: responses.cloned(),
            limit_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        };
        let outcome = self.ask_elsewhere(exchange, message, limit).await?;
        held_calls::Outcome::from_json(&outcome)
    }

    async fn held_outcome(
        &self,
        outcome: held_calls::Outcome,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        match outcome {
            held_calls::Outcome::Waiting => Err(CallError::Timeout(timeout)),
            held_calls::Outcome::Missing(capability) => {
                Err(CallError::Rpc(super::legacy_calls::missing_capability(serde_json::json!({ capability: {} }))))
            }
            held_calls::Outcome::InputRequired(result) | held_calls::Outcome::Task(result) => Ok(result),
            held_calls::Outcome::Answered(Err(error)) => {
                self.unreachable(error.clone()).await;
                Err(CallError::Unavailable(error))
            }
            held_calls::Outcome::Answered(Ok(message)) => {
                self.mark_healthy();
                answer_of(message)
            }
        }
    }

    /// The upstream URIs callers are subscribed to.
    fn subscribed(&self) -> Vec<String> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Subscribes to updates of the upstream's resource `uri` on behalf of one more caller; the
    /// upstream is asked once, however many callers subscribe. Updates are announced on the
    /// change bus.
    pub async fn subscribe(&self, uri: &str) -> Result<(), CallError> {
        if !self.catalog().subscribe {
            return Err(CallError::Rpc(rmcp::ErrorData::new(
                rmcp::model::ErrorCode::METHOD_NOT_FOUND,
                "the server behind this resource does not offer subscriptions",
                None,
            )));
        }
        let first = {
            let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
            let count = subscriptions.entry(uri.to_string()).or_insert(0);
            *count += 1;
            *count == 1
        };
        if !first {
            return Ok(());
        }
        let outcome = self.follow(uri, true).await;
        if outcome.is_err() {
            self.release(uri);
        }
        outcome
    }

    /// Ends one caller's subscription to `uri`; the last one unsubscribes upstream.
    pub async fn unsubscribe(&self, uri: &str) {
        if self.release(uri) {
            let _ = self.follow(uri, false).await;
        }
    }

    /// Counts one subscription of `uri` less; true when none is left.
    fn release(&self, uri: &str) -> bool {
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        match subscriptions.get_mut(uri) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                subscriptions.remove(uri);
                true
            }
            None => false,
        }
    }

    /// Starts or stops following `uri` upstream: a 2025 session (un)subscribes; a 2026-07-28
    /// upstream's listen stream is opened anew with the new set of URIs.
    async fn follow(&self, uri: &str, subscribe: bool) -> Result<(), CallError> {
        let service = self.live().await.map_err(CallError::Unavailable)?;
        if service.peer().peer_info().is_some_and(|info| !info.protocol_version.has_initialize()) {
            self.listen_for_changes(&service);
            return Ok(());
        }
        // On rmcp's session: its GET stream is where the updates arrive.
        let method = if subscribe { "resources/subscribe" } else { "resources/unsubscribe" };
        let request = client_request(method, serde_json::json!({ "uri": uri }))?;
        match tokio::time::timeout(LIST_TIMEOUT, service.peer().send_request(request)).await {
            Err(_) => Err(CallError::Timeout(LIST_TIMEOUT)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(ServiceError::McpError(error))) => Err(CallError::Rpc(error)),
            Ok(Err(e)) => Err(CallError::Unavailable(root_cause(&e))),
        }
    }

    async fn unreachable(&self, error: String) {
        self.mark_unhealthy(error);
        self.forget_live().await;
        self.legacy.reset();
        self.catalog_changed.notify_one();
    }

    /// One request to a 2026-07-28 upstream as one POST; dropping it (timeout) closes the
    /// request, which is how that revision cancels.
    async fn request_direct(
        &self,
        method: &str,
        mut params: serde_json::Map<String, serde_json::Value>,
        caller: &CallerMeta,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = match method {
            "tools/call" | "prompts/get" => params.get("name").and_then(serde_json::Value::as_str),
            "resources/read" => params.get("uri").and_then(serde_json::Value::as_str),
            "tasks/get" | "tasks/update" | "tasks/cancel" => params.get("taskId").and_then(serde_json::Value::as_str),
            _ => None,
        }
        .map(encode_header_value);
        let mut meta = serde_json::json!({
            META_PROTOCOL_VERSION: MODERN_VERSION,
            // The upstream may ask (input_required) only for what the caller can give.
            META_CLIENT_CAPABILITIES: caller.client_capabilities.clone().unwrap_or_else(|| serde_json::json!({})),
            META_CLIENT_INFO: {"name": "portcullis", "version": env!("CARGO_PKG_VERSION")},
        });
        if let Some(level) = &caller.log_level {
            meta[META_LOG_LEVEL] = serde_json::json!(level);
        }
        // The upstream reports progress under Portcullis's token, unique per upstream request.
        if caller.notifications.as_ref().is_some_and(NotificationSink::wants_progress) {
            meta["progressToken"] = serde_json::json!(format!("pc{id}"));
        }
        params.insert("_meta".into(), meta);
        let body = serde_json::json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let mut headers = http::HeaderMap::with_capacity(8);
        headers.insert("mcp-protocol-version", http::HeaderValue::from_static(MODERN_VERSION));
        if let Ok(value) = http::HeaderValue::from_str(method) {
            headers.insert("mcp-method", value);
        }
        if let Some(value) = name.and_then(|name| http::HeaderValue::from_str(&name).ok()) {
            headers.insert("mcp-name", value);
        }
        // Arguments the upstream's schema marks with x-mcp-header are mirrored into headers.
        if method == "tools/call"
            && let Some(tool_name) = params.get("name").and_then(serde_json::Value::as_str)
            && let Some(tool) = self.catalog().tools.iter().find(|t| t.name == tool_name)
        {
            let arguments = params.get("arguments").unwrap_or(&serde_json::Value::Null);
            for (header, value) in crate::mcp::protocol::param_headers(&tool.input_schema, arguments) {
                if let (Ok(header), Ok(value)) =
                    (http::HeaderName::from_bytes(header.as_bytes()), http::HeaderValue::from_str(&value))
                {
                    headers.append(header, value);
                }
            }
        }
        let body = bytes::Bytes::from(body.to_string());
        // Only a failure to reach the upstream marks it down; a bad answer to one request
        // fails that request (one tool's fault must not take the whole connection down).
        let exchange = async {
            let response = self.transport.post_json(headers, body).await.map_err(Broken::Unreachable)?;
            let status = response.status();
            let event_stream = response.is_event_stream();
            if !status.is_success() && !event_stream {
                let bytes = response.bytes().await.unwrap_or_default();
                // A JSON-RPC error with an HTTP error status is still the tool's answer.
                if let Ok(message) = serde_json::from_slice::<serde_json::Value>(&bytes)
                    && message.get("error").is_some()
                {
                    return Ok(message);
                }
                // A proxy in front of it saying it is gone.
                if matches!(status.as_u16(), 502..=504) {
                    return Err(Broken::Unreachable(format!("HTTP status {status}")));
                }
                return Err(Broken::Failed(format!("HTTP status {status}")));
            }
            if !event_stream {
                let bytes = response.bytes().await.map_err(Broken::Unreachable)?;
                return serde_json::from_slice(&bytes).map_err(|e| Broken::Failed(format!("unreadable answer: {e}")));
            }
            // 2026-07-28 servers send no requests on a response stream.
            read_event_stream(response, id, caller.notifications.as_ref(), |_| async { None })
                .await
                .map_err(Broken::Failed)
        };
        let message = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(CallError::Timeout(timeout)),
            Ok(Err(Broken::Unreachable(error))) => {
                self.unreachable(error.clone()).await;
                return Err(CallError::Unavailable(error));
            }
            Ok(Err(Broken::Failed(error))) => {
                return Err(CallError::Rpc(rmcp::ErrorData::internal_error(
                    format!("the upstream failed this request: {error}"),
                    None,
                )));
            }
            Ok(Ok(message)) => message,
        };
        self.mark_healthy();
        answer_of(message)
    }
}

/// How requests reach one upstream: its URL and its own headers (credentials among them), each
/// parsed once, and for a plain-HTTP upstream the connections that calling tasks drive
/// themselves (upstream_http); reqwest for everything else. Shared by a connection's
/// 2026-07-28 requests and its 2025 sessions.
pub(super) struct Transport {
    pub(super) http: reqwest::Client,
    url: String,
    // Parsed once: parsing (with IDNA) on every request showed in profiles.
    parsed_url: Option<reqwest::Url>,
    pooled: Option<Arc<UpstreamHttp>>,
    // A value that is no valid header is left out (the manifest checks reject those).
    fixed_headers: http::HeaderMap,
}

impl Transport {
    pub(super) fn new(http: reqwest::Client, upstream: &Upstream) -> Self {
        let Upstream::Mcp { url, headers, .. } = upstream;
        let parsed_url = reqwest::Url::parse(url).ok();
        let mut fixed_headers = http::HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            if let (Ok(name), Ok(mut value)) =
                (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value.expose()))
            {
                value.set_sensitive(true);
                fixed_headers.append(name, value);
            }
        }
        Self {
            http,
            url: url.clone(),
            pooled: parsed_url.as_ref().and_then(UpstreamHttp::for_url),
            parsed_url,
            fixed_headers,
        }
    }

    /// A request through reqwest, with the connection's own headers.
    pub(super) fn request(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        self.through_reqwest(method).headers(self.fixed_headers.clone())
    }

    fn through_reqwest(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        match &self.parsed_url {
            Some(parsed) => self.http.request(method, parsed.clone()),
            None => self.http.request(method, self.url.as_str()),
        }
    }

    /// POSTs a JSON-RPC message with `headers`, to which Content-Type, Accept and the
    /// connection's own headers are added: over a connection this task drives when the upstream
    /// is plain HTTP, through reqwest otherwise.
    pub(super) async fn post_json(
        &self,
        mut headers: http::HeaderMap,
        body: bytes::Bytes,
    ) -> Result<UpstreamAnswer, String> {
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        headers.insert(http::header::ACCEPT, http::HeaderValue::from_static("application/json, text/event-stream"));
        for (name, value) in &self.fixed_headers {
            headers.append(name.clone(), value.clone());
        }
        match &self.pooled {
            Some(pool) => pool.post(&headers, &body).await.map(UpstreamAnswer::Pooled).map_err(|e| e.0),
            None => {
                let request = self.through_reqwest(reqwest::Method::POST).headers(headers).body(body);
                request.send().await.map(UpstreamAnswer::Reqwest).map_err(|e| root_cause(&e))
            }
        }
    }
}

/// An upstream's response, from either client.
pub(super) enum UpstreamAnswer {
    Pooled(upstream_http::Response),
    Reqwest(reqwest::Response),
}

impl UpstreamAnswer {
    pub(super) fn status(&self) -> http::StatusCode {
        match self {
            Self::Pooled(response) => response.status(),
            Self::Reqwest(response) => response.status(),
        }
    }

    pub(super) fn is_event_stream(&self) -> bool {
        let headers = match self {
            Self::Pooled(response) => response.headers(),
            Self::Reqwest(response) => response.headers(),
        };
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    }

    pub(super) async fn bytes(self) -> Result<bytes::Bytes, String> {
        match self {
            Self::Pooled(response) => response.bytes().await,
            Self::Reqwest(response) => response.bytes().await.map_err(|e| e.to_string()),
        }
    }
}

/// A response body read piece by piece.
pub(super) trait Chunks {
    fn next_chunk(&mut self) -> impl std::future::Future<Output = Result<Option<bytes::Bytes>, String>> + Send;
}

impl Chunks for reqwest::Response {
    async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        self.chunk().await.map_err(|e| e.to_string())
    }
}

impl Chunks for UpstreamAnswer {
    async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        match self {
            Self::Pooled(response) => response.chunk().await,
            Self::Reqwest(response) => response.chunk().await.map_err(|e| e.to_string()),
        }
    }
}

async fn fetch_catalog(
    peer: &rmcp::service::Peer<RoleClient>,
    capabilities: &ServerCapabilities,
    protocol_version: &ProtocolVersion,
) -> Result<Catalog, String> {
    let mut catalog = Catalog {
        completions: capabilities.completions.is_some(),
        subscribe: capabilities.resources.as_ref().and_then(|r| r.subscribe) == Some(true),
        tasks: capabilities.supports_tasks() && !protocol_version.has_initialize(),
        ..Catalog::default()
    };
    match peer.list_all_tools().await {
        Ok(tools) => catalog.tools = tools,
        // A server that does not advertise tools may well not answer tools/list.
        Err(_) if capabilities.tools.is_none() => {}
        Err(e) => return Err(format!("tools/list failed: {}", root_cause(&e))),
    }
    if capabilities.resources.is_some() {
        catalog.resources =
            peer.list_all_resources().await.map_err(|e| format!("resources/list failed: {}", root_cause(&e)))?;
        catalog.templates = peer
            .list_all_resource_templates()
            .await
            .map_err(|e| format!("resources/templates/list failed: {}", root_cause(&e)))?;
    }
    if capabilities.prompts.is_some() {
        catalog.prompts =
            peer.list_all_prompts().await.map_err(|e| format!("prompts/list failed: {}", root_cause(&e)))?;
    }
    Ok(catalog)
}

/// The result of a JSON-RPC answer, or its error.
fn answer_of(message: serde_json::Value) -> Result<serde_json::Value, CallError> {
    if let Some(result) = message.get("result") {
        return Ok(result.clone());
    }
    match message.get("error").cloned().map(serde_json::from_value::<rmcp::ErrorData>) {
        Some(Ok(error)) => Err(CallError::Rpc(error)),
        _ => Err(CallError::Unavailable("the upstream answered neither a result nor an error".into())),
    }
}

/// The response to request `id` on an event stream. Progress and log messages before it go to
/// `sink`; the server's other messages (requests, other notifications) go to `on_message`. A
/// request's future runs while reading on (a server may send several requests and wait for all
/// of them); a notification's is awaited before reading on.
pub(super) async fn read_event_stream<F, Fut>(
    mut response: impl Chunks,
    id: u64,
    sink: Option<&NotificationSink>,
    mut on_message: F,
) -> Result<serde_json::Value, String>
where
    F: FnMut(serde_json::Value) -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    use futures::StreamExt;
    let mut buffer: Vec<u8> = Vec::new();
    let mut handling = futures::stream::FuturesUnordered::new();
    loop {
        let chunk = tokio::select! {
            chunk = response.next_chunk() => chunk?,
            Some(_) = handling.next(), if !handling.is_empty() => continue,
        };
        let Some(chunk) = chunk else {
            return Err("the event stream ended without an answer".into());
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = find_event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end).collect();
            let text = String::from_utf8_lossy(&event);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:").map(|d| d.strip_prefix(' ').unwrap_or(d)))
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            let Ok(message) = serde_json::from_str::<serde_json::Value>(&data) else { continue };
            if message.get("id").and_then(serde_json::Value::as_u64) == Some(id)
                && (message.get("result").is_some() || message.get("error").is_some())
            {
                return Ok(message);
            }
            let about_request = message.get("id").is_none()
                && matches!(
                    message.get("method").and_then(serde_json::Value::as_str),
                    Some("notifications/progress" | "notifications/message")
                );
            match sink {
                Some(sink) if about_request => sink.forward(message),
                // A request waits for its answer while the stream goes on; a notification is
                // handled at once, so none is lost when the answer follows in the same read.
                _ if message.get("method").is_some() && message.get("id").is_some() => {
                    handling.push(on_message(message));
                }
                _ if message.get("method").is_some() => {
                    on_message(message).await;
                }
                _ => {}
            }
        }
    }
}

/// Index just past the blank line that ends the first event, if the buffer holds one.
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The innermost cause of an error: rmcp's outer messages name Rust types, the innermost one
/// ("Connection refused", "HTTP status 401") is what an operator can act on.
pub(super) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// How long a replica waits for another to say it holds a call a retry names.
const HOLDER_ANSWERS_WITHIN: Duration = Duration::from_secs(2);

/// Serves retries of this connection's held calls that reached other replicas, and delivers the
/// holders' messages to the retries waiting here.
async fn held_relay_loop(
    connection: std::sync::Weak<McpUpstream>,
    mut changes: tokio::sync::broadcast::Receiver<crate::changes::Change>,
) {
    use crate::changes::HeldMessage;
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let Some(this) = connection.upgrade() else { return };
        if change.tenant != this.tenant {
            continue;
        }
        if let Some(message) = &change.session {
            if message.ended() {
                // A 2025 client session ended: so does the upstream session kept for it.
                this.legacy.end_client(&message.session);
            } else if let Some(level) = &message.log_level {
                this.legacy.set_client_level(&message.session, level);
            }
            continue;
        }
        let Some(message) = change.held else { continue };
        let deliver = |exchange: &str, value: serde_json::Value| {
            if let Some(waiting) = this.exchanges.lock().unwrap_or_else(|e| e.into_inner()).get(exchange) {
                let _ = waiting.send(value);
            }
        };
        match message {
            HeldMessage::Retry { connection, exchange, handle, responses, limit_ms }
                if connection == this.name && this.held.holds(&handle) =>
            {
                this.changes.send_held(&this.tenant, HeldMessage::Accepted { exchange: exchange.clone() });
                let (held, changes, tenant) = (this.held.clone(), this.changes.clone(), this.tenant.clone());
                tokio::spawn(async move {
                    let limit = Duration::from_millis(limit_ms);
                    let outcome = held.resume(&handle, responses.as_ref(), limit).await;
                    let outcome = outcome.map_or_else(|| serde_json::json!({ "gone": true }), |o| o.to_json());
                    changes.send_held(&tenant, HeldMessage::Outcome { exchange, outcome });
                });
            }
            HeldMessage::Task { connection, exchange, method, params } if connection == this.name => {
                if let Some(answer) = this.runs.serve(&method, &params) {
                    let outcome = serde_json::json!({ "answer": answer });
                    this.changes.send_held(&this.tenant, HeldMessage::Outcome { exchange, outcome });
                }
            }
            HeldMessage::Task { .. } => {}
            HeldMessage::Accepted { exchange } => deliver(&exchange, serde_json::json!({ "accepted": true })),
            HeldMessage::Outcome { exchange, outcome } => deliver(&exchange, outcome),
            HeldMessage::Retry { .. } => {}
        }
    }
}

async fn keepalive_loop(connection: std::sync::Weak<McpUpstream>) {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        let Some(this) = connection.upgrade() else { return };
        this.keepalive().await;
    }
}

async fn refresh_loop(connection: std::sync::Weak<McpUpstream>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let Some(this) = connection.upgrade() else { return };
        let outcome = this.refresh().await;
        this.first_attempt.send_replace(true);
        let wait = match outcome {
            Ok(()) => {
                backoff = Duration::from_millis(500);
                this.refresh_interval()
            }
            Err(_) => {
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        let changed = this.catalog_changed.clone();
        drop(this);
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A client request of rmcp's from its method and params.
fn client_request(method: &str, params: serde_json::Value) -> Result<ClientRequest, CallError> {
    serde_json::from_value(serde_json::json!({ "method": method, "params": params }))
        .map_err(|e| CallError::Rpc(rmcp::ErrorData::invalid_params(format!("invalid {method} parameters: {e}"), None)))
}
