//! Faults without loss: while the ingress dies and comes back, or the seed server restarts,
//! no new CONNECT fails, no proxied connection is lost and every transfer in flight arrives
//! intact. All need root (or `VPN_E2E=skip`) and the release binaries (`--release`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use tests::lab::{sha256_file, Lab, LabOptions, IO_TIMEOUT, START_TIMEOUT};
use tests::load::{Attempt, Held, Load};
use tests::{lab_for_test, serial};

/// Pace of the load of new connections.
const PACE: Duration = Duration::from_millis(50);
/// How long the ingress stays dead per kill (the fault, not a synchronization).
const OUTAGE: Duration = Duration::from_secs(1);
/// Time between the ingress coming back and the next kill.
const BETWEEN: Duration = Duration::from_secs(2);

fn failures(attempts: &[Attempt], t0: Instant) -> String {
    attempts
        .iter()
        .filter(|a| !a.ok())
        .map(|a| {
            format!(
                "  at {:+.3}s for {:.3}s: {:?}\n",
                a.start.duration_since(t0).as_secs_f64(),
                a.end.duration_since(a.start).as_secs_f64(),
                a.result
            )
        })
        .collect()
}

/// Kills the ingress, waits until the seed server saw its tunnel go, keeps the ingress down
/// for [`OUTAGE`] and starts it again.
fn kill_ingress(lab: &mut Lab) {
    lab.kill_ingress().unwrap();
    lab.wait_for(
        Duration::from_secs(10),
        "the seed to see the tunnel go",
        |l| l.tunnels_up(0) == Some(0),
    )
    .unwrap();
    // The outage itself: the ingress is away for this long.
    std::thread::sleep(OUTAGE);
    lab.start_ingress().unwrap();
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn faults_a_idle_connections_survive_ten_ingress_kills() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions::default()) else {
        return;
    };
    let mut held: Vec<Held> = (0..100).map(|_| lab.hold(0).unwrap()).collect();
    for _ in 0..10 {
        // Idle time between the faults: over the run the connections' TCP keepalives (15 s
        // idle) fire, some of them into an outage.
        std::thread::sleep(BETWEEN);
        kill_ingress(&mut lab);
        lab.wait_all_up(START_TIMEOUT).unwrap();
    }
    let broken: Vec<String> = held
        .iter_mut()
        .enumerate()
        .filter_map(|(i, h)| h.ask(IO_TIMEOUT).err().map(|e| format!("#{i}: {e:#}")))
        .collect();
    assert!(
        broken.is_empty(),
        "{} of 100 idle connections broke across 10 ingress kills:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn faults_b_ingress_kills_under_load_fail_no_connect_and_lose_no_byte() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions {
        big_file: true,
        ..LabOptions::default()
    }) else {
        return;
    };
    let (_, sum) = lab.big.clone().unwrap();
    let downloads: Vec<_> = (0..2)
        .map(|i| lab.start_download(&format!("download-{i}"), "2M").unwrap())
        .collect();
    let t0 = Instant::now();
    let load = Load::start(vec![lab.uds(0)], PACE);
    for _ in 0..5 {
        std::thread::sleep(BETWEEN); // the load runs on a working tunnel meanwhile
        kill_ingress(&mut lab);
    }
    std::thread::sleep(BETWEEN);
    let attempts = load.finish().unwrap();
    let failed = attempts.iter().filter(|a| !a.ok()).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed around 5 ingress kills:\n{}",
        attempts.len(),
        failures(&attempts, t0)
    );
    for (i, path) in downloads.iter().enumerate() {
        let name = format!("download-{i}");
        let curl = lab.proc_mut(&name).unwrap();
        let st = curl.wait_exit(Duration::from_secs(120)).unwrap();
        assert!(st.success(), "{name} failed ({st}): {}", curl.log());
        assert_eq!(sha256_file(path).unwrap(), sum, "{name} corrupted");
    }
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn faults_c_seed_server_restart_under_load_fails_no_connect_it_accepted() {
    let _serial = serial();
    let Some(mut lab) = lab_for_test(LabOptions::default()) else {
        return;
    };
    let t0 = Instant::now();
    let load = Load::start(vec![lab.uds(0)], PACE);
    let mut gaps = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(BETWEEN); // the load runs on a working tunnel meanwhile
        let name = lab.server_name(0);
        let stopped = Instant::now();
        lab.stop(&name).unwrap();
        let gone = Instant::now();
        lab.start_server(0).unwrap();
        gaps.push((stopped, gone, Instant::now()));
    }
    std::thread::sleep(BETWEEN);
    let attempts = load.finish().unwrap();
    // While no server process listens, kube-apiserver cannot even connect (a Service would
    // route elsewhere or nowhere): those attempts are not the server's answers. Every
    // connection a server accepted must succeed — also in the first moments of a new server,
    // before its tunnel is up (it holds the request instead of answering 503).
    let not_listening = |a: &Attempt| matches!(&a.result, Err(e) if e.starts_with("connect ") && !e.contains("CONNECT"));
    let answered: Vec<Attempt> = attempts
        .iter()
        .filter(|a| !not_listening(a))
        .cloned()
        .collect();
    let failed = answered.iter().filter(|a| !a.ok()).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections the seed server accepted failed around 3 restarts:\n{}",
        answered.len(),
        failures(&answered, t0)
    );
    // The connects that found no listener fall into the gaps between the processes.
    for a in attempts.iter().filter(|a| not_listening(a)) {
        assert!(
            gaps.iter()
                .any(|&(stop, _, up)| a.end >= stop && a.start <= up),
            "a connect found no listener outside a restart: {:?}",
            a.result
        );
    }
    let gap_ms: Vec<String> = gaps
        .iter()
        .map(|(s, g, u)| {
            format!(
                "stop {:.0} ms, start to healthy {:.0} ms",
                (*g - *s).as_secs_f64() * 1e3,
                (*u - *g).as_secs_f64() * 1e3
            )
        })
        .collect();
    eprintln!(
        "{} attempts, {} answered by a server, {} found no listener; restarts: {}",
        attempts.len(),
        answered.len(),
        attempts.len() - answered.len(),
        gap_ms.join("; ")
    );
}
