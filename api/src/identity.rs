//! Credentials to identities, fail closed. API keys (`X-API-Key`, or `Authorization: Bearer pcl_…`)
//! are looked up by digest in the snapshot; other bearer tokens are OIDC tokens of the configured
//! identity provider, whose user and groups select a persona by the personas' `subjects` and
//! `priority`.

use crate::oauth::AuthServer;
use crate::oauth::signing::{Refusal, peek_issuer};
use crate::oidc::{OidcVerifier, TokenError, VerifiedUser};
use crate::rest_keys::RestKeys;
use chrono::{DateTime, Utc};
use http::HeaderMap;
use portcullis_crds::snapshot::{CompiledPersona, Tenant};
use portcullis_crds::{Snapshot, keys};

/// Header naming the tenant of a REST request made with an OIDC token (API keys know theirs).
pub const TENANT_HEADER: &str = "x-portcullis-tenant";

/// Who is calling, resolved to one persona of one tenant.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Tenant (namespace) the credential belongs to.
    pub tenant: String,
    /// Stable subject for audit and rate limits, e.g. `apikey:ci-bot` or `oidc:alice@example.com`.
    pub subject: String,
    /// Persona the caller acts as.
    pub persona: String,
    /// How the caller authenticated.
    pub method: &'static str,
    /// Public id of the key used.
    pub key_id: Option<String>,
}

/// Why no identity could be established. Messages are safe to show: no credential content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential in the request.
    #[error("no credential: send an API key in the X-API-Key header, or a bearer token")]
    Missing,
    /// A credential of a kind this gateway does not accept here.
    #[error("the bearer token is not a Portcullis API key, and no identity provider is configured")]
    UnsupportedToken,
    /// Unknown or revoked key.
    #[error("the API key is not valid (unknown or revoked)")]
    UnknownKey,
    /// The key's expiry has passed.
    #[error("the API key has expired")]
    Expired,
    /// The bearer token was refused.
    #[error("{0}")]
    Token(TokenError),
    /// A valid token whose user matches no persona of the tenant.
    #[error("no persona of this tenant matches your user or groups")]
    NoPersona,
    /// A valid token matching personas in several tenants, and no tenant named.
    #[error("your groups match personas in several tenants: name one in the X-Portcullis-Tenant header")]
    TenantRequired,
}

impl AuthError {
    /// Short machine-readable reason for audit.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credential",
            AuthError::UnsupportedToken => "unsupported_token",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Expired => "expired_key",
            AuthError::Token(e) => e.reason(),
            AuthError::NoPersona => "no_persona",
            AuthError::TenantRequired => "tenant_required",
        }
    }

    /// The HTTP status of the refusal: 401 for credentials, 403 for a valid credential without a
    /// persona, 400 when the tenant must be named.
    pub fn status(self) -> http::StatusCode {
        match self {
            AuthError::NoPersona => http::StatusCode::FORBIDDEN,
            AuthError::TenantRequired => http::StatusCode::BAD_REQUEST,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

enum Credential<'a> {
    Key(&'a str),
    Bearer(&'a str),
}

/// How a refused request tried to authenticate, for the audit event.
pub fn auth_method_of(headers: &HeaderMap) -> &'static str {
    if headers.contains_key("x-api-key") {
        return "api_key";
    }
    match headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        None => "none",
        Some(v) if v.split_once(' ').is_some_and(|(_, t)| keys::looks_like_key(t.trim())) => "api_key",
        Some(_) => "bearer",
    }
}

fn presented(headers: &HeaderMap) -> Result<Credential<'_>, AuthError> {
    if let Some(value) = headers.get("x-api-key") {
        return value.to_str().map(|k| Credential::Key(k.trim())).map_err(|_| AuthError::UnknownKey);
    }
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(AuthError::Missing);
    };
    let value = value.to_str().map_err(|_| AuthError::UnknownKey)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::UnsupportedToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::UnsupportedToken);
    }
    let token = token.trim();
    if keys::looks_like_key(token) { Ok(Credential::Key(token)) } else { Ok(Credential::Bearer(token)) }
}

/// What authentication consults besides the snapshot.
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The organisation's identity provider.
    pub oidc: Option<&'a OidcVerifier>,
    /// Keys minted over REST.
    pub rest_keys: Option<&'a RestKeys>,
    /// Portcullis's own authorization server.
    pub oauth: Option<&'a AuthServer>,
}

/// What the request addresses: the tenant (and MCP endpoint) its URL names.
#[derive(Clone, Copy, Default)]
pub struct Target<'a> {
    /// Tenant named by the URL.
    pub tenant: Option<&'a str>,
    /// MCP endpoint named by the URL.
    pub endpoint: Option<&'a str>,
}

