//! The `seed | gw | shoot | pod` topology with every component, shared by the e2e tests and
//! the lab tool.
//!
//! ```text
//!  seed ─────────────── gw ─────────────── shoot ─────────────── pod
//!  192.168.77.1/24      192.168.77.2/24    10.250.0.2/24         100.96.1.10/24
//!  fd00:77::1/64        fd00:77::2/64      100.96.1.1/24         fd00:96:0:1::10/64
//!                       10.250.0.1/24      fd00:96:0:1::1/64     default via shoot
//!  vpn-seed-server      ingress :8132      vpn-shoot-client      podserver :8080
//! ```
//! The seed has no route to the pod network and gw does not forward: the only way from the
//! seed to a pod is the tunnel. Optional extras: `local` (a seed-side network overlapping the
//! pod network, 100.96.1.0/24 between seed and `local`) and `shoot2` (a second shoot behind gw,
//! 10.250.1.0/24).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::env::try_bin;
use crate::netns::{self, unique_prefix, veth, Netns};
use crate::pki::{write_secret, Pki};
use crate::proc::{wait_running, Proc, Procs};
use crate::tmp::TempDir;
use crate::wait::{http_status, is_listening};

/// Seed server tunnel listener (in `seed`).
pub const SEED_TUNNEL: &str = "192.168.77.1:1194";
/// Seed server mTLS proxy listener (in `seed`).
pub const PROXY_TCP: &str = "127.0.0.1:9443";
/// Seed server metrics/health listener (in `seed`).
pub const SEED_METRICS: &str = "127.0.0.1:15000";
/// Shoot client metrics/health listener (in each shoot namespace).
pub const CLIENT_METRICS: &str = "127.0.0.1:15001";
/// Ingress stand-in listener (in `gw`).
pub const INGRESS: &str = "10.250.0.1:8132";
/// Routing header value that selects the seed server at the ingress.
pub const ROUTE_VALUE: &str = "vpn-seed-server";
/// The pod's addresses.
pub const POD_V4: &str = "100.96.1.10";
/// The pod's IPv6 address.
pub const POD_V6: &str = "fd00:96:0:1::10";
/// The pod server's port (also used by the seed-local server).
pub const POD_PORT: u16 = 8080;
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

/// Readiness deadline for a starting component.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Optional parts of the topology.
#[derive(Debug, Clone, Copy, Default)]
pub struct LabOptions {
    /// Add namespace `local` on a seed network that overlaps the pod network.
    pub seed_local: bool,
    /// Add namespace `shoot2`, a second shoot behind gw.
    pub second_shoot: bool,
    /// Put a 64 MiB random `big.bin` into the pod server's directory.
    pub big_file: bool,
}

/// A WireGuard key pair on disk.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// Private key file (mode 0600).
    pub private_file: PathBuf,
    /// Public key, base64.
    pub public: String,
}

/// The topology: namespaces, files and processes. Processes are stopped before the
/// namespaces are deleted; on panic every process log is printed first.
#[derive(Debug)]
pub struct Lab {
    /// Name prefix of everything this lab created.
    pub prefix: String,
    procs: Procs,
    /// Seed (control plane) namespace.
    pub seed: Netns,
    /// Ingress gateway namespace.
    pub gw: Netns,
    /// Shoot node namespace.
    pub shoot: Netns,
    /// Pod namespace.
    pub pod: Netns,
    /// Seed-side network overlapping the pod network ([`LabOptions::seed_local`]).
    pub local: Option<Netns>,
    /// Second shoot ([`LabOptions::second_shoot`]).
    pub shoot2: Option<Netns>,
    /// Test PKI.
    pub pki: Pki,
    /// Seed server key pair (after [`Lab::keys`]).
    pub seed_key: Option<KeyPair>,
    /// Shoot client key pair (after [`Lab::keys`]).
    pub client_key: Option<KeyPair>,
    /// `big.bin` path and sha256 hex ([`LabOptions::big_file`]).
    pub big: Option<(PathBuf, String)>,
    dir: TempDir,
}

fn ns(prefix: &str, role: &str) -> Result<Netns> {
    Netns::create(&format!("{prefix}-{role}"))
}

