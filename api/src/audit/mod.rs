//! The audit log: every REST request, MCP request, tool call, auth failure, denial and throttle
//! becomes one event. Events go through a bounded queue to a batching writer; when the queue is
//! full the gateway refuses new work (503) instead of doing unaudited work, and events are never
//! dropped: a failed batch is retried until it is written.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, SqlitePool};

mod postgres;
mod sqlite;
use std::time::Duration;
use tokio::sync::mpsc;

/// Outcome of an audited operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Succeeded.
    Ok,
    /// Failed: upstream failure, timeout, tool error, not found.
    Error,
    /// Refused: no or bad credential, not permitted.
    Denied,
    /// Refused by a rate limit.
    Throttled,
    /// Refused as malformed.
    Invalid,
}

impl Status {
    /// Reads the stored form.
    pub fn parse(text: &str) -> Status {
        match text {
            "ok" => Status::Ok,
            "denied" => Status::Denied,
            "throttled" => Status::Throttled,
            "invalid" => Status::Invalid,
            _ => Status::Error,
        }
    }

    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Denied => "denied",
            Status::Throttled => "throttled",
            Status::Invalid => "invalid",
        }
    }
}

/// One audit event.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEvent {
    /// Event id (UUIDv7, time-ordered).
    pub id: String,
    /// Tenant (namespace); for unauthenticated requests, the tenant named by the URL if any.
    pub tenant: String,
    /// When the request arrived.
    pub time: DateTime<Utc>,
    /// Who: `apikey:<name>` for API keys.
    pub subject: Option<String>,
    /// Persona the request acted as.
    pub persona: Option<String>,
    /// `api_key`, or null when no credential was accepted.
    pub auth_method: Option<String>,
    /// MCP client name from `clientInfo`.
    pub client_name: Option<String>,
    /// `rest` or `mcp`.
    pub channel: String,
    /// HTTP method and route, or the JSON-RPC method.
    pub operation: String,
    /// MCP endpoint name.
    pub endpoint: Option<String>,
    /// Exposed tool name, for tool calls.
    pub tool: Option<String>,
    /// Connection that served the tool call.
    pub connection: Option<String>,
    /// Outcome.
    pub status: Status,
    /// HTTP status or JSON-RPC error code of a failure.
    pub error_code: Option<String>,
    /// Why a request was refused or failed (never credentials or payloads).
    pub detail: Option<String>,
    /// Time to answer, in milliseconds.
    pub latency_ms: f64,
    /// Request id, also sent as `X-Request-Id`.
    pub request_id: String,
}

impl AuditEvent {
    /// An event for `channel`/`operation` of `tenant`, with everything else empty.
    pub fn new(
        tenant: &str,
        channel: &str,
        operation: impl Into<String>,
        request_id: &str,
        time: DateTime<Utc>,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            tenant: tenant.to_string(),
            time,
            subject: None,
            persona: None,
            auth_method: None,
            client_name: None,
            channel: channel.to_string(),
            operation: operation.into(),
            endpoint: None,
            tool: None,
            connection: None,
            status: Status::Ok,
            error_code: None,
            detail: None,
            latency_ms: 0.0,
            request_id: request_id.to_string(),
        }
    }
}

/// Where events are stored: SQLite in dev mode, Postgres in production.
#[derive(Clone)]
pub enum AuditStore {
    /// Dev mode.
    Sqlite(SqlitePool),
    /// Production (range-partitioned by month).
    Postgres(PgPool),
}

impl AuditStore {
    async fn insert(&self, events: &[AuditEvent]) -> Result<(), sqlx::Error> {
        match self {
            AuditStore::Sqlite(pool) => sqlite::insert(pool, events).await,
            AuditStore::Postgres(pool) => postgres::insert(pool, events).await,
        }
    }
}

/// Handle to the audit queue.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEvent>,
    store: AuditStore,
}

/// The writer could not take the event: the gateway must not do the work.
#[derive(Debug, thiserror::Error)]
#[error("the audit log is not accepting events")]
pub struct AuditUnavailable;

const BATCH: usize = 256;
/// How long the writer waits for more events before writing a batch.
const LINGER: Duration = Duration::from_millis(10);

