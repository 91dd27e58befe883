//! ApiKey Secrets: when to mint, when to rotate, and the Secret to write. Decisions are pure;
//! `kube_io` applies them. The key lives only in the Secret: status, events and logs carry the
//! key id at most.

use base64::Engine;
use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use portcullis_crds::ApiKey;
use portcullis_crds::compile::parse_duration;
use portcullis_crds::keys;
use rand::RngCore;
use std::collections::BTreeMap;

/// Label on every Secret the operator writes, so they are easy to find (and to watch).
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "portcullis-operator");

/// What to do about an ApiKey's Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyAction {
    /// Nothing now; rotate at the given time, if rotation is configured.
    Keep {
        /// When the next rotation is due.
        next_rotation: Option<DateTime<Utc>>,
    },
    /// Write a fresh key (no Secret yet, or an operator-owned Secret without a valid key).
    Mint,
    /// Write a fresh key and keep the current one valid until `previous_valid_until`.
    Rotate {
        /// When the replaced key stops working.
        previous_valid_until: DateTime<Utc>,
    },
    /// The Secret exists, was not written by this operator for this ApiKey, and holds no valid
    /// key: it is left alone (the compiler reports the key as not working).
    LeaveForeign,
}

/// Decides what to do about `apikey`'s Secret at `now`.
pub fn decide(apikey: &ApiKey, secret: Option<&Secret>, now: DateTime<Utc>) -> KeyAction {
    let Some(secret) = secret else { return KeyAction::Mint };
    let owned = owned_by(secret, apikey);
    let current = value(secret, keys::SECRET_KEY);
    let valid = current.as_deref().is_some_and(|k| keys::looks_like_key(k) && k.len() >= keys::MIN_KEY_LEN);
    if !valid {
        return if owned { KeyAction::Mint } else { KeyAction::LeaveForeign };
    }
    // Keys the user provides (a Secret not owned by the ApiKey) are never rotated by us.
    let rotation = apikey.spec.rotation.as_ref().filter(|_| owned);
    let Some(rotation) = rotation else { return KeyAction::Keep { next_rotation: None } };
    let (Some(every), Some(overlap)) = (parse_duration(&rotation.every), parse_duration(&rotation.overlap)) else {
        return KeyAction::Keep { next_rotation: None };
    };
    let (Ok(every), Ok(overlap)) = (chrono::Duration::from_std(every), chrono::Duration::from_std(overlap)) else {
        return KeyAction::Keep { next_rotation: None };
    };
    let minted_at = value(secret, keys::SECRET_MINTED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    match minted_at {
        // Without a mint time the age is unknown: rotate now, so the schedule has a start.
        None => KeyAction::Rotate { previous_valid_until: now + overlap },
        Some(minted) if minted + every <= now => KeyAction::Rotate { previous_valid_until: now + overlap },
        Some(minted) => KeyAction::Keep { next_rotation: Some(minted + every) },
    }
}

/// A new random key: the prefix and 256 bits of base64url randomness.
pub fn mint() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}{}", keys::KEY_PREFIX, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The Secret to write for `action` (Mint or Rotate), owned by the ApiKey so deleting the ApiKey
/// deletes it. `new_key` is the freshly minted key.
pub fn desired_secret(
    apikey: &ApiKey,
    existing: Option<&Secret>,
    action: &KeyAction,
    new_key: &str,
    now: DateTime<Utc>,
) -> Option<Secret> {
    let mut data = BTreeMap::new();
    data.insert(keys::SECRET_KEY.to_string(), bytes(new_key));
    data.insert(keys::SECRET_MINTED_AT.to_string(), bytes(&now.to_rfc3339()));
    match action {
        KeyAction::Mint => {}
        KeyAction::Rotate { previous_valid_until } => {
            let previous = existing.and_then(|s| value(s, keys::SECRET_KEY))?;
            data.insert(keys::SECRET_PREVIOUS_KEY.to_string(), bytes(&previous));
            data.insert(keys::SECRET_PREVIOUS_VALID_UNTIL.to_string(), bytes(&previous_valid_until.to_rfc3339()));
        }
        KeyAction::Keep { .. } | KeyAction::LeaveForeign => return None,
    }
    let owner = owner_reference(apikey)?;
    Some(Secret {
        metadata: ObjectMeta {
            name: Some(apikey.spec.secret_name.clone()),
            namespace: apikey.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.0.to_string(), MANAGED_BY_LABEL.1.to_string()),
                ("portcullis.dev/api-key".to_string(), apikey.metadata.name.clone().unwrap_or_default()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    })
}

fn owner_reference(apikey: &ApiKey) -> Option<OwnerReference> {
    let mut owner = apikey.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

/// Whether `secret` is owned by `apikey` (by uid).
pub fn owned_by(secret: &Secret, apikey: &ApiKey) -> bool {
    let uid = apikey.metadata.uid.as_deref();
    uid.is_some() && secret.metadata.owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == uid)
}

/// A text value of a Secret, from `data` or `stringData`.
pub fn value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(bytes.0.clone()).ok();
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}

