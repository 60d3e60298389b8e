//! Logging setup shared by both binaries: `tracing` to stderr, text or JSON, filtered by
//! `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `format` is `text` or `json`.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let res = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = res {
        eprintln!("logging already initialised: {e}");
    }
}

/// Warning lines per second per reason (see [`crate::limits::LogGate`]), process-wide.
static GATE: std::sync::OnceLock<std::sync::Mutex<crate::limits::LogGate>> =
    std::sync::OnceLock::new();
/// Lines suppressed so far, process-wide.
static SUPPRESSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the process-wide rate of warning lines per reason; call once at start (later calls
/// are ignored).
pub fn set_lines_per_second(per_second: u32) {
    let _ = GATE.set(std::sync::Mutex::new(crate::limits::LogGate::new(
        per_second,
    )));
}

/// Whether a line of `reason` may be logged now: `Some(n)` with the number of lines of that
/// reason suppressed since the last one logged, `None` to drop it (counted).
pub fn gate(reason: &'static str) -> Option<u64> {
    let gate = GATE.get_or_init(|| {
        std::sync::Mutex::new(crate::limits::LogGate::new(
            crate::limits::Limits::default().log_lines_per_second,
        ))
    });
    let verdict = gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(reason, std::time::Instant::now());
    match verdict {
        crate::limits::LogVerdict::Log { suppressed } => Some(suppressed),
        crate::limits::LogVerdict::Suppress => {
            SUPPRESSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
    }
}

/// Lines suppressed by [`gate`] so far.
pub fn suppressed_total() -> u64 {
    SUPPRESSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `tracing::warn!` through the per-reason rate limit: `warn_limited!("reason", fields…,
/// "message")`. A line that passes after suppressed ones carries `suppressed = n`.
#[macro_export]
macro_rules! warn_limited {
    ($reason:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::io::log::gate($reason) {
            if suppressed > 0 {
                tracing::warn!(event = $reason, suppressed, $($arg)+);
            } else {
                tracing::warn!(event = $reason, $($arg)+);
            }
        }
    };
}