impl AuditLog {
    /// Counts, success rate and latency percentiles over `[from, to)`, overall and per tool.
    pub async fn overview(
        &self,
        tenant: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Overview, sqlx::Error> {
        let (overall, tools) = match &self.store {
            AuditStore::Sqlite(pool) => sqlite::overview(pool, tenant, from, to).await?,
            AuditStore::Postgres(pool) => postgres::overview(pool, tenant, from, to).await?,
        };
        Ok(Overview { from, to, overall, tools })
    }

    /// Starts the writer; the returned handle finishes writing everything queued when awaited
    /// after every `AuditLog` clone is dropped.
    pub fn start(store: AuditStore, capacity: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let writer = tokio::spawn(write_loop(store.clone(), rx));
        (Self { tx, store }, writer)
    }

    /// Whether there is room for the event of a request about to start.
    pub fn has_capacity(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Queues an event, waiting for room rather than dropping it.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditUnavailable> {
        self.tx.send(event).await.map_err(|_| AuditUnavailable)
    }

    /// Events of `tenant`, newest first, matching `filter`.
    pub async fn query(&self, tenant: &str, filter: &AuditFilter) -> Result<AuditPage, sqlx::Error> {
        match &self.store {
            AuditStore::Sqlite(pool) => sqlite::query(pool, tenant, filter).await,
            AuditStore::Postgres(pool) => postgres::query(pool, tenant, filter).await,
        }
    }
}

/// Filters of the audit query.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Events at or after.
    pub from: Option<DateTime<Utc>>,
    /// Events before.
    pub to: Option<DateTime<Utc>>,
    /// Exact subject.
    pub subject: Option<String>,
    /// Exact persona.
    pub persona: Option<String>,
    /// Exact exposed tool name.
    pub tool: Option<String>,
    /// Exact status.
    pub status: Option<String>,
    /// Exact connection.
    pub connection: Option<String>,
    /// Exact endpoint.
    pub endpoint: Option<String>,
    /// Exact auth method.
    pub auth_method: Option<String>,
    /// Continue after this cursor.
    pub cursor: Option<String>,
    /// Page number (from 1) for offset paging with a total, instead of the cursor.
    pub page: Option<u32>,
    /// Page size.
    pub limit: u32,
}

impl AuditFilter {
    /// Columns matched exactly, with the wanted values.
    fn exact_matches(&self) -> [(&'static str, &Option<String>); 7] {
        [
            ("subject", &self.subject),
            ("tool", &self.tool),
            ("persona", &self.persona),
            ("status", &self.status),
            ("connection", &self.connection),
            ("endpoint", &self.endpoint),
            ("auth_method", &self.auth_method),
        ]
    }
}

/// One page of events.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Events, newest first.
    pub items: Vec<AuditEvent>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// With `page`: events matching the filters in all pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    /// With `page`: this page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// With `page`: the page size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_page: Option<u32>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Serialize, utoipa::ToSchema, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Counts and latency of a set of events.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Events.
    pub count: i64,
    /// Share of events with status `ok`, 0 to 1.
    pub success_rate: f64,
    /// Latency percentiles.
    pub latency_ms: Latency,
}

/// Stats of one tool.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolStats {
    /// Tool name.
    pub tool: String,
    /// Its stats.
    #[serde(flatten)]
    pub stats: Stats,
}

/// Overview of a window of the audit log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// Window start.
    pub from: DateTime<Utc>,
    /// Window end.
    pub to: DateTime<Utc>,
    /// All events of the window.
    #[serde(flatten)]
    pub overall: Stats,
    /// Per tool, by count descending.
    pub tools: Vec<ToolStats>,
}

fn encode_cursor(time: &str, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{time}|{id}"))
}

fn decode_cursor(cursor: &str) -> Option<(String, String)> {
    // The cursor is the (time, id) of the last event of a page, in the store's text form.
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (time, id) = text.split_once('|')?;
    Some((time.to_string(), id.to_string()))
}

/// Whether a cursor given by a client is one we issued.
pub fn valid_cursor(cursor: &str) -> bool {
    decode_cursor(cursor).is_some()
}

async fn write_loop(store: AuditStore, mut rx: mpsc::Receiver<AuditEvent>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        // Linger briefly after the first event, so a busy gateway writes few large batches
        // instead of one statement per handful of events; an idle one waits at most LINGER.
        // It sleeps rather than waits on the queue: waiting, it would be woken by every event.
        if batch.len() < BATCH && rx.len() < BATCH - batch.len() {
            tokio::time::sleep(LINGER).await;
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(100);
        // A batch stays in memory until written: events wait out a database outage.
        while let Err(error) = store.insert(&batch).await {
            tracing::error!(?error, events = batch.len(), "Audit write failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        batch.clear();
    }
}
