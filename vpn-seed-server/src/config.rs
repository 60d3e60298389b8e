//! Command line and environment of `vpn-seed-server`, validated into a [`Config`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::cidr::CidrSet;
use common::config::Flag;
use common::limits::Limits;
use ipnet::IpNet;

/// Reference text after the flags in `--help`.
const AFTER_HELP: &str = "\
Every flag can also be set by the environment variable shown. Secrets are file paths.

Endpoints on --metrics-listen (default :15000): /healthz (liveness), /readyz, /metrics.
/readyz: 200 while at least one tunnel is established; 503 before that and after SIGTERM.
SIGTERM: the proxy socket is removed and the listeners close after taking what is queued in
their backlogs; every accepted connection is served and drains for up to --shutdown-timeout,
then the routes are removed.

Proxy answers: 200 connected; 400 bad request; 403 target outside the shoot networks; 405
method; 502 refused/unreachable/unknown host; 503 no tunnel within --tunnel-wait, or a limit;
504 dial or DNS timeout.

Every bound that hostile input can run into (pending streams, handshakes per second, TLS
handshakes, pending proxy connections, dials, DNS lookups, flows, log lines) is a flag below
with a safe default; each hit counts in vpn_seed_limit_hits_total{limit}. See SECURITY.md.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 a component failed; 2 configuration errors
(all printed at once); 3 stopped by a signal with connections still open at the drain
deadline.";

