//! `portcullis`: the governed MCP and REST gateway.
#![forbid(unsafe_code)]

mod audit;
mod catalog_calls;
mod changes;
mod connectors;
mod db;
mod dev;
mod http_context;
mod idempotency;
mod identity;
mod limits;
mod manifest_dir;
mod mcp;
mod oauth;
mod oidc;
mod policy;
mod request_state;
mod rest;
mod rest_keys;
mod serve;
mod server;
mod sessions;
mod state;
mod store;
mod tool_call;
mod unread_body;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "A governed gateway through which agents and automation reach tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole gateway in one process from a directory of manifests (SQLite, in-process limits).
    Dev(dev::DevArgs),
    /// Run an API pod: configuration and audit in Postgres, sessions and rate limits in Redis.
    Serve(serve::ServeArgs),
    /// Apply the Postgres migrations (for a Helm hook or a deploy step) and exit.
    Migrate {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Compile a directory of manifests and publish it to Postgres when its digest is new.
    Publish {
        /// Directory of manifests (Secrets included; ApiKeys need their Secret here).
        #[arg(long)]
        manifests: PathBuf,
        /// Recorded as the version's source.
        #[arg(long, default_value = "portcullis publish")]
        source: String,
        #[command(flatten)]
        data: serve::DataArgs,
    },
    /// Compile a directory of manifests and report problems, without serving (exit 1 on errors).
    Check {
        /// Directory of manifests.
        #[arg(long)]
        manifests: PathBuf,
    },
}

/// Compiles a directory, printing every problem; the snapshot when there are no errors.
fn compile_dir(manifests: &std::path::Path) -> anyhow::Result<Option<portcullis_crds::Snapshot>> {
    anyhow::ensure!(manifests.is_dir(), "{} is not a directory of manifests", manifests.display());
    let (objects, mut problems) = manifest_dir::read_dir(manifests);
    let snapshot = if problems.iter().any(|p| p.severity == portcullis_crds::Severity::Error) {
        None
    } else {
        match portcullis_crds::compile(&objects, chrono::Utc::now()) {
            Ok(snapshot) => {
                problems.extend(snapshot.warnings.iter().cloned());
                Some(snapshot)
            }
            Err(p) => {
                problems.extend(p);
                None
            }
        }
    };
    for p in &problems {
        println!("{p}");
    }
    Ok(snapshot)
}

async fn publish(manifests: &std::path::Path, source: &str, data: &serve::DataArgs) -> anyhow::Result<bool> {
    let Some(snapshot) = compile_dir(manifests)? else {
        println!("configuration has errors; nothing published");
        return Ok(false);
    };
    let key = portcullis_store::secret_box::SecretKey::from_text(&data.secret_key)?;
    let pool = serve::pool(&data.database_url)?;
    match portcullis_store::config_store::publish(&pool, &key, &snapshot, source).await? {
        portcullis_store::config_store::Published::New { version, summary } => {
            println!(
                "published version {version} (digest {}): {} added, {} changed, {} removed",
                &snapshot.digest[..12],
                summary.added.len(),
                summary.changed.len(),
                summary.removed.len()
            );
            for (what, names) in
                [("added", &summary.added), ("changed", &summary.changed), ("removed", &summary.removed)]
            {
                for name in names {
                    println!("  {what}: {name}");
                }
            }
        }
        portcullis_store::config_store::Published::Unchanged { version } => {
            println!("unchanged: version {version} already has digest {}", &snapshot.digest[..12]);
        }
    }
    Ok(true)
}

// glibc's allocator was ~16% of the gateway's CPU on the hot path (profiled under the load
// harness: malloc/free, chunk consolidation); mimalloc's thread-local heaps cost a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rmcp=warn,sqlx=warn".into()),
        )
        .init();
    // One TLS crypto backend for every outbound client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Dev(args) => dev::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Migrate { database_url } => {
            serve::migrate(&serve::pool(&database_url)?).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Publish { manifests, source, data } => {
            if publish(&manifests, &source, &data).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Check { manifests } => {
            if compile_dir(&manifests)?.is_some() {
                println!("configuration OK");
                Ok(())
            } else {
                println!("configuration has errors");
                std::process::exit(1)
            }
        }
    }
}
