//! The shoot client's tasks: one connection manager per seed server replica, the TUN pump, the
//! session timers and the health endpoint, all sharing one TUN.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::{Bytes, BytesMut};
use common::flow::{FlowConfig, FlowTable, TunnelId};
use common::frame::{FrameDecoder, MAX_FRAME_LEN};
use common::io::framed::{FrameSink, MAX_QUEUED};
use common::io::health::Health;
use common::io::netlink::Netlink;
use common::io::tun::TunConfig;
use common::io::tunio::{Tun, TunReader, TunWriter, GSO_MAX_SIZE};
use common::metrics::{Exposition, Kind, ReasonCounters};
use common::packet::PacketView;
use common::session::{Session, SessionConfig, SessionStats};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::config::Config;
use crate::dialer::{Dialer, StreamReader};

const READ_BUF: usize = 256 * 1024;
const TICK: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream that lived this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(30);

struct StreamHandle {
    generation: u64,
    sink: FrameSink,
    reader: Option<AbortHandle>,
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.sink.close();
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

struct TunnelSlot {
    name: String,
    /// Streams opened after the first.
    reconnects: u64,
    session: Session,
    stream: Option<StreamHandle>,
    generation: u64,
}

/// Why a packet read from the TUN was dropped.
const DROP_REASONS: [&str; 2] = ["malformed", "no_tunnel"];
/// Why outgoing frames were dropped (rejected incoming frames are counted by the sessions).
const FRAME_DROP_REASONS: [&str; 2] = ["queue_full", "no_stream"];

struct Stats {
    tun_rx_packets: AtomicU64,
    tun_tx_packets: AtomicU64,
    tunnel_rx_bytes: AtomicU64,
    tunnel_tx_bytes: AtomicU64,
    drops: ReasonCounters,
    frame_drops: ReasonCounters,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            tun_rx_packets: AtomicU64::new(0),
            tun_tx_packets: AtomicU64::new(0),
            tunnel_rx_bytes: AtomicU64::new(0),
            tunnel_tx_bytes: AtomicU64::new(0),
            drops: ReasonCounters::new(&DROP_REASONS),
            frame_drops: ReasonCounters::new(&FRAME_DROP_REASONS),
        }
    }
}

struct Client {
    tunnels: Vec<Mutex<TunnelSlot>>,
    /// Readiness needs every tunnel up (else at least one).
    ready_when_all: bool,
    flows: Mutex<FlowTable>,
    stats: Stats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Sends frames on a tunnel stream, counting what was sent and what was dropped.
    fn send_frames(&self, sink: &FrameSink, frames: Bytes) {
        let n = frames.len() as u64;
        if sink.send(frames) {
            self.stats.tunnel_tx_bytes.fetch_add(n, Ordering::Relaxed);
        } else {
            self.stats.frame_drops.inc("queue_full");
        }
    }

    fn slot(&self, id: TunnelId) -> Option<MutexGuard<'_, TunnelSlot>> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.tunnels.get(i))
            .map(lock)
    }

    fn up(&self) -> Vec<bool> {
        self.tunnels
            .iter()
            .map(|t| {
                let t = lock(t);
                t.stream.is_some() && t.session.is_established()
            })
            .collect()
    }
}

impl Health for Client {
    fn ready(&self) -> (bool, String) {
        let up = self.up();
        let n = up.iter().filter(|u| **u).count();
        let ready = if self.ready_when_all {
            n == up.len()
        } else {
            n > 0
        };
        (ready, format!("{n} of {} tunnels up", up.len()))
    }