/// Authenticates a request. `tenant` is the tenant the request addresses when the URL names one
/// (MCP); over REST an OIDC caller may name it in `X-Portcullis-Tenant`.
pub async fn authenticate(
    headers: &HeaderMap,
    snapshot: &Snapshot,
    credentials: Credentials<'_>,
    target: Target<'_>,
    now: DateTime<Utc>,
) -> Result<Identity, AuthError> {
    let tenant = target.tenant;
    match presented(headers)? {
        Credential::Key(key) => authenticate_key(key, snapshot, credentials.rest_keys, now),
        Credential::Bearer(token)
            if credentials.oauth.is_some_and(|s| peek_issuer(token).as_deref() == Some(s.issuer.as_str())) =>
        {
            let server = credentials.oauth.expect("checked above");
            authenticate_oauth(server, token, snapshot, target).await
        }
        Credential::Bearer(token) => {
            let Some(oidc) = credentials.oidc else { return Err(AuthError::UnsupportedToken) };
            let user = oidc.verify(token).await.map_err(AuthError::Token)?;
            let named = tenant.or_else(|| headers.get(TENANT_HEADER).and_then(|v| v.to_str().ok()));
            resolve_user(&user, snapshot, named)
        }
    }
}

fn authenticate_key(
    key: &str,
    snapshot: &Snapshot,
    rest_keys: Option<&RestKeys>,
    now: DateTime<Utc>,
) -> Result<Identity, AuthError> {
    // Compared by digest: the plaintext is never looked up or compared directly.
    let digest = keys::digest(key);
    let Some(entry) = snapshot.key(&digest) else {
        return authenticate_rest_key(&digest, snapshot, rest_keys, now);
    };
    if entry.expires_at.is_some_and(|at| at <= now) {
        return Err(AuthError::Expired);
    }
    let tenant = snapshot.tenant(&entry.tenant).ok_or(AuthError::UnknownKey)?;
    if !tenant.personas.contains_key(&entry.persona) {
        return Err(AuthError::UnknownKey);
    }
    Ok(Identity {
        tenant: entry.tenant.clone(),
        subject: format!("apikey:{}", entry.name),
        persona: entry.persona.clone(),
        method: "api_key",
        key_id: Some(entry.key_id.clone()),
    })
}

/// A Portcullis access token: valid only for the endpoint it was issued for (RFC 8707), so it
/// works over MCP on that endpoint and nowhere else.
async fn authenticate_oauth(
    server: &AuthServer,
    token: &str,
    snapshot: &Snapshot,
    target: Target<'_>,
) -> Result<Identity, AuthError> {
    let (Some(tenant), Some(endpoint)) = (target.tenant, target.endpoint) else {
        return Err(AuthError::Token(TokenError::Audience));
    };
    let claims = server.keys.verify(token, &server.issuer, &server.resource(tenant, endpoint)).map_err(|r| {
        AuthError::Token(match r {
            Refusal::Expired => TokenError::Expired,
            Refusal::Audience => TokenError::Audience,
            Refusal::Invalid => TokenError::Signature,
        })
    })?;
    // A service client (client-credentials grant) acts as its persona in its tenant.
    if let Some(persona) = claims.get("persona").and_then(|v| v.as_str()) {
        let client_id = claims.get("client_id").and_then(|v| v.as_str()).unwrap_or_default();
        let token_tenant = claims.get("tenant").and_then(|v| v.as_str());
        let exists = snapshot.tenant(tenant).is_some_and(|t| t.personas.contains_key(persona));
        // A deleted client's tokens stop at once (its revocation marker outlives its tokens).
        let live = !crate::oauth::token::client_revoked(server, client_id).await;
        if token_tenant != Some(tenant) || !exists || !live {
            return Err(AuthError::Token(TokenError::Revoked));
        }
        return Ok(Identity {
            tenant: tenant.to_string(),
            subject: format!("client:{client_id}"),
            persona: persona.to_string(),
            method: "oauth",
            key_id: Some(client_id.to_string()),
        });
    }
    let family = claims.get("sid").and_then(|v| v.as_str()).unwrap_or_default();
    if crate::oauth::token::family_revoked(server, family).await {
        return Err(AuthError::Token(TokenError::Revoked));
    }
    let user = VerifiedUser {
        user: claims.get("sub").and_then(|v| v.as_str()).unwrap_or_default().to_string(),
        groups: claims
            .get("groups")
            .and_then(|v| v.as_array())
            .map(|g| g.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
    };
    let mut identity = resolve_user(&user, snapshot, Some(tenant))?;
    identity.method = "oauth";
    identity.key_id = claims.get("client_id").and_then(|v| v.as_str()).map(str::to_string);
    Ok(identity)
}

fn authenticate_rest_key(
    digest: &str,
    snapshot: &Snapshot,
    rest_keys: Option<&RestKeys>,
    now: DateTime<Utc>,
) -> Result<Identity, AuthError> {
    let stored = rest_keys.and_then(|k| k.lookup(digest)).ok_or(AuthError::UnknownKey)?;
    if stored.revoked_at.is_some_and(|at| at <= now) {
        return Err(AuthError::UnknownKey);
    }
    if stored.expires_at.is_some_and(|at| at <= now) {
        return Err(AuthError::Expired);
    }
    let tenant = snapshot.tenant(&stored.tenant).ok_or(AuthError::UnknownKey)?;
    if !tenant.personas.contains_key(&stored.persona) {
        return Err(AuthError::UnknownKey);
    }
    Ok(Identity {
        tenant: stored.tenant,
        subject: format!("apikey:{}", stored.key_id),
        persona: stored.persona,
        method: "api_key",
        key_id: Some(stored.key_id),
    })
}

/// The persona of `user` in `tenant`: among the personas whose `subjects` name the user or one
/// of their groups, the highest `priority` (ties: the first name).
pub fn persona_for<'a>(tenant: &'a Tenant, user: &VerifiedUser) -> Option<&'a CompiledPersona> {
    tenant
        .personas
        .values()
        .filter(|p| p.subjects.users.contains(&user.user) || p.subjects.groups.iter().any(|g| user.groups.contains(g)))
        .max_by(|a, b| a.priority.cmp(&b.priority).then_with(|| b.name.cmp(&a.name)))
}

