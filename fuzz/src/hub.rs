//! `hub`: `Hub::identify`, `Hub::identify_as`, `Hub::authenticate_preamble` and
//! `MessageKind::of`, after `parse_preamble`.
//!
//! The hub has three fixed peers: two clients whose keys the harness holds (the second with a
//! pre-shared key) and a low-order public key (no preamble key). Input mode (first byte):
//! 0: raw bytes, used both as a preamble and as a first message. 1: a real handshake
//! initiation (of peer 0 or 1, of a stranger, or of peer 0 for another server) with byte
//! mutations, mac1 optionally recomputed (anyone knowing the server's public key can), so the
//! key work behind mac1 is reached. 2: a real version-2 preamble (same four senders) with
//! chosen instance and counter, and mutations. 3: a transport data header with a chosen
//! receiver index.
//! Checks: `MessageKind::of` names every message boringtun parses as what boringtun parses it
//! as (so every real initiation is budgeted as one); `identify` answers according to the kind
//! (and the receiver index for data) and only ever names configured peers; `identify_as` agrees
//! with `identify` and `MessageKind`; an initiation is attributed to a peer only if the bytes
//! the initiator's static key is sealed with are unchanged, and then to the right peer; a
//! preamble authenticates as peer `i` only if it is byte for byte what peer `i`'s key makes for
//! its instance and counter, and genuine preambles of peers do authenticate.

use std::sync::OnceLock;
use std::time::Instant;

use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::BytesMut;
use common::frame::FrameDecoder;
use common::hub::{Hub, HubError, MessageKind, PeerConfig};
use common::preamble::{parse_preamble, Preamble, PreambleKey, V2_LEN};
use common::session::{Session, SessionConfig};

use super::Reader;

/// Peers whose keys the harness holds (positions 0 and 1 in the hub).
const CLIENTS: usize = 2;
/// Length of a handshake initiation.
const INIT_LEN: usize = 148;
/// The sealed static key and the ephemeral key it is sealed with.
const SEALED: std::ops::Range<usize> = 8..88;
const MAC1: std::ops::Range<usize> = 116..132;

struct Fixture {
    hub: Hub,
    /// Client-side preamble keys: peer 0, peer 1, a stranger, peer 0 for another server.
    preamble_keys: Vec<PreambleKey>,
    /// Real initiations by the same four senders.
    inits: Vec<Vec<u8>>,
    /// mac1 key of the hub's server key.
    mac1_key: [u8; 32],
}

fn secret(b: u8) -> StaticSecret {
    StaticSecret::from([b; 32])
}

fn initiation(client: StaticSecret, server: PublicKey, psk: Option<[u8; 32]>) -> Vec<u8> {
    let now = Instant::now();
    let mut s = Session::new(client, server, psk, 7, SessionConfig::default(), None, now);
    let mut out = BytesMut::new();
    if let Err(e) = s.stream_up(now, &mut out) {
        panic!("fixture: no initiation: {e}");
    }
    match FrameDecoder::default().decode(&mut out) {
        Ok(Some(m)) if m.len() == INIT_LEN => m.to_vec(),
        other => panic!("fixture: unexpected first frame {other:?}"),
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let server = secret(0x51);
        let server_pub = PublicKey::from(&server);
        let other_server = PublicKey::from(&secret(0x52));
        let (a, b, stranger) = (secret(0xa1), secret(0xb2), secret(0xc3));
        let psk = Some([3u8; 32]);
        let peers = vec![
            PeerConfig {
                public: PublicKey::from(&a),
                psk: None,
            },
            PeerConfig {
                public: PublicKey::from(&b),
                psk,
            },
            PeerConfig {
                public: PublicKey::from([0u8; 32]),
                psk: None,
            },
        ];
        let hub = match Hub::new(server, peers) {
            Ok(h) => h,
            Err(e) => panic!("fixture: {e}"),
        };
        let key = |c: &StaticSecret, s: &PublicKey| match PreambleKey::for_client(c, s) {
            Ok(k) => k,
            Err(e) => panic!("fixture: {e}"),
        };
        let preamble_keys = vec![
            key(&a, &server_pub),
            key(&b, &server_pub),
            key(&stranger, &server_pub),
            key(&a, &other_server),
        ];
        let inits = vec![
            initiation(a.clone(), server_pub, None),
            initiation(b, server_pub, psk),
            initiation(stranger, server_pub, None),
            initiation(a, other_server, None),
        ];
        let mut label = b"mac1----".to_vec();
        label.extend_from_slice(server_pub.as_bytes());
        let mac1_key = blake2s::<32>(&[], &label);
        let f = Fixture {
            hub,
            preamble_keys,
            inits,
            mac1_key,
        };
        // Self-test of the BLAKE2s below against boringtun's mac1.
        for m in &f.inits[..3] {
            assert_eq!(
                &f.mac1(m)[..],
                &m[MAC1],
                "fixture: mac1 recomputation is wrong"
            );
        }
        f
    })
}

