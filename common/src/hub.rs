//! Server-side peer set: the server key, the allowed client keys, and peer identification of
//! new tunnel streams.
//!
//! A new stream's first message names its peer: a handshake initiation carries the client's
//! static key (decrypted with the server key), a transport data message (a client resuming
//! its keys on a new stream) carries the server's session index, which encodes the peer.
//! [`Hub::identify`] only *names* the peer; the stream belongs to that peer once the peer's
//! [`Session`] accepted the same message (`decapsulate` returned `Ok`). Only then may it
//! replace the peer's older stream, so a forged first message cannot take over a peer.
//!
//! Before that, a version-2 preamble may already name the peer ([`Hub::authenticate_preamble`]:
//! one HMAC with a key derived once per peer, no Diffie-Hellman work): the server then knows
//! the stream comes from one of its clients and serves its handshake from the peer's own budget
//! instead of the anonymous one that strangers share.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::keys::encode_public_key;
use crate::preamble::{PreambleKey, PreambleV2, HINT_LEN};
use crate::session::{Role, Session, SessionConfig};
/// Most peers a hub holds (boringtun keeps 24 bits of the session index for the peer).
pub const MAX_PEERS: usize = 1 << 24;

/// One allowed client.
#[derive(Clone)]
pub struct PeerConfig {
    /// The client's static public key.
    pub public: PublicKey,
    /// Optional pre-shared key.
    pub psk: Option<[u8; 32]>,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("public", &encode_public_key(&self.public))
            .field("psk", &self.psk.map(|_| "<redacted>"))
            .finish()
    }
}

/// Error of the peer set.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// The same public key is configured twice.
    #[error("duplicate peer public key {0}")]
    DuplicatePeer(String),
    /// More peers than [`MAX_PEERS`].
    #[error("too many peers ({0}, at most {MAX_PEERS})")]
    TooManyPeers(usize),
    /// A handshake from a key that is not an allowed peer.
    #[error("unknown peer public key {0}")]
    UnknownPeer(String),
    /// A transport message naming no configured peer.
    #[error("transport message for unknown session index {0:#x}")]
    UnknownSession(u32),
    /// The first message is a valid WireGuard message but cannot open a stream.
    #[error("first message is a {0}, expected a handshake initiation or transport data")]
    NotInitiation(&'static str),
    /// The first message is not a valid message for this server.
    #[error("malformed first message: {0}")]
    Malformed(&'static str),
    /// No peer with this position.
    #[error("no peer #{0}")]
    NoSuchPeer(usize),
    /// A version-2 preamble whose key hint names no allowed peer.
    #[error("preamble names no allowed peer")]
    PreambleUnknownKey,
    /// A version-2 preamble whose tag does not verify (forged, or another server's key).
    #[error("preamble tag does not verify")]
    PreambleBadTag,
    /// The first message names another peer than the stream's authenticated preamble.
    #[error("first message names peer #{got}, the preamble peer #{want}")]
    PeerMismatch {
        /// Peer of the preamble.
        want: usize,
        /// Peer of the message.
        got: usize,
    },
}

/// What kind of WireGuard message a frame holds, judged by its type byte and length only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Handshake initiation (costs Diffie-Hellman work to answer).
    Initiation,
    /// Handshake response.
    Response,
    /// Cookie reply.
    Cookie,
    /// Transport data (one AEAD open).
    Data,
    /// Not a WireGuard message.
    Other,
}

impl MessageKind {
    /// Classifies `msg` without any cryptographic work: the type word (a type byte and three
    /// zero bytes, as WireGuard requires) and the length.
    pub fn of(msg: &[u8]) -> MessageKind {
        if msg.get(1..4) != Some(&[0, 0, 0][..]) {
            return MessageKind::Other;
        }
        match (msg.first(), msg.len()) {
            (Some(1), 148) => MessageKind::Initiation,
            (Some(2), 92) => MessageKind::Response,
            (Some(3), 64) => MessageKind::Cookie,
            (Some(4), n) if n >= 32 => MessageKind::Data,
            _ => MessageKind::Other,
        }
    }
}

