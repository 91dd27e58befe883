//! Portcullis as an OAuth 2.1 authorization server for MCP clients, bridged to a local OIDC
//! provider with real keys: the whole flow as an MCP client runs it (401 → protected-resource
//! metadata → server metadata → registration → authorize → IdP login → consent → code → token →
//! MCP call), refresh rotation and reuse detection, and the attacks the specifications name.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::HashMap;
use std::time::Duration;
use support::oidc::{IDP_CLIENT_ID, IDP_CLIENT_SECRET, Idp};
use support::*;

const REDIRECT: &str = "http://127.0.0.1:43117/callback";

fn manifests(upstream: &Upstream) -> Vec<(&'static str, String)> {
    let mut files = quickstart(&upstream.url());
    files.push((
        "people.yaml",
        r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: people-analyst, namespace: demo}
spec:
  subjects: {groups: [analysts]}
  tools: {allow: ["notes.list_*", "notes.get_*"]}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {name: people, namespace: demo}
spec: {connections: [notes], personas: [people-*]}
"#
        .to_string(),
    ));
    files
}

/// An IdP, the notes upstream and a gateway serving them, with the upstream's tools loaded.
async fn serving() -> (Idp, Upstream, Gateway) {
    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let gateway = start(&idp, &upstream).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    (idp, upstream, gateway)
}

async fn start(idp: &Idp, upstream: &Upstream) -> Gateway {
    let issuer = idp.issuer();
    Gateway::start_with(
        &manifests(upstream),
        &[
            "--oidc-issuer",
            &issuer,
            "--oidc-audiences",
            "portcullis-api",
            "--oauth-idp-client-id",
            IDP_CLIENT_ID,
            "--oauth-idp-client-secret",
            IDP_CLIENT_SECRET,
        ],
    )
    .await
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

fn query(url: &str) -> HashMap<String, String> {
    reqwest::Url::parse(url).unwrap().query_pairs().into_owned().collect()
}

fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand_bytes());
    let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn rand_bytes() -> [u8; 32] {
    use rand_core::RngCore;
    let mut b = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut b);
    b
}

async fn mcp_list(gateway: &Gateway, endpoint: &str, token: &str) -> (u16, Value, Option<String>) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let mut request = reqwest::Client::new()
        .post(gateway.mcp_url("demo", endpoint))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "tools/list")
        .body(body.to_string());
    if !token.is_empty() {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let r = request.send().await.unwrap();
    let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null), challenge)
}

struct Registered {
    client_id: String,
    secret: Option<String>,
}

