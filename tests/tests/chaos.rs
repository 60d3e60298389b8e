//! Short chaos: 5 rounds of SIGKILL + restart of a random process (every target at least once)
//! with a CONNECT and the network state checked after each, then a graceful stop that must
//! leave nothing behind (see `tests::chaos`). Needs root (or `VPN_E2E=skip`) and the release
//! binaries (`cargo build --release --workspace --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tests::chaos::{self, ChaosOptions, Target};
use tests::e2e_guard;

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn chaos_5_rounds() {
    if !e2e_guard() {
        return;
    }
    let opts = ChaosOptions {
        rounds: 5,
        ..ChaosOptions::default()
    };
    let report = chaos::run(&opts).expect("run the chaos rounds");
    println!("{report}");
    for t in Target::ALL {
        assert!(
            report.rounds.iter().any(|r| r.target == t),
            "{} was never killed",
            t.name()
        );
    }
    assert!(
        report.passed(),
        "chaos assertions failed (seed {}):\n{}",
        report.seed,
        report.failures()
    );
}
