//! Samples per (round, plane, metric), the Markdown table (median [min–max] over rounds and
//! ratios to the direct path and to OpenVPN) and the JSON file with every raw sample.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::stats::{fmt_ratio, fmt_summary, Summary};
use super::sys::MachineInfo;
use super::{Config, Group, Plane};

/// Which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Higher is better.
    Higher,
    /// Lower is better.
    Lower,
}

/// One table row.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Key in the samples and the JSON.
    pub key: &'static str,
    /// Row label.
    pub label: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// Row group.
    pub group: Group,
    /// Which way is better.
    pub better: Better,
    /// For product-only rows: the metric of the other planes to compare with.
    pub baseline: Option<&'static str>,
}

const fn m(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    group: Group,
    better: Better,
    baseline: Option<&'static str>,
) -> Metric {
    Metric {
        key,
        label,
        unit,
        group,
        better,
        baseline,
    }
}

use Better::{Higher as Up, Lower as Down};
use Group as G;

/// Every row of the table, in order.
#[rustfmt::skip]
pub const METRICS: &[Metric] = &[
    m("tput.s2p.p1", "iperf3 seed→pod, 1 stream", "Mbit/s", G::Throughput, Up, None),
    m("tput.s2p.p4", "iperf3 seed→pod, 4 streams", "Mbit/s", G::Throughput, Up, None),
    m("tput.p2s.p1", "iperf3 pod→seed (-R), 1 stream", "Mbit/s", G::Throughput, Up, None),
    m("tput.p2s.p4", "iperf3 pod→seed (-R), 4 streams", "Mbit/s", G::Throughput, Up, None),
    m("raw.s2p.p1", "raw TUN, no proxy: iperf3 seed→pod, 1 stream", "Mbit/s", G::Raw, Up, Some("tput.s2p.p1")),
    m("raw.s2p.p4", "raw TUN, no proxy: iperf3 seed→pod, 4 streams", "Mbit/s", G::Raw, Up, Some("tput.s2p.p4")),
    m("raw.p2s.p1", "raw TUN, no proxy: iperf3 pod→seed, 1 stream", "Mbit/s", G::Raw, Up, Some("tput.p2s.p1")),
    m("raw.p2s.p4", "raw TUN, no proxy: iperf3 pod→seed, 4 streams", "Mbit/s", G::Raw, Up, Some("tput.p2s.p4")),
    m("cpu.s2p", "CPU per GB, seed→pod 1 stream (server+client)", "CPU s/GB", G::Cpu, Down, None),
    m("cpu.p2s", "CPU per GB, pod→seed 1 stream (server+client)", "CPU s/GB", G::Cpu, Down, None),
    m("cpu.raw.s2p", "raw TUN: CPU per GB, seed→pod 1 stream", "CPU s/GB", G::Cpu, Down, Some("cpu.s2p")),
    m("cpu.raw.p2s", "raw TUN: CPU per GB, pod→seed 1 stream", "CPU s/GB", G::Cpu, Down, Some("cpu.p2s")),
    m("rr.p50", "TCP ping-pong 64 B, p50", "µs", G::Latency, Down, None),
    m("rr.p99", "TCP ping-pong 64 B, p99", "µs", G::Latency, Down, None),
    m("raw.rr.p50", "raw TUN: TCP ping-pong 64 B, p50", "µs", G::Latency, Down, Some("rr.p50")),
    m("raw.rr.p99", "raw TUN: TCP ping-pong 64 B, p99", "µs", G::Latency, Down, Some("rr.p99")),
    m("rate.ops", "new connection + GET, rate", "ops/s", G::Rate, Up, None),
    m("rate.p50", "new connection + GET, time to 200, p50", "ms", G::Rate, Down, None),
    m("rate.p99", "new connection + GET, time to 200, p99", "ms", G::Rate, Down, None),
    m("rate.cpu_ms", "new connection + GET, CPU of server+client per operation", "ms", G::Rate, Down, None),
    m("rate.uds.ops", "product over the UDS (no TLS): new CONNECT + GET, rate", "ops/s", G::Rate, Up, Some("rate.ops")),
    m("rate.uds.p50", "product over the UDS (no TLS): time to 200, p50", "ms", G::Rate, Down, Some("rate.p50")),
    m("rate.uds.p99", "product over the UDS (no TLS): time to 200, p99", "ms", G::Rate, Down, Some("rate.p99")),
    m("rate.uds.cpu_ms", "product over the UDS (no TLS): CPU of server+client per operation", "ms", G::Rate, Down, Some("rate.cpu_ms")),
    m("rate.seq.p50", "one client, sequential: new connection + GET, time to 200, p50", "ms", G::Rate, Down, None),
    m("rate.seq.p99", "one client, sequential: new connection + GET, time to 200, p99", "ms", G::Rate, Down, None),
    m("conns.open_s", "open {n} concurrent connections", "s", G::Conns, Down, None),
    m("conns.close_s", "close them: until the pod saw every close", "s", G::Conns, Down, None),
    m("rss.server.idle", "server RSS, idle after start", "MiB", G::Conns, Down, None),
    m("rss.client.idle", "client RSS, idle after start", "MiB", G::Conns, Down, None),
    m("rss.server.loaded", "server RSS, {n} connections open", "MiB", G::Conns, Down, None),
    m("rss.client.loaded", "client RSS, {n} connections open", "MiB", G::Conns, Down, None),
    m("rss.server.after", "server RSS after closing them", "MiB", G::Conns, Down, None),
    m("ttfb", "client start → first byte through the tunnel", "s", G::Startup, Down, None),
    m("recover.listen", "server restart: listening → first byte", "s", G::Recovery, Down, None),
    m("recover.kill", "server restart: killed → first byte", "s", G::Recovery, Down, None),
    m("recover.ingress.p50", "ingress outage 0.5–5 s: listening again → first byte, median", "s", G::Recovery, Down, None),
    m("recover.ingress.max", "ingress outage 0.5–5 s: listening again → first byte, worst", "s", G::Recovery, Down, None),
];

