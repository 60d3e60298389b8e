//! Deterministic simulation: client sessions ⇄ server hub over in-memory streams with virtual
//! time (handshake, data, rekey, keepalive, dead peer, reconnect with session continuity,
//! several peers, rejected streams).
//!
//! boringtun reads a mock clock with the `sim` feature, so run this with its own invocation:
//! `cargo test -p common --features sim --test sim`. The mock clock of `mock_instant` 0.3 is
//! thread-local (its `sync` feature is off), so tests running in parallel do not disturb each
//! other and need no lock; each test advances the mock clock and its virtual `now` together and
//! only relies on time relative to its own start.
#![cfg(feature = "sim")]
// Test harness: a failed step must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests set up files and clocks

use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::BytesMut;
use common::frame::{check_preamble, FrameDecoder, PREAMBLE};
use common::hub::{Hub, PeerConfig};
use common::session::{Session, SessionConfig};
use mock_instant::MockClock;
use rand::rngs::OsRng;

const TICK: Duration = Duration::from_millis(250);
const BACKOFF: Duration = Duration::from_millis(100);
/// The server accepts frames up to this size in the simulation (so "oversize" is testable).
const SERVER_MAX_FRAME: usize = 4096;

/// One direction of a stream. `drop` turns it into a black hole (a stalled connection).
#[derive(Default)]
struct Pipe {
    buf: BytesMut,
    drop: bool,
}

impl Pipe {
    fn write(&mut self, bytes: &[u8]) {
        if !self.drop {
            self.buf.extend_from_slice(bytes);
        }
    }
}

#[derive(Default)]
struct Stream {
    c2s: Pipe,
    s2c: Pipe,
    open: bool,
}

struct Client {
    session: Session,
    stream: Option<usize>,
    rx_buf: BytesMut,
    received: Vec<Vec<u8>>,
    /// (virtual time, reason) of every stream this client closed or lost.
    closed: Vec<(Duration, String)>,
    reconnect_at: Option<Duration>,
    auto_reconnect: bool,
    streams_opened: usize,
}

struct ServerConn {
    stream: usize,
    rx_buf: BytesMut,
    preamble_ok: bool,
    peer: Option<usize>,
}

struct Server {
    hub: Hub,
    sessions: Vec<Option<Session>>,
    active: Vec<Option<usize>>,
    conns: Vec<ServerConn>,
    received: Vec<Vec<Vec<u8>>>,
    /// (virtual time, stream, reason) of every stream the server closed.
    closed: Vec<(Duration, usize, String)>,
    nonfatal: Vec<String>,
}

struct World {
    base: Instant,
    elapsed: Duration,
    cfg: SessionConfig,
    streams: Vec<Stream>,
    clients: Vec<Client>,
    server: Server,
    server_key: StaticSecret,
    client_pubs: Vec<PublicKey>,
}

fn key() -> StaticSecret {
    StaticSecret::random_from_rng(OsRng)
}

fn ipv4(src: u8, seq: u32) -> Vec<u8> {
    let payload = seq.to_be_bytes();
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, src]);
    p[16..20].copy_from_slice(&[10, 0, 1, 1]);
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(&payload);
    p
}

