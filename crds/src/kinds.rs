//! The four resource kinds (`portcullis.dev/v1alpha1`) and their status types.
//!
//! Every field carries a doc comment: it becomes the description `kubectl explain` shows.

#![allow(clippy::duplicated_attributes, reason = "several printcolumn(...) attributes are kube's syntax")]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pattern for connection prefixes: lowercase letters, digits, `_` and `-`, starting with a letter.
pub const PREFIX_PATTERN: &str = "^[a-z][a-z0-9_-]{0,31}$";
/// Pattern for names of objects referenced from other objects (DNS-1123 subdomain labels).
pub const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Status shared by all kinds: standard conditions and the generation they describe.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` and more specific ones, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Allow and deny glob lists. Deny wins over allow; an empty allow list allows nothing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct AllowDeny {
    /// Globs (`*`, `?`, `[abc]`, `{a,b}`) of names this persona may see and use.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Globs of names hidden even when an allow glob matches. Deny wins.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// OIDC/OAuth identities that resolve to a persona.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct Subjects {
    /// Groups (from the identity provider's groups claim) that resolve to this persona.
    #[serde(default)]
    pub groups: Vec<String>,
    /// User names (from the identity provider's user claim) that resolve to this persona.
    #[serde(default)]
    pub users: Vec<String>,
}

/// Per-persona limits. Rates are per principal (key or user) within the tenant.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Requests per minute over REST and MCP together.
    #[serde(default = "Limits::default_requests_per_minute")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: u32,
    /// Write requests (POST, PUT, DELETE) per minute.
    #[serde(default = "Limits::default_writes_per_minute")]
    #[schemars(range(min = 1))]
    pub writes_per_minute: u32,
    /// Tool calls per minute.
    #[serde(default = "Limits::default_tool_calls_per_minute")]
    #[schemars(range(min = 1))]
    pub tool_calls_per_minute: u32,
    /// Largest tool result, in bytes of JSON, returned to this persona; larger results are refused.
    #[serde(default = "Limits::default_max_result_bytes")]
    #[schemars(range(min = 1024))]
    pub max_result_bytes: u64,
    /// How long a tool call may take, in seconds, before it is cancelled.
    #[serde(default = "Limits::default_tool_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub tool_timeout_seconds: u32,
    /// Budgets for particular tools, on top of `toolCallsPerMinute`: each tool whose
    /// `<prefix>.<tool>` name matches a rule's glob (the first matching rule) gets its own budget
    /// of that many calls per minute per principal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_tool: Vec<ToolLimit>,
}

/// A tool-call budget for the tools a glob matches.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolLimit {
    /// Glob over canonical tool names `<prefix>.<tool>`, such as `warehouse.query*`.
    #[schemars(length(min = 1))]
    pub tool: String,
    /// Calls per minute of each matching tool, per principal.
    #[schemars(range(min = 1))]
    pub calls_per_minute: u32,
}

impl Limits {
    fn default_requests_per_minute() -> u32 {
        600
    }
    fn default_writes_per_minute() -> u32 {
        60
    }
    fn default_tool_calls_per_minute() -> u32 {
        120
    }
    fn default_max_result_bytes() -> u64 {
        262_144
    }
    fn default_tool_timeout_seconds() -> u32 {
        30
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_minute: Self::default_requests_per_minute(),
            writes_per_minute: Self::default_writes_per_minute(),
            tool_calls_per_minute: Self::default_tool_calls_per_minute(),
            max_result_bytes: Self::default_max_result_bytes(),
            tool_timeout_seconds: Self::default_tool_timeout_seconds(),
            per_tool: Vec::new(),
        }
    }
}

fn default_priority() -> i32 {
    100
}

/// Who may see and call which tools, resources and prompts, with which limits.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "Persona",
    doc = "A Persona: who may see and call which tools, resources and prompts, with which limits.",
    namespaced,
    status = "PersonaStatus",
    category = "portcullis",
    printcolumn(name = "Admin", type_ = "boolean", json_path = ".spec.admin"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Tools", type_ = "integer", json_path = ".status.toolCount"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PersonaSpec {
    /// OIDC/OAuth identities (groups or users) that resolve to this persona. API keys name their persona directly.
    #[serde(default)]
    pub subjects: Subjects,
    /// When several personas of a tenant match one identity, the highest priority wins.
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Globs over exposed tool names, written `<prefix>.<tool>` whatever separator an endpoint uses.
    #[serde(default)]
    pub tools: AllowDeny,
    /// Globs over resource URIs this persona may see and read.
    #[serde(default)]
    pub resources: AllowDeny,
    /// Globs over exposed prompt names, written `<prefix>.<prompt>`.
    #[serde(default)]
    pub prompts: AllowDeny,
    /// Whether this persona may manage the tenant through `/api/v1/admin` (audit log, keys).
    #[serde(default)]
    pub admin: bool,
    /// Rate limits, result-size cap and tool timeout for this persona.
    #[serde(default)]
    pub limits: Limits,
}

/// Observed state of a Persona.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersonaStatus {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// How many tools this persona can currently see across its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_count: Option<u32>,
    /// Allow globs that currently match no tool (likely typos).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmatched_patterns: Vec<String>,
}

/// The kind of upstream a Connection reaches.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionType {
    /// An MCP server over Streamable HTTP.
    #[default]
    Mcp,
    /// A PostgreSQL database whose queries become tools.
    Postgres,
    /// A REST API whose OpenAPI operations become tools.
    Openapi,
}

/// A reference to a Secret in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct SecretRef {
    /// Name of the Secret, in the namespace of the referring object.
    pub name: String,
}

/// Where extra request headers come from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeadersFrom {
    /// Secret whose every data key becomes a request header of the same name.
    pub secret_ref: SecretRef,
}

fn default_refresh_seconds() -> u32 {
    300
}

/// An upstream MCP server reached over Streamable HTTP.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McpUpstream {
    /// The MCP endpoint URL of the upstream server (http or https).
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// Headers sent with every request to the upstream (for example `Authorization`), from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<HeadersFrom>,
    /// How often, in seconds, the tool catalog is refreshed even without a list_changed notification.
    #[serde(default = "default_refresh_seconds")]
    #[schemars(range(min = 5, max = 86400))]
    pub refresh_interval_seconds: u32,
    /// Tools that Portcullis runs as tasks (the 2026-07-28 tasks extension) for clients that
    /// take tasks, while the upstream speaks only 2025 and so has none: the call runs in the
    /// background and the client polls it. Ignored while the upstream speaks 2026-07-28 (its
    /// own tasks, if it offers any, pass through).
    #[serde(default, skip_serializing_if = "RunAsTasks::is_empty")]
    pub run_as_tasks: RunAsTasks,
}

/// Upstream tool names (globs) run as tasks, by their task support (as 2025-11-25's
/// `execution.taskSupport` names it).
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunAsTasks {
    /// A task for clients that take tasks, an ordinary call for the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub optional: Vec<String>,
    /// Only ever a task: clients that do not take tasks are refused (-32021).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// Of the tools above, those that ask for their input before their task: what such a tool
    /// asks as soon as it starts (or as soon as it has an answer) goes to the client as
    /// `input_required`, and the task is created once it works on without asking (the
    /// input-then-task composition of the tasks extension). The others make their task at once
    /// and ask inside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_first: Vec<String>,
}

impl RunAsTasks {
    fn is_empty(&self) -> bool {
        self.optional.is_empty() && self.required.is_empty() && self.input_first.is_empty()
    }
}

/// Include and exclude globs over an upstream's own tool names.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
pub struct IncludeExclude {
    /// Globs of upstream tool names to expose. Defaults to all.
    #[serde(default = "IncludeExclude::all")]
    pub include: Vec<String>,
    /// Globs of upstream tool names never exposed, whoever asks. Exclude wins.
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl IncludeExclude {
    fn all() -> Vec<String> {
        vec!["*".to_string()]
    }
}

impl Default for IncludeExclude {
    fn default() -> Self {
        Self { include: Self::all(), exclude: Vec::new() }
    }
}

/// An upstream (MCP server, SQL database, REST API) whose tools are exposed as `<prefix>.<tool>`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "Connection",
    doc = "A Connection: an upstream (MCP server, SQL database, REST API) whose tools are exposed as <prefix>.<tool>.",
    namespaced,
    status = "ConnectionStatus",
    category = "portcullis",
    validation = "self.spec.type != 'mcp' || has(self.spec.mcp)",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Prefix", type_ = "string", json_path = ".spec.prefix"),
    printcolumn(name = "Tools", type_ = "integer", json_path = ".status.toolCount"),
    printcolumn(name = "Health", type_ = "string", json_path = ".status.health"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSpec {
    /// The kind of upstream: `mcp` (Streamable HTTP MCP server), `postgres` or `openapi`.
    #[serde(rename = "type", default)]
    pub type_: ConnectionType,
    /// Prefix of every exposed name: tools appear as `<prefix><separator><tool>`. Unique in the namespace.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_-]{0,31}$"))]
    pub prefix: String,
    /// Settings for `type: mcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpUpstream>,
    /// Which of the upstream's tools are exposed at all.
    #[serde(default)]
    pub tools: IncludeExclude,
    /// What this connection is for, shown to administrators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// What callers see while the upstream is unreachable: `open` (default) drops its tools,
    /// resources and prompts out of lists and fails calls to them with an error; `closed` makes
    /// every endpoint that includes it answer errors until it is back.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

