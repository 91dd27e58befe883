//! The Helm chart: `helm lint` and `helm template` with helm v4, then the rendered manifests are
//! read and checked for the invariants the chart promises (least privilege, no Kubernetes
//! credentials in API pods, restricted security contexts, probes, a migrations hook).

use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/portcullis")
}

fn helm() -> String {
    std::env::var("PORTCULLIS_TEST_HELM").unwrap_or_else(|_| {
        panic!("PORTCULLIS_TEST_HELM is not set: run ./scripts/test, which installs helm v4 (or put helm on PATH and set it)")
    })
}

fn run_helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(helm()).args(args).output().expect("run helm");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn render(sets: &[&str]) -> Vec<Value> {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "rel", chart.as_str(), "--namespace", "portcullis-system"];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let (ok, text) = run_helm(&args);
    assert!(ok, "helm template failed: {text}");
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(suffix)))
        .unwrap_or_else(|| panic!("no {kind} named *{suffix}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

fn assert_restricted(pod: &Value, what: &str) {
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true), "{what}: runAsNonRoot");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"), "{what}");
    for c in pod["containers"].as_sequence().expect("containers") {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{what}: read-only root");
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{what}: no escalation");
        assert_eq!(strings(&sc["capabilities"]["drop"]), vec!["ALL"], "{what}: capabilities");
        assert!(c["resources"]["requests"]["memory"].as_str().is_some(), "{what}: resource requests");
        assert!(c["resources"]["limits"]["memory"].as_str().is_some(), "{what}: memory limit");
    }
}

fn assert_probed(pod: &Value, what: &str) {
    for c in pod["containers"].as_sequence().expect("containers") {
        assert!(c["livenessProbe"]["httpGet"]["path"].as_str().is_some(), "{what}: liveness probe");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"), "{what}: readiness probe");
    }
}

fn secret_refs(pod: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for c in pod["containers"].as_sequence().into_iter().flatten() {
        for e in c["env"].as_sequence().into_iter().flatten() {
            if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                names.push(n.to_string());
            }
        }
    }
    names
}

#[test]
fn the_chart_lints() {
    let (ok, text) = run_helm(&["lint", &chart().display().to_string()]);
    assert!(ok && text.contains("0 chart(s) failed"), "{text}");
}

#[test]
fn api_pods_hold_no_kubernetes_credentials_and_run_restricted() {
    let docs = render(&[]);
    let api = named(&docs, "Deployment", "-api");
    let pod = &api["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let account = pod["serviceAccountName"].as_str().unwrap();
    let sa = named(&docs, "ServiceAccount", account.trim_start_matches("rel-portcullis"));
    assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
    for binding in of_kind(&docs, "RoleBinding").into_iter().chain(of_kind(&docs, "ClusterRoleBinding")) {
        for s in binding["subjects"].as_sequence().unwrap() {
            assert_ne!(s["name"].as_str(), Some(account), "the API account is bound to nothing");
        }
    }
    assert_restricted(pod, "api");
    assert_probed(pod, "api");
    assert_eq!(secret_refs(pod), vec!["portcullis"; 3], "Postgres, key and Redis from the existing Secret");
    assert!(pod["containers"][0]["args"].as_sequence().unwrap().iter().any(|a| a.as_str() == Some("serve")));

    // The Service, HPA and PDB all point at the API pods.
    let labels = &api["spec"]["template"]["metadata"]["labels"];
    let service = named(&docs, "Service", "-api");
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&labels[k.as_str().unwrap()], v, "service selector {k:?}");
    }
    let pdb = named(&docs, "PodDisruptionBudget", "-api");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], api["spec"]["selector"]["matchLabels"]);
    let hpa = named(&docs, "HorizontalPodAutoscaler", "-api");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], api["metadata"]["name"]);
    assert!(api["spec"]["replicas"].is_null(), "the HPA owns the replica count");
}

#[test]
fn the_operator_has_least_privilege_and_leader_election() {
    let docs = render(&[]);
    let operator = named(&docs, "Deployment", "-operator");
    let pod = &operator["spec"]["template"]["spec"];
    assert_restricted(pod, "operator");
    assert_probed(pod, "operator");
    assert!(operator["spec"]["replicas"].as_u64().unwrap() >= 2, "two replicas, one leader");
    let env: Vec<String> = pod["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert!(env.contains(&"POD_NAME".into()) && env.contains(&"POD_NAMESPACE".into()), "lease identity: {env:?}");

    let role = named(&docs, "ClusterRole", "-operator");
    let mut secrets_verbs = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs = strings(&rule["verbs"]);
        let resources = strings(&rule["resources"]);
        assert!(!verbs.contains(&"*".into()) && !resources.contains(&"*".into()), "no wildcards: {rule:?}");
        assert!(!verbs.contains(&"delete".into()), "the operator deletes nothing (owner references do): {rule:?}");
        assert!(!resources.contains(&"leases".into()), "leases only in the release namespace");
        for r in &resources {
            let allowed = ["personas", "connections", "mcpendpoints", "apikeys", "secrets", "events"];
            let sub = r.split_once('/').map(|(_, s)| s);
            assert!(allowed.iter().any(|a| r.split('/').next() == Some(a)), "unexpected {r}");
            assert!(matches!(sub, None | Some("status") | Some("finalizers")), "unexpected subresource {r}");
        }
        if resources.contains(&"secrets".into()) {
            secrets_verbs.extend(verbs);
        }
    }
    assert!(secrets_verbs.contains(&"create".into()) && secrets_verbs.contains(&"patch".into()), "mints key Secrets");
    let lease = named(&docs, "Role", "-operator-lease");
    assert_eq!(lease["metadata"]["namespace"].as_str(), Some("portcullis-system"));
    assert_eq!(strings(&lease["rules"][0]["resources"]), vec!["leases"]);
}