fn ipv6(seq: u32) -> Vec<u8> {
    let payload = seq.to_be_bytes();
    let mut p = vec![0u8; 40 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 59; // no next header
    p[7] = 64;
    p[8] = 0xfd;
    p[24] = 0xfd;
    p[39] = 1;
    p[40..].copy_from_slice(&payload);
    p
}

impl World {
    /// A server allowing `allowed` of the client keys; one client per key in `clients`.
    fn new(clients: Vec<StaticSecret>, allowed: &[usize]) -> Self {
        let server_key = key();
        let peers = allowed
            .iter()
            .map(|&i| PeerConfig {
                public: PublicKey::from(&clients[i]),
                psk: None,
            })
            .collect();
        let hub = Hub::new(server_key.clone(), peers).unwrap();
        let server_pub = *hub.public();
        let cfg = SessionConfig::default();
        let base = Instant::now();
        let client_pubs = clients.iter().map(PublicKey::from).collect();
        let clients = clients
            .into_iter()
            .enumerate()
            .map(|(i, k)| Client {
                session: Session::new(k, server_pub, None, 0x100 + i as u32, cfg, None, base),
                stream: None,
                rx_buf: BytesMut::new(),
                received: Vec::new(),
                closed: Vec::new(),
                reconnect_at: None,
                auto_reconnect: true,
                streams_opened: 0,
            })
            .collect();
        let mut w = Self {
            base,
            elapsed: Duration::ZERO,
            cfg,
            streams: Vec::new(),
            clients,
            server: Server::new(hub),
            server_key,
            client_pubs,
        };
        // Start from a non-zero mock time like a real clock would.
        w.advance(Duration::from_secs(1));
        w
    }

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        MockClock::advance(d);
    }

    /// Client `c` opens a new stream: preamble, then whatever the session sends first.
    fn connect(&mut self, c: usize) {
        let id = self.streams.len();
        let mut stream = Stream {
            open: true,
            ..Stream::default()
        };
        stream.c2s.write(&PREAMBLE);
        let now = self.now();
        let client = &mut self.clients[c];
        let mut out = BytesMut::new();
        client.session.stream_up(now, &mut out).unwrap();
        stream.c2s.write(&out);
        self.streams.push(stream);
        client.stream = Some(id);
        client.rx_buf.clear();
        client.reconnect_at = None;
        client.streams_opened += 1;
        self.server.conns.push(ServerConn {
            stream: id,
            rx_buf: BytesMut::new(),
            preamble_ok: false,
            peer: None,
        });
    }

    /// A raw stream (not tied to a client) carrying `bytes`.
    fn raw_stream(&mut self, bytes: &[u8]) -> usize {
        let id = self.streams.len();
        let mut stream = Stream {
            open: true,
            ..Stream::default()
        };
        stream.c2s.write(bytes);
        self.streams.push(stream);
        self.server.conns.push(ServerConn {
            stream: id,
            rx_buf: BytesMut::new(),
            preamble_ok: false,
            peer: None,
        });
        id
    }

    fn client_close(&mut self, c: usize, reason: String) {
        let elapsed = self.elapsed;
        let client = &mut self.clients[c];
        if let Some(id) = client.stream.take() {
            self.streams[id].open = false;
            client.session.stream_down();
            client.closed.push((elapsed, reason));
            if client.auto_reconnect {
                client.reconnect_at = Some(elapsed + BACKOFF);
            }
        }
    }

    /// Moves bytes until nothing is in flight.
    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            // Server side.
            let mut i = 0;
            while i < self.server.conns.len() {
                let id = self.server.conns[i].stream;
                if !self.streams[id].open {
                    let conn = self.server.conns.remove(i);
                    self.server.detach(&conn);
                    continue;
                }
                let data = self.streams[id].c2s.buf.split();
                if !data.is_empty() {
                    moved = true;
                    let now = self.now();
                    let elapsed = self.elapsed;
                    if let Err(reason) =
                        self.server
                            .receive(i, &data, now, elapsed, &mut self.streams)
                    {
                        self.streams[id].open = false;
                        let conn = self.server.conns.remove(i);
                        self.server.detach(&conn);
                        self.server.closed.push((elapsed, id, reason));
                        continue;
                    }
                }
                i += 1;
            }
            // Client side.
            for c in 0..self.clients.len() {
                let Some(id) = self.clients[c].stream else {
                    continue;
                };
                if !self.streams[id].open {
                    self.client_close(c, "closed by server".into());
                    moved = true;
                    continue;
                }
                let data = self.streams[id].s2c.buf.split();
                if data.is_empty() {
                    continue;
                }
                moved = true;
                let now = self.now();
                let client = &mut self.clients[c];
                client.rx_buf.extend_from_slice(&data);
                let mut out = BytesMut::new();
                let mut fatal = None;
                let decoder = FrameDecoder::default();
                loop {
                    match decoder.decode(&mut client.rx_buf) {
                        Ok(Some(msg)) => {
                            let received = &mut client.received;
                            if let Err(e) = client
                                .session
                                .decapsulate(&msg, now, &mut out, |p| received.push(p.to_vec()))
                            {
                                if e.is_fatal() {
                                    fatal = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            fatal = Some(e.to_string());
                            break;
                        }
                    }
                }
                self.streams[id].c2s.write(&out);
                if let Some(reason) = fatal {
                    self.client_close(c, reason);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("simulation does not settle");
    }

    /// Runs all timers once.
    fn tick(&mut self) {
        let now = self.now();
        for c in 0..self.clients.len() {
            let mut out = BytesMut::new();
            let res = self.clients[c].session.tick(now, &mut out);
            if let Some(id) = self.clients[c].stream {
                self.streams[id].c2s.write(&out);
            }
            if let Err(e) = res {
                if e.is_fatal() {
                    self.client_close(c, e.to_string());
                }
            }
            if let Some(at) = self.clients[c].reconnect_at {
                if at <= self.elapsed {
                    self.connect(c);
                }
            }
        }
        let elapsed = self.elapsed;
        self.server.tick(now, elapsed, &mut self.streams);
    }

    /// One timer period: advance time, run timers, deliver everything.
    fn step(&mut self) {
        self.advance(TICK);
        self.tick();
        self.pump();
    }

    fn run(&mut self, d: Duration) {
        let end = self.elapsed + d;
        while self.elapsed < end {
            self.step();
        }
    }

    fn client_send(&mut self, c: usize, packet: &[u8]) {
        let now = self.now();
        let mut out = BytesMut::new();
        self.clients[c]
            .session
            .encapsulate(packet, now, &mut out)
            .unwrap();
        if let Some(id) = self.clients[c].stream {
            self.streams[id].c2s.write(&out);
        }
    }

    fn server_send(&mut self, peer: usize, packet: &[u8]) {
        let now = self.now();
        let mut out = BytesMut::new();
        if let Some(s) = self.server.sessions[peer].as_mut() {
            s.encapsulate(packet, now, &mut out).unwrap();
        }
        if let Some(id) = self.server.active[peer] {
            self.streams[id].s2c.write(&out);
        }
    }

    /// Connects client `c` and completes the handshake without advancing time.
    fn establish(&mut self, c: usize) {
        self.connect(c);
        self.pump();
        assert!(self.clients[c].session.is_established());
    }

    /// Sends `n` packets each way between client `c` (server peer `peer`) and checks delivery.
    fn exchange(&mut self, c: usize, peer: usize, n: u32) {
        let (before_c, before_s) = (
            self.clients[c].received.len(),
            self.server.received[peer].len(),
        );
        let mut up = Vec::new();
        let mut down = Vec::new();
        for i in 0..n {
            let p = ipv4(c as u8 + 1, i);
            self.client_send(c, &p);
            up.push(p);
            let q = if i % 2 == 0 { ipv4(200, i) } else { ipv6(i) };
            self.server_send(peer, &q);
            down.push(q);
        }
        self.pump();
        assert_eq!(self.server.received[peer][before_s..], up[..]);
        assert_eq!(self.clients[c].received[before_c..], down[..]);
    }
}

impl Server {
    fn new(hub: Hub) -> Self {
        let n = hub.len();
        Self {
            hub,
            sessions: (0..n).map(|_| None).collect(),
            active: vec![None; n],
            conns: Vec::new(),
            received: vec![Vec::new(); n],
            closed: Vec::new(),
            nonfatal: Vec::new(),
        }
    }

    /// Forgets a stream that is gone.
    fn detach(&mut self, conn: &ServerConn) {
        if let Some(peer) = conn.peer {
            if self.active[peer] == Some(conn.stream) {
                self.active[peer] = None;
                if let Some(s) = self.sessions[peer].as_mut() {
                    s.stream_down();
                }
            }
        }
    }

    /// Handles bytes of connection `i`; an error closes that stream only.
    fn receive(
        &mut self,
        i: usize,
        data: &[u8],
        now: Instant,
        elapsed: Duration,
        streams: &mut [Stream],
    ) -> Result<(), String> {
        let decoder = FrameDecoder::new(SERVER_MAX_FRAME);
        let id = self.conns[i].stream;
        self.conns[i].rx_buf.extend_from_slice(data);
        if !self.conns[i].preamble_ok {
            if self.conns[i].rx_buf.len() < PREAMBLE.len() {
                return Ok(());
            }
            let head = self.conns[i].rx_buf.split_to(PREAMBLE.len());
            let mut pre = [0u8; 8];
            pre.copy_from_slice(&head);
            check_preamble(&pre).map_err(|e| e.to_string())?;
            self.conns[i].preamble_ok = true;
        }
        loop {
            let msg = match decoder.decode(&mut self.conns[i].rx_buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let mut out = BytesMut::new();
            match self.conns[i].peer {
                None => {
                    let peer = self.hub.identify(&msg).map_err(|e| e.to_string())?;
                    if self.sessions[peer].is_none() {
                        self.sessions[peer] = Some(
                            self.hub
                                .new_session(peer, SessionConfig::default(), now)
                                .unwrap(),
                        );
                    }
                    let Some(session) = self.sessions[peer].as_mut() else {
                        unreachable!()
                    };
                    let received = &mut self.received[peer];
                    // Only an authentic first message binds the stream to the peer.
                    session
                        .decapsulate(&msg, now, &mut out, |p| received.push(p.to_vec()))
                        .map_err(|e| e.to_string())?;
                    session
                        .stream_up(now, &mut out)
                        .map_err(|e| e.to_string())?;
                    if let Some(old) = self.active[peer].replace(id) {
                        if old != id {
                            streams[old].open = false;
                            self.closed.push((elapsed, old, "replaced".into()));
                        }
                    }
                    self.conns[i].peer = Some(peer);
                }
                Some(peer) => {
                    let Some(session) = self.sessions[peer].as_mut() else {
                        unreachable!()
                    };
                    let received = &mut self.received[peer];
                    if let Err(e) =
                        session.decapsulate(&msg, now, &mut out, |p| received.push(p.to_vec()))
                    {
                        if e.is_fatal() {
                            streams[id].s2c.write(&out);
                            return Err(e.to_string());
                        }
                        self.nonfatal.push(e.to_string());
                    }
                }
            }
            streams[id].s2c.write(&out);
        }
    }

    fn tick(&mut self, now: Instant, elapsed: Duration, streams: &mut [Stream]) {
        for peer in 0..self.sessions.len() {
            let Some(session) = self.sessions[peer].as_mut() else {
                continue;
            };
            let mut out = BytesMut::new();
            let res = session.tick(now, &mut out);
            if let Some(id) = self.active[peer] {
                streams[id].s2c.write(&out);
                if let Err(e) = res {
                    if e.is_fatal() {
                        streams[id].open = false;
                        self.active[peer] = None;
                        session.stream_down();
                        self.closed.push((elapsed, id, e.to_string()));
                    }
                }
            }
        }
    }
}

#[test]
fn handshake_without_waiting() {
    let mut w = World::new(vec![key()], &[0]);
    let t0 = w.elapsed;
    w.connect(0);
    w.pump();
    assert_eq!(w.elapsed, t0, "no time passes");
    let c = &w.clients[0].session;
    let s = w.server.sessions[0].as_ref().unwrap();
    assert!(c.is_established());
    assert!(s.is_established());
    assert_eq!(c.stats().handshakes_completed, 1);
    assert_eq!(s.stats().handshakes_completed, 1);
    assert_eq!(w.server.active[0], Some(0));
    assert!(w.server.closed.is_empty());
}

#[test]
fn data_both_ways() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    w.exchange(0, 0, 200);
    w.run(Duration::from_secs(2));
    w.exchange(0, 0, 10);
    let stats = w.clients[0].session.stats();
    assert_eq!(stats.tx_packets, 210);
    assert_eq!(stats.rx_packets, 210);
}

#[test]
fn packets_sent_before_the_handshake_are_delivered() {
    let mut w = World::new(vec![key()], &[0]);
    w.connect(0);
    // Queued inside boringtun until the handshake completes.
    let p = ipv4(1, 7);
    w.client_send(0, &p);
    w.pump();
    assert_eq!(w.server.received[0], vec![p]);
}

#[test]
fn rekey_keeps_data_flowing() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    for _ in 0..300 {
        w.exchange(0, 0, 1);
        for _ in 0..4 {
            w.step();
        }
    }
    let c = w.clients[0].session.stats();
    let s = w.server.sessions[0].as_ref().unwrap().stats();
    assert!(c.handshakes_completed >= 3, "{c:?}");
    assert!(s.handshakes_completed >= 3, "{s:?}");
    assert!(w.clients[0].session.last_handshake_age().unwrap() < Duration::from_secs(125));
    assert_eq!(w.clients[0].streams_opened, 1, "{:?}", w.clients[0].closed);
    assert!(w.server.closed.is_empty());
    assert_eq!(w.server.received[0].len(), 300);
    assert_eq!(w.clients[0].received.len(), 300);
}

#[test]
fn idle_tunnel_rekeys_on_time() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    w.run(Duration::from_secs(400));
    // Only keepalives flowed; the keys were still renewed and the stream never dropped.
    assert!(w.clients[0].session.stats().handshakes_completed >= 3);
    assert_eq!(w.clients[0].streams_opened, 1, "{:?}", w.clients[0].closed);
    w.exchange(0, 0, 5);
}

#[test]
fn keepalive_when_idle() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    let c0 = w.clients[0].session.stats();
    let s0 = w.server.sessions[0].as_ref().unwrap().stats();
    w.run(Duration::from_secs(35));
    let c1 = w.clients[0].session.stats();
    let s1 = w.server.sessions[0].as_ref().unwrap().stats();
    assert!(c1.keepalives_sent >= c0.keepalives_sent + 3, "{c1:?}");
    assert!(s1.keepalives_sent >= s0.keepalives_sent + 3, "{s1:?}");
    assert!(c1.rx_messages >= c0.rx_messages + 3);
    assert!(s1.rx_messages >= s0.rx_messages + 3);
    assert_eq!(w.clients[0].streams_opened, 1);
    assert!(w.server.closed.is_empty());
}

