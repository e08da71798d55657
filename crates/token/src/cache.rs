//! A bounded cache of verified tokens, so the call path pays for decoding and
//! the Ed25519 check once per token rather than once per call.

use std::collections::HashMap;
use std::fmt;
use std::sync::{PoisonError, RwLock};

use crate::jws::{self, Verified};
use crate::{Claims, Expect, KeyRing, MAX_TOKEN_BYTES, TokenError};

/// Cache of verified signatures, keyed by the whole token text.
///
/// An entry is kept until its token's `exp`. A hit skips
/// only rules 1–10 of the crate documentation (decoding, header, signature,
/// claim types); it still requires the signing key to be verifying in the
/// `ring` passed in at `expect.now` (so a key removed from the ring stops its
/// cached tokens at once), and still checks issuer, audience, `exp`, `nbf`
/// and `iat` against `expect`. Only tokens that fully verified are cached.
///
/// Bounded: it never holds more than `capacity` entries. When full, expired
/// entries are dropped; if it is still full, it is cleared. Keys are the
/// exact token bytes (no hash collisions to reason about); the map uses the
/// standard library's randomly keyed SipHash, so crafted tokens cannot
/// degrade it. Thread-safe: all methods take `&self`.
pub struct VerifyCache {
    capacity: usize,
    entries: RwLock<HashMap<Box<str>, Entry>>,
}

struct Entry {
    claims: Claims,
    /// The kid of the key that signed the token.
    kid: Box<str>,
    /// The token's `exp`: from this unix second on it never verifies.
    exp: u64,
}

impl fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl VerifyCache {
    /// An empty cache holding at most `capacity` tokens (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// [`crate::verify`], answered from the cache when `token` verified
    /// before.
    pub fn verify(
        &self,
        ring: &KeyRing,
        token: &str,
        expect: &Expect<'_>,
    ) -> Result<Claims, TokenError> {
        // Rule 1 first, so an oversized token is not even hashed.
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        if let Some(claims) = self.lookup(ring, token, expect.now)? {
            jws::check_claims(&claims, expect)?;
            return Ok(claims);
        }
        let Verified { claims, kid } = jws::verify_signed(ring, token, expect.now)?;
        jws::check_claims(&claims, expect)?;
        self.insert(token, &claims, kid, expect.now);
        Ok(claims)
    }

    /// How many tokens are cached.
    pub fn len(&self) -> usize {
        self.read_entries(|entries| entries.len())
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.write_entries(HashMap::clear);
    }

    /// The cached claims of `token`, if present and its key still verifies.
    fn lookup(&self, ring: &KeyRing, token: &str, now: u64) -> Result<Option<Claims>, TokenError> {
        self.read_entries(|entries| match entries.get(token) {
            None => Ok(None),
            Some(entry) if ring.verifying_key(&entry.kid, now).is_none() => {
                Err(TokenError::UnknownKey)
            }
            Some(entry) => Ok(Some(entry.claims.clone())),
        })
    }

    fn insert(&self, token: &str, claims: &Claims, kid: String, now: u64) {
        if self.capacity == 0 {
            return;
        }
        let entry = Entry {
            claims: claims.clone(),
            kid: kid.into_boxed_str(),
            exp: claims.exp,
        };
        self.write_entries(|entries| {
            if entries.len() >= self.capacity && !entries.contains_key(token) {
                entries.retain(|_, e| now < e.exp);
                if entries.len() >= self.capacity {
                    entries.clear();
                }
            }
            entries.insert(token.into(), entry);
        });
    }

    // A panic while holding the lock cannot leave the map half-updated in a
    // way that matters (every entry is self-contained and re-checked on
    // use), so a poisoned lock is used as is rather than failing every call.
    fn read_entries<T>(&self, f: impl FnOnce(&HashMap<Box<str>, Entry>) -> T) -> T {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        f(&entries)
    }

    fn write_entries<T>(&self, f: impl FnOnce(&mut HashMap<Box<str>, Entry>) -> T) -> T {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SigningKey, mint, verify};

    const ISS: &str = "http://127.0.0.1:8787";
    const NOW: u64 = 1_700_000_000;

    fn ring() -> KeyRing {
        KeyRing::new(vec![SigningKey::generate(NOW - 100).unwrap()], 900).unwrap()
    }

    fn claims(jti: &str) -> Claims {
        Claims {
            iss: ISS.into(),
            sub: "ingest-bot".into(),
            aud: ISS.into(),
            exp: NOW + 600,
            iat: NOW,
            nbf: NOW,
            jti: jti.into(),
            client_id: "ingest-bot".into(),
            task_id: "tsk_1".into(),
            agent_type: "ingestion".into(),
            scope: "warehouse.connect".into(),
        }
    }

