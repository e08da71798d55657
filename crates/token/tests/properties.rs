//! Properties of mint and verify through the public API: any claims round
//! trip, and no single-byte change to a token is accepted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::LazyLock;

use portcullis_token::{Claims, Expect, KeyRing, SigningKey, VerifyCache, mint, verify};
use proptest::prelude::*;

const ISS: &str = "http://127.0.0.1:8787";
const NOW: u64 = 1_700_000_000;
const LIFETIME: u64 = 900;

static RING: LazyLock<KeyRing> = LazyLock::new(|| {
    KeyRing::new(
        vec![
            SigningKey::generate(NOW - 10_000).unwrap(),
            SigningKey::generate(NOW - 100).unwrap(),
        ],
        LIFETIME,
    )
    .unwrap()
});

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[ -~]{0,40}",
        proptest::collection::vec(any::<char>(), 0..20).prop_map(String::from_iter),
        Just(String::new()),
        Just("\"}\\u0000{\"alg\":\"none\"".to_owned()),
    ]
}

fn any_claims() -> impl Strategy<Value = Claims> {
    (
        (any_string(), any_string(), any_string(), any_string()),
        (any_string(), any_string(), any_string(), any_string()),
        // A token lives at least a second: it is expired from its `exp` on.
        (1..=LIFETIME, 0..=LIFETIME),
    )
        .prop_map(
            |(
                (sub, jti, client_id, task_id),
                (agent_type, scope, extra_iss, extra_aud),
                (ttl, skew),
            )| {
                let _ = (extra_iss, extra_aud);
                Claims {
                    iss: ISS.to_owned(),
                    sub,
                    aud: ISS.to_owned(),
                    exp: NOW + ttl,
                    iat: NOW,
                    nbf: NOW - skew,
                    jti,
                    client_id,
                    task_id,
                    agent_type,
                    scope,
                }
            },
        )
}

fn expect() -> Expect<'static> {
    Expect {
        issuer: ISS,
        audience: ISS,
        now: NOW,
    }
}

proptest! {
    #[test]
    fn mint_verify_round_trips(claims in any_claims(), iss in any_string(), aud in any_string()) {
        let token = mint(&RING, &claims).unwrap();
        prop_assert_eq!(verify(&RING, &token, &expect()).unwrap(), claims.clone());
        // With arbitrary issuer and audience too, checked against themselves.
        let claims = Claims { iss: iss.clone(), aud: aud.clone(), ..claims };
        let token = mint(&RING, &claims).unwrap();
        let expect = Expect { issuer: &iss, audience: &aud, now: NOW };
        prop_assert_eq!(verify(&RING, &token, &expect).unwrap(), claims.clone());
        let cache = VerifyCache::new(4);
        prop_assert_eq!(cache.verify(&RING, &token, &expect).unwrap(), claims.clone());
        prop_assert_eq!(cache.verify(&RING, &token, &expect).unwrap(), claims);
    }

    #[test]
    fn flipping_any_byte_is_rejected(
        claims in any_claims(),
        position in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let token = mint(&RING, &claims).unwrap();
        let mut bytes = token.clone().into_bytes();
        let i = position.index(bytes.len());
        bytes[i] ^= mask;
        // A change that is not UTF-8 cannot even be presented as a &str.
        if let Ok(tampered) = String::from_utf8(bytes) {
            prop_assert_ne!(&tampered, &token);
            prop_assert!(verify(&RING, &tampered, &expect()).is_err());
            // A cache that has seen the genuine token is not fooled either.
            let cache = VerifyCache::new(4);
            cache.verify(&RING, &token, &expect()).unwrap();
            prop_assert!(cache.verify(&RING, &tampered, &expect()).is_err());
        }
    }
}
