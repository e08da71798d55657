//! Ed25519 signing keys, their `kid` and JWK, and the key file.
//!
//! The file format is documented byte by byte in the crate documentation
//! ("The key file, byte by byte").

use std::fmt::{self, Write as _};

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use sha2::{Digest as _, Sha256};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::{B64, TokenError};

const MAGIC: &str = "portcullis-ed25519-key v1";
const CREATED: &str = "created: ";
const SECRET: &str = "secret: ";
/// Unpadded base64 of 32 bytes.
const SEED_B64_LEN: usize = 43;

/// An Ed25519 signing key with its creation time and `kid`.
///
/// The secret is zeroized when the key is dropped, and `Debug` shows only
/// the `kid` and creation time. It deliberately is not `Clone`: share it
/// through a [`crate::KeyRing`].
pub struct SigningKey {
    secret: ed25519_dalek::SigningKey,
    created_at: u64,
    /// Base64url of the 32-byte public key (the JWK `x`).
    x: String,
    /// RFC 7638 thumbprint of the public JWK.
    kid: String,
}

// INVARIANT: the only secret field is `ed25519_dalek::SigningKey`, which
// zeroizes itself on drop (the workspace enables its `zeroize` feature).
impl ZeroizeOnDrop for SigningKey {}
const _: fn() = || {
    fn zeroized_on_drop<T: ZeroizeOnDrop>() {}
    zeroized_on_drop::<ed25519_dalek::SigningKey>();
};

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Why a key file was rejected. Messages name the line at fault; they never
/// contain the file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file is not three lines ended by single line feeds.
    #[error(
        "key file must be exactly three lines (`portcullis-ed25519-key v1`, `created: …`, `secret: …`) separated by line feeds, with at most one final line feed and no carriage returns"
    )]
    Layout,
    /// Line 1 is not the format line.
    #[error("line 1 of the key file must be `portcullis-ed25519-key v1`")]
    Header,
    /// Line 2 is not `created: <unix seconds>`.
    #[error(
        "line 2 of the key file must be `created: <unix seconds>` (decimal digits, no sign or leading zeros)"
    )]
    Created,
    /// Line 3 is not `secret: <43 base64url characters>`.
    #[error(
        "line 3 of the key file must be `secret: ` followed by the 32-byte Ed25519 seed as 43 characters of unpadded base64url"
    )]
    Secret,
}

impl SigningKey {
    /// A new key from 32 bytes of OS randomness.
    ///
    /// `created_at` (unix seconds) orders keys in a ring: the newest signs.
    pub fn generate(created_at: u64) -> Result<Self, TokenError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).map_err(|_| TokenError::Random)?;
        Ok(Self::from_seed(&seed, created_at))
    }

    /// Reads a key file (format: the crate documentation, "The key file,
    /// byte by byte").
    ///
    /// The caller owns `text` and should zeroize it after use (e.g. read it
    /// into a `Zeroizing<String>`).
    pub fn from_file_text(text: &str) -> Result<Self, KeyFileError> {
        let body = text.strip_suffix('\n').unwrap_or(text);
        if body.contains('\r') {
            return Err(KeyFileError::Layout);
        }
        let mut lines = body.split('\n');
        let (Some(magic), Some(created), Some(secret), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(KeyFileError::Layout);
        };
        if magic != MAGIC {
            return Err(KeyFileError::Header);
        }
        let created_at = created
            .strip_prefix(CREATED)
            .and_then(parse_unix_seconds)
            .ok_or(KeyFileError::Created)?;
        let seed_b64 = secret.strip_prefix(SECRET).ok_or(KeyFileError::Secret)?;
        if seed_b64.len() != SEED_B64_LEN {
            return Err(KeyFileError::Secret);
        }
        // 43 characters decode to 32 bytes; the larger buffer is only there
        // because base64 wants room for its conservative estimate.
        let mut buffer = Zeroizing::new([0u8; 33]);
        let decoded = B64
            .decode_slice(seed_b64, buffer.as_mut_slice())
            .map_err(|_| KeyFileError::Secret)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        match buffer.get(..decoded) {
            Some(bytes) if bytes.len() == 32 => seed.copy_from_slice(bytes),
            _ => return Err(KeyFileError::Secret),
        }
        Ok(Self::from_seed(&seed, created_at))
    }

    /// The key file text for this key (format: the crate documentation),
    /// zeroized on drop.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let seed = Zeroizing::new(self.secret.to_bytes());
        // Reserve everything up front so the buffer never reallocates and
        // leaves an unzeroized copy of the secret behind.
        let mut text = Zeroizing::new(String::with_capacity(128));
        text.push_str(MAGIC);
        text.push('\n');
        text.push_str(CREATED);
        // Writing to a String cannot fail.
        let _ = write!(text, "{}", self.created_at);
        text.push('\n');
        text.push_str(SECRET);
        B64.encode_string(seed.as_slice(), &mut text);
        text.push('\n');
        text
    }

    /// The key id: the RFC 7638 JWK thumbprint of the public key, that is
    /// base64url (unpadded) of SHA-256 over the UTF-8 bytes of
    /// `{"crv":"Ed25519","kty":"OKP","x":"<x>"}` (members in lexicographic
    /// order, no whitespace), 43 characters.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// When the key was created, in unix seconds.
    pub fn created_at(&self) -> u64 {
        self.created_at
    }

    /// The public key as a JWK (RFC 8037):
    /// `{"kty":"OKP","crv":"Ed25519","x":…,"kid":…,"alg":"EdDSA","use":"sig"}`.
    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.x,
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.secret.verifying_key().to_bytes()
    }

    fn from_seed(seed: &[u8; 32], created_at: u64) -> Self {
        let secret = ed25519_dalek::SigningKey::from_bytes(seed);
        let x = B64.encode(secret.verifying_key().as_bytes());
        let kid = thumbprint(&x);
        Self {
            secret,
            created_at,
            x,
            kid,
        }
    }

    /// Signs `message`. Crate-private: the only things this key signs are
    /// JWS signing inputs built by [`crate::mint`] and domain-prefixed
    /// messages passed to [`crate::KeyRing::sign_detached`]; the two sets of
    /// messages are disjoint (crate documentation, "Detached signatures").
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.secret.sign(message).to_bytes()
    }

    /// Strict Ed25519 verification (RFC 8032 plus ed25519-dalek's checks
    /// against small-order and non-canonical points).
    pub(crate) fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.secret.verify_strict(message, &signature).is_ok()
    }
}

