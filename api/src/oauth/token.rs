//! `/oauth/token` (authorization_code with PKCE, refresh_token with rotation and reuse
//! detection) and `/oauth/revoke` (RFC 7009). Access tokens are ES256 JWTs bound to one endpoint
//! (`aud` = its resource URI); refresh tokens are opaque, stored as hashes in families: using a
//! spent refresh token revokes the whole family, and so does replaying a code.

use super::clients::Client;
use super::flow::CodeGrant;
use super::{AuthServer, OAuthNote, hash, noted, oauth_error, random_token, s256, server};
use crate::state::AppState;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// A refresh-token family: every token descended from one authorization.
#[derive(Serialize, Deserialize)]
struct Family {
    client_id: String,
    resource: String,
    scope: Option<String>,
    user: String,
    groups: Vec<String>,
    /// Hash of the one refresh token that may be used next.
    current: String,
    revoked: bool,
}

fn form(body: &Bytes) -> BTreeMap<String, String> {
    let url = format!("http://x/?{}", String::from_utf8_lossy(body));
    reqwest::Url::parse(&url).map(|u| u.query_pairs().into_owned().collect()).unwrap_or_default()
}

/// Authenticates the client: HTTP Basic, `client_secret` in the form, or none for public clients.
async fn authenticate_client(
    s: &AuthServer,
    headers: &HeaderMap,
    f: &BTreeMap<String, String>,
) -> Result<Client, Response> {
    let invalid = || {
        let mut r = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication failed");
        r.headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Basic realm=\"portcullis\""));
        r
    };
    let basic = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| pair.split_once(':').map(|(i, s)| (form_decode(i), form_decode(s))));
    let (client_id, secret, method) = match (&basic, f.get("client_id")) {
        (Some((id, secret)), _) => (id.clone(), Some(secret.clone()), "client_secret_basic"),
        (None, Some(id)) => match f.get("client_secret") {
            Some(secret) => (id.clone(), Some(secret.clone()), "client_secret_post"),
            None => (id.clone(), None, "none"),
        },
        (None, None) => return Err(invalid()),
    };
    let client = match s.client(&client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(invalid()),
        Err(_) => return Err(oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again")),
    };
    let ok = match (client.token_endpoint_auth_method.as_str(), method, secret) {
        ("none", "none", None) => true,
        (registered, used, Some(secret)) if registered == used => client.secret_matches(&secret),
        _ => false,
    };
    if ok { Ok(client) } else { Err(invalid()) }
}

fn form_decode(s: &str) -> String {
    reqwest::Url::parse(&format!("http://x/?v={s}"))
        .ok()
        .and_then(|u| u.query_pairs().find(|(k, _)| k == "v").map(|(_, v)| v.into_owned()))
        .unwrap_or_default()
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

/// `POST /oauth/token`.
pub async fn token(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = server(&app);
    let f = form(&body);
    let mut note = OAuthNote { client: f.get("client_id").cloned(), ..OAuthNote::default() };
    let client = match authenticate_client(s, &headers, &f).await {
        Ok(c) => c,
        Err(r) => return noted(r, note.refused("invalid_client")),
    };
    note.client = Some(client.client_id.clone());
    let response = match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => authorization_code(s, &client, &f, &mut note).await,
        Some("refresh_token") => refresh(s, &client, &f, &mut note).await,
        Some("client_credentials") => client_credentials(s, &client, &f, &mut note),
        Some(_) => {
            note.refusal = Some("unsupported_grant_type".into());
            oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "use authorization_code, refresh_token or client_credentials",
            )
        }
        None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is required"),
    };
    noted(response, note)
}

/// The client-credentials grant: a service client minted by a tenant's administrators acts as
/// its persona, on one endpoint of its tenant (`resource`), with no refresh token.
fn client_credentials(s: &AuthServer, client: &Client, f: &BTreeMap<String, String>, note: &mut OAuthNote) -> Response {
    let (Some(tenant), Some(persona)) = (client.tenant.as_deref(), client.persona.as_deref()) else {
        note.refusal = Some("not_a_service_client".into());
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "this client may not use client_credentials",
        );
    };
    note.tenant = Some(tenant.to_string());
    note.subject = Some(format!("client:{}", client.client_id));
    let Some(resource) = f.get("resource") else {
        note.refusal = Some("resource_missing".into());
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_target", "resource is required: the MCP endpoint URL");
    };
    match s.parse_resource(resource) {
        Some((t, endpoint)) if t == tenant => note.endpoint = Some(endpoint),
        _ => {
            note.refusal = Some("invalid_target".into());
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "resource is not an MCP endpoint of this client's tenant",
            );
        }
    }
    let now = chrono::Utc::now().timestamp();
    let ttl = s.access_ttl.as_secs();
    let access = s.keys.sign(&json!({
        "iss": s.issuer,
        "aud": resource,
        "sub": format!("client:{}", client.client_id),
        "client_id": client.client_id,
        "tenant": tenant,
        "persona": persona,
        "scope": "mcp",
        "iat": now,
        "exp": now + ttl as i64,
        "jti": uuid::Uuid::new_v4().simple().to_string(),
    }));
    let mut response = Json(json!({"access_token": access, "token_type": "Bearer", "expires_in": ttl, "scope": "mcp"}))
        .into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

