//! Reading manifests: multi-document YAML, the same files `kubectl apply -f` takes.

use crate::kinds::{ApiKey, Connection, McpEndpoint, Persona};
use crate::problem::{ObjectRef, Problem};
use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Namespace used for objects that name none, as `kubectl apply` would use the default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One object the compiler understands.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind")]
#[allow(clippy::large_enum_variant, reason = "objects are few and short-lived")]
pub enum Object {
    /// A Persona.
    Persona(Persona),
    /// A Connection.
    Connection(Connection),
    /// An McpEndpoint.
    McpEndpoint(McpEndpoint),
    /// An ApiKey.
    ApiKey(ApiKey),
    /// A core/v1 Secret referenced by Connections or ApiKeys.
    Secret(Secret),
}

impl Object {
    /// Kind, namespace and name of the object.
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, meta) = match self {
            Object::Persona(o) => ("Persona", &o.metadata),
            Object::Connection(o) => ("Connection", &o.metadata),
            Object::McpEndpoint(o) => ("McpEndpoint", &o.metadata),
            Object::ApiKey(o) => ("ApiKey", &o.metadata),
            Object::Secret(o) => ("Secret", &o.metadata),
        };
        ObjectRef::new(kind, meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), meta.name.as_deref().unwrap_or(""))
    }
}

/// Reads one document as `T`. A field `T` does not have is an error, as `kubectl apply` (strict
/// field validation) makes it: a misspelt field silently ignored could widen what a persona
/// may do (a `deny` that is not read denies nothing).
#[allow(clippy::result_large_err, reason = "cold path: one problem per broken document")]
fn decode<T: DeserializeOwned>(value: serde_yaml::Value, object: &ObjectRef, source: &str) -> Result<T, Problem> {
    let mut unknown = Vec::new();
    let decoded = serde_ignored::deserialize(value, |path| {
        // `?` marks where an optional value was present: not part of the field's name.
        let path = path.to_string();
        unknown.push(path.split('.').filter(|segment| *segment != "?").collect::<Vec<_>>().join("."));
    })
    .map_err(|e| Problem::error(object, "", format!("{source}: cannot read this {}: {e}", object.kind)))?;
    // Kubernetes owns metadata and status (and keeps fields there Portcullis has no use for).
    let unknown = unknown.into_iter().find(|path| {
        !["metadata", "status", "apiVersion", "kind"]
            .iter()
            .any(|owned| path == owned || path.starts_with(&format!("{owned}.")))
    });
    match unknown {
        Some(path) => Err(Problem::error(
            object,
            &path,
            format!("{source}: unknown field {path} in this {} (field names are case-sensitive)", object.kind),
        )),
        None => Ok(decoded),
    }
}

