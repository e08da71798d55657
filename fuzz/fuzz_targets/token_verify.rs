//! Task tokens on arbitrary bytes: `portcullis_token::verify` (the strict
//! JWS compact parser and rules 1 to 14 of the crate documentation) and
//! `VerifyCache::verify`, against a fixed key ring of two keys.
//!
//! The first byte chooses how the rest becomes a token:
//!
//! - `% 3 == 0`: the bytes are the token text (lossily UTF-8);
//! - `% 3 == 1`: one of three genuine tokens minted by `mint` (the next
//!   byte picks it), mutated by edits the rest of the input spells out;
//! - `% 3 == 2`: the rest, split at its first NUL byte, is a header and a
//!   payload, base64url-encoded and **signed** with a key the next byte
//!   picks (one of the ring's two, or a stranger), so the header and claims
//!   rules behind the signature check are reached too.
//!
//! Properties checked (beyond "no panic"):
//!
//! 1. `verify` answers the same twice, and the cache (a miss that evicts,
//!    then a hit) answers exactly as `verify`, also later, when the older
//!    key has been retired from verification.
//! 2. An accepted token's header is a JSON object with `alg` `"EdDSA"`,
//!    `typ` `at+jwt` (or `application/at+jwt`, ASCII case-insensitively) and
//!    a `kid` of the ring; its claims are what `serde_json` reads in the
//!    payload; a token signed by a key outside the ring is never accepted.
//! 3. A mutated genuine token is only ever accepted if it is the genuine
//!    token itself, with the claims it was minted with.

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer as _;
use libfuzzer_sys::fuzz_target;
use portcullis_token::{Claims, Expect, KeyRing, SigningKey, TokenError, VerifyCache};
use serde_json::Value;

const ISSUER: &str = "https://gateway.example";
/// Both keys verify.
const NOW: u64 = 2_500;
/// The older key no longer verifies (it did until 2000 + 900 + 30).
const LATER: u64 = 2_950;
/// RFC 8032 test keys 1 and 2, and a key outside the ring.
const SEEDS: [&str; 3] = [
    "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
    "TM0Imyj_ltqdtsNG7BFOD1uKMZ81q6Yk2oz27U-4pvs",
    "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA",
];
/// When each key was created: the second signs, the first still verifies
/// at `NOW`; the stranger is not in the ring.
const CREATED: [u64; 3] = [1_000, 2_000, 2_100];

struct Fixture {
    ring: KeyRing,
    keys: Vec<SigningKey>,
    dalek: Vec<ed25519_dalek::SigningKey>,
    /// Genuine tokens and the claims they carry.
    genuine: Vec<(String, Claims)>,
}

fn key(i: usize) -> SigningKey {
    let text = format!(
        "portcullis-ed25519-key v1\ncreated: {}\nsecret: {}\n",
        CREATED[i], SEEDS[i]
    );
    SigningKey::from_file_text(&text).unwrap()
}

fn claims(jti: &str, strings: &str) -> Claims {
    Claims {
        iss: ISSUER.into(),
        sub: format!("agent{strings}"),
        aud: ISSUER.into(),
        exp: 3_300,
        iat: 2_450,
        nbf: 2_400,
        jti: jti.into(),
        client_id: "client".into(),
        task_id: format!("tsk_{strings}"),
        agent_type: "ingestion".into(),
        scope: "warehouse.query files.read".into(),
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys: Vec<SigningKey> = (0..3).map(key).collect();
        // `SigningKey` is not `Clone` (its secret is zeroized on drop): each
        // ring reads its own copy.
        let ring = KeyRing::new(vec![key(0), key(1)], 900).unwrap();
        assert_eq!(ring.signing_kid(), keys[1].kid());
        let old_ring = KeyRing::new(vec![key(0)], 900).unwrap();
        let dalek = SEEDS
            .iter()
            .map(|s| {
                let seed: [u8; 32] = URL_SAFE_NO_PAD.decode(s).unwrap().try_into().unwrap();
                ed25519_dalek::SigningKey::from_bytes(&seed)
            })
            .collect();
        let mut genuine = Vec::new();
        for (ring, c) in [
            (&ring, claims("jti_1", "")),
            (&old_ring, claims("jti_2", "")),
            (&ring, claims("jti_3", "\"\\/\u{7f}\u{e9}\u{1f600}\n\u{0}")),
        ] {
            let token = portcullis_token::mint(ring, &c).unwrap();
            genuine.push((token, c));
        }
        Fixture {
            ring,
            keys,
            dalek,
            genuine,
        }
    })
}

fn expect(now: u64) -> Expect<'static> {
    Expect {
        issuer: ISSUER,
        audience: ISSUER,
        now,
    }
}

