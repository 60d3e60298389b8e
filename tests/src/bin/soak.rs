//! The soak command: brings up the lab with `big.bin` and runs mixed load (bulk downloads,
//! a churn of short CONNECTs, long idle CONNECTs) for a while, killing the ingress with
//! SIGKILL periodically, while the seed server's and the shoot client's RSS and descriptors
//! are sampled. Prints a report (and writes it as JSON with `--json`); exits 1 when a goal
//! failed (see `tests::soak`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tests::soak::{self, SoakOptions};

#[derive(Parser, Debug)]
#[command(about = "Soak the reversed VPN in the netns lab under mixed load with ingress kills")]
struct Args {
    /// How long the load runs (e.g. `10m`, `60s`).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between ingress kills (SIGKILL); `0s` disables them.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    kill_interval: Duration,
    /// How long the ingress stays down after a kill.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    kill_pause: Duration,
    /// Time between RSS/fd samples.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    sample_interval: Duration,
    /// Warm-up before the baseline sample (default: a fifth of --duration, at most 60 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Time between short CONNECTs (CONNECT + GET /index.html over the UDS).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    churn_interval: Duration,
    /// Long idle CONNECTs opened at the start.
    #[arg(long, default_value_t = 20)]
    idle_connections: usize,
    /// Time between uses (GET /whoami) of the idle CONNECTs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle_use_interval: Duration,
    /// curl --limit-rate of the bulk downloads of the 64 MiB big.bin.
    #[arg(long, default_value = "20M")]
    bulk_rate: String,
    /// Most RSS growth per binary between the post-warm-up sample and the last, in MiB.
    #[arg(long, default_value_t = 16)]
    rss_growth_mib: u64,
    /// Most open-descriptor growth per binary between the post-warm-up sample and the last.
    #[arg(long, default_value_t = 8)]
    fd_slack: u64,
    /// Margin added to the end of every reconnect window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    window_margin: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    match run(&Args::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    tests::require_root()?;
    let opts = SoakOptions {
        duration: args.duration,
        kill_interval: (!args.kill_interval.is_zero()).then_some(args.kill_interval),
        kill_pause: args.kill_pause,
        sample_interval: args.sample_interval,
        warmup: args.warmup,
        churn_interval: args.churn_interval,
        idle_connections: args.idle_connections,
        idle_use_interval: args.idle_use_interval,
        bulk_rate: args.bulk_rate.clone(),
        rss_growth_limit: args.rss_growth_mib << 20,
        fd_slack: args.fd_slack,
        window_margin: args.window_margin,
        ..SoakOptions::default()
    };
    let report = soak::run(&opts)?;
    println!("{report}");
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    Ok(report.passed())
}
