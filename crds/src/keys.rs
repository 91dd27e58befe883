//! API key format, digests and key ids. Keys are compared by digest, never by plaintext.

use sha2::{Digest, Sha256};

/// Every Portcullis API key starts with this, so scanners and people recognise it.
pub const KEY_PREFIX: &str = "pcl_";
/// Shortest key accepted (prefix plus at least 128 bits of base64url randomness).
pub const MIN_KEY_LEN: usize = KEY_PREFIX.len() + 22;

/// Data key of an ApiKey's Secret holding the current key.
pub const SECRET_KEY: &str = "key";
/// Data key holding the key replaced by the last rotation, valid until `previousKeyValidUntil`.
pub const SECRET_PREVIOUS_KEY: &str = "previousKey";
/// Data key holding when the previous key stops working (RFC 3339).
pub const SECRET_PREVIOUS_VALID_UNTIL: &str = "previousKeyValidUntil";
/// Data key holding when the current key was minted (RFC 3339); rotation counts from it.
pub const SECRET_MINTED_AT: &str = "mintedAt";

/// Hex SHA-256 of a key: the only form in which stores and snapshots hold keys.
pub fn digest(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Public identifier of a key, derived from its digest; safe to log and show.
pub fn key_id(digest: &str) -> String {
    format!("key_{}", &digest[..16.min(digest.len())])
}

/// Whether `candidate` has the shape of a Portcullis key (used to route `Authorization: Bearer`).
pub fn looks_like_key(candidate: &str) -> bool {
    candidate.starts_with(KEY_PREFIX)
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    // By table, not by `write!` per byte: every request with an API key digests it.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0x0f)] as char);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
        // The SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        assert_eq!(hex(&Sha256::digest(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn digest_is_stable_and_distinct() {
        let a = digest("pcl_aaaaaaaaaaaaaaaaaaaaaaaaaaaa");
        assert_eq!(a, digest("pcl_aaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert_ne!(a, digest("pcl_aaaaaaaaaaaaaaaaaaaaaaaaaaab"));
        assert_eq!(a.len(), 64);
        assert!(key_id(&a).starts_with("key_"));
        assert!(!key_id(&a).contains("pcl_"));
    }
}
