//! `packet_flow`: `PacketView::parse` with every accessor, then a seed-side and a client-side
//! `FlowTable` driven by a sequence of operations decoded from the input.
//!
//! Input: the whole input is first parsed as one raw packet. Then it is read as a table
//! configuration, an allowed source set (fixed networks chosen by bits plus a `parse_list`
//! text), and operations: `outbound` with a live tunnel set and `inbound` from a tunnel (seed
//! table), `from_tunnel` and `reply_tunnel` (client table), time advances, `expire`,
//! `remove_tunnel`, and synthesized replies / ICMP errors / fragments of earlier packets (so
//! the admitting paths are reached). Packets are built from small address and port pools or
//! taken raw.
//!
//! Checks, besides the accessor invariants of [`inspect`]: a table never holds more than
//! `max_flows`; `outbound` returns only live tunnels, keeps a known flow's live tunnel, and
//! creates no flow for an ICMP error; `inbound` never creates a flow, never admits a source
//! outside the allowed set, admits an ICMP error only about a flow pinned to the same tunnel
//! and only when addressed to the quoted packet's source, admits other packets only as replies
//! (not a bare SYN) to a flow pinned to the same tunnel or as later fragments of a first
//! fragment seen on that tunnel; the client table sends replies only into the tunnel their
//! flow came from; `expire` reports what it removed; after every timeout has passed, `expire`
//! empties both tables.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use common::cidr::{parse_list, CidrSet};
use common::flow::{pin_hash, DropReason, FlowConfig, FlowTable, TunnelId};
use common::packet::{
    PacketView, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN,
};
use ipnet::IpNet;

use super::Reader;

const V4: [[u8; 4]; 6] = [
    [10, 0, 0, 1],
    [10, 0, 0, 2],
    [100, 96, 1, 10],
    [100, 96, 1, 11],
    [192, 168, 123, 1],
    [100, 64, 0, 1],
];
const V6: [u128; 5] = [
    0xfd00_0000_0000_0000_0000_0000_0000_0001,
    0xfd00_0000_0000_0000_0000_0000_0000_0002,
    0xfd00_0096_0000_0000_0000_0000_0000_0010,
    0xfd00_0096_0000_0000_0000_0000_0000_0011,
    0x0000_0000_0000_0000_0000_ffff_6460_010a, // ::ffff:100.96.1.10
];
const NETS: [&str; 6] = [
    "100.96.0.0/11",
    "100.64.0.0/13",
    "192.168.123.0/24",
    "fd00:96::/32",
    "10.0.0.2/32",
    "::ffff:100.96.0.0/107",
];
const PORTS: [u16; 5] = [80, 443, 10250, 53, 40000];
const TUNNELS: u32 = 4;

/// Runs one input.
pub fn run(data: &[u8]) {
    if let Ok(p) = PacketView::parse(data) {
        inspect(&p, data);
    }
    Sim::new(&mut Reader::new(data)).run();
}

/// Calls every accessor and checks that they agree with each other.
pub fn inspect(p: &PacketView<'_>, input: &[u8]) {
    let bytes = p.as_bytes();
    assert!(bytes.len() <= input.len());
    assert_eq!(bytes, &input[..bytes.len()]);
    assert_eq!(p.version(), input[0] >> 4);
    assert_eq!(p.src().is_ipv4(), p.version() == 4);
    assert_eq!(p.dst().is_ipv4(), p.version() == 4);
    if p.version() == 4 {
        assert_eq!(
            bytes.len(),
            usize::from(u16::from_be_bytes([input[2], input[3]]))
        );
    }
    let t = p.transport();
    assert!(bytes.ends_with(t));
    assert!(bytes.len() - t.len() >= if p.version() == 4 { 20 } else { 40 });
    assert!(!p.is_fragment_non_first() || p.is_fragment());
    assert_eq!(p.fragment_id().is_some(), p.is_fragment());
    let proto = p.protocol();
    let ported = matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP);
    assert_eq!(p.src_port().is_some(), p.dst_port().is_some());
    if p.src_port().is_some() {
        assert!(ported && !p.is_fragment_non_first() && t.len() >= 4);
    }
    if p.tcp_flags().is_some() {
        assert_eq!(proto, PROTO_TCP);
    }
    let icmp = if p.version() == 4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    if p.icmp_type_code().is_some() {
        assert_eq!(proto, icmp);
    }
    if p.is_icmp_error() {
        assert!(p.icmp_type_code().is_some());
    }
    if let Some(k) = p.flow_key() {
        assert_eq!((k.proto, k.src, k.dst), (proto, p.src(), p.dst()));
        assert_eq!(k.reversed().reversed(), k);
        let bare = k.without_ports();
        assert_eq!((bare.src_port, bare.dst_port), (0, 0));
        if p.is_fragment_non_first() {
            assert_eq!(bare, k);
        }
        if ported && !p.is_fragment_non_first() {
            assert_eq!(Some(k.src_port), p.src_port());
            assert_eq!(Some(k.dst_port), p.dst_port());
        }
        let _ = k.to_string();
        let _ = pin_hash(&k);
    } else {
        assert!(!p.is_fragment_non_first());
    }
    if let Some(inner) = p.icmp_error_inner() {
        assert!(p.is_icmp_error());
        assert_eq!(inner.src.is_ipv4(), p.version() == 4);
        let _ = inner.to_string();
    }
}

