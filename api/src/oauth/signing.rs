//! Portcullis's token signing keys: EC P-256 (ES256) private keys in PKCS#8 PEM files, read
//! from a directory (a mounted Secret). The newest file by name signs; all are published in the
//! JWKS and accepted, so a new key can be added, published, and only later made the signer (and
//! an old one removed once its tokens expired): rotation without downtime. Dev mode generates
//! one key in its data directory.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::Path;

struct Key {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

/// The keys, the last one signing.
pub struct SigningKeys {
    keys: Vec<Key>,
}

/// Why a Portcullis token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Signature, algorithm or key.
    Invalid,
    /// Expired.
    Expired,
    /// Meant for another resource.
    Audience,
}

fn key_from_pem(pem: &str) -> anyhow::Result<Key> {
    let secret =
        p256::SecretKey::from_pkcs8_pem(pem).map_err(|e| anyhow::anyhow!("not an EC P-256 PKCS#8 key: {e}"))?;
    let point = secret.public_key().to_encoded_point(false);
    let (x, y) = (point.x().map(|v| v.to_vec()).unwrap_or_default(), point.y().map(|v| v.to_vec()).unwrap_or_default());
    let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest([x.as_slice(), y.as_slice()].concat())[..12]);
    let (x, y) = (URL_SAFE_NO_PAD.encode(&x), URL_SAFE_NO_PAD.encode(&y));
    let decoding = DecodingKey::from_ec_components(&x, &y)?;
    let jwk = json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid, "x": x, "y": y});
    Ok(Key { kid, encoding: EncodingKey::from_ec_pem(pem.as_bytes())?, decoding, jwk })
}

impl SigningKeys {
    /// Every `*.pem` file of `dir`, in name order.
    pub fn load_dir(dir: &Path) -> anyhow::Result<Self> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .collect();
        files.sort();
        let mut keys = Vec::new();
        for file in &files {
            let pem = std::fs::read_to_string(file)?;
            keys.push(key_from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?);
        }
        anyhow::ensure!(!keys.is_empty(), "{} holds no *.pem signing key", dir.display());
        Ok(Self { keys })
    }

    /// The dev-mode key in `dir/oauth-signing-key.pem`, generated (mode 0600) when missing.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        let keys_dir = dir.join("oauth-keys");
        let path = keys_dir.join("signing-key.pem");
        if !path.exists() {
            std::fs::create_dir_all(&keys_dir)?;
            let secret = p256::SecretKey::random(&mut rand_core::OsRng);
            let pem = secret.to_pkcs8_pem(Default::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
            write_private(&path, pem.as_bytes())?;
        }
        Self::load_dir(&keys_dir)
    }

    /// Signs `claims` with the newest key.
    pub fn sign(&self, claims: &Value) -> String {
        let key = self.keys.last().expect("at least one key");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, claims, &key.encoding).unwrap_or_default()
    }

    /// Verifies a token this server issued for `audience`.
    pub fn verify(&self, token: &str, issuer: &str, audience: &str) -> Result<Value, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid)?;
        if header.alg != Algorithm::ES256 {
            return Err(Refusal::Invalid);
        }
        let kid = header.kid.unwrap_or_default();
        let key = self.keys.iter().find(|k| k.kid == kid).ok_or(Refusal::Invalid)?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 5;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Value>(token, &key.decoding, &validation).map(|d| d.claims).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::InvalidAudience => Refusal::Audience,
                _ => Refusal::Invalid,
            }
        })
    }

    /// Verifies a token this server issued, for any audience (revocation).
    pub fn verify_any_audience(&self, token: &str, issuer: &str) -> Result<Value, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid)?;
        let kid = header.kid.unwrap_or_default();
        let key = self.keys.iter().find(|k| k.kid == kid).ok_or(Refusal::Invalid)?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_aud = false;
        validation.set_issuer(&[issuer]);
        jsonwebtoken::decode::<Value>(token, &key.decoding, &validation).map(|d| d.claims).map_err(|_| Refusal::Invalid)
    }

    /// The JWKS document.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(contents)
    }
    #[cfg(not(unix))]
    std::fs::write(path, contents)
}

/// The unverified claims of a JWT: only to route it to the right verifier, never to trust.
pub fn peek_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The unverified `iss` of a JWT.
pub fn peek_issuer(token: &str) -> Option<String> {
    peek_claims(token)?.get("iss")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_for_their_audience_only_and_keys_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        let now = chrono::Utc::now().timestamp();
        let claims = json!({"iss": "https://gw", "aud": "https://gw/mcp/a/x", "sub": "ann", "exp": now + 60});
        let token = keys.sign(&claims);
        assert_eq!(keys.verify(&token, "https://gw", "https://gw/mcp/a/x").unwrap()["sub"], "ann");
        assert_eq!(keys.verify(&token, "https://gw", "https://gw/mcp/b/x"), Err(Refusal::Audience));
        assert_eq!(keys.verify(&token, "https://other", "https://gw/mcp/a/x"), Err(Refusal::Invalid));
        assert_eq!(peek_issuer(&token).as_deref(), Some("https://gw"));
        // A second key added later signs; tokens of the first still verify.
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = secret.to_pkcs8_pem(Default::default()).unwrap();
        std::fs::write(dir.path().join("oauth-keys/zz-next.pem"), pem.as_bytes()).unwrap();
        let rotated = SigningKeys::load_dir(&dir.path().join("oauth-keys")).unwrap();
        assert_eq!(rotated.jwks()["keys"].as_array().unwrap().len(), 2);
        assert!(rotated.verify(&token, "https://gw", "https://gw/mcp/a/x").is_ok());
        let new_token = rotated.sign(&claims);
        assert_ne!(
            jsonwebtoken::decode_header(&new_token).unwrap().kid,
            jsonwebtoken::decode_header(&token).unwrap().kid
        );
        let expired = keys.sign(&json!({"iss": "https://gw", "aud": "a", "sub": "ann", "exp": now - 60}));
        assert_eq!(keys.verify(&expired, "https://gw", "a"), Err(Refusal::Expired));
    }
}
