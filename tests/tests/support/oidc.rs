//! A local OIDC provider for the tests: discovery, a JWKS with real RSA (2048) and EC (P-256)
//! keys, keys that can be rotated in, an outage switch, and a count of JWKS fetches. Tokens are
//! signed in process with the provider's private keys.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One signing key of the provider.
#[derive(Clone)]
pub struct SigningKey {
    /// Key id.
    pub kid: String,
    /// Algorithm it signs with.
    pub alg: Algorithm,
    encoding: EncodingKey,
    /// Public JWK.
    pub jwk: Value,
}

impl SigningKey {
    /// A fresh RSA 2048 key (RS256).
    pub fn rsa(kid: &str) -> Self {
        use rsa::pkcs8::EncodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("RSA key");
        let pem = private.to_pkcs8_pem(Default::default()).expect("PEM");
        let public = private.to_public_key();
        let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()), "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be())});
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            jwk,
        }
    }

    /// A fresh P-256 key (ES256).
    pub fn ec(kid: &str) -> Self {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::EncodePrivateKey;
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = secret.to_pkcs8_pem(Default::default()).expect("PEM");
        let point = secret.public_key().to_encoded_point(false);
        let jwk = json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(point.y().unwrap())});
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            jwk,
        }
    }

    /// Signs `claims` with this key and its kid.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

struct Inner {
    issuer: String,
    published: Mutex<Vec<Value>>,
    jwks_fetches: AtomicUsize,
    down: AtomicBool,
    signer: Mutex<Option<SigningKey>>,
    /// The user the authorize endpoint signs in: (user, groups).
    login: Mutex<(String, Vec<String>)>,
    /// Issued codes: code → (client_id, redirect_uri, challenge, nonce, user, groups).
    codes: Mutex<std::collections::HashMap<String, Value>>,
}

/// Portcullis's client credentials at this provider.
pub const IDP_CLIENT_ID: &str = "portcullis";
/// Its secret.
pub const IDP_CLIENT_SECRET: &str = "idp-secret-for-tests";

/// The running provider.
pub struct Idp {
    inner: Arc<Inner>,
    /// RSA key, published.
    pub rsa: SigningKey,
    /// EC key, published.
    pub ec: SigningKey,
}

impl Idp {
    /// Starts the provider on a free local port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://127.0.0.1:{}/realms/test", listener.local_addr().unwrap().port());
        let rsa = SigningKey::rsa("rsa-1");
        let ec = SigningKey::ec("ec-1");
        let inner = Arc::new(Inner {
            issuer,
            published: Mutex::new(vec![rsa.jwk.clone(), ec.jwk.clone()]),
            jwks_fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            signer: Mutex::new(Some(rsa.clone())),
            login: Mutex::new(("ann".into(), vec!["analysts".into()])),
            codes: Mutex::default(),
        });
        let app = Router::new()
            .route("/realms/test/.well-known/openid-configuration", get(discovery))
            .route("/realms/test/jwks", get(jwks))
            .route("/realms/test/authorize", get(authorize))
            .route("/realms/test/token", axum::routing::post(token))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Idp { inner, rsa, ec }
    }

    /// The issuer URL.
    pub fn issuer(&self) -> String {
        self.inner.issuer.clone()
    }

    /// Publishes another key (a rotation at the IdP).
    pub fn publish(&self, key: &SigningKey) {
        self.inner.published.lock().unwrap().push(key.jwk.clone());
    }

    /// Who the authorize endpoint signs in next.
    pub fn set_login(&self, user: &str, groups: &[&str]) {
        *self.inner.login.lock().unwrap() = (user.into(), groups.iter().map(|g| g.to_string()).collect());
    }

    /// Makes the provider answer 503 to everything (or recover).
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// JWKS fetches so far.
    pub fn jwks_fetches(&self) -> usize {
        self.inner.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Standard claims for `user` in `groups`, valid for five minutes, for audience `aud`.
    pub fn claims(&self, user: &str, groups: &[&str], aud: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"iss": self.issuer(), "sub": user, "aud": aud, "iat": now, "nbf": now - 5, "exp": now + 300,
            "email": format!("{user}@example.com"), "groups": groups})
    }
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Response {
    if inner.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    axum::Json(json!({
        "issuer": inner.issuer,
        "jwks_uri": format!("{}/jwks", inner.issuer),
        "authorization_endpoint": format!("{}/authorize", inner.issuer),
        "token_endpoint": format!("{}/token", inner.issuer),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
    .into_response()
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Response {
    if inner.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    inner.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({"keys": *inner.published.lock().unwrap()})).into_response()
}

async fn authorize(
    State(inner): State<Arc<Inner>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    // Signs the configured test user in at once, as a real IdP would after its login form.
    if q.get("client_id").map(String::as_str) != Some(IDP_CLIENT_ID)
        || q.get("code_challenge_method").map(String::as_str) != Some("S256")
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let (user, groups) = inner.login.lock().unwrap().clone();
    let code = format!("idp-code-{}", uuid_like());
    inner.codes.lock().unwrap().insert(
        code.clone(),
        json!({"redirect_uri": q["redirect_uri"], "challenge": q["code_challenge"], "nonce": q.get("nonce"),
               "user": user, "groups": groups}),
    );
    let mut target = reqwest::Url::parse(&q["redirect_uri"]).unwrap();
    target.query_pairs_mut().append_pair("code", &code).append_pair("state", &q["state"]);
    (StatusCode::FOUND, [(axum::http::header::LOCATION, target.to_string())]).into_response()
}

async fn token(State(inner): State<Arc<Inner>>, body: String) -> Response {
    let form: std::collections::HashMap<String, String> =
        reqwest::Url::parse(&format!("http://x/?{body}")).unwrap().query_pairs().into_owned().collect();
    let Some(grant) = form.get("code").and_then(|c| inner.codes.lock().unwrap().remove(c)) else {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant"}))).into_response();
    };
    use sha2::Digest;
    let verifier = form.get("code_verifier").cloned().unwrap_or_default();
    let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let ok = form.get("client_id").map(String::as_str) == Some(IDP_CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(IDP_CLIENT_SECRET)
        && grant["challenge"] == challenge
        && form.get("redirect_uri").map(String::as_str) == grant["redirect_uri"].as_str();
    if !ok {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant"}))).into_response();
    }
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": inner.issuer, "aud": IDP_CLIENT_ID, "sub": grant["user"], "nonce": grant["nonce"],
        "groups": grant["groups"], "iat": now, "exp": now + 300});
    let signer = inner.signer.lock().unwrap().clone().unwrap();
    axum::Json(json!({"access_token": "opaque", "token_type": "Bearer", "id_token": signer.sign(&claims)}))
        .into_response()
}

fn uuid_like() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}
