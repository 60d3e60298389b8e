//! Per-peer WireGuard session over a framed tunnel stream (initiator on the client, responder
//! on the server).
//!
//! [`Session`] wraps boringtun's [`Tunn`] and adds what a stream transport needs: every wire
//! message it produces is appended to the caller's buffer already framed; keepalives are sent
//! while a stream is up and idle; a peer that stays silent for `dead_timeout`
//! is reported as [`SessionError::DeadPeer`]; the client rekeys on time (every 120 s) even when
//! only keepalives flow; and a client keeps its keys across stream reconnects.
//!
//! boringtun reads its own clock for the WireGuard timers; the `now` arguments drive only the
//! keepalive and dead-peer logic of this module.

use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::BytesMut;

use crate::frame::{encode_frame, FrameError, MAX_FRAME_LEN};

/// WireGuard transport overhead (header and tag) of one data message.
pub const DATA_OVERHEAD: usize = 32;
/// Largest IP packet that fits into one frame once encrypted.
pub const MAX_PACKET_LEN: usize = MAX_FRAME_LEN - DATA_OVERHEAD;
/// The initiator starts a new handshake once the current keys are this old.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// boringtun queues at most 256 packets while a handshake is pending; bound the flush loop.
const MAX_FLUSH: usize = 300;

const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;

/// Timing of keepalive and dead-peer detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Send a keepalive when nothing was sent for this long while a stream is up (default 5 s).
    pub keepalive: Duration,
    /// The peer is dead when no message arrived for this long while a stream is up
    /// (default 15 s); at least one keepalive interval.
    pub dead_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(5),
            dead_timeout: Duration::from_secs(15),
        }
    }
}

impl SessionConfig {
    /// How long the peer may stay silent before it is considered dead.
    pub fn dead_timeout(&self) -> Duration {
        self.dead_timeout
    }
}

/// Which side of the handshake this session normally plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Client: starts handshakes when a stream comes up and rekeys on time.
    Initiator,
    /// Server: answers handshakes.
    Responder,
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Inner IP bytes encrypted (as counted by boringtun).
    pub tx_bytes: u64,
    /// Inner IP bytes decrypted (as counted by boringtun).
    pub rx_bytes: u64,
    /// IP packets handed to [`Session::encapsulate`] that went out at once.
    pub tx_packets: u64,
    /// IP packets delivered to the tunnel callback.
    pub rx_packets: u64,
    /// IP packets queued inside boringtun until a handshake completes.
    pub queued_packets: u64,
    /// Wire messages accepted (authenticated) from the peer.
    pub rx_messages: u64,
    /// Handshakes completed (as initiator: response accepted; as responder: response sent).
    pub handshakes_completed: u64,
    /// Handshake initiations sent.
    pub handshakes_initiated: u64,
    /// Keepalives sent.
    pub keepalives_sent: u64,
    /// Wire messages rejected (any error, fatal or not).
    pub rejected_messages: u64,
}

/// Error of a session operation.
#[derive(thiserror::Error, Debug)]
pub enum SessionError {
    /// No message from the peer for `dead_timeout` while a stream was up.
    #[error("dead peer: no message within the dead-peer timeout")]
    DeadPeer,
    /// The session keys expired and no handshake replaced them.
    #[error("connection expired: no valid session keys")]
    ConnectionExpired,
    /// boringtun rejected a message; `error` is the `WireGuardError` variant name.
    #[error("WireGuard {error} on {message} message")]
    Crypto {
        /// `WireGuardError` variant name.
        error: &'static str,
        /// Kind of the message that failed.
        message: &'static str,
        /// Whether the stream must be closed (see [`SessionError::is_fatal`]).
        fatal: bool,
    },
    /// The message is not a well-formed WireGuard message.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A data message decrypted fine but does not hold a valid IP packet.
    #[error("decrypted packet is not a valid IP packet")]
    InvalidInnerPacket,
    /// An IP packet too large to fit one frame once encrypted.
    #[error("packet of {0} bytes does not fit one frame")]
    PacketTooLarge(usize),
    /// Framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl SessionError {
    /// Whether the stream carrying the session must be closed.
    ///
    /// Fatal: dead peer, expired keys, malformed messages, and handshake messages that fail
    /// authentication (wrong key, bad MAC, bad AEAD tag: a misconfigured or foreign peer).
    /// Not fatal (count and drop the message): replayed or duplicate counters, data for an
    /// unknown or stale session, late handshake responses, load shedding, oversize packets
    /// from the tunnel, and invalid inner packets.
    pub fn is_fatal(&self) -> bool {
        match self {
            SessionError::DeadPeer
            | SessionError::ConnectionExpired
            | SessionError::Malformed(_)
            | SessionError::Frame(_) => true,
            SessionError::Crypto { fatal, .. } => *fatal,
            SessionError::InvalidInnerPacket | SessionError::PacketTooLarge(_) => false,
        }
    }
}

