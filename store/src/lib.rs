//! Postgres state shared by the API pods, the operator and `portcullis publish`: the published
//! config snapshots (secret values sealed), the migrations, and what pods report about their
//! upstream connections. One crate, so every publisher runs the very same code.
#![forbid(unsafe_code)]

pub mod config_store;
pub mod reports;
pub mod secret_box;

use sqlx::PgPool;

/// Applies the Postgres migrations (sqlx takes an advisory lock, so concurrent runs wait) and
/// makes sure the audit partitions of the coming months exist.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::migrate!("../migrations/postgres").run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => e,
        other => sqlx::Error::Protocol(format!("cannot apply migrations: {other}")),
    })?;
    sqlx::query("SELECT portcullis_ensure_audit_partitions(3)").execute(pool).await?;
    Ok(())
}
