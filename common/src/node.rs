//! The tunnel node: one owner of a process's tunnels, their WireGuard sessions, stream
//! generations, the flow table, the set of live tunnels, the pre-authentication limits and the
//! counters. Both binaries run one [`Node`]; the simulation drives the same type in memory.
//!
//! Sans-IO in the style of quinn-proto's `Connection`: inputs are plain calls that take `now`
//! (`handle_*`, stream opened / closed), outputs are polled (`poll_transmit`, `poll_close`,
//! `poll_dial`, `poll_evicted`, `poll_event`) and [`Node::poll_timeout`] tells the caller when
//! to call [`Node::handle_timeout`] next. Decrypted packets are written straight into the
//! caller's [`PacketSink`] (its TUN batch): polling them one by one would cost a copy each.
//!
//! The node is generic over two handles it keeps for the caller without looking into them: `S`
//! for an attached stream (the binaries: its frame sink and reader wake-up; the simulation: a
//! pipe number), given back by [`Node::poll_close`] when the stream is detached, and `P` for a
//! stream that has not authenticated yet, given back by [`Node::poll_evicted`].
//!
//! The two sides differ by [`Policy`] only: the seed pins new flows to a live tunnel by hash
//! and admits only replies from the tunnel a flow is pinned to; the shoot records which tunnel
//! a flow came from and sends replies back into it, and redials its tunnels with backoff.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::{Bytes, BytesMut};

use crate::cidr::CidrSet;
use crate::flow::{DropReason, FlowConfig, FlowTable, TunnelId};
use crate::frame::{FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN};
use crate::hub::{Hub, HubError, MessageKind, PeerConfig};
use crate::limits::{
    InstanceCounters, LimitCounters, LimitKind, Limits, PendingKey, PendingSlots, TokenBucket,
};
use crate::metrics::TunnelRow;
use crate::packet::PacketView;
use crate::preamble::Preamble;
use crate::session::{Session, SessionConfig, SessionError};

/// Session timers (boringtun's handshake retry and key expiry) run at least this often.
pub const TIMER_INTERVAL: Duration = Duration::from_secs(1);
/// … and this often while a stream waits for its handshake.
pub const HANDSHAKE_TIMER_INTERVAL: Duration = Duration::from_millis(250);
/// Idle flows are expired this often.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
/// Shoot: first redial delay (full jitter: a random wait up to it), doubled per failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Shoot: largest redial delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Shoot: a stream that lived this long resets the backoff.
pub const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// Shoot: after a live tunnel's stream died, redials for this long come quickly
/// ([`FAST_REDIAL_MIN`]..=[`FAST_REDIAL_MAX`] apart, uniformly jittered): most outages (an
/// ingress or seed server restart) are shorter, and the first dial after the ingress listens
/// again should come within a fraction of a second. Then the backoff doubles to [`BACKOFF_MAX`].
pub const FAST_REDIAL_WINDOW: Duration = Duration::from_secs(5);
/// Shoot: shortest wait between fast redials (caps one tunnel at 10 dials per second).
pub const FAST_REDIAL_MIN: Duration = Duration::from_millis(100);
/// Shoot: longest wait between fast redials.
pub const FAST_REDIAL_MAX: Duration = Duration::from_millis(250);
/// Shoot: dials per second of one client over all its tunnels (a burst of one second's
/// worth): a bound that holds whatever a flapping ingress does.
pub const DIALS_PER_SECOND: u32 = 20;
/// Shortest wait [`Node::poll_timeout`] asks for.
pub const MIN_WAIT: Duration = Duration::from_millis(1);
/// Client instances remembered per peer for preamble replay protection.
pub const INSTANCES_PER_PEER: usize = 64;
/// Events kept for the caller; older ones are dropped when it does not poll.
pub const MAX_EVENTS: usize = 1024;

/// Identifies one stream of a tunnel: the tunnel and the stream's generation (increasing per
/// tunnel). A call naming a replaced stream is refused with [`StreamGone::Stale`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId {
    pub tunnel: TunnelId,
    pub generation: u64,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.tunnel, self.generation)
    }
}

/// Where decrypted packets go: the caller's TUN batch.
pub trait PacketSink {
    /// Queues one packet; false when it was dropped (the batch is full).
    fn push(&mut self, packet: &[u8]) -> bool;
    /// Whether the batch is (nearly) full: the node stops decrypting so the caller can flush.
    fn is_full(&self) -> bool;
}

/// Keeps `pkt` for the next live tunnel: the oldest held packets make room (dropped, counted
/// as `NoTunnel`), as do those older than the tunnel wait; nothing is held when the wait is 0.
fn hold(
    held: &mut VecDeque<(Instant, Vec<u8>)>,
    held_bytes: &mut usize,
    limits: &Limits,
    stats: &mut NodeStats,
    pkt: &[u8],
    now: Instant,
) {
    let cap = if limits.tunnel_wait.is_zero() {
        0
    } else {
        limits.held_bytes
    };
    if pkt.len() > cap {
        stats.drop_packet(PacketDrop::NoTunnel);
        return;
    }
    while let Some((at, p)) = held.front() {
        let stale = now.saturating_duration_since(*at) > limits.tunnel_wait;
        if !stale && *held_bytes + pkt.len() <= cap {
            break;
        }
        *held_bytes -= p.len();
        held.pop_front();
        stats.drop_packet(PacketDrop::NoTunnel);
    }
    *held_bytes += pkt.len();
    held.push_back((now, pkt.to_vec()));
    stats.packets_held += 1;
}

/// A bounded in-memory [`PacketSink`] (a new stream's first message, the simulation).
#[derive(Debug, Default)]
pub struct PacketBatch {
    pub packets: Vec<Vec<u8>>,
    cap: usize,
}

impl PacketBatch {
    /// A batch of at most `cap` packets.
    pub fn new(cap: usize) -> Self {
        Self {
            packets: Vec::new(),
            cap,
        }
    }
}

impl PacketSink for PacketBatch {
    fn push(&mut self, packet: &[u8]) -> bool {
        if self.packets.len() >= self.cap {
            return false;
        }
        self.packets.push(packet.to_vec());
        true
    }
    fn is_full(&self) -> bool {
        self.packets.len() >= self.cap
    }
}

macro_rules! counted_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $label:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)+ }

        impl $name {
            /// Every value, in metric order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];
            /// Number of values.
            pub const COUNT: usize = Self::ALL.len();
            /// Stable snake_case name (metric label).
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $label,)+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

counted_enum! {
    /// Why a packet was dropped.
    PacketDrop {
        /// No live tunnel to send into.
        NoTunnel => "no_tunnel",
        /// The flow table is full.
        TableFull => "table_full",
        /// From a tunnel, with a source outside the shoot networks.
        SourceNotAllowed => "source_not_allowed",
        /// From a tunnel, and no reply to a known flow.
        UnknownFlow => "unknown_flow",
        /// A reply arriving through a tunnel other than its flow's.
        WrongTunnel => "wrong_tunnel",
        /// Not a parseable IP packet.
        Malformed => "malformed",
        /// An ICMP error about a known flow addressed to another host than its seed endpoint.
        WrongDestination => "wrong_destination",
        /// Seed: read from the TUN with a destination outside the shoot networks.
        NotShootNetwork => "not_shoot_network",
        /// Decrypted while the caller's TUN batch was full.
        TunBatchFull => "tun_batch_full",
    }
}

