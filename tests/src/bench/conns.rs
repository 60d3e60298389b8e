//! Many concurrent connections: RSS of the plane's processes idle and while N connections
//! to the pod's echo server are open at once (for the product: N CONNECTs over the proxy's
//! Unix socket, held open), and how long opening them took.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::route::{BoxStream, Route};
use super::sys::{rss_kib, wait_port_idle};
use super::topo::{Topo, ECHO_PORT};
use super::Plane;

/// Connection attempts in flight while opening.
const OPEN_CONCURRENCY: usize = 128;
/// Deadline of one connection attempt.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Every n-th connection is checked with an echo round trip once all are open.
const CHECK_EVERY: usize = 100;
/// Deadline for the pod to see every close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before RSS is read, so lazily allocated buffers are counted.
const SETTLE: Duration = Duration::from_secs(1);

/// RSS of one process, MiB.
#[derive(Debug, Clone)]
pub struct Rss {
    /// Role (`server`, `client`).
    pub role: &'static str,
    /// Right before the connections were opened.
    pub before: f64,
    /// With all connections open.
    pub loaded: f64,
    /// After the connections were closed again.
    pub after: f64,
}

/// Result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Connections opened.
    pub opened: usize,
    /// Seconds to open them.
    pub open_s: f64,
    /// Seconds from closing them until the pod had seen every close, or what was left.
    pub drain_s: std::result::Result<f64, String>,
    /// RSS per process of the plane.
    pub rss: Vec<Rss>,
}

/// RSS of `pid` in MiB (NaN if it cannot be read).
pub fn mib(pid: u32) -> f64 {
    rss_kib(pid).map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN)
}

async fn open_all(route: Route, n: usize) -> Result<(Vec<BoxStream>, Duration)> {
    let start = Instant::now();
    let mut open = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let mut launched = 0;
    let mut first_error = None;
    while open.len() < n {
        if super::interrupted() {
            bail!("interrupted");
        }
        while launched < n && set.len() < OPEN_CONCURRENCY && first_error.is_none() {
            let r = route.clone();
            set.spawn(
                async move { tokio::time::timeout(OPEN_TIMEOUT, r.connect(ECHO_PORT)).await },
            );
            launched += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(Ok(s)))) => open.push(s),
            Some(Ok(Ok(Err(e)))) => {
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Some(Ok(Err(_))) => {
                first_error.get_or_insert_with(|| format!("timed out after {OPEN_TIMEOUT:?}"));
            }
            Some(Err(e)) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
            None => break,
        }
    }
    let took = start.elapsed();
    if let Some(e) = first_error {
        bail!(
            "opened only {} of {n} connections in {took:?}: {e}",
            open.len()
        );
    }
    // Every n-th connection must really reach the echo server (pipelined: all writes, then
    // all reads, so a slow path costs one round trip, not one per connection).
    let check = async {
        for s in open.iter_mut().step_by(CHECK_EVERY) {
            s.write_all(&[0x42]).await?;
        }
        for s in open.iter_mut().step_by(CHECK_EVERY) {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            if b != [0x42] {
                bail!("a connection echoed {b:?}");
            }
        }
        Ok(())
    };
    match tokio::time::timeout(OPEN_TIMEOUT, check).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("echo check over {n} connections: {e:#}"),
        Err(_) => bail!("echo check over {n} connections timed out"),
    }
    Ok((open, took))
}

/// Opens `n` connections to the echo server over the plane's route, holds them while the RSS
/// of the plane's processes is read, then closes them and waits until the pod has seen every
/// close (so no half-open connection outlives the turn).
pub fn run(topo: &Topo, plane: Plane, n: usize) -> Result<Outcome> {
    let procs = topo.pids(plane);
    let before: Vec<f64> = procs.iter().map(|(_, p)| mib(*p)).collect();
    let route = topo.route(plane);
    let pids: Vec<u32> = procs.iter().map(|(_, p)| *p).collect();
    let budget = OPEN_TIMEOUT * 2 + Duration::from_secs(60 + n as u64 / 50);
    let (took, loaded, closed_at) = topo.rt.run(budget, async move {
        let (open, took) = open_all(route, n).await?;
        tokio::time::sleep(SETTLE).await;
        let loaded: Vec<f64> = pids.iter().map(|p| mib(*p)).collect();
        let closed_at = Instant::now();
        drop(open);
        Ok::<_, anyhow::Error>((took, loaded, closed_at))
    })??;
    let drained = wait_port_idle(&topo.lab.pod, ECHO_PORT, DRAIN_TIMEOUT)
        .map(|_| closed_at.elapsed().as_secs_f64());
    let rss = procs
        .iter()
        .zip(before.iter().zip(&loaded))
        .map(|((role, pid), (b, l))| Rss {
            role,
            before: *b,
            loaded: *l,
            after: mib(*pid),
        })
        .collect();
    Ok(Outcome {
        opened: n,
        open_s: took.as_secs_f64(),
        drain_s: drained.map_err(|e| format!("{e:#}")),
        rss,
    })
}
