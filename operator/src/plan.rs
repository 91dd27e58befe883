//! Pure reconcile decisions: which objects make it into the snapshot, and the status every
//! object should show. No I/O and no clock (the caller passes `now`), so every decision is
//! tested directly.
//!
//! One broken object must not freeze everybody's configuration: the compiler refuses a whole
//! configuration with errors, so the planner compiles, drops the objects with errors, and
//! compiles again until it succeeds. Dropped objects are not served and say why in their status;
//! objects that depended on them say which dependency is not ready.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portcullis_crds::kinds::{ApiKeyStatus, CommonStatus, ConnectionStatus, Health, McpEndpointStatus, PersonaStatus};
use portcullis_crds::{Object, ObjectRef, Problem, Severity, Snapshot, compile, keys};
use portcullis_store::reports::ConnectionReport;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Reports of API pods by (namespace, connection).
pub type Reports = BTreeMap<(String, String), ConnectionReport>;

/// The outcome of planning.
#[derive(Debug)]
pub struct Plan {
    /// What API pods should serve.
    pub snapshot: Snapshot,
    /// Desired `.status` of every custom resource, by object.
    pub statuses: BTreeMap<ObjectRef, Value>,
    /// Objects left out of the snapshot, with the condition explaining why.
    pub failures: BTreeMap<ObjectRef, Failure>,
}

/// Why an object is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// PascalCase reason, such as `ReferenceNotFound`.
    pub reason: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Compiles `objects`, leaving out the ones that do not compile, and derives every status.
/// `generations` holds each object's `metadata.generation`; `public_url` is where clients reach
/// the API pods (for endpoint URLs).
pub fn plan(
    objects: &[Object],
    generations: &BTreeMap<ObjectRef, i64>,
    reports: &Reports,
    public_url: Option<&str>,
    now: DateTime<Utc>,
) -> Plan {
    let (snapshot, failures) = compile_isolated(objects, now);
    let mut warnings: BTreeMap<&ObjectRef, Vec<&Problem>> = BTreeMap::new();
    for w in &snapshot.warnings {
        warnings.entry(&w.object).or_default().push(w);
    }
    let mut statuses = BTreeMap::new();
    for object in objects {
        let r = object.object_ref();
        if matches!(object, Object::Secret(_)) {
            continue;
        }
        let generation = generations.get(&r).copied();
        let object_warnings = warnings.get(&r).cloned().unwrap_or_default();
        let ready = match failures.get(&r) {
            Some(f) => condition("Ready", false, &f.reason, &f.message, generation, now),
            None => ready_condition(object, &object_warnings, generation, now),
        };
        let status = match object {
            Object::Persona(_) => {
                let (tool_count, unmatched_patterns) = persona_tools(&snapshot, &r, reports);
                let status = PersonaStatus {
                    common: common(generation, vec![ready]),
                    tool_count: failures.contains_key(&r).then_some(0).or(tool_count),
                    unmatched_patterns,
                };
                serde_json::to_value(status)
            }
            Object::Connection(_) => {
                let report = reports.get(&(r.namespace.clone(), r.name.clone()));
                let connection = snapshot.tenant(&r.namespace).and_then(|t| t.connections.get(&r.name));
                let (health, healthy) = match (connection, report) {
                    (Some(_), Some(report)) => match report.health.as_str() {
                        "healthy" => (
                            Health::Healthy,
                            condition(
                                "Healthy",
                                true,
                                "UpstreamReachable",
                                "the upstream answers the API pods",
                                generation,
                                now,
                            ),
                        ),
                        "unhealthy" => (
                            Health::Unhealthy,
                            condition(
                                "Healthy",
                                false,
                                "UpstreamUnreachable",
                                "the API pods cannot reach the upstream; see GET /api/v1/admin/connections for the error",
                                generation,
                                now,
                            ),
                        ),
                        _ => (
                            Health::Unknown,
                            unknown(
                                "Healthy",
                                "NotContacted",
                                "no API pod has contacted the upstream yet",
                                generation,
                                now,
                            ),
                        ),
                    },
                    (Some(_), None) => (
                        Health::Unknown,
                        unknown(
                            "Healthy",
                            "NoReports",
                            "no API pod has reported on this connection yet",
                            generation,
                            now,
                        ),
                    ),
                    (None, _) => (
                        Health::Unknown,
                        unknown("Healthy", "NotServed", "the connection is not served", generation, now),
                    ),
                };
                let tool_count = match (connection, report) {
                    (Some(c), Some(report)) => {
                        Some(report.tools.iter().filter(|t| c.tools.permits(t)).count().try_into().unwrap_or(u32::MAX))
                    }
                    _ => None,
                };
                serde_json::to_value(ConnectionStatus {
                    common: common(generation, vec![ready, healthy]),
                    tool_count,
                    health,
                })
            }
            Object::McpEndpoint(_) => {
                let path = format!("/mcp/{}/{}", r.namespace, r.name);
                let url = match public_url {
                    Some(base) => format!("{}{path}", base.trim_end_matches('/')),
                    None => path,
                };
                let served = !failures.contains_key(&r);
                serde_json::to_value(McpEndpointStatus {
                    common: common(generation, vec![ready]),
                    url: served.then_some(url),
                })
            }
            Object::ApiKey(k) => {
                let entry = current_key(objects, &r.namespace, &k.spec.secret_name)
                    .and_then(|digest| snapshot.key(&digest).filter(|e| e.name == r.name && e.tenant == r.namespace));
                serde_json::to_value(ApiKeyStatus {
                    common: common(generation, vec![ready]),
                    key_id: entry.map(|e| e.key_id.clone()),
                    expires_at: entry.and_then(|e| e.expires_at),
                })
            }
            Object::Secret(_) => continue,
        };
        statuses.insert(r, status.unwrap_or_default());
    }
    Plan { snapshot, statuses, failures }
}