impl From<DropReason> for PacketDrop {
    fn from(r: DropReason) -> Self {
        match r {
            DropReason::NoTunnel => PacketDrop::NoTunnel,
            DropReason::TableFull => PacketDrop::TableFull,
            DropReason::SourceNotAllowed => PacketDrop::SourceNotAllowed,
            DropReason::UnknownFlow => PacketDrop::UnknownFlow,
            DropReason::WrongTunnel => PacketDrop::WrongTunnel,
            DropReason::Malformed => PacketDrop::Malformed,
            DropReason::WrongDestination => PacketDrop::WrongDestination,
        }
    }
}

counted_enum! {
    /// Why outgoing frames were dropped.
    FrameDrop {
        /// The stream's send queue was full (a stalled stream).
        QueueFull => "queue_full",
        /// No stream was attached to the tunnel.
        NoStream => "no_stream",
    }
}

counted_enum! {
    /// Why a new tunnel stream was refused before it authenticated.
    Refusal {
        /// A newer pending stream took its slot.
        Evicted => "evicted",
        /// No preamble and first message within the pre-authentication timeout.
        PreauthTimeout => "preauth_timeout",
        /// The anonymous handshake budget was spent.
        HandshakeBudget => "handshake_budget",
        /// The peer's handshake budget was spent.
        PeerHandshakeBudget => "peer_handshake_budget",
        /// A replayed authenticated preamble.
        Replay => "preamble_replay",
        /// A version-2 preamble of a known key whose tag does not verify.
        Preamble => "bad_preamble",
        /// Neither a CONNECT head nor a preamble, or closed before its first message.
        Opening => "bad_opening",
        /// A handshake from a key that is not an allowed peer.
        UnknownPeer => "unknown_peer",
        /// A first message that does not authenticate or cannot open a stream.
        FirstMessage => "bad_first_message",
    }
}

impl Refusal {
    /// The limit this refusal counts as, if any.
    pub fn limit(self) -> Option<LimitKind> {
        match self {
            Refusal::Evicted => Some(LimitKind::PendingStreams),
            Refusal::PreauthTimeout => Some(LimitKind::PreauthTimeout),
            Refusal::HandshakeBudget => Some(LimitKind::Handshakes),
            Refusal::PeerHandshakeBudget => Some(LimitKind::PeerHandshakes),
            Refusal::Replay => Some(LimitKind::PreambleReplay),
            _ => None,
        }
    }
}

counted_enum! {
    /// Why an attached stream was detached.
    CloseReason {
        /// A newer stream of the same tunnel authenticated.
        Replaced => "replaced",
        /// Nothing arrived from the other side for the dead-peer timeout.
        DeadPeer => "dead_peer",
        /// The session's keys expired without a new handshake.
        Expired => "expired",
        /// A frame or message broke the stream (bad framing, fatal session error).
        Failed => "failed",
        /// The caller saw the stream end (end of stream, read or write error).
        Ended => "ended",
        /// The peer's key is no longer allowed (removed from the peers directory).
        PeerRemoved => "peer_removed",
    }
}

/// A new stream's refusal, with its detail for the log.
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

fn refused(reason: Refusal, detail: impl std::fmt::Display) -> Refused {
    Refused {
        reason,
        detail: detail.to_string(),
    }
}

/// Why a call about a stream was not served.
#[derive(Debug, thiserror::Error)]
pub enum StreamGone {
    /// The stream is not the tunnel's current stream (replaced, or detached as dead).
    #[error("stream {0} is no longer attached")]
    Stale(StreamId),
    /// The stream broke (framing or a fatal session error) and was detached.
    #[error("stream {stream}: {detail}")]
    Failed { stream: StreamId, detail: String },
}

/// Errors of the node's other calls.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no tunnel {0}")]
    NoTunnel(TunnelId),
    #[error("tunnel {0} is not being dialled")]
    NotDialing(TunnelId),
    #[error("this call is for the other side")]
    WrongSide,
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Something the caller may want to log or count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stream was attached to its tunnel.
    StreamUp {
        stream: StreamId,
        /// The stream it replaced, if any.
        replaced: Option<StreamId>,
    },
    /// A stream was detached.
    StreamDown {
        stream: StreamId,
        reason: CloseReason,
        detail: String,
    },
    /// A tunnel became live (stream attached, session established) or stopped being live.
    Live { tunnel: TunnelId, live: bool },
    /// Shoot: a tunnel is redialled after `wait`.
    Redial { tunnel: TunnelId, wait: Duration },
}

/// A detached stream, handed back so the caller closes it.
#[derive(Debug)]
pub struct Closed<S> {
    pub stream: StreamId,
    pub handle: S,
    pub reason: CloseReason,
}

/// Data-plane counters, indexed by the enums above.
#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    /// Packets read from the TUN.
    pub tun_rx_packets: u64,
    /// Packets handed to the caller's TUN batch.
    pub tun_tx_packets: u64,
    /// Bytes read from tunnel streams (framed, encrypted).
    pub tunnel_rx_bytes: u64,
    /// Bytes handed to tunnel streams.
    pub tunnel_tx_bytes: u64,
    pub packet_drops: [u64; PacketDrop::COUNT],
    pub frame_drops: [u64; FrameDrop::COUNT],
    pub refusals: [u64; Refusal::COUNT],
    /// Streams attached (seed: authenticated; shoot: dialled).
    pub streams_accepted: u64,
    /// TUN packets held while no tunnel was live (sent when one came up, unless dropped).
    pub packets_held: u64,
}

impl NodeStats {
    fn drop_packet(&mut self, r: PacketDrop) {
        if let Some(c) = self.packet_drops.get_mut(r as usize) {
            *c += 1;
        }
    }
    fn drop_frames(&mut self, r: FrameDrop) {
        if let Some(c) = self.frame_drops.get_mut(r as usize) {
            *c += 1;
        }
    }
    fn refuse(&mut self, r: Refusal) {
        if let Some(c) = self.refusals.get_mut(r as usize) {
            *c += 1;
        }
    }
    /// Packets dropped for `r`.
    pub fn packet_drops(&self, r: PacketDrop) -> u64 {
        self.packet_drops.get(r as usize).copied().unwrap_or(0)
    }
    /// Frames dropped for `r`.
    pub fn frame_drops(&self, r: FrameDrop) -> u64 {
        self.frame_drops.get(r as usize).copied().unwrap_or(0)
    }
    /// Streams refused for `r`.
    pub fn refusals(&self, r: Refusal) -> u64 {
        self.refusals.get(r as usize).copied().unwrap_or(0)
    }
    /// Streams refused for any reason.
    pub fn refused_total(&self) -> u64 {
        self.refusals.iter().sum()
    }
}

/// What both sides configure alike.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub session: SessionConfig,
    /// Every bound and timeout (pending streams, handshake budgets, flows, …).
    pub limits: Limits,
    /// Seed: the shoot's networks (the only destinations sent into a tunnel).
    pub shoot_networks: CidrSet,
    /// Seed: sources admitted from a tunnel (the shoot networks and the VPN networks).
    pub tunnel_sources: CidrSet,
}

