//! WireGuard keys: 32 bytes in standard base64, compatible with `wg genkey` / `wg pubkey`.
//! Parsing takes text; reading key files is `io::keyfile`'s.
//!
//! Errors describe what is wrong with a key but never contain key material.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::RngCore;

/// Upper bound on the files of a peers directory.
pub const MAX_PEER_FILES: usize = 1024;

/// Largest key file we read (a key is 44 characters; the rest is slack for whitespace).
pub const MAX_KEY_FILE_LEN: u64 = 4096;

/// Error while parsing or loading a key.
#[derive(thiserror::Error, Debug)]
pub enum KeyError {
    /// The key text is empty (after trimming whitespace).
    #[error("key is empty")]
    Empty,
    /// The key text is far longer than a base64 key.
    #[error("key text is too long ({0} characters, a key has 44)")]
    TooLong(usize),
    /// The key text is not standard base64.
    #[error("key is not valid base64")]
    Base64,
    /// The key decodes to the wrong number of bytes.
    #[error("key decodes to {0} bytes, expected 32")]
    Length(usize),
    /// The key file cannot be read.
    #[error("cannot read key file {}: {source}", path.display())]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The key file is larger than [`MAX_KEY_FILE_LEN`].
    #[error("key file {} is too large (more than {MAX_KEY_FILE_LEN} bytes)", path.display())]
    FileTooLarge {
        /// File path.
        path: PathBuf,
    },
    /// A peers directory holds more than [`MAX_PEER_FILES`] files.
    #[error("more than {MAX_PEER_FILES} key files")]
    TooManyFiles,
    /// The key file's content is not a valid key.
    #[error("key file {}: {reason}", path.display())]
    InFile {
        /// File path.
        path: PathBuf,
        /// What is wrong with the content.
        reason: Box<KeyError>,
    },
}

/// Generates a new private key (random, clamped like `wg genkey`), base64 without newline.
pub fn generate_private_key() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    STANDARD.encode(key)
}

/// Public key (base64) of a base64 private key, like `wg pubkey`.
pub fn public_key_of(private_b64: &str) -> Result<String, KeyError> {
    let secret = StaticSecret::from(parse_key(private_b64)?);
    Ok(STANDARD.encode(PublicKey::from(&secret).as_bytes()))
}

/// Parses a base64 key (surrounding whitespace ignored) into exactly 32 bytes.
pub fn parse_key(b64: &str) -> Result<[u8; 32], KeyError> {
    let text = b64.trim();
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    if text.len() > 256 {
        return Err(KeyError::TooLong(text.len()));
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// Parses a base64 public key.
pub fn parse_public_key(b64: &str) -> Result<PublicKey, KeyError> {
    parse_key(b64).map(PublicKey::from)
}

/// Encodes a public key as base64 (for logs and messages).
pub fn encode_public_key(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    // RFC 7748 section 6.1 (Alice).
    pub(crate) const PRIV_HEX: &str =
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    pub(crate) const PUB_HEX: &str =
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn known_vector() {
        let private = STANDARD.encode(hex(PRIV_HEX));
        let public = public_key_of(&format!("  {private}\n")).unwrap();
        assert_eq!(public, STANDARD.encode(hex(PUB_HEX)));
        assert_eq!(
            parse_public_key(&public).unwrap().as_bytes().as_slice(),
            hex(PUB_HEX)
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_match_wg() {
        let k = generate_private_key();
        assert_eq!(k.len(), 44);
        assert!(!k.ends_with('\n'));
        let bytes = parse_key(&k).unwrap();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        let ours = public_key_of(&k).unwrap();
        // Compare with the reference tool when it is installed.
        let wg = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        if let Ok(mut child) = wg {
            child.stdin.take().unwrap().write_all(k.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), ours);
        }
    }

    #[test]
    fn bad_keys() {
        assert!(matches!(parse_key(" \n"), Err(KeyError::Empty)));
        assert!(matches!(parse_key("AAAA"), Err(KeyError::Length(3))));
        let long = STANDARD.encode([7u8; 33]);
        assert!(matches!(parse_key(&long), Err(KeyError::Length(33))));
        let bad = "secretsecret!secretsecretsecretsecretsecret=";
        let err = parse_key(bad).unwrap_err();
        assert!(matches!(err, KeyError::Base64));
        assert!(!err.to_string().contains("secret"));
        assert!(matches!(
            parse_key(&"A".repeat(1000)),
            Err(KeyError::TooLong(1000))
        ));
    }
}
