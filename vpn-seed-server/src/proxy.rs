//! The egress proxy kube-apiserver talks to: HTTP CONNECT over mTLS or a Unix socket,
//! authorized against the shoot networks, dialled through the seed TUN. Hostname targets are
//! resolved by the shoot's DNS server, asked through the tunnel.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::connect::{
    check_connect, format_response, parse_request, parse_target, Target, MAX_HEAD_LEN,
};
use common::dns::{Answer, QType, Rcode};
use common::forward::{close_response_head, forward_request, ForwardError};
use common::io::sock::{connect_bound, dns_lookup, ConnectError, LookupError, TcpTuning};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use common::limits::LimitKind;

use crate::config::Config;
use crate::state::{lock, OpenGuard, Pending, Server};

/// Time a forwarded request's upstream has to start its answer.
const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Refused connections that drain their input at once before they are closed.
pub const MAX_LINGERING: usize = 64;
/// Most bytes drained from a refused connection.
const LINGER_BYTES: usize = 256 * 1024;
/// Longest time a refused connection drains.
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Resolves hostname targets through the shoot's DNS server, from sockets bound to the seed
/// TUN, with a small positive cache.
pub struct Resolver {
    server: SocketAddr,
    device: String,
    cluster_domain: String,
    timeout: Duration,
    /// Name → address and expiry; at most `cache_names` entries.
    cache: Mutex<HashMap<String, (IpAddr, Instant)>>,
    cache_names: usize,
    cache_ttl: Duration,
    /// Bounds lookups in flight (each holds two sockets and a flow until answered).
    lookups: Arc<Semaphore>,
}

impl Resolver {
    /// The resolver `cfg` asks for (`--shoot-dns-server`), if any.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        cfg.shoot_dns_server.map(|ip| Resolver {
            server: SocketAddr::new(ip, 53),
            device: cfg.tun_name.clone(),
            cluster_domain: cfg.shoot_cluster_domain.clone(),
            timeout: cfg.dns_timeout,
            cache: Mutex::new(HashMap::new()),
            cache_names: cfg.limits.dns_cache_names,
            cache_ttl: cfg.limits.dns_cache_ttl,
            lookups: Arc::new(Semaphore::new(cfg.limits.dns_lookups)),
        })
    }

    /// The name to query: `name.namespace.svc` gets the cluster domain appended (how
    /// kube-apiserver addresses webhooks and aggregated APIs); other names are absolute.
    fn fqdn(&self, host: &str) -> String {
        let host = host.to_ascii_lowercase();
        if host.ends_with(".svc") {
            format!("{host}.{}", self.cluster_domain)
        } else {
            host
        }
    }

    /// One address of `host`: asks for A and AAAA at once and takes the first IPv4 address,
    /// else the first IPv6 address.
    async fn resolve(
        &self,
        host: &str,
        counters: &common::limits::LimitCounters,
    ) -> Result<IpAddr, Refusal> {
        let name = self.fqdn(host);
        let now = Instant::now();
        if let Some((ip, _)) = lock(&self.cache).get(&name).filter(|(_, exp)| *exp > now) {
            return Ok(*ip);
        }
        let Ok(_lookup) = self.lookups.clone().try_acquire_owned() else {
            counters.hit(LimitKind::DnsLookups);
            return Err(refuse(
                503,
                format!("cannot resolve {name}: too many DNS lookups in flight"),
            ));
        };
        let lookup =
            |qtype| dns_lookup(self.server, Some(&self.device), &name, qtype, self.timeout);
        let (v4, v6) = (lookup(QType::A), lookup(QType::Aaaa));
        tokio::pin!(v4, v6);
        let (mut r4, mut r6) = (None, None);
        while r4.is_none() || r6.is_none() {
            tokio::select! {
                r = &mut v4, if r4.is_none() => r4 = Some(r),
                r = &mut v6, if r6.is_none() => r6 = Some(r),
            }
            // An IPv4 address does not wait for the AAAA answer, nor NXDOMAIN for the other.
            if let Some(Ok(Answer { addrs, ttl, .. })) = &r4 {
                if let Some(ip) = addrs.first() {
                    self.remember(&name, *ip, *ttl);
                    return Ok(*ip);
                }
            }
            if [&r4, &r6]
                .iter()
                .any(|r| matches!(r, Some(Ok(a)) if a.rcode == Rcode::NxDomain))
            {
                break;
            }
        }
        if let Some(Ok(Answer { addrs, ttl, .. })) = &r6 {
            if let Some(ip) = addrs.first() {
                self.remember(&name, *ip, *ttl);
                return Ok(*ip);
            }
        }
        let results = [r4, r6];
        let results = results.iter().flatten();
        let dns = self.server.ip();
        let fail = |code, why: String| refuse(code, format!("cannot resolve {name}: {why}"));
        if results
            .clone()
            .any(|r| matches!(r, Ok(a) if a.rcode == Rcode::NxDomain))
        {
            return Err(fail(502, "no such host".into()));
        }
        for r in results {
            match r {
                Err(LookupError::Timeout(t)) => {
                    return Err(fail(
                        504,
                        format!("DNS server {dns} did not answer within {t:?}"),
                    ))
                }
                Err(e) => return Err(fail(502, format!("DNS server {dns}: {e}"))),
                Ok(a) if a.rcode != Rcode::NoError => {
                    return Err(fail(502, format!("DNS server {dns} answered {}", a.rcode)))
                }
                Ok(_) => {}
            }
        }
        Err(fail(502, "no such host".into()))
    }

    /// Caches `ip` for `name` for the record's TTL, at most the cache's TTL.
    fn remember(&self, name: &str, ip: IpAddr, ttl: Option<u32>) {
        let ttl = Duration::from_secs(u64::from(ttl.unwrap_or(0))).min(self.cache_ttl);
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = lock(&self.cache);
        if cache.len() >= self.cache_names {
            cache.retain(|_, (_, exp)| *exp > now);
            if cache.len() >= self.cache_names {
                cache.clear();
            }
        }
        cache.insert(name.to_owned(), (ip, now + ttl));
    }
}

