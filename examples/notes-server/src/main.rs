//! notes-mcp-server: a small MCP server that keeps notes in memory, served over Streamable HTTP.
//!
//! It exists so the Portcullis quickstart and end-to-end tests have a real upstream that runs
//! offline. `--protocol legacy` makes it a 2025-11-25-only server (no `server/discover`), to
//! exercise Portcullis's fallback to the `initialize` handshake.
//!
//! Besides tools it offers each note as a resource (`note://<id>`, also as the template
//! `note://{id}`), a static index (`notes://index`) and a small PNG (`notes://logo.png`, a blob),
//! the prompt `summarize_note`, and completion of note ids for both.

use axum::serve::ListenerExt;
use clap::{Parser, ValueEnum};
use rmcp::{
    RoleServer, ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{
        CallToolResult, CompleteRequestParams, CompleteResult, ContentBlock as Content, GetPromptRequestParams,
        GetPromptResponse, GetPromptResult, Implementation, ListPromptsResult, ListResourceTemplatesResult,
        ListResourcesResult, PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
        ReadResourceResult, ServerCapabilities, ServerConfig, SubscriptionFilter,
    },
    schemars,
    service::{RequestContext, SubscriptionContext},
    tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use serde::Deserialize;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Protocol {
    /// 2026-07-28 (stateless) and every 2025 version.
    Both,
    /// Only 2025-11-25 and older: the initialize handshake and sessions.
    Legacy,
}

#[derive(Parser, Debug)]
#[command(about = "A small in-memory notes MCP server (Streamable HTTP at /mcp)")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "NOTES_LISTEN", default_value = "127.0.0.1:8765")]
    listen: String,
    /// Which protocol generations to speak.
    #[arg(long, value_enum, default_value_t = Protocol::Both)]
    protocol: Protocol,
    /// Offer `toggle_archive`, which adds or removes the `archive_note` tool and announces the
    /// change with `notifications/tools/list_changed` (for testing catalog refreshes).
    #[arg(long)]
    dynamic_tools: bool,
}

#[derive(Clone, Debug)]
struct Note {
    id: u64,
    title: String,
    body: String,
}

/// What changed, for `listen` streams: a list, or one resource.
#[derive(Clone, Debug)]
enum Changed {
    Tools,
    Resources,
    Updated(String),
}

struct Store {
    next_id: u64,
    notes: Vec<Note>,
    dynamic_tools: bool,
    archive_enabled: bool,
    changed: tokio::sync::broadcast::Sender<Changed>,
    // 2025 sessions that subscribed to a resource (2026-07-28 clients subscribe through `listen`).
    subscribers: Vec<(String, rmcp::Peer<RoleServer>)>,
}

