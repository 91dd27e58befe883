//! Requests to a 2025 upstream on a session of Portcullis's own, as plain HTTP. In the 2025
//! protocols what a server sends about one request — progress, log messages and its own requests
//! for client input (sampling, elicitation, roots) — travels on that request's event stream;
//! rmcp's client merges all streams of a session and cannot tell which caller they belong to.
//! Here each request reads its own stream, so those messages go to the caller who asked.
//!
//! A 2025 client's session gets an upstream session of its own (per replica that serves it,
//! started at its first request there): whatever the server keeps per session (state, the
//! client's capabilities) is that client's alone, and what the server sends on the session's
//! GET stream (log messages, above all) goes to that client's GET stream, on whichever replica
//! holds it. Such sessions end with the client's (DELETE, on every replica), after the session
//! idle time unused, or when a replica keeps too many (the least recently used goes).
//!
//! Callers without a session of their own (a 2026-07-28 client declares its capabilities per
//! request, a REST caller can be asked nothing) share sessions: a 2025 server learns what its
//! client can be asked (sampling, elicitation, roots) once, at initialize, and well-written
//! servers check it before asking, so there is one shared session per set of askable
//! capabilities (`Asks`: at most 50 sets, in practice a few) and each request goes on the one
//! that declares exactly what its caller can answer.
//!
//! The catalog and subscriptions stay on the rmcp session of `mcp`. Each session's own GET
//! stream is read too: servers announce list changes caused by a request to the session that
//! made it.

use super::mcp::{CallerMeta, Transport, UpstreamAnswer, read_event_stream, root_cause};
use crate::mcp::protocol::LEGACY_VERSIONS;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a client refused, or why it could not be asked.
#[derive(Debug)]
pub struct Refused {
    /// JSON-RPC code for the upstream.
    pub code: i64,
    /// Why.
    pub message: String,
}

/// Asks the caller's client for input on behalf of an upstream (a 2025 session's client, on its
/// request's stream).
pub trait AskClient: Send + Sync {
    /// Sends `method` (`sampling/createMessage`, `elicitation/create`, `roots/list`) with
    /// `params` to the client; its result.
    fn ask<'a>(&'a self, method: &'a str, params: Value) -> BoxFuture<'a, Result<Value, Refused>>;
}

/// The capability a client must have declared to be sent `method`, for the methods a server may
/// ask a client (`sampling/createMessage`, `elicitation/create`, `roots/list`).
pub fn capability_for(method: &str) -> Option<&'static str> {
    match method {
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

/// Whether a client that declared `declared` may be sent `method`.
pub fn declares(declared: &Value, method: &str) -> bool {
    capability_for(method).is_some_and(|capability| declared.get(capability).is_some())
}

/// -32021, as a 2026-07-28 server answers a request that needs what its client did not declare:
/// `required` names it in client-capabilities form (`{"sampling": {}}`).
pub fn missing_capability(required: Value) -> rmcp::ErrorData {
    rmcp::ErrorData::new(
        rmcp::model::ErrorCode(-32021),
        "Missing required client capability",
        Some(json!({ "requiredCapabilities": required })),
    )
}

/// Refuses to the upstream (-32601) what the client did not declare it can answer.
pub fn require_declared(declared: &Value, method: &str) -> Result<(), Refused> {
    if declares(declared, method) {
        return Ok(());
    }
    Err(Refused { code: -32601, message: format!("the client did not declare support for {method}") })
}

/// What a caller can be asked, as the client capabilities a session declares: the three
/// capabilities servers use to ask, with the sub-capabilities the 2025 revisions define. A bit
/// set, so the sessions stay few (at most 50) whatever callers put in their capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Asks(u8);

/// (capability, sub-capability or "" for the capability itself), one bit each. Not
/// `roots.listChanged`: Portcullis does not pass clients' `notifications/roots/list_changed` on,
/// so no session promises it (a server must ask for roots each time).
const ASKABLE: [(&str, &str); 7] = [
    ("sampling", ""),
    ("sampling", "tools"),
    ("sampling", "context"),
    ("elicitation", ""),
    ("elicitation", "form"),
    ("elicitation", "url"),
    ("roots", ""),
];

impl Asks {
    /// What a client that declared `declared` can be asked.
    pub fn of(declared: Option<&Value>) -> Self {
        let Some(declared) = declared else { return Self::default() };
        let bits = ASKABLE.iter().enumerate().fold(0u8, |bits, (bit, (capability, sub))| {
            let present = declared.get(capability).is_some_and(|c| sub.is_empty() || c.get(sub).is_some());
            if present { bits | 1 << bit } else { bits }
        });
        Self(bits)
    }

    /// The client capabilities a session for these callers declares.
    pub fn capabilities(self) -> Value {
        let mut capabilities = serde_json::Map::new();
        for (bit, (capability, sub)) in ASKABLE.iter().enumerate() {
            if self.0 & 1 << bit == 0 {
                continue;
            }
            let entry = capabilities.entry(*capability).or_insert_with(|| json!({}));
            if !sub.is_empty() {
                entry[*sub] = json!({});
            }
        }
        Value::Object(capabilities)
    }
}

impl std::fmt::Debug for dyn AskClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AskClient")
    }
}

