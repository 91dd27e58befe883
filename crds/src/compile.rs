//! The compiler: objects in, a snapshot or the list of problems out. Pure: no I/O, no clock
//! (the caller passes `now`), so the operator, `portcullis publish` and dev mode agree exactly.

use crate::glob::{GlobList, Policy};
use crate::keys;
use crate::kinds::{AllowDeny, ConnectionType, IncludeExclude, Limits, PrefixMode};
use crate::manifests::Object;
use crate::problem::{ObjectRef, Problem, Severity};
use crate::snapshot::{
    CompiledConnection, CompiledEndpoint, CompiledPersona, KeyEntry, SecretValue, Snapshot, Tenant, Upstream,
};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Secret values by (namespace, name), then data key; `Err` marks a value that is not UTF-8.
type Secrets = BTreeMap<(String, String), BTreeMap<String, Result<String, ()>>>;

/// Compiles objects into a snapshot. Any error-severity problem refuses the whole configuration
/// (so nothing is half-applied); warnings travel inside the snapshot.
pub fn compile(objects: &[Object], now: DateTime<Utc>) -> Result<Snapshot, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for object in objects {
        let r = object.object_ref();
        if !seen.insert(r.clone()) {
            problems.push(Problem::error(&r, "metadata.name", format!("{r} is declared more than once")));
        }
        if !is_name(&r.name) {
            problems.push(Problem::error(
                &r,
                "metadata.name",
                format!(
                    "{:?} is not a valid name: use lowercase letters, digits and '-', at most 63 characters",
                    r.name
                ),
            ));
        }
        if !is_name(&r.namespace) {
            problems.push(Problem::error(
                &r,
                "metadata.namespace",
                format!("{:?} is not a valid namespace name", r.namespace),
            ));
        }
    }

    let secrets = collect_secrets(objects);
    let mut tenants: BTreeMap<String, Tenant> = BTreeMap::new();

    for object in objects {
        let r = object.object_ref();
        match object {
            Object::Persona(p) => {
                if let Some(persona) = compile_persona(&r, &p.spec, &mut problems) {
                    tenants.entry(r.namespace.clone()).or_default().personas.insert(r.name.clone(), persona);
                }
            }
            Object::Connection(c) => {
                if let Some(connection) = compile_connection(&r, &c.spec, &secrets, &mut problems) {
                    tenants.entry(r.namespace.clone()).or_default().connections.insert(r.name.clone(), connection);
                }
            }
            _ => {}
        }
    }

    // Prefixes are unique per tenant: REST names tools `<prefix>.<tool>` tenant-wide.
    for (namespace, tenant) in &mut tenants {
        let mut by_prefix: BTreeMap<String, String> = BTreeMap::new();
        for (name, connection) in &tenant.connections {
            if let Some(other) = by_prefix.get(&connection.prefix) {
                problems.push(Problem::error(
                    &ObjectRef::new("Connection", namespace, name),
                    "spec.prefix",
                    format!("prefix {:?} is already used by Connection {namespace}/{other}; prefixes must be unique in a namespace", connection.prefix),
                ));
            } else {
                by_prefix.insert(connection.prefix.clone(), name.clone());
            }
        }
        tenant.prefixes = by_prefix;
    }

    for object in objects {
        if let Object::McpEndpoint(e) = object {
            let r = object.object_ref();
            let tenant = tenants.entry(r.namespace.clone()).or_default();
            if let Some(endpoint) = compile_endpoint(&r, &e.spec, tenant, &mut problems) {
                tenant.endpoints.insert(r.name.clone(), endpoint);
            }
        }
    }

    let mut keys_by_digest: BTreeMap<String, KeyEntry> = BTreeMap::new();
    for object in objects {
        if let Object::ApiKey(k) = object {
            let r = object.object_ref();
            let tenant = tenants.get(&r.namespace);
            for (digest, entry) in compile_key(&r, &k.spec, tenant, &secrets, now, &mut problems) {
                if let Some(other) = keys_by_digest.get(&digest) {
                    problems.push(Problem::error(
                        &r,
                        "spec.secretName",
                        format!(
                            "holds the same key as ApiKey {}/{}; every ApiKey needs its own key",
                            other.tenant, other.name
                        ),
                    ));
                } else {
                    keys_by_digest.insert(digest, entry);
                }
            }
        }
    }

    problems.sort();
    problems.dedup();
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(problems);
    }
    let digest = content_digest(&tenants, &keys_by_digest);
    Ok(Snapshot { digest, tenants, keys: keys_by_digest, warnings: problems })
}