    fn expect(now: u64) -> Expect<'static> {
        Expect {
            issuer: ISS,
            audience: ISS,
            now,
        }
    }

    #[test]
    fn hit_after_first_verify() {
        let ring = ring();
        let cache = VerifyCache::new(16);
        assert!(cache.is_empty());
        let token = mint(&ring, &claims("a")).unwrap();
        assert_eq!(
            cache.verify(&ring, &token, &expect(NOW)).unwrap(),
            claims("a")
        );
        assert_eq!(cache.len(), 1);
        assert!(cache.lookup(&ring, &token, NOW).unwrap().is_some());
        assert_eq!(
            cache.verify(&ring, &token, &expect(NOW)).unwrap(),
            claims("a")
        );
        assert_eq!(cache.len(), 1);
        assert!(format!("{cache:?}").contains("len: 1"));
    }

    #[test]
    fn failures_are_not_cached() {
        let ring = ring();
        let cache = VerifyCache::new(16);
        let token = mint(&ring, &claims("a")).unwrap();
        let wrong = Expect {
            audience: "elsewhere",
            ..expect(NOW)
        };
        assert_eq!(
            cache.verify(&ring, &token, &wrong).unwrap_err(),
            TokenError::WrongAudience
        );
        assert!(cache.is_empty());
        let forged = format!("{token}x");
        assert!(cache.verify(&ring, &forged, &expect(NOW)).is_err());
        assert!(cache.is_empty());
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            cache.verify(&ring, &huge, &expect(NOW)).unwrap_err(),
            TokenError::TooLarge
        );
    }

    #[test]
    fn a_hit_still_checks_time_issuer_and_audience() {
        let ring = ring();
        let cache = VerifyCache::new(16);
        let token = mint(&ring, &claims("a")).unwrap();
        cache.verify(&ring, &token, &expect(NOW)).unwrap();
        let exp = claims("a").exp;
        cache.verify(&ring, &token, &expect(exp - 1)).unwrap();
        assert_eq!(
            cache.verify(&ring, &token, &expect(exp)).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            cache
                .verify(&ring, &token, &expect(NOW - crate::LEEWAY_SECS - 1))
                .unwrap_err(),
            TokenError::NotYetValid
        );
        let other_aud = Expect {
            audience: "warehouse",
            ..expect(NOW)
        };
        assert_eq!(
            cache.verify(&ring, &token, &other_aud).unwrap_err(),
            TokenError::WrongAudience
        );
        let other_iss = Expect {
            issuer: "http://evil",
            ..expect(NOW)
        };
        assert_eq!(
            cache.verify(&ring, &token, &other_iss).unwrap_err(),
            TokenError::WrongIssuer
        );
        // The entry is still there and still answers correctly.
        assert_eq!(cache.len(), 1);
        cache.verify(&ring, &token, &expect(NOW)).unwrap();
    }

    #[test]
    fn a_hit_requires_the_key_in_the_ring() {
        let ring = ring();
        let cache = VerifyCache::new(16);
        let token = mint(&ring, &claims("a")).unwrap();
        cache.verify(&ring, &token, &expect(NOW)).unwrap();
        // The key was removed (e.g. compromised): the cached token stops.
        let other = KeyRing::new(vec![SigningKey::generate(NOW).unwrap()], 900).unwrap();
        assert_eq!(
            cache.verify(&other, &token, &expect(NOW)).unwrap_err(),
            TokenError::UnknownKey
        );
        assert_eq!(
            verify(&other, &token, &expect(NOW)).unwrap_err(),
            TokenError::UnknownKey
        );
    }

    #[test]
    fn bounded() {
        let ring = ring();
        let cache = VerifyCache::new(4);
        let tokens: Vec<String> = (0..10)
            .map(|i| mint(&ring, &claims(&format!("j{i}"))).unwrap())
            .collect();
        for (i, token) in tokens.iter().enumerate() {
            cache.verify(&ring, token, &expect(NOW)).unwrap();
            assert!(cache.len() <= 4);
            assert!(!cache.is_empty());
            assert!(cache.len() == (i % 4) + 1, "{i}: {}", cache.len());
        }
        // Re-verifying a cached token when full does not evict anything.
        let last = tokens.last().unwrap();
        let before = cache.len();
        cache.verify(&ring, last, &expect(NOW)).unwrap();
        assert_eq!(cache.len(), before);

        let disabled = VerifyCache::new(0);
        disabled.verify(&ring, last, &expect(NOW)).unwrap();
        assert!(disabled.is_empty());
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn when_full_expired_entries_go_first() {
        let ring = ring();
        let cache = VerifyCache::new(3);
        let mut short = claims("short");
        short.exp = NOW + 10;
        let short = mint(&ring, &short).unwrap();
        let long1 = mint(&ring, &claims("l1")).unwrap();
        let long2 = mint(&ring, &claims("l2")).unwrap();
        let long3 = mint(&ring, &claims("l3")).unwrap();
        for t in [&short, &long1, &long2] {
            cache.verify(&ring, t, &expect(NOW)).unwrap();
        }
        assert_eq!(cache.len(), 3);
        // Later, `short` has expired: inserting drops only it.
        let later = NOW + 10;
        cache.verify(&ring, &long3, &expect(later)).unwrap();
        assert_eq!(cache.len(), 3);
        for t in [&long1, &long2, &long3] {
            assert!(cache.lookup(&ring, t, later).unwrap().is_some());
        }
        assert!(cache.lookup(&ring, &short, later).unwrap().is_none());
    }

    #[test]
    fn shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<VerifyCache>();
        let ring = ring();
        let cache = VerifyCache::new(64);
        let token = mint(&ring, &claims("a")).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10 {
                        cache.verify(&ring, &token, &expect(NOW)).unwrap();
                    }
                });
            }
        });
        assert_eq!(cache.len(), 1);
    }
}