/// The side's policy.
enum Policy {
    Seed {
        hub: Box<Hub>,
        /// Initiations of new streams without an authenticated preamble, all peers.
        anon_handshakes: TokenBucket,
    },
    Shoot {
        /// State of a small xorshift generator for the redial jitter.
        rng: u64,
        /// Dials of all tunnels ([`DIALS_PER_SECOND`]).
        dials: TokenBucket,
    },
}

/// Shoot: why a tunnel is redialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redial {
    /// The dial failed (the ingress refused or did not answer).
    DialFailed,
    /// An opened stream ended before its session was live.
    StreamDied,
    /// The stream of a live tunnel ended.
    LiveStreamDied,
}

/// Shoot: where a tunnel's redial stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    /// Not to be dialled (seed, or a stream is attached).
    Idle,
    /// To be dialled at this time.
    Due(Instant),
    /// Handed to the caller by `poll_dial`; `start_stream` not called yet.
    Ready,
    /// The caller is dialling since this time.
    Dialing(Instant),
}

struct Attached<S> {
    generation: u64,
    handle: S,
    /// Seed: initiations (rekeys) accepted on this stream.
    rekeys: TokenBucket,
    since: Instant,
}

struct Slot<S> {
    name: String,
    session: Session,
    stream: Option<Attached<S>>,
    generation: u64,
    /// Framed messages for the tunnel's stream, handed out by `poll_transmit`.
    out: BytesMut,
    /// In `Node::dirty`.
    dirty: bool,
    live: bool,
    /// Seed: replay protection of the peer's authenticated preambles.
    instances: InstanceCounters,
    /// Seed: initiations of new streams with the peer's authenticated preamble.
    handshakes: TokenBucket,
    /// Shoot: redial state.
    dial: Dial,
    backoff: Duration,
    /// Shoot: streams dialled, and those after the first.
    attempts: u64,
    reconnects: u64,
    retried_at_once: bool,
    /// Shoot: when the tunnel's last live stream died (start of the fast redial phase).
    outage_since: Option<Instant>,
}

impl<S> Slot<S> {
    fn new(name: String, session: Session, limits: &Limits, dial: Dial) -> Self {
        Self {
            name,
            session,
            stream: None,
            generation: 0,
            out: BytesMut::new(),
            dirty: false,
            live: false,
            instances: InstanceCounters::new(INSTANCES_PER_PEER),
            handshakes: TokenBucket::per_second(limits.peer_handshakes_per_second),
            dial,
            backoff: BACKOFF_MIN,
            attempts: 0,
            reconnects: 0,
            retried_at_once: false,
            outage_since: None,
        }
    }

    fn current(&self, id: StreamId) -> bool {
        self.stream.as_ref().map(|s| s.generation) == Some(id.generation)
    }
}

/// See the module documentation.
pub struct Node<S, P = ()> {
    policy: Policy,
    cfg: NodeConfig,
    slots: Vec<Slot<S>>,
    flows: FlowTable,
    /// Tunnels with a stream and an established session, ascending.
    live: Vec<TunnelId>,
    /// TUN packets that found no live tunnel at all (a reconnect in progress), with when they
    /// arrived: sent as soon as a tunnel is live again, so a SYN or a retransmission of that
    /// moment needs no kernel retransmit timer; at most `Limits::held_bytes`, none older than
    /// `Limits::tunnel_wait`.
    held: VecDeque<(Instant, Vec<u8>)>,
    held_bytes: usize,
    /// Their number, readable without the node (a proxy checks it per request).
    live_gauge: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    decoder: FrameDecoder,
    /// Seed: streams not authenticated yet.
    pending: PendingSlots<P>,
    /// Tunnels whose `out` holds frames.
    dirty: Vec<TunnelId>,
    closed: VecDeque<Closed<S>>,
    evicted: VecDeque<(P, Refusal)>,
    dials: VecDeque<TunnelId>,
    events: VecDeque<Event>,
    stats: NodeStats,
    limit_hits: std::sync::Arc<LimitCounters>,
    /// The latest `now` any call gave.
    now: Instant,
    next_timers: Instant,
    next_expire: Instant,
}

impl<S, P> Node<S, P> {
    /// The seed server's node: one tunnel per peer of `hub`, named by `names`.
    pub fn seed(
        hub: Hub,
        names: Vec<String>,
        cfg: NodeConfig,
        limit_hits: std::sync::Arc<LimitCounters>,
        now: Instant,
    ) -> Result<Self, NodeError> {
        let mut slots = Vec::with_capacity(hub.len());
        for i in 0..hub.len() {
            let session = hub.new_session(i, cfg.session, now)?;
            let name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
            slots.push(Slot::new(name, session, &cfg.limits, Dial::Idle));
        }
        let policy = Policy::Seed {
            hub: Box::new(hub),
            anon_handshakes: TokenBucket::per_second(cfg.limits.handshakes_per_second),
        };
        Ok(Self::with(policy, slots, cfg, limit_hits, now))
    }

