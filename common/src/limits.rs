//! Bounds on everything a stranger can make a process hold, and the sans-IO pieces that enforce
//! them: [`Limits`] (every bound and timeout with its default), [`LimitKind`] and
//! [`LimitCounters`] (a metric per limit hit), [`PendingSlots`] (streams and connections that
//! have not authenticated yet: bounded, the oldest evicted by a newcomer), [`TokenBucket`]
//! (handshakes per second), [`InstanceCounters`] (replay protection of authenticated
//! preambles) and [`LogGate`] (log lines per second per reason).
//!
//! Nothing here does IO or reads a clock: every call that needs time takes `now`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Every bound and timeout of the seed server that hostile input can run into. Defaults are
/// safe for a seed with a few hundred shoots; see SECURITY.md for the reasoning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Tunnel streams accepted but not yet authenticated; a newcomer evicts the oldest.
    pub pending_streams: usize,
    /// Time a new tunnel stream has for its CONNECT head (if any), preamble and first message.
    pub preauth_timeout: Duration,
    /// Handshake initiations per second on new streams without an authenticated preamble
    /// (each costs Diffie-Hellman work before the sender is known), across all streams.
    pub handshakes_per_second: u32,
    /// Handshake initiations per second per peer on streams whose preamble authenticated, and
    /// per bound stream (rekeys).
    pub peer_handshakes_per_second: u32,
    /// Bytes of frames queued for one tunnel stream before frames are dropped.
    pub frames_queued_per_tunnel: usize,
    /// Proxy connections accepted whose request head is not complete yet (TLS handshake and
    /// head); a newcomer evicts the oldest.
    pub proxy_pending: usize,
    /// TLS handshakes of the proxy in flight at once (from the ClientHello on); a newcomer
    /// evicts the oldest.
    pub proxy_tls_handshakes: usize,
    /// Time a proxy client has for its TLS handshake (including the wait for a slot).
    pub proxy_tls_timeout: Duration,
    /// Time a proxy client has to send its request head.
    pub proxy_head_timeout: Duration,
    /// Open proxied connections; more get 503.
    pub max_connections: usize,
    /// Dials through the tunnel in flight at once; more get 503.
    pub pending_dials: usize,
    /// DNS lookups through the tunnel in flight at once; more get 503.
    pub dns_lookups: usize,
    /// Hostnames whose address the proxy caches.
    pub dns_cache_names: usize,
    /// Longest time a cached address is used (shorter when the record's TTL is).
    pub dns_cache_ttl: Duration,
    /// Time a proxy request waits for a tunnel when none is up (a reconnect, a restart)
    /// before it gets 503; zero answers 503 at once.
    pub tunnel_wait: Duration,
    /// Bytes of TUN packets held while no tunnel is live (sent when one comes up, at most
    /// `tunnel_wait` old): the SYNs and retransmissions of that moment.
    pub held_bytes: usize,
    /// Entries of the flow table; packets of new flows beyond it are dropped.
    pub max_flows: usize,
    /// Fragmented datagrams whose tunnel the flow table remembers for their later fragments.
    pub max_fragments: usize,
    /// Shoot: a stream that resumed the session (no handshake) and was closed unanswered
    /// within this time is redialled at once with a handshake (the seed lost the session).
    pub resume_window: Duration,
    /// Warning lines per second per reason; the rest are counted and summarised.
    pub log_lines_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pending_streams: 256,
            preauth_timeout: Duration::from_secs(2),
            handshakes_per_second: 100,
            peer_handshakes_per_second: 4,
            frames_queued_per_tunnel: 4 * 1024 * 1024,
            proxy_pending: 1024,
            proxy_tls_handshakes: 64,
            proxy_tls_timeout: Duration::from_secs(5),
            proxy_head_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            pending_dials: 1024,
            dns_lookups: 256,
            dns_cache_names: 1024,
            dns_cache_ttl: Duration::from_secs(30),
            tunnel_wait: Duration::from_secs(5),
            held_bytes: 1 << 20,
            max_flows: 65_536,
            max_fragments: 1024,
            resume_window: Duration::from_secs(2),
            log_lines_per_second: 10,
        }
    }
}

