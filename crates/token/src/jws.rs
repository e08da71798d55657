//! Minting and verifying access tokens (the format and every rule are in the
//! crate documentation).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::strict_json::{self, Json, ObjectError};
use crate::{B64, KeyRing, LEEWAY_SECS, MAX_TOKEN_BYTES, SigningKey, TokenError};

/// The claims of an access token (RFC 9068, DESIGN section 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: the gateway's `server.issuer`.
    pub iss: String,
    /// Subject: the agent id.
    pub sub: String,
    /// Audience: the gateway's issuer for access tokens, the upstream name
    /// for per-hop credentials.
    pub aud: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Not before, unix seconds.
    pub nbf: u64,
    /// Token id, unique per token (see [`crate::random_id`]).
    pub jti: String,
    /// The OAuth client the token was issued to.
    pub client_id: String,
    /// The task the token is bound to.
    pub task_id: String,
    /// The agent's type (its workflow).
    pub agent_type: String,
    /// Space-separated tool names granted.
    pub scope: String,
}

/// What a verified token must say, and the time to check it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect<'a> {
    /// The required `iss`.
    pub issuer: &'a str,
    /// The required `aud`.
    pub audience: &'a str,
    /// The current time, unix seconds.
    pub now: u64,
}

/// Signs `claims` with the ring's signing key: a JWS compact serialization
/// with header `{"alg":"EdDSA","typ":"at+jwt","kid":<signing kid>}`.
///
/// Refuses ([`TokenError::Claim`] `"exp"`) a token with `exp < iat` or that
/// would live longer than [`KeyRing::max_token_lifetime_secs`]: its key could
/// be retired from verification before it expires. Refuses
/// ([`TokenError::TooLarge`]) a token [`verify`] would not read.
pub fn mint(ring: &KeyRing, claims: &Claims) -> Result<String, TokenError> {
    let lifetime = claims
        .exp
        .checked_sub(claims.iat)
        .ok_or(TokenError::Claim("exp"))?;
    if lifetime > ring.max_token_lifetime_secs() {
        return Err(TokenError::Claim("exp"));
    }
    let payload = serde_json::to_vec(claims).map_err(|_| TokenError::Claim("claims"))?;
    let token = sign_compact(
        ring.signing_key(),
        ring.signing_header_b64(),
        &B64.encode(payload),
    );
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    Ok(token)
}

/// Verifies `token` against `ring` and `expect`, applying every rule of the
/// crate documentation in order, and returns its claims.
pub fn verify(ring: &KeyRing, token: &str, expect: &Expect<'_>) -> Result<Claims, TokenError> {
    let verified = verify_signed(ring, token, expect.now)?;
    check_claims(&verified.claims, expect)?;
    Ok(verified.claims)
}

/// `header_b64 "." payload_b64 "." BASE64URL(signature)`.
fn sign_compact(key: &SigningKey, header_b64: &str, payload_b64: &str) -> String {
    let mut token = String::with_capacity(header_b64.len() + payload_b64.len() + 88);
    token.push_str(header_b64);
    token.push('.');
    token.push_str(payload_b64);
    let signature = key.sign(token.as_bytes());
    token.push('.');
    B64.encode_string(signature, &mut token);
    token
}

/// A token whose structure, header and signature passed (rules 1–10), not
/// yet checked against time, issuer or audience.
pub(crate) struct Verified {
    pub(crate) claims: Claims,
    /// The kid of the key that signed it.
    pub(crate) kid: String,
}