impl Lab {
    /// Builds the network part of the topology with a fresh unique prefix.
    pub fn new(opts: LabOptions) -> Result<Self> {
        Self::with_prefix(&unique_prefix(), opts)
    }

    /// Builds the network part of the topology: namespaces, links, addresses, routes, PKI,
    /// the pod's web root. Starts no process.
    pub fn with_prefix(prefix: &str, opts: LabOptions) -> Result<Self> {
        let dir = TempDir::new(prefix)?;
        let seed = ns(prefix, "seed")?;
        let gw = ns(prefix, "gw")?;
        let shoot = ns(prefix, "shoot")?;
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

        veth(&seed, "gw0", &gw, "seed0")?;
        seed.addr("gw0", "192.168.77.1/24")?;
        seed.addr("gw0", "fd00:77::1/64")?;
        gw.addr("seed0", "192.168.77.2/24")?;
        gw.addr("seed0", "fd00:77::2/64")?;

        veth(&gw, "shoot0", &shoot, "gw0")?;
        gw.addr("shoot0", "10.250.0.1/24")?;
        shoot.addr("gw0", "10.250.0.2/24")?;
        gw.sysctl("net.ipv4.ip_forward", "0")?;
        gw.sysctl("net.ipv6.conf.all.forwarding", "0")?;

        veth(&shoot, "pod0", &pod, "shoot0")?;
        shoot.addr("pod0", "100.96.1.1/24")?;
        shoot.addr("pod0", "fd00:96:0:1::1/64")?;
        pod.addr("shoot0", "100.96.1.10/24")?;
        pod.addr("shoot0", "fd00:96:0:1::10/64")?;
        pod.ip(&["route", "add", "default", "via", "100.96.1.1"])?;
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:96:0:1::1"])?;

        if let Some(s2) = &shoot2 {
            veth(&gw, "shoot1", s2, "gw0")?;
            gw.addr("shoot1", "10.250.1.1/24")?;
            s2.addr("gw0", "10.250.1.2/24")?;
            s2.ip(&["route", "add", "10.250.0.0/24", "via", "10.250.1.1"])?;
        }

        let pki = Pki::generate(dir.path())?;
        let www = dir.path().join("pod-www");
        std::fs::create_dir(&www)?;
        std::fs::write(www.join("index.html"), POD_INDEX)?;

        let mut lab = Self {
            prefix: prefix.to_owned(),
            procs: Procs::new(dir.path()),
            seed,
            gw,
            shoot,
            pod,
            local,
            shoot2,
            pki,
            seed_key: None,
            client_key: None,
            big: None,
            dir,
        };
        lab.assert_seed_isolated()?;
        if let Some(local) = &lab.local {
            // Added after the isolation check: this route overlaps the pod network on purpose.
            veth(&lab.seed, "local0", local, "seed0")?;
            lab.seed.addr("local0", "100.96.1.1/24")?;
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

    /// Fails unless TCP connects from the seed to the pod (v4 and v6) fail.
    pub fn assert_seed_isolated(&self) -> Result<()> {
        for addr in [
            format!("{POD_V4}:{POD_PORT}"),
            format!("[{POD_V6}]:{POD_PORT}"),
        ] {
            let sa: SocketAddr = addr.parse()?;
            let res = self
                .seed
                .in_ns(|| TcpStream::connect_timeout(&sa, Duration::from_secs(1)))?;
            if res.is_ok() {
                bail!("isolation broken: the seed reaches {sa} without a tunnel");
            }
        }
        Ok(())
    }

    /// The lab's temporary directory (logs, PKI, keys, web roots).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the seed server's UDS proxy listener.
    pub fn uds_path(&self) -> PathBuf {
        self.dir().join("proxy.sock")
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

    /// Stops process `name` (SIGTERM, then SIGKILL) and forgets it.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        self.procs.remove(name)
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

    /// Arguments of the ingress stand-in.
    pub fn ingress_args(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            INGRESS.into(),
            "--route".into(),
            format!("{ROUTE_VALUE}={SEED_TUNNEL}"),
        ]
    }

    /// Starts the ingress stand-in in `gw` and waits until it listens.
    pub fn start_ingress(&mut self) -> Result<Duration> {
        let bin = try_bin("ingress-standin")?;
        let args = self.ingress_args();
        let ns_name = self.gw.name().to_owned();
        self.spawn_in("ingress", &ns_name, &bin, &args)?;
        let addr: SocketAddr = INGRESS.parse()?;
        self.wait_proc("ingress", START_TIMEOUT, "the ingress to listen", |l| {
            is_listening(&l.gw, addr)
        })
    }

    /// Kills the ingress with SIGKILL (no cleanup, like a crashed pod).
    pub fn kill_ingress(&mut self) -> Result<()> {
        match self.proc_mut("ingress") {
            Some(p) => p.kill9(),
            None => bail!("ingress is not running"),
        }
    }

    /// Generates (once) the seed's and the shoot client's WireGuard keys with
    /// `vpn-shoot-client keygen` / `pubkey`.
    pub fn keys(&mut self) -> Result<(KeyPair, KeyPair)> {
        if let (Some(s), Some(c)) = (&self.seed_key, &self.client_key) {
            return Ok((s.clone(), c.clone()));
        }
        let s = self.gen_key("seed")?;
        let c = self.gen_key("shoot")?;
        self.seed_key = Some(s.clone());
        self.client_key = Some(c.clone());
        Ok((s, c))
    }

    /// Generates a key pair `<dir>/<name>.key` with the shoot client's subcommands.
    pub fn gen_key(&self, name: &str) -> Result<KeyPair> {
        gen_key(self.dir(), name)
    }

    /// The seed server's arguments per the CLI contract, allowing the peers in `peers`.
    pub fn seed_server_args(&mut self, peers: &[String]) -> Result<Vec<String>> {
        let (seed, _) = self.keys()?;
        let p = &self.pki;
        let mut a: Vec<String> = [
            "--tunnel-listen",
            SEED_TUNNEL,
            "--proxy-listen",
            PROXY_TCP,
            "--proxy-tls-cert",
            &p.server_cert.display().to_string(),
            "--proxy-tls-key",
            &p.server_key.display().to_string(),
            "--proxy-client-ca",
            &p.ca.display().to_string(),
            "--proxy-uds",
            &self.uds_path().display().to_string(),
            "--private-key-file",
            &seed.private_file.display().to_string(),
            "--shoot-pod-networks",
            POD_NETWORKS,
            "--shoot-service-networks",
            SERVICE_NETWORKS,
            "--shoot-node-networks",
            NODE_NETWORKS,
            "--vpn-network",
            VPN_NETWORK,
            "--tun-name",
            "tun0",
            "--metrics-listen",
            SEED_METRICS,
            "--dial-timeout",
            "2s",
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for peer in peers {
            a.push("--peer".into());
            a.push(peer.clone());
        }
        Ok(a)
    }

    /// Starts the seed server allowing the shoot client's key, and waits for `/healthz`,
    /// the TLS listener and the UDS.
    pub fn start_seed_server(&mut self) -> Result<Duration> {
        let (_, client) = self.keys()?;
        let args = self.seed_server_args(&[client.public])?;
        self.start_seed_server_with(&args)
    }

    /// Starts the seed server with explicit arguments and waits for it.
    pub fn start_seed_server_with(&mut self, args: &[String]) -> Result<Duration> {
        let bin = try_bin("vpn-seed-server")?;
        let ns_name = self.seed.name().to_owned();
        self.spawn_in("seed-server", &ns_name, &bin, args)?;
        let health = format!("http://{SEED_METRICS}/healthz");
        let proxy: SocketAddr = PROXY_TCP.parse()?;
        let uds = self.uds_path();
        self.wait_proc(
            "seed-server",
            START_TIMEOUT,
            "the seed server to be healthy",
            |l| {
                http_status(&l.seed, &health) == Some(200)
                    && is_listening(&l.seed, proxy)
                    && uds.exists()
            },
        )
    }

    /// The shoot client's arguments for `key` (private key file) against this lab's seed.
    pub fn client_args(&mut self, private_key_file: &Path) -> Result<Vec<String>> {
        let (seed, _) = self.keys()?;
        Ok([
            "--endpoint",
            INGRESS,
            "--connect-target",
            "vpn-seed-server:1194",
            "--header-name",
            "Reversed-VPN",
            "--header-value",
            ROUTE_VALUE,
            "--private-key-file",
            &private_key_file.display().to_string(),
            "--server-public-key",
            &seed.public,
            "--vpn-network",
            VPN_NETWORK,
            "--tun-name",
            "tun0",
            "--metrics-listen",
            CLIENT_METRICS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    }

    /// Starts the shoot client in `shoot` and waits for its `/healthz`.
    pub fn start_shoot_client(&mut self) -> Result<Duration> {
        let (_, client) = self.keys()?;
        let args = self.client_args(&client.private_file)?;
        let ns_name = self.shoot.name().to_owned();
        self.start_client_in("shoot-client", &ns_name, &args)
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

    /// Waits until the shoot client's and the seed server's `/readyz` answer 200.
    pub fn wait_tunnel(&mut self, timeout: Duration) -> Result<Duration> {
        let client = format!("http://{CLIENT_METRICS}/readyz");
        let server = format!("http://{SEED_METRICS}/readyz");
        self.wait_proc(
            "shoot-client",
            timeout,
            "the tunnel to come up (both /readyz 200)",
            |l| {
                http_status(&l.shoot, &client) == Some(200)
                    && http_status(&l.seed, &server) == Some(200)
            },
        )
    }

    /// Starts everything (pod server, ingress, seed server, shoot client; the seed-local
    /// server with that option) and waits for the tunnel.
    pub fn up(opts: LabOptions) -> Result<Self> {
        let mut lab = Self::new(opts)?;
        lab.start_pod_server()?;
        if opts.seed_local {
            lab.start_local_server()?;
        }
        lab.start_ingress()?;
        lab.start_seed_server()?;
        lab.start_shoot_client()?;
        lab.wait_tunnel(START_TIMEOUT)?;
        Ok(lab)
    }

    /// Starts everything like [`Lab::up`], plus a DNS responder in the pod (`dnsserver` on
    /// `POD_V4:53` answering `records`, each `name=ip`) that the seed server uses as the
    /// shoot's DNS server (`--dns-timeout 1s`).
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
        let (_, client) = lab.keys()?;
        let mut args = lab.seed_server_args(&[client.public])?;
        args.extend(["--shoot-dns-server", POD_V4, "--dns-timeout", "1s"].map(String::from));
        lab.start_seed_server_with(&args)?;
        lab.start_shoot_client()?;
        lab.wait_tunnel(START_TIMEOUT)?;
        Ok(lab)
    }

    /// The namespace of this lab called `name` (full name).
    pub fn ns_by_name(&self, name: &str) -> Option<&Netns> {
        [&self.seed, &self.gw, &self.shoot, &self.pod]
            .into_iter()
            .chain(self.local.iter())
            .chain(self.shoot2.iter())
            .find(|n| n.name() == name)
    }

    /// Starts `bin args…` as process `name` in this lab's namespace `ns_name` (full name),
    /// logging to `<dir>/<name>.log`; replaces an earlier process of that name in the list.
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

    /// curl in the seed namespace as kube-apiserver: through the mTLS proxy (`--proxytunnel`)
    /// to `url`, with `extra` curl arguments. Returns curl's output (not checked).
    pub fn curl_proxy(&self, extra: &[&str], url: &str) -> Result<Output> {
        let p = &self.pki;
        let mut cmd = self.seed.exec("curl");
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

    /// Prints every process's log to stderr.
    pub fn print_logs(&self) {
        self.procs.print_logs();
    }

    /// Leaves namespaces, processes and files in place (lab `--keep`); returns the directory.
    pub fn keep(mut self) -> PathBuf {
        self.procs.detach_all();
        for n in [&mut self.seed, &mut self.gw, &mut self.shoot, &mut self.pod] {
            n.keep();
        }
        if let Some(n) = self.local.as_mut() {
            n.keep();
        }
        if let Some(n) = self.shoot2.as_mut() {
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