/// A limit that was hit. The `name` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// A pending tunnel stream was evicted by a newer one.
    PendingStreams,
    /// A tunnel stream did not authenticate within the pre-authentication timeout.
    PreauthTimeout,
    /// An anonymous handshake initiation was refused: the global budget was spent.
    Handshakes,
    /// An initiation of a known peer (authenticated preamble, or on its bound stream) was
    /// refused: the per-peer budget was spent.
    PeerHandshakes,
    /// A replayed authenticated preamble was refused.
    PreambleReplay,
    /// Frames were dropped because a tunnel stream's queue was full.
    FrameQueue,
    /// A pending proxy connection was evicted by a newer one.
    ProxyPending,
    /// A proxy TLS handshake in flight was evicted by a newer one.
    ProxyTlsHandshakes,
    /// A proxy TLS handshake did not finish in time.
    ProxyTlsTimeout,
    /// A proxy client sent no complete request head in time.
    ProxyHeadTimeout,
    /// A proxy request was refused: the connection limit was reached.
    Connections,
    /// A proxy request was refused: too many dials in flight.
    PendingDials,
    /// A hostname lookup was refused: too many DNS lookups in flight.
    DnsLookups,
    /// A packet of a new flow was dropped: the flow table is full.
    Flows,
    /// Log lines were suppressed.
    LogLines,
}

impl LimitKind {
    /// Every limit, in metric order.
    pub const ALL: [LimitKind; 15] = [
        LimitKind::PendingStreams,
        LimitKind::PreauthTimeout,
        LimitKind::Handshakes,
        LimitKind::PeerHandshakes,
        LimitKind::PreambleReplay,
        LimitKind::FrameQueue,
        LimitKind::ProxyPending,
        LimitKind::ProxyTlsHandshakes,
        LimitKind::ProxyTlsTimeout,
        LimitKind::ProxyHeadTimeout,
        LimitKind::Connections,
        LimitKind::PendingDials,
        LimitKind::DnsLookups,
        LimitKind::Flows,
        LimitKind::LogLines,
    ];

    /// Stable snake_case name (metric label).
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::PendingStreams => "pending_streams",
            LimitKind::PreauthTimeout => "preauth_timeout",
            LimitKind::Handshakes => "handshakes",
            LimitKind::PeerHandshakes => "peer_handshakes",
            LimitKind::PreambleReplay => "preamble_replay",
            LimitKind::FrameQueue => "frame_queue",
            LimitKind::ProxyPending => "proxy_pending",
            LimitKind::ProxyTlsHandshakes => "proxy_tls_handshakes",
            LimitKind::ProxyTlsTimeout => "proxy_tls_timeout",
            LimitKind::ProxyHeadTimeout => "proxy_head_timeout",
            LimitKind::Connections => "connections",
            LimitKind::PendingDials => "pending_dials",
            LimitKind::DnsLookups => "dns_lookups",
            LimitKind::Flows => "flows",
            LimitKind::LogLines => "log_lines",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One counter per [`LimitKind`], shared between tasks.
#[derive(Debug, Default)]
pub struct LimitCounters {
    hits: [AtomicU64; LimitKind::ALL.len()],
}

impl LimitCounters {
    /// Counts one hit of `kind`.
    pub fn hit(&self, kind: LimitKind) {
        self.add(kind, 1);
    }

