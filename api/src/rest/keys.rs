//! Key management over REST (admin personas only): mint, list, revoke, rotate. The plaintext key
//! is in the creation (and rotation) response only; stores hold its digest. Keys minted here and
//! keys of ApiKey resources authenticate identically.

use super::handlers::{Page, Paging, idempotent, require_admin as admin};
use super::problem::Problem;
use super::{AuditNote, Caller};
use crate::rest_keys::StoredKey;
use crate::state::AppState;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use http::StatusCode;
use portcullis_crds::keys;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A key as listed: never the key itself.
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    /// Identifier, for revoke and rotate.
    pub id: String,
    /// Public key id (also in audit events).
    pub key_id: String,
    /// Persona it acts as.
    pub persona: String,
    /// What it is for.
    pub description: Option<String>,
    /// Who minted it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked (or will be, at the end of a rotation's grace period).
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether it authenticates now.
    pub active: bool,
}

impl From<&StoredKey> for KeyView {
    fn from(k: &StoredKey) -> Self {
        Self {
            id: k.id.clone(),
            key_id: k.key_id.clone(),
            persona: k.persona.clone(),
            description: k.description.clone(),
            created_by: k.created_by.clone(),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            active: k.works_at(Utc::now()),
        }
    }
}

/// A freshly minted key: the only time the plaintext is shown.
#[derive(Serialize, ToSchema)]
pub struct MintedKey {
    /// The key: store it now, it is not shown again.
    pub key: String,
    /// The stored record.
    #[serde(flatten)]
    pub record: KeyView,
}

/// What to mint.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Persona of this tenant the key acts as.
    pub persona: String,
    /// When it stops working (RFC 3339); none: never.
    pub expires_at: Option<DateTime<Utc>>,
    /// What it is for.
    pub description: Option<String>,
}

/// How to rotate.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// Seconds the old key keeps working (0 to 604800; default 0: revoked at once).
    #[serde(default)]
    pub grace_seconds: u32,
}

fn body_of(app: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    match body {
        Ok(body) => Ok(body),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(Problem::too_large(app.settings.max_body_bytes))
        }
        Err(rejection) => Err(Problem::bad_request(format!("cannot read the request body: {rejection}"))),
    }
}

fn database_error(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "Key store failed");
    Problem::unavailable("the key store is unavailable; retry shortly")
}

fn note(detail: String) -> AuditNote {
    AuditNote { detail: Some(detail), ..Default::default() }
}

async fn mint_record(
    app: &AppState,
    caller: &Caller,
    persona: String,
    expires_at: Option<DateTime<Utc>>,
    description: Option<String>,
) -> Result<(String, StoredKey), Problem> {
    let Some(keys_store) = &app.rest_keys else {
        return Err(Problem::unavailable("key management is not available"));
    };
    let key = crate::dev::mint_key();
    let digest = keys::digest(&key);
    let now = Utc::now();
    let record = StoredKey {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: caller.identity.tenant.clone(),
        persona,
        key_id: keys::key_id(&digest),
        digest,
        description,
        created_by: caller.identity.subject.clone(),
        created_at: now,
        expires_at,
        revoked_at: None,
        updated_at: now,
    };
    keys_store.insert(record.clone()).await.map_err(database_error)?;
    Ok((key, record))
}

fn created(key: String, record: &StoredKey) -> Response {
    let mut response = (StatusCode::CREATED, Json(MintedKey { key, record: KeyView::from(record) })).into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    if let Ok(location) = http::HeaderValue::from_str(&format!("/api/v1/admin/auth/keys/{}", record.id)) {
        response.headers_mut().insert(http::header::LOCATION, location);
    }
    super::handlers::with_note(response, note(format!("minted key {} for persona {}", record.key_id, record.persona)))
}

/// Mints a key for a persona of the caller's tenant. The plaintext is in this response only.
/// With `Idempotency-Key`, a retry returns the same key instead of minting another.
#[utoipa::path(post, path = "/api/v1/admin/auth/keys", tag = "admin", request_body = CreateKey,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 201, body = MintedKey), (status = 403, description = "Not an admin persona", content_type = "application/problem+json"),
        (status = 422, description = "Unknown persona or an expiry in the past", content_type = "application/problem+json")))]
pub async fn create_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match admin(&caller).and_then(|()| body_of(&app, body)) {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let (app, caller) = (&app, &caller);
    idempotent(app, caller, &headers, "auth/keys", body, |body| async move {
        let request: CreateKey = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return Problem::bad_request(format!("invalid request body: {e}")).into_response(),
        };
        let tenant = &caller.loaded.snapshot.tenants[&caller.identity.tenant];
        if !tenant.personas.contains_key(&request.persona) {
            return Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-persona",
                "Unprocessable Entity",
                format!("there is no persona {:?} in this tenant", request.persona),
            )
            .into_response();
        }
        if request.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expiry-in-the-past",
                "Unprocessable Entity",
                "expires_at is in the past",
            )
            .into_response();
        }
        match mint_record(app, caller, request.persona, request.expires_at, request.description).await {
            Ok((key, record)) => created(key, &record),
            Err(p) => p.into_response(),
        }
    })
    .await
}

