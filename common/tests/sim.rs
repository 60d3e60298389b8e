//! Deterministic simulation of the real [`Node`] on both sides: two seed server replicas and
//! two shoot clients (each client dials both replicas), in memory, with virtual time advanced
//! by `poll_timeout()`. Streams are pairs of byte queues; the seed side parses the preamble and
//! the first frame the way the seed binary's IO does and hands them to `accept_stream`.
//!
//! boringtun reads a mock clock with the `sim` feature, so run this with its own invocation:
//! `cargo test -p common --features sim --test sim`. The mock clock of `mock_instant` 0.3 is
//! thread-local (its `sync` feature is off), so tests running in parallel do not disturb each
//! other; each test advances the mock clock and its virtual `now` together and only relies on
//! time relative to its own start.
#![cfg(feature = "sim")]
// Test harness: a failed step must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read clocks

use std::collections::HashMap;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::BytesMut;
use common::cidr::parse_list;
use common::flow::TunnelId;
use common::frame::FrameDecoder;
use common::hub::{Hub, PeerConfig};
use common::limits::{LimitKind, Limits, PendingKey};
use common::node::{
    CloseReason, FrameDrop, Node, NodeConfig, PacketBatch, PacketDrop, Refusal, StreamId,
    BACKOFF_MAX, DIALS_PER_SECOND, FAST_REDIAL_MAX, FAST_REDIAL_MIN, FAST_REDIAL_WINDOW,
};
use common::preamble::{parse_preamble, Preamble, PreambleKey, PREAMBLE_V1};
use common::session::SessionConfig;
use mock_instant::MockClock;
use rand::rngs::OsRng;

const SEEDS: usize = 2;
/// The seed-side endpoint of the simulated connections (kube-apiserver).
const SEED_IP: [u8; 4] = [100, 64, 0, 10];
const FIRST_MESSAGE_MAX: usize = 2048;

fn key() -> StaticSecret {
    StaticSecret::random_from_rng(OsRng)
}

/// An IPv4 UDP packet `src:sport → dst:dport` carrying `seq`.
fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, seq: u32) -> Vec<u8> {
    let payload = seq.to_be_bytes();
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(&payload);
    p
}

/// A packet from the seed to shoot pod `pod` on flow `port`.
fn to_shoot(pod: u8, port: u16, seq: u32) -> Vec<u8> {
    udp(SEED_IP, port, [10, 0, 1, pod], 53, seq)
}

/// The shoot's reply on that flow.
fn from_shoot(pod: u8, port: u16, seq: u32) -> Vec<u8> {
    udp([10, 0, 1, pod], 53, SEED_IP, port, seq)
}

fn seq_of(p: &[u8]) -> u32 {
    u32::from_be_bytes(p[28..32].try_into().unwrap())
}

