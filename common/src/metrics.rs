//! Prometheus text exposition (format 0.0.4) and the two metric kinds the binaries keep
//! themselves: labelled counters live in their own state; [`Histogram`] is shared here.
//!
//! [`Exposition`] writes each family's `# HELP` and `# TYPE` once, escapes label values, and
//! renders histograms with cumulative `_bucket{le=…}`, `_sum` and `_count` lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::session::{Session, SessionStats};

/// Kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count; names end in `_total`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds one exposition text.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn labels_text(labels: &[(&str, &str)], extra: Option<(&str, &str)>) -> String {
    let all: Vec<String> = labels
        .iter()
        .copied()
        .chain(extra)
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", all.join(","))
    }
}

fn help_text(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Samples of it follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {}", help_text(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let _ = writeln!(
            self.out,
            "{name}{} {}",
            labels_text(labels, None),
            format_value(value)
        );
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The samples of one histogram (call [`Exposition::family`] with [`Kind::Histogram`]
    /// first).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) -> &mut Self {
        let snap = h.snapshot();
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&snap.counts) {
            cumulative += n;
            let le = format_value(*bound);
            let _ = writeln!(
                self.out,
                "{name}_bucket{} {cumulative}",
                labels_text(labels, Some(("le", &le)))
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{} {}",
            labels_text(labels, Some(("le", "+Inf"))),
            snap.count
        );
        let _ = writeln!(
            self.out,
            "{name}_sum{} {}",
            labels_text(labels, None),
            format_value(snap.sum)
        );
        let _ = writeln!(
            self.out,
            "{name}_count{} {}",
            labels_text(labels, None),
            snap.count
        );
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Bucket bounds in seconds for connection set-up times: 1 ms to 10 s.
pub const DIAL_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram of durations with fixed bounds, updated lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last slot counts those above all bounds.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

/// A consistent-enough copy of a histogram for one exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Observations per finite bucket (not cumulative).
    pub counts: Vec<u64>,
    /// All observations.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum: f64,
}

impl Histogram {
    /// A histogram with `bounds` (ascending, seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> Snapshot {
        let all: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        Snapshot {
            count: all.iter().sum(),
            counts: all.get(..self.bounds.len()).unwrap_or(&[]).to_vec(),
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// One tunnel's state for the per-tunnel families of [`expose_tunnels`].
#[derive(Debug, Clone)]
pub struct TunnelRow {
    /// Label value: the peer (seed server) or the seed server (shoot client).
    pub name: String,
    /// Stream attached and session established.
    pub up: bool,
    /// The session's counters.
    pub stats: SessionStats,
    /// Time since the last completed handshake, if any.
    pub handshake_age: Option<Duration>,
    /// Time since the last message from the other side.
    pub received_age: Duration,
}

impl TunnelRow {
    /// The row of a session and whether its stream is attached.
    pub fn of(name: &str, session: &Session, stream_up: bool, now: Instant) -> Self {
        Self {
            name: name.to_owned(),
            up: stream_up && session.is_established(),
            stats: session.stats(),
            handshake_age: session.last_handshake_age(),
            received_age: session.last_received_age(now),
        }
    }
}

/// The per-tunnel families both binaries expose: `<prefix>_tunnel_up`, `_handshakes_total`,
/// `_last_handshake_age_seconds`, `_last_received_age_seconds`, `_peer_bytes_total`,
/// `_peer_packets_total` and `_frames_rejected_total`, labelled `<label>="<row name>"`.
pub fn expose_tunnels(e: &mut Exposition, prefix: &str, label: &str, rows: &[TunnelRow]) {
    type Value = fn(&TunnelRow) -> Option<f64>;
    let families: [(&str, Kind, &str, Value); 5] = [
        (
            "tunnel_up",
            Kind::Gauge,
            "Whether the tunnel has a stream and an established session.",
            |r| Some(f64::from(u8::from(r.up))),
        ),
        (
            "handshakes_total",
            Kind::Counter,
            "WireGuard handshakes completed.",
            |r| Some(r.stats.handshakes_completed as f64),
        ),
        (
            "last_handshake_age_seconds",
            Kind::Gauge,
            "Seconds since the last completed handshake (absent before the first).",
            |r| r.handshake_age.map(|a| a.as_secs_f64()),
        ),
        (
            "last_received_age_seconds",
            Kind::Gauge,
            "Seconds since the last message through the tunnel (dead after --dead-peer-timeout).",
            |r| Some(r.received_age.as_secs_f64()),
        ),
        (
            "frames_rejected_total",
            Kind::Counter,
            "Tunnel messages that failed authentication or decryption.",
            |r| Some(r.stats.rejected_messages as f64),
        ),
    ];
    for (suffix, kind, help, value) in families {
        let name = format!("{prefix}_{suffix}");
        e.family(&name, kind, help);
        for r in rows {
            if let Some(v) = value(r) {
                e.sample(&name, &[(label, &r.name)], v);
            }
        }
    }
    type Pair = fn(&SessionStats) -> (u64, u64);
    let directed: [(&str, &str, Pair); 2] = [
        (
            "peer_bytes_total",
            "Inner IP bytes through the tunnel.",
            |s| (s.rx_bytes, s.tx_bytes),
        ),
        (
            "peer_packets_total",
            "Inner IP packets through the tunnel.",
            |s| (s.rx_packets, s.tx_packets),
        ),
    ];
    for (suffix, help, pair) in directed {
        let name = format!("{prefix}_{suffix}");
        e.family(&name, Kind::Counter, help);
        for r in rows {
            let (rx, tx) = pair(&r.stats);
            e.sample(&name, &[(label, &r.name), ("direction", "rx")], rx as f64);
            e.sample(&name, &[(label, &r.name), ("direction", "tx")], tx as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "Things.\nMore.")
            .sample("x_total", &[("peer", "a\"b\\c\nd")], 3.0)
            .sample("x_total", &[], 4.0);
        e.single("y", Kind::Gauge, "A gauge.", 0.5);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\\nMore.\n# TYPE x_total counter\nx_total{peer=\"a\\\"b\\\\c\\nd\"} 3\nx_total 4\n# HELP y A gauge.\n# TYPE y gauge\ny 0.5\n"
        );
    }

    #[test]
    fn histogram_is_cumulative() {
        static B: [f64; 3] = [0.001, 0.01, 0.1];
        let h = Histogram::new(&B);
        for ms in [0, 1, 5, 50, 500, 500] {
            h.observe(Duration::from_millis(ms));
        }
        let snap = h.snapshot();
        assert_eq!(snap.counts, vec![2, 1, 1]);
        assert_eq!(snap.count, 6);
        assert!((snap.sum - 1.056).abs() < 1e-9);
        let mut e = Exposition::new();
        e.family("d_seconds", Kind::Histogram, "Dial time.")
            .histogram("d_seconds", &[("k", "v")], &h);
        let text = e.finish();
        assert!(
            text.contains("d_seconds_bucket{k=\"v\",le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{k=\"v\",le=\"0.01\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{k=\"v\",le=\"0.1\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{k=\"v\",le=\"+Inf\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("d_seconds_count{k=\"v\"} 6\n"), "{text}");
        assert!(text.contains("d_seconds_sum{k=\"v\"} 1.056"), "{text}");
    }
}
