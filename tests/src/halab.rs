//! The high-availability topology: two seed server replicas and two shoot client replicas
//! behind one ingress, plus a connection load generator and window accounting for failover
//! tests.
//!
//! ```text
//!  seed0 192.168.77.1 ─┐        gw: br0 10.250.0.1        ┌─ shoota 10.250.0.2 ─┐  100.96.1.1
//!   vpn-seed-server 0  ├─ 77.2  ingress :8132 ── bridge ──┤   vpn-shoot-client  ├─ pod: br0
//!  seed1 192.168.78.1 ─┘  78.2  (routes by header)        └─ shootb 10.250.0.3 ─┘  100.96.1.10
//!   vpn-seed-server 1                                         vpn-shoot-client     100.96.1.2
//! ```
//! Both servers share one key pair and allow both clients; each client keeps one tunnel to
//! each server (header values `vpn-seed-server-0`/`-1`). The clients masquerade, so the pod's
//! `GET /whoami` names the client that carried a connection by its LAN address. The seeds have
//! no route to the pod and gw does not forward. Processes are stopped before the namespaces
//! are deleted; on panic every process log is printed first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::{connect_uds, http_get, read_head, status_of};
use crate::env::try_bin;
use crate::lab::{
    gen_key, pod_server_args, KeyPair, CLIENT_METRICS, INGRESS, NODE_NETWORKS, POD_INDEX,
    POD_NETWORKS, POD_PORT, SEED_METRICS, SERVICE_NETWORKS, START_TIMEOUT, VPN_NETWORK,
};
use crate::netns::{unique_prefix, veth, Netns};
use crate::proc::{wait_running, Proc, Procs};
use crate::tmp::TempDir;
use crate::wait::{http_status, is_listening};

/// Tunnel listeners of seed server 0 and 1.
pub const SEED_TUNNELS: [&str; 2] = ["192.168.77.1:1194", "192.168.78.1:1194"];
/// Routing header values of seed server 0 and 1 at the ingress.
pub const ROUTE_VALUES: [&str; 2] = ["vpn-seed-server-0", "vpn-seed-server-1"];
/// LAN (pod-side) IPv4 addresses of client A and B: what the pod sees after masquerade.
pub const CLIENT_LAN_V4: [&str; 2] = ["100.96.1.1", "100.96.1.2"];
/// LAN (pod-side) IPv6 addresses of client A and B.
pub const CLIENT_LAN_V6: [&str; 2] = ["fd00:96:0:1::1", "fd00:96:0:1::2"];
/// Short names of the clients (namespaces `shoota`/`shootb`).
pub const CLIENT_LETTERS: [&str; 2] = ["a", "b"];
/// The pod's IPv4 CONNECT target.
pub const POD_TARGET: &str = "100.96.1.10:8080";
/// The pod's IPv6 CONNECT target.
pub const POD_TARGET_V6: &str = "[fd00:96:0:1::10]:8080";
/// Read/write timeout of one CONNECT + request made by the helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Read/write timeout of one attempt of [`Load`].
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(3);
/// Most attempts of a [`Load`] in flight at once (more are skipped, not queued).
pub const LOAD_MAX_IN_FLIGHT: usize = 128;
/// Most attempts a [`Load`] records.
pub const LOAD_MAX_ATTEMPTS: usize = 20_000;
/// nftables table [`HaLab::blackhole`] adds in a shoot namespace.
pub const BLACKHOLE_TABLE: &str = "ha_blackhole";

/// Options of the VPN processes.
#[derive(Debug, Clone, Default)]
pub struct HaOptions {
    /// `--keepalive` for both servers and both clients (product default when `None`).
    pub keepalive: Option<String>,
    /// `--dead-peer-timeout` for both servers and both clients (product default when `None`).
    pub dead_peer_timeout: Option<String>,
    /// Give the servers the client keys as `--peers-dir` instead of `--peer`.
    pub peers_dir: bool,
}

