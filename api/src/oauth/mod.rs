//! Portcullis as an OAuth 2.1 authorization server for MCP clients (MCP authorization,
//! 2026-07-28): protected-resource metadata per endpoint (RFC 9728), authorization-server
//! metadata (RFC 8414), dynamic client registration (RFC 7591), authorization code with PKCE S256
//! and the `iss` response parameter (RFC 9207), resource indicators binding each token to one
//! endpoint (RFC 8707), rotating refresh tokens with reuse detection, revocation (RFC 7009). The
//! human login is bridged to the organisation's identity provider. See docs/identity.md.

pub mod clients;
pub mod ephemeral;
pub mod flow;
pub mod metadata_documents;
pub mod signing;
pub mod token;

use crate::oidc::OidcVerifier;
use crate::state::AppState;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ephemeral::Ephemeral;
use serde_json::{Value, json};
use signing::SigningKeys;
use std::sync::Arc;
use std::time::Duration;

/// Flags of the authorization server (dev and serve).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OAuthArgs {
    /// Public base URL of this gateway (the OAuth issuer, and the origin of endpoint URLs).
    /// Dev mode defaults to http://<listen address>.
    #[arg(long, env = "PORTCULLIS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Client id of Portcullis at the identity provider, for the bridged human login. The
    /// authorization server is on when this and --oidc-issuer are set.
    #[arg(long, env = "PORTCULLIS_OAUTH_IDP_CLIENT_ID")]
    pub oauth_idp_client_id: Option<String>,
    /// Client secret of Portcullis at the identity provider.
    #[arg(long, env = "PORTCULLIS_OAUTH_IDP_CLIENT_SECRET", hide_env_values = true)]
    pub oauth_idp_client_secret: Option<String>,
    /// Scopes asked of the identity provider at login.
    #[arg(long, env = "PORTCULLIS_OAUTH_IDP_SCOPES", default_value = "openid profile email")]
    pub oauth_idp_scopes: String,
    /// Directory of EC P-256 PKCS#8 PEM signing keys (a mounted Secret); the newest file by name
    /// signs. Dev mode generates one in its data directory when not given.
    #[arg(long, env = "PORTCULLIS_OAUTH_SIGNING_KEYS")]
    pub oauth_signing_keys: Option<std::path::PathBuf>,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "PORTCULLIS_OAUTH_ACCESS_TOKEN_SECONDS", default_value_t = 900)]
    pub oauth_access_token_seconds: u64,
    /// Let client metadata documents live on private or loopback addresses (and plain http on
    /// loopback): for internal clients and development only.
    #[arg(long, env = "PORTCULLIS_OAUTH_CLIENT_METADATA_ALLOW_PRIVATE")]
    pub oauth_client_metadata_allow_private: bool,
    /// Lifetime of a refresh-token family without use, in days.
    #[arg(long, env = "PORTCULLIS_OAUTH_REFRESH_TOKEN_DAYS", default_value_t = 30)]
    pub oauth_refresh_token_days: u64,
}

/// The authorization server of this process.
pub struct AuthServer {
    /// Issuer: the public base URL, without a trailing slash.
    pub issuer: String,
    /// The identity provider users log in with.
    pub idp: Arc<OidcVerifier>,
    idp_client_id: String,
    idp_client_secret: Option<String>,
    idp_scopes: String,
    /// Signing keys.
    pub keys: SigningKeys,
    /// Codes, login state, refresh families.
    pub state: Box<dyn Ephemeral>,
    /// Registered clients and consents.
    pub clients: clients::Clients,
    /// Clients identified by metadata-document URLs.
    pub documents: metadata_documents::MetadataDocuments,
    /// Access-token lifetime.
    pub access_ttl: Duration,
    /// Refresh-family lifetime.
    pub refresh_ttl: Duration,
    http: reqwest::Client,
}

