//! What a persona may see: the tools, prompts, resources and resource templates of an endpoint
//! (or, over REST, of the whole tenant) after the connection's include/exclude and the
//! persona's allow/deny. Anything else does not exist for that caller.
//!
//! Naming: tools and prompts are exposed as `<prefix><separator><name>`; resource URIs and URI
//! templates as `<prefix>+<uri>` (the prefix becomes part of the URI scheme, so the result is
//! still a URI, templates still expand, and the upstream URI comes back by cutting at the first
//! `+`, since prefixes never contain one). An endpoint whose naming leaves prefixes out serves
//! the upstream's names and URIs unchanged. Persona globs always match the canonical forms
//! `<prefix>.<name>` and `<prefix>+<uri>`, whatever an endpoint shows.

use crate::connectors::mcp::Catalog;
use crate::connectors::{McpUpstream, Upstreams};
use portcullis_crds::snapshot::{CompiledConnection, CompiledEndpoint, CompiledPersona, Tenant};
use rmcp::model::{Prompt, Resource, ResourceTemplate, Tool};
use std::sync::Arc;

/// Something an upstream offers, as one caller sees it.
#[derive(Clone)]
pub struct Exposed<T> {
    /// Name (or URI) the caller uses.
    pub name: String,
    /// Canonical name `<prefix>.<name>` or URI `<prefix>+<uri>` (persona policy, audit, REST).
    pub canonical: String,
    /// The upstream's own name (or URI).
    pub upstream_name: String,
    /// Connection name.
    pub connection: String,
    /// Live upstream.
    pub upstream: Arc<McpUpstream>,
    /// Definition from the upstream.
    pub definition: T,
}

/// A tool as one caller sees it.
pub type ExposedTool = Exposed<Tool>;
/// A prompt as one caller sees it.
pub type ExposedPrompt = Exposed<Prompt>;
/// A concrete resource as one caller sees it (`name` is its exposed URI).
pub type ExposedResource = Exposed<Resource>;
/// A resource template as one caller sees it (`name` is its exposed URI template).
pub type ExposedTemplate = Exposed<ResourceTemplate>;

/// How long a list waits for connections that have not answered their first catalog fetch.
const FIRST_CATALOG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The canonical URI of an upstream resource: `<prefix>+<uri>`.
pub fn canonical_uri(connection: &CompiledConnection, uri: &str) -> String {
    format!("{}+{uri}", connection.prefix)
}

/// Which connections a caller reaches and how names are shown to it.
pub struct Scope<'a> {
    tenant_name: &'a str,
    connections: Vec<&'a CompiledConnection>,
    separator: &'a str,
    prefixed: bool,
    persona: &'a CompiledPersona,
}

impl<'a> Scope<'a> {
    /// An MCP endpoint's connections, named as the endpoint names them.
    pub fn endpoint(
        tenant_name: &'a str,
        tenant: &'a Tenant,
        endpoint: &'a CompiledEndpoint,
        persona: &'a CompiledPersona,
    ) -> Self {
        let connections: Vec<&CompiledConnection> =
            endpoint.connections.iter().filter_map(|n| tenant.connections.get(n)).collect();
        let prefixed = endpoint.prefixed();
        Self { tenant_name, connections, separator: endpoint.separator.as_str(), prefixed, persona }
    }

    /// Every connection the persona reaches through any endpoint, by canonical names (REST).
    pub fn tenant(tenant_name: &'a str, tenant: &'a Tenant, persona: &'a CompiledPersona) -> Self {
        Self {
            tenant_name,
            connections: tenant.connections_for(&persona.name),
            separator: ".",
            prefixed: true,
            persona,
        }
    }

    /// Whether names carry the connection prefix.
    pub fn prefixed(&self) -> bool {
        self.prefixed
    }

    fn name(&self, connection: &CompiledConnection, name: &str) -> String {
        if self.prefixed { format!("{}{}{name}", connection.prefix, self.separator) } else { name.to_string() }
    }

    fn uri(&self, connection: &CompiledConnection, uri: &str) -> String {
        if self.prefixed { canonical_uri(connection, uri) } else { uri.to_string() }
    }

    async fn catalogs(&self, upstreams: &Upstreams) -> Vec<(&'a CompiledConnection, Arc<McpUpstream>, Arc<Catalog>)> {
        let mut catalogs = Vec::new();
        for connection in &self.connections {
            let Some(upstream) = upstreams.get(self.tenant_name, &connection.name) else { continue };
            upstream.wait_first_attempt(FIRST_CATALOG_WAIT).await;
            let catalog = upstream.catalog();
            catalogs.push((*connection, upstream, catalog));
        }
        catalogs
    }

