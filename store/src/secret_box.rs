//! Encryption at rest of the secret values a snapshot carries (upstream credentials), with a key
//! both publisher and API pods are given (`PORTCULLIS_SECRET_KEY`). ChaCha20-Poly1305 with a
//! random nonce per message: tampering or a wrong key fails to open, never yields garbage.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The snapshot encryption key.
#[derive(Clone)]
pub struct SecretKey(Key);

/// Why a key or a sealed value cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SecretBoxError {
    /// The configured key is too short to be a secret.
    #[error("the snapshot encryption key must be at least 32 characters (for example `openssl rand -base64 32`)")]
    WeakKey,
    /// Wrong key, or the data was altered.
    #[error("cannot decrypt the snapshot's secret values: wrong PORTCULLIS_SECRET_KEY, or the data was altered")]
    Open,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

const NONCE_LEN: usize = 12;

impl SecretKey {
    /// Derives the 256-bit key from the configured text (high-entropy, at least 32 characters).
    pub fn from_text(text: &str) -> Result<Self, SecretBoxError> {
        let text = text.trim();
        if text.len() < 32 {
            return Err(SecretBoxError::WeakKey);
        }
        let digest = Sha256::digest(format!("portcullis snapshot key v1\n{text}").as_bytes());
        Ok(Self(Key::from(<[u8; 32]>::from(digest))))
    }

    /// Encrypts: nonce followed by ciphertext and tag.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let cipher = ChaCha20Poly1305::new(&self.0);
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        let sealed = cipher.encrypt(&Nonce::from(nonce), plaintext).unwrap_or_default();
        [nonce.as_slice(), &sealed].concat()
    }

    /// Decrypts what `seal` produced.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SecretBoxError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretBoxError::Open);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretBoxError::Open)?;
        ChaCha20Poly1305::new(&self.0).decrypt(&Nonce::from(nonce), ciphertext).map_err(|_| SecretBoxError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_detects_tampering_and_wrong_keys() {
        let key = SecretKey::from_text("0123456789abcdef0123456789abcdef").unwrap();
        let sealed = key.seal(b"Bearer upstream-token");
        assert!(!sealed.windows(8).any(|w| w == b"upstream"), "plaintext visible");
        assert_eq!(key.open(&sealed).unwrap(), b"Bearer upstream-token");
        assert_ne!(key.seal(b"x"), key.seal(b"x"), "nonces repeat");
        let mut altered = sealed.clone();
        altered[20] ^= 1;
        assert!(key.open(&altered).is_err());
        let other = SecretKey::from_text("another key that is long enough!!").unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(matches!(SecretKey::from_text("short"), Err(SecretBoxError::WeakKey)));
        assert!(!format!("{key:?}").contains("0123"));
    }
}