#[test]
fn dead_server_detected_by_client() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    w.clients[0].auto_reconnect = false;
    w.run(Duration::from_secs(3));
    let id = w.clients[0].stream.unwrap();
    // Everything from the server is lost from now on.
    w.streams[id].s2c.drop = true;
    let last_rx = w.elapsed - w.clients[0].session.last_received_age(w.now());
    w.run(Duration::from_secs(40));
    let (at, reason) = w.clients[0].closed[0].clone();
    assert!(reason.contains("dead peer"), "{reason}");
    let limit = w.cfg.dead_timeout();
    assert!(at - last_rx >= limit, "{:?}", at - last_rx);
    assert!(at - last_rx <= limit + TICK, "{:?}", at - last_rx);
}

#[test]
fn dead_client_detected_by_server() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    w.clients[0].auto_reconnect = false;
    let id = w.clients[0].stream.unwrap();
    w.streams[id].c2s.drop = true;
    let t0 = w.elapsed;
    w.run(Duration::from_secs(40));
    let (at, stream, reason) = w.server.closed[0].clone();
    assert_eq!(stream, id);
    assert!(reason.contains("dead peer"), "{reason}");
    assert!(at - t0 <= w.cfg.dead_timeout() + TICK, "{:?}", at - t0);
    assert_eq!(w.server.active[0], None);
}