/// The server's peer set.
pub struct Hub {
    private: StaticSecret,
    public: PublicKey,
    peers: Vec<PeerConfig>,
    /// Whether each peer is allowed now (a removed peer keeps its position, so that its
    /// tunnel id stays stable should it come back).
    enabled: Vec<bool>,
    by_key: HashMap<[u8; 32], usize>,
    /// Preamble keys per peer (None: the peer's key gives no shared secret).
    preamble_keys: Vec<Option<PreambleKey>>,
    /// Peers by key hint (a hint names one peer but for astronomically rare collisions).
    by_hint: HashMap<[u8; HINT_LEN], Vec<usize>>,
    /// Given to every session: never sheds load itself. The server budgets handshakes before a
    /// message reaches a session (see `limits`), so that strangers cannot spend the budget of
    /// known peers (boringtun's own limiter is shared by all and counts every initiation).
    rate_limiter: Arc<RateLimiter>,
    /// Checks mac1 of first messages before any Diffie-Hellman work; never sheds load itself.
    mac_check: RateLimiter,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("public", &encode_public_key(&self.public))
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Creates the peer set; duplicate keys are rejected.
    pub fn new(private: StaticSecret, peers: Vec<PeerConfig>) -> Result<Self, HubError> {
        if peers.len() > MAX_PEERS {
            return Err(HubError::TooManyPeers(peers.len()));
        }
        let mut by_key = HashMap::with_capacity(peers.len());
        for (i, p) in peers.iter().enumerate() {
            if by_key.insert(*p.public.as_bytes(), i).is_some() {
                return Err(HubError::DuplicatePeer(encode_public_key(&p.public)));
            }
        }
        let public = PublicKey::from(&private);
        let preamble_keys: Vec<Option<PreambleKey>> = peers
            .iter()
            .map(|p| PreambleKey::for_server(&private, &p.public).ok())
            .collect();
        let mut by_hint: HashMap<[u8; HINT_LEN], Vec<usize>> = HashMap::new();
        for (i, k) in preamble_keys.iter().enumerate() {
            if let Some(k) = k {
                by_hint.entry(k.hint()).or_default().push(i);
            }
        }
        Ok(Self {
            rate_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            mac_check: RateLimiter::new(&public, u64::MAX),
            private,
            public,
            enabled: vec![true; peers.len()],
            peers,
            by_key,
            preamble_keys,
            by_hint,
        })
    }

    /// The peer a version-2 preamble was made by, if its tag verifies. Costs one HMAC per
    /// candidate peer (one, but for hint collisions). Replays are the caller's check (the
    /// peer's `InstanceCounters`).
    pub fn authenticate_preamble(&self, p: &PreambleV2) -> Result<usize, HubError> {
        let candidates = self
            .by_hint
            .get(&p.hint)
            .ok_or(HubError::PreambleUnknownKey)?;
        candidates
            .iter()
            .copied()
            .find(|&i| {
                self.is_enabled(i)
                    && self
                        .preamble_keys
                        .get(i)
                        .and_then(Option::as_ref)
                        .is_some_and(|k| k.verify(p))
            })
            .ok_or(HubError::PreambleBadTag)
    }

    /// Checks that the first message of a stream whose preamble authenticated as `peer` can
    /// open it: an initiation (the peer's session verifies it is the peer's), or transport data
    /// naming `peer`'s session. No Diffie-Hellman work.
    pub fn identify_as(&self, peer: usize, first_msg: &[u8]) -> Result<(), HubError> {
        match MessageKind::of(first_msg) {
            MessageKind::Initiation => Ok(()),
            MessageKind::Data => {
                let got = self.identify(first_msg)?;
                if got == peer {
                    Ok(())
                } else {
                    Err(HubError::PeerMismatch { want: peer, got })
                }
            }
            MessageKind::Response => Err(HubError::NotInitiation("handshake response")),
            MessageKind::Cookie => Err(HubError::NotInitiation("cookie reply")),
            MessageKind::Other => Err(HubError::Malformed("not a WireGuard message")),
        }
    }