    /// The shoot client's node: one tunnel per seed server replica (`names`), all with the
    /// seed's key `server`, each dialled at once. `seed` seeds the redial jitter.
    pub fn shoot(
        private: StaticSecret,
        server: PublicKey,
        psk: Option<[u8; 32]>,
        names: Vec<String>,
        cfg: NodeConfig,
        seed: u64,
        now: Instant,
    ) -> Self {
        let slots = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
                let session =
                    Session::new(private.clone(), server, psk, index, cfg.session, None, now);
                Slot::new(name, session, &cfg.limits, Dial::Due(now))
            })
            .collect();
        let policy = Policy::Shoot {
            rng: seed | 1,
            dials: TokenBucket::per_second(DIALS_PER_SECOND),
        };
        Self::with(policy, slots, cfg, std::sync::Arc::default(), now)
    }

    fn with(
        policy: Policy,
        slots: Vec<Slot<S>>,
        cfg: NodeConfig,
        limit_hits: std::sync::Arc<LimitCounters>,
        now: Instant,
    ) -> Self {
        let flows = FlowTable::new(FlowConfig {
            max_flows: cfg.limits.max_flows,
            max_fragments: cfg.limits.max_fragments,
            ..FlowConfig::default()
        });
        Self {
            policy,
            pending: PendingSlots::new(cfg.limits.pending_streams),
            cfg,
            slots,
            flows,
            live: Vec::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            live_gauge: std::sync::Arc::default(),
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            dirty: Vec::new(),
            closed: VecDeque::new(),
            evicted: VecDeque::new(),
            dials: VecDeque::new(),
            events: VecDeque::new(),
            stats: NodeStats::default(),
            limit_hits,
            now,
            next_timers: now,
            next_expire: now + EXPIRE_INTERVAL,
        }
    }

    // ---- state the caller reads ---------------------------------------------------------

    /// Number of tunnels.
    pub fn tunnels(&self) -> usize {
        self.slots.len()
    }

    /// Seed: makes `peers` (name, key) the allowed set, at run time. A new key gets a tunnel (a
    /// key that was removed before comes back on its old tunnel, with a fresh session); a key
    /// no longer listed is refused from now on and its stream is closed
    /// ([`CloseReason::PeerRemoved`]; its flows re-pin to live tunnels). Returns the names of
    /// the added and the removed peers.
    pub fn set_peers(
        &mut self,
        peers: &[(String, PeerConfig)],
        now: Instant,
    ) -> Result<(Vec<String>, Vec<String>), NodeError> {
        self.now = now;
        let mut removed = Vec::new();
        let mut added = Vec::new();
        {
            let Self {
                policy, slots, cfg, ..
            } = self;
            let Policy::Seed { hub, .. } = policy else {
                return Ok((added, removed.into_iter().map(|(_, n)| n).collect()));
            };
            let want: std::collections::HashSet<[u8; 32]> =
                peers.iter().map(|(_, p)| *p.public.as_bytes()).collect();
            for i in 0..hub.len() {
                let gone = hub
                    .peer_public(i)
                    .is_some_and(|k| !want.contains(k.as_bytes()));
                if hub.is_enabled(i) && gone {
                    hub.remove_peer(i);
                    let name = slots.get(i).map(|s| s.name.clone()).unwrap_or_default();
                    removed.push((tunnel_id(i), name));
                }
            }
            for (name, p) in peers {
                if hub.peer_index(&p.public).is_some_and(|i| hub.is_enabled(i)) {
                    continue;
                }
                let i = hub.add_peer(p.clone())?;
                let session = hub.new_session(i, cfg.session, now)?;
                match slots.get_mut(i) {
                    Some(slot) => {
                        slot.session = session;
                        slot.name = name.clone();
                    }
                    None => slots.push(Slot::new(name.clone(), session, &cfg.limits, Dial::Idle)),
                }
                added.push(name.clone());
            }
        }
        for (t, _) in &removed {
            self.detach(
                *t,
                CloseReason::PeerRemoved,
                "its key was removed".into(),
                now,
            );
        }
        self.update_live();
        Ok((added, removed.into_iter().map(|(_, n)| n).collect()))
    }

    /// Live tunnels (stream attached, session established), ascending.
    pub fn live(&self) -> &[TunnelId] {
        &self.live
    }

    /// The number of live tunnels, kept up to date by the node and readable without it.
    pub fn live_gauge(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.live_gauge.clone()
    }

    /// Whether tunnel `t` is live.
    pub fn is_live(&self, t: TunnelId) -> bool {
        self.slots.get(t.index()).is_some_and(|s| s.live)
    }

    /// The current stream of tunnel `t`.
    pub fn stream_of(&self, t: TunnelId) -> Option<StreamId> {
        let s = self.slots.get(t.index())?;
        s.stream.as_ref().map(|a| StreamId {
            tunnel: t,
            generation: a.generation,
        })
    }

    /// The handle of an attached stream.
    pub fn handle(&self, id: StreamId) -> Option<&S> {
        let s = self.slots.get(id.tunnel.index())?;
        s.stream
            .as_ref()
            .filter(|a| a.generation == id.generation)
            .map(|a| &a.handle)
    }

    /// The name of tunnel `t` (peer or server) for logs.
    pub fn name(&self, t: TunnelId) -> &str {
        self.slots.get(t.index()).map_or("?", |s| s.name.as_str())
    }

    /// The session of tunnel `t`.
    pub fn session(&self, t: TunnelId) -> Option<&Session> {
        self.slots.get(t.index()).map(|s| &s.session)
    }

    /// Shoot: streams opened after the first, per tunnel.
    pub fn reconnects(&self, t: TunnelId) -> u64 {
        self.slots.get(t.index()).map_or(0, |s| s.reconnects)
    }

    /// A copy of what the metrics show, taken in one short look.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            rows: self.rows(now),
            reconnects: self.slots.iter().map(|s| s.reconnects).collect(),
            live: self.live.len(),
            tunnels: self.slots.len(),
            stats: self.stats.clone(),
            flows: self.flows.len(),
            pending: self.pending.len(),
        }
    }

    /// The per-tunnel rows of the metrics.
    pub fn rows(&self, now: Instant) -> Vec<TunnelRow> {
        self.slots
            .iter()
            .map(|s| TunnelRow::of(&s.name, &s.session, s.stream.is_some(), now))
            .collect()
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Limit hits (shared with the caller's own limits, e.g. the proxy's).
    pub fn limit_hits(&self) -> &LimitCounters {
        &self.limit_hits
    }

    pub fn limits(&self) -> &Limits {
        &self.cfg.limits
    }

    /// Entries in the flow table.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The flow table (read only).
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Seed: streams that have not authenticated yet.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    // ---- polled outputs -----------------------------------------------------------------

    /// Frames to write: one chunk per tunnel with output, for its current stream.
    pub fn poll_transmit(&mut self) -> Option<(StreamId, Bytes)> {
        while let Some(t) = self.dirty.pop() {
            let Some(slot) = self.slots.get_mut(t.index()) else {
                continue;
            };
            slot.dirty = false;
            if slot.out.is_empty() {
                continue;
            }
            let frames = slot.out.split().freeze();
            match &slot.stream {
                Some(a) => {
                    self.stats.tunnel_tx_bytes += frames.len() as u64;
                    return Some((
                        StreamId {
                            tunnel: t,
                            generation: a.generation,
                        },
                        frames,
                    ));
                }
                None => self.stats.drop_frames(FrameDrop::NoStream),
            }
        }
        None
    }

    /// The caller could not queue `len` bytes of frames from [`Node::poll_transmit`] on
    /// `stream` (its queue, bounded by [`Limits::frames_queued_per_tunnel`], was full).
    pub fn transmit_dropped(&mut self, _stream: StreamId, len: usize) {
        self.stats.tunnel_tx_bytes = self.stats.tunnel_tx_bytes.saturating_sub(len as u64);
        self.stats.drop_frames(FrameDrop::QueueFull);
        self.limit_hits.hit(LimitKind::FrameQueue);
    }

    /// Hands every pending transmit to `send`, which returns false when the stream's queue
    /// refused it (counted as [`FrameDrop::QueueFull`]).
    pub fn flush_transmits(&mut self, mut send: impl FnMut(&S, Bytes) -> bool) {
        while let Some((id, frames)) = self.poll_transmit() {
            let len = frames.len();
            let sent = match self.handle(id) {
                Some(h) => send(h, frames),
                None => false,
            };
            if !sent {
                self.transmit_dropped(id, len);
            }
        }
    }

    /// A stream the node detached (replaced, dead, broken, or reported ended): close it.
    pub fn poll_close(&mut self) -> Option<Closed<S>> {
        self.closed.pop_front()
    }

    /// Seed: a pending stream that lost its slot (evicted by a newer one, or timed out).
    pub fn poll_evicted(&mut self) -> Option<(P, Refusal)> {
        self.evicted.pop_front()
    }

    /// Shoot: a tunnel to dial now; call [`Node::start_stream`] for its first bytes.
    pub fn poll_dial(&mut self) -> Option<TunnelId> {
        self.dials.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Instant {
        let mut next = self.next_timers.min(self.next_expire);
        for s in &self.slots {
            if let Some(d) = s.session.next_deadline() {
                next = next.min(d);
            }
            if let Dial::Due(at) = s.dial {
                next = next.min(at);
            }
        }
        if let Some(d) = self.pending.next_deadline(self.cfg.limits.preauth_timeout) {
            next = next.min(d);
        }
        // A deadline that a tick could not move (a clock step) must not spin the caller.
        next.max(self.now + MIN_WAIT)
    }

    // ---- inputs ---------------------------------------------------------------------------

    /// Timers: session timers (keepalive, rekey, handshake retry, dead peers), flow expiry,
    /// pre-authentication timeouts, due redials.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if now >= self.next_timers
            || self
                .slots
                .iter()
                .any(|s| s.session.next_deadline().is_some_and(|d| d <= now))
        {
            let mut handshaking = false;
            for i in 0..self.slots.len() {
                let t = tunnel_id(i);
                let Some(slot) = self.slots.get_mut(i) else {
                    continue;
                };
                match slot.session.tick(now, &mut slot.out) {
                    Ok(()) => {}
                    Err(e) if e.is_fatal() && slot.stream.is_some() => {
                        let reason = match e {
                            SessionError::DeadPeer => CloseReason::DeadPeer,
                            SessionError::ConnectionExpired => CloseReason::Expired,
                            _ => CloseReason::Failed,
                        };
                        self.detach(t, reason, e.to_string(), now);
                    }
                    Err(e) => tracing::debug!(tunnel = %t, error = %e, "session timer"),
                }
                if let Some(slot) = self.slots.get(i) {
                    handshaking |= slot.stream.is_some() && !slot.session.is_established();
                }
                self.mark_dirty(t);
            }
            let every = if handshaking {
                HANDSHAKE_TIMER_INTERVAL
            } else {
                TIMER_INTERVAL
            };
            self.next_timers = now + every;
        }
        if now >= self.next_expire {
            self.flows.expire(now);
            self.next_expire = now + EXPIRE_INTERVAL;
        }
        let timeout = self.cfg.limits.preauth_timeout;
        for p in self.pending.expire(now, timeout) {
            self.stats.refuse(Refusal::PreauthTimeout);
            self.limit_hits.hit(LimitKind::PreauthTimeout);
            self.evicted.push_back((p, Refusal::PreauthTimeout));
        }
        if let Policy::Shoot { dials, .. } = &mut self.policy {
            for (i, s) in self.slots.iter_mut().enumerate() {
                if let Dial::Due(at) = s.dial {
                    if at <= now {
                        if dials.try_take(now) {
                            s.dial = Dial::Ready;
                            self.dials.push_back(tunnel_id(i));
                        } else {
                            // Over the client's dial budget: when the next token is there.
                            s.dial = Dial::Due(dials.next_token(now).max(now + MIN_WAIT));
                        }
                    }
                }
            }
        }
        self.update_live();
    }

    /// Packets read from the TUN: each goes into the tunnel its side's policy picks (seed: the
    /// flow's pinned live tunnel; shoot: the tunnel its flow came from, else the first live
    /// one), encrypted into that tunnel's output.
    pub fn handle_tun_packets<'a>(
        &mut self,
        packets: impl IntoIterator<Item = &'a [u8]>,
        now: Instant,
    ) {
        self.now = now;
        let Self {
            policy,
            cfg,
            slots,
            flows,
            live,
            stats,
            limit_hits,
            dirty,
            held,
            held_bytes,
            ..
        } = self;
        for pkt in packets {
            stats.tun_rx_packets += 1;
            let Ok(view) = PacketView::parse(pkt) else {
                stats.drop_packet(PacketDrop::Malformed);
                continue;
            };
            let target = match policy {
                Policy::Seed { .. } => {
                    if !cfg.shoot_networks.contains(view.dst()) {
                        // Kernel chatter (router solicitations, MLD) or a socket bound to the
                        // TUN by someone else: nothing outside the shoot networks enters.
                        stats.drop_packet(PacketDrop::NotShootNetwork);
                        continue;
                    }
                    match flows.outbound(&view, live, now) {
                        Ok(t) => t,
                        Err(DropReason::NoTunnel) if live.is_empty() => {
                            hold(held, held_bytes, &cfg.limits, stats, pkt, now);
                            continue;
                        }
                        Err(reason) => {
                            if reason == DropReason::TableFull {
                                limit_hits.hit(LimitKind::Flows);
                            }
                            stats.drop_packet(reason.into());
                            continue;
                        }
                    }
                }
                Policy::Shoot { .. } => {
                    let pinned = flows.reply_tunnel(&view, now).filter(|t| live.contains(t));
                    match pinned.or_else(|| live.first().copied()) {
                        Some(t) => t,
                        None => {
                            hold(held, held_bytes, &cfg.limits, stats, pkt, now);
                            continue;
                        }
                    }
                }
            };
            let Some(slot) = slots.get_mut(target.index()) else {
                continue;
            };
            slot.out.reserve(pkt.len() + 64);
            if let Err(e) = slot.session.encapsulate(pkt, now, &mut slot.out) {
                tracing::debug!(tunnel = %target, error = %e, "encapsulate failed");
            }
            if !slot.dirty && !slot.out.is_empty() {
                slot.dirty = true;
                dirty.push(target);
            }
        }
    }

    /// Sends the held packets (fresh enough) once a tunnel is live.
    fn release_held(&mut self) {
        if self.live.is_empty() || self.held.is_empty() {
            return;
        }
        let now = self.now;
        let wait = self.cfg.limits.tunnel_wait;
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let fresh: Vec<Vec<u8>> = held
            .into_iter()
            .filter_map(|(at, p)| {
                if now.saturating_duration_since(at) <= wait {
                    Some(p)
                } else {
                    self.stats.drop_packet(PacketDrop::NoTunnel);
                    None
                }
            })
            .collect();
        // Counted once when read from the TUN.
        self.stats.tun_rx_packets = self.stats.tun_rx_packets.saturating_sub(fresh.len() as u64);
        self.handle_tun_packets(fresh.iter().map(Vec::as_slice), now);
    }

    /// Bytes read from `stream`: decrypts the complete frames at the front of `buf` until
    /// `tun` is full, writing admitted packets into `tun` and replies into the tunnel's
    /// output. Returns true when `tun` filled up and frames may remain in `buf` (flush it and
    /// call again before reading more).
    pub fn handle_stream_data(
        &mut self,
        stream: StreamId,
        buf: &mut BytesMut,
        now: Instant,
        tun: &mut impl PacketSink,
    ) -> Result<bool, StreamGone> {
        self.now = now;
        let t = stream.tunnel;
        let result = {
            let Self {
                policy,
                cfg,
                slots,
                flows,
                stats,
                limit_hits,
                decoder,
                ..
            } = self;
            let Some(slot) = slots.get_mut(t.index()).filter(|s| s.current(stream)) else {
                return Err(StreamGone::Stale(stream));
            };
            let mut result = Ok(true);
            while !tun.is_full() {
                let frame = match decoder.decode(buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        result = Ok(false);
                        break;
                    }
                    Err(e) => {
                        result = Err(e.to_string());
                        break;
                    }
                };
                stats.tunnel_rx_bytes += (frame.len() + LEN_PREFIX) as u64;
                if let (Policy::Seed { .. }, Some(a)) = (&*policy, slot.stream.as_mut()) {
                    // Rekeys on this stream: a client initiates every two minutes, so a few
                    // per second is plenty; more would be Diffie-Hellman work on demand.
                    if MessageKind::of(&frame) == MessageKind::Initiation && !a.rekeys.try_take(now)
                    {
                        limit_hits.hit(LimitKind::PeerHandshakes);
                        continue;
                    }
                }
                let res = slot.session.decapsulate(&frame, now, &mut slot.out, |p| {
                    deliver(policy, cfg, flows, stats, t, p, now, tun);
                });
                if let Err(e) = res {
                    if e.is_fatal() {
                        result = Err(e.to_string());
                        break;
                    }
                    tracing::debug!(tunnel = %t, error = %e, "tunnel message dropped");
                }
            }
            result
        };
        self.mark_dirty(t);
        let out = match result {
            Ok(more) => Ok(more),
            Err(detail) => {
                self.detach(t, CloseReason::Failed, detail.clone(), now);
                Err(StreamGone::Failed { stream, detail })
            }
        };
        self.update_live();
        out
    }

    /// The caller saw `stream` end (end of stream, read or write error). Detaches it if it is
    /// still current; its handle comes back through [`Node::poll_close`]. Shoot: schedules the
    /// redial.
    pub fn stream_closed(
        &mut self,
        stream: StreamId,
        detail: impl std::fmt::Display,
        now: Instant,
    ) {
        self.now = now;
        let current = self
            .slots
            .get(stream.tunnel.index())
            .is_some_and(|s| s.current(stream));
        if current {
            self.detach(stream.tunnel, CloseReason::Ended, detail.to_string(), now);
        }
        self.update_live();
    }

    // ---- seed ---------------------------------------------------------------------------

    /// Seed: a new stream was accepted. It holds a pending slot until it authenticates or is
    /// refused; when the set is full, the oldest pending stream is evicted (its `P` comes back
    /// through [`Node::poll_evicted`]).
    pub fn stream_arrived(&mut self, waker: P, now: Instant) -> PendingKey {
        self.now = now;
        let (key, evicted) = self.pending.insert(waker, now);
        if let Some(old) = evicted {
            self.stats.refuse(Refusal::Evicted);
            self.limit_hits.hit(LimitKind::PendingStreams);
            self.evicted.push_back((old, Refusal::Evicted));
        }
        key
    }

    /// Seed: a pending stream failed before its first message (`reason`), or ended after it
    /// was evicted (`None`: already counted). Frees its slot.
    pub fn stream_refused(&mut self, key: PendingKey, reason: Option<Refusal>) {
        self.pending.remove(key);
        if let Some(r) = reason {
            self.stats.refuse(r);
        }
    }

    /// Seed: a pending stream sent its preamble and first message. Names the peer within the
    /// handshake budgets, authenticates the first message with the peer's session, and only
    /// then attaches the stream, replacing the peer's older one (whose handle comes back
    /// through [`Node::poll_close`]). Packets of the first message go into `tun`.
    #[allow(clippy::too_many_arguments)]
    pub fn accept_stream(
        &mut self,
        key: PendingKey,
        preamble: &Preamble,
        first: &[u8],
        handle: S,
        now: Instant,
        tun: &mut impl PacketSink,
    ) -> Result<StreamId, Refused> {
        self.now = now;
        if self.pending.remove(key).is_none() {
            // Evicted or timed out meanwhile: already counted.
            return Err(refused(Refusal::Evicted, "the pending slot was taken over"));
        }
        let res = self.accept_inner(preamble, first, handle, now, tun);
        match &res {
            Ok(_) => self.stats.streams_accepted += 1,
            Err(r) => {
                self.stats.refuse(r.reason);
                if let Some(l) = r.reason.limit() {
                    self.limit_hits.hit(l);
                }
            }
        }
        self.update_live();
        res
    }

    fn accept_inner(
        &mut self,
        preamble: &Preamble,
        first: &[u8],
        handle: S,
        now: Instant,
        tun: &mut impl PacketSink,
    ) -> Result<StreamId, Refused> {
        let t = self.identify(preamble, first, now)?;
        let Self {
            policy,
            cfg,
            slots,
            flows,
            stats,
            ..
        } = self;
        let slot = slots
            .get_mut(t.index())
            .ok_or_else(|| refused(Refusal::FirstMessage, format!("no peer {t}")))?;
        // The first message must authenticate before this stream may replace another.
        slot.session
            .decapsulate(first, now, &mut slot.out, |p| {
                deliver(policy, cfg, flows, stats, t, p, now, tun);
            })
            .map_err(|e| refused(Refusal::FirstMessage, e))?;
        slot.session
            .stream_up(now, &mut slot.out)
            .map_err(|e| refused(Refusal::FirstMessage, e))?;
        let id = self.attach(t, handle, now);
        self.mark_dirty(t);
        Ok(id)
    }

    /// Names the peer of a new stream within the handshake budgets: an authenticated preamble
    /// names it at once (replays refused; initiations from the peer's own budget); otherwise
    /// an initiation needs a token of the anonymous budget before the key work that names its
    /// sender. A version-2 preamble naming no allowed key is served like version 1: the
    /// handshake then names the refused key, which tells an operator which client is
    /// misconfigured.
    fn identify(
        &mut self,
        preamble: &Preamble,
        first: &[u8],
        now: Instant,
    ) -> Result<TunnelId, Refused> {
        let Policy::Seed {
            hub,
            anon_handshakes,
        } = &mut self.policy
        else {
            return Err(refused(Refusal::FirstMessage, NodeError::WrongSide));
        };
        let kind = MessageKind::of(first);
        let authenticated = match preamble {
            Preamble::V2(p) => match hub.authenticate_preamble(p) {
                Ok(peer) => Some((peer, p)),
                Err(HubError::PreambleUnknownKey) => None,
                Err(e) => return Err(refused(Refusal::Preamble, e)),
            },
            Preamble::V1 => None,
        };
        let peer = match authenticated {
            Some((peer, p)) => {
                let slot = self
                    .slots
                    .get_mut(peer)
                    .ok_or_else(|| refused(Refusal::FirstMessage, format!("no peer {peer}")))?;
                // The preamble is authentic whatever follows it: its counter is used up now.
                if !slot.instances.check(p.instance, p.counter) {
                    return Err(refused(Refusal::Replay, "preamble counter already seen"));
                }
                hub.identify_as(peer, first)
                    .map_err(|e| refused(Refusal::FirstMessage, e))?;
                if kind == MessageKind::Initiation && !slot.handshakes.try_take(now) {
                    return Err(refused(Refusal::PeerHandshakeBudget, "peer budget spent"));
                }
                peer
            }
            None => {
                if kind == MessageKind::Initiation && !anon_handshakes.try_take(now) {
                    return Err(refused(Refusal::HandshakeBudget, "anonymous budget spent"));
                }
                hub.identify(first).map_err(|e| match e {
                    HubError::UnknownPeer(_) => refused(Refusal::UnknownPeer, e),
                    e => refused(Refusal::FirstMessage, e),
                })?
            }
        };
        Ok(tunnel_id(peer))
    }

    // ---- shoot ----------------------------------------------------------------------------

    /// Shoot: the caller starts dialling tunnel `t` (from [`Node::poll_dial`]). Returns the
    /// stream's first bytes (a handshake initiation, or a keepalive resuming the session),
    /// which go out right behind the preamble.
    pub fn start_stream(&mut self, t: TunnelId, now: Instant) -> Result<Bytes, NodeError> {
        self.now = now;
        let slot = self
            .slots
            .get_mut(t.index())
            .ok_or(NodeError::NoTunnel(t))?;
        if slot.dial != Dial::Ready {
            return Err(NodeError::NotDialing(t));
        }
        slot.dial = Dial::Dialing(now);
        let mut first = BytesMut::with_capacity(256);
        slot.session.stream_up(now, &mut first)?;
        Ok(first.freeze())
    }

    /// Shoot: the dial of tunnel `t` succeeded; attaches the stream.
    pub fn stream_opened(
        &mut self,
        t: TunnelId,
        handle: S,
        now: Instant,
    ) -> Result<StreamId, NodeError> {
        self.now = now;
        let slot = self
            .slots
            .get_mut(t.index())
            .ok_or(NodeError::NoTunnel(t))?;
        let Dial::Dialing(started) = slot.dial else {
            return Err(NodeError::NotDialing(t));
        };
        if slot.attempts > 0 {
            slot.reconnects += 1;
        }
        slot.attempts += 1;
        slot.dial = Dial::Idle;
        let id = self.attach(t, handle, started);
        self.stats.streams_accepted += 1;
        self.update_live();
        Ok(id)
    }

    /// Shoot: the dial of tunnel `t` failed; schedules the next one.
    pub fn dial_failed(&mut self, t: TunnelId, now: Instant) {
        self.now = now;
        let Some(slot) = self.slots.get_mut(t.index()) else {
            return;
        };
        let started = match slot.dial {
            Dial::Dialing(s) => s,
            _ => now,
        };
        slot.attempts += 1;
        slot.session.stream_down();
        self.schedule_redial(t, started, Redial::DialFailed, now);
    }

    /// Shoot: when to dial tunnel `t` again after its stream (begun at `started`) died or its
    /// dial failed.
    fn schedule_redial(&mut self, t: TunnelId, started: Instant, why: Redial, now: Instant) {
        let window = self.cfg.limits.resume_window;
        let Policy::Shoot { rng, .. } = &mut self.policy else {
            return;
        };
        let Some(slot) = self.slots.get_mut(t.index()) else {
            return;
        };
        let lived = now.saturating_duration_since(started);
        if why == Redial::LiveStreamDied {
            // A working tunnel went down: the fast phase begins; after it, the backoff
            // continues from twice the fast wait.
            slot.outage_since = Some(now);
            slot.backoff = FAST_REDIAL_MAX * 2;
        } else if lived >= BACKOFF_RESET {
            slot.backoff = BACKOFF_MIN;
        }
        let fast = slot
            .outage_since
            .is_some_and(|o| now.saturating_duration_since(o) < FAST_REDIAL_WINDOW);
        // A resumed stream the server closed unanswered (it restarted and lost the session):
        // the next stream carries a handshake, so it goes out at once.
        let wait = if why != Redial::DialFailed
            && slot.session.is_resuming()
            && !slot.retried_at_once
            && lived < window
        {
            slot.retried_at_once = true;
            Duration::ZERO
        } else if fast {
            slot.retried_at_once = false;
            let spread =
                u64::try_from((FAST_REDIAL_MAX - FAST_REDIAL_MIN).as_millis()).unwrap_or(u64::MAX);
            FAST_REDIAL_MIN + Duration::from_millis(next_random(rng) % (spread + 1))
        } else {
            slot.retried_at_once = false;
            let max = u64::try_from(slot.backoff.as_millis()).unwrap_or(u64::MAX);
            let wait = Duration::from_millis(next_random(rng) % (max + 1));
            slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
            wait
        };
        slot.dial = Dial::Due(now + wait);
        self.push_event(Event::Redial { tunnel: t, wait });
    }

    // ---- internals ------------------------------------------------------------------------

    /// Detaches the current stream of `t`: its handle goes to `closed`; shoot: redial.
    fn detach(&mut self, t: TunnelId, reason: CloseReason, detail: String, now: Instant) {
        let Some(slot) = self.slots.get_mut(t.index()) else {
            return;
        };
        let healthy = slot.live;
        let Some(a) = slot.stream.take() else {
            return;
        };
        slot.session.stream_down();
        // Flows keep their pin: the peer's next stream carries the same tunnel id, and a flow
        // whose tunnel stays down is re-pinned by its next outbound packet.
        let id = StreamId {
            tunnel: t,
            generation: a.generation,
        };
        let since = a.since;
        self.closed.push_back(Closed {
            stream: id,
            handle: a.handle,
            reason,
        });
        self.push_event(Event::StreamDown {
            stream: id,
            reason,
            detail,
        });
        if matches!(self.policy, Policy::Shoot { .. }) {
            let why = if healthy {
                Redial::LiveStreamDied
            } else {
                Redial::StreamDied
            };
            self.schedule_redial(t, since, why, now);
        }
    }

    /// Attaches a new stream generation of tunnel `t`; a stream it replaces goes to `closed`.
    /// `since`: when the stream began (its dial's start on the shoot).
    fn attach(&mut self, t: TunnelId, handle: S, since: Instant) -> StreamId {
        let rate = self.cfg.limits.peer_handshakes_per_second;
        let Some(slot) = self.slots.get_mut(t.index()) else {
            return StreamId {
                tunnel: t,
                generation: 0,
            };
        };
        slot.generation += 1;
        let generation = slot.generation;
        let old = slot.stream.replace(Attached {
            generation,
            handle,
            rekeys: TokenBucket::per_second(rate),
            since,
        });
        let id = StreamId {
            tunnel: t,
            generation,
        };
        let replaced = old.map(|old| {
            let old_id = StreamId {
                tunnel: t,
                generation: old.generation,
            };
            self.closed.push_back(Closed {
                stream: old_id,
                handle: old.handle,
                reason: CloseReason::Replaced,
            });
            self.push_event(Event::StreamDown {
                stream: old_id,
                reason: CloseReason::Replaced,
                detail: format!("replaced by stream {generation}"),
            });
            old_id
        });
        self.push_event(Event::StreamUp {
            stream: id,
            replaced,
        });
        id
    }

    fn mark_dirty(&mut self, t: TunnelId) {
        if let Some(slot) = self.slots.get_mut(t.index()) {
            if !slot.dirty && !slot.out.is_empty() {
                slot.dirty = true;
                self.dirty.push(t);
            }
        }
    }

    /// Recomputes the live set where a slot's state changed: the one place it is derived.
    fn update_live(&mut self) {
        let mut changed = false;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let live = s.stream.is_some() && s.session.is_established();
            if live != s.live {
                s.live = live;
                changed = true;
                let ev = Event::Live {
                    tunnel: tunnel_id(i),
                    live,
                };
                if self.events.len() >= MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(ev);
            }
        }
        if changed {
            self.live = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.live)
                .map(|(i, _)| tunnel_id(i))
                .collect();
            self.release_held();
            self.live_gauge
                .store(self.live.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
}