fn addr(r: &mut Reader<'_>, v6: bool) -> IpAddr {
    let b = r.u8();
    match (v6, b) {
        (false, 0xf0..) => IpAddr::V4(Ipv4Addr::from(r.array::<4>())),
        (true, 0xf0..) => IpAddr::V6(Ipv6Addr::from(r.array::<16>())),
        (false, _) => IpAddr::V4(Ipv4Addr::from(V4[usize::from(b) % V4.len()])),
        (true, _) => IpAddr::V6(Ipv6Addr::from(V6[usize::from(b) % V6.len()])),
    }
}

fn port(r: &mut Reader<'_>) -> u16 {
    let b = r.u8();
    if b >= 0xf0 {
        r.u16()
    } else {
        PORTS[usize::from(b) % PORTS.len()]
    }
}

/// Builds an IP packet around `payload` (IPv6: `next` after optional extension headers).
fn ip(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    frag: (u8, u16),
    exts: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = vec![0x45, 0];
            let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&frag.1.to_be_bytes());
            let field: u16 = match frag.0 {
                1 => 0x2000,
                2 => 0x2000 | 0x00b9,
                3 => 0x00b9,
                _ => 0,
            };
            p.extend_from_slice(&field.to_be_bytes());
            p.extend_from_slice(&[64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            // Extension headers: hop-by-hop (0), destination options (60), fragment (44).
            let mut chain: Vec<u8> = exts
                .iter()
                .map(|e| [0u8, 60][usize::from(*e) % 2])
                .collect();
            if frag.0 != 0 {
                chain.push(44);
            }
            let mut body = Vec::new();
            for (i, h) in chain.iter().enumerate() {
                let next = chain.get(i + 1).copied().unwrap_or(proto);
                if *h == 44 {
                    let off: u16 = match frag.0 {
                        1 => 1,
                        2 => (0x00b9 << 3) | 1,
                        _ => 0x00b9 << 3,
                    };
                    body.extend_from_slice(&[next, 0]);
                    body.extend_from_slice(&off.to_be_bytes());
                    body.extend_from_slice(&u32::from(frag.1).to_be_bytes());
                } else {
                    body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            body.extend_from_slice(payload);
            let mut p = vec![0x60, 0, 0, 0];
            let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&[chain.first().copied().unwrap_or(proto), 64]);
            p.extend_from_slice(&v6(s));
            p.extend_from_slice(&v6(d));
            p.extend_from_slice(&body);
            p
        }
    }
}

