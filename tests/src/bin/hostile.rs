//! What an attacker on the internet sends to a tunnel port, as a tool for trying the seed
//! server by hand (inside a lab namespace: `ip netns exec <lab>-gw hostile …`):
//!
//! ```text
//! hostile idle    --target 192.168.77.1:1194 --count 10000 --hold 30s
//! hostile garbage --target 192.168.77.1:1194 --count 2000
//! hostile inits   --target 192.168.77.1:1194 --server-public-key <b64> --duration 10s
//! ```
//! Only ever point it at a lab's own addresses.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tests::hostile::{initiations, random_bytes, Flood, PREAMBLE_V1};

#[derive(Parser, Debug)]
#[command(about = "Floods a tunnel port with strangers' streams (lab use only)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Opens idle streams as fast as they connect and holds them.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Connecting threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
    },
    /// Streams of random bytes.
    Garbage {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// Valid-mac1 handshake initiations from random keys, one per new stream, for a while.
    Inits {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        server_public_key: String,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

fn main() -> Result<()> {
    let _ = common::io::sock::raise_nofile_limit();
    match Args::parse().cmd {
        Cmd::Idle {
            target,
            count,
            threads,
            hold,
        } => {
            let start = Instant::now();
            let per = count.div_ceil(threads.max(1));
            let floods: Vec<Flood> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads.max(1))
                    .map(|_| s.spawn(move || Flood::open(target, per, |_| Vec::new())))
                    .collect();
                hs.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            let open: usize = floods.iter().map(|f| f.streams.len()).sum();
            let failed: usize = floods.iter().map(|f| f.failed).sum();
            println!(
                "opened {open} idle streams in {:.2?} ({failed} failed)",
                start.elapsed()
            );
            std::thread::sleep(hold);
            let closed: usize = floods.iter().map(Flood::closed_by_peer).sum();
            println!("after {hold:?}: {closed} of {open} closed by the server");
        }
        Cmd::Garbage { target, count } => {
            let f = Flood::open(target, count, |i| random_bytes(1 + i % 1000));
            println!(
                "sent garbage on {} streams in {:.2?} ({} failed)",
                f.streams.len(),
                f.elapsed,
                f.failed
            );
        }
        Cmd::Inits {
            target,
            server_public_key,
            duration,
            threads,
        } => {
            let inits = Arc::new(initiations(&server_public_key, 256)?);
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads.max(1) {
                    let (inits, stop, sent) = (inits.clone(), stop.clone(), sent.clone());
                    s.spawn(move || {
                        let mut i = t;
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(mut st) =
                                TcpStream::connect_timeout(&target, Duration::from_secs(1))
                            {
                                let msg = [&PREAMBLE_V1[..], &inits[i % inits.len()]].concat();
                                if st.write_all(&msg).is_ok() {
                                    sent.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            i += threads;
                        }
                    });
                }
                std::thread::sleep(duration);
                stop.store(true, Ordering::Relaxed);
            });
            let n = sent.load(Ordering::Relaxed);
            println!(
                "sent {n} initiations in {:.2?} ({:.0}/s)",
                start.elapsed(),
                n as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