fn locate(s: &AuthServer, note: &mut OAuthNote, resource: &str, user: &str) {
    if let Some((tenant, endpoint)) = s.parse_resource(resource) {
        note.tenant = Some(tenant);
        note.endpoint = Some(endpoint);
    }
    note.subject = Some(format!("oidc:{user}"));
}

async fn authorization_code(
    s: &AuthServer,
    client: &Client,
    f: &BTreeMap<String, String>,
    note: &mut OAuthNote,
) -> Response {
    let Some(code) = f.get("code") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "code is required");
    };
    let code_hash = hash(code);
    let grant: CodeGrant = match s.state.take(&format!("code:{code_hash}")).await {
        Ok(Some(g)) => match serde_json::from_str(&g) {
            Ok(g) => g,
            Err(_) => return invalid_grant("the code is unreadable"),
        },
        Ok(None) => {
            // A replayed code: revoke what it was exchanged for (RFC 9700 §4.2.4).
            if let Ok(Some(family)) = s.state.take(&format!("used-code:{code_hash}")).await {
                if let Ok(Some(stored)) = s.state.get(&format!("family:{family}")).await
                    && let Ok(f) = serde_json::from_str::<Family>(&stored)
                {
                    locate(s, note, &f.resource, &f.user);
                }
                revoke_family(s, &family).await;
                tracing::warn!(client = %client.client_id, "Authorization code replayed; its tokens are revoked");
                note.refusal = Some("code_replay".into());
            } else {
                note.refusal = Some("unknown_code".into());
            }
            return invalid_grant("the code is invalid, expired or already used");
        }
        Err(_) => return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again"),
    };
    locate(s, note, &grant.resource, &grant.user);
    if grant.client_id != client.client_id {
        note.refusal = Some("code_of_another_client".into());
        return invalid_grant("the code was issued to another client");
    }
    if f.get("redirect_uri") != Some(&grant.redirect_uri) {
        note.refusal = Some("redirect_uri_mismatch".into());
        return invalid_grant("redirect_uri does not match the authorization request");
    }
    let Some(verifier) = f.get("code_verifier") else {
        note.refusal = Some("pkce_verifier_missing".into());
        return invalid_grant("code_verifier is required (PKCE)");
    };
    if !(43..=128).contains(&verifier.len()) || s256(verifier) != grant.code_challenge {
        note.refusal = Some("pkce_mismatch".into());
        return invalid_grant("code_verifier does not match the code_challenge");
    }
    if f.get("resource").is_some_and(|r| *r != grant.resource) {
        note.refusal = Some("resource_mismatch".into());
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "resource differs from the authorization request",
        );
    }
    let family_id = uuid::Uuid::now_v7().simple().to_string();
    let response = issue(
        s,
        &family_id,
        Family {
            client_id: grant.client_id,
            resource: grant.resource,
            scope: grant.scope,
            user: grant.user,
            groups: grant.groups,
            current: String::new(),
            revoked: false,
        },
        client,
    )
    .await;
    let _ = s.state.put(&format!("used-code:{code_hash}"), family_id, Duration::from_secs(600)).await;
    response
}

async fn refresh(s: &AuthServer, client: &Client, f: &BTreeMap<String, String>, note: &mut OAuthNote) -> Response {
    let Some(token) = f.get("refresh_token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "refresh_token is required");
    };
    let Some((family_id, _)) = token.split_once('.') else { return invalid_grant("the refresh token is invalid") };
    let family: Family = match s.state.get(&format!("family:{family_id}")).await {
        Ok(Some(f)) => match serde_json::from_str(&f) {
            Ok(f) => f,
            Err(_) => return invalid_grant("the refresh token is invalid"),
        },
        Ok(None) => {
            note.refusal = Some("unknown_refresh_token".into());
            return invalid_grant("the refresh token is invalid or expired");
        }
        Err(_) => return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again"),
    };
    locate(s, note, &family.resource, &family.user);
    if family.client_id != client.client_id {
        note.refusal = Some("refresh_of_another_client".into());
        return invalid_grant("the refresh token was issued to another client");
    }
    if family.revoked {
        note.refusal = Some("refresh_revoked".into());
        return invalid_grant("the refresh token was revoked");
    }
    if family.current != hash(token) {
        note.refusal = Some("refresh_reuse".into());
        // A spent token came back: someone else may hold the live one. Revoke them all.
        revoke_family(s, family_id).await;
        tracing::warn!(client = %client.client_id, "Refresh token reused; the family is revoked");
        return invalid_grant("the refresh token was already used; the session is revoked");
    }
    if f.get("resource").is_some_and(|r| *r != family.resource) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_target", "resource differs from the authorization");
    }
    issue(s, family_id, family, client).await
}