/// How long starting a session may take.
const INITIALIZE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long opening a session's GET stream may hold up its first request.
const OPEN_STREAM_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How opening a session's GET stream went.
enum Opened {
    Stream(reqwest::Response),
    /// The server has none for the session.
    Refused,
    /// Not at once: try again.
    Failed,
}

/// A log level as a slot keeps it: its rank + 1, 0 for none.
fn level_code(level: Option<&str>) -> u8 {
    level.and_then(super::notifications::level_rank).map_or(0, |rank| u8::try_from(rank + 1).unwrap_or(u8::MAX))
}

/// How many 2025 client sessions one replica keeps an upstream session for, per connection.
const CLIENT_SESSIONS: usize = 1024;

/// How often unused client sessions are looked for.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Whose an upstream session is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    /// Callers without a 2025 session (REST, 2026-07-28 clients) that can be asked `Asks`.
    Shared(Asks),
    /// One 2025 client session (its `Mcp-Session-Id` at Portcullis).
    Client(String),
}

/// A 2025 session of Portcullis's own with the upstream.
#[derive(Debug)]
struct Session {
    /// Whose it is.
    owner: Owner,
    /// What it declared its client can be asked.
    asks: Asks,
    /// `Mcp-Session-Id`, when the server issued one.
    id: Option<String>,
    /// The negotiated protocol version.
    version: String,
    /// Whether the server logs (takes `logging/setLevel`).
    logs: bool,
    /// Set when the session is over: its GET stream is let go.
    ended: tokio::sync::watch::Sender<bool>,
}

/// Why a session could not be started.
enum Start {
    /// The upstream could not be reached, or did not answer in time.
    Unreachable(String),
    /// It answered, but refused (an HTTP error, no 2025 version): this request fails, the
    /// connection is fine.
    Refused(String),
}

/// Why one request on a session failed.
enum Failure {
    /// The server no longer knows the session (HTTP 404): start a new one.
    SessionGone,
    /// Anything else, for the operator.
    Other(String),
}

/// What upstream connections need of the 2025 client sessions they serve.
#[derive(Clone)]
pub struct ClientSessions {
    /// How long a session lives unused: its upstream sessions end after as long unused.
    pub idle: std::time::Duration,
    /// Where clients' answers to requests sent on their GET streams arrive.
    pub replies: crate::mcp::relay::PendingReplies,
    /// The sessions themselves: a client session that lives keeps its upstream sessions.
    pub store: Arc<dyn crate::sessions::SessionStore>,
}

/// How long a 2025 client may take to answer a request sent on its GET stream.
const ANSWER_ON_STREAM_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Where an owner's session is kept: started once however many requests wait for it.
#[derive(Default)]
struct Slot {
    session: tokio::sync::OnceCell<Arc<Session>>,
    /// When a request last used it (ms since `LegacyCalls::epoch`).
    last_used: AtomicU64,
    /// The log level its client set (its rank + 1; 0: none), for a client's own session.
    log_level: std::sync::atomic::AtomicU8,
}

/// Where what the upstream announces on the session's GET stream goes.
pub struct Announcements {
    /// Wakes the catalog refresher (list changes).
    pub catalog_changed: Arc<tokio::sync::Notify>,
    /// Resource updates, for subscribed sessions.
    pub changes: crate::changes::Changes,
    /// Tenant of the connection.
    pub tenant: String,
    /// Connection name.
    pub connection: String,
}

/// Plain-HTTP requests to one 2025 upstream.
pub struct LegacyCalls {
    // A request's POST goes over the pool for plain HTTP; everything else (initialize, GET
    // streams, DELETE, replies) through reqwest.
    transport: Arc<Transport>,
    next_id: AtomicU64,
    sessions: std::sync::Mutex<HashMap<Owner, Arc<Slot>>>,
    announcements: Announcements,
    client_sessions: ClientSessions,
    epoch: std::time::Instant,
}

impl Drop for LegacyCalls {
    /// The connection is replaced or removed: its sessions end (their GET streams are let go).
    fn drop(&mut self) {
        self.reset();
    }
}

/// Sends `notifications/cancelled` for a request that is dropped before its answer: in the
/// 2025 protocols closing the stream does not cancel.
struct CancelUnlessAnswered {
    calls: Arc<LegacyCalls>,
    session: Arc<Session>,
    id: u64,
    answered: bool,
}

impl Drop for CancelUnlessAnswered {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let (calls, session, id) = (self.calls.clone(), self.session.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let cancelled = json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": { "requestId": id, "reason": "cancelled by the caller or timed out" },
                });
                let _ = calls.post(&session, &cancelled).send().await;
            });
        }
    }
}

