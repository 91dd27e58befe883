use super::*;
use crate::manifests::parse_manifests;
use chrono::TimeZone;
use proptest::prelude::*;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).single().expect("valid time")
}

const BASE: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: analyst, namespace: acme}
spec:
  tools: {allow: ["notes.*"], deny: ["notes.delete_*"]}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {name: notes, namespace: acme}
spec:
  type: mcp
  prefix: notes
  mcp: {url: "http://127.0.0.1:9000/mcp", headersFrom: {secretRef: {name: notes-auth}}}
---
apiVersion: v1
kind: Secret
metadata: {name: notes-auth, namespace: acme}
stringData: {Authorization: "Bearer upstream-secret"}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {name: main, namespace: acme}
spec: {connections: [notes]}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {name: analyst-key, namespace: acme}
spec: {persona: analyst, secretName: analyst-key}
---
apiVersion: v1
kind: Secret
metadata: {name: analyst-key, namespace: acme}
stringData: {key: pcl_0123456789abcdefghijklmnopqrstuv}
"#;

fn objects(extra: &str) -> Vec<Object> {
    let (objects, problems) = parse_manifests("test.yaml", &format!("{BASE}\n---\n{extra}"));
    assert!(problems.iter().all(|p| p.severity == Severity::Warning), "{problems:?}");
    objects
}

fn errors(extra: &str) -> Vec<String> {
    match compile(&objects(extra), now()) {
        Ok(_) => panic!("expected problems"),
        Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn compiles_a_valid_configuration() {
    let snapshot = compile(&objects(""), now()).expect("compiles");
    let tenant = snapshot.tenant("acme").expect("tenant");
    let persona = &tenant.personas["analyst"];
    assert!(persona.tools.permits("notes.search"));
    assert!(!persona.tools.permits("notes.delete_note"));
    assert_eq!(tenant.prefixes["notes"], "notes");
    let Upstream::Mcp { headers, .. } = &tenant.connections["notes"].upstream;
    assert_eq!(headers[0].0, "Authorization");
    assert_eq!(headers[0].1.expose(), "Bearer upstream-secret");
    let entry = snapshot.key(&keys::digest("pcl_0123456789abcdefghijklmnopqrstuv")).expect("key");
    assert_eq!((entry.tenant.as_str(), entry.persona.as_str()), ("acme", "analyst"));
    assert!(tenant.endpoint_for("main", "analyst").is_some());
    assert_eq!(snapshot.digest.len(), 64);
    // The Debug form of a snapshot never shows secret values.
    assert!(!format!("{snapshot:?}").contains("upstream-secret"));
}

#[test]
fn unknown_and_cross_namespace_references_are_named() {
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: McpEndpoint\nmetadata: {name: bad, namespace: acme}\nspec: {connections: [warehouse, other/notes]}\n",
    );
    assert!(
        e.iter().any(|m| m.contains(
            "McpEndpoint acme/bad: spec.connections[0]: connection \"warehouse\" does not exist in namespace \"acme\""
        )),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.contains("spec.connections[1]") && m.contains("namespace \"other\"")), "{e:?}");
}