    /// Names the peer of a new stream from its first message (see the module docs): the
    /// position in the peer list.
    pub fn identify(&self, first_msg: &[u8]) -> Result<usize, HubError> {
        let packet = Tunn::parse_incoming_packet(first_msg)
            .map_err(|_| HubError::Malformed("not a WireGuard message"))?;
        match packet {
            Packet::HandshakeInit(init) => {
                let mut cookie = [0u8; 64];
                if self
                    .mac_check
                    .verify_packet(None, first_msg, &mut cookie)
                    .is_err()
                {
                    return Err(HubError::Malformed("invalid mac1 (wrong server key?)"));
                }
                let half = parse_handshake_anon(&self.private, &self.public, &init)
                    .map_err(|_| HubError::Malformed("cannot decrypt initiator key"))?;
                self.by_key
                    .get(&half.peer_static_public)
                    .copied()
                    .filter(|&i| self.is_enabled(i))
                    .ok_or_else(|| {
                        HubError::UnknownPeer(encode_public_key(&PublicKey::from(
                            half.peer_static_public,
                        )))
                    })
            }
            Packet::PacketData(data) => {
                let peer = (data.receiver_idx >> 8) as usize;
                if self.is_enabled(peer) {
                    Ok(peer)
                } else {
                    Err(HubError::UnknownSession(data.receiver_idx))
                }
            }
            Packet::HandshakeResponse(_) => Err(HubError::NotInitiation("handshake response")),
            Packet::PacketCookieReply(_) => Err(HubError::NotInitiation("cookie reply")),
        }
    }

    /// Creates the responder session for `peer`, with a session index unique to the peer.
    pub fn new_session(
        &self,
        peer: usize,
        cfg: SessionConfig,
        now: Instant,
    ) -> Result<Session, HubError> {
        let p = self.peers.get(peer).ok_or(HubError::NoSuchPeer(peer))?;
        let index = u32::try_from(peer).map_err(|_| HubError::NoSuchPeer(peer))?;
        Ok(Session::with_role(
            Role::Responder,
            self.private.clone(),
            p.public,
            p.psk,
            index,
            cfg,
            Some(self.rate_limiter.clone()),
            now,
        ))
    }

    /// Whether peer `peer` is allowed now.
    pub fn is_enabled(&self, peer: usize) -> bool {
        self.enabled.get(peer).copied().unwrap_or(false)
    }

    /// Allows `peer` (again): its position, new or the one it had before it was removed.
    pub fn add_peer(&mut self, peer: PeerConfig) -> Result<usize, HubError> {
        if let Some(&i) = self.by_key.get(peer.public.as_bytes()) {
            if let (Some(p), Some(e)) = (self.peers.get_mut(i), self.enabled.get_mut(i)) {
                p.psk = peer.psk;
                *e = true;
            }
            return Ok(i);
        }
        if self.peers.len() >= MAX_PEERS {
            return Err(HubError::TooManyPeers(self.peers.len() + 1));
        }
        let i = self.peers.len();
        let key = PreambleKey::for_server(&self.private, &peer.public).ok();
        if let Some(k) = &key {
            self.by_hint.entry(k.hint()).or_default().push(i);
        }
        self.by_key.insert(*peer.public.as_bytes(), i);
        self.preamble_keys.push(key);
        self.peers.push(peer);
        self.enabled.push(true);
        Ok(i)
    }

    /// Stops allowing `peer`: its preambles and first messages are refused from now on.
    pub fn remove_peer(&mut self, peer: usize) {
        if let Some(e) = self.enabled.get_mut(peer) {
            *e = false;
        }
    }

    /// Public key of the peer at `peer`.
    pub fn peer_public(&self, peer: usize) -> Option<&PublicKey> {
        self.peers.get(peer).map(|p| &p.public)
    }

    /// Position of a peer by public key.
    pub fn peer_index(&self, public: &PublicKey) -> Option<usize> {
        self.by_key.get(public.as_bytes()).copied()
    }

    /// The server's public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Number of peer positions (removed peers included).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is configured.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::testutil::{frames, ipv4_packet};
    use bytes::BytesMut;
    use rand::rngs::OsRng;

