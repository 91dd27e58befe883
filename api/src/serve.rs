//! `portcullis serve`: a stateless API pod. Configuration comes from Postgres (latest published
//! snapshot, then NOTIFY and polling), audit goes to Postgres, sessions and rate limits live in
//! Redis, so any number of replicas behave as one.

use crate::audit::{AuditLog, AuditStore};
use crate::connectors::Upstreams;
use crate::limits::{RedisLimiter, RedisOrLocal};
use crate::sessions::RedisSessions;
use crate::state::{AppState, Backends, Inner, ServerSettings};
use anyhow::Context;
use portcullis_store::config_store;
use portcullis_store::reports::{self, ConnectionReport};
use portcullis_store::secret_box::SecretKey;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::net::SocketAddr;
use std::time::Duration;

/// Where the production data plane lives.
#[derive(clap::Args, Clone)]
pub struct DataArgs {
    /// Postgres URL (configuration, audit).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Key encrypting the secret values of published snapshots (at least 32 characters).
    #[arg(long, env = "PORTCULLIS_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
}

/// Settings of `portcullis serve`.
#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Redis URL (sessions, rate limits).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// Address to listen on.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Apply database migrations at start (safe when many pods start at once).
    #[arg(long, env = "PORTCULLIS_MIGRATE", default_value_t = false)]
    pub migrate: bool,
    /// Prefix of every Redis key, so several installations can share one Redis.
    #[arg(long, env = "PORTCULLIS_REDIS_PREFIX", default_value = "portcullis:")]
    pub redis_prefix: String,
    /// How often the latest configuration version is polled, besides NOTIFY, in seconds.
    #[arg(long, env = "PORTCULLIS_CONFIG_POLL_SECONDS", default_value_t = 5)]
    pub config_poll_seconds: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "PORTCULLIS_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Idle time after which a 2025-protocol MCP session expires, in seconds.
    #[arg(long, env = "PORTCULLIS_SESSION_IDLE_SECONDS", default_value_t = 1800)]
    pub session_idle_seconds: u64,
    /// Audit events held in memory while Postgres is slow or down; when full, requests get 503.
    #[arg(long, env = "PORTCULLIS_AUDIT_BUFFER", default_value_t = 10_000)]
    pub audit_buffer: usize,
    /// Months of audit events kept; older monthly partitions are dropped.
    #[arg(long, env = "PORTCULLIS_AUDIT_RETENTION_MONTHS", default_value_t = 13)]
    pub audit_retention_months: u32,
    /// What rate limiting does when Redis cannot answer: `closed` refuses requests (503);
    /// `local` decides them with this pod's own in-process limits (see docs/production.md).
    #[arg(long, env = "PORTCULLIS_WHEN_REDIS_DOWN", value_enum, default_value = "closed")]
    pub when_redis_down: WhenRedisDown,
    /// How often this pod reports its upstreams' health and tools (for the operator's status).
    #[arg(long, env = "PORTCULLIS_REPORT_SECONDS", default_value_t = 10)]
    pub report_seconds: u64,
    /// The organisation's identity provider (OIDC bearer tokens).
    #[command(flatten)]
    pub oidc: crate::oidc::OidcArgs,
    /// Portcullis's OAuth authorization server for MCP clients.
    #[command(flatten)]
    pub oauth: crate::oauth::OAuthArgs,
}

/// What rate limiting does without Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenRedisDown {
    /// Refuse requests with 503 (exact limits, never silently off).
    Closed,
    /// Decide limits in each pod (available, but N pods allow N times the rate).
    Local,
}

/// A pool that connects lazily: the process starts (and reports not ready) while Postgres is away.
pub fn pool(database_url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(database_url)
        .context("invalid DATABASE_URL")
}

/// Applies the Postgres migrations (sqlx takes an advisory lock, so concurrent runs wait).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    portcullis_store::migrate(pool).await.context("cannot apply migrations")
}