/// Reversed VPN seed server: accepts the shoot client's tunnel and serves kube-apiserver's
/// HTTP CONNECT egress proxy into the shoot's pod, service and node networks.
#[derive(Parser, Debug, Clone)]
#[command(name = "vpn-seed-server", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Args {
    /// Tunnel listener: raw streams from the ingress, or streams that begin with CONNECT.
    #[arg(long, env = "TUNNEL_LISTEN", default_value = "[::]:1194", value_parser = common::config::parse::<SocketAddr>)]
    pub tunnel_listen: Flag<SocketAddr>,

    /// Egress proxy TLS listener (client certificates required), or `off`.
    #[arg(long, env = "PROXY_LISTEN", default_value = "[::]:9443")]
    pub proxy_listen: String,

    /// Egress proxy on a Unix domain socket (for kube-apiserver's `transport.uds`).
    #[arg(long, env = "PROXY_UDS")]
    pub proxy_uds: Option<PathBuf>,

    /// PEM file: the proxy's TLS certificate chain.
    #[arg(long, env = "PROXY_TLS_CERT")]
    pub proxy_tls_cert: Option<PathBuf>,

    /// PEM file: the proxy's TLS private key.
    #[arg(long, env = "PROXY_TLS_KEY")]
    pub proxy_tls_key: Option<PathBuf>,

    /// PEM file: CA bundle that proxy client certificates must chain to.
    #[arg(long, env = "PROXY_CLIENT_CA")]
    pub proxy_client_ca: Option<PathBuf>,

    /// File holding the server's WireGuard private key (base64, as `wg genkey` writes it).
    #[arg(long, env = "PRIVATE_KEY_FILE")]
    pub private_key_file: PathBuf,

    /// File holding an optional WireGuard pre-shared key shared with every client.
    #[arg(long, env = "PRESHARED_KEY_FILE")]
    pub preshared_key_file: Option<PathBuf>,

    /// Allowed client public key (base64), one per shoot client replica. Repeatable;
    /// comma-separated in the environment.
    #[arg(long = "peer", env = "PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Directory of allowed client public keys, one base64 key per file (e.g. a mounted
    /// Secret), added to `--peer`; watched: keys added or removed later apply within seconds,
    /// without a restart (a malformed file is then logged and ignored).
    #[arg(long, env = "PEERS_DIR")]
    pub peers_dir: Option<PathBuf>,

    /// Shoot pod networks (comma-separated CIDRs).
    #[arg(long, env = "SHOOT_POD_NETWORKS", default_value = "")]
    pub shoot_pod_networks: String,

    /// Shoot service networks (comma-separated CIDRs).
    #[arg(long, env = "SHOOT_SERVICE_NETWORKS", default_value = "")]
    pub shoot_service_networks: String,

    /// Shoot node networks (comma-separated CIDRs).
    #[arg(long, env = "SHOOT_NODE_NETWORKS", default_value = "")]
    pub shoot_node_networks: String,

    /// VPN transfer networks (one IPv4 and/or one IPv6 CIDR).
    #[arg(
        long,
        env = "VPN_NETWORK",
        default_value = "192.168.123.0/24,fd8f:6d53:b97a:1::/96"
    )]
    pub vpn_network: String,

    /// Index of this replica: it uses host address index+1 of each VPN network.
    #[arg(long, env = "SERVER_INDEX", default_value = "0", value_parser = common::config::parse::<u32>)]
    pub server_index: Flag<u32>,

    /// Name of the TUN device.
    #[arg(long, env = "TUN_NAME", default_value = "tun0")]
    pub tun_name: String,

    /// MTU of the TUN device.
    #[arg(long, env = "MTU", default_value = "1400", value_parser = common::config::parse::<u16>)]
    pub mtu: Flag<u16>,

    /// Use the TUN's offloads (TSO/GRO super-packets) when the kernel offers them.
    #[arg(long, env = "TUN_OFFLOAD", default_value = "true", action = clap::ArgAction::Set, value_parser = common::config::parse::<bool>)]
    pub tun_offload: Flag<bool>,

    /// Policy routing table for sockets bound to the TUN.
    #[arg(long, env = "ROUTING_TABLE", default_value = "1194", value_parser = common::config::parse::<u32>)]
    pub routing_table: Flag<u32>,

    /// Priority of the policy routing rule `oif <tun> lookup <table>`.
    #[arg(long, env = "ROUTING_RULE_PRIORITY", default_value = "1194", value_parser = common::config::parse::<u32>)]
    pub routing_rule_priority: Flag<u32>,

    /// Health and metrics listener (`/healthz`, `/readyz`, `/metrics`), or `off`.
    #[arg(long, env = "METRICS_LISTEN", default_value = "[::]:15000")]
    pub metrics_listen: String,

    /// Time allowed to establish a proxied connection before answering 504.
    #[arg(long, env = "DIAL_TIMEOUT", default_value = "10s", value_parser = common::config::duration)]
    pub dial_timeout: Flag<Duration>,

    /// Time a CONNECT or forwarded request waits for a tunnel while none is up (the client
    /// reconnects, or the server just started) before it is answered 503; `0` answers 503 at
    /// once. Waiting requests count against --max-connections.
    #[arg(long, env = "TUNNEL_WAIT", default_value = "5s", value_parser = common::config::duration)]
    pub tunnel_wait: Flag<Duration>,

    /// The shoot's DNS server (e.g. the kube-dns service IP), asked through the tunnel for
    /// hostname targets; it must lie in the shoot networks. Without it they get 502.
    #[arg(long, env = "SHOOT_DNS_SERVER", value_parser = common::config::parse::<IpAddr>)]
    pub shoot_dns_server: Option<Flag<IpAddr>>,

    /// The shoot's cluster domain, appended to hostname targets ending in `.svc`.
    #[arg(long, env = "SHOOT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub shoot_cluster_domain: String,

    /// Time the shoot's DNS server has to answer (one retry included) before 504.
    #[arg(long, env = "DNS_TIMEOUT", default_value = "2s", value_parser = common::config::duration)]
    pub dns_timeout: Flag<Duration>,

    /// Maximum number of open proxied connections; more are answered 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value = "20000", value_parser = common::config::parse::<usize>)]
    pub max_connections: Flag<usize>,

    /// Tunnel streams accepted but not yet authenticated; when full, a new stream takes the
    /// slot of the oldest one (which is closed).
    #[arg(long, env = "MAX_PENDING_STREAMS", default_value = "256", value_parser = common::config::parse::<usize>)]
    pub max_pending_streams: Flag<usize>,

    /// Time a new tunnel stream has to send its CONNECT head (if any), preamble and first
    /// message (a client sends preamble and first message in one write).
    #[arg(long, env = "PREAUTH_TIMEOUT", default_value = "2s", value_parser = common::config::duration)]
    pub preauth_timeout: Flag<Duration>,

    /// Handshake initiations per second, all streams together, from streams whose preamble
    /// does not name a client (version-1 clients and strangers): each costs Diffie-Hellman
    /// work before its sender is known. Streams of known clients have their own budget.
    #[arg(long, env = "HANDSHAKES_PER_SECOND", default_value = "100", value_parser = common::config::parse::<u32>)]
    pub handshakes_per_second: Flag<u32>,

    /// Handshake initiations per second per client: on new streams whose preamble names it,
    /// and on each bound stream (rekeys, every 2 minutes normally).
    #[arg(long, env = "PEER_HANDSHAKES_PER_SECOND", default_value = "4", value_parser = common::config::parse::<u32>)]
    pub peer_handshakes_per_second: Flag<u32>,

    /// Bytes of frames queued for one tunnel stream when the socket does not take them at
    /// once; beyond it frames are dropped (the inner TCP recovers). Suffixes KiB, MiB.
    #[arg(long, env = "TUNNEL_QUEUE_SIZE", default_value = "4MiB", value_parser = common::config::bytes)]
    pub tunnel_queue_size: Flag<usize>,

    /// Proxy connections whose request head is not complete yet (TLS handshake included);
    /// when full, a new connection takes the slot of the oldest one (which is closed).
    #[arg(long, env = "MAX_PENDING_PROXY_CONNECTIONS", default_value = "1024", value_parser = common::config::parse::<usize>)]
    pub max_pending_proxy_connections: Flag<usize>,

    /// Proxy TLS handshakes in flight at once (from the ClientHello on); when full, a new
    /// handshake takes the slot of the oldest one (which is closed).
    #[arg(long, env = "MAX_TLS_HANDSHAKES", default_value = "64", value_parser = common::config::parse::<usize>)]
    pub max_tls_handshakes: Flag<usize>,

    /// Time a proxy client has from its connect to the end of its TLS handshake.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = common::config::duration)]
    pub tls_handshake_timeout: Flag<Duration>,

    /// Time a proxy client has to send its request head.
    #[arg(long, env = "REQUEST_HEAD_TIMEOUT", default_value = "10s", value_parser = common::config::duration)]
    pub request_head_timeout: Flag<Duration>,

    /// Dials through the tunnel in flight at once; more are answered 503.
    #[arg(long, env = "MAX_PENDING_DIALS", default_value = "1024", value_parser = common::config::parse::<usize>)]
    pub max_pending_dials: Flag<usize>,

    /// DNS lookups through the tunnel in flight at once; more are answered 503.
    #[arg(long, env = "MAX_DNS_LOOKUPS", default_value = "256", value_parser = common::config::parse::<usize>)]
    pub max_dns_lookups: Flag<usize>,

    /// Entries of the flow table (one per proxied connection or DNS lookup); packets of new
    /// flows beyond it are dropped.
    #[arg(long, env = "MAX_FLOWS", default_value = "65536", value_parser = common::config::parse::<usize>)]
    pub max_flows: Flag<usize>,

    /// Warning log lines per second per reason; the rest are counted and summarised in the
    /// next line of that reason.
    #[arg(long, env = "LOG_LINES_PER_SECOND", default_value = "10", value_parser = common::config::parse::<u32>)]
    pub log_lines_per_second: Flag<u32>,

    /// File mode of the proxy's Unix socket (octal). Whoever may connect to it can reach
    /// the shoot's networks: keep it to kube-apiserver's user or group.
    #[arg(long, env = "PROXY_UDS_MODE", default_value = "0660", value_parser = common::config::file_mode)]
    pub proxy_uds_mode: Flag<u32>,

    /// Group (name or numeric id) that owns the proxy's Unix socket, e.g. kube-apiserver's
    /// group; default: the server's own group.
    #[arg(long, env = "PROXY_UDS_GROUP")]
    pub proxy_uds_group: Option<String>,

    /// Keepalive interval: a keepalive is sent into a tunnel that carried nothing for this long.
    #[arg(long, env = "KEEPALIVE", default_value = "5s", value_parser = common::config::duration)]
    pub keepalive: Flag<Duration>,

    /// A tunnel stream that received nothing for this long is closed (detects streams that
    /// silently stopped, e.g. black-holed, without waiting for TCP to time out).
    #[arg(long, env = "DEAD_PEER_TIMEOUT", default_value = "15s", value_parser = common::config::duration)]
    pub dead_peer_timeout: Flag<Duration>,

    /// On SIGTERM: time open proxied connections get to finish after the proxy listeners
    /// closed (keep it below the pod's termination grace period).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = common::config::duration)]
    pub shutdown_timeout: Flag<Duration>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub tunnel_listen: SocketAddr,
    pub proxy_listen: Option<SocketAddr>,
    pub proxy_uds: Option<PathBuf>,
    pub tls: Option<common::io::tls::ServerTlsFiles>,
    pub private_key_file: PathBuf,
    pub preshared_key_file: Option<PathBuf>,
    /// Allowed client keys (base64) with a name for logs and metrics: the file name in
    /// `--peers-dir`, else the key's first 8 characters.
    pub peers: Vec<(String, String)>,
    /// The `--peer` keys (always allowed), and the directory watched for the others.
    pub static_peers: Vec<(String, String)>,
    pub peers_dir: Option<PathBuf>,
    pub shoot_networks: CidrSet,
    pub vpn_networks: Vec<IpNet>,
    /// The TUN addresses of this replica (host index+1 of each VPN network, with its prefix).
    pub tun_addrs: Vec<IpNet>,
    pub tun_name: String,
    pub mtu: u16,
    pub tun_offload: bool,
    pub routing_table: u32,
    pub routing_rule_priority: u32,
    pub metrics_listen: Option<SocketAddr>,
    pub dial_timeout: Duration,
    /// DNS server for hostname targets (inside the shoot networks).
    pub shoot_dns_server: Option<IpAddr>,
    /// Cluster domain, lowercase, without trailing dot.
    pub shoot_cluster_domain: String,
    pub dns_timeout: Duration,
    /// Every bound and timeout that hostile input can run into.
    pub limits: Limits,
    /// Mode and group of the proxy's Unix socket.
    pub proxy_uds_mode: u32,
    pub proxy_uds_gid: Option<u32>,
    pub keepalive: Duration,
    pub dead_peer_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Host address number `n` of `net` (n = 1 is the first host address).
