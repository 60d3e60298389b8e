//! End-to-end tests of hostname CONNECT targets: the seed server asks the shoot's DNS server
//! (the `dnsserver` responder in the pod namespace) through the tunnel. Need root (or
//! `VPN_E2E=skip`) and `cargo build --release --workspace --bins` first (run them with `--release`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use tests::client::{connect_uds, expect_silence, http_get, ConnectReply};
use tests::e2e_guard;
use tests::lab::{Lab, LabOptions, POD_INDEX, POD_V4, POD_V6};

const IO: Duration = Duration::from_secs(10);

/// The lab with the DNS responder in the pod and the seed server using it (DNS timeout 1 s).
fn dns_lab() -> Lab {
    let records = [
        format!("web.default.svc.cluster.local={POD_V4}"),
        format!("v6only.default.svc.cluster.local={POD_V6}"),
        format!("pod.example.org={POD_V4}"),
        "evil.default.svc.cluster.local=192.168.77.1".to_string(),
    ];
    Lab::up_with_dns(LabOptions::default(), &records).expect("bring the lab up")
}

/// CONNECT `target` over the UDS; on 200 a GET of `/index.html` follows.
fn get(lab: &Lab, target: &str) -> (ConnectReply, u16, String) {
    let (reply, mut s) = connect_uds(&lab.uds(0), target, IO).expect("CONNECT over the UDS");
    assert_eq!(reply.status, 200, "CONNECT {target}: {}", reply.head);
    expect_silence(&mut s, Duration::from_millis(200), IO).expect("nothing after the 200 head");
    let (code, body) = http_get(&mut s, target, "/index.html").expect("GET through the tunnel");
    (reply, code, String::from_utf8_lossy(&body).into_owned())
}

/// CONNECT `target` expecting a refusal: the reply and its one-line body.
fn refused(lab: &Lab, target: &str) -> (ConnectReply, String) {
    let (reply, mut s): (ConnectReply, UnixStream) =
        connect_uds(&lab.uds(0), target, IO).expect("CONNECT over the UDS");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("refusal body");
    (reply, body)
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn hostname_targets_resolve_through_the_shoot_dns() {
    if !e2e_guard() {
        return;
    }
    let lab = dns_lab();

    // `.svc` names get the cluster domain.
    let (_, code, body) = get(&lab, "web.default.svc:8080");
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
    // Absolute names are asked as given (trailing dot accepted); case does not matter.
    let (_, code, body) = get(&lab, "Pod.Example.Org.:8080");
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
    // Only an AAAA record: dialled over IPv6.
    let (_, code, body) = get(&lab, "v6only.default.svc:8080");
    assert_eq!((code, body.as_str()), (200, POD_INDEX));

    // Unknown name: 502 at once.
    let (r, body) = refused(&lab, "nothere.default.svc:8080");
    assert_eq!(r.status, 502, "unknown name: {}", r.head);
    assert!(body.contains("no such host"), "body: {body:?}");
    assert!(
        r.elapsed < Duration::from_millis(900),
        "502 took {:?}",
        r.elapsed
    );

    // A name resolving outside the shoot networks: 403.
    let (r, body) = refused(&lab, "evil.default.svc:8080");
    assert_eq!(r.status, 403, "seed address by name: {}", r.head);
    assert!(body.contains("192.168.77.1"), "body: {body:?}");

    // Queries to the DNS server are dropped: 504 after the DNS timeout (1 s).
    lab.shoots[0]
        .run("nft", &["add table inet e2e_dnsdrop"])
        .unwrap();
    lab.shoots[0]
        .run(
            "nft",
            &["add chain inet e2e_dnsdrop drop_dns { type filter hook forward priority -10; policy accept; }"],
        )
        .unwrap();
    lab.shoots[0]
        .run(
            "nft",
            &["add rule inet e2e_dnsdrop drop_dns ip daddr 100.96.1.10 udp dport 53 drop"],
        )
        .unwrap();
    let (r, body) = refused(&lab, "pod2.example.org:8080");
    assert_eq!(r.status, 504, "silent DNS server: {}", r.head);
    assert!(body.contains("did not answer within 1s"), "body: {body:?}");
    assert!(
        r.elapsed >= Duration::from_millis(900) && r.elapsed < Duration::from_secs(3),
        "504 after {:?} (DNS timeout 1 s)",
        r.elapsed
    );
    let log = lab.proc("seed-server").unwrap().log();
    assert!(
        log.contains("request refused") && log.contains("nothere.default.svc:8080"),
        "refusals are logged:\n{log}"
    );
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn hostname_targets_without_a_dns_server_get_502() {
    if !e2e_guard() {
        return;
    }
    let lab = Lab::up(LabOptions::default()).expect("bring the lab up");
    let (r, body) = refused(&lab, "web.default.svc:8080");
    assert_eq!(r.status, 502, "no DNS server: {}", r.head);
    assert!(body.contains("--shoot-dns-server"), "body: {body:?}");
    // IP targets are unaffected.
    let (_, code, body) = get(&lab, "100.96.1.10:8080");
    assert_eq!((code, body.as_str()), (200, POD_INDEX));
}