#[derive(Clone)]
struct Notes {
    store: Arc<Mutex<Store>>,
    protocol: Protocol,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct AddNote {
    /// Short title of the note.
    title: String,
    /// Text of the note.
    body: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct NoteId {
    /// Id returned by add_note or list_notes.
    id: u64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Search {
    /// Case-insensitive text to look for in titles and bodies.
    query: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Echo {
    /// Text to return unchanged.
    text: String,
    /// Repeat the text this many times (to produce large results).
    #[serde(default)]
    repeat: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Sleep {
    /// How long to wait, in milliseconds.
    millis: u64,
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[tool_router]
impl Notes {
    fn with_store(store: Arc<Mutex<Store>>, protocol: Protocol) -> Self {
        Self { store, protocol, tool_router: Self::tool_router() }
    }

    /// The tools offered right now: the dynamic ones only when enabled.
    fn router(&self) -> ToolRouter<Self> {
        let store = lock(&self.store);
        let mut router = self.tool_router.clone();
        if !store.dynamic_tools {
            router.remove_route("toggle_archive");
        }
        if !store.archive_enabled {
            router.remove_route("archive_note");
        }
        router
    }

    #[tool(description = "Add or remove the archive_note tool (announces the change)")]
    async fn toggle_archive(&self, context: RequestContext<RoleServer>) -> String {
        let enabled = {
            let mut store = lock(&self.store);
            store.archive_enabled = !store.archive_enabled;
            let _ = store.changed.send(Changed::Tools);
            store.archive_enabled
        };
        // 2025 sessions hear it on their GET stream; 2026-07-28 listeners through `listen`.
        let _ = context.peer.notify_tool_list_changed().await;
        format!("archive_note {}", if enabled { "enabled" } else { "disabled" })
    }

    #[tool(description = "Archive a note by id (present only while enabled)")]
    fn archive_note(&self, Parameters(NoteId { id }): Parameters<NoteId>) -> String {
        format!("archived note {id}")
    }

    /// Each note is a resource: adding or deleting one changes the resource list, and the
    /// content of notes://index, which subscribers hear about.
    async fn resources_changed(&self, context: &RequestContext<RoleServer>) {
        let index = "notes://index";
        let subscribers: Vec<rmcp::Peer<RoleServer>> = {
            let store = lock(&self.store);
            let _ = store.changed.send(Changed::Resources);
            let _ = store.changed.send(Changed::Updated(index.to_string()));
            store.subscribers.iter().filter(|(uri, _)| uri == index).map(|(_, peer)| peer.clone()).collect()
        };
        let _ = context.peer.notify_resource_list_changed().await;
        for peer in subscribers {
            let _ = peer.notify_resource_updated(rmcp::model::ResourceUpdatedNotificationParam::new(index)).await;
        }
    }

    #[tool(description = "Add a note; returns its id")]
    async fn add_note(
        &self,
        Parameters(AddNote { title, body }): Parameters<AddNote>,
        context: RequestContext<RoleServer>,
    ) -> String {
        let id = {
            let mut store = lock(&self.store);
            store.next_id += 1;
            let id = store.next_id;
            store.notes.push(Note { id, title, body });
            id
        };
        self.resources_changed(&context).await;
        format!("added note {id}")
    }

    #[tool(description = "List all notes (id and title)")]
    fn list_notes(&self) -> String {
        let store = lock(&self.store);
        if store.notes.is_empty() {
            return "no notes yet".to_string();
        }
        store.notes.iter().map(|n| format!("{}: {}", n.id, n.title)).collect::<Vec<_>>().join("\n")
    }

    #[tool(description = "Read one note by id")]
    fn get_note(&self, Parameters(NoteId { id }): Parameters<NoteId>) -> CallToolResult {
        let store = lock(&self.store);
        match store.notes.iter().find(|n| n.id == id) {
            Some(n) => CallToolResult::success(vec![Content::text(format!("# {}\n\n{}", n.title, n.body))]),
            None => CallToolResult::error(vec![Content::text(format!("no note with id {id}"))]),
        }
    }

    #[tool(description = "Find notes whose title or body contains the query")]
    fn search_notes(&self, Parameters(Search { query }): Parameters<Search>) -> String {
        let store = lock(&self.store);
        let q = query.to_lowercase();
        let hits: Vec<String> = store
            .notes
            .iter()
            .filter(|n| n.title.to_lowercase().contains(&q) || n.body.to_lowercase().contains(&q))
            .map(|n| format!("{}: {}", n.id, n.title))
            .collect();
        if hits.is_empty() { format!("no note matches {query:?}") } else { hits.join("\n") }
    }

    #[tool(description = "Delete a note by id")]
    async fn delete_note(
        &self,
        Parameters(NoteId { id }): Parameters<NoteId>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let deleted = {
            let mut store = lock(&self.store);
            let before = store.notes.len();
            store.notes.retain(|n| n.id != id);
            store.notes.len() < before
        };
        if deleted {
            self.resources_changed(&context).await;
            CallToolResult::success(vec![Content::text(format!("deleted note {id}"))])
        } else {
            CallToolResult::error(vec![Content::text(format!("no note with id {id}"))])
        }
    }

    #[tool(description = "Return the text unchanged, optionally repeated")]
    fn echo(&self, Parameters(Echo { text, repeat }): Parameters<Echo>) -> String {
        text.repeat(repeat.unwrap_or(1).min(1_000_000))
    }

    #[tool(description = "Wait for the given number of milliseconds, then answer")]
    async fn sleep(&self, Parameters(Sleep { millis }): Parameters<Sleep>) -> String {
        tokio::time::sleep(std::time::Duration::from_millis(millis.min(600_000))).await;
        format!("slept {millis} ms")
    }
}

/// A 1×1 transparent PNG.
const LOGO_PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, rmcp::ErrorData> {
    serde_json::from_value(value).map_err(|e| rmcp::ErrorData::internal_error(e.to_string(), None))
}

impl Notes {
    fn note(&self, uri: &str) -> Option<Note> {
        let id: u64 = uri.strip_prefix("note://")?.parse().ok()?;
        lock(&self.store).notes.iter().find(|n| n.id == id).cloned()
    }

    fn ids_starting_with(&self, prefix: &str) -> Vec<String> {
        let store = lock(&self.store);
        store.notes.iter().map(|n| n.id.to_string()).filter(|id| id.starts_with(prefix)).collect()
    }
}

#[tool_handler(router = self.router())]
impl ServerHandler for Notes {
    async fn subscribe(
        &self,
        request: rmcp::model::SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        lock(&self.store).subscribers.push((request.uri, context.peer));
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: rmcp::model::UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), rmcp::ErrorData> {
        // Ends every session's subscription to the URI: enough for a demo server.
        lock(&self.store).subscribers.retain(|(uri, _)| *uri != request.uri);
        Ok(())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, rmcp::ErrorData> {
        let mut resources = vec![
            serde_json::json!({"uri": "notes://index", "name": "index", "title": "All notes", "mimeType": "text/plain"}),
            serde_json::json!({"uri": "notes://logo.png", "name": "logo", "mimeType": "image/png"}),
        ];
        for note in &lock(&self.store).notes {
            resources.push(serde_json::json!({
                "uri": format!("note://{}", note.id), "name": format!("note-{}", note.id),
                "title": note.title, "mimeType": "text/markdown",
            }));
        }
        decode(serde_json::json!({ "resources": resources }))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, rmcp::ErrorData> {
        decode(serde_json::json!({ "resourceTemplates": [
            {"uriTemplate": "note://{id}", "name": "note", "description": "A note by id", "mimeType": "text/markdown"},
        ]}))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, rmcp::ErrorData> {
        let uri = request.uri.as_str();
        let contents = match uri {
            "notes://index" => {
                let store = lock(&self.store);
                let text: Vec<String> = store.notes.iter().map(|n| format!("{}: {}", n.id, n.title)).collect();
                serde_json::json!([{ "uri": uri, "mimeType": "text/plain", "text": text.join("\n") }])
            }
            "notes://logo.png" => serde_json::json!([{ "uri": uri, "mimeType": "image/png", "blob": LOGO_PNG_BASE64 }]),
            _ => match self.note(uri) {
                Some(note) => serde_json::json!([{
                    "uri": uri, "mimeType": "text/markdown", "text": format!("# {}\n\n{}", note.title, note.body),
                }]),
                None => {
                    return Err(rmcp::ErrorData::resource_not_found(
                        format!("no resource {uri}"),
                        Some(serde_json::json!({ "uri": uri })),
                    ));
                }
            },
        };
        Ok(decode::<ReadResourceResult>(serde_json::json!({ "contents": contents }))?.into())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, rmcp::ErrorData> {
        decode(serde_json::json!({ "prompts": [{
            "name": "summarize_note",
            "description": "Ask for a summary of one note",
            "arguments": [
                {"name": "id", "description": "Id of the note", "required": true},
                {"name": "style", "description": "brief or detailed", "required": false},
            ],
        }]}))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, rmcp::ErrorData> {
        if request.name != "summarize_note" {
            return Err(rmcp::ErrorData::invalid_params(format!("unknown prompt {}", request.name), None));
        }
        let arguments = request.arguments.unwrap_or_default();
        let Some(id) = arguments.get("id").and_then(|v| v.as_str()) else {
            return Err(rmcp::ErrorData::invalid_params("argument id is required", None));
        };
        let Some(note) = self.note(&format!("note://{id}")) else {
            return Err(rmcp::ErrorData::invalid_params(format!("no note {id}"), None));
        };
        let style = arguments.get("style").and_then(|v| v.as_str()).unwrap_or("brief");
        let result: GetPromptResult = decode(serde_json::json!({
            "description": format!("Summary of note {id}"),
            "messages": [{"role": "user", "content": {"type": "text",
                "text": format!("Write a {style} summary of this note.\n\n# {}\n\n{}", note.title, note.body)}}],
        }))?;
        Ok(result.into())
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, rmcp::ErrorData> {
        let value = serde_json::to_value(&request).unwrap_or_default();
        let reference = value.get("ref").cloned().unwrap_or_default();
        let known = reference.get("name").and_then(|v| v.as_str()) == Some("summarize_note")
            || reference.get("uri").and_then(|v| v.as_str()) == Some("note://{id}");
        let values = if known && request.argument.name == "id" {
            self.ids_starting_with(&request.argument.value)
        } else {
            Vec::new()
        };
        let total = values.len();
        decode(serde_json::json!({ "completion": { "values": values, "total": total, "hasMore": false } }))
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_resources()
                .enable_resources_list_changed()
                .enable_resources_subscribe()
                .enable_prompts()
                .enable_completions()
                .build(),
        )
        .with_server_info(Implementation::new("notes-mcp-server", env!("CARGO_PKG_VERSION")))
        .with_instructions("Keeps short notes in memory. Use add_note, list_notes, search_notes, get_note.")
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        // Any resource may be followed.
        let mut offered = SubscriptionFilter::builder().tools_list_changed().resources_list_changed();
        if let Some(uris) = &requested.resource_subscriptions {
            offered = offered.resource_subscriptions(uris.iter().cloned());
        }
        Some(requested.intersection(&offered.build()))
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), rmcp::ErrorData> {
        let mut changes = lock(&self.store).changed.subscribe();
        loop {
            tokio::select! {
                _ = context.cancelled() => return Ok(()),
                change = changes.recv() => {
                    let sent = match change {
                        Ok(Changed::Tools) => context.sink().notify_tool_list_changed().await,
                        Ok(Changed::Resources) => context.sink().notify_resource_list_changed().await,
                        Ok(Changed::Updated(uri)) => context.sink().notify_resource_updated(uri).await,
                        Err(_) => return Ok(()),
                    };
                    // A kind this listener did not ask for is skipped; a closed stream ends it.
                    if matches!(sent, Err(rmcp::service::SubscriptionSendError::SubscriptionClosed | rmcp::service::SubscriptionSendError::Service(_))) {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        match self.protocol {
            Protocol::Both => Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS),
            Protocol::Legacy => Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25)),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let store = Arc::new(Mutex::new(Store {
        next_id: 0,
        notes: Vec::new(),
        dynamic_tools: args.dynamic_tools,
        archive_enabled: false,
        changed: tokio::sync::broadcast::channel(16).0,
        subscribers: Vec::new(),
    }));
    let protocol = args.protocol;
    let service: StreamableHttpService<Notes, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(Notes::with_store(store.clone(), protocol)),
        Default::default(),
        StreamableHttpServerConfig::default().disable_allowed_hosts(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    // Tests read this line to learn the port when listening on :0.
    println!("notes-mcp-server listening on http://{addr}/mcp ({:?})", args.protocol);
    // Without TCP_NODELAY, SSE responses written in several pieces wait ~40 ms for delayed ACKs.
    axum::serve(
        listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        }),
        router,
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