async fn revoke_family(s: &AuthServer, family_id: &str) {
    let key = format!("family:{family_id}");
    if let Ok(Some(stored)) = s.state.get(&key).await
        && let Ok(mut family) = serde_json::from_str::<Family>(&stored)
    {
        family.revoked = true;
        let _ = s.state.put(&key, serde_json::to_string(&family).unwrap_or_default(), s.refresh_ttl).await;
    }
    // Access tokens of the family stop at once too.
    let _ =
        s.state.put(&format!("revoked-family:{family_id}"), "1".into(), s.access_ttl + Duration::from_secs(60)).await;
}

async fn issue(s: &AuthServer, family_id: &str, mut family: Family, client: &Client) -> Response {
    let refresh_token = format!("{family_id}.{}", random_token());
    family.current = hash(&refresh_token);
    let stored = serde_json::to_string(&family).unwrap_or_default();
    if s.state.put(&format!("family:{family_id}"), stored, s.refresh_ttl).await.is_err() {
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again");
    }
    let now = chrono::Utc::now().timestamp();
    let ttl = s.access_ttl.as_secs();
    let access = s.keys.sign(&json!({
        "iss": s.issuer,
        "aud": family.resource,
        "sub": family.user,
        "groups": family.groups,
        "client_id": client.client_id,
        "sid": family_id,
        "scope": family.scope.clone().unwrap_or_else(|| "mcp".into()),
        "iat": now,
        "exp": now + ttl as i64,
        "jti": uuid::Uuid::new_v4().simple().to_string(),
    }));
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": family.scope.unwrap_or_else(|| "mcp".into()),
    });
    let grants: Vec<String> = serde_json::from_str(&client.grant_types).unwrap_or_default();
    if grants.iter().any(|g| g == "refresh_token") {
        body["refresh_token"] = json!(refresh_token);
    }
    let mut response = Json(body).into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

/// Marks a deleted service client's tokens revoked until they would have expired anyway.
pub async fn revoke_client(s: &AuthServer, client_id: &str) -> bool {
    s.state
        .put(&format!("revoked-client:{client_id}"), "1".into(), s.access_ttl + Duration::from_secs(60))
        .await
        .is_ok()
}

/// Whether a service client was deleted (fail closed when the store cannot answer).
pub async fn client_revoked(s: &AuthServer, client_id: &str) -> bool {
    !matches!(s.state.get(&format!("revoked-client:{client_id}")).await, Ok(None))
}

/// Whether the family an access token belongs to was revoked.
pub async fn family_revoked(s: &AuthServer, family_id: &str) -> bool {
    // Fail closed: an unreadable store refuses the token.
    !matches!(s.state.get(&format!("revoked-family:{family_id}")).await, Ok(None))
}

/// `POST /oauth/revoke` (RFC 7009): always 200 for an authenticated client.
pub async fn revoke(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = server(&app);
    let f = form(&body);
    let client = match authenticate_client(s, &headers, &f).await {
        Ok(c) => c,
        Err(r) => return noted(r, OAuthNote::default().refused("invalid_client")),
    };
    let Some(token) = f.get("token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required");
    };
    let family_id = match token.split_once('.') {
        // A refresh token: `<family>.<secret>`.
        Some((family, rest)) if !rest.contains('.') => Some(family.to_string()),
        // An access token: its `sid` (only the client the family belongs to may revoke it).
        _ => super::signing::peek_claims(token).and_then(|c| c.get("sid").and_then(|v| v.as_str()).map(str::to_string)),
    };
    if let Some(family_id) = family_id
        && let Ok(Some(stored)) = s.state.get(&format!("family:{family_id}")).await
        && serde_json::from_str::<Family>(&stored).is_ok_and(|f| f.client_id == client.client_id)
    {
        revoke_family(s, &family_id).await;
    }
    StatusCode::OK.into_response()
}
