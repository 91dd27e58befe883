//! `portcullis-operator`: reconciles Personas, Connections, McpEndpoints and ApiKeys into
//! published snapshots. This release ships its CRDs; reconciliation is not built yet.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

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
}

fn main() {
    match Cli::parse().command {
        Command::Crds => {
            for (_, yaml) in portcullis_crds::crdgen::crd_files() {
                println!("---\n{yaml}");
            }
        }
    }
}