/// What callers see while an upstream is unreachable.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Its tools, resources and prompts drop out of lists; calls to them fail with an error;
    /// the rest of the endpoint keeps working.
    #[default]
    Open,
    /// Endpoints that include it answer errors (HTTP 503) until it is back.
    Closed,
}

/// Health of an upstream as the API pods observe it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not yet contacted.
    #[default]
    Unknown,
    /// The last contact succeeded.
    Healthy,
    /// The last contact failed.
    Unhealthy,
}

/// Observed state of a Connection.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Number of tools the upstream currently exposes after include/exclude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_count: Option<u32>,
    /// Health as the API pods last observed it.
    #[serde(default)]
    pub health: Health,
}

/// The separator between a connection's prefix and an upstream name.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
pub enum Separator {
    /// `warehouse.query` (the default).
    #[default]
    #[serde(rename = ".")]
    Dot,
    /// `warehouse_query`, for clients that reject dots in tool names.
    #[serde(rename = "_")]
    Underscore,
    /// `warehouse__query`.
    #[serde(rename = "__")]
    DoubleUnderscore,
    /// `warehouse-query`.
    #[serde(rename = "-")]
    Dash,
}

impl Separator {
    /// The separator as written between prefix and name.
    pub fn as_str(self) -> &'static str {
        match self {
            Separator::Dot => ".",
            Separator::Underscore => "_",
            Separator::DoubleUnderscore => "__",
            Separator::Dash => "-",
        }
    }
}

