//! The shoot client's tasks: one connection manager per seed server replica, the TUN pump, the
//! session timers and the health endpoint, all sharing one TUN.

use std::future::Future;
use std::sync::atomic::Ordering;
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
use common::metrics::{expose_tunnels, DataPlaneStats, Exposition, Kind, TunnelRow};
use common::packet::PacketView;
use common::session::{Session, SessionConfig};
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

struct Client {
    tunnels: Vec<Mutex<TunnelSlot>>,
    /// Readiness needs every tunnel up (else at least one).
    ready_when_all: bool,
    flows: Mutex<FlowTable>,
    stats: DataPlaneStats,
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
        let now = Instant::now();
        let (rows, reconnects): (Vec<TunnelRow>, Vec<u64>) = self
            .tunnels
            .iter()
            .map(|t| {
                let t = lock(t);
                (
                    TunnelRow::of(&t.name, &t.session, t.stream.is_some(), now),
                    t.reconnects,
                )
            })
            .unzip();
        let mut e = Exposition::new();
        expose_tunnels(&mut e, "vpn_shoot", "server", &rows);
        e.family(
            "vpn_shoot_reconnects_total",
            Kind::Counter,
            "Tunnel streams opened after the first.",
        );
        for (r, n) in rows.iter().zip(reconnects) {
            e.sample(
                "vpn_shoot_reconnects_total",
                &[("server", &r.name)],
                n as f64,
            );
        }
        let rejected = rows.iter().map(|r| r.stats.rejected_messages).sum();
        self.stats.expose(&mut e, "vpn_shoot", rejected);
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
    let private = common::io::keyfile::load_private_key(&cfg.private_key_file)
        .with_context(|| format!("private key {}", cfg.private_key_file.display()))?;
    let server_public = common::keys::parse_public_key(&cfg.server_public_key)?;
    let psk = match &cfg.preshared_key_file {
        Some(p) => Some(
            common::io::keyfile::load_psk(p)
                .with_context(|| format!("pre-shared key {}", p.display()))?,
        ),
        None => None,
    };
    let scfg = SessionConfig {
        keepalive: cfg.keepalive,
        dead_timeout: cfg.dead_peer_timeout,
    };
    let now = Instant::now();
    let preamble_key = if cfg.preamble_v2 {
        Some(
            common::preamble::PreambleKey::for_client(&private, &server_public)
                .map_err(|e| anyhow!("--server-public-key: {e}"))?,
        )
    } else {
        None
    };
    let preambles = Arc::new(crate::dialer::Preambles::new(preamble_key));
    tracing::debug!(
        instance = format!("{:016x}", preambles.instance()),
        "client instance"
    );
    let mut dialers = Vec::new();
    let mut tunnels = Vec::new();
    for (i, value) in cfg.header_values.iter().enumerate() {
        dialers.push(Dialer::new(&cfg, value, preambles.clone())?);
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
        stats: DataPlaneStats::new(&DROP_REASONS),
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
                |_| true,
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