/// A packet decoded from the input: raw bytes, or built from pools.
fn packet(r: &mut Reader<'_>, depth: u8) -> Vec<u8> {
    let kind = r.u8();
    if kind < 0x10 {
        return r.long(1500).to_vec();
    }
    let v6 = kind & 0x20 != 0;
    let (src, dst) = (addr(r, v6), addr(r, v6));
    let icmp = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    let sel = r.u8();
    let proto = match sel % 8 {
        0 | 1 => PROTO_TCP,
        2 | 3 => PROTO_UDP,
        4 | 5 => icmp,
        6 => PROTO_SCTP,
        _ => r.u8(),
    };
    let frag_sel = r.u8();
    let frag = (if frag_sel < 0xc0 { 0 } else { frag_sel % 4 }, r.u16() % 8);
    let exts = if v6 { r.short(3).to_vec() } else { Vec::new() };
    let payload = match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            let mut t = Vec::new();
            t.extend_from_slice(&port(r).to_be_bytes());
            t.extend_from_slice(&port(r).to_be_bytes());
            if proto == PROTO_TCP {
                t.extend_from_slice(&[0; 8]);
                t.push(0x50);
                t.push(r.u8());
                t.extend_from_slice(&[0; 6]);
            } else {
                t.extend_from_slice(&[0; 4]);
            }
            t.extend_from_slice(r.short(16));
            t
        }
        p if p == icmp => {
            let (req, rep, err) = if v6 { (128, 129, 1) } else { (8, 0, 3) };
            let ty = match r.u8() % 8 {
                0..=2 => req,
                3 | 4 => rep,
                5 | 6 => err + r.u8() % 3,
                _ => r.u8(),
            };
            let mut t = vec![ty, r.u8(), 0, 0];
            t.extend_from_slice(&r.u16().to_be_bytes());
            t.extend_from_slice(&[0, 1]);
            if depth == 0 && r.bool() {
                let mut inner = packet(r, 1);
                let cut = usize::from(r.u8());
                if cut >= 28 {
                    inner.truncate(cut);
                }
                t.extend_from_slice(&inner);
            } else {
                t.extend_from_slice(r.short(16));
            }
            t
        }
        _ => r.short(16).to_vec(),
    };
    let mut p = ip(src, dst, proto, frag, &exts, &payload);
    match r.u8() {
        0xf8..=0xfb => p.extend_from_slice(&[0xee; 3]), // padding after the packet
        0xfc | 0xfd => p.truncate(usize::from(r.u8())), // cut short
        0xfe | 0xff => {
            let at = usize::from(r.u16());
            let x = r.u8();
            let at = at % p.len().max(1);
            if let Some(b) = p.get_mut(at) {
                *b ^= x;
            }
        }
        _ => {}
    }
    p
}