fn port_of(p: &[u8], dst: bool) -> u16 {
    let o = if dst { 22 } else { 20 };
    u16::from_be_bytes([p[o], p[o + 1]])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeedEnd {
    Pending(PendingKey),
    Attached(StreamId),
    Closed,
}

/// One TCP stream through the ingress: client → seed replica.
struct Pipe {
    /// The client that dialled it (None: a stranger's raw stream).
    client: Option<usize>,
    seed: usize,
    c2s: BytesMut,
    s2c: BytesMut,
    seed_end: SeedEnd,
    client_end: Option<StreamId>,
    /// The side closed its end (the other side sees end of stream after what is buffered).
    closed_by_seed: bool,
    closed_by_client: bool,
    /// Bytes vanish in this direction (a black-holed connection).
    blackhole_c2s: bool,
    blackhole_s2c: bool,
    /// Bytes the seed may have queued towards the client before frames are refused.
    s2c_cap: usize,
    /// The client does not read (its socket buffer fills up).
    client_stalled: bool,
}

impl Pipe {
    /// A new stream from `client` (None: a stranger) to `seed` carrying `c2s`, pending there.
    fn new(client: Option<usize>, seed: usize, c2s: BytesMut, key: PendingKey) -> Self {
        Self {
            client,
            seed,
            c2s,
            s2c: BytesMut::new(),
            seed_end: SeedEnd::Pending(key),
            client_end: None,
            closed_by_seed: false,
            closed_by_client: false,
            blackhole_c2s: false,
            blackhole_s2c: false,
            s2c_cap: usize::MAX,
            client_stalled: false,
        }
    }
}

struct SeedHost {
    node: Node<usize, usize>,
    up: bool,
    received: Vec<Vec<u8>>,
    /// Refusals of `accept_stream`, with detail.
    refused: Vec<(Refusal, String)>,
    /// Streams the seed closed, with why.
    closed: Vec<(usize, CloseReason)>,
}

struct ClientHost {
    node: Node<usize>,
    key: StaticSecret,
    up: bool,
    received: Vec<Vec<u8>>,
    preamble: Option<PreambleKey>,
    instance: u64,
    counter: u64,
    closed: Vec<(usize, CloseReason)>,
    /// Every dial: tunnel and time.
    dials: Vec<(usize, Instant)>,
}

struct World {
    base: Instant,
    elapsed: Duration,
    session: SessionConfig,
    limits: Limits,
    server_key: StaticSecret,
    allowed: Vec<PublicKey>,
    seeds: Vec<SeedHost>,
    clients: Vec<ClientHost>,
    pipes: Vec<Pipe>,
    /// The ingress refuses every dial.
    ingress_down: bool,
}

fn node_config(session: SessionConfig, limits: &Limits) -> NodeConfig {
    NodeConfig {
        session,
        limits: limits.clone(),
        shoot_networks: parse_list("10.0.0.0/8").unwrap(),
        tunnel_sources: parse_list("10.0.0.0/8,192.168.123.0/24").unwrap(),
    }
}

impl World {
    /// Two seed replicas allowing the first `allowed` of `clients` keys; all clients dial.
    fn new(clients: usize, allowed: usize) -> Self {
        Self::with(clients, allowed, Limits::default())
    }

    fn with(clients: usize, allowed: usize, limits: Limits) -> Self {
        let base = Instant::now();
        let server_key = key();
        let keys: Vec<StaticSecret> = (0..clients).map(|_| key()).collect();
        let allowed: Vec<PublicKey> = keys.iter().take(allowed).map(PublicKey::from).collect();
        let session = SessionConfig::default();
        let mut w = Self {
            base,
            elapsed: Duration::ZERO,
            session,
            limits,
            server_key,
            allowed,
            seeds: Vec::new(),
            clients: Vec::new(),
            pipes: Vec::new(),
            ingress_down: false,
        };
        // Start from a non-zero mock time like a real clock would.
        w.advance_clock(Duration::from_secs(1));
        for _ in 0..SEEDS {
            let s = w.new_seed();
            w.seeds.push(s);
        }
        for k in keys {
            let c = w.new_client(k, true);
            w.clients.push(c);
        }
        w
    }

    fn new_seed(&self) -> SeedHost {
        let peers = self
            .allowed
            .iter()
            .map(|p| PeerConfig {
                public: *p,
                psk: None,
            })
            .collect();
        let hub = Hub::new(self.server_key.clone(), peers).unwrap();
        let names = (0..self.allowed.len())
            .map(|i| format!("client-{i}"))
            .collect();
        let cfg = node_config(self.session, &self.limits);
        SeedHost {
            node: Node::seed(hub, names, cfg, Default::default(), self.now()).unwrap(),
            up: true,
            received: Vec::new(),
            refused: Vec::new(),
            closed: Vec::new(),
        }
    }

    fn new_client(&self, key: StaticSecret, v2: bool) -> ClientHost {
        let server = PublicKey::from(&self.server_key);
        let names = (0..SEEDS).map(|i| format!("seed-{i}")).collect();
        let cfg = node_config(self.session, &self.limits);
        ClientHost {
            node: Node::shoot(key.clone(), server, None, names, cfg, 7, self.now()),
            preamble: v2.then(|| PreambleKey::for_client(&key, &server).unwrap()),
            key,
            up: true,
            received: Vec::new(),
            instance: rand::random::<u64>() | 1,
            counter: 1,
            closed: Vec::new(),
            dials: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    fn advance_clock(&mut self, d: Duration) {
        self.elapsed += d;
        MockClock::advance(d);
    }

    /// Runs the world for `d` of virtual time: bytes move instantly, time jumps from one
    /// deadline (`poll_timeout`) to the next.
    fn run(&mut self, d: Duration) {
        let end = self.now() + d;
        loop {
            self.settle();
            let mut next = end;
            for s in self.seeds.iter().filter(|s| s.up) {
                next = next.min(s.node.poll_timeout());
            }
            for c in self.clients.iter().filter(|c| c.up) {
                next = next.min(c.node.poll_timeout());
            }
            let now = self.now();
            if next > now {
                self.advance_clock(next - now);
            }
            let now = self.now();
            for s in self.seeds.iter_mut().filter(|s| s.up) {
                if s.node.poll_timeout() <= now {
                    s.node.handle_timeout(now);
                }
            }
            for c in self.clients.iter_mut().filter(|c| c.up) {
                if c.node.poll_timeout() <= now {
                    c.node.handle_timeout(now);
                }
            }
            if now >= end {
                self.settle();
                return;
            }
        }
    }

    /// Moves bytes and executes the nodes' outputs until nothing changes.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            moved |= self.outputs();
            for i in 0..self.pipes.len() {
                moved |= self.seed_side(i);
                moved |= self.client_side(i);
            }
            if !moved {
                return;
            }
        }
        panic!("simulation does not settle");
    }

    /// Transmits, closes, evictions, dials of every node.
    fn outputs(&mut self) -> bool {
        let mut moved = false;
        let now = self.now();
        let Self {
            seeds,
            clients,
            pipes,
            ingress_down,
            ..
        } = self;
        for s in seeds.iter_mut() {
            if !s.up {
                continue;
            }
            s.node.flush_transmits(|&p, frames| {
                moved = true;
                let pipe = &mut pipes[p];
                if pipe.blackhole_s2c {
                    return true;
                }
                if pipe.s2c.len() + frames.len() > pipe.s2c_cap {
                    return false;
                }
                pipe.s2c.extend_from_slice(&frames);
                true
            });
            while let Some(c) = s.node.poll_close() {
                moved = true;
                // A black hole swallows the FIN too.
                pipes[c.handle].closed_by_seed |= !pipes[c.handle].blackhole_s2c;
                pipes[c.handle].seed_end = SeedEnd::Closed;
                s.closed.push((c.handle, c.reason));
            }
            while let Some((p, _)) = s.node.poll_evicted() {
                moved = true;
                pipes[p].closed_by_seed = true;
                pipes[p].seed_end = SeedEnd::Closed;
            }
        }
        for (ci, c) in clients.iter_mut().enumerate() {
            if !c.up {
                continue;
            }
            c.node.flush_transmits(|&p, frames| {
                moved = true;
                if !pipes[p].blackhole_c2s {
                    pipes[p].c2s.extend_from_slice(&frames);
                }
                true
            });
            while let Some(cl) = c.node.poll_close() {
                moved = true;
                pipes[cl.handle].closed_by_client |= !pipes[cl.handle].blackhole_c2s;
                pipes[cl.handle].client_end = None;
                c.closed.push((cl.handle, cl.reason));
            }
            while let Some(t) = c.node.poll_dial() {
                moved = true;
                let seed = t.index();
                let first = c.node.start_stream(t, now).unwrap();
                c.dials.push((seed, now));
                if *ingress_down || !seeds.get(seed).is_some_and(|s| s.up) {
                    c.node.dial_failed(t, now);
                    continue;
                }
                let mut c2s = BytesMut::new();
                match &c.preamble {
                    Some(k) => {
                        c2s.extend_from_slice(&k.preamble(c.instance, c.counter));
                        c.counter += 1;
                    }
                    None => c2s.extend_from_slice(&PREAMBLE_V1),
                }
                c2s.extend_from_slice(&first);
                let idx = pipes.len();
                let key = seeds[seed].node.stream_arrived(idx, now);
                let id = c.node.stream_opened(t, idx, now).unwrap();
                pipes.push(Pipe {
                    client_end: Some(id),
                    ..Pipe::new(Some(ci), seed, c2s, key)
                });
            }
        }
        moved
    }

    /// The seed replica's end of pipe `i`: the opening, then frames.
    fn seed_side(&mut self, i: usize) -> bool {
        let now = self.now();
        let pipe = &mut self.pipes[i];
        let seed = &mut self.seeds[pipe.seed];
        if !seed.up {
            return false;
        }
        match pipe.seed_end {
            SeedEnd::Closed => false,
            SeedEnd::Pending(key) => {
                if pipe.closed_by_client {
                    seed.node.stream_refused(key, Some(Refusal::Opening));
                    pipe.seed_end = SeedEnd::Closed;
                    return true;
                }
                let (preamble, first, rest) = match parse_opening(&pipe.c2s) {
                    Ok(Some(o)) => o,
                    Ok(None) => return false,
                    Err(()) => {
                        seed.node.stream_refused(key, Some(Refusal::Opening));
                        pipe.seed_end = SeedEnd::Closed;
                        pipe.closed_by_seed = true;
                        return true;
                    }
                };
                pipe.c2s = rest;
                let mut batch = PacketBatch::new(64);
                match seed
                    .node
                    .accept_stream(key, &preamble, &first, i, now, &mut batch)
                {
                    Ok(id) => pipe.seed_end = SeedEnd::Attached(id),
                    Err(r) => {
                        seed.refused.push((r.reason, r.detail));
                        pipe.seed_end = SeedEnd::Closed;
                        pipe.closed_by_seed = true;
                    }
                }
                seed.received.extend(batch.packets);
                true
            }
            SeedEnd::Attached(id) => {
                let mut moved = feed(&mut seed.node, id, &mut pipe.c2s, now, &mut seed.received);
                if pipe.closed_by_client && pipe.c2s.is_empty() {
                    seed.node.stream_closed(id, "end of stream", now);
                    pipe.seed_end = SeedEnd::Closed;
                    moved = true;
                }
                moved
            }
        }
    }

    /// The client's end of pipe `i`.
    fn client_side(&mut self, i: usize) -> bool {
        let now = self.now();
        let pipe = &mut self.pipes[i];
        let (Some(ci), Some(id)) = (pipe.client, pipe.client_end) else {
            return false;
        };
        let client = &mut self.clients[ci];
        if !client.up || pipe.client_stalled {
            return false;
        }
        let mut moved = feed(
            &mut client.node,
            id,
            &mut pipe.s2c,
            now,
            &mut client.received,
        );
        if pipe.closed_by_seed && pipe.s2c.is_empty() && pipe.client_end.is_some() {
            client.node.stream_closed(id, "end of stream", now);
            pipe.client_end = None;
            moved = true;
        }
        moved
    }

    /// A seed-side process sends `packets` into its TUN.
    fn seed_sends(&mut self, seed: usize, packets: &[Vec<u8>]) {
        let now = self.now();
        self.seeds[seed]
            .node
            .handle_tun_packets(packets.iter().map(|p| p.as_slice()), now);
        self.settle();
    }

    fn client_sends(&mut self, c: usize, packets: &[Vec<u8>]) {
        let now = self.now();
        self.clients[c]
            .node
            .handle_tun_packets(packets.iter().map(|p| p.as_slice()), now);
        self.settle();
    }

    /// The current pipe of client `c`'s tunnel to `seed`.
    fn pipe_of(&self, c: usize, seed: usize) -> Option<usize> {
        let id = self.clients[c].node.stream_of(TunnelId(seed as u32))?;
        self.pipes
            .iter()
            .position(|p| p.client_end == Some(id) && p.client == Some(c))
    }

    /// Black-holes both directions of client `c`'s current stream to `seed`.
    fn blackhole(&mut self, c: usize, seed: usize) {
        let p = self.pipe_of(c, seed).unwrap();
        self.pipes[p].blackhole_c2s = true;
        self.pipes[p].blackhole_s2c = true;
    }

    fn seed_live(&self, seed: usize) -> Vec<u32> {
        self.seeds[seed].node.live().iter().map(|t| t.0).collect()
    }

    fn all_live(&self) -> bool {
        self.seeds
            .iter()
            .all(|s| s.node.live().len() == self.allowed.len())
            && self
                .clients
                .iter()
                .take(self.allowed.len())
                .all(|c| c.node.live().len() == SEEDS)
    }

    fn handshakes(&self, c: usize, seed: usize) -> u64 {
        self.clients[c]
            .node
            .session(TunnelId(seed as u32))
            .unwrap()
            .stats()
            .handshakes_completed
    }

    /// Client `c` process restarts: new node, same key, fresh instance.
    fn restart_client(&mut self, c: usize) {
        for p in self.pipes.iter_mut().filter(|p| p.client == Some(c)) {
            p.closed_by_client = true;
            p.client_end = None;
        }
        let k = self.clients[c].key.clone();
        self.clients[c] = self.new_client(k, true);
    }

    /// Seed replica `s` crashes (its streams close) and, when `back`, restarts empty.
    fn crash_seed(&mut self, s: usize) {
        self.seeds[s].up = false;
        for p in self.pipes.iter_mut().filter(|p| p.seed == s) {
            p.closed_by_seed = true;
            p.seed_end = SeedEnd::Closed;
        }
    }

    fn restart_seed(&mut self, s: usize) {
        self.seeds[s] = self.new_seed();
    }
}

/// The preamble and first frame at the front of `c2s` (as the seed's listener reads them),
/// and what follows; `None` while incomplete.
fn parse_opening(c2s: &[u8]) -> Result<Option<(Preamble, BytesMut, BytesMut)>, ()> {
    let Some((preamble, len)) = parse_preamble(c2s).map_err(drop)? else {
        return Ok(None);
    };
    let mut rest = BytesMut::from(c2s.get(len..).unwrap_or_default());
    let decoded = FrameDecoder::new(FIRST_MESSAGE_MAX).decode(&mut rest);
    Ok(decoded.map_err(drop)?.map(|first| (preamble, first, rest)))
}

/// Hands what `buf` holds to `node` as data of `stream`; returns whether anything changed.
fn feed<S, P>(
    node: &mut Node<S, P>,
    stream: StreamId,
    buf: &mut BytesMut,
    now: Instant,
    received: &mut Vec<Vec<u8>>,
) -> bool {
    let mut moved = false;
    while !buf.is_empty() {
        let before = buf.len();
        let mut batch = PacketBatch::new(64);
        let res = node.handle_stream_data(stream, buf, now, &mut batch);
        moved |= buf.len() != before;
        received.extend(batch.packets);
        match res {
            Ok(true) => continue,
            Ok(false) => break,
            Err(_) => {
                // The node detached the stream: what is left is never read.
                buf.clear();
                return true;
            }
        }
    }
    moved
}

/// Sends `n` new flows from seed `s` to the shoot; returns the ports used.
fn new_flows(w: &mut World, s: usize, first_port: u16, n: u16) -> Vec<u16> {
    let ports: Vec<u16> = (first_port..first_port + n).collect();
    let pkts: Vec<Vec<u8>> = ports
        .iter()
        .map(|&p| to_shoot(1, p, u32::from(p)))
        .collect();
    w.seed_sends(s, &pkts);
    ports
}

/// Which client received seed packets on each port (by the packets' destination port).
fn receivers(w: &World) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for (ci, c) in w.clients.iter().enumerate() {
        for p in &c.received {
            m.insert(port_of(p, false), ci);
        }
    }
    m
}

