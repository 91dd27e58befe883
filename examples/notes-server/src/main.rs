//! notes-mcp-server: a small MCP server that keeps notes in memory, served over Streamable HTTP.
//!
//! It exists so the Portcullis quickstart and end-to-end tests have a real upstream that runs
//! offline. `--protocol legacy` makes it a 2025-11-25-only server (no `server/discover`), to
//! exercise Portcullis's fallback to the `initialize` handshake.

use axum::serve::ListenerExt;
use clap::{Parser, ValueEnum};
use rmcp::{
    RoleServer, ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{
        CallToolResult, ContentBlock as Content, Implementation, ProtocolVersion, ServerCapabilities, ServerConfig,
        SubscriptionFilter,
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

struct Store {
    next_id: u64,
    notes: Vec<Note>,
    dynamic_tools: bool,
    archive_enabled: bool,
    tools_changed: tokio::sync::broadcast::Sender<()>,
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
            let _ = store.tools_changed.send(());
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

    #[tool(description = "Add a note; returns its id")]
    fn add_note(&self, Parameters(AddNote { title, body }): Parameters<AddNote>) -> String {
        let mut store = lock(&self.store);
        store.next_id += 1;
        let id = store.next_id;
        store.notes.push(Note { id, title, body });
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
    fn delete_note(&self, Parameters(NoteId { id }): Parameters<NoteId>) -> CallToolResult {
        let mut store = lock(&self.store);
        let before = store.notes.len();
        store.notes.retain(|n| n.id != id);
        if store.notes.len() < before {
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

#[tool_handler(router = self.router())]
impl ServerHandler for Notes {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tool_list_changed().build())
            .with_server_info(Implementation::new("notes-mcp-server", env!("CARGO_PKG_VERSION")))
            .with_instructions("Keeps short notes in memory. Use add_note, list_notes, search_notes, get_note.")
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        Some(requested.intersection(&SubscriptionFilter::builder().tools_list_changed().build()))
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), rmcp::ErrorData> {
        let mut changes = lock(&self.store).tools_changed.subscribe();
        loop {
            tokio::select! {
                _ = context.cancelled() => return Ok(()),
                change = changes.recv() => {
                    if change.is_err() || context.sink().notify_tool_list_changed().await.is_err() {
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
        tools_changed: tokio::sync::broadcast::channel(16).0,
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