impl Fixture {
    fn mac1(&self, msg: &[u8]) -> [u8; 16] {
        blake2s::<16>(&self.mac1_key, msg.get(..MAC1.start).unwrap_or_default())
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let f = fixture();
    let mut r = Reader::new(data);
    match r.u8() % 4 {
        0 => {
            let rest = r.rest();
            preamble(f, rest);
            let _ = message(f, rest);
        }
        1 => {
            let who = r.below(4);
            let orig = &f.inits[who];
            let mut msg = orig.clone();
            mutate(&mut r, &mut msg);
            if r.bool() {
                let mac = f.mac1(&msg);
                msg[MAC1].copy_from_slice(&mac);
            }
            let id = message(f, &msg);
            let diff: Vec<usize> = (0..INIT_LEN).filter(|&i| msg[i] != orig[i]).collect();
            if diff.iter().any(|&i| i < 4) {
                return; // no longer an initiation
            }
            let mac_ok = msg[MAC1] == f.mac1(&msg);
            let sealed_ok = !diff.iter().any(|i| SEALED.contains(i));
            match (mac_ok, sealed_ok, who) {
                (false, _, _) => assert!(
                    matches!(id, Err(HubError::Malformed(_))),
                    "bad mac1 accepted: {id:?}"
                ),
                (true, false, _) | (true, _, 3) => {
                    assert!(
                        matches!(id, Err(HubError::Malformed(_))),
                        "changed or foreign sealed key accepted: {id:?}"
                    )
                }
                (true, true, 2) => {
                    assert!(matches!(id, Err(HubError::UnknownPeer(_))), "{id:?}")
                }
                (true, true, w) => assert_eq!(id, Ok(w), "initiation of peer {w}"),
            }
        }
        2 => {
            let who = r.below(4);
            let (instance, counter) = (r.u64(), r.u64());
            let orig = f.preamble_keys[who].preamble(instance, counter);
            let mut b = orig.to_vec();
            mutate(&mut r, &mut b);
            let res = preamble(f, &b);
            if b[..] == orig[..] && instance != 0 {
                let want = match who {
                    0 | 1 => Ok(who),
                    2 => Err(HubError::PreambleUnknownKey),
                    _ => Err(HubError::PreambleBadTag),
                };
                assert_eq!(res, Some(want), "genuine preamble of sender {who}");
            }
            let _ = message(f, r.rest());
        }
        _ => {
            let idx = r.u32();
            let len = 32 + r.below(96);
            let mut msg = vec![4, 0, 0, 0];
            msg.extend_from_slice(&idx.to_le_bytes());
            msg.extend_from_slice(r.bytes(len - 8));
            msg.resize(len, 0);
            let id = message(f, &msg);
            let peer = usize::try_from(idx >> 8).unwrap_or(usize::MAX);
            if peer < f.hub.len() {
                assert_eq!(id, Ok(peer));
            } else {
                assert_eq!(id, Err(HubError::UnknownSession(idx)));
            }
        }
    }
}

fn mutate(r: &mut Reader<'_>, msg: &mut [u8]) {
    for _ in 0..r.below(6) {
        let at = usize::from(r.u8()) % msg.len().max(1);
        let x = r.u8();
        if let Some(b) = msg.get_mut(at) {
            *b ^= x;
        }
    }
}

/// Parses a preamble and authenticates a version-2 one; returns the verdict if there was one.
fn preamble(f: &Fixture, b: &[u8]) -> Option<Result<usize, HubError>> {
    let Ok(Some((Preamble::V2(p), n))) = parse_preamble(b) else {
        return None;
    };
    assert_eq!(n, V2_LEN);
    let res = f.hub.authenticate_preamble(&p);
    if let Ok(i) = res {
        assert!(i < CLIENTS, "preamble of peer {i} without a preamble key");
        let genuine = f.preamble_keys[i].preamble(p.instance, p.counter);
        assert_eq!(
            p.as_bytes(),
            &genuine,
            "forged preamble authenticated as peer {i}"
        );
    }
    Some(res)
}

/// Checks `MessageKind::of`, `identify` and `identify_as` on one first message.
fn message(f: &Fixture, msg: &[u8]) -> Result<usize, HubError> {
    let kind = MessageKind::of(msg);
    let parsed = Tunn::parse_incoming_packet(msg);
    let id = f.hub.identify(msg);
    match &parsed {
        Ok(Packet::HandshakeInit(_)) => {
            assert_eq!(kind, MessageKind::Initiation);
            assert!(
                matches!(
                    id,
                    Ok(_) | Err(HubError::Malformed(_) | HubError::UnknownPeer(_))
                ),
                "{id:?}"
            );
        }
        Ok(Packet::HandshakeResponse(_)) => {
            assert_eq!(kind, MessageKind::Response);
            assert!(matches!(id, Err(HubError::NotInitiation(_))), "{id:?}");
        }
        Ok(Packet::PacketCookieReply(_)) => {
            assert_eq!(kind, MessageKind::Cookie);
            assert!(matches!(id, Err(HubError::NotInitiation(_))), "{id:?}");
        }
        Ok(Packet::PacketData(d)) => {
            assert_eq!(kind, MessageKind::Data);
            let peer = usize::try_from(d.receiver_idx >> 8).unwrap_or(usize::MAX);
            if peer < f.hub.len() {
                assert_eq!(id, Ok(peer));
            } else {
                assert_eq!(id, Err(HubError::UnknownSession(d.receiver_idx)));
            }
        }
        Err(_) => assert!(matches!(id, Err(HubError::Malformed(_))), "{id:?}"),
    }
    if let Ok(i) = id {
        assert!(i < f.hub.len());
        assert!(f.hub.peer_public(i).is_some());
    }
    for peer in 0..=f.hub.len() {
        let res = f.hub.identify_as(peer, msg);
        match kind {
            MessageKind::Initiation => assert_eq!(res, Ok(())),
            MessageKind::Data => match &id {
                Ok(g) if *g == peer => assert_eq!(res, Ok(())),
                Ok(g) => assert_eq!(
                    res,
                    Err(HubError::PeerMismatch {
                        want: peer,
                        got: *g
                    })
                ),
                Err(e) => assert_eq!(res.as_ref(), Err(e)),
            },
            MessageKind::Response | MessageKind::Cookie => {
                assert!(matches!(res, Err(HubError::NotInitiation(_))), "{res:?}")
            }
            MessageKind::Other => {
                assert!(matches!(res, Err(HubError::Malformed(_))), "{res:?}")
            }
        }
    }
    id
}

/// BLAKE2s (RFC 7693) with an optional key (at most 32 bytes) and an `N`-byte digest
/// (`N <= 32`): just enough to recompute WireGuard's mac1.
fn blake2s<const N: usize>(key: &[u8], data: &[u8]) -> [u8; N] {
    const IV: [u32; 8] = [
        0x6a09_e667,
        0xbb67_ae85,
        0x3c6e_f372,
        0xa54f_f53a,
        0x510e_527f,
        0x9b05_688c,
        0x1f83_d9ab,
        0x5be0_cd19,
    ];
    const SIGMA: [[usize; 16]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
        [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
        [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
        [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
        [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
        [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
        [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
        [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
        [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    ];
    fn compress(h: &mut [u32; 8], block: &[u8; 64], t: u64, last: bool) {
        let mut m = [0u32; 16];
        for (i, w) in m.iter_mut().enumerate() {
            *w = u32::from_le_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        let mut v = [0u32; 16];
        v[..8].copy_from_slice(h);
        v[8..].copy_from_slice(&IV);
        v[12] ^= t as u32;
        v[13] ^= (t >> 32) as u32;
        if last {
            v[14] = !v[14];
        }
        let g = |v: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize, x: u32, y: u32| {
            v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
            v[d] = (v[d] ^ v[a]).rotate_right(16);
            v[c] = v[c].wrapping_add(v[d]);
            v[b] = (v[b] ^ v[c]).rotate_right(12);
            v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
            v[d] = (v[d] ^ v[a]).rotate_right(8);
            v[c] = v[c].wrapping_add(v[d]);
            v[b] = (v[b] ^ v[c]).rotate_right(7);
        };
        for s in &SIGMA {
            g(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
            g(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
            g(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
            g(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
            g(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
            g(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
            g(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
            g(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
        }
        for i in 0..8 {
            h[i] ^= v[i] ^ v[i + 8];
        }
    }

    let key = key.get(..key.len().min(32)).unwrap_or_default();
    let mut h = IV;
    // Parameter block: digest length, key length, fanout 1, depth 1.
    h[0] ^= 0x0101_0000 ^ ((key.len() as u32) << 8) ^ (N as u32);
    let mut input = Vec::with_capacity(64 + data.len());
    if !key.is_empty() {
        input.extend_from_slice(key);
        input.resize(64, 0);
    }
    input.extend_from_slice(data);
    let blocks = input.len().div_ceil(64).max(1);
    for i in 0..blocks {
        let mut block = [0u8; 64];
        let chunk = input
            .get(64 * i..(64 * (i + 1)).min(input.len()))
            .unwrap_or_default();
        block[..chunk.len()].copy_from_slice(chunk);
        let last = i + 1 == blocks;
        let t = if last { input.len() } else { 64 * (i + 1) };
        compress(&mut h, &block, t as u64, last);
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = h[i / 4].to_le_bytes()[i % 4];
    }
    out
}