impl AuthServer {
    /// The server, when configured (`--oauth-idp-client-id` with an OIDC issuer).
    pub fn from_args(
        args: &OAuthArgs,
        default_public_url: String,
        idp: Option<Arc<OidcVerifier>>,
        keys: impl FnOnce() -> anyhow::Result<SigningKeys>,
        state: Box<dyn Ephemeral>,
        clients: clients::Clients,
        http: reqwest::Client,
    ) -> anyhow::Result<Option<Self>> {
        let Some(client_id) = args.oauth_idp_client_id.clone().filter(|c| !c.is_empty()) else { return Ok(None) };
        let idp =
            idp.ok_or_else(|| anyhow::anyhow!("--oauth-idp-client-id needs --oidc-issuer: users log in there"))?;
        // ID tokens of the bridged login carry aud = this client id; were it an accepted bearer
        // audience, a login's ID token would work as an access token.
        anyhow::ensure!(
            !idp.accepts_audience(&client_id),
            "--oidc-audiences must not include --oauth-idp-client-id: ID tokens of the login would pass as access tokens"
        );
        let issuer = args.public_url.clone().unwrap_or(default_public_url).trim_end_matches('/').to_string();
        anyhow::ensure!(
            crate::oidc::acceptable_url(&issuer),
            "--public-url must be https:// (http:// only for localhost): it is the OAuth issuer"
        );
        Ok(Some(Self {
            issuer,
            idp,
            idp_client_id: client_id,
            idp_client_secret: args.oauth_idp_client_secret.clone(),
            idp_scopes: args.oauth_idp_scopes.clone(),
            keys: keys()?,
            state,
            clients,
            documents: metadata_documents::MetadataDocuments::new(args.oauth_client_metadata_allow_private),
            access_ttl: Duration::from_secs(args.oauth_access_token_seconds.clamp(60, 86_400)),
            refresh_ttl: Duration::from_secs(args.oauth_refresh_token_days.clamp(1, 365) * 86_400),
            http,
        }))
    }

    /// The canonical URI of an endpoint (RFC 8707 `resource`, the `aud` of its tokens).
    pub fn resource(&self, tenant: &str, endpoint: &str) -> String {
        format!("{}/mcp/{tenant}/{endpoint}", self.issuer)
    }

    /// The protected-resource metadata URL of an endpoint (path-suffixed, RFC 9728 §3.1).
    pub fn resource_metadata(&self, tenant: &str, endpoint: &str) -> String {
        format!("{}/.well-known/oauth-protected-resource/mcp/{tenant}/{endpoint}", self.issuer)
    }

    /// (tenant, endpoint) of one of our resource URIs.
    pub fn parse_resource(&self, resource: &str) -> Option<(String, String)> {
        let rest = resource.strip_prefix(&self.issuer)?.strip_prefix("/mcp/")?;
        let (tenant, endpoint) = rest.split_once('/')?;
        let endpoint = endpoint.trim_end_matches('/');
        let valid =
            |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        (valid(tenant) && valid(endpoint)).then(|| (tenant.to_string(), endpoint.to_string()))
    }
}

/// What an OAuth step adds to its audit event: who, for which tenant and client, and why a
/// refusal happened (never a code, token or secret).
#[derive(Clone, Debug, Default)]
pub struct OAuthNote {
    /// Tenant of the endpoint the step concerns, when known.
    pub tenant: Option<String>,
    /// Endpoint name, when known.
    pub endpoint: Option<String>,
    /// The user (`oidc:<user>`), when known.
    pub subject: Option<String>,
    /// Client id.
    pub client: Option<String>,
    /// Machine-readable reason of a refusal; `None` means the step succeeded.
    pub refusal: Option<String>,
}

impl OAuthNote {
    /// This note with a refusal reason.
    pub fn refused(mut self, reason: &str) -> Self {
        self.refusal = Some(reason.to_string());
        self
    }
}

/// Attaches `note` to `response` for the audit layer.
pub fn noted(mut response: Response, note: OAuthNote) -> Response {
    response.extensions_mut().insert(note);
    response
}