fn message_name(kind: u8) -> &'static str {
    match kind {
        MSG_INIT => "handshake initiation",
        MSG_RESPONSE => "handshake response",
        MSG_COOKIE => "cookie reply",
        _ => "transport data",
    }
}

/// Maps a boringtun error on a received message of type `kind` to a [`SessionError`].
fn map_error(e: WireGuardError, kind: u8) -> SessionError {
    use WireGuardError as W;
    let handshake = kind == MSG_INIT || kind == MSG_RESPONSE;
    let (error, fatal) = match e {
        // Data messages of valid size only fail this way after decryption (inner IP check).
        W::InvalidPacket if kind == MSG_DATA => return SessionError::InvalidInnerPacket,
        W::InvalidPacket => return SessionError::Malformed("invalid WireGuard message"),
        W::ConnectionExpired => return SessionError::ConnectionExpired,
        W::DestinationBufferTooSmall => ("DestinationBufferTooSmall", false),
        W::IncorrectPacketLength => ("IncorrectPacketLength", true),
        W::UnexpectedPacket => ("UnexpectedPacket", false),
        W::WrongPacketType => ("WrongPacketType", true),
        W::WrongIndex => ("WrongIndex", false),
        W::WrongKey => ("WrongKey", true),
        W::InvalidTai64nTimestamp => ("InvalidTai64nTimestamp", true),
        W::WrongTai64nTimestamp => ("WrongTai64nTimestamp", false),
        W::InvalidMac => ("InvalidMac", true),
        W::InvalidAeadTag => ("InvalidAeadTag", handshake),
        W::InvalidCounter => ("InvalidCounter", false),
        W::DuplicateCounter => ("DuplicateCounter", false),
        W::NoCurrentSession => ("NoCurrentSession", false),
        W::LockFailed => ("LockFailed", false),
        W::UnderLoad => ("UnderLoad", false),
    };
    SessionError::Crypto {
        error,
        message: message_name(kind),
        fatal,
    }
}

/// Checks the outer shape of a received message and returns its type.
fn message_kind(msg: &[u8]) -> Result<u8, SessionError> {
    if msg.is_empty() {
        return Err(SessionError::Malformed("empty message"));
    }
    if msg.len() > MAX_FRAME_LEN {
        return Err(SessionError::Malformed("message longer than a frame"));
    }
    match msg[0] {
        k @ MSG_INIT..=MSG_DATA => Ok(k),
        _ => Err(SessionError::Malformed("unknown message type")),
    }
}

