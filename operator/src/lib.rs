//! The Portcullis operator: watches Personas, Connections, McpEndpoints, ApiKeys and the Secrets
//! they reference; compiles them with the same compiler as `portcullis publish` and dev mode;
//! publishes snapshots to Postgres; writes status, events and key Secrets. Only the replica
//! holding the Lease writes.
#![forbid(unsafe_code)]

pub mod controller;
#[cfg(any(test, feature = "testing"))]
pub mod fake_api;
pub mod keys;
pub mod kube_io;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod run;