/// The direction-reversed copy of a packet: addresses and ports swapped, echo request turned
/// into a reply, TCP answered with ACK (SYN-ACK to a SYN).
fn reply(p: &PacketView<'_>) -> Vec<u8> {
    let mut b = p.as_bytes().to_vec();
    let l4 = b.len() - p.transport().len();
    let (s, d, len) = if p.version() == 4 {
        (12, 16, 4)
    } else {
        (8, 24, 16)
    };
    let src: Vec<u8> = b[s..s + len].to_vec();
    b.copy_within(d..d + len, s);
    b[d..d + len].copy_from_slice(&src);
    if p.is_fragment_non_first() {
        return b;
    }
    match p.protocol() {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP if b.len() >= l4 + 4 => {
            let sp = [b[l4], b[l4 + 1]];
            b.copy_within(l4 + 2..l4 + 4, l4);
            b[l4 + 2..l4 + 4].copy_from_slice(&sp);
            if p.protocol() == PROTO_TCP {
                if let Some(f) = b.get_mut(l4 + 13) {
                    *f = if *f & TCP_SYN != 0 {
                        TCP_SYN | TCP_ACK
                    } else {
                        TCP_ACK
                    };
                }
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if let Some(t) = b.get_mut(l4) {
                *t = match *t {
                    8 => 0,
                    128 => 129,
                    other => other,
                };
            }
        }
        _ => {}
    }
    b
}

/// An ICMP error quoting `p` (first `quote` bytes), sent from `src` to `dst`.
fn icmp_error(p: &PacketView<'_>, src: IpAddr, dst: IpAddr, quote: usize) -> Vec<u8> {
    let v6 = p.version() == 6;
    let (proto, ty) = if v6 {
        (PROTO_ICMPV6, 1)
    } else {
        (PROTO_ICMP, 3)
    };
    let mut t = vec![ty, 1, 0, 0, 0, 0, 0, 0];
    let q = p.as_bytes();
    t.extend_from_slice(&q[..quote.clamp(28.min(q.len()), q.len())]);
    let (src, dst) = match (v6, src, dst) {
        (false, IpAddr::V4(_), IpAddr::V4(_)) | (true, IpAddr::V6(_), IpAddr::V6(_)) => (src, dst),
        _ => (p.dst(), p.src()),
    };
    ip(src, dst, proto, (0, 0), &[], &t)
}

/// First fragments pinned to a tunnel on the seed side: (src, dst, proto, id, tunnel).
type Firsts = HashSet<(IpAddr, IpAddr, u8, u32, TunnelId)>;

fn note_first(firsts: &mut Firsts, p: &PacketView<'_>, t: TunnelId) {
    if let (true, false, Some(id)) = (p.is_fragment(), p.is_fragment_non_first(), p.fragment_id()) {
        firsts.insert((p.src(), p.dst(), p.protocol(), id, t));
    }
}

struct Sim {
    ops: Vec<Op>,
    cfg: FlowConfig,
    allowed: CidrSet,
}

enum Op {
    Outbound(Vec<u8>, Vec<TunnelId>),
    Inbound(Vec<u8>, TunnelId),
    FromTunnel(Vec<u8>, TunnelId),
    ReplyTunnel(Vec<u8>),
    /// Answer (reply, ICMP error or fragment) to the `n`th last outbound / from-tunnel packet.
    Answer {
        seed: bool,
        back: usize,
        how: u8,
        src: Vec<u8>,
        from: TunnelId,
    },
    Advance(Duration),
    Expire,
    Remove(TunnelId),
}

fn tunnel(r: &mut Reader<'_>) -> TunnelId {
    TunnelId((u32::from(r.u8()) % TUNNELS) + 1)
}

fn secs(r: &mut Reader<'_>) -> Duration {
    Duration::from_millis(u64::from(r.u8() % 16 + 1) * 500)
}

impl Sim {
    fn new(r: &mut Reader<'_>) -> Self {
        let cfg = FlowConfig {
            max_flows: r.below(8) + 1,
            tcp_established_idle: secs(r),
            tcp_transitory_idle: secs(r),
            udp_idle: secs(r),
            other_idle: secs(r),
            max_fragments: r.below(4) + 1,
            fragment_idle: secs(r),
        };
        let bits = r.u8();
        let mut allowed = parse_list(&String::from_utf8_lossy(r.short(64))).unwrap_or_default();
        for (i, n) in NETS.iter().enumerate() {
            if bits & (1 << i) != 0 {
                if let Ok(net) = n.parse::<IpNet>() {
                    allowed.push(net);
                }
            }
        }
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < 64 {
            let op = match r.u8() % 16 {
                0..=2 => {
                    let mask = r.u8();
                    let live = (1..=TUNNELS)
                        .filter(|t| mask & (1 << t) != 0)
                        .map(TunnelId)
                        .collect();
                    Op::Outbound(packet(r, 0), live)
                }
                3 | 4 => Op::Inbound(packet(r, 0), tunnel(r)),
                5 | 6 => Op::FromTunnel(packet(r, 0), tunnel(r)),
                7 => Op::ReplyTunnel(packet(r, 0)),
                8..=11 => Op::Answer {
                    seed: r.bool(),
                    back: r.below(4),
                    how: r.u8(),
                    src: r.bytes(1).to_vec(),
                    from: tunnel(r),
                },
                12 | 13 => Op::Advance(Duration::from_millis(u64::from(r.u16()) * 4)),
                14 => Op::Expire,
                _ => Op::Remove(tunnel(r)),
            };
            ops.push(op);
        }
        Self { ops, cfg, allowed }
    }

    fn run(self) {
        let Sim { ops, cfg, allowed } = self;
        let mut seed = FlowTable::new(cfg.clone());
        let mut client = FlowTable::new(cfg.clone());
        assert!(seed.is_empty() && seed.config() == &cfg);
        let base = Instant::now();
        let mut now = base;
        let mut firsts = Firsts::new();
        // Packets sent into a tunnel (seed) / received from one (client), newest last.
        let mut sent: Vec<(Vec<u8>, TunnelId)> = Vec::new();
        let mut received: Vec<(Vec<u8>, TunnelId)> = Vec::new();
        let mut client_tunnels: HashSet<TunnelId> = HashSet::new();

        for op in ops {
            match op {
                Op::Outbound(b, live) => {
                    let Ok(p) = PacketView::parse(&b) else {
                        continue;
                    };
                    inspect(&p, &b);
                    let before = seed.len();
                    let known = p.flow_key().and_then(|k| seed.tunnel_of(&k));
                    let res = seed.outbound(&p, &live, now);
                    match res {
                        Ok(t) => {
                            assert!(live.contains(&t), "pinned to dead tunnel {t}");
                            if !p.is_icmp_error() && !p.is_fragment_non_first() {
                                let k = p.flow_key();
                                assert!(k.is_some());
                                if let Some(k) = k {
                                    assert_eq!(seed.tunnel_of(&k), Some(t));
                                }
                                if let Some(old) = known.filter(|o| live.contains(o)) {
                                    assert_eq!(old, t, "known flow moved off its live tunnel");
                                }
                            }
                            note_first(&mut firsts, &p, t);
                            sent.push((b.clone(), t));
                        }
                        Err(DropReason::NoTunnel) => assert!(live.is_empty()),
                        Err(DropReason::TableFull) => assert_eq!(seed.len(), cfg.max_flows),
                        Err(DropReason::Malformed) => assert!(p.flow_key().is_none()),
                        Err(e) => panic!("outbound dropped with {e}"),
                    }
                    if live.is_empty() {
                        assert_eq!(res, Err(DropReason::NoTunnel));
                    }
                    if p.is_icmp_error() {
                        assert_eq!(seed.len(), before, "ICMP error created a flow");
                    }
                }
                Op::Inbound(b, from) => inbound(&mut seed, &allowed, &mut firsts, &b, from, now),
                Op::FromTunnel(b, t) => {
                    if from_tunnel(&mut client, &b, t, now) {
                        client_tunnels.insert(t);
                        received.push((b, t));
                    }
                }
                Op::ReplyTunnel(b) => reply_tunnel(&mut client, &client_tunnels, &b, now),
                Op::Answer {
                    seed: on_seed,
                    back,
                    how,
                    src,
                    from,
                } => {
                    let hist = if on_seed { &sent } else { &received };
                    let Some((orig, pinned)) = hist.iter().rev().nth(back) else {
                        continue;
                    };
                    let Ok(p) = PacketView::parse(orig) else {
                        continue;
                    };
                    let answer = match how % 4 {
                        // ICMP error about the packet, to its source or elsewhere.
                        0 => {
                            let mut rd = Reader::new(&src);
                            let v6 = p.version() == 6;
                            let from_addr = addr(&mut rd, v6);
                            let to = if how & 0x10 != 0 { from_addr } else { p.src() };
                            icmp_error(&p, p.dst(), to, usize::from(how))
                        }
                        _ => reply(&p),
                    };
                    let via = if how & 0x80 != 0 { from } else { *pinned };
                    if on_seed {
                        inbound(&mut seed, &allowed, &mut firsts, &answer, via, now);
                    } else {
                        reply_tunnel(&mut client, &client_tunnels, &answer, now);
                    }
                }
                Op::Advance(d) => now += d,
                Op::Expire => {
                    for t in [&mut seed, &mut client] {
                        let before = t.len();
                        let gone = t.expire(now);
                        assert_eq!(before - gone, t.len());
                    }
                }
                Op::Remove(t) => {
                    seed.remove_tunnel(t);
                    client.remove_tunnel(t);
                    for (b, _) in sent.iter().filter(|(_, pt)| *pt == t) {
                        if let Some(k) = PacketView::parse(b).ok().and_then(|p| p.flow_key()) {
                            assert_ne!(seed.tunnel_of(&k), Some(t));
                        }
                    }
                }
            }
            assert!(seed.len() <= cfg.max_flows, "seed table over max_flows");
            assert!(client.len() <= cfg.max_flows, "client table over max_flows");
        }
        let longest = [
            cfg.tcp_established_idle,
            cfg.tcp_transitory_idle,
            cfg.udp_idle,
            cfg.other_idle,
        ]
        .into_iter()
        .max()
        .unwrap_or_default();
        let end = now + longest + Duration::from_secs(1);
        seed.expire(end);
        client.expire(end);
        assert!(seed.is_empty(), "flows left after every timeout");
        assert!(client.is_empty(), "flows left after every timeout");
        for r in DropReason::ALL {
            assert_eq!(r.to_string(), r.reason());
        }
    }
}

/// Checks one `inbound` call.
fn inbound(
    seed: &mut FlowTable,
    allowed: &CidrSet,
    firsts: &mut Firsts,
    b: &[u8],
    from: TunnelId,
    now: Instant,
) {
    let Ok(p) = PacketView::parse(b) else {
        return;
    };
    inspect(&p, b);
    let before = seed.len();
    let pinned_reply = p.flow_key().and_then(|k| seed.tunnel_of(&k.reversed()));
    let inner = p.icmp_error_inner();
    let inner_tunnel = inner.and_then(|k| seed.tunnel_of(&k));
    let res = seed.inbound(&p, from, allowed, now);
    assert_eq!(seed.len(), before, "inbound created or removed a flow");
    let Ok(()) = res else {
        if let Err(DropReason::SourceNotAllowed) = res {
            assert!(!allowed.contains(p.src()));
        }
        return;
    };
    assert!(
        allowed.contains(p.src()),
        "admitted source {} outside the set",
        p.src()
    );
    if p.is_icmp_error() {
        let Some(inner) = inner else {
            panic!("admitted an ICMP error without a quoted packet");
        };
        assert_eq!(
            inner_tunnel,
            Some(from),
            "ICMP error about another tunnel's flow"
        );
        assert_eq!(
            p.dst(),
            inner.src,
            "ICMP error not addressed to the flow's seed side"
        );
        return;
    }
    if p.is_fragment_non_first() {
        let via_first = p
            .fragment_id()
            .is_some_and(|id| firsts.contains(&(p.src(), p.dst(), p.protocol(), id, from)));
        assert!(
            via_first || pinned_reply == Some(from),
            "later fragment admitted without its first fragment"
        );
        return;
    }
    let bare_syn = p
        .tcp_flags()
        .is_some_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN);
    assert!(!bare_syn, "admitted a bare SYN from the shoot");
    assert_eq!(
        pinned_reply,
        Some(from),
        "admitted a packet that is no reply"
    );
    note_first(firsts, &p, from);
}

