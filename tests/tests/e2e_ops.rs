//! Operational end-to-end tests with the real binaries in network namespaces (see
//! `tests::lab`): metrics that pass `promtool`, proxy certificate reload on a kubelet-style
//! Secret symlink swap, graceful shutdown on SIGTERM (drain, exit codes, cleanup), and a real
//! Prometheus scraping a pod through the egress proxy. All need root (or `VPN_E2E=skip`),
//! the Debian package `prometheus` (for `promtool` and `prometheus`) and
//! `cargo build --release --workspace --bins` first (run them with `--release`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tests::client::{connect_uds, http_get, read_head, status_of};
use tests::lab::{
    Lab, LabOptions, CLIENT_METRICS, POD_INDEX, POD_TARGET, PROXY_TCP, ROUTE_VALUE, SEED_METRICS,
    START_TIMEOUT,
};
use tests::proc::signal;
use tests::prom::{http, prom_query, promtool_check, samples, scrape, value};
use tests::wait::wait_until;
use tests::{e2e_guard, lab_for_test, Netns};

const IO: Duration = Duration::from_secs(10);

/// Fails the test unless `tool` is on PATH, naming the Debian package that ships it.
fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} not found on PATH: install the Debian package `{package}` \
         (apt-get install {package}), or set VPN_E2E=skip"
    );
}