    fn key() -> StaticSecret {
        StaticSecret::random_from_rng(OsRng)
    }

    fn first_message(client: StaticSecret, server: &PublicKey) -> (Session, Vec<u8>) {
        let now = Instant::now();
        let mut s = Session::new(
            client,
            *server,
            None,
            7,
            SessionConfig::default(),
            None,
            now,
        );
        let mut out = BytesMut::new();
        s.stream_up(now, &mut out).unwrap();
        let msg = frames(&mut out).remove(0);
        (s, msg)
    }

    #[test]
    fn duplicates_rejected() {
        let k = PublicKey::from(&key());
        let peers = vec![
            PeerConfig {
                public: k,
                psk: None,
            },
            PeerConfig {
                public: k,
                psk: None,
            },
        ];
        let err = Hub::new(key(), peers).unwrap_err();
        assert_eq!(err, HubError::DuplicatePeer(encode_public_key(&k)));
    }

    #[test]
    fn identify_known_unknown_and_other() {
        let server = key();
        let (a, b, stranger) = (key(), key(), key());
        let hub = Hub::new(
            server.clone(),
            vec![
                PeerConfig {
                    public: PublicKey::from(&a),
                    psk: None,
                },
                PeerConfig {
                    public: PublicKey::from(&b),
                    psk: Some([3; 32]),
                },
            ],
        )
        .unwrap();
        assert_eq!(hub.len(), 2);
        let sp = *hub.public();
        let (_, msg) = first_message(b.clone(), &sp);
        assert_eq!(hub.identify(&msg), Ok(1));
        let (_, msg) = first_message(a, &sp);
        assert_eq!(hub.identify(&msg), Ok(0));

        let stranger_pub = PublicKey::from(&stranger);
        let (_, msg) = first_message(stranger.clone(), &sp);
        let err = hub.identify(&msg).unwrap_err();
        assert_eq!(err, HubError::UnknownPeer(encode_public_key(&stranger_pub)));
        let secret_b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            stranger.to_bytes(),
        );
        assert!(!err.to_string().contains(&secret_b64));