pub fn host_addr(net: &IpNet, n: u32) -> Option<IpNet> {
    let addr = match net.network() {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).checked_add(n)?.into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).checked_add(u128::from(n))?.into()),
    };
    if !net.contains(&addr) {
        return None;
    }
    IpNet::new(addr, net.prefix_len()).ok()
}

impl Args {
    /// Validates everything and reports all errors at once.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let tunnel_listen = self
            .tunnel_listen
            .get("tunnel-listen", &mut errs)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let server_index = self
            .server_index
            .get("server-index", &mut errs)
            .unwrap_or(0);
        let mtu = self.mtu.get("mtu", &mut errs).unwrap_or(1400);
        let tun_offload = self
            .tun_offload
            .get("tun-offload", &mut errs)
            .unwrap_or(true);
        let routing_table = self
            .routing_table
            .get("routing-table", &mut errs)
            .unwrap_or(1194);
        let routing_rule_priority = self
            .routing_rule_priority
            .get("routing-rule-priority", &mut errs)
            .unwrap_or(1194);
        let dial_timeout = self
            .dial_timeout
            .get("dial-timeout", &mut errs)
            .unwrap_or(Duration::from_secs(10));
        let shoot_dns_server = self
            .shoot_dns_server
            .as_ref()
            .and_then(|f| f.get("shoot-dns-server", &mut errs));
        let dns_timeout = self
            .dns_timeout
            .get("dns-timeout", &mut errs)
            .unwrap_or(Duration::from_secs(2));
        let d = Limits::default();
        let limits = Limits {
            pending_streams: self
                .max_pending_streams
                .get("max-pending-streams", &mut errs)
                .unwrap_or(d.pending_streams),
            preauth_timeout: self
                .preauth_timeout
                .get("preauth-timeout", &mut errs)
                .unwrap_or(d.preauth_timeout),
            handshakes_per_second: self
                .handshakes_per_second
                .get("handshakes-per-second", &mut errs)
                .unwrap_or(d.handshakes_per_second),
            peer_handshakes_per_second: self
                .peer_handshakes_per_second
                .get("peer-handshakes-per-second", &mut errs)
                .unwrap_or(d.peer_handshakes_per_second),
            frames_queued_per_tunnel: self
                .tunnel_queue_size
                .get("tunnel-queue-size", &mut errs)
                .unwrap_or(d.frames_queued_per_tunnel),
            proxy_pending: self
                .max_pending_proxy_connections
                .get("max-pending-proxy-connections", &mut errs)
                .unwrap_or(d.proxy_pending),
            proxy_tls_handshakes: self
                .max_tls_handshakes
                .get("max-tls-handshakes", &mut errs)
                .unwrap_or(d.proxy_tls_handshakes),
            proxy_tls_timeout: self
                .tls_handshake_timeout
                .get("tls-handshake-timeout", &mut errs)
                .unwrap_or(d.proxy_tls_timeout),
            proxy_head_timeout: self
                .request_head_timeout
                .get("request-head-timeout", &mut errs)
                .unwrap_or(d.proxy_head_timeout),
            max_connections: self
                .max_connections
                .get("max-connections", &mut errs)
                .unwrap_or(d.max_connections),
            pending_dials: self
                .max_pending_dials
                .get("max-pending-dials", &mut errs)
                .unwrap_or(d.pending_dials),
            dns_lookups: self
                .max_dns_lookups
                .get("max-dns-lookups", &mut errs)
                .unwrap_or(d.dns_lookups),
            max_flows: self
                .max_flows
                .get("max-flows", &mut errs)
                .unwrap_or(d.max_flows),
            log_lines_per_second: self
                .log_lines_per_second
                .get("log-lines-per-second", &mut errs)
                .unwrap_or(d.log_lines_per_second),
            tunnel_wait: self
                .tunnel_wait
                .get("tunnel-wait", &mut errs)
                .unwrap_or(d.tunnel_wait),
            // Fragments, the DNS cache and the resume window follow the documented defaults.
            ..d
        };
        let proxy_uds_mode = self
            .proxy_uds_mode
            .get("proxy-uds-mode", &mut errs)
            .unwrap_or(0o660);
        let proxy_uds_gid = self
            .proxy_uds_group
            .as_deref()
            .and_then(|g| match resolve_group(g) {
                Ok(gid) => Some(gid),
                Err(e) => {
                    errs.push(format!("--proxy-uds-group {g:?}: {e}"));
                    None
                }
            });
        let keepalive = self
            .keepalive
            .get("keepalive", &mut errs)
            .unwrap_or(Duration::from_secs(5));
        let dead_peer_timeout = self
            .dead_peer_timeout
            .get("dead-peer-timeout", &mut errs)
            .unwrap_or(Duration::from_secs(15));
        let shutdown_timeout = self
            .shutdown_timeout
            .get("shutdown-timeout", &mut errs)
            .unwrap_or(Duration::from_secs(20));
        let proxy_listen =
            common::config::listen_addr("proxy-listen", &self.proxy_listen, &mut errs);
        let metrics_listen =
            common::config::listen_addr("metrics-listen", &self.metrics_listen, &mut errs);

