//! `frame`: the preamble parsers and the frame decoder over arbitrary chunking.
//!
//! Input: `max_len` (u16), a cut count and cut sizes (one byte each), then the stream.
//! Checks: no panic; `parse_preamble` is consistent over every prefix of the stream (once it
//! decides, longer prefixes decide the same) and agrees with `check_preamble`; the decoder
//! yields frames of `1..=max_len` bytes, leaves the buffer untouched while a frame is
//! incomplete, agrees with a one-shot reference decode of the whole stream whatever the
//! chunking, and re-encoding the frames gives back exactly the bytes consumed.

use bytes::BytesMut;
use common::frame::{
    check_preamble, encode_frame, frame_header, FrameDecoder, FrameError, LEN_PREFIX, MAX_FRAME_LEN,
};
use common::preamble::{parse_preamble, Preamble, V1_LEN, V2_LEN};

use super::Reader;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let max = usize::from(r.u16());
    let ncuts = r.below(16) + 1;
    let cuts: Vec<usize> = (0..ncuts).map(|_| usize::from(r.u8()) + 1).collect();
    let wire = r.rest();

    preamble(wire);
    // The preamble parser also sees the raw input (the stream usually starts with it).
    preamble(data);
    decode(max, &cuts, wire);
}

fn preamble(wire: &[u8]) {
    let full = parse_preamble(wire);
    if let Ok(Some((p, n))) = &full {
        assert!(*n <= wire.len());
        match p {
            Preamble::V1 => {
                assert_eq!(*n, V1_LEN);
                assert_eq!(&wire[..V1_LEN], &common::preamble::PREAMBLE_V1);
            }
            Preamble::V2(v2) => {
                assert_eq!(*n, V2_LEN);
                assert_eq!(&v2.as_bytes()[..], &wire[..V2_LEN]);
                assert_ne!(v2.instance, 0);
                assert_eq!(&v2.hint[..], &wire[24..32]);
                assert_eq!(v2.instance.to_be_bytes(), wire[8..16]);
                assert_eq!(v2.counter.to_be_bytes(), wire[16..24]);
            }
        }
    }
    if let Some(head) = wire
        .get(..V1_LEN)
        .and_then(|h| <&[u8; 8]>::try_from(h).ok())
    {
        let v1 = check_preamble(head);
        let parsed = parse_preamble(head);
        assert_eq!(
            v1.is_ok(),
            matches!(parsed, Ok(Some((Preamble::V1, V1_LEN)))),
            "check_preamble {v1:?} vs parse_preamble {parsed:?}"
        );
    }
    // Prefix consistency: while undecided, `Ok(None)`; once decided, the same answer (a bad
    // magic names the bytes seen so far).
    let mut decided: Option<Result<Option<(Preamble, usize)>, FrameError>> = None;
    for k in 0..=wire.len().min(V2_LEN + 1) {
        let got = parse_preamble(&wire[..k]);
        if let Err(FrameError::BadMagic(m)) = got {
            let n = k.min(4);
            assert_eq!(&m[..n], &wire[..n]);
            assert!(m[n..].iter().all(|&b| b == 0));
        }
        let got = got.map_err(|e| match e {
            FrameError::BadMagic(_) => FrameError::BadMagic([0; 4]),
            e => e,
        });
        match &decided {
            Some(d) => assert_eq!(&got, d, "prefix {k}"),
            None if got != Ok(None) => decided = Some(got),
            None => assert!(k < V2_LEN, "undecided after {k} bytes"),
        }
    }
    // The answer depends on the first 48 bytes only.
    let full = full.map_err(|e| match e {
        FrameError::BadMagic(_) => FrameError::BadMagic([0; 4]),
        e => e,
    });
    match decided {
        Some(d) => assert_eq!(d, full),
        None => assert_eq!(full, Ok(None)),
    }
}

/// One-shot reference: frames of the whole stream, then the error or the unconsumed rest.
fn reference(max: usize, wire: &[u8]) -> (Vec<&[u8]>, Option<usize>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let Some(p) = wire.get(pos..pos + LEN_PREFIX) else {
            return (frames, None, pos);
        };
        let n = usize::from(u16::from_be_bytes([p[0], p[1]]));
        if n == 0 || n > max.min(MAX_FRAME_LEN) {
            return (frames, Some(n), pos);
        }
        let Some(f) = wire.get(pos + LEN_PREFIX..pos + LEN_PREFIX + n) else {
            return (frames, None, pos);
        };
        frames.push(f);
        pos += LEN_PREFIX + n;
    }
}

fn decode(max: usize, cuts: &[usize], wire: &[u8]) {
    let d = FrameDecoder::new(max);
    assert_eq!(d.max_len(), max.min(MAX_FRAME_LEN));
    let mut buf = BytesMut::new();
    let mut frames: Vec<BytesMut> = Vec::new();
    let mut error = None;
    let mut pos = 0;
    let mut i = 0;
    'feed: while pos < wire.len() {
        let end = (pos + cuts[i % cuts.len()]).min(wire.len());
        i += 1;
        buf.extend_from_slice(&wire[pos..end]);
        pos = end;
        loop {
            let before = buf.clone();
            match d.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(
                        !f.is_empty() && f.len() <= d.max_len(),
                        "frame of {}",
                        f.len()
                    );
                    assert_eq!(buf.len() + LEN_PREFIX + f.len(), before.len());
                    frames.push(f);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "incomplete frame must leave the buffer alone");
                    break;
                }
                Err(FrameError::BadLength(n)) => {
                    assert!(n == 0 || n > d.max_len(), "refused length {n}");
                    error = Some(n);
                    break 'feed;
                }
                Err(e) => panic!("decoder error other than BadLength: {e}"),
            }
        }
    }
    let (want, want_err, consumed) = reference(max, wire);
    let got: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    assert_eq!(got, want);
    assert_eq!(error, want_err);

    // Re-encoding gives back the consumed bytes.
    let mut out = BytesMut::new();
    for f in &frames {
        let header = frame_header(f.len());
        assert_eq!(
            header,
            Ok(u16::try_from(f.len()).unwrap_or(0).to_be_bytes())
        );
        assert_eq!(encode_frame(f, &mut out), Ok(()));
    }
    assert_eq!(&out[..], &wire[..consumed]);
    if error.is_none() {
        assert_eq!(&buf[..], &wire[consumed..]);
    }
}