/// One audit event per OAuth request. Refusals are `denied` with the reason in `detail`.
async fn audit_layer(
    State(app): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use crate::audit::{AuditEvent, Status};
    let started = std::time::Instant::now();
    let operation = format!("{} {}", request.method(), request.uri().path());
    // No unaudited work: when the audit queue is full, refuse before doing anything.
    if !app.audit.has_capacity() {
        return oauth_error(http::StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "retry shortly");
    }
    let mut response = next.run(request).await;
    let note = response.extensions_mut().remove::<OAuthNote>().unwrap_or_default();
    let mut event = AuditEvent::new(
        note.tenant.as_deref().unwrap_or(""),
        "oauth",
        operation,
        &crate::http_context::request_id(),
        chrono::Utc::now(),
    );
    event.auth_method = Some("oauth".into());
    event.subject = note.subject;
    event.client_name = note.client;
    event.endpoint = note.endpoint;
    let code = response.status();
    event.status = match (&note.refusal, code.as_u16()) {
        (Some(_), _) | (None, 400..=499) => Status::Denied,
        (None, 500..=599) => Status::Error,
        _ => Status::Ok,
    };
    if event.status != Status::Ok {
        event.error_code = Some(code.as_u16().to_string());
        event.detail = note.refusal.or_else(|| Some(format!("http_{}", code.as_u16())));
    }
    event.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if app.audit.record(event).await.is_err() {
        tracing::error!("An OAuth audit event could not be queued");
    }
    response
}

/// The routes of the authorization server (none when it is off).
pub fn router(state: &AppState) -> Router<AppState> {
    if state.oauth.is_none() {
        return Router::new();
    }
    Router::new()
        .route("/.well-known/oauth-authorization-server", get(server_metadata))
        .route("/.well-known/oauth-protected-resource/mcp/{tenant}/{endpoint}", get(resource_metadata))
        .route("/oauth/jwks", get(jwks))
        .route("/oauth/register", post(clients::register))
        .route("/oauth/authorize", get(flow::authorize))
        .route("/oauth/callback", get(flow::callback))
        .route("/oauth/consent", post(flow::consent))
        .route("/oauth/token", post(token::token))
        .route("/oauth/revoke", post(token::revoke))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit_layer))
}

fn server(app: &AppState) -> &AuthServer {
    app.oauth.as_deref().expect("routes exist only with an authorization server")
}

async fn server_metadata(State(app): State<AppState>) -> Response {
    let s = server(&app);
    let i = &s.issuer;
    Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/oauth/authorize"),
        "token_endpoint": format!("{i}/oauth/token"),
        "registration_endpoint": format!("{i}/oauth/register"),
        "revocation_endpoint": format!("{i}/oauth/revoke"),
        "jwks_uri": format!("{i}/oauth/jwks"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": true,
        "scopes_supported": ["mcp"],
    }))
    .into_response()
}

async fn resource_metadata(State(app): State<AppState>, Path((tenant, endpoint)): Path<(String, String)>) -> Response {
    // Answered for any well-formed path: whether an endpoint exists is not told before login.
    let s = server(&app);
    Json(json!({
        "resource": s.resource(&tenant, &endpoint),
        "authorization_servers": [s.issuer],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["mcp"],
        "resource_name": format!("Portcullis MCP endpoint {tenant}/{endpoint}"),
    }))
    .into_response()
}

async fn jwks(State(app): State<AppState>) -> Json<Value> {
    Json(server(&app).keys.jwks())
}

/// An OAuth error response body (RFC 6749 §5.2).
pub fn oauth_error(status: http::StatusCode, error: &str, description: &str) -> Response {
    let mut response = (status, Json(json!({"error": error, "error_description": description}))).into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

/// 32 random bytes, base64url.
pub fn random_token() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Hex SHA-256, how codes and refresh tokens are stored.
pub fn hash(value: &str) -> String {
    portcullis_crds::keys::digest(value)
}

/// `BASE64URL(SHA256(verifier))`, the S256 code challenge.
pub fn s256(verifier: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl AuthServer {
    /// A client by id: registered, or described by the metadata document at its URL.
    pub async fn client(&self, client_id: &str) -> Result<Option<clients::Client>, String> {
        if metadata_documents::is_document_id(client_id) {
            return match self.documents.client(client_id).await {
                Ok(c) => Ok(Some(c)),
                Err(reason) => {
                    tracing::info!(client_id, %reason, "Client metadata document refused");
                    Ok(None)
                }
            };
        }
        self.clients.get(client_id).await.map_err(|e| e.to_string())
    }

    pub(crate) fn idp_client(&self) -> (&str, Option<&str>, &str) {
        (&self.idp_client_id, self.idp_client_secret.as_deref(), &self.idp_scopes)
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }
}