#[test]
fn two_by_two_handshake_without_waiting() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    assert!(w.all_live(), "every tunnel up within one settle");
    for c in 0..2 {
        for s in 0..SEEDS {
            assert_eq!(w.handshakes(c, s), 1);
        }
    }
    assert_eq!(w.seed_live(0), vec![0, 1]);
}

#[test]
fn data_both_ways_through_each_tunnel() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    for s in 0..SEEDS {
        let ports = new_flows(&mut w, s, 1000 * (s as u16 + 1), 40);
        let got = receivers(&w);
        for p in &ports {
            assert!(got.contains_key(p), "flow {p} from seed {s} arrived");
        }
    }
    // Each client answers the flows it received: the replies reach the seed that sent them.
    for c in 0..2 {
        let replies: Vec<Vec<u8>> = w.clients[c]
            .received
            .iter()
            .map(|p| from_shoot(1, port_of(p, false), seq_of(p)))
            .collect();
        w.client_sends(c, &replies);
    }
    let back: usize = w.seeds.iter().map(|s| s.received.len()).sum();
    assert_eq!(
        back, 80,
        "every reply admitted by the seed that pinned its flow"
    );
}

#[test]
fn flows_pin_by_hash_and_stay_pinned() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    new_flows(&mut w, 0, 2000, 200);
    let first = receivers(&w);
    let a = first.values().filter(|c| **c == 0).count();
    assert!(
        (60..=140).contains(&a),
        "200 flows split roughly evenly: {a} to client 0"
    );
    // The same flows again: each goes where it went before.
    for c in &mut w.clients {
        c.received.clear();
    }
    new_flows(&mut w, 0, 2000, 200);
    assert_eq!(receivers(&w), first);
}

