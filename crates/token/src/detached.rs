//! Detached Ed25519 signatures over domain-separated messages (audit
//! checkpoints). Why a signature made here can never pass for a token
//! signature, and back: the crate documentation, "Detached signatures".

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::Value;

use crate::key::thumbprint;
use crate::{B64, KeyRing, TokenError};

/// The domain prefix of an audit checkpoint: the signed bytes are
/// `portcullis-audit-checkpoint-v1\n<seq>\n<hash>\n<ts>` (docs/audit-format.md,
/// "Checkpoints").
pub const CHECKPOINT_DOMAIN: &str = "portcullis-audit-checkpoint-v1\n";

/// Every domain prefix [`KeyRing::sign_detached`] signs under.
///
/// INVARIANT (tested): each contains a byte that is neither base64url nor
/// `.` (so no JWS signing input starts with it), and none is a prefix of
/// another (so a message belongs to exactly one domain).
const DOMAINS: &[&str] = &[CHECKPOINT_DOMAIN];

/// Unpadded base64url of a 64-byte signature.
const SIGNATURE_B64_LEN: usize = 86;
/// Unpadded base64url of a 32-byte public key.
const PUBLIC_KEY_B64_LEN: usize = 43;

fn in_known_domain(message: &str) -> bool {
    DOMAINS.iter().any(|domain| message.starts_with(domain))
}

/// Exactly 64 bytes in canonical unpadded base64url, or `None`.
fn decode_signature(signature_b64url: &str) -> Option<[u8; 64]> {
    if signature_b64url.len() != SIGNATURE_B64_LEN {
        return None;
    }
    B64.decode(signature_b64url)
        .ok()?
        .as_slice()
        .try_into()
        .ok()
}

impl KeyRing {
    /// Signs `message` with the current signing key; returns
    /// `(kid, base64url signature)` (64 bytes, unpadded: 86 characters).
    ///
    /// Only messages that start with a known domain prefix are signed (today
    /// only [`CHECKPOINT_DOMAIN`]); anything else is refused with
    /// [`TokenError::Domain`]. A JWS signing input consists of base64url and
    /// `.` only (and starts with `eyJ`, base64url of `{"`), so it never
    /// starts with a domain prefix: this cannot be used to sign a token.
    pub fn sign_detached(&self, message: &str) -> Result<(String, String), TokenError> {
        if !in_known_domain(message) {
            return Err(TokenError::Domain);
        }
        let key = self.signing_key();
        let signature = key.sign(message.as_bytes());
        Ok((key.kid().to_owned(), B64.encode(signature)))
    }

    /// Verifies a detached signature made by [`KeyRing::sign_detached`]
    /// with the ring's key `kid`, whether or not that key still verifies
    /// tokens: an audit checkpoint must stay verifiable long after its key
    /// has been rotated out of token verification (and out of
    /// [`KeyRing::jwks`]), for as long as the key file stays in the ring.
    ///
    /// `false` unless `message` starts with a known domain prefix,
    /// `signature_b64url` is exactly 64 bytes of canonical unpadded
    /// base64url, `kid` names a key of the ring, and the signature passes
    /// ed25519-dalek's `verify_strict`.
    pub fn verify_detached(&self, kid: &str, message: &str, signature_b64url: &str) -> bool {
        if !in_known_domain(message) {
            return false;
        }
        let Some(signature) = decode_signature(signature_b64url) else {
            return false;
        };
        self.any_key(kid)
            .is_some_and(|key| key.verify_strict(message.as_bytes(), &signature))
    }
}

