//! Soak: the lab ([`Lab::up`] with `big.bin`) under mixed load for a long time, with the
//! ingress killed (SIGKILL) and restarted periodically, while the seed server's and the shoot
//! client's memory (VmRSS) and open descriptors are sampled.
//!
//! The load, all through the seed server's egress proxy:
//! - bulk: the pod's 64 MiB `big.bin`, downloaded again and again with curl over mTLS (as
//!   kube-apiserver), rate-capped; every completed transfer's sha256 is compared with the file's;
//! - churn: a new CONNECT + `GET /index.html` over the UDS every `churn_interval`, each on its
//!   own thread (a hanging one never delays the next), body checked;
//! - idle: long-lived CONNECTs opened at the start, each asking `GET /whoami` on its persistent
//!   HTTP/1.1 stream periodically and at the end.
//!
//! Every ingress kill opens a *reconnect window* from the kill until both `/readyz` answer 200
//! again, plus a margin. No attempt may fail, inside a window or outside (the seed server holds
//! requests while the tunnel reconnects); the windows say where failures fell, if any.
//! [`run`] returns a [`SoakReport`]; [`SoakReport::goals`] says what passed.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::client::{connect_uds, http_get};
use crate::lab::{hex, Lab, LabOptions, BIG_SIZE, POD_INDEX, POD_PORT, POD_V4, PROXY_TCP};
use crate::load::ask_whoami;

/// Process name of the seed server in [`Lab`].
pub const SEED_SERVER: &str = "seed-server";
/// Process name of the shoot client in [`Lab`].
pub const SHOOT_CLIENT: &str = "shoot-client";
/// Read/write timeout of one churn attempt.
pub const CHURN_TIMEOUT: Duration = Duration::from_secs(3);
/// Most churn attempts in flight at once (more are skipped and counted).
pub const CHURN_MAX_IN_FLIGHT: usize = 64;
/// Read/write timeout of one use of an idle connection: longer than a reconnect window plus
/// TCP's retransmission backoff, so a use sent at a kill is answered, not abandoned.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed bulk transfer before the next one.
pub const BULK_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long the tunnel may take to come back after an ingress restart.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the descriptor counts may take to settle after the load stopped.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest warm-up chosen by default ([`SoakOptions::warmup`] `None`).
pub const DEFAULT_WARMUP_MAX: Duration = Duration::from_secs(60);

/// What the soak does and what it accepts.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the load runs.
    pub duration: Duration,
    /// Time between ingress kills (`None`: never killed).
    pub kill_interval: Option<Duration>,
    /// Time between the kill and the restart of the ingress.
    pub kill_pause: Duration,
    /// Time between RSS/fd samples.
    pub sample_interval: Duration,
    /// Samples before this are warm-up; `None`: a fifth of `duration`, at most 60 s.
    pub warmup: Option<Duration>,
    /// Time between short CONNECTs.
    pub churn_interval: Duration,
    /// Number of long idle CONNECTs.
    pub idle_connections: usize,
    /// Time between uses of the idle CONNECTs.
    pub idle_use_interval: Duration,
    /// curl `--limit-rate` of the bulk transfers (e.g. `20M`).
    pub bulk_rate: String,
    /// curl `-m` of one bulk transfer.
    pub bulk_max_time: Duration,
    /// Most RSS growth (bytes) allowed between the post-warm-up sample and the last.
    pub rss_growth_limit: u64,
    /// Most open-descriptor growth allowed between the post-warm-up sample and the last.
    pub fd_slack: u64,
    /// Added to the end of every reconnect window.
    pub window_margin: Duration,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            kill_interval: Some(Duration::from_secs(30)),
            kill_pause: Duration::from_millis(500),
            sample_interval: Duration::from_secs(5),
            warmup: None,
            churn_interval: Duration::from_millis(100),
            idle_connections: 20,
            idle_use_interval: Duration::from_secs(20),
            bulk_rate: "20M".into(),
            bulk_max_time: Duration::from_secs(120),
            rss_growth_limit: 16 << 20,
            fd_slack: 8,
            window_margin: Duration::from_secs(1),
        }
    }
}

impl SoakOptions {
    /// The effective warm-up.
    pub fn warmup(&self) -> Duration {
        self.warmup
            .unwrap_or_else(|| (self.duration / 5).min(DEFAULT_WARMUP_MAX))
    }
}

/// Memory and descriptors of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// VmRSS in bytes.
    pub rss: u64,
    /// Entries of `/proc/<pid>/fd`.
    pub fds: u64,
}

/// Reads VmRSS from `/proc/<pid>/status` and counts `/proc/<pid>/fd`.
pub fn proc_stat(pid: u32) -> Result<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("read /proc/{pid}/fd"))?
        .count();
    Ok(ProcStat {
        rss: kib * 1024,
        fds: u64::try_from(fds)?,
    })
}

