//! The Portcullis model: the four resource kinds, the snapshot API pods run on, and the pure
//! compiler that turns objects into a snapshot or a list of problems a user can act on.
#![forbid(unsafe_code)]

pub mod compile;
pub mod crdgen;
pub mod glob;
pub mod keys;
pub mod kinds;
pub mod manifests;
pub mod problem;
pub mod snapshot;

pub use compile::compile;
pub use kinds::{ApiKey, Connection, McpEndpoint, Persona};
pub use manifests::{Object, parse_manifests};
pub use problem::{ObjectRef, Problem, Severity};
pub use snapshot::Snapshot;

/// API group of all Portcullis kinds.
pub const GROUP: &str = "portcullis.dev";
/// API version of all Portcullis kinds.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "portcullis.dev/v1alpha1";
