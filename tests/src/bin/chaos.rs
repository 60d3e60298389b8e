//! The chaos command: brings up the lab and, round after round, kills the shoot client, the
//! seed server or the ingress with SIGKILL (seeded random order), restarts it with the same
//! arguments and checks that a new CONNECT works within 5 s and that each side holds exactly
//! one set of the product's network state; at the end stops both VPN processes with SIGTERM
//! and checks that nothing is left. Exits 1 when an assertion failed (see `tests::chaos`).

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tests::chaos::{self, ChaosOptions};

#[derive(Parser, Debug)]
#[command(about = "Kill and restart the reversed VPN's processes in the netns lab, checking state")]
struct Args {
    /// Kill/restart rounds.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// RNG seed of the kill order (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// A new CONNECT must succeed within this time after each restart.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    connect_deadline: Duration,
}

fn main() {
    match run(&Args::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    tests::require_root()?;
    let opts = ChaosOptions {
        rounds: args.rounds,
        seed: args.seed,
        connect_deadline: args.connect_deadline,
        ..ChaosOptions::default()
    };
    let report = chaos::run(&opts)?;
    println!("{report}");
    Ok(report.passed())
}
