//! The audit log in SQLite (dev mode). Times are stored as fixed-width RFC 3339 text, which
//! sorts like the time itself.

use super::{AuditEvent, AuditFilter, AuditPage, Latency, Stats, Status, ToolStats, decode_cursor, encode_cursor};
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

fn push_filters(q: &mut sqlx::QueryBuilder<sqlx::Sqlite>, tenant: &str, filter: &AuditFilter) {
    q.push(" WHERE tenant = ").push_bind(tenant.to_string());
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
}

const COLUMNS: &str = "SELECT id, tenant, time, subject, persona, auth_method, client_name, channel, operation, endpoint, tool, connection, status, error_code, detail, latency_ms, request_id FROM audit_events";

pub(super) async fn query(pool: &SqlitePool, tenant: &str, filter: &AuditFilter) -> Result<AuditPage, sqlx::Error> {
    let limit = filter.limit.clamp(1, 1000);
    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(COLUMNS);
    push_filters(&mut q, tenant, filter);
    if let Some(page) = filter.page {
        let offset = i64::from(page.max(1) - 1) * i64::from(limit);
        q.push(" ORDER BY time DESC, id DESC LIMIT ").push_bind(i64::from(limit)).push(" OFFSET ").push_bind(offset);
        let rows: Vec<Row> = q.build_query_as::<Row>().fetch_all(pool).await?;
        let mut count = sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT count(*) FROM audit_events");
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
    Ok(AuditPage { items: rows.into_iter().map(Row::into_event).collect(), next_cursor, ..Default::default() })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn stats(mut events: Vec<(bool, f64)>) -> Stats {
    events.sort_by(|a, b| a.1.total_cmp(&b.1));
    let latencies: Vec<f64> = events.iter().map(|e| e.1).collect();
    let ok = events.iter().filter(|e| e.0).count();
    Stats {
        count: events.len() as i64,
        success_rate: if events.is_empty() { 0.0 } else { ok as f64 / events.len() as f64 },
        latency_ms: Latency {
            p50: percentile(&latencies, 0.5),
            p95: percentile(&latencies, 0.95),
            p99: percentile(&latencies, 0.99),
        },
    }
}

/// SQLite has no percentile aggregate; dev mode's small logs are summarised in process.
pub(super) async fn overview(
    pool: &SqlitePool,
    tenant: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(Stats, Vec<ToolStats>), sqlx::Error> {
    let rows: Vec<(Option<String>, String, f64)> =
        sqlx::query_as("SELECT tool, status, latency_ms FROM audit_events WHERE tenant = ? AND time >= ? AND time < ?")
            .bind(tenant)
            .bind(stored_time(from))
            .bind(stored_time(to))
            .fetch_all(pool)
            .await?;
    let mut by_tool: std::collections::BTreeMap<String, Vec<(bool, f64)>> = Default::default();
    let mut all = Vec::with_capacity(rows.len());
    for (tool, status, latency) in rows {
        let e = (status == "ok", latency);
        all.push(e);
        if let Some(tool) = tool {
            by_tool.entry(tool).or_default().push(e);
        }
    }
    let mut tools: Vec<ToolStats> =
        by_tool.into_iter().map(|(tool, events)| ToolStats { tool, stats: stats(events) }).collect();
    tools.sort_by(|a, b| b.stats.count.cmp(&a.stats.count).then(a.tool.cmp(&b.tool)));
    Ok((stats(all), tools))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
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
