//! Dialing out: TCP (optionally TLS) to the ingress, the CONNECT request routed by header, the
//! response head, and the preamble.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use common::connect::{format_connect_request, parse_response, MAX_HEAD_LEN};
use common::io::framed::FrameSink;
use common::io::nodeio::StreamReader;
use common::io::sock::{tune_stream, TcpTuning};
use common::preamble::{PreambleKey, PREAMBLE_V1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// The transport of an open tunnel stream.
pub enum Transport {
    /// Plain TCP: written directly from any task, read by readiness.
    Plain(Arc<TcpStream>),
    /// TLS to the ingress: read and written through the TLS stream's halves.
    Tls(Reader, Writer),
}

/// An open tunnel stream and bytes already read past the CONNECT answer.
pub struct Dialed {
    pub transport: Transport,
    pub leftover: BytesMut,
    pub remote: String,
}

impl Dialed {
    /// Splits into the reading side and the sink that writes frames (and its writer half).
    pub fn into_parts(self, max_queued: usize) -> (StreamReader, FrameSink, Option<Writer>) {
        match self.transport {
            Transport::Plain(sock) => (
                StreamReader::Plain(sock.clone()),
                FrameSink::new(Some(sock), max_queued),
                None,
            ),
            Transport::Tls(r, w) => (
                StreamReader::Boxed(r),
                FrameSink::new(None, max_queued),
                Some(w),
            ),
        }
    }
}

async fn write_all(t: &mut Transport, data: &[u8]) -> std::io::Result<()> {
    match t {
        Transport::Plain(sock) => common::io::framed::write_direct(sock, data).await,
        Transport::Tls(_, w) => w.write_all(data).await,
    }
}

/// The preambles of this client process: version 2 (authenticated with the static-static key,
/// naming this process by a random instance id and counting its streams), or version 1.
pub struct Preambles {
    key: Option<PreambleKey>,
    instance: u64,
    counter: std::sync::atomic::AtomicU64,
}

impl Preambles {
    /// Version-2 preambles with `key`, or version 1 when `key` is None.
    pub fn new(key: Option<PreambleKey>) -> Self {
        let instance = loop {
            let i: u64 = rand::random();
            if i != 0 {
                break i;
            }
        };
        // Start from the wall clock so the counter also grows across a restart that happened to
        // draw the same instance id.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1);
        Self {
            key,
            instance,
            counter: std::sync::atomic::AtomicU64::new(start),
        }
    }

    /// This process's instance id.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The preamble of the next stream.
    pub fn next(&self) -> Vec<u8> {
        match &self.key {
            Some(k) => {
                let n = self
                    .counter
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                k.preamble(self.instance, n).to_vec()
            }
            None => PREAMBLE_V1.to_vec(),
        }
    }
}

/// Everything needed to dial one seed server replica.
pub struct Dialer {
    pub host: String,
    pub port: u16,
    pub request: Vec<u8>,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub timeout: Duration,
    pub preambles: Arc<Preambles>,
}

impl Dialer {
    pub fn new(cfg: &Config, header_value: &str, preambles: Arc<Preambles>) -> Result<Self> {
        let request = format_connect_request(
            &cfg.connect_target,
            &[(cfg.header_name.as_str(), header_value)],
        )
        .map_err(|e| anyhow!("CONNECT request: {e}"))?;
        let tls = match &cfg.endpoint_tls {
            Some(ca) => {
                let name = rustls::pki_types::ServerName::try_from(cfg.endpoint_host.clone())
                    .map_err(|e| anyhow!("endpoint name {:?}: {e}", cfg.endpoint_host))?;
                Some((common::io::tls::client_config(ca)?, name))
            }
            None => None,
        };
        Ok(Self {
            host: cfg.endpoint_host.clone(),
            port: cfg.endpoint_port,
            request,
            tls,
            timeout: cfg.dial_timeout,
            preambles,
        })
    }

    /// Opens a stream through the ingress and sends the preamble followed by `first`.
    pub async fn dial(&self, first: &[u8]) -> Result<Dialed> {
        tokio::time::timeout(self.timeout, self.dial_inner(first))
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer from {}:{} within {:?}",
                    self.host,
                    self.port,
                    self.timeout
                )
            })?
    }

    async fn dial_inner(&self, first: &[u8]) -> Result<Dialed> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connect to {}:{}", self.host, self.port))?;
        let remote = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| format!("{}:{}", self.host, self.port));
        tune_stream(&tcp, &TcpTuning::default()).context("socket options")?;
        let mut transport = match &self.tls {
            None => Transport::Plain(Arc::new(tcp)),
            Some((cfg, name)) => {
                let s = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS to the ingress")?;
                let (r, w) = tokio::io::split(s);
                Transport::Tls(Box::pin(r), Box::pin(w))
            }
        };
        write_all(&mut transport, &self.request)
            .await
            .context("send CONNECT")?;
        let mut buf = BytesMut::with_capacity(4096);
        let (head, len) = loop {
            if let Some(h) = parse_response(&buf).context("ingress answer")? {
                break h;
            }
            if buf.len() >= MAX_HEAD_LEN {
                bail!("ingress answer head exceeds {MAX_HEAD_LEN} bytes");
            }
            let n = match &mut transport {
                Transport::Plain(sock) => common::io::framed::read_some(sock, &mut buf).await?,
                Transport::Tls(r, _) => r.read_buf(&mut buf).await?,
            };
            if n == 0 {
                bail!("ingress closed the connection before answering");
            }
        };
        if head.status != 200 {
            bail!("ingress answered {:?}", head.status_line());
        }
        let leftover = buf.split_off(len);
        // Preamble and the first message (the handshake initiation) in one write: the
        // handshake starts the moment the 200 is read.
        let mut hello = self.preambles.next();
        hello.extend_from_slice(first);
        write_all(&mut transport, &hello)
            .await
            .context("send preamble")?;
        Ok(Dialed {
            transport,
            leftover,
            remote,
        })
    }
}
