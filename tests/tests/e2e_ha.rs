//! High-availability end-to-end tests: two shoot clients and two seed servers behind one
//! ingress (see `tests::lab`). Client failure, restart, server failure, rolling restarts and
//! a silently black-holed client, each under a steady load of new connections. The tests run
//! one at a time (they measure failover windows on a small machine); all need root (or
//! `VPN_E2E=skip`) and `cargo build --release --workspace --bins` first (run them with `--release`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use tests::lab::{LabOptions, POD_INDEX, POD_TARGET, POD_TARGET_V6, START_TIMEOUT};
use tests::load::{windows, Attempt, Held, Load};
use tests::{lab_for_test, serial};

/// Pace of the load of new connections.
const PACE: Duration = Duration::from_millis(50);
/// Longest acceptable disruption for new connections after a failure.
const WINDOW: Duration = Duration::from_secs(2);
const A: usize = 0;
const B: usize = 1;

fn by_client(attempts: &[&Attempt]) -> [usize; 2] {
    let mut n = [0; 2];
    for c in attempts.iter().filter_map(|a| a.client()) {
        n[c] += 1;
    }
    n
}

fn describe(attempts: &[Attempt], t0: Instant) -> String {
    attempts
        .iter()
        .map(|a| {
            format!(
                "  server {} at {:+.3}s for {:.3}s: {:?}\n",
                a.server,
                a.start.duration_since(t0).as_secs_f64(),
                a.end.duration_since(a.start).as_secs_f64(),
                a.result
            )
        })
        .collect()
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ha_a_both_servers_reach_the_pod_and_flows_spread_over_both_clients() {
    let _serial = serial();
    let Some(lab) = lab_for_test(LabOptions {
        peers_dir: true,
        ..LabOptions::ha()
    }) else {
        return;
    };
    for server in 0..2 {
        for target in [POD_TARGET, POD_TARGET_V6] {
            let (code, body) = lab.connect_get(server, target, "/index.html").unwrap();
            assert_eq!(
                (code, body.as_str()),
                (200, POD_INDEX),
                "{target} via {server}"
            );
        }
        let mut n = [0usize; 2];
        for _ in 0..40 {
            n[lab.whoami(server).unwrap()] += 1;
        }
        eprintln!(
            "server {server}: 40 new connections, {} via client A, {} via client B",
            n[A], n[B]
        );
        assert!(n[A] > 0 && n[B] > 0, "flows not spread: {n:?}");
    }
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ha_b_kill9_client_a_under_load() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions::ha()) else {
        return;
    };
    let mut held: Vec<Held> = (0..20).map(|_| lab.hold(0).unwrap()).collect();
    let pinned = held.iter().filter(|h| h.client == A).count();
    eprintln!("long-lived: {pinned} via A, {} via B", held.len() - pinned);
    assert!(pinned > 0 && pinned < held.len(), "long-lived not spread");

    let load = Load::start(vec![lab.uds(0)], PACE);
    load.wait_finished_since(Instant::now(), 20, Duration::from_secs(10))
        .unwrap();
    let kill = Instant::now();
    lab.kill9(&lab.client_name(A)).unwrap();
    load.wait_finished_since(kill + WINDOW, 40, Duration::from_secs(15))
        .unwrap();
    let attempts = load.finish().unwrap();

    let before: Vec<&Attempt> = attempts.iter().filter(|a| a.end < kill).collect();
    let inside: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.end >= kill && a.start < kill + WINDOW)
        .collect();
    let after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start >= kill + WINDOW)
        .collect();
    let failed = |v: &[&Attempt]| v.iter().filter(|a| !a.ok()).count();
    eprintln!(
        "new connections: before the kill {} ok / {} failed (A {} B {}); in the 2 s window {} ok / {} failed; after it {} ok / {} failed (A {} B {})",
        before.len() - failed(&before),
        failed(&before),
        by_client(&before)[A],
        by_client(&before)[B],
        inside.len() - failed(&inside),
        failed(&inside),
        after.len() - failed(&after),
        failed(&after),
        by_client(&after)[A],
        by_client(&after)[B],
    );
    let t0 = attempts.first().map_or(kill, |a| a.start);
    let bad: Vec<Attempt> = before
        .iter()
        .chain(after.iter())
        .filter(|a| !a.ok() || (a.start >= kill + WINDOW && a.client() != Some(B)))
        .map(|&a| a.clone())
        .collect();

    // Every long-lived connection asks again, concurrently (failures may take the timeout).
    let results: Vec<(usize, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = held
            .iter_mut()
            .map(|h| s.spawn(move || (h.client, h.ask(Duration::from_secs(3)))))
            .collect();
        hs.into_iter()
            .map(|h| {
                let (pinned, res) = h.join().unwrap();
                (pinned, res.is_ok_and(|c| c == pinned))
            })
            .collect()
    });
    let count = |c: usize, ok: bool| results.iter().filter(|r| **r == (c, ok)).count();
    eprintln!(
        "long-lived after the kill: via B {} ok / {} failed; via A {} ok / {} failed",
        count(B, true),
        count(B, false),
        count(A, true),
        count(A, false)
    );
    assert!(
        bad.is_empty(),
        "new connections failed outside the 2 s window after the kill (at +{:.3}s):\n{}",
        kill.duration_since(t0).as_secs_f64(),
        describe(&bad, t0)
    );
    assert_eq!(count(B, false), 0, "long-lived connections via B broke");
    assert_eq!(count(A, true), 0, "long-lived connections via A survived");
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ha_c_restarted_client_rejoins_and_takes_new_flows() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions::ha()) else {
        return;
    };
    lab.kill9(&lab.client_name(A)).unwrap();
    let gone = lab.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    eprintln!("servers counted 1 tunnel {gone:?} after killing A");

    let t = Instant::now();
    lab.start_client(A).unwrap();
    lab.wait_for(START_TIMEOUT, "A to rejoin (its /readyz)", |l| {
        l.client_ready(A)
    })
    .unwrap();
    let ready = t.elapsed();
    lab.wait_tunnels(2, START_TIMEOUT).unwrap();
    let both = t.elapsed();
    eprintln!("restarted A: /readyz 200 after {ready:?}, both servers at 2 tunnels after {both:?}");

    for server in 0..2 {
        let mut n = 0;
        loop {
            n += 1;
            if lab.whoami(server).unwrap() == A {
                break;
            }
            assert!(n < 40, "40 new connections via server {server}, none via A");
        }
        eprintln!("server {server}: new connection {n} went via A");
    }
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ha_d_kill9_server_1_and_restart_it() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions::ha()) else {
        return;
    };
    let load = Load::start(vec![lab.uds(0)], PACE);
    load.wait_finished_since(Instant::now(), 10, Duration::from_secs(10))
        .unwrap();
    let kill = Instant::now();
    lab.kill9(&lab.server_name(1)).unwrap();
    let noticed = lab
        .wait_for(
            Duration::from_secs(10),
            "both clients to lose server 1",
            |l| (0..2).all(|c| l.client_tunnel_up(c, 1) == Some(false)),
        )
        .unwrap();
    load.wait_finished_since(Instant::now(), 10, Duration::from_secs(10))
        .unwrap();

    let restart = Instant::now();
    lab.start_server(1).unwrap();
    lab.wait_all_up(Duration::from_secs(20))
        .expect("server 1 serves both clients again");
    let back = restart.elapsed();
    load.wait_finished_since(Instant::now(), 10, Duration::from_secs(10))
        .unwrap();
    let attempts = load.finish().unwrap();
    let failed: Vec<Attempt> = attempts.iter().filter(|a| !a.ok()).cloned().collect();
    eprintln!(
        "clients saw server 1 gone after {noticed:?}; after its restart all tunnels up in {back:?}; via server 0: {} ok / {} failed",
        attempts.len() - failed.len(),
        failed.len()
    );
    let t0 = attempts.first().map_or(kill, |a| a.start);
    assert!(
        failed.is_empty(),
        "CONNECTs via server 0 failed (kill at +{:.3}s, restart at +{:.3}s):\n{}",
        kill.duration_since(t0).as_secs_f64(),
        restart.duration_since(t0).as_secs_f64(),
        describe(&failed, t0)
    );
    for server in 0..2 {
        let mut n = [0usize; 2];
        for _ in 0..10 {
            n[lab.whoami(server).unwrap()] += 1;
        }
        eprintln!("after the restart, server {server}: A {} B {}", n[A], n[B]);
    }
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ha_e_rolling_restart_of_both_clients_under_load() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions::ha()) else {
        return;
    };
    let load = Load::start(vec![lab.uds(0), lab.uds(1)], PACE);
    load.wait_finished_since(Instant::now(), 10, Duration::from_secs(10))
        .unwrap();
    let mut events = Vec::new();
    for c in [A, B] {
        let t = Instant::now();
        events.push(t);
        lab.stop(&lab.client_name(c)).unwrap();
        let stopped = t.elapsed();
        lab.start_client(c).unwrap();
        lab.wait_all_up(START_TIMEOUT).unwrap();
        eprintln!(
            "client {c}: exited {stopped:?} after SIGTERM, all tunnels up again {:?} after it",
            t.elapsed()
        );
    }
    load.wait_finished_since(Instant::now(), 20, Duration::from_secs(10))
        .unwrap();
    let attempts = load.finish().unwrap();
    let w = windows(&attempts, &events, WINDOW);
    eprintln!("rolling restart, new connections: {w}");
    let t0 = attempts.first().map_or(events[0], |a| a.start);
    assert!(
        w.outside_failed.is_empty(),
        "new connections failed outside the 2 s windows (stops at {:?}):\n{}",
        events
            .iter()
            .map(|e| format!("+{:.3}s", e.duration_since(t0).as_secs_f64()))
            .collect::<Vec<_>>(),
        describe(&w.outside_failed, t0)
    );
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ha_f_blackholed_client_is_dropped_and_rejoins() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions {
        keepalive: Some("1s"),
        dead_peer_timeout: Some("3s"),
        ..LabOptions::ha()
    }) else {
        return;
    };
    let t = Instant::now();
    lab.blackhole(A).unwrap();
    lab.wait_tunnels(1, Duration::from_secs(15))
        .expect("servers drop the black-holed client");
    let dropped = t.elapsed();
    eprintln!("black-holed A: both servers at 1 tunnel after {dropped:?}");
    assert!(
        dropped <= Duration::from_secs(5),
        "dead peer detected after {dropped:?} (timeout 3 s)"
    );
    for server in 0..2 {
        for _ in 0..20 {
            assert_eq!(lab.whoami(server).unwrap(), B, "via server {server}");
        }
    }

    let t = Instant::now();
    lab.unblackhole(A).unwrap();
    lab.wait_all_up(Duration::from_secs(20))
        .expect("A rejoins after the black hole is lifted");
    let back = t.elapsed();
    eprintln!("black hole lifted: all tunnels up again after {back:?}");
    let via_a = (0..40).filter(|i| lab.whoami(i % 2).unwrap() == A).count();
    eprintln!("after rejoining: {via_a} of 40 new connections via A");
    assert!(via_a > 0, "A takes no new flows after rejoining");
}
