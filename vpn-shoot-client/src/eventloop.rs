//! The shoot client's tasks: one connection manager per seed server replica, the TUN pump, the
//! session timers and the health endpoint, all sharing one TUN.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use common::flow::TunnelId;
use common::io::health::Health;
use common::io::nodeio::{self, NodeCell, StreamIo, TunWriters};
use common::io::tun::TunConfig;
use common::io::tunio::Tun;
use common::limits::Limits;
use common::metrics::{Exposition, Kind};
use common::node::{Node, NodeConfig};
use common::session::SessionConfig;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::dialer::Dialer;

struct Client {
    node: Arc<NodeCell>,
    /// Readiness needs every tunnel up (else at least one).
    ready_when_all: bool,
}

impl Health for Client {
    fn ready(&self) -> (bool, String) {
        let (n, total) = {
            let node = self.node.lock();
            (node.live().len(), node.tunnels())
        };
        let ready = if self.ready_when_all {
            n == total
        } else {
            n > 0
        };
        (ready, format!("{n} of {total} tunnels up"))
    }

    fn metrics(&self) -> String {
        let now = Instant::now();
        // One short lock: the node's state is copied out, formatting happens after.
        let snap = self.node.lock().snapshot(now);
        let mut e = Exposition::new();
        snap.expose(&mut e, "vpn_shoot", "server");
        e.family(
            "vpn_shoot_reconnects_total",
            Kind::Counter,
            "Tunnel streams opened after the first.",
        );
        for (r, n) in snap.rows.iter().zip(&snap.reconnects) {
            e.sample(
                "vpn_shoot_reconnects_total",
                &[("server", &r.name)],
                *n as f64,
            );
        }
        e.single(
            "vpn_shoot_flows",
            Kind::Gauge,
            "Entries in the flow table (which tunnel each flow came from).",
            snap.flows as f64,
        );
        e.finish()
    }
}

/// What the client installs in the shoot's network namespace; removed on exit.
struct NetSetup {
    nat: common::io::nft::ShootNat,
}

async fn setup_network(cfg: &Config) -> Result<(Tun, NetSetup)> {
    let (tun, netlink) = nodeio::open_tun(&TunConfig {
        name: cfg.tun_name.clone(),
        mtu: cfg.mtu,
        addrs: Vec::new(),
        offload: cfg.tun_offload,
    })
    .await?;
    let has_v6 = cfg
        .vpn_networks
        .iter()
        .any(|n| matches!(n, ipnet::IpNet::V6(_)));
    common::io::sysctl::shoot_forwarding(&cfg.tun_name, has_v6).context("sysctls")?;
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
    let node_cfg = NodeConfig {
        session: SessionConfig {
            keepalive: cfg.keepalive,
            dead_timeout: cfg.dead_peer_timeout,
        },
        limits: Limits::default(),
        shoot_networks: Default::default(),
        tunnel_sources: Default::default(),
    };
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
    let dialers = cfg
        .header_values
        .iter()
        .map(|v| Dialer::new(&cfg, v, preambles.clone()).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let node = Node::shoot(
        private,
        server_public,
        psk,
        cfg.header_values.clone(),
        node_cfg,
        rand::random(),
        Instant::now(),
    );
    let cell = NodeCell::new(node);
    let client = Arc::new(Client {
        node: cell.clone(),
        ready_when_all: cfg.ready_when_all,
    });
    let (tun, net) = setup_network(&cfg).await?;
    tracing::info!(tun = %cfg.tun_name, endpoint = %format!("{}:{}", cfg.endpoint_host, cfg.endpoint_port), servers = ?cfg.header_values, "shoot client up");

    let writers = Arc::new(TunWriters::new(tun.clone(), dialers.len()));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(nodeio::pump_tun(cell.clone(), tun.reader()));
    {
        let cell = cell.clone();
        tasks.spawn(nodeio::drive(cell.clone(), move |t| {
            if let Some(d) = dialers.get(t.index()) {
                tokio::spawn(connect(cell.clone(), writers.clone(), t, d.clone()));
            }
        }));
    }
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

/// Dials tunnel `t` once, as the node asked, and serves the stream until it ends; the node
/// schedules the next dial.
async fn connect(cell: Arc<NodeCell>, writers: Arc<TunWriters>, t: TunnelId, dialer: Arc<Dialer>) {
    let first = match cell.lock().start_stream(t, Instant::now()) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(tunnel = %t, error = %e, "cannot start a tunnel stream");
            cell.lock().dial_failed(t, Instant::now());
            cell.poke();
            return;
        }
    };
    let dialed = match dialer.dial(&first).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(tunnel = %t, error = format!("{e:#}"), "tunnel stream failed");
            let mut node = cell.lock();
            node.dial_failed(t, Instant::now());
            cell.drain(&mut node);
            drop(node);
            cell.poke();
            return;
        }
    };
    let remote = dialed.remote.clone();
    let leftover = dialed.leftover.clone();
    let max_queued = cell.lock().limits().frames_queued_per_tunnel;
    let (reader, sink, tls_writer) = dialed.into_parts(max_queued);
    let io = StreamIo::new(sink.clone());
    let stop = io.stop.clone();
    let id = {
        let mut node = cell.lock();
        let res = node.stream_opened(t, io, Instant::now());
        cell.drain(&mut node);
        res
    };
    cell.poke();
    let id = match id {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(tunnel = %t, error = %e, "tunnel stream not attached");
            return;
        }
    };
    tracing::info!(tunnel = %t, %remote, "tunnel stream open");
    let writer = nodeio::spawn_writer(&sink, tls_writer);
    let res = nodeio::serve_attached(&cell, &writers, id, reader, &leftover, &[], stop).await;
    writer.abort();
    match res {
        Ok(()) => tracing::info!(tunnel = %t, "tunnel stream ended"),
        Err(e) => tracing::warn!(tunnel = %t, error = %e, "tunnel stream failed"),
    }
}