#[test]
fn replies_only_from_the_pinned_tunnel_and_no_flow_from_the_shoot() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    new_flows(&mut w, 0, 3000, 50);
    let got = receivers(&w);
    // Client 1 answers a flow pinned to client 0: its tunnel is the wrong one.
    let (&port, _) = got.iter().find(|(_, c)| **c == 0).unwrap();
    w.client_sends(1, &[from_shoot(1, port, 1)]);
    let seed = &w.seeds[0];
    assert_eq!(seed.node.stats().packet_drops(PacketDrop::WrongTunnel), 1);
    assert!(seed.received.is_empty());
    // The shoot opens a flow of its own towards the seed: never admitted.
    w.client_sends(0, &[udp([10, 0, 1, 9], 4000, SEED_IP, 22, 1)]);
    w.client_sends(0, &[udp([10, 0, 1, 9], 4000, [100, 64, 0, 99], 22, 1)]);
    let drops: u64 = w
        .seeds
        .iter()
        .map(|s| s.node.stats().packet_drops(PacketDrop::UnknownFlow))
        .sum();
    assert_eq!(drops, 2);
    // From outside the shoot and VPN networks: refused by source.
    w.client_sends(0, &[udp([172, 16, 0, 1], 53, SEED_IP, port, 1)]);
    let by_source: u64 = w
        .seeds
        .iter()
        .map(|s| s.node.stats().packet_drops(PacketDrop::SourceNotAllowed))
        .sum();
    assert_eq!(by_source, 1);
    assert!(w.seeds.iter().all(|s| s.received.is_empty()));
    // The seed sends nothing outside the shoot networks into a tunnel.
    w.seed_sends(0, &[udp(SEED_IP, 1, [8, 8, 8, 8], 53, 1)]);
    assert_eq!(
        w.seeds[0]
            .node
            .stats()
            .packet_drops(PacketDrop::NotShootNetwork),
        1
    );
}