#[test]
fn watched_namespaces_get_roles_instead_of_a_cluster_role() {
    let docs = render(&["operator.watchNamespaces={acme,beta}"]);
    assert!(of_kind(&docs, "ClusterRole").is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty());
    let namespaces: Vec<&str> = of_kind(&docs, "Role")
        .iter()
        .filter(|r| !r["metadata"]["name"].as_str().unwrap().ends_with("-lease"))
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, vec!["acme", "beta"]);
    let operator = named(&docs, "Deployment", "-operator");
    let env = operator["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().unwrap();
    let watched = env.iter().find(|e| e["name"].as_str() == Some("PORTCULLIS_NAMESPACES")).unwrap();
    assert_eq!(watched["value"].as_str(), Some("acme,beta"));
}

#[test]
fn migrations_run_as_a_hook_and_the_ingress_sets_the_public_url() {
    let docs = render(&[
        "api.ingress.enabled=true",
        "api.ingress.hosts[0].host=gw.example.com",
        "api.ingress.hosts[0].paths[0].path=/",
        "api.ingress.hosts[0].paths[0].pathType=Prefix",
        "api.ingress.tls[0].secretName=gw-tls",
    ]);
    let job = named(&docs, "Job", "-migrate");
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"].as_str(), Some("pre-install,pre-upgrade"));
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_restricted(pod, "migrations");
    let ingress = named(&docs, "Ingress", "-api");
    assert_eq!(ingress["spec"]["rules"][0]["host"].as_str(), Some("gw.example.com"));
    let operator = named(&docs, "Deployment", "-operator");
    let env = operator["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().unwrap();
    let url = env.iter().find(|e| e["name"].as_str() == Some("PORTCULLIS_PUBLIC_URL")).unwrap();
    assert_eq!(url["value"].as_str(), Some("https://gw.example.com"));
}

#[test]
fn api_worker_threads_are_set_only_when_asked() {
    let threads = |docs: &[Value]| {
        let api = named(docs, "Deployment", "-api");
        let env = api["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().unwrap().clone();
        env.iter()
            .find(|e| e["name"].as_str() == Some("TOKIO_WORKER_THREADS"))
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    assert_eq!(threads(&render(&[])), None, "one per core by default");
    assert_eq!(threads(&render(&["api.workerThreads=1"])), Some("1".to_string()));
}

#[test]
fn the_values_schema_refuses_mistakes() {
    let chart = chart().display().to_string();
    for (set, expected) in [
        ("operator.replicas=0", "minimum"),
        ("api.replicass=3", "additional properties"),
        ("secrets.existingSecret=Not_A_Name", "pattern"),
        ("api.service.type=Magic", "api/service/type"),
        ("api.workerThreads=-1", "minimum"),
    ] {
        let (ok, text) = run_helm(&["template", "rel", &chart, "--set", set]);
        assert!(!ok, "{set} was accepted");
        assert!(text.contains(expected), "{set}: {text}");
    }
}

#[test]
fn the_chart_ships_the_generated_crds_and_notes() {
    let crds = std::fs::read_dir(chart().join("crds")).unwrap().count();
    assert_eq!(crds, 4);
    let notes = std::fs::read_to_string(chart().join("templates/NOTES.txt")).unwrap();
    assert!(notes.contains("kubectl apply") && notes.contains("kubectl get personas"), "NOTES tell what to do next");
}

#[test]
fn identity_settings_reach_the_api_pods_and_signing_keys_are_mounted_read_only() {
    let docs = render(&[
        "publicUrl=https://gw.example.com",
        "identity.oidc.issuer=https://idp.example.com/realms/acme",
        "identity.oidc.audiences={portcullis}",
        "identity.oauth.enabled=true",
        "identity.oauth.idpClientId=portcullis-gw",
        "identity.oauth.signingKeysSecret=portcullis-oauth-keys",
    ]);
    let api = named(&docs, "Deployment", "-api");
    let pod = &api["spec"]["template"]["spec"];
    let env: std::collections::HashMap<String, Value> = pod["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    assert_eq!(env["PORTCULLIS_OIDC_ISSUER"]["value"].as_str(), Some("https://idp.example.com/realms/acme"));
    assert_eq!(env["PORTCULLIS_PUBLIC_URL"]["value"].as_str(), Some("https://gw.example.com"));
    assert_eq!(
        env["PORTCULLIS_OAUTH_IDP_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("portcullis")
    );
    let mount = &pod["containers"][0]["volumeMounts"][0];
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    assert_eq!(env["PORTCULLIS_OAUTH_SIGNING_KEYS"]["value"], mount["mountPath"]);
    assert_eq!(pod["volumes"][0]["secret"]["secretName"].as_str(), Some("portcullis-oauth-keys"));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false), "still no Kubernetes credentials");

    let chart = chart().display().to_string();
    let (ok, text) = run_helm(&["template", "rel", &chart, "--set", "identity.oauth.enabled=true"]);
    assert!(!ok && text.contains("needs identity.oidc.issuer"), "{text}");
}