    fn metrics(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let s = &self.stats;
        let now = Instant::now();
        type Row = (String, bool, SessionStats, Option<Duration>, f64, u64);
        let tunnels: Vec<Row> = self
            .tunnels
            .iter()
            .map(|t| {
                let t = lock(t);
                (
                    t.name.clone(),
                    t.stream.is_some() && t.session.is_established(),
                    t.session.stats(),
                    t.session.last_handshake_age(),
                    t.session.last_received_age(now).as_secs_f64(),
                    t.reconnects,
                )
            })
            .collect();
        let mut e = Exposition::new();
        let per = |e: &mut Exposition,
                   name: &str,
                   kind: Kind,
                   help: &str,
                   v: &dyn Fn(&Row) -> Option<f64>| {
            e.family(name, kind, help);
            for row in &tunnels {
                if let Some(x) = v(row) {
                    e.sample(name, &[("server", &row.0)], x);
                }
            }
        };
        per(
            &mut e,
            "vpn_shoot_tunnel_up",
            Kind::Gauge,
            "Whether the tunnel to the seed server has a stream and an established session.",
            &|r| Some(f64::from(u8::from(r.1))),
        );
        per(
            &mut e,
            "vpn_shoot_handshakes_total",
            Kind::Counter,
            "WireGuard handshakes completed with the seed server.",
            &|r| Some(r.2.handshakes_completed as f64),
        );
        per(
            &mut e,
            "vpn_shoot_last_handshake_age_seconds",
            Kind::Gauge,
            "Seconds since the last completed handshake (absent before the first).",
            &|r| r.3.map(|a| a.as_secs_f64()),
        );
        per(
            &mut e,
            "vpn_shoot_last_received_age_seconds",
            Kind::Gauge,
            "Seconds since the last message from the seed server (dead after --dead-peer-timeout).",
            &|r| Some(r.4),
        );
        per(
            &mut e,
            "vpn_shoot_reconnects_total",
            Kind::Counter,
            "Tunnel streams opened after the first.",
            &|r| Some(r.5 as f64),
        );
        per(
            &mut e,
            "vpn_shoot_frames_rejected_total",
            Kind::Counter,
            "Tunnel messages from the seed server that failed authentication or decryption.",
            &|r| Some(r.2.rejected_messages as f64),
        );
        for (name, help, rx, tx) in [
            (
                "vpn_shoot_peer_bytes_total",
                "Inner IP bytes through the tunnel.",
                (|r: &Row| r.2.rx_bytes) as fn(&Row) -> u64,
                (|r: &Row| r.2.tx_bytes) as fn(&Row) -> u64,
            ),
            (
                "vpn_shoot_peer_packets_total",
                "Inner IP packets through the tunnel.",
                |r: &Row| r.2.rx_packets,
                |r: &Row| r.2.tx_packets,
            ),
        ] {
            e.family(name, Kind::Counter, help);
            for row in &tunnels {
                e.sample(
                    name,
                    &[("server", &row.0), ("direction", "rx")],
                    rx(row) as f64,
                );
                e.sample(
                    name,
                    &[("server", &row.0), ("direction", "tx")],
                    tx(row) as f64,
                );
            }
        }
        let rejected: u64 = tunnels.iter().map(|r| r.2.rejected_messages).sum();
        e.family(
            "vpn_shoot_frames_dropped_total",
            Kind::Counter,
            "Tunnel frames dropped, by reason: rejected (incoming, failed authentication or decryption), queue_full and no_stream (outgoing).",
        )
        .sample(
            "vpn_shoot_frames_dropped_total",
            &[("reason", "rejected")],
            rejected as f64,
        );
        for (reason, n) in s.frame_drops.values() {
            e.sample(
                "vpn_shoot_frames_dropped_total",
                &[("reason", reason)],
                n as f64,
            );
        }
        e.family(
            "vpn_shoot_stream_bytes_total",
            Kind::Counter,
            "Bytes on tunnel streams (framed, encrypted).",
        )
        .sample(
            "vpn_shoot_stream_bytes_total",
            &[("direction", "rx")],
            g(&s.tunnel_rx_bytes),
        )
        .sample(
            "vpn_shoot_stream_bytes_total",
            &[("direction", "tx")],
            g(&s.tunnel_tx_bytes),
        );
        e.family(
            "vpn_shoot_tun_packets_total",
            Kind::Counter,
            "Packets through the TUN device.",
        )
        .sample(
            "vpn_shoot_tun_packets_total",
            &[("direction", "rx")],
            g(&s.tun_rx_packets),
        )
        .sample(
            "vpn_shoot_tun_packets_total",
            &[("direction", "tx")],
            g(&s.tun_tx_packets),
        );
        e.family(
            "vpn_shoot_packets_dropped_total",
            Kind::Counter,
            "Packets from the TUN dropped, by reason.",
        );
        for (reason, n) in s.drops.values() {
            e.sample(
                "vpn_shoot_packets_dropped_total",
                &[("reason", reason)],
                n as f64,
            );
        }
        e.single(
            "vpn_shoot_flows",
            Kind::Gauge,
            "Entries in the flow table (which tunnel each flow came from).",
            lock(&self.flows).len() as f64,
        );
        e.finish()
    }
}

