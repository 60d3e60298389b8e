//! Zero-copy view of an IPv4 or IPv6 packet as read from a TUN device or a tunnel.
//!
//! [`PacketView::parse`] validates the IP header(s), walks IPv6 extension headers (bounded) to
//! find the upper-layer protocol and records fragmentation, so the flow table can classify
//! packets with [`PacketView::flow_key`] and [`PacketView::icmp_error_inner`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IP protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// Most IPv6 extension headers walked before giving up.
pub const MAX_EXT_HEADERS: usize = 8;

/// Why a buffer is not a usable IP packet.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Empty buffer.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("unknown IP version {0}")]
    UnknownVersion(u8),
    /// Shorter than the fixed IP header.
    #[error("truncated IP header")]
    Truncated,
    /// IPv4 IHL below 5 or beyond the packet.
    #[error("bad IPv4 header length {0}")]
    BadHeaderLength(usize),
    /// IPv4 total length or IPv6 payload length disagrees with the buffer.
    #[error("bad IP length: header says {header}, buffer has {buffer}")]
    BadLength {
        /// Length claimed by the header.
        header: usize,
        /// Bytes available.
        buffer: usize,
    },
    /// An IPv6 extension header runs past the packet.
    #[error("truncated IPv6 extension header")]
    TruncatedExtension,
    /// More than [`MAX_EXT_HEADERS`] IPv6 extension headers.
    #[error("too many IPv6 extension headers")]
    TooManyExtensions,
}

/// Identity of a flow: protocol, addresses and ports, in the direction of one packet.
///
/// Ports are zero where the protocol has none and for non-first fragments. ICMP echo uses the
/// identifier as a port on the requester's side: a request is `(src_port = id, dst_port = 0)`,
/// a reply `(0, id)`, so a reply's key reversed equals its request's key while a request in the
/// opposite direction never matches.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FlowKey {
    /// Upper-layer protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (or ICMP echo id on requests).
    pub src_port: u16,
    /// Destination port (or ICMP echo id on replies).
    pub dst_port: u16,
}

impl FlowKey {
    /// The key of the opposite direction.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }

    /// The same flow with ports zeroed (used for packets without port information).
    pub fn without_ports(&self) -> FlowKey {
        FlowKey {
            src_port: 0,
            dst_port: 0,
            ..*self
        }
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.proto {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            PROTO_ICMP => "icmp",
            PROTO_ICMPV6 => "icmpv6",
            PROTO_SCTP => "sctp",
            _ => "",
        };
        if name.is_empty() {
            write!(f, "proto {} ", self.proto)?;
        } else {
            write!(f, "{name} ")?;
        }
        let sa = std::net::SocketAddr::new(self.src, self.src_port);
        let da = std::net::SocketAddr::new(self.dst, self.dst_port);
        write!(f, "{sa} -> {da}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frag {
    /// Not fragmented.
    Whole,
    /// First fragment (offset 0, more fragments follow).
    First(u32),
    /// Fragment with nonzero offset.
    Later(u32),
}

/// A validated view of one IP packet.
#[derive(Debug, Clone, Copy)]
pub struct PacketView<'a> {
    buf: &'a [u8],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: usize,
    frag: Frag,
}

/// Parses `buf` as an IP packet; see [`PacketView::parse`].
pub fn parse(buf: &[u8]) -> Result<PacketView<'_>, PacketError> {
    PacketView::parse(buf)
}

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