/// Verifies a detached signature made by [`KeyRing::sign_detached`] against
/// a JWKS document (RFC 7517 JSON, as served at `/.well-known/jwks.json` or
/// exported to a file).
///
/// `false` unless all of these hold:
///
/// - `message` starts with a known domain prefix (today only
///   [`CHECKPOINT_DOMAIN`]);
/// - `signature_b64url` is exactly 64 bytes of canonical unpadded base64url;
/// - `jwks` is an object whose `keys` is an array with **exactly one**
///   member whose `kid` is the string `kid` (two keys claiming one kid are
///   ambiguous, so neither is used);
/// - that member has `"kty":"OKP"`, `"crv":"Ed25519"`, no `alg` other than
///   `"EdDSA"` and no `use` other than `"sig"`, and an `x` of exactly 32
///   bytes in canonical unpadded base64url that is a valid Ed25519 point;
/// - `kid` is the RFC 7638 thumbprint of that `x` (as every kid this crate
///   makes is, see [`crate::SigningKey::kid`]): the kid commits to the key,
///   so a JWKS cannot put another key under a known kid;
/// - the signature passes ed25519-dalek's `verify_strict`.
///
/// Never panics, whatever the shape of `jwks`.
pub fn verify_detached_with_jwks(
    jwks: &Value,
    kid: &str,
    message: &str,
    signature_b64url: &str,
) -> bool {
    if !in_known_domain(message) {
        return false;
    }
    let Some(signature) = decode_signature(signature_b64url) else {
        return false;
    };
    let Some(key) = jwks_key(jwks, kid) else {
        return false;
    };
    key.verify_strict(message.as_bytes(), &Signature::from_bytes(&signature))
        .is_ok()
}

/// The one key of `jwks` named `kid`, if it is a usable Ed25519 key.
fn jwks_key(jwks: &Value, kid: &str) -> Option<VerifyingKey> {
    let mut named = jwks
        .get("keys")?
        .as_array()?
        .iter()
        .filter(|jwk| jwk.get("kid").and_then(Value::as_str) == Some(kid));
    let jwk = named.next()?;
    if named.next().is_some() {
        return None;
    }
    ed25519_public_key(jwk, kid)
}

