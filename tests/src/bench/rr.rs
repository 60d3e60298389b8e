//! TCP request/response latency: one 64-byte message in flight over one established
//! connection to the pod's echo server, blocking sockets, for a fixed time.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::route::Route;
use super::stats::Samples;
use crate::netns::Netns;

/// Message size.
pub const MSG: usize = 64;
/// Round trips before recording starts.
const WARMUP: u32 = 200;
/// Upper bound on round trips per run.
const MAX_ROUND_TRIPS: u64 = 5_000_000;
/// Deadline of a single round trip.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile round trip.
    pub p99_us: f64,
    /// Round trips recorded.
    pub count: u64,
}

/// Ping-pongs over `route` to the echo `port` for `time`, from a thread in `seed`.
pub fn run(seed: &Netns, route: &Route, port: u16, time: Duration) -> Result<Outcome> {
    let route = route.clone();
    seed.in_ns(move || measure(&route, port, time))?
}

fn measure(route: &Route, port: u16, time: Duration) -> Result<Outcome> {
    let mut s = route
        .connect_blocking(port, IO_TIMEOUT)
        .context("connect to the echo server")?;
    let msg = [0x5au8; MSG];
    let mut back = [0u8; MSG];
    let mut samples = Samples::default();
    for _ in 0..WARMUP {
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo (warm-up)")?;
    }
    let start = Instant::now();
    while start.elapsed() < time && samples.seen < MAX_ROUND_TRIPS {
        if samples.seen % 1024 == 0 {
            super::check_interrupt()?;
        }
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("echo")?;
        samples.push_us(t.elapsed());
        if back != msg {
            bail!("echo returned different bytes");
        }
    }
    Ok(Outcome {
        p50_us: samples.percentile(50.0).context("no round trip")?,
        p99_us: samples.percentile(99.0).context("no round trip")?,
        count: samples.seen,
    })
}