fn content_digest(tenants: &BTreeMap<String, Tenant>, keys: &BTreeMap<String, KeyEntry>) -> String {
    // BTreeMaps serialise in key order, so equal content always hashes equally.
    let body = serde_json::to_vec(&(tenants, keys)).unwrap_or_default();
    keys::hex(&Sha256::digest(&body))
}

/// DNS-1123 label: what Kubernetes accepts as a name for the objects we reference.
pub fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Connection prefixes: a lowercase letter, then up to 31 of `a-z0-9_-`.
pub fn is_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn collect_secrets(objects: &[Object]) -> Secrets {
    let mut secrets = BTreeMap::new();
    for object in objects {
        if let Object::Secret(s) = object {
            let r = object.object_ref();
            let mut values = BTreeMap::new();
            for (k, v) in s.data.iter().flatten() {
                values.insert(k.clone(), String::from_utf8(v.0.clone()).map_err(|_| ()));
            }
            for (k, v) in s.string_data.iter().flatten() {
                values.insert(k.clone(), Ok(v.clone()));
            }
            secrets.insert((r.namespace, r.name), values);
        }
    }
    secrets
}

fn compile_policy(r: &ObjectRef, field: &str, spec: &AllowDeny, problems: &mut Vec<Problem>) -> Policy {
    let allow = glob_list(r, &format!("{field}.allow"), &spec.allow, problems);
    let deny = glob_list(r, &format!("{field}.deny"), &spec.deny, problems);
    Policy { allow, deny }
}

fn glob_list(r: &ObjectRef, field: &str, patterns: &[String], problems: &mut Vec<Problem>) -> GlobList {
    match GlobList::new(patterns) {
        Ok(list) => list,
        Err((index, message)) => {
            problems.push(Problem::error(r, format!("{field}[{index}]"), message));
            GlobList::empty()
        }
    }
}

fn check_range(r: &ObjectRef, field: &str, value: u64, min: u64, max: u64, problems: &mut Vec<Problem>) {
    if value < min || value > max {
        problems.push(Problem::error(r, field, format!("{value} is out of range: use {min} to {max}")));
    }
}

fn check_limits(r: &ObjectRef, limits: &Limits, problems: &mut Vec<Problem>) {
    let max = u64::from(u32::MAX);
    check_range(r, "spec.limits.requestsPerMinute", limits.requests_per_minute.into(), 1, max, problems);
    check_range(r, "spec.limits.writesPerMinute", limits.writes_per_minute.into(), 1, max, problems);
    check_range(r, "spec.limits.toolCallsPerMinute", limits.tool_calls_per_minute.into(), 1, max, problems);
    check_range(r, "spec.limits.maxResultBytes", limits.max_result_bytes, 1024, 1 << 30, problems);
    check_range(r, "spec.limits.toolTimeoutSeconds", limits.tool_timeout_seconds.into(), 1, 3600, problems);
    for (i, rule) in limits.per_tool.iter().enumerate() {
        let field = format!("spec.limits.perTool[{i}].callsPerMinute");
        check_range(r, &field, rule.calls_per_minute.into(), 1, max, problems);
    }
}

fn compile_tool_rates(r: &ObjectRef, limits: &Limits, problems: &mut Vec<Problem>) -> Vec<(GlobList, u32)> {
    limits
        .per_tool
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let glob = GlobList::new(std::slice::from_ref(&rule.tool)).unwrap_or_else(|(_, message)| {
                problems.push(Problem::error(r, format!("spec.limits.perTool[{i}].tool"), message));
                GlobList::empty()
            });
            (glob, rule.calls_per_minute)
        })
        .collect()
}

