//! `portcullis dev`: the whole gateway in one process from a manifests directory — watched and
//! recompiled on change — with SQLite in the data directory and in-process limits and sessions.

use crate::audit::AuditLog;
use crate::connectors::Upstreams;
use crate::limits::Limiter;
use crate::manifest_dir::{fingerprint, read_dir};
use crate::sessions::MemorySessions;
use crate::state::{AppState, Inner, ServerSettings};
use anyhow::Context;
use base64::Engine;
use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portcullis_crds::{Object, Problem, Severity, Snapshot, compile};
use rand::RngCore;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of `portcullis dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Directory of manifests (YAML, as `kubectl apply -f` takes them, Secrets included).
    #[arg(long, env = "PORTCULLIS_MANIFESTS")]
    pub manifests: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the SQLite database and keys minted in dev mode.
    #[arg(long, env = "PORTCULLIS_DATA", default_value = ".portcullis")]
    pub data: PathBuf,
    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, env = "PORTCULLIS_WATCH_INTERVAL_MS", default_value_t = 500)]
    pub watch_interval_ms: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "PORTCULLIS_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Idle time after which a 2025-protocol MCP session expires, in seconds.
    #[arg(long, env = "PORTCULLIS_SESSION_IDLE_SECONDS", default_value_t = 1800)]
    pub session_idle_seconds: u64,
    /// The organisation's identity provider (OIDC bearer tokens).
    #[command(flatten)]
    pub oidc: crate::oidc::OidcArgs,
    /// Portcullis's OAuth authorization server for MCP clients.
    #[command(flatten)]
    pub oauth: crate::oauth::OAuthArgs,
}

/// A key dev mode minted (or found in its data directory) for an ApiKey without a Secret manifest.
struct DevKey {
    namespace: String,
    api_key: String,
    persona: String,
    key: String,
    path: PathBuf,
}

/// The outcome of reading the directory once.
struct Loaded {
    snapshot: Snapshot,
    dev_keys: Vec<DevKey>,
}

/// A new API key: the prefix and 256 bits of base64url randomness.
pub(crate) fn mint_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}{}", portcullis_crds::keys::KEY_PREFIX, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(contents.as_bytes())
    }
    #[cfg(not(unix))]
    std::fs::write(path, contents)
}

/// Reads and compiles the directory; ApiKeys whose Secret is not among the manifests get a key
/// from the data directory, minted there on first use (the operator's job in a cluster).
fn load(manifests: &Path, data: &Path) -> Result<Loaded, Vec<Problem>> {
    let (mut objects, mut problems) = read_dir(manifests);
    let secrets: BTreeSet<(String, String)> = objects
        .iter()
        .filter(|o| matches!(o, Object::Secret(_)))
        .map(|o| {
            let r = o.object_ref();
            (r.namespace, r.name)
        })
        .collect();
    let mut dev_keys = Vec::new();
    let mut synthetic = Vec::new();
    for object in &objects {
        let Object::ApiKey(api_key) = object else { continue };
        let r = object.object_ref();
        let secret_name = &api_key.spec.secret_name;
        if secrets.contains(&(r.namespace.clone(), secret_name.clone()))
            || !portcullis_crds::compile::is_name(secret_name)
            || !portcullis_crds::compile::is_name(&r.namespace)
        {
            continue;
        }
        let path = data.join("secrets").join(&r.namespace).join(secret_name);
        let key = match std::fs::read_to_string(&path) {
            Ok(key) => key.trim().to_string(),
            Err(_) => {
                let key = mint_key();
                if let Err(e) = write_private(&path, &key) {
                    problems.push(Problem::error(
                        &r,
                        "spec.secretName",
                        format!("cannot store a minted key in {}: {e}", path.display()),
                    ));
                    continue;
                }
                key
            }
        };
        synthetic.push(Object::Secret(Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(r.namespace.clone()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([("key".to_string(), key.clone())])),
            ..Default::default()
        }));
        dev_keys.push(DevKey {
            namespace: r.namespace.clone(),
            api_key: r.name.clone(),
            persona: api_key.spec.persona.clone(),
            key,
            path,
        });
    }
    objects.extend(synthetic);
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(problems);
    }
    match compile(&objects, Utc::now()) {
        Ok(mut snapshot) => {
            snapshot.warnings.extend(problems);
            Ok(Loaded { snapshot, dev_keys })
        }
        Err(mut compile_problems) => {
            compile_problems.extend(problems);
            Err(compile_problems)
        }
    }
}

fn log_problems(problems: &[Problem]) {
    for p in problems {
        match p.severity {
            Severity::Error => tracing::error!("{p}"),
            Severity::Warning => tracing::warn!("{p}"),
        }
    }
}

fn print_banner(args: &DevArgs, version: u64, loaded: &Loaded, announced: &mut BTreeSet<String>) {
    let base = format!("http://{}", args.listen);
    let mut out = String::new();
    if announced.is_empty() {
        out.push_str(&format!("\nPortcullis dev mode: serving {} on {base}\n", args.manifests.display()));
        out.push_str("  MCP endpoints:\n");
        for (namespace, tenant) in &loaded.snapshot.tenants {
            for name in tenant.endpoints.keys() {
                out.push_str(&format!("    {base}/mcp/{namespace}/{name}\n"));
            }
        }
        out.push_str(&format!("  REST API: {base}/api/v1   docs: {base}/docs\n"));
    }
    let fresh: Vec<&DevKey> = loaded.dev_keys.iter().filter(|k| !announced.contains(&k.key)).collect();
    if !fresh.is_empty() {
        out.push_str("  API keys kept by dev mode (keys from Secret manifests are never printed):\n");
        for key in &fresh {
            out.push_str(&format!(
                "    {}/{} (persona {}): {}\n      stored in {}\n",
                key.namespace,
                key.api_key,
                key.persona,
                key.key,
                key.path.display()
            ));
        }
        if announced.is_empty() {
            let first = &fresh[0];
            out.push_str(&format!("  Try:\n    curl -H 'X-API-Key: {}' {base}/api/v1/admin/tools\n", first.key));
        }
        for key in fresh {
            announced.insert(key.key.clone());
        }
    }
    if !out.is_empty() {
        println!("{out}  Configuration version {version} (digest {})\n", &loaded.snapshot.digest[..12]);
    }
}

/// Runs dev mode until interrupted.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create data directory {}", args.data.display()))?;
    anyhow::ensure!(args.manifests.is_dir(), "{} is not a directory of manifests", args.manifests.display());
    let pool = crate::store::open_sqlite(&args.data).await.context("cannot open the dev database")?;
    let (audit, writer) = AuditLog::start(crate::audit::AuditStore::Sqlite(pool.clone()), 10_000);
    let http = crate::connectors::http_client().context("cannot build the HTTP client")?;
    let oidc = crate::oidc::OidcVerifier::from_args(&args.oidc, http.clone())?.map(std::sync::Arc::new);
    let rest_keys = std::sync::Arc::new(crate::rest_keys::RestKeys::new(crate::rest_keys::KeyDb::Sqlite(pool.clone())));
    rest_keys.refresh().await.context("cannot read the keys minted over REST")?;
    let oauth = crate::oauth::AuthServer::from_args(
        &args.oauth,
        format!("http://{}", args.listen),
        oidc.clone(),
        || match &args.oauth.oauth_signing_keys {
            Some(dir) => crate::oauth::signing::SigningKeys::load_dir(dir),
            None => crate::oauth::signing::SigningKeys::load_or_create(&args.data),
        },
        Box::new(crate::oauth::ephemeral::MemoryEphemeral::default()),
        crate::oauth::clients::Clients::new(crate::db::Db::Sqlite(pool.clone())),
        http.clone(),
    )?
    .map(std::sync::Arc::new);
    let changes = crate::changes::Changes::new();
    let sessions: std::sync::Arc<dyn crate::sessions::SessionStore> =
        std::sync::Arc::new(MemorySessions::new(Duration::from_secs(args.session_idle_seconds)));
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
        limits: Box::new(Limiter::default()),
        idempotency: Box::new(crate::idempotency::MemoryIdempotency::default()),
        audit,
        settings: ServerSettings { max_body_bytes: args.max_body_bytes, page_size: 100 },
        backends: None,
        history: Default::default(),
        oidc: oidc.clone(),
        oauth,
        rest_keys: Some(rest_keys),
        // One process: a key of its own, good until it stops.
        client_replies: client_sessions.replies.clone(),
        in_flight: Default::default(),
        followed: Default::default(),
        request_state_key: portcullis_store::secret_box::SecretKey::from_text(
            &uuid::Uuid::new_v4().simple().to_string().repeat(2),
        )
        .expect("64 random hex characters make a key"),
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut announced = BTreeSet::new();
    let mut version = 0u64;
    let mut seen = fingerprint(&args.manifests);
    match load(&args.manifests, &args.data) {
        Ok(loaded) => {
            version += 1;
            log_problems(&loaded.snapshot.warnings);
            print_banner(&args, version, &loaded, &mut announced);
            state.install(version, loaded.snapshot);
        }
        Err(problems) => {
            log_problems(&problems);
            tracing::error!("The manifests have errors; not ready until they are fixed (the directory is watched)");
        }
    }

    let watcher = {
        let state = state.clone();
        let args = args.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(args.watch_interval_ms)).await;
                let now = fingerprint(&args.manifests);
                if now == seen {
                    continue;
                }
                seen = now;
                match load(&args.manifests, &args.data) {
                    Ok(loaded) => {
                        let unchanged = state.current().is_some_and(|c| c.snapshot.digest == loaded.snapshot.digest);
                        if unchanged {
                            continue;
                        }
                        version += 1;
                        log_problems(&loaded.snapshot.warnings);
                        print_banner(&args, version, &loaded, &mut announced);
                        tracing::info!(version, digest = %&loaded.snapshot.digest[..12], "Configuration reloaded");
                        state.install(version, loaded.snapshot);
                    }
                    Err(problems) => {
                        log_problems(&problems);
                        let serving = state.current().map(|c| c.version);
                        tracing::error!(
                            ?serving,
                            "The changed manifests have errors; keeping the configuration in service"
                        );
                    }
                }
            }
        })
    };

    tracing::info!(listen = %args.listen, "Portcullis dev mode listening");
    axum::serve(crate::server::no_delay(listener), crate::server::router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    watcher.abort();
    let _ = watcher.await;
    drop(state);
    // Every AuditLog clone is gone now, so the writer drains its queue and stops.
    if tokio::time::timeout(Duration::from_secs(10), writer).await.is_err() {
        tracing::error!("Audit events could not be flushed within 10 s");
    }
    pool.close().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("Shutting down");
}
