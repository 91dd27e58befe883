//! OIDC bearer tokens from a real (local) identity provider with real RSA and EC keys: groups
//! select personas, and every attack case of the JWT BCP is refused and audited.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::time::Duration;
use support::oidc::{Idp, SigningKey};
use support::*;

const AUDIENCE: &str = "portcullis";

fn manifests(upstream: &Upstream) -> Vec<(&'static str, String)> {
    let mut files = quickstart(&upstream.url());
    files.push((
        "people.yaml",
        format!(
            r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {{name: people-analyst, namespace: demo}}
spec:
  subjects: {{groups: [analysts]}}
  priority: 10
  tools: {{allow: ["notes.list_*", "notes.get_*"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {{name: people-admin, namespace: demo}}
spec:
  subjects: {{groups: [platform], users: [root]}}
  priority: 100
  admin: true
  tools: {{allow: ["*"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: people, namespace: demo}}
spec: {{connections: [notes], personas: [people-*]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {{name: contractors, namespace: other}}
spec:
  subjects: {{groups: [analysts]}}
  tools: {{allow: ["notes.list_*"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: notes, namespace: other}}
spec: {{prefix: notes, mcp: {{url: "{}"}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: notes, namespace: other}}
spec: {{connections: [notes], personas: [contractors]}}
"#,
            upstream.url()
        ),
    ));
    files
}

async fn start(idp: &Idp, upstream: &Upstream) -> Gateway {
    let issuer = idp.issuer();
    Gateway::start_with(
        &manifests(upstream),
        &["--oidc-issuer", &issuer, "--oidc-audiences", AUDIENCE, "--oidc-jwks-min-refresh-seconds", "2"],
    )
    .await
}

async fn me(gateway: &Gateway, token: &str, tenant: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .get(format!("{}/api/v1/portal/me", gateway.base))
        .header("Authorization", format!("Bearer {token}"));
    if let Some(t) = tenant {
        request = request.header("X-Portcullis-Tenant", t);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn mcp_tools(gateway: &Gateway, token: &str, tenant: &str, endpoint: &str) -> (u16, Value) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let r = reqwest::Client::new()
        .post(gateway.mcp_url(tenant, endpoint))
        .header("Authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "tools/list")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn tool_names(answer: &Value) -> Vec<String> {
    answer["result"]["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect()
}

async fn denied_reasons(gateway: &Gateway) -> Vec<String> {
    gateway
        .audit("status=denied&per_page=500")
        .await
        .iter()
        .filter_map(|e| e["detail"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn groups_select_personas_over_rest_and_mcp_with_rsa_and_ec_keys() {
    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let gateway = start(&idp, &upstream).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;

    let analyst = idp.rsa.sign(&idp.claims("ann", &["analysts"], AUDIENCE));
    let (status, body) = me(&gateway, &analyst, Some("demo")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["persona"], "people-analyst", "{body}");
    let (status, answer) = mcp_tools(&gateway, &analyst, "demo", "people").await;
    assert_eq!(status, 200, "{answer}");
    let names = tool_names(&answer);
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("notes.list_") || n.starts_with("notes.get_")),
        "{names:?}"
    );

    // The higher-priority persona wins; an EC-signed token works the same.
    let admin = idp.ec.sign(&idp.claims("ann", &["analysts", "platform"], AUDIENCE));
    let (status, body) = me(&gateway, &admin, Some("demo")).await;
    assert_eq!((status, body["persona"].as_str()), (200, Some("people-admin")), "{body}");
    // A user named in a persona's subjects, in one tenant only, needs no tenant header.
    let root = idp.ec.sign(&idp.claims("root", &[], AUDIENCE));
    let (status, body) = me(&gateway, &root, None).await;
    assert_eq!((status, body["persona"].as_str()), (200, Some("people-admin")), "{body}");
    let (_, answer) = mcp_tools(&gateway, &admin, "demo", "people").await;
    assert!(tool_names(&answer).contains(&"notes.delete_note".to_string()));

    // Analysts exist in two tenants: REST needs the tenant named; MCP takes it from the URL.
    let (status, body) = me(&gateway, &analyst, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("X-Portcullis-Tenant"));
    let (status, body) = me(&gateway, &analyst, Some("other")).await;
    assert_eq!((status, body["persona"].as_str()), (200, Some("contractors")), "{body}");
    assert_eq!(mcp_tools(&gateway, &analyst, "other", "notes").await.0, 200);

    // A valid token matching no persona of the tenant is 403, over REST and MCP.
    let guest = idp.rsa.sign(&idp.claims("gus", &["guests"], AUDIENCE));
    assert_eq!(me(&gateway, &guest, Some("demo")).await.0, 403);
    assert_eq!(mcp_tools(&gateway, &guest, "demo", "people").await.0, 403);
    // A tenant-A identity on tenant B: the platform group has no persona in `other`.
    let platform = idp.rsa.sign(&idp.claims("pat", &["platform"], AUDIENCE));
    assert_eq!(mcp_tools(&gateway, &platform, "other", "notes").await.0, 403);
    wait_until(Duration::from_secs(5), || async { denied_reasons(&gateway).await.contains(&"no_persona".to_string()) })
        .await;
    let events = gateway.audit("subject=oidc:ann").await;
    assert!(events.iter().any(|e| e["auth_method"] == "oidc" && e["persona"] == "people-admin"), "{events:?}");
}

fn forge(header: Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[tokio::test]
async fn every_attack_on_bearer_tokens_is_refused_and_audited() {
    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let gateway = start(&idp, &upstream).await;
    let good = idp.claims("ann", &["analysts"], AUDIENCE);
    assert_eq!(me(&gateway, &idp.rsa.sign(&good), Some("demo")).await.0, 200, "the baseline works");

    let now = chrono::Utc::now().timestamp();
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // alg none, and HMAC keyed with the RSA public key (algorithm confusion).
    let none = forge(json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}), &good, b"");
    let hmac_key = idp.rsa.jwk["n"].as_str().unwrap().as_bytes().to_vec();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("rsa-1".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &good,
        &jsonwebtoken::EncodingKey::from_secret(&hmac_key),
    )
    .unwrap();
    // An ES256 header on the RSA key's kid.
    let mismatched = {
        let token = idp.ec.sign(&good);
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[0] = URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "typ": "JWT", "kid": "rsa-1"}).to_string());
        parts.join(".")
    };
    let tampered = {
        let token = idp.rsa.sign(&good);
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(with(json!({"groups": ["platform"]})).to_string());
        parts.join(".")
    };
    let cases = [
        ("alg none", none, "token_"),
        ("HS256 with the public key", confused, "token_algorithm"),
        ("ES256 header on an RSA key", mismatched, "token_algorithm"),
        ("claims changed after signing", tampered, "token_signature"),
        ("expired", idp.rsa.sign(&with(json!({"exp": now - 600}))), "token_expired"),
        ("not yet valid", idp.rsa.sign(&with(json!({"nbf": now + 600}))), "token_not_yet_valid"),
        ("another audience", idp.rsa.sign(&with(json!({"aud": "someone-else"}))), "token_audience"),
        ("another issuer", idp.rsa.sign(&with(json!({"iss": "https://evil.example.com"}))), "token_issuer"),
        ("an unpublished key", SigningKey::ec("stranger").sign(&good), "token_unknown_key"),
        ("garbage", "not.a.jwt".to_string(), "token_malformed"),
    ];
    for (what, token, reason) in &cases {
        let (status, body) = me(&gateway, token, Some("demo")).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["type"], "https://portcullis.dev/problems/unauthorized", "{what}");
        let (status, _) = mcp_tools(&gateway, token, "demo", "people").await;
        assert_eq!(status, 401, "{what} over MCP");
        wait_until(Duration::from_secs(5), || async {
            denied_reasons(&gateway).await.iter().any(|r| r.starts_with(reason))
        })
        .await;
    }
    // Nothing in the audit log or the answers repeats a token.
    let all = gateway.audit("per_page=1000").await;
    for (_, token, _) in &cases {
        assert!(!all.iter().any(|e| e.to_string().contains(token.as_str())), "a token leaked into the audit log");
    }
}

#[tokio::test]
async fn unknown_kids_refresh_the_jwks_at_most_once_per_interval_and_an_unreachable_idp_refuses() {
    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let gateway = start(&idp, &upstream).await;
    let good = idp.claims("ann", &["analysts"], AUDIENCE);
    assert_eq!(me(&gateway, &idp.rsa.sign(&good), Some("demo")).await.0, 200);
    let before = idp.jwks_fetches();

    // A flood of tokens with made-up kids costs the IdP at most one fetch per interval.
    let mut flood = Vec::new();
    for i in 0..60 {
        let stranger = SigningKey::ec(&format!("bogus-{i}"));
        flood.push(stranger.sign(&good));
    }
    let results = futures_join(&gateway, &flood).await;
    assert!(results.iter().all(|s| *s == 401), "{results:?}");
    let fetched = idp.jwks_fetches() - before;
    assert!(fetched <= 2, "{fetched} JWKS fetches for 60 unknown kids");

    // A key the IdP rotates in is picked up by the next refresh.
    let rotated = SigningKey::rsa("rsa-2");
    idp.publish(&rotated);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(me(&gateway, &rotated.sign(&good), Some("demo")).await.0, 200, "rotated key accepted");

    // The IdP goes away: cached keys keep working, unknown ones are refused, never accepted.
    idp.set_down(true);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(me(&gateway, &idp.rsa.sign(&good), Some("demo")).await.0, 200);
    let (status, body) = me(&gateway, &SigningKey::ec("while-down").sign(&good), Some("demo")).await;
    assert_eq!(status, 401);
    assert!(body["detail"].as_str().unwrap().contains("cannot be reached"), "{body}");
    wait_until(Duration::from_secs(5), || async {
        denied_reasons(&gateway).await.contains(&"idp_unreachable".to_string())
    })
    .await;
}

async fn futures_join(gateway: &Gateway, tokens: &[String]) -> Vec<u16> {
    let mut handles = Vec::new();
    for token in tokens {
        let url = format!("{}/api/v1/portal/me", gateway.base);
        let token = token.clone();
        handles.push(tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .header("Authorization", format!("Bearer {token}"))
                .header("X-Portcullis-Tenant", "demo")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
