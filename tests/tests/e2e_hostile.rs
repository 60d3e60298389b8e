//! Hostile input against the release binaries in network namespaces: what anyone on the
//! internet can send to the tunnel port, what reaches the proxy listeners, and what the shoot
//! can send through the tunnel. Cases run one after another, each while a rate-capped, hashed
//! bulk download keeps going through the tunnel, and each is followed by a fresh CONNECT that
//! must succeed within 2 s. Refusals are checked by their effect (stream closed, status code,
//! packet counters), memory by sampling the server's RSS.
//!
//! Needs root (or `VPN_E2E=skip`) and `cargo build --release --workspace --bins` first.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::client::{connect_uds, http_get, read_head, status_of};
use tests::e2e_guard;
use tests::hostile::{
    client_hello, cpu_time, icmp4_unreachable, initiations, random_bytes, rss_kib, send_and_watch,
    send_raw4, status_after, tcp4, tls_client_config, tls_connect, udp4, Flood, PREAMBLE_V1,
};
use tests::lab::{
    sha256_file, Lab, LabOptions, CLIENT_METRICS, POD_INDEX, POD_TARGET, PROXY_TCP, SEED_METRICS,
    SEED_TUNNEL, START_TIMEOUT,
};
use tests::prom::{http_text, metric};
use tests::wait::{http_status, wait_until};

const IO: Duration = Duration::from_secs(10);
/// A fresh CONNECT after every case must succeed within this.
const FRESH: Duration = Duration::from_secs(2);
/// Server timeouts of the hostile lab (short, so slow cases stay short).
const HEAD_TIMEOUT_S: u64 = 3;

/// Extra addresses of the attacker in gw.
const SOURCES: [&str; 8] = [
    "192.168.77.100",
    "192.168.77.101",
    "192.168.77.102",
    "192.168.77.103",
    "192.168.77.104",
    "192.168.77.105",
    "192.168.77.106",
    "192.168.77.107",
];

fn sources() -> Vec<std::net::IpAddr> {
    SOURCES.iter().map(|a| a.parse().unwrap()).collect()
}

/// The cases share the machine's two cores: run one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The lab with a 64 MiB file in the pod, a second shoot namespace for a spare client, and a
/// seed server that allows the main and the spare client key.
fn hostile_lab() -> Option<Lab> {
    if !e2e_guard() {
        return None;
    }
    let _ = common::io::sock::raise_nofile_limit();
    let mut lab = Lab::new(LabOptions {
        big_file: true,
        second_shoot: true,
        ..Default::default()
    })
    .expect("build the topology");
    // More source addresses for the attacker in gw, so long floods do not run out of ports.
    for a in SOURCES {
        lab.gw
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "seed0"])
            .unwrap();
    }
    lab.start_pod_server().unwrap();
    lab.start_ingress().unwrap();
    let (_, client) = lab.keys();
    let spare = lab.gen_key("spare").unwrap();
    let mut args = lab.server_args_with(0, &[client.public, spare.public]);
    for a in [
        "--request-head-timeout",
        &format!("{HEAD_TIMEOUT_S}s"),
        "--tls-handshake-timeout",
        &format!("{HEAD_TIMEOUT_S}s"),
    ] {
        args.push(a.to_string());
    }
    lab.start_server_with(0, &args).unwrap();
    lab.start_client(0).unwrap();
    lab.wait_all_up(START_TIMEOUT).unwrap();
    Some(lab)
}

fn pid(lab: &Lab, name: &str) -> u32 {
    lab.proc(name).unwrap().pid()
}

fn seed_metrics(lab: &Lab) -> String {
    http_text(&lab.seeds[0], &format!("http://{SEED_METRICS}/metrics")).unwrap_or_default()
}

fn seed_metric(lab: &Lab, name: &str) -> f64 {
    metric(&seed_metrics(lab), name).unwrap_or(0.0)
}

fn limit_hits(lab: &Lab, limit: &str) -> f64 {
    seed_metric(
        lab,
        &format!("vpn_seed_limit_hits_total{{limit=\"{limit}\"}}"),
    )
}

fn drops(lab: &Lab, reason: &str) -> f64 {
    seed_metric(
        lab,
        &format!("vpn_seed_packets_dropped_total{{reason=\"{reason}\"}}"),
    )
}