async fn register(gateway: &Gateway, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}/oauth/register", gateway.base)).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Runs authorize → IdP → callback (→ consent) and returns the final redirect to the client.
async fn authorize(gateway: &Gateway, client: &Registered, params: &[(&str, &str)], consent: bool) -> String {
    let b = browser();
    let mut url = reqwest::Url::parse(&format!("{}/oauth/authorize", gateway.base)).unwrap();
    url.query_pairs_mut().append_pair("client_id", &client.client_id).extend_pairs(params);
    let r = b.get(url).send().await.unwrap();
    assert!(r.status().is_redirection(), "authorize: {} {}", r.status(), r.text().await.unwrap_or_default());
    let to_idp = location(&r);
    if to_idp.starts_with(REDIRECT) {
        return to_idp;
    }
    let r = b.get(&to_idp).send().await.unwrap();
    let to_callback = location(&r);
    let r = b.get(&to_callback).send().await.unwrap();
    if r.status().is_redirection() {
        assert!(!consent, "expected a consent page");
        return location(&r);
    }
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("Allow") && page.contains("/mcp/demo/people"), "{page}");
    let ticket = page.split("name=ticket value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let r = b
        .post(format!("{}/oauth/consent", gateway.base))
        .form(&[("ticket", ticket.as_str()), ("decision", "allow")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    location(&r)
}

async fn token(gateway: &Gateway, form: &[(&str, &str)], basic: Option<(&str, &str)>) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(format!("{}/oauth/token", gateway.base)).form(form);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// PKCE, authorize (with the IdP login and, when `consent`, the consent page), then the code
/// exchange; returns the token endpoint's status and body.
async fn sign_in(gateway: &Gateway, client: &Registered, resource: &str, consent: bool) -> (u16, Value) {
    let (verifier, challenge) = pkce();
    let params = [
        ("response_type", "code"),
        ("redirect_uri", REDIRECT),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("resource", resource),
    ];
    let code = query(&authorize(gateway, client, &params, consent).await)["code"].clone();
    token(
        gateway,
        &[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.as_str()),
            ("client_id", client.client_id.as_str()),
            ("resource", resource),
        ],
        None,
    )
    .await
}

#[tokio::test]
async fn an_mcp_client_completes_the_flow_and_refresh_tokens_rotate() {
    let (_idp, _upstream, gateway) = serving().await;
    let resource = gateway.mcp_url("demo", "people");

    // Discovery from the 401.
    let (status, _, challenge) = mcp_list(&gateway, "people", "").await;
    assert_eq!(status, 401);
    let challenge = challenge.expect("WWW-Authenticate");
    let prm_url = challenge.split("resource_metadata=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert_eq!(prm_url, format!("{}/.well-known/oauth-protected-resource/mcp/demo/people", gateway.base));
    let prm: Value = reqwest::get(&prm_url).await.unwrap().json().await.unwrap();
    assert_eq!(prm["resource"], resource.as_str());
    let issuer = prm["authorization_servers"][0].as_str().unwrap().to_string();
    let metadata: Value =
        reqwest::get(format!("{issuer}/.well-known/oauth-authorization-server")).await.unwrap().json().await.unwrap();
    assert_eq!(metadata["issuer"], issuer.as_str(), "RFC 8414: the issuer matches");
    assert_eq!(metadata["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(metadata["authorization_response_iss_parameter_supported"], true);

    // Dynamic registration of a native public client.
    let (status, reg) = register(
        &gateway,
        json!({"client_name": "Test Agent", "application_type": "native", "redirect_uris": [REDIRECT],
               "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"]}),
    )
    .await;
    assert_eq!(status, 201, "{reg}");
    assert!(reg.get("client_secret").is_none(), "public clients get no secret");
    let client = Registered { client_id: reg["client_id"].as_str().unwrap().to_string(), secret: None };

    // Authorize with PKCE and a resource; the user logs in at the IdP and consents once.
    let (verifier, challenge) = pkce();
    let params = [
        ("response_type", "code"),
        ("redirect_uri", REDIRECT),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("state", "xyz"),
        ("resource", resource.as_str()),
        ("scope", "mcp admin:everything"),
    ];
    let back = authorize(&gateway, &client, &params, true).await;
    let answer = query(&back);
    assert_eq!(answer.get("state").map(String::as_str), Some("xyz"));
    assert_eq!(answer.get("iss"), Some(&issuer), "RFC 9207 iss");
    let code = answer["code"].clone();

    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
        ("client_id", client.client_id.as_str()),
        ("resource", resource.as_str()),
    ];
    let (status, tokens) = token(&gateway, &form, None).await;
    assert_eq!(status, 200, "{tokens}");
    let access = tokens["access_token"].as_str().unwrap().to_string();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(tokens["scope"], "mcp", "only the scope this server grants, whatever was asked");

    // The MCP call sees exactly the persona's tools.
    let (status, listed, _) = mcp_list(&gateway, "people", &access).await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> =
        listed["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("notes.list_") || n.starts_with("notes.get_")),
        "{names:?}"
    );

    // A code is redeemed once; the replay also revokes what the code gave.
    let (status, replay) = token(&gateway, &form, None).await;
    assert_eq!((status, replay["error"].as_str()), (400, Some("invalid_grant")));
    let (status, _, _) = mcp_list(&gateway, "people", &access).await;
    assert_eq!(status, 401, "tokens of a replayed code are revoked");

    // A fresh authorization: no consent page the second time.
    let (_, tokens) = sign_in(&gateway, &client, &resource, false).await;
    let access = tokens["access_token"].as_str().unwrap().to_string();
    let refresh = tokens["refresh_token"].as_str().unwrap_or(&refresh).to_string();

    // The token is bound to its endpoint: another endpoint refuses it.
    assert_eq!(mcp_list(&gateway, "notes", &access).await.0, 401);
    assert_eq!(gateway.get(&access, "/api/v1/portal/me").await.status(), 401, "not a REST credential");

    // Refresh rotates; the spent refresh token used again revokes the family.
    let refresh_form = |t: &str| {
        vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", t.to_string()),
            ("client_id", client.client_id.clone()),
        ]
    };
    let as_refs = |v: &Vec<(&'static str, String)>| v.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let f = as_refs(&refresh_form(&refresh));
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, rotated) = token(&gateway, &f, None).await;
    assert_eq!(status, 200, "{rotated}");
    let new_refresh = rotated["refresh_token"].as_str().unwrap().to_string();
    let new_access = rotated["access_token"].as_str().unwrap().to_string();
    assert_ne!(new_refresh, refresh);
    assert_eq!(mcp_list(&gateway, "people", &new_access).await.0, 200);
    let (status, reused) = token(&gateway, &f, None).await;
    assert_eq!((status, reused["error"].as_str()), (400, Some("invalid_grant")), "reuse detected");
    let g = as_refs(&refresh_form(&new_refresh));
    let g: Vec<(&str, &str)> = g.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(token(&gateway, &g, None).await.0, 400, "the whole family is revoked");
    assert_eq!(mcp_list(&gateway, "people", &new_access).await.0, 401, "and its access tokens");

    // Every step was audited; no token in the audit log.
    wait_until(Duration::from_secs(5), || async {
        gateway.audit("auth_method=oauth").await.iter().any(|e| e["subject"] == "oidc:ann")
    })
    .await;
    wait_until(Duration::from_secs(5), || async {
        let refusals: Vec<String> = gateway
            .audit("status=denied&per_page=500")
            .await
            .iter()
            .filter(|e| e["channel"] == "oauth")
            .filter_map(|e| e["detail"].as_str().map(str::to_string))
            .collect();
        let found = refusals.contains(&"code_replay".to_string()) && refusals.contains(&"refresh_reuse".to_string());
        if !found {
            eprintln!("refusals so far: {refusals:?}");
        }
        found
    })
    .await;
    let log = gateway.audit("per_page=1000").await.iter().map(Value::to_string).collect::<String>();
    assert!(!log.contains(&new_access) && !log.contains(&new_refresh));
    assert!(log.contains("POST /oauth/token") && log.contains("GET /oauth/authorize"), "every step is an event");
    let _ = client.secret;
}

#[tokio::test]
async fn the_flow_refuses_what_the_specifications_forbid() {
    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let gateway = start(&idp, &upstream).await;
    let resource = gateway.mcp_url("demo", "people");
    let (_, reg) = register(
        &gateway,
        json!({"application_type": "web", "redirect_uris": ["https://agent.example.com/cb"],
               "grant_types": ["authorization_code"]}),
    )
    .await;
    let client_id = reg["client_id"].as_str().unwrap().to_string();
    let secret = reg["client_secret"].as_str().expect("a confidential client gets a secret").to_string();

    // Registration: loopback http needs application_type native; http elsewhere is refused.
    let (status, body) = register(&gateway, json!({"application_type": "web", "redirect_uris": [REDIRECT]})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_redirect_uri")));
    assert_eq!(register(&gateway, json!({"redirect_uris": ["http://agent.example.com/cb"]})).await.0, 400);
    assert_eq!(register(&gateway, json!({"redirect_uris": []})).await.0, 400);

    let b = browser();
    let authorize = |extra: Vec<(&'static str, String)>| {
        let mut url = reqwest::Url::parse(&format!("{}/oauth/authorize", gateway.base)).unwrap();
        url.query_pairs_mut().append_pair("client_id", &client_id).append_pair("response_type", "code");
        for (k, v) in &extra {
            url.query_pairs_mut().append_pair(k, v);
        }
        url
    };
    let (_, challenge) = pkce();
    // A redirect URI that is not registered exactly: an error page, never a redirect.
    let r = b
        .get(authorize(vec![
            ("redirect_uri", "https://agent.example.com/cb/evil".into()),
            ("code_challenge", challenge.clone()),
            ("code_challenge_method", "S256".into()),
            ("resource", resource.clone()),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("location").is_none());
    // No PKCE, plain PKCE, no resource, a foreign resource: errors sent back with iss and state.
    for (extra, error) in [
        (vec![("resource", resource.clone())], "invalid_request"),
        (
            vec![
                ("code_challenge", challenge.clone()),
                ("code_challenge_method", "plain".into()),
                ("resource", resource.clone()),
            ],
            "invalid_request",
        ),
        (vec![("code_challenge", challenge.clone()), ("code_challenge_method", "S256".into())], "invalid_target"),
        (
            vec![
                ("code_challenge", challenge.clone()),
                ("code_challenge_method", "S256".into()),
                ("resource", "https://elsewhere.example.com/mcp".into()),
            ],
            "invalid_target",
        ),
    ] {
        let mut params = vec![("redirect_uri", "https://agent.example.com/cb".to_string()), ("state", "s1".into())];
        params.extend(extra);
        let r = b.get(authorize(params)).send().await.unwrap();
        assert!(r.status().is_redirection());
        let back = query(&location(&r));
        assert_eq!(back.get("error").map(String::as_str), Some(error), "{back:?}");
        assert_eq!(back.get("state").map(String::as_str), Some("s1"));
        assert!(back.contains_key("iss"));
    }
    // An unregistered client.
    let r =
        b.get(format!("{}/oauth/authorize?client_id=nobody&response_type=code", gateway.base)).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // A user whose groups map to no persona that may use the endpoint is refused at the callback.
    idp.set_login("gus", &["guests"]);
    let (verifier, challenge) = pkce();
    let r = b
        .get(authorize(vec![
            ("redirect_uri", "https://agent.example.com/cb".into()),
            ("code_challenge", challenge.clone()),
            ("code_challenge_method", "S256".into()),
            ("resource", resource.clone()),
        ]))
        .send()
        .await
        .unwrap();
    let r = b.get(location(&r)).send().await.unwrap();
    let r = b.get(location(&r)).send().await.unwrap();
    let back = query(&location(&r));
    assert_eq!(back.get("error").map(String::as_str), Some("access_denied"), "{back:?}");
    let _ = verifier;

    // A confidential client must authenticate at the token endpoint.
    let (status, body) =
        token(&gateway, &[("grant_type", "authorization_code"), ("code", "x"), ("client_id", &client_id)], None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    let (status, body) =
        token(&gateway, &[("grant_type", "authorization_code"), ("code", "x")], Some((&client_id, "wrong"))).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    let (status, body) =
        token(&gateway, &[("grant_type", "authorization_code"), ("code", "x")], Some((&client_id, &secret))).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "authenticated, but no such code");

    // The refusals are audited with their reasons, in the tenant the request named.
    wait_until(Duration::from_secs(5), || async {
        let refusals: Vec<String> = gateway
            .audit("status=denied&per_page=500")
            .await
            .iter()
            .filter_map(|e| e["detail"].as_str().map(str::to_string))
            .collect();
        ["pkce_missing", "pkce_not_s256", "redirect_uri_mismatch", "no_persona"]
            .iter()
            .all(|r| refusals.iter().any(|x| x == r))
    })
    .await;

    // A forged token with our issuer but another key is refused.
    let forged = support::oidc::SigningKey::ec("forged")
        .sign(&json!({"iss": gateway.base, "aud": resource, "sub": "ann",
        "groups": ["analysts"], "exp": chrono::Utc::now().timestamp() + 300}));
    assert_eq!(mcp_list(&gateway, "people", &forged).await.0, 401);
}

#[tokio::test]
async fn the_rust_sdk_completes_the_oauth_flow_and_calls_tools_as_the_users_persona() {
    use rmcp::model::{ClientCapabilities, ClientConfig, Implementation, ProtocolVersion};
    use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::auth::{AuthClient, AuthorizationRequest, OAuthState};
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

    let (_idp, _upstream, gateway) = serving().await;
    let url = gateway.mcp_url("demo", "people");

    // The SDK discovers, registers (dynamic registration) and builds the authorization URL.
    let (_, _, challenge) = mcp_list(&gateway, "people", "").await;
    let mut oauth = OAuthState::new(url.as_str(), None).await.expect("OAuth state");
    let request = AuthorizationRequest::new(REDIRECT)
        .with_client_name("rmcp e2e")
        .with_application_type("native")
        .with_challenge(challenge.expect("a challenge"));
    oauth.start_authorization(request).await.expect("discovery and registration");
    let authorization_url = oauth.get_authorization_url().await.expect("authorization URL");
    assert!(authorization_url.contains("code_challenge_method=S256") && authorization_url.contains("resource="));

    // The user's browser: Portcullis → IdP login → callback → consent → back to the client.
    let b = browser();
    let r = b.get(&authorization_url).send().await.unwrap();
    let r = b.get(location(&r)).send().await.unwrap();
    let r = b.get(location(&r)).send().await.unwrap();
    let page = r.text().await.unwrap();
    let ticket =
        page.split("name=ticket value=\"").nth(1).expect("consent page").split('"').next().unwrap().to_string();
    let r = b
        .post(format!("{}/oauth/consent", gateway.base))
        .form(&[("ticket", ticket.as_str()), ("decision", "allow")])
        .send()
        .await
        .unwrap();
    let callback = location(&r);
    assert!(callback.starts_with(REDIRECT), "{callback}");

    // The SDK checks iss and state, redeems the code, and calls tools with the token.
    oauth.handle_callback_url(&callback).await.expect("code exchange");
    let manager = oauth.into_authorization_manager().expect("authorized");
    let transport = StreamableHttpClientTransport::with_client(
        AuthClient::new(reqwest::Client::new(), manager),
        StreamableHttpClientTransportConfig::with_uri(url.as_str()),
    );
    let client = ClientConfig::new(ClientCapabilities::default(), Implementation::new("rmcp-oauth", "1.0"))
        .serve_with_lifecycle(
            transport,
            ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] },
        )
        .await
        .expect("MCP client connects with its OAuth token");
    let names: Vec<String> =
        client.peer().list_all_tools().await.expect("tools/list").into_iter().map(|t| t.name.to_string()).collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("notes.list_") || n.starts_with("notes.get_")),
        "{names:?}"
    );
    wait_until(Duration::from_secs(5), || async {
        gateway.audit("auth_method=oauth").await.iter().any(|e| e["subject"] == "oidc:ann")
    })
    .await;
}

