//! Credentials to identities, fail closed. Today: API keys (`X-API-Key`, or
//! `Authorization: Bearer pcl_…`), looked up by digest in the snapshot.

use chrono::{DateTime, Utc};
use http::HeaderMap;
use portcullis_crds::{Snapshot, keys};

/// Who is calling, resolved to one persona of one tenant.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Tenant (namespace) the credential belongs to.
    pub tenant: String,
    /// Stable subject for audit and rate limits, e.g. `apikey:ci-bot`.
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
    #[error("no credential: send an API key in the X-API-Key header or as Authorization: Bearer")]
    Missing,
    /// A credential of a kind this gateway does not accept here.
    #[error("the bearer token is not a Portcullis API key")]
    UnsupportedToken,
    /// Unknown or revoked key.
    #[error("the API key is not valid (unknown or revoked)")]
    UnknownKey,
    /// The key's expiry has passed.
    #[error("the API key has expired")]
    Expired,
}

impl AuthError {
    /// Short machine-readable reason for audit.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credential",
            AuthError::UnsupportedToken => "unsupported_token",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Expired => "expired_key",
        }
    }
}

fn presented_key(headers: &HeaderMap) -> Result<&str, AuthError> {
    if let Some(value) = headers.get("x-api-key") {
        return value.to_str().map(str::trim).map_err(|_| AuthError::UnknownKey);
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
    if keys::looks_like_key(token) { Ok(token) } else { Err(AuthError::UnsupportedToken) }
}

/// Authenticates a request against the snapshot.
pub fn authenticate(headers: &HeaderMap, snapshot: &Snapshot, now: DateTime<Utc>) -> Result<Identity, AuthError> {
    let key = presented_key(headers)?;
    // Compared by digest: the plaintext is never looked up or compared directly.
    let entry = snapshot.key(&keys::digest(key)).ok_or(AuthError::UnknownKey)?;
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
