//! The stream preamble a client sends first, versions 1 and 2.
//!
//! Version 1 (8 bytes): `SVPN`, `1`, three zero bytes.
//!
//! Version 2 (48 bytes) adds who is speaking, proven without any Diffie-Hellman work on the
//! server, so that the server can tell its clients from strangers before it spends handshake
//! work on a stream:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `SVPN` |
//! | 4 | 1 | version `2` |
//! | 5 | 3 | reserved, zero |
//! | 8 | 8 | instance id (u64 big-endian, random per client process, not zero) |
//! | 16 | 8 | counter (u64 big-endian, strictly increasing per instance: one per stream) |
//! | 24 | 8 | key hint: the first 8 bytes of SHA-256(`svpn key hint v2` ‖ client public key) |
//! | 32 | 16 | tag: the first 16 bytes of HMAC-SHA256(K, bytes 0..32) |
//!
//! `K` = HKDF-SHA256(salt `svpn preamble v2`, input X25519(client, server) static-static
//! secret, info server public key ‖ client public key). The client computes its `K` once; the
//! server once per allowed peer, so checking a preamble costs one hash-map lookup and one HMAC.
//! A stranger without the client's or the server's private key cannot make a valid tag; a
//! replayed preamble fails the server's per-instance counter check.

use boringtun::x25519::{PublicKey, StaticSecret};
use ring::{digest, hkdf, hmac};

use crate::frame::{FrameError, MAGIC};

/// Length of a version-1 preamble.
pub const V1_LEN: usize = 8;
/// Length of a version-2 preamble.
pub const V2_LEN: usize = 48;
/// The version-1 preamble.
pub const PREAMBLE_V1: [u8; V1_LEN] = crate::frame::PREAMBLE;
/// Length of the key hint.
pub const HINT_LEN: usize = 8;
const TAG_LEN: usize = 16;
const SIGNED_LEN: usize = V2_LEN - TAG_LEN;
const HINT_LABEL: &[u8] = b"svpn key hint v2";
const KDF_SALT: &[u8] = b"svpn preamble v2";

/// A received preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// Version 1: anonymous.
    V1,
    /// Version 2: names a client key and instance; check it with [`PreambleKey::verify`].
    V2(PreambleV2),
}

/// The fields of a version-2 preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreambleV2 {
    /// Random id of the client process.
    pub instance: u64,
    /// Increases with every stream of the instance.
    pub counter: u64,
    /// Names the client key.
    pub hint: [u8; HINT_LEN],
    bytes: [u8; V2_LEN],
}

impl PreambleV2 {
    /// The preamble as sent.
    pub fn as_bytes(&self) -> &[u8; V2_LEN] {
        &self.bytes
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

/// Parses the preamble at the start of `buf`: `Ok(None)` while more bytes are needed, else the
/// preamble and its length. Unknown magic, version or nonzero reserved bytes are errors (the
/// stream must be closed).
pub fn parse_preamble(buf: &[u8]) -> Result<Option<(Preamble, usize)>, FrameError> {
    let Some(head) = buf.get(..V1_LEN) else {
        // Fail early on a wrong magic, even before 8 bytes are there.
        let n = buf.len().min(MAGIC.len());
        if buf.get(..n) != MAGIC.get(..n) {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(FrameError::BadMagic(m));
        }
        return Ok(None);
    };
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let reserved = [head[5], head[6], head[7]];
    if reserved != [0; 3] {
        return Err(FrameError::NonzeroReserved(reserved));
    }
    match head[4] {
        1 => Ok(Some((Preamble::V1, V1_LEN))),
        2 => {
            let Some(b) = buf.get(..V2_LEN) else {
                return Ok(None);
            };
            let mut bytes = [0u8; V2_LEN];
            bytes.copy_from_slice(b);
            let mut hint = [0u8; HINT_LEN];
            hint.copy_from_slice(&bytes[24..32]);
            let instance = u64_at(&bytes, 8);
            if instance == 0 {
                return Err(FrameError::ZeroInstance);
            }
            Ok(Some((
                Preamble::V2(PreambleV2 {
                    instance,
                    counter: u64_at(&bytes, 16),
                    hint,
                    bytes,
                }),
                V2_LEN,
            )))
        }
        v => Err(FrameError::UnsupportedVersion(v)),
    }
}

/// The key hint of a client public key.
pub fn key_hint(client: &PublicKey) -> [u8; HINT_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(HINT_LABEL);
    ctx.update(client.as_bytes());
    let d = ctx.finish();
    let mut h = [0u8; HINT_LEN];
    h.copy_from_slice(&d.as_ref()[..HINT_LEN]);
    h
}

/// The preamble key of one (client, server) pair.
pub struct PreambleKey {
    key: hmac::Key,
    hint: [u8; HINT_LEN],
}

impl std::fmt::Debug for PreambleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreambleKey")
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

/// Why a preamble key cannot be made.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreambleKeyError {
    /// The other side's public key is a low-order point: the shared secret would be zero.
    #[error("public key gives no shared secret (low-order point)")]
    NonContributory,
}

impl PreambleKey {
    /// The client's key for talking to `server`.
    pub fn for_client(client: &StaticSecret, server: &PublicKey) -> Result<Self, PreambleKeyError> {
        let client_pub = PublicKey::from(client);
        Self::derive(client.diffie_hellman(server), server, &client_pub)
    }