        let tls = match (
            &self.proxy_tls_cert,
            &self.proxy_tls_key,
            &self.proxy_client_ca,
        ) {
            (Some(c), Some(k), Some(ca)) => Some(common::io::tls::ServerTlsFiles {
                cert: c.clone(),
                key: k.clone(),
                client_ca: ca.clone(),
            }),
            (None, None, None) => None,
            _ => {
                errs.push(
                    "--proxy-tls-cert, --proxy-tls-key and --proxy-client-ca go together".into(),
                );
                None
            }
        };
        if proxy_listen.is_some() && tls.is_none() {
            errs.push("--proxy-listen needs --proxy-tls-cert, --proxy-tls-key and --proxy-client-ca (or set --proxy-listen off)".into());
        }
        if proxy_listen.is_none() && self.proxy_uds.is_none() {
            errs.push("no egress proxy listener: set --proxy-listen and/or --proxy-uds".into());
        }

        let mut shoot_networks = CidrSet::default();
        for (flag, v) in [
            ("shoot-pod-networks", &self.shoot_pod_networks),
            ("shoot-service-networks", &self.shoot_service_networks),
            ("shoot-node-networks", &self.shoot_node_networks),
        ] {
            match common::cidr::parse_list(v) {
                Ok(s) => shoot_networks.extend(s.iter().copied()),
                Err(e) => errs.push(format!("--{flag}: {e}")),
            }
        }
        if shoot_networks.is_empty() {
            errs.push("no shoot networks: set --shoot-pod-networks, --shoot-service-networks and/or --shoot-node-networks".into());
        }

