//! kube-apiserver-style connection rate: every operation opens a new connection (for the
//! product: TCP + full mTLS handshake to the proxy + CONNECT), sends one `GET /` to the pod's
//! HTTP server and reads the answer. Concurrent workers for a fixed time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use super::nsrt::NsRuntime;
use super::route::{http_get, Route};
use super::stats::Samples;

/// Deadline of one operation.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on operations per worker.
const MAX_OPS_PER_WORKER: u64 = 1_000_000;

/// Result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Successful operations per second.
    pub ops_per_s: f64,
    /// Median time from the start of an operation to the first byte of the 200 answer, ms.
    pub p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub p99_ms: f64,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// The first failure, for the log.
    pub first_error: Option<String>,
}

struct Worker {
    samples: Samples,
    errors: u64,
    first_error: Option<String>,
}

async fn one_op(route: &Route, port: u16, host: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut s = route.connect(port).await?;
    let (status, at) = http_get(&mut s, host).await?;
    if status != 200 {
        anyhow::bail!("GET answered {status}");
    }
    Ok(at.duration_since(start))
}

async fn worker(route: Arc<Route>, port: u16, host: Arc<str>, until: Instant) -> Worker {
    let mut w = Worker {
        samples: Samples::default(),
        errors: 0,
        first_error: None,
    };
    let mut ops = 0u64;
    while Instant::now() < until && ops < MAX_OPS_PER_WORKER && !super::interrupted() {
        ops += 1;
        match tokio::time::timeout(OP_TIMEOUT, one_op(&route, port, &host)).await {
            Ok(Ok(d)) => w.samples.push(d.as_secs_f64() * 1e3),
            Ok(Err(e)) => {
                w.errors += 1;
                w.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                w.errors += 1;
                w.first_error
                    .get_or_insert_with(|| format!("operation timed out after {OP_TIMEOUT:?}"));
            }
        }
    }
    w
}

/// Runs `workers` concurrent workers on `rt` for `time` against `port` of the pod via `route`.
pub fn run(
    rt: &NsRuntime,
    route: &Route,
    port: u16,
    workers: usize,
    time: Duration,
) -> Result<Outcome> {
    let route = Arc::new(route.clone());
    let host: Arc<str> = format!("{}:{port}", route.ip()).into();
    let workers = workers.max(1);
    let (elapsed, results) = rt.run(time + OP_TIMEOUT + Duration::from_secs(5), async move {
        let start = Instant::now();
        let until = start + time;
        let mut set = JoinSet::new();
        for _ in 0..workers {
            set.spawn(worker(Arc::clone(&route), port, Arc::clone(&host), until));
        }
        let mut out = Vec::with_capacity(workers);
        while let Some(r) = set.join_next().await {
            if let Ok(w) = r {
                out.push(w);
            }
        }
        (start.elapsed(), out)
    })?;
    let mut all = Samples::default();
    let (mut errors, mut first_error) = (0, None);
    for w in results {
        all.merge(w.samples);
        errors += w.errors;
        if first_error.is_none() {
            first_error = w.first_error;
        }
    }
    let ok = all.seen;
    Ok(Outcome {
        ops_per_s: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: all.percentile(50.0).with_context(|| {
            format!(
                "no successful operation ({})",
                first_error.clone().unwrap_or_default()
            )
        })?,
        p99_ms: all.percentile(99.0).unwrap_or(f64::NAN),
        ok,
        errors,
        first_error,
    })
}
