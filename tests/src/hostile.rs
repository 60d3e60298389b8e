//! What an attacker sends, for the hostile-input tests and the `hostile` tool: floods of TCP
//! streams with chosen first bytes, WireGuard initiations with valid mac1 from random keys,
//! hand-made IP packets for a raw socket, and process samples (RSS, CPU, open files).
//!
//! Everything here is blocking std code meant to run on a thread inside a lab namespace
//! ([`crate::Netns::in_ns`]); it only ever talks to addresses of the caller's lab.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use common::keys::parse_public_key;
use common::session::{Session, SessionConfig};
use rand::RngCore;

/// The version-1 preamble.
pub const PREAMBLE_V1: [u8; 8] = common::preamble::PREAMBLE_V1;

/// Framed handshake initiations (each `u16` length + 148 bytes) from fresh random keys to
/// the server `server_public` (base64): valid mac1, unknown static key.
pub fn initiations(server_public: &str, n: usize) -> Result<Vec<Vec<u8>>> {
    let server = parse_public_key(server_public).context("server public key")?;
    let now = Instant::now();
    (0..n)
        .map(|i| {
            let key = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
            let mut s = Session::new(
                key,
                server,
                None,
                u32::try_from(i + 1).unwrap_or(1),
                SessionConfig::default(),
                None,
                now,
            );
            let mut out = BytesMut::new();
            s.stream_up(now, &mut out).context("initiation")?;
            Ok(out.to_vec())
        })
        .collect()
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// Streams held open by a flood.
#[derive(Debug, Default)]
pub struct Flood {
    /// The open streams.
    pub streams: Vec<TcpStream>,
    /// Connects that failed (refused, reset, timed out).
    pub failed: usize,
    /// Time the opening took.
    pub elapsed: Duration,
}

impl Flood {
    /// Opens `n` TCP streams to `addr` as fast as connects complete, sending `first(i)` on
    /// each (nothing when it is empty). Streams stay open until the flood is dropped.
    pub fn open(addr: SocketAddr, n: usize, first: impl Fn(usize) -> Vec<u8>) -> Flood {
        Self::open_from(&[], addr, n, first)
    }

    /// [`Flood::open`] with the streams' source addresses taken in turn from `sources` (so a
    /// long test does not run out of ports toward one destination); any source when empty.
    pub fn open_from(
        sources: &[IpAddr],
        addr: SocketAddr,
        n: usize,
        first: impl Fn(usize) -> Vec<u8>,
    ) -> Flood {
        let start = Instant::now();
        let mut f = Flood::default();
        for i in 0..n {
            let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            match connect_from(src, addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    let bytes = first(i);
                    if !bytes.is_empty() && s.write_all(&bytes).is_err() {
                        f.failed += 1;
                        continue;
                    }
                    f.streams.push(s);
                }
                Err(_) => f.failed += 1,
            }
        }
        f.elapsed = start.elapsed();
        f
    }

    /// How many of the streams the other side has closed (EOF or reset seen without blocking).
    pub fn closed_by_peer(&self) -> usize {
        let mut buf = [0u8; 512];
        self.streams
            .iter()
            .filter(|s| {
                if s.set_nonblocking(true).is_err() {
                    return true;
                }
                let closed = loop {
                    match (&**s).read(&mut buf) {
                        Ok(0) => break true,
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                        Err(_) => break true,
                    }
                };
                let _ = s.set_nonblocking(false);
                closed
            })
            .count()
    }
}

/// A TCP connection to `addr`, from source address `src` when given.
pub fn connect_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(src) = src else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&addr.into(), timeout)?;
    Ok(sock.into())
}

/// Opens one stream, sends `bytes`, and reads until the peer closes or `wait` passes.
/// Returns what came back and whether the peer closed the stream.
pub fn send_and_watch(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Result<(Vec<u8>, bool)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.write_all(bytes).context("send")?;
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok((got, false));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok((got, true)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok((got, false))
            }
            Err(_) => return Ok((got, true)),
        }
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// User + system CPU time of process `pid`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is a valid name.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Internet checksum (one's complement sum) over `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for p in parts {
        for &b in p.iter() {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    !(sum as u16)
}

