//! iperf3 runs from the seed namespace (client) against `iperf3 -s` in the pod, with the CPU
//! time of the plane's processes taken around the run.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::sys::{cpu_seconds, wait_port_idle};
use crate::netns::Netns;

/// The pod's iperf3 server port.
pub const PORT: u16 = 5201;
/// How long to wait for the server to finish the previous test.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// One iperf3 client run.
#[derive(Debug, Clone)]
pub struct Run<'a> {
    /// Host to connect to (the pod, or the local forwarder).
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// `-t`.
    pub secs: u64,
    /// `-P`.
    pub streams: u32,
    /// `-R` (pod → seed).
    pub reverse: bool,
    /// `--bind-dev`.
    pub bind_dev: Option<String>,
    /// Where iperf3's JSON goes.
    pub json: &'a Path,
}

/// What a run moved and what it cost.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Receiver-side throughput in Mbit/s.
    pub mbps: f64,
    /// Bytes received.
    pub bytes: f64,
    /// CPU seconds each watched process used during the run (same order as the PIDs).
    pub cpu_s: Vec<f64>,
}

impl Outcome {
    /// `cpu_s` CPU seconds per GB (10^9 bytes) moved.
    pub fn per_gb(&self, cpu_s: f64) -> f64 {
        if self.bytes > 0.0 {
            cpu_s / (self.bytes / 1e9)
        } else {
            f64::NAN
        }
    }
}

/// Runs iperf3 in `seed` once the server in `pod` is idle, watching the CPU time of each of
/// `pids`; a failed run is repeated once. Each attempt is killed after `secs + 20` seconds.
pub fn run(seed: &Netns, pod: &Netns, r: &Run<'_>, pids: &[u32]) -> Result<Outcome> {
    // A new test while the server still drains the previous one is refused.
    let _ = wait_port_idle(pod, PORT, IDLE_TIMEOUT);
    match run_once(seed, r, pids) {
        Ok(o) => Ok(o),
        Err(e) => {
            super::check_interrupt()?;
            eprintln!("  iperf3 failed ({e:#}); once more");
            let _ = wait_port_idle(pod, PORT, IDLE_TIMEOUT);
            std::thread::sleep(Duration::from_secs(1));
            run_once(seed, r, pids).context("second attempt")
        }
    }
}

fn run_once(seed: &Netns, r: &Run<'_>, pids: &[u32]) -> Result<Outcome> {
    let mut args: Vec<String> = vec![
        "-c".into(),
        r.host.clone(),
        "-p".into(),
        r.port.to_string(),
        "-t".into(),
        r.secs.to_string(),
        "-P".into(),
        r.streams.to_string(),
        "-J".into(),
        "--connect-timeout".into(),
        "3000".into(),
    ];
    if r.reverse {
        args.push("-R".into());
    }
    if let Some(dev) = &r.bind_dev {
        args.push("--bind-dev".into());
        args.push(dev.clone());
    }
    let out =
        std::fs::File::create(r.json).with_context(|| format!("create {}", r.json.display()))?;
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(&[p])).collect();
    let mut child = seed
        .exec("iperf3")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .context("spawn iperf3")?;
    let deadline = Instant::now() + Duration::from_secs(r.secs + 20);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline || super::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iperf3 {} did not finish in time", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu_s = pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| cpu_seconds(&[p]) - c0)
        .collect();
    let text = std::fs::read_to_string(r.json)?;
    let (mbps, bytes) = parse(&text).with_context(|| {
        format!(
            "iperf3 {} ({status}), see {}",
            args.join(" "),
            r.json.display()
        )
    })?;
    Ok(Outcome { mbps, bytes, cpu_s })
}

/// Receiver-side Mbit/s and bytes from iperf3's JSON (`end.sum_received`).
pub fn parse(json: &str) -> Result<(f64, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let sum = v
        .pointer("/end/sum_received")
        .context("no end.sum_received in the iperf3 output")?;
    let bps = sum
        .get("bits_per_second")
        .and_then(|x| x.as_f64())
        .context("no bits_per_second")?;
    let bytes = sum.get("bytes").and_then(|x| x.as_f64()).unwrap_or(0.0);
    Ok((bps / 1e6, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf_json() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bytes":10,"bits_per_second":1},
                   "sum_received":{"bytes":2000000000,"bits_per_second":1600000000.0}}}"#;
        let (mbps, bytes) = parse(j).unwrap();
        assert_eq!((mbps, bytes), (1600.0, 2e9));
        assert!(parse(r#"{"error":"the server is busy"}"#)
            .unwrap_err()
            .to_string()
            .contains("busy"));
        let o = Outcome {
            mbps,
            bytes,
            cpu_s: vec![3.0],
        };
        assert_eq!(o.per_gb(3.0), 1.5);
    }
}