/// Keys minted over REST in this tenant, newest first (never the keys themselves).
#[utoipa::path(get, path = "/api/v1/admin/auth/keys", tag = "admin", params(Paging),
    responses((status = 200, body = Page<KeyView>), (status = 403, description = "Not an admin persona", content_type = "application/problem+json")))]
pub async fn list_keys(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> Result<Json<Page<KeyView>>, Problem> {
    admin(&caller)?;
    let Query(paging) = paging.map_err(|e| Problem::bad_request(e.body_text()))?;
    let (page, per_page) = paging.bounds()?;
    let store = app.rest_keys.as_ref().ok_or_else(|| Problem::unavailable("key management is not available"))?;
    let offset = i64::from(page - 1) * i64::from(per_page);
    let (rows, total) = store.list(&caller.identity.tenant, offset, per_page.into()).await.map_err(database_error)?;
    let items = rows.iter().map(KeyView::from).collect();
    Ok(Json(Page { items, total: total.try_into().unwrap_or(0), page, per_page }))
}

/// Revokes a key: refused by every pod within a second.
#[utoipa::path(delete, path = "/api/v1/admin/auth/keys/{id}", tag = "admin",
    params(("id" = String, Path, description = "Key identifier")),
    responses((status = 204, description = "Revoked"), (status = 404, description = "No such active key", content_type = "application/problem+json")))]
pub async fn revoke_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    if let Err(p) = admin(&caller) {
        return p.into_response();
    }
    let Some(store) = &app.rest_keys else {
        return Problem::unavailable("key management is not available").into_response();
    };
    match store.revoke(&caller.identity.tenant, &id, Utc::now()).await {
        Ok(Some(record)) => super::handlers::with_note(
            StatusCode::NO_CONTENT.into_response(),
            note(format!("revoked key {}", record.key_id)),
        ),
        Ok(None) => Problem::not_found(format!("there is no active key {id:?}")).into_response(),
        Err(e) => database_error(e).into_response(),
    }
}

/// Replaces a key with a new one for the same persona, expiry and description; the old key
/// works for `grace_seconds` more (default 0). The new plaintext is in this response only.
#[utoipa::path(post, path = "/api/v1/admin/auth/keys/{id}/rotate", tag = "admin", request_body = RotateKey,
    params(("id" = String, Path, description = "Key identifier")),
    responses((status = 201, body = MintedKey), (status = 404, description = "No such active key", content_type = "application/problem+json")))]
pub async fn rotate_key(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match admin(&caller).and_then(|()| body_of(&app, body)) {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let operation = format!("auth/keys/{id}/rotate");
    let (app, caller, id) = (&app, &caller, &id);
    idempotent(app, caller, &headers, &operation, body, |body| async move {
        let request: RotateKey = if body.iter().all(u8::is_ascii_whitespace) {
            RotateKey::default()
        } else {
            match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return Problem::bad_request(format!("invalid request body: {e}")).into_response(),
            }
        };
        if request.grace_seconds > 604_800 {
            return Problem::bad_request("grace_seconds must be at most 604800 (7 days)").into_response();
        }
        let Some(store) = &app.rest_keys else {
            return Problem::unavailable("key management is not available").into_response();
        };
        let old = match store.get(&caller.identity.tenant, id).await {
            Ok(Some(old)) if old.works_at(Utc::now()) => old,
            Ok(_) => return Problem::not_found(format!("there is no active key {id:?}")).into_response(),
            Err(e) => return database_error(e).into_response(),
        };
        let (key, record) =
            match mint_record(app, caller, old.persona.clone(), old.expires_at, old.description.clone()).await {
                Ok(minted) => minted,
                Err(p) => return p.into_response(),
            };
        let until = Utc::now() + chrono::Duration::seconds(request.grace_seconds.into());
        if let Err(e) = store.revoke(&caller.identity.tenant, id, until).await {
            return database_error(e).into_response();
        }
        created(key, &record)
    })
    .await
}

/// A service client for the client-credentials grant, as listed (never its secret).
#[derive(Serialize, ToSchema)]
pub struct ServiceClientView {
    /// OAuth client id.
    pub client_id: String,
    /// Display name.
    pub name: Option<String>,
    /// Persona it acts as.
    pub persona: Option<String>,
    /// Who minted it.
    pub created_by: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A freshly minted service client: the only time the secret is shown.
#[derive(Serialize, ToSchema)]
pub struct MintedServiceClient {
    /// The client secret: store it now, it is not shown again.
    pub client_secret: String,
    /// Token endpoint to use with grant_type=client_credentials and a `resource`.
    pub token_endpoint: String,
    /// The stored record.
    #[serde(flatten)]
    pub record: ServiceClientView,
}

/// What service client to mint.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServiceClient {
    /// Persona of this tenant the client acts as.
    pub persona: String,
    /// Display name.
    pub name: Option<String>,
}

fn view(c: &crate::oauth::clients::Client) -> ServiceClientView {
    ServiceClientView {
        client_id: c.client_id.clone(),
        name: c.client_name.clone(),
        persona: c.persona.clone(),
        created_by: c.created_by.clone(),
        created_at: c.created_at,
    }
}

