//! The config bus: compiled snapshots published to Postgres (`config_snapshots`), announced
//! with NOTIFY, loaded by API pods. Secret values travel encrypted in their own column.

use crate::secret_box::{SecretBoxError, SecretKey};
use chrono::{DateTime, Utc};
use portcullis_crds::Snapshot;
use portcullis_crds::snapshot::{SecretValue, Upstream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::BTreeMap;

/// NOTIFY channel announcing a new version (payload: the version).
pub const CHANNEL: &str = "portcullis_config";
// Serialises publishers (operator replicas, CI pipelines) so versions never race.
const PUBLISH_LOCK: i64 = 0x706f_7274_6375_6c6c;

/// Errors of the config store.
#[derive(Debug, thiserror::Error)]
pub enum ConfigStoreError {
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Secret values cannot be decrypted.
    #[error(transparent)]
    Secrets(#[from] SecretBoxError),
    /// A stored snapshot cannot be read by this release.
    #[error("snapshot version {0} cannot be read: {1}")]
    Corrupt(i64, String),
}

/// What changed between two versions, by object.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChangeSummary {
    /// Objects new in this version, as `Kind namespace/name`.
    pub added: Vec<String>,
    /// Objects whose compiled form changed.
    pub changed: Vec<String>,
    /// Objects gone in this version.
    pub removed: Vec<String>,
}

/// The outcome of a publish.
#[derive(Debug, PartialEq)]
pub enum Published {
    /// A new version was written.
    New {
        /// Its number.
        version: i64,
        /// What changed.
        summary: ChangeSummary,
    },
    /// The latest version already has this digest; nothing was written.
    Unchanged {
        /// The latest version.
        version: i64,
    },
}

/// Splits secret values out of a snapshot: the blanked snapshot and the values by location.
fn split_secrets(snapshot: &Snapshot) -> (Snapshot, BTreeMap<String, String>) {
    let mut blanked = snapshot.clone();
    let mut secrets = BTreeMap::new();
    for (tenant_name, tenant) in &mut blanked.tenants {
        for (connection_name, connection) in &mut tenant.connections {
            let Upstream::Mcp { headers, .. } = &mut connection.upstream;
            for (index, (_, value)) in headers.iter_mut().enumerate() {
                secrets.insert(format!("{tenant_name}/{connection_name}/{index}"), value.expose().to_string());
                *value = SecretValue::new("");
            }
        }
    }
    (blanked, secrets)
}

fn join_secrets(mut snapshot: Snapshot, secrets: &BTreeMap<String, String>) -> Snapshot {
    for (tenant_name, tenant) in &mut snapshot.tenants {
        for (connection_name, connection) in &mut tenant.connections {
            let Upstream::Mcp { headers, .. } = &mut connection.upstream;
            for (index, (_, value)) in headers.iter_mut().enumerate() {
                if let Some(secret) = secrets.get(&format!("{tenant_name}/{connection_name}/{index}")) {
                    *value = SecretValue::new(secret.clone());
                }
            }
        }
    }
    snapshot
}

/// Every object of a snapshot with its compiled form, for diffs.
fn objects(snapshot: &Snapshot) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (ns, tenant) in &snapshot.tenants {
        for (name, p) in &tenant.personas {
            out.insert(format!("Persona {ns}/{name}"), serde_json::to_value(p).unwrap_or_default());
        }
        for (name, c) in &tenant.connections {
            // Secret values count as content (a rotated credential is a change) but stay hashed.
            let mut v = serde_json::to_value(c).unwrap_or_default();
            v["upstream"]["headers"] =
                Value::String(portcullis_crds::keys::digest(&v["upstream"]["headers"].to_string()));
            out.insert(format!("Connection {ns}/{name}"), v);
        }
        for (name, e) in &tenant.endpoints {
            out.insert(format!("McpEndpoint {ns}/{name}"), serde_json::to_value(e).unwrap_or_default());
        }
    }
    for entry in snapshot.keys.values() {
        out.insert(format!("ApiKey {}/{}", entry.tenant, entry.name), serde_json::to_value(entry).unwrap_or_default());
    }
    out
}

