//! OIDC bearer tokens from the organisation's identity provider: discovery, a JWKS cache that
//! refreshes on an unknown `kid` (single-flight and rate-limited, so a flood of bogus kids costs
//! the IdP one request per interval) and on a schedule, and validation per the JWT BCP (RFC 8725):
//! asymmetric algorithms only, the key's type must fit the algorithm, issuer, audience, expiry and
//! not-before checked with a small leeway. When the IdP cannot be reached and the key is unknown,
//! the token is refused, never accepted.

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};

/// Identity-provider settings (flags and environment of `dev` and `serve`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OidcArgs {
    /// Issuer URL of the organisation's OIDC provider; OIDC bearer tokens are accepted when set.
    #[arg(long, env = "PORTCULLIS_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// Accepted audiences (`aud`), comma-separated; required with an issuer.
    #[arg(long, env = "PORTCULLIS_OIDC_AUDIENCES", value_delimiter = ',')]
    pub oidc_audiences: Vec<String>,
    /// Claim holding the user's groups or roles, as a dot path (e.g. `realm_access.roles`).
    #[arg(long, env = "PORTCULLIS_OIDC_GROUPS_CLAIM", default_value = "groups")]
    pub oidc_groups_claim: String,
    /// Claim naming the user (e.g. `email`, `preferred_username`).
    #[arg(long, env = "PORTCULLIS_OIDC_USER_CLAIM", default_value = "sub")]
    pub oidc_user_claim: String,
    /// Accepted signature algorithms, comma-separated: RS256, PS256, ES256, EdDSA.
    #[arg(long, env = "PORTCULLIS_OIDC_ALGORITHMS", value_delimiter = ',', default_value = "RS256,PS256,ES256,EdDSA")]
    pub oidc_algorithms: Vec<String>,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    #[arg(long, env = "PORTCULLIS_OIDC_LEEWAY_SECONDS", default_value_t = 60)]
    pub oidc_leeway_seconds: u64,
    /// Least time between two JWKS refreshes caused by unknown key ids, in seconds.
    #[arg(long, env = "PORTCULLIS_OIDC_JWKS_MIN_REFRESH_SECONDS", default_value_t = 30)]
    pub oidc_jwks_min_refresh_seconds: u64,
    /// JWKS older than this are refreshed on the next request, in seconds.
    #[arg(long, env = "PORTCULLIS_OIDC_JWKS_MAX_AGE_SECONDS", default_value_t = 3600)]
    pub oidc_jwks_max_age_seconds: u64,
}

/// Why a bearer token was refused. The reasons are safe to log and audit: never token contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or its header or claims cannot be read.
    #[error("the bearer token is malformed")]
    Malformed,
    /// `alg` not accepted (HMAC, `none`, or not configured), or not what the key is for.
    #[error("the token's signature algorithm is not accepted")]
    Algorithm,
    /// No key with that `kid`, even after refreshing the JWKS.
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Wrong `iss`.
    #[error("the token was issued by another issuer")]
    Issuer,
    /// `aud` names none of the accepted audiences.
    #[error("the token is meant for another audience")]
    Audience,
    /// The identity provider cannot be reached and the key is not cached.
    #[error("the identity provider cannot be reached to check the token")]
    IdpUnreachable,
    /// The token names no user in the configured claim.
    #[error("the token names no user")]
    NoUser,
    /// A Portcullis access token that was revoked (or whose session was).
    #[error("the token was revoked")]
    Revoked,
}

impl TokenError {
    /// Short machine-readable reason for audit.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::Algorithm => "token_algorithm",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::Signature => "token_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::Issuer => "token_issuer",
            TokenError::Audience => "token_audience",
            TokenError::IdpUnreachable => "idp_unreachable",
            TokenError::NoUser => "token_no_user",
            TokenError::Revoked => "token_revoked",
        }
    }
}

/// What a verified token says about its bearer.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedUser {
    /// The user, from the configured claim.
    pub user: String,
    /// Groups or roles, from the configured claim.
    pub groups: Vec<String>,
}

