//! Tunnel stream framing (wire protocol version 1).
//!
//! A stream starts with an 8-byte [`PREAMBLE`] sent by the client. After it, both directions
//! carry frames: a big-endian `u16` length `N` followed by `N` bytes holding one WireGuard
//! message. `N = 0` or `N` above the negotiated maximum is a protocol error.

use bytes::{Buf, BufMut, BytesMut};

/// Magic bytes at the start of the preamble.
pub const MAGIC: [u8; 4] = *b"SVPN";
/// Protocol version carried in the preamble.
pub const PROTOCOL_VERSION: u8 = 1;
/// The preamble a client sends right after the stream is established.
pub const PREAMBLE: [u8; 8] = *b"SVPN\x01\0\0\0";
/// Largest frame payload the wire format can express.
pub const MAX_FRAME_LEN: usize = 65535;
/// Size of the length prefix in front of every frame.
pub const LEN_PREFIX: usize = 2;

/// Errors of the preamble check and the frame codec.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The stream did not start with the `SVPN` magic.
    #[error("bad preamble magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks a protocol version this build does not know.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The reserved preamble bytes were not zero.
    #[error("nonzero reserved preamble bytes {0:02x?}")]
    NonzeroReserved([u8; 3]),
    /// A frame length of zero or above the maximum.
    #[error("bad frame length {0}")]
    BadLength(usize),
    /// A version-2 preamble with instance id zero.
    #[error("preamble with instance id 0")]
    ZeroInstance,
}

/// Checks a received preamble.
pub fn check_preamble(buf: &[u8; 8]) -> Result<(), FrameError> {
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if buf[4] != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(buf[4]));
    }
    let reserved = [buf[5], buf[6], buf[7]];
    if reserved != [0; 3] {
        return Err(FrameError::NonzeroReserved(reserved));
    }
    Ok(())
}

/// Returns the length prefix for a frame of `len` payload bytes.
pub fn frame_header(len: usize) -> Result<[u8; LEN_PREFIX], FrameError> {
    match u16::try_from(len) {
        Ok(n) if n > 0 => Ok(n.to_be_bytes()),
        _ => Err(FrameError::BadLength(len)),
    }
}

/// Appends one frame (length prefix and `msg`) to `out`.
pub fn encode_frame(msg: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    let header = frame_header(msg.len())?;
    out.reserve(LEN_PREFIX + msg.len());
    out.put_slice(&header);
    out.put_slice(msg);
    Ok(())
}

/// Incremental frame decoder over a receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// Creates a decoder accepting payloads of `1..=max_len` bytes (capped at [`MAX_FRAME_LEN`]).
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }

    /// The largest accepted payload length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Takes one complete frame's payload off the front of `buf` without copying.
    ///
    /// Returns `Ok(None)` and leaves `buf` untouched while the frame is incomplete. A length of
    /// zero or above the maximum is [`FrameError::BadLength`]; the stream must then be closed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let Some(prefix) = buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let n = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
        if n == 0 || n > self.max_len {
            return Err(FrameError::BadLength(n));
        }
        if buf.len() < LEN_PREFIX + n {
            return Ok(None);
        }
        buf.advance(LEN_PREFIX);
        Ok(Some(buf.split_to(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn preamble_checks() {
        assert_eq!(check_preamble(&PREAMBLE), Ok(()));
        assert_eq!(
            check_preamble(b"GET / HT"),
            Err(FrameError::BadMagic(*b"GET "))
        );
        assert_eq!(
            check_preamble(b"SVPN\x02\0\0\0"),
            Err(FrameError::UnsupportedVersion(2))
        );
        assert_eq!(
            check_preamble(b"SVPN\x01\0\x01\0"),
            Err(FrameError::NonzeroReserved([0, 1, 0]))
        );
    }

    #[test]
    fn encode_and_header() {
        let mut out = BytesMut::new();
        encode_frame(b"abc", &mut out).unwrap();
        assert_eq!(&out[..], b"\0\x03abc");
        assert_eq!(frame_header(65535).unwrap(), [0xff, 0xff]);
        assert_eq!(frame_header(0), Err(FrameError::BadLength(0)));
        assert_eq!(frame_header(65536), Err(FrameError::BadLength(65536)));
        assert_eq!(encode_frame(&[], &mut out), Err(FrameError::BadLength(0)));
        let big = vec![0u8; MAX_FRAME_LEN + 1];
        assert!(encode_frame(&big, &mut out).is_err());
        assert_eq!(out.len(), 5, "failed encodes append nothing");
    }

    #[test]
    fn decode_incomplete_and_bad() {
        let d = FrameDecoder::new(100);
        let mut buf = BytesMut::from(&b"\0"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"\x02a");
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"\0\x02a");
        buf.extend_from_slice(b"bX");
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), &b"ab"[..]);
        assert_eq!(&buf[..], b"X");

        let mut zero = BytesMut::from(&b"\0\0"[..]);
        assert_eq!(d.decode(&mut zero), Err(FrameError::BadLength(0)));
        let mut long = BytesMut::from(&b"\0\x65"[..]);
        assert_eq!(d.decode(&mut long), Err(FrameError::BadLength(101)));
        assert_eq!(FrameDecoder::new(1 << 20).max_len(), MAX_FRAME_LEN);
    }

    proptest! {
        #[test]
        fn roundtrip_any_chunking(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..600), 0..20),
            cuts in proptest::collection::vec(1usize..700, 1..40),
        ) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode_frame(m, &mut wire).unwrap();
            }
            let d = FrameDecoder::new(600);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let end = (pos + cuts[i % cuts.len()]).min(wire.len());
                i += 1;
                buf.extend_from_slice(&wire[pos..end]);
                pos = end;
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), max in 0usize..70000) {
            let d = FrameDecoder::new(max);
            let mut buf = BytesMut::from(&data[..]);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(f)) => prop_assert!(!f.is_empty() && f.len() <= d.max_len()),
                    Ok(None) => break,
                    Err(FrameError::BadLength(n)) => {
                        prop_assert!(n == 0 || n > d.max_len());
                        break;
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
        }
    }
}
