//! The seed server's tasks and the one place that waits on several of them at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use common::flow::{FlowConfig, FlowTable, TunnelId};
use common::frame::MAX_FRAME_LEN;
use common::hub::{Hub, PeerConfig};
use common::io::health::Health;
use common::io::netlink::Netlink;
use common::io::process::Stopped;
use common::io::sock::{tune_stream, TcpTuning};
use common::io::tls::ReloadingServerConfig;
use common::io::tun::TunConfig;
use common::io::tunio::{Tun, TunReader, GSO_MAX_SIZE};
use common::limits::{InstanceCounters, LimitKind, PendingSlots, TokenBucket};
use common::metrics::{expose_tunnels, Exposition, Kind, TunnelRow};
use common::packet::PacketView;
use common::session::SessionConfig;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore};

use crate::config::Config;
use crate::proxy::ProxyContext;
use crate::state::{inc, lock, PeerSlot, Pending, Server, Stats, ANSWER_CODES, INSTANCES_PER_PEER};
use crate::tunnel::{send_frames, serve_stream};

/// Interval of the session timer.
const TICK: Duration = Duration::from_millis(250);

/// The sockets the server serves, bound before `run` so tests can use port 0.
pub struct Listeners {
    pub tunnel: TcpListener,
    pub proxy_tls: Option<TcpListener>,
    pub proxy_uds: Option<UnixListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the configuration asks for.
    pub async fn bind(cfg: &Config) -> Result<Self> {
        let tunnel = common::io::sock::listen(cfg.tunnel_listen)
            .with_context(|| format!("tunnel listener {}", cfg.tunnel_listen))?;
        let proxy_tls = match cfg.proxy_listen {
            Some(a) => {
                Some(common::io::sock::listen(a).with_context(|| format!("proxy listener {a}"))?)
            }
            None => None,
        };
        let proxy_uds = match &cfg.proxy_uds {
            Some(p) => Some(bind_uds(p, cfg.proxy_uds_mode, cfg.proxy_uds_gid)?),
            None => None,
        };
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("metrics listener {a}"))?,
            ),
            None => None,
        };
        Ok(Self {
            tunnel,
            proxy_tls,
            proxy_uds,
            metrics,
        })
    }
}