        // Initiation for another server key: mac1 fails before any key work.
        let (_, msg) = first_message(key(), &PublicKey::from(&key()));
        assert!(matches!(hub.identify(&msg), Err(HubError::Malformed(_))));
        assert!(matches!(hub.identify(b"junk"), Err(HubError::Malformed(_))));
        assert!(matches!(hub.identify(&[]), Err(HubError::Malformed(_))));
        let mut resp = vec![0u8; 92];
        resp[0] = 2;
        assert!(matches!(
            hub.identify(&resp),
            Err(HubError::NotInitiation(_))
        ));
        let mut data = vec![0u8; 32];
        data[0] = 4;
        data[4..8].copy_from_slice(&(5u32 << 8).to_le_bytes());
        assert_eq!(hub.identify(&data), Err(HubError::UnknownSession(5 << 8)));
        data[4..8].copy_from_slice(&((1u32 << 8) | 3).to_le_bytes());
        assert_eq!(hub.identify(&data), Ok(1));
        assert!(hub
            .new_session(2, SessionConfig::default(), Instant::now())
            .is_err());
    }

    #[test]
    fn preamble_names_the_peer_without_key_work() {
        use crate::preamble::{parse_preamble, Preamble};
        let (a, b, stranger) = (key(), key(), key());
        let hub = Hub::new(
            key(),
            [&a, &b]
                .iter()
                .map(|k| PeerConfig {
                    public: PublicKey::from(*k),
                    psk: None,
                })
                .collect(),
        )
        .unwrap();
        let sp = *hub.public();
        let v2 = |k: &StaticSecret| {
            let bytes = PreambleKey::for_client(k, &sp).unwrap().preamble(5, 6);
            match parse_preamble(&bytes).unwrap() {
                Some((Preamble::V2(p), _)) => p,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(hub.authenticate_preamble(&v2(&b)), Ok(1));
        assert_eq!(hub.authenticate_preamble(&v2(&a)), Ok(0));
        assert_eq!(
            hub.authenticate_preamble(&v2(&stranger)),
            Err(HubError::PreambleUnknownKey)
        );
        // The right hint with a tag made by someone else.
        let forged = {
            let mut bytes = PreambleKey::for_client(&stranger, &sp)
                .unwrap()
                .preamble(5, 6);
            bytes[24..32].copy_from_slice(&crate::preamble::key_hint(&PublicKey::from(&a)));
            match parse_preamble(&bytes).unwrap() {
                Some((Preamble::V2(p), _)) => p,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            hub.authenticate_preamble(&forged),
            Err(HubError::PreambleBadTag)
        );

        // The first message must fit the preamble's peer.
        let (_, init) = first_message(a.clone(), &sp);
        assert_eq!(hub.identify_as(0, &init), Ok(()));
        let mut data = vec![0u8; 32];
        data[0] = 4;
        data[4..8].copy_from_slice(&(1u32 << 8).to_le_bytes());
        assert_eq!(hub.identify_as(1, &data), Ok(()));
        assert_eq!(
            hub.identify_as(0, &data),
            Err(HubError::PeerMismatch { want: 0, got: 1 })
        );
        assert!(hub.identify_as(0, b"junk").is_err());
        assert!(hub.identify_as(0, &[2u8; 92]).is_err());
    }

    #[test]
    fn message_kinds_by_shape() {
        let msg = |ty: u8, len: usize| {
            let mut m = vec![7u8; len];
            if let Some(h) = m.get_mut(..4) {
                h.copy_from_slice(&[ty, 0, 0, 0]);
            }
            m
        };
        assert_eq!(MessageKind::of(&msg(1, 148)), MessageKind::Initiation);
        assert_eq!(MessageKind::of(&msg(1, 147)), MessageKind::Other);
        assert_eq!(MessageKind::of(&msg(2, 92)), MessageKind::Response);
        assert_eq!(MessageKind::of(&msg(3, 64)), MessageKind::Cookie);
        assert_eq!(MessageKind::of(&msg(4, 32)), MessageKind::Data);
        assert_eq!(MessageKind::of(&msg(4, 31)), MessageKind::Other);
        assert_eq!(
            MessageKind::of(&[1u8; 148]),
            MessageKind::Other,
            "nonzero type word"
        );
        assert_eq!(MessageKind::of(&[]), MessageKind::Other);
    }

    #[test]
    fn responder_session_with_psk_in_real_time() {
        let server = key();
        let client = key();
        let hub = Hub::new(
            server,
            vec![PeerConfig {
                public: PublicKey::from(&client),
                psk: Some([9; 32]),
            }],
        )
        .unwrap();
        let now = Instant::now();
        let mut c = Session::new(
            client,
            *hub.public(),
            Some([9; 32]),
            11,
            SessionConfig::default(),
            None,
            now,
        );
        let mut up = BytesMut::new();
        c.stream_up(now, &mut up).unwrap();
        let init = frames(&mut up).remove(0);
        let peer = hub.identify(&init).unwrap();
        let mut s = hub
            .new_session(peer, SessionConfig::default(), now)
            .unwrap();
        let mut down = BytesMut::new();
        s.decapsulate(&init, now, &mut down, |_| {}).unwrap();
        s.stream_up(now, &mut down).unwrap();
        for m in frames(&mut down) {
            c.decapsulate(&m, now, &mut up, |_| {}).unwrap();
        }
        let p = ipv4_packet([10, 1, 0, 1], [10, 2, 0, 1], b"x");
        c.encapsulate(&p, now, &mut up).unwrap();
        let mut got = Vec::new();
        for m in frames(&mut up) {
            s.decapsulate(&m, now, &mut down, |pkt| got.push(pkt.to_vec()))
                .unwrap();
        }
        assert_eq!(got, vec![p]);
        // A data message from this client names the peer by the server's session index.
        c.encapsulate(
            &ipv4_packet([10, 1, 0, 1], [10, 2, 0, 1], b"y"),
            now,
            &mut up,
        )
        .unwrap();
        let data = frames(&mut up).remove(0);
        assert_eq!(hub.identify(&data), Ok(0));
    }
}
