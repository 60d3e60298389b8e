//! The seed server's tasks and the one place that waits on several of them at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::hub::{Hub, PeerConfig};
use common::io::health::Health;
use common::io::nodeio::{self, NodeCell, TunWriters};
use common::io::process::Stopped;
use common::io::sock::{tune_stream, TcpTuning};
use common::io::tls::ReloadingServerConfig;
use common::io::tun::TunConfig;
use common::limits::{LimitKind, PendingSlots};
use common::metrics::{Exposition, Kind};
use common::node::{Node, NodeConfig, Refusal};
use common::session::SessionConfig;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore};

use crate::config::Config;
use crate::proxy::ProxyContext;
use crate::state::{lock, Pending, Server, Stats};
use crate::tunnel::serve_stream;

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
        // One short lock: the node's state is copied out, formatting happens after.
        let snap = self.node.lock().snapshot(now);
        let plane = &snap.stats;
        let mut e = Exposition::new();
        e.single(
            "vpn_seed_tunnels_up",
            Kind::Gauge,
            "Tunnels with a stream and an established session.",
            snap.live as f64,
        );
        snap.expose(&mut e, "vpn_seed", "peer");
        e.single(
            "vpn_seed_streams_accepted_total",
            Kind::Counter,
            "Tunnel streams bound to a client.",
            plane.streams_accepted as f64,
        );
        e.single(
            "vpn_seed_streams_rejected_total",
            Kind::Counter,
            "Tunnel streams refused before they authenticated (all reasons).",
            plane.refused_total() as f64,
        );
        plane.expose_refusals(&mut e, "vpn_seed");
        e.family(
            "vpn_seed_proxy_requests_total",
            Kind::Counter,
            "Proxy requests (CONNECT and forwarded HTTP) by answer code.",
        );
        for (code, n) in s.proxy_answers.values() {
            e.sample(
                "vpn_seed_proxy_requests_total",
                &[("code", &code.to_string())],
                n as f64,
            );
        }
        e.single(
            "vpn_seed_proxy_open_connections",
            Kind::Gauge,
            "Open proxied connections (including those waiting for a tunnel).",
            g(&s.proxy_open),
        );
        e.single(
            "vpn_seed_proxy_waiting_for_tunnel",
            Kind::Gauge,
            "Proxy requests waiting for a tunnel to come up (see --tunnel-wait).",
            g(&s.tunnel_waiting),
        );
        e.single(
            "vpn_seed_proxy_tunnel_wait_timeouts_total",
            Kind::Counter,
            "Proxy requests answered 503 because no tunnel came up within --tunnel-wait.",
            g(&s.tunnel_wait_timeouts),
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
            snap.flows as f64,
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
            snap.pending as f64,
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
    let limits = cfg.limits.clone();
    let stats = Stats::default();
    let mut tunnel_sources = cfg.shoot_networks.clone();
    tunnel_sources.extend(cfg.vpn_networks.iter().copied());
    let node_cfg = NodeConfig {
        session: SessionConfig {
            keepalive: cfg.keepalive,
            dead_timeout: cfg.dead_peer_timeout,
        },
        limits: limits.clone(),
        shoot_networks: cfg.shoot_networks.clone(),
        tunnel_sources,
    };
    let names = cfg.peers.iter().map(|p| p.0.clone()).collect();
    let node = Node::seed(hub, names, node_cfg, stats.limits.clone(), Instant::now())?;
    Ok(Server {
        live: node.live_gauge(),
        node: NodeCell::new(node),
        proxy_pending: Arc::new(Mutex::new(PendingSlots::new(limits.proxy_pending))),
        tls_handshakes: Arc::new(Mutex::new(PendingSlots::new(limits.proxy_tls_handshakes))),
        limits,
        shoot_networks: cfg.shoot_networks.clone(),
        stats,
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

    let (tun, netlink) = nodeio::open_tun(&TunConfig {
        name: cfg.tun_name.clone(),
        mtu: cfg.mtu,
        addrs: cfg.tun_addrs.clone(),
        offload: cfg.tun_offload,
    })
    .await?;
    common::io::sysctl::seed_tun(&cfg.tun_name).context("sysctls")?;
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
        peers = server.node.lock().tunnels(),
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
    let writers = Arc::new(TunWriters::new(tun.clone(), server.node.lock().tunnels()));
    tasks.spawn(accept_tunnels(server.clone(), writers, listeners.tunnel));
    tasks.spawn(nodeio::pump_tun(server.node.clone(), tun.reader()));
    // The seed dials nothing: the node never asks it to.
    tasks.spawn(nodeio::drive(server.node.clone(), |_| {}));
    if let Some(tls) = tls.clone() {
        tasks.spawn(reload_tls(tls));
    }
    if let Some(dir) = cfg.peers_dir.clone() {
        let psk = match &cfg.preshared_key_file {
            Some(p) => Some(common::io::keyfile::load_psk(p).context("pre-shared key")?),
            None => None,
        };
        tasks.spawn(watch_peers(
            server.clone(),
            dir,
            cfg.static_peers.clone(),
            psk,
        ));
    }
    if let Some(l) = listeners.metrics {
        tasks.spawn(common::io::process::health_task(l, server.clone()));
    }
    let mut accepts = tokio::task::JoinSet::new();
    let (stop_accepting, stop) = tokio::sync::watch::channel(false);
    if let (Some(l), Some(tls)) = (listeners.proxy_tls, tls) {
        accepts.spawn(accept_proxy_tls(proxy.clone(), l, tls, stop.clone()));
    }
    if let Some(l) = listeners.proxy_uds {
        accepts.spawn(accept_proxy_uds(proxy.clone(), l, stop.clone()));
    }

    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(res) = tasks.join_next() => Err(common::io::process::task_ended(res)),
        Some(res) = accepts.join_next() => Err(common::io::process::task_ended(res)),
    };
    // The listeners take what is in their backlogs (a connection there would otherwise be
    // reset), then close; those connections are served and drained like the others. The
    // socket's path goes first: a new connect finds nothing (ENOENT) instead of a reset.
    if let Some(p) = &cfg.proxy_uds {
        let _ = std::fs::remove_file(p);
    }
    let _ = stop_accepting.send(true);
    let _ = tokio::time::timeout(BACKLOG_DRAIN, async {
        while accepts.join_next().await.is_some() {}
    })
    .await;
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
    server.node.wake_tunnel_waiters();
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

async fn accept_tunnels(
    server: Arc<Server>,
    writers: Arc<TunWriters>,
    l: TcpListener,
) -> Result<()> {
    loop {
        let (stream, remote) = match l.accept().await {
            Ok(s) => s,
            Err(e) => {
                common::warn_limited!("tunnel_accept_failed", error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tune_stream(&stream, &TcpTuning::default()) {
            tracing::debug!(error = %e, "tunnel socket options");
        }
        let server = server.clone();
        let writers = writers.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(server, writers, stream, remote.to_string()).await {
                common::warn_limited!(log_reason(e.reason), %remote, error = %e, "tunnel stream refused");
            }
        });
    }
}

/// The log gate's reason for a refused tunnel stream.
fn log_reason(r: Refusal) -> &'static str {
    match r {
        Refusal::Evicted => "tunnel_evicted",
        Refusal::PreauthTimeout => "tunnel_preauth_timeout",
        Refusal::HandshakeBudget => "tunnel_handshake_budget",
        Refusal::PeerHandshakeBudget => "tunnel_peer_handshake_budget",
        Refusal::Replay => "tunnel_preamble_replay",
        _ => "tunnel_rejected",
    }
}

/// Reloads the proxy's certificates when their files change (checked every second).
/// How often `--peers-dir` is checked for changes.
const PEERS_DIR_INTERVAL: Duration = Duration::from_secs(1);

/// Watches `--peers-dir` (a Kubernetes Secret volume swaps `..data`; a plain directory is
/// edited in place): on a change the allowed set becomes the `--peer` keys plus every valid
/// key file; a malformed file is reported and ignored, the rest stay in force.
async fn watch_peers(
    server: Arc<Server>,
    dir: std::path::PathBuf,
    static_peers: Vec<(String, String)>,
    psk: Option<[u8; 32]>,
) -> Result<()> {
    use common::io::keyfile::{dir_fingerprint, read_public_keys_dir};
    let mut seen = dir_fingerprint(&dir).ok();
    let mut tick = tokio::time::interval(PEERS_DIR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now_seen = match dir_fingerprint(&dir) {
            Ok(f) => Some(f),
            Err(e) => {
                common::warn_limited!("peers_dir", dir = %dir.display(), error = %e, "cannot read the peers directory; keeping the current peers");
                continue;
            }
        };
        if now_seen == seen {
            continue;
        }
        seen = now_seen;
        let (keys, bad) = match read_public_keys_dir(&dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the peers directory; keeping the current peers");
                continue;
            }
        };
        for e in &bad {
            tracing::warn!(error = %e, "peers directory: file ignored");
        }
        let mut peers = Vec::new();
        for (name, key) in &static_peers {
            if let Ok(public) = common::keys::parse_public_key(key) {
                peers.push((name.clone(), PeerConfig { public, psk }));
            }
        }
        for (name, public) in keys {
            if !peers.iter().any(|(_, p)| p.public == public) {
                peers.push((name, PeerConfig { public, psk }));
            }
        }
        let changed = {
            let mut node = server.node.lock();
            let r = node.set_peers(&peers, Instant::now());
            server.node.drain(&mut node);
            r
        };
        match changed {
            Ok((added, removed)) if added.is_empty() && removed.is_empty() => {}
            Ok((added, removed)) => {
                tracing::info!(
                    ?added,
                    ?removed,
                    peers = peers.len(),
                    "peers directory changed"
                )
            }
            Err(e) => tracing::warn!(error = %e, "peers directory: cannot apply the change"),
        }
        server.node.poke();
    }
}

async fn reload_tls(tls: Arc<ReloadingServerConfig>) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!("proxy TLS certificates reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "proxy TLS reload failed; keeping the previous certificates")
            }
        }
    }
}

