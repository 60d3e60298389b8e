//! `keys`: the key text parsers (`parse_key`, `parse_public_key`, `public_key_of`,
//! `encode_public_key`); the file loaders only add IO around `parse_key`.
//!
//! Input: key text (UTF-8; other bytes are skipped as text but their lossy form is parsed).
//! Checks: no panic; the error kind matches the text (empty, too long, base64, length); an
//! accepted key is 32 bytes whose canonical base64 is exactly the trimmed text (no second
//! spelling of a key); `public_key_of` accepts exactly what `parse_key` accepts and yields a
//! key that parses back; error messages never contain the key text.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::keys::{encode_public_key, parse_key, parse_public_key, public_key_of, KeyError};

/// Runs one input.
pub fn run(data: &[u8]) {
    match std::str::from_utf8(data) {
        Ok(text) => key(text),
        Err(_) => key(&String::from_utf8_lossy(data)),
    }
}

fn key(text: &str) {
    let trimmed = text.trim();
    let res = parse_key(text);
    match &res {
        Ok(k) => {
            assert_eq!(STANDARD.encode(k), trimmed, "a second spelling of a key");
            let public = parse_public_key(text);
            assert!(public.is_ok());
            if let Ok(p) = public {
                assert_eq!(encode_public_key(&p), trimmed);
            }
        }
        Err(KeyError::Empty) => assert!(trimmed.is_empty()),
        Err(KeyError::TooLong(n)) => {
            assert_eq!(*n, trimmed.len());
            assert!(*n > 256);
        }
        Err(KeyError::Base64) => assert!(STANDARD.decode(trimmed).is_err()),
        Err(KeyError::Length(n)) => {
            assert_ne!(*n, 32);
            assert_eq!(STANDARD.decode(trimmed).map(|b| b.len()).ok(), Some(*n));
        }
        Err(e) => panic!("parse_key error {e} from text"),
    }
    if let Err(e) = &res {
        let msg = e.to_string();
        // Key-like text (base64 characters only, longer than any word of the messages).
        let key_like = trimmed.len() > 12
            && trimmed
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
        if key_like {
            assert!(
                !msg.contains(trimmed),
                "error message contains the key text"
            );
        }
    }
    match public_key_of(text) {
        Ok(p) => {
            assert!(res.is_ok());
            assert!(parse_public_key(&p).is_ok());
            assert_eq!(p.len(), 44);
        }
        Err(_) => assert!(res.is_err()),
    }
}