impl<'a> PacketView<'a> {
    /// Parses and validates an IPv4 or IPv6 packet.
    ///
    /// The buffer may be longer than the packet (padding is ignored) but not shorter.
    pub fn parse(buf: &'a [u8]) -> Result<PacketView<'a>, PacketError> {
        Self::parse_with(buf, true)
    }

    /// `strict = false` accepts a packet cut short (the copy inside an ICMP error).
    fn parse_with(buf: &'a [u8], strict: bool) -> Result<PacketView<'a>, PacketError> {
        let first = *buf.first().ok_or(PacketError::Empty)?;
        match first >> 4 {
            4 => Self::parse_v4(buf, strict),
            6 => Self::parse_v6(buf, strict),
            v => Err(PacketError::UnknownVersion(v)),
        }
    }

    fn parse_v4(buf: &'a [u8], strict: bool) -> Result<PacketView<'a>, PacketError> {
        let h: &[u8; 20] = buf
            .get(..20)
            .and_then(|s| s.try_into().ok())
            .ok_or(PacketError::Truncated)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if ihl < 20 || ihl > buf.len() {
            return Err(PacketError::BadHeaderLength(ihl));
        }
        let total = usize::from(be16(h, 2));
        let bad = PacketError::BadLength {
            header: total,
            buffer: buf.len(),
        };
        if total < ihl || (strict && total > buf.len()) {
            return Err(bad);
        }
        let frag_field = be16(h, 6);
        let id = u32::from(be16(h, 4));
        let frag = match (frag_field & 0x1fff, frag_field & 0x2000 != 0) {
            (0, false) => Frag::Whole,
            (0, true) => Frag::First(id),
            _ => Frag::Later(id),
        };
        Ok(PacketView {
            buf: &buf[..total.min(buf.len())],
            src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
            dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
            proto: h[9],
            l4: ihl,
            frag,
        })
    }

    fn parse_v6(buf: &'a [u8], strict: bool) -> Result<PacketView<'a>, PacketError> {
        let h: &[u8; 40] = buf
            .get(..40)
            .and_then(|s| s.try_into().ok())
            .ok_or(PacketError::Truncated)?;
        let total = 40 + usize::from(be16(h, 4));
        if strict && total > buf.len() {
            return Err(PacketError::BadLength {
                header: total,
                buffer: buf.len(),
            });
        }
        let buf = &buf[..total.min(buf.len())];
        let mut src = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&h[24..40]);
        let mut next = h[6];
        let mut off = 40;
        let mut frag = Frag::Whole;
        let mut walked = 0;
        loop {
            let len = match next {
                0 | 43 | 60 => {
                    (usize::from(*buf.get(off + 1).ok_or(PacketError::TruncatedExtension)?) + 1) * 8
                }
                51 => {
                    (usize::from(*buf.get(off + 1).ok_or(PacketError::TruncatedExtension)?) + 2) * 4
                }
                44 => 8,
                _ => break,
            };
            walked += 1;
            if walked > MAX_EXT_HEADERS {
                return Err(PacketError::TooManyExtensions);
            }
            let ext = buf
                .get(off..off + len)
                .ok_or(PacketError::TruncatedExtension)?;
            if next == 44 {
                let fo = be16(ext, 2);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                next = ext[0];
                off += len;
                if fo >> 3 != 0 {
                    frag = Frag::Later(id);
                    break;
                } else if fo & 1 != 0 {
                    frag = Frag::First(id);
                }
            } else {
                next = ext[0];
                off += len;
            }
        }
        Ok(PacketView {
            buf,
            src: IpAddr::V6(Ipv6Addr::from(src)),
            dst: IpAddr::V6(Ipv6Addr::from(dst)),
            proto: next,
            l4: off,
            frag,
        })
    }

    /// The packet bytes (without any trailing padding of the input buffer).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// IP version: 4 or 6.
    pub fn version(&self) -> u8 {
        if self.src.is_ipv4() {
            4
        } else {
            6
        }
    }

    /// Source address.
    pub fn src(&self) -> IpAddr {
        self.src
    }

    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        self.dst
    }

    /// Upper-layer protocol (after IPv6 extension headers).
    pub fn protocol(&self) -> u8 {
        self.proto
    }

    /// Bytes after the IP header and extension headers (for non-first fragments: fragment data).
    pub fn transport(&self) -> &'a [u8] {
        self.buf.get(self.l4..).unwrap_or_default()
    }

    /// Whether this is a fragment with a nonzero offset (no transport header).
    pub fn is_fragment_non_first(&self) -> bool {
        matches!(self.frag, Frag::Later(_))
    }

    /// Whether this is any fragment of a larger datagram.
    pub fn is_fragment(&self) -> bool {
        !matches!(self.frag, Frag::Whole)
    }

    /// The fragment identification of a fragment (IPv4: 16 bits).
    pub fn fragment_id(&self) -> Option<u32> {
        match self.frag {
            Frag::Whole => None,
            Frag::First(id) | Frag::Later(id) => Some(id),
        }
    }

    /// The first transport bytes, absent for non-first fragments.
    fn header(&self) -> Option<&'a [u8]> {
        (!self.is_fragment_non_first()).then(|| self.transport())
    }