#[test]
fn reconnect_keeps_the_session() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    w.exchange(0, 0, 3);
    w.run(Duration::from_secs(20));
    let hs_c = w.clients[0].session.stats().handshakes_completed;
    let hs_s = w.server.sessions[0]
        .as_ref()
        .unwrap()
        .stats()
        .handshakes_completed;
    // The transport breaks; the client reconnects after its backoff.
    let old = w.clients[0].stream.unwrap();
    w.streams[old].open = false;
    w.pump();
    assert_eq!(w.clients[0].stream, None);
    w.step();
    let new = w.clients[0].stream.unwrap();
    assert_ne!(new, old);
    assert_eq!(w.server.active[0], Some(new));
    // Data flows at once, both ways, with no new handshake.
    w.exchange(0, 0, 5);
    assert_eq!(w.clients[0].session.stats().handshakes_completed, hs_c);
    assert_eq!(
        w.server.sessions[0]
            .as_ref()
            .unwrap()
            .stats()
            .handshakes_completed,
        hs_s
    );
}

#[test]
fn newer_stream_replaces_older_one() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    let old = w.clients[0].stream.unwrap();
    // The client dials again while the old stream still looks alive to the server.
    w.clients[0].stream = None;
    w.clients[0].session.stream_down();
    w.connect(0);
    w.pump();
    let new = w.clients[0].stream.unwrap();
    assert_eq!(w.server.active[0], Some(new));
    assert!(!w.streams[old].open);
    assert!(w
        .server
        .closed
        .iter()
        .any(|(_, s, r)| *s == old && r == "replaced"));
    w.exchange(0, 0, 3);
}