/// One sample of both VPN processes.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Time since the load started.
    pub at: Duration,
    /// The seed server.
    pub seed: ProcStat,
    /// The shoot client.
    pub client: ProcStat,
}

/// One ingress kill.
#[derive(Debug, Clone)]
pub struct KillEvent {
    /// When the ingress got SIGKILL (since the load started).
    pub kill: Duration,
    /// When the restarted ingress listened.
    pub restarted: Option<Duration>,
    /// When both `/readyz` answered 200 again.
    pub back: Option<Duration>,
    /// What went wrong restarting it or waiting for the tunnel.
    pub error: Option<String>,
}

impl KillEvent {
    /// The reconnect window `[kill, back + margin)`; open to the end of the run when the
    /// tunnel never came back.
    pub fn window(&self, margin: Duration) -> (Duration, Duration) {
        (self.kill, self.back.map_or(Duration::MAX, |b| b + margin))
    }
}

/// One short CONNECT.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Start (since the load started).
    pub start: Duration,
    /// End.
    pub end: Duration,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// How a bulk transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferOutcome {
    /// All bytes, right hash.
    Intact,
    /// curl succeeded but the bytes differ.
    Corrupt {
        /// Bytes received.
        bytes: u64,
        /// Their sha256.
        sha256: String,
    },
    /// curl failed.
    Failed(String),
}

/// One bulk transfer.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Start (since the load started).
    pub start: Duration,
    /// End.
    pub end: Duration,
    /// The result.
    pub outcome: TransferOutcome,
}

/// A long idle CONNECT that broke.
#[derive(Debug, Clone)]
pub struct IdleBreak {
    /// Index of the connection.
    pub index: usize,
    /// When the failing use started (since the load started).
    pub at: Duration,
    /// What went wrong.
    pub error: String,
}

/// Statistics of one series of values (RSS or fds of one binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    /// The first sample.
    pub first: u64,
    /// The first sample after the warm-up.
    pub baseline: u64,
    /// The last sample (after the load stopped).
    pub last: u64,
    /// Lowest after the warm-up.
    pub min: u64,
    /// Highest after the warm-up.
    pub max: u64,
}

impl Series {
    /// `last - baseline` (negative when it shrank).
    pub fn growth(&self) -> i64 {
        i64::try_from(self.last).unwrap_or(i64::MAX) - i64::try_from(self.baseline).unwrap_or(0)
    }

    fn of(samples: &[Sample], warmup: Duration, f: impl Fn(&Sample) -> u64) -> Option<Self> {
        let first = samples.first()?;
        let last = samples.last()?;
        let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= warmup).collect();
        let baseline = after.first().copied().unwrap_or(first);
        let values: Vec<u64> = if after.is_empty() {
            samples.iter().map(&f).collect()
        } else {
            after.iter().map(|s| f(s)).collect()
        };
        Some(Self {
            first: f(first),
            baseline: f(baseline),
            last: f(last),
            min: values.iter().copied().min().unwrap_or_default(),
            max: values.iter().copied().max().unwrap_or_default(),
        })
    }

    fn json(&self) -> Value {
        json!({
            "first": self.first, "baseline": self.baseline, "last": self.last,
            "min": self.min, "max": self.max, "growth": self.growth(),
        })
    }
}

/// One pass/fail criterion.
#[derive(Debug, Clone)]
pub struct Goal {
    /// Short name.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// The measured figure.
    pub detail: String,
}

/// Everything the soak measured.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// The options it ran with.
    pub opts: SoakOptions,
    /// How long the load really ran.
    pub ran: Duration,
    /// Every RSS/fd sample; the last one was taken after the load stopped.
    pub samples: Vec<Sample>,
    /// Samples that could not be taken (a process gone?).
    pub sample_errors: Vec<(Duration, String)>,
    /// Whether both VPN processes still ran at the end.
    pub vpn_running_at_end: bool,
    /// The ingress kills.
    pub kills: Vec<KillEvent>,
    /// The short CONNECTs, ordered by start.
    pub churn: Vec<Attempt>,
    /// Short CONNECTs skipped because too many were in flight.
    pub churn_skipped: usize,
    /// The bulk transfers, in order.
    pub transfers: Vec<Transfer>,
    /// Idle CONNECTs opened at the start.
    pub idle_opened: usize,
    /// Idle CONNECTs that still answered at the end.
    pub idle_alive: usize,
    /// Idle CONNECTs that broke.
    pub idle_breaks: Vec<IdleBreak>,
}