fn resolve_user(user: &VerifiedUser, snapshot: &Snapshot, named: Option<&str>) -> Result<Identity, AuthError> {
    let (tenant_name, persona) = match named {
        Some(name) => {
            let tenant = snapshot.tenant(name).ok_or(AuthError::NoPersona)?;
            (name, persona_for(tenant, user).ok_or(AuthError::NoPersona)?)
        }
        None => {
            let mut matches = snapshot
                .tenants
                .iter()
                .filter_map(|(name, tenant)| persona_for(tenant, user).map(|p| (name.as_str(), p)));
            let first = matches.next().ok_or(AuthError::NoPersona)?;
            if matches.next().is_some() {
                return Err(AuthError::TenantRequired);
            }
            first
        }
    };
    Ok(Identity {
        tenant: tenant_name.to_string(),
        subject: format!("oidc:{}", user.user),
        persona: persona.name.clone(),
        method: "oidc",
        key_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn snapshot() -> Snapshot {
        let yaml = r#"
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: analyst, namespace: acme}
spec: {subjects: {groups: [analysts]}, priority: 10}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: admin, namespace: acme}
spec: {subjects: {groups: [platform], users: [root@acme.io]}, priority: 100, admin: true}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: reader, namespace: beta}
spec: {subjects: {groups: [analysts]}}
"#;
        let (objects, _) = portcullis_crds::parse_manifests("t.yaml", yaml);
        portcullis_crds::compile(&objects, Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap()).unwrap()
    }

    fn user(name: &str, groups: &[&str]) -> VerifiedUser {
        VerifiedUser { user: name.into(), groups: groups.iter().map(|g| g.to_string()).collect() }
    }

    #[test]
    fn the_highest_priority_matching_persona_wins() {
        let s = snapshot();
        let both = user("ann", &["analysts", "platform"]);
        assert_eq!(resolve_user(&both, &s, Some("acme")).unwrap().persona, "admin");
        let by_name = user("root@acme.io", &[]);
        assert_eq!(resolve_user(&by_name, &s, None).unwrap().persona, "admin");
        let analyst = resolve_user(&user("bob", &["analysts"]), &s, Some("acme")).unwrap();
        assert_eq!(
            (analyst.persona.as_str(), analyst.subject.as_str(), analyst.method),
            ("analyst", "oidc:bob", "oidc")
        );
    }

    #[test]
    fn no_matching_persona_is_forbidden_and_an_ambiguous_tenant_must_be_named() {
        let s = snapshot();
        assert_eq!(resolve_user(&user("eve", &["guests"]), &s, Some("acme")).unwrap_err(), AuthError::NoPersona);
        assert_eq!(resolve_user(&user("eve", &["platform"]), &s, Some("beta")).unwrap_err(), AuthError::NoPersona);
        assert_eq!(resolve_user(&user("eve", &["platform"]), &s, Some("nope")).unwrap_err(), AuthError::NoPersona);
        assert_eq!(resolve_user(&user("bob", &["analysts"]), &s, None).unwrap_err(), AuthError::TenantRequired);
        assert_eq!(resolve_user(&user("bob", &["analysts"]), &s, Some("beta")).unwrap().persona, "reader");
        assert_eq!(AuthError::NoPersona.status(), http::StatusCode::FORBIDDEN);
    }
}
