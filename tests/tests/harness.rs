//! Tests of the harness itself and of the ingress stand-in and pod server, without the VPN
//! binaries: the topology's isolation, and CONNECT through the ingress from the shoot to a
//! plain TCP backend in the seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use tests::client::{http_get, read_head, send_connect, status_of};
use tests::lab::{sha256_file, write_random_file, Lab, LabOptions, INGRESS, POD_INDEX};
use tests::pki::Pki;
use tests::{bin, e2e_guard, wait_tcp_listen, TempDir};

const BACKEND: &str = "192.168.77.1:1194";

/// A lab with the pod server, a podserver standing in for the seed server on the tunnel port,
/// and the ingress routing `vpn-seed-server` to it and `down` to a closed port.
fn ingress_lab() -> Option<Lab> {
    if !e2e_guard() {
        return None;
    }
    let mut lab = Lab::new(LabOptions::default()).expect("build topology");
    lab.start_pod_server().expect("pod server");
    let www = lab.dir().join("pod-www").display().to_string();
    let seed = lab.seeds[0].name().to_owned();
    let args: Vec<String> = ["--listen", BACKEND, "--dir", &www]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lab.spawn_in("backend", &seed, &bin("podserver"), &args)
        .expect("backend");
    wait_tcp_listen(
        &lab.seeds[0],
        BACKEND.parse().unwrap(),
        Duration::from_secs(10),
    )
    .expect("backend listens");
    let gw = lab.gw.name().to_owned();
    let args: Vec<String> = [
        "--listen",
        INGRESS,
        "--route",
        &format!("vpn-seed-server={BACKEND}"),
        "--route",
        "down=192.168.77.1:1195",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    lab.spawn_in("ingress", &gw, &bin("ingress-standin"), &args)
        .expect("ingress");
    wait_tcp_listen(&lab.gw, INGRESS.parse().unwrap(), Duration::from_secs(10))
        .expect("ingress listens");
    Some(lab)
}

fn shoot_stream(lab: &Lab) -> TcpStream {
    let addr: SocketAddr = INGRESS.parse().unwrap();
    let s = lab.shoots[0]
        .in_ns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap()
        .expect("connect to ingress from shoot");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn curl_shoot(lab: &Lab, args: &[&str]) -> (bool, String, String) {
    let out = lab.shoots[0]
        .exec("curl")
        .args(["-sS", "-m", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn topology_isolates_the_seed_and_the_shoot_reaches_the_pod() {
    if !e2e_guard() {
        return;
    }
    let mut lab = Lab::new(LabOptions::default()).expect("build topology");
    lab.start_pod_server().expect("pod server");
    lab.assert_seeds_isolated().expect("seed isolated");
    for url in [
        "http://100.96.1.10:8080/",
        "http://[fd00:96:0:1::10]:8080/index.html",
    ] {
        let (ok, body, err) = curl_shoot(&lab, &[url]);
        assert!(ok, "shoot → pod {url}: {err}");
        assert_eq!(body, POD_INDEX);
    }
    // gw neither routes nor forwards to the pod network.
    let out = lab
        .gw
        .exec("curl")
        .args(["-sS", "-m", "2", "http://100.96.1.10:8080/"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "gw must not reach the pod");
    let fwd = lab
        .gw
        .run("sysctl", &["-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "0");
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ingress_routes_connect_by_header_for_curl() {
    let Some(lab) = ingress_lab() else { return };
    let proxy = [
        "-p",
        "-x",
        "http://10.250.0.1:8132",
        "--proxy-header",
        "Reversed-VPN: vpn-seed-server",
    ];
    let (ok, body, err) = curl_shoot(
        &lab,
        &[&proxy[..], &["http://vpn-seed-server:1194/index.html"]].concat(),
    );
    assert!(ok, "curl through the ingress: {err}");
    assert_eq!(body, POD_INDEX);
    let (ok, body, err) = curl_shoot(
        &lab,
        &[
            "-p",
            "--proxy1.0",
            "10.250.0.1:8132",
            "--proxy-header",
            "Reversed-VPN: vpn-seed-server",
            "http://vpn-seed-server:1194/",
        ],
    );
    assert!(ok, "curl with HTTP/1.0 CONNECT: {err}");
    assert_eq!(body, POD_INDEX);
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ingress_keeps_early_bytes_and_half_close() {
    let Some(lab) = ingress_lab() else { return };
    let mut s = shoot_stream(&lab);
    // CONNECT head and the first request in one write: the bytes after the head must arrive.
    s.write_all(
        b"CONNECT vpn-seed-server:1194 HTTP/1.1\r\nHost: vpn-seed-server:1194\r\nReversed-VPN: vpn-seed-server\r\n\r\n\
          GET /index.html HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut s).unwrap();
    assert_eq!(head, b"HTTP/1.1 200 OK\r\n\r\n");
    // Half-close: our FIN must not cut the response.
    s.shutdown(Shutdown::Write).unwrap();
    let resp = read_head(&mut s).unwrap();
    assert_eq!(status_of(&resp).unwrap(), 200);
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert_eq!(body, POD_INDEX);

    // HTTP/1.0 CONNECT gets an HTTP/1.0 answer.
    let mut s = shoot_stream(&lab);
    let r = send_connect(
        &mut s,
        b"CONNECT x:1194 HTTP/1.0\r\nreversed-vpn: vpn-seed-server\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.head, "HTTP/1.0 200 OK\r\n\r\n");
    let (code, body) = http_get(&mut s, "pod", "/").unwrap();
    assert_eq!((code, body.as_slice()), (200, POD_INDEX.as_bytes()));
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn ingress_rejects_what_it_cannot_route() {
    let Some(lab) = ingress_lab() else { return };
    let cases: [(&[u8], u16); 5] = [
        (b"CONNECT x:1194 HTTP/1.1\r\nHost: x\r\n\r\n", 403),
        (
            b"CONNECT x:1194 HTTP/1.1\r\nReversed-VPN: nobody\r\n\r\n",
            404,
        ),
        (
            b"GET / HTTP/1.1\r\nReversed-VPN: vpn-seed-server\r\n\r\n",
            405,
        ),
        (
            b"CONNECT x:1194 HTTP/1.1\r\nReversed-VPN: down\r\n\r\n",
            503,
        ),
        (b"\x16\x03\x01garbage\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let mut s = shoot_stream(&lab);
        let r = send_connect(&mut s, req).unwrap();
        assert_eq!(
            r.status,
            want,
            "request {:?} got {}",
            String::from_utf8_lossy(req),
            r.head
        );
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(!rest.is_empty(), "non-200 answers carry a body");
    }
    let log = lab.proc("ingress").unwrap().log();
    assert!(log.contains("rejected"), "ingress logs rejections:\n{log}");
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn bulk_upload_and_download_through_the_ingress_keep_their_hash() {
    let Some(lab) = ingress_lab() else { return };
    let file = lab.dir().join("pod-www").join("mid.bin");
    let sum = write_random_file(&file, 16 << 20).unwrap();
    let proxy = [
        "-p",
        "-x",
        "http://10.250.0.1:8132",
        "--proxy-header",
        "Reversed-VPN: vpn-seed-server",
    ];
    let dl = lab.dir().join("dl.bin");
    let dls = dl.display().to_string();
    let (ok, _, err) = curl_shoot(
        &lab,
        &[&proxy[..], &["-o", &dls, "http://x:1194/mid.bin"]].concat(),
    );
    assert!(ok, "download: {err}");
    assert_eq!(sha256_file(&dl).unwrap(), sum);
    let up = file.display().to_string();
    let (ok, body, err) = curl_shoot(
        &lab,
        &[&proxy[..], &["-T", &up, "http://x:1194/upload"]].concat(),
    );
    assert!(ok, "upload: {err}");
    assert_eq!(body.trim(), sum);
}

#[test]
fn pki_verifies_with_openssl() {
    let dir = TempDir::new(&format!("pki-{}", std::process::id())).unwrap();
    let pki = Pki::generate(dir.path()).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&pki.client_key).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    if !Path::new("/usr/bin/openssl").exists() {
        eprintln!("openssl not installed; skipping chain verification");
        return;
    }
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&pki.ca)
        .arg(&pki.server_cert)
        .arg(&pki.client_cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