/// A client connection of the egress proxy: how it relays bytes once the CONNECT is answered.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Copies both ways with half-close until both directions end.
    fn relay(
        &mut self,
        upstream: &mut TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<(u64, u64)>> + Send;
}

impl ClientStream for tokio::net::UnixStream {
    /// Borrows a buffer only while bytes are in flight: idle connections cost none.
    async fn relay(&mut self, upstream: &mut TcpStream) -> std::io::Result<(u64, u64)> {
        common::io::splice::copy_bidirectional(&*self, &*upstream).await
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    /// TLS keeps its own record buffers; the copy buffers are kept small.
    async fn relay(&mut self, upstream: &mut TcpStream) -> std::io::Result<(u64, u64)> {
        tokio::io::copy_bidirectional_with_sizes(self, upstream, TLS_COPY_BUF, TLS_COPY_BUF).await
    }
}

/// Copy buffer per direction of a TLS client connection.
const TLS_COPY_BUF: usize = 16 * 1024;

/// What every proxied connection needs to know.
pub struct ProxyContext {
    pub server: Arc<Server>,
    pub tun_name: String,
    pub dial_timeout: Duration,
    pub limit: Arc<Semaphore>,
    /// Dials in flight.
    pub dials: Arc<Semaphore>,
    /// Refused connections draining their input before the close ([`MAX_LINGERING`]).
    pub lingering: Arc<Semaphore>,
    pub tuning: TcpTuning,
    /// Resolver of hostname targets (`--shoot-dns-server`); None answers them 502.
    pub resolver: Option<Resolver>,
}

/// A refusal: status, reason phrase and the one-line body.
struct Refusal(u16, &'static str, String);

fn refuse(code: u16, body: impl Into<String>) -> Refusal {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    Refusal(code, reason, body.into())
}

async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    timeout: Duration,
    counters: &common::limits::LimitCounters,
) -> Result<(common::connect::RequestHead, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let read = async {
        loop {
            match parse_request(&buf) {
                Ok(Some((head, len))) => {
                    let rest = buf.split_off(len);
                    return Ok((head, rest));
                }
                Ok(None) => {}
                Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
            }
            let room = MAX_HEAD_LEN.saturating_sub(buf.len()).clamp(1, chunk.len());
            match s.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => {
                    return Err(refuse(
                        400,
                        "connection closed before the request head ended",
                    ))
                }
                Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => {
            counters.hit(LimitKind::ProxyHeadTimeout);
            Err(refuse(
                400,
                format!(
                    "no request head within {}",
                    humantime::format_duration(timeout)
                ),
            ))
        }
    }
}

/// Log gate reason of a refusal by status code (so one flood of a kind cannot silence the
/// others).
fn refusal_reason(code: u16) -> &'static str {
    match code {
        400 => "proxy_refused_400",
        403 => "proxy_refused_403",
        405 => "proxy_refused_405",
        502 => "proxy_refused_502",
        503 => "proxy_refused_503",
        504 => "proxy_refused_504",
        _ => "proxy_refused",
    }
}

/// The resolver for hostname `host`, or the 502 that explains how to enable it.
fn resolver<'a>(r: &'a Option<Resolver>, host: &str) -> Result<&'a Resolver, Refusal> {
    r.as_ref().ok_or_else(|| {
        refuse(
            502,
            format!("cannot resolve {host}: hostname targets need the shoot's DNS server; set --shoot-dns-server"),
        )
    })
}

