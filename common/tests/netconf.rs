//! OS adapters against a real kernel: TUN, routes and rules, sysctls, nftables, sockets.
//!
//! Needs root. Each test creates its own network namespace `nc-<pid>-<n>` (deleted by an RAII
//! guard, also on panic) and runs its body on a thread that has entered it, under a
//! current-thread tokio runtime. Without root the tests fail with a message, unless
//! `VPN_E2E=skip`.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests set up files and clocks

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::io::netlink::{NetError, Netlink};
use common::io::nft::{self, ShootNat};
use common::io::sock::{self, ConnectError, TcpTuning};
use common::io::sysctl;
use common::io::tun::{self, TunConfig};
use ipnet::IpNet;

const V4_NET: &str = "192.168.123.0/24";
const V6_NET: &str = "fd8f:6d53:b97a:1::/96";

static NEXT_NS: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let n = NEXT_NS.fetch_add(1, Ordering::SeqCst);
        let name = format!("nc-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`; panics on failure, returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Reads a sysctl through a process started in the namespace.
    fn sysctl(&self, path: &str) -> String {
        run("ip", &["netns", "exec", &self.name, "cat", path])
            .trim()
            .to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when running as root; false (after a note) when `VPN_E2E=skip`; panics otherwise.
fn have_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if euid == "0" {
        return true;
    }
    if std::env::var("VPN_E2E").as_deref() == Ok("skip") {
        eprintln!("skipped: needs root (VPN_E2E=skip)");
        return false;
    }
    panic!("these tests need root (network namespaces, TUN, nftables); set VPN_E2E=skip to skip");
}

/// Runs `body(&netns)` on a thread inside a fresh namespace; the namespace is deleted after,
/// also when the body panics.
fn in_netns<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !have_root() {
        return;
    }
    let ns = Netns::new();
    let name = ns.name.clone();
    let result = std::thread::spawn(move || {
        enter_netns(&name);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), body(name))
                .await
                .expect("test body timed out");
        });
    })
    .join();
    drop(ns);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Moves the calling thread (only) into the named namespace.
#[allow(unsafe_code)]
fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: `f` is an open namespace file for the duration of the call; setns changes only
    // this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// The `Netns` handle for checks from inside a body (no delete on drop).
