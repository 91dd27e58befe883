//! The browser part of the authorization-code flow: `/oauth/authorize` checks the client's
//! request and sends the user to the organisation's identity provider (its own code + PKCE +
//! nonce); `/oauth/callback` verifies the login; a consent page is shown the first time a user
//! lets a client use an endpoint; then the client gets a one-time code bound to its PKCE
//! challenge, redirect URI and the endpoint (resource).

use super::{AuthServer, OAuthNote, hash, noted, random_token, s256, server};
use crate::identity::persona_for;
use crate::oidc::VerifiedUser;
use crate::state::AppState;
use axum::extract::{Form, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Login requests wait this long for the user.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Codes are redeemed within this.
pub const CODE_TTL: Duration = Duration::from_secs(60);

/// What the client asked for, kept while the user logs in.
#[derive(Serialize, Deserialize, Clone)]
struct Pending {
    client_id: String,
    client_name: Option<String>,
    redirect_uri: String,
    state: Option<String>,
    code_challenge: String,
    resource: String,
    scope: Option<String>,
    idp_verifier: String,
    nonce: String,
    #[serde(default)]
    user: Option<(String, Vec<String>)>,
}

/// A code as stored (under its hash).
#[derive(Serialize, Deserialize)]
pub struct CodeGrant {
    /// Client it was issued to.
    pub client_id: String,
    /// Redirect URI it was sent to.
    pub redirect_uri: String,
    /// PKCE S256 challenge.
    pub code_challenge: String,
    /// Endpoint the token is for.
    pub resource: String,
    /// Scope granted.
    pub scope: Option<String>,
    /// The user.
    pub user: String,
    /// The user's groups at login.
    pub groups: Vec<String>,
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>Portcullis: sign-in failed</title><h1>Sign-in failed</h1><p>{}</p>",
        escape(message)
    );
    (status, Html(body)).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn url_with(base: &str, params: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse(base).expect("validated URL");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    url.to_string()
}

/// Sends the client an error through its (validated) redirect URI, with `state` and `iss`.
fn redirect_error(s: &AuthServer, redirect_uri: &str, state: Option<&str>, error: &str, description: &str) -> Response {
    let mut params = vec![("error", error), ("error_description", description), ("iss", s.issuer.as_str())];
    if let Some(state) = state {
        params.push(("state", state));
    }
    Redirect::to(&url_with(redirect_uri, &params)).into_response()
}

/// `GET /oauth/authorize`.
pub async fn authorize(State(app): State<AppState>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let s = server(&app);
    let param = |name: &str| q.get(name).map(String::as_str).filter(|v| !v.is_empty());
    // Until the client and redirect URI are known good, errors are shown, never redirected.
    let mut note = OAuthNote { client: param("client_id").map(str::to_string), ..OAuthNote::default() };
    if let Some((tenant, endpoint)) = param("resource").and_then(|r| s.parse_resource(r)) {
        note.tenant = Some(tenant);
        note.endpoint = Some(endpoint);
    }
    let Some(client_id) = param("client_id") else {
        return noted(
            error_page(StatusCode::BAD_REQUEST, "The request names no client_id."),
            note.refused("no_client_id"),
        );
    };
    let client = match s.client(client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return noted(
                error_page(StatusCode::BAD_REQUEST, "This client is not registered."),
                note.refused("unknown_client"),
            );
        }
        Err(_) => return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again shortly."),
    };
    let Some(redirect_uri) = param("redirect_uri") else {
        return noted(
            error_page(StatusCode::BAD_REQUEST, "The request names no redirect_uri."),
            note.refused("no_redirect_uri"),
        );
    };
    if !client.allows_redirect(redirect_uri) {
        return noted(
            error_page(StatusCode::BAD_REQUEST, "The redirect_uri is not registered for this client."),
            note.refused("redirect_uri_mismatch"),
        );
    }
    let state = param("state");
    let fail = |error: &str, description: &str| {
        noted(redirect_error(s, redirect_uri, state, error, description), note.clone().refused(error))
    };
    if param("response_type") != Some("code") {
        return fail("unsupported_response_type", "only response_type=code is supported");
    }
    let Some(code_challenge) = param("code_challenge") else {
        return noted(
            redirect_error(
                s,
                redirect_uri,
                state,
                "invalid_request",
                "PKCE is required: send code_challenge with code_challenge_method=S256",
            ),
            note.refused("pkce_missing"),
        );
    };
    if param("code_challenge_method") != Some("S256") {
        return noted(
            redirect_error(
                s,
                redirect_uri,
                state,
                "invalid_request",
                "code_challenge_method must be S256 (plain is not accepted)",
            ),
            note.refused("pkce_not_s256"),
        );
    }
    if code_challenge.len() != 43 {
        return fail("invalid_request", "code_challenge must be a base64url SHA-256 (43 characters)");
    }
    let Some(resource) = param("resource") else {
        return fail("invalid_target", "resource is required: the URL of the MCP endpoint the token is for");
    };
    // Stored in canonical form, so the token's audience always matches the endpoint's URI.
    let Some(resource) = s.parse_resource(resource).map(|(t, e)| s.resource(&t, &e)) else {
        return fail("invalid_target", "resource is not an MCP endpoint of this server");
    };
    let (authorization_endpoint, _) = match s.idp.endpoints().await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "Identity provider discovery failed");
            return fail("temporarily_unavailable", "the identity provider cannot be reached");
        }
    };
    let pending = Pending {
        client_id: client.client_id.clone(),
        client_name: client.client_name.clone(),
        redirect_uri: redirect_uri.to_string(),
        state: state.map(str::to_string),
        code_challenge: code_challenge.to_string(),
        resource,
        // The one scope this server grants; whatever else was asked is not granted (RFC 6749
        // §3.3: the token response says what was), so no requested string reaches a token.
        scope: Some("mcp".to_string()),
        idp_verifier: random_token(),
        nonce: random_token(),
        user: None,
    };
    let login = random_token();
    let stored = serde_json::to_string(&pending).unwrap_or_default();
    if s.state.put(&format!("login:{}", hash(&login)), stored, LOGIN_TTL).await.is_err() {
        return fail("temporarily_unavailable", "try again shortly");
    }
    let (idp_client, _, scopes) = s.idp_client();
    let callback = format!("{}/oauth/callback", s.issuer);
    let challenge = s256(&pending.idp_verifier);
    noted(
        Redirect::to(&url_with(
            &authorization_endpoint,
            &[
                ("response_type", "code"),
                ("client_id", idp_client),
                ("redirect_uri", &callback),
                ("scope", scopes),
                ("state", &login),
                ("nonce", &pending.nonce),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        ))
        .into_response(),
        note,
    )
}