async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "{what} failed; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs an API pod until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let key = SecretKey::from_text(&args.data.secret_key)?;
    let pool = pool(&args.data.database_url)?;
    if args.migrate {
        retry("Migrating the database", || migrate(&pool)).await;
    }
    let redis = redis::Client::open(args.redis_url.as_str()).context("invalid REDIS_URL")?;
    let redis_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let connection = retry("Connecting to Redis", || {
        let (redis, config) = (redis.clone(), redis_config.clone());
        async move { Ok(redis::aio::ConnectionManager::new_with_config(redis, config).await?) }
    })
    .await;

    let (audit, writer) = AuditLog::start(AuditStore::Postgres(pool.clone()), args.audit_buffer);
    let http = crate::connectors::http_client()?;
    let oidc = crate::oidc::OidcVerifier::from_args(&args.oidc, http.clone())?.map(std::sync::Arc::new);
    let rest_keys =
        std::sync::Arc::new(crate::rest_keys::RestKeys::new(crate::rest_keys::KeyDb::Postgres(pool.clone())));
    let oauth = crate::oauth::AuthServer::from_args(
        &args.oauth,
        format!("http://{}", args.listen),
        oidc.clone(),
        || match &args.oauth.oauth_signing_keys {
            Some(dir) => crate::oauth::signing::SigningKeys::load_dir(dir),
            None => anyhow::bail!(
                "--oauth-signing-keys is required in production: a directory of EC P-256 PEM keys every pod shares"
            ),
        },
        Box::new(crate::oauth::ephemeral::RedisEphemeral::new(connection.clone(), &args.redis_prefix)),
        crate::oauth::clients::Clients::new(crate::db::Db::Postgres(pool.clone())),
        http.clone(),
    )?
    .map(std::sync::Arc::new);
    let changes = crate::changes::Changes::new();
    let sessions: std::sync::Arc<dyn crate::sessions::SessionStore> = std::sync::Arc::new(RedisSessions::new(
        connection.clone(),
        &args.redis_prefix,
        Duration::from_secs(args.session_idle_seconds),
    ));
    let client_sessions = crate::connectors::ClientSessions {
        idle: Duration::from_secs(args.session_idle_seconds),
        replies: Default::default(),
        store: sessions.clone(),
    };
    let state = AppState::new(Inner {
        snapshot: tokio::sync::watch::channel(None).0,
        upstreams: Upstreams::new(http.clone(), changes.clone(), client_sessions.clone()),
        changes: changes.clone(),
        sessions,
        limits: match args.when_redis_down {
            WhenRedisDown::Closed => Box::new(RedisLimiter::new(connection.clone(), &args.redis_prefix)),
            WhenRedisDown::Local => {
                Box::new(RedisOrLocal::new(RedisLimiter::new(connection.clone(), &args.redis_prefix)))
            }
        },
        idempotency: Box::new(crate::idempotency::RedisIdempotency::new(
            connection.clone(),
            &args.redis_prefix,
            key.clone(),
        )),
        audit,
        settings: ServerSettings { max_body_bytes: args.max_body_bytes, page_size: 100 },
        backends: Some(Backends {
            postgres: pool.clone(),
            redis: connection,
            redis_required: args.when_redis_down == WhenRedisDown::Closed,
        }),
        history: Default::default(),
        oidc: oidc.clone(),
        oauth,
        rest_keys: Some(rest_keys.clone()),
        // Derived from the shared secret key, so every replica opens what any replica sealed.
        client_replies: client_sessions.replies.clone(),
        in_flight: Default::default(),
        followed: Default::default(),
        request_state_key: SecretKey::from_text(&format!("request state\n{}", args.data.secret_key))?,
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config =
        tokio::spawn(follow_config(state.clone(), pool.clone(), key, Duration::from_secs(args.config_poll_seconds)));
    let maintenance = tokio::spawn(audit_maintenance(pool.clone(), args.audit_retention_months));
    let key_sync = tokio::spawn(crate::rest_keys::follow(rest_keys, pool.clone()));
    let relay = tokio::spawn(
        changes.clone().relay(redis::Client::open(args.redis_url.as_str())?, format!("{}changes", args.redis_prefix)),
    );
    let reports =
        tokio::spawn(report_connections(state.clone(), pool.clone(), Duration::from_secs(args.report_seconds.max(1))));
    tracing::info!(listen = %args.listen, "Portcullis serving");
    axum::serve(crate::server::no_delay(listener), crate::server::router(state.clone()))
        .with_graceful_shutdown(crate::dev::shutdown_signal())
        .await?;
    config.abort();
    maintenance.abort();
    reports.abort();
    key_sync.abort();
    relay.abort();
    let _ = config.await;
    drop(state);
    // Every AuditLog clone is gone: the writer drains its queue (retrying while Postgres is down).
    if tokio::time::timeout(Duration::from_secs(30), writer).await.is_err() {
        tracing::error!("Audit events could not be flushed within 30 s");
    }
    Ok(())
}

/// Loads the latest snapshot, then follows new versions (NOTIFY, and polling as a fallback).
async fn follow_config(state: AppState, pool: PgPool, key: SecretKey, poll: Duration) {
    let mut current: Option<i64> = None;
    let mut listener: Option<PgListener> = None;
    loop {
        if listener.is_none() {
            match PgListener::connect_with(&pool).await {
                Ok(mut l) => {
                    if l.listen(config_store::CHANNEL).await.is_ok() {
                        listener = Some(l);
                    }
                }
                Err(error) => tracing::debug!(%error, "Cannot LISTEN yet"),
            }
        }
        match config_store::latest_version(&pool).await {
            Ok(Some(latest)) if Some(latest) != current => match config_store::load_latest(&pool, &key).await {
                Ok(Some((version, _, snapshot))) => {
                    tracing::info!(version, digest = %&snapshot.digest[..12], "Configuration loaded");
                    state.install(version as u64, snapshot);
                    current = Some(version);
                }
                Ok(None) => {}
                Err(error) => tracing::error!(%error, "Cannot load the published configuration"),
            },
            Ok(None) if current.is_none() => {
                tracing::warn!("No configuration published yet: run `portcullis publish` or the operator")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "Cannot read the configuration version"),
        }
        let wait = if current.is_none() { Duration::from_secs(1).min(poll) } else { poll };
        match listener.as_mut() {
            Some(l) => match tokio::time::timeout(wait, l.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => listener = None,
            },
            None => tokio::time::sleep(wait).await,
        }
    }
}

/// Reports what this pod observes of its upstreams (health, tool names) every few seconds, so
/// the operator can show them in Connection and Persona status.
async fn report_connections(state: AppState, pool: PgPool, every: Duration) {
    let reporter = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map(|h| format!("{h}/{}", std::process::id()))
        .unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    loop {
        tokio::time::sleep(every).await;
        let version = state.current().map(|l| l.version as i64);
        let now = chrono::Utc::now();
        let reports: Vec<ConnectionReport> = state
            .upstreams
            .all()
            .into_iter()
            .map(|((tenant, connection), upstream)| ConnectionReport {
                tenant,
                connection,
                health: upstream.health().health,
                tools: upstream.catalog().tools.iter().map(|t| t.name.to_string()).collect(),
                config_version: version,
                reported_at: now,
            })
            .collect();
        if let Err(e) = reports::write(&pool, &reporter, &reports).await {
            tracing::debug!(error = %e, "cannot write connection reports");
        }
        let _ = reports::prune(&pool, now - chrono::Duration::hours(1)).await;
    }
}

/// Creates audit partitions ahead of time and drops those past retention, every six hours.
async fn audit_maintenance(pool: PgPool, retention_months: u32) {
    loop {
        let ensure = sqlx::query("SELECT portcullis_ensure_audit_partitions(3)").execute(&pool).await;
        let cutoff = chrono::Utc::now().date_naive() - chrono::Months::new(retention_months);
        let dropped: Result<i32, _> = sqlx::query_scalar("SELECT portcullis_drop_audit_partitions_before($1)")
            .bind(cutoff)
            .fetch_one(&pool)
            .await;
        match (ensure, dropped) {
            (Ok(_), Ok(n)) if n > 0 => tracing::info!(dropped = n, "Dropped audit partitions past retention"),
            (Ok(_), Ok(_)) => {}
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "Audit partition maintenance failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(6 * 3600)).await;
    }
}