fn bytes(text: &str) -> ByteString {
    ByteString(text.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use portcullis_crds::kinds::{ApiKeySpec, Rotation};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).single().expect("valid time")
    }

    fn apikey(rotation: Option<(&str, &str)>) -> ApiKey {
        let mut k = ApiKey::new(
            "ci",
            ApiKeySpec {
                persona: "analyst".into(),
                secret_name: "ci-key".into(),
                expires_at: None,
                rotation: rotation.map(|(every, overlap)| Rotation { every: every.into(), overlap: overlap.into() }),
                description: None,
            },
        );
        k.metadata.namespace = Some("acme".into());
        k.metadata.uid = Some("uid-1".into());
        k
    }

    fn minted(apikey: &ApiKey, at: DateTime<Utc>) -> Secret {
        desired_secret(apikey, None, &KeyAction::Mint, "pcl_firstfirstfirstfirstfirstfirst", at).expect("a secret")
    }

    #[test]
    fn a_missing_secret_is_minted_owned_by_the_key() {
        let k = apikey(None);
        assert_eq!(decide(&k, None, now()), KeyAction::Mint);
        let secret = minted(&k, now());
        assert!(owned_by(&secret, &k));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("ApiKey", "ci", Some(true)));
        assert_eq!(secret.metadata.name.as_deref(), Some("ci-key"));
        assert_eq!(decide(&k, Some(&secret), now()), KeyAction::Keep { next_rotation: None });
        assert!(mint().starts_with("pcl_") && mint().len() >= keys::MIN_KEY_LEN && mint() != mint());
    }

    #[test]
    fn rotation_is_due_after_every_and_keeps_the_old_key_for_the_overlap() {
        let k = apikey(Some(("720h", "24h")));
        let secret = minted(&k, now());
        let due = now() + chrono::Duration::hours(720);
        assert_eq!(decide(&k, Some(&secret), now()), KeyAction::Keep { next_rotation: Some(due) });
        let action = decide(&k, Some(&secret), due);
        assert_eq!(action, KeyAction::Rotate { previous_valid_until: due + chrono::Duration::hours(24) });
        let rotated = desired_secret(&k, Some(&secret), &action, "pcl_secondsecondsecondsecondsecond", due).unwrap();
        assert_eq!(value(&rotated, keys::SECRET_KEY).as_deref(), Some("pcl_secondsecondsecondsecondsecond"));
        assert_eq!(value(&rotated, keys::SECRET_PREVIOUS_KEY).as_deref(), Some("pcl_firstfirstfirstfirstfirstfirst"));
        assert_eq!(
            decide(&k, Some(&rotated), due),
            KeyAction::Keep { next_rotation: Some(due + chrono::Duration::hours(720)) }
        );
    }

    #[test]
    fn user_provided_secrets_are_never_overwritten_or_rotated() {
        let k = apikey(Some(("1h", "10m")));
        let mut foreign = minted(&k, now() - chrono::Duration::hours(5));
        foreign.metadata.owner_references = None;
        assert_eq!(decide(&k, Some(&foreign), now()), KeyAction::Keep { next_rotation: None });
        foreign.data.as_mut().unwrap().insert(keys::SECRET_KEY.into(), bytes("not-a-key"));
        assert_eq!(decide(&k, Some(&foreign), now()), KeyAction::LeaveForeign);
        let mut owned_but_broken = minted(&k, now());
        owned_but_broken.data.as_mut().unwrap().remove(keys::SECRET_KEY);
        assert_eq!(decide(&k, Some(&owned_but_broken), now()), KeyAction::Mint);
    }
}
