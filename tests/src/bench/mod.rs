//! The benchmark behind `scripts/bench.sh`: the reversed VPN against the direct path (one veth
//! between seed and pod) and, when installed, OpenVPN 2.6 over TCP through the same CONNECT
//! ingress, all in one topology built from [`crate::lab::Lab`].
//!
//! One module per measurement ([`iperf`], [`rr`], [`rate`], [`startup`], [`conns`]); [`runner`]
//! walks rounds × planes × measurements and [`report`] turns the samples into the table.
//! Every wait has a deadline, every loop a time and count bound, and Ctrl-C ends the run
//! through the normal teardown.

pub mod conns;
pub mod echo;
pub mod forwarder;
pub mod iperf;
pub mod nsrt;
pub mod openvpn;
pub mod rate;
pub mod report;
pub mod route;
pub mod rr;
pub mod runner;
pub mod startup;
pub mod stats;
pub mod sys;
pub mod topo;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Result};

/// A data path from the seed to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Plane {
    /// One veth between the seed and the pod namespaces: the machine's ceiling.
    Direct,
    /// vpn-seed-server + vpn-shoot-client through the ingress stand-in.
    Product,
    /// OpenVPN 2.6, TCP, client through the same ingress.
    OpenVpn,
}

impl Plane {
    /// All planes, in table order.
    pub const ALL: [Plane; 3] = [Plane::Direct, Plane::Product, Plane::OpenVpn];

    /// Name on the command line and in the JSON results.
    pub fn name(self) -> &'static str {
        match self {
            Plane::Direct => "direct",
            Plane::Product => "product",
            Plane::OpenVpn => "openvpn",
        }
    }

    /// Column header in the table.
    pub fn title(self) -> &'static str {
        match self {
            Plane::Direct => "direct veth",
            Plane::Product => "product",
            Plane::OpenVpn => "OpenVPN 2.6 TCP",
        }
    }

    /// Parses a plane name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "direct" => Ok(Plane::Direct),
            "product" => Ok(Plane::Product),
            "openvpn" | "ovpn" => Ok(Plane::OpenVpn),
            other => bail!("unknown plane {other:?} (direct, product, openvpn)"),
        }
    }
}

impl fmt::Display for Plane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A group of table rows that is measured together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// iperf3 through the plane (for the product: through an established CONNECT).
    Throughput,
    /// The product's data plane without the proxy (iperf3 and ping-pong bound to the seed TUN).
    Raw,
    /// CPU seconds per GB during the single-stream iperf3 runs.
    Cpu,
    /// 64-byte TCP ping-pong p50/p99.
    Latency,
    /// kube-apiserver-style CONNECT rate (new connection + GET per operation).
    Rate,
    /// Client start to first byte through the tunnel.
    Startup,
    /// Server restart to first byte through the tunnel.
    Recovery,
    /// RSS idle and with many concurrent proxied connections.
    Conns,
}

impl Group {
    /// All groups, in table order.
    pub const ALL: [Group; 8] = [
        Group::Throughput,
        Group::Raw,
        Group::Cpu,
        Group::Latency,
        Group::Rate,
        Group::Conns,
        Group::Startup,
        Group::Recovery,
    ];

    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Group::Throughput => "throughput",
            Group::Raw => "raw",
            Group::Cpu => "cpu",
            Group::Latency => "latency",
            Group::Rate => "rate",
            Group::Startup => "startup",
            Group::Recovery => "recovery",
            Group::Conns => "conns",
        }
    }

    /// Parses a group name.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|g| g.name()).collect();
                anyhow::anyhow!("unknown row group {s:?} ({})", names.join(", "))
            })
    }
}

/// What to measure and how long.
#[derive(Debug, Clone)]
pub struct Config {
    /// Interleaved rounds (each round visits every plane once).
    pub rounds: u32,
    /// iperf3 `-t` in seconds.
    pub iperf_secs: u64,
    /// Duration of one ping-pong run.
    pub rr_time: Duration,
    /// Duration of one CONNECT-rate run.
    pub rate_time: Duration,
    /// Concurrent workers of the CONNECT-rate run.
    pub rate_workers: usize,
    /// Concurrent connections of the connection/RSS test.
    pub conns: usize,
    /// Planes to measure, in order.
    pub planes: Vec<Plane>,
    /// Row groups to measure.
    pub groups: Vec<Group>,
    /// Results directory.
    pub out: PathBuf,
    /// Leave the topology running afterwards.
    pub keep: bool,
    /// Add `tcp-nodelay` to the OpenVPN server (production configs do not set it).
    pub ovpn_nodelay: bool,
}

impl Config {
    /// Whether row group `g` was selected.
    pub fn has(&self, g: Group) -> bool {
        self.groups.contains(&g)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks the run as interrupted (Ctrl-C or SIGTERM); every loop of the bench stops soon after.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether the run was interrupted.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once the run was interrupted, for `?` in loops.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}