#[test]
fn dead_client_detected_and_its_flows_repinned() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    new_flows(&mut w, 0, 4000, 60);
    let before = receivers(&w);
    let on_a: Vec<u16> = before
        .iter()
        .filter(|(_, c)| **c == 0)
        .map(|(p, _)| *p)
        .collect();
    assert!(!on_a.is_empty());
    // Client 0 freezes (a stopped VM): its stream to seed 0 goes silent both ways.
    w.blackhole(0, 0);
    w.clients[0].up = false;
    let start = w.elapsed;
    w.run(Duration::from_secs(14));
    assert_eq!(w.seed_live(0), vec![0, 1], "not dead before the timeout");
    w.run(Duration::from_secs(2));
    assert_eq!(w.seed_live(0), vec![1], "dead after 15 s of silence");
    let dead = &w.seeds[0].closed;
    assert!(
        dead.iter().any(|(_, r)| *r == CloseReason::DeadPeer),
        "{dead:?}"
    );
    assert!(w.elapsed - start <= Duration::from_secs(16));
    // Meanwhile the flows of client 0 are re-pinned to client 1.
    for c in &mut w.clients {
        c.received.clear();
    }
    let pkts: Vec<Vec<u8>> = on_a.iter().map(|&p| to_shoot(1, p, 9)).collect();
    w.seed_sends(0, &pkts);
    let after = receivers(&w);
    for p in &on_a {
        assert_eq!(after.get(p), Some(&1), "flow {p} re-pinned");
    }
    // Replies through the new tunnel are admitted.
    let replies: Vec<Vec<u8>> = w.clients[1]
        .received
        .iter()
        .map(|p| from_shoot(1, port_of(p, false), 1))
        .collect();
    let n = replies.len();
    w.client_sends(1, &replies);
    assert_eq!(w.seeds[0].received.len(), n);
    // The client thaws, finds its stream dead and redials: both tunnels of seed 0 up again.
    w.clients[0].up = true;
    w.run(Duration::from_secs(6));
    assert_eq!(w.seed_live(0), vec![0, 1]);
}

#[test]
fn dead_server_detected_by_the_client() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    w.blackhole(0, 1);
    w.run(Duration::from_secs(16));
    let closed = &w.clients[0].closed;
    assert!(
        closed.iter().any(|(_, r)| *r == CloseReason::DeadPeer),
        "{closed:?}"
    );
    // It redials with backoff and the tunnel comes back.
    w.run(Duration::from_secs(6));
    assert!(w.clients[0].node.is_live(TunnelId(1)));
    assert!(w.clients[0].node.reconnects(TunnelId(1)) >= 1);
}