impl LegacyCalls {
    /// Requests to the upstream `transport` reaches.
    pub(super) fn new(
        transport: Arc<Transport>,
        announcements: Announcements,
        client_sessions: ClientSessions,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            transport,
            next_id: AtomicU64::new(1),
            sessions: std::sync::Mutex::default(),
            announcements,
            client_sessions,
            epoch: std::time::Instant::now(),
        });
        tokio::spawn(sweep(Arc::downgrade(&this)));
        this
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Owner, Arc<Slot>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Ends every session (the upstream went away, or the connection did; the next request
    /// starts a new one).
    pub fn reset(&self) {
        let slots: Vec<Arc<Slot>> = self.slots().drain().map(|(_, slot)| slot).collect();
        for session in slots.iter().filter_map(|slot| slot.session.get()) {
            self.close(session.clone());
        }
    }

    /// Ends the upstream session kept for 2025 client session `id`, if this replica keeps one.
    pub fn end_client(&self, id: &str) {
        let slot = self.slots().remove(&Owner::Client(id.to_string()));
        if let Some(session) = slot.and_then(|slot| slot.session.get().cloned()) {
            self.close(session);
        }
    }

    /// The log level 2025 client session `id` set: its upstream session here takes it.
    pub fn set_client_level(&self, id: &str, level: &str) {
        let slot = self.slots().get(&Owner::Client(id.to_string())).cloned();
        let Some(slot) = slot else { return };
        slot.log_level.store(level_code(Some(level)), Ordering::Relaxed);
        if let Some(session) = slot.session.get().filter(|s| s.logs).cloned() {
            let request = self.post(
                &session,
                &json!({ "jsonrpc": "2.0", "id": self.next_id.fetch_add(1, Ordering::Relaxed),
                "method": "logging/setLevel", "params": { "level": level } }),
            );
            tokio::spawn(async move {
                let _ = request.send().await;
            });
        }
    }

    /// Tells the upstream a session is over (DELETE; a server may refuse, which changes
    /// nothing) and lets its GET stream go.
    fn close(&self, session: Arc<Session>) {
        session.ended.send_replace(true);
        if session.id.is_none() {
            return;
        }
        let request = self.on_session(reqwest::Method::DELETE, &session);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = request.send().await;
            });
        }
    }

    /// Ends the client sessions unused here for the idle time whose client session has ended
    /// (one that lives, used through other replicas or connections, keeps its session here).
    async fn sweep_idle(&self) {
        let now = self.now_ms();
        let idle = u64::try_from(self.client_sessions.idle.as_millis()).unwrap_or(u64::MAX);
        let unused: Vec<String> = self
            .slots()
            .iter()
            .filter(|(_, slot)| now.saturating_sub(slot.last_used.load(Ordering::Relaxed)) >= idle)
            .filter_map(|(owner, _)| match owner {
                Owner::Client(id) => Some(id.clone()),
                Owner::Shared(_) => None,
            })
            .collect();
        for id in unused {
            // When the store cannot tell, the session stays until the next sweep.
            match self.client_sessions.store.exists(&id).await {
                Ok(false) => self.end_client(&id),
                Ok(true) => {
                    if let Some(slot) = self.slots().get(&Owner::Client(id)) {
                        slot.last_used.store(now, Ordering::Relaxed);
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// The slot of `owner`, made when there is none; a replica that keeps the most client
    /// sessions ends the least recently used one first.
    fn slot(&self, owner: &Owner) -> Arc<Slot> {
        let now = self.now_ms();
        let mut slots = self.slots();
        if let Some(slot) = slots.get(owner) {
            slot.last_used.store(now, Ordering::Relaxed);
            return slot.clone();
        }
        let mut evicted = None;
        if matches!(owner, Owner::Client(_))
            && slots.keys().filter(|o| matches!(o, Owner::Client(_))).count() >= CLIENT_SESSIONS
        {
            let oldest = slots
                .iter()
                .filter(|(o, _)| matches!(o, Owner::Client(_)))
                .min_by_key(|(_, slot)| slot.last_used.load(Ordering::Relaxed))
                .map(|(o, _)| o.clone());
            evicted = oldest.and_then(|o| slots.remove(&o)).and_then(|slot| slot.session.get().cloned());
        }
        let slot = Arc::new(Slot {
            session: tokio::sync::OnceCell::new(),
            last_used: AtomicU64::new(now),
            log_level: std::sync::atomic::AtomicU8::new(0),
        });
        slots.insert(owner.clone(), slot.clone());
        drop(slots);
        if let Some(session) = evicted {
            self.close(session);
        }
        slot
    }

    /// A request on `session`: its version and id, and the connection's own headers.
    fn on_session(&self, method: reqwest::Method, session: &Session) -> reqwest::RequestBuilder {
        self.transport.request(method).headers(session_headers(session))
    }

    /// A request's POST on `session`, on a pooled connection when the upstream is plain HTTP.
    async fn send_request(&self, session: &Session, body: &Value) -> Result<UpstreamAnswer, String> {
        self.transport.post_json(session_headers(session), body.to_string().into()).await
    }

    fn post(&self, session: &Session, body: &Value) -> reqwest::RequestBuilder {
        self.on_session(reqwest::Method::POST, session)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json, text/event-stream")
            .body(body.to_string())
    }

    /// The current session of `owner`, who can be asked `asks`, starting one (initialize, then
    /// `notifications/initialized`) when there is none; requests that arrive meanwhile wait for
    /// the same start. `preferred` is the version to offer.
    async fn session(
        self: &Arc<Self>,
        owner: &Owner,
        asks: Asks,
        preferred: Option<&str>,
        log_level: Option<&str>,
    ) -> Result<Arc<Session>, Start> {
        let slot = self.slot(owner);
        if matches!(owner, Owner::Client(_)) {
            slot.log_level.store(level_code(log_level), Ordering::Relaxed);
        }
        if let Some(session) = slot.session.get() {
            return Ok(session.clone());
        }
        let mut stream = None;
        let opened = &mut stream;
        let session = slot
            .session
            .get_or_try_init(|| async move {
                // Bounded: every request of the owner waits for it, and a half-open connection
                // must not stall them.
                let started = self.initialize(owner.clone(), asks, preferred, log_level);
                let session = tokio::time::timeout(INITIALIZE_WITHIN, started).await.map_err(|_| {
                    Start::Unreachable(format!("initialize was not answered within {} s", INITIALIZE_WITHIN.as_secs()))
                })??;
                // The GET stream is open before the session's first request: what the server
                // sends there about it (log messages) is not sent before anyone listens.
                *opened = Some(self.open_stream(&session).await);
                Ok::<_, Start>(session)
            })
            .await?
            .clone();
        if stream.is_some() && !self.is_current(&session) {
            // Its client ended (or it was let go) while it started: nobody will end it later.
            self.close(session);
            return Err(Start::Refused("the session ended while its upstream session started".into()));
        }
        match stream {
            // A server without one (405) or that refused it.
            Some(Opened::Refused) | None => {}
            Some(Opened::Stream(response)) => {
                tokio::spawn(listen(Arc::downgrade(self), session.clone(), Some(response)));
            }
            Some(Opened::Failed) => {
                tokio::spawn(listen(Arc::downgrade(self), session.clone(), None));
            }
        }
        Ok(session)
    }

    /// Opens the GET stream of `session` (bounded: a server that does not answer at once is
    /// tried again in the background).
    async fn open_stream(&self, session: &Session) -> Opened {
        let request =
            self.on_session(reqwest::Method::GET, session).header(reqwest::header::ACCEPT, "text/event-stream");
        match tokio::time::timeout(OPEN_STREAM_WITHIN, request.send()).await {
            Ok(Ok(response)) if response.status().is_success() => Opened::Stream(response),
            Ok(Ok(_)) => Opened::Refused,
            Ok(Err(_)) | Err(_) => Opened::Failed,
        }
    }

    /// Starts a session: initialize, then `notifications/initialized`, and when the server
    /// logs a level: a client's own session its client's (none: the server's default), a shared
    /// session the lowest (each caller gets what it asked for).
    async fn initialize(
        &self,
        owner: Owner,
        asks: Asks,
        preferred: Option<&str>,
        log_level: Option<&str>,
    ) -> Result<Arc<Session>, Start> {
        let offered = preferred.filter(|v| LEGACY_VERSIONS.contains(v)).unwrap_or(LEGACY_VERSIONS[0]);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let initialize = json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": "initialize",
            "params": {
                "protocolVersion": offered,
                // Exactly what this session's callers can be asked.
                "capabilities": asks.capabilities(),
                "clientInfo": { "name": "portcullis", "version": env!("CARGO_PKG_VERSION") },
            },
        });
        let ended = || tokio::sync::watch::channel(false).0;
        let unversioned =
            Session { owner: owner.clone(), asks, id: None, version: offered.to_string(), logs: false, ended: ended() };
        let unreachable = |e: reqwest::Error| Start::Unreachable(root_cause(&e));
        let response = self.post(&unversioned, &initialize).send().await.map_err(unreachable)?;
        let status = response.status();
        if !status.is_success() {
            let why = format!("initialize answered HTTP status {status}");
            // A proxy saying the server is not there, or the connection's credentials refused,
            // break the connection for everyone; anything else refuses this session only.
            return Err(if matches!(status.as_u16(), 401 | 403 | 502..=504) {
                Start::Unreachable(why)
            } else {
                Start::Refused(why)
            });
        }
        let session_id = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let answer = read_answer(UpstreamAnswer::Reqwest(response), id, &CallerMeta::default(), |_| async { None })
            .await
            .map_err(Start::Unreachable)?;
        let version = answer
            .get("result")
            .and_then(|r| r.get("protocolVersion"))
            .and_then(Value::as_str)
            .filter(|v| LEGACY_VERSIONS.contains(v))
            .ok_or_else(|| {
                Start::Refused(format!("initialize was not answered with a 2025 protocol version: {answer}"))
            })?
            .to_string();
        let logs = answer.get("result").and_then(|r| r.get("capabilities")).and_then(|c| c.get("logging")).is_some();
        let level = match owner {
            Owner::Client(_) => log_level,
            Owner::Shared(_) => Some("debug"),
        };
        let session = Arc::new(Session { owner, asks, id: session_id, version, logs, ended: ended() });
        let initialized = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        self.post(&session, &initialized).send().await.map_err(unreachable)?;
        if let Some(level) = level.filter(|_| logs) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let level =
                json!({ "jsonrpc": "2.0", "id": id, "method": "logging/setLevel", "params": { "level": level } });
            if let Ok(response) = self.post(&session, &level).send().await {
                let _ = read_answer(UpstreamAnswer::Reqwest(response), id, &CallerMeta::default(), |_| async { None })
                    .await;
            }
        }
        Ok(session)
    }

    /// Whether `session` is still the current one of its owner.
    fn is_current(&self, session: &Session) -> bool {
        self.slots()
            .get(&session.owner)
            .and_then(|slot| slot.session.get())
            .is_some_and(|current| std::ptr::eq(Arc::as_ptr(current), session))
    }

    /// Forgets `session` (the server no longer knows it), unless another has replaced it.
    fn forget(&self, session: &Arc<Session>) {
        session.ended.send_replace(true);
        let mut slots = self.slots();
        let current =
            slots.get(&session.owner).and_then(|slot| slot.session.get()).is_some_and(|c| Arc::ptr_eq(c, session));
        if current {
            slots.remove(&session.owner);
        }
    }

    /// Whether a log message at `level` is for the client of `session`, as far as this replica
    /// knows its level (the client's GET stream checks again).
    fn client_wants_log(&self, session: &Session, level: Option<&str>) -> bool {
        let wanted = self.slots().get(&session.owner).map_or(0, |slot| slot.log_level.load(Ordering::Relaxed));
        wanted != 0 && level_code(level) >= wanted
    }

    /// What arrives on the session's GET stream (or on a request's stream but not about it):
    /// list changes and resource updates are announced; pings are answered. Requests for client
    /// input (sampling, elicitation, roots) and other notifications (log messages above all) go
    /// to the GET stream of the 2025 client whose session it is; on a shared session they cannot
    /// be told apart per caller, so requests are refused and notifications dropped.
    async fn on_common(&self, session: &Session, message: Value) -> Option<()> {
        let method = message.get("method").and_then(Value::as_str)?;
        let announce = &self.announcements;
        if matches!(session.owner, Owner::Client(_)) && !self.is_current(session) {
            // Its client has ended, or it was let go: what it still says is for nobody.
            return Some(());
        }
        match (method, message.get("id")) {
            (
                "notifications/tools/list_changed"
                | "notifications/resources/list_changed"
                | "notifications/prompts/list_changed",
                None,
            ) => announce.catalog_changed.notify_one(),
            ("notifications/resources/updated", None) => {
                let uri = message.get("params").and_then(|p| p.get("uri")).and_then(Value::as_str)?;
                announce.changes.announce_updated(&announce.tenant, &announce.connection, uri);
            }
            // Progress names Portcullis's own tokens, a cancellation its own requests: neither
            // means anything to the client.
            ("notifications/progress" | "notifications/cancelled", None) => {}
            (_, None) => {
                let Owner::Client(client) = &session.owner else { return Some(()) };
                let level = message.get("params").and_then(|p| p.get("level")).and_then(Value::as_str);
                // Log messages are filtered here too: what the client does not want does not
                // cross the bus.
                if method != "notifications/message" || self.client_wants_log(session, level) {
                    announce.changes.send_to_session(&announce.tenant, client, message);
                }
            }
            (_, Some(id)) => {
                let params = message.get("params").cloned().unwrap_or_else(|| json!({}));
                let outcome = match &session.owner {
                    _ if method == "ping" => Ok(json!({})),
                    Owner::Client(client) if capability_for(method).is_some() => {
                        match require_declared(&session.asks.capabilities(), method) {
                            Ok(()) => self.ask_on_session_stream(client, method, params).await,
                            Err(refused) => Err(refused),
                        }
                    }
                    _ => Err(Refused {
                        code: -32601,
                        message: format!("{method} outside a request cannot be passed to a client"),
                    }),
                };
                let reply = match outcome {
                    Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
                    Err(refused) => json!({ "jsonrpc": "2.0", "id": id, "error": {
                        "code": refused.code, "message": refused.message } }),
                };
                let _ = self.post(session, &reply).send().await;
            }
        }
        Some(())
    }

    /// Sends `method` to 2025 client session `client` on its GET stream (held by whichever
    /// replica) and waits for its answer, which the client POSTs to any replica.
    async fn ask_on_session_stream(&self, client: &str, method: &str, params: Value) -> Result<Value, Refused> {
        let id = format!("portcullis-{}", uuid::Uuid::new_v4().simple());
        let replies = &self.client_sessions.replies;
        let (_waiting, answered) = replies.expect(client, &id);
        let request = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        self.announcements.changes.send_to_session(&self.announcements.tenant, client, request);
        let reply = match tokio::time::timeout(ANSWER_ON_STREAM_WITHIN, answered).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) | Err(_) => {
                return Err(Refused {
                    code: -32603,
                    message: format!(
                        "the client did not answer {method} on its stream within {} s",
                        ANSWER_ON_STREAM_WITHIN.as_secs()
                    ),
                });
            }
        };
        if let Some(result) = reply.get("result") {
            return Ok(result.clone());
        }
        let error = reply.get("error");
        Err(Refused {
            code: error.and_then(|e| e.get("code")).and_then(Value::as_i64).unwrap_or(-32603),
            message: error.and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("refused").to_string(),
        })
    }

    /// Sends one request, starting a new session once when the server has forgotten the
    /// current one; the JSON-RPC answer (a result or an error).
    pub async fn request(
        self: &Arc<Self>,
        method: &str,
        params: serde_json::Map<String, Value>,
        caller: &CallerMeta,
        preferred: Option<&str>,
    ) -> Result<Value, String> {
        let (owner, asks) = match &caller.client_session {
            // The client's own: it declared once what it can be asked (requests without a stream
            // to ask it on refuse the server's requests).
            Some(client) => (Owner::Client(client.id.clone()), Asks::of(client.capabilities.as_ref())),
            // Only a caller with a client to ask can be asked anything.
            None if caller.ask_client.is_some() => {
                let asks = Asks::of(caller.client_capabilities.as_ref());
                (Owner::Shared(asks), asks)
            }
            None => (Owner::Shared(Asks::default()), Asks::default()),
        };
        for _ in 0..2 {
            let session = match self.session(&owner, asks, preferred, caller.log_level.as_deref()).await {
                Ok(session) => session,
                Err(Start::Unreachable(error)) => return Err(error),
                Err(Start::Refused(why)) => {
                    // The server is there: this request fails, not the connection. The detail
                    // is for the operator.
                    tracing::warn!(connection = %self.announcements.connection, %why, "A 2025 upstream refused a session");
                    return Ok(json!({ "jsonrpc": "2.0", "id": null, "error": {
                        "code": -32603, "message": "the upstream refused to start a session for this request" } }));
                }
            };
            let outcome = self.request_on(&session, method, params.clone(), caller).await;
            // Used until now (a long request keeps its session).
            if let Some(slot) = self.slots().get(&owner) {
                slot.last_used.store(self.now_ms(), Ordering::Relaxed);
            }
            match outcome {
                Ok(answer) => return Ok(answer),
                Err(Failure::SessionGone) => self.forget(&session),
                Err(Failure::Other(error)) => return Err(error),
            }
        }
        Err("the upstream lost the new session at once".into())
    }

    async fn request_on(
        self: &Arc<Self>,
        session: &Arc<Session>,
        method: &str,
        mut params: serde_json::Map<String, Value>,
        caller: &CallerMeta,
    ) -> Result<Value, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if caller.notifications.as_ref().is_some_and(|sink| sink.wants_progress()) {
            // Unique on the session; the caller gets its own token back.
            params.insert("_meta".into(), json!({ "progressToken": format!("pc{id}") }));
        }
        let body = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let mut guard = CancelUnlessAnswered { calls: self.clone(), session: session.clone(), id, answered: false };
        let response = self.send_request(session, &body).await.map_err(Failure::Other)?;
        let status = response.status();
        if session.id.is_some() && matches!(status.as_u16(), 400 | 404) {
            // 404 is how the specification says a session is gone; some servers answer 400.
            // Either is an answer to this request only when it carries the request's id.
            guard.answered = true;
            let text = response.bytes().await.unwrap_or_default();
            return match serde_json::from_slice::<Value>(&text) {
                Ok(message) if message.get("id").and_then(Value::as_u64) == Some(id) => Ok(message),
                _ => Err(Failure::SessionGone),
            };
        }
        let answer =
            match read_answer(response, id, caller, |request| self.answer_server_request(session, request, caller))
                .await
            {
                Ok(answer) => answer,
                // A proxy in front of it saying it is gone.
                Err(error) if matches!(status.as_u16(), 502..=504) => return Err(Failure::Other(error)),
                // The upstream is there but failed this request: the caller gets an error; the
                // session and the connection's health stay (one tool's fault must not reset
                // every caller's session). The guard still tells the upstream to stop.
                Err(error) => {
                    return Ok(json!({ "jsonrpc": "2.0", "id": id, "error": {
                        "code": -32603, "message": format!("the upstream failed this request: {error}") } }));
                }
            };
        guard.answered = true;
        Ok(answer)
    }

    /// Answers a request the upstream sent on a request's stream: asks the caller's client
    /// when it can be asked, refuses otherwise.
    async fn answer_server_request(&self, session: &Session, request: Value, caller: &CallerMeta) -> Option<()> {
        let Some(id) = request.get("id").cloned() else {
            // A notification that is not about the request (a list change): as on the GET stream.
            return self.on_common(session, request).await;
        };
        let method = request.get("method").and_then(Value::as_str).unwrap_or_default();
        let params = request.get("params").cloned().unwrap_or_else(|| json!({}));
        let outcome = match (method, &caller.ask_client) {
            ("ping", _) => Ok(json!({})),
            (_, Some(client)) if capability_for(method).is_some() => client.ask(method, params).await,
            _ => Err(Refused {
                code: -32601,
                message: format!("{method} cannot be passed to this caller's client through Portcullis"),
            }),
        };
        let reply = match outcome {
            Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
            Err(refused) => {
                json!({ "jsonrpc": "2.0", "id": id, "error": { "code": refused.code, "message": refused.message } })
            }
        };
        let _ = self.post(session, &reply).send().await;
        Some(())
    }
}