#[test]
fn duplicate_prefixes_and_colliding_separators_are_refused() {
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {name: notes2, namespace: acme}\nspec: {prefix: notes, mcp: {url: \"http://x/mcp\"}}\n",
    );
    assert!(
        e.iter().any(|m| m.contains("Connection acme/notes2: spec.prefix")
            && m.contains("already used by Connection acme/notes")),
        "{e:?}"
    );

    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {name: sub, namespace: acme}\nspec: {prefix: notes_x, mcp: {url: \"http://x/mcp\"}}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: McpEndpoint\nmetadata: {name: both, namespace: acme}\nspec: {connections: [notes, sub], toolNaming: {separator: \"_\"}}\n",
    );
    assert!(
        e.iter().any(|m| m.contains("McpEndpoint acme/both: spec.toolNaming.separator")
            && m.contains("\"notes\"")
            && m.contains("\"sub\"")),
        "{e:?}"
    );
}

#[test]
fn invalid_globs_missing_secrets_and_unsupported_types_are_refused() {
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: p2, namespace: acme}\nspec: {tools: {allow: [\"ok.*\", \"bad[\"]}}\n",
    );
    assert!(e.iter().any(|m| m.contains("Persona acme/p2: spec.tools.allow[1]") && m.contains("bad[")), "{e:?}");

    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {name: c2, namespace: acme}\nspec: {prefix: c2, mcp: {url: \"http://x/mcp\", headersFrom: {secretRef: {name: nope}}}}\n",
    );
    assert!(e.iter().any(|m| m.contains("Secret \"nope\" does not exist in namespace \"acme\"")), "{e:?}");

    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {name: db, namespace: acme}\nspec: {type: postgres, prefix: db}\n",
    );
    assert!(e.iter().any(|m| m.contains("spec.type") && m.contains("not supported")), "{e:?}");
}

#[test]
fn keys_expired_or_unminted_are_left_out_with_a_warning() {
    let extra = "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: old, namespace: acme}\nspec: {persona: analyst, secretName: old, expiresAt: \"2020-01-01T00:00:00Z\"}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: old, namespace: acme}\nstringData: {key: pcl_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: new, namespace: acme}\nspec: {persona: analyst, secretName: not-yet}\n";
    let snapshot = compile(&objects(extra), now()).expect("warnings do not refuse");
    assert_eq!(snapshot.keys.len(), 1);
    let w: Vec<String> = snapshot.warnings.iter().map(|p| p.to_string()).collect();
    assert!(w.iter().any(|m| m.contains("ApiKey acme/old: spec.expiresAt") && m.contains("expired")), "{w:?}");
    assert!(w.iter().any(|m| m.contains("ApiKey acme/new") && m.contains("does not exist yet")), "{w:?}");
}

#[test]
fn a_rotated_key_keeps_its_predecessor_until_the_overlap_ends() {
    let extra = "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: ci, namespace: acme}\nspec: {persona: analyst, secretName: ci, expiresAt: \"2026-11-23T12:00:00Z\"}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: ci, namespace: acme}\nstringData: {key: pcl_newnewnewnewnewnewnewnewnewnew, previousKey: pcl_oldoldoldoldoldoldoldoldoldold, previousKeyValidUntil: \"2026-11-23T06:00:00Z\"}\n";
    let during = compile(&objects(extra), now()).expect("compiles");
    let old = during.key(&keys::digest("pcl_oldoldoldoldoldoldoldoldoldold")).expect("the old key still works");
    assert_eq!(old.expires_at, Some(Utc.with_ymd_and_hms(2026, 11, 23, 6, 0, 0).unwrap()));
    let new = during.key(&keys::digest("pcl_newnewnewnewnewnewnewnewnewnew")).expect("the new key works");
    assert_eq!(new.expires_at, Some(Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()));
    let after = compile(&objects(extra), now() + chrono::Duration::hours(7)).expect("compiles");
    assert!(after.key(&keys::digest("pcl_oldoldoldoldoldoldoldoldoldold")).is_none(), "overlap over");
    assert!(after.key(&keys::digest("pcl_newnewnewnewnewnewnewnewnewnew")).is_some());
    assert_ne!(during.digest, after.digest, "the end of an overlap is a new snapshot");
}

#[test]
fn per_tool_budgets_compile_in_order_and_bad_globs_are_named() {
    let extra = "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: budget, namespace: acme}\nspec: {limits: {perTool: [{tool: \"notes.add_*\", callsPerMinute: 5}, {tool: \"notes.*\", callsPerMinute: 50}]}}\n";
    let snapshot = compile(&objects(extra), now()).expect("compiles");
    let persona = &snapshot.tenant("acme").unwrap().personas["budget"];
    assert_eq!(persona.tool_rate("notes.add_note"), Some(5), "the first matching rule wins");
    assert_eq!(persona.tool_rate("notes.list"), Some(50));
    assert_eq!(persona.tool_rate("other.x"), None);
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: budget, namespace: acme}\nspec: {limits: {perTool: [{tool: \"notes.[\", callsPerMinute: 0}]}}\n",
    );
    assert!(e.iter().any(|m| m.contains("spec.limits.perTool[0].tool:")), "{e:?}");
    assert!(e.iter().any(|m| m.contains("spec.limits.perTool[0].callsPerMinute: 0 is out of range")), "{e:?}");
}

#[test]
fn keys_must_name_an_existing_persona_and_be_unique() {
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: k2, namespace: acme}\nspec: {persona: ghost, secretName: analyst-key}\n",
    );
    assert!(e.iter().any(|m| m.contains("ApiKey acme/k2: spec.persona: persona \"ghost\" does not exist")), "{e:?}");
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: k3, namespace: acme}\nspec: {persona: analyst, secretName: analyst-key}\n",
    );
    assert!(e.iter().any(|m| m.contains("holds the same key")), "{e:?}");
}

#[test]
fn duplicates_and_bad_names_are_refused() {
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: analyst, namespace: acme}\nspec: {}\n",
    );
    assert!(e.iter().any(|m| m.contains("declared more than once")), "{e:?}");
    let e = errors(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {name: Bad_Name, namespace: acme}\nspec: {}\n",
    );
    assert!(e.iter().any(|m| m.contains("not a valid name")), "{e:?}");
}