#[test]
fn keepalives_keep_an_idle_tunnel_alive() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    w.run(Duration::from_secs(60));
    assert!(w.all_live(), "a minute idle: keepalives hold every tunnel");
    let ka = w.clients[0]
        .node
        .session(TunnelId(0))
        .unwrap()
        .stats()
        .keepalives_sent;
    assert!((10..=14).contains(&ka), "a keepalive about every 5 s: {ka}");
    assert_eq!(w.pipes.len(), 4, "no reconnect");
}

#[test]
fn rekey_past_120_s_keeps_data_flowing() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    for _ in 0..30 {
        w.run(Duration::from_secs(10));
        new_flows(&mut w, 0, 5000, 4);
    }
    for c in 0..2 {
        for s in 0..SEEDS {
            let h = w.handshakes(c, s);
            assert!(
                (3..=4).contains(&h),
                "300 s: initial + rekeys every 120 s: {h}"
            );
        }
    }
    assert!(w.all_live());
    assert_eq!(w.pipes.len(), 4, "rekeys need no new stream");
    let got: usize = w.clients.iter().map(|c| c.received.len()).sum();
    assert_eq!(got, 30 * 4);
}

#[test]
fn reconnect_resumes_the_session_without_a_handshake() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    // The ingress drops client 0's connection to seed 0: both ends see it end.
    let p = w.pipe_of(0, 0).unwrap();
    w.pipes[p].closed_by_client = true;
    w.pipes[p].closed_by_seed = true;
    w.run(Duration::from_secs(1));
    assert!(
        w.clients[0].node.is_live(TunnelId(0)),
        "redialled within the backoff"
    );
    assert_eq!(w.handshakes(0, 0), 1, "same keys on the new stream");
    new_flows(&mut w, 0, 6000, 20);
    assert_eq!(receivers(&w).len(), 20);
}

/// The ingress dies (every stream ends) and refuses dials for `outage`; returns how long after
/// it listens again every tunnel is live, and client 0's dials during the outage.
fn ingress_outage(outage: Duration) -> (Duration, Vec<(usize, Instant)>) {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    assert!(w.all_live());
    w.ingress_down = true;
    for p in &mut w.pipes {
        p.closed_by_client = true;
        p.closed_by_seed = true;
    }
    let down = w.now();
    w.run(outage);
    w.ingress_down = false;
    let back = w.now();
    while !w.all_live() {
        assert!(w.now() - back < Duration::from_secs(10), "never recovered");
        w.run(Duration::from_millis(1));
    }
    let dials = w.clients[0]
        .dials
        .iter()
        .copied()
        .filter(|&(_, at)| at >= down && at < back)
        .collect();
    (w.now() - back, dials)
}

#[test]
fn short_outages_are_redialled_fast_and_within_the_dial_budget() {
    for ms in [500, 1000, 2000, 3000, 4500] {
        let outage = Duration::from_millis(ms);
        let (recovered, dials) = ingress_outage(outage);
        // The next dial comes at most FAST_REDIAL_MAX after the ingress is back (plus the
        // simulation's 1 ms step); handshakes are not needed (the session resumes).
        assert!(
            recovered <= FAST_REDIAL_MAX + Duration::from_millis(5),
            "outage {outage:?}: all tunnels live {recovered:?} after the ingress was back"
        );
        for t in 0..SEEDS {
            let n = dials.iter().filter(|d| d.0 == t).count() as u64;
            let most = ms / FAST_REDIAL_MIN.as_millis() as u64 + 1;
            assert!(n <= most, "outage {outage:?}: {n} dials of tunnel {t}");
            assert!(
                n + 1 >= ms / FAST_REDIAL_MAX.as_millis() as u64,
                "{n} dials: not fast"
            );
        }
        assert!(dials.len() as u64 <= u64::from(DIALS_PER_SECOND) * (ms / 1000 + 1));
    }
}

#[test]
fn packets_sent_while_no_tunnel_is_live_go_out_when_one_is() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    w.ingress_down = true;
    for p in &mut w.pipes {
        p.closed_by_client = true;
        p.closed_by_seed = true;
    }
    w.run(Duration::from_millis(100));
    assert!(w.seed_live(0).is_empty());
    // A proxied connection's SYN and a retransmission while the tunnels reconnect.
    new_flows(&mut w, 0, 9000, 5);
    assert!(receivers(&w).is_empty(), "nothing can go out yet");
    w.ingress_down = false;
    w.run(Duration::from_secs(1));
    assert_eq!(
        receivers(&w).len(),
        5,
        "held packets went out with the first live tunnel"
    );
    // Held packets older than the tunnel wait are dropped, not sent.
    w.ingress_down = true;
    for p in &mut w.pipes {
        p.closed_by_client = true;
        p.closed_by_seed = true;
    }
    w.run(Duration::from_millis(100));
    new_flows(&mut w, 0, 9100, 5);
    w.run(w.limits.tunnel_wait + Duration::from_secs(1));
    w.ingress_down = false;
    w.run(Duration::from_secs(5));
    assert!(w.all_live());
    let late = receivers(&w).keys().filter(|&&p| p >= 9100).count();
    assert_eq!(late, 0, "stale held packets were sent");
}