impl ProxyContext {
    /// 403 unless `ip` (the address of `host`, if given) lies in the shoot networks.
    fn authorize(&self, ip: IpAddr, host: Option<&str>) -> Result<(), Refusal> {
        if self.server.shoot_networks.contains(ip) {
            return Ok(());
        }
        Err(refuse(
            403,
            match host {
                Some(h) => format!("{h} resolves to {ip}, which is not in the shoot networks"),
                None => format!("{ip} is not in the shoot networks"),
            },
        ))
    }

    /// Serves one client connection of kube-apiserver (CONNECT) or Prometheus (a plain-HTTP
    /// request in absolute form, forwarded once with `Connection: close`).
    /// `open` counts it from its accept on: a shutdown drains connections still in their TLS
    /// handshake, being read, waiting for a tunnel or dialling, not only relays.
    pub async fn serve<S: ClientStream>(
        &self,
        mut client: S,
        peer: String,
        pending: Pending,
        open: OpenGuard,
    ) {
        let started = Instant::now();
        // Boxed, like the refusal's linger below: their state (head buffer, resolver, dial) is
        // freed once done instead of staying in every open connection's future.
        match Box::pin(self.open(&mut client, pending)).await {
            Err((target, Refusal(code, reason, body))) => {
                self.server.stats.proxy_answers.count(code);
                common::warn_limited!(refusal_reason(code), client = %peer, %target, code, reason = %body, "request refused");
                let _ = client
                    .write_all(&format_response(code, reason, &body))
                    .await;
                let _ = client.shutdown().await;
                Box::pin(self.linger(&mut client)).await;
            }
            Ok(Opened {
                target,
                mut upstream,
                forward,
                _permit,
            }) => {
                self.server.stats.proxy_answers.count(200);
                tracing::debug!(client = %peer, %target, elapsed = ?started.elapsed(), forward = forward.is_some(), "proxied connection established");
                let res = match forward {
                    None => {
                        if client
                            .write_all(&format_response(200, "Connection established", ""))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        client.relay(&mut upstream).await.map(|_| ())
                    }
                    // Boxed: its state would otherwise grow every connection's future.
                    Some(body_left) => {
                        Box::pin(forward_once(&mut client, &mut upstream, body_left)).await
                    }
                };
                drop(open);
                tracing::debug!(client = %peer, %target, result = ?res, "proxied connection closed");
            }
        }
    }

