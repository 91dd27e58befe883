//! What API pods observe of their upstream connections, for the operator to mirror into status.
//! Pods upsert a row per connection every few seconds; readers take the freshest row per
//! connection and ignore rows older than a cut-off, so a pod that died stops counting.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::BTreeMap;

/// One pod's view of one connection.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionReport {
    /// Namespace of the connection.
    pub tenant: String,
    /// Connection name.
    pub connection: String,
    /// `unknown`, `healthy` or `unhealthy`.
    pub health: String,
    /// Upstream tool names in the last catalog.
    pub tools: Vec<String>,
    /// Config version the pod was serving.
    pub config_version: Option<i64>,
    /// When the pod wrote it.
    pub reported_at: DateTime<Utc>,
}

/// Writes `reports` as seen by `reporter` (a pod name), replacing its earlier rows, in one
/// statement so a reader never sees half of a pod's report.
pub async fn write(pool: &PgPool, reporter: &str, reports: &[ConnectionReport]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM connection_reports WHERE reporter = $1").bind(reporter).execute(&mut *tx).await?;
    for r in reports {
        sqlx::query(
            "INSERT INTO connection_reports (tenant, connection, reporter, health, tools, config_version, reported_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&r.tenant)
        .bind(&r.connection)
        .bind(reporter)
        .bind(&r.health)
        .bind(serde_json::to_value(&r.tools).unwrap_or_default())
        .bind(r.config_version)
        .bind(r.reported_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

type ReportRow = (String, String, String, serde_json::Value, Option<i64>, DateTime<Utc>);

/// The freshest report per (tenant, connection) written after `since`.
pub async fn latest(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<BTreeMap<(String, String), ConnectionReport>, sqlx::Error> {
    let rows: Vec<ReportRow> = sqlx::query_as(
        "SELECT DISTINCT ON (tenant, connection) tenant, connection, health, tools, config_version, reported_at \
         FROM connection_reports WHERE reported_at >= $1 ORDER BY tenant, connection, reported_at DESC",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant, connection, health, tools, config_version, reported_at)| {
            let tools = serde_json::from_value(tools).unwrap_or_default();
            (
                (tenant.clone(), connection.clone()),
                ConnectionReport { tenant, connection, health, tools, config_version, reported_at },
            )
        })
        .collect())
}

/// Deletes rows nobody refreshed since `before`.
pub async fn prune(pool: &PgPool, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM connection_reports WHERE reported_at < $1")
        .bind(before)
        .execute(pool)
        .await?
        .rows_affected())
}