/// Rules 1 to 10: size, structure, header, signature, claim types.
pub(crate) fn verify_signed(ring: &KeyRing, token: &str, now: u64) -> Result<Verified, TokenError> {
    // Rule 1.
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    // Rule 2: `signing_input` is everything before the last dot and must
    // itself hold exactly one dot.
    let three_segments = TokenError::Malformed("a token has exactly three segments");
    let (signing_input, signature_b64) = token.rsplit_once('.').ok_or(three_segments.clone())?;
    let (header_b64, payload_b64) = signing_input
        .split_once('.')
        .ok_or(three_segments.clone())?;
    if payload_b64.contains('.') {
        return Err(three_segments);
    }
    // Rule 3.
    let not_base64 = |_| TokenError::Malformed("a segment is not canonical unpadded base64url");
    let header = B64.decode(header_b64).map_err(not_base64)?;
    let payload = B64.decode(payload_b64).map_err(not_base64)?;
    let signature = B64.decode(signature_b64).map_err(not_base64)?;
    // Rule 4.
    let mut header = strict_json::parse_object(&header).map_err(|e| match e {
        ObjectError::NotAnObject => TokenError::Malformed("the header is not a JSON object"),
        ObjectError::DuplicateKey => TokenError::Malformed("a header key is repeated"),
    })?;
    // Rule 5.
    if !matches!(header.get("alg"), Some(Json::Str(alg)) if alg == "EdDSA") {
        return Err(TokenError::Algorithm);
    }
    // Rule 6.
    match header.get("typ") {
        Some(Json::Str(typ))
            if typ.eq_ignore_ascii_case("at+jwt")
                || typ.eq_ignore_ascii_case("application/at+jwt") => {}
        _ => return Err(TokenError::WrongType),
    }
    // Rule 7.
    if header.contains_key("crit") {
        return Err(TokenError::Malformed("the header has a crit parameter"));
    }
    // Rule 8.
    let Some(Json::Str(kid)) = header.remove("kid") else {
        return Err(TokenError::UnknownKey);
    };
    let key = ring
        .verifying_key(&kid, now)
        .ok_or(TokenError::UnknownKey)?;
    let signature: [u8; 64] = signature
        .as_slice()
        .try_into()
        .map_err(|_| TokenError::BadSignature)?;
    if !key.verify_strict(signing_input.as_bytes(), &signature) {
        return Err(TokenError::BadSignature);
    }
    // Rule 9: only now is the payload read at all.
    let mut claims = strict_json::parse_object(&payload).map_err(|e| match e {
        ObjectError::NotAnObject => TokenError::Malformed("the claims are not a JSON object"),
        ObjectError::DuplicateKey => TokenError::Malformed("a claim is repeated"),
    })?;
    // Rule 10.
    let claims = Claims {
        iss: take_string(&mut claims, "iss")?,
        sub: take_string(&mut claims, "sub")?,
        aud: take_string(&mut claims, "aud")?,
        exp: take_seconds(&mut claims, "exp")?,
        iat: take_seconds(&mut claims, "iat")?,
        nbf: take_seconds(&mut claims, "nbf")?,
        jti: take_string(&mut claims, "jti")?,
        client_id: take_string(&mut claims, "client_id")?,
        task_id: take_string(&mut claims, "task_id")?,
        agent_type: take_string(&mut claims, "agent_type")?,
        scope: take_string(&mut claims, "scope")?,
    };
    Ok(Verified { claims, kid })
}