/// The HA topology: namespaces, keys, files and processes.
#[derive(Debug)]
pub struct HaLab {
    /// Name prefix of everything this lab created.
    pub prefix: String,
    procs: Procs,
    /// Seed namespaces of server 0 and 1.
    pub seeds: [Netns; 2],
    /// Ingress gateway namespace.
    pub gw: Netns,
    /// Shoot namespaces of client A and B.
    pub shoots: [Netns; 2],
    /// Pod namespace.
    pub pod: Netns,
    /// The key pair both servers share.
    pub server_key: KeyPair,
    /// Key pairs of client A and B.
    pub client_keys: [KeyPair; 2],
    /// Options of the VPN processes.
    pub opts: HaOptions,
    dir: TempDir,
}

pub use crate::prom::{http_text, metric};

/// Sends `GET /whoami` on a persistent HTTP/1.1 stream and returns the address the pod saw.
pub fn ask_whoami<S: Read + Write>(s: &mut S) -> Result<String> {
    s.write_all(b"GET /whoami HTTP/1.1\r\nHost: pod\r\n\r\n")
        .context("send GET /whoami")?;
    let head = read_head(s)?;
    let status = status_of(&head)?;
    if status != 200 {
        bail!("GET /whoami answered {status}");
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Content-Length in the /whoami answer")?;
    if len > 256 {
        bail!("/whoami body of {len} bytes");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).context("read /whoami body")?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// Index (0 = A, 1 = B) of the client whose LAN address is `ip`.
pub fn client_of(ip: &str) -> Option<usize> {
    (0..2).find(|&i| ip == CLIENT_LAN_V4[i] || ip == CLIENT_LAN_V6[i])
}

/// Name of seed server `i`'s process.
pub fn server_name(i: usize) -> String {
    format!("seed-server-{i}")
}

/// Name of client `i`'s process (`shoot-client-a`, `shoot-client-b`).
pub fn client_name(i: usize) -> String {
    format!("shoot-client-{}", CLIENT_LETTERS[i % 2])
}

/// A proxied connection kept open: it asked `/whoami` once and can ask again.
#[derive(Debug)]
pub struct Held {
    /// The CONNECT stream.
    pub stream: UnixStream,
    /// Seed server it went through.
    pub server: usize,
    /// Client that carried it at first.
    pub client: usize,
}

impl Held {
    /// Asks `/whoami` again within `timeout`; returns the client that carried it.
    pub fn ask(&mut self, timeout: Duration) -> Result<usize> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        let ip = ask_whoami(&mut self.stream)?;
        client_of(&ip).with_context(|| format!("unknown client address {ip}"))
    }
}

fn ns(prefix: &str, role: &str) -> Result<Netns> {
    Netns::create(&format!("{prefix}-{role}"))
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl HaLab {
    /// Builds namespaces, links, addresses, routes, keys and the pod's web root with a fresh
    /// unique prefix. Starts no process.
    pub fn new(opts: HaOptions) -> Result<Self> {
        let prefix = unique_prefix();
        let dir = TempDir::new(&prefix)?;
        let seeds = [ns(&prefix, "seed0")?, ns(&prefix, "seed1")?];
        let gw = ns(&prefix, "gw")?;
        let shoots = [ns(&prefix, "shoota")?, ns(&prefix, "shootb")?];
        let pod = ns(&prefix, "pod")?;

        for (i, seed) in seeds.iter().enumerate() {
            let gw_if = format!("seed{i}");
            veth(seed, "gw0", &gw, &gw_if)?;
            seed.addr("gw0", &format!("192.168.{}.1/24", 77 + i))?;
            gw.addr(&gw_if, &format!("192.168.{}.2/24", 77 + i))?;
        }
        gw.sysctl("net.ipv4.ip_forward", "0")?;
        gw.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        for n in [&gw, &pod] {
            n.ip(&["link", "add", "br0", "type", "bridge", "forward_delay", "0"])?;
        }
        gw.addr("br0", "10.250.0.1/24")?;
        for (i, shoot) in shoots.iter().enumerate() {
            let port = format!("shoot{}", CLIENT_LETTERS[i]);
            veth(&gw, &port, shoot, "gw0")?;
            gw.ip(&["link", "set", &port, "master", "br0"])?;
            shoot.addr("gw0", &format!("10.250.0.{}/24", i + 2))?;
            veth(&pod, &port, shoot, "pod0")?;
            pod.ip(&["link", "set", &port, "master", "br0"])?;
            shoot.addr("pod0", &format!("{}/24", CLIENT_LAN_V4[i]))?;
            shoot.addr("pod0", &format!("{}/64", CLIENT_LAN_V6[i]))?;
        }
        pod.addr("br0", "100.96.1.10/24")?;
        pod.addr("br0", "fd00:96:0:1::10/64")?;
        pod.ip(&["route", "add", "default", "via", CLIENT_LAN_V4[0]])?;
        pod.ip(&["-6", "route", "add", "default", "via", CLIENT_LAN_V6[0]])?;

        let server_key = gen_key(dir.path(), "seed")?;
        let client_keys = [
            gen_key(dir.path(), "shoot-a")?,
            gen_key(dir.path(), "shoot-b")?,
        ];
        if opts.peers_dir {
            let peers = dir.path().join("peers");
            std::fs::create_dir(&peers)?;
            for (i, k) in client_keys.iter().enumerate() {
                let file = peers.join(format!("shoot-{}", CLIENT_LETTERS[i]));
                std::fs::write(file, format!("{}\n", k.public))?;
            }
        }
        let www = dir.path().join("pod-www");
        std::fs::create_dir(&www)?;
        std::fs::write(www.join("index.html"), POD_INDEX)?;

        Ok(Self {
            prefix,
            procs: Procs::new(dir.path()),
            seeds,
            gw,
            shoots,
            pod,
            server_key,
            client_keys,
            opts,
            dir,
        })
    }

    /// Builds the topology, starts the pod server, checks the seeds' isolation, starts the
    /// ingress, both servers and both clients, and waits until every tunnel is up.
    pub fn up(opts: HaOptions) -> Result<Self> {
        let mut lab = Self::new(opts)?;
        lab.start_pod_server()?;
        lab.assert_seeds_isolated()?;
        lab.start_ingress()?;
        for i in 0..2 {
            lab.start_server(i)?;
        }
        for i in 0..2 {
            lab.start_client(i)?;
        }
        lab.wait_all_up(START_TIMEOUT)?;
        Ok(lab)
    }

    /// The lab's temporary directory (logs, keys, sockets, web root).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of seed server `i`'s UDS proxy listener.
    pub fn uds(&self, i: usize) -> PathBuf {
        self.dir().join(format!("proxy{i}.sock"))
    }

    /// The process `name` (also after it was killed or stopped, until restarted).
    pub fn proc(&self, name: &str) -> Option<&Proc> {
        self.procs.get(name)
    }

    /// Fails unless TCP connects from both seeds to the pod (v4 and v6) fail.
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

    fn ns_by_name(&self, name: &str) -> Option<&Netns> {
        self.seeds
            .iter()
            .chain(self.shoots.iter())
            .chain([&self.gw, &self.pod])
            .find(|n| n.name() == name)
    }

    /// Starts `bin args…` as process `name` in the namespace called `ns_name`, logging to
    /// `<dir>/<name>.log` (appending: a restart continues the log); replaces an earlier
    /// process of that name in the list.
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

    /// Polls `cond` every [`POLL`] up to `timeout`; fails early, with its log, when a process
    /// that should run exits meanwhile.
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
        let args = pod_server_args(&self.dir().join("pod-www"));
        let ns_name = self.pod.name().to_owned();
        self.spawn_in("podserver", &ns_name, &try_bin("podserver")?, &args)?;
        let addr: SocketAddr = format!("[::]:{POD_PORT}").parse()?;
        self.wait_for(START_TIMEOUT, "the pod server to listen", |l| {
            is_listening(&l.pod, addr)
        })
    }

    /// Starts the ingress stand-in in `gw` with a route per server and waits until it listens.
    pub fn start_ingress(&mut self) -> Result<Duration> {
        let mut args = strings(&["--listen", INGRESS]);
        for (value, backend) in ROUTE_VALUES.iter().zip(SEED_TUNNELS) {
            args.push("--route".into());
            args.push(format!("{value}={backend}"));
        }
        let ns_name = self.gw.name().to_owned();
        self.spawn_in("ingress", &ns_name, &try_bin("ingress-standin")?, &args)?;
        let addr: SocketAddr = INGRESS.parse()?;
        self.wait_for(START_TIMEOUT, "the ingress to listen", |l| {
            is_listening(&l.gw, addr)
        })
    }

    fn liveness_args(&self, a: &mut Vec<String>) {
        if let Some(k) = &self.opts.keepalive {
            a.extend(["--keepalive".into(), k.clone()]);
        }
        if let Some(d) = &self.opts.dead_peer_timeout {
            a.extend(["--dead-peer-timeout".into(), d.clone()]);
        }
    }

    /// Seed server `i`'s arguments: UDS proxy only, both client keys allowed.
    pub fn server_args(&self, i: usize) -> Vec<String> {
        let mut a = strings(&[
            "--tunnel-listen",
            SEED_TUNNELS[i % 2],
            "--proxy-listen",
            "off",
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

    /// Starts seed server `i` and waits for its `/healthz` and tunnel listener.
    pub fn start_server(&mut self, i: usize) -> Result<Duration> {
        let args = self.server_args(i);
        let ns_name = self.seeds[i % 2].name().to_owned();
        let name = server_name(i);
        self.spawn_in(&name, &ns_name, &try_bin("vpn-seed-server")?, &args)?;
        let health = format!("http://{SEED_METRICS}/healthz");
        let tunnel: SocketAddr = SEED_TUNNELS[i % 2].parse()?;
        self.wait_for(START_TIMEOUT, &format!("{name} to be healthy"), |l| {
            let seed = &l.seeds[i % 2];
            http_status(seed, &health) == Some(200) && is_listening(seed, tunnel)
        })
    }

    /// Client `i`'s arguments: one tunnel to each server through the ingress.
    pub fn client_args(&self, i: usize) -> Vec<String> {
        let mut a = strings(&[
            "--endpoint",
            INGRESS,
            "--connect-target",
            "vpn-seed-server:1194",
            "--header-name",
            "Reversed-VPN",
            "--header-value",
            ROUTE_VALUES[0],
            "--header-value",
            ROUTE_VALUES[1],
            "--private-key-file",
            &self.client_keys[i % 2].private_file.display().to_string(),
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
        ]);
        self.liveness_args(&mut a);
        a
    }

    /// Starts client `i` (0 = A, 1 = B) and waits for its `/healthz`.
    pub fn start_client(&mut self, i: usize) -> Result<Duration> {
        let args = self.client_args(i);
        let ns_name = self.shoots[i % 2].name().to_owned();
        let name = client_name(i);
        self.spawn_in(&name, &ns_name, &try_bin("vpn-shoot-client")?, &args)?;
        let health = format!("http://{CLIENT_METRICS}/healthz");
        self.wait_for(START_TIMEOUT, &format!("{name} to be healthy"), |l| {
            http_status(&l.shoots[i % 2], &health) == Some(200)
        })
    }

    /// SIGKILLs process `name` (no cleanup, like a crashed pod); its log stays available.
    pub fn kill9(&mut self, name: &str) -> Result<()> {
        self.procs.kill9(name)
    }

    /// SIGTERMs process `name` and waits for it to exit (SIGKILL after [`STOP_GRACE`]).
    pub fn stop(&mut self, name: &str) -> Result<()> {
        self.procs.stop(name)
    }

    /// Seed server `i`'s `vpn_seed_tunnels_up`, `None` if it does not answer.
    pub fn tunnels_up(&self, i: usize) -> Option<u64> {
        let text = http_text(
            &self.seeds[i % 2],
            &format!("http://{SEED_METRICS}/metrics"),
        )?;
        metric(&text, "vpn_seed_tunnels_up").map(|v| v as u64)
    }

    /// Client `client`'s `vpn_shoot_tunnel_up` for seed server `server`.
    pub fn client_tunnel_up(&self, client: usize, server: usize) -> Option<bool> {
        let url = format!("http://{CLIENT_METRICS}/metrics");
        let text = http_text(&self.shoots[client % 2], &url)?;
        let name = format!(
            "vpn_shoot_tunnel_up{{server=\"{}\"}}",
            ROUTE_VALUES[server % 2]
        );
        metric(&text, &name).map(|v| v == 1.0)
    }

    /// Whether client `i`'s `/readyz` answers 200.
    pub fn client_ready(&self, i: usize) -> bool {
        http_status(
            &self.shoots[i % 2],
            &format!("http://{CLIENT_METRICS}/readyz"),
        ) == Some(200)
    }

    /// Whether seed server `i`'s `/readyz` answers 200.
    pub fn server_ready(&self, i: usize) -> bool {
        http_status(&self.seeds[i % 2], &format!("http://{SEED_METRICS}/readyz")) == Some(200)
    }

    /// Every tunnel up: both clients ready (all tunnels) and both servers count 2 tunnels.
    pub fn all_up(&self) -> bool {
        (0..2).all(|i| self.client_ready(i) && self.tunnels_up(i) == Some(2))
    }

    /// Waits for [`HaLab::all_up`].
    pub fn wait_all_up(&mut self, timeout: Duration) -> Result<Duration> {
        self.wait_for(timeout, "all four tunnels to be up", |l| l.all_up())
    }

    /// Waits until both servers report `n` tunnels up.
    pub fn wait_tunnels(&mut self, n: u64, timeout: Duration) -> Result<Duration> {
        self.wait_for(
            timeout,
            &format!("both servers to count {n} tunnels"),
            |l| (0..2).all(|i| l.tunnels_up(i) == Some(n)),
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
        let (host, port) = INGRESS.rsplit_once(':').context("ingress address")?;
        let t = BLACKHOLE_TABLE;
        let ns = &self.shoots[i % 2];
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

    /// Removes [`HaLab::blackhole`]'s table.
    pub fn unblackhole(&self, i: usize) -> Result<()> {
        self.shoots[i % 2]
            .run("nft", &[&format!("delete table inet {BLACKHOLE_TABLE}")])
            .map(drop)
    }

    /// Prints every process's log to stderr.
    pub fn print_logs(&self) {
        self.procs.print_logs();
    }
}

/// One attempt of a [`Load`]: a new CONNECT + `GET /whoami`.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Seed server it went through.
    pub server: usize,
    /// When it started.
    pub start: Instant,
    /// When it finished.
    pub end: Instant,
    /// The address the pod saw, or what went wrong.
    pub result: Result<String, String>,
}

impl Attempt {
    /// Whether it succeeded.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }

    /// The client that carried it, if it succeeded.
    pub fn client(&self) -> Option<usize> {
        self.result.as_deref().ok().and_then(client_of)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn attempt(uds: &Path) -> Result<String, String> {
    let (reply, mut s) =
        connect_uds(uds, POD_TARGET, LOAD_TIMEOUT).map_err(|e| format!("{e:#}"))?;
    if reply.status != 200 {
        return Err(format!("CONNECT answered {}", reply.head.trim()));
    }
    match http_get(&mut s, POD_TARGET, "/whoami") {
        Ok((200, body)) => Ok(String::from_utf8_lossy(&body).trim().to_owned()),
        Ok((code, _)) => Err(format!("GET /whoami answered {code}")),
        Err(e) => Err(format!("GET /whoami: {e:#}")),
    }
}

/// A paced connection load: every `interval` a new attempt (CONNECT + `GET /whoami`) starts
/// on its own thread, through the given UDS paths in turn, so a hanging attempt never delays
/// the next. Stopped and joined by [`Load::finish`] or on drop.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<usize>>,
}

impl Load {
    /// Starts the load through `uds[0], uds[1], …` in turn (index = server number).
    pub fn start(uds: Vec<PathBuf>, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (stop2, done2) = (Arc::clone(&stop), Arc::clone(&done));
        let thread = std::thread::spawn(move || {
            let mut running: Vec<JoinHandle<()>> = Vec::new();
            let (mut k, mut skipped) = (0usize, 0usize);
            let mut next = Instant::now();
            while !stop2.load(Ordering::SeqCst) && k < LOAD_MAX_ATTEMPTS && !uds.is_empty() {
                running.retain(|h| !h.is_finished());
                if running.len() < LOAD_MAX_IN_FLIGHT {
                    let server = k % uds.len();
                    let path = uds[server].clone();
                    let done = Arc::clone(&done2);
                    running.push(std::thread::spawn(move || {
                        let start = Instant::now();
                        let result = attempt(&path);
                        let a = Attempt {
                            server,
                            start,
                            end: Instant::now(),
                            result,
                        };
                        lock(&done).push(a);
                    }));
                    k += 1;
                } else {
                    skipped += 1;
                }
                // Pacing of the load, not synchronization.
                next += interval;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for h in running {
                let _ = h.join();
            }
            skipped
        });
        Self {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Attempts finished so far, in order of completion.
    pub fn snapshot(&self) -> Vec<Attempt> {
        lock(&self.done).clone()
    }

    /// Waits until `n` attempts that started at or after `since` have finished.
    pub fn wait_finished_since(&self, since: Instant, n: usize, timeout: Duration) -> Result<()> {
        crate::wait::wait_until(timeout, &format!("{n} load attempts"), || {
            lock(&self.done).iter().filter(|a| a.start >= since).count() >= n
        })
        .map(drop)
    }

    /// Stops the load, waits for the attempts in flight and returns all, ordered by start.
    /// Fails if attempts had to be skipped (too many in flight).
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let skipped = self.halt();
        let mut all = std::mem::take(&mut *lock(&self.done));
        all.sort_by_key(|a| a.start);
        if skipped > 0 {
            bail!("{skipped} load attempts skipped: more than {LOAD_MAX_IN_FLIGHT} in flight");
        }
        Ok(all)
    }

    fn halt(&mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Attempts of a [`Load`] split by disruption windows.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    /// Succeeded attempts that overlapped a window.
    pub inside_ok: usize,
    /// Failed attempts that overlapped a window.
    pub inside_failed: usize,
    /// Succeeded attempts outside every window.
    pub outside_ok: usize,
    /// Failed attempts outside every window (each should be explained).
    pub outside_failed: Vec<Attempt>,
}

/// Splits `attempts` by the windows `[event, event + window)`: an attempt is inside when it
/// was still running at an event and started before that event's window closed.
pub fn windows(attempts: &[Attempt], events: &[Instant], window: Duration) -> Windows {
    let mut w = Windows::default();
    for a in attempts {
        let inside = events.iter().any(|&e| a.end >= e && a.start < e + window);
        match (inside, a.ok()) {
            (true, true) => w.inside_ok += 1,
            (true, false) => w.inside_failed += 1,
            (false, true) => w.outside_ok += 1,
            (false, false) => w.outside_failed.push(a.clone()),
        }
    }
    w
}

impl std::fmt::Display for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inside the windows {} ok / {} failed, outside {} ok / {} failed",
            self.inside_ok,
            self.inside_failed,
            self.outside_ok,
            self.outside_failed.len()
        )
    }
}