        let vpn_networks = common::config::vpn_networks(&self.vpn_network, &mut errs);
        let mut tun_addrs = Vec::new();
        for net in &vpn_networks {
            match server_index.checked_add(1).and_then(|n| host_addr(net, n)) {
                Some(a) => tun_addrs.push(a),
                None => errs.push(format!(
                    "--server-index {} does not fit in VPN network {net}",
                    server_index
                )),
            }
            if shoot_networks.overlaps(net) {
                errs.push(format!("VPN network {net} overlaps the shoot networks"));
            }
        }

        let mut peers = Vec::new();
        for p in &self.peers {
            match common::keys::parse_public_key(p) {
                Ok(k) => {
                    let key = common::keys::encode_public_key(&k);
                    peers.push((key.chars().take(8).collect(), key));
                }
                Err(e) => errs.push(format!("--peer {p:?}: {e}")),
            }
        }
        let static_peers = peers.clone();
        if let Some(dir) = &self.peers_dir {
            match common::io::keyfile::load_public_keys_dir(dir) {
                Ok(keys) if keys.is_empty() => {
                    errs.push(format!("--peers-dir {}: holds no key file", dir.display()))
                }
                Ok(keys) => peers.extend(
                    keys.iter()
                        .map(|(n, k)| (n.clone(), common::keys::encode_public_key(k))),
                ),
                Err(e) => errs.push(format!("--peers-dir {}: {e}", dir.display())),
            }
        }
        let mut seen = std::collections::HashSet::new();
        peers.retain(|(_, k)| seen.insert(k.clone()));
        if self.peers.is_empty() && self.peers_dir.is_none() {
            errs.push("give the clients' public keys with --peer or --peers-dir".into());
        }
        common::config::tun(&self.tun_name, mtu, &mut errs);
        for (flag, v) in [
            ("max-connections", limits.max_connections),
            ("max-pending-streams", limits.pending_streams),
            ("max-pending-proxy-connections", limits.proxy_pending),
            ("max-tls-handshakes", limits.proxy_tls_handshakes),
            ("max-pending-dials", limits.pending_dials),
            ("max-dns-lookups", limits.dns_lookups),
            ("max-flows", limits.max_flows),
            ("log-lines-per-second", limits.log_lines_per_second as usize),
            (
                "peer-handshakes-per-second",
                limits.peer_handshakes_per_second as usize,
            ),
        ] {
            if v == 0 {
                errs.push(format!("--{flag} must be at least 1"));
            }
        }
        if limits.frames_queued_per_tunnel < 65536 + 2 {
            errs.push(format!(
                "--tunnel-queue-size {}: must hold at least one frame (64KiB)",
                limits.frames_queued_per_tunnel
            ));
        }
        for (flag, v) in [
            ("preauth-timeout", limits.preauth_timeout),
            ("tls-handshake-timeout", limits.proxy_tls_timeout),
            ("request-head-timeout", limits.proxy_head_timeout),
        ] {
            if v.is_zero() {
                errs.push(format!("--{flag} must be positive"));
            }
        }
        common::config::liveness(keepalive, dead_peer_timeout, &mut errs);
        if dial_timeout.is_zero() {
            errs.push("--dial-timeout must be positive".into());
        }
        if let Some(ip) = shoot_dns_server {
            if !shoot_networks.is_empty() && !shoot_networks.contains(ip) {
                errs.push(format!(
                    "--shoot-dns-server {ip}: not in the shoot networks (it is reached through the tunnel)"
                ));
            }
        }
        let shoot_cluster_domain = match common::dns::check_name(&self.shoot_cluster_domain) {
            Ok(d) => d.to_ascii_lowercase(),
            Err(e) => {
                errs.push(format!(
                    "--shoot-cluster-domain {:?}: {e}",
                    self.shoot_cluster_domain
                ));
                String::new()
            }
        };
        if dns_timeout.is_zero() {
            errs.push("--dns-timeout must be positive".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Config {
            tunnel_listen,
            proxy_listen,
            proxy_uds: self.proxy_uds,
            tls,
            private_key_file: self.private_key_file,
            preshared_key_file: self.preshared_key_file,
            peers,
            static_peers,
            peers_dir: self.peers_dir,
            shoot_networks,
            vpn_networks,
            tun_addrs,
            tun_name: self.tun_name,
            mtu,
            tun_offload,
            routing_table,
            routing_rule_priority,
            metrics_listen,
            dial_timeout,
            shoot_dns_server,
            shoot_cluster_domain,
            dns_timeout,
            limits,
            proxy_uds_mode,
            proxy_uds_gid,
            keepalive,
            dead_peer_timeout,
            shutdown_timeout,
        })
    }
}

