//! Task tokens for Portcullis: Ed25519 signing keys and their key file, the
//! key ring with rotation windows and JWKS, RFC 9068 access tokens (`at+jwt`)
//! minted and verified by a hand-written, strict JWS compact serialization,
//! a verified-signature cache, detached signatures over domain-separated
//! messages (audit checkpoints), opaque random tokens and SHA-256 helpers.
//!
//! The crate is pure: keys and time in, bytes out. It reads no files, opens
//! no sockets and never looks at a clock; time is always a `now: u64` of unix
//! seconds passed in by the caller. The one thing it asks the operating
//! system for is randomness (through `getrandom`), for new keys and for
//! [`random_token`] / [`random_id`].
//!
//! No JWT library is used: the format below is small, and writing it out
//! lets every byte a verifier accepts be listed, tested and fuzzed. A token
//! that is not exactly what [`mint`] could have produced (up to the
//! tolerances listed here) is rejected.
//!
//! ```
//! use portcullis_token::{Claims, Expect, KeyRing, SigningKey, mint, verify};
//!
//! let now = 1_700_000_000;
//! let ring = KeyRing::new(vec![SigningKey::generate(now)?], 900)?;
//! let claims = Claims {
//!     iss: "http://127.0.0.1:8787".into(),
//!     sub: "ingest-bot".into(),
//!     aud: "http://127.0.0.1:8787".into(),
//!     exp: now + 600,
//!     iat: now,
//!     nbf: now,
//!     jti: portcullis_token::random_id("jti_")?,
//!     client_id: "ingest-bot".into(),
//!     task_id: "tsk_1".into(),
//!     agent_type: "ingestion".into(),
//!     scope: "warehouse.connect schema.validate".into(),
//! };
//! let token = mint(&ring, &claims)?;
//! let expect = Expect { issuer: "http://127.0.0.1:8787", audience: "http://127.0.0.1:8787", now };
//! assert_eq!(verify(&ring, &token, &expect)?, claims);
//! # Ok::<(), portcullis_token::TokenError>(())
//! ```
//!
//! # The token, byte by byte
//!
//! A token is ASCII text of at most [`MAX_TOKEN_BYTES`] (8192) bytes:
//!
//! ```text
//! BASE64URL(header) "." BASE64URL(claims) "." BASE64URL(signature)
//! ```
//!
//! - `BASE64URL` is RFC 4648 section 5 (alphabet `A–Z a–z 0–9 - _`) **without
//!   padding**, and canonical: the unused low bits of the last character must
//!   be zero, so every byte string has exactly one accepted encoding.
//! - `header` is the UTF-8 JSON object
//!   `{"alg":"EdDSA","typ":"at+jwt","kid":"<kid>"}` (minted in exactly this
//!   order, without whitespace), where `<kid>` is the RFC 7638 thumbprint of
//!   the signing key (see [`SigningKey::kid`]).
//! - `claims` is the UTF-8 JSON object of [`Claims`]: `iss`, `sub`, `aud`,
//!   `jti`, `client_id`, `task_id`, `agent_type`, `scope` as JSON strings and
//!   `exp`, `iat`, `nbf` as JSON integers (unix seconds).
//! - `signature` is the 64-byte Ed25519 (RFC 8032, pure Ed25519) signature
//!   of the ASCII bytes `BASE64URL(header) "." BASE64URL(claims)`, that is,
//!   of the token up to (not including) its second `.`.
//!
//! # Verification, rule by rule
//!
//! [`verify`] applies these rules in this order; the first that fails
//! decides the error. Nothing from the claims is looked at before the
//! signature has been checked (rule 8), and no error message ever contains
//! bytes of the token.
//!
//! 1. **Size.** More than [`MAX_TOKEN_BYTES`] bytes → [`TokenError::TooLarge`].
//!    This bounds every later step (decoding, JSON depth and key count).
//! 2. **Segments.** The token must contain exactly two `.` bytes, i.e. three
//!    segments (an empty segment is still a segment and fails a later rule)
//!    → otherwise [`TokenError::Malformed`].
//! 3. **Encoding.** Each segment must be canonical unpadded base64url: any
//!    byte outside the alphabet (`=`, `+`, `/`, space, tab, CR, LF, non-ASCII)
//!    is rejected, as is a segment whose length is 1 mod 4 and a last
//!    character with non-zero unused bits (`…Q` where `…A` is canonical)
//!    → [`TokenError::Malformed`]. All three segments are decoded before
//!    anything else is looked at; decoding is not trusting.
//! 4. **Header JSON.** The decoded header must be one JSON object (RFC 8259,
//!    UTF-8, no byte-order mark, nothing but whitespace after it), with
//!    no key repeated at any depth. Keys are compared after unescaping, so
//!    `"alg"` and `"a\u006cg"` are the same key. A second `alg` must not be
//!    able to mean one thing to us and another to a different parser
//!    → [`TokenError::Malformed`].
//! 5. **`alg`.** Must be present and be the JSON string `"EdDSA"`, byte for
//!    byte (`"none"`, `"HS256"`, `"RS256"`, `"ES256"`, `"eddsa"`, a
//!    non-string, or no `alg` at all) → [`TokenError::Algorithm`].
//! 6. **`typ`.** Must be present and be `"at+jwt"` or `"application/at+jwt"`,
//!    ASCII case-insensitively (RFC 9068 section 4) → [`TokenError::WrongType`].
//!    This keeps an ID token or a per-hop credential of another type from
//!    being replayed as an access token.
//! 7. **`crit`.** Present with any value → [`TokenError::Malformed`]: we
//!    understand no extensions, so none may be critical. Other header
//!    parameters (`jku`, `jwk`, `x5u`, `x5c`, …) are ignored; the key is only
//!    ever chosen from the ring, never from the token.
//! 8. **`kid` and signature.** `kid` must be a JSON string naming a key of the
//!    ring that is still verifying at `now` (see [`KeyRing::new`])
//!    → otherwise [`TokenError::UnknownKey`]. The signature segment must
//!    decode to exactly 64 bytes and pass ed25519-dalek's `verify_strict`
//!    (rejects non-canonical `S`, small-order `R` and weak public keys)
//!    over the signing input → otherwise [`TokenError::BadSignature`].
//! 9. **Claims JSON.** Same as rule 4 for the decoded claims (a JSON object,
//!    no duplicate key at any depth, so a second `aud` cannot be smuggled)
//!    → [`TokenError::Malformed`].
//! 10. **Claim types.** Every field of [`Claims`] must be present with its
//!     JSON type: the eight string claims must be JSON strings; `exp`, `iat`
//!     and `nbf` must be JSON integers written without a sign, a fraction or
//!     an exponent, and fitting a `u64` (`1.5e9`, `1700000000.0`, `-1`,
//!     `"1700000000"`, `true`, `null` are all rejected)
//!     → [`TokenError::Claim`] naming the claim. `aud` must be a single string,
//!     not the array form RFC 7519 also allows. Claims not in [`Claims`] are
//!     allowed (duplicate-checked, then ignored).
//! 11. **Issuer.** `iss` must equal [`Expect::issuer`] byte for byte
//!     → [`TokenError::WrongIssuer`].
//! 12. **Audience.** `aud` must equal [`Expect::audience`] byte for byte
//!     → [`TokenError::WrongAudience`].
//! 13. **Expiry.** `now >= exp` → [`TokenError::Expired`] (no leeway: the
//!     token dies at `exp` on the verifier's clock).
//! 14. **Not yet valid.** `nbf > now + LEEWAY_SECS` or
//!     `iat > now + LEEWAY_SECS` → [`TokenError::NotYetValid`].
//!
//! [`LEEWAY_SECS`] (30 s) is the clock skew allowed between the replicas
//! that mint and verify. All time arithmetic saturates; it cannot wrap.
//!
//! # The key file, byte by byte
//!
//! A key file is UTF-8 (in fact ASCII) text of exactly three lines, each
//! ended by a line feed (`0x0A`), the last line feed being optional:
//!
//! ```text
//! portcullis-ed25519-key v1\n
//! created: <unix seconds>\n
//! secret: <seed>\n
//! ```
//!
//! - Line 1 is the 25 bytes `portcullis-ed25519-key v1`: the format and its
//!   version. Another version is another format and is rejected.
//! - Line 2 is `created: ` (with one space) and the key's creation time in
//!   unix seconds as decimal ASCII digits: no sign, no leading zero (except
//!   `0` itself), at most `u64::MAX`. This orders keys in a [`KeyRing`]:
//!   the newest signs.
//! - Line 3 is `secret: ` (with one space) and the 32-byte Ed25519 seed
//!   (RFC 8032 "private key") as canonical unpadded base64url: exactly 43
//!   characters of `A–Z a–z 0–9 - _`, the last one with its two unused bits
//!   zero.
//!
//! So a file is `88 + d` bytes, `d` being the number of digits of `created`
//! (or one byte less without the final line feed). The file of the RFC 8032
//! test key 1, created at 1:
//!
//! ```text
//! portcullis-ed25519-key v1
//! created: 1
//! secret: nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A
//! ```
//!
//! Nothing else is accepted: no carriage return (so no CRLF), no blank or
//! comment line, no leading or trailing space, no second trailing newline.
//! The `kid` is not stored; it is derived from the public key (RFC 7638),
//! so it cannot disagree with the key. Write the file with mode `0600`.
//!
//! Errors name the line at fault and never echo its content.
//!
//! # Keys, rotation and the cache
//!
//! A [`SigningKey`] is read from and written to the key file above. A
//! [`KeyRing`] signs with its newest key and keeps verifying with older ones
//! for as long as a token they signed can still be accepted; [`KeyRing::jwks`]
//! publishes exactly the keys that still verify. [`VerifyCache`] skips the
//! decoding and signature check for a token seen before, but still checks
//! time, issuer, audience and that the signing key is still in the ring.
//! Revocation is not this crate's business: the gateway checks it on every
//! call, cached or not.
//!
//! # Detached signatures (audit checkpoints)
//!
//! The same keys sign audit checkpoints (docs/audit-format.md,
//! "Checkpoints"). The signed bytes are the ASCII text
//!
//! ```text
//! portcullis-audit-checkpoint-v1\n<seq>\n<hash>\n<ts>
//! ```
//!
//! signed with pure Ed25519 and sent as the 64-byte signature in canonical
//! unpadded base64url (86 characters) next to the signing key's `kid`.
//! [`KeyRing::sign_detached`] signs, [`KeyRing::verify_detached`] (any key in
//! the ring) and [`verify_detached_with_jwks`] (a JWKS document) verify.
//!
//! One key signing two kinds of message is safe only if no message of one
//! kind can be read as a message of the other. So the signer and both
//! verifiers are **domain-separated**: they only accept a message that
//! starts with a known domain prefix. Today there is one,
//! [`CHECKPOINT_DOMAIN`] = `portcullis-audit-checkpoint-v1\n`; a new kind of
//! detached message gets its own prefix, never a prefix of (nor prefixed
//! by) an existing one.
//!
//! - A JWS signing input is made only of base64url characters and one `.`
//!   (it starts with `eyJ`, base64url of `{"`); every domain prefix holds a
//!   line feed, so no signing input lies in a domain.
//!   [`KeyRing::sign_detached`] refuses it ([`TokenError::Domain`]), so it
//!   cannot be used to mint a token, and the verifiers refuse a token's
//!   signature presented as a detached one.
//! - The other way round, a checkpoint message holds line feeds, which rule 3
//!   above rejects, so a checkpoint signature never verifies as a token.
//! - Verification is as strict as for tokens: exactly 64 canonically encoded
//!   bytes and ed25519-dalek's `verify_strict`.
//!
//! Checkpoints must stay verifiable long after rotation, so
//! [`KeyRing::verify_detached`] uses every key of the ring, including those
//! that no longer verify tokens: keep old key files in the ring for as long
//! as their checkpoints are to be verified. A JWKS, in contrast, only holds
//! the keys still verifying tokens when it was taken ([`KeyRing::jwks`]);
//! [`verify_detached_with_jwks`] needs one that still lists the checkpoint's
//! key, and it also checks that the `kid` is the RFC 7638 thumbprint of the
//! key it names, so a JWKS cannot slip another key in under a known `kid`.

