//! The snapshot API pods run on: compiled personas, connections, endpoints and key digests,
//! with precompiled matchers and lookup maps, identified by a digest of its content.

use crate::glob::{GlobList, Policy};
use crate::kinds::{Limits, PrefixMode, Separator, Subjects};
use crate::problem::Problem;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A compiled, immutable configuration. Cheap to share behind an `Arc` and swap atomically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Hex SHA-256 over the compiled content; equal configurations have equal digests.
    pub digest: String,
    /// Tenants (namespaces) by name.
    pub tenants: BTreeMap<String, Tenant>,
    /// API keys by the hex digest of the key.
    pub keys: BTreeMap<String, KeyEntry>,
    /// Warnings found while compiling; the parts they name were left out.
    #[serde(default)]
    pub warnings: Vec<Problem>,
}

impl Snapshot {
    /// The tenant named `namespace`, if it has any objects.
    pub fn tenant(&self, namespace: &str) -> Option<&Tenant> {
        self.tenants.get(namespace)
    }

    /// The key whose digest is `digest`.
    pub fn key(&self, digest: &str) -> Option<&KeyEntry> {
        self.keys.get(digest)
    }
}

/// Everything one namespace declares.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// Personas by name.
    pub personas: BTreeMap<String, CompiledPersona>,
    /// Connections by name.
    pub connections: BTreeMap<String, CompiledConnection>,
    /// MCP endpoints by name.
    pub endpoints: BTreeMap<String, CompiledEndpoint>,
    /// Connection name by prefix (prefixes are unique in a tenant).
    pub prefixes: BTreeMap<String, String>,
}

impl Tenant {
    /// Whether `persona` may use `endpoint`.
    pub fn endpoint_for(&self, endpoint: &str, persona: &str) -> Option<&CompiledEndpoint> {
        self.endpoints.get(endpoint).filter(|e| e.personas.is_match(persona))
    }

    /// Names of connections reachable by `persona` through any endpoint it may use, sorted.
    pub fn connections_for(&self, persona: &str) -> Vec<&CompiledConnection> {
        let mut names: Vec<&String> = self
            .endpoints
            .values()
            .filter(|e| e.personas.is_match(persona))
            .flat_map(|e| e.connections.iter())
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().filter_map(|n| self.connections.get(n)).collect()
    }
}

/// A persona with its globs compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledPersona {
    /// Persona name.
    pub name: String,
    /// Identities that resolve to it.
    pub subjects: Subjects,
    /// Higher wins when several match.
    pub priority: i32,
    /// Over canonical tool names `<prefix>.<tool>`.
    pub tools: Policy,
    /// Over resource URIs.
    pub resources: Policy,
    /// Over canonical prompt names.
    pub prompts: Policy,
    /// May manage the tenant.
    pub admin: bool,
    /// Rates, caps and timeouts.
    pub limits: Limits,
    /// `limits.perTool` with its globs compiled, in order.
    #[serde(default)]
    pub tool_rates: Vec<(GlobList, u32)>,
}

impl CompiledPersona {
    /// The per-tool budget of `canonical` (calls per minute), from the first matching rule.
    pub fn tool_rate(&self, canonical: &str) -> Option<u32> {
        self.tool_rates.iter().find(|(glob, _)| glob.is_match(canonical)).map(|(_, rate)| *rate)
    }
}

/// How a connection reaches its upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Upstream {
    /// An MCP server over Streamable HTTP.
    Mcp {
        /// Endpoint URL.
        url: String,
        /// Headers sent on every request, from a Secret.
        headers: Vec<(String, SecretValue)>,
        /// Seconds between catalog refreshes.
        refresh_interval_seconds: u32,
        /// Upstream tool names Portcullis runs as tasks while the upstream has none.
        #[serde(default)]
        run_as_tasks: TaskTools,
    },
}

/// Upstream tool names Portcullis runs as tasks (`spec.mcp.runAsTasks`), compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskTools {
    /// A task for clients that take tasks.
    pub optional: GlobList,
    /// Only ever a task.
    pub required: GlobList,
    /// Ask for their input before their task is created.
    #[serde(default = "GlobList::empty")]
    pub input_first: GlobList,
}

impl Default for TaskTools {
    fn default() -> Self {
        Self { optional: GlobList::empty(), required: GlobList::empty(), input_first: GlobList::empty() }
    }
}

impl TaskTools {
    /// Whether the tool runs as a task for clients that take tasks.
    pub fn runs(&self, tool: &str) -> bool {
        self.optional.is_match(tool) || self.required.is_match(tool)
    }

    /// Whether the tool runs only as a task.
    pub fn requires(&self, tool: &str) -> bool {
        self.required.is_match(tool)
    }

    /// Whether the tool, run as a task, asks for its input before the task is created.
    pub fn input_first(&self, tool: &str) -> bool {
        self.runs(tool) && self.input_first.is_match(tool)
    }

    /// Whether no tool runs as a task.
    pub fn is_empty(&self) -> bool {
        self.optional.patterns().is_empty() && self.required.patterns().is_empty()
    }
}

/// A connection with its filters compiled and its Secret references resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledConnection {
    /// Connection name.
    pub name: String,
    /// Prefix of exposed names.
    pub prefix: String,
    /// How to reach it.
    pub upstream: Upstream,
    /// Over upstream tool names: which are exposed at all.
    pub tools: Policy,
    /// What callers see while the upstream is unreachable.
    #[serde(default)]
    pub failure_mode: crate::kinds::FailureMode,
}

impl CompiledConnection {
    /// The canonical exposed name of an upstream tool (`<prefix>.<tool>`), used by persona policy and REST.
    pub fn canonical_name(&self, upstream_name: &str) -> String {
        format!("{}.{}", self.prefix, upstream_name)
    }
}

/// An MCP endpoint with its persona globs compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledEndpoint {
    /// Endpoint name (the last path segment of its URL).
    pub name: String,
    /// Connection names, in declaration order.
    pub connections: Vec<String>,
    /// Over persona names.
    pub personas: GlobList,
    /// Between prefix and upstream name.
    pub separator: Separator,
    /// When names carry the connection prefix.
    #[serde(default)]
    pub prefix: PrefixMode,
    /// Returned to clients at initialize and discover.
    pub instructions: Option<String>,
    /// Browser origins allowed besides localhost.
    pub allowed_origins: Vec<String>,
}

impl CompiledEndpoint {
    /// Whether exposed names carry their connection's prefix.
    pub fn prefixed(&self) -> bool {
        match self.prefix {
            PrefixMode::Always => true,
            PrefixMode::Never => false,
            PrefixMode::WhenMultiple => self.connections.len() > 1,
        }
    }
}

/// An API key as the snapshot knows it: never the key itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Public key id.
    pub key_id: String,
    /// Tenant the key belongs to.
    pub tenant: String,
    /// Name of the ApiKey object.
    pub name: String,
    /// Persona the key acts as.
    pub persona: String,
    /// When it stops working.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A secret value (an upstream credential). Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
