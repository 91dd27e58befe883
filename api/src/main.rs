//! `portcullis`: the governed MCP and REST gateway.
#![forbid(unsafe_code)]

mod audit;
mod connectors;
mod dev;
mod http_context;
mod identity;
mod limits;
mod mcp;
mod policy;
mod rest;
mod server;
mod sessions;
mod state;
mod store;
mod tool_call;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "portcullis", version, about = "A governed gateway through which agents and automation reach tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole gateway in one process from a directory of manifests (SQLite, in-process limits).
    Dev(dev::DevArgs),
    /// Compile a directory of manifests and report problems, without serving (exit 1 on errors).
    Check {
        /// Directory of manifests.
        #[arg(long)]
        manifests: PathBuf,
    },
}

fn check(manifests: &std::path::Path) -> anyhow::Result<bool> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(manifests)? {
        let path = entry?.path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            let (o, p) =
                portcullis_crds::parse_manifests(&path.display().to_string(), &std::fs::read_to_string(&path)?);
            objects.extend(o);
            problems.extend(p);
        }
    }
    let ok = match portcullis_crds::compile(&objects, chrono::Utc::now()) {
        Ok(snapshot) => {
            problems.extend(snapshot.warnings);
            !problems.iter().any(|p| p.severity == portcullis_crds::Severity::Error)
        }
        Err(p) => {
            problems.extend(p);
            false
        }
    };
    for p in &problems {
        println!("{p}");
    }
    println!("{}", if ok { "configuration OK" } else { "configuration has errors" });
    Ok(ok)
}

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
        Command::Check { manifests } => {
            if check(&manifests)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}
