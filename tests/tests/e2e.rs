//! End-to-end tests with the real binaries in network namespaces (see `tests::lab`).
//! Each test builds its own topology; all need root (or `VPN_E2E=skip`) and
//! `cargo build --release --workspace --bins` first (run them with `--release`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use tests::client::{connect_uds, expect_silence, http_get, ConnectReply};
use tests::lab::{
    sha256_file, Lab, LabOptions, CLIENT_METRICS, LOCAL_INDEX, POD_INDEX, POD_TARGET, PROXY_TCP,
    SEED_METRICS, START_TIMEOUT,
};
use tests::pki::Pki;
use tests::wait::{http_status, wait_until};
use tests::{e2e_guard, lab_for_test};

const POD_URL: &str = "http://100.96.1.10:8080/index.html";
const IO: Duration = Duration::from_secs(10);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_curl_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: curl {}: {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// kube-apiserver's CONNECT over the UDS, then a GET of `/index.html` over the stream.
fn uds_get(lab: &Lab, target: &str) -> (ConnectReply, u16, String) {
    let (reply, mut s) = connect_uds(&lab.uds(0), target, IO).expect("CONNECT over the UDS");
    assert_eq!(reply.status, 200, "CONNECT {target}: {}", reply.head);
    expect_silence(&mut s, Duration::from_millis(300), IO).expect("nothing after the 200 head");
    let (code, body) = http_get(&mut s, target, "/index.html").expect("GET through the tunnel");
    (reply, code, text(&body))
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn a_apiserver_reaches_the_pod_over_mtls_and_uds() {
    let Some(lab) = lab_for_test(LabOptions::default()) else {
        return;
    };
    let out = lab.curl_proxy(&["-m", "10"], POD_URL).unwrap();
    assert_eq!(assert_curl_ok(&out, "curl over mTLS"), POD_INDEX);

    let (reply, code, body) = uds_get(&lab, POD_TARGET);
    assert!(
        reply.head.starts_with("HTTP/1.1 200") || reply.head.starts_with("HTTP/1.0 200"),
        "head: {:?}",
        reply.head
    );
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn b_bulk_download_and_upload_keep_their_hash() {
    let Some(lab) = lab_for_test(LabOptions {
        big_file: true,
        ..Default::default()
    }) else {
        return;
    };
    let (big, sum) = lab.big.clone().unwrap();
    let dl = lab.dir().join("download.bin");

    let t = Instant::now();
    let out = lab
        .curl_proxy(
            &["-m", "180", "-o", &dl.display().to_string()],
            "http://100.96.1.10:8080/big.bin",
        )
        .unwrap();
    assert_curl_ok(&out, "64 MiB download");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(sha256_file(&dl).unwrap(), sum, "download corrupted");
    eprintln!("download: 64 MiB in {secs:.2} s ({:.0} MiB/s)", 64.0 / secs);

    let t = Instant::now();
    let out = lab
        .curl_proxy(
            &["-m", "180", "-T", &big.display().to_string()],
            "http://100.96.1.10:8080/upload",
        )
        .unwrap();
    let body = assert_curl_ok(&out, "64 MiB upload");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(body.trim(), sum, "upload corrupted");
    eprintln!("upload: 64 MiB in {secs:.2} s ({:.0} MiB/s)", 64.0 / secs);
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn c_proxy_answers_403_503_502_504_in_time() {
    if !e2e_guard() {
        return;
    }
    let mut lab = Lab::new(LabOptions::default()).expect("build topology");
    lab.start_pod_server().unwrap();
    lab.start_ingress().unwrap();
    let mut args = lab.server_args(0);
    args.extend(["--tunnel-wait".into(), "3s".into()]);
    lab.start_server_with(0, &args).unwrap();
    let uds = lab.uds(0);

    // No tunnel yet: the request waits for one (--tunnel-wait), then gets 503.
    let (r, _) = connect_uds(&uds, POD_TARGET, IO).unwrap();
    assert_eq!(r.status, 503, "no tunnel: {}", r.head);
    assert!(
        (Duration::from_secs(3)..Duration::from_secs(4)).contains(&r.elapsed),
        "503 after {:?}, not after the 3 s tunnel wait",
        r.elapsed
    );
    let metrics =
        tests::prom::http_text(&lab.seeds[0], &format!("http://{SEED_METRICS}/metrics")).unwrap();
    assert_eq!(
        tests::prom::metric(&metrics, "vpn_seed_proxy_tunnel_wait_timeouts_total"),
        Some(1.0)
    );
    // A request made before the tunnel is up is held, and answered 200 once it is.
    let held = {
        let uds = uds.clone();
        std::thread::spawn(move || {
            let (r, mut s) = connect_uds(&uds, POD_TARGET, IO).unwrap();
            (r, http_get(&mut s, POD_TARGET, "/index.html").ok())
        })
    };
    lab.wait_for(IO, "the held request to wait", |l| {
        tests::prom::http_text(&l.seeds[0], &format!("http://{SEED_METRICS}/metrics"))
            .and_then(|m| tests::prom::metric(&m, "vpn_seed_proxy_waiting_for_tunnel"))
            == Some(1.0)
    })
    .unwrap();
    lab.start_client(0).unwrap();
    lab.wait_all_up(START_TIMEOUT).unwrap();
    let (r, got) = held.join().unwrap();
    assert_eq!(r.status, 200, "held request: {}", r.head);
    assert_eq!(got, Some((200, POD_INDEX.as_bytes().to_vec())));

    // Outside the shoot networks (the seed's own address): 403, over UDS and over mTLS.
    let (r, _) = connect_uds(&uds, "192.168.77.1:1194", IO).unwrap();
    assert_eq!(r.status, 403, "seed address: {}", r.head);
    let out = lab
        .curl_proxy(
            &["-m", "5", "-o", "/dev/null", "-w", "%{http_connect}"],
            "http://192.168.77.1:1194/",
        )
        .unwrap();
    assert!(
        !out.status.success(),
        "curl must fail for a forbidden target"
    );
    assert_eq!(text(&out.stdout).trim(), "403");

    // Closed port in the pod: 502 quickly.
    let (r, _) = connect_uds(&uds, "100.96.1.10:9", IO).unwrap();
    assert_eq!(r.status, 502, "closed port: {}", r.head);
    assert!(
        r.elapsed < Duration::from_secs(2),
        "502 took {:?}",
        r.elapsed
    );

    // Black-holed address: 504 after the dial timeout (2 s).
    lab.shoots[0]
        .run("nft", &["add table inet e2e_blackhole"])
        .unwrap();
    lab.shoots[0]
        .run("nft", &["add chain inet e2e_blackhole drop_pod99 { type filter hook forward priority -10; policy accept; }"])
        .unwrap();
    lab.shoots[0]
        .run(
            "nft",
            &["add rule inet e2e_blackhole drop_pod99 ip daddr 100.96.1.99 drop"],
        )
        .unwrap();
    let (r, _) = connect_uds(&uds, "100.96.1.99:80", IO).unwrap();
    assert_eq!(r.status, 504, "black hole: {}", r.head);
    assert!(
        r.elapsed >= Duration::from_millis(1500),
        "504 after {:?}, before the 2 s dial timeout",
        r.elapsed
    );
    assert!(
        r.elapsed < Duration::from_secs(3),
        "504 took {:?} (dial timeout 2 s)",
        r.elapsed
    );

    // The tunnel still serves.
    let (_, code, body) = uds_get(&lab, POD_TARGET);
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn d_tls_listener_requires_a_trusted_client_certificate() {
    let Some(lab) = lab_for_test(LabOptions::default()) else {
        return;
    };
    let no_cert = lab.seeds[0]
        .exec("curl")
        .args(["-sS", "-m", "5", "-w", "%{http_connect}", "--proxytunnel"])
        .args(["--proxy", &format!("https://{PROXY_TCP}"), "--proxy-cacert"])
        .arg(&lab.pki.ca)
        .arg(POD_URL)
        .output()
        .unwrap();
    assert!(
        !no_cert.status.success(),
        "curl without a client certificate must fail"
    );
    assert!(
        !text(&no_cert.stdout).contains("hello"),
        "no data without a certificate"
    );
    assert_ne!(text(&no_cert.stdout).trim(), "200");

    // A certificate from another CA is refused as well.
    let other_dir = lab.dir().join("other-ca");
    std::fs::create_dir(&other_dir).unwrap();
    let other = Pki::generate(&other_dir).unwrap();
    let foreign = lab.seeds[0]
        .exec("curl")
        .args(["-sS", "-m", "5", "-w", "%{http_connect}", "--proxytunnel"])
        .args(["--proxy", &format!("https://{PROXY_TCP}"), "--proxy-cacert"])
        .arg(&lab.pki.ca)
        .arg("--proxy-cert")
        .arg(&other.client_cert)
        .arg("--proxy-key")
        .arg(&other.client_key)
        .arg(POD_URL)
        .output()
        .unwrap();
    assert!(
        !foreign.status.success(),
        "curl with a foreign client certificate must fail"
    );
    assert!(!text(&foreign.stdout).contains("hello"));

    // The right certificate still works.
    let out = lab.curl_proxy(&["-m", "10"], POD_URL).unwrap();
    assert_eq!(assert_curl_ok(&out, "curl with certificate"), POD_INDEX);
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn e_ingress_restart_during_a_download_is_survived() {
    let Some(mut lab) = lab_for_test(LabOptions {
        big_file: true,
        ..Default::default()
    }) else {
        return;
    };
    let (_, sum) = lab.big.clone().unwrap();
    let dl = lab.start_download("download", "4M").unwrap();

    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    wait_until(Duration::from_secs(30), "8 MiB of the download", || {
        size(&dl) >= 8 << 20
    })
    .unwrap();

    lab.kill_ingress().unwrap();
    let at_kill = size(&dl);
    let restarted = Instant::now();
    lab.start_ingress().unwrap();
    let uds = lab.uds(0);
    let mut last = String::new();
    let res = wait_until(
        Duration::from_secs(10),
        "a new CONNECT after the ingress restart",
        || match connect_uds(&uds, POD_TARGET, Duration::from_secs(1)) {
            Ok((r, mut s)) if r.status == 200 => {
                match http_get(&mut s, POD_TARGET, "/index.html") {
                    Ok((200, body)) if body == POD_INDEX.as_bytes() => true,
                    other => {
                        last = format!("{other:?}");
                        false
                    }
                }
            }
            other => {
                last = format!("{:?}", other.map(|(r, _)| r.head));
                false
            }
        },
    );
    let elapsed = restarted.elapsed();
    res.unwrap_or_else(|e| panic!("{e:#}; last attempt: {last}"));
    eprintln!("new CONNECT worked {elapsed:?} after the ingress restart ({at_kill} bytes downloaded at the kill)");
    assert!(
        elapsed < Duration::from_secs(2),
        "new CONNECT took {elapsed:?} after the restart"
    );

    let curl = lab.proc_mut("download").unwrap();
    let st = curl.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(st.success(), "download failed ({st}): {}", curl.log());
    assert!(size(&dl) > at_kill);
    assert_eq!(
        sha256_file(&dl).unwrap(),
        sum,
        "download corrupted across the ingress restart"
    );
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn f_ipv6_pod_is_reachable() {
    let Some(lab) = lab_for_test(LabOptions::default()) else {
        return;
    };
    let out = lab
        .curl_proxy(&["-m", "10"], "http://[fd00:96:0:1::10]:8080/index.html")
        .unwrap();
    assert_eq!(assert_curl_ok(&out, "curl to the IPv6 pod"), POD_INDEX);
    let (_, code, body) = uds_get(&lab, "[fd00:96:0:1::10]:8080");
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn g_shoot_network_overlapping_a_seed_network() {
    let Some(lab) = lab_for_test(LabOptions {
        seed_local: true,
        ..Default::default()
    }) else {
        return;
    };
    let direct = lab.seeds[0]
        .exec("curl")
        .args(["-sS", "-m", "5", POD_URL])
        .output()
        .unwrap();
    assert_eq!(
        assert_curl_ok(&direct, "direct curl in the seed"),
        LOCAL_INDEX
    );
    let out = lab.curl_proxy(&["-m", "10"], POD_URL).unwrap();
    assert_eq!(assert_curl_ok(&out, "curl through the proxy"), POD_INDEX);
    let (_, code, body) = uds_get(&lab, POD_TARGET);
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn h_unknown_client_key_is_refused_and_peers_are_unaffected() {
    let Some(mut lab) = lab_for_test(LabOptions {
        second_shoot: true,
        ..Default::default()
    }) else {
        return;
    };
    let rogue = lab.gen_key("rogue").unwrap();
    let args = lab.client_args_for(&rogue.private_file);
    let shoot2 = lab.shoot2.as_ref().unwrap().name().to_owned();
    lab.start_client_in("rogue-client", &shoot2, &args).unwrap();

    let readyz = format!("http://{CLIENT_METRICS}/readyz");
    let ns2 = lab.shoot2.as_ref().unwrap();
    let up = wait_until(Duration::from_secs(5), "rogue tunnel", || {
        http_status(ns2, &readyz) == Some(200)
    });
    assert!(
        up.is_err(),
        "a client with an unknown key brought a tunnel up"
    );

    // The server names the refused key, so an operator can tell which client is misconfigured.
    let server_log = || lab.proc("seed-server").map(|p| p.log()).unwrap_or_default();
    let logged = wait_until(
        Duration::from_secs(5),
        "the server to log the refusal",
        || server_log().contains(&rogue.public),
    );
    assert!(
        logged.is_ok(),
        "server log does not name the refused key {}:\n{}",
        rogue.public,
        server_log()
    );

    assert_eq!(
        http_status(&lab.shoots[0], &readyz),
        Some(200),
        "good client lost its tunnel"
    );
    let out = lab.curl_proxy(&["-m", "10"], POD_URL).unwrap();
    assert_eq!(
        assert_curl_ok(&out, "CONNECT with the good peer"),
        POD_INDEX
    );
}