/// CONNECT + GET of the pod's index over the UDS.
fn uds_get(lab: &Lab) -> anyhow::Result<()> {
    let (reply, mut s) = connect_uds(&lab.uds(0), POD_TARGET, IO)?;
    anyhow::ensure!(reply.status == 200, "CONNECT: {}", reply.head);
    let (code, body) = http_get(&mut s, POD_TARGET, "/index.html")?;
    anyhow::ensure!(code == 200 && body == POD_INDEX.as_bytes(), "GET: {code}");
    Ok(())
}

/// A fresh CONNECT succeeds within [`FRESH`] (retried until then); returns the time taken.
fn fresh_connect(lab: &Lab, after: &str) -> Duration {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < FRESH {
        match uds_get(lab) {
            Ok(()) => return start.elapsed(),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no successful CONNECT within {FRESH:?} after {after}: {last:?}");
}

/// The mTLS CONNECT of kube-apiserver (curl) works within [`FRESH`].
fn fresh_tls_connect(lab: &Lab, after: &str) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < FRESH {
        let out = lab
            .curl_proxy(&["-m", "2"], &format!("http://{POD_TARGET}/index.html"))
            .unwrap();
        if out.status.success() && out.stdout == POD_INDEX.as_bytes() {
            return start.elapsed();
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    panic!("no successful mTLS CONNECT within {FRESH:?} after {after}: {last}");
}

/// Downloads of the pod's 64 MiB file through the mTLS proxy, one after another at a capped
/// rate, each checked against the file's hash.
struct Bulk {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    bad: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Bulk {
    fn start(lab: &Lab) -> Bulk {
        let (_, want) = lab.big.clone().unwrap();
        let out_file: PathBuf = lab.dir().join("bulk.bin");
        let p = &lab.pki;
        let args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            lab.seeds[0].name().into(),
            "curl".into(),
            "-sS".into(),
            "--proxytunnel".into(),
            "--proxy".into(),
            format!("https://{PROXY_TCP}"),
            "--proxy-cacert".into(),
            p.ca.display().to_string(),
            "--proxy-cert".into(),
            p.client_cert.display().to_string(),
            "--proxy-key".into(),
            p.client_key.display().to_string(),
            "--limit-rate".into(),
            "40M".into(),
            "-m".into(),
            "60".into(),
            "-o".into(),
            out_file.display().to_string(),
            format!("http://{POD_TARGET}/big.bin"),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let handle = {
            let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&out_file);
                    let res = Command::new("ip").args(&args).stdin(Stdio::null()).output();
                    let verdict = match res {
                        Ok(o) if o.status.success() => match sha256_file(&out_file) {
                            Ok(sum) if sum == want => None,
                            Ok(sum) => Some(format!("corrupt download: sha256 {sum}")),
                            Err(e) => Some(format!("no output: {e:#}")),
                        },
                        Ok(o) => Some(format!(
                            "curl {}: {}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr).trim()
                        )),
                        Err(e) => Some(format!("run curl: {e}")),
                    };
                    match verdict {
                        None => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(v) => bad.lock().unwrap().push(v),
                    }
                }
            })
        };
        Bulk {
            stop,
            ok,
            bad,
            handle: Some(handle),
        }
    }

    /// Fails if any download so far failed or was corrupt.
    fn check(&self, after: &str) {
        let bad = self.bad.lock().unwrap();
        assert!(
            bad.is_empty(),
            "bulk transfer broke during {after}: {bad:?}"
        );
    }

    /// Stops after the download in flight; returns the number of intact downloads.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.check("the last download");
        self.ok.load(Ordering::Relaxed)
    }
}

/// Runs one case and the checks after it: the bulk transfer still intact, the established
/// tunnel untouched (no new stream accepted, client ready) unless `reconnects`, and a fresh
/// CONNECT within 2 s.
fn case(lab: &mut Lab, bulk: &Bulk, name: &str, reconnects: bool, f: impl FnOnce(&mut Lab)) {
    let accepted = seed_metric(lab, "vpn_seed_streams_accepted_total");
    let start = Instant::now();
    f(&mut *lab);
    let took = start.elapsed();
    let fresh = fresh_connect(lab, name);
    bulk.check(name);
    if !reconnects {
        assert_eq!(
            seed_metric(lab, "vpn_seed_streams_accepted_total"),
            accepted,
            "{name}: the established tunnel was replaced"
        );
        assert_eq!(
            http_status(&lab.shoots[0], &format!("http://{CLIENT_METRICS}/readyz")),
            Some(200),
            "{name}: the client lost its tunnel"
        );
    }
    eprintln!("case {name}: {took:.2?}, fresh CONNECT after {fresh:.2?}");
}