/// One peer's WireGuard session.
pub struct Session {
    tunn: Tunn,
    peer: PublicKey,
    cfg: SessionConfig,
    role: Role,
    /// Reused output buffer for boringtun (no allocation per packet).
    scratch: Box<[u8]>,
    rate_limiter: Option<Arc<RateLimiter>>,
    stream_up: bool,
    last_rx: Instant,
    last_tx: Instant,
    /// A stream came up with the old keys and the peer has not answered yet; if that stream
    /// dies unconfirmed, the next one starts with a handshake (the peer may have lost state).
    resume_unconfirmed: bool,
    stats: SessionStats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &crate::keys::encode_public_key(&self.peer))
            .field("role", &self.role)
            .field("stream_up", &self.stream_up)
            .field("established", &self.is_established())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Creates an initiator (client) session with `peer`. `index` identifies the session
    /// locally (boringtun uses its low 24 bits).
    pub fn new(
        local: StaticSecret,
        peer: PublicKey,
        psk: Option<[u8; 32]>,
        index: u32,
        cfg: SessionConfig,
        rate_limiter: Option<Arc<RateLimiter>>,
        now: Instant,
    ) -> Self {
        Self::with_role(
            Role::Initiator,
            local,
            peer,
            psk,
            index,
            cfg,
            rate_limiter,
            now,
        )
    }

    /// Creates a session playing `role`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_role(
        role: Role,
        local: StaticSecret,
        peer: PublicKey,
        psk: Option<[u8; 32]>,
        index: u32,
        cfg: SessionConfig,
        rate_limiter: Option<Arc<RateLimiter>>,
        now: Instant,
    ) -> Self {
        let keepalive = cfg.keepalive.max(Duration::from_millis(10));
        let cfg = SessionConfig {
            keepalive,
            dead_timeout: cfg.dead_timeout.max(keepalive),
        };
        Self {
            tunn: Tunn::new(local, peer, psk, None, index, rate_limiter.clone()),
            peer,
            cfg,
            role,
            scratch: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
            rate_limiter,
            stream_up: false,
            last_rx: now,
            last_tx: now,
            resume_unconfirmed: false,
            stats: SessionStats::default(),
        }
    }

    /// The peer's static public key.
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// The role this session plays.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Encrypts one IP packet and appends the framed message to `to_net`.
    ///
    /// Without valid keys the packet is queued inside boringtun and a handshake initiation is
    /// appended instead (unless one is already in flight).
    pub fn encapsulate(
        &mut self,
        packet: &[u8],
        now: Instant,
        to_net: &mut BytesMut,
    ) -> Result<(), SessionError> {
        if packet.len() > MAX_PACKET_LEN {
            return Err(SessionError::PacketTooLarge(packet.len()));
        }
        let established = self.is_established();
        match self.tunn.encapsulate(packet, &mut self.scratch) {
            TunnResult::WriteToNetwork(out) => {
                encode_frame(out, to_net)?;
                self.last_tx = now;
                if established {
                    self.stats.tx_packets += 1;
                } else {
                    self.stats.queued_packets += 1;
                    self.stats.handshakes_initiated += 1;
                }
            }
            TunnResult::Err(e) => return Err(map_error(e, MSG_DATA)),
            _ => self.stats.queued_packets += 1,
        }
        Ok(())
    }

    /// Processes one received wire message (a frame payload).
    ///
    /// Appends framed replies (handshake response, keepalive, packets queued during the
    /// handshake) to `to_net` and calls `to_tun` for the decrypted IP packet, if any.
    /// An `Ok` return means the message was authentic.
    pub fn decapsulate(
        &mut self,
        msg: &[u8],
        now: Instant,
        to_net: &mut BytesMut,
        mut to_tun: impl FnMut(&[u8]),
    ) -> Result<(), SessionError> {
        let kind = match message_kind(msg) {
            Ok(kind) => kind,
            Err(e) => {
                self.stats.rejected_messages += 1;
                return Err(e);
            }
        };
        let mut wrote = false;
        let result = match self.tunn.decapsulate(None, msg, &mut self.scratch) {
            TunnResult::Done => Ok(()),
            TunnResult::Err(e) => Err(map_error(e, kind)),
            TunnResult::WriteToNetwork(out) => {
                wrote = true;
                encode_frame(out, to_net).map_err(SessionError::from)
            }
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                to_tun(packet);
                self.stats.rx_packets += 1;
                Ok(())
            }
        };
        if let Err(e) = result {
            self.stats.rejected_messages += 1;
            return Err(e);
        }
        self.last_rx = now;
        self.resume_unconfirmed = false;
        self.stats.rx_messages += 1;
        if (kind == MSG_INIT && wrote) || kind == MSG_RESPONSE {
            self.stats.handshakes_completed += 1;
        }
        if wrote {
            self.last_tx = now;
            self.flush(now, to_net)?;
        }
        Ok(())
    }

    /// Sends the packets boringtun queued while the handshake was pending.
    fn flush(&mut self, now: Instant, to_net: &mut BytesMut) -> Result<(), SessionError> {
        for _ in 0..MAX_FLUSH {
            match self.tunn.decapsulate(None, &[], &mut self.scratch) {
                TunnResult::WriteToNetwork(out) => {
                    encode_frame(out, to_net)?;
                    self.last_tx = now;
                    self.stats.tx_packets += 1;
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// Timer tick: call every ~250 ms and on stream events.
    ///
    /// Runs boringtun's timers (handshake retry, rekey, passive keepalive), rekeys on time as
    /// initiator, sends a keepalive when the stream is idle, and returns
    /// [`SessionError::DeadPeer`] when nothing arrived for `dead_timeout` while a
    /// stream is up. Output is appended to `to_net`; drop it when no stream is up.
    pub fn tick(&mut self, now: Instant, to_net: &mut BytesMut) -> Result<(), SessionError> {
        if let Some(limiter) = &self.rate_limiter {
            // boringtun resets a shared limiter only when told to.
            limiter.reset_count();
        }
        match self.tunn.update_timers(&mut self.scratch) {
            TunnResult::WriteToNetwork(out) => {
                let is_init = out.first() == Some(&MSG_INIT);
                encode_frame(out, to_net)?;
                self.last_tx = now;
                if is_init {
                    self.stats.handshakes_initiated += 1;
                } else {
                    self.stats.keepalives_sent += 1;
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) if self.stream_up => {
                match self.role {
                    Role::Initiator => self.send_initiation(now, to_net, false)?,
                    Role::Responder => return Err(SessionError::ConnectionExpired),
                }
            }
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, "WireGuard timers");
            }
            _ => {}
        }
        if !self.stream_up {
            return Ok(());
        }
        if now.saturating_duration_since(self.last_rx) >= self.cfg.dead_timeout() {
            return Err(SessionError::DeadPeer);
        }
        let established = self.is_established();
        if self.role == Role::Initiator
            && established
            && self
                .last_handshake_age()
                .is_some_and(|age| age >= REKEY_AFTER)
        {
            self.send_initiation(now, to_net, false)?;
        }
        if established && now.saturating_duration_since(self.last_tx) >= self.cfg.keepalive {
            self.send_keepalive(now, to_net)?;
        }
        Ok(())
    }

    /// A new transport stream is up: resets the dead-peer clock.
    ///
    /// Initiator: without fresh keys (or when the previous resumed stream was never
    /// confirmed) appends a handshake initiation at once; with fresh keys appends only a
    /// keepalive so the peer learns the new stream (session continuity). Responder: appends a
    /// keepalive when it holds keys.
    pub fn stream_up(&mut self, now: Instant, to_net: &mut BytesMut) -> Result<(), SessionError> {
        self.stream_up = true;
        self.last_rx = now;
        let established = self.is_established();
        let fresh = established && self.last_handshake_age().is_some_and(|a| a < REKEY_AFTER);
        match self.role {
            Role::Initiator if !fresh || self.resume_unconfirmed => {
                self.send_initiation(now, to_net, true)?;
            }
            Role::Initiator => {
                self.send_keepalive(now, to_net)?;
                self.resume_unconfirmed = true;
            }
            Role::Responder if established => self.send_keepalive(now, to_net)?,
            Role::Responder => {}
        }
        Ok(())
    }

    /// The stream carrying the session is gone: stops keepalives and dead-peer checks.
    pub fn stream_down(&mut self) {
        self.stream_up = false;
    }

    /// Whether the session was resumed on a stream (a keepalive instead of a handshake) and
    /// the peer has not answered since. A stream that ends in this state most likely met a
    /// peer that lost the session (a restarted server): the next stream sends a handshake.
    pub fn is_resuming(&self) -> bool {
        self.resume_unconfirmed
    }

    /// The next time [`Session::tick`] has keepalive or dead-peer work, while a stream is up.
    /// boringtun's own timers (handshake retry, rekey, key expiry) need a tick about once a
    /// second besides.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.stream_up {
            return None;
        }
        let dead = self.last_rx + self.cfg.dead_timeout();
        if self.is_established() {
            Some(dead.min(self.last_tx + self.cfg.keepalive))
        } else {
            Some(dead)
        }
    }

    /// Whether a stream is currently attached.
    pub fn is_stream_up(&self) -> bool {
        self.stream_up
    }

    /// Whether the session holds keys it can send with.
    pub fn is_established(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Age of the current keys, if any.
    pub fn last_handshake_age(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    /// Time since the last authentic message from the peer.
    pub fn last_received_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx)
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        let (_, tx, rx, _, _) = self.tunn.stats();
        SessionStats {
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            ..self.stats
        }
    }

    fn send_initiation(
        &mut self,
        now: Instant,
        to_net: &mut BytesMut,
        force: bool,
    ) -> Result<(), SessionError> {
        match self
            .tunn
            .format_handshake_initiation(&mut self.scratch, force)
        {
            TunnResult::WriteToNetwork(out) => {
                encode_frame(out, to_net)?;
                self.last_tx = now;
                self.stats.handshakes_initiated += 1;
                Ok(())
            }
            TunnResult::Err(e) => Err(map_error(e, MSG_INIT)),
            _ => Ok(()),
        }
    }

    fn send_keepalive(&mut self, now: Instant, to_net: &mut BytesMut) -> Result<(), SessionError> {
        match self.tunn.encapsulate(&[], &mut self.scratch) {
            TunnResult::WriteToNetwork(out) => {
                encode_frame(out, to_net)?;
                self.last_tx = now;
                self.stats.keepalives_sent += 1;
                Ok(())
            }
            TunnResult::Err(e) => Err(map_error(e, MSG_DATA)),
            _ => {
                // Nothing to send with: the keepalive is due again one interval later.
                self.last_tx = now;
                Ok(())
            }
        }
    }
}

