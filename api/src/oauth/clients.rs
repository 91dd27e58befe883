//! OAuth clients: dynamic registration (RFC 7591, with OIDC's `application_type`), lookup,
//! secret checks (bcrypt), and consent records per client, user and endpoint.

use super::{oauth_error, random_token, server};
use crate::db::Db;
use crate::on_pool;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

/// A registered client.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Client {
    /// Client id.
    pub client_id: String,
    /// bcrypt hash of the secret (confidential clients).
    pub secret_hash: Option<String>,
    /// Display name.
    pub client_name: Option<String>,
    /// JSON array of exact redirect URIs.
    pub redirect_uris: String,
    /// `native` or `web`.
    pub application_type: String,
    /// `none`, `client_secret_basic` or `client_secret_post`.
    pub token_endpoint_auth_method: String,
    /// JSON array of grant types.
    pub grant_types: String,
    /// When registered.
    pub created_at: DateTime<Utc>,
    /// Tenant of a service client (client-credentials grant).
    pub tenant: Option<String>,
    /// Persona a service client acts as.
    pub persona: Option<String>,
    /// Who minted a service client.
    pub created_by: Option<String>,
}

impl Client {
    /// Whether `uri` is one of the registered redirect URIs (exact string match).
    pub fn allows_redirect(&self, uri: &str) -> bool {
        serde_json::from_str::<Vec<String>>(&self.redirect_uris).unwrap_or_default().iter().any(|r| r == uri)
    }

    /// Whether `secret` is this client's secret.
    pub fn secret_matches(&self, secret: &str) -> bool {
        self.secret_hash.as_deref().is_some_and(|h| bcrypt::verify(secret, h).unwrap_or(false))
    }
}

/// Client and consent storage.
pub struct Clients {
    db: Db,
}

impl Clients {
    /// On `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// A client by id.
    pub async fn get(&self, client_id: &str) -> Result<Option<Client>, sqlx::Error> {
        on_pool!(&self.db, pool => {
            sqlx::query_as("SELECT client_id, secret_hash, client_name, redirect_uris, application_type, token_endpoint_auth_method, grant_types, created_at, tenant, persona, created_by FROM oauth_clients WHERE client_id = $1")
                .bind(client_id)
                .fetch_optional(pool)
                .await
        })
    }

    /// Stores a client.
    pub async fn insert(&self, c: &Client) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, pool => {
            sqlx::query("INSERT INTO oauth_clients (client_id, secret_hash, client_name, redirect_uris, application_type, token_endpoint_auth_method, grant_types, created_at, tenant, persona, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
                .bind(&c.client_id)
                .bind(&c.secret_hash)
                .bind(&c.client_name)
                .bind(&c.redirect_uris)
                .bind(&c.application_type)
                .bind(&c.token_endpoint_auth_method)
                .bind(&c.grant_types)
                .bind(c.created_at)
                .bind(&c.tenant)
                .bind(&c.persona)
                .bind(&c.created_by)
                .execute(pool)
                .await
                .map(drop)
        })
    }

    /// A tenant's service clients, newest first, and how many there are.
    pub async fn service_clients(
        &self,
        tenant: &str,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<Client>, i64), sqlx::Error> {
        let rows: Vec<Client> = on_pool!(&self.db, pool => {
            sqlx::query_as("SELECT client_id, secret_hash, client_name, redirect_uris, application_type, token_endpoint_auth_method, grant_types, created_at, tenant, persona, created_by FROM oauth_clients WHERE tenant = $1 ORDER BY created_at DESC, client_id DESC LIMIT $2 OFFSET $3")
                .bind(tenant)
                .bind(limit)
                .bind(offset)
                .fetch_all(pool)
                .await
        })?;
        let total: i64 = on_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT count(*) FROM oauth_clients WHERE tenant = $1").bind(tenant).fetch_one(pool).await
        })?;
        Ok((rows, total))
    }

    /// Deletes a tenant's service client; true if it existed.
    pub async fn delete_service_client(&self, tenant: &str, client_id: &str) -> Result<bool, sqlx::Error> {
        let done = on_pool!(&self.db, pool => {
            sqlx::query("DELETE FROM oauth_clients WHERE tenant = $1 AND client_id = $2")
                .bind(tenant)
                .bind(client_id)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })?;
        Ok(done > 0)
    }

    /// Whether `subject` consented to `client_id` using `resource`.
    pub async fn has_consent(&self, client_id: &str, subject: &str, resource: &str) -> Result<bool, sqlx::Error> {
        let found: Option<i64> = on_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT 1 FROM oauth_consents WHERE client_id = $1 AND subject = $2 AND resource = $3")
                .bind(client_id)
                .bind(subject)
                .bind(resource)
                .fetch_optional(pool)
                .await
        })?;
        Ok(found.is_some())
    }

    /// Records consent.
    pub async fn record_consent(&self, client_id: &str, subject: &str, resource: &str) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, pool => {
            sqlx::query("INSERT INTO oauth_consents (client_id, subject, resource, granted_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(client_id)
                .bind(subject)
                .bind(resource)
                .bind(Utc::now())
                .execute(pool)
                .await
                .map(drop)
        })
    }
}

/// A registration request (RFC 7591 §2, OIDC Registration `application_type`).
#[derive(Deserialize)]
pub struct Registration {
    redirect_uris: Option<Vec<String>>,
    client_name: Option<String>,
    application_type: Option<String>,
    token_endpoint_auth_method: Option<String>,
    grant_types: Option<Vec<String>>,
    response_types: Option<Vec<String>>,
}