fn tunnel_id(i: usize) -> TunnelId {
    TunnelId(u32::try_from(i).unwrap_or(u32::MAX))
}

fn next_random(state: &mut u64) -> u64 {
    // xorshift64*: jitter only, no security role.
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Admits one decrypted packet from tunnel `t` by the side's policy and hands it to `tun`.
#[allow(clippy::too_many_arguments)]
fn deliver(
    policy: &Policy,
    cfg: &NodeConfig,
    flows: &mut FlowTable,
    stats: &mut NodeStats,
    t: TunnelId,
    p: &[u8],
    now: Instant,
    tun: &mut impl PacketSink,
) {
    let Ok(view) = PacketView::parse(p) else {
        stats.drop_packet(PacketDrop::Malformed);
        return;
    };
    match policy {
        Policy::Seed { .. } => {
            // Only a reply to a known flow pinned to this tunnel (or an ICMP error about one),
            // from the shoot or VPN networks, enters the seed.
            if let Err(reason) = flows.inbound(&view, t, &cfg.tunnel_sources, now) {
                stats.drop_packet(reason.into());
                tracing::trace!(src = %view.src(), dst = %view.dst(), %reason, "dropped packet from tunnel");
                return;
            }
        }
        Policy::Shoot { .. } => {
            // Remember the tunnel the flow came from; a full table only loses the pin.
            let _ = flows.from_tunnel(&view, t, now);
        }
    }
    if tun.push(p) {
        stats.tun_tx_packets += 1;
    } else {
        stats.drop_packet(PacketDrop::TunBatchFull);
    }
}

/// What the metrics show of a node (see [`Node::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// One row per tunnel.
    pub rows: Vec<TunnelRow>,
    /// Shoot: streams opened after the first, per tunnel (as `rows`).
    pub reconnects: Vec<u64>,
    pub live: usize,
    pub tunnels: usize,
    pub stats: NodeStats,
    /// Entries in the flow table.
    pub flows: usize,
    /// Seed: streams not authenticated yet.
    pub pending: usize,
}