/// Parses every document of one YAML file; `source` names the file in problems.
///
/// Documents of other kinds (Namespaces, Deployments…) are skipped with a warning; documents that
/// are not valid YAML or do not fit their kind's schema are errors.
pub fn parse_manifests(source: &str, text: &str) -> (Vec<Object>, Vec<Problem>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let file_ref = ObjectRef::new("File", "", &format!("{source}#{}", index + 1));
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                problems.push(Problem::error(&file_ref, "", format!("not valid YAML: {e}")));
                // A syntax error ends the stream: the rest of the file cannot be located reliably.
                break;
            }
        };
        let text_field = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let api_version = text_field("apiVersion");
        let kind = text_field("kind");
        let metadata = value.get("metadata");
        let name = metadata.and_then(|m| m.get("name")).and_then(|v| v.as_str()).unwrap_or("");
        let namespace = metadata.and_then(|m| m.get("namespace")).and_then(|v| v.as_str()).unwrap_or(DEFAULT_NAMESPACE);
        let object = ObjectRef::new(if kind.is_empty() { "Object" } else { &kind }, namespace, name);
        if name.is_empty() {
            problems.push(Problem::error(&object, "metadata.name", format!("{source}: every object needs a name")));
            continue;
        }
        let parsed = match (api_version.as_str(), kind.as_str()) {
            (crate::API_VERSION, "Persona") => decode(value, &object, source).map(Object::Persona),
            (crate::API_VERSION, "Connection") => decode(value, &object, source).map(Object::Connection),
            (crate::API_VERSION, "McpEndpoint") => decode(value, &object, source).map(Object::McpEndpoint),
            (crate::API_VERSION, "ApiKey") => decode(value, &object, source).map(Object::ApiKey),
            ("v1", "Secret") => decode(value, &object, source).map(Object::Secret),
            (v, k) if v.starts_with("portcullis.dev/") => Err(Problem::error(
                &object,
                "apiVersion",
                format!(
                    "{source}: unknown Portcullis kind or version {v}/{k}; this release reads {} Persona, Connection, McpEndpoint and ApiKey",
                    crate::API_VERSION
                ),
            )),
            _ => {
                problems.push(Problem::warning(
                    &object,
                    "",
                    format!("{source}: {api_version} {kind} is not read by Portcullis; skipped"),
                ));
                continue;
            }
        };
        match parsed {
            Ok(o) => objects.push(o),
            Err(p) => problems.push(p),
        }
    }
    (objects, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_field_is_an_error_that_names_it() {
        let yaml = r#"
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: analyst, namespace: acme, labels: {team: a}, annotations: {note: b}}
spec:
  tools: {allow: ["notes.*"], dney: ["notes.delete_note"]}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {name: jobs, namespace: acme}
spec:
  prefix: jobs
  mcp: {url: "http://127.0.0.1:9001/mcp", runAsTasks: {required: [deploy], input_first: [deploy]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: fine, namespace: acme, resourceVersion: "7"}
spec:
  tools: {allow: ["notes.*"], deny: ["notes.delete_note"]}
status: {conditions: []}
"#;
        let (objects, problems) = parse_manifests("a.yaml", yaml);
        assert_eq!(objects.len(), 1, "only the last one is read: {problems:?}");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.severity == crate::Severity::Error));
        let text = format!("{problems:?}");
        assert!(text.contains("spec.tools.dney"), "{text}");
        assert!(text.contains("spec.mcp.runAsTasks.input_first"), "{text}");
    }

    #[test]
    fn reads_kinds_secrets_and_skips_others() {
        let yaml = r#"
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: analyst, namespace: acme}
spec:
  tools: {allow: ["notes.*"]}
---
apiVersion: v1
kind: Secret
metadata: {name: key, namespace: acme}
stringData: {key: pcl_abc}
---
apiVersion: v1
kind: Namespace
metadata: {name: acme}
---
"#;
        let (objects, problems) = parse_manifests("a.yaml", yaml);
        assert_eq!(objects.len(), 2);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].severity, crate::Severity::Warning);
        match &objects[0] {
            Object::Persona(p) => {
                assert_eq!(p.spec.tools.allow, vec!["notes.*"]);
                assert_eq!(p.spec.priority, 100);
                assert_eq!(p.spec.limits.tool_timeout_seconds, 30);
            }
            other => panic!("expected a persona, got {other:?}"),
        }
        assert_eq!(objects[1].object_ref(), ObjectRef::new("Secret", "acme", "key"));
    }

    #[test]
    fn schema_errors_name_the_file_and_object() {
        let yaml = "apiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {name: c}\nspec: {type: ftp, prefix: x}\n";
        let (objects, problems) = parse_manifests("conn.yaml", yaml);
        assert!(objects.is_empty());
        let text = problems[0].to_string();
        assert!(text.contains("Connection default/c") && text.contains("conn.yaml") && text.contains("ftp"), "{text}");
    }

    #[test]
    fn broken_yaml_is_an_error() {
        let (_, problems) = parse_manifests("x.yaml", "kind: [unclosed\n");
        assert_eq!(problems[0].severity, crate::Severity::Error);
        assert!(problems[0].message.contains("not valid YAML"));
    }
}