/// Objects added, changed and removed from `before` to `after`.
pub fn summarize(before: Option<&Snapshot>, after: &Snapshot) -> ChangeSummary {
    let old = before.map(objects).unwrap_or_default();
    let new = objects(after);
    let mut summary = ChangeSummary::default();
    for (name, value) in &new {
        match old.get(name) {
            None => summary.added.push(name.clone()),
            Some(previous) if previous != value => summary.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    summary.removed = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    summary
}

/// Publishes `snapshot` unless the latest version has the same digest.
pub async fn publish(
    pool: &PgPool,
    key: &SecretKey,
    snapshot: &Snapshot,
    source: &str,
) -> Result<Published, ConfigStoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PUBLISH_LOCK).execute(&mut *tx).await?;
    let latest: Option<(i64, String, Value, Vec<u8>)> =
        sqlx::query_as("SELECT version, digest, snapshot, secrets FROM config_snapshots ORDER BY version DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((version, digest, _, _)) = &latest
        && *digest == snapshot.digest
    {
        return Ok(Published::Unchanged { version: *version });
    }
    let previous = match &latest {
        Some((version, _, body, sealed)) => Some(decode(*version, body.clone(), sealed, key)?),
        None => None,
    };
    let summary = summarize(previous.as_ref(), snapshot);
    let version = latest.as_ref().map_or(1, |l| l.0 + 1);
    let (blanked, secrets) = split_secrets(snapshot);
    let sealed = key.seal(&serde_json::to_vec(&secrets).unwrap_or_default());
    sqlx::query(
        "INSERT INTO config_snapshots (version, digest, source, snapshot, secrets, summary) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(version)
    .bind(&snapshot.digest)
    .bind(source)
    .bind(serde_json::to_value(&blanked).unwrap_or_default())
    .bind(sealed)
    .bind(serde_json::to_value(&summary).unwrap_or_default())
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(version.to_string()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Published::New { version, summary })
}

fn decode(version: i64, body: Value, sealed: &[u8], key: &SecretKey) -> Result<Snapshot, ConfigStoreError> {
    let snapshot: Snapshot =
        serde_json::from_value(body).map_err(|e| ConfigStoreError::Corrupt(version, e.to_string()))?;
    let secrets: BTreeMap<String, String> =
        serde_json::from_slice(&key.open(sealed)?).map_err(|e| ConfigStoreError::Corrupt(version, e.to_string()))?;
    Ok(join_secrets(snapshot, &secrets))
}

/// The newest version number, if any.
pub async fn latest_version(pool: &PgPool) -> Result<Option<i64>, ConfigStoreError> {
    Ok(sqlx::query_scalar("SELECT max(version) FROM config_snapshots").fetch_one(pool).await?)
}

/// The newest snapshot with its version and creation time.
pub async fn load_latest(
    pool: &PgPool,
    key: &SecretKey,
) -> Result<Option<(i64, DateTime<Utc>, Snapshot)>, ConfigStoreError> {
    let row: Option<(i64, DateTime<Utc>, Value, Vec<u8>)> = sqlx::query_as(
        "SELECT version, created_at, snapshot, secrets FROM config_snapshots ORDER BY version DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    match row {
        None => Ok(None),
        Some((version, created, body, sealed)) => Ok(Some((version, created, decode(version, body, &sealed, key)?))),
    }
}

/// One published version, as the changelog shows it (never with secret values).
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ChangelogEntry {
    /// Version number.
    pub version: i64,
    /// Content digest of the snapshot.
    pub digest: String,
    /// Who published it (`operator`, `publish:<dir>`, …).
    pub source: String,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// Objects added, changed and removed against the previous version.
    pub summary: ChangeSummary,
}

/// Published versions that changed something in `tenant`, newest first, with the summary cut
/// down to that tenant's objects (tenants never see each other's names); one page of them and
/// how many there are in all.
pub async fn changelog(
    pool: &PgPool,
    tenant: &str,
    offset: i64,
    limit: i64,
) -> Result<(Vec<ChangelogEntry>, i64), ConfigStoreError> {
    // Summary entries read `Kind namespace/name`.
    macro_rules! touches_tenant {
        () => {
            "EXISTS (SELECT 1 FROM jsonb_array_elements_text(\
             coalesce(summary->'added', '[]'::jsonb) || coalesce(summary->'changed', '[]'::jsonb) \
             || coalesce(summary->'removed', '[]'::jsonb)) e WHERE split_part(e, ' ', 2) LIKE $1 || '/%')"
        };
    }
    let total: i64 = sqlx::query_scalar(concat!("SELECT count(*) FROM config_snapshots WHERE ", touches_tenant!()))
        .bind(tenant)
        .fetch_one(pool)
        .await?;
    let rows: Vec<(i64, String, String, DateTime<Utc>, Value)> = sqlx::query_as(concat!(
        "SELECT version, digest, source, created_at, summary FROM config_snapshots WHERE ",
        touches_tenant!(),
        " ORDER BY version DESC OFFSET $2 LIMIT $3"
    ))
    .bind(tenant)
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let entries = rows
        .into_iter()
        .map(|(version, digest, source, created_at, summary)| ChangelogEntry {
            version,
            digest,
            source,
            created_at,
            summary: serde_json::from_value::<ChangeSummary>(summary).unwrap_or_default().for_tenant(tenant),
        })
        .collect();
    Ok((entries, total))
}

impl ChangeSummary {
    /// The part of the summary about `tenant`'s objects.
    pub fn for_tenant(self, tenant: &str) -> Self {
        let keep = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .filter(|e| e.split(' ').nth(1).and_then(|r| r.split_once('/')).is_some_and(|(ns, _)| ns == tenant))
                .collect()
        };
        Self { added: keep(self.added), changed: keep(self.changed), removed: keep(self.removed) }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn snapshot(extra: &str) -> Snapshot {
        let yaml = format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {{name: p, namespace: t}}\nspec: {{tools: {{allow: ['*']}}}}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {{name: c, namespace: t}}\nspec: {{prefix: c, mcp: {{url: 'http://h/mcp', headersFrom: {{secretRef: {{name: s}}}}}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: t}}\nstringData: {{Authorization: 'Bearer {extra}'}}\n"
        );
        let (objects, _) = portcullis_crds::parse_manifests("t.yaml", &yaml);
        portcullis_crds::compile(&objects, Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()).unwrap()
    }

    #[test]
    fn secrets_are_split_out_and_restored() {
        let s = snapshot("secret-one");
        let (blanked, secrets) = split_secrets(&s);
        assert!(!serde_json::to_string(&blanked).unwrap().contains("secret-one"));
        assert_eq!(secrets.len(), 1);
        assert_eq!(join_secrets(blanked, &secrets), s);
    }

    #[test]
    fn summaries_name_added_changed_and_removed_objects() {
        let a = snapshot("one");
        let b = snapshot("two");
        let first = summarize(None, &a);
        assert_eq!(first.added, vec!["Connection t/c", "Persona t/p"]);
        let rotated = summarize(Some(&a), &b);
        assert_eq!(rotated.changed, vec!["Connection t/c"], "a rotated credential is a change");
        assert!(rotated.added.is_empty() && rotated.removed.is_empty());
        let mut c = b.clone();
        c.tenants.get_mut("t").unwrap().personas.clear();
        assert_eq!(summarize(Some(&b), &c).removed, vec!["Persona t/p"]);
    }
}