/// Content-Length of a response head (0 when absent).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// One keep-alive `GET path` on an established stream: status and body (by Content-Length).
fn get_keepalive<S: Read + Write>(s: &mut S, path: &str) -> anyhow::Result<(u16, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {POD_TARGET}\r\n\r\n").as_bytes())?;
    s.flush()?;
    let head = read_head(s)?;
    let mut body = vec![0u8; content_length(&head)];
    s.read_exact(&mut body)?;
    Ok((
        status_of(&head)?,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A CONNECT over the UDS to the pod with one keep-alive request answered on it.
fn open_uds_connection(lab: &Lab) -> UnixStream {
    let (reply, mut s) = connect_uds(&lab.uds(0), POD_TARGET, IO).expect("CONNECT over UDS");
    assert_eq!(reply.status, 200, "CONNECT: {}", reply.head);
    let (code, _) = get_keepalive(&mut s, "/whoami").expect("GET /whoami");
    assert_eq!(code, 200);
    s
}

fn seed_log(lab: &Lab) -> String {
    lab.proc("seed-server").map(|p| p.log()).unwrap_or_default()
}

fn pid_of(lab: &Lab, name: &str) -> u32 {
    lab.procs()
        .find(|(n, _)| *n == name)
        .map(|(_, pid)| pid)
        .unwrap_or_else(|| panic!("{name} is not running"))
}

/// Sends SIGTERM to process `name` of the lab; returns when it was sent.
fn sigterm(lab: &Lab, name: &str) -> Instant {
    signal(pid_of(lab, name), libc::SIGTERM).expect("SIGTERM");
    Instant::now()
}

/// Waits up to `timeout` for process `name` to exit; returns its status and when it was seen.
fn wait_exit(lab: &mut Lab, name: &str, timeout: Duration) -> (ExitStatus, Instant) {
    let res = lab.proc_mut(name).unwrap().wait_exit(timeout);
    let seen = Instant::now();
    match res {
        Ok(st) => (st, seen),
        Err(e) => panic!("{e:#}\nlog of {name}:\n{}", lab.proc(name).unwrap().log()),
    }
}

fn seed_rules(lab: &Lab) -> String {
    let v4 = lab.seeds[0].run("ip", &["rule", "show"]).unwrap();
    let v6 = lab.seeds[0].run("ip", &["-6", "rule", "show"]).unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&v4.stdout),
        String::from_utf8_lossy(&v6.stdout)
    )
}

fn nft_tables(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.run("nft", &["list", "tables"]).unwrap().stdout).into_owned()
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn metrics_pass_promtool() {
    if !e2e_guard() {
        return;
    }
    require_tool("promtool", "prometheus");
    let lab = lab_for_test(LabOptions::default()).unwrap();

    // Traffic: one CONNECT + GET over the UDS, one CONNECT refused with 403.
    let (reply, mut s) = connect_uds(&lab.uds(0), POD_TARGET, IO).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.head);
    let (code, body) = http_get(&mut s, POD_TARGET, "/index.html").unwrap();
    assert_eq!((code, body.as_slice()), (200, POD_INDEX.as_bytes()));
    drop(s);
    let (reply, _) = connect_uds(&lab.uds(0), "192.168.77.1:1194", IO).unwrap();
    assert_eq!(reply.status, 403, "{}", reply.head);

    for (ns, addr) in [
        (&lab.seeds[0], SEED_METRICS),
        (&lab.shoots[0], CLIENT_METRICS),
    ] {
        for path in ["healthz", "readyz"] {
            let (code, body) = http(ns, &format!("http://{addr}/{path}"));
            assert_eq!(code, 200, "{addr}/{path}: {body}");
        }
    }

    // The open-connection gauge drops once the splice notices the close.
    let mut seed = String::new();
    wait_until(Duration::from_secs(5), "no open proxied connection", || {
        seed = scrape(&lab.seeds[0], SEED_METRICS);
        value(&seed, "vpn_seed_proxy_open_connections", &[]) == 0.0
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{seed}"));
    let client = scrape(&lab.shoots[0], CLIENT_METRICS);
    promtool_check("seed server", &seed);
    promtool_check("shoot client", &client);

    let peer: String = lab.client_keys[0].public.chars().take(8).collect();
    let p = [("peer", peer.as_str())];
    assert_eq!(value(&seed, "vpn_seed_tunnel_up", &p), 1.0);
    assert!(value(&seed, "vpn_seed_handshakes_total", &p) >= 1.0);
    let age = value(&seed, "vpn_seed_last_handshake_age_seconds", &p);
    assert!((0.0..60.0).contains(&age), "handshake age {age}");
    for dir in ["rx", "tx"] {
        let b = value(
            &seed,
            "vpn_seed_peer_bytes_total",
            &[("peer", &peer), ("direction", dir)],
        );
        assert!(b > 0.0, "seed {dir} bytes {b}");
    }
    let drops = samples(&seed, "vpn_seed_packets_dropped_total", &[]);
    assert!(
        !drops.is_empty() && drops.iter().all(|(l, _)| l.starts_with("reason=\"")),
        "drop counters: {drops:?}"
    );
    for reason in ["rejected", "queue_full", "no_stream"] {
        assert_eq!(
            value(
                &seed,
                "vpn_seed_frames_dropped_total",
                &[("reason", reason)]
            ),
            0.0,
            "seed frames dropped ({reason})"
        );
        assert_eq!(
            value(
                &client,
                "vpn_shoot_frames_dropped_total",
                &[("reason", reason)]
            ),
            0.0,
            "client frames dropped ({reason})"
        );
    }
    assert!(value(&seed, "vpn_seed_proxy_requests_total", &[("code", "200")]) >= 1.0);
    assert!(value(&seed, "vpn_seed_proxy_requests_total", &[("code", "403")]) >= 1.0);
    assert!(
        value(
            &seed,
            "vpn_seed_proxy_dial_seconds_bucket",
            &[("le", "+Inf")]
        ) >= 1.0
    );
    assert!(value(&seed, "vpn_seed_proxy_dial_seconds_count", &[]) >= 1.0);
    assert!(value(&seed, "vpn_seed_flows", &[]) >= 0.0);

    let srv = [("server", ROUTE_VALUE)];
    assert_eq!(value(&client, "vpn_shoot_tunnel_up", &srv), 1.0);
    assert!(value(&client, "vpn_shoot_reconnects_total", &srv) >= 0.0);
    for dir in ["rx", "tx"] {
        let b = value(
            &client,
            "vpn_shoot_peer_bytes_total",
            &[("server", ROUTE_VALUE), ("direction", dir)],
        );
        assert!(b > 0.0, "client {dir} bytes {b}");
    }
    assert!(!samples(&client, "vpn_shoot_packets_dropped_total", &[]).is_empty());
    eprintln!(
        "seed: {} lines, {} families; client: {} lines, {} families",
        seed.lines().count(),
        seed.lines().filter(|l| l.starts_with("# TYPE")).count(),
        client.lines().count(),
        client.lines().filter(|l| l.starts_with("# TYPE")).count()
    );
}

/// A test PKI of its own: one CA, two server certificates (different keys and subjects)
/// and a client certificate.
struct RotPki {
    ca: String,
    server_a: (String, String),
    server_b: (String, String),
    client: (String, String),
}

impl RotPki {
    fn generate() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "vpn-e2e-rotation-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |cn: &str, sans: &[&str], usage| {
            let mut p =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let server = || ExtendedKeyUsagePurpose::ServerAuth;
        Self {
            server_a: leaf("vpn-seed-server-a", &["127.0.0.1", "localhost"], server()),
            server_b: leaf("vpn-seed-server-b", &["127.0.0.1", "localhost"], server()),
            client: leaf("kube-apiserver", &[], ExtendedKeyUsagePurpose::ClientAuth),
            ca: ca.pem(),
        }
    }
}

/// Writes `..<version>/{tls.crt,tls.key,ca.crt}` under `dir` like the kubelet does.
fn write_secret_version(dir: &Path, version: &str, (cert, key): &(String, String), ca: &str) {
    let v = dir.join(version);
    std::fs::create_dir(&v).unwrap();
    std::fs::write(v.join("tls.crt"), cert).unwrap();
    tests::pki::write_secret(&v.join("tls.key"), key.as_bytes()).unwrap();
    std::fs::write(v.join("ca.crt"), ca).unwrap();
}

fn tls_client(pki: &RotPki) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.as_bytes()).unwrap())
        .unwrap();
    let certs = vec![CertificateDer::from_pem_slice(pki.client.0.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.client.1.as_bytes()).unwrap();
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap();
    Arc::new(cfg)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A completed TLS handshake with the proxy listener in the seed namespace.
fn tls_connect(lab: &Lab, cfg: &Arc<ClientConfig>) -> anyhow::Result<Tls> {
    let addr: SocketAddr = PROXY_TCP.parse()?;
    let tcp =
        lab.seeds[0].in_ns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
    tcp.set_read_timeout(Some(IO))?;
    tcp.set_write_timeout(Some(IO))?;
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = ClientConnection::new(cfg.clone(), name)?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn presented(s: &Tls) -> Vec<u8> {
    s.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default()
}

/// CONNECT to the pod over an established TLS stream.
fn tls_connect_pod(s: &mut Tls) -> anyhow::Result<u16> {
    s.write_all(&tests::client::apiserver_connect_request(POD_TARGET))?;
    s.flush()?;
    status_of(&read_head(s)?)
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn proxy_certificate_reload_with_symlink_swap() {
    if !e2e_guard() {
        return;
    }
    let mut lab = Lab::new(LabOptions::default()).expect("build topology");
    lab.start_pod_server().unwrap();
    lab.start_ingress().unwrap();

    let pki = RotPki::generate();
    let dir = lab.dir().join("proxy-tls");
    std::fs::create_dir(&dir).unwrap();
    write_secret_version(&dir, "..2026_a", &pki.server_a, &pki.ca);
    std::os::unix::fs::symlink("..2026_a", dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
    }

    let (_, client) = lab.keys();
    let mut args = lab.server_args_with(0, &[client.public]);
    for (flag, file) in [
        ("--proxy-tls-cert", "tls.crt"),
        ("--proxy-tls-key", "tls.key"),
        ("--proxy-client-ca", "ca.crt"),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = dir.join(file).display().to_string();
    }
    lab.start_server_with(0, &args).unwrap();
    lab.start_client(0).unwrap();
    lab.wait_all_up(START_TIMEOUT).unwrap();

    let cfg = tls_client(&pki);
    let mut old = tls_connect(&lab, &cfg).expect("TLS to the proxy");
    assert_eq!(presented(&old), der(&pki.server_a.0), "initial certificate");
    assert_eq!(tls_connect_pod(&mut old).unwrap(), 200);
    let (code, first) = get_keepalive(&mut old, "/whoami").unwrap();
    assert_eq!(code, 200, "{first}");

    // The kubelet's atomic update: new version dir, temporary symlink renamed over ..data.
    write_secret_version(&dir, "..2026_b", &pki.server_b, &pki.ca);
    std::os::unix::fs::symlink("..2026_b", dir.join("..data_tmp")).unwrap();
    let swapped = Instant::now();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_a")).unwrap();

    let new_der = der(&pki.server_b.0);
    let mut last = String::new();
    let took = wait_until(
        Duration::from_secs(5),
        "the new certificate",
        || match tls_connect(&lab, &cfg) {
            Ok(s) if presented(&s) == new_der => true,
            Ok(_) => {
                last = "old certificate".into();
                false
            }
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#} (last: {last})\n{}", seed_log(&lab)));
    eprintln!(
        "new certificate presented {:?} after the swap (poll took {took:?})",
        swapped.elapsed()
    );

    // The connection from before the swap still carries requests.
    let (code, again) = get_keepalive(&mut old, "/whoami").expect("old connection after swap");
    assert_eq!((code, again.as_str()), (200, first.as_str()));

    // A new connection with the new certificate is a working proxy connection.
    let mut fresh = tls_connect(&lab, &cfg).unwrap();
    assert_eq!(presented(&fresh), new_der);
    assert_eq!(tls_connect_pod(&mut fresh).unwrap(), 200);
    let (code, _) = get_keepalive(&mut fresh, "/whoami").unwrap();
    assert_eq!(code, 200);

    let log = seed_log(&lab);
    assert!(
        log.contains("proxy TLS certificates reloaded"),
        "no reload log line:\n{log}"
    );
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn sigterm_drains_open_connections() {
    let Some(mut lab) = lab_for_test(LabOptions::default()) else {
        return;
    };
    let uds = lab.uds(0);
    let mut conn = open_uds_connection(&lab);
    assert!(seed_rules(&lab).contains("lookup 1194"), "no policy rule");
    let ready = format!("http://{SEED_METRICS}/readyz");
    let health = format!("http://{SEED_METRICS}/healthz");

    let t0 = sigterm(&lab, "seed-server");
    let mut seen = (0, String::new());
    let not_ready = wait_until(Duration::from_secs(2), "/readyz 503", || {
        seen = http(&lab.seeds[0], &ready);
        seen.0 == 503
    })
    .unwrap_or_else(|e| panic!("{e:#}; last {seen:?}\n{}", seed_log(&lab)));
    eprintln!("/readyz 503 {not_ready:?} after SIGTERM");
    assert!(
        not_ready < Duration::from_secs(1),
        "503 after {not_ready:?}"
    );
    assert_eq!(seen.1.trim(), "shutting down");
    let (code, body) = http(&lab.seeds[0], &health);
    assert_eq!(code, 200, "/healthz while draining: {body}");

    // No new CONNECT over the UDS: the listener is closed.
    let mut last = String::new();
    wait_until(
        Duration::from_secs(1),
        "the UDS to refuse",
        || match connect_uds(&uds, POD_TARGET, Duration::from_secs(1)) {
            Err(e) => {
                last = format!("{e:#}");
                true
            }
            Ok((r, _)) => {
                last = r.head;
                false
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}; last answer {last:?}"));
    eprintln!("new CONNECT while draining: {last}");

    // The open connection still works.
    let (code, _) = get_keepalive(&mut conn, "/whoami").expect("open connection while draining");
    assert_eq!(code, 200);
    let (code, _) = http(&lab.seeds[0], &ready);
    assert_eq!(code, 503);

    let closed = Instant::now();
    drop(conn);
    let (st, exited) = wait_exit(&mut lab, "seed-server", Duration::from_secs(5));
    let after_close = exited.duration_since(closed);
    eprintln!(
        "seed server exited {st} {after_close:?} after the last connection closed ({:?} after SIGTERM)",
        exited.duration_since(t0)
    );
    assert_eq!(st.code(), Some(0), "exit status {st}\n{}", seed_log(&lab));
    assert!(
        after_close < Duration::from_secs(2),
        "exit took {after_close:?}"
    );
    let rules = seed_rules(&lab);
    assert!(!rules.contains("lookup 1194"), "policy rule left:\n{rules}");
    assert!(!uds.exists(), "UDS {} left behind", uds.display());

    // The shoot client: exit 0 and its nftables table removed.
    assert!(nft_tables(&lab.shoots[0]).contains("inet vpn_shoot_client"));
    let t1 = sigterm(&lab, "shoot-client");
    let (st, exited) = wait_exit(&mut lab, "shoot-client", Duration::from_secs(5));
    eprintln!(
        "shoot client exited {st} {:?} after SIGTERM",
        exited.duration_since(t1)
    );
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        lab.proc("shoot-client").unwrap().log()
    );
    let tables = nft_tables(&lab.shoots[0]);
    assert!(
        !tables.contains("vpn_shoot_client"),
        "table left:\n{tables}"
    );
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn sigterm_drain_timeout_exits_3() {
    if !e2e_guard() {
        return;
    }
    let mut lab = Lab::new(LabOptions::default()).expect("build topology");
    lab.start_pod_server().unwrap();
    lab.start_ingress().unwrap();
    let (_, client) = lab.keys();
    let mut args = lab.server_args_with(0, &[client.public]);
    args.extend(["--shutdown-timeout".into(), "1s".into()]);
    lab.start_server_with(0, &args).unwrap();
    lab.start_client(0).unwrap();
    lab.wait_all_up(START_TIMEOUT).unwrap();

    let mut conn = open_uds_connection(&lab);
    let t0 = sigterm(&lab, "seed-server");
    let (st, exited) = wait_exit(&mut lab, "seed-server", Duration::from_secs(6));
    let took = exited.duration_since(t0);
    eprintln!("seed server exited {st} {took:?} after SIGTERM with a connection open");
    assert_eq!(st.code(), Some(3), "exit status {st}\n{}", seed_log(&lab));
    assert!(
        (Duration::from_millis(800)..=Duration::from_secs(3)).contains(&took),
        "exit after {took:?} (shutdown timeout 1 s)"
    );
    // The connection was closed by the exit.
    let mut b = [0u8; 16];
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(matches!(conn.read(&mut b), Ok(0) | Err(_)));
    assert!(!seed_rules(&lab).contains("lookup 1194"));
}

fn answers(lab: &Lab, code: &str) -> f64 {
    value(
        &scrape(&lab.seeds[0], SEED_METRICS),
        "vpn_seed_proxy_requests_total",
        &[("code", code)],
    )
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn prometheus_scrapes_a_pod_through_the_proxy() {
    if !e2e_guard() {
        return;
    }
    require_tool("prometheus", "prometheus");
    let mut lab = lab_for_test(LabOptions::default()).unwrap();
    std::fs::write(
        lab.dir().join("pod-www").join("metrics"),
        "# HELP pod_up Whether the pod serves.\n# TYPE pod_up gauge\npod_up 1\n",
    )
    .unwrap();
    let p = lab.pki.clone();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: pod
    metrics_path: /metrics
    scrape_interval: 1s
    scrape_timeout: 1s
    proxy_url: https://{PROXY_TCP}
    tls_config:
      ca_file: {}
      cert_file: {}
      key_file: {}
    static_configs:
      - targets: ['{POD_TARGET}']
"#,
        p.ca.display(),
        p.client_cert.display(),
        p.client_key.display()
    );
    let config_file = lab.dir().join("prometheus.yml");
    std::fs::write(&config_file, config).unwrap();
    let before = answers(&lab, "200");

    let data: PathBuf = lab.dir().join("prometheus-data");
    let args = vec![
        format!("--config.file={}", config_file.display()),
        format!("--storage.tsdb.path={}", data.display()),
        "--web.listen-address=127.0.0.1:9090".into(),
    ];
    let seed_ns = lab.seeds[0].name().to_owned();
    let started = Instant::now();
    lab.spawn_in("prometheus", &seed_ns, Path::new("prometheus"), &args)
        .unwrap();
    let up = lab
        .wait_proc(
            "prometheus",
            Duration::from_secs(20),
            "Prometheus to scrape the pod (up{job=\"pod\"} == 1)",
            |l| prom_query(&l.seeds[0], r#"up{job="pod"}"#) == Some(1.0),
        )
        .unwrap_or_else(|e| {
            let prom = lab.proc("prometheus").map(|p| p.log()).unwrap_or_default();
            let targets = http(&lab.seeds[0], "http://127.0.0.1:9090/api/v1/targets").1;
            panic!(
                "{e:#}\ntargets: {targets}\nprometheus log:\n{prom}\nseed log:\n{}",
                seed_log(&lab)
            )
        });
    eprintln!(
        "up{{job=\"pod\"}} == 1 after {up:?} ({:?} after starting Prometheus)",
        started.elapsed()
    );
    wait_until(Duration::from_secs(5), "pod_up == 1", || {
        prom_query(&lab.seeds[0], "pod_up") == Some(1.0)
    })
    .unwrap();
    let after = answers(&lab, "200");
    assert!(after > before, "200 answers {before} -> {after}");
    eprintln!("200 answers: {before} before Prometheus, {after} after");

    // A forwarded request to an address outside the shoot networks: 403.
    let forbidden_before = answers(&lab, "403");
    let out = lab.seeds[0]
        .exec("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-x", &format!("https://{PROXY_TCP}"), "--proxy-cacert"])
        .arg(&p.ca)
        .arg("--proxy-cert")
        .arg(&p.client_cert)
        .arg("--proxy-key")
        .arg(&p.client_key)
        .arg(format!(
            "http://192.168.77.1:{}/metrics",
            port(SEED_METRICS)
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "403");
    assert!(answers(&lab, "403") > forbidden_before);
    let log = seed_log(&lab);
    assert!(
        log.lines()
            .any(|l| l.contains("request refused") && l.contains("192.168.77.1")),
        "no refusal log line:\n{log}"
    );
}

fn port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>().map(|a| a.port()).unwrap()
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn peers_dir_changes_apply_without_a_restart() {
    let Some(mut lab) = lab_for_test(LabOptions {
        peers_dir: true,
        second_shoot: true,
        ..Default::default()
    }) else {
        return;
    };
    let peers = lab.dir().join("peers");
    let newcomer = lab.gen_key("newcomer").unwrap();
    let args = lab.client_args_for(&newcomer.private_file);
    let shoot2 = lab.shoot2.as_ref().unwrap().name().to_owned();
    lab.start_client_in("newcomer", &shoot2, &args).unwrap();
    let seed_metrics = format!("http://{SEED_METRICS}/metrics");
    let tunnels = |l: &Lab| {
        tests::prom::http_text(&l.seeds[0], &seed_metrics)
            .and_then(|t| tests::prom::metric(&t, "vpn_seed_tunnels_up"))
    };
    assert_eq!(
        tunnels(&lab),
        Some(1.0),
        "the newcomer's key is not allowed yet"
    );

    // A malformed file is reported and ignored; the allowed key keeps its tunnel.
    std::fs::write(peers.join("broken"), "not a key\n").unwrap();
    lab.wait_proc(
        "seed-server",
        Duration::from_secs(5),
        "the bad file reported",
        |l| {
            l.proc("seed-server")
                .is_some_and(|p| p.log().contains("file ignored"))
        },
    )
    .unwrap();
    assert_eq!(tunnels(&lab), Some(1.0));

    // Added: accepted within 5 s, no restart.
    std::fs::write(peers.join("newcomer"), format!("{}\n", newcomer.public)).unwrap();
    let added = lab
        .wait_proc(
            "seed-server",
            Duration::from_secs(5),
            "the added key's tunnel",
            |l| tunnels(l) == Some(2.0),
        )
        .unwrap();
    // Removed: its tunnel closes within 5 s; the other stays.
    std::fs::remove_file(peers.join("newcomer")).unwrap();
    let removed = lab
        .wait_proc(
            "seed-server",
            Duration::from_secs(5),
            "the removed key's tunnel to close",
            |l| tunnels(l) == Some(1.0),
        )
        .unwrap();
    eprintln!("added key live after {added:?}, removed key's tunnel gone after {removed:?}");
    let (reply, mut s) = connect_uds(&lab.uds(0), POD_TARGET, IO).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.head);
    let (code, body) = http_get(&mut s, POD_TARGET, "/index.html").unwrap();
    assert_eq!((code, body.as_slice()), (200, POD_INDEX.as_bytes()));
    let log = lab.proc("seed-server").unwrap().log();
    assert!(
        log.contains("peer_removed"),
        "no close reason in the log:\n{log}"
    );
}