/// Longest time the proxy listeners take to empty their backlogs on shutdown.
const BACKLOG_DRAIN: Duration = Duration::from_secs(1);

/// The next connection of a proxy listener: `None` once `stop` is set and the backlog is
/// empty (after `stop`, only connections already queued are taken, without waiting).
async fn next_conn<T, F: std::future::Future<Output = std::io::Result<T>>>(
    accept: impl Fn() -> F,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<T> {
    loop {
        let res = if *stop.borrow() {
            // Polled once: ready only when a connection is queued.
            tokio::time::timeout(Duration::ZERO, accept()).await.ok()?
        } else {
            tokio::select! {
                r = accept() => r,
                _ = stop.changed() => continue,
            }
        };
        match res {
            Ok(c) => return Some(c),
            Err(e) => {
                common::warn_limited!("proxy_accept_failed", error = %e, "proxy accept failed");
                if *stop.borrow() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_proxy_tls(
    proxy: Arc<ProxyContext>,
    l: TcpListener,
    tls: Arc<ReloadingServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    while let Some((stream, remote)) = next_conn(|| l.accept(), &mut stop).await {
        let open = proxy.server.open_guard();
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
                Ok(Ok(s)) => Box::pin(proxy.serve(s, remote.to_string(), pending, open)).await,
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
    Ok(())
}

async fn accept_proxy_uds(
    proxy: Arc<ProxyContext>,
    l: UnixListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    while let Some((stream, _)) = next_conn(|| l.accept(), &mut stop).await {
        let open = proxy.server.open_guard();
        let server = &proxy.server;
        let pending = Pending::take(
            &server.proxy_pending,
            &server.stats.limits,
            LimitKind::ProxyPending,
        );
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve(stream, "uds".into(), pending, open).await });
    }
    Ok(())
}
