//! The key ring: which key signs, which keys still verify, and the JWKS.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;

use crate::{B64, LEEWAY_SECS, SigningKey, TokenError};

/// The signing key and the older keys that still verify.
///
/// Cheap to clone (the keys are shared behind an `Arc`), `Send` and `Sync`.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Ring>,
}

struct Ring {
    /// The newest key; it signs and always verifies.
    signer: SigningKey,
    /// The older keys, newest first.
    // INVARIANT: the kids of `signer` and `older` are distinct.
    older: Vec<Entry>,
    /// `BASE64URL({"alg":"EdDSA","typ":"at+jwt","kid":"<signing kid>"})`.
    header_b64: String,
    max_token_lifetime_secs: u64,
}

struct Entry {
    key: SigningKey,
    /// The last unix second at which this key still verifies.
    verifies_until: u64,
}

impl Ring {
    /// Every key with the last second it verifies (`None`: no end), newest
    /// first.
    fn keys(&self) -> impl Iterator<Item = (&SigningKey, Option<u64>)> {
        std::iter::once((&self.signer, None))
            .chain(self.older.iter().map(|e| (&e.key, Some(e.verifies_until))))
    }

    /// The keys still verifying at `now`, newest first.
    fn keys_at(&self, now: u64) -> impl Iterator<Item = &SigningKey> {
        self.keys()
            .filter(move |(_, until)| until.is_none_or(|until| now <= until))
            .map(|(key, _)| key)
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Keys<'a>(&'a Ring);
        impl fmt::Debug for Keys<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(
                        self.0
                            .keys()
                            .map(|(key, until)| (key.kid(), key.created_at(), until)),
                    )
                    .finish()
            }
        }
        f.debug_struct("KeyRing")
            .field("keys (kid, created_at, verifies_until)", &Keys(&self.inner))
            .field(
                "max_token_lifetime_secs",
                &self.inner.max_token_lifetime_secs,
            )
            .finish()
    }
}

impl KeyRing {
    /// A ring of `keys`, of which the newest (largest `created_at`; on a tie,
    /// the later in the `Vec`) signs.
    ///
    /// Each older key keeps verifying until (inclusive) the `created_at` of
    /// the next newer key + `max_token_lifetime_secs` + [`LEEWAY_SECS`]: the
    /// last moment a token it signed can still be accepted, if tokens live
    /// at most `max_token_lifetime_secs` (which [`crate::mint`] enforces).
    /// After that it is dropped from verification and from the JWKS, so old
    /// key files can simply stay in the ring.
    ///
    /// Errors with [`TokenError::KeyRing`] on an empty `keys` or the same key
    /// twice.
    pub fn new(keys: Vec<SigningKey>, max_token_lifetime_secs: u64) -> Result<Self, TokenError> {
        let mut keys = keys;
        for (i, key) in keys.iter().enumerate() {
            if keys
                .iter()
                .skip(i + 1)
                .any(|other| other.kid() == key.kid())
            {
                return Err(TokenError::KeyRing("the same key appears twice"));
            }
        }
        // A stable sort keeps the Vec order among equal `created_at`, so
        // after reversing, the later one of a tie comes first (and signs).
        keys.sort_by_key(SigningKey::created_at);
        keys.reverse();
        let mut keys = keys.into_iter();
        let Some(signer) = keys.next() else {
            return Err(TokenError::KeyRing("no keys"));
        };
        let mut older = Vec::with_capacity(keys.len());
        let mut next_newer = signer.created_at();
        for key in keys {
            let verifies_until = next_newer
                .saturating_add(max_token_lifetime_secs)
                .saturating_add(LEEWAY_SECS);
            next_newer = key.created_at();
            older.push(Entry {
                key,
                verifies_until,
            });
        }
        // INVARIANT: a kid is base64url, so it needs no JSON escaping.
        let header = format!(
            r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{}"}}"#,
            signer.kid()
        );
        let header_b64 = B64.encode(header);
        Ok(Self {
            inner: Arc::new(Ring {
                signer,
                older,
                header_b64,
                max_token_lifetime_secs,
            }),
        })
    }

    /// The `kid` of the key that signs.
    pub fn signing_kid(&self) -> &str {
        self.signing_key().kid()
    }

    /// `{"keys":[…]}`: the public JWK of every key still verifying at `now`,
    /// newest first (RFC 7517).
    pub fn jwks(&self, now: u64) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .inner
            .keys_at(now)
            .map(SigningKey::public_jwk)
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// The longest token lifetime (`exp - iat`) [`crate::mint`] accepts, as
    /// given to [`KeyRing::new`].
    pub fn max_token_lifetime_secs(&self) -> u64 {
        self.inner.max_token_lifetime_secs
    }