/// Binds the proxy's Unix socket with `mode` and group `gid`: bound under a temporary name,
/// given its mode and group, then renamed into place, so that it is never reachable with
/// looser permissions. A stale socket at the path is replaced.
fn bind_uds(path: &std::path::Path, mode: u32, gid: Option<u32>) -> Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "proxy socket {}: exists and is not a socket",
                path.display()
            );
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("proxy socket {}", tmp.display()))?;
    let finish = || -> Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", tmp.display()))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid))
                .with_context(|| format!("chgrp {gid} {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

impl Health for Server {
    fn ready(&self) -> (bool, String) {
        if self.draining.load(Ordering::Relaxed) {
            return (false, "shutting down".into());
        }
        let n = self.live_count();
        if n > 0 {
            (true, format!("{n} tunnel(s) up"))
        } else {
            (false, "no tunnel with a recent handshake".into())
        }
    }

    fn metrics(&self) -> String {
        let s: &Stats = &self.stats;
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
        let now = Instant::now();
        // One pass over the peers; the locks are not held while formatting.
        let rows: Vec<TunnelRow> = self
            .peers
            .iter()
            .map(|p| {
                let p = lock(p);
                TunnelRow::of(&p.name, &p.session, p.stream.is_some(), now)
            })
            .collect();
        let mut e = Exposition::new();
        e.single(
            "vpn_seed_tunnels_up",
            Kind::Gauge,
            "Tunnels with a stream and an established session.",
            self.live_count() as f64,
        );
        expose_tunnels(&mut e, "vpn_seed", "peer", &rows);
        let rejected = rows.iter().map(|r| r.stats.rejected_messages).sum();
        s.plane.expose(&mut e, "vpn_seed", rejected);
        e.single(
            "vpn_seed_streams_accepted_total",
            Kind::Counter,
            "Tunnel streams bound to a client.",
            g(&s.streams_accepted),
        );
        e.single(
            "vpn_seed_streams_rejected_total",
            Kind::Counter,
            "Tunnel streams refused or failed (bad preamble, unknown key, bad frame).",
            g(&s.streams_rejected),
        );
        e.family(
            "vpn_seed_proxy_requests_total",
            Kind::Counter,
            "Proxy requests (CONNECT and forwarded HTTP) by answer code.",
        );
        for (code, v) in ANSWER_CODES.iter().zip(s.proxy_answers.iter()) {
            e.sample(
                "vpn_seed_proxy_requests_total",
                &[("code", &code.to_string())],
                g(v),
            );
        }
        e.single(
            "vpn_seed_proxy_open_connections",
            Kind::Gauge,
            "Open proxied connections.",
            g(&s.proxy_open),
        );
        e.family(
            "vpn_seed_proxy_dial_seconds",
            Kind::Histogram,
            "Time to connect to a target through the tunnel.",
        )
        .histogram("vpn_seed_proxy_dial_seconds", &[], &s.dial);
        e.single(
            "vpn_seed_flows",
            Kind::Gauge,
            "Entries in the flow table.",
            lock(&self.flows).len() as f64,
        );
        e.family(
            "vpn_seed_limit_hits_total",
            Kind::Counter,
            "Times a limit was hit (see SECURITY.md): evictions, timeouts, budgets spent, refusals.",
        );
        for (kind, n) in s.limits.snapshot() {
            // Log lines are suppressed process-wide by the logging gate.
            let n = match kind {
                LimitKind::LogLines => n + common::io::log::suppressed_total(),
                _ => n,
            };
            e.sample(
                "vpn_seed_limit_hits_total",
                &[("limit", kind.name())],
                n as f64,
            );
        }
        e.single(
            "vpn_seed_pending_streams",
            Kind::Gauge,
            "Tunnel streams accepted and not yet authenticated.",
            lock(&self.pending).len() as f64,
        );
        e.single(
            "vpn_seed_proxy_pending_connections",
            Kind::Gauge,
            "Proxy connections whose TLS handshake or request head is not complete.",
            lock(&self.proxy_pending).len() as f64,
        );
        e.single(
            "vpn_seed_draining",
            Kind::Gauge,
            "1 after SIGTERM while open connections drain.",
            f64::from(u8::from(self.draining.load(Ordering::Relaxed))),
        );
        e.finish()
    }
}

/// Builds the shared state from the configuration (keys, hub, sessions).
fn build_server(cfg: &Config) -> Result<Server> {
    let private = common::io::keyfile::load_private_key(&cfg.private_key_file)
        .with_context(|| format!("private key {}", cfg.private_key_file.display()))?;
    let psk = match &cfg.preshared_key_file {
        Some(p) => Some(
            common::io::keyfile::load_psk(p)
                .with_context(|| format!("pre-shared key {}", p.display()))?,
        ),
        None => None,
    };
    let peers = cfg
        .peers
        .iter()
        .map(|(_, key)| {
            Ok(PeerConfig {
                public: common::keys::parse_public_key(key)?,
                psk,
            })
        })
        .collect::<Result<Vec<_>, common::keys::KeyError>>()?;
    let hub = Hub::new(private, peers)?;
    let scfg = SessionConfig {
        keepalive: cfg.keepalive,
        dead_timeout: cfg.dead_peer_timeout,
    };
    let now = Instant::now();
    let limits = cfg.limits.clone();
    let slots = (0..hub.len())
        .map(|i| {
            Ok(Mutex::new(PeerSlot {
                name: cfg.peers.get(i).map(|p| p.0.clone()).unwrap_or_default(),
                session: hub.new_session(i, scfg, now)?,
                stream: None,
                generation: 0,
                tun: Arc::new(tokio::sync::Mutex::new(None)),
                instances: InstanceCounters::new(INSTANCES_PER_PEER),
                handshakes: TokenBucket::per_second(limits.peer_handshakes_per_second),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Server {
        hub,
        anon_handshakes: Mutex::new(TokenBucket::per_second(limits.handshakes_per_second)),
        pending: Arc::new(Mutex::new(PendingSlots::new(limits.pending_streams))),
        proxy_pending: Arc::new(Mutex::new(PendingSlots::new(limits.proxy_pending))),
        tls_handshakes: Arc::new(Mutex::new(PendingSlots::new(limits.proxy_tls_handshakes))),
        flows: Mutex::new(FlowTable::new(FlowConfig {
            max_flows: limits.max_flows,
            ..FlowConfig::default()
        })),
        limits,
        peers: slots,
        shoot_networks: cfg.shoot_networks.clone(),
        tunnel_sources: {
            let mut s = cfg.shoot_networks.clone();
            s.extend(cfg.vpn_networks.iter().copied());
            s
        },
        live: RwLock::new(Vec::new()),
        stats: Stats::default(),
        draining: AtomicBool::new(false),
        proxy_idle: Notify::new(),
    })
}

/// Runs the server until `shutdown` completes or a component fails.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped> {
    common::io::log::set_lines_per_second(cfg.limits.log_lines_per_second);
    match common::io::sock::raise_nofile_limit() {
        Ok((old, new)) => tracing::info!(old, new, "raised open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise open file limit"),
    }
    let server = Arc::new(build_server(&cfg)?);
    let tls = match &cfg.tls {
        Some(files) => Some(Arc::new(
            ReloadingServerConfig::new(files.clone()).context("proxy TLS")?,
        )),
        None => None,
    };

    let tun = Tun::new(
        common::io::tun::create(&TunConfig {
            name: cfg.tun_name.clone(),
            mtu: cfg.mtu,
            addrs: cfg.tun_addrs.clone(),
            offload: cfg.tun_offload,
        })
        .with_context(|| format!("TUN {}", cfg.tun_name))?,
        cfg.mtu,
    );
    common::io::sysctl::seed_tun(&cfg.tun_name).context("sysctls")?;
    let netlink = Netlink::new().await.context("netlink")?;
    if tun.offload {
        netlink
            .set_gso_max_size(&cfg.tun_name, GSO_MAX_SIZE)
            .await
            .context("TUN gso_max_size")?;
    }
    let has_v4 = cfg
        .tun_addrs
        .iter()
        .any(|a| matches!(a, ipnet::IpNet::V4(_)));
    let has_v6 = cfg
        .tun_addrs
        .iter()
        .any(|a| matches!(a, ipnet::IpNet::V6(_)));
    netlink
        .install_seed_routing(
            &cfg.tun_name,
            cfg.routing_table,
            cfg.routing_rule_priority,
            has_v4,
            has_v6,
        )
        .await
        .context("policy routing")?;
    tracing::info!(
        tun = %cfg.tun_name,
        addrs = ?cfg.tun_addrs,
        table = cfg.routing_table,
        peers = server.hub.len(),
        "seed server up"
    );

    let proxy = Arc::new(ProxyContext {
        server: server.clone(),
        tun_name: cfg.tun_name.clone(),
        dial_timeout: cfg.dial_timeout,
        limit: Arc::new(Semaphore::new(cfg.limits.max_connections)),
        dials: Arc::new(Semaphore::new(cfg.limits.pending_dials)),
        lingering: Arc::new(Semaphore::new(crate::proxy::MAX_LINGERING)),
        tuning: TcpTuning::default(),
        resolver: crate::proxy::Resolver::from_config(&cfg),
    });

    // The data plane (and health endpoint) runs until the end; the proxy listeners stop first.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(accept_tunnels(
        server.clone(),
        tun.clone(),
        listeners.tunnel,
    ));
    tasks.spawn(pump_tun(server.clone(), tun.reader()));
    tasks.spawn(timers(server.clone(), tls.clone()));
    if let Some(l) = listeners.metrics {
        tasks.spawn(common::io::process::health_task(l, server.clone()));
    }
    let mut accepts = tokio::task::JoinSet::new();
    if let (Some(l), Some(tls)) = (listeners.proxy_tls, tls) {
        accepts.spawn(accept_proxy_tls(proxy.clone(), l, tls));
    }
    if let Some(l) = listeners.proxy_uds {
        accepts.spawn(accept_proxy_uds(proxy.clone(), l));
    }

    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(res) = tasks.join_next() => Err(common::io::process::task_ended(res)),
        Some(res) = accepts.join_next() => Err(common::io::process::task_ended(res)),
    };
    accepts.abort_all();
    let result = match result {
        Ok(()) => drain(&server, cfg.shutdown_timeout, &mut tasks).await,
        Err(e) => Err(e),
    };
    tasks.abort_all();
    if let Err(e) = netlink
        .remove_seed_routing(
            &cfg.tun_name,
            cfg.routing_table,
            cfg.routing_rule_priority,
            has_v4,
            has_v6,
        )
        .await
    {
        tracing::warn!(error = %e, "cannot remove policy routing");
    }
    if let Some(p) = &cfg.proxy_uds {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// After SIGTERM: not ready, no new proxied connections (the listeners are closed already);
/// waits for the open ones to finish, at most `timeout`, while the data plane keeps running.
async fn drain(
    server: &Server,
    timeout: Duration,
    tasks: &mut tokio::task::JoinSet<Result<()>>,
) -> Result<Stopped> {
    server.draining.store(true, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + timeout;
    tracing::info!(
        open = server.open_connections(),
        timeout = ?timeout,
        "shutting down: proxy listeners closed, draining open connections"
    );
    loop {
        let idle = server.proxy_idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        let open = server.open_connections();
        if open == 0 {
            tracing::info!("drained");
            return Ok(Stopped::Clean);
        }
        tokio::select! {
            _ = idle => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(Stopped::DrainTimeout(open)),
            Some(res) = tasks.join_next() => return Err(common::io::process::task_ended(res)),
        }
    }
}

async fn accept_tunnels(server: Arc<Server>, tun: Tun, l: TcpListener) -> Result<()> {
    loop {
        let (stream, remote) = match l.accept().await {
            Ok(s) => s,
            Err(e) => {
                common::warn_limited!("tunnel_accept_failed", error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Taken at once: when the set is full the oldest pending stream is closed, so a
        // flood of idle strangers never locks out a client that speaks at once.
        let pending = Pending::take(
            &server.pending,
            &server.stats.limits,
            LimitKind::PendingStreams,
        );
        if let Err(e) = tune_stream(&stream, &TcpTuning::default()) {
            tracing::debug!(error = %e, "tunnel socket options");
        }
        let server = server.clone();
        let tun = tun.clone();
        tokio::spawn(async move {
            if let Err(e) =
                serve_stream(server.clone(), tun, stream, remote.to_string(), pending).await
            {
                inc(&server.stats.streams_rejected);
                common::warn_limited!(e.reason(), %remote, error = %e, "tunnel stream closed");
            }
        });
    }
}

async fn accept_proxy_tls(
    proxy: Arc<ProxyContext>,
    l: TcpListener,
    tls: Arc<ReloadingServerConfig>,
) -> Result<()> {
    loop {
        let (stream, remote) = match l.accept().await {
            Ok(s) => s,
            Err(e) => {
                common::warn_limited!("proxy_accept_failed", error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The budget is taken before TLS: the oldest unfinished connection makes room.
        let server = &proxy.server;
        let pending = Pending::take(
            &server.proxy_pending,
            &server.stats.limits,
            LimitKind::ProxyPending,
        );
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let server = &proxy.server;
            let timeout = server.limits.proxy_tls_timeout;
            let handshake = async {
                // A handshake slot only once the ClientHello is arriving: idle connections hold
                // none. When all are taken, the oldest handshake in flight is closed (a client
                // that speaks at once finishes in a round trip; a stalled one is the oldest).
                stream.peek(&mut [0u8; 1]).await?;
                let slot = Pending::take(
                    &server.tls_handshakes,
                    &server.stats.limits,
                    LimitKind::ProxyTlsHandshakes,
                );
                tokio::select! {
                    r = acceptor.accept(stream) => r,
                    _ = slot.evicted() => Err(std::io::Error::other("evicted by a newer TLS handshake")),
                }
            };
            let res = tokio::select! {
                r = tokio::time::timeout(timeout, handshake) => r,
                _ = pending.evicted() => {
                    common::warn_limited!("proxy_evicted", %remote, "proxy connection evicted by a newer one before its request head");
                    return;
                }
            };
            match res {
                // Boxed: the request's state is allocated once the handshake is done, not by
                // every connection still waiting for its ClientHello.
                Ok(Ok(s)) => Box::pin(proxy.serve(s, remote.to_string(), pending)).await,
                Ok(Err(e)) => {
                    common::warn_limited!("proxy_tls_refused", %remote, error = %e, "proxy TLS handshake refused")
                }
                Err(_) => {
                    server.stats.limits.hit(LimitKind::ProxyTlsTimeout);
                    common::warn_limited!("proxy_tls_timeout", %remote, "proxy TLS handshake timed out");
                }
            }
        });
    }
}

async fn accept_proxy_uds(proxy: Arc<ProxyContext>, l: UnixListener) -> Result<()> {
    loop {
        let (stream, _) = match l.accept().await {
            Ok(s) => s,
            Err(e) => {
                common::warn_limited!("proxy_accept_failed", error = %e, "proxy socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let server = &proxy.server;
        let pending = Pending::take(
            &server.proxy_pending,
            &server.stats.limits,
            LimitKind::ProxyPending,
        );
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve(stream, "uds".into(), pending).await });
    }
}

/// Seed TUN → flow table → tunnel: encrypts every packet for the tunnel its flow is pinned to,
/// one channel message per tunnel and TUN batch.
async fn pump_tun(server: Arc<Server>, mut reader: TunReader) -> Result<()> {
    let mut outs: Vec<BytesMut> = server.peers.iter().map(|_| BytesMut::new()).collect();
    loop {
        let n = reader.recv().await.context("TUN read")?;
        server
            .stats
            .plane
            .tun_rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        for pkt in reader.packets() {
            let view = match PacketView::parse(pkt) {
                Ok(v) => v,
                Err(_) => {
                    server.stats.plane.drops.inc("malformed");
                    continue;
                }
            };
            if !server.shoot_networks.contains(view.dst()) {
                // Kernel chatter (router solicitations, MLD) or a socket bound to the TUN by
                // someone else: nothing outside the shoot networks enters the tunnel.
                server.stats.plane.drops.inc("not_shoot_network");
                continue;
            }
            let pinned = {
                let live = server.live.read().unwrap_or_else(|p| p.into_inner());
                lock(&server.flows).outbound(&view, &live, now)
            };
            let id: TunnelId = match pinned {
                Ok(id) => id,
                Err(reason) => {
                    if reason == common::flow::DropReason::TableFull {
                        server.stats.limits.hit(LimitKind::Flows);
                    }
                    server.stats.plane.drops.inc(reason.reason());
                    tracing::trace!(dst = %view.dst(), reason = reason.reason(), "dropped packet to tunnel");
                    continue;
                }
            };
            let (Some(mut slot), Some(out)) = (
                server.peer(id),
                usize::try_from(id).ok().and_then(|i| outs.get_mut(i)),
            ) else {
                continue;
            };
            out.reserve(pkt.len() + 64);
            if let Err(e) = slot.session.encapsulate(pkt, now, out) {
                tracing::debug!(error = %e, "encapsulate failed");
            }
        }
        for (i, out) in outs.iter_mut().enumerate() {
            if out.is_empty() {
                continue;
            }
            let frames = out.split().freeze();
            match server
                .peer(i as TunnelId)
                .and_then(|slot| slot.stream.as_ref().map(|s| s.sink.clone()))
            {
                Some(sink) => send_frames(&server, &sink, frames),
                None => server.stats.plane.frame_drops.inc("no_stream"),
            }
        }
    }
}

/// Session timers (keepalive, rekey, dead peers), flow expiry and TLS reload.
async fn timers(server: Arc<Server>, tls: Option<Arc<ReloadingServerConfig>>) -> Result<()> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = BytesMut::with_capacity(MAX_FRAME_LEN);
    let mut last_slow = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut changed = false;
        for (i, slot) in server.peers.iter().enumerate() {
            let mut slot = lock(slot);
            match slot.session.tick(now, &mut out) {
                Ok(()) => {}
                Err(e) if e.is_fatal() && slot.stream.is_some() => {
                    tracing::warn!(peer = i, error = %e, "closing the peer's stream");
                    slot.stream = None;
                    slot.session.stream_down();
                    changed = true;
                }
                Err(e) => tracing::debug!(peer = i, error = %e, "session timer"),
            }
            if !out.is_empty() {
                let frames = out.split().freeze();
                if let Some(s) = &slot.stream {
                    send_frames(&server, &s.sink, frames);
                }
            }
            let established = slot.stream.is_some() && slot.session.is_established();
            drop(slot);
            let was_live = server
                .live
                .read()
                .map(|l| l.contains(&(i as TunnelId)))
                .unwrap_or(false);
            changed |= established != was_live;
        }
        if changed {
            server.refresh_live();
        }
        if now.duration_since(last_slow) >= Duration::from_secs(1) {
            last_slow = now;
            lock(&server.flows).expire(now);
            if let Some(tls) = &tls {
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!("proxy TLS certificates reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy TLS reload failed; keeping the previous certificates")
                    }
                }
            }
        }
    }
}