#![warn(missing_docs)]

mod cache;
mod detached;
mod jws;
mod key;
mod ring;
mod secret;
mod strict_json;

pub use cache::VerifyCache;
pub use detached::{CHECKPOINT_DOMAIN, verify_detached_with_jwks};
pub use jws::{Claims, Expect, mint, verify};
pub use key::{KeyFileError, SigningKey};
pub use ring::KeyRing;
pub use secret::{matches_sha256, random_id, random_token, sha256_hex};

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use portcullis_core::Reason;

/// Clock skew allowed between the machine that minted a token and the one
/// verifying it, in seconds: a token is accepted up to 30 s before its
/// `nbf`/`iat`. It never extends `exp`: a token is refused from its `exp`
/// on, so a 1-minute token lives 1 minute.
pub const LEEWAY_SECS: u64 = 30;

/// The largest token [`verify`] looks at, in bytes. A minted access token
/// is well under 1 KiB; this leaves room for long scopes while bounding the
/// work an unauthenticated caller can cause.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Canonical unpadded base64url (RFC 4648 section 5): no `=`, and the unused
/// bits of the last character must be zero, so each byte string has one
/// accepted encoding.
pub(crate) const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// Why a token could not be minted or verified, or a key ring built.
///
/// Messages are lowercase, and never contain bytes of the token or of a key.
/// [`TokenError::reason`] gives the stable reason code for the API and audit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not a well-formed JWS compact serialization (segments,
    /// base64url, JSON, duplicate keys, `crit`).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is missing or is not `EdDSA`.
    #[error("token algorithm is not EdDSA")]
    Algorithm,
    /// The header's `kid` is missing or names no key that still verifies.
    #[error("token is signed with an unknown or retired key")]
    UnknownKey,
    /// The signature is not 64 bytes or does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// A claim is missing or has the wrong JSON type (or, when minting, a
    /// value the ring cannot honour); the payload names the claim.
    #[error("token claim `{0}` is missing or invalid")]
    Claim(&'static str),
    /// `exp` (plus leeway) has passed.
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the expected issuer.
    #[error("token issuer is not the expected issuer")]
    WrongIssuer,
    /// `aud` is not the expected audience.
    #[error("token audience is not this service")]
    WrongAudience,
    /// The header's `typ` is not `at+jwt`.
    #[error("token type is not at+jwt")]
    WrongType,
    /// The token is longer than [`MAX_TOKEN_BYTES`] (or minting would make
    /// one that is).
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Random,
    /// A key ring cannot be built from these keys (none, or the same key
    /// twice). Never returned by [`verify`].
    #[error("invalid key ring: {0}")]
    KeyRing(&'static str),
    /// [`KeyRing::sign_detached`] was asked to sign a message that does not
    /// start with a known domain prefix (see [`CHECKPOINT_DOMAIN`]). Never
    /// returned by [`verify`].
    #[error("refusing to sign a message outside every known signing domain")]
    Domain,
}

impl TokenError {
    /// The stable reason code (DESIGN section 2) for this error:
    /// [`Reason::TokenExpired`] for [`TokenError::Expired`],
    /// [`Reason::WrongAudience`] for [`TokenError::WrongAudience`] and
    /// [`Reason::TokenInvalid`] for everything else.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Expired => Reason::TokenExpired,
            Self::WrongAudience => Reason::WrongAudience,
            Self::Malformed(_)
            | Self::Algorithm
            | Self::UnknownKey
            | Self::BadSignature
            | Self::Claim(_)
            | Self::NotYetValid
            | Self::WrongIssuer
            | Self::WrongType
            | Self::TooLarge
            | Self::Random
            | Self::KeyRing(_)
            | Self::Domain => Reason::TokenInvalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn reason_codes() {
        assert_eq!(TokenError::Expired.reason(), Reason::TokenExpired);
        assert_eq!(TokenError::WrongAudience.reason(), Reason::WrongAudience);
        for e in [
            TokenError::Malformed("x"),
            TokenError::Algorithm,
            TokenError::UnknownKey,
            TokenError::BadSignature,
            TokenError::Claim("exp"),
            TokenError::NotYetValid,
            TokenError::WrongIssuer,
            TokenError::WrongType,
            TokenError::TooLarge,
            TokenError::Random,
            TokenError::KeyRing("empty"),
            TokenError::Domain,
        ] {
            assert_eq!(e.reason(), Reason::TokenInvalid, "{e:?}");
        }
    }

    #[test]
    fn base64_is_canonical_and_unpadded() {
        assert_eq!(B64.encode(b"\xfb\xff"), "-_8");
        assert_eq!(B64.decode("-_8").unwrap(), b"\xfb\xff");
        for bad in ["-_8=", "+/8", "-_ 8", "-_8\n", "-_9", "QQ=="] {
            assert!(B64.decode(bad).is_err(), "{bad:?} must be rejected");
        }
        // "QQ" is the canonical encoding of "A"; "QR" has non-zero unused bits.
        assert_eq!(B64.decode("QQ").unwrap(), b"A");
        assert!(B64.decode("QR").is_err());
        // A length of 1 mod 4 never encodes anything.
        assert!(B64.decode("QUJDR").is_err());
    }
}