struct Keys {
    by_kid: HashMap<String, (Jwk, DecodingKey)>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

/// Verifies tokens of one issuer.
pub struct OidcVerifier {
    issuer: String,
    audiences: Vec<String>,
    groups_claim: Vec<String>,
    user_claim: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    min_refresh: Duration,
    max_age: Duration,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    // Single flight: one JWKS fetch at a time.
    refreshing: Mutex<()>,
    discovery: Mutex<Option<Value>>,
}

/// Configuration mistakes, reported at start.
#[derive(Debug, thiserror::Error)]
pub enum OidcConfigError {
    /// An algorithm that is not asymmetric or not supported.
    #[error("--oidc-algorithms: {0:?} is not accepted; use RS256, PS256, ES256 or EdDSA (never HMAC or none)")]
    Algorithm(String),
    /// No audience.
    #[error("--oidc-audiences is required with --oidc-issuer: tokens must be meant for this gateway")]
    NoAudience,
    /// Not an https URL (plain http is allowed for loopback addresses only).
    #[error("--oidc-issuer must be an https:// URL (http:// only for localhost)")]
    Issuer,
}

fn claim_path(path: &str) -> Vec<String> {
    path.split('.').filter(|p| !p.is_empty()).map(str::to_string).collect()
}

/// Whether `url` is https, or http to a loopback host.
pub fn acceptable_url(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host =
        host.rsplit_once(':').map_or(host, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { host });
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

impl OidcVerifier {
    /// A verifier from the flags, or `None` when no issuer is configured.
    pub fn from_args(args: &OidcArgs, http: reqwest::Client) -> Result<Option<Self>, OidcConfigError> {
        let Some(issuer) = args.oidc_issuer.clone().filter(|i| !i.is_empty()) else { return Ok(None) };
        if !acceptable_url(&issuer) {
            return Err(OidcConfigError::Issuer);
        }
        let audiences: Vec<String> = args.oidc_audiences.iter().filter(|a| !a.is_empty()).cloned().collect();
        if audiences.is_empty() {
            return Err(OidcConfigError::NoAudience);
        }
        let mut algorithms = Vec::new();
        for name in args.oidc_algorithms.iter().filter(|a| !a.is_empty()) {
            let algorithm = match name.trim() {
                "RS256" => Algorithm::RS256,
                "PS256" => Algorithm::PS256,
                "ES256" => Algorithm::ES256,
                "EdDSA" => Algorithm::EdDSA,
                other => return Err(OidcConfigError::Algorithm(other.to_string())),
            };
            algorithms.push(algorithm);
        }
        if algorithms.is_empty() {
            return Err(OidcConfigError::Algorithm(String::new()));
        }
        Ok(Some(Self {
            issuer: issuer.trim_end_matches('/').to_string(),
            audiences,
            groups_claim: claim_path(&args.oidc_groups_claim),
            user_claim: claim_path(&args.oidc_user_claim),
            algorithms,
            leeway: args.oidc_leeway_seconds,
            min_refresh: Duration::from_secs(args.oidc_jwks_min_refresh_seconds),
            max_age: Duration::from_secs(args.oidc_jwks_max_age_seconds.max(60)),
            http,
            keys: RwLock::new(Keys { by_kid: HashMap::new(), fetched_at: None, last_attempt: None }),
            refreshing: Mutex::new(()),
            discovery: Mutex::new(None),
        }))
    }

    /// Whether bearer tokens for `audience` are accepted.
    pub fn accepts_audience(&self, audience: &str) -> bool {
        self.audiences.iter().any(|a| a == audience)
    }

    /// Verifies `token` and reads the user and groups from it.
    pub async fn verify(&self, token: &str) -> Result<VerifiedUser, TokenError> {
        let claims = self.decode(token, &self.audiences).await?;
        self.user_of(&claims)
    }

    /// Verifies an ID token from the bridged login: audience is Portcullis's client id at the
    /// identity provider, and the `nonce` must be the one sent.
    pub async fn verify_id_token(&self, token: &str, client_id: &str, nonce: &str) -> Result<VerifiedUser, TokenError> {
        let claims = self.decode(token, &[client_id.to_string()]).await?;
        if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
            return Err(TokenError::Malformed);
        }
        self.user_of(&claims)
    }

    /// The identity provider's authorization and token endpoints, from discovery.
    pub async fn endpoints(&self) -> Result<(String, String), String> {
        let discovery = self.discovery().await?;
        let get = |name: &str| {
            discovery[name]
                .as_str()
                .filter(|u| acceptable_url(u))
                .map(str::to_string)
                .ok_or_else(|| format!("discovery has no usable {name}"))
        };
        Ok((get("authorization_endpoint")?, get("token_endpoint")?))
    }

    async fn decode(&self, token: &str, audiences: &[String]) -> Result<Value, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.clone().unwrap_or_default();
        let (jwk, key) = self.key_for(&kid).await?;
        if !key_fits(&jwk, header.alg) {
            return Err(TokenError::Algorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer, &format!("{}/", self.issuer)]);
        validation.set_audience(audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::Issuer,
                ErrorKind::InvalidAudience => TokenError::Audience,
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::Algorithm,
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => TokenError::Audience,
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => TokenError::Issuer,
                _ => TokenError::Malformed,
            }
        })?;
        Ok(data.claims)
    }

    fn user_of(&self, claims: &Value) -> Result<VerifiedUser, TokenError> {
        let user = lookup(claims, &self.user_claim)
            .and_then(|v| v.as_str().map(str::to_string))
            .filter(|u| !u.is_empty())
            .ok_or(TokenError::NoUser)?;
        let groups = match lookup(claims, &self.groups_claim) {
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        Ok(VerifiedUser { user, groups })
    }

    async fn key_for(&self, kid: &str) -> Result<(Jwk, DecodingKey), TokenError> {
        {
            let keys = self.keys.read().await;
            let fresh = keys.fetched_at.is_some_and(|at| at.elapsed() < self.max_age);
            if fresh && let Some(found) = find(&keys.by_kid, kid) {
                return Ok(found);
            }
        }
        // Unknown kid or stale keys: refresh, at most once per min_refresh (stale keys once per
        // max_age), one fetch at a time.
        let _flight = self.refreshing.lock().await;
        let due = {
            let keys = self.keys.read().await;
            if let Some(found) = find(&keys.by_kid, kid)
                && keys.fetched_at.is_some_and(|at| at.elapsed() < self.max_age)
            {
                return Ok(found);
            }
            keys.last_attempt.is_none_or(|at| at.elapsed() >= self.min_refresh)
        };
        let mut unreachable = false;
        if due {
            let fetched = self.fetch_jwks().await;
            let mut keys = self.keys.write().await;
            keys.last_attempt = Some(Instant::now());
            match fetched {
                Ok(set) => {
                    keys.by_kid = set;
                    keys.fetched_at = Some(Instant::now());
                }
                Err(error) => {
                    tracing::warn!(%error, issuer = %self.issuer, "Cannot refresh the identity provider's JWKS");
                    unreachable = true;
                }
            }
        }
        let keys = self.keys.read().await;
        match find(&keys.by_kid, kid) {
            Some(found) => Ok(found),
            None if unreachable => Err(TokenError::IdpUnreachable),
            None => Err(TokenError::UnknownKey),
        }
    }

    async fn discovery(&self) -> Result<Value, String> {
        let mut cached = self.discovery.lock().await;
        if let Some(d) = cached.clone() {
            return Ok(d);
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let discovery: Value = self.get_json(&url).await?;
        let issuer = discovery["issuer"].as_str().unwrap_or_default().trim_end_matches('/');
        if issuer != self.issuer {
            return Err(format!("discovery names issuer {issuer:?}, not the configured one"));
        }
        *cached = Some(discovery.clone());
        Ok(discovery)
    }

    async fn fetch_jwks(&self) -> Result<HashMap<String, (Jwk, DecodingKey)>, String> {
        let discovery = self.discovery().await?;
        let uri = discovery["jwks_uri"].as_str().ok_or("discovery has no jwks_uri")?.to_string();
        if !acceptable_url(&uri) {
            return Err("jwks_uri is not https".into());
        }
        let set: JwkSet = serde_json::from_value(self.get_json(&uri).await?).map_err(|e| format!("bad JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in set.keys {
            // Signing keys only; a key the library cannot use is skipped, not fatal.
            if matches!(jwk.common.public_key_use, Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)) {
                continue;
            }
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(jwk.common.key_id.clone().unwrap_or_default(), (jwk, key));
            }
        }
        Ok(keys)
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let response = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status()));
        }
        let bytes = response.bytes().await.map_err(|e| format!("GET {url}: {}", e.without_url()))?;
        if bytes.len() > 1 << 20 {
            return Err(format!("GET {url}: answer over 1 MiB"));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("GET {url}: not JSON: {e}"))
    }
}