    /// The last unix second at which the key `kid` verifies: `Some(None)` for
    /// the signing key (no end yet), `None` for a kid not in the ring. Tells
    /// operators when an old key file can be deleted.
    pub fn verifies_until(&self, kid: &str) -> Option<Option<u64>> {
        self.inner
            .keys()
            .find(|(key, _)| key.kid() == kid)
            .map(|(_, until)| until)
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.inner.signer
    }

    pub(crate) fn signing_header_b64(&self) -> &str {
        &self.inner.header_b64
    }

    /// The key named `kid`, whether or not it still verifies tokens (for
    /// detached signatures, see [`KeyRing::verify_detached`]).
    pub(crate) fn any_key(&self, kid: &str) -> Option<&SigningKey> {
        self.inner
            .keys()
            .map(|(key, _)| key)
            .find(|key| key.kid() == kid)
    }

    /// The key named `kid` if it still verifies at `now`.
    pub(crate) fn verifying_key(&self, kid: &str, now: u64) -> Option<&SigningKey> {
        self.inner.keys_at(now).find(|key| key.kid() == kid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(created: u64) -> SigningKey {
        SigningKey::generate(created).unwrap()
    }

    fn kids(jwks: &serde_json::Value) -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn empty_and_duplicate_rings_are_rejected() {
        assert_eq!(
            KeyRing::new(vec![], 600).unwrap_err(),
            TokenError::KeyRing("no keys")
        );
        let a = key(1);
        let a_again = SigningKey::from_file_text(&a.to_file_text()).unwrap();
        assert!(matches!(
            KeyRing::new(vec![a, a_again], 600),
            Err(TokenError::KeyRing(_))
        ));
    }

    #[test]
    fn newest_key_signs_and_ties_go_to_the_later() {
        let (a, b, c) = (key(100), key(300), key(200));
        let b_kid = b.kid().to_owned();
        let ring = KeyRing::new(vec![a, b, c], 600).unwrap();
        assert_eq!(ring.signing_kid(), b_kid);

        let (x, y) = (key(100), key(100));
        let y_kid = y.kid().to_owned();
        let ring = KeyRing::new(vec![x, y], 600).unwrap();
        assert_eq!(ring.signing_kid(), y_kid);
    }

    #[test]
    fn rotation_windows() {
        let lifetime = 600;
        let (old, mid, new) = (key(1_000), key(2_000), key(3_000));
        let (old_kid, mid_kid, new_kid) = (
            old.kid().to_owned(),
            mid.kid().to_owned(),
            new.kid().to_owned(),
        );
        let ring = KeyRing::new(vec![mid, new, old], lifetime).unwrap();
        assert_eq!(ring.signing_kid(), new_kid);
        let old_until = 2_000 + lifetime + LEEWAY_SECS;
        let mid_until = 3_000 + lifetime + LEEWAY_SECS;
        assert_eq!(ring.verifies_until(&old_kid), Some(Some(old_until)));
        assert_eq!(ring.verifies_until(&mid_kid), Some(Some(mid_until)));
        assert_eq!(ring.verifies_until(&new_kid), Some(None));
        assert_eq!(ring.verifies_until("nope"), None);

        assert_eq!(kids(&ring.jwks(0)), [new_kid.as_str(), &mid_kid, &old_kid]);
        assert_eq!(
            kids(&ring.jwks(old_until)),
            [new_kid.as_str(), &mid_kid, &old_kid]
        );
        assert!(ring.verifying_key(&old_kid, old_until).is_some());
        assert_eq!(
            kids(&ring.jwks(old_until + 1)),
            [new_kid.as_str(), &mid_kid]
        );
        assert!(ring.verifying_key(&old_kid, old_until + 1).is_none());
        assert_eq!(kids(&ring.jwks(mid_until + 1)), [new_kid.as_str()]);
        assert!(ring.verifying_key(&mid_kid, mid_until + 1).is_none());
        assert!(ring.verifying_key(&new_kid, u64::MAX).is_some());
        assert_eq!(kids(&ring.jwks(u64::MAX)), [new_kid.as_str()]);
    }

    #[test]
    fn windows_saturate() {
        let ring = KeyRing::new(vec![key(1), key(u64::MAX - 5)], u64::MAX).unwrap();
        assert_eq!(kids(&ring.jwks(u64::MAX)).len(), 2);
    }

    #[test]
    fn jwks_members_and_debug() {
        let k = key(7);
        let expected = k.public_jwk();
        let ring = KeyRing::new(vec![k], 600).unwrap();
        assert_eq!(ring.jwks(7), serde_json::json!({ "keys": [expected] }));
        let debug = format!("{ring:?}");
        assert!(debug.contains(ring.signing_kid()));
        assert_eq!(ring.max_token_lifetime_secs(), 600);
    }

    #[test]
    fn ring_is_shareable() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<KeyRing>();
    }
}