    fn ports(&self) -> Option<(u16, u16)> {
        if !matches!(self.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            return None;
        }
        let t = self.header()?.get(..4)?;
        Some((be16(t, 0), be16(t, 2)))
    }

    /// TCP/UDP/SCTP source port (first fragments and whole packets only).
    pub fn src_port(&self) -> Option<u16> {
        self.ports().map(|p| p.0)
    }

    /// TCP/UDP/SCTP destination port (first fragments and whole packets only).
    pub fn dst_port(&self) -> Option<u16> {
        self.ports().map(|p| p.1)
    }

    /// TCP flags byte (`TCP_SYN`, `TCP_ACK`, …).
    pub fn tcp_flags(&self) -> Option<u8> {
        if self.proto != PROTO_TCP {
            return None;
        }
        self.header()?.get(13).copied()
    }

    /// The ICMP protocol number of this packet's IP version.
    fn icmp_proto(&self) -> u8 {
        if self.version() == 4 {
            PROTO_ICMP
        } else {
            PROTO_ICMPV6
        }
    }

    /// ICMP or ICMPv6 type and code (matching the IP version).
    pub fn icmp_type_code(&self) -> Option<(u8, u8)> {
        if self.proto != self.icmp_proto() {
            return None;
        }
        let t = self.header()?.get(..2)?;
        Some((t[0], t[1]))
    }

    /// Whether this is an ICMP error (destination unreachable, time exceeded, parameter problem,
    /// and for IPv6 packet too big).
    pub fn is_icmp_error(&self) -> bool {
        match (self.version(), self.icmp_type_code()) {
            (4, Some((t, _))) => matches!(t, 3 | 11 | 12),
            (6, Some((t, _))) => matches!(t, 1..=4),
            _ => false,
        }
    }

    /// The flow key of this packet, `None` when the transport header needed for it is cut short.
    pub fn flow_key(&self) -> Option<FlowKey> {
        let (src_port, dst_port) = if self.is_fragment_non_first() {
            (0, 0)
        } else if matches!(self.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
            self.ports()?
        } else if self.proto == self.icmp_proto() {
            let (ty, _) = self.icmp_type_code()?;
            let (req, rep) = if self.version() == 4 {
                (8, 0)
            } else {
                (128, 129)
            };
            if ty == req || ty == rep {
                let id = be16(self.transport().get(..6)?, 4);
                if ty == req {
                    (id, 0)
                } else {
                    (0, id)
                }
            } else {
                (0, 0)
            }
        } else {
            (0, 0)
        };
        Some(FlowKey {
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            src_port,
            dst_port,
        })
    }