#[test]
fn server_restart_leads_to_new_handshake() {
    let mut w = World::new(vec![key()], &[0]);
    w.establish(0);
    w.exchange(0, 0, 2);
    // The server loses all state (same key and peers).
    let peers = vec![PeerConfig {
        public: w.client_pubs[0],
        psk: None,
    }];
    let hub = Hub::new(w.server_key.clone(), peers).unwrap();
    w.server = Server::new(hub);
    let id = w.clients[0].stream.unwrap();
    w.streams[id].open = false;
    w.pump();
    w.run(Duration::from_secs(2));
    assert!(w.server.sessions[0].as_ref().unwrap().is_established());
    // Initial stream, the resumed stream the new server cannot accept, then a handshake.
    assert_eq!(w.clients[0].streams_opened, 3, "{:?}", w.clients[0].closed);
    assert!(w.server.closed[0].2.contains("NoCurrentSession"));
    w.exchange(0, 0, 3);
}

#[test]
fn two_peers_at_once() {
    let mut w = World::new(vec![key(), key()], &[0, 1]);
    w.connect(0);
    w.connect(1);
    w.pump();
    w.exchange(0, 0, 20);
    w.exchange(1, 1, 20);
    w.run(Duration::from_secs(60));
    w.exchange(1, 1, 5);
    w.exchange(0, 0, 5);
    assert_eq!(w.server.active[0], w.clients[0].stream);
    assert_eq!(w.server.active[1], w.clients[1].stream);
    assert!(w.server.closed.is_empty());
}