    /// After a refusal: reads and discards what the client still sends (a bounded amount, for
    /// a short time) before the connection is dropped. Closing with unread bytes makes the
    /// kernel answer with a reset, which can destroy the refusal before the client read it
    /// (e.g. a 400 for an oversize head the client is still writing). At most
    /// [`MAX_LINGERING`] connections linger at once; the others close at once.
    async fn linger<S: AsyncRead + Unpin>(&self, client: &mut S) {
        let Ok(_slot) = self.lingering.clone().try_acquire_owned() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        let drain = async {
            while left > 0 {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    }

    /// Reads and authorizes the request and dials the target; the permit bounds open
    /// connections for as long as it is held.
    async fn open<S>(&self, client: &mut S, pending: Pending) -> Result<Opened, (String, Refusal)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let limits = &self.server.limits;
        let counters = &self.server.stats.limits;
        let head = tokio::select! {
            r = read_head(client, limits.proxy_head_timeout, counters) => r,
            _ = pending.evicted() => Err(refuse(503, "too many unfinished requests; evicted by a newer one")),
        };
        // A complete head: no longer pending.
        drop(pending);
        let (head, mut rest) = head.map_err(|r| ("-".to_string(), r))?;
        let target = head.target.clone();
        let fail = |r: Refusal| (target.clone(), r);
        let (parsed, first, forward) = if head.method.eq_ignore_ascii_case("CONNECT") {
            check_connect(&head).map_err(|e| fail(refuse(400, e.to_string())))?;
            let parsed = parse_target(&head.target)
                .map_err(|e| fail(refuse(400, format!("bad target: {e}"))))?;
            (parsed, rest, None)
        } else {
            let f = match forward_request(&head) {
                Ok(f) => f,
                Err(e @ ForwardError::NotAbsolute(_)) => {
                    return Err(fail(refuse(
                        405,
                        format!("method {} not allowed: {e}", head.method),
                    )))
                }
                Err(e) => return Err(fail(refuse(400, e.to_string()))),
            };
            // One request per connection: bytes past its body are not forwarded.
            rest.truncate(usize::try_from(f.body_len).unwrap_or(usize::MAX));
            let left = f.body_len - rest.len() as u64;
            let mut first = f.head;
            first.extend_from_slice(&rest);
            (f.target, first, Some(left))
        };
        match &parsed {
            Target::Addr(a) => self.authorize(a.ip(), None).map_err(&fail)?,
            Target::Host { host, .. } => {
                resolver(&self.resolver, host).map_err(&fail)?;
            }
        }
        // Taken before waiting for a tunnel and resolving, so the limit also bounds waiting
        // requests and concurrent lookups.
        let permit = self.limit.clone().try_acquire_owned().map_err(|_| {
            counters.hit(LimitKind::Connections);
            fail(refuse(503, "connection limit reached"))
        })?;
        // Hold, don't refuse: a reconnecting or just started tunnel gets `--tunnel-wait`.
        if !self.server.wait_for_tunnel().await {
            if self.server.draining.load(Ordering::Relaxed) {
                return Err(fail(refuse(503, "shutting down")));
            }
            return Err(fail(refuse(503, "no tunnel to the shoot is up")));
        }
        let addr = match parsed {
            Target::Addr(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
            Target::Host { host, port } => {
                let ip = resolver(&self.resolver, &host)
                    .map_err(&fail)?
                    .resolve(&host, counters)
                    .await;
                let ip = ip.map_err(&fail)?.to_canonical();
                tracing::debug!(%host, %ip, "resolved");
                self.authorize(ip, Some(&host)).map_err(&fail)?;
                SocketAddr::new(ip, port)
            }
        };
        let dial_slot = self.dials.clone().try_acquire_owned().map_err(|_| {
            counters.hit(LimitKind::PendingDials);
            fail(refuse(503, "too many dials in flight"))
        })?;
        let dial_start = Instant::now();
        let dialled =
            connect_bound(addr, Some(&self.tun_name), self.dial_timeout, &self.tuning).await;
        drop(dial_slot);
        if dialled.is_ok() {
            self.server.stats.dial.observe(dial_start.elapsed());
        }
        let mut upstream = dialled.map_err(|e| match e {
            ConnectError::Timeout => fail(refuse(
                504,
                format!("no answer from {addr} within {:?}", self.dial_timeout),
            )),
            ConnectError::Refused => fail(refuse(502, format!("{addr} refused the connection"))),
            other => fail(refuse(502, format!("{addr} unreachable: {other}"))),
        })?;
        if !first.is_empty() {
            upstream
                .write_all(&first)
                .await
                .map_err(|e| fail(refuse(502, format!("write to {addr}: {e}"))))?;
        }
        Ok(Opened {
            target,
            upstream,
            forward,
            _permit: permit,
        })
    }
}

/// A dialled target.
struct Opened {
    target: String,
    upstream: TcpStream,
    /// For a forwarded request: body bytes still to copy from the client.
    forward: Option<u64>,
    _permit: OwnedSemaphorePermit,
}

/// Finishes a forwarded request: the rest of its body to the upstream, then the upstream's
/// answer (head rewritten to `Connection: close`) back until the upstream closes.
async fn forward_once<S: ClientStream>(
    client: &mut S,
    upstream: &mut TcpStream,
    body_left: u64,
) -> std::io::Result<()> {
    if body_left > 0 {
        let copied = tokio::io::copy(&mut (&mut *client).take(body_left), upstream).await?;
        if copied < body_left {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    let (head, used) = tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, async {
        loop {
            if let Some(done) = close_response_head(&buf)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
            {
                return Ok::<_, std::io::Error>(done);
            }
            let room = MAX_HEAD_LEN.saturating_sub(buf.len()).clamp(1, chunk.len());
            let n = upstream.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    client.write_all(&head).await?;
    client.write_all(buf.get(used..).unwrap_or(&[])).await?;
    tokio::io::copy(upstream, client).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> Resolver {
        Resolver {
            server: "100.64.0.10:53".parse().unwrap(),
            device: "tun0".into(),
            cluster_domain: "cluster.local".into(),
            timeout: Duration::from_secs(2),
            cache: Mutex::new(HashMap::new()),
            cache_names: 2,
            cache_ttl: Duration::from_secs(30),
            lookups: Arc::new(Semaphore::new(4)),
        }
    }

    #[test]
    fn svc_names_get_the_cluster_domain() {
        let r = resolver();
        assert_eq!(r.fqdn("Web.Default.svc"), "web.default.svc.cluster.local");
        assert_eq!(r.fqdn("web.default.svc."), "web.default.svc.");
        assert_eq!(r.fqdn("api.example.org"), "api.example.org");
        assert_eq!(r.fqdn("svc"), "svc");
    }

    #[test]
    fn cache_is_bounded_and_capped() {
        let r = resolver();
        let ip: IpAddr = "100.96.1.10".parse().unwrap();
        r.remember("zero.ttl", ip, Some(0));
        r.remember("no.ttl", ip, None);
        assert!(lock(&r.cache).is_empty());
        r.remember("long.ttl", ip, Some(86400));
        let exp = lock(&r.cache).get("long.ttl").unwrap().1;
        assert!(exp <= Instant::now() + r.cache_ttl);
        for i in 0..r.cache_names + 10 {
            r.remember(&format!("n{i}.example"), ip, Some(10));
            assert!(lock(&r.cache).len() <= r.cache_names);
        }
    }
}
