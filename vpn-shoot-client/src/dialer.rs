//! Dialing out: TCP (optionally TLS) to the ingress, the CONNECT request routed by header, the
//! response head, and the preamble.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use common::connect::{format_connect_request, parse_response, MAX_HEAD_LEN};
use common::frame::PREAMBLE;
use common::io::sock::{tune_stream, TcpTuning};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// An open tunnel stream: reader, writer, and bytes already read past the CONNECT answer.
pub struct Dialed {
    pub reader: Reader,
    pub writer: Writer,
    pub leftover: BytesMut,
    pub remote: String,
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
}

impl Dialer {
    pub fn new(cfg: &Config, header_value: &str) -> Result<Self> {
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
        let (mut reader, mut writer): (Reader, Writer) = match &self.tls {
            None => {
                let (r, w) = tcp.into_split();
                (Box::pin(r), Box::pin(w))
            }
            Some((cfg, name)) => {
                let s = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS to the ingress")?;
                let (r, w) = tokio::io::split(s);
                (Box::pin(r), Box::pin(w))
            }
        };
        writer
            .write_all(&self.request)
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
            if reader.read_buf(&mut buf).await? == 0 {
                bail!("ingress closed the connection before answering");
            }
        };
        if head.status != 200 {
            bail!("ingress answered {:?}", head.status_line());
        }
        let leftover = buf.split_off(len);
        // Preamble and the first message (the handshake initiation) in one write: the
        // handshake starts the moment the 200 is read.
        let mut hello = Vec::with_capacity(PREAMBLE.len() + first.len());
        hello.extend_from_slice(&PREAMBLE);
        hello.extend_from_slice(first);
        writer.write_all(&hello).await.context("send preamble")?;
        Ok(Dialed {
            reader,
            writer,
            leftover,
            remote,
        })
    }
}
