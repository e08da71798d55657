//! Opaque random tokens and ids, and SHA-256 helpers for secrets stored as
//! hashes (refresh tokens, bootstrap secrets, admin tokens).

use std::fmt::Write as _;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::{B64, TokenError};

/// `prefix` followed by base64url (unpadded) of 32 random bytes (256 bits):
/// refresh tokens and other bearer secrets, e.g. `random_token("prt_")`.
/// Store only [`sha256_hex`] of it.
pub fn random_token(prefix: &str) -> Result<String, TokenError> {
    random_string::<32>(prefix)
}

/// `prefix` followed by base64url (unpadded) of 16 random bytes (128 bits):
/// unguessable identifiers such as `jti` and task ids.
pub fn random_id(prefix: &str) -> Result<String, TokenError> {
    random_string::<16>(prefix)
}

fn random_string<const N: usize>(prefix: &str) -> Result<String, TokenError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    getrandom::fill(bytes.as_mut_slice()).map_err(|_| TokenError::Random)?;
    let mut out = String::with_capacity(prefix.len() + N.div_ceil(3) * 4);
    out.push_str(prefix);
    B64.encode_string(bytes.as_slice(), &mut out);
    Ok(out)
}

/// SHA-256 of `data` as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    for byte in Sha256::digest(data) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Whether SHA-256 of `secret` equals `expected_hex` (64 hex digits, either
/// case). The digest comparison is constant time; a malformed `expected_hex`
/// (wrong length, a non-hex character) is simply `false`. Only the length and
/// well-formedness of `expected_hex` (configuration, not the secret) affect
/// timing.
pub fn matches_sha256(secret: &[u8], expected_hex: &str) -> bool {
    let Some(expected) = decode_hex_32(expected_hex) else {
        return false;
    };
    let actual = Sha256::digest(secret);
    actual.as_slice().ct_eq(expected.as_slice()).into()
}

fn decode_hex_32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [high, low] = pair else {
            return None;
        };
        *byte = (nibble(*high)? << 4) | nibble(*low)?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_and_ids() {
        let t = random_token("prt_").unwrap();
        assert!(t.starts_with("prt_"));
        assert_eq!(t.len(), 4 + 43);
        assert_eq!(B64.decode(&t[4..]).unwrap().len(), 32);
        let id = random_id("tsk_").unwrap();
        assert_eq!(id.len(), 4 + 22);
        assert_eq!(B64.decode(&id[4..]).unwrap().len(), 16);
        assert_ne!(random_token("").unwrap(), random_token("").unwrap());
        assert_ne!(random_id("").unwrap(), random_id("").unwrap());
        assert!(
            random_id("")
                .unwrap()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn sha256_known_answers() {
        // FIPS 180-2 examples.
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn matches_sha256_cases() {
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert!(matches_sha256(b"abc", hex));
        assert!(matches_sha256(b"abc", &hex.to_uppercase()));
        assert!(!matches_sha256(b"abd", hex));
        assert!(!matches_sha256(b"", hex));
        let mut flipped = hex.to_owned();
        flipped.replace_range(63.., "c");
        assert!(!matches_sha256(b"abc", &flipped));
        for bad in [
            "",
            &hex[..63],
            &format!("{hex}0"),
            &format!(" {}", &hex[1..]),
            &hex.replace('b', "g"),
            &format!("{}é", &hex[..62]),
            &format!("0x{}", &hex[2..]),
        ] {
            assert!(!matches_sha256(b"abc", bad), "{bad:?}");
        }
    }
}
