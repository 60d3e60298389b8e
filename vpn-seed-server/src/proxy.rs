//! The egress proxy kube-apiserver talks to: HTTP CONNECT over mTLS or a Unix socket,
//! authorized against the shoot networks, dialled through the seed TUN.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::connect::{format_response, parse_request, parse_target, Target, MAX_HEAD_LEN};
use common::io::sock::{connect_bound, ConnectError, TcpTuning};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::{answer_slot, inc, Server};

/// Time a client has to send its CONNECT head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What every proxied connection needs to know.
pub struct ProxyContext {
    pub server: Arc<Server>,
    pub tun_name: String,
    pub dial_timeout: Duration,
    pub limit: Arc<Semaphore>,
    pub tuning: TcpTuning,
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
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(refuse(400, "no request head within 10s")))
}

impl ProxyContext {
    /// Serves one client connection of kube-apiserver (or Prometheus).
    pub async fn serve<S>(&self, mut client: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        match self.open(&mut client).await {
            Err((target, Refusal(code, reason, body))) => {
                inc(&self.server.stats.proxy_answers[answer_slot(code)]);
                tracing::warn!(client = %peer, %target, code, reason = %body, "CONNECT refused");
                let _ = client
                    .write_all(&format_response(code, reason, &body))
                    .await;
                let _ = client.shutdown().await;
            }
            Ok((target, mut upstream, _permit)) => {
                inc(&self.server.stats.proxy_answers[0]);
                tracing::debug!(client = %peer, %target, elapsed = ?started.elapsed(), "CONNECT established");
                if client
                    .write_all(&format_response(200, "Connection established", ""))
                    .await
                    .is_err()
                {
                    return;
                }
                self.server.stats.proxy_open.fetch_add(1, Ordering::Relaxed);
                let res = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                self.server.stats.proxy_open.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(client = %peer, %target, result = ?res, "proxied connection closed");
            }
        }
    }

    /// Reads and authorizes the request and dials the target; the permit bounds open
    /// connections for as long as it is held.
    async fn open<S>(
        &self,
        client: &mut S,
    ) -> Result<(String, TcpStream, OwnedSemaphorePermit), (String, Refusal)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (head, rest) = read_head(client).await.map_err(|r| ("-".to_string(), r))?;
        let target = head.target.clone();
        let fail = |r: Refusal| (target.clone(), r);
        if !head.method.eq_ignore_ascii_case("CONNECT") {
            return Err(fail(refuse(
                405,
                format!("method {} not allowed; use CONNECT", head.method),
            )));
        }
        let addr: SocketAddr = match parse_target(&head.target) {
            Ok(Target::Addr(a)) => a,
            Ok(Target::Host { host, .. }) => {
                return Err(fail(refuse(
                    502,
                    format!(
                    "cannot resolve {host}: hostname targets are not supported, use an IP address"
                ),
                )))
            }
            Err(e) => return Err(fail(refuse(400, format!("bad target: {e}")))),
        };
        let ip = match addr.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(v6)),
            v4 => v4,
        };
        let addr = SocketAddr::new(ip, addr.port());
        if !self.server.shoot_networks.contains(ip) {
            return Err(fail(refuse(
                403,
                format!("{ip} is not in the shoot networks"),
            )));
        }
        if self.server.live_count() == 0 {
            return Err(fail(refuse(503, "no tunnel to the shoot is up")));
        }
        let permit = self
            .limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| fail(refuse(503, "connection limit reached")))?;
        let upstream = connect_bound(addr, Some(&self.tun_name), self.dial_timeout, &self.tuning)
            .await
            .map_err(|e| match e {
                ConnectError::Timeout => fail(refuse(
                    504,
                    format!("no answer from {addr} within {:?}", self.dial_timeout),
                )),
                ConnectError::Refused => {
                    fail(refuse(502, format!("{addr} refused the connection")))
                }
                other => fail(refuse(502, format!("{addr} unreachable: {other}"))),
            })?;
        let mut upstream = upstream;
        if !rest.is_empty() {
            upstream
                .write_all(&rest)
                .await
                .map_err(|e| fail(refuse(502, format!("write to {addr}: {e}"))))?;
        }
        Ok((target, upstream, permit))
    }
}