/// The Ed25519 public key of the JWK `jwk` (RFC 8037), if it is one whose
/// thumbprint is `kid`.
fn ed25519_public_key(jwk: &Value, kid: &str) -> Option<VerifyingKey> {
    let member = |name: &str| jwk.get(name).and_then(Value::as_str);
    if member("kty")? != "OKP" || member("crv")? != "Ed25519" {
        return None;
    }
    // Optional members, when present, must allow EdDSA signature checks.
    let allows = |name: &str, allowed: &str| {
        jwk.get(name)
            .is_none_or(|value| value.as_str() == Some(allowed))
    };
    if !allows("alg", "EdDSA") || !allows("use", "sig") {
        return None;
    }
    let x = member("x")?;
    if x.len() != PUBLIC_KEY_B64_LEN {
        return None;
    }
    let bytes: [u8; 32] = B64.decode(x).ok()?.as_slice().try_into().ok()?;
    // `x` is canonical base64url now, as `thumbprint` requires.
    if thumbprint(x) != kid {
        return None;
    }
    VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Claims, Expect, LEEWAY_SECS, SigningKey, mint, verify};
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;
    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    const RFC8032_KEY_FILE: &str = "portcullis-ed25519-key v1\ncreated: 1\nsecret: nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    /// RFC 8032 section 7.1, test 1: the signature of the empty message.
    const RFC8032_SIGNATURE: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";
    /// The RFC 8032 test key's signature of `checkpoint(42, HASH,
    /// 1700000000123)`, computed independently of this crate (Python
    /// `cryptography` 48, `Ed25519PrivateKey.sign`).
    const RFC8032_CHECKPOINT_SIGNATURE: &str =
        "naLcfdcweksXWr-d9ULcZZNTx8l4kmOOPuN0qtsXIcX3mAxRQ2nGg9lKw5pz4JQOmi4th4nyb1TeE5kwpx7KAA";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn checkpoint(seq: u64, hash: &str, ts: u64) -> String {
        format!("{CHECKPOINT_DOMAIN}{seq}\n{hash}\n{ts}")
    }

    fn message() -> String {
        checkpoint(42, HASH, 1_700_000_000_123)
    }

    fn ring() -> KeyRing {
        KeyRing::new(
            vec![
                SigningKey::generate(NOW - 5_000).unwrap(),
                SigningKey::generate(NOW - 100).unwrap(),
            ],
            900,
        )
        .unwrap()
    }

    fn rfc8032_ring() -> KeyRing {
        KeyRing::new(
            vec![SigningKey::from_file_text(RFC8032_KEY_FILE).unwrap()],
            900,
        )
        .unwrap()
    }

    /// A JWK whose `kid` is the thumbprint of `x`, as if `x` were a key.
    fn jwk_for_x(x: &str) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": thumbprint(x)})
    }

    #[test]
    fn domains_are_disjoint_from_jws_and_each_other() {
        assert_eq!(CHECKPOINT_DOMAIN, "portcullis-audit-checkpoint-v1\n");
        let jws_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
        for domain in DOMAINS {
            assert!(!domain.bytes().all(jws_byte), "{domain:?}");
            assert!(!domain.starts_with("eyJ"));
            for other in DOMAINS {
                assert!(domain == other || !other.starts_with(domain));
            }
        }
    }

    #[test]
    fn round_trip() {
        let ring = ring();
        let now = NOW;
        let message = message();
        let (kid, signature) = ring.sign_detached(&message).unwrap();
        assert_eq!(kid, ring.signing_kid());
        assert_eq!(signature.len(), SIGNATURE_B64_LEN);
        assert!(ring.verify_detached(&kid, &message, &signature));
        assert!(verify_detached_with_jwks(
            &ring.jwks(now),
            &kid,
            &message,
            &signature
        ));
        // Through JSON text too, as a verifier reading an exported file does.
        let exported: Value = serde_json::from_str(&ring.jwks(now).to_string()).unwrap();
        assert!(verify_detached_with_jwks(
            &exported, &kid, &message, &signature
        ));
        // Deterministic (pure Ed25519), so a re-sign is identical.
        assert_eq!(
            ring.sign_detached(&message).unwrap(),
            (kid.clone(), signature.clone())
        );
        // The domain prefix alone, and large values, are fine.
        for message in [
            CHECKPOINT_DOMAIN.to_owned(),
            checkpoint(u64::MAX, &"f".repeat(64), u64::MAX),
        ] {
            let (kid, signature) = ring.sign_detached(&message).unwrap();
            assert!(ring.verify_detached(&kid, &message, &signature));
            assert!(verify_detached_with_jwks(
                &ring.jwks(now),
                &kid,
                &message,
                &signature
            ));
        }
    }

    #[test]
    fn retired_keys_still_verify_checkpoints() {
        let lifetime = 900;
        let old_file = SigningKey::generate(NOW - 5_000).unwrap().to_file_text();
        let old_ring = KeyRing::new(
            vec![SigningKey::from_file_text(&old_file).unwrap()],
            lifetime,
        )
        .unwrap();
        let message = message();
        let (old_kid, signature) = old_ring.sign_detached(&message).unwrap();

        let rotation = NOW;
        let ring = KeyRing::new(
            vec![
                SigningKey::from_file_text(&old_file).unwrap(),
                SigningKey::generate(rotation).unwrap(),
            ],
            lifetime,
        )
        .unwrap();
        assert_ne!(ring.signing_kid(), old_kid);
        let until = rotation + lifetime + LEEWAY_SECS;
        // The old key no longer verifies tokens after `until`…
        assert!(ring.verifying_key(&old_kid, until + 1).is_none());
        // …but the ring still verifies its checkpoints.
        assert!(ring.verify_detached(&old_kid, &message, &signature));
        // A JWKS exported while the key was published verifies them; one
        // exported after it was dropped does not know the kid.
        assert!(verify_detached_with_jwks(
            &ring.jwks(until),
            &old_kid,
            &message,
            &signature
        ));
        assert!(!verify_detached_with_jwks(
            &ring.jwks(until + 1),
            &old_kid,
            &message,
            &signature
        ));
        // New checkpoints are signed by the new key.
        assert_eq!(ring.sign_detached(&message).unwrap().0, ring.signing_kid());
    }

    #[test]
    fn wrong_kid() {
        let ring = ring();
        let message = message();
        let (kid, signature) = ring.sign_detached(&message).unwrap();
        let jwks = ring.jwks(NOW);
        let other_kid = jwks["keys"][1]["kid"].as_str().unwrap().to_owned();
        assert_ne!(other_kid, kid);
        let foreign = KeyRing::new(vec![SigningKey::generate(NOW).unwrap()], 900).unwrap();
        for bad in [
            other_kid,
            foreign.signing_kid().to_owned(),
            String::new(),
            "nope".to_owned(),
            kid[1..].to_owned(),
            format!("{kid} "),
            kid.to_lowercase(),
        ] {
            assert!(!ring.verify_detached(&bad, &message, &signature), "{bad}");
            assert!(!verify_detached_with_jwks(
                &jwks, &bad, &message, &signature
            ));
        }
        // A foreign ring does not know our kid.
        assert!(!foreign.verify_detached(&kid, &message, &signature));
    }

    #[test]
    fn tampered_message() {
        let ring = ring();
        let message = message();
        let (kid, signature) = ring.sign_detached(&message).unwrap();
        let jwks = ring.jwks(NOW);
        let mut bad = vec![
            checkpoint(43, HASH, 1_700_000_000_123),
            checkpoint(42, &HASH.replace('e', "f"), 1_700_000_000_123),
            checkpoint(42, &HASH.to_uppercase(), 1_700_000_000_123),
            checkpoint(42, HASH, 1_700_000_000_124),
            format!("{message}\n"),
            format!("{message}0"),
            message.replace('\n', "\r\n"),
            CHECKPOINT_DOMAIN.to_owned(),
            String::new(),
            // Without the domain prefix, or with another one.
            message.replacen(CHECKPOINT_DOMAIN, "", 1),
            message.replacen("-v1", "-v2", 1),
        ];
        // Every single-byte change.
        for i in 0..message.len() {
            let mut bytes = message.clone().into_bytes();
            bytes[i] ^= 0x01;
            bad.push(String::from_utf8(bytes).unwrap());
        }
        for m in bad {
            assert_ne!(m, message);
            assert!(!ring.verify_detached(&kid, &m, &signature), "{m:?}");
            assert!(!verify_detached_with_jwks(&jwks, &kid, &m, &signature));
        }
    }

    #[test]
    fn tampered_or_non_canonical_signature() {
        let ring = ring();
        let message = message();
        let (kid, signature) = ring.sign_detached(&message).unwrap();
        let jwks = ring.jwks(NOW);
        let raw = B64.decode(&signature).unwrap();
        let std_b64 = base64::engine::general_purpose::STANDARD;
        let padded = base64::engine::general_purpose::URL_SAFE;
        let mut bad = vec![
            String::new(),
            // Wrong length: 63 and 65 bytes, and the signature twice.
            B64.encode(&raw[..63]),
            B64.encode([raw.as_slice(), &[0]].concat()),
            signature.repeat(2),
            signature[..85].to_owned(),
            // Padded, standard alphabet, whitespace, non-ASCII.
            padded.encode(&raw),
            format!("{signature}="),
            format!("{signature}=="),
            std_b64.encode(&raw),
            format!(" {}", &signature[1..]),
            format!("{}\n", &signature[..85]),
            format!("{}é", &signature[..84]),
            // Valid base64url of 64 bytes, but not a signature.
            B64.encode([0u8; 64]),
            B64.encode([0xffu8; 64]),
        ];
        // Non-canonical trailing bits: the last character carries 2 data
        // bits and 4 that must be zero; every variant decodes to the same
        // 64 bytes under a lenient decoder.
        let (head, last) = signature.split_at(85);
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let value = alphabet.find(last).unwrap();
        for c in alphabet.chars() {
            let v = alphabet.find(c).unwrap();
            if v >> 4 == value >> 4 && v != value {
                bad.push(format!("{head}{c}"));
            }
        }
        assert_eq!(bad.len(), 14 + 15);
        // Every single-bit change of the signature bytes.
        for i in 0..64 {
            for bit in 0..8 {
                let mut flipped = raw.clone();
                flipped[i] ^= 1 << bit;
                bad.push(B64.encode(&flipped));
            }
        }
        // S + L (the group order): the same signature to a lenient
        // verifier, refused by verify_strict.
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut malleable = raw.clone();
        let mut carry = 0u16;
        for (byte, l_byte) in malleable[32..].iter_mut().zip(l) {
            let sum = u16::from(*byte) + u16::from(l_byte) + carry;
            *byte = sum.to_le_bytes()[0];
            carry = sum >> 8;
        }
        // S < L < 2^253, so S + L fits 256 bits.
        assert_eq!(carry, 0);
        bad.push(B64.encode(&malleable));
        for s in bad {
            assert_ne!(s, signature);
            assert!(!ring.verify_detached(&kid, &message, &s), "{s:?}");
            assert!(!verify_detached_with_jwks(&jwks, &kid, &message, &s));
        }
        assert!(ring.verify_detached(&kid, &message, &signature));
    }

    #[test]
    fn sign_detached_refuses_messages_outside_a_domain() {
        let ring = ring();
        let message = message();
        let token = mint(&ring, &claims()).unwrap();
        let (signing_input, _) = token.rsplit_once('.').unwrap();
        for bad in [
            String::new(),
            "portcullis-audit-checkpoint-v1".to_owned(),
            "portcullis-audit-checkpoint-v1\r\n42".to_owned(),
            "portcullis-audit-checkpoint-v2\n42".to_owned(),
            "Portcullis-audit-checkpoint-v1\n42".to_owned(),
            format!(" {message}"),
            format!("\n{message}"),
            format!("\u{feff}{message}"),
            message.replacen(CHECKPOINT_DOMAIN, "", 1),
            // JWS signing inputs: ours, a bare header, RFC 8037 A.4's.
            signing_input.to_owned(),
            token.clone(),
            "eyJhbGciOiJFZERTQSJ9".to_owned(),
            "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc".to_owned(),
            // A JWS signing input with a checkpoint smuggled in after it.
            format!("{signing_input}{message}"),
        ] {
            assert_eq!(
                ring.sign_detached(&bad).unwrap_err(),
                TokenError::Domain,
                "{bad:?}"
            );
        }
        assert_eq!(
            TokenError::Domain.reason(),
            portcullis_core::Reason::TokenInvalid
        );
    }

    fn claims() -> Claims {
        Claims {
            iss: "http://127.0.0.1:8787".into(),
            sub: "ingest-bot".into(),
            aud: "http://127.0.0.1:8787".into(),
            exp: NOW + 600,
            iat: NOW,
            nbf: NOW,
            jti: "jti_1".into(),
            client_id: "ingest-bot".into(),
            task_id: "tsk_1".into(),
            agent_type: "ingestion".into(),
            scope: "warehouse.connect".into(),
        }
    }

    #[test]
    fn no_cross_protocol_use() {
        let ring = ring();
        let kid = ring.signing_kid().to_owned();
        // A token's signature is a valid Ed25519 signature of its signing
        // input by the signing key, but not a detached signature.
        let token = mint(&ring, &claims()).unwrap();
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let raw: [u8; 64] = B64.decode(signature).unwrap().try_into().unwrap();
        assert!(
            ring.signing_key()
                .verify_strict(signing_input.as_bytes(), &raw)
        );
        assert!(!ring.verify_detached(&kid, signing_input, signature));
        assert!(!verify_detached_with_jwks(
            &ring.jwks(NOW),
            &kid,
            signing_input,
            signature
        ));
        // And a checkpoint with its signature is not a token, however it is
        // put together.
        let message = message();
        let (_, signature) = ring.sign_detached(&message).unwrap();
        let expect = Expect {
            issuer: "http://127.0.0.1:8787",
            audience: "http://127.0.0.1:8787",
            now: NOW,
        };
        for attempt in [
            format!("{message}.{signature}"),
            format!("{}.{signature}", message.replace('\n', ".")),
            format!(
                "{}.{}.{signature}",
                B64.encode(CHECKPOINT_DOMAIN),
                B64.encode(&message[CHECKPOINT_DOMAIN.len()..])
            ),
        ] {
            assert!(verify(&ring, &attempt, &expect).is_err(), "{attempt:?}");
        }
    }

    #[test]
    fn rfc8032_test_vector_1_only_through_a_checkpoint() {
        let ring = rfc8032_ring();
        let kid = ring.signing_kid().to_owned();
        assert_eq!(kid, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        let public: [u8; 32] = unhex(RFC8032_PUBLIC).try_into().unwrap();
        let dalek = VerifyingKey::from_bytes(&public).unwrap();

        // Test 1 signs the empty message. The signature is genuine…
        let rfc_signature: [u8; 64] = unhex(RFC8032_SIGNATURE).try_into().unwrap();
        assert!(
            dalek
                .verify_strict(b"", &Signature::from_bytes(&rfc_signature))
                .is_ok()
        );
        // …but the empty message is in no domain: refused both ways.
        assert_eq!(ring.sign_detached("").unwrap_err(), TokenError::Domain);
        let rfc_b64 = B64.encode(rfc_signature);
        assert!(!ring.verify_detached(&kid, "", &rfc_b64));
        assert!(!verify_detached_with_jwks(
            &ring.jwks(NOW),
            &kid,
            "",
            &rfc_b64
        ));

        // A checkpoint signed with the RFC 8032 key, checked by ed25519-dalek
        // directly against the RFC's public key, and against an independent
        // implementation's signature.
        let message = message();
        let (signed_kid, signature) = ring.sign_detached(&message).unwrap();
        assert_eq!(signed_kid, kid);
        let raw: [u8; 64] = B64.decode(&signature).unwrap().try_into().unwrap();
        assert!(
            dalek
                .verify_strict(message.as_bytes(), &Signature::from_bytes(&raw))
                .is_ok()
        );
        assert_eq!(signature, RFC8032_CHECKPOINT_SIGNATURE);
        // Not a signature of the bare message without its prefix.
        assert!(
            dalek
                .verify_strict(
                    &message.as_bytes()[CHECKPOINT_DOMAIN.len()..],
                    &Signature::from_bytes(&raw)
                )
                .is_err()
        );
        assert!(ring.verify_detached(&kid, &message, &signature));
        let jwks = json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
        }]});
        assert!(verify_detached_with_jwks(&jwks, &kid, &message, &signature));
    }

    #[test]
    fn hostile_jwks_shapes_are_refused() {
        let ring = rfc8032_ring();
        let kid = ring.signing_kid().to_owned();
        let message = message();
        let (_, signature) = ring.sign_detached(&message).unwrap();
        let good = ring.jwks(NOW)["keys"][0].clone();
        let x = good["x"].as_str().unwrap().to_owned();
        let check = |jwks: &Value| verify_detached_with_jwks(jwks, &kid, &message, &signature);
        assert!(check(&json!({ "keys": [good] })));

        let with = |member: &str, value: Value| {
            let mut jwk = good.clone();
            jwk[member] = value;
            json!({ "keys": [jwk] })
        };
        let without = |member: &str| {
            let mut jwk = good.clone();
            jwk.as_object_mut().unwrap().remove(member);
            json!({ "keys": [jwk] })
        };
        // Optional members may be absent, and unknown ones are ignored.
        assert!(check(&without("alg")));
        assert!(check(&without("use")));
        assert!(check(&with("x5c", json!(["not a certificate"]))));
        // A second, unrelated key does not get in the way.
        let other = SigningKey::generate(NOW).unwrap().public_jwk();
        assert!(check(&json!({ "keys": [other, good] })));

        let hostile = vec![
            // Not a JWKS at all.
            Value::Null,
            json!(true),
            json!(1),
            json!("keys"),
            json!([good]),
            json!({}),
            json!({ "keys": null }),
            json!({ "keys": {} }),
            json!({ "keys": good }),
            json!({ "keys": [] }),
            json!({ "keys": [null, 1, "x", [], {}, [good]] }),
            json!({ "Keys": [good] }),
            json!({ "key": [good] }),
            // The right kid on the wrong kind of key.
            without("kty"),
            with("kty", json!("EC")),
            with("kty", json!("oct")),
            with("kty", json!("RSA")),
            with("kty", json!("okp")),
            with("kty", json!(null)),
            with("kty", json!(["OKP"])),
            without("crv"),
            with("crv", json!("X25519")),
            with("crv", json!("Ed448")),
            with("crv", json!("P-256")),
            with("crv", json!("ed25519")),
            with("crv", json!(1)),
            with("alg", json!("RS256")),
            with("alg", json!("none")),
            with("alg", json!(null)),
            with("alg", json!(["EdDSA"])),
            with("use", json!("enc")),
            with("use", json!(null)),
            // `x` missing, not a string, the wrong size or encoding.
            without("x"),
            with("x", json!(null)),
            with("x", json!(1)),
            with("x", json!([x])),
            with("x", json!("")),
            with("x", json!(B64.encode([7u8; 31]))),
            with("x", json!(B64.encode([7u8; 33]))),
            with("x", json!(B64.encode([7u8; 64]))),
            with("x", json!(format!("{x}="))),
            with("x", json!(&x[..42])),
            with("x", json!(format!("{x}A"))),
            with("x", json!(x.replace('_', "/"))),
            with("x", json!(format!("{}p", &x[..42]))),
            // Our key under another kid (so that kid is not its thumbprint)
            // is not our key under our kid.
            json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": "alias" }] }),
            // Another key's `x` under our kid (kid is not its thumbprint).
            with("x", other["x"].clone()),
            // kid not a string: no key is named `kid`.
            with("kid", json!(null)),
            with("kid", json!([kid])),
            with("kid", json!({ "kid": kid })),
            without("kid"),
            // Duplicate kids: ambiguous, even when both are the same key.
            json!({ "keys": [good, good] }),
            json!({ "keys": [good, other.clone(), good] }),
            json!({ "keys": [{ "kid": kid }, good] }),
            json!({ "keys": [good, { "kid": kid, "kty": "OKP", "crv": "Ed25519", "x": other["x"] }] }),
        ];
        for jwks in &hostile {
            assert!(!check(jwks), "{jwks}");
        }
        // The signer's key listed under an alias verifies nothing under it.
        let alias = json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": "alias" }] });
        assert!(!verify_detached_with_jwks(
            &alias, "alias", &message, &signature
        ));
        // Another signer cannot borrow our kid: its key under our kid does
        // not verify its own signatures as ours.
        let impostor = KeyRing::new(vec![SigningKey::generate(NOW).unwrap()], 900).unwrap();
        let (_, impostor_signature) = impostor.sign_detached(&message).unwrap();
        let borrowed = json!({ "keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": impostor.jwks(NOW)["keys"][0]["x"],
            "kid": kid,
        }] });
        assert!(!verify_detached_with_jwks(
            &borrowed,
            &kid,
            &message,
            &impostor_signature
        ));

        // Keys that are not usable points, with kids that do match them.
        let not_a_point = {
            // y = 2 is not the y of any curve point.
            let mut y = [0u8; 32];
            y[0] = 2;
            B64.encode(y)
        };
        for x in [not_a_point, B64.encode([0u8; 32]), B64.encode([0xffu8; 32])] {
            let jwks = json!({ "keys": [jwk_for_x(&x)] });
            let bad_kid = thumbprint(&x);
            assert!(!verify_detached_with_jwks(
                &jwks, &bad_kid, &message, &signature
            ));
        }
        // The weak-key forgery: with the identity as public key, R = the
        // identity and S = 0 pass the cofactorless equation for *any*
        // message. ed25519-dalek's lenient `verify` accepts it;
        // `verify_strict` (and so we) must not.
        let identity_key = {
            let mut point = [0u8; 32];
            point[0] = 1;
            point
        };
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice(&identity_key);
        {
            use ed25519_dalek::Verifier as _;
            let weak = VerifyingKey::from_bytes(&identity_key).unwrap();
            assert!(weak.is_weak());
            assert!(
                weak.verify(message.as_bytes(), &Signature::from_bytes(&forged))
                    .is_ok()
            );
        }
        let x = B64.encode(identity_key);
        assert!(!verify_detached_with_jwks(
            &json!({ "keys": [jwk_for_x(&x)] }),
            &thumbprint(&x),
            &message,
            &B64.encode(forged)
        ));

        // A deeply nested or huge document is just not a match.
        let mut deep = json!([]);
        for _ in 0..100 {
            deep = json!([deep]);
        }
        assert!(!check(
            &json!({ "keys": [deep, { "kid": kid, "x": deep }] })
        ));
        let many: Vec<Value> = (0..10_000)
            .map(|i| json!({ "kid": i.to_string() }))
            .collect();
        assert!(!check(&json!({ "keys": many })));
    }
}