fn find(keys: &HashMap<String, (Jwk, DecodingKey)>, kid: &str) -> Option<(Jwk, DecodingKey)> {
    if let Some(found) = keys.get(kid) {
        return Some(found.clone());
    }
    // A token without a kid is accepted only when the set has exactly one key.
    if kid.is_empty() && keys.len() == 1 {
        return keys.values().next().cloned();
    }
    None
}

/// Whether the JWK is a key for `alg`: RSA for RS256/PS256, P-256 for ES256, Ed25519 for EdDSA.
/// This closes algorithm confusion (an RSA public key used as an HMAC secret, and the like).
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(declared) = jwk.common.key_algorithm
        && format!("{declared:?}") != format!("{alg:?}")
    {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::PS256) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            matches!(ec.curve, jsonwebtoken::jwk::EllipticCurve::P256)
        }
        (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA) => {
            matches!(okp.curve, jsonwebtoken::jwk::EllipticCurve::Ed25519)
        }
        _ => false,
    }
}

fn lookup<'a>(claims: &'a Value, path: &[String]) -> Option<&'a Value> {
    // A claim named with dots (`https://example.com/groups`) is tried whole first.
    let whole = path.join(".");
    if let Some(v) = claims.get(&whole) {
        return Some(v);
    }
    path.iter().try_fold(claims, |value, part| value.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_is_acceptable() {
        assert!(acceptable_url("https://idp.example.com/realms/acme"));
        assert!(acceptable_url("http://127.0.0.1:8080/realms/acme"));
        assert!(acceptable_url("http://localhost/x"));
        assert!(!acceptable_url("http://idp.example.com"));
        assert!(!acceptable_url("http://127.0.0.1.evil.com/"));
        assert!(!acceptable_url("ftp://localhost"));
    }

    #[test]
    fn claims_are_found_by_path_or_by_their_whole_dotted_name() {
        let claims = serde_json::json!({"realm_access": {"roles": ["a"]}, "https://x.io/groups": ["b"]});
        assert_eq!(lookup(&claims, &claim_path("realm_access.roles")), Some(&serde_json::json!(["a"])));
        assert_eq!(lookup(&claims, &claim_path("https://x.io/groups")), Some(&serde_json::json!(["b"])));
        assert_eq!(lookup(&claims, &claim_path("missing.path")), None);
    }

    #[test]
    fn hmac_and_unknown_algorithms_are_refused_at_start() {
        let args = |algs: &str| OidcArgs {
            oidc_issuer: Some("https://idp.example.com".into()),
            oidc_audiences: vec!["portcullis".into()],
            oidc_algorithms: algs.split(',').map(str::to_string).collect(),
            ..OidcArgs::default()
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        assert!(
            matches!(OidcVerifier::from_args(&args("RS256,HS256"), http.clone()), Err(OidcConfigError::Algorithm(a)) if a == "HS256")
        );
        assert!(matches!(OidcVerifier::from_args(&args("none"), http.clone()), Err(OidcConfigError::Algorithm(_))));
        assert!(OidcVerifier::from_args(&args("RS256,ES256"), http.clone()).unwrap().is_some());
        let mut no_audience = args("RS256");
        no_audience.oidc_audiences.clear();
        assert!(matches!(OidcVerifier::from_args(&no_audience, http.clone()), Err(OidcConfigError::NoAudience)));
        let mut plain = args("RS256");
        plain.oidc_issuer = Some("http://idp.example.com".into());
        assert!(matches!(OidcVerifier::from_args(&plain, http), Err(OidcConfigError::Issuer)));
    }
}
