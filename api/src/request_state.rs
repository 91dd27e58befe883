//! The `requestState` Portcullis hands to 2026-07-28 clients in `input_required` results
//! (multi round-trip requests). The client echoes it on its retry, possibly to another replica,
//! so it carries everything needed: the upstream's own request state, sealed (ChaCha20-Poly1305,
//! so it is tamper-evident and unreadable), bound to the caller, endpoint, method and name it was
//! issued for, and expiring. The MCP specification asks servers to treat request state as
//! untrusted and to bind and expire it; this is that.

use base64::Engine;
use chrono::{DateTime, Utc};
use portcullis_store::secret_box::SecretKey;
use serde::{Deserialize, Serialize};

/// How long a client has to answer an `input_required` result.
pub const LIFETIME: chrono::Duration = chrono::Duration::minutes(10);

const PREFIX: &str = "pcs1.";

/// What a request state is bound to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    /// Tenant of the endpoint.
    pub tenant: String,
    /// The caller's subject.
    pub subject: String,
    /// Endpoint name.
    pub endpoint: String,
    /// `tools/call`, `prompts/get` or `resources/read`.
    pub method: String,
    /// Tool or prompt name, or resource URI, as the caller named it.
    pub name: String,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    binding: Binding,
    expires: DateTime<Utc>,
    upstream: Option<String>,
}

/// Why a request state was refused. Deliberately one message for all causes.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("requestState is invalid, expired, or was issued for another request")]
pub struct Refused;

/// Seals `upstream` (the upstream's own request state, if it gave one) for `binding`.
pub fn seal(key: &SecretKey, binding: &Binding, upstream: Option<&str>, now: DateTime<Utc>) -> String {
    let sealed = Sealed { binding: binding.clone(), expires: now + LIFETIME, upstream: upstream.map(str::to_string) };
    let plaintext = serde_json::to_vec(&sealed).unwrap_or_default();
    format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.seal(&plaintext)))
}

/// Opens a request state for a retry bound as `binding`: the upstream's request state, if any.
pub fn open(key: &SecretKey, binding: &Binding, token: &str, now: DateTime<Utc>) -> Result<Option<String>, Refused> {
    let encoded = token.strip_prefix(PREFIX).ok_or(Refused)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).map_err(|_| Refused)?;
    let plaintext = key.open(&bytes).map_err(|_| Refused)?;
    let sealed: Sealed = serde_json::from_slice(&plaintext).map_err(|_| Refused)?;
    if sealed.binding != *binding || sealed.expires <= now {
        return Err(Refused);
    }
    Ok(sealed.upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            tenant: "acme".into(),
            subject: "apikey:a".into(),
            endpoint: "tools".into(),
            method: "tools/call".into(),
            name: "ask".into(),
        }
    }

    fn key() -> SecretKey {
        SecretKey::from_text("0123456789abcdef0123456789abcdef-test-key").unwrap()
    }

    #[test]
    fn a_state_opens_only_for_its_binding_key_and_lifetime() {
        let now = Utc::now();
        let token = seal(&key(), &binding(), Some("upstream-state"), now);
        assert!(!token.contains("upstream-state"), "the upstream's state is not readable");
        assert_eq!(open(&key(), &binding(), &token, now), Ok(Some("upstream-state".into())));
        assert_eq!(open(&key(), &binding(), &seal(&key(), &binding(), None, now), now), Ok(None));
        // Another caller, endpoint, tool: refused.
        for other in [
            Binding { subject: "apikey:b".into(), ..binding() },
            Binding { endpoint: "other".into(), ..binding() },
            Binding { name: "other".into(), ..binding() },
            Binding { tenant: "other".into(), ..binding() },
        ] {
            assert_eq!(open(&key(), &other, &token, now), Err(Refused));
        }
        // Expired, tampered, another key, garbage: refused.
        assert_eq!(open(&key(), &binding(), &token, now + LIFETIME), Err(Refused));
        assert_eq!(open(&key(), &binding(), &format!("{token}-TAMPERED"), now), Err(Refused));
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(open(&key(), &binding(), &String::from_utf8(flipped).unwrap(), now), Err(Refused));
        let other_key = SecretKey::from_text("another-key-another-key-another-key-1234").unwrap();
        assert_eq!(open(&other_key, &binding(), &token, now), Err(Refused));
        assert_eq!(open(&key(), &binding(), "upstream-state", now), Err(Refused));
    }
}