#[test]
fn unknown_key_rejected_others_continue() {
    let stranger = key();
    let stranger_secret = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        stranger.to_bytes(),
    );
    let mut w = World::new(vec![key(), stranger, key()], &[0, 2]);
    w.establish(0);
    w.establish(2);
    w.clients[1].auto_reconnect = false;
    w.connect(1);
    w.pump();
    let (_, _, reason) = w.server.closed.last().unwrap().clone();
    assert!(reason.contains("unknown peer public key"), "{reason}");
    assert!(!reason.contains(&stranger_secret));
    assert!(!w.clients[1].session.is_established());
    assert_eq!(w.clients[1].stream, None);
    // Server peers are 0 and 1 (clients 0 and 2).
    w.exchange(0, 0, 5);
    w.exchange(2, 1, 5);
    w.run(Duration::from_secs(15));
    w.exchange(2, 1, 5);
    assert_eq!(w.server.closed.len(), 1);
}

#[test]
fn garbage_and_oversize_frames_close_only_that_stream() {
    let mut w = World::new(vec![key(), key()], &[0, 1]);
    w.establish(0);
    w.establish(1);
    let mut closed = 0;

    // Bad preamble.
    let s = w.raw_stream(b"GET / HTTP/1.1\r\n\r\n");
    w.pump();
    closed += 1;
    assert!(!w.streams[s].open);
    // Zero-length frame, oversize frame, garbage first message.
    for bytes in [&b"\0\0"[..], &b"\xff\xff"[..], &b"\0\x04abcd"[..]] {
        let mut wire = PREAMBLE.to_vec();
        wire.extend_from_slice(bytes);
        let s = w.raw_stream(&wire);
        w.pump();
        closed += 1;
        assert!(!w.streams[s].open);
    }
    assert_eq!(w.server.closed.len(), closed);

    // Garbage on an established peer's stream closes that stream only.
    let victim = w.clients[0].stream.unwrap();
    let other = w.clients[1].stream.unwrap();
    w.streams[victim].c2s.write(b"\0\x05hello");
    w.pump();
    assert!(!w.streams[victim].open);
    assert!(w.streams[other].open);
    assert_eq!(w.server.closed.len(), closed + 1);
    w.exchange(1, 1, 5);
    // The victim reconnects and keeps its session.
    w.step();
    w.exchange(0, 0, 5);
    assert_eq!(w.clients[0].session.stats().handshakes_completed, 1);

    // A replayed data message is dropped and counted, the stream stays.
    let mut out = BytesMut::new();
    let now = w.now();
    w.clients[1]
        .session
        .encapsulate(&ipv4(9, 9), now, &mut out)
        .unwrap();
    let id = w.clients[1].stream.unwrap();
    w.streams[id].c2s.write(&out);
    w.streams[id].c2s.write(&out);
    w.pump();
    assert!(w.streams[id].open);
    assert_eq!(w.server.received[1].last().unwrap(), &ipv4(9, 9));
    assert!(w
        .server
        .nonfatal
        .iter()
        .any(|e| e.contains("DuplicateCounter")));
}