#[derive(Deserialize)]
struct IdpTokens {
    id_token: Option<String>,
}

/// `GET /oauth/callback`: the identity provider sends the user back.
pub async fn callback(State(app): State<AppState>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let s = server(&app);
    let Some(login) = q.get("state") else { return error_page(StatusCode::BAD_REQUEST, "The login state is missing.") };
    let pending: Pending = match s.state.take(&format!("login:{}", hash(login))).await {
        Ok(Some(p)) => match serde_json::from_str(&p) {
            Ok(p) => p,
            Err(_) => return error_page(StatusCode::BAD_REQUEST, "The login state is unreadable."),
        },
        Ok(None) => return error_page(StatusCode::BAD_REQUEST, "This login expired or was already used; start again."),
        Err(_) => return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again shortly."),
    };
    let mut note = OAuthNote { client: Some(pending.client_id.clone()), ..OAuthNote::default() };
    if let Some((tenant, endpoint)) = s.parse_resource(&pending.resource) {
        note.tenant = Some(tenant);
        note.endpoint = Some(endpoint);
    }
    let fail = |note: &OAuthNote, error: &str, d: &str| {
        noted(redirect_error(s, &pending.redirect_uri, pending.state.as_deref(), error, d), note.clone().refused(error))
    };
    if q.contains_key("error") {
        return fail(&note, "access_denied", "the identity provider did not sign the user in");
    }
    let Some(code) = q.get("code") else { return fail(&note, "access_denied", "the identity provider sent no code") };
    let user = match idp_login(s, code, &pending).await {
        Ok(user) => user,
        Err(reason) => {
            tracing::warn!(%reason, "Bridged login failed");
            return noted(
                redirect_error(
                    s,
                    &pending.redirect_uri,
                    pending.state.as_deref(),
                    "access_denied",
                    "the login could not be verified",
                ),
                note.refused(&format!("idp_login_failed: {reason}")),
            );
        }
    };
    note.subject = Some(format!("oidc:{}", user.user));
    let Some((tenant, endpoint)) = s.parse_resource(&pending.resource) else {
        return fail(&note, "invalid_target", "resource is not an MCP endpoint of this server");
    };
    // The user must have a persona that may use this endpoint; otherwise it does not exist for them.
    let allowed = app.current().is_some_and(|loaded| {
        loaded
            .snapshot
            .tenant(&tenant)
            .is_some_and(|t| persona_for(t, &user).is_some_and(|p| t.endpoint_for(&endpoint, &p.name).is_some()))
    });
    if !allowed {
        return noted(
            redirect_error(
                s,
                &pending.redirect_uri,
                pending.state.as_deref(),
                "access_denied",
                "no persona of yours may use this endpoint",
            ),
            note.refused("no_persona"),
        );
    }
    let subject = format!("oidc:{}", user.user);
    match s.clients.has_consent(&pending.client_id, &subject, &pending.resource).await {
        Ok(true) => noted(issue_code(s, &pending, &user).await, note),
        Ok(false) => noted(consent_page(s, pending, user).await, note),
        Err(_) => fail(&note, "temporarily_unavailable", "try again shortly"),
    }
}