/// When exposed names carry their connection's prefix.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PrefixMode {
    /// Always: `warehouse.query`, resource URIs `warehouse+file:///x` (the default).
    #[default]
    Always,
    /// Never: the upstreams' own names and URIs; with several connections, a name two of
    /// them expose is served by the one listed first.
    Never,
    /// Only when the endpoint has more than one connection.
    WhenMultiple,
}

/// How exposed names are formed on an endpoint.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct ToolNaming {
    /// Separator between a connection's prefix and the upstream name: `.`, `_`, `__` or `-`.
    #[serde(default)]
    pub separator: Separator,
    /// When names carry the connection prefix: `always` (default), `never` or `whenMultiple`.
    /// Applies to tools and prompts (`<prefix><separator><name>`) and resource URIs (`<prefix>+<uri>`).
    #[serde(default)]
    pub prefix: PrefixMode,
}

fn all_personas() -> Vec<String> {
    vec!["*".to_string()]
}

/// An MCP URL (`/mcp/<namespace>/<name>`) that bundles connections for some personas.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "McpEndpoint",
    doc = "An McpEndpoint: an MCP URL, /mcp/<namespace>/<name>, that bundles connections for some personas.",
    namespaced,
    status = "McpEndpointStatus",
    category = "portcullis",
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct McpEndpointSpec {
    /// Names of Connections in this namespace whose tools this endpoint serves.
    #[schemars(length(min = 1))]
    pub connections: Vec<String>,
    /// Globs over Persona names allowed to use this endpoint; to others it does not exist.
    #[serde(default = "all_personas")]
    pub personas: Vec<String>,
    /// How exposed names are formed.
    #[serde(default)]
    pub tool_naming: ToolNaming,
    /// Instructions returned to MCP clients (`initialize` and `server/discover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// Browser origins (for example `https://inspector.example.com`) allowed to call this endpoint, besides localhost.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// Observed state of an McpEndpoint.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McpEndpointStatus {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The path MCP clients connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Automatic rotation of an API key.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct Rotation {
    /// How often a new key is minted, as a duration such as `720h`.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub every: String,
    /// How long the previous key stays valid after a rotation, such as `24h`.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub overlap: String,
}

/// A service credential bound to one persona; the key itself lives in the named Secret.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    doc = "An ApiKey: a service credential bound to one persona; the key lives in the named Secret.",
    namespaced,
    status = "ApiKeyStatus",
    category = "portcullis",
    validation = "!has(self.spec.rotation) || duration(self.spec.rotation.overlap) < duration(self.spec.rotation.every)",
    printcolumn(name = "Persona", type_ = "string", json_path = ".spec.persona"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".spec.secretName"),
    printcolumn(name = "Key ID", type_ = "string", json_path = ".status.keyId"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// Name of the Persona (same namespace) this key acts as.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub persona: String,
    /// Name of the Secret holding the key under the data key `key`; the operator writes it.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub secret_name: String,
    /// When the key stops working (RFC 3339). No value: it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Automatic rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// What the key is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Observed state of an ApiKey. Never holds key material.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Public identifier of the current key (not the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// When the current key expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}