/// Checks one `from_tunnel` call; returns whether it recorded the flow.
fn from_tunnel(client: &mut FlowTable, b: &[u8], t: TunnelId, now: Instant) -> bool {
    let Ok(p) = PacketView::parse(b) else {
        return false;
    };
    inspect(&p, b);
    let before = client.len();
    let res = client.from_tunnel(&p, t, now);
    if p.is_icmp_error() || p.is_fragment_non_first() {
        assert_eq!(res, Ok(()));
        assert_eq!(client.len(), before);
        return false;
    }
    match res {
        Ok(()) => {
            let k = p.flow_key();
            assert!(k.is_some());
            assert_eq!(k.and_then(|k| client.tunnel_of(&k)), Some(t));
            true
        }
        Err(DropReason::TableFull) => {
            assert_eq!(client.len(), client.config().max_flows);
            false
        }
        Err(DropReason::Malformed) => {
            assert!(p.flow_key().is_none());
            false
        }
        Err(e) => panic!("from_tunnel dropped with {e}"),
    }
}

fn reply_tunnel(client: &mut FlowTable, tunnels: &HashSet<TunnelId>, b: &[u8], now: Instant) {
    let Ok(p) = PacketView::parse(b) else {
        return;
    };
    inspect(&p, b);
    let before = client.len();
    let key = p.flow_key();
    let pinned = key.and_then(|k| client.tunnel_of(&k.reversed()));
    let inner = p.icmp_error_inner().and_then(|k| client.tunnel_of(&k));
    let res = client.reply_tunnel(&p, now);
    assert_eq!(
        client.len(),
        before,
        "reply_tunnel created or removed a flow"
    );
    let Some(t) = res else {
        return;
    };
    assert!(
        tunnels.contains(&t),
        "reply into tunnel {t} nothing came from"
    );
    if p.is_icmp_error() {
        assert_eq!(inner, Some(t));
    } else if !p.is_fragment_non_first() {
        assert_eq!(pinned, Some(t), "reply into another tunnel than its flow's");
        assert!(p
            .tcp_flags()
            .is_none_or(|f| f & (TCP_SYN | TCP_ACK) != TCP_SYN));
    }
}
