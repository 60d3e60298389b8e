//! Shared state of the seed server: the peer hub, one slot per allowed client, the flow table
//! and counters. Locks are std mutexes held only for synchronous work (never across `.await`).
//! Lock order: a peer's slot, then the flow table.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use common::cidr::CidrSet;
use common::flow::{FlowTable, TunnelId};
use common::hub::Hub;
use common::io::framed::FrameSink;
use common::io::tunio::TunWriter;
use common::limits::{InstanceCounters, LimitCounters, Limits, PendingSlots, TokenBucket};
use common::metrics::{DataPlaneStats, Histogram, DIAL_BUCKETS};
use common::session::Session;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// Streams or connections that have not authenticated yet, each with the notification that
/// tells it it was evicted.
pub type PendingSet = Arc<Mutex<PendingSlots<Arc<Notify>>>>;

/// A pending slot: taken at accept, given back when dropped (authenticated, refused or
/// closed). When the set is full, taking one evicts the oldest holder, whose [`Pending::evicted`]
/// then completes.
pub struct Pending {
    set: PendingSet,
    key: common::limits::PendingKey,
    evict: Arc<Notify>,
}

impl Pending {
    /// Takes a slot of `set`, counting an eviction as a hit of `kind`.
    pub fn take(
        set: &PendingSet,
        counters: &LimitCounters,
        kind: common::limits::LimitKind,
    ) -> Self {
        let evict = Arc::new(Notify::new());
        let (key, evicted) = lock(set).insert(evict.clone(), std::time::Instant::now());
        if let Some(old) = evicted {
            counters.hit(kind);
            // Stores a permit if the holder is not waiting yet: it sees it at its next await.
            old.notify_one();
        }
        Self {
            set: set.clone(),
            key,
            evict,
        }
    }

    /// Completes when a newer arrival took this slot over.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.set).remove(self.key);
    }
}

/// Client instances remembered per peer for preamble replay protection.
pub const INSTANCES_PER_PEER: usize = 64;

/// The TUN writer of a peer: created when its first stream authenticates, held by the reader
/// of its current stream (a newer stream's reader waits until the replaced one let go).
pub type TunSlot = Arc<tokio::sync::Mutex<Option<TunWriter>>>;

/// The stream currently carrying a peer's tunnel.
pub struct StreamHandle {
    /// Increases with every new stream of this peer; a task whose generation is stale stops.
    pub generation: u64,
    /// Where framed bytes for the stream go.
    pub sink: FrameSink,
    /// Stops the stream's reader task when the stream is replaced or declared dead.
    pub reader: Option<AbortHandle>,
    pub remote: String,
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.sink.close();
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

/// One allowed client.
pub struct PeerSlot {
    /// Name in logs and metrics.
    pub name: String,
    pub session: Session,
    pub stream: Option<StreamHandle>,
    pub generation: u64,
    /// TUN writer of the peer's streams (allocated once the peer authenticated).
    pub tun: TunSlot,
    /// Replay protection of the peer's authenticated preambles.
    pub instances: InstanceCounters,
    /// Handshake initiations of new streams with an authenticated preamble.
    pub handshakes: TokenBucket,
}

/// Why a packet was dropped: the flow table's reasons, then the pump's own.
pub const DROP_REASONS: [&str; 8] = [
    "no_tunnel",
    "table_full",
    "source_not_allowed",
    "unknown_flow",
    "wrong_tunnel",
    "malformed",
    "wrong_destination",
    "not_shoot_network",
];

/// Counters exposed on `/metrics`.
pub struct Stats {
    /// TUN packets, stream bytes, drops.
    pub plane: DataPlaneStats,
    pub streams_accepted: AtomicU64,
    pub streams_rejected: AtomicU64,
    pub proxy_open: AtomicU64,
    pub proxy_answers: [AtomicU64; 7],
    /// Time from the start of a dial through the TUN to the upstream's accept.
    pub dial: Histogram,
    /// Hits per limit.
    pub limits: LimitCounters,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            plane: DataPlaneStats::new(&DROP_REASONS),
            streams_accepted: AtomicU64::new(0),
            streams_rejected: AtomicU64::new(0),
            proxy_open: AtomicU64::new(0),
            proxy_answers: Default::default(),
            dial: Histogram::new(&DIAL_BUCKETS),
            limits: LimitCounters::default(),
        }
    }
}

