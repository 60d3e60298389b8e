//! Short soak: 60 s of mixed load with an ingress kill every 20 s (see `tests::soak`); the
//! goals must hold. Needs root (or `VPN_E2E=skip`) and the release binaries
//! (`cargo build --release --workspace --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tests::e2e_guard;
use tests::soak::{self, SoakOptions};

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn soak_60s_with_ingress_kills() {
    if !e2e_guard() {
        return;
    }
    let opts = SoakOptions {
        duration: Duration::from_secs(60),
        kill_interval: Some(Duration::from_secs(20)),
        warmup: Some(Duration::from_secs(15)),
        idle_use_interval: Duration::from_secs(10),
        ..SoakOptions::default()
    };
    let report = soak::run(&opts).expect("run the soak");
    println!("{report}");
    assert!(!report.kills.is_empty(), "no ingress kill happened");
    assert!(report.passed(), "soak goals failed:\n{}", report.failures());
}