    /// Counts `n` hits of `kind`.
    pub fn add(&self, kind: LimitKind, n: u64) {
        if let Some(c) = self.hits.get(kind.index()) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Hits of `kind` so far.
    pub fn get(&self, kind: LimitKind) -> u64 {
        self.hits
            .get(kind.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every limit with its hits, in [`LimitKind::ALL`] order.
    pub fn snapshot(&self) -> Vec<(LimitKind, u64)> {
        LimitKind::ALL.iter().map(|k| (*k, self.get(*k))).collect()
    }
}

/// Identifies an entry of [`PendingSlots`]; increases with every insert.
pub type PendingKey = u64;

/// Bounded set of pending (not yet authenticated) streams in arrival order. When it is full,
/// a newcomer takes the slot of the oldest entry, which the caller then closes: a flood of idle
/// strangers can never lock out a client that sends its first message at once.
#[derive(Debug)]
pub struct PendingSlots<V> {
    cap: usize,
    next: PendingKey,
    entries: BTreeMap<PendingKey, (V, Instant)>,
}

impl<V> PendingSlots<V> {
    /// A set of at most `cap` entries (at least one).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            next: 0,
            entries: BTreeMap::new(),
        }
    }

    /// Adds `v` (arrived at `now`); returns its key and the evicted oldest entry, if the set
    /// was full.
    pub fn insert(&mut self, v: V, now: Instant) -> (PendingKey, Option<V>) {
        let evicted = if self.entries.len() >= self.cap {
            self.entries.pop_first().map(|(_, (v, _))| v)
        } else {
            None
        };
        let key = self.next;
        self.next += 1;
        self.entries.insert(key, (v, now));
        (key, evicted)
    }

    /// Removes the entry `key` (it authenticated, or ended); None if it was evicted already.
    pub fn remove(&mut self, key: PendingKey) -> Option<V> {
        self.entries.remove(&key).map(|(v, _)| v)
    }

    /// Whether `key` still holds a slot.
    pub fn contains(&self, key: PendingKey) -> bool {
        self.entries.contains_key(&key)
    }

    /// Removes and returns the entries that arrived `timeout` or longer before `now`.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<V> {
        let mut out = Vec::new();
        while let Some(entry) = self.entries.first_entry() {
            if now.saturating_duration_since(entry.get().1) < timeout {
                break;
            }
            out.push(entry.remove().0);
        }
        out
    }