#[test]
fn durations_parse_like_go() {
    assert_eq!(parse_duration("720h"), Some(Duration::from_secs(720 * 3600)));
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("10x"), None);
    assert_eq!(parse_duration(""), None);
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,6}"
}

proptest! {
    /// The digest depends on content only, never on the order objects were read in.
    #[test]
    fn digest_ignores_object_order(seed in any::<u64>()) {
        let mut objs = objects("");
        let forward = compile(&objs, now()).expect("compiles").digest;
        let len = objs.len();
        objs.rotate_left((seed as usize) % len);
        if seed % 2 == 0 { objs.reverse(); }
        prop_assert_eq!(compile(&objs, now()).expect("compiles").digest, forward);
    }

    /// Arbitrary personas, connections and endpoints compile or yield problems; never panic,
    /// and every problem names a field of an existing object.
    #[test]
    fn arbitrary_configurations_never_panic(
        personas in proptest::collection::vec((arb_name(), proptest::collection::vec("[a-z.*?\\[\\]{},]{0,8}", 0..3)), 0..4),
        connections in proptest::collection::vec((arb_name(), "[a-zA-Z_-]{0,8}"), 0..4),
        endpoints in proptest::collection::vec((arb_name(), proptest::collection::vec(arb_name(), 0..3), 0..4usize), 0..3),
    ) {
        let mut yaml = String::new();
        for (name, globs) in &personas {
            yaml.push_str(&format!("---\napiVersion: portcullis.dev/v1alpha1\nkind: Persona\nmetadata: {{name: {name}, namespace: t}}\nspec: {{tools: {{allow: {}}}}}\n", serde_json::to_string(globs).unwrap()));
        }
        for (name, prefix) in &connections {
            yaml.push_str(&format!("---\napiVersion: portcullis.dev/v1alpha1\nkind: Connection\nmetadata: {{name: {name}, namespace: t}}\nspec: {{prefix: \"{prefix}\", mcp: {{url: \"http://h/mcp\"}}}}\n"));
        }
        let seps = [".", "_", "__", "-"];
        for (name, conns, sep) in &endpoints {
            yaml.push_str(&format!("---\napiVersion: portcullis.dev/v1alpha1\nkind: McpEndpoint\nmetadata: {{name: {name}, namespace: t}}\nspec: {{connections: {}, toolNaming: {{separator: \"{}\"}}}}\n", serde_json::to_string(conns).unwrap(), seps[*sep]));
        }
        let (objs, _) = parse_manifests("p.yaml", &yaml);
        match compile(&objs, now()) {
            Ok(snapshot) => {
                for tenant in snapshot.tenants.values() {
                    for endpoint in tenant.endpoints.values() {
                        for c in &endpoint.connections { prop_assert!(tenant.connections.contains_key(c)); }
                    }
                }
            }
            Err(problems) => {
                prop_assert!(problems.iter().any(|p| p.severity == Severity::Error));
                for p in &problems { prop_assert!(!p.message.is_empty()); prop_assert!(!p.object.name.is_empty()); }
            }
        }
    }
}

#[test]
fn tools_run_as_tasks_compile_by_their_task_support_and_bad_globs_are_named() {
    let extra = r#"
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {name: jobs, namespace: acme}
spec:
  prefix: jobs
  mcp: {url: "http://127.0.0.1:9001/mcp", runAsTasks: {optional: ["report_*"], required: [rebuild_index], inputFirst: ["re*"]}}
"#;
    let snapshot = compile(&objects(extra), now()).expect("compiles");
    let Upstream::Mcp { run_as_tasks, .. } = &snapshot.tenant("acme").expect("tenant").connections["jobs"].upstream;
    assert!(run_as_tasks.runs("report_monthly") && !run_as_tasks.requires("report_monthly"));
    assert!(run_as_tasks.runs("rebuild_index") && run_as_tasks.requires("rebuild_index"));
    assert!(!run_as_tasks.runs("search"));
    // inputFirst qualifies tools that run as tasks, and nothing else.
    assert!(run_as_tasks.input_first("report_monthly") && run_as_tasks.input_first("rebuild_index"));
    assert!(!run_as_tasks.input_first("reindex"));
    let Upstream::Mcp { run_as_tasks, .. } = &snapshot.tenant("acme").expect("tenant").connections["notes"].upstream;
    assert!(run_as_tasks.is_empty(), "none unless named");

    let e = errors(&extra.replace("[rebuild_index]", r#"["rebuild_[index"]"#));
    assert!(e.iter().any(|m| m.contains("spec.mcp.runAsTasks.required[0]")), "{e:?}");
    let e = errors(&extra.replace(r#"["re*"]"#, r#"["re[*"]"#));
    assert!(e.iter().any(|m| m.contains("spec.mcp.runAsTasks.inputFirst[0]")), "{e:?}");
}