/// One measured value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Round (1-based).
    pub round: u32,
    /// Plane.
    pub plane: Plane,
    /// Metric key.
    pub metric: String,
    /// Value in the metric's unit.
    pub value: f64,
}

/// Everything a run measured.
#[derive(Debug, Default)]
pub struct Results {
    /// All samples in measurement order.
    pub samples: Vec<Sample>,
    /// Measurements that failed: (round, plane, what, error).
    pub failures: Vec<(u32, Plane, String, String)>,
    /// Remarks for the notes under the table.
    pub notes: Vec<String>,
}

impl Results {
    /// Records a sample (non-finite values are dropped).
    pub fn add(&mut self, round: u32, plane: Plane, metric: &str, value: f64) {
        if value.is_finite() {
            self.samples.push(Sample {
                round,
                plane,
                metric: metric.to_owned(),
                value,
            });
        }
    }

    /// Records a failed measurement.
    pub fn fail(&mut self, round: u32, plane: Plane, what: &str, err: &anyhow::Error) {
        self.failures
            .push((round, plane, what.to_owned(), format!("{err:#}")));
    }

    /// Per-round values of `metric` on `plane`.
    pub fn values(&self, plane: Plane, metric: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.plane == plane && s.metric == metric)
            .map(|s| s.value)
            .collect()
    }

    fn summary(&self, plane: Plane, metric: &str) -> Option<Summary> {
        Summary::of(&self.values(plane, metric))
    }
}

fn ratio(a: Option<Summary>, b: Option<Summary>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => fmt_ratio(a.median, b.median),
        _ => String::new(),
    }
}

