//! The bench topology: [`Lab`] (seed | gw | shoot | pod with the real binaries) plus a direct
//! veth between seed and pod, iperf3 and echo servers in the pod, the ingress with a second
//! route for OpenVPN, a seed-namespace runtime for the load generators, and per-plane control
//! (start, stop, kill, restart) of the VPN processes.
//!
//! ```text
//!  seed ──── gw (ingress :8132) ──── shoot ──── pod   100.96.1.10: http :8080, iperf3 :5201, echo :7007
//!   └───────────── direct0 192.168.200.1/30 ↔ .2 ──────┘   (plane "direct" only)
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::forwarder::Forwarder;
use super::nsrt::NsRuntime;
use super::openvpn::{self, OpenVpn};
use super::route::{MtlsProxy, Route};
use super::startup::{first_success, wait_listen, UP_TIMEOUT};
use super::sys::port_conns;
use super::{iperf, Config, Group, Plane};
use crate::env::try_bin;
use crate::lab::{Lab, LabOptions, INGRESS, POD_PORT, POD_V4, PROXY_TCP, START_TIMEOUT};
use crate::netns::veth;
use crate::wait::wait_tcp_listen;

/// The pod's HTTP server port.
pub const HTTP_PORT: u16 = POD_PORT;
/// The pod's echo server port.
pub const ECHO_PORT: u16 = 7007;
/// Seed end of the direct veth.
pub const DIRECT_SEED: &str = "192.168.200.1/30";
/// Pod end of the direct veth.
pub const DIRECT_POD: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 2);
/// The product's seed TUN (as the lab configures it).
pub const SEED_TUN: &str = "tun0";
/// The product's tunnel port.
pub const PRODUCT_PORT: u16 = 1194;
/// Interface toward the pod in the shoot namespace (as the lab names it).
const SHOOT_POD_IF: &str = "pod0";

const SEED_SERVER: &str = "seed-server";
const SHOOT_CLIENT: &str = "shoot-client";
const OVPN_SERVER: &str = "ovpn-server";
const OVPN_CLIENT: &str = "ovpn-client";

/// The running topology. Fields drop in order: forwarder, runtime, then the lab (processes
/// before namespaces).
#[derive(Debug)]
pub struct Topo {
    forwarder: Option<Forwarder>,
    /// Tokio runtime inside the seed namespace.
    pub rt: NsRuntime,
    mtls: Arc<MtlsProxy>,
    ovpn: Option<OpenVpn>,
    echo_args: Vec<String>,
    /// The lab.
    pub lab: Lab,
}

fn pod_ip() -> IpAddr {
    POD_V4
        .parse()
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(100, 96, 1, 10)))
}

impl Topo {
    /// Builds everything the selected planes need and checks every path once.
    /// `echo_conns` sizes the echo server. On failure the process logs are copied to
    /// `<cfg.out>/logs` before the topology is removed.
    pub fn build(cfg: &Config, echo_conns: usize) -> Result<Self> {
        let prefix = format!("vbench{}", std::process::id() % 100_000);
        let mut lab = Lab::with_prefix(&prefix, LabOptions::default())?;
        let (rt, mtls, ovpn, forwarder) = match Self::start(&mut lab, cfg, echo_conns) {
            Ok(parts) => parts,
            Err(e) => {
                save_logs(lab.dir(), &cfg.out);
                return Err(e);
            }
        };
        let topo = Self {
            forwarder,
            rt,
            mtls,
            ovpn,
            echo_args: echo_args(echo_conns),
            lab,
        };
        if let Err(e) = topo.check() {
            save_logs(topo.dir(), &cfg.out);
            return Err(e);
        }
        Ok(topo)
    }