impl Snapshot {
    /// The families both sides expose: the per-tunnel ones (labelled `<label>`) and the
    /// data-plane counters.
    pub fn expose(&self, e: &mut crate::metrics::Exposition, prefix: &str, label: &str) {
        crate::metrics::expose_tunnels(e, prefix, label, &self.rows);
        let rejected = self.rows.iter().map(|r| r.stats.rejected_messages).sum();
        self.stats.expose(e, prefix, rejected);
    }
}

impl NodeStats {
    /// `<prefix>_stream_bytes_total`, `_tun_packets_total`, `_packets_dropped_total`,
    /// `_frames_dropped_total` (`rejected`: incoming frames the sessions rejected) and
    /// `_streams_refused_total`.
    pub fn expose(&self, e: &mut crate::metrics::Exposition, prefix: &str, rejected: u64) {
        use crate::metrics::Kind;
        let directed = [
            (
                "stream_bytes_total",
                "Bytes on tunnel streams (framed, encrypted).",
                self.tunnel_rx_bytes,
                self.tunnel_tx_bytes,
            ),
            (
                "tun_packets_total",
                "Packets through the TUN device.",
                self.tun_rx_packets,
                self.tun_tx_packets,
            ),
        ];
        for (suffix, help, rx, tx) in directed {
            let name = format!("{prefix}_{suffix}");
            e.family(&name, Kind::Counter, help)
                .sample(&name, &[("direction", "rx")], rx as f64)
                .sample(&name, &[("direction", "tx")], tx as f64);
        }
        e.single(
            &format!("{prefix}_packets_held_total"),
            Kind::Counter,
            "TUN packets held while no tunnel was live, for the next one (see --tunnel-wait).",
            self.packets_held as f64,
        );
        let name = format!("{prefix}_packets_dropped_total");
        e.family(&name, Kind::Counter, "Packets dropped, by reason.");
        for r in PacketDrop::ALL {
            e.sample(&name, &[("reason", r.name())], self.packet_drops(*r) as f64);
        }
        let name = format!("{prefix}_frames_dropped_total");
        e.family(
            &name,
            Kind::Counter,
            "Tunnel frames dropped, by reason: rejected (incoming, failed authentication or decryption), queue_full and no_stream (outgoing).",
        )
        .sample(&name, &[("reason", "rejected")], rejected as f64);
        for r in FrameDrop::ALL {
            e.sample(&name, &[("reason", r.name())], self.frame_drops(*r) as f64);
        }
    }