fn compile_persona(
    r: &ObjectRef,
    spec: &crate::kinds::PersonaSpec,
    problems: &mut Vec<Problem>,
) -> Option<CompiledPersona> {
    check_limits(r, &spec.limits, problems);
    if spec.tools.allow.is_empty() {
        problems.push(Problem::warning(r, "spec.tools.allow", "no allow globs: this persona sees no tools"));
    }
    Some(CompiledPersona {
        name: r.name.clone(),
        subjects: spec.subjects.clone(),
        priority: spec.priority,
        tools: compile_policy(r, "spec.tools", &spec.tools, problems),
        resources: compile_policy(r, "spec.resources", &spec.resources, problems),
        prompts: compile_policy(r, "spec.prompts", &spec.prompts, problems),
        admin: spec.admin,
        limits: spec.limits.clone(),
        tool_rates: compile_tool_rates(r, &spec.limits, problems),
    })
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn compile_connection(
    r: &ObjectRef,
    spec: &crate::kinds::ConnectionSpec,
    secrets: &Secrets,
    problems: &mut Vec<Problem>,
) -> Option<CompiledConnection> {
    let before = problems.len();
    if !is_prefix(&spec.prefix) {
        problems.push(Problem::error(
            r,
            "spec.prefix",
            format!(
                "{:?} is not a valid prefix: start with a lowercase letter, then up to 31 of a-z, 0-9, '_' and '-'",
                spec.prefix
            ),
        ));
    }
    let IncludeExclude { include, exclude } = &spec.tools;
    let tools = Policy {
        allow: glob_list(r, "spec.tools.include", include, problems),
        deny: glob_list(r, "spec.tools.exclude", exclude, problems),
    };
    let upstream = match spec.type_ {
        ConnectionType::Mcp => {
            let Some(mcp) = &spec.mcp else {
                problems.push(Problem::error(
                    r,
                    "spec.mcp",
                    "type is mcp but spec.mcp is missing: give at least spec.mcp.url",
                ));
                return None;
            };
            let url_ok = ["http://", "https://"]
                .iter()
                .any(|s| mcp.url.strip_prefix(s).is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')));
            if !url_ok {
                problems.push(Problem::error(
                    r,
                    "spec.mcp.url",
                    format!("{:?} is not an http:// or https:// URL", mcp.url),
                ));
            }
            check_range(r, "spec.mcp.refreshIntervalSeconds", mcp.refresh_interval_seconds.into(), 5, 86_400, problems);
            let mut headers = Vec::new();
            if let Some(from) = &mcp.headers_from {
                let field = "spec.mcp.headersFrom.secretRef.name";
                match secrets.get(&(r.namespace.clone(), from.secret_ref.name.clone())) {
                    None => problems.push(Problem::error(
                        r,
                        field,
                        format!("Secret {:?} does not exist in namespace {:?}", from.secret_ref.name, r.namespace),
                    )),
                    Some(values) => {
                        for (name, value) in values {
                            match value {
                                _ if !is_header_name(name) => problems.push(Problem::error(
                                    r,
                                    field,
                                    format!(
                                        "data key {name:?} of Secret {:?} is not a valid HTTP header name",
                                        from.secret_ref.name
                                    ),
                                )),
                                Ok(v) if v.contains(['\r', '\n']) => problems.push(Problem::error(
                                    r,
                                    field,
                                    format!(
                                        "the value of {name:?} in Secret {:?} contains a line break",
                                        from.secret_ref.name
                                    ),
                                )),
                                Ok(v) => headers.push((name.clone(), SecretValue::new(v.trim()))),
                                Err(()) => problems.push(Problem::error(
                                    r,
                                    field,
                                    format!(
                                        "the value of {name:?} in Secret {:?} is not UTF-8 text",
                                        from.secret_ref.name
                                    ),
                                )),
                            }
                        }
                    }
                }
            }
            Upstream::Mcp {
                url: mcp.url.clone(),
                headers,
                refresh_interval_seconds: mcp.refresh_interval_seconds,
                run_as_tasks: crate::snapshot::TaskTools {
                    optional: glob_list(r, "spec.mcp.runAsTasks.optional", &mcp.run_as_tasks.optional, problems),
                    required: glob_list(r, "spec.mcp.runAsTasks.required", &mcp.run_as_tasks.required, problems),
                    input_first: glob_list(
                        r,
                        "spec.mcp.runAsTasks.inputFirst",
                        &mcp.run_as_tasks.input_first,
                        problems,
                    ),
                },
            }
        }
        other => {
            problems.push(Problem::error(
                r,
                "spec.type",
                format!(
                    "connections of type {:?} are not supported by this release yet; use type mcp",
                    format!("{other:?}").to_lowercase()
                ),
            ));
            return None;
        }
    };
    (problems.len() == before || problems[before..].iter().all(|p| p.severity == Severity::Warning)).then(|| {
        CompiledConnection {
            name: r.name.clone(),
            prefix: spec.prefix.clone(),
            upstream,
            tools,
            failure_mode: spec.failure_mode,
        }
    })
}

fn compile_endpoint(
    r: &ObjectRef,
    spec: &crate::kinds::McpEndpointSpec,
    tenant: &Tenant,
    problems: &mut Vec<Problem>,
) -> Option<CompiledEndpoint> {
    if spec.connections.is_empty() {
        problems.push(Problem::error(r, "spec.connections", "an endpoint needs at least one connection"));
    }
    let mut seen = BTreeSet::new();
    let mut prefixes: Vec<(&str, &str)> = Vec::new();
    for (index, name) in spec.connections.iter().enumerate() {
        let field = format!("spec.connections[{index}]");
        if let Some((namespace, _)) = name.split_once('/') {
            problems.push(Problem::error(
                r,
                &field,
                format!("{name:?} refers to namespace {namespace:?}; an endpoint may only use connections of its own namespace {:?}", r.namespace),
            ));
            continue;
        }
        if !seen.insert(name) {
            problems.push(Problem::error(r, &field, format!("connection {name:?} is listed twice")));
            continue;
        }
        match tenant.connections.get(name) {
            Some(c) => prefixes.push((name, &c.prefix)),
            None => problems.push(Problem::error(
                r,
                &field,
                format!("connection {name:?} does not exist in namespace {:?}", r.namespace),
            )),
        }
    }
    // With separator `_`, prefixes `a` and `a_b` can both produce `a_b_x`: refuse such pairs.
    let separator = spec.tool_naming.separator;
    let prefix_mode = spec.tool_naming.prefix;
    let prefixed = match prefix_mode {
        PrefixMode::Always => true,
        PrefixMode::Never => false,
        PrefixMode::WhenMultiple => spec.connections.len() > 1,
    };
    if !prefixed && prefixes.len() > 1 {
        let names: Vec<&str> = prefixes.iter().map(|(name, _)| *name).collect();
        problems.push(Problem::warning(
            r,
            "spec.toolNaming.prefix",
            format!(
                "without prefixes, connections {names:?} may expose the same tool, prompt or resource name; where they do, the connection listed first serves it"
            ),
        ));
    }
    for (a_name, a) in prefixes.iter().filter(|_| prefixed) {
        for (b_name, b) in &prefixes {
            if a_name != b_name && b.starts_with(&format!("{a}{}", separator.as_str())) {
                problems.push(Problem::error(
                    r,
                    "spec.toolNaming.separator",
                    format!(
                        "with separator {:?}, tools of connection {a_name:?} (prefix {a:?}) and {b_name:?} (prefix {b:?}) can get the same name; choose another separator or prefix",
                        separator.as_str()
                    ),
                ));
            }
        }
    }
    let personas = glob_list(r, "spec.personas", &spec.personas, problems);
    if !tenant.personas.is_empty() && !tenant.personas.keys().any(|p| personas.is_match(p)) {
        problems.push(Problem::warning(
            r,
            "spec.personas",
            "matches no Persona of this namespace: nobody can use this endpoint",
        ));
    }
    for (index, origin) in spec.allowed_origins.iter().enumerate() {
        if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
            problems.push(Problem::error(
                r,
                format!("spec.allowedOrigins[{index}]"),
                format!("{origin:?} is not an origin: write scheme://host[:port] without a path"),
            ));
        }
    }
    Some(CompiledEndpoint {
        name: r.name.clone(),
        connections: spec.connections.clone(),
        personas,
        separator,
        prefix: prefix_mode,
        instructions: spec.instructions.clone(),
        allowed_origins: spec.allowed_origins.clone(),
    })
}

/// Parses a Go-style duration such as `720h`, `1h30m` or `90s`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Some(Duration::from_secs_f64(total))
}

