//! The audit log in Postgres: `audit_events` is range-partitioned by month (see the
//! migrations); events are written in batches (one INSERT … SELECT FROM UNNEST per batch) and read with a
//! keyset cursor.

use super::{AuditEvent, AuditFilter, AuditPage, Latency, Stats, Status, ToolStats, decode_cursor, encode_cursor};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;

pub(super) async fn insert(pool: &PgPool, events: &[AuditEvent]) -> Result<(), sqlx::Error> {
    // One statement for every batch size: the columns travel as arrays and are unnested, so
    // Postgres parses and plans it once, instead of a VALUES list of up to 256 × 17 parameters
    // whose text changes with the batch size.
    fn column<'e, T>(events: &'e [AuditEvent], field: impl Fn(&'e AuditEvent) -> T) -> Vec<T> {
        events.iter().map(field).collect()
    }
    sqlx::query(
        "INSERT INTO audit_events (id, tenant, time, subject, persona, auth_method, client_name, channel, operation, \
         endpoint, tool, connection, status, error_code, detail, latency_ms, request_id) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], \
         $15::text[], $16::float8[], $17::text[]) \
         ON CONFLICT DO NOTHING", // a retried batch must not be written twice
    )
    .bind(column(events, |e| uuid::Uuid::parse_str(&e.id).unwrap_or_else(|_| uuid::Uuid::now_v7())))
    .bind(column(events, |e| e.tenant.as_str()))
    .bind(column(events, |e| e.time))
    .bind(column(events, |e| e.subject.as_deref()))
    .bind(column(events, |e| e.persona.as_deref()))
    .bind(column(events, |e| e.auth_method.as_deref()))
    .bind(column(events, |e| e.client_name.as_deref()))
    .bind(column(events, |e| e.channel.as_str()))
    .bind(column(events, |e| e.operation.as_str()))
    .bind(column(events, |e| e.endpoint.as_deref()))
    .bind(column(events, |e| e.tool.as_deref()))
    .bind(column(events, |e| e.connection.as_deref()))
    .bind(column(events, |e| e.status.as_str()))
    .bind(column(events, |e| e.error_code.as_deref()))
    .bind(column(events, |e| e.detail.as_deref()))
    .bind(column(events, |e| e.latency_ms))
    .bind(column(events, |e| e.request_id.as_str()))
    .execute(pool)
    .await
    .map(|_| ())
}

fn push_filters(q: &mut sqlx::QueryBuilder<sqlx::Postgres>, tenant: &str, filter: &AuditFilter) {
    q.push(" WHERE tenant = ").push_bind(tenant.to_string());
    if let Some(from) = filter.from {
        q.push(" AND time >= ").push_bind(from);
    }
    if let Some(to) = filter.to {
        q.push(" AND time < ").push_bind(to);
    }
    // Column names come from this fixed list, never from the request.
    for (column, value) in filter.exact_matches() {
        if let Some(value) = value {
            q.push(format_args!(" AND {column} = ")).push_bind(value.clone());
        }
    }
}

const COLUMNS: &str = "SELECT id, tenant, time, subject, persona, auth_method, client_name, channel, operation, endpoint, tool, connection, status, error_code, detail, latency_ms, request_id FROM audit_events";

pub(super) async fn query(pool: &PgPool, tenant: &str, filter: &AuditFilter) -> Result<AuditPage, sqlx::Error> {
    let limit = filter.limit.clamp(1, 1000);
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(COLUMNS);
    push_filters(&mut q, tenant, filter);
    if let Some(page) = filter.page {
        let offset = i64::from(page.max(1) - 1) * i64::from(limit);
        q.push(" ORDER BY time DESC, id DESC LIMIT ").push_bind(i64::from(limit)).push(" OFFSET ").push_bind(offset);
        let rows: Vec<Row> = q.build_query_as::<Row>().fetch_all(pool).await?;
        let mut count = sqlx::QueryBuilder::<sqlx::Postgres>::new("SELECT count(*) FROM audit_events");
        push_filters(&mut count, tenant, filter);
        let total: i64 = count.build_query_scalar().fetch_one(pool).await?;
        return Ok(AuditPage {
            items: rows.into_iter().map(Row::into_event).collect(),
            next_cursor: None,
            total: Some(total),
            page: Some(page.max(1)),
            per_page: Some(limit),
        });
    }
    let cursor = filter.cursor.as_deref().and_then(decode_cursor).and_then(|(time, id)| {
        let time = DateTime::parse_from_rfc3339(&time).ok()?.with_timezone(&Utc);
        Some((time, uuid::Uuid::parse_str(&id).ok()?))
    });
    if let Some((time, id)) = cursor {
        q.push(" AND (time, id) < (").push_bind(time).push(", ").push_bind(id).push(")");
    }
    q.push(" ORDER BY time DESC, id DESC LIMIT ").push_bind(i64::from(limit) + 1);
    let mut rows: Vec<Row> = q.build_query_as::<Row>().fetch_all(pool).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_cursor(&r.time.to_rfc3339_opts(SecondsFormat::Micros, true), &r.id.to_string()))
    } else {
        None
    };
    Ok(AuditPage { items: rows.into_iter().map(Row::into_event).collect(), next_cursor, ..Default::default() })
}

#[derive(sqlx::FromRow)]
struct OverviewRow {
    grouping: i32,
    tool: Option<String>,
    count: i64,
    ok: f64,
    p50: f64,
    p95: f64,
    p99: f64,
}

/// Computed in SQL: GROUPING SETS give the overall row and one row per tool in one scan.
pub(super) async fn overview(
    pool: &PgPool,
    tenant: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(Stats, Vec<ToolStats>), sqlx::Error> {
    let rows: Vec<OverviewRow> = sqlx::query_as(
        "SELECT GROUPING(tool) AS grouping, tool, count(*) AS count, avg((status = 'ok')::int)::float8 AS ok, \
         percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50, \
         percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95, \
         percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99 \
         FROM audit_events WHERE tenant = $1 AND time >= $2 AND time < $3 \
         GROUP BY GROUPING SETS ((), (tool)) ORDER BY 3 DESC",
    )
    .bind(tenant)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut overall = Stats::default();
    let mut tools = Vec::new();
    for OverviewRow { grouping, tool, count, ok, p50, p95, p99 } in rows {
        let stats = Stats { count, success_rate: ok, latency_ms: Latency { p50, p95, p99 } };
        match (grouping, tool) {
            (1, _) => overall = stats,
            (_, Some(tool)) => tools.push(ToolStats { tool, stats }),
            _ => {}
        }
    }
    Ok((overall, tools))
}

#[derive(sqlx::FromRow)]
struct Row {
    id: uuid::Uuid,
    tenant: String,
    time: DateTime<Utc>,
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
            id: self.id.to_string(),
            tenant: self.tenant,
            time: self.time,
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
