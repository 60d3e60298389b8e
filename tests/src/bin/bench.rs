//! The benchmark command (`scripts/bench.sh`): builds the netns topology, measures the direct
//! veth, the product and OpenVPN (when installed) in interleaved rounds, prints one Markdown
//! table and writes it with the raw results. `bench echo` is the pod-side echo server it
//! starts in the pod namespace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tests::bench::{self, Config, Group, Plane};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark the reversed VPN against a direct veth and OpenVPN in network namespaces",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Interleaved rounds (every round visits every plane once); cells show the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Short runs: iperf3 -t 3, 2 s ping-pong, 3 s rate test.
    #[arg(long)]
    quick: bool,
    /// iperf3 -t in seconds (default 10, 3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    time: Option<u64>,
    /// Planes, comma-separated: direct, product, openvpn.
    #[arg(long, value_delimiter = ',', default_value = "direct,product,openvpn")]
    planes: Vec<String>,
    /// Row groups, comma-separated: throughput, raw, cpu, latency, rate, conns, startup,
    /// recovery (default: all).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// Results directory (default /tmp/vpn-bench/<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Leave the topology running afterwards (prints how to remove it).
    #[arg(long)]
    keep: bool,
    /// Concurrent connections of the RSS test.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=30_000))]
    conns: u32,
    /// Concurrent workers of the connection-rate test.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    rate_workers: u32,
    /// Give OpenVPN `tcp-nodelay` (production configurations do not set it).
    #[arg(long)]
    ovpn_nodelay: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// TCP echo server (run by the bench inside the pod namespace).
    Echo {
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:7007")]
        listen: SocketAddr,
        /// Most connections at once.
        #[arg(long, default_value_t = 20_000)]
        max_conns: usize,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

fn config(a: &Args) -> Result<Config> {
    let planes = a
        .planes
        .iter()
        .map(|p| Plane::parse(p))
        .collect::<Result<Vec<_>>>()?;
    let groups = if a.rows.is_empty() {
        Group::ALL.to_vec()
    } else {
        a.rows
            .iter()
            .map(|g| Group::parse(g))
            .collect::<Result<Vec<_>>>()?
    };
    let (iperf, rr, rate) = if a.quick { (3, 2, 3) } else { (10, 5, 10) };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("/tmp/vpn-bench").join(bench::sys::stamp(bench::sys::now_secs()))
    });
    let mut ordered = Vec::new();
    for p in Plane::ALL {
        if planes.contains(&p) {
            ordered.push(p);
        }
    }
    Ok(Config {
        rounds: a.rounds,
        iperf_secs: a.time.unwrap_or(iperf),
        rr_time: Duration::from_secs(rr),
        rate_time: Duration::from_secs(rate),
        rate_workers: a.rate_workers as usize,
        conns: a.conns as usize,
        planes: ordered,
        groups,
        out,
        keep: a.keep,
        ovpn_nodelay: a.ovpn_nodelay,
    })
}

/// Turns Ctrl-C and SIGTERM into [`bench::interrupt`], so the run ends through its teardown.
fn install_interrupt() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                let _ = tx.send(false);
                return;
            };
            let _ = tx.send(true);
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("bench: interrupted, tearing down …");
                bench::interrupt();
            }
        });
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(true) => Ok(()),
        _ => anyhow::bail!("cannot install the signal handlers"),
    }
}

fn main() {
    let args = Args::parse();
    // The bench's own diagnostics; RUST_LOG is passed on to the product processes instead.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let res = match &args.cmd {
        Some(Cmd::Echo {
            listen,
            max_conns,
            workers,
        }) => bench::echo::run_blocking(*listen, *max_conns, *workers),
        None => install_interrupt()
            .and_then(|()| config(&args))
            .and_then(|cfg| bench::runner::run(&cfg)),
    };
    if let Err(e) = res {
        eprintln!("bench: error: {e:#}");
        std::process::exit(1);
    }
}
