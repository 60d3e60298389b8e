//! HTTP CONNECT ingress that behaves like the seed's Envoy gateway: it terminates
//! `CONNECT` (HTTP/1.0 or 1.1), picks the backend by the value of a routing header
//! (`--route <value>=<host:port>`), answers `200` once the backend is connected and then
//! forwards raw bytes both ways with half-close. Missing header → 403, unknown value → 404,
//! backend unreachable → 503, other methods → 405, malformed heads → 400.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use common::connect::{parse_request, HeadError, RequestHead, MAX_HEAD_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "HTTP CONNECT ingress that routes by header (an Envoy stand-in)")]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "0.0.0.0:8132")]
    listen: SocketAddr,
    /// Name of the routing header.
    #[arg(long, default_value = "Reversed-VPN")]
    header_name: String,
    /// Route `<header value>=<host:port>` (repeatable).
    #[arg(long = "route", value_parser = parse_route)]
    routes: Vec<(String, String)>,
    /// Most connections at once; more are answered 503.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Backend connect timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
}

fn parse_route(s: &str) -> Result<(String, String), String> {
    match s.rsplit_once('=') {
        Some((v, b)) if !v.is_empty() && !b.is_empty() => Ok((v.to_owned(), b.to_owned())),
        _ => Err(format!(
            "route must be <header value>=<host:port>, got {s:?}"
        )),
    }
}

struct Config {
    header_name: String,
    routes: HashMap<String, String>,
    connect_timeout: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let cfg = Arc::new(Config {
        header_name: args.header_name,
        routes: args.routes.into_iter().collect(),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    info!(listen = %args.listen, header = %cfg.header_name, routes = ?cfg.routes, "ingress listening");
    let limit = Arc::new(Semaphore::new(args.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            warn!(%peer, "connection limit reached");
            let _ = stream.try_write(&error_response(1, 503, "connection limit reached"));
            continue;
        };
        let cfg = Arc::clone(&cfg);
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer, &cfg).await {
                info!(%peer, error = format!("{e:#}"), "connection ended with error");
            }
            drop(permit);
        });
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn error_response(minor: u8, code: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.{minor} {code} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        reason(code),
        body.len() + 1
    )
    .into_bytes()
}

async fn reject(
    client: &mut TcpStream,
    peer: SocketAddr,
    minor: u8,
    code: u16,
    why: &str,
) -> Result<()> {
    info!(%peer, code, reason = why, "rejected");
    client.write_all(&error_response(minor, code, why)).await?;
    client.shutdown().await?;
    Ok(())
}

/// Result of reading a request head.
enum Outcome {
    /// The client closed before sending a complete head.
    Closed,
    /// A complete head, its length, and the number of bytes read (head plus early stream bytes).
    Head(RequestHead, usize, usize),
    /// No complete head within [`MAX_HEAD_LEN`] bytes.
    TooLarge,
    /// Not an HTTP/1.x request head.
    Malformed(HeadError),
}

async fn read_head(client: &mut TcpStream, buf: &mut [u8]) -> Result<Outcome> {
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Ok(Outcome::TooLarge);
        }
        let n = client.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(Outcome::Closed);
        }
        filled += n;
        match parse_request(&buf[..filled]) {
            Ok(Some((head, len))) => return Ok(Outcome::Head(head, len, filled)),
            Ok(None) => {}
            Err(HeadError::HeadTooLarge) => return Ok(Outcome::TooLarge),
            Err(e) => return Ok(Outcome::Malformed(e)),
        }
    }
}

async fn handle(mut client: TcpStream, peer: SocketAddr, cfg: &Config) -> Result<()> {
    client.set_nodelay(true)?;
    let mut buf = vec![0u8; MAX_HEAD_LEN];
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client, &mut buf)).await;
    let (head, head_len, filled) = match head {
        Err(_) => {
            return reject(
                &mut client,
                peer,
                1,
                400,
                "timed out reading the request head",
            )
            .await
        }
        Ok(res) => match res? {
            Outcome::Closed => return Ok(()),
            Outcome::TooLarge => {
                let why = format!("request head larger than {MAX_HEAD_LEN} bytes");
                return reject(&mut client, peer, 1, 431, &why).await;
            }
            Outcome::Malformed(e) => {
                return reject(
                    &mut client,
                    peer,
                    1,
                    400,
                    &format!("malformed request: {e}"),
                )
                .await;
            }
            Outcome::Head(h, len, filled) => (h, len, filled),
        },
    };
    let v = head.version;
    if head.method != "CONNECT" {
        return reject(&mut client, peer, v, 405, "only CONNECT is supported").await;
    }
    let value = head
        .header(&cfg.header_name)
        .map(|v| String::from_utf8_lossy(v).trim().to_owned());
    let Some(value) = value else {
        let why = format!("missing routing header {}", cfg.header_name);
        return reject(&mut client, peer, v, 403, &why).await;
    };
    let Some(backend) = cfg.routes.get(&value) else {
        let why = format!("no route for {}: {value}", cfg.header_name);
        return reject(&mut client, peer, v, 404, &why).await;
    };
    let upstream =
        tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(backend.as_str())).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = format!("backend {backend} unavailable: {e}");
            return reject(&mut client, peer, v, 503, &why).await;
        }
        Err(_) => {
            let why = format!("backend {backend} connect timed out");
            return reject(&mut client, peer, v, 503, &why).await;
        }
    };
    upstream.set_nodelay(true)?;
    client
        .write_all(format!("HTTP/1.{v} 200 OK\r\n\r\n").as_bytes())
        .await?;
    let early = &buf[head_len..filled];
    if !early.is_empty() {
        upstream.write_all(early).await?;
    }
    info!(%peer, target = %head.target, route = %value, %backend, early_bytes = early.len(), "tunnel open");
    // Readiness-driven copy with 64 KiB buffers borrowed per read (as a production proxy
    // does); tokio's copy_bidirectional would use 8 KiB buffers and pin them per connection.
    let (up, down) = common::io::splice::copy_bidirectional(&client, &upstream).await?;
    info!(%peer, %backend, bytes_up = up + early.len() as u64, bytes_down = down, "tunnel closed");
    Ok(())
}
