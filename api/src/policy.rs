//! What a persona may see: the tools of an endpoint (or, over REST, of the whole tenant) after
//! the connection's include/exclude and the persona's allow/deny. Anything else does not exist
//! for that caller.

use crate::connectors::{McpUpstream, Upstreams};
use portcullis_crds::snapshot::{CompiledConnection, CompiledEndpoint, CompiledPersona, Tenant};
use rmcp::model::Tool;
use std::sync::Arc;

/// A tool as one caller sees it.
#[derive(Clone)]
pub struct ExposedTool {
    /// Name the caller uses (`<prefix><separator><tool>`).
    pub name: String,
    /// Canonical name `<prefix>.<tool>` (persona policy, audit, REST).
    pub canonical: String,
    /// The upstream's own name.
    pub upstream_name: String,
    /// Connection name.
    pub connection: String,
    /// Live upstream.
    pub upstream: Arc<McpUpstream>,
    /// Definition from the upstream.
    pub definition: Tool,
}

/// How long a list waits for connections that have not answered their first catalog fetch.
const FIRST_CATALOG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn collect(
    connections: &[&CompiledConnection],
    separator: &str,
    tenant: &str,
    persona: &CompiledPersona,
    upstreams: &Upstreams,
) -> Vec<ExposedTool> {
    let mut tools = Vec::new();
    for connection in connections {
        let Some(upstream) = upstreams.get(tenant, &connection.name) else { continue };
        upstream.wait_first_attempt(FIRST_CATALOG_WAIT).await;
        for tool in upstream.catalog().iter() {
            let canonical = connection.canonical_name(&tool.name);
            if !connection.tools.permits(&tool.name) || !persona.tools.permits(&canonical) {
                continue;
            }
            tools.push(ExposedTool {
                name: format!("{}{separator}{}", connection.prefix, tool.name),
                canonical,
                upstream_name: tool.name.to_string(),
                connection: connection.name.clone(),
                upstream: upstream.clone(),
                definition: tool.clone(),
            });
        }
    }
    // Deterministic order; a duplicate upstream name keeps its first definition.
    tools.sort_by(|a, b| a.name.cmp(&b.name));
    tools.dedup_by(|a, b| a.name == b.name);
    tools
}

/// Tools of `endpoint` visible to `persona`, sorted by name.
pub async fn endpoint_tools(
    tenant_name: &str,
    tenant: &Tenant,
    endpoint: &CompiledEndpoint,
    persona: &CompiledPersona,
    upstreams: &Upstreams,
) -> Vec<ExposedTool> {
    let connections: Vec<&CompiledConnection> =
        endpoint.connections.iter().filter_map(|n| tenant.connections.get(n)).collect();
    collect(&connections, endpoint.separator.as_str(), tenant_name, persona, upstreams).await
}

/// Tools visible to `persona` through any endpoint it may use, by canonical name (REST).
pub async fn tenant_tools(
    tenant_name: &str,
    tenant: &Tenant,
    persona: &CompiledPersona,
    upstreams: &Upstreams,
) -> Vec<ExposedTool> {
    collect(&tenant.connections_for(&persona.name), ".", tenant_name, persona, upstreams).await
}