/// Compiles, drops objects with errors, and repeats until the rest compiles.
pub fn compile_isolated(objects: &[Object], now: DateTime<Utc>) -> (Snapshot, BTreeMap<ObjectRef, Failure>) {
    let mut failures: BTreeMap<ObjectRef, Failure> = BTreeMap::new();
    let mut current: Vec<Object> = objects.to_vec();
    loop {
        match compile(&current, now) {
            Ok(snapshot) => return (snapshot, failures),
            Err(problems) => {
                let errors: Vec<&Problem> = problems.iter().filter(|p| p.severity == Severity::Error).collect();
                // A dependency may fail in the same round as its dependants (the compiler drops
                // an invalid connection at once), so name dependencies against this round too.
                let mut known = failures.clone();
                for p in &errors {
                    known.entry(p.object.clone()).or_insert_with(|| failure_for(p, &failures));
                }
                let mut round: BTreeMap<ObjectRef, Failure> = BTreeMap::new();
                for p in errors {
                    let failure = failure_for(p, &known);
                    round
                        .entry(p.object.clone())
                        .and_modify(|f| {
                            f.message.push_str("; ");
                            f.message.push_str(&failure.message);
                        })
                        .or_insert(failure);
                }
                let before = current.len();
                current.retain(|o| !round.contains_key(&o.object_ref()));
                failures.extend(round);
                if current.len() == before {
                    // Errors about objects that are not in the input cannot be fixed by leaving
                    // objects out; serve nothing new rather than loop.
                    current.clear();
                }
            }
        }
    }
}

fn failure_for(problem: &Problem, earlier: &BTreeMap<ObjectRef, Failure>) -> Failure {
    let message = &problem.message;
    if message.contains("does not exist") {
        for kind in ["connection", "persona"] {
            let Some(name) = quoted_after(message, &format!("{kind} \"")) else { continue };
            let capitalised = if kind == "connection" { "Connection" } else { "Persona" };
            let dependency = ObjectRef::new(capitalised, &problem.object.namespace, name);
            if let Some(f) = earlier.get(&dependency) {
                return Failure {
                    reason: "DependencyNotReady".into(),
                    message: format!("{kind} {name:?} is not ready ({}: {})", f.reason, f.message),
                };
            }
        }
        let reason = if message.starts_with("Secret ") { "SecretNotFound" } else { "ReferenceNotFound" };
        return Failure { reason: reason.into(), message: message.clone() };
    }
    let reason =
        if message.contains("namespace") && (message.contains("refers to") || message.contains("another namespace")) {
            "CrossNamespaceReference"
        } else if message.contains("already used by")
            || message.contains("same key")
            || message.contains("can get the same name")
        {
            "Conflict"
        } else if message.contains("not supported") {
            "Unsupported"
        } else {
            "Invalid"
        };
    Failure { reason: reason.into(), message: format!("{}: {message}", problem.field) }
}