/// What says which session a request belongs to: its version and id.
fn session_headers(session: &Session) -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(2);
    if let Ok(version) = http::HeaderValue::from_str(session.version.as_str()) {
        headers.insert("mcp-protocol-version", version);
    }
    if let Some(id) = session.id.as_deref().and_then(|id| http::HeaderValue::from_str(id).ok()) {
        headers.insert("mcp-session-id", id);
    }
    headers
}

/// The answer to request `id`: a JSON body, or the event stream on which notifications about
/// it go to the caller's sink and server requests to `on_request`.
async fn read_answer<F, Fut>(
    response: UpstreamAnswer,
    id: u64,
    caller: &CallerMeta,
    on_request: F,
) -> Result<Value, String>
where
    F: FnMut(Value) -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let status = response.status();
    if response.is_event_stream() {
        return read_event_stream(response, id, caller.notifications.as_ref(), on_request).await;
    }
    let text = response.bytes().await?;
    match serde_json::from_slice::<Value>(&text) {
        // A JSON-RPC error with an HTTP error status is still the answer.
        Ok(message) if message.get("result").is_some() || message.get("error").is_some() => Ok(message),
        _ if !status.is_success() => Err(format!("HTTP status {status}")),
        _ => Err("the upstream answered neither a result nor an error".into()),
    }
}