    /// The server's key for the allowed client `client`.
    pub fn for_server(server: &StaticSecret, client: &PublicKey) -> Result<Self, PreambleKeyError> {
        let server_pub = PublicKey::from(server);
        Self::derive(server.diffie_hellman(client), &server_pub, client)
    }

    fn derive(
        shared: boringtun::x25519::SharedSecret,
        server: &PublicKey,
        client: &PublicKey,
    ) -> Result<Self, PreambleKeyError> {
        if !shared.was_contributory() {
            return Err(PreambleKeyError::NonContributory);
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(shared.as_bytes());
        let info = [server.as_bytes().as_slice(), client.as_bytes().as_slice()];
        let key = prk
            .expand(&info, hmac::HMAC_SHA256)
            .map(hmac::Key::from)
            .map_err(|_| PreambleKeyError::NonContributory)?;
        Ok(Self {
            key,
            hint: key_hint(client),
        })
    }

    /// The key hint this key's preambles carry.
    pub fn hint(&self) -> [u8; HINT_LEN] {
        self.hint
    }

    /// A version-2 preamble for stream `counter` of client instance `instance`.
    pub fn preamble(&self, instance: u64, counter: u64) -> [u8; V2_LEN] {
        let mut b = [0u8; V2_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = 2;
        b[8..16].copy_from_slice(&instance.to_be_bytes());
        b[16..24].copy_from_slice(&counter.to_be_bytes());
        b[24..32].copy_from_slice(&self.hint);
        let tag = hmac::sign(&self.key, &b[..SIGNED_LEN]);
        b[SIGNED_LEN..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
        b
    }

    /// Whether `p` was made with this key (constant-time tag comparison).
    pub fn verify(&self, p: &PreambleV2) -> bool {
        if p.hint != self.hint {
            return false;
        }
        let tag = hmac::sign(&self.key, &p.bytes[..SIGNED_LEN]);
        let ours = tag.as_ref().get(..TAG_LEN).unwrap_or(&[]);
        subtle::ConstantTimeEq::ct_eq(ours, &p.bytes[SIGNED_LEN..]).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn key() -> StaticSecret {
        StaticSecret::random_from_rng(OsRng)
    }

    #[test]
    fn v1_and_v2_parse_incrementally() {
        assert_eq!(parse_preamble(b""), Ok(None));
        assert_eq!(parse_preamble(b"SV"), Ok(None));
        assert_eq!(parse_preamble(b"GE"), Err(FrameError::BadMagic(*b"GE\0\0")));
        assert_eq!(
            parse_preamble(&PREAMBLE_V1),
            Ok(Some((Preamble::V1, V1_LEN)))
        );
        let mut more = PREAMBLE_V1.to_vec();
        more.extend_from_slice(b"rest");
        assert_eq!(parse_preamble(&more), Ok(Some((Preamble::V1, V1_LEN))));
        assert_eq!(
            parse_preamble(b"SVPN\x03\0\0\0"),
            Err(FrameError::UnsupportedVersion(3))
        );
        assert_eq!(
            parse_preamble(b"SVPN\x01\0\x01\0"),
            Err(FrameError::NonzeroReserved([0, 1, 0]))
        );
        assert_eq!(
            parse_preamble(b"GET / HTTP/1.1"),
            Err(FrameError::BadMagic(*b"GET "))
        );

        let (c, s) = (key(), key());
        let k = PreambleKey::for_client(&c, &PublicKey::from(&s)).unwrap();
        let p = k.preamble(7, 99);
        for n in 0..V2_LEN {
            assert_eq!(parse_preamble(&p[..n]), Ok(None), "{n} bytes");
        }
        let Some((Preamble::V2(v2), V2_LEN)) = parse_preamble(&p).unwrap() else {
            panic!("not v2");
        };
        assert_eq!((v2.instance, v2.counter), (7, 99));
        assert_eq!(v2.hint, key_hint(&PublicKey::from(&c)));
        assert_eq!(v2.as_bytes(), &p);
        let zero = k.preamble(0, 1);
        assert_eq!(parse_preamble(&zero), Err(FrameError::ZeroInstance));
    }

    #[test]
    fn server_verifies_what_the_client_signed() {
        let (c, s, other) = (key(), key(), key());
        let (cp, sp) = (PublicKey::from(&c), PublicKey::from(&s));
        let client = PreambleKey::for_client(&c, &sp).unwrap();
        let server = PreambleKey::for_server(&s, &cp).unwrap();
        assert_eq!(client.hint(), server.hint());
        let parse = |b: &[u8]| match parse_preamble(b).unwrap() {
            Some((Preamble::V2(v), _)) => v,
            other => panic!("{other:?}"),
        };
        let p = parse(&client.preamble(1, 2));
        assert!(server.verify(&p));
        // Any changed bit fails.
        for i in 8..V2_LEN {
            let mut b = client.preamble(1, 2);
            b[i] ^= 1;
            if let Ok(Some((Preamble::V2(v), _))) = parse_preamble(&b) {
                assert!(!server.verify(&v), "byte {i}");
            }
        }
        // Made by someone who knows only the public keys: a key of another pair.
        let forged = PreambleKey::for_client(&other, &sp).unwrap();
        let mut b = forged.preamble(1, 2);
        b[24..32].copy_from_slice(&server.hint());
        assert!(!server.verify(&parse(&b)));
        // Low-order public key.
        let zero = PublicKey::from([0u8; 32]);
        assert_eq!(
            PreambleKey::for_server(&s, &zero).unwrap_err(),
            PreambleKeyError::NonContributory
        );
    }
}