fn quoted_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let start = text.find(marker)? + marker.len();
    let end = text[start..].find('"')?;
    Some(&text[start..start + end])
}

fn ready_condition(object: &Object, warnings: &[&Problem], generation: Option<i64>, now: DateTime<Utc>) -> Condition {
    let text = warnings.iter().map(|w| format!("{}: {}", w.field, w.message)).collect::<Vec<_>>().join("; ");
    if let Object::ApiKey(_) = object
        && !warnings.is_empty()
    {
        // For keys a warning means the key is left out: it does not work.
        let reason = if text.contains("expired") {
            "Expired"
        } else if text.contains("does not exist yet") {
            "KeyNotMinted"
        } else {
            "InvalidKey"
        };
        return condition("Ready", false, reason, &text, generation, now);
    }
    if warnings.is_empty() {
        condition("Ready", true, "Published", "served by the API pods", generation, now)
    } else {
        condition("Ready", true, "PublishedWithWarnings", &text, generation, now)
    }
}

fn persona_tools(snapshot: &Snapshot, r: &ObjectRef, reports: &Reports) -> (Option<u32>, Vec<String>) {
    let Some(tenant) = snapshot.tenant(&r.namespace) else { return (None, Vec::new()) };
    let Some(persona) = tenant.personas.get(&r.name) else { return (None, Vec::new()) };
    let connections = tenant.connections_for(&r.name);
    let mut visible = BTreeSet::new();
    let mut matched = BTreeSet::new();
    let mut complete = true;
    for connection in &connections {
        let Some(report) = reports.get(&(r.namespace.clone(), connection.name.clone())) else {
            complete = false;
            continue;
        };
        for tool in report.tools.iter().filter(|t| connection.tools.permits(t)) {
            let canonical = connection.canonical_name(tool);
            matched.extend(persona.tools.allow.matching_indexes(&canonical));
            if persona.tools.permits(&canonical) {
                visible.insert(canonical);
            }
        }
    }
    if !complete && visible.is_empty() {
        return (None, Vec::new());
    }
    // A pattern can only be called unmatched when every connection has reported its tools.
    let unmatched = if complete {
        persona
            .tools
            .allow
            .patterns()
            .iter()
            .enumerate()
            .filter(|(i, _)| !matched.contains(i))
            .map(|(_, p)| p.clone())
            .collect()
    } else {
        Vec::new()
    };
    (Some(visible.len().try_into().unwrap_or(u32::MAX)), unmatched)
}

/// Digest of the current key in the ApiKey's Secret, if the Secret holds one.
fn current_key(objects: &[Object], namespace: &str, secret: &str) -> Option<String> {
    objects.iter().find_map(|o| match o {
        Object::Secret(s)
            if s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(secret) =>
        {
            crate::keys::value(s, keys::SECRET_KEY).map(|key| keys::digest(key.trim()))
        }
        _ => None,
    })
}

fn common(generation: Option<i64>, conditions: Vec<Condition>) -> CommonStatus {
    CommonStatus { observed_generation: generation, conditions }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(32_768).collect(),
        observed_generation: generation,
        last_transition_time: time(now),
    }
}

fn unknown(type_: &str, reason: &str, message: &str, generation: Option<i64>, now: DateTime<Utc>) -> Condition {
    Condition { status: "Unknown".into(), ..condition(type_, false, reason, message, generation, now) }
}

/// Kubernetes time from chrono time.
pub fn time(t: DateTime<Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH))
}

/// Keeps `lastTransitionTime` of conditions whose status did not change, so an unchanged status
/// is byte-for-byte the one already stored and is not patched again.
pub fn carry_transition_times(desired: &mut Value, existing: Option<&Value>) {
    let Some(existing) = existing.and_then(|e| e.get("conditions")).and_then(Value::as_array) else { return };
    let Some(conditions) = desired.get_mut("conditions").and_then(Value::as_array_mut) else { return };
    for c in conditions {
        let previous = existing.iter().find(|e| e.get("type") == c.get("type"));
        if let Some(previous) = previous
            && previous.get("status") == c.get("status")
            && let Some(t) = previous.get("lastTransitionTime")
        {
            c["lastTransitionTime"] = t.clone();
        }
    }
}

#[cfg(test)]
mod tests;