/// What the client installs in the shoot's network namespace; removed on exit.
struct NetSetup {
    nat: common::io::nft::ShootNat,
}

async fn setup_network(cfg: &Config) -> Result<(Tun, NetSetup)> {
    let tun = common::io::tun::create(&TunConfig {
        name: cfg.tun_name.clone(),
        mtu: cfg.mtu,
        addrs: Vec::new(),
        offload: cfg.tun_offload,
    })
    .with_context(|| format!("TUN {}", cfg.tun_name))?;
    let tun = Tun::new(tun, cfg.mtu);
    let has_v6 = cfg
        .vpn_networks
        .iter()
        .any(|n| matches!(n, ipnet::IpNet::V6(_)));
    common::io::sysctl::shoot_forwarding(&cfg.tun_name, has_v6).context("sysctls")?;
    let netlink = Netlink::new().await.context("netlink")?;
    if tun.offload {
        netlink
            .set_gso_max_size(&cfg.tun_name, GSO_MAX_SIZE)
            .await
            .context("TUN gso_max_size")?;
    }
    netlink
        .install_vpn_routes(&cfg.tun_name, &cfg.vpn_networks)
        .await
        .context("VPN routes")?;
    let nat =
        common::io::nft::ShootNat::install(&cfg.tun_name, &cfg.vpn_networks, cfg.masquerade, true)
            .context("nftables")?;
    Ok((tun, NetSetup { nat }))
}

