//! The lab topology shared by the e2e, HA, hostile, soak and chaos tests, the benchmark and
//! the lab tool: `seeds` seed server replicas and `clients` shoot client replicas behind one
//! ingress, in network namespaces, with the real binaries.
//!
//! ```text
//!  seed    192.168.77.1 ─┐          gw                 ┌─ shoot   10.250.0.2 ─┐ 100.96.1.1
//!  (seed0) fd00:77::1    ├─ .77.2   ingress :8132 ─────┤  (shoota)            ├─ pod 100.96.1.10
//!  seed1   192.168.78.1 ─┘  .78.2   10.250.0.1         └─ shootb  10.250.0.3 ─┘     fd00:96:0:1::10
//!   vpn-seed-server i               (routes by header)     vpn-shoot-client   100.96.1.2
//! ```
//! One replica of each ([`LabOptions::default`]) is the plain `seed | gw | shoot | pod` chain
//! of veth pairs; with more clients, gw and the pod join their shoots through a bridge each.
//! Addresses do not depend on the counts: seed `i` is `192.168.(77+i).1`, client `i` is
//! `10.250.0.(2+i)` towards gw and `100.96.1.(1+i)` towards the pod (what the pod sees, the
//! clients masquerade), and the pod's default route goes via client 0. The seeds have no
//! route to the pod network and gw does not forward: the only way from a seed to the pod is a
//! tunnel. All servers share one key pair and allow every client key; every client dials
//! every server (header value `vpn-seed-server` for one replica, `vpn-seed-server-<i>` for
//! more, as Gardener names them). Optional extras: `local` (a seed-side network overlapping
//! the pod network, 100.96.1.0/24 between seed 0 and `local`) and `shoot2` (a second shoot
//! behind gw, 10.250.1.0/24). Processes are stopped before the namespaces are deleted; on
//! panic every process log is printed first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::client::{connect_uds, http_get};
use crate::env::try_bin;
use crate::load::{ask_whoami, client_of, Held};
use crate::netns::{self, unique_prefix, veth, Netns};
use crate::pki::{write_secret, Pki};
use crate::proc::{wait_running, Proc, Procs};
use crate::prom::{http_text, metric};
use crate::tmp::TempDir;
use crate::wait::{http_status, is_listening};

/// Seed server 0's tunnel listener (in its seed namespace); see [`seed_tunnel`].
pub const SEED_TUNNEL: &str = "192.168.77.1:1194";
/// Every seed server's mTLS proxy listener (in its own seed namespace).
pub const PROXY_TCP: &str = "127.0.0.1:9443";
/// Every seed server's metrics/health listener (in its own seed namespace).
pub const SEED_METRICS: &str = "127.0.0.1:15000";
/// Every shoot client's metrics/health listener (in its own shoot namespace).
pub const CLIENT_METRICS: &str = "127.0.0.1:15001";
/// Ingress stand-in listener (in `gw`), legacy reversed-VPN port.
pub const INGRESS: &str = "10.250.0.1:8132";
/// Ingress stand-in listener with [`LabOptions::unified_port`]: Gardener's unified HTTP
/// proxy port.
pub const INGRESS_UNIFIED: &str = "10.250.0.1:8443";
/// Routing header of Gardener's unified proxy port.
pub const UNIFIED_HEADER: &str = "X-Gardener-Destination";
/// The shoot's control-plane namespace in the seed (in unified-port header values).
pub const SHOOT_NAMESPACE: &str = "shoot--lab--vpn";
/// Routing header value that selects the seed server at the ingress (one replica).
pub const ROUTE_VALUE: &str = "vpn-seed-server";
/// The pod's addresses.
pub const POD_V4: &str = "100.96.1.10";
/// The pod's IPv6 address.
pub const POD_V6: &str = "fd00:96:0:1::10";
/// The pod server's port (also used by the seed-local server).
pub const POD_PORT: u16 = 8080;
/// The pod's IPv4 CONNECT target.
pub const POD_TARGET: &str = "100.96.1.10:8080";
/// The pod's IPv6 CONNECT target.
pub const POD_TARGET_V6: &str = "[fd00:96:0:1::10]:8080";
/// Body of the pod's `index.html`.
pub const POD_INDEX: &str = "hello from pod\n";
/// Body of the seed-local server's `index.html`.
pub const LOCAL_INDEX: &str = "hello from seed-local\n";
/// Size of `big.bin`.
pub const BIG_SIZE: usize = 64 << 20;
/// Shoot networks given to the seed server.
pub const POD_NETWORKS: &str = "100.96.0.0/16,fd00:96::/48";
/// Shoot service network.
pub const SERVICE_NETWORKS: &str = "100.64.0.0/13";
/// Shoot node network.
pub const NODE_NETWORKS: &str = "10.250.0.0/16";
/// VPN transfer network.
pub const VPN_NETWORK: &str = "192.168.123.0/24,fd8f:6d53:b97a:1::/96";
/// Most seed server replicas and most shoot client replicas a lab holds.
pub const MAX_REPLICAS: usize = 4;
/// Short names of the clients when there are several (namespaces `shoota`, `shootb`, …).
pub const CLIENT_LETTERS: [&str; MAX_REPLICAS] = ["a", "b", "c", "d"];
/// Read/write timeout of one CONNECT + request made by the helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// nftables table [`Lab::blackhole`] adds in a shoot namespace.
pub const BLACKHOLE_TABLE: &str = "lab_blackhole";

