//! TCP socket options, device-bound connects, device-bound DNS lookups over UDP and the
//! file-descriptor limit.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::dns::{encode_query, parse_response, Answer, DnsError, QType};

/// Socket options for tunnel and proxy connections (DESIGN §3.6, §3.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTuning {
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// Keepalive idle time before the first probe (`TCP_KEEPIDLE`); `None` = keepalive off.
    pub keepalive: Option<Duration>,
    /// Interval between keepalive probes (`TCP_KEEPINTVL`).
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub keepalive_retries: u32,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
    pub user_timeout: Option<Duration>,
    /// `SO_SNDBUF` (the kernel doubles it); `None` = autotuning.
    pub send_buf: Option<usize>,
    /// `SO_RCVBUF` (the kernel doubles it); `None` = autotuning.
    pub recv_buf: Option<usize>,
}

impl Default for TcpTuning {
    /// Nodelay, keepalive 15 s idle / 5 s interval / 3 probes, user timeout 30 s.
    fn default() -> Self {
        TcpTuning {
            nodelay: true,
            keepalive: Some(Duration::from_secs(15)),
            keepalive_interval: Duration::from_secs(5),
            keepalive_retries: 3,
            user_timeout: Some(Duration::from_secs(30)),
            send_buf: None,
            recv_buf: None,
        }
    }
}

/// Applies `opts` to a connected stream.
pub fn tune_stream(s: &TcpStream, opts: &TcpTuning) -> io::Result<()> {
    apply(&SockRef::from(s), opts)
}

fn apply(sock: &SockRef<'_>, opts: &TcpTuning) -> io::Result<()> {
    sock.set_nodelay(opts.nodelay)?;
    match opts.keepalive {
        Some(idle) => sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(opts.keepalive_interval)
                .with_retries(opts.keepalive_retries),
        )?,
        None => sock.set_keepalive(false)?,
    }
    sock.set_tcp_user_timeout(opts.user_timeout)?;
    if let Some(n) = opts.send_buf {
        sock.set_send_buffer_size(n)?;
    }
    if let Some(n) = opts.recv_buf {
        sock.set_recv_buffer_size(n)?;
    }
    Ok(())
}

/// Why [`connect_bound`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No answer within the timeout.
    #[error("connect timed out")]
    Timeout,
    /// The peer answered with a reset (`ECONNREFUSED`).
    #[error("connection refused")]
    Refused,
    /// No route, or the host or network is down.
    #[error("unreachable: {0}")]
    Unreachable(#[source] io::Error),
    /// Anything else, including socket setup (e.g. binding to a missing device).
    #[error("{0}")]
    Other(#[source] io::Error),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectError::Refused,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                ConnectError::Unreachable(e)
            }
            Some(libc::ETIMEDOUT) => ConnectError::Timeout,
            _ => ConnectError::Other(e),
        }
    }
}

/// Opens a TCP connection to `addr`, bound to `device` (`SO_BINDTODEVICE`) when given, with
/// `tuning` applied before the SYN goes out, giving up after `timeout`.
pub async fn connect_bound(
    addr: SocketAddr,
    device: Option<&str>,
    timeout: Duration,
    tuning: &TcpTuning,
) -> Result<TcpStream, ConnectError> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Other)?;
    sock.set_nonblocking(true).map_err(ConnectError::Other)?;
    if let Some(dev) = device {
        sock.bind_device(Some(dev.as_bytes()))
            .map_err(ConnectError::Other)?;
    }
    apply(&SockRef::from(&sock), tuning).map_err(ConnectError::Other)?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(r) => r.map_err(ConnectError::from),
    }
}

/// Receive buffer of a DNS lookup (answers without EDNS fit into 512 bytes).
const DNS_BUF: usize = 2048;

/// Why [`dns_lookup`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Neither the query nor its retry was answered within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Socket setup or IO failed (e.g. `ECONNREFUSED` after an ICMP port unreachable).
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The name is invalid, or the server's answer is truncated or malformed.
    #[error("{0}")]
    Dns(#[from] DnsError),
}

/// Asks `server` over UDP for the `qtype` records of `name`, from a socket bound to `device`
/// (`SO_BINDTODEVICE`) when given. Uses a random query id, sends the query again when half of
/// `timeout` passed without an answer, and gives up after `timeout`. Datagrams from other
/// addresses, with another id or for another question are ignored.
pub async fn dns_lookup(
    server: SocketAddr,
    device: Option<&str>,
    name: &str,
    qtype: QType,
    timeout: Duration,
) -> Result<Answer, LookupError> {
    let id: u16 = rand::random();
    let query = encode_query(id, name, qtype)?;
    let start = tokio::time::Instant::now();
    let (retry_at, deadline) = (start + timeout / 2, start + timeout);
    let sock = udp_connected(server, device).map_err(LookupError::Io)?;
    sock.send(&query).await.map_err(LookupError::Io)?;
    let mut retried = false;
    let mut buf = vec![0u8; DNS_BUF];
    loop {
        let until = if retried { deadline } else { retry_at };
        let (n, from) = match tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
            Err(_) if retried => return Err(LookupError::Timeout(timeout)),
            Err(_) => {
                retried = true;
                sock.send(&query).await.map_err(LookupError::Io)?;
                continue;
            }
            Ok(r) => r.map_err(LookupError::Io)?,
        };
        if from.ip().to_canonical() != server.ip().to_canonical() || from.port() != server.port() {
            continue;
        }
        match parse_response(buf.get(..n).unwrap_or_default(), id, name, qtype) {
            Err(DnsError::IdMismatch { .. } | DnsError::Mismatch(_)) => continue,
            other => return other.map_err(LookupError::Dns),
        }
    }
}