/// Lowercase description of a duration in seconds, e.g. `12.345s`.
fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn mib_signed(bytes: i64) -> String {
    format!("{:+.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl SoakReport {
    /// The reconnect windows of the kills.
    pub fn windows(&self) -> Vec<(Duration, Duration)> {
        self.kills
            .iter()
            .map(|k| k.window(self.opts.window_margin))
            .collect()
    }

    /// Whether `[start, end]` overlaps a reconnect window.
    pub fn in_window(&self, start: Duration, end: Duration) -> bool {
        self.windows().iter().any(|&(a, b)| end >= a && start < b)
    }

    /// RSS statistics of the seed server.
    pub fn seed_rss(&self) -> Option<Series> {
        Series::of(&self.samples, self.opts.warmup(), |s| s.seed.rss)
    }

    /// Descriptor statistics of the seed server.
    pub fn seed_fds(&self) -> Option<Series> {
        Series::of(&self.samples, self.opts.warmup(), |s| s.seed.fds)
    }

    /// RSS statistics of the shoot client.
    pub fn client_rss(&self) -> Option<Series> {
        Series::of(&self.samples, self.opts.warmup(), |s| s.client.rss)
    }

    /// Descriptor statistics of the shoot client.
    pub fn client_fds(&self) -> Option<Series> {
        Series::of(&self.samples, self.opts.warmup(), |s| s.client.fds)
    }

    /// Failed short CONNECTs that overlapped a reconnect window.
    pub fn churn_failed_inside(&self) -> usize {
        self.churn
            .iter()
            .filter(|a| a.error.is_some() && self.in_window(a.start, a.end))
            .count()
    }

    /// Why short CONNECTs failed inside the reconnect windows: error and count, most first.
    pub fn churn_inside_reasons(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for a in &self.churn {
            let Some(e) = &a.error else { continue };
            if !self.in_window(a.start, a.end) {
                continue;
            }
            match counts.iter_mut().find(|(x, _)| x == e) {
                Some((_, n)) => *n += 1,
                None => counts.push((e.clone(), 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }

    /// Failed short CONNECTs outside every reconnect window.
    pub fn churn_failed_outside(&self) -> Vec<&Attempt> {
        self.churn
            .iter()
            .filter(|a| a.error.is_some() && !self.in_window(a.start, a.end))
            .collect()
    }

    /// Transfers that finished intact.
    pub fn transfers_intact(&self) -> usize {
        self.transfers
            .iter()
            .filter(|t| t.outcome == TransferOutcome::Intact)
            .count()
    }

    /// Transfers that finished with wrong bytes.
    pub fn transfers_corrupt(&self) -> Vec<&Transfer> {
        self.transfers
            .iter()
            .filter(|t| matches!(t.outcome, TransferOutcome::Corrupt { .. }))
            .collect()
    }

    /// Transfers curl could not complete.
    pub fn transfers_failed(&self) -> Vec<&Transfer> {
        self.transfers
            .iter()
            .filter(|t| matches!(t.outcome, TransferOutcome::Failed(_)))
            .collect()
    }

    /// Failed transfers outside every reconnect window.
    pub fn transfers_failed_outside(&self) -> Vec<&Transfer> {
        self.transfers_failed()
            .into_iter()
            .filter(|t| !self.in_window(t.start, t.end))
            .collect()
    }

    /// The pass/fail criteria.
    pub fn goals(&self) -> Vec<Goal> {
        let mut g = Vec::new();
        let mut goal = |name: &str, ok: bool, detail: String| {
            g.push(Goal {
                name: name.to_owned(),
                ok,
                detail,
            });
        };
        let limit = i64::try_from(self.opts.rss_growth_limit).unwrap_or(i64::MAX);
        let slack = i64::try_from(self.opts.fd_slack).unwrap_or(i64::MAX);
        for (bin, rss, fds) in [
            ("seed server", self.seed_rss(), self.seed_fds()),
            ("shoot client", self.client_rss(), self.client_fds()),
        ] {
            match rss {
                Some(s) => goal(
                    &format!(
                        "{bin} RSS growth after warm-up ≤ {}",
                        mib(self.opts.rss_growth_limit)
                    ),
                    s.growth() <= limit,
                    format!(
                        "{} → {} ({})",
                        mib(s.baseline),
                        mib(s.last),
                        mib_signed(s.growth())
                    ),
                ),
                None => goal(&format!("{bin} RSS sampled"), false, "no samples".into()),
            }
            if let Some(s) = fds {
                goal(
                    &format!("{bin} fd growth after warm-up ≤ {}", self.opts.fd_slack),
                    s.growth() <= slack,
                    format!("{} → {} ({:+})", s.baseline, s.last, s.growth()),
                );
            }
        }
        goal(
            "both VPN processes ran throughout",
            self.vpn_running_at_end && self.sample_errors.is_empty(),
            format!(
                "running at the end: {}, failed samples: {}",
                self.vpn_running_at_end,
                self.sample_errors.len()
            ),
        );
        let unrecovered = self.kills.iter().filter(|k| k.back.is_none()).count();
        goal(
            "the tunnel came back after every ingress kill",
            unrecovered == 0,
            format!("{} kills, {unrecovered} without recovery", self.kills.len()),
        );
        let failed = self.churn.iter().filter(|a| a.error.is_some()).count();
        goal(
            "no short CONNECT failed, also inside the reconnect windows",
            failed == 0,
            format!(
                "{failed} of {} ({} outside the windows)",
                self.churn.len(),
                self.churn_failed_outside().len()
            ),
        );
        let ok_churn = self.churn.iter().filter(|a| a.error.is_none()).count();
        goal(
            "short CONNECTs ran",
            ok_churn > 0 && self.churn_skipped == 0,
            format!("{ok_churn} succeeded, {} skipped", self.churn_skipped),
        );
        let corrupt = self.transfers_corrupt().len();
        goal(
            "no corrupt transfer",
            corrupt == 0,
            format!("{corrupt} of {}", self.transfers.len()),
        );
        let failed = self.transfers_failed().len();
        goal(
            "no transfer failed, also inside the reconnect windows",
            failed == 0,
            format!(
                "{failed} of {} ({} outside the windows)",
                self.transfers.len(),
                self.transfers_failed_outside().len()
            ),
        );
        goal(
            "every idle CONNECT alive at the end, none broke",
            self.idle_alive == self.idle_opened && self.idle_breaks.is_empty(),
            format!(
                "{} of {} alive, {} breaks",
                self.idle_alive,
                self.idle_opened,
                self.idle_breaks.len()
            ),
        );
        goal(
            "at least one transfer intact",
            self.transfers_intact() > 0,
            format!("{}", self.transfers_intact()),
        );
        g
    }

    /// Whether every goal held.
    pub fn passed(&self) -> bool {
        self.goals().iter().all(|g| g.ok)
    }

    /// The goals that failed, one per line.
    pub fn failures(&self) -> String {
        self.goals()
            .iter()
            .filter(|g| !g.ok)
            .map(|g| format!("{}: {}\n", g.name, g.detail))
            .collect()
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let series = |s: Option<Series>| s.map_or(Value::Null, |s| s.json());
        json!({
            "options": {
                "duration_s": self.opts.duration.as_secs_f64(),
                "kill_interval_s": self.opts.kill_interval.map(|d| d.as_secs_f64()),
                "kill_pause_s": self.opts.kill_pause.as_secs_f64(),
                "sample_interval_s": self.opts.sample_interval.as_secs_f64(),
                "warmup_s": self.opts.warmup().as_secs_f64(),
                "churn_interval_s": self.opts.churn_interval.as_secs_f64(),
                "idle_connections": self.opts.idle_connections,
                "idle_use_interval_s": self.opts.idle_use_interval.as_secs_f64(),
                "bulk_rate": self.opts.bulk_rate,
                "rss_growth_limit_bytes": self.opts.rss_growth_limit,
                "fd_slack": self.opts.fd_slack,
                "window_margin_s": self.opts.window_margin.as_secs_f64(),
            },
            "ran_s": self.ran.as_secs_f64(),
            "passed": self.passed(),
            "goals": self.goals().iter().map(|g| json!({
                "name": g.name, "ok": g.ok, "detail": g.detail,
            })).collect::<Vec<_>>(),
            "seed_server": { "rss_bytes": series(self.seed_rss()), "fds": series(self.seed_fds()) },
            "shoot_client": { "rss_bytes": series(self.client_rss()), "fds": series(self.client_fds()) },
            "samples": self.samples.iter().map(|s| json!({
                "at_s": s.at.as_secs_f64(),
                "seed_rss": s.seed.rss, "seed_fds": s.seed.fds,
                "client_rss": s.client.rss, "client_fds": s.client.fds,
            })).collect::<Vec<_>>(),
            "sample_errors": self.sample_errors.iter().map(|(at, e)| json!({
                "at_s": at.as_secs_f64(), "error": e,
            })).collect::<Vec<_>>(),
            "vpn_running_at_end": self.vpn_running_at_end,
            "kills": self.kills.iter().map(|k| json!({
                "kill_s": k.kill.as_secs_f64(),
                "restarted_s": k.restarted.map(|d| d.as_secs_f64()),
                "back_s": k.back.map(|d| d.as_secs_f64()),
                "error": k.error,
            })).collect::<Vec<_>>(),
            "churn": {
                "total": self.churn.len(),
                "ok": self.churn.iter().filter(|a| a.error.is_none()).count(),
                "skipped": self.churn_skipped,
                "failed_inside_windows": self.churn_failed_inside(),
                "inside_reasons": self.churn_inside_reasons().iter().map(|(e, n)| json!({
                    "error": e, "count": n,
                })).collect::<Vec<_>>(),
                "failed_outside_windows": self.churn_failed_outside().iter().map(|a| json!({
                    "start_s": a.start.as_secs_f64(), "end_s": a.end.as_secs_f64(),
                    "error": a.error,
                })).collect::<Vec<_>>(),
            },
            "transfers": {
                "started": self.transfers.len(),
                "completed": self.transfers.len() - self.transfers_failed().len(),
                "intact": self.transfers_intact(),
                "corrupt": self.transfers_corrupt().len(),
                "failed": self.transfers.iter().filter_map(|t| match &t.outcome {
                    TransferOutcome::Failed(e) => Some(json!({
                        "start_s": t.start.as_secs_f64(), "end_s": t.end.as_secs_f64(),
                        "error": e, "inside_window": self.in_window(t.start, t.end),
                    })),
                    _ => None,
                }).collect::<Vec<_>>(),
                "durations_s": self.transfers.iter()
                    .map(|t| (t.end.saturating_sub(t.start)).as_secs_f64())
                    .collect::<Vec<_>>(),
            },
            "idle": {
                "opened": self.idle_opened,
                "alive_at_end": self.idle_alive,
                "breaks": self.idle_breaks.iter().map(|b| json!({
                    "index": b.index, "at_s": b.at.as_secs_f64(), "error": b.error,
                    "inside_window": self.in_window(b.at, b.at),
                })).collect::<Vec<_>>(),
            },
        })
    }
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "soak report: ran {} (warm-up {}), {} samples",
            secs(self.ran),
            secs(self.opts.warmup()),
            self.samples.len()
        )?;
        for (bin, rss, fds) in [
            ("seed server ", self.seed_rss(), self.seed_fds()),
            ("shoot client", self.client_rss(), self.client_fds()),
        ] {
            if let Some(s) = rss {
                writeln!(
                    f,
                    "  {bin} RSS: first {}, after warm-up {} (min {}, max {}), last {}, growth {}",
                    mib(s.first),
                    mib(s.baseline),
                    mib(s.min),
                    mib(s.max),
                    mib(s.last),
                    mib_signed(s.growth())
                )?;
            }
            if let Some(s) = fds {
                writeln!(
                    f,
                    "  {bin} fds: first {}, after warm-up {} (min {}, max {}), last {}, growth {:+}",
                    s.first,
                    s.baseline,
                    s.min,
                    s.max,
                    s.last,
                    s.growth()
                )?;
            }
        }
        for (at, e) in &self.sample_errors {
            writeln!(f, "  sample at {} failed: {e}", secs(*at))?;
        }
        writeln!(f, "  ingress kills: {}", self.kills.len())?;
        for k in &self.kills {
            let back = k.back.map_or("never".to_owned(), |b| {
                format!("{} (reconnect {})", secs(b), secs(b.saturating_sub(k.kill)))
            });
            let restarted = k.restarted.map_or("failed".to_owned(), secs);
            write!(
                f,
                "    killed at {}, restarted at {restarted}, tunnel back at {back}",
                secs(k.kill)
            )?;
            match &k.error {
                Some(e) => writeln!(f, ": {e}")?,
                None => writeln!(f)?,
            }
        }
        let ok = self.churn.iter().filter(|a| a.error.is_none()).count();
        let outside = self.churn_failed_outside();
        writeln!(
            f,
            "  short CONNECTs: {} ({ok} ok, {} failed inside reconnect windows, {} failed outside, {} skipped)",
            self.churn.len(),
            self.churn_failed_inside(),
            outside.len(),
            self.churn_skipped
        )?;
        for (e, n) in self.churn_inside_reasons() {
            writeln!(f, "    inside a window {n}×: {e}")?;
        }
        for a in outside {
            writeln!(
                f,
                "    outside a window at {}–{}: {}",
                secs(a.start),
                secs(a.end),
                a.error.as_deref().unwrap_or_default()
            )?;
        }
        let failed = self.transfers_failed();
        writeln!(
            f,
            "  transfers: {} started, {} completed, {} intact, {} corrupt, {} failed",
            self.transfers.len(),
            self.transfers.len() - failed.len(),
            self.transfers_intact(),
            self.transfers_corrupt().len(),
            failed.len()
        )?;
        for t in self.transfers_corrupt() {
            if let TransferOutcome::Corrupt { bytes, sha256 } = &t.outcome {
                writeln!(
                    f,
                    "    corrupt at {}–{}: {bytes} bytes, sha256 {sha256}",
                    secs(t.start),
                    secs(t.end)
                )?;
            }
        }
        for t in failed {
            if let TransferOutcome::Failed(e) = &t.outcome {
                let w = if self.in_window(t.start, t.end) {
                    "inside"
                } else {
                    "OUTSIDE"
                };
                writeln!(
                    f,
                    "    failed at {}–{} ({w} a reconnect window): {e}",
                    secs(t.start),
                    secs(t.end)
                )?;
            }
        }
        writeln!(
            f,
            "  idle CONNECTs: {} opened, {} alive at the end",
            self.idle_opened, self.idle_alive
        )?;
        for b in &self.idle_breaks {
            let w = if self.in_window(b.at, b.at) {
                "inside"
            } else {
                "outside"
            };
            writeln!(
                f,
                "    #{} broke at {} ({w} a reconnect window): {}",
                b.index,
                secs(b.at),
                b.error
            )?;
        }
        writeln!(f, "  goals:")?;
        for g in self.goals() {
            writeln!(
                f,
                "    [{}] {}: {}",
                if g.ok { "ok" } else { "FAILED" },
                g.name,
                g.detail
            )?;
        }
        write!(
            f,
            "  result: {}",
            if self.passed() { "PASSED" } else { "FAILED" }
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps until `until` or until `stop` is set, in short steps (pacing, not synchronisation).
fn pace_until(until: Instant, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// The pod's CONNECT target.
fn pod_target() -> String {
    format!("{POD_V4}:{POD_PORT}")
}

/// The first line of a response head.
fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or_default().trim()
}

/// A new CONNECT over the UDS and `GET /index.html`, body checked.
pub fn short_connect(uds: &Path, timeout: Duration) -> Result<()> {
    let target = pod_target();
    let (reply, mut s) = connect_uds(uds, &target, timeout)?;
    if reply.status != 200 {
        bail!("CONNECT answered {}", status_line(&reply.head));
    }
    let (code, body) = http_get(&mut s, &target, "/index.html")?;
    if code != 200 {
        bail!("GET /index.html answered {code}");
    }
    if body != POD_INDEX.as_bytes() {
        bail!(
            "GET /index.html: unexpected body {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

fn churn_loop(
    uds: PathBuf,
    interval: Duration,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> (Vec<Attempt>, usize) {
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut running: Vec<JoinHandle<()>> = Vec::new();
    let mut skipped = 0usize;
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        running.retain(|h| !h.is_finished());
        if running.len() < CHURN_MAX_IN_FLIGHT {
            let (uds, done) = (uds.clone(), Arc::clone(&done));
            running.push(std::thread::spawn(move || {
                let start = t0.elapsed();
                let error = short_connect(&uds, CHURN_TIMEOUT)
                    .err()
                    .map(|e| format!("{e:#}"));
                let end = t0.elapsed();
                lock(&done).push(Attempt { start, end, error });
            }));
        } else {
            skipped += 1;
        }
        next += interval;
        pace_until(next, &stop);
    }
    for h in running {
        let _ = h.join();
    }
    let mut all = std::mem::take(&mut *lock(&done));
    all.sort_by_key(|a| a.start);
    (all, skipped)
}

/// What a bulk transfer needs: curl in the seed namespace through the mTLS proxy.
#[derive(Debug, Clone)]
struct Bulk {
    seed_ns: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    rate: String,
    max_time: Duration,
    sha256: String,
}

impl Bulk {
    fn transfer(&self) -> TransferOutcome {
        match self.try_transfer() {
            Ok((bytes, sum)) if bytes == BIG_SIZE as u64 && sum == self.sha256 => {
                TransferOutcome::Intact
            }
            Ok((bytes, sha256)) => TransferOutcome::Corrupt { bytes, sha256 },
            Err(e) => TransferOutcome::Failed(format!("{e:#}")),
        }
    }

    /// Downloads `big.bin` to a pipe, hashing as it arrives: bytes and sha256.
    fn try_transfer(&self) -> Result<(u64, String)> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.seed_ns, "curl", "-sS", "-f"])
            .args(["--limit-rate", &self.rate])
            .args(["-m", &self.max_time.as_secs().to_string()])
            .args(["--proxytunnel", "--proxy", &format!("https://{PROXY_TCP}")])
            .arg("--proxy-cacert")
            .arg(&self.ca)
            .arg("--proxy-cert")
            .arg(&self.cert)
            .arg("--proxy-key")
            .arg(&self.key)
            .args(["-o", "-"])
            .arg(format!("http://{}/big.bin", pod_target()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn curl")?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        let read_res: Result<()> = (|| {
            let out = child.stdout.as_mut().context("curl stdout")?;
            loop {
                let n = out.read(&mut buf).context("read curl output")?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
        })();
        let out = child.wait_with_output().context("wait for curl")?;
        read_res?;
        if !out.status.success() {
            bail!(
                "curl {} after {bytes} bytes: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((bytes, hex(&hasher.finalize())))
    }
}

fn bulk_loop(bulk: Bulk, t0: Instant, stop: Arc<AtomicBool>) -> Vec<Transfer> {
    let mut all = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let start = t0.elapsed();
        let outcome = bulk.transfer();
        let failed = matches!(outcome, TransferOutcome::Failed(_));
        all.push(Transfer {
            start,
            end: t0.elapsed(),
            outcome,
        });
        if failed {
            // Pacing: a transfer refused at once (no tunnel) is not retried in a busy loop.
            pace_until(Instant::now() + BULK_RETRY_PAUSE, &stop);
        }
    }
    all
}

/// Opens `n` long CONNECTs to the pod, each asking `/whoami` once.
fn open_idle(uds: &Path, n: usize) -> Result<Vec<UnixStream>> {
    let target = pod_target();
    (0..n)
        .map(|i| {
            let (reply, mut s) = connect_uds(uds, &target, IDLE_TIMEOUT)
                .with_context(|| format!("open idle CONNECT #{i}"))?;
            if reply.status != 200 {
                bail!("idle CONNECT #{i}: {}", status_line(&reply.head));
            }
            ask_whoami(&mut s).with_context(|| format!("first use of idle CONNECT #{i}"))?;
            Ok(s)
        })
        .collect()
}

/// Asks `/whoami` on every live idle connection; a failing one is closed and recorded.
fn use_idle(conns: &mut [Option<UnixStream>], t0: Instant, breaks: &mut Vec<IdleBreak>) {
    for (index, slot) in conns.iter_mut().enumerate() {
        let Some(s) = slot.as_mut() else { continue };
        let at = t0.elapsed();
        if let Err(e) = ask_whoami(s) {
            breaks.push(IdleBreak {
                index,
                at,
                error: format!("{e:#}"),
            });
            *slot = None;
        }
    }
}

struct IdleResult {
    conns: Vec<Option<UnixStream>>,
    breaks: Vec<IdleBreak>,
}

fn idle_loop(
    mut conns: Vec<Option<UnixStream>>,
    every: Duration,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> IdleResult {
    let mut breaks = Vec::new();
    let mut next = Instant::now() + every;
    loop {
        pace_until(next, &stop);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        use_idle(&mut conns, t0, &mut breaks);
        next += every;
    }
    // The use at the end.
    use_idle(&mut conns, t0, &mut breaks);
    IdleResult { conns, breaks }
}

struct Sampled {
    samples: Vec<Sample>,
    errors: Vec<(Duration, String)>,
}

fn sample(seed: u32, client: u32, at: Duration) -> Result<Sample> {
    Ok(Sample {
        at,
        seed: proc_stat(seed).context("seed server")?,
        client: proc_stat(client).context("shoot client")?,
    })
}

fn sample_loop(
    seed: u32,
    client: u32,
    every: Duration,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Sampled {
    let mut s = Sampled {
        samples: Vec::new(),
        errors: Vec::new(),
    };
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let at = t0.elapsed();
        match sample(seed, client, at) {
            Ok(x) => s.samples.push(x),
            Err(e) => s.errors.push((at, format!("{e:#}"))),
        }
        next += every;
        pace_until(next, &stop);
    }
    s
}

fn pid_of(lab: &Lab, name: &str) -> Result<u32> {
    lab.procs()
        .find(|(n, _)| *n == name)
        .map(|(_, pid)| pid)
        .with_context(|| format!("no process {name} in the lab"))
}

/// Kills the ingress, waits `pause`, restarts it and waits for the tunnel.
fn kill_and_restart(lab: &mut Lab, t0: Instant, pause: Duration) -> KillEvent {
    let kill = t0.elapsed();
    let mut ev = KillEvent {
        kill,
        restarted: None,
        back: None,
        error: None,
    };
    if let Err(e) = lab.kill_ingress() {
        ev.error = Some(format!("kill: {e:#}"));
        return ev;
    }
    // The outage itself: the ingress stays down this long (not a synchronisation).
    std::thread::sleep(pause);
    if let Err(e) = lab.start_ingress() {
        ev.error = Some(format!("restart: {e:#}"));
        return ev;
    }
    ev.restarted = Some(t0.elapsed());
    match lab.wait_all_up(RECONNECT_TIMEOUT) {
        Ok(_) => ev.back = Some(t0.elapsed()),
        Err(e) => ev.error = Some(format!("{e:#}")),
    }
    ev
}

/// Brings the lab up and runs the soak on it (see the module docs).
pub fn run(opts: &SoakOptions) -> Result<SoakReport> {
    let mut lab = Lab::up(LabOptions {
        big_file: true,
        ..Default::default()
    })
    .context("bring the lab up")?;
    let res = run_on(&mut lab, opts);
    if res.is_err() {
        lab.print_logs();
    }
    res
}

/// Runs the soak on a lab that is up and has `big.bin`.
pub fn run_on(lab: &mut Lab, opts: &SoakOptions) -> Result<SoakReport> {
    let (_, sha256) = lab.big.clone().context("the lab has no big.bin")?;
    let uds = lab.uds(0);
    let seed_pid = pid_of(lab, SEED_SERVER)?;
    let client_pid = pid_of(lab, SHOOT_CLIENT)?;
    let bulk = Bulk {
        seed_ns: lab.seeds[0].name().to_owned(),
        ca: lab.pki.ca.clone(),
        cert: lab.pki.client_cert.clone(),
        key: lab.pki.client_key.clone(),
        rate: opts.bulk_rate.clone(),
        max_time: opts.bulk_max_time,
        sha256,
    };
    let idle: Vec<Option<UnixStream>> = open_idle(&uds, opts.idle_connections)?
        .into_iter()
        .map(Some)
        .collect();
    println!(
        "soak: lab {} up; {} idle CONNECTs open; load for {} (warm-up {}), ingress killed every {}",
        lab.prefix,
        idle.len(),
        secs(opts.duration),
        secs(opts.warmup()),
        opts.kill_interval.map_or("never".to_owned(), secs)
    );

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, every) = (Arc::clone(&stop), opts.sample_interval);
        std::thread::spawn(move || sample_loop(seed_pid, client_pid, every, t0, stop))
    };
    let churn = {
        let (stop, uds, every) = (Arc::clone(&stop), uds.clone(), opts.churn_interval);
        std::thread::spawn(move || churn_loop(uds, every, t0, stop))
    };
    let bulk_thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || bulk_loop(bulk, t0, stop))
    };
    let idle_thread = {
        let (stop, every) = (Arc::clone(&stop), opts.idle_use_interval);
        std::thread::spawn(move || idle_loop(idle, every, t0, stop))
    };

    let end = t0 + opts.duration;
    let mut kills = Vec::new();
    let mut next_kill = opts.kill_interval.map(|i| t0 + i);
    let mut next_report = t0 + Duration::from_secs(30);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(k) = next_kill.filter(|&k| k < end && now >= k) {
            let ev = kill_and_restart(lab, t0, opts.kill_pause);
            match (&ev.back, &ev.error) {
                (Some(b), _) => println!(
                    "soak: {}: ingress killed, tunnel back after {}",
                    secs(ev.kill),
                    secs(b.saturating_sub(ev.kill))
                ),
                (None, e) => println!(
                    "soak: {}: ingress killed, tunnel NOT back: {}",
                    secs(ev.kill),
                    e.as_deref().unwrap_or_default()
                ),
            }
            kills.push(ev);
            next_kill = opts.kill_interval.map(|i| k + i);
            continue;
        }
        if now >= next_report {
            println!("soak: {} of {}", secs(t0.elapsed()), secs(opts.duration));
            next_report += Duration::from_secs(30);
        }
        let wake = next_kill.map_or(end, |k| k.min(end)).min(next_report);
        std::thread::sleep(
            wake.saturating_duration_since(now)
                .min(Duration::from_millis(250)),
        );
    }
    let ran = t0.elapsed();
    println!("soak: load done after {}; stopping it", secs(ran));
    stop.store(true, Ordering::SeqCst);

    let joined = |what: &str| anyhow::anyhow!("the {what} thread panicked");
    let (churn, churn_skipped) = churn.join().map_err(|_| joined("churn"))?;
    let transfers = bulk_thread.join().map_err(|_| joined("bulk"))?;
    let idle = idle_thread.join().map_err(|_| joined("idle"))?;
    let mut sampled = sampler.join().map_err(|_| joined("sampler"))?;

    // The last sample, once the closed connections' descriptors are gone (or the deadline
    // passed); the idle CONNECTs are still open, as they were at the warm-up sample.
    let base = Series::of(&sampled.samples, opts.warmup(), |s| s.seed.fds)
        .zip(Series::of(&sampled.samples, opts.warmup(), |s| {
            s.client.fds
        }))
        .map(|(s, c)| (s.baseline, c.baseline));
    let mut last = None;
    let _ = crate::wait::wait_until(SETTLE_TIMEOUT, "descriptors to settle", || {
        match sample(seed_pid, client_pid, t0.elapsed()) {
            Ok(s) => {
                last = Some(s);
                base.is_none_or(|(sb, cb)| {
                    s.seed.fds <= sb + opts.fd_slack && s.client.fds <= cb + opts.fd_slack
                })
            }
            Err(e) => {
                sampled.errors.push((t0.elapsed(), format!("{e:#}")));
                true
            }
        }
    });
    sampled.samples.extend(last);
    let idle_alive = idle.conns.iter().filter(|c| c.is_some()).count();
    drop(idle.conns);

    let vpn_running_at_end = [SEED_SERVER, SHOOT_CLIENT]
        .iter()
        .all(|n| lab.proc_mut(n).is_some_and(|p| p.is_running()));
    Ok(SoakReport {
        opts: opts.clone(),
        ran,
        samples: sampled.samples,
        sample_errors: sampled.errors,
        vpn_running_at_end,
        kills,
        churn,
        churn_skipped,
        transfers,
        idle_opened: opts.idle_connections,
        idle_alive,
        idle_breaks: idle.breaks,
    })
}
