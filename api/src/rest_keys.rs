//! API keys minted over REST (`/api/v1/admin/auth/keys`). Stored as digests in the database
//! (SQLite in dev mode, Postgres in production) and cached in every pod, so authentication never
//! waits on the database: pods pick up changes through NOTIFY and a one-second poll, so a
//! revocation is effective everywhere within a second.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::RwLock;

/// NOTIFY channel announcing a change to `api_keys`.
pub const CHANNEL: &str = "portcullis_keys";

/// A key as stored: never the key itself.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct StoredKey {
    /// Identifier (UUID v7 text).
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Persona it acts as.
    pub persona: String,
    /// SHA-256 of the key.
    pub digest: String,
    /// Public key id.
    pub key_id: String,
    /// What it is for.
    pub description: Option<String>,
    /// Subject that minted it.
    pub created_by: String,
    /// When it was minted.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was (or will be, after a rotation's grace period) revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl StoredKey {
    /// Whether it authenticates at `now`.
    pub fn works_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none_or(|at| at > now) && self.expires_at.is_none_or(|at| at > now)
    }
}

pub use crate::db::Db as KeyDb;
use crate::on_pool;

const COLUMNS: &str =
    "id, tenant, persona, digest, key_id, description, created_by, created_at, expires_at, revoked_at, updated_at";

/// The keys of this process: database plus cache by digest.
pub struct RestKeys {
    db: KeyDb,
    by_digest: RwLock<HashMap<String, StoredKey>>,
    high_water: tokio::sync::Mutex<Option<DateTime<Utc>>>,
}

impl RestKeys {
    /// Keys in `db`; call `refresh` to fill the cache.
    pub fn new(db: KeyDb) -> Self {
        Self { db, by_digest: RwLock::default(), high_water: tokio::sync::Mutex::new(None) }
    }

    /// The cached key with this digest.
    pub fn lookup(&self, digest: &str) -> Option<StoredKey> {
        self.by_digest.read().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }

    fn remember(&self, key: StoredKey) {
        self.by_digest.write().unwrap_or_else(|e| e.into_inner()).insert(key.digest.clone(), key);
    }

    /// Loads rows changed since the last refresh (all rows the first time). Rows are re-read
    /// with a few seconds of overlap, so a transaction that committed late is not missed.
    pub async fn refresh(&self) -> Result<usize, sqlx::Error> {
        let mut high_water = self.high_water.lock().await;
        let since = high_water.map_or(DateTime::<Utc>::UNIX_EPOCH, |t| t - chrono::Duration::seconds(5));
        let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE updated_at >= $1 ORDER BY updated_at");
        let rows: Vec<StoredKey> = on_pool!(&self.db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(since).fetch_all(pool).await)?;
        let count = rows.len();
        for row in rows {
            *high_water = Some(high_water.map_or(row.updated_at, |t| t.max(row.updated_at)));
            self.remember(row);
        }
        Ok(count)
    }

    /// Stores a new key and announces it.
    pub async fn insert(&self, key: StoredKey) -> Result<(), sqlx::Error> {
        let sql = format!("INSERT INTO api_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)");
        on_pool!(&self.db, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&key.id)
                .bind(&key.tenant)
                .bind(&key.persona)
                .bind(&key.digest)
                .bind(&key.key_id)
                .bind(&key.description)
                .bind(&key.created_by)
                .bind(key.created_at)
                .bind(key.expires_at)
                .bind(key.revoked_at)
                .bind(key.updated_at)
                .execute(pool)
                .await
                .map(drop)
        })?;
        self.announce().await;
        self.remember(key);
        Ok(())
    }

    /// Revokes key `id` of `tenant` at `at` (now, or the end of a rotation's grace period).
    /// Returns the updated key, or `None` when there is no such key or it is already revoked.
    pub async fn revoke(&self, tenant: &str, id: &str, at: DateTime<Utc>) -> Result<Option<StoredKey>, sqlx::Error> {
        let now = Utc::now();
        let sql = format!(
            "UPDATE api_keys SET revoked_at = CASE WHEN revoked_at IS NULL OR revoked_at > $1 THEN $1 ELSE revoked_at END, \
             updated_at = $2 WHERE tenant = $3 AND id = $4 AND (revoked_at IS NULL OR revoked_at > $2) RETURNING {COLUMNS}"
        );
        let row: Option<StoredKey> = on_pool!(&self.db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(at).bind(now).bind(tenant).bind(id).fetch_optional(pool).await
        })?;
        if let Some(row) = &row {
            self.announce().await;
            self.remember(row.clone());
        }
        Ok(row)
    }

    /// One key of a tenant.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<StoredKey>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE tenant = $1 AND id = $2");
        on_pool!(&self.db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(tenant).bind(id).fetch_optional(pool).await)
    }

    /// A page of a tenant's keys, newest first, and how many there are.
    pub async fn list(&self, tenant: &str, offset: i64, limit: i64) -> Result<(Vec<StoredKey>, i64), sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM api_keys WHERE tenant = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
        );
        let rows: Vec<StoredKey> = on_pool!(&self.db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(tenant).bind(limit).bind(offset).fetch_all(pool).await
        })?;
        let total: i64 = on_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE tenant = $1").bind(tenant).fetch_one(pool).await
        })?;
        Ok((rows, total))
    }

    async fn announce(&self) {
        if let KeyDb::Postgres(pool) = &self.db
            && let Err(e) = sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(pool).await
        {
            tracing::warn!(error = %e, "Cannot announce a key change; other pods pick it up by polling");
        }
    }
}

/// Keeps the cache of a production pod current: LISTEN for changes, and poll every second in
/// case a notification was missed.
pub async fn follow(keys: std::sync::Arc<RestKeys>, pool: PgPool) {
    let mut listener: Option<sqlx::postgres::PgListener> = None;
    loop {
        if listener.is_none()
            && let Ok(mut l) = sqlx::postgres::PgListener::connect_with(&pool).await
            && l.listen(CHANNEL).await.is_ok()
        {
            listener = Some(l);
        }
        if let Err(e) = keys.refresh().await {
            tracing::warn!(error = %e, "Cannot refresh API keys; retrying");
        }
        match listener.as_mut() {
            Some(l) => match tokio::time::timeout(std::time::Duration::from_secs(1), l.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => listener = None,
            },
            None => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        }
    }
}