/// An IPv4 packet `src → dst` carrying `payload` of protocol `proto` (header checksum set).
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    p[4..6].copy_from_slice(&rand::random::<u16>().to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = checksum(&[&p]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A TCP segment `sport → dport` with `flags` (checksum over the IPv4 pseudo header).
pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&rand::random::<u32>().to_be_bytes());
    t[12] = 0x50;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo = [&src[..], &dst[..], &[0, 6, 0, 20]].concat();
    let c = checksum(&[&pseudo, &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

/// A UDP datagram `sport → dport` with `data`.
pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).unwrap_or(u16::MAX);
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&len.to_be_bytes());
    u.extend_from_slice(data);
    let pseudo = [&src[..], &dst[..], &[0, 17], &len.to_be_bytes()[..]].concat();
    let c = checksum(&[&pseudo, &u]);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

/// An ICMP destination-unreachable (`code`) from `src` to `dst` quoting `quoted` (the first
/// 28 bytes of an IPv4 packet are enough).
pub fn icmp4_unreachable(src: [u8; 4], dst: [u8; 4], code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![3u8, code, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&quoted[..quoted.len().min(28)]);
    let c = checksum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, &m)
}

/// Sends hand-made IPv4 packets through a raw socket of the calling thread's namespace (the
/// kernel routes each by its destination, e.g. into the shoot client's TUN).
pub fn send_raw4(packets: &[Vec<u8>]) -> Result<usize> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("raw socket (needs root)")?;
    let mut sent = 0;
    for p in packets {
        let dst = p
            .get(16..20)
            .map(|d| IpAddr::from([d[0], d[1], d[2], d[3]]))
            .context("short packet")?;
        let addr: socket2::SockAddr = SocketAddr::new(dst, 0).into();
        if sock.send_to(p, &addr).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

/// A TLS client configuration trusting `pki`'s CA and presenting its client certificate.
pub fn tls_client_config(pki: &crate::pki::Pki) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&pki.ca).context("CA")?)?;
    let certs = vec![CertificateDer::from_pem_file(&pki.client_cert).context("client cert")?];
    let key = PrivateKeyDer::from_pem_file(&pki.client_key).context("client key")?;
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    Ok(std::sync::Arc::new(cfg))
}

/// A TLS stream to the proxy listener.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` and completes a TLS handshake as kube-apiserver would.
pub fn tls_connect(addr: SocketAddr, cfg: &std::sync::Arc<rustls::ClientConfig>) -> Result<Tls> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(cfg.clone(), name)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The first flight of a TLS handshake (a ClientHello) as a client with `cfg` sends it.
pub fn client_hello(cfg: &std::sync::Arc<rustls::ClientConfig>) -> Result<Vec<u8>> {
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Sends `request` on `s` and returns the status of the response (0 when the connection
/// closed without one).
pub fn status_after<S: Read + Write>(s: &mut S, request: &[u8]) -> u16 {
    if s.write_all(request).is_err() {
        return 0;
    }
    crate::client::read_head(s)
        .ok()
        .and_then(|h| crate::client::status_of(&h).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let p = tcp4([10, 0, 0, 1], [10, 0, 0, 2], 1000, 80, 0x02);
        assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header");
        let pseudo = [&p[12..20], &[0, 6, 0, 20][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "TCP");
        let view = common::packet::PacketView::parse(&p).unwrap();
        assert_eq!(view.dst_port(), Some(80));
        let e = icmp4_unreachable([10, 0, 0, 2], [10, 0, 0, 1], 3, &p);
        let v = common::packet::PacketView::parse(&e).unwrap();
        assert!(v.is_icmp_error());
        assert_eq!(v.icmp_error_inner().unwrap().dst_port, 80);
    }
}