    /// For an ICMP error: the flow key of the packet it reports on (as that packet was sent).
    ///
    /// The embedded packet may be truncated; ports come from its first transport bytes. The
    /// embedded packet must be of the same IP version.
    pub fn icmp_error_inner(&self) -> Option<FlowKey> {
        if !self.is_icmp_error() {
            return None;
        }
        let inner = PacketView::parse_with(self.transport().get(8..)?, false).ok()?;
        if inner.version() != self.version() {
            return None;
        }
        inner.flow_key()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds an IPv4 packet (no checksum) with the given fragment field.
    pub fn v4_frag(src: &str, dst: &str, proto: u8, frag: u16, id: u16, payload: &[u8]) -> Vec<u8> {
        let src: Ipv4Addr = src.parse().unwrap();
        let dst: Ipv4Addr = dst.parse().unwrap();
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    /// Builds an IPv4 packet.
    pub fn v4(src: &str, dst: &str, proto: u8, payload: &[u8]) -> Vec<u8> {
        v4_frag(src, dst, proto, 0, 1, payload)
    }

    /// Builds an IPv6 packet; `next` is the first next-header value, `payload` may start with
    /// extension headers.
    pub fn v6(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = src.parse().unwrap();
        let dst: Ipv6Addr = dst.parse().unwrap();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    /// A TCP header with the given ports and flags.
    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        t
    }

    /// A UDP header plus data.
    pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(data);
        t
    }

    /// An ICMP/ICMPv6 message: type, code, 4 bytes rest-of-header (id, seq), body.
    pub fn icmp(ty: u8, code: u8, id: u16, body: &[u8]) -> Vec<u8> {
        let mut t = vec![ty, code, 0, 0];
        t.extend_from_slice(&id.to_be_bytes());
        t.extend_from_slice(&[0, 1]);
        t.extend_from_slice(body);
        t
    }

    fn key(proto: u8, s: &str, sp: u16, d: &str, dp: u16) -> FlowKey {
        FlowKey {
            proto,
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
            src_port: sp,
            dst_port: dp,
        }
    }

    #[test]
    fn v4_tcp_and_udp() {
        let mut b = v4(
            "10.0.0.1",
            "100.96.1.10",
            PROTO_TCP,
            &tcp(40000, 10250, TCP_SYN),
        );
        b.extend_from_slice(&[0xee; 6]); // padding beyond total length
        let p = PacketView::parse(&b).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.as_bytes().len(), 40);
        assert_eq!(p.protocol(), PROTO_TCP);
        assert_eq!((p.src_port(), p.dst_port()), (Some(40000), Some(10250)));
        assert_eq!(p.tcp_flags(), Some(TCP_SYN));
        assert!(!p.is_fragment() && !p.is_icmp_error());
        let k = p.flow_key().unwrap();
        assert_eq!(k, key(PROTO_TCP, "10.0.0.1", 40000, "100.96.1.10", 10250));
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.to_string(), "tcp 10.0.0.1:40000 -> 100.96.1.10:10250");

        let b = v4("10.0.0.1", "10.0.0.2", PROTO_UDP, &udp(53, 5353, b"x"));
        let p = PacketView::parse(&b).unwrap();
        assert_eq!(
            (p.src_port(), p.dst_port(), p.tcp_flags()),
            (Some(53), Some(5353), None)
        );

