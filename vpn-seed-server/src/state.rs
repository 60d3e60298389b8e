//! Shared state of the seed server: the tunnel node (peers, sessions, flows) behind its lock,
//! the proxy's pending sets and counters. Locks are std mutexes held only for synchronous work
//! (never across `.await`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use common::cidr::CidrSet;
use common::io::nodeio::NodeCell;
use common::limits::{LimitCounters, Limits, PendingSlots};
use common::metrics::{Histogram, DIAL_BUCKETS};
use tokio::sync::Notify;

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

/// Counters exposed on `/metrics` besides the node's.
pub struct Stats {
    pub proxy_open: AtomicU64,
    /// Proxy requests waiting for a tunnel now.
    pub tunnel_waiting: AtomicU64,
    /// Proxy requests whose wait for a tunnel ended without one (answered 503).
    pub tunnel_wait_timeouts: AtomicU64,
    /// Proxy answers, by code.
    pub proxy_answers: Answers,
    /// Time from the start of a dial through the TUN to the upstream's accept.
    pub dial: Histogram,
    /// Hits per limit (the node's and the proxy's).
    pub limits: Arc<LimitCounters>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            proxy_open: AtomicU64::new(0),
            tunnel_waiting: AtomicU64::new(0),
            tunnel_wait_timeouts: AtomicU64::new(0),
            proxy_answers: Answers::default(),
            dial: Histogram::new(&DIAL_BUCKETS),
            limits: Arc::default(),
        }
    }
}

/// Proxy answers counted by code; a code not listed counts as the last (504).
#[derive(Default)]
pub struct Answers([AtomicU64; ANSWER_CODES.len()]);

impl Answers {
    /// Counts one answer with `code`.
    pub fn count(&self, code: u16) {
        let i = ANSWER_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(ANSWER_CODES.len() - 1);
        if let Some(c) = self.0.get(i) {
            inc(c);
        }
    }

    /// (code, count) pairs.
    pub fn values(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        ANSWER_CODES
            .iter()
            .zip(&self.0)
            .map(|(code, n)| (*code, n.load(Ordering::Relaxed)))
    }
}

/// The answer codes the proxy gives.
pub const ANSWER_CODES: [u16; 7] = [200, 400, 403, 405, 502, 503, 504];

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the server's tasks share.
pub struct Server {
    /// Tunnels, sessions, flows and the tunnel port's limits.
    pub node: Arc<NodeCell>,
    /// The node's live tunnel count (read per proxy request without taking the node's lock).
    pub live: Arc<std::sync::atomic::AtomicUsize>,
    /// Every bound and timeout.
    pub limits: Limits,
    /// Proxy connections whose request head is not complete yet.
    pub proxy_pending: PendingSet,
    /// Proxy TLS handshakes in flight (ClientHello received, not finished).
    pub tls_handshakes: PendingSet,
    pub shoot_networks: CidrSet,
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
    /// Counts a proxy connection as open (from its accept on) until the guard drops.
    pub fn open_guard(self: &Arc<Self>) -> OpenGuard {
        self.stats.proxy_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// Open proxied connections.
    pub fn open_connections(&self) -> u64 {
        self.stats.proxy_open.load(Ordering::Relaxed)
    }

    /// Live tunnels.
    pub fn live_count(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether a proxy request may dial: a tunnel is live, or comes up within the tunnel wait
    /// (`Limits::tunnel_wait`); `false` also when shutdown begins meanwhile. A request that
    /// waited in vain counts in `tunnel_wait_timeouts`.
    pub async fn wait_for_tunnel(&self) -> bool {
        if self.live_count() > 0 {
            return true;
        }
        let wait = self.limits.tunnel_wait;
        if wait.is_zero() {
            return false;
        }
        self.stats.tunnel_waiting.fetch_add(1, Ordering::Relaxed);
        let ready = || self.live_count() > 0 || self.draining.load(Ordering::Relaxed);
        let waited = tokio::time::timeout(wait, self.node.wait_tunnel_up(ready)).await;
        self.stats.tunnel_waiting.fetch_sub(1, Ordering::Relaxed);
        let up = self.live_count() > 0;
        if waited.is_err() && !up {
            inc(&self.stats.tunnel_wait_timeouts);
        }
        up
    }
}

/// See [`Server::open_guard`].
pub struct OpenGuard(Arc<Server>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.stats.proxy_open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.proxy_idle.notify_waiters();
        }
    }
}