/// A non-blocking UDP socket bound to `device` (when given) and connected to `server`.
fn udp_connected(server: SocketAddr, device: Option<&str>) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(server),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    sock.set_nonblocking(true)?;
    if let Some(dev) = device {
        sock.bind_device(Some(dev.as_bytes()))?;
    }
    sock.connect(&server.into())?;
    UdpSocket::from_std(std::net::UdpSocket::from(sock))
}

/// Accept queue of the listeners: floods of connects arrive in bursts, and a SYN dropped for a
/// full queue costs a legitimate client a one-second retransmission. The kernel caps it at
/// `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener on `addr` with address reuse and a [`LISTEN_BACKLOG`]-deep accept queue
/// (tokio's `bind` uses 1024). A `[::]` address accepts IPv4 too.
pub fn listen(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (capped at `fs.nr_open` when the hard
/// limit is unlimited). Returns `(old_soft, new_soft)`.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = get_nofile()?;
    let target = if hard == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if soft >= target {
        return Ok((soft, soft));
    }
    set_nofile(target, hard)?;
    Ok((soft, target))
}

/// FFI glue: `getrlimit(RLIMIT_NOFILE)` into a local struct.
#[allow(unsafe_code)]
fn get_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// FFI glue: `setrlimit(RLIMIT_NOFILE)` from a local struct.
#[allow(unsafe_code)]
fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit that the call only reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_by_errno() {
        let e = |n| ConnectError::from(io::Error::from_raw_os_error(n));
        assert!(matches!(e(libc::ECONNREFUSED), ConnectError::Refused));
        assert!(matches!(e(libc::ENETUNREACH), ConnectError::Unreachable(_)));
        assert!(matches!(e(libc::EHOSTDOWN), ConnectError::Unreachable(_)));
        assert!(matches!(e(libc::ETIMEDOUT), ConnectError::Timeout));
        assert!(matches!(e(libc::EINVAL), ConnectError::Other(_)));
    }

    #[tokio::test]
    async fn loopback_connect_is_tuned() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let tuning = TcpTuning::default();
        let s = connect_bound(addr, None, Duration::from_secs(2), &tuning)
            .await
            .unwrap();
        let r = SockRef::from(&s);
        assert!(r.nodelay().unwrap());
        assert!(r.keepalive().unwrap());
        assert_eq!(r.keepalive_time().unwrap(), Duration::from_secs(15));
        assert_eq!(r.keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(r.keepalive_retries().unwrap(), 3);
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(Duration::from_secs(30)));
        let off = TcpTuning {
            nodelay: false,
            keepalive: None,
            user_timeout: None,
            ..tuning
        };
        tune_stream(&s, &off).unwrap();
        assert!(!r.nodelay().unwrap());
        assert!(!r.keepalive().unwrap());
        assert_eq!(r.tcp_user_timeout().unwrap(), None);
        drop(l);
        let refused = connect_bound(addr, None, Duration::from_secs(2), &off).await;
        assert!(matches!(refused, Err(ConnectError::Refused)), "{refused:?}");
    }

    /// A loopback DNS server that drops the first query, sends a datagram with a wrong id,
    /// then answers `10.0.0.7` (A) or NXDOMAIN (other types).
    async fn flaky_dns() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut seen = 0;
            loop {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                seen += 1;
                if seen % 2 == 1 {
                    continue;
                }
                let mut r = buf[..n].to_vec();
                r[2] |= 0x80;
                let mut wrong = r.clone();
                wrong[0] ^= 0xff;
                s.send_to(&wrong, from).await.unwrap();
                if u16::from_be_bytes([r[n - 4], r[n - 3]]) == 1 {
                    r[7] = 1; // one answer
                    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 7]);
                } else {
                    r[3] |= 3;
                }
                s.send_to(&r, from).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn dns_lookup_retries_and_filters() {
        let server = flaky_dns().await;
        let t = Duration::from_millis(600);
        let a = dns_lookup(server, None, "web.example.", QType::A, t)
            .await
            .unwrap();
        assert_eq!(
            a.addrs,
            vec!["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(a.ttl, Some(30));
        let a = dns_lookup(server, None, "web.example", QType::Aaaa, t)
            .await
            .unwrap();
        assert_eq!(a.rcode, crate::dns::Rcode::NxDomain);
        assert!(matches!(
            dns_lookup(server, None, "a..b", QType::A, t).await,
            Err(LookupError::Dns(DnsError::InvalidName(_)))
        ));
    }

    #[tokio::test]
    async fn dns_lookup_times_out() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = silent.local_addr().unwrap();
        let t = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let r = dns_lookup(server, None, "web.example", QType::A, t).await;
        assert!(matches!(r, Err(LookupError::Timeout(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
        // Both the query and its retry arrived.
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            silent.try_recv_from(&mut buf).unwrap();
        }
        drop(silent);
        let r = dns_lookup(server, None, "web.example", QType::A, t).await;
        assert!(matches!(r, Err(LookupError::Io(_))), "closed port: {r:?}");
    }

    #[test]
    fn nofile_limit_is_raised_to_hard() {
        let (old, new) = raise_nofile_limit().unwrap();
        assert!(new >= old);
        let (soft, _) = get_nofile().unwrap();
        assert_eq!(soft, new);
    }
}