    /// Builds the exposed items of one kind from every catalog, sorted by exposed name; where two
    /// connections expose the same name, the one declared first wins.
    async fn collect<T: Clone>(
        &self,
        upstreams: &Upstreams,
        items: impl Fn(&Catalog) -> Vec<(String, T)>,
        expose: impl Fn(&CompiledConnection, &str) -> (String, String),
        permitted: impl Fn(&CompiledConnection, &str, &str) -> bool,
    ) -> Vec<Exposed<T>> {
        let mut exposed = Vec::new();
        for (connection, upstream, catalog) in self.catalogs(upstreams).await {
            for (upstream_name, definition) in items(&catalog) {
                let (name, canonical) = expose(connection, &upstream_name);
                if !permitted(connection, &upstream_name, &canonical) {
                    continue;
                }
                exposed.push(Exposed {
                    name,
                    canonical,
                    upstream_name,
                    connection: connection.name.clone(),
                    upstream: upstream.clone(),
                    definition,
                });
            }
        }
        // Stable sort: equal names keep declaration order, and dedup keeps the first.
        exposed.sort_by(|a, b| a.name.cmp(&b.name));
        exposed.dedup_by(|later, first| later.name == first.name);
        exposed
    }

    /// Tools visible to the persona, sorted by name.
    pub async fn tools(&self, upstreams: &Upstreams) -> Vec<ExposedTool> {
        self.collect(
            upstreams,
            |c| c.tools.iter().map(|t| (t.name.to_string(), t.clone())).collect(),
            |connection, name| (self.name(connection, name), connection.canonical_name(name)),
            |connection, name, canonical| connection.tools.permits(name) && self.persona.tools.permits(canonical),
        )
        .await
    }

    /// The tool the caller names `name`, if the persona sees it: what `tools` would list under
    /// that name (the first connection that exposes it wins), found without building the list.
    pub async fn tool(&self, upstreams: &Upstreams, name: &str) -> Option<ExposedTool> {
        for connection in &self.connections {
            let upstream_name = if self.prefixed {
                let Some(rest) = name.strip_prefix(connection.prefix.as_str()) else { continue };
                let Some(rest) = rest.strip_prefix(self.separator) else { continue };
                rest
            } else {
                name
            };
            let Some(upstream) = upstreams.get(self.tenant_name, &connection.name) else { continue };
            upstream.wait_first_attempt(FIRST_CATALOG_WAIT).await;
            let catalog = upstream.catalog();
            let Some(definition) = catalog.tools.iter().find(|t| t.name == upstream_name) else { continue };
            let canonical = connection.canonical_name(upstream_name);
            if !(connection.tools.permits(upstream_name) && self.persona.tools.permits(&canonical)) {
                continue;
            }
            return Some(Exposed {
                name: name.to_string(),
                canonical,
                upstream_name: upstream_name.to_string(),
                connection: connection.name.clone(),
                upstream,
                definition: definition.clone(),
            });
        }
        None
    }

    /// The tool `connection` offers under canonical name `canonical`, if the persona sees it
    /// under the name this scope gives it (what `tools` lists).
    pub async fn tool_by_canonical(
        &self,
        upstreams: &Upstreams,
        connection: &str,
        canonical: &str,
    ) -> Option<ExposedTool> {
        let offered_by = self.connections.iter().find(|c| c.name == connection)?;
        let upstream_name = canonical.strip_prefix(offered_by.prefix.as_str())?.strip_prefix('.')?;
        let tool = self.tool(upstreams, &self.name(offered_by, upstream_name)).await?;
        (tool.connection == connection && tool.canonical == canonical).then_some(tool)
    }

    /// Prompts visible to the persona, sorted by name.
    pub async fn prompts(&self, upstreams: &Upstreams) -> Vec<ExposedPrompt> {
        self.collect(
            upstreams,
            |c| c.prompts.iter().map(|p| (p.name.clone(), p.clone())).collect(),
            |connection, name| (self.name(connection, name), connection.canonical_name(name)),
            |_, _, canonical| self.persona.prompts.permits(canonical),
        )
        .await
    }

    /// Concrete resources visible to the persona, sorted by exposed URI.
    pub async fn resources(&self, upstreams: &Upstreams) -> Vec<ExposedResource> {
        self.collect(
            upstreams,
            |c| c.resources.iter().map(|r| (r.uri.clone(), r.clone())).collect(),
            |connection, uri| (self.uri(connection, uri), canonical_uri(connection, uri)),
            |_, _, canonical| self.persona.resources.permits(canonical),
        )
        .await
    }

