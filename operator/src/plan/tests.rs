use super::*;
use chrono::TimeZone;
use portcullis_crds::parse_manifests;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).single().expect("valid time")
}

const TENANT: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: analyst, namespace: acme}
spec: {tools: {allow: ["notes.*", "warehouse.*", "typo.*"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {name: notes, namespace: acme}
spec: {prefix: notes, mcp: {url: "http://notes:8080/mcp"}, tools: {exclude: ["delete_*"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {name: main, namespace: acme}
spec: {connections: [notes]}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: other, namespace: beta}
spec: {tools: {allow: ["*"]}}
"#;

fn objects(extra: &str) -> Vec<Object> {
    let (objects, problems) = parse_manifests("t.yaml", &format!("{TENANT}\n---\n{extra}"));
    assert!(problems.is_empty(), "{problems:?}");
    objects
}

fn ready(plan: &Plan, kind: &str, ns: &str, name: &str) -> (String, String, String) {
    let status = &plan.statuses[&ObjectRef::new(kind, ns, name)];
    let c = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    (c["status"].as_str().unwrap().into(), c["reason"].as_str().unwrap().into(), c["message"].as_str().unwrap().into())
}

fn report(connection: &str, health: &str, tools: &[&str]) -> Reports {
    let r = ConnectionReport {
        tenant: "acme".into(),
        connection: connection.into(),
        health: health.into(),
        tools: tools.iter().map(|t| t.to_string()).collect(),
        config_version: Some(1),
        reported_at: now(),
    };
    BTreeMap::from([(("acme".to_string(), connection.to_string()), r)])
}

#[test]
fn a_broken_object_is_left_out_and_the_rest_is_served() {
    let extra = "apiVersion: portcullis.dev/v1alpha1\nkind: McpEndpoint\nmetadata: {name: broken, namespace: acme}\nspec: {connections: [warehouse]}\n";
    let plan = plan(&objects(extra), &BTreeMap::new(), &Reports::new(), None, now());
    let tenant = plan.snapshot.tenant("acme").expect("acme is served");
    assert!(tenant.endpoints.contains_key("main") && !tenant.endpoints.contains_key("broken"));
    assert!(plan.snapshot.tenant("beta").is_some(), "another tenant is untouched");
    let (status, reason, message) = ready(&plan, "McpEndpoint", "acme", "broken");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "ReferenceNotFound"));
    assert_eq!(message, "connection \"warehouse\" does not exist in namespace \"acme\"");
    assert_eq!(ready(&plan, "McpEndpoint", "acme", "main").0, "True");
    assert_eq!(plan.statuses[&ObjectRef::new("McpEndpoint", "acme", "broken")].get("url"), None);
}

#[test]
fn dependants_of_a_broken_object_name_the_dependency() {
    let extra = "apiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {name: warehouse, namespace: acme}\nspec: {prefix: wh, mcp: {url: \"http://wh/mcp\", headersFrom: {secretRef: {name: wh-token}}}}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: McpEndpoint\nmetadata: {name: data, namespace: acme}\nspec: {connections: [warehouse]}\n";
    let plan = plan(&objects(extra), &BTreeMap::new(), &Reports::new(), None, now());
    let (_, reason, message) = ready(&plan, "Connection", "acme", "warehouse");
    assert_eq!(reason, "SecretNotFound", "{message}");
    assert!(message.contains("\"wh-token\" does not exist"), "{message}");
    let (status, reason, message) = ready(&plan, "McpEndpoint", "acme", "data");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "DependencyNotReady"));
    assert!(message.starts_with("connection \"warehouse\" is not ready (SecretNotFound"), "{message}");
}

#[test]
fn statuses_carry_generation_reports_and_urls() {
    let generations = BTreeMap::from([(ObjectRef::new("Persona", "acme", "analyst"), 7)]);
    let reports = report("notes", "healthy", &["read", "write", "delete_all"]);
    let plan = plan(&objects(""), &generations, &reports, Some("https://gw.example.com/"), now());
    let persona = &plan.statuses[&ObjectRef::new("Persona", "acme", "analyst")];
    assert_eq!(persona["observedGeneration"], 7);
    assert_eq!(persona["toolCount"], 2, "delete_all is excluded by the connection");
    assert_eq!(persona["unmatchedPatterns"], serde_json::json!(["warehouse.*", "typo.*"]));
    let connection = &plan.statuses[&ObjectRef::new("Connection", "acme", "notes")];
    assert_eq!(connection["toolCount"], 2);
    assert_eq!(connection["health"], "healthy");
    let endpoint = &plan.statuses[&ObjectRef::new("McpEndpoint", "acme", "main")];
    assert_eq!(endpoint["url"], "https://gw.example.com/mcp/acme/main");

    let unhealthy = plan_with(report("notes", "unhealthy", &[]));
    let connection = &unhealthy.statuses[&ObjectRef::new("Connection", "acme", "notes")];
    let healthy = connection["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Healthy").unwrap();
    assert_eq!((healthy["status"].as_str(), healthy["reason"].as_str()), (Some("False"), Some("UpstreamUnreachable")));
}

fn plan_with(reports: Reports) -> Plan {
    plan(&objects(""), &BTreeMap::new(), &reports, None, now())
}

#[test]
fn persona_tool_counts_wait_for_reports() {
    let plan = plan_with(Reports::new());
    let persona = &plan.statuses[&ObjectRef::new("Persona", "acme", "analyst")];
    assert!(persona.get("toolCount").is_none() && persona.get("unmatchedPatterns").is_none(), "{persona}");
}

#[test]
fn keys_say_whether_they_work() {
    let extra = "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: ci, namespace: acme}\nspec: {persona: analyst, secretName: ci-key}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: minted, namespace: acme}\nspec: {persona: analyst, secretName: minted-key}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: minted-key, namespace: acme}\nstringData: {key: pcl_abcdefghijklmnopqrstuvwxyz012345}\n";
    let plan = plan_with_objects(extra);
    let (status, reason, _) = ready(&plan, "ApiKey", "acme", "ci");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "KeyNotMinted"));
    let minted = &plan.statuses[&ObjectRef::new("ApiKey", "acme", "minted")];
    let digest = keys::digest("pcl_abcdefghijklmnopqrstuvwxyz012345");
    assert_eq!(minted["keyId"], keys::key_id(&digest));
    assert!(!minted.to_string().contains("pcl_abcdefghijklmnopqrstuvwxyz012345"), "never the key itself");
    assert_eq!(ready(&plan, "ApiKey", "acme", "minted").0, "True");
}

fn plan_with_objects(extra: &str) -> Plan {
    plan(&objects(extra), &BTreeMap::new(), &Reports::new(), None, now())
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let first = plan_with(Reports::new());
    let r = ObjectRef::new("Persona", "acme", "analyst");
    let stored = first.statuses[&r].clone();
    let later = plan(&objects(""), &BTreeMap::new(), &Reports::new(), None, now() + chrono::Duration::hours(1));
    let mut desired = later.statuses[&r].clone();
    assert_ne!(desired, stored, "the clock moved");
    carry_transition_times(&mut desired, Some(&stored));
    assert_eq!(desired, stored, "same status: nothing to patch");
}