/// Reads the session's GET stream (from `opened`, when it is open already) while the session is
/// current, reopening it after a break; a server without one (405) or that forgot the session
/// ends it.
async fn listen(calls: std::sync::Weak<LegacyCalls>, session: Arc<Session>, mut opened: Option<reqwest::Response>) {
    let mut backoff = std::time::Duration::from_secs(1);
    let mut ended = session.ended.subscribe();
    loop {
        let Some(this) = calls.upgrade() else { return };
        if *ended.borrow() || !this.is_current(&session) {
            return;
        }
        let response = match opened.take() {
            Some(response) => response,
            None => match this.open_stream(&session).await {
                Opened::Stream(response) => response,
                Opened::Refused => return,
                Opened::Failed => {
                    drop(this);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                    continue;
                }
            },
        };
        backoff = std::time::Duration::from_secs(1);
        drop(this);
        // The stream has no answer to wait for: id 0 is never a request of ours. It holds the
        // connection only weakly, so a connection that is replaced or removed goes away.
        let read = read_event_stream(response, 0, None, |message| {
            let (calls, session) = (calls.clone(), session.clone());
            async move { calls.upgrade()?.on_common(&session, message).await }
        });
        // An ended session lets its stream go at once, whether or not the server closes it.
        tokio::select! {
            _ = read => {}
            _ = ended.wait_for(|ended| *ended) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = ended.wait_for(|ended| *ended) => return,
        }
    }
}