/// RFC 7638 thumbprint of an Ed25519 OKP key whose JWK `x` is `x` (which
/// must be base64url: it is not JSON-escaped).
pub(crate) fn thumbprint(x: &str) -> String {
    // INVARIANT: `x` is base64url, so it needs no JSON escaping.
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    B64.encode(Sha256::digest(canonical.as_bytes()))
}

/// Decimal unix seconds: digits only, no leading zero unless the number is
/// `0`, fits a `u64`.
fn parse_unix_seconds(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const RFC8032_SIGNATURE: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn file_for_seed(seed: &[u8], created: u64) -> String {
        format!(
            "portcullis-ed25519-key v1\ncreated: {created}\nsecret: {}\n",
            B64.encode(seed)
        )
    }

    pub(crate) fn rfc8032_key() -> SigningKey {
        SigningKey::from_file_text(&file_for_seed(&unhex(RFC8032_SEED), 1)).unwrap()
    }

    #[test]
    fn rfc8032_test_vector_1() {
        let key = rfc8032_key();
        assert_eq!(key.public_key_bytes().to_vec(), unhex(RFC8032_PUBLIC));
        let jwk = key.public_jwk();
        let x = B64.decode(jwk["x"].as_str().unwrap()).unwrap();
        assert_eq!(x, unhex(RFC8032_PUBLIC));
        let signature = key.sign(b"");
        assert_eq!(signature.to_vec(), unhex(RFC8032_SIGNATURE));
        assert!(key.verify_strict(b"", &signature));
        assert!(!key.verify_strict(b"x", &signature));
    }

    #[test]
    fn rfc7638_thumbprint_of_the_rfc8032_key() {
        let key = rfc8032_key();
        // Computed independently of `thumbprint`: the canonical JWK with its
        // required members in lexicographic order, hashed, encoded.
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(unhex(RFC8032_PUBLIC));
        assert_eq!(x, "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        let canonical = String::from(r#"{"crv":"Ed25519","kty":"OKP","x":""#) + &x + r#""}"#;
        let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(canonical.as_bytes()));
        assert_eq!(key.kid(), expected);
        // RFC 8037 appendix A.3 publishes the same thumbprint.
        assert_eq!(key.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn public_jwk_members() {
        let key = rfc8032_key();
        assert_eq!(
            key.public_jwk(),
            serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
                "alg": "EdDSA",
                "use": "sig",
            })
        );
    }

    #[test]
    fn key_file_round_trip() {
        let key = SigningKey::generate(1_700_000_000).unwrap();
        let text = key.to_file_text();
        assert!(text.starts_with("portcullis-ed25519-key v1\ncreated: 1700000000\nsecret: "));
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), 3);
        assert_eq!(text.len(), 88 + "1700000000".len());
        let again = SigningKey::from_file_text(&text).unwrap();
        assert_eq!(again.kid(), key.kid());
        assert_eq!(again.created_at(), 1_700_000_000);
        assert_eq!(again.public_key_bytes(), key.public_key_bytes());
        assert_eq!(*again.to_file_text(), *text);
        // Without the final newline too.
        let trimmed = text.strip_suffix('\n').unwrap();
        assert_eq!(
            SigningKey::from_file_text(trimmed).unwrap().kid(),
            key.kid()
        );
        // The RFC key's file is exactly what we expect.
        assert_eq!(
            *rfc8032_key().to_file_text(),
            "portcullis-ed25519-key v1\ncreated: 1\nsecret: nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n"
        );
    }

    #[test]
    fn generated_keys_differ() {
        let a = SigningKey::generate(0).unwrap();
        let b = SigningKey::generate(0).unwrap();
        assert_ne!(a.kid(), b.kid());
        assert_eq!(a.kid().len(), 43);
    }

    #[test]
    fn malformed_key_files_are_rejected() {
        let good = "portcullis-ed25519-key v1\ncreated: 5\nsecret: nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n";
        SigningKey::from_file_text(good).unwrap();
        let secret = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
        let cases: Vec<(String, KeyFileError)> = vec![
            (String::new(), KeyFileError::Layout),
            ("\n".into(), KeyFileError::Layout),
            (format!("{good}\n"), KeyFileError::Layout),
            (good.replace('\n', "\r\n"), KeyFileError::Layout),
            (format!("{good}extra\n"), KeyFileError::Layout),
            (format!("# comment\n{good}"), KeyFileError::Layout),
            (
                "portcullis-ed25519-key v1\ncreated: 5\n".to_string(),
                KeyFileError::Layout,
            ),
            (good.replace("v1", "v2"), KeyFileError::Header),
            (format!(" {good}"), KeyFileError::Header),
            (
                good.replace("portcullis-ed25519-key v1", "portcullis-ed25519-key v1 "),
                KeyFileError::Header,
            ),
            (
                good.replace("created: 5", "created: "),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created: 05"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created: +5"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created: -5"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created:5"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created:  5"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created: 5 "),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created: 1e3"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "created: 18446744073709551616"),
                KeyFileError::Created,
            ),
            (
                good.replace("created: 5", "Created: 5"),
                KeyFileError::Created,
            ),
            (good.replace("secret: ", "secret:"), KeyFileError::Secret),
            (good.replace("secret: ", "seed: "), KeyFileError::Secret),
            (
                good.replace(secret, &format!("{secret}=")),
                KeyFileError::Secret,
            ),
            (
                good.replace(secret, &format!("{secret} ")),
                KeyFileError::Secret,
            ),
            (good.replace(secret, &secret[..42]), KeyFileError::Secret),
            (
                good.replace(secret, &format!("{secret}AAAA")),
                KeyFileError::Secret,
            ),
            // Non-canonical last character (unused bits set).
            (
                good.replace(secret, &format!("{}B", &secret[..42])),
                KeyFileError::Secret,
            ),
            (
                good.replace(secret, &secret.replace('_', "/")),
                KeyFileError::Secret,
            ),
            (
                good.replace(secret, &format!("+{}", &secret[1..])),
                KeyFileError::Secret,
            ),
        ];
        for (text, expected) in cases {
            assert_ne!(text, good);
            let err = SigningKey::from_file_text(&text).unwrap_err();
            assert_eq!(err, expected, "{text:?}");
            // Messages never echo the secret.
            assert!(!err.to_string().contains(&secret[..10]));
        }
        // Line order matters.
        let swapped = format!("portcullis-ed25519-key v1\nsecret: {secret}\ncreated: 5\n");
        assert_eq!(
            SigningKey::from_file_text(&swapped).unwrap_err(),
            KeyFileError::Created
        );
        // A key at created 0 and u64::MAX is fine.
        for created in ["0", "18446744073709551615"] {
            let text = good.replace("created: 5", &format!("created: {created}"));
            SigningKey::from_file_text(&text).unwrap();
        }
    }

    #[test]
    fn debug_shows_no_secret() {
        let key = rfc8032_key();
        let debug = format!("{key:?}");
        assert!(debug.contains(key.kid()));
        let text = key.to_file_text();
        let secret = text
            .lines()
            .nth(2)
            .unwrap()
            .strip_prefix("secret: ")
            .unwrap();
        assert!(!debug.contains(secret));
        assert!(!debug.contains(&RFC8032_SEED[..16]));
        assert!(!debug.to_lowercase().contains("9d61b1"));
    }
}