/// Readiness deadline for a starting component.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Seed server `i`'s tunnel listener.
pub fn seed_tunnel(i: usize) -> String {
    format!("192.168.{}.1:1194", 77 + i)
}

/// Client `i`'s IPv4 address towards the pod: what the pod sees after masquerade.
pub fn client_lan_v4(i: usize) -> String {
    format!("100.96.1.{}", 1 + i)
}

/// Client `i`'s IPv6 address towards the pod.
pub fn client_lan_v6(i: usize) -> String {
    format!("fd00:96:0:1::{}", 1 + i)
}

/// The shape of the lab and the options of its VPN processes.
#[derive(Debug, Clone, Copy)]
pub struct LabOptions {
    /// Seed server replicas (1 to [`MAX_REPLICAS`]).
    pub seeds: usize,
    /// Shoot client replicas (1 to [`MAX_REPLICAS`]), each with its own key.
    pub clients: usize,
    /// Add namespace `local` on a seed network that overlaps the pod network.
    pub seed_local: bool,
    /// Add namespace `shoot2`, a second shoot behind gw.
    pub second_shoot: bool,
    /// Put a 64 MiB random `big.bin` into the pod server's directory.
    pub big_file: bool,
    /// `--keepalive` for every server and client (product default when `None`).
    pub keepalive: Option<&'static str>,
    /// `--dead-peer-timeout` for every server and client (product default when `None`).
    pub dead_peer_timeout: Option<&'static str>,
    /// Give the servers the client keys as `--peers-dir` instead of `--peer`.
    pub peers_dir: bool,
    /// Route through Gardener's unified proxy port: the ingress listens on 8443 and routes by
    /// `X-Gardener-Destination: outbound|1194||vpn-seed-server[-<i>].<namespace>.svc.cluster.local`.
    pub unified_port: bool,
}

impl Default for LabOptions {
    /// One seed server, one shoot client, no extras, product defaults.
    fn default() -> Self {
        Self {
            seeds: 1,
            clients: 1,
            seed_local: false,
            second_shoot: false,
            big_file: false,
            keepalive: None,
            dead_peer_timeout: None,
            peers_dir: false,
            unified_port: false,
        }
    }
}

impl LabOptions {
    /// The high-availability shape: two seed servers and two shoot clients.
    pub fn ha() -> Self {
        Self {
            seeds: 2,
            clients: 2,
            ..Self::default()
        }
    }
}

/// A WireGuard key pair on disk.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// Private key file (mode 0600).
    pub private_file: PathBuf,
    /// Public key, base64.
    pub public: String,
}

/// The topology: namespaces, keys, files and processes. Processes are stopped before the
/// namespaces are deleted; on panic every process log is printed first.
#[derive(Debug)]
pub struct Lab {
    /// Name prefix of everything this lab created.
    pub prefix: String,
    procs: Procs,
    /// Seed (control plane) namespaces, one per seed server.
    pub seeds: Vec<Netns>,
    /// Ingress gateway namespace.
    pub gw: Netns,
    /// Shoot node namespaces, one per shoot client.
    pub shoots: Vec<Netns>,
    /// Pod namespace.
    pub pod: Netns,
    /// Seed-side network overlapping the pod network ([`LabOptions::seed_local`]).
    pub local: Option<Netns>,
    /// Second shoot ([`LabOptions::second_shoot`]).
    pub shoot2: Option<Netns>,
    /// Test PKI.
    pub pki: Pki,
    /// The key pair every seed server uses.
    pub server_key: KeyPair,
    /// Key pairs of the clients.
    pub client_keys: Vec<KeyPair>,
    /// `big.bin` path and sha256 hex ([`LabOptions::big_file`]).
    pub big: Option<(PathBuf, String)>,
    /// Shape and process options.
    pub opts: LabOptions,
    dir: TempDir,
}

