//! How the seed side reaches a pod port on each plane: plain TCP, TCP bound to a device,
//! or kube-apiserver's CONNECT through the seed server's proxy (UDS or mTLS), as async
//! streams for the load generators and as blocking streams for the ping-pong client.
//!
//! TCP variants must run on a thread in the seed namespace (see [`super::nsrt`]).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::connect::{parse_response, ResponseHead, MAX_HEAD_LEN};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::pki::Pki;

/// An async byte stream of any kind.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A boxed async stream.
pub type BoxStream = Box<dyn AsyncStream>;

/// The egress proxy's mTLS listener with kube-apiserver's client certificate.
pub struct MtlsProxy {
    /// Listener address (in the seed namespace).
    pub addr: SocketAddr,
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for MtlsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MtlsProxy {
    /// A client for `addr` trusting the lab CA and presenting its client certificate.
    /// Session resumption is off: every connection makes a full handshake, as kube-apiserver's
    /// egress dialer does.
    pub fn new(addr: SocketAddr, pki: &Pki) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in common::io::tls::load_certs(&pki.ca)? {
            roots.add(c).context("add CA")?;
        }
        let certs = common::io::tls::load_certs(&pki.client_cert)?;
        let key = common::io::tls::load_key(&pki.client_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("client certificate")?;
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            addr,
            connector: TlsConnector::from(Arc::new(cfg)),
            name: ServerName::IpAddress(addr.ip().into()),
        })
    }

    async fn connect(&self) -> Result<BoxStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .context("mTLS handshake with the proxy")?;
        Ok(Box::new(tls))
    }
}

/// A way from the seed namespace to the pod.
#[derive(Debug, Clone)]
pub enum Route {
    /// Plain TCP to the address.
    Tcp(IpAddr),
    /// TCP bound to a device (`SO_BINDTODEVICE`), e.g. the seed TUN.
    Bound(IpAddr, String),
    /// kube-apiserver's CONNECT for the address over the proxy's Unix socket.
    Uds(PathBuf, IpAddr),
    /// kube-apiserver's CONNECT for the address over the proxy's mTLS listener.
    Mtls(Arc<MtlsProxy>, IpAddr),
}

impl Route {
    /// The pod address this route reaches.
    pub fn ip(&self) -> IpAddr {
        match self {
            Route::Tcp(ip) | Route::Bound(ip, _) | Route::Uds(_, ip) | Route::Mtls(_, ip) => *ip,
        }
    }

    /// Opens a stream to `port` of the pod (CONNECT answered 200 for the proxy routes).
    pub async fn connect(&self, port: u16) -> Result<BoxStream> {
        let target = SocketAddr::new(self.ip(), port);
        match self {
            Route::Tcp(_) => {
                let s = tokio::net::TcpStream::connect(target)
                    .await
                    .with_context(|| format!("connect {target}"))?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Route::Bound(_, dev) => {
                let sock = if target.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.bind_device(Some(dev.as_bytes()))
                    .with_context(|| format!("bind to device {dev}"))?;
                sock.set_nodelay(true)?;
                let s = sock
                    .connect(target)
                    .await
                    .with_context(|| format!("connect {target} via {dev}"))?;
                Ok(Box::new(s))
            }
            Route::Uds(path, _) => {
                let mut s = tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| format!("connect {}", path.display()))?;
                connect_via(&mut s, &target.to_string()).await?;
                Ok(Box::new(s))
            }
            Route::Mtls(proxy, _) => {
                let mut s = proxy.connect().await?;
                connect_via(&mut s, &target.to_string()).await?;
                Ok(s)
            }
        }
    }

    /// Opens a blocking stream to `port` of the pod; `timeout` bounds the connect and every
    /// later read and write. Not for [`Route::Mtls`].
    pub fn connect_blocking(&self, port: u16, timeout: Duration) -> Result<BlockingStream> {
        let target = SocketAddr::new(self.ip(), port);
        let s = match self {
            Route::Tcp(_) => BlockingStream::Tcp(
                TcpStream::connect_timeout(&target, timeout)
                    .with_context(|| format!("connect {target}"))?,
            ),
            Route::Bound(_, dev) => {
                let sock = socket2::Socket::new(
                    socket2::Domain::for_address(target),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                sock.bind_device(Some(dev.as_bytes()))
                    .with_context(|| format!("bind to device {dev}"))?;
                sock.connect_timeout(&target.into(), timeout)
                    .with_context(|| format!("connect {target} via {dev}"))?;
                BlockingStream::Tcp(sock.into())
            }
            Route::Uds(path, _) => {
                let (reply, s) = crate::client::connect_uds(path, &target.to_string(), timeout)?;
                if reply.status != 200 {
                    bail!("CONNECT {target} answered {}", reply.head.trim_end());
                }
                BlockingStream::Unix(s)
            }
            Route::Mtls(..) => bail!("no blocking client for the mTLS route"),
        };
        s.setup(timeout)?;
        Ok(s)
    }
}

/// A blocking TCP or Unix stream.
#[derive(Debug)]
pub enum BlockingStream {
    /// TCP (Nagle off).
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl BlockingStream {
    fn setup(&self, timeout: Duration) -> Result<()> {
        match self {
            BlockingStream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
            BlockingStream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
        }
        Ok(())
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.read(buf),
            BlockingStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.write(buf),
            BlockingStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BlockingStream::Tcp(s) => s.flush(),
            BlockingStream::Unix(s) => s.flush(),
        }
    }
}

/// Reads a response head; returns it and any bytes read after it.
pub async fn read_response_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(ResponseHead, Vec<u8>)> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((head, len)) = parse_response(&buf).context("bad response head")? {
            return Ok((head, buf.split_off(len)));
        }
        if buf.len() >= MAX_HEAD_LEN {
            bail!("response head longer than {MAX_HEAD_LEN} bytes");
        }
        let n = s.read(&mut chunk).await.context("read response head")?;
        if n == 0 {
            bail!("connection closed inside the response head");
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// kube-apiserver's CONNECT for `target` over `s`: exactly its request bytes, a 200 answer,
/// and nothing after the head.
pub async fn connect_via<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, target: &str) -> Result<()> {
    s.write_all(&crate::client::apiserver_connect_request(target))
        .await
        .context("send CONNECT")?;
    let (head, rest) = read_response_head(s).await?;
    if head.status != 200 {
        bail!("CONNECT {target} answered {}", head.status_line());
    }
    if !rest.is_empty() {
        bail!("{} bytes followed the CONNECT 200 head", rest.len());
    }
    Ok(())
}

/// Sends `GET /` for `host` with `Connection: close`; returns the status and the moment the
/// first response byte arrived, then reads the rest of the response (at most 1 MiB).
pub async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
) -> Result<(u16, Instant)> {
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .context("send GET")?;
    let mut first = [0u8; 1];
    let n = s.read(&mut first).await.context("read response")?;
    let at = Instant::now();
    if n == 0 {
        bail!("connection closed before the response");
    }
    let mut rest = s.take(1 << 20);
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(&first);
    // Read until the head is complete; the body follows until the server closes.
    let (status, _) = loop {
        if let Some((head, len)) = parse_response(&buf).context("bad response head")? {
            break (head.status, len);
        }
        let mut chunk = [0u8; 1024];
        let n = rest.read(&mut chunk).await.context("read response head")?;
        if n == 0 {
            bail!("connection closed inside the response head");
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    let mut sink = Vec::new();
    // The body is not needed; an error after a complete head does not void the answer.
    let _ = rest.read_to_end(&mut sink).await;
    Ok((status, at))
}