/// A group's id: numeric, or looked up by name in `/etc/group`.
fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(gid) = g.trim().parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == g.trim())
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| "no such group (give a numeric id)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses() {
        let n: IpNet = "192.168.123.0/24".parse().unwrap();
        assert_eq!(host_addr(&n, 1).unwrap().to_string(), "192.168.123.1/24");
        assert!(host_addr(&n, 256).is_none());
        let n6: IpNet = "fd8f:6d53:b97a:1::/96".parse().unwrap();
        assert_eq!(
            host_addr(&n6, 2).unwrap().to_string(),
            "fd8f:6d53:b97a:1::2/96"
        );
    }

    #[test]
    fn reports_all_errors_at_once() {
        let args = Args::try_parse_from([
            "vpn-seed-server",
            "--private-key-file",
            "/k",
            "--peer",
            "bogus",
            "--mtu",
            "100",
            "--shoot-pod-networks",
            "10.0.0.0/33",
        ])
        .unwrap();
        let errs = args.validate().unwrap_err();
        let all = errs.join("\n");
        assert!(all.contains("--peer"), "{all}");
        assert!(all.contains("--mtu 100"), "{all}");
        assert!(all.contains("shoot-pod-networks"), "{all}");
        assert!(all.contains("--proxy-listen needs"), "{all}");
    }

    fn dns_args(extra: &[&str]) -> Result<Config, Vec<String>> {
        let mut a = vec![
            "vpn-seed-server",
            "--private-key-file",
            "/k",
            "--peer",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "--proxy-listen",
            "off",
            "--proxy-uds",
            "/p.sock",
            "--shoot-pod-networks",
            "100.96.0.0/16",
            "--shoot-service-networks",
            "100.64.0.0/13",
        ];
        a.extend_from_slice(extra);
        Args::try_parse_from(a).unwrap().validate()
    }

    #[test]
    fn limits_and_socket_settings() {
        let c = dns_args(&[]).unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!((c.proxy_uds_mode, c.proxy_uds_gid), (0o660, None));
        let c = dns_args(&[
            "--max-pending-streams",
            "10",
            "--preauth-timeout",
            "500ms",
            "--handshakes-per-second",
            "7",
            "--tunnel-queue-size",
            "1MiB",
            "--max-tls-handshakes",
            "3",
            "--proxy-uds-mode",
            "0600",
            "--proxy-uds-group",
            "4242",
            "--tunnel-wait",
            "0s",
        ])
        .unwrap();
        assert_eq!(
            c.limits.tunnel_wait,
            Duration::ZERO,
            "0 answers 503 at once"
        );
        assert_eq!(c.limits.pending_streams, 10);
        assert_eq!(c.limits.preauth_timeout, Duration::from_millis(500));
        assert_eq!(c.limits.handshakes_per_second, 7);
        assert_eq!(c.limits.frames_queued_per_tunnel, 1 << 20);
        assert_eq!(c.limits.proxy_tls_handshakes, 3);
        assert_eq!((c.proxy_uds_mode, c.proxy_uds_gid), (0o600, Some(4242)));
        let all = dns_args(&[
            "--max-pending-streams",
            "0",
            "--preauth-timeout",
            "0s",
            "--tunnel-queue-size",
            "1KiB",
            "--proxy-uds-mode",
            "999",
            "--proxy-uds-group",
            "no-such-group-here",
            "--max-flows=-1",
        ])
        .unwrap_err()
        .join("\n");
        for want in [
            "--max-pending-streams must be at least 1",
            "--preauth-timeout must be positive",
            "--tunnel-queue-size 1024",
            "--proxy-uds-mode \"999\"",
            "--proxy-uds-group \"no-such-group-here\"",
            "--max-flows \"-1\"",
        ] {
            assert!(all.contains(want), "{want} missing in:\n{all}");
        }
    }

    #[test]
    fn dns_settings() {
        let c = dns_args(&[]).unwrap();
        assert_eq!(c.shoot_dns_server, None);
        assert_eq!(c.shoot_cluster_domain, "cluster.local");
        assert_eq!(c.dns_timeout, Duration::from_secs(2));
        let c = dns_args(&[
            "--shoot-dns-server",
            "100.64.0.10",
            "--shoot-cluster-domain",
            "Example.Org.",
            "--dns-timeout",
            "500ms",
        ])
        .unwrap();
        assert_eq!(c.shoot_dns_server, Some("100.64.0.10".parse().unwrap()));
        assert_eq!(c.shoot_cluster_domain, "example.org");
        assert_eq!(c.dns_timeout, Duration::from_millis(500));
        let all = dns_args(&[
            "--shoot-dns-server",
            "10.0.0.10",
            "--shoot-cluster-domain",
            "a..b",
            "--dns-timeout",
            "0s",
        ])
        .unwrap_err()
        .join("\n");
        assert!(
            all.contains("--shoot-dns-server 10.0.0.10: not in the shoot networks"),
            "{all}"
        );
        assert!(all.contains("--shoot-cluster-domain"), "{all}");
        assert!(all.contains("--dns-timeout must be positive"), "{all}");
    }
}