#[test]
fn long_outages_back_off_to_the_cap() {
    let (_, dials) = ingress_outage(Duration::from_secs(60));
    let late = dials
        .iter()
        .filter(|&&(t, at)| t == 0 && at >= dials[0].1 + FAST_REDIAL_WINDOW + BACKOFF_MAX)
        .count();
    // Past the fast phase the waits grow to BACKOFF_MAX with full jitter (mean half of it):
    // far fewer than the fast phase's 4 to 10 per second.
    assert!(late < 40, "{late} dials of tunnel 0 in the last 50 s");
    assert!(late >= 5, "{late} dials: the tunnel was given up");
}

#[test]
fn newer_stream_replaces_the_older_one() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    // Client 0 loses its stream to seed 1 on its side only (the seed still holds it).
    let p = w.pipe_of(0, 1).unwrap();
    w.pipes[p].blackhole_s2c = true;
    w.pipes[p].blackhole_c2s = true;
    let id = w.pipes[p].client_end.unwrap();
    let now = w.now();
    w.clients[0].node.stream_closed(id, "reset", now);
    w.run(Duration::from_secs(1));
    let closed = &w.seeds[1].closed;
    assert!(
        closed.contains(&(p, CloseReason::Replaced)),
        "the seed closed the older stream: {closed:?}"
    );
    assert_eq!(w.seed_live(1), vec![0, 1]);
    new_flows(&mut w, 1, 7000, 20);
    assert_eq!(receivers(&w).len(), 20);
}

#[test]
fn restarted_client_handshakes_and_restarted_seed_is_redialled() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    w.restart_client(0);
    w.run(Duration::from_secs(1));
    assert!(w.all_live());
    assert_eq!(w.handshakes(0, 0), 1, "the new process handshakes anew");
    w.crash_seed(1);
    w.run(Duration::from_millis(100));
    assert!(!w.clients[0].node.is_live(TunnelId(1)));
    w.restart_seed(1);
    w.run(Duration::from_secs(8));
    assert!(w.all_live(), "the restarted replica is redialled");
    // Its session was lost: the resumed stream went unanswered and the client handshook.
    assert!(w.handshakes(1, 1) >= 2);
    new_flows(&mut w, 1, 8000, 20);
    assert_eq!(receivers(&w).len(), 20);
}

#[test]
fn unknown_key_refused_while_others_continue() {
    // Client 2's key is allowed nowhere.
    let mut w = World::new(3, 2);
    w.run(Duration::from_millis(10));
    assert!(w.all_live());
    for s in &w.seeds {
        assert!(
            s.refused.iter().any(|(r, _)| *r == Refusal::UnknownPeer),
            "{:?}",
            s.refused
        );
        assert!(s.node.stats().refusals(Refusal::UnknownPeer) >= 1);
    }
    assert!(w.clients[2].node.live().is_empty());
    w.run(Duration::from_secs(10));
    new_flows(&mut w, 0, 9000, 20);
    let got = receivers(&w);
    assert_eq!(got.len(), 20);
    assert!(got.values().all(|c| *c < 2));
}

#[test]
fn peers_added_and_removed_at_run_time() {
    let mut w = World::new(3, 2);
    w.run(Duration::from_millis(10));
    assert!(w.clients[2].node.live().is_empty());
    let key = |w: &World, c: usize| PeerConfig {
        public: PublicKey::from(&w.clients[c].key),
        psk: None,
    };
    // Client 2's key is added: its redial is accepted, no seed restarts.
    let all: Vec<(String, PeerConfig)> = (0..3)
        .map(|c| (format!("client-{c}"), key(&w, c)))
        .collect();
    let now = w.now();
    for s in &mut w.seeds {
        let (added, removed) = s.node.set_peers(&all, now).unwrap();
        assert_eq!((added, removed.len()), (vec!["client-2".to_owned()], 0));
    }
    w.run(Duration::from_secs(10));
    assert_eq!(w.seed_live(0), vec![0, 1, 2], "client 2 joined");
    assert_eq!(w.seed_live(1), vec![0, 1, 2]);
    assert_eq!(w.clients[2].node.live().len(), SEEDS);
    // Client 0's key is removed: its streams close, its flows go to the others.
    let now = w.now();
    for s in &mut w.seeds {
        let (_, removed) = s.node.set_peers(&all[1..], now).unwrap();
        assert_eq!(removed, vec!["client-0".to_owned()]);
    }
    w.run(Duration::from_secs(1));
    assert_eq!(w.seed_live(0), vec![1, 2]);
    assert!(w.seeds[0]
        .closed
        .iter()
        .any(|(_, r)| *r == CloseReason::PeerRemoved));
    w.run(Duration::from_secs(5));
    assert!(
        w.clients[0].node.live().is_empty(),
        "its redials are refused"
    );
    new_flows(&mut w, 0, 9500, 20);
    let got = receivers(&w);
    assert_eq!(got.len(), 20);
    assert!(got.values().all(|c| *c != 0));
}