/// Ends, now and then, the client sessions unused for the idle time, while the connection
/// lives.
async fn sweep(calls: std::sync::Weak<LegacyCalls>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(this) = calls.upgrade() else { return };
        this.sweep_idle().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small 2025 server over HTTP: it numbers the sessions it starts, answers `tools/call`
    /// with the session it was called on, has no GET stream, and records the sessions ended
    /// with DELETE.
    async fn session_numbering_server() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use axum::routing::post;
        let ended: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let started = Arc::new(AtomicU64::new(0));
        let session_of = |headers: &http::HeaderMap| {
            headers.get("mcp-session-id").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string()
        };
        let app = axum::Router::new().route(
            "/mcp",
            post(move |headers: http::HeaderMap, body: String| {
                let started = started.clone();
                async move {
                    use axum::response::IntoResponse;
                    let message: Value = serde_json::from_str(&body).unwrap_or_default();
                    let Some(id) = message.get("id").cloned() else {
                        return http::StatusCode::ACCEPTED.into_response();
                    };
                    let (session, result) = match message["method"].as_str() {
                        Some("initialize") => {
                            let n = started.fetch_add(1, Ordering::Relaxed) + 1;
                            let result = json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                                "serverInfo": {"name": "numbering", "version": "1"}});
                            (format!("upstream-{n}"), result)
                        }
                        _ => {
                            let session = session_of(&headers);
                            (session.clone(), json!({"content": [{"type": "text", "text": session}]}))
                        }
                    };
                    let mut response =
                        axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response();
                    response.headers_mut().insert("mcp-session-id", session.parse().expect("header value"));
                    response
                }
            })
            .get(|| async { http::StatusCode::METHOD_NOT_ALLOWED })
            .delete({
                let ended = ended.clone();
                move |headers: http::HeaderMap| async move {
                    ended.lock().expect("lock").push(session_of(&headers));
                    http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/mcp", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, ended)
    }

    fn calls_to(url: &str, idle: std::time::Duration) -> Arc<LegacyCalls> {
        calls_with(url, idle, Arc::new(crate::sessions::MemorySessions::new(std::time::Duration::from_secs(60))))
    }

    fn calls_with(
        url: &str,
        idle: std::time::Duration,
        store: Arc<dyn crate::sessions::SessionStore>,
    ) -> Arc<LegacyCalls> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let upstream = portcullis_crds::snapshot::Upstream::Mcp {
            url: url.to_string(),
            headers: Vec::new(),
            refresh_interval_seconds: 60,
            run_as_tasks: Default::default(),
        };
        let announcements = Announcements {
            catalog_changed: Arc::default(),
            changes: crate::changes::Changes::new(),
            tenant: "t".into(),
            connection: "c".into(),
        };
        let sessions = ClientSessions { idle, replies: Default::default(), store };
        LegacyCalls::new(Arc::new(Transport::new(reqwest::Client::new(), &upstream)), announcements, sessions)
    }

    /// The upstream session a call of `client` (none: a REST caller) was served on.
    async fn served_on(calls: &Arc<LegacyCalls>, client: Option<&str>) -> String {
        let caller = CallerMeta {
            client_session: client.map(|id| super::super::ClientSession { id: id.into(), capabilities: None }),
            ..CallerMeta::default()
        };
        let params = json!({"name": "whoami", "arguments": {}}).as_object().cloned().unwrap_or_default();
        let answer = calls.request("tools/call", params, &caller, None).await.expect("answered");
        answer["result"]["content"][0]["text"].as_str().expect("text").to_string()
    }

    #[tokio::test]
    async fn each_client_session_has_its_own_upstream_session_which_ends_with_it_or_unused() {
        let (url, ended) = session_numbering_server().await;
        let store = Arc::new(crate::sessions::MemorySessions::new(std::time::Duration::from_secs(60)));
        // client-3's session lives on (its client uses other replicas or connections).
        let live = crate::sessions::Session {
            id: "client-3".into(),
            tenant: "t".into(),
            endpoint: "e".into(),
            subject: "apikey:k".into(),
            protocol_version: "2025-11-25".into(),
            client_name: None,
            created_at: chrono::Utc::now(),
            client_capabilities: None,
            log_level: None,
            subscriptions: Vec::new(),
        };
        crate::sessions::SessionStore::create(store.as_ref(), live).await.expect("stored");
        let calls = calls_with(&url, std::time::Duration::from_millis(300), store);
        let first = served_on(&calls, Some("client-1")).await;
        let second = served_on(&calls, Some("client-2")).await;
        let third = served_on(&calls, Some("client-3")).await;
        let shared = served_on(&calls, None).await;
        assert_ne!(first, second, "two clients, two upstream sessions");
        assert_ne!(first, shared, "callers without a session share another");
        assert_eq!(served_on(&calls, Some("client-1")).await, first, "a client keeps its session");
        assert_eq!(served_on(&calls, None).await, shared);

        // The client's session ends: so does its upstream session, and a later request of the
        // same id starts another.
        calls.end_client("client-1");
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !ended.lock().expect("lock").contains(&first) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("DELETE reached the upstream");
        let again = served_on(&calls, Some("client-1")).await;
        assert!(![first.as_str(), second.as_str(), shared.as_str()].contains(&again.as_str()), "{again}");

        // Unused here for the idle time: client sessions that ended end, the shared one and
        // that of the client that lives stay.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        calls.sweep_idle().await;
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !(ended.lock().expect("lock").contains(&second) && ended.lock().expect("lock").contains(&again)) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("idle sessions were ended upstream");
        assert!(!ended.lock().expect("lock").contains(&shared));
        assert!(!ended.lock().expect("lock").contains(&third), "its client lives");
        assert_eq!(served_on(&calls, None).await, shared);
        assert_eq!(served_on(&calls, Some("client-3")).await, third);

        // The connection goes away: its sessions end upstream.
        drop(calls);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !(ended.lock().expect("lock").contains(&shared) && ended.lock().expect("lock").contains(&third)) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("ended with the connection");
    }

    #[tokio::test]
    async fn a_replica_keeps_a_bounded_number_of_client_sessions_and_lets_the_least_recent_go() {
        let calls = calls_to("http://127.0.0.1:9/mcp", std::time::Duration::from_secs(60));
        let client = |n: usize| Owner::Client(format!("client-{n}"));
        let later = || std::thread::sleep(std::time::Duration::from_millis(3));
        calls.slot(&Owner::Shared(Asks::default()));
        calls.slot(&client(0));
        calls.slot(&client(1));
        later();
        for n in 2..CLIENT_SESSIONS {
            calls.slot(&client(n));
        }
        // Client 0 used again: client 1 is now the least recent.
        later();
        calls.slot(&client(0));
        calls.slot(&client(CLIENT_SESSIONS));
        let slots = calls.slots();
        assert_eq!(slots.len(), CLIENT_SESSIONS + 1, "the bound, and the shared session");
        assert!(slots.contains_key(&client(0)) && slots.contains_key(&client(CLIENT_SESSIONS)));
        assert!(!slots.contains_key(&client(1)));
        assert!(slots.contains_key(&Owner::Shared(Asks::default())));
    }

    #[test]
    fn sessions_declare_exactly_what_their_callers_can_be_asked() {
        assert_eq!(Asks::of(None).capabilities(), json!({}));
        assert_eq!(Asks::of(Some(&json!({"experimental": {"x": {}}}))), Asks::default());
        let declared =
            json!({"sampling": {"tools": {}, "unknown": {}}, "roots": {"listChanged": true}, "extensions": {}});
        let asks = Asks::of(Some(&declared));
        assert_eq!(asks.capabilities(), json!({"sampling": {"tools": {}}, "roots": {}}));
        // The declared capabilities of a session choose the same session again.
        assert_eq!(Asks::of(Some(&asks.capabilities())), asks);
        assert_ne!(Asks::of(Some(&json!({"elicitation": {}}))), Asks::of(Some(&json!({"elicitation": {"url": {}}}))));
    }
}