fn oauth_server(app: &AppState) -> Result<&crate::oauth::AuthServer, Problem> {
    app.oauth.as_deref().ok_or_else(|| {
        Problem::not_found(
            "the OAuth authorization server is not enabled (--oauth-idp-client-id); see docs/identity.md",
        )
    })
}

/// Mints a confidential OAuth client bound to a persona, for the client-credentials grant
/// (services that prefer OAuth tokens to API keys). The secret is in this response only.
#[utoipa::path(post, path = "/api/v1/admin/auth/clients", tag = "admin", request_body = CreateServiceClient,
    responses((status = 201, body = MintedServiceClient), (status = 403, description = "Not an admin persona", content_type = "application/problem+json"),
        (status = 422, description = "Unknown persona", content_type = "application/problem+json")))]
pub async fn create_client(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateServiceClient>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(p) = admin(&caller) {
        return p.into_response();
    }
    let server = match oauth_server(&app) {
        Ok(s) => s,
        Err(p) => return p.into_response(),
    };
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return Problem::bad_request(format!("invalid request body: {}", e.body_text())).into_response(),
    };
    let tenant = &caller.loaded.snapshot.tenants[&caller.identity.tenant];
    if !tenant.personas.contains_key(&request.persona) {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown-persona",
            "Unprocessable Entity",
            format!("there is no persona {:?} in this tenant", request.persona),
        )
        .into_response();
    }
    let secret = crate::oauth::random_token();
    let Ok(secret_hash) = bcrypt::hash(&secret, 10) else { return Problem::internal().into_response() };
    let client = crate::oauth::clients::Client {
        client_id: format!("pcl-service-{}", uuid::Uuid::now_v7().simple()),
        secret_hash: Some(secret_hash),
        client_name: request.name,
        redirect_uris: "[]".into(),
        application_type: "web".into(),
        token_endpoint_auth_method: "client_secret_basic".into(),
        grant_types: r#"["client_credentials"]"#.into(),
        created_at: Utc::now(),
        tenant: Some(caller.identity.tenant.clone()),
        persona: Some(request.persona),
        created_by: Some(caller.identity.subject.clone()),
    };
    if let Err(e) = server.clients.insert(&client).await {
        return database_error(e).into_response();
    }
    let detail = format!(
        "minted service client {} for persona {}",
        client.client_id,
        client.persona.clone().unwrap_or_default()
    );
    let body = MintedServiceClient {
        client_secret: secret,
        token_endpoint: format!("{}/oauth/token", server.issuer),
        record: view(&client),
    };
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    super::handlers::with_note(response, note(detail))
}

/// The tenant's service clients (never their secrets).
#[utoipa::path(get, path = "/api/v1/admin/auth/clients", tag = "admin", params(Paging),
    responses((status = 200, body = Page<ServiceClientView>)))]
pub async fn list_clients(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> Result<Json<Page<ServiceClientView>>, Problem> {
    admin(&caller)?;
    let server = oauth_server(&app)?;
    let Query(paging) = paging.map_err(|e| Problem::bad_request(e.body_text()))?;
    let (page, per_page) = paging.bounds()?;
    let offset = i64::from(page - 1) * i64::from(per_page);
    let (rows, total) = server
        .clients
        .service_clients(&caller.identity.tenant, offset, per_page.into())
        .await
        .map_err(database_error)?;
    Ok(Json(Page { items: rows.iter().map(view).collect(), total: total.try_into().unwrap_or(0), page, per_page }))
}

/// Deletes a service client; its tokens stop working on every pod at once.
#[utoipa::path(delete, path = "/api/v1/admin/auth/clients/{client_id}", tag = "admin",
    params(("client_id" = String, Path, description = "Client id")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such client", content_type = "application/problem+json")))]
pub async fn delete_client(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(client_id): Path<String>,
) -> Response {
    if let Err(p) = admin(&caller) {
        return p.into_response();
    }
    let server = match oauth_server(&app) {
        Ok(s) => s,
        Err(p) => return p.into_response(),
    };
    // Only this tenant's clients; then revoke first, so a deleted client never keeps working
    // even if the delete fails.
    match server.clients.get(&client_id).await {
        Ok(Some(c)) if c.tenant.as_deref() == Some(caller.identity.tenant.as_str()) => {}
        Ok(_) => return Problem::not_found(format!("there is no service client {client_id:?}")).into_response(),
        Err(e) => return database_error(e).into_response(),
    }
    if !crate::oauth::token::revoke_client(server, &client_id).await {
        return Problem::unavailable("cannot revoke the client's tokens right now; retry").into_response();
    }
    match server.clients.delete_service_client(&caller.identity.tenant, &client_id).await {
        Ok(true) => super::handlers::with_note(
            StatusCode::NO_CONTENT.into_response(),
            note(format!("deleted service client {client_id}")),
        ),
        Ok(false) => Problem::not_found(format!("there is no service client {client_id:?}")).into_response(),
        Err(e) => database_error(e).into_response(),
    }
}