async fn idp_login(s: &AuthServer, code: &str, pending: &Pending) -> Result<VerifiedUser, String> {
    let (_, token_endpoint) = s.idp.endpoints().await?;
    let (client_id, secret, _) = s.idp_client();
    let callback = format!("{}/oauth/callback", s.issuer);
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", callback.as_str()),
        ("client_id", client_id),
        ("code_verifier", pending.idp_verifier.as_str()),
    ];
    if let Some(secret) = secret {
        form.push(("client_secret", secret));
    }
    let body = serde_urlencoded_form(&form);
    let response = s
        .http()
        .post(&token_endpoint)
        .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("token request failed: {}", e.without_url()))?;
    if !response.status().is_success() {
        return Err(format!("the identity provider answered {}", response.status()));
    }
    let tokens: IdpTokens = response.json().await.map_err(|e| format!("unreadable token response: {e}"))?;
    let id_token = tokens.id_token.ok_or("no id_token in the token response")?;
    s.idp.verify_id_token(&id_token, client_id, &pending.nonce).await.map_err(|e| e.reason().to_string())
}

fn serde_urlencoded_form(pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("static URL");
    url.query_pairs_mut().extend_pairs(pairs);
    url.query().unwrap_or_default().to_string()
}

async fn consent_page(s: &AuthServer, mut pending: Pending, user: VerifiedUser) -> Response {
    let ticket = random_token();
    pending.user = Some((user.user.clone(), user.groups.clone()));
    let stored = serde_json::to_string(&pending).unwrap_or_default();
    if s.state.put(&format!("consent:{}", hash(&ticket)), stored, LOGIN_TTL).await.is_err() {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again shortly.");
    }
    let client = pending.client_name.clone().unwrap_or_else(|| pending.client_id.clone());
    let redirect_host = reqwest::Url::parse(&pending.redirect_uri)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| pending.redirect_uri.clone());
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>Portcullis: allow access?</title>\
         <h1>Allow {client} to use {resource}?</h1>\
         <p>Signed in as <b>{user}</b>. {client} (returning to <code>{host}</code>) will be able to call the tools \
         this endpoint shows you, as you, until you revoke it.</p>\
         <form method=post action=\"{issuer}/oauth/consent\">\
         <input type=hidden name=ticket value=\"{ticket}\">\
         <button name=decision value=allow>Allow</button> <button name=decision value=deny>Deny</button></form>",
        client = escape(&client),
        resource = escape(&pending.resource),
        user = escape(&user.user),
        host = escape(&redirect_host),
        issuer = escape(&s.issuer),
        ticket = escape(&ticket),
    );
    let mut response = Html(body).into_response();
    // The consent page must not be framed (clickjacking).
    response.headers_mut().insert("x-frame-options", http::HeaderValue::from_static("DENY"));
    response.headers_mut().insert("content-security-policy", http::HeaderValue::from_static("frame-ancestors 'none'"));
    response
}

/// The consent form.
#[derive(Deserialize)]
pub struct ConsentForm {
    ticket: String,
    decision: String,
}

/// `POST /oauth/consent`.
pub async fn consent(State(app): State<AppState>, Form(form): Form<ConsentForm>) -> Response {
    let s = server(&app);
    let pending: Pending = match s.state.take(&format!("consent:{}", hash(&form.ticket))).await {
        Ok(Some(p)) => match serde_json::from_str(&p) {
            Ok(p) => p,
            Err(_) => return error_page(StatusCode::BAD_REQUEST, "The consent request is unreadable."),
        },
        Ok(None) => {
            return error_page(StatusCode::BAD_REQUEST, "This consent request expired or was already answered.");
        }
        Err(_) => return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again shortly."),
    };
    let Some((name, groups)) = pending.user.clone() else {
        return error_page(StatusCode::BAD_REQUEST, "The consent request has no user.");
    };
    if form.decision != "allow" {
        return redirect_error(
            s,
            &pending.redirect_uri,
            pending.state.as_deref(),
            "access_denied",
            "the user denied access",
        );
    }
    let user = VerifiedUser { user: name, groups };
    let subject = format!("oidc:{}", user.user);
    if s.clients.record_consent(&pending.client_id, &subject, &pending.resource).await.is_err() {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again shortly.");
    }
    issue_code(s, &pending, &user).await
}

async fn issue_code(s: &AuthServer, pending: &Pending, user: &VerifiedUser) -> Response {
    let code = random_token();
    let grant = CodeGrant {
        client_id: pending.client_id.clone(),
        redirect_uri: pending.redirect_uri.clone(),
        code_challenge: pending.code_challenge.clone(),
        resource: pending.resource.clone(),
        scope: pending.scope.clone(),
        user: user.user.clone(),
        groups: user.groups.clone(),
    };
    let stored = serde_json::to_string(&grant).unwrap_or_default();
    if s.state.put(&format!("code:{}", hash(&code)), stored, CODE_TTL).await.is_err() {
        return redirect_error(
            s,
            &pending.redirect_uri,
            pending.state.as_deref(),
            "temporarily_unavailable",
            "try again",
        );
    }
    let mut params = vec![("code", code.as_str()), ("iss", s.issuer.as_str())];
    if let Some(state) = pending.state.as_deref() {
        params.push(("state", state));
    }
    Redirect::to(&url_with(&pending.redirect_uri, &params)).into_response()
}
