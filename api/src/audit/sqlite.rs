//! The audit log in SQLite (dev mode). Times are stored as fixed-width RFC 3339 text, which
//! sorts like the time itself.

use super::{AuditEvent, AuditFilter, AuditPage, Status, decode_cursor, encode_cursor};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::SqlitePool;

fn stored_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) async fn insert(pool: &SqlitePool, events: &[AuditEvent]) -> Result<(), sqlx::Error> {
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

pub(super) async fn query(pool: &SqlitePool, tenant: &str, filter: &AuditFilter) -> Result<AuditPage, sqlx::Error> {
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
    for (column, value) in filter.exact_matches() {
        if let Some(value) = value {
            q.push(format_args!(" AND {column} = ")).push_bind(value.clone());
        }
    }
    if let Some((time, id)) = filter.cursor.as_deref().and_then(decode_cursor) {
        q.push(" AND (time < ").push_bind(time.clone());
        q.push(" OR (time = ").push_bind(time).push(" AND id < ").push_bind(id).push("))");
    }
    q.push(" ORDER BY time DESC, id DESC LIMIT ").push_bind(i64::from(limit) + 1);
    let mut rows: Vec<Row> = q.build_query_as::<Row>().fetch_all(pool).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_cursor(&r.time, &r.id))
    } else {
        None
    };
    Ok(AuditPage { items: rows.into_iter().map(Row::into_event).collect(), next_cursor })
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
            status: Status::parse(&self.status),
            error_code: self.error_code,
            detail: self.detail,
            latency_ms: self.latency_ms,
            request_id: self.request_id,
        }
    }
}