    /// Resource templates visible to the persona (their canonical template matches the
    /// persona's resource globs), sorted by exposed template.
    pub async fn templates(&self, upstreams: &Upstreams) -> Vec<ExposedTemplate> {
        self.collect(
            upstreams,
            |c| c.templates.iter().map(|t| (t.uri_template.clone(), t.clone())).collect(),
            |connection, uri| (self.uri(connection, uri), canonical_uri(connection, uri)),
            |_, _, canonical| self.persona.resources.permits(canonical),
        )
        .await
    }

    /// The connection and upstream URI behind an exposed resource URI, if the persona may read
    /// it. Prefixed URIs name their connection; otherwise the connection that lists the URI, or
    /// whose template matches it, serves it (the only one, when the scope has one connection).
    pub async fn resolve_uri(&self, upstreams: &Upstreams, uri: &str) -> Option<ResolvedResource> {
        let (connection, upstream_uri) = if self.prefixed {
            let (prefix, rest) = uri.split_once('+')?;
            (*self.connections.iter().find(|c| c.prefix == prefix)?, rest.to_string())
        } else if let [only] = self.connections.as_slice() {
            (*only, uri.to_string())
        } else {
            let catalogs = self.catalogs(upstreams).await;
            let listed = catalogs.iter().find(|(_, _, c)| c.resources.iter().any(|r| r.uri == uri));
            let templated =
                || catalogs.iter().find(|(_, _, c)| c.templates.iter().any(|t| template_matches(&t.uri_template, uri)));
            let (connection, _, _) = listed.or_else(templated)?;
            (*connection, uri.to_string())
        };
        let canonical = canonical_uri(connection, &upstream_uri);
        if !self.persona.resources.permits(&canonical) {
            return None;
        }
        let upstream = upstreams.get(self.tenant_name, &connection.name)?;
        Some(ResolvedResource { canonical, upstream_uri, connection: connection.name.clone(), upstream })
    }
}

/// What lists show: the items of upstreams that are reachable. Items of an unreachable one
/// drop out (failure mode `open`); calls to them still resolve and fail with a clear error.
pub fn available<T>(items: Vec<Exposed<T>>) -> Vec<Exposed<T>> {
    items.into_iter().filter(|item| !item.upstream.is_down()).collect()
}

/// A resource URI resolved to the connection that serves it.
pub struct ResolvedResource {
    /// `<prefix>+<uri>`.
    pub canonical: String,
    /// The URI as the upstream knows it.
    pub upstream_uri: String,
    /// Connection name.
    pub connection: String,
    /// Live upstream.
    pub upstream: Arc<McpUpstream>,
}

/// Whether `uri` is an expansion of the RFC 6570 `template`: literal parts must match exactly;
/// a simple `{var}` matches one path segment's worth of characters (no `/`, `?` or `#`), and an
/// operator expression (`{+path}`, `{/a}`, `{?q}`…) matches anything.
pub fn template_matches(template: &str, uri: &str) -> bool {
    fn matches(parts: &[Part<'_>], uri: &str) -> bool {
        match parts.split_first() {
            None => uri.is_empty(),
            Some((Part::Literal(text), rest)) => uri.strip_prefix(text).is_some_and(|tail| matches(rest, tail)),
            Some((Part::Variable { reserved }, rest)) => {
                (0..=uri.len()).filter(|i| uri.is_char_boundary(*i)).any(|i| {
                    let (value, tail) = uri.split_at(i);
                    (*reserved || !value.contains(['/', '?', '#'])) && matches(rest, tail)
                })
            }
        }
    }
    enum Part<'t> {
        Literal(&'t str),
        Variable { reserved: bool },
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Literal(&rest[..open]));
        }
        let Some(close) = rest[open..].find('}') else { return false };
        let expression = &rest[open + 1..open + close];
        let reserved = expression.starts_with(['+', '#', '/', '?', '&', '.', ';']);
        parts.push(Part::Variable { reserved });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest));
    }
    matches(&parts, uri)
}

#[cfg(test)]
mod tests {
    use super::template_matches;

    #[test]
    fn templates_match_their_expansions_only() {
        assert!(template_matches("note://{id}", "note://42"));
        assert!(!template_matches("note://{id}", "note://42/x"));
        assert!(!template_matches("note://{id}", "notes://42"));
        assert!(template_matches("file:///{+path}", "file:///a/b/c.txt"));
        assert!(template_matches("users/{user}/repos/{repo}", "users/ana/repos/portcullis"));
        assert!(!template_matches("users/{user}/repos/{repo}", "users/ana/gists/1"));
        assert!(template_matches("search{?q}", "search?q=rust"));
        assert!(!template_matches("broken{id", "broken1"));
    }
}