/// Runs the client until `shutdown` completes or a component fails.
pub async fn run(
    cfg: Config,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<common::io::process::Stopped> {
    let private = common::keys::load_private_key(&cfg.private_key_file)
        .with_context(|| format!("private key {}", cfg.private_key_file.display()))?;
    let server_public = common::keys::parse_public_key(&cfg.server_public_key)?;
    let psk = match &cfg.preshared_key_file {
        Some(p) => Some(
            common::keys::load_psk(p).with_context(|| format!("pre-shared key {}", p.display()))?,
        ),
        None => None,
    };
    let scfg = SessionConfig {
        keepalive: cfg.keepalive,
        dead_timeout: cfg.dead_peer_timeout,
    };
    let now = Instant::now();
    let mut dialers = Vec::new();
    let mut tunnels = Vec::new();
    for (i, value) in cfg.header_values.iter().enumerate() {
        dialers.push(Dialer::new(&cfg, value)?);
        let index = u32::try_from(i + 1).map_err(|_| anyhow!("too many servers"))?;
        tunnels.push(Mutex::new(TunnelSlot {
            name: value.clone(),
            reconnects: 0,
            session: Session::new(private.clone(), server_public, psk, index, scfg, None, now),
            stream: None,
            generation: 0,
        }));
    }
    let client = Arc::new(Client {
        tunnels,
        ready_when_all: cfg.ready_when_all,
        flows: Mutex::new(FlowTable::new(FlowConfig::default())),
        stats: Stats::default(),
    });
    let (tun, net) = setup_network(&cfg).await?;
    tracing::info!(tun = %cfg.tun_name, endpoint = %format!("{}:{}", cfg.endpoint_host, cfg.endpoint_port), servers = ?cfg.header_values, "shoot client up");

    let mut tasks = tokio::task::JoinSet::new();
    for (i, d) in dialers.into_iter().enumerate() {
        tasks.spawn(keep_connected(
            client.clone(),
            tun.clone(),
            i as TunnelId,
            d,
        ));
    }
    tasks.spawn(pump_tun(client.clone(), tun.reader()));
    tasks.spawn(timers(client.clone()));
    if let Some(l) = metrics {
        tasks.spawn(common::io::process::health_task(l, client.clone()));
    }
    let result = tokio::select! {
        _ = shutdown => {
            tracing::info!("shutting down");
            Ok(common::io::process::Stopped::Clean)
        }
        Some(res) = tasks.join_next() => Err(common::io::process::task_ended(res)),
    };
    tasks.abort_all();
    if let Err(e) = net.nat.remove() {
        tracing::warn!(error = %e, "cannot remove nftables rules");
    }
    result
}

/// Keeps one tunnel connected: dial, serve, back off with full jitter, repeat.
async fn keep_connected(client: Arc<Client>, tun: Tun, id: TunnelId, dialer: Dialer) -> Result<()> {
    let mut backoff = BACKOFF_MIN;
    let mut attempts: u64 = 0;
    let mut retried_at_once = false;
    loop {
        let started = Instant::now();
        match connect_once(&client, &tun, id, &dialer, attempts).await {
            Ok(()) => tracing::info!(tunnel = id, "tunnel stream ended"),
            Err(e) => tracing::warn!(
                tunnel = id,
                error = format!("{e:#}"),
                "tunnel stream failed"
            ),
        }
        attempts += 1;
        if started.elapsed() >= BACKOFF_RESET {
            backoff = BACKOFF_MIN;
        }
        // A resumed stream the server closed unanswered (it restarted and lost the session):
        // the next stream carries a handshake, so it goes out at once.
        let resumed_unanswered = client
            .slot(id)
            .is_some_and(|slot| slot.session.is_resuming());
        if resumed_unanswered && !retried_at_once && started.elapsed() < Duration::from_secs(2) {
            tracing::info!(
                tunnel = id,
                "server did not know the resumed session; handshaking now"
            );
            retried_at_once = true;
            continue;
        }
        retried_at_once = false;
        let wait =
            Duration::from_millis(rand::thread_rng().gen_range(0..=backoff.as_millis() as u64));
        tracing::debug!(tunnel = id, ?wait, "reconnecting after backoff");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect_once(
    client: &Arc<Client>,
    tun: &Tun,
    id: TunnelId,
    dialer: &Dialer,
    attempts: u64,
) -> Result<()> {
    // The first message is prepared before dialing so it goes out with the preamble.
    let mut first = BytesMut::with_capacity(MAX_FRAME_LEN);
    {
        let mut slot = client.slot(id).ok_or_else(|| anyhow!("no tunnel {id}"))?;
        slot.session.stream_up(Instant::now(), &mut first)?;
    }
    let dialed = dialer.dial(&first).await?;
    if attempts > 0 {
        if let Some(mut slot) = client.slot(id) {
            slot.reconnects += 1;
        }
    }
    let remote = dialed.remote.clone();
    let leftover = dialed.leftover.clone();
    let (stream_reader, sink, tls_writer) = dialed.into_parts(MAX_QUEUED);
    let generation = {
        let mut slot = client.slot(id).ok_or_else(|| anyhow!("no tunnel {id}"))?;
        slot.generation += 1;
        slot.stream = Some(StreamHandle {
            generation: slot.generation,
            sink: sink.clone(),
            reader: None,
        });
        slot.generation
    };
    tracing::info!(tunnel = id, %remote, "tunnel stream open");
    let writer = {
        let sink = sink.clone();
        tokio::spawn(async move {
            match tls_writer {
                Some(w) => sink.run_writer(w).await,
                None => sink.run_writer(tokio::io::sink()).await,
            }
        })
    };
    let reader = {
        let client = client.clone();
        let tun = tun.writer();
        tokio::spawn(async move {
            read_loop(client, tun, id, generation, stream_reader, leftover, sink).await
        })
    };
    if let Some(mut slot) = client.slot(id) {
        match slot.stream.as_mut() {
            Some(s) if s.generation == generation => s.reader = Some(reader.abort_handle()),
            _ => reader.abort(),
        }
    }
    let res = match reader.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Err(anyhow!("stream closed (dead peer)")),
        Err(e) => Err(anyhow!("reader task failed: {e}")),
    };
    writer.abort();
    if let Some(mut slot) = client.slot(id) {
        if slot.stream.as_ref().map(|s| s.generation) == Some(generation) {
            if let Some(mut s) = slot.stream.take() {
                s.reader = None;
            }
            slot.session.stream_down();
        }
    }
    res
}

async fn read_loop(
    client: Arc<Client>,
    mut tun: TunWriter,
    id: TunnelId,
    generation: u64,
    mut r: StreamReader,
    mut buf: BytesMut,
    sink: FrameSink,
) -> Result<()> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut to_net = BytesMut::with_capacity(MAX_FRAME_LEN);
    loop {
        // Decrypt what the buffer holds, up to one TUN batch, under the tunnel's lock.
        let more;
        {
            let mut slot = client.slot(id).ok_or_else(|| anyhow!("no tunnel {id}"))?;
            if slot.stream.as_ref().map(|s| s.generation) != Some(generation) {
                return Ok(());
            }
            let now = Instant::now();
            more = common::io::framed::decrypt_frames(
                &mut slot.session,
                &decoder,
                &mut buf,
                now,
                &mut to_net,
                &mut tun,
                &client.stats.tunnel_rx_bytes,
                |view| {
                    let _ = lock(&client.flows).from_tunnel(view, id, now);
                    true
                },
            )
            .context("tunnel stream")?;
        }
        if !to_net.is_empty() {
            client.send_frames(&sink, to_net.split().freeze());
        }
        let n = tun.len() as u64;
        match tun.flush().await {
            Ok(()) => {
                client.stats.tun_tx_packets.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "TUN write failed"),
        }
        if more {
            continue;
        }
        if buf.capacity() - buf.len() < MAX_FRAME_LEN {
            buf.reserve(READ_BUF);
        }
        if r.read(&mut buf).await? == 0 {
            return Err(anyhow!("server closed the stream"));
        }
    }
}

/// Shoot TUN → the tunnel the flow came from (or the first tunnel up) → encrypt → stream, one
/// channel message per tunnel and TUN batch.
async fn pump_tun(client: Arc<Client>, mut reader: TunReader) -> Result<()> {
    let mut outs: Vec<BytesMut> = client.tunnels.iter().map(|_| BytesMut::new()).collect();
    loop {
        let n = reader.recv().await.context("TUN read")?;
        client
            .stats
            .tun_rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        for pkt in reader.packets() {
            let Ok(view) = PacketView::parse(pkt) else {
                client.stats.drops.inc("malformed");
                continue;
            };
            let pinned = lock(&client.flows).reply_tunnel(&view, now);
            let order = pinned
                .into_iter()
                .chain(0..client.tunnels.len() as TunnelId);
            let mut sent = false;
            for id in order {
                let Some(mut slot) = client.slot(id) else {
                    continue;
                };
                if slot.stream.is_none() || !slot.session.is_established() {
                    continue;
                }
                let Some(out) = usize::try_from(id).ok().and_then(|i| outs.get_mut(i)) else {
                    continue;
                };
                out.reserve(pkt.len() + 64);
                match slot.session.encapsulate(pkt, now, out) {
                    Ok(()) => sent = true,
                    Err(e) => tracing::debug!(error = %e, "encapsulate failed"),
                }
                break;
            }
            if !sent {
                client.stats.drops.inc("no_tunnel");
            }
        }
        for (i, out) in outs.iter_mut().enumerate() {
            if out.is_empty() {
                continue;
            }
            let frames = out.split().freeze();
            match client
                .slot(i as TunnelId)
                .and_then(|slot| slot.stream.as_ref().map(|s| s.sink.clone()))
            {
                Some(sink) => client.send_frames(&sink, frames),
                None => client.stats.frame_drops.inc("no_stream"),
            }
        }
    }
}

async fn timers(client: Arc<Client>) -> Result<()> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = BytesMut::with_capacity(MAX_FRAME_LEN);
    let mut last_expire = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        for (i, slot) in client.tunnels.iter().enumerate() {
            let mut slot = lock(slot);
            match slot.session.tick(now, &mut out) {
                Ok(()) => {}
                Err(e) if e.is_fatal() && slot.stream.is_some() => {
                    tracing::warn!(tunnel = i, error = %e, "closing the tunnel stream; reconnecting");
                    slot.stream = None;
                    slot.session.stream_down();
                }
                Err(e) => tracing::debug!(tunnel = i, error = %e, "session timer"),
            }
            if !out.is_empty() {
                let frames = out.split().freeze();
                if let Some(s) = &slot.stream {
                    client.send_frames(&s.sink, frames);
                }
            }
        }
        if now.duration_since(last_expire) >= Duration::from_secs(1) {
            last_expire = now;
            lock(&client.flows).expire(now);
        }
    }
}
