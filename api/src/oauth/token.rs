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

/// A refresh-token family: every token descended from one authorization. Revocation is a
/// separate marker (`revoked-family:<id>`) that lives as long as the family could, so no
/// concurrent write can undo it.
#[derive(Serialize, Deserialize)]
struct Family {
    client_id: String,
    resource: String,
    scope: Option<String>,
    user: String,
    groups: Vec<String>,
    /// Hash of the one refresh token that may be used next.
    current: String,
    /// Hashes of refresh tokens already used (the last few): presenting one is reuse.
    #[serde(default)]
    spent: Vec<String>,
    /// When the user logged in (Unix seconds): the session ends `refresh_ttl` later at the latest.
    #[serde(default)]
    auth_time: i64,
}

/// Spent refresh tokens remembered per family for reuse detection.
const SPENT_KEPT: usize = 32;

/// The form, or `None` when a parameter is repeated (RFC 6749 §3.2: `invalid_request`).
fn form(body: &Bytes) -> Option<BTreeMap<String, String>> {
    let url = format!("http://x/?{}", String::from_utf8_lossy(body));
    let mut out = BTreeMap::new();
    for (k, v) in reqwest::Url::parse(&url).ok()?.query_pairs().into_owned() {
        if out.insert(k, v).is_some() {
            return None;
        }
    }
    Some(out)
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
    let Some(f) = form(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is repeated");
    };
    let mut note = OAuthNote { client: f.get("client_id").cloned(), ..OAuthNote::default() };
    let client = match authenticate_client(s, &headers, &f).await {
        Ok(c) => c,
        Err(r) => return noted(r, note.refused("invalid_client")),
    };
    note.client = Some(client.client_id.clone());
    let registered: Vec<String> = serde_json::from_str(&client.grant_types).unwrap_or_default();
    if let Some(grant) = f.get("grant_type")
        && !registered.iter().any(|g| g == grant)
        && ["authorization_code", "refresh_token", "client_credentials"].contains(&grant.as_str())
    {
        return noted(
            oauth_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "this client is not registered for this grant type",
            ),
            note.refused("unauthorized_client"),
        );
    }
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
                if revoke_family(s, &family).await.is_err() {
                    tracing::error!("Cannot revoke the tokens of a replayed code");
                }
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
            spent: Vec::new(),
            auth_time: chrono::Utc::now().timestamp(),
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
    if family_revoked(s, family_id).await {
        note.refusal = Some("refresh_revoked".into());
        return invalid_grant("the refresh token was revoked");
    }
    // Taken atomically: of two refreshes racing with the same token, only one rotates it.
    let key = format!("family:{family_id}");
    let family: Family = match s.state.take(&key).await {
        Ok(Some(f)) => match serde_json::from_str(&f) {
            Ok(f) => f,
            Err(_) => return invalid_grant("the refresh token is invalid"),
        },
        Ok(None) => {
            note.refusal = Some("unknown_refresh_token".into());
            return invalid_grant("the refresh token is invalid, expired or being used concurrently");
        }
        Err(_) => return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again"),
    };
    locate(s, note, &family.resource, &family.user);
    let presented = hash(token);
    let refuse = |note: &mut OAuthNote, reason: &str, description: &str| {
        note.refusal = Some(reason.into());
        invalid_grant(description)
    };
    if family.client_id != client.client_id {
        put_family(s, family_id, &family).await;
        return refuse(note, "refresh_of_another_client", "the refresh token was issued to another client");
    }
    if family.current != presented {
        if family.spent.contains(&presented) {
            // A spent token came back: someone else may hold the live one. Revoke them all.
            let _ = revoke_family(s, family_id).await;
            tracing::warn!(client = %client.client_id, "Refresh token reused; the family is revoked");
            return refuse(note, "refresh_reuse", "the refresh token was already used; the session is revoked");
        }
        // Not a token of this family at all (e.g. a guessed suffix): refused, nothing revoked.
        put_family(s, family_id, &family).await;
        return refuse(note, "unknown_refresh_token", "the refresh token is invalid");
    }
    if session_end(s, &family) <= chrono::Utc::now().timestamp() {
        return refuse(note, "session_expired", "the session reached its maximum lifetime; sign in again");
    }
    if f.get("resource").is_some_and(|r| *r != family.resource) {
        put_family(s, family_id, &family).await;
        note.refusal = Some("resource_mismatch".into());
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_target", "resource differs from the authorization");
    }
    issue(s, family_id, family, client).await
}

/// The session's absolute end: the login plus the refresh lifetime (users removed from a group
/// at the identity provider lose access by then at the latest).
fn session_end(s: &AuthServer, family: &Family) -> i64 {
    family.auth_time + s.refresh_ttl.as_secs() as i64
}

fn family_ttl(s: &AuthServer, family: &Family) -> Duration {
    let left = session_end(s, family) - chrono::Utc::now().timestamp();
    Duration::from_secs(left.max(1) as u64)
}

async fn put_family(s: &AuthServer, family_id: &str, family: &Family) {
    let stored = serde_json::to_string(family).unwrap_or_default();
    let _ = s.state.put(&format!("family:{family_id}"), stored, family_ttl(s, family)).await;
}

/// Revokes a family: its refresh token and its live access tokens.
async fn revoke_family(s: &AuthServer, family_id: &str) -> Result<(), super::ephemeral::Unavailable> {
    s.state.put(&format!("revoked-family:{family_id}"), "1".into(), s.refresh_ttl).await?;
    s.state.take(&format!("family:{family_id}")).await.map(drop)
}

async fn issue(s: &AuthServer, family_id: &str, mut family: Family, client: &Client) -> Response {
    let refresh_token = format!("{family_id}.{}", random_token());
    if !family.current.is_empty() {
        let spent = std::mem::take(&mut family.current);
        family.spent.push(spent);
        if family.spent.len() > SPENT_KEPT {
            family.spent.remove(0);
        }
    }
    family.current = hash(&refresh_token);
    let stored = serde_json::to_string(&family).unwrap_or_default();
    if s.state.put(&format!("family:{family_id}"), stored, family_ttl(s, &family)).await.is_err() {
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
    let Some(f) = form(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is repeated");
    };
    let client = match authenticate_client(s, &headers, &f).await {
        Ok(c) => c,
        Err(r) => return noted(r, OAuthNote::default().refused("invalid_client")),
    };
    let Some(token) = f.get("token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required");
    };
    // Only the client a session belongs to may end it, and only with one of its real tokens.
    let family_id = match token.split_once('.') {
        Some((family, rest)) if !rest.contains('.') => match s.state.get(&format!("family:{family}")).await {
            Ok(Some(stored)) => serde_json::from_str::<Family>(&stored)
                .ok()
                .filter(|f| f.client_id == client.client_id)
                .filter(|f| f.current == hash(token) || f.spent.contains(&hash(token)))
                .map(|_| family.to_string()),
            Ok(None) => None,
            Err(_) => return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again"),
        },
        _ => s
            .keys
            .verify_any_audience(token, &s.issuer)
            .ok()
            .filter(|c| c.get("client_id").and_then(|v| v.as_str()) == Some(client.client_id.as_str()))
            .and_then(|c| c.get("sid").and_then(|v| v.as_str()).map(str::to_string)),
    };
    if let Some(family_id) = family_id
        && revoke_family(s, &family_id).await.is_err()
    {
        // RFC 7009 §2.2.1: the client should retry.
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again");
    }
    StatusCode::OK.into_response()
}
