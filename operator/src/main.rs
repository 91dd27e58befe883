//! `portcullis-operator`: reconciles Personas, Connections, McpEndpoints and ApiKeys into
//! published snapshots (see the library docs).
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portcullis_operator::run::{RunArgs, Settings, run};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "portcullis-operator", version, about = "The Portcullis Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (for `kubectl apply -f -`).
    Crds,
    /// Run the operator (in a cluster, or against the current kubeconfig context).
    Run(Box<Run>),
}

#[derive(clap::Args, Debug)]
struct Run {
    /// Postgres the API pods read snapshots from.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Key that seals secret values in snapshots (at least 32 characters; the API pods need the same).
    #[arg(long, env = "PORTCULLIS_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
    /// Namespaces to watch, comma-separated; empty: all namespaces.
    #[arg(long, env = "PORTCULLIS_NAMESPACES", value_delimiter = ',', default_value = "")]
    namespaces: Vec<String>,
    /// Public base URL of the API pods (shown as McpEndpoint status.url).
    #[arg(long, env = "PORTCULLIS_PUBLIC_URL")]
    public_url: Option<String>,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "portcullis-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Quiet time after a change before publishing, in milliseconds.
    #[arg(long, default_value_t = 300)]
    debounce_ms: u64,
    /// Longest a publish waits behind a stream of changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    max_delay_ms: u64,
    /// A pass runs at least this often, in seconds (pod reports, expiry).
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Apply the Postgres migrations before starting.
    #[arg(long)]
    migrate: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn,sqlx=warn".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Crds => {
            for (_, yaml) in portcullis_crds::crdgen::crd_files() {
                println!("---\n{yaml}");
            }
            Ok(())
        }
        Command::Run(args) => {
            let args = *args;
            let key = portcullis_store::secret_box::SecretKey::from_text(&args.secret_key)?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy(&args.database_url)
                .context("invalid DATABASE_URL")?;
            if args.migrate {
                portcullis_store::migrate(&pool).await.context("cannot apply migrations")?;
            }
            let identity = args.identity.unwrap_or_else(|| {
                std::env::var("HOSTNAME").unwrap_or_else(|_| format!("portcullis-operator-{}", std::process::id()))
            });
            run(RunArgs {
                settings: Settings {
                    namespaces: args.namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                    public_url: args.public_url,
                    debounce: Duration::from_millis(args.debounce_ms),
                    max_delay: Duration::from_millis(args.max_delay_ms),
                    resync: Duration::from_secs(args.resync_seconds),
                },
                pool,
                key,
                lease: (args.lease_namespace, args.lease_name),
                identity,
                metrics_addr: args.metrics_addr,
            })
            .await
        }
    }
}