/// Test helpers shared by the unit tests of this crate.
#[cfg(test)]
pub(crate) mod testutil {
    use bytes::BytesMut;

    use crate::frame::FrameDecoder;

    /// A minimal IPv4/UDP packet with `payload`.
    pub fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2000u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    /// Splits framed bytes into messages.
    pub fn frames(buf: &mut BytesMut) -> Vec<Vec<u8>> {
        let d = FrameDecoder::default();
        let mut out = Vec::new();
        while let Some(f) = d.decode(buf).unwrap() {
            out.push(f.to_vec());
        }
        assert!(buf.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{frames, ipv4_packet};
    use super::*;
    use rand::rngs::OsRng;

    fn pair(now: Instant) -> (Session, Session) {
        let a = StaticSecret::random_from_rng(OsRng);
        let b = StaticSecret::random_from_rng(OsRng);
        let (pa, pb) = (PublicKey::from(&a), PublicKey::from(&b));
        let client = Session::new(a, pb, None, 1, SessionConfig::default(), None, now);
        let server = Session::with_role(
            Role::Responder,
            b,
            pa,
            None,
            2,
            SessionConfig::default(),
            None,
            now,
        );
        (client, server)
    }

    /// Delivers every frame in `wire` to `to`, returning its replies and tunnel packets.
    fn deliver(to: &mut Session, wire: &mut BytesMut, now: Instant) -> (BytesMut, Vec<Vec<u8>>) {
        let mut replies = BytesMut::new();
        let mut tun = Vec::new();
        for msg in frames(wire) {
            to.decapsulate(&msg, now, &mut replies, |p| tun.push(p.to_vec()))
                .unwrap();
        }
        (replies, tun)
    }

    #[test]
    fn handshake_and_packets_both_ways() {
        let now = Instant::now();
        let (mut c, mut s) = pair(now);
        let mut wire = BytesMut::new();
        c.stream_up(now, &mut wire).unwrap();
        s.stream_up(now, &mut BytesMut::new()).unwrap();
        assert!(!c.is_established());
        let (mut resp, _) = deliver(&mut s, &mut wire, now);
        let (mut ka, _) = deliver(&mut c, &mut resp, now);
        assert!(c.is_established());
        deliver(&mut s, &mut ka, now);
        assert!(s.is_established());
        assert_eq!(c.stats().handshakes_completed, 1);
        assert_eq!(s.stats().handshakes_completed, 1);

        let up = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], b"hello");
        c.encapsulate(&up, now, &mut wire).unwrap();
        let (_, got) = deliver(&mut s, &mut wire, now);
        assert_eq!(got, vec![up.clone()]);

        let down = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"world!");
        s.encapsulate(&down, now, &mut wire).unwrap();
        let (_, got) = deliver(&mut c, &mut wire, now);
        assert_eq!(got, vec![down.clone()]);
        assert_eq!(c.stats().tx_bytes, up.len() as u64);
        assert_eq!(c.stats().rx_bytes, down.len() as u64);
    }

    #[test]
    fn packet_queued_until_handshake() {
        let now = Instant::now();
        let (mut c, mut s) = pair(now);
        let mut wire = BytesMut::new();
        let p = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], b"early");
        c.encapsulate(&p, now, &mut wire).unwrap();
        let (mut resp, _) = deliver(&mut s, &mut wire, now);
        // The client answers with a keepalive and the queued packet.
        let (mut out, _) = deliver(&mut c, &mut resp, now);
        let (_, got) = deliver(&mut s, &mut out, now);
        assert_eq!(got, vec![p]);
    }

    #[test]
    fn errors_are_classified() {
        let now = Instant::now();
        let (mut c, mut s) = pair(now);
        let mut out = BytesMut::new();
        let err = s.decapsulate(&[], now, &mut out, |_| {}).unwrap_err();
        assert!(err.is_fatal());
        let err = s
            .decapsulate(&[9, 0, 0, 0], now, &mut out, |_| {})
            .unwrap_err();
        assert!(err.is_fatal());
        // Data for a session that does not exist: counted, not fatal.
        let mut data = vec![0u8; 48];
        data[0] = MSG_DATA;
        let err = s.decapsulate(&data, now, &mut out, |_| {}).unwrap_err();
        assert!(!err.is_fatal(), "{err}");
        // A handshake initiation for another server key: invalid MAC, fatal.
        let other = StaticSecret::random_from_rng(OsRng);
        let mut wrong = Session::new(
            StaticSecret::random_from_rng(OsRng),
            PublicKey::from(&other),
            None,
            3,
            SessionConfig::default(),
            None,
            now,
        );
        let mut wire = BytesMut::new();
        wrong.stream_up(now, &mut wire).unwrap();
        let msg = frames(&mut wire).remove(0);
        let err = s.decapsulate(&msg, now, &mut out, |_| {}).unwrap_err();
        assert!(err.is_fatal());
        assert!(err.to_string().contains("InvalidMac"), "{err}");
        // Replay of a valid initiation: not fatal.
        c.stream_up(now, &mut wire).unwrap();
        let init = frames(&mut wire).remove(0);
        s.decapsulate(&init, now, &mut out, |_| {}).unwrap();
        let err = s.decapsulate(&init, now, &mut out, |_| {}).unwrap_err();
        assert!(!err.is_fatal(), "{err}");
        assert!(!out.is_empty());
        assert!(s.stats().rejected_messages >= 4);
        assert!(matches!(
            c.encapsulate(&vec![0x45; MAX_PACKET_LEN + 1], now, &mut out),
            Err(SessionError::PacketTooLarge(_))
        ));
    }

    #[test]
    fn dead_peer_in_real_time() {
        let now = Instant::now();
        let cfg = SessionConfig {
            keepalive: Duration::from_millis(100),
            dead_timeout: Duration::from_millis(300),
        };
        let a = StaticSecret::random_from_rng(OsRng);
        let b = PublicKey::from(&StaticSecret::random_from_rng(OsRng));
        let mut c = Session::new(a, b, None, 1, cfg, None, now);
        let mut out = BytesMut::new();
        c.stream_up(now, &mut out).unwrap();
        c.tick(now + Duration::from_millis(250), &mut out).unwrap();
        assert!(matches!(
            c.tick(now + Duration::from_millis(300), &mut out),
            Err(SessionError::DeadPeer)
        ));
        c.stream_down();
        c.tick(now + Duration::from_millis(400), &mut out).unwrap();
    }
}