#[tokio::test]
async fn every_step_of_the_flow_can_land_on_another_replica() {
    use p256::pkcs8::EncodePrivateKey;
    use portcullis_e2e::backends::Shared;
    use support::cluster::Cluster;

    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let backends = Shared::start().await;
    let cluster =
        Cluster::new(&backends.database_url, &backends.redis_url, &backends.redis_prefix, &manifests(&upstream));
    cluster.publish();
    // One signing key directory shared by both pods (a mounted Secret in a cluster).
    let keys = tempfile::tempdir().unwrap();
    let pem = p256::SecretKey::random(&mut rand_core::OsRng).to_pkcs8_pem(Default::default()).unwrap();
    std::fs::write(keys.path().join("2026-11.pem"), pem.as_bytes()).unwrap();
    // The public URL is A's, as an ingress in front of both would be.
    let port_a = free_port();
    let public = format!("http://127.0.0.1:{port_a}");
    let issuer = idp.issuer();
    let keys_dir = keys.path().display().to_string();
    let env = [
        ("PORTCULLIS_PUBLIC_URL", public.as_str()),
        ("PORTCULLIS_OIDC_ISSUER", issuer.as_str()),
        ("PORTCULLIS_OIDC_AUDIENCES", "portcullis-api"),
        ("PORTCULLIS_OAUTH_IDP_CLIENT_ID", IDP_CLIENT_ID),
        ("PORTCULLIS_OAUTH_IDP_CLIENT_SECRET", IDP_CLIENT_SECRET),
        ("PORTCULLIS_OAUTH_SIGNING_KEYS", keys_dir.as_str()),
    ];
    let (a, b) = tokio::join!(cluster.replica_at(port_a, &env), cluster.replica_with(&env));
    a.wait_ready().await;
    b.wait_ready().await;
    let resource = format!("{public}/mcp/demo/people");

    // Register on A; authorize on B; the IdP returns to the public URL (A); consent and token on B.
    let r = reqwest::Client::new()
        .post(format!("{}/oauth/register", a.base))
        .json(&json!({"application_type": "native", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
                      "grant_types": ["authorization_code", "refresh_token"]}))
        .send()
        .await
        .unwrap();
    let client_id = r.json::<Value>().await.unwrap()["client_id"].as_str().unwrap().to_string();
    let (verifier, challenge) = pkce();
    let mut url = reqwest::Url::parse(&format!("{}/oauth/authorize", b.base)).unwrap();
    url.query_pairs_mut().extend_pairs([
        ("client_id", client_id.as_str()),
        ("response_type", "code"),
        ("redirect_uri", REDIRECT),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("resource", resource.as_str()),
    ]);
    let br = browser();
    let r = br.get(url).send().await.unwrap();
    let r = br.get(location(&r)).send().await.unwrap();
    let callback = location(&r);
    assert!(callback.starts_with(&public), "{callback}");
    let page = br.get(&callback).send().await.unwrap().text().await.unwrap();
    let ticket =
        page.split("name=ticket value=\"").nth(1).expect("consent page").split('"').next().unwrap().to_string();
    let r = br
        .post(format!("{}/oauth/consent", b.base))
        .form(&[("ticket", ticket.as_str()), ("decision", "allow")])
        .send()
        .await
        .unwrap();
    let code = query(&location(&r))["code"].clone();
    let r = reqwest::Client::new()
        .post(format!("{}/oauth/token", b.base))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.as_str()),
            ("client_id", client_id.as_str()),
            ("resource", resource.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let tokens: Value = r.json().await.unwrap();
    let access = tokens["access_token"].as_str().unwrap_or_else(|| panic!("{tokens}")).to_string();
    // The token works on both pods; a refresh on A, then reuse of the spent token on B is caught.
    for replica in [&a, &b] {
        let r = reqwest::Client::new()
            .post(format!("{}/mcp/demo/people", replica.base))
            .header("Authorization", format!("Bearer {access}"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", "tools/list")
            .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let refresh = tokens["refresh_token"].as_str().unwrap().to_string();
    let form =
        [("grant_type", "refresh_token"), ("refresh_token", refresh.as_str()), ("client_id", client_id.as_str())];
    let r = reqwest::Client::new().post(format!("{}/oauth/token", a.base)).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::Client::new().post(format!("{}/oauth/token", b.base)).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 400, "reuse detected on the other pod");
}

#[tokio::test]
async fn service_clients_use_client_credentials_as_their_persona_on_their_tenants_endpoints() {
    let (_idp, _upstream, gateway) = serving().await;
    let resource = gateway.mcp_url("demo", "people");

    // An administrator mints a client bound to the people-analyst persona; the secret is shown once.
    let r = gateway
        .post(ADMIN_KEY, "/api/v1/admin/auth/clients", &json!({"persona": "people-analyst", "name": "nightly job"}))
        .await;
    assert_eq!(r.status(), 201);
    let minted: Value = r.json().await.unwrap();
    let (client_id, secret) =
        (minted["client_id"].as_str().unwrap().to_string(), minted["client_secret"].as_str().unwrap().to_string());
    assert_eq!(
        gateway.post(ANALYST_KEY, "/api/v1/admin/auth/clients", &json!({"persona": "analyst"})).await.status(),
        403
    );
    assert_eq!(gateway.post(ADMIN_KEY, "/api/v1/admin/auth/clients", &json!({"persona": "ghost"})).await.status(), 422);
    let listed: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/auth/clients").await.json().await.unwrap();
    assert_eq!(listed["total"], 1);
    assert!(!listed.to_string().contains(&secret));

    // client_credentials with the secret and a resource of the tenant.
    let grant = [("grant_type", "client_credentials"), ("resource", resource.as_str())];
    let (status, body) = token(&gateway, &grant, Some((&client_id, "wrong-secret"))).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    let (status, body) = token(&gateway, &[("grant_type", "client_credentials")], Some((&client_id, &secret))).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_target")));
    let foreign = format!("{}/mcp/other/notes", gateway.base);
    let (status, _) =
        token(&gateway, &[("grant_type", "client_credentials"), ("resource", &foreign)], Some((&client_id, &secret)))
            .await;
    assert_eq!(status, 400, "another tenant's endpoint");
    let (status, body) = token(&gateway, &grant, Some((&client_id, &secret))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none());
    let access = body["access_token"].as_str().unwrap().to_string();
    let (status, listed_tools, _) = mcp_list(&gateway, "people", &access).await;
    assert_eq!(status, 200, "{listed_tools}");
    let names: Vec<&str> =
        listed_tools["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("notes.list_") || n.starts_with("notes.get_")),
        "{names:?}"
    );
    assert_eq!(mcp_list(&gateway, "notes", &access).await.0, 401, "bound to its endpoint");
    // A user's public client cannot use the grant.
    let (_, reg) = register(
        &gateway,
        json!({"application_type": "native", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}),
    )
    .await;
    let (status, body) = token(
        &gateway,
        &[
            ("grant_type", "client_credentials"),
            ("resource", &resource),
            ("client_id", reg["client_id"].as_str().unwrap()),
        ],
        None,
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("unauthorized_client")));

    // Deleting the client stops its tokens at once.
    let deleted = reqwest::Client::new()
        .delete(format!("{}/api/v1/admin/auth/clients/{client_id}", gateway.base))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(mcp_list(&gateway, "people", &access).await.0, 401);
    assert_eq!(token(&gateway, &grant, Some((&client_id, &secret))).await.0, 401);
    wait_until(Duration::from_secs(5), || async {
        gateway
            .audit("per_page=500")
            .await
            .iter()
            .any(|e| e["subject"] == format!("client:{client_id}") && e["status"] == "ok")
    })
    .await;
}

#[tokio::test]
async fn a_client_identified_by_its_metadata_document_needs_no_registration() {
    let idp = Idp::start().await;
    let upstream = Upstream::start("both").await;
    let issuer = idp.issuer();
    let gateway = Gateway::start_with(
        &manifests(&upstream),
        &[
            "--oidc-issuer",
            &issuer,
            "--oidc-audiences",
            "portcullis-api",
            "--oauth-idp-client-id",
            IDP_CLIENT_ID,
            "--oauth-idp-client-secret",
            IDP_CLIENT_SECRET,
            "--oauth-client-metadata-allow-private",
        ],
    )
    .await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let resource = gateway.mcp_url("demo", "people");
    let metadata: Value = reqwest::get(format!("{}/.well-known/oauth-authorization-server", gateway.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["client_id_metadata_document_supported"], true);

    // The client's documents, served where its client_id URLs point.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let good = format!("{base}/client.json");
    let liar = format!("{base}/liar.json");
    let documents = std::sync::Arc::new(HashMap::from([
        (
            "/client.json".to_string(),
            json!({"client_id": good, "client_name": "Doc Agent", "redirect_uris": [REDIRECT]}),
        ),
        (
            "/liar.json".to_string(),
            json!({"client_id": "https://someone-else.example.com/c.json", "redirect_uris": [REDIRECT]}),
        ),
    ]));
    let served = documents.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let served = served.clone();
        async move {
            match served.get(uri.path()) {
                Some(doc) => axum::Json(doc.clone()).into_response(),
                None => axum::http::StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    use axum::response::IntoResponse;

    let client = Registered { client_id: good.clone(), secret: None };
    let (status, tokens) = sign_in(&gateway, &client, &resource, true).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(mcp_list(&gateway, "people", tokens["access_token"].as_str().unwrap()).await.0, 200);

    // A document that names another client_id, or a redirect URI it does not list, is refused.
    let (_, challenge) = pkce();
    for (client_id, redirect) in [(liar.as_str(), REDIRECT), (good.as_str(), "http://127.0.0.1:43117/elsewhere")] {
        let mut url = reqwest::Url::parse(&format!("{}/oauth/authorize", gateway.base)).unwrap();
        url.query_pairs_mut().append_pair("client_id", client_id).extend_pairs([
            ("response_type", "code"),
            ("redirect_uri", redirect),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("resource", resource.as_str()),
        ]);
        let r = browser().get(url).send().await.unwrap();
        assert_eq!(r.status(), 400, "{client_id} {redirect}");
        assert!(r.headers().get("location").is_none());
    }
    let _ = documents;
}

#[tokio::test]
async fn revoking_a_refresh_token_ends_the_session() {
    let (_idp, _upstream, gateway) = serving().await;
    let resource = gateway.mcp_url("demo", "people");
    let (_, reg) = register(
        &gateway,
        json!({"application_type": "native", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
               "grant_types": ["authorization_code", "refresh_token"]}),
    )
    .await;
    let client = Registered { client_id: reg["client_id"].as_str().unwrap().to_string(), secret: None };
    let (_, tokens) = sign_in(&gateway, &client, &resource, true).await;
    let (access, refresh) = (tokens["access_token"].as_str().unwrap(), tokens["refresh_token"].as_str().unwrap());
    assert_eq!(mcp_list(&gateway, "people", access).await.0, 200);
    // A made-up token of the same family is refused without ending the session.
    let family = refresh.split_once('.').unwrap().0;
    let guessed = format!("{family}.not-a-token-of-this-family");
    let (status, _) = token(
        &gateway,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", guessed.as_str()),
            ("client_id", client.client_id.as_str()),
        ],
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(mcp_list(&gateway, "people", access).await.0, 200, "a guess does not revoke the session");
    // Repeated parameters are refused (RFC 6749 §3.2).
    let r = reqwest::Client::new()
        .post(format!("{}/oauth/token", gateway.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=refresh_token&grant_type=refresh_token&client_id={}", client.client_id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_request");
    // Another client cannot revoke it; its own client can (RFC 7009: 200 either way).
    let (_, other) = register(
        &gateway,
        json!({"application_type": "native", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}),
    )
    .await;
    let revoke_url = format!("{}/oauth/revoke", gateway.base);
    let revoke = |client_id: String, token: String| {
        let url = revoke_url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .form(&[("token", token.as_str()), ("client_id", client_id.as_str())])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(revoke(other["client_id"].as_str().unwrap().to_string(), refresh.to_string()).await, 200);
    assert_eq!(mcp_list(&gateway, "people", access).await.0, 200, "a foreign client's revocation does nothing");
    assert_eq!(revoke(client.client_id.clone(), refresh.to_string()).await, 200);
    assert_eq!(mcp_list(&gateway, "people", access).await.0, 401, "the session's access tokens stop");
    let (status, body) = token(
        &gateway,
        &[("grant_type", "refresh_token"), ("refresh_token", refresh), ("client_id", client.client_id.as_str())],
        None,
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
}

#[test]
fn the_login_client_id_cannot_also_be_an_accepted_bearer_audience() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("portcullis"))
        .args(["dev", "--manifests"])
        .arg(dir.path())
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--oidc-issuer", "http://127.0.0.1:9/realms/x"])
        .args(["--oidc-audiences", "portcullis,gateway", "--oauth-idp-client-id", "gateway"])
        .output()
        .expect("run portcullis dev");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must not include --oauth-idp-client-id"), "{stderr}");
}