fn compile_key(
    r: &ObjectRef,
    spec: &crate::kinds::ApiKeySpec,
    tenant: Option<&Tenant>,
    secrets: &Secrets,
    now: DateTime<Utc>,
    problems: &mut Vec<Problem>,
) -> Vec<(String, KeyEntry)> {
    if !tenant.is_some_and(|t| t.personas.contains_key(&spec.persona)) {
        let message = if spec.persona.contains('/') {
            format!(
                "{:?} refers to another namespace; a key may only act as a Persona of its own namespace {:?}",
                spec.persona, r.namespace
            )
        } else {
            format!("persona {:?} does not exist in namespace {:?}", spec.persona, r.namespace)
        };
        problems.push(Problem::error(r, "spec.persona", message));
        return Vec::new();
    }
    if let Some(rotation) = &spec.rotation {
        match (parse_duration(&rotation.every), parse_duration(&rotation.overlap)) {
            (Some(every), Some(overlap)) if overlap < every => {}
            (Some(_), Some(_)) => problems.push(Problem::error(
                r,
                "spec.rotation.overlap",
                "the overlap must be shorter than the rotation period",
            )),
            (None, _) => problems.push(Problem::error(
                r,
                "spec.rotation.every",
                format!("{:?} is not a duration such as 720h", rotation.every),
            )),
            (_, None) => problems.push(Problem::error(
                r,
                "spec.rotation.overlap",
                format!("{:?} is not a duration such as 24h", rotation.overlap),
            )),
        }
    }
    if let Some(expires_at) = spec.expires_at
        && expires_at <= now
    {
        problems.push(Problem::warning(
            r,
            "spec.expiresAt",
            format!("expired at {expires_at}; the key no longer works"),
        ));
        return Vec::new();
    }
    let Some(values) = secrets.get(&(r.namespace.clone(), spec.secret_name.clone())) else {
        problems.push(Problem::warning(
            r,
            "spec.secretName",
            format!("Secret {:?} does not exist yet; the key works once it is minted", spec.secret_name),
        ));
        return Vec::new();
    };
    let key = match values.get("key") {
        Some(Ok(key)) => key.trim(),
        _ => {
            problems.push(Problem::warning(
                r,
                "spec.secretName",
                format!("Secret {:?} has no UTF-8 data key \"key\"; the key does not work", spec.secret_name),
            ));
            return Vec::new();
        }
    };
    if !keys::looks_like_key(key) || key.len() < keys::MIN_KEY_LEN {
        problems.push(Problem::warning(
            r,
            "spec.secretName",
            format!(
                "the key in Secret {:?} is not a Portcullis key (it must start with {:?} and be at least {} characters); it does not work",
                spec.secret_name,
                keys::KEY_PREFIX,
                keys::MIN_KEY_LEN
            ),
        ));
        return Vec::new();
    }
    let entry = |key: &str, expires_at: Option<DateTime<Utc>>| {
        let digest = keys::digest(key);
        let entry = KeyEntry {
            key_id: keys::key_id(&digest),
            tenant: r.namespace.clone(),
            name: r.name.clone(),
            persona: spec.persona.clone(),
            expires_at,
        };
        (digest, entry)
    };
    let mut entries = vec![entry(key, spec.expires_at)];
    // After a rotation the replaced key keeps working until the overlap ends (never past the
    // ApiKey's own expiry), so clients can pick up the new key without an outage.
    let previous = values.get(keys::SECRET_PREVIOUS_KEY).and_then(|v| v.as_ref().ok()).map(|k| k.trim());
    let valid_until = values
        .get(keys::SECRET_PREVIOUS_VALID_UNTIL)
        .and_then(|v| v.as_ref().ok())
        .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    if let (Some(previous), Some(valid_until)) = (previous, valid_until)
        && valid_until > now
        && previous != key
        && keys::looks_like_key(previous)
    {
        let until = spec.expires_at.map_or(valid_until, |e| e.min(valid_until));
        entries.push(entry(previous, Some(until)));
    }
    entries
}

#[cfg(test)]
mod tests;