/// Property 1 and 2 for any token; returns what `verify` said at `NOW`.
fn check(fx: &Fixture, token: &str) -> Result<Claims, TokenError> {
    let ring = &fx.ring;
    let first = portcullis_token::verify(ring, token, &expect(NOW));
    assert_eq!(first, portcullis_token::verify(ring, token, &expect(NOW)));

    // A cache of two, already full, so this token's insertion evicts.
    let cache = VerifyCache::new(2);
    for (genuine, _) in fx.genuine.iter().take(2) {
        cache.verify(ring, genuine, &expect(NOW)).unwrap();
    }
    assert_eq!(cache.verify(ring, token, &expect(NOW)), first, "cache miss");
    assert_eq!(cache.verify(ring, token, &expect(NOW)), first, "cache hit");
    let later = portcullis_token::verify(ring, token, &expect(LATER));
    assert_eq!(cache.verify(ring, token, &expect(LATER)), later, "later");
    assert!(cache.len() <= 2);

    if let Ok(claims) = &first {
        accepted(fx, token, claims);
    }
    if let Ok(claims) = &later {
        accepted(fx, token, claims);
    }
    first
}

/// Property 2: what an accepted token looks like.
fn accepted(fx: &Fixture, token: &str, claims: &Claims) {
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(segments.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segments[0]).unwrap())
        .expect("an accepted header is JSON");
    assert_eq!(header["alg"], "EdDSA", "{header}");
    let typ = header["typ"].as_str().expect("typ is a string");
    assert!(
        typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt"),
        "{header}"
    );
    let kid = header["kid"].as_str().expect("kid is a string");
    assert!(
        fx.keys[..2].iter().any(|k| k.kid() == kid),
        "accepted with a key outside the ring: {header}"
    );
    assert_eq!(URL_SAFE_NO_PAD.decode(segments[2]).unwrap().len(), 64);

    let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segments[1]).unwrap())
        .expect("accepted claims are JSON");
    let read: Claims = serde_json::from_value(payload).expect("serde_json reads the claims");
    assert_eq!(&read, claims);
}

/// Applies the edits spelled by `ops` (four bytes each: what, where (two
/// bytes), which byte) to `token`.
fn mutate(token: &str, ops: &[u8]) -> Vec<u8> {
    let mut t = token.as_bytes().to_vec();
    for op in ops.chunks(4) {
        let [what, hi, lo, byte] = [0, 1, 2, 3].map(|i| op.get(i).copied().unwrap_or(0));
        let at = usize::from(u16::from_be_bytes([hi, lo])) % (t.len() + 1);
        match what % 8 {
            0 => {
                if at < t.len() {
                    t[at] = byte;
                }
            }
            1 => t.insert(at, byte),
            2 => {
                if at < t.len() {
                    t.remove(at);
                }
            }
            3 => {
                if at < t.len() {
                    t[at] ^= 1 << (byte % 8);
                }
            }
            4 => t.truncate(at),
            // Swap two segments.
            5 => {
                let s = String::from_utf8_lossy(&t).into_owned();
                let mut parts: Vec<&str> = s.split('.').collect();
                let n = parts.len();
                parts.swap(usize::from(hi) % n, usize::from(lo) % n);
                t = parts.join(".").into_bytes();
            }
            // Replace a segment with another genuine token's.
            6 => {
                let fx = fixture();
                let other = &fx.genuine[usize::from(byte) % fx.genuine.len()].0;
                let theirs: Vec<&str> = other.split('.').collect();
                let s = String::from_utf8_lossy(&t).into_owned();
                let mut parts: Vec<&str> = s.split('.').collect();
                let n = parts.len();
                parts[usize::from(hi) % n] = theirs[usize::from(lo) % 3];
                t = parts.join(".").into_bytes();
            }
            // Change one base64url character into another of the alphabet.
            _ => {
                const ALPHABET: &[u8] =
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                if at < t.len() {
                    t[at] = ALPHABET[usize::from(byte) % ALPHABET.len()];
                }
            }
        }
    }
    t
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = check(fx, &String::from_utf8_lossy(rest));
        }
        1 => {
            let Some((&pick, ops)) = rest.split_first() else {
                return;
            };
            let (token, claims) = &fx.genuine[usize::from(pick) % fx.genuine.len()];
            let mutated = mutate(token, ops);
            let text = String::from_utf8_lossy(&mutated);
            if let Ok(got) = check(fx, &text) {
                assert_eq!(text, token.as_str(), "a mutated token verified");
                assert_eq!(&got, claims);
            }
        }
        _ => {
            let Some((&pick, rest)) = rest.split_first() else {
                return;
            };
            let signer = usize::from(pick) % 3;
            let (header, payload) = match rest.iter().position(|&b| b == 0) {
                Some(nul) => (&rest[..nul], &rest[nul + 1..]),
                None => (rest, &[][..]),
            };
            let mut token = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(payload)
            );
            let signature = fx.dalek[signer].sign(token.as_bytes());
            token.push('.');
            token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
            let verdict = check(fx, &token);
            if signer == 2 {
                assert!(verdict.is_err(), "a stranger's signature verified");
            }
        }
    }
});