/// Sends `bytes` on a new stream to the tunnel port and expects the server to close it
/// within `within`, without answering anything but (for a CONNECT head) its `200`.
fn expect_closed(addr: SocketAddr, bytes: &[u8], within: Duration, what: &str) {
    let (got, closed) = send_and_watch(addr, bytes, within + Duration::from_secs(1)).unwrap();
    assert!(closed, "{what}: stream not closed within {within:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 200"),
        "{what}: unexpected answer {text:?}"
    );
}

fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = (msg.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(msg);
    f
}

fn tunnel_addr() -> SocketAddr {
    SEED_TUNNEL.parse().unwrap()
}

/// Samples the RSS of `pid` every 50 ms while `f` runs; returns the largest sample (KiB).
fn peak_rss_during<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (out, peak.load(Ordering::Relaxed))
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn tunnel_port_refuses_strangers_and_shrugs_off_floods() {
    let _serial = serial();
    let Some(mut lab) = hostile_lab() else {
        return;
    };
    let (seed, client) = lab.keys();
    let addr = tunnel_addr();
    let server = pid(&lab, "seed-server");
    let client_pid = pid(&lab, "shoot-client");
    // Idle memory once the tunnel carried traffic.
    uds_get(&lab).unwrap();
    let idle_server = rss_kib(server).unwrap();
    let idle_client = rss_kib(client_pid).unwrap();
    let bulk = Bulk::start(&lab);

    case(&mut lab, &bulk, "garbage", false, |l| {
        l.gw.in_ns(|| {
            for n in [1, 7, 8, 100, 4096, 20000] {
                expect_closed(addr, &random_bytes(n), Duration::from_secs(3), "garbage");
            }
        })
        .unwrap();
    });
    case(
        &mut lab,
        &bulk,
        "TLS and HTTP instead of the protocol",
        false,
        |l| {
            l.gw.in_ns(|| {
                let hello = [
                    &[
                        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
                    ][..],
                    &random_bytes(160),
                ]
                .concat();
                expect_closed(addr, &hello, Duration::from_secs(1), "TLS hello");
                expect_closed(
                    addr,
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                    Duration::from_secs(1),
                    "HTTP GET",
                );
            })
            .unwrap();
        },
    );
    case(&mut lab, &bulk, "wrong preambles", false, |l| {
        let client_key = common::io::keyfile::load_private_key(&client.private_file).unwrap();
        let hint = common::preamble::key_hint(&x25519_dalek::PublicKey::from(&client_key));
        l.gw.in_ns(|| {
            for pre in [
                b"SVPN\x09\0\0\0".to_vec(),
                b"SVPN\x01\x01\0\0".to_vec(),
                b"SVPX\x01\0\0\0".to_vec(),
                // Version 2 naming the real client, with a tag made up by a stranger.
                [
                    &b"SVPN\x02\0\0\0"[..],
                    &7u64.to_be_bytes(),
                    &1u64.to_be_bytes(),
                    &hint,
                    &random_bytes(16),
                ]
                .concat(),
            ] {
                let mut bytes = pre.clone();
                bytes.extend_from_slice(&initiations(&seed.public, 1).unwrap()[0]);
                expect_closed(addr, &bytes, Duration::from_secs(1), "wrong preamble");
            }
        })
        .unwrap();
    });
    case(&mut lab, &bulk, "bad frames", false, |l| {
        l.gw.in_ns(|| {
            let v1 = |rest: &[u8]| [&PREAMBLE_V1[..], rest].concat();
            let quick = Duration::from_secs(1);
            expect_closed(addr, &v1(&[0, 0]), quick, "zero-length frame");
            expect_closed(addr, &v1(&[0xff, 0xff, 1, 2, 3]), quick, "oversize frame");
            expect_closed(addr, &v1(&frame(&random_bytes(148))), quick, "random frame");
            let mut init = random_bytes(148);
            init[0] = 1;
            expect_closed(addr, &v1(&frame(&init)), quick, "initiation, bad mac1");
            let mut data = random_bytes(64);
            data[0] = 4;
            data[4..8].copy_from_slice(&(77u32 << 8).to_le_bytes());
            expect_closed(addr, &v1(&frame(&data)), quick, "data, unknown index");
            let mut data0 = random_bytes(64);
            data0[0] = 4;
            data0[4..8].copy_from_slice(&0u32.to_le_bytes());
            expect_closed(addr, &v1(&frame(&data0)), quick, "data, forged tag");
            // Truncated: half a frame, then silence: closed at the pre-authentication deadline.
            let started = Instant::now();
            expect_closed(
                addr,
                &v1(&[0, 148, 1, 0, 0, 0]),
                Duration::from_secs(3),
                "truncated frame",
            );
            let t = started.elapsed();
            assert!(t >= Duration::from_millis(1500), "closed too early: {t:?}");
            // A CONNECT head that never ends.
            expect_closed(
                addr,
                b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n",
                Duration::from_secs(3),
                "endless CONNECT head",
            );
        })
        .unwrap();
    });
    case(&mut lab, &bulk, "unknown keys", false, |l| {
        let inits = initiations(&seed.public, 5).unwrap();
        l.gw.in_ns(|| {
            for init in &inits {
                let bytes = [&PREAMBLE_V1[..], init].concat();
                expect_closed(addr, &bytes, Duration::from_secs(1), "unknown key");
            }
        })
        .unwrap();
        let log = l.proc("seed-server").unwrap().log();
        assert!(
            log.contains("unknown peer public key"),
            "refusal not logged"
        );
    });
    case(
        &mut lab,
        &bulk,
        "replayed authenticated preamble",
        false,
        |l| {
            let client_key = common::io::keyfile::load_private_key(&client.private_file).unwrap();
            let server_pub = common::keys::parse_public_key(&seed.public).unwrap();
            let key = common::preamble::PreambleKey::for_client(&client_key, &server_pub).unwrap();
            let pre = key.preamble(0x5eed, 1);
            let before = limit_hits(l, "preamble_replay");
            l.gw.in_ns(|| {
                // Accepted as the client's, then closed for its bogus first message…
                let junk = [&pre[..], &frame(&random_bytes(148))].concat();
                expect_closed(addr, &junk, Duration::from_secs(1), "bogus first message");
                // …and refused as a replay the second time.
                expect_closed(addr, &junk, Duration::from_secs(1), "replayed preamble");
            })
            .unwrap();
            assert!(
                limit_hits(l, "preamble_replay") > before,
                "replay not counted"
            );
        },
    );
    case(
        &mut lab,
        &bulk,
        "floods of garbage and unknown keys",
        false,
        |l| {
            let inits = initiations(&seed.public, 64).unwrap();
            let (closed, total) =
                l.gw.in_ns(|| {
                    let src = sources();
                    let floods = [
                        Flood::open_from(&src, addr, 1000, |i| random_bytes(1 + i % 300)),
                        Flood::open_from(&src, addr, 1000, |i| {
                            [&PREAMBLE_V1[..], &inits[i % inits.len()]].concat()
                        }),
                        Flood::open_from(&src, addr, 500, |_| PREAMBLE_V1.to_vec()),
                    ];
                    let total: usize = floods.iter().map(|f| f.streams.len()).sum();
                    // Every one of them is closed by the server (evicted, refused or timed out).
                    let deadline = Instant::now() + Duration::from_secs(6);
                    let mut closed = 0;
                    while Instant::now() < deadline {
                        closed = floods.iter().map(Flood::closed_by_peer).sum();
                        if closed == total {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    (closed, total)
                })
                .unwrap();
            assert_eq!(closed, total, "streams the server kept open");
        },
    );

    // 10,000 idle streams as fast as they connect; meanwhile the legitimate client loses its
    // stream (ingress restart) and must come back within 2 s.
    let mut reconnect = Duration::ZERO;
    let evicted_before = limit_hits(&lab, "pending_streams");
    let ((), peak) = peak_rss_during(server, || {
        case(&mut lab, &bulk, "idle flood of 10,000 streams", true, |l| {
            let cpu0 = cpu_time(server).unwrap();
            let src = sources();
            let flood =
                l.gw.in_ns(|| Flood::open_from(&src, addr, 10_000, |_| Vec::new()))
                    .unwrap();
            eprintln!(
                "  opened {} idle streams in {:.2?} ({} failed); server CPU {:.2?}",
                flood.streams.len(),
                flood.elapsed,
                flood.failed,
                cpu_time(server).unwrap().saturating_sub(cpu0)
            );
            let second =
                l.gw.in_ns(|| Flood::open_from(&src, addr, 2_000, |_| Vec::new()))
                    .unwrap();
            // The client's stream breaks; it redials into the flood.
            l.kill_ingress().unwrap();
            l.start_ingress().unwrap();
            reconnect = l.wait_all_up(Duration::from_secs(5)).unwrap();
            drop((flood, second));
        });
    });
    eprintln!(
        "  tunnel back {reconnect:.2?} after the ingress listened again; server RSS idle {} KiB, peak {} KiB",
        idle_server, peak
    );
    assert!(
        reconnect <= FRESH,
        "client needed {reconnect:?} to reconnect during the flood"
    );
    assert!(limit_hits(&lab, "pending_streams") > evicted_before);
    assert!(
        peak <= idle_server + 64 * 1024,
        "server RSS {peak} KiB during the flood, idle {idle_server} KiB"
    );
    // Back near idle once the flood is over.
    let settled = wait_until(Duration::from_secs(60), "server RSS back near idle", || {
        rss_kib(server).is_some_and(|r| r <= idle_server + 16 * 1024)
    });
    assert!(
        settled.is_ok(),
        "server RSS {} KiB a minute after the flood, idle {idle_server} KiB",
        rss_kib(server).unwrap_or(0)
    );
    assert!(rss_kib(client_pid).unwrap() <= idle_client + 64 * 1024);

    // A flood of valid-mac1 initiations from random keys (each costs the server key work if
    // it is served) while a client that was never connected starts: it must be up within 2 s.
    let inits = initiations(&seed.public, 256).unwrap();
    let cpu_before = cpu_time(server).unwrap();
    let flood_start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..2)
        .map(|t| {
            let (stop, sent, inits) = (stop.clone(), sent.clone(), inits.clone());
            let gw = lab.gw.name().to_owned();
            std::thread::spawn(move || {
                tests::netns::enter(&gw).unwrap();
                let src = sources();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let from = Some(src[i % src.len()]);
                    if let Ok(mut s) =
                        tests::hostile::connect_from(from, addr, Duration::from_secs(1))
                    {
                        let bytes = [&PREAMBLE_V1[..], &inits[i % inits.len()]].concat();
                        let _ = s.write_all(&bytes);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 2;
                }
            })
        })
        .collect();
    let spare_budget_before = limit_hits(&lab, "handshakes");
    case(
        &mut lab,
        &bulk,
        "handshake flood while a new client starts",
        true,
        |l| {
            let spare = l.dir().join("spare.key");
            let args = l.client_args_for(&spare);
            let shoot2 = l.shoot2.as_ref().unwrap().name().to_owned();
            let started = Instant::now();
            l.start_client_in("spare-client", &shoot2, &args).unwrap();
            let ns2 = l.shoot2.as_ref().unwrap();
            let up = wait_until(Duration::from_secs(5), "the spare client's tunnel", || {
                http_status(ns2, &format!("http://{CLIENT_METRICS}/readyz")) == Some(200)
            });
            let t = started.elapsed();
            assert!(
                up.is_ok() && t <= FRESH,
                "new client up after {t:?} during the flood"
            );
            eprintln!("  new client's tunnel up {t:.2?} after its start");
            // The spare shoot has no route to the pod: while its tunnel is live, half of the
            // new flows would be pinned to it and fail (by ICMP, or by the dial timeout once
            // its kernel rate-limits the ICMP errors). It leaves before the fresh CONNECT.
            l.stop("spare-client").unwrap();
        },
    );
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let flood_time = flood_start.elapsed();
    let cpu = cpu_time(server).unwrap().saturating_sub(cpu_before);
    let n = sent.load(Ordering::Relaxed);
    eprintln!(
        "  {n} initiations in {flood_time:.2?}; server CPU {cpu:.2?} ({:.0} %)",
        100.0 * cpu.as_secs_f64() / flood_time.as_secs_f64()
    );
    assert!(limit_hits(&lab, "handshakes") > spare_budget_before);

    let intact = bulk.finish();
    assert!(intact >= 1, "no bulk download completed");
    eprintln!("bulk downloads intact: {intact}");
}

/// Sends `request` over a new UDS connection and returns the answer's status (0: none).
fn uds_status(lab: &Lab, request: &[u8]) -> u16 {
    let mut s = UnixStream::connect(lab.uds(0)).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    status_after(&mut s, request)
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn proxy_listeners_refuse_bad_requests_and_shrug_off_floods() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let Some(mut lab) = hostile_lab() else {
        return;
    };
    let server = pid(&lab, "seed-server");
    uds_get(&lab).unwrap();
    let idle = rss_kib(server).unwrap();
    let mode = std::fs::metadata(lab.uds(0)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "proxy socket mode {mode:o}");
    let tls = tls_client_config(&lab.pki).unwrap();
    let proxy: SocketAddr = PROXY_TCP.parse().unwrap();
    let bulk = Bulk::start(&lab);

    case(&mut lab, &bulk, "oversize heads", false, |l| {
        let mut big = b"CONNECT 100.96.1.10:8080 HTTP/1.1\r\nHost: x\r\n".to_vec();
        while big.len() < 64 * 1024 {
            big.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        big.extend_from_slice(b"\r\n");
        assert_eq!(uds_status(l, &big), 400, "64 KiB head over the UDS");
        let code = l.seeds[0]
            .in_ns(|| {
                let mut s = tls_connect(proxy, &tls).unwrap();
                status_after(&mut s, &big)
            })
            .unwrap();
        assert_eq!(code, 400, "64 KiB head over TLS");
    });

    case(&mut lab, &bulk, "odd authorities", false, |l| {
        for target in [
            "192.168.77.1:9443",
            "192.168.77.1:1194",
            "127.0.0.1:15000",
            "127.0.0.1:9443",
            "127.1:80",
            "[::1]:9443",
            "0.0.0.0:80",
            "[::]:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "[fe80::1%25seed0]:80",
            "[fe80::1%seed0]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:192.168.77.1]:9443",
            "[::127.0.0.1]:80",
            "[::ffff:100.96.1.10]:8080x",
            "192.168.123.1:9443",
            "192.168.123.2:80",
            "[fd8f:6d53:b97a:1::1]:80",
            "2130706433:80",
            "0177.0.0.1:80",
            "100.96.1.010:8080",
            "100.96.1.10:0",
            "100.96.1.10",
            "[100.96.1.10]:8080",
            "100.96.1.10:8080@127.0.0.1",
            "100.96.1.10:8080/x",
            "100.96.1.10:65536",
            ":8080",
            "",
        ] {
            let req = format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            let code = uds_status(l, req.as_bytes());
            assert!(
                matches!(code, 400 | 403),
                "CONNECT {target:?} answered {code}"
            );
        }
        // Hostnames are never resolved on the seed: without the shoot's DNS server, 502.
        for host in [
            "localhost:80",
            "kubernetes.default.svc:443",
            "metadata.google.internal:80",
            "0x7f000001:80",
        ] {
            let req = format!("CONNECT {host} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            assert_eq!(uds_status(l, req.as_bytes()), 502, "{host}");
        }
    });

    case(&mut lab, &bulk, "forward-proxy smuggling", false, |l| {
        for req in [
            &b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"[..],
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
            b"GET http://100.96.1.10:8080/ HTTP/1.1\nHost: x\n\n",
            b"GET http://100.96.1.10:8080/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET http://100.96.1.10:8080/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST http://100.96.1.10:8080/ HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
            b"GET  http://100.96.1.10:8080/ HTTP/1.1\r\n\r\n",
            b"GET http://100.96.1.10:8080/ HTTP/2.0\r\n\r\n",
            b"GET http://user:pw@100.96.1.10:8080/ HTTP/1.1\r\n\r\n",
            b"GET https://100.96.1.10:8080/ HTTP/1.1\r\n\r\n",
            b"GET http://127.0.0.1:15000/metrics HTTP/1.1\r\n\r\n",
            b"GET http://100.96.1.10:8080/ HTTP/1.1\r\nX: a\0b\r\n\r\n",
            b"CONNECT 100.96.1.10:8080 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"CONNECT 100.96.1.10:8080 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let code = uds_status(l, req);
            assert!(
                matches!(code, 400 | 403),
                "{:?} answered {code}",
                String::from_utf8_lossy(req)
            );
        }
        // The upstream sees the target's authority as Host, never the client's.
        let mut s = UnixStream::connect(l.uds(0)).unwrap();
        s.set_read_timeout(Some(IO)).unwrap();
        s.write_all(b"GET http://100.96.1.10:8080/host HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            .unwrap();
        let head = read_head(&mut s).unwrap();
        assert_eq!(status_of(&head).unwrap(), 200);
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert_eq!(body, "100.96.1.10:8080\n", "Host seen by the pod");
    });

    case(&mut lab, &bulk, "slowloris", false, |l| {
        // Heads trickling in a byte at a time are cut at the head timeout with a 400.
        let started = Instant::now();
        let codes: Vec<u16> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..20)
                .map(|_| {
                    let uds = l.uds(0);
                    s.spawn(move || {
                        let mut c = UnixStream::connect(uds).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        for b in b"CONNECT 100.96.1.10:8080 HTTP/1.1\r\n".iter() {
                            if c.write_all(&[*b]).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(250));
                        }
                        read_head(&mut c)
                            .ok()
                            .and_then(|h| status_of(&h).ok())
                            .unwrap_or(0)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let t = started.elapsed();
        assert!(codes.iter().all(|c| *c == 400 || *c == 0), "{codes:?}");
        assert!(
            t < Duration::from_secs(HEAD_TIMEOUT_S + 3),
            "slow heads held for {t:?}"
        );
    });

    let pending_before = limit_hits(&lab, "proxy_pending");
    let ((), peak) = peak_rss_during(server, || {
        case(
            &mut lab,
            &bulk,
            "idle flood of the TLS listener",
            false,
            |l| {
                let flood = l.seeds[0]
                    .in_ns(|| Flood::open(proxy, 3000, |_| Vec::new()))
                    .unwrap();
                eprintln!(
                    "  {} idle TLS connections in {:.2?}",
                    flood.streams.len(),
                    flood.elapsed
                );
                let t = fresh_tls_connect(l, "the idle flood");
                eprintln!("  mTLS CONNECT during the flood after {t:.2?}");
                drop(flood);
            },
        );
    });
    assert!(
        limit_hits(&lab, "proxy_pending") > pending_before,
        "no eviction counted"
    );
    eprintln!("  server RSS idle {idle} KiB, peak {peak} KiB");
    assert!(peak <= idle + 64 * 1024);

    let hello = client_hello(&tls).unwrap();
    let tls_before = limit_hits(&lab, "proxy_tls_handshakes");
    case(&mut lab, &bulk, "TLS handshake flood", false, |l| {
        // ClientHellos that never continue: each holds a handshake slot until its deadline.
        let flood = l.seeds[0]
            .in_ns(|| Flood::open(proxy, 600, |_| hello.clone()))
            .unwrap();
        eprintln!(
            "  {} stalled handshakes in {:.2?}",
            flood.streams.len(),
            flood.elapsed
        );
        let t = fresh_tls_connect(l, "the handshake flood");
        eprintln!("  mTLS CONNECT during the flood after {t:.2?}");
        drop(flood);
    });
    assert!(limit_hits(&lab, "proxy_tls_handshakes") > tls_before);

    case(
        &mut lab,
        &bulk,
        "idle flood of the Unix socket",
        false,
        |l| {
            let uds = l.uds(0);
            let conns: Vec<UnixStream> = (0..2000)
                .filter_map(|_| UnixStream::connect(&uds).ok())
                .collect();
            let t = fresh_connect(l, "the UDS flood");
            eprintln!(
                "  {} idle UDS connections; CONNECT after {t:.2?}",
                conns.len()
            );
        },
    );

    let intact = bulk.finish();
    assert!(intact >= 1);
    eprintln!("bulk downloads intact: {intact}");
}

/// The seed-side port of the proxied connection to the pod that `keep` holds open.
fn seed_port_of_pod_flow(lab: &Lab) -> u16 {
    let out = lab.seeds[0]
        .run("ss", &["-Htn", "dst", "100.96.1.10:8080"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.strip_prefix("192.168.123.1"))
        .find_map(|rest| rest.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .unwrap_or_else(|| panic!("no proxied connection to the pod in:\n{text}"))
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn packets_from_the_shoot_never_reach_the_seed() {
    let _serial = serial();
    let Some(mut lab) = hostile_lab() else {
        return;
    };
    let bulk = Bulk::start(&lab);
    // The shoot routes seed addresses into the tunnel, as a hostile shoot admin could.
    lab.shoots[0]
        .ip(&["route", "add", "192.168.77.0/24", "dev", "tun0"])
        .unwrap();
    // A listener on every seed address that must never see a connection from the shoot.
    let trap = lab.seeds[0]
        .in_ns(|| {
            let l = TcpListener::bind("0.0.0.0:7777").unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .unwrap();
    // A proxied connection to the pod stays open: its flow is what hostile ICMP errors quote.
    let (reply, keep) = connect_uds(&lab.uds(0), POD_TARGET, IO).unwrap();
    assert_eq!(reply.status, 200);
    let port = seed_port_of_pod_flow(&lab);
    let seed = [192, 168, 123, 1];
    let pod = [100, 96, 1, 10];

    let wait_counted = |lab: &Lab, reason: &str, before: f64, n: f64, what: &str| {
        let ok = wait_until(Duration::from_secs(3), what, || {
            drops(lab, reason) >= before + n
        });
        assert!(
            ok.is_ok(),
            "{what}: {reason} drops {} (before {before}, sent {n})",
            drops(lab, reason)
        );
    };

    case(
        &mut lab,
        &bulk,
        "connections from the shoot to the seed",
        false,
        |l| {
            let before = drops(l, "unknown_flow");
            let packets = vec![
                tcp4(pod, seed, 40000, 1194, 0x02),
                tcp4(pod, seed, 40001, 9443, 0x02),
                tcp4(pod, seed, 40002, 15000, 0x02),
                tcp4(pod, seed, 40003, 7777, 0x02),
                tcp4(pod, [192, 168, 77, 1], 40004, 7777, 0x02),
                tcp4(pod, [192, 168, 77, 1], 40005, 1194, 0x02),
                // A SYN-ACK and an ACK that answer nothing the seed sent.
                tcp4(pod, seed, 8080, 40006, 0x12),
                tcp4(pod, seed, 8080, 40007, 0x10),
                udp4(
                    pod,
                    seed,
                    5353,
                    53,
                    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
                ),
                udp4(pod, [192, 168, 77, 1], 5353, 53, b"x"),
            ];
            let n = l.shoots[0].in_ns(|| send_raw4(&packets).unwrap()).unwrap();
            assert_eq!(n, packets.len());
            wait_counted(
                l,
                "unknown_flow",
                before,
                n as f64,
                "connection attempts dropped",
            );
            assert!(
                trap.accept().is_err(),
                "a connection from the shoot reached the seed"
            );
        },
    );

    case(&mut lab, &bulk, "spoofed sources", false, |l| {
        let before = drops(l, "source_not_allowed");
        let packets = vec![
            tcp4([8, 8, 8, 8], seed, 40000, 7777, 0x02),
            tcp4([192, 168, 77, 2], seed, 40000, 7777, 0x02),
            tcp4([127, 0, 0, 1], seed, 40000, 7777, 0x02),
            // Spoofing the pod network's outside: a reply from an address the seed never asked.
            tcp4([10, 99, 0, 1], seed, 8080, port, 0x10),
        ];
        let n = l.shoots[0].in_ns(|| send_raw4(&packets).unwrap()).unwrap();
        wait_counted(
            l,
            "source_not_allowed",
            before,
            n as f64,
            "spoofed sources dropped",
        );
        assert!(trap.accept().is_err());
    });

    case(&mut lab, &bulk, "ICMP errors aimed elsewhere", false, |l| {
        let before = drops(l, "wrong_destination");
        // The packet the seed sent on the live flow, as an ICMP error would quote it.
        let quoted = tcp4(seed, pod, port, 8080, 0x10);
        let packets = vec![
            icmp4_unreachable(pod, [192, 168, 77, 1], 1, &quoted),
            icmp4_unreachable(pod, [192, 168, 123, 2], 1, &quoted),
            icmp4_unreachable([100, 96, 1, 1], [192, 168, 77, 1], 4, &quoted),
        ];
        let n = l.shoots[0].in_ns(|| send_raw4(&packets).unwrap()).unwrap();
        wait_counted(
            l,
            "wrong_destination",
            before,
            n as f64,
            "misdirected ICMP errors dropped",
        );
    });

    // The connection whose flow the errors quoted still works.
    let mut keep = keep;
    let (code, _) = http_get(&mut keep, POD_TARGET, "/index.html").unwrap();
    assert_eq!(code, 200);
    let intact = bulk.finish();
    assert!(intact >= 1);
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn hostile_dns_answers_are_refused() {
    let _serial = serial();
    if !e2e_guard() {
        return;
    }
    let records = [
        "loop.example=127.0.0.1",
        "seed.example=192.168.77.1",
        "vpn.example=192.168.123.1",
        "meta.example=169.254.169.254",
        "any.example=0.0.0.0",
        "six.example=::1",
        "mapped.example=::ffff:127.0.0.1",
        "linklocal.example=fe80::1",
        "good.example=100.96.1.10",
    ]
    .map(String::from);
    let opts = LabOptions {
        big_file: true,
        ..Default::default()
    };
    let lab = Lab::up_with_dns(opts, &records).unwrap();
    let bulk = Bulk::start(&lab);
    for name in [
        "loop.example",
        "seed.example",
        "vpn.example",
        "meta.example",
        "any.example",
        "six.example",
        "mapped.example",
        "linklocal.example",
    ] {
        let req = format!("CONNECT {name}:8080 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        assert_eq!(uds_status(&lab, req.as_bytes()), 403, "{name}");
    }
    let req = b"CONNECT good.example:8080 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    assert_eq!(uds_status(&lab, req), 200);
    fresh_connect(&lab, "the hostile answers");
    assert!(bulk.finish() >= 1);
}