    /// Links, servers, ingress, the product, the seed runtime and the OpenVPN files.
    #[allow(clippy::type_complexity)]
    fn start(
        lab: &mut Lab,
        cfg: &Config,
        echo_conns: usize,
    ) -> Result<(
        NsRuntime,
        Arc<MtlsProxy>,
        Option<OpenVpn>,
        Option<Forwarder>,
    )> {
        veth(&lab.seeds[0], "direct0", &lab.pod, "direct0")?;
        lab.seeds[0].addr("direct0", DIRECT_SEED)?;
        lab.pod.addr("direct0", &format!("{DIRECT_POD}/30"))?;
        // Rounds of 10k short-lived connections to one pod port must not run out of source
        // ports while earlier ones sit in TIME_WAIT (the bench's and the seed server's).
        lab.seeds[0].sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        lab.seeds[0].sysctl("net.ipv4.tcp_tw_reuse", "1")?;

        lab.start_pod_server()?;
        let pod = lab.pod.name().to_owned();
        let mut ports = vec![ECHO_PORT];
        if [Group::Throughput, Group::Raw, Group::Cpu]
            .iter()
            .any(|g| cfg.has(*g))
        {
            let iperf_args: Vec<String> = vec!["-s".into(), "-p".into(), iperf::PORT.to_string()];
            lab.spawn_in("iperf3-server", &pod, Path::new("iperf3"), &iperf_args)?;
            ports.push(iperf::PORT);
        }
        let me = std::env::current_exe().context("locate the bench binary")?;
        lab.spawn_in("echo", &pod, &me, &echo_args(echo_conns))?;
        for port in ports {
            wait_tcp_listen(
                &lab.pod,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                START_TIMEOUT,
            )?;
        }

        spawn_ingress(lab)?;
        wait_tcp_listen(&lab.gw, INGRESS.parse()?, START_TIMEOUT)?;

        lab.start_server(0)?;
        lab.start_client(0)?;
        lab.wait_all_up(START_TIMEOUT)?;

        let rt = NsRuntime::new(&lab.seeds[0], 2)?;
        let mtls = Arc::new(MtlsProxy::new(PROXY_TCP.parse()?, &lab.pki)?);
        let want_ovpn = cfg.planes.contains(&Plane::OpenVpn);
        let ovpn = if want_ovpn {
            let files = openvpn::prepare(&lab.dir().join("openvpn"), cfg.ovpn_nodelay)?;
            openvpn::shoot_nat(&lab.shoots[0], SHOOT_POD_IF, lab.dir())?;
            Some(files)
        } else {
            None
        };
        let forwarder = if cfg.planes.contains(&Plane::Product)
            && (cfg.has(Group::Throughput) || cfg.has(Group::Cpu))
        {
            Some(Forwarder::start(
                &rt,
                lab.uds(0),
                SocketAddr::new(pod_ip(), iperf::PORT),
            )?)
        } else {
            None
        };
        Ok((rt, mtls, ovpn, forwarder))
    }

    /// A `GET` over every route once; this also proves the runtime's threads are in the seed
    /// namespace.
    fn check(&self) -> Result<()> {
        for (what, route) in [
            ("direct veth", self.route(Plane::Direct)),
            ("product over the UDS", self.route(Plane::Product)),
            ("product over mTLS", self.rate_route(Plane::Product)),
            ("product raw TUN", self.raw_route()),
        ] {
            first_success(&self.rt, &route, Duration::from_secs(10))
                .with_context(|| format!("sanity check: GET through the {what}"))?;
        }
        Ok(())
    }

    /// Restarts the pod's echo server if connections of an earlier test are still open on it
    /// (a close that never arrived); returns how many there were.
    pub fn reset_echo_if_dirty(&mut self) -> Result<usize> {
        let left = port_conns(&self.lab.pod, ECHO_PORT)?;
        if left > 0 {
            self.lab.stop("echo")?;
            let pod = self.lab.pod.name().to_owned();
            let me = std::env::current_exe().context("locate the bench binary")?;
            self.lab.spawn_in("echo", &pod, &me, &self.echo_args)?;
            wait_listen(&self.lab.pod, ECHO_PORT, START_TIMEOUT)?;
        }
        Ok(left)
    }

    /// Copies the process logs to `<out>/logs` (best effort).
    pub fn save_logs(&self, out: &Path) {
        save_logs(self.dir(), out);
    }

    /// The lab's directory (logs, keys, configurations).
    pub fn dir(&self) -> &Path {
        self.lab.dir()
    }

    /// Route to the pod for streams: direct veth, CONNECT over the UDS, or OpenVPN's TUN.
    pub fn route(&self, plane: Plane) -> Route {
        match plane {
            Plane::Direct => Route::Tcp(IpAddr::V4(DIRECT_POD)),
            Plane::Product => Route::Uds(self.lab.uds(0), pod_ip()),
            Plane::OpenVpn => Route::Tcp(pod_ip()),
        }
    }