    /// `<prefix>_streams_refused_total{reason}`: new tunnel streams refused before they
    /// authenticated.
    pub fn expose_refusals(&self, e: &mut crate::metrics::Exposition, prefix: &str) {
        let name = format!("{prefix}_streams_refused_total");
        e.family(
            &name,
            crate::metrics::Kind::Counter,
            "Tunnel streams refused before they authenticated, by reason.",
        );
        for r in Refusal::ALL {
            e.sample(&name, &[("reason", r.name())], self.refusals(*r) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Exposition;

    #[test]
    fn data_plane_families_name_every_reason() {
        let mut s = NodeStats {
            tun_rx_packets: 3,
            ..NodeStats::default()
        };
        s.drop_frames(FrameDrop::QueueFull);
        s.drop_packet(PacketDrop::WrongTunnel);
        s.refuse(Refusal::Replay);
        let mut e = Exposition::new();
        s.expose(&mut e, "x", 2);
        s.expose_refusals(&mut e, "x");
        let text = e.finish();
        for line in [
            "x_tun_packets_total{direction=\"rx\"} 3\n",
            "x_stream_bytes_total{direction=\"tx\"} 0\n",
            "x_packets_dropped_total{reason=\"wrong_tunnel\"} 1\n",
            "x_packets_dropped_total{reason=\"tun_batch_full\"} 0\n",
            "x_frames_dropped_total{reason=\"rejected\"} 2\n",
            "x_frames_dropped_total{reason=\"queue_full\"} 1\n",
            "x_frames_dropped_total{reason=\"no_stream\"} 0\n",
            "x_streams_refused_total{reason=\"preamble_replay\"} 1\n",
            "x_packets_held_total 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert_eq!(text.matches("# TYPE").count(), 6);
        assert_eq!(s.refused_total(), 1);
        for r in PacketDrop::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", r.name())), "{r}");
        }
    }

    #[test]
    fn every_refusal_with_a_limit_names_it() {
        assert_eq!(Refusal::Evicted.limit(), Some(LimitKind::PendingStreams));
        assert_eq!(
            Refusal::HandshakeBudget.limit(),
            Some(LimitKind::Handshakes)
        );
        assert_eq!(Refusal::UnknownPeer.limit(), None);
        assert_eq!(Refusal::COUNT, Refusal::ALL.len());
    }
}