fn ns(prefix: &str, role: &str) -> Result<Netns> {
    Netns::create(&format!("{prefix}-{role}"))
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl Lab {
    /// Builds the network part of the topology with a fresh unique prefix.
    pub fn new(opts: LabOptions) -> Result<Self> {
        Self::with_prefix(&unique_prefix(), opts)
    }

    /// Builds the network part of the topology: namespaces, links, addresses, routes, PKI,
    /// keys, the pod's web root. Checks that no seed reaches the pod. Starts no process.
    pub fn with_prefix(prefix: &str, opts: LabOptions) -> Result<Self> {
        ensure!(
            (1..=MAX_REPLICAS).contains(&opts.seeds) && (1..=MAX_REPLICAS).contains(&opts.clients),
            "a lab holds 1 to {MAX_REPLICAS} seed servers and shoot clients"
        );
        let dir = TempDir::new(prefix)?;
        let seeds = (0..opts.seeds)
            .map(|i| ns(prefix, &Self::seed_role(opts.seeds, i)))
            .collect::<Result<Vec<_>>>()?;
        let gw = ns(prefix, "gw")?;
        let shoots = (0..opts.clients)
            .map(|i| ns(prefix, &Self::shoot_role(opts.clients, i)))
            .collect::<Result<Vec<_>>>()?;
        let pod = ns(prefix, "pod")?;
        let local = if opts.seed_local {
            Some(ns(prefix, "local")?)
        } else {
            None
        };
        let shoot2 = if opts.second_shoot {
            Some(ns(prefix, "shoot2")?)
        } else {
            None
        };

        for (i, seed) in seeds.iter().enumerate() {
            let gw_if = format!("seed{i}");
            veth(seed, "gw0", &gw, &gw_if)?;
            seed.addr("gw0", &format!("192.168.{}.1/24", 77 + i))?;
            seed.addr("gw0", &format!("fd00:{}::1/64", 77 + i))?;
            gw.addr(&gw_if, &format!("192.168.{}.2/24", 77 + i))?;
            gw.addr(&gw_if, &format!("fd00:{}::2/64", 77 + i))?;
        }
        gw.sysctl("net.ipv4.ip_forward", "0")?;
        gw.sysctl("net.ipv6.conf.all.forwarding", "0")?;

        // One client: direct veth pairs (the benchmark's product path has no bridge in it).
        // More: gw and the pod each bridge their ports to the shoots.
        let bridged = opts.clients > 1;
        let (gw_lan, pod_lan) = if bridged {
            for n in [&gw, &pod] {
                n.ip(&["link", "add", "br0", "type", "bridge", "forward_delay", "0"])?;
            }
            ("br0", "br0")
        } else {
            ("shoot0", "shoot0")
        };
        for (i, shoot) in shoots.iter().enumerate() {
            let port = if bridged {
                format!("shoot{}", CLIENT_LETTERS[i])
            } else {
                "shoot0".to_owned()
            };
            veth(&gw, &port, shoot, "gw0")?;
            veth(&pod, &port, shoot, "pod0")?;
            if bridged {
                gw.ip(&["link", "set", &port, "master", "br0"])?;
                pod.ip(&["link", "set", &port, "master", "br0"])?;
            }
            shoot.addr("gw0", &format!("10.250.0.{}/24", i + 2))?;
            shoot.addr("pod0", &format!("{}/24", client_lan_v4(i)))?;
            shoot.addr("pod0", &format!("{}/64", client_lan_v6(i)))?;
        }
        gw.addr(gw_lan, "10.250.0.1/24")?;
        pod.addr(pod_lan, &format!("{POD_V4}/24"))?;
        pod.addr(pod_lan, &format!("{POD_V6}/64"))?;
        pod.ip(&["route", "add", "default", "via", &client_lan_v4(0)])?;
        pod.ip(&["-6", "route", "add", "default", "via", &client_lan_v6(0)])?;

        if let Some(s2) = &shoot2 {
            veth(&gw, "shoot2", s2, "gw0")?;
            gw.addr("shoot2", "10.250.1.1/24")?;
            s2.addr("gw0", "10.250.1.2/24")?;
            s2.ip(&["route", "add", "10.250.0.0/24", "via", "10.250.1.1"])?;
        }

        let pki = Pki::generate(dir.path())?;
        let server_key = gen_key(dir.path(), "seed")?;
        let client_keys = (0..opts.clients)
            .map(|i| gen_key(dir.path(), &Self::shoot_role(opts.clients, i)))
            .collect::<Result<Vec<_>>>()?;
        if opts.peers_dir {
            let peers = dir.path().join("peers");
            std::fs::create_dir(&peers)?;
            for (i, k) in client_keys.iter().enumerate() {
                let file = peers.join(Self::shoot_role(opts.clients, i));
                std::fs::write(file, format!("{}\n", k.public))?;
            }
        }
        let www = dir.path().join("pod-www");
        std::fs::create_dir(&www)?;
        std::fs::write(www.join("index.html"), POD_INDEX)?;

        let mut lab = Self {
            prefix: prefix.to_owned(),
            procs: Procs::new(dir.path()),
            seeds,
            gw,
            shoots,
            pod,
            local,
            shoot2,
            pki,
            server_key,
            client_keys,
            big: None,
            opts,
            dir,
        };
        lab.assert_seeds_isolated()?;
        if let Some(local) = &lab.local {
            // Added after the isolation check: this route overlaps the pod network on purpose.
            veth(&lab.seeds[0], "local0", local, "seed0")?;
            lab.seeds[0].addr("local0", "100.96.1.1/24")?;
            local.addr("seed0", "100.96.1.10/24")?;
            let lw = lab.dir.path().join("local-www");
            std::fs::create_dir(&lw)?;
            std::fs::write(lw.join("index.html"), LOCAL_INDEX)?;
        }
        if opts.big_file {
            let path = www.join("big.bin");
            let sum = write_random_file(&path, BIG_SIZE)?;
            lab.big = Some((path, sum));
        }
        Ok(lab)
    }

    fn seed_role(seeds: usize, i: usize) -> String {
        if seeds == 1 {
            "seed".to_owned()
        } else {
            format!("seed{i}")
        }
    }

    fn shoot_role(clients: usize, i: usize) -> String {
        if clients == 1 {
            "shoot".to_owned()
        } else {
            format!("shoot{}", CLIENT_LETTERS[i % MAX_REPLICAS])
        }
    }

    /// Builds the topology, starts the pod server, the ingress, every seed server and every
    /// shoot client (and the seed-local server with that option), and waits until every
    /// tunnel is up.
    pub fn up(opts: LabOptions) -> Result<Self> {
        let mut lab = Self::new(opts)?;
        lab.start_pod_server()?;
        if opts.seed_local {
            lab.start_local_server()?;
        }
        lab.start_ingress()?;
        for i in 0..opts.seeds {
            lab.start_server(i)?;
        }
        for i in 0..opts.clients {
            lab.start_client(i)?;
        }
        lab.wait_all_up(START_TIMEOUT)?;
        Ok(lab)
    }

    /// Starts everything like [`Lab::up`] (one server), plus a DNS responder in the pod
    /// (`dnsserver` on `POD_V4:53` answering `records`, each `name=ip`) that the seed server
    /// uses as the shoot's DNS server (`--dns-timeout 1s`).
    pub fn up_with_dns(opts: LabOptions, records: &[String]) -> Result<Self> {
        let mut lab = Self::new(opts)?;
        lab.start_pod_server()?;
        let mut args = vec!["--listen".to_string(), format!("{POD_V4}:53")];
        for r in records {
            args.extend(["--record".to_string(), r.clone()]);
        }
        let pod_ns = lab.pod.name().to_owned();
        lab.spawn_in("dnsserver", &pod_ns, &try_bin("dnsserver")?, &args)?;
        lab.wait_proc("dnsserver", START_TIMEOUT, "the DNS responder", |l| {
            l.proc("dnsserver")
                .is_some_and(|p| p.log().contains("listening"))
        })?;
        lab.start_ingress()?;
        let mut args = lab.server_args(0);
        args.extend(["--shoot-dns-server", POD_V4, "--dns-timeout", "1s"].map(String::from));
        lab.start_server_with(0, &args)?;
        for i in 0..opts.clients {
            lab.start_client(i)?;
        }
        lab.wait_all_up(START_TIMEOUT)?;
        Ok(lab)
    }

    /// Fails unless TCP connects from every seed to the pod (v4 and v6) fail.
    pub fn assert_seeds_isolated(&self) -> Result<()> {
        for seed in &self.seeds {
            for target in [POD_TARGET, POD_TARGET_V6] {
                let sa: SocketAddr = target.parse()?;
                let res = seed.in_ns(|| TcpStream::connect_timeout(&sa, Duration::from_secs(1)))?;
                if res.is_ok() {
                    bail!(
                        "isolation broken: {} reaches {sa} without a tunnel",
                        seed.name()
                    );
                }
            }
        }
        Ok(())
    }

    /// The lab's temporary directory (logs, PKI, keys, sockets, web roots).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of seed server `i`'s UDS proxy listener.
    pub fn uds(&self, i: usize) -> PathBuf {
        self.dir().join(format!("proxy{i}.sock"))
    }

    /// Seed server 0's and client 0's key pairs.
    pub fn keys(&self) -> (KeyPair, KeyPair) {
        (self.server_key.clone(), self.client_keys[0].clone())
    }

    /// Generates a key pair `<dir>/<name>.key` with the shoot client's subcommands.
    pub fn gen_key(&self, name: &str) -> Result<KeyPair> {
        gen_key(self.dir(), name)
    }

    /// Name of seed server `i`'s process (`seed-server`, or `seed-server-<i>` with several).
    pub fn server_name(&self, i: usize) -> String {
        if self.opts.seeds == 1 {
            "seed-server".to_owned()
        } else {
            format!("seed-server-{i}")
        }
    }

    /// Name of client `i`'s process (`shoot-client`, or `shoot-client-a`, … with several).
    pub fn client_name(&self, i: usize) -> String {
        if self.opts.clients == 1 {
            "shoot-client".to_owned()
        } else {
            format!("shoot-client-{}", CLIENT_LETTERS[i % MAX_REPLICAS])
        }
    }

    /// The seed server `i`'s name (a Service name in Gardener): `vpn-seed-server`, or
    /// `vpn-seed-server-<i>` with several.
    pub fn server_service(&self, i: usize) -> String {
        if self.opts.seeds == 1 {
            ROUTE_VALUE.to_owned()
        } else {
            format!("{ROUTE_VALUE}-{i}")
        }
    }

    /// The routing header value that selects seed server `i` at the ingress.
    pub fn route_value(&self, i: usize) -> String {
        let service = self.server_service(i);
        if self.opts.unified_port {
            format!("outbound|1194||{service}.{SHOOT_NAMESPACE}.svc.cluster.local")
        } else {
            service
        }
    }

    /// The routing header's name.
    pub fn route_header(&self) -> &'static str {
        if self.opts.unified_port {
            UNIFIED_HEADER
        } else {
            "Reversed-VPN"
        }
    }

    /// The ingress stand-in's listener.
    pub fn ingress(&self) -> &'static str {
        if self.opts.unified_port {
            INGRESS_UNIFIED
        } else {
            INGRESS
        }
    }

    /// The running process `name`.
    pub fn proc(&self, name: &str) -> Option<&Proc> {
        self.procs.get(name)
    }

    /// The running process `name`, mutably.
    pub fn proc_mut(&mut self, name: &str) -> Option<&mut Proc> {
        self.procs.get_mut(name)
    }

    /// Names and PIDs of all processes.
    pub fn procs(&self) -> impl Iterator<Item = (&str, u32)> {
        self.procs.iter().map(|p| (p.name(), p.pid()))
    }

    /// Stops process `name` (SIGTERM, then SIGKILL) and forgets it; nothing if unknown.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        self.procs.remove(name)
    }

    /// SIGKILLs process `name` (no cleanup, like a crashed pod); its log stays available.
    pub fn kill9(&mut self, name: &str) -> Result<()> {
        self.procs.kill9(name)
    }

    /// Waits for `cond`, failing early (with the log) if process `name` exits meanwhile.
    pub fn wait_proc(
        &mut self,
        name: &str,
        timeout: Duration,
        what: &str,
        cond: impl FnMut(&Self) -> bool,
    ) -> Result<Duration> {
        wait_running(self, |l| &mut l.procs, Some(name), timeout, what, cond)
    }

    /// Waits for `cond`, failing early (with its log) when any process exits meanwhile.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        cond: impl FnMut(&Self) -> bool,
    ) -> Result<Duration> {
        wait_running(self, |l| &mut l.procs, None, timeout, what, cond)
    }

    /// Starts the pod's HTTP server on `[::]:8080` and waits until it listens.
    pub fn start_pod_server(&mut self) -> Result<Duration> {
        let bin = try_bin("podserver")?;
        let args = pod_server_args(&self.dir().join("pod-www"));
        let ns_name = self.pod.name().to_owned();
        self.spawn_in("podserver", &ns_name, &bin, &args)?;
        let addr: SocketAddr = format!("[::]:{POD_PORT}").parse()?;
        self.wait_proc(
            "podserver",
            START_TIMEOUT,
            "the pod server to listen",
            |l| is_listening(&l.pod, addr),
        )
    }

    /// Starts the seed-local HTTP server in `local` (needs [`LabOptions::seed_local`]).
    pub fn start_local_server(&mut self) -> Result<Duration> {
        let Some(local) = &self.local else {
            bail!("lab built without seed_local");
        };
        let ns_name = local.name().to_owned();
        let bin = try_bin("podserver")?;
        let args = pod_server_args(&self.dir().join("local-www"));
        self.spawn_in("localserver", &ns_name, &bin, &args)?;
        let addr: SocketAddr = format!("[::]:{POD_PORT}").parse()?;
        self.wait_proc(
            "localserver",
            START_TIMEOUT,
            "the seed-local server to listen",
            |l| l.local.as_ref().is_some_and(|n| is_listening(n, addr)),
        )
    }

    /// Arguments of the ingress stand-in: a route per seed server.
    pub fn ingress_args(&self) -> Vec<String> {
        let mut a = strings(&[
            "--listen",
            self.ingress(),
            "--header-name",
            self.route_header(),
        ]);
        for i in 0..self.opts.seeds {
            a.push("--route".into());
            a.push(format!("{}={}", self.route_value(i), seed_tunnel(i)));
        }
        a
    }

    /// Starts the ingress stand-in in `gw` and waits until it listens.
    pub fn start_ingress(&mut self) -> Result<Duration> {
        let bin = try_bin("ingress-standin")?;
        let args = self.ingress_args();
        let ns_name = self.gw.name().to_owned();
        self.spawn_in("ingress", &ns_name, &bin, &args)?;
        let addr: SocketAddr = self.ingress().parse()?;
        self.wait_proc("ingress", START_TIMEOUT, "the ingress to listen", |l| {
            is_listening(&l.gw, addr)
        })
    }

    /// Kills the ingress with SIGKILL (no cleanup, like a crashed pod).
    pub fn kill_ingress(&mut self) -> Result<()> {
        self.kill9("ingress")
    }

    fn liveness_args(&self, a: &mut Vec<String>) {
        if let Some(k) = self.opts.keepalive {
            a.extend(["--keepalive".into(), k.to_owned()]);
        }
        if let Some(d) = self.opts.dead_peer_timeout {
            a.extend(["--dead-peer-timeout".into(), d.to_owned()]);
        }
    }

    /// Seed server `i`'s arguments per the CLI contract, allowing every client of the lab.
    pub fn server_args(&self, i: usize) -> Vec<String> {
        let mut a = self.server_args_base(i);
        if self.opts.peers_dir {
            a.push("--peers-dir".into());
            a.push(self.dir().join("peers").display().to_string());
        } else {
            for k in &self.client_keys {
                a.push("--peer".into());
                a.push(k.public.clone());
            }
        }
        a
    }

    /// Seed server `i`'s arguments allowing exactly the keys in `peers`.
    pub fn server_args_with(&self, i: usize, peers: &[String]) -> Vec<String> {
        let mut a = self.server_args_base(i);
        for peer in peers {
            a.push("--peer".into());
            a.push(peer.clone());
        }
        a
    }

    fn server_args_base(&self, i: usize) -> Vec<String> {
        let p = &self.pki;
        let mut a = strings(&[
            "--tunnel-listen",
            &seed_tunnel(i),
            "--proxy-listen",
            PROXY_TCP,
            "--proxy-tls-cert",
            &p.server_cert.display().to_string(),
            "--proxy-tls-key",
            &p.server_key.display().to_string(),
            "--proxy-client-ca",
            &p.ca.display().to_string(),
            "--proxy-uds",
            &self.uds(i).display().to_string(),
            "--private-key-file",
            &self.server_key.private_file.display().to_string(),
            "--shoot-pod-networks",
            POD_NETWORKS,
            "--shoot-service-networks",
            SERVICE_NETWORKS,
            "--shoot-node-networks",
            NODE_NETWORKS,
            "--vpn-network",
            VPN_NETWORK,
            "--server-index",
            &i.to_string(),
            "--tun-name",
            "tun0",
            "--metrics-listen",
            SEED_METRICS,
            "--dial-timeout",
            "2s",
            "--log-format",
            "text",
        ]);
        self.liveness_args(&mut a);
        a
    }

    /// Starts seed server `i` with [`Lab::server_args`] and waits for it.
    pub fn start_server(&mut self, i: usize) -> Result<Duration> {
        let args = self.server_args(i);
        self.start_server_with(i, &args)
    }

    /// Starts seed server `i` with explicit arguments and waits for its `/healthz`, its
    /// tunnel and TLS listeners and its UDS.
    pub fn start_server_with(&mut self, i: usize, args: &[String]) -> Result<Duration> {
        let seed = self.seeds.get(i).context("no such seed")?;
        let ns_name = seed.name().to_owned();
        let name = self.server_name(i);
        self.spawn_in(&name, &ns_name, &try_bin("vpn-seed-server")?, args)?;
        let health = format!("http://{SEED_METRICS}/healthz");
        let tunnel: SocketAddr = seed_tunnel(i).parse()?;
        let proxy: SocketAddr = PROXY_TCP.parse()?;
        let uds = self.uds(i);
        self.wait_proc(
            &name,
            START_TIMEOUT,
            &format!("{name} to be healthy"),
            |l| {
                let seed = &l.seeds[i];
                http_status(seed, &health) == Some(200)
                    && is_listening(seed, tunnel)
                    && is_listening(seed, proxy)
                    && uds.exists()
            },
        )
    }

    /// A shoot client's arguments with the private key `private_key_file`: one tunnel to
    /// every seed server through the ingress.
    pub fn client_args_for(&self, private_key_file: &Path) -> Vec<String> {
        let mut a = strings(&[
            "--endpoint",
            self.ingress(),
            "--connect-target",
            "vpn-seed-server:1194",
            "--header-name",
            self.route_header(),
        ]);
        for i in 0..self.opts.seeds {
            a.push("--header-value".into());
            a.push(self.route_value(i));
        }
        a.extend(strings(&[
            "--private-key-file",
            &private_key_file.display().to_string(),
            "--server-public-key",
            &self.server_key.public,
            "--vpn-network",
            VPN_NETWORK,
            "--tun-name",
            "tun0",
            "--metrics-listen",
            CLIENT_METRICS,
            "--dial-timeout",
            "2s",
            "--ready-when",
            "all",
        ]));
        self.liveness_args(&mut a);
        a
    }

    /// Client `i`'s arguments (its own key).
    pub fn client_args(&self, i: usize) -> Vec<String> {
        self.client_args_for(&self.client_keys[i % self.client_keys.len()].private_file)
    }

    /// Starts client `i` in its shoot namespace and waits for its `/healthz`.
    pub fn start_client(&mut self, i: usize) -> Result<Duration> {
        let args = self.client_args(i);
        let ns_name = self
            .shoots
            .get(i)
            .context("no such shoot")?
            .name()
            .to_owned();
        self.start_client_in(&self.client_name(i), &ns_name, &args)
    }

    /// Starts a shoot client named `name` in namespace `ns_name` and waits for its `/healthz`.
    pub fn start_client_in(
        &mut self,
        name: &str,
        ns_name: &str,
        args: &[String],
    ) -> Result<Duration> {
        let bin = try_bin("vpn-shoot-client")?;
        self.spawn_in(name, ns_name, &bin, args)?;
        let health = format!("http://{CLIENT_METRICS}/healthz");
        let ns_name = ns_name.to_owned();
        self.wait_proc(name, START_TIMEOUT, &format!("{name} to be healthy"), |l| {
            l.ns_by_name(&ns_name)
                .is_some_and(|n| http_status(n, &health) == Some(200))
        })
    }

    /// Seed server `i`'s `vpn_seed_tunnels_up`, `None` if it does not answer.
    pub fn tunnels_up(&self, i: usize) -> Option<u64> {
        let text = http_text(
            self.seeds.get(i)?,
            &format!("http://{SEED_METRICS}/metrics"),
        )?;
        metric(&text, "vpn_seed_tunnels_up").map(|v| v as u64)
    }

    /// Client `client`'s `vpn_shoot_tunnel_up` for seed server `server`.
    pub fn client_tunnel_up(&self, client: usize, server: usize) -> Option<bool> {
        let url = format!("http://{CLIENT_METRICS}/metrics");
        let text = http_text(self.shoots.get(client)?, &url)?;
        let name = format!(
            "vpn_shoot_tunnel_up{{server=\"{}\"}}",
            self.route_value(server)
        );
        metric(&text, &name).map(|v| v == 1.0)
    }

    /// Whether client `i`'s `/readyz` answers 200 (every tunnel of it up).
    pub fn client_ready(&self, i: usize) -> bool {
        self.shoots.get(i).is_some_and(|n| {
            http_status(n, &format!("http://{CLIENT_METRICS}/readyz")) == Some(200)
        })
    }

    /// Whether seed server `i`'s `/readyz` answers 200.
    pub fn server_ready(&self, i: usize) -> bool {
        self.seeds
            .get(i)
            .is_some_and(|n| http_status(n, &format!("http://{SEED_METRICS}/readyz")) == Some(200))
    }

    /// Every tunnel up: every client ready and every server counting at least one tunnel
    /// per client (and ready).
    pub fn all_up(&self) -> bool {
        let n = self.opts.clients as u64;
        (0..self.opts.clients).all(|i| self.client_ready(i))
            && (0..self.opts.seeds)
                .all(|i| self.server_ready(i) && self.tunnels_up(i).is_some_and(|t| t >= n))
    }

    /// Waits for [`Lab::all_up`].
    pub fn wait_all_up(&mut self, timeout: Duration) -> Result<Duration> {
        let what = format!(
            "all {} tunnels to be up",
            self.opts.seeds * self.opts.clients
        );
        self.wait_for(timeout, &what, |l| l.all_up())
    }

    /// Waits until every server reports `n` tunnels up.
    pub fn wait_tunnels(&mut self, n: u64, timeout: Duration) -> Result<Duration> {
        let seeds = self.opts.seeds;
        self.wait_for(
            timeout,
            &format!("every server to count {n} tunnels"),
            |l| (0..seeds).all(|i| l.tunnels_up(i) == Some(n)),
        )
    }

    /// kube-apiserver's CONNECT to `target` over server `server`'s UDS, then `GET path`
    /// (Connection: close); returns the status and the body.
    pub fn connect_get(&self, server: usize, target: &str, path: &str) -> Result<(u16, String)> {
        let (reply, mut s) = connect_uds(&self.uds(server), target, IO_TIMEOUT)?;
        if reply.status != 200 {
            bail!(
                "CONNECT {target} via server {server}: {}",
                reply.head.trim()
            );
        }
        let (code, body) = http_get(&mut s, target, path)?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    /// A new connection to the pod through server `server`: which client carried it.
    pub fn whoami(&self, server: usize) -> Result<usize> {
        let (code, body) = self.connect_get(server, POD_TARGET, "/whoami")?;
        if code != 200 {
            bail!("GET /whoami via server {server} answered {code}");
        }
        client_of(body.trim()).with_context(|| format!("unknown client address {body:?}"))
    }

    /// Opens a connection to the pod through server `server` and keeps it open.
    pub fn hold(&self, server: usize) -> Result<Held> {
        let (reply, mut stream) = connect_uds(&self.uds(server), POD_TARGET, IO_TIMEOUT)?;
        if reply.status != 200 {
            bail!("CONNECT via server {server}: {}", reply.head.trim());
        }
        let ip = ask_whoami(&mut stream)?;
        let client = client_of(&ip).with_context(|| format!("unknown client address {ip}"))?;
        Ok(Held {
            stream,
            server,
            client,
        })
    }

    /// Drops client `i`'s TCP to and from the ingress silently (no FIN, no RST) with an
    /// nftables table of its own in the shoot namespace.
    pub fn blackhole(&self, i: usize) -> Result<()> {
        let (host, port) = self.ingress().rsplit_once(':').context("ingress address")?;
        let t = BLACKHOLE_TABLE;
        let ns = self.shoots.get(i).context("no such shoot")?;
        for cmd in [
            format!("add table inet {t}"),
            format!("add chain inet {t} bh_out {{ type filter hook output priority -10; policy accept; }}"),
            format!("add chain inet {t} bh_in {{ type filter hook input priority -10; policy accept; }}"),
            format!("add rule inet {t} bh_out ip daddr {host} tcp dport {port} drop"),
            format!("add rule inet {t} bh_in ip saddr {host} tcp sport {port} drop"),
        ] {
            ns.run("nft", &[&cmd])?;
        }
        Ok(())
    }

    /// Removes [`Lab::blackhole`]'s table.
    pub fn unblackhole(&self, i: usize) -> Result<()> {
        self.shoots
            .get(i)
            .context("no such shoot")?
            .run("nft", &[&format!("delete table inet {BLACKHOLE_TABLE}")])
            .map(drop)
    }

    /// The namespace of this lab called `name` (full name).
    pub fn ns_by_name(&self, name: &str) -> Option<&Netns> {
        self.seeds
            .iter()
            .chain(self.shoots.iter())
            .chain([&self.gw, &self.pod])
            .chain(self.local.iter())
            .chain(self.shoot2.iter())
            .find(|n| n.name() == name)
    }

    /// Starts `bin args…` as process `name` in this lab's namespace `ns_name` (full name),
    /// logging to `<dir>/<name>.log` (appending: a restart continues the log); replaces an
    /// earlier process of that name in the list.
    pub fn spawn_in(
        &mut self,
        name: &str,
        ns_name: &str,
        bin: &Path,
        args: &[String],
    ) -> Result<()> {
        let ns = self
            .ns_by_name(ns_name)
            .with_context(|| format!("no namespace {ns_name}"))?;
        let p = self.procs.start(name, ns, bin, args)?;
        self.procs.insert(p);
        Ok(())
    }

    /// curl in seed 0 as kube-apiserver: through the mTLS proxy (`--proxytunnel`) to `url`,
    /// with `extra` curl arguments. Returns curl's output (not checked).
    pub fn curl_proxy(&self, extra: &[&str], url: &str) -> Result<Output> {
        let p = &self.pki;
        let mut cmd = self.seeds[0].exec("curl");
        cmd.args([
            "-sS",
            "--proxytunnel",
            "--proxy",
            &format!("https://{PROXY_TCP}"),
        ])
        .arg("--proxy-cacert")
        .arg(&p.ca)
        .arg("--proxy-cert")
        .arg(&p.client_cert)
        .arg("--proxy-key")
        .arg(&p.client_key)
        .args(extra)
        .arg(url)
        .stdin(Stdio::null());
        cmd.output().context("run curl")
    }

    /// Starts curl in seed 0 as kube-apiserver downloading the pod's `big.bin` through the
    /// mTLS proxy into `<dir>/<name>.bin` at `rate` (curl's `--limit-rate`, e.g. `4M`), as
    /// process `name`. Returns the output path; the process exits 0 once it is complete.
    pub fn start_download(&mut self, name: &str, rate: &str) -> Result<PathBuf> {
        let out = self.dir().join(format!("{name}.bin"));
        let p = &self.pki;
        let args = strings(&[
            "-sS",
            "-m",
            "300",
            "--limit-rate",
            rate,
            "--proxytunnel",
            "--proxy",
            &format!("https://{PROXY_TCP}"),
            "--proxy-cacert",
            &p.ca.display().to_string(),
            "--proxy-cert",
            &p.client_cert.display().to_string(),
            "--proxy-key",
            &p.client_key.display().to_string(),
            "-o",
            &out.display().to_string(),
            &format!("http://{POD_TARGET}/big.bin"),
        ]);
        let seed = self.seeds[0].name().to_owned();
        self.spawn_in(name, &seed, Path::new("curl"), &args)?;
        Ok(out)
    }

    /// Prints every process's log to stderr.
    pub fn print_logs(&self) {
        self.procs.print_logs();
    }

    /// Leaves namespaces, processes and files in place (lab `--keep`); returns the directory.
    pub fn keep(mut self) -> PathBuf {
        self.procs.detach_all();
        for n in self
            .seeds
            .iter_mut()
            .chain(self.shoots.iter_mut())
            .chain([&mut self.gw, &mut self.pod])
            .chain(self.local.iter_mut())
            .chain(self.shoot2.iter_mut())
        {
            n.keep();
        }
        self.dir.keep();
        self.dir.path().to_owned()
    }
}