/// Whether `uri` is plain http to a loopback host (a native app's redirect, RFC 8252 §7.3).
pub fn is_loopback_http(uri: &str) -> bool {
    ["http://127.0.0.1", "http://[::1]", "http://localhost"].iter().any(|p| {
        uri.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with(':') || rest.starts_with('/'))
    })
}

/// Why a redirect URI is refused for this application type, if it is.
pub fn redirect_problem(uri: &str, application_type: &str) -> Option<String> {
    if uri.contains('#') {
        return Some(format!("{uri:?} has a fragment"));
    }
    let Ok(parsed) = reqwest::Url::parse(uri) else { return Some(format!("{uri:?} is not an absolute URI")) };
    match (parsed.scheme(), application_type) {
        ("https", _) if parsed.host_str().is_some() => None,
        ("http", "native") if is_loopback_http(uri) => None,
        ("http", _) if is_loopback_http(uri) => {
            Some(format!("{uri:?} is a loopback URI: register with application_type \"native\""))
        }
        ("http", _) => Some(format!("{uri:?} must use https (http only for loopback native clients)")),
        // Private-use schemes of native apps (reverse domain names, RFC 8252 §7.1).
        (scheme, "native") if scheme.contains('.') => None,
        _ => Some(format!("{uri:?} must use https, a loopback http URI or a reverse-domain scheme")),
    }
}

/// `POST /oauth/register`: dynamic client registration.
pub async fn register(State(app): State<AppState>, body: axum::body::Bytes) -> Response {
    let s = server(&app);
    let invalid = |d: String| oauth_error(StatusCode::BAD_REQUEST, "invalid_client_metadata", &d);
    let request: Registration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("the body is not a registration request: {e}")),
    };
    let application_type = request.application_type.unwrap_or_else(|| "web".into());
    if application_type != "web" && application_type != "native" {
        return invalid("application_type must be \"web\" or \"native\"".into());
    }
    let redirect_uris = request.redirect_uris.unwrap_or_default();
    if redirect_uris.is_empty() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_redirect_uri", "redirect_uris is required");
    }
    for uri in &redirect_uris {
        if let Some(problem) = redirect_problem(uri, &application_type) {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_redirect_uri", &problem);
        }
    }
    let method = request.token_endpoint_auth_method.unwrap_or_else(|| "client_secret_basic".into());
    if !["none", "client_secret_basic", "client_secret_post"].contains(&method.as_str()) {
        return invalid(format!("token_endpoint_auth_method {method:?} is not supported"));
    }
    let grant_types = request.grant_types.unwrap_or_else(|| vec!["authorization_code".into()]);
    if grant_types.iter().any(|g| g != "authorization_code" && g != "refresh_token") {
        return invalid("grant_types may hold authorization_code and refresh_token".into());
    }
    if request.response_types.is_some_and(|r| r.iter().any(|t| t != "code")) {
        return invalid("response_types may only hold \"code\"".into());
    }
    let secret = (method != "none").then(random_token);
    let secret_hash = match &secret {
        Some(secret) => match bcrypt::hash(secret, 10) {
            Ok(h) => Some(h),
            Err(_) => return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "cannot hash the secret"),
        },
        None => None,
    };
    let client = Client {
        client_id: format!("pcl-client-{}", uuid::Uuid::now_v7().simple()),
        secret_hash,
        client_name: request.client_name.clone(),
        redirect_uris: serde_json::to_string(&redirect_uris).unwrap_or_default(),
        application_type: application_type.clone(),
        token_endpoint_auth_method: method.clone(),
        grant_types: serde_json::to_string(&grant_types).unwrap_or_default(),
        created_at: Utc::now(),
        tenant: None,
        persona: None,
        created_by: None,
    };
    if let Err(e) = s.clients.insert(&client).await {
        tracing::error!(error = %e, "Cannot store an OAuth client");
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "cannot store the client");
    }
    let mut body = json!({
        "client_id": client.client_id,
        "client_id_issued_at": client.created_at.timestamp(),
        "client_name": request.client_name,
        "redirect_uris": redirect_uris,
        "application_type": application_type,
        "token_endpoint_auth_method": method,
        "grant_types": grant_types,
        "response_types": ["code"],
    });
    if let Some(secret) = secret {
        body["client_secret"] = json!(secret);
        body["client_secret_expires_at"] = json!(0);
    }
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_follow_the_application_type() {
        assert_eq!(redirect_problem("https://app.example.com/cb", "web"), None);
        assert_eq!(redirect_problem("http://127.0.0.1:33418/cb", "native"), None);
        assert_eq!(redirect_problem("http://localhost/cb", "native"), None);
        assert_eq!(redirect_problem("com.example.app:/cb", "native"), None);
        assert!(redirect_problem("http://127.0.0.1:33418/cb", "web").unwrap().contains("native"));
        assert!(redirect_problem("http://app.example.com/cb", "native").is_some());
        assert!(redirect_problem("http://localhost.evil.com/cb", "native").is_some());
        assert!(redirect_problem("https://app.example.com/cb#x", "web").is_some());
        assert!(redirect_problem("myapp:/cb", "native").is_some());
        assert!(redirect_problem("/relative", "web").is_some());
    }
}