    /// Route for the connection-rate test: for the product a new mTLS connection per CONNECT.
    pub fn rate_route(&self, plane: Plane) -> Route {
        match plane {
            Plane::Product => Route::Mtls(Arc::clone(&self.mtls), pod_ip()),
            p => self.route(p),
        }
    }

    /// The product's data plane without the proxy: TCP bound to the seed TUN.
    pub fn raw_route(&self) -> Route {
        Route::Bound(pod_ip(), SEED_TUN.into())
    }

    /// Where iperf3 connects (host, port, `--bind-dev`). `raw` only for the product.
    pub fn iperf_target(&self, plane: Plane, raw: bool) -> Result<(String, u16, Option<String>)> {
        Ok(match (plane, raw) {
            (Plane::Direct, _) => (DIRECT_POD.to_string(), iperf::PORT, None),
            (Plane::Product, true) => (POD_V4.into(), iperf::PORT, Some(SEED_TUN.into())),
            (Plane::Product, false) => {
                let f = self
                    .forwarder
                    .as_ref()
                    .context("no forwarder (throughput and cpu rows not selected)")?;
                (f.addr.ip().to_string(), f.addr.port(), None)
            }
            (Plane::OpenVpn, _) => (POD_V4.into(), iperf::PORT, None),
        })
    }

    /// The plane's processes as (role, PID): `server` then `client`; none for direct.
    pub fn pids(&self, plane: Plane) -> Vec<(&'static str, u32)> {
        let names = match plane {
            Plane::Direct => return Vec::new(),
            Plane::Product => [SEED_SERVER, SHOOT_CLIENT],
            Plane::OpenVpn => [OVPN_SERVER, OVPN_CLIENT],
        };
        ["server", "client"]
            .into_iter()
            .zip(names)
            .filter_map(|(role, n)| self.lab.proc(n).map(|p| (role, p.pid())))
            .collect()
    }

    /// PID of the ingress stand-in.
    pub fn ingress_pid(&self) -> Option<u32> {
        self.lab.proc("ingress").map(|p| p.pid())
    }

    /// The tunnel port of the plane's server.
    pub fn server_port(&self, plane: Plane) -> Result<u16> {
        match plane {
            Plane::Direct => bail!("the direct path has no server"),
            Plane::Product => Ok(PRODUCT_PORT),
            Plane::OpenVpn => Ok(openvpn::SERVER_PORT),
        }
    }

    fn ovpn(&self) -> Result<&OpenVpn> {
        self.ovpn.as_ref().context("OpenVPN was not prepared")
    }

    fn running(&mut self, name: &str) -> bool {
        self.lab.proc_mut(name).is_some_and(|p| p.is_running())
    }

    /// Makes the plane carry traffic: starts what is not running and waits for a `GET`
    /// through it.
    pub fn bring_up(&mut self, plane: Plane) -> Result<()> {
        match plane {
            Plane::Direct => return Ok(()),
            Plane::Product => {
                if !self.running(SEED_SERVER) {
                    self.spawn_server(plane)?;
                }
                if !self.running(SHOOT_CLIENT) {
                    self.spawn_client(plane)?;
                }
                self.lab.wait_all_up(UP_TIMEOUT)?;
            }
            Plane::OpenVpn => {
                if !self.running(OVPN_SERVER) {
                    self.spawn_server(plane)?;
                    wait_listen(&self.lab.seeds[0], openvpn::SERVER_PORT, START_TIMEOUT)
                        .context("OpenVPN server does not listen")?;
                }
                if !self.running(OVPN_CLIENT) {
                    self.spawn_client(plane)?;
                }
            }
        }
        first_success(&self.rt, &self.route(plane), UP_TIMEOUT)
            .with_context(|| format!("{plane} does not carry traffic"))?;
        Ok(())
    }

    /// Stops the plane's processes if it has its own (OpenVPN runs only during its turn).
    pub fn take_down(&mut self, plane: Plane) -> Result<()> {
        if plane == Plane::OpenVpn {
            self.lab.stop(OVPN_CLIENT)?;
            self.lab.stop(OVPN_SERVER)?;
        }
        Ok(())
    }