/// Arguments of the pod server (`podserver`) listening on `[::]:8080` and serving `www`.
pub fn pod_server_args(www: &Path) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("[::]:{POD_PORT}"),
        "--dir".into(),
        www.display().to_string(),
    ]
}

/// Generates a key pair `<dir>/<name>.key` with `vpn-shoot-client keygen` / `pubkey`.
pub fn gen_key(dir: &Path, name: &str) -> Result<KeyPair> {
    let bin = try_bin("vpn-shoot-client")?;
    let private = netns::run(Command::new(&bin).arg("keygen"))?.stdout;
    let private_file = dir.join(format!("{name}.key"));
    write_secret(&private_file, &private)?;
    let key = std::fs::File::open(&private_file)?;
    let out = Command::new(&bin)
        .arg("pubkey")
        .stdin(key)
        .stderr(Stdio::piped())
        .output()
        .context("run vpn-shoot-client pubkey")?;
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || public.is_empty() {
        bail!(
            "vpn-shoot-client pubkey failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(KeyPair {
        private_file,
        public,
    })
}

/// Writes `size` random bytes to `path`; returns their sha256 (hex).
pub fn write_random_file(path: &Path, size: usize) -> Result<String> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::thread_rng();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(hex(&hasher.finalize()))
}

/// sha256 (hex) of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