#[test]
fn broken_frames_close_only_that_stream() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    // An empty frame (no WireGuard message is) on client 0's stream to seed 0.
    let p = w.pipe_of(0, 0).unwrap();
    w.pipes[p].c2s.extend_from_slice(&[0, 0]);
    w.pipes[p].c2s.extend_from_slice(&[0u8; 64]);
    w.settle();
    assert!(
        w.seeds[0].closed.contains(&(p, CloseReason::Failed)),
        "{p} {:?} {:?}",
        w.seeds[0].closed,
        w.pipes[p].seed_end
    );
    assert_eq!(w.seed_live(0), vec![1], "client 1 unaffected");
    w.run(Duration::from_secs(6));
    assert_eq!(w.seed_live(0), vec![0, 1], "client 0 redialled");
}

#[test]
fn a_full_send_queue_drops_frames_and_recovers() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    // Client 0 stops reading its stream from seed 0; the seed may queue 4 KiB towards it.
    let p = w.pipe_of(0, 0).unwrap();
    w.pipes[p].client_stalled = true;
    w.pipes[p].s2c_cap = 4096;
    new_flows(&mut w, 0, 10_000, 200);
    let s = w.seeds[0].node.stats();
    assert!(s.frame_drops(FrameDrop::QueueFull) > 0);
    assert!(w.seeds[0].node.limit_hits().get(LimitKind::FrameQueue) > 0);
    // It reads again: the stream carries on.
    w.pipes[p].client_stalled = false;
    w.settle();
    w.pipes[p].s2c_cap = usize::MAX;
    for c in &mut w.clients {
        c.received.clear();
    }
    new_flows(&mut w, 0, 10_000, 200);
    assert_eq!(receivers(&w).len(), 200);
    assert!(w.all_live());
}

#[test]
fn flood_of_unauthenticated_streams_is_bounded_and_clients_still_connect() {
    let mut w = World::new(2, 2);
    let now = w.now();
    // 1,000 strangers open streams and say nothing.
    for _ in 0..1000 {
        let idx = w.pipes.len();
        let key = w.seeds[0].node.stream_arrived(idx, now);
        w.pipes.push(Pipe::new(None, 0, BytesMut::new(), key));
    }
    let limit = w.limits.pending_streams;
    assert_eq!(w.seeds[0].node.pending_count(), limit);
    assert_eq!(
        w.seeds[0].node.stats().refusals(Refusal::Evicted),
        (1000 - limit) as u64
    );
    // The real clients dial during the flood: each evicts the oldest stranger and authenticates.
    w.run(Duration::from_millis(10));
    assert!(w.all_live());
    // The strangers left run into the pre-authentication timeout.
    w.run(Duration::from_millis(2100));
    assert_eq!(w.seeds[0].node.pending_count(), 0);
    let timeouts = w.seeds[0].node.stats().refusals(Refusal::PreauthTimeout);
    assert_eq!(timeouts, (limit - 2) as u64);
    assert_eq!(
        w.seeds[0].node.limit_hits().get(LimitKind::PreauthTimeout),
        timeouts
    );
}

#[test]
fn handshake_flood_spends_only_the_anonymous_budget() {
    let mut w = World::new(2, 2);
    w.run(Duration::from_millis(10));
    // 200 strangers (fewer than the pending slots) with valid handshake initiations for the server key (their own keys).
    let mut strangers: Vec<ClientHost> = (0..200).map(|_| w.new_client(key(), false)).collect();
    let now = w.now();
    for s in &mut strangers {
        s.node.handle_timeout(now);
        let t = s.node.poll_dial().unwrap();
        let first = s.node.start_stream(t, now).unwrap();
        let mut c2s = BytesMut::from(&PREAMBLE_V1[..]);
        c2s.extend_from_slice(&first);
        let idx = w.pipes.len();
        let key = w.seeds[0].node.stream_arrived(idx, now);
        w.pipes.push(Pipe::new(None, 0, c2s, key));
    }
    // Client 0 restarts in the middle of the flood (a version-2 preamble: its own budget).
    w.restart_client(0);
    w.settle();
    let st = w.seeds[0].node.stats();
    let budget = u64::from(w.limits.handshakes_per_second);
    assert_eq!(
        st.refusals(Refusal::UnknownPeer),
        budget,
        "key work only within the budget"
    );
    assert_eq!(st.refusals(Refusal::HandshakeBudget), 200 - budget);
    w.run(Duration::from_millis(10));
    assert!(w.all_live(), "the restarted client is back at once");
    // Replayed authenticated preamble: refused.
    let c = &w.clients[0];
    let k = c.preamble.as_ref().unwrap();
    let mut c2s = BytesMut::from(&k.preamble(c.instance, 1)[..]);
    let mut first = BytesMut::new();
    common::frame::encode_frame(&[4, 0, 0, 0, 0, 0, 0, 0], &mut first).unwrap();
    c2s.extend_from_slice(&first);
    let idx = w.pipes.len();
    let now = w.now();
    let key = w.seeds[0].node.stream_arrived(idx, now);
    w.pipes.push(Pipe::new(None, 0, c2s, key));
    w.settle();
    assert_eq!(w.seeds[0].node.stats().refusals(Refusal::Replay), 1);
    assert!(w.all_live());
}