/// The Markdown report: machine facts, run settings, the table and notes.
pub fn markdown(res: &Results, machine: &MachineInfo, cfg: &Config, planes: &[Plane]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Reversed VPN benchmark — {}\n", machine.date);
    let _ = writeln!(
        o,
        "- machine: {} CPUs, {}, {:.0} GiB RAM, kernel {}",
        machine.nproc, machine.cpu, machine.mem_gib, machine.kernel
    );
    let _ = writeln!(
        o,
        "- tools: {}; {}",
        machine.iperf3,
        machine
            .openvpn
            .as_deref()
            .unwrap_or("OpenVPN not installed")
    );
    let names: Vec<&str> = planes.iter().map(|p| p.name()).collect();
    let _ = writeln!(
        o,
        "- run: {} round(s), interleaved ({} per round); iperf3 -t {} s; ping-pong {:.0} s; \
         rate {} workers × {:.0} s; N = {} connections",
        cfg.rounds,
        names.join(" → "),
        cfg.iperf_secs,
        cfg.rr_time.as_secs_f64(),
        cfg.rate_workers,
        cfg.rate_time.as_secs_f64(),
        cfg.conns
    );
    let _ = writeln!(
        o,
        "- cells: median [min–max] over rounds; ↑ higher is better, ↓ lower is better; ratios of medians\n"
    );

    let has = |p: Plane| planes.contains(&p);
    let mut head = vec!["metric".to_owned()];
    head.extend(planes.iter().map(|p| p.title().to_owned()));
    let ratios: Vec<(Plane, Plane)> = [
        (Plane::Product, Plane::Direct),
        (Plane::Product, Plane::OpenVpn),
        (Plane::OpenVpn, Plane::Direct),
    ]
    .into_iter()
    .filter(|(a, b)| has(*a) && has(*b))
    .collect();
    for (a, b) in &ratios {
        head.push(format!("{} ÷ {}", a.name(), b.name()));
    }
    let _ = writeln!(o, "| {} |", head.join(" | "));
    let _ = writeln!(o, "|{}", "---|".repeat(head.len()));

    let mut group = None;
    for met in METRICS {
        if !cfg.has(met.group) || planes.iter().all(|p| res.values(*p, met.key).is_empty()) {
            continue;
        }
        if group != Some(met.group) {
            group = Some(met.group);
            let _ = writeln!(
                o,
                "| **{}** |{}",
                met.group.name(),
                " |".repeat(head.len() - 1)
            );
        }
        let arrow = if met.better == Better::Higher {
            "↑"
        } else {
            "↓"
        };
        let label = met.label.replace("{n}", &cfg.conns.to_string());
        let mut row = vec![format!("{label}, {} {arrow}", met.unit)];
        for p in planes {
            let cell = match (res.summary(*p, met.key), met.baseline) {
                (Some(s), _) => fmt_summary(&s),
                (None, Some(_)) if *p != Plane::Product => "(= row above)".into(),
                _ => "n/a".into(),
            };
            row.push(cell);
        }
        for (a, b) in &ratios {
            if met.baseline.is_some() && *a != Plane::Product {
                row.push(String::new());
                continue;
            }
            let b_key = match met.baseline {
                Some(base) if *b != Plane::Product => base,
                _ => met.key,
            };
            row.push(ratio(res.summary(*a, met.key), res.summary(*b, b_key)));
        }
        let _ = writeln!(o, "| {} |", row.join(" | "));
    }

    let _ = writeln!(o, "\nNotes");
    for n in notes(cfg) {
        let _ = writeln!(o, "- {n}");
    }
    for n in &res.notes {
        let _ = writeln!(o, "- {n}");
    }
    if !res.failures.is_empty() {
        let _ = writeln!(o, "\nFailed measurements");
        for (round, plane, what, err) in &res.failures {
            let _ = writeln!(o, "- round {round}, {plane}, {what}: {err}");
        }
    }
    o
}

fn notes(cfg: &Config) -> Vec<String> {
    let mut n = vec![
        "direct: one veth between the seed and pod namespaces (kernel TCP with offloads), the \
         machine's ceiling; every process shares the same CPUs."
            .to_owned(),
        "seed namespace tuning: ip_local_port_range 1024–65535 and tcp_tw_reuse=1, so rounds of \
         N connections and the rate test do not run out of source ports (TIME_WAIT)."
            .to_owned(),
        "product: iperf3 connects to a local forwarder in the seed that opens kube-apiserver's \
         exact CONNECT over the proxy's Unix socket per connection and splices (the forwarder's \
         own CPU is not in the CPU rows). Ping-pong and the N connections use the Unix socket \
         CONNECT directly; the rate test uses the mTLS listener."
            .to_owned(),
        "raw TUN rows: iperf3 --bind-dev tun0 / a socket bound to the seed TUN, i.e. the \
         WireGuard-over-TCP data plane without the egress proxy; ratios compare them with the \
         other planes' regular rows."
            .to_owned(),
        "OpenVPN: 2.6, proto tcp, AES-256-GCM, tun, tls-auth, keepalive 10 60, connect-retry 1 5, \
         client through the same ingress with http-proxy + CUSTOM-HEADER; no tcp-nodelay (as in \
         production configurations) unless --ovpn-nodelay."
            .to_owned(),
        format!(
            "rate: {} workers (the sequential rows: one worker for the ping-pong time); \
             product = new TCP + full mTLS handshake (no resumption, ECDSA P-256) + CONNECT + \
             GET /; direct and OpenVPN = new TCP + GET / (no TLS, no CONNECT); the \
             'product over the UDS' rows are new Unix-socket CONNECT + GET / (no TLS), compared \
             with the other planes' regular rows. The TLS client runs on the same CPUs (its CPU per operation is \
             in the JSON as bench_cpu_ms). Time to \
             200 = operation start → first byte of the GET answer.",
            cfg.rate_workers
        ),
        "CPU per GB: utime+stime (/proc/<pid>/stat) of the VPN server and client processes during \
         the single-stream iperf3 run, divided by the bytes iperf3 received (10^9 bytes = 1 GB); \
         softirq work not charged to a process is not included. The ingress's CPU is in the JSON."
            .to_owned(),
        "startup: the client process is stopped, then spawned; probes (CONNECT/TCP + GET, 1 s \
         deadline) start every 10 ms. recovery: the server gets SIGKILL and is started again at \
         once; 'listening' is when its tunnel port listens (polled every 1 ms). ingress outage: \
         the ingress gets SIGKILL, stays away 0.5, 1, 2, 3, 4 and 5 s, and is started again; \
         'listening' is when the ingress listens again; median and worst of the six per round."
            .to_owned(),
        "RSS: VmRSS of /proc/<pid>/status. 'idle after start' is read when the plane's turn \
         begins, before its measurements (OpenVPN starts anew each turn; with the startup and \
         recovery rows the product's client and server were restarted at the end of the \
         previous turn); the N \
         connections go to a tokio echo server in the pod and are held open while RSS is read \
         (JSON: 'before' = right before opening, 'after' = after closing); every 100th is \
         checked with an echo."
            .to_owned(),
    ];
    if cfg.ovpn_nodelay {
        n.push("--ovpn-nodelay: OpenVPN ran with tcp-nodelay.".into());
    }
    n
}