    /// Stops the plane's client (SIGTERM, then SIGKILL) and waits until it is gone.
    pub fn stop_client(&mut self, plane: Plane) -> Result<()> {
        match plane {
            Plane::Direct => bail!("the direct path has no client"),
            Plane::Product => self.lab.stop(SHOOT_CLIENT),
            Plane::OpenVpn => self.lab.stop(OVPN_CLIENT),
        }
    }

    /// Spawns the plane's client without waiting for it.
    pub fn spawn_client(&mut self, plane: Plane) -> Result<()> {
        let shoot = self.lab.shoots[0].name().to_owned();
        match plane {
            Plane::Direct => bail!("the direct path has no client"),
            Plane::Product => {
                let (_, key) = self.lab.keys();
                let args = self.lab.client_args_for(&key.private_file);
                let bin = try_bin("vpn-shoot-client")?;
                self.lab.spawn_in(SHOOT_CLIENT, &shoot, &bin, &args)
            }
            Plane::OpenVpn => {
                let args = self.ovpn()?.client_args();
                self.lab
                    .spawn_in(OVPN_CLIENT, &shoot, Path::new("openvpn"), &args)
            }
        }
    }

    /// Kills the plane's server with SIGKILL (a crash: no cleanup).
    pub fn kill_server(&mut self, plane: Plane) -> Result<()> {
        let name = match plane {
            Plane::Direct => bail!("the direct path has no server"),
            Plane::Product => SEED_SERVER,
            Plane::OpenVpn => OVPN_SERVER,
        };
        match self.lab.proc_mut(name) {
            Some(p) => p.kill9(),
            None => bail!("{name} is not running"),
        }
    }

    /// Spawns the plane's server without waiting for it.
    pub fn spawn_server(&mut self, plane: Plane) -> Result<()> {
        let seed = self.lab.seeds[0].name().to_owned();
        match plane {
            Plane::Direct => bail!("the direct path has no server"),
            Plane::Product => {
                let (_, client) = self.lab.keys();
                let args = self.lab.server_args_with(0, &[client.public]);
                let bin = try_bin("vpn-seed-server")?;
                self.lab.spawn_in(SEED_SERVER, &seed, &bin, &args)
            }
            Plane::OpenVpn => {
                let args = self.ovpn()?.server_args();
                self.lab
                    .spawn_in(OVPN_SERVER, &seed, Path::new("openvpn"), &args)
            }
        }
    }

    /// SIGKILLs the ingress (both planes' tunnels go through it).
    pub fn kill_ingress(&mut self) -> Result<()> {
        self.lab.kill_ingress()
    }

    /// Starts the ingress again without waiting for it.
    pub fn spawn_ingress(&mut self) -> Result<()> {
        spawn_ingress(&mut self.lab)
    }

    /// Leaves namespaces and processes running; returns the lab's prefix and directory.
    pub fn keep(self) -> (String, PathBuf) {
        let Self {
            forwarder, rt, lab, ..
        } = self;
        drop(forwarder);
        drop(rt);
        let prefix = lab.prefix.clone();
        (prefix, lab.keep())
    }
}

/// Starts the ingress stand-in with a route for each plane.
fn spawn_ingress(lab: &mut Lab) -> Result<()> {
    let mut ingress = lab.ingress_args();
    ingress.extend([
        "--route".into(),
        openvpn::ingress_route(),
        "--max-connections".into(),
        "4096".into(),
    ]);
    let gw = lab.gw.name().to_owned();
    lab.spawn_in("ingress", &gw, &try_bin("ingress-standin")?, &ingress)
}

/// Arguments of the pod's echo server (`bench echo`).
fn echo_args(max_conns: usize) -> Vec<String> {
    vec![
        "echo".into(),
        "--listen".into(),
        format!("0.0.0.0:{ECHO_PORT}"),
        "--max-conns".into(),
        max_conns.to_string(),
    ]
}

/// Copies `*.log` files of `dir` (and of its `openvpn` subdirectory) to `<out>/logs`.
fn save_logs(dir: &Path, out: &Path) {
    let dest = out.join("logs");
    if std::fs::create_dir_all(&dest).is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            if let Some(name) = p.file_name() {
                let _ = std::fs::copy(&p, dest.join(name));
            }
        }
    }
    eprintln!("process logs copied to {}", dest.display());
}
