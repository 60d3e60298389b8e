//! Gardener's unified HTTP proxy port: the ingress stand-in listens on 8443 and routes by
//! `X-Gardener-Destination: outbound|1194||vpn-seed-server[-<i>].<namespace>.svc.cluster.local`
//! (Gardener's exact shape), two seed replicas behind it; values of another shape, unknown
//! replicas and the legacy header are refused. The client takes its header and port from the
//! rendered `deploy/gardener-unified-port` overlay. Needs root (or `VPN_E2E=skip`) and the
//! release binaries (`--release`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tests::client::send_connect;
use tests::lab::{
    Lab, LabOptions, INGRESS_UNIFIED, POD_INDEX, POD_TARGET, SHOOT_NAMESPACE, UNIFIED_HEADER,
};
use tests::lab_for_test;

/// Raw CONNECT to the ingress from the shoot with `headers`; the status it answers.
fn ingress_status(lab: &Lab, headers: &str) -> u16 {
    let addr: SocketAddr = INGRESS_UNIFIED.parse().unwrap();
    let mut s = lab.shoots[0]
        .in_ns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!(
        "CONNECT vpn-seed-server:1194 HTTP/1.1\r\nHost: vpn-seed-server:1194\r\n{headers}\r\n"
    );
    send_connect(&mut s, req.as_bytes()).unwrap().status
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn unified_port_routes_gardener_destinations_to_each_replica() {
    let Some(lab) = lab_for_test(LabOptions {
        seeds: 2,
        unified_port: true,
        ..LabOptions::default()
    }) else {
        return;
    };
    for i in 0..2 {
        let (code, body) = lab.connect_get(i, POD_TARGET, "/index.html").unwrap();
        assert_eq!((code, body.as_str()), (200, POD_INDEX), "via server {i}");
        assert!(lab.client_tunnel_up(0, i).unwrap(), "tunnel to replica {i}");
    }
    let ns = SHOOT_NAMESPACE;
    for (headers, want) in [
        // The legacy header on the unified port: no routing header.
        ("Reversed-VPN: vpn-seed-server-0\r\n".to_owned(), 403),
        // A replica that does not exist, and a value of another shape.
        (
            format!(
                "{UNIFIED_HEADER}: outbound|1194||vpn-seed-server-7.{ns}.svc.cluster.local\r\n"
            ),
            404,
        ),
        (
            format!("{UNIFIED_HEADER}: outbound|443||kube-apiserver.{ns}.svc.cluster.local\r\n"),
            404,
        ),
        (format!("{UNIFIED_HEADER}: vpn-seed-server-0\r\n"), 404),
    ] {
        assert_eq!(ingress_status(&lab, &headers), want, "{headers:?}");
    }
    let ok =
        format!("{UNIFIED_HEADER}: outbound|1194||vpn-seed-server-1.{ns}.svc.cluster.local\r\n");
    assert_eq!(ingress_status(&lab, &ok), 200);
}