    /// When the oldest entry's `timeout` ends.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.entries
            .first_key_value()
            .map(|(_, (_, t))| *t + timeout)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` per second.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// A bucket that allows `rate` per second with a burst of one second's worth.
    pub fn per_second(rate: u32) -> Self {
        Self::new(rate, rate)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        if self.last.is_none_or(|l| now > l) {
            self.last = Some(now);
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token will be there (now, if one is).
    pub fn next_token(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 || self.rate <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

/// Replay protection of authenticated preambles of one peer: the highest counter seen per
/// client instance. An instance's counter must increase with every stream. Bounded: when full,
/// the instance with the oldest (lowest) counter is forgotten.
#[derive(Debug, Clone)]
pub struct InstanceCounters {
    cap: usize,
    last: HashMap<u64, u64>,
}

impl InstanceCounters {
    /// Remembers at most `cap` instances (at least one).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            last: HashMap::new(),
        }
    }

    /// Whether `counter` is new for `instance` (then it is remembered).
    pub fn check(&mut self, instance: u64, counter: u64) -> bool {
        if let Some(last) = self.last.get_mut(&instance) {
            if counter <= *last {
                return false;
            }
            *last = counter;
            return true;
        }
        if self.last.len() >= self.cap {
            if let Some(oldest) = self.last.iter().min_by_key(|(_, c)| **c).map(|(i, _)| *i) {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(instance, counter);
        true
    }

    /// Instances remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether no instance is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Most distinct reasons a [`LogGate`] tracks (reasons are static names; this is a backstop).
const MAX_LOG_REASONS: usize = 128;

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

/// Log lines per second per reason: the first `per_second` lines of each one-second window
/// pass; the rest are suppressed and their number is reported with the next line that passes.
#[derive(Debug)]
pub struct LogGate {
    per_second: u32,
    windows: HashMap<&'static str, Window>,
}

/// What [`LogGate::allow`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogVerdict {
    /// Log the line; `suppressed` lines of this reason were dropped since the last one logged.
    Log {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop the line.
    Suppress,
}

impl LogGate {
    /// At most `per_second` lines per reason and second (at least one).
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: per_second.max(1),
            windows: HashMap::new(),
        }
    }

    /// Whether a line of `reason` may be logged at `now`.
    pub fn allow(&mut self, reason: &'static str, now: Instant) -> LogVerdict {
        if !self.windows.contains_key(reason) && self.windows.len() >= MAX_LOG_REASONS {
            return LogVerdict::Suppress;
        }
        let w = self.windows.entry(reason).or_insert(Window {
            start: now,
            lines: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.lines = 0;
        }
        if w.lines < self.per_second {
            w.lines += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            LogVerdict::Log { suppressed }
        } else {
            w.suppressed += 1;
            LogVerdict::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_slots_evict_the_oldest() {
        let t0 = Instant::now();
        let mut p = PendingSlots::new(2);
        let (a, e) = p.insert("a", t0);
        assert!(e.is_none());
        let (b, _) = p.insert("b", t0 + Duration::from_millis(1));
        let (c, e) = p.insert("c", t0 + Duration::from_millis(2));
        assert_eq!(e, Some("a"));
        assert!(!p.contains(a) && p.contains(b) && p.contains(c));
        assert_eq!(p.remove(a), None);
        assert_eq!(p.remove(b), Some("b"));
        let (_, e) = p.insert("d", t0 + Duration::from_millis(3));
        assert!(e.is_none(), "a slot was free");
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.next_deadline(Duration::from_secs(1)),
            Some(t0 + Duration::from_millis(1002))
        );
        let gone = p.expire(t0 + Duration::from_millis(1002), Duration::from_secs(1));
        assert_eq!(gone, vec!["c"]);
        assert_eq!(p.len(), 1);
        assert_eq!(PendingSlots::<()>::new(0).capacity(), 1);
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert_eq!(b.next_token(t0), t0 + Duration::from_millis(100));
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        // Never more than the burst, however long it was idle.
        let later = t0 + Duration::from_secs(100);
        assert!(b.try_take(later) && b.try_take(later) && !b.try_take(later));
        // A clock that goes backwards neither panics nor mints tokens.
        assert!(!b.try_take(t0));
        let mut zero = TokenBucket::new(0, 1);
        assert!(zero.try_take(t0) && !zero.try_take(later));
    }

    #[test]
    fn instance_counters_refuse_replays_and_stay_bounded() {
        let mut c = InstanceCounters::new(2);
        assert!(c.check(1, 10));
        assert!(!c.check(1, 10), "replay");
        assert!(!c.check(1, 9), "older");
        assert!(c.check(1, 11));
        assert!(c.check(2, 5));
        assert!(c.check(3, 7), "evicts instance 2 (lowest counter)");
        assert_eq!(c.len(), 2);
        assert!(!c.check(3, 7));
        assert!(!c.check(1, 11));
    }

    #[test]
    fn log_gate_passes_a_few_lines_per_second_and_reports_the_rest() {
        let t0 = Instant::now();
        let mut g = LogGate::new(2);
        assert_eq!(g.allow("x", t0), LogVerdict::Log { suppressed: 0 });
        assert_eq!(g.allow("x", t0), LogVerdict::Log { suppressed: 0 });
        assert_eq!(g.allow("x", t0), LogVerdict::Suppress);
        assert_eq!(g.allow("x", t0), LogVerdict::Suppress);
        assert_eq!(g.allow("y", t0), LogVerdict::Log { suppressed: 0 });
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(g.allow("x", t1), LogVerdict::Log { suppressed: 2 });
        assert_eq!(g.allow("x", t1), LogVerdict::Log { suppressed: 0 });
    }

    #[test]
    fn limit_counters_count_by_kind() {
        let c = LimitCounters::default();
        c.hit(LimitKind::Flows);
        c.add(LimitKind::Flows, 2);
        assert_eq!(c.get(LimitKind::Flows), 3);
        assert_eq!(c.get(LimitKind::LogLines), 0);
        let names: Vec<_> = c.snapshot().iter().map(|(k, _)| k.name()).collect();
        assert_eq!(names.len(), LimitKind::ALL.len());
        for (i, k) in LimitKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
