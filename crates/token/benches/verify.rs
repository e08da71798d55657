//! Verifying an access token on the call path. DESIGN section 11: the token
//! check after first use (signature cached) ≤ 2 µs.
//!
//! - `verify/uncached`: [`portcullis_token::verify`]: decoding, strict JSON,
//!   Ed25519 `verify_strict`, claim checks;
//! - `verify/cached`: [`VerifyCache::verify`] on a token it has seen (a hit:
//!   map lookup, key-still-in-ring check, claims clone, claim checks);
//! - `mint/access_token`: [`portcullis_token::mint`], for the task-start
//!   budget.
//!
//! The token is a realistic access token: the claims the gateway mints for
//! a task of the ingestion example (four tools in scope), signed by the
//! newest of two keys in the ring, about 600 bytes.
//!
//! Run: `cargo bench -p portcullis-token --bench verify`.

// A benchmark is a test-like target: a failed setup should stop it loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_token::{Claims, Expect, KeyRing, SigningKey, VerifyCache, mint, random_id, verify};

const ISSUER: &str = "http://127.0.0.1:8787";
const NOW: u64 = 1_767_225_600;

fn setup() -> (KeyRing, Claims, String) {
    let ring = KeyRing::new(
        vec![
            SigningKey::generate(NOW - 86_400).unwrap(),
            SigningKey::generate(NOW - 3_600).unwrap(),
        ],
        900,
    )
    .unwrap();
    let claims = Claims {
        iss: ISSUER.to_owned(),
        sub: "ingest-bot".to_owned(),
        aud: ISSUER.to_owned(),
        exp: NOW + 600,
        iat: NOW,
        nbf: NOW,
        jti: random_id("jti_").unwrap(),
        client_id: "ingest-bot".to_owned(),
        task_id: random_id("tsk_").unwrap(),
        agent_type: "ingestion".to_owned(),
        scope: "warehouse.connect schema.validate transform.run warehouse.insert".to_owned(),
    };
    let token = mint(&ring, &claims).unwrap();
    (ring, claims, token)
}

fn bench(c: &mut Criterion) {
    let (ring, claims, token) = setup();
    let expect = Expect {
        issuer: ISSUER,
        audience: ISSUER,
        now: NOW + 60,
    };
    // Check before timing, so the benchmark cannot silently measure a denial.
    assert_eq!(verify(&ring, &token, &expect).unwrap(), claims);
    let cache = VerifyCache::new(10_000);
    assert_eq!(cache.verify(&ring, &token, &expect).unwrap(), claims);
    assert_eq!(cache.len(), 1);
    eprintln!("token: {} bytes", token.len());

    let mut group = c.benchmark_group("verify");
    group.bench_function("uncached", |b| {
        b.iter(|| verify(black_box(&ring), black_box(&token), black_box(&expect)).unwrap())
    });
    group.bench_function("cached", |b| {
        b.iter(|| {
            cache
                .verify(black_box(&ring), black_box(&token), black_box(&expect))
                .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("mint");
    group.bench_function("access_token", |b| {
        b.iter(|| mint(black_box(&ring), black_box(&claims)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