/// Rules 11 to 14, on claims whose signature has been verified.
pub(crate) fn check_claims(claims: &Claims, expect: &Expect<'_>) -> Result<(), TokenError> {
    if claims.iss != expect.issuer {
        return Err(TokenError::WrongIssuer);
    }
    if claims.aud != expect.audience {
        return Err(TokenError::WrongAudience);
    }
    // No leeway here: a token is refused from its `exp` on, by the clock of
    // whichever replica checks it (RFC 7519 section 4.1.4, "on or after").
    // Clock skew only widens the start of a token's life (`nbf`, `iat`).
    if expect.now >= claims.exp {
        return Err(TokenError::Expired);
    }
    let latest_start = expect.now.saturating_add(LEEWAY_SECS);
    if claims.nbf > latest_start || claims.iat > latest_start {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

fn take_string(
    claims: &mut BTreeMap<String, Json>,
    name: &'static str,
) -> Result<String, TokenError> {
    match claims.remove(name) {
        Some(Json::Str(value)) => Ok(value),
        _ => Err(TokenError::Claim(name)),
    }
}

fn take_seconds(
    claims: &mut BTreeMap<String, Json>,
    name: &'static str,
) -> Result<u64, TokenError> {
    match claims.remove(name) {
        Some(Json::UInt(value)) => Ok(value),
        _ => Err(TokenError::Claim(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ISS: &str = "http://127.0.0.1:8787";
    const NOW: u64 = 1_700_000_000;

    fn ring() -> KeyRing {
        KeyRing::new(vec![SigningKey::generate(NOW - 100).unwrap()], 900).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            iss: ISS.into(),
            sub: "ingest-bot".into(),
            aud: ISS.into(),
            exp: NOW + 600,
            iat: NOW,
            nbf: NOW,
            jti: "jti_1".into(),
            client_id: "ingest-bot".into(),
            task_id: "tsk_1".into(),
            agent_type: "ingestion".into(),
            scope: "warehouse.connect schema.validate".into(),
        }
    }

    fn expect() -> Expect<'static> {
        Expect {
            issuer: ISS,
            audience: ISS,
            now: NOW,
        }
    }

    fn good_header(ring: &KeyRing) -> serde_json::Value {
        json!({"alg": "EdDSA", "typ": "at+jwt", "kid": ring.signing_kid()})
    }

    /// A validly signed token over arbitrary header and payload bytes.
    fn signed_raw(ring: &KeyRing, header: &str, payload: &str) -> String {
        sign_compact(
            ring.signing_key(),
            &B64.encode(header),
            &B64.encode(payload),
        )
    }

    fn signed(ring: &KeyRing, header: &serde_json::Value, payload: &serde_json::Value) -> String {
        signed_raw(ring, &header.to_string(), &payload.to_string())
    }

    fn claims_json() -> serde_json::Value {
        serde_json::to_value(claims()).unwrap()
    }

    fn check(ring: &KeyRing, token: &str) -> Result<Claims, TokenError> {
        verify(ring, token, &expect())
    }

    fn segments(token: &str) -> Vec<&str> {
        token.split('.').collect()
    }

    #[test]
    fn mint_then_verify() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        assert_eq!(check(&ring, &token).unwrap(), claims());
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(segments(&token)[0]).unwrap()).unwrap();
        assert_eq!(header, good_header(&ring));
        // The exact header bytes.
        assert_eq!(
            B64.decode(segments(&token)[0]).unwrap(),
            format!(
                r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{}"}}"#,
                ring.signing_kid()
            )
            .into_bytes()
        );
        assert!(token.len() < 1024);
    }

    #[test]
    fn rfc8037_a4_signature_vector() {
        // RFC 8037 appendix A.4: the RFC 8032 key signing the payload
        // "Example of Ed25519 signing" under the header {"alg":"EdDSA"}.
        let key = SigningKey::from_file_text(
            "portcullis-ed25519-key v1\ncreated: 1\nsecret: nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n",
        )
        .unwrap();
        let token = sign_compact(
            &key,
            &B64.encode(r#"{"alg":"EdDSA"}"#),
            &B64.encode("Example of Ed25519 signing"),
        );
        assert_eq!(
            token,
            "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }

    #[test]
    fn mint_refuses_what_the_ring_cannot_honour() {
        let ring = ring();
        let mut c = claims();
        c.exp = c.iat - 1;
        assert_eq!(mint(&ring, &c).unwrap_err(), TokenError::Claim("exp"));
        c.exp = c.iat + 901;
        assert_eq!(mint(&ring, &c).unwrap_err(), TokenError::Claim("exp"));
        c.exp = c.iat + 900;
        mint(&ring, &c).unwrap();
        c.scope = "x".repeat(MAX_TOKEN_BYTES);
        assert_eq!(mint(&ring, &c).unwrap_err(), TokenError::TooLarge);
    }

    // Rule 1.
    #[test]
    fn too_large() {
        let ring = ring();
        let mut c = claims();
        // Just under the limit verifies.
        let base = mint(&ring, &c).unwrap().len();
        c.scope
            .push_str(&"x".repeat((MAX_TOKEN_BYTES - base) * 3 / 4));
        let token = mint(&ring, &c).unwrap();
        assert!(token.len() <= MAX_TOKEN_BYTES && token.len() > MAX_TOKEN_BYTES - 16);
        check(&ring, &token).unwrap();
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(check(&ring, &huge).unwrap_err(), TokenError::TooLarge);
        let padded = format!("{token}{}", " ".repeat(MAX_TOKEN_BYTES + 1 - token.len()));
        assert_eq!(check(&ring, &padded).unwrap_err(), TokenError::TooLarge);
    }

    // Rule 2.
    #[test]
    fn exactly_three_segments() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        let s = segments(&token);
        for bad in [
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            s[0].to_owned(),
            format!("{}.{}", s[0], s[1]),
            format!("{}.{}.{}.", s[0], s[1], s[2]),
            format!("{}.{}.{}.{}", s[0], s[1], s[2], s[2]),
            format!("{}..{}.{}", s[0], s[1], s[2]),
            format!(".{}.{}.{}", s[0], s[1], s[2]),
        ] {
            assert!(
                matches!(check(&ring, &bad), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    // Rule 3.
    #[test]
    fn non_canonical_base64_is_malformed() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        let s = segments(&token);
        let padded = base64::engine::general_purpose::URL_SAFE;
        let (h, p, sig) = (
            B64.decode(s[0]).unwrap(),
            B64.decode(s[1]).unwrap(),
            B64.decode(s[2]).unwrap(),
        );
        let mut bad = vec![
            // Re-encoded with padding (the signature always needs `==`).
            format!(
                "{}.{}.{}",
                padded.encode(&h),
                padded.encode(&p),
                padded.encode(&sig)
            ),
            format!("{}.{}.{}", s[0], s[1], padded.encode(&sig)),
            format!("{}=.{}.{}", s[0], s[1], s[2]),
            // Standard alphabet (`+`, `/`): the first character of the
            // signature swapped for each, so the case never depends on
            // whether a random signature happens to encode a 62 or a 63.
            format!("{}.{}.+{}", s[0], s[1], &s[2][1..]),
            format!("{}.{}./{}", s[0], s[1], &s[2][1..]),
            // Whitespace.
            format!(" {token}"),
            format!("{token}\n"),
            format!("{}.{} .{}", s[0], s[1], s[2]),
            format!("{}.{}.{}\t", s[0], s[1], s[2]),
            // Impossible length (1 mod 4).
            format!("{}.{}.{}AAA", s[0], s[1], s[2]),
            // Non-ASCII.
            format!("{}.{}é.{}", s[0], s[1], s[2]),
        ];
        // Non-canonical trailing bits: the signature is 64 bytes, so its last
        // character carries 2 data bits and 4 bits that must be zero.
        let last = s[2].chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.find(last).unwrap();
        assert_eq!(idx & 0b1111, 0);
        let sneaky = alphabet.chars().nth(idx | 1).unwrap();
        bad.push(format!("{}{sneaky}", &token[..token.len() - 1]));
        for b in &bad {
            assert_ne!(b, &token, "a variant must differ from the token");
            assert!(
                matches!(check(&ring, b), Err(TokenError::Malformed(_))),
                "{b:?}"
            );
        }
        // The standard engine with lenient trailing bits decodes the sneaky
        // signature to the same bytes; we do not.
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
                .with_decode_allow_trailing_bits(true),
        );
        let sneaky_sig = format!("{}{sneaky}", &s[2][..s[2].len() - 1]);
        assert_eq!(lenient.decode(&sneaky_sig).unwrap(), sig);
    }

    // Rule 4.
    #[test]
    fn header_must_be_an_object_without_duplicates() {
        let ring = ring();
        let payload = claims_json().to_string();
        let kid = ring.signing_kid().to_owned();
        for header in [
            String::new(),
            "null".into(),
            "[]".into(),
            r#""EdDSA""#.into(),
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}"}} x"#),
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}""#),
        ] {
            let token = signed_raw(&ring, &header, &payload);
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Malformed("the header is not a JSON object"),
                "{header:?}"
            );
        }
        for header in [
            // Duplicate `alg`, either order, and escaped.
            format!(r#"{{"alg":"EdDSA","alg":"none","typ":"at+jwt","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"none","alg":"EdDSA","typ":"at+jwt","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","a\u006cg":"none"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","x":{{"a":1,"a":1}}}}"#),
        ] {
            let token = signed_raw(&ring, &header, &payload);
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Malformed("a header key is repeated"),
                "{header}"
            );
        }
        // Whitespace and key order inside the JSON are fine.
        let header = format!(r#" {{ "kid" : "{kid}", "typ":"at+jwt" ,"alg":"EdDSA" }} "#);
        check(&ring, &signed_raw(&ring, &header, &payload)).unwrap();
    }

    // Rule 5.
    #[test]
    fn only_eddsa() {
        let ring = ring();
        let payload = claims_json();
        let kid = ring.signing_kid();
        for alg in [
            json!("none"),
            json!("None"),
            json!("HS256"),
            json!("RS256"),
            json!("ES256"),
            json!("eddsa"),
            json!("EdDSA "),
            json!("Ed25519"),
            json!(""),
            json!(null),
            json!(["EdDSA"]),
            json!({"alg": "EdDSA"}),
        ] {
            let header = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
            let token = signed(&ring, &header, &payload);
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Algorithm,
                "{alg}"
            );
        }
        let header = json!({"typ": "at+jwt", "kid": kid});
        let token = signed(&ring, &header, &payload);
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::Algorithm);
    }

    #[test]
    fn alg_none_with_empty_signature() {
        let ring = ring();
        let header = json!({"alg": "none", "typ": "at+jwt", "kid": ring.signing_kid()});
        let token = format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(claims_json().to_string())
        );
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::Algorithm);
        // Without a kid, or without typ, too.
        let header = json!({"alg": "none"});
        let token = format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(claims_json().to_string())
        );
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::Algorithm);
    }

    #[test]
    fn hs256_with_the_public_key_as_secret() {
        // The classic key-confusion attack: HMAC-SHA256 keyed with the public
        // key bytes. It is refused on `alg` before any signature check, so
        // the HMAC value does not matter; here it is 32 bytes of the public
        // key itself to show the shape.
        let ring = ring();
        let header = json!({"alg": "HS256", "typ": "at+jwt", "kid": ring.signing_kid()});
        let token = format!(
            "{}.{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims_json().to_string()),
            B64.encode(ring.signing_key().public_key_bytes())
        );
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::Algorithm);
    }

    // Rule 6.
    #[test]
    fn typ_must_be_at_jwt() {
        let ring = ring();
        let payload = claims_json();
        let kid = ring.signing_kid();
        for typ in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/AT+JWT",
        ] {
            let token = signed(
                &ring,
                &json!({"alg": "EdDSA", "typ": typ, "kid": kid}),
                &payload,
            );
            check(&ring, &token).unwrap();
        }
        for typ in [
            json!("JWT"),
            json!("jwt"),
            json!("at+jwt "),
            json!("application/jwt"),
            json!("dpop+jwt"),
            json!(""),
            json!(null),
            json!(1),
        ] {
            let token = signed(
                &ring,
                &json!({"alg": "EdDSA", "typ": typ, "kid": kid}),
                &payload,
            );
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::WrongType,
                "{typ}"
            );
        }
        let token = signed(&ring, &json!({"alg": "EdDSA", "kid": kid}), &payload);
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::WrongType);
    }

    // Rule 7.
    #[test]
    fn crit_is_refused() {
        let ring = ring();
        let kid = ring.signing_kid();
        for crit in [json!(["exp"]), json!([]), json!(null)] {
            let header = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "crit": crit});
            let token = signed(&ring, &header, &claims_json());
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Malformed("the header has a crit parameter")
            );
        }
        // Unknown non-critical parameters are ignored, and never used to find
        // a key.
        let other = SigningKey::generate(0).unwrap();
        let header = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "jwk": other.public_jwk(), "jku": "http://evil"});
        check(&ring, &signed(&ring, &header, &claims_json())).unwrap();
    }

    // Rule 8: kid.
    #[test]
    fn kid_must_name_a_verifying_key() {
        let ring = ring();
        let payload = claims_json();
        for kid in [
            json!("nope"),
            json!(""),
            json!(null),
            json!(1),
            json!([ring.signing_kid()]),
        ] {
            let token = signed(
                &ring,
                &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid}),
                &payload,
            );
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::UnknownKey,
                "{kid}"
            );
        }
        let token = signed(&ring, &json!({"alg": "EdDSA", "typ": "at+jwt"}), &payload);
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::UnknownKey);
    }

    #[test]
    fn swapped_kid() {
        // Two keys in one ring; a token signed by one but naming the other
        // fails the signature check.
        let a = SigningKey::generate(NOW - 10).unwrap();
        let b = SigningKey::generate(NOW - 20).unwrap();
        let b_kid = b.kid().to_owned();
        let ring = KeyRing::new(vec![a, b], 900).unwrap();
        let header = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": b_kid});
        let token = signed(&ring, &header, &claims_json());
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::BadSignature);
        // And a token from a key of another ring is an unknown key.
        let foreign = KeyRing::new(vec![SigningKey::generate(NOW).unwrap()], 900).unwrap();
        let token = mint(&foreign, &claims()).unwrap();
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::UnknownKey);
    }

    // Rule 8: signature.
    #[test]
    fn tampered_payload() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        let s = segments(&token);
        let mut evil = claims();
        evil.scope = "warehouse.drop_everything".into();
        let evil_payload = B64.encode(serde_json::to_vec(&evil).unwrap());
        let forged = format!("{}.{}.{}", s[0], evil_payload, s[2]);
        assert_eq!(check(&ring, &forged).unwrap_err(), TokenError::BadSignature);
        // Same claims, different JSON spelling: still a different message.
        let respelled = B64.encode(serde_json::to_string_pretty(&claims()).unwrap());
        let forged = format!("{}.{}.{}", s[0], respelled, s[2]);
        assert_eq!(check(&ring, &forged).unwrap_err(), TokenError::BadSignature);
    }

    #[test]
    fn signature_must_be_64_valid_bytes() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        let s = segments(&token);
        let sig = B64.decode(s[2]).unwrap();
        for bad in [
            String::new(),
            B64.encode(&sig[..63]),
            B64.encode([sig.as_slice(), &[0]].concat()),
            B64.encode([0u8; 64]),
            B64.encode([0xffu8; 64]),
        ] {
            let t = format!("{}.{}.{bad}", s[0], s[1]);
            assert_eq!(check(&ring, &t).unwrap_err(), TokenError::BadSignature);
        }
        // S + L (the group order) is the same signature to a lenient
        // verifier; verify_strict refuses a non-canonical S.
        let mut malleable = sig.clone();
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for (byte, l_byte) in malleable[32..].iter_mut().zip(l) {
            let sum = u16::from(*byte) + u16::from(l_byte) + carry;
            *byte = sum.to_le_bytes()[0];
            carry = sum >> 8;
        }
        assert_eq!(carry, 0);
        let t = format!("{}.{}.{}", s[0], s[1], B64.encode(&malleable));
        assert_eq!(check(&ring, &t).unwrap_err(), TokenError::BadSignature);
    }

    // Rule 9.
    #[test]
    fn claims_must_be_an_object_without_duplicates() {
        let ring = ring();
        let header = good_header(&ring).to_string();
        for payload in ["", "[]", "null", "{", "Example of Ed25519 signing"] {
            let token = signed_raw(&ring, &header, payload);
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Malformed("the claims are not a JSON object")
            );
        }
        let body = claims_json().to_string();
        let body = body.strip_suffix('}').unwrap();
        for extra in [
            r#","aud":"http://evil""#,
            r#","aud":"http://127.0.0.1:8787""#,
            r#","\u0061ud":"http://evil""#,
            r#","exp":99999999999"#,
            r#","ext":{"a":[{"b":1,"b":2}]}"#,
        ] {
            let token = signed_raw(&ring, &header, &format!("{body}{extra}}}"));
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Malformed("a claim is repeated"),
                "{extra}"
            );
        }
    }

    // Rule 10.
    #[test]
    fn every_claim_present_with_its_type() {
        let ring = ring();
        let header = good_header(&ring);
        let strings = [
            "iss",
            "sub",
            "aud",
            "jti",
            "client_id",
            "task_id",
            "agent_type",
            "scope",
        ];
        let numbers = ["exp", "iat", "nbf"];
        for name in strings.iter().chain(&numbers) {
            let mut payload = claims_json();
            payload.as_object_mut().unwrap().remove(*name);
            let token = signed(&ring, &header, &payload);
            assert_eq!(
                check(&ring, &token).unwrap_err(),
                TokenError::Claim(name),
                "{name}"
            );
        }
        for name in strings {
            for value in [
                json!(1),
                json!(null),
                json!(true),
                json!(["x"]),
                json!({"x": 1}),
            ] {
                let mut payload = claims_json();
                payload[name] = value.clone();
                let token = signed(&ring, &header, &payload);
                assert_eq!(
                    check(&ring, &token).unwrap_err(),
                    TokenError::Claim(name),
                    "{name}={value}"
                );
            }
        }
        // `aud` as an array (allowed by RFC 7519, not by us).
        let mut payload = claims_json();
        payload["aud"] = json!([ISS]);
        assert_eq!(
            check(&ring, &signed(&ring, &header, &payload)).unwrap_err(),
            TokenError::Claim("aud")
        );
        let body = claims_json().to_string();
        for name in numbers {
            let current = claims_json()[name].as_u64().unwrap();
            for value in [
                format!("\"{current}\""),
                format!("{current}.0"),
                "1.5e9".to_owned(),
                "17e8".to_owned(),
                format!("-{current}"),
                "-0".to_owned(),
                "18446744073709551616".to_owned(),
                "true".to_owned(),
                "null".to_owned(),
                format!("[{current}]"),
            ] {
                let payload = body.replace(
                    &format!("\"{name}\":{current}"),
                    &format!("\"{name}\":{value}"),
                );
                assert_ne!(payload, body);
                let token = signed_raw(&ring, &header.to_string(), &payload);
                assert_eq!(
                    check(&ring, &token).unwrap_err(),
                    TokenError::Claim(name),
                    "{name}={value}"
                );
            }
        }
        // Unknown extra claims are allowed.
        let mut payload = claims_json();
        payload["cnf"] = json!({"jkt": "abc"});
        payload["extra"] = json!([1, 2.5, null]);
        assert_eq!(
            check(&ring, &signed(&ring, &header, &payload)).unwrap(),
            claims()
        );
    }

    // Rule 11.
    #[test]
    fn wrong_issuer() {
        let ring = ring();
        let mut c = claims();
        c.iss = "http://evil".into();
        let token = mint(&ring, &c).unwrap();
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::WrongIssuer);
        c.iss = format!("{ISS}/");
        let token = mint(&ring, &c).unwrap();
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::WrongIssuer);
    }

    // Rule 12.
    #[test]
    fn wrong_audience() {
        let ring = ring();
        let mut c = claims();
        c.aud = "warehouse".into();
        let token = mint(&ring, &c).unwrap();
        let err = check(&ring, &token).unwrap_err();
        assert_eq!(err, TokenError::WrongAudience);
        assert_eq!(err.reason(), portcullis_core::Reason::WrongAudience);
        let upstream = Expect {
            audience: "warehouse",
            ..expect()
        };
        assert_eq!(verify(&ring, &token, &upstream).unwrap(), c);
    }

    // Rule 13.
    #[test]
    fn expired() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        let exp = claims().exp;
        for now in [NOW, exp - 1] {
            verify(&ring, &token, &Expect { now, ..expect() }).unwrap();
        }
        for now in [exp, exp + 1, exp + LEEWAY_SECS, u64::MAX] {
            let err = verify(&ring, &token, &Expect { now, ..expect() }).unwrap_err();
            assert_eq!(err, TokenError::Expired);
            assert_eq!(err.reason(), portcullis_core::Reason::TokenExpired);
        }
        // Saturating: an exp near u64::MAX does not wrap into the past.
        let mut c = claims();
        c.exp = u64::MAX;
        c.iat = u64::MAX - 600;
        c.nbf = 0;
        let token = mint(&ring, &c).unwrap();
        verify(
            &ring,
            &token,
            &Expect {
                now: u64::MAX - 1,
                ..expect()
            },
        )
        .unwrap();
    }

    // Rule 14.
    #[test]
    fn not_yet_valid() {
        let ring = ring();
        let mut c = claims();
        c.nbf = NOW + LEEWAY_SECS;
        check(&ring, &mint(&ring, &c).unwrap()).unwrap();
        c.nbf = NOW + LEEWAY_SECS + 1;
        assert_eq!(
            check(&ring, &mint(&ring, &c).unwrap()).unwrap_err(),
            TokenError::NotYetValid
        );
        let mut c = claims();
        c.iat = NOW + LEEWAY_SECS + 1;
        c.exp = c.iat + 600;
        assert_eq!(
            check(&ring, &mint(&ring, &c).unwrap()).unwrap_err(),
            TokenError::NotYetValid
        );
    }

    #[test]
    fn rules_apply_in_order() {
        let ring = ring();
        // Expired *and* wrong audience: audience is checked first.
        let mut c = claims();
        c.aud = "elsewhere".into();
        let token = mint(&ring, &c).unwrap();
        let late = Expect {
            now: NOW + 10_000,
            ..expect()
        };
        assert_eq!(
            verify(&ring, &token, &late).unwrap_err(),
            TokenError::WrongAudience
        );
        // Bad signature and bad claim types: the signature decides (no claim
        // is looked at before it verifies).
        let header = good_header(&ring);
        let token = signed(&ring, &header, &json!({"exp": "soon"}));
        let s = segments(&token);
        let forged = format!("{}.{}.{}", s[0], s[1], B64.encode([1u8; 64]));
        assert_eq!(check(&ring, &forged).unwrap_err(), TokenError::BadSignature);
        assert_eq!(check(&ring, &token).unwrap_err(), TokenError::Claim("iss"));
    }

    #[test]
    fn errors_never_contain_token_bytes() {
        let ring = ring();
        let token = mint(&ring, &claims()).unwrap();
        let s = segments(&token);
        let attempts = [
            format!("{}.{}", s[0], s[1]),
            format!("{}=.{}.{}", s[0], s[1], s[2]),
            format!("{}.{}.{}", s[0], B64.encode("{\"iss\":1}"), s[2]),
        ];
        for t in attempts {
            let message = check(&ring, &t).unwrap_err().to_string();
            for seg in &s {
                assert!(!message.contains(&seg[..8.min(seg.len())]), "{message}");
            }
            assert!(!message.contains(ISS));
        }
    }

    #[test]
    fn rotation_old_key_verifies_during_its_window_only() {
        let lifetime = 900;
        let old = SigningKey::generate(NOW - 5_000).unwrap();
        let old_file = old.to_file_text();
        let old_ring = KeyRing::new(vec![old], lifetime).unwrap();
        // A token minted by the old key just before rotation.
        let rotation = NOW;
        let mut c = claims();
        c.iat = rotation - 1;
        c.nbf = rotation - 1;
        c.exp = rotation - 1 + lifetime;
        let token = mint(&old_ring, &c).unwrap();

        let new = SigningKey::generate(rotation).unwrap();
        let old = SigningKey::from_file_text(&old_file).unwrap();
        let ring = KeyRing::new(vec![old, new], lifetime).unwrap();
        assert_ne!(ring.signing_kid(), old_ring.signing_kid());
        let until = rotation + lifetime + LEEWAY_SECS;
        let at = |now| Expect { now, ..expect() };
        // The old token verifies through its whole life…
        for now in [rotation, c.exp - 1] {
            assert_eq!(verify(&ring, &token, &at(now)).unwrap(), c);
        }
        let jwks = ring.jwks(until);
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        // …and after the window the key is gone from verification and JWKS.
        assert_eq!(
            verify(&ring, &token, &at(until + 1)).unwrap_err(),
            TokenError::UnknownKey
        );
        let jwks = ring.jwks(until + 1);
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert_eq!(jwks["keys"][0]["kid"], ring.signing_kid());
        // New tokens are signed by the new key.
        let fresh = mint(&ring, &claims()).unwrap();
        let header = B64.decode(segments(&fresh)[0]).unwrap();
        assert!(
            String::from_utf8(header)
                .unwrap()
                .contains(ring.signing_kid())
        );
    }
}
