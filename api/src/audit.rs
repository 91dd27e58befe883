//! The audit log: every REST request, MCP request, tool call, auth failure, denial and throttle
//! becomes one event. Events go through a bounded queue to a batching writer; when the queue is
//! full the gateway refuses new work (503) instead of doing unaudited work, and events are never
//! dropped: a failed batch is retried until it is written.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
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

/// Handle to the audit queue.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEvent>,
    pool: SqlitePool,
}

/// The writer could not take the event: the gateway must not do the work.
#[derive(Debug, thiserror::Error)]
#[error("the audit log is not accepting events")]
pub struct AuditUnavailable;

const BATCH: usize = 256;

impl AuditLog {
    /// Starts the writer; the returned handle finishes writing everything queued when awaited
    /// after every `AuditLog` clone is dropped.
    pub fn start(pool: SqlitePool, capacity: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let writer = tokio::spawn(write_loop(pool.clone(), rx));
        (Self { tx, pool }, writer)
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
        let limit = filter.limit.clamp(1, 1000);
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT id, tenant, time, subject, persona, auth_method, client_name, channel, operation, endpoint, tool, connection, status, error_code, detail, latency_ms, request_id FROM audit_events WHERE tenant = ",
        );
        q.push_bind(tenant.to_string());
        if let Some(from) = filter.from {
            q.push(" AND time >= ").push_bind(stored_time(from));
        }
        if let Some(to) = filter.to {
            q.push(" AND time < ").push_bind(stored_time(to));
        }
        // Column names come from this fixed list, never from the request.
        for (column, value) in [
            ("subject", &filter.subject),
            ("tool", &filter.tool),
            ("persona", &filter.persona),
            ("status", &filter.status),
        ] {
            if let Some(value) = value {
                q.push(format_args!(" AND {column} = ")).push_bind(value.clone());
            }
        }
        if let Some((time, id)) = filter.cursor.as_deref().and_then(decode_cursor) {
            q.push(" AND (time < ").push_bind(time.clone());
            q.push(" OR (time = ").push_bind(time).push(" AND id < ").push_bind(id).push("))");
        }
        q.push(" ORDER BY time DESC, id DESC LIMIT ").push_bind(i64::from(limit) + 1);
        let mut rows: Vec<Row> = q.build_query_as::<Row>().fetch_all(&self.pool).await?;
        let next_cursor = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|r| encode_cursor(&r.time, &r.id))
        } else {
            None
        };
        Ok(AuditPage { items: rows.into_iter().map(Row::into_event).collect(), next_cursor })
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
    /// Continue after this cursor.
    pub cursor: Option<String>,
    /// Page size.
    pub limit: u32,
}

/// One page of events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Events, newest first.
    pub items: Vec<AuditEvent>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn stored_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn encode_cursor(time: &str, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{time}|{id}"))
}

fn decode_cursor(cursor: &str) -> Option<(String, String)> {
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

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    tenant: String,
    time: String,
    subject: Option<String>,
    persona: Option<String>,
    auth_method: Option<String>,
    client_name: Option<String>,
    channel: String,
    operation: String,
    endpoint: Option<String>,
    tool: Option<String>,
    connection: Option<String>,
    status: String,
    error_code: Option<String>,
    detail: Option<String>,
    latency_ms: f64,
    request_id: String,
}

impl Row {
    fn into_event(self) -> AuditEvent {
        let status = match self.status.as_str() {
            "ok" => Status::Ok,
            "denied" => Status::Denied,
            "throttled" => Status::Throttled,
            "invalid" => Status::Invalid,
            _ => Status::Error,
        };
        AuditEvent {
            id: self.id,
            tenant: self.tenant,
            time: DateTime::parse_from_rfc3339(&self.time).map(|t| t.with_timezone(&Utc)).unwrap_or_default(),
            subject: self.subject,
            persona: self.persona,
            auth_method: self.auth_method,
            client_name: self.client_name,
            channel: self.channel,
            operation: self.operation,
            endpoint: self.endpoint,
            tool: self.tool,
            connection: self.connection,
            status,
            error_code: self.error_code,
            detail: self.detail,
            latency_ms: self.latency_ms,
            request_id: self.request_id,
        }
    }
}

async fn write_loop(pool: SqlitePool, mut rx: mpsc::Receiver<AuditEvent>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let mut delay = Duration::from_millis(100);
        // A batch stays in memory until written: events wait out a database outage.
        while let Err(error) = insert(&pool, &batch).await {
            tracing::error!(?error, events = batch.len(), "Audit write failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        batch.clear();
    }
}

async fn insert(pool: &SqlitePool, events: &[AuditEvent]) -> Result<(), sqlx::Error> {
    let mut builder = sqlx::QueryBuilder::new(
        "INSERT INTO audit_events (id, tenant, time, subject, persona, auth_method, client_name, channel, operation, endpoint, tool, connection, status, error_code, detail, latency_ms, request_id) ",
    );
    builder.push_values(events, |mut b, e| {
        b.push_bind(&e.id)
            .push_bind(&e.tenant)
            .push_bind(stored_time(e.time))
            .push_bind(&e.subject)
            .push_bind(&e.persona)
            .push_bind(&e.auth_method)
            .push_bind(&e.client_name)
            .push_bind(&e.channel)
            .push_bind(&e.operation)
            .push_bind(&e.endpoint)
            .push_bind(&e.tool)
            .push_bind(&e.connection)
            .push_bind(e.status.as_str())
            .push_bind(&e.error_code)
            .push_bind(&e.detail)
            .push_bind(e.latency_ms)
            .push_bind(&e.request_id);
    });
    builder.build().execute(pool).await.map(|_| ())
}