        // IPv4 options (IHL 6)
        let mut b = v4("1.1.1.1", "2.2.2.2", PROTO_UDP, &udp(1, 2, b""));
        b[0] = 0x46;
        b.splice(20..20, [1, 1, 1, 0]);
        b[3] += 4;
        assert_eq!(PacketView::parse(&b).unwrap().src_port(), Some(1));
    }

    #[test]
    fn v4_errors() {
        assert_eq!(PacketView::parse(&[]).unwrap_err(), PacketError::Empty);
        assert_eq!(
            PacketView::parse(&[0x15; 30]).unwrap_err(),
            PacketError::UnknownVersion(1)
        );
        assert_eq!(
            PacketView::parse(&[0x45; 19]).unwrap_err(),
            PacketError::Truncated
        );
        let mut b = v4("1.1.1.1", "2.2.2.2", PROTO_UDP, &udp(1, 2, b""));
        b[0] = 0x44;
        assert_eq!(
            PacketView::parse(&b).unwrap_err(),
            PacketError::BadHeaderLength(16)
        );
        b[0] = 0x4f;
        assert_eq!(
            PacketView::parse(&b).unwrap_err(),
            PacketError::BadHeaderLength(60)
        );
        b[0] = 0x45;
        b[3] = 29;
        assert!(matches!(
            PacketView::parse(&b),
            Err(PacketError::BadLength {
                header: 29,
                buffer: 28
            })
        ));
        b[3] = 19;
        assert!(matches!(
            PacketView::parse(&b),
            Err(PacketError::BadLength { .. })
        ));
        // truncated transport header: parses, but no key for TCP
        let b = v4("1.1.1.1", "2.2.2.2", PROTO_TCP, &[0, 1]);
        let p = PacketView::parse(&b).unwrap();
        assert_eq!((p.src_port(), p.flow_key()), (None, None));
    }

    #[test]
    fn v4_fragments() {
        let first = v4_frag(
            "1.1.1.1",
            "2.2.2.2",
            PROTO_UDP,
            0x2000,
            77,
            &udp(1000, 53, &[0; 16]),
        );
        let p = PacketView::parse(&first).unwrap();
        assert!(p.is_fragment() && !p.is_fragment_non_first());
        assert_eq!((p.fragment_id(), p.src_port()), (Some(77), Some(1000)));
        let later = v4_frag(
            "1.1.1.1",
            "2.2.2.2",
            PROTO_UDP,
            3,
            77,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        );
        let p = PacketView::parse(&later).unwrap();
        assert!(p.is_fragment_non_first());
        assert_eq!((p.fragment_id(), p.src_port()), (Some(77), None));
        assert_eq!(
            p.flow_key().unwrap(),
            key(PROTO_UDP, "1.1.1.1", 0, "2.2.2.2", 0)
        );
    }

    #[test]
    fn icmp_echo_keys() {
        let req = v4(
            "10.0.0.1",
            "10.1.0.5",
            PROTO_ICMP,
            &icmp(8, 0, 0x1234, b"ping"),
        );
        let rep = v4(
            "10.1.0.5",
            "10.0.0.1",
            PROTO_ICMP,
            &icmp(0, 0, 0x1234, b"ping"),
        );
        let kq = PacketView::parse(&req).unwrap().flow_key().unwrap();
        let kp = PacketView::parse(&rep).unwrap().flow_key().unwrap();
        assert_eq!(kq, key(PROTO_ICMP, "10.0.0.1", 0x1234, "10.1.0.5", 0));
        assert_eq!(kp.reversed(), kq);
        // a request in the opposite direction does not look like a reply
        let back = v4("10.1.0.5", "10.0.0.1", PROTO_ICMP, &icmp(8, 0, 0x1234, b""));
        assert_ne!(
            PacketView::parse(&back)
                .unwrap()
                .flow_key()
                .unwrap()
                .reversed(),
            kq
        );
        // v6 echo
        let req = v6("fd00::1", "fd01::5", PROTO_ICMPV6, &icmp(128, 0, 7, b""));
        let rep = v6("fd01::5", "fd00::1", PROTO_ICMPV6, &icmp(129, 0, 7, b""));
        let kq = PacketView::parse(&req).unwrap().flow_key().unwrap();
        assert_eq!(kq.src_port, 7);
        assert_eq!(
            PacketView::parse(&rep)
                .unwrap()
                .flow_key()
                .unwrap()
                .reversed(),
            kq
        );
        // other ICMP types: no ports; truncated ICMP: no key
        let ts = v4("1.1.1.1", "2.2.2.2", PROTO_ICMP, &icmp(13, 0, 1, b""));
        assert_eq!(
            PacketView::parse(&ts).unwrap().flow_key().unwrap().src_port,
            0
        );
        let short = v4("1.1.1.1", "2.2.2.2", PROTO_ICMP, &[8]);
        assert_eq!(PacketView::parse(&short).unwrap().flow_key(), None);
        let short_echo = v4("1.1.1.1", "2.2.2.2", PROTO_ICMP, &[8, 0, 0, 0, 1]);
        assert_eq!(PacketView::parse(&short_echo).unwrap().flow_key(), None);
    }

    #[test]
    fn icmp_errors_embed_original() {
        let orig = v4(
            "10.0.0.1",
            "100.96.1.10",
            PROTO_TCP,
            &tcp(40000, 10250, TCP_SYN),
        );
        // unreachable: embedded header + 8 bytes only (truncated inner)
        let err = v4(
            "100.96.0.1",
            "10.0.0.1",
            PROTO_ICMP,
            &icmp(3, 1, 0, &orig[..28]),
        );
        let p = PacketView::parse(&err).unwrap();
        assert!(p.is_icmp_error());
        assert_eq!(p.icmp_type_code(), Some((3, 1)));
        assert_eq!(p.flow_key().unwrap().src_port, 0);
        assert_eq!(
            p.icmp_error_inner().unwrap(),
            key(PROTO_TCP, "10.0.0.1", 40000, "100.96.1.10", 10250)
        );
        // embedded echo request
        let ping = v4(
            "10.0.0.1",
            "100.96.1.10",
            PROTO_ICMP,
            &icmp(8, 0, 99, b"abcdefgh"),
        );
        let te = v4("100.96.0.1", "10.0.0.1", PROTO_ICMP, &icmp(11, 0, 0, &ping));
        assert_eq!(
            PacketView::parse(&te)
                .unwrap()
                .icmp_error_inner()
                .unwrap()
                .src_port,
            99
        );
        // v6 packet too big with embedded UDP
        let o6 = v6(
            "fd8f::1",
            "fd00:10::5",
            PROTO_UDP,
            &udp(5000, 53, &[0; 100]),
        );
        let ptb = v6(
            "fd00:10::1",
            "fd8f::1",
            PROTO_ICMPV6,
            &icmp(2, 0, 0, &o6[..48]),
        );
        let p = PacketView::parse(&ptb).unwrap();
        assert_eq!(
            p.icmp_error_inner().unwrap(),
            key(PROTO_UDP, "fd8f::1", 5000, "fd00:10::5", 53)
        );
        // mismatched version inside, too short inside, non-error
        let bad = v6("fd00:10::1", "fd8f::1", PROTO_ICMPV6, &icmp(1, 0, 0, &orig));
        assert_eq!(PacketView::parse(&bad).unwrap().icmp_error_inner(), None);
        let short = v4(
            "100.96.0.1",
            "10.0.0.1",
            PROTO_ICMP,
            &icmp(3, 1, 0, &orig[..22]),
        );
        assert_eq!(PacketView::parse(&short).unwrap().icmp_error_inner(), None);
        let echo = v4("1.1.1.1", "2.2.2.2", PROTO_ICMP, &icmp(8, 0, 1, &orig));
        assert_eq!(PacketView::parse(&echo).unwrap().icmp_error_inner(), None);
    }

    #[test]
    fn v6_extension_headers() {
        // hop-by-hop (8) -> dest options (16) -> routing (8) -> TCP
        let mut pl = vec![60, 0, 0, 0, 0, 0, 0, 0];
        pl.extend_from_slice(&[43, 1]);
        pl.extend_from_slice(&[0; 14]);
        pl.extend_from_slice(&[PROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
        pl.extend_from_slice(&tcp(1, 443, TCP_SYN | TCP_ACK));
        let b = v6("fd00::1", "fd00::2", 0, &pl);
        let p = PacketView::parse(&b).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.protocol(), PROTO_TCP);
        assert_eq!((p.src_port(), p.dst_port()), (Some(1), Some(443)));
        assert_eq!(p.tcp_flags(), Some(TCP_SYN | TCP_ACK));

        // fragment header: first fragment then a later one
        let mut first = vec![PROTO_UDP, 0, 0, 1, 0, 0, 0, 42];
        first.extend_from_slice(&udp(7, 8, &[0; 8]));
        let p6 = v6("fd00::1", "fd00::2", 44, &first);
        let p = PacketView::parse(&p6).unwrap();
        assert_eq!(
            (p.fragment_id(), p.src_port(), p.protocol()),
            (Some(42), Some(7), PROTO_UDP)
        );
        assert!(!p.is_fragment_non_first());
        let later = v6(
            "fd00::1",
            "fd00::2",
            44,
            &[PROTO_UDP, 0, 0, 0x10, 0, 0, 0, 42, 9, 9, 9, 9],
        );
        let p = PacketView::parse(&later).unwrap();
        assert!(p.is_fragment_non_first());
        assert_eq!((p.src_port(), p.flow_key().unwrap().src_port), (None, 0));
        // atomic fragment (offset 0, M=0) is a whole packet
        let mut atomic = vec![PROTO_UDP, 0, 0, 0, 0, 0, 0, 5];
        atomic.extend_from_slice(&udp(7, 8, b""));
        assert!(!PacketView::parse(&v6("fd00::1", "fd00::2", 44, &atomic))
            .unwrap()
            .is_fragment());

        // truncated extension header; too many; payload length beyond buffer; no next header
        let t = v6("fd00::1", "fd00::2", 0, &[PROTO_TCP, 1, 0, 0]);
        assert_eq!(
            PacketView::parse(&t).unwrap_err(),
            PacketError::TruncatedExtension
        );
        let many: Vec<u8> = (0..10).flat_map(|_| [60u8, 0, 0, 0, 0, 0, 0, 0]).collect();
        assert_eq!(
            PacketView::parse(&v6("fd00::1", "fd00::2", 60, &many)).unwrap_err(),
            PacketError::TooManyExtensions
        );
        let mut long = v6("fd00::1", "fd00::2", PROTO_UDP, &udp(1, 2, b""));
        long[5] = 9;
        assert!(matches!(
            PacketView::parse(&long),
            Err(PacketError::BadLength { .. })
        ));
        let none = v6("fd00::1", "fd00::2", 59, b"");
        let p = PacketView::parse(&none).unwrap();
        assert_eq!((p.protocol(), p.flow_key().unwrap().src_port), (59, 0));
        assert_eq!(
            PacketView::parse(&[0x60; 39]).unwrap_err(),
            PacketError::Truncated
        );
    }

    fn exercise(p: &PacketView<'_>) {
        let _ = (
            p.version(),
            p.src(),
            p.dst(),
            p.protocol(),
            p.transport(),
            p.as_bytes(),
        );
        let _ = (
            p.src_port(),
            p.dst_port(),
            p.tcp_flags(),
            p.fragment_id(),
            p.is_fragment(),
        );
        let _ = (
            p.icmp_type_code(),
            p.is_icmp_error(),
            p.flow_key(),
            p.icmp_error_inner(),
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..200), ver in 0u8..3, fix in any::<bool>()) {
            if let Some(b) = data.first_mut() {
                match ver {
                    0 => *b = 0x45 | (*b & 0x0f),
                    1 => *b = 0x60,
                    _ => {}
                }
            }
            if fix && data.len() >= 40 {
                let n = data.len();
                if ver == 0 { data[2..4].copy_from_slice(&(n as u16).to_be_bytes()); }
                if ver == 1 { data[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes()); }
            }
            if let Ok(p) = PacketView::parse(&data) {
                exercise(&p);
                prop_assert!(p.as_bytes().len() <= data.len());
            }
        }

        #[test]
        fn icmp_error_with_garbage_inside(inner in proptest::collection::vec(any::<u8>(), 0..80), v6_outer in any::<bool>()) {
            let b = if v6_outer {
                v6("fd00::1", "fd00::2", PROTO_ICMPV6, &icmp(1, 0, 0, &inner))
            } else {
                v4("1.1.1.1", "2.2.2.2", PROTO_ICMP, &icmp(3, 0, 0, &inner))
            };
            exercise(&PacketView::parse(&b).unwrap());
        }

        #[test]
        fn keys_roundtrip(sp in any::<u16>(), dp in any::<u16>(), a in any::<u32>(), b in any::<u128>()) {
            let s4 = Ipv4Addr::from(a).to_string();
            let pk = v4(&s4, "10.0.0.1", PROTO_UDP, &udp(sp, dp, b""));
            let k = PacketView::parse(&pk).unwrap().flow_key().unwrap();
            prop_assert_eq!((k.src_port, k.dst_port, k.src), (sp, dp, IpAddr::from(Ipv4Addr::from(a))));
            let s6 = Ipv6Addr::from(b).to_string();
            let pk = v6(&s6, "fd00::1", PROTO_TCP, &tcp(sp, dp, 0));
            let k = PacketView::parse(&pk).unwrap().flow_key().unwrap();
            prop_assert_eq!((k.src_port, k.dst_port, k.src), (sp, dp, IpAddr::from(Ipv6Addr::from(b))));
        }
    }
}