/// Index into `Stats::proxy_answers` for an answer code.
pub fn answer_slot(code: u16) -> usize {
    match code {
        200 => 0,
        400 => 1,
        403 => 2,
        405 => 3,
        502 => 4,
        503 => 5,
        _ => 6,
    }
}

pub const ANSWER_CODES: [u16; 7] = [200, 400, 403, 405, 502, 503, 504];

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the server's tasks share.
pub struct Server {
    pub hub: Hub,
    /// Every bound and timeout.
    pub limits: Limits,
    /// Handshake initiations of new streams without an authenticated preamble, all peers.
    pub anon_handshakes: Mutex<TokenBucket>,
    /// Tunnel streams not authenticated yet; an evicted one is woken to close.
    pub pending: PendingSet,
    /// Proxy connections whose request head is not complete yet.
    pub proxy_pending: PendingSet,
    /// Proxy TLS handshakes in flight (ClientHello received, not finished).
    pub tls_handshakes: PendingSet,
    pub peers: Vec<Mutex<PeerSlot>>,
    pub flows: Mutex<FlowTable>,
    pub shoot_networks: CidrSet,
    /// Sources accepted from the tunnel: the shoot networks and the VPN networks (ICMP errors
    /// the shoot client's kernel sends about a flow).
    pub tunnel_sources: CidrSet,
    /// Peers whose stream is up and whose session is established, ascending.
    pub live: RwLock<Vec<TunnelId>>,
    pub stats: Stats,
    /// Set on SIGTERM: not ready any more, no new proxied connections.
    pub draining: AtomicBool,
    /// Woken when the last open proxied connection closes.
    pub proxy_idle: Notify,
}

/// Locks a mutex, recovering the data of a poisoned one (a panicking task must not take the
/// whole data plane down with it).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    /// Counts a proxied connection as open until the guard drops.
    pub fn open_guard(&self) -> OpenGuard<'_> {
        self.stats.proxy_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self)
    }

    /// Open proxied connections.
    pub fn open_connections(&self) -> u64 {
        self.stats.proxy_open.load(Ordering::Relaxed)
    }

    pub fn peer(&self, id: TunnelId) -> Option<MutexGuard<'_, PeerSlot>> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.peers.get(i))
            .map(lock)
    }

    /// Recomputes the live tunnel list from the peer slots.
    pub fn refresh_live(&self) {
        let live: Vec<TunnelId> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                let p = lock(p);
                p.stream.is_some() && p.session.is_established()
            })
            .map(|(i, _)| i as TunnelId)
            .collect();
        let mut g = self.live.write().unwrap_or_else(|p| p.into_inner());
        if *g != live {
            *g = live;
        }
    }

    pub fn live_count(&self) -> usize {
        self.live
            .read()
            .map(|g| g.len())
            .unwrap_or_else(|p| p.into_inner().len())
    }

    /// Detaches the stream of `id` if it is still generation `generation`.
    pub fn detach_stream(&self, id: TunnelId, generation: u64) -> bool {
        let detached = match self.peer(id) {
            Some(mut p) if p.stream.as_ref().map(|s| s.generation) == Some(generation) => {
                // Dropping the handle only aborts the reader if it is another task.
                if let Some(mut s) = p.stream.take() {
                    s.reader = None;
                }
                p.session.stream_down();
                true
            }
            _ => false,
        };
        // Flows keep their pin: the peer's next stream carries the same tunnel id, and a flow
        // whose tunnel stays down is re-pinned by its next outbound packet.
        if detached {
            self.refresh_live();
        }
        detached
    }
}

/// See [`Server::open_guard`].
pub struct OpenGuard<'a>(&'a Server);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.0.stats.proxy_open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.proxy_idle.notify_waiters();
        }
    }
}