/// All samples, failures and settings as JSON.
pub fn json(
    res: &Results,
    machine: &MachineInfo,
    cfg: &Config,
    planes: &[Plane],
) -> serde_json::Value {
    let mut summary = BTreeMap::new();
    let mut keys: Vec<&str> = res.samples.iter().map(|s| s.metric.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for p in planes {
        for k in &keys {
            if let Some(s) = res.summary(*p, k) {
                summary.insert(
                    format!("{}/{k}", p.name()),
                    json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n}),
                );
            }
        }
    }
    json!({
        "machine": {
            "date": machine.date, "nproc": machine.nproc, "cpu": machine.cpu,
            "kernel": machine.kernel, "mem_gib": machine.mem_gib,
            "iperf3": machine.iperf3, "openvpn": machine.openvpn,
        },
        "config": {
            "rounds": cfg.rounds, "iperf_secs": cfg.iperf_secs,
            "rr_secs": cfg.rr_time.as_secs_f64(), "rate_secs": cfg.rate_time.as_secs_f64(),
            "rate_workers": cfg.rate_workers, "conns": cfg.conns,
            "planes": planes.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "rows": cfg.groups.iter().map(|g| g.name()).collect::<Vec<_>>(),
            "ovpn_nodelay": cfg.ovpn_nodelay,
        },
        "samples": res.samples.iter().map(|s| json!({
            "round": s.round, "plane": s.plane.name(), "metric": s.metric, "value": s.value,
        })).collect::<Vec<_>>(),
        "summary": summary,
        "failures": res.failures.iter().map(|(r, p, w, e)| json!({
            "round": r, "plane": p.name(), "what": w, "error": e,
        })).collect::<Vec<_>>(),
        "notes": res.notes,
    })
}

/// Writes `summary.md` and `results.json` into `dir`.
pub fn write(dir: &Path, md: &str, json: &serde_json::Value) -> Result<()> {
    std::fs::write(dir.join("summary.md"), md)
        .with_context(|| format!("write {}/summary.md", dir.display()))?;
    let text = serde_json::to_string_pretty(json)?;
    std::fs::write(dir.join("results.json"), text)
        .with_context(|| format!("write {}/results.json", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> Config {
        Config {
            rounds: 2,
            iperf_secs: 3,
            rr_time: Duration::from_secs(1),
            rate_time: Duration::from_secs(1),
            rate_workers: 16,
            conns: 10_000,
            planes: Plane::ALL.to_vec(),
            groups: Group::ALL.to_vec(),
            out: "/tmp/x".into(),
            keep: false,
            ovpn_nodelay: false,
        }
    }

    #[test]
    fn table_has_ratios_and_placeholders() {
        let mut r = Results::default();
        for (round, d, p, o) in [(1, 1000.0, 400.0, 200.0), (2, 3000.0, 600.0, 300.0)] {
            r.add(round, Plane::Direct, "tput.s2p.p1", d);
            r.add(round, Plane::Product, "tput.s2p.p1", p);
            r.add(round, Plane::OpenVpn, "tput.s2p.p1", o);
            r.add(round, Plane::Product, "raw.s2p.p1", p * 2.0);
        }
        let machine = MachineInfo::collect();
        let md = markdown(&r, &machine, &cfg(), &Plane::ALL);
        let row = md
            .lines()
            .find(|l| l.starts_with("| iperf3 seed→pod, 1 stream"))
            .unwrap();
        assert!(row.contains("2000 [1000–3000]"), "{row}");
        assert!(row.contains("| 0.25× | 2.00× | 0.12× |"), "{row}");
        let raw = md
            .lines()
            .find(|l| l.starts_with("| raw TUN, no proxy: iperf3 seed→pod, 1"))
            .unwrap();
        assert!(raw.contains("(= row above)"), "{raw}");
        assert!(raw.contains("| 0.50× | 4.00× |"), "{raw}");
        assert!(
            !md.contains("ping-pong 64 B, p50,"),
            "rows without data are left out"
        );
        let j = json(&r, &machine, &cfg(), &Plane::ALL);
        assert_eq!(j["samples"].as_array().unwrap().len(), 8);
        assert_eq!(j["summary"]["product/tput.s2p.p1"]["median"], 500.0);
    }
}