fn view(name: &str) -> std::mem::ManuallyDrop<Netns> {
    std::mem::ManuallyDrop::new(Netns {
        name: name.to_owned(),
    })
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn tun_cfg(name: &str, v4: &str, v6: &str, offload: bool) -> TunConfig {
    TunConfig {
        name: name.to_owned(),
        mtu: 1380,
        addrs: vec![net(v4), net(v6)],
        offload,
    }
}

/// A TUN without addresses (no dummy driver on every kernel).
fn bare_tun(name: &str) -> TunConfig {
    TunConfig {
        name: name.to_owned(),
        mtu: 1500,
        addrs: vec![],
        offload: false,
    }
}

/// Reads from the TUN until an IPv4 TCP packet to `dst` shows up; returns its source.
async fn read_tcp_to(dev: &tun_rs::AsyncDevice, dst: Ipv4Addr, offload: bool) -> Ipv4Addr {
    let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    loop {
        let n = if offload {
            dev.recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
                .await
                .unwrap()
        } else {
            sizes[0] = dev.recv(&mut bufs[0]).await.unwrap();
            1
        };
        for (buf, &len) in bufs.iter().zip(&sizes).take(n) {
            let p = &buf[..len];
            if len >= 20 && p[0] >> 4 == 4 && p[9] == 6 && p[16..20] == dst.octets() {
                return Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            }
        }
    }
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn tun_has_addresses_mtu_and_carries_packets() {
    in_netns(|ns| async move {
        let ns = view(&ns);
        for (name, offload) in [("vpnt0", false), ("vpnt1", true)] {
            let v4 = if offload {
                "192.168.124.1/24"
            } else {
                "192.168.123.1/24"
            };
            let v6 = if offload {
                "fd8f:6d53:b97a:2::1/96"
            } else {
                "fd8f:6d53:b97a:1::1/96"
            };
            let dev = tun::create(&tun_cfg(name, v4, v6, offload)).unwrap();
            let active = tun::offload_active(&dev);
            assert!(offload || !active);
            eprintln!("{name}: offload requested {offload}, active {active}");

            let addrs = ns.ip(&["-o", "addr", "show", "dev", name]);
            assert!(addrs.contains(&format!("inet {v4}")), "{addrs}");
            assert!(addrs.contains(&format!("inet6 {v6}")), "{addrs}");
            assert!(!addrs.contains("tentative"), "{addrs}");
            let link = ns.ip(&["-o", "link", "show", "dev", name]);
            assert!(link.contains("mtu 1380") && link.contains(",UP"), "{link}");
            let index = tun::if_index(name).unwrap();
            assert!(link.starts_with(&format!("{index}: {name}")), "{link}");

            // A datagram to a peer in the TUN's network comes out of the device.
            let peer = if offload {
                Ipv4Addr::new(192, 168, 124, 7)
            } else {
                Ipv4Addr::new(192, 168, 123, 7)
            };
            let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
            let mut bufs = vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE];
            let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
            udp.send_to(b"ping", (peer, 9999)).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    let n = dev
                        .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
                        .await
                        .unwrap();
                    for (buf, &len) in bufs.iter().zip(&sizes).take(n) {
                        let p = &buf[..len];
                        if len >= 32 && p[0] >> 4 == 4 && p[9] == 17 && p[16..20] == peer.octets() {
                            return p[28..32].to_vec();
                        }
                    }
                }
            })
            .await
            .expect("no packet from the TUN");
            assert_eq!(got, b"ping");
            drop(dev);
        }
        // Re-creating after the device vanished works and replaces the IPv4 address.
        let dev = tun::create(&tun_cfg(
            "vpnt0",
            "192.168.123.9/24",
            "fd8f:6d53:b97a:1::9/96",
            false,
        ))
        .unwrap();
        let addrs = ns.ip(&["-o", "addr", "show", "dev", "vpnt0"]);
        assert!(addrs.contains("inet 192.168.123.9/24"), "{addrs}");
        drop(dev);

        assert!(matches!(
            tun::create(&TunConfig {
                name: "bad/name".into(),
                mtu: 1400,
                addrs: vec![],
                offload: false
            }),
            Err(tun::TunError::InvalidName { .. })
        ));
        assert!(matches!(
            tun::create(&TunConfig {
                name: "vpnt2".into(),
                mtu: 1400,
                addrs: vec![net("10.0.0.1/24"), net("10.0.1.1/24")],
                offload: false
            }),
            Err(tun::TunError::TooManyIpv4 { .. })
        ));
    });
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn seed_routing_steers_bound_sockets_through_the_tun() {
    in_netns(|ns| async move {
        let ns = view(&ns);
        let dev = tun::create(&tun_cfg(
            "seedt0",
            "192.168.123.1/24",
            "fd8f:6d53:b97a:1::1/96",
            false,
        ))
        .unwrap();
        // The seed's own networks overlap the shoot's.
        let _ovl = tun::create(&tun_cfg("ovl0", "10.50.0.1/16", "fd00:50::1/64", false)).unwrap();

        let nl = Netlink::new().await.unwrap();
        for _ in 0..2 {
            nl.install_seed_routing("seedt0", 100, 100, true, true)
                .await
                .unwrap();
        }
        sysctl::seed_tun("seedt0").unwrap();

        let rules4 = ns.ip(&["-4", "rule", "show"]);
        let rules6 = ns.ip(&["-6", "rule", "show"]);
        for rules in [&rules4, &rules6] {
            assert_eq!(rules.matches("oif seedt0 lookup 100").count(), 1, "{rules}");
            assert!(rules.contains("100:"), "{rules}");
        }
        let t4 = ns.ip(&["-4", "route", "show", "table", "100"]);
        let t6 = ns.ip(&["-6", "route", "show", "table", "100"]);
        assert!(t4.contains("default dev seedt0"), "{t4}");
        assert!(t6.contains("default dev seedt0"), "{t6}");

        let get4 = ns.ip(&["-o", "route", "get", "10.50.0.7", "oif", "seedt0"]);
        assert!(
            get4.contains("dev seedt0 table 100 src 192.168.123.1"),
            "{get4}"
        );
        let get6 = ns.ip(&["-o", "route", "get", "fd00:50::7", "oif", "seedt0"]);
        assert!(
            get6.contains("dev seedt0") && get6.contains("table 100"),
            "{get6}"
        );
        assert!(get6.contains("src fd8f:6d53:b97a:1::1"), "{get6}");
        // The main table is untouched.
        let main = ns.ip(&["-o", "route", "get", "10.50.0.7"]);
        assert!(main.contains("dev ovl0"), "{main}");

        // A socket bound to the TUN sends its SYN through it, from the TUN's address.
        let target = SocketAddr::from(([10, 50, 0, 7], 80));
        let connect = tokio::spawn(async move {
            let tuning = TcpTuning::default();
            sock::connect_bound(target, Some("seedt0"), Duration::from_millis(500), &tuning).await
        });
        let src = tokio::time::timeout(
            Duration::from_secs(2),
            read_tcp_to(&dev, Ipv4Addr::new(10, 50, 0, 7), false),
        )
        .await
        .expect("no SYN on the TUN");
        assert_eq!(src, Ipv4Addr::new(192, 168, 123, 1));
        let r = connect.await.unwrap();
        assert!(matches!(r, Err(ConnectError::Timeout)), "{r:?}");

        for _ in 0..2 {
            nl.remove_seed_routing("seedt0", 100, 100, true, true)
                .await
                .unwrap();
        }
        assert!(!ns.ip(&["-4", "rule", "show"]).contains("seedt0"));
        assert!(!ns.ip(&["-6", "rule", "show"]).contains("seedt0"));
        assert_eq!(ns.ip(&["-4", "route", "show", "table", "100"]).trim(), "");
        assert_eq!(ns.ip(&["-6", "route", "show", "table", "100"]).trim(), "");

        // Removal after the device is gone still clears the rules.
        nl.install_seed_routing("seedt0", 100, 100, true, false)
            .await
            .unwrap();
        drop(dev);
        nl.remove_seed_routing("seedt0", 100, 100, true, false)
            .await
            .unwrap();
        assert!(!ns.ip(&["-4", "rule", "show"]).contains("seedt0"));
        assert!(matches!(
            nl.install_seed_routing("seedt0", 100, 100, true, false)
                .await,
            Err(NetError::LinkNotFound { .. })
        ));
    });
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn vpn_routes_are_idempotent_and_deletable() {
    in_netns(|ns| async move {
        let ns = view(&ns);
        let _dev = tun::create(&tun_cfg(
            "shoott0",
            "192.168.123.2/24",
            "fd8f:6d53:b97a:1::2/96",
            false,
        ))
        .unwrap();
        let nl = Netlink::new().await.unwrap();
        let oif = nl.link_index("shoott0").await.unwrap();
        assert_eq!(oif, tun::if_index("shoott0").unwrap());
        assert!(matches!(
            nl.link_index("nope0").await,
            Err(NetError::LinkNotFound { .. })
        ));

        let nets = [
            net(V4_NET),
            net(V6_NET),
            net("10.99.0.0/16"),
            net("fd99::/64"),
        ];
        for _ in 0..2 {
            nl.install_vpn_routes("shoott0", &nets).await.unwrap();
        }
        let r4 = ns.ip(&["-4", "route", "show", "dev", "shoott0"]);
        let r6 = ns.ip(&["-6", "route", "show", "dev", "shoott0"]);
        assert_eq!(r4.matches("192.168.123.0/24").count(), 1, "{r4}");
        assert!(
            r4.contains("proto kernel"),
            "connected route replaced: {r4}"
        );
        assert_eq!(r4.matches("10.99.0.0/16").count(), 1, "{r4}");
        assert_eq!(r6.matches("fd8f:6d53:b97a:1::/96").count(), 1, "{r6}");
        assert_eq!(r6.matches("fd99::/64").count(), 1, "{r6}");

        // A route for the prefix via another device is replaced.
        let _oth = tun::create(&bare_tun("oth0")).unwrap();
        ns.ip(&["route", "replace", "10.98.0.0/16", "dev", "oth0"]);
        nl.install_vpn_routes("shoott0", &[net("10.98.0.0/16")])
            .await
            .unwrap();
        let r = ns.ip(&["-o", "route", "get", "10.98.0.1"]);
        assert!(r.contains("dev shoott0"), "{r}");

        for _ in 0..2 {
            nl.delete_route(net("10.99.0.0/16"), oif, None)
                .await
                .unwrap();
            nl.delete_route(net("fd99::/64"), oif, None).await.unwrap();
        }
        let r4 = ns.ip(&["-4", "route", "show", "dev", "shoott0"]);
        let r6 = ns.ip(&["-6", "route", "show", "dev", "shoott0"]);
        assert!(!r4.contains("10.99.0.0/16"), "{r4}");
        assert!(!r6.contains("fd99::/64"), "{r6}");
        assert!(nl.has_route(net(V4_NET), oif, None).await.unwrap());

        // Tables beyond 255 go through the table attribute.
        nl.replace_route(net("10.97.0.0/16"), oif, Some(1000))
            .await
            .unwrap();
        assert!(nl
            .has_route(net("10.97.0.0/16"), oif, Some(1000))
            .await
            .unwrap());
        let t = ns.ip(&["route", "show", "table", "1000"]);
        assert!(t.contains("10.97.0.0/16 dev shoott0"), "{t}");
        nl.delete_route(net("10.97.0.0/16"), oif, Some(1000))
            .await
            .unwrap();
        assert_eq!(ns.ip(&["route", "show", "table", "1000"]).trim(), "");
    });
}

/// The rules of a chain of table `inet <table>`, as JSON statement lists.
fn chain_rules(table: &str, chain: &str) -> Vec<String> {
    let set = nftables::helper::get_current_ruleset_with_args(
        None::<&str>,
        ["list", "table", "inet", table],
    )
    .unwrap();
    set.objects
        .iter()
        .filter_map(|o| match o {
            nftables::schema::NfObject::ListObject(nftables::schema::NfListObject::Rule(r))
                if r.chain == chain =>
            {
                Some(format!("{:?}", r.expr))
            }
            _ => None,
        })
        .collect()
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn shoot_nat_is_idempotent_and_removable() {
    in_netns(|ns| async move {
        let ns = view(&ns);
        let nets = [net(V4_NET), net(V6_NET)];
        // A crashed run leaves its table behind; the next install replaces it.
        std::mem::forget(ShootNat::install("shoott0", &nets, true, true).unwrap());
        let nat = ShootNat::install("shoott0", &nets, true, true).unwrap();
        assert_eq!(nat.table(), nft::DEFAULT_TABLE);

        let post = chain_rules(nft::DEFAULT_TABLE, "postrouting");
        let fwd = chain_rules(nft::DEFAULT_TABLE, "forward");
        assert_eq!(post.len(), 2, "{post:#?}");
        assert_eq!(fwd.len(), 4, "{fwd:#?}");
        let text = run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "nft",
                "list",
                "table",
                "inet",
                nft::DEFAULT_TABLE,
            ],
        );
        for want in [
            "type nat hook postrouting priority srcnat; policy accept;",
            "ip saddr 192.168.123.0/24 oifname != \"shoott0\" masquerade",
            "ip6 saddr fd8f:6d53:b97a:1::/96 oifname != \"shoott0\" masquerade",
            "type filter hook forward priority filter; policy accept;",
            "iifname \"shoott0\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu",
            "oifname \"shoott0\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu",
            "iifname \"shoott0\" counter packets 0 bytes 0 accept",
            "oifname \"shoott0\" counter packets 0 bytes 0 accept",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Clamping comes before the accepts.
        assert!(
            fwd[0].contains("Mangle") && fwd[1].contains("Mangle"),
            "{fwd:#?}"
        );

        nat.remove().unwrap();
        nat.remove().unwrap();
        let tables = run("ip", &["netns", "exec", &ns.name, "nft", "list", "tables"]);
        assert!(!tables.contains(nft::DEFAULT_TABLE), "{tables}");
        drop(nat);

        // Without masquerade and clamping only the forward accepts remain; drop removes.
        let nat = ShootNat::install_named("vpn_test", "shoott0", &nets, false, false).unwrap();
        assert_eq!(chain_rules("vpn_test", "forward").len(), 2);
        assert!(chain_rules("vpn_test", "postrouting").is_empty());
        drop(nat);
        let tables = run("ip", &["netns", "exec", &ns.name, "nft", "list", "tables"]);
        assert!(!tables.contains("vpn_test"), "{tables}");
        nft::remove_table("vpn_test").unwrap();
    });
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn sysctls_apply_to_the_namespace_only() {
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    in_netns(move |ns| async move {
        let ns = view(&ns);
        let _dev = tun::create(&tun_cfg(
            "shoott0",
            "192.168.123.2/24",
            "fd8f:6d53:b97a:1::2/96",
            false,
        ))
        .unwrap();
        sysctl::shoot_forwarding("shoott0", true).unwrap();
        assert_eq!(ns.sysctl("/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(ns.sysctl("/proc/sys/net/ipv6/conf/all/forwarding"), "1");
        for dev in ["all", "default", "shoott0"] {
            let path = format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter");
            assert_eq!(ns.sysctl(&path), "2", "{path}");
        }
        assert_eq!(sysctl::get("net.ipv4.ip_forward").unwrap(), "1");

        // Seed: strict `all` is loosened, the TUN has no filter, no router advertisements.
        sysctl::set("net.ipv4.conf.all.rp_filter", "1").unwrap();
        sysctl::seed_tun("shoott0").unwrap();
        assert_eq!(ns.sysctl("/proc/sys/net/ipv4/conf/all/rp_filter"), "2");
        assert_eq!(ns.sysctl("/proc/sys/net/ipv4/conf/shoott0/rp_filter"), "0");
        assert_eq!(ns.sysctl("/proc/sys/net/ipv6/conf/shoott0/accept_ra"), "0");
        sysctl::set("net.ipv4.conf.all.rp_filter", "0").unwrap();
        sysctl::seed_tun("shoott0").unwrap();
        assert_eq!(ns.sysctl("/proc/sys/net/ipv4/conf/all/rp_filter"), "0");

        // Interface names with dots: path segments or the slash form.
        let _dotted = tun::create(&bare_tun("d.1")).unwrap();
        sysctl::set_path(&["net", "ipv4", "conf", "d.1", "rp_filter"], "2").unwrap();
        assert_eq!(sysctl::get("net/ipv4/conf/d.1/rp_filter").unwrap(), "2");
        let err = sysctl::set("net.ipv4.conf.nope0.rp_filter", "2").unwrap_err();
        assert!(
            err.to_string().contains("net.ipv4.conf.nope0.rp_filter"),
            "{err}"
        );
    });
    let after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    assert_eq!(host_forward, after, "host sysctl changed");
}

#[test]
#[ignore = "netns: needs root; run by scripts/test.sh, or cargo test -- --ignored"]
fn connect_bound_reports_refused_timeout_and_unreachable() {
    in_netns(|ns| async move {
        let ns = view(&ns);
        let tuning = TcpTuning::default();
        let short = Duration::from_millis(300);

        let closed = SocketAddr::from(([127, 0, 0, 1], 1));
        let r = sock::connect_bound(closed, Some("lo"), short, &tuning).await;
        assert!(matches!(r, Err(ConnectError::Refused)), "{r:?}");

        // A TUN nobody reads swallows the SYN: a real timeout.
        let _bh = tun::create(&bare_tun("bh0")).unwrap();
        ns.ip(&["route", "add", "10.77.0.0/16", "dev", "bh0"]);
        let start = Instant::now();
        let r =
            sock::connect_bound(SocketAddr::from(([10, 77, 0, 1], 80)), None, short, &tuning).await;
        assert!(matches!(r, Err(ConnectError::Timeout)), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(2));

        // No route at all.
        let r =
            sock::connect_bound(SocketAddr::from(([10, 78, 0, 1], 80)), None, short, &tuning).await;
        assert!(matches!(r, Err(ConnectError::Unreachable(_))), "{r:?}");

        // Binding to a missing device fails before connecting.
        let r = sock::connect_bound(closed, Some("nope0"), short, &tuning).await;
        assert!(matches!(r, Err(ConnectError::Other(_))), "{r:?}");

        // A listener in the namespace accepts a tuned connection over IPv6 loopback.
        let l = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(addr.ip(), IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        let s = sock::connect_bound(addr, Some("lo"), short, &tuning)
            .await
            .unwrap();
        assert!(s.nodelay().unwrap());
    });
}
