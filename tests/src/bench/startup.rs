//! Control-plane timings: client start → first byte through the tunnel, and server restart
//! → first byte. Probes are CONNECT (or TCP) + `GET /` with short deadlines, launched every
//! [`PROBE_INTERVAL`] so a dropped SYN never hides the moment the path comes up.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;

use super::nsrt::NsRuntime;
use super::route::{http_get, Route};
use super::sys::listening_here;
use super::topo::{Topo, HTTP_PORT};
use super::Plane;
use crate::netns::Netns;

/// Time between probe launches.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Deadline of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most probes in flight.
const MAX_IN_FLIGHT: usize = 128;
/// Deadline for a (re)started client or server to carry traffic.
pub const UP_TIMEOUT: Duration = Duration::from_secs(60);

async fn probe(route: Route, host: String) -> Result<Instant> {
    let mut s = route.connect(HTTP_PORT).await?;
    let (status, at) = http_get(&mut s, &host).await?;
    if status != 200 {
        bail!("GET answered {status}");
    }
    Ok(at)
}

/// Launches probes over `route` to the pod's HTTP server until one is answered with 200;
/// returns when its first response byte arrived. Fails after `deadline`.
pub fn first_success(rt: &NsRuntime, route: &Route, deadline: Duration) -> Result<Instant> {
    let route = route.clone();
    let host = format!("{}:{HTTP_PORT}", route.ip());
    rt.run(deadline, async move {
        let mut set = JoinSet::new();
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(res) = set.join_next(), if !set.is_empty() => {
                    if let Ok(Ok(Ok(at))) = res {
                        return Ok(at);
                    }
                }
                _ = tick.tick() => {
                    if super::interrupted() {
                        bail!("interrupted");
                    }
                    if set.len() < MAX_IN_FLIGHT {
                        set.spawn(tokio::time::timeout(
                            PROBE_TIMEOUT,
                            probe(route.clone(), host.clone()),
                        ));
                    }
                }
            }
        }
    })
    .context("no answer through the tunnel")?
}

/// Polls (every millisecond) until something in `ns` listens on TCP `port`; returns when.
pub fn wait_listen(ns: &Netns, port: u16, timeout: Duration) -> Result<Instant> {
    ns.in_ns(move || {
        let start = Instant::now();
        loop {
            if listening_here(port) {
                return Ok(Instant::now());
            }
            if start.elapsed() >= timeout || super::interrupted() {
                bail!("nothing listens on port {port} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })?
}

/// Seconds from spawning the plane's client (after stopping it) to the first response byte
/// of a `GET` through the tunnel.
pub fn time_to_first_byte(topo: &mut Topo, plane: Plane) -> Result<f64> {
    topo.stop_client(plane)?;
    let route = topo.route(plane);
    let t0 = Instant::now();
    topo.spawn_client(plane)?;
    let at = first_success(&topo.rt, &route, UP_TIMEOUT)?;
    Ok(at.duration_since(t0).as_secs_f64())
}

/// Timings of a server restart, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// New server listening → first response byte through the tunnel.
    pub from_listen: f64,
    /// Old server killed → first response byte.
    pub from_kill: f64,
}

/// Ingress outages the recovery group measures, each once per round.
pub const OUTAGES: [Duration; 6] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(3),
    Duration::from_secs(4),
    Duration::from_secs(5),
];

/// For each of [`OUTAGES`]: SIGKILLs the ingress, keeps it away that long, starts it again and
/// measures seconds from its listening again to the first response byte of a `GET` through
/// the plane's tunnel (probes start when it listens). Sorted.
pub fn ingress_outages(topo: &mut Topo, plane: Plane) -> Result<Vec<f64>> {
    let route = topo.route(plane);
    let port = crate::lab::INGRESS
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .context("ingress port")?;
    let mut out = Vec::new();
    for outage in OUTAGES {
        // Traffic works before the fault.
        first_success(&topo.rt, &route, UP_TIMEOUT)?;
        topo.kill_ingress()?;
        // The outage itself (the fault's length, not a synchronization).
        std::thread::sleep(outage);
        topo.spawn_ingress()?;
        let listening = wait_listen(&topo.lab.gw, port, Duration::from_secs(15))?;
        let at = first_success(&topo.rt, &route, UP_TIMEOUT)?;
        out.push(at.saturating_duration_since(listening).as_secs_f64());
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Kills the plane's server (SIGKILL), starts it again at once and measures until a `GET`
/// through the tunnel is answered.
pub fn recovery(topo: &mut Topo, plane: Plane) -> Result<Recovery> {
    let port = topo.server_port(plane)?;
    let route = topo.route(plane);
    let killed = Instant::now();
    topo.kill_server(plane)?;
    topo.spawn_server(plane)?;
    let listening = wait_listen(&topo.lab.seeds[0], port, Duration::from_secs(15))?;
    let at = first_success(&topo.rt, &route, UP_TIMEOUT)?;
    Ok(Recovery {
        from_listen: at.duration_since(listening).as_secs_f64(),
        from_kill: at.duration_since(killed).as_secs_f64(),
    })
}
